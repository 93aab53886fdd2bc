//! The child side of a spawn: what runs between clone (or fork) and exec, and the clone
//! machinery it needs (its stack, the signal mask around it).
//!
//! The child starts with every signal blocked (by the spawner, around the clone), so that no
//! handler of the bridge's runs in it, and makes only system calls, on values the spawner built
//! before, in this order:
//!
//! 1. its own process group (so the bridge can signal the worker's whole group, and a
//!    terminal's Ctrl-C reaches the bridge alone), then its own cgroup when the bridge places
//!    workers in cgroups (writing `0` to the `cgroup.procs` the spawner opened: `cgroup`);
//! 2. stdin `/dev/null`, stdout and stderr the bridge's pipes, the control socket on 3, the
//!    slot on 4, the executable on 5 (close-on-exec unless it is a `#!` script, whose
//!    interpreter opens it as /dev/fd/5), and every other descriptor closed (close_range);
//! 3. every signal's disposition reset to default (the bridge ignores SIGPIPE; that survives
//!    exec);
//! 4. rlimits (RLIMIT_NOFILE, RLIMIT_CORE, and RLIMIT_AS / RLIMIT_NPROC when configured), the
//!    umask, then `chroot` when the service sets one (while it may), then the identity
//!    (setgroups, setresgid, setresuid: raw system calls, which change only this one task, not
//!    the bridge's threads as glibc's setxid wrappers would), then
//!    PR_SET_DUMPABLE 0 (the change of ids set it to `fs.suid_dumpable`, on the bridge's memory
//!    too; exec resets it, so the worker re-applies it from `ACGI_DUMPABLE`: protocol §6.1),
//!    then the parent-death signal SIGKILL (a change of effective ids clears it, so it comes
//!    after them), then the working directory (as the user; in a chroot, `/` by default, so
//!    that no working directory is left outside the root);
//! 5. PR_SET_NO_NEW_PRIVS 1;
//! 6. the signal mask cleared (exec keeps it; the bridge blocks its handled signals), last;
//! 7. execveat(5, "", argv, envp, AT_EMPTY_PATH): the file checked at config load, whatever
//!    now lies at its path.

/// The steps of the child between fork and exec, named in the error a failed one reports.
pub(super) const STEPS: [&str; 16] = [
    "setpgid",
    "PR_SET_PDEATHSIG",
    "the bridge exited during spawn",
    "moving descriptors",
    "close_range",
    "setrlimit",
    "setgroups",
    "setresgid",
    "setresuid",
    "chdir",
    "PR_SET_NO_NEW_PRIVS",
    "execveat",
    "landlock_restrict_self",
    "seccomp",
    "joining its cgroup",
    "chroot",
];

/// One rlimit to set in the child: resource, soft, hard, and the config key it comes from.
pub(super) struct Limit {
    pub(super) resource: libc::__rlimit_resource_t,
    pub(super) value: libc::rlimit,
    pub(super) key: &'static str,
}

/// The stack a `clone(CLONE_VM)` child runs on, with a guard page below it: mapped once by the
/// spawner thread, used by one child at a time (the spawner is suspended while it runs).
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    /// Generous: the child's frames are a few hundred bytes of locals and libc wrappers.
    const LEN: usize = 256 << 10;
    const GUARD: usize = 4096;

    pub(super) fn new() -> std::io::Result<ChildStack> {
        let len = Self::LEN + Self::GUARD;
        // SAFETY: a fresh anonymous private mapping, then PROT_NONE on its lowest page; both
        // only touch this new mapping.
        unsafe {
            let base = rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::STACK,
            )?;
            rustix::mm::mprotect(base, Self::GUARD, rustix::mm::MprotectFlags::empty())?;
            Ok(ChildStack { base, len })
        }
    }

    /// The top of the stack (it grows down), 16-byte aligned (the mapping is page-aligned).
    pub(super) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is where a descending stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no child running on it (the spawner that owns
        // it is suspended while one does).
        unsafe {
            let _ = rustix::mm::munmap(self.base, self.len);
        }
    }
}

/// Block every signal of this thread (the raw call: glibc's wrapper leaves its own 32 and 33
/// open), around a clone whose child runs on our memory until it has reset every disposition;
/// returns the mask to put back with [`restore_signal_mask`] (read `errno` before: this is a
/// system call).
pub(super) fn block_every_signal() -> [u64; 1] {
    let mut old_mask = [0u64; 1];
    let all = [!0u64; 1];
    // SAFETY: rt_sigprocmask on this thread with valid 8-byte sets.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            all.as_ptr(),
            old_mask.as_mut_ptr(),
            8usize,
        )
    };
    old_mask
}

/// Put back the mask [`block_every_signal`] returned (`[0; 1]`: unblock every signal, which the
/// children do last before exec). Only a system call: safe in a clone child on our memory.
pub(super) fn restore_signal_mask(old_mask: [u64; 1]) {
    // SAFETY: rt_sigprocmask on this thread with a valid 8-byte set.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            old_mask.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
}

/// The descriptors the child arranges, as they are numbered in the parent.
pub(super) struct ChildFds {
    pub(super) stdin: i32,
    pub(super) stdout: i32,
    pub(super) stderr: i32,
    pub(super) control: i32,
    pub(super) slot: i32,
    pub(super) exec: i32,
    pub(super) report: i32,
}

/// What the child is given: pointers into the spawner's frame, valid until it execs or exits.
pub(super) struct ChildArgs<'a> {
    /// Its cgroup's `cgroup.procs`, opened for writing (-1: no cgroup).
    pub(super) cgroup_procs: i32,
    /// The Landlock ruleset to restrict itself with (-1: none).
    pub(super) landlock: i32,
    /// The seccomp program to install last before exec (null: none).
    pub(super) seccomp: *const libc::sock_fprog,
    pub(super) fds: &'a ChildFds,
    pub(super) parent_pid: i32,
    pub(super) script: bool,
    pub(super) limits: &'a [Limit],
    pub(super) umask: Option<u32>,
    pub(super) identity: Option<(u32, u32)>,
    pub(super) groups: &'a [libc::gid_t],
    /// The root to chroot into, before the identity (it needs CAP_SYS_CHROOT).
    pub(super) chroot: Option<&'a std::ffi::CStr>,
    pub(super) chdir: Option<&'a std::ffi::CStr>,
    pub(super) argv: *const *const libc::c_char,
    pub(super) envp: *const *const libc::c_char,
    pub(super) empty_path: *const libc::c_char,
}

/// The entry point of the `clone` child: `arg` is a `&ChildArgs`.
pub(super) extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of the suspended spawner (see `spawn`); this is the
    // child of clone(CLONE_VM | CLONE_VFORK), which `child_main` ends with exec or _exit.
    unsafe { child_main(&*arg.cast::<ChildArgs>()) }
}

/// The child: its setup and exec, or the failed step's report and `_exit`.
///
/// # Safety
///
/// Only in the child of a fork or of the spawner's clone.
pub(super) unsafe fn child_main(args: &ChildArgs) -> ! {
    // SAFETY: see `child_setup`; the report is written from this stack to a pipe.
    unsafe {
        let (step, errno) = child_setup(args);
        let report = [step, errno as u32];
        libc::write(args.fds.report, report.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

/// The child's steps before exec; returns (step, errno) of the one that failed.
///
/// # Safety
///
/// Only in the child of a fork or of the spawner's clone, which must end with `_exit` when
/// this returns. With CLONE_VM it shares the bridge's memory: it must only make system calls,
/// reading the values `args` points to, and write nothing but its own stack (and `errno`,
/// which is the suspended spawner thread's).
unsafe fn child_setup(args: &ChildArgs) -> (u32, i32) {
    let ChildArgs {
        cgroup_procs,
        landlock,
        seccomp,
        fds,
        parent_pid,
        script,
        limits,
        umask,
        identity,
        groups,
        chroot,
        chdir,
        argv,
        envp,
        empty_path,
    } = *args;
    // SAFETY: reads this thread's errno (the spawner's, with CLONE_VM: it is suspended).
    let errno = || unsafe { *libc::__errno_location() };
    // SAFETY (whole body): system calls on plain values and on descriptors this process owns;
    // the pointers are into the spawner frame's argv/envp/groups (its copy after fork, itself
    // after clone).
    unsafe {
        if libc::setpgid(0, 0) != 0 {
            return (0, errno());
        }
        // Into its cgroup before anything else it does ("0": the writer): no process it
        // starts can be outside it.
        if cgroup_procs >= 0 && libc::write(cgroup_procs, c"0".as_ptr().cast(), 1) != 1 {
            return (14, errno());
        }
        // Move every descriptor above the targets first, so that no dup2 clobbers a source.
        let sources = [
            fds.stdin,
            fds.stdout,
            fds.stderr,
            fds.control,
            fds.slot,
            fds.exec,
            fds.report,
        ];
        let mut moved = [0i32; 7];
        for (slot, &fd) in moved.iter_mut().zip(sources.iter()) {
            *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            if *slot < 0 {
                return (3, errno());
            }
        }
        // The Landlock ruleset too (it was opened at config load, often with a low number that
        // a dup2 below would replace).
        let landlock = if landlock >= 0 {
            let fd = libc::fcntl(landlock, libc::F_DUPFD_CLOEXEC, 10);
            if fd < 0 {
                return (3, errno());
            }
            fd
        } else {
            -1
        };
        // dup2 clears close-on-exec on 0-5; the report pipe goes to 6 and keeps it.
        for (target, &fd) in moved[..6].iter().enumerate() {
            if libc::dup2(fd, target as i32) < 0 {
                return (3, errno());
            }
        }
        if libc::dup3(moved[6], 6, libc::O_CLOEXEC) < 0 {
            return (3, errno());
        }
        if !script && libc::fcntl(5, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return (3, errno());
        }
        // The Landlock ruleset, while its descriptor is still open (close_range below closes
        // it; its copy is above 9). It needs
        // no_new_privs (or CAP_SYS_ADMIN, which the child may not have), which is harmless this
        // early: it only stops exec from gaining privileges.
        if landlock >= 0 {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
                return report_on(6, 10, errno());
            }
            if libc::syscall(crate::sandbox::SYS_LANDLOCK_RESTRICT_SELF, landlock, 0u32) != 0 {
                return report_on(6, 12, errno());
            }
        }
        // From here on the report pipe is 6 (its failure reports go there).
        if libc::close_range(7, libc::c_uint::MAX, 0) != 0 {
            return report_on(6, 4, errno());
        }
        // The raw system call, so that the C library's reserved signals (32, 33), which its
        // wrapper refuses, are reset too. All zeros is SIG_DFL, no flags, an empty mask.
        let action = [0u64; 4];
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    action.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        for limit in limits {
            if libc::setrlimit(limit.resource, &limit.value) != 0 {
                return report_on(6, 5, errno());
            }
        }
        if let Some(mask) = umask {
            libc::umask(mask as libc::mode_t);
        }
        if let Some(root) = chroot {
            if libc::chroot(root.as_ptr()) != 0 {
                return report_on(6, 15, errno());
            }
        }
        if let Some((uid, gid)) = identity {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return report_on(6, 6, errno());
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return report_on(6, 7, errno());
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return report_on(6, 8, errno());
            }
        }
        // At once after the identity, whose change set dumpability to `fs.suid_dumpable`.
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
        // After the identity: changing the effective ids (commit_creds) clears the
        // parent-death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return report_on(6, 1, errno());
        }
        if libc::getppid() != parent_pid {
            return report_on(6, 2, 0);
        }
        if let Some(dir) = chdir {
            if libc::chdir(dir.as_ptr()) != 0 {
                return report_on(6, 9, errno());
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
            return report_on(6, 10, errno());
        }
        // Last, the mask (exec keeps it): every signal was blocked since before the child
        // existed, and now has its default action, so none can run a handler of the bridge's.
        restore_signal_mask([0; 1]);
        // The seccomp filter last: nothing after it but exec (which it allows).
        if !seccomp.is_null()
            && libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                seccomp,
            ) != 0
        {
            return report_on(6, 13, errno());
        }
        libc::execveat(5, empty_path, argv.cast(), envp.cast(), libc::AT_EMPTY_PATH);
        report_on(6, 11, errno())
    }
}

/// Write a failed step's report on `fd` directly (used once the report pipe has moved); the
/// caller's write to the old number then fails harmlessly.
///
/// # Safety
///
/// Only in the child of a fork.
unsafe fn report_on(fd: i32, step: u32, errno: i32) -> (u32, i32) {
    let report = [step, errno as u32];
    // SAFETY: writing 8 bytes of a local array to a descriptor this process owns.
    unsafe { libc::write(fd, report.as_ptr().cast(), 8) };
    // SAFETY: _exit ends the child without running anything of the parent's.
    unsafe { libc::_exit(127) }
}
