//! Prometheus text exposition (format 0.0.4), or OpenMetrics 1.0.0 text for the scrapers that
//! ask for it, of a [`MetricsSnapshot`]: one collector, encoded by `prometheus-client` in either
//! format (OpenMetrics: counters' TYPE names without `_total`, `# UNIT` lines, `build` as an
//! `info` family, and `# EOF` at the end).
//!
//! Names: every bridge family is prefixed `acgi_bridge_`; the `process_*` family (the names the
//! Go and Python clients use, read from `/proc/self` per scrape: [`ProcessMetrics`]) is not.
//!
//! Owns the metric names, their help texts and the histogram bucket bounds. It never keeps
//! state between scrapes: each scrape turns an owned snapshot into a small owned exposition
//! (labels, counts, per-bucket counts) that a `prometheus-client` collector encodes, so the big
//! HdrHistograms are read once and never cloned. Invariants: every family has HELP and TYPE and
//! its samples are contiguous; bucket counts are cumulative, end with `+Inf` equal to `_count`.
//!
//! A Prometheus bucket `le=B` counts the HdrHistogram buckets whose lowest equivalent value is at
//! most `B` microseconds, like the crate's own `count_between(0, B)`: exact below 2048 µs, and
//! above it a value within the histogram's 0.1 % of `B` may count in `B`'s bucket.

use std::fmt;
use std::io::Write as _;
use std::process::{Command, Stdio};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::counters::BridgeCounters;
use super::{MetricsSnapshot, ProcessMetrics, ServiceMetrics, ServiceState};

/// The `Content-Type` of the exposition: `text/plain; version=0.0.4; charset=utf-8`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `Content-Type` of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which text format a scrape is encoded in (chosen by its `Accept` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpositionFormat {
    /// The classic Prometheus text, format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

impl ExpositionFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::Prometheus => CONTENT_TYPE,
            ExpositionFormat::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// The bridge's version and the commit it was built from (`build.rs`: the git commit, or
/// `ACGI_BRIDGE_GIT_COMMIT`), `unknown` when the build knew none.
pub fn build_info() -> (&'static str, &'static str) {
    let version = env!("CARGO_PKG_VERSION");
    // `ACGI_BRIDGE_VERSION` is `0.1.0 (7f87202)`, or `0.1.0` without a commit.
    let commit = env!("ACGI_BRIDGE_VERSION")
        .strip_prefix(version)
        .and_then(|rest| rest.trim().strip_prefix('('))
        .and_then(|rest| rest.strip_suffix(')'))
        .filter(|commit| !commit.is_empty())
        .unwrap_or("unknown");
    (version, commit)
}

/// Upper bounds of the Prometheus histogram buckets, in microseconds (10 µs to 60 s; `+Inf`
/// is implicit).
pub const BUCKET_BOUNDS_US: [u64; 21] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

const PREFIX: &str = "acgi_bridge";
const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Encode a snapshot as Prometheus text (format 0.0.4), every family with HELP and TYPE.
pub fn encode_prometheus(snapshot: &MetricsSnapshot) -> String {
    encode(snapshot, ExpositionFormat::Prometheus)
}

/// Encode a snapshot in `format`, every family with HELP and TYPE.
pub fn encode(snapshot: &MetricsSnapshot, format: ExpositionFormat) -> String {
    let mut registry = Registry::default();
    if let Some(process) = snapshot.process {
        registry.register_collector(Box::new(ProcessExposition(process)));
    }
    registry
        .sub_registry_with_prefix(PREFIX)
        .register_collector(Box::new(Exposition::from_snapshot(snapshot)));
    let mut text = String::with_capacity(4096 + 8192 * snapshot.services.len());
    // Writing into a String cannot fail and the collectors return no error of their own.
    match format {
        ExpositionFormat::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        }
        ExpositionFormat::OpenMetrics => {
            prometheus_client::encoding::text::encode(&mut text, &registry)
        }
    }
    .expect("encoding metrics into a String cannot fail");
    text
}

/// The standard `process_*` family.
#[derive(Debug)]
struct ProcessExposition(ProcessMetrics);

impl Collector for ProcessExposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let p = &self.0;
        encoder
            .encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&p.cpu_seconds, None)?;
        encoder
            .encode_descriptor(
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&Unit::Bytes),
                Gauge,
            )?
            .encode_gauge(&p.resident_memory_bytes)?;
        encoder
            .encode_descriptor(
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(&Unit::Bytes),
                Gauge,
            )?
            .encode_gauge(&p.virtual_memory_bytes)?;
        encoder
            .encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                Gauge,
            )?
            .encode_gauge(&p.open_fds)?;
        if let Some(max_fds) = p.max_fds {
            encoder
                .encode_descriptor(
                    "process_max_fds",
                    "Maximum number of open file descriptors.",
                    None,
                    Gauge,
                )?
                .encode_gauge(&max_fds)?;
        }
        encoder
            .encode_descriptor(
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(&Unit::Seconds),
                Gauge,
            )?
            .encode_gauge(&p.start_time_seconds)?;
        Ok(())
    }
}

/// Per-bucket (not cumulative) counts of `h` at [`BUCKET_BOUNDS_US`], then the overflow past
/// the last bound (the `+Inf` bucket's share). Their sum is `h.len()`.
pub fn prometheus_buckets(h: &Histogram<u64>) -> [u64; BUCKET_BOUNDS_US.len() + 1] {
    let mut counts = [0u64; BUCKET_BOUNDS_US.len() + 1];
    let mut bucket = 0;
    for value in h.iter_recorded() {
        let lowest = h.lowest_equivalent(value.value_iterated_to());
        // iter_recorded walks values upwards, so the bucket index only moves forward.
        while bucket < BUCKET_BOUNDS_US.len() && lowest > BUCKET_BOUNDS_US[bucket] {
            bucket += 1;
        }
        counts[bucket] = counts[bucket].saturating_add(value.count_since_last_iteration());
    }
    debug_assert_eq!(
        counts.iter().fold(0u64, |a, b| a.saturating_add(*b)),
        h.len()
    );
    counts
}

/// One histogram as Prometheus sees it.
#[derive(Debug)]
struct HistogramExposition {
    /// `(upper bound in seconds, count in that bucket alone)`, ending with the `+Inf` bucket
    /// (which OpenMetrics' encoder needs given; the classic one adds it only when missing).
    buckets: Vec<(f64, u64)>,
    sum_seconds: f64,
    count: u64,
}

impl HistogramExposition {
    fn new(h: &Histogram<u64>, sum: std::time::Duration) -> Self {
        let counts = prometheus_buckets(h);
        let buckets = BUCKET_BOUNDS_US
            .iter()
            .map(|bound_us| *bound_us as f64 / MICROS_PER_SECOND)
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        Self {
            buckets,
            sum_seconds: sum.as_secs_f64(),
            count: h.len(),
        }
    }
}

#[derive(Debug)]
struct ServiceExposition {
    name: String,
    /// `("ok", n)` first, then the failures.
    requests: Vec<(&'static str, u64)>,
    bytes_in: u64,
    bytes_out: u64,
    copy_path: u64,
    worker_faults: Vec<(&'static str, u64)>,
    spawn_failures: Vec<(&'static str, u64)>,
    spawns: u64,
    exits: Vec<(&'static str, u64)>,
    workers: Vec<(&'static str, u64)>,
    backlog: u64,
    state: ServiceState,
    min_workers: u64,
    max_workers: u64,
    backlog_max: u64,
    queue_wait: HistogramExposition,
    service: HistogramExposition,
    total: HistogramExposition,
}

impl ServiceExposition {
    fn new(s: &ServiceMetrics) -> Self {
        let mut requests = Vec::with_capacity(1 + s.requests_failed.len());
        requests.push(("ok", s.requests_ok));
        requests.extend(s.requests_failed.iter().copied());
        // A repeated label value would be a duplicate series, which Prometheus rejects whole.
        debug_assert!(distinct(&requests), "{}: outcomes repeat", s.name);
        debug_assert!(distinct(&s.exits), "{}: exit reasons repeat", s.name);
        debug_assert!(distinct(&s.workers), "{}: worker states repeat", s.name);
        Self {
            name: s.name.clone(),
            requests,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            copy_path: s.copy_path,
            worker_faults: s.worker_faults.clone(),
            spawn_failures: s.spawn_failures.clone(),
            spawns: s.spawns,
            exits: s.exits.clone(),
            workers: s.workers.clone(),
            backlog: s.backlog,
            state: s.state,
            min_workers: s.min_workers,
            max_workers: s.max_workers,
            backlog_max: s.backlog_max,
            queue_wait: HistogramExposition::new(&s.latency.queue_wait, s.latency.queue_wait_sum),
            service: HistogramExposition::new(&s.latency.service, s.latency.service_sum),
            total: HistogramExposition::new(&s.latency.total, s.latency.total_sum),
        }
    }
}

/// Whether the label values of `pairs` are all different.
fn distinct(pairs: &[(&str, u64)]) -> bool {
    pairs
        .iter()
        .enumerate()
        .all(|(i, (name, _))| pairs[..i].iter().all(|(other, _)| other != name))
}

/// The whole scrape, owned, as a `prometheus-client` collector.
#[derive(Debug)]
struct Exposition {
    connections: u64,
    slots_in_use: u64,
    connections_by_core: Vec<(String, u64)>,
    counters: BridgeCounters,
    services: Vec<ServiceExposition>,
}

type Counter = fn(&ServiceExposition) -> u64;
type ByLabel = fn(&ServiceExposition) -> &[(&'static str, u64)];
type Latency = fn(&ServiceExposition) -> &HistogramExposition;

impl Exposition {
    fn from_snapshot(snapshot: &MetricsSnapshot) -> Self {
        Self {
            connections: snapshot.connections,
            slots_in_use: snapshot.slots_in_use,
            connections_by_core: snapshot
                .connections_by_core
                .iter()
                .enumerate()
                .map(|(core, count)| (core.to_string(), *count))
                .collect(),
            counters: snapshot.counters.clone(),
            services: snapshot
                .services
                .iter()
                .map(ServiceExposition::new)
                .collect(),
        }
    }

    /// A family with one sample per service, labelled `service`.
    fn per_service(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        value: Counter,
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
        for s in &self.services {
            let labels = [("service", s.name.as_str())];
            let mut metric = family.encode_family(&labels)?;
            match metric_type {
                MetricType::Counter => {
                    metric.encode_counter::<NoLabelSet, _, u64>(&value(s), None)?
                }
                _ => metric.encode_gauge(&value(s))?,
            }
        }
        Ok(())
    }

    /// A family with one sample per service and value of `label`.
    fn per_service_by(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        label: &'static str,
        values: ByLabel,
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
        for s in &self.services {
            for (label_value, value) in values(s) {
                let labels = [("service", s.name.as_str()), (label, label_value)];
                let mut metric = family.encode_family(&labels)?;
                match metric_type {
                    MetricType::Counter => {
                        metric.encode_counter::<NoLabelSet, _, u64>(value, None)?
                    }
                    _ => metric.encode_gauge(value)?,
                }
            }
        }
        Ok(())
    }

    fn latency(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        histogram: Latency,
    ) -> fmt::Result {
        let mut family =
            encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for s in &self.services {
            let labels = [("service", s.name.as_str())];
            let h = histogram(s);
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        Ok(())
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        self.per_service_by(
            e,
            "requests",
            "Requests answered, by outcome (ok, or the error they were answered with).",
            Counter,
            "outcome",
            |s| &s.requests,
        )?;
        self.per_service(
            e,
            "request_bytes",
            "Request payload bytes received from callers.",
            Counter,
            |s| s.bytes_in,
        )?;
        self.per_service(
            e,
            "reply_bytes",
            "Reply payload bytes sent to callers.",
            Counter,
            |s| s.bytes_out,
        )?;
        self.per_service(
            e,
            "copy_path",
            "Requests or replies that were copied instead of handed over in a slot.",
            Counter,
            |s| s.copy_path,
        )?;
        self.per_service(
            e,
            "worker_spawns",
            "Worker processes spawned.",
            Counter,
            |s| s.spawns,
        )?;
        self.per_service_by(
            e,
            "worker_faults",
            "Workers killed or lost for breaking the worker protocol or their control socket, \
             by fault.",
            Counter,
            "fault",
            |s| &s.worker_faults,
        )?;
        self.per_service_by(
            e,
            "spawn_failures",
            "Workers that could not be started (the bridge's resources, the service's config, \
             its cgroup, or a step of the worker's setup before exec), by reason.",
            Counter,
            "reason",
            |s| &s.spawn_failures,
        )?;
        self.per_service_by(
            e,
            "worker_exits",
            "Worker processes that exited, by reason.",
            Counter,
            "reason",
            |s| &s.exits,
        )?;
        self.per_service_by(
            e,
            "workers",
            "Worker processes now, by state.",
            Gauge,
            "state",
            |s| &s.workers,
        )?;
        self.per_service(
            e,
            "backlog",
            "Requests waiting for a worker now.",
            Gauge,
            |s| s.backlog,
        )?;
        self.per_service(
            e,
            "service_min_workers",
            "Workers the service keeps running even when idle (min_workers, over every core).",
            Gauge,
            |s| s.min_workers,
        )?;
        self.per_service(
            e,
            "service_max_workers",
            "Most workers the service may run at once (max_workers, over every core).",
            Gauge,
            |s| s.max_workers,
        )?;
        self.per_service(
            e,
            "service_backlog_max",
            "Requests that may wait for a worker before new ones are answered overloaded \
             (backlog_max).",
            Gauge,
            |s| s.backlog_max,
        )?;
        let mut family = e.encode_descriptor(
            "service_state",
            "1 for the service's current state, 0 for the others: ok (serving, or able to \
             start a worker), starting (its first workers are not up yet), failing (crash \
             loop: requests refused, restarts backing off), stopping (the bridge is stopping). \
             /readyz is 503 while any service is not ok.",
            None,
            Gauge,
        )?;
        for s in &self.services {
            for state in ServiceState::ALL {
                let labels = [("service", s.name.as_str()), ("state", state.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_gauge(&u64::from(s.state == state))?;
            }
        }
        let (version, commit) = build_info();
        e.encode_descriptor(
            "build",
            "The bridge's version and the git commit it was built from (unknown if none).",
            None,
            MetricType::Info,
        )?
        .encode_info(&[("version", version), ("commit", commit)])?;
        e.encode_descriptor("connections", "Caller connections open now.", None, Gauge)?
            .encode_gauge(&self.connections)?;
        e.encode_descriptor("slots_in_use", "Worker slots in use now.", None, Gauge)?
            .encode_gauge(&self.slots_in_use)?;
        let mut family = e.encode_descriptor(
            "core_connections",
            "Caller connections open now on each core (event-loop thread).",
            None,
            Gauge,
        )?;
        for (core, count) in &self.connections_by_core {
            family
                .encode_family(&[("core", core.as_str())])?
                .encode_gauge(count)?;
        }
        // Every bridge-wide counter, from its one definition (`metrics::counters`).
        for (name, help, value) in self.counters.each() {
            e.encode_descriptor(name, help.trim(), None, Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        self.latency(
            e,
            "queue_wait",
            "Time from a request's arrival to its hand-over to a worker (or rejection).",
            |s| &s.queue_wait,
        )?;
        self.latency(
            e,
            "service",
            "Time from a request's hand-over to a worker to the worker's answer.",
            |s| &s.service,
        )?;
        self.latency(
            e,
            "request_duration",
            "Time from a request's arrival to its answer (the whole time in the bridge).",
            |s| &s.total,
        )
    }
}

/// Why [`check_with_promtool`] could not vouch for a text.
#[derive(Debug, thiserror::Error)]
pub enum PromtoolError {
    /// `promtool` is not on `PATH` (Debian: `apt-get install prometheus`).
    #[error("promtool is not installed (apt-get install prometheus)")]
    Missing,
    #[error("running promtool failed: {0}")]
    Io(#[from] std::io::Error),
    /// promtool rejected the text; its report.
    #[error("promtool check metrics rejected the exposition: {0}")]
    Rejected(String),
}

/// Run `promtool check metrics` on `text` (for tests: unit tests here, integration tests on a
/// real scrape). `Err(Missing)` when promtool is not installed, so callers decide to skip.
pub fn check_with_promtool(text: &str) -> Result<(), PromtoolError> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(PromtoolError::Missing),
        Err(e) => return Err(e.into()),
    };
    let mut stdin = child.stdin.take().expect("stdin was piped");
    // promtool reads all of stdin before it writes, so writing first cannot deadlock.
    stdin.write_all(text.as_bytes())?;
    drop(stdin);
    let output = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(PromtoolError::Rejected(format!(
            "{} {}",
            output.status,
            report.trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::LatencyHistograms;

    fn service(name: &str) -> ServiceMetrics {
        ServiceMetrics {
            name: name.to_string(),
            id: 1,
            requests_ok: 7,
            requests_failed: vec![("overloaded", 2), ("timed_out", 1)],
            bytes_in: 1000,
            bytes_out: 2000,
            copy_path: 3,
            worker_faults: vec![("early_answer", 1), ("slot", 0)],
            spawn_failures: vec![("identity", 2), ("exec", 0)],
            spawns: 4,
            exits: vec![("recycled", 1), ("crashed", 2)],
            workers: vec![("starting", 0), ("idle", 1), ("busy", 2), ("stopping", 0)],
            backlog: 5,
            state: ServiceState::Failing,
            min_workers: 1,
            max_workers: 4,
            backlog_max: 1024,
            latency: LatencyHistograms::new(),
        }
    }

    fn snapshot() -> MetricsSnapshot {
        let mut echo = service("echo");
        // Known observations: 5 µs, 10 µs (on a bound), 11 µs, 1 ms (on a bound), 3 s, 2 h.
        for us in [5, 10, 11, 1_000, 3_000_000, 7_200_000_000] {
            let d = Duration::from_micros(us);
            echo.latency.record(d / 2, Some(d / 2), d);
        }
        echo.latency
            .record(Duration::from_micros(40), None, Duration::from_micros(40));
        MetricsSnapshot {
            connections: 3,
            slots_in_use: 2,
            connections_by_core: vec![1, 2],
            counters: BridgeCounters {
                requests_forwarded: 5,
                ..Default::default()
            },
            services: vec![echo, service("kv")],
            process: Some(ProcessMetrics {
                cpu_seconds: 1.5,
                resident_memory_bytes: 4096,
                virtual_memory_bytes: 8192,
                open_fds: 12,
                max_fds: Some(1024),
                start_time_seconds: 1_700_000_000.25,
            }),
        }
    }

    /// The value of the sample line `series` (name and labels exactly as printed).
    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| {
                l.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"));
        line[series.len() + 1..].parse().unwrap()
    }

    #[test]
    fn buckets_count_values_at_or_under_each_bound() {
        // Proves: values on a bound count in that bound's bucket; the rest go up; +Inf overflow.
        let mut h = crate::metrics::latency_histogram();
        for us in [5, 10, 11, 1_000, 2_500_000, 3_000_000, 100_000_000] {
            h.record(us).unwrap();
        }
        let counts = prometheus_buckets(&h);
        let mut expected = [0u64; 22];
        expected[0] = 2; // 5, 10 <= 10 µs
        expected[1] = 1; // 11 <= 25 µs
        expected[6] = 1; // 1000 <= 1 ms
        expected[16] = 1; // 2.5 s <= 2.5 s: on a bound, also past 2048 µs
        expected[17] = 1; // 3 s <= 5 s
        expected[21] = 1; // 100 s > 60 s
        assert_eq!(counts, expected);
    }

    #[test]
    fn histogram_text_has_cumulative_buckets_count_and_exact_sum() {
        // Proves: a histogram with known observations is exposed with the right cumulative
        // buckets, +Inf, _count and _sum (in seconds).
        let text = encode_prometheus(&snapshot());
        let name = "acgi_bridge_request_duration_seconds";
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("{name}_bucket{{service=\"echo\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("1e-05"), 2.0);
        assert_eq!(bucket("2.5e-05"), 3.0);
        assert_eq!(bucket("5e-05"), 4.0); // + the 40 µs rejection
        assert_eq!(bucket("0.0005"), 4.0);
        assert_eq!(bucket("0.001"), 5.0);
        assert_eq!(bucket("5"), 6.0);
        assert_eq!(bucket("60"), 6.0);
        assert_eq!(bucket("+Inf"), 7.0);
        assert_eq!(
            sample(&text, &format!("{name}_count{{service=\"echo\"}}")),
            7.0
        );
        let sum = sample(&text, &format!("{name}_sum{{service=\"echo\"}}"));
        let expected = (5 + 10 + 11 + 1_000 + 3_000_000 + 7_200_000_000u64 + 40) as f64 / 1e6;
        assert!((sum - expected).abs() < 1e-6, "{sum} != {expected}");
        // The service histogram skips the rejection.
        let service = "acgi_bridge_service_seconds";
        assert_eq!(
            sample(&text, &format!("{service}_count{{service=\"echo\"}}")),
            6.0
        );
        // Every bucket line of a family is cumulative (non-decreasing).
        let mut last = 0.0;
        for line in text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{service=\"echo\"")))
        {
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{line}");
            last = v;
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket{{service=\"kv\"")))
                .count(),
            22
        );
        assert_eq!(
            sample(&text, &format!("{name}_count{{service=\"kv\"}}")),
            0.0
        );
    }

    #[test]
    fn every_family_is_present_with_help_and_type() {
        // Proves: all metric families appear once, with HELP then TYPE, samples contiguous.
        let text = encode_prometheus(&snapshot());
        let families = [
            ("acgi_bridge_requests_total", "counter"),
            ("acgi_bridge_request_bytes_total", "counter"),
            ("acgi_bridge_reply_bytes_total", "counter"),
            ("acgi_bridge_copy_path_total", "counter"),
            ("acgi_bridge_worker_spawns_total", "counter"),
            ("acgi_bridge_worker_exits_total", "counter"),
            ("acgi_bridge_worker_faults_total", "counter"),
            ("acgi_bridge_spawn_failures_total", "counter"),
            ("acgi_bridge_workers", "gauge"),
            ("acgi_bridge_backlog", "gauge"),
            ("acgi_bridge_connections", "gauge"),
            ("acgi_bridge_slots_in_use", "gauge"),
            ("acgi_bridge_core_connections", "gauge"),
            ("acgi_bridge_queue_wait_seconds", "histogram"),
            ("acgi_bridge_service_seconds", "histogram"),
            ("acgi_bridge_request_duration_seconds", "histogram"),
            ("acgi_bridge_service_min_workers", "gauge"),
            ("acgi_bridge_service_max_workers", "gauge"),
            ("acgi_bridge_service_backlog_max", "gauge"),
            ("acgi_bridge_service_state", "gauge"),
            ("acgi_bridge_build_info", "gauge"),
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_start_time_seconds", "gauge"),
        ];
        // Every bridge-wide counter, from its one definition.
        let counters: Vec<String> = BridgeCounters::default()
            .each()
            .iter()
            .map(|(name, _, _)| format!("acgi_bridge_{name}_total"))
            .collect();
        let families: Vec<(&str, &str)> = families
            .into_iter()
            .chain(counters.iter().map(|name| (name.as_str(), "counter")))
            .collect();
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        assert_eq!(types.len(), families.len(), "{text}");
        for (name, kind) in families {
            let help = format!("# HELP {name} ");
            let help_at = text
                .find(&help)
                .unwrap_or_else(|| panic!("no HELP for {name}"));
            let type_line = format!("# TYPE {name} {kind}\n");
            let type_at = text
                .find(&type_line)
                .unwrap_or_else(|| panic!("no TYPE for {name}"));
            assert!(help_at < type_at);
            // Samples of the family follow its TYPE line, before the next family's HELP.
            let body = &text[type_at + type_line.len()..];
            let body = &body[..body.find("# HELP").unwrap_or(body.len())];
            assert!(!body.is_empty(), "no samples for {name}");
            for line in body.lines() {
                assert!(line.starts_with(name), "{line} in family {name}");
            }
        }
        assert_eq!(sample(&text, "acgi_bridge_connections"), 3.0);
        assert_eq!(sample(&text, "acgi_bridge_slots_in_use"), 2.0);
        for (state, value) in [
            ("ok", 0.0),
            ("starting", 0.0),
            ("failing", 1.0),
            ("stopping", 0.0),
        ] {
            let series = format!("acgi_bridge_service_state{{service=\"kv\",state=\"{state}\"}}");
            assert_eq!(sample(&text, &series), value, "{series}");
        }
        assert_eq!(
            sample(&text, "acgi_bridge_service_max_workers{service=\"kv\"}"),
            4.0
        );
        assert_eq!(
            sample(&text, "acgi_bridge_service_min_workers{service=\"kv\"}"),
            1.0
        );
        assert_eq!(
            sample(&text, "acgi_bridge_service_backlog_max{service=\"kv\"}"),
            1024.0
        );
        let (version, commit) = build_info();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert!(
            !commit.is_empty() && !commit.contains(['(', ')', ' ']),
            "{commit}"
        );
        let build = format!("acgi_bridge_build_info{{version=\"{version}\",commit=\"{commit}\"}}");
        assert_eq!(sample(&text, &build), 1.0);
        assert_eq!(sample(&text, "process_cpu_seconds_total"), 1.5);
        assert_eq!(sample(&text, "process_resident_memory_bytes"), 4096.0);
        assert_eq!(sample(&text, "process_virtual_memory_bytes"), 8192.0);
        assert_eq!(sample(&text, "process_open_fds"), 12.0);
        assert_eq!(sample(&text, "process_max_fds"), 1024.0);
        assert_eq!(
            sample(&text, "process_start_time_seconds"),
            1_700_000_000.25
        );
        assert_eq!(
            sample(&text, "acgi_bridge_core_connections{core=\"1\"}"),
            2.0
        );
        assert_eq!(sample(&text, "acgi_bridge_requests_forwarded_total"), 5.0);
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_requests_total{service=\"echo\",outcome=\"ok\"}"
            ),
            7.0
        );
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_requests_total{service=\"kv\",outcome=\"timed_out\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_worker_exits_total{service=\"kv\",reason=\"crashed\"}"
            ),
            2.0
        );
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_worker_faults_total{service=\"kv\",fault=\"early_answer\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_workers{service=\"echo\",state=\"busy\"}"
            ),
            2.0
        );
        assert_eq!(sample(&text, "acgi_bridge_backlog{service=\"kv\"}"), 5.0);
        assert_eq!(
            sample(&text, "acgi_bridge_request_bytes_total{service=\"kv\"}"),
            1000.0
        );
        assert_eq!(
            sample(&text, "acgi_bridge_reply_bytes_total{service=\"kv\"}"),
            2000.0
        );
        assert_eq!(
            sample(&text, "acgi_bridge_copy_path_total{service=\"kv\"}"),
            3.0
        );
        assert_eq!(
            sample(&text, "acgi_bridge_worker_spawns_total{service=\"kv\"}"),
            4.0
        );
        assert_eq!(
            sample(
                &text,
                "acgi_bridge_spawn_failures_total{service=\"kv\",reason=\"identity\"}"
            ),
            2.0
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn exposition_with_no_services_is_still_complete() {
        // Proves: a bridge with no services (or before any) still exposes every family header.
        let text = encode_prometheus(&MetricsSnapshot::default());
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# TYPE ")).count(),
            21 + BridgeCounters::COUNT
        );
        assert_eq!(sample(&text, "acgi_bridge_connections"), 0.0);
    }

    #[test]
    fn openmetrics_has_its_own_names_units_info_and_eof() {
        // Proves: the OpenMetrics text names counter families without `_total` (samples keep
        // it), gives units and the build `info` family, ends with `# EOF`, and carries the same
        // samples as the classic text.
        let text = encode(&snapshot(), ExpositionFormat::OpenMetrics);
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(
            text.contains("# TYPE acgi_bridge_requests counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE acgi_bridge_build info\n"), "{text}");
        assert!(
            text.contains(
                "# TYPE process_cpu_seconds counter\n# UNIT process_cpu_seconds seconds\n"
            ),
            "{text}"
        );
        assert!(text.contains("# UNIT acgi_bridge_request_duration_seconds seconds\n"));
        // Histograms have every bucket, +Inf included, in both.
        let classic = encode_prometheus(&snapshot());
        let inf = "acgi_bridge_request_duration_seconds_bucket{le=\"+Inf\",service=\"echo\"} 7\n";
        assert!(text.contains(inf), "{text}");
        let buckets = |text: &str| text.lines().filter(|l| l.contains("_bucket{")).count();
        assert_eq!(buckets(&text), buckets(&classic));
        assert_eq!(buckets(&text), 3 * 2 * (BUCKET_BOUNDS_US.len() + 1));
        // Every other sample is the same line in both.
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.contains("_seconds_"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&text), samples(&classic));
        assert!(!classic.contains("# EOF"));
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        // Proves: `promtool check metrics` (lint included) accepts our text, when installed.
        for snapshot in [snapshot(), MetricsSnapshot::default()] {
            match check_with_promtool(&encode_prometheus(&snapshot)) {
                Ok(()) => {}
                Err(PromtoolError::Missing) => {
                    eprintln!(
                        "SKIPPED promtool_accepts_the_exposition: promtool is not installed \
                         (apt-get install prometheus); the text structure is checked by the \
                         other tests only"
                    );
                    return;
                }
                Err(e) => panic!("{e}"),
            }
        }
        // And it rejects what it should, so a pass means something.
        assert!(matches!(
            check_with_promtool("# TYPE x counter\nx 1\n"),
            Err(PromtoolError::Rejected(_))
        ));
    }
}
