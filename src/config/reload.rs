//! What a configuration reload changes: the running config against the one just loaded, service
//! by service and key by key (`docs/operations.md`, "Reloading").
//!
//! Services are matched by `id` (what callers hold). A service whose `[[service]]` table, resolved
//! executable (same file: device, inode, size, times) and identity are all unchanged keeps its
//! workers; any other difference replaces it blue/green: a new pool is started beside the old
//! one, and takes the service's requests only once its workers are up, while the old pool
//! finishes what it holds. Services only in the new config start; services only in the old one
//! drain and stop.
//!
//! Top-level keys are either applied live (limits and timeouts the cores read at each use, the
//! admission limits and access lists) or need a restart (listeners, cores, rings, the state
//! directory, and `max_payload_bytes`, which running workers were told at start): those keep
//! their running values and the reload says which ones wait for a restart or an
//! `acgi-bridge upgrade`.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use super::{Config, ServiceConfig};

/// Canonical TOML text of a value: tables are ordered by key (`toml::Table` is a `BTreeMap`),
/// so two equal values print alike whatever their order in the file.
pub(super) fn canonical(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(table) => toml::to_string(table).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// Top-level keys a reload applies while running. Every other key (but `service`) needs a
/// restart.
pub const LIVE_KEYS: &[&str] = &[
    "caller_frame_timeout_ms",
    "caller_idle_timeout_ms",
    "caller_requests_in_flight_max",
    "caller_bytes_in_flight_max",
    "request_bytes_buffered_max",
    "answer_bytes_buffered_max",
    "write_queue_max_bytes",
    "shutdown_timeout_ms",
    "connections_max",
    "unix_connections_reserved",
    "connections_per_uid_max",
    "connections_per_ip_max",
    "require_user",
    "reload_timeout_ms",
];

/// Keys of `[listen]` a reload applies while running (the access lists, and the TLS files:
/// new handshakes use what they hold); the others (the sockets themselves) need a restart.
pub const LIVE_LISTEN_KEYS: &[&str] = &[
    "allowed_uids",
    "allowed_gids",
    "allowed_clients",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
];

/// `[[service]]` keys a reload applies to the running pool (`Pool::set_policy`): the pool
/// reads them at each decision, so its workers stay. A change of any other key replaces the
/// service blue/green.
pub const POOL_LIVE_KEYS: &[&str] = &[
    "min_workers",
    "max_workers",
    "start_workers",
    "spare_min",
    "spare_max",
    "spawn_rate_max",
    "idle_timeout_ms",
    "max_requests",
    "max_requests_jitter",
    "max_lifetime_ms",
    "max_rss_bytes",
    "request_timeout_ms",
    "startup_timeout_ms",
    "kill_grace_ms",
    "crash_limit",
    "crash_window_ms",
    "restart_backoff_max_ms",
    "backlog_max",
    "backlog_timeout_ms",
];

/// What happens to one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Same config, same executable: its workers stay (`old` and `new` are its indices in the
    /// running and the new config).
    Keep { old: usize, new: usize },
    /// Only pool limits changed (`POOL_LIVE_KEYS`): applied to the running pool, workers stay.
    Limits {
        old: usize,
        new: usize,
        keys: Vec<String>,
    },
    /// Only in the new config.
    Start { new: usize },
    /// Different: new workers start beside the old ones and take over once up.
    Replace { old: usize, new: usize, why: String },
    /// Only in the running config: it drains and stops.
    Remove { old: usize },
}

/// A reload's plan.
#[derive(Debug, Default)]
pub struct Plan {
    pub services: Vec<Change>,
    /// Top-level keys applied live.
    pub live: Vec<String>,
    /// Top-level keys that changed but keep their running values until a restart.
    pub restart_needed: Vec<String>,
}

impl Plan {
    /// Whether the new config changes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
            && self.restart_needed.is_empty()
            && self
                .services
                .iter()
                .all(|c| matches!(c, Change::Keep { .. }))
    }

    /// One line for the log and for `acgi-bridge reload`.
    pub fn summary(&self, old: &Config, new: &Config) -> String {
        let mut parts = Vec::new();
        let names = |pick: &dyn Fn(&Change) -> Option<String>| -> Vec<String> {
            self.services.iter().filter_map(pick).collect()
        };
        let started = names(&|c| match c {
            Change::Start { new: n } => Some(new.services[*n].name.clone()),
            _ => None,
        });
        let replaced = names(&|c| match c {
            Change::Replace { new: n, why, .. } => {
                Some(format!("{} ({why})", new.services[*n].name))
            }
            _ => None,
        });
        let removed = names(&|c| match c {
            Change::Remove { old: o } => Some(old.services[*o].name.clone()),
            _ => None,
        });
        let limited = names(&|c| match c {
            Change::Limits { new: n, keys, .. } => {
                Some(format!("{} ({})", new.services[*n].name, keys.join(", ")))
            }
            _ => None,
        });
        let kept = self
            .services
            .iter()
            .filter(|c| matches!(c, Change::Keep { .. }))
            .count();
        if !started.is_empty() {
            parts.push(format!("started {}", started.join(", ")));
        }
        if !replaced.is_empty() {
            parts.push(format!("replaced {}", replaced.join(", ")));
        }
        if !removed.is_empty() {
            parts.push(format!("removed {}", removed.join(", ")));
        }
        if !limited.is_empty() {
            parts.push(format!("new limits for {}", limited.join(", ")));
        }
        parts.push(format!("{kept} unchanged"));
        if !self.live.is_empty() {
            parts.push(format!("applied {}", self.live.join(", ")));
        }
        if !self.restart_needed.is_empty() {
            parts.push(format!(
                "NOT applied until a restart or `acgi-bridge upgrade`: {}",
                self.restart_needed.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Compare the running config with a newly loaded one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut plan = Plan::default();
    for (new_index, service) in new.services.iter().enumerate() {
        let change = match old.services.iter().position(|s| s.id == service.id) {
            None => Change::Start { new: new_index },
            Some(old_index) => match why_replace(&old.services[old_index], service) {
                None => Change::Keep {
                    old: old_index,
                    new: new_index,
                },
                Some(Why::Limits(keys)) => Change::Limits {
                    old: old_index,
                    new: new_index,
                    keys,
                },
                Some(Why::Replace(why)) => Change::Replace {
                    old: old_index,
                    new: new_index,
                    why,
                },
            },
        };
        plan.services.push(change);
    }
    for (old_index, service) in old.services.iter().enumerate() {
        if !new.services.iter().any(|s| s.id == service.id) {
            plan.services.push(Change::Remove { old: old_index });
        }
    }
    let keys: BTreeSet<&String> = old.raw_keys.keys().chain(new.raw_keys.keys()).collect();
    for key in keys {
        if old.raw_keys.get(key) == new.raw_keys.get(key) {
            continue;
        }
        if key == "listen" {
            let table = |config: &Config| -> toml::Table {
                config
                    .raw_keys
                    .get("listen")
                    .and_then(|text| toml::from_str(text).ok())
                    .unwrap_or_default()
            };
            let (was, is) = (table(old), table(new));
            let sub: BTreeSet<&String> = was.keys().chain(is.keys()).collect();
            for sub in sub {
                if was.get(sub) != is.get(sub) {
                    let name = format!("listen.{sub}");
                    if LIVE_LISTEN_KEYS.contains(&sub.as_str()) {
                        plan.live.push(name);
                    } else {
                        plan.restart_needed.push(name);
                    }
                }
            }
        } else if LIVE_KEYS.contains(&key.as_str()) {
            plan.live.push(key.clone());
        } else {
            plan.restart_needed.push(key.clone());
        }
    }
    plan
}

/// Why a service changes.
enum Why {
    /// Only these pool limits.
    Limits(Vec<String>),
    /// It needs new workers, for this reason.
    Replace(String),
}

/// The keys whose values differ between two `[[service]]` tables' canonical texts.
fn changed_keys(old: &str, new: &str) -> Vec<String> {
    let parse = |text: &str| -> toml::Table { toml::from_str(text).unwrap_or_default() };
    let (was, is) = (parse(old), parse(new));
    let keys: BTreeSet<&String> = was.keys().chain(is.keys()).collect();
    keys.into_iter()
        .filter(|key| was.get(*key) != is.get(*key))
        .cloned()
        .collect()
}

/// Why a service must change, or `None` when it stays as it runs.
fn why_replace(old: &ServiceConfig, new: &ServiceConfig) -> Option<Why> {
    let replace = |why: String| Some(Why::Replace(why));
    if old.identity != new.identity {
        return replace("its user's uid, gid or groups changed".into());
    }
    if let (Some(was), Some(is)) = (&old.exec_file, &new.exec_file) {
        if was.path != is.path {
            return replace(format!(
                "its executable is now {} (was {})",
                is.path.display(),
                was.path.display()
            ));
        }
        let stat = |file: &crate::confine::ExecFile| {
            std::fs::metadata(format!("/proc/self/fd/{}", {
                use std::os::fd::AsRawFd;
                file.fd.as_raw_fd()
            }))
            .ok()
            .map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                )
            })
        };
        if stat(was) != stat(is) {
            return replace(format!("its executable {} changed", is.path.display()));
        }
    }
    if old.raw == new.raw {
        return None;
    }
    let keys = changed_keys(&old.raw, &new.raw);
    if !keys.is_empty() && keys.iter().all(|k| POOL_LIVE_KEYS.contains(&k.as_str())) {
        return Some(Why::Limits(keys));
    }
    let others: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .filter(|k| !POOL_LIVE_KEYS.contains(k))
        .collect();
    replace(format!("its configuration changed: {}", others.join(", ")))
}

/// The config the cores run after a reload: `new`, with every key that needs a restart kept at
/// its running value.
pub fn effective(old: &Config, mut new: Config, plan: &Plan) -> Config {
    for key in &plan.restart_needed {
        match key.as_str() {
            "state_dir" => new.state_dir = old.state_dir.clone(),
            "max_payload_bytes" => new.max_payload_bytes = old.max_payload_bytes,
            "metrics_listen" => new.metrics_listen = old.metrics_listen.clone(),
            "histogram_log_dir" => new.histogram_log_dir = old.histogram_log_dir.clone(),
            "histogram_log_interval_ms" => {
                new.histogram_log_interval_ms = old.histogram_log_interval_ms
            }
            "histogram_log_rotate_bytes" => {
                new.histogram_log_rotate_bytes = old.histogram_log_rotate_bytes
            }
            "admin_socket" => new.admin_socket = old.admin_socket.clone(),
            "admin_socket_mode" => new.admin_socket_mode = old.admin_socket_mode.clone(),
            "cores" => new.cores = old.cores.clone(),
            "idle_spin_us" => new.idle_spin_us = old.idle_spin_us,
            "worker_affinity" => new.worker_affinity = old.worker_affinity,
            "provided_buffers" => new.provided_buffers = old.provided_buffers,
            _ => {}
        }
    }
    // The sockets stay as they are; only the access lists are live.
    let access = (
        std::mem::take(&mut new.listen.allowed_uids),
        std::mem::take(&mut new.listen.allowed_gids),
        std::mem::take(&mut new.listen.allowed_clients),
    );
    // The TLS files too, when the running bridge has a TLS listener they were loaded for.
    let tls = (old.listen.tls.is_some() && new.listen.tls_server.is_some()).then(|| {
        (
            new.listen.tls_cert.take(),
            new.listen.tls_key.take(),
            new.listen.tls_client_ca.take(),
            new.listen.tls_server.take(),
        )
    });
    new.listen = old.listen.clone();
    (
        new.listen.allowed_uids,
        new.listen.allowed_gids,
        new.listen.allowed_clients,
    ) = access;
    if let Some(tls) = tls {
        (
            new.listen.tls_cert,
            new.listen.tls_key,
            new.listen.tls_client_ca,
            new.listen.tls_server,
        ) = tls;
    }
    new.raw_keys = old.raw_keys.clone();
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("parses")
    }

    const BASE: &str = r#"
        caller_idle_timeout_ms = 1000
        [listen]
        unix = "/tmp/x.sock"
        [[service]]
        id = 1
        name = "a"
        exec = "/bin/cat"
        [[service]]
        id = 2
        name = "b"
        exec = "/bin/cat"
    "#;

    #[test]
    fn the_same_config_changes_nothing_whatever_its_key_order() {
        // Proves the comparison is by value: reordered keys and tables keep every service.
        let reordered = r#"
            [listen]
            unix = "/tmp/x.sock"
            [[service]]
            name = "a"
            exec = "/bin/cat"
            id = 1
            [[service]]
            id = 2
            exec = "/bin/cat"
            name = "b"
        "#;
        let mut text = String::from("caller_idle_timeout_ms = 1000\n");
        text.push_str(reordered);
        let plan = plan(&config(BASE), &config(&text));
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn services_are_matched_by_id_and_each_difference_is_named() {
        // Proves added, removed, changed and unchanged services are told apart.
        let new = r#"
            caller_idle_timeout_ms = 2000
            cores = 1
            [listen]
            unix = "/tmp/y.sock"
            allowed_uids = [0]
            [[service]]
            id = 2
            name = "b"
            exec = "/bin/cat"
            max_workers = 9
            [[service]]
            id = 3
            name = "c"
            exec = "/bin/cat"
        "#;
        let (old, new) = (config(BASE), config(new));
        let plan = plan(&old, &new);
        assert_eq!(
            plan.services,
            vec![
                Change::Limits {
                    old: 1,
                    new: 0,
                    keys: vec!["max_workers".into()],
                },
                Change::Start { new: 1 },
                Change::Remove { old: 0 },
            ]
        );
        assert_eq!(
            plan.live,
            vec!["caller_idle_timeout_ms", "listen.allowed_uids"]
        );
        assert_eq!(plan.restart_needed, vec!["cores", "listen.unix"]);
        let effective = effective(&old, new.clone(), &plan);
        assert_eq!(effective.caller_idle_timeout_ms, 2000);
        assert_eq!(effective.listen.unix, old.listen.unix, "sockets stay");
        assert_eq!(
            effective.listen.allowed_uids,
            vec![0],
            "access lists are live"
        );
        let summary = plan.summary(&old, &new);
        assert!(summary.contains("NOT applied"), "{summary}");
    }
}
