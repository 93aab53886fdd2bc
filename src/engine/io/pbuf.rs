//! A provided-buffer ring: buffers the kernel picks from when a multishot receive completes, so
//! that a connection waiting for its next request holds no read buffer of its own.
//!
//! Layout (the kernel's `io_uring_buf_ring`): a page-aligned array of `provided_buffers` 16-byte
//! descriptors (address, length, buffer id), whose tail (the first descriptor's reserved field)
//! the application advances as it hands buffers back. The buffers themselves are one allocation
//! of `provided_buffers × BUFFER_BYTES`. The engine copies a completion's bytes out and gives the buffer
//! back before it handles the next completion, so the ring only runs dry when more receives
//! complete between two loop turns than it has buffers; the receive then ends with `ENOBUFS` and
//! the connection falls back to a plain receive into its own buffer.

use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group id of the ring (one ring per core, one group per ring).
pub const GROUP: u16 = 1;
/// Bytes per buffer: a burst of small requests, or the start of a large one.
pub const BUFFER_BYTES: usize = 4096;

pub struct ProvidedBuffers {
    /// The kernel's descriptor ring (null for the simulation's, which keeps `sim_free`).
    ring: *mut BufRingEntry,
    /// Buffers in the ring (a power of two).
    entries: u16,
    ring_bytes: usize,
    buffers: Box<[u8]>,
    tail: u16,
    /// In the simulation: the buffers handed back, in order, which the double's multishot
    /// receives pick from (`sim::SimRing`).
    #[cfg(test)]
    sim_free: Option<super::sim::FreeBuffers>,
}

impl ProvidedBuffers {
    /// Map the ring, register it with `ring` as group [`GROUP`] and fill it. `None` (with the
    /// reason logged) when the kernel or the limits refuse: connections then use plain receives.
    pub fn register(ring: &IoUring, entries: u32) -> Option<ProvidedBuffers> {
        if entries == 0 {
            return None;
        }
        let entries = u16::try_from(entries).expect("validated: at most 32768");
        assert!(entries.is_power_of_two());
        let ring_bytes = entries as usize * std::mem::size_of::<BufRingEntry>();
        // SAFETY: a fresh private anonymous mapping, owned by the value returned (unmapped in
        // Drop), page-aligned as the kernel requires.
        let mapped = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                ring_bytes,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        };
        let ring_ptr = match mapped {
            Ok(ptr) => ptr.cast::<BufRingEntry>(),
            Err(error) => {
                tracing::warn!(%error, "cannot map a provided-buffer ring; using plain receives");
                return None;
            }
        };
        let mut buffers = ProvidedBuffers {
            ring: ring_ptr,
            entries,
            ring_bytes,
            buffers: vec![0u8; entries as usize * BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
            #[cfg(test)]
            sim_free: None,
        };
        // SAFETY: the mapping is `entries` descriptors long and stays mapped while the ring
        // that uses it lives (the core closes its ring first, see Drop).
        let registered = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_ptr as u64, entries, GROUP, 0)
        };
        if let Err(error) = registered {
            tracing::warn!(%error, "no provided-buffer ring; using plain receives");
            return None;
        }
        for bid in 0..entries {
            buffers.push(bid);
        }
        buffers.publish();
        Some(buffers)
    }

    /// The simulation's provided buffers: every buffer handed to `free` at once; the double
    /// fills them through [`ProvidedBuffers::base`].
    #[cfg(test)]
    pub(super) fn simulated(entries: u32, free: super::sim::FreeBuffers) -> ProvidedBuffers {
        let entries = u16::try_from(entries).expect("validated: at most 32768");
        let mut buffers = ProvidedBuffers {
            ring: std::ptr::null_mut(),
            entries,
            ring_bytes: 0,
            buffers: vec![0u8; entries as usize * BUFFER_BYTES].into_boxed_slice(),
            tail: 0,
            sim_free: Some(free),
        };
        for bid in 0..entries {
            buffers.push(bid);
        }
        buffers
    }

    /// Where buffer 0 starts (the buffers never move: one boxed allocation).
    #[cfg(test)]
    pub(super) fn base(&mut self) -> *mut u8 {
        self.buffers.as_mut_ptr()
    }

    /// The bytes of buffer `bid`.
    pub fn bytes(&self, bid: u16) -> &[u8] {
        let start = bid as usize * BUFFER_BYTES;
        &self.buffers[start..start + BUFFER_BYTES]
    }

    /// Hand buffer `bid` back to the kernel (its bytes have been copied out).
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn push(&mut self, bid: u16) {
        assert!(bid < self.entries);
        #[cfg(test)]
        if let Some(free) = &self.sim_free {
            free.give_back(bid);
            return;
        }
        let index = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: index < entries, inside the mapping; the kernel reads a descriptor only
        // after the tail passes it, which `publish` does afterwards.
        let entry = unsafe { &mut *self.ring.add(index) };
        let start = bid as usize * BUFFER_BYTES;
        entry.set_addr(self.buffers[start..].as_ptr() as u64);
        entry.set_len(BUFFER_BYTES as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make the pushed descriptors visible to the kernel.
    fn publish(&self) {
        if self.ring.is_null() {
            return;
        }
        // SAFETY: the tail field lies in the first descriptor, inside the mapping; the kernel
        // reads it atomically, and the release store orders the descriptors before it.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut();
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for ProvidedBuffers {
    fn drop(&mut self) {
        if self.ring.is_null() {
            return;
        }
        // SAFETY: our own mapping, of this length. The ring that used it is closed: a core
        // closes its ring first, in its `Drop`, before anything its ops could name.
        unsafe {
            let _ = rustix::mm::munmap(self.ring.cast(), self.ring_bytes);
        }
    }
}
