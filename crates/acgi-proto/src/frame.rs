//! The wire protocol: one fixed 24-byte little-endian frame header, shared by callers (on the
//! Unix/TCP listeners) and workers (on their control sockets).
//!
//! This module owns the bytes of the header and nothing else: it checks, decodes and encodes.
//! It never allocates on the decode path and never panics on input: every malformed header is a
//! typed [`FrameError`]. `docs/protocol.md` is the normative description; the constants here are
//! the single definition used by the daemon, the client SDK and the worker SDK.
//!
//! ```text
//!  0      2    3    4      6      8          12         16                  24
//!  +------+----+----+------+------+----------+----------+-------------------+---------
//!  |magic |ver |kind|flags | code |service_id|payload_len|    request_id    | payload
//!  | u16  | u8 | u8 | u16  | u16  |   u32    |   u32     |       u64        | ...
//!  +------+----+----+------+------+----------+----------+-------------------+---------
//! ```

#![forbid(unsafe_code)]

use std::fmt;

/// First two bytes of every frame, little-endian: the bytes on the wire are `0x6B 0xAC`.
pub const MAGIC: u16 = 0xAC6B;
/// The only protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 24;
/// Default bound on a payload, in bytes (configurable per bridge with `max_payload_bytes`).
pub const PAYLOAD_BYTES_MAX_DEFAULT: u32 = 16 * 1024 * 1024;
/// Hard ceiling on any configured payload bound.
pub const PAYLOAD_BYTES_MAX_CEILING: u32 = 1 << 30;

/// Frame kinds. Values are stable: they are part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Caller -> bridge: call `service_id` with the payload.
    Request = 1,
    /// Bridge -> caller: the service's reply to `request_id`.
    Reply = 2,
    /// Bridge -> caller: `request_id` failed; `code` says why, the payload is a UTF-8 message.
    Error = 3,
    /// Caller -> bridge: look up the id of the service whose name is the payload (UTF-8).
    Resolve = 4,
    /// Bridge -> caller: answer to `Resolve`; `service_id` holds the id, the payload is empty.
    Resolved = 5,
    /// Caller -> bridge: liveness probe; answered with `Pong` echoing the payload.
    Ping = 6,
    /// Bridge -> caller: answer to `Ping`.
    Pong = 7,
    /// Worker -> bridge, once, first: the worker is ready. Payload: [`Hello`] (8 bytes).
    Hello = 16,
    /// Bridge -> worker: a job. With [`FLAG_IN_SLOT`] the payload is in the slot and the frame's
    /// own payload is empty; without it the payload follows the header on the socket.
    Job = 17,
    /// Worker -> bridge: the job's reply, in the slot ([`FLAG_IN_SLOT`]) or following the header.
    Done = 18,
    /// Worker -> bridge: the handler failed; the payload is a UTF-8 message for the caller.
    Fail = 19,
}

impl Kind {
    /// The kind with this wire value, if this version defines one.
    pub fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Request,
            2 => Kind::Reply,
            3 => Kind::Error,
            4 => Kind::Resolve,
            5 => Kind::Resolved,
            6 => Kind::Ping,
            7 => Kind::Pong,
            16 => Kind::Hello,
            17 => Kind::Job,
            18 => Kind::Done,
            19 => Kind::Fail,
            _ => return None,
        })
    }

    /// Kinds a caller may send to the bridge.
    pub fn is_caller_to_bridge(self) -> bool {
        matches!(self, Kind::Request | Kind::Resolve | Kind::Ping)
    }

    /// Kinds a worker may send to the bridge.
    pub fn is_worker_to_bridge(self) -> bool {
        matches!(self, Kind::Hello | Kind::Done | Kind::Fail)
    }
}

/// Job / Done flag: the payload is in the worker's shared-memory slot, not on the socket.
pub const FLAG_IN_SLOT: u16 = 1 << 0;
/// Request flag: the payload starts with a u32 LE timeout in milliseconds (0: none) that the
/// bridge strips. A request still waiting for a worker when it expires is answered
/// `deadline exceeded`; a worker can read the time left.
pub const FLAG_TIMEOUT: u16 = 1 << 1;
/// Bytes of the timeout prefix a `FLAG_TIMEOUT` request carries.
pub const TIMEOUT_PREFIX_BYTES: usize = 4;
/// Worker protocol: on `Hello`, the worker accepts queued jobs; on `Job`, a queued job whose
/// payload follows the header and whose answer follows its `Done`/`Fail` header, never
/// touching the slot (which belongs to the job ahead of it).
pub const FLAG_QUEUED: u16 = 1 << 2;
/// Flags defined by this version; any other bit set is a malformed frame.
pub const FLAGS_KNOWN: u16 = FLAG_IN_SLOT | FLAG_TIMEOUT | FLAG_QUEUED;

/// Stable numeric error codes carried in `code` of an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// No service has that id or name.
    UnknownService = 1,
    /// The payload is longer than the bridge's `max_payload_bytes`, or the reply is.
    PayloadTooLarge = 2,
    /// The service's pool is at `max_workers` and its backlog is full.
    Overloaded = 3,
    /// The worker died, hung up or broke the worker protocol while holding the request.
    WorkerFailed = 4,
    /// The request took longer than the service's timeout.
    TimedOut = 5,
    /// The bridge is shutting down and takes no new requests.
    ShuttingDown = 6,
    /// The frame could not be decoded; the connection is closed after this error.
    MalformedFrame = 7,
    /// The worker's handler reported an error; the message is the handler's.
    ServiceError = 8,
    /// The service cannot start workers (crash loop); retry later.
    ServiceUnavailable = 9,
    /// The caller's deadline passed before a worker could take the request.
    DeadlineExceeded = 10,
    /// The service's rules do not let this caller call it (its uid, gid or listener).
    NotAllowed = 11,
}

impl ErrorCode {
    /// The code with this wire value, if this version defines one.
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::UnknownService,
            2 => ErrorCode::PayloadTooLarge,
            3 => ErrorCode::Overloaded,
            4 => ErrorCode::WorkerFailed,
            5 => ErrorCode::TimedOut,
            6 => ErrorCode::ShuttingDown,
            7 => ErrorCode::MalformedFrame,
            8 => ErrorCode::ServiceError,
            9 => ErrorCode::ServiceUnavailable,
            10 => ErrorCode::DeadlineExceeded,
            11 => ErrorCode::NotAllowed,
            _ => return None,
        })
    }

    /// Whether sending the same request again later can help, and cannot run it twice
    /// (protocol §3's table): 3, 6 (on another bridge), 9 and 10, which never ran it. Codes 4
    /// and 5 may have run it: see [`ErrorCode::is_retryable_if_idempotent`].
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Overloaded
                | ErrorCode::ShuttingDown
                | ErrorCode::ServiceUnavailable
                | ErrorCode::DeadlineExceeded
        )
    }

    /// Whether a retry can help when running the request twice is harmless: the retryable
    /// codes, and 4 and 5 (the service may or may not have run it).
    pub fn is_retryable_if_idempotent(self) -> bool {
        self.is_retryable() || matches!(self, ErrorCode::WorkerFailed | ErrorCode::TimedOut)
    }

    /// The name callers see in messages (`"worker failed"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownService => "unknown service",
            ErrorCode::PayloadTooLarge => "payload too large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::WorkerFailed => "worker failed",
            ErrorCode::TimedOut => "timed out",
            ErrorCode::ShuttingDown => "shutting down",
            ErrorCode::MalformedFrame => "malformed frame",
            ErrorCode::ServiceError => "service error",
            ErrorCode::ServiceUnavailable => "service unavailable",
            ErrorCode::DeadlineExceeded => "deadline exceeded",
            ErrorCode::NotAllowed => "not allowed",
        }
    }
}

impl ErrorCode {
    /// The name as a metric label value (snake_case).
    pub fn metric_name(self) -> &'static str {
        match self {
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::WorkerFailed => "worker_failed",
            ErrorCode::TimedOut => "timed_out",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::ServiceError => "service_error",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::NotAllowed => "not_allowed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded, checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// `FLAG_*` bits; only [`FLAGS_KNOWN`] may be set.
    pub flags: u16,
    /// An [`ErrorCode`] on `Error` frames, 0 on every other kind.
    pub code: u16,
    /// The service called, resolved or answering.
    pub service_id: u32,
    /// Bytes of payload following the header (0 for in-slot jobs and replies).
    pub payload_len: u32,
    /// The caller's id for a request (echoed in its answer), or the bridge's job sequence.
    pub request_id: u64,
}

impl Header {
    /// A header of `kind` without flags or code.
    pub fn new(kind: Kind, service_id: u32, request_id: u64, payload_len: u32) -> Header {
        Header {
            kind,
            flags: 0,
            code: 0,
            service_id,
            payload_len,
            request_id,
        }
    }

    /// The header of an `Error` frame whose UTF-8 message is `message_len` bytes.
    pub fn error(request_id: u64, service_id: u32, code: ErrorCode, message_len: u32) -> Header {
        Header {
            kind: Kind::Error,
            flags: 0,
            code: code as u16,
            service_id,
            payload_len: message_len,
            request_id,
        }
    }

    /// Encode into exactly [`HEADER_BYTES`] bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = VERSION;
        out[3] = self.kind as u8;
        out[4..6].copy_from_slice(&self.flags.to_le_bytes());
        out[6..8].copy_from_slice(&self.code.to_le_bytes());
        out[8..12].copy_from_slice(&self.service_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        out
    }

    /// Check and decode a header. `payload_bytes_max` bounds `payload_len`; a header whose
    /// length is over it decodes to [`FrameError::PayloadTooLarge`], which carries the header so
    /// that the receiver can answer the request and skip its payload.
    pub fn decode(bytes: &[u8], payload_bytes_max: u32) -> Result<Header, FrameError> {
        if bytes.len() < HEADER_BYTES {
            return Err(FrameError::Truncated { have: bytes.len() });
        }
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if bytes[2] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: bytes[2] });
        }
        let kind = Kind::from_u8(bytes[3]).ok_or(FrameError::UnknownKind { found: bytes[3] })?;
        let flags = u16::from_le_bytes([bytes[4], bytes[5]]);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(FrameError::UnknownFlags { found: flags });
        }
        let code = u16::from_le_bytes([bytes[6], bytes[7]]);
        let service_id = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let payload_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let request_id = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if kind != Kind::Error && code != 0 {
            return Err(FrameError::CodeOnNonError { kind, code });
        }
        let header = Header {
            kind,
            flags,
            code,
            service_id,
            payload_len,
            request_id,
        };
        if payload_len > payload_bytes_max {
            return Err(FrameError::PayloadTooLarge {
                header,
                max: payload_bytes_max,
            });
        }
        Ok(header)
    }

    /// Whether [`FLAG_IN_SLOT`] is set.
    pub fn in_slot(&self) -> bool {
        self.flags & FLAG_IN_SLOT != 0
    }

    /// The error code of an `Error` frame, when it is one this version defines.
    pub fn error_code(&self) -> Option<ErrorCode> {
        if self.kind == Kind::Error {
            ErrorCode::from_u16(self.code)
        } else {
            None
        }
    }
}

/// Why a header could not be accepted. Every variant is the sender's fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than [`HEADER_BYTES`] bytes.
    Truncated {
        /// Bytes there were.
        have: usize,
    },
    /// The first two bytes are not [`MAGIC`].
    BadMagic {
        /// The value found.
        found: u16,
    },
    /// A protocol version other than [`VERSION`].
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// A kind this version does not define.
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// A flag bit outside [`FLAGS_KNOWN`].
    UnknownFlags {
        /// The flags found.
        found: u16,
    },
    /// A non-zero `code` on a frame that is not an `Error`.
    CodeOnNonError {
        /// The frame's kind.
        kind: Kind,
        /// The code found.
        code: u16,
    },
    /// `payload_len` is over the receiver's bound; the header is otherwise valid.
    PayloadTooLarge {
        /// The decoded header, so that the receiver can answer the request and skip its payload.
        header: Header,
        /// The receiver's bound in bytes.
        max: u32,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated { have } => {
                write!(f, "truncated header: {have} of {HEADER_BYTES} bytes")
            }
            FrameError::BadMagic { found } => {
                write!(f, "bad magic 0x{found:04x}, expected 0x{MAGIC:04x}")
            }
            FrameError::UnsupportedVersion { found } => write!(
                f,
                "unsupported protocol version {found}, this bridge speaks {VERSION}"
            ),
            FrameError::UnknownKind { found } => write!(f, "unknown frame kind {found}"),
            FrameError::UnknownFlags { found } => write!(f, "unknown flags 0x{found:04x}"),
            FrameError::CodeOnNonError { kind, code } => {
                write!(f, "error code {code} set on a {kind:?} frame")
            }
            FrameError::PayloadTooLarge { header, max } => write!(
                f,
                "payload of {} bytes is over the maximum of {max} bytes",
                header.payload_len
            ),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// The code a bridge answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// Payload of a worker's `Hello`: the worker's slot ABI version and its pid, both u32 LE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The slot ABI the worker was built for (`slot::SLOT_ABI_VERSION`).
    pub slot_abi_version: u32,
    /// The worker's process id.
    pub pid: u32,
}

impl Hello {
    /// Size of the payload in bytes.
    pub const BYTES: usize = 8;

    /// The payload's bytes.
    pub fn encode(&self) -> [u8; Hello::BYTES] {
        let mut out = [0u8; Hello::BYTES];
        out[0..4].copy_from_slice(&self.slot_abi_version.to_le_bytes());
        out[4..8].copy_from_slice(&self.pid.to_le_bytes());
        out
    }

    /// Decode a payload, `None` unless it is exactly [`Hello::BYTES`] long.
    pub fn decode(bytes: &[u8]) -> Option<Hello> {
        if bytes.len() != Hello::BYTES {
            return None;
        }
        Some(Hello {
            slot_abi_version: u32::from_le_bytes(bytes[0..4].try_into().ok()?),
            pid: u32::from_le_bytes(bytes[4..8].try_into().ok()?),
        })
    }
}

/// Append a whole frame (header then payload) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, header: &Header, payload: &[u8]) {
    debug_assert_eq!(header.payload_len as usize, payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
}

/// Append an error frame with a UTF-8 message to `out`.
pub fn encode_error(
    out: &mut Vec<u8>,
    request_id: u64,
    service_id: u32,
    code: ErrorCode,
    message: &str,
) {
    let header = Header::error(request_id, service_id, code, message.len() as u32);
    encode_frame(out, &header, message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> [u8; HEADER_BYTES] {
        Header::new(Kind::Request, 7, 0x0102_0304_0506_0708, 5).encode()
    }

    #[test]
    fn header_round_trips_every_field() {
        // Proves encode and decode are inverse for every kind and flag this version defines.
        for kind in [1u8, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19] {
            let kind = Kind::from_u8(kind).unwrap();
            let code = if kind == Kind::Error { 4 } else { 0 };
            let header = Header {
                kind,
                flags: FLAG_IN_SLOT,
                code,
                service_id: u32::MAX,
                payload_len: 1234,
                request_id: u64::MAX - 1,
            };
            assert_eq!(Header::decode(&header.encode(), u32::MAX), Ok(header));
        }
    }

    #[test]
    fn layout_is_little_endian_at_documented_offsets() {
        // Proves the byte layout that docs/protocol.md specifies.
        let bytes = valid();
        assert_eq!(&bytes[0..2], &[0x6B, 0xAC]);
        assert_eq!(bytes[2], 1);
        assert_eq!(bytes[3], 1);
        assert_eq!(&bytes[8..12], &[7, 0, 0, 0]);
        assert_eq!(&bytes[12..16], &[5, 0, 0, 0]);
        assert_eq!(&bytes[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn every_malformed_header_is_rejected_with_its_reason() {
        // Proves each malformed case decodes to its own typed error, never a panic.
        let good = valid();
        for have in 0..HEADER_BYTES {
            assert_eq!(
                Header::decode(&good[..have], 100),
                Err(FrameError::Truncated { have })
            );
        }
        let mut bad = good;
        bad[0] = 0;
        assert!(matches!(
            Header::decode(&bad, 100),
            Err(FrameError::BadMagic { .. })
        ));
        let mut bad = good;
        bad[2] = 2;
        assert_eq!(
            Header::decode(&bad, 100),
            Err(FrameError::UnsupportedVersion { found: 2 })
        );
        let mut bad = good;
        bad[3] = 0;
        assert_eq!(
            Header::decode(&bad, 100),
            Err(FrameError::UnknownKind { found: 0 })
        );
        bad[3] = 200;
        assert_eq!(
            Header::decode(&bad, 100),
            Err(FrameError::UnknownKind { found: 200 })
        );
        let mut bad = good;
        bad[4] = 0x80;
        assert_eq!(
            Header::decode(&bad, 100),
            Err(FrameError::UnknownFlags { found: 0x80 })
        );
        let mut bad = good;
        bad[6] = 3;
        assert!(matches!(
            Header::decode(&bad, 100),
            Err(FrameError::CodeOnNonError { .. })
        ));
        match Header::decode(&good, 4) {
            Err(e @ FrameError::PayloadTooLarge { header, max: 4 }) => {
                assert_eq!(header.request_id, 0x0102_0304_0506_0708);
                assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        assert!(Header::decode(&good, 5).is_ok());
    }

    #[test]
    fn random_bytes_never_panic() {
        // Proves the decoder is total: any 24 bytes give Ok or a typed error.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            let mut bytes = [0u8; HEADER_BYTES];
            for b in bytes.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            if state % 3 == 0 {
                bytes[0..3].copy_from_slice(&[0x6B, 0xAC, 1]);
            }
            let _ = Header::decode(&bytes, PAYLOAD_BYTES_MAX_DEFAULT);
        }
    }

    #[test]
    fn error_codes_are_stable() {
        // Proves the numeric codes never drift from their documented values.
        for code in 1..=11u16 {
            assert_eq!(ErrorCode::from_u16(code).unwrap() as u16, code);
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(12), None);
        assert_eq!(ErrorCode::NotAllowed as u16, 11);
    }

    #[test]
    fn hello_round_trips_and_rejects_wrong_length() {
        // Proves the worker handshake payload is exactly 8 bytes.
        let hello = Hello {
            slot_abi_version: 1,
            pid: 4242,
        };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        assert_eq!(Hello::decode(&[0; 7]), None);
        assert_eq!(Hello::decode(&[0; 9]), None);
    }
}
