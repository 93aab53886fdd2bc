//! systemd integration: notifications to the service manager (`sd_notify`: READY, STATUS,
//! STOPPING, WATCHDOG) and socket activation (the listeners systemd passes in `LISTEN_FDS`).
//!
//! It owns what systemd hands the process at exec: the passed descriptors (until `engine::run`
//! takes them as listeners) and the watchdog period. [`Systemd::from_env`] reads and then
//! removes `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, `WATCHDOG_USEC` and `WATCHDOG_PID`
//! from the environment before any thread exists, so that no worker inherits them (a worker
//! that saw them could believe it was socket-activated or watched). `NOTIFY_SOCKET` stays: the
//! `sd-notify` crate reads it at every notification, and systemd ignores what other processes
//! of the service send there (the unit says `NotifyAccess=main`). Without `NOTIFY_SOCKET` every
//! notification is a no-op, so the bridge behaves the same outside systemd.
//!
//! Matching passed sockets to the config's listeners ([`Systemd::take_listeners`]):
//!
//! - A socket whose name (`FileDescriptorName=`, or `--fdname=` of `systemd-socket-activate`)
//!   is `unix`, `tcp`, `admin` or `metrics` is that listener (`listen.unix`, `listen.tcp`,
//!   `admin_socket`, `metrics_listen`). Any other name (systemd's default is the socket unit's
//!   name) is matched by address: a Unix socket bound to `listen.unix` or to the admin socket's
//!   path, a TCP socket bound to `listen.tcp` or `metrics_listen`.
//! - Either way its type and address must agree with the config (a TCP port 0 in the config
//!   accepts any port): the config stays the one description of where the bridge listens.
//! - Every `[listen]` listener in the config must have a passed socket, and every passed
//!   socket must be some configured listener; otherwise the bridge refuses to start and says
//!   which. The admin socket and the metrics endpoint may be passed, or are bound as usual.
//! - A passed Unix socket is systemd's: the bridge neither replaces it at startup nor unlinks
//!   it at shutdown, and leaves its mode to `SocketMode=`.
//!
//! Taking the passed descriptors and removing the variables is `io::inherited`'s (sound only
//! while the process has one thread, which it checks).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
use sd_notify::NotifyState;

use super::io::inherited::{self, InheritError};
use crate::config::Config;

/// The shortest time between two WATCHDOG=1.
const WATCHDOG_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// A listener of the config, as socket activation names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `listen.unix`: callers, over a Unix stream socket.
    Unix,
    /// `listen.tcp`: callers, over TCP.
    Tcp,
    /// `admin_socket`: `acgi-bridge status`.
    Admin,
    /// `metrics_listen`: `GET /metrics`.
    Metrics,
    /// `listen.tls`: callers, over TLS.
    Tls,
}

impl Role {
    const ALL: [Role; 5] = [Role::Unix, Role::Tcp, Role::Admin, Role::Metrics, Role::Tls];

    /// The descriptor name that selects this listener.
    pub fn fd_name(self) -> &'static str {
        match self {
            Role::Unix => "unix",
            Role::Tcp => "tcp",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
            Role::Tls => "tls",
        }
    }

    /// The listener a descriptor name selects.
    pub fn from_fd_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.fd_name() == name)
    }

    /// The config key of this listener.
    pub fn key(self) -> &'static str {
        match self {
            Role::Unix => "listen.unix",
            Role::Tcp => "listen.tcp",
            Role::Admin => "admin_socket",
            Role::Metrics => "metrics_listen",
            Role::Tls => "listen.tls",
        }
    }

    fn is_unix(self) -> bool {
        matches!(self, Role::Unix | Role::Admin)
    }
}

/// Why the passed sockets cannot serve the config. Every variant is the operator's to fix (the
/// socket unit and the config disagree); retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS: {0} (the service manager passed an unreadable socket list)")]
    Environment(std::io::Error),
    #[error("passed socket {fd} ({name:?}): {reason}")]
    Unusable {
        fd: i32,
        name: String,
        reason: String,
    },
    #[error(
        "passed socket {fd} ({name:?}, {address}) matches no configured listener: name it \
         unix, tcp, admin, metrics or tls (FileDescriptorName=) or bind it to an address the \
         config listens on"
    )]
    Unmatched {
        fd: i32,
        name: String,
        address: String,
    },
    #[error(
        "passed socket {fd} ({name:?}) is for {key}, but {key} is {wanted}; it is bound to \
         {address}: make the socket unit and the config agree"
    )]
    Mismatch {
        fd: i32,
        name: String,
        key: &'static str,
        wanted: String,
        address: String,
    },
    #[error(
        "passed socket {fd} ({name:?}) is for {key}, but it is a {found}, not a listening \
         {wanted} stream socket"
    )]
    WrongType {
        fd: i32,
        name: String,
        key: &'static str,
        found: String,
        wanted: &'static str,
    },
    #[error("two passed sockets ({first} and {second}) are both for {key}")]
    Duplicate {
        first: i32,
        second: i32,
        key: &'static str,
    },
    #[error(
        "socket activation is in use but {key} ({wanted}) has no passed socket: add it to \
         the socket unit (ListenStream={wanted}, FileDescriptorName={name}) or remove it from \
         the config"
    )]
    Missing {
        key: &'static str,
        wanted: String,
        name: &'static str,
    },
}

/// One descriptor systemd passed.
struct Passed {
    fd: OwnedFd,
    raw: i32,
    name: String,
}

/// What a passed descriptor is.
enum Bound {
    Unix(PathBuf),
    Inet(SocketAddr),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Unix(path) => write!(f, "unix:{}", path.display()),
            Bound::Inet(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// The listeners taken from systemd, by role; `None`: bind it as usual.
#[derive(Default)]
pub struct Activated {
    pub unix: Option<OwnedFd>,
    pub tcp: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub tls: Option<OwnedFd>,
}

impl Activated {
    fn slot(&mut self, role: Role) -> &mut Option<OwnedFd> {
        match role {
            Role::Unix => &mut self.unix,
            Role::Tcp => &mut self.tcp,
            Role::Admin => &mut self.admin,
            Role::Metrics => &mut self.metrics,
            Role::Tls => &mut self.tls,
        }
    }
}

/// What systemd gave the process at exec.
pub struct Systemd {
    passed: Vec<Passed>,
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Not started by systemd: nothing passed, no watchdog (notifications still go to
    /// `NOTIFY_SOCKET` if it is set).
    pub fn none() -> Systemd {
        Systemd {
            passed: Vec::new(),
            watchdog: None,
        }
    }

    /// Read what systemd passed and remove it from the environment (see the module doc).
    /// The descriptors are already close-on-exec, so that no worker inherits a listener.
    /// Called at startup, before any thread exists (`io::inherited` checks).
    pub fn from_env() -> Result<Systemd, ActivationError> {
        let taken = inherited::take_systemd().map_err(|error| match error {
            InheritError::Environment(error) => ActivationError::Environment(error),
            other => ActivationError::Environment(std::io::Error::other(other.to_string())),
        })?;
        let watchdog = taken.watchdog;
        let passed = taken
            .passed
            .into_iter()
            .map(|(fd, raw, name)| Passed { fd, raw, name })
            .collect();
        Ok(Systemd {
            passed,
            watchdog: watchdog.filter(|period| !period.is_zero()),
        })
    }

    /// Whether systemd passed any socket (then the caller listeners must all come from it).
    pub fn socket_activated(&self) -> bool {
        !self.passed.is_empty()
    }

    /// How often to send WATCHDOG=1: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises
    /// (at least `WATCHDOG_INTERVAL_MIN`, so that an absurdly short period cannot make the
    /// control thread spin).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
            .map(|period| (period / 2).max(WATCHDOG_INTERVAL_MIN))
    }

    /// Match the passed sockets to the config's listeners (rules in the module doc).
    pub fn take_listeners(&mut self, config: &Config) -> Result<Activated, ActivationError> {
        let mut activated = Activated::default();
        if self.passed.is_empty() {
            return Ok(activated);
        }
        let wanted = Wanted::from_config(config);
        let mut taken: Vec<(Role, i32)> = Vec::new();
        for passed in std::mem::take(&mut self.passed) {
            let bound = describe(&passed)?;
            let role = match Role::ALL.into_iter().find(|r| r.fd_name() == passed.name) {
                Some(role) => role,
                None => wanted
                    .role_of(&bound)
                    .ok_or_else(|| ActivationError::Unmatched {
                        fd: passed.raw,
                        name: passed.name.clone(),
                        address: bound.to_string(),
                    })?,
            };
            wanted.check(role, &passed, &bound)?;
            if let Some(&(_, first)) = taken.iter().find(|(r, _)| *r == role) {
                return Err(ActivationError::Duplicate {
                    first,
                    second: passed.raw,
                    key: role.key(),
                });
            }
            taken.push((role, passed.raw));
            tracing::info!(
                fd = passed.raw,
                name = %passed.name,
                address = %bound,
                listener = role.key(),
                "using a socket passed by systemd"
            );
            *activated.slot(role) = Some(passed.fd);
        }
        for role in [Role::Unix, Role::Tcp] {
            if let Some(wanted) = wanted.describe(role) {
                if activated.slot(role).is_none() {
                    return Err(ActivationError::Missing {
                        key: role.key(),
                        wanted,
                        name: role.fd_name(),
                    });
                }
            }
        }
        Ok(activated)
    }
}

/// Whether `fd` is a listening stream socket where `config` puts `role` (the checks a passed
/// socket gets): for a socket another bridge hands over at an upgrade (`super::upgrade`).
pub fn check_listener(config: &Config, role: Role, fd: &OwnedFd) -> Result<(), ActivationError> {
    let passed = Passed {
        fd: fd.try_clone().map_err(ActivationError::Environment)?,
        raw: std::os::fd::AsRawFd::as_raw_fd(fd),
        name: role.fd_name().to_string(),
    };
    let bound = describe(&passed)?;
    Wanted::from_config(config).check(role, &passed, &bound)
}

/// Read a passed descriptor's type and address, and check it is a listening stream socket.
fn describe(passed: &Passed) -> Result<Bound, ActivationError> {
    let unusable = |reason: String| ActivationError::Unusable {
        fd: passed.raw,
        name: passed.name.clone(),
        reason,
    };
    let fd = passed.fd.as_fd();
    let kind = rustix::net::sockopt::socket_type(fd)
        .map_err(|error| unusable(format!("not a socket ({error})")))?;
    let address =
        rustix::net::getsockname(fd).map_err(|error| unusable(format!("getsockname: {error}")))?;
    let bound = match address.address_family() {
        AddressFamily::UNIX => {
            let unix = SocketAddrUnix::try_from(address)
                .map_err(|error| unusable(format!("reading its Unix address: {error}")))?;
            match unix.path() {
                Some(path) => {
                    use std::os::unix::ffi::OsStrExt;
                    let path = std::ffi::OsStr::from_bytes(path.to_bytes());
                    Bound::Unix(PathBuf::from(path))
                }
                None => {
                    return Err(unusable(
                        "an abstract or unnamed Unix socket (the bridge serves path sockets)"
                            .into(),
                    ))
                }
            }
        }
        AddressFamily::INET | AddressFamily::INET6 => Bound::Inet(
            SocketAddr::try_from(address)
                .map_err(|_| unusable("an unreadable IP address".into()))?,
        ),
        family => return Err(unusable(format!("a socket of family {family:?}"))),
    };
    if kind != SocketType::STREAM {
        let what = if kind == SocketType::DGRAM {
            "datagram"
        } else if kind == SocketType::SEQPACKET {
            "seqpacket"
        } else {
            "non-stream"
        };
        return Err(unusable(format!(
            "a {what} socket ({bound}); the bridge needs ListenStream="
        )));
    }
    let listening = rustix::net::sockopt::socket_acceptconn(fd)
        .map_err(|error| unusable(format!("SO_ACCEPTCONN: {error}")))?;
    if !listening {
        return Err(unusable(format!(
            "{bound} is not listening (Accept=yes hands over connections, not listeners: use \
             Accept=no)"
        )));
    }
    Ok(bound)
}

/// Where the config says each listener is.
struct Wanted {
    unix: Option<PathBuf>,
    tcp: Option<(String, Vec<SocketAddr>)>,
    admin: PathBuf,
    metrics: Option<(String, Vec<SocketAddr>)>,
    tls: Option<(String, Vec<SocketAddr>)>,
}

impl Wanted {
    fn from_config(config: &Config) -> Wanted {
        let resolve = |text: &String| {
            let addrs = std::net::ToSocketAddrs::to_socket_addrs(text.as_str())
                .map(Iterator::collect)
                .unwrap_or_default();
            (text.clone(), addrs)
        };
        Wanted {
            unix: config.listen.unix.clone(),
            tcp: config.listen.tcp.as_ref().map(resolve),
            admin: config.admin_socket_path(),
            metrics: config.metrics_listen.as_ref().map(resolve),
            tls: config.listen.tls.as_ref().map(resolve),
        }
    }

    /// The configured address of `role`, for messages; `None`: not configured.
    fn describe(&self, role: Role) -> Option<String> {
        match role {
            Role::Unix => self.unix.as_ref().map(|p| p.display().to_string()),
            Role::Admin => Some(self.admin.display().to_string()),
            Role::Tcp => self.tcp.as_ref().map(|(text, _)| text.clone()),
            Role::Metrics => self.metrics.as_ref().map(|(text, _)| text.clone()),
            Role::Tls => self.tls.as_ref().map(|(text, _)| text.clone()),
        }
    }

    /// Which listener a socket with an unknown name is, by its address.
    fn role_of(&self, bound: &Bound) -> Option<Role> {
        Role::ALL.into_iter().find(|&role| {
            role.is_unix() == matches!(bound, Bound::Unix(_)) && self.fits(role, bound)
        })
    }

    fn fits(&self, role: Role, bound: &Bound) -> bool {
        let same_path = |wanted: &Path, path: &Path| wanted == path;
        let same_inet = |wanted: &Option<(String, Vec<SocketAddr>)>, addr: &SocketAddr| {
            wanted.as_ref().is_some_and(|(_, addrs)| {
                addrs
                    .iter()
                    .any(|w| w.ip() == addr.ip() && (w.port() == 0 || w.port() == addr.port()))
            })
        };
        match (role, bound) {
            (Role::Unix, Bound::Unix(path)) => {
                self.unix.as_deref().is_some_and(|w| same_path(w, path))
            }
            (Role::Admin, Bound::Unix(path)) => same_path(&self.admin, path),
            (Role::Tcp, Bound::Inet(addr)) => same_inet(&self.tcp, addr),
            (Role::Metrics, Bound::Inet(addr)) => same_inet(&self.metrics, addr),
            (Role::Tls, Bound::Inet(addr)) => same_inet(&self.tls, addr),
            _ => false,
        }
    }

    /// A socket taken for `role` must be of its type and at its configured address.
    fn check(&self, role: Role, passed: &Passed, bound: &Bound) -> Result<(), ActivationError> {
        let Some(wanted) = self.describe(role) else {
            return Err(ActivationError::Mismatch {
                fd: passed.raw,
                name: passed.name.clone(),
                key: role.key(),
                wanted: "not set".into(),
                address: bound.to_string(),
            });
        };
        let is_unix = matches!(bound, Bound::Unix(_));
        if role.is_unix() != is_unix {
            return Err(ActivationError::WrongType {
                fd: passed.raw,
                name: passed.name.clone(),
                key: role.key(),
                found: if is_unix { "Unix socket" } else { "TCP socket" }.into(),
                wanted: if role.is_unix() { "Unix" } else { "TCP" },
            });
        }
        if !self.fits(role, bound) {
            return Err(ActivationError::Mismatch {
                fd: passed.raw,
                name: passed.name.clone(),
                key: role.key(),
                wanted,
                address: bound.to_string(),
            });
        }
        Ok(())
    }
}

/// Send notifications; failures are logged, never fatal (the bridge serves either way, and
/// systemd's start timeout or watchdog reports a manager that hears nothing).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// READY=1 with a one-line STATUS: the listeners are open and every core is running.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// RELOADING=1 with MONOTONIC_USEC (what `Type=notify-reload` wants): a reload has begun;
/// READY=1 (`notify_ready`) says it has ended.
pub fn notify_reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// MAINPID=: a new bridge took over at a binary upgrade (sent by the old one, the main process
/// until then, which `NotifyAccess=main` accepts; the new one then sends READY=1 itself).
pub fn notify_main_pid(pid: i32) {
    let status = format!("upgraded: pid {pid} took over");
    notify(&[
        NotifyState::MainPid(pid as u32),
        NotifyState::Status(&status),
    ]);
}

/// STOPPING=1: a graceful stop has begun.
pub fn notify_stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing requests in flight"),
    ]);
}

/// WATCHDOG=1: the control thread is alive.
pub fn notify_watchdog() {
    if let Err(error) = sd_notify::notify(&[NotifyState::Watchdog]) {
        tracing::debug!(%error, "cannot pet the watchdog (NOTIFY_SOCKET)");
    }
}
