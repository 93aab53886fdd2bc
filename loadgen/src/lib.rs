//! acgi-loadgen: drives load at an acgi-bridge through the client SDK and reports throughput,
//! latency percentiles and errors, together with the machine it ran on.
//!
//! The crate is split so that new load shapes slot in beside the existing one:
//!
//! ```text
//!   args ──▶ closed_loop::Plan ──run──▶ stats::Recorder ──▶ report::Report ──▶ text | JSON
//!              (later: open_loop,         (per task, merged     (+ machine, parameters,
//!               sweep, plan files)         once at the end)       verdict)
//! ```
//!
//! - [`args`]: the command line (clap derive) and its validation.
//! - [`closed_loop`]: N connections x D requests in flight, each task looping call -> record.
//! - [`payload`]: request bodies that carry their own identity, so a misdelivered reply is caught.
//! - [`stats`]: per-task latency histograms, error counts by code, verification mismatches.
//! - [`machine`]: CPU count, kernel release and CPU model, printed with every result.
//! - [`report`]: the summary (text or one JSON object) and the pass/fail verdict.
//!
//! The load generator never takes a lock per request: each task owns its [`stats::Recorder`] and
//! hands it back when it ends.

#![forbid(unsafe_code)]

pub mod args;
pub mod closed_loop;
pub mod machine;
pub mod payload;
pub mod report;
pub mod stats;
