//! The cores of a run, wired as `engine::run` wires them: every core gets its own ring (a
//! `SimRing`), its own spawner and its shard of each service (`Policy::shard`), all share one
//! `Shared` (inboxes, placement counts, admission, the shutdown flag), and every core accepts
//! on the same listener (each its own duplicate of it), so that the core that wins an accept
//! may hand the connection to the one with fewer callers (`Msg::Connection`) and a request may
//! run on the core with an idle worker (`Msg::Forward`, answered with `Msg::Answer`).
//!
//! Why the seed interleaves them: on real threads, what one core does between another's
//! post and its wake-up is the kernel's choice; here each step the seed picks which rings
//! carry out an op and which cores turn, and in which order, so a post can sit in an inbox
//! while its sender and its receiver both move on.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::worker::Worker;
use super::{Sim, SLOT_BYTES};
use crate::engine::admission::{Access, Admission, Limits};
use crate::engine::core::{Core, CoreSetup, ListenerKind};
use crate::engine::index::{CoreIndex, TypedIndex};
use crate::engine::io::sim::{self as ring_sim, Faults, SimHandle};
use crate::engine::io::Ring;
use crate::engine::shared::Shared;
use crate::engine::spawn::{SpawnError, SpawnRequest, SpawnResult, Spawned, Spawner};

/// The spawner's other end: the simulation takes its requests and answers them.
pub(super) struct SpawnerEnd {
    requests: mpsc::Receiver<SpawnRequest>,
    results: Arc<Mutex<Vec<SpawnResult>>>,
    wake: Arc<OwnedFd>,
}

/// One core of the run and what the simulation holds of it.
pub(super) struct SimCore {
    pub(super) core: Core,
    pub(super) ring: SimHandle,
    spawner: SpawnerEnd,
    /// Its service's fault counts as last seen (what it counted since is new).
    pub(super) faults_counted: Vec<u64>,
    /// Its turn said it has finished: the engine's loop would have returned here.
    pub(super) finished: bool,
}

/// `count` cores on `listener` (and its duplicates), their clocks starting at `base`.
pub(super) fn build(
    count: usize,
    config: &Arc<crate::config::Config>,
    listener: UnixListener,
    faults: Faults,
    base: Instant,
) -> (Arc<Shared>, Vec<SimCore>) {
    let shard_max: Vec<Vec<u32>> = (0..count)
        .map(|core| {
            let shard = |s: &crate::config::ServiceConfig| s.policy().shard(core, count);
            config
                .services
                .iter()
                .map(|s| shard(s).max_workers)
                .collect()
        })
        .collect();
    let admission = Admission::new(Limits::from_config(config), Access::from_config(config));
    let shared = Arc::new(Shared::new(&shard_max, admission).expect("eventfds"));
    let mut listeners = vec![listener];
    for _ in 1..count {
        let duplicate = listeners[0].try_clone().expect("dup the listener");
        listeners.push(duplicate);
    }
    let cores = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let (requests_tx, requests) = mpsc::channel();
            let results: Arc<Mutex<Vec<SpawnResult>>> = Arc::default();
            let flags =
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
            let wake = Arc::new(rustix::event::eventfd(0, flags).expect("an eventfd"));
            let spawner = Spawner::from_parts(requests_tx, Arc::clone(&results), Arc::clone(&wake));
            let (sim_ring, ring) = ring_sim::pair(faults);
            ring.set_now(base);
            let setup = CoreSetup {
                index: CoreIndex::from_usize(index),
                shared: Arc::clone(&shared),
                config: Arc::clone(config),
                listeners: vec![(OwnedFd::from(listener), ListenerKind::Unix)],
                spawner,
            };
            SimCore {
                core: Core::with_ring(setup, Ring::simulated(sim_ring), base),
                ring,
                spawner: SpawnerEnd {
                    requests,
                    results,
                    wake,
                },
                faults_counted: vec![0; Core::SIM_FAULT_LABELS.len()],
                finished: false,
            }
        })
        .collect();
    (shared, cores)
}

impl Sim {
    /// The cores that still run their loop.
    pub(super) fn live_cores(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.cores.len()).filter(|&c| !self.cores[c].finished)
    }

    /// Each core that still runs turns with probability `percent`, in an order the seed picks.
    pub(super) fn turns(&mut self, percent: u64) {
        let count = self.cores.len();
        let start = self.rng.below(count as u64) as usize;
        for at in 0..count {
            if self.rng.chance(percent) {
                self.turn((start + at) % count);
            }
        }
    }

    /// Core `c`'s ring carries out one op the seed picks, if it can. A finished core's ring
    /// still does: its last turn submitted what it had queued (the wake-ups of the other
    /// cores when it was the last to finish), which the kernel carries out although the loop
    /// has returned; nobody reads their completions.
    pub(super) fn ring_step(&mut self, c: usize) -> bool {
        if self.cores.get(c).is_none() {
            return false;
        }
        match self.cores[c].ring.step(&mut self.rng) {
            Some(line) => {
                self.log(format!("core {c}: {line}"));
                true
            }
            None => false,
        }
    }

    /// One turn of core `c` at the simulation's clock, then what it asked of the outside: its
    /// spawns and signals, and the check of the faults it counted.
    pub(super) fn turn(&mut self, c: usize) {
        if self.cores.get(c).is_none_or(|core| core.finished) {
            return;
        }
        self.cores[c].ring.set_now(self.now);
        let finished = self.cores[c]
            .core
            .turn(self.now)
            .expect("a turn of the simulated core");
        if finished {
            assert!(
                self.stop_sent.is_some(),
                "core {c} finished without being asked to stop"
            );
            self.cores[c].finished = true;
            self.log(format!("core {c} finished"));
        }
        self.spawn(c);
        let mut lines = Vec::new();
        let signals = ring_sim::take_signals();
        let mut killed = Vec::new();
        for (pid, signal) in signals {
            let at = self.by_pid[&pid];
            assert_eq!(
                self.worker_core[at], c,
                "core {c} signalled worker {pid} of another core"
            );
            let model = &mut self.workers[at];
            lines.push(format!("signal {signal} to worker {pid}"));
            if signal == libc::SIGKILL {
                killed.push(pid);
            }
            if !model.dead {
                model.on_signal(signal, &mut lines);
            }
        }
        for line in lines {
            self.log(line);
        }
        self.match_faults(c, &killed);
        self.drop_cores_once_finished();
    }

    /// Answer core `c`'s spawn requests with worker models (some fail to start when the seed
    /// injects faults).
    fn spawn(&mut self, c: usize) {
        while let Ok(request) = self.cores[c].spawner.requests.try_recv() {
            let result = if self.scenario.faults && self.rng.chance(5) {
                self.log(format!("core {c}: spawn fails"));
                Err(SpawnError::Resources {
                    what: "the simulation's spawn",
                    error: std::io::Error::other("refused"),
                })
            } else {
                Ok(self.start_worker(c))
            };
            let slot = request.slot;
            let spawner = &self.cores[c].spawner;
            let result = SpawnResult { slot, result };
            spawner.results.lock().expect("not poisoned").push(result);
            rustix::io::write(&*spawner.wake, &1u64.to_ne_bytes()).expect("wake the core");
        }
    }

    fn start_worker(&mut self, c: usize) -> Spawned {
        let pid = self.next_pid;
        self.next_pid += 1;
        let (engine_end, model_end) = UnixStream::pair().expect("a socket pair");
        let pipe = || {
            rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )
        };
        let (stdout, stdout_write) = pipe().expect("a pipe");
        let (stderr, stderr_write) = pipe().expect("a pipe");
        let slot = crate::shm::Slot::create("acgi-sim", SLOT_BYTES as u32).expect("a slot");
        let iovec = slot.as_iovec();
        self.engine_slots
            .insert(pid, (iovec.iov_base as usize, iovec.iov_len));
        let attached = slot.fd().try_clone_to_owned().expect("dup the slot");
        let view = acgi_worker::WorkerSlot::attach(attached).expect("the model attaches");
        let fault = match self.scenario.guessers {
            true => Some(super::Fault::Guess),
            false => (self.scenario.faults && self.rng.chance(25)).then(|| {
                super::Fault::ALL[self.rng.below(super::Fault::ALL.len() as u64) as usize]
            }),
        };
        let fail_percent = if self.scenario.faults { 3 } else { 0 };
        let queued = self.scenario.queue_depth > 1;
        let outputs = [stdout_write, stderr_write];
        let model = Worker::new(pid, model_end, outputs, view, queued, fault, fail_percent);
        self.log(format!("core {c}: worker {pid} spawned, fault {fault:?}"));
        self.by_pid.insert(pid, self.workers.len());
        self.workers.push(model);
        self.worker_core.push(c);
        Spawned {
            pid,
            control: OwnedFd::from(engine_end),
            stdout,
            stderr,
            slot,
        }
    }
}
