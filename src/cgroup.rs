//! cgroup v2 per service and per worker: where the bridge has a delegated subtree (systemd
//! `Delegate=yes`, or `cgroup = PATH`), every worker runs in a cgroup of its own under its
//! service's, so that the service's limits (`cgroup_memory_max_bytes`, `cgroup_pids_max`,
//! `cgroup_cpu_weight`) bound all its workers and whatever they start, and a stopped worker's
//! whole tree dies with it (`cgroup.kill`), however it forked, setsid'd or daemonized.
//!
//! ```text
//! ROOT/                   the delegated subtree (the bridge's cgroup at start)
//!   bridge/               the bridge itself (cgroup v2: no processes in a cgroup with children)
//!   service-NAME/         memory.max, pids.max, cpu.weight: the service's limits
//!     worker-BRIDGEPID-N/ one worker and its descendants; killed and removed when it is reaped
//! ```
//!
//! Why one cgroup per worker and not only per service: a service's pool stops and replaces
//! workers one at a time (idle, recycling, a crash); killing the service's cgroup would kill the
//! siblings too. The limits go on the service's cgroup (they are hierarchical: they bound the
//! sum of its workers), the kill on the worker's.
//!
//! Who does what: [`setup`] (once, at startup) moves the bridge into `bridge/` and enables the
//! controllers the services need in ROOT's `cgroup.subtree_control`; the spawner thread calls
//! [`prepare_worker`] before each clone (it makes the cgroups, writes the limits and opens the
//! leaf's `cgroup.procs`, whose descriptor the child writes `0` to as its first step, before it
//! can run or start anything: see `engine::spawn::child`); the core's reap of a worker
//! (`confine::forget_worker`) calls [`worker_reaped`], which kills what is left in its cgroup
//! and removes it (the orphan reaper's [`sweep`] retries a removal the kernel refused while the
//! killed processes were still exiting); [`remove_all`] at exit.
//!
//! Not `clone3(CLONE_INTO_CGROUP)`: the spawner's clone shares the bridge's memory and runs the
//! child on a stack of its own, which clone3 cannot do without an assembly trampoline. The
//! child's own write is as tight: it happens before the child has made any other system call
//! that could leave a process behind, so no descendant of the worker is ever outside its cgroup.
//!
//! Where there is no subtree, or a controller is missing, [`probe`] says what is skipped and
//! why, in one line each (`check` prints them, `serve` logs them); workers then run as before.
//! This module never touches a cgroup outside ROOT, and never a worker's cgroup but through
//! the registry below.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::config::{Config, ServiceConfig};

/// The leaf the bridge moves itself into.
pub const BRIDGE_LEAF: &str = "bridge";
/// The prefix of a service's cgroup name (then the service's name).
pub const SERVICE_PREFIX: &str = "service-";
/// The prefix of a worker's cgroup name (then the bridge's pid and a counter).
pub const WORKER_PREFIX: &str = "worker-";

/// The controller each limit key needs, its file, and the value that means "no limit".
pub const LIMITS: [(&str, &str, &str, &str); 3] = [
    ("cgroup_memory_max_bytes", "memory", "memory.max", "max"),
    ("cgroup_pids_max", "pids", "pids.max", "max"),
    ("cgroup_cpu_weight", "cpu", "cpu.weight", "100"),
];

/// A service's limit values, in [`LIMITS`]'s order.
fn limit_values(service: &ServiceConfig) -> [Option<u64>; 3] {
    [
        service.cgroup_memory_max_bytes,
        service.cgroup_pids_max,
        service.cgroup_cpu_weight,
    ]
}

/// The highest `cgroup_cpu_weight` (the kernel's range is 1-10000).
pub const CPU_WEIGHT_MAX: u64 = 10_000;

/// A problem with the top-level `cgroup` setting, if any.
pub fn setting_problem(setting: Option<&str>) -> Option<String> {
    match setting {
        None | Some("auto" | "off") => None,
        Some(path) if Path::new(path).is_absolute() => None,
        Some(other) => Some(format!(
            "{other:?} is not \"auto\", \"off\" or the absolute path of a cgroup2 directory"
        )),
    }
}

/// Problems with a service's cgroup limit keys: (key, reason).
pub fn service_problems(service: &ServiceConfig) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if service.cgroup_memory_max_bytes == Some(0) {
        problems.push((
            "cgroup_memory_max_bytes",
            "must be at least 1 (unset: no limit)".into(),
        ));
    }
    if service.cgroup_pids_max == Some(0) {
        problems.push((
            "cgroup_pids_max",
            "must be at least 1 (unset: no limit)".into(),
        ));
    }
    if service
        .cgroup_cpu_weight
        .is_some_and(|w| w == 0 || w > CPU_WEIGHT_MAX)
    {
        problems.push((
            "cgroup_cpu_weight",
            format!("must be between 1 and {CPU_WEIGHT_MAX} (the kernel's default is 100)"),
        ));
    }
    problems
}

/// What the `cgroup` setting resolves to on this machine (a read-only look: `check` and load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `cgroup = "off"`.
    Off,
    /// No usable subtree: why.
    Skipped(String),
    /// The subtree, and the controllers it offers (its `cgroup.controllers`).
    Ready {
        root: PathBuf,
        controllers: Vec<String>,
    },
}

/// The cgroup2 mount: (the hierarchy path it shows, its mount point), from mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some((fields.get(3)?.to_string(), PathBuf::from(fields.get(4)?)))
    })
}

/// The directory of the cgroup a `/proc/PID/cgroup` text names, under the cgroup2 mount.
fn own_cgroup_dir(proc_cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup v2 line (0::)")?;
    let (mount_root, mount_point) =
        cgroup2_mount(mountinfo).ok_or("no cgroup2 file system is mounted")?;
    let relative = Path::new(path)
        .strip_prefix(&mount_root)
        .map_err(|_| format!("the bridge's cgroup {path} is not under the cgroup2 mount"))?;
    Ok(mount_point.join(relative))
}

/// Where `setting` (`"auto"`, `"off"` or a path) puts the bridge's subtree, and what it offers.
pub fn probe(setting: &str) -> Probe {
    let root = match setting {
        "off" => return Probe::Off,
        "auto" => {
            let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            match own_cgroup_dir(&cgroup, &mounts) {
                // A bridge started inside a subtree it set up before (a binary upgrade) is in
                // its `bridge` leaf: the subtree is the parent.
                Ok(dir) if dir.ends_with(BRIDGE_LEAF) => dir.parent().map(Path::to_path_buf),
                Ok(dir) => Some(dir),
                Err(why) => return Probe::Skipped(format!("auto: {why}")),
            }
            .unwrap_or_default()
        }
        path => PathBuf::from(path),
    };
    if !root.join("cgroup.procs").exists() {
        return Probe::Skipped(format!(
            "{} is not a cgroup v2 directory (create it, or set cgroup = \"off\")",
            root.display()
        ));
    }
    // The root of a hierarchy has no cgroup.type: a bridge found there has no delegated
    // subtree (it would make cgroups beside the whole machine's).
    if !root.join("cgroup.type").exists() {
        return Probe::Skipped(format!(
            "{} is the root cgroup, not a delegated subtree (run the bridge under systemd with \
             Delegate=yes, or set cgroup = PATH to a cgroup made for it)",
            root.display()
        ));
    }
    if rustix::fs::access(&root, rustix::fs::Access::WRITE_OK).is_err() {
        return Probe::Skipped(format!(
            "{} is not writable by the bridge (systemd: Delegate=yes)",
            root.display()
        ));
    }
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    Probe::Ready {
        root,
        controllers: controllers.split_whitespace().map(String::from).collect(),
    }
}

/// The lines saying what is skipped and why (empty when everything asked for applies): the
/// subtree, or each service's limit whose controller the subtree does not offer. `asked`:
/// the config names a subtree or sets a limit (a default `auto` that finds none says nothing).
pub fn notes(config: &Config) -> Vec<String> {
    let limited = config
        .services
        .iter()
        .any(|s| limit_values(s).iter().any(Option::is_some));
    let setting = config.cgroup.as_deref().unwrap_or("auto");
    let asked = limited || setting != "auto";
    match probe(setting) {
        Probe::Off if limited => {
            vec!["cgroup is \"off\": the services' cgroup_* limits are not applied".to_string()]
        }
        Probe::Off => Vec::new(),
        Probe::Skipped(why) if asked => vec![format!(
            "cgroup: {why}: workers are not placed in cgroups{}",
            if limited {
                " and the services' cgroup_* limits are not applied"
            } else {
                ""
            }
        )],
        Probe::Skipped(_) => Vec::new(),
        Probe::Ready { root, controllers } => missing_controllers(config, &root, &controllers),
    }
}

/// One line per (service, limit) whose controller `controllers` lacks.
fn missing_controllers(config: &Config, root: &Path, controllers: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    for service in &config.services {
        for ((key, controller, _, _), value) in LIMITS.iter().zip(limit_values(service)) {
            if value.is_some() && !controllers.iter().any(|c| c == controller) {
                lines.push(format!(
                    "cgroup: the {controller} controller is not available in {} (its \
                     cgroup.controllers lists: {}): service {}'s {key} is not applied",
                    root.display(),
                    if controllers.is_empty() {
                        "none".to_string()
                    } else {
                        controllers.join(" ")
                    },
                    service.name
                ));
            }
        }
    }
    lines
}

/// What the bridge set up, and the workers it placed.
struct State {
    /// The subtree, once [`setup`] succeeded.
    root: Option<PathBuf>,
    /// Each live worker's cgroup, by pid.
    workers: BTreeMap<i32, PathBuf>,
    /// Reaped workers' cgroups, by pid, for the orphan reaper's thread to kill and remove
    /// (not the core's: cgroupfs writes and rmdir may wait on the kernel's cgroup lock).
    reaped: Vec<(i32, PathBuf)>,
    /// Cgroups killed whose removal the kernel refused (their processes were still exiting).
    pending: Vec<PathBuf>,
}

static STATE: Mutex<State> = Mutex::new(State {
    root: None,
    workers: BTreeMap::new(),
    reaped: Vec::new(),
    pending: Vec::new(),
});

/// Names each worker's cgroup (with the bridge's pid: a new bridge after an upgrade shares the
/// subtree with the old one's draining workers).
static WORKER_COUNTER: AtomicU64 = AtomicU64::new(0);

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The subtree in use (None: workers are not placed in cgroups).
pub fn root() -> Option<PathBuf> {
    state().root.clone()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {text:?} to {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// At startup: move the bridge into `ROOT/bridge`, enable the controllers the services' limits
/// need and ROOT offers, and log one line saying what is in place and one per thing skipped.
/// (The lines of [`notes`] are logged with the config's other warnings.)
pub fn setup(config: &Config) {
    let setting = config.cgroup.as_deref().unwrap_or("auto");
    let (root, controllers) = match probe(setting) {
        Probe::Ready { root, controllers } => (root, controllers),
        Probe::Off => {
            tracing::info!("cgroup = \"off\": workers are not placed in cgroups");
            return;
        }
        Probe::Skipped(why) => {
            tracing::info!(
                cgroup = setting,
                "cgroup: {why}: workers are not placed in cgroups"
            );
            return;
        }
    };
    if let Err(why) = enter_leaf(&root) {
        tracing::warn!("cgroup: {why}: workers are not placed in cgroups");
        return;
    }
    let enabled = enable_controllers(config, &root, &controllers);
    tracing::info!(
        root = %root.display(),
        controllers = %enabled.join(" "),
        "cgroup: each worker runs in a cgroup of its own under its service's"
    );
    state().root = Some(root);
}

fn enter_leaf(root: &Path) -> Result<(), String> {
    let leaf = root.join(BRIDGE_LEAF);
    mkdir(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
}

/// Enable in ROOT's `cgroup.subtree_control` the controllers some service's limits need;
/// returns those that are on.
fn enable_controllers(config: &Config, root: &Path, controllers: &[String]) -> Vec<String> {
    enable_for(&config.services, root, controllers)
}

/// Enable in ROOT's `cgroup.subtree_control` the controllers that `services`' limits need and
/// `controllers` (ROOT's `cgroup.controllers`) offers; returns those that are on.
fn enable_for(services: &[ServiceConfig], root: &Path, controllers: &[String]) -> Vec<String> {
    let mut enabled = Vec::new();
    for (_, controller, _, _) in LIMITS {
        let needed = services.iter().any(|s| {
            LIMITS
                .iter()
                .zip(limit_values(s))
                .any(|(l, v)| l.1 == controller && v.is_some())
        });
        if !needed || !controllers.iter().any(|c| c == controller) {
            continue;
        }
        match write(
            &root.join("cgroup.subtree_control"),
            &format!("+{controller}"),
        ) {
            Ok(()) => enabled.push(controller.to_string()),
            Err(why) => tracing::warn!(
                "cgroup: cannot enable the {controller} controller ({why}; another process in \
                 the subtree's top cgroup?): its limits are not applied"
            ),
        }
    }
    enabled
}

/// Write a service's limits into its cgroup `dir`: each whose file exists (its controller is
/// enabled), the "no limit" value for one not set (a reload may have removed it). Returns the
/// files written.
pub fn apply_limits(dir: &Path, service: &ServiceConfig) -> Result<Vec<&'static str>, String> {
    let mut written = Vec::new();
    for ((_, _, file, unlimited), value) in LIMITS.iter().zip(limit_values(service)) {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let text = value.map_or_else(|| unlimited.to_string(), |v| v.to_string());
        write(&path, &text)?;
        written.push(*file);
    }
    Ok(written)
}

/// A worker's cgroup, made before the clone; the child writes `0` to `procs` to join it.
pub struct WorkerCgroup {
    pub path: PathBuf,
    pub procs: OwnedFd,
}

/// Make (or find) the service's cgroup, write its limits, and make a new worker's cgroup in it;
/// None when workers are not placed in cgroups. (Called by the spawner thread.)
pub fn prepare_worker(service: &ServiceConfig) -> Result<Option<WorkerCgroup>, String> {
    let Some(root) = root() else {
        return Ok(None);
    };
    let service_dir = root.join(format!("{SERVICE_PREFIX}{}", service.name));
    let name = format!(
        "{WORKER_PREFIX}{}-{}",
        std::process::id(),
        WORKER_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let leaf = service_dir.join(name);
    // (The orphan reaper removes an empty service cgroup: make it again if it just did.)
    let mut made = Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    for _ in 0..3 {
        mkdir(&service_dir).map_err(|e| format!("cannot create {}: {e}", service_dir.display()))?;
        made = std::fs::create_dir(&leaf);
        if !matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            break;
        }
    }
    made.map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
    // A service a reload added may need a controller no service needed at startup.
    let missing = LIMITS
        .iter()
        .zip(limit_values(service))
        .any(|((_, _, file, _), value)| value.is_some() && !service_dir.join(file).exists());
    if missing {
        let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let offered: Vec<String> = offered.split_whitespace().map(String::from).collect();
        enable_for(std::slice::from_ref(service), &root, &offered);
    }
    apply_limits(&service_dir, service)?;
    let procs = rustix::fs::open(
        leaf.join("cgroup.procs"),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("{}/cgroup.procs: {e}", leaf.display()))?;
    Ok(Some(WorkerCgroup { path: leaf, procs }))
}

/// The worker `pid` was started in `cgroup`.
pub fn worker_started(pid: i32, cgroup: WorkerCgroup) {
    state().workers.insert(pid, cgroup.path);
}

/// The spawn failed: remove its cgroup (its child, if any, is reaped).
pub fn worker_failed(cgroup: WorkerCgroup) {
    kill_and_remove(&cgroup.path);
}

/// The core reaped the worker `pid`: whatever is left in its cgroup is killed and the cgroup
/// removed, on the orphan reaper's thread ([`kill_reaped`], woken now), so that the core
/// makes no cgroupfs call.
pub fn worker_reaped(pid: i32) {
    let mut state = state();
    let Some(path) = state.workers.remove(&pid) else {
        return;
    };
    state.reaped.push((pid, path));
    drop(state);
    crate::confine::wake_reaper();
}

/// Kill what is left in each reaped worker's cgroup and remove it (the orphan reaper's
/// thread, before its sweep).
pub fn kill_reaped() {
    let reaped = std::mem::take(&mut state().reaped);
    for (pid, path) in reaped {
        let left = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let left = left.split_whitespace().count();
        if left > 0 {
            tracing::warn!(
                pid,
                left,
                cgroup = %path.display(),
                "cgroup.kill: killed the processes left in a reaped worker's cgroup"
            );
        }
        kill_and_remove(&path);
    }
}

/// `cgroup.kill`, then rmdir, then (when it is empty) the service's cgroup; a removal the
/// kernel refuses (processes still exiting) is left to [`sweep`].
fn kill_and_remove(path: &Path) {
    if let Err(why) = write(&path.join("cgroup.kill"), "1") {
        // (Before Linux 5.14 there is no cgroup.kill: SIGKILL each process listed.)
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let pids = procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok());
        for pid in pids.filter_map(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        tracing::debug!("{why}: killed its processes one by one");
    }
    if !remove(path) {
        state().pending.push(path.to_path_buf());
    }
}

/// Remove a worker's cgroup and then its service's if that is empty; false if the kernel
/// refused the first (not empty yet).
fn remove(path: &Path) -> bool {
    match std::fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return false,
    }
    if let Some(service_dir) = path.parent() {
        // (Refused while another worker's cgroup is in it: that is fine.)
        let _ = std::fs::remove_dir(service_dir);
    }
    true
}

/// Retry the removals the kernel refused (called by the orphan reaper at each sweep).
pub fn sweep() {
    let pending = std::mem::take(&mut state().pending);
    let left: Vec<PathBuf> = pending.into_iter().filter(|p| !remove(p)).collect();
    state().pending.extend(left);
}

/// Should the orphan reaper leave this escapee (a child of the bridge that is not a worker) to
/// its worker's cgroup.kill? Yes when it is in the cgroup of a worker that is dead and not yet
/// reaped, or reaped with its cgroup not yet killed or not yet empty: [`kill_reaped`] kills the
/// whole cgroup at once (however many processes it holds).
pub fn left_for_its_worker(orphan: i32) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{orphan}/cgroup")).unwrap_or_default();
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let name = Path::new(path).file_name();
    let state = state();
    // Reaped, its cgroup not yet killed; or killed, its processes still exiting (the kernel
    // refuses the removal until they have): a later sweep reaps them dead, without a warning.
    let killing = state.reaped.iter().map(|(_, leaf)| leaf);
    if killing
        .chain(&state.pending)
        .any(|leaf| leaf.file_name() == name)
    {
        return true;
    }
    let Some((&worker, _)) = state
        .workers
        .iter()
        .find(|(_, leaf)| leaf.file_name() == name)
    else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
}

/// At exit: kill and remove every worker's cgroup left, waiting (bounded) for their processes
/// to exit, then the services' cgroups.
pub fn remove_all() {
    kill_reaped();
    let workers = std::mem::take(&mut state().workers);
    for path in workers.values() {
        kill_and_remove(path);
    }
    let deadline = std::time::Instant::now() + REMOVE_AT_EXIT_WAIT;
    while !state().pending.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        sweep();
    }
    for path in &state().pending {
        tracing::warn!(cgroup = %path.display(), "cgroup: still busy at exit, left behind");
    }
}

/// How long [`remove_all`] waits for killed processes to leave their cgroups.
pub const REMOVE_AT_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subtree_is_found_from_proc_self_cgroup_and_mountinfo() {
        // Proves auto-detection on the two layouts: a hybrid one (cgroup2 at
        // /sys/fs/cgroup/unified) and a unified one inside a cgroup namespace-less mount.
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            own_cgroup_dir("4:memory:/x\n0::/system.slice/a.service\n", hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/unified/system.slice/a.service")
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            own_cgroup_dir("0::/\n", unified).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
        assert!(own_cgroup_dir("1:cpu:/\n", unified).is_err());
        assert!(own_cgroup_dir("0::/x\n", "").is_err());
    }

    #[test]
    fn limits_are_written_where_their_controller_is_enabled_and_reset_when_unset() {
        // Proves the limit files a service's cgroup gets: each one whose file exists (its
        // controller is on), with the value, or "no limit" when the key is unset; none else.
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("memory.max"), "max").unwrap();
        std::fs::write(dir.path().join("cpu.weight"), "100").unwrap();
        let path = dir.path().join("bridge.toml");
        std::fs::write(
            &path,
            "[listen]\nunix = \"s\"\n[[service]]\nid = 1\nname = \"t\"\nexec = \"/bin/true\"\n\
             cgroup_memory_max_bytes = 67108864\ncgroup_pids_max = 64\n",
        )
        .unwrap();
        let config = Config::load(&path).expect("a valid config");
        let written = apply_limits(dir.path(), &config.services[0]).unwrap();
        assert_eq!(written, ["memory.max", "cpu.weight"]);
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("cpu.weight"), "100");
        assert!(!dir.path().join("pids.max").exists());
        let lines = missing_controllers(&config, dir.path(), &["memory".into()]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("the pids controller is not available"),
            "{lines:?}"
        );
        assert!(
            lines[0].contains("service t's cgroup_pids_max"),
            "{lines:?}"
        );
    }
}
