//! The worker room: everything between the bridge and one worker process. Here: spawn
//! results, the handshake, jobs and answers, retirement and reaping.
//!
//! - `state.rs`: `Worker`, `WorkerState` (with the running `Job` and a bounded queue),
//!   `SlotUse` (`Free | Filling | Lent`), with the state x event tables in `LIFECYCLE.md`;
//! - `answer.rs`: `check_frame`, a worker's frame judged against its state (pure, fuzzed), and
//!   `take_reply`, the slot step of an accepted answer;
//! - `fault.rs`: `WorkerFault`, why a worker was killed (its message and counter label);
//! - `slot_send.rs`: the one hand-off from a worker's slot to a caller (a reply sent straight
//!   from it);
//! - `output.rs`: a worker's stdout and stderr, in lines, within its service's budget.

pub(crate) mod answer;
pub(super) mod fault;
pub(super) mod output;
mod slot_send;
pub(super) mod state;

use super::*;
use crate::engine::io::{Reap, Reaped};
use answer::{check_frame, take_reply, Answer, Verdict, WorkerView};

impl Core {
    pub(super) fn on_spawned(&mut self, result: SpawnResult) {
        let service = result.slot;
        let name = self.services[service].name.clone();
        let spawned: Spawned = match result.result {
            Ok(spawned) => spawned,
            Err(error) => {
                self.services[service].counters.spawn_failures[error.index()] += 1;
                let message = format!("service {name}: {error}");
                tracing::error!(service = %name, reason = error.label(), "{message}");
                let now = self.now;
                let was_failing = self.services[service].pool.is_failing();
                self.services[service].pool.on_spawn_failed(now);
                self.log_pool_health(service, was_failing, &message);
                self.pool_touched(service);
                return;
            }
        };
        let reap = match Reap::new(spawned.pid) {
            Ok(reap) => reap,
            Err(error) => return self.abandon_spawned(service, spawned, &error),
        };
        tracing::info!(service = %name, pid = spawned.pid, "worker spawned");
        debug_assert_eq!(
            spawned.slot.capacity(),
            self.services[service].slot_capacity
        );
        let buffer_index = self.register_slot(&spawned.slot);
        let index = self.workers.insert(Worker {
            service,
            pid: spawned.pid,
            control: spawned.control,
            slot: spawned.slot,
            state: WorkerState::Starting,
            read: ReadBuffer::new(WORKER_READ_BYTES),
            recv_in_flight: false,
            send: SendQueue::default(),
            stdout: PipeLog::new(spawned.stdout),
            stderr: PipeLog::new(spawned.stderr),
            reap,
            fate: None,
            buffer_index,
            accepts_queue: false,
            queued: VecDeque::new(),
            slot_use: SlotUse::Free,
            file: None,
        });
        self.workers[index].file = self.register_file(self.workers[index].control.as_raw_fd());
        self.arm_worker_wait(index);
        self.arm_worker_recv(index);
        self.arm_worker_pipe(index, false);
        self.arm_worker_pipe(index, true);
        let now = self.now;
        self.services[service]
            .pool
            .on_worker_started(now, index.to_raw());
        self.pool_touched(service);
    }

    /// A worker the core cannot reap (its pidfd could not be opened, e.g. out of descriptors):
    /// killed and left to the orphan reaper (no longer registered, it is swept within
    /// `ORPHAN_SWEEP_INTERVAL`); the pool counts a failed spawn.
    fn abandon_spawned(&mut self, service: ServiceSlot, spawned: Spawned, error: &io::Error) {
        let name = &self.services[service].name;
        tracing::error!(
            service = %name,
            pid = spawned.pid,
            %error,
            "cannot open the new worker's pidfd to reap it: killed it (raise RLIMIT_NOFILE if \
             descriptors ran out)"
        );
        // The child just spawned, not reaped (nobody reaps it before the registry forgets it,
        // below), and the group it leads.
        crate::engine::io::signal_worker(spawned.pid, libc::SIGKILL);
        crate::confine::forget_worker(spawned.pid);
        let now = self.now;
        self.services[service].pool.on_spawn_failed(now);
        self.pool_touched(service);
    }

    pub(super) fn arm_worker_wait(&mut self, index: WorkerHandle) {
        let worker = &mut self.workers[index];
        let token = Token::worker(OpKind::WorkerWait, index);
        let entry = worker.reap.arm(worker.pid, token);
        self.ring.push(entry);
    }

    pub(super) fn arm_worker_recv(&mut self, index: WorkerHandle) {
        let max = self.config.max_payload_bytes;
        let worker = &mut self.workers[index];
        if worker.recv_in_flight || worker.state == WorkerState::Dead {
            return;
        }
        let needed = worker.read.frame_bytes_needed(max);
        worker.read.prepare_read(needed);
        let fd = Target::of(&worker.control, worker.file);
        let token = Token::worker(OpKind::WorkerRecv, index);
        let entry = op::recv(fd, worker.read.spare(), token);
        worker.recv_in_flight = true;
        self.ring.push(entry);
    }

    pub(super) fn arm_worker_send(&mut self, index: WorkerHandle) {
        let worker = &mut self.workers[index];
        if worker.state == WorkerState::Dead || matches!(worker.slot_use, SlotUse::Filling { .. }) {
            return;
        }
        let token = Token::worker(OpKind::WorkerSend, index);
        if let Some(entry) = send_entry(
            &mut worker.send,
            Target::of(&worker.control, worker.file),
            token,
        ) {
            self.ring.push(entry);
        }
    }

    pub(super) fn on_worker_send(&mut self, index: WorkerHandle, result: Result<u32, Errno>) {
        let worker = &mut self.workers[index];
        worker.send.complete(result.unwrap_or(0) as usize);
        if worker.state == WorkerState::Dead {
            return;
        }
        if !matches!(result, Ok(1..)) {
            let what = format!(
                "control socket send failed: {}",
                result.map_or_else(|e| e.to_string(), |_| "nothing sent".to_string())
            );
            self.lose_worker(index, WorkerFault::ControlSocket(what));
            return;
        }
        self.arm_worker_send(index);
    }

    pub(super) fn on_worker_recv(&mut self, index: WorkerHandle, result: Result<u32, Errno>) {
        let worker = &mut self.workers[index];
        worker.recv_in_flight = false;
        if worker.state == WorkerState::Dead {
            return;
        }
        let received = match result {
            Err(error) => {
                let what = format!("control socket failed: {error}");
                self.lose_worker(index, WorkerFault::ControlSocket(what));
                return;
            }
            Ok(n) => n as usize,
        };
        if received == 0 {
            if worker.state != WorkerState::Stopping {
                let what = "closed its control socket".to_string();
                self.lose_worker(index, WorkerFault::ControlSocket(what));
            }
            return;
        }
        worker.read.commit(received);
        let max = self.config.max_payload_bytes;
        loop {
            let Some(worker) = self.workers.get_mut(index) else {
                return;
            };
            if worker.state == WorkerState::Dead {
                return;
            }
            match worker.read.parse(max) {
                Parsed::NeedMore => break,
                Parsed::Bad(error) => {
                    self.fail_worker(index, WorkerFault::BadFrame(error));
                    return;
                }
                Parsed::Frame(header) => {
                    self.on_worker_frame(index, header);
                    if let Some(worker) = self.workers.get_mut(index) {
                        if worker.state != WorkerState::Dead {
                            worker
                                .read
                                .consume(HEADER_BYTES + header.payload_len as usize);
                        }
                    }
                }
            }
        }
        self.arm_worker_recv(index);
    }

    pub(super) fn on_worker_frame(&mut self, index: WorkerHandle, header: Header) {
        let worker = &mut self.workers[index];
        let service = worker.service;
        let payload = worker.read.payload(&header);
        let verdict = check_frame(&header, payload, WorkerView::of(worker));
        match verdict {
            Ok(Verdict::Ignored) => {}
            Ok(Verdict::Ready { accepts_queue }) => {
                worker.state = WorkerState::Idle;
                let id = index.to_raw();
                tracing::debug!(pid = worker.pid, "worker ready");
                let now = self.now;
                worker.accepts_queue = accepts_queue;
                let why = format!("worker {} finished its handshake", worker.pid);
                let was_failing = self.services[service].pool.is_failing();
                self.services[service]
                    .pool
                    .on_worker_ready_queueing(now, id, accepts_queue);
                self.log_pool_health(service, was_failing, &why);
                self.pool_touched(service);
            }
            Ok(Verdict::Answer(answer)) => {
                let job = *worker.running().expect("an answer is to the running job");
                self.on_job_answer(index, job, header, answer);
            }
            Err(fault) => self.fail_worker(index, fault),
        }
    }

    /// The busy worker answered its job: validate the slot, forward the reply, free the worker.
    pub(super) fn on_job_answer(
        &mut self,
        index: WorkerHandle,
        job: Job,
        header: Header,
        answer: Answer,
    ) {
        let Job {
            request, sequence, ..
        } = job;
        let (origin, caller_request_id, service) = {
            let entry = &self.requests[request];
            (entry.origin, entry.caller_request_id, entry.service)
        };
        let service_id = self.services[service].id;
        let dest = match origin {
            Origin::Conn(conn) => self.live_conn(conn).map(Dest::Conn),
            Origin::Core { core, request } => Some(Dest::Core { core, request }),
        };
        let conn = match dest {
            Some(Dest::Conn(conn)) => Some(conn),
            _ => None,
        };
        let in_slot = answer.in_slot;
        let counters = &mut self.services[service].counters;
        counters.copy_path += u64::from(answer.ok && !in_slot && !answer.queued);
        if in_slot {
            let reply = Header::new(Kind::Reply, service_id, caller_request_id, 0);
            if self.try_send_from_slot(index, request, sequence, conn, reply) {
                return;
            }
        }
        let mut target = match dest {
            Some(Dest::Conn(conn)) => std::mem::take(self.conns[conn].send.tail()),
            Some(Dest::Core { .. }) => self.spare_buffer(),
            None => std::mem::take(&mut self.scratch),
        };
        let worker = &mut self.workers[index];
        let start = target.len();
        target.extend_from_slice(&[0; HEADER_BYTES]);
        let taken = take_reply(&answer, &worker.slot, &mut target);
        let reply_header = match (&taken, header.kind) {
            (Err(_), _) => None,
            (Ok(_), Kind::Done) => {
                if !in_slot {
                    target.extend_from_slice(worker.read.payload(&header));
                }
                let len = (target.len() - start - HEADER_BYTES) as u32;
                self.services[service].counters.bytes_out += len as u64;
                Some(Header::new(Kind::Reply, service_id, caller_request_id, len))
            }
            (Ok(_), _) => {
                target.extend_from_slice(worker.read.payload(&header));
                let len = (target.len() - start - HEADER_BYTES) as u32;
                Some(Header::error(
                    caller_request_id,
                    service_id,
                    ErrorCode::ServiceError,
                    len,
                ))
            }
        };
        match reply_header {
            Some(reply_header) => {
                target[start..start + HEADER_BYTES].copy_from_slice(&reply_header.encode());
            }
            None => target.truncate(start),
        }
        let reply_bytes = reply_header.map_or(0, |h| h.payload_len);
        let mut frame = None;
        match dest {
            Some(Dest::Conn(conn)) => *self.conns[conn].send.tail() = target,
            Some(Dest::Core { .. }) => frame = Some(target),
            None => {
                target.clear();
                self.scratch = target;
            }
        }
        if let Err(error) = taken {
            self.fail_worker(index, WorkerFault::Slot(error));
            return;
        }
        let ok = header.kind == Kind::Done;
        let outcome = (!ok).then_some(ErrorCode::ServiceError);
        match self.finish_request(request, outcome, reply_bytes) {
            Some(Dest::Conn(conn)) => self.conn_touched(conn),
            Some(Dest::Core { core, request }) => {
                let frame = frame.expect("built for the core");
                self.send_answer(core, request, frame);
            }
            None => {}
        }
        self.advance(index);
        self.job_done(index);
    }

    /// The worker's running job is answered: the next queued one (already on its socket) is
    /// running now, or the worker is idle.
    pub(super) fn advance(&mut self, index: WorkerHandle) {
        let worker = &mut self.workers[index];
        worker.state = match worker.queued.pop_front() {
            Some(job) => WorkerState::Busy(job),
            None => WorkerState::Idle,
        };
    }

    /// Tell the pool the worker finished its job (measuring its memory when the policy
    /// recycles on it).
    pub(super) fn job_done(&mut self, index: WorkerHandle) {
        let worker = &self.workers[index];
        let id = index.to_raw();
        let service = worker.service;
        let rss = self.services[service]
            .pool
            .policy()
            .max_rss_bytes
            .and_then(|_| rss_bytes(worker.pid));
        let now = self.now;
        self.services[service].pool.on_job_done(now, id, rss);
        self.pool_touched(service);
    }

    /// A worker broke the protocol: kill it, take it out of the pool, and answer the request
    /// it held with `worker failed`.
    pub(super) fn fail_worker(&mut self, index: WorkerHandle, fault: WorkerFault) {
        let worker = &self.workers[index];
        // (Once Dead, the pool was told and the fault counted: one worker, one fault.)
        if worker.state != WorkerState::Dead {
            let service = worker.service;
            self.services[service].counters.worker_faults[fault.index()] += 1;
        }
        self.retire_worker(index, &fault.to_string(), Gone::Violation);
    }

    /// The worker closed its control socket (or it broke): it is dying or hostile. Kill it to
    /// be sure and let the reap (which then comes at once) retire it with its exit status.
    pub(super) fn lose_worker(&mut self, index: WorkerHandle, fault: WorkerFault) {
        let worker = &mut self.workers[index];
        // Lost already (its fate set: a failed send after the closed socket, say): one worker,
        // one fault counted, until its reap retires it.
        if matches!(worker.state, WorkerState::Dead | WorkerState::Stopping)
            || worker.fate.is_some()
        {
            return;
        }
        self.services[worker.service].counters.worker_faults[fault.index()] += 1;
        worker.fate = Some(fault.to_string());
        kill(worker, libc::SIGKILL);
    }

    /// Take a worker out of service for good and tell the pool (once). The request it held, if
    /// any and not yet answered, gets `worker failed`.
    pub(super) fn retire_worker(&mut self, index: WorkerHandle, reason: &str, how: Gone) {
        let worker = &mut self.workers[index];
        let previous = worker.state;
        // Dead: the pool has been told (exactly once).
        if previous == WorkerState::Dead {
            return;
        }
        worker.state = WorkerState::Dead;
        worker.fate.get_or_insert_with(|| reason.to_string());
        let service = worker.service;
        let id = index.to_raw();
        let pid = worker.pid;
        kill(worker, libc::SIGKILL);
        worker.slot.reset();
        let name = &self.services[service].name;
        match previous {
            WorkerState::Starting => {
                tracing::warn!(service = %name, pid, "worker failed to start: {reason}")
            }
            WorkerState::Idle | WorkerState::Busy { .. } | WorkerState::Lending => {
                tracing::warn!(service = %name, pid, "worker failed: {reason}")
            }
            WorkerState::Stopping | WorkerState::Dead => {}
        }
        let now = self.now;
        let was_failing = self.services[service].pool.is_failing();
        let held = self.services[service].pool.on_worker_gone(now, id, how);
        self.log_pool_health(service, was_failing, reason);
        // What this worker was given: its running job and the jobs queued behind it. The pool
        // may hold more for it, requests it dispatched to it whose `Dispatch` the loop had
        // not carried out yet (decided when it answered a job, then gone in the same read):
        // those never reached the worker, so they go back to the pool to run elsewhere.
        let given: Vec<RequestHandle> = match previous {
            WorkerState::Busy(job) => std::iter::once(job.request)
                .chain(self.workers[index].queued.iter().map(|job| job.request))
                .collect(),
            _ => Vec::new(),
        };
        self.workers[index].queued.clear();
        for request in held.into_iter().map(RequestHandle::from_raw) {
            // (A Lending worker's request is already answered: its reply is being sent.)
            if !self.request_is_live(request) {
                continue;
            }
            if given.contains(&request) {
                let message = format!("the worker (pid {pid}) failed: {reason}");
                self.fail_request(request, ErrorCode::WorkerFailed, &message);
            } else {
                self.counters.requests_requeued += 1;
                let deadline = self.requests[request].deadline;
                let pool = &mut self.services[service].pool;
                pool.on_request(now, request.to_raw(), deadline);
            }
        }
        self.pool_touched(service);
    }

    /// After a pool event: log the service turning `failing` (WARN) or recovering (INFO) if
    /// that event changed it, with `why` (the event's cause). Each core's shard of the pool
    /// has its own breaker, so each core logs its own (`core` in the line).
    pub(super) fn log_pool_health(&self, service: ServiceSlot, was_failing: bool, why: &str) {
        let pool = &self.services[service].pool;
        let name = &self.services[service].name;
        let core = self.index;
        match (was_failing, pool.is_failing()) {
            (false, true) => {
                let policy = pool.policy();
                tracing::warn!(
                    service = %name,
                    %core,
                    reason = why,
                    "service is failing: {} crashes or failed starts within {} ms \
                     (crash_limit, crash_window_ms); requests are refused with `service \
                     unavailable` and restarts back off; last: {why}",
                    policy.crash_limit,
                    policy.crash_window.as_millis()
                );
            }
            (true, false) => tracing::info!(
                service = %name,
                %core,
                reason = why,
                "service recovered: {why}; serving again"
            ),
            _ => {}
        }
    }

    /// The policy stopped a worker: close its control socket (the SDK exits on EOF) and send
    /// SIGTERM; the policy sends `Kill` after the grace period if it is still there.
    pub(super) fn stop_worker(&mut self, index: WorkerHandle, reason: StopReason) {
        let worker = &mut self.workers[index];
        if matches!(worker.state, WorkerState::Dead | WorkerState::Stopping) {
            return;
        }
        if matches!(reason, StopReason::TimedOut) {
            self.log_timed_out_request(index);
        }
        let worker = &mut self.workers[index];
        worker.state = WorkerState::Stopping;
        // Jobs queued behind its running one are answered by the pool's rejections.
        worker.queued.clear();
        worker.fate = Some(
            match reason {
                StopReason::Idle => "stopped: idle",
                StopReason::Recycled => "recycled",
                StopReason::TimedOut => "stopped: request timed out",
                StopReason::StartupTimeout => "stopped: no handshake in time",
                StopReason::Shutdown => "stopped: shutdown",
                StopReason::Killed => "killed by an operator (acgi-bridge kill-worker)",
            }
            .to_string(),
        );
        let _ = rustix::net::shutdown(&worker.control, rustix::net::Shutdown::Write);
        kill(worker, libc::SIGTERM);
    }

    pub(super) fn on_worker_reaped(&mut self, index: WorkerHandle, result: Result<u32, Errno>) {
        let worker = &mut self.workers[index];
        let status = match worker.reap.complete(result) {
            Reaped::Exited => worker.reap.exit().to_string(),
            Reaped::Lost => {
                tracing::error!(pid = worker.pid, "the worker was reaped by someone else");
                "status unknown (reaped elsewhere)".to_string()
            }
            Reaped::Again => return self.arm_worker_wait(index),
            Reaped::Failed(error) => {
                tracing::error!(pid = worker.pid, %error, "waiting for the worker failed; retrying");
                return self.arm_worker_wait(index);
            }
        };
        crate::confine::forget_worker(worker.pid);
        let reason = match &worker.fate {
            Some(fate) => format!("{fate} ({status})"),
            None => status.clone(),
        };
        self.retire_worker(index, &reason, Gone::Exited);
        let worker = &mut self.workers[index];
        let service = &self.services[worker.service].name;
        let fate = worker.fate.as_deref().unwrap_or("exited");
        tracing::info!(service = %service, pid = worker.pid, reason = fate, "worker exited: {status}");
        // The process is gone: nothing more will come on its descriptors except EOF; cancel
        // reads that a surviving grandchild could keep open.
        let (recv, out, err) = (
            worker.recv_in_flight,
            worker.stdout.in_flight(),
            worker.stderr.in_flight(),
        );
        if recv {
            self.ring.cancel(Token::worker(OpKind::WorkerRecv, index));
        }
        if out {
            self.ring.cancel(Token::worker(OpKind::WorkerStdout, index));
        }
        if err {
            self.ring.cancel(Token::worker(OpKind::WorkerStderr, index));
        }
    }

    pub(super) fn free_worker_if_done(&mut self, index: WorkerHandle) {
        let Some(worker) = self.workers.get(index) else {
            return;
        };
        if worker.reap.is_reaped() && !worker.ops_in_flight() {
            debug_assert_eq!(worker.state, WorkerState::Dead);
            let worker = self.workers.remove(index);
            if let Some(buffer_index) = worker.buffer_index {
                self.unregister_slot(buffer_index);
            }
            if let Some(file) = worker.file {
                self.unregister_file(file);
            }
        }
    }
}

/// Resident memory of a process, from /proc/PID/statm (pages × page size).
pub(super) fn rss_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

pub(super) fn kill(worker: &Worker, signal: i32) {
    // Never signal a reaped pid: it may belong to another process by now. The group gets the
    // signal too (see `io::signal_worker`, the one place that signals workers).
    if !worker.reap.is_reaped() {
        crate::engine::io::signal_worker(worker.pid, signal);
    }
}
