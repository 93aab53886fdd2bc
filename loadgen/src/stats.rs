//! What a run measured: latency histograms, error counts by code, verification mismatches.
//!
//! Each load task owns one [`Recorder`] and records into it without locks; the driver merges the
//! recorders once, when the tasks end. Latencies are whole microseconds in an HdrHistogram with 3
//! significant figures (values up to an hour; anything longer saturates at the top). Only
//! successful calls are in the histograms: an error answered at once (say `overloaded`) would
//! otherwise make the service look faster than it is. Errors are counted by [`ErrorClass`].
//!
//! Open-loop runs keep three histograms per call (see [`CallTiming`]): the latency from the
//! call's *intended* send time (corrected for coordinated omission: the number reported), the
//! latency from the moment it was actually sent (uncorrected, what a naive generator reports),
//! and the lag between the two (how far the generator itself fell behind). In a closed loop the
//! three coincide (lag 0). Each service of a mix also gets its own latency histogram.

use std::collections::BTreeMap;
use std::time::Duration;

use acgi_client::CallError;
use acgi_proto::ErrorCode;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histogram tells apart, in microseconds (one hour).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant figures kept by the latency histogram.
pub const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// The quantiles every report prints, with their labels ([`quantile_label`]).
pub const QUANTILES: [f64; 4] = [0.50, 0.90, 0.99, 0.999];

/// Why a call failed, as counted in a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorClass {
    /// The bridge answered with an error frame carrying this code.
    Remote(u16),
    /// The connection failed (read or write error).
    Io,
    /// The bridge sent bytes the client could not accept.
    Protocol,
    /// The connection closed with the call outstanding.
    Closed,
    /// No answer before the run's drain deadline; the load generator gave up on the call.
    Unanswered,
    /// Never sent: the open-loop generator already had its limit of calls in flight.
    InFlightLimit,
}

impl ErrorClass {
    pub fn of(error: &CallError) -> ErrorClass {
        if let Some(code) = error.code() {
            return ErrorClass::Remote(code as u16);
        }
        match error {
            CallError::Remote { code, .. } => ErrorClass::Remote(*code),
            CallError::Io(_) => ErrorClass::Io,
            CallError::Protocol(_) => ErrorClass::Protocol,
            CallError::Closed => ErrorClass::Closed,
        }
    }

    /// Whether the connection is unusable after this error, so its tasks should stop.
    pub fn ends_connection(self) -> bool {
        !matches!(self, ErrorClass::Remote(_) | ErrorClass::InFlightLimit)
    }

    /// A stable snake_case label: the error code's name (`overloaded`, `worker_failed`),
    /// `code_N` for a code this build does not know, else the client-side failure.
    pub fn label(self) -> String {
        match self {
            ErrorClass::Remote(code) => match ErrorCode::from_u16(code) {
                Some(known) => known.as_str().replace(' ', "_"),
                None => format!("code_{code}"),
            },
            ErrorClass::Io => "io".to_string(),
            ErrorClass::Protocol => "protocol".to_string(),
            ErrorClass::Closed => "closed".to_string(),
            ErrorClass::Unanswered => "unanswered".to_string(),
            ErrorClass::InFlightLimit => "in_flight_limit".to_string(),
        }
    }
}

/// A reply that differed from its request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub connection: u32,
    pub task: u32,
    pub sequence: u64,
    pub request_bytes: usize,
    pub reply_bytes: usize,
    /// Offset of the first differing byte (or the shorter length).
    pub first_difference: usize,
}

/// The times of one successful call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallTiming {
    /// Index of the service in the run's mix.
    pub service: usize,
    /// From the intended send time to the reply (corrected for coordinated omission).
    pub latency: Duration,
    /// From the actual send to the reply.
    pub uncorrected: Duration,
    /// From the intended to the actual send: the generator's own lateness.
    pub send_lag: Duration,
}

/// One task's measurements (and, after [`Recorder::merge`], a whole run's).
#[derive(Clone, Debug)]
pub struct Recorder {
    latency_us: Histogram<u64>,
    uncorrected_us: Histogram<u64>,
    send_lag_us: Histogram<u64>,
    /// Per service of the mix: latency and error count.
    services: Vec<ServiceRecorder>,
    errors: BTreeMap<ErrorClass, u64>,
    /// Errors during the warm-up: not part of the results, reported so they are not hidden.
    warmup_errors: u64,
    /// Replies that differed from their requests, in any phase.
    mismatches: u64,
    first_mismatch: Option<Mismatch>,
    /// Tasks that stopped before the end of the run because their connection failed.
    tasks_stopped_early: u64,
    /// Calls the client resent on a new connection because a draining bridge refused them
    /// (a binary upgrade): not errors, each succeeded or failed once resent.
    drain_retries: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// One service's share of a run.
#[derive(Clone, Debug)]
pub struct ServiceRecorder {
    pub latency_us: Histogram<u64>,
    pub errors: u64,
}

/// An empty latency histogram with the crate's bounds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_FIGURES)
        .expect("constant histogram bounds are valid")
}

fn whole_us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            latency_us: new_histogram(),
            uncorrected_us: new_histogram(),
            send_lag_us: new_histogram(),
            services: Vec::new(),
            errors: BTreeMap::new(),
            warmup_errors: 0,
            mismatches: 0,
            first_mismatch: None,
            tasks_stopped_early: 0,
            drain_retries: 0,
        }
    }

    /// A call to the first (or only) service succeeded after `latency`, sent on time.
    pub fn record_ok(&mut self, latency: Duration) {
        self.record_call(CallTiming {
            service: 0,
            latency,
            uncorrected: latency,
            send_lag: Duration::ZERO,
        });
    }

    /// A measured call succeeded.
    pub fn record_call(&mut self, timing: CallTiming) {
        assert!(
            timing.uncorrected <= timing.latency,
            "the uncorrected latency is part of the corrected one: {timing:?}"
        );
        let latency_us = whole_us(timing.latency);
        self.latency_us.saturating_record(latency_us);
        self.uncorrected_us
            .saturating_record(whole_us(timing.uncorrected));
        self.send_lag_us
            .saturating_record(whole_us(timing.send_lag));
        self.service(timing.service)
            .latency_us
            .saturating_record(latency_us);
    }

    fn service(&mut self, index: usize) -> &mut ServiceRecorder {
        while self.services.len() <= index {
            self.services.push(ServiceRecorder {
                latency_us: new_histogram(),
                errors: 0,
            });
        }
        &mut self.services[index]
    }

    /// A measured call failed (service unknown or irrelevant).
    pub fn record_error(&mut self, class: ErrorClass) {
        *self.errors.entry(class).or_insert(0) += 1;
    }

    /// A measured call to service `service` of the mix failed.
    pub fn record_service_error(&mut self, service: usize, class: ErrorClass) {
        self.record_error(class);
        self.service(service).errors += 1;
    }

    /// A warm-up call failed.
    pub fn record_warmup_error(&mut self) {
        self.warmup_errors += 1;
    }

    pub fn record_mismatch(&mut self, mismatch: Mismatch) {
        self.mismatches += 1;
        if self.first_mismatch.is_none() {
            self.first_mismatch = Some(mismatch);
        }
    }

    pub fn record_stopped_early(&mut self) {
        self.tasks_stopped_early += 1;
    }

    /// Fold `other` into `self`.
    pub fn merge(&mut self, other: &Recorder) {
        for (mine, theirs) in [
            (&mut self.latency_us, &other.latency_us),
            (&mut self.uncorrected_us, &other.uncorrected_us),
            (&mut self.send_lag_us, &other.send_lag_us),
        ] {
            mine.add(theirs).expect("histograms share their bounds");
        }
        for (index, theirs) in other.services.iter().enumerate() {
            let mine = self.service(index);
            mine.latency_us
                .add(&theirs.latency_us)
                .expect("histograms share their bounds");
            mine.errors += theirs.errors;
        }
        for (class, count) in &other.errors {
            *self.errors.entry(*class).or_insert(0) += count;
        }
        self.warmup_errors += other.warmup_errors;
        self.mismatches += other.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch.clone_from(&other.first_mismatch);
        }
        self.tasks_stopped_early += other.tasks_stopped_early;
        self.drain_retries += other.drain_retries;
    }

    /// The client's count of calls resent after a drain (`acgi_client::Client::drain_retries`),
    /// summed over the run's connections.
    pub fn record_drain_retries(&mut self, retries: u64) {
        self.drain_retries += retries;
    }

    pub fn drain_retries(&self) -> u64 {
        self.drain_retries
    }

    /// Successful measured calls.
    pub fn requests_ok(&self) -> u64 {
        self.latency_us.len()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Error counts keyed by [`ErrorClass::label`].
    pub fn errors_by_label(&self) -> BTreeMap<String, u64> {
        let mut labelled = BTreeMap::new();
        for (class, count) in &self.errors {
            *labelled.entry(class.label()).or_insert(0) += count;
        }
        labelled
    }

    pub fn warmup_errors(&self) -> u64 {
        self.warmup_errors
    }

    pub fn mismatches(&self) -> u64 {
        self.mismatches
    }

    pub fn first_mismatch(&self) -> Option<&Mismatch> {
        self.first_mismatch.as_ref()
    }

    pub fn tasks_stopped_early(&self) -> u64 {
        self.tasks_stopped_early
    }

    /// The latency summary (corrected, from intended send times), or `None` when no call
    /// succeeded.
    pub fn latency(&self) -> Option<LatencySummary> {
        LatencySummary::of(&self.latency_us)
    }

    /// The summary of latencies from the actual sends (uncorrected).
    pub fn latency_uncorrected(&self) -> Option<LatencySummary> {
        LatencySummary::of(&self.uncorrected_us)
    }

    /// The summary of the generator's lag behind its schedule.
    pub fn send_lag(&self) -> Option<LatencySummary> {
        LatencySummary::of(&self.send_lag_us)
    }

    /// The corrected latency histogram, microseconds.
    pub fn latency_histogram(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// The uncorrected latency histogram, microseconds.
    pub fn uncorrected_histogram(&self) -> &Histogram<u64> {
        &self.uncorrected_us
    }

    /// Per service of the mix, in mix order (services never called are missing at the end).
    pub fn services(&self) -> &[ServiceRecorder] {
        &self.services
    }
}

/// Latency percentiles of successful calls, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl LatencySummary {
    /// The summary of `histogram`, or `None` when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> Option<LatencySummary> {
        if histogram.is_empty() {
            return None;
        }
        let at = |quantile: f64| histogram.value_at_quantile(quantile);
        Some(LatencySummary {
            min: histogram.min(),
            mean: histogram.mean(),
            p50: at(QUANTILES[0]),
            p90: at(QUANTILES[1]),
            p99: at(QUANTILES[2]),
            p99_9: at(QUANTILES[3]),
            max: histogram.max(),
        })
    }

    /// The [`QUANTILES`] with their values, then `max`, in print order.
    pub fn rows(&self) -> [(String, u64); 5] {
        [
            (quantile_label(QUANTILES[0]), self.p50),
            (quantile_label(QUANTILES[1]), self.p90),
            (quantile_label(QUANTILES[2]), self.p99),
            (quantile_label(QUANTILES[3]), self.p99_9),
            ("max".to_string(), self.max),
        ]
    }
}

/// `0.5` -> `p50`, `0.999` -> `p99.9`, `0.99999` -> `p99.999`.
pub fn quantile_label(quantile: f64) -> String {
    assert!(
        (0.0..=1.0).contains(&quantile),
        "quantile {quantile} is outside [0, 1]"
    );
    let percent = format!("{:.4}", quantile * 100.0);
    let percent = percent.trim_end_matches('0').trim_end_matches('.');
    format!("p{percent}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_labels_read_like_percentiles() {
        // Proves the labels printed for the standard quantiles and a few edge values.
        let labels: Vec<String> = QUANTILES.iter().map(|q| quantile_label(*q)).collect();
        assert_eq!(labels, ["p50", "p90", "p99", "p99.9"]);
        assert_eq!(quantile_label(0.9999), "p99.99");
        assert_eq!(quantile_label(0.99999), "p99.999");
        assert_eq!(quantile_label(1.0), "p100");
        assert_eq!(quantile_label(0.0), "p0");
    }

    #[test]
    fn merged_recorders_add_up() {
        // Proves merging keeps every latency, error, mismatch and the first mismatch seen.
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        for us in 1..=100 {
            a.record_ok(Duration::from_micros(us));
        }
        b.record_ok(Duration::from_millis(50));
        b.record_error(ErrorClass::Remote(ErrorCode::Overloaded as u16));
        b.record_error(ErrorClass::Remote(ErrorCode::Overloaded as u16));
        b.record_error(ErrorClass::Remote(999));
        a.record_error(ErrorClass::Closed);
        let mismatch = Mismatch {
            connection: 1,
            task: 2,
            sequence: 3,
            request_bytes: 4,
            reply_bytes: 4,
            first_difference: 0,
        };
        b.record_mismatch(mismatch.clone());
        b.record_warmup_error();
        a.record_stopped_early();
        a.merge(&b);
        assert_eq!(a.requests_ok(), 101);
        assert_eq!(a.errors_total(), 4);
        let by_label = a.errors_by_label();
        assert_eq!(by_label["overloaded"], 2);
        assert_eq!(by_label["code_999"], 1);
        assert_eq!(by_label["closed"], 1);
        assert_eq!((a.mismatches(), a.first_mismatch()), (1, Some(&mismatch)));
        assert_eq!((a.warmup_errors(), a.tasks_stopped_early()), (1, 1));
        let latency = a.latency().unwrap();
        assert_eq!((latency.min, latency.p50, latency.p90), (1, 51, 91));
        assert!(
            (49_950..=50_050).contains(&latency.max),
            "max {}",
            latency.max
        );
        assert_eq!(latency.rows()[3].0, "p99.9");
    }

    #[test]
    fn an_empty_run_has_no_latency() {
        // Proves a run without successes reports no percentiles rather than zeros.
        let mut recorder = Recorder::new();
        recorder.record_error(ErrorClass::Io);
        assert_eq!(recorder.requests_ok(), 0);
        assert!(recorder.latency().is_none());
    }

    #[test]
    fn error_classes_follow_the_call_error() {
        // Proves codes map to their names, and which failures end a connection.
        let remote = CallError::Remote {
            code: ErrorCode::WorkerFailed as u16,
            message: "x".into(),
        };
        assert_eq!(ErrorClass::of(&remote).label(), "worker_failed");
        assert!(!ErrorClass::of(&remote).ends_connection());
        assert_eq!(ErrorClass::of(&CallError::Closed), ErrorClass::Closed);
        assert!(ErrorClass::of(&CallError::Closed).ends_connection());
        let unknown = CallError::Remote {
            code: 4242,
            message: String::new(),
        };
        assert_eq!(ErrorClass::of(&unknown).label(), "code_4242");
        assert_eq!(ErrorClass::Unanswered.label(), "unanswered");
    }

    #[test]
    fn open_loop_calls_keep_three_histograms_and_per_service_shares() {
        // Proves corrected, uncorrected and lag are recorded apart, per service, and merge.
        let mut a = Recorder::new();
        a.record_call(CallTiming {
            service: 1,
            latency: Duration::from_micros(5_000),
            uncorrected: Duration::from_micros(1_000),
            send_lag: Duration::from_micros(4_000),
        });
        let mut b = Recorder::new();
        b.record_ok(Duration::from_micros(100));
        b.record_service_error(1, ErrorClass::InFlightLimit);
        b.merge(&a);
        assert_eq!(b.latency().unwrap().max, 5_003);
        assert_eq!(b.latency_uncorrected().unwrap().max, 1_000);
        assert_eq!(b.send_lag().unwrap().max, 4_001);
        assert_eq!(b.services().len(), 2);
        assert_eq!(b.services()[0].latency_us.len(), 1);
        assert_eq!(b.services()[1].latency_us.len(), 1);
        assert_eq!(b.services()[1].errors, 1);
        assert_eq!(b.errors_by_label()["in_flight_limit"], 1);
        assert!(!ErrorClass::InFlightLimit.ends_connection());
    }

    #[test]
    fn huge_latencies_saturate() {
        // Proves a latency past the histogram's range is recorded, not dropped or panicking.
        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_secs(7_200));
        assert_eq!(recorder.requests_ok(), 1);
        assert!(recorder.latency().unwrap().max >= LATENCY_US_MAX);
    }
}
