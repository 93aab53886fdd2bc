//! A configuration reload, this core's side: new service slots are prepared beside the running
//! ones (blue/green), take over only when every core has their workers up, and the slots they
//! replace finish what they hold before their workers stop.
//!
//! ```text
//!   Prepare{plan} ──> new slots Warming (workers start; callers still go to the old slots)
//!                     └─ every warming slot has its floor of workers up ──> reply Ok
//!                     └─ a start fails or a worker crashes ──────────────> reply Err
//!   Commit ─────────> warming slots Live, ids and names remapped, replaced and removed slots
//!                     Retired (begin_stop: their backlog and running jobs finish), new pool
//!                     limits applied to kept slots (`set_service_limits`), new config
//!   Abort ──────────> warming slots Retired
//! ```
//!
//! Why no request fails: a request is placed in a slot when its header arrives and stays
//! there (a retired pool still serves its backlog and running jobs); the id's mapping moves to
//! the new slot in one step, between two completions. Retired slots publish no idle workers
//! or room, so other cores stop forwarding to them; a forward already on its way to a retired
//! slot goes to the service's live slot instead (only a request of a removed service, forwarded
//! in that instant, meets a stopping pool and gets `shutting down`).
//!
//! Slots are numbered by the control thread, the same on every core, and never reused (bound:
//! `shared::SERVICE_SLOTS_MAX`).

use super::*;
use crate::engine::shared::{CorePlan, ReloadReply, ReloadStep};

/// How often retired slots are looked at to fold those that have drained.
const FOLD_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// A reload prepared on this core and not yet committed or aborted.
pub(super) struct Pending {
    plan: Arc<CorePlan>,
    /// Where to say the warming slots are ready (taken once answered).
    reply: Option<ReloadReply>,
}

impl Core {
    pub(super) fn on_reload(&mut self, step: ReloadStep) {
        match step {
            ReloadStep::Prepare { plan, reply } => self.prepare_reload(plan, reply),
            ReloadStep::Commit { reply } => {
                let result = self.commit_reload();
                let _ = reply.send((self.index, result));
            }
            ReloadStep::Abort => self.abort_reload(),
        }
    }

    fn prepare_reload(&mut self, plan: Arc<CorePlan>, reply: ReloadReply) {
        let refusal = if self.stopping() {
            Some("the bridge is shutting down")
        } else if self.reload.is_some() {
            Some("another reload is being prepared")
        } else {
            None
        };
        let cores = self.shared.cores.len();
        for &(slot, config_index) in &plan.start {
            assert_eq!(
                slot.usize(),
                self.services.len(),
                "reload slots are numbered in order, the same on every core"
            );
            let mut service = Service::new(
                &plan.config,
                config_index,
                slot,
                self.index,
                cores,
                self.now,
            );
            service.phase = SlotPhase::Warming;
            let max_workers = service.pool.policy().max_workers;
            self.shared.cores[self.index].services[slot]
                .max_workers
                .store(max_workers, Ordering::Relaxed);
            self.services.push(service);
            self.pools_touched_set.push(false);
            self.pool_touched(slot);
            if refusal.is_some() {
                // (Slots are numbered alike on every core: this one takes its slots too, and
                // gives them up at once.)
                self.retire_slot(slot);
            }
        }
        if let Some(why) = refusal {
            let _ = reply.send((self.index, Err(why.into())));
            return;
        }
        self.reload = Some(Pending {
            plan,
            reply: Some(reply),
        });
        self.check_reload();
    }

    /// After each loop turn while a reload is prepared: answer once every warming slot has its
    /// floor of workers up, or as soon as one cannot start them.
    pub(super) fn check_reload(&mut self) {
        let Some(pending) = &self.reload else {
            return;
        };
        if pending.reply.is_none() {
            return;
        }
        let mut result = Ok(());
        for &(slot, _) in &pending.plan.start {
            let service = &self.services[slot];
            let pool = &service.pool;
            let stats = pool.stats();
            if pool.is_failing() || stats.failed_starts > 0 || stats.exits_crashed > 0 {
                result = Err(format!(
                    "service {}: its new workers do not start ({} failed starts, {} crashed; \
                     see the bridge log)",
                    service.name, stats.failed_starts, stats.exits_crashed
                ));
                break;
            }
            let floor = pool.policy().floor();
            if pool.idle() + pool.busy() < floor {
                return;
            }
        }
        let pending = self.reload.as_mut().expect("checked above");
        let reply = pending.reply.take().expect("checked above");
        let _ = reply.send((self.index, result));
    }

    fn commit_reload(&mut self) -> Result<(), String> {
        let Some(pending) = self.reload.take() else {
            return Err("no reload was prepared on this core".into());
        };
        let plan = pending.plan;
        for &slot in &plan.retire {
            self.retire_slot(slot);
        }
        for &(slot, config_index) in &plan.keep {
            // Same service, same workers: only the config it is named in moves (spawns use the
            // identical entry of the new config, whose executable descriptor is the same file).
            let service = &mut self.services[slot];
            service.config = Arc::clone(&plan.config);
            service.config_index = config_index;
        }
        for &(slot, config_index) in &plan.limits {
            let service = &mut self.services[slot];
            service.config = Arc::clone(&plan.config);
            service.config_index = config_index;
            let policy = plan.config.services[config_index].policy();
            self.set_service_limits(slot, &policy);
        }
        for &(slot, _) in &plan.start {
            self.services[slot].phase = SlotPhase::Live;
        }
        self.service_by_id.clear();
        self.service_by_name.clear();
        for (slot, service) in self.services.iter_enumerated() {
            if service.phase == SlotPhase::Live {
                self.service_by_id.insert(service.id, slot);
                self.service_by_name.insert(service.name.clone(), slot);
            }
        }
        self.config = Arc::clone(&plan.config);
        let cores = self.shared.cores.len() as u64;
        self.request_bytes_share = (self.config.request_bytes_buffered_max / cores).max(1);
        self.answer_bytes_share = (self.config.answer_bytes_buffered_max / cores).max(1);
        // A larger budget or in-flight bound may let paused callers read again.
        self.resume_pending
            .extend(self.budget_waiters.iter().copied());
        Ok(())
    }

    fn abort_reload(&mut self) {
        if let Some(pending) = self.reload.take() {
            for &(slot, _) in &pending.plan.start {
                self.retire_slot(slot);
            }
        }
    }

    /// The slot takes no new requests: it finishes what it holds and stops its workers.
    fn retire_slot(&mut self, slot: ServiceSlot) {
        let now = self.now;
        let service = &mut self.services[slot];
        if matches!(service.phase, SlotPhase::Retired | SlotPhase::Folded) {
            return;
        }
        service.phase = SlotPhase::Retired;
        self.retired_unfolded += 1;
        service.pool.begin_stop(now);
        let counts = &self.shared.cores[self.index].services[slot];
        counts.max_workers.store(0, Ordering::Relaxed);
        shared::publish(&counts.idle, 0);
        shared::publish(&counts.room, 0);
        self.pool_touched(slot);
    }

    /// Where a finished request of slot `slot` is counted: itself, or the live slot of its
    /// service once it was folded.
    pub(super) fn accounting_slot(&self, slot: ServiceSlot) -> ServiceSlot {
        let service = &self.services[slot];
        if service.phase != SlotPhase::Folded {
            return slot;
        }
        self.service_by_id.get(&service.id).copied().unwrap_or(slot)
    }

    /// From the timers, at most every `FOLD_CHECK_INTERVAL` while retired slots are left: fold
    /// each that has drained (pool stopped, no worker and no request of it left) into its
    /// service's live slot, so that the service's counts go on from where they were, and free
    /// its histograms. A removed service's slot just frees them.
    pub(super) fn fold_drained(&mut self) {
        if self.retired_unfolded == 0 || self.now < self.next_fold_check {
            return;
        }
        self.next_fold_check = self.now + FOLD_CHECK_INTERVAL;
        for slot in self.services.indices() {
            let service = &self.services[slot];
            if service.phase != SlotPhase::Retired || !service.pool.is_stopped() {
                continue;
            }
            let held = self.workers.iter().any(|(_, w)| w.service == slot)
                || self.requests.iter().any(|(_, r)| r.service == slot);
            if held {
                continue;
            }
            let live = self.service_by_id.get(&service.id).copied();
            let dead = &mut self.services[slot];
            dead.phase = SlotPhase::Folded;
            self.retired_unfolded -= 1;
            let latency = dead.latency.take();
            let counters = std::mem::take(&mut dead.counters);
            let mut stats = dead.pool.stats();
            stats.add(&dead.folded_stats);
            tracing::info!(
                service = %dead.name,
                %slot,
                "the retired workers of a reloaded service have all finished"
            );
            let Some(live) = live else {
                continue;
            };
            let into = &mut self.services[live];
            into.counters.add(&counters);
            into.folded_stats.add(&stats);
            if let (Some(from), Some(to)) = (latency, into.latency.as_mut()) {
                to.since_start.add(&from.since_start);
                to.interval.add(&from.interval);
                to.last_interval.add(&from.last_interval);
            }
        }
    }

    /// The slot a request of slot `slot` should run in now: itself, or, when a reload retired
    /// it, the live slot of the same service (a forward that was on its way).
    pub(super) fn serving_slot(&self, slot: ServiceSlot) -> ServiceSlot {
        let service = &self.services[slot];
        if !matches!(service.phase, SlotPhase::Retired | SlotPhase::Folded) {
            return slot;
        }
        self.service_by_id.get(&service.id).copied().unwrap_or(slot)
    }
}
