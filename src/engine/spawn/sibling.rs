//! A sibling process: a program started beside the bridge rather than under it, for the binary
//! upgrade (`engine::upgrade`, whose module doc says why `CLONE_PARENT`). The clone is the
//! spawner's (`CLONE_VM | CLONE_VFORK`, on a stack of its own, every signal blocked around it):
//! the child makes only system calls on values built before it, until `execve`.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use super::child::{block_every_signal, restore_signal_mask, ChildStack};

/// What the sibling runs: `execve(path, argv, envp)`, inheriting `inherit` (cleared of
/// close-on-exec in the child only) and starting with `nofile` as its descriptor limit.
pub(crate) struct SiblingExec {
    pub(crate) path: CString,
    /// argv\[0\] included.
    pub(crate) argv: Vec<CString>,
    /// `KEY=VALUE` entries.
    pub(crate) envp: Vec<CString>,
    pub(crate) inherit: RawFd,
    pub(crate) nofile: libc::rlimit,
}

/// Why a sibling did not start.
#[derive(Debug)]
pub(crate) enum SiblingError {
    /// The clone itself failed (or its stack could not be mapped).
    Setup(std::io::Error),
    /// The child's `execve` failed with this error.
    Exec(std::io::Error),
}

/// What the clone child reads, built before it exists (it allocates nothing).
struct ChildArgs<'a> {
    exec: &'a SiblingExec,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// Written by the child when its `execve` failed.
    exec_errno: AtomicI32,
}

/// Start `exec` as this process's sibling: its pid and a pidfd for it, once it has exec'd.
pub(crate) fn spawn_sibling(exec: &SiblingExec) -> Result<(i32, OwnedFd), SiblingError> {
    let pointers = |strings: &[CString]| {
        let mut pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        pointers
    };
    let args = ChildArgs {
        exec,
        argv: pointers(&exec.argv),
        envp: pointers(&exec.envp),
        exec_errno: AtomicI32::new(0),
    };
    let stack = ChildStack::new().map_err(SiblingError::Setup)?;
    let mut pidfd: libc::c_int = -1;
    // Every signal blocked around the clone (the raw call: glibc's wrapper leaves two open),
    // so that no handler of ours runs in the child on our memory; it clears its mask last.
    let old_mask = block_every_signal();
    // SAFETY: clone(CLONE_VM | CLONE_VFORK), as the spawner's: the child runs `child_entry`
    // on `stack`, a mapping of its own with a guard page, sharing our memory but not our
    // descriptor table nor signal handler table. This thread is suspended until the child
    // execs or exits, so `args` and the strings it points to (`exec`'s, borrowed for this
    // call) stay alive and unchanged for it; the child makes only system calls on them and
    // writes no memory of ours but its stack, `args.exec_errno` and this thread's errno.
    // CLONE_PARENT: its parent is ours; CLONE_PIDFD: the kernel writes a pidfd to `pidfd`.
    let pid = unsafe {
        libc::clone(
            child_entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::CLONE_PIDFD,
            std::ptr::from_ref(&args).cast_mut().cast(),
            std::ptr::from_mut(&mut pidfd),
        )
    };
    let clone_error = std::io::Error::last_os_error();
    restore_signal_mask(old_mask);
    if pid < 0 {
        return Err(SiblingError::Setup(clone_error));
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor for the child in `pidfd`,
    // which nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    match args.exec_errno.load(Ordering::SeqCst) {
        0 => Ok((pid, pidfd)),
        errno => Err(SiblingError::Exec(std::io::Error::from_raw_os_error(errno))),
    }
}

/// The entry point of the clone child: `arg` is a `&ChildArgs`.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn_sibling`, alive until we exec or exit (the
    // parent thread is suspended meanwhile); only system calls follow.
    unsafe {
        let args = &*arg.cast::<ChildArgs>();
        // The bridge ignores SIGPIPE, and an ignored signal stays ignored across exec.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setrlimit(libc::RLIMIT_NOFILE, &args.exec.nofile);
        // The one descriptor the sibling inherits on purpose.
        libc::fcntl(args.exec.inherit, libc::F_SETFD, 0);
        restore_signal_mask([0; 1]);
        libc::execve(
            args.exec.path.as_ptr(),
            args.argv.as_ptr(),
            args.envp.as_ptr(),
        );
        args.exec_errno
            .store(*libc::__errno_location(), Ordering::SeqCst);
        libc::_exit(127)
    }
}
