//! The optional per-service sandboxes against the real bridge and kernel: a Landlock ruleset
//! that confines a worker's filesystem to its paths, and a seccomp filter that denies the
//! dangerous system call groups (with `seccomp_allow` re-opening one), each compared with an
//! unsandboxed worker of the same executable (so each test can fail); and `check` naming a bad
//! group or a missing path.

use std::path::Path;
use std::process::Command;

use crate::common::{self, Bridge, ServiceSpec};

fn faulty(id: u32, name: &str, extra: &str) -> ServiceSpec {
    let mut service = ServiceSpec::new(id, name, common::example("faulty")).workers(1, 1);
    service.extra.push_str(extra);
    service
}

fn ask(bridge: &Bridge, service: &str, command: &str) -> String {
    let reply = bridge
        .client()
        .call(service, command.as_bytes())
        .unwrap_or_else(|e| panic!("{service}: {command}: {e}"));
    String::from_utf8_lossy(&reply).into_owned()
}

/// The kernel's Landlock ABI, if it has Landlock.
fn landlock_abi() -> Option<i64> {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only answers.
    let abi = unsafe { libc::syscall(444, std::ptr::null::<u8>(), 0usize, 1u32) };
    (abi > 0).then_some(abi)
}

#[test]
fn landlock_confines_a_worker_to_the_system_and_its_own_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (readable, writable, other) = (
        dir.path().join("readable"),
        dir.path().join("writable"),
        dir.path().join("other"),
    );
    for sub in [&readable, &writable, &other] {
        std::fs::create_dir(sub).unwrap();
        std::fs::write(sub.join("file"), b"data").unwrap();
    }
    let extra = format!(
        "landlock = true\nlandlock_read = [{:?}]\nlandlock_write = [{:?}]\n",
        readable.display().to_string(),
        writable.display().to_string()
    );
    let bridge = common::bridge()
        .service(faulty(3, "boxed", &extra))
        .service(faulty(4, "free", ""))
        .start();
    if landlock_abi().is_none() {
        bridge.wait_log("the kernel has no Landlock");
        eprintln!("skipped: this kernel has no Landlock (the warning was logged)");
        return;
    }
    let file = |sub: &Path| sub.join("file").display().to_string();
    let open = |service: &str, path: &str| ask(&bridge, service, &format!("open {path}"));
    let write = |service: &str, path: &Path| {
        ask(
            &bridge,
            service,
            &format!("write {}", path.join("new").display()),
        )
    };
    // The same executable without the ruleset reaches everything: the test can fail.
    assert_eq!(open("free", &file(&other)), "opened");
    assert_eq!(write("free", &other), "written");
    // Confined: its own paths, the system's, and nothing else.
    assert_eq!(open("boxed", &file(&readable)), "opened");
    assert_eq!(open("boxed", "/etc/hosts"), "opened", "the system's files");
    assert_eq!(
        open("free", "/etc/shadow"),
        "opened",
        "root reads it unconfined"
    );
    assert!(
        open("boxed", "/etc/shadow").starts_with("refused: errno 13"),
        "not /etc as a whole"
    );
    assert!(
        open("boxed", &file(&other)).starts_with("refused: errno 13"),
        "a path outside its rules"
    );
    assert!(
        open("boxed", "/root").starts_with("refused: errno 13"),
        "home directories are not the system's"
    );
    assert_eq!(write("boxed", &writable), "written");
    assert!(
        write("boxed", &readable).starts_with("refused: errno 13"),
        "landlock_read is read-only"
    );
    assert!(write("boxed", &other).starts_with("refused: errno 13"));
    assert!(!other.join("new").exists() || std::fs::read(other.join("new")).unwrap() == b"x");
    let log = bridge.log();
    assert!(
        log.contains("service=boxed") && log.contains("landlock=true"),
        "the startup line says the service is sandboxed: {log}"
    );
}

#[test]
fn seccomp_denies_the_dangerous_groups_and_seccomp_allow_reopens_one() {
    let bridge = common::bridge()
        .service(faulty(3, "filtered", "seccomp = true\n"))
        .service(faulty(
            4,
            "uring",
            "seccomp = true\nseccomp_allow = [\"@io-uring\"]\n",
        ))
        .service(faulty(5, "free", ""))
        .start();
    // Without the filter both calls work here (the bridge runs as root): the test can fail.
    assert_eq!(ask(&bridge, "free", "unshare"), "unshared");
    assert_eq!(ask(&bridge, "free", "io-uring"), "set up");
    let denied = ask(&bridge, "filtered", "unshare");
    assert!(denied.contains("refused: errno 1 "), "{denied}");
    let denied = ask(&bridge, "filtered", "io-uring");
    assert!(denied.contains("refused: errno 1 "), "{denied}");
    // The filter leaves the worker's own work alone.
    assert_eq!(
        ask(&bridge, "filtered", "echo still serving"),
        "still serving"
    );
    assert!(ask(&bridge, "uring", "unshare").contains("refused: errno 1 "));
    assert_eq!(ask(&bridge, "uring", "io-uring"), "set up", "seccomp_allow");
    let report = ask(&bridge, "filtered", "report");
    assert!(
        report.lines().any(|l| l == "Seccomp: 2"),
        "mode 2 (filter) in its status: {report}"
    );
}

#[test]
fn check_names_an_unknown_seccomp_group_and_a_missing_landlock_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    let builder = common::bridge()
        .service(faulty(
            3,
            "a",
            "seccomp = true\nseccomp_allow = [\"@mounts\"]\n",
        ))
        .service(faulty(
            4,
            "b",
            "landlock = true\nlandlock_read = [\"/no/such/dir\"]\n",
        ));
    std::fs::write(&config, builder.config_text(dir.path())).unwrap();
    let output = Command::new(common::bridge_exe())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("seccomp_allow") && text.contains("\"@mounts\"") && text.contains("@mount,"),
        "names the group and lists the real ones: {text}"
    );
    assert!(
        text.contains("landlock") && text.contains("/no/such/dir"),
        "{text}"
    );
}

/// A port nothing listens on: bound to 127.0.0.1:0, then closed.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn landlock_tcp_rules_let_a_worker_bind_and_connect_only_to_its_listed_ports() {
    // Proves Landlock's TCP rules (ABI 4): with `landlock`, a worker connects only to the ports
    // of landlock_tcp_connect and binds only those of landlock_tcp_bind (EACCES for the
    // others, on loopback too), while a service without Landlock does both; on an older
    // kernel the skip is logged.
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
    let (bind_ok, bind_denied) = (free_port(), free_port());
    let extra = format!(
        "landlock = true\nlandlock_tcp_connect = [{}]\nlandlock_tcp_bind = [{bind_ok}]\n",
        port(&allowed)
    );
    let bridge = common::bridge()
        .service(faulty(3, "boxed", &extra))
        .service(faulty(4, "free", ""))
        .start();
    let Some(abi) = landlock_abi() else {
        bridge.wait_log("the kernel has no Landlock");
        eprintln!("skipped: this kernel has no Landlock (the warning was logged)");
        return;
    };
    if abi < 4 {
        bridge.wait_log("TCP bind and connect are not restricted");
        eprintln!("skipped: Landlock ABI {abi} has no TCP rules (the warning was logged)");
        return;
    }
    let connect = |service: &str, port: u16| ask(&bridge, service, &format!("tcp-connect {port}"));
    let bind = |service: &str, port: u16| ask(&bridge, service, &format!("tcp-bind {port}"));
    assert_eq!(connect("boxed", port(&allowed)), "connected");
    let denied = connect("boxed", port(&other));
    assert!(denied.starts_with("connect refused: errno 13"), "{denied}");
    assert_eq!(bind("boxed", bind_ok), "bound");
    let denied = bind("boxed", bind_denied);
    assert!(denied.starts_with("bind refused: errno 13"), "{denied}");
    // The same commands in a service without Landlock: the rules are the sandbox's.
    assert_eq!(connect("free", port(&other)), "connected");
    assert_eq!(bind("free", bind_denied), "bound");
}
