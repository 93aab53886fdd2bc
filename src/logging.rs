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
//!
//! What a line looks like is decided here, on the thread that logs, before it enters the
//! queue (so the queue's guarantees hold for every format):
//! - `--log-format text` (the default): tracing's usual `TIME LEVEL target: message k=v`.
//! - `--log-format json`: one JSON object per line, `time` (RFC 3339, UTC), `level`,
//!   `target`, `message`, then every field of the event under its own name (a field named
//!   like one of those four is written `field.NAME`).
//! - Under journald (`JOURNAL_STREAM` names stderr's device and inode, as systemd sets it for
//!   `StandardError=journal`), each line starts with its syslog priority, `<3>` for ERROR,
//!   `<4>` WARN, `<6>` INFO, `<7>` DEBUG and TRACE (sd-daemon(3)): journald strips the prefix
//!   and files the line at that priority. A `JOURNAL_STREAM` that names another file (inherited
//!   by a process whose stderr was redirected) is ignored, as systemd documents.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// How log lines are written (`serve --log-format`); the access log follows it too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL target: message key=value ...`; the access log: `key=value ...`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the subscriber (filter in `EnvFilter` syntax; `RUST_LOG` overrides it). Keep the
/// guard until the end of `main`: dropping it flushes what is queued (waiting a bounded time).
pub fn init(filter: &str, format: LogFormat) -> WorkerGuard {
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
    let journald = stderr_is_journal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal() && !journald)
        .event_format(LineFormat {
            format,
            journald,
            text: Format::default(),
        })
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
pub(crate) fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
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

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=DEV:INODE`, the
/// device and inode of that stream, matching stderr's own: systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value, stat.st_dev, stat.st_ino)
}

/// Whether a `JOURNAL_STREAM` value names this device and inode.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// The syslog priority journald files a line of this level at (sd-daemon(3)'s `SD_ERR`,
/// `SD_WARNING`, `SD_INFO`, `SD_DEBUG`).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The event formatter: the priority prefix under journald, then text or JSON.
struct LineFormat {
    format: LogFormat,
    journald: bool,
    text: Format,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.journald {
            write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        }
        match self.format {
            LogFormat::Text => self.text.format_event(ctx, writer, event),
            LogFormat::Json => {
                writeln!(writer, "{}", json_line(SystemTime::now(), event))
            }
        }
    }
}

/// One event as a JSON object (without the newline).
fn json_line(time: SystemTime, event: &Event<'_>) -> String {
    let metadata = event.metadata();
    let mut fields = JsonFields(serde_json::Map::new());
    fields
        .0
        .insert("time".into(), rfc3339(time).to_string().into());
    fields
        .0
        .insert("level".into(), metadata.level().as_str().into());
    fields.0.insert("target".into(), metadata.target().into());
    event.record(&mut fields);
    fields
        .0
        .entry("message")
        .or_insert_with(|| serde_json::Value::String(String::new()));
    serde_json::Value::Object(fields.0).to_string()
}

/// Collects an event's fields as JSON values (numbers and booleans as such, the rest as text).
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        let name = field.name();
        let key = match name {
            "time" | "level" | "target" => format!("field.{name}"),
            "message" if self.0.contains_key("message") => "field.message".to_string(),
            _ => name.to_string(),
        };
        self.0.insert(key, value);
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// A wall-clock time as RFC 3339 in UTC with microseconds (`2026-12-02T03:01:00.123456Z`).
pub fn rfc3339(time: SystemTime) -> impl std::fmt::Display {
    Rfc3339(time)
}

struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let seconds = since.as_secs();
        let (days, of_day) = (seconds / 86_400, seconds % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60,
            since.subsec_micros()
        )
    }
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
    fn times_are_rfc3339_utc() {
        // Proves the calendar arithmetic on known instants (epoch, a leap day, microseconds).
        let at = |secs: u64, micros: u64| {
            let time =
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            rfc3339(time).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_094_061, 123_456), "2026-12-01T03:01:01.123456Z");
    }

    #[test]
    fn journal_stream_must_name_stderr_and_levels_map_to_priorities() {
        // Proves the JOURNAL_STREAM match (device and inode, both) and sd-daemon's priorities.
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1235", 8, 1234));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("garbage", 8, 1234));
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::DEBUG), 7);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }

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
