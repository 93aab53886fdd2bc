//! Bodies of the daemon's fuzz targets (`fuzz/`, `cargo +nightly fuzz run ...`), here so that
//! the stable test suite runs them too (`tests/fuzz_bodies.rs`: seeded random inputs, inputs
//! built to be valid, and every crash the fuzzer ever found in `fuzz/regressions/`). Each takes
//! arbitrary bytes and panics only on a broken property.
//!
//! They drive the code the engine runs on untrusted bytes, not copies of it:
//!
//! - [`worker_answer`]: what a core checks when a worker's frame arrives
//!   (`engine::core::worker::answer::check_frame`) and the slot step of an answer
//!   (`worker_answer::take_reply` over a slot whose header and data the input writes);
//! - [`admin_line`]: the admin socket's line framing and bound (`control::admin::frame_line`)
//!   and the command parser (`control::admin::parse`);
//! - [`metrics_head`]: the metrics listener's HTTP head parser (`metrics::parse_request`).
//!
//! Each property is checked against an oracle written from the spec (docs/protocol.md §9,
//! docs/operations.md), apart from the code under test.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::config::Config;
use crate::engine::control::admin::{self, AdminRequest, Limits, Line, ADMIN_LINE_BYTES_MAX};
use crate::engine::core::worker::answer::{
    self as worker_answer, Verdict, WorkerFault, WorkerView,
};
use crate::metrics::{self, HttpRequest, REQUEST_HEAD_BYTES_MAX};
use crate::proto::{Header, Kind, FLAG_IN_SLOT, FLAG_QUEUED, HEADER_BYTES};
use crate::shm::{SlotState, SlotView, SLOT_ABI_VERSION, SLOT_HEADER_BYTES};

/// The payload bound frames are decoded against (the engine's `max_payload_bytes`): small, so
/// that both sides of it are reached.
pub const PAYLOAD_BOUND: u32 = 4096;

/// Bytes of a `worker_answer` input before the frame header: the worker's state (1), its job
/// sequence (8) and the slot's capacity (1).
pub const WORKER_PREFIX_BYTES: usize = 10;

/// One worker frame against one slot. The input is `[state][sequence: u64 LE][capacity]`,
/// a 24-byte frame header, the 64-byte slot header, then the payload and the slot's data area.
/// Properties: never panics; the frame is accepted exactly when the protocol allows it (every
/// malformed or untimely frame gets a fault); an accepted answer's reply is within the slot
/// (in-slot) or the payload bound (copy path), and leaves the slot Free.
pub fn worker_answer(data: &[u8]) {
    let Some((prefix, rest)) = data.split_first_chunk::<WORKER_PREFIX_BYTES>() else {
        return;
    };
    let view = worker_view(prefix);
    let capacity = 64 + 8 * u32::from(prefix[9]);
    let Some((header_bytes, rest)) = rest.split_first_chunk::<HEADER_BYTES>() else {
        return;
    };
    let header = match Header::decode(header_bytes, PAYLOAD_BOUND) {
        Ok(header) => header,
        Err(_) => return, // the core fails the worker (BadFrame) before any check here
    };
    let (slot_header, rest) = rest.split_at(rest.len().min(SLOT_HEADER_BYTES));
    let Some(payload) = rest.get(..header.payload_len as usize) else {
        return; // not a whole frame yet: the reader waits for more
    };
    let slot_data = &rest[payload.len()..];
    let verdict = worker_answer::check_frame(&header, payload, view);
    let expected = legal_frame(&header, payload, view);
    match verdict {
        Err(fault) => {
            assert!(
                expected.is_none(),
                "{fault} for a legal frame {header:?} in {view:?}"
            );
            assert!(fault.index() < WorkerFault::LABELS.len());
            assert!(!fault.to_string().is_empty());
        }
        Ok(verdict) => {
            assert_eq!(Some(verdict), expected, "{header:?} in {view:?}");
            if let Verdict::Answer(answer) = verdict {
                let region = SlotRegion::new(capacity, slot_header, slot_data);
                check_reply(&answer, &region, &header);
            }
        }
    }
}

/// The worker's state from the input's first 9 bytes.
fn worker_view(prefix: &[u8; WORKER_PREFIX_BYTES]) -> WorkerView {
    let sequence = u64::from_le_bytes(prefix[1..9].try_into().expect("8 bytes"));
    match prefix[0] % 8 {
        0 => WorkerView::Starting,
        1 => WorkerView::Stopping,
        2 => WorkerView::Waiting("idle"),
        3 => WorkerView::Waiting("lending its slot"),
        _ => WorkerView::Busy {
            sequence,
            queued: prefix[0] & 0x10 != 0,
            job_sent: prefix[0] & 0x20 == 0,
        },
    }
}

/// The oracle: what the protocol makes of this frame in this state, or `None` where it is a
/// violation (docs/protocol.md §1.4, §6.3, §8, §9).
fn legal_frame(header: &Header, payload: &[u8], view: WorkerView) -> Option<Verdict> {
    if view == WorkerView::Stopping {
        return Some(Verdict::Ignored);
    }
    match (view, header.kind) {
        (WorkerView::Starting, Kind::Hello) => {
            let abi = payload.get(..4)?;
            let legal = payload.len() == 8
                && header.flags & !FLAG_QUEUED == 0
                && u32::from_le_bytes(abi.try_into().ok()?) == SLOT_ABI_VERSION;
            legal.then_some(Verdict::Ready {
                accepts_queue: header.flags == FLAG_QUEUED,
            })
        }
        (
            WorkerView::Busy {
                sequence,
                queued,
                job_sent: true,
            },
            Kind::Done | Kind::Fail,
        ) if header.request_id == sequence => {
            let in_slot = header.flags == FLAG_IN_SLOT;
            let flags_ok = header.flags == 0 || (header.kind == Kind::Done && in_slot);
            let legal = flags_ok && !(in_slot && (queued || header.payload_len != 0));
            legal.then_some(Verdict::Answer(worker_answer::Answer {
                ok: header.kind == Kind::Done,
                in_slot,
                queued,
                sequence,
            }))
        }
        _ => None,
    }
}

/// The slot step of an accepted answer over `region`: taken exactly when the header is a
/// Replied one for this job with a `reply_len` within the capacity (or the job was queued),
/// the reply's bytes are the data area's, and its length is within the bounds.
fn check_reply(answer: &worker_answer::Answer, region: &SlotRegion, header: &Header) {
    let slot = region.view();
    let capacity = slot.capacity();
    let before = region.header_fields();
    let mut out = Vec::new();
    let taken = worker_answer::take_reply(answer, &slot, &mut out);
    // `reply_len` counts only for an in-slot reply (docs/protocol.md §7.1).
    let valid = before.state == SlotState::Replied as u32
        && before.job_sequence == answer.sequence
        && (!answer.in_slot || before.reply_len <= capacity);
    match taken {
        Err(error) => {
            assert!(
                !answer.queued && !valid,
                "{error} for a valid slot {before:?}"
            );
            assert!(
                out.is_empty(),
                "bytes copied from a slot that did not validate"
            );
        }
        Ok(taken) => {
            assert!(
                answer.queued || valid,
                "took a reply from an invalid slot {before:?}"
            );
            assert_eq!(taken, out.len());
            let reply_len = if answer.in_slot {
                assert_eq!(taken, before.reply_len as usize);
                assert_eq!(out, region.data(taken), "the reply is not the slot's bytes");
                taken
            } else {
                assert_eq!(taken, 0, "slot bytes taken for a copy-path answer");
                header.payload_len as usize
            };
            let bound = if answer.in_slot {
                capacity
            } else {
                PAYLOAD_BOUND
            };
            assert!(
                reply_len <= bound as usize,
                "a reply of {reply_len} over {bound}"
            );
            if !answer.queued {
                assert_eq!(slot.state(), SlotState::Free as u32, "the slot is not Free");
            }
        }
    }
}

/// The fields of a slot header the bridge reads for an answer.
#[derive(Clone, Copy, Debug)]
struct SlotFields {
    state: u32,
    reply_len: u32,
    job_sequence: u64,
}

/// Memory standing in for a slot's mapping, 8-byte aligned, written from the input.
struct SlotRegion {
    /// Atomics, as the mapping is shared memory: the view writes through a shared borrow.
    words: Vec<AtomicU64>,
    capacity: u32,
}

impl SlotRegion {
    /// A region of `capacity` data bytes (a multiple of 8), its header and data area the
    /// input's bytes (zero where the input ends).
    fn new(capacity: u32, header: &[u8], data: &[u8]) -> SlotRegion {
        assert_eq!(capacity % 8, 0);
        let mut bytes = vec![0u8; SLOT_HEADER_BYTES + capacity as usize];
        bytes[..header.len()].copy_from_slice(header);
        let data = &data[..data.len().min(capacity as usize)];
        bytes[SLOT_HEADER_BYTES..SLOT_HEADER_BYTES + data.len()].copy_from_slice(data);
        let words = bytes
            .chunks_exact(8)
            .map(|word| AtomicU64::new(u64::from_le_bytes(word.try_into().expect("8 bytes"))))
            .collect();
        SlotRegion { words, capacity }
    }

    /// The bridge's view of it, as `shm::Slot` gives over a mapping.
    fn view(&self) -> SlotView {
        let base = NonNull::new(self.words.as_ptr().cast::<u8>().cast_mut()).expect("a Vec");
        // SAFETY: `words` (atomics: interior mutability) is 8-byte aligned and exactly SLOT_HEADER_BYTES + capacity bytes
        // long; it outlives every view (each is dropped within `check_reply`, which borrows
        // `self`), and nothing writes it except through views (atomics and raw copies).
        unsafe { SlotView::new(base, self.capacity) }
    }

    fn byte(&self, offset: usize) -> u8 {
        self.words[offset / 8].load(Ordering::Relaxed).to_le_bytes()[offset % 8]
    }

    fn data(&self, len: usize) -> Vec<u8> {
        (0..len).map(|i| self.byte(SLOT_HEADER_BYTES + i)).collect()
    }

    fn header_fields(&self) -> SlotFields {
        let u32_at =
            |offset: usize| u32::from_le_bytes(std::array::from_fn(|i| self.byte(offset + i)));
        SlotFields {
            state: u32_at(8),
            reply_len: u32_at(20),
            job_sequence: self.words[3].load(Ordering::Relaxed),
        }
    }
}

/// The config the admin target parses against: services by name and by id.
fn admin_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = r#"
            [listen]
            unix = "/tmp/acgi-fuzz.sock"
            [[service]]
            id = 7
            name = "echo"
            exec = "/bin/cat"
            [[service]]
            id = 9
            name = "kv.store-2"
            exec = "/bin/cat"
            [[service]]
            id = 4000000000
            name = "_"
            exec = "/bin/cat"
        "#;
        Config::parse(text).expect("the fuzz config parses")
    })
}

/// Longest error line the admin parser may answer a line with: the line escaped ({:?}, at most
/// 10 bytes a character for `\u{...}`) plus its fixed text.
const ADMIN_ERROR_BYTES_MAX: usize = 12 * 3 * ADMIN_LINE_BYTES_MAX + 512;

/// Bytes an admin connection received, as the control thread sees them (it keeps
/// `ADMIN_LINE_BYTES_MAX + 1`), then a command the input describes, printed and parsed back.
/// Properties: never panics; an over-long line gets the fixed answer; an error echoes the line
/// within a bound; a parsed command names a real service and a real pid; every well-formed
/// command, however spaced, parses to what was printed.
pub fn admin_line(data: &[u8]) {
    let config = admin_config();
    let kept = &data[..data.len().min(ADMIN_LINE_BYTES_MAX + 1)];
    let newline = kept.iter().position(|b| *b == b'\n');
    match admin::frame_line(kept) {
        Line::Incomplete => assert!(newline.is_none() && kept.len() <= ADMIN_LINE_BYTES_MAX),
        Line::TooLong => {
            assert!(newline.is_none() && kept.len() > ADMIN_LINE_BYTES_MAX);
            assert_eq!(admin::LINE_TOO_LONG, b"error: command line too long\n");
        }
        Line::Command(command) => {
            assert!(newline.is_some());
            assert!(!command.contains('\n'));
            assert!(
                command.len() <= 3 * ADMIN_LINE_BYTES_MAX,
                "{} bytes",
                command.len()
            );
            check_parsed(&command, config);
        }
    }
    let (request, line) = printed_command(data, config);
    assert!(
        line.len() <= ADMIN_LINE_BYTES_MAX,
        "{line:?} is over the line bound"
    );
    let mut received = line.clone().into_bytes();
    received.push(b'\n');
    assert_eq!(
        admin::frame_line(&received),
        Line::Command(line.trim().into())
    );
    assert_eq!(admin::parse(&line, config), Ok(request), "{line:?}");
}

/// A command line's parse: an error within its bound, or a request naming what exists.
fn check_parsed(command: &str, config: &Config) {
    match admin::parse(command, config) {
        Err(error) => assert!(
            error.len() <= ADMIN_ERROR_BYTES_MAX,
            "{} bytes",
            error.len()
        ),
        Ok(request) => match request {
            AdminRequest::Pause(s)
            | AdminRequest::Resume(s)
            | AdminRequest::Drain(s)
            | AdminRequest::Recycle(s)
            | AdminRequest::Set { service: s, .. } => assert!(s < config.services.len()),
            AdminRequest::KillWorker(pid) => assert!(pid > 0),
        },
    }
}

/// A well-formed command chosen by the input, and its line (spaced as the input says).
fn printed_command(data: &[u8], config: &Config) -> (AdminRequest, String) {
    let mut bytes = data.iter().rev().copied().chain(std::iter::repeat(0));
    let mut next = move || bytes.next().unwrap_or(0);
    let service = usize::from(next()) % config.services.len();
    let entry = &config.services[service];
    let by_name = next() % 2 == 0;
    let name = if by_name {
        entry.name.clone()
    } else {
        entry.id.to_string()
    };
    let number =
        |next: &mut dyn FnMut() -> u8| u32::from_le_bytes([next(), next(), next(), next()]);
    let (request, words): (AdminRequest, Vec<String>) = match next() % 6 {
        0 => (AdminRequest::Pause(service), vec!["pause".into(), name]),
        1 => (AdminRequest::Resume(service), vec!["resume".into(), name]),
        2 => (AdminRequest::Drain(service), vec!["drain".into(), name]),
        3 => (AdminRequest::Recycle(service), vec!["recycle".into(), name]),
        4 => {
            let pid = (number(&mut next) % i32::MAX as u32) as i32 + 1;
            let pid_text = if next() % 4 == 0 {
                format!("+{pid}")
            } else {
                pid.to_string()
            };
            (
                AdminRequest::KillWorker(pid),
                vec!["kill-worker".into(), pid_text],
            )
        }
        _ => {
            let mut limits = Limits::default();
            let mut words = vec!["set".to_string(), name];
            for _ in 0..1 + next() % 4 {
                let value = number(&mut next);
                let key = match next() % 3 {
                    0 => (&mut limits.min_workers, "min_workers"),
                    1 => (&mut limits.max_workers, "max_workers"),
                    _ => (&mut limits.backlog_max, "backlog_max"),
                };
                *key.0 = Some(value); // a repeated key: the last one counts
                words.push(format!("{}={value}", key.1));
            }
            (AdminRequest::Set { service, limits }, words)
        }
    };
    let spaces = [" ", "  ", "\t", " \t "];
    let mut line = String::from(spaces[usize::from(next()) % 4]).repeat(usize::from(next() % 2));
    for word in words {
        line.push_str(&word);
        line.push_str(spaces[usize::from(next()) % 4]);
    }
    (request, line)
}

/// Bytes received on a metrics connection. Properties: never panics; asks for more only
/// below the head bound; answers alone with a whole HTTP/1.1 response; accepts (asks the cores
/// for) only a `GET` or `HEAD` of `/metrics` or `/readyz` whose head is within the bound,
/// which no proper prefix of it is refused and no body after it changes.
pub fn metrics_head(data: &[u8]) {
    match metrics::parse_request(data) {
        Ok(HttpRequest::Incomplete) => assert!(data.len() < REQUEST_HEAD_BYTES_MAX),
        Err(response) => check_response(&response),
        Ok(accepted) => {
            let head = accepted_head(data, accepted);
            check_prefixes(&data[..head]);
            let mut with_body = data.to_vec();
            with_body.extend_from_slice(b"GET /x HTTP/1.1\r\n\r\n");
            assert_eq!(metrics::parse_request(&with_body), Ok(accepted));
        }
    }
}

/// What the oracle finds in an accepted request: its head ends within the bound, and its
/// request line is `GET|HEAD SP target SP HTTP/1.x` for the path the answer names. Returns
/// the head's length.
fn accepted_head(data: &[u8], accepted: HttpRequest) -> usize {
    let head = head_length(data).expect("an accepted request has a whole head");
    assert!(
        head <= REQUEST_HEAD_BYTES_MAX,
        "a head of {head} bytes accepted"
    );
    let line_end = data
        .iter()
        .position(|b| *b == b'\n')
        .expect("a request line");
    let line = data[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&data[..line_end]);
    let parts: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    let [method, target, version] = parts[..] else {
        panic!("accepted a request line of {} parts", parts.len());
    };
    assert!(version == b"HTTP/1.1" || version == b"HTTP/1.0");
    let path = target_path(target);
    let (with_body, wanted) = match accepted {
        HttpRequest::Metrics { with_body, .. } => (with_body, &b"/metrics"[..]),
        HttpRequest::Ready { with_body } => (with_body, &b"/readyz"[..]),
        HttpRequest::Incomplete => unreachable!("not accepted"),
    };
    assert_eq!(
        path,
        wanted,
        "accepted the path {:?}",
        String::from_utf8_lossy(path)
    );
    assert_eq!(method, if with_body { &b"GET"[..] } else { b"HEAD" });
    head
}

/// The path of a request target: before `?` or `#`, after `scheme://authority`.
fn target_path(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(target.len());
    let target = &target[..end];
    if target.starts_with(b"/") {
        return target;
    }
    let after_scheme = target
        .windows(3)
        .position(|w| w == b"://")
        .map_or(target, |at| &target[at + 3..]);
    let slash = after_scheme.iter().position(|b| *b == b'/');
    slash.map_or(b"/", |at| &after_scheme[at..])
}

/// Bytes up to the head's blank line (an empty or `\r` line after the first), if there.
fn head_length(data: &[u8]) -> Option<usize> {
    let mut start = 0;
    for (i, byte) in data.iter().enumerate() {
        if *byte == b'\n' {
            if start > 0 && matches!(&data[start..i], b"" | b"\r") {
                return Some(i + 1);
            }
            start = i + 1;
        }
    }
    None
}

/// Every proper prefix of an accepted head asks for more (none is refused). Heads over 512
/// bytes are cut at 64 places, to keep an exec short.
fn check_prefixes(head: &[u8]) {
    let step = (head.len() / 64).max(1);
    for len in (0..head.len()).step_by(step) {
        assert_eq!(
            metrics::parse_request(&head[..len]),
            Ok(HttpRequest::Incomplete),
            "refused the first {len} bytes of an accepted head"
        );
    }
}

/// An answer made alone is a whole HTTP/1.1 response, small, whose body is empty (HEAD) or
/// its `Content-Length`.
fn check_response(response: &[u8]) {
    assert!(response.starts_with(b"HTTP/1.1 "));
    assert!(
        response.len() <= 1024,
        "a response of {} bytes",
        response.len()
    );
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let head = std::str::from_utf8(&response[..end]).expect("an ASCII head");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .expect("a number");
    let body = response.len() - end;
    assert!(
        body == 0 || body == length,
        "a body of {body} bytes for {length}"
    );
}
