//! The pool policy of one service: a pure state machine, no syscalls, no clocks of its own.
//!
//! The engine feeds it events (a request arrived, a worker became ready, a job finished, a
//! worker exited, the time passed) with the current time, and drains the resulting [`Action`]s
//! (spawn a worker, dispatch a request to a worker, reject a request, stop a worker) with
//! [`Pool::next_action`]. [`Pool::next_deadline`] says when it next wants a `tick`. Because it
//! never touches the outside world, it is tested exhaustively and driven in simulations.
//!
//! Workers are counted in three disjoint sets: starting (spawned, no handshake yet), idle, and
//! busy (holding exactly one request). Requests wait in a bounded FIFO backlog while no worker is
//! idle. Invariants (checked by [`Pool::check_invariants`]):
//! - starting + idle + busy <= max_workers;
//! - the backlog is empty whenever a worker is idle;
//! - backlog length <= backlog_max;
//! - no worker is both idle and busy, and a request is held by at most one worker.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::proto::ErrorCode;

/// The engine's handle for a worker (opaque to the policy).
pub type WorkerId = u64;
/// The engine's handle for a request (opaque to the policy).
pub type RequestId = u64;

/// The pool's bounds, from the service's config.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub min_workers: u32,
    pub max_workers: u32,
    pub backlog_max: u32,
}

/// What the engine must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start one worker. The policy already counts it as starting; the engine answers with
    /// `on_worker_ready(id)` or `on_start_failed()`.
    Spawn,
    /// Hand `request` to the idle `worker`, which is now busy.
    Dispatch {
        request: RequestId,
        worker: WorkerId,
    },
    /// Answer `request` with an error without running it.
    Reject { request: RequestId, code: ErrorCode },
    /// Stop this (idle) worker; it has left the pool.
    Stop { worker: WorkerId },
}

/// Why a worker left the pool (reported by the engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited or was killed while idle or busy.
    Died,
    /// The engine stopped it on the policy's `Stop`.
    Stopped,
}

/// Counters for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub spawns: u64,
    pub start_failures: u64,
    pub deaths: u64,
    pub dispatched: u64,
    pub rejected_overloaded: u64,
    pub rejected_shutting_down: u64,
    pub rejected_unavailable: u64,
    pub backlog_len_max: u32,
}

/// First delay before retrying after a failed start; doubles per failure up to the maximum.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Pool {
    limits: Limits,
    starting: u32,
    idle: VecDeque<WorkerId>,
    busy: BTreeMap<WorkerId, RequestId>,
    backlog: VecDeque<RequestId>,
    actions: VecDeque<Action>,
    stopping: bool,
    /// Failed starts since the last clean one.
    start_failures_in_a_row: u32,
    /// No spawn before this instant (restart backoff).
    spawn_not_before: Option<Instant>,
    stats: Stats,
}

impl Pool {
    /// A pool that immediately asks for `min_workers` spawns.
    pub fn new(limits: Limits) -> Pool {
        assert!(limits.max_workers >= 1);
        assert!(limits.min_workers <= limits.max_workers);
        let mut pool = Pool {
            limits,
            starting: 0,
            idle: VecDeque::new(),
            busy: BTreeMap::new(),
            backlog: VecDeque::new(),
            actions: VecDeque::new(),
            stopping: false,
            start_failures_in_a_row: 0,
            spawn_not_before: None,
            stats: Stats::default(),
        };
        pool.refill();
        pool
    }

    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn workers_total(&self) -> u32 {
        self.starting + self.idle.len() as u32 + self.busy.len() as u32
    }

    pub fn starting(&self) -> u32 {
        self.starting
    }

    pub fn idle(&self) -> u32 {
        self.idle.len() as u32
    }

    pub fn busy(&self) -> u32 {
        self.busy.len() as u32
    }

    pub fn backlog_len(&self) -> u32 {
        self.backlog.len() as u32
    }

    /// When the policy next wants `tick` (a restart backoff expiring).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.spawn_not_before
    }

    /// A request arrived for this service.
    pub fn on_request(&mut self, now: Instant, request: RequestId) {
        if self.stopping {
            self.stats.rejected_shutting_down += 1;
            self.actions.push_back(Action::Reject {
                request,
                code: ErrorCode::ShuttingDown,
            });
            return;
        }
        if let Some(worker) = self.idle.pop_back() {
            self.dispatch(request, worker);
            return;
        }
        if self.backlog.len() as u32 >= self.limits.backlog_max {
            self.stats.rejected_overloaded += 1;
            self.actions.push_back(Action::Reject {
                request,
                code: ErrorCode::Overloaded,
            });
            return;
        }
        if self.workers_total() == 0 && self.spawn_not_before.is_some_and(|t| now < t) {
            // Nothing runs and the last starts failed: fail fast instead of queueing into a
            // pool that cannot serve.
            self.stats.rejected_unavailable += 1;
            self.actions.push_back(Action::Reject {
                request,
                code: ErrorCode::ServiceUnavailable,
            });
            return;
        }
        self.backlog.push_back(request);
        self.stats.backlog_len_max = self.stats.backlog_len_max.max(self.backlog.len() as u32);
        self.grow(now);
    }

    /// A worker finished its handshake.
    pub fn on_worker_ready(&mut self, worker: WorkerId) {
        assert!(self.starting > 0, "ready without a start");
        self.starting -= 1;
        self.start_failures_in_a_row = 0;
        self.spawn_not_before = None;
        self.release(worker);
    }

    /// A start failed (exec failed, or the worker died or misbehaved before its handshake).
    pub fn on_start_failed(&mut self, now: Instant) {
        assert!(self.starting > 0, "start failure without a start");
        self.starting -= 1;
        self.stats.start_failures += 1;
        self.start_failures_in_a_row += 1;
        let shift = self.start_failures_in_a_row.saturating_sub(1).min(16);
        let delay = RESTART_BACKOFF_FIRST
            .saturating_mul(1 << shift)
            .min(RESTART_BACKOFF_MAX);
        self.spawn_not_before = Some(now + delay);
        if self.workers_total() == 0 {
            // Nobody can serve the backlog until a start succeeds: answer it now.
            while let Some(request) = self.backlog.pop_front() {
                self.stats.rejected_unavailable += 1;
                self.actions.push_back(Action::Reject {
                    request,
                    code: ErrorCode::ServiceUnavailable,
                });
            }
        }
        self.finish_stop_if_drained();
    }

    /// The busy `worker` finished its request (replied, or failed it without dying).
    pub fn on_job_done(&mut self, worker: WorkerId) {
        assert!(
            self.busy.remove(&worker).is_some(),
            "job done by a worker that was not busy"
        );
        self.release(worker);
    }

    /// A worker that had finished its handshake left: it died, or was stopped on our `Stop`.
    /// Returns the request it held, which the engine must answer with `worker failed`.
    pub fn on_worker_exit(
        &mut self,
        now: Instant,
        worker: WorkerId,
        exit: Exit,
    ) -> Option<RequestId> {
        let held = self.busy.remove(&worker);
        if let Some(position) = self.idle.iter().position(|w| *w == worker) {
            self.idle.remove(position);
        }
        if exit == Exit::Died {
            self.stats.deaths += 1;
        }
        self.grow(now);
        self.refill();
        self.finish_stop_if_drained();
        held
    }

    /// Time passed: a restart backoff may have expired.
    pub fn tick(&mut self, now: Instant) {
        if self.spawn_not_before.is_some_and(|t| now >= t) {
            self.spawn_not_before = None;
            self.grow(now);
            self.refill();
        }
    }

    /// Stop taking requests; requests already accepted (busy or in the backlog) are still
    /// served, then every worker is stopped.
    pub fn begin_stop(&mut self) {
        self.stopping = true;
        self.finish_stop_if_drained();
    }

    /// True once stopping and nothing is held, queued or starting.
    pub fn is_stopped(&self) -> bool {
        self.stopping
            && self.busy.is_empty()
            && self.backlog.is_empty()
            && self.idle.is_empty()
            && self.starting == 0
    }

    /// Give up on everything queued (shutdown timeout): reject the backlog.
    pub fn reject_backlog(&mut self, code: ErrorCode) {
        while let Some(request) = self.backlog.pop_front() {
            self.actions.push_back(Action::Reject { request, code });
        }
        self.finish_stop_if_drained();
    }

    fn dispatch(&mut self, request: RequestId, worker: WorkerId) {
        assert!(!self.busy.contains_key(&worker));
        self.busy.insert(worker, request);
        self.stats.dispatched += 1;
        self.actions.push_back(Action::Dispatch { request, worker });
    }

    /// A worker is free: give it the oldest waiting request, else make it idle.
    fn release(&mut self, worker: WorkerId) {
        if let Some(request) = self.backlog.pop_front() {
            self.dispatch(request, worker);
        } else if self.stopping {
            self.actions.push_back(Action::Stop { worker });
            self.finish_stop_if_drained();
        } else {
            self.idle.push_back(worker);
        }
    }

    fn may_spawn(&self, now: Instant) -> bool {
        !self.stopping
            && self.workers_total() < self.limits.max_workers
            && self.spawn_not_before.is_none_or(|t| now >= t)
    }

    /// Start workers for waiting requests that no starting worker will take.
    fn grow(&mut self, now: Instant) {
        while (self.starting as usize) < self.backlog.len() && self.may_spawn(now) {
            self.spawn();
        }
    }

    /// Keep at least `min_workers` (unless a restart backoff is running).
    fn refill(&mut self) {
        while !self.stopping
            && self.workers_total() < self.limits.min_workers
            && self.spawn_not_before.is_none()
        {
            self.spawn();
        }
    }

    fn spawn(&mut self) {
        self.starting += 1;
        self.stats.spawns += 1;
        self.actions.push_back(Action::Spawn);
    }

    fn finish_stop_if_drained(&mut self) {
        if self.stopping && self.busy.is_empty() && self.backlog.is_empty() {
            while let Some(worker) = self.idle.pop_front() {
                self.actions.push_back(Action::Stop { worker });
            }
        }
    }

    /// Panics when an invariant is broken (debug builds and tests).
    pub fn check_invariants(&self) {
        assert!(
            self.workers_total() <= self.limits.max_workers,
            "over max_workers"
        );
        assert!(
            self.idle.is_empty() || self.backlog.is_empty(),
            "idle worker while requests wait"
        );
        assert!(
            self.backlog.len() as u32 <= self.limits.backlog_max,
            "backlog over its bound"
        );
        for worker in &self.idle {
            assert!(
                !self.busy.contains_key(worker),
                "worker {worker} idle and busy"
            );
        }
        let mut held: Vec<RequestId> = self.busy.values().copied().collect();
        held.sort_unstable();
        held.dedup();
        assert_eq!(held.len(), self.busy.len(), "a request held by two workers");
        for request in &self.backlog {
            assert!(!held.contains(request), "request {request} queued and held");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(min: u32, max: u32, backlog: u32) -> Limits {
        Limits {
            min_workers: min,
            max_workers: max,
            backlog_max: backlog,
        }
    }

    fn drain(pool: &mut Pool) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(action) = pool.next_action() {
            actions.push(action);
        }
        pool.check_invariants();
        actions
    }

    #[test]
    fn starts_min_workers_and_reuses_idle_ones() {
        // Proves the pool spawns min_workers up front and dispatches to an idle worker.
        let now = Instant::now();
        let mut pool = Pool::new(limits(2, 4, 10));
        assert_eq!(drain(&mut pool), vec![Action::Spawn, Action::Spawn]);
        pool.on_worker_ready(100);
        pool.on_worker_ready(101);
        assert!(drain(&mut pool).is_empty());
        pool.on_request(now, 1);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Dispatch {
                request: 1,
                worker: 101
            }]
        );
        pool.on_job_done(101);
        pool.on_request(now, 2);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Dispatch {
                request: 2,
                worker: 101
            }]
        );
    }

    #[test]
    fn grows_to_max_then_queues_then_rejects() {
        // Proves growth stops at max_workers, the backlog is bounded, and beyond it: overloaded.
        let now = Instant::now();
        let mut pool = Pool::new(limits(0, 2, 2));
        assert!(drain(&mut pool).is_empty());
        pool.on_request(now, 1);
        pool.on_request(now, 2);
        assert_eq!(drain(&mut pool), vec![Action::Spawn, Action::Spawn]);
        pool.on_request(now, 3);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Reject {
                request: 3,
                code: ErrorCode::Overloaded
            }]
        );
        pool.on_worker_ready(10);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Dispatch {
                request: 1,
                worker: 10
            }]
        );
        pool.on_request(now, 4);
        assert!(
            drain(&mut pool).is_empty(),
            "queued behind the starting worker"
        );
        pool.on_job_done(10);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Dispatch {
                request: 2,
                worker: 10
            }]
        );
        assert_eq!(pool.backlog_len(), 1);
    }

    #[test]
    fn a_dead_busy_worker_returns_its_request_and_is_replaced() {
        // Proves the engine learns which request to fail, and the pool refills to min.
        let now = Instant::now();
        let mut pool = Pool::new(limits(1, 1, 4));
        drain(&mut pool);
        pool.on_worker_ready(7);
        pool.on_request(now, 1);
        drain(&mut pool);
        assert_eq!(pool.on_worker_exit(now, 7, Exit::Died), Some(1));
        assert_eq!(drain(&mut pool), vec![Action::Spawn]);
        assert_eq!(pool.stats().deaths, 1);
    }

    #[test]
    fn failed_starts_back_off_and_fail_the_backlog_fast() {
        // Proves a pool that cannot start workers answers waiting requests instead of hanging,
        // and retries only after the backoff.
        let now = Instant::now();
        let mut pool = Pool::new(limits(1, 2, 4));
        drain(&mut pool);
        pool.on_request(now, 1);
        assert!(
            drain(&mut pool).is_empty(),
            "the min worker already starting will take it"
        );
        pool.on_request(now, 2);
        assert_eq!(drain(&mut pool), vec![Action::Spawn]);
        pool.on_start_failed(now);
        pool.on_start_failed(now);
        let actions = drain(&mut pool);
        assert_eq!(
            actions,
            vec![
                Action::Reject {
                    request: 1,
                    code: ErrorCode::ServiceUnavailable
                },
                Action::Reject {
                    request: 2,
                    code: ErrorCode::ServiceUnavailable
                }
            ]
        );
        pool.on_request(now, 3);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Reject {
                request: 3,
                code: ErrorCode::ServiceUnavailable
            }]
        );
        let deadline = pool.next_deadline().expect("backoff deadline");
        assert!(deadline > now);
        pool.tick(deadline);
        assert_eq!(drain(&mut pool), vec![Action::Spawn]);
        pool.on_worker_ready(3);
        assert_eq!(pool.next_deadline(), None);
    }

    #[test]
    fn stopping_serves_the_backlog_then_stops_every_worker() {
        // Proves graceful stop: accepted requests finish, new ones are refused, workers stop.
        let now = Instant::now();
        let mut pool = Pool::new(limits(2, 2, 4));
        drain(&mut pool);
        pool.on_worker_ready(1);
        pool.on_worker_ready(2);
        pool.on_request(now, 10);
        pool.on_request(now, 11);
        pool.on_request(now, 12);
        drain(&mut pool);
        pool.begin_stop();
        pool.on_request(now, 13);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Reject {
                request: 13,
                code: ErrorCode::ShuttingDown
            }]
        );
        pool.on_job_done(2);
        assert_eq!(
            drain(&mut pool),
            vec![Action::Dispatch {
                request: 12,
                worker: 2
            }]
        );
        pool.on_job_done(1);
        assert_eq!(drain(&mut pool), vec![Action::Stop { worker: 1 }]);
        assert!(!pool.is_stopped());
        pool.on_job_done(2);
        assert_eq!(drain(&mut pool), vec![Action::Stop { worker: 2 }]);
        assert!(pool.is_stopped());
        assert_eq!(pool.on_worker_exit(now, 1, Exit::Stopped), None);
        assert!(drain(&mut pool).is_empty(), "no refill while stopping");
    }

    #[test]
    fn seeded_random_walk_keeps_invariants_and_answers_every_request_once() {
        // Proves, over many random event orders, that every request is dispatched or rejected
        // exactly once and the invariants hold after every step.
        for seed in 1..=200u64 {
            let mut rng = seed;
            let mut next = move |bound: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % bound
            };
            let mut now = Instant::now();
            let max = 1 + next(4) as u32;
            let mut pool = Pool::new(limits(next(max as u64 + 1) as u32, max, next(5) as u32));
            let mut starting = 0u32;
            let mut idle_or_busy: Vec<(WorkerId, Option<RequestId>)> = Vec::new();
            let mut answered: BTreeMap<RequestId, u32> = BTreeMap::new();
            let mut next_worker = 1000;
            let mut sent = 0u64;
            for _ in 0..400 {
                match next(6) {
                    0 | 1 => {
                        sent += 1;
                        pool.on_request(now, sent);
                    }
                    2 if starting > 0 => {
                        starting -= 1;
                        if next(4) == 0 {
                            pool.on_start_failed(now);
                        } else {
                            next_worker += 1;
                            idle_or_busy.push((next_worker, None));
                            pool.on_worker_ready(next_worker);
                        }
                    }
                    3 => {
                        if let Some(i) = idle_or_busy.iter().position(|(_, r)| r.is_some()) {
                            let (worker, request) = idle_or_busy[i];
                            *answered.entry(request.unwrap()).or_default() += 1;
                            idle_or_busy[i].1 = None;
                            pool.on_job_done(worker);
                        }
                    }
                    4 if !idle_or_busy.is_empty() => {
                        let i = next(idle_or_busy.len() as u64) as usize;
                        let (worker, held) = idle_or_busy.remove(i);
                        let returned = pool.on_worker_exit(now, worker, Exit::Died);
                        assert_eq!(returned, held);
                        if let Some(request) = held {
                            *answered.entry(request).or_default() += 1;
                        }
                    }
                    _ => {
                        now += Duration::from_millis(next(300));
                        pool.tick(now);
                    }
                }
                while let Some(action) = pool.next_action() {
                    match action {
                        Action::Spawn => starting += 1,
                        Action::Dispatch { request, worker } => {
                            let entry = idle_or_busy.iter_mut().find(|(w, _)| *w == worker);
                            let entry = entry.expect("dispatch to a known worker");
                            assert_eq!(entry.1, None, "seed {seed}: dispatch to a busy worker");
                            entry.1 = Some(request);
                        }
                        Action::Reject { request, .. } => {
                            *answered.entry(request).or_default() += 1;
                        }
                        Action::Stop { .. } => unreachable!("no stop without begin_stop"),
                    }
                }
                pool.check_invariants();
                assert_eq!(pool.starting(), starting, "seed {seed}");
            }
            assert!(
                answered.values().all(|n| *n == 1),
                "seed {seed}: answered twice"
            );
            let queued = pool.backlog_len() as u64;
            let held = idle_or_busy.iter().filter(|(_, r)| r.is_some()).count() as u64;
            assert_eq!(
                answered.len() as u64 + queued + held,
                sent,
                "seed {seed}: lost a request"
            );
        }
    }
}
