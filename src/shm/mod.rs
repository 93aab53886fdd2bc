//! Shared-memory slots, bridge side: the memory each worker's requests and replies go through.
//!
//! The slot ABI (the header layout, the state word and the validated accessors both sides use)
//! is defined once in [`acgi_proto::slot`] and re-exported here. This module owns the memory:
//! it creates each worker's memfd of `SLOT_HEADER_BYTES + capacity` bytes, maps it shared, and
//! unmaps it when the [`Slot`] drops. The core's arena is the set of its workers' slots, each
//! registered as one entry of the core ring's sparse fixed-buffer table ([`Slot::as_iovec`]).
//!
//! A slot's size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW`, then `F_SEAL_SEAL`) before the
//! memfd is mapped or passed to anyone: a worker holds a descriptor of it, and a worker that
//! shrank it would make the bridge's next read of the header fault (SIGBUS ends the whole
//! bridge), while one that grew it would pin memory the bridge never accounts for. Writes stay
//! allowed: the data area is how the two sides talk. (See docs/security.md.)
//!
//! Unsafe code here is the mapping, its unmapping, and the view's construction over it.

use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

pub use acgi_proto::slot::{
    SlotError, SlotHeader, SlotState, SlotView, REQUEST_LEN_INLINE, SLOT_ABI_VERSION,
    SLOT_CAPACITY_BYTES_DEFAULT, SLOT_CAPACITY_BYTES_MIN, SLOT_HEADER_BYTES, SLOT_MAGIC,
};

/// The seals every slot carries before anyone maps it: its size is fixed, and no further seal
/// (in particular `F_SEAL_WRITE`, which would stop the bridge writing) can be added.
pub const SLOT_SEALS: rustix::fs::SealFlags = rustix::fs::SealFlags::SHRINK
    .union(rustix::fs::SealFlags::GROW)
    .union(rustix::fs::SealFlags::SEAL);

/// One slot the bridge created and mapped. It dereferences to its [`SlotView`], the accessors
/// (`fill`, `take_reply`, ...). Dropping unmaps; the memfd closes with its [`OwnedFd`].
pub struct Slot {
    view: SlotView,
    fd: OwnedFd,
}

impl Slot {
    /// Create a fresh slot of `capacity` data bytes, its header initialised and Free.
    pub fn create(name: &str, capacity: u32) -> Result<Slot, SlotError> {
        assert!(capacity >= SLOT_CAPACITY_BYTES_MIN);
        use rustix::fs::MemfdFlags;
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| SlotError::Create(e.into()))?;
        let map_bytes = SLOT_HEADER_BYTES + capacity as usize;
        rustix::fs::ftruncate(&fd, map_bytes as u64).map_err(|e| SlotError::Create(e.into()))?;
        rustix::fs::fcntl_add_seals(&fd, SLOT_SEALS).map_err(|e| SlotError::Create(e.into()))?;
        assert_eq!(
            rustix::fs::fcntl_get_seals(&fd).map_err(|e| SlotError::Create(e.into()))?,
            SLOT_SEALS,
            "the slot's seals"
        );
        let base = map_shared(&fd, map_bytes)?;
        // SAFETY: `base` is a fresh shared mapping of exactly SLOT_HEADER_BYTES + capacity
        // bytes, page aligned, read/write. It is unmapped only in `Drop`, which drops the view
        // with it; every borrow from the view is tied to `&self`.
        let view = unsafe { SlotView::new(base, capacity) };
        view.init();
        Ok(Slot { view, fd })
    }

    /// The memfd, for the spawner to pass to the worker.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Address and length of the whole mapping (for fixed-buffer registration).
    pub fn as_iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.view.base().as_ptr().cast(),
            iov_len: self.view.map_bytes(),
        }
    }
}

impl Deref for Slot {
    type Target = SlotView;

    fn deref(&self) -> &SlotView {
        &self.view
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: `create` mapped exactly this range, and no borrow of the view outlives `self`.
        let _ =
            unsafe { rustix::mm::munmap(self.view.base().as_ptr().cast(), self.view.map_bytes()) };
    }
}

/// Map `len` bytes of `fd` shared, read/write.
fn map_shared(fd: &OwnedFd, len: usize) -> Result<NonNull<u8>, SlotError> {
    // SAFETY: a fresh shared mapping of a memfd we hold; nothing else aliases this range in our
    // address space. The caller owns it from here and unmaps it.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
    }
    .map_err(|e| SlotError::Map(e.into()))?;
    NonNull::new(ptr.cast::<u8>()).ok_or(SlotError::BadHeader("null mapping"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_through_a_memfd_between_both_sides() {
        // Proves a created slot and the worker SDK's mapping of its memfd share one region.
        let bridge = Slot::create("test", 128).unwrap();
        let worker =
            acgi_worker::WorkerSlot::attach(bridge.fd().try_clone_to_owned().unwrap()).unwrap();
        bridge.fill(7, Some(b"hello"), 0).unwrap();
        assert_eq!(worker.take_job(7).unwrap(), Some(5));
        // SAFETY: the worker side holds the slot in Taken with len 5.
        assert_eq!(unsafe { worker.request_bytes(5) }, b"hello");
        worker.publish_reply(Some(b"world!")).unwrap();
        let mut out = Vec::new();
        assert_eq!(bridge.take_reply(7, true, &mut out).unwrap(), 6);
        assert_eq!(out, b"world!");
        assert_eq!(bridge.state(), SlotState::Free as u32);
    }

    #[test]
    fn a_slot_cannot_be_resized_or_resealed() {
        // Proves the seals: whoever holds the memfd can neither shrink it, grow it, nor add
        // the write seal that would lock the bridge out; writes through the mapping still work.
        use rustix::fs::SealFlags;
        let slot = Slot::create("test", 4096).unwrap();
        let size = SLOT_HEADER_BYTES as u64 + 4096;
        assert_eq!(
            rustix::fs::ftruncate(slot.fd(), 0),
            Err(rustix::io::Errno::PERM)
        );
        assert_eq!(
            rustix::fs::ftruncate(slot.fd(), size * 2),
            Err(rustix::io::Errno::PERM)
        );
        assert_eq!(
            rustix::fs::fcntl_add_seals(slot.fd(), SealFlags::WRITE),
            Err(rustix::io::Errno::PERM)
        );
        assert_eq!(rustix::fs::fstat(slot.fd()).unwrap().st_size as u64, size);
        slot.fill(1, Some(b"still writable"), 0).unwrap();
    }
}
