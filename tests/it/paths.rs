//! Where the bridge puts its sockets by default: a runtime directory of its own (never a
//! directory other users may write, such as /tmp), created with the right mode, refused when
//! someone else made it, and the one `acgi-bridge call` finds without being told.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::common::{bridge, bridge_exe, ServiceSpec};
use crate::unkillable::refused_start;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn the_runtime_dir_is_created_for_the_socket_and_the_state_dir_private() {
    // Proves `{runtime_dir}` in listen.unix: the directory is made (0755 as root, so callers of
    // other users reach the socket its own mode lets them; 0700 otherwise), the socket is bound
    // in it and serves, and state_dir is created 0700 (before: 0755).
    let bridge = bridge()
        .runtime_dir("run/acgi-bridge")
        .service(ServiceSpec::echo())
        .start();
    let run = bridge.dir.join("run/acgi-bridge");
    assert_eq!(
        bridge.unix,
        run.join("acgi-bridge.sock").display().to_string()
    );
    let expected = if rustix::process::geteuid().is_root() {
        0o755
    } else {
        0o700
    };
    assert_eq!(mode(&run), expected);
    assert_eq!(mode(&bridge.dir.join("state")), 0o700);
    assert_eq!(bridge.client().call("echo", b"here").unwrap(), b"here");
}

#[test]
fn a_runtime_dir_others_may_write_or_another_user_made_is_refused() {
    // Proves the runtime directory's checks: a squatter who made it first (owned by another
    // uid), or one open to group and others, stops the bridge at startup with the reason, and
    // no socket is bound there.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = refused_start(
        dir.path(),
        bridge().runtime_dir("run").service(ServiceSpec::echo()),
    );
    assert!(
        stderr.contains("writable by its group or others"),
        "{stderr}"
    );
    assert!(!run.join("acgi-bridge.sock").exists());

    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping the other-owner half: it needs root to chown");
        return;
    }
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let stderr = refused_start(
        dir.path(),
        bridge().runtime_dir("run").service(ServiceSpec::echo()),
    );
    assert!(
        stderr.contains("belongs to uid 65534") && stderr.contains("another user may have made it"),
        "{stderr}"
    );
    assert!(!run.join("acgi-bridge.sock").exists());
}

#[test]
fn call_finds_the_default_socket_in_the_callers_runtime_dir() {
    // Proves the CLI's default address: a user whose XDG_RUNTIME_DIR holds acgi-bridge/
    // acgi-bridge.sock reaches the bridge with a bare `acgi-bridge call`, no --connect.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping: needs root to call as another user");
        return;
    }
    let bridge = bridge()
        .public_socket()
        .runtime_dir("xdg/acgi-bridge")
        .service(ServiceSpec::echo())
        .start();
    let xdg = bridge.dir.join("xdg");
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bridge_exe())
        .args(["call", "echo", "found it"])
        .env("XDG_RUNTIME_DIR", &xdg)
        .env_remove("ACGI_BRIDGE_ADDR")
        .output()
        .expect("run setpriv");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"found it");
}

#[test]
fn the_bundled_config_puts_its_socket_in_the_runtime_dir() {
    // Proves the bundled config no longer names /tmp: its socket is the CLI's default one.
    // (Parsed, not loaded: loading also wants the release examples built.)
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/acgi-bridge.toml");
    let config =
        acgi_bridge::config::Config::parse(&std::fs::read_to_string(bundled).unwrap()).unwrap();
    let unix = config
        .listen
        .unix
        .expect("the bundled config has a Unix socket");
    let runtime_dir = acgi_bridge::runtime_dir::default_dir();
    assert_eq!(
        acgi_bridge::runtime_dir::expand(&unix, &runtime_dir),
        Some(acgi_bridge::runtime_dir::default_socket()),
        "{}",
        unix.display()
    );
}
