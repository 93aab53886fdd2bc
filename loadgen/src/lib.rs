//! acgi-loadgen: drives load at an acgi-bridge through the client SDK, reports throughput,
//! latency percentiles and errors together with the machine it ran on, and plans capacity.
//!
//! ```text
//!   args ─┬─▶ closed_loop::Plan ──run──┐
//!         ├─▶ open_loop::Plan ───run───┼─▶ stats::Recorder ─▶ report::Report ─▶ text | JSON
//!         ├─▶ sweep (open loop, rising rates) ──────────────▶ sweep::SweepReport    + .hgrm
//!         └─▶ plan: sample service time ─▶ queueing (M/M/c) ─▶ open loop ─▶ PlanReport + SVG
//! ```
//!
//! - [`args`]: the command line (clap derive) and its validation.
//! - [`workload`]: the request mix, the time window, connecting and resolving services.
//! - [`closed_loop`]: N connections x D requests in flight, each task looping call -> record.
//! - [`open_loop`]: requests on a schedule (constant or Poisson) at a rate, measured from their
//!   intended send times (coordinated omission corrected), paced by [`timer`].
//! - [`sweep`]: open-loop steps at rising rates until the p99 SLO or errors break.
//! - [`plan`] and [`queueing`]: service-time sampling, M/M/c (Erlang C) sizing, verification.
//! - [`mix`]: weighted service and payload mixes, the seeded random numbers.
//! - [`payload`]: request bodies that carry their own identity, so a misdelivered reply is caught.
//! - [`stats`]: latency histograms (corrected, uncorrected, send lag), errors, mismatches.
//! - [`hgrm`] and [`svg`]: the percentile distribution file and hand-written charts.
//! - [`machine`]: CPU count, kernel release and CPU model, printed with every result.
//! - [`report`]: the summary (text or one JSON object) and the pass/fail verdict.
//!
//! The load generator never takes a lock per request: each task (closed loop) or the pacer (open
//! loop) owns its [`stats::Recorder`], merged once at the end.

#![forbid(unsafe_code)]

pub mod args;
pub mod batched;
pub mod closed_loop;
pub mod hgrm;
pub mod machine;
pub mod mix;
pub mod open_loop;
pub mod payload;
pub mod plain;
pub mod plan;
pub mod queueing;
pub mod report;
pub mod soak;
pub mod stats;
pub mod svg;
pub mod sweep;
pub mod timer;
pub mod workload;
