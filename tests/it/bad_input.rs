//! Malformed input from callers: each case gets its documented outcome, and a bystander
//! connection keeps being served throughout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::{ErrorCode, Header, Kind, HEADER_BYTES};

use crate::common::{bridge, Bridge, ServiceSpec};

fn start() -> (Bridge, BlockingClient) {
    let bridge = bridge()
        .top("max_payload_bytes = 1048576")
        .service(ServiceSpec::echo())
        .start();
    let mut bystander = bridge.client();
    assert_eq!(bystander.call("echo", b"before").unwrap(), b"before");
    (bridge, bystander)
}

fn still_served(bridge: &Bridge, bystander: &mut BlockingClient) {
    assert_eq!(bystander.call("echo", b"after").unwrap(), b"after");
    assert_eq!(bridge.client().call("echo", b"new").unwrap(), b"new");
}

/// Read one answer frame from a raw stream.
fn read_answer(stream: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut bytes = [0u8; HEADER_BYTES];
    stream.read_exact(&mut bytes).expect("an answer");
    let header = Header::decode(&bytes, u32::MAX).expect("a valid answer header");
    let mut payload = vec![0; header.payload_len as usize];
    stream.read_exact(&mut payload).unwrap();
    (header, payload)
}

fn assert_closed(stream: &mut UnixStream) {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("orderly close");
    assert!(rest.is_empty(), "nothing after the error: {rest:?}");
}

#[test]
fn random_bytes_get_malformed_frame_then_close() {
    // Proves garbage is answered with code 7 and the connection is closed.
    let (bridge, mut bystander) = start();
    let mut stream = UnixStream::connect(&bridge.unix).unwrap();
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(37) ^ 0x5A) as u8)
        .collect();
    stream.write_all(&garbage).unwrap();
    let (header, message) = read_answer(&mut stream);
    assert_eq!(header.kind, Kind::Error);
    assert_eq!(header.error_code(), Some(ErrorCode::MalformedFrame));
    assert!(String::from_utf8_lossy(&message).contains("bad magic"));
    assert_closed(&mut stream);
    still_served(&bridge, &mut bystander);
}

#[test]
fn truncated_header_then_disconnect_is_dropped_quietly() {
    // Proves a caller vanishing mid-header costs nothing but its connection.
    let (bridge, mut bystander) = start();
    let mut stream = UnixStream::connect(&bridge.unix).unwrap();
    let header = Header::new(Kind::Request, 1, 5, 3).encode();
    stream.write_all(&header[..10]).unwrap();
    drop(stream);
    still_served(&bridge, &mut bystander);
}

#[test]
fn wrong_version_gets_malformed_frame_naming_versions() {
    // Proves a future-version frame is refused with code 7 and its request id, then closed.
    let (bridge, mut bystander) = start();
    let mut stream = UnixStream::connect(&bridge.unix).unwrap();
    let mut frame = Header::new(Kind::Request, 1, 77, 0).encode();
    frame[2] = 2;
    stream.write_all(&frame).unwrap();
    let (header, message) = read_answer(&mut stream);
    assert_eq!(header.error_code(), Some(ErrorCode::MalformedFrame));
    assert_eq!(header.request_id, 77);
    let message = String::from_utf8_lossy(&message);
    assert!(
        message.contains("version 2") && message.contains("speaks 1"),
        "{message}"
    );
    assert_closed(&mut stream);
    still_served(&bridge, &mut bystander);
}

#[test]
fn length_over_max_is_refused_and_the_connection_stays_usable() {
    // Proves an oversized request gets code 2 with its id, its payload is skipped, and the
    // next request on the same connection is served.
    let (bridge, mut bystander) = start();
    let mut client = bridge.client();
    let id = client.send(1, &vec![1u8; 1_048_577]).unwrap();
    let answer = client.receive().unwrap();
    assert_eq!(answer.header.request_id, id);
    assert_eq!(answer.header.error_code(), Some(ErrorCode::PayloadTooLarge));
    assert_eq!(client.call("echo", b"next").unwrap(), b"next");
    still_served(&bridge, &mut bystander);
}

#[test]
fn header_then_disconnect_is_dropped_quietly() {
    // Proves a caller that promises a payload and leaves does not disturb anyone.
    let (bridge, mut bystander) = start();
    let mut stream = UnixStream::connect(&bridge.unix).unwrap();
    stream
        .write_all(&Header::new(Kind::Request, 1, 9, 1000).encode())
        .unwrap();
    stream.write_all(b"partial").unwrap();
    drop(stream);
    still_served(&bridge, &mut bystander);
}

#[test]
fn unknown_service_id_is_refused_and_the_connection_stays_usable() {
    // Proves an unknown service gets code 1 and the same connection keeps working.
    let (bridge, mut bystander) = start();
    let mut client = bridge.client();
    let error = client.call(999u32, b"x").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownService), "{error}");
    let error = client.call("missing", b"x").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownService), "{error}");
    assert_eq!(client.call("echo", b"fine").unwrap(), b"fine");
    still_served(&bridge, &mut bystander);
}

#[test]
fn bridge_to_caller_kinds_and_flags_from_a_caller_are_malformed() {
    // Proves a caller cannot send Reply/Job frames or worker flags.
    let (bridge, mut bystander) = start();
    for (kind, flags) in [(Kind::Reply, 0), (Kind::Job, 0), (Kind::Request, 1)] {
        let mut stream = UnixStream::connect(&bridge.unix).unwrap();
        let mut header = Header::new(kind, 1, 5, 0);
        header.flags = flags;
        stream.write_all(&header.encode()).unwrap();
        let (answer, _) = read_answer(&mut stream);
        assert_eq!(
            answer.error_code(),
            Some(ErrorCode::MalformedFrame),
            "{kind:?}"
        );
        assert_closed(&mut stream);
    }
    still_served(&bridge, &mut bystander);
}

#[test]
fn a_caller_that_never_reads_is_disconnected_not_buffered_forever() {
    // Proves the per-connection write queue is bounded: the bridge drops a caller that piles
    // up answers it does not read, and keeps serving others.
    let bridge = bridge()
        .top("max_payload_bytes = 1048576")
        .top("write_queue_max_bytes = 2097152")
        .service(ServiceSpec::echo())
        .start();
    let mut bystander = bridge.client();
    let mut stream = UnixStream::connect(&bridge.unix).unwrap();
    stream
        .set_write_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let payload = vec![3u8; 1 << 20];
    let mut frame = Header::new(Kind::Request, 1, 1, payload.len() as u32)
        .encode()
        .to_vec();
    frame.extend_from_slice(&payload);
    // Far more answers than socket buffers plus the 2 MiB queue can hold; the bridge must cut
    // us off, which surfaces here as a failed write.
    let mut cut_off = false;
    for _ in 0..200 {
        if stream.write_all(&frame).is_err() {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off,
        "the bridge kept buffering for a caller that never reads"
    );
    bridge.wait_log("not reading its answers");
    still_served(&bridge, &mut bystander);
}

#[test]
fn a_storm_of_mutated_frames_never_takes_the_bridge_down() {
    // Proves robustness against arbitrary input: many connections send valid frames with
    // random mutations (bytes flipped, truncated, lengths changed, kinds and flags changed,
    // garbage appended) while a bystander keeps making checked calls; the bridge answers or
    // closes each bad connection and stays up, and the bystander sees only its own replies.
    let bridge = bridge()
        .top("max_payload_bytes = 65536")
        .service(ServiceSpec::echo().workers(2, 2))
        .start();
    let mut bystander = bridge.client();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound.max(1)
    };
    for round in 0..2000u64 {
        let mut frames = Vec::new();
        for i in 0..(1 + next(8)) {
            let len = next(300) as usize;
            let payload = crate::common::tagged_payload(round * 100 + i, len);
            let kind = [Kind::Request, Kind::Resolve, Kind::Ping][next(3) as usize];
            let mut header = Header::new(kind, 1 + next(2) as u32, round * 100 + i, len as u32);
            if kind == Kind::Resolve {
                header.service_id = 0;
            }
            let mut frame = header.encode().to_vec();
            frame.extend_from_slice(&payload);
            match next(10) {
                0 => {
                    let at = next(frame.len() as u64) as usize;
                    frame[at] ^= 1 << next(8);
                }
                1 => frame.truncate(next(frame.len() as u64) as usize),
                2 => frame[12..16].copy_from_slice(&(next(1 << 20) as u32).to_le_bytes()),
                3 => frame[3] = next(256) as u8,
                4 => frame[4] = next(256) as u8,
                5 => frame.extend((0..next(64)).map(|_| next(256) as u8)),
                _ => {}
            }
            frames.extend_from_slice(&frame);
        }
        let mut stream = UnixStream::connect(&bridge.unix).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(&frames);
        if next(2) == 0 {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Read whatever comes back until the bridge closes or stops answering.
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
        }
        drop(stream);
        if round % 50 == 0 {
            let payload = format!("bystander {round}");
            assert_eq!(
                bystander.call("echo", payload.as_bytes()).unwrap(),
                payload.as_bytes()
            );
        }
    }
    assert_eq!(
        bystander.call("echo", b"still alive").unwrap(),
        b"still alive"
    );
    let status = bridge.status();
    assert!(
        status.counters.malformed_frames > 0,
        "the storm should have had malformed frames"
    );
    bridge.assert_no_zombies();
}
