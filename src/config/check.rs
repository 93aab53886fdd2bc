//! What `acgi-bridge check` adds to validation: the failures a valid config would still meet at
//! startup (a Unix socket path longer than `sun_path`, a `state_dir` that cannot be created or
//! written, a TCP port in use), and the effective config printed as TOML (`check --print`).
//!
//! The runtime checks leave nothing behind: a TCP port is bound and closed at once, the state
//! directory is probed with an unnamed `O_TMPFILE` (or `access(2)` where that is unsupported),
//! and a state directory that does not exist yet is judged by its nearest existing parent.
//! They run as whoever runs `check`: run it as the bridge's user for the answer that counts.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Serialize, Serializer};

use super::{Config, Cores, Problem};

/// Bytes of `sockaddr_un.sun_path` on Linux, its terminating NUL included.
pub const SUN_PATH_BYTES: usize = 108;

impl Serialize for Cores {
    /// As it is written in the file: `"auto"`, a count, or a list of CPU ids.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cores::Auto => serializer.serialize_str("auto"),
            Cores::Named(name) => serializer.serialize_str(name),
            Cores::Count(count) => serializer.serialize_u32(*count),
            Cores::List(ids) => ids.serialize(serializer),
        }
    }
}

impl Config {
    /// What a valid config would still fail on at startup, each naming its key and the fix.
    pub fn runtime_problems(&self) -> Vec<Problem> {
        self.runtime_problems_of(self.bridge_running())
    }

    /// The same, told whether a bridge of this config is running ([`Config::bridge_running`]):
    /// then its own ports are in use by it, and are not checked.
    pub fn runtime_problems_of(&self, running: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(unix) = &self.listen.unix {
            problems.extend(socket_path_problem("listen.unix", unix));
        }
        let admin_key = if self.admin_socket.is_some() {
            "admin_socket"
        } else {
            "admin_socket (state_dir/admin.sock)"
        };
        problems.extend(socket_path_problem(admin_key, &self.admin_socket_path()));
        if let Err(reason) = state_dir_writable(&self.state_dir) {
            problems.push(Problem {
                key: "state_dir".into(),
                reason,
            });
        }
        let ports = if running {
            Vec::new()
        } else {
            vec![
                ("listen.tcp", self.listen.tcp.as_deref()),
                ("metrics_listen", self.metrics_listen.as_deref()),
            ]
        };
        for (key, addr) in ports {
            if let Some(reason) = addr.and_then(port_in_use) {
                problems.push(Problem {
                    key: key.into(),
                    reason,
                });
            }
        }
        problems
    }

    /// Whether a bridge of this config is running: its admin socket accepts a connection.
    pub fn bridge_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.admin_socket_path()).is_ok()
    }

    /// The effective config as TOML: every key with its value after defaults (the admin
    /// socket's path and `start_workers` as the bridge computes them), keys left unset as
    /// comments. Feeding it back gives the same config.
    pub fn effective_toml(&self) -> Result<String, String> {
        let mut effective = self.clone();
        effective.admin_socket = Some(self.admin_socket_path());
        for service in &mut effective.services {
            service.start_workers = Some(service.policy().start_workers);
        }
        let value = serde_json::to_value(&effective).map_err(|e| e.to_string())?;
        let serde_json::Value::Object(top) = value else {
            return Err("the config is not a table".into());
        };
        let mut out = String::from("# The effective configuration (acgi-bridge check --print)\n");
        let mut tables = Vec::new();
        for (key, value) in &top {
            match value {
                serde_json::Value::Object(_) => tables.push((key, value)),
                serde_json::Value::Array(items)
                    if items.iter().all(|i| i.is_object()) && !items.is_empty() =>
                {
                    tables.push((key, value))
                }
                _ => write_key(&mut out, key, value)?,
            }
        }
        for (key, value) in tables {
            match value {
                serde_json::Value::Object(table) => {
                    let _ = writeln!(out, "\n[{key}]");
                    write_table(&mut out, table)?;
                }
                serde_json::Value::Array(items) => {
                    for item in items {
                        let _ = writeln!(out, "\n[[{key}]]");
                        if let serde_json::Value::Object(table) = item {
                            write_table(&mut out, table)?;
                        }
                    }
                }
                _ => unreachable!("only tables were kept"),
            }
        }
        Ok(out)
    }
}

fn write_table(
    out: &mut String,
    table: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    for (key, value) in table {
        write_key(out, key, value)?;
    }
    Ok(())
}

/// `key = value`, or `# key: not set` for an unset optional key.
fn write_key(out: &mut String, key: &str, value: &serde_json::Value) -> Result<(), String> {
    if value.is_null() {
        let _ = writeln!(out, "# {key}: not set");
        return Ok(());
    }
    let value = toml::Value::try_from(value).map_err(|e| format!("{key}: {e}"))?;
    let _ = writeln!(out, "{} = {}", toml_key(key), inline(&value));
    Ok(())
}

/// A value on one line (a table as an inline table).
fn inline(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(table) => {
            let entries: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), inline(v)))
                .collect();
            if entries.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", entries.join(", "))
            }
        }
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A key, bare when TOML allows, else quoted.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_string()
    } else {
        toml::Value::String(key.to_string()).to_string()
    }
}

/// A Unix socket path must fit `sun_path` with its NUL.
fn socket_path_problem(key: &str, path: &Path) -> Option<Problem> {
    let bytes = path.as_os_str().len();
    (bytes >= SUN_PATH_BYTES).then(|| Problem {
        key: key.into(),
        reason: format!(
            "{} is {bytes} bytes, but a Unix socket path holds at most {} (sun_path): choose a \
             shorter path",
            path.display(),
            SUN_PATH_BYTES - 1
        ),
    })
}

/// Whether the bridge could create `dir` (its nearest existing parent is a directory it may
/// write) or write in it (it exists).
fn state_dir_writable(dir: &Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|path| path.symlink_metadata().is_ok() || path.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let what = if existing == dir {
        format!("{} cannot be written", dir.display())
    } else {
        format!(
            "{} cannot be created: {}",
            dir.display(),
            existing.display()
        )
    };
    match std::fs::metadata(existing) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(format!("{what} is in the way (not a directory)")),
        Err(error) => return Err(format!("{what}: {error}")),
    }
    probe_write(existing).map_err(|error| {
        let whose = if existing == dir {
            ""
        } else {
            " cannot be written"
        };
        format!("{what}{whose} ({error}): fix its owner or mode, or choose another state_dir")
    })
}

/// Create an unnamed file in `dir` and close it (it vanishes); where the filesystem has no
/// `O_TMPFILE`, ask `access(2)` (effective ids) instead.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    use rustix::fs::{Access, AtFlags, Mode, OFlags, CWD};
    let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
    match rustix::fs::open(dir, flags, Mode::from_raw_mode(0o600)) {
        Ok(_file) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR) => {
            let access = Access::WRITE_OK | Access::EXEC_OK;
            rustix::fs::accessat(CWD, dir, access, AtFlags::EACCESS).map_err(Into::into)
        }
        Err(error) => Err(error.into()),
    }
}

/// Whether the TCP address (a fixed port) is taken: bind it, then close it at once.
fn port_in_use(addr: &str) -> Option<String> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    if addr.port() == 0 {
        return None;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_listener) => None,
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "{addr} is in use by another process (a bridge already running?): stop it or choose \
             another port"
        )),
        Err(error) => Some(format!("cannot bind {addr}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "{extra}\n[listen]\nunix = \"/tmp/x.sock\"\n[[service]]\nid = 1\nname = \"echo\"\n\
             exec = \"/bin/cat\"\nenv = {{ A = \"1\", \"B.C\" = \"x y\" }}\n"
        );
        let mut config = Config::parse(&text).expect("parses");
        config.resolve_paths(Path::new("/tmp"));
        config
    }

    #[test]
    fn the_effective_config_round_trips_with_every_default_filled_in() {
        // Proves --print names every key (unset ones as comments), fills in the computed
        // defaults, and parses back into the same config.
        let config = config("state_dir = \"/tmp/st\"");
        let text = config.effective_toml().expect("prints");
        for needle in [
            "max_workers = 8",
            "backlog_max = 1024",
            "cores = \"auto\"",
            "admin_socket = \"/tmp/st/admin.sock\"",
            "start_workers = 1",
            "# metrics_listen: not set",
            "# user: not set",
            "env = { A = \"1\", \"B.C\" = \"x y\" }",
            "[listen]",
            "[[service]]",
        ] {
            assert!(text.contains(needle), "{needle}:\n{text}");
        }
        let again = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(again.problems().is_empty(), "{:?}", again.problems());
        assert_eq!(again.effective_toml().unwrap(), text);
    }

    #[test]
    fn runtime_problems_name_long_socket_paths_and_unwritable_state_dirs() {
        // Proves the sun_path bound (107 bytes fit, 108 do not) and a state_dir under a file.
        let dir = tempfile::tempdir().unwrap();
        let mut config = config("");
        config.state_dir = dir.path().join("state");
        assert!(
            config.runtime_problems().is_empty(),
            "{:?}",
            config.runtime_problems()
        );
        config.listen.unix = Some(Path::new("/").join("a".repeat(SUN_PATH_BYTES - 2)));
        assert!(config.runtime_problems().is_empty(), "107 bytes fit");
        config.listen.unix = Some(Path::new("/").join("a".repeat(SUN_PATH_BYTES - 1)));
        let problems = config.runtime_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "listen.unix");
        assert!(problems[0].reason.contains("108 bytes"), "{problems:?}");
        config.listen.unix = None;
        std::fs::write(dir.path().join("file"), b"").unwrap();
        config.state_dir = dir.path().join("file").join("state");
        let problems = config.runtime_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "state_dir");
        assert!(problems[0].reason.contains("is in the way"), "{problems:?}");
    }
}
