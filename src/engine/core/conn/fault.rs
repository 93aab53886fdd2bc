//! Why a caller was cut off: one typed fault per way a caller breaks the protocol or a bound
//! that holds callers (the worker's side is `worker/fault.rs`). Each has a message for the log
//! (and, for a frame, the payload of the Error 7 the caller gets), a label for the log line,
//! and the counter it is counted in (`BridgeCounters`, so in `status`, `status --json` and
//! `/metrics`). `Core::caller_fault` is the one place a caller is cut off for a fault.

use std::fmt;

use crate::engine::core::*;

#[derive(Debug)]
pub(in crate::engine::core) enum CallerFault {
    /// A frame that does not decode, or that a caller may not send (§1.3, §1.4): Error 7,
    /// then the connection closes once its answers are out.
    Malformed { request_id: u64, error: FrameError },
    /// The connection ended in the middle of a frame: Error 7 after every earlier answer.
    CutShort { request_id: u64 },
    /// Part of a frame, then nothing for `caller_frame_timeout_ms`.
    Stalled { timeout_ms: u64 },
    /// Its queued answers passed `write_queue_max_bytes`.
    SlowReader { queued_bytes: u64 },
    /// It had the most unread when the answers queued for all callers passed
    /// `answer_bytes_buffered_max` (this core's share of it).
    AnswerBudget { queued_bytes: u64, share: u64 },
}

impl CallerFault {
    /// Its label in the log line (`fault=`).
    pub(in crate::engine::core) fn label(&self) -> &'static str {
        match self {
            CallerFault::Malformed { .. } => "malformed_frame",
            CallerFault::CutShort { .. } => "cut_short",
            CallerFault::Stalled { .. } => "stalled_mid_frame",
            CallerFault::SlowReader { .. } => "slow_reader",
            CallerFault::AnswerBudget { .. } => "answer_budget",
        }
    }

    /// Count it (an answer-budget disconnect is a slow reader's too).
    pub(in crate::engine::core) fn count(&self, counters: &mut Counters) {
        match self {
            CallerFault::Malformed { .. } | CallerFault::CutShort { .. } => {
                counters.malformed_frames += 1
            }
            CallerFault::Stalled { .. } => counters.callers_timed_out += 1,
            CallerFault::SlowReader { .. } => counters.slow_callers_disconnected += 1,
            CallerFault::AnswerBudget { .. } => {
                counters.slow_callers_disconnected += 1;
                counters.answer_budget_disconnects += 1;
            }
        }
    }
}

impl fmt::Display for CallerFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerFault::Malformed { error, .. } => write!(f, "{error}"),
            CallerFault::CutShort { .. } => {
                f.write_str("the connection ended in the middle of a frame")
            }
            CallerFault::Stalled { timeout_ms } => write!(
                f,
                "sent part of a frame and nothing more for {timeout_ms} ms \
                 (caller_frame_timeout_ms)"
            ),
            CallerFault::SlowReader { queued_bytes } => write!(
                f,
                "is not reading its answers: {queued_bytes} bytes queued \
                 (write_queue_max_bytes)"
            ),
            CallerFault::AnswerBudget {
                queued_bytes,
                share,
            } => write!(
                f,
                "had the most unread ({queued_bytes} bytes) when the answers queued for all \
                 callers passed this core's share of answer_bytes_buffered_max ({share} bytes)"
            ),
        }
    }
}

impl Core {
    /// Cut a caller off for its fault: count it, log it with the caller's address, and end
    /// the connection as the fault says (an Error 7 for a frame, a close otherwise).
    pub(in crate::engine::core) fn caller_fault(&mut self, index: ConnHandle, fault: CallerFault) {
        fault.count(&mut self.counters);
        let caller = self.conns.get(index).and_then(|c| c.caller);
        let caller = caller.map(|c| c.to_string()).unwrap_or_default();
        match &fault {
            CallerFault::SlowReader { .. } | CallerFault::AnswerBudget { .. } => {
                tracing::warn!(fault = fault.label(), %caller, "a caller {fault}; disconnecting it")
            }
            _ => tracing::debug!(fault = fault.label(), %caller, "a caller's fault: {fault}"),
        }
        match fault {
            CallerFault::Malformed { request_id, error } => {
                let message = error.to_string();
                self.answer_error(index, request_id, 0, ErrorCode::MalformedFrame, &message);
                self.close_after_answers(index);
            }
            CallerFault::CutShort { request_id } => {
                let message = fault.to_string();
                self.answer_error(index, request_id, 0, ErrorCode::MalformedFrame, &message);
            }
            CallerFault::Stalled { .. }
            | CallerFault::SlowReader { .. }
            | CallerFault::AnswerBudget { .. } => self.close_conn(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_has_its_own_label_and_counter() {
        // Proves the table: labels are distinct, and each fault lands in the counter that
        // status and /metrics show for it.
        let faults = [
            CallerFault::Malformed {
                request_id: 1,
                error: FrameError::UnknownFlags { found: 0x80 },
            },
            CallerFault::CutShort { request_id: 2 },
            CallerFault::Stalled { timeout_ms: 10 },
            CallerFault::SlowReader { queued_bytes: 5 },
            CallerFault::AnswerBudget {
                queued_bytes: 5,
                share: 4,
            },
        ];
        let mut labels: Vec<&str> = faults.iter().map(CallerFault::label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), faults.len());
        let mut counters = Counters::default();
        for fault in &faults {
            fault.count(&mut counters);
            assert!(!fault.to_string().is_empty());
        }
        assert_eq!(counters.malformed_frames, 2);
        assert_eq!(counters.callers_timed_out, 1);
        assert_eq!(counters.slow_callers_disconnected, 2);
        assert_eq!(counters.answer_budget_disconnects, 1);
    }
}
