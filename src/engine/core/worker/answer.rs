//! What the core decides when a frame arrives from a worker, apart from what it then does: a
//! pure function of the frame (its decoded header and payload) and of the worker's state as a
//! small value, which yields "ignore it", "ready", "an answer to its job" or the
//! [`WorkerFault`] to kill it for (docs/protocol.md §9). The slot step that follows an answer,
//! [`take_reply`], validates the slot header through `SlotView` (state, sequence, `reply_len`
//! against the capacity) before a byte is copied.
//!
//! Kept apart from `worker.rs` so that its one decision is written once, called by the engine
//! (`Core::on_worker_frame`, `Core::on_job_answer`) and fuzzed as it is (`crate::fuzzing::
//! worker_answer`, whose stable replay is `tests/fuzz_bodies.rs`): the fuzzer drives exactly
//! the checks a hostile worker meets.

pub(crate) use super::fault::WorkerFault;
use super::state::{JobPath, SlotUse, Worker, WorkerState};
use crate::proto::{self, Header, Hello, Kind, FLAG_IN_SLOT};
use crate::shm::{SlotError, SlotView, SLOT_ABI_VERSION};

/// A worker's state as far as its next frame is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WorkerView {
    /// Spawned, no `Hello` yet.
    Starting,
    /// Running a job.
    Busy {
        /// The job's sequence (its `Job` frame's `request_id`); the answer must carry it.
        sequence: u64,
        /// A queued job (§8.4): its slot is not its own.
        queued: bool,
        /// Its `Job` frame (and a direct read's payload) is all out: an answer may come.
        job_sent: bool,
    },
    /// Being stopped: whatever it says no longer matters.
    Stopping,
    /// Idle, lending its slot, or dead: no frame is expected; the name is for the fault.
    Waiting(&'static str),
}

impl WorkerView {
    /// The view of a worker of this core; `sent_total` is how far its control socket's send
    /// queue has got.
    pub(in crate::engine::core) fn of(worker: &Worker) -> WorkerView {
        match worker.state {
            WorkerState::Starting => WorkerView::Starting,
            WorkerState::Busy(job) => WorkerView::Busy {
                sequence: job.sequence,
                queued: job.path == JobPath::Queued,
                job_sent: !matches!(worker.slot_use, SlotUse::Filling { .. })
                    && worker.send.sent_total() >= job.frame_end,
            },
            WorkerState::Stopping => WorkerView::Stopping,
            state => WorkerView::Waiting(state.name()),
        }
    }
}

/// What a worker's frame means, once it is found legal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The worker is being stopped: drop the frame.
    Ignored,
    /// A valid `Hello` of this slot ABI: the worker is ready.
    Ready {
        /// It set `QUEUED`: it takes queued jobs (§8.4).
        accepts_queue: bool,
    },
    /// A `Done` or `Fail` for the job it runs.
    Answer(Answer),
}

/// A worker's answer to its running job, its frame checked (its slot not yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    /// `Done` (else `Fail`: the payload is the service's error message).
    pub(crate) ok: bool,
    /// A `Done` with `IN_SLOT`: the reply is the slot's `reply_len` bytes, no payload.
    pub(crate) in_slot: bool,
    /// The job was a queued one, which never touched the slot.
    pub(crate) queued: bool,
    /// The job's sequence, which the slot header must carry too.
    pub(crate) sequence: u64,
}

/// Which flags each worker frame may carry (protocol §1.4, §9).
fn allowed_flags(kind: Kind) -> u16 {
    match kind {
        Kind::Hello => proto::FLAG_QUEUED,
        Kind::Done => FLAG_IN_SLOT,
        _ => 0,
    }
}

/// Judge one decoded frame (`header`, whose `payload_len` the reader already bounded, and its
/// `payload`) from a worker in the state `worker`.
pub(crate) fn check_frame(
    header: &Header,
    payload: &[u8],
    worker: WorkerView,
) -> Result<Verdict, WorkerFault> {
    debug_assert_eq!(payload.len(), header.payload_len as usize);
    if worker == WorkerView::Stopping {
        return Ok(Verdict::Ignored);
    }
    if header.flags & !allowed_flags(header.kind) != 0 {
        return Err(WorkerFault::ForbiddenFlags {
            kind: header.kind,
            flags: header.flags,
        });
    }
    match (worker, header.kind) {
        (WorkerView::Starting, Kind::Hello) => match Hello::decode(payload) {
            Some(hello) if hello.slot_abi_version == SLOT_ABI_VERSION => Ok(Verdict::Ready {
                accepts_queue: header.flags & proto::FLAG_QUEUED != 0,
            }),
            Some(hello) => Err(WorkerFault::WrongAbi {
                found: hello.slot_abi_version,
            }),
            None => Err(WorkerFault::MalformedHello),
        },
        (
            WorkerView::Busy {
                sequence,
                queued,
                job_sent,
            },
            Kind::Done | Kind::Fail,
        ) => {
            if header.request_id != sequence {
                return Err(WorkerFault::WrongJob {
                    answered: header.request_id,
                    holding: sequence,
                });
            }
            if !job_sent {
                // It guessed the sequence: its `Job` frame (and, for a direct read, the
                // payload in its slot) is not all there yet.
                return Err(WorkerFault::EarlyAnswer { sequence });
            }
            let in_slot = header.kind == Kind::Done && header.in_slot();
            if queued && in_slot {
                return Err(WorkerFault::InSlotAnswerToQueuedJob);
            }
            if in_slot && header.payload_len != 0 {
                return Err(WorkerFault::InSlotWithPayload);
            }
            Ok(Verdict::Answer(Answer {
                ok: header.kind == Kind::Done,
                in_slot,
                queued,
                sequence,
            }))
        }
        (worker, kind) => Err(WorkerFault::UnexpectedFrame {
            kind,
            state: worker.name(),
        }),
    }
}

impl WorkerView {
    /// The state's name, for [`WorkerFault::UnexpectedFrame`].
    fn name(self) -> &'static str {
        match self {
            WorkerView::Starting => "starting",
            WorkerView::Busy { .. } => "busy",
            WorkerView::Stopping => "stopping",
            WorkerView::Waiting(name) => name,
        }
    }
}

/// The slot step of an answer: validate the slot header (Replied, the job's sequence,
/// `reply_len` within the capacity) and, for an in-slot reply, append its bytes to `out`;
/// the slot is Free again. Returns the bytes taken from the slot. A queued job never touched
/// the slot: nothing there to validate or free.
pub(crate) fn take_reply(
    answer: &Answer,
    slot: &SlotView,
    out: &mut Vec<u8>,
) -> Result<usize, SlotError> {
    if answer.queued {
        return Ok(0);
    }
    let taken = slot.take_reply(answer.sequence, answer.in_slot, out)?;
    debug_assert!(taken <= slot.capacity() as usize);
    debug_assert!(answer.in_slot || taken == 0);
    Ok(taken)
}
