//! What the engine simulation (`engine::sim`, tests only) reads of a core to check it from
//! the outside: table sizes and a service's counters. It changes nothing; the simulation drives
//! the core only as the kernel would, through the ring, the spawner and the clock.

use super::*;

impl Core {
    /// The labels of `WorkerFault`, in the order of `ServiceCounters::worker_faults`.
    pub(crate) const SIM_FAULT_LABELS: [&'static str; WorkerFault::LABELS.len()] =
        WorkerFault::LABELS;

    /// Caller connections, workers and requests this core holds now.
    pub(crate) fn sim_table_sizes(&self) -> (usize, usize, usize) {
        (self.conns.len(), self.workers.len(), self.requests.len())
    }

    /// Service slot `slot`'s counters (requests by outcome, worker faults by label).
    pub(crate) fn sim_service_counters(&self, slot: ServiceSlot) -> ServiceCounters {
        self.services[slot].counters
    }
}
