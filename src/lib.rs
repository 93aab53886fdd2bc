//! acgi-bridge: lets asynchronous servers call synchronous code through pools of long-lived
//! worker processes, handing requests over in shared-memory slots.
//!
//! - [`proto`]: the wire format (frame header, kinds, error codes), shared by everyone.
//! - [`shm`]: the slot layout and state machine shared by the bridge and its workers.
//! - [`client`]: the caller SDK (async with tokio, and blocking).
//! - [`worker`]: the worker SDK (`serve(|request| reply)`).
//! - [`config`]: the daemon's configuration and its validation.
//! - `engine` and `pool`: the daemon itself (one io_uring event loop per core).

pub use acgi_client as client;
pub use acgi_proto as proto;
pub use acgi_worker as worker;

pub mod alloc_count;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod pool;
pub mod shm;
pub mod status;
