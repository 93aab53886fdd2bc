//! `acgi-loadgen`: parse the command line, build the runtime, run, print, set the exit status.
//! Everything else lives in the library (`acgi_loadgen`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use acgi_loadgen::args::{Cli, Command, OutputArgs, PlanArgs, RunArgs, SweepArgs};
use acgi_loadgen::closed_loop::Outcome;
use acgi_loadgen::hgrm;
use acgi_loadgen::machine::Machine;
use acgi_loadgen::plan::{self, PlanInputs, PlanReport};
use acgi_loadgen::report::{Parameters, Report};
use acgi_loadgen::svg::{self, Series, PALETTE};
use acgi_loadgen::sweep::{self, SweepReport};
use acgi_loadgen::timer::tighten_timer_slack;
use acgi_loadgen::{closed_loop, open_loop};
use anyhow::{anyhow, Context};

fn main() -> ExitCode {
    let command = Cli::parse_args().command();
    match run(command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("acgi-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run `command`; `Ok(passed)`.
fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run(args) => run_once(&args),
        Command::Sweep(args) => run_sweep(&args),
        Command::Plan(args) => run_plan(&args),
    }
}

fn runtime(threads: u32) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = if threads == 1 {
        tighten_timer_slack();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads as usize)
            .on_thread_start(tighten_timer_slack)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    Ok(runtime)
}

fn run_once(args: &RunArgs) -> anyhow::Result<bool> {
    let runtime = runtime(args.target.threads)?;
    let machine = Machine::probe();
    let (report, outcome, what) = match args.rate {
        None => {
            let plan = args.closed_loop_plan().map_err(|e| anyhow!(e))?;
            let outcome = runtime.block_on(closed_loop::run(&plan))?;
            let report = Report::closed_loop(
                machine,
                Parameters::of(&plan, args.target.threads),
                &outcome,
            );
            let what = format!(
                "closed loop, {} connections x {} in flight{}",
                plan.connections,
                plan.depth,
                if plan.batch { " (batched)" } else { "" }
            );
            (report, outcome, what)
        }
        Some(rate) => {
            let plan = args.open_loop_plan(rate).map_err(|e| anyhow!(e))?;
            let outcome = runtime.block_on(open_loop::run(&plan))?;
            let services: Vec<String> = plan.workload.services.values().cloned().collect();
            let report = Report::open_loop(
                machine,
                Parameters::of_open(&plan, args.target.threads),
                &outcome,
                &services,
            );
            let what = format!("open loop, {rate} req/s {} arrivals", plan.arrival.name());
            (report, outcome, what)
        }
    };
    write_outputs(&args.output, &report, &outcome, &what, |_| Vec::new())?;
    if args.target.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.passed)
}

/// The .hgrm and SVG files of one run; `extra` adds series (predictions) to the chart.
fn write_outputs(
    output: &OutputArgs,
    report: &Report,
    outcome: &Outcome,
    what: &str,
    extra: impl FnOnce(u64) -> Vec<Series>,
) -> anyhow::Result<()> {
    let recorder = &outcome.recorder;
    let open = report.mode == "open_loop";
    let p = &report.parameters;
    let header = format!(
        "acgi-loadgen {what}: service {} at {}, payloads {}, {} s measured after {} s warm-up",
        p.service, p.connect, p.payloads, p.duration_s, p.warmup_s
    );
    if let Some(path) = &output.hgrm {
        let measured = if open {
            "latency of successful calls from their intended send times (corrected for \
             coordinated omission)"
        } else {
            "latency of successful calls (closed loop: from each call's start)"
        };
        let machine = &report.machine;
        let about = [
            header.clone(),
            measured.to_string(),
            format!(
                "machine: {} cpus, kernel {}, {}",
                machine.nproc, machine.kernel, machine.cpu_model
            ),
        ];
        let text =
            hgrm::percentile_distribution(recorder.latency_histogram(), output.hgrm_unit, &about);
        write_file(path, &text)?;
    }
    if let Some(path) = &output.plot {
        let points = |histogram| -> Vec<(f64, f64)> {
            hgrm::percentile_rows(histogram)
                .into_iter()
                .map(|(q, us, _)| (q, us as f64 / 1000.0))
                .collect()
        };
        let mut series = vec![Series {
            label: if open {
                "from intended send times (corrected)".to_string()
            } else {
                "closed loop".to_string()
            },
            colour: PALETTE[0],
            dashed: false,
            points: points(recorder.latency_histogram()),
        }];
        if open {
            series.push(Series {
                label: "from actual sends (uncorrected)".to_string(),
                colour: PALETTE[0],
                dashed: true,
                points: points(recorder.uncorrected_histogram()),
            });
        }
        series.extend(extra(recorder.requests_ok()));
        let chart = svg::percentile_chart(
            "acgi-loadgen: latency by percentile",
            &header,
            &series,
            recorder.requests_ok(),
            None,
        );
        write_file(path, &chart)?;
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn run_sweep(args: &SweepArgs) -> anyhow::Result<bool> {
    let rates = args.rates().map_err(|e| anyhow!(e))?;
    let workload = args
        .target
        .workload(args.step_duration)
        .map_err(|e| anyhow!(e))?;
    let base = open_loop::Plan {
        workload,
        connections: args.target.connections,
        rate: rates[0],
        arrival: args.open.arrival,
        in_flight_max: args.open.in_flight_max,
    };
    let machine = Machine::probe();
    let json = args.target.json;
    let slo_ms = args.slo_p99.as_secs_f64() * 1000.0;
    if !json {
        let parameters = Parameters::of_open(&base, args.target.threads);
        print!(
            "{}",
            SweepReport::text_header(&machine, &parameters, slo_ms)
        );
    }
    let runtime = runtime(args.target.threads)?;
    let report = runtime.block_on(sweep::run(
        &base,
        &rates,
        args.slo_p99,
        args.target.threads,
        machine,
        |step| {
            if !json {
                println!("{}", step.to_row());
            }
        },
    ))?;
    if let Some(path) = &args.plot {
        write_file(path, &report.to_svg())?;
    }
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text_summary());
    }
    Ok(report.sustainable_rate.is_some())
}

fn run_plan(args: &PlanArgs) -> anyhow::Result<bool> {
    if args.target.services.len() != 1 {
        return Err(anyhow!(
            "plan sizes one service: give exactly one --service"
        ));
    }
    let workload = args
        .target
        .workload(args.duration)
        .map_err(|e| anyhow!(e))?;
    let service = workload.services.get(0).clone();
    let runtime = runtime(args.target.threads)?;
    let warmup_calls = (args.samples / 20).clamp(10, 500);
    let sampled = runtime.block_on(plan::measure_service_time(
        &workload,
        args.samples,
        warmup_calls,
    ))?;
    let inputs = PlanInputs {
        machine: Machine::probe(),
        service: &service,
        payloads: workload.payloads_label(),
        rate: args.rate,
        slo: args.slo_p99,
        workers: args.workers,
        configured_workers: args.configured_workers,
    };
    let mut report = PlanReport::build(&inputs, &sampled);
    if !args.predict_only && !sampled.histogram.is_empty() {
        let plan = open_loop::Plan {
            workload,
            connections: args.target.connections,
            rate: args.rate,
            arrival: args.arrival,
            in_flight_max: open_loop::IN_FLIGHT_MAX_DEFAULT,
        };
        let outcome = runtime.block_on(open_loop::run(&plan))?;
        let measured = Report::open_loop(
            Machine::probe(),
            Parameters::of_open(&plan, args.target.threads),
            &outcome,
            std::slice::from_ref(&service),
        );
        let what = format!("plan verification, open loop {} req/s", args.rate);
        write_outputs(&args.output, &measured, &outcome, &what, |_| Vec::new())?;
        if let Some(path) = &args.output.plot {
            // The plan's chart replaces the plain one: the models beside the measurement.
            let service_time = plan::service_time_of(&sampled.histogram);
            let chart = plan::plan_chart(
                &report,
                &service_time,
                outcome.recorder.latency_histogram(),
                outcome.recorder.uncorrected_histogram(),
            );
            write_file(path, &chart)?;
        }
        report.attach_measured(measured);
    }
    if args.target.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.passed)
}
