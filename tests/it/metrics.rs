//! Latency histograms for operations: the Prometheus endpoint (checked by promtool and scraped
//! by a real Prometheus server), HdrHistogram interval logs, and percentiles in status.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bridge, http_get, Bridge, ServiceSpec};

fn metrics_bridge(extra: &str) -> Bridge {
    let mut builder = bridge().top("metrics_listen = \"127.0.0.1:0\"");
    for line in extra.lines() {
        builder = builder.top(line);
    }
    builder.service(ServiceSpec::echo()).start()
}

fn scrape(bridge: &Bridge) -> String {
    let addr = bridge
        .metrics
        .as_deref()
        .expect("metrics address in the ready line");
    let (status, body) = http_get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn the_metrics_endpoint_passes_promtool_and_counts_what_happened() {
    // Proves /metrics is valid exposition (promtool check metrics, lint included) with the
    // requests, bytes and latency histogram of what the test did.
    let bridge = metrics_bridge("");
    let mut client = bridge.client();
    for i in 0..10 {
        assert_eq!(
            client
                .call("echo", format!("hello {i}").as_bytes())
                .unwrap()
                .len(),
            7
        );
    }
    let error = client
        .call("echo", &vec![0u8; 16 * 1024 * 1024 + 1])
        .unwrap_err();
    assert!(error.to_string().contains("payload too large"));
    let text = scrape(&bridge);
    acgi_bridge::metrics::check_with_promtool(&text).unwrap_or_else(|error| {
        panic!("promtool (install Debian's prometheus): {error:?}\n{text}")
    });
    assert!(
        text.contains("acgi_bridge_requests_total{service=\"echo\",outcome=\"ok\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("acgi_bridge_request_bytes_total{service=\"echo\"} 70"),
        "{text}"
    );
    assert!(
        text.contains("acgi_bridge_request_duration_seconds_count{service=\"echo\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("acgi_bridge_workers{service=\"echo\",state=\"idle\"}"),
        "{text}"
    );
    let (status, _) = http_get(bridge.metrics.as_deref().unwrap(), "/nope").unwrap();
    assert_eq!(status, 404);
}

/// A free loopback port: bound, read, released. (Prometheus needs a port number up front.)
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_prometheus_server_scrapes_the_bridge() {
    // Proves a real Prometheus server (Debian's package) scrapes the endpoint and can query the
    // bridge's series, build info and process metrics. It asks for OpenMetrics first (the
    // bridge serves it that: tests/it/health.rs), so its strict OpenMetrics parser accepting
    // the scrape (health up, no lastError) validates the OpenMetrics exposition.
    let bridge = metrics_bridge("");
    let mut client = bridge.client();
    for _ in 0..5 {
        client.call("echo", b"scraped").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let target = bridge.metrics.clone().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: acgi\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the prometheus server (apt-get install prometheus)");
    let _server = Prometheus(server);
    let query = "/api/v1/query?query=acgi_bridge_requests_total%7Bservice%3D%22echo%22%2Coutcome%3D%22ok%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, body)) = http_get(&web, query) {
            if body.contains("\"5\"") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the bridge's series"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, targets) = http_get(&web, "/api/v1/targets").unwrap();
    assert!(targets.contains("\"health\":\"up\""), "{targets}");
    assert!(targets.contains("\"lastError\":\"\""), "{targets}");
    for query in [
        "/api/v1/query?query=acgi_bridge_build_info",
        "/api/v1/query?query=process_start_time_seconds",
        "/api/v1/query?query=acgi_bridge_service_state%7Bstate%3D%22ok%22%7D",
    ] {
        let (status, body) = http_get(&web, query).unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"result\":[{"), "{query}: {body}");
    }
}

#[test]
fn interval_logs_are_written_and_read_back_by_the_hdrhistogram_reader() {
    // Proves histogram_log_dir: the bridge appends interval histograms in the standard
    // HdrHistogram log format, which the hdrhistogram crate's reader parses, tagged by service.
    let logs = tempfile::tempdir().unwrap();
    let bridge = metrics_bridge(&format!(
        "histogram_log_dir = {:?}\nhistogram_log_interval_ms = 200",
        logs.path().display().to_string()
    ));
    let mut client = bridge.client();
    for _ in 0..20 {
        client.call("echo", b"logged").unwrap();
    }
    let path = logs.path().join("latency.hlog");
    let deadline = Instant::now() + Duration::from_secs(20);
    let total = loop {
        let bytes = std::fs::read(&path).unwrap_or_default();
        let mut total = 0u64;
        for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&bytes) {
            if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(interval)) =
                entry
            {
                if interval.tag().map(|t| t.as_str()) == Some("echo") {
                    let mut deserializer = hdrhistogram::serialization::Deserializer::new();
                    let decoded = base64_decode(interval.encoded_histogram());
                    let histogram: hdrhistogram::Histogram<u64> =
                        deserializer.deserialize(&mut decoded.as_slice()).unwrap();
                    total += histogram.len();
                }
            }
        }
        if total >= 20 {
            break total;
        }
        assert!(
            Instant::now() < deadline,
            "the interval log never held the 20 requests"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(total, 20);
    let status = bridge.service_status("echo");
    assert_eq!(status.latency_since_start.total.count, 20);
    assert!(status.latency_since_start.total.p50_us > 0);
    assert!(status.latency_since_start.service.max_us >= status.latency_since_start.service.p50_us);
}

/// Standard base64 (the interval log's histogram encoding).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((bits >> (16 - 8 * i)) as u8);
        }
    }
    out
}
