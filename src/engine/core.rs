//! One core's event loop: its io_uring, its caller connections, its workers and its shard of
//! every service pool.
//!
//! The loop is a shell around pure parts: it turns completions into events for the pool policy
//! ([`crate::pool::Pool`]) and the policy's actions into submissions. One `submit_and_wait` per
//! turn; completions are drained into a local batch first, then handled, so no handler ever
//! re-enters the ring.
//!
//! Ownership of in-flight memory: every buffer or descriptor named by a submitted entry belongs
//! to a connection, a worker or the core itself, and that owner is not dropped until each of its
//! ops has completed (the `*_in_flight` flags). `user_data` is a checked token, op kind + slab
//! index + generation ([`Token`]), never a pointer; a completion for an owner that no longer
//! exists is a bug caught by a debug assertion and otherwise ignored.
//!
//! Request path: caller frame -> `Request` entry -> `place` (here, or forwarded to another
//! core with an idle worker) -> `Pool::on_request` -> `Dispatch` -> the payload goes into the
//! worker's slot (read there straight from the caller's socket when large and still arriving,
//! or inline on its control socket when larger than the slot) and a `Job` frame rings the worker
//! -> `Done`/`Fail` -> the reply is sent from the slot or copied into the caller's write queue
//! (or, for a forwarded request, sent back to its core as a frame) -> `Pool::on_job_done`.
//!
//! Several cores: each runs one `Core` on its own thread and ring; they meet only through
//! `super::shared` (inboxes, placement counts, the shutdown flag). Core 0 also takes the stop
//! signals, serves the admin socket and `/metrics` (merging every core's report), and keeps the
//! latency-interval clock.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use super::buffer::{Parsed, ReadBuffer, SendQueue};
use super::pbuf::{self, ProvidedBuffers};
use super::shared::{self, Forward, Msg, Shared};
use super::spawn::{SpawnRequest, SpawnResult, Spawned, Spawner};
use crate::config::Config;
use crate::metrics::{self, IntervalLogger, LatencyHistograms, MetricsSnapshot, ServiceMetrics};
use crate::pool::{Action, Gone, Pool, RejectReason, StopReason};
use crate::proto::{
    self, ErrorCode, FrameError, Header, Hello, Kind, FLAG_IN_SLOT, FLAG_TIMEOUT, HEADER_BYTES,
    TIMEOUT_PREFIX_BYTES,
};
use crate::shm::{Slot, SLOT_ABI_VERSION};
use crate::status::{ServiceStatus, Status};

/// Base read-buffer size of a caller connection.
const CONN_READ_BYTES: usize = 2 * 1024;
/// Base read-buffer size of a worker's control socket.
const WORKER_READ_BYTES: usize = 4 * 1024;
/// Read size for worker stdout/stderr; also the longest log line kept.
const PIPE_READ_BYTES: usize = 4096;
/// Completions handled per loop turn at most before submitting again.
const COMPLETIONS_BATCH_MAX: usize = 1024;
/// Submission and completion queue sizes, and about what the rings take in locked memory
/// (64-byte SQEs, 16-byte CQEs, the 4-byte SQ index array).
const SQ_ENTRIES: u32 = 2048;
const CQ_ENTRIES: u32 = 8192;
const RING_BYTES: u64 = SQ_ENTRIES as u64 * (64 + 4) + CQ_ENTRIES as u64 * 16;
/// In-slot replies at least this long are sent straight from the slot (a registered buffer)
/// when the caller's write queue is empty, instead of being copied into it.
const SLOT_SEND_BYTES_MIN: u32 = 4096;
/// Most entries of the ring's registered-buffer table (the kernel's limit).
const FIXED_BUFFERS_MAX: u32 = 1 << 14;
/// After the shutdown timeout, how long the answers it produced may take to reach their callers.
const SHUTDOWN_FLUSH_GRACE: Duration = Duration::from_secs(1);
/// How long an admin or metrics connection may take to send its request and get its answer.
const AUX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin and metrics connections open at once at most.
const AUX_CONNECTIONS_MAX: usize = 64;
/// Longest admin command line.
const ADMIN_LINE_BYTES_MAX: usize = 256;
/// Request payloads at least this long are read from the caller's socket straight into an
/// idle worker's slot (when one is idle and the payload fits), not copied through the bridge.
const DIRECT_READ_BYTES_MIN: u32 = 4096;
/// A caller whose payload has not all arrived this long after a direct read began (holding a
/// worker) is disconnected.
const DIRECT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections' read buffers kept for reuse at most.
const READ_SPARES_MAX: usize = 4096;
/// Delay before re-arming an accept that failed (e.g. out of descriptors).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum OpKind {
    Accept = 1,
    ConnRecv = 2,
    ConnSend = 3,
    WorkerRecv = 4,
    WorkerSend = 5,
    WorkerStdout = 6,
    WorkerStderr = 7,
    WorkerWait = 8,
    Signal = 9,
    SpawnWake = 10,
    Cancel = 11,
    /// The reply header of a send from a slot (linked to `ConnSendFixed`).
    ConnSendHeader = 12,
    /// The reply payload, written from the worker's slot (a registered buffer).
    ConnSendFixed = 13,
    /// A read on this core's wake eventfd: messages from other cores.
    Inbox = 14,
    /// A write to another core's wake eventfd (its completion needs nothing).
    WakeSent = 15,
    /// A caller's request payload read straight into a worker's slot.
    ConnRecvSlot = 16,
    /// A multishot receive from a caller into the core's provided buffers.
    ConnRecvMulti = 17,
}

impl OpKind {
    fn from_u8(value: u8) -> Option<OpKind> {
        Some(match value {
            1 => OpKind::Accept,
            2 => OpKind::ConnRecv,
            3 => OpKind::ConnSend,
            4 => OpKind::WorkerRecv,
            5 => OpKind::WorkerSend,
            6 => OpKind::WorkerStdout,
            7 => OpKind::WorkerStderr,
            8 => OpKind::WorkerWait,
            9 => OpKind::Signal,
            10 => OpKind::SpawnWake,
            11 => OpKind::Cancel,
            12 => OpKind::ConnSendHeader,
            13 => OpKind::ConnSendFixed,
            14 => OpKind::Inbox,
            15 => OpKind::WakeSent,
            16 => OpKind::ConnRecvSlot,
            17 => OpKind::ConnRecvMulti,
            _ => return None,
        })
    }
}

/// `user_data` layout: kind (8 bits) | generation (24 bits) | index (32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token {
    kind: OpKind,
    generation: u32,
    index: u32,
}

const GENERATION_MASK: u32 = (1 << 24) - 1;

impl Token {
    fn new(kind: OpKind, index: usize, generation: u32) -> Token {
        assert!(index <= u32::MAX as usize);
        Token {
            kind,
            generation: generation & GENERATION_MASK,
            index: index as u32,
        }
    }

    fn encode(self) -> u64 {
        ((self.kind as u64) << 56) | ((self.generation as u64) << 32) | self.index as u64
    }

    fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            kind: OpKind::from_u8((user_data >> 56) as u8)?,
            generation: ((user_data >> 32) as u32) & GENERATION_MASK,
            index: user_data as u32,
        })
    }
}

/// A descriptor as an op names it: registered in the ring's file table when there was room
/// (the kernel then skips looking the descriptor up on every op), else plain.
#[derive(Clone, Copy)]
enum Target {
    Fd(types::Fd),
    Fixed(types::Fixed),
}

fn target(fd: &OwnedFd, file: Option<u32>) -> Target {
    match file {
        Some(index) => Target::Fixed(types::Fixed(index)),
        None => Target::Fd(types::Fd(fd.as_raw_fd())),
    }
}

/// Build an op on a [`Target`] (the two descriptor kinds are different types to the builders).
macro_rules! on_target {
    ($target:expr, |$fd:ident| $build:expr) => {
        match $target {
            Target::Fd($fd) => $build,
            Target::Fixed($fd) => $build,
        }
    };
}

/// A pool handle: slab index in the low 32 bits, generation above.
fn handle(index: usize, generation: u32) -> u64 {
    ((generation as u64) << 32) | index as u64
}

fn handle_index(handle: u64) -> usize {
    handle as u32 as usize
}

fn handle_generation(handle: u64) -> u32 {
    (handle >> 32) as u32
}

/// What a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Callers, on a Unix socket.
    Unix,
    /// Callers, on TCP.
    Tcp,
    /// The admin socket (`status`): served apart from the pools and `connections_max`.
    Admin,
    /// The Prometheus endpoint (HTTP `GET /metrics`), also apart from the pools.
    Metrics,
}

impl ListenerKind {
    fn is_caller(self) -> bool {
        matches!(self, ListenerKind::Unix | ListenerKind::Tcp)
    }
}

struct Listener {
    fd: OwnedFd,
    kind: ListenerKind,
    accept_in_flight: bool,
    rearm_at: Option<Instant>,
}

struct Conn {
    generation: u32,
    fd: OwnedFd,
    read: ReadBuffer,
    recv_in_flight: bool,
    /// Answers queued for the caller.
    send: SendQueue,
    /// Payload bytes still to skip after an oversized frame.
    discard: u64,
    /// Requests accepted and not yet answered.
    requests_in_flight: u32,
    /// The caller shut down its side: answer what is in flight, then close.
    read_closed: bool,
    /// Stop reading; close once the queued answers are sent.
    close_when_flushed: bool,
    /// Closed: waiting for in-flight ops to complete before the entry is dropped.
    closing: bool,
    /// A reply being sent straight from a worker's slot (header + fixed write, linked).
    slot_send: Option<SlotSend>,
    /// Which listener it came from: callers speak frames, admin lines, metrics HTTP.
    kind: ListenerKind,
    /// The payload of the request at the front is being read into a worker's slot.
    into_slot: Option<IntoSlot>,
    /// Its index in the ring's registered-file table, if registered.
    file: Option<u32>,
    /// The receive armed (while `recv_in_flight`): plain, multishot, or into a slot.
    recv_kind: OpKind,
    /// The provided buffers ran out under it: plain receives until its buffer is empty again.
    provided_off: bool,
    /// Its last request went straight into a slot: read the next header alone (if it is
    /// large too, none of its payload is copied).
    large_last: bool,
}

/// A request payload being read from the caller's socket straight into a worker's slot (the
/// worker is `Busy` with it; its `Job` goes out once the whole payload is in).
struct IntoSlot {
    request: u64,
    worker: usize,
    worker_generation: u32,
    sequence: u64,
    len: u32,
    filled: u32,
}

/// A reply sent from a slot: the header (the front of `Conn::send`) and the payload (in the slot) go
/// out as two linked ops; the worker is lent to the connection until both complete.
struct SlotSend {
    worker: usize,
    worker_generation: u32,
    len: u32,
    header_result: Option<i32>,
    payload_result: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerState {
    /// Spawned, no handshake yet.
    Starting,
    Idle,
    Busy {
        request: u64,
        sequence: u64,
    },
    /// Its reply is being sent from its slot; back to Idle when the send completes.
    Lending,
    /// Stopped by the policy; waiting for it to exit.
    Stopping,
    /// Failed or exited: out of the pool, waiting to be reaped and for its ops to finish.
    Dead,
}

struct PipeLog {
    fd: OwnedFd,
    buf: Box<[u8; PIPE_READ_BYTES]>,
    line: Vec<u8>,
    in_flight: bool,
    open: bool,
}

impl PipeLog {
    fn new(fd: OwnedFd) -> PipeLog {
        PipeLog {
            fd,
            buf: Box::new([0; PIPE_READ_BYTES]),
            line: Vec::new(),
            in_flight: false,
            open: true,
        }
    }
}

struct Worker {
    generation: u32,
    service: usize,
    pid: i32,
    control: OwnedFd,
    slot: Slot,
    state: WorkerState,
    read: ReadBuffer,
    recv_in_flight: bool,
    /// Job frames (and copy-path payloads) for the worker.
    send: SendQueue,
    stdout: PipeLog,
    stderr: PipeLog,
    siginfo: Box<libc::siginfo_t>,
    wait_in_flight: bool,
    reaped: bool,
    /// The pool has been told this worker is gone (exactly once).
    gone_reported: bool,
    /// Why the worker left, for the exit log line.
    fate: Option<String>,
    /// Index of its slot in the ring's registered-buffer table, if registered.
    buffer_index: Option<u16>,
    /// A connection is sending from its slot.
    lent: bool,
    /// It said (Hello) that it takes queued jobs.
    accepts_queue: bool,
    /// The job it is running (Busy) was sent queued: its answer is inline, the slot unused.
    front_queued: bool,
    /// Jobs sent behind the one it is running, oldest first: (request, job sequence).
    queued: VecDeque<(u64, u64)>,
    /// A caller's payload is being read into its slot: its socket sends wait (the `Job` for
    /// that payload goes first), and it is not freed until the read completes.
    filling: bool,
    /// Its control socket's index in the ring's registered-file table, if registered.
    file: Option<u32>,
}

impl Worker {
    fn ops_in_flight(&self) -> bool {
        self.recv_in_flight
            || self.send.in_flight
            || self.stdout.in_flight
            || self.stderr.in_flight
            || self.wait_in_flight
            || self.lent
            || self.filling
    }
}

/// Where an answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    /// A live caller connection of this core (its index).
    Conn(usize),
    /// The core that forwarded the request (the request's handle there).
    Core { core: usize, request: u64 },
}

/// Where a request came from, and so where its answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A caller connection of this core (its handle).
    Conn(u64),
    /// Another core forwarded it: the answer goes back there.
    Core { core: usize, request: u64 },
}

struct Request {
    generation: u32,
    origin: Origin,
    /// Sent to this core to run (the payload went with it); this entry waits for the answer.
    forwarded_to: Option<usize>,
    /// Its payload is to be read from the caller's socket into the slot of the worker it is
    /// dispatched to (see `try_direct_read`).
    direct: bool,
    caller_request_id: u64,
    service: usize,
    payload: Vec<u8>,
    /// The caller's deadline (FLAG_TIMEOUT), if any.
    deadline: Option<Instant>,
    arrived: Instant,
    /// When a worker took it.
    dispatched: Option<Instant>,
}

impl Request {
    /// The message that moves it to another core (its payload goes with it), to be answered
    /// to request handle `request` on core `from`.
    fn forward(&mut self, from: usize, request: u64) -> Forward {
        Forward {
            from,
            request,
            caller_request_id: self.caller_request_id,
            service: self.service,
            payload: std::mem::take(&mut self.payload),
            deadline: self.deadline,
            arrived: self.arrived,
        }
    }
}

struct Service {
    id: u32,
    name: String,
    pool: Pool,
    slot_capacity: u32,
    counters: ServiceCounters,
    /// Latency since start, in the interval running now, and in the last complete interval.
    latency: LatencyHistograms,
    latency_interval: LatencyHistograms,
    latency_last_interval: LatencyHistograms,
}

/// Requests of one service by outcome (for status).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ServiceCounters {
    pub ok: u64,
    /// Indexed by error code (1..=10); index 0 unused.
    pub errors: [u64; 11],
    /// Payload bytes of requests handed to workers, and of replies sent back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Requests and replies that were larger than the slot (the copy path).
    pub copy_path: u64,
}

impl ServiceCounters {
    fn add(&mut self, other: &ServiceCounters) {
        self.ok += other.ok;
        for (mine, theirs) in self.errors.iter_mut().zip(&other.errors) {
            *mine += theirs;
        }
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.copy_path += other.copy_path;
    }

    /// Failed requests by error code, every code in order (zeros included).
    fn failures(&self) -> impl Iterator<Item = (ErrorCode, u64)> + '_ {
        (1..self.errors.len())
            .filter_map(|code| Some((ErrorCode::from_u16(code as u16)?, self.errors[code])))
    }
}

/// The outcome counters this core keeps (read at exit and by status).
#[derive(Clone, Default, Debug)]
pub struct Counters {
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub malformed_frames: u64,
    pub connections_refused: u64,
    pub slow_callers_disconnected: u64,
    pub replies_sent_from_slot: u64,
    /// Sends from a slot that fell short and were finished from a copy.
    pub slot_sends_spilled: u64,
    /// Requests whose payload was read from the caller's socket straight into a slot.
    pub requests_read_into_slot: u64,
    /// Payload bytes of direct reads that had arrived with the header and were copied.
    pub direct_read_prefix_bytes: u64,
    /// Multishot receives that found the provided buffers all in use (then plain receives).
    pub provided_buffers_ran_out: u64,
    /// Requests sent to another core to run, and connections handed to another core.
    pub requests_forwarded: u64,
    pub connections_handed_over: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.requests_ok += other.requests_ok;
        self.requests_failed += other.requests_failed;
        self.malformed_frames += other.malformed_frames;
        self.connections_refused += other.connections_refused;
        self.slow_callers_disconnected += other.slow_callers_disconnected;
        self.replies_sent_from_slot += other.replies_sent_from_slot;
        self.slot_sends_spilled += other.slot_sends_spilled;
        self.requests_forwarded += other.requests_forwarded;
        self.requests_read_into_slot += other.requests_read_into_slot;
        self.provided_buffers_ran_out += other.provided_buffers_ran_out;
        self.direct_read_prefix_bytes += other.direct_read_prefix_bytes;
        self.connections_handed_over += other.connections_handed_over;
    }
}

pub struct Core {
    ring: IoUring,
    /// This core's number (0 owns signals, the admin socket, metrics and interval logs).
    index: usize,
    shared: Arc<Shared>,
    /// Messages taken from the inbox, being handled (kept for its capacity).
    inbox_batch: Vec<Msg>,
    inbox_buf: Box<[u8; 8]>,
    inbox_in_flight: bool,
    /// Reports being gathered from every core (core 0).
    gathers: Vec<Gather>,
    next_gather: u64,
    /// Where the next search for another core starts (spreads forwards).
    next_core: usize,
    /// This core counted itself in `cores_finished`.
    done: bool,
    config: Arc<Config>,
    services: Vec<Service>,
    service_by_id: HashMap<u32, usize>,
    service_by_name: HashMap<String, usize>,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    workers: Slab<Worker>,
    requests: Slab<Request>,
    next_generation: u32,
    job_sequence: u64,
    /// Core 0 only.
    signal_fd: Option<OwnedFd>,
    signal_buf: Box<[u8; 128]>,
    signal_in_flight: bool,
    spawner: Spawner,
    wake_buf: Box<[u8; 8]>,
    wake_in_flight: bool,
    spawn_results: Vec<SpawnResult>,
    completions: Vec<(u64, i32, u32)>,
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
    /// Set by SIGTERM/SIGINT: when in-flight work must be done.
    shutdown_deadline: Option<Instant>,
    /// The shutdown timeout has passed once (answers are being flushed).
    shutdown_forced: bool,
    /// When the current latency interval ends, when it started, and its log (if configured).
    interval_end: Instant,
    interval_start_wall: std::time::SystemTime,
    interval_logger: Option<IntervalLogger>,
    /// Connections in `conns` that are admin or metrics connections.
    aux_conns: usize,
    /// When each admin or metrics connection must be done (in accept order).
    aux_deadlines: VecDeque<(Instant, u64)>,
    /// When each direct read into a slot must be done: (deadline, connection, request).
    direct_deadlines: VecDeque<(Instant, u64, u64)>,
    started: Instant,
    now: Instant,
    pub counters: Counters,
}

/// What `Core::new` needs from the process setup.
pub struct CoreSetup {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub config: Arc<Config>,
    pub listeners: Vec<(OwnedFd, ListenerKind)>,
    /// Core 0 takes the stop signals.
    pub signal_fd: Option<OwnedFd>,
    pub spawner: Spawner,
}

/// What a gathered report is for.
enum Purpose {
    /// An admin `status` command on this connection.
    Status(u64),
    /// `GET /metrics` on this connection (the request, to answer it once merged).
    Metrics(u64, Vec<u8>),
    /// A latency interval ended (wall-clock start and end, for the interval log).
    Interval(std::time::SystemTime, std::time::SystemTime),
}

/// Reports being collected from every core (core 0).
struct Gather {
    id: u64,
    purpose: Purpose,
    merged: CoreReport,
    waiting: usize,
}

/// One core's share of everything status and metrics report. Core 0 merges the cores' reports
/// into one (adding counts, merging histograms) and builds status and metrics from it.
pub struct CoreReport {
    connections: u64,
    /// Caller connections, and requests answered (run here), of each core (this one's at its
    /// index, zeros elsewhere until merged).
    connections_by_core: Vec<u64>,
    requests_by_core: Vec<u64>,
    files_registered: u64,
    /// Caller connections holding a read buffer now (the others wait on provided buffers).
    read_buffers_held: u64,
    slots_registered: u64,
    worker_processes: u64,
    counters: Counters,
    services: Vec<ShardReport>,
}

/// One core's shard of one service.
struct ShardReport {
    starting: u32,
    idle: u32,
    busy: u32,
    stopping: u32,
    min_workers: u32,
    max_workers: u32,
    backlog: u32,
    failing: bool,
    spawn_rate: u32,
    stats: crate::pool::Stats,
    pids: Vec<i32>,
    counters: ServiceCounters,
    latency: LatencyHistograms,
    latency_last_interval: LatencyHistograms,
}

impl CoreReport {
    fn add(&mut self, other: &CoreReport) {
        self.connections += other.connections;
        for (mine, theirs) in self
            .connections_by_core
            .iter_mut()
            .zip(&other.connections_by_core)
        {
            *mine += theirs;
        }
        for (mine, theirs) in self
            .requests_by_core
            .iter_mut()
            .zip(&other.requests_by_core)
        {
            *mine += theirs;
        }
        self.slots_registered += other.slots_registered;
        self.files_registered += other.files_registered;
        self.read_buffers_held += other.read_buffers_held;
        self.worker_processes += other.worker_processes;
        self.counters.add(&other.counters);
        for (mine, theirs) in self.services.iter_mut().zip(&other.services) {
            mine.starting += theirs.starting;
            mine.idle += theirs.idle;
            mine.busy += theirs.busy;
            mine.stopping += theirs.stopping;
            mine.min_workers += theirs.min_workers;
            mine.max_workers += theirs.max_workers;
            mine.backlog += theirs.backlog;
            mine.failing |= theirs.failing;
            mine.spawn_rate += theirs.spawn_rate;
            mine.stats.add(&theirs.stats);
            mine.pids.extend_from_slice(&theirs.pids);
            mine.counters.add(&theirs.counters);
            mine.latency.add(&theirs.latency);
            mine.latency_last_interval
                .add(&theirs.latency_last_interval);
        }
    }
}

impl Core {
    pub fn new(setup: CoreSetup) -> io::Result<Core> {
        let config = setup.config;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_cqsize(CQ_ENTRIES)
            .dontfork()
            .build(SQ_ENTRIES)
            .map_err(|error| {
                if error.raw_os_error() == Some(libc::ENOMEM) && !has_cap_ipc_lock() {
                    io::Error::new(
                        error.kind(),
                        format!(
                            "creating the io_uring failed ({error}): its rings need about {} KiB \
                             of locked memory and RLIMIT_MEMLOCK is {} KiB; raise the limit \
                             (ulimit -l, systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK",
                            RING_BYTES / 1024,
                            memlock_limit() / 1024
                        ),
                    )
                } else {
                    error
                }
            })?;
        let now = Instant::now();
        let (index, shared) = (setup.index, setup.shared);
        let cores = shared.cores.len();
        let mut services = Vec::new();
        let mut service_by_id = HashMap::new();
        let mut service_by_name = HashMap::new();
        for (number, service) in config.services.iter().enumerate() {
            service_by_id.insert(service.id, number);
            service_by_name.insert(service.name.clone(), number);
            services.push(Service {
                id: service.id,
                name: service.name.clone(),
                pool: Pool::new(
                    now,
                    service.policy().shard(index, cores),
                    seed_from(number + index * 1000),
                ),
                counters: ServiceCounters::default(),
                latency: LatencyHistograms::new(),
                latency_interval: LatencyHistograms::new(),
                latency_last_interval: LatencyHistograms::new(),
                slot_capacity: service.slot_size_bytes,
            });
        }
        let shard_workers: u32 = services.iter().map(|s| s.pool.policy().max_workers).sum();
        let fixed_buffers_free = register_buffer_table(&ring, shard_workers);
        let files_free = register_file_table(&ring, config.connections_max + shard_workers * 2);
        let provided = ProvidedBuffers::register(&ring, config.provided_buffers);
        if index == 0 {
            check_memlock(&config, cores);
        }
        let interval = Duration::from_millis(config.histogram_log_interval_ms);
        let interval_logger = match &config.histogram_log_dir {
            Some(dir) if index == 0 => {
                std::fs::create_dir_all(dir)?;
                Some(IntervalLogger::new(
                    dir,
                    interval,
                    config.histogram_log_rotate_bytes,
                )?)
            }
            _ => None,
        };
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
            gathers: Vec::new(),
            next_gather: 0,
            next_core: index,
            done: false,
            config,
            services,
            service_by_id,
            service_by_name,
            listeners,
            conns: Slab::with_capacity(1024),
            workers: Slab::with_capacity(64),
            requests: Slab::with_capacity(1024),
            next_generation: 1,
            job_sequence: 0,
            signal_fd: setup.signal_fd,
            signal_buf: Box::new([0; 128]),
            signal_in_flight: false,
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
            shutdown_deadline: None,
            shutdown_forced: false,
            aux_conns: 0,
            aux_deadlines: VecDeque::new(),
            direct_deadlines: VecDeque::new(),
            // Only core 0 keeps the interval clock (see `on_timers`).
            interval_end: if index == 0 {
                now + interval
            } else {
                now + Duration::from_secs(100 * 365 * 86400)
            },
            interval_start_wall: std::time::SystemTime::now(),
            interval_logger,
            started: now,
            now,
            counters: Counters::default(),
        };
        for index in 0..core.listeners.len() {
            core.arm_accept(index);
        }
        if core.signal_fd.is_some() {
            core.arm_signal();
        }
        core.arm_spawn_wake();
        core.arm_inbox();
        for service in 0..core.services.len() {
            core.run_pool_actions(service);
        }
        Ok(core)
    }

    fn generation(&mut self) -> u32 {
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        self.next_generation
    }

    /// Queue one SQE, submitting first if the queue is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry built in this module names memory and descriptors owned by a
            // connection, worker, listener or the core itself, and each owner outlives its op:
            // owners are only dropped once their `*_in_flight` flags are all clear.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            if let Err(error) = self.ring.submit() {
                tracing::error!(%error, "io_uring submit failed while the queue was full");
            }
        }
    }

    fn cancel(&mut self, token: Token) {
        let entry = opcode::AsyncCancel::new(token.encode())
            .build()
            .user_data(Token::new(OpKind::Cancel, 0, 0).encode());
        self.push(entry);
    }

    // ----- the loop -------------------------------------------------------------------------

    /// Run until shutdown completes.
    pub fn run(&mut self) -> io::Result<()> {
        let spin =
            (self.config.idle_spin_us > 0).then(|| Duration::from_micros(self.config.idle_spin_us));
        loop {
            if let Some(spin) = spin {
                self.spin(spin)?;
            }
            let deadline = self.next_deadline();
            let waited = match deadline {
                Some(deadline) => {
                    let timeout = deadline.saturating_duration_since(Instant::now());
                    let timespec = types::Timespec::from(timeout);
                    let args = types::SubmitArgs::new().timespec(&timespec);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            match waited {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(error) => return Err(error),
            }
            self.now = Instant::now();
            loop {
                self.completions.clear();
                for cqe in self.ring.completion().take(COMPLETIONS_BATCH_MAX) {
                    self.completions
                        .push((cqe.user_data(), cqe.result(), cqe.flags()));
                }
                if self.completions.is_empty() {
                    break;
                }
                for index in 0..self.completions.len() {
                    let (user_data, result, flags) = self.completions[index];
                    self.complete(user_data, result, flags);
                }
            }
            if self.shared.cores.len() > 1 {
                self.rebalance();
                self.publish();
            }
            self.on_timers();
            if self.finished() {
                // Wake-ups and answers for other cores may still sit in the submission queue.
                self.ring.submit()?;
                return Ok(());
            }
        }
    }

    /// Before sleeping, poll the ring for a while: a wake-up to a vCPU that is running costs a
    /// few microseconds, one to a halted vCPU tens.
    fn spin(&mut self, budget: Duration) -> io::Result<()> {
        let until = Instant::now() + budget;
        loop {
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: io_uring_enter with no argument: submits queued SQEs (each names memory
            // owned as `push` documents) and runs deferred completions, without waiting.
            unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit, 0, 1, // IORING_ENTER_GETEVENTS
                    None,
                )?;
            }
            if !self.ring.completion().is_empty() || Instant::now() >= until {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = Some(
            self.shutdown_deadline
                .map_or(self.interval_end, |d| d.min(self.interval_end)),
        );
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        };
        for service in &self.services {
            consider(service.pool.next_deadline());
        }
        for listener in &self.listeners {
            consider(listener.rearm_at);
        }
        consider(self.aux_deadlines.front().map(|(deadline, _)| *deadline));
        consider(
            self.direct_deadlines
                .front()
                .map(|(deadline, _, _)| *deadline),
        );
        deadline
    }

    fn on_timers(&mut self) {
        let now = self.now;
        self.expire_aux_connections();
        self.expire_direct_reads();
        for service in 0..self.services.len() {
            if self.services[service]
                .pool
                .next_deadline()
                .is_some_and(|t| t <= now)
            {
                self.services[service].pool.tick(now);
                self.run_pool_actions(service);
            }
        }
        for index in 0..self.listeners.len() {
            if self.listeners[index].rearm_at.is_some_and(|t| t <= now) {
                self.listeners[index].rearm_at = None;
                self.arm_accept(index);
            }
        }
        if self.shutdown_deadline.is_some_and(|t| t <= now) {
            if self.shutdown_forced {
                // The answers had their moment to go out: stop waiting for slow callers.
                self.shutdown_deadline = Some(now + Duration::from_secs(3600));
                let conns: Vec<usize> = self.conns.iter().map(|(index, _)| index).collect();
                for index in conns {
                    self.close_conn(index);
                }
            } else {
                self.shutdown_forced = true;
                self.shutdown_deadline = Some(now + SHUTDOWN_FLUSH_GRACE);
                self.force_shutdown();
            }
        }
        if now >= self.interval_end {
            // Core 0 keeps the interval clock: every core ends its interval when asked, and
            // core 0 logs the merged interval.
            let interval = Duration::from_millis(self.config.histogram_log_interval_ms);
            let wall_now = std::time::SystemTime::now();
            let purpose = Purpose::Interval(self.interval_start_wall, wall_now);
            self.interval_start_wall = wall_now;
            self.interval_end = self.now + interval;
            self.start_gather(purpose);
        }
    }

    /// A latency interval ended: keep it as "last interval" for status.
    fn end_interval(&mut self) {
        for service in &mut self.services {
            std::mem::swap(
                &mut service.latency_last_interval,
                &mut service.latency_interval,
            );
            service.latency_interval.reset();
        }
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        let Some(token) = Token::decode(user_data) else {
            debug_assert!(false, "completion with a foreign user_data {user_data:#x}");
            return;
        };
        match token.kind {
            OpKind::Accept => self.on_accept(token.index as usize, result, flags),
            OpKind::ConnRecv
            | OpKind::ConnRecvSlot
            | OpKind::ConnRecvMulti
            | OpKind::ConnSend
            | OpKind::ConnSendHeader
            | OpKind::ConnSendFixed => {
                let index = token.index as usize;
                let live = self
                    .conns
                    .get(index)
                    .is_some_and(|c| c.generation == token.generation);
                debug_assert!(live, "stale connection completion {token:?}");
                if !live {
                    return;
                }
                match token.kind {
                    OpKind::ConnRecv => self.on_conn_recv(index, result),
                    OpKind::ConnRecvSlot => self.on_conn_recv_slot(index, result),
                    OpKind::ConnRecvMulti => self.on_conn_recv_multi(index, result, flags),
                    OpKind::ConnSend => self.on_conn_send(index, result),
                    kind => self.on_slot_send(index, kind == OpKind::ConnSendHeader, result),
                }
            }
            OpKind::WorkerRecv
            | OpKind::WorkerSend
            | OpKind::WorkerStdout
            | OpKind::WorkerStderr
            | OpKind::WorkerWait => {
                let index = token.index as usize;
                let live = self
                    .workers
                    .get(index)
                    .is_some_and(|w| w.generation == token.generation);
                debug_assert!(live, "stale worker completion {token:?}");
                if !live {
                    return;
                }
                match token.kind {
                    OpKind::WorkerRecv => self.on_worker_recv(index, result),
                    OpKind::WorkerSend => self.on_worker_send(index, result),
                    OpKind::WorkerStdout => self.on_worker_pipe(index, false, result),
                    OpKind::WorkerStderr => self.on_worker_pipe(index, true, result),
                    _ => self.on_worker_reaped(index, result),
                }
                self.free_worker_if_done(index);
            }
            OpKind::Signal => self.on_signal(result),
            OpKind::SpawnWake => self.on_spawn_wake(result),
            OpKind::Inbox => self.on_inbox(result),
            OpKind::WakeSent => {
                if result < 0 {
                    let error = io::Error::from_raw_os_error(-result);
                    tracing::error!(%error, "cannot wake another core");
                }
            }
            OpKind::Cancel => {}
        }
    }

    // ----- listeners and signals -------------------------------------------------------------

    fn arm_accept(&mut self, index: usize) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let listener = &mut self.listeners[index];
        debug_assert!(!listener.accept_in_flight);
        listener.accept_in_flight = true;
        let entry = opcode::AcceptMulti::new(types::Fd(listener.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::new(OpKind::Accept, index, 0).encode());
        self.push(entry);
    }

    fn on_accept(&mut self, index: usize, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.listeners[index].accept_in_flight = false;
        }
        if result < 0 {
            if result != -libc::ECANCELED {
                let error = io::Error::from_raw_os_error(-result);
                tracing::warn!(%error, "accept failed; retrying shortly");
            }
        } else {
            // SAFETY: a successful accept CQE's result is a new descriptor that nothing else
            // owns; we take it exactly once.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(result) };
            self.on_new_connection(fd, self.listeners[index].kind);
        }
        let listener = &mut self.listeners[index];
        if !listener.accept_in_flight && self.shutdown_deadline.is_none() {
            if result < 0 && result != -libc::ECANCELED {
                listener.rearm_at = Some(self.now + ACCEPT_RETRY_DELAY);
            } else {
                self.arm_accept(index);
            }
        }
    }

    fn on_new_connection(&mut self, fd: OwnedFd, kind: ListenerKind) {
        let aux = !kind.is_caller();
        let callers = self.shared.callers_total();
        if self.shutdown_deadline.is_some()
            || (!aux && callers >= self.config.connections_max as u64)
            || (aux && self.aux_conns >= AUX_CONNECTIONS_MAX)
        {
            self.counters.connections_refused += 1;
            tracing::debug!(connections = self.conns.len(), "refusing a connection");
            return;
        }
        if kind == ListenerKind::Tcp {
            let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        }
        if !aux {
            // Keep the cores' connection counts even: hand the connection to the core with
            // the fewest when that is not us (counted there at once, so that concurrent
            // accepts see it).
            let cores = &self.shared.cores;
            let count = |core: usize| cores[core].callers.load(Ordering::Relaxed);
            let least = (0..cores.len()).min_by_key(|&c| (count(c), c != self.index));
            if let Some(core) = least.filter(|&c| c != self.index && count(c) < count(self.index)) {
                cores[core].callers.fetch_add(1, Ordering::Relaxed);
                self.counters.connections_handed_over += 1;
                self.post(core, Msg::Connection { fd, kind });
                return;
            }
        }
        self.add_conn(fd, kind, false);
    }

    /// Register a connection on this core. `counted`: it is in our `callers` count already
    /// (handed over by another core).
    fn add_conn(&mut self, fd: OwnedFd, kind: ListenerKind, counted: bool) {
        let aux = !kind.is_caller();
        if !aux {
            if self.shutdown_deadline.is_some() {
                // Handed over just as we began stopping.
                self.shared.cores[self.index]
                    .callers
                    .fetch_sub(1, Ordering::Relaxed);
                self.counters.connections_refused += 1;
                return;
            }
            if !counted {
                self.shared.cores[self.index]
                    .callers
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.aux_conns += usize::from(aux);
        let generation = self.generation();
        let index = self.conns.insert(Conn {
            generation,
            fd,
            // With provided buffers, a caller's buffer holds memory only while bytes wait in it.
            read: if self.provided.is_some() && kind.is_caller() {
                ReadBuffer::released(CONN_READ_BYTES)
            } else {
                ReadBuffer::new(CONN_READ_BYTES)
            },
            recv_in_flight: false,
            send: SendQueue::default(),
            discard: 0,
            requests_in_flight: 0,
            read_closed: false,
            close_when_flushed: false,
            closing: false,
            slot_send: None,
            into_slot: None,
            file: None,
            recv_kind: OpKind::ConnRecv,
            provided_off: false,
            large_last: false,
            kind,
        });
        if aux {
            self.aux_deadlines
                .push_back((self.now + AUX_CONNECTION_TIMEOUT, handle(index, generation)));
        } else {
            self.conns[index].file = self.register_file(index, true);
        }
        self.arm_conn_recv(index);
    }

    /// Close admin and metrics connections that have not finished within their timeout (a
    /// client that sends half a request must not hold one of the few places for ever).
    fn expire_aux_connections(&mut self) {
        while let Some(&(deadline, conn)) = self.aux_deadlines.front() {
            if deadline > self.now {
                return;
            }
            self.aux_deadlines.pop_front();
            if let Some(index) = self.live_conn(conn) {
                tracing::debug!("closing an admin or metrics connection that timed out");
                self.close_conn(index);
            }
        }
    }

    fn arm_signal(&mut self) {
        self.signal_in_flight = true;
        let fd = self.signal_fd.as_ref().expect("core 0 has the signalfd");
        let entry = opcode::Read::new(
            types::Fd(fd.as_raw_fd()),
            self.signal_buf.as_mut_ptr(),
            self.signal_buf.len() as u32,
        )
        .offset(u64::MAX)
        .build()
        .user_data(Token::new(OpKind::Signal, 0, 0).encode());
        self.push(entry);
    }

    fn on_signal(&mut self, result: i32) {
        self.signal_in_flight = false;
        if result >= 4 {
            let signo = u32::from_ne_bytes(self.signal_buf[0..4].try_into().expect("4 bytes"));
            let now = self.shutdown_deadline.is_some();
            if now {
                tracing::warn!(signal = signo, "second signal: stopping now");
                self.shutdown_deadline = Some(self.now);
            } else {
                tracing::info!(signal = signo, "stopping: finishing requests in flight");
                // Before telling anyone: see `shared` on not losing a forwarded request.
                self.shared.shutdown.store(true, Ordering::SeqCst);
                self.begin_shutdown();
            }
            for core in 1..self.shared.cores.len() {
                self.post(core, Msg::Shutdown { now });
            }
        }
        self.arm_signal();
    }

    fn arm_spawn_wake(&mut self) {
        self.wake_in_flight = true;
        let entry = opcode::Read::new(
            types::Fd(self.spawner.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .offset(u64::MAX)
        .build()
        .user_data(Token::new(OpKind::SpawnWake, 0, 0).encode());
        self.push(entry);
    }

    fn on_spawn_wake(&mut self, _result: i32) {
        self.wake_in_flight = false;
        let mut results = std::mem::take(&mut self.spawn_results);
        self.spawner.take_results(&mut results);
        for result in results.drain(..) {
            self.on_spawned(result);
        }
        self.spawn_results = results;
        self.arm_spawn_wake();
    }

    // ----- other cores -------------------------------------------------------------------------

    fn arm_inbox(&mut self) {
        self.inbox_in_flight = true;
        let fd = self.shared.cores[self.index].wake.as_raw_fd();
        let entry = opcode::Read::new(types::Fd(fd), self.inbox_buf.as_mut_ptr(), 8)
            .offset(u64::MAX)
            .build()
            .user_data(Token::new(OpKind::Inbox, 0, 0).encode());
        self.push(entry);
    }

    /// Send a message to another core, waking it through our ring (the write goes out with
    /// this turn's submit).
    fn post(&mut self, core: usize, msg: Msg) {
        debug_assert_ne!(core, self.index);
        if self.shared.post(core, msg) {
            static ONE: u64 = 1;
            let fd = self.shared.cores[core].wake.as_raw_fd();
            let entry = opcode::Write::new(types::Fd(fd), (&ONE as *const u64).cast(), 8)
                .offset(u64::MAX)
                .build()
                .user_data(Token::new(OpKind::WakeSent, core, 0).encode());
            self.push(entry);
        }
    }

    fn on_inbox(&mut self, result: i32) {
        self.inbox_in_flight = false;
        if result < 0 && result != -libc::EAGAIN {
            let error = io::Error::from_raw_os_error(-result);
            tracing::error!(%error, "reading the inbox eventfd failed");
        }
        let mut batch = std::mem::take(&mut self.inbox_batch);
        self.shared.drain(self.index, &mut batch);
        for msg in batch.drain(..) {
            self.on_message(msg);
        }
        self.inbox_batch = batch;
        self.arm_inbox();
    }

    fn on_message(&mut self, msg: Msg) {
        match msg {
            Msg::Forward(forward) => self.on_forward(forward),
            Msg::Answer { request, frame } => self.on_answer(request, frame),
            Msg::Connection { fd, kind } => self.add_conn(fd, kind, true),
            Msg::Shutdown { now: false } => {
                if self.shutdown_deadline.is_none() {
                    self.begin_shutdown();
                }
            }
            Msg::Shutdown { now: true } => self.shutdown_deadline = Some(self.now),
            Msg::ReportRequest { id, end_interval } => {
                if end_interval {
                    self.end_interval();
                }
                let report = Box::new(self.report());
                self.post(0, Msg::Report { id, report });
            }
            Msg::Report { id, report } => self.on_report(id, &report),
            Msg::Wake => {}
        }
    }

    /// Where a new request of `service` should run: here, or on the core returned.
    ///
    /// In order: an idle worker here; an idle worker on another core (claimed); a busy worker
    /// here with room for a queued job, or room here to start one; room to start one on another
    /// core (claimed); our backlog. A core with no shard of the service sends everything to
    /// the core with the shortest backlog.
    fn place(&mut self, service: usize) -> Option<usize> {
        let cores = self.shared.cores.len();
        let pool = &self.services[service].pool;
        if cores == 1 || pool.idle() > 0 || self.shutdown_deadline.is_some() {
            return None;
        }
        if let Some(core) = self.claim_on_other_core(service, |c| &c.idle) {
            return Some(core);
        }
        let pool = &self.services[service].pool;
        if pool.takes_now() || pool.room() > 0 {
            return None;
        }
        if let Some(core) = self.claim_on_other_core(service, |c| &c.room) {
            return Some(core);
        }
        if self.services[service].pool.policy().max_workers > 0 {
            return None;
        }
        (0..cores)
            .filter(|&c| self.shared.cores[c].services[service].max_workers > 0)
            .min_by_key(|&c| {
                self.shared.cores[c].services[service]
                    .backlog
                    .load(Ordering::Relaxed)
            })
    }

    /// Claim one unit of another core's published count for `service`, searching from a
    /// rotating start so that forwards spread.
    fn claim_on_other_core(
        &mut self,
        service: usize,
        count: impl Fn(&shared::ShardCounts) -> &std::sync::atomic::AtomicU32,
    ) -> Option<usize> {
        let cores = self.shared.cores.len();
        for step in 1..=cores {
            let core = (self.next_core + step) % cores;
            if core == self.index {
                continue;
            }
            if shared::claim(count(&self.shared.cores[core].services[service])) {
                self.next_core = core;
                return Some(core);
            }
        }
        None
    }

    /// Send a request of ours to another core to run. Returns false (and changes nothing) when
    /// the bridge is shutting down: then it runs here.
    fn forward(&mut self, request: u64, core: usize) -> bool {
        let index = self.request_index(request);
        if let Origin::Core {
            core: home,
            request: home_request,
        } = self.requests[index].origin
        {
            // Forwarded to us and waiting in our backlog: pass it on, answered to its home
            // core directly. It stays one forward (counted once, when it left home).
            let mut entry = self.requests.remove(index);
            let forward = entry.forward(home, home_request);
            self.counters.requests_forwarded += 1;
            self.post(core, Msg::Forward(forward));
            return true;
        }
        // Count first, then look at the flag (see `shared`).
        self.shared
            .forwards_in_flight
            .fetch_add(1, Ordering::SeqCst);
        if self.shared.shutdown.load(Ordering::SeqCst) {
            self.forward_settled();
            return false;
        }
        let entry = &mut self.requests[index];
        entry.forwarded_to = Some(core);
        let forward = entry.forward(self.index, request);
        self.counters.requests_forwarded += 1;
        self.post(core, Msg::Forward(forward));
        true
    }

    /// A forwarded request was answered (or given up): when the bridge is stopping and it was
    /// the last, every core may be waiting for it.
    fn forward_settled(&mut self) {
        let previous = self
            .shared
            .forwards_in_flight
            .fetch_sub(1, Ordering::SeqCst);
        if previous == 1 && self.shared.shutdown.load(Ordering::SeqCst) {
            self.wake_all();
        }
    }

    fn wake_all(&mut self) {
        for core in 0..self.shared.cores.len() {
            if core != self.index {
                self.post(core, Msg::Wake);
            }
        }
    }

    /// Another core sent us a request to run.
    fn on_forward(&mut self, forward: Forward) {
        let service = forward.service;
        let now = self.now;
        if forward.from == self.index {
            // One of ours, passed back to us by the core we sent it to: run it here.
            let index = self.request_index(forward.request);
            let entry = &mut self.requests[index];
            debug_assert!(entry.forwarded_to.is_some());
            entry.forwarded_to = None;
            entry.payload = forward.payload;
            self.forward_settled();
            self.services[service]
                .pool
                .on_request(now, forward.request, forward.deadline);
            self.run_pool_actions(service);
            return;
        }
        let generation = self.generation();
        let request = self.requests.insert(Request {
            generation,
            origin: Origin::Core {
                core: forward.from,
                request: forward.request,
            },
            forwarded_to: None,
            direct: false,
            caller_request_id: forward.caller_request_id,
            service,
            payload: forward.payload,
            deadline: forward.deadline,
            arrived: forward.arrived,
            dispatched: None,
        });
        self.services[service]
            .pool
            .on_request(now, handle(request, generation), forward.deadline);
        self.run_pool_actions(service);
    }

    /// The answer to a request we forwarded: pass it to the caller.
    fn on_answer(&mut self, request: u64, frame: Vec<u8>) {
        self.forward_settled();
        let index = self.request_index(request);
        let entry = self.requests.remove(index);
        debug_assert!(entry.forwarded_to.is_some());
        let conn_handle = match entry.origin {
            Origin::Conn(conn) => conn,
            Origin::Core { .. } => unreachable!("forwarded requests are not forwarded again"),
        };
        self.recycle_payload(entry.payload);
        if let Some(conn) = self.conns.get_mut(handle_index(conn_handle)) {
            if conn.generation == handle_generation(conn_handle) {
                conn.requests_in_flight -= 1;
            }
        }
        if let Some(conn) = self.live_conn(conn_handle) {
            self.conns[conn].send.tail().extend_from_slice(&frame);
            self.after_queueing(conn);
            self.close_conn_if_finished(conn);
        }
        self.recycle_payload(frame);
    }

    /// Send the answer frame for a request another core forwarded to us.
    fn send_answer(&mut self, core: usize, request: u64, frame: Vec<u8>) {
        self.post(core, Msg::Answer { request, frame });
    }

    /// Move waiting requests to cores that have idle workers for them.
    fn rebalance(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        for service in 0..self.services.len() {
            while self.services[service].pool.backlog_len() > 0 {
                let Some(core) = self.claim_on_other_core(service, |c| &c.idle) else {
                    break;
                };
                let now = self.now;
                let Some(request) = self.services[service].pool.take_backlogged(now) else {
                    break;
                };
                if !self.forward(request, core) {
                    // Stopping after all: it goes back to the end of our backlog.
                    let deadline = self.requests[handle_index(request)].deadline;
                    self.services[service]
                        .pool
                        .on_request(now, request, deadline);
                    self.run_pool_actions(service);
                    break;
                }
            }
        }
    }

    /// Store our placement counts for the other cores. When an idle worker appears and another
    /// core has a backlog for it, wake that core so that it forwards.
    fn publish(&mut self) {
        for service in 0..self.services.len() {
            let pool = &self.services[service].pool;
            let (idle, room, backlog) = (pool.idle(), pool.room(), pool.backlog_len());
            let counts = &self.shared.cores[self.index].services[service];
            let had_idle = shared::publish(&counts.idle, idle) > 0;
            shared::publish(&counts.room, room);
            shared::publish(&counts.backlog, backlog);
            if idle > 0 && !had_idle {
                for core in 0..self.shared.cores.len() {
                    let backlog = &self.shared.cores[core].services[service].backlog;
                    if core != self.index && backlog.load(Ordering::Relaxed) > 0 {
                        // (A core woken twice in one turn costs nothing: wake-ups coalesce.)
                        self.post(core, Msg::Wake);
                    }
                }
            }
        }
    }

    // ----- status, metrics and intervals across cores ------------------------------------------

    /// This core's report.
    fn report(&self) -> CoreReport {
        let mut pids_by_service: Vec<Vec<i32>> = vec![Vec::new(); self.services.len()];
        for (_, worker) in &self.workers {
            pids_by_service[worker.service].push(worker.pid);
        }
        let services = self
            .services
            .iter()
            .zip(pids_by_service)
            .map(|(service, pids)| {
                let pool = &service.pool;
                ShardReport {
                    starting: pool.starting(),
                    idle: pool.idle(),
                    busy: pool.busy(),
                    stopping: pool.stopping_count(),
                    min_workers: pool.policy().min_workers,
                    max_workers: pool.policy().max_workers,
                    backlog: pool.backlog_len(),
                    failing: pool.is_failing(),
                    spawn_rate: pool.spawn_rate(),
                    stats: pool.stats(),
                    pids,
                    counters: service.counters,
                    latency: service.latency.clone(),
                    latency_last_interval: service.latency_last_interval.clone(),
                }
            })
            .collect();
        let cores = self.shared.cores.len();
        let mut connections_by_core = vec![0; cores];
        connections_by_core[self.index] = self.caller_connections();
        let mut requests_by_core = vec![0; cores];
        requests_by_core[self.index] = self.counters.requests_ok + self.counters.requests_failed;
        CoreReport {
            connections_by_core,
            requests_by_core,
            connections: self.caller_connections(),
            read_buffers_held: self
                .conns
                .iter()
                .filter(|(_, c)| c.kind.is_caller() && !c.read.is_released())
                .count() as u64,
            files_registered: self.conns.iter().filter(|(_, c)| c.file.is_some()).count() as u64
                + self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.file.is_some())
                    .count() as u64,
            slots_registered: self.slots_registered(),
            worker_processes: self.workers.len() as u64,
            counters: self.counters.clone(),
            services,
        }
    }

    /// Ask every core for its report; `finish_gather` runs once all have answered.
    fn start_gather(&mut self, purpose: Purpose) {
        debug_assert_eq!(self.index, 0);
        self.next_gather += 1;
        let id = self.next_gather;
        let end_interval = matches!(purpose, Purpose::Interval(..));
        if end_interval {
            self.end_interval();
        }
        let cores = self.shared.cores.len();
        self.gathers.push(Gather {
            id,
            purpose,
            merged: self.report(),
            waiting: cores - 1,
        });
        for core in 1..cores {
            self.post(core, Msg::ReportRequest { id, end_interval });
        }
        if cores == 1 {
            self.finish_gather(self.gathers.len() - 1);
        }
    }

    fn on_report(&mut self, id: u64, report: &CoreReport) {
        let Some(position) = self.gathers.iter().position(|g| g.id == id) else {
            return;
        };
        let gather = &mut self.gathers[position];
        gather.merged.add(report);
        gather.waiting -= 1;
        if gather.waiting == 0 {
            self.finish_gather(position);
        }
    }

    fn finish_gather(&mut self, position: usize) {
        let gather = self.gathers.swap_remove(position);
        match gather.purpose {
            Purpose::Status(conn) => {
                let Some(index) = self.live_conn(conn) else {
                    return;
                };
                let mut json =
                    serde_json::to_vec(&self.status(&gather.merged)).expect("status serializes");
                json.push(b'\n');
                self.answer_aux(index, &json);
            }
            Purpose::Metrics(conn, request) => {
                let Some(index) = self.live_conn(conn) else {
                    return;
                };
                let snapshot = self.metrics_snapshot(&gather.merged);
                if let Some(response) = metrics::http_response(&request, || snapshot) {
                    self.answer_aux(index, &response);
                }
            }
            Purpose::Interval(start, end) => {
                if let Some(logger) = &mut self.interval_logger {
                    let histograms: Vec<(&str, &LatencyHistograms)> = self
                        .services
                        .iter()
                        .zip(&gather.merged.services)
                        .map(|(s, shard)| (s.name.as_str(), &shard.latency_last_interval))
                        .collect();
                    if let Err(error) = logger.append(end, start, &histograms) {
                        tracing::warn!(%error, "cannot append to the histogram log");
                    }
                }
            }
        }
    }

    /// Send an admin or metrics answer and close the connection after it.
    fn answer_aux(&mut self, index: usize, answer: &[u8]) {
        let conn = &mut self.conns[index];
        conn.read.consume(conn.read.len());
        conn.send.tail().extend_from_slice(answer);
        conn.close_when_flushed = true;
        self.arm_conn_send(index);
    }

    // ----- caller connections ----------------------------------------------------------------

    fn arm_conn_recv(&mut self, index: usize) {
        let max = self.config.max_payload_bytes;
        let conn = &mut self.conns[index];
        if let Some(into) = &conn.into_slot {
            if conn.recv_in_flight || conn.closing {
                return;
            }
            // The rest of the payload goes straight into the worker's slot (a registered
            // buffer when it could be registered).
            let worker = &self.workers[into.worker];
            let at = worker.slot.data_address_mut(into.filled as usize);
            let len = into.len - into.filled;
            let fd = target(&conn.fd, conn.file);
            let entry = match worker.buffer_index {
                Some(buffer) => on_target!(fd, |fd| opcode::ReadFixed::new(fd, at, len, buffer)
                    .offset(u64::MAX)
                    .build()),
                None => on_target!(fd, |fd| opcode::Recv::new(fd, at, len).build()),
            }
            .user_data(Token::new(OpKind::ConnRecvSlot, index, conn.generation).encode());
            conn.recv_in_flight = true;
            conn.recv_kind = OpKind::ConnRecvSlot;
            self.push(entry);
            return;
        }
        if conn.recv_in_flight || conn.closing || conn.read_closed || conn.close_when_flushed {
            return;
        }
        if self.provided.is_some() && conn.kind.is_caller() && !conn.provided_off {
            // One receive stays armed; each completion brings a buffer the kernel picked.
            let fd = target(&conn.fd, conn.file);
            let entry = on_target!(fd, |fd| opcode::RecvMulti::new(fd, pbuf::GROUP).build())
                .user_data(Token::new(OpKind::ConnRecvMulti, index, conn.generation).encode());
            conn.recv_in_flight = true;
            conn.recv_kind = OpKind::ConnRecvMulti;
            self.push(entry);
            return;
        }
        if conn.read.is_released() {
            conn.read.reacquire(self.read_spares.pop());
        }
        conn.recv_kind = OpKind::ConnRecv;
        let needed = if conn.discard > 0 {
            0
        } else {
            conn.read.frame_bytes_needed(max)
        };
        conn.read.prepare_read(needed);
        let fd = target(&conn.fd, conn.file);
        // After a direct read, read the next header alone: if that request is large too, none
        // of its payload is then read anywhere but into the worker's slot.
        let header_only = conn.large_last && conn.read.is_empty() && conn.discard == 0;
        let spare = conn.read.spare();
        let (at, len) = (
            spare.as_mut_ptr(),
            if header_only {
                HEADER_BYTES as u32
            } else {
                spare.len().min(u32::MAX as usize) as u32
            },
        );
        let entry = on_target!(fd, |fd| opcode::Recv::new(fd, at, len).build())
            .user_data(Token::new(OpKind::ConnRecv, index, conn.generation).encode());
        conn.recv_in_flight = true;
        self.push(entry);
    }

    fn on_conn_recv(&mut self, index: usize, result: i32) {
        let conn = &mut self.conns[index];
        conn.recv_in_flight = false;
        if conn.closing {
            self.free_conn_if_done(index);
            return;
        }
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            tracing::debug!(%error, "caller connection failed");
            self.close_conn(index);
            return;
        }
        if result == 0 {
            conn.read_closed = true;
            self.close_conn_if_finished(index);
            return;
        }
        conn.read.commit(result as usize);
        match conn.kind {
            ListenerKind::Admin => self.handle_admin(index),
            ListenerKind::Metrics => self.handle_metrics(index),
            ListenerKind::Unix | ListenerKind::Tcp => self.handle_frames(index),
        }
        if let Some(conn) = self.conns.get_mut(index) {
            if conn.read.is_empty() {
                // Back to multishot receives (if it had fallen back from them).
                conn.provided_off = false;
            }
            if !conn.closing {
                self.arm_conn_recv(index);
            }
        }
    }

    /// A multishot receive completed: copy the bytes out of the kernel's buffer (into the
    /// slot being filled, then the connection's buffer), give the buffer back, handle frames.
    fn on_conn_recv_multi(&mut self, index: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let conn = &mut self.conns[index];
        if !more {
            conn.recv_in_flight = false;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            if result > 0 && !conn.closing {
                self.take_provided(index, bid, result as usize);
            }
            if let Some(provided) = &mut self.provided {
                provided.recycle(bid);
            }
        }
        let conn = &mut self.conns[index];
        if conn.closing {
            if !conn.recv_in_flight {
                self.abort_direct_read(index);
                self.free_conn_if_done(index);
            }
            return;
        }
        if result == -libc::ENOBUFS {
            // More receives completed than the ring has buffers: plain receives for a while.
            conn.provided_off = true;
            self.counters.provided_buffers_ran_out += 1;
        } else if result < 0 && result != -libc::ECANCELED {
            let error = io::Error::from_raw_os_error(-result);
            tracing::debug!(%error, "caller connection failed");
            self.close_conn(index);
            return;
        } else if result == 0 {
            conn.read_closed = true;
            if conn.into_slot.is_some() {
                self.close_conn(index);
            } else {
                self.close_conn_if_finished(index);
            }
            return;
        }
        if result > 0 {
            if conn
                .into_slot
                .as_ref()
                .is_some_and(|into| into.filled == into.len)
            {
                self.finish_direct_read(index);
            }
            if self.conns[index].into_slot.is_none() {
                self.handle_frames(index);
            }
        }
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.closing {
            return;
        }
        let max = self.config.max_payload_bytes;
        let missing = conn
            .read
            .frame_bytes_needed(max)
            .saturating_sub(conn.read.len());
        if conn.recv_in_flight
            && conn.into_slot.is_none()
            && !conn.read.is_empty()
            && missing > pbuf::BUFFER_BYTES
        {
            // A large frame is arriving: read the rest with plain receives sized for it rather
            // than buffer by buffer (back to provided buffers once it is through).
            conn.provided_off = true;
            let token = Token::new(OpKind::ConnRecvMulti, index, conn.generation);
            self.cancel(token);
            return;
        }
        if conn.recv_in_flight && conn.read.is_empty() {
            // Waiting for its next request: it holds no buffer meanwhile.
            if let Some(bytes) = conn.read.release() {
                if self.read_spares.len() < READ_SPARES_MAX {
                    self.read_spares.push(bytes);
                }
            }
        }
        if !conn.recv_in_flight {
            self.arm_conn_recv(index);
        }
    }

    /// Copy `n` bytes of provided buffer `bid` out: first into the slot a direct read is
    /// filling, the rest into the connection's buffer.
    fn take_provided(&mut self, index: usize, bid: u16, n: usize) {
        let provided = self.provided.as_ref().expect("a provided buffer");
        let mut data = &provided.bytes(bid)[..n];
        let conn = &mut self.conns[index];
        if let Some(into) = &mut conn.into_slot {
            let take = ((into.len - into.filled) as usize).min(data.len());
            let worker = &self.workers[into.worker];
            let at = worker.slot.data_address_mut(into.filled as usize);
            // SAFETY: the worker is filling, so its slot is Free and the data area ours;
            // `take` fits what is left of the payload, which fits the slot.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), at, take) };
            into.filled += take as u32;
            data = &data[take..];
        }
        if !data.is_empty() {
            if conn.read.is_released() {
                conn.read.reacquire(self.read_spares.pop());
            }
            conn.read.append(data);
        }
    }

    /// Handle every whole frame at the front of the connection's buffer.
    fn handle_frames(&mut self, index: usize) {
        let max = self.config.max_payload_bytes;
        loop {
            // Handling a frame can close and free this very connection (a reply that overflows
            // its queue): look it up afresh every time.
            let Some(conn) = self.conns.get_mut(index) else {
                return;
            };
            if conn.closing || conn.close_when_flushed {
                return;
            }
            if conn.discard > 0 {
                let n = conn.discard.min(conn.read.len() as u64);
                conn.read.consume(n as usize);
                conn.discard -= n;
                if conn.discard > 0 {
                    return;
                }
                continue;
            }
            match conn.read.parse(max) {
                Parsed::NeedMore => {
                    self.try_direct_read(index);
                    return;
                }
                Parsed::Frame(header) => {
                    if !header.kind.is_caller_to_bridge() {
                        let error = FrameError::UnknownKind {
                            found: header.kind as u8,
                        };
                        self.malformed(index, header.request_id, &error);
                        return;
                    }
                    let allowed = if header.kind == Kind::Request {
                        FLAG_TIMEOUT
                    } else {
                        0
                    };
                    let short_timeout = header.flags & FLAG_TIMEOUT != 0
                        && (header.payload_len as usize) < TIMEOUT_PREFIX_BYTES;
                    if header.flags & !allowed != 0 || short_timeout {
                        // IN_SLOT is for workers; TIMEOUT needs its 4-byte prefix.
                        let error = FrameError::UnknownFlags {
                            found: header.flags,
                        };
                        self.malformed(index, header.request_id, &error);
                        return;
                    }
                    // A whole frame in the buffer: reads of whole bursts serve this caller.
                    conn.large_last = false;
                    let mut payload = self.spare_payloads.pop().unwrap_or_default();
                    payload.clear();
                    payload.extend_from_slice(conn.read.payload(&header));
                    conn.read
                        .consume(HEADER_BYTES + header.payload_len as usize);
                    self.on_caller_frame(index, header, payload);
                }
                Parsed::Bad(FrameError::PayloadTooLarge { header, max })
                    if header.kind.is_caller_to_bridge() =>
                {
                    conn.read.consume(HEADER_BYTES);
                    conn.discard = header.payload_len as u64;
                    self.counters.requests_failed += 1;
                    let message = format!(
                        "payload of {} bytes is over the maximum of {max} bytes",
                        header.payload_len
                    );
                    self.answer_error(
                        index,
                        header.request_id,
                        header.service_id,
                        ErrorCode::PayloadTooLarge,
                        &message,
                    );
                }
                Parsed::Bad(error) => {
                    let filled = conn.read.filled();
                    let request_id = u64::from_le_bytes(filled[16..24].try_into().expect("8"));
                    self.malformed(index, request_id, &error);
                    return;
                }
            }
        }
    }

    // ----- request payloads read straight into a slot ------------------------------------------

    /// The frame at the front of a caller's buffer is a request whose payload has not all
    /// arrived. When it is large, fits the service's slots and a worker of ours is idle,
    /// dispatch it now and read the rest of its payload from the socket straight into that
    /// worker's slot: no copy through the bridge (only the part already read is copied).
    fn try_direct_read(&mut self, index: usize) {
        let max = self.config.max_payload_bytes;
        let conn = &self.conns[index];
        if !conn.kind.is_caller()
            || conn.into_slot.is_some()
            || conn.discard > 0
            || conn.close_when_flushed
            || self.shutdown_deadline.is_some()
        {
            return;
        }
        let Some(header) = conn.read.peek_header(max) else {
            return;
        };
        // (A caller's deadline travels in front of the payload: those take the copy path.)
        if header.kind != Kind::Request
            || header.flags != 0
            || header.payload_len < DIRECT_READ_BYTES_MIN
        {
            return;
        }
        let Some(&service) = self.service_by_id.get(&header.service_id) else {
            return;
        };
        let pool = &self.services[service].pool;
        if header.payload_len > self.services[service].slot_capacity
            || pool.idle() == 0
            || !pool.takes_now()
        {
            return;
        }
        if self
            .workers
            .iter()
            .any(|(_, w)| w.service == service && w.lent && w.state == WorkerState::Idle)
        {
            // The policy might pick a worker whose slot is still being sent from.
            return;
        }
        let prefix = conn.read.len() - HEADER_BYTES;
        debug_assert!(prefix < header.payload_len as usize);
        self.conns[index].large_last = true;
        let now = self.now;
        let request = self.add_caller_request(index, header.request_id, service, Vec::new(), None);
        self.requests[handle_index(request)].direct = true;
        // An idle worker takes it at once: `dispatch_direct` sets up the read.
        self.services[service].pool.on_request(now, request, None);
        self.run_pool_actions(service);
        debug_assert!(self.conns[index].into_slot.is_some() || !self.request_is_live(request));
        let conn = &mut self.conns[index];
        if conn.into_slot.is_none() && !conn.closing {
            // Not dispatched after all (the policy refused it and it was answered): skip
            // its payload.
            conn.read.consume(HEADER_BYTES + prefix);
            conn.discard = (header.payload_len as usize - prefix) as u64;
        }
    }

    /// The policy gave a direct-read request a worker: copy what has arrived into its slot,
    /// and read the rest there (`arm_conn_recv`). The worker's `Job` waits until it is all in.
    fn dispatch_direct(&mut self, request: u64, worker: u64) {
        let request_index = self.request_index(request);
        let worker_index = handle_index(worker);
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        let now = self.now;
        let entry = &mut self.requests[request_index];
        entry.dispatched = Some(now);
        let Origin::Conn(conn_handle) = entry.origin else {
            unreachable!("direct reads are for our own callers");
        };
        let conn_index = handle_index(conn_handle);
        let max = self.config.max_payload_bytes;
        let w = &mut self.workers[worker_index];
        assert_eq!(
            w.state,
            WorkerState::Idle,
            "a direct read needs an idle worker"
        );
        w.state = WorkerState::Busy { request, sequence };
        w.front_queued = false;
        w.filling = true;
        let worker_generation = w.generation;
        let conn = &mut self.conns[conn_index];
        let header = conn.read.peek_header(max).expect("the request's header");
        let prefix = conn.read.len() - HEADER_BYTES;
        self.counters.direct_read_prefix_bytes += prefix as u64;
        let source = &conn.read.filled()[HEADER_BYTES..];
        // SAFETY: the worker is Idle, so its slot is Free and its data area ours; `prefix` is
        // less than the payload length, which fits the slot; the source is our own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(source.as_ptr(), w.slot.data_address_mut(0), prefix)
        };
        conn.read.consume(HEADER_BYTES + prefix);
        if conn.recv_in_flight && conn.recv_kind == OpKind::ConnRecvMulti {
            // The rest goes straight into the slot: stop the multishot receive (what it still
            // brings is copied into the slot) and read there once it has ended.
            let token = Token::new(OpKind::ConnRecvMulti, conn_index, conn.generation);
            self.cancel(token);
        }
        let conn = &mut self.conns[conn_index];
        conn.into_slot = Some(IntoSlot {
            request,
            worker: worker_index,
            worker_generation,
            sequence,
            len: header.payload_len,
            filled: prefix as u32,
        });
        let service = self.workers[worker_index].service;
        self.services[service].counters.bytes_in += header.payload_len as u64;
        self.counters.requests_read_into_slot += 1;
        self.direct_deadlines
            .push_back((now + DIRECT_READ_TIMEOUT, conn_handle, request));
    }

    fn on_conn_recv_slot(&mut self, index: usize, result: i32) {
        let conn = &mut self.conns[index];
        conn.recv_in_flight = false;
        if conn.closing {
            self.abort_direct_read(index);
            self.free_conn_if_done(index);
            return;
        }
        if result <= 0 {
            if result < 0 {
                let error = io::Error::from_raw_os_error(-result);
                tracing::debug!(%error, "caller connection failed in a request's payload");
            }
            self.close_conn(index);
            return;
        }
        let into = conn.into_slot.as_mut().expect("reading into a slot");
        into.filled += result as u32;
        if into.filled == into.len {
            self.finish_direct_read(index);
        }
        self.arm_conn_recv(index);
    }

    /// The whole payload is in the slot: publish it and ring the worker (its `Job` goes ahead
    /// of any queued behind it), unless the worker or the request is gone meanwhile.
    fn finish_direct_read(&mut self, index: usize) {
        let into = self.conns[index]
            .into_slot
            .take()
            .expect("reading into a slot");
        let ours = self.stop_filling(&into);
        if ours && self.request_is_live(into.request) {
            let worker = &mut self.workers[into.worker];
            match worker.slot.fill_in_place(into.sequence, into.len, 0) {
                Ok(()) => {
                    let mut job = Header::new(Kind::Job, 0, into.sequence, 0);
                    job.flags = FLAG_IN_SLOT;
                    worker.send.tail().splice(0..0, job.encode());
                    self.arm_worker_send(into.worker);
                }
                Err(error) => {
                    let reason = format!("corrupted its slot: {error}");
                    self.fail_worker(into.worker, &reason);
                }
            }
        } else {
            self.arm_worker_send(into.worker);
        }
        self.free_worker_if_done(into.worker);
    }

    /// The caller went away (or stalled) before its payload was all in: the request fails,
    /// and the worker, which never saw it, goes on with what is queued behind it or idles.
    fn abort_direct_read(&mut self, index: usize) {
        let Some(into) = self.conns[index].into_slot.take() else {
            return;
        };
        let ours = self.stop_filling(&into);
        if self.request_is_live(into.request) {
            let message = "the caller's payload did not all arrive";
            self.fail_request(into.request, ErrorCode::MalformedFrame, message);
        }
        if ours {
            self.advance(into.worker);
            self.arm_worker_send(into.worker);
            self.job_done(into.worker);
        }
        self.free_worker_if_done(into.worker);
    }

    /// A direct read ended (whole or not): the worker's slot is no longer being read into.
    /// Returns whether the worker is still the same one, busy with that request.
    fn stop_filling(&mut self, into: &IntoSlot) -> bool {
        let worker = &mut self.workers[into.worker];
        worker.filling = false;
        worker.generation == into.worker_generation
            && worker.state
                == (WorkerState::Busy {
                    request: into.request,
                    sequence: into.sequence,
                })
    }

    /// Disconnect callers whose direct read has taken too long: each holds a worker.
    fn expire_direct_reads(&mut self) {
        while let Some(&(deadline, conn, request)) = self.direct_deadlines.front() {
            if deadline > self.now {
                return;
            }
            self.direct_deadlines.pop_front();
            let Some(index) = self.live_conn(conn) else {
                continue;
            };
            if self.conns[index]
                .into_slot
                .as_ref()
                .is_some_and(|into| into.request == request)
            {
                tracing::warn!(
                    "a caller sent a request header but not its payload within {} s; \
                     disconnecting it",
                    DIRECT_READ_TIMEOUT.as_secs()
                );
                self.close_conn(index);
            }
        }
    }

    /// A metrics connection sent bytes: answer its HTTP request, then close.
    fn handle_metrics(&mut self, index: usize) {
        if self.conns[index].requests_in_flight > 0 {
            return; // Gathering the answer already.
        }
        let request = self.conns[index].read.filled().to_vec();
        let mut wants_snapshot = false;
        let response = metrics::http_response(&request, || {
            wants_snapshot = true;
            MetricsSnapshot::default()
        });
        if wants_snapshot {
            // A whole `GET /metrics`: answer it once every core has reported.
            self.gather_for(index, |conn| Purpose::Metrics(conn, request));
        } else if let Some(response) = response {
            self.answer_aux(index, &response);
        }
    }

    /// Start gathering reports to answer an admin or metrics connection.
    fn gather_for(&mut self, index: usize, purpose: impl FnOnce(u64) -> Purpose) {
        let conn = &mut self.conns[index];
        conn.read.consume(conn.read.len());
        conn.requests_in_flight += 1;
        let conn = handle(index, conn.generation);
        self.start_gather(purpose(conn));
    }

    fn metrics_snapshot(&self, report: &CoreReport) -> MetricsSnapshot {
        let services = self
            .services
            .iter()
            .zip(&report.services)
            .map(|(service, shard)| {
                let stats = shard.stats;
                let counters = &shard.counters;
                let requests_failed = counters
                    .failures()
                    .map(|(code, count)| (code.metric_name(), count))
                    .collect();
                ServiceMetrics {
                    name: service.name.clone(),
                    id: service.id,
                    requests_ok: counters.ok,
                    requests_failed,
                    bytes_in: counters.bytes_in,
                    bytes_out: counters.bytes_out,
                    copy_path: counters.copy_path,
                    spawns: stats.spawns,
                    exits: vec![
                        ("recycled", stats.exits_recycled),
                        ("idle", stats.exits_idle),
                        ("crashed", stats.exits_crashed),
                        ("timed_out", stats.exits_timed_out),
                        ("killed", stats.exits_killed),
                        ("shutdown", stats.exits_shutdown),
                        ("failed_start", stats.failed_starts),
                    ],
                    workers: vec![
                        ("starting", shard.starting as u64),
                        ("idle", shard.idle as u64),
                        ("busy", shard.busy as u64),
                        ("stopping", shard.stopping as u64),
                    ],
                    backlog: shard.backlog as u64,
                    latency: shard.latency.clone(),
                }
            })
            .collect();
        MetricsSnapshot {
            connections: report.connections,
            slots_in_use: report.slots_registered,
            connections_by_core: report.connections_by_core.clone(),
            requests_forwarded: report.counters.requests_forwarded,
            services,
        }
    }

    /// An admin connection sent bytes: answer its one command line, then close.
    fn handle_admin(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.requests_in_flight > 0 {
            return; // Gathering the answer already.
        }
        let filled = conn.read.filled();
        let Some(end) = filled.iter().position(|b| *b == b'\n') else {
            if filled.len() > ADMIN_LINE_BYTES_MAX {
                conn.send
                    .tail()
                    .extend_from_slice(b"error: command line too long\n");
                conn.close_when_flushed = true;
                self.arm_conn_send(index);
            }
            return;
        };
        let command = String::from_utf8_lossy(&filled[..end]).trim().to_string();
        match command.as_str() {
            "status" => self.gather_for(index, Purpose::Status),
            other => {
                let reply = format!("error: unknown command {other:?} (try \"status\")\n");
                self.answer_aux(index, reply.as_bytes());
            }
        }
    }

    /// Caller connections open now (admin and metrics ones are not callers).
    fn caller_connections(&self) -> u64 {
        (self.conns.len() - self.aux_conns) as u64
    }

    /// Worker slots registered as fixed buffers now.
    fn slots_registered(&self) -> u64 {
        self.workers
            .iter()
            .filter(|(_, w)| w.buffer_index.is_some())
            .count() as u64
    }

    /// The status report (see `crate::status`) from the merged reports of every core.
    fn status(&self, report: &CoreReport) -> Status {
        let services = self
            .services
            .iter()
            .zip(&report.services)
            .map(|(service, shard)| {
                let stats = shard.stats;
                let policy = service.pool.policy();
                let requests_failed = shard
                    .counters
                    .failures()
                    .filter(|(_, count)| *count > 0)
                    .map(|(code, count)| (code.as_str().to_string(), count))
                    .collect();
                ServiceStatus {
                    id: service.id,
                    name: service.name.clone(),
                    mode: format!("{:?}", policy.mode).to_lowercase(),
                    state: if shard.failing { "failing" } else { "ok" }.to_string(),
                    workers_starting: shard.starting,
                    workers_idle: shard.idle,
                    workers_busy: shard.busy,
                    workers_stopping: shard.stopping,
                    min_workers: shard.min_workers,
                    max_workers: shard.max_workers,
                    backlog: shard.backlog,
                    backlog_max_seen: stats.backlog_len_max,
                    requests_ok: shard.counters.ok,
                    requests_failed,
                    spawns: stats.spawns,
                    failed_starts: stats.failed_starts,
                    exits_recycled: stats.exits_recycled,
                    exits_idle: stats.exits_idle,
                    exits_crashed: stats.exits_crashed,
                    exits_timed_out: stats.exits_timed_out,
                    exits_killed: stats.exits_killed,
                    exits_shutdown: stats.exits_shutdown,
                    spawn_rate: shard.spawn_rate,
                    pids: shard.pids.clone(),
                    latency_since_start: latency_summary(&shard.latency),
                    latency_last_interval: latency_summary(&shard.latency_last_interval),
                }
            })
            .collect();
        // Read first: building the report allocates.
        let allocations = crate::alloc_count::allocations();
        Status {
            allocations,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            cores: self.shared.cores.len() as u32,
            connections: report.connections,
            connections_by_core: report.connections_by_core.clone(),
            requests_by_core: report.requests_by_core.clone(),
            slots_registered: report.slots_registered,
            files_registered: report.files_registered,
            read_buffers_held: report.read_buffers_held,
            worker_processes: report.worker_processes,
            requests_ok: report.counters.requests_ok,
            requests_failed: report.counters.requests_failed,
            requests_forwarded: report.counters.requests_forwarded,
            requests_read_into_slot: report.counters.requests_read_into_slot,
            provided_buffers_ran_out: report.counters.provided_buffers_ran_out,
            direct_read_prefix_bytes: report.counters.direct_read_prefix_bytes,
            connections_handed_over: report.counters.connections_handed_over,
            malformed_frames: report.counters.malformed_frames,
            connections_refused: report.counters.connections_refused,
            slow_callers_disconnected: report.counters.slow_callers_disconnected,
            replies_sent_from_slot: report.counters.replies_sent_from_slot,
            services,
        }
    }

    /// Answer a malformed frame, then close the connection: frame boundaries are lost.
    fn malformed(&mut self, index: usize, request_id: u64, error: &FrameError) {
        self.counters.malformed_frames += 1;
        tracing::debug!(%error, "malformed frame from a caller; closing the connection");
        let message = error.to_string();
        self.answer_error(index, request_id, 0, ErrorCode::MalformedFrame, &message);
        if let Some(conn) = self.conns.get_mut(index) {
            conn.close_when_flushed = true;
            if conn.recv_in_flight {
                let token = Token::new(conn.recv_kind, index, conn.generation);
                self.cancel(token);
            }
        }
        self.close_conn_if_finished(index);
    }

    fn on_caller_frame(&mut self, index: usize, header: Header, payload: Vec<u8>) {
        match header.kind {
            Kind::Ping => {
                let reply = Header::new(
                    Kind::Pong,
                    header.service_id,
                    header.request_id,
                    payload.len() as u32,
                );
                self.answer(index, &reply, &payload);
            }
            Kind::Resolve => {
                let name = String::from_utf8_lossy(&payload);
                match self.service_by_name.get(name.as_ref()) {
                    Some(&service) => {
                        let id = self.services[service].id;
                        let reply = Header::new(Kind::Resolved, id, header.request_id, 0);
                        self.answer(index, &reply, &[]);
                    }
                    None => {
                        let message = format!("no service is named {name:?}");
                        self.answer_error(
                            index,
                            header.request_id,
                            0,
                            ErrorCode::UnknownService,
                            &message,
                        );
                    }
                }
            }
            Kind::Request => {
                let Some(&service) = self.service_by_id.get(&header.service_id) else {
                    self.counters.requests_failed += 1;
                    let message = format!("no service has id {}", header.service_id);
                    self.answer_error(
                        index,
                        header.request_id,
                        header.service_id,
                        ErrorCode::UnknownService,
                        &message,
                    );
                    self.recycle_payload(payload);
                    return;
                };
                let now = self.now;
                let mut payload = payload;
                let mut deadline = None;
                if header.flags & FLAG_TIMEOUT != 0 {
                    let prefix: [u8; TIMEOUT_PREFIX_BYTES] = payload[..TIMEOUT_PREFIX_BYTES]
                        .try_into()
                        .expect("checked length");
                    let timeout_ms = u32::from_le_bytes(prefix);
                    payload.drain(..TIMEOUT_PREFIX_BYTES);
                    if timeout_ms > 0 {
                        deadline = Some(now + Duration::from_millis(timeout_ms as u64));
                    }
                }
                let request =
                    self.add_caller_request(index, header.request_id, service, payload, deadline);
                if let Some(core) = self.place(service) {
                    if self.forward(request, core) {
                        return;
                    }
                }
                self.services[service]
                    .pool
                    .on_request(now, request, deadline);
                self.run_pool_actions(service);
                return;
            }
            _ => unreachable!("checked by is_caller_to_bridge"),
        }
        self.recycle_payload(payload);
    }

    /// A new request from caller connection `index`; returns its handle.
    fn add_caller_request(
        &mut self,
        index: usize,
        caller_request_id: u64,
        service: usize,
        payload: Vec<u8>,
        deadline: Option<Instant>,
    ) -> u64 {
        let conn = &mut self.conns[index];
        conn.requests_in_flight += 1;
        let conn_handle = handle(index, conn.generation);
        let generation = self.generation();
        let request = self.requests.insert(Request {
            generation,
            origin: Origin::Conn(conn_handle),
            forwarded_to: None,
            direct: false,
            caller_request_id,
            service,
            payload,
            deadline,
            arrived: self.now,
            dispatched: None,
        });
        handle(request, generation)
    }

    /// Queue a whole answer frame for the caller, disconnecting a caller that does not read.
    fn answer(&mut self, index: usize, header: &Header, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(index) else {
            return;
        };
        if conn.closing {
            return;
        }
        proto::encode_frame(conn.send.tail(), header, payload);
        self.after_queueing(index);
    }

    fn answer_error(
        &mut self,
        index: usize,
        request_id: u64,
        service_id: u32,
        code: ErrorCode,
        message: &str,
    ) {
        let header = Header::error(request_id, service_id, code, message.len() as u32);
        self.answer(index, &header, message.as_bytes());
    }

    fn after_queueing(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.send.queued_bytes() as u64 > self.config.write_queue_max_bytes {
            self.counters.slow_callers_disconnected += 1;
            tracing::warn!(
                queued_bytes = conn.send.queued_bytes(),
                "caller is not reading its answers; disconnecting it"
            );
            self.close_conn(index);
            return;
        }
        self.arm_conn_send(index);
    }

    fn arm_conn_send(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.closing {
            return;
        }
        let token = Token::new(OpKind::ConnSend, index, conn.generation);
        if let Some(entry) = send_entry(&mut conn.send, target(&conn.fd, conn.file), token) {
            self.push(entry);
        }
    }

    fn on_conn_send(&mut self, index: usize, result: i32) {
        let conn = &mut self.conns[index];
        conn.send.complete(result.max(0) as usize);
        if conn.closing {
            self.free_conn_if_done(index);
            return;
        }
        if result <= 0 {
            let error = io::Error::from_raw_os_error(-result);
            tracing::debug!(%error, "sending to a caller failed");
            self.close_conn(index);
            return;
        }
        self.arm_conn_send(index);
        self.close_conn_if_finished(index);
    }

    /// Close a connection whose caller is done (read side closed or protocol error) once every
    /// accepted request is answered and every answer sent.
    fn close_conn_if_finished(&mut self, index: usize) {
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if conn.closing {
            return;
        }
        let flushed = conn.send.queued_bytes() == 0 && !conn.send.in_flight;
        if flushed && conn.close_when_flushed && !conn.kind.is_caller() {
            // HTTP and admin answers end with the connection: send FIN before closing so that
            // a client's unread bytes cannot turn the close into a reset that eats the answer.
            let _ = rustix::net::shutdown(&conn.fd, rustix::net::Shutdown::Write);
        }
        let caller_done =
            conn.close_when_flushed || (conn.read_closed && conn.requests_in_flight == 0);
        let stopping_and_idle = self.shutdown_deadline.is_some()
            && self.pools_stopped()
            && conn.requests_in_flight == 0;
        if flushed && (caller_done || stopping_and_idle) {
            self.close_conn(index);
        }
    }

    /// Close now: cancel its ops; the entry goes once they complete. Answers still owed to its
    /// requests are dropped when they arrive (the generation no longer matches).
    fn close_conn(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.closing {
            return;
        }
        conn.closing = true;
        let generation = conn.generation;
        let (recv, send) = (conn.recv_in_flight, conn.send.in_flight);
        let from_slot = conn.slot_send.is_some();
        let into_slot = conn.into_slot.is_some();
        let recv_kind = conn.recv_kind;
        if recv {
            self.cancel(Token::new(recv_kind, index, generation));
        } else if into_slot {
            self.abort_direct_read(index);
        }
        if send && from_slot {
            self.cancel(Token::new(OpKind::ConnSendHeader, index, generation));
            self.cancel(Token::new(OpKind::ConnSendFixed, index, generation));
        } else if send {
            self.cancel(Token::new(OpKind::ConnSend, index, generation));
        }
        self.free_conn_if_done(index);
    }

    fn free_conn_if_done(&mut self, index: usize) {
        let conn = &self.conns[index];
        if conn.closing && !conn.recv_in_flight && !conn.send.in_flight {
            debug_assert!(conn.into_slot.is_none());
            let conn = self.conns.remove(index);
            if let Some(file) = conn.file {
                self.unregister_file(file);
            }
            if conn.kind.is_caller() {
                self.shared.cores[self.index]
                    .callers
                    .fetch_sub(1, Ordering::Relaxed);
            } else {
                self.aux_conns -= 1;
            }
        }
    }

    /// The live connection behind a request's handle, if the caller is still there.
    fn live_conn(&self, conn_handle: u64) -> Option<usize> {
        let index = handle_index(conn_handle);
        self.conns
            .get(index)
            .filter(|c| c.generation == handle_generation(conn_handle) && !c.closing)
            .map(|_| index)
    }

    // ----- requests ----------------------------------------------------------------------------

    fn request_index(&self, request: u64) -> usize {
        let index = handle_index(request);
        assert!(
            self.requests
                .get(index)
                .is_some_and(|r| r.generation == handle_generation(request)),
            "pool named an unknown request"
        );
        index
    }

    /// Remove a finished request and account for it on its connection (here, or on the core
    /// it came from). `outcome` is `None` for a reply, else the error code it was answered
    /// with. Returns where the answer goes: a live connection of ours, or another core.
    fn finish_request(&mut self, request: u64, outcome: Option<ErrorCode>) -> Option<Dest> {
        let index = self.request_index(request);
        let entry = self.requests.remove(index);
        debug_assert!(entry.forwarded_to.is_none());
        let now = self.now;
        let queue_wait = entry
            .dispatched
            .unwrap_or(now)
            .saturating_duration_since(entry.arrived);
        let service_time = entry.dispatched.map(|d| now.saturating_duration_since(d));
        let total = now.saturating_duration_since(entry.arrived);
        let service = &mut self.services[entry.service];
        service.latency.record(queue_wait, service_time, total);
        service
            .latency_interval
            .record(queue_wait, service_time, total);
        let counters = &mut service.counters;
        match outcome {
            None => {
                self.counters.requests_ok += 1;
                counters.ok += 1;
            }
            Some(code) => {
                self.counters.requests_failed += 1;
                counters.errors[code as usize] += 1;
            }
        }
        self.recycle_payload(entry.payload);
        let conn_handle = match entry.origin {
            Origin::Conn(conn) => conn,
            Origin::Core { core, request } => return Some(Dest::Core { core, request }),
        };
        let conn_index = handle_index(conn_handle);
        if let Some(conn) = self.conns.get_mut(conn_index) {
            if conn.generation == handle_generation(conn_handle) {
                conn.requests_in_flight -= 1;
            }
        }
        self.live_conn(conn_handle).map(Dest::Conn)
    }

    /// An empty buffer for a payload or frame, from the spares when there is one.
    fn spare_buffer(&mut self) -> Vec<u8> {
        let mut buffer = self.spare_payloads.pop().unwrap_or_default();
        buffer.clear();
        buffer
    }

    /// Keep a payload buffer for the next request (up to a point).
    fn recycle_payload(&mut self, mut payload: Vec<u8>) {
        let capacity = payload.capacity();
        if capacity > 0 && capacity <= 64 * 1024 && self.spare_payloads.len() < 1024 {
            payload.clear();
            self.spare_payloads.push(payload);
        }
    }

    fn fail_request(&mut self, request: u64, code: ErrorCode, message: &str) {
        let index = self.request_index(request);
        let (caller_request_id, service) = {
            let entry = &self.requests[index];
            (entry.caller_request_id, entry.service)
        };
        let service_id = self.services[service].id;
        match self.finish_request(request, Some(code)) {
            Some(Dest::Conn(conn)) => {
                self.answer_error(conn, caller_request_id, service_id, code, message);
                self.close_conn_if_finished(conn);
            }
            Some(Dest::Core { core, request }) => {
                let mut frame = self.spare_buffer();
                let header =
                    Header::error(caller_request_id, service_id, code, message.len() as u32);
                proto::encode_frame(&mut frame, &header, message.as_bytes());
                self.send_answer(core, request, frame);
            }
            None => {}
        }
    }

    // ----- pools -------------------------------------------------------------------------------

    fn run_pool_actions(&mut self, service: usize) {
        while let Some(action) = self.services[service].pool.next_action() {
            match action {
                Action::Spawn => self.request_spawn(service),
                Action::Dispatch { request, worker } => self.dispatch(request, worker),
                Action::Reject {
                    request,
                    code,
                    reason,
                } => {
                    if !self.request_is_live(request) {
                        // Answered already: a reply sent from a slot can race its timeout.
                        continue;
                    }
                    let message = self.reject_message(service, request, reason);
                    self.fail_request(request, code, &message);
                }
                Action::Stop { worker, reason } => self.stop_worker(handle_index(worker), reason),
                Action::Kill { worker } => {
                    let worker = &self.workers[handle_index(worker)];
                    tracing::debug!(pid = worker.pid, "killing a worker");
                    kill(worker, libc::SIGKILL);
                }
            }
        }
    }

    fn reject_message(&self, service: usize, request: u64, reason: RejectReason) -> String {
        let name = &self.services[service].name;
        let policy = self.services[service].pool.policy();
        let waited = self
            .now
            .saturating_duration_since(self.requests[handle_index(request)].arrived);
        match reason {
            RejectReason::BacklogFull => {
                let config = &self.config.services[service];
                format!(
                    "service {name} is at max_workers ({}) and its backlog is full ({})",
                    config.max_workers, config.backlog_max
                )
            }
            RejectReason::BacklogTimeout => {
                format!(
                    "service {name}: waited {} ms for a worker",
                    waited.as_millis()
                )
            }
            RejectReason::DeadlineExceeded => format!(
                "service {name}: the caller's deadline passed after {} ms waiting for a worker",
                waited.as_millis()
            ),
            RejectReason::WorkerStopped => format!(
                "service {name}: queued on a worker that was stopped (the request ahead of it \
                 timed out); it may or may not have run"
            ),
            RejectReason::RequestTimeout => format!(
                "service {name}: the request ran longer than {} ms; its worker is being replaced",
                policy.request_timeout.unwrap_or_default().as_millis()
            ),
            RejectReason::Failing => format!(
                "service {name} cannot keep workers running (crash loop; see the bridge log); \
                 retry later"
            ),
            RejectReason::ShuttingDown => "the bridge is shutting down".to_string(),
        }
    }

    fn request_is_live(&self, request: u64) -> bool {
        self.requests
            .get(handle_index(request))
            .is_some_and(|r| r.generation == handle_generation(request))
    }

    fn pools_stopped(&self) -> bool {
        self.services.iter().all(|s| s.pool.is_stopped())
    }

    fn request_spawn(&mut self, service: usize) {
        let config = &self.config.services[service];
        self.spawner.request(SpawnRequest {
            service_index: service,
            service_name: config.name.clone(),
            service_id: config.id,
            exec: config.exec.clone(),
            args: config.args.clone(),
            env: config.env.clone(),
            slot_capacity: config.slot_size_bytes,
            max_payload_bytes: self.config.max_payload_bytes,
            state_dir: self.config.state_dir.clone(),
        });
    }

    fn dispatch(&mut self, request: u64, worker: u64) {
        let request_index = self.request_index(request);
        let worker_index = handle_index(worker);
        if self.requests[request_index].direct {
            self.dispatch_direct(request, worker);
            return;
        }
        self.job_sequence += 1;
        let sequence = self.job_sequence;
        let entry = &mut self.requests[request_index];
        let payload = std::mem::take(&mut entry.payload);
        let remaining_ms = entry
            .deadline
            .map(|d| d.saturating_duration_since(self.now).as_millis().max(1) as u64)
            .unwrap_or(0);
        let w = &mut self.workers[worker_index];
        assert_eq!(
            w.generation,
            handle_generation(worker),
            "dispatch to a stale worker"
        );
        if w.state != WorkerState::Idle || w.lent {
            // A queued job: the payload follows on the socket, inline, and the worker answers
            // it inline. Either behind the one it is running (a worker that takes them), or, for
            // an idle worker whose slot is still being sent from, as the job it runs next.
            if w.state == WorkerState::Idle {
                assert!(
                    w.accepts_queue,
                    "only workers that take queued jobs are idle while lent"
                );
                w.state = WorkerState::Busy { request, sequence };
                w.front_queued = true;
            } else {
                assert!(
                    w.accepts_queue && matches!(w.state, WorkerState::Busy { .. }),
                    "dispatch to a busy worker that does not take queued jobs"
                );
                w.queued.push_back((request, sequence));
            }
            let mut header = Header::new(Kind::Job, 0, sequence, payload.len() as u32);
            header.flags = proto::FLAG_QUEUED;
            proto::encode_frame(w.send.tail(), &header, &payload);
            let counters = &mut self.services[w.service].counters;
            counters.bytes_in += payload.len() as u64;
            self.requests[request_index].dispatched = Some(self.now);
            self.requests[request_index].payload = payload;
            self.arm_worker_send(worker_index);
            return;
        }
        w.state = WorkerState::Busy { request, sequence };
        w.front_queued = false;
        let in_slot = payload.len() <= w.slot.capacity() as usize;
        let counters = &mut self.services[w.service].counters;
        counters.bytes_in += payload.len() as u64;
        counters.copy_path += u64::from(!in_slot);
        self.requests[request_index].dispatched = Some(self.now);
        let filled = w
            .slot
            .fill(sequence, in_slot.then_some(&payload[..]), remaining_ms);
        let mut header = Header::new(Kind::Job, 0, sequence, 0);
        if in_slot {
            header.flags = FLAG_IN_SLOT;
            w.send.tail().extend_from_slice(&header.encode());
        } else {
            header.payload_len = payload.len() as u32;
            proto::encode_frame(w.send.tail(), &header, &payload);
        }
        self.requests[request_index].payload = payload;
        match filled {
            Ok(()) => self.arm_worker_send(worker_index),
            Err(error) => self.fail_worker(worker_index, &format!("corrupted its slot: {error}")),
        }
    }

    // ----- workers -----------------------------------------------------------------------------

    fn on_spawned(&mut self, result: SpawnResult) {
        let service = result.service_index;
        let name = self.services[service].name.clone();
        let spawned: Spawned = match result.result {
            Ok(spawned) => spawned,
            Err(message) => {
                tracing::error!(service = %name, "{message}");
                let now = self.now;
                self.services[service].pool.on_spawn_failed(now);
                self.run_pool_actions(service);
                return;
            }
        };
        tracing::info!(service = %name, pid = spawned.pid, "worker spawned");
        debug_assert_eq!(
            spawned.slot.capacity(),
            self.services[service].slot_capacity
        );
        let buffer_index = self.register_slot(&spawned.slot);
        let generation = self.generation();
        let index = self.workers.insert(Worker {
            generation,
            service,
            pid: spawned.pid,
            control: spawned.control,
            slot: spawned.slot,
            state: WorkerState::Starting,
            read: ReadBuffer::new(WORKER_READ_BYTES),
            recv_in_flight: false,
            send: SendQueue::default(),
            stdout: PipeLog::new(spawned.stdout),
            stderr: PipeLog::new(spawned.stderr),
            // SAFETY: siginfo_t is plain data; all-zero is a valid value.
            siginfo: Box::new(unsafe { std::mem::zeroed() }),
            wait_in_flight: false,
            reaped: false,
            gone_reported: false,
            fate: None,
            buffer_index,
            lent: false,
            accepts_queue: false,
            front_queued: false,
            queued: VecDeque::new(),
            filling: false,
            file: None,
        });
        self.workers[index].file = self.register_file(index, false);
        self.arm_worker_wait(index);
        self.arm_worker_recv(index);
        self.arm_worker_pipe(index, false);
        self.arm_worker_pipe(index, true);
        let now = self.now;
        self.services[service]
            .pool
            .on_worker_started(now, handle(index, generation));
        self.run_pool_actions(service);
    }

    fn arm_worker_wait(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        worker.wait_in_flight = true;
        let siginfo: *mut libc::siginfo_t = &mut *worker.siginfo;
        let entry = opcode::WaitId::new(libc::P_PID, worker.pid as libc::id_t, libc::WEXITED)
            .infop(siginfo.cast_const())
            .build()
            .user_data(Token::new(OpKind::WorkerWait, index, worker.generation).encode());
        self.push(entry);
    }

    fn arm_worker_recv(&mut self, index: usize) {
        let max = self.config.max_payload_bytes;
        let worker = &mut self.workers[index];
        if worker.recv_in_flight || worker.state == WorkerState::Dead {
            return;
        }
        let needed = worker.read.frame_bytes_needed(max);
        worker.read.prepare_read(needed);
        let fd = target(&worker.control, worker.file);
        let spare = worker.read.spare();
        let (at, len) = (
            spare.as_mut_ptr(),
            spare.len().min(u32::MAX as usize) as u32,
        );
        let entry = on_target!(fd, |fd| opcode::Recv::new(fd, at, len).build())
            .user_data(Token::new(OpKind::WorkerRecv, index, worker.generation).encode());
        worker.recv_in_flight = true;
        self.push(entry);
    }

    fn arm_worker_send(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        if worker.state == WorkerState::Dead || worker.filling {
            return;
        }
        let token = Token::new(OpKind::WorkerSend, index, worker.generation);
        if let Some(entry) = send_entry(
            &mut worker.send,
            target(&worker.control, worker.file),
            token,
        ) {
            self.push(entry);
        }
    }

    fn arm_worker_pipe(&mut self, index: usize, stderr: bool) {
        let worker = &mut self.workers[index];
        let kind = if stderr {
            OpKind::WorkerStderr
        } else {
            OpKind::WorkerStdout
        };
        let token = Token::new(kind, index, worker.generation).encode();
        let pipe = if stderr {
            &mut worker.stderr
        } else {
            &mut worker.stdout
        };
        if pipe.in_flight || !pipe.open {
            return;
        }
        pipe.in_flight = true;
        let entry = opcode::Read::new(
            types::Fd(pipe.fd.as_raw_fd()),
            pipe.buf.as_mut_ptr(),
            PIPE_READ_BYTES as u32,
        )
        .offset(u64::MAX)
        .build()
        .user_data(token);
        self.push(entry);
    }

    fn on_worker_pipe(&mut self, index: usize, stderr: bool, result: i32) {
        let worker = &mut self.workers[index];
        let service = &self.services[worker.service].name;
        let pid = worker.pid;
        let stream = if stderr { "stderr" } else { "stdout" };
        let pipe = if stderr {
            &mut worker.stderr
        } else {
            &mut worker.stdout
        };
        pipe.in_flight = false;
        if result <= 0 {
            pipe.open = false;
            if !pipe.line.is_empty() {
                log_worker_line(service, pid, stream, &pipe.line);
                pipe.line.clear();
            }
            return;
        }
        let data = &pipe.buf[..result as usize];
        for piece in data.split_inclusive(|b| *b == b'\n') {
            if let Some(line) = piece.strip_suffix(b"\n") {
                pipe.line.extend_from_slice(line);
                log_worker_line(service, pid, stream, &pipe.line);
                pipe.line.clear();
            } else {
                pipe.line.extend_from_slice(piece);
                if pipe.line.len() >= PIPE_READ_BYTES {
                    log_worker_line(service, pid, stream, &pipe.line);
                    pipe.line.clear();
                }
            }
        }
        self.arm_worker_pipe(index, stderr);
    }

    fn on_worker_send(&mut self, index: usize, result: i32) {
        let worker = &mut self.workers[index];
        worker.send.complete(result.max(0) as usize);
        if worker.state == WorkerState::Dead {
            return;
        }
        if result <= 0 {
            let error = io::Error::from_raw_os_error(-result);
            self.lose_worker(index, &format!("control socket send failed: {error}"));
            return;
        }
        self.arm_worker_send(index);
    }

    fn on_worker_recv(&mut self, index: usize, result: i32) {
        let worker = &mut self.workers[index];
        worker.recv_in_flight = false;
        if worker.state == WorkerState::Dead {
            return;
        }
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            self.lose_worker(index, &format!("control socket failed: {error}"));
            return;
        }
        if result == 0 {
            if worker.state != WorkerState::Stopping {
                self.lose_worker(index, "closed its control socket");
            }
            return;
        }
        worker.read.commit(result as usize);
        let max = self.config.max_payload_bytes;
        loop {
            let Some(worker) = self.workers.get_mut(index) else {
                return;
            };
            if worker.state == WorkerState::Dead {
                return;
            }
            match worker.read.parse(max) {
                Parsed::NeedMore => break,
                Parsed::Bad(error) => {
                    self.fail_worker(index, &format!("sent a bad frame: {error}"));
                    return;
                }
                Parsed::Frame(header) => {
                    self.on_worker_frame(index, header);
                    if let Some(worker) = self.workers.get_mut(index) {
                        if worker.state != WorkerState::Dead {
                            worker
                                .read
                                .consume(HEADER_BYTES + header.payload_len as usize);
                        }
                    }
                }
            }
        }
        self.arm_worker_recv(index);
    }

    fn on_worker_frame(&mut self, index: usize, header: Header) {
        let worker = &mut self.workers[index];
        let service = worker.service;
        match (worker.state, header.kind) {
            (WorkerState::Starting, Kind::Hello) => {
                let hello = Hello::decode(worker.read.payload(&header));
                match hello {
                    Some(hello) if hello.slot_abi_version == SLOT_ABI_VERSION => {
                        worker.state = WorkerState::Idle;
                        let id = handle(index, worker.generation);
                        tracing::debug!(pid = worker.pid, "worker ready");
                        let now = self.now;
                        let accepts_queue = header.flags & proto::FLAG_QUEUED != 0;
                        worker.accepts_queue = accepts_queue;
                        self.services[service].pool.on_worker_ready_queueing(
                            now,
                            id,
                            accepts_queue,
                        );
                        self.run_pool_actions(service);
                    }
                    Some(hello) => self.fail_worker(
                        index,
                        &format!(
                            "speaks slot ABI {}, this bridge speaks {SLOT_ABI_VERSION}",
                            hello.slot_abi_version
                        ),
                    ),
                    None => self.fail_worker(index, "sent a malformed Hello"),
                }
            }
            (WorkerState::Busy { request, sequence }, Kind::Done | Kind::Fail) => {
                if header.request_id != sequence {
                    let message = format!(
                        "answered job {} while holding job {sequence}",
                        header.request_id
                    );
                    self.fail_worker(index, &message);
                    return;
                }
                self.on_job_answer(index, request, sequence, header);
            }
            // Being stopped (after a timeout, say): whatever it says no longer matters.
            (WorkerState::Stopping, _) => {}
            (state, kind) => {
                let message = format!("sent an unexpected {kind:?} frame while {state:?}");
                self.fail_worker(index, &message);
            }
        }
    }

    /// The busy worker answered its job: validate the slot, forward the reply, free the worker.
    fn on_job_answer(&mut self, index: usize, request: u64, sequence: u64, header: Header) {
        let request_index = self.request_index(request);
        let (origin, caller_request_id, service) = {
            let entry = &self.requests[request_index];
            (entry.origin, entry.caller_request_id, entry.service)
        };
        let service_id = self.services[service].id;
        let dest = match origin {
            Origin::Conn(conn) => self.live_conn(conn).map(Dest::Conn),
            Origin::Core { core, request } => Some(Dest::Core { core, request }),
        };
        let conn = match dest {
            Some(Dest::Conn(conn)) => Some(conn),
            _ => None,
        };
        let in_slot = header.kind == Kind::Done && header.in_slot();
        let front_queued = self.workers[index].front_queued;
        let counters = &mut self.services[service].counters;
        counters.copy_path += u64::from(header.kind == Kind::Done && !in_slot && !front_queued);
        if front_queued && in_slot {
            self.fail_worker(index, "answered a queued job in its slot");
            return;
        }
        if in_slot && header.payload_len != 0 {
            self.fail_worker(index, "sent an in-slot reply with a socket payload");
            return;
        }
        if in_slot {
            let reply = Header::new(Kind::Reply, service_id, caller_request_id, 0);
            if self.try_send_from_slot(index, request, sequence, conn, reply) {
                return;
            }
        }
        let mut target = match dest {
            Some(Dest::Conn(conn)) => std::mem::take(self.conns[conn].send.tail()),
            Some(Dest::Core { .. }) => self.spare_buffer(),
            None => std::mem::take(&mut self.scratch),
        };
        let worker = &mut self.workers[index];
        let start = target.len();
        target.extend_from_slice(&[0; HEADER_BYTES]);
        // A queued job never touched the slot: nothing there to validate or free.
        let taken = if front_queued {
            Ok(0)
        } else {
            worker.slot.take_reply(sequence, in_slot, &mut target)
        };
        let reply_header = match (&taken, header.kind) {
            (Err(_), _) => None,
            (Ok(_), Kind::Done) => {
                if !in_slot {
                    target.extend_from_slice(worker.read.payload(&header));
                }
                let len = (target.len() - start - HEADER_BYTES) as u32;
                self.services[service].counters.bytes_out += len as u64;
                Some(Header::new(Kind::Reply, service_id, caller_request_id, len))
            }
            (Ok(_), _) => {
                target.extend_from_slice(worker.read.payload(&header));
                let len = (target.len() - start - HEADER_BYTES) as u32;
                Some(Header::error(
                    caller_request_id,
                    service_id,
                    ErrorCode::ServiceError,
                    len,
                ))
            }
        };
        match reply_header {
            Some(reply_header) => {
                target[start..start + HEADER_BYTES].copy_from_slice(&reply_header.encode());
            }
            None => target.truncate(start),
        }
        let mut frame = None;
        match dest {
            Some(Dest::Conn(conn)) => *self.conns[conn].send.tail() = target,
            Some(Dest::Core { .. }) => frame = Some(target),
            None => {
                target.clear();
                self.scratch = target;
            }
        }
        if let Err(error) = taken {
            self.fail_worker(index, &format!("broke the slot protocol: {error}"));
            return;
        }
        let ok = header.kind == Kind::Done;
        let outcome = (!ok).then_some(ErrorCode::ServiceError);
        match self.finish_request(request, outcome) {
            Some(Dest::Conn(conn)) => {
                self.after_queueing(conn);
                self.close_conn_if_finished(conn);
            }
            Some(Dest::Core { core, request }) => {
                let frame = frame.expect("built for the core");
                self.send_answer(core, request, frame);
            }
            None => {}
        }
        self.advance(index);
        self.job_done(index);
    }

    /// The worker's running job is answered: the next queued one (already on its socket) is
    /// running now, or the worker is idle.
    fn advance(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        match worker.queued.pop_front() {
            Some((request, sequence)) => {
                worker.state = WorkerState::Busy { request, sequence };
                worker.front_queued = true;
            }
            None => {
                worker.state = WorkerState::Idle;
                worker.front_queued = false;
            }
        }
    }

    /// Tell the pool the worker finished its job (measuring its memory when the policy
    /// recycles on it).
    fn job_done(&mut self, index: usize) {
        let worker = &self.workers[index];
        let id = handle(index, worker.generation);
        let service = worker.service;
        let rss = self.services[service]
            .pool
            .policy()
            .max_rss_bytes
            .and_then(|_| rss_bytes(worker.pid));
        let now = self.now;
        self.services[service].pool.on_job_done(now, id, rss);
        self.run_pool_actions(service);
    }

    /// Send an in-slot reply straight from the worker's slot (a registered buffer) when that
    /// saves a copy: the reply is large, the slot is registered and the caller's queue is empty.
    /// The worker is lent to the connection until the send completes. Returns false to let the
    /// caller copy the reply instead (also when the slot does not validate: the copying path
    /// reports that).
    fn try_send_from_slot(
        &mut self,
        index: usize,
        request: u64,
        sequence: u64,
        conn: Option<usize>,
        mut reply: Header,
    ) -> bool {
        let Some(conn) = conn else { return false };
        let worker = &self.workers[index];
        let Some(buffer_index) = worker.buffer_index else {
            return false;
        };
        // A worker that takes queued jobs goes on working while its slot is sent from: its
        // jobs travel inline until the send completes (see `dispatch`).
        let keeps_working =
            worker.accepts_queue && self.services[worker.service].pool.policy().queue_depth > 1;
        let caller = &self.conns[conn];
        if caller.send.in_flight || caller.send.queued_bytes() != 0 {
            return false;
        }
        let Ok(len) = worker.slot.peek_reply(sequence) else {
            return false;
        };
        if len < SLOT_SEND_BYTES_MIN {
            return false;
        }
        reply.payload_len = len;
        let fd = target(&caller.fd, caller.file);
        let generation = caller.generation;
        let payload = worker.slot.data_address(0);
        let worker_generation = worker.generation;
        let caller = &mut self.conns[conn];
        let header = caller.send.set_front(&reply.encode());
        caller.send.in_flight = true;
        caller.slot_send = Some(SlotSend {
            worker: index,
            worker_generation,
            len,
            header_result: None,
            payload_result: None,
        });
        // Neither op may wait for the caller to read: the worker is lent until both complete.
        // DONTWAIT/NOWAIT make them return what fitted (or EAGAIN) at once, and the rest is
        // spilled into the queue. WAITALL makes a short header a failure, which breaks the
        // link, so the payload never follows a partial header.
        let header_entry = on_target!(fd, |fd| opcode::Send::new(fd, header, HEADER_BYTES as u32)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL | libc::MSG_DONTWAIT)
            .build())
        .flags(squeue::Flags::IO_LINK)
        .user_data(Token::new(OpKind::ConnSendHeader, conn, generation).encode());
        let payload_entry = on_target!(fd, |fd| opcode::WriteFixed::new(
            fd,
            payload,
            len,
            buffer_index
        )
        .offset(u64::MAX)
        .rw_flags(libc::RWF_NOWAIT)
        .build())
        .user_data(Token::new(OpKind::ConnSendFixed, conn, generation).encode());
        let worker = &mut self.workers[index];
        if !keeps_working {
            worker.state = WorkerState::Lending;
        }
        worker.lent = true;
        self.push_linked_pair(header_entry, payload_entry);
        self.counters.replies_sent_from_slot += 1;
        let service = self.workers[index].service;
        self.services[service].counters.bytes_out += len as u64;
        if let Some(Dest::Conn(conn)) = self.finish_request(request, None) {
            self.close_conn_if_finished(conn);
        }
        if keeps_working {
            self.advance(index);
            self.job_done(index);
        }
        true
    }

    /// Queue two linked SQEs in one submission (a link must not straddle two submits).
    fn push_linked_pair(&mut self, first: squeue::Entry, second: squeue::Entry) {
        let room = {
            let submission = self.ring.submission();
            submission.capacity() - submission.len()
        };
        if room < 2 {
            if let Err(error) = self.ring.submit() {
                tracing::error!(%error, "io_uring submit failed while making room for a link");
            }
        }
        self.push(first);
        self.push(second);
    }

    /// One of the two ops of a send from a slot completed. When both have, spill whatever did
    /// not go out into the connection's queue and give the worker back to its pool.
    fn on_slot_send(&mut self, index: usize, is_header: bool, result: i32) {
        let conn = &mut self.conns[index];
        let send = conn
            .slot_send
            .as_mut()
            .expect("a send from a slot is in flight");
        if is_header {
            send.header_result = Some(result);
        } else {
            send.payload_result = Some(result);
        }
        let (Some(header_result), Some(payload_result)) = (send.header_result, send.payload_result)
        else {
            return;
        };
        let send = conn.slot_send.take().expect("checked above");
        conn.send.in_flight = false;
        // Nothing sent, not an error: the link was broken, or the socket was full.
        let unsent = |result: i32| result == -libc::ECANCELED || result == -libc::EAGAIN;
        let header_sent = header_result.max(0) as usize;
        let mut failed = (header_result < 0 && !unsent(header_result))
            || (payload_result < 0 && !unsent(payload_result));
        if header_sent < HEADER_BYTES && payload_result > 0 {
            // The payload went out after a partial header: the stream is corrupt. The link
            // rules forbid this; if a kernel ever allowed it, drop the caller, never mislead it.
            tracing::error!(
                header_result,
                payload_result,
                "send from a slot broke its link"
            );
            failed = true;
        }
        let payload_sent = if header_sent == HEADER_BYTES {
            payload_result.max(0) as usize
        } else {
            0
        };
        let worker = &self.workers[send.worker];
        assert_eq!(
            worker.generation, send.worker_generation,
            "a lent worker was freed"
        );
        if conn.closing || failed {
            conn.send.clear();
        } else {
            let len = send.len as usize;
            let short = payload_sent < len;
            conn.send.settle_front(header_sent, |rest| {
                if short {
                    worker
                        .slot
                        .copy_data(payload_sent, len - payload_sent, rest);
                }
            });
            self.counters.slot_sends_spilled += u64::from(short);
        }
        self.return_lent_worker(send.worker);
        // Returning the worker runs pool actions that may have closed and freed this caller.
        let Some(conn) = self.conns.get(index) else {
            return;
        };
        if conn.closing {
            self.free_conn_if_done(index);
        } else if failed {
            tracing::debug!(header_result, payload_result, "sending to a caller failed");
            self.close_conn(index);
        } else {
            self.arm_conn_send(index);
            self.close_conn_if_finished(index);
        }
    }

    /// A connection finished sending from this worker's slot.
    fn return_lent_worker(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        assert!(worker.lent);
        worker.lent = false;
        if worker.state == WorkerState::Lending {
            worker.slot.release_reply();
            worker.state = WorkerState::Idle;
            self.job_done(index);
        } else if worker.state != WorkerState::Dead {
            // A worker that kept working (queued jobs): only its slot comes back.
            worker.slot.release_reply();
        }
        self.free_worker_if_done(index);
    }

    /// Register a new worker's slot in the ring's buffer table, when there is room and the
    /// memory-lock limit allows; without it, replies are copied instead of sent from the slot.
    fn register_slot(&mut self, slot: &Slot) -> Option<u16> {
        let index = self.fixed_buffers_free.pop()?;
        // SAFETY: the slot's mapping outlives the registration: the worker entry that owns the
        // slot clears this table entry (unregister_slot) before it is dropped.
        let registered = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(index as u32, &[slot.as_iovec()], None)
        };
        match registered {
            Ok(()) => Some(index),
            Err(error) => {
                self.fixed_buffers_free.push(index);
                if !self.fixed_buffer_warning_logged {
                    self.fixed_buffer_warning_logged = true;
                    tracing::warn!(
                        %error,
                        memlock_limit_bytes = memlock_limit(),
                        "cannot register a slot as an io_uring fixed buffer; its replies are copied \
                         instead (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK)"
                    );
                }
                None
            }
        }
    }

    /// Put a connection's (`conn`) or worker's control socket in the ring's file table, if
    /// there is room; ops then name it by index.
    fn register_file(&mut self, index: usize, conn: bool) -> Option<u32> {
        let slot = self.files_free.pop()?;
        let fd = if conn {
            self.conns[index].fd.as_raw_fd()
        } else {
            self.workers[index].control.as_raw_fd()
        };
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => Some(slot),
            Err(error) => {
                tracing::debug!(%error, "cannot register a descriptor with the ring");
                self.files_free.push(slot);
                None
            }
        }
    }

    /// Take a descriptor out of the file table (its ops have all completed).
    fn unregister_file(&mut self, slot: u32) {
        match self.ring.submitter().register_files_update(slot, &[-1]) {
            Ok(_) => self.files_free.push(slot),
            Err(error) => tracing::error!(%error, "cannot unregister a descriptor"),
        }
    }

    fn unregister_slot(&mut self, index: u16) {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: an empty entry refers to no memory.
        let cleared = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(index as u32, &[empty], None)
        };
        match cleared {
            Ok(()) => self.fixed_buffers_free.push(index),
            Err(error) => tracing::error!(%error, index, "cannot clear a fixed-buffer entry"),
        }
    }

    /// A worker broke the protocol: kill it, take it out of the pool, and answer the request
    /// it held with `worker failed`.
    fn fail_worker(&mut self, index: usize, reason: &str) {
        self.retire_worker(index, reason, Gone::Violation);
    }

    /// The worker closed its control socket (or it broke): it is dying or hostile. Kill it to
    /// be sure and let the reap (which then comes at once) retire it with its exit status.
    fn lose_worker(&mut self, index: usize, reason: &str) {
        let worker = &mut self.workers[index];
        if matches!(worker.state, WorkerState::Dead | WorkerState::Stopping) {
            return;
        }
        worker.fate.get_or_insert_with(|| reason.to_string());
        kill(worker, libc::SIGKILL);
    }

    /// Take a worker out of service for good and tell the pool (once). The request it held, if
    /// any and not yet answered, gets `worker failed`.
    fn retire_worker(&mut self, index: usize, reason: &str, how: Gone) {
        let worker = &mut self.workers[index];
        let previous = worker.state;
        if worker.gone_reported {
            return;
        }
        worker.gone_reported = true;
        worker.state = WorkerState::Dead;
        worker.fate.get_or_insert_with(|| reason.to_string());
        let service = worker.service;
        let id = handle(index, worker.generation);
        let pid = worker.pid;
        if !worker.reaped {
            kill(worker, libc::SIGKILL);
        }
        worker.slot.reset();
        let name = &self.services[service].name;
        match previous {
            WorkerState::Starting => {
                tracing::warn!(service = %name, pid, "worker failed to start: {reason}")
            }
            WorkerState::Idle | WorkerState::Busy { .. } | WorkerState::Lending => {
                tracing::warn!(service = %name, pid, "worker failed: {reason}")
            }
            WorkerState::Stopping | WorkerState::Dead => {}
        }
        let now = self.now;
        let held = self.services[service].pool.on_worker_gone(now, id, how);
        self.workers[index].queued.clear();
        for request in held {
            // (A Lending worker's request is already answered: its reply is being sent.)
            if self.request_is_live(request) {
                let message = format!("the worker (pid {pid}) failed: {reason}");
                self.fail_request(request, ErrorCode::WorkerFailed, &message);
            }
        }
        self.run_pool_actions(service);
    }

    /// The policy stopped a worker: close its control socket (the SDK exits on EOF) and send
    /// SIGTERM; the policy sends `Kill` after the grace period if it is still there.
    fn stop_worker(&mut self, index: usize, reason: StopReason) {
        let worker = &mut self.workers[index];
        if matches!(worker.state, WorkerState::Dead | WorkerState::Stopping) {
            return;
        }
        worker.state = WorkerState::Stopping;
        // Jobs queued behind its running one are answered by the pool's rejections.
        worker.queued.clear();
        worker.fate = Some(
            match reason {
                StopReason::Idle => "stopped: idle",
                StopReason::Recycled => "recycled",
                StopReason::TimedOut => "stopped: request timed out",
                StopReason::StartupTimeout => "stopped: no handshake in time",
                StopReason::Shutdown => "stopped: shutdown",
            }
            .to_string(),
        );
        let _ = rustix::net::shutdown(&worker.control, rustix::net::Shutdown::Write);
        kill(worker, libc::SIGTERM);
    }

    fn on_worker_reaped(&mut self, index: usize, result: i32) {
        let worker = &mut self.workers[index];
        worker.wait_in_flight = false;
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            tracing::error!(pid = worker.pid, %error, "waitid failed; retrying");
            self.arm_worker_wait(index);
            return;
        }
        worker.reaped = true;
        let status = describe_exit(&worker.siginfo);
        let reason = match &worker.fate {
            Some(fate) => format!("{fate} ({status})"),
            None => status.clone(),
        };
        self.retire_worker(index, &reason, Gone::Exited);
        let worker = &mut self.workers[index];
        let service = &self.services[worker.service].name;
        let fate = worker.fate.as_deref().unwrap_or("exited");
        tracing::info!(service = %service, pid = worker.pid, reason = fate, "worker exited: {status}");
        // The process is gone: nothing more will come on its descriptors except EOF; cancel
        // reads that a surviving grandchild could keep open.
        let generation = worker.generation;
        let (recv, out, err) = (
            worker.recv_in_flight,
            worker.stdout.in_flight,
            worker.stderr.in_flight,
        );
        if recv {
            self.cancel(Token::new(OpKind::WorkerRecv, index, generation));
        }
        if out {
            self.cancel(Token::new(OpKind::WorkerStdout, index, generation));
        }
        if err {
            self.cancel(Token::new(OpKind::WorkerStderr, index, generation));
        }
    }

    fn free_worker_if_done(&mut self, index: usize) {
        let Some(worker) = self.workers.get(index) else {
            return;
        };
        if worker.reaped && !worker.ops_in_flight() {
            debug_assert_eq!(worker.state, WorkerState::Dead);
            let worker = self.workers.remove(index);
            if let Some(buffer_index) = worker.buffer_index {
                self.unregister_slot(buffer_index);
            }
            if let Some(file) = worker.file {
                self.unregister_file(file);
            }
        }
    }

    // ----- shutdown ----------------------------------------------------------------------------

    fn begin_shutdown(&mut self) {
        let timeout = Duration::from_millis(self.config.shutdown_timeout_ms);
        self.shutdown_deadline = Some(self.now + timeout);
        for index in 0..self.listeners.len() {
            self.listeners[index].rearm_at = None;
            if self.listeners[index].accept_in_flight {
                self.cancel(Token::new(OpKind::Accept, index, 0));
            }
        }
        if self.index == 0 {
            if let Some(path) = &self.config.listen.unix {
                let _ = std::fs::remove_file(path);
            }
            let _ = std::fs::remove_file(self.config.admin_socket_path());
        }
        for service in 0..self.services.len() {
            let now = self.now;
            self.services[service].pool.begin_stop(now);
            self.run_pool_actions(service);
        }
        let conns: Vec<usize> = self.conns.iter().map(|(index, _)| index).collect();
        for index in conns {
            self.close_conn_if_finished(index);
        }
    }

    /// The shutdown timeout passed: fail what is still queued or running and kill every worker.
    /// The shutdown timeout passed: answer every request still running or queued with
    /// `shutting down`, kill every worker, and give the answers a moment to go out.
    fn force_shutdown(&mut self) {
        tracing::warn!("shutdown timeout passed: failing requests still in flight");
        let mut held = Vec::new();
        for (_, worker) in self.workers.iter_mut() {
            worker
                .fate
                .get_or_insert_with(|| "killed: the bridge's shutdown timeout passed".into());
            if let WorkerState::Busy { request, .. } = worker.state {
                held.push(request);
            }
            held.extend(worker.queued.iter().map(|(request, _)| *request));
        }
        for request in held {
            if self.request_is_live(request) {
                let message = "the bridge's shutdown timeout passed while it ran";
                self.fail_request(request, ErrorCode::ShuttingDown, message);
            }
        }
        for service in 0..self.services.len() {
            self.services[service].pool.abort(ErrorCode::ShuttingDown);
            self.run_pool_actions(service);
        }
    }

    /// Whether the loop may end: this core's work is done and so is every other core's (a
    /// core that is done keeps answering report requests until all are).
    fn finished(&mut self) -> bool {
        if self.done {
            return self.all_cores_done();
        }
        if self.shutdown_deadline.is_none() || !self.pools_stopped() || !self.workers.is_empty() {
            return false;
        }
        let conns: Vec<usize> = self.conns.iter().map(|(index, _)| index).collect();
        for index in conns {
            self.close_conn_if_finished(index);
        }
        let mine_done = self.conns.is_empty()
            && self.listeners.iter().all(|l| !l.accept_in_flight)
            && self.shared.forwards_in_flight.load(Ordering::SeqCst) == 0
            && self.shared.inbox_empty(self.index);
        if !mine_done {
            return false;
        }
        self.done = true;
        let finished = self.shared.cores_finished.fetch_add(1, Ordering::SeqCst) + 1;
        if finished == self.shared.cores.len() {
            self.wake_all();
        }
        self.all_cores_done()
    }

    fn all_cores_done(&self) -> bool {
        self.shared.cores_finished.load(Ordering::SeqCst) == self.shared.cores.len()
    }
}

fn latency_summary(histograms: &LatencyHistograms) -> crate::status::Latency {
    crate::status::Latency {
        total: metrics::percentiles(&histograms.total),
        queue_wait: metrics::percentiles(&histograms.queue_wait),
        service: metrics::percentiles(&histograms.service),
    }
}

/// Reserve the ring's registered-buffer table: one entry per worker the config allows.
fn register_buffer_table(ring: &IoUring, workers: u32) -> Vec<u16> {
    // Twice the workers this core's shards allow: a worker killed for a protocol violation
    // leaves the pool at once (so its replacement starts) but keeps its entry until reaped.
    let wanted = (workers * 2 + 8).min(FIXED_BUFFERS_MAX);
    match ring.submitter().register_buffers_sparse(wanted) {
        Ok(()) => (0..wanted as u16).rev().collect(),
        Err(error) => {
            tracing::warn!(%error, "no io_uring fixed-buffer table; replies will be copied");
            Vec::new()
        }
    }
}

/// Reserve the ring's registered-file table: every caller connection and worker this core may
/// hold.
fn register_file_table(ring: &IoUring, entries: u32) -> Vec<u32> {
    // The kernel refuses a table larger than RLIMIT_NOFILE; descriptors past it go unregistered.
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let entries = (entries.saturating_add(64) as u64).min(nofile).min(1 << 20) as u32;
    match ring.submitter().register_files_sparse(entries) {
        Ok(()) => (0..entries).rev().collect(),
        Err(error) => {
            tracing::warn!(%error, "no io_uring file table; descriptors are looked up per op");
            Vec::new()
        }
    }
}

/// Registered buffers are charged to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. Say
/// at startup, with the numbers and the fix, when the configured pools cannot all be registered.
fn check_memlock(config: &Config, cores: usize) {
    let page = rustix::param::page_size() as u64;
    let needed: u64 = config
        .services
        .iter()
        .map(|s| {
            let slot = crate::shm::SLOT_HEADER_BYTES as u64 + s.slot_size_bytes as u64;
            s.max_workers as u64 * slot.div_ceil(page) * page
        })
        .sum::<u64>()
        + RING_BYTES * cores as u64;
    let limit = memlock_limit();
    if has_cap_ipc_lock() || needed <= limit {
        tracing::debug!(
            needed,
            limit,
            "every worker slot can be registered as a fixed buffer"
        );
        return;
    }
    tracing::warn!(
        needed_bytes = needed,
        memlock_limit_bytes = limit,
        "registering every worker slot as an io_uring fixed buffer needs {} KiB of locked memory \
         but RLIMIT_MEMLOCK is {} KiB (per user, shared with other processes) and the bridge \
         lacks CAP_IPC_LOCK: slots that do not fit are used unregistered and their replies are \
         copied. To fix: raise the limit (ulimit -l, systemd LimitMEMLOCK=), grant \
         CAP_IPC_LOCK, or lower max_workers or slot_size_bytes",
        needed / 1024,
        limit / 1024
    );
}

/// Whether this process has CAP_IPC_LOCK in its effective set (from /proc/self/status).
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// RLIMIT_MEMLOCK's soft limit in bytes (for messages).
fn memlock_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX)
}

/// The send op for the next chunk of `queue`, if one is due; marks the queue in flight.
fn send_entry(queue: &mut SendQueue, fd: Target, token: Token) -> Option<squeue::Entry> {
    let chunk = queue.next_chunk()?;
    let (at, len) = (chunk.as_ptr(), chunk.len().min(u32::MAX as usize) as u32);
    let entry = on_target!(fd, |fd| opcode::Send::new(fd, at, len)
        .flags(libc::MSG_NOSIGNAL)
        .build())
    .user_data(token.encode());
    queue.in_flight = true;
    Some(entry)
}

/// A per-service seed for the pool's recycling jitter (any value will do).
fn seed_from(service: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (service as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Resident memory of a process, from /proc/PID/statm (pages × page size).
fn rss_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

fn kill(worker: &Worker, signal: i32) {
    // Never signal a reaped pid: it may belong to another process by now.
    if !worker.reaped {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe { libc::kill(worker.pid, signal) };
    }
}

fn describe_exit(info: &libc::siginfo_t) -> String {
    // SAFETY: waitid filled `info` for a CLD_* event; si_status is valid for those.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => format!("exit status {status}"),
        libc::CLD_KILLED => format!("killed by signal {status}"),
        libc::CLD_DUMPED => format!("killed by signal {status} (core dumped)"),
        code => format!("ended (si_code {code}, status {status})"),
    }
}

fn log_worker_line(service: &str, pid: i32, stream: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    tracing::info!(target: "acgi_bridge::worker_output", service, pid, stream, "{}", text.trim_end());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_unknown_kinds() {
        // Proves user_data carries kind, index and generation without loss.
        let token = Token::new(OpKind::WorkerWait, 123_456, 0xABCDEF);
        assert_eq!(Token::decode(token.encode()), Some(token));
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::new(OpKind::Accept, 1, 0x1_000_001).generation, 1);
    }
}
