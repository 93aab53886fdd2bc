//! The TLS listener: TLS is terminated here, off the cores, so that the io_uring data path
//! stays plaintext and unchanged.
//!
//! Why off the cores: a TLS session is a state machine that wants to read and write on its own
//! schedule (handshake flights, session tickets, alerts, close_notify), and rustls works on
//! blocking-style `Read`/`Write` calls; folding that into every core's completion-driven loop
//! would touch every receive and send path the cores have (direct reads into slots, sends from
//! slots, provided buffers). Terminating it in threads of its own keeps those paths as they
//! are, and costs one extra copy through a Unix socket pair per byte in each direction.
//!
//! Each of `listen.tls_threads` threads (std, rustls and `poll(2)`; no async runtime)
//! accepts on the shared, non-blocking TLS listener and, for every connection:
//!
//! 1. admits the peer as a TCP caller (`listen.allowed_clients`, `connections_max`, the
//!    Unix reserve, `connections_per_ip_max`), through `Shared::admission` like a core does,
//!    counting refusals in the same counters; the ticket is taken *before* the handshake, so
//!    a flood of handshakes is bounded by the same limits as plaintext connections;
//! 2. runs the handshake, bounded by `listen.tls_handshake_timeout_ms` (a caller that stalls
//!    is dropped and counted in `tls_handshake_timeouts`; failed handshakes are counted in
//!    `tls_handshakes_failed`). With `listen.tls_client_ca`, rustls refuses a caller whose
//!    certificate is missing or does not chain to it;
//! 3. takes the caller's identity from its verified certificate (the first DNS subject
//!    alternative name, else the subject's common name) into its ticket's `Caller`, creates a
//!    `socketpair(AF_UNIX, SOCK_STREAM)` and hands one end to the core with the fewest callers
//!    (`Msg::Connection`): the core serves an ordinary caller, whose ACL checks see the TCP
//!    address and the TLS identity (`admission::ServiceAcl`);
//! 4. pumps bytes both ways between the TLS session and its end of the pair through two
//!    buffers of [`PUMP_BUFFER_BYTES`] (and rustls's own, its outgoing one limited to
//!    [`PUMP_BUFFER_BYTES`] too): a side is read only while the buffer towards the other side
//!    has room, so a caller that does not read its replies stops the core's writes to the
//!    pair (and the core's own `write_queue_max_bytes` then applies), and a core that does
//!    not read stops reading the caller. Each time a buffer fills is counted in
//!    `tls_buffers_full`;
//! 5. closes cleanly: when the caller closes (close_notify or EOF), the pair's write side is
//!    shut once everything it sent is delivered, and the core closes the connection as it
//!    does any caller's; when the core closes its end, what it wrote is delivered, then a
//!    close_notify, then the TCP connection is closed.
//!
//! At shutdown a thread stops accepting and drops the connections still in their handshake
//! (they were never handed to a core); the others end as the cores close them.
//!
//! Certificates are reloaded with the config (SIGHUP, `acgi-bridge reload`): the reload loads
//! `tls_cert`, `tls_key` and `tls_client_ca` again (a bad file refuses the reload, the running
//! certificate stays) and, once it succeeds, [`install`]s the new server configuration. Each
//! thread picks it up at its next accept (one atomic load per accept to notice): new
//! handshakes use it, while every open session keeps the configuration it started with
//! (rustls holds it per connection), so no connection is cut.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{PollFd, PollFlags};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConnection;

mod certs;
mod pump;

use self::certs::*;
pub use self::certs::{identity_of, install, read_certs, server_config, ServerConfigHandle};
use self::pump::*;

use super::admission::{Caller, Peer, Refused, Ticket};
use super::shared::{Msg, Shared};
use crate::config::Listen;
use crate::metrics::counters::BridgeCounters;

/// Bytes each of a connection's two pump buffers holds (caller to core, core to caller), and
/// the limit on rustls's buffer of encrypted bytes waiting to be sent to the caller.
pub const PUMP_BUFFER_BYTES: usize = 64 * 1024;

/// Connections one thread accepts per turn of its loop, so that a flood of new connections
/// cannot starve the pumping of those already open.
const ACCEPTS_PER_TURN: usize = 64;

/// How long a thread sleeps in `poll(2)` at most: how soon it notices a shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often a thread logs a refusal or a failed handshake at most (the rest are counted).
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What the TLS threads count (they have no core report): added to the bridge's counters by
/// the control thread when it gathers them ([`add_counters`]).
struct Counts {
    handshakes: AtomicU64,
    handshakes_failed: AtomicU64,
    handshake_timeouts: AtomicU64,
    buffers_full: AtomicU64,
    refused: AtomicU64,
    refused_not_allowed: AtomicU64,
    refused_tcp_share: AtomicU64,
    refused_per_peer: AtomicU64,
}

static COUNTS: Counts = Counts {
    handshakes: AtomicU64::new(0),
    handshakes_failed: AtomicU64::new(0),
    handshake_timeouts: AtomicU64::new(0),
    buffers_full: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    refused_not_allowed: AtomicU64::new(0),
    refused_tcp_share: AtomicU64::new(0),
    refused_per_peer: AtomicU64::new(0),
};

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Add what the TLS threads counted into `counters` (status and `/metrics`).
pub fn add_counters(counters: &mut BridgeCounters) {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    counters.tls_handshakes += get(&COUNTS.handshakes);
    counters.tls_handshakes_failed += get(&COUNTS.handshakes_failed);
    counters.tls_handshake_timeouts += get(&COUNTS.handshake_timeouts);
    counters.tls_buffers_full += get(&COUNTS.buffers_full);
    counters.connections_refused += get(&COUNTS.refused);
    counters.connections_refused_not_allowed += get(&COUNTS.refused_not_allowed);
    counters.connections_refused_tcp_share += get(&COUNTS.refused_tcp_share);
    counters.connections_refused_per_peer += get(&COUNTS.refused_per_peer);
}

/// The running TLS threads.
pub struct TlsThreads {
    done: mpsc::Receiver<()>,
    threads: usize,
}

impl TlsThreads {
    /// Wait (at most `within`) for the threads to finish once the cores have stopped: each
    /// sends its last close_notify as the cores close their ends of the pairs.
    pub fn wait(self, within: Duration) {
        let deadline = Instant::now() + within;
        for _ in 0..self.threads {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                tracing::warn!("a TLS thread did not finish in time; its connections are cut");
                return;
            }
        }
    }
}

/// Start `threads` TLS threads accepting on `listener`.
pub fn start(
    listener: TcpListener,
    config: ServerConfigHandle,
    handshake_timeout: Duration,
    threads: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<TlsThreads> {
    listener
        .set_nonblocking(true)
        .context("making the TLS listener non-blocking")?;
    let listener = Arc::new(listener);
    let (done_tx, done) = mpsc::channel();
    install(&config);
    let generation = GENERATION.load(Ordering::SeqCst);
    for index in 0..threads {
        let mut thread = TlsThread {
            listener: Arc::clone(&listener),
            config: Arc::clone(&config.0),
            generation,
            handshake_timeout,
            shared: Arc::clone(&shared),
            sessions: Vec::new(),
            accepting: true,
            logged: None,
        };
        let done_tx = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("acgi-tls-{index}"))
            .spawn(move || {
                thread.run();
                let _ = done_tx.send(());
            })
            .context("starting a TLS thread")?;
    }
    Ok(TlsThreads { done, threads })
}

/// One TLS thread: the listener (shared with the other TLS threads) and its sessions.
struct TlsThread {
    listener: Arc<TcpListener>,
    /// The configuration this thread's new sessions use, and the [`GENERATION`] it is of.
    config: Arc<rustls::ServerConfig>,
    generation: u64,
    handshake_timeout: Duration,
    shared: Arc<Shared>,
    sessions: Vec<Session>,
    accepting: bool,
    /// When this thread last logged a refusal or a failed handshake.
    logged: Option<Instant>,
}

impl TlsThread {
    fn run(&mut self) {
        loop {
            if self.accepting && self.shared.shutdown.load(Ordering::SeqCst) {
                self.stop_accepting();
            }
            if !self.accepting && self.sessions.is_empty() {
                return;
            }
            let ready = match self.poll() {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::warn!(%error, "TLS thread: poll failed; retrying");
                    std::thread::sleep(POLL_INTERVAL);
                    continue;
                }
            };
            if ready.listener {
                self.accept_some();
            }
            self.step(&ready.sessions);
            self.expire_handshakes();
        }
    }

    /// Stop accepting; drop the connections still in their handshake (no core has them).
    fn stop_accepting(&mut self) {
        self.accepting = false;
        let shared = &self.shared;
        self.sessions
            .retain_mut(|session| match &mut session.state {
                State::Handshaking { ticket, .. } => {
                    if let Some(ticket) = ticket.take() {
                        shared.admission.release(ticket);
                    }
                    false
                }
                State::Open(_) => true,
            });
    }

    /// Wait until the listener or a session can make progress, or a handshake's deadline, or
    /// `POLL_INTERVAL`.
    fn poll(&mut self) -> io::Result<Ready> {
        let now = Instant::now();
        let mut timeout = POLL_INTERVAL;
        let mut fds = Vec::with_capacity(1 + 2 * self.sessions.len());
        // (index of the session, or usize::MAX for the listener)
        let mut owners = Vec::with_capacity(fds.capacity());
        if self.accepting {
            fds.push(PollFd::new(&*self.listener, PollFlags::IN));
            owners.push(usize::MAX);
        }
        for (index, session) in self.sessions.iter().enumerate() {
            if let State::Handshaking { deadline, .. } = session.state {
                timeout = timeout.min(deadline.saturating_duration_since(now));
            }
            let (tcp, pair) = session.interest();
            if !tcp.is_empty() {
                fds.push(PollFd::new(&session.tcp, tcp));
                owners.push(index);
            }
            if let (State::Open(pump), false) = (&session.state, pair.is_empty()) {
                fds.push(PollFd::new(&pump.pair, pair));
                owners.push(index);
            }
        }
        let timeout = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos().into(),
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
        let mut ready = Ready::default();
        for (fd, owner) in fds.iter().zip(owners) {
            if fd.revents().is_empty() {
                continue;
            }
            if owner == usize::MAX {
                ready.listener = true;
            } else if ready.sessions.last() != Some(&owner) {
                ready.sessions.push(owner);
            }
        }
        Ok(ready)
    }

    fn accept_some(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                Ok((tcp, addr)) => self.admit(tcp, addr.ip()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // EMFILE and the like: wait for the next turn rather than spin.
                    tracing::warn!(%error, "TLS accept failed; retrying shortly");
                    return;
                }
            }
        }
    }

    /// Admit a new caller (or refuse it), and start its handshake.
    fn admit(&mut self, tcp: TcpStream, ip: IpAddr) {
        self.pick_up_installed();
        let caller = Caller::tls(ip);
        let ticket = match self.shared.admission.admit_caller(&caller) {
            Ok(ticket) => ticket,
            Err(refused) => return self.refuse(caller.peer, refused),
        };
        let setup = || -> Result<ServerConnection, String> {
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let mut tls =
                ServerConnection::new(Arc::clone(&self.config)).map_err(|e| e.to_string())?;
            tls.set_buffer_limit(Some(PUMP_BUFFER_BYTES));
            Ok(tls)
        };
        match setup() {
            Ok(tls) => self.sessions.push(Session {
                tcp,
                tls,
                peer: caller.peer,
                state: State::Handshaking {
                    ticket: Some(ticket),
                    deadline: Instant::now() + self.handshake_timeout,
                },
            }),
            Err(error) => {
                self.shared.admission.release(ticket);
                tracing::warn!(%ip, %error, "cannot set up a TLS connection");
            }
        }
    }

    /// Take the configuration [`install`] put in place since this thread last looked.
    fn pick_up_installed(&mut self) {
        let generation = GENERATION.load(Ordering::SeqCst);
        if generation == self.generation {
            return;
        }
        let current = CURRENT.read().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = current.as_ref() {
            self.config = Arc::clone(config);
        }
        self.generation = generation;
    }

    fn refuse(&mut self, peer: Peer, refused: Refused) {
        count(&COUNTS.refused);
        let limits = self.shared.admission.limits();
        let (why, limit) = match refused {
            Refused::NotAllowed => {
                count(&COUNTS.refused_not_allowed);
                ("not in listen.allowed_clients", None)
            }
            Refused::Full => ("connections_max reached", Some(limits.total)),
            Refused::TcpShare => {
                count(&COUNTS.refused_tcp_share);
                ("unix_connections_reserved reached", Some(limits.tcp))
            }
            Refused::PeerFull => {
                count(&COUNTS.refused_per_peer);
                ("connections_per_ip_max reached", Some(limits.per_ip))
            }
        };
        if self.log_due() {
            tracing::warn!(
                %peer,
                limit,
                "refusing a TLS caller connection: {why} (further refusals are counted in \
                 connections_refused, and logged at most once a second)"
            );
        }
    }

    fn log_due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .logged
            .is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL);
        if due {
            self.logged = Some(now);
        }
        due
    }

    /// Move every ready session on; drop those that are done or failed.
    fn step(&mut self, ready: &[usize]) {
        // From the last, so that swap_remove leaves the indices still to visit in place.
        for &index in ready.iter().rev() {
            let outcome = self.sessions[index].step();
            match outcome {
                Ok(Step::Pending) => {}
                Ok(Step::Handshaken) => {
                    count(&COUNTS.handshakes);
                    if let Err(error) = self.hand_over(index) {
                        tracing::warn!(%error, "cannot hand a TLS caller to a core");
                        self.drop_session(index);
                    } else if let Ok(Step::Done) | Err(_) = self.sessions[index].step() {
                        // (It may have data already, or have gone.)
                        self.drop_session(index);
                    }
                }
                Ok(Step::Done) => self.drop_session(index),
                Err(error) => {
                    if let State::Handshaking { .. } = self.sessions[index].state {
                        count(&COUNTS.handshakes_failed);
                        if self.log_due() {
                            let peer = self.sessions[index].peer;
                            tracing::warn!(
                                %peer,
                                %error,
                                "TLS handshake failed (further failures are counted in \
                                 tls_handshakes_failed, and logged at most once a second)"
                            );
                        }
                    }
                    self.drop_session(index);
                }
            }
        }
    }

    fn drop_session(&mut self, index: usize) {
        let mut session = self.sessions.swap_remove(index);
        if let State::Handshaking { ticket, .. } = &mut session.state {
            if let Some(ticket) = ticket.take() {
                self.shared.admission.release(ticket);
            }
        }
    }

    /// A finished handshake: name the caller, and give a core its end of a socket pair.
    fn hand_over(&mut self, index: usize) -> io::Result<()> {
        let session = &mut self.sessions[index];
        let identity = session
            .tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(identity_of);
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let State::Handshaking { ticket, .. } = &mut session.state else {
            unreachable!("handed over once, from its handshake");
        };
        let mut ticket: Ticket = ticket.take().expect("held until handed over");
        ticket.set_tls_identity(identity.map(Into::into));
        session.state = State::Open(Pump::new(ours));
        // The core with the fewest callers, counted there at once (as `Msg::Connection` says).
        let cores = &self.shared.cores;
        let least = cores
            .indices()
            .min_by_key(|&c| cores[c].callers.load(Ordering::Relaxed))
            .expect("at least one core");
        cores[least].callers.fetch_add(1, Ordering::Relaxed);
        self.shared.send(
            least,
            Msg::Connection {
                fd: theirs.into(),
                ticket,
            },
        );
        Ok(())
    }

    fn expire_handshakes(&mut self) {
        let now = Instant::now();
        let mut index = self.sessions.len();
        while index > 0 {
            index -= 1;
            if let State::Handshaking { deadline, .. } = self.sessions[index].state {
                if now >= deadline {
                    count(&COUNTS.handshake_timeouts);
                    if self.log_due() {
                        let peer = self.sessions[index].peer;
                        tracing::warn!(
                            %peer,
                            timeout_ms = self.handshake_timeout.as_millis() as u64,
                            "dropping a TLS caller that did not finish its handshake in \
                             listen.tls_handshake_timeout_ms (counted in tls_handshake_timeouts)"
                        );
                    }
                    self.drop_session(index);
                }
            }
        }
    }
}

#[derive(Default)]
struct Ready {
    listener: bool,
    sessions: Vec<usize>,
}

/// Bind the TLS listener (as the TCP one: not SO_REUSEPORT).
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let wanted: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("listen.tls {addr:?} is not an ip:port"))?;
    let listener = TcpListener::bind(wanted).with_context(|| {
        format!("binding TLS {addr} (is another bridge or process serving it?)")
    })?;
    rustix::net::listen(listener.as_fd(), 4096)?;
    Ok(listener)
}
