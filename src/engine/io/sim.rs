//! The simulation's test double of the ring (tests only): it takes the same [`Sqe`]s as the
//! kernel's ring and carries each out itself, on real descriptors, when the harness
//! (`engine::sim`) says so.
//!
//! Why a double and not the kernel: the kernel decides when an op completes and how much it
//! moves, so a test against it sees one interleaving per run and cannot replay it. Here every
//! submitted op waits in `pending` until [`SimHandle::step`] picks it, with a seeded RNG, from
//! the ops that could complete now (their descriptor polls ready with a zero timeout, their
//! process has exited, their timeout is due), and then performs it with a real non-blocking
//! syscall: a receive of a seeded length (short reads), a send of a seeded prefix (short sends),
//! a multishot receive into a provided buffer or `ENOBUFS` when none is free (or when the seed
//! says so), a cancel that either wins or loses its race with the op it names. So the engine's
//! own syscalls (peer credentials, shutdown, close, sealing) keep working, and a seed replays.
//!
//! It also checks the ownership contract of `op.rs` from the outside: a fixed op must name a
//! registered buffer and stay inside it, and an op's descriptor must still be open when the op
//! is carried out.
//!
//! Processes: simulated workers have pids from [`PID_BASE`], above the kernel's
//! `PID_MAX_LIMIT` (2^22), so no real process can have one. `process::signal_worker` routes
//! their signals to [`record_signal`]; the harness reads them ([`take_signals`]) and, when its
//! model dies, calls [`exit`], after which that pid's `WaitId` can complete.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::op::{Op, Sqe, Target};
use super::{Completion, Errno, ProvidedBuffers, Token};

/// The first simulated pid: above `PID_MAX_LIMIT` (4 194 304), which no kernel exceeds.
pub const PID_BASE: i32 = 1 << 30;

/// The kernel's CQE flags (`io_uring.h`): a provided buffer was used (its id in the upper 16
/// bits), and a multishot op stays armed.
const CQE_F_BUFFER: u32 = 1;
const CQE_F_MORE: u32 = 2;
const CQE_BUFFER_SHIFT: u32 = 16;

/// A small seeded RNG (splitmix64): no dependency, the same sequence for the same seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A length in `1..=len`, `len` itself unless the seed makes it short (`short_percent`).
    pub fn length(&mut self, len: u32, short_percent: u64) -> u32 {
        if len > 1 && self.chance(short_percent) {
            1 + self.below(len as u64 - 1) as u32
        } else {
            len
        }
    }
}

/// How often the double makes an op come out the hard way (percentages).
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// A receive or send moves fewer bytes than it could.
    pub short_percent: u64,
    /// A multishot receive ends with `ENOBUFS` although a buffer is free.
    pub enobufs_percent: u64,
    /// A cancel loses its race: the op it names completes first (when it can).
    pub cancel_loses_percent: u64,
}

/// What happened to simulated processes: the signals the engine sent, and which have exited
/// (with the `si_code` and status their `WaitId` reports). One per thread: a simulation runs
/// on one thread, and tests on other threads have their own.
#[derive(Default)]
struct Processes {
    signals: Vec<(i32, i32)>,
    exited: HashMap<i32, (i32, i32)>,
}

thread_local! {
    static PROCESSES: RefCell<Processes> = RefCell::default();
}

/// A pid only the simulation hands out.
pub fn is_sim_pid(pid: i32) -> bool {
    pid >= PID_BASE
}

/// The engine signalled simulated worker `pid` (see `process::signal_worker`).
pub fn record_signal(pid: i32, signal: i32) {
    PROCESSES.with(|p| p.borrow_mut().signals.push((pid, signal)));
}

/// The signals sent since the last call, oldest first.
pub fn take_signals() -> Vec<(i32, i32)> {
    PROCESSES.with(|p| std::mem::take(&mut p.borrow_mut().signals))
}

/// Simulated worker `pid` has ended (`si_code` `CLD_EXITED` with `status` its exit code, or
/// `CLD_KILLED` with the signal): its `WaitId` may complete now.
pub fn exit(pid: i32, si_code: i32, status: i32) {
    assert!(is_sim_pid(pid));
    PROCESSES.with(|p| p.borrow_mut().exited.insert(pid, (si_code, status)));
}

/// Forget every simulated process (a new run on this thread).
pub fn reset_processes() {
    PROCESSES.with(|p| *p.borrow_mut() = Processes::default());
}

/// The provided buffers handed back by the engine, which multishot receives take from.
#[derive(Clone, Default)]
pub struct FreeBuffers(Rc<RefCell<VecDeque<u16>>>);

impl FreeBuffers {
    pub(super) fn give_back(&self, bid: u16) {
        let mut free = self.0.borrow_mut();
        assert!(
            !free.contains(&bid),
            "provided buffer {bid} handed back twice"
        );
        free.push_back(bid);
    }
}

/// One op submitted and not completed yet.
struct Pending {
    op: Op,
    token: Token,
    /// Linked to the previous op (`push_linked_pair`): it may start only once that one has
    /// succeeded fully, and is cancelled when it did not.
    after: Option<u64>,
    /// Its own number, for the link.
    number: u64,
    /// When a timeout fires.
    due: Option<Instant>,
}

#[derive(Default)]
struct State {
    pending: Vec<Pending>,
    ready: VecDeque<Completion>,
    /// The ring's registered files (the double holds its own duplicate, as the kernel holds
    /// its own reference) and buffers (base address and length).
    files: HashMap<u32, OwnedFd>,
    buffers: HashMap<u16, (usize, usize)>,
    provided: Option<(FreeBuffers, usize)>,
    next_number: u64,
    /// The last op pushed was linked: the next one waits for it.
    link_from: Option<u64>,
    now: Option<Instant>,
    closed: bool,
    /// Ops carried out, and completions by how they came out (for the coverage summary).
    completed: u64,
    outcomes: std::collections::BTreeMap<&'static str, u64>,
}

/// The double itself, owned by the core as its `Ring`.
pub struct SimRing {
    state: Rc<RefCell<State>>,
}

/// The harness's side of the double.
#[derive(Clone)]
pub struct SimHandle {
    state: Rc<RefCell<State>>,
    faults: Faults,
}

/// A double and the harness's handle on it.
pub fn pair(faults: Faults) -> (SimRing, SimHandle) {
    let state: Rc<RefCell<State>> = Rc::default();
    let ring = SimRing {
        state: Rc::clone(&state),
    };
    (ring, SimHandle { state, faults })
}

impl SimRing {
    pub fn push(&mut self, sqe: Sqe) {
        let mut state = self.state.borrow_mut();
        assert!(!state.closed, "an op pushed to a closed ring");
        let due = match sqe.op {
            Op::Timeout { timespec } => {
                // SAFETY: the op's contract: `timespec` stays allocated until the completion
                // (read here, at submission, as the kernel does).
                let spec = unsafe { &*timespec.cast::<libc::timespec>() };
                let after = Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32);
                Some(state.now.expect("the harness set the clock") + after)
            }
            _ => None,
        };
        let number = state.next_number;
        state.next_number += 1;
        let after = state.link_from.take();
        state.pending.push(Pending {
            op: sqe.op,
            token: sqe.token,
            after,
            number,
            due,
        });
        if sqe.linked {
            state.link_from = Some(number);
        }
    }

    pub fn push_linked_pair(&mut self, first: Sqe, second: Sqe) {
        self.push(first.linked());
        self.push(second);
    }

    pub fn submit(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    pub fn submit_and_wait(&mut self, _timeout: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }

    pub fn poll(&mut self) -> std::io::Result<bool> {
        Ok(!self.state.borrow().ready.is_empty())
    }

    pub fn drain(&mut self, out: &mut Vec<Completion>, max: usize) {
        out.clear();
        let mut state = self.state.borrow_mut();
        while out.len() < max {
            let Some(completion) = state.ready.pop_front() else {
                break;
            };
            out.push(completion);
        }
    }

    pub fn register_buffer_table(&self, wanted: u32) -> Vec<u16> {
        (0..wanted as u16).rev().collect()
    }

    pub fn register_buffer(&self, index: u16, slot: &crate::shm::Slot) -> std::io::Result<()> {
        let iovec = slot.as_iovec();
        let entry = (iovec.iov_base as usize, iovec.iov_len);
        self.state.borrow_mut().buffers.insert(index, entry);
        Ok(())
    }

    pub fn unregister_buffer(&self, index: u16) -> std::io::Result<()> {
        self.state.borrow_mut().buffers.remove(&index);
        Ok(())
    }

    pub fn register_file_table(&self, entries: u32) -> Vec<u32> {
        (0..entries.saturating_add(64)).rev().collect()
    }

    pub fn register_file(&self, index: u32, fd: RawFd) -> std::io::Result<()> {
        // SAFETY: the engine passes a descriptor it owns and keeps open for this call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let duplicate = borrowed.try_clone_to_owned()?;
        self.state.borrow_mut().files.insert(index, duplicate);
        Ok(())
    }

    pub fn unregister_file(&self, index: u32) -> std::io::Result<()> {
        let removed = self.state.borrow_mut().files.remove(&index);
        assert!(removed.is_some(), "file {index} unregistered twice");
        Ok(())
    }

    pub fn provided_buffers(&self, entries: u32) -> Option<ProvidedBuffers> {
        if entries == 0 {
            return None;
        }
        let free = FreeBuffers::default();
        let mut buffers = ProvidedBuffers::simulated(entries, free.clone());
        let base = buffers.base() as usize;
        self.state.borrow_mut().provided = Some((free, base));
        Some(buffers)
    }

    pub fn close(&mut self) {
        let mut state = self.state.borrow_mut();
        state.closed = true;
        state.pending.clear();
        state.ready.clear();
        state.files.clear();
    }
}

/// How an op came out when the double tried it.
enum Outcome {
    /// It cannot complete now (nothing to read, no room): it stays pending.
    NotYet,
    /// It completed with this result and these CQE flags; `more`: a multishot op stays armed.
    Done {
        result: Result<u32, Errno>,
        flags: u32,
        more: bool,
    },
}

fn done(result: Result<u32, Errno>) -> Outcome {
    Outcome::Done {
        result,
        flags: 0,
        more: false,
    }
}

/// What a syscall returned, as a completion's result (`EAGAIN` as `None`: try later).
fn syscall_result(returned: isize) -> Option<Result<u32, Errno>> {
    if returned >= 0 {
        return Some(Ok(returned as u32));
    }
    let errno = std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO);
    match errno {
        libc::EAGAIN => None,
        errno => Some(Err(Errno::from_raw_os_error(errno))),
    }
}

/// Readiness of `fd` now (`poll` with a zero timeout): its `revents`. Panics on a closed
/// descriptor: the engine must keep an op's descriptor open until its completion.
fn revents(fd: RawFd, events: i16) -> i16 {
    let mut fds = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    // SAFETY: poll(2) on one pollfd on our stack, not waiting.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    assert!(n >= 0, "poll failed: {}", std::io::Error::last_os_error());
    assert!(
        fds[0].revents & libc::POLLNVAL == 0,
        "an op's descriptor {fd} was closed while the op was in flight"
    );
    fds[0].revents
}

fn readable(fd: RawFd) -> bool {
    let wanted = libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
    revents(fd, libc::POLLIN | libc::POLLRDHUP) & wanted != 0
}

fn writable(fd: RawFd) -> bool {
    let wanted = libc::POLLOUT | libc::POLLHUP | libc::POLLERR;
    revents(fd, libc::POLLOUT) & wanted != 0
}

impl State {
    fn fd(&self, target: Target) -> RawFd {
        match target {
            Target::Fd(fd) => fd,
            Target::Fixed(index) => self
                .files
                .get(&index)
                .unwrap_or_else(|| panic!("an op names file {index}, which is not registered"))
                .as_raw_fd(),
        }
    }

    /// A fixed op's memory must lie inside the registered buffer it names.
    fn check_fixed(&self, index: u16, buf: usize, len: u32) {
        let (base, size) = *self
            .buffers
            .get(&index)
            .unwrap_or_else(|| panic!("a fixed op names buffer {index}, which is not registered"));
        assert!(
            buf >= base && buf + len as usize <= base + size,
            "a fixed op of {len} bytes at {buf:#x} outside buffer {index} ({size} bytes at {base:#x})"
        );
    }

    /// Whether op `at` could complete now.
    fn could_complete(&self, at: usize) -> bool {
        let pending = &self.pending[at];
        if pending.after.is_some() {
            return false;
        }
        match pending.op {
            Op::Cancel { .. } => true,
            Op::Timeout { .. } => pending.due.is_some_and(|due| Some(due) <= self.now),
            Op::WaitId { pid, .. } => PROCESSES.with(|p| p.borrow().exited.contains_key(&pid)),
            // The simulation reaps by WaitId only (see `reap.rs`).
            Op::PollExit { .. } => false,
            Op::AcceptMulti { listener } => readable(listener),
            Op::Recv { target, .. }
            | Op::RecvMulti { target }
            | Op::ReadFixed { target, .. }
            | Op::PollReadable { target } => readable(self.fd(target)),
            Op::Read { fd, .. } => readable(fd),
            // Without room, a non-blocking send or a NOWAIT write completes with EAGAIN.
            Op::WriteFixed { .. } => true,
            Op::Send { target, flags, .. } => {
                flags & libc::MSG_DONTWAIT != 0 || writable(self.fd(target))
            }
            Op::Write { fd, .. } => writable(fd),
        }
    }

    /// Carry out op `at` (which could complete) with the seed's choices.
    fn perform(&mut self, at: usize, rng: &mut Rng, faults: &Faults) -> Outcome {
        let op = self.pending[at].op;
        let short = faults.short_percent;
        match op {
            Op::Cancel { .. } | Op::Timeout { .. } => unreachable!("handled by the step"),
            Op::PollExit { .. } => Outcome::NotYet,
            Op::WaitId { pid, info } => {
                let (code, status) = PROCESSES
                    .with(|p| p.borrow_mut().exited.remove(&pid))
                    .expect("could complete");
                // SAFETY: the op's contract: `info` stays allocated until the completion.
                unsafe { fill_siginfo(info, pid, code, status) };
                done(Ok(0))
            }
            Op::AcceptMulti { listener } => {
                // SAFETY: accept4(2) on the listener the op names, kept open while armed.
                let fd = unsafe {
                    libc::accept4(
                        listener,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                match syscall_result(fd as isize) {
                    None => Outcome::NotYet,
                    Some(result) => Outcome::Done {
                        more: result.is_ok(),
                        flags: if result.is_ok() { CQE_F_MORE } else { 0 },
                        result,
                    },
                }
            }
            Op::Recv { target, buf, len } => self.receive(target, buf, rng.length(len, short)),
            Op::ReadFixed {
                target,
                buf,
                len,
                index,
            } => {
                self.check_fixed(index, buf as usize, len);
                self.receive(target, buf, rng.length(len, short))
            }
            Op::RecvMulti { target } => self.receive_multi(target, rng, faults),
            Op::PollReadable { target } => {
                let events = libc::POLLIN | libc::POLLRDHUP;
                done(Ok(revents(self.fd(target), events) as u16 as u32))
            }
            Op::Read { fd, buf, len } => {
                // SAFETY: the op's contract: `buf` is `len` writable bytes until completion.
                let n = unsafe { libc::read(fd, buf.cast(), len as usize) };
                syscall_result(n).map_or(Outcome::NotYet, done)
            }
            Op::Send {
                target,
                buf,
                len,
                flags,
            } => self.send(target, buf, rng.length(len, short), flags),
            Op::WriteFixed {
                target,
                buf,
                len,
                index,
            } => {
                self.check_fixed(index, buf as usize, len);
                let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
                self.send(target, buf, rng.length(len, short), flags)
            }
            Op::Write { fd, buf, len } => {
                // SAFETY: the op's contract: `buf` is `len` readable bytes until completion.
                let n = unsafe { libc::write(fd, buf.cast(), len as usize) };
                syscall_result(n).map_or(Outcome::NotYet, done)
            }
        }
    }

    fn receive(&self, target: Target, buf: *mut u8, len: u32) -> Outcome {
        // SAFETY: the op's contract: `buf` is at least `len` writable bytes, owned by the op
        // until its completion.
        let n = unsafe {
            libc::recv(
                self.fd(target),
                buf.cast(),
                len as usize,
                libc::MSG_DONTWAIT,
            )
        };
        syscall_result(n).map_or(Outcome::NotYet, done)
    }

    fn send(&self, target: Target, buf: *const u8, len: u32, flags: i32) -> Outcome {
        let dontwait = flags & libc::MSG_DONTWAIT != 0;
        // (MSG_WAITALL means nothing to send(2); a short result breaks a link below.)
        let flags = (flags & !libc::MSG_WAITALL) | libc::MSG_DONTWAIT;
        // SAFETY: the op's contract: `buf` is at least `len` readable bytes, unchanged until
        // the completion.
        let n = unsafe { libc::send(self.fd(target), buf.cast(), len as usize, flags) };
        match syscall_result(n) {
            Some(result) => done(result),
            None if dontwait => done(Err(Errno::AGAIN)),
            None => Outcome::NotYet,
        }
    }

    fn receive_multi(&mut self, target: Target, rng: &mut Rng, faults: &Faults) -> Outcome {
        let (free, base) = self
            .provided
            .clone()
            .expect("a multishot receive without provided buffers");
        let bid = free.0.borrow_mut().pop_front();
        let Some(bid) = bid.filter(|_| !rng.chance(faults.enobufs_percent)) else {
            if let Some(bid) = bid {
                free.0.borrow_mut().push_front(bid);
            }
            return done(Err(Errno::NOBUFS));
        };
        let bytes = super::PROVIDED_BUFFER_BYTES as u32;
        let buf = (base + bid as usize * bytes as usize) as *mut u8;
        match self.receive(target, buf, rng.length(bytes, faults.short_percent)) {
            Outcome::Done {
                result: Ok(n @ 1..),
                ..
            } => Outcome::Done {
                result: Ok(n),
                flags: CQE_F_BUFFER | (bid as u32) << CQE_BUFFER_SHIFT | CQE_F_MORE,
                more: true,
            },
            outcome => {
                // Nothing received into it (end of file, an error, nothing yet): it stays free.
                free.0.borrow_mut().push_front(bid);
                outcome
            }
        }
    }

    fn note(&mut self, outcome: &'static str) {
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn complete(&mut self, token: Token, result: Result<u32, Errno>, flags: u32) {
        self.completed += 1;
        match result {
            Err(Errno::NOBUFS) => self.note("ring_enobufs"),
            Err(Errno::AGAIN) => self.note("ring_eagain"),
            _ => {}
        }
        self.ready.push_back(Completion {
            user_data: token.encode(),
            result,
            flags,
        });
    }

    /// Op `at` completed (one-shot, or a multishot's last): take it out; an op linked to it
    /// starts only if it succeeded fully, else it completes `ECANCELED` at once.
    fn retire(&mut self, at: usize, full_success: bool) {
        let number = self.pending.remove(at).number;
        let Some(next) = self.pending.iter().position(|p| p.after == Some(number)) else {
            return;
        };
        if full_success {
            self.pending[next].after = None;
        } else {
            self.note("ring_link_broken");
            let token = self.pending.remove(next).token;
            self.complete(token, Err(Errno::CANCELED), 0);
        }
    }

    /// Cancel op `at` now: it completes `ECANCELED` (and its linked successor with it).
    fn cancel_now(&mut self, at: usize) {
        let token = self.pending[at].token;
        self.complete(token, Err(Errno::CANCELED), 0);
        self.retire(at, false);
    }

    /// Carry out op `at` if it can complete; false when it could not after all.
    fn try_complete(&mut self, at: usize, rng: &mut Rng, faults: &Faults) -> bool {
        if let Op::Timeout { .. } = self.pending[at].op {
            let token = self.pending[at].token;
            self.complete(token, Err(Errno::TIME), 0);
            self.retire(at, false);
            return true;
        }
        let wanted = match self.pending[at].op {
            Op::Send { len, .. } | Op::WriteFixed { len, .. } => Some(len),
            _ => None,
        };
        match self.perform(at, rng, faults) {
            Outcome::NotYet => false,
            Outcome::Done {
                result,
                flags,
                more,
            } => {
                if result.is_ok_and(|n| wanted.is_some_and(|len| n < len)) {
                    self.note("ring_short_send");
                }
                let token = self.pending[at].token;
                self.complete(token, result, flags);
                if !more {
                    let full = result.is_ok_and(|n| wanted.is_none_or(|len| n == len));
                    self.retire(at, full);
                }
                true
            }
        }
    }

    /// A cancel of the op whose `user_data` is `target`: it wins (the op completes
    /// `ECANCELED`), or it loses the race (the op completes on its own first, if it can), or
    /// the op is not there (`ENOENT`).
    fn cancel(&mut self, at: usize, target: u64, rng: &mut Rng, faults: &Faults) {
        let token = self.pending[at].token;
        self.pending.remove(at);
        let find = |state: &State| {
            state
                .pending
                .iter()
                .position(|p| p.token.encode() == target)
        };
        let Some(victim) = find(self) else {
            return self.complete(token, Err(Errno::NOENT), 0);
        };
        if rng.chance(faults.cancel_loses_percent)
            && self.could_complete(victim)
            && self.try_complete(victim, rng, faults)
        {
            // Completed first; a multishot op is still armed and is cancelled after all.
            self.note("ring_cancel_lost");
            let Some(victim) = find(self) else {
                return self.complete(token, Err(Errno::NOENT), 0);
            };
            self.cancel_now(victim);
        } else {
            self.note("ring_cancel_won");
            self.cancel_now(victim);
        }
        self.complete(token, Ok(0), 0);
    }
}

/// Fill a `siginfo_t` as `waitid(2)` does for a child that ended.
///
/// # Safety
/// `info` points to a live, writable `siginfo_t`.
unsafe fn fill_siginfo(info: *mut libc::siginfo_t, pid: i32, code: i32, status: i32) {
    /// The SIGCHLD member of the kernel's `siginfo_t` (after three ints and, on 64-bit,
    /// the union's alignment padding).
    #[repr(C)]
    struct Child {
        signo: i32,
        errno: i32,
        code: i32,
        pad: i32,
        pid: i32,
        uid: u32,
        status: i32,
    }
    const _: () = assert!(std::mem::size_of::<Child>() <= std::mem::size_of::<libc::siginfo_t>());
    // SAFETY: the caller's promise; `Child` is plain data that fits inside a siginfo_t.
    unsafe {
        std::ptr::write_bytes(info, 0, 1);
        let child = info.cast::<Child>();
        (*child).signo = libc::SIGCHLD;
        (*child).code = code;
        (*child).pid = pid;
        (*child).status = status;
    }
}

impl SimHandle {
    /// Set the clock the double's timeouts run on (before each turn of the core).
    pub fn set_now(&self, now: Instant) {
        self.state.borrow_mut().now = Some(now);
    }

    /// Complete one op the seed picks among those that can complete now; `None` when none can.
    /// Returns a line for the trace.
    pub fn step(&self, rng: &mut Rng) -> Option<String> {
        let mut state = self.state.borrow_mut();
        let mut candidates: Vec<usize> = (0..state.pending.len())
            .filter(|&at| state.could_complete(at))
            .collect();
        while !candidates.is_empty() {
            let pick = rng.below(candidates.len() as u64) as usize;
            let at = candidates.swap_remove(pick);
            let (op, token) = (state.pending[at].op, state.pending[at].token);
            let before = state.ready.len();
            if let Op::Cancel { target } = op {
                state.cancel(at, target, rng, &self.faults);
            } else if !state.try_complete(at, rng, &self.faults) {
                continue;
            }
            let results: Vec<String> = state
                .ready
                .iter()
                .skip(before)
                .map(|c| {
                    format!(
                        "{:?}={}",
                        Token::decode(c.user_data).map(|t| t.kind),
                        super::raw_result(c.result)
                    )
                })
                .collect();
            return Some(format!(
                "{:?} #{}/{}: {}",
                token.kind,
                token.index,
                token.generation,
                results.join(" ")
            ));
        }
        None
    }

    /// When the next timeout op is due, if one is pending.
    pub fn next_due(&self) -> Option<Instant> {
        self.state
            .borrow()
            .pending
            .iter()
            .filter_map(|p| p.due)
            .min()
    }

    /// Completions waiting for the core to drain them.
    pub fn completions_waiting(&self) -> usize {
        self.state.borrow().ready.len()
    }

    /// Ops in flight (submitted, not completed), by kind, for the end-of-run checks.
    pub fn pending_kinds(&self) -> Vec<super::OpKind> {
        self.state
            .borrow()
            .pending
            .iter()
            .map(|p| p.token.kind)
            .collect()
    }

    /// Whether a caller's payload is being read into memory in `[base, base + len)` now (a
    /// `ConnRecvSlot` op in flight there): what a hostile worker watching its slot would see.
    pub fn reading_into(&self, base: usize, len: usize) -> bool {
        self.state.borrow().pending.iter().any(|p| {
            let buf = match p.op {
                Op::Recv { buf, .. } | Op::ReadFixed { buf, .. } => buf as usize,
                _ => return false,
            };
            p.token.kind == super::OpKind::ConnRecvSlot && buf >= base && buf < base + len
        })
    }

    /// Registered files now.
    pub fn files_registered(&self) -> usize {
        self.state.borrow().files.len()
    }

    /// Provided buffers handed back (free) now.
    pub fn provided_free(&self) -> usize {
        let state = self.state.borrow();
        state
            .provided
            .as_ref()
            .map_or(0, |(free, _)| free.0.borrow().len())
    }

    /// Completions so far by how they came out: short transfers, `ENOBUFS`, cancels won and
    /// lost, links broken.
    pub fn completions_by_kind(&self) -> Vec<(&'static str, u64)> {
        let state = self.state.borrow();
        state.outcomes.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Ops completed so far.
    pub fn completed(&self) -> u64 {
        self.state.borrow().completed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_siginfo_reads_back_as_waitid_wrote_it() {
        // Proves the double's exit status is what `describe_exit` and `si_pid` read.
        // SAFETY: siginfo_t is plain data.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a live siginfo_t on the stack.
        unsafe { fill_siginfo(&mut info, PID_BASE + 7, libc::CLD_KILLED, 9) };
        assert_eq!(info.si_code, libc::CLD_KILLED);
        // SAFETY: filled as for a CLD_* event.
        assert_eq!(
            unsafe { (info.si_pid(), info.si_status()) },
            (PID_BASE + 7, 9)
        );
    }

    #[test]
    fn the_rng_replays_and_spreads() {
        // Proves a seed gives one sequence (replay) and different seeds differ.
        let (mut a, mut b, mut c) = (Rng::new(3), Rng::new(3), Rng::new(4));
        let first: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_eq!(first, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(first, (0..8).map(|_| c.next_u64()).collect::<Vec<_>>());
    }
}
