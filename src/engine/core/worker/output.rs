//! A worker's stdout and stderr: read from their pipes, cut into lines, escaped, and logged
//! within the service's line budget (`log_lines_per_second`).

use crate::engine::core::*;

impl Core {
    pub(in crate::engine::core) fn arm_worker_pipe(&mut self, index: WorkerHandle, stderr: bool) {
        let worker = &mut self.workers[index];
        let kind = if stderr {
            OpKind::WorkerStderr
        } else {
            OpKind::WorkerStdout
        };
        let token = Token::worker(kind, index);
        let pipe = if stderr {
            &mut worker.stderr
        } else {
            &mut worker.stdout
        };
        if pipe.read != PipeRead::Idle {
            return;
        }
        pipe.read = PipeRead::Reading;
        let entry = op::read(pipe.fd.as_raw_fd(), &mut pipe.buf[..], token);
        self.ring.push(entry);
    }

    pub(in crate::engine::core) fn on_worker_pipe(
        &mut self,
        index: WorkerHandle,
        stderr: bool,
        result: Result<u32, Errno>,
    ) {
        let now = self.now;
        let worker = &mut self.workers[index];
        let Service { name, output, .. } = &mut self.services[worker.service];
        let mut out = WorkerOutput {
            service: name,
            pid: worker.pid,
            stream: if stderr { "stderr" } else { "stdout" },
            budget: output,
            suppressed: &mut self.counters.worker_lines_suppressed,
            now,
        };
        let pipe = if stderr {
            &mut worker.stderr
        } else {
            &mut worker.stdout
        };
        debug_assert_eq!(pipe.read, PipeRead::Reading);
        pipe.read = PipeRead::Idle;
        let Ok(read @ 1..) = result else {
            pipe.read = PipeRead::Closed;
            if !pipe.line.is_empty() {
                out.line(&pipe.line);
                pipe.line.clear();
            }
            return;
        };
        let data = &pipe.buf[..read as usize];
        for piece in data.split_inclusive(|b| *b == b'\n') {
            if let Some(line) = piece.strip_suffix(b"\n") {
                pipe.line.extend_from_slice(line);
                out.line(&pipe.line);
                pipe.line.clear();
            } else {
                pipe.line.extend_from_slice(piece);
                if pipe.line.len() >= PIPE_READ_BYTES {
                    out.line(&pipe.line);
                    pipe.line.clear();
                }
            }
        }
        self.arm_worker_pipe(index, stderr);
    }
}

/// A token bucket for a service's worker output lines: `rate` per second, bursts up to twice
/// that. Lines over it are dropped and counted, then summed up in one line.
pub(in crate::engine::core) struct OutputBudget {
    rate: u32,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl OutputBudget {
    pub(in crate::engine::core) fn new(rate: u32, now: Instant) -> OutputBudget {
        OutputBudget {
            rate,
            tokens: f64::from(rate) * 2.0,
            refilled: now,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; `Some(n)` first when `n` lines were suppressed
    /// since the last one logged (to be said before it).
    fn take(&mut self, now: Instant) -> (bool, Option<u64>) {
        if self.rate == 0 {
            return (true, None);
        }
        let rate = f64::from(self.rate);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate * 2.0);
        self.refilled = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return (false, None);
        }
        self.tokens -= 1.0;
        let suppressed = std::mem::take(&mut self.suppressed);
        (true, (suppressed > 0).then_some(suppressed))
    }
}

/// Where one read of a worker's output goes: the log, within its service's line budget.
struct WorkerOutput<'a> {
    service: &'a str,
    pid: i32,
    stream: &'static str,
    budget: &'a mut OutputBudget,
    suppressed: &'a mut u64,
    now: Instant,
}

impl WorkerOutput<'_> {
    fn line(&mut self, line: &[u8]) {
        match self.budget.take(self.now) {
            (false, _) => *self.suppressed += 1,
            (true, earlier) => {
                if let Some(count) = earlier {
                    tracing::warn!(
                        service = self.service,
                        "suppressed {count} lines of worker output (over log_lines_per_second)"
                    );
                }
                log_worker_line(self.service, self.pid, self.stream, line);
            }
        }
    }
}

pub(in crate::engine::core) fn log_worker_line(service: &str, pid: i32, stream: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    // A worker's bytes, escaped: no raw CR, ESC or other control character reaches the log.
    let text = crate::logging::escape_controls(text.trim_end());
    tracing::info!(target: "acgi_bridge::worker_output", service, pid, stream, "{}", text);
}
