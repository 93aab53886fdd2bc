//! Closed-loop load: `connections` clients, each with `depth` tasks that loop call -> record, so
//! exactly `connections x depth` requests are in flight at any time and the offered load follows
//! the service's speed. (The window and connecting are in [`crate::workload`].)
//!
//! A call is measured when it starts inside the window; calls in flight at the window's end are
//! allowed to finish until the hard stop (`drain_grace` later), after which they are counted as
//! `unanswered` and the run ends anyway. A task whose connection fails stops (counted), rather
//! than spinning on a dead socket.
//!
//! Latency here is from each call's actual start: a closed loop never sends a request while its
//! previous one is outstanding, so when the service stalls, the requests that would have arrived
//! meanwhile are never sent and never measured (coordinated omission). That is the right number
//! for "how fast is one request", the wrong one for "what do users see at rate R": use the open
//! loop ([`crate::open_loop`]) for that.
//!
//! The driver only orchestrates: tasks record into their own [`Recorder`], returned through the
//! join set and merged once.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::mix::Rng;
use crate::payload::{first_difference, Payload};
use crate::stats::{CallTiming, ErrorClass, Mismatch, Recorder};
use crate::workload::{connect_all, Connection, RunError, Window, Workload};

pub use crate::workload::DRAIN_GRACE_DEFAULT;

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub workload: Workload,
    pub connections: u32,
    /// Requests in flight per connection.
    pub depth: u32,
    /// One thread per connection writing and reading in batches ([`crate::batched`]) instead
    /// of one task per request in flight.
    pub batch: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    pub recorder: Recorder,
    /// Length of the measured window (the denominator of the request rate).
    pub measured: Duration,
    /// Requests the open loop scheduled inside the window (0 for a closed loop).
    pub scheduled: u64,
    /// From the window's start to the last completion of a measured request (open loop; zero
    /// for a closed loop, whose measured calls all start and so mostly end inside the window).
    pub completed_within: Duration,
}

impl Outcome {
    /// Successful measured requests per second. An open loop past saturation finishes its
    /// window's requests late, during the drain, so the denominator runs to the last of them:
    /// the rate the service really sustained, not the rate offered.
    pub fn requests_per_second(&self) -> f64 {
        let span = self.measured.max(self.completed_within);
        self.recorder.requests_ok() as f64 / span.as_secs_f64()
    }
}

/// Run `plan` on the current tokio runtime.
pub async fn run(plan: &Plan) -> Result<Outcome, RunError> {
    assert!(
        plan.connections >= 1 && plan.depth >= 1,
        "plan has no load: {plan:?}"
    );
    plan.workload.check();
    if plan.batch {
        return run_batched(plan).await;
    }
    let connections = connect_all(&plan.workload, plan.connections).await?;
    let clients: Vec<_> = connections.iter().map(|c| c.client.clone()).collect();
    let window = plan.workload.window_from(Instant::now());

    let mut tasks = JoinSet::new();
    for (index, connection) in connections.into_iter().enumerate() {
        for task in 0..plan.depth {
            let stream = u64::from(index as u32) << 32 | u64::from(task);
            let payloads = plan
                .workload
                .payloads
                .values()
                .map(|kind| Payload::of_kind(kind, index as u32, task))
                .collect();
            let driver = Driver {
                connection: connection.clone(),
                index: index as u32,
                task,
                workload: plan.workload.clone(),
                rng: Rng::for_stream(plan.workload.seed, stream),
                window,
            };
            tasks.spawn(driver.drive(payloads));
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
    for client in &clients {
        recorder.record_drain_retries(client.drain_retries());
    }
    Ok(Outcome {
        recorder,
        measured: plan.workload.duration,
        scheduled: 0,
        completed_within: Duration::ZERO,
    })
}

/// `--batch`: resolve the services once, then drive each connection from its own thread.
async fn run_batched(plan: &Plan) -> Result<Outcome, RunError> {
    let service_ids = connect_all(&plan.workload, 1).await?[0].service_ids.clone();
    let window = plan.workload.window_from(Instant::now());
    // Threads, not tasks; awaited without blocking the runtime (which may serve others).
    let mut finished = Vec::new();
    for index in 0..plan.connections {
        let driver = crate::batched::Driver {
            index,
            depth: plan.depth,
            service_ids: service_ids.clone(),
            workload: plan.workload.clone(),
            window,
        };
        let (done, receiver) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("batch-{index}"))
            .spawn(move || {
                let _ = done.send(driver.run());
            })
            .map_err(RunError::Timer)?;
        finished.push(receiver);
    }
    let mut recorders = Vec::new();
    for receiver in finished {
        recorders.push(receiver.await.expect("a batch driver panicked"));
    }
    let mut recorder = Recorder::new();
    for task_recorder in &recorders {
        recorder.merge(task_recorder);
    }
    Ok(Outcome {
        recorder,
        measured: plan.workload.duration,
        scheduled: 0,
        completed_within: Duration::ZERO,
    })
}

/// One in-flight slot of load: a loop of calls on one connection.
struct Driver {
    connection: Connection,
    index: u32,
    task: u32,
    workload: Workload,
    rng: Rng,
    window: Window,
}

impl Driver {
    async fn drive(mut self, mut payloads: Vec<Payload>) -> Recorder {
        let mut recorder = Recorder::new();
        let mut sequence: u64 = 0;
        loop {
            let started = Instant::now();
            if started >= self.window.measure_end {
                break;
            }
            let measured = started >= self.window.measure_start;
            let service = self.workload.services.pick(&mut self.rng);
            let payload = &mut payloads[self.workload.payloads.pick(&mut self.rng)];
            sequence += 1;
            payload.stamp(sequence);
            let call = self
                .connection
                .client
                .call(self.connection.service_ids[service], payload.as_bytes());
            let result = tokio::time::timeout_at(self.window.hard_stop, call).await;
            let latency = started.elapsed();
            let class = match result {
                Ok(Ok(reply)) => {
                    if measured {
                        recorder.record_call(CallTiming {
                            service,
                            latency,
                            uncorrected: latency,
                            send_lag: Duration::ZERO,
                        });
                    }
                    if self.workload.verify[service] {
                        if let Some(offset) = first_difference(payload.as_bytes(), &reply) {
                            recorder.record_mismatch(Mismatch {
                                connection: self.index,
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
                recorder.record_service_error(service, class);
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
