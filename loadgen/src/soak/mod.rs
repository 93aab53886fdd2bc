//! `acgi-soak`: a fault soak. Byte-checked requests of mixed sizes around the slot size, from
//! pipelining callers, while a chaos thread SIGKILLs and SIGSTOPs workers and makes callers
//! close abruptly or stop reading; then checks that the bridge is whole again.
//!
//! ```text
//!   options ─▶ bridge::Started (a config of its own: echo + faulty, small slots)
//!             │   baseline: fds, slots, workers (status), zombies
//!             ├─▶ caller::run x N  (writer + reader per connection; check::Ledger per conn)
//!             ├─▶ chaos::run       (kill / stop+cont / abort / stall, seeded)
//!             └─▶ settle: fds back to baseline, slots, workers, zombies, still answering
//!                 ─▶ Summary (text or JSON) and the verdict (exit 1 on any failure)
//! ```
//!
//! - [`stamp`]: bodies that name their request (connection, number, size, checksum).
//! - [`check`]: a connection's ledger and the verdict on each answer.
//! - [`caller`]: the caller threads. [`chaos`]: the fault schedule.
//! - [`bridge`]: starting the bridge, its status, /proc. [`summary`]: the end checks and report.
//!
//! Every request sent ends in exactly one outcome (ok, an error by code, misrouted, corrupted,
//! lost, or abandoned on a connection the soak closed itself), and the summary checks the sum.
//! A failure is any lost, misrouted, corrupted or duplicated reply, a forbidden error code, a
//! connection the bridge closed, a caller starved while another stalled, or a leak after the run
//! (descriptors over the baseline, slots or workers off, zombies, a bridge that no longer
//! answers or does not exit 0 on SIGTERM).

#![forbid(unsafe_code)]

pub mod bridge;
pub mod caller;
pub mod chaos;
pub mod check;
pub mod stamp;
pub mod summary;
pub mod tally;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use self::bridge::{Setup, Started};
use self::caller::{Shared, Target};
use self::chaos::Span;
use self::summary::{Baseline, Summary};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "acgi-soak",
    about = "Fault soak: byte-checked load on a bridge while its workers are killed and stopped \
             and its callers abort or stop reading; exits 1 on any lost, misrouted or duplicated \
             reply, forbidden error code or leak",
    after_help = "By default it starts its own bridge (BRIDGE serve, with a config it writes \
                  beside the bridge's log in --dir): services echo and faulty as static pools \
                  of --workers, slots of --slot-bytes, request_timeout_ms of \
                  --request-timeout-ms. With --connect and --admin it soaks a running bridge \
                  instead (services named echo and, if present, faulty; its pools should be \
                  static for the descriptor check to mean anything).\n\n\
                  --seed replays the chaos schedule (which action, when, which index of worker \
                  or caller, how long), not the run: which pid an index names, what a worker is \
                  doing when it is hit and which requests are in flight depend on timing, \
                  which no seed controls."
)]
pub struct Options {
    /// Seconds of load and chaos.
    #[arg(long, default_value_t = 60)]
    pub duration_s: u64,
    /// Seed of the chaos schedule and the request mix (default: from the clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Caller threads, each with its own connection (every second one over TCP when the
    /// soak starts the bridge).
    #[arg(long, default_value_t = 8)]
    pub callers: u32,
    /// Requests each caller keeps in flight.
    #[arg(long, default_value_t = 8)]
    pub depth: u32,
    /// Workers of each service (a static pool).
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// The services' slot_size_bytes; request sizes are drawn below, at, above and far above.
    #[arg(long, default_value_t = 4096)]
    pub slot_bytes: u32,
    /// The services' request_timeout_ms: how long a stopped worker's request waits for
    /// `timed out`.
    #[arg(long, default_value_t = 1000)]
    pub request_timeout_ms: u64,
    /// Milliseconds between chaos actions, LOW-HIGH (uniform).
    #[arg(long, default_value = "50-500", value_parser = parse_span)]
    pub chaos_interval_ms: Span,
    /// The chaos actions to take (to find which fault a failure needs; the others are still
    /// drawn, so the schedule of those taken stays the seed's).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,stop,abort-mid-request,abort-mid-payload,stall"
    )]
    pub actions: Vec<chaos::Action>,
    /// How long a SIGSTOPped worker stays stopped, LOW-HIGH ms.
    #[arg(long, default_value = "200-2500", value_parser = parse_span)]
    pub stop_ms: Span,
    /// How long a stalled caller does not read, LOW-HIGH ms.
    #[arg(long, default_value = "300-2000", value_parser = parse_span)]
    pub stall_ms: Span,
    /// How long a request may wait for its answer before it is counted lost (after the load
    /// ends, or when the soak closes its connection).
    #[arg(long, default_value_t = 10_000)]
    pub drain_ms: u64,
    /// Descriptors the bridge may hold over its baseline once the callers are gone.
    #[arg(long, default_value_t = 2)]
    pub fd_slack: usize,
    /// How long the bridge may take to settle after the run (workers replaced, zombies
    /// reaped, descriptors closed).
    #[arg(long, default_value_t = 20_000)]
    pub settle_ms: u64,
    /// The bridge binary (default: acgi-bridge beside this one).
    #[arg(long)]
    pub bridge: Option<PathBuf>,
    /// Directory of the echo and faulty workers (default: examples/ beside this binary).
    #[arg(long)]
    pub examples: Option<PathBuf>,
    /// Event loops of the started bridge (its `cores`; default: the bridge's own).
    #[arg(long)]
    pub cores: Option<u32>,
    /// Working directory for the config, sockets and the bridge's log (default: a new one
    /// in the temporary directory, removed after a passing run).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Soak a running bridge at this address instead of starting one.
    #[arg(long, requires = "admin")]
    pub connect: Option<String>,
    /// The running bridge's admin socket (for --connect).
    #[arg(long, requires = "connect")]
    pub admin: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Testing the soak itself: drop one reply unread, which it must report as lost.
    #[arg(long, hide = true)]
    pub self_test_drop_reply: bool,
}

fn parse_span(text: &str) -> Result<Span, String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|e| format!("{text:?}: {e}"))
    };
    let span = Span {
        low_ms: parse(low)?,
        high_ms: parse(high)?,
    };
    if span.low_ms > span.high_ms {
        return Err(format!("{text:?}: LOW is over HIGH"));
    }
    Ok(span)
}

/// Where the bridge is: one the soak started (and stops), or one it was pointed at.
struct Under {
    started: Option<Started>,
    addrs: Vec<String>,
    admin: PathBuf,
    pid: i32,
    targets: Vec<Target>,
    dir: Option<PathBuf>,
}

/// Run the soak; the summary says whether it passed.
pub fn run(options: &Options) -> Result<Summary> {
    if options.callers == 0 || options.depth == 0 || options.workers == 0 {
        bail!("--callers, --depth and --workers must be at least 1");
    }
    let waits_ms = options.stall_ms.high_ms + options.stop_ms.high_ms + options.request_timeout_ms;
    if options.drain_ms <= waits_ms {
        bail!(
            "--drain-ms {} would count answers delayed by a stall, a stop and a timeout as              lost: make it over {waits_ms}",
            options.drain_ms
        );
    }
    let seed = options.seed.unwrap_or_else(seed_from_clock);
    let mut under = prepare(options)?;
    let baseline = Baseline::take(&under.admin, under.pid, options.settle_ms)?;
    let shared = Arc::new(Shared::new(options.callers));
    let started = Instant::now();
    let stop_sending = started + Duration::from_secs(options.duration_s);
    let threads = spawn_load(options, &under, seed, stop_sending, &shared)?;
    for thread in threads {
        if thread.join().is_err() {
            bail!("a soak thread panicked (a bug in the soak)");
        }
    }
    let ran_for = stop_sending.saturating_duration_since(started);
    let mut summary = Summary::new(options, seed, ran_for, &shared.tally);
    summary.settle(options, &baseline, &under.admin, under.pid);
    summary.check_answering(&under.addrs[0], &under.targets);
    if let Some(bridge) = under.started.as_mut() {
        summary.record_exit(bridge.stop());
    }
    summary.judge(options);
    if let Some(dir) = under.dir.take() {
        if summary.passed() && options.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            summary.kept_dir = Some(dir.display().to_string());
        }
    }
    Ok(summary)
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(1)
}

/// Start the bridge, or find the one named by --connect/--admin.
fn prepare(options: &Options) -> Result<Under> {
    if let (Some(connect), Some(admin)) = (&options.connect, &options.admin) {
        let status = bridge::status(admin)?;
        let pid = status["pid"].as_i64().context("no pid in the status")? as i32;
        return Ok(Under {
            started: None,
            addrs: vec![connect.clone()],
            admin: admin.clone(),
            pid,
            targets: resolve_targets(connect)?,
            dir: None,
        });
    }
    let here = std::env::current_exe().context("finding this binary")?;
    let beside = here
        .parent()
        .context("this binary's directory")?
        .to_path_buf();
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("acgi-soak-{}", std::process::id())));
    let setup = Setup {
        bridge: options
            .bridge
            .clone()
            .unwrap_or_else(|| beside.join("acgi-bridge")),
        examples: options
            .examples
            .clone()
            .unwrap_or_else(|| beside.join("examples")),
        dir: dir.clone(),
        workers: options.workers,
        slot_bytes: options.slot_bytes,
        request_timeout_ms: options.request_timeout_ms,
        cores: options.cores,
    };
    let started = Started::start(&setup)?;
    let pid = started.pid().context("the bridge's pid")?;
    Ok(Under {
        addrs: vec![started.unix.clone(), format!("tcp:{}", started.tcp)],
        admin: started.admin.clone(),
        pid,
        targets: vec![
            Target {
                service_id: bridge::ECHO_ID,
                prefix: Vec::new(),
            },
            Target {
                service_id: bridge::FAULTY_ID,
                prefix: b"echo ".to_vec(),
            },
        ],
        started: Some(started),
        dir: Some(dir),
    })
}

/// Service ids of a running bridge's `echo` and (if it has one) `faulty`.
fn resolve_targets(addr: &str) -> Result<Vec<Target>> {
    use acgi_client::{BlockingClient, Service};
    let mut client =
        BlockingClient::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let echo = client
        .service_id(Service::Name("echo"))
        .context("the bridge has no service named echo")?;
    let mut targets = vec![Target {
        service_id: echo,
        prefix: Vec::new(),
    }];
    if let Ok(faulty) = client.service_id(Service::Name("faulty")) {
        targets.push(Target {
            service_id: faulty,
            prefix: b"echo ".to_vec(),
        });
    }
    Ok(targets)
}

fn spawn_load(
    options: &Options,
    under: &Under,
    seed: u64,
    stop_sending: Instant,
    shared: &Arc<Shared>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for index in 0..options.callers {
        let plan = caller::Plan {
            index,
            addr: under.addrs[index as usize % under.addrs.len()].clone(),
            depth: options.depth,
            slot_bytes: options.slot_bytes,
            targets: under.targets.clone(),
            seed,
            stop_sending,
            drain: Duration::from_millis(options.drain_ms),
            drop_one_reply: options.self_test_drop_reply && index == 0,
        };
        let shared = Arc::clone(shared);
        threads.push(
            std::thread::Builder::new()
                .name(format!("soak-caller-{index}"))
                .spawn(move || caller::run(plan, shared))?,
        );
    }
    let plan = chaos::Plan {
        seed,
        interval: options.chaos_interval_ms,
        stop: options.stop_ms,
        stall: options.stall_ms,
        callers: options.callers,
        admin: under.admin.clone(),
        bridge_pid: under.pid,
        until: stop_sending,
        spare_first_caller: options.self_test_drop_reply,
        actions: options.actions.clone(),
    };
    let shared = Arc::clone(shared);
    threads.push(
        std::thread::Builder::new()
            .name("soak-chaos".into())
            .spawn(move || chaos::run(plan, shared))?,
    );
    Ok(threads)
}
