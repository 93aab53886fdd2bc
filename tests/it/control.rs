//! The control thread: signals, the admin socket, `/metrics` and interval logs are served off
//! the cores' loops, so every core runs the same loop, a slow or stalled admin or metrics
//! client delays no caller, and a core that does not answer costs status an error, not a hang.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use acgi_bridge::client::BlockingClient;

use crate::common::{bridge, http_get, Bridge, FrozenThread, ServiceSpec};

/// A static echo pool of one worker per core, on two cores, with the metrics endpoint.
fn two_core_echo() -> Bridge {
    let echo = ServiceSpec::echo().static_pool(2);
    let bridge = bridge()
        .top("cores = 2")
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(echo)
        .start();
    bridge.wait_status("an idle worker per core", |s| {
        s.services[0].workers_idle == 2
    });
    bridge
}

/// Send `line` to the admin socket and read the answer until the bridge closes.
fn admin(path: &Path, line: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).expect("connect to the admin socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("an answer, then EOF");
    answer
}

/// The core that ran `client`'s last request (the one whose count went up by one).
fn core_of(bridge: &Bridge, client: &mut BlockingClient) -> usize {
    let before = bridge.status().requests_by_core;
    assert_eq!(client.call("echo", b"where").unwrap(), b"where");
    let after = bridge.status().requests_by_core;
    let grew: Vec<usize> = (0..after.len())
        .filter(|&core| after[core] > before[core])
        .collect();
    assert_eq!(grew.len(), 1, "before {before:?}, after {after:?}");
    grew[0]
}

/// `count` echo calls; returns each one's latency.
fn echo_latencies(client: &mut BlockingClient, count: usize) -> Vec<Duration> {
    (0..count)
        .map(|i| {
            let payload = format!("call {i}");
            let started = Instant::now();
            assert_eq!(
                client.call("echo", payload.as_bytes()).unwrap(),
                payload.as_bytes()
            );
            started.elapsed()
        })
        .collect()
}

fn median(latencies: &mut [Duration]) -> Duration {
    latencies.sort_unstable();
    latencies[latencies.len() / 2]
}

#[test]
fn stalled_and_looping_admin_and_metrics_clients_delay_no_call_on_any_core() {
    // Proves that a metrics client and an admin client stalled mid-request, and status and
    // /metrics requested in a loop, leave every core's echo latency normal, and that status
    // and /metrics answer meanwhile.
    let bridge = two_core_echo();
    let metrics = bridge.metrics.clone().unwrap();
    let mut callers: Vec<BlockingClient> = (0..2).map(|_| bridge.client()).collect();
    let mut cores: Vec<usize> = callers
        .iter_mut()
        .map(|caller| core_of(&bridge, caller))
        .collect();
    cores.sort_unstable();
    assert_eq!(cores, [0, 1], "one caller on each core");
    let baseline: Vec<Duration> = callers
        .iter_mut()
        .map(|caller| median(&mut echo_latencies(caller, 200)))
        .collect();
    let mut stalled_scrape = std::net::TcpStream::connect(&metrics).unwrap();
    stalled_scrape.write_all(b"GET /metr").unwrap();
    let mut stalled_admin = UnixStream::connect(&bridge.admin).unwrap();
    stalled_admin.write_all(b"sta").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, text) = http_get(&metrics, "/metrics").unwrap();
                assert_eq!(code, 200);
                assert!(text.contains("acgi_bridge_requests_total"));
                assert!(admin(&bridge.admin, b"status\n").starts_with('{'));
                rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        for (caller, baseline) in callers.iter_mut().zip(&baseline) {
            // Calls until the scraper has gone round a few times while they ran.
            let from = rounds.load(std::sync::atomic::Ordering::Relaxed);
            let mut latencies = echo_latencies(caller, 200);
            while rounds.load(std::sync::atomic::Ordering::Relaxed) < from + 5 {
                latencies.extend(echo_latencies(caller, 20));
            }
            let slowest = *latencies.iter().max().unwrap();
            let typical = median(&mut latencies);
            assert!(
                slowest < Duration::from_secs(1),
                "a call took {slowest:?} while status and /metrics were served"
            );
            assert!(
                typical < *baseline * 4 + Duration::from_millis(1),
                "median call {typical:?} while scraping, {baseline:?} before"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // The stalled clients were never answered (their requests are not whole), and closed
    // by no one yet: reading finds nothing.
    stalled_scrape.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(stalled_scrape.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
    stalled_admin.set_nonblocking(true).unwrap();
    assert!(
        matches!(stalled_admin.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
}

#[test]
fn status_answers_at_once_while_every_core_is_saturated() {
    // Proves status is served apart from every core's pool: with both cores' workers busy
    // and a request waiting, status and /metrics answer promptly and report it.
    let faulty = ServiceSpec::faulty().static_pool(2).backlog(2);
    let bridge = bridge()
        .top("cores = 2")
        .top("metrics_listen = \"127.0.0.1:0\"")
        .service(faulty)
        .start();
    bridge.wait_status("an idle worker per core", |s| {
        s.services[0].workers_idle == 2
    });
    let mut client = bridge.client();
    for _ in 0..3 {
        client.send(3, b"sleep 3000").unwrap();
    }
    bridge.wait_status("both workers busy, a request waiting", |s| {
        s.services[0].workers_busy == 2 && s.services[0].backlog == 1
    });
    let started = Instant::now();
    let status = bridge.service_status("faulty");
    let (code, text) = http_get(bridge.metrics.as_deref().unwrap(), "/metrics").unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "status and /metrics took {:?}",
        started.elapsed()
    );
    assert_eq!((status.workers_busy, status.backlog), (2, 1), "{status:#?}");
    assert_eq!(code, 200);
    assert!(
        text.contains("acgi_bridge_backlog{service=\"faulty\"} 1"),
        "{text}"
    );
}

#[test]
fn admin_commands_it_does_not_know_and_overlong_lines_get_an_error_line() {
    // Proves the admin socket rejects bad input with one error line and a close, and keeps
    // serving status afterwards.
    let bridge = two_core_echo();
    let answer = admin(&bridge.admin, b"reboot\n");
    assert!(
        answer
            .starts_with("error: unknown command \"reboot\" (the commands: status, reload, pause")
            && answer.ends_with(")\n")
            && answer.lines().count() == 1,
        "{answer}"
    );
    let answer = admin(&bridge.admin, &[b'x'; 300]);
    assert_eq!(answer, "error: command line too long\n");
    assert_eq!(bridge.status().cores, 2);
}

/// The thread id of the bridge's thread named `name`.
fn thread_named(pid: i32, name: &str) -> i32 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .find(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .and_then(|task| task.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no thread {name}"))
}

#[test]
fn a_frozen_core_costs_status_and_metrics_an_error_not_a_hang_and_the_other_core_serves() {
    // Proves the control thread asks every core and waits a bounded time: with one core's
    // thread stopped (ptrace), the other core serves its caller, status answers an error line
    // and /metrics a 503 within seconds; once the core runs again, status is whole again.
    // (Before the control thread, freezing core 0 froze status and /metrics with it.)
    let bridge = two_core_echo();
    let mut caller = bridge.client();
    let serving = core_of(&bridge, &mut caller);
    let frozen = 1 - serving;
    let tid = thread_named(bridge.pid(), &format!("acgi-core-{frozen}"));
    let Some(freeze) = FrozenThread::freeze(tid) else {
        return;
    };
    let slowest = *echo_latencies(&mut caller, 50).iter().max().unwrap();
    assert!(slowest < Duration::from_secs(1), "a call took {slowest:?}");
    let started = Instant::now();
    let answer = admin(&bridge.admin, b"status\n");
    assert!(
        answer.starts_with("error: 1 of 2 cores reported"),
        "{answer}"
    );
    let (code, text) = http_get(bridge.metrics.as_deref().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 503, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "status and /metrics took {:?} with a core frozen",
        started.elapsed()
    );
    drop(freeze);
    let status = bridge.status();
    assert!(status.requests_by_core[serving] >= 51, "{status:#?}");
    assert_eq!(status.services[0].workers_idle, 2, "{status:#?}");
}
