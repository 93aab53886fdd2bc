//! The soak's request bodies: every byte is a function of (connection, request number, size),
//! and the first [`STAMP_BYTES`] say which, so a reply is checked byte for byte against the
//! request it answers and, when it differs, attributed: another request's bytes (misrouted)
//! or no request's bytes at all (corrupted).
//!
//! ```text
//!  0        4           8                 16       20       24                 32
//!  +--------+-----------+-----------------+--------+--------+------------------+---------
//!  | "SOAK" | connection|  request number |  size  |   0    | FNV-1a of filler | filler
//!  | magic  |   u32 LE  |      u64 LE     | u32 LE |        |      u64 LE      | ...
//!  +--------+-----------+-----------------+--------+--------+------------------+---------
//! ```
//!
//! The filler comes from a SplitMix64 stream seeded by (connection, number), so two requests
//! never share their bytes past the stamp either: a reply spliced from two requests is caught.
//! Sizes are never below [`STAMP_BYTES`], so every body carries its whole stamp.

use crate::mix::Rng;

/// Bytes of the stamp at the start of every body (the smallest body).
pub const STAMP_BYTES: usize = 32;
const MAGIC: &[u8; 4] = b"SOAK";

/// Who a body says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub connection: u32,
    pub number: u64,
    pub size: u32,
}

/// The body of request `number` on `connection`, `size` bytes (at least [`STAMP_BYTES`]).
pub fn body(identity: Identity) -> Vec<u8> {
    assert!(identity.size as usize >= STAMP_BYTES, "{identity:?}");
    let mut bytes = vec![0u8; identity.size as usize];
    fill(identity, &mut bytes[STAMP_BYTES..]);
    let checksum = fnv1a(&bytes[STAMP_BYTES..]);
    bytes[0..4].copy_from_slice(MAGIC);
    bytes[4..8].copy_from_slice(&identity.connection.to_le_bytes());
    bytes[8..16].copy_from_slice(&identity.number.to_le_bytes());
    bytes[16..20].copy_from_slice(&identity.size.to_le_bytes());
    bytes[24..32].copy_from_slice(&checksum.to_le_bytes());
    bytes
}

/// Whose bytes `reply` is, when it is a whole, intact body of some request: the stamp reads
/// well, the length is the stamped size and the filler is the one that identity generates.
pub fn identify(reply: &[u8]) -> Option<Identity> {
    if reply.len() < STAMP_BYTES || &reply[0..4] != MAGIC {
        return None;
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
    let identity = Identity {
        connection: u32_at(4),
        number: u64_at(8),
        size: u32_at(16),
    };
    let checksum = u64_at(24);
    let intact = identity.size as usize == reply.len() && fnv1a(&reply[STAMP_BYTES..]) == checksum;
    (intact && body(identity) == reply).then_some(identity)
}

fn fill(identity: Identity, out: &mut [u8]) {
    let stream = u64::from(identity.connection) << 40 ^ identity.number;
    let mut rng = Rng::for_stream(0x50A4_50A4, stream);
    for chunk in out.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Where sizes are drawn relative to the slot: the classes the summary counts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    /// From the stamp to half the slot: in the slot, one read.
    Below,
    /// Within 16 bytes of the slot size, the slot size itself included: the edge.
    Edge,
    /// Up to 4 slots: the copy path.
    Above,
    /// 16 to 64 slots: many reads, a large reply.
    FarAbove,
}

impl SizeClass {
    pub const ALL: [SizeClass; 4] = [
        SizeClass::Below,
        SizeClass::Edge,
        SizeClass::Above,
        SizeClass::FarAbove,
    ];

    /// Draw a class (35/30/25/10) and a size in it for a slot of `slot` bytes.
    pub fn draw(rng: &mut Rng, slot: u32) -> (SizeClass, u32) {
        let stamp = STAMP_BYTES as u32;
        let slot = slot.max(2 * stamp);
        let pick = rng.next_u64() % 100;
        let within = |rng: &mut Rng, low: u32, high: u32| {
            low + (rng.next_u64() % u64::from(high - low + 1)) as u32
        };
        match pick {
            0..=34 => (SizeClass::Below, within(rng, stamp, slot / 2)),
            35..=64 => {
                // One in four edge requests is exactly the slot size.
                let size = if rng.next_u64() % 4 == 0 {
                    slot
                } else {
                    within(rng, slot - 16, slot + 16)
                };
                (SizeClass::Edge, size)
            }
            65..=89 => (SizeClass::Above, within(rng, slot + 1, 4 * slot)),
            _ => (SizeClass::FarAbove, within(rng, 16 * slot, 64 * slot)),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_identifies_itself_and_nothing_else_does() {
        // Proves identify() names a body's own request and refuses altered or spliced bytes.
        let a = Identity {
            connection: 3,
            number: 7,
            size: 100,
        };
        let b = Identity {
            connection: 3,
            number: 8,
            size: 100,
        };
        let body_a = body(a);
        assert_eq!(identify(&body_a), Some(a));
        assert_ne!(body_a, body(b), "two requests share no bytes");
        let mut flipped = body_a.clone();
        flipped[60] ^= 1;
        assert_eq!(identify(&flipped), None);
        let mut spliced = body_a[..50].to_vec();
        spliced.extend_from_slice(&body(b)[50..]);
        assert_eq!(identify(&spliced), None);
        assert_eq!(identify(&body_a[..99]), None);
        assert_eq!(identify(b"short"), None);
    }

    #[test]
    fn sizes_cover_every_class_and_the_exact_slot() {
        // Proves the draw reaches below, the edge (the slot size itself), above and far above.
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 4];
        let mut exact = false;
        for _ in 0..10_000 {
            let (class, size) = SizeClass::draw(&mut rng, 4096);
            seen[class.index()] += 1;
            exact |= size == 4096;
            assert!(size as usize >= STAMP_BYTES && size <= 64 * 4096);
        }
        assert!(seen.iter().all(|&n| n > 500), "{seen:?}");
        assert!(exact);
    }
}
