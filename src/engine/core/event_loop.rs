//! The loop: one `submit_and_wait` per turn, completions drained into a batch and routed to
//! their owners by token kind, then timers.

use super::*;

impl Core {
    /// Run until shutdown completes.
    pub fn run(&mut self) -> io::Result<()> {
        let spin =
            (self.config.idle_spin_us > 0).then(|| Duration::from_micros(self.config.idle_spin_us));
        loop {
            if let Some(spin) = spin {
                self.spin(spin)?;
            }
            let timeout = self
                .next_deadline()
                .map(|deadline| deadline.saturating_duration_since(Instant::now()));
            self.ring.submit_and_wait(timeout)?;
            if self.turn(Instant::now())? {
                return Ok(());
            }
        }
    }

    /// One turn after the wait, at `now`: the completions in batches (each followed by the
    /// effects it left and, in debug builds, the invariants), timers, and this core's share of
    /// the cross-core work. True once the core has finished. (The simulation calls this with
    /// its own clock, between the completions it makes.)
    pub(crate) fn turn(&mut self, now: Instant) -> io::Result<bool> {
        self.now = now;
        loop {
            self.ring
                .drain(&mut self.completions, COMPLETIONS_BATCH_MAX);
            if self.completions.is_empty() {
                break;
            }
            for index in 0..self.completions.len() {
                let completion = self.completions[index];
                self.complete(completion);
                self.run_effects();
                #[cfg(debug_assertions)]
                self.check_invariants();
            }
        }
        if self.shared.cores.len() > 1 {
            self.rebalance();
        }
        self.on_timers();
        self.run_effects();
        self.check_reload();
        #[cfg(debug_assertions)]
        self.check_invariants();
        if self.shared.cores.len() > 1 {
            self.publish();
        }
        if self.finished() {
            // Wake-ups and answers for other cores may still sit in the submission queue.
            self.ring.submit()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Before sleeping, poll the ring for a while: a wake-up to a vCPU that is running costs a
    /// few microseconds, one to a halted vCPU tens.
    pub(super) fn spin(&mut self, budget: Duration) -> io::Result<()> {
        let until = Instant::now() + budget;
        loop {
            if self.ring.poll()? || Instant::now() >= until {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = self.stop_deadline();
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        };
        for service in &self.services {
            consider(service.pool.next_deadline());
        }
        for listener in &self.listeners {
            consider(listener.rearm_at);
        }
        if self.retired_unfolded > 0 {
            consider(Some(self.next_fold_check));
        }
        let caller_timeouts =
            self.config.caller_frame_timeout_ms > 0 || self.config.caller_idle_timeout_ms > 0;
        let slow_log = self.config.slowlog_enabled() && !self.requests.is_empty();
        if (caller_timeouts && !self.conns.is_empty()) || slow_log {
            consider(Some(self.next_caller_sweep));
        }
        consider(
            self.direct_deadlines
                .front()
                .map(|(deadline, _, _)| *deadline),
        );
        deadline
    }

    pub(super) fn on_timers(&mut self) {
        let now = self.now;
        self.fold_drained();
        self.expire_direct_reads();
        if now >= self.next_caller_sweep {
            self.sweep_callers();
        }
        for service in self.services.indices() {
            if self.services[service]
                .pool
                .next_deadline()
                .is_some_and(|t| t <= now)
            {
                let was_failing = self.services[service].pool.is_failing();
                self.services[service].pool.tick(now);
                let why = "a worker did not finish its handshake within startup_timeout_ms";
                self.log_pool_health(service, was_failing, why);
                self.pool_touched(service);
            }
        }
        for index in self.listeners.indices() {
            if self.listeners[index].rearm_at.is_some_and(|t| t <= now) {
                self.listeners[index].rearm_at = None;
                self.arm_accept(index);
            }
        }
        if self.stop_deadline().is_some_and(|t| t <= now) {
            self.on_stop_deadline();
        }
    }

    pub(super) fn complete(&mut self, completion: Completion) {
        let Some(token) = Token::decode(completion.user_data) else {
            debug_assert!(
                false,
                "completion with a foreign user_data {:#x}",
                completion.user_data
            );
            return;
        };
        let result = completion.result;
        match token.kind {
            OpKind::Accept => self.on_accept(token.listener(), completion),
            OpKind::ConnRecv
            | OpKind::ConnRecvSlot
            | OpKind::ConnRecvMulti
            | OpKind::ConnPoll
            | OpKind::ConnSend
            | OpKind::ConnSendHeader
            | OpKind::ConnSendFixed => {
                let index = token.conn_handle();
                let live = self.conns.contains(index);
                debug_assert!(live, "stale connection completion {token:?}");
                if !live {
                    return;
                }
                match token.kind {
                    OpKind::ConnRecv => self.on_conn_recv(index, result),
                    OpKind::ConnRecvSlot => self.on_conn_recv_slot(index, result),
                    OpKind::ConnRecvMulti => self.on_conn_recv_multi(index, completion),
                    OpKind::ConnPoll => self.on_conn_poll(index, result),
                    OpKind::ConnSend => self.on_conn_send(index, result),
                    kind => self.on_slot_send(index, kind == OpKind::ConnSendHeader, result),
                }
            }
            OpKind::WorkerRecv
            | OpKind::WorkerSend
            | OpKind::WorkerStdout
            | OpKind::WorkerStderr
            | OpKind::WorkerWait => {
                let index = token.worker_handle();
                let live = self.workers.contains(index);
                debug_assert!(live, "stale worker completion {token:?}");
                if !live {
                    return;
                }
                match token.kind {
                    OpKind::WorkerRecv => self.on_worker_recv(index, result),
                    OpKind::WorkerSend => self.on_worker_send(index, result),
                    OpKind::WorkerStdout => self.on_worker_pipe(index, false, result),
                    OpKind::WorkerStderr => self.on_worker_pipe(index, true, result),
                    _ => self.on_worker_reaped(index, result),
                }
                self.free_worker_if_done(index);
            }
            OpKind::SpawnWake => self.on_spawn_wake(),
            OpKind::Inbox => self.on_inbox(result),
            OpKind::WakeSent => {
                if let Err(error) = result {
                    tracing::error!(%error, "cannot wake another core");
                }
            }
            OpKind::Cancel => {}
        }
    }
}
