//! What one seed sets up (its scenario: faults on or off, the pool's shape, the callers and
//! what they send) and what the seeds together must reach (their coverage).

use std::sync::Arc;

use super::caller::Behaviour;
use super::{Sim, SimCore};
use crate::config::Config;
use crate::engine::index::ServiceSlot;
use crate::engine::io::sim::Rng;

/// Every slot's data area: small, so that payloads below, at and above it are cheap.
pub(super) const SLOT_BYTES: usize = 8192;
/// Payload sizes callers pick from: empty, small, around the direct-read threshold (4096),
/// around the slot, and beyond it (the copy path, several provided buffers).
const SIZES: [usize; 13] = [
    0, 1, 24, 100, 4095, 4096, 5000, 8191, 8192, 8193, 20_000, 70_000, 300,
];
/// Sizes that take a direct read (at least 4096 bytes, at most the slot).
const DIRECT_SIZES: [usize; 4] = [4096, 5000, 8191, 8192];

/// Paths 300 seeds must reach (see `Coverage`): the engine's hand-offs, the ring's hard
/// outcomes, and every fault label a worker model can provoke on its own.
pub(super) const REQUIRED_COVERAGE: [&str; 33] = [
    "replies",
    "requests_read_into_slot",
    "replies_sent_from_slot",
    "slot_sends_spilled",
    "provided_buffers_ran_out",
    "requests_abandoned",
    "requests_requeued",
    "copy_path",
    "error_worker_failed",
    "error_timed_out",
    "error_service_error",
    "callers_left",
    "ring_short_send",
    "ring_enobufs",
    "ring_cancel_won",
    "ring_cancel_lost",
    "ring_link_broken",
    "bad_frame",
    "malformed_hello",
    "wrong_abi",
    "forbidden_flags",
    "wrong_job",
    "in_slot_with_payload",
    "control_socket",
    "early_answer",
    // Two cores: a request run on the other core's worker, a connection accepted by one core
    // and served by the other.
    "requests_forwarded",
    "connections_handed_over",
    // Stops: every core finished after each kind, drain notices sent and read, and requests
    // answered `shutting down`.
    "stopped_gracefully",
    "stopped_by_drain",
    "connections_drained",
    "drain_notices_read",
    "error_shutting_down",
    "stopped_by_second_signal",
];

/// A stop the control thread sends every core mid-traffic (`super::stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// `Msg::Shutdown { now: false }`: SIGTERM.
    Shutdown,
    /// `Msg::Drain`: a binary upgrade's new bridge has taken over.
    Drain,
}

/// What one seed sets up.
#[derive(Debug)]
pub(super) struct Scenario {
    /// Cores (each its own ring, spawner and shard of the pool).
    pub(super) cores: usize,
    pub(super) faults: bool,
    /// Every worker guesses (`Fault::Guess`) and requests are sized for direct reads: the
    /// race of an answer with a caller's payload still arriving in the worker's slot.
    pub(super) guessers: bool,
    pub(super) queue_depth: u32,
    pub(super) ondemand: bool,
    pub(super) provided_buffers: u32,
    /// A stop sent to every core, and the step it is sent at.
    pub(super) stop: Option<(Stop, u32)>,
    /// Callers: the step they connect at, their payload sizes, how they behave.
    pub(super) callers: Vec<(u32, Vec<usize>, Behaviour)>,
}

impl Scenario {
    pub(super) fn new(rng: &mut Rng) -> Scenario {
        // Mostly two: one core is the plain case, which the two-core runs cover too except for
        // what `cores == 1` skips (placement, rebalancing, published counts).
        let cores = if rng.chance(80) { 2 } else { 1 };
        let faults = rng.chance(75);
        let guessers = faults && rng.chance(35);
        let queue_depth = if rng.chance(30) { 2 } else { 1 };
        let ondemand = rng.chance(40);
        let provided_buffers = [0, 4, 64][rng.below(3) as usize];
        let callers: Vec<(u32, Vec<usize>, Behaviour)> = (0..1 + rng.below(5))
            .map(|_| {
                let arrives = rng.below(200) as u32;
                let sizes: Vec<usize> = (0..1 + rng.below(8))
                    .map(|_| match guessers {
                        true => DIRECT_SIZES[rng.below(DIRECT_SIZES.len() as u64) as usize],
                        false => SIZES[rng.below(SIZES.len() as u64) as usize],
                    })
                    .collect();
                let bytes: usize = sizes.iter().map(|s| s + 24).sum();
                let behaviour = match (faults, rng.below(10)) {
                    (true, 0) => Behaviour::LeavesAt(rng.below(bytes as u64) as usize),
                    (true, 1) => Behaviour::StopsReading(1 + rng.below(300) as u32),
                    (_, 2 | 3) => Behaviour::Lingers(1 + rng.below(200) as u32),
                    (_, 4) => Behaviour::Trickles,
                    _ => Behaviour::Polite,
                };
                (arrives, sizes, behaviour)
            })
            .collect();
        // Mid-traffic: between the first caller's arrival and a little after the last's.
        let arrivals = callers.iter().map(|(arrives, _, _)| *arrives);
        let (first, last) = (arrivals.clone().min(), arrivals.max());
        let (first, last) = (first.unwrap_or(0), last.unwrap_or(0));
        let stop = rng.chance(35).then(|| {
            let stop = if rng.chance(50) {
                Stop::Shutdown
            } else {
                Stop::Drain
            };
            (stop, first + rng.below((last - first + 60) as u64) as u32)
        });
        Scenario {
            cores,
            faults,
            guessers,
            queue_depth,
            ondemand,
            provided_buffers,
            stop,
            callers,
        }
    }

    pub(super) fn config(&self) -> Arc<Config> {
        let pool = if self.ondemand {
            "mode = \"ondemand\"\nmin_workers = 0\nmax_workers = 3\nidle_timeout_ms = 3000"
        } else {
            "mode = \"static\"\nmin_workers = 2\nmax_workers = 2"
        };
        let text = format!(
            "state_dir = \"/nonexistent/acgi-sim\"\nprovided_buffers = {}\n\
             [listen]\nunix = \"/nonexistent/acgi-sim/bridge.sock\"\n\
             [[service]]\nid = 1\nname = \"echo\"\nexec = \"/bin/true\"\n{pool}\n\
             slot_size_bytes = {SLOT_BYTES}\nworker_queue_depth = {}\n\
             request_timeout_ms = 2000\nkill_grace_ms = 500\nstartup_timeout_ms = 2000\n",
            self.provided_buffers, self.queue_depth
        );
        Arc::new(Config::parse(&text).expect("the simulation's config parses"))
    }
}

/// How often each path a simulation is meant to reach was taken (summed over seeds, so that
/// a change that quietly stops the simulation from reaching one fails the run).
pub(super) type Coverage = std::collections::BTreeMap<&'static str, u64>;

impl Sim {
    pub(super) fn coverage(&self, into: &mut Coverage) {
        for (name, n) in &self.coverage_kept {
            *into.entry(name).or_default() += n;
        }
        let mut add = |name: &'static str, n: u64| *into.entry(name).or_default() += n;
        add("replies", self.callers.iter().map(|c| c.replies).sum());
        add(
            "callers_left",
            self.callers.iter().filter(|c| c.left).count() as u64,
        );
        add(
            "drain_notices_read",
            self.callers.iter().filter(|c| c.drain_notice).count() as u64,
        );
        for sim_core in &self.cores {
            core_coverage(sim_core, into);
        }
    }
}

/// What one core's counters and ring add to the coverage.
pub(super) fn core_coverage(sim_core: &SimCore, into: &mut Coverage) {
    let mut add = |name: &'static str, n: u64| *into.entry(name).or_default() += n;
    let counters = &sim_core.core.counters;
    let service = sim_core.core.sim_service_counters(ServiceSlot::new(0));
    add("requests_read_into_slot", counters.requests_read_into_slot);
    add("replies_sent_from_slot", counters.replies_sent_from_slot);
    add("slot_sends_spilled", counters.slot_sends_spilled);
    add(
        "provided_buffers_ran_out",
        counters.provided_buffers_ran_out,
    );
    add("requests_abandoned", counters.requests_abandoned);
    add("requests_requeued", counters.requests_requeued);
    add("requests_forwarded", counters.requests_forwarded);
    add("connections_handed_over", counters.connections_handed_over);
    add("connections_drained", counters.connections_drained);
    add("copy_path", service.copy_path);
    add("error_worker_failed", service.errors[4]);
    add("error_timed_out", service.errors[5]);
    add("error_shutting_down", service.errors[6]);
    add("error_service_error", service.errors[8]);
    for (label, count) in service.faults() {
        add(label, count);
    }
    for (kind, count) in sim_core.ring.completions_by_kind() {
        add(kind, count);
    }
}
