//! The kernel floor, checked once at startup: every io_uring op, setup flag and feature the
//! engine relies on, probed on a small throwaway ring (`IORING_REGISTER_PROBE` for the ops, the
//! setup params for the features, and a ring built with the engine's own setup flags), so that
//! an old kernel fails the start with the missing piece and the kernel that has it
//! ("IORING_OP_RECV missing: Linux 5.6+") instead of failing ops later, one by one, under load.
//!
//! It also picks how workers are reaped ([`ReapMode`]): `IORING_OP_WAITID` (6.7) where the
//! kernel has it, else a pidfd polled on the ring (`super::reap`), so the bridge runs from
//! Linux 6.1 (Debian 12). The environment variable `ACGI_FORCE_REAP` (`pidfd` or `waitid`) is a
//! test and debugging knob that overrides the choice; it is logged when used.
//!
//! What is *optional* (the engine degrades, with a warning per core, and keeps serving) is not
//! failed here: the registered-file and registered-buffer tables and the provided-buffer ring
//! (all 5.19, registered per core by `Ring`), and `IORING_FEAT_FAST_POLL` (5.7: without it a
//! receive on an idle socket waits in an io-wq thread instead of a poll). Multishot accept
//! (5.19) and multishot receive (6.0) are flags of ops the probe cannot see; the kernel that
//! accepts `IORING_SETUP_DEFER_TASKRUN` (6.1) has both.
//!
//! Never does I/O on the engine's rings; the result is computed once ([`check_kernel`]) and
//! read by every core's ring and every worker's reap.

use std::sync::OnceLock;

use io_uring::{opcode, IoUring, Probe};

/// The environment variable that forces a reaping mode (a test and debugging knob).
pub const FORCE_REAP_ENV: &str = "ACGI_FORCE_REAP";

/// The oldest kernel the bridge runs on, with the pidfd reaping fallback.
pub const KERNEL_FLOOR: &str = "6.1";

/// How the cores learn that a worker exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReapMode {
    /// `IORING_OP_WAITID` on the ring (Linux 6.7+): one op per worker, which completes with
    /// its exit status.
    WaitId,
    /// `pidfd_open(2)` per worker, `IORING_OP_POLL_ADD` on the pidfd, then `waitid(P_PIDFD,
    /// WNOHANG)` when it polls readable (Linux 5.4+): one more descriptor per worker.
    PidfdPoll,
}

impl ReapMode {
    pub fn name(self) -> &'static str {
        match self {
            ReapMode::WaitId => "IORING_OP_WAITID",
            ReapMode::PidfdPoll => "pidfd polls (pidfd_open + IORING_OP_POLL_ADD + waitid)",
        }
    }
}

/// What the probe found: the kernel's release, how workers are reaped, and what is degraded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSupport {
    pub release: String,
    pub reap: ReapMode,
    /// Optional features the kernel lacks, each with what the engine does instead.
    pub degraded: Vec<String>,
    /// The reaping mode was forced by [`FORCE_REAP_ENV`].
    pub forced: bool,
}

/// Why the bridge cannot run on this kernel (or with this environment).
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "io_uring is not available ({errno}, this kernel is {release}): {hint}; the bridge \
         needs io_uring on Linux {KERNEL_FLOOR} or later"
    )]
    Unavailable {
        errno: rustix::io::Errno,
        release: String,
        hint: &'static str,
    },
    #[error("{} (this kernel is {release}); the bridge needs Linux {KERNEL_FLOOR} or later", .missing.join("; "))]
    Missing {
        missing: Vec<String>,
        release: String,
    },
    #[error(
        "{FORCE_REAP_ENV}={value:?} is not a reaping mode: use `pidfd` (the fallback) or \
         `waitid` (IORING_OP_WAITID), or unset it"
    )]
    BadForce { value: String },
    #[error(
        "reaping workers needs IORING_OP_WAITID (Linux 6.7+) or pidfd_open(2) (Linux 5.3+), \
         and pidfd_open failed ({errno}; a seccomp filter may block it): allow pidfd_open, or \
         run on Linux 6.7 or later"
    )]
    NoPidfd { errno: rustix::io::Errno },
}

/// One op the engine submits: its name, the kernel that has it, and what it is for.
struct OpNeed {
    name: &'static str,
    code: u8,
    since: &'static str,
    used_for: &'static str,
}

/// Every opcode the engine submits (`op.rs`; `TIMEOUT` by the pidfd fallback's back-off).
/// `IORING_OP_WAITID` is not here: it has a fallback ([`ReapMode`]).
const OPS: &[OpNeed] = &[
    OpNeed {
        name: "IORING_OP_ACCEPT",
        code: opcode::AcceptMulti::CODE,
        since: "5.5",
        used_for: "accepting callers; multishot: 5.19",
    },
    OpNeed {
        name: "IORING_OP_RECV",
        code: opcode::Recv::CODE,
        since: "5.6",
        used_for: "reading callers and workers; multishot: 6.0",
    },
    OpNeed {
        name: "IORING_OP_SEND",
        code: opcode::Send::CODE,
        since: "5.6",
        used_for: "answering callers, feeding workers",
    },
    OpNeed {
        name: "IORING_OP_READ",
        code: opcode::Read::CODE,
        since: "5.6",
        used_for: "worker output pipes, eventfds",
    },
    OpNeed {
        name: "IORING_OP_WRITE",
        code: opcode::Write::CODE,
        since: "5.6",
        used_for: "waking other cores",
    },
    OpNeed {
        name: "IORING_OP_READ_FIXED",
        code: opcode::ReadFixed::CODE,
        since: "5.1",
        used_for: "payloads read straight into a worker's slot",
    },
    OpNeed {
        name: "IORING_OP_WRITE_FIXED",
        code: opcode::WriteFixed::CODE,
        since: "5.1",
        used_for: "replies sent straight from a worker's slot",
    },
    OpNeed {
        name: "IORING_OP_POLL_ADD",
        code: opcode::PollAdd::CODE,
        since: "5.1",
        used_for: "waiting for a large payload, pidfd reaping",
    },
    OpNeed {
        name: "IORING_OP_ASYNC_CANCEL",
        code: opcode::AsyncCancel::CODE,
        since: "5.5",
        used_for: "cancelling a closed connection's or exited worker's ops",
    },
    OpNeed {
        name: "IORING_OP_TIMEOUT",
        code: opcode::Timeout::CODE,
        since: "5.4",
        used_for: "backing off a reap that must be retried",
    },
];

/// The reaping op, probed apart: it has a fallback.
const WAITID: OpNeed = OpNeed {
    name: "IORING_OP_WAITID",
    code: opcode::WaitId::CODE,
    since: "6.7",
    used_for: "reaping workers",
};

/// The setup params' feature bits the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `IORING_FEAT_NODROP` (5.5): a full completion queue holds completions back, never loses
    /// them. Required.
    pub nodrop: bool,
    /// `IORING_FEAT_EXT_ARG` (5.11): waiting with a timeout (the loop's deadlines). Required.
    pub ext_arg: bool,
    /// `IORING_FEAT_RW_CUR_POS` (5.6): offset -1 reads pipes and eventfds at their position.
    /// Required.
    pub rw_cur_pos: bool,
    /// `IORING_FEAT_FAST_POLL` (5.7): receives on idle sockets poll instead of blocking a
    /// kernel worker thread. Optional.
    pub fast_poll: bool,
}

impl Features {
    fn of(ring: &IoUring) -> Features {
        let params = ring.params();
        Features {
            nodrop: params.is_feature_nodrop(),
            ext_arg: params.is_feature_ext_arg(),
            rw_cur_pos: params.is_feature_rw_cur_pos(),
            fast_poll: params.is_feature_fast_poll(),
        }
    }
}

/// The setup flags the engine's rings are built with, in the order the kernels added them
/// (each needs the ones before it: DEFER_TASKRUN needs SINGLE_ISSUER).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupFlag {
    CoopTaskrun,
    SingleIssuer,
    DeferTaskrun,
}

pub const SETUP_FLAGS: [SetupFlag; 3] = [
    SetupFlag::CoopTaskrun,
    SetupFlag::SingleIssuer,
    SetupFlag::DeferTaskrun,
];

impl SetupFlag {
    fn name(self) -> &'static str {
        match self {
            SetupFlag::CoopTaskrun => "IORING_SETUP_COOP_TASKRUN",
            SetupFlag::SingleIssuer => "IORING_SETUP_SINGLE_ISSUER",
            SetupFlag::DeferTaskrun => "IORING_SETUP_DEFER_TASKRUN",
        }
    }

    fn since(self) -> &'static str {
        match self {
            SetupFlag::CoopTaskrun => "5.19",
            SetupFlag::SingleIssuer => "6.0",
            SetupFlag::DeferTaskrun => "6.1",
        }
    }
}

/// Build a small ring with `flags` (and `dontfork`, as the engine does).
fn build(flags: &[SetupFlag]) -> std::io::Result<IoUring> {
    let mut builder = IoUring::builder();
    builder.dontfork();
    for flag in flags {
        match flag {
            SetupFlag::CoopTaskrun => builder.setup_coop_taskrun(),
            SetupFlag::SingleIssuer => builder.setup_single_issuer(),
            SetupFlag::DeferTaskrun => builder.setup_defer_taskrun(),
        };
    }
    builder.build(8)
}

/// The kernel's release (`uname -r`).
fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// What to tell the operator when the kernel refuses to create any ring.
fn unavailable_hint(errno: rustix::io::Errno) -> &'static str {
    use rustix::io::Errno;
    match errno {
        Errno::NOSYS => {
            "the kernel was built without io_uring (CONFIG_IO_URING), or a seccomp filter \
             blocks io_uring_setup (the default profiles of Docker and containerd do: run the \
             container with a profile that allows io_uring_setup, io_uring_enter and \
             io_uring_register)"
        }
        Errno::PERM | Errno::ACCESS => {
            "io_uring is disabled for this process: sysctl kernel.io_uring_disabled is 2, or 1 \
             and the bridge's group is not kernel.io_uring_group (set it to 0, or add the \
             group), or a seccomp filter or LSM refuses io_uring_setup"
        }
        Errno::NOMEM => {
            "not enough locked memory for even a small ring: raise RLIMIT_MEMLOCK (ulimit -l, \
             systemd LimitMEMLOCK=)"
        }
        _ => "io_uring_setup failed",
    }
}

/// Which of the engine's setup flags the kernel refuses, if any: the first of
/// [`SETUP_FLAGS`] whose addition makes `try_build` fail with EINVAL. `Err` when even a plain
/// ring cannot be built.
pub fn refused_setup_flag(
    try_build: impl Fn(&[SetupFlag]) -> Result<(), rustix::io::Errno>,
) -> Result<Option<SetupFlag>, rustix::io::Errno> {
    try_build(&[])?;
    for count in 1..=SETUP_FLAGS.len() {
        match try_build(&SETUP_FLAGS[..count]) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL) => return Ok(Some(SETUP_FLAGS[count - 1])),
            Err(errno) => return Err(errno),
        }
    }
    Ok(None)
}

/// Decide from what the probe saw: `supported` says whether an opcode is, `force` is the
/// value of [`FORCE_REAP_ENV`]. Pure, so that every kernel can be played in a unit test.
pub fn evaluate(
    release: &str,
    refused_flag: Option<SetupFlag>,
    features: Features,
    supported: impl Fn(u8) -> bool,
    force: Option<&str>,
) -> Result<KernelSupport, KernelError> {
    let mut missing = Vec::new();
    if let Some(flag) = refused_flag {
        missing.push(format!("{} refused: Linux {}+", flag.name(), flag.since()));
    }
    for (present, name, since) in [
        (features.nodrop, "IORING_FEAT_NODROP", "5.5"),
        (features.ext_arg, "IORING_FEAT_EXT_ARG", "5.11"),
        (features.rw_cur_pos, "IORING_FEAT_RW_CUR_POS", "5.6"),
    ] {
        if !present {
            missing.push(format!("{name} missing: Linux {since}+"));
        }
    }
    for need in OPS {
        if !supported(need.code) {
            missing.push(format!(
                "{} missing: Linux {}+ (for {})",
                need.name, need.since, need.used_for
            ));
        }
    }
    let waitid = supported(WAITID.code);
    let (reap, forced) = match force {
        None | Some("") => match waitid {
            true => (ReapMode::WaitId, false),
            false => (ReapMode::PidfdPoll, false),
        },
        Some("pidfd") => (ReapMode::PidfdPoll, true),
        Some("waitid") => {
            if !waitid {
                missing.push(format!(
                    "{} missing: Linux {}+ (for {}; forced by {FORCE_REAP_ENV}=waitid)",
                    WAITID.name, WAITID.since, WAITID.used_for
                ));
            }
            (ReapMode::WaitId, true)
        }
        Some(value) => {
            return Err(KernelError::BadForce {
                value: value.to_string(),
            })
        }
    };
    if !missing.is_empty() {
        return Err(KernelError::Missing {
            missing,
            release: release.to_string(),
        });
    }
    let mut degraded = Vec::new();
    if !features.fast_poll {
        degraded.push(
            "IORING_FEAT_FAST_POLL missing (Linux 5.7+): receives on idle sockets wait in \
             kernel worker threads"
                .to_string(),
        );
    }
    if !waitid {
        degraded.push(format!(
            "{} missing (Linux {}+): workers are reaped with pidfd polls",
            WAITID.name, WAITID.since
        ));
    }
    Ok(KernelSupport {
        release: release.to_string(),
        reap,
        degraded,
        forced,
    })
}

/// Probe this kernel (the work behind [`check_kernel`]).
fn probe() -> Result<KernelSupport, KernelError> {
    let release = release();
    let errno_of = |error: std::io::Error| {
        rustix::io::Errno::from_raw_os_error(error.raw_os_error().unwrap_or(libc::EIO))
    };
    let unavailable = |errno| KernelError::Unavailable {
        errno,
        release: release.clone(),
        hint: unavailable_hint(errno),
    };
    let refused = refused_setup_flag(|flags| build(flags).map(drop).map_err(errno_of))
        .map_err(unavailable)?;
    let ring = build(&[]).map_err(|error| unavailable(errno_of(error)))?;
    let features = Features::of(&ring);
    let mut probe = Probe::new();
    let probed = ring.submitter().register_probe(&mut probe);
    let supported = |code: u8| probed.is_ok() && probe.is_supported(code);
    if let Err(error) = &probed {
        tracing::warn!(%error, "IORING_REGISTER_PROBE failed (Linux 5.6+): every op counts as missing");
    }
    let force = std::env::var(FORCE_REAP_ENV).ok();
    let support = evaluate(&release, refused, features, supported, force.as_deref())?;
    if support.reap == ReapMode::PidfdPoll {
        // pidfd_open of ourselves: the syscall exists and no filter refuses it.
        let me = rustix::process::getpid();
        rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty())
            .map_err(|errno| KernelError::NoPidfd { errno })?;
    }
    Ok(support)
}

static KERNEL: OnceLock<Result<KernelSupport, String>> = OnceLock::new();

/// Probe the kernel once (later calls return the first answer) and log what was found: the
/// reaping mode, anything degraded, and a forced mode. `Err` names every missing piece and
/// the kernel that has it.
pub fn check_kernel() -> Result<&'static KernelSupport, String> {
    KERNEL
        .get_or_init(|| {
            let support = probe().map_err(|error| error.to_string())?;
            log(&support);
            Ok(support)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn log(support: &KernelSupport) {
    for what in &support.degraded {
        tracing::warn!(kernel = %support.release, "{what}");
    }
    if support.forced {
        tracing::warn!(
            kernel = %support.release,
            "reaping workers with {} (forced by {FORCE_REAP_ENV}, a test and debugging knob)",
            support.reap.name()
        );
    } else {
        tracing::info!(
            kernel = %support.release,
            "io_uring probe passed; reaping workers with {}",
            support.reap.name()
        );
    }
}

/// How workers are reaped: the probe's choice ([`check_kernel`] must have passed; before it,
/// or if it failed, `IORING_OP_WAITID`).
pub fn reap_mode() -> ReapMode {
    match KERNEL.get() {
        Some(Ok(support)) => support.reap,
        _ => ReapMode::WaitId,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Features = Features {
        nodrop: true,
        ext_arg: true,
        rw_cur_pos: true,
        fast_poll: true,
    };

    fn without(codes: &'static [u8]) -> impl Fn(u8) -> bool {
        move |code| !codes.contains(&code)
    }

    #[test]
    fn a_complete_kernel_reaps_with_waitid_and_degrades_nothing() {
        // Proves the default choice on 6.7+: IORING_OP_WAITID, nothing degraded, not forced.
        let support = evaluate("6.8.0", None, ALL, |_| true, None).unwrap();
        assert_eq!(support.reap, ReapMode::WaitId);
        assert!(support.degraded.is_empty() && !support.forced);
    }

    #[test]
    fn a_kernel_without_waitid_falls_back_to_pidfd_polls() {
        // Proves 6.1-6.6: no IORING_OP_WAITID is a degraded start with pidfd reaping, not an error.
        let support = evaluate("6.1.0-18-amd64", None, ALL, without(&[WAITID.code]), None).unwrap();
        assert_eq!(support.reap, ReapMode::PidfdPoll);
        assert_eq!(support.degraded.len(), 1);
        assert!(support.degraded[0].contains("IORING_OP_WAITID missing (Linux 6.7+)"));
    }

    #[test]
    fn a_missing_required_op_names_the_op_and_its_kernel() {
        // Proves the startup error format: the missing op and the kernel that has it, every
        // missing piece at once, with this kernel's release and the floor.
        let error = evaluate(
            "5.4.0",
            Some(SetupFlag::CoopTaskrun),
            Features {
                ext_arg: false,
                ..ALL
            },
            without(&[opcode::Recv::CODE, opcode::Send::CODE]),
            None,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "IORING_SETUP_COOP_TASKRUN refused: Linux 5.19+",
            "IORING_FEAT_EXT_ARG missing: Linux 5.11+",
            "IORING_OP_RECV missing: Linux 5.6+",
            "IORING_OP_SEND missing: Linux 5.6+",
            "this kernel is 5.4.0",
            "needs Linux 6.1 or later",
        ] {
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
    }

    #[test]
    fn forcing_selects_the_mode_and_is_checked() {
        // Proves ACGI_FORCE_REAP: pidfd forces the fallback on a complete kernel, waitid on a
        // kernel without it is an error naming the op, anything else is refused.
        let forced = evaluate("6.8.0", None, ALL, |_| true, Some("pidfd")).unwrap();
        assert_eq!((forced.reap, forced.forced), (ReapMode::PidfdPoll, true));
        let error = evaluate("6.1.0", None, ALL, without(&[WAITID.code]), Some("waitid"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("IORING_OP_WAITID missing: Linux 6.7+"),
            "{error}"
        );
        let error = evaluate("6.8.0", None, ALL, |_| true, Some("poll"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("ACGI_FORCE_REAP=\"poll\""), "{error}");
    }

    #[test]
    fn the_first_refused_setup_flag_is_the_one_named() {
        // Proves the setup diagnosis on a 6.0 kernel (DEFER_TASKRUN unknown), and that other
        // errors (no io_uring at all) are passed on, not blamed on a flag.
        use rustix::io::Errno;
        let on_6_0 = |flags: &[SetupFlag]| match flags.contains(&SetupFlag::DeferTaskrun) {
            true => Err(Errno::INVAL),
            false => Ok(()),
        };
        assert_eq!(
            refused_setup_flag(on_6_0),
            Ok(Some(SetupFlag::DeferTaskrun))
        );
        assert_eq!(refused_setup_flag(|_| Ok(())), Ok(None));
        assert_eq!(refused_setup_flag(|_| Err(Errno::NOSYS)), Err(Errno::NOSYS));
    }

    #[test]
    fn this_kernel_passes_the_probe() {
        // Proves the probe against the real kernel the tests run on (the CI floor is 6.1).
        let support = probe().expect("the test machine's kernel runs the bridge");
        assert!(!support.release.is_empty());
    }
}
