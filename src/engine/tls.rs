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

/// The TLS server configuration built at config load (a cheap clone), and a fingerprint of the
/// files it was built from (a reload installs it when that differs from the running one's).
#[derive(Clone)]
pub struct ServerConfigHandle(pub Arc<rustls::ServerConfig>, pub u64);

/// The configuration new handshakes use, and its generation (bumped by each [`install`]).
static CURRENT: std::sync::RwLock<Option<Arc<rustls::ServerConfig>>> = std::sync::RwLock::new(None);
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// From now on, new TLS handshakes use `handle`'s configuration (sessions open keep theirs).
pub fn install(handle: &ServerConfigHandle) {
    let mut current = CURRENT.write().unwrap_or_else(|p| p.into_inner());
    *current = Some(Arc::clone(&handle.0));
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// A fingerprint of the certificate, key and CA (DER), to tell whether a reload changed them
/// (not a security measure: SipHash with fixed keys).
fn fingerprint(parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

impl std::fmt::Debug for ServerConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerConfigHandle")
    }
}

/// The ring provider: it builds with no system library (no cmake, no OpenSSL).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path`, or why not (naming the file).
pub fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("cannot read certificates from {}: {error}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
            path.display()
        ));
    }
    Ok(certs)
}

/// Build the server configuration from `listen.tls_cert`, `tls_key` and `tls_client_ca`;
/// `Err`: the key at fault and why.
pub fn server_config(listen: &Listen) -> Result<ServerConfigHandle, (&'static str, String)> {
    let cert_path = listen
        .tls_cert
        .as_deref()
        .ok_or(("listen.tls_cert", "must be set".to_string()))?;
    let key_path = listen
        .tls_key
        .as_deref()
        .ok_or(("listen.tls_key", "must be set".to_string()))?;
    let certs = read_certs(cert_path).map_err(|reason| ("listen.tls_cert", reason))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
        (
            "listen.tls_key",
            format!(
                "cannot read a PEM private key (PKCS#8, PKCS#1 or SEC1) from {}: {error}",
                key_path.display()
            ),
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ("listen.tls", format!("the TLS provider: {error}")))?;
    let mut parts: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
    parts.push(key.secret_der().to_vec());
    let builder = match &listen.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca_path).map_err(|reason| ("listen.tls_client_ca", reason))? {
                parts.push(cert.to_vec());
                roots.add(cert).map_err(|error| {
                    (
                        "listen.tls_client_ca",
                        format!(
                            "{}: not a usable CA certificate: {error}",
                            ca_path.display()
                        ),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .map_err(|error| ("listen.tls_client_ca", error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|error| {
        (
            "listen.tls_key",
            format!(
                "{} does not go with the certificate in {}: {error}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(ServerConfigHandle(Arc::new(config), fingerprint(&parts)))
}

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
        let least = (0..cores.len())
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

/// The identity a verified client certificate gives: its first DNS subject alternative name,
/// else its subject's common name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    if let Some(name) = cert.valid_dns_names().next() {
        return Some(name.to_string());
    }
    common_name(cert.subject())
}

/// The first common name (OID 2.5.4.3) in a DER `Name`'s contents (a sequence of sets of
/// type-and-value sequences).
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (tag, set, rest) = der(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        let mut set = set;
        while !set.is_empty() {
            let (tag, pair, rest) = der(set)?;
            set = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der(pair)?;
            if oid_tag != 0x06 || oid != CN {
                continue;
            }
            let (kind, text, _) = der(value)?;
            // UTF8String, PrintableString, T61String (Latin-1 in practice), IA5String.
            return match kind {
                0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_string),
                0x14 => Some(text.iter().map(|&b| char::from(b)).collect()),
                _ => None,
            };
        }
    }
    None
}

/// One DER element at the start of `bytes`: (tag, contents, what follows). Single-byte tags
/// and lengths up to 4 bytes (what a certificate's names use).
fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// One TLS caller connection.
struct Session {
    tcp: TcpStream,
    tls: ServerConnection,
    peer: Peer,
    state: State,
}

enum State {
    /// The ticket is held here until the connection is handed to a core (`None` once given
    /// back, just before the session is dropped).
    Handshaking {
        ticket: Option<Ticket>,
        deadline: Instant,
    },
    Open(Pump),
}

enum Step {
    Pending,
    /// The handshake has just finished: hand the connection over.
    Handshaken,
    /// Both sides are closed.
    Done,
}

impl Session {
    /// The poll events wanted on the TCP connection and on the pair.
    fn interest(&self) -> (PollFlags, PollFlags) {
        let out = if self.tls.wants_write() {
            PollFlags::OUT
        } else {
            PollFlags::empty()
        };
        match &self.state {
            State::Handshaking { .. } => (PollFlags::IN | out, PollFlags::empty()),
            State::Open(pump) => {
                let mut tcp = out;
                if pump.reads_caller() {
                    tcp |= PollFlags::IN;
                }
                let mut pair = PollFlags::empty();
                if !pump.pair_eof && !pump.to_caller.is_full() {
                    pair |= PollFlags::IN;
                }
                if !pump.to_core.is_empty() {
                    pair |= PollFlags::OUT;
                }
                (tcp, pair)
            }
        }
    }

    fn step(&mut self) -> io::Result<Step> {
        match &mut self.state {
            State::Handshaking { .. } => self.handshake(),
            State::Open(pump) => pump.run(&mut self.tls, &mut self.tcp),
        }
    }

    /// Read and write handshake flights until the socket would block or it is done.
    fn handshake(&mut self) -> io::Result<Step> {
        loop {
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.tcp) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Step::Pending)
                    }
                    Err(error) => return Err(error),
                }
            }
            if !self.tls.is_handshaking() {
                return Ok(Step::Handshaken);
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the caller closed the connection during the handshake",
                    ))
                }
                Ok(_) => {
                    if let Err(error) = self.tls.process_new_packets() {
                        // Tell the caller why (the alert), as far as the socket takes it.
                        let _ = self.tls.write_tls(&mut self.tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Step::Pending)
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// A bounded byte buffer: filled at the end, drained from the start.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(bytes: usize) -> Buf {
        Buf {
            data: vec![0; bytes].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn is_full(&self) -> bool {
        self.end - self.start == self.data.len()
    }

    /// Room to fill (moving what is held to the front when it must).
    fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    fn filled(&mut self, bytes: usize) {
        self.end += bytes;
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, bytes: usize) {
        self.start += bytes;
    }
}

/// An open session's two directions.
struct Pump {
    /// Our end of the socket pair (the core has the other).
    pair: UnixStream,
    /// Caller's plaintext not yet written to the pair.
    to_core: Buf,
    /// Core's bytes not yet taken by rustls.
    to_caller: Buf,
    /// rustls may hold decrypted bytes we have not taken (our buffer was full).
    plaintext_pending: bool,
    /// The caller has closed (close_notify, or EOF).
    caller_closed: bool,
    /// The TCP connection has reached EOF.
    tcp_eof: bool,
    /// The pair's write side has been shut (the core has everything the caller sent).
    pair_shut: bool,
    /// The core has closed its end.
    pair_eof: bool,
    close_sent: bool,
    /// Which buffers were full at the last count (to count each time one fills).
    full: (bool, bool),
}

fn would_block(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    fn new(pair: UnixStream) -> Pump {
        Pump {
            pair,
            to_core: Buf::new(PUMP_BUFFER_BYTES),
            to_caller: Buf::new(PUMP_BUFFER_BYTES),
            // Bytes that came with the handshake's last flight may be waiting.
            plaintext_pending: true,
            caller_closed: false,
            tcp_eof: false,
            pair_shut: false,
            pair_eof: false,
            close_sent: false,
            full: (false, false),
        }
    }

    /// Whether to read the caller's TCP connection now.
    fn reads_caller(&self) -> bool {
        !self.caller_closed && !self.tcp_eof && !self.to_core.is_full() && !self.plaintext_pending
    }

    /// Move bytes both ways until nothing moves; `Done` once both sides are closed.
    fn run(&mut self, tls: &mut ServerConnection, tcp: &mut TcpStream) -> io::Result<Step> {
        loop {
            let mut moved = self.caller_to_core(tls, tcp)?;
            moved |= self.core_to_caller(tls, tcp)?;
            self.count_full();
            if self.close_sent && !tls.wants_write() {
                return Ok(Step::Done);
            }
            if !moved {
                return Ok(Step::Pending);
            }
        }
    }

    fn caller_to_core(
        &mut self,
        tls: &mut ServerConnection,
        tcp: &mut TcpStream,
    ) -> io::Result<bool> {
        let mut moved = false;
        // Decrypted bytes rustls holds, into our buffer.
        while !self.caller_closed && !self.to_core.is_full() {
            match tls.reader().read(self.to_core.space()) {
                Ok(0) => self.caller_closed = true,
                Ok(n) => {
                    self.to_core.filled(n);
                    moved = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext_pending = false;
                    break;
                }
                // EOF without close_notify: the caller has gone all the same (the protocol's
                // framing tells a cut-short frame).
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    self.caller_closed = true;
                }
                Err(error) => return Err(error),
            }
        }
        if self.to_core.is_full() {
            self.plaintext_pending = true;
        }
        // More records from the caller, only when there is room for what they hold.
        if self.reads_caller() {
            match tls.read_tls(tcp) {
                Ok(0) => {
                    self.tcp_eof = true;
                    self.plaintext_pending = true;
                    moved = true;
                }
                Ok(_) => {
                    if let Err(error) = tls.process_new_packets() {
                        let _ = tls.write_tls(tcp);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                    self.plaintext_pending = true;
                    moved = true;
                }
                Err(error) if would_block(&error) => {}
                Err(error) => return Err(error),
            }
        }
        while !self.to_core.is_empty() {
            match self.pair.write(self.to_core.bytes()) {
                Ok(n) => {
                    self.to_core.consume(n);
                    moved = true;
                }
                Err(error) if would_block(&error) => break,
                Err(error) => return Err(error),
            }
        }
        if self.caller_closed && self.to_core.is_empty() && !self.pair_shut {
            // The core sees EOF, as from a plaintext caller that closed.
            let _ = self.pair.shutdown(std::net::Shutdown::Write);
            self.pair_shut = true;
            moved = true;
        }
        Ok(moved)
    }

    fn core_to_caller(
        &mut self,
        tls: &mut ServerConnection,
        tcp: &mut TcpStream,
    ) -> io::Result<bool> {
        let mut moved = false;
        if !self.pair_eof && !self.to_caller.is_full() {
            match self.pair.read(self.to_caller.space()) {
                Ok(0) => {
                    self.pair_eof = true;
                    moved = true;
                }
                Ok(n) => {
                    self.to_caller.filled(n);
                    moved = true;
                }
                Err(error) if would_block(&error) => {}
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {
                    self.pair_eof = true;
                    moved = true;
                }
                Err(error) => return Err(error),
            }
        }
        if !self.to_caller.is_empty() {
            // rustls takes what its outgoing limit (PUMP_BUFFER_BYTES) leaves room for.
            let n = tls.writer().write(self.to_caller.bytes())?;
            if n > 0 {
                self.to_caller.consume(n);
                moved = true;
            }
        }
        if self.pair_eof && self.to_caller.is_empty() && !self.close_sent {
            tls.send_close_notify();
            self.close_sent = true;
            moved = true;
        }
        while tls.wants_write() {
            match tls.write_tls(tcp) {
                Ok(_) => moved = true,
                Err(error) if would_block(&error) => break,
                Err(error) => return Err(error),
            }
        }
        Ok(moved)
    }

    /// Count each time a buffer fills (a direction stops being read for the other side).
    fn count_full(&mut self) {
        let full = (self.to_core.is_full(), self.to_caller.is_full());
        if full.0 && !self.full.0 {
            count(&COUNTS.buffers_full);
        }
        if full.1 && !self.full.1 {
            count(&COUNTS.buffers_full);
        }
        self.full = full;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_elements_and_common_names_are_read_and_bounded() {
        // Proves the small DER reader: a Name with an O and a CN gives the CN; a truncated
        // one gives nothing rather than reading past its end.
        let o = [
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'x',
        ];
        let cn = [
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'a', b'l', b'i',
            b'c', b'e',
        ];
        let name: Vec<u8> = o.iter().chain(cn.iter()).copied().collect();
        assert_eq!(common_name(&name).as_deref(), Some("alice"));
        assert_eq!(common_name(&o), None);
        assert_eq!(common_name(&name[..name.len() - 2]), None);
        assert_eq!(der(&[0x04, 0x82, 0x01]), None);
        assert_eq!(
            der(&[0x04, 0x81, 0x01, 0xff, 0x00]),
            Some((0x04, &[0xff][..], &[0x00][..]))
        );
    }

    #[test]
    fn a_buffer_fills_drains_and_compacts() {
        let mut buf = Buf::new(4);
        buf.space()[..3].copy_from_slice(b"abc");
        buf.filled(3);
        buf.consume(2);
        assert_eq!(buf.bytes(), b"c");
        assert_eq!(buf.space().len(), 1);
        buf.space()[0] = b'd';
        buf.filled(1);
        assert_eq!(buf.space().len(), 2, "compacted");
        assert_eq!(buf.bytes(), b"cd");
        buf.space().copy_from_slice(b"ef");
        buf.filled(2);
        assert!(buf.is_full());
        assert_eq!(buf.bytes(), b"cdef");
    }
}
