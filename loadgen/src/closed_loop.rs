//! Closed-loop load: `connections` clients, each with `depth` tasks that loop call -> record, so
//! exactly `connections x depth` requests are in flight at any time and the offered load follows
//! the service's speed.
//!
//! ```text
//!  setup (connect, resolve)  |  warm-up: calls not recorded  |  measured window  | drain
//!  -------------------------- t0 ---------------------- t0+warmup ------ t0+warmup+duration --
//!                                                                  no new calls ^   ^ hard stop
//! ```
//!
//! A call is measured when it starts inside the window; calls in flight at the window's end are
//! allowed to finish until the hard stop (`drain_grace` later), after which they are counted as
//! `unanswered` and the run ends anyway. Connecting and resolving the service happen before `t0`,
//! so their cost is not in the numbers, and an unknown service or a dead bridge fails the run
//! before any load. A task whose connection fails stops (counted), rather than spinning on a
//! dead socket.
//!
//! The driver only orchestrates: tasks record into their own [`Recorder`], returned through the
//! join set and merged once.

use std::time::Duration;

use acgi_bridge::client::{CallError, Client, Service};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::payload::{first_difference, Payload};
use crate::stats::{ErrorClass, Mismatch, Recorder};

/// How long calls in flight at the end of the window may take before the run gives up on them.
pub const DRAIN_GRACE_DEFAULT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Bridge address, in the client SDK's forms.
    pub connect: String,
    pub service: String,
    pub connections: u32,
    /// Requests in flight per connection.
    pub depth: u32,
    /// The measured window.
    pub duration: Duration,
    /// Load before the window, not recorded.
    pub warmup: Duration,
    pub payload_bytes: u32,
    /// Check every reply equals its request.
    pub verify: bool,
    /// See [`DRAIN_GRACE_DEFAULT`].
    pub drain_grace: Duration,
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    pub recorder: Recorder,
    /// Length of the measured window (the denominator of the request rate).
    pub measured: Duration,
}

impl Outcome {
    pub fn requests_per_second(&self) -> f64 {
        self.recorder.requests_ok() as f64 / self.measured.as_secs_f64()
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
}

/// The phase boundaries every task follows.
#[derive(Clone, Copy, Debug)]
struct Window {
    measure_start: Instant,
    measure_end: Instant,
    hard_stop: Instant,
}

/// Run `plan` on the current tokio runtime.
pub async fn run(plan: &Plan) -> Result<Outcome, RunError> {
    assert!(
        plan.connections >= 1 && plan.depth >= 1,
        "plan has no load: {plan:?}"
    );
    assert!(!plan.duration.is_zero(), "plan has an empty window");

    // One client per connection; the service is resolved on each, since ids are per connection.
    let mut clients = Vec::with_capacity(plan.connections as usize);
    for index in 0..plan.connections {
        let client = Client::connect(&plan.connect)
            .await
            .map_err(|error| RunError::Connect {
                addr: plan.connect.clone(),
                index: index + 1,
                count: plan.connections,
                error,
            })?;
        let service_id = client
            .service_id(Service::Name(&plan.service))
            .await
            .map_err(|error| RunError::Resolve {
                addr: plan.connect.clone(),
                service: plan.service.clone(),
                error,
            })?;
        clients.push((client, service_id));
    }

    let started = Instant::now();
    let measure_start = started + plan.warmup;
    let measure_end = measure_start + plan.duration;
    let window = Window {
        measure_start,
        measure_end,
        hard_stop: measure_end + plan.drain_grace,
    };

    let mut tasks = JoinSet::new();
    for (connection, (client, service_id)) in clients.into_iter().enumerate() {
        for task in 0..plan.depth {
            let payload = Payload::new(plan.payload_bytes as usize, connection as u32, task);
            let driver = Driver {
                client: client.clone(),
                service_id,
                connection: connection as u32,
                task,
                verify: plan.verify,
                window,
            };
            tasks.spawn(driver.drive(payload));
        }
    }
    assert_eq!(tasks.len(), (plan.connections * plan.depth) as usize);

    let mut recorder = Recorder::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(task_recorder) => recorder.merge(&task_recorder),
            // A task panicking is a bug in this crate: surface it as one.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => unreachable!("load task cancelled: {error}"),
        }
    }
    Ok(Outcome {
        recorder,
        measured: plan.duration,
    })
}

/// One in-flight slot of load: a loop of calls on one connection.
struct Driver {
    client: Client,
    service_id: u32,
    connection: u32,
    task: u32,
    verify: bool,
    window: Window,
}

impl Driver {
    async fn drive(self, mut payload: Payload) -> Recorder {
        let mut recorder = Recorder::new();
        let mut sequence: u64 = 0;
        loop {
            let started = Instant::now();
            if started >= self.window.measure_end {
                break;
            }
            let measured = started >= self.window.measure_start;
            sequence += 1;
            payload.stamp(sequence);
            let call = self.client.call(self.service_id, payload.as_bytes());
            let result = tokio::time::timeout_at(self.window.hard_stop, call).await;
            let latency = started.elapsed();
            let class = match result {
                Ok(Ok(reply)) => {
                    if measured {
                        recorder.record_ok(latency);
                    }
                    if self.verify {
                        if let Some(offset) = first_difference(payload.as_bytes(), &reply) {
                            recorder.record_mismatch(Mismatch {
                                connection: self.connection,
                                task: self.task,
                                sequence,
                                request_bytes: payload.as_bytes().len(),
                                reply_bytes: reply.len(),
                                first_difference: offset,
                            });
                        }
                    }
                    continue;
                }
                Ok(Err(error)) => ErrorClass::of(&error),
                Err(_elapsed) => ErrorClass::Unanswered,
            };
            if measured {
                recorder.record_error(class);
            } else {
                recorder.record_warmup_error();
            }
            if class == ErrorClass::Unanswered {
                break;
            }
            if class.ends_connection() {
                recorder.record_stopped_early();
                break;
            }
        }
        recorder
    }
}
