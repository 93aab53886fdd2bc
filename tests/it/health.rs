//! `/healthz`, `/readyz`, the service, build and process gauges, and OpenMetrics for scrapers
//! that ask for it, on the real bridge's metrics listener.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{bridge, example, http_get, Bridge, FrozenThread, ServiceSpec};

/// What a Prometheus 2.x server sends as `Accept` when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/\
    openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A GET with an optional `Accept` header: the status, the head and the body.
fn get(addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

fn metrics_addr(bridge: &Bridge) -> String {
    bridge
        .metrics
        .clone()
        .expect("metrics address in the ready line")
}

/// Poll `path` until `done(status, body)` holds; panics with the last answer at the deadline.
fn poll(addr: &str, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http_get(addr, path).expect("an answer");
        if done(answer.0, &answer.1) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {answer:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_healthy(addr: &str) {
    let (status, body) = http_get(addr, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

/// A faulty worker whose start waits (before its exec) for `hold` to be removed.
fn held_faulty(hold: &Path) -> ServiceSpec {
    let mut spec = ServiceSpec::new(3, "faulty", "/bin/sh".into()).workers(1, 2);
    spec.args = vec![
        "-c".into(),
        "while [ -e \"$0\" ]; do /bin/sleep 0.02; done; exec \"$1\"".into(),
        hold.display().to_string(),
        example("faulty").display().to_string(),
    ];
    spec
}

#[test]
fn readyz_is_503_until_the_first_worker_is_up_then_200_and_healthz_is_200_throughout() {
    // Proves: with a service's only worker held before its handshake (deterministically: it
    // waits for a file to go), /readyz is 503 naming the service as starting while /healthz is
    // 200, and /metrics says starting; once the worker is up, /readyz is 200.
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold");
    std::fs::write(&hold, b"").unwrap();
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(held_faulty(&hold))
        .start();
    let addr = metrics_addr(&bridge);
    for _ in 0..3 {
        let (status, body) = http_get(&addr, "/readyz").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(
            body.starts_with("service faulty: starting (no worker up yet"),
            "{body}"
        );
        assert_healthy(&addr);
    }
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("acgi_bridge_service_state{service=\"faulty\",state=\"starting\"} 1\n"),
        "{metrics}"
    );
    std::fs::remove_file(&hold).unwrap();
    let (_, body) = poll(&addr, "/readyz", "ready once the worker is up", |s, _| {
        s == 200
    });
    assert_eq!(body, "ready\n");
    assert_healthy(&addr);
    assert_eq!(bridge.client().call("faulty", b"echo hi").unwrap(), b"hi");
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("acgi_bridge_service_state{service=\"faulty\",state=\"ok\"} 1\n"),
        "{metrics}"
    );
}

#[test]
fn readyz_names_a_crash_looping_service_and_recovers_with_it() {
    // Proves: a service whose workers die before their handshake turns failing, /readyz is 503
    // with "service faulty: failing (crash loop..." (the healthy echo is not named) and the
    // state gauge says failing; once workers start again, /readyz is 200.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("fail");
    std::fs::write(&marker, b"").unwrap();
    let mut faulty = ServiceSpec::faulty()
        .workers(1, 2)
        .args(&["--fail-if-exists", marker.to_str().unwrap()]);
    faulty.extra = "restart_backoff_max_ms = 200\n".into();
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::echo())
        .service(faulty)
        .start();
    let addr = metrics_addr(&bridge);
    let (status, body) = poll(&addr, "/readyz", "failing named", |_, body| {
        body.contains("service faulty: failing")
    });
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "service faulty: failing (crash loop: requests refused, restarts backing off)\n"
    );
    assert_healthy(&addr);
    let (_, metrics) = http_get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("acgi_bridge_service_state{service=\"faulty\",state=\"failing\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("acgi_bridge_service_state{service=\"echo\",state=\"ok\"} 1\n"),
        "{metrics}"
    );
    std::fs::remove_file(&marker).unwrap();
    poll(&addr, "/readyz", "ready after the crash loop", |s, _| {
        s == 200
    });
    assert_eq!(bridge.service_status("faulty").state, "ok");
}

#[test]
fn readyz_is_503_shutting_down_while_a_request_drains_and_healthz_stays_200() {
    // Proves: after SIGTERM, with a request in flight holding the shutdown (`sleep 2000`), the
    // metrics listener still answers: /readyz 503 "shutting down" and /healthz 200; the
    // request is answered and the bridge exits 0.
    let mut bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let addr = metrics_addr(&bridge);
    poll(&addr, "/readyz", "ready before the stop", |s, _| s == 200);
    assert_healthy(&addr);
    let mut client = bridge.client();
    let call = std::thread::spawn(move || client.call("faulty", b"sleep 2000"));
    bridge.wait_status("the request running", |s| s.services[0].workers_busy == 1);
    bridge.signal(libc::SIGTERM);
    let (status, body) = poll(&addr, "/readyz", "shutting down", |_, body| {
        body.starts_with("shutting down\n")
    });
    assert_eq!(status, 503, "{body}");
    assert_healthy(&addr);
    let (status, head, metrics) = get(&addr, "/metrics", None);
    assert_eq!(status, 200, "{head}");
    assert!(
        metrics.contains("acgi_bridge_service_state{service=\"faulty\",state=\"stopping\"} 1\n"),
        "{metrics}"
    );
    assert!(!call.is_finished(), "the request should still be in flight");
    assert_eq!(call.join().unwrap().unwrap(), b"slept");
    let exit = bridge
        .wait_exit(Duration::from_secs(30))
        .expect("the bridge exits");
    assert!(exit.success(), "{exit}");
}

#[test]
fn the_service_build_and_process_gauges_are_exposed_and_pass_promtool() {
    // Proves: /metrics has the per-service state, bounds and backlog_max gauges, build_info
    // with the crate's version, and process_* values that match the bridge's process; promtool
    // accepts the whole text.
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::echo().workers(1, 3).backlog(77))
        .start();
    let addr = metrics_addr(&bridge);
    poll(&addr, "/readyz", "ready", |s, _| s == 200);
    let (status, head, text) = get(&addr, "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    acgi_bridge::metrics::check_with_promtool(&text)
        .unwrap_or_else(|error| panic!("promtool: {error:?}\n{text}"));
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("acgi_bridge_service_state{service=\"echo\",state=\"ok\"}"),
        1.0
    );
    for state in ["starting", "failing", "stopping"] {
        let series = format!("acgi_bridge_service_state{{service=\"echo\",state=\"{state}\"}}");
        assert_eq!(value(&series), 0.0, "{series}");
    }
    assert_eq!(
        value("acgi_bridge_service_max_workers{service=\"echo\"}"),
        3.0
    );
    assert_eq!(
        value("acgi_bridge_service_min_workers{service=\"echo\"}"),
        1.0
    );
    assert_eq!(
        value("acgi_bridge_service_backlog_max{service=\"echo\"}"),
        77.0
    );
    let build = text
        .lines()
        .find(|l| l.starts_with("acgi_bridge_build_info{"))
        .expect("build_info");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        build.starts_with(&format!(
            "acgi_bridge_build_info{{version=\"{version}\",commit=\""
        )) && build.ends_with("\"} 1"),
        "{build}"
    );
    // The process is the bridge: its start time is its /proc entry's, its limits its own.
    let open = value("process_open_fds");
    let now = std::fs::read_dir(format!("/proc/{}/fd", bridge.pid()))
        .unwrap()
        .count() as f64;
    assert!(
        (open - now).abs() <= 8.0,
        "open fds {open}, /proc says {now}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bridge.pid())).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    assert_eq!(value("process_max_fds"), soft);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= epoch + 1.0 && started > epoch - 120.0,
        "{started} vs now {epoch}"
    );
}

#[test]
fn openmetrics_is_served_to_scrapers_that_ask_for_it_and_the_classic_text_otherwise() {
    // Proves: Prometheus' own Accept header (and a bare openmetrics one) gets OpenMetrics 1.0.0
    // ending in `# EOF`, with counter families named without `_total` and the build info
    // family; no Accept, `*/*` or a text/plain preference gets the classic text, which promtool
    // accepts. (tests/it/metrics.rs has a real Prometheus server scrape the OpenMetrics.)
    let bridge = bridge()
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(ServiceSpec::echo())
        .start();
    let addr = metrics_addr(&bridge);
    bridge.client().call("echo", b"counted").unwrap();
    let om_type = "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n";
    for accept in [PROMETHEUS_ACCEPT, "application/openmetrics-text"] {
        let (status, head, text) = get(&addr, "/metrics", Some(accept));
        assert_eq!(status, 200);
        assert!(head.contains(om_type), "{accept}: {head}");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE acgi_bridge_requests counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE acgi_bridge_build info\n"), "{text}");
        assert!(
            text.contains("# UNIT process_start_time_seconds seconds\n"),
            "{text}"
        );
        assert!(
            text.contains("acgi_bridge_requests_total{service=\"echo\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "acgi_bridge_request_duration_seconds_bucket{le=\"+Inf\",service=\"echo\"} 1\n"
            ),
            "{text}"
        );
    }
    for accept in [
        None,
        Some("*/*"),
        Some("text/plain;q=1,application/openmetrics-text;q=0.5"),
    ] {
        let (status, head, text) = get(&addr, "/metrics", accept);
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{accept:?}: {head}"
        );
        assert!(!text.contains("# EOF"));
        acgi_bridge::metrics::check_with_promtool(&text)
            .unwrap_or_else(|error| panic!("promtool: {error:?}\n{text}"));
    }
}

#[test]
fn readyz_answers_503_within_the_report_bound_when_a_core_is_stuck() {
    // Proves: with one core's thread stopped, /readyz does not hang: it is a 503 naming the
    // cores that did not report within a few seconds, and /healthz stays 200 meanwhile; once
    // the core runs again, /readyz is 200.
    let echo = ServiceSpec::echo().static_pool(2);
    let bridge = bridge()
        .top("cores = 2")
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(echo)
        .start();
    let addr = metrics_addr(&bridge);
    poll(&addr, "/readyz", "ready", |s, _| s == 200);
    let tid = std::fs::read_dir(format!("/proc/{}/task", bridge.pid()))
        .unwrap()
        .flatten()
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == "acgi-core-1")
        })
        .and_then(|task| task.file_name().to_str()?.parse().ok())
        .expect("the thread of core 1");
    let Some(freeze) = FrozenThread::freeze(tid) else {
        return;
    };
    let started = Instant::now();
    let (status, body) = http_get(&addr, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("cores: 1 of 2 cores reported"), "{body}");
    assert_healthy(&addr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "/readyz and /healthz took {:?} with a core frozen",
        started.elapsed()
    );
    drop(freeze);
    poll(&addr, "/readyz", "ready again", |s, _| s == 200);
}
