//! How the double carries out one op: the readiness test (a zero-timeout poll), the real
//! non-blocking syscall with the seed's length, the completion's flags, links and cancels.

use std::os::fd::{AsRawFd, RawFd};

use super::{
    Errno, Faults, Op, Rng, State, Target, Token, CQE_BUFFER_SHIFT, CQE_F_BUFFER, CQE_F_MORE,
    PROCESSES,
};
use crate::engine::io::{Completion, PROVIDED_BUFFER_BYTES};

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
    pub(super) fn could_complete(&self, at: usize) -> bool {
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
                    Some(result) => {
                        self.accepted += u64::from(result.is_ok());
                        Outcome::Done {
                            more: result.is_ok(),
                            flags: if result.is_ok() { CQE_F_MORE } else { 0 },
                            result,
                        }
                    }
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
        let bytes = PROVIDED_BUFFER_BYTES as u32;
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
    pub(super) fn try_complete(&mut self, at: usize, rng: &mut Rng, faults: &Faults) -> bool {
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
    pub(super) fn cancel(&mut self, at: usize, target: u64, rng: &mut Rng, faults: &Faults) {
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
pub(super) unsafe fn fill_siginfo(info: *mut libc::siginfo_t, pid: i32, code: i32, status: i32) {
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
