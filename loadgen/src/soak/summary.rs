//! The soak's end: the baseline taken before the load, the checks once the bridge has settled
//! after it, and the one summary (text lines or a JSON object) with its verdict.
//!
//! The bridge settles on its own schedule (replacing killed workers, reaping, closing the
//! descriptors of gone callers), so each end check polls, bounded by `--settle-ms`, until it
//! holds; the summary reports the last values seen, and a check still failing at the bound is a
//! failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::bridge;
use super::caller::Target;
use super::chaos::Action;
use super::stamp::{body, Identity};
use super::tally::{get, Tally};
use super::Options;

const POLL: Duration = Duration::from_millis(20);

/// The bridge before any load: idle workers, and what it holds.
#[derive(Debug)]
pub struct Baseline {
    pub fds: usize,
    pub slots: u64,
    /// Workers of each service (by name), all idle.
    pub workers: BTreeMap<String, usize>,
    /// The bridge's own counts of failed requests and worker exits ([`bridge_counts`]).
    pub counts: BTreeMap<String, u64>,
}

impl Baseline {
    /// Wait (bounded) until every service's workers are up and idle, then take the baseline.
    pub fn take(admin: &Path, pid: i32, settle_ms: u64) -> Result<Baseline> {
        let deadline = Instant::now() + Duration::from_millis(settle_ms);
        loop {
            let status = bridge::status(admin)?;
            if let Some(workers) = idle_pools(&status) {
                return Ok(Baseline {
                    // The status connection may still be open for a moment: take the least.
                    fds: least_fds(pid)?,
                    slots: status["slots_registered"].as_u64().unwrap_or(0),
                    workers,
                    counts: bridge_counts(&status),
                });
            }
            if Instant::now() > deadline {
                anyhow::bail!("the bridge's pools did not come up idle in {settle_ms} ms");
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Workers per service when every service's pool is whole and idle (nothing starting, busy,
/// stopping or waiting; a static pool at its size).
fn idle_pools(status: &Value) -> Option<BTreeMap<String, usize>> {
    let mut workers = BTreeMap::new();
    for service in bridge::services(status) {
        let count = |key: &str| service[key].as_u64().unwrap_or(u64::MAX);
        let pids = service["pids"].as_array().map_or(0, Vec::len);
        let settled = count("workers_starting") == 0
            && count("workers_busy") == 0
            && count("workers_stopping") == 0
            && count("backlog") == 0
            && pids as u64 == count("workers_idle")
            && pids as u64 >= count("min_workers")
            && pids as u64 <= count("max_workers");
        if !settled {
            return None;
        }
        workers.insert(service["name"].as_str().unwrap_or("?").to_string(), pids);
    }
    Some(workers)
}

/// The bridge's counts over all services: `requests_failed.<code>` and `exits_<why>` (its own
/// view of the faults, reported beside the soak's).
fn bridge_counts(status: &Value) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for service in bridge::services(status) {
        if let Some(failed) = service["requests_failed"].as_object() {
            for (code, n) in failed {
                *counts.entry(format!("requests_failed.{code}")).or_default() +=
                    n.as_u64().unwrap_or(0);
            }
        }
        for key in ["exits_crashed", "exits_timed_out", "exits_killed", "spawns"] {
            *counts.entry(key.to_string()).or_default() += service[key].as_u64().unwrap_or(0);
        }
    }
    counts
}

fn least_fds(pid: i32) -> Result<usize> {
    let mut least = usize::MAX;
    for _ in 0..5 {
        least = least.min(bridge::fd_count(pid)?);
        std::thread::sleep(POLL);
    }
    Ok(least)
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub passed: bool,
    pub seed: u64,
    pub duration_s: f64,
    pub callers: u32,
    pub depth: u32,
    pub slot_bytes: u32,
    pub requests_sent: u64,
    pub requests_below_slot: u64,
    pub requests_at_slot_edge: u64,
    pub requests_above_slot: u64,
    pub requests_far_above_slot: u64,
    pub requests_per_second: f64,
    pub replies_ok: u64,
    pub errors_worker_failed: u64,
    pub errors_timed_out: u64,
    pub errors_overloaded: u64,
    pub errors_service_unavailable: u64,
    pub errors_forbidden: u64,
    pub errors_forbidden_by_code: BTreeMap<u16, u64>,
    pub lost: u64,
    pub misrouted: u64,
    pub unknown_ids: u64,
    pub corrupted: u64,
    pub duplicated: u64,
    pub not_answers: u64,
    pub abandoned: u64,
    pub partial_requests: u64,
    pub unaccounted: i64,
    pub connections: u64,
    pub disconnects: u64,
    pub io_errors: u64,
    /// `status` calls of the chaos thread that failed (the action was skipped; not a failure).
    pub status_errors: u64,
    pub kills: u64,
    pub stops: u64,
    pub conts: u64,
    pub aborts_mid_request: u64,
    pub aborts_mid_payload: u64,
    pub stalls: u64,
    pub stalls_starved: u64,
    pub fds_before: usize,
    pub fds_after: usize,
    pub slots_before: u64,
    pub slots_after: u64,
    pub workers_before: BTreeMap<String, usize>,
    pub workers_after: BTreeMap<String, usize>,
    pub pools_settled: bool,
    pub connections_after: u64,
    pub zombies: usize,
    pub answering: bool,
    pub exit_status: Option<String>,
    /// The bridge's own counts (status) over the run: failed requests by code, worker exits.
    pub bridge_counts: BTreeMap<String, u64>,
    pub failures: Vec<String>,
    pub problems: Vec<String>,
    pub kept_dir: Option<String>,
}

impl Summary {
    pub fn new(options: &Options, seed: u64, ran_for: Duration, tally: &Tally) -> Summary {
        let by_class = |i: usize| get(&tally.sent_by_class[i]);
        let mut summary = Summary {
            seed,
            duration_s: ran_for.as_secs_f64(),
            callers: options.callers,
            depth: options.depth,
            slot_bytes: options.slot_bytes,
            requests_sent: get(&tally.sent),
            requests_below_slot: by_class(0),
            requests_at_slot_edge: by_class(1),
            requests_above_slot: by_class(2),
            requests_far_above_slot: by_class(3),
            replies_ok: get(&tally.ok),
            errors_worker_failed: get(&tally.worker_failed),
            errors_timed_out: get(&tally.timed_out),
            errors_overloaded: get(&tally.overloaded),
            errors_service_unavailable: get(&tally.unavailable),
            errors_forbidden: get(&tally.forbidden),
            errors_forbidden_by_code: tally.forbidden_codes(),
            lost: get(&tally.lost),
            misrouted: get(&tally.misrouted),
            unknown_ids: get(&tally.unknown_ids),
            corrupted: get(&tally.corrupted),
            duplicated: get(&tally.duplicated),
            not_answers: get(&tally.not_answers),
            abandoned: get(&tally.abandoned),
            partial_requests: get(&tally.partial),
            connections: get(&tally.connections),
            disconnects: get(&tally.disconnects),
            io_errors: get(&tally.io_errors),
            status_errors: get(&tally.status_errors),
            kills: get(&tally.kills),
            stops: get(&tally.stops),
            conts: get(&tally.conts),
            aborts_mid_request: get(&tally.aborts_mid_request),
            aborts_mid_payload: get(&tally.aborts_mid_payload),
            stalls: get(&tally.stalls),
            stalls_starved: get(&tally.stalls_starved),
            problems: tally.problems(),
            ..Summary::default()
        };
        let outcomes = summary.replies_ok
            + summary.errors_worker_failed
            + summary.errors_timed_out
            + summary.errors_overloaded
            + summary.errors_service_unavailable
            + summary.errors_forbidden
            + summary.misrouted
            + summary.corrupted
            + summary.not_answers
            + summary.lost
            + summary.abandoned;
        summary.unaccounted = summary.requests_sent as i64 - outcomes as i64;
        summary.requests_per_second = summary.replies_ok as f64 / summary.duration_s.max(1e-3);
        summary
    }

    /// Poll (bounded) until the pools are whole and idle, no caller is connected, no zombie is
    /// left and the descriptors are back within the slack; record what was last seen.
    pub fn settle(&mut self, options: &Options, baseline: &Baseline, admin: &Path, pid: i32) {
        self.fds_before = baseline.fds;
        self.slots_before = baseline.slots;
        self.workers_before = baseline.workers.clone();
        let deadline = Instant::now() + Duration::from_millis(options.settle_ms);
        loop {
            let seen = self.look(admin, pid);
            let whole = seen.is_ok()
                && self.pools_settled
                && self.workers_after == baseline.workers
                && self.connections_after == 0
                && self.zombies == 0
                && self.slots_after == baseline.slots
                && self.fds_after <= baseline.fds + options.fd_slack;
            if whole || Instant::now() > deadline {
                for (key, n) in self.bridge_counts.iter_mut() {
                    *n -= baseline.counts.get(key).copied().unwrap_or(0).min(*n);
                }
                if let Err(error) = seen {
                    self.failures
                        .push(format!("status after the run: {error:#}"));
                }
                return;
            }
            std::thread::sleep(POLL);
        }
    }

    fn look(&mut self, admin: &Path, pid: i32) -> Result<()> {
        let status = bridge::status(admin)?;
        let pools = idle_pools(&status);
        self.pools_settled = pools.is_some();
        self.workers_after = pools.unwrap_or_default();
        self.connections_after = status["connections"].as_u64().unwrap_or(u64::MAX);
        self.slots_after = status["slots_registered"].as_u64().unwrap_or(u64::MAX);
        self.zombies = bridge::zombies(pid).len();
        self.fds_after = least_fds(pid)?;
        self.bridge_counts = bridge_counts(&status);
        Ok(())
    }

    /// One more call on a new connection, byte-checked: the bridge still answers.
    pub fn check_answering(&mut self, addr: &str, targets: &[Target]) {
        let request = body(Identity {
            connection: 0,
            number: 1,
            size: 100,
        });
        let result = acgi_client::BlockingClient::connect(addr)
            .and_then(|mut client| client.call(targets[0].service_id, &request));
        match result {
            Ok(reply) if reply == request => self.answering = true,
            Ok(reply) => self.failures.push(format!(
                "the last call got {} wrong bytes back",
                reply.len()
            )),
            Err(error) => self
                .failures
                .push(format!("the bridge no longer answers: {error}")),
        }
    }

    pub fn record_exit(&mut self, exit: Result<ExitStatus>) {
        match exit.context("stopping the bridge") {
            Ok(status) => {
                self.exit_status = Some(status.to_string());
                if !status.success() {
                    self.failures
                        .push(format!("the bridge exited {status} on SIGTERM"));
                }
            }
            Err(error) => self.failures.push(format!("{error:#}")),
        }
    }

    /// Every failure condition, in words.
    pub fn judge(&mut self, options: &Options) {
        let counts = [
            (self.lost, "lost"),
            (self.misrouted, "misrouted"),
            (self.unknown_ids, "answers for ids never sent"),
            (self.corrupted, "corrupted"),
            (self.duplicated, "duplicated"),
            (self.errors_forbidden, "forbidden error codes"),
            (self.not_answers, "frames that answer no request"),
            (self.disconnects, "connections the bridge closed"),
            (self.io_errors, "I/O errors"),
            (self.stalls_starved, "stalls that starved the other callers"),
        ];
        for (count, what) in counts {
            if count > 0 {
                self.failures.push(format!("{count} {what}"));
            }
        }
        if self.unaccounted != 0 {
            self.failures
                .push(format!("{} requests unaccounted for", self.unaccounted));
        }
        if self.requests_sent == 0 {
            self.failures.push("no request was sent".into());
        }
        if options.duration_s >= 5 && self.kills == 0 && options.actions.contains(&Action::Kill) {
            self.failures
                .push("no worker was killed: the soak tested nothing".into());
        }
        self.judge_leaks(options);
        self.passed = self.failures.is_empty();
    }

    fn judge_leaks(&mut self, options: &Options) {
        if self.fds_after > self.fds_before + options.fd_slack {
            self.failures.push(format!(
                "descriptors: {} after, {} before (slack {})",
                self.fds_after, self.fds_before, options.fd_slack
            ));
        }
        if self.slots_after != self.slots_before {
            self.failures.push(format!(
                "slots registered: {} after, {} before",
                self.slots_after, self.slots_before
            ));
        }
        if !self.pools_settled || self.workers_after != self.workers_before {
            self.failures.push(format!(
                "pools not back to idle as before: {:?} after, {:?} before",
                self.workers_after, self.workers_before
            ));
        }
        if self.connections_after != 0 {
            self.failures
                .push(format!("{} connections left", self.connections_after));
        }
        if self.zombies > 0 {
            self.failures
                .push(format!("{} zombie children", self.zombies));
        }
    }

    pub fn passed(&self) -> bool {
        self.passed
    }

    /// `name: value` lines, in the order of the struct.
    pub fn text(&self) -> String {
        let Ok(Value::Object(fields)) = serde_json::to_value(self) else {
            return format!("{self:?}");
        };
        let mut out = String::new();
        for (name, value) in fields {
            let value = match value {
                Value::Array(items) if !items.is_empty() => items
                    .iter()
                    .map(|item| format!("\n  - {}", item.as_str().unwrap_or(&item.to_string())))
                    .collect(),
                Value::String(text) => text,
                other => other.to_string(),
            };
            out.push_str(&format!("{name}: {value}\n"));
        }
        out
    }
}
