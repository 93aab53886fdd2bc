//! The command line: what to load, how hard, for how long, and how to print the result.
//!
//! Parsing only: flags carry their unit in their name (`--duration-s`), and are turned into
//! [`Duration`]s here so that nothing past this module handles raw seconds. Every bound is checked
//! by clap, so a run never starts with a zero-connection or negative-time plan.

use std::time::Duration;

use acgi_bridge::proto::PAYLOAD_BYTES_MAX_DEFAULT;
use clap::Parser;

use crate::closed_loop::Plan;

/// Longest run a single invocation accepts (a day), so that a typo cannot start an endless run.
pub const SECONDS_MAX: f64 = 86_400.0;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "acgi-loadgen",
    version,
    about = "Closed-loop load generator for acgi-bridge",
    long_about = "Closed-loop load generator for acgi-bridge: CONNECTIONS connections, each \
                  keeping DEPTH requests in flight, for DURATION seconds after WARMUP seconds \
                  that are not recorded.\n\nExit status: 0 on success, 1 when no request \
                  succeeded, a reply differed from its request (--verify) or the run could \
                  not start, 2 on a usage error."
)]
pub struct Args {
    /// Bridge address: `unix:/path`, a path containing `/`, `tcp:host:port` or `host:port`.
    #[arg(long, value_name = "ADDR")]
    pub connect: String,

    /// Name of the service to call.
    #[arg(long, value_name = "NAME")]
    pub service: String,

    /// Connections to open, one client each.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub connections: u32,

    /// Requests kept in flight on each connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4_096))]
    pub depth: u32,

    /// Seconds of measured load (fractions allowed).
    #[arg(long = "duration-s", value_name = "SECONDS", default_value = "10",
          value_parser = parse_seconds_positive)]
    pub duration: Duration,

    /// Seconds of load before measuring starts, not recorded (fractions allowed).
    #[arg(long = "warmup-s", value_name = "SECONDS", default_value = "1",
          value_parser = parse_seconds)]
    pub warmup: Duration,

    /// Bytes in each request payload.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(PAYLOAD_BYTES_MAX_DEFAULT)))]
    pub payload_bytes: u32,

    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub threads: u32,

    /// Check that every reply equals its request [default: on for the `echo` service].
    #[arg(long, overrides_with = "no_verify")]
    pub verify: bool,

    /// Do not check replies, even for `echo`.
    #[arg(long, overrides_with = "verify")]
    pub no_verify: bool,

    /// Print one JSON object on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Whether replies are checked: an explicit flag wins, else only `echo` is checked.
    pub fn verify_replies(&self) -> bool {
        if self.verify {
            true
        } else if self.no_verify {
            false
        } else {
            self.service == "echo"
        }
    }

    /// The closed-loop plan these arguments describe.
    pub fn closed_loop_plan(&self) -> Plan {
        Plan {
            connect: self.connect.clone(),
            service: self.service.clone(),
            connections: self.connections,
            depth: self.depth,
            duration: self.duration,
            warmup: self.warmup,
            payload_bytes: self.payload_bytes,
            verify: self.verify_replies(),
            drain_grace: crate::closed_loop::DRAIN_GRACE_DEFAULT,
        }
    }
}

/// Parse seconds (integer or fractional, zero allowed) into a [`Duration`].
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("`{text}` is not a non-negative number of seconds"));
    }
    if seconds > SECONDS_MAX {
        return Err(format!("{seconds} s is over the limit of {SECONDS_MAX} s"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Like [`parse_seconds`], but zero is refused.
pub fn parse_seconds_positive(text: &str) -> Result<Duration, String> {
    let duration = parse_seconds(text)?;
    if duration.is_zero() {
        return Err("must be more than zero seconds".to_string());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_for(service: &str, extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "acgi-loadgen",
            "--connect",
            "unix:/tmp/b.sock",
            "--service",
            service,
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        parse_for("echo", extra)
    }

    #[test]
    fn defaults_match_the_documented_workload() {
        // Proves the defaults are 16 x 4, 10 s after 1 s, 64-byte payloads, 1 thread, text.
        let args = parse(&[]).unwrap();
        assert_eq!(args.connections, 16);
        assert_eq!(args.depth, 4);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(1));
        assert_eq!(args.payload_bytes, 64);
        assert_eq!(args.threads, 1);
        assert!(!args.json);
        assert!(args.verify_replies());
    }

    #[test]
    fn verification_defaults_to_echo_only_and_flags_override() {
        // Proves --verify/--no-verify win over the per-service default, last flag first.
        assert!(!parse_for("kv", &[]).unwrap().verify_replies());
        assert!(parse_for("kv", &["--verify"]).unwrap().verify_replies());
        assert!(!parse(&["--no-verify"]).unwrap().verify_replies());
        assert!(parse(&["--no-verify", "--verify"])
            .unwrap()
            .verify_replies());
        assert!(!parse(&["--verify", "--no-verify"])
            .unwrap()
            .verify_replies());
    }

    #[test]
    fn every_flag_is_read() {
        // Proves each flag lands in its field, fractional seconds included.
        let args = parse(&[
            "--connections",
            "3",
            "--depth",
            "7",
            "--duration-s",
            "0.25",
            "--warmup-s",
            "0",
            "--payload-bytes",
            "0",
            "--threads",
            "2",
            "--json",
        ])
        .unwrap();
        assert_eq!((args.connections, args.depth, args.threads), (3, 7, 2));
        assert_eq!(args.duration, Duration::from_millis(250));
        assert_eq!(args.warmup, Duration::ZERO);
        assert_eq!(args.payload_bytes, 0);
        assert!(args.json);
        let plan = args.closed_loop_plan();
        assert_eq!(plan.connections * plan.depth, 21);
        assert!(plan.verify);
    }

    #[test]
    fn out_of_range_values_are_usage_errors() {
        // Proves a plan that cannot run is refused before anything connects.
        for bad in [
            &["--connections", "0"][..],
            &["--depth", "0"],
            &["--threads", "0"],
            &["--duration-s", "0"],
            &["--duration-s", "-1"],
            &["--warmup-s", "soon"],
            &["--duration-s", "inf"],
            &["--payload-bytes", "16777217"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Args::try_parse_from(["acgi-loadgen", "--service", "echo"]).is_err());
        assert!(Args::try_parse_from(["acgi-loadgen", "--connect", "x:1"]).is_err());
    }

    #[test]
    fn seconds_parse_as_durations() {
        // Proves the seconds parser's accepted and refused forms.
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_seconds(" 2 "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("1e9").is_err());
        assert!(parse_seconds_positive("0.0").is_err());
    }
}
