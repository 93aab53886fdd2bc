//! The shared conformance vectors (`sdk/vectors/frames.txt`, format in its header comment)
//! against `acgi-proto`: every vector decodes to its fields or fails with its check, every valid
//! one re-encodes to its exact bytes, and each caller frame's classification agrees with the
//! crate's view of which kinds a caller may send.

use std::collections::{HashMap, HashSet};

use acgi_proto::{
    ErrorCode, FrameError, Header, Hello, Kind, FLAG_IN_SLOT, FLAG_QUEUED, FLAG_TIMEOUT,
    HEADER_BYTES, PAYLOAD_BYTES_MAX_DEFAULT, TIMEOUT_PREFIX_BYTES,
};

const VECTORS: &str = include_str!("../../../sdk/vectors/frames.txt");

struct Vector<'a> {
    line: usize,
    class: &'a str,
    name: &'a str,
    frame: Vec<u8>,
    keys: HashMap<&'a str, &'a str>,
}

impl Vector<'_> {
    fn key(&self, key: &str) -> &str {
        self.keys
            .get(key)
            .unwrap_or_else(|| panic!("line {}: {} has no {key}=", self.line, self.name))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> T {
        self.key(key)
            .parse()
            .unwrap_or_else(|_| panic!("line {}: {key}= is not a number", self.line))
    }

    fn bound(&self) -> u32 {
        self.keys
            .get("bound")
            .map_or(PAYLOAD_BYTES_MAX_DEFAULT, |_| self.number("bound"))
    }

    /// The header the vector's fields describe.
    fn header(&self) -> Header {
        Header {
            kind: Kind::from_u8(self.number("kind")).expect("a defined kind"),
            flags: self.number("flags"),
            code: self.number("code"),
            service_id: self.number("service"),
            payload_len: self.number("len"),
            request_id: self.number("id"),
        }
    }
}

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "odd hex length");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn vectors() -> Vec<Vector<'static>> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (index, line) in VECTORS.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split(' ');
        let class = words.next().expect("class");
        let name = words.next().expect("name");
        assert!(
            names.insert(name),
            "line {}: duplicate name {name}",
            index + 1
        );
        let mut keys = HashMap::new();
        for word in words {
            let (key, value) = word.split_once('=').expect("key=value");
            assert!(keys.insert(key, value).is_none(), "duplicate key {key}");
        }
        let frame = hex(keys.remove("frame").expect("frame="));
        out.push(Vector {
            line: index + 1,
            class,
            name,
            frame,
            keys,
        });
    }
    out
}

/// The first failing check of §1.2 that `error` stands for, by the vectors' names.
fn check_name(error: &FrameError) -> &'static str {
    match error {
        FrameError::Truncated { .. } => "truncated",
        FrameError::BadMagic { .. } => "magic",
        FrameError::UnsupportedVersion { .. } => "version",
        FrameError::UnknownKind { .. } => "kind",
        FrameError::UnknownFlags { .. } => "flags",
        FrameError::CodeOnNonError { .. } => "code",
        FrameError::PayloadTooLarge { .. } => "length",
    }
}

/// The bridge's reaction to a caller sending `header` whole, from the spec's rules (§1.3,
/// §1.4, §2.2-§2.4, §2.6) and this crate's caller-kind table.
fn caller_reaction(header: &Header) -> String {
    if !header.kind.is_caller_to_bridge() {
        return format!("error{}_close", ErrorCode::MalformedFrame as u16);
    }
    let allowed = if header.kind == Kind::Request {
        FLAG_TIMEOUT
    } else {
        0
    };
    let short_timeout =
        header.flags & FLAG_TIMEOUT != 0 && (header.payload_len as usize) < TIMEOUT_PREFIX_BYTES;
    if header.flags & !allowed != 0 || short_timeout {
        return "error7_close".to_string();
    }
    match header.kind {
        Kind::Ping if header.payload_len > 4096 => "error2_skip".to_string(),
        Kind::Resolve if header.payload_len > 64 => "error1_skip".to_string(),
        // The vectors' Resolve names and service 0 name no service (§2.2, §2.3).
        Kind::Resolve | Kind::Request => "error1_skip".to_string(),
        _ => "answered".to_string(),
    }
}

#[test]
fn the_vector_file_covers_every_class_kind_and_flag() {
    // Proves the file parses and holds what the issue asks: every kind and flag, boundary
    // lengths, ids at u64::MAX and service ids at u32::MAX.
    let all = vectors();
    let classes: HashSet<_> = all.iter().map(|v| v.class).collect();
    for class in ["valid", "malformed", "too_large", "caller_refused", "hello"] {
        assert!(classes.contains(class), "no {class} vector");
    }
    let valid: Vec<_> = all.iter().filter(|v| v.class == "valid").collect();
    let kinds: HashSet<u8> = valid.iter().map(|v| v.number("kind")).collect();
    for kind in [1u8, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19] {
        assert!(kinds.contains(&kind), "no valid vector of kind {kind}");
    }
    let flags = valid
        .iter()
        .fold(0u16, |acc, v| acc | v.number::<u16>("flags"));
    assert_eq!(flags, FLAG_IN_SLOT | FLAG_TIMEOUT | FLAG_QUEUED);
    assert!(valid.iter().any(|v| v.key("id") == u64::MAX.to_string()));
    assert!(valid
        .iter()
        .any(|v| v.key("service") == u32::MAX.to_string()));
    assert!(valid.iter().any(|v| v.key("len") == "0"));
    assert!(valid
        .iter()
        .any(|v| v.keys.contains_key("bound") && v.key("len") == v.key("bound")));
    assert!(all
        .iter()
        .any(|v| v.class == "too_large" && v.number::<u64>("len") == v.number::<u64>("bound") + 1));
}

#[test]
fn every_valid_vector_decodes_to_its_fields_and_encodes_to_its_bytes() {
    // Proves acgi-proto's decoder and encoder agree with the spec-derived vectors exactly.
    for v in vectors()
        .iter()
        .filter(|v| v.class == "valid" || v.class == "hello")
    {
        let decoded = Header::decode(&v.frame, v.bound())
            .unwrap_or_else(|e| panic!("{} (line {}): {e}", v.name, v.line));
        assert_eq!(decoded, v.header(), "{}", v.name);
        let payload = &v.frame[HEADER_BYTES..];
        assert_eq!(payload.len(), decoded.payload_len as usize, "{}", v.name);
        assert_eq!(payload, hex(v.key("payload")), "{}", v.name);
        let mut encoded = Vec::new();
        acgi_proto::encode_frame(&mut encoded, &v.header(), &hex(v.key("payload")));
        assert_eq!(encoded, v.frame, "{}: re-encoding", v.name);
    }
}

#[test]
fn every_malformed_vector_fails_its_first_check() {
    // Proves the decoder applies the checks of §1.2 in the documented order, and that every
    // malformed frame is answered with code 7 and the documented request id.
    for v in vectors().iter().filter(|v| v.class == "malformed") {
        let error = Header::decode(&v.frame, v.bound())
            .expect_err(&format!("{} (line {}) decoded", v.name, v.line));
        assert_eq!(check_name(&error), v.key("check"), "{}: {error}", v.name);
        assert_eq!(error.code(), ErrorCode::MalformedFrame, "{}", v.name);
        let answer_id = if v.frame.len() >= HEADER_BYTES {
            u64::from_le_bytes(v.frame[16..24].try_into().unwrap())
        } else {
            0
        };
        assert_eq!(answer_id, v.number::<u64>("answer_id"), "{}", v.name);
        let expected = if v.frame.is_empty() {
            "close"
        } else {
            "error7_close"
        };
        assert_eq!(v.key("caller"), expected, "{}", v.name);
    }
}

#[test]
fn every_too_large_vector_fails_only_the_length_check() {
    // Proves a header over the bound decodes to PayloadTooLarge carrying the whole header (so
    // that a receiver can skip the payload), answered with code 2 unless the kind is one a
    // caller may not send.
    for v in vectors().iter().filter(|v| v.class == "too_large") {
        match Header::decode(&v.frame, v.bound()) {
            Err(error @ FrameError::PayloadTooLarge { header, max }) => {
                assert_eq!(header, v.header(), "{}", v.name);
                assert_eq!(max, v.bound(), "{}", v.name);
                assert_eq!(error.code(), ErrorCode::PayloadTooLarge, "{}", v.name);
                assert!(
                    Header::decode(&v.frame, v.bound() + 1).is_ok(),
                    "{}",
                    v.name
                );
                let expected = if header.kind.is_caller_to_bridge() {
                    "error2_skip"
                } else {
                    "error7_close"
                };
                assert_eq!(v.key("caller"), expected, "{}", v.name);
            }
            other => panic!("{} (line {}): {other:?}", v.name, v.line),
        }
    }
}

#[test]
fn every_caller_refused_vector_has_a_valid_header_and_its_documented_reaction() {
    // Proves the refused caller frames are valid headers (the refusal is the caller protocol's,
    // not the codec's) and that the spec's rules give each its documented reaction.
    for v in vectors().iter().filter(|v| v.class == "caller_refused") {
        let header = Header::decode(&v.frame, v.bound())
            .unwrap_or_else(|e| panic!("{} (line {}): {e}", v.name, v.line));
        assert_eq!(header, v.header(), "{}", v.name);
        assert_eq!(caller_reaction(&header), v.key("caller"), "{}", v.name);
        assert_eq!(
            v.number::<u64>("answer_id"),
            header.request_id,
            "{}",
            v.name
        );
    }
}

#[test]
fn every_hello_vector_is_accepted_or_refused_as_documented() {
    // Proves Hello::decode takes exactly 8 bytes and that the spec's rules (§6.3: slot ABI 1,
    // flags 0 or QUEUED; §9: no IN_SLOT) give each vector its verdict.
    for v in vectors().iter().filter(|v| v.class == "hello") {
        let header = Header::decode(&v.frame, v.bound()).expect("a valid header");
        assert_eq!(header.kind, Kind::Hello, "{}", v.name);
        let decoded = Hello::decode(&v.frame[HEADER_BYTES..]);
        if let Some(hello) = decoded {
            assert_eq!(hello.slot_abi_version, v.number::<u32>("slot_abi_version"));
            assert_eq!(hello.pid, v.number::<u32>("pid"));
            assert_eq!(&hello.encode()[..], &v.frame[HEADER_BYTES..]);
        } else {
            assert!(!v.keys.contains_key("pid"), "{}", v.name);
        }
        let accept =
            decoded.is_some_and(|h| h.slot_abi_version == 1) && header.flags & !FLAG_QUEUED == 0;
        let expected = if accept { "accept" } else { "violation" };
        assert_eq!(v.key("bridge"), expected, "{}", v.name);
    }
}
