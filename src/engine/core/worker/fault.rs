//! Why a worker was killed or lost: one typed fault per way a worker can break the worker
//! protocol (docs/protocol.md §9) or its control socket. Each has a message for the log and the
//! caller's error, and a stable label for `acgi_bridge_worker_faults_total{service,fault}` and
//! `status`.

use std::fmt;

use crate::proto::{FrameError, Kind};
use crate::shm::SlotError;

#[derive(Debug)]
pub(crate) enum WorkerFault {
    /// A frame that does not decode (§1.2 checks).
    BadFrame(FrameError),
    /// A `Hello` whose payload is not the 8 bytes §6.3 gives.
    MalformedHello,
    /// A `Hello` naming a slot ABI this bridge does not speak.
    WrongAbi { found: u32 },
    /// A flag the frame's kind may not carry (§1.4): IN_SLOT or TIMEOUT on a `Hello` or a
    /// `Fail`, QUEUED on a `Done`, ...
    ForbiddenFlags { kind: Kind, flags: u16 },
    /// A frame its state does not allow: a second `Hello`, an answer with no job, a caller's
    /// kind.
    UnexpectedFrame { kind: Kind, state: &'static str },
    /// An answer for another job than the one it runs.
    WrongJob { answered: u64, holding: u64 },
    /// An answer before the job's `Job` frame was all sent (a guessed sequence), or while a
    /// caller's payload was still being read into its slot.
    EarlyAnswer { sequence: u64 },
    /// An in-slot answer to a queued job, whose slot is not its own (§8.4).
    InSlotAnswerToQueuedJob,
    /// An in-slot `Done` with a socket payload as well.
    InSlotWithPayload,
    /// Its slot header does not validate (state, sequence, lengths).
    Slot(SlotError),
    /// Its control socket failed or was closed while it was not being stopped.
    ControlSocket(String),
}

impl WorkerFault {
    /// Every label, in a fixed order (the index of each fault's counter).
    pub(crate) const LABELS: [&'static str; 11] = [
        "bad_frame",
        "malformed_hello",
        "wrong_abi",
        "forbidden_flags",
        "unexpected_frame",
        "wrong_job",
        "early_answer",
        "in_slot_answer_to_queued_job",
        "in_slot_with_payload",
        "slot",
        "control_socket",
    ];

    /// Its counter's index in [`WorkerFault::LABELS`].
    pub(crate) fn index(&self) -> usize {
        match self {
            WorkerFault::BadFrame(_) => 0,
            WorkerFault::MalformedHello => 1,
            WorkerFault::WrongAbi { .. } => 2,
            WorkerFault::ForbiddenFlags { .. } => 3,
            WorkerFault::UnexpectedFrame { .. } => 4,
            WorkerFault::WrongJob { .. } => 5,
            WorkerFault::EarlyAnswer { .. } => 6,
            WorkerFault::InSlotAnswerToQueuedJob => 7,
            WorkerFault::InSlotWithPayload => 8,
            WorkerFault::Slot(_) => 9,
            WorkerFault::ControlSocket(_) => 10,
        }
    }
}

impl fmt::Display for WorkerFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerFault::BadFrame(error) => write!(f, "sent a bad frame: {error}"),
            WorkerFault::MalformedHello => write!(f, "sent a malformed Hello"),
            WorkerFault::WrongAbi { found } => write!(
                f,
                "speaks slot ABI {found}, this bridge speaks {}",
                crate::shm::SLOT_ABI_VERSION
            ),
            WorkerFault::ForbiddenFlags { kind, flags } => write!(
                f,
                "sent a {kind:?} frame with flags {flags:#06x}, which it may not carry"
            ),
            WorkerFault::UnexpectedFrame { kind, state } => {
                write!(f, "sent an unexpected {kind:?} frame while {state}")
            }
            WorkerFault::WrongJob { answered, holding } => {
                write!(f, "answered job {answered} while holding job {holding}")
            }
            WorkerFault::EarlyAnswer { sequence } => {
                write!(f, "answered job {sequence} before its Job frame was sent")
            }
            WorkerFault::InSlotAnswerToQueuedJob => write!(f, "answered a queued job in its slot"),
            WorkerFault::InSlotWithPayload => {
                write!(f, "sent an in-slot reply with a socket payload")
            }
            WorkerFault::Slot(error) => write!(f, "broke the slot protocol: {error}"),
            WorkerFault::ControlSocket(what) => write!(f, "{what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_has_its_own_label() {
        // Proves the labels are distinct (a repeated label value is a duplicate Prometheus
        // series) and that index() stays inside LABELS.
        let mut labels = WorkerFault::LABELS.to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), WorkerFault::LABELS.len());
        let faults = [
            WorkerFault::MalformedHello,
            WorkerFault::EarlyAnswer { sequence: 3 },
            WorkerFault::ControlSocket("closed its control socket".into()),
        ];
        for fault in &faults {
            assert!(fault.index() < WorkerFault::LABELS.len());
        }
        assert_eq!(
            WorkerFault::EarlyAnswer { sequence: 3 }.to_string(),
            "answered job 3 before its Job frame was sent"
        );
    }
}
