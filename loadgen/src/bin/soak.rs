//! `acgi-soak`: the fault soak (`acgi_loadgen::soak`). Prints one summary and exits 0 when it
//! passed, 1 when it found a lost, misrouted or duplicated reply, a forbidden error or a leak,
//! and 2 when it could not run at all.

#![forbid(unsafe_code)]

use clap::Parser;

use acgi_loadgen::soak::{self, Options};

fn main() {
    let options = Options::parse();
    match soak::run(&options) {
        Ok(summary) => {
            if options.json {
                match serde_json::to_string(&summary) {
                    Ok(line) => println!("{line}"),
                    Err(error) => eprintln!("acgi-soak: the summary as JSON: {error}"),
                }
            } else {
                print!("{}", summary.text());
            }
            std::process::exit(if summary.passed() { 0 } else { 1 });
        }
        Err(error) => {
            eprintln!("acgi-soak: {error:#}");
            std::process::exit(2);
        }
    }
}
