//! One constructor per op kind the engine submits. Each takes the memory and descriptor the op
//! names and returns an [`Sqe`], and each states its **ownership contract**: what the caller's
//! owner (a connection, a worker, the core) must keep alive and unmoved until the op's
//! completion arrives, even after a cancel. The engine keeps the contract with its state
//! machines (a connection's `Recv`, a worker's in-flight state, `SlotUse`): an owner is freed
//! only once no op of its is in flight, which `check_invariants` watches in debug builds.
//!
//! These are safe functions because the pointer is only handed to the kernel, never
//! dereferenced here; the contract is what makes the kernel's later use of it sound, and the
//! `// SAFETY:` in [`super::Ring::push`] rests on it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types};

use super::{Token, PROVIDED_GROUP};
use crate::shm::Slot;

/// Build an op on a [`Target`] (the two descriptor kinds are different types to the builders).
macro_rules! on_target {
    ($target:expr, |$fd:ident| $build:expr) => {
        match $target {
            Target::Fd(fd) => {
                let $fd = types::Fd(fd);
                $build
            }
            Target::Fixed(index) => {
                let $fd = types::Fixed(index);
                $build
            }
        }
    };
}

/// An op ready for the submission queue, built only by this module's constructors: a plain
/// description of what the kernel is asked to do (and with which memory), its token, and whether
/// the next op is linked to it. `Ring::push` turns it into the kernel's entry; a test double of
/// the ring can carry it out itself.
#[derive(Debug)]
pub struct Sqe {
    pub(super) op: Op,
    pub(super) token: Token,
    pub(super) linked: bool,
}

/// What an op does. The pointers name memory whose owner keeps the op's contract (above).
#[derive(Debug, Clone, Copy)]
pub(super) enum Op {
    AcceptMulti {
        listener: RawFd,
    },
    Recv {
        target: Target,
        buf: *mut u8,
        len: u32,
    },
    RecvMulti {
        target: Target,
    },
    PollReadable {
        target: Target,
    },
    ReadFixed {
        target: Target,
        buf: *mut u8,
        len: u32,
        index: u16,
    },
    Send {
        target: Target,
        buf: *const u8,
        len: u32,
        flags: i32,
    },
    WriteFixed {
        target: Target,
        buf: *const u8,
        len: u32,
        index: u16,
    },
    Read {
        fd: RawFd,
        buf: *mut u8,
        len: u32,
    },
    Write {
        fd: RawFd,
        buf: *const u8,
        len: u32,
    },
    WaitId {
        pid: i32,
        info: *mut libc::siginfo_t,
    },
    PollExit {
        pidfd: RawFd,
    },
    Timeout {
        timespec: *const types::Timespec,
    },
    Cancel {
        target: u64,
    },
}

impl Sqe {
    /// Link the next entry pushed to this one (it starts only if this one succeeds fully).
    pub fn linked(self) -> Sqe {
        Sqe {
            linked: true,
            ..self
        }
    }

    /// The kernel's submission entry for this op.
    pub(super) fn entry(&self) -> squeue::Entry {
        let entry = match self.op {
            Op::AcceptMulti { listener } => opcode::AcceptMulti::new(types::Fd(listener))
                .flags(libc::SOCK_CLOEXEC)
                .build(),
            Op::Recv { target, buf, len } => {
                on_target!(target, |fd| opcode::Recv::new(fd, buf, len).build())
            }
            Op::RecvMulti { target } => {
                on_target!(target, |fd| opcode::RecvMulti::new(fd, PROVIDED_GROUP)
                    .build())
            }
            Op::PollReadable { target } => {
                on_target!(target, |fd| opcode::PollAdd::new(
                    fd,
                    (libc::POLLIN | libc::POLLRDHUP) as u32
                )
                .build())
            }
            Op::ReadFixed {
                target,
                buf,
                len,
                index,
            } => on_target!(target, |fd| opcode::ReadFixed::new(fd, buf, len, index)
                .offset(u64::MAX)
                .build()),
            Op::Send {
                target,
                buf,
                len,
                flags,
            } => on_target!(target, |fd| opcode::Send::new(fd, buf, len)
                .flags(flags)
                .build()),
            Op::WriteFixed {
                target,
                buf,
                len,
                index,
            } => on_target!(target, |fd| opcode::WriteFixed::new(fd, buf, len, index)
                .offset(u64::MAX)
                .rw_flags(libc::RWF_NOWAIT)
                .build()),
            Op::Read { fd, buf, len } => opcode::Read::new(types::Fd(fd), buf, len)
                .offset(u64::MAX)
                .build(),
            Op::Write { fd, buf, len } => opcode::Write::new(types::Fd(fd), buf, len)
                .offset(u64::MAX)
                .build(),
            Op::WaitId { pid, info } => {
                opcode::WaitId::new(libc::P_PID, pid as libc::id_t, libc::WEXITED)
                    .infop(info.cast_const())
                    .build()
            }
            Op::PollExit { pidfd } => {
                opcode::PollAdd::new(types::Fd(pidfd), libc::POLLIN as u32).build()
            }
            Op::Timeout { timespec } => opcode::Timeout::new(timespec).build(),
            Op::Cancel { target } => opcode::AsyncCancel::new(target).build(),
        };
        let entry = entry.user_data(self.token.encode());
        if self.linked {
            entry.flags(squeue::Flags::IO_LINK)
        } else {
            entry
        }
    }
}

/// A descriptor as an op names it: registered in the ring's file table when there was room
/// (the kernel then skips looking the descriptor up on every op), else plain.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Fd(RawFd),
    Fixed(u32),
}

impl Target {
    pub fn of(fd: &OwnedFd, file: Option<u32>) -> Target {
        match file {
            Some(index) => Target::Fixed(index),
            None => Target::Fd(fd.as_raw_fd()),
        }
    }
}

fn sqe(op: Op, token: Token) -> Sqe {
    Sqe {
        op,
        token,
        linked: false,
    }
}

/// Accept connections on a listening socket until cancelled (one completion per connection,
/// each a new descriptor the engine then owns). Contract: the listener stays open while armed.
pub fn accept_multi(listener: &OwnedFd, token: Token) -> Sqe {
    let listener = listener.as_raw_fd();
    sqe(Op::AcceptMulti { listener }, token)
}

/// Receive into `buf`. Contract: `buf` stays allocated, unmoved and unread by anyone else until
/// the completion (a connection's or worker's read buffer, owned while its receive is armed).
pub fn recv(target: Target, buf: &mut [u8], token: Token) -> Sqe {
    let (buf, len) = (buf.as_mut_ptr(), buf.len().min(u32::MAX as usize) as u32);
    sqe(Op::Recv { target, buf, len }, token)
}

/// Complete once the socket has bytes to read (or its peer has gone): one-shot and
/// level-triggered, so it completes at once when bytes are waiting already. Contract: none
/// beyond the descriptor's (it names no memory).
pub fn poll_readable(target: Target, token: Token) -> Sqe {
    sqe(Op::PollReadable { target }, token)
}

/// Receive until cancelled, each completion into a buffer the kernel picks from the core's
/// provided buffers (`PROVIDED_GROUP`). Contract: the provided buffers outlive the ring.
pub fn recv_multi(target: Target, token: Token) -> Sqe {
    sqe(Op::RecvMulti { target }, token)
}

/// Receive `len` bytes of a caller's payload into `slot`'s data area at `offset`: a fixed read
/// when the slot is registered as buffer `fixed`, a plain receive otherwise. Panics when the
/// range is outside the data area. Contract: the slot stays mapped, and no one but this op
/// writes that range, until the completion (its worker's `SlotUse::Filling`).
pub fn read_into_slot(
    target: Target,
    slot: &Slot,
    offset: u32,
    len: u32,
    fixed: Option<u16>,
    token: Token,
) -> Sqe {
    assert!(
        offset as u64 + len as u64 <= slot.capacity() as u64,
        "a read of {len} bytes at {offset} into a slot of {}",
        slot.capacity()
    );
    let buf = slot.data_address_mut(offset as usize);
    let op = match fixed {
        Some(index) => Op::ReadFixed {
            target,
            buf,
            len,
            index,
        },
        None => Op::Recv { target, buf, len },
    };
    sqe(op, token)
}

/// Send `buf` (without SIGPIPE; `extra_flags` are added, e.g. `MSG_DONTWAIT`). Contract: `buf`
/// stays allocated and unchanged until the completion (a `SendQueue`'s front chunk, which
/// never moves while a send is in flight).
pub fn send(target: Target, buf: &[u8], extra_flags: i32, token: Token) -> Sqe {
    let (buf, len) = (buf.as_ptr(), buf.len().min(u32::MAX as usize) as u32);
    let flags = libc::MSG_NOSIGNAL | extra_flags;
    sqe(
        Op::Send {
            target,
            buf,
            len,
            flags,
        },
        token,
    )
}

/// Write the first `len` bytes of `slot`'s data area (registered as buffer `fixed`) to the
/// socket, not waiting for room (`RWF_NOWAIT`). Panics when `len` is over the capacity.
/// Contract: the slot stays mapped and that range unchanged until the completion (its worker's
/// `SlotUse::Lent`).
pub fn write_from_slot(target: Target, slot: &Slot, len: u32, fixed: u16, token: Token) -> Sqe {
    assert!(len <= slot.capacity(), "a send of {len} bytes from a slot");
    let buf = slot.data_address(0);
    sqe(
        Op::WriteFixed {
            target,
            buf,
            len,
            index: fixed,
        },
        token,
    )
}

/// Read from a pipe, eventfd or signalfd into `buf`. Contract: as [`recv`].
pub fn read(fd: RawFd, buf: &mut [u8], token: Token) -> Sqe {
    let (buf, len) = (buf.as_mut_ptr(), buf.len().min(u32::MAX as usize) as u32);
    sqe(Op::Read { fd, buf, len }, token)
}

/// Write `buf` to an eventfd (or pipe). `buf` is `'static`: nothing to keep alive.
pub fn write_static(fd: RawFd, buf: &'static [u8], token: Token) -> Sqe {
    let (buf, len) = (buf.as_ptr(), buf.len() as u32);
    sqe(Op::Write { fd, buf, len }, token)
}

/// Wait for child `pid` to exit, filling `info`. Contract: `info` stays allocated until the
/// completion (a worker's boxed siginfo, kept while its wait is in flight).
pub fn waitid(pid: i32, info: &mut libc::siginfo_t, token: Token) -> Sqe {
    let info: *mut libc::siginfo_t = info;
    sqe(Op::WaitId { pid, info }, token)
}

/// Complete once the process of `pidfd` has exited (a pidfd polls readable then). One-shot.
/// Contract: the pidfd stays open until the completion (a worker's `Reap`, kept while its
/// wait is in flight).
pub fn poll_exit(pidfd: &OwnedFd, token: Token) -> Sqe {
    let pidfd = pidfd.as_raw_fd();
    sqe(Op::PollExit { pidfd }, token)
}

/// Complete after `timespec` (relative) with `ETIME`. Contract: `timespec` stays allocated
/// until the completion (a worker's boxed `Reap` memory; the kernel copies it at submission,
/// but the contract does not lean on that).
pub fn timeout(timespec: &types::Timespec, token: Token) -> Sqe {
    let timespec: *const types::Timespec = timespec;
    sqe(Op::Timeout { timespec }, token)
}

/// Cancel the op whose `user_data` is `target`'s. Names no memory.
pub fn cancel(target: Token, token: Token) -> Sqe {
    let target = target.encode();
    sqe(Op::Cancel { target }, token)
}
