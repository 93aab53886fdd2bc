//! Shutdown: stop accepting, drain the pools, force what is left after the timeout, and end
//! the loop once every core is done. A drain for a binary upgrade (`Msg::Drain`) is the same
//! stop, except that each connection ends with the drain notice once it has nothing in flight,
//! and a connection accepted after the drain began gets the notice instead of a bare close
//! (docs/protocol.md §2.6): its caller then knows that nothing unanswered ran, and resends it
//! to the new bridge.

use super::*;

/// The drain notice's message (its code, 6, and request id 0 are what callers look at).
const DRAIN_NOTICE: &str = "draining: a new bridge took over; nothing unanswered on this \
                            connection has run: reconnect and resend it";

/// Where a core is in its life. A stop has a reason and a stage, so "draining but not
/// stopping" or "forced but not stopping" cannot be written:
///
/// ```text
///   Running --Shutdown / Drain--> Stopping { Answering { deadline: now + shutdown_timeout_ms } }
///   Answering --deadline (or Shutdown { now: true })--> Flushing { deadline: now + grace }
///             (what still runs or waits is failed, workers are killed)
///   Flushing --deadline--> Closed (every connection closed: slow callers are not waited for)
///   any stage --pools stopped, no worker, connection or forward left--> Done
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Life {
    Running,
    Stopping { why: Stop, stage: Stage },
}

/// Why a core stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// SIGTERM or SIGINT (`Msg::Shutdown`): late callers are refused.
    Signal,
    /// A new bridge took over (`Msg::Drain`): connections end with the drain notice
    /// (`send_drain_notice`), and late ones get it instead of a bare close.
    Drain,
}

/// How far a stop has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// Finishing what is in flight until `deadline` (`shutdown_timeout_ms`).
    Answering { deadline: Instant },
    /// The timeout passed: what was still in flight was failed; its answers may go out until
    /// `deadline` (`SHUTDOWN_FLUSH_GRACE`).
    Flushing { deadline: Instant },
    /// The grace passed too: every connection was closed; the last ops and workers end.
    Closed,
    /// This core's work is done and it counted itself in `Shared::cores_finished`.
    Done,
}

impl Core {
    /// Whether this core has begun to stop (a signal or a drain).
    pub(super) fn stopping(&self) -> bool {
        matches!(self.life, Life::Stopping { .. })
    }

    /// Whether this core stops for a binary upgrade (connections get the drain notice).
    pub(super) fn draining(&self) -> bool {
        matches!(
            self.life,
            Life::Stopping {
                why: Stop::Drain,
                ..
            }
        )
    }

    /// When the stop moves to its next stage, if it is waiting for one.
    pub(super) fn stop_deadline(&self) -> Option<Instant> {
        match self.life {
            Life::Stopping {
                stage: Stage::Answering { deadline } | Stage::Flushing { deadline },
                ..
            } => Some(deadline),
            _ => None,
        }
    }

    /// `Msg::Shutdown { now: false }` or `Msg::Drain`: begin the stop (a drain that follows
    /// a signal's stop turns it into a drain, so that connections still get the notice).
    pub(super) fn on_stop(&mut self, why: Stop) {
        match &mut self.life {
            Life::Running => self.begin_shutdown(why),
            Life::Stopping { why: was, .. } => {
                if why == Stop::Drain {
                    *was = Stop::Drain;
                }
            }
        }
    }

    /// `Msg::Shutdown { now: true }` (a second signal): stop waiting for what is in flight.
    pub(super) fn on_stop_now(&mut self) {
        if self.life == Life::Running {
            self.begin_shutdown(Stop::Signal);
        }
        if let Life::Stopping {
            stage: Stage::Answering { deadline } | Stage::Flushing { deadline },
            ..
        } = &mut self.life
        {
            *deadline = self.now;
        }
    }

    /// The stop's deadline passed: on to its next stage.
    pub(super) fn on_stop_deadline(&mut self) {
        let now = self.now;
        let Life::Stopping { stage, .. } = &mut self.life else {
            return;
        };
        match *stage {
            Stage::Answering { deadline } if deadline <= now => {
                *stage = Stage::Flushing {
                    deadline: now + SHUTDOWN_FLUSH_GRACE,
                };
                self.force_shutdown();
            }
            Stage::Flushing { deadline } if deadline <= now => {
                // The answers had their moment to go out: stop waiting for slow callers.
                *stage = Stage::Closed;
                let conns = self.conns.handles();
                for index in conns {
                    self.close_conn(index);
                }
            }
            _ => {}
        }
    }

    /// End a connection with nothing in flight with the drain notice (Error 6, request id 0):
    /// read no more from it, and close it once the notice is sent.
    pub(super) fn send_drain_notice(&mut self, index: ConnHandle) {
        debug_assert!(self.draining());
        debug_assert_eq!(self.conns[index].requests_in_flight, 0);
        self.counters.connections_drained += 1;
        let header = Header::error(0, 0, ErrorCode::ShuttingDown, DRAIN_NOTICE.len() as u32);
        self.answer(index, &header, DRAIN_NOTICE.as_bytes());
        // As after a malformed frame: nothing read from now on is looked at.
        self.close_after_answers(index);
    }

    /// A connection that reached us after the drain began: it has sent nothing we read, so it
    /// gets the notice at once (one non-blocking send on a fresh socket) and is closed.
    pub(super) fn refuse_with_drain_notice(&mut self, fd: &OwnedFd) {
        debug_assert!(self.draining());
        self.counters.connections_drained += 1;
        let header = Header::error(0, 0, ErrorCode::ShuttingDown, DRAIN_NOTICE.len() as u32);
        let mut frame = Vec::with_capacity(HEADER_BYTES + DRAIN_NOTICE.len());
        proto::encode_frame(&mut frame, &header, DRAIN_NOTICE.as_bytes());
        let flags = rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT;
        if let Err(error) = rustix::net::send(fd, &frame, flags) {
            tracing::debug!(%error, "a late caller did not take the drain notice");
        }
    }

    fn begin_shutdown(&mut self, why: Stop) {
        let timeout = Duration::from_millis(self.config.shutdown_timeout_ms);
        self.life = Life::Stopping {
            why,
            stage: Stage::Answering {
                deadline: self.now + timeout,
            },
        };
        for index in self.listeners.indices() {
            self.listeners[index].rearm_at = None;
            if self.listeners[index].accept_in_flight {
                self.ring.cancel(Token::accept(index));
            }
        }
        for service in self.services.indices() {
            let now = self.now;
            self.services[service].pool.begin_stop(now);
            self.pool_touched(service);
        }
        let conns = self.conns.handles();
        for index in conns {
            self.close_conn_if_finished(index);
        }
    }

    /// The shutdown timeout passed: answer every request still running or queued with
    /// `shutting down`, kill every worker, and give the answers a moment to go out.
    fn force_shutdown(&mut self) {
        tracing::warn!("shutdown timeout passed: failing requests still in flight");
        // A request a worker was running may have had effects: during a drain it gets error 4
        // (maybe ran), since a caller resends whatever gets error 6 (never ran) to the new
        // bridge. A plain stop keeps answering it with 6, as it always has.
        let running_code = if self.draining() {
            ErrorCode::WorkerFailed
        } else {
            ErrorCode::ShuttingDown
        };
        let mut held = Vec::new();
        for (_, worker) in self.workers.iter_mut() {
            worker
                .fate
                .get_or_insert_with(|| "killed: the bridge's shutdown timeout passed".into());
            if let WorkerState::Busy(Job { request, .. }) = worker.state {
                held.push((request, running_code));
            }
            held.extend(
                worker
                    .queued
                    .iter()
                    .map(|job| (job.request, ErrorCode::ShuttingDown)),
            );
        }
        for (request, code) in held {
            if self.request_is_live(request) {
                let message = "the bridge's shutdown timeout passed while it ran";
                self.fail_request(request, code, message);
            }
        }
        for service in self.services.indices() {
            self.services[service].pool.abort(ErrorCode::ShuttingDown);
            self.pool_touched(service);
        }
    }

    /// Whether the loop may end: this core's work is done and so is every other core's (a
    /// core that is done keeps answering report requests until all are).
    pub(super) fn finished(&mut self) -> bool {
        let Life::Stopping { why, stage } = self.life else {
            return false;
        };
        if stage == Stage::Done {
            return self.all_cores_done();
        }
        if !self.pools_stopped() || !self.workers.is_empty() {
            return false;
        }
        let conns = self.conns.handles();
        for index in conns {
            self.close_conn_if_finished(index);
        }
        let mine_done = self.conns.is_empty()
            && self.listeners.iter().all(|l| !l.accept_in_flight)
            && self.shared.forwards_in_flight.load(Ordering::SeqCst) == 0
            && self.shared.inbox_empty(self.index);
        if !mine_done {
            return false;
        }
        self.life = Life::Stopping {
            why,
            stage: Stage::Done,
        };
        let finished = self.shared.cores_finished.fetch_add(1, Ordering::SeqCst) + 1;
        if finished == self.shared.cores.len() {
            self.wake_all();
        }
        self.all_cores_done()
    }

    pub(super) fn all_cores_done(&self) -> bool {
        self.shared.all_cores_finished()
    }
}
