//! What the process inherited at exec, taken once, at startup: descriptors named from outside
//! (systemd's `LISTEN_FDS`, an upgrading bridge's `--takeover-fd`) and the environment
//! variables that named them (removed, so that no worker inherits them).
//!
//! Both steps are sound only early: owning a descriptor by number is sound while nothing else
//! in the process owns that number, and removing an environment variable while no other thread
//! reads the environment. So each checks that the process still has one thread (the engine, the
//! log writer and every helper thread start later), and a number is adopted at most once. Both
//! are called from `serve` before `logging::init`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

/// Numbers adopted so far (a second adoption of one would make two owners).
static ADOPTED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Why an inherited descriptor or variable was not taken.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("taken too late: the process already runs {0} threads")]
    Threads(usize),
    #[error("{0} is not an open descriptor")]
    NotOpen(RawFd),
    #[error("descriptor {0} was taken already")]
    Taken(RawFd),
    #[error("reading the environment: {0}")]
    Environment(std::io::Error),
}

/// The threads of this process (its `/proc/self/task` entries).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |tasks| tasks.count())
}

fn one_thread() -> Result<(), InheritError> {
    match threads() {
        1 => Ok(()),
        n => Err(InheritError::Threads(n)),
    }
}

/// Own descriptor `raw`, which the process inherited open (0, 1 and 2 are stdio, never
/// adopted).
pub fn adopt(raw: RawFd) -> Result<OwnedFd, InheritError> {
    one_thread()?;
    // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
    if raw < 3 || unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(InheritError::NotOpen(raw));
    }
    let mut adopted = ADOPTED.lock().expect("not poisoned");
    if adopted.contains(&raw) {
        return Err(InheritError::Taken(raw));
    }
    adopted.push(raw);
    // SAFETY: `raw` is open, was never adopted before (above), and the process has one thread
    // and has not started the engine: it was inherited at exec, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What systemd passed: its descriptors, each with its number and name, and the watchdog
/// period; the variables that said so are removed from the environment.
pub struct FromSystemd {
    pub passed: Vec<(OwnedFd, RawFd, String)>,
    pub watchdog: Option<Duration>,
}

/// Take what systemd passed (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, `WATCHDOG_USEC`,
/// `WATCHDOG_PID`) and remove those variables. Nothing passed: empty.
pub fn take_systemd() -> Result<FromSystemd, InheritError> {
    one_thread()?;
    // SAFETY: removing variables races only with another thread reading the environment, and
    // the process has one thread (checked above).
    let watchdog = unsafe { sd_notify::watchdog_enabled_and_unset_env() };
    // SAFETY: as above.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(InheritError::Environment)?;
    let mut passed = Vec::new();
    for (raw, name) in fds {
        // (sd_notify returns 3 .. 3 + LISTEN_FDS when LISTEN_PID is this process; they are
        // already close-on-exec.)
        passed.push((adopt(raw)?, raw, name));
    }
    Ok(FromSystemd { passed, watchdog })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_taken_once_the_process_has_a_second_thread() {
        // Proves the soundness check: with a second thread alive, both steps refuse before
        // any number or variable is looked at.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let second = std::thread::spawn(move || wait.recv());
        assert!(threads() > 1);
        assert!(matches!(adopt(0), Err(InheritError::Threads(_))));
        assert!(matches!(take_systemd(), Err(InheritError::Threads(_))));
        release.send(()).expect("the thread waits");
        second.join().expect("the thread ends").expect("released");
    }
}
