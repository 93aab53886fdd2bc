//! Every bound of a core, in one place, with the relations between them checked when the
//! crate compiles. (The config's bounds, those an operator sets, are `crate::config`'s, each
//! with its default in docs/configuration.md; these are the engine's own. Other rooms keep
//! theirs beside the code they bound: the control thread's client budgets in `control/`, the
//! TLS threads' in `tls/`, the ring's retry bound and provided-buffer size in `io/`, the
//! table index width in `table.rs`.)

use std::time::Duration;

use crate::engine::io::PROVIDED_BUFFER_BYTES;
use crate::engine::table::INDEX_MAX;

/// Base read-buffer size of a caller connection.
pub(super) const CONN_READ_BYTES: usize = 2 * 1024;
/// Base read-buffer size of a worker's control socket.
pub(super) const WORKER_READ_BYTES: usize = 4 * 1024;
/// Read size for worker stdout/stderr; also the longest log line kept.
pub(super) const PIPE_READ_BYTES: usize = 4096;
/// Completions handled per loop turn at most before submitting again.
pub(super) const COMPLETIONS_BATCH_MAX: usize = 1024;
/// Submission and completion queue sizes, and about what the rings take in locked memory
/// (64-byte SQEs, 16-byte CQEs, the 4-byte SQ index array).
pub(super) const SQ_ENTRIES: u32 = 2048;
pub(super) const CQ_ENTRIES: u32 = 8192;
pub(super) const RING_BYTES: u64 = SQ_ENTRIES as u64 * (64 + 4) + CQ_ENTRIES as u64 * 16;
/// In-slot replies at least this long are sent straight from the slot (a registered buffer)
/// when the caller's write queue is empty, instead of being copied into it.
pub(super) const SLOT_SEND_BYTES_MIN: u32 = 4096;
/// Most entries of the ring's registered-buffer table (the kernel's limit).
pub(super) const FIXED_BUFFERS_MAX: u32 = 1 << 14;
/// After the shutdown timeout, how long the answers it produced may take to reach their callers.
pub(super) const SHUTDOWN_FLUSH_GRACE: Duration = Duration::from_secs(1);
/// Request payloads at least this long are read from the caller's socket straight into an
/// idle worker's slot (when one is idle and the payload fits), not copied through the bridge.
pub(super) const DIRECT_READ_BYTES_MIN: u32 = 4096;
/// While a large payload is arriving (more of it in the socket at each poll, as when the
/// caller is in the middle of writing it), polls for the rest at most this many times before
/// reading what came the ordinary way.
pub(super) const AWAIT_PAYLOAD_POLLS_MAX: u32 = 64;
/// A caller whose payload has not all arrived this long after a direct read began (holding a
/// worker) is disconnected.
pub(super) const DIRECT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `Ping` payload (a `Pong` echoes it): beyond, error 2 and the payload is skipped.
pub(super) const PING_PAYLOAD_BYTES_MAX: u32 = 4096;
/// Longest `Resolve` name (service names are 1-64 bytes): beyond, error 3 with a fixed message.
pub(super) const RESOLVE_NAME_BYTES_MAX: u32 = crate::config::SERVICE_NAME_BYTES_MAX as u32;
/// How often the caller connections are swept for frame and idle timeouts (the timeouts are
/// enforced to within this).
pub(super) const CALLER_SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Idle connections' read buffers kept for reuse at most.
pub(super) const READ_SPARES_MAX: usize = 4096;
/// Delay before re-arming an accept that failed (e.g. out of descriptors).
pub(super) const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// A core logs refused connections at most this often (each is counted).
pub(super) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

// The relations the code relies on.
// A turn drains at most one batch; the CQ must hold a whole batch (and the kernel wants it
// at least as large as the SQ, both powers of two).
const _: () = assert!(COMPLETIONS_BATCH_MAX <= CQ_ENTRIES as usize);
const _: () = assert!(SQ_ENTRIES.is_power_of_two() && CQ_ENTRIES.is_power_of_two());
const _: () = assert!(SQ_ENTRIES <= CQ_ENTRIES);
// A registered buffer is named by a 16-bit index in the SQE.
const _: () = assert!(FIXED_BUFFERS_MAX <= u16::MAX as u32 + 1);
// Every table index fits the token's 24 bits; the registered-file table is indexed by
// worker, so it cannot outgrow the worker table's index either.
const _: () = assert!(FIXED_BUFFERS_MAX <= INDEX_MAX);
// A direct read saves a copy only of a payload larger than an ordinary read of the
// connection (or of one provided buffer) would take at once.
const _: () = assert!(DIRECT_READ_BYTES_MIN as usize > CONN_READ_BYTES);
const _: () = assert!(DIRECT_READ_BYTES_MIN as usize >= PROVIDED_BUFFER_BYTES);
