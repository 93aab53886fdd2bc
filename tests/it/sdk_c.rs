//! The C SDK (`sdk/c`) against the real bridge: its zlib worker, its test worker through both
//! worker APIs (`acgi_worker_serve` and the lower-level loop), and its C client, all built
//! with ASan and UBSan, whose reports fail the tests.
//!
//! The SDK is built once per test run with `make` into `target/<profile>/sdk-c`; a machine
//! without make, a C compiler or zlib's headers fails every test here with the reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use acgi_bridge::client::{BlockingClient, CallError};
use acgi_bridge::proto::{ErrorCode, Kind};

use crate::common::{bridge, tagged_payload, Bridge, BridgeBuilder, ServiceSpec};

/// Slot of the C services in these tests: small, so that modest payloads take the copy path.
const SLOT_BYTES: usize = 4096;
/// The bridge's max_payload_bytes in these tests.
const PAYLOAD_MAX: usize = 1 << 20;

/// The directory the SDK was built into (ASan+UBSan build), building it on first use.
pub(crate) fn c_build() -> &'static Path {
    static BUILD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILD.get_or_init(build_sdk) {
        Ok(dir) => dir,
        Err(why) => panic!("{why}"),
    }
}

fn build_sdk() -> Result<PathBuf, String> {
    let hint = "the C SDK tests need make, a C compiler (cc) and zlib's headers: \
                apt-get install make gcc zlib1g-dev";
    for tool in ["make", "cc"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("`{tool}` is not available; {hint}"));
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target/<profile> directory")?;
    let out = profile_dir.join("sdk-c");
    // `make test` builds everything and runs the SDK's own checks (frame vectors, start-up).
    let output = Command::new("make")
        .arg("-C")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/c"))
        .arg(format!("O={}", out.display()))
        .arg("SAN=1")
        .arg("test")
        .output()
        .map_err(|e| format!("running make: {e}; {hint}"))?;
    if !output.status.success() {
        return Err(format!(
            "building sdk/c failed ({}); {hint}\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // The tests below prove nothing about memory safety unless the sanitizers are really in.
    for program in ["zlib_worker", "test_worker", "acgi-call"] {
        let bytes = std::fs::read(out.join(program)).map_err(|e| e.to_string())?;
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        if !has(b"__asan_init") || !has(b"__ubsan_handle") {
            return Err(format!("{program} was not built with ASan and UBSan"));
        }
    }
    Ok(out)
}

fn program(name: &str) -> PathBuf {
    c_build().join(name)
}

/// Sanitizer options for every C process of a test: stop at the first report, write reports
/// to files in a directory of the test's own, and exit 99.
struct Sanitizers {
    dir: tempfile::TempDir,
}

impl Sanitizers {
    fn new() -> Sanitizers {
        Sanitizers {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn asan_options(&self) -> String {
        format!(
            "halt_on_error=1:exitcode=99:detect_leaks=1:log_path={}/asan",
            self.dir.path().display()
        )
    }

    fn ubsan_options(&self) -> String {
        format!(
            "halt_on_error=1:print_stacktrace=1:exitcode=99:log_path={}/ubsan",
            self.dir.path().display()
        )
    }

    /// `env = {...}` for a `[[service]]`.
    fn service_env(&self) -> String {
        format!(
            "env = {{ ASAN_OPTIONS = {:?}, UBSAN_OPTIONS = {:?} }}\n",
            self.asan_options(),
            self.ubsan_options()
        )
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env("ASAN_OPTIONS", self.asan_options())
            .env("UBSAN_OPTIONS", self.ubsan_options());
        command
    }

    fn assert_clean(&self) {
        let reports: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("sanitizer dir")
            .flatten()
            .map(|entry| {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                format!("{}:\n{text}", entry.path().display())
            })
            .collect();
        assert!(
            reports.is_empty(),
            "sanitizer reports:\n{}",
            reports.join("\n")
        );
    }
}

/// A C service: `exec` one of the SDK's programs, with the sanitizer environment.
fn c_service(san: &Sanitizers, id: u32, name: &str, exe: &str, args: &[&str]) -> ServiceSpec {
    let mut spec = ServiceSpec::new(id, name, program(exe)).args(args);
    spec.slot_size_bytes = SLOT_BYTES as u32;
    spec.extra = san.service_env();
    spec
}

fn c_bridge() -> BridgeBuilder {
    bridge().top(&format!("max_payload_bytes = {PAYLOAD_MAX}"))
}

/// Stop the bridge (it stops every worker: EOF on its control socket, then SIGTERM), check
/// that each C worker exited 0 (ASan's leak check runs at exit and would exit 99), and that
/// no sanitizer wrote a report.
fn finish(mut bridge: Bridge, san: &Sanitizers) {
    // A worker still starting (a replacement) may get SIGTERM before its SDK is listening
    // for it; only workers that said Hello are held to exiting 0. A worker being stopped
    // (a timed-out one) is replaced once it is reaped, so wait until every pool is back to
    // its minimum of ready workers, with nothing starting or stopping.
    bridge.wait_status("every pool ready, none starting or stopping", |s| {
        s.services.iter().all(|service| {
            service.workers_starting == 0
                && service.workers_stopping == 0
                && service.workers_idle + service.workers_busy >= service.min_workers
        })
    });
    let status = bridge.stop();
    assert!(status.success(), "bridge exit: {status}");
    let log = bridge.log();
    let exits: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("worker exited"))
        .collect();
    assert!(!exits.is_empty(), "no worker exit logged:\n{log}");
    for line in &exits {
        if line.contains("stopped: shutdown") {
            assert!(line.contains("exit status 0"), "{line}\n{log}");
        }
    }
    san.assert_clean();
}

/// Run the C client; returns its output.
fn c_call(san: &Sanitizers, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = san.command(&program("acgi-call"));
    command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start acgi-call");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(bytes).expect("write stdin");
    }
    child.wait_with_output().expect("acgi-call")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Bytes that do not compress (so their compressed form is about as large).
fn noise(len: usize) -> Vec<u8> {
    tagged_payload(len as u64 ^ 0x5EED, len)
}

fn op(op: u8, data: &[u8]) -> Vec<u8> {
    let mut request = Vec::with_capacity(data.len() + 1);
    request.push(op);
    request.extend_from_slice(data);
    request
}

fn remote_code(error: &CallError) -> Option<ErrorCode> {
    error.code()
}

/// Wait (bounded) for a file a test worker writes when its job starts; returns its pid.
fn wait_pid_file(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared: the job did not start",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait (bounded) for a line of the bridge's log that satisfies `found`; returns it.
fn wait_log_line(bridge: &Bridge, what: &str, found: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = bridge.log();
        if let Some(line) = log.lines().find(|line| found(line)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "never logged: {what}\n{log}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait (bounded) for the bridge to log the exit of `pid`; returns that line.
fn wait_exit_logged(bridge: &Bridge, pid: i32) -> String {
    let needle = format!("pid={pid} ");
    wait_log_line(bridge, &format!("the exit of worker {pid}"), |line| {
        line.contains("worker exited") && line.contains(&needle)
    })
}

#[test]
fn c_zlib_worker_round_trips_in_and_over_the_slot() {
    // Proves the zlib worker (acgi_worker_serve) compresses and restores bytes through the
    // bridge with the request and the reply each in the slot or over it (copy path), both
    // ways, up to the payload maximum; and that the C client carries the same calls.
    let san = Sanitizers::new();
    let bridge = c_bridge()
        .service(c_service(&san, 20, "zlib", "zlib_worker", &[]).workers(1, 2))
        .start();
    let mut client = bridge.client();
    let zeros = vec![0u8; PAYLOAD_MAX - 1];
    let mut cases: Vec<Vec<u8>> = [0usize, 1, 100, SLOT_BYTES - 1, SLOT_BYTES, 100_000]
        .iter()
        .map(|&len| noise(len))
        .collect();
    cases.push(zeros.clone());
    for data in &cases {
        let compressed = client.call("zlib", &op(b'c', data)).expect("compress");
        assert_eq!(&compressed[..4], &(data.len() as u32).to_le_bytes());
        assert_eq!(compressed[4], 0x78, "a zlib stream starts with 0x78");
        let restored = client
            .call("zlib", &op(b'u', &compressed))
            .expect("uncompress");
        assert!(restored == *data, "{} bytes did not survive", data.len());
    }
    // The paths, by size: noise of 100 000 bytes is over the slot both ways; zeros are a
    // copy-path request with an in-slot reply, and the reverse for 'u'.
    let big = client.call("zlib", &op(b'c', &noise(100_000))).unwrap();
    assert!(
        big.len() > SLOT_BYTES,
        "compressed noise is {} bytes",
        big.len()
    );
    let small = client.call("zlib", &op(b'c', &zeros)).unwrap();
    assert!(
        small.len() < SLOT_BYTES,
        "compressed zeros are {} bytes",
        small.len()
    );

    // The C client, over Unix and TCP, with binary payloads on stdin.
    for addr in [&bridge.unix, &bridge.tcp] {
        let data = noise(300_000);
        let compressed = c_call(&san, &[addr, "zlib"], Some(&op(b'c', &data)));
        assert!(compressed.status.success(), "{}", stderr_of(&compressed));
        let restored = c_call(&san, &[addr, "20"], Some(&op(b'u', &compressed.stdout)));
        assert!(restored.status.success(), "{}", stderr_of(&restored));
        assert!(
            restored.stdout == data,
            "the C client's round trip changed the bytes"
        );
    }
    finish(bridge, &san);
}

#[test]
fn c_handler_errors_reach_the_caller_as_code_8() {
    // Proves a C handler's error message reaches the caller as error 8 with its text, from
    // both worker APIs, and that a reply over max_payload_bytes becomes such an error while
    // one of exactly the maximum is delivered.
    let san = Sanitizers::new();
    let bridge = c_bridge()
        .service(c_service(&san, 20, "zlib", "zlib_worker", &[]))
        .service(c_service(&san, 21, "cserve", "test_worker", &["serve"]))
        .service(c_service(&san, 22, "cloop", "test_worker", &["loop"]))
        .start();
    let mut client = bridge.client();
    let error = client.call("zlib", b"xyz").unwrap_err();
    assert_eq!(
        remote_code(&error),
        Some(ErrorCode::ServiceError),
        "{error}"
    );
    assert!(
        error.to_string().contains("unknown op byte 0x78"),
        "{error}"
    );
    let error = client
        .call("zlib", &op(b'u', b"\x05\0\0\0not zlib"))
        .unwrap_err();
    assert_eq!(
        remote_code(&error),
        Some(ErrorCode::ServiceError),
        "{error}"
    );
    assert!(error.to_string().contains("uncompress"), "{error}");
    for service in ["cserve", "cloop"] {
        let error = client.call(service, "fail boom ü".as_bytes()).unwrap_err();
        assert_eq!(
            remote_code(&error),
            Some(ErrorCode::ServiceError),
            "{error}"
        );
        assert!(error.to_string().ends_with("boom ü"), "{error}");
        let too_big = format!("big {}", PAYLOAD_MAX + 1);
        let error = client.call(service, too_big.as_bytes()).unwrap_err();
        assert_eq!(
            remote_code(&error),
            Some(ErrorCode::ServiceError),
            "{error}"
        );
        assert!(
            error.to_string().contains(&format!(
                "reply of {} bytes is over the bridge's maximum of {PAYLOAD_MAX} bytes",
                PAYLOAD_MAX + 1
            )),
            "{error}"
        );
        let at_max = format!("big {PAYLOAD_MAX}");
        assert_eq!(
            client.call(service, at_max.as_bytes()).unwrap().len(),
            PAYLOAD_MAX
        );
        // Echo in and over the slot, through this API.
        for len in [0, 10, SLOT_BYTES - 5, SLOT_BYTES + 1, 200_000] {
            let data = noise(len);
            let reply = client.call(service, &op_echo(&data)).unwrap();
            assert!(reply == data, "{service}: {len} bytes came back changed");
        }
        // The C client sees the same error, with its code and retry advice.
        let output = c_call(&san, &[&bridge.unix, service, "fail from C"], None);
        assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
        assert_eq!(
            stderr_of(&output).trim(),
            "acgi-call: error code=8 retry=no: from C"
        );
    }
    finish(bridge, &san);
}

fn op_echo(data: &[u8]) -> Vec<u8> {
    let mut request = b"echo ".to_vec();
    request.extend_from_slice(data);
    request
}

#[test]
fn c_client_reports_codes_timeouts_and_its_reply_bound() {
    // Proves the C client reports the bridge's codes with their retry advice (unknown service
    // by name and id: 1; a request deadline that expires in the backlog: 10; a service's
    // request timeout: 5), its own io timeout, and a reply over its bound, refused on the
    // header.
    let san = Sanitizers::new();
    let dir = tempfile::tempdir().unwrap();
    let mut slow = c_service(&san, 23, "cslow", "test_worker", &["serve"]).workers(1, 1);
    slow.extra
        .push_str("request_timeout_ms = 300\nkill_grace_ms = 200\n");
    let bridge = c_bridge()
        .service(c_service(&san, 21, "cserve", "test_worker", &["serve"]).workers(1, 1))
        .service(slow)
        .start();
    let unix = bridge.unix.as_str();

    let ok = c_call(&san, &[unix, "cserve", "echo hi"], None);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
    assert_eq!(ok.stdout, b"hi");
    let tcp = c_call(&san, &["-t", "5000", &bridge.tcp, "21", "echo tcp"], None);
    assert!(tcp.status.success(), "{}", stderr_of(&tcp));
    assert_eq!(tcp.stdout, b"tcp");

    for service in ["nope", "999"] {
        let output = c_call(&san, &[unix, service, "x"], None);
        assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
        assert!(
            stderr_of(&output).starts_with("acgi-call: error code=1 retry=no: "),
            "{}",
            stderr_of(&output)
        );
    }

    // Deadline: the only worker is busy, so a request with a 100 ms timeout expires waiting.
    let pid_file = dir.path().join("busy.pid");
    let busy = {
        let unix = bridge.unix.clone();
        let command = format!("sleep 3000 {}", pid_file.display());
        std::thread::spawn(move || {
            BlockingClient::connect(&unix)
                .unwrap()
                .call("cserve", command.as_bytes())
        })
    };
    wait_pid_file(&pid_file);
    let output = c_call(&san, &["-t", "100", unix, "cserve", "echo late"], None);
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).starts_with("acgi-call: error code=10 retry=yes: "),
        "{}",
        stderr_of(&output)
    );
    // The io timeout of the client itself, while the worker is still busy.
    let output = c_call(&san, &["-i", "100", unix, "cserve", "echo late"], None);
    assert_eq!(output.status.code(), Some(4), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("retry=if-idempotent: no answer within 100 ms"),
        "{}",
        stderr_of(&output)
    );
    assert_eq!(busy.join().unwrap().unwrap(), b"slept");

    // The service's own request timeout: code 5, and only an idempotent request may retry.
    let command = format!("sleep 10000 {}", dir.path().join("slow.pid").display());
    let output = c_call(&san, &[unix, "cslow", &command], None);
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).starts_with("acgi-call: error code=5 retry=if-idempotent: "),
        "{}",
        stderr_of(&output)
    );

    // A reply over the client's bound is refused from its header.
    let output = c_call(&san, &["-m", "50", unix, "cserve", "big 100"], None);
    assert_eq!(output.status.code(), Some(4), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("answer of 100 bytes is over this client's bound of 50"),
        "{}",
        stderr_of(&output)
    );
    let output = c_call(&san, &["-m", "100", unix, "cserve", "big 100"], None);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(output.stdout.len(), 100);
    finish(bridge, &san);
}

#[test]
fn c_worker_finishes_its_job_on_sigterm_and_exits_0() {
    // Proves a C worker that gets SIGTERM in the middle of a job finishes and answers it,
    // then exits 0, and that one SIGTERMed while idle exits 0 at once, through both APIs.
    let san = Sanitizers::new();
    let dir = tempfile::tempdir().unwrap();
    for (id, mode) in [(21u32, "serve"), (22, "loop")] {
        let name = format!("c{mode}");
        let bridge = c_bridge()
            .service(c_service(&san, id, &name, "test_worker", &[mode]).workers(1, 1))
            .start();
        let status = bridge.wait_status("an idle C worker", |s| {
            s.services[0].workers_idle == 1 && s.services[0].pids.len() == 1
        });
        let idle_pid = status.services[0].pids[0];
        // SAFETY: kill(2) on a worker of our bridge, which the bridge has not reaped.
        unsafe { libc::kill(idle_pid, libc::SIGTERM) };
        let line = wait_exit_logged(&bridge, idle_pid);
        assert!(line.contains("exit status 0"), "{mode} idle: {line}");

        let pid_file = dir.path().join(format!("{mode}.pid"));
        let call = {
            let unix = bridge.unix.clone();
            let (name, command) = (name.clone(), format!("sleep 400 {}", pid_file.display()));
            std::thread::spawn(move || {
                BlockingClient::connect(&unix)
                    .unwrap()
                    .call(name.as_str(), command.as_bytes())
            })
        };
        let busy_pid = wait_pid_file(&pid_file);
        assert_ne!(busy_pid, idle_pid);
        // SAFETY: as above; the worker is running our job.
        unsafe { libc::kill(busy_pid, libc::SIGTERM) };
        assert_eq!(
            call.join().unwrap().expect("the job in hand is answered"),
            b"slept"
        );
        let line = wait_exit_logged(&bridge, busy_pid);
        assert!(line.contains("exit status 0"), "{mode} busy: {line}");
        finish(bridge, &san);
    }
}

#[test]
fn c_worker_pipelined_and_queued_jobs_keep_their_order() {
    // Proves many requests in flight to one C worker that takes queued jobs
    // (worker_queue_depth = 4), in and over the slot, each get their own reply, through both
    // APIs; and that the worker sees a caller's deadline and no deadline without one.
    let san = Sanitizers::new();
    let mut builder = c_bridge();
    for (id, mode) in [(21u32, "serve"), (22, "loop")] {
        let mut spec = c_service(&san, id, &format!("c{mode}"), "test_worker", &[mode]);
        spec = spec.workers(1, 1);
        spec.extra.push_str("worker_queue_depth = 4\n");
        builder = builder.service(spec);
    }
    let bridge = builder.start();
    let mut client = bridge.client();
    for id in [21u32, 22] {
        let mut sent = std::collections::HashMap::new();
        for tag in 0..400u64 {
            let len = if tag % 10 == 0 { SLOT_BYTES + 100 } else { 30 };
            let data = tagged_payload(tag, len);
            let request_id = client.send(id, &op_echo(&data)).unwrap();
            sent.insert(request_id, data);
        }
        for _ in 0..sent.len() {
            let answer = client.receive().unwrap();
            assert_eq!(answer.header.kind, Kind::Reply, "{answer:?}");
            let expected = sent.remove(&answer.header.request_id).expect("one answer");
            assert!(answer.payload == expected, "a reply is not its request's");
        }
        let request_id = client
            .send_with_timeout(id, b"deadline", Duration::from_secs(5))
            .unwrap();
        let answer = client.receive().unwrap();
        assert_eq!(answer.header.request_id, request_id);
        let left: i64 = String::from_utf8_lossy(&answer.payload).parse().unwrap();
        assert!((1..=5000).contains(&left), "remaining ms {left}");
        assert_eq!(client.call(id, b"deadline").unwrap(), b"-1");
    }
    // The test worker logs its first queued job: the queued path really ran, in both APIs.
    for name in ["cserve", "cloop"] {
        let service = format!("service=\"{name}\"");
        wait_log_line(&bridge, &format!("a queued job for {name}"), |line| {
            line.contains("first queued job") && line.contains(&service)
        });
    }
    let status = bridge.status();
    for service in &status.services {
        assert!(service.worker_faults.is_empty(), "{service:#?}");
        assert_eq!(service.exits_crashed, 0, "{service:#?}");
    }
    finish(bridge, &san);
}

/// A C test worker driven by hand: this test plays the bridge on a socket pair and a real
/// slot, so it can check the exact frames and slot moves, and break the protocol.
struct HandDriven {
    child: std::process::Child,
    control: std::os::unix::net::UnixStream,
    slot: acgi_bridge::shm::Slot,
}

impl HandDriven {
    fn start(san: &Sanitizers, mode: &str, capacity: u32, payload_max: u32) -> HandDriven {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let slot = acgi_bridge::shm::Slot::create("c-sdk-test", capacity).expect("slot");
        let (control, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (their_fd, slot_fd) = (theirs.as_raw_fd(), slot.fd().as_raw_fd());
        let mut command = san.command(&program("test_worker"));
        command
            .arg(mode)
            .env("ACGI_CONTROL_FD", "3")
            .env("ACGI_SLOT_FD", "4")
            .env("ACGI_MAX_PAYLOAD_BYTES", payload_max.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec, and
        // gives the child the two descriptors at the numbers the environment names (dup2
        // clears close-on-exec on the copies).
        unsafe {
            command.pre_exec(move || {
                // Copies above 4 first, so that neither source is overwritten by the other's
                // dup2 when it already is 3 or 4.
                let control = libc::fcntl(their_fd, libc::F_DUPFD, 10);
                let slot = libc::fcntl(slot_fd, libc::F_DUPFD, 10);
                if control < 0 || slot < 0 || libc::dup2(control, 3) < 0 || libc::dup2(slot, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(control);
                libc::close(slot);
                Ok(())
            });
        }
        let child = command.spawn().expect("start test_worker");
        drop(theirs);
        control
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        HandDriven {
            child,
            control,
            slot,
        }
    }

    fn read_frame(&mut self) -> (acgi_bridge::proto::Header, Vec<u8>) {
        use std::io::Read;
        let mut bytes = [0u8; 24];
        if let Err(error) = self.control.read_exact(&mut bytes) {
            let _ = self.child.kill();
            let mut stderr = String::new();
            let _ = self
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr);
            panic!("no frame from the worker ({error}); its stderr:\n{stderr}");
        }
        let header = acgi_bridge::proto::Header::decode(&bytes, 1 << 30).expect("valid header");
        let mut payload = vec![0; header.payload_len as usize];
        self.control.read_exact(&mut payload).expect("its payload");
        (header, payload)
    }

    fn send(&mut self, header: &acgi_bridge::proto::Header, payload: &[u8]) {
        let mut frame = Vec::new();
        acgi_bridge::proto::encode_frame(&mut frame, header, payload);
        // The worker may already have exited on a bad header: a failed write is fine.
        let _ = self.control.write_all(&frame);
    }

    fn job(sequence: u64, flags: u16, payload_len: u32) -> acgi_bridge::proto::Header {
        let mut header = acgi_bridge::proto::Header::new(Kind::Job, 7, sequence, payload_len);
        header.flags = flags;
        header
    }

    /// Wait (bounded) for the worker's exit; its status code and stderr.
    fn exit(mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let _ = self.control.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("test_worker did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = String::new();
        let _ = self
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr);
        (status.code(), stderr)
    }
}

#[test]
fn c_worker_frames_and_slot_moves_are_the_spec_s() {
    // Proves, with this test as the bridge: Hello is the first frame (QUEUED, ABI 1, the
    // worker's pid); an in-slot job is answered in the slot (Done + IN_SLOT, state Replied,
    // reply_len); a reply over the slot goes on the socket with reply_len 0; a copy-path job is
    // read from the socket; a queued job is answered inline without touching the slot; a
    // failure is a Fail; and EOF at a frame boundary is exit 0.
    use acgi_bridge::proto::{FLAG_IN_SLOT, FLAG_QUEUED};
    let san = Sanitizers::new();
    for mode in ["serve", "loop"] {
        let mut w = HandDriven::start(&san, mode, 64, 100_000);
        let (hello, payload) = w.read_frame();
        assert_eq!(hello.kind, Kind::Hello);
        assert_eq!(hello.flags, FLAG_QUEUED);
        assert_eq!((hello.service_id, hello.request_id, hello.code), (0, 0, 0));
        assert_eq!(&payload[..4], &1u32.to_le_bytes());
        assert_eq!(&payload[4..], &w.child.id().to_le_bytes());

        // In the slot, both ways.
        w.slot.fill(11, Some(b"echo in slot"), 0).unwrap();
        w.send(&HandDriven::job(11, FLAG_IN_SLOT, 0), b"");
        let (done, payload) = w.read_frame();
        assert_eq!(
            (done.kind, done.flags, done.request_id),
            (Kind::Done, FLAG_IN_SLOT, 11)
        );
        assert!(payload.is_empty());
        let mut reply = Vec::new();
        assert_eq!(w.slot.take_reply(11, true, &mut reply).unwrap(), 7);
        assert_eq!(reply, b"in slot");

        // In the slot, the reply over it (64 bytes): on the socket, reply_len 0.
        w.slot.fill(12, Some(b"big 65"), 0).unwrap();
        w.send(&HandDriven::job(12, FLAG_IN_SLOT, 0), b"");
        let (done, payload) = w.read_frame();
        assert_eq!(
            (done.kind, done.flags, done.request_id),
            (Kind::Done, 0, 12)
        );
        assert_eq!(payload, vec![b'x'; 65]);
        assert_eq!(w.slot.peek_reply(12).unwrap(), 0);
        w.slot.release_reply();

        // Copy path both ways (105 bytes in, 100 out, over 64).
        let request = op_echo(&[b'y'; 100]);
        w.slot.fill(13, None, 0).unwrap();
        w.send(&HandDriven::job(13, 0, request.len() as u32), &request);
        let (done, _) = w.read_frame();
        assert_eq!((done.kind, done.flags), (Kind::Done, 0));
        w.slot.take_reply(13, false, &mut Vec::new()).unwrap();

        // A queued job: answered on the socket; the slot (Free here) is left alone.
        w.send(&HandDriven::job(14, FLAG_QUEUED, 6), b"echo q");
        let (done, payload) = w.read_frame();
        assert_eq!(
            (done.kind, done.flags, done.request_id),
            (Kind::Done, 0, 14)
        );
        assert_eq!(payload, b"q");
        assert_eq!(w.slot.state(), 0, "a queued job must not touch the slot");

        // A failure.
        w.slot.fill(15, Some(b"fail nope"), 0).unwrap();
        w.send(&HandDriven::job(15, FLAG_IN_SLOT, 0), b"");
        let (fail, payload) = w.read_frame();
        assert_eq!(
            (fail.kind, fail.flags, fail.request_id),
            (Kind::Fail, 0, 15)
        );
        assert_eq!(payload, b"nope");
        assert_eq!(w.slot.peek_reply(15).unwrap(), 0);
        w.slot.release_reply();

        let (code, stderr) = w.exit();
        assert_eq!(code, Some(0), "{mode}: {stderr}");
    }
    san.assert_clean();
}

#[test]
fn c_worker_exits_non_zero_when_the_bridge_breaks_the_protocol() {
    // Proves the C worker checks what the bridge sends before using it: each violation of
    // §8.1 makes it exit 2 with the reason and without answering.
    use acgi_bridge::proto::{Header, FLAG_IN_SLOT, FLAG_QUEUED};
    let san = Sanitizers::new();
    type Setup = fn(&mut HandDriven);
    let cases: &[(&str, Setup, &str)] = &[
        (
            "a Job while the slot is Free",
            |w| w.send(&HandDriven::job(1, FLAG_IN_SLOT, 0), b""),
            "not Filled",
        ),
        (
            "a job sequence that is not the slot's",
            |w| {
                w.slot.fill(5, Some(b"echo x"), 0).unwrap();
                w.send(&HandDriven::job(6, FLAG_IN_SLOT, 0), b"");
            },
            "job sequence",
        ),
        (
            "request_len over the capacity",
            |w| {
                w.slot.fill(1, Some(b"echo x"), 0).unwrap();
                w.slot
                    .header()
                    .request_len
                    .store(65, std::sync::atomic::Ordering::Release);
                w.send(&HandDriven::job(1, FLAG_IN_SLOT, 0), b"");
            },
            "over the capacity",
        ),
        (
            "an in-slot Job with a socket payload",
            |w| {
                w.slot.fill(1, Some(b"echo x"), 0).unwrap();
                w.send(&HandDriven::job(1, FLAG_IN_SLOT, 3), b"abc");
            },
            "in-slot Job with 3 payload bytes",
        ),
        (
            "a copy-path Job whose slot says in-slot",
            |w| {
                w.slot.fill(1, Some(b"echo x"), 0).unwrap();
                w.send(&HandDriven::job(1, 0, 6), b"echo x");
            },
            "not 0xFFFFFFFF",
        ),
        (
            "a payload over ACGI_MAX_PAYLOAD_BYTES",
            |w| {
                let _ = w.control.write_all(&HandDriven::job(1, 0, 1001).encode());
            },
            "too_large",
        ),
        (
            "a kind other than Job",
            |w| w.send(&Header::new(Kind::Reply, 1, 1, 0), b""),
            "not a Job",
        ),
        (
            "a queued Job marked in-slot",
            |w| w.send(&HandDriven::job(1, FLAG_IN_SLOT | FLAG_QUEUED, 0), b""),
            "flags 0x0005",
        ),
        (
            "bad magic",
            |w| {
                let _ = w.control.write_all(&[0u8; 24]);
            },
            "magic",
        ),
        (
            "EOF inside a frame",
            |w| {
                let _ = w
                    .control
                    .write_all(&Header::new(Kind::Job, 0, 1, 10).encode()[..10]);
            },
            "inside a frame",
        ),
    ];
    for mode in ["serve", "loop"] {
        for (what, setup, reason) in cases {
            let mut w = HandDriven::start(&san, mode, 64, 1000);
            assert_eq!(w.read_frame().0.kind, Kind::Hello);
            setup(&mut w);
            let (code, stderr) = w.exit();
            assert_eq!(code, Some(2), "{mode}, {what}: {stderr}");
            assert!(stderr.contains(reason), "{mode}, {what}: {stderr}");
        }
    }
    san.assert_clean();
}

#[test]
fn c_client_checks_every_answer_it_reads() {
    // Proves the C client, against a hand-written bridge: skips an answer for another request
    // id, refuses a reply header over its bound before reading the payload (and skips it),
    // treats a frame a bridge may not send or a length over 2^30 as a protocol error, and a
    // close before the answer as "closed, outcome unknown".
    use acgi_bridge::proto::Header;
    use std::io::Read;
    let san = Sanitizers::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let addr = path.display().to_string();
    type Answer = fn(u64) -> Vec<u8>;
    let cases: &[(&str, Answer, Option<i32>, &str)] = &[
        (
            "another id first",
            |id| {
                let mut bytes = Vec::new();
                for (rid, text) in [(id + 7, &b"not yours"[..]), (id, &b"yours"[..])] {
                    let header = Header::new(Kind::Reply, 5, rid, text.len() as u32);
                    acgi_bridge::proto::encode_frame(&mut bytes, &header, text);
                }
                bytes
            },
            Some(0),
            "",
        ),
        (
            "a reply over the bound",
            |id| {
                let mut bytes = Vec::new();
                let header = Header::new(Kind::Reply, 5, id, 5000);
                acgi_bridge::proto::encode_frame(&mut bytes, &header, &[1u8; 5000]);
                bytes
            },
            Some(4),
            "answer of 5000 bytes is over this client's bound of 1000 bytes",
        ),
        (
            "a Job to a caller",
            |id| Header::new(Kind::Job, 5, id, 0).encode().to_vec(),
            Some(4),
            "kind 17",
        ),
        (
            "flags on a Reply",
            |id| {
                let mut header = Header::new(Kind::Reply, 5, id, 0);
                header.flags = 1;
                header.encode().to_vec()
            },
            Some(4),
            "flags 0x0001",
        ),
        (
            "a length over 2^30",
            |id| {
                Header::new(Kind::Reply, 5, id, (1 << 30) + 1)
                    .encode()
                    .to_vec()
            },
            Some(4),
            "bad header (too_large)",
        ),
        (
            "close before the answer",
            |_| Vec::new(),
            Some(4),
            "retry=if-idempotent: the bridge closed the connection",
        ),
    ];
    for &(what, answer, code, text) in cases {
        let server = std::thread::spawn({
            let listener = listener.try_clone().unwrap();
            move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut head = [0u8; 24];
                stream.read_exact(&mut head).unwrap();
                let header = Header::decode(&head, 1 << 30).unwrap();
                let mut payload = vec![0; header.payload_len as usize];
                stream.read_exact(&mut payload).unwrap();
                assert_eq!((header.kind, header.service_id), (Kind::Request, 5));
                let _ = stream.write_all(&answer(header.request_id));
            }
        });
        let output = c_call(&san, &["-m", "1000", &addr, "5", "ping"], None);
        server.join().unwrap();
        assert_eq!(output.status.code(), code, "{what}: {}", stderr_of(&output));
        assert!(
            stderr_of(&output).contains(text),
            "{what}: {}",
            stderr_of(&output)
        );
        if code == Some(0) {
            assert_eq!(output.stdout, b"yours", "{what}");
        }
    }
    san.assert_clean();
}

#[test]
fn c_client_resolves_once_and_goes_on_after_a_skipped_reply() {
    // Proves, against a hand-written bridge, that the C client resolves a name once per
    // connection (then uses the cached id), and that after a reply over its bound (skipped)
    // the same connection carries the next calls.
    use acgi_bridge::proto::Header;
    use std::io::Read;
    let san = Sanitizers::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let (mut resolves, mut requests) = (0, 0);
        loop {
            let mut head = [0u8; 24];
            if stream.read_exact(&mut head).is_err() {
                return (resolves, requests); // the client closed
            }
            let header = Header::decode(&head, 1 << 30).unwrap();
            let mut payload = vec![0; header.payload_len as usize];
            stream.read_exact(&mut payload).unwrap();
            let mut out = Vec::new();
            match header.kind {
                Kind::Resolve => {
                    resolves += 1;
                    assert_eq!(payload, b"svc");
                    let answer = Header::new(Kind::Resolved, 5, header.request_id, 0);
                    out.extend_from_slice(&answer.encode());
                }
                Kind::Request => {
                    requests += 1;
                    assert_eq!(header.service_id, 5);
                    let body: &[u8] = if requests == 1 { &[9u8; 5000] } else { b"ok" };
                    let answer = Header::new(Kind::Reply, 5, header.request_id, body.len() as u32);
                    acgi_bridge::proto::encode_frame(&mut out, &answer, body);
                }
                other => panic!("unexpected {other:?}"),
            }
            stream.write_all(&out).unwrap();
        }
    });
    let addr = path.display().to_string();
    let output = c_call(&san, &["-n", "3", "-m", "1000", &addr, "svc", "x"], None);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_of(&output));
    assert_eq!(output.stdout, b"okok");
    assert_eq!(
        stderr_of(&output).trim(),
        "acgi-call: failed kind=reply_too_large retry=no: answer of 5000 bytes is over this client's bound of \
         1000 bytes"
    );
    assert_eq!(server.join().unwrap(), (1, 3), "(resolves, requests)");
    san.assert_clean();
}

/// Start `drain_client ADDR echo MODE` and wait for its "ready" (its first call answered).
fn start_drain_client(
    san: &Sanitizers,
    addr: &str,
    mode: &str,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    let mut child = san
        .command(&program("drain_client"))
        .args([addr, "echo", mode])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drain_client");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read drain_client");
    assert_eq!(line, "ready\n", "drain_client {mode} did not start");
    (child, stdout)
}

/// Tell a drain client to finish (a line on stdin); its exit and its "calls= retries=" line.
fn finish_drain_client(
    (mut child, mut stdout): (
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
    ),
) -> (u64, u64) {
    use std::io::Read;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write drain_client's stdin");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read drain_client");
    let output = child.wait_with_output().expect("drain_client");
    assert!(
        output.status.success(),
        "drain_client failed ({}): {}",
        output.status,
        stderr_of(&output)
    );
    let field = |name: &str| -> u64 {
        rest.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {rest:?}"))
    };
    (field("calls="), field("retries="))
}

#[test]
fn c_client_resends_what_a_draining_bridge_refused_across_an_upgrade() {
    // Proves the C client resends by itself what a draining bridge did not run, across a real
    // `acgi-bridge upgrade`: a client idle when the drain notice came and one calling back to
    // back through the upgrade fail no call, and each says it resent (drain retries).
    let san = Sanitizers::new();
    let mut bridge = bridge().service(ServiceSpec::echo().workers(2, 4)).start();
    let idle = start_drain_client(&san, &bridge.unix, "idle");
    let busy = start_drain_client(&san, &bridge.unix, "busy");

    let mut successor = crate::upgrade::upgrade(&bridge.admin);
    let status = bridge
        .wait_exit(Duration::from_secs(30))
        .expect("the old bridge exits once drained");
    assert!(status.success(), "the old bridge exited with {status}");

    let (calls, retries) = finish_drain_client(idle);
    assert_eq!(
        (calls, retries),
        (2, 1),
        "the idle client's second call is resent once, to the new bridge"
    );
    let (calls, retries) = finish_drain_client(busy);
    assert!(calls > 2, "{calls} calls");
    assert!(
        retries >= 1,
        "the busy client never met the drain in {calls} calls"
    );
    assert_eq!(successor.stop(), 0);
    san.assert_clean();
}

#[test]
fn c_client_resends_a_refused_call_at_most_three_times() {
    // Proves the C client's resend bound, against a hand-written bridge that answers every
    // request with error 6 on every connection: the call goes out on 1 + 3 connections, then
    // fails with the error 6 (retry: yes), and the client does not loop.
    use acgi_bridge::proto::Header;
    use std::io::Read;
    let san = Sanitizers::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refusing.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut connections, mut requests) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                stream.set_nonblocking(false).unwrap();
                connections += 1;
                let mut head = [0u8; 24];
                while stream.read_exact(&mut head).is_ok() {
                    let header = Header::decode(&head, 1 << 30).unwrap();
                    let mut payload = vec![0; header.payload_len as usize];
                    stream.read_exact(&mut payload).unwrap();
                    let mut answer = match header.kind {
                        Kind::Resolve => Header::new(Kind::Resolved, 5, header.request_id, 0),
                        _ => {
                            requests += 1;
                            let mut refusal = Header::new(Kind::Error, 5, header.request_id, 0);
                            refusal.code = ErrorCode::ShuttingDown as u16;
                            refusal
                        }
                    };
                    answer.payload_len = 0;
                    if stream.write_all(&answer.encode()).is_err() {
                        break;
                    }
                }
            }
            (connections, requests)
        })
    };
    let addr = path.display().to_string();
    let output = c_call(&san, &[&addr, "svc", "x"], None);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).starts_with("acgi-call: error code=6 retry=yes: "),
        "{}",
        stderr_of(&output)
    );
    assert_eq!(
        server.join().unwrap(),
        (4, 4),
        "(connections, requests): one call and its 3 resends, each on a new connection"
    );
    san.assert_clean();
}
