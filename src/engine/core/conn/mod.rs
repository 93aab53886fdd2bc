//! The caller room: everything between a caller's socket and a request. To change how callers'
//! frames are read, answered or closed, this directory is the place.
//!
//! - `listen.rs`: accept and admission (who may connect, within which budgets);
//! - here: receives (plain and multishot into provided buffers), frames to requests, answers
//!   and errors, the send queue;
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

    pub(super) fn on_conn_recv(&mut self, index: ConnHandle, result: Result<u32, Errno>) {
        let conn = &mut self.conns[index];
        conn.recv = Recv::Idle;
        if conn.is_closing() {
            self.free_conn_if_done(index);
            return;
        }
        if conn.phase == Phase::Flushing {
            // Its receive was cancelled (`close_after_answers`), or completed as the cancel
            // went in: what it brought is not read; close once its answers are sent (a
            // cancel is not the caller's error, and closing now would drop them).
            self.close_conn_if_finished(index);
            return;
        }
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

    /// Handle every whole frame at the front of the connection's buffer.
    pub(super) fn handle_frames(&mut self, index: ConnHandle) {
        let max = self.config.max_payload_bytes;
        loop {
            // Handling a frame can close and free this very connection (a reply that overflows
            // its queue): look it up afresh every time.
            let Some(conn) = self.conns.get_mut(index) else {
                return;
            };
            if matches!(conn.phase, Phase::Closing | Phase::Flushing) {
                return;
            }
            if conn.discard > 0 {
                let n = conn.discard.min(conn.read.len() as u64);
                conn.read.consume(n as usize);
                conn.discard -= n;
                if conn.discard > 0 {
                    return;
                }
                continue;
            }
            if !self.may_take_frame(index) {
                return;
            }
            let conn = &mut self.conns[index];
            if let Some(header) = conn.read.peek_header(max) {
                // A kind or flag a caller may not send is malformed as soon as its header is
                // here (before its payload is buffered, and before any size refusal).
                if let Some(error) = caller_may_not_send(&header) {
                    self.malformed(index, header.request_id, &error);
                    return;
                }
                // Ping and Resolve have bounds of their own, checked on the header (before
                // their payload is buffered): a Pong echoes its payload, and an unknown
                // name would be echoed in the error.
                let refused = match header.kind {
                    Kind::Ping if header.payload_len > PING_PAYLOAD_BYTES_MAX => Some((
                        ErrorCode::PayloadTooLarge,
                        "a Ping payload is at most 4096 bytes",
                    )),
                    Kind::Resolve if header.payload_len > RESOLVE_NAME_BYTES_MAX => Some((
                        ErrorCode::UnknownService,
                        "no service has a name that long (names are at most 64 bytes)",
                    )),
                    _ => None,
                };
                if let Some((code, message)) = refused {
                    self.refuse_payload(index, &header, code, message);
                    continue;
                }
            }
            match conn.read.parse(max) {
                Parsed::NeedMore => {
                    let direct = self.try_direct_read(index, false);
                    self.conns[index].awaiting =
                        (direct == DirectRead::AwaitPayload).then(AwaitPayload::default);
                    self.reserve_partial_frame(index);
                    return;
                }
                Parsed::Frame(header) => {
                    if let Some(error) = caller_may_not_send(&header) {
                        self.malformed(index, header.request_id, &error);
                        return;
                    }
                    // A whole frame in the buffer: reads of whole bursts serve this caller.
                    conn.large_last = false;
                    // Its reservation becomes the request's own count (add_caller_request).
                    self.request_bytes -= u64::from(std::mem::take(&mut conn.reserved));
                    let mut payload = self.spare_payloads.pop().unwrap_or_default();
                    payload.clear();
                    payload.extend_from_slice(conn.read.payload(&header));
                    conn.read
                        .consume(HEADER_BYTES + header.payload_len as usize);
                    self.on_caller_frame(index, header, payload);
                }
                Parsed::Bad(FrameError::PayloadTooLarge { header, max })
                    if header.kind.is_caller_to_bridge() =>
                {
                    let message = format!(
                        "payload of {} bytes is over the maximum of {max} bytes",
                        header.payload_len
                    );
                    self.refuse_payload(index, &header, ErrorCode::PayloadTooLarge, &message);
                }
                Parsed::Bad(error) => {
                    let filled = conn.read.filled();
                    let request_id = u64::from_le_bytes(filled[16..24].try_into().expect("8"));
                    self.malformed(index, request_id, &error);
                    return;
                }
            }
        }
    }

    /// Answer a malformed frame, then close the connection: frame boundaries are lost.
    /// Answer the frame at the front with an error without buffering its payload: the header
    /// goes, the payload is skipped as it arrives, and the connection goes on.
    pub(super) fn refuse_payload(
        &mut self,
        index: ConnHandle,
        header: &Header,
        code: ErrorCode,
        message: &str,
    ) {
        let conn = &mut self.conns[index];
        let buffered = conn.read.len() - HEADER_BYTES;
        let skip_now = buffered.min(header.payload_len as usize);
        conn.read.consume(HEADER_BYTES + skip_now);
        conn.discard = (header.payload_len as usize - skip_now) as u64;
        self.counters.requests_failed += 1;
        self.log_refused_request(index, header, code);
        let (request_id, service_id) = (header.request_id, header.service_id);
        self.answer_error(index, request_id, service_id, code, message);
    }

    pub(super) fn malformed(&mut self, index: ConnHandle, request_id: u64, error: &FrameError) {
        self.counters.malformed_frames += 1;
        tracing::debug!(%error, "malformed frame from a caller; closing the connection");
        let message = error.to_string();
        self.answer_error(index, request_id, 0, ErrorCode::MalformedFrame, &message);
        self.close_after_answers(index);
    }

    pub(super) fn on_caller_frame(&mut self, index: ConnHandle, header: Header, payload: Vec<u8>) {
        match header.kind {
            Kind::Ping => {
                let reply = Header::new(
                    Kind::Pong,
                    header.service_id,
                    header.request_id,
                    payload.len() as u32,
                );
                self.answer(index, &reply, &payload);
            }
            Kind::Resolve => {
                let name = String::from_utf8_lossy(&payload);
                match self.service_by_name.get(name.as_ref()) {
                    Some(&service) => {
                        let id = self.services[service].id;
                        let reply = Header::new(Kind::Resolved, id, header.request_id, 0);
                        self.answer(index, &reply, &[]);
                    }
                    None => {
                        let message = format!("no service is named {name:?}");
                        self.answer_error(
                            index,
                            header.request_id,
                            0,
                            ErrorCode::UnknownService,
                            &message,
                        );
                    }
                }
            }
            Kind::Request => {
                let Some(&service) = self.service_by_id.get(&header.service_id) else {
                    self.counters.requests_failed += 1;
                    let message = format!("no service has id {}", header.service_id);
                    self.log_refused_request(index, &header, ErrorCode::UnknownService);
                    self.answer_error(
                        index,
                        header.request_id,
                        header.service_id,
                        ErrorCode::UnknownService,
                        &message,
                    );
                    self.recycle_payload(payload);
                    return;
                };
                if !self.may_call(index, service) {
                    self.counters.requests_failed += 1;
                    self.services[service].counters.errors[ErrorCode::NotAllowed as usize] += 1;
                    let message = format!(
                        "service {} does not let this caller call it (its allowed_uids, \
                         allowed_gids or allowed_listeners)",
                        self.services[service].name
                    );
                    self.log_refused_request(index, &header, ErrorCode::NotAllowed);
                    self.answer_error(
                        index,
                        header.request_id,
                        header.service_id,
                        ErrorCode::NotAllowed,
                        &message,
                    );
                    self.recycle_payload(payload);
                    return;
                }
                let now = self.now;
                let mut payload = payload;
                let mut deadline = None;
                if header.flags & FLAG_TIMEOUT != 0 {
                    let prefix: [u8; TIMEOUT_PREFIX_BYTES] = payload[..TIMEOUT_PREFIX_BYTES]
                        .try_into()
                        .expect("checked length");
                    let timeout_ms = u32::from_le_bytes(prefix);
                    payload.drain(..TIMEOUT_PREFIX_BYTES);
                    if timeout_ms > 0 {
                        deadline = Some(now + Duration::from_millis(timeout_ms as u64));
                    }
                }
                let request =
                    self.add_caller_request(index, header.request_id, service, payload, deadline);
                if let Some(core) = self.place(service) {
                    if self.forward(request, core) {
                        return;
                    }
                }
                self.services[service]
                    .pool
                    .on_request(now, request.to_raw(), deadline);
                self.pool_touched(service);
                return;
            }
            _ => unreachable!("checked by is_caller_to_bridge"),
        }
        self.recycle_payload(payload);
    }

    /// Whether the caller of connection `index` may call `service` (its ACL, if it has one).
    pub(super) fn may_call(&self, index: ConnHandle, service: ServiceSlot) -> bool {
        match &self.services[service].acl {
            None => true,
            Some(acl) => self.conns[index]
                .ticket
                .as_ref()
                .is_some_and(|ticket| acl.allows(ticket.caller())),
        }
    }

    /// A new request from caller connection `index`; returns its handle.
    pub(super) fn add_caller_request(
        &mut self,
        index: ConnHandle,
        caller_request_id: u64,
        service: ServiceSlot,
        payload: Vec<u8>,
        deadline: Option<Instant>,
    ) -> RequestHandle {
        self.conns[index].requests_in_flight += 1;
        let held_bytes = payload.len() as u32;
        self.hold_request_bytes(index, held_bytes);
        self.requests.insert(Request {
            origin: Origin::Conn(index),
            forwarded_to: None,
            direct: false,
            caller_request_id,
            service,
            payload,
            held_bytes,
            deadline,
            arrived: self.now,
            dispatched: None,
            caller: self.conns[index].caller,
            request_bytes: held_bytes,
            slow_logged: false,
        })
    }

    /// Queue a whole answer frame for the caller, disconnecting a caller that does not read.
    pub(super) fn answer(&mut self, index: ConnHandle, header: &Header, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.is_closing() {
            return;
        }
        proto::encode_frame(conn.send.tail(), header, payload);
        self.after_queueing(index);
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

    pub(super) fn after_queueing(&mut self, index: ConnHandle) {
        self.account_answers(index);
        if self.enforce_answer_budget(index) {
            return;
        }
        let conn = &mut self.conns[index];
        if conn.send.queued_bytes() as u64 > self.config.write_queue_max_bytes {
            self.counters.slow_callers_disconnected += 1;
            tracing::warn!(
                queued_bytes = conn.send.queued_bytes(),
                "caller is not reading its answers; disconnecting it"
            );
            self.close_conn(index);
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

/// Why a caller may not send this (otherwise valid) header, if it may not (§1.3, §1.4): a
/// bridge→caller or worker kind, a flag other than `TIMEOUT` on a `Request`, or `TIMEOUT`
/// without room for its 4-byte prefix.
fn caller_may_not_send(header: &Header) -> Option<FrameError> {
    if !header.kind.is_caller_to_bridge() {
        return Some(FrameError::UnknownKind {
            found: header.kind as u8,
        });
    }
    let allowed = if header.kind == Kind::Request {
        FLAG_TIMEOUT
    } else {
        0
    };
    let short_timeout =
        header.flags & FLAG_TIMEOUT != 0 && (header.payload_len as usize) < TIMEOUT_PREFIX_BYTES;
    (header.flags & !allowed != 0 || short_timeout).then_some(FrameError::UnknownFlags {
        found: header.flags,
    })
}
