//! Request payloads that carry their own identity.
//!
//! Each task owns one buffer for the whole run and re-stamps its first bytes before every call
//! (no allocation per request). The stamp names the connection, the task and the call's sequence
//! number, so an echoed reply that belongs to another call (a request-id mix-up in the bridge)
//! differs from the request and is caught by verification, not only a corrupted one.
//!
//! ```text
//!  0          4          8                  16
//!  +----------+----------+------------------+------------------------------
//!  |connection|   task   |     sequence     | filler pattern (per task)
//!  |  u32 LE  |  u32 LE  |      u64 LE      | ...
//!  +----------+----------+------------------+------------------------------
//! ```
//!
//! Payloads shorter than 16 bytes carry a prefix of the stamp. A literal payload
//! ([`PayloadKind::Text`], such as the command `sleep 3`) is sent as given, never stamped.

use crate::mix::PayloadKind;

/// Bytes of the identity stamp at the start of a payload.
pub const STAMP_BYTES: usize = 16;

/// One task's reusable request body.
#[derive(Clone, Debug)]
pub struct Payload {
    bytes: Vec<u8>,
    connection: u32,
    task: u32,
    /// False for literal payloads.
    stamped: bool,
}

impl Payload {
    pub fn new(len: usize, connection: u32, task: u32) -> Payload {
        let salt = connection.wrapping_mul(7).wrapping_add(task);
        let bytes = (0..len)
            .map(|i| (i as u32).wrapping_mul(251).wrapping_add(salt) as u8)
            .collect();
        let mut payload = Payload {
            bytes,
            connection,
            task,
            stamped: true,
        };
        payload.stamp(0);
        payload
    }

    /// A literal payload, sent unchanged by every call.
    pub fn literal(bytes: &[u8]) -> Payload {
        Payload {
            bytes: bytes.to_vec(),
            connection: 0,
            task: 0,
            stamped: false,
        }
    }

    /// The buffer for `kind`: stamped bytes, or the literal text.
    pub fn of_kind(kind: &PayloadKind, connection: u32, task: u32) -> Payload {
        match kind {
            PayloadKind::Bytes(len) => Payload::new(*len as usize, connection, task),
            PayloadKind::Text(text) => Payload::literal(text.as_bytes()),
        }
    }

    /// Write the stamp for call number `sequence` into the buffer (literal payloads: nothing).
    pub fn stamp(&mut self, sequence: u64) {
        if !self.stamped {
            return;
        }
        let mut stamp = [0u8; STAMP_BYTES];
        stamp[0..4].copy_from_slice(&self.connection.to_le_bytes());
        stamp[4..8].copy_from_slice(&self.task.to_le_bytes());
        stamp[8..16].copy_from_slice(&sequence.to_le_bytes());
        let len = self.bytes.len().min(STAMP_BYTES);
        self.bytes[..len].copy_from_slice(&stamp[..len]);
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Where `reply` first differs from `request`: the first unequal byte, or the shorter length
/// when one is a prefix of the other. `None` when they are equal.
pub fn first_difference(request: &[u8], reply: &[u8]) -> Option<usize> {
    if request == reply {
        return None;
    }
    let common = request
        .iter()
        .zip(reply)
        .take_while(|(a, b)| a == b)
        .count();
    Some(common)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_distinguish_calls_connections_and_tasks() {
        // Proves two different calls never send the same bytes, and re-stamping is in place.
        let mut a = Payload::new(64, 1, 2);
        let b = Payload::new(64, 2, 1);
        a.stamp(5);
        let first = a.as_bytes().to_vec();
        a.stamp(6);
        assert_ne!(first, a.as_bytes());
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.as_bytes().len(), 64);
        assert_eq!(&a.as_bytes()[8..16], &6u64.to_le_bytes());
    }

    #[test]
    fn short_and_empty_payloads_are_fine() {
        // Proves payloads under the stamp size carry a prefix of it and zero bytes works.
        let mut short = Payload::new(3, 0x0403_0201, 0);
        short.stamp(9);
        assert_eq!(short.as_bytes(), &[1, 2, 3]);
        let mut empty = Payload::new(0, 1, 1);
        empty.stamp(1);
        assert!(empty.as_bytes().is_empty());
    }

    #[test]
    fn literal_payloads_are_never_stamped() {
        // Proves a command payload goes out byte for byte, whatever the call number.
        let mut command = Payload::of_kind(&PayloadKind::Text("sleep 3".into()), 4, 5);
        command.stamp(77);
        assert_eq!(command.as_bytes(), b"sleep 3");
        let sized = Payload::of_kind(&PayloadKind::Bytes(20), 4, 5);
        assert_eq!(sized.as_bytes().len(), 20);
        assert_eq!(&sized.as_bytes()[0..4], &4u32.to_le_bytes());
    }

    #[test]
    fn first_difference_finds_the_offset() {
        // Proves the mismatch offset for changed bytes, truncation and extension.
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"abc", b"ab"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
        assert_eq!(first_difference(b"", b"x"), Some(0));
    }
}
