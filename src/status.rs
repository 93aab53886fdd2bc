//! The bridge's status report: what the admin socket answers to `status`, and how
//! `acgi-bridge status` prints it.
//!
//! Admin protocol: connect to the admin Unix socket, send one line `status\n`, read the JSON
//! document (one object, then `\n`) until the bridge closes the connection. The admin socket is
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
    /// `ok` or `failing` (crash loop: requests are refused until a worker starts cleanly).
    pub state: String,
    pub workers_starting: u32,
    pub workers_idle: u32,
    pub workers_busy: u32,
    pub workers_stopping: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub backlog: u32,
    pub backlog_max_seen: u32,
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
    /// Workers killed or lost for breaking the worker protocol or their control socket, by
    /// fault (`early_answer`, `forbidden_flags`, ...; only those seen).
    #[serde(default)]
    pub worker_faults: std::collections::BTreeMap<String, u64>,
    /// Spawns per second the pacing allows right now.
    pub spawn_rate: u32,
    pub pids: Vec<i32>,
    /// Latency percentiles since start and over the last complete interval
    /// (`histogram_log_interval_ms`).
    pub latency_since_start: Latency,
    pub latency_last_interval: Latency,
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
            let _ = writeln!(
                out,
                "  backlog   {} now, {} max seen",
                s.backlog, s.backlog_max_seen
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
                "  exits     {} recycled, {} idle, {} crashed, {} timed out, {} killed, {} shutdown",
                s.exits_recycled,
                s.exits_idle,
                s.exits_crashed,
                s.exits_timed_out,
                s.exits_killed,
                s.exits_shutdown
            );
            if !s.worker_faults.is_empty() {
                let faults: Vec<String> = s
                    .worker_faults
                    .iter()
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect();
                let _ = writeln!(out, "  faults    {}", faults.join(", "));
            }
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

/// Ask the bridge behind the admin socket at `path` for its status.
/// How long `command` waits for an answer (a reload waits for new workers, up to the bridge's
/// `reload_timeout_ms`).
pub const COMMAND_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Send one admin command line and return its one-line answer (`ok: ...` or `error: ...`).
pub fn command(path: &std::path::Path, line: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(COMMAND_ANSWER_TIMEOUT))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text.trim_end().to_string())
}

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
