//! `acgi-loadgen`: parse the command line, build the runtime, run, print, set the exit status.
//! Everything else lives in the library (`acgi_loadgen`).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use acgi_loadgen::args::Args;
use acgi_loadgen::closed_loop;
use acgi_loadgen::machine::Machine;
use acgi_loadgen::report::{Parameters, Report};
use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("acgi-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let plan = args.closed_loop_plan();
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads as usize)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    let outcome = runtime.block_on(closed_loop::run(&plan))?;
    Ok(Report::closed_loop(
        Machine::probe(),
        Parameters::of(&plan, args.threads),
        &outcome,
    ))
}
