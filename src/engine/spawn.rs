//! The spawner: a thread that starts worker processes so that fork+exec never stalls a core.
//!
//! A core sends a [`SpawnRequest`]; the spawner creates the worker's slot and control socket,
//! forks and execs the worker with them on fds 3 and 4, and hands back a [`Spawned`] (or the
//! error, naming the executable) through a queue, waking the core with an eventfd the core reads
//! on its ring. The spawner thread lives as long as the bridge: a worker's parent-death signal
//! fires when the thread that forked it exits.
//!
//! The child is made with clone(CLONE_VM | CLONE_VFORK) on a stack of its own: it shares the
//! bridge's memory (no page tables to copy: a fork of a large bridge costs tens of
//! milliseconds, this clone a fraction of one) and the spawner thread is suspended until it
//! execs or exits. Only a child that changes its ids while `fs.suid_dumpable` is 1 is forked
//! instead (see `spawn`). Everything the child needs (argv, envp, rlimits, identity, the
//! executable's descriptor) is built before: until exec the child makes only system calls, on
//! those values, in this order, and reports a failure (which step, errno) on a close-on-exec
//! pipe the spawner reads once the child has exec'd or exited. It starts with every signal
//! blocked (by the spawner, around the clone), so that no handler of the bridge's runs in it:
//!
//! 1. its own process group (so the bridge can signal the worker's whole group, and a
//!    terminal's Ctrl-C reaches the bridge alone);
//! 2. stdin `/dev/null`, stdout and stderr the bridge's pipes, the control socket on 3, the
//!    slot on 4, the executable on 5 (close-on-exec unless it is a `#!` script, whose
//!    interpreter opens it as /dev/fd/5), and every other descriptor closed (close_range);
//! 3. every signal's disposition reset to default (the bridge ignores SIGPIPE; that survives
//!    exec);
//! 4. rlimits (RLIMIT_NOFILE, RLIMIT_CORE, and RLIMIT_AS / RLIMIT_NPROC when configured), the
//!    umask, then the identity (setgroups, setresgid, setresuid: raw system calls, which change
//!    only this one task, not the bridge's threads as glibc's setxid wrappers would), then
//!    PR_SET_DUMPABLE 0 (the change of ids set it to `fs.suid_dumpable`, on the bridge's memory
//!    too; exec resets it, so the worker re-applies it from `ACGI_DUMPABLE`: protocol §6.1),
//!    then the parent-death signal SIGKILL (a change of effective ids clears it, so it comes
//!    after them), then the working directory (as the user);
//! 5. PR_SET_NO_NEW_PRIVS 1;
//! 6. the signal mask cleared (exec keeps it; the bridge blocks its handled signals), last;
//! 7. execveat(5, "", argv, envp, AT_EMPTY_PATH): the file checked at config load, whatever
//!    now lies at its path.
//!
//! The orphan reaper must never mistake a new worker for an escapee: the spawner marks the
//! spawn in the worker registry (`confine`) under its lock before the clone, the kernel writes
//! the child's pid where the reaper reads it (CLONE_PARENT_SETTID), and the spawner registers
//! the child once the clone has returned (a fork is made with the lock held throughout, as it
//! returns at once). A child whose setup fails is reaped here and unregistered.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::config::{Config, ServiceConfig};
use crate::shm::Slot;
use crate::worker;

/// The soft RLIMIT_NOFILE workers are started with: the one the bridge itself was started
/// with, before it raised its own (0: leave it as inherited).
pub static WORKER_NOFILE_SOFT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The environment variable telling the worker whether to stay dumpable (`1`) or not (`0`).
pub const ENV_DUMPABLE: &str = "ACGI_DUMPABLE";

/// Everything needed to start one worker of a service: the service's index in the config, and
/// the core's slot it is for (returned with the result).
pub struct SpawnRequest {
    pub slot: usize,
    pub service_index: usize,
    pub config: Arc<Config>,
}

/// A started worker process and the bridge's ends of its descriptors.
pub struct Spawned {
    pub pid: i32,
    pub control: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub slot: Slot,
}

pub struct SpawnResult {
    /// The core's service slot (`SpawnRequest::slot`).
    pub slot: usize,
    pub result: Result<Spawned, String>,
}

/// The core's handle on the spawner thread.
pub struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
    results: Arc<Mutex<Vec<SpawnResult>>>,
    /// Written by the spawner after each result; read by the core's ring.
    pub wake: Arc<OwnedFd>,
}

impl Spawner {
    pub fn start() -> std::io::Result<Spawner> {
        let wake = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        let (requests, receiver) = mpsc::channel::<SpawnRequest>();
        let results: Arc<Mutex<Vec<SpawnResult>>> = Arc::default();
        let thread_results = Arc::clone(&results);
        let thread_wake = Arc::clone(&wake);
        let parent_pid = std::process::id() as i32;
        std::thread::Builder::new()
            .name("acgi-spawner".into())
            .spawn(move || {
                // (Without a stack, which only a failed mmap leaves us, every child is forked.)
                let stack = ChildStack::new().ok();
                for request in receiver {
                    let slot = request.slot;
                    let result = spawn(&request, parent_pid, stack.as_ref());
                    thread_results
                        .lock()
                        .expect("not poisoned")
                        .push(SpawnResult { slot, result });
                    let _ = rustix::io::write(&*thread_wake, &1u64.to_ne_bytes());
                }
                // The channel closed: the bridge is exiting. Park so that workers keep their
                // parent-death anchor until the process ends.
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Spawner {
            requests,
            results,
            wake,
        })
    }

    /// A spawner without its thread, for the engine simulation (`engine::sim`): whoever holds
    /// the other ends takes the requests and hands back results itself, waking the core on
    /// `wake` as the thread does.
    #[cfg(test)]
    pub(crate) fn from_parts(
        requests: mpsc::Sender<SpawnRequest>,
        results: Arc<Mutex<Vec<SpawnResult>>>,
        wake: Arc<OwnedFd>,
    ) -> Spawner {
        Spawner {
            requests,
            results,
            wake,
        }
    }

    pub fn request(&self, request: SpawnRequest) {
        self.requests
            .send(request)
            .expect("the spawner thread never exits");
    }

    pub fn take_results(&self, into: &mut Vec<SpawnResult>) {
        into.append(&mut self.results.lock().expect("not poisoned"));
    }
}

/// A worker's whole environment: with `clear_env` (the default) the safe PATH and the
/// `inherit_env` names copied from the bridge, else the bridge's own environment; then the
/// service's `env` table; then the protocol's `ACGI_*` variables (§6.1), which nothing else
/// may set (inherited `ACGI_*` variables are dropped).
pub fn environment(config: &Config, service: &ServiceConfig) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    if service.clear_env {
        env.insert("PATH".into(), crate::config::SAFE_PATH.into());
        for name in &service.inherit_env {
            if let Some(value) = std::env::var_os(name) {
                env.insert(name.into(), value);
            }
        }
    } else {
        env.extend(std::env::vars_os());
    }
    env.retain(|name, _| !name.as_bytes().starts_with(b"ACGI_"));
    for (name, value) in &service.env {
        env.insert(name.into(), value.into());
    }
    let protocol: [(&str, OsString); 8] = [
        (worker::ENV_CONTROL_FD, "3".into()),
        (worker::ENV_SLOT_FD, "4".into()),
        (
            worker::ENV_MAX_PAYLOAD,
            config.max_payload_bytes.to_string().into(),
        ),
        (worker::ENV_SERVICE, service.name.clone().into()),
        ("ACGI_SERVICE_ID", service.id.to_string().into()),
        (worker::ENV_STATE_DIR, config.state_dir.clone().into()),
        (
            ENV_DUMPABLE,
            if service.dumpable { "1" } else { "0" }.into(),
        ),
        ("PATH", service.worker_path()),
    ];
    for (name, value) in protocol {
        env.insert(name.into(), value);
    }
    env
}

/// The steps of the child between fork and exec, named in the error a failed one reports.
const STEPS: [&str; 14] = [
    "setpgid",
    "PR_SET_PDEATHSIG",
    "the bridge exited during spawn",
    "moving descriptors",
    "close_range",
    "setrlimit",
    "setgroups",
    "setresgid",
    "setresuid",
    "chdir",
    "PR_SET_NO_NEW_PRIVS",
    "execveat",
    "landlock_restrict_self",
    "seccomp",
];

/// One rlimit to set in the child: resource, soft, hard, and the config key it comes from.
struct Limit {
    resource: libc::__rlimit_resource_t,
    value: libc::rlimit,
    key: &'static str,
}

fn to_cstring(bytes: &[u8]) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| format!("{:?} contains a NUL byte", OsStr::from_bytes(bytes)))
}

/// The rlimits a service's workers are given.
fn limits(service: &ServiceConfig) -> Vec<Limit> {
    let exact = |value: u64| libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    let mut limits = vec![Limit {
        resource: libc::RLIMIT_CORE,
        value: exact(service.rlimit_core),
        key: "rlimit_core",
    }];
    match service.rlimit_nofile {
        Some(value) => limits.push(Limit {
            resource: libc::RLIMIT_NOFILE,
            value: exact(value),
            key: "rlimit_nofile",
        }),
        None => {
            // The soft limit the bridge started with (it raised its own), under today's hard.
            let soft = WORKER_NOFILE_SOFT.load(std::sync::atomic::Ordering::Relaxed);
            let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
            if soft != 0 {
                let hard = hard.unwrap_or(libc::RLIM_INFINITY);
                limits.push(Limit {
                    resource: libc::RLIMIT_NOFILE,
                    value: libc::rlimit {
                        rlim_cur: soft.min(hard),
                        rlim_max: hard,
                    },
                    key: "rlimit_nofile",
                });
            }
        }
    }
    if let Some(value) = service.rlimit_as {
        limits.push(Limit {
            resource: libc::RLIMIT_AS,
            value: exact(value),
            key: "rlimit_as",
        });
    }
    if let Some(value) = service.rlimit_nproc {
        limits.push(Limit {
            resource: libc::RLIMIT_NPROC,
            value: exact(value),
            key: "rlimit_nproc",
        });
    }
    limits
}

/// `fs.suid_dumpable` (None if it cannot be read).
fn suid_dumpable() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/fs/suid_dumpable")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The stack a `clone(CLONE_VM)` child runs on, with a guard page below it: mapped once by the
/// spawner thread, used by one child at a time (the spawner is suspended while it runs).
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    /// Generous: the child's frames are a few hundred bytes of locals and libc wrappers.
    const LEN: usize = 256 << 10;
    const GUARD: usize = 4096;

    pub(crate) fn new() -> std::io::Result<ChildStack> {
        let len = Self::LEN + Self::GUARD;
        // SAFETY: a fresh anonymous private mapping, then PROT_NONE on its lowest page; both
        // only touch this new mapping.
        unsafe {
            let base = rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::STACK,
            )?;
            rustix::mm::mprotect(base, Self::GUARD, rustix::mm::MprotectFlags::empty())?;
            Ok(ChildStack { base, len })
        }
    }

    /// The top of the stack (it grows down), 16-byte aligned (the mapping is page-aligned).
    pub(crate) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is where a descending stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no child running on it (the spawner that owns
        // it is suspended while one does).
        unsafe {
            let _ = rustix::mm::munmap(self.base, self.len);
        }
    }
}

/// Block every signal of this thread (the raw call: glibc's wrapper leaves its own 32 and 33
/// open), around a clone whose child runs on our memory until it has reset every disposition;
/// returns the mask to put back with [`restore_signal_mask`] (read `errno` before: this is a
/// system call).
pub(crate) fn block_every_signal() -> [u64; 1] {
    let mut old_mask = [0u64; 1];
    let all = [!0u64; 1];
    // SAFETY: rt_sigprocmask on this thread with valid 8-byte sets.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            all.as_ptr(),
            old_mask.as_mut_ptr(),
            8usize,
        )
    };
    old_mask
}

/// Put back the mask [`block_every_signal`] returned (`[0; 1]`: unblock every signal, which the
/// children do last before exec). Only a system call: safe in a clone child on our memory.
pub(crate) fn restore_signal_mask(old_mask: [u64; 1]) {
    // SAFETY: rt_sigprocmask on this thread with a valid 8-byte set.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            old_mask.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
}

/// Start one worker: with clone(CLONE_VM | CLONE_VFORK) on `stack`, else (no stack, or see
/// below) with fork.
fn spawn(
    request: &SpawnRequest,
    parent_pid: i32,
    stack: Option<&ChildStack>,
) -> Result<Spawned, String> {
    let config = &*request.config;
    let service = &config.services[request.service_index];
    let name = &service.name;
    let exec = service
        .exec_file
        .as_ref()
        .ok_or_else(|| format!("service {name}: its executable was not opened at config load"))?;
    let slot = Slot::create(&format!("acgi-slot-{name}"), service.slot_size_bytes)
        .map_err(|e| format!("service {name}: cannot create a slot: {e}"))?;
    let (bridge_end, worker_end) =
        UnixStream::pair().map_err(|e| format!("service {name}: socketpair failed: {e}"))?;

    // Everything the child uses, built (allocated) before the fork.
    let mut argv_strings = vec![to_cstring(exec.path.as_os_str().as_bytes())?];
    for arg in &service.args {
        argv_strings.push(to_cstring(arg.as_bytes())?);
    }
    let mut envp_strings = Vec::new();
    for (key, value) in environment(config, service) {
        let mut pair = key.into_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        envp_strings.push(to_cstring(&pair)?);
    }
    let argv: Vec<*const libc::c_char> = argv_strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = envp_strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let limits = limits(service);
    let chdir = match &service.chdir {
        Some(dir) => Some(to_cstring(dir.as_os_str().as_bytes())?),
        None => None,
    };
    let umask = service.umask_bits();
    let identity = service.identity.as_ref();
    let groups: Vec<libc::gid_t> = identity.map(|i| i.groups.clone()).unwrap_or_default();
    let empty_path = c"";
    let open = |path: &std::path::Path| {
        rustix::fs::open(
            path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("service {name}: {}: {e}", path.display()))
    };
    let stdin = open(std::path::Path::new("/dev/null"))?;
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| format!("service {name}: pipe failed: {e}"))
    };
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (report_read, report_write) = pipe()?;
    let fds = ChildFds {
        stdin: stdin.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        control: worker_end.as_raw_fd(),
        slot: slot.fd().as_raw_fd(),
        exec: exec.fd.as_raw_fd(),
        report: report_write.as_raw_fd(),
    };
    let script = exec.script;
    let sandbox = service.sandbox.as_deref();
    let landlock = sandbox
        .and_then(|s| s.landlock.as_ref())
        .map_or(-1, |fd| fd.as_raw_fd());
    let seccomp = sandbox
        .and_then(|s| s.seccomp.as_ref())
        .map(|program| libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        });

    let args = ChildArgs {
        landlock,
        seccomp: seccomp
            .as_ref()
            .map_or(std::ptr::null(), std::ptr::from_ref),
        fds: &fds,
        parent_pid,
        script,
        limits: &limits,
        umask,
        identity: identity.map(|i| (i.uid, i.gid)),
        groups: &groups,
        chdir: chdir.as_deref(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        empty_path: empty_path.as_ptr(),
    };
    // A child that shares our memory and then changes its ids makes our memory dumpable as
    // `fs.suid_dumpable` says until it execs (commit_creds sets the shared mm's flag): with 1,
    // a process of the worker's user could ptrace that child, i.e. the live bridge. Fork then.
    // With 2 (SUID_DUMP_ROOT) only root may ptrace or read it, as at 0; what the window, the
    // few system calls from setresgid to the child's PR_SET_DUMPABLE 0, adds is that a crash
    // of the bridge within it would leave a root-owned core file.
    let stack = stack.filter(|_| identity.is_none() || matches!(suid_dumpable(), Some(0 | 2)));
    let share = stack.is_some();

    let mut registry = Some(crate::confine::registry());
    let mut spawn_cell = None;
    // Every signal blocked (the raw call: glibc's wrapper leaves its own 32 and 33 open) from
    // before the child exists until it has reset every disposition, so that no handler of
    // ours runs in it (with CLONE_VM, on our memory). The child clears its mask last.
    let old_mask = block_every_signal();
    let dumpable = if share {
        // SAFETY: prctl with integer arguments on this process.
        unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }
    } else {
        -1
    };
    let pid = if let Some(stack) = stack {
        // The registry's lock is not held across the clone, which returns only once the child
        // has exec'd: a child stopped before that (SIGSTOP cannot be blocked, and the worker's
        // user may send it once the ids are changed) would keep it held, and with it every
        // core's `forget_worker`. The reaper spares the child whose pid the kernel writes at
        // `in_flight` (CLONE_PARENT_SETTID, before the child runs) until `end_spawn` below.
        let cell = registry.as_mut().expect("locked").begin_spawn();
        let in_flight = cell.as_ptr();
        spawn_cell = Some(cell);
        registry = None;
        // SAFETY: clone(CLONE_VM | CLONE_VFORK): the child runs `child_entry` on `stack`, a
        // mapping of its own (the guard page below it faults rather than overwriting our
        // memory), sharing our memory but not our descriptor table, filesystem context nor
        // signal handler table (no CLONE_FILES, CLONE_FS, CLONE_SIGHAND: its dup2, chdir,
        // umask and sigaction change its own copies; its rlimits and ids are its own). This
        // thread is suspended until the child execs or exits, so `args` and everything it
        // points to (this frame's values) stay alive and unchanged for it. The child makes
        // only system calls on them: it allocates nothing, takes no lock, and writes no memory
        // of ours but its stack and this thread's `errno` (it runs with our thread pointer;
        // we read `errno` below only if clone failed, i.e. there was no child). Its signals
        // are blocked (above) until it has reset every handler. The other threads of the
        // bridge run on meanwhile and cannot see the child's writes (it writes nothing they
        // read). Its parent is this thread, as after fork: the parent-death signal fires when
        // it exits, and getppid() is our pid.
        let pid = unsafe {
            libc::clone(
                child_entry,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
                std::ptr::from_ref(&args).cast_mut().cast(),
                in_flight,
            )
        };
        let written = spawn_cell.as_ref().map(|c| c.load(Ordering::SeqCst));
        debug_assert!(pid < 0 || written == Some(pid), "{written:?} {pid}");
        pid
    } else {
        // SAFETY: fork(2). The child runs only `child_main`, which makes system calls on
        // values built above (owned by this frame, alive in the child's copy of it) and ends
        // in exec or _exit: no allocation, no lock, nothing that is not async-signal-safe.
        match unsafe { libc::fork() } {
            // SAFETY: in the child of fork (see above); it never returns.
            0 => unsafe { child_main(&args) },
            pid => pid,
        }
    };
    let clone_error = std::io::Error::last_os_error();
    let mut registry = registry.unwrap_or_else(crate::confine::registry);
    if let Some(cell) = &spawn_cell {
        registry.end_spawn(cell);
    }
    restore_signal_mask(old_mask);
    // The child's PR_SET_DUMPABLE 0 (or its change of ids) was on our memory: put ours back.
    // SAFETY: prctl with integer arguments on this process.
    if dumpable >= 0 && unsafe { libc::prctl(libc::PR_GET_DUMPABLE) } != dumpable {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong) };
    }
    if pid < 0 {
        return Err(format!(
            "service {name}: {} failed: {clone_error}",
            if share { "clone" } else { "fork" }
        ));
    }
    registry.insert(pid);
    drop(registry);
    drop(report_write);
    drop(worker_end);
    drop(stdout_write);
    drop(stderr_write);
    // Until exec succeeds (EOF: the pipe was close-on-exec) or a step fails (its report).
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        match rustix::io::read(&report_read, &mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    if got == 0 {
        tracing::debug!(service = %name, pid, exec = %exec.path.display(), "worker exec'd");
        // The core reaps the child through its ring (WAITID).
        return Ok(Spawned {
            pid,
            control: bridge_end.into(),
            stdout: stdout_read,
            stderr: stderr_read,
            slot,
        });
    }
    // The child failed before exec and exits: reap it here (no core knows it), then forget it.
    // SAFETY: waitpid on our own child, which nobody else waits for (the reaper skips it while
    // it is registered).
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    crate::confine::forget_worker(pid);
    let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes")) as usize;
    let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
    let what = STEPS.get(step).copied().unwrap_or("setup");
    let error = std::io::Error::from_raw_os_error(errno);
    let hint = match what {
        "setrlimit" => {
            let keys: Vec<&str> = limits.iter().map(|l| l.key).collect();
            format!(" (one of {keys:?} is over the bridge's own hard limit)")
        }
        "setgroups" | "setresgid" | "setresuid" => {
            " (changing user needs the bridge to run as root or with CAP_SETUID/CAP_SETGID)".into()
        }
        _ => String::new(),
    };
    Err(format!(
        "service {name}: cannot start worker {}: {what}: {error}{hint}",
        exec.path.display()
    ))
}

/// The descriptors the child arranges, as they are numbered in the parent.
struct ChildFds {
    stdin: i32,
    stdout: i32,
    stderr: i32,
    control: i32,
    slot: i32,
    exec: i32,
    report: i32,
}

/// What the child is given: pointers into the spawner's frame, valid until it execs or exits.
struct ChildArgs<'a> {
    /// The Landlock ruleset to restrict itself with (-1: none).
    landlock: i32,
    /// The seccomp program to install last before exec (null: none).
    seccomp: *const libc::sock_fprog,
    fds: &'a ChildFds,
    parent_pid: i32,
    script: bool,
    limits: &'a [Limit],
    umask: Option<u32>,
    identity: Option<(u32, u32)>,
    groups: &'a [libc::gid_t],
    chdir: Option<&'a std::ffi::CStr>,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    empty_path: *const libc::c_char,
}

/// The entry point of the `clone` child: `arg` is a `&ChildArgs`.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of the suspended spawner (see `spawn`); this is the
    // child of clone(CLONE_VM | CLONE_VFORK), which `child_main` ends with exec or _exit.
    unsafe { child_main(&*arg.cast::<ChildArgs>()) }
}

/// The child: its setup and exec, or the failed step's report and `_exit`.
///
/// # Safety
///
/// Only in the child of a fork or of the spawner's clone.
unsafe fn child_main(args: &ChildArgs) -> ! {
    // SAFETY: see `child_setup`; the report is written from this stack to a pipe.
    unsafe {
        let (step, errno) = child_setup(args);
        let report = [step, errno as u32];
        libc::write(args.fds.report, report.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

/// The child's steps before exec; returns (step, errno) of the one that failed.
///
/// # Safety
///
/// Only in the child of a fork or of the spawner's clone, which must end with `_exit` when
/// this returns. With CLONE_VM it shares the bridge's memory: it must only make system calls,
/// reading the values `args` points to, and write nothing but its own stack (and `errno`,
/// which is the suspended spawner thread's).
unsafe fn child_setup(args: &ChildArgs) -> (u32, i32) {
    let ChildArgs {
        landlock,
        seccomp,
        fds,
        parent_pid,
        script,
        limits,
        umask,
        identity,
        groups,
        chdir,
        argv,
        envp,
        empty_path,
    } = *args;
    // SAFETY: reads this thread's errno (the spawner's, with CLONE_VM: it is suspended).
    let errno = || unsafe { *libc::__errno_location() };
    // SAFETY (whole body): system calls on plain values and on descriptors this process owns;
    // the pointers are into the spawner frame's argv/envp/groups (its copy after fork, itself
    // after clone).
    unsafe {
        if libc::setpgid(0, 0) != 0 {
            return (0, errno());
        }
        // Move every descriptor above the targets first, so that no dup2 clobbers a source.
        let sources = [
            fds.stdin,
            fds.stdout,
            fds.stderr,
            fds.control,
            fds.slot,
            fds.exec,
            fds.report,
        ];
        let mut moved = [0i32; 7];
        for (slot, &fd) in moved.iter_mut().zip(sources.iter()) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            if *slot < 0 {
                return (3, errno());
            }
        }
        // The Landlock ruleset too (it was opened at config load, often with a low number that
        // a dup2 below would replace).
        let landlock = if landlock >= 0 {
            let fd = libc::fcntl(landlock, libc::F_DUPFD_CLOEXEC, 10);
            if fd < 0 {
                return (3, errno());
            }
            fd
        } else {
            -1
        };
        // dup2 clears close-on-exec on 0-5; the report pipe goes to 6 and keeps it.
        for (target, &fd) in moved[..6].iter().enumerate() {
            if libc::dup2(fd, target as i32) < 0 {
                return (3, errno());
            }
        }
        if libc::dup3(moved[6], 6, libc::O_CLOEXEC) < 0 {
            return (3, errno());
        }
        if !script && libc::fcntl(5, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return (3, errno());
        }
        // The Landlock ruleset, while its descriptor is still open (close_range below closes
        // it; its copy is above 9). It needs
        // no_new_privs (or CAP_SYS_ADMIN, which the child may not have), which is harmless this
        // early: it only stops exec from gaining privileges.
        if landlock >= 0 {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                return report_on(6, 10, errno());
            }
            if libc::syscall(crate::sandbox::SYS_LANDLOCK_RESTRICT_SELF, landlock, 0u32) != 0 {
                return report_on(6, 12, errno());
            }
        }
        // From here on the report pipe is 6 (its failure reports go there).
        if libc::close_range(7, libc::c_uint::MAX, 0) != 0 {
            return report_on(6, 4, errno());
        }
        // The raw system call, so that the C library's reserved signals (32, 33), which its
        // wrapper refuses, are reset too. All zeros is SIG_DFL, no flags, an empty mask.
        let action = [0u64; 4];
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    action.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        for limit in limits {
            if libc::setrlimit(limit.resource, &limit.value) != 0 {
                return report_on(6, 5, errno());
            }
        }
        if let Some(mask) = umask {
            libc::umask(mask as libc::mode_t);
        }
        if let Some((uid, gid)) = identity {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return report_on(6, 6, errno());
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return report_on(6, 7, errno());
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return report_on(6, 8, errno());
            }
        }
        // At once after the identity, whose change set dumpability to `fs.suid_dumpable`.
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
        // After the identity: changing the effective ids (commit_creds) clears the
        // parent-death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return report_on(6, 1, errno());
        }
        if libc::getppid() != parent_pid {
            return report_on(6, 2, 0);
        }
        if let Some(dir) = chdir {
            if libc::chdir(dir.as_ptr()) != 0 {
                return report_on(6, 9, errno());
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
            return report_on(6, 10, errno());
        }
        // Last, the mask (exec keeps it): every signal was blocked since before the child
        // existed, and now has its default action, so none can run a handler of the bridge's.
        restore_signal_mask([0; 1]);
        // The seccomp filter last: nothing after it but exec (which it allows).
        if !seccomp.is_null()
            && libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                seccomp,
            ) != 0
        {
            return report_on(6, 13, errno());
        }
        libc::execveat(5, empty_path, argv.cast(), envp.cast(), libc::AT_EMPTY_PATH);
        report_on(6, 11, errno())
    }
}

/// Write a failed step's report on `fd` directly (used once the report pipe has moved); the
/// caller's write to the old number then fails harmlessly.
///
/// # Safety
///
/// Only in the child of a fork.
unsafe fn report_on(fd: i32, step: u32, errno: i32) -> (u32, i32) {
    let report = [step, errno as u32];
    // SAFETY: writing 8 bytes of a local array to a descriptor this process owns.
    unsafe { libc::write(fd, report.as_ptr().cast(), 8) };
    // SAFETY: _exit ends the child without running anything of the parent's.
    unsafe { libc::_exit(127) }
}

#[cfg(test)]
mod tests {
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
                slot: 0,
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
                error.contains("chdir: No such file or directory"),
                "{error}"
            );
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
                slot: 0,
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
}
