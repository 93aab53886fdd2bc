//! `acgi-bridge`: the daemon (`serve`), a one-shot client (`call`), the status reader (`status`),
//! the admin commands (`reload`, `pause`, `resume`, `drain`, `recycle`, `kill-worker`, `set`),
//! the binary upgrade (`upgrade`) and a config checker (`check`). Thin: the command line is
//! `acgi_bridge::cli` (so that the man pages are generated from it), everything else lives in
//! the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use acgi_bridge::cli::{self, Cli, Command};
use acgi_bridge::client::CallError;
use acgi_bridge::config::{Config, ConfigError};
use acgi_bridge::engine::systemd::Systemd;
use acgi_bridge::engine::upgrade::Takeover;
use acgi_bridge::logging::LogFormat;
use clap::Parser;

/// Counts allocations so that status can show the data path allocates nothing per request.
#[global_allocator]
static ALLOCATOR: acgi_bridge::alloc_count::CountingAllocator =
    acgi_bridge::alloc_count::CountingAllocator;

/// At exit, how long the access log's writer may take to write what is queued.
const ACCESS_LOG_FLUSH_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            config,
            log,
            takeover_fd,
            log_format,
        } => serve(&config, &log, log_format, takeover_fd),
        Command::Call {
            connect,
            config,
            wait,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
            service,
            payload,
        } => {
            let connect = match config {
                Some(path) => match call_addr_of(&path) {
                    Ok(addr) => addr,
                    Err(code) => return code,
                },
                None => cli::connect_addr(&connect),
            };
            let wait = std::time::Duration::from_secs_f64(wait.clamp(0.0, 86_400.0));
            let tls = cli::CallTls {
                ca: tls_ca,
                cert: tls_cert,
                key: tls_key,
                server_name: tls_server_name,
            };
            call(&connect, wait, &tls, &service, payload)
        }
        Command::Check { config, print } => check(&config, print),
        Command::Reload { admin } => admin_command(&admin, "reload"),
        Command::Status {
            admin,
            config,
            json,
        } => status(admin, config, json),
        Command::Pause { admin, service } => admin_command(&admin, &format!("pause {service}")),
        Command::Resume { admin, service } => admin_command(&admin, &format!("resume {service}")),
        Command::Drain { admin, service } => admin_command(&admin, &format!("drain {service}")),
        Command::Recycle { admin, service } => admin_command(&admin, &format!("recycle {service}")),
        Command::KillWorker { admin, pid } => admin_command(&admin, &format!("kill-worker {pid}")),
        Command::Set {
            admin,
            service,
            limits,
        } => admin_command(&admin, &format!("set {service} {}", limits.join(" "))),
        Command::Upgrade { admin, config } => upgrade(admin, config),
    }
}

/// The admin socket from `--admin`, or from the config `--config` names.
fn admin_socket_path(admin: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match (admin, config) {
        (Some(path), _) => Ok(path),
        (None, Some(config)) => match Config::load(&config) {
            Ok(config) => Ok(config.admin_socket_path()),
            Err(error) => {
                eprintln!("{error}");
                Err(ExitCode::from(78))
            }
        },
        (None, None) => {
            eprintln!("error: give --admin SOCKET or --config FILE");
            Err(ExitCode::from(64))
        }
    }
}

/// One admin command: its one-line result on stdout, or the error on stderr and exit 1.
fn admin_command(admin: &cli::AdminSocket, line: &str) -> ExitCode {
    let path = match admin_socket_path(admin.admin.clone(), admin.config.clone()) {
        Ok(path) => path,
        Err(code) => return code,
    };
    match acgi_bridge::status::command(&path, line) {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    path: &std::path::Path,
    log: &str,
    log_format: LogFormat,
    takeover_fd: Option<i32>,
) -> ExitCode {
    // Both first, while the process has one thread (the log writer starts next, the engine
    // later): what the process inherited is taken only then (`engine::io::inherited`).
    let systemd = Systemd::from_env();
    let takeover = takeover_fd.map(Takeover::from_fd).transpose();
    // Held to the end: dropping it flushes the queued lines (for a bounded time).
    let _log = acgi_bridge::logging::init(log, log_format);
    // Started by an upgrading bridge: every failure from here on is reported to it too.
    let mut takeover = match takeover {
        Ok(takeover) => takeover,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::from(64);
        }
    };
    let mut fail = |message: String, code: u8| {
        tracing::error!("{message}");
        if let Some(takeover) = takeover.as_mut() {
            takeover.report_failure(&message);
        }
        ExitCode::from(code)
    };
    let systemd = match systemd {
        Ok(systemd) => systemd,
        Err(error) => return fail(error.to_string(), 1),
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => return fail(format!("config error: {error}"), 78),
    };
    if let Some(access_log) = &config.access_log {
        if let Err(error) = acgi_bridge::access_log::open(access_log, log_format) {
            let message = format!(
                "cannot open the access log {}: {error}; create its directory or let the \
                 bridge's user write there, or remove access_log from the config",
                access_log.display()
            );
            tracing::error!("{message}");
            if let Some(takeover) = takeover.as_mut() {
                takeover.report_failure(&message);
            }
            return ExitCode::from(73);
        }
    }
    let result = acgi_bridge::engine::run(config, systemd, takeover.as_mut());
    // The last requests' access log lines, before the process (and its writer thread) ends.
    if !acgi_bridge::access_log::flush(ACCESS_LOG_FLUSH_WAIT_MAX) {
        tracing::warn!("the access log's last lines could not be written in time");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{error:#}");
            tracing::error!("{message}");
            if let Some(takeover) = takeover.as_mut() {
                takeover.report_failure(&message);
            }
            ExitCode::FAILURE
        }
    }
}

/// The address `call --config FILE` connects to: the config's Unix socket, else its TCP
/// listener.
fn call_addr_of(path: &std::path::Path) -> Result<String, ExitCode> {
    let config = Config::load(path).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(78)
    })?;
    if let Some(unix) = &config.listen.unix {
        return Ok(format!("unix:{}", unix.display()));
    }
    match &config.listen.tcp {
        Some(tcp) if !tcp.ends_with(":0") => Ok(format!("tcp:{tcp}")),
        _ => {
            eprintln!(
                "error: {}: no listen.unix and no fixed listen.tcp port to call (give --connect)",
                path.display()
            );
            Err(ExitCode::from(64))
        }
    }
}

/// Connect to `addr`, retrying while nothing listens there yet, until `wait` has passed.
fn connect_waiting(
    addr: &str,
    wait: std::time::Duration,
    options: &acgi_bridge::client::ConnectOptions,
) -> Result<acgi_bridge::client::BlockingClient, CallError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match options.blocking(addr) {
            Err(CallError::Io(error))
                if std::time::Instant::now() < deadline
                    && matches!(
                        error.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The client options `call`'s TLS flags ask for.
fn call_options(tls: &cli::CallTls) -> Result<acgi_bridge::client::ConnectOptions, CallError> {
    let options = acgi_bridge::client::ConnectOptions::new();
    let Some(ca) = &tls.ca else {
        if tls.cert.is_some() || tls.server_name.is_some() {
            return Err(CallError::Protocol(
                "--tls-cert and --tls-server-name need --tls-ca".into(),
            ));
        }
        return Ok(options);
    };
    let mut config = acgi_bridge::client::TlsConfig::new(ca)?;
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        config = config.client_cert(cert, key)?;
    }
    if let Some(name) = &tls.server_name {
        config = config.server_name(name)?;
    }
    Ok(options.tls(config))
}

fn call(
    addr: &str,
    wait: std::time::Duration,
    tls: &cli::CallTls,
    service: &str,
    payload: Option<String>,
) -> ExitCode {
    let connect = addr;
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
    let result = call_options(tls)
        .and_then(|options| connect_waiting(addr, wait, &options))
        .and_then(|mut client| match service.parse::<u32>() {
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

fn upgrade(admin: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    let path = match admin_socket_path(admin, config) {
        Ok(path) => path,
        Err(code) => return code,
    };
    match acgi_bridge::engine::upgrade::request(&path) {
        Ok(answer) if answer.starts_with("upgraded:") => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Ok(answer) if answer.is_empty() => {
            eprintln!(
                "error: {}: the bridge closed without an answer",
                path.display()
            );
            ExitCode::FAILURE
        }
        Ok(answer) => {
            eprint!("{answer}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {}: {error}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn status(admin: Option<PathBuf>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let path = match admin_socket_path(admin, config) {
        Ok(path) => path,
        Err(code) => return code,
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

fn check(path: &std::path::Path, print: bool) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                eprintln!("{}: warning: {warning}", path.display());
            }
            let running = config.bridge_running();
            if running {
                eprintln!(
                    "{}: note: a bridge of this config is running (its admin socket answers): \
                     its ports were not checked",
                    path.display()
                );
            }
            let problems = config.runtime_problems_of(running);
            for problem in &problems {
                eprintln!("{}: {problem}", path.display());
            }
            if !problems.is_empty() {
                return ExitCode::from(78);
            }
            // What `serve` would refuse first: a kernel without an io_uring op it needs.
            if let Err(reason) = acgi_bridge::engine::io::check_kernel() {
                eprintln!("{}: kernel: {reason}", path.display());
                return ExitCode::FAILURE;
            }
            if print {
                match config.effective_toml() {
                    Ok(text) => print!("{text}"),
                    Err(error) => {
                        eprintln!("error: cannot print the config: {error}");
                        return ExitCode::FAILURE;
                    }
                }
                return ExitCode::SUCCESS;
            }
            let services = cli::count_noun(config.services.len(), "service", "services");
            println!("{}: ok ({services})", path.display());
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
