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
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

mod ops;

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
    /// Connections its accepts took from a listener.
    accepted: u64,
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
                    let kind = Token::decode(c.user_data).map(|t| t.kind);
                    match (kind, c.result) {
                        // A descriptor's number depends on what else the process has open:
                        // left out, so that a seed's trace is the same in every run.
                        (Some(super::OpKind::Accept), Ok(_)) => "Accept=fd".to_string(),
                        (kind, result) => format!("{kind:?}={}", super::raw_result(result)),
                    }
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

    /// Connections accepted so far (what is left in a listener's queue never was).
    pub fn accepted(&self) -> u64 {
        self.state.borrow().accepted
    }
}

#[cfg(test)]
mod tests {
    use super::ops::fill_siginfo;
    use super::*;

    #[test]
    fn a_filled_siginfo_reads_back_as_waitid_wrote_it() {
        // Proves the double's exit status is what `reap::Exit` and `si_pid` read.
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
