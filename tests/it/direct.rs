//! Large request payloads read from the caller's socket straight into a worker's slot.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use acgi_bridge::proto::{Header, Kind};

use crate::common::{bridge, pipeline_tagged, tagged_payload, wait_until_read, ServiceSpec};

#[test]
fn large_requests_are_read_straight_into_worker_slots_and_come_back_whole() {
    // Proves the direct read: requests of 4 KiB up to the slot size, one at a time over Unix
    // and TCP and pipelined, each reach the worker intact (the echo proves every byte) and
    // most go from the socket straight into the slot.
    for buffers in [0, 1024] {
        direct_reads_of_every_size(buffers);
    }
}

/// One run of the test above, with `buffers` provided buffers (0: plain receives).
fn direct_reads_of_every_size(buffers: u32) {
    let bridge = bridge()
        .top("cores = 1")
        .top(&format!("provided_buffers = {buffers}"))
        .service(ServiceSpec::echo().workers(2, 2))
        .start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    let mut clients = [bridge.client(), bridge.tcp_client()];
    for client in &mut clients {
        for (tag, len) in [4096usize, 4097, 10_000, 32 * 1024, 65_535, 65_536]
            .into_iter()
            .enumerate()
        {
            let payload = tagged_payload(tag as u64, len);
            assert!(
                client.call("echo", &payload).unwrap() == payload,
                "{len} bytes"
            );
        }
    }
    let status = bridge.status();
    assert!(
        status.counters.requests_read_into_slot >= 12,
        "the one-at-a-time calls go direct: {status:#?}"
    );
    if buffers == 0 {
        // Only each connection's first large request arrived with part of its payload (at most
        // the 2 KiB first read); after it, headers are read alone and payloads go to the slot.
        assert!(
            status.counters.direct_read_prefix_bytes <= 2 * 2048,
            "{} payload bytes copied",
            status.counters.direct_read_prefix_bytes
        );
    }
    for client in &mut clients {
        pipeline_tagged(client, 0..200, |tag| 4096 + (tag as usize * 977) % 61_440);
    }
    assert_eq!(bridge.status().counters.requests_ok, 2 * (6 + 200));
}

#[test]
fn large_and_small_requests_with_queued_jobs_keep_every_answer_with_its_request() {
    // Proves the mix under load: large requests (read into a slot when a worker is idle and
    // their payload is still arriving, else copied) and small ones, on several connections to
    // workers that take queued jobs, every answer its own and none failed. (The ordering case
    // itself is pinned down by `jobs_queued_behind_a_payload_still_arriving_run_after_it`.)
    let mut echo = ServiceSpec::echo().workers(2, 2);
    echo.extra = "worker_queue_depth = 8\n".into();
    let bridge = bridge().top("cores = 1").service(echo).start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    std::thread::scope(|scope| {
        for connection in 0..4u64 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = bridge.client();
                for round in 0..20u64 {
                    let first = connection * 100_000 + round * 10;
                    pipeline_tagged(&mut client, first..first + 10, |tag| {
                        if tag % 3 == 0 {
                            60_000
                        } else {
                            100
                        }
                    });
                    let payload = tagged_payload(first, 50_000);
                    assert!(client.call("echo", &payload).unwrap() == payload);
                }
            });
        }
    });
    let status = bridge.status();
    assert_eq!(status.counters.requests_failed, 0, "{status:#?}");
    assert_eq!(status.counters.requests_ok, 4 * 20 * 11);
}

/// A request header for a `len`-byte echo payload, then the first `sent` bytes of it.
fn partial_request(len: usize, sent: usize) -> Vec<u8> {
    let mut frame = Header::new(Kind::Request, 1, 7, len as u32)
        .encode()
        .to_vec();
    frame.extend_from_slice(&tagged_payload(7, sent));
    frame
}

#[test]
fn a_caller_that_leaves_mid_payload_frees_its_worker() {
    // Proves the abort: a caller that closes after two thirds of a large payload (enough for
    // the direct read to begin, with a second worker idle) fails only its own request; the
    // worker that was waiting for the payload serves the next caller.
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(2, 2))
        .start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    for _ in 0..3 {
        let mut stream = UnixStream::connect(&bridge.unix).unwrap();
        stream.write_all(&partial_request(60_000, 40_000)).unwrap();
        bridge.wait_status("the direct read to begin", |s| {
            s.services[0].workers_busy == 1
        });
        drop(stream);
        let payload = tagged_payload(1, 30_000);
        assert!(bridge.client().call("echo", &payload).unwrap() == payload);
    }
    let status = bridge.service_status("echo");
    assert_eq!(status.requests_failed.get("malformed frame"), Some(&3));
    assert_eq!(status.spawns, 2, "no worker was replaced");
}

#[test]
fn a_caller_that_stalls_mid_payload_is_disconnected_and_others_are_served() {
    // Proves the direct-read timeout: a caller that sends a header and most of a large payload
    // (so the direct read begins), then nothing, holds a worker only until the timeout;
    // meanwhile the other worker serves everyone else.
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(2, 2))
        .start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    let mut staller = UnixStream::connect(&bridge.unix).unwrap();
    staller.write_all(&partial_request(60_000, 40_000)).unwrap();
    bridge.wait_status("the direct read to begin", |s| {
        s.services[0].workers_busy == 1
    });
    let mut client = bridge.client();
    for tag in 0..50 {
        let payload = tagged_payload(tag, 100);
        assert!(client.call("echo", &payload).unwrap() == payload);
    }
    // The bridge closes the staller's connection (EOF) after the timeout.
    let mut rest = Vec::new();
    staller.read_to_end(&mut rest).unwrap();
    bridge.wait_status("the worker back", |s| s.services[0].workers_idle == 2);
    bridge.wait_log("disconnecting it");
    let payload = tagged_payload(2, 60_000);
    assert!(client.call("echo", &payload).unwrap() == payload);
}

#[test]
fn jobs_queued_behind_a_payload_still_arriving_run_after_it() {
    // Proves the order on a worker that takes queued jobs: while a large payload is still
    // arriving into its slot, requests queued to the same worker wait, and its `Job` goes
    // ahead of theirs, so every answer is matched to its own request.
    let mut echo = ServiceSpec::echo().workers(2, 2);
    echo.extra = "worker_queue_depth = 8\n".into();
    // (With provided buffers: the multishot receive is cancelled for the direct read. Two
    // workers: a direct read of a payload not all there never takes the last idle one.)
    let bridge = bridge()
        .top("cores = 1")
        .top("provided_buffers = 1024")
        .service(echo)
        .start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    let full = tagged_payload(7, 60_000);
    let mut slow = UnixStream::connect(&bridge.unix).unwrap();
    slow.write_all(&partial_request(60_000, 40_000)).unwrap();
    bridge.wait_status("the direct read to begin", |s| {
        s.services[0].workers_busy == 1
    });
    let mut other = bridge.client();
    let ids: Vec<u64> = (0..3)
        .map(|tag| other.send(1, &tagged_payload(100 + tag, 200)).unwrap())
        .collect();
    slow.write_all(&full[40_000..]).unwrap();
    let mut header = [0u8; 24];
    slow.read_exact(&mut header).unwrap();
    let header = Header::decode(&header, 1 << 24).unwrap();
    assert_eq!((header.kind, header.request_id), (Kind::Reply, 7));
    let mut reply = vec![0; header.payload_len as usize];
    slow.read_exact(&mut reply).unwrap();
    assert!(reply == full);
    // (Two workers: the other caller's answers may come in any order, each with its id.)
    let mut answered = std::collections::HashMap::new();
    for _ in 0..ids.len() {
        let answer = other.receive().unwrap();
        assert_eq!(answer.header.kind, Kind::Reply);
        answered.insert(answer.header.request_id, answer.payload);
    }
    for (tag, id) in ids.into_iter().enumerate() {
        assert!(
            answered[&id] == tagged_payload(100 + tag as u64, 200),
            "request {id}"
        );
    }
    assert_eq!(bridge.status().counters.requests_read_into_slot, 1);
}

#[test]
fn a_worker_that_takes_queued_jobs_sends_large_replies_from_its_slot_and_keeps_working() {
    // Proves the slot lend for workers with a queue depth: large replies go out from the slot
    // while the worker already runs its next jobs (inline meanwhile), and every answer, large or
    // small, one at a time or pipelined, is its own.
    let mut echo = ServiceSpec::echo().workers(1, 1);
    echo.extra = "worker_queue_depth = 8\n".into();
    let bridge = bridge().top("cores = 1").service(echo).start();
    bridge.wait_status("1 worker", |s| s.services[0].workers_idle == 1);
    let mut client = bridge.client();
    for tag in 0..20u64 {
        let payload = tagged_payload(tag, 8192 + tag as usize * 2000);
        assert!(client.call("echo", &payload).unwrap() == payload);
    }
    assert!(bridge.status().counters.replies_sent_from_slot > 0);
    // Two callers one request at a time each, one large, one small: the small one's request
    // often arrives while the worker is idle and its slot still lent to the large reply, and
    // goes inline.
    std::thread::scope(|scope| {
        let bridge = &bridge;
        scope.spawn(move || {
            let mut client = bridge.client();
            let payload = tagged_payload(1, 20_000);
            for _ in 0..1500 {
                assert!(client.call("echo", &payload).unwrap() == payload);
            }
        });
        scope.spawn(move || {
            let mut client = bridge.client();
            for _ in 0..1500 {
                assert_eq!(client.call("echo", b"small").unwrap(), b"small");
            }
        });
    });
    std::thread::scope(|scope| {
        for connection in 0..3u64 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = bridge.client();
                let first = connection * 10_000;
                pipeline_tagged(&mut client, first..first + 200, |tag| {
                    if tag % 4 == 0 {
                        30_000
                    } else {
                        50
                    }
                });
            });
        }
    });
    let status = bridge.status();
    assert_eq!(status.counters.requests_failed, 0, "{status:#?}");
    assert_eq!(status.counters.requests_ok, 20 + 3000 + 600);
    assert_eq!(
        status.services[0].spawns, 1,
        "the worker never broke the protocol"
    );
}

#[test]
fn slow_uploads_hold_no_worker_and_a_bystander_is_served_at_once() {
    // Proves the direct read waits for the payload: four callers that each send a large
    // request's header and 10 bytes, then stall, take no worker (before, each held one for
    // 5 s, and a bystander's echo waited for them); every worker stays idle for the bystander,
    // and each slow request, once its payload is complete, still gets its own reply.
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(4, 4))
        .start();
    bridge.wait_status("4 workers", |s| s.services[0].workers_idle == 4);
    let mut slow: Vec<UnixStream> = (0..4)
        .map(|_| {
            let mut stream = UnixStream::connect(&bridge.unix).unwrap();
            stream.write_all(&partial_request(60_000, 10)).unwrap();
            stream
        })
        .collect();
    // Once the bridge has read what they sent, they have had their chance to take workers.
    for stream in &slow {
        wait_until_read(stream);
    }
    let status = bridge.status();
    assert_eq!(
        (
            status.services[0].workers_idle,
            status.services[0].workers_busy
        ),
        (4, 0),
        "slow uploads hold no worker: {status:#?}"
    );
    let mut bystander = bridge.client();
    for tag in 0..20 {
        let started = std::time::Instant::now();
        let payload = tagged_payload(tag, 100);
        assert!(bystander.call("echo", &payload).unwrap() == payload);
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(1),
            "an echo took {took:?}"
        );
    }
    let full = tagged_payload(7, 60_000);
    for stream in &mut slow {
        stream.write_all(&full[10..]).unwrap();
        let (header, reply) = crate::common::read_frame(stream);
        assert_eq!((header.kind, header.request_id), (Kind::Reply, 7));
        assert!(reply == full, "the slow upload's own reply");
    }
}
