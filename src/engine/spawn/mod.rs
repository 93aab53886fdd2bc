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
//! pipe the spawner reads once the child has exec'd or exited. The child's steps, in their
//! order, are listed in [`child`].
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

use super::index::ServiceSlot;
use crate::config::{Config, ServiceConfig};
use crate::shm::Slot;
use crate::worker;

mod child;
mod error;
mod sibling;

pub use error::SpawnError;

use child::{block_every_signal, restore_signal_mask, ChildStack};
use child::{child_entry, child_main, ChildArgs, ChildFds, Limit, STEPS};
pub(crate) use sibling::{spawn_sibling, SiblingError, SiblingExec};

/// The soft RLIMIT_NOFILE workers are started with: the one the bridge itself was started
/// with, before it raised its own (0: leave it as inherited).
pub static WORKER_NOFILE_SOFT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The environment variable telling the worker whether to stay dumpable (`1`) or not (`0`).
pub const ENV_DUMPABLE: &str = "ACGI_DUMPABLE";

/// Everything needed to start one worker of a service: the service's index in the config, and
/// the core's slot it is for (returned with the result).
pub struct SpawnRequest {
    pub slot: ServiceSlot,
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
    pub slot: ServiceSlot,
    pub result: Result<Spawned, SpawnError>,
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

fn to_cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| {
        SpawnError::Config(format!(
            "{:?} contains a NUL byte",
            OsStr::from_bytes(bytes)
        ))
    })
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

/// Start one worker: with clone(CLONE_VM | CLONE_VFORK) on `stack`, else (no stack, or see
/// below) with fork.
fn spawn(
    request: &SpawnRequest,
    parent_pid: i32,
    stack: Option<&ChildStack>,
) -> Result<Spawned, SpawnError> {
    let config = &*request.config;
    let service = &config.services[request.service_index];
    let name = &service.name;
    let exec = service
        .exec_file
        .as_ref()
        .ok_or_else(|| SpawnError::Config("its executable was not opened at config load".into()))?;
    let slot =
        Slot::create(&format!("acgi-slot-{name}"), service.slot_size_bytes).map_err(|e| {
            SpawnError::Resources {
                what: "creating its slot",
                error: std::io::Error::other(e.to_string()),
            }
        })?;
    let (bridge_end, worker_end) = UnixStream::pair().map_err(|error| SpawnError::Resources {
        what: "socketpair",
        error,
    })?;

    // Everything the child uses, built (allocated) before the fork.
    let mut argv_strings = vec![to_cstring(exec.argv0.as_os_str().as_bytes())?];
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
    let chroot = match &service.chroot {
        Some(root) => Some(to_cstring(root.as_os_str().as_bytes())?),
        None => None,
    };
    // In a chroot the working directory must be inside it: `/` unless `chdir` names one.
    let chdir = match (&service.chdir, &chroot) {
        (Some(dir), _) => Some(to_cstring(dir.as_os_str().as_bytes())?),
        (None, Some(_)) => Some(c"/".to_owned()),
        (None, None) => None,
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
        .map_err(|e| SpawnError::Resources {
            what: "opening /dev/null",
            error: e.into(),
        })
    };
    let stdin = open(std::path::Path::new("/dev/null"))?;
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| {
            SpawnError::Resources {
                what: "pipe",
                error: e.into(),
            }
        })
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

    // Its cgroup (under its service's), which the child joins first.
    let cgroup = crate::cgroup::prepare_worker(service).map_err(SpawnError::Cgroup)?;
    let args = ChildArgs {
        cgroup_procs: cgroup.as_ref().map_or(-1, |c| c.procs.as_raw_fd()),
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
        chroot: chroot.as_deref(),
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
        if let Some(cgroup) = cgroup {
            crate::cgroup::worker_failed(cgroup);
        }
        return Err(SpawnError::Resources {
            what: if share { "clone" } else { "fork" },
            error: clone_error,
        });
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
        if let Some(cgroup) = cgroup {
            crate::cgroup::worker_started(pid, cgroup);
        }
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
    if let Some(cgroup) = cgroup {
        crate::cgroup::worker_failed(cgroup);
    }
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
    Err(SpawnError::Child {
        step,
        error,
        exec: exec.path.clone(),
        hint,
    })
}

#[cfg(test)]
mod tests;
