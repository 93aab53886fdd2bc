//! Clients and workers in another language, written from docs/protocol.md alone.

use std::process::Command;

use crate::common::{bridge, ServiceSpec};

fn python_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn conformance(addr: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/conformance.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(addr)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "conformance failed against {addr}:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn python_client_from_the_spec_passes_conformance() {
    // Proves the spec is enough to write a client: a Python client passes every check over
    // both listeners.
    assert!(python_available(), "python3 is required");
    let bridge = bridge().service(ServiceSpec::echo()).start();
    conformance(&bridge.unix);
    conformance(&bridge.tcp);
}

#[test]
fn python_worker_from_the_spec_serves_requests() {
    // Proves the spec is enough to write a worker: a Python echo worker serves in-slot and
    // copy-path payloads, and passes the same conformance checks as the Rust one.
    assert!(python_available(), "python3 is required");
    let worker = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/py_echo_worker.py"
    ));
    let bridge = bridge()
        .service(ServiceSpec::new(1, "echo", worker).workers(1, 2))
        .start();
    let mut client = bridge.client();
    for len in [0usize, 10, 65536, 65537, 1 << 20] {
        let payload = crate::common::tagged_payload(len as u64, len);
        assert!(
            client.call("echo", &payload).unwrap() == payload,
            "{len} bytes"
        );
    }
    conformance(&bridge.unix);
}
