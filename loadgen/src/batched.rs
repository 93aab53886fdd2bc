//! The closed loop with `--batch`: one thread per connection writes its requests in batches and
//! reads the answers in batches, as the floor's client in `limits/run.sh` does, instead of one
//! async task per request in flight. Same window, mixes, verification and recording as the
//! task-per-request loop; it costs the generator a fraction of the CPU per request, which on a
//! small machine is CPU left for the bridge and its workers.
//!
//! Each connection keeps `depth` requests in flight. A request's id names its in-flight place
//! (`id % PLACES`), so an answer finds its send time and payload without a map. All answers read
//! in one `read` share one clock reading, and the requests that replace them go out in one
//! `write`.
//!
//! A draining bridge (a binary upgrade, docs/protocol.md §2.6) is met as the client SDK meets
//! it: a request answered with error 6 did not run, so nothing more is sent on that connection;
//! once the drain notice arrives (or the bridge closes after an error 6, or a write fails and
//! the notice is found behind it), every request still unanswered did not run either, and all
//! of them are sent again on a new connection, each at most [`DRAIN_RETRIES_MAX`] times. A call
//! keeps its start time across the resend, so its latency includes it, as in the default loop.
//! Service ids are the ones resolved at the start (the config's `id`s: the new bridge runs the
//! same config).

use std::io;
use std::time::{Duration, Instant};

use acgi_client::{is_drain_notice, Answer, CallError, DRAIN_RETRIES_MAX};
use acgi_proto::{self as proto, ErrorCode, Header, Kind, Parsed, ReadBuffer, HEADER_BYTES};

use crate::mix::Rng;
use crate::payload::{first_difference, Payload};
use crate::plain::PlainStream;
use crate::stats::{CallTiming, ErrorClass, Mismatch, Recorder};
use crate::workload::{Window, Workload};

/// Most requests in flight per connection (the `--depth` bound).
const PLACES: u64 = 4096;
/// Base size of a connection's read buffer, and the room a read gets beyond the largest
/// request's frame (echo replies are as large), so that such replies pass without the buffer
/// shrinking and growing again.
const INPUT_BYTES: usize = 256 * 1024;
const INPUT_SPARE_BYTES: usize = 64 * 1024;
/// How often a blocked read wakes to look at the clock.
const READ_TIMEOUT: Duration = Duration::from_millis(100);

/// A connection of the batched mode.
fn connect(addr: &str) -> io::Result<PlainStream> {
    const WHY: &str = "the batched mode speaks plaintext only: drive tls: addresses with the \
                       closed or open loop";
    PlainStream::connect(addr, WHY, READ_TIMEOUT, None)
}

/// A request in flight at one place.
#[derive(Clone, Copy)]
struct InFlight {
    started: Instant,
    service: usize,
    payload: usize,
    sequence: u64,
    /// Times it was sent again on a new connection after a drain.
    resends: u32,
    /// Answered with error 6 on this connection: it did not run (whether or not the notice
    /// follows).
    refused: bool,
}

/// One connection's driver.
pub struct Driver {
    pub index: u32,
    pub depth: u32,
    pub service_ids: Vec<u32>,
    pub workload: Workload,
    pub window: Window,
}

/// How a connection stands with a draining bridge.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Drain {
    /// Sending as usual.
    Open,
    /// An answer was error 6 (or a write failed): send nothing more here, wait for the notice
    /// (or the close), then resend on a new connection.
    Refused,
}

/// A connection's state while it runs: what is in flight at each place and the bytes on the
/// way in and out.
struct Batch<'a> {
    driver: &'a Driver,
    recorder: Recorder,
    stream: PlainStream,
    rng: Rng,
    payloads: Vec<Vec<Payload>>,
    in_flight: Vec<Option<InFlight>>,
    outstanding: u64,
    sequence: u64,
    out: Vec<u8>,
    input: ReadBuffer,
    drain: Drain,
    /// Places answered while the connection was refused: they get a new request once the next
    /// connection is up.
    idle: Vec<u64>,
}

/// Why a batch stopped early.
struct Stopped;

impl Driver {
    /// Run the loop on this thread until the window ends and the calls in flight are answered
    /// (or the hard stop passes).
    pub fn run(self) -> Recorder {
        let mut recorder = Recorder::new();
        let stream = match connect(&self.workload.connect) {
            Ok(stream) => stream,
            Err(_) => {
                recorder.record_error(ErrorClass::Io);
                recorder.record_stopped_early();
                return recorder;
            }
        };
        let mut batch = Batch::new(&self, stream, recorder);
        let ended = batch.run();
        let mut recorder = batch.recorder;
        if ended.is_ok() {
            for _ in 0..batch.outstanding {
                recorder.record_error(ErrorClass::Unanswered);
            }
        }
        recorder
    }
}

impl<'a> Batch<'a> {
    fn new(driver: &'a Driver, stream: PlainStream, recorder: Recorder) -> Batch<'a> {
        let depth = u64::from(driver.depth).min(PLACES);
        let payloads = (0..depth)
            .map(|place| {
                driver
                    .workload
                    .payloads
                    .values()
                    .map(|kind| Payload::of_kind(kind, driver.index, place as u32))
                    .collect()
            })
            .collect();
        let payload_bytes_max = driver
            .workload
            .payloads
            .values()
            .map(|kind| kind.len())
            .max();
        let frame_bytes_max = HEADER_BYTES + payload_bytes_max.unwrap_or(0);
        Batch {
            driver,
            recorder,
            stream,
            rng: Rng::for_stream(driver.workload.seed, u64::from(driver.index) << 32),
            payloads,
            in_flight: vec![None; depth as usize],
            outstanding: 0,
            sequence: 0,
            out: Vec::with_capacity(64 * 1024),
            input: ReadBuffer::new(INPUT_BYTES.max(frame_bytes_max + INPUT_SPARE_BYTES)),
            drain: Drain::Open,
            idle: Vec::new(),
        }
    }

    /// Stop early: count `class` once and the connection as stopped.
    fn stop(&mut self, class: ErrorClass) -> Result<(), Stopped> {
        self.recorder.record_error(class);
        self.recorder.record_stopped_early();
        Err(Stopped)
    }

    fn run(&mut self) -> Result<(), Stopped> {
        let now = Instant::now();
        for place in 0..self.in_flight.len() as u64 {
            self.send_new(place, now);
        }
        let hard_stop = self.driver.window.hard_stop.into_std();
        loop {
            if !self.out.is_empty() {
                if self.stream.write_all(&self.out).is_err() {
                    // A bridge that drained and closed this connection sent its notice
                    // first: read on to find it (or the close).
                    self.drain = Drain::Refused;
                }
                self.out.clear();
            }
            if self.outstanding == 0 || Instant::now() >= hard_stop {
                return Ok(());
            }
            self.input.prepare_read(
                self.input
                    .frame_bytes_needed(proto::PAYLOAD_BYTES_MAX_CEILING),
            );
            match self.stream.read(self.input.spare()) {
                Ok(0) if self.drain == Drain::Refused => self.resend_all(false)?,
                Ok(0) => return self.stop(ErrorClass::Closed),
                Ok(n) => {
                    self.input.commit(n);
                    self.on_input()?;
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) if self.drain == Drain::Refused => self.resend_all(false)?,
                Err(_) => return self.stop(ErrorClass::Io),
            }
        }
    }

    /// Handle every whole frame in the read buffer.
    fn on_input(&mut self) -> Result<(), Stopped> {
        let now = Instant::now();
        loop {
            let header = match self.input.parse(proto::PAYLOAD_BYTES_MAX_CEILING) {
                Parsed::Frame(header) => header,
                Parsed::NeedMore => return Ok(()),
                Parsed::Bad(_) => return self.stop(ErrorClass::Protocol),
            };
            if is_drain_notice(&header) {
                // Nothing unanswered here ran; the bridge closes the connection next.
                return self.resend_all(true);
            }
            self.on_answer(&header, now)?;
            self.input
                .consume(HEADER_BYTES + header.payload_len as usize);
        }
    }

    /// One answer to one of this connection's requests.
    fn on_answer(&mut self, header: &Header, now: Instant) -> Result<(), Stopped> {
        let place = header.request_id % PLACES;
        let Some(call) = self.in_flight.get(place as usize).copied().flatten() else {
            return self.stop(ErrorClass::Protocol);
        };
        if header.kind == Kind::Error && header.code == ErrorCode::ShuttingDown as u16 {
            // It did not run: it stays in flight, for the next connection.
            self.drain = Drain::Refused;
            self.in_flight[place as usize] = Some(InFlight {
                refused: true,
                ..call
            });
            return Ok(());
        }
        self.in_flight[place as usize] = None;
        self.outstanding -= 1;
        let measured = self.measures(call.started);
        let reply = self.input.payload(header);
        if header.kind == Kind::Reply {
            if measured {
                let latency = now - call.started;
                self.recorder.record_call(CallTiming {
                    service: call.service,
                    latency,
                    uncorrected: latency,
                    send_lag: Duration::ZERO,
                });
            }
            if self.driver.workload.verify[call.service] {
                let sent = self.payloads[place as usize][call.payload].as_bytes();
                if let Some(offset) = first_difference(sent, reply) {
                    self.recorder.record_mismatch(Mismatch {
                        connection: self.driver.index,
                        task: place as u32,
                        sequence: call.sequence,
                        request_bytes: sent.len(),
                        reply_bytes: reply.len(),
                        first_difference: offset,
                    });
                }
            }
        } else {
            let answer = Answer {
                header: *header,
                payload: reply.to_vec(),
            };
            let class = match answer.into_result() {
                Err(error) => ErrorClass::of(&error),
                Ok(_) => ErrorClass::Protocol,
            };
            self.record_failure(call, class);
        }
        self.refill(place, now);
        Ok(())
    }

    /// Whether a call started at `started` is recorded.
    fn measures(&self, started: Instant) -> bool {
        let window = &self.driver.window;
        started >= window.measure_start.into_std() && started < window.measure_end.into_std()
    }

    fn record_failure(&mut self, call: InFlight, class: ErrorClass) {
        if self.measures(call.started) {
            self.recorder.record_service_error(call.service, class);
        } else {
            self.recorder.record_warmup_error();
        }
    }

    /// A place whose call is done gets the next one (inside the window), now or, while the
    /// connection is refused, on the next connection.
    fn refill(&mut self, place: u64, now: Instant) {
        if now >= self.driver.window.measure_end.into_std() {
            return;
        }
        match self.drain {
            Drain::Open => self.send_new(place, now),
            Drain::Refused => self.idle.push(place),
        }
    }

    /// The drain is over on this connection. With the notice (`noticed`) every call still in
    /// flight did not run; without it (the bridge closed after an error 6) only the calls
    /// answered with error 6 are known not to have run, and the rest fail as `closed`. Open a
    /// new connection and send those calls again there (each at most [`DRAIN_RETRIES_MAX`]
    /// times), then the places that were waiting.
    fn resend_all(&mut self, noticed: bool) -> Result<(), Stopped> {
        let refused = ErrorClass::of(&CallError::Remote {
            code: ErrorCode::ShuttingDown as u16,
            message: String::new(),
        });
        let Ok(stream) = connect(&self.driver.workload.connect) else {
            // No new bridge took over: the refusal stands for every call in flight.
            let calls: Vec<InFlight> = self.in_flight.iter_mut().filter_map(Option::take).collect();
            for call in calls {
                self.outstanding -= 1;
                self.record_failure(
                    call,
                    if noticed || call.refused {
                        refused
                    } else {
                        ErrorClass::Closed
                    },
                );
            }
            self.recorder.record_stopped_early();
            return Err(Stopped);
        };
        self.stream = stream;
        self.input.consume(self.input.len());
        self.out.clear();
        self.drain = Drain::Open;
        let now = Instant::now();
        for place in 0..self.in_flight.len() as u64 {
            let Some(mut call) = self.in_flight[place as usize] else {
                continue;
            };
            if !noticed && !call.refused {
                // It may have run: its outcome is unknown, as for any close.
                self.in_flight[place as usize] = None;
                self.outstanding -= 1;
                self.record_failure(call, ErrorClass::Closed);
                self.refill(place, now);
                continue;
            }
            call.refused = false;
            if call.resends == DRAIN_RETRIES_MAX {
                self.in_flight[place as usize] = None;
                self.outstanding -= 1;
                self.record_failure(call, refused);
                self.refill(place, now);
                continue;
            }
            call.resends += 1;
            self.in_flight[place as usize] = Some(call);
            self.recorder.record_drain_retries(1);
            self.encode(place);
        }
        for place in std::mem::take(&mut self.idle) {
            self.send_new(place, now);
        }
        Ok(())
    }

    /// Start a new call at `place`.
    fn send_new(&mut self, place: u64, now: Instant) {
        let workload = &self.driver.workload;
        let service = workload.services.pick(&mut self.rng);
        let payload = workload.payloads.pick(&mut self.rng);
        self.sequence += 1;
        self.payloads[place as usize][payload].stamp(self.sequence);
        debug_assert!(self.in_flight[place as usize].is_none());
        self.in_flight[place as usize] = Some(InFlight {
            started: now,
            service,
            payload,
            sequence: self.sequence,
            resends: 0,
            refused: false,
        });
        self.outstanding += 1;
        self.encode(place);
    }

    /// Append the request in flight at `place` to the output (its payload is still stamped
    /// with its sequence: a place has one call at a time).
    fn encode(&mut self, place: u64) {
        let call = self.in_flight[place as usize].expect("a call in flight at this place");
        let bytes = self.payloads[place as usize][call.payload].as_bytes();
        let id = call.sequence * PLACES + place;
        let header = Header::new(
            Kind::Request,
            self.driver.service_ids[call.service],
            id,
            bytes.len() as u32,
        );
        proto::encode_frame(&mut self.out, &header, bytes);
    }
}
