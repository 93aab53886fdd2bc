//! The bridge under test, as the soak sees it from outside: the process it starts (with a
//! config it writes), its admin socket's `status`, and what `/proc` says about it (open
//! descriptors, children and their states). Nothing here links the daemon: the status is read
//! as JSON, so the soak stays a caller like any other.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::{Pid, Signal};
use serde_json::Value;

/// How long a started bridge may take to print its ready line (it waits for each service's
/// first worker), and to exit after SIGTERM.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The services the soak's config registers, by id.
pub const ECHO_ID: u32 = 1;
pub const FAULTY_ID: u32 = 2;

/// What the soak's own config says.
#[derive(Clone, Debug)]
pub struct Setup {
    pub bridge: PathBuf,
    pub examples: PathBuf,
    pub dir: PathBuf,
    pub workers: u32,
    pub slot_bytes: u32,
    pub request_timeout_ms: u64,
    pub cores: Option<u32>,
}

impl Setup {
    /// The config: echo and `faulty` as static pools with small slots, a short request
    /// timeout (so a stopped worker's request times out within the run), and a crash breaker
    /// out of reach (the kills are the test, not a crash loop to stop).
    pub fn config_text(&self) -> String {
        let mut text = format!(
            "state_dir = {:?}\n",
            self.dir.join("state").display().to_string()
        );
        if let Some(cores) = self.cores {
            text.push_str(&format!("cores = {cores}\n"));
        }
        text.push_str(&format!(
            "[listen]\nunix = {:?}\ntcp = \"127.0.0.1:0\"\n",
            self.dir.join("bridge.sock").display().to_string()
        ));
        for (id, name, extra) in [
            (ECHO_ID, "echo", "worker_queue_depth = 4\n"),
            (FAULTY_ID, "faulty", ""),
        ] {
            text.push_str(&format!(
                "[[service]]\nid = {id}\nname = {name:?}\nexec = {:?}\nmode = \"static\"\n\
                 min_workers = {w}\nmax_workers = {w}\nslot_size_bytes = {}\n\
                 request_timeout_ms = {}\nbacklog_max = 100000\ncrash_limit = 1000000\n\
                 crash_window_ms = 1000\nspawn_rate_max = 1000\nkill_grace_ms = 1000\n{extra}",
                self.examples.join(name).display().to_string(),
                self.slot_bytes,
                self.request_timeout_ms,
                w = self.workers,
            ));
        }
        text
    }
}

/// A bridge the soak started. Dropping it kills it (a run that fails early leaves nothing).
pub struct Started {
    child: Option<Child>,
    _stdout: BufReader<ChildStdout>,
    pub unix: String,
    pub tcp: String,
    pub admin: PathBuf,
    pub log: PathBuf,
}

impl Started {
    pub fn start(setup: &Setup) -> Result<Started> {
        for exe in [
            &setup.bridge,
            &setup.examples.join("echo"),
            &setup.examples.join("faulty"),
        ] {
            if !exe.exists() {
                bail!(
                    "{} is missing: build it (cargo build --bins --examples), or name it with \
                     --bridge / --examples",
                    exe.display()
                );
            }
        }
        std::fs::create_dir_all(&setup.dir)
            .with_context(|| format!("creating {}", setup.dir.display()))?;
        let config = setup.dir.join("soak.toml");
        std::fs::write(&config, setup.config_text())
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = setup.dir.join("bridge.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(&setup.bridge)
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", setup.bridge.display()))?;
        let stdout = child.stdout.take().context("the bridge's stdout")?;
        let (line, stdout) = read_ready_line(stdout)?;
        let mut started = Started {
            child: Some(child),
            _stdout: stdout,
            unix: String::new(),
            tcp: String::new(),
            admin: PathBuf::new(),
            log: log_path,
        };
        if !line.starts_with("acgi-bridge ready") {
            let status = started.stop().ok();
            bail!(
                "the bridge did not start ({status:?}): stdout {line:?}; its log is {}",
                started.log.display()
            );
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name))
                .map(str::to_string)
                .with_context(|| format!("no {name} in the ready line {line:?}"))
        };
        started.unix = field("unix=")?;
        started.tcp = field("tcp=")?;
        started.admin = PathBuf::from(field("admin=")?);
        Ok(started)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|child| child.id() as i32)
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .context("the bridge was already stopped")?;
        signal(child.id() as i32, Signal::TERM);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("the bridge did not exit within {EXIT_TIMEOUT:?} of SIGTERM ({status})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first line of the bridge's stdout, read on a thread so that a bridge that never prints
/// it costs [`READY_TIMEOUT`], not forever.
fn read_ready_line(stdout: ChildStdout) -> Result<(String, BufReader<ChildStdout>)> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line).map(|_| line);
        let _ = sender.send((read, reader));
    });
    let (line, reader) = receiver
        .recv_timeout(READY_TIMEOUT)
        .context("the bridge printed no ready line in time")?;
    Ok((line.context("reading the bridge's ready line")?, reader))
}

/// The bridge's `status` (the admin socket's JSON).
pub fn status(admin: &Path) -> Result<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(admin)
        .with_context(|| format!("connecting to the admin socket {}", admin.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"status\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    serde_json::from_str(text.trim())
        .with_context(|| format!("a status that is not JSON: {text:?}"))
}

/// The pids of every service's workers, as the status lists them.
pub fn worker_pids(status: &Value) -> Vec<i32> {
    services(status)
        .iter()
        .flat_map(|service| service["pids"].as_array().cloned().unwrap_or_default())
        .filter_map(|pid| pid.as_i64().map(|pid| pid as i32))
        .collect()
}

pub fn services(status: &Value) -> Vec<Value> {
    status["services"].as_array().cloned().unwrap_or_default()
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: i32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// `(state, ppid)` of `pid` from /proc/PID/stat (the command name may hold spaces and
/// parentheses, so fields are counted after its last `)`).
pub fn state_and_parent(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Children of `parent` in state Z.
pub fn zombies(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| state_and_parent(pid) == Some(('Z', parent)))
        .collect()
}

/// Signal `pid` only while it is a live child of `parent` (a pid the bridge has reaped may
/// already name another process). Whether it was sent.
pub fn signal_child(pid: i32, parent: i32, signal: Signal) -> bool {
    match state_and_parent(pid) {
        Some((state, ppid)) if ppid == parent && state != 'Z' => self::signal(pid, signal),
        _ => false,
    }
}

fn signal(pid: i32, signal: Signal) -> bool {
    Pid::from_raw(pid).is_some_and(|pid| rustix::process::kill_process(pid, signal).is_ok())
}
