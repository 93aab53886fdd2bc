//! Reaping one worker through the ring, in the mode the startup probe chose
//! ([`super::probe::ReapMode`]):
//!
//! - `WaitId` (Linux 6.7+): one `IORING_OP_WAITID`, which completes with the exit status.
//! - `PidfdPoll` (the fallback, Linux 5.4+): the worker's pidfd (`pidfd_open(2)`, opened when
//!   the core takes the worker, while it is an unreaped child so its pid cannot have been
//!   reused) is polled on the ring (`IORING_OP_POLL_ADD`, readable once the process has exited);
//!   then `waitid(P_PIDFD, WNOHANG)` collects the status without blocking the core.
//!
//! When a wait has to be tried again (the kernel returned an error, or the pidfd polled
//! readable before the child was waitable, as when a tracer holds its exit), the next op is a
//! [`RETRY_DELAY`] timeout, so a wait that keeps failing costs a completion every 10 ms, never
//! a spinning core.
//!
//! [`Reap`] owns the memory its op names (the siginfo the kernel fills, the timeout's
//! timespec, both boxed so the worker's entry can move) and the pidfd; its owner, the worker,
//! keeps it until the op's completion (`Reap::in_flight`), as `op.rs`'s contracts require.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use io_uring::types::Timespec;

use super::probe::{reap_mode, ReapMode};
use super::{op, Errno, Sqe, Token};

/// How long a wait that must be tried again waits first.
pub const RETRY_DELAY: Duration = Duration::from_millis(10);

/// `P_PIDFD` (linux/wait.h), which the libc crate does not name.
const P_PIDFD: libc::idtype_t = 3;

/// What the kernel writes and reads, at a fixed address while an op is in flight.
struct Memory {
    info: libc::siginfo_t,
    delay: Timespec,
}

/// Which op is, or goes, in flight next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// The mode's own wait: `IORING_OP_WAITID`, or a poll on the pidfd.
    Wait,
    /// A [`RETRY_DELAY`] timeout before the next wait.
    Delay,
}

/// Where one worker's reaping stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No op in flight; this one goes next.
    Ready(Next),
    /// This op is in flight: the memory it names must stay.
    InFlight(Next),
    /// Reaped (or lost to someone else's wait): its pid is not ours any more.
    Done,
}

/// One worker's reaping.
pub struct Reap {
    memory: Box<Memory>,
    /// `Some` in `PidfdPoll` mode.
    pidfd: Option<OwnedFd>,
    phase: Phase,
}

/// What a wait's completion means.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaped {
    /// The worker is reaped; [`Reap::info`] holds its status.
    Exited,
    /// Not yet (or after a delay): arm again.
    Again,
    /// The wait failed with this error; arm again (after [`RETRY_DELAY`]).
    Failed(Errno),
    /// No such child any more (`ECHILD`): it is gone and its status with it.
    Lost,
}

impl Reap {
    /// Start reaping the unreaped child `pid` (in `PidfdPoll` mode, this opens its pidfd: it
    /// fails as `open` does, e.g. `EMFILE`).
    pub fn new(pid: i32) -> std::io::Result<Reap> {
        // A simulated worker has no process to open a pidfd of: the simulation completes its
        // `WaitId` when the model dies.
        #[cfg(test)]
        if super::sim::is_sim_pid(pid) {
            return Reap::with_mode(pid, ReapMode::WaitId);
        }
        Reap::with_mode(pid, reap_mode())
    }

    fn with_mode(pid: i32, mode: ReapMode) -> std::io::Result<Reap> {
        let pidfd = match mode {
            ReapMode::WaitId => None,
            ReapMode::PidfdPoll => {
                let pid = rustix::process::Pid::from_raw(pid)
                    .ok_or_else(|| std::io::Error::other("pid 0 has no pidfd"))?;
                Some(rustix::process::pidfd_open(
                    pid,
                    rustix::process::PidfdFlags::empty(),
                )?)
            }
        };
        Ok(Reap {
            memory: Box::new(Memory {
                // SAFETY: siginfo_t is plain data; all-zero is a valid value.
                info: unsafe { std::mem::zeroed() },
                delay: Timespec::from(RETRY_DELAY),
            }),
            pidfd,
            phase: Phase::Ready(Next::Wait),
        })
    }

    /// The op to submit for child `pid` now. Contract: `self` stays alive until that op's
    /// completion has been handed to [`Reap::complete`]; it is not armed again meanwhile (a
    /// second arm, or one after the reap, panics).
    pub fn arm(&mut self, pid: i32, token: Token) -> Sqe {
        let Phase::Ready(next) = self.phase else {
            panic!("arming the reap of {pid} in {:?}", self.phase);
        };
        self.phase = Phase::InFlight(next);
        match (next, &self.pidfd) {
            (Next::Delay, _) => op::timeout(&self.memory.delay, token),
            (Next::Wait, None) => op::waitid(pid, &mut self.memory.info, token),
            (Next::Wait, Some(pidfd)) => op::poll_exit(pidfd, token),
        }
    }

    /// The completion of the op [`Reap::arm`] returned.
    pub fn complete(&mut self, result: Result<u32, Errno>) -> Reaped {
        let Phase::InFlight(armed) = self.phase else {
            panic!("a reap completion in {:?}", self.phase);
        };
        let reaped = match (armed, &self.pidfd, result) {
            // The delay passed (ETIME), however it ended: wait again.
            (Next::Delay, _, _) => Reaped::Again,
            (Next::Wait, None, Ok(_)) => Reaped::Exited,
            (Next::Wait, _, Err(Errno::CHILD)) => Reaped::Lost,
            (Next::Wait, _, Err(errno)) => Reaped::Failed(errno),
            (Next::Wait, Some(pidfd), Ok(_)) => collect(pidfd, &mut self.memory.info),
        };
        self.phase = match reaped {
            Reaped::Exited | Reaped::Lost => Phase::Done,
            Reaped::Failed(_) => Phase::Ready(Next::Delay),
            Reaped::Again if armed == Next::Wait => Phase::Ready(Next::Delay),
            Reaped::Again => Phase::Ready(Next::Wait),
        };
        reaped
    }

    /// Its op is in flight (its owner must keep it).
    pub fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::InFlight(_))
    }

    /// The child is reaped (or lost): its pid may be another process's by now, never to be
    /// signalled.
    pub fn is_reaped(&self) -> bool {
        self.phase == Phase::Done
    }

    /// How the worker ended, once [`Reaped::Exited`].
    pub fn exit(&self) -> Exit {
        Exit::of(&self.memory.info)
    }
}

/// How a reaped child ended (its `siginfo_t` read once, here, rather than by each reader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit(status)`.
    Exited(i32),
    /// A signal ended it.
    Killed { signal: i32, core_dumped: bool },
    /// Any other `si_code` (not one waitid gives for `WEXITED`), with its status.
    Other { code: i32, status: i32 },
}

impl Exit {
    fn of(info: &libc::siginfo_t) -> Exit {
        // SAFETY: waitid (or the simulation, as it does) filled `info` for a CLD_* event, for
        // which si_status is the member the kernel wrote.
        let status = unsafe { info.si_status() };
        match info.si_code {
            libc::CLD_EXITED => Exit::Exited(status),
            libc::CLD_KILLED => Exit::Killed {
                signal: status,
                core_dumped: false,
            },
            libc::CLD_DUMPED => Exit::Killed {
                signal: status,
                core_dumped: true,
            },
            code => Exit::Other { code, status },
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Exited(status) => write!(f, "exit status {status}"),
            Exit::Killed {
                signal,
                core_dumped: false,
            } => write!(f, "killed by signal {signal}"),
            Exit::Killed {
                signal,
                core_dumped: true,
            } => write!(f, "killed by signal {signal} (core dumped)"),
            Exit::Other { code, status } => write!(f, "ended (si_code {code}, status {status})"),
        }
    }
}

/// The pidfd polled readable: collect the status without blocking.
fn collect(pidfd: &OwnedFd, info: &mut libc::siginfo_t) -> Reaped {
    // SAFETY: siginfo_t is plain data; zeroed so that "nothing to collect" reads as si_pid 0.
    *info = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) on a pidfd we own, writing into `info`, which we borrow mutably.
    let status = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if status != 0 {
        let raw = std::io::Error::last_os_error().raw_os_error();
        let errno = Errno::from_raw_os_error(raw.unwrap_or(libc::EIO));
        return match errno {
            Errno::CHILD => Reaped::Lost,
            errno => Reaped::Failed(errno),
        };
    }
    // SAFETY: waitid filled `info` (or left it zeroed); si_pid reads the union's pid field.
    match unsafe { info.si_pid() } {
        0 => Reaped::Again,
        _ => Reaped::Exited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arm `reap` (the op is built, not submitted) so that a completion can be handed to it.
    fn armed(reap: &mut Reap, pid: i32) -> &mut Reap {
        let _ = reap.arm(pid, Token::new(super::super::OpKind::WorkerWait, 0, 0));
        reap
    }

    fn child(exit_code: &str) -> std::process::Child {
        std::process::Command::new("sh")
            .args(["-c", &format!("exit {exit_code}")])
            .spawn()
            .expect("spawn sh")
    }

    #[test]
    fn a_pidfd_reap_collects_the_exit_status() {
        // Proves the fallback's collection: after the child exits, waitid(P_PIDFD) fills the
        // status (the ring's poll is stood in for by a blocking wait for readability).
        let child = child("7");
        let pid = child.id() as i32;
        let mut reap = Reap::with_mode(pid, ReapMode::PidfdPoll).unwrap();
        let mut fds = [libc::pollfd {
            fd: reap.pidfd.as_ref().unwrap().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on one pollfd we own.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) }, 1);
        let completed = armed(&mut reap, pid).complete(Ok(libc::POLLIN as u32));
        assert_eq!(completed, Reaped::Exited);
        assert_eq!(reap.exit(), Exit::Exited(7));
        // SAFETY: filled by waitid for a CLD_EXITED event.
        assert_eq!(unsafe { reap.memory.info.si_pid() }, pid);
        assert!(reap.is_reaped() && !reap.in_flight());
        // Reaped: a collection now would find no such child.
        let pidfd = reap.pidfd.as_ref().unwrap();
        assert_eq!(collect(pidfd, &mut reap.memory.info), Reaped::Lost);
        drop(child);
    }

    #[test]
    fn a_wait_that_must_be_retried_waits_first() {
        // Proves the back-off: after a failed or premature wait the next op is the delay, and
        // after the delay the wait again.
        let mut reap = Reap::with_mode(1, ReapMode::WaitId).unwrap();
        assert_eq!(reap.phase, Phase::Ready(Next::Wait));
        assert!(armed(&mut reap, 1).in_flight());
        assert_eq!(reap.complete(Err(Errno::INTR)), Reaped::Failed(Errno::INTR));
        assert_eq!(reap.phase, Phase::Ready(Next::Delay));
        let completed = armed(&mut reap, 1).complete(Err(Errno::TIME));
        assert_eq!(completed, Reaped::Again);
        assert_eq!(reap.phase, Phase::Ready(Next::Wait));
        assert_eq!(armed(&mut reap, 1).complete(Ok(0)), Reaped::Exited);
        assert_eq!(reap.phase, Phase::Done);
    }

    #[test]
    #[should_panic(expected = "arming the reap of 1 in Done")]
    fn a_reaped_child_is_never_waited_for_again() {
        // Proves the phase guards the pid: once reaped it may be another process's, and
        // arming a wait for it panics instead of waiting on (or signalling) a stranger.
        let mut reap = Reap::with_mode(1, ReapMode::WaitId).unwrap();
        assert_eq!(armed(&mut reap, 1).complete(Ok(0)), Reaped::Exited);
        armed(&mut reap, 1);
    }

    #[test]
    fn a_pidfd_polled_before_the_child_is_waitable_is_tried_again_later() {
        // Proves the premature case: a live child's pidfd collects nothing, and the next op
        // is the delay (not an immediate re-poll that would spin).
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let mut reap = Reap::with_mode(sleeper.id() as i32, ReapMode::PidfdPoll).unwrap();
        let pid = sleeper.id() as i32;
        assert_eq!(armed(&mut reap, pid).complete(Ok(0)), Reaped::Again);
        assert_eq!(reap.phase, Phase::Ready(Next::Delay));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
