//! Binary upgrade (`acgi-bridge upgrade`, SIGUSR2): a new bridge process takes over the
//! listening sockets, the old one drains and exits, and callers see no failure.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::{ErrorCode, Kind};
use acgi_loadgen::closed_loop::{self, Plan};
use acgi_loadgen::mix::{PayloadKind, Weighted};
use acgi_loadgen::workload::Workload;

use crate::common::{bridge, bridge_exe, read_frame, Bridge, ServiceSpec};

/// A bridge started by an upgrade: a child of this test process (the old bridge started it
/// with CLONE_PARENT), stopped and reaped when dropped.
pub(crate) struct Successor {
    pid: i32,
    reaped: bool,
}

impl Successor {
    fn alive(&self) -> bool {
        // SAFETY: kill(pid, 0) only checks; the pid is our unreaped child.
        !self.reaped && unsafe { libc::kill(self.pid, 0) } == 0
    }

    /// SIGTERM, then wait for its exit (bounded); its exit status.
    pub(crate) fn stop(&mut self) -> i32 {
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        self.wait(Duration::from_secs(30))
            .expect("the new bridge exits after SIGTERM")
    }

    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, WNOHANG.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                self.reaped = true;
                return Some(status);
            }
            assert!(
                rc == 0,
                "waitpid({}): {}",
                self.pid,
                std::io::Error::last_os_error()
            );
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if !self.reaped && self.wait(Duration::ZERO).is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
            if self.wait(Duration::from_secs(10)).is_none() {
                // SAFETY: as above.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                let _ = self.wait(Duration::from_secs(10));
            }
        }
    }
}

/// Run `acgi-bridge upgrade --admin SOCKET`: its exit success, stdout and stderr.
fn upgrade_command(admin: &Path) -> (bool, String, String) {
    let output = Command::new(bridge_exe())
        .arg("upgrade")
        .arg("--admin")
        .arg(admin)
        .output()
        .expect("run acgi-bridge upgrade");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Upgrade through the admin socket and return the new bridge.
pub(crate) fn upgrade(admin: &Path) -> Successor {
    let (ok, stdout, stderr) = upgrade_command(admin);
    assert!(ok, "upgrade failed: {stdout}{stderr}");
    let pid = stdout
        .strip_prefix("upgraded: pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {stdout:?}"));
    Successor { pid, reaped: false }
}

/// The parent pid of `pid`, from /proc.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(") ").expect("stat format");
    rest.split_whitespace()
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("a pid")
}

fn echo_bridge() -> Bridge {
    bridge().service(ServiceSpec::echo().workers(2, 4)).start()
}

#[test]
fn an_upgrade_under_load_fails_no_request() {
    // Proves the whole upgrade: under a running closed-loop load with byte-checked replies,
    // two upgrades in a row (the admin command, then SIGUSR2 to the new bridge) fail no
    // request; each old bridge exits 0, and the last new one serves.
    let mut bridge = echo_bridge();
    let old_pid = bridge.pid();
    let plan = Plan {
        workload: upgrade_workload(&bridge.unix, Duration::from_secs(4)),
        connections: 4,
        depth: 4,
        batch: false,
    };
    let load = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime
            .block_on(closed_loop::run(&plan))
            .expect("the load ran")
    });
    bridge.wait_status("load flowing", |s| s.counters.requests_ok > 200);

    let mut first = upgrade(&bridge.admin);
    assert_ne!(first.pid, old_pid);
    assert_ne!(
        parent_of(first.pid),
        old_pid,
        "the new bridge must not be the old one's child"
    );
    let status = bridge
        .wait_exit(Duration::from_secs(30))
        .expect("the old bridge exits once drained");
    assert!(status.success(), "the old bridge exited with {status}");

    // The second upgrade: SIGUSR2 to the bridge that now serves.
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(first.pid, libc::SIGUSR2) };
    let needle = "new_pid=";
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let log = bridge.log();
        let pids: Vec<i32> = log
            .match_indices(needle)
            .filter_map(|(at, _)| {
                log[at + needle.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|pid| pid.parse().ok())
            })
            .collect();
        if let Some(&pid) = pids.iter().find(|&&pid| pid != first.pid) {
            break Successor { pid, reaped: false };
        }
        assert!(
            Instant::now() < deadline,
            "SIGUSR2 started no new bridge:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut second = second;
    let status = first
        .wait(Duration::from_secs(30))
        .expect("the first new bridge exits once drained");
    assert_eq!(status, 0, "it exited with status {status:#x}");

    let outcome = load.join().expect("the load thread");
    assert_no_request_failed_across_upgrades(&outcome.recorder);

    assert!(second.alive());
    let mut client = BlockingClient::connect(&bridge.unix).expect("connect after the upgrades");
    assert_eq!(client.call("echo", b"after").unwrap(), b"after");
    assert_eq!(second.stop(), 0);
}

#[test]
fn an_upgrade_to_a_bad_config_is_refused_and_the_old_bridge_serves_on() {
    // Proves a new bridge that cannot load its config reports why and exits, and the running
    // one keeps serving (its connections and new ones).
    let mut bridge = echo_bridge();
    let mut client = bridge.client();
    assert_eq!(client.call("echo", b"before").unwrap(), b"before");
    let config = bridge.dir.join("bridge.toml");
    let good = std::fs::read_to_string(&config).expect("the config");
    std::fs::write(&config, format!("{good}\nno_such_key = 1\n")).expect("a bad config");

    let (ok, stdout, stderr) = upgrade_command(&bridge.admin);
    assert!(!ok, "a bad config was accepted: {stdout}");
    assert!(
        stderr.contains("refused to start: config error") && stderr.contains("no_such_key"),
        "the refusal does not say why: {stderr}"
    );
    let log = bridge.wait_log("upgrade failed, this bridge keeps serving");
    assert!(log.contains("no_such_key"), "{log}");
    assert!(
        bridge.wait_exit(Duration::ZERO).is_none(),
        "the old bridge stopped"
    );
    assert_eq!(client.call("echo", b"still").unwrap(), b"still");
    assert_eq!(bridge.client().call("echo", b"new").unwrap(), b"new");
    assert_eq!(client.drain_retries(), 0);

    // With the config fixed, the same bridge upgrades.
    std::fs::write(&config, good).expect("the config again");
    let mut successor = upgrade(&bridge.admin);
    assert!(bridge.wait_exit(Duration::from_secs(30)).is_some());
    assert_eq!(successor.stop(), 0);
}

#[test]
fn after_an_upgrade_the_socket_files_stay_and_idle_callers_get_the_drain_notice() {
    // Proves the drain on the wire and the socket files' fate: an idle connection to the old
    // bridge gets Error 6 with request id 0 and then EOF; a blocking client resends its call
    // to the new bridge by itself; the socket files survive the old bridge's exit and are
    // served by the new one, which removes them at its own stop.
    let mut bridge = echo_bridge();
    let mut idle = std::os::unix::net::UnixStream::connect(&bridge.unix).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut client = bridge.client();
    assert_eq!(client.call("echo", b"one").unwrap(), b"one");

    let mut successor = upgrade(&bridge.admin);
    let (header, message) = read_frame(&mut idle);
    assert_eq!(header.kind, Kind::Error);
    assert_eq!(header.code, ErrorCode::ShuttingDown as u16);
    assert_eq!(header.request_id, 0, "the drain notice names no request");
    assert!(String::from_utf8_lossy(&message).contains("draining"));
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut idle, &mut rest);
    assert!(rest.is_empty(), "nothing follows the notice: {rest:?}");

    assert!(bridge.wait_exit(Duration::from_secs(30)).is_some());
    let socket = std::fs::symlink_metadata(&bridge.unix).expect("the caller socket file stays");
    assert!(socket.file_type().is_socket());
    assert!(
        std::fs::symlink_metadata(&bridge.admin).is_ok(),
        "the admin socket stays"
    );
    // The client's connection was drained: the call goes to the new bridge on a new one.
    assert_eq!(client.call("echo", b"two").unwrap(), b"two");
    assert_eq!(client.drain_retries(), 1);
    assert!(
        bridge.status().counters.requests_ok >= 1,
        "the new bridge answers status"
    );

    assert_eq!(successor.stop(), 0);
    assert!(
        std::fs::symlink_metadata(&bridge.unix).is_err(),
        "the new bridge removes the socket file it took over at its stop"
    );
}

#[test]
fn an_upgrade_under_batched_load_fails_no_request() {
    // Proves `acgi-loadgen --batch` meets a draining bridge as the client SDK does: under a
    // batched closed loop (many requests in flight per connection, byte-checked replies) an
    // upgrade fails no request, and the load says it resent what the old bridge did not run.
    let mut bridge = echo_bridge();
    let plan = Plan {
        workload: upgrade_workload(&bridge.unix, Duration::from_secs(3)),
        connections: 4,
        depth: 8,
        batch: true,
    };
    let load = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime
            .block_on(closed_loop::run(&plan))
            .expect("the load ran")
    });
    bridge.wait_status("load flowing", |s| s.counters.requests_ok > 200);

    let mut successor = upgrade(&bridge.admin);
    let status = bridge
        .wait_exit(Duration::from_secs(30))
        .expect("the old bridge exits once drained");
    assert!(status.success(), "the old bridge exited with {status}");

    let outcome = load.join().expect("the load thread");
    assert_no_request_failed_across_upgrades(&outcome.recorder);
    assert_eq!(successor.stop(), 0);
}

#[test]
fn a_takeover_fd_given_by_hand_is_refused_with_the_reason() {
    // Proves `--takeover-fd` adopts only an open takeover channel: a number that is not open,
    // stdio, and an open descriptor of another kind are each refused (exit 64) with a message
    // naming the number, before the bridge binds anything.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("bridge.toml");
    std::fs::write(&config, "[listen]\nunix = \"bridge.sock\"\n").expect("write the config");
    let serve = |fd: &str| {
        // fd 7 is opened on /dev/null by the shell, then kept across exec.
        let script =
            format!("exec 7</dev/null; exec \"$0\" serve --config \"$1\" --takeover-fd {fd}");
        Command::new("sh")
            .args(["-c", &script, bridge_exe()])
            .arg(&config)
            .output()
            .expect("run the bridge")
    };
    for (fd, says) in [
        ("999", "--takeover-fd 999 is not an open descriptor"),
        ("1", "--takeover-fd 1 is not an open descriptor"),
        ("7", "--takeover-fd 7"),
    ] {
        let output = serve(fd);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "fd {fd}: {stderr}");
        assert!(stderr.contains(says), "fd {fd}: {stderr}");
        assert!(
            stderr.contains("set by a running bridge's upgrade"),
            "fd {fd}: {stderr}"
        );
        assert!(!dir.path().join("bridge.sock").exists(), "fd {fd}: bound");
    }
}

/// The load across one or more upgrades: no request failed or came back wrong, it was real
/// load (over 1 000 requests), and it met a draining bridge (so the upgrades were under load).
fn assert_no_request_failed_across_upgrades(recorder: &acgi_loadgen::stats::Recorder) {
    assert_eq!(
        recorder.errors_total(),
        0,
        "failed requests across the upgrades: {:?}",
        recorder.errors_by_label()
    );
    assert_eq!(
        recorder.mismatches(),
        0,
        "a reply differed from its request"
    );
    assert_eq!(recorder.warmup_errors(), 0);
    assert_eq!(recorder.tasks_stopped_early(), 0);
    assert!(
        recorder.requests_ok() > 1000,
        "{} requests",
        recorder.requests_ok()
    );
    assert!(
        recorder.drain_retries() > 0,
        "the load never met a draining bridge (the upgrades were not under load)"
    );
}

/// The load the upgrade tests run: echo, mostly 256 B with one request in five of 100 000 B
/// (larger than the slot), no warm-up, for `duration`.
fn upgrade_workload(unix: &str, duration: Duration) -> Workload {
    let mut workload = Workload::simple(unix, "echo", PayloadKind::Bytes(256));
    workload.payloads = Weighted::new(vec![
        (PayloadKind::Bytes(256), 4),
        (PayloadKind::Bytes(100_000), 1),
    ])
    .expect("a payload mix");
    workload.warmup = Duration::ZERO;
    workload.duration = duration;
    workload
}
