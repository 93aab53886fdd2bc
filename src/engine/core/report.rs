//! This core's report, for the control thread: a copy of its counts and histograms, taken on
//! its loop when asked (`Msg::Report`) and sent back on the reply channel the request carries.
//! Nothing is merged, encoded or written here (`super::super::report` and `control` do that,
//! off every core's loop).

use super::*;
use crate::engine::report::WorkerRow;

impl Core {
    /// The control thread wants this core's report (and, at the end of a latency interval,
    /// for it to start a new one).
    pub(super) fn on_report_request(&mut self, end_interval: bool, reply: ReportReply) {
        if end_interval {
            self.end_interval();
        }
        // The control thread may have given up waiting: then nobody needs the report.
        let _ = reply.send(Box::new(self.report()));
    }

    /// A latency interval ended: keep it as "last interval" for status.
    pub(super) fn end_interval(&mut self) {
        for latency in self.services.iter_mut().filter_map(|s| s.latency.as_mut()) {
            let latency = &mut **latency;
            std::mem::swap(&mut latency.last_interval, &mut latency.interval);
            latency.interval.reset();
        }
    }

    /// This core's report.
    pub(super) fn report(&self) -> CoreReport {
        let mut pids_by_service: IndexVec<ServiceSlot, Vec<i32>> =
            self.services.iter().map(|_| Vec::new()).collect();
        let mut rows_by_service: IndexVec<ServiceSlot, Vec<WorkerRow>> =
            self.services.iter().map(|_| Vec::new()).collect();
        for (handle, worker) in self.workers.iter() {
            pids_by_service[worker.service].push(worker.pid);
            rows_by_service[worker.service].push(self.worker_row(handle, worker));
        }
        let services = self
            .services
            .iter()
            .zip(pids_by_service)
            .zip(rows_by_service)
            .filter(|((service, _), _)| service.phase != SlotPhase::Folded)
            .map(|((service, pids), workers)| {
                let latency = service
                    .latency
                    .as_ref()
                    .expect("only folded slots have none");
                let pool = &service.pool;
                // Limits and state are the live slot's; a warming or retired slot of the same
                // service adds its workers and what it counted.
                let live = service.phase == SlotPhase::Live;
                let oldest_waiting = pool
                    .oldest_waiting()
                    .and_then(|id| self.requests.get(RequestHandle::from_raw(id)))
                    .map(|request| self.now.saturating_duration_since(request.arrived));
                ShardReport {
                    id: service.id,
                    name: service.name.clone(),
                    live,
                    intake: pool.intake(),
                    backlog_max: if live { pool.policy().backlog_max } else { 0 },
                    oldest_waiting,
                    workers,
                    starting: pool.starting(),
                    idle: pool.idle(),
                    busy: pool.busy(),
                    stopping: pool.stopping_count(),
                    min_workers: if live { pool.policy().min_workers } else { 0 },
                    max_workers: if live { pool.policy().max_workers } else { 0 },
                    backlog: pool.backlog_len(),
                    failing: live && pool.is_failing(),
                    spawn_rate: pool.spawn_rate(),
                    stats: {
                        let mut stats = pool.stats();
                        stats.add(&service.folded_stats);
                        stats
                    },
                    pids,
                    counters: service.counters,
                    latency: latency.since_start.clone(),
                    latency_last_interval: latency.last_interval.clone(),
                }
            })
            .fold(Vec::new(), crate::engine::report::merge_shard);
        let cores = self.shared.cores.len();
        let connections = self.conns.len() as u64;
        let mut connections_by_core = vec![0; cores];
        connections_by_core[self.index.usize()] = connections;
        let mut requests_by_core = vec![0; cores];
        requests_by_core[self.index.usize()] =
            self.counters.requests_ok + self.counters.requests_failed;
        CoreReport {
            connections_by_core,
            requests_by_core,
            connections,
            read_buffers_held: self
                .conns
                .iter()
                .filter(|(_, c)| !c.read.is_released())
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

    /// A worker's row in status (its memory and CPU time are read by the control thread).
    fn worker_row(&self, handle: WorkerHandle, worker: &Worker) -> WorkerRow {
        let pool = &self.services[worker.service].pool;
        let running_for = worker
            .running()
            .and_then(|job| self.requests.get(job.request))
            .and_then(|request| request.dispatched)
            .map(|since| self.now.saturating_duration_since(since));
        WorkerRow {
            pid: worker.pid,
            core: self.index.usize() as u32,
            state: worker.state.name(),
            requests_served: pool.served(handle.to_raw()).unwrap_or(0),
            running_for,
        }
    }

    /// Worker slots registered as fixed buffers now.
    pub(super) fn slots_registered(&self) -> u64 {
        self.workers
            .iter()
            .filter(|(_, w)| w.buffer_index.is_some())
            .count() as u64
    }
}
