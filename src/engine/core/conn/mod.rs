//! The caller room: everything between a caller's socket and a request. To change how callers'
//! frames are read, answered or closed, this directory is the place.
//!
//! - `listen.rs`: accept and admission (who may connect, within which budgets);
//! - here: receives (plain and multishot into provided buffers), answers and errors, the send
//!   queue;
//! - `frames.rs`: frames to requests (Call, Ping, Resolve; refusals and Error 7);
//! - `fault.rs`: `CallerFault`, why a caller was cut off, and the one place that does it;
//! - `state.rs`: `Conn` and its enums (`Recv`, `Phase`, `IntoSlot`, `SlotSend`), with the
//!   state x event tables in `LIFECYCLE.md`;
//! - `direct.rs`: the one hand-off from a caller into a worker's slot (a payload read straight
//!   into it);
//! - `backpressure.rs`: pausing and resuming callers (in-flight caps, the request-bytes budget);
//! - `answer_budget.rs`: the bound on answer bytes queued for callers;
//! - `close.rs`: the sweep for stalled and idle callers, closing and freeing.

mod answer_budget;
pub(super) mod backpressure;
mod close;
pub(super) mod direct;
pub(super) mod fault;
mod frames;
mod listen;
pub(super) mod state;

use super::*;

impl Core {
    pub(super) fn arm_conn_recv(&mut self, index: ConnHandle) {
        let max = self.config.max_payload_bytes;
        let conn = &mut self.conns[index];
        if let Some(into) = &conn.into_slot {
            if conn.recv.in_flight() || conn.is_closing() {
                return;
            }
            // The rest of the payload goes straight into the worker's slot (a registered
            // buffer when it could be registered).
            let worker = &self.workers[into.worker];
            assert!(
                worker.is_filled_by(index),
                "a direct read into a slot not marked as filled by it"
            );
            let entry = op::read_into_slot(
                Target::of(&conn.fd, conn.file),
                &worker.slot,
                into.filled,
                into.len - into.filled,
                worker.buffer_index,
                Token::conn(OpKind::ConnRecvSlot, index),
            );
            conn.recv = Recv::IntoSlot;
            self.ring.push(entry);
            return;
        }
        if conn.recv.in_flight() || conn.phase != Phase::Open || conn.paused.is_some() {
            return;
        }
        if conn.awaiting.is_some() {
            // A large request's header is in, the rest of its payload is not: wait for it in
            // the socket rather than copy it as it trickles (see `try_direct_read`).
            let entry = op::poll_readable(
                Target::of(&conn.fd, conn.file),
                Token::conn(OpKind::ConnPoll, index),
            );
            conn.recv = Recv::Poll;
            self.ring.push(entry);
            return;
        }
        if self.provided.is_some() && !conn.provided_off {
            // One receive stays armed; each completion brings a buffer the kernel picked.
            let fd = Target::of(&conn.fd, conn.file);
            let entry = op::recv_multi(fd, Token::conn(OpKind::ConnRecvMulti, index));
            conn.recv = Recv::Multi;
            self.ring.push(entry);
            return;
        }
        if conn.read.is_released() {
            conn.read.reacquire(self.read_spares.pop());
        }
        let needed = if conn.discard > 0 {
            0
        } else {
            conn.read.frame_bytes_needed(max)
        };
        conn.read.prepare_read(needed);
        let fd = Target::of(&conn.fd, conn.file);
        // After a direct read, read the next header alone: if that request is large too, none
        // of its payload is then read anywhere but into the worker's slot.
        let header_only = conn.large_last && conn.read.is_empty() && conn.discard == 0;
        let spare = conn.read.spare();
        let len = if header_only {
            HEADER_BYTES.min(spare.len())
        } else {
            spare.len()
        };
        let spare = &mut spare[..len];
        let entry = op::recv(fd, spare, Token::conn(OpKind::ConnRecv, index));
        conn.recv = Recv::Plain;
        self.ring.push(entry);
    }

    /// A plain receive or a poll of `index` completed: it is no longer in flight. Returns
    /// whether what it brought is to be looked at: not once the connection is closing (it is
    /// freed if that was its last op), nor while it is flushing (the receive was cancelled by
    /// `close_after_answers`, or completed as the cancel went in: a cancel is not the
    /// caller's error, and closing now would drop the answers still queued; it closes once
    /// they are sent).
    pub(super) fn recv_ended(&mut self, index: ConnHandle) -> bool {
        let conn = &mut self.conns[index];
        conn.recv = Recv::Idle;
        match conn.phase {
            Phase::Closing => {
                self.free_conn_if_done(index);
                false
            }
            Phase::Flushing => {
                self.close_conn_if_finished(index);
                false
            }
            Phase::Open | Phase::ReadClosed => true,
        }
    }

    pub(super) fn on_conn_recv(&mut self, index: ConnHandle, result: Result<u32, Errno>) {
        if !self.recv_ended(index) {
            return;
        }
        let conn = &mut self.conns[index];
        let received = match result {
            Err(error) => {
                tracing::debug!(%error, "caller connection failed");
                self.close_conn(index);
                return;
            }
            Ok(0) => {
                conn.read_side_closed();
                self.close_conn_if_finished(index);
                return;
            }
            Ok(n) => n as usize,
        };
        conn.last_byte = self.now;
        conn.read.commit(received);
        self.handle_frames(index);
        if let Some(conn) = self.conns.get_mut(index) {
            if conn.read.is_empty() {
                // Back to multishot receives (if it had fallen back from them).
                conn.provided_off = false;
            }
            if !conn.is_closing() {
                self.arm_conn_recv(index);
            }
        }
    }

    /// A multishot receive completed: copy the bytes out of the kernel's buffer (into the
    /// slot being filled, then the connection's buffer), give the buffer back, handle frames.
    pub(super) fn on_conn_recv_multi(&mut self, index: ConnHandle, completion: Completion) {
        let result = completion.result;
        let conn = &mut self.conns[index];
        if !completion.more() {
            conn.recv = Recv::Idle;
        }
        if let Some(bid) = completion.buffer_id() {
            if let (Ok(n @ 1..), false) = (result, conn.is_closing()) {
                conn.last_byte = self.now;
                self.take_provided(index, bid, n as usize);
            }
            if let Some(provided) = &mut self.provided {
                provided.recycle(bid);
            }
        }
        let conn = &mut self.conns[index];
        if conn.is_closing() {
            if !conn.recv.in_flight() {
                self.abort_direct_read(index);
                self.free_conn_if_done(index);
            }
            return;
        }
        match result {
            Err(Errno::NOBUFS) => {
                // More receives completed than the ring has buffers: plain receives for a while.
                conn.provided_off = true;
                self.counters.provided_buffers_ran_out += 1;
            }
            Err(Errno::CANCELED) => {}
            Err(error) => {
                tracing::debug!(%error, "caller connection failed");
                self.close_conn(index);
                return;
            }
            Ok(0) => {
                conn.read_side_closed();
                if conn.into_slot.is_some() {
                    self.close_conn(index);
                } else {
                    self.close_conn_if_finished(index);
                }
                return;
            }
            Ok(_) => {}
        }
        if matches!(result, Ok(1..)) {
            if conn
                .into_slot
                .as_ref()
                .is_some_and(|into| into.filled == into.len)
            {
                self.finish_direct_read(index);
            }
            if self.conns[index].into_slot.is_none() {
                self.handle_frames(index);
            }
        }
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.is_closing() {
            return;
        }
        let max = self.config.max_payload_bytes;
        let missing = conn
            .read
            .frame_bytes_needed(max)
            .saturating_sub(conn.read.len());
        if conn.recv.in_flight()
            && conn.into_slot.is_none()
            && !conn.read.is_empty()
            && missing > PROVIDED_BUFFER_BYTES
        {
            // A large frame is arriving: read the rest with plain receives sized for it rather
            // than buffer by buffer (back to provided buffers once it is through).
            conn.provided_off = true;
            let token = Token::conn(OpKind::ConnRecvMulti, index);
            self.ring.cancel(token);
            return;
        }
        if conn.recv.in_flight() && conn.read.is_empty() {
            // Waiting for its next request: it holds no buffer meanwhile.
            if let Some(bytes) = conn.read.release() {
                if self.read_spares.len() < READ_SPARES_MAX {
                    self.read_spares.push(bytes);
                }
            }
        }
        if !conn.recv.in_flight() {
            self.arm_conn_recv(index);
        }
    }

    /// Copy `n` bytes of provided buffer `bid` out: first into the slot a direct read is
    /// filling, the rest into the connection's buffer.
    pub(super) fn take_provided(&mut self, index: ConnHandle, bid: u16, n: usize) {
        let provided = self.provided.as_ref().expect("a provided buffer");
        let mut data = &provided.bytes(bid)[..n];
        let conn = &mut self.conns[index];
        if let Some(into) = &mut conn.into_slot {
            let take = ((into.len - into.filled) as usize).min(data.len());
            let worker = &self.workers[into.worker];
            assert!(
                worker.is_filled_by(index),
                "a direct read into a slot not marked as filled by it"
            );
            // The slot is being filled by this connection, so its data area is ours; `take`
            // fits what is left of the payload (the copy checks it against the slot).
            worker.slot.write_data(into.filled as usize, &data[..take]);
            into.filled += take as u32;
            data = &data[take..];
        }
        if !data.is_empty() {
            if conn.read.is_released() {
                conn.read.reacquire(self.read_spares.pop());
            }
            conn.read.append(data);
        }
    }

    /// Queue a whole answer frame for the caller; it goes out once the handler is done
    /// (`conn_touched`).
    pub(super) fn answer(&mut self, index: ConnHandle, header: &Header, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.is_closing() {
            return;
        }
        proto::encode_frame(conn.send.tail(), header, payload);
        self.conn_touched(index);
    }

    /// Answers were queued for `index`: it is settled (`settle_touched_conns`) once the current
    /// handler is done (`Core::run_effects`), so that no handler closes a caller's connection
    /// in the middle of another owner's work (a reply over `write_queue_max_bytes`, the
    /// answer budget), and the answers one completion queues for a caller go out in one send.
    pub(in crate::engine::core) fn conn_touched(&mut self, index: ConnHandle) {
        if self.conns_touched.last() != Some(&index) {
            self.conns_touched.push(index);
        }
    }

    /// Settle every connection answers were queued for (called by `run_effects` only).
    /// (Settling one can queue another answer, the Error 7 of a frame cut short: it is pushed
    /// and settled in turn.)
    pub(in crate::engine::core) fn settle_touched_conns(&mut self) {
        while let Some(index) = self.conns_touched.pop() {
            // Closed (or gone) since: its answers are dropped with it.
            if self.live_conn(index).is_some() {
                self.after_queueing(index);
                self.close_conn_if_finished(index);
            }
        }
    }

    pub(super) fn answer_error(
        &mut self,
        index: ConnHandle,
        request_id: u64,
        service_id: u32,
        code: ErrorCode,
        message: &str,
    ) {
        let header = Header::error(request_id, service_id, code, message.len() as u32);
        self.answer(index, &header, message.as_bytes());
    }

    /// After answers were queued: count them against the answer budget and the caller's
    /// write queue bound (a caller over either is cut off), then send.
    fn after_queueing(&mut self, index: ConnHandle) {
        self.account_answers(index);
        if self.enforce_answer_budget(index) {
            return;
        }
        let queued_bytes = self.conns[index].send.queued_bytes() as u64;
        if queued_bytes > self.config.write_queue_max_bytes {
            self.caller_fault(index, CallerFault::SlowReader { queued_bytes });
            return;
        }
        self.arm_conn_send(index);
    }

    pub(super) fn arm_conn_send(&mut self, index: ConnHandle) {
        let conn = &mut self.conns[index];
        if conn.is_closing() {
            return;
        }
        let token = Token::conn(OpKind::ConnSend, index);
        if let Some(entry) = send_entry(&mut conn.send, Target::of(&conn.fd, conn.file), token) {
            self.ring.push(entry);
        }
    }

    pub(super) fn on_conn_send(&mut self, index: ConnHandle, result: Result<u32, Errno>) {
        self.conns[index]
            .send
            .complete(result.unwrap_or(0) as usize);
        self.account_answers(index);
        let conn = &mut self.conns[index];
        if conn.is_closing() {
            self.free_conn_if_done(index);
            return;
        }
        if !matches!(result, Ok(1..)) {
            tracing::debug!(result = raw_result(result), "sending to a caller failed");
            self.close_conn(index);
            return;
        }
        self.arm_conn_send(index);
        self.close_conn_if_finished(index);
    }
}
