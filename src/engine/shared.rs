//! What the cores share: each core's inbox, the placement counts each core publishes per
//! service, and the process-wide shutdown state.
//!
//! Nothing here is on a core's own data path: a core touches another core's state only to
//! forward a request, hand over a connection or answer a forwarded request; the control thread
//! (`super::control`) posts stop messages, report requests and the operator's commands
//! (`AdminCommand`), which carry their own reply channel.
//!
//! Inbox: a `Mutex<Vec<Msg>>` per core, woken through the receiving core's ring (an eventfd it
//! always has a read armed on). Wake-ups are coalesced: a sender writes the eventfd only when
//! `wake_pending` was clear, and the receiver clears it before draining, so a message pushed
//! at any moment is either in the drained batch or triggers a new wake-up. The receiver swaps
//! the whole vector out, so neither side allocates once the vectors have grown. The queue is
//! bounded by what feeds it: forwards need a claimed idle worker or start slot, connections
//! are bounded by `connections_max`, answers by forwards, report requests by the control
//! thread, which waits for each gathering to end (or give up after a second) before it starts
//! another.
//!
//! Placement counts (`ShardCounts`): each core stores its shard's idle workers, room to start
//! workers and backlog length at the end of every loop turn (only when they changed, to keep
//! the cache line quiet). Another core *claims* an idle worker or a start slot by decrementing
//! the count before forwarding; the owner's next store overwrites claims with the truth. A
//! claim that races with the owner's own use lands the request in the owner's backlog, which
//! rebalances again as soon as any core has an idle worker.
//!
//! Shutdown without losing a forwarded request: a core increments `forwards_in_flight` *before*
//! it checks `shutdown` (and backs out if set); the control thread sets `shutdown` before
//! telling any core; a core is finished only once `forwards_in_flight` is 0. With sequentially
//! consistent operations on both, either the forwarding core sees the flag, or the finishing
//! core sees the count.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::admission::{Admission, Ticket};
use super::index::{CoreIndex, IndexVec, ServiceSlot};
use super::report::CoreReport;
use crate::config::Config;

/// Where a core sends the report it was asked for.
pub type ReportReply = mpsc::Sender<Box<CoreReport>>;

/// An operator's command for every core (`acgi-bridge pause`, ...): the control thread sends
/// it (`control::admin`), each core carries it out on its shard (`core::admin`) and answers.
#[derive(Clone)]
/// (`service` is the service's id: each core finds its live slot.)
pub enum AdminCommand {
    Pause {
        service: u32,
    },
    Resume {
        service: u32,
    },
    Drain {
        service: u32,
    },
    Recycle {
        service: u32,
    },
    KillWorker {
        pid: i32,
    },
    /// New live limits: the config with the service's new keys, validated; each core takes its
    /// shard of them (`Policy::shard`).
    SetLimits {
        service: u32,
        config: std::sync::Arc<crate::config::Config>,
    },
}

/// What one core did with an [`AdminCommand`] (`Err`: why it could not, in a sentence).
pub type AdminOutcome = Result<AdminDone, String>;

/// Where a core sends its outcome: its index, and the outcome.
pub type AdminReply = mpsc::Sender<(CoreIndex, AdminOutcome)>;

/// One core's part of a command that worked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminDone {
    /// The service's shard took it (pause, resume, drain, set): its intake before, and what
    /// it holds now.
    Service {
        before: crate::pool::Intake,
        busy: u32,
        waiting: u32,
        workers: u32,
    },
    /// The shard began a rolling restart of this many workers.
    Recycling { workers: u32 },
    /// This core had the worker and killed it; it held this many requests. (The service by
    /// id: a core's slot numbers are not the config's indices once a reload has run.)
    Killed { service_id: u32, requests: u32 },
    /// This core has no worker with that pid.
    NoSuchWorker,
}

/// A message from one core to another.
pub enum Msg {
    /// Run this request on your shard of the service and send the answer back.
    Forward(Forward),
    /// The whole answer frame (Reply or Error) to a request you forwarded.
    Answer { request: u64, frame: Vec<u8> },
    /// A caller connection accepted elsewhere; it is already counted in your `callers` and
    /// admitted (its ticket goes back to `Shared::admission` when it closes).
    Connection { fd: OwnedFd, ticket: Ticket },
    /// Stop gracefully (`now: false`) or give up waiting (`now: true`, a second signal).
    Shutdown { now: bool },
    /// A new bridge has taken over the listeners (binary upgrade): stop gracefully as for
    /// `Shutdown`, and close each caller connection with the drain notice once it has nothing
    /// in flight (docs/protocol.md §2.6).
    Drain,
    /// The control thread wants your report (for status, metrics or the end of a latency
    /// interval: then start a new interval first); send it on `reply`.
    Report {
        end_interval: bool,
        reply: ReportReply,
    },
    /// A configuration reload's step (see `core::reload`).
    Reload(ReloadStep),
    /// An operator's command: carry it out on your shard and answer on `reply` at once.
    Admin {
        command: AdminCommand,
        reply: AdminReply,
    },
    /// Nothing to handle: look at the shared counts again (an idle worker appeared, or every
    /// core has finished).
    Wake,
}

/// Where a core answers a reload step: its index and whether the step succeeded there.
pub type ReloadReply = mpsc::Sender<(CoreIndex, Result<(), String>)>;

/// The steps of a reload, sent to every core by the control thread: prepare everywhere, then
/// commit everywhere (or abort everywhere), so that every core runs the same services.
pub enum ReloadStep {
    /// Start pools in these new slots, not yet serving, and answer once their workers are up
    /// (or they cannot start).
    Prepare {
        plan: Arc<CorePlan>,
        reply: ReloadReply,
    },
    /// Route the services to the prepared slots, retire the slots `plan.retire` names, and run
    /// the new config; answer once done.
    Commit { reply: ReloadReply },
    /// Give the prepared slots up (they drain and stop); the running config stays.
    Abort,
}

/// What one reload asks of each core.
pub struct CorePlan {
    /// The config the cores run once committed (keys that need a restart at their running
    /// values: `config::reload::effective`).
    pub config: Arc<Config>,
    /// New slots to start: (slot, index of its service in `config`), slots in increasing order
    /// from the first unused one.
    pub start: Vec<(ServiceSlot, usize)>,
    /// Slots to retire at commit (replaced or removed services).
    pub retire: Vec<ServiceSlot>,
    /// Services whose workers stay: (slot, index in `config`).
    pub keep: Vec<(ServiceSlot, usize)>,
    /// Services whose workers stay and whose pool takes new limits: (slot, index in `config`).
    pub limits: Vec<(ServiceSlot, usize)>,
}

/// A request moved to another core (its payload with it).
pub struct Forward {
    pub from: CoreIndex,
    /// The request's handle on the core it came from.
    pub request: u64,
    pub caller_request_id: u64,
    pub service: ServiceSlot,
    pub payload: Vec<u8>,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Who called (for the access and slow logs of the core that runs it).
    pub caller: Option<crate::access_log::CallerAddr>,
}

/// One core's published counts for one service.
#[derive(Default)]
pub struct ShardCounts {
    pub idle: AtomicU32,
    pub room: AtomicU32,
    pub backlog: AtomicU32,
    /// The shard's max_workers (stored by its core when `acgi-bridge set` changes it): 0 means
    /// this core does not run the service now.
    pub max_workers: AtomicU32,
}

/// Service slots each core has room for: every service of the config the bridge started with,
/// plus one for each service a reload started or replaced since (a replaced service keeps its
/// old slot while it drains). A reload that would need more is refused: restart the bridge
/// (`acgi-bridge upgrade` does it without a failed request).
pub const SERVICE_SLOTS_MAX: usize = 1024;

pub struct CoreShared {
    pub inbox: Mutex<Vec<Msg>>,
    pub wake_pending: AtomicBool,
    /// Written to wake the core; the core keeps a read armed on it.
    pub wake: OwnedFd,
    /// Caller connections the core holds (or has been handed and not yet registered).
    pub callers: AtomicU32,
    pub services: IndexVec<ServiceSlot, ShardCounts>,
}

pub struct Shared {
    pub cores: IndexVec<CoreIndex, CoreShared>,
    pub shutdown: AtomicBool,
    pub forwards_in_flight: AtomicU64,
    /// Cores whose work is done; all exit when it reaches the core count.
    pub cores_finished: AtomicUsize,
    /// Caller connections over all cores, against connections_max, the Unix reserve and the
    /// per-peer limits.
    pub admission: Admission,
}

impl Shared {
    /// `shard_max[core][service]`: each core's share of each service's max_workers.
    pub fn new(shard_max: &[Vec<u32>], admission: Admission) -> std::io::Result<Shared> {
        let mut cores = IndexVec::new();
        for maxes in shard_max {
            cores.push(CoreShared {
                inbox: Mutex::new(Vec::with_capacity(256)),
                wake_pending: AtomicBool::new(false),
                wake: rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )?,
                callers: AtomicU32::new(0),
                services: (0..SERVICE_SLOTS_MAX.max(maxes.len()))
                    .map(|slot| ShardCounts {
                        max_workers: AtomicU32::new(maxes.get(slot).copied().unwrap_or(0)),
                        ..ShardCounts::default()
                    })
                    .collect(),
            });
        }
        Ok(Shared {
            cores,
            shutdown: AtomicBool::new(false),
            forwards_in_flight: AtomicU64::new(0),
            cores_finished: AtomicUsize::new(0),
            admission,
        })
    }

    /// Put a message in core `to`'s inbox. Returns true when the caller must wake that core
    /// (write its eventfd); false when a wake-up is already on its way.
    #[must_use]
    pub fn post(&self, to: CoreIndex, msg: Msg) -> bool {
        let core = &self.cores[to];
        core.inbox.lock().expect("not poisoned").push(msg);
        !core.wake_pending.swap(true, Ordering::SeqCst)
    }

    /// Post a message and wake core `to` at once (a write to its eventfd): for a thread that has
    /// no ring to carry the wake-up, the control thread.
    pub fn send(&self, to: CoreIndex, msg: Msg) {
        if self.post(to, msg) {
            // An eventfd adds the 8-byte native-endian count written to it. It is non-blocking
            // and only fails when the count would overflow, when a wake-up is pending anyway.
            let _ = rustix::io::write(&self.cores[to].wake, &1u64.to_ne_bytes());
        }
    }

    /// Whether every core has finished (and none answers messages any more).
    pub fn all_cores_finished(&self) -> bool {
        self.cores_finished.load(Ordering::SeqCst) == self.cores.len()
    }

    /// Take everything in core `me`'s inbox, swapping in `batch` (empty, with capacity).
    pub fn drain(&self, me: CoreIndex, batch: &mut Vec<Msg>) {
        let core = &self.cores[me];
        core.wake_pending.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *core.inbox.lock().expect("not poisoned"), batch);
    }

    /// Whether core `me`'s inbox is empty.
    pub fn inbox_empty(&self, me: CoreIndex) -> bool {
        self.cores[me]
            .inbox
            .lock()
            .expect("not poisoned")
            .is_empty()
    }

    /// Caller connections open on all cores.
    pub fn callers_total(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.callers.load(Ordering::Relaxed) as u64)
            .sum()
    }
}

/// Take one unit of a published count if there is one.
pub fn claim(count: &AtomicU32) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Store a published count if it changed; returns the previous value.
pub fn publish(count: &AtomicU32, value: u32) -> u32 {
    let previous = count.load(Ordering::Relaxed);
    if previous != value {
        count.store(value, Ordering::Release);
    }
    previous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_takes_one_unit_and_never_goes_below_zero() {
        let count = AtomicU32::new(2);
        assert!(claim(&count));
        assert!(claim(&count));
        assert!(!claim(&count));
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn posting_asks_for_one_wake_until_the_inbox_is_drained() {
        // Proves wake-ups coalesce: only the first post after a drain asks for one, and a drain
        // takes every message posted before it.
        let limits = super::super::admission::Limits {
            total: 1,
            tcp: 1,
            per_uid: 1,
            per_ip: 1,
        };
        let admission = Admission::new(limits, super::super::admission::Access::default());
        let shared = Shared::new(&[vec![1], vec![1]], admission).expect("eventfds");
        assert!(shared.post(CoreIndex::new(1), Msg::Wake));
        assert!(!shared.post(CoreIndex::new(1), Msg::Wake));
        let mut batch = Vec::new();
        shared.drain(CoreIndex::new(1), &mut batch);
        assert_eq!(batch.len(), 2);
        assert!(shared.inbox_empty(CoreIndex::new(1)));
        assert!(
            shared.post(CoreIndex::new(1), Msg::Wake),
            "a post after a drain wakes again"
        );
        assert!(shared.inbox_empty(CoreIndex::new(0)));
    }
}
