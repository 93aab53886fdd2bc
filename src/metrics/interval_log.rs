//! HdrHistogram interval logs: every interval, each service's latencies of that interval,
//! appended to one file per bridge in the standard format (readable by the `hdrhistogram`
//! crate's `IntervalLogIterator` and by HdrHistogram's Java `HistogramLogProcessor`).
//!
//! Owns the log file and its rotation; it must never hold histograms of its own (the caller
//! accumulates each interval and resets it) and does one `write` per interval. Per service it
//! writes three interval histograms, values in microseconds:
//!
//! ```text
//! #[StartTime: 1767225600.000 (seconds since epoch)]     when this logger was created
//! #[BaseTime: 1767225600.000 (seconds since epoch)]      first interval start in this file
//! "StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"
//! Tag=echo,0.000,10.000,1234.000,HISTFAAAA...            arrival to answer
//! Tag=echo.queue_wait,0.000,10.000,17.000,HISTFAAAA...   arrival to hand-over (or rejection)
//! Tag=echo.service,0.000,10.000,1217.000,HISTFAAAA...    hand-over to answer
//! ```
//!
//! Rotation: once the file reaches `rotate_bytes`, it becomes `latency.hlog.1` (older ones
//! shift to `.2`, `.3`; [`ROTATED_FILES_KEPT`] are kept) and the next interval starts a new file
//! with a fresh header. A log left by an earlier run is rotated away at start, so every file has
//! exactly one header.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;

use super::LatencyHistograms;

/// Name of the current log file in the logger's directory.
pub const LOG_FILE_NAME: &str = "latency.hlog";
/// Rotated files kept (`latency.hlog.1` is the newest).
pub const ROTATED_FILES_KEPT: u32 = 3;

const LEGEND: &str =
    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n";

/// Appends interval histograms to `DIR/latency.hlog`, rotating it by size.
pub struct IntervalLogger {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    file_bytes: u64,
    rotate_bytes: u64,
    interval: Duration,
    /// When this logger was created: every file's StartTime.
    started: SystemTime,
    /// The current file's BaseTime, once its header is written.
    base_time: Option<SystemTime>,
    /// End of the last interval appended.
    last_end: Option<SystemTime>,
    serializer: V2DeflateSerializer,
    /// One interval's text, written with one `write`.
    buffer: Vec<u8>,
}

impl std::fmt::Debug for IntervalLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalLogger")
            .field("path", &self.path)
            .field("file_bytes", &self.file_bytes)
            .field("rotate_bytes", &self.rotate_bytes)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl IntervalLogger {
    /// Create `dir` if needed and open `dir/latency.hlog` for appending, rotating away a
    /// non-empty log left by an earlier run. `interval` is how often the caller means to
    /// append (see [`IntervalLogger::is_due`]); `rotate_bytes` the size that triggers rotation.
    pub fn new(dir: impl AsRef<Path>, interval: Duration, rotate_bytes: u64) -> io::Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE_NAME);
        match fs::metadata(&path) {
            Ok(metadata) if metadata.len() > 0 => rotate_files(&path)?,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = open_for_append(&path)?;
        Ok(Self {
            path,
            file,
            file_bytes: 0,
            rotate_bytes,
            interval,
            started: SystemTime::now(),
            base_time: None,
            last_end: None,
            serializer: V2DeflateSerializer::new(),
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    /// The current log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether an interval has passed since the last append (or since creation).
    pub fn is_due(&self, now: SystemTime) -> bool {
        let since = self.last_end.unwrap_or(self.started);
        now.duration_since(since).unwrap_or(Duration::ZERO) >= self.interval
    }

    /// Append one interval, `interval_start..now`: for each `(service name, histograms of this
    /// interval)`, its `total` tagged with the name, `queue_wait` tagged `NAME.queue_wait` and
    /// `service` tagged `NAME.service`. Names must be valid tags (no `,`, space or line break);
    /// on an invalid one nothing is written. Rotates the file once it reaches `rotate_bytes`.
    pub fn append(
        &mut self,
        now: SystemTime,
        interval_start: SystemTime,
        services: &[(&str, &LatencyHistograms)],
    ) -> io::Result<()> {
        for (name, _) in services {
            if name.is_empty() || Tag::new(name).is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("service name {name:?} cannot be an interval log tag"),
                ));
            }
        }
        self.buffer.clear();
        let base_time = match self.base_time {
            Some(base_time) => base_time,
            None => {
                self.write_header(interval_start)?;
                interval_start
            }
        };
        // A clock stepped back puts the interval at the base rather than failing.
        let start = interval_start
            .duration_since(base_time)
            .unwrap_or(Duration::ZERO);
        let length = now.duration_since(interval_start).unwrap_or(Duration::ZERO);
        {
            // An empty builder writes no header; it only lends its histogram writer.
            let mut writer = IntervalLogWriterBuilder::new()
                .begin_log_with(&mut self.buffer, &mut self.serializer)?;
            let mut tag = String::new();
            for (name, histograms) in services {
                for (suffix, histogram) in [
                    ("", &histograms.total),
                    (".queue_wait", &histograms.queue_wait),
                    (".service", &histograms.service),
                ] {
                    tag.clear();
                    tag.push_str(name);
                    tag.push_str(suffix);
                    writer
                        .write_histogram(histogram, start, length, Tag::new(&tag))
                        .map_err(io::Error::other)?;
                }
            }
        }
        self.file.write_all(&self.buffer)?;
        self.base_time = Some(base_time);
        self.file_bytes += self.buffer.len() as u64;
        self.last_end = Some(now);
        if self.file_bytes >= self.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// The header of a new file, into `buffer`.
    fn write_header(&mut self, base_time: SystemTime) -> io::Result<()> {
        debug_assert!(self.buffer.is_empty());
        IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "acgi-bridge latency interval log, values in microseconds, every {:?}",
                self.interval
            ))
            .add_comment(
                "tags: NAME = arrival to answer, NAME.queue_wait = arrival to hand-over, \
                 NAME.service = hand-over to answer",
            )
            .add_comment("[Histogram log format version 1.3]")
            .with_start_time(self.started)
            .with_base_time(base_time)
            .begin_log_with(&mut self.buffer, &mut self.serializer)?;
        self.buffer.extend_from_slice(LEGEND.as_bytes());
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        rotate_files(&self.path)?;
        self.file = open_for_append(&self.path)?;
        self.file_bytes = 0;
        self.base_time = None;
        Ok(())
    }
}

fn open_for_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `PATH.k`.
fn rotated_path(path: &Path, k: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

/// Shift `PATH.k` to `PATH.k+1` (the oldest is replaced) and `PATH` to `PATH.1`.
fn rotate_files(path: &Path) -> io::Result<()> {
    for k in (1..ROTATED_FILES_KEPT).rev() {
        match fs::rename(rotated_path(path, k), rotated_path(path, k + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    fs::rename(path, rotated_path(path, 1))
}

#[cfg(test)]
mod tests {
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::Histogram;

    use super::*;

    /// Standard base64 (the encoded histograms), for reading them back.
    fn base64_decode(text: &str) -> Vec<u8> {
        let value = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => u32::from(c - b'A'),
                b'a'..=b'z' => u32::from(c - b'a') + 26,
                b'0'..=b'9' => u32::from(c - b'0') + 52,
                b'+' => 62,
                b'/' => 63,
                _ => panic!("not base64: {c}"),
            }
        };
        let mut out = Vec::new();
        for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
            let mut bits = 0u32;
            for (i, c) in chunk.iter().enumerate() {
                bits |= value(*c) << (18 - 6 * i);
            }
            let bytes = bits.to_be_bytes();
            out.extend_from_slice(&bytes[1..chunk.len()]);
        }
        out
    }

    /// `(StartTime, BaseTime, [(tag, start, length, histogram)])` of a log file.
    #[allow(clippy::type_complexity)]
    fn read_log(
        path: &Path,
    ) -> (
        Vec<Duration>,
        Vec<Duration>,
        Vec<(String, Duration, Duration, Histogram<u64>)>,
    ) {
        let bytes = fs::read(path).unwrap();
        let (mut starts, mut bases, mut intervals) = (Vec::new(), Vec::new(), Vec::new());
        for entry in IntervalLogIterator::new(&bytes) {
            match entry.unwrap() {
                LogEntry::StartTime(t) => starts.push(t),
                LogEntry::BaseTime(t) => bases.push(t),
                LogEntry::Interval(h) => {
                    let encoded = base64_decode(h.encoded_histogram());
                    let histogram: Histogram<u64> =
                        Deserializer::new().deserialize(&mut &encoded[..]).unwrap();
                    let tag = h.tag().unwrap().as_str().to_string();
                    intervals.push((tag, h.start_timestamp(), h.duration(), histogram));
                }
            }
        }
        (starts, bases, intervals)
    }

    fn histograms(totals_us: &[u64], rejected: usize) -> LatencyHistograms {
        let mut h = LatencyHistograms::new();
        for (i, us) in totals_us.iter().enumerate() {
            let total = Duration::from_micros(*us);
            let service = (i >= rejected).then_some(total / 2);
            h.record(total / 2, service, total);
        }
        h
    }

    #[test]
    fn two_intervals_round_trip_through_the_crates_reader() {
        // Proves: two appended intervals read back with IntervalLogIterator, with one header,
        // the right tags, timestamps, and counts per tag.
        let dir = tempfile::tempdir().unwrap();
        let mut logger = IntervalLogger::new(dir.path(), Duration::from_secs(10), 1 << 20).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let t1 = t0 + Duration::from_secs(10);
        let t2 = t1 + Duration::from_secs(10);
        assert!(logger.is_due(SystemTime::now() + Duration::from_secs(10)));
        let echo = histograms(&[100, 200, 300], 1);
        let kv = histograms(&[5_000], 0);
        logger
            .append(t1, t0, &[("echo", &echo), ("kv", &kv)])
            .unwrap();
        assert!(!logger.is_due(t1 + Duration::from_secs(9)));
        assert!(logger.is_due(t2));
        let echo2 = histograms(&[1_000_000, 2_000_000], 0);
        let kv2 = LatencyHistograms::new();
        logger
            .append(t2, t1, &[("echo", &echo2), ("kv", &kv2)])
            .unwrap();

        let text = fs::read_to_string(logger.path()).unwrap();
        assert!(
            text.contains("\n\"StartTimestamp\",\"Interval_Length\""),
            "{text}"
        );
        let (starts, bases, intervals) = read_log(logger.path());
        assert_eq!(starts.len(), 1);
        assert_eq!(bases, vec![Duration::from_secs(1_767_225_600)]);
        let summary: Vec<(&str, u64, u64, u64)> = intervals
            .iter()
            .map(|(tag, start, length, h)| {
                (tag.as_str(), start.as_secs(), length.as_secs(), h.len())
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("echo", 0, 10, 3),
                ("echo.queue_wait", 0, 10, 3),
                ("echo.service", 0, 10, 2),
                ("kv", 0, 10, 1),
                ("kv.queue_wait", 0, 10, 1),
                ("kv.service", 0, 10, 1),
                ("echo", 10, 10, 2),
                ("echo.queue_wait", 10, 10, 2),
                ("echo.service", 10, 10, 2),
                ("kv", 10, 10, 0),
                ("kv.queue_wait", 10, 10, 0),
                ("kv.service", 10, 10, 0),
            ]
        );
        // The histograms themselves survive: values and their precision.
        assert_eq!(intervals[0].3.max(), 300);
        assert_eq!(intervals[0].3.min(), 100);
        assert_eq!(intervals[3].3.count_at(5_000), 1);
        assert_eq!(intervals[6].3.value_at_quantile(1.0), echo2.total.max());
    }

    #[test]
    fn rotation_keeps_a_few_files_each_with_its_own_header() {
        // Proves: past rotate_bytes the file moves to .1 (older ones shift, at most
        // ROTATED_FILES_KEPT kept) and the next interval starts a file with a fresh header.
        let dir = tempfile::tempdir().unwrap();
        let mut logger = IntervalLogger::new(dir.path(), Duration::from_secs(1), 1).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        for i in 0..5u64 {
            let start = t0 + Duration::from_secs(i);
            let h = histograms(&vec![100; i as usize + 1], 0);
            logger
                .append(start + Duration::from_secs(1), start, &[("echo", &h)])
                .unwrap();
        }
        let log = dir.path().join(LOG_FILE_NAME);
        assert_eq!(
            fs::metadata(&log).unwrap().len(),
            0,
            "rotated after the last append"
        );
        assert!(!rotated_path(&log, ROTATED_FILES_KEPT + 1).exists());
        // .1 is the newest (5th append: 5 requests), .3 the oldest kept (3rd: 3 requests).
        for (k, requests) in [(1, 5), (2, 4), (3, 3)] {
            let (starts, bases, intervals) = read_log(&rotated_path(&log, k));
            assert_eq!(
                (starts.len(), bases.len(), intervals.len()),
                (1, 1, 3),
                "file .{k}"
            );
            let base = Duration::from_secs(1_767_225_600 + requests - 1);
            assert_eq!(
                bases[0], base,
                "BaseTime of .{k} is its first interval's start"
            );
            assert_eq!(intervals[0].0, "echo");
            assert_eq!(intervals[0].1, Duration::ZERO);
            assert_eq!(intervals[0].3.len(), requests, "file .{k}");
        }
        // A big threshold: no rotation, appends accumulate in one file.
        let mut logger = IntervalLogger::new(dir.path(), Duration::from_secs(1), 1 << 20).unwrap();
        let h = histograms(&[100], 0);
        logger
            .append(t0 + Duration::from_secs(1), t0, &[("echo", &h)])
            .unwrap();
        logger
            .append(
                t0 + Duration::from_secs(2),
                t0 + Duration::from_secs(1),
                &[("echo", &h)],
            )
            .unwrap();
        let (_, bases, intervals) = read_log(&log);
        assert_eq!((bases.len(), intervals.len()), (1, 6));
        assert_eq!(intervals[3].1, Duration::from_secs(1));
    }

    #[test]
    fn a_log_left_by_an_earlier_run_is_rotated_away() {
        // Proves: new() never appends to an old file (which would hold two headers).
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(LOG_FILE_NAME);
        fs::write(&log, "#old\n").unwrap();
        let logger = IntervalLogger::new(dir.path(), Duration::from_secs(1), 1 << 20).unwrap();
        assert_eq!(fs::read_to_string(rotated_path(&log, 1)).unwrap(), "#old\n");
        assert_eq!(fs::metadata(logger.path()).unwrap().len(), 0);
    }

    #[test]
    fn an_invalid_tag_writes_nothing() {
        // Proves: a service name that cannot be a tag is an error, and the file is untouched.
        let dir = tempfile::tempdir().unwrap();
        let mut logger = IntervalLogger::new(dir.path(), Duration::from_secs(1), 1 << 20).unwrap();
        let h = LatencyHistograms::new();
        let now = SystemTime::now();
        for name in ["a,b", "a b", "", "a\nb"] {
            let err = logger
                .append(now, now, &[("ok", &h), (name, &h)])
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(fs::metadata(logger.path()).unwrap().len(), 0);
    }
}
