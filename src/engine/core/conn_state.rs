//! A connection as this core sees it: its buffers, the receive it has armed and where it is in
//! its life, each an enum (the state x event tables are in `CONN_LIFECYCLE.md` beside this
//! file).
//!
//! ```text
//!   Open --caller's EOF--> ReadClosed --last answer sent--> (close)
//!    |  \--protocol error--> Flushing --queue empty--> (close)
//!    +-- any, on close: ops cancelled --> Closing --last op completed--> freed
//! ```

use super::*;

/// The receive a connection has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recv {
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
    pub(super) fn in_flight(self) -> bool {
        self != Recv::Idle
    }

    /// The op kind its completion carries (for a cancel).
    pub(super) fn op(self) -> Option<OpKind> {
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
pub(super) enum Phase {
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
    pub(super) fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// The caller shut down its side (EOF): answer what is in flight, then close. (A
    /// connection already flushing or closing stays so.) A frame it left unfinished is
    /// answered with Error 7 after everything else (`cut_short`).
    pub(super) fn read_side_closed(&mut self) {
        if self.phase == Phase::Open {
            self.phase = Phase::ReadClosed;
            if self.paused.is_none() {
                self.note_cut_short();
            }
        }
    }

    /// After its EOF: bytes left in its buffer are a frame cut short (while it is paused they
    /// are whole frames not yet taken: looked at again once it resumes).
    pub(super) fn note_cut_short(&mut self) {
        if !self.read.is_empty() && self.into_slot.is_none() && self.cut_short.is_none() {
            let filled = self.read.filled();
            self.cut_short = Some(match filled.get(16..24) {
                Some(id) => u64::from_le_bytes(id.try_into().expect("8 bytes")),
                None => 0,
            });
        }
    }

    /// Read no more; close once what is queued has been sent.
    pub(super) fn close_after_flush(&mut self) {
        if self.phase != Phase::Closing {
            self.phase = Phase::Flushing;
        }
    }

    /// Whether it is in the middle of a frame from its caller (a partial header or payload
    /// buffered, a payload being skipped or read into a slot).
    pub(super) fn mid_frame(&self) -> bool {
        !self.read.is_empty() || self.discard > 0 || self.into_slot.is_some()
    }

    /// Whether nothing is in flight either way: no request, no partial frame, no answer
    /// queued or being sent.
    pub(super) fn is_idle(&self) -> bool {
        self.requests_in_flight == 0
            && !self.mid_frame()
            && self.send.queued_bytes() == 0
            && !self.send.in_flight
    }

    /// The relations between its fields (debug builds, after every completion).
    #[cfg(debug_assertions)]
    pub(super) fn check_invariants(&self, handle: ConnHandle) {
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

pub(super) struct Conn {
    pub(super) fd: OwnedFd,
    pub(super) read: ReadBuffer,
    /// The receive it has armed, if any.
    pub(super) recv: Recv,
    /// Where it is in its life (reading, answering what is left, closing).
    pub(super) phase: Phase,
    /// Answers queued for the caller.
    pub(super) send: SendQueue,
    /// Its queued answer bytes as last counted in the core's `answer_bytes` (see
    /// `Core::account_answers`).
    pub(super) answers_counted: u64,
    /// Payload bytes still to skip after an oversized frame.
    pub(super) discard: u64,
    /// Requests accepted and not yet answered.
    pub(super) requests_in_flight: u32,
    /// A reply being sent straight from a worker's slot (header + fixed write, linked).
    pub(super) slot_send: Option<SlotSend>,
    /// The payload of the request at the front is being read into a worker's slot.
    pub(super) into_slot: Option<IntoSlot>,
    /// Its index in the ring's registered-file table, if registered.
    pub(super) file: Option<u32>,
    /// The provided buffers ran out under it: plain receives until its buffer is empty again.
    pub(super) provided_off: bool,
    /// Its last request went straight into a slot: read the next header alone (if it is
    /// large too, none of its payload is copied).
    pub(super) large_last: bool,
    /// When its caller last sent a byte (or it was accepted): the frame and idle timeouts
    /// count from here.
    pub(super) last_byte: Instant,
    /// The caller's EOF came in the middle of a frame (the request id it carried, 0 when its
    /// header was cut short too): once every earlier request is answered, an Error 7 with this
    /// id goes out last, then the connection closes.
    pub(super) cut_short: Option<u64>,
    /// Its place in the admission counts (connections_max, the Unix reserve, its peer's
    /// limit); returned when the entry goes. Always `Some` until then.
    pub(super) ticket: Option<Ticket>,
    /// Why it is not being read, if it is not (see `backpressure`).
    pub(super) paused: Option<Pause>,
    /// Payload bytes its requests in flight hold in memory (`caller_bytes_in_flight_max`).
    pub(super) bytes_in_flight: u64,
    /// Bytes it holds in the core's request budget for the frame it is receiving.
    pub(super) reserved: u32,
    /// Its next receive is a poll: a large request's header is in and the rest of its payload
    /// is not all in the socket yet (`DirectRead::AwaitPayload`, `direct.rs`).
    pub(super) awaiting: Option<AwaitPayload>,
    /// Who it is, as the access and slow logs name it (`uid:N`, or the TCP `ip:port`).
    pub(super) caller: Option<CallerAddr>,
}

/// Waiting for a large request's payload to arrive in the socket before committing a worker:
/// what the last poll saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct AwaitPayload {
    /// Bytes in the socket at the last poll.
    pub(super) seen: u64,
    /// Polls so far for this payload.
    pub(super) polls: u32,
}

/// A request payload being read from the caller's socket straight into a worker's slot (the
/// worker is `Busy` with it; its `Job` goes out once the whole payload is in).
pub(super) struct IntoSlot {
    pub(super) request: RequestHandle,
    pub(super) worker: WorkerHandle,
    pub(super) sequence: u64,
    pub(super) len: u32,
    pub(super) filled: u32,
}

/// A reply sent from a slot: the header (the front of `Conn::send`) and the payload (in the slot) go
/// out as two linked ops; the worker is lent to the connection until both complete.
pub(super) struct SlotSend {
    pub(super) worker: WorkerHandle,
    pub(super) len: u32,
    pub(super) header_result: Option<Result<u32, Errno>>,
    pub(super) payload_result: Option<Result<u32, Errno>>,
}
