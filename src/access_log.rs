//! The access log (config `access_log`, off by default): one line per answered request, for
//! operators who read traffic the way they read nginx's or PHP-FPM's access logs.
//!
//! A line says when the request was answered, which service, who called (`uid:N` for a Unix
//! caller, `ip:port` for TCP), the caller's request id, the request and reply payload sizes,
//! the outcome (`ok`, or `error` with the code and its label), how long it waited for a
//! worker and how long the worker took. The format follows `--log-format`: `key=value` pairs
//! (`text`) or one JSON object (`json`); see docs/operations.md, "Logs".
//!
//! It must never block a core: a core fills a fixed-size [`Entry`] (no allocation, no
//! formatting, no syscall) and offers it to a bounded queue of [`ACCESS_LOG_LINES_BUFFERED_MAX`]
//! entries; a writer thread formats and writes them (buffered, flushed whenever the queue is
//! empty). The writer polls the queue every [`ACCESS_LOG_DRAIN_INTERVAL`] instead of sleeping
//! in `recv`: a receiver parked in `recv` must be woken by a futex call on every send, which
//! would put a system call on the core's path for each request. When the queue is full the
//! entry is dropped and counted
//! (`access_log_lines_dropped`, in status and `/metrics`), as the bridge's own log does.
//!
//! At exit, `main` calls [`flush`], which waits a bounded time for the lines already queued.
//!
//! Reopening (SIGUSR1, for logrotate): [`reopen`] raises a flag the writer looks at after
//! every entry and every drain; it then opens the path again (appending, creating it) and
//! writes there from the next line on. If the new file cannot be opened, the old one is kept
//! and the error logged.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::logging::{rfc3339, LogFormat};
use crate::proto::ErrorCode;

/// Entries that may wait for the writer thread; beyond that, new ones are dropped and counted.
/// At 100 000 requests a second that is 160 ms of slack for a writer starved of CPU (4096 were
/// seen to overflow on a 2-vCPU machine with a load of 10); each entry takes at most
/// [`ENTRY_BYTES_MAX`], so the queue holds at most 4 MiB.
pub const ACCESS_LOG_LINES_BUFFERED_MAX: usize = 16_384;

/// Bytes an entry takes in the queue at most (checked at compile time, below).
pub const ENTRY_BYTES_MAX: usize = 256;

/// How often the writer thread empties the queue: it holds `ACCESS_LOG_LINES_BUFFERED_MAX`
/// lines, so lines are dropped only past about 3 million a second (or when the writer is
/// starved of CPU or the disk stalls).
pub const ACCESS_LOG_DRAIN_INTERVAL: Duration = Duration::from_millis(5);

/// Longest service name (config: 1-64 characters), kept inline in an [`Entry`].
const SERVICE_NAME_BYTES_MAX: usize = 64;

/// The open access log, once [`open`] has been called.
static LOG: OnceLock<AccessLog> = OnceLock::new();

struct AccessLog {
    path: PathBuf,
    queue: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
    dropped: AtomicU64,
}

// The memory bound docs/bounds.md states: at most 4 MiB queued.
const _: () = assert!(std::mem::size_of::<Message>() <= ENTRY_BYTES_MAX);
const _: () = assert!(ACCESS_LOG_LINES_BUFFERED_MAX * ENTRY_BYTES_MAX <= 4 << 20);

enum Message {
    Entry(Entry),
    /// Flush what came before, then say so (at exit: see [`flush`]).
    Flush(SyncSender<()>),
}

/// Who called, as the access and slow logs name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerAddr {
    /// A Unix-socket caller, by its uid (`SO_PEERCRED`).
    Uid(u32),
    /// A TCP caller, by its address and port.
    Tcp(SocketAddr),
}

impl std::fmt::Display for CallerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallerAddr::Uid(uid) => write!(f, "uid:{uid}"),
            CallerAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// `caller` as logged: the address, or `-` when the bridge does not know it.
pub fn caller_text(caller: Option<CallerAddr>) -> String {
    CallerText(caller).to_string()
}

/// `caller` as logged, written without an intermediate string.
struct CallerText(Option<CallerAddr>);

impl std::fmt::Display for CallerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(caller) => caller.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A service name copied inline (so that an entry is plain data, moved without allocating).
#[derive(Clone, Copy, Debug)]
pub struct ServiceName {
    len: u8,
    bytes: [u8; SERVICE_NAME_BYTES_MAX],
}

impl ServiceName {
    /// `name`, cut at 64 bytes (config names are at most that).
    pub fn new(name: &str) -> ServiceName {
        let mut end = name.len().min(SERVICE_NAME_BYTES_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; SERVICE_NAME_BYTES_MAX];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        ServiceName {
            len: end as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

/// One answered request, as a core hands it over.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// When it was answered.
    pub time: SystemTime,
    /// Its service (`-` for a request naming no service) and the id the caller used.
    pub service: ServiceName,
    pub service_id: u32,
    pub caller: Option<CallerAddr>,
    /// The caller's request id.
    pub request_id: u64,
    /// Payload bytes of the request and of the answer (reply, or error message).
    pub request_bytes: u32,
    pub reply_bytes: u32,
    /// `None`: answered with a reply; else the error code it was answered with.
    pub error: Option<ErrorCode>,
    /// From arrival to dispatch (or to the answer, for a request no worker took).
    pub queue_wait: Duration,
    /// From dispatch to the answer; `None` when no worker took it.
    pub service_time: Option<Duration>,
}

/// Open the access log at `path` (appending, created 0640 if missing) and start its writer
/// thread; lines follow `format`. Call once, at startup.
pub fn open(path: &Path, format: LogFormat) -> io::Result<()> {
    let file = open_file(path)?;
    let (queue, entries) = mpsc::sync_channel(ACCESS_LOG_LINES_BUFFERED_MAX);
    let reopen = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        path: path.to_path_buf(),
        out: BufWriter::new(file),
        format,
        reopen: Arc::clone(&reopen),
        failing: false,
        line: String::new(),
    };
    crate::logging::with_signals_blocked(|| {
        std::thread::Builder::new()
            .name("acgi-access-log".into())
            .spawn(move || writer.run(entries))
    })?;
    let log = AccessLog {
        path: path.to_path_buf(),
        queue,
        reopen,
        dropped: AtomicU64::new(0),
    };
    LOG.set(log)
        .map_err(|_| io::Error::other("the access log is already open"))
}

fn open_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Whether an access log is open (cores build entries only then).
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Offer an entry to the writer; dropped and counted when its queue is full. Never blocks.
pub fn record(entry: Entry) {
    let Some(log) = LOG.get() else {
        return;
    };
    match log.queue.try_send(Message::Entry(entry)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            log.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Ask the writer to reopen the file (SIGUSR1). Returns the path, or `None` when there is no
/// access log.
pub fn reopen() -> Option<PathBuf> {
    let log = LOG.get()?;
    log.reopen.store(true, Ordering::SeqCst);
    Some(log.path.clone())
}

/// At exit: wait (at most `limit`) until every line queued so far is written and flushed, so
/// that the last requests' lines are not lost with the process. Returns whether they were.
pub fn flush(limit: Duration) -> bool {
    let Some(log) = LOG.get() else {
        return true;
    };
    let deadline = std::time::Instant::now() + limit;
    let (done, flushed) = mpsc::sync_channel(1);
    let mut message = Message::Flush(done);
    // The queue may be full (a stalled disk): retry until the deadline, never block past it.
    loop {
        match log.queue.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                message = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    flushed.recv_timeout(left).is_ok()
}

/// Access log lines dropped since start because the writer did not keep up.
pub fn lines_dropped() -> u64 {
    LOG.get()
        .map_or(0, |log| log.dropped.load(Ordering::Relaxed))
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    format: LogFormat,
    reopen: Arc<AtomicBool>,
    /// Writing failed and that was logged (logged again only after a success).
    failing: bool,
    /// The line being formatted (kept for its capacity).
    line: String,
}

impl Writer {
    fn run(mut self, entries: Receiver<Message>) {
        loop {
            // Everything queued, then one flush: one write for a burst.
            let mut took = false;
            loop {
                match entries.try_recv() {
                    Ok(message) => {
                        self.take(message);
                        took = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                }
            }
            if took {
                self.flush();
            }
            if self.reopen.swap(false, Ordering::SeqCst) {
                self.reopen_file();
            }
            std::thread::sleep(ACCESS_LOG_DRAIN_INTERVAL);
        }
    }

    fn take(&mut self, message: Message) {
        match message {
            Message::Entry(entry) => {
                self.line.clear();
                format_entry(&mut self.line, &entry, self.format);
                let result = self.out.write_all(self.line.as_bytes());
                self.note(result);
            }
            Message::Flush(done) => {
                self.flush();
                let _ = done.try_send(());
            }
        }
        if self.reopen.swap(false, Ordering::SeqCst) {
            self.reopen_file();
        }
    }

    fn flush(&mut self) {
        let result = self.out.flush();
        self.note(result);
    }

    fn note(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.failing = false,
            Err(error) if !self.failing => {
                self.failing = true;
                tracing::error!(
                    path = %self.path.display(),
                    %error,
                    "cannot write the access log (lines are lost until it works again)"
                );
            }
            Err(_) => {}
        }
    }

    fn reopen_file(&mut self) {
        self.flush();
        match open_file(&self.path) {
            Ok(file) => {
                self.out = BufWriter::new(file);
                tracing::info!(path = %self.path.display(), "access log reopened");
            }
            Err(error) => tracing::error!(
                path = %self.path.display(),
                %error,
                "cannot reopen the access log; still writing to the file opened before \
                 (check the directory exists and the bridge may create files in it)"
            ),
        }
    }
}

/// One entry as a line (with its newline) in `format`.
pub fn format_entry(line: &mut String, entry: &Entry, format: LogFormat) {
    let caller = CallerText(entry.caller);
    let queue_wait_us = entry.queue_wait.as_micros() as u64;
    let service_time_us = entry.service_time.map(|d| d.as_micros() as u64);
    match format {
        LogFormat::Text => {
            let _ = write!(
                line,
                "time={} service={} service_id={} caller={caller} request_id={} \
                 request_bytes={} reply_bytes={} outcome=",
                rfc3339(entry.time),
                entry.service.as_str(),
                entry.service_id,
                entry.request_id,
                entry.request_bytes,
                entry.reply_bytes,
            );
            match entry.error {
                None => line.push_str("ok"),
                Some(code) => {
                    let _ = write!(
                        line,
                        "error error_code={} error={}",
                        code as u16,
                        code.metric_name()
                    );
                }
            }
            let _ = write!(line, " queue_wait_us={queue_wait_us}");
            if let Some(us) = service_time_us {
                let _ = write!(line, " service_time_us={us}");
            }
        }
        LogFormat::Json => {
            let mut object = serde_json::Map::new();
            object.insert("time".into(), rfc3339(entry.time).to_string().into());
            object.insert("service".into(), entry.service.as_str().into());
            object.insert("service_id".into(), entry.service_id.into());
            object.insert("caller".into(), caller.to_string().into());
            object.insert("request_id".into(), entry.request_id.into());
            object.insert("request_bytes".into(), entry.request_bytes.into());
            object.insert("reply_bytes".into(), entry.reply_bytes.into());
            match entry.error {
                None => {
                    object.insert("outcome".into(), "ok".into());
                }
                Some(code) => {
                    object.insert("outcome".into(), "error".into());
                    object.insert("error_code".into(), (code as u16).into());
                    object.insert("error".into(), code.metric_name().into());
                }
            }
            object.insert("queue_wait_us".into(), queue_wait_us.into());
            if let Some(us) = service_time_us {
                object.insert("service_time_us".into(), us.into());
            }
            let _ = write!(line, "{}", serde_json::Value::Object(object));
        }
    }
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(error: Option<ErrorCode>, service_time: Option<Duration>) -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(86_400),
            service: ServiceName::new("echo"),
            service_id: 1,
            caller: Some(CallerAddr::Tcp("127.0.0.1:4242".parse().unwrap())),
            request_id: 7,
            request_bytes: 64,
            reply_bytes: 12,
            error,
            queue_wait: Duration::from_micros(15),
            service_time,
        }
    }

    #[test]
    fn text_lines_are_key_value_pairs_with_every_field() {
        // Proves the text format: every field, the error's code and label, no service time
        // for a request no worker took.
        let mut line = String::new();
        let ok = entry(None, Some(Duration::from_micros(250)));
        format_entry(&mut line, &ok, LogFormat::Text);
        assert_eq!(
            line,
            "time=1970-01-02T00:00:00.000000Z service=echo service_id=1 caller=127.0.0.1:4242 \
             request_id=7 request_bytes=64 reply_bytes=12 outcome=ok queue_wait_us=15 \
             service_time_us=250\n"
        );
        line.clear();
        let refused = entry(Some(ErrorCode::Overloaded), None);
        format_entry(&mut line, &refused, LogFormat::Text);
        assert!(
            line.ends_with("outcome=error error_code=3 error=overloaded queue_wait_us=15\n"),
            "{line}"
        );
    }

    #[test]
    fn json_lines_parse_and_carry_the_fields() {
        // Proves the JSON format is one parseable object per line with typed fields.
        let mut line = String::new();
        let timed_out = entry(Some(ErrorCode::TimedOut), Some(Duration::from_millis(3)));
        format_entry(&mut line, &timed_out, LogFormat::Json);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["service"], "echo");
        assert_eq!(value["caller"], "127.0.0.1:4242");
        assert_eq!(value["request_id"], 7);
        assert_eq!(value["outcome"], "error");
        assert_eq!(value["error_code"], 5);
        assert_eq!(value["error"], "timed_out");
        assert_eq!(value["service_time_us"], 3000);
        assert_eq!(value["time"], "1970-01-02T00:00:00.000000Z");
    }

    #[test]
    fn service_names_are_copied_inline_and_cut_on_a_character() {
        // Proves an entry carries its name without allocating, and never splits a character.
        assert_eq!(ServiceName::new("kv").as_str(), "kv");
        let long = "é".repeat(40);
        let cut = ServiceName::new(&long);
        assert_eq!(cut.as_str(), "é".repeat(32));
    }
}
