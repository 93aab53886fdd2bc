//! Byte buffers the kernel reads into and sends from.
//!
//! A [`ReadBuffer`] is the one frame reader, defined in `acgi-proto` (and shared with the
//! SDKs and the load generator): a window of received bytes whose spare tail a receive fills.
//! It never reallocates while a read is in flight: the engine only calls the mutating methods
//! between a completion and the next submission. A [`SendQueue`] holds the answers queued for
//! one socket, and lends its front to the one send op in flight.

#![forbid(unsafe_code)]

pub use acgi_proto::reader::{Parsed, ReadBuffer};

/// Bytes queued for one socket: `out` collects whole frames while `sending` is owned by the
/// one send op in flight. A send op takes the unsent part of `sending`; when it is all sent, the
/// two swap. The heap buffer of `sending` never moves while a send is in flight.
#[derive(Default)]
pub struct SendQueue {
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    /// Bytes sent since the queue was made: a running position, so that an owner can tell
    /// whether a frame it queued has all gone out (see `end_position`).
    sent_total: u64,
    /// A send op owns `sending` right now.
    pub in_flight: bool,
}

impl SendQueue {
    /// Bytes not yet sent.
    pub fn queued_bytes(&self) -> usize {
        self.out.len() + self.sending.len() - self.sent
    }

    /// Bytes sent so far, in all.
    pub fn sent_total(&self) -> u64 {
        self.sent_total
    }

    /// The running position just after everything queued: a frame appended now has all gone
    /// out once `sent_total` reaches the value this returns after appending it.
    pub fn end_position(&self) -> u64 {
        self.sent_total + self.queued_bytes() as u64
    }

    /// Where new frames are appended (behind anything being sent).
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// The bytes the next send op should take, or `None` when a send is in flight or nothing
    /// is queued. The caller then submits exactly one send of them and sets `in_flight`.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.in_flight {
            return None;
        }
        if self.sent == self.sending.len() {
            if self.out.is_empty() {
                return None;
            }
            self.sending.clear();
            self.sent = 0;
            std::mem::swap(&mut self.out, &mut self.sending);
        }
        Some(&self.sending[self.sent..])
    }

    /// The send op in flight sent `n` bytes.
    pub fn complete(&mut self, n: usize) {
        assert!(self.in_flight);
        self.in_flight = false;
        self.sent += n;
        self.sent_total += n as u64;
        assert!(self.sent <= self.sending.len(), "sent more than was queued");
        if self.sent == self.sending.len() && self.sending.capacity() > 1 << 20 {
            // Give back the memory of a large answer once it is out.
            self.sending = Vec::new();
            self.sent = 0;
        }
    }

    /// Put `bytes` at the very front (before everything queued) as the next chunk to send.
    /// Only when nothing is in flight and `sending` is drained. Returns the bytes, for an op
    /// that sends them directly (they stay where they are until `settle_front`).
    pub fn set_front(&mut self, bytes: &[u8]) -> &[u8] {
        assert!(!self.in_flight && self.sent == self.sending.len());
        self.sending.clear();
        self.sending.extend_from_slice(bytes);
        self.sent = 0;
        &self.sending
    }

    /// Drop `n` bytes from the front chunk (they went out by another op) and append `rest`
    /// to it, keeping it before anything in `out`.
    pub fn settle_front(&mut self, n: usize, rest: impl FnOnce(&mut Vec<u8>)) {
        assert!(!self.in_flight);
        let before = self.sent;
        self.sent = (self.sent + n).min(self.sending.len());
        self.sent_total += (self.sent - before) as u64;
        self.sending.drain(..self.sent);
        self.sent = 0;
        rest(&mut self.sending);
    }

    /// Forget everything queued (the peer is gone).
    pub fn clear(&mut self) {
        assert!(!self.in_flight);
        self.out.clear();
        self.sending.clear();
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_queue_keeps_order_across_partial_sends_and_front_inserts() {
        // Proves bytes leave in the order they were queued, whatever the send sizes.
        let mut queue = SendQueue::default();
        queue.tail().extend_from_slice(b"abc");
        let mut wire = Vec::new();
        let chunk = queue.next_chunk().unwrap().to_vec();
        queue.in_flight = true;
        queue.tail().extend_from_slice(b"def");
        wire.extend_from_slice(&chunk[..1]);
        queue.complete(1);
        while let Some(chunk) = queue.next_chunk() {
            let chunk = chunk.to_vec();
            queue.in_flight = true;
            wire.extend_from_slice(&chunk[..1]);
            queue.complete(1);
        }
        assert_eq!(wire, b"abcdef");
        assert_eq!(queue.queued_bytes(), 0);
        queue.set_front(b"HEADER");
        queue.tail().extend_from_slice(b"later");
        queue.settle_front(2, |rest| rest.extend_from_slice(b"+payload"));
        assert_eq!(queue.next_chunk().unwrap(), b"ADER+payload");
        queue.in_flight = true;
        queue.complete(12);
        assert_eq!(queue.next_chunk().unwrap(), b"later");
    }
}
