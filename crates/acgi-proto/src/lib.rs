//! The bytes acgi-bridge shares with its callers and its workers, defined once for the daemon,
//! the worker SDK (`acgi-worker`), the client SDK (`acgi-client`) and the load generator.
//!
//! - [`frame`] (re-exported here): the 24-byte frame header, its kinds, flags and error codes,
//!   and the worker's `Hello`. `docs/protocol.md` is the normative description.
//! - [`reader`]: [`ReadBuffer`], the one frame reader: a window of received bytes that yields
//!   whole frames.
//! - [`slot`]: the shared-memory slot ABI: the header layout, its state word, and
//!   [`slot::SlotView`], the validated accessors both sides use over a mapping that someone
//!   else owns (the daemon creates slots, the worker SDK attaches to them).
//!
//! This crate depends on std only and makes no syscalls: it never maps, opens or reads
//! anything. Bytes from the other side are untrusted: decoding never panics on them, and every
//! read of a slot header is validated.

#![warn(missing_docs)]

pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod reader;
pub mod slot;

pub use frame::*;
pub use reader::{Parsed, ReadBuffer};
