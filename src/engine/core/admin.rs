//! The operator's commands on this core (`acgi-bridge pause`, `resume`, `drain`, `recycle`,
//! `kill-worker`, `set`): the control thread sends one to every core (`Msg::Admin`), and each
//! carries it out on its own shard at once and answers on the channel the message carries.
//! Nothing here waits: a drain or a recycle is begun here and goes on in the pool, on the
//! loop's ordinary events; `status` shows how far it got.
//!
//! The pool decides (`Pool::pause`, `kill_worker`, `set_policy`, ...); this file finds the
//! worker by pid, answers the requests an admin kill took with `worker failed`, keeps the
//! published placement counts in step with new limits, and marks the pools it touched so
//! that the loop runs their actions.

use super::*;
use crate::engine::shared::{AdminCommand, AdminDone, AdminOutcome, AdminReply};
use crate::pool::{Intake, Policy, Refused};

impl Core {
    /// An operator's command: carry it out and answer at once (the control thread may have
    /// given up waiting: then nobody needs the answer).
    pub(super) fn on_admin(&mut self, command: AdminCommand, reply: AdminReply) {
        let outcome = self.run_admin(command);
        let _ = reply.send((self.index, outcome));
    }

    fn run_admin(&mut self, command: AdminCommand) -> AdminOutcome {
        let now = self.now;
        match command {
            AdminCommand::Pause { service } => {
                let service = self.live_slot(service)?;
                self.change_intake(service, |p| p.pause(now))
            }
            AdminCommand::Resume { service } => {
                let service = self.live_slot(service)?;
                self.change_intake(service, |p| p.resume(now))
            }
            AdminCommand::Drain { service } => {
                let service = self.live_slot(service)?;
                self.change_intake(service, |p| p.drain(now))
            }
            AdminCommand::Recycle { service } => {
                let service = self.live_slot(service)?;
                let workers = self.services[service]
                    .pool
                    .recycle(now)
                    .map_err(|refused| refusal(&self.services[service].name, refused))?;
                self.pool_touched(service);
                Ok(AdminDone::Recycling { workers })
            }
            AdminCommand::KillWorker { pid } => Ok(self.kill_worker_by_pid(pid)),
            AdminCommand::SetLimits {
                service: id,
                config,
            } => {
                let service = self.live_slot(id)?;
                let index = config
                    .services
                    .iter()
                    .position(|s| s.id == id)
                    .ok_or_else(|| format!("no service has id {id} in the new limits"))?;
                let intake = self.services[service].pool.intake();
                self.set_service_limits(service, &config.services[index].policy());
                // Messages that name the limits (`overloaded`) read them from the config.
                let entry = &mut self.services[service];
                entry.config = Arc::clone(&config);
                entry.config_index = index;
                self.config = config;
                Ok(self.service_done(service, intake))
            }
        }
    }

    /// The live slot of service `id` on this core.
    fn live_slot(&self, id: u32) -> Result<ServiceSlot, String> {
        self.service_by_id
            .get(&id)
            .copied()
            .ok_or_else(|| format!("no service has id {id} (a reload removed it?)"))
    }

    /// Pause, resume or drain the service's shard.
    fn change_intake(
        &mut self,
        service: ServiceSlot,
        change: impl FnOnce(&mut Pool) -> Result<Intake, Refused>,
    ) -> AdminOutcome {
        let before = change(&mut self.services[service].pool)
            .map_err(|refused| refusal(&self.services[service].name, refused))?;
        self.pool_touched(service);
        Ok(self.service_done(service, before))
    }

    fn service_done(&self, service: ServiceSlot, before: Intake) -> AdminDone {
        let pool = &self.services[service].pool;
        AdminDone::Service {
            before,
            busy: pool.busy(),
            waiting: pool.backlog_len(),
            workers: pool.workers_total(),
        }
    }

    /// New limits for `service` (`policy`: the whole service's, validated like the config):
    /// this core's shard of them goes to its pool and to the placement counts other cores
    /// read. Also the way for a reload to change limits live.
    pub(super) fn set_service_limits(&mut self, service: ServiceSlot, policy: &Policy) {
        let shard = policy.shard(self.index.usize(), self.shared.cores.len());
        let counts = &self.shared.cores[self.index].services[service];
        counts
            .max_workers
            .store(shard.max_workers, Ordering::Relaxed);
        let now = self.now;
        self.services[service].pool.set_policy(now, shard);
        self.pool_touched(service);
    }

    /// SIGKILL the worker with this pid, if it is one of this core's and alive: its requests
    /// get `worker failed` now, and its exit counts as an admin kill, not a crash.
    fn kill_worker_by_pid(&mut self, pid: i32) -> AdminDone {
        let found = self
            .workers
            .iter()
            .find(|(_, w)| w.pid == pid && w.state != WorkerState::Dead)
            .map(|(handle, w)| (handle, w.service));
        let Some((handle, service)) = found else {
            return AdminDone::NoSuchWorker;
        };
        let now = self.now;
        let held = self.services[service]
            .pool
            .kill_worker(now, handle.to_raw());
        let worker = &mut self.workers[handle];
        if worker.state != WorkerState::Stopping {
            worker.state = WorkerState::Stopping;
            // Jobs queued behind its running one are among `held`.
            worker.queued.clear();
        }
        let fate = "killed by an operator (acgi-bridge kill-worker)";
        worker.fate = Some(fate.to_string());
        tracing::info!(service = %self.services[service].name, pid, "{fate}");
        let requests = held.len() as u32;
        for request in held.into_iter().map(RequestHandle::from_raw) {
            if self.request_is_live(request) {
                let message = format!("the worker (pid {pid}) was {fate}");
                self.fail_request(request, ErrorCode::WorkerFailed, &message);
            }
        }
        self.pool_touched(service);
        let service_id = self.services[service].id;
        AdminDone::Killed {
            service_id,
            requests,
        }
    }
}

/// Why a service's pool refused a command, naming it.
fn refusal(name: &str, refused: Refused) -> String {
    format!("service {name}: {refused}")
}
