//! The engine simulation (tests only): the real cores (their rooms, tables and invariants) and
//! the real pool policy, driven by one thread through seeded completions and faults, with every
//! check run after every event; a failing seed replays exactly (`ACGI_SIM_SEED=N`).
//!
//! Why: the integration tests run the real bridge against the real kernel, which picks one
//! interleaving per run; the bugs of an event loop live in the others (a cancel racing a
//! completion, a short send of a reply from a slot, a worker answering during a direct read, a
//! caller leaving mid-payload, a forward sitting in an inbox while both cores move on, a stop
//! arriving while a payload trickles in). Here the seed picks them, so a run explores a
//! different one each time and a failure comes with the seed that replays it.
//!
//! What is real and what is simulated:
//! - the cores ([`cores`]): most seeds run two, wired as `engine::run` wires them (one
//!   `Shared`, each core its own ring, spawner and pool shard, all accepting on one listener),
//!   so requests are forwarded (`Msg::Forward`/`Answer`) and connections handed over
//!   (`Msg::Connection`); the seed picks which ring steps and which core turns, in which order;
//! - each ring is an `io::sim::SimRing`, which carries out the engine's own `Sqe`s on real
//!   descriptors when the seed picks them (short reads and sends, `ENOBUFS`, cancel races); the
//!   cores' wake-ups are real eventfd writes and reads through them;
//! - the clock is virtual: each turn gets the simulation's `now`, which jumps to the next
//!   deadline when nothing else can happen, so timeouts fire without waiting;
//! - callers ([`caller`]) are real Unix connections to the real listener; workers ([`worker`])
//!   are models on real socket pairs, pipes and memfd slots, spawned by a `Spawner` without its
//!   thread, with pids no kernel hands out (`io::sim::PID_BASE`), so the engine's signals go to
//!   the models (`io::signal_worker`) and their deaths complete the engine's `WaitId`s;
//! - stops ([`stop`]): a third of the seeds send every core a graceful stop or an upgrade's
//!   drain mid-traffic, through `Shared` as the control thread does; once every core's turn
//!   says it finished, the cores are dropped as their threads would be;
//! - generations start near `u32::MAX` (`table::first_generation_for_tests`), so every table
//!   entry wraps within a few reuses while stale handles may be outstanding.
//!
//! Checks ([`checks`], [`caller`], [`stop`]): each core's `check_invariants` (tables, slots,
//! budgets) and the pools' after every completion (debug builds); each caller checks every
//! answer against its request (no lost, misrouted or duplicated answer, echo bytes intact);
//! each fault a worker model acts out must reach the `WorkerFault` label its core should
//! count, and no core may count a fault none of its workers acted out; at the end, every
//! request of a caller that stayed is answered, and no core holds a connection, request,
//! registered file or provided buffer it should not. During a stop: every request the bridge
//! took from a caller is answered and none that ran is lost; a drain's notice comes after every
//! answer and before the end of the connection; every core finishes with nothing left.
//!
//! Left out: TCP and TLS callers (the TLS threads' hand-over is `Msg::Connection` too, from
//! outside the cores); reloads and operator commands (`Msg::Reload`, `Msg::Admin`), reports;
//! the forced end after `shutdown_timeout_ms` (30 s, more than a seed's workers hold a
//! request: not aimed at; a second signal, `Shutdown { now: true }`, which forces the same end
//! at once, is simulated: half the graceful stops send one); more than two cores, or more
//! than one service; the kernel's own timeouts (accept retries) and the `PidfdPoll` reaping
//! mode.
//!
//! Run: `cargo test -p acgi-bridge --lib engine::sim` (`ACGI_SIM_SEEDS=N` seeds from 0,
//! default 300; `ACGI_SIM_SEED=N` just one, printing its trace).

mod caller;
mod checks;
mod cores;
mod scenario;
mod stop;
mod worker;

use std::collections::{HashMap, HashSet};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use caller::Caller;
use cores::SimCore;
use scenario::{Coverage, Scenario, Stop, REQUIRED_COVERAGE, SLOT_BYTES};
use worker::{Fault, Worker};

use super::core::Core;
use super::index::ServiceSlot;
use super::io::sim::{self as ring_sim, Faults, Rng};
use super::shared::Shared;

/// Steps one seed may take before it counts as stuck.
const STEPS_MAX: u32 = 60_000;
/// Virtual time one seed may take before it counts as stuck.
const VIRTUAL_TIME_MAX: Duration = Duration::from_secs(900);
/// Trace lines printed for a failing seed (its last ones).
const TRACE_PRINTED_MAX: usize = 400;
/// Seeds that found a bug, kept as regressions (run first, whatever `ACGI_SIM_SEEDS` says).
/// A seed names one run of the simulation as it is: a change to what the simulation draws
/// moves its bugs to other seeds, so whoever changes the draws re-finds these (revert the fix,
/// run the default seeds with this list emptied, note the first seed that fails, restore) and
/// updates them. (Last re-found when the simulation got two cores and stops.)
/// - 92: a worker answered a job and, in the same read, broke the protocol; the pool had
///   already decided the next `Dispatch` for it, which outlived the worker and named a request
///   the engine had failed (a panic on the request table; now the pool's invariant names it).
///   Fixed in `Pool::on_worker_gone` (which has its own unit test); since, that request is
///   requeued (`requests_requeued`).
/// - 243: a worker closed its control socket while a send to it was in flight: the receive's
///   end of file and the send's `EPIPE` each counted a `control_socket` fault for the one
///   worker. Fixed in `Core::lose_worker`.
/// - 20: a connection went `Flushing` (the drain notice, or Error 7) with a plain receive
///   armed; the receive's `ECANCELED` went to `close_conn`, which dropped the answers still
///   queued (here a request that ran was never answered). Fixed by the `Flushing` arm of
///   `recv_ended` (70ca58d; the seed was 6 until answers were settled after the handler).
/// - 567: the same through a poll: a drain found the bridge waiting (`ConnPoll`) for a large
///   request's payload; the cancelled poll closed the connection before the notice went out.
///   Fixed by the same arm, which `on_conn_poll` goes through (was seed 155).
const REGRESSION_SEEDS: [u64; 4] = [92, 243, 20, 567];

/// A fault a worker model acted out, not yet matched to what the engine counted.
struct Injected {
    pid: i32,
    /// The core whose worker it is (the one that must count it).
    core: usize,
    fault: Fault,
}

struct Sim {
    seed: u64,
    rng: Rng,
    base: Instant,
    now: Instant,
    scenario: Scenario,
    shared: Arc<Shared>,
    /// The cores (dropped once a stop has finished them all, as their threads would end).
    cores: Vec<SimCore>,
    /// The coverage of cores already dropped.
    coverage_kept: Coverage,
    address: SocketAddr,
    callers: Vec<Caller>,
    workers: Vec<Worker>,
    /// The core each worker (by its index in `workers`) belongs to.
    worker_core: Vec<usize>,
    by_pid: HashMap<i32, usize>,
    /// Where each worker's slot is mapped in the engine (address, length).
    engine_slots: HashMap<i32, (usize, usize)>,
    next_pid: i32,
    /// Guessed answers workers have sent that the bridge may have relayed (`Caller::on_answer`).
    guesses: u64,
    /// The highest job sequence any worker model of each core has seen (what a guessing worker
    /// guesses from: each core numbers its own jobs).
    last_sequence: Vec<u64>,
    /// Requests (caller, request id) whose payload a worker model has taken: they ran.
    ran: HashSet<(usize, u64)>,
    /// The stop delivered to every core, if one was.
    stop_sent: Option<Stop>,
    /// A second signal (`Shutdown { now: true }`) after a graceful stop, if this seed sends
    /// one (`stop::second_signal_if_due`).
    second_signal: stop::SecondSignal,
    /// Connections the dropped cores had accepted.
    accepted: u64,
    injected: Vec<Injected>,
    trace: Vec<String>,
    step: u32,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        ring_sim::reset_processes();
        crate::engine::table::first_generation_for_tests(u32::MAX - 2);
        let mut rng = Rng::new(seed);
        let scenario = Scenario::new(&mut rng);
        let config = scenario.config();
        let name = format!(
            "acgi-sim-{}-{seed}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name");
        let listener = UnixListener::bind_addr(&address).expect("the sim's listener binds");
        listener.set_nonblocking(true).expect("non-blocking");
        let faults = Faults {
            short_percent: 30,
            enobufs_percent: if scenario.faults { 5 } else { 0 },
            cancel_loses_percent: 50,
        };
        let base = Instant::now();
        let (shared, cores) = cores::build(scenario.cores, &config, listener, faults, base);
        let trace = vec![format!("seed {seed}: {scenario:?}")];
        Sim {
            seed,
            rng,
            base,
            now: base,
            last_sequence: vec![0; cores.len()],
            scenario,
            shared,
            cores,
            coverage_kept: Coverage::new(),
            address,
            callers: Vec::new(),
            workers: Vec::new(),
            worker_core: Vec::new(),
            by_pid: HashMap::new(),
            engine_slots: HashMap::new(),
            next_pid: ring_sim::PID_BASE,
            guesses: 0,
            ran: HashSet::new(),
            stop_sent: None,
            second_signal: stop::SecondSignal::No,
            accepted: 0,
            injected: Vec::new(),
            trace,
            step: 0,
        }
    }

    fn log(&mut self, line: String) {
        let at = self.now.duration_since(self.base).as_millis();
        self.trace.push(format!("[{} {at}ms] {line}", self.step));
    }

    /// Run the seed to its end; panics (with the reason) on the first check that fails.
    fn run(&mut self) {
        while !self.finished() {
            self.step += 1;
            assert!(
                self.step < STEPS_MAX,
                "stuck: {STEPS_MAX} steps without finishing"
            );
            self.stop_if_due();
            self.second_signal_if_due();
            self.connect_arrivals();
            let mut progressed = self.models_act(60);
            for _ in 0..self.rng.below(4 * self.cores.len() as u64) {
                let c = self.rng.below(self.cores.len() as u64) as usize;
                progressed |= self.ring_step(c);
            }
            self.turns(80);
            if !progressed && !self.anything_moves() && !self.connect_next() {
                self.advance_clock();
            }
        }
        self.check_end();
    }

    fn connect_arrivals(&mut self) {
        while let Some((arrives, _, _)) = self.scenario.callers.get(self.callers.len()) {
            if *arrives > self.step {
                return;
            }
            let (_, sizes, behaviour) = &self.scenario.callers[self.callers.len()];
            let caller = Caller::connect(self.callers.len(), &self.address, sizes, *behaviour);
            let line = format!("caller {} connects: {sizes:?} {behaviour:?}", caller.id);
            self.callers.push(caller);
            self.log(line);
        }
    }

    /// Nothing else moves: the next caller arrives now, if one is still to come.
    fn connect_next(&mut self) -> bool {
        let next = self.callers.len();
        match self.scenario.callers.get_mut(next) {
            Some((arrives, _, _)) => {
                *arrives = self.step;
                self.connect_arrivals();
                true
            }
            None => false,
        }
    }

    /// Each model acts with probability `percent`, in an order the seed picks.
    fn models_act(&mut self, percent: u64) -> bool {
        let mut progressed = false;
        let mut lines = Vec::new();
        let (callers, workers) = (self.callers.len(), self.workers.len());
        let start = self.rng.below((callers + workers).max(1) as u64) as usize;
        for turn in 0..callers + workers {
            let at = (start + turn) % (callers + workers);
            if !self.rng.chance(percent) {
                continue;
            }
            if at < callers {
                let (guesses, ran) = (&mut self.guesses, &self.ran);
                progressed |= self.callers[at].act(&mut self.rng, guesses, ran, &mut lines);
            } else {
                let c = self.worker_core[at - callers];
                let guess = self.last_sequence[c] + 1;
                let worker = &mut self.workers[at - callers];
                let (base, len) = self.engine_slots[&worker.pid];
                // (Once the cores are dropped, every worker is dead.)
                let filling = self
                    .cores
                    .get(c)
                    .is_some_and(|c| c.ring.reading_into(base, len));
                progressed |= worker.act(&mut self.rng, guess, filling, &mut lines);
                self.last_sequence[c] = self.last_sequence[c].max(worker.last_sequence);
                self.ran.extend(worker.ran.drain(..));
            }
        }
        for line in lines {
            self.log(line);
        }
        progressed
    }

    /// Before the clock moves: can anything happen now? (Models act at random, so give them
    /// a few chances.)
    fn anything_moves(&mut self) -> bool {
        for _ in 0..6 {
            let mut moved = self.models_act(100);
            for c in 0..self.cores.len() {
                moved |= self.ring_step(c);
            }
            if moved {
                self.turns(100);
                return true;
            }
        }
        // (A core the seed let sit may still have completions to take.)
        let waiting = self
            .live_cores()
            .any(|c| self.cores[c].ring.completions_waiting() > 0);
        if waiting {
            self.turns(100);
        }
        waiting
    }

    /// Where a run stands, for a stuck one's message.
    fn state_line(&self) -> String {
        let cores: Vec<String> = (0..self.cores.len())
            .map(|c| {
                let (conns, workers, requests) = self.cores[c].core.sim_table_sizes();
                format!(
                    "core {c}{}: {conns} connections, {workers} workers, {requests} requests, \
                     ops in flight {:?}",
                    if self.cores[c].finished {
                        " (finished)"
                    } else {
                        ""
                    },
                    self.cores[c].ring.pending_kinds()
                )
            })
            .collect();
        let injected: Vec<(i32, Fault)> = self.injected.iter().map(|i| (i.pid, i.fault)).collect();
        let callers: Vec<usize> = self.callers.iter().map(Caller::unanswered).collect();
        format!(
            "{}; unanswered per caller {callers:?}; faults not yet counted {injected:?}",
            cores.join("; ")
        )
    }

    /// Nothing can happen until a deadline: jump to the next one.
    fn advance_clock(&mut self) {
        if self.finished() {
            // (Only once a stop has dropped the cores: then no deadline is left, rightly.)
            return;
        }
        let next = self
            .live_cores()
            .flat_map(|c| {
                [
                    self.cores[c].core.next_deadline(),
                    self.cores[c].ring.next_due(),
                ]
            })
            .flatten()
            .min();
        let Some(next) = next else {
            panic!(
                "stuck: nothing can happen and no deadline is set ({})",
                self.state_line()
            );
        };
        self.now = self.now.max(next) + Duration::from_millis(1);
        assert!(
            self.now.duration_since(self.base) < VIRTUAL_TIME_MAX,
            "stuck: {VIRTUAL_TIME_MAX:?} of virtual time without finishing ({})",
            self.state_line()
        );
        self.turns(100);
    }
}

/// Run one seed; on failure, print its trace and the replay command, and panic.
fn run_seed(seed: u64, print_trace: bool, coverage: &mut Coverage) {
    let mut sim = Sim::new(seed);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    if outcome.is_ok() {
        sim.coverage(coverage);
    }
    if outcome.is_err() || print_trace {
        let skip = sim.trace.len().saturating_sub(TRACE_PRINTED_MAX);
        for line in &sim.trace[skip..] {
            eprintln!("{line}");
        }
    }
    if let Err(panic) = outcome {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        panic!(
            "simulation seed {seed} failed: {message}\n  replay: ACGI_SIM_SEED={seed} cargo test \
             -p acgi-bridge --lib engine::sim -- --nocapture"
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

#[test]
fn a_seed_replays_exactly() {
    // Proves what ACGI_SIM_SEED=N relies on: the same seed gives the same run, event for event.
    let trace = |seed| {
        let mut sim = Sim::new(seed);
        sim.run();
        sim.trace
    };
    for seed in [3].into_iter().chain(REGRESSION_SEEDS) {
        assert_eq!(trace(seed), trace(seed), "seed {seed} ran two ways");
    }
}

#[test]
fn seeded_runs_keep_every_invariant() {
    // Proves the engine under seeded interleavings and faults: invariants after every event,
    // every answer where it belongs, every injected fault named. ACGI_SIM_SEED=N replays one.
    let mut coverage = Coverage::new();
    if let Some(seed) = env_u64("ACGI_SIM_SEED") {
        run_seed(seed, true, &mut coverage);
        eprintln!("coverage: {coverage:?}");
        return;
    }
    for seed in REGRESSION_SEEDS {
        run_seed(seed, false, &mut coverage);
    }
    let seeds = env_u64("ACGI_SIM_SEEDS").unwrap_or(300);
    for seed in 0..seeds {
        run_seed(seed, false, &mut coverage);
    }
    eprintln!("coverage over {seeds} seeds: {coverage:?}");
    if seeds >= 300 {
        // What the default run must reach (a change that stops the simulation from reaching
        // one of these would otherwise pass unnoticed).
        for path in REQUIRED_COVERAGE {
            let reached = coverage.get(path).copied().unwrap_or(0);
            assert!(reached > 0, "{seeds} seeds never reached `{path}`");
        }
    }
}
