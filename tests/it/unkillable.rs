//! Issue 10, first steps: the bridge's log output can neither freeze nor end it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{bridge, wait_until_read, Bridge, ServiceSpec};

/// Call the faulty service with `command` from another thread; its reply and how long it
/// took, or `None` when no answer came within `limit` (a frozen core).
fn call_within(bridge: &Bridge, command: &[u8], limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let mut client = bridge.client();
    let command = command.to_vec();
    let (done, answer) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let reply = client.call("faulty", &command);
        let _ = done.send((reply, started.elapsed()));
    });
    let (reply, took) = answer.recv_timeout(limit).ok()?;
    Some((reply.expect("an answer"), took))
}

#[test]
fn a_stderr_reader_that_never_reads_does_not_delay_callers() {
    // Proves logging never blocks a core: with the bridge's stderr a pipe nobody reads, a
    // worker that prints 3 000 lines (each logged by the bridge, far more than the pipe holds)
    // does not stop the bridge from answering, and the lines it could not write are counted.
    // (No output budget: every line goes to the logger, which must drop, not block.)
    let mut faulty = ServiceSpec::faulty().workers(2, 2);
    faulty.extra = "log_lines_per_second = 0\n".into();
    let bridge = bridge()
        .stderr_pipe()
        .top("cores = 1")
        .service(faulty)
        .start();
    let limit = Duration::from_secs(10);
    for _ in 0..3 {
        let (reply, _) = call_within(&bridge, b"stderr 3000", limit)
            .expect("the bridge answers while its log reader stalls");
        assert_eq!(reply, b"ok");
    }
    for _ in 0..20 {
        let (reply, took) = call_within(&bridge, b"echo still here", limit)
            .expect("the bridge answers while its log reader stalls");
        assert_eq!(reply, b"still here");
        assert!(took < Duration::from_secs(1), "an echo took {took:?}");
    }
    // Status answers too, and counts the lines that could not be written.
    let status = bridge.status();
    assert!(status.counters.requests_ok >= 23);
    assert!(
        status.counters.log_lines_dropped > 0,
        "9 000 worker lines into a 64 KiB pipe nobody reads: {status:#?}"
    );
    assert!(
        bridge.stderr.is_some(),
        "the pipe stays open and unread until the end"
    );
}

#[test]
fn a_stderr_reader_that_goes_away_does_not_end_the_bridge() {
    // Proves EPIPE on stderr is survived: after the log reader closes its end, the bridge
    // logs (a worker's 3 000 lines, connection events), keeps answering, and stops cleanly.
    let mut faulty = ServiceSpec::faulty().workers(1, 1);
    faulty.extra = "log_lines_per_second = 0\n".into();
    let mut bridge = bridge().stderr_pipe().service(faulty).start();
    drop(bridge.stderr.take());
    let limit = Duration::from_secs(10);
    let (reply, _) = call_within(&bridge, b"stderr 3000", limit).expect("answered");
    assert_eq!(reply, b"ok");
    for _ in 0..10 {
        let (reply, _) = call_within(&bridge, b"echo alive", limit).expect("answered");
        assert_eq!(reply, b"alive");
    }
    let status = bridge.stop();
    assert!(status.success(), "exit {status}");
}

#[test]
fn routine_signals_leave_the_bridge_serving_and_requests_in_flight_answered() {
    // Proves HUP, USR1 and PIPE do not take their default action (which ends the process at
    // once): a request running while they arrive is answered, later ones too, each signal is
    // logged, and SIGTERM still stops the bridge cleanly afterwards. (USR2 is the binary
    // upgrade: tests/it/upgrade.rs.)
    let mut bridge = bridge()
        .service(ServiceSpec::faulty().workers(2, 2))
        .start();
    let unix = bridge.unix.clone();
    let running = {
        let mut client = bridge.client();
        std::thread::spawn(move || client.call("faulty", b"sleep 500"))
    };
    // The sleep is running once a worker is busy with it.
    bridge.wait_status("the sleep running", |s| s.services[0].workers_busy == 1);
    for signal in [libc::SIGHUP, libc::SIGUSR1, libc::SIGPIPE] {
        bridge.signal(signal);
    }
    assert_eq!(running.join().unwrap().unwrap(), b"slept");
    let mut client = bridge.client();
    for _ in 0..5 {
        assert_eq!(client.call("faulty", b"echo after").unwrap(), b"after");
    }
    bridge.wait_log("SIGHUP");
    let log = bridge.wait_log("SIGUSR1");
    assert!(log.contains("SIGHUP"), "{log}");
    drop(client);
    let status = bridge.stop();
    assert!(status.success(), "exit {status}");
    assert!(
        !std::path::Path::new(&unix).exists(),
        "the socket file is removed"
    );
}

/// Resident memory of a process, in bytes (`VmRSS` from /proc).
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn headers_claiming_large_payloads_cost_their_bytes_not_their_claims() {
    // Proves a caller's claim never sizes an allocation: 20 connections each send a request
    // header announcing 16 MiB (the default max_payload_bytes) and 100 bytes of it, then wait.
    // Before, each read buffer was resized and zero-filled to 16 MiB at once (+320 MiB RSS);
    // now the bridge holds what arrived (a burst each), and every other caller is served.
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    use acgi_bridge::proto::{Header, Kind};

    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let mut client = bridge.client();
    assert_eq!(client.call("echo", b"warm").unwrap(), b"warm");
    let before = rss_bytes(bridge.pid());
    let claimers: Vec<UnixStream> = (0..20)
        .map(|id| {
            let mut stream = UnixStream::connect(&bridge.unix).unwrap();
            let mut frame = Header::new(Kind::Request, 1, id, 16 << 20)
                .encode()
                .to_vec();
            frame.extend_from_slice(&[b'x'; 100]);
            stream.write_all(&frame).unwrap();
            stream
        })
        .collect();
    for stream in &claimers {
        wait_until_read(stream);
    }
    // A round trip through the same core: every receive it completed before is handled.
    assert_eq!(
        client.call("echo", b"still served").unwrap(),
        b"still served"
    );
    let grown = rss_bytes(bridge.pid()).saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "20 headers claiming 16 MiB each grew the bridge by {} MiB",
        grown >> 20
    );
    drop(claimers);
}

#[test]
fn ping_and_resolve_cannot_amplify_or_buffer_what_a_caller_sends() {
    // Proves the per-kind bounds: an 8 MiB Resolve name of control bytes gets a short fixed
    // error (it used to be echoed escaped: a 40 MiB frame), a Ping over 4 KiB gets error 2
    // instead of a Pong echoing it, neither payload is buffered whole, and the connection
    // goes on answering afterwards.
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    use acgi_bridge::proto::{ErrorCode, Header, Kind};

    use crate::common::read_frame;

    let bridge = bridge().service(ServiceSpec::echo().workers(1, 1)).start();
    let mut raw = UnixStream::connect(&bridge.unix).unwrap();
    let name = vec![0x01u8; 8 << 20];
    let mut frame = Header::new(Kind::Resolve, 0, 1, name.len() as u32)
        .encode()
        .to_vec();
    frame.extend_from_slice(&name);
    let big_ping = vec![b'p'; 8192];
    frame.extend_from_slice(&Header::new(Kind::Ping, 0, 2, big_ping.len() as u32).encode());
    frame.extend_from_slice(&big_ping);
    frame.extend_from_slice(&Header::new(Kind::Ping, 0, 3, 5).encode());
    frame.extend_from_slice(b"hello");
    let writer = {
        let mut raw = raw.try_clone().unwrap();
        std::thread::spawn(move || raw.write_all(&frame).unwrap())
    };
    let (resolved, message) = read_frame(&mut raw);
    assert_eq!((resolved.kind, resolved.request_id), (Kind::Error, 1));
    assert_eq!(resolved.code, ErrorCode::UnknownService as u16);
    assert!(
        message.len() < 128,
        "{} bytes of error message",
        message.len()
    );
    let (pinged, _) = read_frame(&mut raw);
    assert_eq!((pinged.kind, pinged.request_id), (Kind::Error, 2));
    assert_eq!(pinged.code, ErrorCode::PayloadTooLarge as u16);
    let (pong, payload) = read_frame(&mut raw);
    assert_eq!((pong.kind, pong.request_id), (Kind::Pong, 3));
    assert_eq!(payload, b"hello");
    writer.join().unwrap();
}

#[test]
fn a_tcp_port_being_served_cannot_be_shared() {
    // Proves the listening port is the bridge's alone: a process that binds it with
    // SO_REUSEPORT (what any process of the same user could do to the old per-core listeners,
    // taking a share of new callers) gets EADDRINUSE, and a second bridge configured on the
    // same port refuses to start and says why, while the first keeps serving.
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    let first = bridge()
        .top("cores = 2")
        .service(ServiceSpec::echo().workers(1, 2))
        .start();
    let port: std::net::SocketAddr = first.tcp.parse().unwrap();
    let rogue = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::sockopt::set_socket_reuseport(&rogue, true).unwrap();
    rustix::net::sockopt::set_socket_reuseaddr(&rogue, true).unwrap();
    assert_eq!(
        rustix::net::bind(&rogue, &port),
        Err(rustix::io::Errno::ADDRINUSE),
        "another process could join the bridge's port"
    );
    let second = bridge()
        .tcp(&first.tcp)
        .service(ServiceSpec::echo().workers(1, 1))
        .try_start();
    let why = second
        .err()
        .expect("a second bridge on the same port must not start");
    assert!(why.contains("binding TCP"), "{why}");
    let mut client = first.tcp_client();
    assert_eq!(client.call("echo", b"mine").unwrap(), b"mine");
}

#[test]
fn requests_waiting_for_a_caller_that_has_gone_never_run() {
    // Proves abandoned work is dropped: a caller pipelines 20 requests of 256 KiB behind a busy
    // worker, then resets its connection. The 20 leave the backlog (counted as abandoned, their
    // payloads freed) instead of running one by one for nobody; the worker's next job is a
    // live caller's.
    use std::io::Write as _;

    use acgi_bridge::proto::{Header, Kind};

    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .top("cores = 1")
        .start();
    let sleeper = {
        let mut client = bridge.client();
        std::thread::spawn(move || client.call("faulty", b"sleep 1000"))
    };
    bridge.wait_status("the sleep running", |s| s.services[0].workers_busy == 1);
    let mut leaver = std::net::TcpStream::connect(&bridge.tcp).unwrap();
    let mut frames = Vec::new();
    for id in 0..20u64 {
        let mut payload = b"echo ".to_vec();
        payload.resize(256 * 1024, b'x');
        frames.extend_from_slice(&Header::new(Kind::Request, 3, id, payload.len() as u32).encode());
        frames.extend_from_slice(&payload);
    }
    leaver.write_all(&frames).unwrap();
    bridge.wait_status("20 requests waiting", |s| s.services[0].backlog == 20);
    // Close with a reset (linger 0): the bridge's next receive fails and it closes its end.
    rustix::net::sockopt::set_socket_linger(&leaver, Some(Duration::ZERO)).unwrap();
    drop(leaver);
    let status = bridge.wait_status("the 20 abandoned", |s| s.counters.requests_abandoned == 20);
    assert_eq!(status.services[0].backlog, 0);
    assert_eq!(sleeper.join().unwrap().unwrap(), b"slept");
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"echo next").unwrap(), b"next");
    let status = bridge.service_status("faulty");
    assert_eq!(
        status.requests_ok, 2,
        "only the sleep and the live echo ran: {status:#?}"
    );
}

#[test]
fn callers_that_stall_mid_frame_or_idle_are_disconnected_and_busy_ones_are_not() {
    // Proves the caller timeouts: a connection that sends part of a header and stops is closed
    // after caller_frame_timeout_ms, one that sends nothing after caller_idle_timeout_ms, and
    // one whose request runs longer than both keeps its connection and gets its answer.
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixStream;

    let bridge = bridge()
        .top("caller_frame_timeout_ms = 300")
        .top("caller_idle_timeout_ms = 600")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    // Measured from before each connection is made, so that a test thread descheduled on a
    // loaded machine cannot make the bridge look early.
    let closed_after = |stream: &mut UnixStream, since: Instant| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).expect("EOF, not a timeout");
        assert_eq!(n, 0, "the bridge closes the connection");
        since.elapsed()
    };
    let busy = {
        let mut client = bridge.client();
        std::thread::spawn(move || client.call("faulty", b"sleep 1500"))
    };
    let stalled_since = Instant::now();
    let mut stalled = UnixStream::connect(&bridge.unix).unwrap();
    stalled.write_all(&[0x6B, 0xAC, 0x01, 0x01, 0, 0]).unwrap();
    let idle_since = Instant::now();
    let mut idle = UnixStream::connect(&bridge.unix).unwrap();
    let stalled_for = closed_after(&mut stalled, stalled_since);
    assert!(stalled_for >= Duration::from_millis(200), "{stalled_for:?}");
    let idle_for = closed_after(&mut idle, idle_since);
    assert!(idle_for >= Duration::from_millis(200), "{idle_for:?}");
    assert_eq!(
        busy.join().unwrap().unwrap(),
        b"slept",
        "a request in flight is not idle"
    );
    let status = bridge.status();
    assert!(status.counters.callers_timed_out >= 1, "{status:#?}");
    assert!(status.counters.callers_idle_closed >= 1, "{status:#?}");
}

/// The soft and hard "Max open files" of a process, from /proc/PID/limits.
fn nofile_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line.split_whitespace().skip(3);
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

#[test]
fn the_descriptor_limit_is_raised_for_the_bridge_not_its_workers_and_a_short_one_is_named() {
    // Proves RLIMIT_NOFILE handling: started with a soft limit of 256 under a hard 8192, the
    // bridge raises its own to 8192 (connections_max needs it) while its workers start with
    // the 256 it was given; with a hard limit too small for connections_max plus the workers,
    // the startup log says so and names the fix.
    let raised = bridge()
        .wrapper(&["prlimit", "--nofile=256:8192"])
        .top("connections_max = 4000")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    assert_eq!(
        nofile_limits(raised.pid()),
        ("8192".to_string(), "8192".to_string())
    );
    let status = raised.wait_status("a worker", |s| s.services[0].workers_idle == 1);
    let worker = status.services[0].pids[0];
    assert_eq!(
        nofile_limits(worker).0,
        "256",
        "the worker keeps the original soft limit"
    );
    assert!(
        !raised.log().contains("RLIMIT_NOFILE is"),
        "{}",
        raised.log()
    );
    drop(raised);

    let short = bridge()
        .wrapper(&["prlimit", "--nofile=256:512"])
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let log = short.log();
    assert!(
        log.contains("RLIMIT_NOFILE is 512") && log.contains("LimitNOFILE"),
        "{log}"
    );
    let mut client = short.client();
    assert_eq!(
        client.call("echo", b"still serving").unwrap(),
        b"still serving"
    );
}

#[test]
fn a_frame_cut_short_by_the_callers_eof_gets_error_7_after_every_other_answer() {
    // Proves the protocol's EOF rule: a caller that shuts its side in the middle of a frame
    // gets its earlier request's answer first, then Error 7 (with the cut frame's request id
    // when its header was whole, else 0), then the end of the stream.
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixStream;

    use acgi_bridge::proto::{ErrorCode, Header, Kind};

    use crate::common::read_frame;

    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    for (cut, expected_id) in [(10usize, 0u64), (24 + 3, 9)] {
        let mut raw = UnixStream::connect(&bridge.unix).unwrap();
        let mut bytes = Header::new(Kind::Request, 3, 5, 9).encode().to_vec();
        bytes.extend_from_slice(b"sleep 300");
        let mut cut_frame = Header::new(Kind::Request, 3, 9, 100).encode().to_vec();
        cut_frame.extend_from_slice(&[b'x'; 100]);
        bytes.extend_from_slice(&cut_frame[..cut]);
        raw.write_all(&bytes).unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let (reply, payload) = read_frame(&mut raw);
        assert_eq!((reply.kind, reply.request_id), (Kind::Reply, 5));
        assert_eq!(payload, b"slept");
        let (error, _) = read_frame(&mut raw);
        assert_eq!(
            (error.kind, error.code, error.request_id),
            (Kind::Error, ErrorCode::MalformedFrame as u16, expected_id),
            "cut after {cut} bytes"
        );
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the error");
    }
    assert!(bridge.status().counters.malformed_frames >= 2);
}

#[test]
fn idle_metrics_connections_cannot_lock_the_operator_out_of_status() {
    // Proves admin and metrics have separate budgets: 64 idle /metrics connections (what used
    // to fill the one shared budget of 64) leave status answering; the metrics connections
    // over their own budget are refused and counted.
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let metrics = bridge.metrics.clone().expect("a metrics endpoint");
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&metrics).unwrap())
        .collect();
    let status = bridge.wait_status("the idle scrapers over budget refused", |s| {
        s.counters.connections_refused >= 16
    });
    assert_eq!(status.counters.connections_refused, 16, "{status:#?}");
    for _ in 0..5 {
        assert_eq!(bridge.status().services.len(), 1);
    }
    drop(idle);
}

/// Start the bridge on `builder`'s config in `dir` and expect it to refuse: its stderr.
pub(crate) fn refused_start(
    dir: &std::path::Path,
    builder: crate::common::BridgeBuilder,
) -> String {
    let config = dir.join("bridge.toml");
    std::fs::write(&config, builder.config_text(dir)).unwrap();
    let output = std::process::Command::new(crate::common::bridge_exe())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "the bridge started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn only_a_stale_socket_of_ours_is_ever_replaced() {
    // Proves the socket path's safety: a regular file where the socket goes is left alone
    // (before, any file there was unlinked), and a directory that every user may write
    // without the sticky bit (anyone could swap the socket) is refused; the bridge says why.
    // (A sticky one like /tmp is allowed for a socket a config names there; the bundled config
    // uses the runtime directory, tests/it/paths.rs.)
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bridge.sock"), b"precious").unwrap();
    let stderr = refused_start(dir.path(), bridge().service(ServiceSpec::echo()));
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(
        std::fs::read(dir.path().join("bridge.sock")).unwrap(),
        b"precious"
    );

    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = refused_start(open.path(), bridge().service(ServiceSpec::echo()));
    assert!(
        stderr.contains("writable by every user and not sticky"),
        "{stderr}"
    );
}

#[test]
fn a_state_dir_others_may_write_is_refused() {
    // Proves the state_dir check: group- or world-writable, the bridge refuses to start
    // (another user could plant what the services read there).
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("shared-state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).unwrap();
    let stderr = refused_start(
        dir.path(),
        bridge().state_dir(&state).service(ServiceSpec::echo()),
    );
    assert!(
        stderr.contains("writable by its group or others"),
        "{stderr}"
    );
}

#[test]
fn a_worker_that_floods_its_output_is_rate_limited_and_the_rest_counted() {
    // Proves log_lines_per_second: a worker printing 1 000 lines with a budget of 10 a second
    // (bursts of 20) gets about 20 into the log; the rest are counted, and summed up in one
    // "suppressed" line once the budget has room again.
    let mut faulty = ServiceSpec::faulty().workers(1, 1);
    faulty.extra = "log_lines_per_second = 10\n".into();
    let bridge = bridge().top("cores = 1").service(faulty).start();
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"stderr 1000").unwrap(), b"ok");
    let status = bridge.wait_status("lines suppressed", |s| {
        s.counters.worker_lines_suppressed >= 900
    });
    assert!(status.counters.worker_lines_suppressed <= 1000);
    // One more line once a token is back brings the summary (poll: each call is one line).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bridge.log().contains("lines of worker output") {
        assert!(
            Instant::now() < deadline,
            "no summary line:\n{}",
            bridge.log()
        );
        assert_eq!(client.call("faulty", b"stderr 1").unwrap(), b"ok");
    }
    let logged = bridge
        .log()
        .lines()
        .filter(|l| l.contains("faulty worker stderr line"))
        .count();
    assert!(logged < 100, "{logged} worker lines reached the log");
}

#[test]
fn answers_nobody_reads_are_bounded_over_all_callers_not_per_caller() {
    // Proves answer_bytes_buffered_max: callers that ask for large answers and never read them
    // cannot make the bridge hold more than the budget over all of them (each stays under its
    // own write_queue_max_bytes, so only the global bound can stop them); the callers holding
    // the most are disconnected and counted, a bystander is served throughout, and the bridge's
    // memory grows by about the budget, not by what the callers asked for (57 MB here).
    let bridge = bridge()
        .top("max_payload_bytes = 1048576")
        .top("answer_bytes_buffered_max = 8388608")
        .service(ServiceSpec::faulty().workers(2, 2))
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let before = rss_bytes(bridge.pid());
    let mut greedy = Vec::new();
    for _ in 0..8 {
        let mut client = bridge.client();
        for _ in 0..8 {
            client.send(3, b"big 900000").unwrap();
        }
        greedy.push(client);
    }
    let status = bridge.wait_status("a caller disconnected for the answer budget", |s| {
        s.counters.answer_budget_disconnects >= 1
    });
    assert!(status.counters.slow_callers_disconnected >= status.counters.answer_budget_disconnects);
    assert_eq!(
        bridge.client().call("echo", b"bystander").unwrap(),
        b"bystander",
        "another caller is served"
    );
    // Every greedy request has been answered or its caller dropped by now: the bridge holds at
    // most the budget of unread answers (plus what sits in the callers' socket buffers).
    bridge.wait_status("every greedy request answered", |s| {
        s.services
            .iter()
            .all(|svc| svc.workers_busy == 0 && svc.backlog == 0)
    });
    let grown = rss_bytes(bridge.pid()).saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "the bridge grew by {} MiB holding unread answers",
        grown >> 20
    );
    drop(greedy);
}
