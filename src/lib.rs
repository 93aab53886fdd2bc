//! acgi-bridge: lets asynchronous servers call synchronous code through pools of long-lived
//! worker processes, handing requests over in shared-memory slots.
//!
//! What callers and workers need lives in small crates of its own, which this crate re-exports
//! under the names the daemon has always used:
//!
//! - [`proto`] = `acgi-proto` (std only): the wire format (frame header, kinds, error codes),
//!   the slot ABI and its validated accessors, and `ReadBuffer`, the one frame reader.
//! - [`client`] = `acgi-client`: the caller SDK (blocking, and async with tokio).
//! - [`worker`] = `acgi-worker`: the worker SDK (`serve(|request| reply)`).
//!
//! The daemon itself:
//!
//! - [`shm`]: the bridge's slots: creating each worker's memfd and mapping it (the layout and
//!   accessors are `proto::slot`'s, re-exported).
//! - [`config`]: the daemon's configuration and its validation.
//! - [`confine`]: the worker boundary: the bridge's own hardening, workers' identities and
//!   executables, and the reaper of their escaped descendants (docs/security.md).
//! - `engine` and `pool`: the daemon itself (one io_uring event loop per core).
//! - [`cgroup`]: cgroup v2 per service and per worker, where the bridge has a delegated subtree.
//! - [`sandbox`]: the optional per-service Landlock ruleset and seccomp filter.
//! - [`runtime_dir`]: where the bridge's sockets live by default (never a directory others
//!   may write).
//! - [`logging`]: log output that never blocks or ends the bridge.
//! - [`access_log`]: the optional access log, written by a thread of its own.
//! - [`cli`]: the binary's command line (clap), from which the man pages are generated.

pub use acgi_client as client;
pub use acgi_proto as proto;
pub use acgi_worker as worker;

pub mod access_log;
pub mod alloc_count;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod confine;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod runtime_dir;
pub mod sandbox;
pub mod shm;
pub mod status;
