//! Signalling a worker process: the one place the engine calls `kill(2)`, so that the
//! simulation (`sim`) can stand in for the kernel here too. A simulated worker has a pid above
//! anything the kernel hands out (`sim::PID_BASE` is over `PID_MAX_LIMIT`), and its signals
//! go to the simulation's record instead: a real `kill` of such a pid cannot happen.

/// Send `signal` to worker `pid` and to the process group it leads (spawn.rs makes every
/// worker a group leader, so its children go with it; the worker is signalled apart in case it
/// left its group). Contract: `pid` is a child this core spawned and has not reaped, so
/// neither the pid nor the group id can have been reused.
pub fn signal_worker(pid: i32, signal: i32) {
    #[cfg(test)]
    if super::sim::is_sim_pid(pid) {
        super::sim::record_signal(pid, signal);
        return;
    }
    debug_assert!(pid > 0, "signalling pid {pid}");
    // SAFETY: kill(2) with a pid we spawned and have not reaped yet, and with the group it
    // leads (whose id cannot be reused while the unreaped leader holds it): the contract above.
    unsafe {
        libc::kill(-pid, signal);
        libc::kill(pid, signal);
    }
}
