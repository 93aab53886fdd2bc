//! A global allocator that counts allocations, so that tests and status can show the data path
//! allocates nothing per request in steady state.
//!
//! The bridge binary installs it; the count costs one relaxed atomic add per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's allocations are not counted (housekeeping threads off the data path).
    static UNCOUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Stop counting the calling thread's allocations, for the rest of its life: for housekeeping
/// threads (the orphan reaper) whose periodic work is not the data path the count is about.
pub fn stop_counting_this_thread() {
    UNCOUNTED.with(|uncounted| uncounted.set(true));
}

fn count() {
    // (try_with: during a thread's teardown its locals may be gone; count then.)
    if !UNCOUNTED
        .try_with(|uncounted| uncounted.get())
        .unwrap_or(false)
    {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The system allocator, counting calls to `alloc` and `realloc`.
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; the counter has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout, under the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above; ptr was allocated by this allocator with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations (and reallocations) since the process started, when the counting allocator is
/// installed; 0 otherwise.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}
