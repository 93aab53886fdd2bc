//! The command line of the `acgi-bridge` binary: its clap definitions, and nothing that acts on
//! them. They live in the library so that the man pages and shell completions (`xtask dist`)
//! are generated from the very definitions the binary parses, never from a copy.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Default address of `call`, as `--help` and the man page say it: the bundled config's Unix
/// socket ([`crate::runtime_dir::default_socket`] is the path itself).
pub const DEFAULT_CONNECT_HELP: &str = "{runtime_dir}/acgi-bridge.sock";

/// The version `--version` prints: the crate's, and the commit it was built from when the
/// build could ask git (`build.rs`), e.g. `0.1.0 (7f87202)`.
pub const VERSION: &str = env!("ACGI_BRIDGE_VERSION");

#[derive(Parser)]
#[command(
    name = "acgi-bridge",
    version = VERSION,
    about = "Lets asynchronous servers call synchronous code",
    long_about = "Lets asynchronous servers call synchronous code: callers send an RPC over a \
                  Unix or TCP socket, and the bridge hands it to a pool of long-lived worker \
                  processes and returns their reply."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the bridge.
    ///
    /// Under systemd it reports readiness (READY=1) and pets the watchdog when NOTIFY_SOCKET
    /// and WATCHDOG_USEC are set, and uses the sockets systemd passes (LISTEN_FDS) instead of
    /// binding its own; see docs/operations.md.
    Serve {
        /// The config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
        #[arg(long, default_value = "info", value_name = "FILTER")]
        log: String,
        /// Set by a running bridge that is upgrading: the channel its listeners come over.
        #[arg(long, hide = true, value_name = "FD")]
        takeover_fd: Option<i32>,
        /// Log line format on stderr, and of the access log: `text`, or `json` (one object
        /// per line: time, level, target, message and every field). Under journald
        /// (JOURNAL_STREAM naming stderr) each line starts with its syslog priority (<3> .. <7>).
        #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
        log_format: LogFormat,
    },
    /// Call a service once and print its reply on stdout.
    Call {
        /// Bridge address: unix:PATH, tcp:HOST:PORT, tls:HOST:PORT (with --tls-ca), or bare.
        /// A bare value ending in :PORT (digits) and containing no '/' is TCP (127.0.0.1:7878,
        /// localhost:7878); any other bare value is a Unix socket path (bridge.sock,
        /// ./bridge.sock, /run/x.sock). Default: the bundled config's socket,
        /// acgi-bridge.sock in the runtime directory (/run/acgi-bridge as root,
        /// $XDG_RUNTIME_DIR/acgi-bridge otherwise, /tmp/acgi-bridge-UID without
        /// XDG_RUNTIME_DIR).
        #[arg(
            long,
            env = "ACGI_BRIDGE_ADDR",
            value_name = "ADDR",
            default_value = DEFAULT_CONNECT_HELP,
            hide_default_value = true
        )]
        connect: String,
        /// Find the bridge's address in this config file (its Unix socket, else its TCP
        /// listener) instead of --connect.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Wait up to this many seconds for the bridge to accept the connection (while it
        /// starts, or during a restart), retrying every 50 ms; 0: try once.
        #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
        wait: f64,
        /// For tls: addresses: the CA certificate(s), PEM, the bridge's certificate must
        /// chain to.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// For tls: addresses: this client's certificate chain, PEM (for a bridge with
        /// listen.tls_client_ca: mutual TLS); needs --tls-key.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert, PEM.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// For tls: addresses: the name to check the bridge's certificate against (default:
        /// the address's host).
        #[arg(long, value_name = "NAME")]
        tls_server_name: Option<String>,
        /// Service name or numeric id.
        service: String,
        /// The payload; `-` reads it from stdin; omitted means empty.
        payload: Option<String>,
    },
    /// Print each service's pool state and counters, from the admin socket.
    Status {
        /// The admin socket; default: the one named by --config.
        #[arg(long, conflicts_with = "config", value_name = "SOCKET")]
        admin: Option<PathBuf>,
        /// Find the admin socket from this config file.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Reload the running bridge's config file (as SIGHUP does) and wait for the outcome:
    /// services added, replaced (new workers first, blue/green) and removed, limits applied;
    /// a bad config is refused and the running one keeps serving. Exits 1 when refused.
    Reload {
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Replace the running bridge by a new process of the binary it was started from, without
    /// a failed request.
    ///
    /// The new process loads the config file again, takes over the listening sockets, starts
    /// its workers and reports ready; then the old one stops accepting, answers what it
    /// accepted and exits. A new process that cannot start (a bad config, say) exits, and the
    /// old one keeps serving. Prints the new pid, or why the upgrade failed (exit status 1).
    /// The same as `kill -USR2` on the bridge, which only logs the outcome. See
    /// docs/operations.md, "Upgrading the binary".
    Upgrade {
        /// The admin socket; default: the one named by --config.
        #[arg(long, conflicts_with = "config", value_name = "SOCKET")]
        admin: Option<PathBuf>,
        /// Find the admin socket from this config file.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and name each bad key with the reason, then what would still
    /// fail at startup: a Unix socket path too long, a state_dir it cannot create or write, a
    /// TCP port in use (bound, then closed).
    Check {
        /// The config file to validate (nothing is started).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the effective config (every key with its value after defaults) as TOML.
        #[arg(long)]
        print: bool,
    },
    /// Pause a service: running requests finish, new ones wait in its backlog (bounded by
    /// backlog_max and their deadlines) until `resume`.
    Pause {
        #[command(flatten)]
        admin: AdminSocket,
        /// The service's name or id.
        service: String,
    },
    /// Resume a paused or drained service.
    Resume {
        #[command(flatten)]
        admin: AdminSocket,
        /// The service's name or id.
        service: String,
    },
    /// Drain a service: running and waiting requests finish, then its workers stop; new
    /// requests are refused (service unavailable) until `resume`.
    Drain {
        #[command(flatten)]
        admin: AdminSocket,
        /// The service's name or id.
        service: String,
    },
    /// Replace every worker of a service, one at a time, each after its current request (a
    /// rolling restart; not counted as crashes).
    Recycle {
        #[command(flatten)]
        admin: AdminSocket,
        /// The service's name or id.
        service: String,
    },
    /// SIGKILL one worker: its running request gets `worker failed`; counted as an admin kill,
    /// not a crash (the crash-loop breaker does not hear of it).
    KillWorker {
        #[command(flatten)]
        admin: AdminSocket,
        /// The worker's pid (`acgi-bridge status` lists them).
        pid: i32,
    },
    /// Change a service's pool limits live, until the bridge restarts: any of
    /// min_workers=N max_workers=N backlog_max=N, validated as in the config file.
    Set {
        #[command(flatten)]
        admin: AdminSocket,
        /// The service's name or id.
        service: String,
        /// The new limits, KEY=N each (min_workers, max_workers, backlog_max).
        #[arg(required = true, value_name = "KEY=N")]
        limits: Vec<String>,
    },
}

/// Where an admin command finds the bridge: the admin socket, or the config that names it.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminSocket {
    /// The admin socket; default: the one named by --config.
    #[arg(long, conflicts_with = "config", value_name = "SOCKET")]
    pub admin: Option<PathBuf>,
    /// Find the admin socket from this config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The address `call --connect` gives the client, in the client's own spelling: a bare value
/// that is not `HOST:PORT` becomes `unix:VALUE`, so that `--connect bridge.sock` (a relative
/// path without `./`) reaches the socket instead of failing to resolve a host.
pub fn connect_addr(value: &str) -> String {
    let runtime_dir = crate::runtime_dir::default_dir();
    if let Some(path) = crate::runtime_dir::expand(std::path::Path::new(value), &runtime_dir) {
        return format!("unix:{}", path.display());
    }
    if value.starts_with("unix:")
        || value.starts_with("tcp:")
        || value.starts_with("tls:")
        || value.contains('/')
    {
        return value.to_string();
    }
    let is_host_port = value.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
    });
    if is_host_port {
        value.to_string()
    } else {
        format!("unix:{value}")
    }
}

/// `call`'s TLS flags.
#[derive(Debug, Default)]
pub struct CallTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// `1 service`, `2 services`.
pub fn count_noun(count: usize, singular: &str, plural: &str) -> String {
    if count == 1 {
        format!("{count} {singular}")
    } else {
        format!("{count} {plural}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_addr_reads_bare_names_as_unix_paths() {
        // Proves the documented rule: '/' or no trailing :PORT means a Unix path.
        assert_eq!(connect_addr("bridge.sock"), "unix:bridge.sock");
        assert_eq!(connect_addr("./bridge.sock"), "./bridge.sock");
        assert_eq!(connect_addr("/run/a.sock"), "/run/a.sock");
        assert_eq!(connect_addr("127.0.0.1:7878"), "127.0.0.1:7878");
        assert_eq!(connect_addr("localhost:7878"), "localhost:7878");
        assert_eq!(connect_addr("[::1]:7878"), "[::1]:7878");
        assert_eq!(connect_addr("unix:x"), "unix:x");
        assert_eq!(connect_addr("tcp:h:1"), "tcp:h:1");
        assert_eq!(connect_addr("tls:h:1"), "tls:h:1");
        assert_eq!(connect_addr("odd:name"), "unix:odd:name");
        assert_eq!(connect_addr(":7878"), "unix::7878");
        let default = crate::runtime_dir::default_socket();
        assert_eq!(
            connect_addr(DEFAULT_CONNECT_HELP),
            format!("unix:{}", default.display())
        );
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        // Proves clap accepts the definitions (conflicts, defaults) as a whole.
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert_eq!(count_noun(1, "service", "services"), "1 service");
        assert_eq!(count_noun(2, "service", "services"), "2 services");
    }
}
