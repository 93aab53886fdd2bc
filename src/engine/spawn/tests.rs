//! The spawner's tests: both ways of starting a child, and (ignored) the spawn-time measurement.

use super::*;

/// A config of one service running `/bin/true` with `extra` keys, in `dir`.
fn config(dir: &std::path::Path, extra: &str) -> Arc<Config> {
    let path = dir.join("bridge.toml");
    let text = format!(
        "state_dir = {:?}\n[listen]\nunix = \"bridge.sock\"\n[[service]]\nid = 1\nname = \"t\"\n\
         exec = \"/bin/true\"\n{extra}\n",
        dir.display().to_string()
    );
    std::fs::write(&path, text).expect("the config is written");
    Arc::new(Config::load(&path).expect("a valid config"))
}

/// This thread's signal mask.
fn mask() -> u64 {
    let mut mask = 0u64;
    // SAFETY: rt_sigprocmask reading this thread's mask into a valid 8-byte set.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            std::ptr::null::<u64>(),
            &mut mask,
            8usize,
        )
    };
    mask
}

#[test]
fn clone_and_fork_start_a_worker_and_report_a_failed_step_leaving_the_bridge_as_it_was() {
    // Proves both ways of starting a child (clone(CLONE_VM | CLONE_VFORK) on a stack, and
    // fork): a worker that execs is returned; one whose setup fails (chdir) is reported
    // with its step and errno and reaped; and the spawner's signal mask and the process's
    // dumpability are what they were before.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let good = config(dir.path(), "");
    let bad = config(dir.path(), "chdir = \"/nonexistent/acgi\"");
    let stack = ChildStack::new().expect("a stack");
    let parent_pid = std::process::id() as i32;
    // SAFETY: prctl with integer arguments on this process.
    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    let before = mask();
    for stack in [Some(&stack), None] {
        let request = |config: &Arc<Config>| SpawnRequest {
            slot: ServiceSlot::new(0),
            service_index: 0,
            config: Arc::clone(config),
        };
        let spawned = spawn(&request(&good), parent_pid, stack).expect("a worker");
        let mut status = 0;
        // SAFETY: waitpid on a child of this process that nothing else waits for.
        unsafe { libc::waitpid(spawned.pid, &mut status, 0) };
        crate::confine::forget_worker(spawned.pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        let error = spawn(&request(&bad), parent_pid, stack)
            .err()
            .expect("chdir fails");
        assert!(
            error
                .to_string()
                .contains("chdir: No such file or directory"),
            "{error}"
        );
        assert_eq!(error.label(), "filesystem");
        assert_eq!(mask(), before);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, dumpable);
    }
}

/// What a spawn costs the spawner thread when the bridge is large: `fork` copies the
/// parent's page tables, a vfork-style clone does not. Grows this process by
/// `ACGI_SPAWN_RSS_MIB` (default 512) MiB of touched memory, then times
/// `ACGI_SPAWN_COUNT` (default 200) spawns of `/bin/true` through the real [`Spawner`],
/// one at a time (request to result), and prints the mean and percentiles:
/// `cargo test --release --lib spawn_time -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn spawn_time_with_a_large_parent() {
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mib = number("ACGI_SPAWN_RSS_MIB", 512);
    let count = number("ACGI_SPAWN_COUNT", 200);
    let dir = tempfile::tempdir().expect("a temporary directory");
    // E.g. ACGI_SPAWN_EXTRA=$'landlock = true\nseccomp = true' for the sandboxes' cost.
    let extra = std::env::var("ACGI_SPAWN_EXTRA").unwrap_or_default();
    let config = config(dir.path(), &extra);
    // E.g. ACGI_SPAWN_CGROUP=/sys/fs/cgroup/unified/x (made beforehand) for the cost of a
    // cgroup per worker (this test process moves into its `bridge` leaf).
    if let Ok(path) = std::env::var("ACGI_SPAWN_CGROUP") {
        let mut with_cgroup = (*config).clone();
        with_cgroup.cgroup = Some(path);
        crate::cgroup::setup(&with_cgroup);
        assert!(crate::cgroup::root().is_some(), "the cgroup is set up");
    }
    let spawner = Spawner::start().expect("the spawner starts");
    let mut ballast = vec![0u8; mib << 20];
    for page in ballast.chunks_mut(4096) {
        page[0] = 1;
    }
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    let mut times = Vec::with_capacity(count);
    let mut results = Vec::new();
    for _ in 0..count {
        let start = std::time::Instant::now();
        spawner.request(SpawnRequest {
            slot: ServiceSlot::new(0),
            service_index: 0,
            config: Arc::clone(&config),
        });
        loop {
            spawner.take_results(&mut results);
            if !results.is_empty() {
                break;
            }
            let mut fds = [rustix::event::PollFd::new(
                &*spawner.wake,
                rustix::event::PollFlags::IN,
            )];
            let _ = rustix::event::poll(&mut fds, None);
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&*spawner.wake, &mut counter);
        }
        times.push(start.elapsed());
        let spawned = results.pop().expect("one result").result.expect("a worker");
        // SAFETY: waitpid on a child of this process that nothing else waits for.
        unsafe { libc::waitpid(spawned.pid, std::ptr::null_mut(), 0) };
        crate::confine::forget_worker(spawned.pid);
    }
    std::hint::black_box(&ballast);
    times.sort();
    let mean = times.iter().sum::<std::time::Duration>() / count as u32;
    let at = |q: f64| times[((count - 1) as f64 * q) as usize];
    println!(
        "{count} spawns of /bin/true, parent {rss}: mean {mean:?}, p50 {:?}, p90 {:?}, \
         p99 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}
