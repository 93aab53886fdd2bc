//! The kernel floor: the startup probe's choice of reaping mode, and the pidfd fallback (for
//! kernels without `IORING_OP_WAITID`, 6.1-6.6) forced with `ACGI_FORCE_REAP=pidfd` and run
//! through the lifecycle and fault tests.

use std::time::{Duration, Instant};

use acgi_bridge::proto::ErrorCode;

use crate::common::{bridge, fd_list, with_bridge_env, Bridge, ServiceSpec};

/// The descriptors of the bridge that are pidfds.
fn pidfds(bridge: &Bridge) -> usize {
    fd_list(bridge.pid())
        .iter()
        .filter(|fd| fd.ends_with("anon_inode:[pidfd]"))
        .count()
}

/// Wait (bounded) until the bridge holds `count` pidfds.
fn wait_pidfds(bridge: &Bridge, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pidfds(bridge) != count {
        assert!(
            Instant::now() < deadline,
            "{} pidfds, not {count}: {:#?}",
            pidfds(bridge),
            fd_list(bridge.pid())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first line of `log` that contains `needle`.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
}

#[test]
fn forced_pidfd_reaping_is_logged_and_reaps_through_one_pidfd_per_worker() {
    // Proves the fallback is what runs when forced: the startup log says so, the bridge holds
    // one pidfd per worker (none left for a reaped one), and killed and exiting workers are
    // reaped with their real status and replaced, leaving no zombie.
    with_bridge_env("ACGI_FORCE_REAP", "pidfd", || {
        let bridge = bridge()
            .service(ServiceSpec::faulty().workers(3, 3))
            .start();
        bridge.wait_log("forced by ACGI_FORCE_REAP");
        let status = bridge.wait_status("3 workers", |s| s.services[0].workers_idle == 3);
        wait_pidfds(&bridge, 3);
        let victim = status.services[0].pids[0];
        // SAFETY: kill(2) on a worker of the bridge under test.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        let log = bridge.wait_log("worker exited: killed by signal 9");
        let exited = line_with(&log, "worker exited: killed by signal 9");
        assert!(exited.contains(&format!("pid={victim}")), "{exited}");
        let mut client = bridge.client();
        let error = client.call("faulty", b"exit").unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::WorkerFailed), "{error}");
        bridge.wait_log("worker exited: exit status 3");
        bridge.wait_status("3 workers again", |s| {
            s.services[0].workers_idle == 3 && !s.services[0].pids.contains(&victim)
        });
        wait_pidfds(&bridge, 3);
        bridge.assert_no_zombies();
    });
}

#[test]
fn the_probe_logs_the_reaping_mode_it_chose() {
    // Proves the unforced start: the probe passes on this kernel and names its mode, and the
    // bridge holds pidfds only in the fallback mode.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(2, 2))
        .start();
    let log = bridge.wait_log("io_uring probe passed");
    let line = line_with(&log, "io_uring probe passed");
    bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    if line.contains("reaping workers with IORING_OP_WAITID") {
        assert_eq!(pidfds(&bridge), 0, "{:#?}", fd_list(bridge.pid()));
    } else {
        assert!(line.contains("pidfd polls"), "{line}");
        wait_pidfds(&bridge, 2);
    }
}

#[test]
fn an_unknown_forced_mode_fails_the_start_naming_the_knob() {
    // Proves the knob is checked: a value that is not a mode stops the start with a message
    // naming the variable and the values it takes.
    with_bridge_env("ACGI_FORCE_REAP", "poll", || {
        let error = bridge()
            .service(ServiceSpec::echo())
            .try_start()
            .err()
            .expect("the bridge refuses to start");
        assert!(
            error.contains("ACGI_FORCE_REAP=\"poll\" is not a reaping mode: use `pidfd`"),
            "{error}"
        );
    });
}

/// Lifecycle and fault tests again, with the pidfd fallback forced.
mod forced_pidfd {
    use crate::common::with_bridge_env;

    fn pidfd(test: fn()) {
        with_bridge_env("ACGI_FORCE_REAP", "pidfd", test);
    }

    #[test]
    fn sigterm_answers_requests_in_flight_then_exits_zero() {
        pidfd(crate::lifecycle::sigterm_answers_requests_in_flight_then_exits_zero);
    }

    #[test]
    fn sdk_workers_exit_cleanly_when_the_bridge_stops() {
        pidfd(crate::lifecycle::sdk_workers_exit_cleanly_when_the_bridge_stops);
    }

    #[test]
    fn sigint_after_the_shutdown_timeout_answers_hung_requests_then_exits_zero() {
        pidfd(
            crate::lifecycle::sigint_after_the_shutdown_timeout_answers_hung_requests_then_exits_zero,
        );
    }

    #[test]
    fn a_worker_sigkilled_mid_request_fails_only_that_request() {
        pidfd(crate::faults::a_worker_sigkilled_mid_request_fails_only_that_request);
    }

    #[test]
    fn crashes_and_exits_mid_request_fail_only_their_requests_under_load() {
        pidfd(crate::faults::crashes_and_exits_mid_request_fail_only_their_requests_under_load);
    }

    #[test]
    fn a_worker_crashing_on_its_nth_request_fails_only_that_request() {
        pidfd(crate::pool::a_worker_crashing_on_its_nth_request_fails_only_that_request);
    }

    #[test]
    fn a_hung_request_times_out_and_its_worker_is_killed_and_replaced() {
        pidfd(crate::pool::a_hung_request_times_out_and_its_worker_is_killed_and_replaced);
    }

    #[test]
    fn max_requests_recycles_workers() {
        pidfd(crate::pool::max_requests_recycles_workers);
    }
}
