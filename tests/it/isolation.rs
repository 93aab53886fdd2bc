//! The worker boundary (docs/security.md): what a hostile worker can no longer do to the bridge,
//! to other services' workers or to the machine. Each test starts the real bridge with real
//! `faulty` workers that attempt the attack, and checks both that the attempt fails and that the
//! bridge goes on serving.

use crate::common::{bridge, ServiceSpec};

#[test]
fn a_worker_cannot_truncate_or_grow_its_slot() {
    // Proves slots are sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) before a worker sees
    // them: ftruncate fails with EPERM for both directions, and the bridge, which would take a
    // SIGBUS reading a truncated slot, survives and serves other callers.
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::faulty().workers(2, 2))
        .start();
    let mut attacker = bridge.client();
    let mut bystander = bridge.client();
    for command in ["truncate-slot", "grow-slot"] {
        let reply = attacker.call("faulty", command.as_bytes()).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(
            reply, "ftruncate refused: errno 1 (Operation not permitted (os error 1))",
            "{command}"
        );
        assert_eq!(bystander.call("faulty", b"echo still").unwrap(), b"still");
    }
    // The same worker, its slot intact, keeps serving in-slot replies of every size.
    for len in [0usize, 1, 1000, 65536] {
        let mut request = b"echo ".to_vec();
        request.extend(std::iter::repeat_n(b'z', len));
        assert_eq!(attacker.call("faulty", &request).unwrap().len(), len);
    }
    let status = bridge.service_status("faulty");
    assert_eq!(status.spawns, 2, "no worker was lost: {status:#?}");
}

/// Is the test running as root (creating users, changing uid)? Tests that need it say so and
/// return when it is not.
fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// One `name: value` line of a `report` reply.
fn field<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no {name} in the report:\n{report}"))
}

fn report(client: &mut acgi_bridge::client::BlockingClient, service: &str) -> String {
    String::from_utf8(client.call(service, b"report").unwrap()).unwrap()
}

/// Poll (bounded) until `pid` is gone (or a zombie no one will wait for much longer).
fn wait_gone(pid: i32, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} (pid {pid}) is still there: {stat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A shell wrapper that starts the bridge with descriptors 7 and 8 open, SIGQUIT and SIGALRM
/// ignored, and these extra environment variables (`NAME=value`).
fn leaky_wrapper(env: &[&str]) -> Vec<String> {
    let mut command: Vec<String> = vec!["env".into()];
    command.extend(env.iter().map(|v| v.to_string()));
    command.extend([
        "sh".into(),
        "-c".into(),
        "trap '' QUIT ALRM; exec 7</dev/null 8>/dev/null; exec \"$@\"".into(),
        "sh".into(),
    ]);
    command
}

#[test]
fn a_worker_starts_with_nothing_the_bridge_inherited() {
    // Proves spawn hardening: the bridge inherits descriptors 7 and 8 and two ignored signals,
    // yet its worker holds only 0-4, every signal is default and none blocked, it cannot gain
    // privileges (NoNewPrivs), dumps no core (RLIMIT_CORE 0/0), is not dumpable, and leads its
    // own process group; `dumpable = true` and `rlimit_core` change only those two.
    let wrapper = leaky_wrapper(&[]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut loose = ServiceSpec::new(4, "loose", crate::common::example("faulty")).workers(1, 1);
    loose.extra = "dumpable = true\nrlimit_core = 1048576\n".into();
    let bridge = bridge()
        .wrapper(&wrapper)
        .service(ServiceSpec::faulty().workers(1, 1))
        .service(loose)
        .start();
    if is_root() {
        // (Only root can list the descriptors of the non-dumpable bridge.)
        let bridge_fds = crate::common::fd_list(bridge.pid());
        assert!(
            bridge_fds.iter().any(|fd| fd.starts_with("7 ")),
            "the bridge inherited fd 7: {bridge_fds:?}"
        );
    }
    let mut client = bridge.client();
    let report = report(&mut client, "faulty");
    // (5 is the one listing /proc/self/fd, 10 faulty's own copy of its slot.)
    assert_eq!(field(&report, "fds"), "0 1 2 3 4 5 10", "{report}");
    // Only SIGPIPE (bit 12), which faulty's own Rust runtime ignores at startup: not the
    // bridge's QUIT and ALRM, nor anything else ignored on the way to it.
    assert_eq!(field(&report, "SigIgn"), "0000000000001000", "{report}");
    assert_eq!(field(&report, "SigBlk"), "0000000000000000", "{report}");
    assert_eq!(field(&report, "NoNewPrivs"), "1", "{report}");
    assert_eq!(field(&report, "core"), "0/0", "{report}");
    assert_eq!(field(&report, "dumpable"), "0", "{report}");
    let pid = String::from_utf8(client.call("faulty", b"pid").unwrap()).unwrap();
    assert_eq!(field(&report, "pgid"), pid, "its own process group");
    let loose = self::report(&mut client, "loose");
    assert_eq!(field(&loose, "dumpable"), "1", "{loose}");
    assert_eq!(field(&loose, "core"), "1048576/1048576", "{loose}");
    assert_eq!(field(&loose, "NoNewPrivs"), "1", "{loose}");
}

#[test]
fn the_bridge_is_not_dumpable_even_to_its_own_uid() {
    // Proves PR_SET_DUMPABLE 0 on the bridge: run as uid 65534 (not root), its worker, of the
    // same uid, cannot open /proc/<bridge>/mem or /proc/<bridge>/fd, which a same-uid process
    // could otherwise.
    if !is_root() {
        eprintln!("skipped: needs root to start the bridge as another user");
        return;
    }
    let wrapper = [
        "sh",
        "-c",
        "chown -R 65534:65534 \"$(dirname \"$4\")\"; \
         exec setpriv --reuid 65534 --regid 65534 --clear-groups \"$@\"",
        "sh",
    ];
    let bridge = bridge()
        .wrapper(&wrapper)
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let report = report(&mut client, "faulty");
    assert_eq!(field(&report, "Uid"), "65534 65534 65534 65534", "{report}");
    for path in ["mem", "fd"] {
        let probe = format!("open /proc/{}/{path}", bridge.pid());
        let reply = String::from_utf8(client.call("faulty", probe.as_bytes()).unwrap()).unwrap();
        assert!(reply.starts_with("refused: errno 13"), "{path}: {reply}");
    }
}

#[test]
fn a_double_forked_escapee_does_not_outlive_its_worker_or_the_bridge() {
    // Proves the subreaper: a grandchild that left the worker's process group and session
    // (fork, setsid, fork) is re-parented to the bridge, killed and reaped, and the log says so.
    let mut bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    let mut client = bridge.client();
    let reply = client.call("faulty", b"double-fork").unwrap();
    let grandchild: i32 = String::from_utf8(reply).unwrap().parse().unwrap();
    assert!(grandchild > 0);
    wait_gone(grandchild, "the escaped grandchild");
    // (The log is written by a thread of its own: poll it, bounded.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !bridge.log().contains("escaped its worker") {
        assert!(std::time::Instant::now() < deadline, "{}", bridge.log());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The worker itself is untouched, and a second escapee dies with the bridge at the latest.
    let reply = client.call("faulty", b"double-fork").unwrap();
    let second: i32 = String::from_utf8(reply).unwrap().parse().unwrap();
    assert!(bridge.stop().success());
    wait_gone(second, "the second escapee after the bridge stopped");
}

/// A worker's environment, as `NAME=value` lines.
fn environ(client: &mut acgi_bridge::client::BlockingClient, service: &str) -> Vec<String> {
    let reply = client.call(service, b"environ").unwrap();
    String::from_utf8(reply)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_worker_gets_none_of_the_bridges_secrets_unless_named() {
    // Proves clear_env (the default): a bridge started with DB_PASSWORD=secret gives its
    // workers only the safe PATH, the protocol's ACGI_* variables, the service's `env` and the
    // names in `inherit_env`; `clear_env = false` inherits everything but ACGI_*.
    let wrapper = leaky_wrapper(&["DB_PASSWORD=secret", "OTHER=other", "ACGI_FORGED=1"]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let faulty = crate::common::example("faulty");
    let mut named = ServiceSpec::new(4, "named", faulty.clone()).workers(1, 1);
    named.extra = "inherit_env = [\"DB_PASSWORD\", \"NOT_SET\"]\nenv = { EXTRA = \"x\" }\n".into();
    let mut open = ServiceSpec::new(5, "open", faulty).workers(1, 1);
    open.extra = "clear_env = false\n".into();
    let bridge = bridge()
        .wrapper(&wrapper)
        .service(ServiceSpec::faulty().workers(1, 1))
        .service(named)
        .service(open)
        .start();
    let mut client = bridge.client();
    let env = environ(&mut client, "faulty");
    let names: Vec<&str> = env.iter().filter_map(|l| l.split('=').next()).collect();
    assert_eq!(
        names,
        [
            "ACGI_CONTROL_FD",
            "ACGI_DUMPABLE",
            "ACGI_MAX_PAYLOAD_BYTES",
            "ACGI_SERVICE",
            "ACGI_SERVICE_ID",
            "ACGI_SLOT_FD",
            "ACGI_STATE_DIR",
            "PATH"
        ],
        "{env:?}"
    );
    assert!(env.contains(&"PATH=/usr/local/bin:/usr/bin:/bin".to_string()));
    assert!(env.contains(&"ACGI_SERVICE=faulty".to_string()));
    let env = environ(&mut client, "named");
    assert!(env.contains(&"DB_PASSWORD=secret".to_string()), "{env:?}");
    assert!(env.contains(&"EXTRA=x".to_string()), "{env:?}");
    assert!(!env
        .iter()
        .any(|l| l.starts_with("OTHER=") || l.starts_with("NOT_SET")));
    let env = environ(&mut client, "open");
    assert!(env.contains(&"DB_PASSWORD=secret".to_string()), "{env:?}");
    assert!(env.contains(&"OTHER=other".to_string()), "{env:?}");
    assert!(!env.iter().any(|l| l.starts_with("ACGI_FORGED")), "{env:?}");
}

/// Create a system user (and its group) for the tests, if it does not exist yet; its uid.
fn test_user(name: &str) -> u32 {
    let exists = |name: &str| {
        std::process::Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u32>()
                    .unwrap()
            })
    };
    if let Some(uid) = exists(name) {
        return uid;
    }
    // Two tests may race to create it: either useradd succeeds or the user exists after.
    let _ = std::process::Command::new("useradd")
        .args(["--system", "--no-create-home", "--user-group", "--shell"])
        .args(["/usr/sbin/nologin", name])
        .status();
    exists(name).unwrap_or_else(|| panic!("cannot create the test user {name}"))
}

#[test]
fn workers_of_different_users_cannot_reach_the_bridge_or_each_other() {
    // Proves `user`: service A's worker runs as user a (its uid, gid and initgroups' groups,
    // no capabilities, NoNewPrivs), with its umask, chdir and rlimits; it cannot open the
    // bridge's /proc/PID/fd or /proc/PID/mem, cannot signal service B's worker (user b), and
    // cannot truncate its slot, while its slot and control socket work as for any worker.
    if !is_root() {
        eprintln!("skipped: needs root to create users and change uid");
        return;
    }
    let uid_a = test_user("acgi-test-a");
    let uid_b = test_user("acgi-test-b");
    let faulty = crate::common::example("faulty");
    let mut a = ServiceSpec::new(4, "a", faulty.clone()).workers(1, 1);
    a.extra = "user = \"acgi-test-a\"\numask = \"0027\"\nchdir = \"/tmp\"\n\
               rlimit_nofile = 256\nrlimit_as = 4294967296\nrlimit_nproc = 4096\n"
        .into();
    let mut b = ServiceSpec::new(5, "b", faulty).workers(1, 1);
    b.extra = format!("user = \"{uid_b}\"\n");
    let bridge = bridge().service(a).service(b).start();
    let mut client = bridge.client();
    let report = report(&mut client, "a");
    assert_eq!(
        field(&report, "Uid"),
        format!("{uid_a} {uid_a} {uid_a} {uid_a}")
    );
    let gid_a = field(&report, "Gid").split(' ').next().unwrap().to_string();
    assert_ne!(gid_a, "0", "{report}");
    assert_eq!(
        field(&report, "Groups"),
        gid_a,
        "initgroups' list: {report}"
    );
    assert_eq!(field(&report, "CapEff"), "0000000000000000", "{report}");
    assert_eq!(field(&report, "NoNewPrivs"), "1", "{report}");
    assert_eq!(field(&report, "umask"), "0027", "{report}");
    assert_eq!(field(&report, "cwd"), "/tmp", "{report}");
    assert_eq!(field(&report, "nofile"), "256/256", "{report}");
    assert_eq!(field(&report, "as"), "4294967296/4294967296", "{report}");
    assert_eq!(field(&report, "nproc"), "4096/4096", "{report}");
    let report_b = self::report(&mut client, "b");
    assert!(report_b.contains(&format!("Uid: {uid_b} ")), "{report_b}");

    let mut probe =
        |command: String| String::from_utf8(client.call("a", command.as_bytes()).unwrap()).unwrap();
    let bridge_pid = bridge.pid();
    for path in ["fd", "mem", "environ"] {
        let reply = probe(format!("open /proc/{bridge_pid}/{path}"));
        assert!(reply.starts_with("refused: errno 13"), "{path}: {reply}");
    }
    let pid_b = String::from_utf8(bridge.client().call("b", b"pid").unwrap()).unwrap();
    let reply = probe(format!("signal {pid_b}"));
    assert!(reply.starts_with("kill refused: errno 1 "), "{reply}");
    let reply = probe(format!("signal {bridge_pid}"));
    assert!(reply.starts_with("kill refused: errno 1 "), "{reply}");
    let reply = probe("truncate-slot".into());
    assert!(reply.starts_with("ftruncate refused: errno 1 "), "{reply}");
    // Non-dumpable after exec (the SDK's apply_dumpable): its /proc files belong to root.
    let pid_a = probe("pid".into());
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(format!("/proc/{pid_a}/environ")).unwrap(),
    );
    assert_eq!(owner, 0, "a non-dumpable worker's /proc files are root's");
    // In-slot and copy-path requests still work for a worker of another uid.
    assert_eq!(probe("echo hi".into()), "hi");
    let big = format!("big {}", 200_000);
    assert_eq!(client.call("a", big.as_bytes()).unwrap().len(), 200_000);
}

#[test]
fn a_service_without_user_is_named_when_the_bridge_runs_as_root() {
    // Proves the root warning: `check` names the service that would run as root and serve
    // logs it; with `require_user = true` check fails naming service[0].user and serve refuses.
    if !is_root() {
        eprintln!("skipped: the warning is about a bridge running as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let check = |top: &str| {
        let builder = bridge().top(top).service(ServiceSpec::faulty());
        let path = dir.path().join("check.toml");
        std::fs::write(&path, builder.config_text(dir.path())).unwrap();
        let out = std::process::Command::new(crate::common::bridge_exe())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check("");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: service[0].user: service faulty has no `user`"),
        "{stderr}"
    );
    let (code, stderr) = check("require_user = true");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("service[0].user: require_user is set"),
        "{stderr}"
    );
    let bridge = bridge()
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    assert!(
        bridge.log().contains("its workers run as root"),
        "{}",
        bridge.log()
    );
    let refused = crate::common::bridge()
        .top("require_user = true")
        .service(ServiceSpec::faulty())
        .try_start();
    assert!(refused.is_err_and(|why| why.contains("require_user")));
}

/// Run `acgi-bridge check` on a config with this one service: (exit code, stderr).
fn check_service(dir: &std::path::Path, service: ServiceSpec) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, bridge().service(service).config_text(dir)).unwrap();
    let out = std::process::Command::new(crate::common::bridge_exe())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_executable_checked_at_load_is_the_one_that_runs() {
    // Proves exec trust: the executable is opened once at load and run with execveat on that
    // descriptor, so a file renamed over its path later is not what a new worker runs; a bare
    // name is resolved on the worker's PATH and logged.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker");
    std::fs::copy(crate::common::example("faulty"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bridge = bridge()
        .service(ServiceSpec::new(3, "faulty", path.clone()).workers(1, 1))
        .start();
    let mut client = bridge.client();
    let first: i32 = String::from_utf8(client.call("faulty", b"pid").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    // Swap in another program (echo answers `pid` with `pid`), then make the pool respawn.
    let swapped = dir.path().join("swapped");
    std::fs::copy(crate::common::example("echo"), &swapped).unwrap();
    std::fs::rename(&swapped, &path).unwrap();
    assert!(client.call("faulty", b"exit").is_err());
    let reply = String::from_utf8(client.call("faulty", b"pid").unwrap()).unwrap();
    let second: i32 = reply
        .parse()
        .unwrap_or_else(|_| panic!("the swapped-in file ran: {reply:?}"));
    assert_ne!(first, second, "a new worker");
    let log = bridge.log();
    assert!(
        log.contains(&format!("exec={}", path.display())),
        "the resolved path is logged: {log}"
    );

    // A bare name, found on the service's own PATH.
    let examples = crate::common::example("faulty");
    let mut bare = ServiceSpec::new(3, "faulty", "faulty".into()).workers(1, 1);
    bare.extra = format!(
        "env = {{ PATH = {:?} }}\n",
        examples.parent().unwrap().display().to_string()
    );
    let bridge = crate::common::bridge().service(bare).start();
    assert!(bridge.client().call("faulty", b"pid").is_ok());
    assert!(bridge
        .log()
        .contains(&format!("exec={}", examples.display())));
}

#[test]
fn an_executable_others_can_change_is_refused_at_load() {
    // Proves sshd-style StrictModes on `exec`: a file writable by group or others, or owned by
    // a uid that is neither root nor the service's user, is a config error naming the path,
    // from `check` and from `serve`; so is a missing name on the worker's PATH.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker");
    std::fs::copy(crate::common::example("faulty"), &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o775)).unwrap();
    let service = || ServiceSpec::new(3, "faulty", path.clone()).workers(1, 1);
    let (code, stderr) = check_service(dir.path(), service());
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("service[0].exec")
            && stderr.contains(&path.display().to_string())
            && stderr.contains("writable by its group or others (mode 0775)"),
        "{stderr}"
    );
    let refused = bridge().service(service()).try_start();
    assert!(refused.is_err_and(|why| why.contains("writable by its group or others")));
    if is_root() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&path, Some(65533), Some(65533)).unwrap();
        let (code, stderr) = check_service(dir.path(), service());
        assert_eq!(code, Some(78), "{stderr}");
        assert!(stderr.contains("is owned by uid 65533"), "{stderr}");
        // Owned by the service's own user, it is trusted.
        let mut owned = service();
        owned.extra = "user = \"65533\"\ngroup = \"65533\"\n".into();
        let (code, stderr) = check_service(dir.path(), owned);
        assert_eq!(code, Some(0), "{stderr}");
    }
    let (code, stderr) = check_service(
        dir.path(),
        ServiceSpec::new(3, "faulty", "no-such-worker-anywhere".into()),
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("not found on the workers' PATH (/usr/local/bin:/usr/bin:/bin)"),
        "{stderr}"
    );
}

#[test]
fn scripts_run_through_their_interpreter_from_the_held_descriptor() {
    // Proves execveat works for `#!` scripts (the interpreter opens the held descriptor as
    // /dev/fd/5): a `#!/bin/sh` script that execs faulty, and the Python worker written from
    // the spec (`#!/usr/bin/env python3`), both serve.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            crate::common::example("faulty").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/py_echo_worker.py");
    let bridge = bridge()
        .service(ServiceSpec::new(3, "faulty", script).workers(1, 1))
        .service(ServiceSpec::new(6, "py", python).workers(1, 1))
        .start();
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"echo from sh").unwrap(), b"from sh");
    assert_eq!(client.call("py", b"from python").unwrap(), b"from python");
    assert!(bridge.log().contains("script=true"), "{}", bridge.log());
}

#[test]
fn a_user_the_bridge_cannot_become_is_a_config_error() {
    // Proves `user` is checked at load: a bridge running as uid 65534, without CAP_SETUID,
    // cannot run workers as another user, and `check` says so instead of a crash loop later.
    if !is_root() {
        eprintln!("skipped: needs root to run check as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    test_user("acgi-test-a");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut service = ServiceSpec::faulty();
    service.extra = "user = \"acgi-test-a\"\n".into();
    let path = dir.path().join("check.toml");
    std::fs::write(&path, bridge().service(service).config_text(dir.path())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(crate::common::bridge_exe())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("service[0].user: running workers as acgi-test-a")
            && stderr.contains("needs the bridge to run as root or with CAP_SETUID"),
        "{stderr}"
    );
}

#[test]
fn workers_of_another_user_never_outlive_a_killed_bridge() {
    // Proves that the parent-death signal survives `user`: the kernel clears it when a process
    // changes its effective ids, so the spawner sets it after setresuid. The workers hang in a
    // request (so they do not see their control socket close) when the bridge is killed.
    if !is_root() {
        eprintln!("skipped: needs root to create users and change uid");
        return;
    }
    test_user("acgi-test-a");
    let mut a = ServiceSpec::new(4, "a", crate::common::example("faulty")).workers(2, 2);
    a.extra = "user = \"acgi-test-a\"\n".into();
    let mut bridge = bridge().service(a).start();
    let status = bridge.wait_status("2 workers", |s| s.services[0].workers_idle == 2);
    let pids = status.services[0].pids.clone();
    assert_eq!(pids.len(), 2);
    let mut client = bridge.client();
    for _ in 0..2 {
        client.send(4, b"hang").unwrap();
    }
    bridge.wait_status("2 workers busy", |s| s.services[0].workers_busy == 2);
    bridge.signal(libc::SIGKILL);
    bridge
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("the bridge died");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for pid in pids {
        // Gone, or a zombie waiting for init to reap it: either way no longer running.
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if matches!(state, None | Some('Z' | 'X')) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker {pid} of another user outlived the bridge"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
