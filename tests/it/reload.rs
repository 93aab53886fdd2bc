//! Configuration reload (SIGHUP, `acgi-bridge reload`) against the real bridge: services added,
//! replaced blue/green and removed under a running `acgi-loadgen` with byte-checked replies and
//! not one failed request; a bad config refused while the running one serves; new workers that
//! do not come up abort the reload and leave the old ones serving; live and restart-only keys.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{self, Bridge, BridgeBuilder, ServiceSpec};

/// How long a reload may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// `acgi-bridge reload --admin ...`: its exit success and its one-line answer.
pub(crate) fn reload(bridge: &Bridge) -> (bool, String) {
    let output: Output = Command::new(common::bridge_exe())
        .arg("reload")
        .arg("--admin")
        .arg(&bridge.admin)
        .output()
        .expect("run acgi-bridge reload");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Write `builder`'s config over the running bridge's config file.
fn rewrite(bridge: &Bridge, builder: &BridgeBuilder) {
    std::fs::write(config_path(bridge), builder.config_text(&bridge.dir)).expect("write config");
}

fn config_path(bridge: &Bridge) -> PathBuf {
    bridge.dir.join("bridge.toml")
}

/// The workers' pids of a service, from status.
fn pids(bridge: &Bridge, service: &str) -> HashSet<i32> {
    bridge.service_status(service).pids.into_iter().collect()
}

/// The pids of a service's workers once `count` are up and none is starting or stopping.
fn settled_pids(bridge: &Bridge, service: &str, count: u32) -> HashSet<i32> {
    wait_for(bridge, "the workers to settle", |b| {
        let s = b.service_status(service);
        s.workers_idle + s.workers_busy == count
            && s.workers_starting == 0
            && s.workers_stopping == 0
            && s.pids.len() == count as usize
    });
    pids(bridge, service)
}

/// The load generator (built by `cargo test --workspace`, or here if it is missing).
fn loadgen() -> PathBuf {
    let dir = Path::new(common::bridge_exe())
        .parent()
        .expect("target dir");
    let path = dir.join("acgi-loadgen");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "acgi-loadgen"])
            .status()
            .expect("cargo build -p acgi-loadgen");
        assert!(status.success(), "building acgi-loadgen failed");
    }
    path
}

/// Start `acgi-loadgen` on `service` for `seconds`, replies byte-checked, JSON result.
fn start_load(bridge: &Bridge, service: &str, seconds: u32) -> std::process::Child {
    Command::new(loadgen())
        .args(["--connect", &bridge.unix, "--service", service])
        .args([
            "--connections",
            "4",
            "--depth",
            "8",
            "--warmup-s",
            "0",
            "--verify",
        ])
        .args(["--duration-s", &seconds.to_string(), "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start acgi-loadgen")
}

/// The loadgen run's (requests completed, errors, mismatches), asserting it exited.
fn load_result(child: std::process::Child) -> (u64, u64, u64, String) {
    let output = child.wait_with_output().expect("acgi-loadgen ran");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let json: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("loadgen printed no JSON ({e}): {text}"));
    let field = |name: &str| json[name].as_u64().unwrap_or(u64::MAX);
    (
        field("requests_completed"),
        field("errors_total"),
        field("verify_mismatches"),
        text,
    )
}

fn echo_call(bridge: &Bridge, service: &str, payload: &[u8]) -> Vec<u8> {
    let mut client = bridge.client();
    client
        .call(service, payload)
        .unwrap_or_else(|e| panic!("call {service}: {e}"))
}

/// Wait until the status shows `want`.
fn wait_for(bridge: &Bridge, what: &str, want: impl Fn(&Bridge) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !want(bridge) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_under_load_adds_replaces_and_removes_services_without_a_failed_request() {
    let echo = ServiceSpec::echo().workers(2, 4);
    let kv = ServiceSpec::kv().workers(1, 2);
    let bridge = common::bridge().service(echo.clone()).service(kv).start();
    let old_echo = settled_pids(&bridge, "echo", 2);
    let load = start_load(&bridge, "echo", 4);
    // Let the load reach the bridge before the reload (its own connections, nothing shared).
    wait_for(&bridge, "requests under load", |b| {
        b.service_status("echo").requests_ok > 100
    });
    // echo replaced (the same worker started through a shell that waits 300 ms first: new
    // workers, blue/green, so the old ones must carry the load meanwhile), kv removed, echo2
    // added.
    let start_slowly = format!("sleep 0.3; exec {}", common::example("echo").display());
    let new_echo = ServiceSpec::new(1, "echo", PathBuf::from("/bin/sh"))
        .args(&["-c", &start_slowly])
        .workers(2, 4);
    let echo2 = ServiceSpec::new(7, "echo2", common::example("echo")).workers(1, 2);
    let new = common::bridge().service(new_echo).service(echo2);
    rewrite(&bridge, &new);
    let (ok, answer) = reload(&bridge);
    assert!(ok, "reload failed: {answer}");
    assert!(answer.contains("replaced echo"), "{answer}");
    assert!(answer.contains("started echo2"), "{answer}");
    assert!(answer.contains("removed kv"), "{answer}");
    // It waited for the new workers (300 ms to start) before they took over.
    let took: u64 = answer
        .split("reloaded in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {answer}"));
    assert!(
        took >= 250,
        "took over after {took} ms, before its workers were up"
    );
    let (completed, errors, mismatches, text) = load_result(load);
    assert_eq!(errors, 0, "failed requests across the reload: {text}");
    assert_eq!(
        mismatches, 0,
        "replies that were not their request's: {text}"
    );
    assert!(completed > 1000, "the load ran: {text}");
    // The new config is in effect: echo's workers are all new, echo2 serves, kv is gone.
    let now_echo = pids(&bridge, "echo");
    assert!(
        now_echo.is_disjoint(&old_echo),
        "old {old_echo:?} now {now_echo:?}"
    );
    assert_eq!(echo_call(&bridge, "echo", b"new ones"), b"new ones");
    assert_eq!(echo_call(&bridge, "echo2", b"hello"), b"hello");
    let status = bridge.status();
    assert!(status.services.iter().all(|s| s.name != "kv"));
    assert_eq!(status.counters.reloads, 1);
    let mut client = bridge.client();
    let error = client.call("kv", b"x").unwrap_err();
    assert!(error.to_string().contains("unknown"), "{error}");
    // The retired workers are gone (reaped), not left behind.
    wait_for(&bridge, "the old echo workers to exit", |b| {
        let children: HashSet<i32> = b.children().into_iter().map(|(pid, _)| pid).collect();
        children.is_disjoint(&old_echo)
    });
    bridge.assert_no_zombies();
    bridge.wait_log("the retired workers of a reloaded service have all finished");
    // The retired slots fold into the live one: echo's counts and latencies since start go on
    // from before the reload (nothing dropped with the old slots' memory).
    wait_for(&bridge, "the counts to include every request", |b| {
        let echo = b.service_status("echo");
        echo.requests_ok > completed && echo.latency_since_start.total.count > completed
    });
    let metrics_like = bridge.service_status("echo");
    assert!(
        metrics_like.spawns >= 4,
        "spawns of both slots: {}",
        metrics_like.spawns
    );
}

#[test]
fn kill_worker_names_the_service_of_a_worker_started_by_a_reload() {
    // Proves admin commands name a worker's service by id, not by its core's slot number:
    // after a reload replaced echo (its new workers in slot 1, while the config has one
    // service), `kill-worker` of a new worker says `service echo` and the bridge serves on.
    // Before, the control thread read slot 1 as the config's index and panicked.
    let bridge = common::bridge()
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    settled_pids(&bridge, "echo", 1);
    let replaced = ServiceSpec::new(1, "echo", PathBuf::from("/bin/sh"))
        .args(&["-c", &format!("exec {}", common::example("echo").display())])
        .workers(1, 1);
    rewrite(&bridge, &common::bridge().service(replaced));
    let (ok, answer) = reload(&bridge);
    assert!(ok && answer.contains("replaced echo"), "{answer}");
    let pid = *settled_pids(&bridge, "echo", 1)
        .iter()
        .next()
        .expect("one worker");
    let output = Command::new(common::bridge_exe())
        .args(["kill-worker", "--admin"])
        .arg(&bridge.admin)
        .arg(pid.to_string())
        .output()
        .expect("run acgi-bridge kill-worker");
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.starts_with(&format!("killed worker {pid} of service echo")),
        "{said}"
    );
    assert_eq!(echo_call(&bridge, "echo", b"after"), b"after");
    assert!(bridge.status().counters.reloads == 1);
}

#[test]
fn a_bad_config_is_refused_and_the_running_one_keeps_serving() {
    let bridge = common::bridge()
        .service(ServiceSpec::echo().static_pool(1))
        .start();
    let before = settled_pids(&bridge, "echo", 1);
    let good = std::fs::read_to_string(config_path(&bridge)).unwrap();
    std::fs::write(
        config_path(&bridge),
        good.replace("max_workers = 1", "max_workers = 0"),
    )
    .unwrap();
    let (ok, answer) = reload(&bridge);
    assert!(!ok, "a bad config was accepted: {answer}");
    assert!(answer.contains("reload refused"), "{answer}");
    assert!(answer.contains("max_workers"), "names the key: {answer}");
    assert_eq!(echo_call(&bridge, "echo", b"still here"), b"still here");
    assert_eq!(pids(&bridge, "echo"), before, "workers untouched");
    assert_eq!(bridge.status().counters.reloads_failed, 1);
    // SIGHUP with the same bad file: logged, nothing changes, still serving.
    bridge.signal(libc::SIGHUP);
    bridge.wait_log("reload refused");
    assert_eq!(echo_call(&bridge, "echo", b"again"), b"again");
    // The file fixed: SIGHUP takes it.
    std::fs::write(
        config_path(&bridge),
        good.replace("max_workers = 1", "max_workers = 3"),
    )
    .unwrap();
    bridge.signal(libc::SIGHUP);
    bridge.wait_log("reloaded in");
    wait_for(&bridge, "max_workers 3", |b| {
        b.service_status("echo").max_workers == 3
    });
}

#[test]
fn new_workers_that_do_not_start_abort_the_reload_and_the_old_ones_serve_on() {
    let bridge = common::bridge()
        .service(ServiceSpec::echo().static_pool(2))
        .start();
    let before = settled_pids(&bridge, "echo", 2);
    // The replacement exits before its handshake: the reload must not take effect.
    let broken = ServiceSpec::new(1, "echo", common::example("faulty"))
        .args(&["--no-hello"])
        .workers(2, 4);
    rewrite(&bridge, &common::bridge().service(broken));
    let (ok, answer) = reload(&bridge);
    assert!(
        !ok,
        "a reload whose workers cannot start took effect: {answer}"
    );
    assert!(answer.contains("do not start"), "{answer}");
    assert_eq!(echo_call(&bridge, "echo", b"old ones"), b"old ones");
    assert_eq!(
        settled_pids(&bridge, "echo", 2),
        before,
        "the old workers serve on"
    );
    assert_eq!(bridge.status().counters.reloads_failed, 1);
    // The new slot's workers are stopped, not left starting.
    wait_for(&bridge, "only the old workers", |b| {
        let children: HashSet<i32> = b.children().into_iter().map(|(pid, _)| pid).collect();
        children == before
    });
}

#[test]
fn slow_new_workers_past_reload_timeout_abort_the_reload() {
    let bridge = common::bridge()
        .top("reload_timeout_ms = 300")
        .service(ServiceSpec::echo().static_pool(1))
        .start();
    let before = settled_pids(&bridge, "echo", 1);
    let slow =
        ServiceSpec::new(1, "echo", common::example("faulty")).args(&["--slow-start", "5000"]);
    let new = common::bridge()
        .top("reload_timeout_ms = 300")
        .service(slow);
    rewrite(&bridge, &new);
    let started = Instant::now();
    let (ok, answer) = reload(&bridge);
    assert!(!ok, "{answer}");
    assert!(answer.contains("reload_timeout_ms"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the timeout"
    );
    assert_eq!(echo_call(&bridge, "echo", b"x"), b"x");
    assert_eq!(settled_pids(&bridge, "echo", 1), before);
}

#[test]
fn live_keys_apply_and_restart_keys_are_named_and_kept() {
    let bridge = common::bridge()
        .service(ServiceSpec::echo().static_pool(1))
        .start();
    let before = settled_pids(&bridge, "echo", 1);
    let cores = bridge.status().cores;
    // Two connections from this uid are fine now; after the reload only one is.
    let new = common::bridge()
        .top("connections_per_uid_max = 1")
        .top("cores = 1")
        .service(ServiceSpec::echo().static_pool(1));
    rewrite(&bridge, &new);
    let (ok, answer) = reload(&bridge);
    assert!(ok, "{answer}");
    assert!(
        answer.contains("applied connections_per_uid_max"),
        "{answer}"
    );
    assert!(
        answer.contains("NOT applied until a restart") && answer.contains("cores"),
        "{answer}"
    );
    assert!(answer.contains("1 unchanged"), "{answer}");
    assert_eq!(
        pids(&bridge, "echo"),
        before,
        "an unchanged service keeps its workers"
    );
    assert_eq!(bridge.status().cores, cores, "cores need a restart: kept");
    let mut first = bridge.client();
    assert_eq!(first.call("echo", b"one").unwrap(), b"one");
    let mut second = bridge.client();
    assert!(
        second.call("echo", b"two").is_err(),
        "a second connection of this uid is refused after the reload"
    );
    // The executable replaced on disk (same path, new file): the service gets new workers.
    let copy = bridge.dir.join("echo-copy");
    std::fs::copy(common::example("echo"), &copy).unwrap();
    let echo = ServiceSpec::new(1, "echo", copy.clone()).static_pool(1);
    let new = common::bridge().service(echo);
    rewrite(&bridge, &new);
    drop(first);
    let (ok, answer) = reload(&bridge);
    assert!(ok && answer.contains("replaced echo"), "{answer}");
    let replaced = settled_pids(&bridge, "echo", 1);
    std::fs::remove_file(&copy).unwrap();
    std::fs::copy(common::example("echo"), &copy).unwrap();
    let (ok, answer) = reload(&bridge);
    assert!(ok, "{answer}");
    assert!(
        answer.contains("its executable") && answer.contains("changed"),
        "a new file at the same path replaces the workers: {answer}"
    );
    assert!(settled_pids(&bridge, "echo", 1).is_disjoint(&replaced));
}

#[test]
fn a_change_of_pool_limits_only_keeps_the_workers_and_applies_at_once() {
    let bridge = common::bridge()
        .service(ServiceSpec::echo().static_pool(2))
        .start();
    let before = settled_pids(&bridge, "echo", 2);
    let mut echo = ServiceSpec::echo().static_pool(3);
    echo.backlog_max = 50;
    rewrite(&bridge, &common::bridge().service(echo));
    let (ok, answer) = reload(&bridge);
    assert!(ok, "{answer}");
    assert!(
        answer.contains("new limits for echo (backlog_max, max_workers, min_workers)"),
        "{answer}"
    );
    let after = settled_pids(&bridge, "echo", 3);
    assert!(
        before.is_subset(&after),
        "the running workers stay: {before:?} {after:?}"
    );
    let status = bridge.service_status("echo");
    assert_eq!((status.max_workers, status.backlog_max), (3, 50));
    // Any other key replaces the service, and says which.
    let mut echo = ServiceSpec::echo().static_pool(3);
    echo.backlog_max = 50;
    echo.slot_size_bytes = 8192;
    rewrite(&bridge, &common::bridge().service(echo));
    let (ok, answer) = reload(&bridge);
    assert!(ok, "{answer}");
    assert!(
        answer.contains("replaced echo (its configuration changed: slot_size_bytes)"),
        "{answer}"
    );
    assert!(settled_pids(&bridge, "echo", 3).is_disjoint(&after));
}
