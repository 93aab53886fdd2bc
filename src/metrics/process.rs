//! The standard `process_*` metrics of the bridge's own process, read from `/proc/self` at
//! each scrape (on the control thread): CPU time, resident and virtual memory, open and
//! maximum descriptors, start time. The same names and meanings as the Go and Python clients'
//! process collectors, so existing dashboards and alerts work unchanged.

use std::io;

/// One reading of `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessMetrics {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    /// Descriptors open now (the one this reading opens to count them included).
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE`; `None` when unlimited.
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessMetrics {
    /// Read the bridge's own process.
    pub fn read() -> io::Result<ProcessMetrics> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let boot_time = boot_time(&std::fs::read_to_string("/proc/stat")?)?;
        let open_fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        parse_stat(&stat, ticks, page, boot_time).map(|parsed| ProcessMetrics {
            open_fds,
            max_fds: limit.current,
            ..parsed
        })
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {what}"))
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(stat: &str) -> io::Result<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| invalid("/proc/stat: no btime"))
}

/// The fields of `/proc/self/stat` (proc(5)) this module reports: utime, stime (clock ticks),
/// starttime (ticks after boot), vsize (bytes), rss (pages).
fn parse_stat(stat: &str, ticks: f64, page: u64, boot_time: u64) -> io::Result<ProcessMetrics> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    let rest = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .ok_or_else(|| invalid("/proc/self/stat"))?;
    // fields[0] is field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |number: usize| -> io::Result<u64> {
        fields
            .get(number - 3)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| invalid("/proc/self/stat field"))
    };
    let (utime, stime, start, vsize, rss) =
        (field(14)?, field(15)?, field(22)?, field(23)?, field(24)?);
    Ok(ProcessMetrics {
        cpu_seconds: (utime + stime) as f64 / ticks,
        resident_memory_bytes: rss.saturating_mul(page),
        virtual_memory_bytes: vsize,
        open_fds: 0,
        max_fds: None,
        start_time_seconds: boot_time as f64 + start as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_an_awkward_command_name() {
        // Proves: the fields are counted after the last ')' (a name may hold ") ("), and the
        // units are converted: ticks to seconds, pages to bytes, start after boot to epoch.
        let stat = "42 (a) (b c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 \
                    8192000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let p = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.virtual_memory_bytes, 8_192_000);
        assert_eq!(p.resident_memory_bytes, 300 * 4096);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert!(parse_stat("garbage", 100.0, 4096, 0).is_err());
    }

    #[test]
    fn reads_this_process() {
        // Proves: a reading of the test process itself is plausible.
        let p = ProcessMetrics::read().unwrap();
        assert!(p.resident_memory_bytes > 0 && p.virtual_memory_bytes >= p.resident_memory_bytes);
        assert!(p.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
