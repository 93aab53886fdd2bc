//! The bridge's status report: what the admin socket answers to `status`, and how
//! `acgi-bridge status` prints it.
//!
//! Admin protocol: connect to the admin Unix socket, send one line `status\n`, read the JSON
//! document (one object, then `\n`) until the bridge closes the connection. The other commands
//! (`pause NAME`, `resume NAME`, `drain NAME`, `recycle NAME`, `kill-worker PID`,
//! `set NAME key=value...`; docs/operations.md) are answered with one line, `ok: RESULT` or
//! `error: REASON` ([`command`]). The admin socket is
//! served by the bridge's control thread, apart from the pools and the cores' loops, so it
//! answers even when every pool is saturated; the document is built there from every core's
//! report (`engine::report`).

#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub use crate::metrics::Percentiles;

/// The whole report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    /// Event-loop threads (one per core).
    #[serde(default)]
    pub cores: u32,
    /// Caller connections open now.
    pub connections: u64,
    /// Caller connections open now on each core.
    #[serde(default)]
    pub connections_by_core: Vec<u64>,
    /// Requests answered by each core's workers (or rejected by its pools) since start.
    #[serde(default)]
    pub requests_by_core: Vec<u64>,
    /// Worker slots registered as io_uring fixed buffers now.
    pub slots_registered: u64,
    /// Caller connections and worker control sockets in the rings' registered-file tables.
    #[serde(default)]
    pub files_registered: u64,
    /// Caller connections holding a read buffer now; idle ones wait on the rings' provided
    /// buffers and hold none.
    #[serde(default)]
    pub read_buffers_held: u64,
    /// Worker processes the bridge holds (any state, until reaped).
    pub worker_processes: u64,
    /// The bridge-wide counters (defined once, in `metrics::counters`; in the JSON they are
    /// fields of this object).
    #[serde(flatten)]
    pub counters: crate::metrics::BridgeCounters,
    /// Heap allocations since start (the bridge counts them; see `alloc_count`).
    pub allocations: u64,
    pub services: Vec<ServiceStatus>,
}

/// One service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    pub mode: String,
    /// `ok`; `failing` (crash loop: requests are refused until a worker starts cleanly);
    /// `paused` (`acgi-bridge pause`: new requests wait); `draining`, then `drained` once its
    /// last worker has gone (`acgi-bridge drain`: new requests are refused).
    pub state: String,
    pub workers_starting: u32,
    pub workers_idle: u32,
    pub workers_busy: u32,
    pub workers_stopping: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub backlog: u32,
    /// The live backlog bound (`backlog_max`, or what `acgi-bridge set` made it).
    #[serde(default)]
    pub backlog_max: u32,
    pub backlog_max_seen: u32,
    /// How long the request that has waited longest in the backlog has waited (none waits:
    /// absent).
    #[serde(default)]
    pub oldest_waiting_ms: Option<u64>,
    pub requests_ok: u64,
    /// Requests answered with an error, by error name (`overloaded`, `timed out`, ...).
    pub requests_failed: std::collections::BTreeMap<String, u64>,
    pub spawns: u64,
    pub failed_starts: u64,
    pub exits_recycled: u64,
    pub exits_idle: u64,
    pub exits_crashed: u64,
    pub exits_timed_out: u64,
    pub exits_killed: u64,
    pub exits_shutdown: u64,
    /// Workers an operator killed (`acgi-bridge kill-worker`): not crashes.
    #[serde(default)]
    pub exits_admin_killed: u64,
    /// Workers killed or lost for breaking the worker protocol or their control socket, by
    /// fault (`early_answer`, `forbidden_flags`, ...; only those seen).
    #[serde(default)]
    pub worker_faults: std::collections::BTreeMap<String, u64>,
    /// Workers that could not be started, by reason (`resources`, `config`, `cgroup`,
    /// `limits`, `identity`, `filesystem`, `sandbox`, `exec`; only those seen).
    #[serde(default)]
    pub spawn_failures: std::collections::BTreeMap<String, u64>,
    /// Spawns per second the pacing allows right now.
    pub spawn_rate: u32,
    pub pids: Vec<i32>,
    /// One row per worker process.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Latency percentiles since start and over the last complete interval
    /// (`histogram_log_interval_ms`).
    pub latency_since_start: Latency,
    pub latency_last_interval: Latency,
}

/// One worker process of a service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    /// The core (event loop) that holds it.
    pub core: u32,
    /// `starting`, `idle`, `busy`, `lending its slot` (its reply is being sent), `stopping`,
    /// `dead` (exited, not yet released).
    pub state: String,
    pub requests_served: u64,
    /// How long its current request has run, when it runs one.
    pub current_request_ms: Option<u64>,
    /// Resident memory and CPU time (user + system) from /proc, when it could be read.
    pub rss_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
}

/// Percentiles of the three latencies the bridge records per service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Arrival to answer.
    pub total: Percentiles,
    /// Arrival to hand-over to a worker.
    pub queue_wait: Percentiles,
    /// Hand-over to the worker's answer.
    pub service: Percentiles,
}

impl Status {
    /// The human-readable table `acgi-bridge status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "acgi-bridge {} pid {} up {:.1}s: {} connections, {} worker processes, {} slots \
             registered; requests {} ok, {} failed",
            self.version,
            self.pid,
            self.uptime_ms as f64 / 1000.0,
            self.connections,
            self.worker_processes,
            self.slots_registered,
            self.counters.requests_ok,
            self.counters.requests_failed,
        );
        if self.cores > 1 {
            let _ = writeln!(
                out,
                "{} cores: connections {:?}, requests run {:?}; {} requests forwarded, {} \
                 connections handed over",
                self.cores,
                self.connections_by_core,
                self.requests_by_core,
                self.counters.requests_forwarded,
                self.counters.connections_handed_over,
            );
        }
        let counters: Vec<String> = self
            .counters
            .each()
            .iter()
            .filter(|(name, _, value)| *value > 0 && !name.starts_with("requests_"))
            .map(|(name, _, value)| format!("{name} {value}"))
            .collect();
        if !counters.is_empty() {
            let _ = writeln!(out, "counters: {}", counters.join(", "));
        }
        for s in &self.services {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "service {} (id {}): {} mode, {}",
                s.name, s.id, s.mode, s.state
            );
            let _ = writeln!(
                out,
                "  workers   {} starting, {} idle, {} busy, {} stopping (min {}, max {})",
                s.workers_starting,
                s.workers_idle,
                s.workers_busy,
                s.workers_stopping,
                s.min_workers,
                s.max_workers
            );
            let oldest = s
                .oldest_waiting_ms
                .map(|ms| format!(", oldest waiting {ms} ms"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  backlog   {} now (max {}), {} max seen{oldest}",
                s.backlog, s.backlog_max, s.backlog_max_seen
            );
            let failed: Vec<String> = s
                .requests_failed
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let failed = if failed.is_empty() {
                "none failed".to_string()
            } else {
                failed.join(", ")
            };
            let _ = writeln!(out, "  requests  {} ok; {failed}", s.requests_ok);
            let _ = writeln!(
                out,
                "  spawns    {} ({} failed starts), spawn rate {}/s",
                s.spawns, s.failed_starts, s.spawn_rate
            );
            let _ = writeln!(
                out,
                "  exits     {} recycled, {} idle, {} crashed, {} timed out, {} killed, {} shutdown, \
                 {} admin kills",
                s.exits_recycled,
                s.exits_idle,
                s.exits_crashed,
                s.exits_timed_out,
                s.exits_killed,
                s.exits_shutdown,
                s.exits_admin_killed
            );
            render_counts(&mut out, "faults   ", &s.worker_faults);
            render_counts(&mut out, "spawn failures", &s.spawn_failures);
            render_workers(&mut out, &s.workers);
            for (label, latency) in [
                ("last interval", &s.latency_last_interval),
                ("since start", &s.latency_since_start),
            ] {
                for (name, p) in [
                    ("total", &latency.total),
                    ("queue wait", &latency.queue_wait),
                    ("service", &latency.service),
                ] {
                    let _ = writeln!(
                        out,
                        "  latency   {label:<13} {name:<10} n={:<8} p50 {} us  p99 {} us  \
                         p99.9 {} us  max {} us",
                        p.count, p.p50_us, p.p99_us, p.p999_us, p.max_us
                    );
                }
            }
        }
        out
    }
}

/// The per-worker table of a service.
/// One line of counts by label (`  LABEL name n, name n`), if there are any.
fn render_counts(out: &mut String, label: &str, counts: &std::collections::BTreeMap<String, u64>) {
    if counts.is_empty() {
        return;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let _ = writeln!(out, "  {label} {}", counts.join(", "));
}

fn render_workers(out: &mut String, workers: &[WorkerStatus]) {
    if workers.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<9} {:<4} {:<16} {:>8} {:>10} {:>10} {:>10}",
        "pid", "core", "state", "served", "current", "rss", "cpu"
    );
    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_string());
    for w in workers {
        let _ = writeln!(
            out,
            "  {:<9} {:<4} {:<16} {:>8} {:>10} {:>10} {:>10}",
            w.pid,
            w.core,
            w.state,
            w.requests_served,
            or_dash(w.current_request_ms.map(|ms| format!("{ms} ms"))),
            or_dash(
                w.rss_bytes
                    .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            ),
            or_dash(w.cpu_ms.map(|ms| format!("{:.2} s", ms as f64 / 1000.0))),
        );
    }
}

/// Send one admin command line (`pause echo`, `kill-worker 1234`, ...) to the bridge behind
/// the admin socket at `path`: `Ok` with its one-line result, or `Err` with the bridge's
/// reason (or the I/O error).
/// How long `command` waits for an answer (a reload waits for new workers, up to the bridge's
/// `reload_timeout_ms`).
pub const COMMAND_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub fn command(path: &std::path::Path, line: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let exchange = || -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(COMMAND_ANSWER_TIMEOUT))?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    };
    let text = exchange().map_err(|error| format!("{}: {error}", path.display()))?;
    let text = text.trim_end();
    match (text.strip_prefix("ok: "), text.strip_prefix("error: ")) {
        (Some(result), _) => Ok(result.to_string()),
        (_, Some(reason)) => Err(reason.to_string()),
        _ => Err(format!("unexpected answer from the bridge: {text:?}")),
    }
}

/// Ask the bridge behind the admin socket at `path` for its status.
pub fn query(path: &std::path::Path) -> std::io::Result<Status> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.write_all(b"status\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    serde_json::from_str(text.trim()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad status reply: {e}"),
        )
    })
}
