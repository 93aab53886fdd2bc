//! The admin commands (`pause`, `resume`, `drain`, `recycle`, `kill-worker`, `set`), status's
//! per-worker rows, and `check`'s runtime failures, each through the real binary's command
//! line against a real bridge and real workers.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use acgi_bridge::client::{BlockingClient, CallError};
use acgi_bridge::proto::Kind;

use crate::common::{bridge, bridge_exe, example, tagged_payload, Bridge, ServiceSpec};

/// Run `acgi-bridge ARGS... --admin SOCKET`.
fn admin_cli(bridge: &Bridge, args: &[&str]) -> Output {
    Command::new(bridge_exe())
        .args(args)
        .arg("--admin")
        .arg(&bridge.admin)
        .output()
        .expect("run acgi-bridge")
}

/// An admin command that must work: its one line of output.
fn admin_ok(bridge: &Bridge, args: &[&str]) -> String {
    let output = admin_cli(bridge, args);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{args:?}: {:?}, stdout {stdout:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    stdout
}

/// An admin command that must fail: its stderr.
fn admin_err(bridge: &Bridge, args: &[&str]) -> String {
    let output = admin_cli(bridge, args);
    assert!(!output.status.success(), "{args:?} succeeded: {output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// The pids of the service's workers that serve (not stopping or dead), from status's rows.
fn serving_pids(bridge: &Bridge, service: &str) -> HashSet<i32> {
    bridge
        .service_status(service)
        .workers
        .iter()
        .filter(|w| {
            matches!(
                w.state.as_str(),
                "idle" | "busy" | "starting" | "lending its slot"
            )
        })
        .map(|w| w.pid)
        .collect()
}

#[test]
fn pause_holds_requests_in_the_backlog_and_resume_runs_them() {
    // Proves that while paused, requests wait (status shows them and the oldest one's age)
    // and none is answered, and that after resume each gets its own reply, byte for byte.
    let bridge = bridge().service(ServiceSpec::echo().workers(2, 4)).start();
    bridge.wait_status("two idle workers", |s| s.services[0].workers_idle == 2);
    let paused = admin_ok(&bridge, &["pause", "echo"]);
    assert!(
        paused.starts_with("service echo: paused (was open)"),
        "{paused}"
    );
    assert_eq!(bridge.service_status("echo").state, "paused");
    let mut client = bridge.client();
    let mut sent = HashMap::new();
    for tag in 0..20 {
        let payload = tagged_payload(tag, 100 + tag as usize * 37);
        sent.insert(client.send(1, &payload).unwrap(), payload);
    }
    let status = bridge.wait_status("20 waiting", |s| s.services[0].backlog == 20);
    let echo = &status.services[0];
    assert_eq!(echo.requests_ok, 0, "nothing ran while paused");
    assert!(echo.oldest_waiting_ms.is_some(), "{echo:#?}");
    assert_eq!(echo.workers_busy, 0);
    let text = Command::new(bridge_exe())
        .args(["status", "--admin"])
        .arg(&bridge.admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("service echo (id 1): dynamic mode, paused"),
        "{text}"
    );
    assert!(text.contains("oldest waiting"), "{text}");
    let resumed = admin_ok(&bridge, &["resume", "echo"]);
    assert!(
        resumed.starts_with("service echo: resumed (was paused)"),
        "{resumed}"
    );
    for _ in 0..sent.len() {
        let answer = client.receive().unwrap();
        assert_eq!(answer.header.kind, Kind::Reply);
        let expected = sent
            .remove(&answer.header.request_id)
            .expect("its own reply");
        assert!(
            answer.payload == expected,
            "request {}",
            answer.header.request_id
        );
    }
    assert_eq!(bridge.service_status("echo").state, "ok");
}

#[test]
fn drain_finishes_what_runs_refuses_new_requests_and_stops_the_workers() {
    // Proves drain lets a running request finish, refuses new ones with service unavailable
    // (a message naming the drain), stops every worker process, and that resume brings the
    // pool back.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(2, 2))
        .start();
    bridge.wait_status("two idle workers", |s| s.services[0].workers_idle == 2);
    let old = serving_pids(&bridge, "faulty");
    let mut running = bridge.client();
    let id = running.send(3, b"sleep 300").unwrap();
    bridge.wait_status("one busy", |s| s.services[0].workers_busy == 1);
    let drained = admin_ok(&bridge, &["drain", "faulty"]);
    assert!(
        drained.starts_with("service faulty: draining (was open): 1 busy"),
        "{drained}"
    );
    match bridge.client().call("faulty", b"echo late") {
        Err(CallError::Remote { code: 9, message }) => {
            assert!(message.contains("acgi-bridge drain"), "{message}")
        }
        other => panic!("a new request during a drain: {other:?}"),
    }
    let answer = running.receive().unwrap();
    assert_eq!(
        (answer.header.request_id, &answer.payload[..]),
        (id, &b"slept"[..])
    );
    let status = bridge.wait_status("drained", |s| s.services[0].state == "drained");
    assert!(status.services[0].workers.is_empty(), "{status:#?}");
    let alive: Vec<i32> = bridge
        .children()
        .into_iter()
        .filter(|(pid, state)| old.contains(pid) && *state != 'Z')
        .map(|(pid, _)| pid)
        .collect();
    assert!(alive.is_empty(), "workers still running: {alive:?}");
    assert_eq!(status.services[0].exits_crashed, 0);
    admin_ok(&bridge, &["resume", "faulty"]);
    assert_eq!(
        bridge.client().call("faulty", b"echo back").unwrap(),
        b"back"
    );
}

#[test]
fn recycle_replaces_every_worker_without_failing_a_request() {
    // Proves a rolling restart under concurrent callers replaces every pid the pool had,
    // counts them as recycled (not crashed), and that not one request fails or gets another's
    // reply.
    // Static, so that load cannot grow the pool: the workers to replace are the three known.
    let echo = ServiceSpec::echo().static_pool(3);
    let bridge = bridge().service(echo).start();
    bridge.wait_status("three idle workers", |s| s.services[0].workers_idle == 3);
    let old = serving_pids(&bridge, "echo");
    assert_eq!(old.len(), 3);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..4u64)
        .map(|thread| {
            let (addr, stop, calls) = (bridge.unix.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut client = BlockingClient::connect(&addr).unwrap();
                let mut tag = thread << 32;
                while !stop.load(Ordering::Relaxed) {
                    tag += 1;
                    let payload = tagged_payload(tag, 64 + (tag % 500) as usize);
                    let reply = client.call(1u32, &payload).expect("no request fails");
                    assert!(reply == payload, "the reply to {tag} is not its own");
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    bridge.wait_status("calls flowing", |s| s.services[0].requests_ok > 100);
    let recycling = admin_ok(&bridge, &["recycle", "echo"]);
    assert!(
        recycling.starts_with("service echo: recycling 3 workers"),
        "{recycling}"
    );
    let status = bridge.wait_status("every old worker replaced", |s| {
        let pids: HashSet<i32> = s.services[0].workers.iter().map(|w| w.pid).collect();
        s.services[0].exits_recycled >= 3 && pids.is_disjoint(&old)
    });
    let before = calls.load(Ordering::Relaxed);
    bridge.wait_status("calls still flowing", |s| {
        s.services[0].requests_ok > before + 100
    });
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.join().expect("a caller failed");
    }
    let echo = &bridge.service_status("echo");
    assert_eq!(echo.exits_crashed, 0, "{status:#?}");
    assert!(
        echo.requests_failed.is_empty(),
        "{:?}",
        echo.requests_failed
    );
    assert_eq!(echo.state, "ok");
}

#[test]
fn kill_worker_fails_its_request_and_is_not_a_crash() {
    // Proves kill-worker SIGKILLs that worker, its caller gets worker failed (code 4), status
    // counts an admin kill and no crash, the breaker does not trip even at crash_limit 1, the
    // pool replaces the worker, and an unknown pid is an error.
    let mut faulty = ServiceSpec::faulty().workers(1, 1);
    faulty.extra = "crash_limit = 1\n".into();
    let bridge = bridge().service(faulty).start();
    bridge.wait_status("one idle worker", |s| s.services[0].workers_idle == 1);
    let mut client = bridge.client();
    client.send(3, b"hang").unwrap();
    let status = bridge.wait_status("a busy worker", |s| {
        s.services[0].workers.iter().any(|w| w.state == "busy")
    });
    let row = status.services[0]
        .workers
        .iter()
        .find(|w| w.state == "busy")
        .expect("waited for");
    assert!(row.current_request_ms.is_some(), "{row:?}");
    let pid = row.pid;
    let killed = admin_ok(&bridge, &["kill-worker", &pid.to_string()]);
    assert!(
        killed.starts_with(&format!("killed worker {pid} of service faulty")),
        "{killed}"
    );
    let answer = client.receive().unwrap();
    assert_eq!(answer.header.kind, Kind::Error);
    assert_eq!(answer.header.code, 4, "worker failed");
    let message = String::from_utf8_lossy(&answer.payload).to_string();
    assert!(message.contains("kill-worker"), "{message}");
    let status = bridge.wait_status("the kill counted and a new worker up", |s| {
        s.services[0].exits_admin_killed == 1 && s.services[0].workers_idle == 1
    });
    let faulty = &status.services[0];
    assert_eq!((faulty.exits_crashed, faulty.failed_starts), (0, 0));
    assert_eq!(faulty.state, "ok", "the breaker did not trip");
    assert!(!faulty.pids.contains(&pid));
    assert_eq!(
        bridge.client().call("faulty", b"echo fine").unwrap(),
        b"fine"
    );
    let error = admin_err(&bridge, &["kill-worker", &pid.to_string()]);
    assert!(
        error.contains(&format!("no worker has pid {pid}")),
        "{error}"
    );
}

#[test]
fn set_changes_the_pool_limits_live() {
    // Proves set changes min/max_workers and backlog_max live (status shows them; the worker
    // processes follow, down and up), and refuses what the config would refuse.
    let bridge = bridge().service(ServiceSpec::echo().workers(4, 4)).start();
    bridge.wait_status("four workers", |s| s.services[0].workers_idle == 4);
    let workers_running = |bridge: &Bridge| {
        let pids = serving_pids(bridge, "echo");
        bridge
            .children()
            .into_iter()
            .filter(|(pid, state)| pids.contains(pid) && *state != 'Z')
            .count()
    };
    let set = admin_ok(
        &bridge,
        &[
            "set",
            "echo",
            "min_workers=2",
            "max_workers=2",
            "backlog_max=7",
        ],
    );
    assert!(
        set.starts_with("service echo: min_workers=2 max_workers=2 backlog_max=7"),
        "{set}"
    );
    let status = bridge.wait_status("two workers", |s| {
        let echo = &s.services[0];
        echo.workers.len() == 2 && echo.workers_idle == 2
    });
    let echo = &status.services[0];
    assert_eq!(
        (echo.min_workers, echo.max_workers, echo.backlog_max),
        (2, 2, 7)
    );
    assert_eq!(workers_running(&bridge), 2);
    admin_ok(&bridge, &["set", "echo", "max_workers=6", "min_workers=5"]);
    bridge.wait_status("five workers", |s| s.services[0].workers_idle == 5);
    assert_eq!(workers_running(&bridge), 5);
    assert_eq!(bridge.service_status("echo").max_workers, 6);
    let error = admin_err(&bridge, &["set", "echo", "min_workers=9"]);
    assert!(
        error.contains("service[0].min_workers: 9 is over max_workers (6)"),
        "{error}"
    );
    let error = admin_err(&bridge, &["set", "echo", "idle_timeout_ms=5"]);
    assert!(error.contains("cannot be set live"), "{error}");
    assert_eq!(bridge.client().call("echo", b"still").unwrap(), b"still");
}

#[test]
fn status_has_a_row_per_worker_with_its_memory_and_cpu() {
    // Proves each worker has a row (pid, state, requests served, RSS and CPU from /proc) in
    // status --json and in the table, and that the rows add up to the service's counts.
    let bridge = bridge().service(ServiceSpec::echo().workers(2, 2)).start();
    bridge.wait_status("two idle workers", |s| s.services[0].workers_idle == 2);
    let mut client = bridge.client();
    for i in 0..25 {
        let payload = format!("call {i}");
        assert_eq!(
            client.call("echo", payload.as_bytes()).unwrap(),
            payload.as_bytes()
        );
    }
    let output = Command::new(bridge_exe())
        .args(["status", "--json", "--admin"])
        .arg(&bridge.admin)
        .output()
        .unwrap();
    let status: acgi_bridge::status::Status = serde_json::from_slice(&output.stdout).unwrap();
    let echo = &status.services[0];
    assert_eq!(echo.workers.len(), 2, "{echo:#?}");
    let mut pids: Vec<i32> = echo.workers.iter().map(|w| w.pid).collect();
    let mut listed = echo.pids.clone();
    pids.sort();
    listed.sort();
    assert_eq!(pids, listed);
    assert_eq!(
        echo.workers.iter().map(|w| w.requests_served).sum::<u64>(),
        25
    );
    for row in &echo.workers {
        assert_eq!(row.state, "idle");
        assert_eq!(row.current_request_ms, None);
        assert!(row.rss_bytes.is_some_and(|b| b > 0), "{row:?}");
        assert!(row.cpu_ms.is_some(), "{row:?}");
    }
    let text = Command::new(bridge_exe())
        .args(["status", "--admin"])
        .arg(&bridge.admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("pid") && text.contains("served") && text.contains("MiB"),
        "{text}"
    );
    for pid in pids {
        assert!(text.contains(&pid.to_string()), "{pid}: {text}");
    }
}

#[test]
fn admin_commands_are_refused_to_other_users() {
    // Proves an admin command from a user who is neither root nor the bridge's gets no answer
    // and changes nothing, even when the socket's mode lets it connect.
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: cannot run the client as another user; skipping");
        return;
    }
    let bridge = bridge()
        .public_socket()
        .top("admin_socket_mode = \"0666\"")
        .service(ServiceSpec::echo())
        .start();
    // state_dir, where the admin socket is, is created 0700: open it up so that only the
    // socket's mode and the peer check stand between the other user and the bridge.
    crate::common::open_dir(bridge.admin.parent().unwrap());
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bridge_exe())
        .args(["pause", "echo", "--admin"])
        .arg(&bridge.admin)
        .output()
        .expect("run setpriv");
    assert!(!output.status.success(), "{output:?}");
    // wait_log asserts the line comes.
    bridge.wait_log("refusing an admin connection from another user");
    assert_eq!(bridge.service_status("echo").state, "ok");
}

/// A config for `check`, in `dir`, with these lines before `[listen]` and `listen` lines.
fn check_config(dir: &Path, top: &str, listen: &str) -> std::path::PathBuf {
    let path = dir.join("check.toml");
    let text = format!(
        "state_dir = {:?}\n{top}\n[listen]\n{listen}\n[[service]]\nid = 1\nname = \"echo\"\n\
         exec = {:?}\n",
        dir.join("state").display().to_string(),
        example("echo").display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn check(config: &Path, extra: &[&str]) -> Output {
    Command::new(bridge_exe())
        .args(["check", "-c"])
        .arg(config)
        .args(extra)
        .output()
        .expect("run acgi-bridge check")
}

#[test]
fn check_catches_what_would_fail_at_startup() {
    // Proves check says "1 service", prints an effective config that checks clean again, and
    // names each runtime failure: a socket path over sun_path, a state_dir that cannot be
    // created, a TCP port in use (the metrics port too).
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let unix = format!("unix = {:?}", dir.join("b.sock").display().to_string());
    let good = check_config(dir, "", &unix);
    let output = check(&good, &[]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).ends_with(": ok (1 service)\n"));

    let printed = check(&good, &["--print"]);
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8_lossy(&printed.stdout).to_string();
    assert!(text.contains("max_workers = 8") && text.contains("# metrics_listen: not set"));
    let again = dir.join("printed.toml");
    std::fs::write(&again, &text).unwrap();
    assert!(
        check(&again, &[]).status.success(),
        "the printed config checks:\n{text}"
    );

    let failures = |config: &Path| {
        let output = check(config, &[]);
        assert_eq!(output.status.code(), Some(78), "{output:?}");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let long = format!(
        "unix = {:?}",
        format!("{}/{}", dir.display(), "s".repeat(110))
    );
    let stderr = failures(&check_config(dir, "", &long));
    assert!(
        stderr.contains("listen.unix: ") && stderr.contains("sun_path"),
        "{stderr}"
    );

    std::fs::write(dir.join("a-file"), b"").unwrap();
    let state = format!(
        "state_dir = {:?}",
        dir.join("a-file/state").display().to_string()
    );
    let path = check_config(dir, "", &unix);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = format!("{state}\n{}", text.split_once('\n').unwrap().1);
    std::fs::write(&path, text).unwrap();
    let stderr = failures(&path);
    assert!(
        stderr.contains("state_dir: ") && stderr.contains("cannot be created"),
        "{stderr}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tcp = format!("{unix}\ntcp = \"127.0.0.1:{port}\"");
    let metrics = format!("metrics_listen = \"127.0.0.1:{port}\"");
    let stderr = failures(&check_config(dir, &metrics, &tcp));
    assert!(
        stderr.contains(&format!("listen.tcp: 127.0.0.1:{port} is in use"))
            && stderr.contains(&format!("metrics_listen: 127.0.0.1:{port} is in use")),
        "{stderr}"
    );
    drop(taken);
    assert!(check(&check_config(dir, &metrics, &tcp), &[])
        .status
        .success());
}

#[test]
fn check_says_when_the_state_dir_cannot_be_written() {
    // Proves a state_dir the checking user cannot write is named (as an unprivileged user:
    // root may write anywhere).
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root: cannot run check as another user; skipping");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.join("state")).unwrap();
    let config = check_config(dir, "", "tcp = \"127.0.0.1:0\"");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bridge_exe())
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run setpriv");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{output:?}");
    assert!(
        stderr.contains("state_dir: ") && stderr.contains("cannot be written"),
        "{stderr}"
    );
}
