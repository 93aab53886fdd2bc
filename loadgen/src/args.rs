//! The command line: what to load, how hard, for how long, and how to print the result.
//!
//! Parsing only: flags carry their unit in their name (`--duration-s`, `--slo-p99-ms`), and are
//! turned into [`Duration`]s and [`Workload`]s here so that nothing past this module handles raw
//! seconds or flag syntax. Every bound is checked before anything connects, so a run never
//! starts with a zero-connection or negative-time plan.
//!
//! ```text
//!   acgi-loadgen [RUN OPTIONS]      closed loop (CONNECTIONS x DEPTH), or open loop with --rate
//!   acgi-loadgen sweep [OPTIONS]    open loop at rising rates until the p99 SLO or errors break
//!   acgi-loadgen plan [OPTIONS]     measure the service time, size the pool (M/M/c), verify
//! ```

use std::path::PathBuf;
use std::time::Duration;

use acgi_proto::PAYLOAD_BYTES_MAX_DEFAULT;
use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::hgrm::Unit;
use crate::mix::{self, PayloadKind, Weighted};
use crate::open_loop::{Arrival, IN_FLIGHT_MAX_DEFAULT};
use crate::workload::{Workload, DRAIN_GRACE_DEFAULT, SEED_DEFAULT};
use crate::{closed_loop, open_loop};

/// Longest run a single invocation accepts (a day), so that a typo cannot start an endless run.
pub const SECONDS_MAX: f64 = 86_400.0;

/// Highest rate accepted, requests per second.
pub const RATE_MAX: f64 = 10_000_000.0;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "acgi-loadgen",
    version,
    about = "Load generator and capacity planner for acgi-bridge",
    long_about = "Load generator and capacity planner for acgi-bridge.\n\nWithout a subcommand \
                  (or with `run`): a closed loop (CONNECTIONS connections, each keeping DEPTH \
                  requests in flight) or, with --rate, an open loop (requests sent on schedule \
                  at RATE per second, latency measured from each one's intended send time), \
                  for DURATION seconds after WARMUP seconds that are not recorded.\n\n`sweep` \
                  raises the open-loop rate until the p99 SLO or errors break; `plan` sizes a \
                  pool with an M/M/c model and checks it.\n\nExit status: 0 on success, 1 \
                  when no request succeeded, a reply differed from its request (--verify), a \
                  sweep found no sustainable rate, a plan's SLO was missed, or the run could \
                  not start, 2 on a usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run once: closed loop, or open loop with --rate (the default when the first argument
    /// is an option).
    Run(RunArgs),
    /// Open loop at rising rates, each for --step-duration-s, until p99 passes the SLO or errors
    /// appear; reports each step and the highest sustainable rate.
    Sweep(SweepArgs),
    /// Measure the service time at low load, size the pool for --rate under --slo-p99-ms with
    /// an M/M/c (Erlang C) model, then run at --rate and compare predicted with measured.
    Plan(PlanArgs),
}

impl Cli {
    /// Parse `argv` (program name first). When the first argument is an option other than
    /// help or version, `run` is implied, so `acgi-loadgen --connect ... --service echo` works
    /// as it always has.
    pub fn try_parse_args<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        let mut argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        let implies_run = argv
            .get(1)
            .and_then(|first| first.to_str())
            .is_some_and(|first| {
                first.starts_with('-') && !matches!(first, "-h" | "--help" | "-V" | "--version")
            });
        if implies_run {
            argv.insert(1, "run".into());
        }
        Cli::try_parse_from(argv)
    }

    /// [`Cli::try_parse_args`] on this process's arguments, exiting on a usage error.
    pub fn parse_args() -> Cli {
        Cli::try_parse_args(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    pub fn command(self) -> Command {
        self.command
    }
}

/// Payload sizes with weights, as `--payload-bytes` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeMix(pub Vec<(u32, u32)>);

/// Weights, as `--payload-weights` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightList(pub Vec<u32>);

/// Where to send requests and what they are.
#[derive(ClapArgs, Debug, Clone)]
pub struct TargetArgs {
    /// Bridge address: `unix:/path`, a path containing `/`, `tcp:host:port` or `host:port`,
    /// or `tls:host:port` (the bridge's certificate is verified with the CA in the PEM file
    /// that the environment variable ACGI_LOADGEN_TLS_CA names).
    #[arg(long, value_name = "ADDR")]
    pub connect: String,

    /// Service to call, `NAME` or `NAME:WEIGHT`; repeat for a weighted mix of services.
    #[arg(long = "service", value_name = "NAME[:WEIGHT]", required = true,
          value_parser = mix::parse_service)]
    pub services: Vec<(String, u32)>,

    /// Bytes in each request payload, or a mix: `64,1024,10240` (uniform) or
    /// `64:8,1024:1,10240:1` (weighted).
    #[arg(long, value_name = "BYTES[:WEIGHT],...", default_value = "64",
          value_parser = parse_payload_bytes)]
    pub payload_bytes: SizeMix,

    /// A literal payload, sent as given (e.g. `sleep 3` for the `faulty` worker); repeat for a
    /// mix. Replaces --payload-bytes.
    #[arg(
        long = "payload",
        value_name = "TEXT",
        conflicts_with = "payload_bytes"
    )]
    pub payload_texts: Vec<String>,

    /// Weights of the --payload texts, in order: `9,1`. Default: uniform.
    #[arg(long, value_name = "W,...", requires = "payload_texts",
          value_parser = parse_weight_list)]
    pub payload_weights: Option<WeightList>,

    /// Connections to open, one client each.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub connections: u32,

    /// Seconds of load before measuring starts, not recorded (fractions allowed).
    #[arg(long = "warmup-s", value_name = "SECONDS", default_value = "1",
          value_parser = parse_seconds)]
    pub warmup: Duration,

    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    pub threads: u32,

    /// Check that every reply equals its request [default: on for the `echo` service].
    #[arg(long, overrides_with = "no_verify")]
    pub verify: bool,

    /// Do not check replies, even for `echo`.
    #[arg(long, overrides_with = "verify")]
    pub no_verify: bool,

    /// Seed of the random choices (service and payload mix, Poisson arrivals).
    #[arg(long, default_value_t = SEED_DEFAULT)]
    pub seed: u64,

    /// Print one JSON object on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

impl TargetArgs {
    /// Whether replies of `service` are checked: an explicit flag wins, else only `echo`.
    pub fn verifies(&self, service: &str) -> bool {
        if self.verify {
            true
        } else if self.no_verify {
            false
        } else {
            service == "echo"
        }
    }

    /// The workload these arguments describe, measured for `duration`.
    pub fn workload(&self, duration: Duration) -> Result<Workload, String> {
        let services = Weighted::new(self.services.clone())?;
        let payloads = if self.payload_texts.is_empty() {
            Weighted::new(
                self.payload_bytes
                    .0
                    .iter()
                    .map(|(bytes, weight)| (PayloadKind::Bytes(*bytes), *weight))
                    .collect(),
            )?
        } else {
            let weights = match self.payload_weights.as_ref().map(|list| &list.0) {
                Some(weights) if weights.len() != self.payload_texts.len() => {
                    return Err(format!(
                        "--payload-weights has {} weights for {} --payload texts",
                        weights.len(),
                        self.payload_texts.len()
                    ))
                }
                Some(weights) => weights.clone(),
                None => vec![1; self.payload_texts.len()],
            };
            let max = PAYLOAD_BYTES_MAX_DEFAULT as usize;
            if let Some(long) = self.payload_texts.iter().find(|text| text.len() > max) {
                return Err(format!(
                    "a --payload of {} bytes is over the limit of {max}",
                    long.len()
                ));
            }
            Weighted::new(
                self.payload_texts
                    .iter()
                    .cloned()
                    .map(PayloadKind::Text)
                    .zip(weights)
                    .collect(),
            )?
        };
        let verify = services.values().map(|name| self.verifies(name)).collect();
        Ok(Workload {
            connect: self.connect.clone(),
            services,
            payloads,
            verify,
            duration,
            warmup: self.warmup,
            drain_grace: DRAIN_GRACE_DEFAULT,
            seed: self.seed,
        })
    }
}

/// Where the spectrum goes.
#[derive(ClapArgs, Debug, Clone)]
pub struct OutputArgs {
    /// Write the full latency spectrum as an HdrHistogram percentile distribution (.hgrm).
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,

    /// Unit of the values in the .hgrm file.
    #[arg(long, value_enum, default_value_t = Unit::Ms)]
    pub hgrm_unit: Unit,

    /// Write an SVG chart of latency by percentile.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// One run.
#[derive(ClapArgs, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Closed loop: requests kept in flight on each connection.
    #[arg(long, default_value_t = 4, conflicts_with = "rate",
          value_parser = clap::value_parser!(u32).range(1..=4_096))]
    pub depth: u32,

    /// Closed loop: drive each connection from one thread that writes its requests and reads
    /// their answers in batches (cheaper for the generator than a task per request in flight;
    /// for measuring peak throughput on a small machine). Like the default loop, it resends on
    /// a new connection what a draining bridge (a binary upgrade) refused.
    #[arg(long, conflicts_with = "rate")]
    pub batch: bool,

    /// Open loop: requests per second, sent on schedule whatever the replies do.
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub rate: Option<f64>,

    #[command(flatten)]
    pub open: OpenArgs,

    /// Seconds of measured load (fractions allowed).
    #[arg(long = "duration-s", value_name = "SECONDS", default_value = "10",
          value_parser = parse_seconds_positive)]
    pub duration: Duration,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// Open-loop knobs.
#[derive(ClapArgs, Debug, Clone)]
pub struct OpenArgs {
    /// Open loop: how arrivals are spaced.
    #[arg(long, value_enum, default_value_t = Arrival::Constant)]
    pub arrival: Arrival,

    /// Open loop: most calls in flight; a request due beyond it is not sent and counts as an
    /// `in_flight_limit` error.
    #[arg(long, default_value_t = IN_FLIGHT_MAX_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub in_flight_max: u32,
}

impl RunArgs {
    /// The closed-loop plan (when no --rate was given).
    pub fn closed_loop_plan(&self) -> Result<closed_loop::Plan, String> {
        Ok(closed_loop::Plan {
            workload: self.target.workload(self.duration)?,
            connections: self.target.connections,
            depth: self.depth,
            batch: self.batch,
        })
    }

    /// The open-loop plan at `rate`.
    pub fn open_loop_plan(&self, rate: f64) -> Result<open_loop::Plan, String> {
        Ok(open_loop::Plan {
            workload: self.target.workload(self.duration)?,
            connections: self.target.connections,
            rate,
            arrival: self.open.arrival,
            in_flight_max: self.open.in_flight_max,
        })
    }
}

/// `acgi-loadgen sweep`.
#[derive(ClapArgs, Debug, Clone)]
#[command(group(clap::ArgGroup::new("increment").required(true).args(["step", "factor"])))]
pub struct SweepArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub open: OpenArgs,

    /// First rate, requests per second.
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub start: f64,

    /// Add this many requests per second at each step.
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub step: Option<f64>,

    /// Multiply the rate by this at each step (more than 1).
    #[arg(long, value_parser = parse_factor)]
    pub factor: Option<f64>,

    /// Highest rate tried, requests per second.
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub max: f64,

    /// Measured seconds of each step (after --warmup-s of unrecorded load).
    #[arg(long = "step-duration-s", visible_alias = "step-duration", value_name = "SECONDS",
          default_value = "5", value_parser = parse_seconds_positive)]
    pub step_duration: Duration,

    /// A step passes while its p99 is at most this many milliseconds.
    #[arg(long = "slo-p99-ms", visible_alias = "slo-p99", value_name = "MS",
          value_parser = parse_milliseconds)]
    pub slo_p99: Duration,

    /// Write an SVG chart of p50/p99 latency against offered load.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl SweepArgs {
    /// The rates of the sweep, in order, up to --max.
    pub fn rates(&self) -> Result<Vec<f64>, String> {
        if self.start > self.max {
            return Err(format!(
                "--start {} is above --max {}",
                self.start, self.max
            ));
        }
        let mut rates = vec![self.start];
        loop {
            let last = *rates.last().expect("not empty");
            let next = match (self.step, self.factor) {
                (Some(step), _) => last + step,
                (None, Some(factor)) => last * factor,
                (None, None) => unreachable!("clap requires --step or --factor"),
            };
            if next > self.max * (1.0 + 1e-9) {
                break;
            }
            rates.push(next);
            if rates.len() > SWEEP_STEPS_MAX {
                return Err(format!(
                    "the sweep would take more than {SWEEP_STEPS_MAX} steps: raise --step or \
                     --factor"
                ));
            }
        }
        Ok(rates)
    }
}

/// Most steps one sweep takes.
pub const SWEEP_STEPS_MAX: usize = 1_000;

/// `acgi-loadgen plan`.
#[derive(ClapArgs, Debug, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// The arrival rate to plan for, requests per second.
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub rate: f64,

    /// The latency objective: p99 at most this many milliseconds.
    #[arg(long = "slo-p99-ms", visible_alias = "slo-p99", value_name = "MS",
          value_parser = parse_milliseconds)]
    pub slo_p99: Duration,

    /// Service-time samples to take, one request at a time, before sizing.
    #[arg(long, default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(20..=10_000_000))]
    pub samples: u32,

    /// Predict for this many workers instead of the smallest pool that meets the SLO.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4_096))]
    pub workers: Option<u32>,

    /// The pool size the bridge is actually configured with (its max_workers): predictions
    /// for the verification run are made for it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4_096))]
    pub configured_workers: Option<u32>,

    /// Size the pool and stop: no verification run.
    #[arg(long)]
    pub predict_only: bool,

    /// How the verification run spaces arrivals (M/M/c assumes Poisson).
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,

    /// Measured seconds of the verification run at --rate.
    #[arg(long = "duration-s", value_name = "SECONDS", default_value = "10",
          value_parser = parse_seconds_positive)]
    pub duration: Duration,

    #[command(flatten)]
    pub output: OutputArgs,
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

/// Positive milliseconds (fractions allowed) into a [`Duration`].
pub fn parse_milliseconds(text: &str) -> Result<Duration, String> {
    let ms: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of milliseconds"))?;
    if !ms.is_finite() || ms <= 0.0 || ms > SECONDS_MAX * 1000.0 {
        return Err(format!("`{text}` is not a positive number of milliseconds"));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// A positive rate, requests per second.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a rate in requests per second"))?;
    if !rate.is_finite() || rate <= 0.0 || rate > RATE_MAX {
        return Err(format!(
            "`{text}` is not a rate in (0, {RATE_MAX}] requests per second"
        ));
    }
    Ok(rate)
}

fn parse_factor(text: &str) -> Result<f64, String> {
    let factor: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !factor.is_finite() || factor <= 1.0 || factor > 100.0 {
        return Err(format!("the factor `{text}` must be in (1, 100]"));
    }
    Ok(factor)
}

fn parse_payload_bytes(text: &str) -> Result<SizeMix, String> {
    mix::parse_payload_bytes(text, PAYLOAD_BYTES_MAX_DEFAULT).map(SizeMix)
}

fn parse_weight_list(text: &str) -> Result<WeightList, String> {
    mix::parse_weights(text).map(WeightList)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_command(argv: &[&str]) -> Result<Command, clap::Error> {
        let mut full = vec!["acgi-loadgen"];
        full.extend_from_slice(argv);
        Cli::try_parse_args(full).map(Cli::command)
    }

    fn parse_for(service: &str, extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["--connect", "unix:/tmp/b.sock", "--service", service];
        argv.extend_from_slice(extra);
        match parse_command(&argv)? {
            Command::Run(run) => Ok(run),
            other => panic!("not a run: {other:?}"),
        }
    }

    fn parse(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        parse_for("echo", extra)
    }

    #[test]
    fn defaults_match_the_documented_workload() {
        // Proves the defaults are 16 x 4, 10 s after 1 s, 64-byte payloads, 1 thread, text.
        let args = parse(&[]).unwrap();
        assert_eq!(args.target.connections, 16);
        assert_eq!(args.depth, 4);
        assert_eq!(args.rate, None);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.target.warmup, Duration::from_secs(1));
        assert_eq!(args.target.payload_bytes, SizeMix(vec![(64, 1)]));
        assert_eq!(args.target.threads, 1);
        assert!(!args.target.json);
        assert_eq!(args.output.hgrm_unit, Unit::Ms);
        let workload = args.closed_loop_plan().unwrap().workload;
        assert_eq!(workload.verify, [true]);
        assert_eq!(workload.payloads.len(), 1);
        assert_eq!(workload.seed, SEED_DEFAULT);
    }

    #[test]
    fn verification_defaults_to_echo_only_and_flags_override() {
        // Proves --verify/--no-verify win over the per-service default, last flag first.
        let verify = |service: &str, extra: &[&str]| {
            let args = parse_for(service, extra).unwrap();
            args.closed_loop_plan().unwrap().workload.verify[0]
        };
        assert!(!verify("kv", &[]));
        assert!(verify("kv", &["--verify"]));
        assert!(!verify("echo", &["--no-verify"]));
        assert!(verify("echo", &["--no-verify", "--verify"]));
        assert!(!verify("echo", &["--verify", "--no-verify"]));
        // In a mix, only echo is checked by default.
        let args = parse(&["--service", "faulty:3"]).unwrap();
        let workload = args.closed_loop_plan().unwrap().workload;
        assert_eq!(workload.verify, [true, false]);
        assert_eq!(workload.services_label(), "echo:1, faulty:3");
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
            "--seed",
            "9",
            "--hgrm",
            "/tmp/x.hgrm",
            "--hgrm-unit",
            "us",
            "--plot",
            "/tmp/x.svg",
        ])
        .unwrap();
        assert_eq!(
            (args.target.connections, args.depth, args.target.threads),
            (3, 7, 2)
        );
        assert_eq!(args.duration, Duration::from_millis(250));
        assert_eq!(args.target.warmup, Duration::ZERO);
        assert!(args.target.json);
        assert_eq!(args.output.hgrm_unit, Unit::Us);
        assert_eq!(args.output.plot, Some(PathBuf::from("/tmp/x.svg")));
        let plan = args.closed_loop_plan().unwrap();
        assert_eq!(plan.connections * plan.depth, 21);
        assert_eq!(plan.workload.payloads.get(0), &PayloadKind::Bytes(0));
        assert_eq!(plan.workload.seed, 9);
    }

    #[test]
    fn open_loop_flags_make_an_open_loop_plan() {
        // Proves --rate, --arrival, mixes of payloads and texts, and the explicit `run`.
        let args = parse(&[
            "--rate",
            "3000",
            "--arrival",
            "poisson",
            "--payload-bytes",
            "64:8,1024,10240",
            "--in-flight-max",
            "50",
        ])
        .unwrap();
        let plan = args.open_loop_plan(args.rate.unwrap()).unwrap();
        assert_eq!(plan.rate, 3000.0);
        assert_eq!(plan.arrival, Arrival::Poisson);
        assert_eq!(plan.in_flight_max, 50);
        assert_eq!(
            plan.workload.payloads_label(),
            "64 B:8, 1024 B:1, 10240 B:1"
        );
        let args = parse_for(
            "faulty",
            &[
                "--payload",
                "sleep 3",
                "--payload",
                "sleep 10",
                "--payload-weights",
                "9,1",
            ],
        )
        .unwrap();
        let workload = args.closed_loop_plan().unwrap().workload;
        assert_eq!(workload.payloads_label(), "\"sleep 3\":9, \"sleep 10\":1");
        let bad = parse_for("faulty", &["--payload", "a", "--payload-weights", "1,2"]).unwrap();
        assert!(bad.closed_loop_plan().is_err());
        assert!(matches!(
            parse_command(&["run", "--connect", "x:1", "--service", "echo"]).unwrap(),
            Command::Run(_)
        ));
    }

    #[test]
    fn sweep_and_plan_parse() {
        // Proves the subcommands' flags, aliases, and the sweep's rate ladder.
        let sweep = |extra: &[&str]| {
            let mut argv = vec![
                "sweep",
                "--connect",
                "/tmp/s.sock",
                "--service",
                "faulty",
                "--payload",
                "sleep 3",
                "--start",
                "1000",
                "--max",
                "4000",
                "--slo-p99",
                "10",
            ];
            argv.extend_from_slice(extra);
            match parse_command(&argv)? {
                Command::Sweep(sweep) => Ok::<_, clap::Error>(sweep),
                other => panic!("not a sweep: {other:?}"),
            }
        };
        let linear = sweep(&["--step", "1000"]).unwrap();
        assert_eq!(linear.rates().unwrap(), [1000.0, 2000.0, 3000.0, 4000.0]);
        assert_eq!(linear.slo_p99, Duration::from_millis(10));
        assert_eq!(linear.step_duration, Duration::from_secs(5));
        let doubling = sweep(&["--factor", "2", "--step-duration", "2"]).unwrap();
        assert_eq!(doubling.rates().unwrap(), [1000.0, 2000.0, 4000.0]);
        assert_eq!(doubling.step_duration, Duration::from_secs(2));
        assert!(sweep(&[]).is_err(), "needs --step or --factor");
        assert!(sweep(&["--step", "1", "--factor", "2"]).is_err());
        assert!(sweep(&["--factor", "1"]).is_err());
        assert!(sweep(&["--step", "0.001"]).unwrap().rates().is_err());

        let plan = match parse_command(&[
            "plan",
            "--connect",
            "/tmp/s.sock",
            "--service",
            "faulty",
            "--payload",
            "sleep 3",
            "--rate",
            "3000",
            "--slo-p99-ms",
            "12.5",
            "--configured-workers",
            "12",
        ])
        .unwrap()
        {
            Command::Plan(plan) => plan,
            other => panic!("not a plan: {other:?}"),
        };
        assert_eq!(plan.rate, 3000.0);
        assert_eq!(plan.slo_p99, Duration::from_micros(12_500));
        assert_eq!(plan.configured_workers, Some(12));
        assert_eq!(plan.workers, None);
        assert_eq!(plan.samples, 2000);
        assert_eq!(plan.arrival, Arrival::Poisson);
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
            &["--rate", "0"],
            &["--rate", "-5"],
            &["--rate", "100", "--depth", "2"],
            &["--payload", "x", "--payload-bytes", "5"],
            &["--payload-weights", "1"],
            &["--arrival", "bursty"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_command(&["--service", "echo"]).is_err());
        assert!(parse_command(&["--connect", "x:1"]).is_err());
        assert!(parse_command(&["--connect", "x:1", "--service", "bad name"]).is_err());
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
        assert_eq!(parse_milliseconds("0.5"), Ok(Duration::from_micros(500)));
        assert!(parse_milliseconds("0").is_err());
        assert_eq!(parse_rate("2.5"), Ok(2.5));
    }
}
