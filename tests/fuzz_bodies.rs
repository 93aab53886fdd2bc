//! The daemon's fuzz targets' bodies (`acgi_bridge::fuzzing`) on the stable toolchain: seeded
//! random inputs, inputs built to be valid (so acceptance is exercised, not only rejection),
//! every input the fuzzer ever reported (`fuzz/regressions/<target>/`) and the seeds it starts
//! from (`fuzz/seeds/<target>/`).

use acgi_bridge::fuzzing::{self, PAYLOAD_BOUND, WORKER_PREFIX_BYTES};
use acgi_bridge::proto::fuzzing::{replay_dir, Rng};
use acgi_bridge::proto::{Header, Hello, Kind, FLAG_IN_SLOT, FLAG_QUEUED};
use acgi_bridge::shm::SLOT_ABI_VERSION;

#[test]
fn random_bytes_never_break_the_daemon_parsers() {
    // Proves the three bodies' properties hold on unstructured input (mostly rejections).
    let mut rng = Rng(0x5eed_da3e);
    for _ in 0..20_000 {
        let len = rng.below(400) as usize;
        let data = rng.bytes(len);
        fuzzing::worker_answer(&data);
        fuzzing::admin_line(&data);
        fuzzing::metrics_head(&data);
    }
}

/// A worker frame input (see `fuzzing::worker_answer`) that is mostly legal: a busy worker's
/// Done or Fail for its job against a Replied slot, or a starting worker's Hello, with one
/// field sometimes wrong.
fn worker_input(rng: &mut Rng) -> Vec<u8> {
    let sequence = rng.below(4);
    let capacity_byte = rng.below(16) as u8;
    let capacity = 64 + 8 * u32::from(capacity_byte);
    let state: u8 = match rng.below(8) {
        0 => 0,                             // starting
        1 => 1,                             // stopping
        2 => 2,                             // idle
        _ => 4 | (rng.next() as u8 & 0x30), // busy, queued or not, its Job sent or not
    };
    let mut data = vec![state];
    data.extend_from_slice(&sequence.to_le_bytes());
    data.push(capacity_byte);
    assert_eq!(data.len(), WORKER_PREFIX_BYTES);
    let (mut header, payload) = if state == 0 && rng.below(2) == 0 {
        let abi = if rng.below(8) == 0 {
            2
        } else {
            SLOT_ABI_VERSION
        };
        let hello = Hello {
            slot_abi_version: abi,
            pid: 42,
        };
        let mut header = Header::new(Kind::Hello, 0, 0, Hello::BYTES as u32);
        header.flags = if rng.below(2) == 0 { FLAG_QUEUED } else { 0 };
        (header, hello.encode().to_vec())
    } else {
        let kind = if rng.below(3) == 0 {
            Kind::Fail
        } else {
            Kind::Done
        };
        let in_slot = kind == Kind::Done && rng.below(2) == 0;
        let len = if in_slot && rng.below(8) != 0 {
            0
        } else {
            rng.below(u64::from(PAYLOAD_BOUND) / 8) as usize
        };
        let answered = if rng.below(8) == 0 {
            sequence + 1
        } else {
            sequence
        };
        let mut header = Header::new(kind, 1, answered, len as u32);
        header.flags = if in_slot { FLAG_IN_SLOT } else { 0 };
        (header, rng.bytes(len))
    };
    if rng.below(16) == 0 {
        header.flags |= 1 << rng.below(3); // a flag it may not carry, sometimes
    }
    data.extend_from_slice(&header.encode());
    let mut slot = vec![0u8; 64];
    let slot_state: u32 = if rng.below(8) == 0 {
        rng.below(6) as u32
    } else {
        3
    };
    let slot_sequence = if rng.below(8) == 0 {
        sequence + 1
    } else {
        sequence
    };
    let reply_len = rng.below(u64::from(capacity) + 8) as u32;
    slot[8..12].copy_from_slice(&slot_state.to_le_bytes());
    slot[12..16].copy_from_slice(&capacity.to_le_bytes());
    slot[20..24].copy_from_slice(&reply_len.to_le_bytes());
    slot[24..32].copy_from_slice(&slot_sequence.to_le_bytes());
    data.extend_from_slice(&slot);
    data.extend_from_slice(&payload);
    data.extend(rng.bytes(capacity as usize));
    data
}

#[test]
fn worker_frames_built_to_be_legal_are_judged_by_the_protocol() {
    // Proves acceptance (Ready, Answer, a reply taken from the slot) is reached and checked,
    // as well as each single fault a frame or slot header can carry.
    let mut rng = Rng(0x0a11_53e4);
    for _ in 0..20_000 {
        let data = worker_input(&mut rng);
        fuzzing::worker_answer(&data);
    }
}

#[test]
fn admin_lines_and_metrics_heads_built_to_be_valid_are_accepted() {
    // Proves the admin and HTTP properties on inputs the parsers accept: command lines with
    // their newline, and heads that ask for /metrics or /readyz.
    let mut rng = Rng(0x4ead);
    let lines = [
        "status\n",
        "pause echo\n",
        "set 9 max_workers=3 backlog_max=10\n",
        "kill-worker 17\n",
    ];
    let heads = [
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; q=0.5, text/plain;q=0.4\r\n\r\n",
        "HEAD /readyz?x=1 HTTP/1.0\n\n",
        "GET http://bridge:9/metrics#f HTTP/1.1\r\nHost: bridge\r\n\r\nbody",
    ];
    for _ in 0..5_000 {
        let mut line = lines[rng.below(4) as usize].as_bytes().to_vec();
        let mut head = heads[rng.below(3) as usize].as_bytes().to_vec();
        if rng.below(2) == 0 {
            let at = rng.below(head.len() as u64) as usize;
            head[at] = rng.next() as u8; // and sometimes one byte changed
            let at = rng.below(line.len() as u64) as usize;
            line[at] = rng.next() as u8;
        }
        let tail = rng.below(300) as usize;
        line.extend(rng.bytes(tail));
        fuzzing::admin_line(&line);
        fuzzing::metrics_head(&head);
    }
}

/// A target's body.
type Body = fn(&[u8]);

#[test]
fn every_input_the_fuzzer_reported_stays_fixed() {
    // Proves each crash found once (kept in fuzz/regressions/<target>/) stays fixed, and
    // that the seeds the fuzzer starts from (fuzz/seeds/<target>/) hold the properties too.
    let targets: [(&str, Body); 3] = [
        ("worker_answer", fuzzing::worker_answer),
        ("admin_line", fuzzing::admin_line),
        ("metrics_head", fuzzing::metrics_head),
    ];
    for ((target, body), kind) in targets
        .into_iter()
        .flat_map(|t| [(t, "regressions"), (t, "seeds")])
    {
        let dir = format!("{}/fuzz/{kind}/{target}", env!("CARGO_MANIFEST_DIR"));
        replay_dir(std::path::Path::new(&dir), body);
    }
}
