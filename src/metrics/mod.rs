//! Latency histograms and the bridge's metrics export.
//!
//! Owns the per-service latency histograms (queue wait, worker service time, total time in the
//! bridge), the owned snapshot a scrape or status report is built from, and three ways out:
//! Prometheus text exposition ([`encode_prometheus`], served by [`http_response`]), HdrHistogram
//! interval logs ([`IntervalLogger`]) and percentiles for `acgi-bridge status` ([`percentiles`]).
//!
//! ```text
//!   core 0: LatencyHistograms ─┐  (recorded without locks, one set per core)
//!   core 1: LatencyHistograms ─┼─ add() ─> MetricsSnapshot ─> encode_prometheus ─> GET /metrics
//!   core N: LatencyHistograms ─┘                           └─> percentiles ─> status
//!   every interval: the cores' last intervals ─> IntervalLogger ─> .hlog
//! ```
//!
//! Everything right of the cores' histograms runs on the bridge's control thread
//! (`engine::control`), never on a core's loop.
//!
//! It must never do I/O on the data path nor allocate there: [`LatencyHistograms::record`] writes
//! into histograms allocated once (fixed memory, auto-resize off) and never panics, whatever the
//! durations. Invariants: values are microseconds in `1 µs ..= 1 hour` (longer ones saturate at
//! the hour); every request recorded counts once in `queue_wait` and `total`, and once in
//! `service` when it reached a worker, so `service.len() <= total.len() == queue_wait.len()`.

#![forbid(unsafe_code)]

pub mod counters;
mod http;
pub mod interval_log;
mod process;
mod prometheus;

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub use counters::BridgeCounters;
pub use http::{
    http_response, metrics_response, parse_request, readiness_response, unavailable_response,
    HttpRequest, REQUEST_HEAD_BYTES_MAX,
};
pub use interval_log::IntervalLogger;
pub use process::ProcessMetrics;
pub use prometheus::{
    build_info, check_with_promtool, encode, encode_prometheus, prometheus_buckets,
    ExpositionFormat, PromtoolError, BUCKET_BOUNDS_US, CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE,
};

/// Smallest latency the histograms tell apart, in microseconds.
pub const LATENCY_US_MIN: u64 = 1;
/// Largest latency the histograms track, in microseconds (one hour); longer ones saturate here.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Precision of the histograms: values are kept to 3 significant decimal digits (0.1 %).
pub const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// A latency histogram as the bridge keeps them: microseconds, 1 µs ..= 1 hour, 3 significant
/// figures, fixed memory (23,552 counts of 8 bytes: 184 KiB).
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants the crate accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(LATENCY_US_MIN, LATENCY_US_MAX, LATENCY_SIGNIFICANT_FIGURES)
        .expect("constant histogram bounds are valid")
}

/// The three latencies of one service's requests, in microseconds, with the exact sums the
/// Prometheus `_sum` series need (an HdrHistogram keeps counts, not sums).
///
/// Record through [`LatencyHistograms::record`] so the sums stay in step with the histograms.
#[derive(Clone, Debug)]
pub struct LatencyHistograms {
    /// Request arrival to hand-over to a worker (or to its rejection from the backlog).
    pub queue_wait: Histogram<u64>,
    /// Hand-over to the worker's answer; only requests that reached a worker.
    pub service: Histogram<u64>,
    /// Arrival to answer: the whole time in the bridge.
    pub total: Histogram<u64>,
    /// Exact sums of the recorded durations (not clamped at the histograms' hour).
    pub queue_wait_sum: Duration,
    pub service_sum: Duration,
    pub total_sum: Duration,
}

impl Default for LatencyHistograms {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistograms {
    pub fn new() -> Self {
        Self {
            queue_wait: latency_histogram(),
            service: latency_histogram(),
            total: latency_histogram(),
            queue_wait_sum: Duration::ZERO,
            service_sum: Duration::ZERO,
            total_sum: Duration::ZERO,
        }
    }

    /// Record one finished request. `service` is `None` for requests that never reached a
    /// worker (rejected or expired in the backlog). Durations past an hour saturate at the hour
    /// in the histograms; never panics and never allocates.
    pub fn record(&mut self, queue_wait: Duration, service: Option<Duration>, total: Duration) {
        self.queue_wait.saturating_record(micros(queue_wait));
        self.queue_wait_sum = self.queue_wait_sum.saturating_add(queue_wait);
        if let Some(service) = service {
            self.service.saturating_record(micros(service));
            self.service_sum = self.service_sum.saturating_add(service);
        }
        self.total.saturating_record(micros(total));
        self.total_sum = self.total_sum.saturating_add(total);
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Merge `other` into `self` (cores into a snapshot, intervals into a total).
    pub fn add(&mut self, other: &LatencyHistograms) {
        add_histogram(&mut self.queue_wait, &other.queue_wait);
        add_histogram(&mut self.service, &other.service);
        add_histogram(&mut self.total, &other.total);
        self.queue_wait_sum = self.queue_wait_sum.saturating_add(other.queue_wait_sum);
        self.service_sum = self.service_sum.saturating_add(other.service_sum);
        self.total_sum = self.total_sum.saturating_add(other.total_sum);
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Forget everything recorded (start a new interval); keeps the memory.
    pub fn reset(&mut self) {
        self.queue_wait.reset();
        self.service.reset();
        self.total.reset();
        self.queue_wait_sum = Duration::ZERO;
        self.service_sum = Duration::ZERO;
        self.total_sum = Duration::ZERO;
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Requests recorded (each counts once in `total`).
    pub fn count(&self) -> u64 {
        self.total.len()
    }

    /// Asserts the invariants in the module doc (when recorded through `record`).
    pub fn check_invariants(&self) {
        assert_eq!(self.queue_wait.len(), self.total.len());
        assert!(self.service.len() <= self.total.len());
        for h in [&self.queue_wait, &self.service, &self.total] {
            assert!(
                h.high() >= LATENCY_US_MAX,
                "a latency histogram must reach an hour"
            );
        }
    }
}

/// A duration in whole microseconds, saturating (the histograms clamp to their hour anyway).
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// `into += from`, never failing: histograms of another range are added value by value,
/// saturating at `into`'s maximum.
fn add_histogram(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for value in from.iter_recorded() {
            into.saturating_record_n(value.value_iterated_to(), value.count_at_value());
        }
    }
}

/// Everything one scrape or status report needs, owned (the engine builds it on demand by
/// merging its cores' counters and histograms).
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Caller connections open now.
    pub connections: u64,
    /// Worker slots in use now.
    pub slots_in_use: u64,
    /// Caller connections open now on each core.
    pub connections_by_core: Vec<u64>,
    /// The bridge-wide counters, summed across cores.
    pub counters: BridgeCounters,
    pub services: Vec<ServiceMetrics>,
    /// The bridge's own process (`process_*`), when `/proc/self` could be read.
    pub process: Option<ProcessMetrics>,
}

/// A service as `/readyz` and `acgi_bridge_service_state` see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceState {
    /// It has an idle or busy worker, or needs none up to serve (it can start one).
    #[default]
    Ok,
    /// It keeps workers running (`min_workers` > 0, or static) and none is up yet.
    Starting,
    /// Crash loop: requests are refused while it restarts workers with a backoff.
    Failing,
    /// The bridge is stopping.
    Stopping,
}

impl ServiceState {
    pub const ALL: [ServiceState; 4] = [
        ServiceState::Ok,
        ServiceState::Starting,
        ServiceState::Failing,
        ServiceState::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Ok => "ok",
            ServiceState::Starting => "starting",
            ServiceState::Failing => "failing",
            ServiceState::Stopping => "stopping",
        }
    }
}

/// One service's counters, gauges and latencies since start.
#[derive(Clone, Debug, Default)]
pub struct ServiceMetrics {
    pub name: String,
    pub id: u32,
    pub requests_ok: u64,
    /// Requests answered with an error, by outcome name in snake_case (`overloaded`,
    /// `timed_out`, ...). Each name at most once.
    pub requests_failed: Vec<(&'static str, u64)>,
    /// Payload bytes received from callers.
    pub bytes_in: u64,
    /// Payload bytes sent to callers.
    pub bytes_out: u64,
    /// Requests or replies that took the copy path instead of a slot hand-over.
    pub copy_path: u64,
    /// Workers killed or lost for a fault, by fault label (every label, zeros included).
    pub worker_faults: Vec<(&'static str, u64)>,
    /// Workers that could not be started, by reason label (every label, zeros included).
    pub spawn_failures: Vec<(&'static str, u64)>,
    pub spawns: u64,
    /// Worker exits by reason: `recycled`, `idle`, `crashed`, `timed_out`, `killed`,
    /// `shutdown`, `failed_start`.
    pub exits: Vec<(&'static str, u64)>,
    /// Workers now by state: `starting`, `idle`, `busy`, `stopping`.
    pub workers: Vec<(&'static str, u64)>,
    /// Requests waiting for a worker now.
    pub backlog: u64,
    pub state: ServiceState,
    /// The pool's bounds over every core, and the configured `backlog_max`.
    pub min_workers: u64,
    pub max_workers: u64,
    pub backlog_max: u64,
    pub latency: LatencyHistograms,
}

/// Percentiles of one histogram, in microseconds, for `acgi-bridge status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// p50/p99/p99.9/max of a histogram of microseconds; all zero when it is empty. Each is the
/// highest value equivalent to the recorded ones (within the histogram's 0.1 %).
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn record_counts_each_request_once_and_service_only_when_reached() {
        // Proves: record() fills the three histograms and sums, skipping service for rejections.
        let mut h = LatencyHistograms::new();
        h.record(us(10), Some(us(90)), us(100));
        h.record(us(500), None, us(500));
        assert_eq!(h.count(), 2);
        assert_eq!(h.queue_wait.len(), 2);
        assert_eq!(h.service.len(), 1);
        assert_eq!(h.total.len(), 2);
        assert_eq!(h.queue_wait_sum, us(510));
        assert_eq!(h.service_sum, us(90));
        assert_eq!(h.total_sum, us(600));
        assert_eq!(h.total.min(), 100);
        assert_eq!(h.total.max(), 500);
        h.check_invariants();
    }

    #[test]
    fn record_saturates_at_the_hour_and_never_panics() {
        // Proves: huge and zero durations are recorded (clamped), with exact sums.
        let mut h = LatencyHistograms::new();
        h.record(Duration::MAX, Some(Duration::MAX), Duration::MAX);
        h.record(Duration::ZERO, Some(Duration::ZERO), Duration::ZERO);
        h.record(Duration::from_secs(7200), None, Duration::from_secs(7200));
        assert_eq!(h.total.len(), 3);
        assert!(h.total.max() >= LATENCY_US_MAX);
        assert!(h.total.max() <= h.total.highest_equivalent(LATENCY_US_MAX));
        assert_eq!(h.total.min(), 0);
        assert_eq!(h.total_sum, Duration::MAX);
        let before = h.total.high();
        h.record(Duration::MAX, None, Duration::MAX);
        assert_eq!(
            h.total.high(),
            before,
            "auto-resize must stay off (fixed memory)"
        );
        assert_eq!(
            h.total.distinct_values(),
            23_552,
            "the memory the docs state"
        );
        h.check_invariants();
    }

    #[test]
    fn add_merges_cores_and_reset_empties() {
        // Proves: add() sums counts, extremes and sums of two cores; reset() forgets them.
        let mut core0 = LatencyHistograms::new();
        let mut core1 = LatencyHistograms::new();
        for n in 1..=100 {
            core0.record(us(n), Some(us(n)), us(2 * n));
        }
        core1.record(us(5_000), None, us(5_000));
        let mut merged = LatencyHistograms::new();
        merged.add(&core0);
        merged.add(&core1);
        assert_eq!(merged.count(), 101);
        assert_eq!(merged.service.len(), 100);
        assert!(merged.total.equivalent(merged.total.max(), 5_000));
        assert_eq!(merged.total.min(), 2);
        assert_eq!(merged.total_sum, us(2 * 5050 + 5_000));
        assert_eq!(merged.queue_wait_sum, us(5050 + 5_000));
        // Adding into a non-empty histogram takes the other branch of the crate's add.
        merged.add(&core1);
        assert_eq!(merged.count(), 102);
        assert_eq!(merged.total.count_at(5_000), 2);
        merged.reset();
        assert_eq!(merged.count(), 0);
        assert_eq!(merged.total_sum, Duration::ZERO);
        assert_eq!(percentiles(&merged.total), Percentiles::default());
        merged.check_invariants();
    }

    #[test]
    fn add_of_a_histogram_with_another_range_saturates_instead_of_failing() {
        // Proves: merging a foreign (wider) histogram never panics and keeps every count.
        let mut wide = Histogram::<u64>::new_with_bounds(1, u64::MAX, 3).unwrap();
        wide.record(10 * LATENCY_US_MAX).unwrap();
        wide.record(7).unwrap();
        let mut into = latency_histogram();
        add_histogram(&mut into, &wide);
        assert_eq!(into.len(), 2);
        assert_eq!(into.count_at(7), 1);
        assert!(into.max() >= LATENCY_US_MAX);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        // Proves: percentiles() reports count, p50, p99, p99.9 and max in microseconds.
        let mut h = latency_histogram();
        for n in 1..=1000 {
            h.record(n).unwrap();
        }
        let p = percentiles(&h);
        assert_eq!(
            p,
            Percentiles {
                count: 1000,
                p50_us: 500,
                p99_us: 990,
                p999_us: 999,
                max_us: 1000
            }
        );
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Percentiles>(&json).unwrap(), p);
    }

    #[test]
    fn percentiles_of_large_values_are_within_the_precision() {
        // Proves: past 2048 µs values are approximate, within 0.1 %, never below the truth.
        let mut h = latency_histogram();
        h.record(1_234_567).unwrap();
        let p = percentiles(&h);
        assert_eq!(p.count, 1);
        assert!(p.p50_us >= 1_234_567 && p.p50_us <= 1_234_567 + 1_235);
        assert_eq!(p.max_us, p.p50_us);
    }
}
