//! A worker as this core sees it: its process state, the jobs it holds, and who else uses its
//! slot. Each is an enum, so an illegal combination cannot be written; `check_invariants`
//! states the relations between them and runs after every completion in debug builds.
//!
//! ```text
//!  Starting --Hello--> Idle --dispatch--> Busy(job) --answer--> Idle | Busy(next queued)
//!                        ^                   |  in-slot reply sent from the slot
//!                        +---- send done -- Lending (a worker that does not take queued jobs)
//!  any --policy stop--> Stopping --exit--> Dead;  any --violation / exit--> Dead
//! ```
//!
//! The slot beside it: `Free` (the worker's own), `Filling` (a caller's payload is being read
//! into it; the running job's `Job` frame is not sent yet, so any answer is a violation), or
//! `Lent` (a reply is being sent from it to a caller). The tables are in `LIFECYCLE.md`.

use crate::engine::core::*;
use crate::engine::io::Reap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum WorkerState {
    /// Spawned, no handshake yet.
    Starting,
    Idle,
    /// Running `Job` (and maybe holding more in `Worker::queued`).
    Busy(Job),
    /// Its reply is being sent from its slot; back to Idle when the send completes.
    Lending,
    /// Stopped by the policy; waiting for it to exit.
    Stopping,
    /// Failed or exited: out of the pool, waiting to be reaped and for its ops to finish.
    Dead,
}

impl WorkerState {
    /// Its name, for log lines and faults.
    pub(in crate::engine::core) fn name(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy(_) => "busy",
            WorkerState::Lending => "lending its slot",
            WorkerState::Stopping => "stopping",
            WorkerState::Dead => "dead",
        }
    }
}

/// A job a worker holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) struct Job {
    pub(in crate::engine::core) request: RequestHandle,
    /// Its `Job` frame's `request_id`; the answer must carry it.
    pub(in crate::engine::core) sequence: u64,
    pub(in crate::engine::core) path: JobPath,
    /// The worker's send position (`SendQueue::sent_total`) once its whole `Job` frame is out:
    /// an answer that arrives before that is early, a violation. `u64::MAX` while the frame is
    /// not queued yet (a direct read is filling the slot).
    pub(in crate::engine::core) frame_end: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum JobPath {
    /// Its request went in the slot (or inline, over the slot's size); the answer may be in
    /// the slot.
    Slot,
    /// A queued job (§8.4): the payload inline, the answer inline, the slot untouched.
    Queued,
}

/// Who, besides the worker, uses its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum SlotUse {
    /// No one: it is the worker's (or free).
    Free,
    /// A caller's payload is being read into it by this connection; the worker is `Busy`
    /// with that request and its `Job` frame waits until the read is done.
    Filling { conn: ConnHandle },
    /// A reply is being sent from it to this connection.
    Lent { conn: ConnHandle },
}

/// Where the read of a worker's stdout or stderr stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::engine::core) enum PipeRead {
    /// Open, no read in flight.
    Idle,
    /// A read into `PipeLog::buf` is in flight.
    Reading,
    /// End of file (or an error): never read again.
    Closed,
}

pub(in crate::engine::core) struct PipeLog {
    pub(in crate::engine::core) fd: OwnedFd,
    pub(in crate::engine::core) buf: Box<[u8; PIPE_READ_BYTES]>,
    pub(in crate::engine::core) line: Vec<u8>,
    pub(in crate::engine::core) read: PipeRead,
}

impl PipeLog {
    pub(in crate::engine::core) fn new(fd: OwnedFd) -> PipeLog {
        PipeLog {
            fd,
            buf: Box::new([0; PIPE_READ_BYTES]),
            line: Vec::new(),
            read: PipeRead::Idle,
        }
    }

    pub(in crate::engine::core) fn in_flight(&self) -> bool {
        self.read == PipeRead::Reading
    }
}

pub(in crate::engine::core) struct Worker {
    pub(in crate::engine::core) service: ServiceSlot,
    pub(in crate::engine::core) pid: i32,
    pub(in crate::engine::core) control: OwnedFd,
    pub(in crate::engine::core) slot: Slot,
    pub(in crate::engine::core) state: WorkerState,
    pub(in crate::engine::core) slot_use: SlotUse,
    pub(in crate::engine::core) read: ReadBuffer,
    pub(in crate::engine::core) recv_in_flight: bool,
    /// Job frames (and copy-path payloads) for the worker.
    pub(in crate::engine::core) send: SendQueue,
    pub(in crate::engine::core) stdout: PipeLog,
    pub(in crate::engine::core) stderr: PipeLog,
    /// Its reaping (the op's memory, and its pidfd in the fallback mode).
    pub(in crate::engine::core) reap: Reap,
    /// Why the worker left, for the exit log line.
    pub(in crate::engine::core) fate: Option<String>,
    /// Index of its slot in the ring's registered-buffer table, if registered.
    pub(in crate::engine::core) buffer_index: Option<u16>,
    /// It said (Hello) that it takes queued jobs.
    pub(in crate::engine::core) accepts_queue: bool,
    /// Jobs sent behind the one it is running, oldest first (all `JobPath::Queued`).
    pub(in crate::engine::core) queued: VecDeque<Job>,
    /// Its control socket's index in the ring's registered-file table, if registered.
    pub(in crate::engine::core) file: Option<u32>,
}

impl Worker {
    pub(in crate::engine::core) fn ops_in_flight(&self) -> bool {
        self.recv_in_flight
            || self.send.in_flight
            || self.stdout.in_flight()
            || self.stderr.in_flight()
            || self.reap.in_flight()
            || self.slot_use != SlotUse::Free
    }

    /// Whether its slot is being filled by that connection. (A filled worker's entry is kept
    /// until the read ends, so a direct read's worker is always there; this guards against our
    /// own bookkeeping going wrong.)
    pub(in crate::engine::core) fn is_filled_by(&self, conn: ConnHandle) -> bool {
        self.slot_use == (SlotUse::Filling { conn })
    }

    /// The job it is running, if any.
    pub(in crate::engine::core) fn running(&self) -> Option<&Job> {
        match &self.state {
            WorkerState::Busy(job) => Some(job),
            _ => None,
        }
    }

    /// The relations between its state, its jobs and its slot's use. Panics naming the one
    /// that does not hold: our own bookkeeping is broken, not the worker's.
    #[cfg(debug_assertions)]
    pub(in crate::engine::core) fn check_invariants(&self, queue_depth: u32) {
        let busy = matches!(self.state, WorkerState::Busy(_));
        assert!(
            busy || self.queued.is_empty(),
            "worker {}: jobs queued while {:?}",
            self.pid,
            self.state
        );
        assert!(
            self.queued.len() < queue_depth.max(1) as usize,
            "worker {}: {} jobs queued behind its running one, over a depth of {queue_depth}",
            self.pid,
            self.queued.len()
        );
        assert!(
            self.queued.iter().all(|job| job.path == JobPath::Queued),
            "worker {}: a job behind the running one is not a queued job",
            self.pid
        );
        assert!(
            self.accepts_queue || self.queued.is_empty(),
            "worker {}: queued jobs for a worker that did not ask for them",
            self.pid
        );
        match self.slot_use {
            SlotUse::Free => {}
            SlotUse::Filling { .. } => assert!(
                matches!(
                    self.state,
                    WorkerState::Busy(Job {
                        path: JobPath::Slot,
                        frame_end: u64::MAX,
                        ..
                    }) | WorkerState::Stopping
                        | WorkerState::Dead
                ),
                "worker {}: its slot is being filled while {:?}",
                self.pid,
                self.state
            ),
            SlotUse::Lent { .. } => assert!(
                match self.state {
                    WorkerState::Lending | WorkerState::Dead | WorkerState::Stopping => true,
                    WorkerState::Idle => self.accepts_queue,
                    WorkerState::Busy(job) => self.accepts_queue && job.path == JobPath::Queued,
                    WorkerState::Starting => false,
                },
                "worker {}: its slot is lent while {:?}",
                self.pid,
                self.state
            ),
        }
        if self.state == WorkerState::Lending {
            assert!(
                matches!(self.slot_use, SlotUse::Lent { .. }),
                "worker {}: Lending without a slot send",
                self.pid
            );
        }
    }
}
