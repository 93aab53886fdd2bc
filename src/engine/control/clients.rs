//! The control thread's admin and metrics connections: accepting them within each endpoint's
//! budget (the admin socket only from root or the bridge's own user), answering each once it
//! has sent its request, and closing those past their deadline.

use std::time::Instant;

use rustix::event::PollFlags;
use rustix::io::Errno;
use rustix::net::SocketFlags;

use std::os::fd::AsFd;

use super::conn::{AuxConn, Awaited, Next, Protocol, Wants};
use super::reload;
use super::{Control, ADMIN_CONNECTIONS_MAX, AUX_CONNECTION_TIMEOUT, METRICS_CONNECTIONS_MAX};
use crate::engine::report;

/// Connections accepted from one listener per loop turn at most (the rest wait a turn).
const ACCEPTS_PER_TURN_MAX: usize = 64;

impl Control {
    /// A listener has connections waiting: take them (refusing those over the budget).
    pub(super) fn on_acceptable(&mut self, protocol: Protocol) {
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let listener = match protocol {
                Protocol::Admin => self.admin.as_ref(),
                Protocol::Metrics => self.metrics.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            match rustix::net::accept_with(listener.as_fd(), flags) {
                Ok(fd) => {
                    let budget = match protocol {
                        Protocol::Admin => ADMIN_CONNECTIONS_MAX,
                        Protocol::Metrics => METRICS_CONNECTIONS_MAX,
                    };
                    let open = self
                        .conns
                        .iter()
                        .filter(|c| c.protocol() == protocol)
                        .count();
                    if open >= budget {
                        self.counters.connections_refused += 1;
                        tracing::debug!(
                            connections = self.conns.len(),
                            "refusing an admin or metrics connection"
                        );
                        continue;
                    }
                    if protocol == Protocol::Metrics {
                        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
                    }
                    if protocol == Protocol::Admin && !admin_peer_allowed(&fd) {
                        // Only the bridge's own user and root may run admin commands: not a
                        // worker running as another user, whatever the socket's mode says.
                        self.counters.connections_refused += 1;
                        tracing::warn!("refusing an admin connection from another user");
                        continue;
                    }
                    let deadline = Instant::now() + AUX_CONNECTION_TIMEOUT;
                    self.conns.push(AuxConn::new(fd, protocol, deadline));
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return,
                Err(error) => {
                    // Out of descriptors, say: the connection waits in the backlog.
                    tracing::warn!(%error, "accepting an admin or metrics connection failed");
                    return;
                }
            }
        }
    }

    /// A connection's socket is ready: read its request (gathering and answering once it is
    /// whole) or write its answer.
    pub(super) fn on_conn_ready(&mut self, index: usize, flags: PollFlags) -> Next {
        let conn = &mut self.conns[index];
        if conn.awaiting().is_some() {
            // (A reload or upgrade goes on when its asker hangs up; only the answer is lost.)
            return if flags.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                Next::Close
            } else {
                Next::Wait
            };
        }
        if conn.writing() {
            if flags.intersects(PollFlags::ERR | PollFlags::NVAL) {
                return Next::Close;
            }
            return conn.on_writable();
        }
        match conn.on_readable() {
            Next::Gather(Wants::Admin(line)) => {
                let result = self.run_admin(&line);
                self.conns[index].answer_command(result)
            }
            Next::Gather(wants) => self.answer(index, wants),
            Next::Reload => match self.start_reload() {
                Some(outcome) => self.conns[index].answer_line(reload::outcome_line(&outcome)),
                None => {
                    // Past the reload's own bound, so that its outcome always reaches us.
                    let until = self
                        .reload
                        .as_ref()
                        .map_or_else(Instant::now, |r| r.deadline);
                    let deadline = until + AUX_CONNECTION_TIMEOUT;
                    self.conns[index].await_outcome(Awaited::Reload, deadline);
                    Next::Wait
                }
            },
            Next::Upgrade => self.begin_upgrade(Some(index)),
            next => next,
        }
    }

    /// Gather every core's report and answer connection `index` from it.
    pub(super) fn answer(&mut self, index: usize, wants: Wants) -> Next {
        let merged = self.gather(false).map_err(|error| error.to_string());
        let conn = &mut self.conns[index];
        match wants {
            Wants::Status => {
                let uptime = self.started.elapsed();
                let status = merged.map(|merged| report::status(&self.config, &merged, uptime));
                conn.answer_status(status.as_ref().map_err(Clone::clone))
            }
            Wants::Metrics { with_body, format } => {
                let stopping = self.stopping;
                let snapshot =
                    merged.map(|merged| report::metrics_snapshot(&self.config, &merged, stopping));
                conn.answer_metrics(snapshot, with_body, format)
            }
            Wants::Admin(_) => unreachable!("answered by run_admin"),
            Wants::Ready { with_body } => {
                // Every condition that fails, each on its line (`docs/operations.md`).
                let mut not_ready = Vec::new();
                if self.stopping {
                    not_ready.push("shutting down".to_string());
                }
                match merged {
                    Ok(merged) => not_ready.extend(report::not_ready(&self.config, &merged)),
                    Err(error) => not_ready.push(format!("cores: {error}")),
                }
                conn.answer_ready(&not_ready, with_body)
            }
        }
    }

    /// A command ended: answer every admin connection waiting for it with `line`.
    pub(super) fn answer_awaiting(&mut self, command: Awaited, line: &str) {
        let mut closed = Vec::new();
        for (index, conn) in self.conns.iter_mut().enumerate() {
            if conn.awaiting() == Some(command) && conn.answer_line(line.to_string()) == Next::Close
            {
                closed.push(index);
            }
        }
        for index in closed.into_iter().rev() {
            self.conns.swap_remove(index);
        }
    }

    /// Close connections past their deadline (a client that sends half a request, or reads
    /// nothing, must not hold one of the few places for ever).
    pub(super) fn expire_conns(&mut self, now: Instant) {
        let before = self.conns.len();
        // (One awaiting a command's outcome has a deadline past that command's own bound.)
        self.conns.retain(|conn| conn.deadline > now);
        if self.conns.len() < before {
            tracing::debug!(
                closed = before - self.conns.len(),
                "closing admin or metrics connections that timed out"
            );
        }
    }
}

/// Whether the peer of an admin connection is root or the bridge's own effective user (by
/// `SO_PEERCRED`, which the peer cannot forge).
fn admin_peer_allowed(fd: &std::os::fd::OwnedFd) -> bool {
    let bridge = rustix::process::geteuid();
    rustix::net::sockopt::socket_peercred(fd)
        .is_ok_and(|cred| cred.uid.is_root() || cred.uid == bridge)
}
