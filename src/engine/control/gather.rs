//! Asking the cores: every question from outside the cores (the control thread's status,
//! metrics, interval log and admin commands, and startup's wait for the first workers) is a
//! message to each core's inbox and a bounded wait for every answer.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Control;
use crate::engine::report::CoreReport;
use crate::engine::shared::{Msg, Shared};

/// How long a gathering waits for every core's report before it gives up.
const REPORT_WAIT_MAX: Duration = Duration::from_secs(1);
/// While waiting for reports, how often to look whether the cores have all finished (then
/// nobody will answer).
const REPORT_WAIT_STEP: Duration = Duration::from_millis(50);

/// Why a gathering of the cores' reports failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatherError {
    #[error("{answered} of {cores} cores reported within {waited:?} (the bridge is stopping or a core is stuck)")]
    Unanswered {
        answered: usize,
        cores: usize,
        waited: Duration,
    },
}

impl Control {
    /// Ask every core (see [`gather_from_cores`]).
    pub(super) fn gather_from_cores<T>(
        &self,
        make: impl Fn(mpsc::Sender<T>) -> Msg,
    ) -> Result<Vec<T>, GatherError> {
        gather_from_cores(&self.shared, make)
    }

    /// Ask every core for its report (`end_interval`: and to start a new latency interval),
    /// wait for them all (bounded), and merge them, with this thread's counts.
    pub(super) fn gather(&mut self, end_interval: bool) -> Result<CoreReport, GatherError> {
        let mut merged = *gather_reports(&self.shared, end_interval)?;
        merged.counters.add(&self.counters);
        // Lines the log writer dropped are counted by the process, not by a core.
        merged.counters.log_lines_dropped = crate::logging::lines_dropped();
        merged.counters.access_log_lines_dropped = crate::access_log::lines_dropped();
        // So do the TLS threads'.
        crate::engine::tls::add_counters(&mut merged.counters);
        Ok(merged)
    }
}

/// Send every core the message `make` builds around a reply channel, and wait (at most
/// `REPORT_WAIT_MAX`, normally microseconds: a core answers from its next loop turn) for every
/// core's answer. The one way anything outside the cores asks them something: the control
/// thread, and startup waiting for the first workers (`engine::run`).
fn gather_from_cores<T>(
    shared: &Shared,
    make: impl Fn(mpsc::Sender<T>) -> Msg,
) -> Result<Vec<T>, GatherError> {
    let cores = shared.cores.len();
    let started = Instant::now();
    let unanswered = |answered| GatherError::Unanswered {
        answered,
        cores,
        waited: started.elapsed(),
    };
    if shared.all_cores_finished() {
        return Err(unanswered(0));
    }
    let (reply, answers) = mpsc::channel();
    for core in shared.cores.indices() {
        shared.send(core, make(reply.clone()));
    }
    drop(reply);
    let deadline = started + REPORT_WAIT_MAX;
    let mut gathered = Vec::with_capacity(cores);
    while gathered.len() < cores {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(REPORT_WAIT_STEP);
        match answers.recv_timeout(wait) {
            Ok(answer) => gathered.push(answer),
            Err(mpsc::RecvTimeoutError::Timeout)
                if Instant::now() < deadline && !shared.all_cores_finished() => {}
            Err(_) => return Err(unanswered(gathered.len())),
        }
    }
    Ok(gathered)
}

/// Every core's report (`end_interval`: each starts a new latency interval), merged.
pub(crate) fn gather_reports(
    shared: &Shared,
    end_interval: bool,
) -> Result<Box<CoreReport>, GatherError> {
    let reports = gather_from_cores(shared, |reply| Msg::Report {
        end_interval,
        reply,
    })?;
    let mut reports = reports.into_iter();
    let mut merged = reports.next().expect("at least one core");
    for report in reports {
        merged.add(&report);
    }
    Ok(merged)
}
