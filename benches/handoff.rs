//! The seed's question, "how many buffer copies per request, and is copying cheaper than shared
//! memory?", measured.
//!
//! - `memcpy_10k`: the cost of one 10 KiB copy, the unit every other figure is counted in.
//! - `slot_handoff_10k`: a full cross-process round trip through an [`acgi_bridge::shm::Slot`]:
//!   fill (copy in), doorbell, the child takes the job and echoes it in place, doorbell back,
//!   take_reply (copy out). Run with 10 KiB and with 64 bytes, so that the fixed cost (two
//!   doorbells, two wake-ups) can be told apart from the per-byte cost, and with both processes
//!   pinned to one CPU (`same_cpu`) and to two (`cross_cpu`), see [`Placement`].
//! - `socket_copy_10k`: the same echo with the payload carried on the Unix socket itself (the
//!   copy path the bridge uses for payloads larger than a slot), for comparison.
//! - `sysv_shm_setup_10k` / `memfd_mmap_setup_64k`: what it costs to set shared memory up and
//!   tear it down, per request, if slots were not long-lived.
//!
//! The child is this binary re-executed with [`CHILD_ENV`] set: it inherits the slot memfd and
//! one end of a socket pair, serves doorbells until it reads EOF (the parent dropped its end),
//! then exits; the parent waits for it, so no zombie is left behind. Results and their reading
//! are in `docs/performance.md`.
//!
//! ```text
//!   bench process                              child (same binary, CHILD_ENV set)
//!   slot.fill(seq, payload) ─┐
//!   write [DOORBELL_SLOT] ───┼──── socket ───▶ read 1 byte; take_job(seq); publish_reply(request)
//!   read 1 byte ◀────────────┼──── socket ──── write [DOORBELL_SLOT]
//!   slot.take_reply(seq) ────┘
//! ```

use std::hint::black_box;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use acgi_bridge::shm::Slot;
use acgi_worker::WorkerSlot;
use criterion::{criterion_group, BenchmarkId, Criterion};

/// Set (to "SLOT_FD,SOCKET_FD") in the re-executed child's environment.
const CHILD_ENV: &str = "ACGI_HANDOFF_BENCH_CHILD";
/// The payload of the seed's estimate.
const PAYLOAD_10K_BYTES: usize = 10 * 1024;
/// A payload small enough that the round trip is all doorbell.
const PAYLOAD_SMALL_BYTES: usize = 64;
/// Data capacity of the benchmark's slot: the bridge's default.
const SLOT_CAPACITY_BYTES: u32 = acgi_bridge::shm::SLOT_CAPACITY_BYTES_DEFAULT;
/// Size of the memfd in `memfd_mmap_setup_64k`.
const MEMFD_BYTES: usize = 64 * 1024;
/// Doorbell byte: the job is in the slot.
const DOORBELL_SLOT: u8 = 1;
/// Doorbell byte: a u32 LE length and the payload follow on the socket; echo the payload back.
const DOORBELL_SOCKET: u8 = 2;
/// Doorbell byte: switch to futex doorbells on the slot's state word until told to stop.
const DOORBELL_FUTEX: u8 = 3;
/// `deadline_remaining_ms` value that tells a child in futex mode to go back to the socket.
const FUTEX_MODE_END: u64 = u64::MAX;
/// Bytes before the payload in a socket-path frame: the doorbell and the length.
const SOCKET_FRAME_HEADER_BYTES: usize = 5;

fn main() {
    if let Some(fds) = std::env::var_os(CHILD_ENV) {
        child_main(fds.to_str().expect("child fds are ASCII"));
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = memcpy_10k, slot_handoff_10k, slot_futex_10k, socket_copy_10k, sysv_shm_setup_10k,
        memfd_mmap_setup_64k
}

fn memcpy_10k(c: &mut Criterion) {
    let source = payload(PAYLOAD_10K_BYTES);
    let mut destination = vec![0u8; PAYLOAD_10K_BYTES];
    c.bench_function("memcpy_10k", |b| {
        b.iter(|| black_box(&mut destination[..]).copy_from_slice(black_box(&source[..])))
    });
}

fn slot_handoff_10k(c: &mut Criterion) {
    slot_round_trips(c, "slot_handoff_10k", false);
}

/// The same slot round trip with a futex doorbell on the slot's state word instead of a byte on
/// the socket: the alternative DESIGN.md names for the bridge's doorbell.
fn slot_futex_10k(c: &mut Criterion) {
    slot_round_trips(c, "slot_futex_10k", true);
}

/// Slot round trips for every placement and payload size, with the socket-byte or the futex
/// doorbell.
fn slot_round_trips(c: &mut Criterion, name: &str, futex: bool) {
    let mut group = c.benchmark_group(name);
    for placement in Placement::available() {
        let mut peer: Option<Peer> = None;
        for bytes in [PAYLOAD_10K_BYTES, PAYLOAD_SMALL_BYTES] {
            let request = payload(bytes);
            let mut reply = Vec::with_capacity(bytes);
            let id = BenchmarkId::new(placement.name(), bytes);
            group.bench_with_input(id, &request, |b, request| {
                let peer = peer.get_or_insert_with(|| {
                    let mut peer = Peer::spawn(placement);
                    if futex {
                        ring(peer.socket(), DOORBELL_FUTEX);
                        peer.futex_mode = true;
                    }
                    peer
                });
                if futex {
                    b.iter(|| peer.futex_round_trip(black_box(request), &mut reply));
                } else {
                    b.iter(|| peer.slot_round_trip(black_box(request), &mut reply));
                }
                assert_eq!(&reply, request, "the child echoed something else");
            });
        }
    }
    group.finish();
}

/// FUTEX_WAKE every waiter on a shared (not process-private) futex word.
fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: the word lives in a shared mapping that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0,
        )
    };
}

/// Sleep while the shared futex word still holds `current`.
fn futex_wait(word: &std::sync::atomic::AtomicU32, current: u32) {
    // SAFETY: as above; a spurious or EAGAIN return is handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            current,
            0usize,
        );
    }
}

fn socket_copy_10k(c: &mut Criterion) {
    let mut group = c.benchmark_group("socket_copy_10k");
    for placement in Placement::available() {
        let mut peer: Option<Peer> = None;
        for bytes in [PAYLOAD_10K_BYTES, PAYLOAD_SMALL_BYTES] {
            let request = payload(bytes);
            // The frame is built once: the bridge would send from a buffer it already holds.
            let mut frame = vec![DOORBELL_SOCKET];
            frame.extend_from_slice(&(bytes as u32).to_le_bytes());
            frame.extend_from_slice(&request);
            let mut reply = vec![0u8; bytes];
            let id = BenchmarkId::new(placement.name(), bytes);
            group.bench_with_input(id, &frame, |b, frame| {
                let peer = peer.get_or_insert_with(|| Peer::spawn(placement));
                b.iter(|| peer.socket_round_trip(black_box(frame), &mut reply));
                assert_eq!(reply, request, "the child echoed something else");
            });
        }
    }
    group.finish();
}

fn sysv_shm_setup_10k(c: &mut Criterion) {
    c.bench_function("sysv_shm_setup_10k", |b| {
        b.iter(|| {
            // SAFETY: plain System V calls on a private segment that only this closure knows;
            // the attachment is written inside its 10 KiB and detached before the segment is
            // removed, and nothing keeps the pointer past shmdt.
            unsafe {
                let id = libc::shmget(
                    libc::IPC_PRIVATE,
                    PAYLOAD_10K_BYTES,
                    libc::IPC_CREAT | 0o600,
                );
                assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
                let address = libc::shmat(id, std::ptr::null(), 0);
                if address as isize == -1 {
                    let error = std::io::Error::last_os_error();
                    libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                    panic!("shmat: {error}");
                }
                std::ptr::write_volatile(address.cast::<u8>(), 1);
                assert_eq!(
                    libc::shmdt(address),
                    0,
                    "shmdt: {}",
                    std::io::Error::last_os_error()
                );
                let removed = libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                assert_eq!(removed, 0, "shmctl: {}", std::io::Error::last_os_error());
            }
        })
    });
}

fn memfd_mmap_setup_64k(c: &mut Criterion) {
    use rustix::mm::{MapFlags, ProtFlags};
    c.bench_function("memfd_mmap_setup_64k", |b| {
        b.iter(|| {
            let fd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC)
                .expect("memfd_create");
            rustix::fs::ftruncate(&fd, MEMFD_BYTES as u64).expect("ftruncate");
            // SAFETY: a fresh shared mapping of a memfd only we hold; it is written inside its
            // 64 KiB and unmapped before the closure returns, and no reference outlives it.
            unsafe {
                let address = rustix::mm::mmap(
                    std::ptr::null_mut(),
                    MEMFD_BYTES,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    &fd,
                    0,
                )
                .expect("mmap");
                std::ptr::write_volatile(address.cast::<u8>(), 1);
                rustix::mm::munmap(address, MEMFD_BYTES).expect("munmap");
            }
            drop(black_box(fd));
        })
    });
}

/// Where the bench process and its child run. Left to the scheduler, the pair lands on one CPU
/// or on two by chance, and on a VM the two differ by an order of magnitude (a wake-up across
/// CPUs may have to wake an idle virtual CPU), so each round trip is measured pinned both ways.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// Parent and child pinned to the same CPU: each doorbell is a context switch.
    SameCpu { cpu: usize },
    /// Parent and child pinned to two different CPUs: each doorbell is a cross-CPU wake-up.
    CrossCpu { parent: usize, child: usize },
}

impl Placement {
    /// The placements this process's CPU set allows (cross-CPU needs two CPUs).
    fn available() -> Vec<Placement> {
        let cpus = allowed_cpus(&current_affinity());
        let mut placements = vec![Placement::SameCpu { cpu: cpus[0] }];
        if let [parent, child, ..] = cpus[..] {
            placements.push(Placement::CrossCpu { parent, child });
        }
        placements
    }

    fn name(self) -> &'static str {
        match self {
            Placement::SameCpu { .. } => "same_cpu",
            Placement::CrossCpu { .. } => "cross_cpu",
        }
    }

    fn parent_cpu(self) -> usize {
        match self {
            Placement::SameCpu { cpu } => cpu,
            Placement::CrossCpu { parent, .. } => parent,
        }
    }

    fn child_cpu(self) -> usize {
        match self {
            Placement::SameCpu { cpu } => cpu,
            Placement::CrossCpu { child, .. } => child,
        }
    }
}

/// The calling thread's CPU affinity.
fn current_affinity() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data (all zeros is the empty set); the kernel writes at most
    // size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let got = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        assert_eq!(
            got,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        set
    }
}

/// The CPUs in `set`, lowest first.
fn allowed_cpus(set: &libc::cpu_set_t) -> Vec<usize> {
    // SAFETY: CPU_ISSET only reads the set, and every index is below CPU_SETSIZE.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect();
    assert!(!cpus.is_empty(), "this process may run on no CPU");
    cpus
}

/// The set holding only `cpu`.
fn single_cpu(cpu: usize) -> libc::cpu_set_t {
    assert!(cpu < libc::CPU_SETSIZE as usize);
    // SAFETY: all zeros is the empty set; `cpu` is below CPU_SETSIZE (asserted above).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pin the calling thread to `set`.
fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: the kernel only reads size_of::<cpu_set_t>() bytes of `set`.
    let done = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    assert_eq!(
        done,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// A bytes pattern that is not all zeros (zero pages could be special-cased somewhere).
fn payload(bytes: usize) -> Vec<u8> {
    (0..bytes).map(|i| (i * 131 + 7) as u8).collect()
}

/// The child process at the other end of the slot and socket, and the parent's state for it.
struct Peer {
    slot: Slot,
    socket: Option<UnixStream>,
    child: Child,
    /// Sequence number of the last slot job; the child counts the same way.
    job_sequence: u64,
    /// The bench thread's affinity before [`Peer::spawn`] pinned it, restored on drop.
    parent_affinity: libc::cpu_set_t,
    /// The child waits on futexes, not the socket (see `slot_futex_10k`).
    futex_mode: bool,
}

impl Peer {
    fn spawn(placement: Placement) -> Peer {
        let parent_affinity = current_affinity();
        set_affinity(&single_cpu(placement.parent_cpu()));
        let child_affinity = single_cpu(placement.child_cpu());
        let slot = Slot::create("handoff-bench", SLOT_CAPACITY_BYTES).expect("creating the slot");
        let (socket, child_socket) = UnixStream::pair().expect("socketpair");
        let slot_fd = slot.fd().as_raw_fd();
        let child_fd = child_socket.as_raw_fd();
        let mut command = Command::new(std::env::current_exe().expect("current_exe"));
        command.env(CHILD_ENV, format!("{slot_fd},{child_fd}"));
        // SAFETY: the closure runs in the forked child before exec and only makes the fcntl and
        // sched_setaffinity system calls, which are async-signal-safe and allocate nothing; the
        // CPU set was built before the fork. The two descriptors are open in the parent (owned
        // by `slot` and `child_socket`, alive until after spawn returns), so they are open in
        // the child too.
        unsafe {
            command.pre_exec(move || {
                for fd in [slot_fd, child_fd] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let size = std::mem::size_of::<libc::cpu_set_t>();
                if libc::sched_setaffinity(0, size, &child_affinity) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("re-executing the bench binary as its child");
        // Only the child may hold this end, so that dropping ours gives the child EOF.
        drop(child_socket);
        Peer {
            slot,
            socket: Some(socket),
            child,
            job_sequence: 0,
            parent_affinity,
            futex_mode: false,
        }
    }

    /// One request through the slot with futex doorbells on the state word.
    fn futex_round_trip(&mut self, request: &[u8], reply: &mut Vec<u8>) {
        use std::sync::atomic::Ordering;
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        self.slot.fill(sequence, Some(request), 0).expect("fill");
        let state = &self.slot.header().state;
        futex_wake(state);
        loop {
            let now = state.load(Ordering::Acquire);
            if now == acgi_bridge::shm::SlotState::Replied as u32 {
                break;
            }
            futex_wait(state, now);
        }
        reply.clear();
        self.slot
            .take_reply(sequence, true, reply)
            .expect("take_reply");
    }

    fn socket(&mut self) -> &mut UnixStream {
        self.socket.as_mut().expect("open until drop")
    }

    /// One request through the slot and back; the reply replaces `reply`'s contents.
    fn slot_round_trip(&mut self, request: &[u8], reply: &mut Vec<u8>) {
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        self.slot.fill(sequence, Some(request), 0).expect("fill");
        ring(self.socket(), DOORBELL_SLOT);
        wait_for_ring(self.socket(), DOORBELL_SLOT);
        reply.clear();
        self.slot
            .take_reply(sequence, true, reply)
            .expect("take_reply");
    }

    /// One request frame (doorbell, u32 LE length, payload) written to the socket in one call,
    /// and its payload echoed back into `reply` (which has the payload's length).
    fn socket_round_trip(&mut self, frame: &[u8], reply: &mut [u8]) {
        assert_eq!(frame.len(), SOCKET_FRAME_HEADER_BYTES + reply.len());
        let socket = self.socket();
        socket.write_all(frame).expect("writing the request frame");
        socket.read_exact(reply).expect("reading the echo");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.futex_mode {
            // Out of futex mode first, so that the child reads the socket's EOF.
            let header = self.slot.header();
            header
                .deadline_remaining_ms
                .store(FUTEX_MODE_END, std::sync::atomic::Ordering::Release);
            futex_wake(&header.state);
        }
        // EOF tells the child to exit; reap it so no zombie is left.
        drop(self.socket.take());
        match self.child.wait() {
            Ok(status) if status.success() => {}
            Ok(status) if std::thread::panicking() => eprintln!("handoff child: {status}"),
            Ok(status) => panic!("handoff child ended with {status}"),
            Err(error) => eprintln!("waiting for the handoff child: {error}"),
        }
        set_affinity(&self.parent_affinity);
    }
}

fn ring(socket: &mut UnixStream, doorbell: u8) {
    socket.write_all(&[doorbell]).expect("ringing the doorbell");
}

fn wait_for_ring(socket: &mut UnixStream, expected: u8) {
    let mut byte = [0u8; 1];
    socket
        .read_exact(&mut byte)
        .expect("the child hung up (see its error above)");
    assert_eq!(byte[0], expected, "unexpected doorbell");
}

/// The child: serve doorbells until the parent closes the socket.
fn child_main(fds: &str) {
    let (slot_fd, socket_fd) = fds.split_once(',').expect("CHILD_ENV is SLOT_FD,SOCKET_FD");
    let slot_fd: RawFd = slot_fd.parse().expect("slot fd");
    let socket_fd: RawFd = socket_fd.parse().expect("socket fd");
    // SAFETY: the parent cleared CLOEXEC on exactly these two descriptors for us, and nothing
    // else in this process owns them.
    let (slot_fd, mut socket) = unsafe {
        (
            OwnedFd::from_raw_fd(slot_fd),
            UnixStream::from_raw_fd(socket_fd),
        )
    };
    let slot = WorkerSlot::attach(slot_fd).expect("attaching the slot");
    // Buffered reads, so that a socket-path frame costs one read call, like the doorbell.
    let mut reader = BufReader::with_capacity(
        SOCKET_FRAME_HEADER_BYTES + SLOT_CAPACITY_BYTES as usize,
        socket.try_clone().expect("cloning the socket"),
    );
    let mut job_sequence = 0u64;
    let mut buffer = Vec::new();
    loop {
        let mut doorbell = [0u8; 1];
        match reader.read(&mut doorbell) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => panic!("child reading its doorbell: {error}"),
        }
        match doorbell[0] {
            DOORBELL_SLOT => {
                job_sequence += 1;
                let len = slot
                    .take_job(job_sequence)
                    .expect("take_job")
                    .expect("in-slot job");
                // SAFETY: take_job moved the slot to Taken with this length; the parent does not
                // touch the data area until we publish the reply.
                let request = unsafe { slot.request_bytes(len) };
                slot.publish_reply(Some(request)).expect("publish_reply");
                ring(&mut socket, DOORBELL_SLOT);
            }
            DOORBELL_FUTEX => loop {
                use std::sync::atomic::Ordering;
                let header = slot.header();
                if header.deadline_remaining_ms.load(Ordering::Acquire) == FUTEX_MODE_END {
                    break;
                }
                let now = header.state.load(Ordering::Acquire);
                if now != acgi_bridge::shm::SlotState::Filled as u32 {
                    futex_wait(&header.state, now);
                    continue;
                }
                job_sequence += 1;
                let len = slot
                    .take_job(job_sequence)
                    .expect("take_job")
                    .expect("in-slot job");
                // SAFETY: as for DOORBELL_SLOT.
                let request = unsafe { slot.request_bytes(len) };
                slot.publish_reply(Some(request)).expect("publish_reply");
                futex_wake(&header.state);
            },
            DOORBELL_SOCKET => {
                let mut len = [0u8; 4];
                reader.read_exact(&mut len).expect("reading the length");
                buffer.resize(u32::from_le_bytes(len) as usize, 0);
                reader.read_exact(&mut buffer).expect("reading the payload");
                socket.write_all(&buffer).expect("echoing the payload");
            }
            other => panic!("child got unknown doorbell {other}"),
        }
    }
}
