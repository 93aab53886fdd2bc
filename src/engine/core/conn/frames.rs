//! Frames to requests: each whole frame at the front of a connection's buffer becomes a
//! request (or a Ping, a Resolve, a refusal or Error 7), within the caller's rights and the
//! core's budgets.

use crate::engine::core::*;

impl Core {
    /// Handle every whole frame at the front of the connection's buffer.
    pub(in crate::engine::core) fn handle_frames(&mut self, index: ConnHandle) {
        let max = self.config.max_payload_bytes;
        loop {
            // Each frame's handler needs the whole core, so the connection is borrowed anew
            // for the next (answers are settled after this handler, so a frame can end its
            // reading, Error 7 or a direct read, but not free it; `get_mut` keeps that an
            // early return rather than a panic should a future handler close it).
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
    pub(in crate::engine::core) fn refuse_payload(
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

    pub(in crate::engine::core) fn malformed(
        &mut self,
        index: ConnHandle,
        request_id: u64,
        error: &FrameError,
    ) {
        let error = *error;
        self.caller_fault(index, CallerFault::Malformed { request_id, error });
    }

    pub(in crate::engine::core) fn on_caller_frame(
        &mut self,
        index: ConnHandle,
        header: Header,
        payload: Vec<u8>,
    ) {
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
    pub(in crate::engine::core) fn may_call(
        &self,
        index: ConnHandle,
        service: ServiceSlot,
    ) -> bool {
        match &self.services[service].acl {
            None => true,
            Some(acl) => self.conns[index]
                .ticket
                .as_ref()
                .is_some_and(|ticket| acl.allows(ticket.caller())),
        }
    }

    /// A new request from caller connection `index`; returns its handle.
    pub(in crate::engine::core) fn add_caller_request(
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
