//! Binary upgrade: a new bridge process takes over the listening sockets of the running one,
//! which then answers what it accepted and exits, so that no caller sees a failure. (The
//! operator's side is docs/operations.md, "Upgrading the binary"; the caller's is the drain
//! notice of docs/protocol.md §2.6.)
//!
//! ```text
//!   old bridge: control thread, then an upgrade thread        new bridge: main thread
//!   SIGUSR2 or admin `upgrade`
//!   socketpair(SEQPACKET); greeting + SCM_RIGHTS listeners ─┐
//!   clone(CLONE_PARENT) + execve(the path it started from) ─┴─> serve ... --takeover-fd N
//!                                                              loads its config (bad: "error ...",
//!                                                              exit 78: the old keeps serving)
//!                                                              takes the listeners that match
//!                                                              it, binds the others, starts its
//!                                                              cores and its control thread
//!   <───────────────────────────────────────────── "ready PID"
//!   MAINPID=PID to systemd, answers `upgrade`
//!   "ack" ──────────────────────────────────────────────────> READY=1 and STATUS= to systemd
//!   cancels its accepts, closes its admin and metrics listeners (never unlinks their files),
//!   answers what it accepted, sends each connection the drain notice, closes it, exits
//! ```
//!
//! This module owns both ends of that exchange: [`Origin`] and [`Handover`] (recorded at
//! startup: the binary's path and arguments, and a duplicate of every listener), [`upgrade`]
//! (the old side, run off the control thread and off the cores: it blocks for up to
//! [`READY_TIMEOUT`]) and [`Takeover`] (the new side). It never decides when to drain: the
//! control thread does that once [`upgrade`] returns [`Ready`].
//!
//! Why `CLONE_PARENT`: the bridge is a child subreaper, kills every child it still has when it
//! exits (`confine::KillChildrenOnDrop`) and its orphan reaper kills every child that is not a
//! registered worker. A forked (or double-forked: the orphan comes back to the subreaper) new
//! bridge would be killed by the old one. Made with `CLONE_PARENT`, the new bridge is the old
//! one's sibling (its parent is the old one's parent: systemd, or whoever started it), so it is
//! never in the old one's list of children, and the old one cannot kill it by mistake. (A
//! bridge that is PID 1 of its namespace cannot do that; it says so.) The clone is
//! `CLONE_VM | CLONE_VFORK` like the spawner's: no page tables copied, and the child makes only
//! system calls on values built before it, until `execve` (`spawn::spawn_sibling`).
//!
//! The executable is the path the bridge was started from (argv\[0\] made absolute at startup,
//! or `/proc/self/exe` read at startup when argv\[0\] has no `/`), looked up again at upgrade
//! time: after a package upgrade, that path holds the new binary, while `/proc/self/exe` names
//! the deleted inode of the old one.

#![forbid(unsafe_code)]

use std::ffi::{CString, OsString};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use super::io::inherited::{self, InheritError};
use super::spawn::{spawn_sibling, SiblingError, SiblingExec};
use super::systemd::{Activated, Role};
use crate::config::Config;

/// How long the old bridge waits for the new one to report ready (config loaded, listeners
/// taken or bound, every core and spawner started) before it kills it and keeps serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new bridge waits for the old one's acknowledgement (sent once systemd has been
/// told MAINPID=) before it reports READY=1 anyway.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The hidden `serve` option that makes a bridge the new side of an upgrade.
pub const TAKEOVER_FD_FLAG: &str = "--takeover-fd";
/// The first line of the old bridge's message: the exchange's version.
const GREETING: &str = "acgi-takeover 1";
/// Longest message either side sends (the greeting and one line per listener; a refusal's
/// reason is cut to fit).
const MESSAGE_BYTES_MAX: usize = 4096;
/// Listeners handed over at most: caller Unix, caller TCP, admin, metrics.
const LISTENERS_MAX: usize = 4;

/// Why an upgrade failed. In every case the old bridge keeps serving as before.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    Busy,
    #[error("the bridge is stopping or has already handed over")]
    Stopping,
    #[error(
        "the bridge is PID 1 of its PID namespace, so a new bridge cannot be started beside \
         it: run it under an init (docker run --init, tini) to upgrade in place"
    )]
    Init,
    #[error("preparing the upgrade: {0}")]
    Setup(std::io::Error),
    #[error("cannot execute {path}: {error} (is the new binary installed there?)")]
    Exec {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the new bridge (pid {pid}) refused to start: {reason}")]
    Refused { pid: i32, reason: String },
    #[error("the new bridge (pid {pid}) exited before it was ready (its log says why)")]
    Vanished { pid: i32 },
    #[error("the new bridge (pid {pid}) was not ready within {waited:?}: killed it")]
    Timeout { pid: i32, waited: Duration },
}

/// The binary and the `serve` arguments this bridge was started with.
#[derive(Clone, Debug)]
pub struct Origin {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Origin {
    /// Read at startup (see the module doc for why not `/proc/self/exe` at upgrade time).
    pub fn of_this_process() -> Origin {
        let mut argv = std::env::args_os();
        let argv0 = argv.next().map(PathBuf::from);
        let from_proc = || {
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
            let text = exe.as_os_str().as_bytes();
            let text = text.strip_suffix(b" (deleted)").unwrap_or(text);
            PathBuf::from(std::ffi::OsStr::from_bytes(text))
        };
        let exe = match argv0 {
            Some(path) if path.as_os_str().as_bytes().contains(&b'/') => {
                std::path::absolute(&path).unwrap_or_else(|_| from_proc())
            }
            _ => from_proc(),
        };
        Origin {
            exe,
            args: without_takeover(argv.collect()),
        }
    }
}

/// The arguments without a `--takeover-fd N` of their own (a bridge started by an upgrade).
fn without_takeover(args: Vec<OsString>) -> Vec<OsString> {
    let mut kept = Vec::with_capacity(args.len());
    let mut skip_next = false;
    for arg in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let bytes = arg.as_bytes();
        if bytes == TAKEOVER_FD_FLAG.as_bytes() {
            skip_next = true;
        } else if !bytes.starts_with(format!("{TAKEOVER_FD_FLAG}=").as_bytes()) {
            kept.push(arg);
        }
    }
    kept
}

/// A duplicate of each of the bridge's listeners, kept for its whole life so that it can hand
/// them over at any time. `owned`: the bridge bound that Unix socket file itself (it unlinks
/// it at a plain stop), as opposed to systemd's.
#[derive(Default)]
pub struct Handover {
    listeners: Vec<(Role, bool, OwnedFd)>,
}

impl Handover {
    pub fn add(&mut self, role: Role, owned: bool, fd: &OwnedFd) -> std::io::Result<()> {
        assert!(
            self.listeners.len() < LISTENERS_MAX,
            "one listener per role"
        );
        self.listeners.push((role, owned, fd.try_clone()?));
        Ok(())
    }

    /// Another duplicate, for the upgrade thread.
    pub fn try_clone(&self) -> std::io::Result<Handover> {
        let mut copy = Handover::default();
        for (role, owned, fd) in &self.listeners {
            copy.add(*role, *owned, fd)?;
        }
        Ok(copy)
    }

    /// The greeting and one line per listener (`unix owned`, `tcp`), in the order of the fds.
    fn message(&self) -> String {
        let mut text = format!("{GREETING}\n");
        for (role, owned, _) in &self.listeners {
            text.push_str(role.fd_name());
            text.push_str(if *owned { " owned\n" } else { "\n" });
        }
        text
    }
}

/// The new bridge has reported ready; [`Ready::acknowledge`] once systemd knows its pid.
pub struct Ready {
    pub pid: i32,
    channel: OwnedFd,
}

impl Ready {
    /// Tell the new bridge it is the main process now (it then sends READY=1 itself).
    pub fn acknowledge(self) {
        if let Err(error) = rustix::net::send(&self.channel, b"ack", SendFlags::NOSIGNAL) {
            tracing::warn!(%error, pid = self.pid, "cannot acknowledge the new bridge");
        }
    }
}

/// The old side: start the binary at `origin` with the listeners of `handover`, and wait (at
/// most [`READY_TIMEOUT`]) until it is ready or has failed. `watchdog`: systemd's watchdog
/// period, passed on as `WATCHDOG_USEC` (the bridge removed it from its own environment).
pub fn upgrade(
    origin: &Origin,
    handover: &Handover,
    watchdog: Option<Duration>,
) -> Result<Ready, UpgradeError> {
    if rustix::process::getpid().is_init() {
        return Err(UpgradeError::Init);
    }
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|error| UpgradeError::Setup(error.into()))?;
    // Queued before the child exists: it finds the message waiting.
    send_listeners(&ours, handover).map_err(UpgradeError::Setup)?;
    let (pid, pidfd) = launch(origin, &theirs, watchdog)?;
    drop(theirs);
    tracing::info!(pid, exe = %origin.exe.display(), "upgrade: started the new bridge");
    wait_ready(ours, pid, &pidfd)
}

fn send_listeners(channel: &OwnedFd, handover: &Handover) -> std::io::Result<()> {
    let message = handover.message();
    let fds: Vec<_> = handover
        .listeners
        .iter()
        .map(|(_, _, fd)| fd.as_fd())
        .collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(LISTENERS_MAX))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "the listeners do not fit one message",
        ));
    }
    let iov = [IoSlice::new(message.as_bytes())];
    rustix::net::sendmsg(channel, &iov, &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Start the new bridge beside this one (module doc): its pid and a pidfd for it.
fn launch(
    origin: &Origin,
    channel: &OwnedFd,
    watchdog: Option<Duration>,
) -> Result<(i32, OwnedFd), UpgradeError> {
    let bad = |what: &str| UpgradeError::Setup(std::io::Error::other(format!("a NUL in {what}")));
    let path = CString::new(origin.exe.as_os_str().as_bytes()).map_err(|_| bad("the path"))?;
    let mut strings = vec![path.clone()];
    for arg in &origin.args {
        strings.push(CString::new(arg.as_bytes()).map_err(|_| bad("an argument"))?);
    }
    strings.push(CString::new(TAKEOVER_FD_FLAG).expect("no NUL"));
    strings.push(CString::new(channel.as_raw_fd().to_string()).expect("no NUL"));
    let mut environment = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"WATCHDOG_") {
            continue;
        }
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        // (The environment cannot hold a NUL; skip rather than fail.)
        environment.extend(CString::new(entry).ok());
    }
    if let Some(period) = watchdog {
        let entry = format!("WATCHDOG_USEC={}", period.as_micros());
        environment.push(CString::new(entry).expect("no NUL"));
    }
    // The new bridge starts from the soft limit this one was started with (it raises its own).
    let soft = super::spawn::WORKER_NOFILE_SOFT.load(Ordering::Relaxed);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(libc::RLIM_INFINITY);
    let exec = SiblingExec {
        path,
        argv: strings,
        envp: environment,
        inherit: channel.as_raw_fd(),
        nofile: libc::rlimit {
            rlim_cur: if soft == 0 { hard } else { soft.min(hard) },
            rlim_max: hard,
        },
    };
    spawn_sibling(&exec).map_err(|error| match error {
        SiblingError::Setup(error) => UpgradeError::Setup(error),
        SiblingError::Exec(error) => UpgradeError::Exec {
            path: origin.exe.clone(),
            error,
        },
    })
}

/// Wait for the new bridge's `ready PID` or `error REASON` (or its end), at most
/// [`READY_TIMEOUT`]; on timeout, kill it.
fn wait_ready(channel: OwnedFd, pid: i32, pidfd: &OwnedFd) -> Result<Ready, UpgradeError> {
    let started = Instant::now();
    let deadline = started + READY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if let Err(error) =
                rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL)
            {
                tracing::warn!(%error, pid, "cannot kill the new bridge that did not get ready");
            }
            return Err(UpgradeError::Timeout {
                pid,
                waited: started.elapsed(),
            });
        }
        let timeout = rustix::event::Timespec::try_from(left).expect("a bounded timeout");
        let mut fds = [PollFd::new(&channel, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => {}
            Err(error) => return Err(UpgradeError::Setup(error.into())),
        }
        let mut message = [0u8; MESSAGE_BYTES_MAX];
        let received = match rustix::net::recv(&channel, &mut message, RecvFlags::DONTWAIT) {
            Ok((n, _)) => n,
            // (A reset is reported once, before what was sent ahead of it: read on.)
            Err(Errno::AGAIN | Errno::INTR | Errno::CONNRESET) => continue,
            Err(_) => 0,
        };
        let text = String::from_utf8_lossy(&message[..received]);
        if received == 0 {
            return Err(UpgradeError::Vanished { pid });
        }
        if let Some(reason) = text.strip_prefix("error ") {
            return Err(UpgradeError::Refused {
                pid,
                reason: reason.trim_end().to_string(),
            });
        }
        match text.strip_prefix("ready ").map(|p| p.trim().parse::<i32>()) {
            Some(Ok(reported)) if reported == pid => return Ok(Ready { pid, channel }),
            _ => {
                return Err(UpgradeError::Refused {
                    pid,
                    reason: format!("an unexpected message {text:?}"),
                })
            }
        }
    }
}

/// The new side of an upgrade: the channel to the old bridge.
pub struct Takeover {
    channel: OwnedFd,
    /// The old bridge's message and listeners, read at once (so that a bridge that fails
    /// early does not close the channel with them unread, which resets it under its report).
    received: Option<(String, Vec<OwnedFd>)>,
    /// `ready` or `error` was sent (nothing more is).
    reported: bool,
}

/// The listeners taken over, and which of the Unix ones this bridge now unlinks at its stop.
pub struct Inherited {
    pub activated: Activated,
    pub owned: Vec<Role>,
}

impl Takeover {
    /// The channel named by `--takeover-fd`. Checked: it must be an open `SOCK_SEQPACKET`
    /// socket (the option is for the bridge itself, not for people).
    pub fn from_fd(raw: RawFd) -> Result<Takeover, String> {
        let not_ours = "--takeover-fd is set by a running bridge's upgrade, not by hand";
        let channel = match inherited::adopt(raw) {
            Ok(channel) => channel,
            Err(InheritError::NotOpen(_)) => {
                return Err(format!(
                    "--takeover-fd {raw} is not an open descriptor ({not_ours})"
                ))
            }
            Err(error) => return Err(format!("--takeover-fd {raw}: {error}")),
        };
        let kind = rustix::net::sockopt::socket_type(&channel)
            .map_err(|error| format!("--takeover-fd {raw}: {error} ({not_ours})"))?;
        if kind != SocketType::SEQPACKET {
            return Err(format!(
                "--takeover-fd {raw} is no takeover channel ({not_ours})"
            ));
        }
        // No worker may inherit it.
        rustix::io::fcntl_setfd(&channel, rustix::io::FdFlags::CLOEXEC)
            .map_err(|error| format!("--takeover-fd {raw}: {error}"))?;
        let mut takeover = Takeover {
            channel,
            received: None,
            reported: false,
        };
        match takeover.receive() {
            Ok(received) => takeover.received = Some(received),
            Err(error) => {
                let message = format!("receiving the listeners: {error}");
                takeover.report_failure(&message);
                return Err(message);
            }
        }
        Ok(takeover)
    }

    /// The old bridge's message (queued before this process existed) and its descriptors.
    fn receive(&self) -> std::io::Result<(String, Vec<OwnedFd>)> {
        let mut message = [0u8; MESSAGE_BYTES_MAX];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(LISTENERS_MAX))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut message)];
        let received = rustix::net::recvmsg(
            &self.channel,
            &mut iov,
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for ancillary in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = ancillary {
                fds.extend(passed);
            }
        }
        let text = String::from_utf8_lossy(&message[..received.bytes]).into_owned();
        Ok((text, fds))
    }

    /// Receive the old bridge's listeners and keep those that are where `config` listens (the
    /// same check as for sockets systemd passes); the others are closed, and their listeners
    /// bound anew by the caller as usual.
    pub fn take_listeners(&mut self, config: &Config) -> anyhow::Result<Inherited> {
        let (text, fds) = self
            .received
            .take()
            .ok_or_else(|| anyhow::anyhow!("the listeners were taken already"))?;
        let mut lines = text.lines();
        if lines.next() != Some(GREETING) {
            anyhow::bail!("the old bridge speaks another takeover protocol: {text:?}");
        }
        let lines: Vec<&str> = lines.collect();
        if lines.len() != fds.len() {
            anyhow::bail!(
                "the old bridge named {} listeners and passed {}",
                lines.len(),
                fds.len()
            );
        }
        let mut inherited = Inherited {
            activated: Activated::default(),
            owned: Vec::new(),
        };
        for (line, fd) in lines.into_iter().zip(fds) {
            let (name, owned) = match line.strip_suffix(" owned") {
                Some(name) => (name, true),
                None => (line, false),
            };
            let role = Role::from_fd_name(name)
                .ok_or_else(|| anyhow::anyhow!("the old bridge passed an unknown {name:?}"))?;
            if let Err(why) = super::systemd::check_listener(config, role, &fd) {
                tracing::info!(
                    listener = role.key(),
                    "not taking over the old bridge's socket ({why}): closing it; the \
                     configured one is bound as usual"
                );
                continue;
            }
            tracing::info!(listener = role.key(), "took over the old bridge's socket");
            let slot = match role {
                Role::Unix => &mut inherited.activated.unix,
                Role::Tcp => &mut inherited.activated.tcp,
                Role::Admin => &mut inherited.activated.admin,
                Role::Metrics => &mut inherited.activated.metrics,
                Role::Tls => &mut inherited.activated.tls,
            };
            *slot = Some(fd);
            if owned {
                inherited.owned.push(role);
            }
        }
        Ok(inherited)
    }

    /// Every core runs: tell the old bridge, and wait (at most [`ACK_TIMEOUT`]) until it has
    /// told systemd that this process is the main one now.
    pub fn report_ready(&mut self) {
        debug_assert!(!self.reported);
        self.reported = true;
        let line = format!("ready {}", rustix::process::getpid().as_raw_nonzero());
        if let Err(error) = rustix::net::send(&self.channel, line.as_bytes(), SendFlags::NOSIGNAL) {
            tracing::warn!(%error, "cannot tell the old bridge this one is ready");
            return;
        }
        let timeout = rustix::event::Timespec::try_from(ACK_TIMEOUT).expect("a short timeout");
        let mut fds = [PollFd::new(&self.channel, PollFlags::IN)];
        let acknowledged = matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(1))
            && matches!(
                rustix::net::recv(&self.channel, &mut [0u8; 16], RecvFlags::DONTWAIT),
                Ok((3, _))
            );
        if !acknowledged {
            tracing::warn!(
                "the old bridge did not acknowledge the takeover within {ACK_TIMEOUT:?}; going on"
            );
        }
    }

    /// This bridge cannot start: tell the old one why (it keeps serving). Once only, and not
    /// after `report_ready`.
    pub fn report_failure(&mut self, reason: &str) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let mut line = format!("error {reason}");
        if line.len() > MESSAGE_BYTES_MAX {
            let mut end = MESSAGE_BYTES_MAX;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        let _ = rustix::net::send(&self.channel, line.as_bytes(), SendFlags::NOSIGNAL);
    }
}

/// `acgi-bridge upgrade`: ask the bridge behind the admin socket at `path` to upgrade, and
/// return its one-line answer (`upgraded: ...` or `error: ...`).
pub fn request(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    // The bridge answers once the new one is ready or has failed (READY_TIMEOUT at most).
    stream.set_read_timeout(Some(READY_TIMEOUT + Duration::from_secs(10)))?;
    stream.write_all(b"upgrade\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_bridge_passes_on_its_arguments_without_its_takeover_fd() {
        // Proves an upgrade of an upgraded bridge does not stack --takeover-fd options.
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            without_takeover(args(&["serve", "--config", "a.toml", "--takeover-fd", "7"])),
            args(&["serve", "--config", "a.toml"])
        );
        assert_eq!(
            without_takeover(args(&["serve", "--takeover-fd=9", "-c", "b"])),
            args(&["serve", "-c", "b"])
        );
    }

    #[test]
    fn the_listener_message_names_each_fd_in_order() {
        // Proves the wire text of the handover: greeting, then one role per descriptor.
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        let mut handover = Handover::default();
        handover.add(Role::Unix, true, &a).expect("dup");
        handover.add(Role::Tcp, false, &b).expect("dup");
        assert_eq!(handover.message(), "acgi-takeover 1\nunix owned\ntcp\n");
    }
}
