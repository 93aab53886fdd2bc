//! Test harness: start the real `acgi-bridge` binary with real worker executables, on a
//! temporary Unix socket and an ephemeral loopback TCP port, and wait for its `ready` line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::Header;

/// Path of an example executable built next to the test binary (`cargo test` builds examples).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples`",
        path.display()
    );
    path
}

thread_local! {
    /// Environment variables added to every bridge this thread starts ([`with_bridge_env`]).
    static BRIDGE_ENV: std::cell::RefCell<Vec<(String, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `test` with `key=value` in the environment of every bridge it starts (a test runs on
/// one thread, so the same test body can run again with, say, a debugging knob set).
pub fn with_bridge_env(key: &str, value: &str, test: impl FnOnce()) {
    BRIDGE_ENV.with(|env| env.borrow_mut().push((key.to_string(), value.to_string())));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            BRIDGE_ENV.with(|env| env.borrow_mut().pop());
        }
    }
    let _reset = Reset;
    test();
}

pub fn bridge_exe() -> &'static str {
    env!("CARGO_BIN_EXE_acgi-bridge")
}

/// One `[[service]]` of a test config.
#[derive(Clone)]
pub struct ServiceSpec {
    pub id: u32,
    pub name: String,
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub min_workers: u32,
    pub max_workers: u32,
    pub slot_size_bytes: u32,
    pub backlog_max: u32,
    pub extra: String,
}

impl ServiceSpec {
    pub fn new(id: u32, name: &str, exec: PathBuf) -> ServiceSpec {
        ServiceSpec {
            id,
            name: name.to_string(),
            exec,
            args: Vec::new(),
            min_workers: 1,
            max_workers: 4,
            slot_size_bytes: 65536,
            backlog_max: 100_000,
            extra: String::new(),
        }
    }

    pub fn echo() -> ServiceSpec {
        ServiceSpec::new(1, "echo", example("echo"))
    }

    pub fn faulty() -> ServiceSpec {
        ServiceSpec::new(3, "faulty", example("faulty"))
    }

    pub fn kv() -> ServiceSpec {
        ServiceSpec::new(2, "kv", example("kv"))
    }

    pub fn workers(mut self, min: u32, max: u32) -> ServiceSpec {
        self.min_workers = min;
        self.max_workers = max;
        self
    }

    /// A static pool of `workers` (its pids change only when the bridge replaces them).
    pub fn static_pool(mut self, workers: u32) -> ServiceSpec {
        self = self.workers(workers, workers);
        self.extra.push_str("mode = \"static\"\n");
        self
    }

    pub fn backlog(mut self, backlog_max: u32) -> ServiceSpec {
        self.backlog_max = backlog_max;
        self
    }

    pub fn args(mut self, args: &[&str]) -> ServiceSpec {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    fn toml(&self) -> String {
        let args: Vec<String> = self.args.iter().map(|a| format!("{a:?}")).collect();
        format!(
            "[[service]]\nid = {}\nname = {:?}\nexec = {:?}\nargs = [{}]\nmin_workers = {}\n\
             max_workers = {}\nslot_size_bytes = {}\nbacklog_max = {}\n{}\n",
            self.id,
            self.name,
            self.exec.display().to_string(),
            args.join(", "),
            self.min_workers,
            self.max_workers,
            self.slot_size_bytes,
            self.backlog_max,
            self.extra,
        )
    }
}

/// A running bridge in a temporary directory. Dropping it stops it (SIGTERM, then SIGKILL).
pub struct Bridge {
    child: Option<Child>,
    _stdout: BufReader<ChildStdout>,
    pub dir: PathBuf,
    pub unix: String,
    pub tcp: String,
    pub admin: PathBuf,
    /// The metrics endpoint's address, when the config has `metrics_listen`.
    pub metrics: Option<String>,
    /// The read end of the bridge's stderr, when the test asked for a pipe
    /// ([`BridgeBuilder::stderr_pipe`]); drop it to make the bridge's writes fail with EPIPE.
    pub stderr: Option<std::os::fd::OwnedFd>,
    _temp: Option<tempfile::TempDir>,
}

pub struct BridgeBuilder {
    /// A command (and its arguments) to start the bridge through, e.g. `prlimit ...`.
    wrapper: Vec<String>,
    services: Vec<ServiceSpec>,
    top: String,
    state_dir: Option<PathBuf>,
    stderr_pipe: bool,
    tcp: String,
    public_socket: bool,
    open_dir: bool,
    listen_extra: String,
    /// `runtime_dir`, relative to the test directory, with the Unix socket in it.
    runtime_dir: Option<String>,
}

impl BridgeBuilder {
    pub fn service(mut self, service: ServiceSpec) -> BridgeBuilder {
        self.services.push(service);
        self
    }

    /// Extra top-level config lines (e.g. `max_payload_bytes = 1048576`).
    pub fn top(mut self, line: &str) -> BridgeBuilder {
        self.top.push_str(line);
        self.top.push('\n');
        self
    }

    /// Start the bridge through this command line (it must exec the bridge with the rest).
    pub fn wrapper(mut self, command: &[&str]) -> BridgeBuilder {
        self.wrapper = command.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Send the bridge's stderr into a pipe the test holds (`Bridge::stderr`) instead of the
    /// log file: a reader that never reads, or one that goes away. (`Bridge::log` is then
    /// empty.)
    pub fn stderr_pipe(mut self) -> BridgeBuilder {
        self.stderr_pipe = true;
        self
    }

    /// Use this state directory (to restart a bridge on the same data).
    pub fn state_dir(mut self, dir: &Path) -> BridgeBuilder {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    pub fn config_text(&self, dir: &Path) -> String {
        let state_dir = self.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        let mut text = format!("state_dir = {:?}\n", state_dir.display().to_string());
        text.push_str(&self.top);
        let unix = match &self.runtime_dir {
            Some(runtime_dir) => {
                text.push_str(&format!(
                    "runtime_dir = {:?}\n",
                    dir.join(runtime_dir).display().to_string()
                ));
                "{runtime_dir}/acgi-bridge.sock".to_string()
            }
            None => dir.join("bridge.sock").display().to_string(),
        };
        text.push_str(&format!(
            "[listen]\nunix = {unix:?}\ntcp = {:?}\n",
            self.tcp
        ));
        if self.public_socket {
            text.push_str("unix_mode = \"0666\"\n");
        }
        text.push_str(&self.listen_extra);
        for service in &self.services {
            text.push_str(&service.toml());
        }
        text
    }

    /// An extra line in the `[listen]` table (e.g. `allowed_uids = [0]`).
    pub fn listen(mut self, line: &str) -> BridgeBuilder {
        self.listen_extra.push_str(line);
        self.listen_extra.push('\n');
        self
    }

    /// Let every local user reach the Unix socket (mode 0666 in a directory others may
    /// traverse): for tests whose caller is an unprivileged user.
    pub fn public_socket(mut self) -> BridgeBuilder {
        self.public_socket = true;
        self
    }

    /// Let every local user traverse the test directory (the socket keeps its mode): for tests
    /// whose caller is an unprivileged user the socket's owner or group must let in.
    pub fn traversable_dir(mut self) -> BridgeBuilder {
        self.open_dir = true;
        self
    }

    /// Set `runtime_dir` to `path` (relative to the test directory) and put the Unix socket
    /// there as the bundled config does (`{runtime_dir}/acgi-bridge.sock`).
    pub fn runtime_dir(mut self, path: &str) -> BridgeBuilder {
        self.runtime_dir = Some(path.to_string());
        self
    }

    /// Listen on this TCP address instead of an ephemeral port of 127.0.0.1.
    pub fn tcp(mut self, addr: &str) -> BridgeBuilder {
        self.tcp = addr.to_string();
        self
    }

    pub fn start(self) -> Bridge {
        match self.try_start() {
            Ok(bridge) => bridge,
            Err(why) => panic!("{why}"),
        }
    }

    /// Start the bridge; `Err` with its exit status and log when it does not get ready.
    pub fn try_start(self) -> Result<Bridge, String> {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().to_path_buf();
        if self.public_socket || self.open_dir {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .expect("chmod the test directory");
        }
        let config = dir.join("bridge.toml");
        std::fs::write(&config, self.config_text(&dir)).expect("write config");
        let log = std::fs::File::create(dir.join("bridge.log")).expect("log file");
        let (stderr, stderr_read): (Stdio, _) = if self.stderr_pipe {
            let (read, write) = rustix::pipe::pipe().expect("pipe");
            (Stdio::from(write), Some(read))
        } else {
            (Stdio::from(log), None)
        };
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(bridge_exe());
                command
            }
            None => Command::new(bridge_exe()),
        };
        BRIDGE_ENV.with(|env| command.envs(env.borrow().iter().cloned()));
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start acgi-bridge");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the ready line");
        if !line.starts_with("acgi-bridge ready") {
            let status = child.wait().expect("wait");
            let log = std::fs::read_to_string(dir.join("bridge.log")).unwrap_or_default();
            return Err(format!(
                "bridge did not start ({status}); stdout {line:?}; log:\n{log}"
            ));
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name))
                .expect("field in the ready line")
                .to_string()
        };
        let unix = field("unix=");
        let tcp = field("tcp=");
        let admin = PathBuf::from(field("admin="));
        let metrics = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("metrics="))
            .map(str::to_string);
        Ok(Bridge {
            child: Some(child),
            _stdout: stdout,
            dir,
            unix,
            tcp,
            admin,
            metrics,
            stderr: stderr_read,
            _temp: Some(temp),
        })
    }
}

/// Let every user traverse `dir` (mode 0755).
pub fn open_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

pub fn bridge() -> BridgeBuilder {
    BridgeBuilder {
        wrapper: Vec::new(),
        services: Vec::new(),
        top: String::new(),
        state_dir: None,
        stderr_pipe: false,
        tcp: "127.0.0.1:0".to_string(),
        public_socket: false,
        open_dir: false,
        listen_extra: String::new(),
        runtime_dir: None,
    }
}

impl Bridge {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn client(&self) -> BlockingClient {
        BlockingClient::connect(&self.unix).expect("connect to the bridge")
    }

    pub fn tcp_client(&self) -> BlockingClient {
        BlockingClient::connect(&self.tcp).expect("connect to the bridge over TCP")
    }

    /// The bridge's status report, from its admin socket.
    pub fn status(&self) -> acgi_bridge::status::Status {
        acgi_bridge::status::query(&self.admin).expect("status from the admin socket")
    }

    /// The status of one service.
    pub fn service_status(&self, name: &str) -> acgi_bridge::status::ServiceStatus {
        self.status()
            .services
            .into_iter()
            .find(|s| s.name == name)
            .expect("service in status")
    }

    /// Poll the status (bounded) until `done` holds: for pool changes that happen on their own
    /// schedule (reaping, respawns), which no reply can signal.
    pub fn wait_status(
        &self,
        what: &str,
        done: impl Fn(&acgi_bridge::status::Status) -> bool,
    ) -> acgi_bridge::status::Status {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status:#?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default()
    }

    /// The log once it contains `needle` (bounded): the bridge writes its log from a thread
    /// of its own, so a line can land a moment after the event it tells of.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log never said {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Send a signal to the bridge.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
            .expect("bridge exits after SIGTERM")
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Pids of the bridge's child processes, with their /proc state letter.
    pub fn children(&self) -> Vec<(i32, char)> {
        children_of(self.pid())
    }

    /// Wait until the bridge has no zombie children (reaping is asynchronous), bounded.
    pub fn assert_no_zombies(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let zombies: Vec<_> = self
                .children()
                .into_iter()
                .filter(|(_, s)| *s == 'Z')
                .collect();
            if zombies.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "zombie children remain: {zombies:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what the bridge said (its directory goes with it).
            eprintln!(
                "--- bridge log ({}) ---\n{}",
                self.dir.display(),
                self.log()
            );
        }
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                if let Some(child) = self.child.as_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

/// Children of `pid` (all of its threads), with their state letters.
pub fn children_of(pid: i32) -> Vec<(i32, char)> {
    // Every process whose parent is `pid`, from each one's stat (the per-task `children` files
    // are documented as unreliable while processes come and go).
    let mut children = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces and parentheses, so split at the last.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next());
        let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
        if parent == Some(pid) {
            children.push((child, state.unwrap_or('?')));
        }
    }
    children
}

/// A minimal HTTP/1.1 GET: returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Count open descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    fd_list(pid).len()
}

/// What each open descriptor of a process points at (for leak messages).
pub fn fd_list(pid: i32) -> Vec<String> {
    let mut list: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .map(|entry| {
                    let target = std::fs::read_link(entry.path()).unwrap_or_default();
                    format!(
                        "{} -> {}",
                        entry.file_name().to_string_lossy(),
                        target.display()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    list.sort();
    list
}

/// A payload that names its request, so a reply can be matched to it.
pub fn tagged_payload(tag: u64, len: usize) -> Vec<u8> {
    let mut payload = format!("req-{tag}-").into_bytes();
    let mut state = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while payload.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        payload.push(state as u8);
    }
    payload.truncate(len);
    payload
}

/// Send one tagged echo request (service id 1) per tag on one connection without waiting, then
/// check that every answer is the reply to its own request and none is missing.
pub fn pipeline_tagged(
    client: &mut BlockingClient,
    tags: std::ops::Range<u64>,
    len_of: impl Fn(u64) -> usize,
) {
    let mut sent = std::collections::HashMap::new();
    for tag in tags {
        let payload = tagged_payload(tag, len_of(tag));
        let id = client.send(1, &payload).unwrap();
        sent.insert(id, payload);
    }
    for _ in 0..sent.len() {
        let answer = client.receive().unwrap();
        assert_eq!(
            answer.header.kind,
            acgi_bridge::proto::Kind::Reply,
            "{:?}",
            String::from_utf8_lossy(&answer.payload)
        );
        let expected = sent
            .remove(&answer.header.request_id)
            .expect("one answer per request");
        assert!(
            answer.payload == expected,
            "the reply to request {} is not its own",
            answer.header.request_id
        );
    }
}

/// Read one whole frame (header and payload) from a raw connection to the bridge.
pub fn read_frame(stream: &mut std::os::unix::net::UnixStream) -> (Header, Vec<u8>) {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    stream.read_exact(&mut bytes).expect("a frame header");
    let header = Header::decode(&bytes, 1 << 24).expect("a valid header");
    let mut payload = vec![0; header.payload_len as usize];
    stream
        .read_exact(&mut payload)
        .expect("the frame's payload");
    (header, payload)
}

/// Wait (bounded) until the peer has read everything sent on `stream` (`SIOCOUTQ` on a Unix
/// stream socket: the bytes the peer has not read yet).
pub fn wait_until_read(stream: &std::os::unix::net::UnixStream) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut unread: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer; the socket is ours.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut unread) };
        assert_eq!(rc, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
        if unread == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge never read {unread} bytes"
        );
        std::thread::yield_now();
    }
}

/// One thread of another process, stopped with ptrace until dropped.
pub struct FrozenThread {
    tid: i32,
}

impl FrozenThread {
    /// Stop thread `tid`; `None` when this environment forbids ptrace.
    pub fn freeze(tid: i32) -> Option<FrozenThread> {
        // SAFETY: ptrace and waitpid on a thread of our own child, with no memory passed.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            if libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) != 0 {
                eprintln!(
                    "ptrace is not permitted here ({}): skipping",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        Some(FrozenThread { tid })
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        // SAFETY: as in `freeze`; the thread is in a ptrace stop, so it can be detached.
        unsafe {
            let null = std::ptr::null_mut::<libc::c_void>();
            libc::ptrace(libc::PTRACE_DETACH, self.tid, null, null);
        }
    }
}

/// The system's python3: a user's own (pyenv's under /root, say) may be out of an
/// unprivileged user's reach.
pub fn python3() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
