//! The pool manager against real worker processes: faults, timeouts, recycling, the
//! crash-loop breaker, deadlines and the status report. Each fault test checks that the
//! affected request gets its documented error, others are unaffected, the pool recovers, and
//! nothing leaks (zombies, descriptors, slots).

use std::time::{Duration, Instant};

use acgi_bridge::proto::{ErrorCode, Kind};

use crate::common::{bridge, fd_count, fd_list, Bridge, ServiceSpec};

fn faulty(extra: &str) -> ServiceSpec {
    let mut spec = ServiceSpec::faulty().workers(1, 2);
    spec.extra = extra.to_string();
    spec
}

/// Wait until the pool is back to `workers` ready workers with nothing else going on, then
/// check that no process, descriptor or slot is left over from what happened before (the
/// callers' connections must be the same as when `fds_before` was taken).
fn assert_settled(bridge: &Bridge, workers: u64, fds_before: usize) {
    let status = bridge.wait_status("the pool to settle", |status| {
        let service = &status.services[0];
        status.worker_processes == workers
            && service.workers_idle as u64 == workers
            && service.workers_stopping == 0
            && service.workers_starting == 0
    });
    assert_eq!(
        status.slots_registered, workers,
        "a slot leaked: {status:#?}"
    );
    bridge.assert_no_zombies();
    // The status connection just used closes right after its answer: allow it that moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fd_count(bridge.pid()) != fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let fds_after = fd_count(bridge.pid());
    assert_eq!(
        fds_after,
        fds_before,
        "descriptors leaked: {:#?}",
        fd_list(bridge.pid())
    );
}

fn fds_when_settled(bridge: &Bridge, workers: u64) -> usize {
    bridge.wait_status("the pool to start", |status| {
        status.worker_processes == workers && status.services[0].workers_idle as u64 == workers
    });
    // Let the status connection close (see assert_settled) before counting.
    let mut count = fd_count(bridge.pid());
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = fd_count(bridge.pid());
        if now == count {
            break;
        }
        count = now;
    }
    count
}

#[test]
pub fn a_worker_crashing_on_its_nth_request_fails_only_that_request() {
    // Proves a crash fails exactly the request in progress, the next ones succeed on a
    // replacement, and nothing leaks.
    let bridge = bridge()
        .service(faulty("").args(&["--crash-on", "3"]).workers(1, 1))
        .start();
    let mut client = bridge.client();
    let fds = fds_when_settled(&bridge, 1);
    assert_eq!(client.call("faulty", b"echo 1").unwrap(), b"1");
    assert_eq!(client.call("faulty", b"echo 2").unwrap(), b"2");
    let error = client.call("faulty", b"echo 3").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::WorkerFailed), "{error}");
    assert_eq!(client.call("faulty", b"echo 4").unwrap(), b"4");
    assert_settled(&bridge, 1, fds);
    assert_eq!(bridge.service_status("faulty").exits_crashed, 1);
}

#[test]
pub fn a_hung_request_times_out_and_its_worker_is_killed_and_replaced() {
    // Proves request_timeout_ms: the caller gets `timed out`, the worker (ignoring SIGTERM)
    // is SIGKILLed after kill_grace_ms and replaced, and other requests are unaffected.
    let spec = faulty("request_timeout_ms = 300\nkill_grace_ms = 200\n")
        .args(&["--ignore-sigterm"])
        .workers(2, 2);
    let bridge = bridge().service(spec).start();
    let mut client = bridge.client();
    let mut bystander = bridge.client();
    let fds = fds_when_settled(&bridge, 2);
    let started = Instant::now();
    let hung = client.send(3, b"hang").unwrap();
    assert_eq!(bystander.call("faulty", b"echo fine").unwrap(), b"fine");
    let answer = client.receive().unwrap();
    assert_eq!(answer.header.request_id, hung);
    assert_eq!(answer.header.error_code(), Some(ErrorCode::TimedOut));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_settled(&bridge, 2, fds);
    let status = bridge.service_status("faulty");
    assert_eq!(status.exits_timed_out, 1, "{status:#?}");
    assert_eq!(status.requests_failed.get("timed out"), Some(&1));
    bridge.wait_log("request timed out");
}

#[test]
fn lying_workers_are_killed_and_only_their_request_fails() {
    // Proves garbage doorbells, a reply length over the slot, a Done for another job and a
    // second Hello each kill the worker with `worker failed` for that request only.
    let bridge = bridge().service(faulty("").workers(2, 2)).start();
    let mut client = bridge.client();
    let fds = fds_when_settled(&bridge, 2);
    for lie in ["garbage-done", "lie-len", "wrong-seq", "extra-hello"] {
        let error = client.call("faulty", lie.as_bytes()).unwrap_err();
        assert_eq!(
            error.code(),
            Some(ErrorCode::WorkerFailed),
            "{lie}: {error}"
        );
        assert_eq!(
            client.call("faulty", b"echo ok").unwrap(),
            b"ok",
            "after {lie}"
        );
    }
    assert_settled(&bridge, 2, fds);
    assert_eq!(bridge.service_status("faulty").exits_killed, 4);
}

#[test]
fn workers_that_never_start_turn_the_service_failing_and_it_fails_fast() {
    // Proves the crash-loop breaker: slow starts past startup_timeout_ms and exits during the
    // handshake count as failed starts; crash_limit of them answer requests at once with
    // `service unavailable` instead of queueing; another service is unaffected.
    for args in [
        &["--slow-start", "5000"][..],
        &["--no-hello"][..],
        &["--garbage"][..],
    ] {
        let spec = faulty("startup_timeout_ms = 300\ncrash_limit = 2\n").args(args);
        let bridge = bridge().service(spec).service(ServiceSpec::echo()).start();
        let mut client = bridge.client();
        let error = client.call("faulty", b"pid").unwrap_err();
        assert_eq!(
            error.code(),
            Some(ErrorCode::ServiceUnavailable),
            "{args:?}: {error}"
        );
        let started = Instant::now();
        let error = client.call("faulty", b"pid").unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::ServiceUnavailable));
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "failing services fail fast"
        );
        assert_eq!(client.call("echo", b"alive").unwrap(), b"alive");
        let status = bridge.service_status("faulty");
        assert_eq!(status.state, "failing", "{status:#?}");
        assert!(status.failed_starts >= 2);
        bridge.assert_no_zombies();
    }
}

#[test]
fn a_failing_service_recovers_by_itself_when_a_worker_starts_cleanly() {
    // Proves recovery: once the cause is gone, a backoff probe starts cleanly and the
    // service serves again without a restart of the bridge.
    let marker = tempfile::NamedTempFile::new().unwrap();
    let path = marker.path().display().to_string();
    let spec = faulty("crash_limit = 2\nrestart_backoff_max_ms = 400\n")
        .args(&["--fail-if-exists", &path])
        .workers(1, 1);
    let bridge = bridge().service(spec).start();
    bridge.wait_status("the service to fail", |s| s.services[0].state == "failing");
    let error = bridge.client().call("faulty", b"pid").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::ServiceUnavailable));
    let path = marker.into_temp_path();
    std::fs::remove_file(&path).unwrap();
    bridge.wait_status("the service to recover", |s| s.services[0].state == "ok");
    assert_eq!(
        bridge.client().call("faulty", b"echo back").unwrap(),
        b"back"
    );
    // A second failure and recovery leaves nothing behind from the dead starts.
    let fds = fds_when_settled(&bridge, 1);
    std::fs::write(&path, b"broken again").unwrap();
    let error = bridge.client().call("faulty", b"sigkill").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::WorkerFailed));
    bridge.wait_status("the service to fail again", |s| {
        s.services[0].state == "failing"
    });
    std::fs::remove_file(&path).unwrap();
    bridge.wait_status("the service to recover again", |s| {
        s.services[0].state == "ok"
    });
    assert_settled(&bridge, 1, fds);
}

#[test]
fn a_worker_over_max_rss_finishes_its_request_then_is_recycled() {
    // Proves max_rss_bytes: the request that grew the worker succeeds, then the worker is
    // replaced.
    let spec = faulty(&format!("max_rss_bytes = {}\n", 64 << 20)).workers(1, 1);
    let bridge = bridge().service(spec).start();
    let mut client = bridge.client();
    let fds = fds_when_settled(&bridge, 1);
    let before = client.call("faulty", b"pid").unwrap();
    assert_eq!(client.call("faulty", b"grow 100").unwrap(), b"grew");
    let after = client.call("faulty", b"pid").unwrap();
    assert_ne!(before, after, "the grown worker was replaced");
    assert_settled(&bridge, 1, fds);
    assert_eq!(bridge.service_status("faulty").exits_recycled, 1);
}

#[test]
pub fn max_requests_recycles_workers() {
    // Proves max_requests: a worker serves exactly that many requests, then is replaced.
    let spec = faulty("max_requests = 3\n").workers(1, 1);
    let bridge = bridge().service(spec).start();
    let mut client = bridge.client();
    let pids: Vec<Vec<u8>> = (0..7)
        .map(|_| client.call("faulty", b"pid").unwrap())
        .collect();
    assert_eq!(pids[0], pids[2]);
    assert_ne!(pids[2], pids[3]);
    assert_eq!(pids[3], pids[5]);
    assert_ne!(pids[5], pids[6]);
    bridge.wait_status("two recycles", |s| s.services[0].exits_recycled == 2);
}

#[test]
fn ondemand_workers_stop_after_idle_timeout() {
    // Proves ondemand mode: workers start on demand and stop after idle_timeout_ms.
    let mut spec = faulty("mode = \"ondemand\"\nidle_timeout_ms = 200\n").workers(0, 2);
    spec.min_workers = 0;
    let bridge = bridge().service(spec).start();
    assert_eq!(
        bridge.status().worker_processes,
        0,
        "ondemand starts nothing"
    );
    assert_eq!(bridge.client().call("faulty", b"echo on").unwrap(), b"on");
    let status = bridge.wait_status("the idle worker to stop", |s| {
        s.worker_processes == 0 && s.services[0].exits_idle == 1
    });
    assert_eq!(status.slots_registered, 0);
    bridge.assert_no_zombies();
}

#[test]
fn static_mode_runs_max_workers() {
    // Proves static mode keeps exactly max_workers running.
    let spec = faulty("mode = \"static\"\n").workers(1, 3);
    let bridge = bridge().service(spec).start();
    bridge.wait_status("3 workers", |s| s.services[0].workers_idle == 3);
}

#[test]
fn backlog_timeout_and_caller_deadlines_answer_queued_requests() {
    // Proves a request waiting too long in the backlog gets `overloaded`, one whose caller
    // deadline passes while queued gets `deadline exceeded` without reaching a worker, and a
    // worker can read the time left.
    let spec = faulty("backlog_timeout_ms = 300\n").workers(1, 1);
    let bridge = bridge().service(spec).start();
    let mut client = bridge.client();
    let remaining: u64 = String::from_utf8(
        client
            .send_with_timeout(3, b"remaining", Duration::from_secs(5))
            .and_then(|_| client.receive().and_then(|a| a.into_result()))
            .unwrap(),
    )
    .unwrap()
    .parse()
    .unwrap();
    assert!(
        remaining > 0 && remaining <= 5000,
        "worker saw {remaining} ms left"
    );
    let busy = client.send(3, b"sleep 800").unwrap();
    let deadline = client
        .send_with_timeout(3, b"echo never", Duration::from_millis(100))
        .unwrap();
    let waited = client.send(3, b"echo late").unwrap();
    let mut answers = std::collections::HashMap::new();
    for _ in 0..3 {
        let answer = client.receive().unwrap();
        answers.insert(answer.header.request_id, answer);
    }
    assert_eq!(
        answers[&deadline].header.error_code(),
        Some(ErrorCode::DeadlineExceeded)
    );
    assert_eq!(
        answers[&waited].header.error_code(),
        Some(ErrorCode::Overloaded)
    );
    assert!(String::from_utf8_lossy(&answers[&waited].payload).contains("waited"));
    assert_eq!(answers[&busy].header.kind, Kind::Reply);
}

#[test]
fn status_answers_while_every_worker_is_busy_and_the_backlog_is_full() {
    // Proves the admin socket is served apart from the pools, and reports what is going on.
    let spec = faulty("").workers(1, 1).backlog(2);
    let bridge = bridge().service(spec).start();
    bridge.wait_status("the worker", |s| s.services[0].workers_idle == 1);
    let mut client = bridge.client();
    for _ in 0..3 {
        client.send(3, b"sleep 2000").unwrap();
    }
    let overloaded = client.send(3, b"echo no room").unwrap();
    let answer = client.receive().unwrap();
    assert_eq!(answer.header.request_id, overloaded);
    let started = Instant::now();
    let status = bridge.service_status("faulty");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "status answered promptly"
    );
    assert_eq!((status.workers_busy, status.backlog), (1, 2), "{status:#?}");
    assert_eq!(status.requests_failed.get("overloaded"), Some(&1));
    let output = std::process::Command::new(crate::common::bridge_exe())
        .args(["status", "--admin"])
        .arg(&bridge.admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("service faulty (id 3): dynamic mode, ok"),
        "{text}"
    );
    assert!(text.contains("1 busy"), "{text}");
    let mode = std::fs::metadata(&bridge.admin).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(
        mode.unwrap(),
        0o600,
        "the admin socket is private by default"
    );
}

#[test]
fn stderr_spam_is_logged_without_disturbing_requests() {
    // Proves a worker flooding stderr does not slow or break other requests.
    let bridge = bridge().service(faulty("").workers(2, 2)).start();
    let mut client = bridge.client();
    let mut spammer = bridge.client();
    let spam = spammer.send(3, b"stderr 20000").unwrap();
    for i in 0..200 {
        let payload = format!("echo {i}");
        assert_eq!(
            client.call("faulty", payload.as_bytes()).unwrap(),
            i.to_string().as_bytes()
        );
    }
    let answer = spammer.receive().unwrap();
    assert_eq!(answer.header.request_id, spam);
    assert_eq!(answer.into_result().unwrap(), b"ok");
}

#[test]
fn stalled_admin_connections_are_closed_and_status_recovers() {
    // Proves a client that opens admin connections and sends nothing cannot lock ops out for
    // good: past the limit new ones are refused, and the stalled ones are closed after their
    // timeout, after which status answers again.
    let bridge = bridge().service(faulty("").workers(1, 1)).start();
    let stalled: Vec<std::os::unix::net::UnixStream> = (0..64)
        .map(|_| std::os::unix::net::UnixStream::connect(&bridge.admin).unwrap())
        .collect();
    // Each accepted stalled connection holds a place: wait until a status query is refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    while acgi_bridge::status::query(&bridge.admin).is_ok() {
        assert!(
            Instant::now() < deadline,
            "64 stalled admin connections never filled the places"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    while acgi_bridge::status::query(&bridge.admin).is_err() {
        assert!(
            Instant::now() < deadline,
            "stalled admin connections were never closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed only after their timeout"
    );
    // The bridge closed them: each reads end-of-file.
    for mut stream in stalled {
        let mut rest = Vec::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        std::io::Read::read_to_end(&mut stream, &mut rest).unwrap();
    }
    assert_eq!(bridge.client().call("faulty", b"echo ok").unwrap(), b"ok");
}

#[test]
fn queued_jobs_pipeline_to_busy_workers_and_every_reply_is_its_own() {
    // Proves worker_queue_depth: with two SDK workers taking up to 8 jobs each, 10 000
    // pipelined requests on each of 4 connections all get their own reply.
    let mut spec = ServiceSpec::echo().workers(2, 2).backlog(100_000);
    spec.extra = "worker_queue_depth = 8\n".into();
    let bridge = bridge().service(spec).start();
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    std::thread::scope(|scope| {
        for connection in 0..4u64 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = bridge.client();
                for round in 0..100u64 {
                    let first = connection * 1_000_000 + round * 100;
                    crate::common::pipeline_tagged(&mut client, first..first + 100, |tag| {
                        40 + (tag % 300) as usize
                    });
                }
            });
        }
    });
    let status = bridge.service_status("echo");
    assert_eq!(status.requests_ok, 40_000);
    assert_eq!(
        status.spawns, 2,
        "queued on the two workers, no growth: {status:#?}"
    );
}

#[test]
fn a_worker_dying_with_queued_jobs_fails_exactly_those_it_held() {
    // Proves a crash fails the running job and the jobs queued on that worker (they may or
    // may not have run), and nothing else: the request still in the backlog succeeds on the
    // replacement.
    // Depth 2: the worker runs one job with one queued behind it; the rest wait in the backlog.
    let spec = faulty("worker_queue_depth = 2\n")
        .args(&["--queue"])
        .workers(1, 1);
    let bridge = bridge().service(spec).start();
    bridge.wait_status("the worker", |s| s.services[0].workers_idle == 1);
    let mut client = bridge.client();
    let commands: [&[u8]; 5] = [b"sleep 100", b"echo a", b"sigkill", b"echo b", b"echo c"];
    let ids: Vec<u64> = commands
        .iter()
        .map(|c| client.send(3, c).unwrap())
        .collect();
    let mut answers = std::collections::HashMap::new();
    for _ in 0..5 {
        let answer = client.receive().unwrap();
        answers.insert(answer.header.request_id, answer);
    }
    let outcome = |i: usize| answers[&ids[i]].header.error_code();
    assert_eq!(answers[&ids[0]].payload, b"slept");
    assert_eq!(answers[&ids[1]].payload, b"a");
    assert_eq!(
        outcome(2),
        Some(ErrorCode::WorkerFailed),
        "the crashing job"
    );
    assert_eq!(
        outcome(3),
        Some(ErrorCode::WorkerFailed),
        "queued behind it on the dead worker"
    );
    assert_eq!(
        answers[&ids[4]].payload, b"c",
        "still in the backlog: served by the replacement"
    );
    bridge.assert_no_zombies();
}

#[test]
fn a_timeout_on_a_worker_with_queued_jobs_answers_them_all_once() {
    // Proves a request timeout on a worker with queued jobs: the running one gets `timed out`,
    // the queued ones `worker failed` (it is being stopped), later requests succeed.
    let spec = faulty("worker_queue_depth = 3\nrequest_timeout_ms = 300\nkill_grace_ms = 100\n")
        .args(&["--queue"])
        .workers(1, 1);
    let bridge = bridge().service(spec).start();
    bridge.wait_status("the worker", |s| s.services[0].workers_idle == 1);
    let mut client = bridge.client();
    let hang = client.send(3, b"hang").unwrap();
    let x = client.send(3, b"echo x").unwrap();
    let y = client.send(3, b"echo y").unwrap();
    let mut answers = std::collections::HashMap::new();
    for _ in 0..3 {
        let answer = client.receive().unwrap();
        answers.insert(answer.header.request_id, answer);
    }
    assert_eq!(
        answers[&hang].header.error_code(),
        Some(ErrorCode::TimedOut)
    );
    assert_eq!(
        answers[&x].header.error_code(),
        Some(ErrorCode::WorkerFailed)
    );
    assert_eq!(
        answers[&y].header.error_code(),
        Some(ErrorCode::WorkerFailed)
    );
    assert_eq!(client.call("faulty", b"echo later").unwrap(), b"later");
}

#[test]
fn a_worker_that_cannot_be_started_is_counted_by_reason_and_others_serve_on() {
    // Proves a spawn failure is typed: a service whose `chdir` does not exist (the config
    // only checks that it is absolute) fails in the child before exec; the bridge logs the
    // step and errno, counts it as `filesystem` in status and in
    // `acgi_bridge_spawn_failures_total`, and another service serves on.
    let spec = faulty("chdir = \"/nonexistent/acgi-spawn-test\"\ncrash_limit = 2\n").workers(1, 1);
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(spec)
        .service(ServiceSpec::echo())
        .start();
    let status = bridge.wait_status("a spawn failure counted", |status| {
        status.services[0].spawn_failures.get("filesystem").copied() >= Some(1)
    });
    let faulty = &status.services[0];
    assert_eq!(faulty.spawn_failures.len(), 1, "{faulty:#?}");
    let log = bridge.wait_log("chdir: No such file or directory");
    assert!(log.contains("reason=\"filesystem\""), "{log}");
    let mut client = bridge.client();
    assert_eq!(client.call("echo", b"alive").unwrap(), b"alive");
    let (code, text) =
        crate::common::http_get(bridge.metrics.as_deref().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(
                "acgi_bridge_spawn_failures_total{service=\"faulty\",reason=\"filesystem\"}",
            )
        })
        .unwrap_or_else(|| panic!("no spawn failure series:\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    assert!(
        text.contains("acgi_bridge_spawn_failures_total{service=\"echo\",reason=\"filesystem\"} 0"),
        "{text}"
    );
    bridge.assert_no_zombies();
}
