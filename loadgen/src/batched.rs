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

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use acgi_client::{Addr, Answer};
use acgi_proto::{self as proto, Header, Kind, Parsed, ReadBuffer, HEADER_BYTES};

use crate::mix::Rng;
use crate::payload::{first_difference, Payload};
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

enum Stream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    fn connect(addr: &str) -> io::Result<Stream> {
        let stream = match Addr::parse(addr) {
            Addr::Unix(path) => Stream::Unix(std::os::unix::net::UnixStream::connect(path)?),
            Addr::Tcp(host_port) => {
                let stream = std::net::TcpStream::connect(host_port)?;
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
            Addr::Tls(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the batched mode speaks plaintext only: drive tls: addresses with the \
                     closed or open loop",
                ))
            }
        };
        match &stream {
            Stream::Unix(s) => s.set_read_timeout(Some(READ_TIMEOUT))?,
            Stream::Tcp(s) => s.set_read_timeout(Some(READ_TIMEOUT))?,
        }
        Ok(stream)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }
}

/// A request in flight at one place.
#[derive(Clone, Copy)]
struct InFlight {
    started: Instant,
    service: usize,
    payload: usize,
    sequence: u64,
}

/// One connection's driver.
pub struct Driver {
    pub index: u32,
    pub depth: u32,
    pub service_ids: Vec<u32>,
    pub workload: Workload,
    pub window: Window,
}

impl Driver {
    /// Run the loop on this thread until the window ends and the calls in flight are answered
    /// (or the hard stop passes).
    pub fn run(self) -> Recorder {
        let mut recorder = Recorder::new();
        let mut stream = match Stream::connect(&self.workload.connect) {
            Ok(stream) => stream,
            Err(_) => {
                recorder.record_error(ErrorClass::Io);
                recorder.record_stopped_early();
                return recorder;
            }
        };
        let measure_start = self.window.measure_start.into_std();
        let measure_end = self.window.measure_end.into_std();
        let hard_stop = self.window.hard_stop.into_std();
        let depth = u64::from(self.depth).min(PLACES);
        let mut rng = Rng::for_stream(self.workload.seed, u64::from(self.index) << 32);
        let mut payloads: Vec<Vec<Payload>> = (0..depth)
            .map(|place| {
                self.workload
                    .payloads
                    .values()
                    .map(|kind| Payload::of_kind(kind, self.index, place as u32))
                    .collect()
            })
            .collect();
        let mut in_flight: Vec<Option<InFlight>> = vec![None; depth as usize];
        let mut outstanding = 0u64;
        let mut sequence = 0u64;
        let mut out = Vec::with_capacity(64 * 1024);
        let payload_bytes_max = self.workload.payloads.values().map(|kind| kind.len()).max();
        let frame_bytes_max = HEADER_BYTES + payload_bytes_max.unwrap_or(0);
        let mut input = ReadBuffer::new(INPUT_BYTES.max(frame_bytes_max + INPUT_SPARE_BYTES));
        let mut send = |place: u64,
                        now: Instant,
                        out: &mut Vec<u8>,
                        in_flight: &mut [Option<InFlight>],
                        payloads: &mut [Vec<Payload>],
                        rng: &mut Rng| {
            let service = self.workload.services.pick(rng);
            let payload_index = self.workload.payloads.pick(rng);
            sequence += 1;
            let payload = &mut payloads[place as usize][payload_index];
            payload.stamp(sequence);
            let bytes = payload.as_bytes();
            let id = sequence * PLACES + place;
            let header = Header::new(
                Kind::Request,
                self.service_ids[service],
                id,
                bytes.len() as u32,
            );
            proto::encode_frame(out, &header, bytes);
            in_flight[place as usize] = Some(InFlight {
                started: now,
                service,
                payload: payload_index,
                sequence,
            });
        };
        let now = Instant::now();
        for place in 0..depth {
            send(
                place,
                now,
                &mut out,
                &mut in_flight,
                &mut payloads,
                &mut rng,
            );
            outstanding += 1;
        }
        loop {
            if !out.is_empty() {
                if stream.write_all(&out).is_err() {
                    recorder.record_error(ErrorClass::Io);
                    recorder.record_stopped_early();
                    return recorder;
                }
                out.clear();
            }
            if outstanding == 0 || Instant::now() >= hard_stop {
                break;
            }
            input.prepare_read(input.frame_bytes_needed(proto::PAYLOAD_BYTES_MAX_CEILING));
            match stream.read(input.spare()) {
                Ok(0) => {
                    recorder.record_error(ErrorClass::Closed);
                    recorder.record_stopped_early();
                    return recorder;
                }
                Ok(n) => input.commit(n),
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => {
                    recorder.record_error(ErrorClass::Io);
                    recorder.record_stopped_early();
                    return recorder;
                }
            }
            let now = Instant::now();
            loop {
                let header = match input.parse(proto::PAYLOAD_BYTES_MAX_CEILING) {
                    Parsed::Frame(header) => header,
                    Parsed::NeedMore => break,
                    Parsed::Bad(_) => {
                        recorder.record_error(ErrorClass::Protocol);
                        recorder.record_stopped_early();
                        return recorder;
                    }
                };
                let place = header.request_id % PLACES;
                let Some(call) = in_flight.get_mut(place as usize).and_then(Option::take) else {
                    recorder.record_error(ErrorClass::Protocol);
                    recorder.record_stopped_early();
                    return recorder;
                };
                outstanding -= 1;
                let reply = input.payload(&header);
                let measured = call.started >= measure_start && call.started < measure_end;
                if header.kind == Kind::Reply {
                    if measured {
                        let latency = now - call.started;
                        recorder.record_call(CallTiming {
                            service: call.service,
                            latency,
                            uncorrected: latency,
                            send_lag: Duration::ZERO,
                        });
                    }
                    if self.workload.verify[call.service] {
                        let sent = payloads[place as usize][call.payload].as_bytes();
                        if let Some(offset) = first_difference(sent, reply) {
                            recorder.record_mismatch(Mismatch {
                                connection: self.index,
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
                        header,
                        payload: reply.to_vec(),
                    };
                    let class = match answer.into_result() {
                        Err(error) => ErrorClass::of(&error),
                        Ok(_) => ErrorClass::Protocol,
                    };
                    if measured {
                        recorder.record_service_error(call.service, class);
                    } else {
                        recorder.record_warmup_error();
                    }
                }
                input.consume(HEADER_BYTES + header.payload_len as usize);
                if now < measure_end {
                    send(
                        place,
                        now,
                        &mut out,
                        &mut in_flight,
                        &mut payloads,
                        &mut rng,
                    );
                    outstanding += 1;
                }
            }
        }
        for _ in 0..outstanding {
            recorder.record_error(ErrorClass::Unanswered);
        }
        recorder
    }
}
