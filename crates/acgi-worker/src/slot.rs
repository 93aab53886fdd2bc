//! The worker's side of its slot: attaching to the memfd the bridge passed, and mapping it.
//!
//! The slot ABI and its accessors are `acgi_proto::slot`; this module owns only the mapping,
//! which lives as long as the [`WorkerSlot`] and is unmapped when it drops. The bridge created
//! the memfd and wrote its header; everything in it is checked before the view is handed out.

use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use acgi_proto::slot::{SlotError, SlotView, SLOT_CAPACITY_BYTES_MIN, SLOT_HEADER_BYTES};

/// The slot a worker attached to. It dereferences to its [`SlotView`] (`take_job`,
/// `request_bytes`, `publish_reply`, ...). Dropping unmaps; the memfd closes with its
/// [`OwnedFd`].
pub struct WorkerSlot {
    view: SlotView,
    _fd: OwnedFd,
}

impl WorkerSlot {
    /// Attach to a slot created by the bridge; checks magic, ABI and size.
    pub fn attach(fd: OwnedFd) -> Result<WorkerSlot, SlotError> {
        let stat = rustix::fs::fstat(&fd).map_err(|e| SlotError::Map(e.into()))?;
        let map_bytes = stat.st_size as usize;
        if map_bytes < SLOT_HEADER_BYTES + SLOT_CAPACITY_BYTES_MIN as usize {
            return Err(SlotError::BadHeader("memfd is smaller than a slot"));
        }
        let capacity = (map_bytes - SLOT_HEADER_BYTES) as u32;
        // SAFETY: a fresh shared mapping of a memfd we hold; nothing else aliases this range in
        // our address space. It stays valid until `Drop` unmaps it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_bytes,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| SlotError::Map(e.into()))?;
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(SlotError::BadHeader("null mapping"))?;
        // SAFETY: `base` is a page-aligned read/write mapping of exactly
        // SLOT_HEADER_BYTES + capacity bytes, unmapped only in `Drop`, which drops the view with
        // it; every borrow from the view is tied to `&self`.
        let slot = WorkerSlot {
            view: unsafe { SlotView::new(base, capacity) },
            _fd: fd,
        };
        // Checked after `slot` owns the mapping, so that a refused one is unmapped.
        slot.view.check()?;
        Ok(slot)
    }
}

impl Deref for WorkerSlot {
    type Target = SlotView;

    fn deref(&self) -> &SlotView {
        &self.view
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        // SAFETY: `attach` mapped exactly this range, and no borrow of the view outlives `self`.
        let _ =
            unsafe { rustix::mm::munmap(self.view.base().as_ptr().cast(), self.view.map_bytes()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_rejects_a_foreign_memfd() {
        // Proves a worker refuses memory that is not a slot.
        let fd = rustix::fs::memfd_create("foreign", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(matches!(
            WorkerSlot::attach(fd),
            Err(SlotError::BadHeader("bad magic"))
        ));
    }
}
