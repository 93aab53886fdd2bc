//! The load shapes end to end against a fake bridge: a tokio task that speaks the wire protocol
//! (Resolve, Request) and answers in process, so the tests need no bridge binary or workers.
//!
//! Services of the fake: `echo` (id 1) replies at once with the payload; `pause` (id 2) replies
//! at once too, except that the first request arriving after `pause_at` stalls its connection
//! for `pause` before anything more on it is read or answered (a service hiccup).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use acgi_loadgen::mix::PayloadKind;
use acgi_loadgen::workload::Workload;
use acgi_loadgen::{closed_loop, open_loop};
use acgi_proto::{Header, Kind, HEADER_BYTES, PAYLOAD_BYTES_MAX_DEFAULT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::time::Instant;

struct Fake {
    path: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("acgi-loadgen-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Start the fake on the current runtime; the pause fires once, for the whole fake.
fn start_fake(name: &str, pause_at: Instant, pause: Duration) -> Fake {
    let dir = temp_dir(name);
    let path = dir.0.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let paused = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let paused = Arc::clone(&paused);
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let mut header_bytes = [0u8; HEADER_BYTES];
                loop {
                    if read.read_exact(&mut header_bytes).await.is_err() {
                        return;
                    }
                    let header = Header::decode(&header_bytes, PAYLOAD_BYTES_MAX_DEFAULT).unwrap();
                    let mut payload = vec![0u8; header.payload_len as usize];
                    read.read_exact(&mut payload).await.unwrap();
                    let reply = match header.kind {
                        Kind::Resolve => {
                            let id = match &payload[..] {
                                b"echo" => 1,
                                b"pause" => 2,
                                other => panic!("unknown service {other:?}"),
                            };
                            payload.clear();
                            Header::new(Kind::Resolved, id, header.request_id, 0)
                        }
                        Kind::Request => {
                            if header.service_id == 2
                                && Instant::now() >= pause_at
                                && !paused.swap(true, Ordering::SeqCst)
                            {
                                tokio::time::sleep(pause).await;
                            }
                            Header::new(
                                Kind::Reply,
                                header.service_id,
                                header.request_id,
                                payload.len() as u32,
                            )
                        }
                        other => panic!("unexpected {other:?}"),
                    };
                    let mut frame = reply.encode().to_vec();
                    frame.extend_from_slice(&payload);
                    if write.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Fake { path, _dir: dir }
}

fn workload(fake: &Fake, service: &str, duration: Duration) -> Workload {
    let mut workload = Workload::simple(
        &format!("unix:{}", fake.path.display()),
        service,
        PayloadKind::Bytes(64),
    );
    workload.verify = vec![true];
    workload.warmup = Duration::ZERO;
    workload.duration = duration;
    workload.drain_grace = Duration::from_secs(2);
    workload
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_open_loop_offers_its_rate_and_gets_every_reply() {
    // Proves the pacer schedules rate x duration requests, all answered and verified.
    runtime().block_on(async {
        let fake = start_fake(
            "rate",
            Instant::now() + Duration::from_secs(3600),
            Duration::ZERO,
        );
        let plan = open_loop::Plan {
            workload: workload(&fake, "echo", Duration::from_millis(500)),
            connections: 2,
            rate: 2000.0,
            arrival: open_loop::Arrival::Constant,
            in_flight_max: 1000,
        };
        let outcome = open_loop::run(&plan).await.unwrap();
        assert_eq!(outcome.scheduled, 1000);
        let recorder = &outcome.recorder;
        assert_eq!(recorder.requests_ok(), 1000);
        assert_eq!(recorder.errors_total(), 0);
        assert_eq!(recorder.mismatches(), 0);
        assert!((outcome.requests_per_second() - 2000.0).abs() < 100.0);
        // The generator kept its schedule: most sends went out within a millisecond.
        assert!(recorder.send_lag().unwrap().p50 < 1_000);
    });
}

#[test]
fn a_stall_is_charged_to_every_request_the_open_loop_meant_to_send() {
    // Proves coordinated omission correction: a 100 ms stall shows in one closed-loop request
    // but in the ~100 open-loop requests scheduled during it.
    let pause = Duration::from_millis(100);
    let slow_count = |recorder: &acgi_loadgen::stats::Recorder| {
        let histogram = recorder.latency_histogram();
        histogram.len() - histogram.count_between(0, 50_000)
    };
    let closed = runtime().block_on(async {
        let fake = start_fake("closed", Instant::now() + Duration::from_millis(300), pause);
        let plan = closed_loop::Plan {
            workload: workload(&fake, "pause", Duration::from_secs(1)),
            connections: 1,
            depth: 1,
            batch: false,
        };
        closed_loop::run(&plan).await.unwrap()
    });
    let open = runtime().block_on(async {
        let fake = start_fake("open", Instant::now() + Duration::from_millis(300), pause);
        let plan = open_loop::Plan {
            workload: workload(&fake, "pause", Duration::from_secs(1)),
            connections: 1,
            rate: 1000.0,
            arrival: open_loop::Arrival::Constant,
            in_flight_max: 10_000,
        };
        open_loop::run(&plan).await.unwrap()
    });
    assert!(closed.recorder.latency().unwrap().max >= 100_000);
    assert!(open.recorder.latency().unwrap().max >= 100_000);
    // One request met the stall in the closed loop (a loaded machine may add a hiccup or two);
    // about half of the ~100 scheduled during it waited more than 50 ms in the open loop.
    let closed_slow = slow_count(&closed.recorder);
    assert!(
        (1..=3).contains(&closed_slow),
        "closed loop: {closed_slow} slow"
    );
    let open_slow = slow_count(&open.recorder);
    assert!(
        (30..=150).contains(&open_slow),
        "open loop: {open_slow} slow"
    );
    assert_eq!(open.recorder.errors_total(), 0);
}

#[test]
fn a_batched_closed_loop_keeps_its_depth_and_verifies_every_reply() {
    // Proves --batch: two connections x 8 in flight, every reply checked against its request,
    // no error, and the calls in flight at the end drained, not abandoned.
    runtime().block_on(async {
        let fake = start_fake(
            "batch",
            Instant::now() + Duration::from_secs(3600),
            Duration::ZERO,
        );
        let plan = closed_loop::Plan {
            workload: workload(&fake, "echo", Duration::from_millis(300)),
            connections: 2,
            depth: 8,
            batch: true,
        };
        let outcome = closed_loop::run(&plan).await.unwrap();
        assert!(outcome.recorder.requests_ok() > 100);
        assert_eq!(outcome.recorder.errors_total(), 0);
        assert_eq!(outcome.recorder.mismatches(), 0);
        assert_eq!(outcome.recorder.tasks_stopped_early(), 0);
    });
}

#[test]
fn an_unreachable_bridge_fails_before_any_load() {
    // Proves connecting happens up front and the error names the connection.
    runtime().block_on(async {
        let fake = start_fake("unreachable", Instant::now(), Duration::ZERO);
        let mut workload = workload(&fake, "echo", Duration::from_millis(100));
        workload.connect = "unix:/nonexistent/acgi-loadgen.sock".to_string();
        let plan = open_loop::Plan {
            workload,
            connections: 1,
            rate: 10.0,
            arrival: open_loop::Arrival::Poisson,
            in_flight_max: 10,
        };
        let error = open_loop::run(&plan).await.unwrap_err().to_string();
        assert!(error.contains("connection 1 of 1"), "{error}");
        drop(fake);
    });
}
