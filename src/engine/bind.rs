//! Where the bridge puts its files and sockets, safely: `state_dir` private and its own, a
//! Unix socket only ever replacing a stale socket of its own user and holding its mode from its
//! first moment, a TCP listener no other process may share.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, Context};

/// Create `dir` (and its parents) if missing, the directory itself 0700: nothing of the
/// services' data is anyone else's to list.
pub(super) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// `state_dir` holds the services' data: refuse one that another user owns (other than root)
/// or that group or others may write (they could plant or replace what services read there).
pub(super) fn check_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("looking at state_dir {}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        bail!(
            "state_dir {} belongs to uid {}, not the bridge's ({me}) or root",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "state_dir {} is writable by its group or others (mode {:o}): chmod go-w it",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Bind a Unix listener at `path` with permission bits `mode`, safely: only a stale *socket*
/// of our own user is ever removed (never a file, a directory or another user's socket); the
/// directory must not let other users replace the socket (writable by others without the
/// sticky bit); and the socket has its mode from the moment it exists (the umask is set for
/// the bind), so no caller can connect in between.
pub(super) fn bind_unix(
    path: &std::path::Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> anyhow::Result<OwnedFd> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket: not replacing it (remove it, or choose \
                     another listen.unix)",
                    path.display()
                );
            }
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me {
                bail!(
                    "{} is a socket of uid {}, not ours ({me}): not replacing it",
                    path.display(),
                    meta.uid()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by a running process (another bridge?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("looking at {}", path.display()));
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let meta = std::fs::metadata(parent)
            .with_context(|| format!("looking at {}", parent.display()))?;
        if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            bail!(
                "{} is writable by every user and not sticky: anyone could replace the socket \
                 {} (use a directory only the bridge's user can write, e.g. /run/acgi-bridge)",
                parent.display(),
                path.display()
            );
        }
    }
    // The socket file gets `mode` at creation: bind under a umask that leaves only it.
    let umask = rustix::fs::Mode::from_bits_truncate(!mode & 0o777);
    let previous = rustix::process::umask(umask);
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(previous);
    let listener = bound.with_context(|| format!("binding the Unix socket {}", path.display()))?;
    if owner.is_some() || group.is_some() {
        // (Until this the socket has the bridge's ids and `mode`: never more open than asked.)
        std::os::unix::fs::chown(path, owner, group).with_context(|| {
            format!(
                "giving {} to listen.unix_owner / unix_group (changing the owner needs root or \
                 CAP_CHOWN; the group, membership of it)",
                path.display()
            )
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    rustix::net::listen(&listener, 4096)?;
    Ok(listener.into())
}

/// The TCP listener, shared by every core (each keeps a multishot accept on it, and hands the
/// connection to the core with the fewest). Not SO_REUSEPORT: with it, any process of the same
/// user (a second bridge, a hostile worker) could bind the same port and take a share of the
/// new callers; without it, such a bind fails with EADDRINUSE.
pub(super) fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    // (SO_REUSEADDR only lets a restart bind while old connections sit in TIME_WAIT; it never
    // lets two listeners share a port.)
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, 4096)?;
    Ok(fd)
}
