//! One core's event loop: its caller connections, its workers and its shard of every service
//! pool, in rooms along ownership lines (see `docs/engine.md` for the map):
//!
//! | room | owns | hand-offs |
//! |---|---|---|
//! | `event_loop` | the turn: wait, drain a batch of completions, route each by its token | completion → its owner's handler |
//! | `conn/` | the caller room: accept and admission, receives, frames → requests, answers, the send queue, pausing and resuming, close; `conn/direct.rs` reads a large payload from the caller's socket straight into a worker's slot | a request to `dispatch`/`cross_core`; caller → slot (`SlotUse::Filling`) |
//! | `worker/` | the worker room: spawn result, handshake, jobs and answers (`answer.rs`, judged purely), faults, output and its budget, retirement, reaping; `worker/slot_send.rs` sends a reply straight from a worker's slot | answer → its request's caller; slot → caller (`SlotUse::Lent`) |
//! | `request`, `dispatch` | the request table; the pool policy's actions turned into spawns, dispatches, rejections | pool ↔ engine |
//! | `cross_core`, `report`, `shutdown`, `tables` | other cores' messages, this core's report, stopping, the ring's tables | |
//! | `invariants` | the relations between the tables, checked after every completion in debug builds | |
//!
//! The ring itself is behind `super::io` (the only code that names io_uring); connections,
//! workers and requests live in `super::table::Table`s and are named by typed handles
//! (`ConnHandle`, `WorkerHandle`, `RequestHandle`), each with its entry's own 32-bit generation.
//!
//! Ownership of in-flight memory: every buffer or descriptor an op names belongs to a
//! connection, a worker or the core itself, and that owner is not freed until each of its ops
//! has completed (a connection's `Recv` and send state, a worker's in-flight reads and
//! `SlotUse`). `user_data` is a checked [`Token`] (op kind, index, generation), never a
//! pointer; a completion for an owner that no longer exists is a bug caught by a debug
//! assertion and otherwise ignored.
//!
//! Request path: caller frame -> `Request` entry -> `place` (here, or forwarded to another
//! core with an idle worker) -> `Pool::on_request` -> `Dispatch` -> the payload goes into the
//! worker's slot (read there straight from the caller's socket when large and still arriving,
//! or inline on its control socket when larger than the slot) and a `Job` frame rings the worker
//! -> `Done`/`Fail` -> the reply is sent from the slot or copied into the caller's write queue
//! (or, for a forwarded request, sent back to its core as a frame) -> `Pool::on_job_done`.
//!
//! Several cores: each runs one `Core` on its own thread and ring; they meet only through
//! `super::shared` (inboxes, placement counts, the shutdown flag). Every core runs the same
//! loop: the stop signals, the admin socket, `/metrics` and the latency-interval clock belong
//! to the control thread (`super::control`), which reaches a core only through its inbox
//! (`Msg::Shutdown`, `Msg::Report`), so that encoding and file writes never stall callers.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::io::{
    op, raw_result, Completion, Errno, OpKind, ProvidedBuffers, Ring, Sqe, Target, Token,
    PROVIDED_BUFFER_BYTES,
};

use super::admission::{Caller, Peer, Refused, Ticket};
use super::buffer::{Parsed, ReadBuffer, SendQueue};
use super::index::{CoreIndex, IndexVec, ListenerIndex, ServiceSlot, TypedIndex};
use super::report::{CoreReport, ShardReport};
use super::shared::ReportReply;
use super::shared::{self, Forward, Msg, Shared};
use super::spawn::{SpawnError, SpawnRequest, SpawnResult, Spawned, Spawner};
use super::table::{Handle, Table};
use crate::access_log::CallerAddr;
use crate::config::Config;
use crate::metrics::LatencyHistograms;
use crate::pool::{Action, Gone, Pool, RejectReason, StopReason};
use crate::proto::{
    self, ErrorCode, FrameError, Header, Kind, FLAG_IN_SLOT, FLAG_TIMEOUT, HEADER_BYTES,
    TIMEOUT_PREFIX_BYTES,
};
use crate::shm::Slot;

mod admin;
mod conn;
mod cross_core;
mod dispatch;
mod event_loop;
#[cfg(debug_assertions)]
mod invariants;
mod limits;
mod reload;
mod report;
mod request;
mod shutdown;
#[cfg(test)]
mod sim_seam;
mod tables;
pub(crate) mod worker;

use conn::backpressure::Pause;
use conn::direct::DirectRead;
use conn::fault::CallerFault;
use conn::state::{AwaitPayload, Conn, IntoSlot, Phase, Recv, SlotSend};
use limits::*;
pub(crate) use tables::check_memlock;
use tables::*;
use worker::fault::WorkerFault;
use worker::kill;
use worker::output::OutputBudget;
use worker::state::{Job, JobPath, PipeLog, PipeRead, SlotUse, Worker, WorkerState};

/// The tokens of a connection's and a worker's ops carry their handle.
impl Token {
    /// An op of a connection.
    fn conn(kind: OpKind, conn: ConnHandle) -> Token {
        Token::new(kind, conn.index(), conn.generation())
    }

    /// An op of a worker.
    fn worker(kind: OpKind, worker: WorkerHandle) -> Token {
        Token::new(kind, worker.index(), worker.generation())
    }

    /// The connection whose op this is (for connection op kinds).
    fn conn_handle(self) -> ConnHandle {
        ConnHandle::new(self.index, self.generation)
    }

    /// The worker whose op this is (for worker op kinds).
    fn worker_handle(self) -> WorkerHandle {
        WorkerHandle::new(self.index, self.generation)
    }
}

/// Names a caller connection of this core.
type ConnHandle = Handle<Conn>;
/// Names a worker of this core.
type WorkerHandle = Handle<Worker>;
/// Names a request of this core.
type RequestHandle = Handle<Request>;

/// What a listener accepts: callers, on a Unix socket or on TCP. (The admin socket and the
/// metrics endpoint are the control thread's.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Unix,
    Tcp,
}

struct Listener {
    fd: OwnedFd,
    kind: ListenerKind,
    accept_in_flight: bool,
    rearm_at: Option<Instant>,
}

/// Where an answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    /// A live caller connection of this core.
    Conn(ConnHandle),
    /// The core that forwarded the request (the request's handle in that core's table).
    Core {
        core: CoreIndex,
        request: RequestHandle,
    },
}

/// Where a request came from, and so where its answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A caller connection of this core.
    Conn(ConnHandle),
    /// Another core forwarded it: the answer goes back there (to this request of its table).
    Core {
        core: CoreIndex,
        request: RequestHandle,
    },
}

struct Request {
    origin: Origin,
    /// Sent to this core to run (the payload went with it); this entry waits for the answer.
    forwarded_to: Option<CoreIndex>,
    /// Its payload is to be read from the caller's socket into the slot of the worker it is
    /// dispatched to (see `try_direct_read`).
    direct: bool,
    caller_request_id: u64,
    service: ServiceSlot,
    payload: Vec<u8>,
    /// Payload bytes counted against its caller's connection and this core's budget (0 for
    /// requests other cores sent us: their home core counts them).
    held_bytes: u32,
    /// The caller's deadline (FLAG_TIMEOUT), if any.
    deadline: Option<Instant>,
    arrived: Instant,
    /// When a worker took it.
    dispatched: Option<Instant>,
    /// Who called, its payload's length, and whether the slow log has named it (the access
    /// and slow logs: `finish_request`, `log_slow_requests`).
    caller: Option<CallerAddr>,
    request_bytes: u32,
    slow_logged: bool,
}

impl Request {
    /// The message that moves it to another core (its payload goes with it), to be answered
    /// to request handle `request` on core `from`.
    fn forward(&mut self, from: CoreIndex, request: RequestHandle) -> Forward {
        Forward {
            from,
            request: request.to_raw(),
            caller_request_id: self.caller_request_id,
            service: self.service,
            payload: std::mem::take(&mut self.payload),
            deadline: self.deadline,
            arrived: self.arrived,
            caller: self.caller,
        }
    }
}

/// Where a service slot is in its life (see `reload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotPhase {
    /// Started by a reload that is not committed yet: its workers come up, it takes no requests
    /// from callers of this core.
    Warming,
    /// Serving: the slot the service's id and name map to.
    Live,
    /// Replaced or removed by a reload (or a prepared slot given up): it finishes what it holds,
    /// then its workers stop.
    Retired,
    /// Retired, drained, and folded into its service's live slot (see `reload::fold_drained`):
    /// nothing of it is reported or kept but its (empty) pool.
    Folded,
}

struct Service {
    id: u32,
    name: String,
    /// The config it was started from (its workers are spawned from it) and its index there.
    config: Arc<Config>,
    config_index: usize,
    phase: SlotPhase,
    /// Who may call it (`allowed_uids`, `allowed_gids`, `allowed_listeners`); `None`: every
    /// caller that may connect.
    acl: Option<crate::engine::admission::ServiceAcl>,
    /// The budget of its workers' output lines (`log_lines_per_second`).
    output: OutputBudget,
    pool: Pool,
    slot_capacity: u32,
    counters: ServiceCounters,
    /// Latency since start, in the interval running now, and in the last complete interval
    /// (`None` once the slot is folded: the histograms are most of a slot's memory).
    latency: Option<Box<ServiceLatency>>,
    /// The pool statistics of this service's slots folded into this one.
    folded_stats: crate::pool::Stats,
}

/// A service slot's latency histograms.
struct ServiceLatency {
    since_start: LatencyHistograms,
    interval: LatencyHistograms,
    last_interval: LatencyHistograms,
}

impl ServiceLatency {
    fn new() -> Box<ServiceLatency> {
        Box::new(ServiceLatency {
            since_start: LatencyHistograms::new(),
            interval: LatencyHistograms::new(),
            last_interval: LatencyHistograms::new(),
        })
    }
}

/// Requests of one service by outcome (for status).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServiceCounters {
    pub ok: u64,
    /// Indexed by error code (1..=11); index 0 unused.
    pub errors: [u64; 12],
    /// Payload bytes of requests handed to workers, and of replies sent back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Requests and replies that were larger than the slot (the copy path).
    pub copy_path: u64,
    /// Workers killed or lost for a fault, by `WorkerFault::index`.
    pub worker_faults: [u64; WorkerFault::LABELS.len()],
    /// Workers that could not be started, by `SpawnError::index`.
    pub spawn_failures: [u64; SpawnError::LABELS.len()],
}

impl ServiceCounters {
    pub(crate) fn add(&mut self, other: &ServiceCounters) {
        self.ok += other.ok;
        for (mine, theirs) in self.errors.iter_mut().zip(&other.errors) {
            *mine += theirs;
        }
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.copy_path += other.copy_path;
        for (mine, theirs) in self.worker_faults.iter_mut().zip(&other.worker_faults) {
            *mine += theirs;
        }
        for (mine, theirs) in self.spawn_failures.iter_mut().zip(&other.spawn_failures) {
            *mine += theirs;
        }
    }

    /// Spawn failures by reason label, every one in order (zeros included).
    pub(crate) fn spawn_failure_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        SpawnError::LABELS
            .iter()
            .copied()
            .zip(self.spawn_failures.iter().copied())
    }

    /// Worker faults by label, every one in order (zeros included).
    pub(crate) fn faults(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        WorkerFault::LABELS
            .iter()
            .copied()
            .zip(self.worker_faults.iter().copied())
    }

    /// Failed requests by error code, every code in order (zeros included).
    pub(crate) fn failures(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        (1..self.errors.len())
            .filter_map(|code| Some((ErrorCode::from_u16(code as u16)?, self.errors[code])))
    }
}

/// The counters this core keeps (summed across cores for status and `/metrics`; defined
/// once, in `metrics::counters`).
pub type Counters = crate::metrics::BridgeCounters;

pub struct Core {
    ring: Ring,
    /// This core's number (every core runs the same loop; the number names its inbox, its
    /// placement counts and its share of each service).
    index: CoreIndex,
    shared: Arc<Shared>,
    /// Messages taken from the inbox, being handled (kept for its capacity).
    inbox_batch: Vec<Msg>,
    inbox_buf: Box<[u8; 8]>,
    inbox_in_flight: bool,
    /// Where the next search for another core starts (spreads forwards).
    next_core: CoreIndex,
    config: Arc<Config>,
    services: IndexVec<ServiceSlot, Service>,
    /// Services whose pool got an event since the loop last ran their actions (and the same
    /// as a set, by service index): see `pool_touched` and `run_effects`.
    pools_touched: Vec<ServiceSlot>,
    pools_touched_set: IndexVec<ServiceSlot, bool>,
    /// Connections answers were queued for since the loop last settled them (see
    /// `conn_touched`; consecutive repeats of one are skipped, and settling twice is
    /// harmless).
    conns_touched: Vec<ConnHandle>,
    /// When `sweep_callers` runs next, and its buffer (kept for its capacity).
    next_caller_sweep: Instant,
    sweep_scratch: Vec<(ConnHandle, bool)>,
    service_by_id: HashMap<u32, ServiceSlot>,
    service_by_name: HashMap<String, ServiceSlot>,
    listeners: IndexVec<ListenerIndex, Listener>,
    conns: Table<Conn>,
    workers: Table<Worker>,
    requests: Table<Request>,
    job_sequence: u64,
    spawner: Spawner,
    wake_buf: Box<[u8; 8]>,
    wake_in_flight: bool,
    spawn_results: Vec<SpawnResult>,
    completions: Vec<Completion>,
    spare_payloads: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    /// Free entries of the registered-buffer table (empty when registration is unavailable).
    fixed_buffers_free: Vec<u16>,
    /// Free entries of the registered-file table (empty when registration is unavailable).
    files_free: Vec<u32>,
    /// Buffers the kernel fills for multishot receives from callers (if the kernel allows).
    provided: Option<ProvidedBuffers>,
    /// Read buffers given back by idle connections, for the next that needs one.
    read_spares: Vec<Vec<u8>>,
    /// The MEMLOCK warning for a slot that could not be registered was logged (once is enough).
    fixed_buffer_warning_logged: bool,
    /// Serving, or where in its stop (`shutdown.rs`).
    life: shutdown::Life,
    /// When each direct read into a slot must be done: (deadline, connection, request).
    direct_deadlines: VecDeque<(Instant, ConnHandle, RequestHandle)>,
    /// The reload being prepared here: its new slots, and where to say they are ready.
    reload: Option<reload::Pending>,
    /// Retired slots not folded yet, and when to look whether they have drained.
    retired_unfolded: usize,
    next_fold_check: Instant,
    /// When a refused connection was last logged (see `REFUSAL_LOG_INTERVAL`).
    refusal_logged: Option<Instant>,
    /// Payload bytes held for this core's callers' requests, and reserved for frames being
    /// received; its share of `request_bytes_buffered_max` (see `backpressure`).
    request_bytes: u64,
    request_bytes_share: u64,
    /// Answer bytes queued for this core's callers, and its share of
    /// `answer_bytes_buffered_max` (see `Core::account_answers`).
    answer_bytes: u64,
    answer_bytes_share: u64,
    /// Connections paused for the budget, oldest first (handles may be stale).
    budget_waiters: VecDeque<ConnHandle>,
    /// Connections to read again after the current handler.
    resume_pending: Vec<ConnHandle>,
    now: Instant,
    pub counters: Counters,
}

/// What `Core::new` needs from the process setup.
pub struct CoreSetup {
    pub index: CoreIndex,
    pub shared: Arc<Shared>,
    pub config: Arc<Config>,
    pub listeners: Vec<(OwnedFd, ListenerKind)>,
    pub spawner: Spawner,
}

impl Core {
    pub fn new(setup: CoreSetup) -> io::Result<Core> {
        let ring = Ring::new(SQ_ENTRIES, CQ_ENTRIES, RING_BYTES)?;
        Ok(Core::with_ring(setup, ring, Instant::now()))
    }

    /// A core on `ring` (the kernel's, or the simulation's double), its clock starting at `now`.
    pub(crate) fn with_ring(setup: CoreSetup, ring: Ring, now: Instant) -> Core {
        let config = setup.config;
        let (index, shared) = (setup.index, setup.shared);
        let cores = shared.cores.len();
        let request_bytes_share = (config.request_bytes_buffered_max / cores as u64).max(1);
        let answer_bytes_share = (config.answer_bytes_buffered_max / cores as u64).max(1);
        let mut services = IndexVec::new();
        let mut service_by_id = HashMap::new();
        let mut service_by_name = HashMap::new();
        for (number, service) in config.services.iter().enumerate() {
            let slot = ServiceSlot::from_usize(number);
            service_by_id.insert(service.id, slot);
            service_by_name.insert(service.name.clone(), slot);
            services.push(Service::new(&config, number, slot, index, cores, now));
        }
        let shard_workers: u32 = services.iter().map(|s| s.pool.policy().max_workers).sum();
        let fixed_buffers_free = ring.register_buffer_table(buffer_table_entries(shard_workers));
        let files_free = ring.register_file_table(config.connections_max + shard_workers * 2);
        let provided = ring.provided_buffers(config.provided_buffers);
        let listeners = setup
            .listeners
            .into_iter()
            .map(|(fd, kind)| Listener {
                fd,
                kind,
                accept_in_flight: false,
                rearm_at: None,
            })
            .collect();
        let mut core = Core {
            ring,
            index,
            shared,
            inbox_batch: Vec::with_capacity(256),
            inbox_buf: Box::new([0; 8]),
            inbox_in_flight: false,
            next_core: index,
            config,
            next_caller_sweep: now + CALLER_SWEEP_INTERVAL,
            sweep_scratch: Vec::new(),
            pools_touched: Vec::with_capacity(services.len()),
            conns_touched: Vec::new(),
            pools_touched_set: services.iter().map(|_| false).collect(),
            services,
            service_by_id,
            service_by_name,
            listeners,
            conns: Table::with_capacity(1024),
            workers: Table::with_capacity(64),
            requests: Table::with_capacity(1024),
            job_sequence: 0,
            spawner: setup.spawner,
            wake_buf: Box::new([0; 8]),
            wake_in_flight: false,
            spawn_results: Vec::new(),
            completions: Vec::with_capacity(COMPLETIONS_BATCH_MAX),
            spare_payloads: Vec::new(),
            scratch: Vec::new(),
            fixed_buffers_free,
            files_free,
            provided,
            read_spares: Vec::new(),
            fixed_buffer_warning_logged: false,
            life: shutdown::Life::Running,
            direct_deadlines: VecDeque::new(),
            refusal_logged: None,
            reload: None,
            retired_unfolded: 0,
            next_fold_check: now,
            request_bytes: 0,
            request_bytes_share,
            answer_bytes: 0,
            answer_bytes_share,
            budget_waiters: VecDeque::new(),
            resume_pending: Vec::new(),
            now,
            counters: Counters::default(),
        };
        for index in core.listeners.indices() {
            core.arm_accept(index);
        }
        core.arm_spawn_wake();
        core.arm_inbox();
        for service in core.services.indices() {
            core.pool_touched(service);
        }
        core.run_effects();
        core
    }
}

impl Service {
    /// Service `config_index` of `config` in slot `slot` of core `core` (of `cores`), live.
    fn new(
        config: &Arc<Config>,
        config_index: usize,
        slot: ServiceSlot,
        core: CoreIndex,
        cores: usize,
        now: Instant,
    ) -> Service {
        let service = &config.services[config_index];
        Service {
            id: service.id,
            name: service.name.clone(),
            config: Arc::clone(config),
            config_index,
            phase: SlotPhase::Live,
            acl: crate::engine::admission::ServiceAcl::from_config(service),
            output: OutputBudget::new(service.log_lines_per_second, now),
            pool: Pool::new(
                now,
                service.policy().shard(core.usize(), cores),
                seed_from(slot.usize() + core.usize() * 1000),
            ),
            counters: ServiceCounters::default(),
            latency: Some(ServiceLatency::new()),
            folded_stats: crate::pool::Stats::default(),
            slot_capacity: service.slot_size_bytes,
        }
    }

    /// Its configuration.
    fn config(&self) -> &crate::config::ServiceConfig {
        &self.config.services[self.config_index]
    }
}

impl Drop for Core {
    /// The ring first: its ops may name buffers and descriptors the other fields own.
    fn drop(&mut self) {
        self.ring.close();
    }
}

/// The send op for the next chunk of `queue`, if one is due; marks the queue in flight.
fn send_entry(queue: &mut SendQueue, fd: Target, token: Token) -> Option<Sqe> {
    let sqe = op::send(fd, queue.next_chunk()?, 0, token);
    queue.in_flight = true;
    Some(sqe)
}

/// A per-service seed for the pool's recycling jitter (any value will do).
fn seed_from(service: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (service as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_unknown_kinds() {
        // Proves user_data carries kind, index and generation without loss.
        let token = Token::new(OpKind::WorkerWait, 123_456, 0xFFFF_FFFE);
        assert_eq!(Token::decode(token.encode()), Some(token));
        assert_eq!(Token::decode(0), None);
        let conn = ConnHandle::new(crate::engine::table::INDEX_MAX, u32::MAX);
        let decoded = Token::decode(Token::conn(OpKind::ConnSend, conn).encode()).unwrap();
        assert_eq!(
            (decoded.kind, decoded.conn_handle()),
            (OpKind::ConnSend, conn)
        );
    }
}
