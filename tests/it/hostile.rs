//! Hostile workers that break the worker protocol in ways that used to confuse the bridge's
//! bookkeeping: each is killed for its violation (the log says which), its caller gets `worker
//! failed`, and the bridge goes on serving everyone else, its other workers' slots untouched.

use std::io::Write;
use std::os::unix::net::UnixStream;

use acgi_bridge::proto::{ErrorCode, Header, Kind};

use crate::common::{bridge, read_frame, tagged_payload, Bridge, ServiceSpec};

/// A request frame's header and the first `sent` bytes of its `len`-byte payload, which
/// starts with `EARLY!` (what the `--answer-early` worker watches its slot for).
fn early_request(service_id: u32, request_id: u64, len: usize, sent: usize) -> (Vec<u8>, Vec<u8>) {
    let mut payload = vec![b'p'; len];
    payload[..6].copy_from_slice(b"EARLY!");
    let mut frame = Header::new(Kind::Request, service_id, request_id, len as u32)
        .encode()
        .to_vec();
    frame.extend_from_slice(&payload[..sent]);
    (frame, payload)
}

/// The early answer against one pool configuration.
fn an_early_answer_is_a_violation(bridge: &Bridge) {
    // Two workers idle (an on-demand pool starts them for two requests at once).
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| bridge.client().call("faulty", b"sleep 1500").unwrap());
        }
    });
    bridge.wait_status("2 idle workers", |s| s.services[0].workers_idle == 2);
    let mut client = bridge.client();
    // The worker learns its sequence from one ordinary job (it guesses the next one).
    assert_eq!(client.call("faulty", b"echo warm").unwrap(), b"warm");
    let first_pid = client.call("faulty", b"pid").unwrap();
    let mut raw = UnixStream::connect(&bridge.unix).unwrap();
    // Two thirds of the payload: enough for the bridge to begin the direct read.
    let (frame, payload) = early_request(3, 77, 32 * 1024, 20_000);
    raw.write_all(&frame).unwrap();
    // The worker sees `EARLY!` land in its slot (the prefix the bridge copied when it began
    // the direct read) and answers before its Job frame is sent.
    let (header, message) = read_frame(&mut raw);
    let message = String::from_utf8_lossy(&message).into_owned();
    assert_eq!(
        (header.kind, header.request_id),
        (Kind::Error, 77),
        "an early answer must not reach the caller as a reply: {message}"
    );
    assert_eq!(
        header.code,
        ErrorCode::WorkerFailed as u16,
        "worker failed: {message}"
    );
    // The rest of the payload still arrives and is read (into the dead worker's slot, which
    // lives until the read ends): the connection stays usable.
    raw.write_all(&payload[20_000..]).unwrap();
    raw.write_all(&Header::new(Kind::Ping, 0, 78, 0).encode())
        .unwrap();
    let (pong, _) = read_frame(&mut raw);
    assert_eq!((pong.kind, pong.request_id), (Kind::Pong, 78));
    // A replacement serves, every answer its own (no caller bytes went into its slot).
    for tag in 0..50u64 {
        let payload = tagged_payload(tag, 100 + tag as usize * 1000);
        let mut request = b"echo ".to_vec();
        request.extend_from_slice(&payload);
        assert!(
            client.call("faulty", &request).unwrap() == payload,
            "reply {tag}"
        );
    }
    assert_ne!(
        client.call("faulty", b"pid").unwrap(),
        first_pid,
        "replaced"
    );
    let log = bridge.wait_log("before its Job frame was sent");
    assert!(
        log.contains("answered job"),
        "the log names the violation:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let faults = bridge.service_status("faulty").worker_faults;
    assert_eq!(faults.get("early_answer"), Some(&1), "{faults:?}");
}

#[test]
fn a_worker_that_answers_a_direct_read_before_its_job_is_killed() {
    // Proves protocol §9's early answer: a worker that guesses the next job sequence and
    // answers while the bridge is still reading the caller's payload into its slot is killed,
    // the caller gets `worker failed` (not a reply), and the bridge keeps serving, in a
    // static pool and in an on-demand one that may shrink to no worker at all.
    // (A direct read of a payload not all there needs a second idle worker: it never takes
    // the last one.)
    let static_pool = ServiceSpec::faulty()
        .workers(2, 2)
        .args(&["--answer-early"]);
    let first = bridge().top("cores = 1").service(static_pool).start();
    an_early_answer_is_a_violation(&first);
    drop(first);

    let mut ondemand = ServiceSpec::faulty()
        .workers(0, 2)
        .args(&["--answer-early"]);
    ondemand.extra = "mode = \"ondemand\"\nidle_timeout_ms = 5000\n".into();
    let mut bridge = bridge().top("cores = 1").service(ondemand).start();
    an_early_answer_is_a_violation(&bridge);
    assert!(bridge.stop().success(), "{}", bridge.log());
}

#[test]
fn a_request_given_to_a_worker_that_broke_the_protocol_before_its_job_went_runs_elsewhere() {
    // Proves the requeue: the worker answers job A and, in the same write, breaks the
    // protocol. Reading A's answer, the pool gave the worker B (waiting in the backlog); the
    // garbage that follows in the same receive kills it before B's job is sent. B never
    // reached it, so B runs on the replacement (once) instead of failing with `worker failed`.
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let command = format!("done-then-garbage-when {}", go.display());
    std::thread::scope(|scope| {
        let a = scope.spawn(|| bridge.client().call("faulty", command.as_bytes()));
        bridge.wait_status("A running", |s| s.services[0].workers_busy == 1);
        let b = scope.spawn(|| bridge.client().call("faulty", b"echo b"));
        bridge.wait_status("B waiting", |s| s.services[0].backlog == 1);
        std::fs::write(&go, b"").unwrap();
        assert_eq!(a.join().unwrap().unwrap(), b"answered");
        assert_eq!(b.join().unwrap().expect("B runs elsewhere"), b"b");
    });
    let status = bridge.status();
    assert_eq!(
        status.counters.requests_requeued, 1,
        "{:#?}",
        status.counters
    );
    let service = &status.services[0];
    assert_eq!(
        service.worker_faults.get("bad_frame"),
        Some(&1),
        "{service:#?}"
    );
    assert_eq!(service.spawns, 2, "{service:#?}");
}

#[test]
fn a_fail_with_in_slot_or_timeout_flags_is_a_violation() {
    // Proves §1.4/§9: `Fail` may carry no flag; one with IN_SLOT or TIMEOUT gets its worker
    // killed and its caller `worker failed`, and the pool replaces it.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    for command in ["fail-in-slot", "fail-timeout-flag"] {
        let error = client.call("faulty", command.as_bytes()).unwrap_err();
        assert_eq!(
            error.code(),
            Some(ErrorCode::WorkerFailed),
            "{command}: {error}"
        );
        assert!(
            error.to_string().contains("Fail frame with flags"),
            "{error}"
        );
        assert_eq!(client.call("faulty", b"echo after").unwrap(), b"after");
    }
    let status = bridge.service_status("faulty");
    assert_eq!(status.spawns, 3);
    assert_eq!(
        status.worker_faults.get("forbidden_flags"),
        Some(&2),
        "{status:#?}"
    );
}

#[test]
fn a_hello_with_in_slot_or_timeout_flags_is_a_failed_start() {
    // Proves §6.3: a Hello may carry only QUEUED; with IN_SLOT or TIMEOUT the worker is
    // killed as a failed start, and the log says why.
    for flags in ["1", "2"] {
        let bridge = bridge()
            .service(
                ServiceSpec::faulty()
                    .workers(1, 1)
                    .args(&["--hello-flags", flags]),
            )
            .start();
        bridge.wait_status("a failed start", |s| s.services[0].failed_starts >= 1);
        bridge.wait_log("worker failed to start: sent a Hello frame with flags");
        let faults = bridge.service_status("faulty").worker_faults;
        assert!(faults.get("forbidden_flags") >= Some(&1), "{faults:?}");
    }
}
