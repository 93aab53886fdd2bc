//! Backpressure on callers: memory held for requests is bounded by the config, not by what
//! callers send.
//!
//! A connection stops being read (no receive armed, no further frame taken from its buffer)
//! while it is *paused*:
//!
//! - `Pause::InFlight`: it has `caller_requests_in_flight_max` requests in flight, or its
//!   requests hold `caller_bytes_in_flight_max` payload bytes. It is read again once one of
//!   its requests is answered and it is under both.
//! - `Pause::Budget`: this core's share of `request_bytes_buffered_max` is spent. The share
//!   counts the payloads of this core's callers' requests until they are answered (wherever
//!   they run) and *reservations*: a request whose header has arrived and whose payload is
//!   still arriving reserves its whole length before any more of it is read, so a payload
//!   being received never outgrows the budget. Paused connections wait in a FIFO and are
//!   read again, oldest first, while the share has room.
//!
//! No pause can wait for ever: what holds the budget is either a request (answered, or failed
//! by its timeouts) or a reservation of a connection that is being read (its frame completes,
//! or `caller_frame_timeout_ms` disconnects it). A paused connection holds no new reservation,
//! and its own silence is not held against it: the sweep skips it, and its clock restarts
//! when it is read again. The frame that crosses a bound is taken whole; a core holding nothing
//! takes a frame larger than its share, so every request of up to `max_payload_bytes` runs.
//!
//! Resuming runs after each handler (`run_effects`), never inside the handler that freed the
//! room: that one may be in the middle of the very connection's frames.

use crate::engine::core::*;

/// Why a connection is not being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum Pause {
    /// Too many of its own requests (or their bytes) are in flight.
    InFlight,
    /// This core's request-bytes budget is spent; it waits in `budget_waiters`. `need`: the
    /// bytes its next frame must reserve (0 when its next header is not here yet).
    Budget { need: u32 },
}

impl Core {
    /// Whether connection `index` may take its next frame now; if not, it is paused (and
    /// counted once per pause).
    pub(in crate::engine::core) fn may_take_frame(&mut self, index: ConnHandle) -> bool {
        let conn = &self.conns[index];
        if conn.paused.is_some() {
            return false;
        }
        let pause = if conn.requests_in_flight >= self.config.caller_requests_in_flight_max
            || conn.bytes_in_flight >= self.config.caller_bytes_in_flight_max
        {
            self.counters.callers_paused_in_flight += 1;
            Pause::InFlight
        } else if conn.reserved == 0 && self.over_budget(0) {
            self.counters.callers_paused_budget += 1;
            Pause::Budget { need: 0 }
        } else {
            return true;
        };
        self.pause(index, pause);
        false
    }

    /// Whether taking `more` bytes would spend this core's share (a core holding nothing
    /// takes anything).
    fn over_budget(&self, more: u64) -> bool {
        self.request_bytes > 0 && self.request_bytes + more > self.request_bytes_share
    }

    fn pause(&mut self, index: ConnHandle, pause: Pause) {
        let conn = &mut self.conns[index];
        conn.paused = Some(pause);
        if matches!(pause, Pause::Budget { .. }) {
            self.budget_waiters.push_back(index);
        }
        if conn.recv == Recv::Multi {
            // A multishot receive would go on filling its buffer: stop it (its completion
            // leaves it unarmed, see arm_conn_recv).
            self.ring.cancel(Token::conn(OpKind::ConnRecvMulti, index));
        }
    }

    /// The header of a request at the front of the connection's buffer has arrived and its
    /// payload has not (and is not being read into a slot): reserve the whole payload in the
    /// budget before reading more of it, or pause the connection until it fits.
    pub(in crate::engine::core) fn reserve_partial_frame(&mut self, index: ConnHandle) {
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if conn.into_slot.is_some() {
            self.release_reservation(index);
            return;
        }
        if conn.reserved > 0 || conn.discard > 0 || conn.is_closing() || conn.paused.is_some() {
            return;
        }
        let Some(header) = conn.read.peek_header(self.config.max_payload_bytes) else {
            return;
        };
        if header.kind != Kind::Request || header.payload_len == 0 {
            return;
        }
        let need = header.payload_len;
        if self.over_budget(u64::from(need)) {
            self.counters.callers_paused_budget += 1;
            self.pause(index, Pause::Budget { need });
            return;
        }
        self.conns[index].reserved = need;
        self.request_bytes += u64::from(need);
    }

    /// The connection's reserved frame is whole (or going into a slot, or the connection is
    /// gone): give its reservation back.
    pub(in crate::engine::core) fn release_reservation(&mut self, index: ConnHandle) {
        if let Some(conn) = self.conns.get_mut(index) {
            let reserved = std::mem::take(&mut conn.reserved);
            self.request_bytes -= u64::from(reserved);
        }
    }

    /// A request of connection `conn` holding `bytes` of payload has been accepted.
    pub(in crate::engine::core) fn hold_request_bytes(&mut self, conn: ConnHandle, bytes: u32) {
        self.conns[conn].bytes_in_flight += u64::from(bytes);
        self.request_bytes += u64::from(bytes);
    }

    /// A request of connection `conn` holding `bytes` is answered or dropped (its
    /// `requests_in_flight` already counted down): room for the connection, and the budget.
    pub(in crate::engine::core) fn release_request_bytes(&mut self, conn: ConnHandle, bytes: u32) {
        self.request_bytes -= u64::from(bytes);
        if let Some(entry) = self.conns.get_mut(conn) {
            entry.bytes_in_flight -= u64::from(bytes);
            if entry.paused == Some(Pause::InFlight)
                && entry.requests_in_flight < self.config.caller_requests_in_flight_max
                && entry.bytes_in_flight < self.config.caller_bytes_in_flight_max
            {
                self.resume_pending.push(conn);
            }
        }
    }

    /// Read paused connections again where there is room now (after each handler).
    pub(in crate::engine::core) fn resume_paused(&mut self) {
        while let Some(conn) = self.resume_pending.pop() {
            self.resume(conn);
        }
        while let Some(&front) = self.budget_waiters.front() {
            let need = match self.conns.get(front).and_then(|c| c.paused) {
                Some(Pause::Budget { need }) => need,
                _ => {
                    // Gone, or closed while it waited.
                    self.budget_waiters.pop_front();
                    continue;
                }
            };
            if self.over_budget(u64::from(need)) {
                // The oldest waiter's frame does not fit yet: everyone waits behind it (no
                // frame is passed over for ever by smaller ones).
                return;
            }
            self.budget_waiters.pop_front();
            self.resume(front);
            if self.budget_waiters.back() == Some(&front) {
                // It paused again (its next frame is larger than the room): first in line.
                self.budget_waiters.pop_back();
                self.budget_waiters.push_front(front);
                return;
            }
            while let Some(conn) = self.resume_pending.pop() {
                self.resume(conn);
            }
        }
    }

    fn resume(&mut self, index: ConnHandle) {
        let Some(conn) = self.conns.get_mut(index) else {
            return; // Gone while it waited.
        };
        if conn.is_closing() || conn.paused.is_none() {
            return;
        }
        conn.paused = None;
        // Its silence while paused was ours.
        conn.last_byte = self.now;
        self.handle_frames(index);
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.is_closing() || conn.paused.is_some() {
            return;
        }
        if conn.phase == Phase::ReadClosed {
            // Its EOF came while it was paused: what is left unparsed now is a cut frame.
            conn.note_cut_short();
            self.close_conn_if_finished(index);
        } else {
            self.arm_conn_recv(index);
        }
    }
}
