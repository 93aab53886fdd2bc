//! cgroup v2 per service and per worker (docs/security.md, "cgroups"): against the real kernel,
//! in a subtree made for each test under the cgroup2 mount (`cgroup = PATH`). On a machine
//! whose cgroup2 hierarchy offers no controllers (a hybrid layout), the limits are asserted to
//! be skipped with their line; where it offers them, asserted written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{bridge, ServiceSpec};

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// A cgroup made for one test, removed (with what the bridge left in it) when dropped.
struct Subtree(PathBuf);

impl Subtree {
    /// None (with a message) when the test cannot run here: not root, or no cgroup2.
    fn new(test: &str) -> Option<Subtree> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping {test}: needs root to make a cgroup");
            return None;
        }
        let Some(mount) = cgroup2_mount() else {
            eprintln!("skipping {test}: no cgroup2 file system is mounted");
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = mount.join(format!("acgi-it-{}-{nanos}", std::process::id()));
        if let Err(error) = std::fs::create_dir(&dir) {
            eprintln!("skipping {test}: cannot create {}: {error}", dir.display());
            return None;
        }
        Some(Subtree(dir))
    }

    fn children(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Subtree {
    fn drop(&mut self) {
        // Depth first: the kernel removes only empty cgroups.
        fn remove(dir: &Path) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    remove(&entry.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}

/// The cgroup v2 path `pid` is in (its `0::` line).
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string()
}

/// Poll (bounded) until `condition` holds.
fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn call_pid(client: &mut acgi_bridge::client::BlockingClient, command: &[u8]) -> i32 {
    let reply = client.call("faulty", command).unwrap();
    String::from_utf8(reply).unwrap().parse().unwrap()
}

#[test]
fn each_worker_runs_in_its_own_cgroup_which_is_killed_and_removed_with_it() {
    // Proves the mechanics: the bridge moves itself into ROOT/bridge; a worker and a child it
    // setsid'd are in ROOT/service-faulty/worker-*; when the worker dies, its reap kills the
    // whole cgroup (cgroup.kill: the child, out of the worker's process group, dies too, and
    // the log says so) and removes it; the replacement gets a new cgroup; at stop every
    // cgroup the bridge made is removed but its own leaf.
    let Some(subtree) = Subtree::new("the cgroup test") else {
        return;
    };
    let limits = "cgroup_memory_max_bytes = 67108864\ncgroup_pids_max = 64\n\
                  cgroup_cpu_weight = 50\n";
    let mut faulty = ServiceSpec::faulty().workers(1, 1);
    faulty.extra.push_str(limits);
    let mut bridge = bridge()
        .top(&format!("cgroup = {:?}", subtree.0.display().to_string()))
        .service(faulty)
        .start();
    let name = subtree
        .0
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        cgroup_of(bridge.pid()).ends_with(&format!("/{name}/bridge")),
        "{}",
        cgroup_of(bridge.pid())
    );
    let mut client = bridge.client();
    let worker = call_pid(&mut client, b"pid");
    let worker_cgroup = cgroup_of(worker);
    let leaf = worker_cgroup.rsplit('/').next().unwrap().to_string();
    assert!(
        worker_cgroup.contains(&format!("/{name}/service-faulty/worker-{}-", bridge.pid())),
        "{worker_cgroup}"
    );
    let child = call_pid(&mut client, b"fork-setsid");
    assert_eq!(cgroup_of(child), worker_cgroup);
    // The limits: written where the subtree offers their controllers, else skipped, one line
    // per limit saying why.
    let offered = std::fs::read_to_string(subtree.0.join("cgroup.controllers")).unwrap();
    let service_dir = subtree.0.join("service-faulty");
    for (controller, file, value) in [
        ("memory", "memory.max", "67108864"),
        ("pids", "pids.max", "64"),
        ("cpu", "cpu.weight", "50"),
    ] {
        if offered.split_whitespace().any(|c| c == controller) {
            let text = std::fs::read_to_string(service_dir.join(file)).unwrap();
            assert_eq!(text.trim(), value, "{file}");
        } else {
            bridge.wait_log(&format!("the {controller} controller is not available"));
        }
    }
    // The worker dies: its cgroup takes the child with it.
    assert!(client.call("faulty", b"exit").is_err());
    let log = bridge.wait_log("cgroup.kill: killed the processes left");
    assert!(!log.contains("escaped its worker"), "{log}");
    wait_until("the setsid'd child to die", || cgroup_of(child).is_empty());
    wait_until("the dead worker's cgroup to be removed", || {
        !service_dir.join(&leaf).exists()
    });
    let replacement = call_pid(&mut client, b"pid");
    let replacement_cgroup = cgroup_of(replacement);
    assert!(replacement_cgroup.contains("/service-faulty/worker-"));
    assert_ne!(replacement_cgroup, worker_cgroup);
    assert!(bridge.stop().success());
    assert_eq!(subtree.children(), ["bridge"]);
}

#[test]
fn a_missing_subtree_or_controller_is_named_by_check() {
    // Proves `check` says what is skipped and why: a `cgroup` path that is not a cgroup, and
    // the bad values of the limit keys (errors, naming the key).
    let dir = tempfile::tempdir().unwrap();
    let check = |top: &str, extra: &str| {
        let mut service = ServiceSpec::faulty();
        service.extra.push_str(extra);
        let path = dir.path().join("check.toml");
        let text = bridge().top(top).service(service).config_text(dir.path());
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(crate::common::bridge_exe())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), text)
    };
    let (ok, text) = check(
        "cgroup = \"/nonexistent/acgi\"",
        "cgroup_memory_max_bytes = 1048576\n",
    );
    assert!(ok, "a missing subtree is a warning, not an error: {text}");
    assert!(
        text.contains("/nonexistent/acgi is not a cgroup v2 directory")
            && text.contains("cgroup_* limits are not applied"),
        "{text}"
    );
    let (ok, text) = check("cgroup = \"relative\"", "cgroup_cpu_weight = 0\n");
    assert!(!ok);
    assert!(text.contains("cgroup: \"relative\" is not"), "{text}");
    assert!(
        text.contains("cgroup_cpu_weight: must be between 1 and 10000"),
        "{text}"
    );
}
