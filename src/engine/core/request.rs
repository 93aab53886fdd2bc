//! Requests: their table, how one finishes (latency, counters, its caller's count, its access
//! log line) and fails; the slow log and the timed-out request's line.

use super::*;

use crate::access_log::{self, ServiceName};

impl Core {
    /// Remove a finished request and account for it on its connection (here, or on the core
    /// it came from). `outcome` is `None` for a reply, else the error code it was answered
    /// with; `reply_bytes` is the answer's payload length (for the access log). Returns where
    /// the answer goes: a live connection of ours, or another core.
    pub(super) fn finish_request(
        &mut self,
        request: RequestHandle,
        outcome: Option<ErrorCode>,
        reply_bytes: u32,
    ) -> Option<Dest> {
        let entry = self.requests.remove(request);
        debug_assert!(entry.forwarded_to.is_none());
        let now = self.now;
        let queue_wait = entry
            .dispatched
            .unwrap_or(now)
            .saturating_duration_since(entry.arrived);
        let service_time = entry.dispatched.map(|d| now.saturating_duration_since(d));
        let total = now.saturating_duration_since(entry.arrived);
        if access_log::enabled() {
            let service = &self.services[entry.service];
            access_log::record(access_log::Entry {
                time: std::time::SystemTime::now(),
                service: ServiceName::new(&service.name),
                service_id: service.id,
                caller: entry.caller,
                request_id: entry.caller_request_id,
                request_bytes: entry.request_bytes,
                reply_bytes,
                error: outcome,
                queue_wait,
                service_time,
            });
        }
        let slot = self.accounting_slot(entry.service);
        let service = &mut self.services[slot];
        if let Some(latency) = &mut service.latency {
            latency.since_start.record(queue_wait, service_time, total);
            latency.interval.record(queue_wait, service_time, total);
        }
        let counters = &mut service.counters;
        match outcome {
            None => {
                self.counters.requests_ok += 1;
                counters.ok += 1;
            }
            Some(code) => {
                self.counters.requests_failed += 1;
                counters.errors[code as usize] += 1;
            }
        }
        self.recycle_payload(entry.payload);
        let conn_handle = match entry.origin {
            Origin::Conn(conn) => conn,
            Origin::Core { core, request } => return Some(Dest::Core { core, request }),
        };
        if let Some(conn) = self.conns.get_mut(conn_handle) {
            conn.requests_in_flight -= 1;
        }
        self.release_request_bytes(conn_handle, entry.held_bytes);
        self.live_conn(conn_handle).map(Dest::Conn)
    }

    /// The connection is closed: its requests still waiting for a worker are taken out of
    /// their pools and dropped, never to run (`requests_abandoned`), and their payloads freed.
    /// Those a worker already holds run to the end; their answers are dropped. (Requests sent
    /// to another core run there.)
    pub(super) fn abandon_waiting_requests(&mut self, conn: ConnHandle) {
        if self.conns[conn].requests_in_flight == 0 {
            return;
        }
        let waiting: Vec<RequestHandle> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                r.origin == Origin::Conn(conn) && r.dispatched.is_none() && r.forwarded_to.is_none()
            })
            .map(|(request, _)| request)
            .collect();
        for request in waiting {
            let service = self.requests[request].service;
            if self.services[service].pool.withdraw(request.to_raw()) {
                let entry = self.requests.remove(request);
                self.recycle_payload(entry.payload);
                self.conns[conn].requests_in_flight -= 1;
                self.release_request_bytes(conn, entry.held_bytes);
                self.counters.requests_abandoned += 1;
            }
        }
    }

    /// An empty buffer for a payload or frame, from the spares when there is one.
    pub(super) fn spare_buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.spare_payloads.pop().unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Keep a payload buffer for the next request (up to a point).
    pub(super) fn recycle_payload(&mut self, mut payload: Vec<u8>) {
        let capacity = payload.capacity();
        if capacity > 0 && capacity <= 64 * 1024 && self.spare_payloads.len() < 1024 {
            payload.clear();
            self.spare_payloads.push(payload);
        }
    }

    pub(super) fn fail_request(&mut self, request: RequestHandle, code: ErrorCode, message: &str) {
        let (caller_request_id, service) = {
            let entry = &self.requests[request];
            (entry.caller_request_id, entry.service)
        };
        let service_id = self.services[service].id;
        match self.finish_request(request, Some(code), message.len() as u32) {
            Some(Dest::Conn(conn)) => {
                // Settled (sent, or closed if it was its last) after the handler.
                self.answer_error(conn, caller_request_id, service_id, code, message);
            }
            Some(Dest::Core { core, request }) => {
                let mut frame = self.spare_buffer();
                let header =
                    Header::error(caller_request_id, service_id, code, message.len() as u32);
                proto::encode_frame(&mut frame, &header, message.as_bytes());
                self.send_answer(core, request, frame);
            }
            None => {}
        }
    }

    pub(super) fn request_is_live(&self, request: RequestHandle) -> bool {
        self.requests.contains(request)
    }

    /// The access log line of a request answered with an error before it became a request
    /// of the table (unknown service, not allowed, payload too large).
    pub(super) fn log_refused_request(&self, conn: ConnHandle, header: &Header, code: ErrorCode) {
        if !access_log::enabled() || header.kind != Kind::Request {
            return;
        }
        let service = self.service_by_id.get(&header.service_id);
        let name = service.map_or("-", |&s| self.services[s].name.as_str());
        access_log::record(access_log::Entry {
            time: std::time::SystemTime::now(),
            service: ServiceName::new(name),
            service_id: header.service_id,
            caller: self.conns.get(conn).and_then(|c| c.caller),
            request_id: header.request_id,
            request_bytes: header.payload_len,
            reply_bytes: 0,
            error: Some(code),
            queue_wait: Duration::ZERO,
            service_time: None,
        });
    }

    /// The slow log (`request_slowlog_timeout_ms`): name, once, each request a worker has been
    /// running for at least its service's threshold. Runs with the caller sweep (every
    /// `CALLER_SWEEP_INTERVAL`), so a line comes within that of the threshold; with the slow
    /// log off everywhere it returns at once.
    pub(super) fn log_slow_requests(&mut self) {
        if !self.config.slowlog_enabled() {
            return;
        }
        let now = self.now;
        for (_, worker) in self.workers.iter() {
            let WorkerState::Busy(job) = worker.state else {
                continue;
            };
            let threshold = self.services[worker.service]
                .config()
                .request_slowlog_timeout_ms;
            let Some(request) = self.requests.get_mut(job.request) else {
                continue;
            };
            let Some(dispatched) = request.dispatched else {
                continue;
            };
            let elapsed = now.saturating_duration_since(dispatched);
            if threshold == 0 || request.slow_logged || elapsed < Duration::from_millis(threshold) {
                continue;
            }
            request.slow_logged = true;
            tracing::warn!(
                service = %self.services[worker.service].name,
                request_id = request.caller_request_id,
                pid = worker.pid,
                elapsed_ms = elapsed.as_millis() as u64,
                caller = %access_log::caller_text(request.caller),
                "slow request: still running {} ms after its worker took it \
                 (request_slowlog_timeout_ms = {threshold})",
                elapsed.as_millis()
            );
        }
    }

    /// The worker `index` is being stopped because its request ran past `request_timeout_ms`:
    /// say which request that was, and whose, not only that a worker exits.
    pub(super) fn log_timed_out_request(&self, index: WorkerHandle) {
        let worker = &self.workers[index];
        let WorkerState::Busy(job) = worker.state else {
            return;
        };
        let Some(request) = self.requests.get(job.request) else {
            return;
        };
        let elapsed = request
            .dispatched
            .map_or(Duration::ZERO, |d| self.now.saturating_duration_since(d));
        let service = &self.services[worker.service];
        tracing::warn!(
            service = %service.name,
            request_id = request.caller_request_id,
            pid = worker.pid,
            elapsed_ms = elapsed.as_millis() as u64,
            caller = %access_log::caller_text(request.caller),
            "request timed out after {} ms (request_timeout_ms = {}); its worker is killed \
             and replaced",
            elapsed.as_millis(),
            service.config().request_timeout_ms
        );
    }
}
