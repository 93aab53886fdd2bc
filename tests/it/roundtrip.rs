//! Round trips, pipelining and payload sizes through the real bridge.

use acgi_bridge::client::Client;
use acgi_bridge::proto::{ErrorCode, Kind};

use crate::common::{bridge, pipeline_tagged, tagged_payload, ServiceSpec};

#[test]
fn echo_and_kv_round_trip_over_unix_and_tcp() {
    // Proves each bundled service answers over both listeners, by name and by id.
    let bridge = bridge()
        .service(ServiceSpec::echo())
        .service(ServiceSpec::kv())
        .start();
    for mut client in [bridge.client(), bridge.tcp_client()] {
        assert_eq!(client.call("echo", b"hello").unwrap(), b"hello");
        assert_eq!(client.call(1u32, b"by id").unwrap(), b"by id");
        assert_eq!(client.call("kv", b"put greeting hi there").unwrap(), b"OK");
        assert_eq!(client.call("kv", b"get greeting").unwrap(), b"hi there");
    }
    bridge.assert_no_zombies();
}

#[test]
fn ten_thousand_pipelined_requests_on_one_connection() {
    // Proves pipelined requests on one connection each get their own reply, none lost.
    let bridge = bridge().service(ServiceSpec::echo().workers(2, 4)).start();
    pipeline_tagged(&mut bridge.client(), 0..10_000, |_| 48);
}

#[test]
fn ten_thousand_pipelined_requests_on_each_of_sixteen_connections() {
    // Proves concurrent connections never receive each other's replies.
    // 160 000 requests may all be waiting at once: the backlog must hold them.
    let bridge = bridge()
        .service(ServiceSpec::echo().workers(2, 8).backlog(200_000))
        .start();
    std::thread::scope(|scope| {
        for connection in 0..16 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = if connection % 2 == 0 {
                    bridge.client()
                } else {
                    bridge.tcp_client()
                };
                pipeline_tagged(&mut client, 0..10_000, |_| 40 + connection);
            });
        }
    });
}

#[test]
fn payload_sizes_around_the_slot_and_the_maximum() {
    // Proves payloads in the slot, over it (copy path) and at the maximum are returned intact,
    // and max+1 is refused with `payload too large` while the connection stays usable.
    let slot = 65536usize;
    let max = 16 * 1024 * 1024usize;
    let bridge = bridge().service(ServiceSpec::echo()).start();
    let mut client = bridge.client();
    for len in [0, 1, slot - 1, slot, slot + 1, 1 << 20, max] {
        let payload = tagged_payload(len as u64, len);
        let reply = client.call("echo", &payload).unwrap();
        assert_eq!(reply.len(), len);
        assert!(reply == payload, "payload of {len} bytes came back changed");
    }
    let error = client.call("echo", &vec![7u8; max + 1]).unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::PayloadTooLarge), "{error}");
    assert_eq!(client.call("echo", b"still here").unwrap(), b"still here");
}

#[test]
fn async_client_pipelines_many_calls_on_one_connection() {
    // Proves the tokio client matches out-of-order replies to their calls.
    let bridge = bridge()
        .service(ServiceSpec::echo().workers(4, 4))
        .service(ServiceSpec::faulty())
        .start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::connect(&bridge.unix).await.unwrap();
        // A slow call first: the fast ones overtake it on the same connection.
        let slow = {
            let client = client.clone();
            tokio::spawn(async move { client.call("faulty", b"sleep 200").await })
        };
        let mut calls = Vec::new();
        for tag in 0..2000u64 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let payload = tagged_payload(tag, 100);
                (client.call("echo", &payload).await.unwrap(), payload)
            }));
        }
        for call in calls {
            let (reply, payload) = call.await.unwrap();
            assert_eq!(reply, payload);
        }
        assert_eq!(slow.await.unwrap().unwrap(), &b"slept"[..]);
        let error = client.call("nope", b"").await.unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::UnknownService));
    });
}

#[test]
fn call_command_prints_the_reply() {
    // Proves `acgi-bridge call` works against a running bridge, by name, over both listeners.
    let bridge = bridge()
        .service(ServiceSpec::echo())
        .service(ServiceSpec::kv())
        .start();
    let run = |args: &[&str]| {
        std::process::Command::new(crate::common::bridge_exe())
            .arg("call")
            .args(args)
            .output()
            .unwrap()
    };
    let output = run(&["--connect", &bridge.unix, "echo", "hello"]);
    assert!(output.status.success());
    assert_eq!(output.stdout, b"hello");
    let output = run(&["--connect", &bridge.tcp, "kv", "put k v"]);
    assert_eq!(output.stdout, b"OK");
    let output = run(&["--connect", &bridge.unix, "kv", "get missing"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("service error (code 8): not found"),
        "{stderr}"
    );
    let output = run(&["--connect", &bridge.unix, "nosuch", "x"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown service"));
}

#[test]
fn slot_sized_replies_to_a_caller_that_reads_late_arrive_whole_and_in_place() {
    // Proves replies sent straight from worker slots (registered buffers) stay intact and
    // correctly framed when the caller's socket fills up and the bridge must spill the rest
    // into its queue: every reply still matches its own request.
    // One worker: each reply is made while the previous one has been handed to the socket, so
    // most go out from the slot until the caller's socket buffer is full and one falls short.
    // One core: the caller and the worker on the same core (a reply from another core's
    // worker arrives copied, never from a slot).
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    // 300 x up to 60 KiB = 9 MiB of replies, far more than the socket buffers.
    pipeline_tagged(&mut bridge.client(), 0..300, |tag| {
        4096 + (tag as usize * 193) % (60 * 1024)
    });
    let mut bridge = bridge;
    assert!(bridge.stop().success());
    let log = bridge.log();
    let counter = |name: &str| -> u64 {
        log.split(&format!("{name}: "))
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the exit counters:\n{log}"))
    };
    assert!(
        counter("replies_sent_from_slot") > 0,
        "no reply was sent from a slot"
    );
    assert!(
        counter("slot_sends_spilled") > 0,
        "the full-socket path was not taken"
    );
}

#[test]
fn without_cap_ipc_lock_and_a_small_memlock_limit_slots_fall_back_and_work() {
    // Proves the RLIMIT_MEMLOCK handling: without CAP_IPC_LOCK and with a limit too small for
    // every slot, the bridge says so at startup naming the fix, registers what fits, and
    // serves every payload size through the slots it could not register too.
    let bridge = bridge()
        .wrapper(&[
            "prlimit",
            "--memlock=393216:393216",
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ])
        // One ring: each core's ring takes locked memory too (see the next test).
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(3, 3))
        .start();
    let status = bridge.wait_status("3 workers", |s| s.services[0].workers_idle == 3);
    assert!(
        status.slots_registered < 3,
        "the limit should not fit 3 slots: {status:#?}"
    );
    let mut client = bridge.client();
    for len in [10usize, 60 * 1024, 200 * 1024] {
        let payload = tagged_payload(len as u64, len);
        for _ in 0..6 {
            assert!(
                client.call("echo", &payload).unwrap() == payload,
                "{len} bytes"
            );
        }
    }
    let log = bridge.wait_log("RLIMIT_MEMLOCK is 384 KiB");
    assert!(log.contains("CAP_IPC_LOCK"), "{log}");
}

#[test]
fn a_memlock_limit_too_small_for_the_ring_stops_the_bridge_with_the_fix() {
    // Proves the startup error names RLIMIT_MEMLOCK and the fix when even the ring cannot be
    // created.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    std::fs::write(
        &config,
        bridge()
            .service(ServiceSpec::echo())
            .config_text(dir.path()),
    )
    .unwrap();
    let output = std::process::Command::new("prlimit")
        .args([
            "--memlock=65536:65536",
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ])
        .arg(crate::common::bridge_exe())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RLIMIT_MEMLOCK is 64 KiB") && stderr.contains("CAP_IPC_LOCK"),
        "{stderr}"
    );
}

#[test]
fn the_data_path_allocates_nothing_per_request_in_steady_state() {
    // Proves, with the bridge's counting allocator, that once warm the request path (frame in,
    // slot hand-over, doorbells, reply out) makes no heap allocation per request: 10 000
    // requests cost fewer allocations than 1 per 100 requests.
    let bridge = bridge().service(ServiceSpec::echo().workers(2, 2)).start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    let mut client = bridge.client();
    let run = |client: &mut acgi_bridge::client::BlockingClient, count: u64| {
        for round in 0..count / 100 {
            for i in 0..100 {
                client
                    .send(1, &tagged_payload(round * 100 + i, 512))
                    .unwrap();
            }
            for _ in 0..100 {
                assert_eq!(client.receive().unwrap().header.kind, Kind::Reply);
            }
        }
    };
    run(&mut client, 5_000);
    let before = bridge.status().allocations;
    let empty_status = bridge.status().allocations - before;
    run(&mut client, 10_000);
    let after = bridge.status().allocations;
    let per_request = (after - before - empty_status) as f64 / 10_000.0;
    eprintln!(
        "allocations: {} in 10 000 requests (status itself: {empty_status})",
        after - before - empty_status
    );
    assert!(per_request < 0.01, "{per_request} allocations per request");
}

#[test]
fn receives_stay_whole_with_a_tiny_provided_buffer_ring_and_without_one() {
    // Proves the receive paths: with a ring of 2 provided buffers per core, many connections'
    // receives outrun it (ENOBUFS) and fall back to plain receives; with none, every receive
    // is plain. Either way every pipelined request, small or large, gets its own reply.
    for buffers in [2, 0] {
        let bridge = bridge()
            .top(&format!("provided_buffers = {buffers}"))
            .service(ServiceSpec::echo().workers(2, 4))
            .start();
        std::thread::scope(|scope| {
            for connection in 0..16u64 {
                let bridge = &bridge;
                scope.spawn(move || {
                    let mut client = bridge.client();
                    let first = connection * 1_000_000;
                    pipeline_tagged(&mut client, first..first + 300, |tag| {
                        if tag % 50 == 0 {
                            40_000
                        } else {
                            64 + (tag % 200) as usize
                        }
                    });
                });
            }
        });
        let status = bridge.status();
        assert_eq!(
            status.counters.requests_ok,
            16 * 300,
            "{buffers} buffers: {status:#?}"
        );
        assert_eq!(status.counters.requests_failed, 0);
        assert_eq!(
            status.counters.provided_buffers_ran_out > 0,
            buffers > 0,
            "2 buffers run out under 16 connections; none cannot: {status:#?}"
        );
    }
}

#[test]
fn idle_connections_hold_no_read_buffer() {
    // Proves the point of provided buffers: 200 connections that have each been answered and
    // now wait hold no read buffer of their own (their next bytes land in a buffer the kernel
    // picks), while each still gets answers.
    let bridge = bridge()
        .top("provided_buffers = 1024")
        .service(ServiceSpec::echo().workers(1, 2))
        .start();
    let mut clients: Vec<_> = (0..200).map(|_| bridge.client()).collect();
    for (tag, client) in clients.iter_mut().enumerate() {
        let payload = tagged_payload(tag as u64, 100);
        assert!(client.call("echo", &payload).unwrap() == payload);
    }
    let status = bridge.status();
    assert_eq!(status.connections, 200);
    assert_eq!(status.read_buffers_held, 0, "{status:#?}");
    let payload = tagged_payload(7, 100);
    assert!(clients[7].call("echo", &payload).unwrap() == payload);
}
