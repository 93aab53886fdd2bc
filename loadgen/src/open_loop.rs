//! Open-loop load: requests arrive on a schedule at `rate` per second, constant or Poisson,
//! whether or not earlier ones have been answered, and each is measured from its **intended**
//! send time (coordinated omission corrected, as wrk2 does).
//!
//! ```text
//!   schedule:  t0 + offset_1, t0 + offset_2, ...          (constant: i/R; Poisson: sum of Exp(R))
//!   pacer:     sleep (timerfd) until the next intended time, spawn the call, repeat;
//!              never waits for a reply; calls round-robin over the connections,
//!              which pipeline them (many in flight per connection)
//!   call task: sent = now; reply = call(..); done = now
//!   recorded:  latency = done - intended   (what a user arriving on schedule sees)
//!              uncorrected = done - sent   (what a naive generator would report)
//!              send lag = sent - intended  (the generator's own lateness)
//! ```
//!
//! If the generator or the bridge falls behind, requests go out late and their lateness counts
//! in their latency, so a stall of the service shows up in every request that should have been
//! sent during it, not only in the one that hit it. Calls in flight are bounded by
//! `in_flight_max`; a request due beyond it is not sent and is counted as an `in_flight_limit`
//! error (the run is past saturation; waiting instead would silently lower the offered load).
//!
//! One pacer task owns the schedule, the mix's random draws and the recorder; call tasks return
//! their times through a `JoinSet`, so nothing is locked per request.

use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::closed_loop::Outcome;
use crate::mix::Rng;
use crate::payload::{first_difference, Payload};
use crate::stats::{CallTiming, ErrorClass, Mismatch, Recorder};
use crate::timer::{PreciseTimer, DUE_WITHIN};
use crate::workload::{connect_all, RunError, Window, Workload};

/// Default bound on calls in flight.
pub const IN_FLIGHT_MAX_DEFAULT: u32 = 65_536;

/// Most requests the pacer sends in one turn before it lets completions through.
const SEND_BATCH_MAX: u32 = 256;

/// How arrivals are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exactly `1/rate` apart.
    Constant,
    /// Exponentially distributed gaps of mean `1/rate` (a Poisson process).
    Poisson,
}

impl Arrival {
    /// How reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Arrival::Constant => "constant",
            Arrival::Poisson => "Poisson",
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub workload: Workload,
    pub connections: u32,
    /// Requests per second offered.
    pub rate: f64,
    pub arrival: Arrival,
    /// See [`IN_FLIGHT_MAX_DEFAULT`].
    pub in_flight_max: u32,
}

/// The intended send times, as offsets from the start of the run.
#[derive(Clone, Debug)]
pub struct Schedule {
    arrival: Arrival,
    /// Mean gap, seconds.
    gap: f64,
    rng: Rng,
    index: u64,
    poisson_offset: f64,
}

impl Schedule {
    pub fn new(arrival: Arrival, rate: f64, seed: u64) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate {rate}");
        Schedule {
            arrival,
            gap: 1.0 / rate,
            rng: Rng::for_stream(seed, u64::MAX),
            index: 0,
            poisson_offset: 0.0,
        }
    }

    /// The offset of the next arrival. Constant offsets are computed from the index, not summed,
    /// so they never drift.
    pub fn next_offset(&mut self) -> Duration {
        let offset = match self.arrival {
            Arrival::Constant => self.index as f64 * self.gap,
            Arrival::Poisson => {
                self.poisson_offset += self.rng.next_exponential(self.gap);
                self.poisson_offset
            }
        };
        self.index += 1;
        Duration::from_secs_f64(offset)
    }
}

/// What a call task hands back.
struct Finished {
    intended: Instant,
    sent: Instant,
    done: Instant,
    service: usize,
    measured: bool,
    connection: u32,
    sequence: u64,
    request_bytes: usize,
    /// Ok with (reply length, first differing byte) when verification failed.
    result: Result<Option<(usize, usize)>, ErrorClass>,
}

/// Run `plan` on the current tokio runtime.
pub async fn run(plan: &Plan) -> Result<Outcome, RunError> {
    assert!(plan.connections >= 1, "no connections");
    assert!(plan.in_flight_max >= 1, "no calls may be in flight");
    let workload = &plan.workload;
    workload.check();
    let connections = connect_all(workload, plan.connections).await?;
    let clients: Vec<_> = connections.iter().map(|c| c.client.clone()).collect();
    let mut timer = PreciseTimer::new()?;
    let mut payloads: Vec<Vec<Payload>> = (0..plan.connections)
        .map(|connection| {
            workload
                .payloads
                .values()
                .map(|kind| Payload::of_kind(kind, connection, 0))
                .collect()
        })
        .collect();
    let mut rng = Rng::for_stream(workload.seed, u64::MAX - 1);
    let mut schedule = Schedule::new(plan.arrival, plan.rate, workload.seed);
    let window = workload.window_from(Instant::now());
    let mut next = window.started + schedule.next_offset();

    let mut recorder = Recorder::new();
    let mut calls: JoinSet<Finished> = JoinSet::new();
    let mut sequence: u64 = 0;
    let mut scheduled: u64 = 0;
    let mut last_measured_done = window.measure_start;
    let mut sending = true;
    loop {
        if sending {
            let now = Instant::now();
            let mut batch = 0;
            while next <= now + DUE_WITHIN && batch < SEND_BATCH_MAX {
                if next >= window.measure_end {
                    sending = false;
                    break;
                }
                let intended = next;
                next = window.started + schedule.next_offset();
                batch += 1;
                sequence += 1;
                let measured = window.measures(intended);
                scheduled += u64::from(measured);
                let service = workload.services.pick(&mut rng);
                if calls.len() >= plan.in_flight_max as usize {
                    if measured {
                        recorder.record_service_error(service, ErrorClass::InFlightLimit);
                    } else {
                        recorder.record_warmup_error();
                    }
                    continue;
                }
                let connection = (sequence % u64::from(plan.connections)) as usize;
                let payload = &mut payloads[connection][workload.payloads.pick(&mut rng)];
                payload.stamp(sequence);
                let call = Call {
                    client: connections[connection].client.clone(),
                    service_id: connections[connection].service_ids[service],
                    bytes: payload.as_bytes().to_vec(),
                    verify: workload.verify[service],
                    intended,
                    service,
                    measured,
                    connection: connection as u32,
                    sequence,
                };
                calls.spawn(call.run(window));
            }
        }
        if !sending && calls.is_empty() {
            break;
        }
        tokio::select! {
            joined = calls.join_next(), if !calls.is_empty() => {
                match joined.expect("the set is not empty") {
                    Ok(finished) => {
                        if finished.measured {
                            last_measured_done = last_measured_done.max(finished.done);
                        }
                        record(&mut recorder, finished);
                    }
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    Err(error) => unreachable!("call task cancelled: {error}"),
                }
            }
            slept = timer.sleep_until(next), if sending => slept?,
        }
    }
    for client in &clients {
        recorder.record_drain_retries(client.drain_retries());
    }
    Ok(Outcome {
        recorder,
        measured: workload.duration,
        scheduled,
        completed_within: last_measured_done - window.measure_start,
    })
}

/// One request, owned by its task.
struct Call {
    client: acgi_client::Client,
    service_id: u32,
    bytes: Vec<u8>,
    verify: bool,
    intended: Instant,
    service: usize,
    measured: bool,
    connection: u32,
    sequence: u64,
}

impl Call {
    async fn run(self, window: Window) -> Finished {
        // The pacer may dispatch up to DUE_WITHIN early; such a call counts as on time.
        let sent = Instant::now().max(self.intended);
        let call = self.client.call(self.service_id, &self.bytes);
        let result = tokio::time::timeout_at(window.hard_stop, call).await;
        let done = Instant::now().max(sent);
        let result = match result {
            Ok(Ok(reply)) => Ok(if self.verify {
                first_difference(&self.bytes, &reply).map(|offset| (reply.len(), offset))
            } else {
                None
            }),
            Ok(Err(error)) => Err(ErrorClass::of(&error)),
            Err(_elapsed) => Err(ErrorClass::Unanswered),
        };
        Finished {
            intended: self.intended,
            sent,
            done,
            service: self.service,
            measured: self.measured,
            connection: self.connection,
            sequence: self.sequence,
            request_bytes: self.bytes.len(),
            result,
        }
    }
}

fn record(recorder: &mut Recorder, finished: Finished) {
    match finished.result {
        Ok(mismatch) => {
            if finished.measured {
                recorder.record_call(CallTiming {
                    service: finished.service,
                    latency: finished.done - finished.intended,
                    uncorrected: finished.done - finished.sent,
                    send_lag: finished.sent - finished.intended,
                });
            }
            if let Some((reply_bytes, first_difference)) = mismatch {
                recorder.record_mismatch(Mismatch {
                    connection: finished.connection,
                    task: 0,
                    sequence: finished.sequence,
                    request_bytes: finished.request_bytes,
                    reply_bytes,
                    first_difference,
                });
            }
        }
        Err(class) if finished.measured => recorder.record_service_error(finished.service, class),
        Err(_) => recorder.record_warmup_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_arrivals_are_evenly_spaced_without_drift() {
        // Proves offsets are i/R exactly, even after a million arrivals.
        let mut schedule = Schedule::new(Arrival::Constant, 3000.0, 1);
        assert_eq!(schedule.next_offset(), Duration::ZERO);
        let second = schedule.next_offset();
        assert!((second.as_secs_f64() - 1.0 / 3000.0).abs() < 1e-9);
        let mut last = second;
        for _ in 2..1_000_000 {
            last = schedule.next_offset();
        }
        assert!((last.as_secs_f64() - 999_999.0 / 3000.0).abs() < 1e-6);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_and_exponential_gaps() {
        // Proves the Poisson schedule's count per second and its gap variability (cv = 1).
        let mut schedule = Schedule::new(Arrival::Poisson, 1000.0, 7);
        let offsets: Vec<f64> = (0..100_000)
            .map(|_| schedule.next_offset().as_secs_f64())
            .collect();
        let rate = offsets.len() as f64 / offsets.last().unwrap();
        assert!((rate - 1000.0).abs() < 15.0, "rate {rate}");
        let gaps: Vec<f64> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|gap| *gap >= 0.0));
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let variance = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        let cv = variance.sqrt() / mean;
        assert!((cv - 1.0).abs() < 0.02, "cv {cv}");
        // Same seed, same schedule.
        let mut again = Schedule::new(Arrival::Poisson, 1000.0, 7);
        assert_eq!(again.next_offset().as_secs_f64(), offsets[0]);
    }

    #[test]
    fn a_late_call_is_charged_its_lateness() {
        // Proves the recorded latency runs from the intended time, the uncorrected from the send.
        let intended = Instant::now();
        let finished = Finished {
            intended,
            sent: intended + Duration::from_millis(40),
            done: intended + Duration::from_millis(43),
            service: 0,
            measured: true,
            connection: 0,
            sequence: 1,
            request_bytes: 7,
            result: Ok(None),
        };
        let mut recorder = Recorder::new();
        record(&mut recorder, finished);
        let corrected = recorder.latency().unwrap().max;
        let uncorrected = recorder.latency_uncorrected().unwrap().max;
        assert!((42_900..=43_100).contains(&corrected), "{corrected}");
        assert!((2_990..=3_010).contains(&uncorrected), "{uncorrected}");
        assert!((39_900..=40_100).contains(&recorder.send_lag().unwrap().max));
    }
}
