//! The pool glue: the policy's actions turned into spawns, dispatches, rejections and stops.

use super::*;

impl Core {
    /// A pool got an event: its actions run once the current handler is done
    /// ([`Core::run_effects`]), so no handler runs another owner's code in the middle of its
    /// own (and none can free what its caller still holds).
    pub(super) fn pool_touched(&mut self, service: ServiceSlot) {
        if !self.pools_touched_set[service] {
            self.pools_touched_set[service] = true;
            self.pools_touched.push(service);
        }
    }

    /// The one place the pools' actions are carried out, called by the loop after every
    /// completion and after its timers: every touched pool's actions, until none is left (an
    /// action may touch a pool again). Bounded by the number of services at any moment.
    pub(super) fn run_effects(&mut self) {
        loop {
            // Answers queued for callers: counted against their bounds, sent, and their
            // connections closed if they are done.
            self.settle_touched_conns();
            while let Some(service) = self.pools_touched.pop() {
                self.pools_touched_set[service] = false;
                self.run_pool_actions(service);
            }
            // Connections paused for backpressure that have room again (their new requests
            // touch pools: round again).
            self.resume_paused();
            if self.pools_touched.is_empty() && self.conns_touched.is_empty() {
                return;
            }
        }
    }

    fn run_pool_actions(&mut self, service: ServiceSlot) {
        while let Some(action) = self.services[service].pool.next_action() {
            match action {
                Action::Spawn => self.request_spawn(service),
                Action::Dispatch { request, worker } => self.dispatch(
                    RequestHandle::from_raw(request),
                    WorkerHandle::from_raw(worker),
                ),
                Action::Reject {
                    request,
                    code,
                    reason,
                } => {
                    let request = RequestHandle::from_raw(request);
                    if !self.request_is_live(request) {
                        // Answered already: a reply sent from a slot can race its timeout.
                        continue;
                    }
                    let message = self.reject_message(service, request, reason);
                    self.fail_request(request, code, &message);
                }
                Action::Stop { worker, reason } => {
                    self.stop_worker(WorkerHandle::from_raw(worker), reason)
                }
                Action::Kill { worker } => {
                    let worker = &self.workers[WorkerHandle::from_raw(worker)];
                    tracing::debug!(pid = worker.pid, "killing a worker");
                    kill(worker, libc::SIGKILL);
                }
            }
        }
    }

    pub(super) fn reject_message(
        &self,
        service: ServiceSlot,
        request: RequestHandle,
        reason: RejectReason,
    ) -> String {
        let name = &self.services[service].name;
        let policy = self.services[service].pool.policy();
        let waited = self
            .now
            .saturating_duration_since(self.requests[request].arrived);
        match reason {
            RejectReason::BacklogFull => {
                let config = self.services[service].config();
                format!(
                    "service {name} is at max_workers ({}) and its backlog is full ({})",
                    config.max_workers, config.backlog_max
                )
            }
            RejectReason::BacklogTimeout => {
                format!(
                    "service {name}: waited {} ms for a worker",
                    waited.as_millis()
                )
            }
            RejectReason::DeadlineExceeded => format!(
                "service {name}: the caller's deadline passed after {} ms waiting for a worker",
                waited.as_millis()
            ),
            RejectReason::WorkerStopped => format!(
                "service {name}: queued on a worker that was stopped (the request ahead of it \
                 timed out); it may or may not have run"
            ),
            RejectReason::RequestTimeout => format!(
                "service {name}: the request ran longer than {} ms; its worker is being replaced",
                policy.request_timeout.unwrap_or_default().as_millis()
            ),
            RejectReason::Failing => format!(
                "service {name} cannot keep workers running (crash loop; see the bridge log); \
                 retry later"
            ),
            RejectReason::ShuttingDown => "the bridge is shutting down".to_string(),
            RejectReason::Draining => format!(
                "service {name} is drained by an operator (acgi-bridge drain) and takes no \
                 requests until `acgi-bridge resume {name}`"
            ),
        }
    }

    pub(super) fn pools_stopped(&self) -> bool {
        self.services.iter().all(|s| s.pool.is_stopped())
    }

    pub(super) fn request_spawn(&mut self, service: ServiceSlot) {
        let entry = &self.services[service];
        self.spawner.request(SpawnRequest {
            slot: service,
            service_index: entry.config_index,
            config: Arc::clone(&entry.config),
        });
    }

    pub(super) fn dispatch(&mut self, request: RequestHandle, worker: WorkerHandle) {
        if self.requests[request].direct {
            self.dispatch_direct(request, worker);
            return;
        }
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        let entry = &mut self.requests[request];
        let payload = std::mem::take(&mut entry.payload);
        let remaining_ms = entry
            .deadline
            .map(|d| d.saturating_duration_since(self.now).as_millis().max(1) as u64)
            .unwrap_or(0);
        // (Indexing checks the handle: a stale worker panics, naming it.)
        let w = &mut self.workers[worker];
        let lent = matches!(w.slot_use, SlotUse::Lent { .. });
        if w.state != WorkerState::Idle || lent {
            // A queued job: the payload follows on the socket, inline, and the worker answers
            // it inline. Either behind the one it is running (a worker that takes them), or, for
            // an idle worker whose slot is still being sent from, as the job it runs next.
            assert!(
                w.accepts_queue && matches!(w.state, WorkerState::Idle | WorkerState::Busy(_)),
                "a queued job for a worker that does not take them, or in {:?}",
                w.state
            );
            let mut header = Header::new(Kind::Job, 0, sequence, payload.len() as u32);
            header.flags = proto::FLAG_QUEUED;
            proto::encode_frame(w.send.tail(), &header, &payload);
            let job = Job {
                request,
                sequence,
                path: JobPath::Queued,
                frame_end: w.send.end_position(),
            };
            if w.state == WorkerState::Idle {
                w.state = WorkerState::Busy(job);
            } else {
                w.queued.push_back(job);
            }
            let counters = &mut self.services[w.service].counters;
            counters.bytes_in += payload.len() as u64;
            self.requests[request].dispatched = Some(self.now);
            self.requests[request].payload = payload;
            self.arm_worker_send(worker);
            return;
        }
        let in_slot = payload.len() <= w.slot.capacity() as usize;
        let counters = &mut self.services[w.service].counters;
        counters.bytes_in += payload.len() as u64;
        counters.copy_path += u64::from(!in_slot);
        self.requests[request].dispatched = Some(self.now);
        let filled = w
            .slot
            .fill(sequence, in_slot.then_some(&payload[..]), remaining_ms);
        let mut header = Header::new(Kind::Job, 0, sequence, 0);
        if in_slot {
            header.flags = FLAG_IN_SLOT;
            w.send.tail().extend_from_slice(&header.encode());
        } else {
            header.payload_len = payload.len() as u32;
            proto::encode_frame(w.send.tail(), &header, &payload);
        }
        w.state = WorkerState::Busy(Job {
            request,
            sequence,
            path: JobPath::Slot,
            frame_end: w.send.end_position(),
        });
        self.requests[request].payload = payload;
        match filled {
            Ok(()) => self.arm_worker_send(worker),
            Err(error) => self.fail_worker(worker, WorkerFault::Slot(error)),
        }
    }
}
