//! The fault soak (`acgi-soak`, loadgen/src/soak/) in CI: a short run against the debug build
//! with workers SIGKILLed and SIGSTOPped and callers aborting and stalling, asserting its exit
//! status and its summary's counts; and a run that drops one reply on purpose, which must fail,
//! so that the first test cannot pass by counting nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;

/// The soak binary beside the bridge's (built by `cargo test --workspace`, or here).
fn soak_exe() -> PathBuf {
    let dir = Path::new(common::bridge_exe())
        .parent()
        .expect("target dir");
    let path = dir.join("acgi-soak");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "acgi-loadgen", "--bin", "acgi-soak"])
            .status()
            .expect("cargo build -p acgi-loadgen");
        assert!(status.success(), "building acgi-soak failed");
    }
    path
}

/// Run the soak on a bridge of its own; (exit code, summary).
fn soak(args: &[&str]) -> (i32, serde_json::Value) {
    let examples = common::example("faulty")
        .parent()
        .expect("examples dir")
        .to_path_buf();
    let output = Command::new(soak_exe())
        .arg("--bridge")
        .arg(common::bridge_exe())
        .arg("--examples")
        .arg(&examples)
        .args(["--json", "--callers", "6", "--depth", "6"])
        .args(args)
        .output()
        .expect("run acgi-soak");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let summary = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "acgi-soak printed no JSON summary ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), summary)
}

fn count(summary: &serde_json::Value, name: &str) -> u64 {
    summary[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in the summary: {summary:#}"))
}

#[test]
fn soak_under_faults_loses_misroutes_and_leaks_nothing() {
    // Proves 25 s of byte-checked load over kills, stops, aborts and stalls: every request
    // accounted for, no lost/misrouted/duplicated reply, fds, slots, workers and zombies whole.
    let (code, summary) = soak(&["--duration-s", "25", "--seed", "20261202"]);
    assert_eq!(code, 0, "the soak failed: {summary:#}");
    assert_eq!(summary["passed"], true, "{summary:#}");
    for zero in [
        "lost",
        "misrouted",
        "unknown_ids",
        "corrupted",
        "duplicated",
        "errors_forbidden",
        "disconnects",
        "zombies",
        "unaccounted",
    ] {
        assert_eq!(summary[zero], 0, "{zero} in {summary:#}");
    }
    // The faults happened, and requests of every size class were sent through them.
    for some in [
        "kills",
        "stops",
        "aborts_mid_request",
        "aborts_mid_payload",
        "stalls",
        "errors_worker_failed",
        "requests_below_slot",
        "requests_at_slot_edge",
        "requests_above_slot",
        "requests_far_above_slot",
    ] {
        assert!(count(&summary, some) > 0, "no {some} in {summary:#}");
    }
    assert!(count(&summary, "replies_ok") > 1000, "{summary:#}");
    assert!(
        count(&summary, "fds_after") <= count(&summary, "fds_before") + 2,
        "{summary:#}"
    );
    assert_eq!(
        summary["slots_after"], summary["slots_before"],
        "{summary:#}"
    );
    assert_eq!(
        summary["workers_after"], summary["workers_before"],
        "{summary:#}"
    );
    assert_eq!(summary["answering"], true, "{summary:#}");
    assert_eq!(summary["exit_status"], "exit status: 0", "{summary:#}");
}

#[test]
fn soak_reports_a_dropped_reply_as_lost_and_fails() {
    // Proves the soak's verdict can fail: one reply left unread is counted lost, exit 1.
    let (code, summary) = soak(&["--duration-s", "4", "--seed", "5", "--self-test-drop-reply"]);
    assert_eq!(code, 1, "{summary:#}");
    assert_eq!(summary["passed"], false, "{summary:#}");
    assert_eq!(count(&summary, "lost"), 1, "{summary:#}");
    assert_eq!(count(&summary, "unaccounted"), 0, "{summary:#}");
    let failures = summary["failures"].to_string();
    assert!(failures.contains("1 lost"), "{failures}");
}
