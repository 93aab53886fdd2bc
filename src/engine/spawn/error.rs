//! Why a worker could not be started: one typed error per way a spawn fails, with the message
//! the log and `status` show and a stable label for
//! `acgi_bridge_spawn_failures_total{service,reason}`. A spawn failure is the bridge's (its
//! resources, its config) or the worker's setup before exec (a step in `child::STEPS`); a
//! worker that exec'd and then did not finish its handshake is a failed start instead
//! (`acgi_bridge_worker_exits_total{reason="failed_start"}`).

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::child::STEPS;

#[derive(Debug)]
pub enum SpawnError {
    /// The bridge ran out of something a worker needs: its slot (memfd), socket pair, pipes,
    /// `/dev/null`, or the process itself (fork or clone).
    Resources {
        what: &'static str,
        error: io::Error,
    },
    /// A value of the service's config cannot be handed to a process (a NUL byte in an
    /// argument or the environment), or its executable was not opened at config load.
    Config(String),
    /// Its cgroup could not be made, or the child could not join it.
    Cgroup(String),
    /// A step of the child's setup before exec failed (`child::STEPS`), with the errno.
    Child {
        step: usize,
        error: io::Error,
        /// The executable it was to become.
        exec: PathBuf,
        /// What to look at, for the steps that have a usual cause.
        hint: String,
    },
}

impl SpawnError {
    /// Every label, in a fixed order (the index of each reason's counter).
    pub const LABELS: [&'static str; 8] = [
        "resources",
        "config",
        "cgroup",
        "limits",
        "identity",
        "filesystem",
        "sandbox",
        "exec",
    ];

    /// Its counter's index in [`SpawnError::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            SpawnError::Resources { .. } => 0,
            SpawnError::Config(_) => 1,
            SpawnError::Cgroup(_) => 2,
            SpawnError::Child { step, .. } => match STEPS.get(*step).copied() {
                Some("joining its cgroup") => 2,
                Some("setrlimit") => 3,
                Some("setgroups" | "setresgid" | "setresuid") => 4,
                Some("chdir" | "chroot") => 5,
                Some("PR_SET_NO_NEW_PRIVS" | "landlock_restrict_self" | "seccomp") => 6,
                // execveat, and the steps before any of the service's settings apply
                // (setpgid, the parent-death signal, moving descriptors): the process
                // could not become the worker.
                _ => 7,
            },
        }
    }

    /// Its label (`acgi_bridge_spawn_failures_total{reason}`).
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The step of the child that failed, by name.
    fn step_name(step: usize) -> &'static str {
        STEPS.get(step).copied().unwrap_or("setup")
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Resources { what, error } => write!(f, "{what} failed: {error}"),
            SpawnError::Config(message) | SpawnError::Cgroup(message) => f.write_str(message),
            SpawnError::Child {
                step,
                error,
                exec,
                hint,
            } => write!(
                f,
                "cannot start worker {}: {}: {error}{hint}",
                exec.display(),
                Self::step_name(*step)
            ),
        }
    }
}

impl std::error::Error for SpawnError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_child_step_has_a_label_and_labels_are_distinct() {
        for step in 0..STEPS.len() + 1 {
            let error = SpawnError::Child {
                step,
                error: io::Error::from_raw_os_error(libc::EPERM),
                exec: PathBuf::from("/bin/true"),
                hint: String::new(),
            };
            assert!(error.index() < SpawnError::LABELS.len());
        }
        let mut labels = SpawnError::LABELS.to_vec();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), SpawnError::LABELS.len());
        let setuid = STEPS
            .iter()
            .position(|s| *s == "setresuid")
            .expect("a step");
        let error = SpawnError::Child {
            step: setuid,
            error: io::Error::from_raw_os_error(libc::EPERM),
            exec: PathBuf::from("/bin/true"),
            hint: " (a hint)".into(),
        };
        assert_eq!(error.label(), "identity");
        assert!(
            error
                .to_string()
                .starts_with("cannot start worker /bin/true: setresuid: "),
            "{error}"
        );
        assert!(error.to_string().ends_with(" (a hint)"), "{error}");
    }
}
