//! What a core reports, and what the control thread builds from the merged reports: the status
//! document (`crate::status`) and the metrics snapshot (`/metrics`).
//!
//! A core fills in a [`CoreReport`] on its own loop when asked (a copy of its counts and
//! histograms, nothing encoded); the control thread adds the cores' reports together
//! ([`CoreReport::add`]) and builds [`status`] and [`metrics_snapshot`] from the sum and the
//! config, off every core's loop. What a report leaves out (service names, ids, modes) comes
//! from the config, which every thread has.
//!
//! Invariant: per-core vectors are as long as the core count, so that `add` pairs like with
//! like. Services are paired by id (a report has one entry per service id it runs; during a
//! reload two cores may briefly run different configs, and a service's retired and warming
//! slots add into its entry), and the status and metrics are built for the services of the
//! control thread's config, each from its id's entry (zeros for one not reported yet).

#![forbid(unsafe_code)]

use std::time::Duration;

use super::core::{Counters, ServiceCounters};
use crate::config::{Config, ServiceConfig};
use crate::metrics::{self, LatencyHistograms, MetricsSnapshot, ServiceMetrics, ServiceState};
use crate::status::{ServiceStatus, Status};

/// One core's share of everything status and metrics report (or, once merged, the whole
/// bridge's).
pub struct CoreReport {
    pub(super) connections: u64,
    /// Caller connections, and requests answered (run here), of each core (this one's at its
    /// index, zeros elsewhere until merged).
    pub(super) connections_by_core: Vec<u64>,
    pub(super) requests_by_core: Vec<u64>,
    pub(super) files_registered: u64,
    /// Caller connections holding a read buffer now (the others wait on provided buffers).
    pub(super) read_buffers_held: u64,
    pub(super) slots_registered: u64,
    pub(super) worker_processes: u64,
    pub(super) counters: Counters,
    /// One per service id.
    pub(super) services: Vec<ShardReport>,
}

/// One core's shard of one service (all its slots: see `core::reload`).
#[derive(Clone)]
pub(crate) struct ShardReport {
    pub(super) id: u32,
    pub(super) name: String,
    /// It includes the service's live slot (whose limits and intake it carries).
    pub(super) live: bool,
    /// Open, paused or draining (the operator's), stopping (shutdown).
    pub(super) intake: crate::pool::Intake,
    /// The shard's live backlog bound (`acgi-bridge set` may have changed it).
    pub(super) backlog_max: u32,
    /// How long the request that has waited longest in the backlog has waited.
    pub(super) oldest_waiting: Option<Duration>,
    /// One row per worker process the core holds for the service.
    pub(super) workers: Vec<WorkerRow>,
    pub(super) starting: u32,
    pub(super) idle: u32,
    pub(super) busy: u32,
    pub(super) stopping: u32,
    pub(super) min_workers: u32,
    pub(super) max_workers: u32,
    pub(super) backlog: u32,
    pub(super) failing: bool,
    pub(super) spawn_rate: u32,
    pub(super) stats: crate::pool::Stats,
    pub(super) pids: Vec<i32>,
    pub(super) counters: ServiceCounters,
    pub(super) latency: LatencyHistograms,
    pub(super) latency_last_interval: LatencyHistograms,
}

/// One worker, as its core sees it.
#[derive(Clone, Debug)]
pub(crate) struct WorkerRow {
    pub(crate) pid: i32,
    pub(crate) core: u32,
    pub(crate) state: &'static str,
    pub(crate) requests_served: u64,
    /// How long its current request has run, when it runs one.
    pub(crate) running_for: Option<Duration>,
}

impl CoreReport {
    /// Add another core's report to this one.
    pub(super) fn add(&mut self, other: &CoreReport) {
        assert_eq!(self.services.len(), other.services.len(), "same services");
        assert_eq!(
            self.connections_by_core.len(),
            other.connections_by_core.len(),
            "same cores"
        );
        self.connections += other.connections;
        for (mine, theirs) in self
            .connections_by_core
            .iter_mut()
            .zip(&other.connections_by_core)
        {
            *mine += theirs;
        }
        for (mine, theirs) in self
            .requests_by_core
            .iter_mut()
            .zip(&other.requests_by_core)
        {
            *mine += theirs;
        }
        self.slots_registered += other.slots_registered;
        self.files_registered += other.files_registered;
        self.read_buffers_held += other.read_buffers_held;
        self.worker_processes += other.worker_processes;
        self.counters.add(&other.counters);
        for theirs in &other.services {
            add_shard(&mut self.services, std::borrow::Cow::Borrowed(theirs));
        }
    }

    /// The entry of `service`, or zeros when no core reported it.
    fn shard_or_empty(&self, service: &ServiceConfig) -> std::borrow::Cow<'_, ShardReport> {
        match self.shard(service.id) {
            Some(shard) => std::borrow::Cow::Borrowed(shard),
            None => std::borrow::Cow::Owned(ShardReport::empty(service)),
        }
    }

    /// The entry of service `id` (`None` when no core reported it).
    pub(super) fn shard(&self, id: u32) -> Option<&ShardReport> {
        self.services.iter().find(|shard| shard.id == id)
    }

    /// Each service's name and its latencies in the last complete interval (for the log).
    pub(super) fn last_intervals<'a>(
        &'a self,
        config: &'a Config,
    ) -> Vec<(&'a str, &'a LatencyHistograms)> {
        config
            .services
            .iter()
            .filter_map(|service| {
                let shard = self.shard(service.id)?;
                Some((service.name.as_str(), &shard.latency_last_interval))
            })
            .collect()
    }
}

/// Fold one shard into a list of shards by service id (the core's own slots, then the cores).
pub(crate) fn merge_shard(mut shards: Vec<ShardReport>, shard: ShardReport) -> Vec<ShardReport> {
    add_shard(&mut shards, std::borrow::Cow::Owned(shard));
    shards
}

/// Add `theirs` to the entry of its service, or make it that entry: owned when the caller gives
/// it up (a core's slots), cloned only when it is borrowed and new (another core's report).
fn add_shard(shards: &mut Vec<ShardReport>, theirs: std::borrow::Cow<'_, ShardReport>) {
    match shards.iter_mut().find(|mine| mine.id == theirs.id) {
        Some(mine) => mine.add(&theirs),
        None => shards.push(theirs.into_owned()),
    }
}

impl ShardReport {
    /// An entry for a service no core reported (yet).
    fn empty(service: &ServiceConfig) -> ShardReport {
        ShardReport {
            id: service.id,
            name: service.name.clone(),
            live: false,
            intake: crate::pool::Intake::Open,
            backlog_max: 0,
            oldest_waiting: None,
            workers: Vec::new(),
            starting: 0,
            idle: 0,
            busy: 0,
            stopping: 0,
            min_workers: 0,
            max_workers: 0,
            backlog: 0,
            failing: false,
            spawn_rate: 0,
            stats: Default::default(),
            pids: Vec::new(),
            counters: Default::default(),
            latency: LatencyHistograms::new(),
            latency_last_interval: LatencyHistograms::new(),
        }
    }

    fn add(&mut self, theirs: &ShardReport) {
        let mine = self;
        {
            // The intake is the live slot's; the cores carry out each command in turn: while
            // one is still open and another paused, say the further along (open < paused <
            // draining < stopping).
            if theirs.live {
                mine.intake = if mine.live {
                    mine.intake.max(theirs.intake)
                } else {
                    theirs.intake
                };
            }
            mine.backlog_max += theirs.backlog_max;
            mine.oldest_waiting = mine.oldest_waiting.max(theirs.oldest_waiting);
            mine.workers.extend_from_slice(&theirs.workers);
            mine.live |= theirs.live;
            if theirs.live {
                mine.name.clone_from(&theirs.name);
            }
            mine.starting += theirs.starting;
            mine.idle += theirs.idle;
            mine.busy += theirs.busy;
            mine.stopping += theirs.stopping;
            mine.min_workers += theirs.min_workers;
            mine.max_workers += theirs.max_workers;
            mine.backlog += theirs.backlog;
            mine.failing |= theirs.failing;
            mine.spawn_rate += theirs.spawn_rate;
            mine.stats.add(&theirs.stats);
            mine.pids.extend_from_slice(&theirs.pids);
            mine.counters.add(&theirs.counters);
            mine.latency.add(&theirs.latency);
            mine.latency_last_interval
                .add(&theirs.latency_last_interval);
        }
    }
}

/// A service's state from its merged shards (`stopping`: the bridge is stopping).
fn service_state(service: &ServiceConfig, shard: &ShardReport, stopping: bool) -> ServiceState {
    // The workers the pool keeps running whatever the demand.
    let floor = match service.policy().mode {
        crate::pool::Mode::Static => shard.max_workers,
        crate::pool::Mode::Dynamic | crate::pool::Mode::OnDemand => shard.min_workers,
    };
    // A service an operator drained is on its way down, as in a shutdown: `/readyz` does not
    // count it (the other services still serve).
    if stopping || shard.intake == crate::pool::Intake::Draining {
        ServiceState::Stopping
    } else if shard.failing {
        ServiceState::Failing
    } else if shard.idle + shard.busy == 0 && floor > 0 {
        ServiceState::Starting
    } else {
        ServiceState::Ok
    }
}

/// Why the bridge is not ready (`/readyz`), one short line per service that is not `ok`; empty
/// when every service can serve. (That the bridge is stopping is the control thread's to say.)
pub(super) fn not_ready(config: &Config, report: &CoreReport) -> Vec<String> {
    config
        .services
        .iter()
        .map(|service| (service, report.shard_or_empty(service)))
        .filter_map(|(service, shard)| {
            let shard = &*shard;
            let why = match service_state(service, shard, false) {
                ServiceState::Ok | ServiceState::Stopping => return None,
                ServiceState::Failing => {
                    "failing (crash loop: requests refused, restarts backing off)".to_string()
                }
                ServiceState::Starting => {
                    format!("starting (no worker up yet, {} starting)", shard.starting)
                }
            };
            Some(format!("service {}: {why}", service.name))
        })
        .collect()
}

/// The services that keep workers but have none up yet and are not failing to start one (what
/// startup waits for before it says ready).
pub(super) fn without_first_worker<'a>(config: &'a Config, report: &CoreReport) -> Vec<&'a str> {
    config
        .services
        .iter()
        .filter(|service| {
            let shard = report.shard_or_empty(service);
            let floor = service.policy().floor();
            let stats = &shard.stats;
            floor > 0
                && shard.idle + shard.busy == 0
                && !shard.failing
                && stats.failed_starts == 0
                && stats.exits_crashed == 0
        })
        .map(|service| service.name.as_str())
        .collect()
}

/// The metrics snapshot (`/metrics`) from the merged reports of every core (`stopping`: the
/// bridge is stopping), with a reading of the bridge's own process.
pub(super) fn metrics_snapshot(
    config: &Config,
    report: &CoreReport,
    stopping: bool,
) -> MetricsSnapshot {
    let services = config
        .services
        .iter()
        .map(|service| (service, report.shard_or_empty(service)))
        .map(|(service, shard)| {
            let shard = &*shard;
            let stats = shard.stats;
            let counters = &shard.counters;
            let requests_failed = counters
                .failures()
                .map(|(code, count)| (code.metric_name(), count))
                .collect();
            ServiceMetrics {
                name: service.name.clone(),
                id: service.id,
                requests_ok: counters.ok,
                requests_failed,
                bytes_in: counters.bytes_in,
                bytes_out: counters.bytes_out,
                copy_path: counters.copy_path,
                worker_faults: counters.faults().collect(),
                spawn_failures: counters.spawn_failure_counts().collect(),
                spawns: stats.spawns,
                exits: vec![
                    ("recycled", stats.exits_recycled),
                    ("idle", stats.exits_idle),
                    ("crashed", stats.exits_crashed),
                    ("timed_out", stats.exits_timed_out),
                    ("killed", stats.exits_killed),
                    ("shutdown", stats.exits_shutdown),
                    ("admin_killed", stats.exits_admin_killed),
                    ("failed_start", stats.failed_starts),
                ],
                workers: vec![
                    ("starting", shard.starting as u64),
                    ("idle", shard.idle as u64),
                    ("busy", shard.busy as u64),
                    ("stopping", shard.stopping as u64),
                ],
                backlog: shard.backlog as u64,
                state: service_state(service, shard, stopping),
                min_workers: shard.min_workers as u64,
                max_workers: shard.max_workers as u64,
                backlog_max: service.backlog_max as u64,
                latency: shard.latency.clone(),
            }
        })
        .collect();
    MetricsSnapshot {
        connections: report.connections,
        slots_in_use: report.slots_registered,
        connections_by_core: report.connections_by_core.clone(),
        counters: report.counters.clone(),
        services,
        process: metrics::ProcessMetrics::read()
            .inspect_err(|error| tracing::debug!(%error, "cannot read /proc/self"))
            .ok(),
    }
}

/// The status report (see `crate::status`) from the merged reports of every core.
pub(super) fn status(config: &Config, report: &CoreReport, uptime: Duration) -> Status {
    // Read first: building the report allocates.
    let allocations = crate::alloc_count::allocations();
    let services = config
        .services
        .iter()
        .map(|service| (service, report.shard_or_empty(service)))
        .map(|(service, shard)| {
            let shard = &*shard;
            let stats = shard.stats;
            let requests_failed = shard
                .counters
                .failures()
                .filter(|(_, count)| *count > 0)
                .map(|(code, count)| (code.as_str().to_string(), count))
                .collect();
            ServiceStatus {
                id: service.id,
                name: service.name.clone(),
                mode: format!("{:?}", service.policy().mode).to_lowercase(),
                state: status_state(shard).to_string(),
                backlog_max: shard.backlog_max,
                oldest_waiting_ms: shard.oldest_waiting.map(|d| d.as_millis() as u64),
                exits_admin_killed: stats.exits_admin_killed,
                workers: shard.workers.iter().map(worker_status).collect(),
                workers_starting: shard.starting,
                workers_idle: shard.idle,
                workers_busy: shard.busy,
                workers_stopping: shard.stopping,
                min_workers: shard.min_workers,
                max_workers: shard.max_workers,
                backlog: shard.backlog,
                backlog_max_seen: stats.backlog_len_max,
                requests_ok: shard.counters.ok,
                requests_failed,
                spawns: stats.spawns,
                failed_starts: stats.failed_starts,
                exits_recycled: stats.exits_recycled,
                exits_idle: stats.exits_idle,
                exits_crashed: stats.exits_crashed,
                exits_timed_out: stats.exits_timed_out,
                exits_killed: stats.exits_killed,
                exits_shutdown: stats.exits_shutdown,
                worker_faults: seen(shard.counters.faults()),
                spawn_failures: seen(shard.counters.spawn_failure_counts()),
                spawn_rate: shard.spawn_rate,
                pids: shard.pids.clone(),
                latency_since_start: latency_summary(&shard.latency),
                latency_last_interval: latency_summary(&shard.latency_last_interval),
            }
        })
        .collect();
    Status {
        allocations,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_ms: uptime.as_millis() as u64,
        cores: report.connections_by_core.len() as u32,
        connections: report.connections,
        connections_by_core: report.connections_by_core.clone(),
        requests_by_core: report.requests_by_core.clone(),
        slots_registered: report.slots_registered,
        files_registered: report.files_registered,
        read_buffers_held: report.read_buffers_held,
        worker_processes: report.worker_processes,
        counters: report.counters.clone(),
        services,
    }
}

/// A service's state in status: failing (the breaker), else what the operator made of it
/// (paused, draining), else ok.
/// The labels counted at least once, with their counts (what `status` shows).
fn seen<'a>(
    counts: impl Iterator<Item = (&'a str, u64)>,
) -> std::collections::BTreeMap<String, u64> {
    counts
        .filter(|(_, count)| *count > 0)
        .map(|(label, count)| (label.to_string(), count))
        .collect()
}

fn status_state(shard: &ShardReport) -> &'static str {
    use crate::pool::Intake;
    match shard.intake {
        _ if shard.failing => "failing",
        Intake::Paused => "paused",
        Intake::Draining if shard.idle + shard.busy + shard.starting + shard.stopping == 0 => {
            "drained"
        }
        Intake::Draining => "draining",
        Intake::Open | Intake::Stopping => "ok",
    }
}

/// A worker's row, with its memory and CPU time read now from /proc (on the control thread:
/// a core never reads /proc for status). A worker that has just exited has neither.
fn worker_status(row: &WorkerRow) -> crate::status::WorkerStatus {
    let usage = ProcUsage::read(row.pid);
    crate::status::WorkerStatus {
        pid: row.pid,
        core: row.core,
        state: row.state.to_string(),
        requests_served: row.requests_served,
        current_request_ms: row.running_for.map(|d| d.as_millis() as u64),
        rss_bytes: usage.map(|u| u.rss_bytes),
        cpu_ms: usage.map(|u| u.cpu_ms),
    }
}

/// A process's resident memory and CPU time (user + system), from /proc/PID/statm and stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcUsage {
    rss_bytes: u64,
    cpu_ms: u64,
}

impl ProcUsage {
    fn read(pid: i32) -> Option<ProcUsage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let ticks = rustix::param::clock_ticks_per_second();
        ProcUsage::parse(&stat, &statm, ticks, rustix::param::page_size() as u64)
    }

    /// proc(5): stat's fields 14 and 15 (utime, stime, in clock ticks) after the command name,
    /// which may hold spaces and parentheses (so split at the last `)`); statm's second field
    /// (resident pages).
    fn parse(stat: &str, statm: &str, ticks_per_second: u64, page: u64) -> Option<ProcUsage> {
        let (_, rest) = stat.rsplit_once(") ")?;
        // rest starts at field 3 (state): utime is field 14, stime 15.
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(ProcUsage {
            rss_bytes: pages * page,
            cpu_ms: (utime + stime) * 1000 / ticks_per_second.max(1),
        })
    }
}

fn latency_summary(histograms: &LatencyHistograms) -> crate::status::Latency {
    crate::status::Latency {
        total: metrics::percentiles(&histograms.total),
        queue_wait: metrics::percentiles(&histograms.queue_wait),
        service: metrics::percentiles(&histograms.service),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_usage_reads_cpu_and_memory_past_an_awkward_command_name() {
        // Proves the stat parser splits at the last parenthesis and takes utime + stime.
        let stat = "42 (a) (b c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 \
                    123456 300 18446744073709551615";
        let usage = ProcUsage::parse(stat, "1000 300 20 1 0 50 0", 100, 4096).unwrap();
        assert_eq!(
            usage,
            ProcUsage {
                rss_bytes: 300 * 4096,
                cpu_ms: 3000
            }
        );
        assert_eq!(ProcUsage::parse("garbage", "", 100, 4096), None);
        let me = ProcUsage::read(std::process::id() as i32).expect("our own /proc entry");
        assert!(me.rss_bytes > 0);
    }
}
