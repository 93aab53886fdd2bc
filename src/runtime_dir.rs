//! The bridge's runtime directory: where its sockets live unless the config says otherwise.
//!
//! A socket in a directory another user can write is a socket that user can take: bind the path
//! first and the bridge cannot start, or receive (and answer) its callers' requests. `/tmp` is
//! such a directory, so the bundled config and the CLI's default address do not use it. They
//! name the runtime directory instead, which is:
//!
//! - `/run/acgi-bridge` when the bridge runs as root (systemd's `RuntimeDirectory=` for the
//!   packaged unit);
//! - `$XDG_RUNTIME_DIR/acgi-bridge` otherwise (the per-user directory a login session has,
//!   mode 0700, owned by that user);
//! - `/tmp/acgi-bridge-UID` when `XDG_RUNTIME_DIR` is unset or not absolute, as tmux does: a
//!   directory of our own in /tmp, refused if another user made it first.
//!
//! A path in the config may begin with `{runtime_dir}` (`unix = "{runtime_dir}/acgi-bridge.sock"`),
//! and the top-level key `runtime_dir` replaces the directory itself. The bridge creates the
//! directory when a socket it binds lives there (mode 0755 as root, so other users' callers can
//! reach a socket whose own mode lets them; 0700 otherwise), and refuses to start when it exists
//! owned by another user or writable by group or others.

#![forbid(unsafe_code)]

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// The placeholder a config path may begin with.
pub const PLACEHOLDER: &str = "{runtime_dir}";

/// The file name of the default Unix socket (the bundled config's and the CLI's default).
pub const SOCKET_NAME: &str = "acgi-bridge.sock";

/// The runtime directory for this process's effective uid and environment (module docs).
pub fn default_dir() -> PathBuf {
    let uid = rustix::process::geteuid().as_raw();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    choose(uid, xdg)
}

/// [`default_dir`] for a given uid and `XDG_RUNTIME_DIR` (testable without changing either).
fn choose(uid: u32, xdg_runtime_dir: Option<PathBuf>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/acgi-bridge");
    }
    match xdg_runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join("acgi-bridge"),
        _ => PathBuf::from(format!("/tmp/acgi-bridge-{uid}")),
    }
}

/// The default Unix socket: [`SOCKET_NAME`] in [`default_dir`].
pub fn default_socket() -> PathBuf {
    default_dir().join(SOCKET_NAME)
}

/// `path` with a leading `{runtime_dir}` component replaced by `runtime_dir`; `None` when it
/// does not begin with one.
pub fn expand(path: &Path, runtime_dir: &Path) -> Option<PathBuf> {
    let mut components = path.components();
    match components.next() {
        Some(Component::Normal(first)) if first == PLACEHOLDER => {
            Some(runtime_dir.join(components.as_path()))
        }
        _ => None,
    }
}

/// Create the runtime directory if it is missing (its parents as usual, itself with `mode`),
/// then check it is safe to bind in: a directory, owned by this process's effective uid, not
/// writable by group or others. An error names the directory and what to do.
pub fn ensure(dir: &Path, mode: u32) -> Result<(), String> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
    {
        Ok(()) => {}
        Err(error) => {
            return Err(format!(
                "cannot create the runtime directory {}: {error} (set runtime_dir to a \
                 directory the bridge's user may create)",
                dir.display()
            ))
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|error| {
        format!(
            "looking at the runtime directory {}: {error}",
            dir.display()
        )
    })?;
    check(dir, meta.is_dir(), meta.uid(), meta.mode())
}

/// The mode [`ensure`] creates the directory with: searchable by everyone as root (callers of
/// other users reach the socket, whose own mode decides), private otherwise.
pub fn mode_for_euid() -> u32 {
    if rustix::process::geteuid().is_root() {
        0o755
    } else {
        0o700
    }
}

fn check(dir: &Path, is_dir: bool, owner: u32, mode: u32) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    if !is_dir {
        return Err(format!(
            "the runtime directory {} is not a directory (remove it, or set runtime_dir)",
            dir.display()
        ));
    }
    if owner != me {
        return Err(format!(
            "the runtime directory {} belongs to uid {owner}, not the bridge's ({me}): another \
             user may have made it to take the bridge's sockets; remove it, or set runtime_dir",
            dir.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "the runtime directory {} is writable by its group or others (mode {:o}): chmod \
             go-w it",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_uses_run_and_others_their_session_directory_or_a_private_one_in_tmp() {
        assert_eq!(
            choose(0, Some("/run/user/0".into())),
            Path::new("/run/acgi-bridge")
        );
        assert_eq!(
            choose(1000, Some("/run/user/1000".into())),
            Path::new("/run/user/1000/acgi-bridge")
        );
        assert_eq!(choose(1000, None), Path::new("/tmp/acgi-bridge-1000"));
        // A relative XDG_RUNTIME_DIR is invalid by its spec: not trusted.
        assert_eq!(
            choose(1000, Some("run".into())),
            Path::new("/tmp/acgi-bridge-1000")
        );
    }

    #[test]
    fn only_a_leading_placeholder_is_expanded() {
        let run = Path::new("/run/acgi-bridge");
        assert_eq!(
            expand(Path::new("{runtime_dir}/acgi-bridge.sock"), run),
            Some(PathBuf::from("/run/acgi-bridge/acgi-bridge.sock"))
        );
        assert_eq!(
            expand(Path::new("{runtime_dir}"), run),
            Some(PathBuf::from("/run/acgi-bridge"))
        );
        assert_eq!(expand(Path::new("/x/{runtime_dir}/a.sock"), run), None);
        assert_eq!(expand(Path::new("{runtime_dir}x/a.sock"), run), None);
        assert_eq!(expand(Path::new("a.sock"), run), None);
    }

    #[test]
    fn ensure_creates_the_directory_with_its_mode_and_refuses_an_open_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/run");
        ensure(&dir, 0o700).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        ensure(&dir, 0o700).unwrap(); // existing and fine: still fine

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = ensure(&dir, 0o700).unwrap_err();
        assert!(error.contains("writable by its group or others"), "{error}");

        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(ensure(&file, 0o700).is_err());
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let me = rustix::process::geteuid().as_raw();
        let error = check(Path::new("/tmp/acgi-bridge-1"), true, me + 1, 0o700).unwrap_err();
        assert!(error.contains("another user may have made it"), "{error}");
    }
}
