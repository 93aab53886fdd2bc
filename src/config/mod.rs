//! The daemon's configuration: a TOML file, parsed strictly and validated as a whole.
//!
//! Parsing rejects unknown keys (a typo is an error, not a silent default). Validation collects
//! every problem at once, each naming its key (`service[1].max_workers`) and the reason, so that
//! `acgi-bridge check` can print them all. Relative paths are resolved against the directory of
//! the config file, so a config works from any working directory.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod reload;

use crate::pool::{Mode, Policy};
use crate::proto::{PAYLOAD_BYTES_MAX_CEILING, PAYLOAD_BYTES_MAX_DEFAULT};
use crate::shm::{SLOT_CAPACITY_BYTES_DEFAULT, SLOT_CAPACITY_BYTES_MIN};

mod check;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where services keep state (databases, caches). Created at startup. Workers get it in
    /// `ACGI_STATE_DIR`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Largest request or reply payload, in bytes.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: u32,
    /// Bytes of answers queued for one caller before the bridge disconnects it.
    #[serde(default = "default_write_queue_max_bytes")]
    pub write_queue_max_bytes: u64,
    /// Most caller connections open at once; further connections are closed at accept.
    #[serde(default = "default_connections_max")]
    pub connections_max: u32,
    /// Caller connections kept for the Unix socket: TCP callers together may hold at most
    /// `connections_max` minus this, so a flood over TCP cannot lock out local callers
    /// (applies only when the bridge listens on both).
    #[serde(default = "default_unix_connections_reserved")]
    pub unix_connections_reserved: u32,
    /// Most caller connections one Unix-socket peer (by its uid) may hold at once.
    #[serde(default = "default_connections_per_uid_max")]
    pub connections_per_uid_max: u32,
    /// Most caller connections one TCP peer (by its IP address) may hold at once.
    #[serde(default = "default_connections_per_ip_max")]
    pub connections_per_ip_max: u32,
    /// A caller that has begun a frame (its header or its payload) and sends no byte of it for
    /// this long is disconnected, in milliseconds (0: never).
    #[serde(default = "default_caller_frame_timeout_ms")]
    pub caller_frame_timeout_ms: u64,
    /// A caller connection with nothing in flight either way (no request, no partial frame, no
    /// answer queued) that sends nothing for this long is closed, in milliseconds (0: never).
    #[serde(default = "default_caller_idle_timeout_ms")]
    pub caller_idle_timeout_ms: u64,
    /// Requests one caller connection may have in flight (accepted and not yet answered): at
    /// this many, the bridge reads nothing more from it until one is answered.
    #[serde(default = "default_caller_requests_in_flight_max")]
    pub caller_requests_in_flight_max: u32,
    /// Payload bytes the bridge may hold in memory for one caller connection's requests in
    /// flight: past this, it reads nothing more from it until some are answered (the frame
    /// that crosses the bound is taken whole).
    #[serde(default = "default_caller_bytes_in_flight_max")]
    pub caller_bytes_in_flight_max: u64,
    /// Payload bytes of requests the bridge holds in memory over all callers (waiting for a
    /// worker, running from a copy, or being received), split evenly between the cores: when
    /// a core's share is spent it reads no new request until some are answered.
    #[serde(default = "default_request_bytes_buffered_max")]
    pub request_bytes_buffered_max: u64,
    /// Answer bytes queued for callers, over all connections (split between the cores): past
    /// it, the connection with the most queued is disconnected (a caller that does not read).
    #[serde(default = "default_answer_bytes_buffered_max")]
    pub answer_bytes_buffered_max: u64,
    /// How long SIGTERM waits for requests in flight before failing them, in milliseconds.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// How long a reload waits for the new and replaced services' workers to come up before it
    /// gives up (the running config keeps serving).
    #[serde(default = "default_reload_timeout_ms")]
    pub reload_timeout_ms: u64,
    /// TCP `ip:port` of the Prometheus endpoint (`GET /metrics`); none by default. Port 0
    /// picks a free port (printed in the ready line).
    pub metrics_listen: Option<String>,
    /// Directory for HdrHistogram interval logs (`latency.hlog`); none by default.
    pub histogram_log_dir: Option<PathBuf>,
    /// Length of a latency interval: interval logs and status's "last interval".
    #[serde(default = "default_histogram_log_interval_ms")]
    pub histogram_log_interval_ms: u64,
    /// Rotate the interval log when it passes this size.
    #[serde(default = "default_histogram_log_rotate_bytes")]
    pub histogram_log_rotate_bytes: u64,
    /// File to append one line per answered request to (`access_log`); none (off) by default.
    /// Reopened on SIGUSR1; its format follows `--log-format` (docs/operations.md, "Logs").
    pub access_log: Option<PathBuf>,
    /// Path of the admin socket (`acgi-bridge status`). Default: `admin.sock` in `state_dir`.
    pub admin_socket: Option<PathBuf>,
    /// The directory a path beginning with `{runtime_dir}` names (any path key, e.g.
    /// `listen.unix`, `admin_socket`). Default: `/run/acgi-bridge` as root, `$XDG_RUNTIME_DIR/acgi-bridge`
    /// otherwise, `/tmp/acgi-bridge-UID` without `XDG_RUNTIME_DIR` ([`crate::runtime_dir`]).
    /// Created when a socket is bound there; refused when another user owns it or group or
    /// others may write it.
    #[serde(default = "crate::runtime_dir::default_dir")]
    pub runtime_dir: PathBuf,
    /// Permission bits of the admin socket, as an octal string.
    #[serde(default = "default_admin_socket_mode")]
    pub admin_socket_mode: String,
    /// Event-loop threads, one per CPU, each pinned to its CPU with its own ring, connections
    /// and shard of every pool: `"auto"` (every CPU the bridge may run on), a count `N` (the
    /// first N of those) or a list of CPU ids `[0, 2]`.
    #[serde(default)]
    pub cores: Cores,
    /// Before a core's loop sleeps, how long it keeps polling its ring, in microseconds: a
    /// wake-up to a running vCPU is much cheaper than to a halted one, so this trades CPU time
    /// for latency at light load (0 = never spin; see docs/performance.md).
    #[serde(default)]
    pub idle_spin_us: u64,
    /// Where a core's workers may run: `"any"` CPU the bridge may use, or only the `"core"`'s
    /// own CPU (beside its loop: their wake-ups stay on one vCPU). With one core, `any`.
    #[serde(default)]
    pub worker_affinity: WorkerAffinity,
    /// Buffers (4 KiB each) per core that the kernel fills for callers' multishot receives, so
    /// that an idle connection holds no read buffer; a power of two, 0 (the default: faster at
    /// saturation, see docs/performance.md) = plain receives into per-connection buffers.
    #[serde(default = "default_provided_buffers")]
    pub provided_buffers: u32,
    /// When the bridge runs as root, refuse a service without `user` (instead of a warning).
    #[serde(default)]
    pub require_user: bool,
    /// The bridge's cgroup v2 subtree (`cgroup` module): `"auto"` (default: the cgroup the
    /// bridge starts in, when it is delegated to it, e.g. systemd `Delegate=yes`), `"off"`, or
    /// the absolute path of a cgroup2 directory. Each worker runs in a cgroup of its own under
    /// its service's; where there is no subtree, a line says what is skipped.
    pub cgroup: Option<String>,
    /// Where to listen.
    pub listen: Listen,
    /// The services, at least one.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Directory of the config file; relative paths were resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was loaded from (reload reads it again); empty when parsed from text.
    #[serde(skip)]
    pub source: PathBuf,
    /// Each top-level key but `service`, as canonical TOML text: what reload compares.
    #[serde(skip)]
    pub raw_keys: BTreeMap<String, String>,
}

/// The `worker_affinity` setting (see [`Config::worker_affinity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerAffinity {
    #[default]
    Any,
    Core,
}

/// The `cores` setting (see [`Config::cores`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Cores {
    /// `"auto"`.
    #[default]
    #[serde(skip)]
    Auto,
    Count(u32),
    List(Vec<u32>),
    /// Any other string: only `"auto"` is valid (checked by `validate`).
    Named(String),
}

impl Cores {
    /// The CPUs to run one event loop on each, chosen among `allowed` (the CPUs this process
    /// may run on, ascending).
    pub fn cpus(&self, allowed: &[usize]) -> Result<Vec<usize>, String> {
        match self {
            Cores::Auto => Ok(allowed.to_vec()),
            Cores::Named(name) if name == "auto" => Ok(allowed.to_vec()),
            Cores::Named(name) => Err(format!(
                "{name:?} is not a core setting: use \"auto\", a count or a list of CPU ids"
            )),
            Cores::Count(0) => Err("must be at least 1".into()),
            Cores::Count(count) if *count as usize > allowed.len() => Err(format!(
                "{count} cores asked for but the bridge may run on {} CPUs ({allowed:?})",
                allowed.len()
            )),
            Cores::Count(count) => Ok(allowed[..*count as usize].to_vec()),
            Cores::List(ids) if ids.is_empty() => Err("the CPU list is empty".into()),
            Cores::List(ids) => {
                let mut cpus = Vec::new();
                for &id in ids {
                    let id = id as usize;
                    if !allowed.contains(&id) {
                        return Err(format!(
                            "CPU {id} is not one the bridge may run on ({allowed:?})"
                        ));
                    }
                    if cpus.contains(&id) {
                        return Err(format!("CPU {id} is listed twice"));
                    }
                    cpus.push(id);
                }
                Ok(cpus)
            }
        }
    }
}

/// Listening sockets. At least one of `unix` and `tcp` must be set.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Path of the Unix stream socket. A stale socket file at the path is replaced.
    pub unix: Option<PathBuf>,
    /// Permission bits of the Unix socket file, as an octal string (e.g. "0660").
    #[serde(default = "default_unix_mode")]
    pub unix_mode: String,
    /// Owner and group of the Unix socket (names or ids; default: the bridge's), set right
    /// after the bind: with `unix_mode = "0660"`, `unix_group` names who may call.
    pub unix_owner: Option<String>,
    pub unix_group: Option<String>,
    /// TCP `host:port` to listen on; port 0 picks a free port (printed at startup).
    pub tcp: Option<String>,
    /// Unix callers allowed, by the uid the kernel reports for them (`SO_PEERCRED`), besides
    /// `allowed_gids`; both empty (the default): anyone the socket's mode lets in.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Unix callers allowed by their primary gid (`SO_PEERCRED`).
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// TCP callers allowed, as addresses or CIDR blocks (`"10.0.0.0/8"`, `"::1"`); empty (the
    /// default): any that can reach the port.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Allow `tcp` on an address other than loopback without TLS (use `tls` for callers on
    /// other hosts): callers' requests and replies cross the network in the clear.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// TLS `host:port` to listen on (besides `unix` and `tcp`; port 0 picks a free port):
    /// TLS is terminated by the bridge's TLS threads (`engine::tls`), so the cores serve these
    /// callers as any other. Needs `tls_cert` and `tls_key`.
    pub tls: Option<String>,
    /// The server's certificate chain, PEM (the leaf first).
    pub tls_cert: Option<PathBuf>,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1); it must match `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA certificates, PEM: when set, every TLS caller must present a certificate that
    /// chains to one of them (mutual TLS), and the name it gives is its identity for the
    /// services' `allowed_tls_identities`.
    pub tls_client_ca: Option<PathBuf>,
    /// A TLS caller that has not finished its handshake this long after it connected is
    /// dropped (counted in tls_handshake_timeouts).
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// Threads terminating TLS (each accepts on the TLS listener and pumps its connections).
    #[serde(default = "default_tls_threads")]
    pub tls_threads: u32,
    /// The TLS server configuration, built from the files above when the config is loaded
    /// (`Config::load`): a bad file is a problem `check` names, not a failure at startup.
    #[serde(skip)]
    pub tls_server: Option<crate::engine::tls::ServerConfigHandle>,
}

/// One service: a pool of worker processes running `exec`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Numeric id used on the wire; unique, 1 or more.
    pub id: u32,
    /// Name callers resolve; unique, 1-64 characters of [A-Za-z0-9_.-].
    pub name: String,
    /// Worker executable.
    pub exec: PathBuf,
    /// Arguments passed to the worker.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables for the worker, set over the rest (`ACGI_*` is reserved).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Start workers with a cleared environment: only PATH (`SAFE_PATH` unless `env` sets
    /// it), the `inherit_env` names, `env` and the protocol's variables. False: the bridge's
    /// whole environment is inherited.
    #[serde(default = "default_true")]
    pub clear_env: bool,
    /// Variables copied from the bridge's environment when `clear_env` is on.
    #[serde(default)]
    pub inherit_env: Vec<String>,
    /// RLIMIT_CORE of the workers, soft and hard, in bytes (0: no core files).
    #[serde(default)]
    pub rlimit_core: u64,
    /// Unix callers that may call this service, by uid (`SO_PEERCRED`), besides
    /// `allowed_gids`; when either is set, only Unix callers that match may (TCP callers
    /// cannot prove a uid). Both empty (the default): every caller that may connect.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Unix callers that may call this service, by primary gid.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// TLS callers that may call this service, by the identity their verified client
    /// certificate gives (needs `listen.tls_client_ca`). With `allowed_uids` and
    /// `allowed_gids` it makes one list: when any is set, only callers it names may call
    /// (`engine::admission::ServiceAcl`).
    #[serde(default)]
    pub allowed_tls_identities: Vec<String>,
    /// The listeners whose callers may call this service: `"unix"`, `"tcp"`, `"tls"` (default
    /// all three).
    #[serde(default = "default_allowed_listeners")]
    pub allowed_listeners: Vec<String>,
    /// Let workers stay dumpable (core files, ptrace and /proc/PID/mem by their own user).
    #[serde(default)]
    pub dumpable: bool,
    /// The user workers run as: a name or a numeric uid (default: the bridge's own).
    pub user: Option<String>,
    /// The group workers run as: a name or a numeric gid (default: the user's primary group).
    pub group: Option<String>,
    /// The workers' working directory, entered as their user (default: the bridge's; with
    /// `chroot`, a path inside the root, default `/`).
    pub chdir: Option<PathBuf>,
    /// Run the workers with this directory as their root (chroot(2), before they change
    /// user): root-owned, not writable by group or others, and `exec` inside it (as the
    /// workers see it, `/bin/worker`, or from outside, `ROOT/bin/worker`). Canonical after
    /// [`Config::load`].
    pub chroot: Option<PathBuf>,
    /// The workers' umask, as an octal string (default: the bridge's).
    pub umask: Option<String>,
    /// RLIMIT_NOFILE of the workers, soft and hard (default: the soft limit the bridge was
    /// started with, under its hard limit).
    pub rlimit_nofile: Option<u64>,
    /// RLIMIT_AS of the workers in bytes, soft and hard (default: inherited).
    pub rlimit_as: Option<u64>,
    /// RLIMIT_NPROC of the workers, soft and hard (default: inherited). Counted per real uid:
    /// every process of the user, not per worker.
    pub rlimit_nproc: Option<u64>,
    /// The service's cgroup `memory.max`, in bytes: all its workers and their descendants
    /// together (default: no limit). Needs the memory controller in the bridge's subtree.
    pub cgroup_memory_max_bytes: Option<u64>,
    /// The service's cgroup `pids.max`: processes and threads of all its workers together.
    pub cgroup_pids_max: Option<u64>,
    /// The service's cgroup `cpu.weight` (1-10000, the kernel's default 100): its share of CPU
    /// time against the other services when the CPUs are busy.
    pub cgroup_cpu_weight: Option<u64>,
    /// The resolved user (from `user`/`group`), filled in by [`Config::load`].
    #[serde(skip)]
    pub identity: Option<crate::confine::Identity>,
    /// The executable, resolved, checked and held open by [`Config::load`].
    #[serde(skip)]
    pub exec_file: Option<crate::confine::ExecFile>,
    /// Confine the workers with a Landlock filesystem ruleset: read and execute only beneath the
    /// system's directories (`sandbox::LANDLOCK_READ_DEFAULT`), the executable and
    /// `landlock_read`; write only beneath `landlock_write` (and /dev/null).
    #[serde(default)]
    pub landlock: bool,
    #[serde(default)]
    pub landlock_read: Vec<PathBuf>,
    #[serde(default)]
    pub landlock_write: Vec<PathBuf>,
    /// With `landlock` (Landlock ABI 4+): the TCP ports the workers may bind; all others are
    /// denied (default: none).
    #[serde(default)]
    pub landlock_tcp_bind: Vec<u16>,
    /// With `landlock` (Landlock ABI 4+): the TCP ports the workers may connect to, on any
    /// address; all others are denied (default: none).
    #[serde(default)]
    pub landlock_tcp_connect: Vec<u16>,
    /// Deny the workers the dangerous system call groups (`sandbox::SECCOMP_GROUPS`) with a
    /// seccomp filter (EPERM), but those named in `seccomp_allow`.
    #[serde(default)]
    pub seccomp: bool,
    #[serde(default)]
    pub seccomp_allow: Vec<String>,
    /// The Landlock ruleset and seccomp program, built at load.
    #[serde(skip)]
    pub sandbox: Option<std::sync::Arc<crate::sandbox::Sandbox>>,
    /// Its `[[service]]` table as canonical TOML text: what reload compares.
    #[serde(skip)]
    pub raw: String,
    /// How the pool sizes itself: `static`, `dynamic` or `ondemand` (PHP-FPM's meanings).
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Workers kept running even when idle (dynamic, ondemand).
    #[serde(default = "default_min_workers")]
    pub min_workers: u32,
    /// Most workers running at once (in static mode: always running).
    #[serde(default = "default_max_workers")]
    pub max_workers: u32,
    /// Workers started with the bridge (dynamic); default: the larger of min_workers and
    /// spare_min.
    pub start_workers: Option<u32>,
    /// Idle workers kept ready (dynamic): below it the pool spawns.
    #[serde(default = "default_spare_min")]
    pub spare_min: u32,
    /// Most idle workers (dynamic): above it the longest-idle are stopped each second.
    #[serde(default = "default_spare_max")]
    pub spare_max: u32,
    /// Fastest growth, in spawns per second; a burst ramps 1, 2, 4, ... up to it.
    #[serde(default = "default_spawn_rate_max")]
    pub spawn_rate_max: u32,
    /// Idle workers above the spare/min floor are stopped after this long idle.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Recycle a worker after this many requests; 0 = never.
    #[serde(default)]
    pub max_requests: u64,
    /// Add a random 0..=this to each worker's max_requests, so a pool does not recycle at once.
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// Recycle a worker this long after it started; 0 = never.
    #[serde(default)]
    pub max_lifetime_ms: u64,
    /// Recycle a worker whose resident memory is over this after a request; 0 = never.
    #[serde(default)]
    pub max_rss_bytes: u64,
    /// Lines of its workers' stdout and stderr the bridge logs per second (per core, in bursts
    /// of up to twice this); further lines are dropped, counted, and summed up in a
    /// "suppressed N lines" line. 0 = no limit.
    #[serde(default = "default_log_lines_per_second")]
    pub log_lines_per_second: u32,
    /// A request running longer is answered `timed out` and its worker replaced; 0 = never.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A request still running this long after a worker took it is logged once at WARN (the
    /// slow log: request id, worker pid, elapsed, caller), in milliseconds; 0 (default) = off.
    #[serde(default)]
    pub request_slowlog_timeout_ms: u64,
    /// A new worker that has not finished its handshake by then is killed (a failed start).
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    /// Between SIGTERM and SIGKILL when stopping a worker.
    #[serde(default = "default_kill_grace_ms")]
    pub kill_grace_ms: u64,
    /// Crashes or failed starts within crash_window_ms that turn the service `failing`.
    #[serde(default = "default_crash_limit")]
    pub crash_limit: u32,
    #[serde(default = "default_crash_window_ms")]
    pub crash_window_ms: u64,
    /// Longest wait between restart attempts of a failing service (the backoff doubles from
    /// 100 ms up to this).
    #[serde(default = "default_restart_backoff_max_ms")]
    pub restart_backoff_max_ms: u64,
    /// Data bytes of each worker's shared-memory slot; larger payloads take the copy path.
    #[serde(default = "default_slot_size_bytes")]
    pub slot_size_bytes: u32,
    /// Requests waiting for a worker before new ones get `overloaded`.
    #[serde(default = "default_backlog_max")]
    pub backlog_max: u32,
    /// A request waiting longer than this for a worker gets `overloaded`; 0 = no limit.
    #[serde(default)]
    pub backlog_timeout_ms: u64,
    /// Jobs a worker may hold at once when it accepts queued jobs (the Rust SDK does): the
    /// first in its slot, the rest queued on its socket, so that a busy worker takes its next
    /// job without sleeping. 1 = one job at a time.
    #[serde(default = "default_worker_queue_depth")]
    pub worker_queue_depth: u32,
}

/// The PATH a worker gets when its environment is cleared and its service sets none.
pub const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl ServiceConfig {
    /// The PATH this service's workers run with, and their `exec` is looked up on: the
    /// service's `env.PATH`, else [`SAFE_PATH`] with `clear_env`, else the bridge's own.
    pub fn worker_path(&self) -> std::ffi::OsString {
        if let Some(path) = self.env.get("PATH") {
            return path.into();
        }
        if self.clear_env {
            return SAFE_PATH.into();
        }
        std::env::var_os("PATH").unwrap_or_else(|| SAFE_PATH.into())
    }

    /// The `umask` key's bits (validated by [`Config::problems`]).
    pub fn umask_bits(&self) -> Option<u32> {
        self.umask.as_deref().and_then(parse_mode)
    }

    /// The pool policy this service's keys describe.
    pub fn policy(&self) -> Policy {
        let optional = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Policy {
            mode: self.mode,
            min_workers: if self.mode == Mode::Static {
                self.max_workers
            } else {
                self.min_workers
            },
            max_workers: self.max_workers,
            start_workers: self
                .start_workers
                .unwrap_or(self.min_workers.max(self.spare_min))
                .min(self.max_workers),
            spare_min: self.spare_min.min(self.spare_max),
            spare_max: self.spare_max,
            spawn_rate_max: self.spawn_rate_max,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_requests: self.max_requests,
            max_requests_jitter: self.max_requests_jitter,
            max_lifetime: optional(self.max_lifetime_ms),
            max_rss_bytes: (self.max_rss_bytes > 0).then_some(self.max_rss_bytes),
            request_timeout: optional(self.request_timeout_ms),
            startup_timeout: Duration::from_millis(self.startup_timeout_ms),
            kill_grace: Duration::from_millis(self.kill_grace_ms),
            crash_limit: self.crash_limit,
            crash_window: Duration::from_millis(self.crash_window_ms),
            restart_backoff_max: Duration::from_millis(self.restart_backoff_max_ms),
            backlog_max: self.backlog_max,
            backlog_timeout: optional(self.backlog_timeout_ms),
            queue_depth: self.worker_queue_depth,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_provided_buffers() -> u32 {
    0
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_max_payload_bytes() -> u32 {
    PAYLOAD_BYTES_MAX_DEFAULT
}
fn default_write_queue_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_connections_max() -> u32 {
    10_000
}
fn default_log_lines_per_second() -> u32 {
    100
}
fn default_allowed_listeners() -> Vec<String> {
    vec!["unix".into(), "tcp".into(), "tls".into()]
}
fn default_tls_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_tls_threads() -> u32 {
    1
}
fn default_unix_connections_reserved() -> u32 {
    1_000
}
fn default_connections_per_uid_max() -> u32 {
    5_000
}
fn default_connections_per_ip_max() -> u32 {
    1_000
}
fn default_caller_requests_in_flight_max() -> u32 {
    1024
}
fn default_caller_bytes_in_flight_max() -> u64 {
    64 * 1024 * 1024
}
fn default_answer_bytes_buffered_max() -> u64 {
    1 << 30
}
fn default_request_bytes_buffered_max() -> u64 {
    1024 * 1024 * 1024
}
fn default_caller_frame_timeout_ms() -> u64 {
    10_000
}
fn default_caller_idle_timeout_ms() -> u64 {
    600_000
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_reload_timeout_ms() -> u64 {
    30_000
}
fn default_worker_queue_depth() -> u32 {
    1
}
fn default_histogram_log_interval_ms() -> u64 {
    10_000
}
fn default_histogram_log_rotate_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_admin_socket_mode() -> String {
    "0600".to_string()
}
fn default_mode() -> Mode {
    Mode::Dynamic
}
fn default_spare_min() -> u32 {
    1
}
fn default_spare_max() -> u32 {
    4
}
fn default_spawn_rate_max() -> u32 {
    32
}
fn default_idle_timeout_ms() -> u64 {
    10_000
}
fn default_request_timeout_ms() -> u64 {
    60_000
}
fn default_crash_limit() -> u32 {
    5
}
fn default_crash_window_ms() -> u64 {
    10_000
}
fn default_restart_backoff_max_ms() -> u64 {
    30_000
}
fn default_kill_grace_ms() -> u64 {
    5_000
}
fn default_startup_timeout_ms() -> u64 {
    10_000
}
fn default_unix_mode() -> String {
    "0660".to_string()
}
fn default_min_workers() -> u32 {
    1
}
fn default_max_workers() -> u32 {
    8
}
fn default_slot_size_bytes() -> u32 {
    SLOT_CAPACITY_BYTES_DEFAULT
}
fn default_backlog_max() -> u32 {
    1024
}

/// One problem with a config: the key and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Highest value accepted for `max_workers` of one service.
pub const WORKERS_MAX_PER_SERVICE: u32 = 4096;
/// Longest duration accepted for any `*_ms` key: one day.
pub const DURATION_MS_MAX: u64 = 86_400_000;
/// Lowest `rlimit_as` accepted: 16 MiB.
pub const RLIMIT_AS_MIN_BYTES: u64 = 16 << 20;
/// Highest value accepted for `listen.tls_threads`.
pub const TLS_THREADS_MAX: u32 = 64;
/// Longest service name (1 to this many of `[A-Za-z0-9_.-]`), which callers resolve.
pub const SERVICE_NAME_BYTES_MAX: usize = 64;
/// Highest value accepted for `backlog_max`.
pub const BACKLOG_MAX_CEILING: u32 = 1 << 20;

impl Config {
    /// Whether any service has the slow log on (`request_slowlog_timeout_ms` > 0).
    pub fn slowlog_enabled(&self) -> bool {
        self.services
            .iter()
            .any(|service| service.request_slowlog_timeout_ms > 0)
    }

    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base_dir = if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir
        };
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.resolve_paths(&base_dir);
        config.source = path.to_path_buf();
        let mut problems = config.problems();
        if problems.is_empty() {
            problems = config.resolve_services();
            problems.extend(config.load_tls());
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Parse TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        let error = |e: toml::de::Error| e.to_string().trim_end().to_string();
        let mut config: Config = toml::from_str(text).map_err(error)?;
        let table: toml::Table = toml::from_str(text).map_err(error)?;
        for (key, value) in &table {
            if key == "service" {
                let tables = value.as_array().map(Vec::as_slice).unwrap_or_default();
                for (service, table) in config.services.iter_mut().zip(tables) {
                    service.raw = reload::canonical(table);
                }
            } else {
                config
                    .raw_keys
                    .insert(key.clone(), reload::canonical(value));
            }
        }
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |path: &Path| -> PathBuf {
            if path.is_absolute() {
                path.to_path_buf()
            } else {
                base_dir.join(path)
            }
        };
        self.base_dir = base_dir.to_path_buf();
        self.runtime_dir = resolve(&self.runtime_dir);
        let runtime_dir = self.runtime_dir.clone();
        // Every other path: `{runtime_dir}/...` first, then relative to the config file.
        let resolve = |path: &Path| -> PathBuf {
            crate::runtime_dir::expand(path, &runtime_dir).unwrap_or_else(|| resolve(path))
        };
        self.state_dir = resolve(&self.state_dir);
        if let Some(admin) = &self.admin_socket {
            self.admin_socket = Some(resolve(admin));
        }
        if let Some(path) = &self.access_log {
            self.access_log = Some(resolve(path));
        }
        if let Some(dir) = &self.histogram_log_dir {
            self.histogram_log_dir = Some(resolve(dir));
        }
        if let Some(unix) = &self.listen.unix {
            self.listen.unix = Some(resolve(unix));
        }
        for file in [
            &mut self.listen.tls_cert,
            &mut self.listen.tls_key,
            &mut self.listen.tls_client_ca,
        ] {
            if let Some(path) = file.as_deref() {
                *file = Some(resolve(path));
            }
        }
        for service in &mut self.services {
            for path in service
                .landlock_read
                .iter_mut()
                .chain(service.landlock_write.iter_mut())
            {
                *path = resolve(path);
            }
            // A bare command name (no slash) is left for PATH lookup, like a shell does.
            if service.exec.components().count() > 1 || service.exec.starts_with(".") {
                service.exec = resolve(&service.exec);
            }
        }
    }

    /// Resolve each service's identity and open its executable (checking it is trusted):
    /// what `load` does once the config is otherwise valid. Returns the problems found.
    pub fn resolve_services(&mut self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let bridge_uid = rustix::process::geteuid().as_raw();
        for (index, service) in self.services.iter_mut().enumerate() {
            let key = |field: &str| format!("service[{index}].{field}");
            service.identity = match &service.user {
                Some(user) => {
                    match crate::confine::resolve_identity(user, service.group.as_deref()) {
                        Ok(identity) => Some(identity),
                        Err(reason) => {
                            problems.push(Problem {
                                key: key("user"),
                                reason,
                            });
                            continue;
                        }
                    }
                }
                None => None,
            };
            if let Some(identity) = &service.identity {
                let bridge_gid = rustix::process::getegid().as_raw();
                let changes = identity.uid != bridge_uid || identity.gid != bridge_gid;
                let may = crate::confine::has_capability(crate::confine::CAP_SETUID)
                    && crate::confine::has_capability(crate::confine::CAP_SETGID);
                if changes && !may {
                    problems.push(Problem {
                        key: key("user"),
                        reason: format!(
                            "running workers as {} (uid {}, gid {}) needs the bridge to run as \
                             root or with CAP_SETUID and CAP_SETGID; it runs as uid {bridge_uid}",
                            identity.user, identity.uid, identity.gid
                        ),
                    });
                }
            }
            let owner = service.identity.as_ref().map_or(bridge_uid, |i| i.uid);
            let path = service.worker_path();
            let path = path.to_string_lossy();
            let opened = match &service.chroot {
                Some(root) => match crate::confine::check_chroot(root) {
                    Ok(root) => {
                        let opened =
                            crate::confine::open_exec_in(&root, &service.exec, &path, owner);
                        service.chroot = Some(root);
                        opened
                    }
                    Err(reason) => {
                        problems.push(Problem {
                            key: key("chroot"),
                            reason,
                        });
                        continue;
                    }
                },
                None => crate::confine::open_exec(&service.exec, &path, owner),
            };
            match opened {
                Ok(file) => service.exec_file = Some(file),
                Err(reason) => problems.push(Problem {
                    key: key("exec"),
                    reason,
                }),
            }
            if let Some(exec) = &service.exec_file {
                let wanted = crate::sandbox::Wanted {
                    landlock: service.landlock,
                    landlock_read: &service.landlock_read,
                    landlock_write: &service.landlock_write,
                    exec: &exec.path,
                    seccomp: service.seccomp,
                    seccomp_allow: &service.seccomp_allow,
                    tcp_bind: &service.landlock_tcp_bind,
                    tcp_connect: &service.landlock_tcp_connect,
                };
                match crate::sandbox::build(&wanted) {
                    Ok(sandbox) => service.sandbox = Some(std::sync::Arc::new(sandbox)),
                    Err(reason) => problems.push(Problem {
                        key: key(if reason.starts_with("seccomp") {
                            "seccomp_allow"
                        } else {
                            "landlock_read"
                        }),
                        reason,
                    }),
                }
            }
        }
        if self.require_user && bridge_uid == 0 {
            problems.extend(self.root_services().into_iter().map(|index| {
                Problem {
                    key: format!("service[{index}].user"),
                    reason: "require_user is set and the bridge runs as root: set `user` so that \
                         this service's workers do not run as root"
                        .into(),
                }
            }));
        }
        problems
    }

    /// Read `listen.tls_cert`, `tls_key` and `tls_client_ca` and build the TLS server
    /// configuration from them (what `load` does once the config is otherwise valid): a
    /// missing or unreadable file, one with no certificate or key in it, or a key that does
    /// not match the certificate, is a problem naming its key.
    pub fn load_tls(&mut self) -> Vec<Problem> {
        if self.listen.tls.is_none() {
            return Vec::new();
        }
        match crate::engine::tls::server_config(&self.listen) {
            Ok(handle) => {
                self.listen.tls_server = Some(handle);
                Vec::new()
            }
            Err((key, reason)) => vec![Problem {
                key: key.into(),
                reason,
            }],
        }
    }

    /// The services whose workers would run as root (the bridge runs as root and they set
    /// no `user`).
    pub fn root_services(&self) -> Vec<usize> {
        if !rustix::process::geteuid().is_root() {
            return Vec::new();
        }
        (0..self.services.len())
            .filter(|&index| self.services[index].user.is_none())
            .collect()
    }

    /// What is allowed but unsafe, each naming its key (`check` prints them, `serve` logs them).
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings: Vec<Problem> = self
            .root_services()
            .into_iter()
            .map(|index| Problem {
                key: format!("service[{index}].user"),
                reason: format!(
                    "service {} has no `user` and the bridge runs as root: its workers run as \
                     root (set `user`, or `require_user = true` to refuse this)",
                    self.services[index].name
                ),
            })
            .collect();
        for (index, service) in self.services.iter().enumerate() {
            let skipped = service.sandbox.iter().flat_map(|s| s.skipped.iter());
            for note in skipped {
                warnings.push(Problem {
                    key: format!("service[{index}]"),
                    reason: format!("service {}: {note}", service.name),
                });
            }
        }
        warnings.extend(
            crate::cgroup::notes(self)
                .into_iter()
                .map(|reason| Problem {
                    key: "cgroup".into(),
                    reason,
                }),
        );
        let exposed = |addr: &str| {
            addr.parse::<std::net::SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        };
        if self.metrics_listen.as_deref().is_some_and(exposed) {
            warnings.push(Problem {
                key: "metrics_listen".into(),
                reason: "is reachable from other hosts: anyone who can reach it reads the \
                         service names, rates and latencies (and /readyz), without \
                         authentication"
                    .into(),
            });
        }
        if self.listen.insecure_plaintext
            && self.listen.tcp.as_deref().is_some_and(exposed)
            && self.listen.allowed_clients.is_empty()
        {
            warnings.push(Problem {
                key: "listen.allowed_clients".into(),
                reason: "is empty while listen.tcp is reachable from other hosts in plaintext: \
                         any host that reaches the port may call every service"
                    .into(),
            });
        }
        warnings
    }

    /// Every problem in the config, each naming its key.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, reason: String| problems.push(Problem { key, reason });
        if self.max_payload_bytes == 0 || self.max_payload_bytes > PAYLOAD_BYTES_MAX_CEILING {
            problem(
                "max_payload_bytes".into(),
                format!("must be between 1 and {PAYLOAD_BYTES_MAX_CEILING}"),
            );
        }
        let frame_bytes_max = self.max_payload_bytes as u64 + crate::proto::HEADER_BYTES as u64;
        if self.write_queue_max_bytes < frame_bytes_max {
            problem(
                "write_queue_max_bytes".into(),
                format!("must hold at least one whole answer ({frame_bytes_max} bytes)"),
            );
        }
        if self.reload_timeout_ms == 0 {
            problem(
                "reload_timeout_ms".into(),
                "must be at least 1 (a reload waits that long for new workers)".into(),
            );
        }
        if self.provided_buffers != 0
            && (!self.provided_buffers.is_power_of_two() || self.provided_buffers > 32_768)
        {
            problem(
                "provided_buffers".into(),
                "must be 0 or a power of two up to 32768".into(),
            );
        }
        if self.idle_spin_us > 10_000 {
            problem(
                "idle_spin_us".into(),
                "must be 0 to 10000 microseconds".into(),
            );
        }
        if let Err(reason) = self.cores.cpus(&allowed_cpus()) {
            problem("cores".into(), reason);
        }
        if self.connections_max == 0 {
            problem("connections_max".into(), "must be at least 1".into());
        }
        if self.listen.unix.is_some()
            && self.listen.tcp.is_some()
            && self.unix_connections_reserved >= self.connections_max
        {
            problem(
                "unix_connections_reserved".into(),
                format!(
                    "must be under connections_max ({}), or TCP callers could never connect",
                    self.connections_max
                ),
            );
        }
        for (key, value) in [
            ("connections_per_uid_max", self.connections_per_uid_max),
            ("connections_per_ip_max", self.connections_per_ip_max),
            (
                "caller_requests_in_flight_max",
                self.caller_requests_in_flight_max,
            ),
        ] {
            if value == 0 {
                problem(key.into(), "must be at least 1".into());
            }
        }
        for (key, value) in [
            (
                "caller_bytes_in_flight_max",
                self.caller_bytes_in_flight_max,
            ),
            (
                "request_bytes_buffered_max",
                self.request_bytes_buffered_max,
            ),
            ("answer_bytes_buffered_max", self.answer_bytes_buffered_max),
        ] {
            if value < u64::from(self.max_payload_bytes) {
                problem(
                    key.into(),
                    format!(
                        "must be at least max_payload_bytes ({}), or a request of that size \
                         could wait for ever",
                        self.max_payload_bytes
                    ),
                );
            }
        }
        if self.listen.unix.is_none() && self.listen.tcp.is_none() && self.listen.tls.is_none() {
            problem(
                "listen".into(),
                "set at least one of listen.unix, listen.tcp and listen.tls".into(),
            );
        }
        if let Some(tls) = &self.listen.tls {
            if tls.parse::<std::net::SocketAddr>().is_err() {
                problem(
                    "listen.tls".into(),
                    format!("{tls:?} is not an ip:port address like \"0.0.0.0:7879\""),
                );
            }
            for (key, file) in [
                ("listen.tls_cert", &self.listen.tls_cert),
                ("listen.tls_key", &self.listen.tls_key),
            ] {
                if file.is_none() {
                    problem(
                        key.into(),
                        "must be set with listen.tls (a PEM file)".into(),
                    );
                }
            }
            if !(1..=DURATION_MS_MAX).contains(&self.listen.tls_handshake_timeout_ms) {
                problem(
                    "listen.tls_handshake_timeout_ms".into(),
                    format!("must be 1 to {DURATION_MS_MAX} ms"),
                );
            }
            if !(1..=TLS_THREADS_MAX).contains(&self.listen.tls_threads) {
                problem(
                    "listen.tls_threads".into(),
                    format!("must be 1 to {TLS_THREADS_MAX}"),
                );
            }
        }
        if let Some(addr) = &self.metrics_listen {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                problem(
                    "metrics_listen".into(),
                    format!("{addr:?} is not an ip:port address like \"127.0.0.1:9464\""),
                );
            }
        }
        if !(100..=DURATION_MS_MAX).contains(&self.histogram_log_interval_ms) {
            problem(
                "histogram_log_interval_ms".into(),
                format!("must be 100 to {DURATION_MS_MAX} ms"),
            );
        }
        if self.histogram_log_rotate_bytes < 4096 {
            problem(
                "histogram_log_rotate_bytes".into(),
                "must be at least 4096".into(),
            );
        }
        if parse_mode(&self.admin_socket_mode).is_none() {
            problem(
                "admin_socket_mode".into(),
                format!(
                    "{:?} is not an octal permission like \"0600\"",
                    self.admin_socket_mode
                ),
            );
        }
        if let Some(owner) = &self.listen.unix_owner {
            if let Err(reason) = crate::confine::user_id(owner) {
                problem("listen.unix_owner".into(), reason);
            }
        }
        if let Some(group) = &self.listen.unix_group {
            if let Err(reason) = crate::confine::group_id(group) {
                problem("listen.unix_group".into(), reason);
            }
        }
        if parse_mode(&self.listen.unix_mode).is_none() {
            problem(
                "listen.unix_mode".into(),
                format!(
                    "{:?} is not an octal permission like \"0660\"",
                    self.listen.unix_mode
                ),
            );
        }
        if let Some(tcp) = &self.listen.tcp {
            match tcp.parse::<std::net::SocketAddr>() {
                Err(_) => problem(
                    "listen.tcp".into(),
                    format!("{tcp:?} is not an ip:port address like \"127.0.0.1:7878\""),
                ),
                Ok(addr) if !addr.ip().is_loopback() && !self.listen.insecure_plaintext => problem(
                    "listen.tcp".into(),
                    format!(
                        "{tcp:?} is reachable from other hosts in plaintext: callers' \
                             payloads would cross the network in the clear; serve other hosts \
                             on listen.tls, listen on loopback, or set \
                             listen.insecure_plaintext = true (and listen.allowed_clients) if \
                             the network is trusted"
                    ),
                ),
                Ok(_) => {}
            }
        }
        for (index, client) in self.listen.allowed_clients.iter().enumerate() {
            if let Err(reason) = crate::engine::admission::IpNet::parse(client) {
                problem(format!("listen.allowed_clients[{index}]"), reason);
            }
        }
        if self.services.is_empty() {
            problem("service".into(), "define at least one [[service]]".into());
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for (index, service) in self.services.iter().enumerate() {
            let key = |field: &str| format!("service[{index}].{field}");
            if service.id == 0 {
                problem(
                    key("id"),
                    "must be 1 or more (0 means no service on the wire)".into(),
                );
            }
            for listener in &service.allowed_listeners {
                if listener != "unix" && listener != "tcp" && listener != "tls" {
                    problem(
                        key("allowed_listeners"),
                        format!("{listener:?} is not a listener: use \"unix\", \"tcp\" or \"tls\""),
                    );
                }
            }
            if !service.allowed_tls_identities.is_empty() && self.listen.tls_client_ca.is_none() {
                problem(
                    key("allowed_tls_identities"),
                    "needs listen.tls_client_ca: without client certificates no TLS caller has \
                     an identity"
                        .into(),
                );
            }
            if !ids.insert(service.id) {
                problem(
                    key("id"),
                    format!("{} is used by another service", service.id),
                );
            }
            if service.name.is_empty()
                || service.name.len() > SERVICE_NAME_BYTES_MAX
                || !service
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                problem(
                    key("name"),
                    format!(
                        "{:?} must be 1-{SERVICE_NAME_BYTES_MAX} of [A-Za-z0-9_.-]",
                        service.name
                    ),
                );
            }
            if !names.insert(service.name.clone()) {
                problem(
                    key("name"),
                    format!("{:?} is used by another service", service.name),
                );
            }
            // (With `chroot`, exec is looked for inside the root, by `resolve_services`.)
            if service.chroot.is_none() {
                if let Err(reason) = check_executable(&service.exec, &service.worker_path()) {
                    problem(key("exec"), reason);
                }
            }
            if service.max_workers == 0 || service.max_workers > WORKERS_MAX_PER_SERVICE {
                problem(
                    key("max_workers"),
                    format!("must be 1 to {WORKERS_MAX_PER_SERVICE}"),
                );
            }
            if service.min_workers > service.max_workers {
                problem(
                    key("min_workers"),
                    format!(
                        "{} is over max_workers ({})",
                        service.min_workers, service.max_workers
                    ),
                );
            }
            let start = service.start_workers.unwrap_or(service.min_workers);
            if service.mode == Mode::Dynamic
                && (start < service.min_workers || start > service.max_workers)
            {
                problem(
                    key("start_workers"),
                    format!(
                        "{start} must be between min_workers ({}) and max_workers ({})",
                        service.min_workers, service.max_workers
                    ),
                );
            }
            if service.spare_min > service.spare_max {
                problem(
                    key("spare_min"),
                    format!(
                        "{} is over spare_max ({})",
                        service.spare_min, service.spare_max
                    ),
                );
            }
            if service.spare_min > service.max_workers {
                problem(
                    key("spare_min"),
                    format!(
                        "{} is over max_workers ({})",
                        service.spare_min, service.max_workers
                    ),
                );
            }
            if service.spawn_rate_max == 0 || service.spawn_rate_max > 1024 {
                problem(
                    key("spawn_rate_max"),
                    "must be 1 to 1024 spawns per second".into(),
                );
            }
            if service.worker_queue_depth == 0 || service.worker_queue_depth > 64 {
                problem(key("worker_queue_depth"), "must be 1 to 64".into());
            }
            if service.crash_limit == 0 {
                problem(key("crash_limit"), "must be at least 1".into());
            }
            for (name, value, min) in [
                ("idle_timeout_ms", service.idle_timeout_ms, 1),
                ("max_lifetime_ms", service.max_lifetime_ms, 0),
                ("request_timeout_ms", service.request_timeout_ms, 0),
                ("startup_timeout_ms", service.startup_timeout_ms, 1),
                ("kill_grace_ms", service.kill_grace_ms, 0),
                ("crash_window_ms", service.crash_window_ms, 1),
                (
                    "restart_backoff_max_ms",
                    service.restart_backoff_max_ms,
                    100,
                ),
                ("backlog_timeout_ms", service.backlog_timeout_ms, 0),
            ] {
                if value < min || value > DURATION_MS_MAX {
                    problem(key(name), format!("must be {min} to {DURATION_MS_MAX} ms"));
                }
            }
            if service.slot_size_bytes < SLOT_CAPACITY_BYTES_MIN
                || service.slot_size_bytes > self.max_payload_bytes.max(SLOT_CAPACITY_BYTES_MIN)
            {
                problem(
                    key("slot_size_bytes"),
                    format!(
                        "must be between {SLOT_CAPACITY_BYTES_MIN} and max_payload_bytes ({})",
                        self.max_payload_bytes
                    ),
                );
            }
            if service.backlog_max > BACKLOG_MAX_CEILING {
                problem(
                    key("backlog_max"),
                    format!("must be at most {BACKLOG_MAX_CEILING}"),
                );
            }
            if let Some(umask) = &service.umask {
                if parse_mode(umask).is_none_or(|bits| bits > 0o777) {
                    problem(
                        key("umask"),
                        format!("{umask:?} is not an octal umask like \"0027\""),
                    );
                }
            }
            if let Some(dir) = &service.chdir {
                if !dir.is_absolute() {
                    problem(key("chdir"), "must be an absolute path".into());
                }
            }
            if let Some(reason) = crate::confine::chroot_problem(service.chroot.as_deref()) {
                problem(key("chroot"), reason);
            }
            for (field, ports) in [
                ("landlock_tcp_bind", &service.landlock_tcp_bind),
                ("landlock_tcp_connect", &service.landlock_tcp_connect),
            ] {
                if !ports.is_empty() && !service.landlock {
                    problem(key(field), "needs `landlock = true`".into());
                }
            }
            if service.group.is_some() && service.user.is_none() {
                problem(key("group"), "needs `user` as well".into());
            }
            for name in &service.inherit_env {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    problem(
                        key("inherit_env"),
                        format!("{name:?} is not a valid variable name"),
                    );
                }
                if name.starts_with("ACGI_") {
                    problem(
                        key("inherit_env"),
                        format!("{name} is reserved for the bridge"),
                    );
                }
            }
            for (name, value) in [
                ("rlimit_nofile", service.rlimit_nofile),
                ("rlimit_nproc", service.rlimit_nproc),
            ] {
                if value == Some(0) {
                    problem(key(name), "must be at least 1".into());
                }
            }
            if service
                .rlimit_as
                .is_some_and(|bytes| bytes < RLIMIT_AS_MIN_BYTES)
            {
                problem(
                    key("rlimit_as"),
                    format!(
                        "must be at least {RLIMIT_AS_MIN_BYTES} bytes (no worker starts below)"
                    ),
                );
            }
            for name in service.env.keys() {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    problem(key("env"), format!("{name:?} is not a valid variable name"));
                }
                if name.starts_with("ACGI_") {
                    problem(key("env"), format!("{name} is reserved for the bridge"));
                }
            }
            for (field, reason) in crate::cgroup::service_problems(service) {
                problem(key(field), reason);
            }
        }
        if let Some(reason) = crate::cgroup::setting_problem(self.cgroup.as_deref()) {
            problem("cgroup".into(), reason);
        }
        problems
    }

    /// Where the admin socket lives.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.sock"))
    }

    pub fn service_by_id(&self, id: u32) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.id == id)
    }
}

/// Parse an octal permission string such as "0660" or "660".
/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&cpu| set.is_set(cpu))
            .collect(),
        Err(_) => vec![0],
    }
}

pub fn parse_mode(text: &str) -> Option<u32> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8).ok()?;
    (mode <= 0o7777).then_some(mode)
}

/// Is `exec` something we can start? Bare names are looked up on PATH.
fn check_executable(exec: &Path, path: &std::ffi::OsStr) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<PathBuf> = if exec.components().count() > 1 || exec.is_absolute() {
        vec![exec.to_path_buf()]
    } else {
        std::env::split_paths(path)
            .map(|dir| dir.join(exec))
            .collect()
    };
    for candidate in &candidates {
        if let Ok(meta) = std::fs::metadata(candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(());
            }
            if candidates.len() == 1 {
                return Err(format!("{} is not an executable file", candidate.display()));
            }
        }
    }
    if candidates.len() == 1 {
        Err(format!("{} does not exist", exec.display()))
    } else {
        Err(format!(
            "{} is not found on the workers' PATH ({})",
            exec.display(),
            path.to_string_lossy()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> String {
        r#"
            [listen]
            unix = "/tmp/x.sock"
            [[service]]
            id = 1
            name = "echo"
            exec = "/bin/cat"
        "#
        .to_string()
    }

    #[test]
    fn minimal_config_takes_documented_defaults() {
        // Proves every default matches the README's config reference.
        let config = Config::parse(&minimal()).unwrap();
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let service = &config.services[0];
        assert_eq!(config.max_payload_bytes, 16 * 1024 * 1024);
        assert_eq!(config.write_queue_max_bytes, 64 * 1024 * 1024);
        assert_eq!(config.connections_max, 10_000);
        assert_eq!(config.shutdown_timeout_ms, 30_000);
        assert_eq!(config.caller_frame_timeout_ms, 10_000);
        assert_eq!(config.caller_idle_timeout_ms, 600_000);
        assert_eq!(config.admin_socket_mode, "0600");
        assert_eq!(service.mode, Mode::Dynamic);
        assert_eq!(service.start_workers, None);
        assert_eq!((service.spare_min, service.spare_max), (1, 4));
        assert_eq!(service.spawn_rate_max, 32);
        assert_eq!(service.idle_timeout_ms, 10_000);
        assert_eq!((service.max_requests, service.max_requests_jitter), (0, 0));
        assert_eq!((service.max_lifetime_ms, service.max_rss_bytes), (0, 0));
        assert_eq!(service.request_timeout_ms, 60_000);
        assert_eq!(service.kill_grace_ms, 5_000);
        assert_eq!(service.startup_timeout_ms, 10_000);
        assert_eq!((service.crash_limit, service.crash_window_ms), (5, 10_000));
        assert_eq!(service.restart_backoff_max_ms, 30_000);
        assert_eq!(service.backlog_timeout_ms, 0);
        assert_eq!(config.listen.unix_mode, "0660");
        assert_eq!(service.min_workers, 1);
        assert_eq!(service.max_workers, 8);
        assert_eq!(service.slot_size_bytes, 65536);
        assert_eq!(service.backlog_max, 1024);
        assert_eq!(config.cores, Cores::Auto);
        assert_eq!(config.provided_buffers, 0);
        assert_eq!(config.access_log, None);
        assert_eq!(service.request_slowlog_timeout_ms, 0);
        assert!(!config.slowlog_enabled());
        assert_eq!(config.idle_spin_us, 0);
        assert_eq!(config.worker_affinity, WorkerAffinity::Any);
        // The worker boundary's keys (docs/security.md).
        assert!(!config.require_user);
        assert!(service.clear_env && service.inherit_env.is_empty());
        assert_eq!((service.rlimit_core, service.dumpable), (0, false));
        assert_eq!((&service.user, &service.group), (&None, &None));
        assert_eq!((&service.chdir, &service.umask), (&None, &None));
        assert_eq!(
            (
                service.rlimit_nofile,
                service.rlimit_as,
                service.rlimit_nproc
            ),
            (None, None, None)
        );
        assert_eq!(service.worker_path(), SAFE_PATH);
    }

    #[test]
    fn bad_identity_keys_are_named() {
        // Proves the identity keys' validation: a bad umask, a relative chdir, a group without
        // a user, a reserved inherit_env name, zero limits, and an unknown user at load.
        let text = minimal()
            + "umask = \"0999\"\nchdir = \"rel\"\ngroup = \"root\"\n\
               inherit_env = [\"ACGI_X\"]\nrlimit_nofile = 0\nrlimit_as = 1\n";
        let keys: Vec<String> = Config::parse(&text)
            .unwrap()
            .problems()
            .into_iter()
            .map(|p| p.key)
            .collect();
        for key in [
            "umask",
            "chdir",
            "group",
            "inherit_env",
            "rlimit_nofile",
            "rlimit_as",
        ] {
            assert!(
                keys.contains(&format!("service[0].{key}")),
                "{key}: {keys:?}"
            );
        }
        let mut config = Config::parse(&(minimal() + "user = \"no-such-user-here\"\n")).unwrap();
        let problems = config.resolve_services();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "service[0].user");
        assert!(
            problems[0].reason.contains("no-such-user-here"),
            "{problems:?}"
        );
    }

    #[test]
    fn cores_take_auto_a_count_or_a_list_and_name_what_is_wrong() {
        // Proves the three forms of `cores` and that each impossible setting names the reason.
        let allowed = [0, 1, 2, 3];
        let cores = |line: &str| {
            Config::parse(&format!("{line}\n{}", minimal()))
                .unwrap()
                .cores
        };
        assert_eq!(cores("").cpus(&allowed).unwrap(), [0, 1, 2, 3]);
        assert_eq!(
            cores("cores = \"auto\"").cpus(&allowed).unwrap(),
            [0, 1, 2, 3]
        );
        assert_eq!(cores("cores = 2").cpus(&allowed).unwrap(), [0, 1]);
        assert_eq!(cores("cores = [3, 1]").cpus(&allowed).unwrap(), [3, 1]);
        let error = |line: &str| cores(line).cpus(&allowed).unwrap_err();
        assert!(error("cores = 0").contains("at least 1"));
        assert!(error("cores = 5").contains("may run on 4 CPUs"));
        assert!(error("cores = [7]").contains("CPU 7"));
        assert!(error("cores = [1, 1]").contains("twice"));
        assert!(error("cores = []").contains("empty"));
        assert!(error("cores = \"all\"").contains("\"all\""));
        let pinned = Config::parse(&format!("worker_affinity = \"core\"\n{}", minimal())).unwrap();
        assert_eq!(pinned.worker_affinity, WorkerAffinity::Core);
        assert!(Config::parse(&format!("worker_affinity = \"cpu0\"\n{}", minimal())).is_err());
        let buffers = Config::parse(&format!("provided_buffers = 1000\n{}", minimal())).unwrap();
        assert!(buffers
            .problems()
            .iter()
            .any(|p| p.key == "provided_buffers"));
        let spin = Config::parse(&format!("idle_spin_us = 20000\n{}", minimal())).unwrap();
        assert!(spin.problems().iter().any(|p| p.key == "idle_spin_us"));
    }

    #[test]
    fn unknown_key_is_named() {
        // Proves a typo is an error naming the key, not a silently ignored line.
        let text = minimal() + "max_wrokers = 3\n";
        let error = Config::parse(&text).unwrap_err();
        assert!(error.contains("max_wrokers"), "{error}");
    }

    #[test]
    fn every_bad_value_is_named_with_its_reason() {
        // Proves validation reports all problems at once, each with its key.
        let text = r#"
            max_payload_bytes = 0
            connections_max = 0
            [listen]
            unix_mode = "99"
            tcp = "localhost"
            [[service]]
            id = 0
            name = "bad name"
            exec = "/nonexistent/worker"
            min_workers = 5
            max_workers = 2
            slot_size_bytes = 10
            env = { ACGI_X = "1" }
            [[service]]
            id = 0
            name = "bad name"
            exec = "/bin/cat"
        "#;
        let config = Config::parse(text).unwrap();
        let keys: Vec<String> = config.problems().into_iter().map(|p| p.key).collect();
        for expected in [
            "max_payload_bytes",
            "connections_max",
            "listen.unix_mode",
            "listen.tcp",
            "service[0].id",
            "service[0].name",
            "service[0].exec",
            "service[0].min_workers",
            "service[0].slot_size_bytes",
            "service[0].env",
            "service[1].id",
            "service[1].name",
        ] {
            assert!(
                keys.iter().any(|k| k == expected),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn missing_executable_names_the_path() {
        // Proves the exec problem names the exact path the user wrote.
        let text = minimal().replace("/bin/cat", "/no/such/worker");
        let problems = Config::parse(&text).unwrap().problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "service[0].exec");
        assert!(problems[0].reason.contains("/no/such/worker"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        // Proves a config works from any working directory.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge.toml");
        let text = format!(
            "state_dir = \"st\"\n{}",
            minimal().replace("/tmp/x.sock", "run/x.sock")
        );
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.listen.unix.unwrap(), dir.path().join("run/x.sock"));
        assert_eq!(config.state_dir, dir.path().join("st"));
    }

    #[test]
    fn a_leading_runtime_dir_placeholder_names_the_runtime_dir_in_any_path() {
        // Proves `{runtime_dir}` in path keys: the runtime directory (itself relative to the
        // config file here) replaces it, in listen.unix as in state_dir.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge.toml");
        let text = format!(
            "runtime_dir = \"rt\"\nstate_dir = \"{{runtime_dir}}/st\"\n{}",
            minimal().replace("/tmp/x.sock", "{runtime_dir}/x.sock")
        );
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.runtime_dir, dir.path().join("rt"));
        assert_eq!(config.listen.unix.unwrap(), dir.path().join("rt/x.sock"));
        assert_eq!(config.state_dir, dir.path().join("rt/st"));
    }

    #[test]
    fn octal_modes_parse() {
        // Proves unix_mode accepts the usual spellings and rejects non-octal.
        assert_eq!(parse_mode("0660"), Some(0o660));
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("0999"), None);
    }
}
