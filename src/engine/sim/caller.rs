//! A caller model: one real Unix connection to the core's listener, sending echo requests whose
//! payloads are a function of (caller, request id) and checking every answer against the
//! request it names: no lost, misrouted or duplicated answer, and an echo's bytes are the
//! request's. Some callers leave in the middle of a payload, or stop reading and then leave.
//!
//! Once the bridge is stopping (`super::stop`), a caller also takes `shutting down` (error 6)
//! for a request, and, on a drain, the drain notice (error 6 for request 0); when the bridge
//! ends the connection, it checks that nothing it sent was lost: see `on_bridge_closed`.

use std::collections::{BTreeMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::scenario::Stop;
use crate::engine::io::sim::Rng;
use crate::proto::{ErrorCode, Header, Kind, HEADER_BYTES};

/// The payload byte `at` of request `request_id` of caller `caller`. The first two bytes name
/// the caller and the request (both below 256 here), so that a worker model can tell which
/// request it ran (`Sim::ran`).
pub(super) fn payload_byte(caller: usize, request_id: u64, at: usize) -> u8 {
    match at {
        0 => return caller as u8,
        1 => return request_id as u8,
        _ => {}
    }
    (request_id
        .wrapping_mul(131)
        .wrapping_add(at as u64 * 7)
        .wrapping_add(caller as u64 * 17)
        % 251) as u8
}

/// Whether a caller of this behaviour reads its answers.
fn reads_answers(behaviour: Behaviour) -> bool {
    !matches!(behaviour, Behaviour::StopsReading(_))
}

/// How a caller behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Behaviour {
    /// Sends everything, reads every answer, then closes.
    Polite,
    /// Closes once it has written this many bytes (usually inside a payload).
    LeavesAt(usize),
    /// Sends everything, never reads, and closes after this many more turns.
    StopsReading(u32),
    /// As `Polite`, but keeps the connection open for this many turns after its last answer
    /// (a caller that would send more later): what a drain finds with nothing in flight.
    Lingers(u32),
    /// As `Polite`, but writes a few bytes now and then (a slow sender): the bridge often
    /// holds a large request's header and waits for its payload (a poll, `conn/direct.rs`).
    Trickles,
}

pub(super) struct Caller {
    pub(super) id: usize,
    stream: Option<UnixStream>,
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
    /// Requests sent (at least begun) or to send and not answered: their payload lengths.
    unanswered: BTreeMap<u64, usize>,
    pub(super) behaviour: Behaviour,
    /// It closed its end before all its answers came (so some may never come).
    pub(super) left: bool,
    /// The bridge ended the connection while stopping, and `on_bridge_closed` found that
    /// every request it had taken was answered (the others it never read).
    pub(super) cut_off: bool,
    /// The stop the bridge is in, once it has been sent one (`Sim::stop_sent`).
    pub(super) stop: Option<Stop>,
    /// The bridge closed its end for writing while stopping: it sends no more, only reads.
    write_closed: bool,
    /// It has had the drain notice (nothing may follow it but the end of the connection).
    pub(super) drain_notice: bool,
    /// A drain's end reset its connection before it had any frame: it may never have been
    /// accepted (left in the listen queue, which a new bridge would serve; `Sim::check_end`
    /// counts these against the connections the cores accepted).
    pub(super) maybe_never_accepted: bool,
    /// Requests it has (request ids run from 1 to this).
    requests: u64,
    /// Answers by outcome: replies, and errors by code.
    pub(super) replies: u64,
    pub(super) errors: BTreeMap<u16, u64>,
}

impl Caller {
    /// A caller connected to `address`, with `requests` requests to send (sizes from `sizes`).
    pub(super) fn connect(
        id: usize,
        address: &std::os::unix::net::SocketAddr,
        sizes: &[usize],
        behaviour: Behaviour,
    ) -> Caller {
        let stream = UnixStream::connect_addr(address).expect("the sim's listener accepts");
        stream.set_nonblocking(true).expect("a non-blocking socket");
        let mut out = Vec::new();
        let mut unanswered = BTreeMap::new();
        for (number, &len) in sizes.iter().enumerate() {
            let request_id = number as u64 + 1;
            let header = Header::new(Kind::Request, 1, request_id, len as u32);
            out.extend_from_slice(&header.encode());
            out.extend((0..len).map(|at| payload_byte(id, request_id, at)));
            unanswered.insert(request_id, len);
        }
        Caller {
            id,
            stream: Some(stream),
            out,
            written: 0,
            input: Vec::new(),
            unanswered,
            behaviour,
            left: false,
            cut_off: false,
            stop: None,
            write_closed: false,
            drain_notice: false,
            maybe_never_accepted: false,
            requests: sizes.len() as u64,
            replies: 0,
            errors: BTreeMap::new(),
        }
    }

    /// It has closed its end (left, or finished).
    pub(super) fn closed(&self) -> bool {
        self.stream.is_none()
    }

    /// Every request answered, or it left.
    pub(super) fn finished(&self) -> bool {
        self.closed() && (self.left || self.cut_off || self.unanswered.is_empty())
    }

    /// Requests not answered (for the end-of-run check).
    pub(super) fn unanswered(&self) -> usize {
        self.unanswered.len()
    }

    /// Do one thing the seed picks: write some bytes, read answers, or leave. True when it did
    /// something (its socket moved bytes or it closed).
    /// `guesses`: guessed answers that workers have sent and the bridge may have relayed (see
    /// `on_answer`); each one this caller takes uses one up. `ran`: the requests (caller,
    /// request id) a worker has run.
    pub(super) fn act(
        &mut self,
        rng: &mut Rng,
        guesses: &mut u64,
        ran: &HashSet<(usize, u64)>,
        trace: &mut Vec<String>,
    ) -> bool {
        if self.stream.is_none() {
            return false;
        }
        let reads = reads_answers(self.behaviour);
        let writes = self.written < self.out.len() && !self.write_closed;
        let write_percent = if self.behaviour == Behaviour::Trickles {
            15
        } else {
            60
        };
        if writes && (!reads || rng.chance(write_percent)) {
            return self.write_some(rng, trace);
        }
        if let Behaviour::StopsReading(turns) = &mut self.behaviour {
            if self.written == self.out.len() {
                *turns = turns.saturating_sub(1);
                if *turns == 0 {
                    trace.push(format!("caller {} leaves without reading", self.id));
                    self.leave();
                }
                return true;
            }
            return false;
        }
        let read = self.read_answers(guesses, ran, trace);
        if self.stream.is_some() && self.unanswered.is_empty() && self.written == self.out.len() {
            if let Behaviour::Lingers(turns) = &mut self.behaviour {
                if *turns > 0 {
                    *turns -= 1;
                    return true;
                }
            }
            trace.push(format!("caller {} done, closes", self.id));
            self.stream = None;
            return true;
        }
        read
    }

    fn leave(&mut self) {
        self.stream = None;
        self.left = true;
    }

    fn write_some(&mut self, rng: &mut Rng, trace: &mut Vec<String>) -> bool {
        let mut end = self.out.len();
        if let Behaviour::LeavesAt(at) = self.behaviour {
            end = end.min(at);
        }
        let rest = end - self.written;
        if rest == 0 {
            trace.push(format!(
                "caller {} leaves at byte {}",
                self.id, self.written
            ));
            self.leave();
            return true;
        }
        let most = match self.behaviour {
            Behaviour::Trickles => rest.min(512),
            _ => rest,
        };
        let len = rng.length(most as u32, 50) as usize;
        let stream = self.stream.as_mut().expect("open");
        match stream.write(&self.out[self.written..self.written + len]) {
            Ok(n) => {
                self.written += n;
                trace.push(format!("caller {} wrote {n}", self.id));
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) if self.stop.is_some() && reads_answers(self.behaviour) => {
                // The bridge stopped reading and closed: what it owes comes before its end of
                // file, which `on_bridge_closed` then checks.
                trace.push(format!("caller {} write failed: {e}; reads on", self.id));
                self.write_closed = true;
                true
            }
            Err(e) => {
                // The bridge closed on it (a bound): its answers may never come.
                trace.push(format!("caller {} write failed: {e}", self.id));
                self.leave();
                true
            }
        }
    }

    fn read_answers(
        &mut self,
        guesses: &mut u64,
        ran: &HashSet<(usize, u64)>,
        trace: &mut Vec<String>,
    ) -> bool {
        let stream = self.stream.as_mut().expect("open");
        let mut buf = [0u8; 16384];
        let n = match stream.read(&mut buf) {
            Ok(0) if self.stop.is_some() => {
                trace.push(format!("caller {} read end of file", self.id));
                self.on_bridge_closed(ran, false);
                return true;
            }
            Ok(0) => {
                assert!(
                    self.unanswered.is_empty() || self.written < self.out.len() || self.left,
                    "caller {}: the bridge closed with {} requests unanswered ({:?})",
                    self.id,
                    self.unanswered.len(),
                    self.unanswered.keys().take(8).collect::<Vec<_>>()
                );
                trace.push(format!("caller {} read end of file", self.id));
                self.leave();
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if self.stop.is_some() && e.kind() == ErrorKind::ConnectionReset => {
                // (A Unix socket closed with bytes unread resets its peer, after what was
                // queued for it: the bridge read no more of this caller.)
                trace.push(format!("caller {} read failed: {e}", self.id));
                self.on_bridge_closed(ran, true);
                return true;
            }
            Err(e) => {
                trace.push(format!("caller {} read failed: {e}", self.id));
                self.leave();
                return true;
            }
        };
        self.input.extend_from_slice(&buf[..n]);
        while let Some(header) = self.next_frame() {
            let payload_len = header.payload_len as usize;
            let payload = self.input[HEADER_BYTES..HEADER_BYTES + payload_len].to_vec();
            self.input.drain(..HEADER_BYTES + payload_len);
            self.on_answer(&header, &payload, guesses, ran, trace);
        }
        true
    }

    /// The bridge, stopping, ended the connection (or, on a drain, sent the notice that it
    /// will): every request it took must be answered. From outside, what it took is a prefix of
    /// what was sent (it reads the stream in order and answers everything it reads), so every
    /// answered request must come before every unanswered one, and no unanswered request may
    /// have run on a worker. (A taken request lost while still in a backlog, with nothing
    /// after it taken, looks like one never read: the engine's own invariants are what guard
    /// that case.) On a drain, the notice must have come first, unless the connection was
    /// `reset` before any frame came (then it may never have been accepted).
    fn on_bridge_closed(&mut self, ran: &HashSet<(usize, u64)>, reset: bool) {
        assert!(
            self.input.is_empty(),
            "caller {}: the bridge ended the connection in the middle of a frame ({} bytes of it \
             came)",
            self.id,
            self.input.len()
        );
        self.check_nothing_taken_is_lost(ran, "at the end of the connection");
        let had_frames = self.replies > 0 || !self.errors.is_empty();
        if self.stop == Some(Stop::Drain) && !self.drain_notice && reset && !had_frames {
            self.maybe_never_accepted = true;
        } else if self.stop == Some(Stop::Drain) {
            assert!(
                self.drain_notice,
                "caller {}: a drain ended the connection without the drain notice",
                self.id
            );
        }
        self.stream = None;
        self.cut_off = true;
    }

    fn check_nothing_taken_is_lost(&self, ran: &HashSet<(usize, u64)>, when: &str) {
        let answered_last = (1..=self.requests)
            .filter(|id| !self.unanswered.contains_key(id))
            .max();
        let unanswered_first = self.unanswered.keys().next().copied();
        if let (Some(answered), Some(unanswered)) = (answered_last, unanswered_first) {
            assert!(
                answered < unanswered,
                "caller {} {when}: request {unanswered} is unanswered although {answered}, sent \
                 after it, was answered (the bridge took it and lost its answer)",
                self.id
            );
        }
        let lost = self
            .unanswered
            .keys()
            .find(|&&id| ran.contains(&(self.id, id)));
        assert!(
            lost.is_none(),
            "caller {} {when}: request {lost:?} ran on a worker and was never answered",
            self.id
        );
    }

    fn next_frame(&self) -> Option<Header> {
        if self.input.len() < HEADER_BYTES {
            return None;
        }
        let header = Header::decode(&self.input[..HEADER_BYTES], u32::MAX)
            .unwrap_or_else(|e| panic!("caller {}: the bridge sent a bad frame: {e}", self.id));
        (self.input.len() >= HEADER_BYTES + header.payload_len as usize).then_some(header)
    }

    /// One answer: it must name a request of ours that is unanswered, and an echo's bytes
    /// must be that request's.
    ///
    /// One exception to the echo check: a worker that sent `Done` for a sequence it guessed,
    /// whose `Job` then reached it and whose slot it moved to Replied before the bridge read
    /// the guess, cannot be told from a worker that answered (its bytes are on one socket, in
    /// order); the bridge relays its empty reply (and kills it at its next answer). Such a
    /// reply is taken, at most once per guess sent.
    fn on_answer(
        &mut self,
        header: &Header,
        payload: &[u8],
        guesses: &mut u64,
        ran: &HashSet<(usize, u64)>,
        trace: &mut Vec<String>,
    ) {
        let id = header.request_id;
        assert!(
            !self.drain_notice,
            "caller {}: a {:?} frame for request {id} after the drain notice",
            self.id, header.kind
        );
        if id == 0 && header.kind == Kind::Error && header.code == ErrorCode::ShuttingDown as u16 {
            assert_eq!(
                self.stop,
                Some(Stop::Drain),
                "caller {}: a drain notice without a drain",
                self.id
            );
            trace.push(format!("caller {} drain notice", self.id));
            self.check_nothing_taken_is_lost(ran, "at the drain notice");
            self.drain_notice = true;
            return;
        }
        let Some(len) = self.unanswered.remove(&id) else {
            panic!(
                "caller {}: an answer ({:?}) for request {id}, which is not waiting for one \
                 (misrouted or duplicated)",
                self.id, header.kind
            );
        };
        match header.kind {
            Kind::Reply if payload.is_empty() && len > 0 && *guesses > 0 => {
                *guesses -= 1;
                self.replies += 1;
                trace.push(format!("caller {} reply {id}: a relayed guess", self.id));
            }
            Kind::Reply => {
                assert_eq!(
                    payload.len(),
                    len,
                    "caller {}: reply {id}'s length",
                    self.id
                );
                let wrong = payload
                    .iter()
                    .enumerate()
                    .position(|(at, &b)| b != payload_byte(self.id, id, at));
                assert!(
                    wrong.is_none(),
                    "caller {}: reply {id} differs from its request at byte {wrong:?}",
                    self.id
                );
                self.replies += 1;
                trace.push(format!("caller {} reply {id} ({len} B) ok", self.id));
            }
            Kind::Error => {
                let code = header.code;
                *self.errors.entry(code).or_default() += 1;
                let message = String::from_utf8_lossy(payload);
                trace.push(format!(
                    "caller {} error {code} for {id}: {message}",
                    self.id
                ));
                let allowed = [
                    ErrorCode::Overloaded,
                    ErrorCode::WorkerFailed,
                    ErrorCode::TimedOut,
                    ErrorCode::ServiceError,
                    ErrorCode::ServiceUnavailable,
                ];
                let stopping = self.stop.is_some() && code == ErrorCode::ShuttingDown as u16;
                assert!(
                    stopping || allowed.iter().any(|c| *c as u16 == code),
                    "caller {}: error {code} ({message}) for request {id}",
                    self.id
                );
            }
            kind => panic!("caller {}: a {kind:?} frame for request {id}", self.id),
        }
    }
}
