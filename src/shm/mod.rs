//! Shared-memory slots, bridge side: the memory each worker's requests and replies go through.
//!
//! The slot ABI (the header layout, the state word and the validated accessors both sides use)
//! is defined once in [`acgi_proto::slot`] and re-exported here. This module owns the memory:
//! it creates each worker's memfd of `SLOT_HEADER_BYTES + capacity` bytes, maps it shared, and
//! unmaps it when the [`Slot`] drops. The core's arena is the set of its workers' slots, each
//! registered as one entry of the core ring's sparse fixed-buffer table ([`Slot::as_iovec`]).
//!
//! Unsafe code here is the mapping, its unmapping, and the view's construction over it.

use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

pub use acgi_proto::slot::{
    SlotError, SlotHeader, SlotState, SlotView, REQUEST_LEN_INLINE, SLOT_ABI_VERSION,
    SLOT_CAPACITY_BYTES_DEFAULT, SLOT_CAPACITY_BYTES_MIN, SLOT_HEADER_BYTES, SLOT_MAGIC,
};

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
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| SlotError::Create(e.into()))?;
        let map_bytes = SLOT_HEADER_BYTES + capacity as usize;
        rustix::fs::ftruncate(&fd, map_bytes as u64).map_err(|e| SlotError::Create(e.into()))?;
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
}
