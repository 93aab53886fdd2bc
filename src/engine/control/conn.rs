//! One admin or metrics connection of the control thread: a non-blocking socket, the request it
//! has sent so far, and the answer being written back. One request per connection; the
//! connection closes after its answer.
//!
//! ```text
//!   Reading --whole request--> (the control thread gathers if it needs to) --> Writing
//!   Reading --`reload`, `upgrade`--> Awaiting --the command's outcome--> Writing
//!   Awaiting --hang-up, deadline--> (close)
//!   Reading --EOF, error, deadline--> (close)
//!   Writing --all written: shutdown(SHUT_WR)--> (close)
//!   Writing --error, deadline--> (close)
//! ```
//!
//! It never blocks: every read and write is non-blocking and bounded (the request by
//! `ADMIN_LINE_BYTES_MAX` or `metrics::REQUEST_HEAD_BYTES_MAX`), and the control thread closes
//! a connection that is not done by its deadline. Request bytes are untrusted: a bad request
//! gets an error answer, never a panic.

use std::os::fd::OwnedFd;
use std::time::Instant;

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use super::admin::{self, Line, ADMIN_LINE_BYTES_MAX};
use crate::metrics::{self, ExpositionFormat, HttpRequest, MetricsSnapshot};

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    /// The admin socket: one command line (`status`, `pause NAME`, ...), answered with one
    /// line.
    Admin,
    /// The Prometheus endpoint: one HTTP/1.x request (`GET /metrics`, `/healthz`, `/readyz`).
    Metrics,
}

impl Protocol {
    /// The most request bytes kept: one more than an admin line may have (to tell it is too
    /// long), a whole HTTP head.
    fn request_bytes_max(self) -> usize {
        match self {
            Protocol::Admin => ADMIN_LINE_BYTES_MAX + 1,
            Protocol::Metrics => metrics::REQUEST_HEAD_BYTES_MAX,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Reading its request (`request[..filled]` so far).
    Reading,
    /// Its command runs (a reload, an upgrade): nothing to read or write until its outcome.
    Awaiting(Awaited),
    /// Writing `answer[written..]`.
    Writing { answer: Vec<u8>, written: usize },
}

/// A command whose outcome comes later, from the control thread's own loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Awaited {
    /// A configuration reload (its new workers coming up on every core).
    Reload,
    /// A binary upgrade (the new bridge getting ready, or failing).
    Upgrade,
}

/// What the control thread should do with a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Wait for it to become readable (or writable) again.
    Wait,
    /// Its answer needs every core's report: gather, then `answer_status`, `answer_metrics` or
    /// `answer_ready`.
    Gather(Wants),
    /// It asks for a configuration reload: start one (or join the one running), then
    /// `await_outcome`.
    Reload,
    /// Close it.
    Close,
    /// An `upgrade` command: start one (or join the one under way), then `await_outcome`.
    Upgrade,
}

/// What a whole request asks for, when it needs the cores' reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Wants {
    Status,
    /// Another admin command line (`pause echo`, ...; parsed by `control::admin`).
    Admin(String),
    Metrics {
        with_body: bool,
        format: ExpositionFormat,
    },
    /// `/readyz`.
    Ready {
        with_body: bool,
    },
}

pub(super) struct AuxConn {
    fd: OwnedFd,
    protocol: Protocol,
    request: Box<[u8]>,
    filled: usize,
    state: State,
    /// When it must be done, answer written or not.
    pub(super) deadline: Instant,
}

impl AuxConn {
    /// Which endpoint it came from.
    pub(super) fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub(super) fn new(fd: OwnedFd, protocol: Protocol, deadline: Instant) -> AuxConn {
        AuxConn {
            fd,
            protocol,
            request: vec![0; protocol.request_bytes_max()].into_boxed_slice(),
            filled: 0,
            state: State::Reading,
            deadline,
        }
    }

    pub(super) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether it waits to write (else to read).
    pub(super) fn writing(&self) -> bool {
        matches!(self.state, State::Writing { .. })
    }

    /// The socket is readable (or hung up): read what is there, and see whether the request
    /// is whole.
    pub(super) fn on_readable(&mut self) -> Next {
        debug_assert_eq!(self.state, State::Reading);
        loop {
            if self.filled == self.request.len() {
                // As much as a request may have: it is whole or too long (and answered so).
                return match self.on_request() {
                    Next::Wait if !self.writing() => Next::Close,
                    next => next,
                };
            }
            match rustix::net::recv(
                &self.fd,
                &mut self.request[self.filled..],
                RecvFlags::empty(),
            ) {
                Ok((0, _)) => return Next::Close,
                Ok((n, _)) => {
                    self.filled += n;
                    match self.on_request() {
                        Next::Wait if !self.writing() => {}
                        next => return next,
                    }
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Next::Wait,
                Err(error) => {
                    tracing::debug!(%error, "an admin or metrics connection failed");
                    return Next::Close;
                }
            }
        }
    }

    /// Look at the request so far: answer it, ask for a gathering, or wait for more.
    fn on_request(&mut self) -> Next {
        let request = &self.request[..self.filled];
        match self.protocol {
            Protocol::Admin => match admin::frame_line(request) {
                Line::Incomplete => Next::Wait,
                Line::TooLong => self.answer(admin::LINE_TOO_LONG.to_vec()),
                Line::Command(command) => match command.as_str() {
                    "status" => Next::Gather(Wants::Status),
                    "reload" => Next::Reload,
                    "upgrade" => Next::Upgrade,
                    _ => Next::Gather(Wants::Admin(command)),
                },
            },
            // `/healthz` and every error are answered here, without the cores.
            Protocol::Metrics => match metrics::parse_request(request) {
                Ok(HttpRequest::Incomplete) => Next::Wait,
                Ok(HttpRequest::Metrics { with_body, format }) => {
                    Next::Gather(Wants::Metrics { with_body, format })
                }
                Ok(HttpRequest::Ready { with_body }) => Next::Gather(Wants::Ready { with_body }),
                Err(response) => self.answer(response),
            },
        }
    }

    /// Answer a `status` command with the JSON document (or the reason there is none).
    pub(super) fn answer_status(&mut self, status: Result<&crate::status::Status, String>) -> Next {
        debug_assert_eq!(self.protocol, Protocol::Admin);
        let answer = match status {
            Ok(status) => {
                let mut json = serde_json::to_vec(status).expect("status serializes");
                json.push(b'\n');
                json
            }
            Err(reason) => format!("error: {reason}\n").into_bytes(),
        };
        self.answer(answer)
    }

    /// Answer an admin command other than `status` with its one line: `ok: RESULT` or
    /// `error: REASON`.
    pub(super) fn answer_command(&mut self, result: Result<String, String>) -> Next {
        debug_assert_eq!(self.protocol, Protocol::Admin);
        let line = match result {
            Ok(result) => format!("ok: {result}\n"),
            Err(reason) => format!("error: {reason}\n"),
        };
        self.answer(line.into_bytes())
    }

    /// Answer `GET`/`HEAD /metrics` with the snapshot (or a 503 saying why there is none).
    pub(super) fn answer_metrics(
        &mut self,
        snapshot: Result<MetricsSnapshot, String>,
        with_body: bool,
        format: ExpositionFormat,
    ) -> Next {
        debug_assert_eq!(self.protocol, Protocol::Metrics);
        let response = match snapshot {
            Ok(snapshot) => metrics::metrics_response(&snapshot, format, with_body),
            Err(reason) => metrics::unavailable_response(&reason),
        };
        self.answer(response)
    }

    /// Wait, without reading, for the outcome of `command` (until `deadline`).
    pub(super) fn await_outcome(&mut self, command: Awaited, deadline: Instant) {
        debug_assert_eq!(self.protocol, Protocol::Admin);
        debug_assert_eq!(self.state, State::Reading);
        self.state = State::Awaiting(command);
        self.deadline = deadline;
    }

    /// The command whose outcome it waits for, if any (then only its hang-up is polled for).
    pub(super) fn awaiting(&self) -> Option<Awaited> {
        match self.state {
            State::Awaiting(command) => Some(command),
            _ => None,
        }
    }

    /// Answer a command it waited for (or one refused at once) with its result line.
    pub(super) fn answer_line(&mut self, line: String) -> Next {
        self.answer(line.into_bytes())
    }

    /// Answer `GET`/`HEAD /readyz`: 200, or 503 with one line per condition that fails.
    pub(super) fn answer_ready(&mut self, not_ready: &[String], with_body: bool) -> Next {
        debug_assert_eq!(self.protocol, Protocol::Metrics);
        self.answer(metrics::readiness_response(not_ready, with_body))
    }

    /// Start writing the answer (and write what the socket takes now).
    fn answer(&mut self, answer: Vec<u8>) -> Next {
        debug_assert!(matches!(self.state, State::Reading | State::Awaiting(_)));
        self.state = State::Writing { answer, written: 0 };
        self.on_writable()
    }

    /// The socket is writable: write what is left; once all is written, send FIN (so that a
    /// client's unread bytes cannot turn the close into a reset that eats the answer) and close.
    pub(super) fn on_writable(&mut self) -> Next {
        let State::Writing { answer, written } = &mut self.state else {
            unreachable!("writable while reading");
        };
        while *written < answer.len() {
            match rustix::net::send(&self.fd, &answer[*written..], SendFlags::NOSIGNAL) {
                Ok(n) => *written += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Next::Wait,
                Err(error) => {
                    tracing::debug!(%error, "sending to an admin or metrics connection failed");
                    return Next::Close;
                }
            }
        }
        let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Write);
        self.discard_input();
        Next::Close
    }

    /// Read and drop what the client sent beyond its request (an over-long line, a body), so
    /// that closing with unread bytes does not reset the connection under the answer. Bounded:
    /// a client still sending after this gets its reset.
    fn discard_input(&mut self) {
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            match rustix::net::recv(&self.fd, &mut scratch, RecvFlags::empty()) {
                Ok((0, _)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
