//! `faulty`: a worker for fault-injection tests. It speaks the worker protocol by hand (not
//! through the SDK) so that it can break it on request. Each request is a command:
//!
//! - `pid`: reply with this worker's pid. `echo BYTES`: reply with BYTES.
//! - `sleep MS`: sleep, then reply `slept`. `hang`: never answer.
//! - `fail MESSAGE`: answer with a handler error (`Fail`).
//! - `abort`, `exit`, `sigkill`: die mid-request (abort, exit status 3, SIGKILL itself).
//! - `big N`: reply with N bytes of `x` (the copy path when N is over the slot).
//! - `stderr N`: write N lines to stderr, then reply `ok`.
//! - `grow MIB`: allocate and touch MIB more mebibytes (kept), then reply `grew`.
//! - `remaining`: reply with the deadline milliseconds the bridge put in the slot header.
//! - Lies: `garbage-done` (garbage bytes instead of a Done frame), `lie-len` (a reply length
//!   over the slot's capacity), `wrong-seq` (a Done for another job), `extra-hello` (a Hello
//!   instead of a Done), `done-then-garbage-when PATH` (once PATH exists, a proper Done and
//!   garbage after it in the same write).
//!
//! Flags (first arguments): `--no-hello` exits before the handshake, `--garbage` writes garbage
//! instead of a Hello, `--slow-start MS` sleeps before the Hello, `--crash-on N` aborts on its
//! Nth request, `--ignore-sigterm` ignores SIGTERM, `--queue` takes queued jobs,
//! `--fail-if-exists PATH` exits before the handshake while PATH exists, `--hello-flags N` sends
//! its Hello with flags N, and `--answer-early` answers a job before its `Job` frame arrives:
//! between jobs it watches its slot, and once a request beginning with `EARLY!` starts to be
//! read into it, it answers with the sequence after the last one it was given (a guess, as an
//! attacker would make: the bridge numbers jobs from one counter per core).
//!
//! More lies, as commands: `fail-in-slot` and `fail-timeout-flag` answer with a `Fail` that
//! carries the `IN_SLOT` or the `TIMEOUT` flag, which §9 forbids.
//!
//! Attacks on the bridge and the machine (docs/security.md), as commands:
//! - `truncate-slot`: ftruncate its slot memfd to 0 bytes. Refused (the slot is sealed), it
//!   replies `ftruncate refused: errno N`; allowed, it sends an in-slot `Done` without touching
//!   the slot again, so the bridge reads a header that no longer exists (SIGBUS).
//! - `grow-slot`: ftruncate its slot to 1 MiB more; replies `ftruncate refused: errno N` or
//!   `slot grew`.
//! - `report`: what it was started with, one `name: value` line each: `fds` (its open
//!   descriptors), `SigIgn`, `SigBlk`, `SigCgt`, `NoNewPrivs`, `CapEff`, `Uid`, `Gid`, `Groups`
//!   (from /proc/self/status), `dumpable`, `umask`, `cwd`, `pgid`, `sid`, and the rlimits
//!   `core`, `nofile`, `as`, `nproc` (`soft/hard`, `-1` for unlimited).
//! - `environ`: its environment, one `NAME=value` a line.
//! - `double-fork`: fork a child that calls setsid (leaving the worker's process group and
//!   session) and forks a grandchild that sleeps forever; the child exits, and the reply is
//!   the grandchild's pid: a process that escaped the worker.
//! - `fork-setsid`: fork a child that calls setsid and waits forever, still the worker's child;
//!   the reply is its pid (killing the worker's process group does not reach it).
//! - `open PATH`: try to open PATH for reading; replies `opened` or `refused: errno N (...)`.
//! - `write PATH`: try to create (or truncate) PATH and write a byte; replies `written` or
//!   `refused: errno N (...)`.
//! - `unshare`: try unshare(CLONE_NEWUSER | CLONE_NEWNS) (what a seccomp filter denies);
//!   replies `unshared` or `unshare refused: errno N (...)`.
//! - `io-uring`: try io_uring_setup; replies `set up` or `io_uring_setup refused: errno N`.
//! - `tcp-bind PORT`, `tcp-connect PORT`: bind a TCP socket to 127.0.0.1:PORT, or connect to
//!   it; replies `bound` / `connected` or `bind refused: errno N (...)` (what Landlock's TCP
//!   rules deny).
//! - `signal PID`: send signal 0 to PID (the permission check of kill(2)); replies `allowed`
//!   or `refused: errno N (...)`.
//!
//! It applies `ACGI_DUMPABLE` as the SDK does (`acgi_worker::apply_dumpable`).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use acgi_proto::slot::SLOT_ABI_VERSION;
use acgi_proto::{self as proto, Header, Hello, Kind, FLAG_IN_SLOT, HEADER_BYTES};
use acgi_worker::{WorkerSlot, ENV_CONTROL_FD, ENV_SLOT_FD};

fn env_fd(name: &str) -> i32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("started by acgi-bridge")
}

fn send(control: &mut UnixStream, header: Header, payload: &[u8]) {
    let mut frame = Vec::new();
    proto::encode_frame(&mut frame, &header, payload);
    control.write_all(&frame).expect("control socket");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    let value = |name: &str| {
        flag(name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if flag("--ignore-sigterm").is_some() {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    if flag("--no-hello").is_some() {
        std::process::exit(4);
    }
    let fail_marker = flag("--fail-if-exists").and_then(|i| args.get(i + 1));
    if fail_marker.is_some_and(|path| std::path::Path::new(path).exists()) {
        std::process::exit(5);
    }
    if let Some(ms) = value("--slow-start") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let crash_on = value("--crash-on");
    acgi_worker::apply_dumpable().expect("PR_SET_DUMPABLE");
    // SAFETY: the bridge passed these descriptors to this process; each is taken once.
    let mut control = unsafe { UnixStream::from_raw_fd(env_fd(ENV_CONTROL_FD)) };
    // A second descriptor of the slot memfd, kept for the attacks on its size.
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on the inherited slot descriptor; the copy is ours.
    let slot_fd = unsafe { libc::fcntl(env_fd(ENV_SLOT_FD), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(slot_fd >= 0, "dup of the slot descriptor");
    let slot =
        WorkerSlot::attach(unsafe { OwnedFd::from_raw_fd(env_fd(ENV_SLOT_FD)) }).expect("slot");
    if flag("--garbage").is_some() {
        control.write_all(&[0xEE; 64]).expect("control socket");
        std::thread::sleep(Duration::from_secs(3600));
        return;
    }
    let hello = Hello {
        slot_abi_version: SLOT_ABI_VERSION,
        pid: std::process::id(),
    };
    let mut hello_header = Header::new(Kind::Hello, 0, 0, Hello::BYTES as u32);
    if flag("--queue").is_some() {
        hello_header.flags = proto::FLAG_QUEUED;
    }
    if let Some(flags) = value("--hello-flags") {
        hello_header.flags = flags as u16;
    }
    let answer_early = flag("--answer-early").is_some();
    let mut last_sequence = 0u64;
    send(&mut control, hello_header, &hello.encode());

    let mut memory: Vec<Vec<u8>> = Vec::new();
    let mut served = 0u64;
    loop {
        if answer_early && wait_for_early_request(&control, &slot) {
            // Answer the job the bridge is reading into the slot, before it sends its `Job`.
            let guess = last_sequence + 1;
            let header = slot.header();
            header.reply_len.store(0, Ordering::Relaxed);
            header.job_sequence.store(guess, Ordering::Relaxed);
            header.state.store(3, Ordering::Release); // Replied
            let mut done = Header::new(Kind::Done, 0, guess, 0);
            done.flags = FLAG_IN_SLOT;
            send(&mut control, done, &[]);
        }
        let mut bytes = [0u8; HEADER_BYTES];
        if control.read_exact(&mut bytes).is_err() {
            return; // The bridge closed the socket: stop.
        }
        let header = Header::decode(&bytes, u32::MAX).expect("a valid Job header");
        assert_eq!(header.kind, Kind::Job);
        let sequence = header.request_id;
        last_sequence = sequence;
        let queued = header.flags & proto::FLAG_QUEUED != 0;
        let in_slot = if queued {
            None
        } else {
            slot.take_job(sequence).expect("a job in the slot")
        };
        let request = match in_slot {
            // SAFETY: take_job moved the slot to Taken with this length.
            Some(len) => unsafe { slot.request_bytes(len) }.to_vec(),
            None => {
                let mut payload = vec![0; header.payload_len as usize];
                control.read_exact(&mut payload).expect("inline payload");
                payload
            }
        };
        served += 1;
        if crash_on == Some(served) {
            std::process::abort();
        }
        let text = String::from_utf8_lossy(&request).into_owned();
        let (command, argument) = text.split_once(' ').unwrap_or((&text, ""));
        let reply: Result<Vec<u8>, String> = match command {
            "pid" => Ok(std::process::id().to_string().into_bytes()),
            "echo" => Ok(request[5.min(request.len())..].to_vec()),
            "sleep" => {
                std::thread::sleep(Duration::from_millis(argument.parse().unwrap_or(0)));
                Ok(b"slept".to_vec())
            }
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "fail" => Err(argument.to_string()),
            "abort" => std::process::abort(),
            "exit" => std::process::exit(3),
            "sigkill" => {
                // SAFETY: signalling our own pid.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL cannot be caught")
            }
            "big" => Ok(vec![b'x'; argument.parse().unwrap_or(0)]),
            "stderr" => {
                for line in 0..argument.parse::<usize>().unwrap_or(0) {
                    eprintln!("faulty worker stderr line {line}");
                }
                Ok(b"ok".to_vec())
            }
            "grow" => {
                let mib: usize = argument.parse().unwrap_or(0);
                memory.push(vec![1u8; mib << 20]);
                Ok(b"grew".to_vec())
            }
            "remaining" => {
                let ms = slot.header().deadline_remaining_ms.load(Ordering::Relaxed);
                Ok(ms.to_string().into_bytes())
            }
            "garbage-done" => {
                control.write_all(&[0x5A; 24]).expect("control socket");
                std::thread::sleep(Duration::from_secs(3600));
                continue;
            }
            "done-then-garbage-when" => {
                // Once the file named exists (the test's signal that another request waits
                // in the backlog), answer this job properly and, in the same write, break
                // the protocol: the bridge reads both in one receive.
                while !std::path::Path::new(argument).exists() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                slot.publish_reply(Some(b"answered")).expect("slot");
                let mut done = Header::new(Kind::Done, 0, sequence, 0);
                done.flags = FLAG_IN_SLOT;
                let mut frame = Vec::new();
                proto::encode_frame(&mut frame, &done, &[]);
                frame.extend_from_slice(&[0x5A; 24]);
                control.write_all(&frame).expect("control socket");
                std::thread::sleep(Duration::from_secs(3600));
                continue;
            }
            "lie-len" => {
                slot.publish_reply(Some(b"short")).expect("slot");
                slot.header()
                    .reply_len
                    .store(slot.capacity() + 100, Ordering::Relaxed);
                let mut done = Header::new(Kind::Done, 0, sequence, 0);
                done.flags = FLAG_IN_SLOT;
                send(&mut control, done, &[]);
                continue;
            }
            "wrong-seq" => {
                slot.publish_reply(Some(b"wrong")).expect("slot");
                let mut done = Header::new(Kind::Done, 0, sequence + 1000, 0);
                done.flags = FLAG_IN_SLOT;
                send(&mut control, done, &[]);
                continue;
            }
            "fail-in-slot" | "fail-timeout-flag" => {
                slot.publish_reply(None).expect("slot");
                let message = b"a Fail with a flag it may not carry";
                let mut fail = Header::new(Kind::Fail, 0, sequence, message.len() as u32);
                fail.flags = if command == "fail-in-slot" {
                    FLAG_IN_SLOT
                } else {
                    proto::FLAG_TIMEOUT
                };
                send(&mut control, fail, message);
                continue;
            }
            "truncate-slot" => {
                // SAFETY: ftruncate on our own descriptor of the slot memfd.
                if unsafe { libc::ftruncate(slot_fd, 0) } == 0 {
                    // The slot is gone: touching it would fault here. Claim a reply in it.
                    let mut done = Header::new(Kind::Done, 0, sequence, 0);
                    done.flags = FLAG_IN_SLOT;
                    send(&mut control, done, &[]);
                    continue;
                }
                Ok(refused("ftruncate"))
            }
            "grow-slot" => {
                // SAFETY: fstat into a local, then ftruncate on our own slot descriptor.
                let grown = unsafe {
                    let mut stat: libc::stat = std::mem::zeroed();
                    libc::fstat(slot_fd, &mut stat) == 0
                        && libc::ftruncate(slot_fd, stat.st_size + (1 << 20)) == 0
                };
                if grown {
                    Ok(b"slot grew".to_vec())
                } else {
                    Ok(refused("ftruncate"))
                }
            }
            "report" => Ok(report().into_bytes()),
            "environ" => {
                let lines: Vec<String> = std::env::vars_os()
                    .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
                    .collect();
                Ok(lines.join("\n").into_bytes())
            }
            "double-fork" => Ok(double_fork().to_string().into_bytes()),
            "fork-setsid" => Ok(fork_setsid().to_string().into_bytes()),
            "tcp-bind" => Ok(tcp("bind", argument, |addr| {
                std::net::TcpListener::bind(addr).map(drop)
            })),
            "tcp-connect" => Ok(tcp("connect", argument, |addr| {
                std::net::TcpStream::connect(addr).map(drop)
            })),
            "write" => match std::fs::write(argument, b"x") {
                Ok(()) => Ok(b"written".to_vec()),
                Err(error) => Ok(format!(
                    "refused: errno {} ({error})",
                    error.raw_os_error().unwrap_or(0)
                )
                .into_bytes()),
            },
            "unshare" => {
                // SAFETY: unshare(2) with flags only; a new user namespace changes nothing the
                // worker relies on before its next request.
                if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } == 0 {
                    Ok(b"unshared".to_vec())
                } else {
                    Ok(refused("unshare"))
                }
            }
            "io-uring" => {
                let mut params = [0u8; 120];
                // SAFETY: io_uring_setup(1, params) with a zeroed params struct of the size the
                // kernel reads; the descriptor it returns is closed at once.
                let fd =
                    unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
                if fd >= 0 {
                    // SAFETY: our own new descriptor.
                    unsafe { libc::close(fd as i32) };
                    Ok(b"set up".to_vec())
                } else {
                    Ok(refused("io_uring_setup"))
                }
            }
            "open" => match std::fs::File::open(argument) {
                Ok(_) => Ok(b"opened".to_vec()),
                Err(error) => Ok(format!(
                    "refused: errno {} ({error})",
                    error.raw_os_error().unwrap_or(0)
                )
                .into_bytes()),
            },
            "signal" => {
                let pid: i32 = argument.parse().unwrap_or(0);
                // SAFETY: kill(2) with signal 0 only checks whether we may signal `pid`.
                if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                    Ok(b"allowed".to_vec())
                } else {
                    Ok(refused("kill"))
                }
            }
            "extra-hello" => {
                send(
                    &mut control,
                    Header::new(Kind::Hello, 0, 0, Hello::BYTES as u32),
                    &hello.encode(),
                );
                continue;
            }
            other => Err(format!("unknown command {other:?}")),
        };
        if queued {
            // A queued job: answered on the socket, the slot untouched.
            let (kind, bytes) = match reply {
                Ok(bytes) => (Kind::Done, bytes),
                Err(message) => (Kind::Fail, message.into_bytes()),
            };
            send(
                &mut control,
                Header::new(kind, 0, sequence, bytes.len() as u32),
                &bytes,
            );
            continue;
        }
        match reply {
            Ok(bytes) if bytes.len() <= slot.capacity() as usize => {
                slot.publish_reply(Some(&bytes)).expect("slot");
                let mut done = Header::new(Kind::Done, 0, sequence, 0);
                done.flags = FLAG_IN_SLOT;
                send(&mut control, done, &[]);
            }
            Ok(bytes) => {
                slot.publish_reply(None).expect("slot");
                send(
                    &mut control,
                    Header::new(Kind::Done, 0, sequence, bytes.len() as u32),
                    &bytes,
                );
            }
            Err(message) => {
                slot.publish_reply(None).expect("slot");
                let header = Header::new(Kind::Fail, 0, sequence, message.len() as u32);
                send(&mut control, header, message.as_bytes());
            }
        }
    }
}

/// What this process was started with (the `report` command).
fn report() -> String {
    let mut lines = Vec::new();
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            let mut fds: Vec<i32> = dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            fds.sort();
            fds.iter().map(|fd| fd.to_string()).collect()
        })
        .unwrap_or_default();
    // (read_dir's own descriptor is among them: the highest.)
    lines.push(format!("fds: {}", fds.join(" ")));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        let name = line.split(':').next().unwrap_or("");
        if [
            "SigIgn",
            "SigBlk",
            "SigCgt",
            "NoNewPrivs",
            "Seccomp",
            "CapEff",
            "Uid",
            "Gid",
            "Groups",
        ]
        .contains(&name)
        {
            lines.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    // SAFETY: prctl/umask/getpgid/getsid/getrlimit with plain arguments and local out-values.
    unsafe {
        lines.push(format!("dumpable: {}", libc::prctl(libc::PR_GET_DUMPABLE)));
        let mask = libc::umask(0);
        libc::umask(mask);
        lines.push(format!("umask: {mask:04o}"));
        lines.push(format!("pgid: {}", libc::getpgid(0)));
        lines.push(format!("sid: {}", libc::getsid(0)));
        for (name, resource) in [
            ("core", libc::RLIMIT_CORE),
            ("nofile", libc::RLIMIT_NOFILE),
            ("as", libc::RLIMIT_AS),
            ("nproc", libc::RLIMIT_NPROC),
        ] {
            let mut limit: libc::rlimit = std::mem::zeroed();
            libc::getrlimit(resource, &mut limit);
            let show = |v: libc::rlim_t| {
                if v == libc::RLIM_INFINITY {
                    "-1".to_string()
                } else {
                    v.to_string()
                }
            };
            lines.push(format!(
                "{name}: {}/{}",
                show(limit.rlim_cur),
                show(limit.rlim_max)
            ));
        }
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    lines.push(format!("cwd: {}", cwd.display()));
    lines.join("\n")
}

/// Fork a child that leaves the process group and session (setsid) and forks a grandchild
/// that sleeps forever, then exits; returns the grandchild's pid.
fn double_fork() -> i32 {
    let mut pipe = [0i32; 2];
    // SAFETY: pipe/fork/setsid/write/read/waitpid/pause/_exit on local values; this process
    // is single-threaded, so the children may do anything until they exit.
    unsafe {
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        let child = libc::fork();
        if child == 0 {
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild == 0 {
                loop {
                    libc::pause();
                }
            }
            libc::write(pipe[1], (&grandchild as *const i32).cast(), 4);
            libc::_exit(0);
        }
        let mut grandchild = 0i32;
        libc::read(pipe[0], (&mut grandchild as *mut i32).cast(), 4);
        libc::waitpid(child, std::ptr::null_mut(), 0);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
        grandchild
    }
}

/// Start a child that leaves the worker's process group and session (setsid) and waits
/// forever, still the worker's child (not waited for): it outlives a kill of the worker's
/// group, and only the worker's cgroup (or, once it is orphaned, the orphan reaper) ends it.
fn fork_setsid() -> i32 {
    // SAFETY: fork/setsid/pause in a single-threaded process; the child only loops on pause.
    unsafe {
        let child = libc::fork();
        if child == 0 {
            libc::setsid();
            loop {
                libc::pause();
            }
        }
        child
    }
}

/// Try `call` on 127.0.0.1:`port`: `bound` / `connected`, or `bind refused: errno N (...)`.
fn tcp(
    call: &str,
    port: &str,
    attempt: impl Fn(std::net::SocketAddr) -> std::io::Result<()>,
) -> Vec<u8> {
    let port: u16 = port.trim().parse().unwrap_or(0);
    match attempt(std::net::SocketAddr::from(([127, 0, 0, 1], port))) {
        Ok(()) if call == "bind" => b"bound".to_vec(),
        Ok(()) => b"connected".to_vec(),
        Err(error) => format!(
            "{call} refused: errno {} ({error})",
            error.raw_os_error().unwrap_or(0)
        )
        .into_bytes(),
    }
}

/// The reply naming the errno of a refused system call.
fn refused(call: &str) -> Vec<u8> {
    let error = std::io::Error::last_os_error();
    format!(
        "{call} refused: errno {} ({error})",
        error.raw_os_error().unwrap_or(0)
    )
    .into_bytes()
}

/// Between jobs: wait until either a `Job` frame can be read (false) or a request starting
/// with `EARLY!` appears at the start of the slot's data area while no job is ours (true).
fn wait_for_early_request(control: &UnixStream, slot: &WorkerSlot) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        let mut poll = libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, owned by this frame, for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 1) };
        if ready != 0 {
            return false;
        }
        // SAFETY: the data area is at least 64 bytes (the smallest slot); reading bytes the
        // bridge may be writing at the same moment is what this hostile worker means to do.
        let start = unsafe { std::slice::from_raw_parts(slot.data_address(0), 6) };
        if start == b"EARLY!" {
            return true;
        }
    }
}
