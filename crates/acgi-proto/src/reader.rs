//! The one frame reader: a buffer that reads land in and whole frames come out of.
//!
//! A [`ReadBuffer`] is a window `[start, end)` of received bytes; a read (the bridge's ring, a
//! worker's `recv`, a load generator's `read`) fills its spare tail, then [`ReadBuffer::parse`]
//! says whether a whole frame is at the front. It never reallocates between `spare` and
//! `commit`: the bridge only calls the mutating methods between a completion and the next
//! submission, so a read in flight always owns the tail it was given.

#![forbid(unsafe_code)]

use crate::frame::{FrameError, Header, HEADER_BYTES};

/// Largest read a burst grows to.
pub const BURST_BYTES_MAX: usize = 64 * 1024;

/// Received bytes not yet consumed, and the spare room the next read lands in.
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
    /// A buffer of `capacity` bytes, its base size (at least [`HEADER_BYTES`]).
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

    /// The bytes received and not yet consumed.
    pub fn filled(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// Bytes received and not yet consumed.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether every received byte was consumed.
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

    /// The first `n` received bytes are done with (a frame was handled).
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Make room towards `total` contiguous bytes from `start` (the frame being read) and a
    /// non-empty tail (as large as the current burst), and shrink once a frame larger than a
    /// burst has passed.
    ///
    /// The room grows with what has arrived, at most doubling it per call, never straight to
    /// `total`: a header claiming a large payload costs its sender the bytes it actually sends
    /// (at most twice that, plus a burst), not the claim. Callers read again until the frame
    /// is whole, as they must anyway (a read may return fewer bytes than there is room for).
    pub fn prepare_read(&mut self, total: usize) {
        let arrived = self.end - self.start;
        self.reserve(total.min(arrived.saturating_mul(2).max(self.burst)));
    }

    /// Make room for `total` contiguous bytes from `start` (bytes that are here: no cap).
    fn reserve(&mut self, total: usize) {
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

    /// Whether the buffer holds no memory (after `release`).
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
        // These bytes have arrived: room for all of them, whatever the frame claims.
        self.reserve(self.len() + data.len());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, Kind};

    #[test]
    fn a_header_claiming_a_large_payload_does_not_size_the_buffer() {
        // Proves memory follows the bytes that arrive, not the claim: after a 24-byte header
        // announcing 16 MiB, the buffer holds a burst, and it grows at most twofold per read as
        // the payload comes, while the frame still reassembles whole.
        let len = 16 << 20;
        let header = Header::new(Kind::Request, 1, 7, len as u32).encode();
        let mut buffer = ReadBuffer::new(2048);
        buffer.prepare_read(0);
        buffer.spare()[..HEADER_BYTES].copy_from_slice(&header);
        buffer.commit(HEADER_BYTES);
        buffer.prepare_read(buffer.frame_bytes_needed(1 << 30));
        assert!(
            buffer.allocated() <= 2 * BURST_BYTES_MAX,
            "{}",
            buffer.allocated()
        );
        let mut arrived = HEADER_BYTES;
        while arrived < HEADER_BYTES + len {
            buffer.prepare_read(buffer.frame_bytes_needed(1 << 30));
            assert!(
                buffer.allocated() <= 2 * arrived.max(BURST_BYTES_MAX) + 1,
                "{} bytes held for {arrived} arrived",
                buffer.allocated()
            );
            let spare = buffer.spare();
            let n = spare.len().min(HEADER_BYTES + len - arrived);
            spare[..n].fill(b'p');
            buffer.commit(n);
            arrived += n;
        }
        match buffer.parse(1 << 30) {
            Parsed::Frame(frame) => assert_eq!(frame.payload_len as usize, len),
            _ => panic!("the frame reassembles"),
        }
    }

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
