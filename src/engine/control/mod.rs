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
//! Every question to the cores goes through `gather_from_cores` (`gather`): the message to
//! each, then every answer, waited for at most `REPORT_WAIT_MAX` (a core answers on its next
//! loop turn, so normally within microseconds). An admin command (`pause`, `drain`, `set`, ...;
//! see `admin`) is begun by each core and answered at once; what takes time (a drain, a
//! recycle) goes on in the pools and shows in `status`.
//!
//! A plain thread with a `poll(2)` loop over non-blocking sockets: `clients` accepts and answers
//! them, `conn` is one admin or metrics connection each (at most `ADMIN_CONNECTIONS_MAX` admin
//! and `METRICS_CONNECTIONS_MAX` metrics connections at once, each closed at its deadline). It
//! reaches a core only through the core's inbox (`Shared::send`: the message, then the core's
//! wake eventfd) and hears back on the channel the message carries; it waits for a gathering
//! at most `REPORT_WAIT_MAX` and answers with an error rather than hang when a core is stuck.
//!
//! Invariants: `shared.shutdown` is set before any core is told to stop (see `shared`); it
//! never blocks on a client (every socket op is non-blocking, every buffer bounded); it runs
//! until `ControlHandle::stop`, which `engine::run` calls once every core has finished.

#![forbid(unsafe_code)]

pub(crate) mod admin;
mod clients;
mod conn;
mod gather;
mod reload;
mod upgrade;

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use self::conn::{AuxConn, Awaited, Next, Protocol};
use super::index::CoreIndex;
use super::shared::{AdminOutcome, Msg, Shared};
use crate::config::Config;
use crate::metrics::{BridgeCounters, IntervalLogger};

pub(crate) use self::gather::gather_reports;
pub use self::upgrade::UpgradeSetup;

/// How long an admin or metrics connection may take to send its request and get its answer.
const AUX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin and metrics connections open at once at most, each endpoint with its own budget so
/// that idle scrapers can never lock the operator out of `status` (nor the other way round).
const ADMIN_CONNECTIONS_MAX: usize = 16;
const METRICS_CONNECTIONS_MAX: usize = 48;
const AUX_CONNECTIONS_MAX: usize = ADMIN_CONNECTIONS_MAX + METRICS_CONNECTIONS_MAX;

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
        for core in self.shared.cores.indices() {
            self.shared.send(core, Msg::Shutdown { now });
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
        let outcomes: Vec<(CoreIndex, AdminOutcome)> = self
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
