//! The chaos thread: at seeded random intervals it SIGKILLs a worker, SIGSTOPs one (and
//! SIGCONTs it later), makes a caller close its connection with requests in flight or in the
//! middle of a payload, or makes a caller stop reading for a while.
//!
//! Every draw comes from one SplitMix64 stream of the seed, in a fixed order per step (the
//! interval, the action, the target, the duration), so `--seed` replays the same schedule of
//! actions. The system under it does not replay: which pid a "random worker" is, what it is
//! doing at that moment and which requests are in flight depend on timing.
//!
//! At most one worker is stopped and one caller stalled at a time, so that the pools and the
//! other callers always have something to make progress with; a stall during which no other
//! caller got an answer is counted as starved (the bridge must keep serving the others).
//! Workers are signalled only while /proc says they are live children of the bridge.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::bridge;
use super::caller::{Shared, ABORT_MID_PAYLOAD, ABORT_MID_REQUEST};
use super::tally::{add, get};
use crate::mix::Rng;

const TICK: Duration = Duration::from_millis(10);

/// A range of milliseconds, both ends included.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub low_ms: u64,
    pub high_ms: u64,
}

impl Span {
    fn draw(self, rng: &mut Rng) -> Duration {
        let width = self.high_ms.saturating_sub(self.low_ms) + 1;
        Duration::from_millis(self.low_ms + rng.next_u64() % width)
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub interval: Span,
    pub stop: Span,
    pub stall: Span,
    pub callers: u32,
    pub admin: PathBuf,
    pub bridge_pid: i32,
    pub until: Instant,
    /// The actions taken (the others are drawn, so the schedule stays the seed's, and skipped).
    pub actions: Vec<Action>,
    /// Never abort caller 0 (the self-test's reply must stay in flight to be found lost).
    pub spare_first_caller: bool,
}

/// The actions, with their weights out of 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    Kill,
    Stop,
    AbortMidRequest,
    AbortMidPayload,
    Stall,
}

impl Action {
    fn draw(rng: &mut Rng) -> Action {
        match rng.next_u64() % 100 {
            0..=39 => Action::Kill,
            40..=59 => Action::Stop,
            60..=74 => Action::AbortMidRequest,
            75..=89 => Action::AbortMidPayload,
            _ => Action::Stall,
        }
    }
}

struct Stalled {
    caller: usize,
    until: Instant,
    others_before: u64,
}

struct Chaos {
    plan: Plan,
    shared: Arc<Shared>,
    rng: Rng,
    stopped: Option<(i32, Instant)>,
    stalled: Option<Stalled>,
}

pub fn run(plan: Plan, shared: Arc<Shared>) {
    let rng = Rng::for_stream(plan.seed, 0xC4A0_5000);
    let mut chaos = Chaos {
        plan,
        shared,
        rng,
        stopped: None,
        stalled: None,
    };
    let mut next = Instant::now() + chaos.plan.interval.draw(&mut chaos.rng);
    while Instant::now() < chaos.plan.until {
        std::thread::sleep(TICK);
        let now = Instant::now();
        chaos.release(now, false);
        if now >= next {
            chaos.act(now);
            next = now + chaos.plan.interval.draw(&mut chaos.rng);
        }
    }
    chaos.release(Instant::now(), true);
}

impl Chaos {
    /// SIGCONT the stopped worker and end the stall when due (or now, at the end).
    fn release(&mut self, now: Instant, all: bool) {
        if let Some((pid, due)) = self.stopped {
            if all || now >= due {
                if bridge::signal_child(pid, self.plan.bridge_pid, Signal::CONT) {
                    add(&self.shared.tally.conts, 1);
                }
                self.stopped = None;
            }
        }
        if let Some(stall) = &self.stalled {
            if all || now >= stall.until {
                let others = self.others_answers(stall.caller);
                if !all && others == stall.others_before && self.plan.callers > 1 {
                    add(&self.shared.tally.stalls_starved, 1);
                    self.shared.tally.problem(format!(
                        "while caller {} did not read, no other caller got an answer",
                        stall.caller
                    ));
                }
                self.shared.controls[stall.caller]
                    .stall_until_ms
                    .store(0, Ordering::Relaxed);
                self.stalled = None;
            }
        }
    }

    fn others_answers(&self, caller: usize) -> u64 {
        let answers = &self.shared.answers;
        let all: u64 = answers.iter().map(get).sum();
        all - get(&answers[caller])
    }

    fn act(&mut self, now: Instant) {
        // Draw everything first, whatever the action, so the schedule does not depend on
        // whether an action could be taken.
        let action = Action::draw(&mut self.rng);
        let pick = self.rng.next_u64();
        let stop_for = self.plan.stop.draw(&mut self.rng);
        let stall_for = self.plan.stall.draw(&mut self.rng);
        let caller = self.pick_caller(pick, action);
        if !self.plan.actions.contains(&action) {
            return;
        }
        match action {
            Action::Kill => {
                if let Some(pid) = self.pick_worker(pick) {
                    if bridge::signal_child(pid, self.plan.bridge_pid, Signal::KILL) {
                        add(&self.shared.tally.kills, 1);
                    }
                }
            }
            Action::Stop if self.stopped.is_none() => {
                if let Some(pid) = self.pick_worker(pick) {
                    if bridge::signal_child(pid, self.plan.bridge_pid, Signal::STOP) {
                        add(&self.shared.tally.stops, 1);
                        self.stopped = Some((pid, now + stop_for));
                    }
                }
            }
            Action::AbortMidRequest | Action::AbortMidPayload => {
                let abort = if action == Action::AbortMidRequest {
                    ABORT_MID_REQUEST
                } else {
                    ABORT_MID_PAYLOAD
                };
                self.shared.controls[caller]
                    .abort
                    .store(abort, Ordering::Release);
            }
            Action::Stall if self.stalled.is_none() => {
                let until_ms = self.shared.now_ms() + stall_for.as_millis() as u64;
                self.shared.controls[caller]
                    .stall_until_ms
                    .store(until_ms, Ordering::Relaxed);
                add(&self.shared.tally.stalls, 1);
                self.stalled = Some(Stalled {
                    caller,
                    until: now + stall_for,
                    others_before: self.others_answers(caller),
                });
            }
            Action::Stop | Action::Stall => {}
        }
    }

    fn pick_caller(&self, pick: u64, action: Action) -> usize {
        let aborts = matches!(action, Action::AbortMidRequest | Action::AbortMidPayload);
        let first = u64::from(aborts && self.plan.spare_first_caller && self.plan.callers > 1);
        (first + pick % (u64::from(self.plan.callers) - first)) as usize
    }

    /// A worker by `pick`, from the bridge's own list (never the stopped one).
    fn pick_worker(&self, pick: u64) -> Option<i32> {
        let status = match bridge::status(&self.plan.admin) {
            Ok(status) => status,
            Err(error) => {
                // The admin socket refuses when a core does not report in time (a machine too
                // busy to schedule it): that costs this action, and is reported, not failed.
                let before = self
                    .shared
                    .tally
                    .status_errors
                    .fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    // The first only: the rest are counted (they would crowd out the others).
                    let problem = format!("status during the run (first failure): {error:#}");
                    self.shared.tally.problem(problem);
                }
                return None;
            }
        };
        let mut pids = bridge::worker_pids(&status);
        pids.retain(|pid| Some(*pid) != self.stopped.map(|(stopped, _)| stopped));
        pids.sort_unstable();
        (!pids.is_empty()).then(|| pids[(pick % pids.len() as u64) as usize])
    }
}
