//! Startup and graceful stop of the whole bridge.

use std::collections::HashSet;

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::Kind;

use crate::common::{bridge, children_of, Bridge, ServiceSpec};

#[test]
pub fn sigterm_answers_requests_in_flight_then_exits_zero() {
    // Proves a graceful stop: requests accepted before SIGTERM are answered, then exit 0 with
    // every worker gone and the socket file removed.
    let mut bridge = bridge()
        .service(ServiceSpec::faulty().workers(2, 4))
        .start();
    let mut client = bridge.client();
    let mut ids = HashSet::new();
    for _ in 0..8 {
        ids.insert(client.send(3, b"sleep 300").unwrap());
    }
    // A ping is answered only after every frame before it was taken in: a barrier, not a sleep.
    let ping = client.send_frame(Kind::Ping, 0, b"barrier").unwrap();
    let mut answers = Vec::new();
    loop {
        let answer = client.receive().unwrap();
        if answer.header.request_id == ping {
            break;
        }
        answers.push(answer);
    }
    let workers: Vec<i32> = bridge.children().into_iter().map(|(pid, _)| pid).collect();
    assert!(!workers.is_empty());
    bridge.signal(libc::SIGTERM);
    while answers.len() < 8 {
        answers.push(client.receive().unwrap());
    }
    for answer in answers {
        assert!(ids.remove(&answer.header.request_id));
        assert_eq!(answer.into_result().unwrap(), b"slept");
    }
    let status = bridge
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("exits");
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&bridge.unix).exists(),
        "socket file removed"
    );
    for pid in workers {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} outlived the bridge"
        );
    }
}

#[test]
fn the_bridge_keeps_min_workers_running_and_spawns_up_to_max() {
    // Proves the pool starts min_workers, grows under concurrent load, and never exceeds max.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(2, 5))
        .start();
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"echo x").unwrap(), b"x");
    let pids = |bridge: &crate::common::Bridge| children_of(bridge.pid()).len();
    assert!(pids(&bridge) >= 2);
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(client.send(3, b"sleep 100").unwrap());
    }
    let mut max_seen = 0;
    for _ in 0..12 {
        max_seen = max_seen.max(pids(&bridge));
        assert_eq!(client.receive().unwrap().into_result().unwrap(), b"slept");
    }
    assert!(max_seen <= 5, "pool exceeded max_workers: {max_seen}");
    assert!(max_seen > 2, "pool did not grow under load");
}

#[test]
fn overload_beyond_the_backlog_is_answered_at_once() {
    // Proves that with every worker busy and the backlog full, a request gets `overloaded`
    // immediately instead of waiting.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1).backlog(2))
        .start();
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"echo warm").unwrap(), b"warm");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(client.send(3, b"sleep 300").unwrap());
    }
    let extra = client.send(3, b"echo too many").unwrap();
    let first = client.receive().unwrap();
    assert_eq!(
        first.header.request_id, extra,
        "the overloaded answer comes first"
    );
    assert_eq!(
        first.header.error_code(),
        Some(acgi_bridge::proto::ErrorCode::Overloaded)
    );
    for _ in 0..3 {
        assert_eq!(client.receive().unwrap().into_result().unwrap(), b"slept");
    }
}

#[test]
pub fn sdk_workers_exit_cleanly_when_the_bridge_stops() {
    // Proves the graceful stop of SDK workers: closing the control socket plus SIGTERM makes
    // them exit with status 0 (not die by the signal).
    let mut bridge = bridge().service(ServiceSpec::echo().workers(2, 2)).start();
    // Both ready (a worker stopped before its handshake may die by the signal: that is fine).
    bridge.wait_status("2 ready workers", |s| s.services[0].workers_idle == 2);
    assert_eq!(bridge.client().call("echo", b"x").unwrap(), b"x");
    assert!(bridge.stop().success());
    let log = bridge.log();
    let exits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("worker exited"))
        .collect();
    assert_eq!(exits.len(), 2, "{log}");
    for line in exits {
        assert!(line.contains("exit status 0"), "{line}");
        assert!(line.contains("stopped: shutdown"), "{line}");
    }
}

#[test]
fn workers_never_outlive_a_killed_bridge() {
    // Proves the parent-death signal: SIGKILL to the bridge takes its workers with it.
    let mut bridge = bridge()
        .service(ServiceSpec::faulty().workers(3, 3))
        .start();
    let status = bridge.wait_status("3 workers", |s| s.services[0].workers_idle == 3);
    let pids = status.services[0].pids.clone();
    assert_eq!(pids.len(), 3);
    bridge.signal(libc::SIGKILL);
    bridge
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("the bridge died");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for pid in pids {
        // Gone, or a zombie waiting for init to reap it: either way no longer running.
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if state.is_none() || state == Some('Z') || state == Some('X') {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker {pid} outlived the bridge"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// A bridge with `shutdown_timeout_ms` whose one worker holds a request that never finishes
/// (and is not timed out): the bridge, the caller, the hung request's id. A Ping answered
/// after it shows the request was taken.
fn with_a_hung_request(shutdown_timeout_ms: u64) -> (Bridge, BlockingClient, u64) {
    let mut spec = ServiceSpec::faulty().workers(1, 1);
    spec.extra = "request_timeout_ms = 0\nkill_grace_ms = 100\n".into();
    let bridge = bridge()
        .top(&format!("shutdown_timeout_ms = {shutdown_timeout_ms}"))
        .service(spec)
        .start();
    let mut client = bridge.client();
    let hung = client.send(3, b"hang").unwrap();
    let ping = client.send_frame(Kind::Ping, 0, b"").unwrap();
    assert_eq!(client.receive().unwrap().header.request_id, ping);
    (bridge, client, hung)
}

/// The next answer is the hung request's, failed with `shutting down`.
fn assert_shutting_down(client: &mut BlockingClient, hung: u64) {
    let answer = client.receive().unwrap();
    assert_eq!(answer.header.request_id, hung);
    assert_eq!(
        answer.header.error_code(),
        Some(acgi_bridge::proto::ErrorCode::ShuttingDown)
    );
}

#[test]
pub fn sigint_after_the_shutdown_timeout_answers_hung_requests_then_exits_zero() {
    // Proves the shutdown timeout: a request that will never finish is answered `shutting
    // down` when shutdown_timeout_ms passes, its worker is killed, and the bridge exits 0
    // (SIGINT behaves as SIGTERM).
    let (mut bridge, mut client, hung) = with_a_hung_request(300);
    let started = std::time::Instant::now();
    bridge.signal(libc::SIGINT);
    assert_shutting_down(&mut client, hung);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let status = bridge
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("exits");
    assert!(status.success(), "{status}");
    bridge.wait_log("shutdown timeout passed");
}

#[test]
pub fn a_second_signal_answers_hung_requests_at_once_then_exits_zero() {
    // Proves the second signal: with a shutdown timeout far away, a request that will never
    // finish is answered `shutting down` as soon as a second SIGTERM comes, its worker is
    // killed, and the bridge exits 0 without waiting for the timeout.
    let (mut bridge, mut client, hung) = with_a_hung_request(60_000);
    let started = std::time::Instant::now();
    bridge.signal(libc::SIGTERM);
    // Two signals sent at once may merge into one: the second goes once the first is seen.
    bridge.wait_log("stopping: finishing requests in flight");
    bridge.signal(libc::SIGTERM);
    assert_shutting_down(&mut client, hung);
    let status = bridge
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("exits long before its 60 s shutdown timeout");
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
