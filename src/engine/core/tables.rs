//! The ring's registered-buffer and registered-file tables, and the locked-memory check.

use super::*;

impl Core {
    /// Register a new worker's slot in the ring's buffer table, when there is room and the
    /// memory-lock limit allows; without it, replies are copied instead of sent from the slot.
    pub(super) fn register_slot(&mut self, slot: &Slot) -> Option<u16> {
        let index = self.fixed_buffers_free.pop()?;
        // The worker entry that owns the slot clears this table entry (unregister_slot) before
        // it is dropped: the ring's contract for registered buffers.
        match self.ring.register_buffer(index, slot) {
            Ok(()) => Some(index),
            Err(error) => {
                self.fixed_buffers_free.push(index);
                if !self.fixed_buffer_warning_logged {
                    self.fixed_buffer_warning_logged = true;
                    tracing::warn!(
                        %error,
                        memlock_limit_bytes = memlock_limit(),
                        "cannot register a slot as an io_uring fixed buffer; its replies are copied \
                         instead (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK)"
                    );
                }
                None
            }
        }
    }

    /// Put a connection's or worker's socket in the ring's file table, if there is room; ops
    /// then name it by index.
    pub(super) fn register_file(&mut self, fd: std::os::fd::RawFd) -> Option<u32> {
        let slot = self.files_free.pop()?;
        match self.ring.register_file(slot, fd) {
            Ok(()) => Some(slot),
            Err(error) => {
                tracing::debug!(%error, "cannot register a descriptor with the ring");
                self.files_free.push(slot);
                None
            }
        }
    }

    /// Take a descriptor out of the file table (its ops have all completed).
    pub(super) fn unregister_file(&mut self, slot: u32) {
        match self.ring.unregister_file(slot) {
            Ok(()) => self.files_free.push(slot),
            Err(error) => tracing::error!(%error, "cannot unregister a descriptor"),
        }
    }

    pub(super) fn unregister_slot(&mut self, index: u16) {
        match self.ring.unregister_buffer(index) {
            Ok(()) => self.fixed_buffers_free.push(index),
            Err(error) => tracing::error!(%error, index, "cannot clear a fixed-buffer entry"),
        }
    }
}

/// How many entries the registered-buffer table gets for `workers` (this core's shards'
/// `max_workers`): twice as many, since a worker killed for a protocol violation leaves the pool
/// at once (so its replacement starts) but keeps its entry until reaped.
pub(super) fn buffer_table_entries(workers: u32) -> u32 {
    (workers * 2 + 8).min(FIXED_BUFFERS_MAX)
}

/// Registered buffers are charged to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. Say
/// at startup, with the numbers and the fix, when the configured pools cannot all be registered.
pub(crate) fn check_memlock(config: &Config, cores: usize) {
    let page = rustix::param::page_size() as u64;
    let needed: u64 = config
        .services
        .iter()
        .map(|s| {
            let slot = crate::shm::SLOT_HEADER_BYTES as u64 + s.slot_size_bytes as u64;
            s.max_workers as u64 * slot.div_ceil(page) * page
        })
        .sum::<u64>()
        + RING_BYTES * cores as u64;
    let limit = memlock_limit();
    if has_cap_ipc_lock() || needed <= limit {
        tracing::debug!(
            needed,
            limit,
            "every worker slot can be registered as a fixed buffer"
        );
        return;
    }
    tracing::warn!(
        needed_bytes = needed,
        memlock_limit_bytes = limit,
        "registering every worker slot as an io_uring fixed buffer needs {} KiB of locked memory \
         but RLIMIT_MEMLOCK is {} KiB (per user, shared with other processes) and the bridge \
         lacks CAP_IPC_LOCK: slots that do not fit are used unregistered and their replies are \
         copied. To fix: raise the limit (ulimit -l, systemd LimitMEMLOCK=), grant \
         CAP_IPC_LOCK, or lower max_workers or slot_size_bytes",
        needed / 1024,
        limit / 1024
    );
}

/// Whether this process has CAP_IPC_LOCK in its effective set (from /proc/self/status).
pub(super) fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
            u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// RLIMIT_MEMLOCK's soft limit in bytes (for messages).
pub(super) fn memlock_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX)
}
