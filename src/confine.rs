//! Confinement: what the bridge does to itself and knows about its workers' process trees so
//! that a hostile worker cannot reach the bridge, other services or the machine through it
//! (the threat model and the whole list are in docs/security.md).
//!
//! This module owns:
//!
//! - [`harden_bridge`]: the bridge's own process attributes, set once at startup: not dumpable
//!   (no core file, no ptrace or /proc/PID/mem from same-uid processes, /proc/PID/* owned by
//!   root) and a child subreaper, so that a worker's descendants that leave its process group
//!   (setsid, double fork) are re-parented to the bridge instead of to init;
//! - the registry of live worker pids ([`WorkerRegistry`]): the spawner adds a child while it
//!   still holds the registry's lock from before the fork, or (a vfork-style clone, which
//!   returns only once the child has exec'd) marks the spawn under the lock and registers the
//!   child after, the reaper sparing it meanwhile; the core removes it when it reaps it (the
//!   spawner, for a child whose setup failed);
//! - the orphan reaper ([`start_orphan_reaper`]): every [`ORPHAN_SWEEP_INTERVAL`] it kills and
//!   reaps every child of the bridge that is not a registered worker. Such a child can only be
//!   a worker's descendant that outlived its parent: no process a worker starts may outlive the
//!   worker that started it, nor the bridge ([`KillChildrenOnDrop`] at exit). With a cgroup
//!   subtree (`crate::cgroup`) it leaves an escapee of a dead worker to that worker's
//!   `cgroup.kill`, which it carries out itself once a core has reaped the worker (woken at
//!   once: the core makes no cgroupfs call), and retries the removal of killed cgroups;
//! - resolving a service's identity (user, group, supplementary groups) and checking that its
//!   executable is trusted, at config load, before any fork.
//!
//! It never signals a pid that is not its own child (an unreaped child's pid cannot be reused)
//! nor a worker's (those belong to the core that spawned them).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often the orphan reaper looks for escaped descendants of workers: an escapee lives at
/// most about this long after it is re-parented to the bridge.
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Supplementary groups a service's user may have (NGROUPS_MAX on Linux is 65536; more than
/// this is refused at config load).
pub const SUPPLEMENTARY_GROUPS_MAX: usize = 4096;

/// Set the bridge's own process attributes: not dumpable, and a child subreaper.
pub fn harden_bridge() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments on the calling process only.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The pids of the workers the spawners started and the cores have not reaped yet.
pub struct WorkerRegistry {
    pids: BTreeSet<i32>,
    /// The spawns under way whose child is registered only once it has exec'd (a spawner's
    /// clone(CLONE_VM | CLONE_VFORK) returns only then), at most one per spawner thread: each
    /// the child's pid, written by the kernel (CLONE_PARENT_SETTID) before the child runs, 0
    /// until then.
    spawning: Vec<Arc<AtomicI32>>,
}

static REGISTRY: Mutex<WorkerRegistry> = Mutex::new(WorkerRegistry {
    pids: BTreeSet::new(),
    spawning: Vec::new(),
});

/// Lock the registry. A spawner holds it from before its fork until it has registered the new
/// worker, so the reaper never sees a worker it does not know.
pub fn registry() -> MutexGuard<'static, WorkerRegistry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WorkerRegistry {
    pub fn insert(&mut self, pid: i32) {
        assert!(pid > 0);
        // (A pid reaped a moment ago may be the kernel's next one before its core has called
        // `forget_worker`: it is ours again either way.)
        self.pids.insert(pid);
    }

    fn contains(&self, pid: i32) -> bool {
        self.pids.contains(&pid)
    }

    /// A spawn starts whose child will be registered only once it has exec'd, without the
    /// lock held meanwhile (a child stopped before exec would otherwise hold it, and every
    /// core's `forget_worker`, for good): until [`Self::end_spawn`] the reaper spares the
    /// child whose pid the kernel writes in the returned cell (CLONE_PARENT_SETTID at its
    /// `as_ptr()`), and skips its sweeps while that is still 0.
    pub fn begin_spawn(&mut self) -> Arc<AtomicI32> {
        let cell = Arc::new(AtomicI32::new(0));
        self.spawning.push(Arc::clone(&cell));
        cell
    }

    /// The spawn begun with [`Self::begin_spawn`] is over (its child registered or gone).
    pub fn end_spawn(&mut self, cell: &Arc<AtomicI32>) {
        self.spawning.retain(|c| !Arc::ptr_eq(c, cell));
    }
}

/// The core reaped this worker: from now on its pid is not ours.
pub fn forget_worker(pid: i32) {
    registry().pids.remove(&pid);
    // (After the registry's lock: the reaper takes the cgroup lock under it.)
    crate::cgroup::worker_reaped(pid);
}

/// The bridge's children (of every one of its threads), from /proc.
fn children() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    pids
}

/// Kill and reap every child that is not a registered worker; returns how many were found.
/// A killed escapee is reaped at this sweep if it is already dead, else at the next.
pub fn sweep_orphans() -> usize {
    let registry = registry();
    let children = children();
    // (Read after the list: a child of a spawn under way that is in it has its pid written,
    // or this sweep is skipped.)
    let spawning: Vec<i32> = registry
        .spawning
        .iter()
        .map(|cell| cell.load(Ordering::SeqCst))
        .collect();
    if spawning.contains(&0) {
        return 0;
    }
    let mut found = 0;
    for pid in children {
        if registry.contains(pid) || spawning.contains(&pid) {
            continue;
        }
        // An escapee of a worker that just died: its reap kills its whole cgroup at once.
        if crate::cgroup::left_for_its_worker(pid) {
            continue;
        }
        found += 1;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        // SAFETY: kill(2) and waitid(2) on a child of this process that nobody else waits
        // for (workers are in the registry; the lock keeps spawns out meanwhile).
        let reaped = unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            ) == 0
                && info.si_pid() == pid
        };
        // (One already dead is only reaped; a live one is reaped at once or at the next sweep.)
        if alive {
            tracing::warn!(
                pid,
                comm = comm.trim_end(),
                reaped,
                "killed a process that escaped its worker and outlived its parent (workers may \
                 not leave processes behind)"
            );
        }
    }
    found
}

/// Start the thread that sweeps orphans every [`ORPHAN_SWEEP_INTERVAL`], for the life of the
/// bridge.
pub fn start_orphan_reaper() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("acgi-reaper".into())
        .spawn(|| {
            crate::alloc_count::stop_counting_this_thread();
            loop {
                wait_for_reaper_turn();
                crate::cgroup::kill_reaped();
                sweep_orphans();
                crate::cgroup::sweep();
            }
        })?;
    Ok(())
}

/// Set by [`wake_reaper`]: the reaper has work before its next interval.
static REAPER_WAKE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Have the orphan reaper run now rather than at its next interval (a core reaped a worker
/// whose cgroup is to be killed).
pub fn wake_reaper() {
    let mut woken = REAPER_WAKE.0.lock().unwrap_or_else(|p| p.into_inner());
    *woken = true;
    REAPER_WAKE.1.notify_one();
}

/// Wait for [`ORPHAN_SWEEP_INTERVAL`], or less when [`wake_reaper`] is called.
fn wait_for_reaper_turn() {
    let woken = REAPER_WAKE.0.lock().unwrap_or_else(|p| p.into_inner());
    let (mut woken, _) = REAPER_WAKE
        .1
        .wait_timeout_while(woken, ORPHAN_SWEEP_INTERVAL, |woken| !*woken)
        .unwrap_or_else(|p| p.into_inner());
    *woken = false;
}

/// Calls [`kill_all_children`] when dropped: held by `engine::run` so that every way out of
/// it (a graceful stop, a core's error) kills the escapees left.
pub struct KillChildrenOnDrop;

impl Drop for KillChildrenOnDrop {
    fn drop(&mut self) {
        kill_all_children();
        crate::cgroup::remove_all();
    }
}

/// At exit: SIGKILL every child still there (escapees; workers are gone by now, and would die
/// of their parent-death signal anyway), so that none outlives the bridge.
pub fn kill_all_children() {
    for pid in children() {
        // SAFETY: kill(2) on a child of this process, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `CAP_SETGID` and `CAP_SETUID` (linux/capability.h), which changing a worker's ids needs.
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;

/// Does this process have `capability` (a `CAP_*` number) in its effective set?
pub fn has_capability(capability: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|set| set & (1u64 << capability) != 0)
}

/// Who a service's workers run as, resolved at config load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (initgroups' list for the user, including `gid`).
    pub groups: Vec<u32>,
}

/// A passwd entry: name, uid, primary gid.
fn passwd_entry(user: &str) -> Result<Option<(String, u32, u32)>, String> {
    let by_number = user.parse::<u32>().ok();
    let name = CString::new(user).map_err(|_| format!("{user:?} contains a NUL byte"))?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r/getpwuid_r write into `entry` and `buffer`, both owned by this frame
    // and valid for the call; the strings read after point into `buffer`.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let status = match by_number {
            Some(uid) => libc::getpwuid_r(
                uid,
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            ),
            None => libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            ),
        };
        if status != 0 {
            return Err(format!(
                "looking up user {user:?}: {}",
                std::io::Error::from_raw_os_error(status)
            ));
        }
        if result.is_null() {
            return Ok(None);
        }
        let name = CStr::from_ptr(entry.pw_name).to_string_lossy().into_owned();
        Ok(Some((name, entry.pw_uid, entry.pw_gid)))
    }
}

/// A user's uid, by name or number (a number need not have a passwd entry).
pub fn user_id(user: &str) -> Result<u32, String> {
    match (passwd_entry(user)?, user.parse::<u32>()) {
        (Some((_, uid, _)), _) => Ok(uid),
        (None, Ok(uid)) => Ok(uid),
        (None, Err(_)) => Err(format!("there is no user {user:?}")),
    }
}

/// A group's gid, by name or number.
pub fn group_id(group: &str) -> Result<u32, String> {
    let name = CString::new(group).map_err(|_| format!("{group:?} contains a NUL byte"))?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getgrnam_r writes into `entry` and `buffer`, both owned by this frame.
    let found = unsafe {
        let mut entry: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let status = libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        );
        if status != 0 {
            return Err(format!(
                "looking up group {group:?}: {}",
                std::io::Error::from_raw_os_error(status)
            ));
        }
        (!result.is_null()).then_some(entry.gr_gid)
    };
    match (found, group.parse::<u32>()) {
        (Some(gid), _) => Ok(gid),
        (None, Ok(gid)) => Ok(gid),
        (None, Err(_)) => Err(format!("there is no group {group:?}")),
    }
}

/// Resolve `user` (a name or a numeric uid) and `group` (a name or gid; default: the user's
/// primary group) into the ids and supplementary groups a worker is given. A numeric uid with
/// no passwd entry runs with `group` (required then) and no supplementary group but it.
pub fn resolve_identity(user: &str, group: Option<&str>) -> Result<Identity, String> {
    let entry = passwd_entry(user)?;
    let gid = match (group, &entry) {
        (Some(group), _) => group_id(group)?,
        (None, Some((_, _, gid))) => *gid,
        (None, None) => {
            return Err(format!(
                "there is no user {user:?} (a numeric uid without a passwd entry needs `group`)"
            ))
        }
    };
    let Some((name, uid, _)) = entry else {
        let uid = user
            .parse::<u32>()
            .map_err(|_| format!("there is no user {user:?}"))?;
        return Ok(Identity {
            user: user.to_string(),
            uid,
            gid,
            groups: vec![gid],
        });
    };
    let c_name = CString::new(name.clone()).expect("no NUL in a passwd name");
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: getgrouplist writes at most `count` gids into `groups`, which holds that many.
        let status =
            unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if status >= 0 {
            groups.truncate(count as usize);
            break;
        }
        if groups.len() >= SUPPLEMENTARY_GROUPS_MAX {
            return Err(format!(
                "user {name:?} is in more than {SUPPLEMENTARY_GROUPS_MAX} groups"
            ));
        }
        groups.resize(
            (count as usize).clamp(groups.len() * 2, SUPPLEMENTARY_GROUPS_MAX),
            0,
        );
    }
    Ok(Identity {
        user: name,
        uid,
        gid,
        groups,
    })
}

/// The executable a service's workers run: resolved once, checked, and held open so that the
/// file that is run is the file that was checked.
#[derive(Clone, Debug)]
pub struct ExecFile {
    /// The resolved absolute path (for logs).
    pub path: PathBuf,
    /// The path the worker sees (argv[0]): `path`, or with `chroot` its path inside the root.
    pub argv0: PathBuf,
    /// An `O_PATH` descriptor of it; workers are started with execveat(fd, "", AT_EMPTY_PATH).
    pub fd: Arc<OwnedFd>,
    /// It starts with `#!`: the interpreter opens it through /dev/fd, so the worker is given
    /// the descriptor without close-on-exec.
    pub script: bool,
}

/// Find `exec` the way a shell would with `path` as PATH (a name with a slash is taken as is).
pub fn resolve_exec(exec: &Path, path: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if exec.components().count() > 1 || exec.is_absolute() {
        return Ok(exec.to_path_buf());
    }
    for dir in path.split(':').filter(|dir| dir.starts_with('/')) {
        let candidate = Path::new(dir).join(exec);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(format!(
        "{} is not found on the worker's PATH ({path})",
        exec.display()
    ))
}

/// Is this file one a worker may run: a regular executable file owned by root or `owner_uid`,
/// not writable by group or others (sshd's StrictModes)? `what` names it in the reason.
fn check_trusted(meta: &std::fs::Metadata, owner_uid: u32, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !meta.file_type().is_file() {
        return Err(format!("{what} is not a regular file"));
    }
    if meta.mode() & 0o111 == 0 {
        return Err(format!("{what} is not executable"));
    }
    if meta.uid() != 0 && meta.uid() != owner_uid {
        return Err(format!(
            "{what} is owned by uid {}: it must be owned by root or the service's user \
             (uid {owner_uid}), or anyone who owns it can change what the workers run",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{what} is writable by its group or others (mode {:04o}): chmod go-w it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Resolve, check and open a service's executable. `owner_uid` is the service's user (the
/// bridge's own uid when it has none). A script's `#!` interpreter is checked the same way
/// (it is found by path when the script is run).
pub fn open_exec(exec: &Path, path: &str, owner_uid: u32) -> Result<ExecFile, String> {
    let resolved = resolve_exec(exec, path)?;
    let resolved =
        std::fs::canonicalize(&resolved).map_err(|e| format!("{}: {e}", resolved.display()))?;
    open_checked(resolved, owner_uid, None)
}

/// `CAP_SYS_CHROOT` (linux/capability.h).
pub const CAP_SYS_CHROOT: u32 = 18;

/// What is wrong with a `chroot` setting before looking at the directory: not absolute, or a
/// bridge that may not chroot.
pub fn chroot_problem(root: Option<&Path>) -> Option<String> {
    let root = root?;
    if !root.is_absolute() {
        return Some("must be an absolute path".into());
    }
    if !has_capability(CAP_SYS_CHROOT) {
        return Some(format!(
            "chroot to {} needs the bridge to run as root or with CAP_SYS_CHROOT",
            root.display()
        ));
    }
    None
}

/// Check a service's `chroot` directory: a directory owned by root and not writable by group
/// or others (sshd's ChrootDirectory rule: whoever may write in it chooses the libraries and
/// the interpreter every new worker loads). Returns its canonical path.
pub fn check_chroot(root: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let meta = std::fs::metadata(&canonical).map_err(|e| format!("{}: {e}", root.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} must be owned by root and not writable by group or others (it is uid {}, mode \
             {:04o}): chown root and chmod go-w it",
            root.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(canonical)
}

/// Resolve, check and open a service's executable inside its `chroot` (`root`, canonical):
/// `exec` is a path inside the root as the workers see it (`/bin/worker`), the same path given
/// from outside (`ROOT/bin/worker`), or a name looked up on the worker's PATH inside the root.
/// It must resolve (symbolic links followed on this side) to a file inside the root, which is
/// where the kernel will find what it needs at exec (a `#!` interpreter, the ELF loader).
pub fn open_exec_in(root: &Path, exec: &Path, path: &str, owner: u32) -> Result<ExecFile, String> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let outside = || {
        format!(
            "{} is outside the chroot {}: the workers could not run it (copy it, and what it \
             loads, into the root, and name it as the workers see it: /bin/worker)",
            exec.display(),
            root.display()
        )
    };
    let candidate = if exec.starts_with(root) {
        exec.to_path_buf()
    } else if exec.is_absolute() {
        // A path that exists only on this side is one outside the root.
        if !inside(exec).exists() && exec.exists() {
            return Err(outside());
        }
        inside(exec)
    } else {
        let dirs: Vec<String> = path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| inside(Path::new(d)).display().to_string())
            .collect();
        resolve_exec(exec, &dirs.join(":"))?
    };
    let resolved =
        std::fs::canonicalize(&candidate).map_err(|e| format!("{}: {e}", candidate.display()))?;
    if !resolved.starts_with(root) {
        return Err(format!(
            "{} (it resolves to {})",
            outside(),
            resolved.display()
        ));
    }
    open_checked(resolved, owner, Some(root))
}

/// Open `resolved` (canonical) `O_PATH` and check it and a script's interpreter (found inside
/// `root` when the workers are chrooted there).
fn open_checked(
    resolved: PathBuf,
    owner_uid: u32,
    root: Option<&Path>,
) -> Result<ExecFile, String> {
    use std::io::Read;
    let fd = rustix::fs::open(
        &resolved,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("{}: {e}", resolved.display()))?;
    // The checks are made on the open descriptor: what is checked is what will be run.
    let meta = std::fs::File::from(
        fd.as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("{}: {e}", resolved.display()))?,
    )
    .metadata()
    .map_err(|e| format!("{}: {e}", resolved.display()))?;
    check_trusted(&meta, owner_uid, &resolved.display().to_string())?;
    // Read the first line through /proc/self/fd (an O_PATH descriptor cannot be read).
    let mut head = [0u8; 256];
    let mut file = std::fs::File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .map_err(|e| format!("{}: cannot read it: {e}", resolved.display()))?;
    let len = file.read(&mut head).unwrap_or(0);
    let script = head[..len].starts_with(b"#!");
    if script {
        let line = head[2..len].split(|b| *b == b'\n').next().unwrap_or(&[]);
        let interpreter = line
            .split(|b| *b == b' ' || *b == b'\t')
            .find(|word| !word.is_empty())
            .unwrap_or(&[]);
        let interpreter = Path::new(std::ffi::OsStr::from_bytes(interpreter));
        let what = format!(
            "the interpreter {} of {}",
            interpreter.display(),
            resolved.display()
        );
        if !interpreter.is_absolute() {
            return Err(format!("{what} is not an absolute path"));
        }
        // (Inside the chroot, the kernel finds it beneath the root.)
        let in_root =
            root.map(|root| root.join(interpreter.strip_prefix("/").unwrap_or(interpreter)));
        let interpreter = in_root.as_deref().unwrap_or(interpreter);
        let meta = std::fs::metadata(interpreter).map_err(|e| format!("{what}: {e}"))?;
        check_trusted(&meta, owner_uid, &what)?;
    }
    let argv0 = match root {
        Some(root) => Path::new("/").join(resolved.strip_prefix(root).unwrap_or(&resolved)),
        None => resolved.clone(),
    };
    Ok(ExecFile {
        path: resolved,
        argv0,
        fd: Arc::new(fd),
        script,
    })
}
