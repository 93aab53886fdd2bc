//! Thread per core: connections spread across the cores, requests move to a core with an idle
//! worker, and a graceful stop loses nothing that was moved.

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::Kind;

use crate::common::{bridge, pipeline_tagged, ServiceSpec};

fn faulty_static(workers: u32) -> ServiceSpec {
    ServiceSpec::faulty().static_pool(workers)
}

#[test]
fn connections_spread_evenly_across_cores_and_both_serve() {
    // Proves the spread: 16 Unix and 16 TCP connections opened one after another end up split
    // evenly between the two cores (whichever core's ring accepted them), and both cores'
    // workers serve their requests, every reply to its own request.
    let bridge = bridge()
        .top("cores = 2")
        .service(ServiceSpec::echo().workers(2, 4))
        .start();
    let mut clients: Vec<BlockingClient> = (0..16).map(|_| bridge.client()).collect();
    clients.extend((0..16).map(|_| bridge.tcp_client()));
    std::thread::scope(|scope| {
        for (number, client) in clients.iter_mut().enumerate() {
            scope.spawn(move || {
                pipeline_tagged(
                    client,
                    number as u64 * 1000..number as u64 * 1000 + 200,
                    |tag| 64 + tag as usize % 300,
                )
            });
        }
    });
    let status = bridge.status();
    assert_eq!(status.cores, 2);
    assert_eq!(status.connections, 32, "{status:#?}");
    let spread = &status.connections_by_core;
    assert!(
        spread.iter().all(|&n| (15..=17).contains(&n)),
        "connections per core: {spread:?}"
    );
    assert!(
        status.requests_by_core.iter().all(|&n| n > 0),
        "requests run per core: {:?}",
        status.requests_by_core
    );
    assert_eq!(status.counters.requests_ok, 32 * 200);
    assert_eq!(
        status.files_registered,
        32 + status.worker_processes,
        "every caller and worker socket is in its ring's file table"
    );
    drop(clients);
    let mut bridge = bridge;
    assert!(bridge.stop().success());
}

#[test]
fn a_request_never_waits_on_a_busy_core_while_another_core_has_an_idle_worker() {
    // Proves forwarding under fully skewed load: one connection (so one core) sends four slow
    // requests to a static pool of four workers, two per core. All four run at once, so two of
    // them went to the other core's workers, and the answers come back to the right requests.
    // (Workers pinned beside their core's loop, which this test also checks.)
    let bridge = bridge()
        .top("cores = 2")
        .top("worker_affinity = \"core\"")
        .service(faulty_static(4))
        .start();
    let status = bridge.wait_status("4 idle workers", |s| s.services[0].workers_idle == 4);
    let mut cpus: Vec<String> = status.services[0]
        .pids
        .iter()
        .map(|pid| {
            let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let line = proc_status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list"))
                .expect("Cpus_allowed_list");
            line.split_whitespace().nth(1).unwrap().to_string()
        })
        .collect();
    cpus.sort();
    assert_eq!(
        cpus,
        ["0", "0", "1", "1"],
        "each core's two workers on its CPU"
    );
    let mut client = bridge.client();
    let ids: Vec<u64> = (0..4)
        .map(|_| client.send(3, b"sleep 1500").unwrap())
        .collect();
    let status = bridge.wait_status("all four workers busy", |s| s.services[0].workers_busy == 4);
    assert!(status.counters.requests_forwarded >= 2, "{status:#?}");
    let mut answered = Vec::new();
    for _ in 0..4 {
        let answer = client.receive().unwrap();
        assert_eq!(answer.header.kind, Kind::Reply);
        assert_eq!(answer.payload, b"slept");
        answered.push(answer.header.request_id);
    }
    answered.sort_unstable();
    assert_eq!(answered, ids);
    let status = bridge.status();
    assert!(
        status.requests_by_core.iter().all(|&n| n == 2),
        "requests run per core: {:?}",
        status.requests_by_core
    );
}

#[test]
fn a_backlog_moves_to_the_core_whose_worker_becomes_idle() {
    // Proves rebalancing of waiting requests: a burst of slow requests on one connection,
    // more than the workers, drains through every worker on both cores (each core runs a
    // share), and every answer matches its request.
    let bridge = bridge().top("cores = 2").service(faulty_static(2)).start();
    bridge.wait_status("2 idle workers", |s| s.services[0].workers_idle == 2);
    let mut client = bridge.client();
    let mut ids: Vec<u64> = (0..20)
        .map(|_| client.send(3, b"sleep 20").unwrap())
        .collect();
    let mut answered = Vec::new();
    for _ in 0..20 {
        let answer = client.receive().unwrap();
        assert_eq!(answer.header.kind, Kind::Reply);
        assert_eq!(answer.payload, b"slept");
        answered.push(answer.header.request_id);
    }
    answered.sort_unstable();
    ids.sort_unstable();
    assert_eq!(answered, ids);
    let status = bridge.status();
    let per_core = &status.requests_by_core;
    assert!(
        per_core.iter().all(|&n| n >= 5),
        "requests run per core: {per_core:?} (one core's worker sat idle)"
    );
}

#[test]
fn a_core_without_a_shard_of_a_service_forwards_all_of_it() {
    // Proves a service with fewer workers than cores: max_workers = 1 puts its one worker on
    // core 0; callers on core 1 are served by it through forwarding, and the limit holds.
    // (With idle spinning on: the loops poll their rings before sleeping.)
    let bridge = bridge()
        .top("cores = 2")
        .top("idle_spin_us = 50")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let mut clients: Vec<BlockingClient> = (0..4).map(|_| bridge.client()).collect();
    std::thread::scope(|scope| {
        for (number, client) in clients.iter_mut().enumerate() {
            scope.spawn(move || {
                pipeline_tagged(
                    client,
                    number as u64 * 1000..number as u64 * 1000 + 100,
                    |tag| 64 + tag as usize % 300,
                )
            });
        }
    });
    let status = bridge.status();
    assert_eq!(status.connections_by_core, [2, 2], "{status:#?}");
    assert_eq!(status.requests_by_core, [400, 0]);
    assert!(status.counters.requests_forwarded >= 200, "{status:#?}");
    assert_eq!(status.worker_processes, 1);
    assert_eq!(status.services[0].max_workers, 1);
}

#[test]
fn sigterm_answers_requests_running_on_another_core() {
    // Proves a graceful stop loses no forwarded request: the caller's core waits for the
    // answers from the other core's worker before it closes the connection and exits.
    let mut bridge = bridge().top("cores = 2").service(faulty_static(2)).start();
    bridge.wait_status("2 idle workers", |s| s.services[0].workers_idle == 2);
    let mut client = bridge.client();
    for _ in 0..2 {
        client.send(3, b"sleep 700").unwrap();
    }
    let status = bridge.wait_status("both workers busy", |s| s.services[0].workers_busy == 2);
    assert_eq!(status.counters.requests_forwarded, 1, "{status:#?}");
    bridge.signal(libc::SIGTERM);
    for _ in 0..2 {
        let answer = client.receive().unwrap();
        assert_eq!(answer.header.kind, Kind::Reply);
        assert_eq!(answer.payload, b"slept");
    }
    let exit = bridge
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("exits");
    assert!(exit.success());
}
