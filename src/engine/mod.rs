//! The daemon: process setup (signals, listeners, the spawner thread) and the per-core loop.
//!
//! [`run`] blocks SIGTERM/SIGINT before any thread starts so that they arrive only through the
//! core's signalfd, binds the listeners, prints one `ready` line on stdout (tests and scripts
//! wait for it instead of sleeping), and runs the core loop on the calling thread until a
//! graceful stop completes.

pub mod buffer;
pub mod core;
pub mod spawn;

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::{bail, Context};

use self::core::ListenerKind;
use crate::config::{self, Config};

/// Block the stop signals for this thread (and every thread it starts) and return a signalfd
/// that receives them.
fn stop_signals() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain libc calls on a local sigset; signalfd returns a new descriptor we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGTERM/SIGINT");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn bind_unix(path: &std::path::Path, mode: u32) -> anyhow::Result<OwnedFd> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running process (another bridge?)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding the Unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    rustix::net::listen(&listener, 4096)?;
    Ok(listener.into())
}

/// Run the bridge until SIGTERM/SIGINT and a graceful stop.
pub fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    let signal_fd = stop_signals()?;
    let mut listeners = Vec::new();
    let mut ready = String::from("acgi-bridge ready");
    if let Some(path) = &config.listen.unix {
        let mode = config::parse_mode(&config.listen.unix_mode).expect("validated");
        listeners.push((bind_unix(path, mode)?, ListenerKind::Unix));
        ready.push_str(&format!(" unix={}", path.display()));
        tracing::info!(path = %path.display(), "listening on a Unix socket");
    }
    if let Some(addr) = &config.listen.tcp {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
        let local = listener.local_addr()?;
        rustix::net::listen(&listener, 4096)?;
        listeners.push((listener.into(), ListenerKind::Tcp));
        ready.push_str(&format!(" tcp={local}"));
        tracing::info!(addr = %local, "listening on TCP");
    }
    if let Some(addr) = &config.metrics_listen {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        let local = listener.local_addr()?;
        rustix::net::listen(&listener, 128)?;
        listeners.push((listener.into(), ListenerKind::Metrics));
        ready.push_str(&format!(" metrics={local}"));
        tracing::info!(addr = %local, "serving Prometheus metrics at /metrics");
    }
    let admin = config.admin_socket_path();
    let admin_mode = config::parse_mode(&config.admin_socket_mode).expect("validated");
    listeners.push((bind_unix(&admin, admin_mode)?, ListenerKind::Admin));
    ready.push_str(&format!(" admin={}", admin.display()));
    let spawner = self::spawn::Spawner::start().context("starting the spawner thread")?;
    let mut core = self::core::Core::new(self::core::CoreSetup {
        config: Arc::clone(&config),
        listeners,
        signal_fd,
        spawner,
    })
    .context("setting up the io_uring event loop (is io_uring enabled on this kernel?)")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{ready}")?;
        stdout.flush()?;
    }
    core.run().context("event loop")?;
    tracing::info!(counters = ?core.counters, "stopped");
    Ok(())
}
