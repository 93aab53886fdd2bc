//! The end of a caller connection: the sweep for stalled and idle callers, closing once a
//! caller is done, closing at once (cancelling its ops), and freeing the entry when its last op
//! has completed.

use crate::engine::core::*;

impl Core {
    /// Disconnect callers that stall mid-frame (`caller_frame_timeout_ms`) and close
    /// connections idle too long (`caller_idle_timeout_ms`), then run the slow log
    /// (`log_slow_requests`). Runs once per `CALLER_SWEEP_INTERVAL`; each connection is looked
    /// at once per sweep.
    pub(in crate::engine::core) fn sweep_callers(&mut self) {
        let frame_timeout = Duration::from_millis(self.config.caller_frame_timeout_ms);
        let idle_timeout = Duration::from_millis(self.config.caller_idle_timeout_ms);
        let now = self.now;
        let mut stalled = std::mem::take(&mut self.sweep_scratch);
        stalled.clear();
        for (index, conn) in self.conns.iter() {
            if conn.phase != Phase::Open && conn.phase != Phase::ReadClosed {
                continue;
            }
            if conn.paused.is_some() {
                // Not read because of us: its silence is not its fault.
                continue;
            }
            let quiet = now.saturating_duration_since(conn.last_byte);
            if !frame_timeout.is_zero() && conn.mid_frame() && quiet >= frame_timeout {
                stalled.push((index, true));
            } else if !idle_timeout.is_zero() && conn.is_idle() && quiet >= idle_timeout {
                stalled.push((index, false));
            }
        }
        for &(index, mid_frame) in &stalled {
            if mid_frame {
                let timeout_ms = frame_timeout.as_millis() as u64;
                self.caller_fault(index, CallerFault::Stalled { timeout_ms });
            } else {
                // Idling is allowed, within caller_idle_timeout_ms: not a fault.
                self.counters.callers_idle_closed += 1;
                self.close_conn(index);
            }
        }
        self.sweep_scratch = stalled;
        self.log_slow_requests();
        self.next_caller_sweep = now + CALLER_SWEEP_INTERVAL;
    }

    /// Close a connection whose caller is done (read side closed or protocol error) once every
    /// accepted request is answered and every answer sent.
    pub(in crate::engine::core) fn close_conn_if_finished(&mut self, index: ConnHandle) {
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if conn.is_closing() {
            return;
        }
        if conn.phase == Phase::ReadClosed && conn.requests_in_flight == 0 {
            if let Some(request_id) = self.conns[index].cut_short.take() {
                // Every earlier request is answered: the unfinished frame's error goes last.
                self.caller_fault(index, CallerFault::CutShort { request_id });
                return;
            }
        }
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if self.draining()
            && conn.requests_in_flight == 0
            && matches!(conn.phase, Phase::Open | Phase::ReadClosed)
        {
            // Every request it sent before is answered: nothing left on it has run.
            self.send_drain_notice(index);
            return;
        }
        let flushed = conn.send.queued_bytes() == 0 && !conn.send.in_flight;
        let caller_done = conn.phase == Phase::Flushing
            || (conn.phase == Phase::ReadClosed && conn.requests_in_flight == 0);
        let stopping_and_idle =
            self.stopping() && self.pools_stopped() && conn.requests_in_flight == 0;
        if flushed && (caller_done || stopping_and_idle) {
            self.close_conn(index);
        }
    }

    /// Close now: cancel its ops; the entry goes once they complete. Answers still owed to its
    /// requests are dropped when they arrive (the generation no longer matches).
    /// Read nothing more from the caller (its receive is cancelled): close it once what is
    /// queued for it has been sent.
    pub(in crate::engine::core) fn close_after_answers(&mut self, index: ConnHandle) {
        if let Some(conn) = self.conns.get_mut(index) {
            conn.close_after_flush();
            if conn.recv.in_flight() {
                let token = Token::conn(conn.recv.op().expect("in flight"), index);
                self.ring.cancel(token);
            }
        }
        self.close_conn_if_finished(index);
    }

    pub(in crate::engine::core) fn close_conn(&mut self, index: ConnHandle) {
        let conn = &mut self.conns[index];
        if conn.is_closing() {
            return;
        }
        let recv = conn.recv;
        conn.phase = Phase::Closing;
        self.account_answers(index);
        self.release_reservation(index);
        self.abandon_waiting_requests(index);
        let conn = &self.conns[index];
        let send = conn.send.in_flight;
        let from_slot = conn.slot_send.is_some();
        let into_slot = conn.into_slot.is_some();
        if let Some(op) = recv.op() {
            self.ring.cancel(Token::conn(op, index));
        } else if into_slot {
            self.abort_direct_read(index);
        }
        if send && from_slot {
            self.ring.cancel(Token::conn(OpKind::ConnSendHeader, index));
            self.ring.cancel(Token::conn(OpKind::ConnSendFixed, index));
        } else if send {
            self.ring.cancel(Token::conn(OpKind::ConnSend, index));
        }
        self.free_conn_if_done(index);
    }

    pub(in crate::engine::core) fn free_conn_if_done(&mut self, index: ConnHandle) {
        let conn = &self.conns[index];
        if conn.is_closing() && !conn.recv.in_flight() && !conn.send.in_flight {
            debug_assert!(conn.into_slot.is_none());
            let mut conn = self.conns.remove(index);
            self.forget_answers(conn.answers_counted);
            if let Some(file) = conn.file {
                self.unregister_file(file);
            }
            if let Some(ticket) = conn.ticket.take() {
                self.shared.admission.release(ticket);
            }
            self.shared.cores[self.index]
                .callers
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The live connection behind a request's handle, if the caller is still there.
    pub(in crate::engine::core) fn live_conn(&self, conn: ConnHandle) -> Option<ConnHandle> {
        self.conns
            .get(conn)
            .filter(|c| !c.is_closing())
            .map(|_| conn)
    }
}
