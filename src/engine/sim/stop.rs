//! Stops: mid-traffic, the seed sends every core a graceful stop (`Msg::Shutdown { now:
//! false }`, SIGTERM) or a binary upgrade's drain (`Msg::Drain`), the way the control thread
//! does (`control::Control::on_stop_signal`, `Control::begin_drain`): `Shared::shutdown` first,
//! then the message through `Shared::send` (the inbox and a write to the core's eventfd).
//!
//! Why: a stop is where a core's tables must empty on their own (every request answered,
//! every worker stopped and reaped, every connection closed once flushed) while requests are
//! still being forwarded between cores and answers are still queued; and a drain adds a last
//! frame (the notice) that must come after every answer and before the end of the connection.
//!
//! What is checked (besides everything a run without a stop checks): each caller, when the
//! bridge ends its connection or sends the drain notice, that every request the bridge took is
//! answered and none that ran is not (`Caller::on_bridge_closed`); on a drain, that the notice
//! came, last; and each core's turn must eventually say it finished, with no connection,
//! request, worker, registered file, connection op or provided buffer left. Then the cores are
//! dropped, as the engine's threads drop theirs: their listeners close, and a caller still
//! waiting in the listen queue is reset.

use std::sync::atomic::Ordering;

use super::scenario::{self, Stop};
use super::Sim;
use crate::engine::index::TypedIndex;
use crate::engine::io::sim::Rng;
use crate::engine::shared::Msg;

/// Mixed into the seed for the second signal's own draws.
const SECOND_SIGNAL_STREAM: u64 = 0x5ec0_d516_4a10_0001;
/// Of the seeds that stop gracefully, those that also send a second signal.
const SECOND_SIGNAL_PERCENT: u64 = 50;

/// A second stop signal after a graceful stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SecondSignal {
    /// This seed sends none (or has not stopped yet).
    No,
    /// To be sent at this step (if the cores have not all finished by then).
    DueAt(u32),
    Sent,
}

impl Sim {
    /// Send the scenario's stop once its step has come. Callers that have not connected yet
    /// never will (the bridge no longer accepts; a new bridge would serve them).
    pub(super) fn stop_if_due(&mut self) {
        let Some((stop, at)) = self.scenario.stop else {
            return;
        };
        if self.stop_sent.is_some() || self.step < at {
            return;
        }
        self.log(format!("the control thread sends {stop:?} to every core"));
        // As the control thread: the flag before any core hears (see `shared`).
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for core in 0..self.cores.len() {
            let msg = match stop {
                Stop::Shutdown => Msg::Shutdown { now: false },
                Stop::Drain => Msg::Drain,
            };
            self.shared
                .send(crate::engine::index::CoreIndex::from_usize(core), msg);
        }
        self.stop_sent = Some(stop);
        if stop == Stop::Shutdown {
            // Drawn from a stream of its own, so that the seeds' other draws (and the
            // regression seeds) stay what they were.
            let mut own = Rng::new(self.seed ^ SECOND_SIGNAL_STREAM);
            if own.chance(SECOND_SIGNAL_PERCENT) {
                self.second_signal = SecondSignal::DueAt(self.step + own.below(60) as u32);
            }
        }
        self.scenario.callers.truncate(self.callers.len());
        for caller in &mut self.callers {
            caller.stop = Some(stop);
        }
    }

    /// A second SIGTERM, as the control thread sends it: `Shutdown { now: true }` to every
    /// core, which stops waiting for what is in flight (fails it, kills the workers) and closes
    /// every connection after `SHUTDOWN_FLUSH_GRACE`, read or not.
    pub(super) fn second_signal_if_due(&mut self) {
        let SecondSignal::DueAt(at) = self.second_signal else {
            return;
        };
        if self.step < at || self.cores.is_empty() {
            return;
        }
        self.log("the control thread sends Shutdown { now: true } to every core".into());
        for core in 0..self.cores.len() {
            let msg = Msg::Shutdown { now: true };
            self.shared
                .send(crate::engine::index::CoreIndex::from_usize(core), msg);
        }
        // The callers' checks stay as they are: a request that ran is still answered (with
        // `shutting down` or `worker failed`), and a caller that reads is not closed on
        // before the flush grace, which the clock reaches only once no model acts.
        self.second_signal = SecondSignal::Sent;
    }

    /// Called after each turn of a stopping run: once every core's turn has said it finished,
    /// check that nothing is left on any, keep their coverage, and drop them.
    pub(super) fn drop_cores_once_finished(&mut self) {
        if self.cores.is_empty() || !self.cores.iter().all(|c| c.finished) {
            return;
        }
        for (c, sim_core) in self.cores.iter().enumerate() {
            assert_eq!(
                sim_core.core.sim_table_sizes(),
                (0, 0, 0),
                "core {c} finished holding connections, workers or requests"
            );
            assert_eq!(
                sim_core.ring.files_registered(),
                0,
                "core {c} finished with registered files"
            );
            self.check_connections_released(c, "finished");
            scenario::core_coverage(sim_core, &mut self.coverage_kept);
            self.accepted += sim_core.ring.accepted();
        }
        let stopped = match self.stop_sent {
            Some(Stop::Shutdown) if self.second_signal == SecondSignal::Sent => {
                "stopped_by_second_signal"
            }
            Some(Stop::Shutdown) => "stopped_gracefully",
            Some(Stop::Drain) => "stopped_by_drain",
            None => unreachable!("cores finish only when asked to stop"),
        };
        *self.coverage_kept.entry(stopped).or_default() += 1;
        self.log("every core finished: their threads end".into());
        self.cores.clear();
    }
}
