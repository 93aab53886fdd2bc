//! One connection's ledger of requests in flight, and the verdict on every answer that comes
//! back: pure bookkeeping, no I/O, so each verdict is unit-tested here.
//!
//! Every request sent is entered once and leaves once: answered (a reply, or an error frame),
//! or, when its connection ends, abandoned (the soak closed the connection on purpose) or lost
//! (it did not). A second answer for an id already answered is a duplicate; an answer for an
//! id never sent on this connection is misrouted by definition (counted apart: it answers no
//! request of ours).
//!
//! Which error codes are allowed under these faults (`docs/protocol.md` §3):
//! - expected: 4 `worker failed` (its worker was SIGKILLed holding it) and 5 `timed out` (its
//!   worker was SIGSTOPped past `request_timeout_ms`);
//! - tolerated, reported: 3 `overloaded` and 9 `service unavailable` (the pool's own limits,
//!   which the soak's config keeps out of reach);
//! - forbidden: every other code. 6 `shutting down` says "not run", the bridge is not shutting
//!   down; 1, 2, 7, 10 and 11 are caller errors the soak never makes; 8 is a handler error and
//!   echo never fails.

use std::collections::{HashMap, HashSet};

use acgi_proto::{ErrorCode, Header, Kind};

use super::stamp::{identify, Identity, SizeClass};

/// A request in flight.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub size: u32,
    pub class: SizeClass,
    pub sent_at: std::time::Instant,
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The reply is the request's own bytes.
    Ok,
    /// An error the faults explain (4, 5).
    Expected(ErrorCode),
    /// An error from the pool's limits (3, 9): counted, not a failure.
    Tolerated(ErrorCode),
    /// An error code the spec forbids here.
    Forbidden(u16),
    /// The reply is another request's bytes (or answers an id never sent).
    Misrouted(String),
    /// The reply is no request's bytes.
    Corrupted(String),
    /// A second answer for an id already answered.
    Duplicated(u64),
    /// An answer for an id never sent on this connection (misrouted from elsewhere).
    UnknownId(u64),
    /// A frame kind the bridge never sends a caller for a request.
    NotAnAnswer(Kind),
}

impl Verdict {
    /// Whether this verdict fails the soak.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            Verdict::Ok | Verdict::Expected(_) | Verdict::Tolerated(_)
        )
    }
}

/// One connection's requests in flight and the ids already answered.
#[derive(Debug)]
pub struct Ledger {
    connection: u32,
    pending: HashMap<u64, Pending>,
    answered: HashSet<u64>,
}

impl Ledger {
    pub fn new(connection: u32) -> Ledger {
        Ledger {
            connection,
            pending: HashMap::new(),
            answered: HashSet::new(),
        }
    }

    /// Request `number` was written whole.
    pub fn sent(&mut self, number: u64, pending: Pending) {
        let fresh = self.pending.insert(number, pending).is_none();
        assert!(
            fresh && !self.answered.contains(&number),
            "request {number} sent twice"
        );
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The verdict on an answer frame; the request (if any) leaves the ledger.
    pub fn answer(&mut self, header: &Header, payload: &[u8]) -> (Verdict, Option<Pending>) {
        let id = header.request_id;
        let Some(pending) = self.pending.remove(&id) else {
            if self.answered.contains(&id) {
                return (Verdict::Duplicated(id), None);
            }
            return (Verdict::UnknownId(id), None);
        };
        self.answered.insert(id);
        let verdict = match header.kind {
            Kind::Reply => self.check_reply(id, pending, payload),
            Kind::Error => error_verdict(header.code),
            other => Verdict::NotAnAnswer(other),
        };
        (verdict, Some(pending))
    }

    fn check_reply(&self, id: u64, pending: Pending, payload: &[u8]) -> Verdict {
        let own = Identity {
            connection: self.connection,
            number: id,
            size: pending.size,
        };
        match identify(payload) {
            Some(identity) if identity == own => Verdict::Ok,
            Some(other) => {
                Verdict::Misrouted(format!("request {own:?} got the bytes of {other:?}"))
            }
            None => Verdict::Corrupted(format!(
                "request {own:?} got {} bytes that are no request's (first 8: {:02x?})",
                payload.len(),
                &payload[..payload.len().min(8)]
            )),
        }
    }

    /// The connection ended: every request still in flight leaves; how many.
    pub fn close(&mut self) -> Vec<(u64, Pending)> {
        let mut left: Vec<_> = self.pending.drain().collect();
        left.sort_by_key(|(id, _)| *id);
        left
    }
}

/// What an error code means for a request the soak made.
pub fn error_verdict(code: u16) -> Verdict {
    match ErrorCode::from_u16(code) {
        Some(code @ (ErrorCode::WorkerFailed | ErrorCode::TimedOut)) => Verdict::Expected(code),
        Some(code @ (ErrorCode::Overloaded | ErrorCode::ServiceUnavailable)) => {
            Verdict::Tolerated(code)
        }
        _ => Verdict::Forbidden(code),
    }
}

#[cfg(test)]
mod tests {
    use super::super::stamp::body;
    use super::*;

    fn pending() -> Pending {
        Pending {
            size: 64,
            class: SizeClass::Below,
            sent_at: std::time::Instant::now(),
        }
    }

    fn reply(id: u64) -> Header {
        Header::new(Kind::Reply, 1, id, 0)
    }

    fn own(connection: u32, number: u64) -> Vec<u8> {
        body(Identity {
            connection,
            number,
            size: 64,
        })
    }

    #[test]
    fn own_bytes_pass_and_a_second_answer_is_a_duplicate() {
        // Proves a byte-exact reply is Ok once, and the same id answered again is a duplicate.
        let mut ledger = Ledger::new(5);
        ledger.sent(1, pending());
        assert_eq!(ledger.answer(&reply(1), &own(5, 1)).0, Verdict::Ok);
        assert_eq!(
            ledger.answer(&reply(1), &own(5, 1)).0,
            Verdict::Duplicated(1)
        );
        assert_eq!(ledger.in_flight(), 0);
    }

    #[test]
    fn another_requests_bytes_are_misrouted_and_garbage_is_corrupted() {
        // Proves replies are attributed: another id's or connection's bytes, an unsent id, noise.
        let mut ledger = Ledger::new(5);
        for id in 1..=4 {
            ledger.sent(id, pending());
        }
        let swapped = ledger.answer(&reply(1), &own(5, 2)).0;
        assert!(matches!(swapped, Verdict::Misrouted(_)), "{swapped:?}");
        let foreign = ledger.answer(&reply(2), &own(6, 2)).0;
        assert!(matches!(foreign, Verdict::Misrouted(_)), "{foreign:?}");
        let mut noise = own(5, 3);
        noise[40] ^= 0xFF;
        assert!(matches!(
            ledger.answer(&reply(3), &noise).0,
            Verdict::Corrupted(_)
        ));
        assert_eq!(
            ledger.answer(&reply(99), &own(5, 99)).0,
            Verdict::UnknownId(99)
        );
        assert_eq!(ledger.close().len(), 1, "request 4 was never answered");
    }

    #[test]
    fn error_codes_are_judged_by_the_spec() {
        // Proves 4 and 5 are expected, 3 and 9 tolerated, 6 (and the rest) forbidden.
        assert_eq!(error_verdict(4), Verdict::Expected(ErrorCode::WorkerFailed));
        assert_eq!(error_verdict(5), Verdict::Expected(ErrorCode::TimedOut));
        assert_eq!(error_verdict(3), Verdict::Tolerated(ErrorCode::Overloaded));
        assert_eq!(
            error_verdict(9),
            Verdict::Tolerated(ErrorCode::ServiceUnavailable)
        );
        for code in [1, 2, 6, 7, 8, 10, 11, 999] {
            assert_eq!(error_verdict(code), Verdict::Forbidden(code));
            assert!(error_verdict(code).is_failure());
        }
        let mut ledger = Ledger::new(1);
        ledger.sent(1, pending());
        let error = Header::error(1, 1, ErrorCode::ShuttingDown, 0);
        assert_eq!(ledger.answer(&error, b"").0, Verdict::Forbidden(6));
    }
}
