//! A configuration reload, the control thread's side (SIGHUP, `acgi-bridge reload`): load and
//! check the new config, plan it against the running one (`config::reload`), then drive every
//! core through prepare and commit (or abort), never blocking this thread's loop: replies are
//! collected with `try_recv` on each turn, and the whole reload is bounded by
//! `reload_timeout_ms`.
//!
//! ```text
//!   idle ──request──> load + check ──bad──> refused (logged, answered; nothing changes)
//!                          │ok
//!                          v
//!                     Preparing ──every core Ok──> Committing ──every core Ok──> done
//!                          │ an Err, or the timeout                                (new config)
//!                          v
//!                     Abort to every core ──> refused (the running config keeps serving)
//! ```
//!
//! One reload at a time: a request while one runs is refused with that reason. systemd hears
//! RELOADING=1 (with MONOTONIC_USEC) at the start and READY=1 at the end, whatever the result.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::Control;
use crate::config::reload::{self, Change};
use crate::config::Config;
use crate::engine::admission::{Access, Limits};
use crate::engine::index::{CoreIndex, IndexVec, ServiceSlot, TypedIndex};
use crate::engine::shared::{CorePlan, Msg, ReloadStep, SERVICE_SLOTS_MAX};

/// How often the loop looks at a running reload's replies.
pub(super) const RELOAD_POLL: Duration = Duration::from_millis(10);

/// The service slots of the running config (the same on every core).
pub(super) struct Slots {
    /// Slots handed out so far; the next new one is this.
    used: usize,
    /// The live slot of each service id.
    live: HashMap<u32, ServiceSlot>,
}

impl Slots {
    pub(super) fn new(config: &Config) -> Slots {
        Slots {
            used: config.services.len(),
            live: config
                .services
                .iter()
                .enumerate()
                .map(|(slot, service)| (service.id, ServiceSlot::from_usize(slot)))
                .collect(),
        }
    }
}

/// A reload under way.
pub(super) struct Running {
    phase: Phase,
    /// When it gives up (`reload_timeout_ms` of the new config).
    pub(super) deadline: Instant,
    started: Instant,
    replies: mpsc::Receiver<(CoreIndex, Result<(), String>)>,
    answered: IndexVec<CoreIndex, bool>,
    config: Arc<Config>,
    slots: Slots,
    summary: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Preparing,
    Committing,
}

/// How a reload ended: the line for the log and for `acgi-bridge reload`.
pub(super) type Outcome = Result<String, String>;

/// The admin answer of an outcome: `ok: ...` or `error: ...`.
pub(super) fn outcome_line(outcome: &Outcome) -> String {
    match outcome {
        Ok(line) => format!("ok: {line}\n"),
        Err(line) => format!("error: {line}\n"),
    }
}

impl Control {
    /// When the reloaded `config`'s TLS files differ from the running ones (by content: a
    /// renewed certificate keeps its file name), hand them to the TLS threads: new handshakes
    /// use them, open connections keep theirs. Returns the outcome's words for it.
    fn install_tls(&self, config: &Config) -> Option<String> {
        let new = config.listen.tls_server.as_ref()?;
        let old = self.config.listen.tls_server.as_ref()?;
        if new.1 == old.1 {
            return None;
        }
        crate::engine::tls::install(new);
        let cert = config
            .listen
            .tls_cert
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        Some(format!(
            "TLS: new handshakes use the certificate reloaded from {}",
            cert.display()
        ))
    }

    /// Begin a reload (SIGHUP or the admin command `reload`, whose connection then awaits
    /// `Awaited::Reload`). Returns the outcome at once when it ends before reaching the cores.
    pub(super) fn start_reload(&mut self) -> Option<Outcome> {
        if self.reload.is_none() {
            // Every reload, whatever its end, is RELOADING=1 then READY=1: `systemctl reload`
            // and Type=notify-reload wait for that pair.
            super::super::systemd::notify_reloading();
        }
        let outcome = self.begin_reload();
        if let Some(outcome) = &outcome {
            let status = match outcome {
                Ok(_) => "serving",
                Err(_) => "serving (the last reload was refused)",
            };
            super::super::systemd::notify_ready(status);
        }
        outcome
    }

    fn begin_reload(&mut self) -> Option<Outcome> {
        if self.reload.is_some() {
            tracing::info!("a reload is already running: its result answers this request too");
            return None;
        }
        if self.stopping {
            return Some(Err("the bridge is shutting down".into()));
        }
        let path = self.config.source.clone();
        tracing::info!(config = %path.display(), "reloading the configuration");
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(error) => {
                let why = format!("reload refused, the running configuration stays: {error}");
                tracing::error!("{why}");
                self.counters.reloads_failed += 1;
                return Some(Err(why));
            }
        };
        for warning in new.warnings() {
            tracing::warn!(key = %warning.key, "{}", warning.reason);
        }
        let plan = reload::plan(&self.config, &new);
        if plan.is_empty() {
            // (The TLS files may hold a new certificate under the same names: then the running
            // config takes the new TLS configuration, and nothing else.)
            let line = match self.install_tls(&new) {
                Some(tls) => {
                    let mut running = (*self.config).clone();
                    running.listen.tls_server = new.listen.tls_server.clone();
                    self.config = Arc::new(running);
                    self.counters.reloads += 1;
                    tls
                }
                None => "nothing changed".to_string(),
            };
            tracing::info!("reload: {line}");
            return Some(Ok(line));
        }
        let summary = plan.summary(&self.config, &new);
        let config = Arc::new(reload::effective(&self.config, new, &plan));
        let mut slots = Slots {
            used: self.slots.used,
            live: HashMap::new(),
        };
        let mut core_plan = CorePlan {
            config: Arc::clone(&config),
            start: Vec::new(),
            retire: Vec::new(),
            keep: Vec::new(),
            limits: Vec::new(),
        };
        let old_slot = |index: usize| self.slots.live[&self.config.services[index].id];
        for change in &plan.services {
            match *change {
                Change::Keep { old, new } => {
                    core_plan.keep.push((old_slot(old), new));
                    slots.live.insert(config.services[new].id, old_slot(old));
                }
                Change::Limits { old, new, .. } => {
                    core_plan.limits.push((old_slot(old), new));
                    slots.live.insert(config.services[new].id, old_slot(old));
                }
                Change::Start { new } | Change::Replace { new, .. } => {
                    let slot = ServiceSlot::from_usize(slots.used);
                    core_plan.start.push((slot, new));
                    slots.live.insert(config.services[new].id, slot);
                    slots.used += 1;
                }
                Change::Remove { .. } => {}
            }
            if let Change::Replace { old, .. } | Change::Remove { old } = *change {
                core_plan.retire.push(old_slot(old));
            }
        }
        if slots.used > SERVICE_SLOTS_MAX {
            let why = format!(
                "reload refused: it needs {} service slots and the bridge has {SERVICE_SLOTS_MAX} \
                 (every replaced service takes a new one); restart the bridge, or run \
                 `acgi-bridge upgrade`, to apply this configuration",
                slots.used
            );
            tracing::error!("{why}");
            self.counters.reloads_failed += 1;
            return Some(Err(why));
        }
        let (reply, replies) = mpsc::channel();
        let core_plan = Arc::new(core_plan);
        for core in self.shared.cores.indices() {
            let step = ReloadStep::Prepare {
                plan: Arc::clone(&core_plan),
                reply: reply.clone(),
            };
            self.shared.send(core, Msg::Reload(step));
        }
        let now = Instant::now();
        self.reload = Some(Running {
            phase: Phase::Preparing,
            deadline: now + Duration::from_millis(config.reload_timeout_ms),
            started: now,
            replies,
            answered: self.shared.cores.iter().map(|_| false).collect(),
            config,
            slots,
            summary,
        });
        None
    }

    /// On each turn while a reload runs: take the cores' replies and move it on. Returns the
    /// outcome once it has ended.
    pub(super) fn poll_reload(&mut self, now: Instant) -> Option<Outcome> {
        let running = self.reload.as_mut()?;
        let mut failure = None;
        while let Ok((core, result)) = running.replies.try_recv() {
            match result {
                Ok(()) => running.answered[core] = true,
                Err(why) => failure = failure.or(Some(format!("core {core}: {why}"))),
            }
        }
        let cores = running.answered.len();
        let done = running.answered.iter().filter(|a| **a).count();
        if failure.is_none() && done < cores && now >= running.deadline {
            failure = Some(format!(
                "{} of {cores} cores had the new workers up within reload_timeout_ms ({} ms)",
                done,
                running.deadline.duration_since(running.started).as_millis()
            ));
        }
        if let Some(why) = failure {
            let running = self.reload.take().expect("running");
            // The slots were handed out on every core, so they are spent either way.
            self.slots.used = running.slots.used;
            if running.phase == Phase::Preparing {
                for core in self.shared.cores.indices() {
                    self.shared.send(core, Msg::Reload(ReloadStep::Abort));
                }
            }
            let why = format!("reload refused, the running configuration stays: {why}");
            tracing::error!("{why}");
            self.counters.reloads_failed += 1;
            super::super::systemd::notify_ready("serving (the last reload was refused)");
            return Some(Err(why));
        }
        if done < cores {
            return None;
        }
        match running.phase {
            Phase::Preparing => {
                let (reply, replies) = mpsc::channel();
                for core in self.shared.cores.indices() {
                    let step = ReloadStep::Commit {
                        reply: reply.clone(),
                    };
                    self.shared.send(core, Msg::Reload(step));
                }
                running.phase = Phase::Committing;
                running.replies = replies;
                running.answered.fill(false);
                None
            }
            Phase::Committing => {
                let running = self.reload.take().expect("running");
                let config = running.config;
                self.shared
                    .admission
                    .update(Limits::from_config(&config), Access::from_config(&config));
                let tls = self.install_tls(&config);
                self.config = config;
                self.slots = running.slots;
                self.counters.reloads += 1;
                let took = running.started.elapsed();
                let mut line = format!("reloaded in {} ms: {}", took.as_millis(), running.summary);
                if let Some(tls) = tls {
                    line = format!("{line}; {tls}");
                }
                tracing::info!("{line}");
                super::super::systemd::notify_ready("serving (reloaded)");
                Some(Ok(line))
            }
        }
    }
}
