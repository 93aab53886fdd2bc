//! The spawner: a thread that starts worker processes so that fork+exec never stalls a core.
//!
//! A core sends a [`SpawnRequest`]; the spawner creates the worker's slot and control socket,
//! forks and execs the worker with them on fds 3 and 4, and hands back a [`Spawned`] (or the
//! error, naming the executable) through a queue, waking the core with an eventfd the core reads
//! on its ring. The spawner thread lives as long as the bridge: a worker's parent-death signal
//! fires when the thread that forked it exits.
//!
//! In the child, before exec: the signal mask is cleared (the bridge blocks SIGTERM/SIGINT for
//! its signalfd, and masks survive exec), the parent-death signal is set to SIGKILL, and the
//! worker gets its own process group (a terminal's Ctrl-C reaches the bridge, which stops the
//! workers in order).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::shm::Slot;
use crate::worker;

/// The soft RLIMIT_NOFILE workers are started with: the one the bridge itself was started
/// with, before it raised its own (0: leave it as inherited).
pub static WORKER_NOFILE_SOFT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Everything needed to start one worker of a service.
pub struct SpawnRequest {
    pub service_index: usize,
    pub service_name: String,
    pub service_id: u32,
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub slot_capacity: u32,
    pub max_payload_bytes: u32,
    pub state_dir: PathBuf,
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
    pub service_index: usize,
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
                for request in receiver {
                    let service_index = request.service_index;
                    let result = spawn(&request, parent_pid);
                    thread_results
                        .lock()
                        .expect("not poisoned")
                        .push(SpawnResult {
                            service_index,
                            result,
                        });
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

    pub fn request(&self, request: SpawnRequest) {
        self.requests
            .send(request)
            .expect("the spawner thread never exits");
    }

    pub fn take_results(&self, into: &mut Vec<SpawnResult>) {
        into.append(&mut self.results.lock().expect("not poisoned"));
    }
}

fn spawn(request: &SpawnRequest, parent_pid: i32) -> Result<Spawned, String> {
    let name = &request.service_name;
    let slot = Slot::create(&format!("acgi-slot-{name}"), request.slot_capacity)
        .map_err(|e| format!("service {name}: cannot create a slot: {e}"))?;
    let (bridge_end, worker_end) =
        UnixStream::pair().map_err(|e| format!("service {name}: socketpair failed: {e}"))?;
    let worker_fd = worker_end.as_raw_fd();
    let slot_fd = slot.fd().as_raw_fd();

    let mut command = Command::new(&request.exec);
    command
        .args(&request.args)
        .envs(&request.env)
        .env(worker::ENV_CONTROL_FD, "3")
        .env(worker::ENV_SLOT_FD, "4")
        .env(
            worker::ENV_MAX_PAYLOAD,
            request.max_payload_bytes.to_string(),
        )
        .env(worker::ENV_SERVICE, name)
        .env("ACGI_SERVICE_ID", request.service_id.to_string())
        .env(worker::ENV_STATE_DIR, &request.state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (fcntl, dup2, getrlimit, setrlimit, sigprocmask, prctl, getppid) on descriptors it owns there.
    unsafe {
        command.pre_exec(move || {
            // Move both descriptors above 2 first so that dup2 onto 3 and 4 cannot clobber
            // one with the other; dup2 clears close-on-exec on the copies.
            let control = libc::fcntl(worker_fd, libc::F_DUPFD_CLOEXEC, 10);
            let slot = libc::fcntl(slot_fd, libc::F_DUPFD_CLOEXEC, 10);
            if control < 0 || slot < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(control, 3) < 0 || libc::dup2(slot, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The soft descriptor limit the bridge started with (it raised its own).
            let soft = WORKER_NOFILE_SOFT.load(std::sync::atomic::Ordering::Relaxed);
            if soft != 0 {
                let mut limit: libc::rlimit = std::mem::zeroed();
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent_pid {
                return Err(std::io::Error::other("the bridge exited during spawn"));
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        format!(
            "service {name}: cannot start worker {}: {e}",
            request.exec.display()
        )
    })?;
    drop(worker_end);
    let stdout = child.stdout.take().expect("piped").into();
    let stderr = child.stderr.take().expect("piped").into();
    // The core reaps the child through its ring (WAITID); `Child` is dropped without waiting.
    Ok(Spawned {
        pid: child.id() as i32,
        control: bridge_end.into(),
        stdout,
        stderr,
        slot,
    })
}
