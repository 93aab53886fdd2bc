//! Bodies of the fuzz targets (`fuzz/`, `cargo +nightly fuzz run ...`), here so that the stable
//! test suite runs them too (`tests/fuzz_bodies.rs`, on seeded random inputs and every crash the
//! fuzzer ever found). Each takes arbitrary bytes and panics only on a broken property.

use crate::frame::{Header, HEADER_BYTES};
use crate::reader::{Parsed, ReadBuffer};

/// The payload bound the targets decode against: small, so that both sides of it are reached.
pub const BOUND: u32 = 4096;

/// Any 24 bytes: decoding never panics, and a header that decodes encodes back to the same
/// bytes, within the bound.
pub fn header_roundtrip(data: &[u8]) {
    let Some(bytes) = data.get(..HEADER_BYTES) else {
        assert!(
            Header::decode(data, BOUND).is_err(),
            "a short header decoded"
        );
        return;
    };
    if let Ok(header) = Header::decode(bytes, BOUND) {
        assert!(header.payload_len <= BOUND);
        assert_eq!(
            &header.encode()[..],
            bytes,
            "decode then encode changed the header"
        );
    }
}

/// A byte stream split into reads at sizes the input chooses: reassembly never panics, finds
/// the same frames however the stream is cut, and never holds more than what has arrived plus
/// one read.
pub fn frame_stream(data: &[u8]) {
    let (cuts, stream) = data.split_at(data.len().min(8));
    let whole = frames_of(stream, &[usize::MAX]);
    let cut: Vec<usize> = cuts.iter().map(|&c| c as usize + 1).collect();
    let split = frames_of(stream, if cut.is_empty() { &[1] } else { &cut });
    assert_eq!(whole, split, "the frames depend on how the stream was cut");
}

/// The frames (header and payload) found in `stream` fed in reads of the sizes in `cuts`
/// (cycled), up to the first bad header; the bad header's error is the last item.
fn frames_of(stream: &[u8], cuts: &[usize]) -> Vec<Result<(Header, Vec<u8>), String>> {
    let mut buffer = ReadBuffer::new(64);
    let mut found = Vec::new();
    let mut offset = 0;
    let mut cut = 0;
    loop {
        loop {
            match buffer.parse(BOUND) {
                Parsed::NeedMore => break,
                Parsed::Frame(header) => {
                    assert!(header.payload_len <= BOUND);
                    found.push(Ok((header, buffer.payload(&header).to_vec())));
                    buffer.consume(HEADER_BYTES + header.payload_len as usize);
                }
                Parsed::Bad(error) => {
                    found.push(Err(error.to_string()));
                    return found;
                }
            }
        }
        if offset == stream.len() {
            return found;
        }
        buffer.prepare_read(buffer.frame_bytes_needed(BOUND));
        let arrived = buffer.len();
        let spare = buffer.spare();
        let n = spare
            .len()
            .min(cuts[cut % cuts.len()])
            .min(stream.len() - offset);
        cut += 1;
        spare[..n].copy_from_slice(&stream[offset..offset + n]);
        buffer.commit(n);
        offset += n;
        // Memory follows what arrived, never what a header claims.
        assert!(
            buffer.allocated() <= 2 * (arrived + n) + 64 * 1024 + 64,
            "{} bytes held for {} arrived",
            buffer.allocated(),
            arrived + n
        );
    }
}

/// xorshift64*: the seeded inputs the stable replays of the bodies draw (deterministic, no
/// dependency). For the test suites of this crate and the daemon.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // (not an iterator: it never ends)
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (not zero).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Run `body` on every file of `dir` (`fuzz/regressions/<target>/`, `fuzz/seeds/<target>/`);
/// a missing directory is none yet.
pub fn replay_dir(dir: &std::path::Path, body: fn(&[u8])) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.expect("a readable fuzz input directory").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        body(&data);
    }
}
