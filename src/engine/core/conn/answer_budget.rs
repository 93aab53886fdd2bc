//! The budget of answer bytes queued for callers, over all of this core's connections (its
//! share of `answer_bytes_buffered_max`). Each connection's queue is bounded by
//! `write_queue_max_bytes`; this bounds their sum, which callers that request large answers and
//! never read could otherwise grow to `connections_max` times that.
//!
//! Accounting: each connection remembers what it last added to `Core::answer_bytes`
//! (`Conn::answers_counted`); `account_answers` moves the core's sum by the difference after
//! every change of its queue (an answer queued, a send completed, a send from a slot settled,
//! the connection closing: then it counts nothing, its queue going with it once its last op
//! has completed), and `forget_answers` takes what is left out when the connection is freed. When a queued answer
//! takes the sum past the share, the connection with the most bytes queued (the caller that
//! reads least) is disconnected, as a slow caller is, until the sum fits again (each round
//! closes one connection, so the loop ends).

use crate::engine::core::*;

impl Core {
    /// Bring the core's sum up to date with connection `index`'s queue (a closing connection's
    /// counts nothing: its queue goes with it once its last op has completed).
    pub(in crate::engine::core) fn account_answers(&mut self, index: ConnHandle) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        let now = if conn.is_closing() {
            0
        } else {
            conn.send.queued_bytes() as u64
        };
        self.answer_bytes = self.answer_bytes - conn.answers_counted + now;
        conn.answers_counted = now;
    }

    /// Connection `conn` (being freed) no longer holds answer bytes.
    pub(in crate::engine::core) fn forget_answers(&mut self, counted: u64) {
        self.answer_bytes -= counted;
    }

    /// After an answer was queued: while the core's answers are over its share, disconnect the
    /// caller with the most queued. Returns whether `index` itself was disconnected.
    pub(in crate::engine::core) fn enforce_answer_budget(&mut self, index: ConnHandle) -> bool {
        let mut closed_it = false;
        while self.answer_bytes > self.answer_bytes_share {
            let largest = self
                .conns
                .iter()
                .filter(|(_, c)| !c.is_closing() && c.answers_counted > 0)
                .max_by_key(|(_, c)| c.answers_counted)
                .map(|(handle, c)| (handle, c.answers_counted));
            let Some((victim, queued)) = largest else {
                break;
            };
            closed_it |= victim == index;
            // (close_conn takes its queue out of the sum.)
            let share = self.answer_bytes_share;
            let fault = CallerFault::AnswerBudget {
                queued_bytes: queued,
                share,
            };
            self.caller_fault(victim, fault);
        }
        closed_it
    }
}
