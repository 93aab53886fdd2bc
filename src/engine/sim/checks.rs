//! The checks of a run from the outside (what the module doc of `super` lists): each fault a
//! worker model acted out against what the engine counted, after every turn, and what may be
//! left once the last caller is done. (The core's and the pools' own invariants run inside the
//! engine, after every completion; each caller checks its answers itself: `super::caller`.)

use super::worker::Fault;
use super::{Caller, Core, Injected, ServiceSlot, Sim, SimCore};

impl Sim {
    /// The faults the engine counted this turn must be the ones models acted out: each model
    /// killed with a fault acted out must have its fault counted (under one of its labels),
    /// and every count must belong to such a model.
    /// (Per core, after core `c`'s turn: each core counts its own workers' faults.)
    pub(super) fn match_faults(&mut self, c: usize, killed: &[i32]) {
        for (at, model) in self.workers.iter_mut().enumerate() {
            if model.fault_done && !model.fault_reported {
                model.fault_reported = true;
                self.guesses += u64::from(model.fault == Some(Fault::Guess));
                let (pid, fault) = (model.pid, model.fault.expect("acted out"));
                let core = self.worker_core[at];
                self.injected.push(Injected { pid, core, fault });
            }
        }
        let counters = self.cores[c].core.sim_service_counters(ServiceSlot::new(0));
        let mut new: Vec<u64> = counters
            .worker_faults
            .iter()
            .zip(&self.cores[c].faults_counted)
            .map(|(now, before)| now - before)
            .collect();
        self.cores[c].faults_counted = counters.worker_faults.to_vec();
        let labels = Core::SIM_FAULT_LABELS;
        let take = |fault: Fault, new: &mut Vec<u64>| {
            let (names, _) = fault.labels();
            let at = (0..labels.len()).find(|&i| new[i] > 0 && names.contains(&labels[i]));
            at.inspect(|&i| new[i] -= 1).is_some()
        };
        let mut unmatched = Vec::new();
        // (The engine counts by service, not by worker: the killed models take theirs first.)
        let (mut injections, others) = std::mem::take(&mut self.injected)
            .into_iter()
            .partition::<Vec<_>, _>(|injected| injected.core == c);
        injections.sort_by_key(|injected| !killed.contains(&injected.pid));
        for injected in injections {
            if take(injected.fault, &mut new) {
                let line = format!("worker {}: {:?} counted", injected.pid, injected.fault);
                self.trace.push(line);
                continue;
            }
            let excused = self.excused(&injected);
            assert!(
                !killed.contains(&injected.pid) || excused,
                "worker {} acted out {:?} and was killed, but the engine counted none of {:?}",
                injected.pid,
                injected.fault,
                injected.fault.labels().0
            );
            // (Kept: an excused fault may still be counted on a later turn, as when the
            // engine reads a dead worker's end of file after its last bytes.)
            unmatched.push(injected);
        }
        self.injected = others;
        self.injected.extend(unmatched);
        for (index, count) in new.iter().enumerate() {
            assert_eq!(
                *count, 0,
                "core {c} counted a `{}` fault that no worker model of it acted out",
                labels[index]
            );
        }
    }

    /// A fault the engine need not count: one it may not see (`Fault::labels`), or acted out
    /// by a worker it was stopping anyway.
    fn excused(&self, injected: &Injected) -> bool {
        let model = &self.workers[self.by_pid[&injected.pid]];
        injected.fault.labels().1 || model.stopped
    }

    /// Every caller is done (answered or gone) and the cores have let go of them; after a
    /// stop, every core's turn has also said it finished (and the cores are dropped).
    pub(super) fn finished(&self) -> bool {
        let empty = |c: &SimCore| {
            let (conns, _, requests) = c.core.sim_table_sizes();
            conns == 0 && requests == 0
        };
        self.callers.len() == self.scenario.callers.len()
            && self.callers.iter().all(Caller::finished)
            && self.cores.iter().all(empty)
            && self.injected.iter().all(|i| self.excused(i))
            && (self.stop_sent.is_none() || self.cores.is_empty())
    }

    /// After the last caller: let what is under way settle (a spawn answered, a worker's
    /// exit reaped), then nothing may be held that should not be, on any core. (After a stop,
    /// `stop::drop_cores_once_finished` has checked the cores already.)
    pub(super) fn check_end(&mut self) {
        let mut settled = false;
        for _ in 0..1000 {
            if !self.anything_moves() {
                settled = true;
                break;
            }
        }
        assert!(settled, "still busy after the last caller");
        for caller in &self.callers {
            assert!(
                caller.left || caller.cut_off || caller.unanswered() == 0,
                "caller {}: {} requests never answered",
                caller.id,
                caller.unanswered()
            );
        }
        if self.stop_sent.is_some() {
            // Each caller reset without a frame by a drain's end is excused only as one of
            // those the cores never accepted.
            let excused = self.callers.iter().filter(|c| c.maybe_never_accepted);
            let never_accepted = self.callers.len() as u64 - self.accepted;
            assert!(
                excused.count() as u64 <= never_accepted,
                "a drain reset accepted connections without the drain notice ({never_accepted} \
                 connections were never accepted)"
            );
        }
        let mut workers_held = 0;
        for (c, sim_core) in self.cores.iter().enumerate() {
            let (conns, workers, requests) = sim_core.core.sim_table_sizes();
            workers_held += workers;
            assert_eq!(
                (conns, requests),
                (0, 0),
                "core {c}: connections and requests left at the end"
            );
            self.check_connections_released(c, "at the end");
            let ring = &sim_core.ring;
            assert!(
                ring.files_registered() <= workers,
                "core {c}: registered files left beyond the workers' ({} for {workers})",
                ring.files_registered()
            );
        }
        let alive = self.workers.iter().filter(|w| !w.dead).count();
        assert!(
            workers_held >= alive,
            "the cores lost track of a live worker"
        );
        let replies: u64 = self.callers.iter().map(|c| c.replies).sum();
        let ops: u64 = self.cores.iter().map(|c| c.ring.completed()).sum();
        let line = format!(
            "seed {} done: {} steps, {ops} ops, {replies} replies, {} workers",
            self.seed,
            self.step,
            self.workers.len()
        );
        self.trace.push(line);
    }

    /// With no connection left on core `c` (`when`, for the message): every provided buffer
    /// is back in its ring and no connection op is in flight.
    pub(super) fn check_connections_released(&self, c: usize, when: &str) {
        let ring = &self.cores[c].ring;
        if self.scenario.provided_buffers > 0 {
            assert_eq!(
                ring.provided_free(),
                self.scenario.provided_buffers as usize,
                "core {c} {when}: provided buffers not handed back"
            );
        }
        let conn_ops = ring
            .pending_kinds()
            .into_iter()
            .filter(|kind| format!("{kind:?}").starts_with("Conn"))
            .count();
        assert_eq!(
            conn_ops, 0,
            "core {c} {when}: connection ops in flight with no connection"
        );
    }
}
