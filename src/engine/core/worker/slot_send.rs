//! The one hand-off from a worker's slot to a caller: a reply sent straight from the slot (a
//! registered buffer) as a header plus a linked fixed write, the worker lent until both complete.

use crate::engine::core::*;

impl Core {
    /// Send an in-slot reply straight from the worker's slot (a registered buffer) when that
    /// saves a copy: the reply is large, the slot is registered and the caller's queue is empty.
    /// The worker is lent to the connection until the send completes. Returns false to let the
    /// caller copy the reply instead (also when the slot does not validate: the copying path
    /// reports that).
    pub(in crate::engine::core) fn try_send_from_slot(
        &mut self,
        index: WorkerHandle,
        request: RequestHandle,
        sequence: u64,
        conn: Option<ConnHandle>,
        mut reply: Header,
    ) -> bool {
        let Some(conn) = conn else { return false };
        let worker = &self.workers[index];
        let Some(buffer_index) = worker.buffer_index else {
            return false;
        };
        // A worker that takes queued jobs goes on working while its slot is sent from: its
        // jobs travel inline until the send completes (see `dispatch`).
        let keeps_working =
            worker.accepts_queue && self.services[worker.service].pool.policy().queue_depth > 1;
        let caller = &self.conns[conn];
        if caller.send.in_flight || caller.send.queued_bytes() != 0 {
            return false;
        }
        let Ok(len) = worker.slot.peek_reply(sequence) else {
            return false;
        };
        if len < SLOT_SEND_BYTES_MIN {
            return false;
        }
        reply.payload_len = len;
        let fd = Target::of(&caller.fd, caller.file);
        // Neither op may wait for the caller to read: the worker is lent until both complete.
        // DONTWAIT/NOWAIT make them return what fitted (or EAGAIN) at once, and the rest is
        // spilled into the queue. WAITALL makes a short header a failure, which breaks the
        // link, so the payload never follows a partial header.
        let payload_entry = op::write_from_slot(
            fd,
            &worker.slot,
            len,
            buffer_index,
            Token::conn(OpKind::ConnSendFixed, conn),
        );
        let caller = &mut self.conns[conn];
        let header_entry = op::send(
            fd,
            caller.send.set_front(&reply.encode()),
            libc::MSG_WAITALL | libc::MSG_DONTWAIT,
            Token::conn(OpKind::ConnSendHeader, conn),
        );
        caller.send.in_flight = true;
        caller.slot_send = Some(SlotSend {
            worker: index,
            len,
            header_result: None,
            payload_result: None,
        });
        let worker = &mut self.workers[index];
        if !keeps_working {
            worker.state = WorkerState::Lending;
        }
        worker.slot_use = SlotUse::Lent { conn };
        self.ring.push_linked_pair(header_entry, payload_entry);
        self.counters.replies_sent_from_slot += 1;
        let service = self.workers[index].service;
        self.services[service].counters.bytes_out += len as u64;
        if let Some(Dest::Conn(conn)) = self.finish_request(request, None, len) {
            self.close_conn_if_finished(conn);
        }
        if keeps_working {
            self.advance(index);
            self.job_done(index);
        }
        true
    }

    /// One of the two ops of a send from a slot completed. When both have, spill whatever did
    /// not go out into the connection's queue and give the worker back to its pool.
    pub(in crate::engine::core) fn on_slot_send(
        &mut self,
        index: ConnHandle,
        is_header: bool,
        result: Result<u32, Errno>,
    ) {
        let conn = &mut self.conns[index];
        let send = conn
            .slot_send
            .as_mut()
            .expect("a send from a slot is in flight");
        if is_header {
            send.header_result = Some(result);
        } else {
            send.payload_result = Some(result);
        }
        let (Some(header_result), Some(payload_result)) = (send.header_result, send.payload_result)
        else {
            return;
        };
        let send = conn.slot_send.take().expect("checked above");
        conn.send.in_flight = false;
        // Nothing sent, not an error: the link was broken, or the socket was full.
        let failed_for_real = |result: Result<u32, Errno>| matches!(result, Err(e) if e != Errno::CANCELED && e != Errno::AGAIN);
        let header_sent = header_result.unwrap_or(0) as usize;
        let mut failed = failed_for_real(header_result) || failed_for_real(payload_result);
        let (header_raw, payload_raw) = (raw_result(header_result), raw_result(payload_result));
        if header_sent < HEADER_BYTES && matches!(payload_result, Ok(1..)) {
            // The payload went out after a partial header: the stream is corrupt. The link
            // rules forbid this; if a kernel ever allowed it, drop the caller, never mislead it.
            tracing::error!(header_raw, payload_raw, "send from a slot broke its link");
            failed = true;
        }
        let payload_sent = if header_sent == HEADER_BYTES {
            payload_result.unwrap_or(0) as usize
        } else {
            0
        };
        // (A lent worker's entry stays until it is returned: indexing checks the handle.)
        let worker = &self.workers[send.worker];
        if conn.is_closing() || failed {
            conn.send.clear();
        } else {
            let len = send.len as usize;
            let short = payload_sent < len;
            conn.send.settle_front(header_sent, |rest| {
                if short {
                    worker
                        .slot
                        .copy_data(payload_sent, len - payload_sent, rest);
                }
            });
            self.counters.slot_sends_spilled += u64::from(short);
        }
        // (The spilled rest of a short send is queued bytes now.)
        self.account_answers(index);
        self.return_lent_worker(send.worker);
        // Returning the worker runs pool actions that may have closed and freed this caller.
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if conn.is_closing() {
            self.free_conn_if_done(index);
        } else if failed {
            tracing::debug!(header_raw, payload_raw, "sending to a caller failed");
            self.close_conn(index);
        } else {
            self.arm_conn_send(index);
            self.close_conn_if_finished(index);
        }
    }

    /// A connection finished sending from this worker's slot.
    pub(in crate::engine::core) fn return_lent_worker(&mut self, index: WorkerHandle) {
        let worker = &mut self.workers[index];
        assert!(
            matches!(worker.slot_use, SlotUse::Lent { .. }),
            "a worker returned that was not lent"
        );
        worker.slot_use = SlotUse::Free;
        if worker.state == WorkerState::Lending {
            worker.slot.release_reply();
            worker.state = WorkerState::Idle;
            self.job_done(index);
        } else if worker.state != WorkerState::Dead {
            // A worker that kept working (queued jobs): only its slot comes back.
            worker.slot.release_reply();
        }
        self.free_worker_if_done(index);
    }
}
