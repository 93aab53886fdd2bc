//! The shell around the kernel's io_uring: the only code in the bridge that names `IoUring`.
//!
//! - [`Ring`]: one core's ring. Submission with a bounded retry when the queue is full, linked
//!   pairs that never straddle two submits, cancellation, waiting, draining completions, the
//!   registered-file and registered-buffer tables, and the provided-buffer ring. It is closed
//!   explicitly ([`Ring::close`], also on drop) before anything its ops may name is freed.
//! - [`op`]: one constructor per op kind, each with its ownership contract.
//! - [`Token`]: what every op's `user_data` is (op kind, owner index, owner generation).
//! - [`Completion`]: a completion with its result as `Result<u32, Errno>`.
//! - [`probe`]: the kernel floor, checked once at startup (every op, setup flag and feature
//!   used, failing with the missing one and the kernel that has it), and the reaping mode.
//! - [`Reap`]: one worker's reaping (`IORING_OP_WAITID`, or its pidfd polled on the ring).
//!
//! - [`signal_worker`]: the one place a worker is signalled (`kill(2)`).
//! - `sim` (tests only): the test double of the ring, which carries out the same [`Sqe`]s on
//!   real descriptors when the engine simulation (`engine::sim`) says so.
//!
//! The engine's state machines see only these types, never the ring; that is the seam where the
//! simulation replaces the kernel: [`Ring`] is the kernel's ring or the double (an enum whose
//! second variant exists only in test builds, so production pays one match the compiler
//! folds away), a simulated worker's reap is a `WaitId` the double completes when the model
//! dies, and its signals go to the double's record instead of `kill(2)`.

pub mod inherited;
pub mod op;
mod pbuf;
pub mod probe;
mod process;
mod reap;
#[cfg(test)]
pub mod sim;
mod token;

use std::io;
use std::time::Duration;

use io_uring::{cqueue, types, IoUring};
pub use rustix::io::Errno;

pub use op::{Sqe, Target};
pub use pbuf::{ProvidedBuffers, BUFFER_BYTES as PROVIDED_BUFFER_BYTES, GROUP as PROVIDED_GROUP};
pub use probe::check_kernel;
pub use process::signal_worker;
pub use reap::{Exit, Reap, Reaped};
pub use token::{OpKind, Token};

use crate::shm::Slot;

/// How many times `push` submits to make room before it gives up: each submit hands the kernel
/// every queued entry, so one is enough unless the kernel refuses them; a bound turns a wedged
/// ring into a clear panic instead of a spinning core.
const PUSH_ATTEMPTS_MAX: u32 = 64;

/// One completion: whose op (its `user_data`, a [`Token`]), the result, and the CQE flags.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    /// A count (bytes, a descriptor) or the error the kernel returned.
    pub result: Result<u32, Errno>,
    pub flags: u32,
}

impl Completion {
    fn from_raw(user_data: u64, result: i32, flags: u32) -> Completion {
        Completion {
            user_data,
            result: if result < 0 {
                Err(Errno::from_raw_os_error(-result))
            } else {
                Ok(result as u32)
            },
            flags,
        }
    }

    /// A multishot op stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The descriptor an accept returned, now owned by the caller (take it once: each
    /// accept completion is handled exactly once).
    pub fn accepted(&self) -> Result<std::os::fd::OwnedFd, Errno> {
        let fd = self.result?;
        // SAFETY: a successful accept's result is a new descriptor that nothing else owns;
        // the completion is handled once, so it is wrapped once.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
    }

    /// The provided buffer a multishot receive filled, if any.
    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// The result of a completion as a plain integer (bytes or `-errno`), for logs.
pub fn raw_result(result: Result<u32, Errno>) -> i64 {
    match result {
        Ok(n) => n as i64,
        Err(errno) => -(errno.raw_os_error() as i64),
    }
}

/// One core's ring: the kernel's, or (in tests) the simulation's double, which carries out
/// the same `Sqe`s itself on real descriptors (`sim`). Production builds have only the first
/// variant, so every call below is one match the compiler removes.
pub struct Ring {
    backend: Backend,
}

// (The kernel's variant is the only one production builds have: boxing it to please the lint
// would put an indirection in front of every op.)
#[allow(clippy::large_enum_variant)]
enum Backend {
    Kernel(KernelRing),
    #[cfg(test)]
    Sim(sim::SimRing),
}

/// Forward a call to whichever ring this is.
macro_rules! backend {
    ($self:expr, |$ring:ident| $call:expr) => {
        match &$self.backend {
            Backend::Kernel($ring) => $call,
            #[cfg(test)]
            Backend::Sim($ring) => $call,
        }
    };
    (mut $self:expr, |$ring:ident| $call:expr) => {
        match &mut $self.backend {
            Backend::Kernel($ring) => $call,
            #[cfg(test)]
            Backend::Sim($ring) => $call,
        }
    };
}

impl Ring {
    /// The kernel's ring (see [`KernelRing::new`]).
    pub fn new(sq_entries: u32, cq_entries: u32, locked_bytes_hint: u64) -> io::Result<Ring> {
        let ring = KernelRing::new(sq_entries, cq_entries, locked_bytes_hint)?;
        Ok(Ring {
            backend: Backend::Kernel(ring),
        })
    }

    /// The simulation's double (`sim::SimRing`), driven by the harness through `handle`.
    #[cfg(test)]
    pub fn simulated(ring: sim::SimRing) -> Ring {
        Ring {
            backend: Backend::Sim(ring),
        }
    }

    /// Queue one entry (submitting first when the queue is full).
    pub fn push(&mut self, sqe: Sqe) {
        backend!(mut self, |ring| ring.push(sqe))
    }

    /// Queue two linked entries in one submission (a link must not straddle two submits).
    pub fn push_linked_pair(&mut self, first: Sqe, second: Sqe) {
        backend!(mut self, |ring| ring.push_linked_pair(first, second))
    }

    /// Cancel the op named by `target` (its completion still arrives, maybe `ECANCELED`).
    pub fn cancel(&mut self, target: Token) {
        self.push(op::cancel(target, Token::core(OpKind::Cancel, 0)));
    }

    /// Submit what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        backend!(mut self, |ring| ring.submit())
    }

    /// Submit and wait for at least one completion, or until `timeout` passes.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        backend!(mut self, |ring| ring.submit_and_wait(timeout))
    }

    /// Submit and run deferred completions without waiting; true when completions are ready.
    pub fn poll(&mut self) -> io::Result<bool> {
        backend!(mut self, |ring| ring.poll())
    }

    /// Move up to `max` completions into `out` (cleared first).
    pub fn drain(&mut self, out: &mut Vec<Completion>, max: usize) {
        backend!(mut self, |ring| ring.drain(out, max))
    }

    /// Reserve a sparse registered-buffer table; returns the free indices.
    pub fn register_buffer_table(&self, wanted: u32) -> Vec<u16> {
        backend!(self, |ring| ring.register_buffer_table(wanted))
    }

    /// Put `slot` in entry `index` of the buffer table (contract: [`KernelRing::register_buffer`]).
    pub fn register_buffer(&self, index: u16, slot: &Slot) -> io::Result<()> {
        backend!(self, |ring| ring.register_buffer(index, slot))
    }

    /// Clear entry `index` of the buffer table.
    pub fn unregister_buffer(&self, index: u16) -> io::Result<()> {
        backend!(self, |ring| ring.unregister_buffer(index))
    }

    /// Reserve a sparse registered-file table; returns the free indices.
    pub fn register_file_table(&self, entries: u32) -> Vec<u32> {
        backend!(self, |ring| ring.register_file_table(entries))
    }

    /// Put descriptor `fd` in entry `index` of the file table.
    pub fn register_file(&self, index: u32, fd: std::os::fd::RawFd) -> io::Result<()> {
        backend!(self, |ring| ring.register_file(index, fd))
    }

    /// Clear entry `index` of the file table.
    pub fn unregister_file(&self, index: u32) -> io::Result<()> {
        backend!(self, |ring| ring.unregister_file(index))
    }

    /// A provided-buffer ring of `entries` buffers (`None` when 0 or refused).
    pub fn provided_buffers(&self, entries: u32) -> Option<ProvidedBuffers> {
        backend!(self, |ring| ring.provided_buffers(entries))
    }

    /// Close the ring before anything its ops may name is freed.
    pub fn close(&mut self) {
        backend!(mut self, |ring| ring.close())
    }
}

/// The kernel's io_uring of one core.
pub struct KernelRing {
    /// `None` once closed.
    ring: Option<IoUring>,
    sq_entries: u32,
    cq_entries: u32,
}

impl KernelRing {
    /// A ring for the calling thread only (SINGLE_ISSUER + DEFER_TASKRUN), not inherited by
    /// children (`dontfork`). `locked_bytes_hint` names, in the error when the kernel refuses
    /// for lack of locked memory, how much the rings need.
    pub fn new(sq_entries: u32, cq_entries: u32, locked_bytes_hint: u64) -> io::Result<KernelRing> {
        // (Once per process: normally done already by the startup, before any core.)
        check_kernel().map_err(io::Error::other)?;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(cq_entries)
            .dontfork()
            .build(sq_entries)
            .map_err(|error| {
                if error.raw_os_error() == Some(libc::ENOMEM) {
                    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock)
                        .current
                        .unwrap_or(u64::MAX);
                    io::Error::new(
                        error.kind(),
                        format!(
                            "creating the io_uring failed ({error}): its rings need about {} KiB \
                             of locked memory and RLIMIT_MEMLOCK is {} KiB; raise the limit \
                             (ulimit -l, systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
                            locked_bytes_hint / 1024,
                            limit / 1024
                        ),
                    )
                } else {
                    error
                }
            })?;
        Ok(KernelRing {
            ring: Some(ring),
            sq_entries,
            cq_entries,
        })
    }

    fn ring(&self) -> &IoUring {
        self.ring.as_ref().expect("the ring is open")
    }

    fn ring_mut(&mut self) -> &mut IoUring {
        self.ring.as_mut().expect("the ring is open")
    }

    /// Queue one entry, submitting first when the queue is full (a bounded number of times:
    /// then the ring is wedged and the panic names the sizes).
    pub fn push(&mut self, sqe: Sqe) {
        let entry = sqe.entry();
        for _ in 0..PUSH_ATTEMPTS_MAX {
            // SAFETY: every `Sqe` comes from a constructor in `op`, whose ownership contract
            // the engine keeps: the memory and descriptors an entry names stay valid until its
            // completion, because their owners are freed only once no op of theirs is in
            // flight.
            let pushed = unsafe { self.ring_mut().submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            if let Err(error) = self.ring().submit() {
                tracing::error!(%error, "io_uring submit failed while the queue was full");
            }
        }
        panic!(
            "the io_uring submission queue ({} entries, completion queue {}) stayed full \
             through {PUSH_ATTEMPTS_MAX} submits",
            self.sq_entries, self.cq_entries
        );
    }

    /// Queue two linked entries in one submission (a link must not straddle two submits).
    pub fn push_linked_pair(&mut self, first: Sqe, second: Sqe) {
        let room = {
            let submission = self.ring_mut().submission();
            submission.capacity() - submission.len()
        };
        if room < 2 {
            if let Err(error) = self.ring().submit() {
                tracing::error!(%error, "io_uring submit failed while making room for a link");
            }
        }
        self.push(first.linked());
        self.push(second);
    }

    /// Submit what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring().submit().map(drop)
    }

    /// Submit and wait for at least one completion, or until `timeout` passes (`None`: no
    /// limit). A timeout or a signal is not an error: the loop simply looks again.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let waited = match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring().submitter().submit_with_args(1, &args)
            }
            None => self.ring().submit_and_wait(1),
        };
        match waited {
            Ok(_) => Ok(()),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Submit what is queued and run deferred completions, without waiting; true when
    /// completions are ready.
    pub fn poll(&mut self) -> io::Result<bool> {
        let to_submit = self.ring_mut().submission().len() as u32;
        // SAFETY: io_uring_enter with no argument: submits queued entries (each keeps the
        // contract `push` documents) and runs deferred completions, without waiting.
        unsafe {
            self.ring().submitter().enter::<libc::sigset_t>(
                to_submit, 0, 1, // IORING_ENTER_GETEVENTS
                None,
            )?;
        }
        Ok(!self.ring_mut().completion().is_empty())
    }

    /// Move up to `max` completions into `out` (cleared first).
    pub fn drain(&mut self, out: &mut Vec<Completion>, max: usize) {
        out.clear();
        for cqe in self.ring_mut().completion().take(max) {
            out.push(Completion::from_raw(
                cqe.user_data(),
                cqe.result(),
                cqe.flags(),
            ));
        }
    }

    /// Reserve a sparse registered-buffer table of up to `wanted` entries; returns the free
    /// indices (empty when the kernel refuses: slots are then used unregistered).
    pub fn register_buffer_table(&self, wanted: u32) -> Vec<u16> {
        if wanted == 0 {
            return Vec::new();
        }
        match self.ring().submitter().register_buffers_sparse(wanted) {
            Ok(()) => (0..wanted as u16).rev().collect(),
            Err(error) => {
                tracing::warn!(%error, "no io_uring fixed-buffer table; replies will be copied");
                Vec::new()
            }
        }
    }

    /// Put `slot` in entry `index` of the buffer table. Contract: the slot stays mapped until
    /// [`Ring::unregister_buffer`] clears the entry (a worker's entry does so before it is
    /// freed) or the ring is closed.
    pub fn register_buffer(&self, index: u16, slot: &Slot) -> io::Result<()> {
        // SAFETY: the contract above: the mapping outlives the registration.
        unsafe {
            self.ring()
                .submitter()
                .register_buffers_update(index as u32, &[slot.as_iovec()], None)
        }
    }

    /// Clear entry `index` of the buffer table.
    pub fn unregister_buffer(&self, index: u16) -> io::Result<()> {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty entry refers to no memory.
        unsafe {
            self.ring()
                .submitter()
                .register_buffers_update(index as u32, &[empty], None)
        }
    }

    /// Reserve a sparse registered-file table of up to `entries` (capped by RLIMIT_NOFILE,
    /// which the kernel enforces); returns the free indices.
    pub fn register_file_table(&self, entries: u32) -> Vec<u32> {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let entries = (entries.saturating_add(64) as u64).min(nofile).min(1 << 20) as u32;
        match self.ring().submitter().register_files_sparse(entries) {
            Ok(()) => (0..entries).rev().collect(),
            Err(error) => {
                tracing::warn!(%error, "no io_uring file table; descriptors are looked up per op");
                Vec::new()
            }
        }
    }

    /// Put descriptor `fd` in entry `index` of the file table (the kernel takes its own
    /// reference: the descriptor may be closed independently).
    pub fn register_file(&self, index: u32, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.ring()
            .submitter()
            .register_files_update(index, &[fd])
            .map(drop)
    }

    /// Clear entry `index` of the file table.
    pub fn unregister_file(&self, index: u32) -> io::Result<()> {
        self.ring()
            .submitter()
            .register_files_update(index, &[-1])
            .map(drop)
    }

    /// A provided-buffer ring of `entries` buffers registered with this ring (`None`, logged,
    /// when `entries` is 0 or the kernel refuses).
    pub fn provided_buffers(&self, entries: u32) -> Option<ProvidedBuffers> {
        ProvidedBuffers::register(self.ring(), entries)
    }

    /// Close the ring. Its ops are cancelled by the kernel; the owner calls this before it
    /// frees anything an op may still name (the core does so in its `Drop`, first).
    pub fn close(&mut self) {
        drop(self.ring.take());
    }
}

impl Drop for KernelRing {
    fn drop(&mut self) {
        self.close();
    }
}
