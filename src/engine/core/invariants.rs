//! The relations between this core's tables, checked after every completion in debug builds
//! (so in every integration test, which runs the debug binary). A failure is our bug, never a
//! caller's or a worker's: their input is rejected before it can reach these states.

use super::*;

/// Above this many requests, the budget's sum is not recomputed after every completion (the
/// check would make a deep backlog quadratic).
const INVARIANT_SUM_REQUESTS_MAX: usize = 1024;

impl Core {
    /// Panics naming the first relation that does not hold.
    pub(super) fn check_invariants(&self) {
        for service in &self.services {
            service.pool.check_invariants();
        }
        if let shutdown::Life::Stopping {
            stage: shutdown::Stage::Done,
            ..
        } = self.life
        {
            assert!(
                self.conns.is_empty() && self.workers.is_empty(),
                "a core counted as done holds {} connections and {} workers",
                self.conns.len(),
                self.workers.len()
            );
        }
        for (index, worker) in self.workers.iter() {
            let depth = self.services[worker.service].pool.policy().queue_depth;
            worker.check_invariants(depth);
            match worker.slot_use {
                SlotUse::Free => {}
                SlotUse::Filling { conn } => {
                    let filler = self.conns.get(conn).filter(|c| {
                        c.into_slot
                            .as_ref()
                            .is_some_and(|into| into.worker == index)
                    });
                    assert!(
                        filler.is_some(),
                        "worker {}: its slot is marked as filled by {conn:?}, which is not \
                         reading into it",
                        worker.pid
                    );
                }
                SlotUse::Lent { conn } => {
                    let sender = self.conns.get(conn).filter(|c| {
                        c.slot_send
                            .as_ref()
                            .is_some_and(|send| send.worker == index)
                    });
                    assert!(
                        sender.is_some(),
                        "worker {}: lent to {conn:?}, which is not sending from its slot",
                        worker.pid
                    );
                }
            }
        }
        if self.requests.len() <= INVARIANT_SUM_REQUESTS_MAX {
            let reserved: u64 = self.conns.iter().map(|(_, c)| u64::from(c.reserved)).sum();
            let held: u64 = self
                .requests
                .iter()
                .map(|(_, r)| u64::from(r.held_bytes))
                .sum();
            assert_eq!(
                self.request_bytes,
                reserved + held,
                "the request budget's count is not what connections reserve plus requests hold"
            );
        }
        if self.conns.len() <= INVARIANT_SUM_REQUESTS_MAX {
            let counted: u64 = self.conns.iter().map(|(_, c)| c.answers_counted).sum();
            assert_eq!(
                self.answer_bytes, counted,
                "the answer budget's count is not what connections counted"
            );
        }
        assert!(
            self.conns_touched.is_empty(),
            "connections left unsettled after the effects ran"
        );
        for (index, conn) in self.conns.iter() {
            conn.check_invariants(index);
            assert!(
                conn.is_closing() || conn.send.queued_bytes() == 0 || conn.send.in_flight,
                "{index:?}: answers queued and no send in flight (they would never go out)"
            );
            assert!(
                conn.answers_counted <= conn.send.queued_bytes() as u64 || conn.is_closing(),
                "{index:?}: counted more answer bytes than it has queued"
            );
            if let Some(into) = &conn.into_slot {
                let worker = self.workers.get(into.worker);
                assert!(
                    worker.is_some_and(|w| w.is_filled_by(index)),
                    "{index:?}: reading into a slot not marked as filled by it"
                );
                assert!(into.filled <= into.len, "{index:?}: overfilled a slot");
            }
            if let Some(send) = &conn.slot_send {
                let worker = self.workers.get(send.worker);
                assert!(
                    worker.is_some_and(|w| w.slot_use == SlotUse::Lent { conn: index }),
                    "{index:?}: sending from a slot not lent to it"
                );
            }
        }
    }
}
