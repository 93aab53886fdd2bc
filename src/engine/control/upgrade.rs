//! The control thread's side of a binary upgrade (SIGUSR2, admin `upgrade`): start one on an
//! upgrade thread of its own (`engine::upgrade::upgrade` blocks until the new bridge is ready
//! or has failed), answer every `upgrade` command waiting for it, and on success tell systemd
//! the new main pid and begin the drain.
//!
//! ```text
//!   Idle --SIGUSR2 / `upgrade`--> Starting --ready--> HandedOver (drain; the process exits)
//!                                 Starting --failed--> Idle (the error is logged and answered)
//!   Starting --`upgrade`--> Starting (one more waiter)
//! ```
//!
//! Invariants: at most one upgrade thread at a time; the drain begins only after the new
//! bridge said it is ready; once handed over the socket files are never unlinked (they are the
//! new bridge's now), even by a later SIGTERM.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::conn::{Awaited, Next};
use super::{Control, Msg};
use crate::engine::upgrade::{self, Handover, Origin, Ready, UpgradeError};

/// How long past [`upgrade::READY_TIMEOUT`] an `upgrade` command may wait for its answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// What the engine records at startup for an upgrade.
pub struct UpgradeSetup {
    pub origin: Origin,
    pub handover: Handover,
}

enum State {
    Idle,
    /// The upgrade thread runs; its result comes on `results`, and it writes `wake`.
    Starting {
        results: mpsc::Receiver<Result<Ready, UpgradeError>>,
        since: Instant,
    },
    /// The new bridge `pid` serves; this one drains.
    HandedOver,
}

pub(super) struct Upgrade {
    setup: UpgradeSetup,
    state: State,
    /// Written by the upgrade thread once its result is sent.
    wake: OwnedFd,
}

impl Upgrade {
    pub(super) fn new(setup: UpgradeSetup) -> anyhow::Result<Upgrade> {
        use anyhow::Context;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .context("creating the upgrade eventfd")?;
        Ok(Upgrade {
            setup,
            state: State::Idle,
            wake,
        })
    }

    pub(super) fn wake(&self) -> &OwnedFd {
        &self.wake
    }
}

impl Control {
    /// SIGUSR2 (`waiter: None`) or an `upgrade` command on connection `waiter`: start an
    /// upgrade, or join the one under way.
    pub(super) fn begin_upgrade(&mut self, waiter: Option<usize>) -> Next {
        let refused = match self.upgrade.state {
            State::HandedOver => Some(UpgradeError::Stopping),
            _ if self.stopping => Some(UpgradeError::Stopping),
            State::Starting { .. } => {
                tracing::info!("upgrade: one is under way already; waiting for it");
                None
            }
            State::Idle => self.start_upgrade_thread().err(),
        };
        if let Some(error) = refused {
            tracing::warn!("upgrade refused: {error}");
            return match waiter {
                Some(index) => self.conns[index].answer_line(format!("error: {error}\n")),
                None => Next::Wait,
            };
        }
        if let Some(index) = waiter {
            let deadline = Instant::now() + upgrade::READY_TIMEOUT + ANSWER_MARGIN;
            self.conns[index].await_outcome(Awaited::Upgrade, deadline);
        }
        Next::Wait
    }

    fn start_upgrade_thread(&mut self) -> Result<(), UpgradeError> {
        tracing::info!(
            exe = %self.upgrade.setup.origin.exe.display(),
            "upgrade: starting a new bridge to take over the listeners"
        );
        let handover = self
            .upgrade
            .setup
            .handover
            .try_clone()
            .map_err(UpgradeError::Setup)?;
        let origin = self.upgrade.setup.origin.clone();
        let wake = self.upgrade.wake.try_clone().map_err(UpgradeError::Setup)?;
        // systemd's period (the control thread pets at half of it).
        let watchdog = self.watchdog.map(|(every, _)| every * 2);
        let (sender, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("acgi-upgrade".into())
            .spawn(move || {
                crate::alloc_count::stop_counting_this_thread();
                let _ = sender.send(upgrade::upgrade(&origin, &handover, watchdog));
                let _ = rustix::io::write(&wake, &1u64.to_ne_bytes());
            })
            .map_err(UpgradeError::Setup)?;
        self.upgrade.state = State::Starting {
            results,
            since: Instant::now(),
        };
        Ok(())
    }

    /// The upgrade thread has finished: hand over (and drain), or go back to serving. Returns
    /// the connections to close (answered).
    pub(super) fn on_upgrade_result(&mut self) -> Vec<usize> {
        let _ = rustix::io::read(&self.upgrade.wake, &mut [0u8; 8]);
        let State::Starting { results, since } = &self.upgrade.state else {
            return Vec::new();
        };
        let took = since.elapsed();
        let result = match results.try_recv() {
            Ok(result) => result,
            Err(mpsc::TryRecvError::Empty) => return Vec::new(),
            Err(mpsc::TryRecvError::Disconnected) => Err(UpgradeError::Setup(
                std::io::Error::other("the upgrade thread ended without a result"),
            )),
        };
        let line = match result {
            Ok(ready) if self.stopping => {
                // A stop signal came meanwhile: the operator wants no bridge, old or new.
                self.upgrade.state = State::Idle;
                tracing::warn!(
                    new_pid = ready.pid,
                    "upgrade: stopping meanwhile; stopping the new bridge too"
                );
                if let Some(pid) = rustix::process::Pid::from_raw(ready.pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                format!("error: upgrade failed: {}\n", UpgradeError::Stopping)
            }
            Ok(ready) => {
                let pid = ready.pid;
                self.upgrade.state = State::HandedOver;
                tracing::info!(
                    new_pid = pid,
                    took_ms = took.as_millis() as u64,
                    "upgrade: the new bridge is ready; this one stops accepting, answers what \
                     it accepted and exits (its counters go with it)"
                );
                crate::engine::systemd::notify_main_pid(pid);
                ready.acknowledge();
                self.begin_drain();
                format!(
                    "upgraded: pid {pid} serves now; pid {} drains and exits ({} ms)\n",
                    std::process::id(),
                    took.as_millis()
                )
            }
            Err(error) => {
                self.upgrade.state = State::Idle;
                tracing::error!("upgrade failed, this bridge keeps serving: {error}");
                format!("error: upgrade failed: {error}\n")
            }
        };
        let mut closed = Vec::new();
        for index in 0..self.conns.len() {
            if self.conns[index].awaiting() == Some(Awaited::Upgrade)
                && self.conns[index].answer_line(line.clone()) == Next::Close
            {
                closed.push(index);
            }
        }
        closed
    }

    /// Stop accepting and drain: as a graceful stop, but the socket files stay (the new bridge
    /// serves them), the metrics listener closes at once (the new one answers /readyz), and
    /// systemd hears no STOPPING=1 (the service goes on).
    fn begin_drain(&mut self) {
        self.stopping = true;
        // Before telling any core: see `shared` on not losing a forwarded request.
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.unlink_at_stop.clear();
        self.admin = None;
        self.metrics = None;
        for core in self.shared.cores.indices() {
            self.shared.send(core, Msg::Drain);
        }
    }
}
