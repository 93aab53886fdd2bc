//! The worker SDK: turn a plain synchronous function into an acgi-bridge worker.
//!
//! ```no_run
//! // The whole of a worker's `main`:
//! acgi_worker::serve(|request: &[u8]| request.to_vec()).unwrap();
//! ```
//!
//! A handler returns anything [`IntoReply`]: bytes or a string for a reply, or a `Result`
//! whose error reaches the caller as a service error (code 8) with its message:
//!
//! ```no_run
//! fn main() -> Result<(), acgi_worker::WorkerError> {
//!     acgi_worker::serve(|request: &[u8]| -> Result<String, std::str::Utf8Error> {
//!         Ok(std::str::from_utf8(request)?.to_uppercase())
//!     })
//! }
//! ```
//!
//! Outside a bridge (no `ACGI_CONTROL_FD`), `serve` returns at once and says so:
//!
//! ```
//! let error = acgi_worker::serve(|request: &[u8]| request.to_vec()).unwrap_err();
//! assert!(matches!(error, acgi_worker::WorkerError::NotUnderBridge(_)));
//! assert!(error.to_string().starts_with("not started by acgi-bridge"));
//! ```
//!
//! The bridge starts the worker with two inherited descriptors: the control socket (a Unix
//! stream, fd named by `ACGI_CONTROL_FD`) and the worker's slot (a memfd, `ACGI_SLOT_FD`). The SDK
//! hides both: it says `Hello`, then for each `Job` takes the request from the slot (or, when it
//! was too big for the slot, from the socket), runs the handler, and puts the reply back in the
//! slot (or, when too big, on the socket). No async runtime, no threads. `docs/protocol.md`
//! ("Worker protocol") is the normative description.
//!
//! The handler owns nothing of the SDK's state, and the SDK never panics on the bridge's bytes:
//! a protocol error ends `serve` with [`WorkerError`] and the process should exit.
//!
//! This crate is the SDK and nothing of the daemon: it depends on `acgi-proto` (the frames, the
//! slot ABI, the frame reader), `rustix` for the syscalls (mapping the slot, `recv`, `poll`) and
//! `libc` for one call rustix does not offer, `sigaction` (see `install_sigterm_handler`).
//! Workers that speak the protocol by hand can use [`WorkerSlot`] and [`proto`] directly.

#![warn(missing_docs)]

use std::cell::Cell;
use std::fmt::{self, Display};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

pub use acgi_proto as proto;

use proto::slot::{SlotError, SLOT_ABI_VERSION};
use proto::{Header, Hello, Kind, Parsed, ReadBuffer, FLAG_IN_SLOT, HEADER_BYTES};

mod slot;
pub use slot::WorkerSlot;

/// Environment variable naming the control socket's descriptor number.
pub const ENV_CONTROL_FD: &str = "ACGI_CONTROL_FD";
/// Environment variable naming the slot memfd's descriptor number.
pub const ENV_SLOT_FD: &str = "ACGI_SLOT_FD";
/// Environment variable with the bridge's payload bound in bytes.
pub const ENV_MAX_PAYLOAD: &str = "ACGI_MAX_PAYLOAD_BYTES";
/// Environment variable with the service's name.
pub const ENV_SERVICE: &str = "ACGI_SERVICE";
/// Environment variable with the bridge's `state_dir`.
pub const ENV_STATE_DIR: &str = "ACGI_STATE_DIR";
/// Environment variable saying whether the worker stays dumpable (`1`) or not (`0`, and when
/// absent): exec resets dumpability, so the worker applies it itself (protocol §6.1).
pub const ENV_DUMPABLE: &str = "ACGI_DUMPABLE";

/// Apply `ACGI_DUMPABLE`: unless it is `1`, make this process non-dumpable (no core file; its
/// memory and /proc files out of reach of other processes of its user). `serve` calls it first;
/// a worker that speaks the protocol itself should too.
pub fn apply_dumpable() -> io::Result<()> {
    let dumpable = std::env::var(ENV_DUMPABLE).is_ok_and(|value| value == "1");
    // SAFETY: prctl with integer arguments, on this process only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set by SIGTERM: finish the job in hand, then return from `serve`.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static DEADLINE: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
}

/// Time left before the current request's caller deadline, when the caller set one
/// (`Client::call_with_timeout`). Call it from inside the handler; `None` means no deadline.
///
/// ```no_run
/// use std::time::Duration;
/// acgi_worker::serve(|request: &[u8]| -> Result<Vec<u8>, String> {
///     // Not worth starting work that cannot finish before the caller gives up.
///     if acgi_worker::remaining().is_some_and(|left| left < Duration::from_millis(10)) {
///         return Err("too little time left".into());
///     }
///     Ok(request.to_vec())
/// })
/// .unwrap();
/// ```
pub fn remaining() -> Option<std::time::Duration> {
    DEADLINE
        .with(|cell| cell.get())
        .map(|d| d.saturating_duration_since(std::time::Instant::now()))
}

/// Whether the bridge asked this worker to stop (SIGTERM). A long handler may check it.
///
/// ```no_run
/// acgi_worker::serve(|request: &[u8]| -> Result<Vec<u8>, &'static str> {
///     let mut sum = 0u64;
///     for chunk in request.chunks(4096) {
///         if acgi_worker::stop_requested() {
///             return Err("stopping: the bridge asked this worker to exit");
///         }
///         sum += chunk.iter().map(|&b| u64::from(b)).sum::<u64>();
///     }
///     Ok(sum.to_le_bytes().to_vec())
/// })
/// .unwrap();
/// ```
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Relaxed)
}

extern "C" fn on_sigterm(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::Relaxed);
}

/// SIGTERM sets a flag instead of killing the process, without SA_RESTART, so that a worker
/// blocked waiting for its next job wakes (EINTR) and exits cleanly, and one in a job finishes
/// and answers it first. The bridge sends SIGKILL after its grace period if that takes too long.
///
/// This is the crate's one use of `libc`: rustix has no portable `sigaction` (only a raw kernel
/// one for libc implementations, which would need our own signal-return trampoline), and std
/// has none at all.
fn install_sigterm_handler() {
    // SAFETY: installing an async-signal-safe handler (one atomic store) for SIGTERM.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigterm as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut());
    }
}

/// A handler's error message, cut to 64 KiB on a character boundary.
fn truncate_message(message: &str) -> &[u8] {
    let mut end = message.len().min(64 * 1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message.as_bytes()[..end]
}

/// Why a worker loop ended other than by the bridge closing the control socket.
#[derive(Debug)]
pub enum WorkerError {
    /// The named environment variable is missing or not a descriptor number: this process was
    /// not started by a bridge.
    NotUnderBridge(&'static str),
    /// Reading or writing the control socket failed.
    Io(io::Error),
    /// The slot could not be attached, or the bridge broke the slot protocol.
    Slot(SlotError),
    /// The bridge sent a frame header that does not decode.
    Frame(proto::FrameError),
    /// The bridge sent a frame other than a `Job`.
    UnexpectedKind(Kind),
}

impl Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerError::NotUnderBridge(name) => write!(
                f,
                "not started by acgi-bridge: {name} is not set or not a descriptor number"
            ),
            WorkerError::Io(error) => write!(f, "control socket: {error}"),
            WorkerError::Slot(error) => write!(f, "slot: {error}"),
            WorkerError::Frame(error) => write!(f, "bridge sent a malformed frame: {error}"),
            WorkerError::UnexpectedKind(kind) => {
                write!(f, "bridge sent an unexpected {kind:?} frame")
            }
        }
    }
}

impl std::error::Error for WorkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WorkerError::Io(error) => Some(error),
            WorkerError::Slot(error) => Some(error),
            WorkerError::Frame(error) => Some(error),
            WorkerError::NotUnderBridge(_) | WorkerError::UnexpectedKind(_) => None,
        }
    }
}

impl From<io::Error> for WorkerError {
    fn from(error: io::Error) -> Self {
        WorkerError::Io(error)
    }
}

impl From<SlotError> for WorkerError {
    fn from(error: SlotError) -> Self {
        WorkerError::Slot(error)
    }
}

impl From<proto::FrameError> for WorkerError {
    fn from(error: proto::FrameError) -> Self {
        WorkerError::Frame(error)
    }
}

/// What a handler may return: bytes for a reply, or an error message for the caller.
///
/// ```
/// use acgi_worker::IntoReply;
/// assert_eq!("hi".into_reply(), Ok(b"hi".to_vec()));
/// assert_eq!(Err::<Vec<u8>, _>("no such key").into_reply(), Err("no such key".to_string()));
/// ```
pub trait IntoReply {
    /// The reply's bytes, or the message of a handler error.
    fn into_reply(self) -> Result<Vec<u8>, String>;
}

impl IntoReply for Vec<u8> {
    fn into_reply(self) -> Result<Vec<u8>, String> {
        Ok(self)
    }
}

impl IntoReply for String {
    fn into_reply(self) -> Result<Vec<u8>, String> {
        Ok(self.into_bytes())
    }
}

impl IntoReply for &'static str {
    fn into_reply(self) -> Result<Vec<u8>, String> {
        Ok(self.as_bytes().to_vec())
    }
}

impl<T: IntoReply, E: Display> IntoReply for Result<T, E> {
    fn into_reply(self) -> Result<Vec<u8>, String> {
        match self {
            Ok(value) => value.into_reply(),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// Run the worker loop with `handler` until the bridge closes the control socket.
///
/// Returns `Ok(())` when the bridge hangs up (it is stopping this worker), an error when the
/// worker was not started by a bridge or the bridge broke the protocol.
pub fn serve<F, R>(mut handler: F) -> Result<(), WorkerError>
where
    F: FnMut(&[u8]) -> R,
    R: IntoReply,
{
    let mut session = Session::from_env()?;
    apply_dumpable().map_err(WorkerError::Io)?;
    install_sigterm_handler();
    session.hello()?;
    let served = serve_jobs(&mut session, &mut handler);
    // Replies still buffered go out whatever ended the loop.
    let flushed = session.flush();
    served?;
    Ok(flushed?)
}

fn serve_jobs<F, R>(session: &mut Session, handler: &mut F) -> Result<(), WorkerError>
where
    F: FnMut(&[u8]) -> R,
    R: IntoReply,
{
    loop {
        // SIGTERM between jobs: stop now. (During a job it only sets the flag: the job is
        // finished and answered first.)
        if STOP_REQUESTED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(job) = session.next_job()? else {
            return Ok(());
        };
        let remaining_ms = match job {
            JobPayload::Queued(_) => 0,
            _ => session
                .slot
                .header()
                .deadline_remaining_ms
                .load(Ordering::Relaxed),
        };
        let deadline = (remaining_ms > 0)
            .then(|| std::time::Instant::now() + std::time::Duration::from_millis(remaining_ms));
        DEADLINE.with(|cell| cell.set(deadline));
        let reply = match job {
            JobPayload::InSlot(len) => {
                // SAFETY: next_job took the slot (state Taken) and returned this length.
                let request = unsafe { session.slot.request_bytes(len) };
                handler(request).into_reply()
            }
            JobPayload::Inline(header) | JobPayload::Queued(header) => {
                // The handler reads the payload where it was received; the frame is consumed
                // once it is done with.
                let reply = handler(session.input.payload(&header)).into_reply();
                session
                    .input
                    .consume(HEADER_BYTES + header.payload_len as usize);
                reply
            }
        };
        session.finish(reply)?;
        // Replies wait in `out` only while more jobs are already buffered, and not long.
        if session
            .out_since
            .is_some_and(|t| t.elapsed() >= REPLY_HOLD_MAX)
            || session.out.len() >= OUT_BYTES_FLUSH
        {
            session.flush()?;
        }
    }
}

/// Longest a finished reply waits in the SDK's buffer for the next ones (jobs already read
/// and waiting are run first, so one write carries several replies).
const REPLY_HOLD_MAX: std::time::Duration = std::time::Duration::from_micros(50);
/// Buffered replies past this size are written at once.
const OUT_BYTES_FLUSH: usize = 64 * 1024;
/// Initial read buffer of the control socket (it grows for larger inline payloads).
const IN_BYTES: usize = 64 * 1024;

enum JobPayload {
    /// The request is in the slot, this long.
    InSlot(usize),
    /// The request followed this `Job` header on the socket; the whole frame is at the front
    /// of the read buffer until the handler is done with it.
    Inline(Header),
    /// A queued job: inline (at the front of the read buffer, like `Inline`), answered inline,
    /// the slot untouched.
    Queued(Header),
}

/// The worker side of one control connection.
struct Session {
    control: UnixStream,
    slot: WorkerSlot,
    sequence: u64,
    payload_bytes_max: u32,
    /// The job in hand was sent queued.
    queued: bool,
    /// Bytes read from the control socket and not yet consumed. One read takes every job the
    /// bridge has queued, so a busy worker reads once per batch.
    input: ReadBuffer,
    /// Answer frames not yet written, and since when the oldest has waited.
    out: Vec<u8>,
    out_since: Option<std::time::Instant>,
}

fn env_fd(name: &'static str) -> Result<RawFd, WorkerError> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse::<RawFd>().ok())
        .filter(|fd| *fd >= 0)
        .ok_or(WorkerError::NotUnderBridge(name))
}

impl Session {
    fn from_env() -> Result<Session, WorkerError> {
        let control_fd = env_fd(ENV_CONTROL_FD)?;
        let slot_fd = env_fd(ENV_SLOT_FD)?;
        if rustix::io::fcntl_getfd(
            // SAFETY: only used to probe that the descriptor exists, not retained.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(control_fd) },
        )
        .is_err()
        {
            return Err(WorkerError::NotUnderBridge(ENV_CONTROL_FD));
        }
        // SAFETY: the bridge passes these two descriptors to this process alone, for the SDK to
        // own; they are taken once, here.
        let (control, slot_fd) = unsafe {
            (
                UnixStream::from_raw_fd(control_fd),
                OwnedFd::from_raw_fd(slot_fd),
            )
        };
        let slot = WorkerSlot::attach(slot_fd)?;
        let payload_bytes_max = std::env::var(ENV_MAX_PAYLOAD)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(proto::PAYLOAD_BYTES_MAX_DEFAULT);
        Ok(Session {
            control,
            slot,
            sequence: 0,
            payload_bytes_max,
            queued: false,
            input: ReadBuffer::new(IN_BYTES),
            out: Vec::new(),
            out_since: None,
        })
    }

    /// Write the buffered answers.
    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.control.write_all(&self.out)?;
            self.out.clear();
        }
        self.out_since = None;
        Ok(())
    }

    /// Make sure `need` unconsumed bytes are buffered, reading (and waiting) as needed.
    /// Returns false on EOF before any byte of a frame, or when SIGTERM interrupted the wait
    /// then.
    fn fill(&mut self, need: usize) -> io::Result<bool> {
        while self.input.len() < need {
            let at_frame_start = self.input.is_empty();
            self.input.prepare_read(need);
            // Take what has arrived without waiting; only when nothing has, flush the answers
            // and wait in poll(POLLIN), not in read: the bridge consuming our last reply wakes
            // the socket's wait queue with EPOLLOUT, which would wake a task blocked in read
            // for nothing (a context switch per request); poll's wait filters by event.
            let spare = self.input.spare();
            match rustix::net::recv(&self.control, spare, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) if at_frame_start => return Ok(false),
                Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok((n, _)) => {
                    self.input.commit(n);
                    continue;
                }
                Err(rustix::io::Errno::AGAIN) => {}
                Err(rustix::io::Errno::INTR) => {
                    if at_frame_start && STOP_REQUESTED.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    continue;
                }
                Err(error) => return Err(error.into()),
            }
            self.flush()?;
            let mut fds = [rustix::event::PollFd::new(
                &self.control,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {
                    if at_frame_start && STOP_REQUESTED.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(true)
    }

    fn hello(&mut self) -> Result<(), WorkerError> {
        let hello = Hello {
            slot_abi_version: SLOT_ABI_VERSION,
            pid: std::process::id(),
        };
        let mut header = Header::new(Kind::Hello, 0, 0, Hello::BYTES as u32);
        // We take queued jobs: a busy worker finds its next job waiting instead of sleeping.
        header.flags = proto::FLAG_QUEUED;
        let mut frame = Vec::with_capacity(HEADER_BYTES + Hello::BYTES);
        proto::encode_frame(&mut frame, &header, &hello.encode());
        self.control.write_all(&frame)?;
        Ok(())
    }

    /// Wait for the next job, its whole frame; `None` when the bridge closed the socket.
    fn next_job(&mut self) -> Result<Option<JobPayload>, WorkerError> {
        let header = loop {
            match self.input.parse(self.payload_bytes_max) {
                Parsed::Frame(header) => break header,
                Parsed::Bad(error) => return Err(error.into()),
                Parsed::NeedMore => {
                    let need = self.input.frame_bytes_needed(self.payload_bytes_max);
                    if !self.fill(need)? {
                        return Ok(None);
                    }
                }
            }
        };
        if header.kind != Kind::Job {
            return Err(WorkerError::UnexpectedKind(header.kind));
        }
        self.sequence = header.request_id;
        if header.flags & proto::FLAG_QUEUED != 0 {
            if header.in_slot() {
                return Err(SlotError::BadHeader("queued job marked in-slot").into());
            }
            self.queued = true;
            return Ok(Some(JobPayload::Queued(header)));
        }
        self.queued = false;
        let in_slot = self.slot.take_job(self.sequence)?;
        if header.in_slot() {
            let len = in_slot.ok_or(SlotError::BadHeader("in-slot job with inline length"))?;
            if header.payload_len != 0 {
                return Err(SlotError::BadHeader("in-slot job with a socket payload").into());
            }
            self.input.consume(HEADER_BYTES);
            Ok(Some(JobPayload::InSlot(len)))
        } else {
            if in_slot.is_some() {
                return Err(SlotError::BadHeader("socket job with an in-slot length").into());
            }
            Ok(Some(JobPayload::Inline(header)))
        }
    }

    fn finish(&mut self, reply: Result<Vec<u8>, String>) -> Result<(), WorkerError> {
        if self.out.is_empty() {
            self.out_since = Some(std::time::Instant::now());
        }
        let frame = &mut self.out;
        if self.queued {
            // The slot belongs to no one here: answer on the socket.
            let (kind, payload) = match reply {
                Ok(bytes) if bytes.len() <= self.payload_bytes_max as usize => (Kind::Done, bytes),
                Ok(bytes) => (
                    Kind::Fail,
                    format!(
                        "reply of {} bytes is over the bridge's maximum of {} bytes",
                        bytes.len(),
                        self.payload_bytes_max
                    )
                    .into_bytes(),
                ),
                Err(message) => (Kind::Fail, truncate_message(&message).to_vec()),
            };
            let header = Header::new(kind, 0, self.sequence, payload.len() as u32);
            proto::encode_frame(frame, &header, &payload);
            return Ok(());
        }
        match reply {
            Ok(bytes) if bytes.len() > self.payload_bytes_max as usize => {
                self.slot.publish_reply(None)?;
                let message = format!(
                    "reply of {} bytes is over the bridge's maximum of {} bytes",
                    bytes.len(),
                    self.payload_bytes_max
                );
                let header = Header::new(Kind::Fail, 0, self.sequence, message.len() as u32);
                proto::encode_frame(frame, &header, message.as_bytes());
            }
            Ok(bytes) if bytes.len() <= self.slot.capacity() as usize => {
                self.slot.publish_reply(Some(&bytes))?;
                let mut header = Header::new(Kind::Done, 0, self.sequence, 0);
                header.flags = FLAG_IN_SLOT;
                frame.extend_from_slice(&header.encode());
            }
            Ok(bytes) => {
                self.slot.publish_reply(None)?;
                let header = Header::new(Kind::Done, 0, self.sequence, bytes.len() as u32);
                proto::encode_frame(frame, &header, &bytes);
            }
            Err(message) => {
                self.slot.publish_reply(None)?;
                let message = truncate_message(&message);
                let header = Header::new(Kind::Fail, 0, self.sequence, message.len() as u32);
                proto::encode_frame(frame, &header, message);
            }
        }
        Ok(())
    }
}
