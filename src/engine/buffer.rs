//! Byte buffers the kernel reads into and the frame parser consumes from.
//!
//! A [`ReadBuffer`] is a fixed-capacity window `[start, end)` of received bytes; the ring reads
//! into its spare tail. It never reallocates while a read is in flight: the engine only calls
//! the mutating methods between a completion and the next submission.

#![forbid(unsafe_code)]

use crate::proto::{FrameError, Header, HEADER_BYTES};

/// Largest read a burst grows to.
pub const BURST_BYTES_MAX: usize = 64 * 1024;

pub struct ReadBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    capacity_base: usize,
    /// Size the next read asks for: doubles (up to `BURST_BYTES_MAX`) while reads fill the
    /// buffer, back to the base once one does not. Idle connections stay small; pipelined
    /// bursts get large reads.
    burst: usize,
}

/// What the parser found at the front of the buffer.
pub enum Parsed {
    /// Not enough bytes for the next frame yet.
    NeedMore,
    /// A whole frame: its header and where its payload lies (`payload()` until `consume`).
    Frame(Header),
    /// A header that cannot be accepted (the caller decides what to do).
    Bad(FrameError),
}

impl ReadBuffer {
    pub fn new(capacity: usize) -> ReadBuffer {
        assert!(capacity >= HEADER_BYTES);
        ReadBuffer {
            bytes: vec![0; capacity],
            start: 0,
            end: 0,
            capacity_base: capacity,
            burst: capacity,
        }
    }

    /// A buffer that holds no memory until `reacquire` (a connection that starts idle).
    pub fn released(capacity: usize) -> ReadBuffer {
        assert!(capacity >= HEADER_BYTES);
        ReadBuffer {
            bytes: Vec::new(),
            start: 0,
            end: 0,
            capacity_base: capacity,
            burst: capacity,
        }
    }

    /// The writable tail the next read lands in (never empty after `prepare_read`).
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.bytes[self.end..]
    }

    pub fn filled(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The kernel wrote `n` bytes into `spare()`.
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.bytes.len(), "read past the buffer");
        let filled_it = self.end + n == self.bytes.len();
        self.end += n;
        self.burst = if filled_it {
            (self.bytes.len() * 2)
                .min(BURST_BYTES_MAX)
                .max(self.capacity_base)
        } else {
            self.capacity_base
        };
    }

    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Make room for at least `total` contiguous bytes from `start` and a non-empty tail (as
    /// large as the current burst), and shrink once a frame larger than a burst has passed.
    pub fn prepare_read(&mut self, total: usize) {
        if self.start > 0 {
            // What is left is at most one partial frame: moving it is cheap.
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let needed = total.max(self.burst).max(self.end + 1);
        if self.bytes.len() < needed {
            self.bytes.resize(needed, 0);
        } else if self.bytes.len() > BURST_BYTES_MAX.max(self.capacity_base)
            && needed < self.bytes.len()
        {
            // A large frame has passed: give its memory back. (Burst-sized buffers are kept,
            // so that a busy connection does not reallocate on every burst.)
            self.bytes.truncate(needed.max(self.capacity_base));
            self.bytes.shrink_to_fit();
        }
        debug_assert!(self.end < self.bytes.len());
    }

    /// Give the memory back while empty (an idle connection then holds none). Returns it, or
    /// `None` when bytes are buffered or it was already released.
    pub fn release(&mut self) -> Option<Vec<u8>> {
        if !self.is_empty() || self.bytes.is_empty() {
            return None;
        }
        self.start = 0;
        self.end = 0;
        self.burst = self.capacity_base;
        Some(std::mem::take(&mut self.bytes))
    }

    pub fn is_released(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Take memory again after `release`: `spare` if it is large enough, else a new buffer.
    pub fn reacquire(&mut self, spare: Option<Vec<u8>>) {
        if self.bytes.is_empty() {
            self.bytes = spare
                .filter(|bytes| bytes.len() >= self.capacity_base)
                .unwrap_or_else(|| vec![0; self.capacity_base]);
        }
    }

    /// Copy `data` in after what is buffered (from a provided buffer), growing as needed.
    pub fn append(&mut self, data: &[u8]) {
        self.prepare_read(self.len() + data.len());
        self.bytes[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Look at the front: a whole frame, a bad header, or not enough bytes.
    pub fn parse(&self, payload_bytes_max: u32) -> Parsed {
        let filled = self.filled();
        if filled.len() < HEADER_BYTES {
            return Parsed::NeedMore;
        }
        match Header::decode(&filled[..HEADER_BYTES], payload_bytes_max) {
            Ok(header) if filled.len() >= HEADER_BYTES + header.payload_len as usize => {
                Parsed::Frame(header)
            }
            Ok(_) => Parsed::NeedMore,
            Err(error) => Parsed::Bad(error),
        }
    }

    /// The header at the front, when it is complete and valid (whatever of its payload has
    /// arrived).
    pub fn peek_header(&self, payload_bytes_max: u32) -> Option<Header> {
        let filled = self.filled();
        if filled.len() < HEADER_BYTES {
            return None;
        }
        Header::decode(&filled[..HEADER_BYTES], payload_bytes_max).ok()
    }

    /// The payload of the frame at the front (after `parse` returned `Frame(header)`).
    pub fn payload(&self, header: &Header) -> &[u8] {
        &self.filled()[HEADER_BYTES..HEADER_BYTES + header.payload_len as usize]
    }

    /// Bytes the frame at the front still needs in total (header + payload), if its header is
    /// complete and valid.
    pub fn frame_bytes_needed(&self, payload_bytes_max: u32) -> usize {
        let filled = self.filled();
        if filled.len() < HEADER_BYTES {
            return HEADER_BYTES;
        }
        match Header::decode(&filled[..HEADER_BYTES], payload_bytes_max) {
            Ok(header) => HEADER_BYTES + header.payload_len as usize,
            Err(_) => HEADER_BYTES,
        }
    }

    /// Bytes held in memory (for accounting).
    pub fn allocated(&self) -> usize {
        self.bytes.capacity()
    }
}

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
    use crate::proto::{encode_frame, Kind};

    fn feed(buffer: &mut ReadBuffer, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            buffer.prepare_read(0);
            let spare = buffer.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            buffer.commit(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        // Proves a frame is recognised whole however the stream is cut.
        let mut stream = Vec::new();
        let header = Header::new(Kind::Request, 1, 9, 5);
        encode_frame(&mut stream, &header, b"hello");
        for cut in 0..stream.len() {
            let mut buffer = ReadBuffer::new(64);
            feed(&mut buffer, &stream[..cut]);
            assert!(matches!(buffer.parse(100), Parsed::NeedMore));
            feed(&mut buffer, &stream[cut..]);
            match buffer.parse(100) {
                Parsed::Frame(found) => {
                    assert_eq!(found, header);
                    assert_eq!(buffer.payload(&found), b"hello");
                }
                _ => panic!("cut at {cut}: no frame"),
            }
        }
    }

    #[test]
    fn a_frame_larger_than_the_buffer_grows_it_and_it_shrinks_back() {
        // Proves large payloads are reassembled and the memory is returned afterwards.
        let mut buffer = ReadBuffer::new(64);
        let payload = vec![7u8; 1 << 20];
        let mut stream = Vec::new();
        let header = Header::new(Kind::Request, 1, 1, payload.len() as u32);
        encode_frame(&mut stream, &header, &payload);
        feed(&mut buffer, &stream[..30]);
        buffer.prepare_read(buffer.frame_bytes_needed(1 << 20));
        feed(&mut buffer, &stream[30..]);
        let Parsed::Frame(found) = buffer.parse(1 << 20) else {
            panic!("no frame")
        };
        assert_eq!(buffer.payload(&found), &payload[..]);
        buffer.consume(stream.len());
        buffer.prepare_read(0);
        assert!(
            buffer.allocated() <= BURST_BYTES_MAX,
            "{}",
            buffer.allocated()
        );
    }

    #[test]
    fn reads_grow_while_they_fill_the_buffer_and_idle_buffers_stay_small() {
        // Proves an idle connection keeps its small base buffer, a burst doubles the read size
        // up to the maximum, and a read that does not fill it ends the burst.
        let mut buffer = ReadBuffer::new(2048);
        buffer.prepare_read(0);
        assert_eq!(buffer.spare().len(), 2048);
        let mut sizes = Vec::new();
        for _ in 0..8 {
            buffer.prepare_read(0);
            let n = buffer.spare().len();
            sizes.push(buffer.allocated());
            buffer.commit(n);
            buffer.consume(n);
        }
        assert_eq!(
            sizes,
            vec![2048, 4096, 8192, 16384, 32768, 65536, 65536, 65536]
        );
        buffer.prepare_read(0);
        buffer.commit(10);
        buffer.consume(10);
        buffer.prepare_read(0);
        assert_eq!(
            buffer.spare().len(),
            65536,
            "kept for the next burst, not reallocated"
        );
    }

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

    #[test]
    fn a_bad_header_is_reported_not_skipped() {
        // Proves garbage at the front surfaces as an error for the caller to act on.
        let mut buffer = ReadBuffer::new(64);
        feed(&mut buffer, &[0xFF; 24]);
        assert!(matches!(
            buffer.parse(100),
            Parsed::Bad(FrameError::BadMagic { .. })
        ));
    }
}
