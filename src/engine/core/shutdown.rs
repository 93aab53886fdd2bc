//! Shutdown: stop accepting, drain the pools, force what is left after the timeout, and end
//! the loop once every core is done.

use super::*;

impl Core {
    pub(super) fn begin_shutdown(&mut self) {
        let timeout = Duration::from_millis(self.config.shutdown_timeout_ms);
        self.shutdown_deadline = Some(self.now + timeout);
        for index in 0..self.listeners.len() {
            self.listeners[index].rearm_at = None;
            if self.listeners[index].accept_in_flight {
                self.ring.cancel(Token::core(OpKind::Accept, index));
            }
        }
        for service in 0..self.services.len() {
            let now = self.now;
            self.services[service].pool.begin_stop(now);
            self.pool_touched(service);
        }
        let conns = self.conns.handles();
        for index in conns {
            self.close_conn_if_finished(index);
        }
    }

    /// The shutdown timeout passed: answer every request still running or queued with
    /// `shutting down`, kill every worker, and give the answers a moment to go out.
    pub(super) fn force_shutdown(&mut self) {
        tracing::warn!("shutdown timeout passed: failing requests still in flight");
        let mut held = Vec::new();
        for (_, worker) in self.workers.iter_mut() {
            worker
                .fate
                .get_or_insert_with(|| "killed: the bridge's shutdown timeout passed".into());
            if let WorkerState::Busy(Job { request, .. }) = worker.state {
                held.push(request);
            }
            held.extend(worker.queued.iter().map(|job| job.request));
        }
        for request in held {
            if self.request_is_live(request) {
                let message = "the bridge's shutdown timeout passed while it ran";
                self.fail_request(request, ErrorCode::ShuttingDown, message);
            }
        }
        for service in 0..self.services.len() {
            self.services[service].pool.abort(ErrorCode::ShuttingDown);
            self.pool_touched(service);
        }
    }

    /// Whether the loop may end: this core's work is done and so is every other core's (a
    /// core that is done keeps answering report requests until all are).
    pub(super) fn finished(&mut self) -> bool {
        if self.done {
            return self.all_cores_done();
        }
        if self.shutdown_deadline.is_none() || !self.pools_stopped() || !self.workers.is_empty() {
            return false;
        }
        let conns = self.conns.handles();
        for index in conns {
            self.close_conn_if_finished(index);
        }
        let mine_done = self.conns.is_empty()
            && self.listeners.iter().all(|l| !l.accept_in_flight)
            && self.shared.forwards_in_flight.load(Ordering::SeqCst) == 0
            && self.shared.inbox_empty(self.index);
        if !mine_done {
            return false;
        }
        self.done = true;
        let finished = self.shared.cores_finished.fetch_add(1, Ordering::SeqCst) + 1;
        if finished == self.shared.cores.len() {
            self.wake_all();
        }
        self.all_cores_done()
    }

    pub(super) fn all_cores_done(&self) -> bool {
        self.shared.all_cores_finished()
    }
}
