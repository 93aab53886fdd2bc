//! The operator's commands on the admin socket, other than `status`: parsing a command line,
//! checking it against the running config, and making one line of the cores' answers.
//!
//! ```text
//!   "pause echo" --parse--> AdminRequest --to_command (set: validated)--> AdminCommand
//!        --Msg::Admin to every core--> (core, AdminOutcome) each --summary--> "ok: ..." / "error: ..."
//! ```
//!
//! Lines are untrusted: an unknown command, a service that does not exist, a pid that is not a
//! number, a limit the config would refuse, each is answered with an error line that says what
//! to type instead; nothing here panics on them.

use std::sync::Arc;

use crate::config::Config;
use crate::engine::index::CoreIndex;
use crate::engine::shared::{AdminCommand, AdminDone, AdminOutcome};
use crate::pool::Intake;

/// Longest admin command line, in bytes (without its newline).
pub(crate) const ADMIN_LINE_BYTES_MAX: usize = 256;

/// The answer to a line over [`ADMIN_LINE_BYTES_MAX`] (fixed: nothing of the line is echoed).
pub(crate) const LINE_TOO_LONG: &[u8] = b"error: command line too long\n";

/// What the bytes an admin connection has sent so far hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// No newline yet, and no more than a line may have: read more.
    Incomplete,
    /// No newline within [`ADMIN_LINE_BYTES_MAX`] bytes: answer [`LINE_TOO_LONG`].
    TooLong,
    /// The first line, lossily decoded and trimmed (what follows it is ignored).
    Command(String),
}

/// Cut the first command line out of `request` (every byte received so far, which the
/// connection keeps to `ADMIN_LINE_BYTES_MAX + 1`).
pub(crate) fn frame_line(request: &[u8]) -> Line {
    let Some(end) = request.iter().position(|b| *b == b'\n') else {
        if request.len() > ADMIN_LINE_BYTES_MAX {
            return Line::TooLong;
        }
        return Line::Incomplete;
    };
    Line::Command(String::from_utf8_lossy(&request[..end]).trim().to_string())
}

/// The commands, for the error that lists them.
const COMMANDS: &str =
    "status, reload, pause SERVICE, resume SERVICE, drain SERVICE, recycle SERVICE, \
                        kill-worker PID, set SERVICE min_workers=N max_workers=N backlog_max=N";

/// A parsed command line (service names resolved to their index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AdminRequest {
    Pause(usize),
    Resume(usize),
    Drain(usize),
    Recycle(usize),
    KillWorker(i32),
    Set { service: usize, limits: Limits },
}

/// The limits `set` may change; `None`: left as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) min_workers: Option<u32>,
    pub(crate) max_workers: Option<u32>,
    pub(crate) backlog_max: Option<u32>,
}

/// Parse an admin command line other than `status`.
pub(crate) fn parse(line: &str, config: &Config) -> Result<AdminRequest, String> {
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("");
    let args: Vec<&str> = words.collect();
    let service = |args: &[&str]| -> Result<usize, String> {
        match args {
            [name] => find_service(config, name),
            _ => Err(format!("usage: {verb} SERVICE")),
        }
    };
    match verb {
        "pause" => service(&args).map(AdminRequest::Pause),
        "resume" => service(&args).map(AdminRequest::Resume),
        "drain" => service(&args).map(AdminRequest::Drain),
        "recycle" => service(&args).map(AdminRequest::Recycle),
        "kill-worker" => match args[..] {
            [pid] => pid
                .parse::<i32>()
                .ok()
                .filter(|pid| *pid > 0)
                .map(AdminRequest::KillWorker)
                .ok_or_else(|| format!("{pid:?} is not a pid (acgi-bridge status lists them)")),
            _ => Err("usage: kill-worker PID".into()),
        },
        "set" => match args.split_first() {
            Some((name, changes)) if !changes.is_empty() => Ok(AdminRequest::Set {
                service: find_service(config, name)?,
                limits: parse_limits(changes)?,
            }),
            _ => Err(
                "usage: set SERVICE min_workers=N max_workers=N backlog_max=N (any of them)".into(),
            ),
        },
        other => Err(format!(
            "unknown command {other:?} (the commands: {COMMANDS})"
        )),
    }
}

/// A service by name or numeric id.
fn find_service(config: &Config, name: &str) -> Result<usize, String> {
    config
        .services
        .iter()
        .position(|s| s.name == name || name.parse() == Ok(s.id))
        .ok_or_else(|| {
            let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
            format!("no service {name:?} (the services: {})", names.join(", "))
        })
}

fn parse_limits(changes: &[&str]) -> Result<Limits, String> {
    let mut limits = Limits::default();
    for change in changes {
        let (key, value) = change
            .split_once('=')
            .ok_or_else(|| format!("{change:?} is not key=value"))?;
        let value: u32 = value
            .parse()
            .map_err(|_| format!("{key}: {value:?} is not a whole number"))?;
        let slot = match key {
            "min_workers" => &mut limits.min_workers,
            "max_workers" => &mut limits.max_workers,
            "backlog_max" => &mut limits.backlog_max,
            other => {
                return Err(format!(
                    "{other} cannot be set live (only min_workers, max_workers, backlog_max)"
                ))
            }
        };
        *slot = Some(value);
    }
    Ok(limits)
}

/// The config with `limits` applied to service `service`, validated as a config file would be
/// (the keys `set` touches, and those that depend on them); `start_workers`, which only counts
/// at startup, is kept within the new range.
pub(super) fn with_limits(
    config: &Config,
    service: usize,
    limits: Limits,
) -> Result<Config, String> {
    let mut changed = config.clone();
    let entry = &mut changed.services[service];
    entry.min_workers = limits.min_workers.unwrap_or(entry.min_workers);
    entry.max_workers = limits.max_workers.unwrap_or(entry.max_workers);
    entry.backlog_max = limits.backlog_max.unwrap_or(entry.backlog_max);
    if let Some(start) = entry.start_workers {
        entry.start_workers =
            Some(start.clamp(entry.min_workers, entry.max_workers.max(entry.min_workers)));
    }
    let prefix = format!("service[{service}].");
    let touched = [
        "min_workers",
        "max_workers",
        "backlog_max",
        "start_workers",
        "spare_min",
    ];
    let problems: Vec<String> = changed
        .problems()
        .into_iter()
        .filter(|p| {
            p.key
                .strip_prefix(&prefix)
                .is_some_and(|key| touched.contains(&key))
        })
        .map(|p| p.to_string())
        .collect();
    if problems.is_empty() {
        Ok(changed)
    } else {
        Err(problems.join("; "))
    }
}

/// The message for the cores, once the request is checked.
pub(super) fn to_command(request: &AdminRequest, config: &Arc<Config>) -> AdminCommand {
    // The cores know services by id (a reload moves a service to another slot).
    let id = |service: usize| config.services[service].id;
    match *request {
        AdminRequest::Pause(service) => AdminCommand::Pause {
            service: id(service),
        },
        AdminRequest::Resume(service) => AdminCommand::Resume {
            service: id(service),
        },
        AdminRequest::Drain(service) => AdminCommand::Drain {
            service: id(service),
        },
        AdminRequest::Recycle(service) => AdminCommand::Recycle {
            service: id(service),
        },
        AdminRequest::KillWorker(pid) => AdminCommand::KillWorker { pid },
        AdminRequest::Set { service, .. } => AdminCommand::SetLimits {
            service: id(service),
            config: Arc::clone(config),
        },
    }
}

/// One line from every core's outcome: the first refusal, or what was done in all.
pub(super) fn summary(
    request: &AdminRequest,
    config: &Config,
    outcomes: &[(CoreIndex, AdminOutcome)],
) -> Result<String, String> {
    let mut done = Vec::with_capacity(outcomes.len());
    for (core, outcome) in outcomes {
        match outcome {
            Ok(part) => done.push(*part),
            Err(reason) if outcomes.len() > 1 => return Err(format!("core {core}: {reason}")),
            Err(reason) => return Err(reason.clone()),
        }
    }
    let name = |service: usize| config.services[service].name.as_str();
    match *request {
        AdminRequest::Pause(service) => Ok(service_line(name(service), "paused", &done)),
        AdminRequest::Resume(service) => Ok(service_line(name(service), "resumed", &done)),
        AdminRequest::Drain(service) => Ok(service_line(name(service), "draining", &done)),
        AdminRequest::Set { service, .. } => {
            let s = &config.services[service];
            Ok(format!(
                "service {}: min_workers={} max_workers={} backlog_max={} ({})",
                s.name,
                s.min_workers,
                s.max_workers,
                s.backlog_max,
                service_counts(&done)
            ))
        }
        AdminRequest::Recycle(service) => {
            let workers: u32 = done
                .iter()
                .map(|d| match d {
                    AdminDone::Recycling { workers } => *workers,
                    _ => 0,
                })
                .sum();
            Ok(format!(
                "service {}: recycling {workers} workers, one at a time (watch acgi-bridge status)",
                name(service)
            ))
        }
        AdminRequest::KillWorker(pid) => done
            .iter()
            .find_map(|d| match d {
                AdminDone::Killed {
                    service_id,
                    requests,
                } => Some(format!(
                    "killed worker {pid} of service {} ({requests} requests answered `worker \
                     failed`)",
                    config
                        .services
                        .iter()
                        .find(|s| s.id == *service_id)
                        .map_or("(removed)", |s| s.name.as_str())
                )),
                _ => None,
            })
            .ok_or_else(|| format!("no worker has pid {pid} (acgi-bridge status lists them)")),
    }
}

/// `service echo: paused (was open): 2 busy, 3 waiting, 4 workers`.
fn service_line(name: &str, now: &str, done: &[AdminDone]) -> String {
    let before = done
        .iter()
        .filter_map(|d| match d {
            AdminDone::Service { before, .. } => Some(*before),
            _ => None,
        })
        .max()
        .unwrap_or(Intake::Open);
    format!(
        "service {name}: {now} (was {}): {}",
        before.name(),
        service_counts(done)
    )
}

fn service_counts(done: &[AdminDone]) -> String {
    let (mut busy, mut waiting, mut workers) = (0, 0, 0);
    for part in done {
        if let AdminDone::Service {
            busy: b,
            waiting: q,
            workers: w,
            ..
        } = part
        {
            busy += b;
            waiting += q;
            workers += w;
        }
    }
    format!("{busy} busy, {waiting} waiting, {workers} workers")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
            [listen]
            unix = "/tmp/x.sock"
            [[service]]
            id = 7
            name = "echo"
            exec = "/bin/cat"
            min_workers = 1
            max_workers = 4
        "#;
        Config::parse(text).expect("parses")
    }

    #[test]
    fn command_lines_parse_or_say_what_to_type() {
        // Proves each command parses, services resolve by name or id, and bad lines get an
        // error naming the fix rather than a panic.
        let config = config();
        assert_eq!(parse("pause echo", &config), Ok(AdminRequest::Pause(0)));
        assert_eq!(parse("drain 7", &config), Ok(AdminRequest::Drain(0)));
        assert_eq!(
            parse("kill-worker 42", &config),
            Ok(AdminRequest::KillWorker(42))
        );
        assert_eq!(
            parse("set echo max_workers=2 backlog_max=9", &config),
            Ok(AdminRequest::Set {
                service: 0,
                limits: Limits {
                    min_workers: None,
                    max_workers: Some(2),
                    backlog_max: Some(9)
                }
            })
        );
        for (line, needle) in [
            ("pause", "usage: pause SERVICE"),
            ("pause nope", "no service \"nope\" (the services: echo)"),
            ("kill-worker -3", "is not a pid"),
            ("kill-worker x", "is not a pid"),
            ("set echo", "usage: set SERVICE"),
            ("set echo spare_min=1", "cannot be set live"),
            ("set echo max_workers=x", "not a whole number"),
            ("frobnicate", "unknown command \"frobnicate\""),
        ] {
            let error = parse(line, &config).expect_err(line);
            assert!(error.contains(needle), "{line}: {error}");
        }
    }

    #[test]
    fn set_is_validated_like_the_config() {
        // Proves `set` refuses what the config file would (min over max, zero or too many
        // workers, a backlog over its ceiling), naming the key, and keeps start_workers in range.
        let config = config();
        let limits = |min, max| Limits {
            min_workers: min,
            max_workers: max,
            backlog_max: None,
        };
        let error = with_limits(&config, 0, limits(Some(5), None)).unwrap_err();
        assert!(error.contains("service[0].min_workers"), "{error}");
        let error = with_limits(&config, 0, limits(None, Some(0))).unwrap_err();
        assert!(error.contains("service[0].max_workers"), "{error}");
        let huge = Limits {
            backlog_max: Some(u32::MAX),
            ..Limits::default()
        };
        assert!(with_limits(&config, 0, huge)
            .unwrap_err()
            .contains("backlog_max"));
        let mut with_start = config.clone();
        with_start.services[0].start_workers = Some(4);
        let changed = with_limits(&with_start, 0, limits(None, Some(2))).expect("valid");
        assert_eq!(changed.services[0].max_workers, 2);
        assert_eq!(changed.services[0].start_workers, Some(2));
    }
}
