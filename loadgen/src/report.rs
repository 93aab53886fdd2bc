//! The summary of a run: machine, parameters, throughput, errors, latency, and the verdict.
//!
//! One [`Report`] renders either as text for a person or as one JSON object (one line) for
//! scripts; both carry the same numbers. The verdict is computed here, once: a run fails when no
//! request succeeded or when any reply differed from its request.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::closed_loop::{Outcome, Plan};
use crate::machine::Machine;
use crate::stats::{LatencySummary, Mismatch};

/// The knobs of the run, as given.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Parameters {
    pub connect: String,
    pub service: String,
    pub connections: u32,
    pub depth: u32,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: u32,
    pub threads: u32,
    pub verify: bool,
}

impl Parameters {
    pub fn of(plan: &Plan, threads: u32) -> Parameters {
        Parameters {
            connect: plan.connect.clone(),
            service: plan.service.clone(),
            connections: plan.connections,
            depth: plan.depth,
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            payload_bytes: plan.payload_bytes,
            threads,
            verify: plan.verify,
        }
    }
}

/// Everything a run prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub machine: Machine,
    pub parameters: Parameters,
    /// Successful calls started in the measured window.
    pub requests_completed: u64,
    pub requests_per_second: f64,
    pub errors_total: u64,
    /// Measured errors by [`crate::stats::ErrorClass::label`].
    pub errors: BTreeMap<String, u64>,
    pub warmup_errors: u64,
    pub tasks_stopped_early: u64,
    pub verify_mismatches: u64,
    pub first_mismatch: Option<Mismatch>,
    /// Percentiles of successful calls in microseconds; `null` when none succeeded.
    pub latency_us: Option<LatencySummary>,
    pub passed: bool,
    /// Why the run failed, one reason per entry; empty when it passed.
    pub failures: Vec<String>,
}

impl Report {
    pub fn closed_loop(machine: Machine, parameters: Parameters, outcome: &Outcome) -> Report {
        let recorder = &outcome.recorder;
        let mut failures = Vec::new();
        if recorder.requests_ok() == 0 {
            failures.push(if recorder.errors_total() == 0 {
                "no request completed".to_string()
            } else {
                format!("every request failed ({} errors)", recorder.errors_total())
            });
        }
        if recorder.mismatches() > 0 {
            failures.push(format!(
                "{} replies differed from their requests",
                recorder.mismatches()
            ));
        }
        Report {
            mode: "closed_loop",
            machine,
            parameters,
            requests_completed: recorder.requests_ok(),
            requests_per_second: outcome.requests_per_second(),
            errors_total: recorder.errors_total(),
            errors: recorder.errors_by_label(),
            warmup_errors: recorder.warmup_errors(),
            tasks_stopped_early: recorder.tasks_stopped_early(),
            verify_mismatches: recorder.mismatches(),
            first_mismatch: recorder.first_mismatch().cloned(),
            latency_us: recorder.latency(),
            passed: failures.is_empty(),
            failures,
        }
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }

    /// The human-readable summary, several lines, newline-terminated.
    pub fn to_text(&self) -> String {
        let p = &self.parameters;
        let m = &self.machine;
        let mut out = String::new();
        let verify = if p.verify { "on" } else { "off" };
        let _ = writeln!(out, "acgi-loadgen {}", self.mode.replace('_', " "));
        let _ = writeln!(
            out,
            "machine     {} cpus, kernel {}, {}",
            m.nproc, m.kernel, m.cpu_model
        );
        let _ = writeln!(
            out,
            "target      {} service {} (verify {verify})",
            p.connect, p.service
        );
        let _ = writeln!(
            out,
            "load        {} connections x {} in flight, {}-byte payloads, {} thread(s)",
            p.connections, p.depth, p.payload_bytes, p.threads
        );
        let _ = writeln!(
            out,
            "time        {} s warm-up, {} s measured",
            p.warmup_s, p.duration_s
        );
        let _ = writeln!(
            out,
            "requests    {} completed, {:.1} req/s",
            self.requests_completed, self.requests_per_second
        );
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            let listed: Vec<String> = self
                .errors
                .iter()
                .map(|(label, count)| format!("{label} {count}"))
                .collect();
            format!("{} ({})", self.errors_total, listed.join(", "))
        };
        let _ = writeln!(out, "errors      {errors}");
        if self.warmup_errors > 0 {
            let _ = writeln!(
                out,
                "warm-up     {} errors (not in the results)",
                self.warmup_errors
            );
        }
        if self.tasks_stopped_early > 0 {
            let _ = writeln!(
                out,
                "stopped     {} of {} tasks lost their connection before the end",
                self.tasks_stopped_early,
                p.connections * p.depth
            );
        }
        if p.verify {
            let _ = writeln!(out, "verify      {} mismatches", self.verify_mismatches);
        }
        if let Some(first) = &self.first_mismatch {
            let _ = writeln!(
                out,
                "mismatch    first: connection {} task {} call {}: sent {} bytes, got {}, \
                 first difference at byte {}",
                first.connection,
                first.task,
                first.sequence,
                first.request_bytes,
                first.reply_bytes,
                first.first_difference
            );
        }
        let latency = match &self.latency_us {
            Some(summary) => {
                let cells: Vec<String> = summary
                    .rows()
                    .iter()
                    .map(|(label, us)| format!("{label} {us}"))
                    .collect();
                cells.join("  ")
            }
            None => "n/a (no successful request)".to_string(),
        };
        let _ = writeln!(out, "latency_us  {latency}");
        let result = if self.passed {
            "ok".to_string()
        } else {
            format!("FAILED: {}", self.failures.join("; "))
        };
        let _ = writeln!(out, "result      {result}");
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::{ErrorClass, Recorder};

    fn plan() -> Plan {
        Plan {
            connect: "unix:/tmp/b.sock".to_string(),
            service: "echo".to_string(),
            connections: 2,
            depth: 3,
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            payload_bytes: 64,
            verify: true,
            drain_grace: Duration::from_secs(1),
        }
    }

    fn machine() -> Machine {
        Machine {
            nproc: 2,
            kernel: "6.18.0".to_string(),
            cpu_model: "Test CPU".to_string(),
        }
    }

    fn report(recorder: Recorder) -> Report {
        let outcome = Outcome {
            recorder,
            measured: Duration::from_secs(2),
        };
        Report::closed_loop(machine(), Parameters::of(&plan(), 1), &outcome)
    }

    #[test]
    fn a_clean_run_passes_and_prints_its_numbers() {
        // Proves rate, percentiles and machine appear in both renderings of a passing run.
        let mut recorder = Recorder::new();
        for us in 1..=1000 {
            recorder.record_ok(Duration::from_micros(us));
        }
        let report = report(recorder);
        assert!(report.passed && report.failures.is_empty());
        assert_eq!(report.requests_per_second, 500.0);
        let text = report.to_text();
        assert!(text.contains("1000 completed, 500.0 req/s"), "{text}");
        assert!(
            text.contains("p50 500  p90 900  p99 990  p99.9 999  max 1000"),
            "{text}"
        );
        assert!(text.contains("kernel 6.18.0, Test CPU"), "{text}");
        assert!(text.contains("errors      none"), "{text}");
        assert!(text.ends_with("result      ok\n"), "{text}");

        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["requests_completed"], 1000);
        assert_eq!(json["latency_us"]["p99_9"], 999);
        assert_eq!(json["machine"]["nproc"], 2);
        assert_eq!(json["parameters"]["warmup_s"], 0.5);
        assert_eq!(json["passed"], true);
        assert!(!report.to_json().contains('\n'));
    }

    #[test]
    fn all_failed_and_mismatches_fail_the_run() {
        // Proves the two failure verdicts and that errors are listed by code name.
        let mut recorder = Recorder::new();
        recorder.record_error(ErrorClass::Remote(3));
        recorder.record_error(ErrorClass::Closed);
        let failed = report(recorder);
        assert!(!failed.passed);
        assert_eq!(failed.failures, ["every request failed (2 errors)"]);
        let text = failed.to_text();
        assert!(
            text.contains("errors      2 (closed 1, overloaded 1)"),
            "{text}"
        );
        assert!(text.contains("n/a (no successful request)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&failed.to_json()).unwrap();
        assert!(json["latency_us"].is_null());
        assert_eq!(json["errors"]["overloaded"], 1);

        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_micros(10));
        recorder.record_mismatch(Mismatch {
            connection: 0,
            task: 1,
            sequence: 2,
            request_bytes: 64,
            reply_bytes: 63,
            first_difference: 63,
        });
        let mismatched = report(recorder);
        assert_eq!(
            mismatched.failures,
            ["1 replies differed from their requests"]
        );
        assert!(mismatched.to_text().contains("first difference at byte 63"));

        assert_eq!(report(Recorder::new()).failures, ["no request completed"]);
    }
}
