//! The pool policy of one service: a pure state machine, no syscalls, no clock of its own.
//!
//! The engine feeds it events with the current time (a request arrived, a worker process
//! started, finished its handshake, finished a job, is gone; time passed) and drains the
//! resulting [`Action`]s with [`Pool::next_action`]: spawn a worker, dispatch a request, reject
//! a request, stop a worker (SIGTERM), kill a worker (SIGKILL). [`Pool::next_deadline`] says
//! when it next needs `tick`. Every timer of the pool lives here (startup, request and backlog
//! timeouts, caller deadlines, kill grace, idle reaping, spawn pacing, restart backoff), so the
//! whole lifecycle is tested exhaustively and simulated with a virtual clock
//! (`tests::simulation`).
//!
//! Modes, as in PHP-FPM:
//! - `static`: `max_workers` workers, always.
//! - `dynamic`: `start_workers` at start; at least `min_workers`; spawn while fewer than
//!   `spare_min` are idle; stop idle workers above `spare_max` (each reap interval) and those
//!   idle longer than `idle_timeout` while more than `spare_min` are idle.
//! - `ondemand`: `min_workers` (often 0) at start; spawn on demand; stop workers idle longer
//!   than `idle_timeout`.
//!
//! In every mode a request that finds no idle worker waits in a FIFO backlog and, below
//! `max_workers`, makes the pool grow; growth is paced 1, 2, 4, ... spawns per second up to
//! `spawn_rate_max` (Apache's ramp), so a spike cannot fork-bomb the machine. Refilling up to
//! the floor (`min_workers`, or all of them in static mode) is not paced.
//!
//! The crash-loop breaker: `crash_limit` crashes or failed starts within `crash_window` turn the
//! pool `failing`: requests are answered at once with `service unavailable`, the backlog is
//! flushed, and one worker at a time is started after an exponential backoff; the first worker
//! that finishes its handshake brings the pool back to `ok`.
//!
//! The operator's commands (`acgi-bridge pause`, `resume`, `drain`, `recycle`, `kill-worker`,
//! `set`) are events like the others: [`Intake`] says whether the pool takes requests (open,
//! paused: they wait; draining: they are refused and the workers stop once nothing waits;
//! stopping: the bridge's shutdown), a recycle replaces every worker one at a time (a spare
//! first when `max_workers` leaves room), an admin kill is never a crash, and
//! [`Pool::set_policy`] changes the limits live.
//!
//! Invariants ([`Pool::check_invariants`]): starting + idle + busy + stopping workers <=
//! `max_workers` (after `set_policy` lowered it: <= the count then, coming down as workers
//! leave, with nothing started meanwhile); the idle list is exactly the idle workers; no idle
//! worker while requests wait (unless paused, draining or stopping); the backlog within
//! `backlog_max`; a request is queued or held by one worker, never both, never by two. In
//! debug builds (and so in every test) they are checked at the end of every public event, and
//! the engine checks them again after each completion.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::proto::ErrorCode;

/// The engine's handle for a worker (opaque to the policy).
pub type WorkerId = u64;
/// The engine's handle for a request (opaque to the policy).
pub type RequestId = u64;

/// How the pool sizes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Static,
    Dynamic,
    #[serde(rename = "ondemand")]
    OnDemand,
}

/// The pool's configuration (validated by `config`).
#[derive(Clone, Debug)]
pub struct Policy {
    pub mode: Mode,
    pub min_workers: u32,
    pub max_workers: u32,
    pub start_workers: u32,
    pub spare_min: u32,
    pub spare_max: u32,
    pub spawn_rate_max: u32,
    pub idle_timeout: Duration,
    /// Recycle a worker after this many requests (0: never), plus a random 0..=jitter.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub max_lifetime: Option<Duration>,
    pub max_rss_bytes: Option<u64>,
    pub request_timeout: Option<Duration>,
    pub startup_timeout: Duration,
    pub kill_grace: Duration,
    pub crash_limit: u32,
    pub crash_window: Duration,
    pub restart_backoff_max: Duration,
    pub backlog_max: u32,
    pub backlog_timeout: Option<Duration>,
    /// Jobs a worker that accepts queued jobs may hold at once (1: one at a time).
    pub queue_depth: u32,
}

impl Policy {
    /// A plain dynamic policy with the documented defaults (tests and examples).
    pub fn with_workers(min_workers: u32, max_workers: u32, backlog_max: u32) -> Policy {
        Policy {
            mode: Mode::Dynamic,
            min_workers,
            max_workers,
            start_workers: min_workers,
            spare_min: 0,
            spare_max: max_workers,
            spawn_rate_max: 32,
            idle_timeout: Duration::from_secs(10),
            max_requests: 0,
            max_requests_jitter: 0,
            max_lifetime: None,
            max_rss_bytes: None,
            request_timeout: None,
            startup_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(5),
            crash_limit: 5,
            crash_window: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(30),
            backlog_max,
            backlog_timeout: None,
            queue_depth: 1,
        }
    }

    /// Shard `index` of `count` (one per core): the worker counts and the backlog are split so
    /// that the shards add up to exactly this policy's numbers. A service has
    /// `min(count, max_workers)` shards; shards past that get a policy of zero workers (their
    /// core forwards every request of the service). Rates, timeouts and the crash limit apply to
    /// each shard as they are.
    pub fn shard(&self, index: usize, count: usize) -> Policy {
        assert!(index < count);
        let shards = count.min(self.max_workers as usize);
        let share = |total: u32| -> u32 {
            if index >= shards {
                return 0;
            }
            let shards = shards as u32;
            total / shards + u32::from((index as u32) < total % shards)
        };
        Policy {
            min_workers: share(self.min_workers),
            max_workers: share(self.max_workers),
            start_workers: share(self.start_workers),
            spare_min: share(self.spare_min),
            spare_max: share(self.spare_max),
            spawn_rate_max: share(self.spawn_rate_max).max(1),
            backlog_max: share(self.backlog_max),
            ..self.clone()
        }
    }

    /// Workers always kept (refilled without pacing).
    pub fn floor(&self) -> u32 {
        match self.mode {
            Mode::Static => self.max_workers,
            Mode::Dynamic | Mode::OnDemand => self.min_workers,
        }
    }

    fn initial(&self) -> u32 {
        match self.mode {
            Mode::Static => self.max_workers,
            Mode::Dynamic => self.start_workers.max(self.min_workers),
            Mode::OnDemand => self.min_workers,
        }
    }
}

/// Whether a pool takes requests: the operator's pause and drain, and the bridge's shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Intake {
    /// Requests run as usual.
    #[default]
    Open,
    /// `acgi-bridge pause`: jobs running finish; new requests wait in the backlog (within
    /// `backlog_max` and their deadlines) and run after `resume`.
    Paused,
    /// `acgi-bridge drain`: new requests are refused; those running and queued finish, then
    /// every worker stops. `resume` opens the pool again.
    Draining,
    /// The bridge is shutting down: as draining, for good.
    Stopping,
}

impl Intake {
    /// Its name in status.
    pub fn name(self) -> &'static str {
        match self {
            Intake::Open => "open",
            Intake::Paused => "paused",
            Intake::Draining => "draining",
            Intake::Stopping => "stopping",
        }
    }
}

/// Why the pool refused an operator's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the service is draining: `acgi-bridge resume` it first")]
    Draining,
    #[error("the bridge is shutting down")]
    Stopping,
}

/// A rolling restart in progress (`Pool::recycle`).
#[derive(Clone, Debug)]
struct Recycle {
    /// Workers still to be replaced.
    old: BTreeSet<WorkerId>,
    /// Workers to keep serving (starting, idle or busy) meanwhile: those serving when it began.
    target: u32,
}

/// Why the policy stopped a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Idle above the spare/min floor, or longer than `idle_timeout`.
    Idle,
    /// `max_requests`, `max_lifetime` or `max_rss_bytes` reached.
    Recycled,
    /// Its request ran past `request_timeout`.
    TimedOut,
    /// No handshake within `startup_timeout`.
    StartupTimeout,
    /// The bridge is shutting down.
    Shutdown,
    /// An operator killed it (`acgi-bridge kill-worker`): not a crash.
    Killed,
}

/// How the engine learnt a worker is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// The process exited or died (the engine saw EOF or reaped it).
    Exited,
    /// It broke the worker protocol; the engine killed it.
    Violation,
}

/// What the engine must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start one worker process; answer with `on_worker_started(id)` or `on_spawn_failed()`.
    Spawn,
    /// Hand `request` to the idle `worker`, which is now busy.
    Dispatch {
        request: RequestId,
        worker: WorkerId,
    },
    /// Answer `request` with an error without running it (or, for `TimedOut`, instead of
    /// waiting for the worker that holds it, which is being stopped).
    Reject {
        request: RequestId,
        code: ErrorCode,
        reason: RejectReason,
    },
    /// Stop the worker gracefully: close its control socket and send SIGTERM. It is out of
    /// service; a `Kill` follows after `kill_grace` unless it is gone by then.
    Stop {
        worker: WorkerId,
        reason: StopReason,
    },
    /// SIGKILL the worker.
    Kill { worker: WorkerId },
}

/// Why a request was rejected, for messages and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    BacklogFull,
    BacklogTimeout,
    DeadlineExceeded,
    RequestTimeout,
    /// Queued behind a request whose worker was stopped (it timed out).
    WorkerStopped,
    Failing,
    ShuttingDown,
    /// The service is drained (`acgi-bridge drain`).
    Draining,
}

/// Counters for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub spawns: u64,
    pub failed_starts: u64,
    pub dispatched: u64,
    pub rejected_overloaded: u64,
    pub rejected_backlog_timeout: u64,
    pub rejected_deadline: u64,
    pub rejected_unavailable: u64,
    pub rejected_shutting_down: u64,
    pub timed_out: u64,
    pub exits_recycled: u64,
    pub exits_idle: u64,
    pub exits_crashed: u64,
    pub exits_timed_out: u64,
    pub exits_killed: u64,
    pub exits_shutdown: u64,
    /// Workers an operator killed (`kill-worker`), which are not crashes.
    pub exits_admin_killed: u64,
    pub backlog_len_max: u32,
}

impl Stats {
    /// Add another shard's counters (`backlog_len_max` adds up too: the shards' peaks bound
    /// the service's from above).
    pub fn add(&mut self, other: &Stats) {
        self.spawns += other.spawns;
        self.failed_starts += other.failed_starts;
        self.dispatched += other.dispatched;
        self.rejected_overloaded += other.rejected_overloaded;
        self.rejected_backlog_timeout += other.rejected_backlog_timeout;
        self.rejected_deadline += other.rejected_deadline;
        self.rejected_unavailable += other.rejected_unavailable;
        self.rejected_shutting_down += other.rejected_shutting_down;
        self.timed_out += other.timed_out;
        self.exits_recycled += other.exits_recycled;
        self.exits_idle += other.exits_idle;
        self.exits_crashed += other.exits_crashed;
        self.exits_timed_out += other.exits_timed_out;
        self.exits_killed += other.exits_killed;
        self.exits_shutdown += other.exits_shutdown;
        self.exits_admin_killed += other.exits_admin_killed;
        self.backlog_len_max += other.backlog_len_max;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting {
        deadline: Instant,
    },
    Idle {
        since: Instant,
    },
    Busy {
        request: RequestId,
        deadline: Option<Instant>,
    },
    Stopping {
        reason: StopReason,
        kill_at: Option<Instant>,
    },
}

#[derive(Clone, Debug)]
struct Worker {
    state: State,
    started_at: Instant,
    served: u64,
    recycle_after: u64,
    /// Jobs it may hold at once: 1, or the policy's queue depth if it accepts queued jobs.
    depth: u32,
    /// Jobs sent to it behind the one it is running (Busy), oldest first.
    queued_jobs: VecDeque<RequestId>,
}

impl Worker {
    fn held(&self) -> u32 {
        u32::from(matches!(self.state, State::Busy { .. })) + self.queued_jobs.len() as u32
    }

    /// Running a job and able to take another queued behind it.
    fn has_room(&self) -> bool {
        matches!(self.state, State::Busy { .. }) && self.held() < self.depth
    }
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    /// When it must leave the backlog: the earlier of the caller's deadline and the backlog
    /// timeout, and which of the two that is.
    expires: Option<(Instant, RejectReason)>,
}

/// Length of the idle-reaping interval.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const SPAWN_WINDOW: Duration = Duration::from_secs(1);

pub struct Pool {
    policy: Policy,
    workers: BTreeMap<WorkerId, Worker>,
    /// Spawn actions issued whose process has not been reported yet.
    pending_spawns: u32,
    /// Idle workers, longest idle at the front.
    idle: VecDeque<WorkerId>,
    /// FIFO of waiting requests; ids no longer in `queued` are skipped (removed by expiry).
    backlog: VecDeque<RequestId>,
    queued: HashMap<RequestId, Queued>,
    expiries: BTreeSet<(Instant, RequestId)>,
    actions: VecDeque<Action>,
    /// Whether it takes requests: open, paused or draining (the operator's), stopping (shutdown).
    intake: Intake,
    /// The operator's rolling restart (`acgi-bridge recycle`), while one runs.
    recycle: Option<Recycle>,
    /// `workers_total` never exceeds this: `max_workers`, or, after `set_policy` lowered it,
    /// the count at that moment, coming down as the surplus leaves.
    workers_cap: u32,
    failing: bool,
    /// Crashes and failed starts within the crash window.
    crashes: VecDeque<Instant>,
    backoff: Duration,
    spawn_not_before: Option<Instant>,
    spawn_rate: u32,
    spawn_window_start: Instant,
    spawned_in_window: u32,
    next_reap: Instant,
    /// Since when the idle count has been above spare_max (dynamic mode).
    idle_over_since: Option<Instant>,
    rng: u64,
    stats: Stats,
    /// Reused by `check_invariants`, which the engine runs after every completion in debug
    /// builds: it must not allocate per call (the allocation test runs a debug bridge).
    invariant_scratch: std::cell::RefCell<Vec<RequestId>>,
}

impl Pool {
    /// A pool that immediately asks for its initial workers. `seed` drives the recycling
    /// jitter (any value; the engine uses the clock, simulations a fixed seed).
    pub fn new(now: Instant, policy: Policy, seed: u64) -> Pool {
        // Zero workers: a shard of a service on a core that has none (see `Policy::shard`).
        assert!(policy.max_workers >= 1 || policy.start_workers == 0);
        assert!(policy.min_workers <= policy.max_workers);
        assert!(policy.spare_min <= policy.spare_max);
        assert!(policy.spawn_rate_max >= 1);
        let initial = policy.initial();
        let mut pool = Pool {
            policy,
            workers: BTreeMap::new(),
            pending_spawns: 0,
            idle: VecDeque::new(),
            backlog: VecDeque::new(),
            queued: HashMap::new(),
            expiries: BTreeSet::new(),
            actions: VecDeque::new(),
            intake: Intake::Open,
            recycle: None,
            workers_cap: 0,
            failing: false,
            crashes: VecDeque::new(),
            backoff: RESTART_BACKOFF_FIRST,
            spawn_not_before: None,
            spawn_rate: 1,
            spawn_window_start: now,
            spawned_in_window: 0,
            next_reap: now + REAP_INTERVAL,
            idle_over_since: None,
            rng: seed | 1,
            stats: Stats::default(),
            invariant_scratch: Default::default(),
        };
        pool.workers_cap = pool.policy.max_workers;
        for _ in 0..initial.min(pool.policy.max_workers) {
            pool.spawn();
        }
        pool
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn next_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front();
        self.checked();
        action
    }

    /// The caller of a waiting request has gone: take the request out of the backlog, never
    /// to run. Returns whether it was waiting here (false: it was dispatched already, answered,
    /// or is not this pool's).
    pub fn withdraw(&mut self, request: RequestId) -> bool {
        if !self.unqueue(request) {
            return false;
        }
        // The FIFO skips ids no longer queued when it pops them; compact it when withdrawn
        // ids pile up, so that its length stays bounded by the backlog's.
        if self.backlog.len() > 2 * self.queued.len() + 64 {
            let queued = &self.queued;
            self.backlog.retain(|waiting| queued.contains_key(waiting));
        }
        self.checked();
        true
    }

    /// Take, ahead of the queue, the `Dispatch` this pool just decided for `request` (the
    /// engine needs it at once: a direct read must know its worker before the connection reads
    /// on). `None` when the request was not dispatched (it was rejected or queued).
    pub fn take_dispatch(&mut self, request: RequestId) -> Option<WorkerId> {
        let at = self.actions.iter().position(
            |action| matches!(action, Action::Dispatch { request: r, .. } if *r == request),
        )?;
        let worker = match self.actions.remove(at) {
            Some(Action::Dispatch { worker, .. }) => worker,
            _ => unreachable!("found above"),
        };
        self.checked();
        Some(worker)
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn is_failing(&self) -> bool {
        self.failing
    }

    /// Spawns per second the pacing allows right now.
    pub fn spawn_rate(&self) -> u32 {
        self.spawn_rate
    }

    /// Every worker process the pool accounts for, including ones being stopped.
    pub fn workers_total(&self) -> u32 {
        self.pending_spawns + self.workers.len() as u32
    }

    pub fn starting(&self) -> u32 {
        self.pending_spawns + self.count(|s| matches!(s, State::Starting { .. }))
    }

    pub fn idle(&self) -> u32 {
        self.idle.len() as u32
    }

    pub fn busy(&self) -> u32 {
        self.count(|s| matches!(s, State::Busy { .. }))
    }

    pub fn stopping_count(&self) -> u32 {
        self.count(|s| matches!(s, State::Stopping { .. }))
    }

    pub fn backlog_len(&self) -> u32 {
        self.queued.len() as u32
    }

    fn count(&self, predicate: impl Fn(&State) -> bool) -> u32 {
        self.workers
            .values()
            .filter(|w| predicate(&w.state))
            .count() as u32
    }

    /// A request arriving now would run or be queued on a worker at once (an idle worker, or
    /// a busy one with room for queued jobs), without waiting in the backlog.
    pub fn takes_now(&self) -> bool {
        self.intake == Intake::Open
            && !self.failing
            && (!self.idle.is_empty() || self.busy_with_room().is_some())
    }

    /// Workers the pool may still start (its max minus what it serves or starts), or 0 when it
    /// cannot start any (failing, paused, draining, stopping).
    pub fn room(&self) -> u32 {
        if self.failing || self.intake != Intake::Open {
            return 0;
        }
        self.policy.max_workers.saturating_sub(self.serving())
    }

    /// Take the oldest waiting request out of the backlog (to run it on another core). The
    /// pool forgets it: its expiry goes with it, and the caller owns it from now on.
    pub fn take_backlogged(&mut self, now: Instant) -> Option<RequestId> {
        let request = self.pop_backlog()?;
        self.after_event(now);
        Some(request)
    }

    /// Workers that serve or will serve: starting, idle or busy (not stopping).
    pub fn serving(&self) -> u32 {
        self.pending_spawns + self.workers.len() as u32 - self.stopping_count()
    }

    /// The earliest instant at which `tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |at: Instant| deadline = Some(deadline.map_or(at, |d| d.min(at)));
        if let Some((at, _)) = self.expiries.first() {
            consider(*at);
        }
        for worker in self.workers.values() {
            match worker.state {
                State::Starting { deadline } => consider(deadline),
                State::Busy {
                    deadline: Some(deadline),
                    ..
                } => consider(deadline),
                State::Stopping {
                    kill_at: Some(kill_at),
                    ..
                } => consider(kill_at),
                _ => {}
            }
        }
        if let Some(at) = self.spawn_not_before {
            consider(at);
        }
        if self.wants_growth() {
            consider(self.spawn_window_start + SPAWN_WINDOW);
        }
        if let Some(since) = self.idle_over_since {
            consider(since + REAP_INTERVAL);
        }
        let reap_useful = !self.idle.is_empty()
            || (self.policy.max_lifetime.is_some() && !self.workers.is_empty());
        if reap_useful && !self.winding_down() {
            consider(self.next_reap);
        }
        deadline
    }

    // ----- events ------------------------------------------------------------------------------

    /// A request arrived. `deadline` is the caller's, if it set one.
    pub fn on_request(&mut self, now: Instant, request: RequestId, deadline: Option<Instant>) {
        self.on_request_inner(now, request, deadline);
        self.after_event(now);
    }

    fn on_request_inner(&mut self, now: Instant, request: RequestId, deadline: Option<Instant>) {
        if self.intake == Intake::Stopping {
            self.stats.rejected_shutting_down += 1;
            self.reject(request, ErrorCode::ShuttingDown, RejectReason::ShuttingDown);
            return;
        }
        if self.intake == Intake::Draining {
            self.stats.rejected_unavailable += 1;
            self.reject(
                request,
                ErrorCode::ServiceUnavailable,
                RejectReason::Draining,
            );
            return;
        }
        if self.failing {
            self.stats.rejected_unavailable += 1;
            self.reject(
                request,
                ErrorCode::ServiceUnavailable,
                RejectReason::Failing,
            );
            return;
        }
        if deadline.is_some_and(|d| d <= now) {
            self.stats.rejected_deadline += 1;
            self.reject(
                request,
                ErrorCode::DeadlineExceeded,
                RejectReason::DeadlineExceeded,
            );
            return;
        }
        let paused = self.intake == Intake::Paused;
        if let Some(worker) = (!paused).then(|| self.idle.pop_back()).flatten() {
            self.dispatch(now, request, worker);
            if self.policy.mode == Mode::Dynamic && self.policy.spare_min > 0 {
                // Taking an idle worker may leave fewer spares than spare_min.
                self.maintain(now);
            }
            return;
        }
        if let Some(worker) = self.busy_with_room().filter(|_| !paused) {
            self.dispatch(now, request, worker);
            return;
        }
        if self.queued.len() as u32 >= self.policy.backlog_max {
            self.stats.rejected_overloaded += 1;
            self.reject(request, ErrorCode::Overloaded, RejectReason::BacklogFull);
            return;
        }
        let backlog_expiry = self
            .policy
            .backlog_timeout
            .map(|t| (now + t, RejectReason::BacklogTimeout));
        let caller_expiry = deadline.map(|d| (d, RejectReason::DeadlineExceeded));
        let expires = match (backlog_expiry, caller_expiry) {
            (Some(a), Some(b)) => Some(if b.0 <= a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        if let Some((at, _)) = expires {
            self.expiries.insert((at, request));
        }
        self.queued.insert(request, Queued { expires });
        self.backlog.push_back(request);
        self.stats.backlog_len_max = self.stats.backlog_len_max.max(self.queued.len() as u32);
        self.maintain(now);
    }

    /// The engine started a worker process for one of our `Spawn`s.
    pub fn on_worker_started(&mut self, now: Instant, worker: WorkerId) {
        assert!(self.pending_spawns > 0, "a start without a spawn");
        assert!(!self.workers.contains_key(&worker), "worker id reused");
        self.pending_spawns -= 1;
        let recycle_after = match self.policy.max_requests {
            0 => u64::MAX,
            n => n + self.random(self.policy.max_requests_jitter + 1),
        };
        let state = State::Starting {
            deadline: now + self.policy.startup_timeout,
        };
        self.workers.insert(
            worker,
            Worker {
                state,
                started_at: now,
                served: 0,
                recycle_after,
                depth: 1,
                queued_jobs: VecDeque::new(),
            },
        );
        if self.winding_down() && self.queued.is_empty() {
            self.stop(now, worker, StopReason::Shutdown);
        }
        self.after_event(now);
    }

    /// A `Spawn` could not start a process (exec failed).
    pub fn on_spawn_failed(&mut self, now: Instant) {
        assert!(self.pending_spawns > 0, "a failed spawn without a spawn");
        self.pending_spawns -= 1;
        self.lower_cap();
        self.stats.failed_starts += 1;
        self.on_crash(now);
        self.maintain(now);
        self.finish_stop_if_drained(now);
        self.after_event(now);
    }

    /// A worker finished its handshake.
    pub fn on_worker_ready(&mut self, now: Instant, worker: WorkerId) {
        self.on_worker_ready_queueing(now, worker, false);
    }

    /// A worker finished its handshake; `accepts_queue` when it said it takes queued jobs
    /// (then it may hold up to `queue_depth` jobs at once).
    pub fn on_worker_ready_queueing(
        &mut self,
        now: Instant,
        worker: WorkerId,
        accepts_queue: bool,
    ) {
        if accepts_queue {
            if let Some(entry) = self.workers.get_mut(&worker) {
                entry.depth = self.policy.queue_depth.max(1);
            }
        }
        self.on_worker_ready_inner(now, worker);
        self.after_event(now);
    }

    fn on_worker_ready_inner(&mut self, now: Instant, worker: WorkerId) {
        let Some(entry) = self.workers.get_mut(&worker) else {
            panic!("ready from an unknown worker {worker}")
        };
        match entry.state {
            State::Starting { .. } => {}
            // Stopped before it was ready (shutdown): it stays stopping.
            State::Stopping { .. } => return,
            other => panic!("ready from a worker in {other:?}"),
        }
        entry.state = State::Idle { since: now };
        if self.failing {
            self.failing = false;
            self.crashes.clear();
        }
        self.backoff = RESTART_BACKOFF_FIRST;
        self.spawn_not_before = None;
        self.release(now, worker);
        self.maintain(now);
    }

    /// The busy `worker` answered its request. `rss_bytes` is its resident size now, when the
    /// engine measured it (only when `max_rss_bytes` is set).
    pub fn on_job_done(&mut self, now: Instant, worker: WorkerId, rss_bytes: Option<u64>) {
        self.on_job_done_inner(now, worker, rss_bytes);
        self.after_event(now);
    }

    fn on_job_done_inner(&mut self, now: Instant, worker: WorkerId, rss_bytes: Option<u64>) {
        let recycle_takes = self.recycle_takes(worker);
        let policy_rss = self.policy.max_rss_bytes;
        let lifetime = self.policy.max_lifetime;
        let entry = self
            .workers
            .get_mut(&worker)
            .expect("job done by an unknown worker");
        match entry.state {
            State::Busy { .. } => {}
            // Timed out meanwhile: already answered and being stopped.
            State::Stopping { .. } => return,
            other => panic!("job done by a worker in {other:?}"),
        }
        entry.served += 1;
        if let Some(next) = entry.queued_jobs.pop_front() {
            // The next queued job is running now; its timeout starts now.
            let deadline = self.policy.request_timeout.map(|t| now + t);
            entry.state = State::Busy {
                request: next,
                deadline,
            };
            self.fill(now, worker);
            return;
        }
        let recycle = recycle_takes
            || entry.served >= entry.recycle_after
            || lifetime.is_some_and(|l| now.saturating_duration_since(entry.started_at) >= l)
            || rss_bytes
                .zip(policy_rss)
                .is_some_and(|(rss, max)| rss > max);
        entry.state = State::Idle { since: now };
        if recycle {
            if let Some(admin) = &mut self.recycle {
                admin.old.remove(&worker);
            }
            self.stop(now, worker, StopReason::Recycled);
            self.maintain(now);
        } else {
            self.release(now, worker);
        }
    }

    /// A worker is gone (exited, died, or killed for breaking the protocol). Returns the
    /// request it held, which the engine must answer with `worker failed`.
    pub fn on_worker_gone(&mut self, now: Instant, worker: WorkerId, how: Gone) -> Vec<RequestId> {
        let held = self.on_worker_gone_inner(now, worker, how);
        self.after_event(now);
        held
    }

    fn on_worker_gone_inner(
        &mut self,
        now: Instant,
        worker: WorkerId,
        how: Gone,
    ) -> Vec<RequestId> {
        let entry = self.workers.remove(&worker).expect("gone: unknown worker");
        // Actions decided for it that the engine has not run yet would name a worker that is
        // gone (a `Dispatch` decided when it answered one job, then a violation in the same
        // read): drop them. Their requests are among those it holds, returned below.
        self.actions.retain(|action| {
            !matches!(action,
                Action::Dispatch { worker: w, .. } | Action::Stop { worker: w, .. } | Action::Kill { worker: w }
                if *w == worker)
        });
        let mut held = Vec::new();
        match entry.state {
            State::Starting { .. } => {
                self.stats.failed_starts += 1;
                self.on_crash(now);
            }
            State::Idle { .. } | State::Busy { .. } => {
                if let State::Busy { request, .. } = entry.state {
                    held.push(request);
                    held.extend(entry.queued_jobs.iter().copied());
                }
                if let Some(position) = self.idle.iter().position(|w| *w == worker) {
                    self.idle.remove(position);
                }
                match how {
                    Gone::Exited => self.stats.exits_crashed += 1,
                    Gone::Violation => self.stats.exits_killed += 1,
                }
                self.on_crash(now);
            }
            State::Stopping { reason, .. } => match reason {
                StopReason::Idle => self.stats.exits_idle += 1,
                StopReason::Recycled => self.stats.exits_recycled += 1,
                StopReason::TimedOut => self.stats.exits_timed_out += 1,
                // Counted as a failed start when it timed out.
                StopReason::StartupTimeout => {}
                StopReason::Shutdown => self.stats.exits_shutdown += 1,
                StopReason::Killed => self.stats.exits_admin_killed += 1,
            },
        }
        self.lower_cap();
        self.maintain(now);
        self.finish_stop_if_drained(now);
        held
    }

    /// Time passed: fire every timer that is due.
    pub fn tick(&mut self, now: Instant) {
        // Requests whose caller deadline or backlog timeout passed while queued.
        while let Some(&(at, request)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            if let Some(queued) = self.queued.remove(&request) {
                let reason = queued
                    .expires
                    .map(|(_, r)| r)
                    .expect("expiring entries expire");
                match reason {
                    RejectReason::DeadlineExceeded => {
                        self.stats.rejected_deadline += 1;
                        self.reject(request, ErrorCode::DeadlineExceeded, reason);
                    }
                    _ => {
                        self.stats.rejected_backlog_timeout += 1;
                        self.reject(request, ErrorCode::Overloaded, reason);
                    }
                }
            }
        }
        let mut starting_late = Vec::new();
        let mut busy_late = Vec::new();
        let mut kill_due = Vec::new();
        for (id, worker) in &self.workers {
            match worker.state {
                State::Starting { deadline } if deadline <= now => starting_late.push(*id),
                State::Busy {
                    request,
                    deadline: Some(deadline),
                } if deadline <= now => busy_late.push((*id, request)),
                State::Stopping {
                    kill_at: Some(at), ..
                } if at <= now => kill_due.push(*id),
                _ => {}
            }
        }
        for worker in starting_late {
            self.stats.failed_starts += 1;
            self.on_crash(now);
            let entry = self.workers.get_mut(&worker).expect("listed above");
            entry.state = State::Stopping {
                reason: StopReason::StartupTimeout,
                kill_at: None,
            };
            self.actions.push_back(Action::Kill { worker });
        }
        for (worker, request) in busy_late {
            self.stats.timed_out += 1;
            let behind = std::mem::take(
                &mut self
                    .workers
                    .get_mut(&worker)
                    .expect("listed above")
                    .queued_jobs,
            );
            self.stop(now, worker, StopReason::TimedOut);
            self.reject(request, ErrorCode::TimedOut, RejectReason::RequestTimeout);
            for request in behind {
                // It may already be in the worker's socket: it may or may not run.
                self.reject(
                    request,
                    ErrorCode::WorkerFailed,
                    RejectReason::WorkerStopped,
                );
            }
        }
        for worker in kill_due {
            let entry = self.workers.get_mut(&worker).expect("listed above");
            if let State::Stopping { reason, .. } = entry.state {
                entry.state = State::Stopping {
                    reason,
                    kill_at: None,
                };
            }
            self.actions.push_back(Action::Kill { worker });
        }
        if self.spawn_not_before.is_some_and(|t| t <= now) {
            self.spawn_not_before = None;
        }
        if now >= self.next_reap {
            self.next_reap = now + REAP_INTERVAL;
            self.reap(now);
        }
        if self
            .idle_over_since
            .is_some_and(|t| t + REAP_INTERVAL <= now)
        {
            self.reap_spares(now);
        }
        self.maintain(now);
        self.finish_stop_if_drained(now);
        self.after_event(now);
    }

    /// Dynamic mode: note when the idle count went above `spare_max` (with workers to spare
    /// above the floor), so that `tick` stops the surplus once it has lasted a whole reap
    /// interval. Spikes shorter than that, which Poisson arrivals make all the time, are left
    /// alone: stopping a worker that is needed again a moment later is pure churn.
    /// The end of every public event: the idle tracking, then (debug builds and tests) every
    /// invariant, so that an event that breaks one panics where it did.
    fn after_event(&mut self, now: Instant) {
        self.track_idle(now);
        self.checked();
    }

    /// In debug builds, [`Pool::check_invariants`]; nothing in release builds.
    fn checked(&self) {
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    fn track_idle(&mut self, now: Instant) {
        let over = self.policy.mode == Mode::Dynamic
            && self.intake == Intake::Open
            && self.idle() > self.policy.spare_max
            && self.serving() > self.policy.floor();
        match (over, self.idle_over_since) {
            (true, None) => self.idle_over_since = Some(now),
            (false, Some(_)) => self.idle_over_since = None,
            _ => {}
        }
    }

    /// The idle count has been above spare_max for a reap interval: stop the longest idle down
    /// to spare_max (not below the floor).
    fn reap_spares(&mut self, now: Instant) {
        self.idle_over_since = None;
        while self.idle() > self.policy.spare_max && self.serving() > self.policy.floor() {
            let worker = self.idle.front().copied().expect("idle is not empty");
            self.stop(now, worker, StopReason::Idle);
        }
    }

    /// Stop taking requests; requests already accepted (busy or queued) are still served, then
    /// every worker is stopped (starting ones once they are ready, if nothing waits for them).
    pub fn begin_stop(&mut self, now: Instant) {
        self.intake = Intake::Stopping;
        self.recycle = None;
        self.serve_backlog(now);
        self.stop_starting_if_idle(now);
        self.finish_stop_if_drained(now);
        self.after_event(now);
    }

    /// Winding down with nothing queued: workers still starting will have nothing to do.
    fn stop_starting_if_idle(&mut self, now: Instant) {
        if self.queued.is_empty() {
            let starting: Vec<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| matches!(w.state, State::Starting { .. }))
                .map(|(id, _)| *id)
                .collect();
            for worker in starting {
                self.stop(now, worker, StopReason::Shutdown);
            }
        }
    }

    /// The shutdown timeout passed: reject what is queued and kill every worker.
    pub fn abort(&mut self, code: ErrorCode) {
        while let Some(request) = self.backlog.pop_front() {
            if self.queued.remove(&request).is_some() {
                self.reject(request, code, RejectReason::ShuttingDown);
            }
        }
        self.expiries.clear();
        let workers: Vec<WorkerId> = self.workers.keys().copied().collect();
        for worker in workers {
            self.actions.push_back(Action::Kill { worker });
        }
        self.checked();
    }

    /// Stopping, and nothing is held, queued or starting any more.
    pub fn is_stopped(&self) -> bool {
        self.intake == Intake::Stopping
            && self.workers.is_empty()
            && self.pending_spawns == 0
            && self.queued.is_empty()
    }

    // ----- the operator's commands (`acgi-bridge pause`, ... ; `engine::core::admin`) ---------

    /// Whether it takes requests now.
    pub fn intake(&self) -> Intake {
        self.intake
    }

    /// Draining or stopping: no new request is taken, and workers stop once nothing waits.
    pub fn winding_down(&self) -> bool {
        matches!(self.intake, Intake::Draining | Intake::Stopping)
    }

    /// Draining, and nothing is held, queued or starting any more.
    pub fn is_drained(&self) -> bool {
        self.intake == Intake::Draining
            && self.workers.is_empty()
            && self.pending_spawns == 0
            && self.queued.is_empty()
    }

    /// Pause (PgBouncer's PAUSE): jobs running finish; new requests wait in the backlog (within
    /// `backlog_max` and their deadlines) until [`Pool::resume`]. Returns the intake before.
    pub fn pause(&mut self, now: Instant) -> Result<Intake, Refused> {
        let before = self.intake;
        match before {
            Intake::Open | Intake::Paused => self.intake = Intake::Paused,
            Intake::Draining => return Err(Refused::Draining),
            Intake::Stopping => return Err(Refused::Stopping),
        }
        self.after_event(now);
        Ok(before)
    }

    /// Open a paused or drained pool again: what waits is dispatched, the floor refilled.
    pub fn resume(&mut self, now: Instant) -> Result<Intake, Refused> {
        let before = self.intake;
        match before {
            Intake::Open | Intake::Paused | Intake::Draining => self.intake = Intake::Open,
            Intake::Stopping => return Err(Refused::Stopping),
        }
        self.serve_backlog(now);
        self.maintain(now);
        self.after_event(now);
        Ok(before)
    }

    /// Drain: new requests are refused (`service unavailable`); those running and waiting are
    /// served, then every worker is stopped. [`Pool::resume`] undoes it.
    pub fn drain(&mut self, now: Instant) -> Result<Intake, Refused> {
        let before = self.intake;
        match before {
            Intake::Open | Intake::Paused | Intake::Draining => self.intake = Intake::Draining,
            Intake::Stopping => return Err(Refused::Stopping),
        }
        self.recycle = None;
        self.serve_backlog(now);
        self.stop_starting_if_idle(now);
        self.finish_stop_if_drained(now);
        self.after_event(now);
        Ok(before)
    }

    /// A rolling restart: every worker serving now is replaced after its current job, one at
    /// a time. A replacement is started before the old worker is stopped when there is room
    /// under `max_workers` (else the old one goes first), so that the workers ready never drop
    /// below their count now minus one. Stops are counted as recycled, never as crashes.
    /// Returns how many workers will be replaced.
    pub fn recycle(&mut self, now: Instant) -> Result<u32, Refused> {
        match self.intake {
            Intake::Open | Intake::Paused => {}
            Intake::Draining => return Err(Refused::Draining),
            Intake::Stopping => return Err(Refused::Stopping),
        }
        let old: BTreeSet<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| !matches!(w.state, State::Stopping { .. }))
            .map(|(id, _)| *id)
            .collect();
        let count = old.len() as u32;
        let target = self.serving().min(self.policy.max_workers);
        self.recycle = (count > 0).then_some(Recycle { old, target });
        self.maintain(now);
        self.after_event(now);
        Ok(count)
    }

    /// The operator kills `worker` (SIGKILL, through `Action::Kill`): it is out of service at
    /// once, counted as an admin kill when it is gone (not a crash: the breaker never hears of
    /// it). Returns the requests it held, which the engine answers with `worker failed`.
    pub fn kill_worker(&mut self, now: Instant, worker: WorkerId) -> Vec<RequestId> {
        let entry = self.workers.get_mut(&worker).expect("kill a known worker");
        let mut held = Vec::new();
        match entry.state {
            State::Stopping { .. } => {}
            state => {
                if let State::Busy { request, .. } = state {
                    held.push(request);
                    held.extend(entry.queued_jobs.drain(..));
                }
                entry.state = State::Stopping {
                    reason: StopReason::Killed,
                    kill_at: None,
                };
                if let Some(position) = self.idle.iter().position(|w| *w == worker) {
                    self.idle.remove(position);
                }
            }
        }
        self.actions.push_back(Action::Kill { worker });
        self.maintain(now);
        self.after_event(now);
        held
    }

    /// New limits, live (`acgi-bridge set`, and a reload's limit changes): the policy is
    /// replaced. Over a lowered `max_workers`, idle workers are stopped at once and busy ones
    /// after their job (counted as idle exits); over a lowered `backlog_max`, the newest
    /// waiting requests are rejected `overloaded`; below a raised floor, workers are started.
    pub fn set_policy(&mut self, now: Instant, policy: Policy) {
        assert!(policy.max_workers >= 1 || policy.start_workers == 0);
        assert!(policy.min_workers <= policy.max_workers);
        assert!(policy.spare_min <= policy.spare_max);
        assert!(policy.spawn_rate_max >= 1);
        self.workers_cap = self.workers_total().max(policy.max_workers);
        self.spawn_rate = self.spawn_rate.min(policy.spawn_rate_max);
        self.policy = policy;
        if let Some(recycle) = &mut self.recycle {
            recycle.target = recycle.target.min(self.policy.max_workers);
        }
        while self.queued.len() as u32 > self.policy.backlog_max {
            let Some(request) = self.backlog.pop_back() else {
                break;
            };
            if self.unqueue(request) {
                self.stats.rejected_overloaded += 1;
                self.reject(request, ErrorCode::Overloaded, RejectReason::BacklogFull);
            }
        }
        while self.serving() > self.policy.max_workers {
            let Some(&worker) = self.idle.front() else {
                break;
            };
            self.stop(now, worker, StopReason::Idle);
        }
        self.maintain(now);
        self.after_event(now);
    }

    /// Requests `worker` has answered (for status's per-worker rows).
    pub fn served(&self, worker: WorkerId) -> Option<u64> {
        self.workers.get(&worker).map(|w| w.served)
    }

    /// The request that has waited longest in the backlog, if any.
    pub fn oldest_waiting(&self) -> Option<RequestId> {
        self.backlog
            .iter()
            .find(|request| self.queued.contains_key(request))
            .copied()
    }

    /// Idle workers take what waits (after a pause, or when winding down).
    fn serve_backlog(&mut self, now: Instant) {
        while !self.queued.is_empty() {
            let Some(worker) = self.idle.pop_front() else {
                break;
            };
            self.release(now, worker);
        }
    }

    /// The recycle's next step, when it may take one: start a spare (make before break) or
    /// stop an old idle worker. A busy old worker is stopped after its job (`on_job_done`).
    fn step_recycle(&mut self, now: Instant) {
        let Some(recycle) = &mut self.recycle else {
            return;
        };
        let workers = &self.workers;
        recycle.old.retain(|id| {
            workers
                .get(id)
                .is_some_and(|w| !matches!(w.state, State::Stopping { .. }))
        });
        let (done, target) = (recycle.old.is_empty(), recycle.target);
        if done || self.winding_down() {
            self.recycle = None;
            return;
        }
        if self.failing || self.starting() > 0 {
            // A replacement is on its way (or the breaker owns the starts): wait for it.
            return;
        }
        let ready = self.idle() + self.busy();
        if ready < target {
            return;
        }
        if ready == target && self.workers_total() < self.policy.max_workers {
            self.spawn();
            return;
        }
        let recycle = self.recycle.as_mut().expect("checked above");
        if let Some(worker) = self
            .idle
            .iter()
            .copied()
            .find(|id| recycle.old.contains(id))
        {
            recycle.old.remove(&worker);
            self.stop(now, worker, StopReason::Recycled);
        }
    }

    /// Whether the recycle replaces busy `worker` now that its job is done.
    fn recycle_takes(&self, worker: WorkerId) -> bool {
        let Some(recycle) = &self.recycle else {
            return false;
        };
        if !recycle.old.contains(&worker) || self.failing || self.starting() > 0 {
            return false;
        }
        let ready = self.idle() + self.busy();
        let full = self.workers_total() >= self.policy.max_workers;
        ready > recycle.target || (ready == recycle.target && full)
    }

    /// Workers left: the cap a lowered `max_workers` left above it comes down with them.
    fn lower_cap(&mut self) {
        self.workers_cap = self
            .workers_cap
            .min(self.workers_total().max(self.policy.max_workers));
    }

    // ----- internals -----------------------------------------------------------------------------

    fn reject(&mut self, request: RequestId, code: ErrorCode, reason: RejectReason) {
        self.actions.push_back(Action::Reject {
            request,
            code,
            reason,
        });
    }

    /// Hand `request` to `worker`: it runs it now (idle) or after what it holds (queued).
    fn dispatch(&mut self, now: Instant, request: RequestId, worker: WorkerId) {
        let deadline = self.policy.request_timeout.map(|t| now + t);
        let entry = self
            .workers
            .get_mut(&worker)
            .expect("dispatch to a known worker");
        match entry.state {
            State::Idle { .. } => entry.state = State::Busy { request, deadline },
            State::Busy { .. } => {
                assert!(entry.held() < entry.depth, "dispatch to a full worker");
                entry.queued_jobs.push_back(request);
            }
            other => panic!("dispatch to a worker in {other:?}"),
        }
        self.stats.dispatched += 1;
        self.actions.push_back(Action::Dispatch { request, worker });
    }

    /// A busy worker with room for another job, the least loaded first.
    fn busy_with_room(&self) -> Option<WorkerId> {
        if self.policy.queue_depth <= 1 {
            return None;
        }
        self.workers
            .iter()
            .filter(|(_, w)| w.has_room())
            .min_by_key(|(_, w)| w.held())
            .map(|(id, _)| *id)
    }

    /// Give a busy worker with room more of the backlog, up to its depth.
    fn fill(&mut self, now: Instant, worker: WorkerId) {
        while self.workers[&worker].held() < self.workers[&worker].depth {
            let Some(request) = self.pop_backlog() else {
                break;
            };
            self.dispatch(now, request, worker);
        }
    }

    /// Pop the oldest live queued request.
    fn pop_backlog(&mut self) -> Option<RequestId> {
        while let Some(request) = self.backlog.pop_front() {
            if self.unqueue(request) {
                return Some(request);
            }
        }
        None
    }

    /// Take `request` out of the waiting set and its expiry (the FIFO entry, if any, is
    /// skipped when popped). Returns whether it was waiting.
    fn unqueue(&mut self, request: RequestId) -> bool {
        let Some(queued) = self.queued.remove(&request) else {
            return false;
        };
        if let Some((at, _)) = queued.expires {
            self.expiries.remove(&(at, request));
        }
        true
    }

    /// A worker is free (`Idle` state): stop it if the pool is over a lowered `max_workers`,
    /// else give it the oldest waiting request (unless paused), else park it.
    fn release(&mut self, now: Instant, worker: WorkerId) {
        if self.serving() > self.policy.max_workers {
            self.stop(now, worker, StopReason::Idle);
            return;
        }
        if self.intake == Intake::Paused {
            self.idle.push_back(worker);
            return;
        }
        if let Some(request) = self.pop_backlog() {
            self.dispatch(now, request, worker);
            self.fill(now, worker);
        } else if self.winding_down() {
            self.stop(now, worker, StopReason::Shutdown);
        } else {
            self.idle.push_back(worker);
        }
    }

    fn stop(&mut self, now: Instant, worker: WorkerId, reason: StopReason) {
        if let Some(position) = self.idle.iter().position(|w| *w == worker) {
            self.idle.remove(position);
        }
        let entry = self.workers.get_mut(&worker).expect("stop a known worker");
        entry.state = State::Stopping {
            reason,
            kill_at: Some(now + self.policy.kill_grace),
        };
        self.actions.push_back(Action::Stop { worker, reason });
    }

    fn on_crash(&mut self, now: Instant) {
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.policy.crash_window)
        {
            self.crashes.pop_front();
        }
        if self.failing {
            // Still failing: back off further before the next attempt.
            self.backoff = (self.backoff * 2).min(self.policy.restart_backoff_max);
            self.spawn_not_before = Some(now + self.backoff);
            return;
        }
        if self.crashes.len() as u32 >= self.policy.crash_limit && !self.winding_down() {
            self.failing = true;
            self.spawn_not_before = Some(now + self.backoff);
            while let Some(request) = self.pop_backlog() {
                self.stats.rejected_unavailable += 1;
                self.reject(
                    request,
                    ErrorCode::ServiceUnavailable,
                    RejectReason::Failing,
                );
            }
        }
    }

    /// Whether demand or spares want more workers than the floor provides. While stopping,
    /// only requests already accepted count: they are still served.
    fn wants_growth(&self) -> bool {
        if self.failing || self.serving() >= self.policy.max_workers {
            return false;
        }
        let starting = self.starting();
        // Each starting worker will take up to queue_depth waiting requests (if it accepts
        // queued jobs, as the SDK's do): start only as many as the backlog needs.
        let absorbs = starting as usize * self.policy.queue_depth.max(1) as usize;
        let backlog_short = absorbs < self.queued.len();
        if self.winding_down() {
            return backlog_short;
        }
        if self.intake == Intake::Paused {
            // Nothing runs until `resume`: growing now would only start idle workers.
            return false;
        }
        // A busy worker with room for queued jobs is as available as an idle one.
        let with_room = if self.policy.queue_depth > 1 {
            self.workers.values().filter(|w| w.has_room()).count() as u32
        } else {
            0
        };
        let spare_short = self.policy.mode == Mode::Dynamic
            && self.idle() + starting + with_room < self.policy.spare_min;
        backlog_short || spare_short
    }

    /// Spawn what the floor, the backlog and the spares call for, within max and pacing.
    fn maintain(&mut self, now: Instant) {
        if self.failing {
            // One probe at a time, after the backoff (and none once stopping: a failing pool
            // has nothing queued to serve).
            if !self.winding_down()
                && self.spawn_not_before.is_none()
                && self.starting() == 0
                && self.workers_total() < self.policy.max_workers
            {
                self.spawn();
                self.spawn_not_before = Some(now + self.backoff);
            }
            return;
        }
        if self.spawn_not_before.is_some_and(|t| now < t) {
            return;
        }
        while !self.winding_down()
            && self.serving() < self.policy.floor()
            && self.workers_total() < self.policy.max_workers
        {
            self.spawn();
        }
        // A recycle replaces each worker it stopped, whatever the floor.
        let recycle_target = self.recycle.as_ref().map_or(0, |r| r.target);
        while !self.winding_down()
            && self.serving() < recycle_target
            && self.workers_total() < self.policy.max_workers
        {
            self.spawn();
        }
        while self.wants_growth()
            && self.workers_total() < self.policy.max_workers
            && self.pace(now)
        {
            self.spawn();
        }
        self.step_recycle(now);
    }

    /// Spawn pacing: may one more paced spawn happen now? Windows of one second; a window that
    /// used its whole allowance doubles the next one's, up to `spawn_rate_max`.
    fn pace(&mut self, now: Instant) -> bool {
        if now >= self.spawn_window_start + SPAWN_WINDOW {
            let saturated = self.spawned_in_window >= self.spawn_rate;
            self.spawn_rate = if saturated {
                (self.spawn_rate * 2).min(self.policy.spawn_rate_max)
            } else {
                1
            };
            self.spawn_window_start = now;
            self.spawned_in_window = 0;
        }
        if self.spawned_in_window < self.spawn_rate {
            self.spawned_in_window += 1;
            true
        } else {
            false
        }
    }

    fn spawn(&mut self) {
        self.pending_spawns += 1;
        self.stats.spawns += 1;
        self.actions.push_back(Action::Spawn);
    }

    /// Idle reaping and lifetime recycling, once per reap interval.
    fn reap(&mut self, now: Instant) {
        if let Some(lifetime) = self.policy.max_lifetime {
            let old: Vec<WorkerId> = self
                .idle
                .iter()
                .copied()
                .filter(|id| now.saturating_duration_since(self.workers[id].started_at) >= lifetime)
                .collect();
            for worker in old {
                self.stop(now, worker, StopReason::Recycled);
            }
        }
        let floor = self.policy.floor();
        let timeout_floor = match self.policy.mode {
            Mode::Static => return,
            Mode::Dynamic => self.policy.spare_min,
            Mode::OnDemand => 0,
        };
        // (Idle above spare_max is handled by reap_spares.) Idle longer than idle_timeout: stop while above both floors.
        while self.idle() > timeout_floor && self.serving() > floor {
            let worker = self.idle.front().copied().expect("idle is not empty");
            let State::Idle { since } = self.workers[&worker].state else {
                unreachable!()
            };
            if now.saturating_duration_since(since) < self.policy.idle_timeout {
                break;
            }
            self.stop(now, worker, StopReason::Idle);
        }
    }

    fn finish_stop_if_drained(&mut self, now: Instant) {
        if self.winding_down() && self.queued.is_empty() {
            while let Some(&worker) = self.idle.front() {
                self.stop(now, worker, StopReason::Shutdown);
            }
        }
    }

    fn random(&mut self, bound: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % bound.max(1)
    }

    /// Panics when an invariant is broken (debug builds and tests).
    pub fn check_invariants(&self) {
        assert!(
            self.workers_total() <= self.workers_cap,
            "over max_workers (or, after it was lowered, over the workers left)"
        );
        assert!(self.workers_cap >= self.policy.max_workers);
        for action in &self.actions {
            if let Action::Dispatch { worker, .. } | Action::Stop { worker, .. } = action {
                assert!(
                    self.workers.contains_key(worker),
                    "a pending {action:?} names a worker that is gone"
                );
            }
        }
        if self.workers_cap > self.policy.max_workers {
            // Above a lowered max_workers: nothing new starts until the surplus has left.
            assert_eq!(
                self.workers_cap,
                self.workers_total().max(self.policy.max_workers)
            );
        }
        if let Some(recycle) = &self.recycle {
            assert!(recycle.target <= self.policy.max_workers);
            assert!(!self.winding_down(), "recycling while winding down");
        }
        let idle_states = self.count(|s| matches!(s, State::Idle { .. }));
        assert_eq!(
            idle_states as usize,
            self.idle.len(),
            "idle list out of step"
        );
        for worker in &self.idle {
            assert!(matches!(self.workers[worker].state, State::Idle { .. }));
        }
        if self.intake == Intake::Open {
            assert!(
                self.idle.is_empty() || self.queued.is_empty(),
                "idle worker while requests wait"
            );
        }
        assert!(
            self.queued.len() as u32 <= self.policy.backlog_max,
            "backlog over its bound"
        );
        for worker in self.workers.values() {
            assert!(
                worker.held() <= worker.depth,
                "a worker holds more than its depth"
            );
            assert!(
                worker.queued_jobs.is_empty() || matches!(worker.state, State::Busy { .. }),
                "queued jobs on a worker that is not running one"
            );
        }
        let mut held = self.invariant_scratch.borrow_mut();
        held.clear();
        held.extend(self.workers.values().flat_map(|w| {
            let running = match w.state {
                State::Busy { request, .. } => Some(request),
                _ => None,
            };
            running.into_iter().chain(w.queued_jobs.iter().copied())
        }));
        let busy = held.len();
        held.sort_unstable();
        held.dedup();
        assert_eq!(held.len(), busy, "a request held by two workers");
        for request in held.iter() {
            assert!(
                !self.queued.contains_key(request),
                "request {request} queued and held"
            );
        }
        if self.failing {
            assert!(
                self.queued.is_empty(),
                "requests queued into a failing pool"
            );
        }
    }
}

#[cfg(test)]
mod tests;
