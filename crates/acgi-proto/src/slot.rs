//! The slot ABI: the memory a worker and the bridge hand requests and replies through.
//!
//! Each worker owns exactly one slot: a memfd of `SLOT_HEADER_BYTES + capacity` bytes, mapped
//! shared by the bridge (read/write) and by that worker alone, so one service can never read or
//! corrupt another's payloads. This module defines the bytes and the protocol over them, once
//! for both sides; it does not map anything. The bridge creates and maps slots (the daemon's
//! `shm` module), the worker SDK attaches to its one (`acgi_worker::WorkerSlot`); both then use
//! the same [`SlotView`] over their mapping.
//!
//! ```text
//!  0                                    64                                   64+capacity
//!  +------------------------------------+-------------------------------------+
//!  | SlotHeader (magic, abi, state, ...) | data: request, later the reply      |
//!  +------------------------------------+-------------------------------------+
//! ```
//!
//! The state word is the single owner token (see [`SlotState`]):
//!
//! ```text
//!   Free --bridge fills--> Filled --worker takes--> Taken --worker replies--> Replied
//!    ^                                                                          |
//!    +-------------------------- bridge copies the reply out -------------------+
//! ```
//!
//! Only the bridge moves Free->Filled and Replied->Free; only the worker moves Filled->Taken and
//! Taken->Replied. Everything read from the header is untrusted by the bridge: a worker may
//! write anything there, so each read is validated ([`SlotView::take_reply`]).
//!
//! Unsafe code in this crate is confined to this module: the view's raw copies in and out of
//! the mapped region, under the contract of [`SlotView::new`].

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// "SLOT" as a little-endian u32.
pub const SLOT_MAGIC: u32 = 0x544F_4C53;
/// Version of the slot header layout; workers send it in `Hello`.
pub const SLOT_ABI_VERSION: u32 = 1;
/// Bytes before the data area.
pub const SLOT_HEADER_BYTES: usize = 64;
/// Default data capacity of a slot (config `slot_size_bytes`).
pub const SLOT_CAPACITY_BYTES_DEFAULT: u32 = 65536;
/// Smallest allowed data capacity.
pub const SLOT_CAPACITY_BYTES_MIN: u32 = 64;

/// The header at offset 0 of every slot. Plain data only: fixed-width integers and atomics.
#[repr(C)]
pub struct SlotHeader {
    /// [`SLOT_MAGIC`], written by the bridge at creation.
    pub magic: AtomicU32,
    /// [`SLOT_ABI_VERSION`], written by the bridge at creation.
    pub abi_version: AtomicU32,
    /// The owner token, one of [`SlotState`]'s values.
    pub state: AtomicU32,
    /// Capacity of the data area in bytes, written by the bridge at creation.
    pub capacity: AtomicU32,
    /// Request bytes in the data area (valid in Filled/Taken); [`REQUEST_LEN_INLINE`] when the
    /// request travels on the control socket instead.
    pub request_len: AtomicU32,
    /// Reply bytes in the data area (valid in Replied when the Done frame says in-slot).
    pub reply_len: AtomicU32,
    /// The job's bridge-side sequence number, echoed so that a stale reply is detected.
    pub job_sequence: AtomicU64,
    /// Milliseconds left before the request's deadline when it was handed over; 0 = none.
    pub deadline_remaining_ms: AtomicU64,
    _reserved: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<SlotHeader>() == SLOT_HEADER_BYTES);
const _: () = assert!(std::mem::align_of::<SlotHeader>() == 8);
const _: () = assert!(std::mem::offset_of!(SlotHeader, state) == 8);
const _: () = assert!(std::mem::offset_of!(SlotHeader, request_len) == 16);
const _: () = assert!(std::mem::offset_of!(SlotHeader, reply_len) == 20);
const _: () = assert!(std::mem::offset_of!(SlotHeader, job_sequence) == 24);
const _: () = assert!(std::mem::offset_of!(SlotHeader, deadline_remaining_ms) == 32);

/// `request_len` value meaning "the request follows the Job frame on the control socket".
pub const REQUEST_LEN_INLINE: u32 = u32::MAX;

/// The slot's owner token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// Owned by the bridge, no job.
    Free = 0,
    /// The bridge wrote a job and rang the worker; owned by the worker from here.
    Filled = 1,
    /// The worker is running the job.
    Taken = 2,
    /// The worker wrote the reply and rang the bridge; owned by the bridge again.
    Replied = 3,
}

impl SlotState {
    /// The state with this value, if it is one.
    pub fn from_u32(value: u32) -> Option<SlotState> {
        Some(match value {
            0 => SlotState::Free,
            1 => SlotState::Filled,
            2 => SlotState::Taken,
            3 => SlotState::Replied,
            _ => return None,
        })
    }

    /// The one legal successor of each state.
    pub fn next(self) -> SlotState {
        match self {
            SlotState::Free => SlotState::Filled,
            SlotState::Filled => SlotState::Taken,
            SlotState::Taken => SlotState::Replied,
            SlotState::Replied => SlotState::Free,
        }
    }
}

/// Errors setting up or using a slot.
#[derive(Debug)]
pub enum SlotError {
    /// The bridge could not create the slot's memfd.
    Create(std::io::Error),
    /// The slot's memfd could not be mapped (or its size read).
    Map(std::io::Error),
    /// The header or the request the other side published is not a valid slot's.
    BadHeader(&'static str),
    /// The state word is not the one this step needs: the slot is not this side's to act on.
    WrongState {
        /// The state word found (any value: the other side may write anything).
        found: u32,
        /// The state this step needs.
        expected: SlotState,
    },
    /// The header's job sequence is not the job's (a stale or forged reply).
    WrongSequence {
        /// The sequence found in the header.
        found: u64,
        /// The job's sequence.
        expected: u64,
    },
    /// The worker published a reply longer than the data area.
    ReplyTooLong {
        /// The reply length in the header.
        len: u32,
        /// The data area's capacity.
        capacity: u32,
    },
    /// A payload longer than the data area.
    DoesNotFit {
        /// The payload's length.
        len: usize,
        /// The data area's capacity.
        capacity: u32,
    },
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotError::Create(error) => write!(f, "creating the slot memfd failed: {error}"),
            SlotError::Map(error) => write!(f, "mapping the slot failed: {error}"),
            SlotError::BadHeader(why) => write!(f, "slot header is invalid: {why}"),
            SlotError::WrongState { found, expected } => {
                write!(f, "slot is in state {found}, expected {expected:?}")
            }
            SlotError::WrongSequence { found, expected } => {
                write!(f, "slot job sequence {found} does not match {expected}")
            }
            SlotError::ReplyTooLong { len, capacity } => {
                write!(f, "reply length {len} is over the slot capacity {capacity}")
            }
            SlotError::DoesNotFit { len, capacity } => write!(
                f,
                "payload of {len} bytes does not fit the slot capacity {capacity}"
            ),
        }
    }
}

impl std::error::Error for SlotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SlotError::Create(error) | SlotError::Map(error) => Some(error),
            _ => None,
        }
    }
}

/// One slot seen through a mapping that someone else owns: the daemon's `shm::Slot` (which
/// created the memfd) or the worker SDK's `WorkerSlot` (which attached to it). The view never
/// maps or unmaps; it holds the mapping's address and the data capacity, and every access goes
/// through the validated accessors below.
pub struct SlotView {
    base: NonNull<u8>,
    capacity: u32,
}

// SAFETY: the region is plain shared memory; all header access is atomic and data access is by
// raw copies under the state-word protocol, so the view may move between threads with its
// owner (it is not Sync: one side's accessors are called from one thread at a time).
unsafe impl Send for SlotView {}

impl SlotView {
    /// A view of the slot mapped at `base`, whose data area holds `capacity` bytes.
    ///
    /// # Safety
    /// `base` must be the start of a readable and writable region of exactly
    /// `SLOT_HEADER_BYTES + capacity` bytes, aligned to 8 (a mapping is page aligned), that stays
    /// mapped for as long as the view lives: the owner of the mapping must outlive the view
    /// (typically by holding it in the same struct and unmapping in its `Drop`). The region may
    /// be shared with the slot's other side, which is trusted for nothing but is assumed to
    /// write only through the same layout (atomics in the header, plain bytes in the data
    /// area); nothing else in this process may write it except through views.
    pub unsafe fn new(base: NonNull<u8>, capacity: u32) -> SlotView {
        assert_eq!(
            base.as_ptr() as usize % std::mem::align_of::<SlotHeader>(),
            0,
            "a slot mapping is aligned to its header"
        );
        SlotView { base, capacity }
    }

    /// Bridge: write the header of a fresh slot (magic, ABI, capacity) and make it Free.
    pub fn init(&self) {
        let header = self.header();
        header.magic.store(SLOT_MAGIC, Ordering::Relaxed);
        header
            .abi_version
            .store(SLOT_ABI_VERSION, Ordering::Relaxed);
        header.capacity.store(self.capacity, Ordering::Relaxed);
        header
            .state
            .store(SlotState::Free as u32, Ordering::Release);
    }

    /// Worker: check that the region is a slot of this ABI whose header agrees with the size
    /// of the mapping.
    pub fn check(&self) -> Result<(), SlotError> {
        let header = self.header();
        if header.magic.load(Ordering::Relaxed) != SLOT_MAGIC {
            return Err(SlotError::BadHeader("bad magic"));
        }
        if header.abi_version.load(Ordering::Relaxed) != SLOT_ABI_VERSION {
            return Err(SlotError::BadHeader("unsupported slot ABI version"));
        }
        if header.capacity.load(Ordering::Relaxed) != self.capacity {
            return Err(SlotError::BadHeader(
                "capacity does not match the memfd size",
            ));
        }
        Ok(())
    }

    /// The slot's header. Its fields are atomics: read them, never trust them.
    pub fn header(&self) -> &SlotHeader {
        // SAFETY: the region is at least SLOT_HEADER_BYTES long and aligned (contract of `new`),
        // and SlotHeader consists of atomics only, so shared mutation by the other process is
        // sound.
        unsafe { &*self.base.as_ptr().cast::<SlotHeader>() }
    }

    /// Bytes the data area holds.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Start of the whole region (header included), for the owner's registration and unmap.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Length of the whole region: `SLOT_HEADER_BYTES + capacity`.
    pub fn map_bytes(&self) -> usize {
        SLOT_HEADER_BYTES + self.capacity as usize
    }

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: SLOT_HEADER_BYTES is inside the region (contract of `new`).
        unsafe { self.base.as_ptr().add(SLOT_HEADER_BYTES) }
    }

    /// The state word (any value: validate it with [`SlotState::from_u32`]).
    pub fn state(&self) -> u32 {
        self.header().state.load(Ordering::Acquire)
    }

    /// Bridge: hand a job over. The slot must be Free; `payload` of `None` means the payload
    /// travels inline on the control socket.
    pub fn fill(
        &self,
        job_sequence: u64,
        payload: Option<&[u8]>,
        deadline_remaining_ms: u64,
    ) -> Result<(), SlotError> {
        let header = self.header();
        let state = header.state.load(Ordering::Acquire);
        if state != SlotState::Free as u32 {
            return Err(SlotError::WrongState {
                found: state,
                expected: SlotState::Free,
            });
        }
        let request_len = match payload {
            Some(bytes) => {
                if bytes.len() > self.capacity as usize {
                    return Err(SlotError::DoesNotFit {
                        len: bytes.len(),
                        capacity: self.capacity,
                    });
                }
                // SAFETY: the slot is Free, so the bridge owns the data area; bytes.len() is
                // within capacity; the source is our own memory and cannot overlap the mapping.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data_ptr(), bytes.len())
                };
                bytes.len() as u32
            }
            None => REQUEST_LEN_INLINE,
        };
        self.publish_request(job_sequence, request_len, deadline_remaining_ms);
        Ok(())
    }

    /// Bridge: the request's `len` bytes were written into the data area directly (a socket
    /// read into [`SlotView::data_address_mut`] while the slot was Free); publish them as `fill`
    /// does.
    pub fn fill_in_place(
        &self,
        job_sequence: u64,
        len: u32,
        deadline_remaining_ms: u64,
    ) -> Result<(), SlotError> {
        let state = self.header().state.load(Ordering::Acquire);
        if state != SlotState::Free as u32 {
            return Err(SlotError::WrongState {
                found: state,
                expected: SlotState::Free,
            });
        }
        if len > self.capacity {
            return Err(SlotError::DoesNotFit {
                len: len as usize,
                capacity: self.capacity,
            });
        }
        self.publish_request(job_sequence, len, deadline_remaining_ms);
        Ok(())
    }

    fn publish_request(&self, job_sequence: u64, request_len: u32, deadline_remaining_ms: u64) {
        let header = self.header();
        header.request_len.store(request_len, Ordering::Relaxed);
        header.reply_len.store(0, Ordering::Relaxed);
        header.job_sequence.store(job_sequence, Ordering::Relaxed);
        header
            .deadline_remaining_ms
            .store(deadline_remaining_ms, Ordering::Relaxed);
        header
            .state
            .store(SlotState::Filled as u32, Ordering::Release);
    }

    /// Bridge: the worker said Done or Fail. Validate the header and, for an in-slot reply,
    /// append the reply bytes to `out`. On success the slot is Free again. `reply_len` is
    /// read only for an in-slot reply (protocol §7.1: it means nothing otherwise).
    pub fn take_reply(
        &self,
        job_sequence: u64,
        in_slot: bool,
        out: &mut Vec<u8>,
    ) -> Result<usize, SlotError> {
        let len = if in_slot {
            self.peek_reply(job_sequence)? as usize
        } else {
            self.check_replied(job_sequence)?;
            0
        };
        self.copy_data(0, len, out);
        self.release_reply();
        Ok(len)
    }

    /// Bridge: validate a Done's in-slot reply like [`SlotView::take_reply`], but leave the bytes in
    /// the slot (state stays Replied) so that they can be sent from it; returns their length.
    /// The bridge then owns the data area until [`SlotView::release_reply`].
    pub fn peek_reply(&self, job_sequence: u64) -> Result<u32, SlotError> {
        self.check_replied(job_sequence)?;
        let header = self.header();
        let reply_len = header.reply_len.load(Ordering::Relaxed);
        if reply_len > self.capacity {
            return Err(SlotError::ReplyTooLong {
                len: reply_len,
                capacity: self.capacity,
            });
        }
        Ok(reply_len)
    }

    /// Bridge: the slot is back from the worker (Replied) for this job.
    fn check_replied(&self, job_sequence: u64) -> Result<(), SlotError> {
        let header = self.header();
        let state = header.state.load(Ordering::Acquire);
        if state != SlotState::Replied as u32 {
            return Err(SlotError::WrongState {
                found: state,
                expected: SlotState::Replied,
            });
        }
        let found = header.job_sequence.load(Ordering::Relaxed);
        if found != job_sequence {
            return Err(SlotError::WrongSequence {
                found,
                expected: job_sequence,
            });
        }
        Ok(())
    }

    /// Bridge: append `len` data bytes from `offset` to `out` (a reply being sent from the slot
    /// whose send fell short).
    pub fn copy_data(&self, offset: usize, len: usize, out: &mut Vec<u8>) {
        assert!(offset
            .checked_add(len)
            .is_some_and(|end| end <= self.capacity as usize));
        out.reserve(len);
        // SAFETY: the range is inside the data area (checked above); the bridge owns it while
        // the slot is Replied; `out` has room for len more bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.data_ptr().add(offset),
                out.as_mut_ptr().add(out.len()),
                len,
            );
            out.set_len(out.len() + len);
        }
    }

    /// Bridge: copy `bytes` into the data area at `offset` (part of a request read into the
    /// slot). Only while the bridge owns the data area (the slot is Free, before
    /// `fill_in_place`). Panics when the range is outside the data area.
    pub fn write_data(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|end| end <= self.capacity as usize),
            "a write of {} bytes at {offset} into a slot of {}",
            bytes.len(),
            self.capacity
        );
        // SAFETY: the range is inside the data area (checked above), which is inside the
        // mapping; `bytes` is ours and cannot overlap the shared mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data_ptr().add(offset), bytes.len())
        };
    }

    /// Bridge: where a read may put request bytes, `offset` into the data area. Only while the
    /// slot is Free (the bridge owns the data area), before `fill_in_place`.
    pub fn data_address_mut(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.capacity as usize);
        // SAFETY: offset is within the data area, which is inside the mapping.
        unsafe { self.data_ptr().add(offset) }
    }

    /// Bridge: address of data byte `offset`, for a fixed-buffer write from the slot.
    pub fn data_address(&self, offset: usize) -> *const u8 {
        assert!(offset <= self.capacity as usize);
        // SAFETY: offset is within the data area, which is inside the mapping.
        unsafe { self.data_ptr().add(offset) }
    }

    /// Bridge: a reply sent from the slot is done with; the slot is Free again.
    pub fn release_reply(&self) {
        self.header()
            .state
            .store(SlotState::Free as u32, Ordering::Release);
    }

    /// Bridge: force the slot back to Free (after its worker died or was killed).
    pub fn reset(&self) {
        self.header()
            .state
            .store(SlotState::Free as u32, Ordering::Release);
    }

    /// Worker: take the job the bridge filled. Returns the in-slot request length, or `None`
    /// when the request is inline on the socket.
    pub fn take_job(&self, job_sequence: u64) -> Result<Option<usize>, SlotError> {
        let header = self.header();
        if let Err(found) = header.state.compare_exchange(
            SlotState::Filled as u32,
            SlotState::Taken as u32,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            return Err(SlotError::WrongState {
                found,
                expected: SlotState::Filled,
            });
        }
        let found = header.job_sequence.load(Ordering::Relaxed);
        if found != job_sequence {
            return Err(SlotError::WrongSequence {
                found,
                expected: job_sequence,
            });
        }
        match header.request_len.load(Ordering::Relaxed) {
            REQUEST_LEN_INLINE => Ok(None),
            len if len <= self.capacity => Ok(Some(len as usize)),
            len => Err(SlotError::DoesNotFit {
                len: len as usize,
                capacity: self.capacity,
            }),
        }
    }

    /// Worker: the request bytes while the slot is Taken.
    ///
    /// # Safety
    /// The caller must hold the slot in state Taken (after [`SlotView::take_job`]) and `len` must be
    /// what `take_job` returned; the bridge does not write the data area in that state.
    pub unsafe fn request_bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity as usize);
        // SAFETY: per the contract above the bridge does not touch the data area while Taken.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), len) }
    }

    /// Worker: publish the reply. `Some(bytes)` writes them into the slot (they must fit);
    /// `None` means the reply goes inline on the socket. The slot becomes Replied.
    pub fn publish_reply(&self, reply: Option<&[u8]>) -> Result<(), SlotError> {
        let header = self.header();
        let state = header.state.load(Ordering::Acquire);
        if state != SlotState::Taken as u32 {
            return Err(SlotError::WrongState {
                found: state,
                expected: SlotState::Taken,
            });
        }
        let len = match reply {
            Some(bytes) => {
                if bytes.len() > self.capacity as usize {
                    return Err(SlotError::DoesNotFit {
                        len: bytes.len(),
                        capacity: self.capacity,
                    });
                }
                // SAFETY: Taken means the worker owns the data area. `bytes` may alias it (a
                // handler replying with its own request): use an overlapping copy.
                unsafe { std::ptr::copy(bytes.as_ptr(), self.data_ptr(), bytes.len()) };
                bytes.len() as u32
            }
            None => 0,
        };
        header.reply_len.store(len, Ordering::Relaxed);
        header
            .state
            .store(SlotState::Replied as u32, Ordering::Release);
        Ok(())
    }

    /// Worker: raw write access to the data area, for tests that need to lie.
    #[doc(hidden)]
    pub fn header_for_tests(&self) -> &SlotHeader {
        self.header()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory standing in for a mapping of a slot with `capacity` data bytes (8-byte aligned).
    fn region(capacity: u32) -> Vec<u64> {
        let bytes = SLOT_HEADER_BYTES + capacity as usize;
        assert_eq!(bytes % 8, 0);
        vec![0; bytes / 8]
    }

    /// The bridge's and the worker's views of one region; the bridge has initialised it.
    fn views(region: &mut [u64]) -> (SlotView, SlotView) {
        let capacity = (region.len() * 8 - SLOT_HEADER_BYTES) as u32;
        let base = NonNull::new(region.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `region` is 8-byte aligned and exactly SLOT_HEADER_BYTES + capacity long;
        // every test declares it before the views, so it outlives them, and touches it only
        // through them.
        let (bridge, worker) =
            unsafe { (SlotView::new(base, capacity), SlotView::new(base, capacity)) };
        bridge.init();
        worker.check().unwrap();
        (bridge, worker)
    }

    #[test]
    fn state_machine_cycles_in_one_direction() {
        // Proves every state has exactly one successor and four steps come back to Free.
        let mut state = SlotState::Free;
        for _ in 0..4 {
            state = state.next();
        }
        assert_eq!(state, SlotState::Free);
        for raw in 0..4 {
            assert_eq!(SlotState::from_u32(raw).unwrap() as u32, raw);
        }
        assert_eq!(SlotState::from_u32(4), None);
    }

    #[test]
    fn write_data_lands_in_place_and_refuses_a_range_past_the_data_area() {
        // Proves the bridge's one copy into a slot (a request read in parts) writes where it
        // is told and checks offset + length against the capacity.
        let mut memory = region(64);
        let (bridge, worker) = views(&mut memory);
        bridge.write_data(0, b"abc");
        bridge.write_data(3, b"def");
        bridge.fill_in_place(9, 6, 0).unwrap();
        assert_eq!(worker.take_job(9).unwrap(), Some(6));
        // SAFETY: the worker side holds the slot in Taken with len 6.
        assert_eq!(unsafe { worker.request_bytes(6) }, b"abcdef");
        bridge.write_data(60, b"wxyz");
        let past_the_end = std::panic::catch_unwind(|| bridge.write_data(61, b"wxyz"));
        assert!(past_the_end.is_err());
        let overflowing = std::panic::catch_unwind(|| bridge.write_data(usize::MAX, b"x"));
        assert!(overflowing.is_err());
    }

    #[test]
    fn a_job_round_trips_through_both_sides() {
        // Proves fill -> take_job -> publish_reply -> take_reply moves bytes and ownership.
        let mut memory = region(128);
        let (bridge, worker) = views(&mut memory);
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
    fn every_out_of_order_step_is_refused() {
        // Proves no side can act on a slot it does not own.
        let mut memory = region(64);
        let (bridge, worker) = views(&mut memory);
        let mut out = Vec::new();
        assert!(matches!(
            worker.take_job(1),
            Err(SlotError::WrongState { found: 0, .. })
        ));
        assert!(matches!(
            worker.publish_reply(None),
            Err(SlotError::WrongState { .. })
        ));
        assert!(matches!(
            bridge.take_reply(1, true, &mut out),
            Err(SlotError::WrongState { .. })
        ));
        bridge.fill(1, None, 0).unwrap();
        assert!(matches!(
            bridge.fill(2, None, 0),
            Err(SlotError::WrongState { found: 1, .. })
        ));
        assert!(matches!(
            bridge.take_reply(1, true, &mut out),
            Err(SlotError::WrongState { .. })
        ));
        assert!(matches!(
            worker.take_job(2),
            Err(SlotError::WrongSequence { .. })
        ));
    }

    #[test]
    fn a_lying_worker_cannot_make_the_bridge_read_out_of_bounds() {
        // Proves reply_len over capacity and a stale sequence are rejected, not trusted.
        let mut memory = region(64);
        let (bridge, worker) = views(&mut memory);
        bridge.fill(9, Some(&[1; 64]), 0).unwrap();
        worker.take_job(9).unwrap();
        worker.publish_reply(Some(&[2; 10])).unwrap();
        worker
            .header_for_tests()
            .reply_len
            .store(65, Ordering::Relaxed);
        let mut out = Vec::new();
        assert!(matches!(
            bridge.take_reply(9, true, &mut out),
            Err(SlotError::ReplyTooLong {
                len: 65,
                capacity: 64
            })
        ));
        worker
            .header_for_tests()
            .reply_len
            .store(10, Ordering::Relaxed);
        assert!(matches!(
            bridge.take_reply(8, true, &mut out),
            Err(SlotError::WrongSequence { .. })
        ));
        assert!(out.is_empty());
        assert!(matches!(
            bridge.fill(1, Some(&[0; 65]), 0),
            Err(SlotError::WrongState { .. })
        ));
        bridge.reset();
        assert!(matches!(
            bridge.fill(1, Some(&[0; 65]), 0),
            Err(SlotError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn a_copy_path_answer_does_not_read_reply_len() {
        // Proves reply_len, which §7.1 makes meaningful only for an in-slot reply, is not held
        // against a worker that answers on the socket, while state and sequence still are.
        let mut memory = region(64);
        let (bridge, worker) = views(&mut memory);
        bridge.fill(4, None, 0).unwrap();
        worker.take_job(4).unwrap();
        worker.publish_reply(None).unwrap();
        worker
            .header_for_tests()
            .reply_len
            .store(u32::MAX, Ordering::Relaxed);
        let mut out = Vec::new();
        assert!(matches!(
            bridge.take_reply(3, false, &mut out),
            Err(SlotError::WrongSequence { .. })
        ));
        assert_eq!(bridge.take_reply(4, false, &mut out).unwrap(), 0);
        assert!(out.is_empty());
        assert_eq!(bridge.state(), SlotState::Free as u32);
    }

    #[test]
    fn check_rejects_a_region_that_is_not_a_slot() {
        // Proves a worker refuses memory without the magic, of another ABI, or whose header
        // disagrees with the mapping's size.
        let mut memory = region(64);
        let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `memory` is aligned, SLOT_HEADER_BYTES + 64 long, and outlives the view.
        let view = unsafe { SlotView::new(base, 64) };
        assert!(matches!(
            view.check(),
            Err(SlotError::BadHeader("bad magic"))
        ));
        view.init();
        view.check().unwrap();
        view.header().abi_version.store(2, Ordering::Relaxed);
        assert!(matches!(
            view.check(),
            Err(SlotError::BadHeader("unsupported slot ABI version"))
        ));
        view.init();
        view.header().capacity.store(128, Ordering::Relaxed);
        assert!(matches!(
            view.check(),
            Err(SlotError::BadHeader(
                "capacity does not match the memfd size"
            ))
        ));
    }
}
