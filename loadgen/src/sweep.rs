//! `acgi-loadgen sweep`: open-loop runs at rising offered rates until the service breaks its SLO.
//!
//! Each step is a full open-loop run ([`crate::open_loop`]: warm-up, then the measured step) at
//! one rate. A step passes when every measured request succeeded, no reply differed from its
//! request, and the corrected p99 is within the SLO; the sweep stops at the first step that
//! fails, and the highest passing rate is the sustainable one. Because latency is measured from
//! intended send times, a step beyond the knee shows it at once: the backlog grows for the whole
//! step and every request behind it is charged its wait.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::closed_loop::Outcome;
use crate::machine::Machine;
use crate::open_loop::{self, Arrival};
use crate::report::{Parameters, Report};
use crate::stats::LatencySummary;
use crate::svg::{self, Series, PALETTE};
use crate::workload::RunError;

/// One step's numbers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// The rate asked for, requests per second.
    pub rate: f64,
    /// Requests scheduled in the measured window per second.
    pub offered_per_second: f64,
    /// Successful requests per second.
    pub requests_per_second: f64,
    pub errors_total: u64,
    pub verify_mismatches: u64,
    /// Corrected latency, microseconds.
    pub latency_us: Option<LatencySummary>,
    pub latency_uncorrected_us: Option<LatencySummary>,
    pub send_lag_us: Option<LatencySummary>,
    pub passed: bool,
    /// Why the step failed (empty when it passed).
    pub failures: Vec<String>,
}

impl Step {
    /// Judge `report` (an open-loop run at `rate`) against `slo_p99`.
    pub fn judge(rate: f64, report: &Report, slo_p99: Duration) -> Step {
        let mut failures = report.failures.clone();
        if report.errors_total > 0 {
            let listed: Vec<String> = report
                .errors
                .iter()
                .map(|(label, count)| format!("{label} {count}"))
                .collect();
            failures.push(format!(
                "{} errors ({})",
                report.errors_total,
                listed.join(", ")
            ));
        }
        let slo_us = slo_p99.as_micros() as u64;
        if let Some(latency) = &report.latency_us {
            if latency.p99 > slo_us {
                failures.push(format!(
                    "p99 {:.3} ms over the SLO of {:.3} ms",
                    latency.p99 as f64 / 1000.0,
                    slo_us as f64 / 1000.0
                ));
            }
        }
        failures.dedup();
        Step {
            rate,
            offered_per_second: report.offered_per_second.unwrap_or(0.0),
            requests_per_second: report.requests_per_second,
            errors_total: report.errors_total,
            verify_mismatches: report.verify_mismatches,
            latency_us: report.latency_us,
            latency_uncorrected_us: report.latency_uncorrected_us,
            send_lag_us: report.send_lag_us,
            passed: failures.is_empty(),
            failures,
        }
    }

    /// One table row: rate, achieved, p50, p99, p99.9, max (ms), errors, verdict.
    pub fn to_row(&self) -> String {
        let ms = |value: Option<u64>| match value {
            Some(us) => format!("{:.3}", us as f64 / 1000.0),
            None => "-".to_string(),
        };
        let latency = self.latency_us.as_ref();
        let verdict = if self.passed {
            "ok".to_string()
        } else {
            self.failures.join("; ")
        };
        format!(
            "{:>10.1} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>7}  {}",
            self.rate,
            self.requests_per_second,
            ms(latency.map(|l| l.p50)),
            ms(latency.map(|l| l.p99)),
            ms(latency.map(|l| l.p99_9)),
            ms(latency.map(|l| l.max)),
            self.errors_total,
            verdict
        )
    }
}

/// The header of [`Step::to_row`].
pub const TABLE_HEADER: &str =
    "  rate/s  achieved/s    p50 ms    p99 ms  p99.9 ms    max ms  errors  verdict";

/// The whole sweep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepReport {
    pub mode: &'static str,
    pub machine: Machine,
    /// The first step's parameters (the rate is per step).
    pub parameters: Parameters,
    pub slo_p99_ms: f64,
    pub steps: Vec<Step>,
    /// The highest rate whose step passed, if any.
    pub sustainable_rate: Option<f64>,
    /// Why the sweep ended.
    pub stopped: String,
}

impl SweepReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }

    /// The final summary (the step rows were printed as they finished).
    pub fn to_text_summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "stopped     {}", self.stopped);
        match self.sustainable_rate {
            Some(rate) => {
                let _ = writeln!(
                    out,
                    "sustainable {rate:.1} req/s (highest step with p99 <= {} ms and no errors)",
                    self.slo_p99_ms
                );
            }
            None => {
                let _ = writeln!(out, "sustainable none: the first step already failed");
            }
        }
        out
    }

    /// The header printed before the first step.
    pub fn text_header(machine: &Machine, parameters: &Parameters, slo_p99_ms: f64) -> String {
        let mut out = String::new();
        let arrival = parameters.arrival.unwrap_or(Arrival::Constant).name();
        let _ = writeln!(out, "acgi-loadgen sweep");
        let _ = writeln!(
            out,
            "machine     {} cpus, kernel {}, {}",
            machine.nproc, machine.kernel, machine.cpu_model
        );
        let _ = writeln!(
            out,
            "target      {} service {}, payloads {}",
            parameters.connect, parameters.service, parameters.payloads
        );
        let _ = writeln!(
            out,
            "load        {arrival} arrivals over {} connections, {} s warm-up + {} s per step, \
             SLO p99 <= {slo_p99_ms} ms",
            parameters.connections, parameters.warmup_s, parameters.duration_s
        );
        let _ = writeln!(
            out,
            "latency     corrected for coordinated omission (from intended send times)"
        );
        let _ = writeln!(out, "{TABLE_HEADER}");
        out
    }

    /// p50 and p99 (corrected, and p99 uncorrected) against offered load, as SVG.
    pub fn to_svg(&self) -> String {
        let points = |pick: &dyn Fn(&Step) -> Option<u64>| -> Vec<(f64, f64)> {
            self.steps
                .iter()
                .filter_map(|step| pick(step).map(|us| (step.rate, us as f64 / 1000.0)))
                .collect()
        };
        let series = vec![
            Series {
                label: "p50".to_string(),
                colour: PALETTE[0],
                dashed: false,
                points: points(&|s| s.latency_us.map(|l| l.p50)),
            },
            Series {
                label: "p99".to_string(),
                colour: PALETTE[1],
                dashed: false,
                points: points(&|s| s.latency_us.map(|l| l.p99)),
            },
            Series {
                label: "p99 uncorrected (from actual sends)".to_string(),
                colour: PALETTE[1],
                dashed: true,
                points: points(&|s| s.latency_uncorrected_us.map(|l| l.p99)),
            },
        ];
        let subtitle = format!(
            "service {} at {}, payloads {}, {} s per step; {} cpus",
            self.parameters.service,
            self.parameters.connect,
            self.parameters.payloads,
            self.parameters.duration_s,
            self.machine.nproc
        );
        svg::load_chart(
            "acgi-loadgen sweep: latency against offered load",
            &subtitle,
            &series,
            Some(self.slo_p99_ms),
            self.sustainable_rate,
        )
    }
}

/// Run `base` (whose rate is replaced) at each of `rates` until a step fails; `on_step` sees
/// each step as it finishes.
pub async fn run(
    base: &open_loop::Plan,
    rates: &[f64],
    slo_p99: Duration,
    threads: u32,
    machine: Machine,
    mut on_step: impl FnMut(&Step),
) -> Result<SweepReport, RunError> {
    assert!(!rates.is_empty(), "a sweep needs a rate");
    let services: Vec<String> = base.workload.services.values().cloned().collect();
    let mut steps = Vec::with_capacity(rates.len());
    let mut sustainable_rate = None;
    let mut stopped = format!("reached --max {} req/s", rates[rates.len() - 1]);
    for (index, rate) in rates.iter().enumerate() {
        let plan = open_loop::Plan {
            rate: *rate,
            workload: crate::workload::Workload {
                seed: base.workload.seed.wrapping_add(index as u64),
                ..base.workload.clone()
            },
            ..base.clone()
        };
        let outcome: Outcome = open_loop::run(&plan).await?;
        let report = Report::open_loop(
            machine.clone(),
            Parameters::of_open(&plan, threads),
            &outcome,
            &services,
        );
        let step = Step::judge(*rate, &report, slo_p99);
        on_step(&step);
        let passed = step.passed;
        if passed {
            sustainable_rate = Some(*rate);
        } else {
            stopped = format!("at {rate} req/s: {}", step.failures.join("; "));
        }
        steps.push(step);
        if !passed {
            break;
        }
    }
    Ok(SweepReport {
        mode: "sweep",
        machine,
        parameters: Parameters::of_open(base, threads),
        slo_p99_ms: slo_p99.as_secs_f64() * 1000.0,
        steps,
        sustainable_rate,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::PayloadKind;
    use crate::stats::{ErrorClass, Recorder};
    use crate::workload::Workload;

    fn report_with(latencies_us: &[u64], errors: u64) -> Report {
        let mut recorder = Recorder::new();
        for us in latencies_us {
            recorder.record_ok(Duration::from_micros(*us));
        }
        for _ in 0..errors {
            recorder.record_error(ErrorClass::Remote(3));
        }
        let plan = open_loop::Plan {
            workload: Workload::simple("unix:/x", "faulty", PayloadKind::Text("sleep 3".into())),
            connections: 1,
            rate: 100.0,
            arrival: Arrival::Constant,
            in_flight_max: 10,
        };
        let outcome = Outcome {
            recorder,
            measured: Duration::from_secs(1),
            scheduled: latencies_us.len() as u64 + errors,
            completed_within: Duration::ZERO,
        };
        let machine = Machine {
            nproc: 2,
            kernel: "k".into(),
            cpu_model: "c".into(),
        };
        Report::open_loop(
            machine,
            Parameters::of_open(&plan, 1),
            &outcome,
            &["faulty".into()],
        )
    }

    #[test]
    fn a_step_passes_only_within_the_slo_and_without_errors() {
        // Proves the three verdicts: ok, p99 over the SLO, and errors.
        let slo = Duration::from_millis(10);
        let fast: Vec<u64> = (1..=100).map(|i| 3_000 + i).collect();
        let ok = Step::judge(100.0, &report_with(&fast, 0), slo);
        assert!(ok.passed, "{:?}", ok.failures);
        assert!(ok.to_row().ends_with("  ok"), "{}", ok.to_row());
        let slow: Vec<u64> = (1..=100).map(|i| i * 200).collect();
        let over = Step::judge(100.0, &report_with(&slow, 0), slo);
        assert!(!over.passed);
        assert!(
            over.failures[0].contains("over the SLO of 10.000 ms"),
            "{over:?}"
        );
        let erred = Step::judge(100.0, &report_with(&fast, 2), slo);
        assert_eq!(erred.failures, ["2 errors (overloaded 2)"]);
        let none = Step::judge(100.0, &report_with(&[], 2), slo);
        assert_eq!(none.failures.len(), 2);
        assert!(none.to_row().contains("        -"));
    }

    #[test]
    fn the_sweep_chart_plots_each_step() {
        // Proves the chart has the SLO, the sustainable marker and one point per step.
        let slo = Duration::from_millis(10);
        let fast: Vec<u64> = (1..=100).map(|i| 3_000 + i).collect();
        let steps = vec![
            Step::judge(1000.0, &report_with(&fast, 0), slo),
            Step::judge(2000.0, &report_with(&fast, 1), slo),
        ];
        let report = SweepReport {
            mode: "sweep",
            machine: report_with(&fast, 0).machine,
            parameters: report_with(&fast, 0).parameters,
            slo_p99_ms: 10.0,
            steps,
            sustainable_rate: Some(1000.0),
            stopped: "at 2000 req/s".into(),
        };
        let svg = report.to_svg();
        assert!(svg.contains("sustainable 1000 req/s"));
        assert!(svg.contains("SLO 10 ms"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(report
            .to_text_summary()
            .contains("sustainable 1000.0 req/s"));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["steps"][1]["passed"], false);
    }
}
