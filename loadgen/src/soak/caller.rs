//! One soak caller: a thread that keeps `depth` byte-checked requests pipelined on a
//! connection, with a reader thread per connection that judges every answer
//! ([`super::check::Ledger`]). It speaks the wire protocol directly (not through the client
//! SDK, which would hide a duplicate or an unknown id behind its own matching).
//!
//! The chaos thread steers a caller through its [`Control`]: abort (the writer closes the
//! connection with requests in flight, or in the middle of a request's payload) or stall (the
//! reader stops reading until a given time, while the writer keeps its requests in flight). A
//! caller whose connection ends, on purpose or not, opens a new one under a new connection
//! number and carries on until the sending window ends; then it waits for its last answers at
//! most `drain` and counts what is still in flight as lost.
//!
//! ```text
//!   writer (caller thread)                 reader (per connection)
//!   wait for room in the ledger  ◀─notify── answer: ledger verdict -> tally
//!   enter request, write frame ──────────▶ (bridge) ──▶ read, parse frames
//! ```

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use acgi_proto::{self as proto, Header, Kind, Parsed, ReadBuffer, HEADER_BYTES};

use super::check::{Ledger, Pending};
use super::stamp::{body, Identity, SizeClass};
use super::tally::{add, Tally};
use crate::mix::Rng;
use crate::plain::PlainStream;

/// How often blocked reads and waits look at the clock and the controls.
const POLL: Duration = Duration::from_millis(50);
/// A write that makes no progress for this long ends the connection (counted as an I/O error).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_BUFFER_BYTES: usize = 64 * 1024;

pub const ABORT_NONE: u8 = 0;
pub const ABORT_MID_REQUEST: u8 = 1;
pub const ABORT_MID_PAYLOAD: u8 = 2;

/// How the chaos thread steers one caller.
#[derive(Default)]
pub struct Control {
    /// `ABORT_*`: taken (reset) by the writer.
    pub abort: AtomicU8,
    /// Milliseconds since the run started until which the reader does not read.
    pub stall_until_ms: AtomicU64,
}

/// What all callers and the chaos thread share.
pub struct Shared {
    pub tally: Tally,
    pub controls: Vec<Control>,
    /// Answers read by all callers (the chaos thread checks others progress during a stall).
    pub answers: Vec<AtomicU64>,
    pub next_connection: AtomicU32,
    pub started: Instant,
}

impl Shared {
    pub fn new(callers: u32) -> Shared {
        Shared {
            tally: Tally::default(),
            controls: (0..callers).map(|_| Control::default()).collect(),
            answers: (0..callers).map(|_| AtomicU64::new(0)).collect(),
            next_connection: AtomicU32::new(1),
            started: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A service a caller sends to, and the bytes its request puts before the body (`faulty`
/// needs its `echo ` command; its reply is the body alone, as echo's is).
#[derive(Clone, Debug)]
pub struct Target {
    pub service_id: u32,
    pub prefix: Vec<u8>,
}

/// One caller's part of the run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub index: u32,
    pub addr: String,
    pub depth: u32,
    pub slot_bytes: u32,
    pub targets: Vec<Target>,
    pub seed: u64,
    pub stop_sending: Instant,
    pub drain: Duration,
    /// Self-test: the reader ignores one reply, which the soak must then report lost.
    pub drop_one_reply: bool,
}

/// Run the caller until its window ends and its last connection is drained.
pub fn run(plan: Plan, shared: Arc<Shared>) {
    let mut rng = Rng::for_stream(plan.seed, 0xCA11 << 32 | u64::from(plan.index));
    let mut drop_reply = plan.drop_one_reply;
    while Instant::now() < plan.stop_sending {
        let connection = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        match session(&plan, &shared, &mut rng, connection, drop_reply) {
            Ok(()) => {}
            Err(error) => {
                add(&shared.tally.io_errors, 1);
                shared.tally.problem(format!(
                    "caller {} connection {connection}: {error}",
                    plan.index
                ));
                std::thread::sleep(POLL);
            }
        }
        drop_reply = false;
    }
}

/// The ledger of one connection, with the condition the writer waits on for room.
struct Book {
    ledger: Mutex<Ledger>,
    room: Condvar,
    writer_done: AtomicBool,
    reader_gone: AtomicBool,
}

impl Book {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How the writer left a connection.
enum WriterEnd {
    /// The sending window ended.
    Finished,
    /// The chaos thread had it closed.
    Aborted,
}

/// One connection: write until the window ends or an abort, then collect what is left.
fn session(
    plan: &Plan,
    shared: &Arc<Shared>,
    rng: &mut Rng,
    connection: u32,
    drop_reply: bool,
) -> io::Result<()> {
    let mut stream = PlainStream::connect(
        &plan.addr,
        "the soak speaks plaintext: give it a Unix path or tcp:HOST:PORT",
        POLL,
        Some(WRITE_TIMEOUT),
    )?;
    add(&shared.tally.connections, 1);
    let book = Arc::new(Book {
        ledger: Mutex::new(Ledger::new(connection)),
        room: Condvar::new(),
        writer_done: AtomicBool::new(false),
        reader_gone: AtomicBool::new(false),
    });
    let reader = {
        let (stream, book, shared, plan) = (
            stream.try_clone()?,
            Arc::clone(&book),
            Arc::clone(shared),
            plan.clone(),
        );
        std::thread::Builder::new()
            .name(format!("soak-read-{connection}"))
            .spawn(move || read_answers(stream, &book, &shared, &plan, connection, drop_reply))?
    };
    let written = write_requests(&mut stream, plan, shared, rng, &book, connection);
    book.writer_done.store(true, Ordering::Release);
    let on_purpose = matches!(written, Ok(WriterEnd::Aborted));
    if on_purpose || written.is_err() {
        stream.shutdown();
    }
    let closed_by_bridge = reader.join().unwrap_or(true);
    let left = book.lock().close();
    if closed_by_bridge && !on_purpose {
        add(&shared.tally.disconnects, 1);
        shared.tally.problem(format!(
            "the bridge closed connection {connection} (caller {}) with {} in flight",
            plan.index,
            left.len()
        ));
    }
    // Closing a connection on purpose abandons its requests, but not one already overdue:
    // that one was lost before the close.
    let (overdue, abandoned): (Vec<_>, Vec<_>) = left
        .into_iter()
        .partition(|(_, pending)| pending.sent_at.elapsed() > plan.drain);
    shared.tally.unanswered(connection, &overdue, false);
    shared.tally.unanswered(connection, &abandoned, on_purpose);
    written.map(|_| ())
}

fn write_requests(
    stream: &mut PlainStream,
    plan: &Plan,
    shared: &Shared,
    rng: &mut Rng,
    book: &Book,
    connection: u32,
) -> io::Result<WriterEnd> {
    let control = &shared.controls[plan.index as usize];
    let mut number = 0u64;
    let mut frame = Vec::new();
    loop {
        if Instant::now() >= plan.stop_sending || book.reader_gone.load(Ordering::Acquire) {
            return Ok(WriterEnd::Finished);
        }
        match control.abort.swap(ABORT_NONE, Ordering::AcqRel) {
            ABORT_MID_REQUEST => {
                if book.lock().in_flight() == 0 {
                    number += 1;
                    send(
                        stream, plan, shared, rng, book, connection, number, &mut frame,
                    )?;
                }
                add(&shared.tally.aborts_mid_request, 1);
                return Ok(WriterEnd::Aborted);
            }
            ABORT_MID_PAYLOAD => {
                number += 1;
                let (_, size) = SizeClass::draw(rng, plan.slot_bytes);
                encode(plan, rng, connection, number, size, &mut frame);
                let cut = HEADER_BYTES + (frame.len() - HEADER_BYTES) / 2;
                stream.write_all(&frame[..cut])?;
                add(&shared.tally.partial, 1);
                add(&shared.tally.aborts_mid_payload, 1);
                return Ok(WriterEnd::Aborted);
            }
            _ => {}
        }
        if !wait_for_room(book, plan) {
            continue;
        }
        number += 1;
        send(
            stream, plan, shared, rng, book, connection, number, &mut frame,
        )?;
    }
}

/// Wait (bounded by [`POLL`]) until fewer than `depth` requests are in flight.
fn wait_for_room(book: &Book, plan: &Plan) -> bool {
    let ledger = book.lock();
    let (ledger, _) = book
        .room
        .wait_timeout_while(ledger, POLL, |ledger| {
            ledger.in_flight() >= plan.depth as usize && !book.reader_gone.load(Ordering::Acquire)
        })
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    ledger.in_flight() < plan.depth as usize
}

#[allow(clippy::too_many_arguments)]
fn send(
    stream: &mut PlainStream,
    plan: &Plan,
    shared: &Shared,
    rng: &mut Rng,
    book: &Book,
    connection: u32,
    number: u64,
    frame: &mut Vec<u8>,
) -> io::Result<()> {
    let (class, size) = SizeClass::draw(rng, plan.slot_bytes);
    encode(plan, rng, connection, number, size, frame);
    // Entered before it is written: its answer may be read before this thread runs again.
    book.lock().sent(
        number,
        Pending {
            size,
            class,
            sent_at: Instant::now(),
        },
    );
    shared.tally.sent(class);
    stream.write_all(frame)
}

/// The frame of request `number`: a random target, the body of `size` bytes after its prefix.
fn encode(plan: &Plan, rng: &mut Rng, connection: u32, number: u64, size: u32, out: &mut Vec<u8>) {
    let target = &plan.targets[(rng.next_u64() % plan.targets.len() as u64) as usize];
    let mut payload = target.prefix.clone();
    payload.extend_from_slice(&body(Identity {
        connection,
        number,
        size,
    }));
    let header = Header::new(
        Kind::Request,
        target.service_id,
        number,
        payload.len() as u32,
    );
    out.clear();
    proto::encode_frame(out, &header, &payload);
}

/// The reader: judge every answer until the writer is done and nothing is in flight, the drain
/// bound passes, or the connection ends. Returns whether it ended by the bridge's doing (EOF
/// or an error while requests were expected).
fn read_answers(
    mut stream: PlainStream,
    book: &Book,
    shared: &Shared,
    plan: &Plan,
    connection: u32,
    mut drop_reply: bool,
) -> bool {
    let control = &shared.controls[plan.index as usize];
    let mut input = ReadBuffer::new(READ_BUFFER_BYTES);
    let closed_by_bridge = loop {
        let writer_done = book.writer_done.load(Ordering::Acquire);
        if writer_done && book.lock().in_flight() == 0 {
            break false;
        }
        if Instant::now() >= plan.stop_sending + plan.drain {
            break false;
        }
        let until = control.stall_until_ms.load(Ordering::Relaxed);
        let now = shared.now_ms();
        if now < until {
            std::thread::sleep(POLL.min(Duration::from_millis(until - now)));
            continue;
        }
        input.prepare_read(input.frame_bytes_needed(proto::PAYLOAD_BYTES_MAX_CEILING));
        match stream.read(input.spare()) {
            Ok(0) => break !writer_done,
            Ok(n) => input.commit(n),
            Err(error) if is_retry(&error) => continue,
            // After the writer's shutdown a reset is the abort itself, not the bridge's doing.
            Err(_) => break !writer_done,
        }
        if !judge_frames(&mut input, book, shared, plan, connection, &mut drop_reply) {
            break true;
        }
    };
    book.reader_gone.store(true, Ordering::Release);
    book.room.notify_all();
    closed_by_bridge
}

fn is_retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Judge every whole frame in `input`; false on a frame that cannot be decoded.
fn judge_frames(
    input: &mut ReadBuffer,
    book: &Book,
    shared: &Shared,
    plan: &Plan,
    connection: u32,
    drop_reply: &mut bool,
) -> bool {
    loop {
        let header = match input.parse(proto::PAYLOAD_BYTES_MAX_CEILING) {
            Parsed::Frame(header) => header,
            Parsed::NeedMore => return true,
            Parsed::Bad(error) => {
                add(&shared.tally.not_answers, 1);
                shared.tally.problem(format!(
                    "connection {connection}: undecodable frame: {error}"
                ));
                return false;
            }
        };
        let frame_bytes = HEADER_BYTES + header.payload_len as usize;
        if *drop_reply && header.kind == Kind::Reply {
            *drop_reply = false;
            // Self-test: this reply is never judged, so its request stays in flight.
            input.consume(frame_bytes);
            continue;
        }
        let (verdict, _) = book.lock().answer(&header, input.payload(&header));
        input.consume(frame_bytes);
        book.room.notify_one();
        add(&shared.answers[plan.index as usize], 1);
        shared.tally.record(&verdict);
    }
}
