//! What every run shape shares: the target, the request mix, the time window, and connecting.
//!
//! ```text
//!  setup (connect, resolve)  |  warm-up: calls not recorded  |  measured window  | drain
//!  -------------------------- t0 ---------------------- t0+warmup ------ t0+warmup+duration --
//!                                                                  no new calls ^   ^ hard stop
//! ```
//!
//! Connecting and resolving every service on every connection happen before `t0`, so their cost
//! is not in the numbers, and an unknown service or a dead bridge fails the run before any load.
//! Service ids are per connection, so each connection keeps its own table, in mix order.

use std::time::Duration;

use acgi_client::{CallError, Client, Service};
use tokio::time::Instant;

use crate::mix::{PayloadKind, Weighted};

/// How long calls in flight at the end of the window may take before the run gives up on them.
pub const DRAIN_GRACE_DEFAULT: Duration = Duration::from_secs(5);

/// The seed used when none is given, so runs replay by default.
pub const SEED_DEFAULT: u64 = 0x5EED;

/// The requests of a run and its window.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Bridge address, in the client SDK's forms.
    pub connect: String,
    /// Services called, by name, with their weights.
    pub services: Weighted<String>,
    /// Payloads sent, with their weights (the same mix for every service).
    pub payloads: Weighted<PayloadKind>,
    /// Per service (mix order): check that every reply equals its request.
    pub verify: Vec<bool>,
    /// The measured window.
    pub duration: Duration,
    /// Load before the window, not recorded.
    pub warmup: Duration,
    /// See [`DRAIN_GRACE_DEFAULT`].
    pub drain_grace: Duration,
    /// Seed of every random choice (mix draws, Poisson gaps).
    pub seed: u64,
}

impl Workload {
    /// A workload of one service and one payload, verified when the service is `echo`.
    pub fn simple(connect: &str, service: &str, payload: PayloadKind) -> Workload {
        Workload {
            connect: connect.to_string(),
            services: Weighted::single(service.to_string()),
            payloads: Weighted::single(payload),
            verify: vec![service == "echo"],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            drain_grace: DRAIN_GRACE_DEFAULT,
            seed: SEED_DEFAULT,
        }
    }

    pub fn check(&self) {
        assert!(!self.duration.is_zero(), "workload has an empty window");
        assert_eq!(self.verify.len(), self.services.len(), "verify per service");
    }

    /// The window's boundaries for a run starting now.
    pub fn window_from(&self, started: Instant) -> Window {
        let measure_start = started + self.warmup;
        let measure_end = measure_start + self.duration;
        Window {
            started,
            measure_start,
            measure_end,
            hard_stop: measure_end + self.drain_grace,
        }
    }

    /// `echo, faulty:3` as a report names the services.
    pub fn services_label(&self) -> String {
        mix_label(&self.services, |name| name.clone())
    }

    /// `64 B` or `"sleep 3"`, or a weighted list.
    pub fn payloads_label(&self) -> String {
        mix_label(&self.payloads, PayloadKind::describe)
    }
}

fn mix_label<T>(mix: &Weighted<T>, name: impl Fn(&T) -> String) -> String {
    let weighted = mix.entries.iter().any(|entry| entry.weight != 1);
    let parts: Vec<String> = mix
        .entries
        .iter()
        .map(|entry| {
            if weighted {
                format!("{}:{}", name(&entry.value), entry.weight)
            } else {
                name(&entry.value)
            }
        })
        .collect();
    parts.join(", ")
}

/// The phase boundaries every task follows.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub started: Instant,
    pub measure_start: Instant,
    pub measure_end: Instant,
    pub hard_stop: Instant,
}

impl Window {
    /// Whether a call started (or intended) at `at` is recorded.
    pub fn measures(&self, at: Instant) -> bool {
        at >= self.measure_start && at < self.measure_end
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("connection {index} of {count} to {addr} failed: {error}")]
    Connect {
        addr: String,
        index: u32,
        count: u32,
        error: CallError,
    },
    #[error("the bridge at {addr} could not resolve service `{service}`: {error}")]
    Resolve {
        addr: String,
        service: String,
        error: CallError,
    },
    #[error("the open-loop pacer's timer failed: {0}")]
    Timer(#[from] std::io::Error),
}

/// One connection and the ids of the workload's services on it (mix order).
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub service_ids: Vec<u32>,
}

/// The environment variable naming the CA certificate (PEM) a `tls:` bridge is verified with.
pub const TLS_CA_ENV: &str = "ACGI_LOADGEN_TLS_CA";

/// The client options for `addr`: a `tls:` address is verified with the CA in
/// [`TLS_CA_ENV`].
fn connect_options(addr: &str) -> Result<acgi_client::ConnectOptions, acgi_client::CallError> {
    let options = acgi_client::ConnectOptions::new();
    if !addr.starts_with("tls:") {
        return Ok(options);
    }
    let ca = std::env::var_os(TLS_CA_ENV).ok_or_else(|| {
        acgi_client::CallError::Protocol(format!(
            "a tls: address needs {TLS_CA_ENV}: the CA certificate (PEM) to verify the bridge"
        ))
    })?;
    Ok(options.tls(acgi_client::TlsConfig::new(ca)?))
}

/// Open `count` connections to the workload's bridge and resolve every service on each.
pub async fn connect_all(workload: &Workload, count: u32) -> Result<Vec<Connection>, RunError> {
    assert!(count >= 1, "no connections");
    let mut connections = Vec::with_capacity(count as usize);
    let options = connect_options(&workload.connect).map_err(|error| RunError::Connect {
        addr: workload.connect.clone(),
        index: 1,
        count,
        error,
    })?;
    for index in 0..count {
        let client = Client::connect_with(&workload.connect, &options)
            .await
            .map_err(|error| RunError::Connect {
                addr: workload.connect.clone(),
                index: index + 1,
                count,
                error,
            })?;
        let mut service_ids = Vec::with_capacity(workload.services.len());
        for service in workload.services.values() {
            let id = client
                .service_id(Service::Name(service))
                .await
                .map_err(|error| RunError::Resolve {
                    addr: workload.connect.clone(),
                    service: service.clone(),
                    error,
                })?;
            service_ids.push(id);
        }
        connections.push(Connection {
            client,
            service_ids,
        });
    }
    Ok(connections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_show_weights_only_when_they_differ() {
        // Proves how mixes are named in reports.
        let mut workload = Workload::simple("unix:/x", "echo", PayloadKind::Bytes(64));
        assert_eq!(workload.services_label(), "echo");
        assert_eq!(workload.payloads_label(), "64 B");
        assert_eq!(workload.verify, [true]);
        workload.services =
            Weighted::new(vec![("echo".to_string(), 1), ("kv".to_string(), 3)]).unwrap();
        assert_eq!(workload.services_label(), "echo:1, kv:3");
        workload.payloads = Weighted::new(vec![
            (PayloadKind::Bytes(64), 1),
            (PayloadKind::Bytes(1024), 1),
        ])
        .unwrap();
        assert_eq!(workload.payloads_label(), "64 B, 1024 B");
        assert!(!Workload::simple("x", "faulty", PayloadKind::Bytes(1)).verify[0]);
    }

    #[test]
    fn the_window_measures_its_own_span_only() {
        // Proves warm-up and post-window instants are excluded.
        let mut workload = Workload::simple("x", "echo", PayloadKind::Bytes(1));
        workload.warmup = Duration::from_secs(1);
        workload.duration = Duration::from_secs(2);
        let t0 = Instant::now();
        let window = workload.window_from(t0);
        assert!(!window.measures(t0));
        assert!(window.measures(t0 + Duration::from_secs(1)));
        assert!(window.measures(t0 + Duration::from_millis(2999)));
        assert!(!window.measures(t0 + Duration::from_secs(3)));
        assert_eq!(
            window.hard_stop,
            t0 + Duration::from_secs(3) + DRAIN_GRACE_DEFAULT
        );
    }
}
