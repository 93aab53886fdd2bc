//! Status, metrics and latency intervals across cores: each core's report, core 0's gathering
//! and merging of them, and the admin and `/metrics` answers built from the merge.

use super::*;

impl Core {
    /// This core's report.
    pub(super) fn report(&self) -> CoreReport {
        let mut pids_by_service: Vec<Vec<i32>> = vec![Vec::new(); self.services.len()];
        for (_, worker) in self.workers.iter() {
            pids_by_service[worker.service].push(worker.pid);
        }
        let services = self
            .services
            .iter()
            .zip(pids_by_service)
            .map(|(service, pids)| {
                let pool = &service.pool;
                ShardReport {
                    starting: pool.starting(),
                    idle: pool.idle(),
                    busy: pool.busy(),
                    stopping: pool.stopping_count(),
                    min_workers: pool.policy().min_workers,
                    max_workers: pool.policy().max_workers,
                    backlog: pool.backlog_len(),
                    failing: pool.is_failing(),
                    spawn_rate: pool.spawn_rate(),
                    stats: pool.stats(),
                    pids,
                    counters: service.counters,
                    latency: service.latency.clone(),
                    latency_last_interval: service.latency_last_interval.clone(),
                }
            })
            .collect();
        let cores = self.shared.cores.len();
        let mut connections_by_core = vec![0; cores];
        connections_by_core[self.index] = self.caller_connections();
        let mut requests_by_core = vec![0; cores];
        requests_by_core[self.index] = self.counters.requests_ok + self.counters.requests_failed;
        CoreReport {
            connections_by_core,
            requests_by_core,
            connections: self.caller_connections(),
            read_buffers_held: self
                .conns
                .iter()
                .filter(|(_, c)| c.kind.is_caller() && !c.read.is_released())
                .count() as u64,
            files_registered: self.conns.iter().filter(|(_, c)| c.file.is_some()).count() as u64
                + self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.file.is_some())
                    .count() as u64,
            slots_registered: self.slots_registered(),
            worker_processes: self.workers.len() as u64,
            counters: self.counters.clone(),
            services,
        }
    }

    /// Ask every core for its report; `finish_gather` runs once all have answered.
    pub(super) fn start_gather(&mut self, purpose: Purpose) {
        debug_assert_eq!(self.index, 0);
        self.next_gather += 1;
        let id = self.next_gather;
        let end_interval = matches!(purpose, Purpose::Interval(..));
        if end_interval {
            self.end_interval();
        }
        let cores = self.shared.cores.len();
        self.gathers.push(Gather {
            id,
            purpose,
            merged: self.report(),
            waiting: cores - 1,
        });
        for core in 1..cores {
            self.post(core, Msg::ReportRequest { id, end_interval });
        }
        if cores == 1 {
            self.finish_gather(self.gathers.len() - 1);
        }
    }

    pub(super) fn on_report(&mut self, id: u64, report: &CoreReport) {
        let Some(position) = self.gathers.iter().position(|g| g.id == id) else {
            return;
        };
        let gather = &mut self.gathers[position];
        gather.merged.add(report);
        gather.waiting -= 1;
        if gather.waiting == 0 {
            self.finish_gather(position);
        }
    }

    pub(super) fn finish_gather(&mut self, position: usize) {
        let gather = self.gathers.swap_remove(position);
        match gather.purpose {
            Purpose::Status(conn) => {
                let Some(index) = self.live_conn(conn) else {
                    return;
                };
                let mut json =
                    serde_json::to_vec(&self.status(&gather.merged)).expect("status serializes");
                json.push(b'\n');
                self.answer_aux(index, &json);
            }
            Purpose::Metrics(conn, request) => {
                let Some(index) = self.live_conn(conn) else {
                    return;
                };
                let snapshot = self.metrics_snapshot(&gather.merged);
                if let Some(response) = metrics::http_response(&request, || snapshot) {
                    self.answer_aux(index, &response);
                }
            }
            Purpose::Interval(start, end) => {
                if let Some(logger) = &mut self.interval_logger {
                    let histograms: Vec<(&str, &LatencyHistograms)> = self
                        .services
                        .iter()
                        .zip(&gather.merged.services)
                        .map(|(s, shard)| (s.name.as_str(), &shard.latency_last_interval))
                        .collect();
                    if let Err(error) = logger.append(end, start, &histograms) {
                        tracing::warn!(%error, "cannot append to the histogram log");
                    }
                }
            }
        }
    }

    /// Send an admin or metrics answer and close the connection after it.
    pub(super) fn answer_aux(&mut self, index: ConnHandle, answer: &[u8]) {
        let conn = &mut self.conns[index];
        conn.read.consume(conn.read.len());
        conn.send.tail().extend_from_slice(answer);
        conn.close_after_flush();
        self.arm_conn_send(index);
    }

    /// A metrics connection sent bytes: answer its HTTP request, then close.
    pub(super) fn handle_metrics(&mut self, index: ConnHandle) {
        if self.conns[index].requests_in_flight > 0 {
            return; // Gathering the answer already.
        }
        let request = self.conns[index].read.filled().to_vec();
        let mut wants_snapshot = false;
        let response = metrics::http_response(&request, || {
            wants_snapshot = true;
            MetricsSnapshot::default()
        });
        if wants_snapshot {
            // A whole `GET /metrics`: answer it once every core has reported.
            self.gather_for(index, |conn| Purpose::Metrics(conn, request));
        } else if let Some(response) = response {
            self.answer_aux(index, &response);
        }
    }

    /// Start gathering reports to answer an admin or metrics connection.
    pub(super) fn gather_for(
        &mut self,
        index: ConnHandle,
        purpose: impl FnOnce(ConnHandle) -> Purpose,
    ) {
        let conn = &mut self.conns[index];
        conn.read.consume(conn.read.len());
        conn.requests_in_flight += 1;
        self.start_gather(purpose(index));
    }

    pub(super) fn metrics_snapshot(&self, report: &CoreReport) -> MetricsSnapshot {
        let services = self
            .services
            .iter()
            .zip(&report.services)
            .map(|(service, shard)| {
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
                    spawns: stats.spawns,
                    exits: vec![
                        ("recycled", stats.exits_recycled),
                        ("idle", stats.exits_idle),
                        ("crashed", stats.exits_crashed),
                        ("timed_out", stats.exits_timed_out),
                        ("killed", stats.exits_killed),
                        ("shutdown", stats.exits_shutdown),
                        ("failed_start", stats.failed_starts),
                    ],
                    workers: vec![
                        ("starting", shard.starting as u64),
                        ("idle", shard.idle as u64),
                        ("busy", shard.busy as u64),
                        ("stopping", shard.stopping as u64),
                    ],
                    backlog: shard.backlog as u64,
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
        }
    }

    /// An admin connection sent bytes: answer its one command line, then close.
    pub(super) fn handle_admin(&mut self, index: ConnHandle) {
        let conn = &mut self.conns[index];
        if conn.requests_in_flight > 0 {
            return; // Gathering the answer already.
        }
        let filled = conn.read.filled();
        let Some(end) = filled.iter().position(|b| *b == b'\n') else {
            if filled.len() > ADMIN_LINE_BYTES_MAX {
                conn.send
                    .tail()
                    .extend_from_slice(b"error: command line too long\n");
                conn.close_after_flush();
                self.arm_conn_send(index);
            }
            return;
        };
        let command = String::from_utf8_lossy(&filled[..end]).trim().to_string();
        match command.as_str() {
            "status" => self.gather_for(index, Purpose::Status),
            other => {
                let reply = format!("error: unknown command {other:?} (try \"status\")\n");
                self.answer_aux(index, reply.as_bytes());
            }
        }
    }

    /// Caller connections open now (admin and metrics ones are not callers).
    pub(super) fn caller_connections(&self) -> u64 {
        (self.conns.len() - self.aux_conns) as u64
    }

    /// Worker slots registered as fixed buffers now.
    pub(super) fn slots_registered(&self) -> u64 {
        self.workers
            .iter()
            .filter(|(_, w)| w.buffer_index.is_some())
            .count() as u64
    }

    /// The status report (see `crate::status`) from the merged reports of every core.
    pub(super) fn status(&self, report: &CoreReport) -> Status {
        let services = self
            .services
            .iter()
            .zip(&report.services)
            .map(|(service, shard)| {
                let stats = shard.stats;
                let policy = service.pool.policy();
                let requests_failed = shard
                    .counters
                    .failures()
                    .filter(|(_, count)| *count > 0)
                    .map(|(code, count)| (code.as_str().to_string(), count))
                    .collect();
                ServiceStatus {
                    id: service.id,
                    name: service.name.clone(),
                    mode: format!("{:?}", policy.mode).to_lowercase(),
                    state: if shard.failing { "failing" } else { "ok" }.to_string(),
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
                    worker_faults: shard
                        .counters
                        .faults()
                        .filter(|(_, count)| *count > 0)
                        .map(|(fault, count)| (fault.to_string(), count))
                        .collect(),
                    spawn_rate: shard.spawn_rate,
                    pids: shard.pids.clone(),
                    latency_since_start: latency_summary(&shard.latency),
                    latency_last_interval: latency_summary(&shard.latency_last_interval),
                }
            })
            .collect();
        // Read first: building the report allocates.
        let allocations = crate::alloc_count::allocations();
        Status {
            allocations,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            cores: self.shared.cores.len() as u32,
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
}

pub(super) fn latency_summary(histograms: &LatencyHistograms) -> crate::status::Latency {
    crate::status::Latency {
        total: metrics::percentiles(&histograms.total),
        queue_wait: metrics::percentiles(&histograms.queue_wait),
        service: metrics::percentiles(&histograms.service),
    }
}
