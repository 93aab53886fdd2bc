//! The one hand-off from a caller into a worker's slot: a large request's payload read from the
//! caller's socket straight into the slot of the worker it is dispatched to.

use crate::engine::core::*;

/// What `try_direct_read` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum DirectRead {
    /// A worker is committed and the rest of the payload is being read into its slot.
    Started,
    /// Not a direct read (the payload takes the copy path).
    No,
    /// A candidate whose payload has not begun to arrive: poll for it before deciding.
    AwaitPayload,
}

impl Core {
    /// The frame at the front of a caller's buffer is a request whose payload has not all
    /// arrived. When it is large, fits the service's slots, a worker of ours is idle and the
    /// rest of the payload is already in the socket (or half of it, and the worker is not the
    /// service's last idle one), dispatch it now and read the rest of its payload from the socket straight into that worker's
    /// slot: no copy through the bridge (only the part already read is copied). Otherwise
    /// the payload takes the copy path, and this is tried again as more of it arrives.
    pub(in crate::engine::core) fn try_direct_read(
        &mut self,
        index: ConnHandle,
        after_poll: bool,
    ) -> DirectRead {
        let max = self.config.max_payload_bytes;
        let conn = &self.conns[index];
        if conn.into_slot.is_some()
            || conn.discard > 0
            || conn.phase == Phase::Flushing
            || self.stopping()
        {
            return DirectRead::No;
        }
        let Some(header) = conn.read.peek_header(max) else {
            return DirectRead::No;
        };
        // (A caller's deadline travels in front of the payload: those take the copy path.)
        if header.kind != Kind::Request
            || header.flags != 0
            || header.payload_len < DIRECT_READ_BYTES_MIN
        {
            return DirectRead::No;
        }
        let Some(&service) = self.service_by_id.get(&header.service_id) else {
            return DirectRead::No;
        };
        if !self.may_call(index, service) {
            // Refused once the frame is whole (on_caller_frame).
            return DirectRead::No;
        }
        let pool = &self.services[service].pool;
        if header.payload_len > self.services[service].slot_capacity
            || pool.idle() == 0
            || !pool.takes_now()
        {
            return DirectRead::No;
        }
        if self.workers.iter().any(|(_, w)| {
            w.service == service
                && matches!(w.slot_use, SlotUse::Lent { .. })
                && w.state == WorkerState::Idle
        }) {
            // The policy might pick a worker whose slot is still being sent from.
            return DirectRead::No;
        }
        let prefix = conn.read.len() - HEADER_BYTES;
        debug_assert!(prefix < header.payload_len as usize);
        // Only once the payload is (mostly) here: a caller that sends slowly holds only its
        // own buffer, never a worker.
        let missing = (header.payload_len as usize - prefix) as u64;
        let spare_worker = pool.idle() > 1;
        let (arrived, whole, mostly) = if conn.recv == Recv::Multi {
            // Bytes a multishot receive takes are out of the socket at once: judge by what we
            // hold. (A large frame ends the multishot receives; then this is tried again.)
            let held = prefix as u64;
            (
                held,
                false,
                held * 2 >= u64::from(header.payload_len) && spare_worker,
            )
        } else {
            let arrived = rustix::io::ioctl_fionread(&conn.fd).unwrap_or(0);
            // (A payload larger than the socket holds can never be all there: half will do,
            // from a caller sending that fast, when the worker is not the last idle one.)
            (
                arrived,
                arrived >= missing,
                arrived * 2 >= missing && spare_worker,
            )
        };
        if !whole && !mostly {
            // Nothing of the rest here yet: wait for it in the socket (once; after the poll,
            // what has come is read the ordinary way and this is tried again).
            return if arrived == 0 && !after_poll && conn.recv != Recv::Multi {
                DirectRead::AwaitPayload
            } else {
                DirectRead::No
            };
        }
        self.conns[index].large_last = true;
        let now = self.now;
        let request = self.add_caller_request(index, header.request_id, service, Vec::new(), None);
        self.requests[request].direct = true;
        self.requests[request].request_bytes = header.payload_len;
        // An idle worker takes it at once, and the read into its slot must be set up before the
        // connection reads on: take that one dispatch now (the pool's other actions, a spawn
        // of a spare say, run with the rest after this handler).
        let pool = &mut self.services[service].pool;
        pool.on_request(now, request.to_raw(), None);
        let worker = pool.take_dispatch(request.to_raw());
        self.pool_touched(service);
        match worker {
            Some(worker) => {
                self.dispatch_direct(request, WorkerHandle::from_raw(worker));
                DirectRead::Started
            }
            None => {
                // Refused after all (its rejection answers it): skip its payload.
                let conn = &mut self.conns[index];
                conn.read.consume(HEADER_BYTES + prefix);
                conn.discard = (header.payload_len as usize - prefix) as u64;
                DirectRead::No
            }
        }
    }

    /// Bytes of the front request's payload not yet read from the socket (0 when there is no
    /// header at the front).
    fn payload_missing(&self, index: ConnHandle) -> u64 {
        let conn = &self.conns[index];
        let Some(header) = conn.read.peek_header(self.config.max_payload_bytes) else {
            return 0;
        };
        let prefix = conn.read.len().saturating_sub(HEADER_BYTES) as u64;
        u64::from(header.payload_len).saturating_sub(prefix)
    }

    /// The poll for a large request's payload completed: bytes (or the caller's EOF) have
    /// come. Start the direct read if the payload is (mostly) here now, else read what came
    /// the ordinary way.
    pub(in crate::engine::core) fn on_conn_poll(
        &mut self,
        index: ConnHandle,
        result: Result<u32, Errno>,
    ) {
        if !self.recv_ended(index) {
            // (A flushing connection's poll: no worker is committed to it.)
            return;
        }
        let conn = &mut self.conns[index];
        if let Err(error) = result {
            tracing::debug!(%error, "polling a caller connection failed");
            self.close_conn(index);
            return;
        }
        conn.last_byte = self.now;
        let last = conn.awaiting.take().unwrap_or_default();
        let arrived = rustix::io::ioctl_fionread(&conn.fd).unwrap_or(0);
        let growing = arrived > last.seen && last.polls < AWAIT_PAYLOAD_POLLS_MAX;
        if growing && arrived < self.payload_missing(index) {
            // It is coming (the caller is in the middle of writing it): look again. The poll
            // is level-triggered, so for a caller that has stopped the next one shows no
            // growth, and what came is then read the ordinary way.
            self.conns[index].awaiting = Some(AwaitPayload {
                seen: arrived,
                polls: last.polls + 1,
            });
            self.arm_conn_recv(index);
            return;
        }
        if self.try_direct_read(index, true) == DirectRead::Started {
            self.release_reservation(index);
        }
        if self.conns.get(index).is_some_and(|c| !c.is_closing()) {
            self.arm_conn_recv(index);
        }
    }

    /// The policy gave a direct-read request a worker: copy what has arrived into its slot,
    /// and read the rest there (`arm_conn_recv`). The worker's `Job` waits until it is all in.
    pub(in crate::engine::core) fn dispatch_direct(
        &mut self,
        request: RequestHandle,
        worker: WorkerHandle,
    ) {
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        let now = self.now;
        let entry = &mut self.requests[request];
        entry.dispatched = Some(now);
        let Origin::Conn(conn_index) = entry.origin else {
            unreachable!("direct reads are for our own callers");
        };
        let max = self.config.max_payload_bytes;
        let w = &mut self.workers[worker];
        assert!(
            w.state == WorkerState::Idle && w.slot_use == SlotUse::Free,
            "a direct read needs an idle worker with a free slot: {:?}, {:?}",
            w.state,
            w.slot_use
        );
        w.state = WorkerState::Busy(Job {
            request,
            sequence,
            path: JobPath::Slot,
            // Its `Job` frame is queued only once the payload is all in the slot.
            frame_end: u64::MAX,
        });
        w.slot_use = SlotUse::Filling { conn: conn_index };
        let conn = &mut self.conns[conn_index];
        let header = conn.read.peek_header(max).expect("the request's header");
        let prefix = conn.read.len() - HEADER_BYTES;
        self.counters.direct_read_prefix_bytes += prefix as u64;
        // The worker was Idle, so its slot is Free and its data area ours; `prefix` is less
        // than the payload length, which fits the slot (the copy checks both).
        w.slot.write_data(0, &conn.read.filled()[HEADER_BYTES..]);
        conn.read.consume(HEADER_BYTES + prefix);
        if conn.recv == Recv::Multi {
            // The rest goes straight into the slot: stop the multishot receive (what it still
            // brings is copied into the slot) and read there once it has ended.
            let token = Token::conn(OpKind::ConnRecvMulti, conn_index);
            self.ring.cancel(token);
        }
        let conn = &mut self.conns[conn_index];
        conn.into_slot = Some(IntoSlot {
            request,
            worker,
            sequence,
            len: header.payload_len,
            filled: prefix as u32,
        });
        let service = self.workers[worker].service;
        self.services[service].counters.bytes_in += header.payload_len as u64;
        self.counters.requests_read_into_slot += 1;
        self.direct_deadlines
            .push_back((now + DIRECT_READ_TIMEOUT, conn_index, request));
    }

    pub(in crate::engine::core) fn on_conn_recv_slot(
        &mut self,
        index: ConnHandle,
        result: Result<u32, Errno>,
    ) {
        let conn = &mut self.conns[index];
        conn.recv = Recv::Idle;
        if conn.is_closing() {
            self.abort_direct_read(index);
            self.free_conn_if_done(index);
            return;
        }
        let received = match result {
            Ok(n @ 1..) => {
                conn.last_byte = self.now;
                n
            }
            Ok(_) => {
                self.close_conn(index);
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "caller connection failed in a request's payload");
                self.close_conn(index);
                return;
            }
        };
        let into = conn.into_slot.as_mut().expect("reading into a slot");
        into.filled += received;
        if into.filled == into.len {
            self.finish_direct_read(index);
        }
        self.arm_conn_recv(index);
    }

    /// The whole payload is in the slot: publish it and ring the worker (its `Job` goes ahead
    /// of any queued behind it), unless the worker or the request is gone meanwhile.
    pub(in crate::engine::core) fn finish_direct_read(&mut self, index: ConnHandle) {
        let into = self.conns[index]
            .into_slot
            .take()
            .expect("reading into a slot");
        let ours = self.stop_filling(index, &into);
        if ours && self.request_is_live(into.request) {
            let worker = &mut self.workers[into.worker];
            match worker.slot.fill_in_place(into.sequence, into.len, 0) {
                Ok(()) => {
                    let mut job = Header::new(Kind::Job, 0, into.sequence, 0);
                    job.flags = FLAG_IN_SLOT;
                    // Ahead of the queued jobs' frames (which waited behind it): they end
                    // a header later than they were told.
                    let frame_end = worker.send.end_position() - worker.send.tail().len() as u64
                        + HEADER_BYTES as u64;
                    worker.send.tail().splice(0..0, job.encode());
                    if let WorkerState::Busy(running) = &mut worker.state {
                        running.frame_end = frame_end;
                    }
                    for queued in &mut worker.queued {
                        queued.frame_end += HEADER_BYTES as u64;
                    }
                    self.arm_worker_send(into.worker);
                }
                Err(error) => {
                    self.fail_worker(into.worker, WorkerFault::Slot(error));
                }
            }
        } else {
            self.arm_worker_send(into.worker);
        }
        self.free_worker_if_done(into.worker);
    }

    /// The caller went away (or stalled) before its payload was all in: the request fails,
    /// and the worker, which never saw it, goes on with what is queued behind it or idles.
    pub(in crate::engine::core) fn abort_direct_read(&mut self, index: ConnHandle) {
        let Some(into) = self.conns[index].into_slot.take() else {
            return;
        };
        let ours = self.stop_filling(index, &into);
        if self.request_is_live(into.request) {
            let message = "the caller's payload did not all arrive";
            self.fail_request(into.request, ErrorCode::MalformedFrame, message);
        }
        if ours {
            self.advance(into.worker);
            self.arm_worker_send(into.worker);
            self.job_done(into.worker);
        }
        self.free_worker_if_done(into.worker);
    }

    /// A direct read ended (whole or not): the worker's slot is no longer being read into.
    /// Returns whether the worker is still busy with that request (it may have died or been
    /// stopped meanwhile; its entry stays until the read ends, so `into.worker` is still it).
    pub(in crate::engine::core) fn stop_filling(
        &mut self,
        conn: ConnHandle,
        into: &IntoSlot,
    ) -> bool {
        let worker = &mut self.workers[into.worker];
        assert!(
            worker.is_filled_by(conn),
            "the worker a direct read fills is no longer marked as filled by it"
        );
        worker.slot_use = SlotUse::Free;
        worker
            .running()
            .is_some_and(|job| job.request == into.request && job.sequence == into.sequence)
    }

    /// Disconnect callers whose direct read has taken too long: each holds a worker.
    pub(in crate::engine::core) fn expire_direct_reads(&mut self) {
        while let Some(&(deadline, conn, request)) = self.direct_deadlines.front() {
            if deadline > self.now {
                return;
            }
            self.direct_deadlines.pop_front();
            let Some(index) = self.live_conn(conn) else {
                continue;
            };
            if self.conns[index]
                .into_slot
                .as_ref()
                .is_some_and(|into| into.request == request)
            {
                tracing::warn!(
                    "a caller sent a request header but not its payload within {} s; \
                     disconnecting it",
                    DIRECT_READ_TIMEOUT.as_secs()
                );
                self.close_conn(index);
            }
        }
    }
}
