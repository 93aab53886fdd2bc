//! The daemon: process setup (signals, listeners, the spawner thread), the per-core loop and
//! the control thread. Files and sockets are made safely by `bind`.
//!
//! [`run`] blocks SIGTERM/SIGINT before any thread starts so that they arrive only through
//! the control thread's signalfd, binds the listeners (or takes those systemd passed: see
//! `systemd`), starts one event-loop thread per
//! configured core (pinned to its CPU, with its own ring, spawner, connections and pool shards;
//! see `docs/scaling.md`; every core runs the same loop), then the control thread (signals, the
//! admin socket, `/metrics`, interval logs: `control`), prints one `ready` line on stdout once
//! every core is set up and every service has its first worker (tests and scripts wait for it
//! instead of sleeping) and tells systemd READY=1 at the same moment, and waits for the cores to finish a graceful stop, then ends the
//! control thread.

pub mod admission;
mod bind;
pub mod buffer;
pub mod control;
pub mod core;
pub mod index;
pub mod io;
pub mod report;
pub mod shared;
#[cfg(test)]
mod sim;
pub mod spawn;
pub mod systemd;
pub mod table;
pub mod tls;
pub mod upgrade;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{bail, Context};

use self::bind::{bind_tcp, bind_unix, check_state_dir, create_private_dir};
use self::core::ListenerKind;
use self::index::{CoreIndex, TypedIndex};
use self::shared::Shared;
use crate::config::{self, Config};

/// The signals the control thread takes through its signalfd: the stop signals (TERM, INT)
/// and the routine ones operators and tools send (HUP: reload, USR1: reopen logs, USR2: binary
/// upgrade, `upgrade`), none
/// of which may take its default action (ending the bridge at once).
pub const HANDLED_SIGNALS: [i32; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Block the handled signals for this thread (and every thread it starts) and return a
/// signalfd that receives them. SIGPIPE is ignored (as the Rust runtime already does, made
/// explicit): a caller or worker that closes its socket must never end the bridge.
fn stop_signals() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local sigset; signalfd returns a new descriptor we own.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HANDLED_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block the handled signals");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Descriptors each worker costs the bridge: its control socket, its slot's memfd, its stdout
/// and stderr pipes, its pidfd when reaping falls back to pidfd polls (and one spare for the
/// spawn in progress).
const FDS_PER_WORKER: u64 = 6;
/// Descriptors kept beyond connections and workers: listeners, rings, eventfds, the signalfd,
/// the log, files the bridge opens (interval logs, /proc reads).
const FDS_RESERVE: u64 = 256;

/// Raise the soft RLIMIT_NOFILE to the hard limit (the default soft limit, often 1024, is far
/// below `connections_max`), and say at startup when even the hard limit cannot hold
/// `connections_max` callers plus every worker the pools may run: then accepts and spawns fail
/// under load with "too many open files".
fn raise_nofile_limit(config: &Config) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum;
    // Workers get the limit the bridge was started with, not the raised one (a worker that
    // uses select(2) breaks on descriptors over 1023).
    spawn::WORKER_NOFILE_SOFT.store(
        limit.current.unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    if limit.current != hard {
        let raised = rustix::process::Rlimit {
            current: hard,
            maximum: hard,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise RLIMIT_NOFILE to its hard limit");
        }
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let workers: u64 = config.services.iter().map(|s| s.max_workers as u64).sum();
    let needed = config.connections_max as u64 + workers * FDS_PER_WORKER + FDS_RESERVE;
    if soft < needed {
        tracing::warn!(
            nofile_limit = soft,
            needed,
            "RLIMIT_NOFILE is {soft} but connections_max ({}) plus {workers} workers need about \
             {needed} descriptors: raise the limit (ulimit -n, systemd LimitNOFILE=) or lower \
             connections_max",
            config.connections_max
        );
    } else {
        tracing::debug!(nofile_limit = soft, needed, "descriptors suffice");
    }
}

/// How often startup looks whether every service has its first worker.
const FIRST_WORKERS_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Wait (at most the longest `startup_timeout_ms` of a service, plus a second) until every
/// service has a worker up, keeps none, or has failed to start one; log the services still
/// without one when the wait ends at its bound.
fn wait_for_first_workers(shared: &Shared, config: &Config) {
    use std::time::{Duration, Instant};
    let bound = config
        .services
        .iter()
        .map(|s| s.startup_timeout_ms)
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_millis(bound) + Duration::from_secs(1);
    loop {
        let waiting: Vec<&str> = match self::control::gather_reports(shared, false) {
            Ok(report) => report::without_first_worker(config, &report),
            Err(_) => config.services.iter().map(|s| s.name.as_str()).collect(),
        };
        if waiting.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                services = ?waiting,
                "reporting ready although these services have no worker up yet (their requests \
                 wait in the backlog)"
            );
            return;
        }
        std::thread::sleep(FIRST_WORKERS_POLL);
    }
}

/// Pin the calling thread to one CPU.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

/// Run the bridge until SIGTERM/SIGINT and a graceful stop (or a binary upgrade's drain), with
/// the listeners systemd passed (socket activation), those an upgrading bridge handed over
/// (`takeover`, see `upgrade`), or its own.
pub fn run(
    config: Config,
    mut systemd: self::systemd::Systemd,
    mut takeover: Option<&mut self::upgrade::Takeover>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Before anything is bound or started: a kernel too old fails here, naming what it lacks.
    self::io::check_kernel().map_err(|reason| anyhow::anyhow!("kernel: {reason}"))?;
    let origin = self::upgrade::Origin::of_this_process();
    let config = Arc::new(config);
    create_private_dir(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    check_state_dir(&config.state_dir)?;
    let admin_socket = config.admin_socket_path();
    let in_runtime_dir = |path: &std::path::Path| path.starts_with(&config.runtime_dir);
    if config.listen.unix.as_deref().is_some_and(in_runtime_dir) || in_runtime_dir(&admin_socket) {
        crate::runtime_dir::ensure(&config.runtime_dir, crate::runtime_dir::mode_for_euid())
            .map_err(anyhow::Error::msg)?;
    }
    let cpus = config
        .cores
        .cpus(&config::allowed_cpus())
        .map_err(|reason| anyhow::anyhow!("cores: {reason}"))?;
    let cores = cpus.len();
    let signal_fd = stop_signals()?;
    crate::confine::harden_bridge().context("PR_SET_DUMPABLE / PR_SET_CHILD_SUBREAPER")?;
    crate::confine::start_orphan_reaper().context("starting the orphan reaper")?;
    crate::cgroup::setup(&config);
    // However run() ends, no descendant of a worker outlives the bridge.
    let _kill_children = crate::confine::KillChildrenOnDrop;
    for warning in config.warnings() {
        tracing::warn!(key = %warning.key, "{}", warning.reason);
    }
    for service in &config.services {
        let exec = service
            .exec_file
            .as_ref()
            .context("the config was not loaded")?;
        let (uid, gid) = service.identity.as_ref().map_or_else(
            || {
                (
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                )
            },
            |i| (i.uid, i.gid),
        );
        tracing::info!(
            service = %service.name,
            exec = %exec.path.display(),
            script = exec.script,
            uid,
            gid,
            clear_env = service.clear_env,
            chroot = %service.chroot.as_deref().unwrap_or(std::path::Path::new("")).display(),
            landlock = service.sandbox.as_ref().is_some_and(|s| s.landlock.is_some()),
            seccomp = service.sandbox.as_ref().is_some_and(|s| s.seccomp.is_some()),
            "service workers run this executable"
        );
    }
    self::core::check_memlock(&config, cores);
    raise_nofile_limit(&config);
    // Sockets systemd passed replace the binds below; a passed Unix socket is never unlinked
    // (only the paths in `unlink_at_stop` are, at shutdown).
    let mut activated = systemd
        .take_listeners(&config)
        .context("socket activation")?;
    // At an upgrade, the old bridge's listeners; the socket files it bound itself are this
    // one's to unlink at its stop (`owned`).
    let mut owned = Vec::new();
    if let Some(takeover) = takeover.as_deref_mut() {
        if systemd.socket_activated() {
            bail!("a bridge started by an upgrade cannot be socket-activated as well");
        }
        let inherited = takeover
            .take_listeners(&config)
            .context("taking over the listeners")?;
        activated = inherited.activated;
        owned = inherited.owned;
    }
    let mut handover = self::upgrade::Handover::default();
    let mut unlink_at_stop = Vec::new();
    // Each core's listeners: the Unix socket and the TCP socket are shared (every core accepts
    // on them); admin and metrics are the control thread's.
    let mut listeners: Vec<Vec<(OwnedFd, ListenerKind)>> = (0..cores).map(|_| Vec::new()).collect();
    let mut ready = String::from("acgi-bridge ready");
    if let Some(path) = &config.listen.unix {
        let mode = config::parse_mode(&config.listen.unix_mode).expect("validated");
        let listener = match activated.unix.take() {
            Some(passed) => {
                if owned.contains(&self::systemd::Role::Unix) {
                    unlink_at_stop.push(path.clone());
                }
                passed
            }
            None => {
                unlink_at_stop.push(path.clone());
                let id = |name: &Option<String>, lookup: fn(&str) -> Result<u32, String>| {
                    name.as_deref()
                        .map(lookup)
                        .transpose()
                        .map_err(|reason| anyhow::anyhow!("listen: {reason}"))
                };
                let owner = id(&config.listen.unix_owner, crate::confine::user_id)?;
                let group = id(&config.listen.unix_group, crate::confine::group_id)?;
                bind_unix(path, mode, owner, group)?
            }
        };
        let unix_owned = unlink_at_stop.contains(path);
        handover.add(self::systemd::Role::Unix, unix_owned, &listener)?;
        for core in listeners.iter_mut().skip(1) {
            core.push((listener.try_clone()?, ListenerKind::Unix));
        }
        listeners[0].insert(0, (listener, ListenerKind::Unix));
        ready.push_str(&format!(" unix={}", path.display()));
        tracing::info!(path = %path.display(), "listening on a Unix socket");
    }
    if let Some(addr) = &config.listen.tcp {
        let wanted: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .with_context(|| format!("resolving TCP {addr}"))?
            .next()
            .with_context(|| format!("TCP {addr} resolves to nothing"))?;
        let listener = match activated.tcp.take() {
            Some(passed) => passed,
            None => bind_tcp(wanted).with_context(|| {
                format!("binding TCP {addr} (is another bridge or process serving it?)")
            })?,
        };
        let local = rustix::net::getsockname(&listener)?;
        let local = std::net::SocketAddr::try_from(local)
            .map_err(|_| anyhow::anyhow!("TCP {addr}: not an IP address"))?;
        handover.add(self::systemd::Role::Tcp, false, &listener)?;
        for core in listeners.iter_mut().skip(1) {
            core.push((listener.try_clone()?, ListenerKind::Tcp));
        }
        listeners[0].push((listener, ListenerKind::Tcp));
        ready.push_str(&format!(" tcp={local}"));
        tracing::info!(addr = %local, cores, "listening on TCP");
    }
    let mut metrics_listener = None;
    if let Some(addr) = &config.metrics_listen {
        let listener = match activated.metrics.take() {
            Some(passed) => std::net::TcpListener::from(passed),
            None => std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        };
        let local = listener.local_addr()?;
        rustix::net::listen(&listener, 128)?;
        let listener = OwnedFd::from(listener);
        handover.add(self::systemd::Role::Metrics, false, &listener)?;
        metrics_listener = Some(listener);
        ready.push_str(&format!(" metrics={local}"));
        tracing::info!(addr = %local, "serving Prometheus metrics at /metrics");
    }
    let admin = config.admin_socket_path();
    let admin_mode = config::parse_mode(&config.admin_socket_mode).expect("validated");
    let admin_listener = match activated.admin.take() {
        Some(passed) => {
            if owned.contains(&self::systemd::Role::Admin) {
                unlink_at_stop.push(admin.clone());
            }
            passed
        }
        None => {
            unlink_at_stop.push(admin.clone());
            bind_unix(&admin, admin_mode, None, None)?
        }
    };
    let admin_owned = unlink_at_stop.contains(&admin);
    handover.add(self::systemd::Role::Admin, admin_owned, &admin_listener)?;
    ready.push_str(&format!(" admin={}", admin.display()));
    ready.push_str(&format!(" cores={cores}"));
    let interval_logger = match &config.histogram_log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating histogram_log_dir {}", dir.display()))?;
            let interval = std::time::Duration::from_millis(config.histogram_log_interval_ms);
            let logger = crate::metrics::IntervalLogger::new(
                dir,
                interval,
                config.histogram_log_rotate_bytes,
            )
            .with_context(|| format!("opening the interval log in {}", dir.display()))?;
            Some(logger)
        }
        None => None,
    };

    let shard_max: Vec<Vec<u32>> = (0..cores)
        .map(|core| {
            config
                .services
                .iter()
                .map(|s| s.policy().shard(core, cores).max_workers)
                .collect()
        })
        .collect();
    let admission = admission::Admission::new(
        admission::Limits::from_config(&config),
        admission::Access::from_config(&config),
    );
    let shared =
        Arc::new(self::shared::Shared::new(&shard_max, admission).context("creating eventfds")?);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut threads = Vec::new();
    for (index, (cpu, listeners)) in cpus.iter().copied().zip(listeners).enumerate() {
        let setup_config = Arc::clone(&config);
        let shared = Arc::clone(&shared);
        let ready_tx = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("acgi-core-{index}"))
            .spawn(move || -> anyhow::Result<self::core::Counters> {
                let setup = || -> anyhow::Result<self::core::Core> {
                    // Workers inherit the affinity of the spawner thread that forks them: start
                    // it before pinning for `any`, after for `core`.
                    let start_spawner =
                        || self::spawn::Spawner::start().context("starting the spawner thread");
                    let pin_workers = setup_config.worker_affinity == config::WorkerAffinity::Core;
                    let mut spawner = None;
                    if !pin_workers {
                        spawner = Some(start_spawner()?);
                    }
                    if cores > 1 {
                        pin_to(cpu)
                            .with_context(|| format!("pinning core {index} to CPU {cpu}"))?;
                    }
                    let spawner = match spawner {
                        Some(spawner) => spawner,
                        None => start_spawner()?,
                    };
                    self::core::Core::new(self::core::CoreSetup {
                        index: CoreIndex::from_usize(index),
                        shared,
                        config: setup_config,
                        listeners,
                        spawner,
                    })
                    .context(
                        "setting up the io_uring event loop (is io_uring enabled on this kernel?)",
                    )
                };
                let mut core = match setup() {
                    Ok(core) => {
                        let _ = ready_tx.send(Ok(()));
                        core
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        anyhow::bail!("core {index} did not start");
                    }
                };
                drop(ready_tx);
                core.run().context("event loop")?;
                Ok(std::mem::take(&mut core.counters))
            })
            .context("starting a core thread")?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..cores {
        // A core that failed to set up ends the process: the others never get going.
        ready_rx
            .recv()
            .context("a core thread died while starting")??;
    }
    // TLS callers are served by the cores once their handshake is done (see `tls`).
    let tls_threads = match (&config.listen.tls, &config.listen.tls_server) {
        (Some(addr), Some(server)) => {
            // Taken over from the bridge this one replaces (or from systemd), else bound.
            let listener = match activated.tls.take() {
                Some(passed) => std::net::TcpListener::from(passed),
                None => self::tls::bind(addr)?,
            };
            handover.add(
                self::systemd::Role::Tls,
                false,
                &OwnedFd::from(listener.try_clone()?),
            )?;
            let local = listener.local_addr()?;
            let threads = config.listen.tls_threads as usize;
            let timeout = std::time::Duration::from_millis(config.listen.tls_handshake_timeout_ms);
            let started = self::tls::start(
                listener,
                server.clone(),
                timeout,
                threads,
                Arc::clone(&shared),
            )?;
            ready.push_str(&format!(" tls={local}"));
            tracing::info!(addr = %local, threads, "listening on TLS");
            Some(started)
        }
        (Some(_), None) => bail!("listen.tls is set but its certificates were not loaded"),
        _ => None,
    };
    let control = self::control::start(self::control::ControlSetup {
        shared: Arc::clone(&shared),
        config: Arc::clone(&config),
        signal_fd,
        admin: admin_listener,
        metrics: metrics_listener,
        interval_logger,
        started,
        unlink_at_stop,
        watchdog_interval: systemd.watchdog_interval(),
        upgrade: self::control::UpgradeSetup { origin, handover },
    })?;
    // Ready means callers can be served: every service has a worker up, or keeps none (an
    // `ondemand` pool with min_workers 0 starts one per request), or cannot start one (it is
    // failing: waiting longer would not help, and /readyz says so).
    wait_for_first_workers(&shared, &config);
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{ready}")?;
        stdout.flush()?;
    }
    // The same moment as the ready line: every listener is open, every core runs its loop, and
    // every service has its first worker (or keeps none, or cannot start one).
    let services = config.services.len();
    let status = format!(
        "serving {} on {} core{}: {}",
        if services == 1 {
            "1 service".to_string()
        } else {
            format!("{services} services")
        },
        cores,
        if cores == 1 { "" } else { "s" },
        ready.trim_start_matches("acgi-bridge ready ")
    );
    if let Some(takeover) = takeover {
        // The old bridge stops accepting once it hears this, and tells systemd our pid.
        takeover.report_ready();
    }
    self::systemd::notify_ready(&status);
    tracing::info!(cores, cpus = ?cpus, "running");
    let mut totals = self::core::Counters::default();
    for thread in threads {
        match thread.join() {
            Ok(Ok(counters)) => totals.add(&counters),
            Ok(Err(error)) => return Err(error),
            Err(_) => bail!("a core thread panicked"),
        }
    }
    if let Some(tls_threads) = tls_threads {
        // The cores have closed their ends: each session sends its close_notify.
        tls_threads.wait(std::time::Duration::from_secs(2));
    }
    totals.add(&control.stop()?);
    tracing::info!(counters = ?totals, "stopped");
    Ok(())
}
