//! `chroot` per service (docs/security.md, "chroot"): a worker started in a root directory of
//! its own sees only that tree; a root the worker could change, or an `exec` outside it, is
//! refused at load with the key and the reason.

use std::path::{Path, PathBuf};

use crate::common::{bridge, example, ServiceSpec};

/// A root directory holding the `faulty` worker at /bin/faulty and the libraries `ldd` lists
/// for it (at the same paths), plus a /marker file.
fn worker_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let faulty = example("faulty");
    let copy = |from: &Path, to: &Path| {
        let target = root.path().join(to.strip_prefix("/").unwrap_or(to));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from, &target).unwrap();
    };
    copy(&faulty, Path::new("/bin/faulty"));
    let ldd = std::process::Command::new("ldd")
        .arg(&faulty)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            copy(&path, &path);
        }
    }
    std::fs::write(root.path().join("marker"), b"inside").unwrap();
    root
}

fn open(client: &mut acgi_bridge::client::BlockingClient, path: &str) -> String {
    let reply = client
        .call("faulty", format!("open {path}").as_bytes())
        .unwrap();
    String::from_utf8(reply).unwrap()
}

#[test]
fn a_chrooted_worker_sees_only_its_root() {
    // Proves chroot: the worker runs /bin/faulty inside the root (its libraries found there
    // too), opens /marker of the root, and cannot open the host's files, not even the root's
    // own files by their host path.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping a_chrooted_worker_sees_only_its_root: chroot needs root");
        return;
    }
    let root = worker_root();
    let mut service = ServiceSpec::new(3, "faulty", PathBuf::from("/bin/faulty")).workers(1, 1);
    let root_text = root.path().display().to_string();
    service.extra.push_str(&format!("chroot = {root_text:?}\n"));
    let bridge = bridge().service(service).start();
    let mut client = bridge.client();
    assert_eq!(client.call("faulty", b"echo hello").unwrap(), b"hello");
    assert_eq!(open(&mut client, "/marker"), "opened");
    let host_marker = format!("{root_text}/marker");
    assert!(open(&mut client, &host_marker).starts_with("refused: errno 2"));
    assert!(open(&mut client, "/etc/passwd").starts_with("refused: errno 2"));
    let worker: i32 = String::from_utf8(client.call("faulty", b"pid").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    // Seen from outside: its root and working directory are the root directory.
    let canonical = std::fs::canonicalize(root.path()).unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{worker}/root")).unwrap(),
        canonical
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{worker}/cwd")).unwrap(),
        canonical
    );
}

#[test]
fn check_refuses_an_exec_outside_the_chroot_and_a_root_others_may_write() {
    // Proves the load-time checks `check` reports: an exec that resolves outside the root
    // (named with the key), and a root directory writable by others.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipping the chroot check test: chroot needs root");
        return;
    }
    let root = worker_root();
    let dir = tempfile::tempdir().unwrap();
    let check = |service: ServiceSpec| {
        let path = dir.path().join("check.toml");
        std::fs::write(&path, bridge().service(service).config_text(dir.path())).unwrap();
        let out = std::process::Command::new(crate::common::bridge_exe())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let with_root = |exec: PathBuf| {
        let mut service = ServiceSpec::new(3, "faulty", exec);
        let text = root.path().display().to_string();
        service.extra.push_str(&format!("chroot = {text:?}\n"));
        service
    };
    let (ok, text) = check(with_root(example("faulty")));
    assert!(!ok);
    assert!(
        text.contains("service[0].exec") && text.contains("outside the chroot"),
        "{text}"
    );
    let (ok, text) = check(with_root(PathBuf::from("/bin/faulty")));
    assert!(ok, "{text}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, text) = check(with_root(PathBuf::from("/bin/faulty")));
    assert!(!ok);
    assert!(
        text.contains("service[0].chroot") && text.contains("not writable by group or others"),
        "{text}"
    );
}
