//! A connection as this core sees it: its buffers, the receive it has armed and where it is in
//! its life, each an enum (the state x event tables are in `LIFECYCLE.md` beside this
//! file).
//!
//! ```text
//!   Open --caller's EOF--> ReadClosed --last answer sent--> (close)
//!    |  \--protocol error--> Flushing --queue empty--> (close)
//!    +-- any, on close: ops cancelled --> Closing --last op completed--> freed
//! ```

use crate::engine::core::*;

/// The receive a connection has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum Recv {
    /// None.
    Idle,
    /// A plain receive into its read buffer.
    Plain,
    /// A multishot receive into the core's provided buffers.
    Multi,
    /// A receive of a request's payload straight into a worker's slot (`Conn::into_slot`).
    IntoSlot,
    /// A poll for the rest of a large request's payload, before a worker is committed to it
    /// (`direct.rs`).
    Poll,
}

impl Recv {
    pub(in crate::engine::core) fn in_flight(self) -> bool {
        self != Recv::Idle
    }

    /// The op kind its completion carries (for a cancel).
    pub(in crate::engine::core) fn op(self) -> Option<OpKind> {
        match self {
            Recv::Idle => None,
            Recv::Plain => Some(OpKind::ConnRecv),
            Recv::Multi => Some(OpKind::ConnRecvMulti),
            Recv::IntoSlot => Some(OpKind::ConnRecvSlot),
            Recv::Poll => Some(OpKind::ConnPoll),
        }
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum Phase {
    /// Reading requests and answering them.
    Open,
    /// The caller shut down its side: answer what is in flight, then close.
    ReadClosed,
    /// Stop reading; close once the queued answers are sent (after a protocol error).
    Flushing,
    /// Closed: its ops are cancelled and the entry goes once they have completed. Answers
    /// still owed to its requests are dropped when they arrive (its handle no longer matches
    /// once the entry is gone).
    Closing,
}

impl Conn {
    pub(in crate::engine::core) fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// The caller shut down its side (EOF): answer what is in flight, then close. (A
    /// connection already flushing or closing stays so.) A frame it left unfinished is
    /// answered with Error 7 after everything else (`cut_short`).
    pub(in crate::engine::core) fn read_side_closed(&mut self) {
        if self.phase == Phase::Open {
            self.phase = Phase::ReadClosed;
            if self.paused.is_none() {
                self.note_cut_short();
            }
        }
    }

    /// After its EOF: bytes left in its buffer are a frame cut short (while it is paused they
    /// are whole frames not yet taken: looked at again once it resumes).
    pub(in crate::engine::core) fn note_cut_short(&mut self) {
        if !self.read.is_empty() && self.into_slot.is_none() && self.cut_short.is_none() {
            let filled = self.read.filled();
            self.cut_short = Some(match filled.get(16..24) {
                Some(id) => u64::from_le_bytes(id.try_into().expect("8 bytes")),
                None => 0,
            });
        }
    }

    /// Read no more; close once what is queued has been sent.
    pub(in crate::engine::core) fn close_after_flush(&mut self) {
        if self.phase != Phase::Closing {
            self.phase = Phase::Flushing;
        }
    }

    /// Whether it is in the middle of a frame from its caller (a partial header or payload
    /// buffered, a payload being skipped or read into a slot).
    pub(in crate::engine::core) fn mid_frame(&self) -> bool {
        !self.read.is_empty() || self.discard > 0 || self.into_slot.is_some()
    }

    /// Whether nothing is in flight either way: no request, no partial frame, no answer
    /// queued or being sent.
    pub(in crate::engine::core) fn is_idle(&self) -> bool {
        self.requests_in_flight == 0
            && !self.mid_frame()
            && self.send.queued_bytes() == 0
            && !self.send.in_flight
    }

    /// The relations between its fields (debug builds, after every completion).
    #[cfg(debug_assertions)]
    pub(in crate::engine::core) fn check_invariants(&self, handle: ConnHandle) {
        assert!(
            self.recv != Recv::IntoSlot || self.into_slot.is_some(),
            "{handle:?}: a receive into a slot without a direct read"
        );
        if self.slot_send.is_some() {
            assert!(
                self.send.in_flight,
                "{handle:?}: a slot send not marked in flight"
            );
        }
    }
}

pub(in crate::engine::core) struct Conn {
    pub(in crate::engine::core) fd: OwnedFd,
    pub(in crate::engine::core) read: ReadBuffer,
    /// The receive it has armed, if any.
    pub(in crate::engine::core) recv: Recv,
    /// Where it is in its life (reading, answering what is left, closing).
    pub(in crate::engine::core) phase: Phase,
    /// Answers queued for the caller.
    pub(in crate::engine::core) send: SendQueue,
    /// Its queued answer bytes as last counted in the core's `answer_bytes` (see
    /// `Core::account_answers`).
    pub(in crate::engine::core) answers_counted: u64,
    /// Payload bytes still to skip after an oversized frame.
    pub(in crate::engine::core) discard: u64,
    /// Requests accepted and not yet answered.
    pub(in crate::engine::core) requests_in_flight: u32,
    /// A reply being sent straight from a worker's slot (header + fixed write, linked).
    pub(in crate::engine::core) slot_send: Option<SlotSend>,
    /// The payload of the request at the front is being read into a worker's slot.
    pub(in crate::engine::core) into_slot: Option<IntoSlot>,
    /// Its index in the ring's registered-file table, if registered.
    pub(in crate::engine::core) file: Option<u32>,
    /// The provided buffers ran out under it: plain receives until its buffer is empty again.
    pub(in crate::engine::core) provided_off: bool,
    /// Its last request went straight into a slot: read the next header alone (if it is
    /// large too, none of its payload is copied).
    pub(in crate::engine::core) large_last: bool,
    /// When its caller last sent a byte (or it was accepted): the frame and idle timeouts
    /// count from here.
    pub(in crate::engine::core) last_byte: Instant,
    /// The caller's EOF came in the middle of a frame (the request id it carried, 0 when its
    /// header was cut short too): once every earlier request is answered, an Error 7 with this
    /// id goes out last, then the connection closes.
    pub(in crate::engine::core) cut_short: Option<u64>,
    /// Its place in the admission counts (connections_max, the Unix reserve, its peer's
    /// limit); returned when the entry goes. Always `Some` until then.
    pub(in crate::engine::core) ticket: Option<Ticket>,
    /// Why it is not being read, if it is not (see `backpressure`).
    pub(in crate::engine::core) paused: Option<Pause>,
    /// Payload bytes its requests in flight hold in memory (`caller_bytes_in_flight_max`).
    pub(in crate::engine::core) bytes_in_flight: u64,
    /// Bytes it holds in the core's request budget for the frame it is receiving.
    pub(in crate::engine::core) reserved: u32,
    /// Its next receive is a poll: a large request's header is in and the rest of its payload
    /// is not all in the socket yet (`DirectRead::AwaitPayload`, `direct.rs`).
    pub(in crate::engine::core) awaiting: Option<AwaitPayload>,
    /// Who it is, as the access and slow logs name it (`uid:N`, or the TCP `ip:port`).
    pub(in crate::engine::core) caller: Option<CallerAddr>,
}

/// Waiting for a large request's payload to arrive in the socket before committing a worker:
/// what the last poll saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(in crate::engine::core) struct AwaitPayload {
    /// Bytes in the socket at the last poll.
    pub(in crate::engine::core) seen: u64,
    /// Polls so far for this payload.
    pub(in crate::engine::core) polls: u32,
}

/// A request payload being read from the caller's socket straight into a worker's slot (the
/// worker is `Busy` with it; its `Job` goes out once the whole payload is in).
pub(in crate::engine::core) struct IntoSlot {
    pub(in crate::engine::core) request: RequestHandle,
    pub(in crate::engine::core) worker: WorkerHandle,
    pub(in crate::engine::core) sequence: u64,
    pub(in crate::engine::core) len: u32,
    pub(in crate::engine::core) filled: u32,
}

/// A reply sent from a slot: the header (the front of `Conn::send`) and the payload (in the slot) go
/// out as two linked ops; the worker is lent to the connection until both complete.
pub(in crate::engine::core) struct SlotSend {
    pub(in crate::engine::core) worker: WorkerHandle,
    pub(in crate::engine::core) len: u32,
    pub(in crate::engine::core) header_result: Option<Result<u32, Errno>>,
    pub(in crate::engine::core) payload_result: Option<Result<u32, Errno>>,
}
