//! What a run measured: latency histograms, error counts by code, verification mismatches.
//!
//! Each load task owns one [`Recorder`] and records into it without locks; the driver merges the
//! recorders once, when the tasks end. Latencies are whole microseconds in an HdrHistogram with 3
//! significant figures (values up to an hour; anything longer saturates at the top). Only
//! successful calls are in the histogram: an error answered at once (say `overloaded`) would
//! otherwise make the service look faster than it is. Errors are counted by [`ErrorClass`].

use std::collections::BTreeMap;
use std::time::Duration;

use acgi_bridge::client::CallError;
use acgi_bridge::proto::ErrorCode;
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
        !matches!(self, ErrorClass::Remote(_))
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

/// One task's measurements (and, after [`Recorder::merge`], a whole run's).
#[derive(Clone, Debug)]
pub struct Recorder {
    latency_us: Histogram<u64>,
    errors: BTreeMap<ErrorClass, u64>,
    /// Errors during the warm-up: not part of the results, reported so they are not hidden.
    warmup_errors: u64,
    /// Replies that differed from their requests, in any phase.
    mismatches: u64,
    first_mismatch: Option<Mismatch>,
    /// Tasks that stopped before the end of the run because their connection failed.
    tasks_stopped_early: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        let latency_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_FIGURES)
            .expect("constant histogram bounds are valid");
        Recorder {
            latency_us,
            errors: BTreeMap::new(),
            warmup_errors: 0,
            mismatches: 0,
            first_mismatch: None,
            tasks_stopped_early: 0,
        }
    }

    /// A call succeeded after `latency`.
    pub fn record_ok(&mut self, latency: Duration) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(latency_us);
    }

    /// A measured call failed.
    pub fn record_error(&mut self, class: ErrorClass) {
        *self.errors.entry(class).or_insert(0) += 1;
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
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
        for (class, count) in &other.errors {
            *self.errors.entry(*class).or_insert(0) += count;
        }
        self.warmup_errors += other.warmup_errors;
        self.mismatches += other.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch.clone_from(&other.first_mismatch);
        }
        self.tasks_stopped_early += other.tasks_stopped_early;
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

    /// The latency summary, or `None` when no call succeeded.
    pub fn latency(&self) -> Option<LatencySummary> {
        if self.latency_us.is_empty() {
            return None;
        }
        let at = |quantile: f64| self.latency_us.value_at_quantile(quantile);
        Some(LatencySummary {
            min: self.latency_us.min(),
            mean: self.latency_us.mean(),
            p50: at(QUANTILES[0]),
            p90: at(QUANTILES[1]),
            p99: at(QUANTILES[2]),
            p99_9: at(QUANTILES[3]),
            max: self.latency_us.max(),
        })
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
    fn huge_latencies_saturate() {
        // Proves a latency past the histogram's range is recorded, not dropped or panicking.
        let mut recorder = Recorder::new();
        recorder.record_ok(Duration::from_secs(7_200));
        assert_eq!(recorder.requests_ok(), 1);
        assert!(recorder.latency().unwrap().max >= LATENCY_US_MAX);
    }
}
