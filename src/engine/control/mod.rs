//! The control thread: everything the bridge does that is not serving callers. It owns the
//! stop signals (a signalfd), the admin socket (`acgi-bridge status`), the `/metrics` endpoint
//! (with `/healthz`, answered alone, and `/readyz`, from a gathering) and the latency-interval
//! clock (with the interval log), so that every core runs the same loop and no JSON or
//! Prometheus encoding, no file write and no slow client ever stalls a caller.
//!
//! ```text
//!   signalfd ──────> set shared.shutdown, then Msg::Shutdown to every core
//!   SIGUSR2, admin `upgrade` ──> upgrade thread ──ready──> MAINPID=, Msg::Drain to every core
//!   admin, /metrics ─┐
//!   interval clock ──┴─> Msg::Report { reply } to every core ──> merge ──> Status / Prometheus
//!                                                                      └─> interval log
//!   admin commands ────> Msg::Admin { command, reply } to every core ──> one line (`admin`)
//! ```
//!
//! Every question to the cores goes through `gather_from_cores`: the message to each, then
//! every answer, waited for at most `REPORT_WAIT_MAX` (a core answers on its next loop turn,
//! so normally within microseconds). An admin command (`pause`, `drain`, `set`, ...; see
//! `admin`) is begun by each core and answered at once; what takes time (a drain, a recycle)
//! goes on in the pools and shows in `status`.
//!
//! A plain thread with a `poll(2)` loop over non-blocking sockets (`conn`: one admin or metrics
//! connection each, at most `ADMIN_CONNECTIONS_MAX` admin and `METRICS_CONNECTIONS_MAX` metrics
//! connections at once, each closed at its deadline). It
//! reaches a core only through the core's inbox (`Shared::send`: the message, then the core's
//! wake eventfd) and hears back on the channel the message carries; it waits for a gathering
//! at most `REPORT_WAIT_MAX` and answers with an error rather than hang when a core is stuck.
//!
//! Invariants: `shared.shutdown` is set before any core is told to stop (see `shared`); it
//! never blocks on a client (every socket op is non-blocking, every buffer bounded); it runs
//! until `ControlHandle::stop`, which `engine::run` calls once every core has finished.

#![forbid(unsafe_code)]

pub(crate) mod admin;
mod conn;
mod reload;
mod upgrade;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::SocketFlags;

use self::conn::{AuxConn, Awaited, Next, Protocol, Wants};
use super::report::{self, CoreReport};
use super::shared::{AdminOutcome, Msg, Shared};
use crate::config::Config;
use crate::metrics::{BridgeCounters, IntervalLogger};

pub use self::upgrade::UpgradeSetup;

/// How long an admin or metrics connection may take to send its request and get its answer.
const AUX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin and metrics connections open at once at most, each endpoint with its own budget so
/// that idle scrapers can never lock the operator out of `status` (nor the other way round).
const ADMIN_CONNECTIONS_MAX: usize = 16;
const METRICS_CONNECTIONS_MAX: usize = 48;
const AUX_CONNECTIONS_MAX: usize = ADMIN_CONNECTIONS_MAX + METRICS_CONNECTIONS_MAX;
/// How long a gathering waits for every core's report before it gives up.
const REPORT_WAIT_MAX: Duration = Duration::from_secs(1);
/// While waiting for reports, how often to look whether the cores have all finished (then
/// nobody will answer).
const REPORT_WAIT_STEP: Duration = Duration::from_millis(50);
/// Connections accepted from one listener per loop turn at most (the rest wait a turn).
const ACCEPTS_PER_TURN_MAX: usize = 64;

/// What the control thread is given at startup.
pub struct ControlSetup {
    pub shared: Arc<Shared>,
    pub config: Arc<Config>,
    /// Receives SIGTERM and SIGINT (blocked in every thread).
    pub signal_fd: OwnedFd,
    /// The admin socket's listener.
    pub admin: OwnedFd,
    /// The metrics endpoint's listener, when `metrics_listen` is set.
    pub metrics: Option<OwnedFd>,
    /// The interval log, when `histogram_log_dir` is set.
    pub interval_logger: Option<IntervalLogger>,
    /// When the bridge started (for status's uptime).
    pub started: Instant,
    /// The socket files the bridge bound itself, removed when it begins stopping (a socket
    /// systemd passed is systemd's, and stays).
    pub unlink_at_stop: Vec<std::path::PathBuf>,
    /// How often to send systemd WATCHDOG=1, when the unit has `WatchdogSec=`: from this
    /// thread's loop, so that a stuck control thread stops petting and systemd restarts it.
    pub watchdog_interval: Option<Duration>,
    /// What a binary upgrade needs (SIGUSR2, admin `upgrade`).
    pub upgrade: UpgradeSetup,
}

/// The running control thread.
pub struct ControlHandle {
    thread: std::thread::JoinHandle<BridgeCounters>,
    stop: OwnedFd,
}

impl ControlHandle {
    /// End the thread (once the cores have finished) and return what it counted.
    pub fn stop(self) -> anyhow::Result<BridgeCounters> {
        rustix::io::write(&self.stop, &1u64.to_ne_bytes())?;
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the control thread panicked"))
    }
}

/// Why a gathering of the cores' reports failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatherError {
    #[error("{answered} of {cores} cores reported within {waited:?} (the bridge is stopping or a core is stuck)")]
    Unanswered {
        answered: usize,
        cores: usize,
        waited: Duration,
    },
}

/// Start the control thread.
pub fn start(setup: ControlSetup) -> anyhow::Result<ControlHandle> {
    use anyhow::Context;
    let stop = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .context("creating the control thread's eventfd")?;
    rustix::io::ioctl_fionbio(&setup.admin, true).context("admin socket: O_NONBLOCK")?;
    if let Some(metrics) = &setup.metrics {
        rustix::io::ioctl_fionbio(metrics, true).context("metrics socket: O_NONBLOCK")?;
    }
    let interval = Duration::from_millis(setup.config.histogram_log_interval_ms);
    let slots = reload::Slots::new(&setup.config);
    let control = Control {
        stop: stop.try_clone()?,
        signal_fd: setup.signal_fd,
        admin: Some(setup.admin),
        metrics: setup.metrics,
        conns: Vec::with_capacity(AUX_CONNECTIONS_MAX),
        interval,
        interval_end: Instant::now() + interval,
        interval_start_wall: SystemTime::now(),
        interval_logger: setup.interval_logger,
        stopping: false,
        counters: BridgeCounters::default(),
        shared: setup.shared,
        config: setup.config,
        started: setup.started,
        unlink_at_stop: setup.unlink_at_stop,
        watchdog: setup.watchdog_interval.map(|every| (every, Instant::now())),
        slots,
        reload: None,
        upgrade: self::upgrade::Upgrade::new(setup.upgrade)?,
    };
    let thread = std::thread::Builder::new()
        .name("acgi-control".into())
        .spawn(move || control.run())
        .context("starting the control thread")?;
    Ok(ControlHandle { thread, stop })
}

struct Control {
    shared: Arc<Shared>,
    config: Arc<Config>,
    started: Instant,
    /// Readable once `ControlHandle::stop` was called.
    stop: OwnedFd,
    signal_fd: OwnedFd,
    /// The listeners, until the bridge begins stopping.
    admin: Option<OwnedFd>,
    metrics: Option<OwnedFd>,
    conns: Vec<AuxConn>,
    interval: Duration,
    /// When the current latency interval ends, and when (wall clock) it started.
    interval_end: Instant,
    interval_start_wall: SystemTime,
    interval_logger: Option<IntervalLogger>,
    /// A stop signal has come (the next one means "now").
    stopping: bool,
    /// What this thread counts (connections refused over the budget), added to every report.
    counters: BridgeCounters,
    unlink_at_stop: Vec<std::path::PathBuf>,
    /// The watchdog period and when to pet it next.
    watchdog: Option<(Duration, Instant)>,
    /// The running config's service slots, and the reload under way (see `reload`).
    slots: reload::Slots,
    reload: Option<reload::Running>,
    /// The binary upgrade's state (`upgrade`).
    upgrade: self::upgrade::Upgrade,
}

/// Which descriptor a poll entry watches.
#[derive(Clone, Copy)]
enum Polled {
    Stop,
    Signal,
    Listener(Protocol),
    Conn(usize),
    /// The upgrade thread has a result.
    Upgrade,
}

impl Control {
    fn run(mut self) -> BridgeCounters {
        let mut polled: Vec<Polled> = Vec::with_capacity(4 + AUX_CONNECTIONS_MAX);
        let mut ready: Vec<(Polled, PollFlags)> = Vec::with_capacity(4 + AUX_CONNECTIONS_MAX);
        loop {
            let now = Instant::now();
            if now >= self.interval_end {
                self.end_interval(now);
            }
            self.expire_conns(now);
            if let Some((every, next)) = &mut self.watchdog {
                if now >= *next {
                    super::systemd::notify_watchdog();
                    *next = now + *every;
                }
            }
            if let Some(outcome) = self.poll_reload(now) {
                self.answer_awaiting(Awaited::Reload, &reload::outcome_line(&outcome));
            }
            let reload_poll = self.reload.as_ref().map(|_| now + reload::RELOAD_POLL);
            let deadline = self
                .conns
                .iter()
                .map(|conn| conn.deadline)
                .chain(self.watchdog.map(|(_, next)| next))
                .chain(reload_poll)
                .fold(self.interval_end, Instant::min);
            let timeout = deadline.saturating_duration_since(Instant::now());
            let timeout = rustix::event::Timespec::try_from(timeout).expect("a short timeout");
            polled.clear();
            ready.clear();
            {
                let mut watched: Vec<(Polled, &OwnedFd, PollFlags)> =
                    Vec::with_capacity(4 + self.conns.len());
                watched.push((Polled::Stop, &self.stop, PollFlags::IN));
                watched.push((Polled::Signal, &self.signal_fd, PollFlags::IN));
                watched.push((Polled::Upgrade, self.upgrade.wake(), PollFlags::IN));
                if let Some(admin) = &self.admin {
                    let what = Polled::Listener(Protocol::Admin);
                    watched.push((what, admin, PollFlags::IN));
                }
                if let Some(metrics) = &self.metrics {
                    let what = Polled::Listener(Protocol::Metrics);
                    watched.push((what, metrics, PollFlags::IN));
                }
                for (index, conn) in self.conns.iter().enumerate() {
                    let flags = if conn.awaiting().is_some() {
                        // Only its hang-up (reported whatever is asked for), until the
                        // command's outcome is in.
                        PollFlags::empty()
                    } else if conn.writing() {
                        PollFlags::OUT
                    } else {
                        PollFlags::IN
                    };
                    watched.push((Polled::Conn(index), conn.fd(), flags));
                }
                polled.extend(watched.iter().map(|(what, _, _)| *what));
                let mut fds: Vec<PollFd<'_>> = watched
                    .iter()
                    .map(|(_, fd, flags)| PollFd::new(*fd, *flags))
                    .collect();
                match rustix::event::poll(&mut fds, Some(&timeout)) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(error) => panic!("poll on the control thread's descriptors: {error}"),
                }
                ready.extend(
                    polled
                        .iter()
                        .zip(&fds)
                        .filter(|(_, fd)| !fd.revents().is_empty())
                        .map(|(what, fd)| (*what, fd.revents())),
                );
            }
            let mut closed = Vec::new();
            for &(what, flags) in &ready {
                match what {
                    Polled::Stop => return self.counters,
                    Polled::Signal => self.on_signal(),
                    Polled::Listener(protocol) => self.on_acceptable(protocol),
                    Polled::Upgrade => closed.extend(self.on_upgrade_result()),
                    Polled::Conn(index) => {
                        if self.on_conn_ready(index, flags) == Next::Close {
                            closed.push(index);
                        }
                    }
                }
            }
            // Highest index first, so that each swap_remove moves an entry not yet removed.
            closed.sort_unstable_by(|a, b| b.cmp(a));
            closed.dedup();
            for index in closed {
                self.conns.swap_remove(index);
            }
        }
    }

    /// Read every pending signal (`HANDLED_SIGNALS`).
    fn on_signal(&mut self) {
        let mut info = [0u8; 128];
        loop {
            match rustix::io::read(&self.signal_fd, &mut info) {
                Ok(n) if n >= 4 => {
                    let signal = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
                    match signal as i32 {
                        libc::SIGTERM | libc::SIGINT => self.on_stop_signal(signal),
                        libc::SIGHUP => {
                            tracing::info!(signal, "SIGHUP: reloading the configuration");
                            // (Its outcome is logged; nobody waits for it.)
                            let _ = self.start_reload();
                        }
                        libc::SIGUSR2 => {
                            self.begin_upgrade(None);
                        }
                        libc::SIGUSR1 => on_reopen_signal(signal),
                        _ => tracing::info!(signal, "signal ignored"),
                    }
                }
                Ok(_) => return,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return,
                Err(error) => {
                    tracing::error!(%error, "reading the signalfd failed");
                    return;
                }
            }
        }
    }

    /// SIGTERM or SIGINT: stop gracefully; a second one: stop now.
    fn on_stop_signal(&mut self, signal: u32) {
        let now = self.stopping;
        if now {
            tracing::warn!(signal, "second signal: stopping now");
        } else {
            tracing::info!(signal, "stopping: finishing requests in flight");
            self.stopping = true;
            // Before telling any core: see `shared` on not losing a forwarded request.
            self.shared.shutdown.store(true, Ordering::SeqCst);
            super::systemd::notify_stopping();
            for path in &self.unlink_at_stop {
                let _ = std::fs::remove_file(path);
            }
            // No new admin connections (those open are still answered). The metrics listener
            // stays open until the bridge exits, so that /readyz says 503 "shutting down" and
            // /healthz 200 while it drains (a closed port would look like a dead bridge).
            self.admin = None;
        }
        for core in 0..self.shared.cores.len() {
            self.shared.send(core, Msg::Shutdown { now });
        }
    }

    /// A listener has connections waiting: take them (refusing those over the budget).
    fn on_acceptable(&mut self, protocol: Protocol) {
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let listener = match protocol {
                Protocol::Admin => self.admin.as_ref(),
                Protocol::Metrics => self.metrics.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            match rustix::net::accept_with(listener.as_fd(), flags) {
                Ok(fd) => {
                    let budget = match protocol {
                        Protocol::Admin => ADMIN_CONNECTIONS_MAX,
                        Protocol::Metrics => METRICS_CONNECTIONS_MAX,
                    };
                    let open = self
                        .conns
                        .iter()
                        .filter(|c| c.protocol() == protocol)
                        .count();
                    if open >= budget {
                        self.counters.connections_refused += 1;
                        tracing::debug!(
                            connections = self.conns.len(),
                            "refusing an admin or metrics connection"
                        );
                        continue;
                    }
                    if protocol == Protocol::Metrics {
                        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
                    }
                    if protocol == Protocol::Admin && !admin_peer_allowed(&fd) {
                        // Only the bridge's own user and root may run admin commands: not a
                        // worker running as another user, whatever the socket's mode says.
                        self.counters.connections_refused += 1;
                        tracing::warn!("refusing an admin connection from another user");
                        continue;
                    }
                    let deadline = Instant::now() + AUX_CONNECTION_TIMEOUT;
                    self.conns.push(AuxConn::new(fd, protocol, deadline));
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return,
                Err(error) => {
                    // Out of descriptors, say: the connection waits in the backlog.
                    tracing::warn!(%error, "accepting an admin or metrics connection failed");
                    return;
                }
            }
        }
    }

    /// A connection's socket is ready: read its request (gathering and answering once it is
    /// whole) or write its answer.
    fn on_conn_ready(&mut self, index: usize, flags: PollFlags) -> Next {
        let conn = &mut self.conns[index];
        if conn.awaiting().is_some() {
            // (A reload or upgrade goes on when its asker hangs up; only the answer is lost.)
            return if flags.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                Next::Close
            } else {
                Next::Wait
            };
        }
        if conn.writing() {
            if flags.intersects(PollFlags::ERR | PollFlags::NVAL) {
                return Next::Close;
            }
            return conn.on_writable();
        }
        match conn.on_readable() {
            Next::Gather(Wants::Admin(line)) => {
                let result = self.run_admin(&line);
                self.conns[index].answer_command(result)
            }
            Next::Gather(wants) => self.answer(index, wants),
            Next::Reload => match self.start_reload() {
                Some(outcome) => self.conns[index].answer_line(reload::outcome_line(&outcome)),
                None => {
                    // Past the reload's own bound, so that its outcome always reaches us.
                    let until = self
                        .reload
                        .as_ref()
                        .map_or_else(Instant::now, |r| r.deadline);
                    let deadline = until + AUX_CONNECTION_TIMEOUT;
                    self.conns[index].await_outcome(Awaited::Reload, deadline);
                    Next::Wait
                }
            },
            Next::Upgrade => self.begin_upgrade(Some(index)),
            next => next,
        }
    }

    /// Gather every core's report and answer connection `index` from it.
    fn answer(&mut self, index: usize, wants: Wants) -> Next {
        let merged = self.gather(false).map_err(|error| error.to_string());
        let conn = &mut self.conns[index];
        match wants {
            Wants::Status => {
                let uptime = self.started.elapsed();
                let status = merged.map(|merged| report::status(&self.config, &merged, uptime));
                conn.answer_status(status.as_ref().map_err(Clone::clone))
            }
            Wants::Metrics { with_body, format } => {
                let stopping = self.stopping;
                let snapshot =
                    merged.map(|merged| report::metrics_snapshot(&self.config, &merged, stopping));
                conn.answer_metrics(snapshot, with_body, format)
            }
            Wants::Admin(_) => unreachable!("answered by run_admin"),
            Wants::Ready { with_body } => {
                // Every condition that fails, each on its line (`docs/operations.md`).
                let mut not_ready = Vec::new();
                if self.stopping {
                    not_ready.push("shutting down".to_string());
                }
                match merged {
                    Ok(merged) => not_ready.extend(report::not_ready(&self.config, &merged)),
                    Err(error) => not_ready.push(format!("cores: {error}")),
                }
                conn.answer_ready(&not_ready, with_body)
            }
        }
    }

    /// A command ended: answer every admin connection waiting for it with `line`.
    fn answer_awaiting(&mut self, command: Awaited, line: &str) {
        let mut closed = Vec::new();
        for (index, conn) in self.conns.iter_mut().enumerate() {
            if conn.awaiting() == Some(command) && conn.answer_line(line.to_string()) == Next::Close
            {
                closed.push(index);
            }
        }
        for index in closed.into_iter().rev() {
            self.conns.swap_remove(index);
        }
    }

    /// Close connections past their deadline (a client that sends half a request, or reads
    /// nothing, must not hold one of the few places for ever).
    fn expire_conns(&mut self, now: Instant) {
        let before = self.conns.len();
        // (One awaiting a command's outcome has a deadline past that command's own bound.)
        self.conns.retain(|conn| conn.deadline > now);
        if self.conns.len() < before {
            tracing::debug!(
                closed = before - self.conns.len(),
                "closing admin or metrics connections that timed out"
            );
        }
    }

    /// The latency interval ended: every core starts a new one, and the merged last interval
    /// goes to the log.
    fn end_interval(&mut self, now: Instant) {
        let wall_now = SystemTime::now();
        let start = std::mem::replace(&mut self.interval_start_wall, wall_now);
        self.interval_end = now + self.interval;
        match self.gather(true) {
            Ok(merged) => {
                if let Some(logger) = &mut self.interval_logger {
                    let histograms = merged.last_intervals(&self.config);
                    if let Err(error) = logger.append(wall_now, start, &histograms) {
                        tracing::warn!(%error, "cannot append to the histogram log");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "a latency interval ended without every core"),
        }
    }

    /// An admin command other than `status`: checked here, then carried out by every core
    /// (each on its shard), and summed up in one line.
    fn run_admin(&mut self, line: &str) -> Result<String, String> {
        let request = admin::parse(line, &self.config)?;
        if self.stopping {
            return Err("the bridge is shutting down".into());
        }
        let config = match &request {
            admin::AdminRequest::Set { service, limits } => {
                Arc::new(admin::with_limits(&self.config, *service, *limits)?)
            }
            _ => Arc::clone(&self.config),
        };
        let command = admin::to_command(&request, &config);
        tracing::info!(command = line, "admin command");
        let outcomes: Vec<(usize, AdminOutcome)> = self
            .gather_from_cores(|reply| Msg::Admin {
                command: command.clone(),
                reply,
            })
            .map_err(|error| error.to_string())?;
        // The cores have the new limits: status and /metrics read them from here too.
        self.config = config;
        let result = admin::summary(&request, &self.config, &outcomes);
        match &result {
            Ok(done) => tracing::info!(command = line, "{done}"),
            Err(reason) => tracing::warn!(command = line, "admin command refused: {reason}"),
        }
        result
    }

    /// Ask every core (see [`gather_from_cores`]).
    fn gather_from_cores<T>(
        &self,
        make: impl Fn(mpsc::Sender<T>) -> Msg,
    ) -> Result<Vec<T>, GatherError> {
        gather_from_cores(&self.shared, make)
    }

    /// Ask every core for its report (`end_interval`: and to start a new latency interval),
    /// wait for them all (bounded), and merge them, with this thread's counts.
    fn gather(&mut self, end_interval: bool) -> Result<CoreReport, GatherError> {
        let mut merged = *gather_reports(&self.shared, end_interval)?;
        merged.counters.add(&self.counters);
        // Lines the log writer dropped are counted by the process, not by a core.
        merged.counters.log_lines_dropped = crate::logging::lines_dropped();
        merged.counters.access_log_lines_dropped = crate::access_log::lines_dropped();
        // So do the TLS threads'.
        crate::engine::tls::add_counters(&mut merged.counters);
        Ok(merged)
    }
}

/// Send every core the message `make` builds around a reply channel, and wait (at most
/// `REPORT_WAIT_MAX`, normally microseconds: a core answers from its next loop turn) for every
/// core's answer. The one way anything outside the cores asks them something: the control
/// thread, and startup waiting for the first workers (`engine::run`).
fn gather_from_cores<T>(
    shared: &Shared,
    make: impl Fn(mpsc::Sender<T>) -> Msg,
) -> Result<Vec<T>, GatherError> {
    let cores = shared.cores.len();
    let started = Instant::now();
    let unanswered = |answered| GatherError::Unanswered {
        answered,
        cores,
        waited: started.elapsed(),
    };
    if shared.all_cores_finished() {
        return Err(unanswered(0));
    }
    let (reply, answers) = mpsc::channel();
    for core in 0..cores {
        shared.send(core, make(reply.clone()));
    }
    drop(reply);
    let deadline = started + REPORT_WAIT_MAX;
    let mut gathered = Vec::with_capacity(cores);
    while gathered.len() < cores {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(REPORT_WAIT_STEP);
        match answers.recv_timeout(wait) {
            Ok(answer) => gathered.push(answer),
            Err(mpsc::RecvTimeoutError::Timeout)
                if Instant::now() < deadline && !shared.all_cores_finished() => {}
            Err(_) => return Err(unanswered(gathered.len())),
        }
    }
    Ok(gathered)
}

/// Every core's report (`end_interval`: each starts a new latency interval), merged.
pub(crate) fn gather_reports(
    shared: &Shared,
    end_interval: bool,
) -> Result<Box<CoreReport>, GatherError> {
    let reports = gather_from_cores(shared, |reply| Msg::Report {
        end_interval,
        reply,
    })?;
    let mut reports = reports.into_iter();
    let mut merged = reports.next().expect("at least one core");
    for report in reports {
        merged.add(&report);
    }
    Ok(merged)
}

/// Whether the peer of an admin connection is root or the bridge's own effective user (by
/// `SO_PEERCRED`, which the peer cannot forge).
fn admin_peer_allowed(fd: &std::os::fd::OwnedFd) -> bool {
    let bridge = rustix::process::geteuid();
    rustix::net::sockopt::socket_peercred(fd)
        .is_ok_and(|cred| cred.uid.is_root() || cred.uid == bridge)
}

/// SIGUSR1 (logrotate's `postrotate`): reopen the access log at its path. The bridge's own log
/// is stderr, which whoever holds it reopens.
fn on_reopen_signal(signal: u32) {
    match crate::access_log::reopen() {
        Some(path) => tracing::info!(
            signal,
            path = %path.display(),
            "SIGUSR1: reopening the access log (the bridge's own log is stderr: nothing to reopen)"
        ),
        None => tracing::info!(
            signal,
            "SIGUSR1: no access_log configured, and the log goes to stderr, which is reopened \
             by whoever holds it; nothing to reopen"
        ),
    }
}
