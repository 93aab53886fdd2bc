//! Crashing and misbehaving workers: the request a worker held gets `worker failed`, nothing
//! else is affected, the pool recovers, and no zombie is left behind.

use acgi_bridge::proto::ErrorCode;

use crate::common::{bridge, bridge_exe, ServiceSpec};

#[test]
pub fn a_worker_sigkilled_mid_request_fails_only_that_request() {
    // Proves SIGKILL during a request yields code 4 for it, and later requests succeed on a
    // replacement worker.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let first_pid = client.call("faulty", b"pid").unwrap();
    let error = client.call("faulty", b"sigkill").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::WorkerFailed), "{error}");
    assert!(
        error.to_string().contains("killed by signal 9") || error.to_string().contains("closed")
    );
    for _ in 0..5 {
        assert_eq!(client.call("faulty", b"echo ok").unwrap(), b"ok");
    }
    let second_pid = client.call("faulty", b"pid").unwrap();
    assert_ne!(first_pid, second_pid, "the dead worker was replaced");
    bridge.assert_no_zombies();
}

#[test]
pub fn crashes_and_exits_mid_request_fail_only_their_requests_under_load() {
    // Proves that with other requests in flight on other workers, a crash fails exactly the
    // crashing request; every other request gets its own reply.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(3, 3))
        .start();
    std::thread::scope(|scope| {
        for thread in 0..4u32 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = bridge.client();
                for i in 0..200u32 {
                    let payload = format!("echo t{thread}-{i}");
                    assert_eq!(
                        client.call("faulty", payload.as_bytes()).unwrap(),
                        &payload.as_bytes()[5..]
                    );
                }
            });
        }
        let mut client = bridge.client();
        for command in ["abort", "exit", "sigkill", "abort"] {
            let error = client.call("faulty", command.as_bytes()).unwrap_err();
            assert_eq!(
                error.code(),
                Some(ErrorCode::WorkerFailed),
                "{command}: {error}"
            );
        }
    });
    bridge.assert_no_zombies();
}

#[test]
fn handler_errors_are_service_errors_and_the_worker_stays() {
    // Proves an error returned by the handler reaches the caller as code 8 with its message,
    // without killing the worker.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let pid = client.call("faulty", b"pid").unwrap();
    let error = client.call("faulty", b"fail the disk is full").unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::ServiceError));
    assert!(error.to_string().contains("the disk is full"));
    assert_eq!(client.call("faulty", b"pid").unwrap(), pid, "same worker");
}

#[test]
fn replies_larger_than_the_slot_take_the_copy_path() {
    // Proves a worker's reply over its slot size arrives whole through the control socket.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    for len in [65535usize, 65536, 65537, 3 << 20] {
        let reply = client
            .call("faulty", format!("big {len}").as_bytes())
            .unwrap();
        assert_eq!(reply.len(), len);
        assert!(reply.iter().all(|b| *b == b'x'));
    }
}

#[test]
fn worker_stderr_reaches_the_log_tagged_with_service_and_pid() {
    // Proves worker output lines are logged with their service and pid.
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let pid = String::from_utf8(client.call("faulty", b"pid").unwrap()).unwrap();
    assert_eq!(client.call("faulty", b"stderr 3").unwrap(), b"ok");
    // The log line is written when the bridge reads the pipe; stop the bridge so that every
    // line has been read and flushed before we look.
    let mut bridge = bridge;
    assert!(bridge.stop().success());
    let log = bridge.log();
    let line = log
        .lines()
        .find(|l| l.contains("faulty worker stderr line 2"))
        .unwrap_or_else(|| panic!("no worker line in the log:\n{log}"));
    assert!(
        line.contains("service=\"faulty\"") || line.contains("service=faulty"),
        "{line}"
    );
    assert!(line.contains(&format!("pid={pid}")), "{line}");
}

#[test]
fn a_missing_worker_executable_is_named_by_check_and_serve() {
    // Proves both `check` and `serve` name the missing executable's path.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bridge.toml");
    let text = bridge()
        .service(crate::common::ServiceSpec::new(
            1,
            "ghost",
            "/opt/nowhere/ghost-worker".into(),
        ))
        .config_text(dir.path());
    std::fs::write(&config, text).unwrap();
    let check = std::process::Command::new(bridge_exe())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains("service[0].exec") && stderr.contains("/opt/nowhere/ghost-worker"),
        "{stderr}"
    );
    let serve = std::process::Command::new(bridge_exe())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!serve.status.success());
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(stderr.contains("/opt/nowhere/ghost-worker"), "{stderr}");
}

#[test]
fn check_names_every_bad_key() {
    // Proves `check` reports each invalid key with its reason, and accepts the bundled config.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[listen]\nunix = \"/tmp/x.sock\"\n[[service]]\nid = 1\nname = \"a\"\nexec = \"/bin/cat\"\nmin_workers = 9\nmax_workers = 2\nslot_size_bytes = 1\n",
    )
    .unwrap();
    let output = std::process::Command::new(bridge_exe())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("service[0].min_workers: 9 is over max_workers (2)"),
        "{stderr}"
    );
    assert!(stderr.contains("service[0].slot_size_bytes"), "{stderr}");
    std::fs::write(&config, "[listen]\nunix = \"/tmp/x.sock\"\nbogus_key = 1\n").unwrap();
    let output = std::process::Command::new(bridge_exe())
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("bogus_key"));
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/acgi-bridge.toml");
    let output = std::process::Command::new(bridge_exe())
        .args(["check", "--config", bundled])
        .output()
        .unwrap();
    // The bundled config names release-built workers; it is valid once they are built.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || stderr.contains("target/release/examples"),
        "{stderr}"
    );
}
