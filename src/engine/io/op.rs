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

/// An entry ready for the submission queue, built only by this module's constructors.
pub struct Sqe(pub(super) squeue::Entry);

impl Sqe {
    /// Link the next entry pushed to this one (it starts only if this one succeeds fully).
    pub fn linked(self) -> Sqe {
        Sqe(self.0.flags(squeue::Flags::IO_LINK))
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

fn tagged(entry: squeue::Entry, token: Token) -> Sqe {
    Sqe(entry.user_data(token.encode()))
}

/// Accept connections on a listening socket until cancelled (one completion per connection,
/// each a new descriptor the engine then owns). Contract: the listener stays open while armed.
pub fn accept_multi(listener: &OwnedFd, token: Token) -> Sqe {
    let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .flags(libc::SOCK_CLOEXEC)
        .build();
    tagged(entry, token)
}

/// Receive into `buf`. Contract: `buf` stays allocated, unmoved and unread by anyone else until
/// the completion (a connection's or worker's read buffer, owned while its receive is armed).
pub fn recv(target: Target, buf: &mut [u8], token: Token) -> Sqe {
    let (at, len) = (buf.as_mut_ptr(), buf.len().min(u32::MAX as usize) as u32);
    tagged(
        on_target!(target, |fd| opcode::Recv::new(fd, at, len).build()),
        token,
    )
}

/// Receive until cancelled, each completion into a buffer the kernel picks from the core's
/// provided buffers (`PROVIDED_GROUP`). Contract: the provided buffers outlive the ring.
pub fn recv_multi(target: Target, token: Token) -> Sqe {
    let entry = on_target!(target, |fd| opcode::RecvMulti::new(fd, PROVIDED_GROUP)
        .build());
    tagged(entry, token)
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
    let at = slot.data_address_mut(offset as usize);
    let entry = match fixed {
        Some(buffer) => on_target!(target, |fd| opcode::ReadFixed::new(fd, at, len, buffer)
            .offset(u64::MAX)
            .build()),
        None => on_target!(target, |fd| opcode::Recv::new(fd, at, len).build()),
    };
    tagged(entry, token)
}

/// Send `buf` (without SIGPIPE; `extra_flags` are added, e.g. `MSG_DONTWAIT`). Contract: `buf`
/// stays allocated and unchanged until the completion (a `SendQueue`'s front chunk, which
/// never moves while a send is in flight).
pub fn send(target: Target, buf: &[u8], extra_flags: i32, token: Token) -> Sqe {
    let (at, len) = (buf.as_ptr(), buf.len().min(u32::MAX as usize) as u32);
    let entry = on_target!(target, |fd| opcode::Send::new(fd, at, len)
        .flags(libc::MSG_NOSIGNAL | extra_flags)
        .build());
    tagged(entry, token)
}

/// Write the first `len` bytes of `slot`'s data area (registered as buffer `fixed`) to the
/// socket, not waiting for room (`RWF_NOWAIT`). Panics when `len` is over the capacity.
/// Contract: the slot stays mapped and that range unchanged until the completion (its worker's
/// `SlotUse::Lent`).
pub fn write_from_slot(target: Target, slot: &Slot, len: u32, fixed: u16, token: Token) -> Sqe {
    assert!(len <= slot.capacity(), "a send of {len} bytes from a slot");
    let at = slot.data_address(0);
    let entry = on_target!(target, |fd| opcode::WriteFixed::new(fd, at, len, fixed)
        .offset(u64::MAX)
        .rw_flags(libc::RWF_NOWAIT)
        .build());
    tagged(entry, token)
}

/// Read from a pipe, eventfd or signalfd into `buf`. Contract: as [`recv`].
pub fn read(fd: RawFd, buf: &mut [u8], token: Token) -> Sqe {
    let (at, len) = (buf.as_mut_ptr(), buf.len().min(u32::MAX as usize) as u32);
    let entry = opcode::Read::new(types::Fd(fd), at, len)
        .offset(u64::MAX)
        .build();
    tagged(entry, token)
}

/// Write `buf` to an eventfd (or pipe). `buf` is `'static`: nothing to keep alive.
pub fn write_static(fd: RawFd, buf: &'static [u8], token: Token) -> Sqe {
    let entry = opcode::Write::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
        .offset(u64::MAX)
        .build();
    tagged(entry, token)
}

/// Wait for child `pid` to exit, filling `info`. Contract: `info` stays allocated until the
/// completion (a worker's boxed siginfo, kept while its wait is in flight).
pub fn waitid(pid: i32, info: &mut libc::siginfo_t, token: Token) -> Sqe {
    let info: *mut libc::siginfo_t = info;
    let entry = opcode::WaitId::new(libc::P_PID, pid as libc::id_t, libc::WEXITED)
        .infop(info.cast_const())
        .build();
    tagged(entry, token)
}

/// Cancel the op whose `user_data` is `target`'s. Names no memory.
pub fn cancel(target: Token, token: Token) -> Sqe {
    tagged(opcode::AsyncCancel::new(target.encode()).build(), token)
}
