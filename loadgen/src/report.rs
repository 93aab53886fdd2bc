//! The summary of a run: machine, parameters, throughput, errors, latency, and the verdict.
//!
//! One [`Report`] renders either as text for a person or as one JSON object (one line) for
//! scripts; both carry the same numbers. The verdict is computed here, once: a run fails when no
//! request succeeded or when any reply differed from its request. Open-loop reports add the
//! offered rate, the uncorrected latency (from actual sends) beside the corrected one, and the
//! generator's send lag; a mix of services adds one line per service.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::closed_loop::{self, Outcome};
use crate::machine::Machine;
use crate::open_loop::{self, Arrival};
use crate::stats::{LatencySummary, Mismatch};
use crate::workload::Workload;

/// The knobs of the run, as given.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Parameters {
    pub connect: String,
    /// The services called, with weights when they differ (`echo`, `echo:1, faulty:3`).
    pub service: String,
    /// The payloads sent (`64 B`, `"sleep 3"`, `64 B:8, 1024 B:1`).
    pub payloads: String,
    pub connections: u32,
    /// Closed loop: requests in flight per connection.
    pub depth: Option<u32>,
    /// Closed loop: one thread per connection, batched (`--batch`).
    pub batch: bool,
    /// Open loop: requests per second offered.
    pub rate: Option<f64>,
    pub arrival: Option<Arrival>,
    pub in_flight_max: Option<u32>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub threads: u32,
    /// Whether any service's replies are checked.
    pub verify: bool,
    pub seed: u64,
}

impl Parameters {
    fn of_workload(workload: &Workload, connections: u32, threads: u32) -> Parameters {
        Parameters {
            connect: workload.connect.clone(),
            service: workload.services_label(),
            payloads: workload.payloads_label(),
            connections,
            depth: None,
            batch: false,
            rate: None,
            arrival: None,
            in_flight_max: None,
            duration_s: workload.duration.as_secs_f64(),
            warmup_s: workload.warmup.as_secs_f64(),
            threads,
            verify: workload.verify.iter().any(|verify| *verify),
            seed: workload.seed,
        }
    }

    pub fn of(plan: &closed_loop::Plan, threads: u32) -> Parameters {
        Parameters {
            depth: Some(plan.depth),
            batch: plan.batch,
            ..Parameters::of_workload(&plan.workload, plan.connections, threads)
        }
    }

    pub fn of_open(plan: &open_loop::Plan, threads: u32) -> Parameters {
        Parameters {
            rate: Some(plan.rate),
            arrival: Some(plan.arrival),
            in_flight_max: Some(plan.in_flight_max),
            ..Parameters::of_workload(&plan.workload, plan.connections, threads)
        }
    }
}

/// One service's share of a mixed run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceReport {
    pub service: String,
    pub requests_completed: u64,
    pub errors_total: u64,
    pub latency_us: Option<LatencySummary>,
}

/// Everything a run prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub machine: Machine,
    pub parameters: Parameters,
    /// Successful calls started (open loop: intended) in the measured window.
    pub requests_completed: u64,
    pub requests_per_second: f64,
    /// Open loop: requests scheduled in the window per second (the load actually offered).
    pub offered_per_second: Option<f64>,
    pub errors_total: u64,
    /// Measured errors by [`crate::stats::ErrorClass::label`].
    pub errors: BTreeMap<String, u64>,
    pub warmup_errors: u64,
    pub tasks_stopped_early: u64,
    /// Calls resent on a new connection because a draining bridge refused them (not errors).
    pub drain_retries: u64,
    pub verify_mismatches: u64,
    pub first_mismatch: Option<Mismatch>,
    /// Percentiles of successful calls in microseconds; `null` when none succeeded. Open loop:
    /// from each call's intended send time (corrected for coordinated omission).
    pub latency_us: Option<LatencySummary>,
    /// Open loop: from each call's actual send (what a generator without correction reports).
    pub latency_uncorrected_us: Option<LatencySummary>,
    /// Open loop: how late the generator sent, behind its schedule.
    pub send_lag_us: Option<LatencySummary>,
    /// Per service, when the run mixed several.
    pub services: Vec<ServiceReport>,
    pub passed: bool,
    /// Why the run failed, one reason per entry; empty when it passed.
    pub failures: Vec<String>,
}

impl Report {
    pub fn closed_loop(machine: Machine, parameters: Parameters, outcome: &Outcome) -> Report {
        Report::new("closed_loop", machine, parameters, outcome, &[])
    }

    /// An open-loop report; `services` names the mix's services in order.
    pub fn open_loop(
        machine: Machine,
        parameters: Parameters,
        outcome: &Outcome,
        services: &[String],
    ) -> Report {
        Report::new("open_loop", machine, parameters, outcome, services)
    }

    /// A report of `mode`; `services` names the mix's services (a per-service breakdown is kept
    /// when there are several).
    pub fn new(
        mode: &'static str,
        machine: Machine,
        parameters: Parameters,
        outcome: &Outcome,
        services: &[String],
    ) -> Report {
        let recorder = &outcome.recorder;
        let open = mode == "open_loop";
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
        let per_service = if services.len() > 1 {
            services
                .iter()
                .enumerate()
                .map(|(index, name)| {
                    let share = recorder.services().get(index);
                    ServiceReport {
                        service: name.clone(),
                        requests_completed: share.map_or(0, |s| s.latency_us.len()),
                        errors_total: share.map_or(0, |s| s.errors),
                        latency_us: share.and_then(|s| LatencySummary::of(&s.latency_us)),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let seconds = outcome.measured.as_secs_f64();
        Report {
            mode,
            machine,
            parameters,
            requests_completed: recorder.requests_ok(),
            requests_per_second: outcome.requests_per_second(),
            offered_per_second: open.then(|| outcome.scheduled as f64 / seconds),
            errors_total: recorder.errors_total(),
            errors: recorder.errors_by_label(),
            warmup_errors: recorder.warmup_errors(),
            tasks_stopped_early: recorder.tasks_stopped_early(),
            drain_retries: recorder.drain_retries(),
            verify_mismatches: recorder.mismatches(),
            first_mismatch: recorder.first_mismatch().cloned(),
            latency_us: recorder.latency(),
            latency_uncorrected_us: if open {
                recorder.latency_uncorrected()
            } else {
                None
            },
            send_lag_us: if open { recorder.send_lag() } else { None },
            services: per_service,
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
        match (p.depth, p.rate) {
            (Some(depth), _) => {
                let _ = writeln!(
                    out,
                    "load        {} connections x {} in flight, payloads {}, {}",
                    p.connections,
                    depth,
                    p.payloads,
                    if p.batch {
                        "batched, a thread per connection".to_string()
                    } else {
                        format!("{} thread(s)", p.threads)
                    }
                );
            }
            (None, Some(rate)) => {
                let arrival = p.arrival.unwrap_or(Arrival::Constant).name();
                let _ = writeln!(
                    out,
                    "load        {rate} req/s {arrival} over {} connections (at most {} in \
                     flight), payloads {}, {} thread(s)",
                    p.connections,
                    p.in_flight_max.unwrap_or(0),
                    p.payloads,
                    p.threads
                );
            }
            (None, None) => {}
        }
        let _ = writeln!(
            out,
            "time        {} s warm-up, {} s measured",
            p.warmup_s, p.duration_s
        );
        let offered = match self.offered_per_second {
            Some(offered) => format!(" (offered {offered:.1} req/s)"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "requests    {} completed, {:.1} req/s{offered}",
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
        if self.drain_retries > 0 {
            let _ = writeln!(
                out,
                "resent      {} calls a draining bridge refused (they had not run; an upgrade)",
                self.drain_retries
            );
        }
        if self.tasks_stopped_early > 0 {
            let _ = writeln!(
                out,
                "stopped     {} of {} tasks lost their connection before the end",
                self.tasks_stopped_early,
                p.connections * p.depth.unwrap_or(1)
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
        let _ = writeln!(out, "latency_us  {}", summary_cells(&self.latency_us));
        if self.mode == "open_loop" {
            let _ = writeln!(
                out,
                "            (from each request's intended send time: coordinated omission \
                 corrected)"
            );
            let _ = writeln!(
                out,
                "uncorrected {}",
                summary_cells(&self.latency_uncorrected_us)
            );
            let _ = writeln!(out, "send_lag_us {}", summary_cells(&self.send_lag_us));
        }
        for share in &self.services {
            let _ = writeln!(
                out,
                "  {:<9} {} completed, {} errors, {}",
                share.service,
                share.requests_completed,
                share.errors_total,
                summary_cells(&share.latency_us)
            );
        }
        let result = if self.passed {
            "ok".to_string()
        } else {
            format!("FAILED: {}", self.failures.join("; "))
        };
        let _ = writeln!(out, "result      {result}");
        out
    }
}

/// `p50 500  p90 900  ...  max 1000`, or the reason there is none.
pub fn summary_cells(summary: &Option<LatencySummary>) -> String {
    match summary {
        Some(summary) => {
            let cells: Vec<String> = summary
                .rows()
                .iter()
                .map(|(label, us)| format!("{label} {us}"))
                .collect();
            cells.join("  ")
        }
        None => "n/a (no successful request)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mix::{PayloadKind, Weighted};
    use crate::stats::{CallTiming, ErrorClass, Recorder};

    fn workload() -> Workload {
        let mut workload = Workload::simple("unix:/tmp/b.sock", "echo", PayloadKind::Bytes(64));
        workload.duration = Duration::from_secs(2);
        workload.warmup = Duration::from_millis(500);
        workload.drain_grace = Duration::from_secs(1);
        workload
    }

    fn plan() -> closed_loop::Plan {
        closed_loop::Plan {
            workload: workload(),
            connections: 2,
            depth: 3,
            batch: false,
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
            scheduled: 0,
            completed_within: Duration::ZERO,
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

    #[test]
    fn open_loop_reports_offered_load_both_latencies_and_services() {
        // Proves an open-loop report carries the offered rate, the uncorrected latency, the send
        // lag, and a line per service of a mix.
        let mut recorder = Recorder::new();
        for (service, us) in [(0, 100), (1, 3_000), (1, 3_100)] {
            recorder.record_call(CallTiming {
                service,
                latency: Duration::from_micros(us + 50),
                uncorrected: Duration::from_micros(us),
                send_lag: Duration::from_micros(50),
            });
        }
        let mut workload = workload();
        workload.services =
            Weighted::new(vec![("echo".to_string(), 1), ("faulty".to_string(), 2)]).unwrap();
        workload.verify = vec![true, false];
        let plan = open_loop::Plan {
            workload,
            connections: 4,
            rate: 1.5,
            arrival: Arrival::Poisson,
            in_flight_max: 10,
        };
        let outcome = Outcome {
            recorder,
            measured: Duration::from_secs(2),
            scheduled: 3,
            completed_within: Duration::ZERO,
        };
        let names = ["echo".to_string(), "faulty".to_string()];
        let report = Report::open_loop(machine(), Parameters::of_open(&plan, 1), &outcome, &names);
        assert_eq!(report.offered_per_second, Some(1.5));
        assert_eq!(report.services.len(), 2);
        assert_eq!(report.services[1].requests_completed, 2);
        let text = report.to_text();
        assert!(text.contains("acgi-loadgen open loop"), "{text}");
        assert!(
            text.contains("1.5 req/s Poisson over 4 connections"),
            "{text}"
        );
        assert!(text.contains("(offered 1.5 req/s)"), "{text}");
        assert!(text.contains("uncorrected p50 3001"), "{text}");
        assert!(text.contains("send_lag_us p50 50"), "{text}");
        assert!(
            text.contains("  faulty    2 completed, 0 errors, p50 3051"),
            "{text}"
        );
        assert!(text.contains("service echo:1, faulty:2"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["parameters"]["arrival"], "poisson");
        assert_eq!(json["latency_uncorrected_us"]["max"], 3_101);
        assert_eq!(json["services"][0]["service"], "echo");
        assert!(json["parameters"]["depth"].is_null());
    }

    #[test]
    fn a_late_drain_lowers_the_achieved_rate() {
        // Proves an open loop whose window's requests finish after it is credited with the
        // rate it sustained (requests over the time to the last completion), not the offered.
        let mut recorder = Recorder::new();
        for _ in 0..100 {
            recorder.record_ok(Duration::from_millis(1));
        }
        let mut outcome = Outcome {
            recorder,
            measured: Duration::from_secs(2),
            scheduled: 100,
            completed_within: Duration::from_secs(4),
        };
        assert_eq!(outcome.requests_per_second(), 25.0);
        outcome.completed_within = Duration::from_millis(1900);
        assert_eq!(outcome.requests_per_second(), 50.0);
    }
}
