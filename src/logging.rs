//! The bridge's own log output, which can neither block nor end it.
//!
//! Log lines go into a bounded queue that a writer thread empties into stderr
//! (`tracing-appender`'s non-blocking writer, lossy): a core that logs never waits for the
//! reader of stderr. When the reader stalls (a full pipe) the queue fills, and further lines
//! are dropped and counted ([`lines_dropped`]) instead of stalling every core; a watcher logs
//! how many were dropped once lines get through again. When the reader goes away, the writes
//! fail with EPIPE, which the writer thread survives (SIGPIPE is ignored, as in every Rust
//! program), so the bridge goes on serving without logs.
//!
//! Bound: at most [`LOG_LINES_BUFFERED_MAX`] lines wait, each at most a few KiB (worker output
//! lines are cut at 4 KiB), so the queue holds at most about 16 MiB.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines that may wait for the log reader; beyond that, new lines are dropped and counted.
pub const LOG_LINES_BUFFERED_MAX: usize = 4096;

/// How often the watcher looks whether lines were dropped.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped since start because the log reader did not keep up.
pub fn lines_dropped() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Install the subscriber (filter in `EnvFilter` syntax; `RUST_LOG` overrides it). Keep the
/// guard until the end of `main`: dropping it flushes what is queued (waiting a bounded time).
pub fn init(filter: &str) -> WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    // The writer thread and the watcher must never take a signal meant for the bridge (a
    // thread that does not block SIGTERM would get it with its default action: the process
    // ends at once). Threads inherit the mask they are created with.
    let (writer, guard) = with_signals_blocked(|| {
        NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(LOG_LINES_BUFFERED_MAX)
            .thread_name("acgi-log")
            .finish(std::io::stderr())
    });
    let _ = DROPPED.set(writer.error_counter());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    with_signals_blocked(|| {
        std::thread::Builder::new()
            .name("acgi-log-drops".into())
            .spawn(report_drops)
            .expect("start the log drop watcher")
    });
    guard
}

/// Run `f` (which starts threads) with every asynchronous signal blocked in this thread, so
/// that the threads it starts block them for good; then restore this thread's mask.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset operations on local values, and pthread_sigmask on the calling thread;
    // the signals a fault raises (SEGV, BUS, FPE, ILL, TRAP) stay unblocked.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        for signal in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut all, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

/// Say, through the log itself, how many lines were dropped (if the line is dropped too, the
/// next look counts it again).
fn report_drops() {
    let mut reported = 0;
    loop {
        std::thread::sleep(DROP_REPORT_INTERVAL);
        let dropped = lines_dropped();
        if dropped > reported {
            tracing::warn!(
                dropped_lines = dropped - reported,
                dropped_lines_total = dropped,
                "log lines were dropped: the reader of the bridge's stderr is not keeping up"
            );
            reported = dropped;
        }
    }
}

/// `text` with every C0 control character and DEL escaped (`\n`, `\r`, `\t`, `\x1b`, ...), so
/// that a line from a worker cannot forge log lines, move the cursor or recolour a terminal.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_ascii_control()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_text_is_kept() {
        // Proves a worker's line cannot carry a raw CR, ESC or NUL into the log.
        assert!(matches!(escape_controls("plain text é"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\rb\x1b[31mc\x00d\te\x7f"),
            "a\\rb\\x1b[31mc\\x00d\\te\\x7f"
        );
    }
}
