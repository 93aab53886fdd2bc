//! Logs for operators: JSON lines, journald priorities, the access log (its fields, its
//! reopening on SIGUSR1, its bound), the slow log, the timed-out request's line, and the lines
//! when a service turns failing and recovers.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use acgi_bridge::proto::ErrorCode;

use crate::common::{bridge, Bridge, BridgeBuilder, ServiceSpec};

/// Start the bridge with these extra `serve` arguments (the harness passes `--config` and
/// `--log`; a shell appends the rest).
fn with_serve_args(builder: BridgeBuilder, args: &str) -> BridgeBuilder {
    let script = format!("exec \"$@\" {args}");
    builder.wrapper(&["sh", "-c", &script, "sh"])
}

/// The faulty service (id 3), one worker, with extra keys.
fn faulty(extra: &str) -> ServiceSpec {
    let mut spec = ServiceSpec::faulty().workers(1, 1);
    spec.extra = extra.to_string();
    spec
}

/// The log's lines once `done` holds for them (bounded), for lines written a moment after the
/// event they tell of.
fn wait_lines(what: &str, read: impl Fn() -> String, done: impl Fn(&[&str]) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = read();
        if done(&text.lines().collect::<Vec<_>>()) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn access_log(bridge: &Bridge) -> String {
    std::fs::read_to_string(bridge.dir.join("access.log")).unwrap_or_default()
}

/// The value of `key=` in a text line (values have no spaces).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The one line of `text` containing `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line with {needle:?}:\n{text}");
    lines[0]
}

#[test]
fn json_log_lines_parse_and_carry_time_level_target_message_and_fields() {
    // Proves --log-format json: every line of the bridge's log is one JSON object with an
    // RFC 3339 UTC time, the level, the target, the message and each field by name.
    let bridge = with_serve_args(bridge(), "--log-format json")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    assert_eq!(bridge.client().call(1u32, b"hi").unwrap(), b"hi");
    let log = bridge.wait_log("worker spawned");
    let mut spawned = 0;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let time = value["time"].as_str().expect("time");
        assert!(
            time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "RFC 3339 UTC: {time}"
        );
        assert!(["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
            .contains(&value["level"].as_str().expect("level")));
        assert!(value["target"]
            .as_str()
            .expect("target")
            .starts_with("acgi_bridge"));
        assert!(value["message"].is_string(), "{line}");
        if value["message"] == "worker spawned" {
            spawned += 1;
            assert_eq!(value["level"], "INFO");
            assert_eq!(value["service"], "echo");
            assert!(value["pid"].as_u64().is_some_and(|pid| pid > 1), "{line}");
        }
    }
    assert_eq!(spawned, 1, "{log}");
}

/// Lines of a bridge started with `JOURNAL_STREAM` set to `value` (a shell expression), after a
/// worker crashed (WARN) and was replaced (INFO).
fn log_under_journal_stream(value: &str) -> String {
    let script = format!("JOURNAL_STREAM={value}; export JOURNAL_STREAM; exec \"$@\"");
    let bridge = bridge()
        .wrapper(&["sh", "-c", &script, "sh"])
        .service(faulty(""))
        .start();
    let error = bridge.client().call(3u32, b"sigkill").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::WorkerFailed));
    wait_lines(
        "the replacement worker",
        || bridge.log(),
        |lines| {
            lines
                .iter()
                .filter(|l| l.contains("worker spawned"))
                .count()
                == 2
        },
    )
}

#[test]
fn journald_gets_syslog_priorities_only_when_journal_stream_names_stderr() {
    // Proves the journald prefixes: with JOURNAL_STREAM naming stderr's device and inode,
    // every line starts with <N> (INFO <6>, WARN <4>); naming another file, none does.
    let log = log_under_journal_stream("$(stat -L -c %d:%i /proc/self/fd/2)");
    for line in log.lines() {
        let priority = line.get(..3).unwrap_or_default();
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&priority),
            "no priority: {line:?}"
        );
    }
    assert!(line_with(&log, "worker failed").starts_with("<4>"), "{log}");
    assert!(log
        .lines()
        .filter(|l| l.contains("worker spawned"))
        .all(|l| l.starts_with("<6>")));

    let log = log_under_journal_stream("1:1");
    assert!(
        log.lines()
            .all(|l| l.starts_with(|c: char| c.is_ascii_digit())),
        "a JOURNAL_STREAM naming another file gives no prefix:\n{log}"
    );
}

#[test]
fn the_access_log_has_a_line_for_an_ok_an_error_and_a_timed_out_request() {
    // Proves the access log's fields for each outcome (ok, a service error, a timeout), the
    // caller as uid (Unix) and ip:port (TCP), and the timed-out request's line in the
    // bridge's log with its request id, service, worker pid and caller.
    let bridge = bridge()
        .top("access_log = \"access.log\"")
        .service(faulty("request_timeout_ms = 300\n"))
        .start();
    let mut client = bridge.client();
    let pid = String::from_utf8(client.call(3u32, b"pid").unwrap()).unwrap();
    assert_eq!(client.call(3u32, b"echo hello").unwrap(), b"hello");
    let error = client.call(3u32, b"fail oops").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::ServiceError));
    let error = client.call(3u32, b"hang").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TimedOut));
    let mut tcp = bridge.tcp_client();
    assert_eq!(tcp.call(3u32, b"echo tcp").unwrap(), b"tcp");

    let log = wait_lines(
        "five access lines",
        || access_log(&bridge),
        |l| l.len() == 5,
    );
    let uid = format!("uid:{}", unsafe { libc::getuid() });
    let lines: Vec<&str> = log.lines().collect();
    for line in &lines {
        assert_eq!(field(line, "service"), Some("faulty"), "{line}");
        assert_eq!(field(line, "service_id"), Some("3"));
        let time = field(line, "time").unwrap();
        assert!(time.ends_with('Z') && time.len() == 27, "{line}");
        assert!(field(line, "queue_wait_us").unwrap().parse::<u64>().is_ok());
        assert!(field(line, "service_time_us")
            .unwrap()
            .parse::<u64>()
            .is_ok());
    }
    // Requests 1 (pid) and 2 (echo hello): ok, with their sizes.
    let ok = lines[1];
    assert_eq!(field(ok, "caller"), Some(uid.as_str()), "{ok}");
    assert_eq!(field(ok, "request_id"), Some("2"));
    assert_eq!(field(ok, "request_bytes"), Some("10"));
    assert_eq!(field(ok, "reply_bytes"), Some("5"));
    assert_eq!(field(ok, "outcome"), Some("ok"));
    let failed = lines[2];
    assert_eq!(field(failed, "request_id"), Some("3"));
    assert_eq!(field(failed, "outcome"), Some("error"), "{failed}");
    assert_eq!(field(failed, "error_code"), Some("8"));
    assert_eq!(field(failed, "error"), Some("service_error"));
    assert_eq!(field(failed, "reply_bytes"), Some("4"));
    let timed_out = lines[3];
    assert_eq!(field(timed_out, "request_id"), Some("4"));
    assert_eq!(field(timed_out, "error_code"), Some("5"), "{timed_out}");
    assert_eq!(field(timed_out, "error"), Some("timed_out"));
    let ran_us: u64 = field(timed_out, "service_time_us")
        .unwrap()
        .parse()
        .unwrap();
    assert!(ran_us >= 300_000, "{timed_out}");
    let over_tcp = lines[4];
    let caller = field(over_tcp, "caller").unwrap();
    let addr: std::net::SocketAddr = caller.parse().expect("ip:port");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{over_tcp}");

    let log = bridge.wait_log("request timed out after");
    let line = line_with(&log, "request timed out after");
    assert!(line.contains(" WARN "), "{line}");
    for part in [
        "service=faulty",
        "request_id=4",
        &format!("pid={pid}"),
        &format!("caller={uid}"),
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert_eq!(bridge.status().counters.access_log_lines_dropped, 0);
}

#[test]
fn access_log_lines_are_json_objects_with_json_log_format() {
    // Proves the access log follows --log-format: one parseable object per request, with
    // typed fields, for an ok request and for one refused before it ran (unknown service).
    let bridge = with_serve_args(bridge(), "--log-format json")
        .top("access_log = \"access.log\"")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let mut client = bridge.client();
    assert_eq!(client.call(1u32, b"1234").unwrap(), b"1234");
    let error = client.call(99u32, b"x").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownService));
    let log = wait_lines("two access lines", || access_log(&bridge), |l| l.len() == 2);
    let values: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let ok = &values[0];
    assert_eq!(ok["service"], "echo");
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["request_id"], 1);
    assert_eq!(ok["request_bytes"], 4);
    assert_eq!(ok["reply_bytes"], 4);
    assert!(ok["service_time_us"].is_u64() && ok["queue_wait_us"].is_u64());
    assert!(ok["caller"].as_str().unwrap().starts_with("uid:"));
    let unknown = &values[1];
    assert_eq!(unknown["service_id"], 99);
    assert_eq!(unknown["outcome"], "error");
    assert_eq!(unknown["error_code"], 1);
    assert_eq!(unknown["error"], "unknown_service");
    assert!(unknown.get("service_time_us").is_none(), "{unknown}");
}

#[test]
fn sigusr1_reopens_the_access_log_for_logrotate() {
    // Proves the reopen: after the file is renamed, lines go on into the renamed file (the
    // descriptor is the same) until SIGUSR1; from then on they go to a new file at the path.
    let bridge = bridge()
        .top("access_log = \"access.log\"")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let path = bridge.dir.join("access.log");
    let rotated = bridge.dir.join("access.log.1");
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    client.call(1u32, b"before").unwrap();
    wait_lines("the first line", || read(&path), |l| l.len() == 1);
    std::fs::rename(&path, &rotated).unwrap();
    client.call(1u32, b"rotated").unwrap();
    wait_lines(
        "the second line, renamed",
        || read(&rotated),
        |l| l.len() == 2,
    );
    assert!(!path.exists(), "nothing reopened before the signal");
    bridge.signal(libc::SIGUSR1);
    bridge.wait_log("access log reopened");
    client.call(1u32, b"after").unwrap();
    let new = wait_lines("a line in the new file", || read(&path), |l| l.len() == 1);
    assert_eq!(field(new.trim_end(), "request_id"), Some("3"), "{new}");
    assert_eq!(read(&rotated).lines().count(), 2);
}

#[test]
fn a_stalled_access_log_drops_and_counts_lines_and_never_stalls_requests() {
    // Proves the bound: with the access log a FIFO nobody reads, its writer blocks, the queue
    // fills, further lines are dropped and counted (status), and requests are still answered.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Held open for reading (never read) so that the bridge's open for writing succeeds.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let bridge = bridge()
        .top(&format!("access_log = {:?}", fifo.display().to_string()))
        .service(ServiceSpec::echo().workers(1, 2))
        .start();
    let mut client = bridge.client();
    let limit = acgi_bridge::access_log::ACCESS_LOG_LINES_BUFFERED_MAX;
    // A pipe holds 64 KiB (a few hundred lines) and the writer 8 KiB more: past the queue's
    // bound some lines must be dropped.
    let requests = limit + 2000;
    for _ in 0..requests {
        assert_eq!(client.call(1u32, b"x").unwrap(), b"x");
    }
    let status = bridge.status();
    let dropped = status.counters.access_log_lines_dropped;
    assert!(
        dropped > 0 && dropped < requests as u64,
        "dropped {dropped} of {requests}"
    );
    assert_eq!(status.counters.requests_ok, requests as u64);
}

#[test]
fn the_slow_log_names_a_slow_request_once_and_not_a_fast_one() {
    // Proves request_slowlog_timeout_ms: a request running past it is logged once at WARN with
    // its request id, service, worker pid, elapsed time and caller; a fast one is not.
    let bridge = bridge()
        .service(faulty("request_slowlog_timeout_ms = 200\n"))
        .start();
    let mut client = bridge.client();
    let pid = String::from_utf8(client.call(3u32, b"pid").unwrap()).unwrap();
    assert_eq!(client.call(3u32, b"echo fast").unwrap(), b"fast");
    assert_eq!(client.call(3u32, b"sleep 700").unwrap(), b"slept");
    assert_eq!(
        client.call(3u32, b"echo fast again").unwrap(),
        b"fast again"
    );
    let log = bridge.wait_log("slow request");
    let line = line_with(&log, "slow request");
    assert!(line.contains(" WARN "), "{line}");
    let uid = unsafe { libc::getuid() };
    for part in [
        "service=faulty",
        "request_id=3",
        &format!("pid={pid}"),
        &format!("caller=uid:{uid}"),
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    let elapsed: u64 = field(line, "elapsed_ms").unwrap().parse().unwrap();
    assert!((200..700).contains(&elapsed), "{line}");
}

#[test]
fn a_service_turning_failing_and_recovering_is_logged_with_the_reason() {
    // Proves the breaker's lines: WARN when crash_limit failed starts turn the service
    // failing (with the last failure's reason), INFO when a worker starts cleanly again.
    let marker = tempfile::NamedTempFile::new().unwrap();
    let path = marker.path().display().to_string();
    let spec = faulty("crash_limit = 2\nrestart_backoff_max_ms = 400\n")
        .args(&["--fail-if-exists", &path]);
    let bridge = bridge().service(spec).start();
    let log = bridge.wait_log("service is failing");
    let failing = line_with(&log, "service is failing");
    assert!(failing.contains(" WARN "), "{failing}");
    assert!(failing.contains("service=faulty"), "{failing}");
    assert!(failing.contains("failed to start") || failing.contains("exit status"));
    assert!(!log.contains("service recovered"));
    std::fs::remove_file(marker.into_temp_path()).unwrap();
    let log = bridge.wait_log("service recovered");
    let recovered = line_with(&log, "service recovered");
    assert!(recovered.contains(" INFO "), "{recovered}");
    assert!(recovered.contains("finished its handshake"), "{recovered}");
    assert_eq!(bridge.client().call(3u32, b"echo back").unwrap(), b"back");
}
