//! The fuzz targets' bodies (`acgi_proto::fuzzing`) on the stable toolchain: seeded random
//! inputs, frames built to be valid (so reassembly is exercised, not only rejection), and every
//! input the fuzzer ever reported (`fuzz/regressions/`).

use acgi_proto::frame::{Header, Kind};
use acgi_proto::fuzzing;
use acgi_proto::fuzzing::{replay_dir, Rng};

#[test]
fn random_bytes_never_break_decoding_or_reassembly() {
    let mut rng = Rng(0x5eed);
    for _ in 0..20_000 {
        let len = (rng.next() % 200) as usize;
        let data = rng.bytes(len);
        fuzzing::header_roundtrip(&data);
        fuzzing::frame_stream(&data);
    }
}

#[test]
fn valid_streams_cut_anywhere_give_the_same_frames() {
    let mut rng = Rng(0xf4a3e);
    for _ in 0..2_000 {
        let mut data = rng.bytes(8); // the cut sizes
        for id in 0..(rng.next() % 6) {
            let len = (rng.next() % 300) as usize;
            let header = Header::new(Kind::Request, 1, id, len as u32);
            data.extend_from_slice(&header.encode());
            data.extend(rng.bytes(len));
        }
        if rng.next() % 4 == 0 {
            let at = (rng.next() as usize) % data.len();
            data[at] ^= 1 << (rng.next() % 8); // and sometimes one flipped bit
        }
        fuzzing::frame_stream(&data);
    }
}

/// A target's body.
type Body = fn(&[u8]);

#[test]
fn every_input_the_fuzzer_reported_stays_fixed() {
    // Each target's crashes are kept in fuzz/regressions/<target>/ (the daemon's targets are
    // replayed by the daemon's own tests/fuzz_bodies.rs).
    let targets: [(&str, Body); 2] = [
        ("header_roundtrip", fuzzing::header_roundtrip),
        ("frame_stream", fuzzing::frame_stream),
    ];
    for (target, body) in targets {
        let dir = format!(
            "{}/../../fuzz/regressions/{target}",
            env!("CARGO_MANIFEST_DIR")
        );
        replay_dir(std::path::Path::new(&dir), body);
    }
}
