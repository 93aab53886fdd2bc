//! `acgi-bridge`: the daemon (`serve`), a one-shot client (`call`) and a config checker
//! (`check`). Thin: everything lives in the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use acgi_bridge::client::{BlockingClient, CallError};
use acgi_bridge::config::{Config, ConfigError};
use clap::{Parser, Subcommand};

/// Counts allocations so that status can show the data path allocates nothing per request.
#[global_allocator]
static ALLOCATOR: acgi_bridge::alloc_count::CountingAllocator =
    acgi_bridge::alloc_count::CountingAllocator;

/// Default address of `call`: the bundled config's Unix socket.
const DEFAULT_CONNECT: &str = "/tmp/acgi-bridge.sock";

#[derive(Parser)]
#[command(
    name = "acgi-bridge",
    version,
    about = "Lets asynchronous servers call synchronous code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge.
    Serve {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Call a service once and print its reply on stdout.
    Call {
        /// Bridge address: a Unix socket path, unix:PATH, host:port or tcp:host:port.
        #[arg(long, env = "ACGI_BRIDGE_ADDR", default_value = DEFAULT_CONNECT)]
        connect: String,
        /// Service name or numeric id.
        service: String,
        /// The payload; `-` reads it from stdin; omitted means empty.
        payload: Option<String>,
    },
    /// Print each service's pool state and counters, from the admin socket.
    Status {
        /// The admin socket; default: the one named by --config.
        #[arg(long, conflicts_with = "config")]
        admin: Option<PathBuf>,
        /// Find the admin socket from this config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and name each bad key with the reason.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve { config, log } => serve(&config, &log),
        Command::Call {
            connect,
            service,
            payload,
        } => call(&connect, &service, payload),
        Command::Check { config } => check(&config),
        Command::Status {
            admin,
            config,
            json,
        } => status(admin, config, json),
    }
}

fn serve(path: &std::path::Path, log: &str) -> ExitCode {
    // Held to the end: dropping it flushes the queued lines (for a bounded time).
    let _log = acgi_bridge::logging::init(log);
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("config error: {error}");
            return ExitCode::from(78);
        }
    };
    match acgi_bridge::engine::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn call(connect: &str, service: &str, payload: Option<String>) -> ExitCode {
    let payload = match payload.as_deref() {
        Some("-") => {
            let mut bytes = Vec::new();
            if let Err(error) = std::io::stdin().read_to_end(&mut bytes) {
                eprintln!("error: reading stdin: {error}");
                return ExitCode::FAILURE;
            }
            bytes
        }
        Some(text) => text.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let result =
        BlockingClient::connect(connect).and_then(|mut client| match service.parse::<u32>() {
            Ok(id) => client.call(id, &payload),
            Err(_) => client.call(service, &payload),
        });
    match result {
        Ok(reply) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&reply);
            if stdout.is_terminal() && !reply.ends_with(b"\n") {
                let _ = stdout.write_all(b"\n");
            }
            ExitCode::SUCCESS
        }
        Err(error @ CallError::Remote { .. }) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {connect}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn status(admin: Option<PathBuf>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let path = match (admin, config) {
        (Some(path), _) => path,
        (None, Some(config)) => match Config::load(&config) {
            Ok(config) => config.admin_socket_path(),
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::from(78);
            }
        },
        (None, None) => {
            eprintln!("error: give --admin SOCKET or --config FILE");
            return ExitCode::from(64);
        }
    };
    match acgi_bridge::status::query(&path) {
        Ok(status) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).expect("serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(status) => {
            print!("{}", status.render());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}: {error}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            println!(
                "{}: ok ({} services)",
                path.display(),
                config.services.len()
            );
            ExitCode::SUCCESS
        }
        Err(ConfigError::Invalid { path, problems }) => {
            for problem in &problems {
                eprintln!("{}: {problem}", path.display());
            }
            ExitCode::from(78)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(78)
        }
    }
}
