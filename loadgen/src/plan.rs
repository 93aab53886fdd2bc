//! `acgi-loadgen plan`: size a service's pool for a rate and a p99 objective, then check it.
//!
//! ```text
//!  1. measure   one request at a time (no queueing), N samples: the service-time distribution
//!               S, its mean 1/mu and its spread; each sample is a whole round trip through
//!               the bridge, so the bridge's own hops count as service (slightly conservative)
//!  2. size      M/M/c at lambda = --rate: the smallest c whose predicted p99 of wait + S is
//!               within the SLO (queueing::workers_for_slo), from Little's floor A = lambda/mu
//!  3. advise    the min_workers / max_workers / backlog_max to configure
//!  4. verify    an open-loop run at --rate (Poisson arrivals, as the model assumes), latency
//!               from intended send times, printed beside the predictions
//! ```
//!
//! The predictions are made for `--configured-workers` when given (the pool the bridge really
//! has), else for `--workers`, else for the sized pool. Pure arithmetic lives in
//! [`crate::queueing`]; this module measures, formats and compares.

use std::fmt::Write as _;
use std::time::Duration;

use acgi_client::CallError;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::machine::Machine;
use crate::mix::Rng;
use crate::payload::Payload;
use crate::queueing::{knee_rate, workers_for_slo, Model, ServiceTime, WaitModel};
use crate::report::Report;
use crate::stats::{new_histogram, LatencySummary};
use crate::svg::{self, Series, PALETTE};
use crate::workload::{connect_all, RunError, Workload};

/// Quantile the SLO is on.
pub const SLO_QUANTILE: f64 = 0.99;

/// Probability below which the backlog advice says the queue stays (per arrival).
pub const BACKLOG_OVERFLOW_PROBABILITY: f64 = 1e-6;

/// Most rows of the by-pool-size table.
const TABLE_ROWS_MAX: u32 = 12;

/// The service-time measurement.
#[derive(Clone, Debug)]
pub struct Sampled {
    /// Round trips, microseconds.
    pub histogram: Histogram<u64>,
    pub errors: u64,
    /// The first error's text, if any.
    pub first_error: Option<String>,
}

/// Call the workload's services one at a time on one connection: `warmup_calls` unrecorded,
/// then `samples` recorded round trips.
pub async fn measure_service_time(
    workload: &Workload,
    samples: u32,
    warmup_calls: u32,
) -> Result<Sampled, RunError> {
    workload.check();
    let connection = connect_all(workload, 1)
        .await?
        .pop()
        .expect("one connection");
    let mut payloads: Vec<Payload> = workload
        .payloads
        .values()
        .map(|kind| Payload::of_kind(kind, 0, 0))
        .collect();
    let mut rng = Rng::for_stream(workload.seed, 0xC0FFEE);
    let mut histogram = new_histogram();
    let mut errors = 0;
    let mut first_error: Option<CallError> = None;
    for sequence in 0..u64::from(warmup_calls + samples) {
        let service = workload.services.pick(&mut rng);
        let payload = &mut payloads[workload.payloads.pick(&mut rng)];
        payload.stamp(sequence);
        let started = Instant::now();
        let result = connection
            .client
            .call(connection.service_ids[service], payload.as_bytes())
            .await;
        let elapsed = started.elapsed();
        if sequence < u64::from(warmup_calls) {
            continue;
        }
        match result {
            Ok(_) => histogram.saturating_record(elapsed.as_micros().max(1) as u64),
            Err(error) => {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    Ok(Sampled {
        histogram,
        errors,
        first_error: first_error.map(|error| error.to_string()),
    })
}

/// The measured distribution in the model's terms (seconds).
pub fn service_time_of(histogram: &Histogram<u64>) -> ServiceTime {
    assert!(!histogram.is_empty(), "no service-time samples");
    ServiceTime::from_counts(histogram.iter_recorded().map(|value| {
        // The bucket's middle: HdrHistogram keeps values to 3 significant figures.
        let us = histogram.median_equivalent(value.value_iterated_to());
        (us as f64 / 1e6, value.count_at_value())
    }))
}

/// The model's view of one pool size at the planned rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub model: WaitModel,
    pub workers: u32,
    /// `rho = lambda / (c mu)`.
    pub utilisation: f64,
    /// `A = lambda / mu`, by Little's law the mean number of busy workers.
    pub busy_workers: f64,
    /// Erlang C.
    pub wait_probability: f64,
    pub wait_mean_ms: f64,
    pub wait_p99_ms: f64,
    pub latency_mean_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_p99_9_ms: f64,
    /// The highest rate at which this pool keeps p99 within the SLO.
    pub knee_rate: f64,
    /// `c mu`: the rate at which the backlog grows without bound.
    pub saturation_rate: f64,
}

impl Prediction {
    pub fn of(
        kind: WaitModel,
        lambda: f64,
        service: &ServiceTime,
        workers: u32,
        slo: Duration,
    ) -> Prediction {
        let model = Model::of(kind, lambda, service, workers);
        let ms = |seconds: f64| seconds * 1000.0;
        let stable = model.is_stable();
        let latency = |q| {
            if stable {
                ms(model.latency_quantile(service, q))
            } else {
                f64::INFINITY
            }
        };
        Prediction {
            model: kind,
            workers,
            utilisation: model.utilisation(),
            busy_workers: model.offered(),
            wait_probability: model.wait_probability(),
            wait_mean_ms: ms(model.wait_mean()),
            wait_p99_ms: if stable {
                ms(model.wait_quantile(SLO_QUANTILE))
            } else {
                f64::INFINITY
            },
            latency_mean_ms: ms(model.latency_mean(service)),
            latency_p50_ms: latency(0.5),
            latency_p99_ms: latency(SLO_QUANTILE),
            latency_p99_9_ms: latency(0.999),
            knee_rate: knee_rate(kind, workers, service, SLO_QUANTILE, slo.as_secs_f64()),
            saturation_rate: f64::from(workers) * service.rate(),
        }
    }
}

/// What to put in the bridge's config.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigAdvice {
    pub service: String,
    /// `static`: every worker started with the bridge and kept (PHP-FPM's `pm = static`).
    pub mode: &'static str,
    pub min_workers: u32,
    pub max_workers: u32,
    /// A backlog the queue exceeds with probability below [`BACKLOG_OVERFLOW_PROBABILITY`].
    pub backlog_max: u32,
}

impl ConfigAdvice {
    pub fn for_pool(service: &str, workers: u32, lambda: f64, mu: f64) -> ConfigAdvice {
        let model = Model::mmc(lambda, mu, workers);
        // M/M/c: P(at least n waiting) = C rho^n.
        let waiting = model.wait_probability();
        let rho = model.utilisation();
        let backlog = if !model.is_stable() {
            u32::MAX
        } else if waiting <= BACKLOG_OVERFLOW_PROBABILITY || rho <= 0.0 {
            1
        } else {
            ((BACKLOG_OVERFLOW_PROBABILITY / waiting).ln() / rho.ln()).ceil() as u32
        };
        ConfigAdvice {
            service: service.to_string(),
            mode: "static",
            min_workers: workers,
            max_workers: workers,
            backlog_max: backlog.max(1),
        }
    }

    pub fn to_toml(&self) -> String {
        format!(
            "[[service]] name = \"{}\": mode = \"{}\", min_workers = {}, max_workers = {}, \
             backlog_max >= {}",
            self.service, self.mode, self.min_workers, self.max_workers, self.backlog_max
        )
    }
}

/// The measured service time, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceTimeSummary {
    pub samples: u64,
    pub errors: u64,
    pub mean_us: f64,
    /// Squared coefficient of variation (0: constant, 1: exponential as M/M/c assumes).
    pub cv_squared: f64,
    /// Completions per second of one worker, `1 / mean`.
    pub mu: f64,
    pub latency_us: Option<LatencySummary>,
}

/// Everything `plan` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanReport {
    pub mode: &'static str,
    pub machine: Machine,
    pub service: String,
    pub payloads: String,
    pub rate: f64,
    pub slo_p99_ms: f64,
    pub service_time: ServiceTimeSummary,
    /// Little's law: `lambda E[S]` workers busy on average.
    pub busy_workers: f64,
    /// The smallest pool meeting the SLO (M/M/c); `None` when no pool can.
    pub sized_workers: Option<u32>,
    /// `--workers`, else the sized pool.
    pub recommended_workers: Option<u32>,
    pub configured_workers: Option<u32>,
    /// The pool the comparison is made for.
    pub predicted_for: Option<u32>,
    pub configure: Option<ConfigAdvice>,
    /// M/M/c by pool size around the recommendation.
    pub by_pool_size: Vec<(Prediction, Prediction)>,
    pub predicted: Option<Prediction>,
    pub predicted_allen_cunneen: Option<Prediction>,
    /// The verification run, unless `--predict-only`.
    pub measured: Option<Report>,
    pub passed: bool,
    pub failures: Vec<String>,
}

/// The inputs of [`PlanReport::build`].
pub struct PlanInputs<'a> {
    pub machine: Machine,
    pub service: &'a str,
    pub payloads: String,
    pub rate: f64,
    pub slo: Duration,
    pub workers: Option<u32>,
    pub configured_workers: Option<u32>,
}

impl PlanReport {
    /// Size and predict from the measured service time (no verification run yet).
    pub fn build(inputs: &PlanInputs<'_>, sampled: &Sampled) -> PlanReport {
        let histogram = &sampled.histogram;
        let mut failures = Vec::new();
        if histogram.is_empty() {
            failures.push(format!(
                "no service-time sample succeeded ({} errors{})",
                sampled.errors,
                sampled
                    .first_error
                    .as_ref()
                    .map(|error| format!(", first: {error}"))
                    .unwrap_or_default()
            ));
        }
        if !histogram.is_empty() && sampled.errors > 0 {
            failures.push(format!(
                "{} of the service-time calls failed{}: the service time is suspect",
                sampled.errors,
                sampled
                    .first_error
                    .as_ref()
                    .map(|error| format!(" (first: {error})"))
                    .unwrap_or_default()
            ));
        }
        let service_time = if histogram.is_empty() {
            None
        } else {
            Some(service_time_of(histogram))
        };
        let summary = ServiceTimeSummary {
            samples: histogram.len(),
            errors: sampled.errors,
            mean_us: service_time.as_ref().map_or(0.0, |s| s.mean() * 1e6),
            cv_squared: service_time.as_ref().map_or(0.0, ServiceTime::cv_squared),
            mu: service_time.as_ref().map_or(0.0, ServiceTime::rate),
            latency_us: LatencySummary::of(histogram),
        };
        let mut report = PlanReport {
            mode: "plan",
            machine: inputs.machine.clone(),
            service: inputs.service.to_string(),
            payloads: inputs.payloads.clone(),
            rate: inputs.rate,
            slo_p99_ms: inputs.slo.as_secs_f64() * 1000.0,
            service_time: summary,
            busy_workers: 0.0,
            sized_workers: None,
            recommended_workers: inputs.workers,
            configured_workers: inputs.configured_workers,
            predicted_for: None,
            configure: None,
            by_pool_size: Vec::new(),
            predicted: None,
            predicted_allen_cunneen: None,
            measured: None,
            passed: false,
            failures,
        };
        let Some(service) = service_time else {
            return report;
        };
        let lambda = inputs.rate;
        let slo = inputs.slo;
        report.busy_workers = lambda * service.mean();
        report.sized_workers = workers_for_slo(
            WaitModel::Mmc,
            lambda,
            &service,
            SLO_QUANTILE,
            slo.as_secs_f64(),
        );
        if report.sized_workers.is_none() {
            report.failures.push(format!(
                "no pool meets p99 <= {} ms: the service's own p99 is {:.3} ms",
                report.slo_p99_ms,
                service.quantile(SLO_QUANTILE) * 1000.0
            ));
        }
        report.recommended_workers = inputs.workers.or(report.sized_workers);
        report.predicted_for = inputs.configured_workers.or(report.recommended_workers);
        if let Some(workers) = report.recommended_workers {
            report.configure = Some(ConfigAdvice::for_pool(
                inputs.service,
                workers,
                lambda,
                service.rate(),
            ));
        }
        if let Some(workers) = report.predicted_for {
            report.predicted = Some(Prediction::of(
                WaitModel::Mmc,
                lambda,
                &service,
                workers,
                slo,
            ));
            report.predicted_allen_cunneen = Some(Prediction::of(
                WaitModel::AllenCunneen,
                lambda,
                &service,
                workers,
                slo,
            ));
        }
        let first_stable = (report.busy_workers.floor() as u32 + 1).max(1);
        let focus = report
            .predicted_for
            .into_iter()
            .chain(report.recommended_workers)
            .max()
            .unwrap_or(first_stable);
        let last = focus.max(first_stable) + 2;
        let first = first_stable.max(last.saturating_sub(TABLE_ROWS_MAX - 1));
        report.by_pool_size = (first..=last)
            .map(|workers| {
                (
                    Prediction::of(WaitModel::Mmc, lambda, &service, workers, slo),
                    Prediction::of(WaitModel::AllenCunneen, lambda, &service, workers, slo),
                )
            })
            .collect();
        report.passed = report.failures.is_empty();
        report
    }

    /// Attach the verification run and judge it against the SLO.
    pub fn attach_measured(&mut self, measured: Report) {
        for failure in &measured.failures {
            self.failures.push(format!("verification run: {failure}"));
        }
        if measured.errors_total > 0 {
            self.failures.push(format!(
                "verification run: {} errors",
                measured.errors_total
            ));
        }
        if let Some(latency) = &measured.latency_us {
            let p99_ms = latency.p99 as f64 / 1000.0;
            if p99_ms > self.slo_p99_ms {
                self.failures.push(format!(
                    "measured p99 {p99_ms:.3} ms is over the SLO of {} ms",
                    self.slo_p99_ms
                ));
            }
        }
        self.measured = Some(measured);
        self.passed = self.failures.is_empty();
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "acgi-loadgen plan");
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine     {} cpus, kernel {}, {}",
            m.nproc, m.kernel, m.cpu_model
        );
        let _ = writeln!(
            out,
            "goal        service {} (payloads {}) at {} req/s with p99 <= {} ms",
            self.service, self.payloads, self.rate, self.slo_p99_ms
        );
        let s = &self.service_time;
        let _ = writeln!(
            out,
            "\nservice time: {} calls one at a time (each a round trip through the bridge), \
             {} errors",
            s.samples, s.errors
        );
        if let Some(latency) = &s.latency_us {
            let _ = writeln!(
                out,
                "            mean {:.3} ms (mu = {:.1} req/s per worker), cv^2 {:.3}",
                s.mean_us / 1000.0,
                s.mu,
                s.cv_squared
            );
            let _ = writeln!(out, "            {}", ms_cells(latency));
            let _ = writeln!(
                out,
                "\nLittle's law: {} req/s x {:.3} ms = {:.2} workers busy on average, so at \
                 least {} workers",
                self.rate,
                s.mean_us / 1000.0,
                self.busy_workers,
                self.busy_workers.floor() as u64 + 1
            );
        }
        if !self.by_pool_size.is_empty() {
            let _ = writeln!(
                out,
                "\nM/M/c (Erlang C) at {} req/s, latency = wait + measured service time \
                 (M/G/c: Allen-Cunneen, wait x (1 + cv^2)/2):",
                self.rate
            );
            let _ = writeln!(
                out,
                " workers    rho  P(wait)  Wq mean ms  Wq p99 ms  p99 ms M/M/c  p99 ms M/G/c  \
                 knee req/s M/M/c"
            );
            for (mmc, mgc) in &self.by_pool_size {
                let mark = if Some(mmc.workers) == self.sized_workers {
                    "  <- smallest meeting the SLO"
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "{:>8} {:>6.3} {:>8.3} {:>11} {:>10} {:>13} {:>13} {:>17.0}{mark}",
                    mmc.workers,
                    mmc.utilisation,
                    mmc.wait_probability,
                    finite(mmc.wait_mean_ms),
                    finite(mmc.wait_p99_ms),
                    finite(mmc.latency_p99_ms),
                    finite(mgc.latency_p99_ms),
                    mmc.knee_rate
                );
            }
        }
        match (self.sized_workers, self.recommended_workers) {
            (Some(sized), Some(recommended)) if sized != recommended => {
                let _ = writeln!(
                    out,
                    "\nsized       {sized} workers; --workers {recommended} overrides it"
                );
            }
            (Some(sized), _) => {
                let _ = writeln!(
                    out,
                    "\nsized       {sized} workers: the smallest pool whose predicted p99 is \
                     within {} ms",
                    self.slo_p99_ms
                );
            }
            (None, _) => {}
        }
        if let Some(advice) = &self.configure {
            let _ = writeln!(out, "configure   {}", advice.to_toml());
            let _ = writeln!(
                out,
                "            (static, min = max: every worker is started ahead of the load and \
                 the pool is the one the model assumes;\n             a larger max_workers adds \
                 headroom for bursts above {} req/s)",
                self.rate
            );
        }
        if let (Some(mmc), Some(mgc)) = (&self.predicted, &self.predicted_allen_cunneen) {
            let whose = match self.configured_workers {
                Some(_) => "as configured (--configured-workers)",
                None => "assuming the pool is configured as advised",
            };
            let _ = writeln!(
                out,
                "\nprediction  {} workers, {whose}: rho {:.3}, P(wait) {:.3}, knee {:.0} req/s \
                 (M/M/c) / {:.0} req/s (M/G/c), saturation {:.0} req/s",
                mmc.workers,
                mmc.utilisation,
                mmc.wait_probability,
                mmc.knee_rate,
                mgc.knee_rate,
                mmc.saturation_rate
            );
            let measured = self.measured.as_ref();
            let measured_latency = measured.and_then(|m| m.latency_us);
            let column = |value: Option<f64>| match value {
                Some(value) => format!("{value:>10.3}"),
                None => format!("{:>10}", "-"),
            };
            let us_to_ms = |pick: fn(&LatencySummary) -> f64| {
                measured_latency.as_ref().map(|l| pick(l) / 1000.0)
            };
            let _ = writeln!(out, "\n                       M/M/c      M/G/c   measured");
            let rows: [(&str, f64, f64, Option<f64>); 5] = [
                (
                    "throughput req/s",
                    self.rate,
                    self.rate,
                    measured.map(|m| m.requests_per_second),
                ),
                (
                    "latency mean ms",
                    mmc.latency_mean_ms,
                    mgc.latency_mean_ms,
                    us_to_ms(|l| l.mean),
                ),
                (
                    "latency p50 ms",
                    mmc.latency_p50_ms,
                    mgc.latency_p50_ms,
                    us_to_ms(|l| l.p50 as f64),
                ),
                (
                    "latency p99 ms",
                    mmc.latency_p99_ms,
                    mgc.latency_p99_ms,
                    us_to_ms(|l| l.p99 as f64),
                ),
                (
                    "latency p99.9 ms",
                    mmc.latency_p99_9_ms,
                    mgc.latency_p99_9_ms,
                    us_to_ms(|l| l.p99_9 as f64),
                ),
            ];
            for (label, predicted, second, seen) in rows {
                if label.starts_with("throughput") {
                    // A rate: one decimal is plenty.
                    let seen = seen.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
                    let _ = writeln!(
                        out,
                        "{label:<18} {predicted:>10.1} {second:>10.1} {seen:>10}"
                    );
                    continue;
                }
                let _ = writeln!(
                    out,
                    "{label:<18} {:>10} {:>10} {}",
                    finite(predicted),
                    finite(second),
                    column(seen)
                );
            }
            let _ = writeln!(
                out,
                "{:<18} {:>10.3} {:>10.3} {}",
                "queue wait p99 ms",
                mmc.wait_p99_ms,
                mgc.wait_p99_ms,
                format_args!("{:>10}", "-")
            );
        }
        if let Some(measured) = &self.measured {
            let p = &measured.parameters;
            let _ = writeln!(
                out,
                "\nmeasured    open loop, {} arrivals at {} req/s over {} connections, {} s \
                 after {} s warm-up: offered {:.1} req/s, {} completed, {} errors",
                p.arrival
                    .unwrap_or(crate::open_loop::Arrival::Poisson)
                    .name(),
                self.rate,
                p.connections,
                p.duration_s,
                p.warmup_s,
                measured.offered_per_second.unwrap_or(0.0),
                measured.requests_completed,
                measured.errors_total
            );
            if let Some(latency) = &measured.latency_us {
                let _ = writeln!(out, "            corrected   {}", ms_cells(latency));
            }
            if let Some(latency) = &measured.latency_uncorrected_us {
                let _ = writeln!(out, "            uncorrected {}", ms_cells(latency));
            }
            if let Some(lag) = &measured.send_lag_us {
                let _ = writeln!(out, "            send lag    {}", ms_cells(lag));
            }
        }
        let result = if self.passed {
            if self.measured.is_some() {
                "ok (measured p99 within the SLO, no errors)".to_string()
            } else {
                "ok (prediction only)".to_string()
            }
        } else {
            format!("FAILED: {}", self.failures.join("; "))
        };
        let _ = writeln!(out, "result      {result}");
        out
    }
}

/// `p50 3.131  p90 3.170 ... max 4.012 ms` from a microsecond summary.
fn ms_cells(latency: &LatencySummary) -> String {
    let cells: Vec<String> = latency
        .rows()
        .iter()
        .map(|(label, us)| format!("{label} {:.3}", *us as f64 / 1000.0))
        .collect();
    format!("{} ms", cells.join("  "))
}

fn finite(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.3}")
    } else {
        "unbounded".to_string()
    }
}

/// The percentile chart of a plan: measured (corrected and uncorrected) against the models.
pub fn plan_chart(
    report: &PlanReport,
    service: &ServiceTime,
    corrected: &Histogram<u64>,
    uncorrected: &Histogram<u64>,
) -> String {
    let measured_points = |histogram: &Histogram<u64>| -> Vec<(f64, f64)> {
        crate::hgrm::percentile_rows(histogram)
            .into_iter()
            .map(|(q, us, _)| (q, us as f64 / 1000.0))
            .collect()
    };
    let samples = corrected.len();
    let nines_max = (samples.max(10) as f64)
        .log10()
        .ceil()
        .clamp(2.0, f64::from(svg::NINES_MAX));
    let grid: Vec<f64> = (0..=(nines_max * 10.0) as u32)
        .map(|tenth| 1.0 - 10f64.powf(-f64::from(tenth) / 10.0))
        .collect();
    let mut series = vec![
        Series {
            label: "measured (from intended send times)".to_string(),
            colour: PALETTE[0],
            dashed: false,
            points: measured_points(corrected),
        },
        Series {
            label: "measured, uncorrected (from actual sends)".to_string(),
            colour: PALETTE[0],
            dashed: true,
            points: measured_points(uncorrected),
        },
    ];
    if let Some(workers) = report.predicted_for {
        for (kind, label, colour) in [
            (WaitModel::Mmc, "M/M/c prediction", PALETTE[1]),
            (
                WaitModel::AllenCunneen,
                "M/G/c (Allen-Cunneen) prediction",
                PALETTE[2],
            ),
        ] {
            let model = Model::of(kind, report.rate, service, workers);
            if !model.is_stable() {
                continue;
            }
            series.push(Series {
                label: format!("{label}, {workers} workers"),
                colour,
                dashed: false,
                points: grid
                    .iter()
                    .map(|q| (*q, model.latency_quantile(service, *q) * 1000.0))
                    .collect(),
            });
        }
    }
    let subtitle = format!(
        "service {} at {} req/s (Poisson), payloads {}; SLO p99 {} ms",
        report.service, report.rate, report.payloads, report.slo_p99_ms
    );
    svg::percentile_chart(
        "acgi-loadgen plan: latency by percentile, predicted and measured",
        &subtitle,
        &series,
        samples,
        Some(report.slo_p99_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled_constant(us: u64, count: u64) -> Sampled {
        let mut histogram = new_histogram();
        histogram.record_n(us, count).unwrap();
        Sampled {
            histogram,
            errors: 0,
            first_error: None,
        }
    }

    fn inputs(workers: Option<u32>, configured: Option<u32>) -> PlanInputs<'static> {
        PlanInputs {
            machine: Machine {
                nproc: 2,
                kernel: "6.18.0".to_string(),
                cpu_model: "Test CPU".to_string(),
            },
            service: "faulty",
            payloads: "\"sleep 3\"".to_string(),
            rate: 3000.0,
            slo: Duration::from_millis(10),
            workers,
            configured_workers: configured,
        }
    }

    #[test]
    fn the_seeds_example_is_sized_from_littles_floor_up() {
        // Proves a 3 ms service at 3000 req/s: 9 busy, a pool above 9, advice for that pool.
        let report = PlanReport::build(&inputs(None, None), &sampled_constant(3_000, 1000));
        assert!(
            (report.busy_workers - 9.0).abs() < 0.01,
            "{}",
            report.busy_workers
        );
        let sized = report.sized_workers.unwrap();
        assert!(sized >= 10, "{sized}");
        assert_eq!(report.recommended_workers, Some(sized));
        assert_eq!(report.predicted_for, Some(sized));
        let advice = report.configure.as_ref().unwrap();
        assert_eq!((advice.min_workers, advice.max_workers), (sized, sized));
        assert!(advice.backlog_max >= 1);
        let predicted = report.predicted.unwrap();
        assert!(predicted.latency_p99_ms <= 10.0);
        assert!(predicted.knee_rate >= 3000.0);
        assert!(report.passed);
        let text = report.to_text();
        assert!(
            text.contains("9.00 workers busy on average, so at least 10 workers"),
            "{text}"
        );
        assert!(text.contains("<- smallest meeting the SLO"), "{text}");
        assert!(text.contains(&format!("max_workers = {sized}")), "{text}");
        assert!(text.contains("result      ok (prediction only)"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["sized_workers"], sized);
    }

    #[test]
    fn overrides_choose_the_pool_predicted_for() {
        // Proves --workers replaces the advice and --configured-workers the prediction.
        let sampled = sampled_constant(3_000, 1000);
        let report = PlanReport::build(&inputs(Some(20), Some(9)), &sampled);
        assert_eq!(report.recommended_workers, Some(20));
        assert_eq!(report.configure.as_ref().unwrap().max_workers, 20);
        assert_eq!(report.predicted_for, Some(9));
        let predicted = report.predicted.unwrap();
        assert!(predicted.utilisation >= 1.0);
        assert_eq!(predicted.latency_p99_ms, f64::INFINITY);
        assert!(report.to_text().contains("unbounded"));
        // JSON cannot carry infinity: it becomes null, and the object still serialises.
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert!(json["predicted"]["latency_p99_ms"].is_null());
    }

    #[test]
    fn an_slo_below_the_service_time_is_reported_not_sized() {
        // Proves an impossible SLO fails the plan with the reason, and no samples fail it too.
        let mut tight = inputs(None, None);
        tight.slo = Duration::from_millis(2);
        let report = PlanReport::build(&tight, &sampled_constant(3_000, 100));
        assert_eq!(report.sized_workers, None);
        assert!(!report.passed);
        assert!(
            report.failures[0].contains("no pool meets"),
            "{:?}",
            report.failures
        );
        let empty = Sampled {
            histogram: new_histogram(),
            errors: 3,
            first_error: Some("unknown service".into()),
        };
        let report = PlanReport::build(&inputs(None, None), &empty);
        assert!(report.failures[0].contains("first: unknown service"));
        assert!(report.to_text().contains("FAILED"));
        let mut some_failed = sampled_constant(3_000, 100);
        some_failed.errors = 2;
        let report = PlanReport::build(&inputs(None, None), &some_failed);
        assert!(!report.passed);
        assert!(report.failures[0].starts_with("2 of the service-time calls failed"));
    }

    #[test]
    fn the_service_time_comes_from_the_histogram() {
        // Proves the histogram-to-model conversion keeps the mean and the spread.
        let mut histogram = new_histogram();
        histogram.record_n(1_000, 50).unwrap();
        histogram.record_n(3_000, 50).unwrap();
        let service = service_time_of(&histogram);
        assert!(
            (service.mean() - 0.002).abs() < 0.00001,
            "{}",
            service.mean()
        );
        assert!((service.cv_squared() - 0.25).abs() < 0.01);
    }
}
