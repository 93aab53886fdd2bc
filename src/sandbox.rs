//! Optional per-service sandboxes, built once when the config is loaded and applied by each new
//! worker between fork and exec (`engine::spawn`): a Landlock filesystem ruleset (`landlock`,
//! `landlock_read`, `landlock_write`) and a seccomp filter denying groups of dangerous system
//! calls (`seccomp`, `seccomp_allow`). See `docs/security.md`, "Sandboxes".
//!
//! Why here and not in the child: the child of the spawner's `clone(CLONE_VM | CLONE_VFORK)` may
//! only make system calls (it shares the bridge's memory and allocates nothing), so everything
//! that allocates or opens paths happens at load: the Landlock ruleset is a descriptor the child
//! hands to `landlock_restrict_self`, the seccomp program a ready BPF array it hands to
//! `seccomp(SECCOMP_SET_MODE_FILTER)`. One ruleset and one program serve every spawn of the
//! service (the kernel copies them at each use).
//!
//! Where the kernel lacks Landlock (before 5.13, or not in `lsm=`), the service runs without it
//! and the load logs a warning saying so; the same for seccomp. Landlock is applied best-effort
//! at the kernel's ABI: every filesystem right that ABI knows is handled (denied unless a rule
//! grants it), and from ABI 6 signals and abstract Unix sockets are scoped to the worker's own
//! domain (it cannot signal, or connect to an abstract socket of, a process outside it).
//! From ABI 4 TCP is handled too: a worker may bind only the ports of `landlock_tcp_bind` and
//! connect only to those of `landlock_tcp_connect` (both empty by default: no TCP at all);
//! before ABI 4 the load says that TCP is not restricted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// A service's sandbox, ready for the spawner.
#[derive(Debug, Default)]
pub struct Sandbox {
    /// The Landlock ruleset the worker restricts itself with.
    pub landlock: Option<OwnedFd>,
    /// The seccomp program (BPF) the worker installs last before exec.
    pub seccomp: Option<Vec<libc::sock_filter>>,
    /// What could not be applied on this kernel, for the load's warnings.
    pub skipped: Vec<String>,
}

/// Paths every Landlocked worker may read and execute beneath (those that exist): the system's
/// programs and libraries, the few files of /etc that the C library, name resolution, TLS and
/// time zones read (not /etc as a whole: no /etc/shadow, no other service's configuration), and
/// a few devices.
pub const LANDLOCK_READ_DEFAULT: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
];
/// Paths every Landlocked worker may write beneath (those that exist).
pub const LANDLOCK_WRITE_DEFAULT: &[&str] = &["/dev/null"];

/// Groups of system calls the seccomp filter denies (EPERM) unless `seccomp_allow` names them:
/// each lets a compromised worker reach far beyond its service.
pub const SECCOMP_GROUPS: &[(&str, &[libc::c_long])] = &[
    (
        "@mount",
        &[
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fspick,
            libc::SYS_mount_setattr,
            libc::SYS_chroot,
        ],
    ),
    (
        "@module",
        &[
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
        ],
    ),
    (
        "@reboot",
        &[
            libc::SYS_reboot,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
        ],
    ),
    ("@swap", &[libc::SYS_swapon, libc::SYS_swapoff]),
    #[cfg(target_arch = "x86_64")]
    ("@raw-io", &[libc::SYS_ioperm, libc::SYS_iopl]),
    (
        "@debug",
        &[
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_perf_event_open,
            libc::SYS_kcmp,
        ],
    ),
    (
        "@clock",
        &[
            libc::SYS_settimeofday,
            libc::SYS_clock_settime,
            libc::SYS_clock_adjtime,
            libc::SYS_adjtimex,
        ],
    ),
    ("@namespaces", &[libc::SYS_unshare, libc::SYS_setns]),
    (
        "@keyring",
        &[libc::SYS_add_key, libc::SYS_request_key, libc::SYS_keyctl],
    ),
    (
        "@privileged",
        &[
            libc::SYS_bpf,
            libc::SYS_userfaultfd,
            libc::SYS_acct,
            libc::SYS_quotactl,
            libc::SYS_syslog,
            libc::SYS_vhangup,
            libc::SYS_personality,
        ],
    ),
    (
        "@io-uring",
        &[
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ],
    ),
];

/// The seccomp groups' names (for config validation and docs).
pub fn seccomp_group_names() -> Vec<&'static str> {
    SECCOMP_GROUPS.iter().map(|(name, _)| *name).collect()
}

/// What a service asks for.
pub struct Wanted<'a> {
    pub landlock: bool,
    pub landlock_read: &'a [PathBuf],
    pub landlock_write: &'a [PathBuf],
    /// The executable (it must stay executable under the ruleset).
    pub exec: &'a Path,
    pub seccomp: bool,
    pub seccomp_allow: &'a [String],
    /// TCP ports the workers may bind, and connect to (Landlock ABI 4+).
    pub tcp_bind: &'a [u16],
    pub tcp_connect: &'a [u16],
}

/// Build a service's sandbox. `Err` names a path that cannot be opened or a bad group.
pub fn build(wanted: &Wanted<'_>) -> Result<Sandbox, String> {
    let mut sandbox = Sandbox::default();
    if wanted.landlock {
        match landlock::abi() {
            Some(abi) => {
                sandbox.landlock = Some(landlock::ruleset(abi, wanted)?);
                if abi < landlock::NET_ABI {
                    sandbox.skipped.push(format!(
                        "landlock: the kernel's Landlock ABI is {abi} (TCP rules need 4, Linux \
                         6.7): the workers' TCP bind and connect are not restricted"
                    ));
                }
            }
            None => sandbox.skipped.push(
                "landlock: the kernel has no Landlock (Linux 5.13+ with landlock in lsm=): the \
                 workers run without the filesystem ruleset"
                    .into(),
            ),
        }
    }
    if wanted.seccomp {
        match seccomp_program(wanted.seccomp_allow) {
            Ok(program) => {
                if seccomp_available() {
                    sandbox.seccomp = Some(program);
                } else {
                    sandbox.skipped.push(
                        "seccomp: the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER): the \
                         workers run without the filter"
                            .into(),
                    );
                }
            }
            Err(why) => return Err(why),
        }
    }
    Ok(sandbox)
}

/// Whether seccomp filters are available (`prctl(PR_GET_SECCOMP)` answers).
fn seccomp_available() -> bool {
    // SAFETY: prctl with no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) >= 0 }
}

/// The deny-list filter: every call of a group not in `allow` (groups or single call names are
/// not distinguished: a group's name) returns EPERM; other architectures' calls kill.
fn seccomp_program(allow: &[String]) -> Result<Vec<libc::sock_filter>, String> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    for name in allow {
        if !SECCOMP_GROUPS.iter().any(|(group, _)| group == name) {
            return Err(format!(
                "seccomp_allow: unknown group {name:?} (the groups are {})",
                seccomp_group_names().join(", ")
            ));
        }
    }
    let rules = SECCOMP_GROUPS
        .iter()
        .filter(|(group, _)| !allow.iter().any(|a| a == group))
        .flat_map(|(_, calls)| calls.iter().map(|&call| (call, Vec::new())))
        .collect();
    #[cfg(target_arch = "x86_64")]
    let arch = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    let arch = TargetArch::aarch64;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    let program: seccompiler::BpfProgram =
        filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
    Ok(program
        .into_iter()
        .map(|f| libc::sock_filter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect())
}

mod landlock {
    //! The Landlock system calls (no wrapper in libc): numbers and structures from
    //! `<linux/landlock.h>`, the same on every architecture.

    use super::*;

    const SYS_CREATE_RULESET: libc::c_long = 444;
    const SYS_ADD_RULE: libc::c_long = 445;
    /// `landlock_restrict_self`, called by the child.
    pub(crate) const SYS_RESTRICT_SELF: libc::c_long = 446;
    const CREATE_RULESET_VERSION: u32 = 1;
    const RULE_PATH_BENEATH: u32 = 1;

    const EXECUTE: u64 = 1 << 0;
    const WRITE_FILE: u64 = 1 << 1;
    const READ_FILE: u64 = 1 << 2;
    const READ_DIR: u64 = 1 << 3;
    /// The rights of ABI 1 (bits 0-12), then REFER (2), TRUNCATE (3), IOCTL_DEV (5).
    const ABI1_ALL: u64 = (1 << 13) - 1;
    const REFER: u64 = 1 << 13;
    const TRUNCATE: u64 = 1 << 14;
    const IOCTL_DEV: u64 = 1 << 15;
    /// TCP rights (ABI 4), and the rule type that grants them per port.
    const NET_BIND_TCP: u64 = 1 << 0;
    const NET_CONNECT_TCP: u64 = 1 << 1;
    const RULE_NET_PORT: u32 = 2;
    /// The first ABI that handles TCP.
    pub(crate) const NET_ABI: u32 = 4;
    /// Scopes (ABI 6).
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    const SCOPE_SIGNAL: u64 = 1 << 1;
    /// Rights that apply to a file (not a directory) beneath which nothing lies.
    const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }

    #[repr(C)]
    struct NetPort {
        allowed_access: u64,
        port: u64,
    }

    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }

    /// The kernel's Landlock ABI version, `None` without Landlock.
    pub(crate) fn abi() -> Option<u32> {
        // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the version.
        let version = unsafe {
            libc::syscall(
                SYS_CREATE_RULESET,
                std::ptr::null::<RulesetAttr>(),
                0usize,
                CREATE_RULESET_VERSION,
            )
        };
        (version > 0).then_some(version as u32)
    }

    fn handled(abi: u32) -> u64 {
        let mut rights = ABI1_ALL;
        if abi >= 2 {
            rights |= REFER;
        }
        if abi >= 3 {
            rights |= TRUNCATE;
        }
        if abi >= 5 {
            rights |= IOCTL_DEV;
        }
        rights
    }

    /// A ruleset for `wanted` at `abi`.
    pub(crate) fn ruleset(abi: u32, wanted: &Wanted<'_>) -> Result<OwnedFd, String> {
        let all = handled(abi);
        let attr = RulesetAttr {
            handled_access_fs: all,
            handled_access_net: if abi >= NET_ABI {
                NET_BIND_TCP | NET_CONNECT_TCP
            } else {
                0
            },
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
            } else {
                0
            },
        };
        // ABI 1-3 know only the first field, 4-5 two, 6+ all three.
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: a valid attribute of `size` bytes; returns a new descriptor we own.
        let fd = unsafe { libc::syscall(SYS_CREATE_RULESET, &attr, size, 0u32) };
        if fd < 0 {
            return Err(format!(
                "landlock_create_ruleset: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the descriptor was just created and is ours alone.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Close-on-exec: the child moves it before it uses it, and exec must not leak it.
        rustix::io::fcntl_setfd(&ruleset, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| format!("landlock: {e}"))?;
        let read = READ_FILE | READ_DIR | EXECUTE;
        let defaults_read = LANDLOCK_READ_DEFAULT.iter().map(PathBuf::from);
        let defaults_write = LANDLOCK_WRITE_DEFAULT.iter().map(PathBuf::from);
        for path in defaults_read {
            add(&ruleset, &path, read & all, false)?;
        }
        for path in defaults_write {
            add(&ruleset, &path, all, false)?;
        }
        add(&ruleset, wanted.exec, read & all, true)?;
        for path in wanted.landlock_read {
            add(&ruleset, path, read & all, true)?;
        }
        for path in wanted.landlock_write {
            add(&ruleset, path, all, true)?;
        }
        if abi >= NET_ABI {
            for &port in wanted.tcp_bind {
                add_port(&ruleset, port, NET_BIND_TCP)?;
            }
            for &port in wanted.tcp_connect {
                add_port(&ruleset, port, NET_CONNECT_TCP)?;
            }
        }
        Ok(ruleset)
    }

    /// Grant `rights` (bind or connect) on one TCP port.
    fn add_port(ruleset: &OwnedFd, port: u16, rights: u64) -> Result<(), String> {
        let rule = NetPort {
            allowed_access: rights,
            port: port.into(),
        };
        // SAFETY: a valid rule on our ruleset descriptor; the kernel copies it.
        let result = unsafe {
            libc::syscall(
                SYS_ADD_RULE,
                ruleset.as_raw_fd(),
                RULE_NET_PORT,
                &rule,
                0u32,
            )
        };
        if result != 0 {
            return Err(format!(
                "landlock_add_rule TCP port {port}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Grant `rights` beneath `path` (a directory, or a file: then only file rights). A path
    /// that does not exist is an error when `required`, else skipped.
    fn add(ruleset: &OwnedFd, path: &Path, rights: u64, required: bool) -> Result<(), String> {
        let fd = match rustix::fs::open(
            path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) if !required => return Ok(()),
            Err(error) => return Err(format!("landlock: {}: {error}", path.display())),
        };
        let is_dir = rustix::fs::fstat(&fd)
            .map(|stat| rustix::fs::FileType::from_raw_mode(stat.st_mode).is_dir())
            .map_err(|e| format!("landlock: {}: {e}", path.display()))?;
        let rule = PathBeneath {
            allowed_access: if is_dir { rights } else { rights & FILE_RIGHTS },
            parent_fd: fd.as_raw_fd(),
        };
        // SAFETY: a valid rule on our ruleset descriptor; the kernel copies it.
        let result = unsafe {
            libc::syscall(
                SYS_ADD_RULE,
                ruleset.as_raw_fd(),
                RULE_PATH_BENEATH,
                &rule,
                0u32,
            )
        };
        if result != 0 {
            return Err(format!(
                "landlock_add_rule {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

/// `landlock_restrict_self`'s system call number (for the child).
pub const SYS_LANDLOCK_RESTRICT_SELF: libc::c_long = landlock::SYS_RESTRICT_SELF;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seccomp_program_builds_and_unknown_groups_are_named() {
        // Proves the default program compiles for this architecture, and that a typo in
        // seccomp_allow is an error naming the groups rather than a silently wider filter.
        let program = seccomp_program(&[]).expect("builds");
        assert!(program.len() > 10);
        let fewer = seccomp_program(&["@io-uring".into()]).expect("builds");
        assert!(fewer.len() < program.len());
        let error = seccomp_program(&["@mounts".into()]).unwrap_err();
        assert!(error.contains("@mount"), "{error}");
    }
}
