//! Running under systemd: sd_notify (READY, STATUS, STOPPING, WATCHDOG) seen on a notify socket
//! the test binds, socket activation through the real `systemd-socket-activate`, the units in
//! `dist/systemd/` checked by `systemd-analyze verify`, and the command-line frictions of the
//! packaging issue (`call --connect bridge.sock`, `check`'s wording, `--version`).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use acgi_bridge::client::BlockingClient;

use crate::common::{self, ServiceSpec};

/// How long anything the bridge does at startup or shutdown may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// A notify socket bound by the test, standing in for systemd's.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    fn env(&self) -> String {
        format!("NOTIFY_SOCKET={}", self.path.display())
    }

    /// The next notification (its lines), or `None` once `deadline` passes.
    fn next(&self, deadline: Instant) -> Option<Vec<String>> {
        let left = deadline.checked_duration_since(Instant::now())?;
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = self.socket.recv(&mut buffer).ok()?;
        let text = String::from_utf8_lossy(&buffer[..n]);
        Some(text.lines().map(str::to_string).collect())
    }

    /// Every notification until one holding `line` (included); panics at the deadline.
    fn until(&self, line: &str, deadline: Instant) -> Vec<Vec<String>> {
        let mut seen = Vec::new();
        loop {
            match self.next(deadline) {
                Some(message) => {
                    let done = message.iter().any(|l| l == line);
                    seen.push(message);
                    if done {
                        return seen;
                    }
                }
                None => panic!("no {line} before the deadline; got {seen:?}"),
            }
        }
    }
}

fn has(messages: &[Vec<String>], line: &str) -> bool {
    messages.iter().flatten().any(|l| l == line)
}

/// The environment of a process, as NAME=VALUE strings.
fn environ_of(pid: i32) -> Vec<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    bytes
        .split(|&b| b == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// The bridge's workers (its children that are not zombies), once at least `count` run.
fn workers_of(pid: i32, count: usize) -> Vec<i32> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let workers: Vec<i32> = common::children_of(pid)
            .into_iter()
            .filter(|(_, state)| *state != 'Z')
            .map(|(pid, _)| pid)
            .collect();
        if workers.len() >= count {
            return workers;
        }
        assert!(Instant::now() < deadline, "no {count} workers of {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn notify_ready_before_serving_and_stopping_on_sigterm() {
    // Proves READY=1 (with a STATUS line) arrives once the bridge serves, a call works after
    // it, STOPPING=1 follows SIGTERM, and no WATCHDOG=1 is sent without WATCHDOG_USEC.
    let notify = NotifySocket::bind();
    let started = Instant::now();
    let mut bridge = common::bridge()
        .service(ServiceSpec::echo())
        .wrapper(&["env", &notify.env()])
        .start();
    let before_ready = notify.until("READY=1", started + DEADLINE);
    let ready = before_ready.last().unwrap();
    let status = ready
        .iter()
        .find_map(|line| line.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 came without STATUS=: {ready:?}"));
    assert!(
        status.contains("1 service") && status.contains(&bridge.unix),
        "{status}"
    );
    assert!(!has(&before_ready[..before_ready.len() - 1], "STOPPING=1"));

    let reply = bridge.client().call("echo", b"after ready").unwrap();
    assert_eq!(reply, b"after ready");

    assert!(bridge.stop().success());
    let after = notify.until("STOPPING=1", Instant::now() + DEADLINE);
    assert!(!has(&after, "READY=1"), "a second READY=1: {after:?}");
    assert!(
        !has(&before_ready, "WATCHDOG=1") && !has(&after, "WATCHDOG=1"),
        "WATCHDOG=1 without WATCHDOG_USEC"
    );
}

#[test]
fn notify_watchdog_is_petted_at_half_the_period_from_the_control_thread() {
    // Proves WATCHDOG_USEC makes the bridge send WATCHDOG=1 repeatedly, no more often than half
    // the period, and that workers do not inherit WATCHDOG_USEC.
    let notify = NotifySocket::bind();
    let period = Duration::from_millis(400);
    let started = Instant::now();
    let bridge = common::bridge()
        .service(ServiceSpec::echo())
        .wrapper(&[
            "env",
            &notify.env(),
            &format!("WATCHDOG_USEC={}", period.as_micros()),
        ])
        .start();
    let mut pets = 0;
    let deadline = started + DEADLINE;
    while pets < 4 {
        let message = notify
            .next(deadline)
            .unwrap_or_else(|| panic!("{pets} WATCHDOG=1 before the deadline"));
        pets += message.iter().filter(|l| *l == "WATCHDOG=1").count();
    }
    // Four pets at least half a period apart take at least 1.5 periods, however late they
    // are read.
    assert!(
        started.elapsed() >= period * 3 / 2,
        "4 pets in {:?}: faster than every {:?}",
        started.elapsed(),
        period / 2
    );
    for worker in workers_of(bridge.pid(), 1) {
        let environ = environ_of(worker);
        assert!(
            !environ.iter().any(|e| e.starts_with("WATCHDOG_")),
            "worker {worker} inherited the watchdog: {environ:?}"
        );
    }
}

/// Lines of a child's pipe, read on a thread of their own so that waits can have deadlines.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line `want` accepts, or a panic naming what came instead.
fn wait_line(rx: &mpsc::Receiver<String>, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if want(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {what}; got {seen:?}"),
        }
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the bridge did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A bridge started by `systemd-socket-activate`, which binds the sockets, waits for the first
/// connection, then execs the bridge with them (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
struct Activated {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    dir: tempfile::TempDir,
}

impl Activated {
    /// Start in `dir` (where the sockets are): `listen`, the config's `[listen]` lines;
    /// `activate`, systemd-socket-activate's options before the bridge's command line.
    fn start(dir: tempfile::TempDir, listen: &str, activate: &[&str]) -> Activated {
        let config = dir.path().join("bridge.toml");
        let text = format!(
            "state_dir = {:?}\n[listen]\n{listen}\n[[service]]\nid = 1\nname = \"echo\"\n\
             exec = {:?}\nmin_workers = 1\nmax_workers = 2\n",
            dir.path().join("state").display().to_string(),
            common::example("echo").display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new("systemd-socket-activate")
            .args(activate)
            .arg(common::bridge_exe())
            .args(["serve", "--log", "info", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("systemd-socket-activate (apt-get install systemd)");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let activated = Activated {
            child,
            stdout,
            stderr,
            dir,
        };
        // It says so once its sockets listen, before it execs the bridge.
        wait_line(
            &activated.stderr,
            "systemd-socket-activate listening",
            |l| l.starts_with("Listening on"),
        );
        activated
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything it wrote on stderr until it exited (the bridge's log).
    fn exit_and_log(&mut self) -> (ExitStatus, String) {
        let status = wait_exit(&mut self.child);
        let mut log = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(DEADLINE) {
            log.push(line);
        }
        (status, log.join("\n"))
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Call echo over `path` on a thread, so that a bridge that never answers fails the test at a
/// deadline instead of hanging it.
fn call_echo(path: &Path, payload: &'static [u8]) -> Vec<u8> {
    let path = path.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = BlockingClient::connect(path.to_str().unwrap())
            .and_then(|mut client| client.call("echo", payload));
        let _ = tx.send(result);
    });
    rx.recv_timeout(DEADLINE)
        .expect("an answer before the deadline")
        .expect("a reply")
}

/// The `socket:[inode]` a process's descriptor `fd` is.
fn fd_target(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|target| target.display().to_string())
        .unwrap_or_default()
}

#[test]
fn systemd_socket_activation_serves_the_passed_unix_socket_and_leaves_it() {
    // Proves a call over a socket systemd-socket-activate bound and passed (by name) is served,
    // that workers inherit neither the socket nor LISTEN_*, and that the socket file is not
    // unlinked at shutdown (it is systemd's).
    serve_activated(Some("unix"));
}

#[test]
fn systemd_socket_activation_matches_an_unnamed_socket_by_its_address() {
    // Proves a passed socket whose name is none of unix/tcp/admin/metrics (systemd's default)
    // is taken for the listener bound at its address.
    serve_activated(None);
}

/// Start the bridge with its `listen.unix` passed by systemd-socket-activate (named `fdname`,
/// or by default), call it, stop it, and check what the activation tests prove.
fn serve_activated(fdname: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let listen = format!("unix = {:?}", sock.display().to_string());
    let mut options = vec!["-l".to_string(), sock.display().to_string()];
    if let Some(name) = fdname {
        options.push(format!("--fdname={name}"));
    }
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let mut activated = Activated::start(dir, &listen, &options);
    // This first connection is what makes systemd-socket-activate exec the bridge.
    assert_eq!(call_echo(&sock, b"activated"), b"activated");
    let ready = wait_line(&activated.stdout, "the ready line", |l| {
        l.starts_with("acgi-bridge ready")
    });
    assert!(
        ready.contains(&format!("unix={}", sock.display())),
        "{ready}"
    );
    let pid = activated.child.id() as i32;
    let listener = fd_target(pid, 3);
    assert!(listener.starts_with("socket:"), "fd 3 is {listener:?}");
    for worker in workers_of(pid, 1) {
        let environ = environ_of(worker);
        assert!(
            !environ.iter().any(|e| e.starts_with("LISTEN_")),
            "worker {worker} inherited socket activation: {environ:?}"
        );
        let fds = common::fd_list(worker);
        assert!(
            !fds.iter().any(|fd| fd.ends_with(&format!("-> {listener}"))),
            "worker {worker} holds the listener {listener}: {fds:?}"
        );
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (status, log) = activated.exit_and_log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("using a socket passed by systemd"), "{log}");
    assert!(sock.exists(), "the bridge unlinked systemd's socket");
    // The admin socket was the bridge's own: bound, then removed.
    assert!(!activated.path("state/admin.sock").exists());
}

#[test]
fn systemd_socket_activation_refuses_missing_and_mistyped_sockets() {
    // Proves a configured listener without a passed socket, a passed socket of the wrong type,
    // and a datagram socket each stop the bridge with a message naming the problem.
    struct Case {
        what: &'static str,
        tcp: bool,
        options: &'static [&'static str],
        expect: &'static [&'static str],
    }
    let cases = [
        Case {
            what: "listen.tcp not passed",
            tcp: true,
            options: &["--fdname=unix"],
            expect: &["listen.tcp", "has no passed socket"],
        },
        Case {
            what: "a Unix socket named tcp",
            tcp: true,
            options: &["--fdname=tcp"],
            expect: &["is for listen.tcp", "Unix socket", "not a listening TCP"],
        },
        Case {
            what: "a datagram socket",
            tcp: false,
            options: &["--datagram", "--fdname=unix"],
            expect: &["datagram socket", "ListenStream="],
        },
    ];
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let mut listen = format!("unix = {:?}\n", sock.display().to_string());
        if case.tcp {
            listen.push_str("tcp = \"127.0.0.1:0\"\n");
        }
        let mut options = vec!["-l", sock.to_str().unwrap()];
        options.extend_from_slice(case.options);
        let mut activated = Activated::start(dir, &listen, &options);
        // Wake systemd-socket-activate so that it execs the bridge.
        if case.options.contains(&"--datagram") {
            UnixDatagram::unbound()
                .unwrap()
                .send_to(b"wake", &sock)
                .unwrap();
        } else {
            let _connection = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        }
        let (status, log) = activated.exit_and_log();
        assert!(
            !status.success(),
            "{}: the bridge started: {log}",
            case.what
        );
        for expected in case.expect {
            assert!(
                log.contains(expected),
                "{}: {expected:?} not in:\n{log}",
                case.what
            );
        }
        assert!(
            activated.stdout.try_recv().is_err(),
            "{}: a ready line",
            case.what
        );
    }
}

/// The repository's `dist/` directory.
fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist")
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // Proves dist/systemd/*.service and *.socket are valid units (systemd-analyze verify finds
    // nothing), with ExecStart pointed at the binary under test instead of /usr/bin.
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["acgi-bridge.service", "acgi-bridge.socket"] {
        let text = std::fs::read_to_string(dist().join("systemd").join(name)).unwrap();
        assert!(text.contains("/usr/bin/acgi-bridge") || name.ends_with(".socket"));
        let text = text.replace("/usr/bin/acgi-bridge", common::bridge_exe());
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Complaints about units of the host (not ours) are not this test's business.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("acgi-bridge"))
        .collect();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
}

#[test]
fn systemd_cli_connect_bare_path_check_wording_and_version() {
    // Proves `call --connect bridge.sock` (relative, without ./) reaches the Unix socket,
    // `check` says "1 service", `check -c` has help text, and --version names the commit.
    let bridge = common::bridge().service(ServiceSpec::echo()).start();
    let output = Command::new(common::bridge_exe())
        .args(["call", "--connect", "bridge.sock", "echo", "bare path"])
        .current_dir(&bridge.dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"bare path");

    let output = Command::new(common::bridge_exe())
        .args(["check", "-c"])
        .arg(bridge.dir.join("bridge.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.trim_end().ends_with(": ok (1 service)"), "{stdout}");

    let output = Command::new(common::bridge_exe())
        .args(["check", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    let config_line = help
        .lines()
        .find(|line| line.trim_start().starts_with("-c, --config"))
        .unwrap_or_else(|| panic!("{help}"));
    assert!(
        config_line.contains("config file"),
        "no help: {config_line}"
    );

    let output = Command::new(common::bridge_exe())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(
        version.starts_with(&format!("acgi-bridge {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    if let Some(commit) = commit {
        assert!(
            version.contains(&format!("({commit})")),
            "{version} lacks {commit}"
        );
    }
}

#[test]
fn notify_reloading_then_ready_on_every_reload_whatever_its_end() {
    // Proves a SIGHUP reload sends RELOADING=1 with MONOTONIC_USEC, then READY=1, both when it
    // takes effect and when the config is refused (systemd waits for the pair).
    let notify = NotifySocket::bind();
    let started = Instant::now();
    let bridge = common::bridge()
        .service(ServiceSpec::echo())
        .wrapper(&["env", &notify.env()])
        .start();
    notify.until("READY=1", started + DEADLINE);
    let config = bridge.dir.join("bridge.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    for (text, outcome) in [
        (
            good.replace("max_workers = 4", "max_workers = 3"),
            "reloaded in",
        ),
        (
            good.replace("max_workers = 4", "max_workers = 0"),
            "reload refused",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        bridge.signal(libc::SIGHUP);
        let messages = notify.until("READY=1", Instant::now() + DEADLINE);
        let reloading = messages
            .iter()
            .position(|m| m.iter().any(|l| l == "RELOADING=1"))
            .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {messages:?}"));
        assert!(
            messages[reloading]
                .iter()
                .any(|l| l.starts_with("MONOTONIC_USEC=")),
            "RELOADING=1 without MONOTONIC_USEC: {messages:?}"
        );
        bridge.wait_log(outcome);
    }
    assert_eq!(bridge.client().call("echo", b"on").unwrap(), b"on");
}

#[test]
fn ready_waits_for_each_services_first_worker_but_not_for_one_that_cannot_start() {
    // Proves the ready line (and READY=1) come once every service has a worker up: a worker that
    // takes 400 ms to start is idle when the bridge says ready, while a service whose workers
    // cannot start (they exit before their handshake) does not hold readiness back for long.
    let slow = ServiceSpec::new(3, "slow", common::example("faulty"))
        .args(&["--slow-start", "400"])
        .workers(1, 1);
    let broken = ServiceSpec::new(4, "broken", common::example("faulty"))
        .args(&["--no-hello"])
        .workers(1, 1);
    let notify = NotifySocket::bind();
    let started = Instant::now();
    let bridge = common::bridge()
        .service(slow)
        .service(broken)
        .wrapper(&["env", &notify.env()])
        .start();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "ready after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the broken service held it back: {took:?}"
    );
    notify.until("READY=1", started + DEADLINE);
    let status = bridge.service_status("slow");
    assert!(
        status.workers_idle + status.workers_busy >= 1,
        "a worker is up at ready: {status:#?}"
    );
}

#[test]
fn call_finds_the_socket_in_a_config_and_waits_for_the_bridge_to_come_up() {
    // Proves `call --config FILE` connects to the config's socket, and `--wait` retries until a
    // bridge listens there: a caller started before the bridge gets its answer once it is up,
    // while one without --wait fails at once.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let builder = common::bridge().service(ServiceSpec::echo().workers(1, 1));
    std::fs::write(&config, builder.config_text(dir.path())).unwrap();
    let call = |extra: &[&str]| {
        let mut command = Command::new(common::bridge_exe());
        command.arg("call").arg("--config").arg(&config).args(extra);
        command
    };
    let once = call(&["echo", "now"]).output().unwrap();
    assert!(!once.status.success(), "no bridge yet");
    let mut waiting = call(&["--wait", "60", "echo", "waited"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // It keeps trying (a caller without --wait has failed by now).
    let patience = Instant::now() + Duration::from_millis(300);
    while Instant::now() < patience {
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "gave up without a bridge"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut server = Command::new(common::bridge_exe())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("acgi-bridge ready"), "{line}");
    let output = waiting.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(output.stdout, b"waited");
    let now = call(&["echo", "by config"]).output().unwrap();
    assert_eq!(now.stdout, b"by config");
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
}

#[test]
fn every_config_key_is_in_the_reference() {
    // Proves docs/configuration.md names every key `check --print` knows (so a new key without
    // its documentation fails here), each in a table row of its section.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let builder = common::bridge().service(ServiceSpec::echo());
    std::fs::write(&config, builder.config_text(dir.path())).unwrap();
    let output = Command::new(common::bridge_exe())
        .args(["check", "--print", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    let section_of = |heading: &str| -> String {
        let start = reference
            .find(heading)
            .unwrap_or_else(|| panic!("no {heading} in docs/configuration.md"));
        let rest = &reference[start + heading.len()..];
        let end = rest.find("\n## ").unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let mut section = section_of("## Top level");
    let mut missing = Vec::new();
    for line in printed.lines() {
        let line = line.trim();
        if line == "[listen]" {
            section = section_of("## `[listen]`");
            continue;
        }
        if line == "[[service]]" {
            section = section_of("## `[[service]]`");
            continue;
        }
        let key = line
            .strip_prefix("# ")
            .and_then(|l| l.split(':').next())
            .filter(|k| !k.contains(' '))
            .or_else(|| line.split(" = ").next().filter(|_| line.contains(" = ")));
        let Some(key) = key else { continue };
        if !section.contains(&format!("| `{key}` |")) {
            missing.push(key.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn check_of_a_running_bridges_own_config_passes() {
    // Proves `check` on the config of a bridge that is running (the README's order: serve in
    // one shell, check in another) does not call the bridge's own TCP port "in use".
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bridge = common::bridge()
        .tcp(&format!("127.0.0.1:{port}"))
        .service(ServiceSpec::echo())
        .start();
    let output = Command::new(common::bridge_exe())
        .args(["check", "--config"])
        .arg(bridge.dir.join("bridge.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("a bridge of this config is running"),
        "{stderr}"
    );
}
