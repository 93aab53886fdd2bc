//! Issue 10: who may hold how many caller connections. A flood over TCP cannot lock out the
//! Unix socket's callers, and one peer (a uid on Unix, an address on TCP) cannot take every
//! connection. The floods come from real separate processes, as the unprivileged user who
//! would start them where that is the point.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

use crate::common::{bridge, python3, Bridge, ServiceSpec};

/// Opens connections one by one and sends a `Ping` on each: a connection the bridge admitted
/// answers with a `Pong`, one it refused is closed (EOF or a reset). Prints the tally, then
/// holds every admitted connection open until its stdin closes.
const HOLDER: &str = r#"
import socket, struct, sys
addr, count, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held, admitted, refused = [], 0, 0
for i in range(count):
    if ":" in addr:
        host, port = addr.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source != "-":
            s.bind((source, 0))
        s.connect((host, int(port)))
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr)
    try:
        s.sendall(struct.pack("<HBBHHIIQ", 0xAC6B, 1, 6, 0, 0, 0, 0, i + 1))
        head = b""
        while len(head) < 24:
            more = s.recv(24 - len(head))
            if not more:
                break
            head += more
    except OSError:
        head = b""
    if len(head) == 24 and head[3] == 7:
        admitted += 1
        held.append(s)
    else:
        refused += 1
        s.close()
print(f"admitted={admitted} refused={refused}", flush=True)
sys.stdin.read()
"#;

/// Run `script` (Python) as nobody with `arg`, and wait for it.
fn python_as_nobody(script: &str, arg: &std::path::Path) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python3(),
            "-c",
            script,
        ])
        .arg(arg)
        .output()
        .unwrap()
}

/// A process holding connections (closed when dropped).
struct Holder {
    child: Child,
    admitted: u32,
    refused: u32,
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Open `count` connections to `addr` (a Unix path or `host:port`), from `source` (an address
/// to bind, TCP only) and as `uid` (through `setpriv`) when given.
fn hold(addr: &str, count: u32, source: Option<&str>, uid: Option<u32>) -> Holder {
    let mut command = match uid {
        Some(uid) => {
            let mut command = Command::new("setpriv");
            command.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                python3(),
            ]);
            command
        }
        None => Command::new(python3()),
    };
    let mut child = command
        .args([
            "-c",
            HOLDER,
            addr,
            &count.to_string(),
            source.unwrap_or("-"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |name: &str| -> u32 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("holder printed {line:?}"))
            .parse()
            .unwrap()
    };
    Holder {
        admitted: field("admitted="),
        refused: field("refused="),
        child,
    }
}

fn echo_works(bridge: &Bridge, tcp: bool) -> bool {
    let client = if tcp {
        acgi_bridge::client::BlockingClient::connect(&bridge.tcp)
    } else {
        acgi_bridge::client::BlockingClient::connect(&bridge.unix)
    };
    client
        .and_then(|mut c| c.call("echo", b"still served"))
        .map(|reply| reply == b"still served")
        .unwrap_or(false)
}

#[test]
fn a_tcp_flood_from_an_unprivileged_user_cannot_lock_out_unix_callers() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    // Proves the Unix reserve: an unprivileged local user opening connections over TCP gets
    // connections_max minus unix_connections_reserved of them and no more, and the Unix
    // socket's callers are still served; the refusals are counted by their reason.
    let bridge = bridge()
        .top("connections_max = 120")
        .top("unix_connections_reserved = 20")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let flood = hold(&bridge.tcp, 130, None, Some(65534));
    assert_eq!((flood.admitted, flood.refused), (100, 30));
    assert!(
        echo_works(&bridge, false),
        "a Unix caller is served during the flood"
    );
    assert!(!echo_works(&bridge, true), "TCP is full");
    let counters = bridge.status().counters;
    assert_eq!(counters.connections_refused_tcp_share, 31);
    assert_eq!(counters.connections_refused, 31);
    drop(flood);
    // Once the flood has gone its connections are given back: TCP callers get in again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !echo_works(&bridge, true) {
        assert!(
            std::time::Instant::now() < deadline,
            "TCP connections were not given back"
        );
        std::thread::yield_now();
    }
}

#[test]
fn one_address_cannot_take_every_tcp_connection() {
    // Proves connections_per_ip_max: a caller at 127.0.0.1 gets 5 connections, the sixth is
    // closed at once and counted, and a caller at 127.0.0.2 still gets in.
    let bridge = bridge()
        .top("connections_per_ip_max = 5")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let first = hold(&bridge.tcp, 8, Some("127.0.0.1"), None);
    assert_eq!((first.admitted, first.refused), (5, 3));
    let other = hold(&bridge.tcp, 2, Some("127.0.0.2"), None);
    assert_eq!((other.admitted, other.refused), (2, 0));
    assert!(echo_works(&bridge, false), "the Unix socket is unaffected");
    let status = bridge.status();
    assert_eq!(status.counters.connections_refused_per_peer, 3);
    let log = bridge.wait_log("connections_per_ip_max reached");
    assert!(
        log.contains("127.0.0.1"),
        "the refusal is logged with its bound and peer:\n{log}"
    );
}

#[test]
fn one_uid_cannot_take_every_unix_connection() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    // Proves connections_per_uid_max from SO_PEERCRED: an unprivileged user allowed onto the
    // Unix socket (mode 0666) gets 4 connections and no more, while root's callers are served.
    let bridge = bridge()
        .top("connections_per_uid_max = 4")
        .service(ServiceSpec::echo().workers(1, 1))
        .public_socket()
        .start();
    let mode = |path: &str| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&bridge.unix),
        0o666,
        "the test config opens the socket"
    );
    let nobody = hold(&bridge.unix, 6, None, Some(65534));
    assert_eq!((nobody.admitted, nobody.refused), (4, 2));
    for _ in 0..3 {
        assert!(
            echo_works(&bridge, false),
            "root's callers are not nobody's"
        );
    }
    let status = bridge.status();
    assert_eq!(status.counters.connections_refused_per_peer, 2);
    bridge.wait_log("uid 65534");
}

/// Pipeline `payloads` to the faulty service (id 3) on one connection from another thread, and
/// receive every answer there: the bridge may stop reading it for a while, so sends block.
fn pipeline_in_thread(
    bridge: &Bridge,
    payloads: Vec<Vec<u8>>,
) -> std::thread::JoinHandle<Vec<(acgi_bridge::proto::Kind, Vec<u8>)>> {
    let mut client = bridge.client();
    std::thread::spawn(move || {
        let ids: Vec<u64> = payloads
            .iter()
            .map(|payload| client.send(3, payload).unwrap())
            .collect();
        let mut answers = Vec::new();
        for id in ids {
            let answer = client.receive().unwrap();
            assert_eq!(answer.header.request_id, id, "answers in order");
            answers.push((answer.header.kind, answer.payload));
        }
        answers
    })
}

fn echo_command(tag: u8, len: usize) -> Vec<u8> {
    let mut payload = b"echo ".to_vec();
    payload.resize(len, tag);
    payload
}

#[test]
fn one_connection_cannot_pipeline_past_its_requests_in_flight() {
    // Proves caller_requests_in_flight_max: behind a request that keeps the only worker busy,
    // a connection pipelining 12 requests gets 4 accepted (1 running, 3 waiting) and is read
    // no further until one is answered; then every request is answered, in order, with its
    // own reply.
    let bridge = bridge()
        .top("cores = 1")
        .top("caller_requests_in_flight_max = 4")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    bridge.wait_status("the worker idle", |s| s.services[0].workers_idle == 1);
    let mut payloads = vec![b"sleep 2000".to_vec()];
    payloads.extend((1..12).map(|tag| echo_command(tag, 64)));
    let sender = pipeline_in_thread(&bridge, payloads.clone());
    let status = bridge.wait_status("the connection paused", |s| {
        s.counters.callers_paused_in_flight >= 1
    });
    let faulty = &status.services[0];
    assert_eq!(
        (faulty.workers_busy, faulty.backlog),
        (1, 3),
        "4 requests in flight: {status:#?}"
    );
    let answers = sender.join().unwrap();
    assert_eq!(answers.len(), 12);
    assert_eq!(answers[0].1, b"slept");
    for (tag, (kind, reply)) in answers.iter().enumerate().skip(1) {
        assert_eq!(*kind, acgi_bridge::proto::Kind::Reply);
        assert_eq!(reply[..], payloads[tag][5..], "request {tag}'s own reply");
    }
    assert!(bridge.service_status("faulty").backlog_max_seen <= 3);
}

#[test]
fn one_connection_cannot_hold_more_payload_bytes_than_its_bound() {
    // Proves caller_bytes_in_flight_max: with 2 MiB allowed per connection, 10 pipelined 1 MiB
    // requests behind a busy worker are taken two at a time (the one crossing the bound is
    // taken whole), and all are answered with their own bytes.
    let bridge = bridge()
        .top("cores = 1")
        .top("max_payload_bytes = 1048576")
        .top("caller_bytes_in_flight_max = 2097152")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    bridge.wait_status("the worker idle", |s| s.services[0].workers_idle == 1);
    let mut payloads = vec![b"sleep 2000".to_vec()];
    payloads.extend((1..11).map(|tag| echo_command(tag, 1 << 20)));
    let sender = pipeline_in_thread(&bridge, payloads.clone());
    let status = bridge.wait_status("the connection paused", |s| {
        s.counters.callers_paused_in_flight >= 1
    });
    let faulty = &status.services[0];
    assert_eq!(
        (faulty.workers_busy, faulty.backlog),
        (1, 2),
        "2 MiB of payload in flight: {status:#?}"
    );
    let answers = sender.join().unwrap();
    for (tag, (kind, reply)) in answers.iter().enumerate().skip(1) {
        assert_eq!(*kind, acgi_bridge::proto::Kind::Reply);
        assert!(reply[..] == payloads[tag][5..], "request {tag}'s own reply");
    }
}

#[test]
fn the_request_bytes_budget_pauses_callers_and_every_request_still_runs() {
    // Proves request_bytes_buffered_max: 8 callers each sending a 1 MiB request while the
    // only worker is busy get 3 of them accepted within a 4 MiB budget; the others are not
    // read (not even their payloads) until room is made, and then every one runs and gets
    // its own reply: nothing waits for ever.
    let bridge = bridge()
        .top("cores = 1")
        .top("max_payload_bytes = 1048576")
        .top("request_bytes_buffered_max = 4194304")
        .service(ServiceSpec::faulty().workers(1, 1))
        .start();
    bridge.wait_status("the worker idle", |s| s.services[0].workers_idle == 1);
    let blocker = pipeline_in_thread(&bridge, vec![b"sleep 2000".to_vec()]);
    bridge.wait_status("the worker busy", |s| s.services[0].workers_busy == 1);
    let senders: Vec<_> = (1..=8u8)
        .map(|tag| {
            (
                tag,
                pipeline_in_thread(&bridge, vec![echo_command(tag, 1 << 20)]),
            )
        })
        .collect();
    // Frames being received hold their reservations too: once they are whole, 3 wait, and the
    // other 5 callers are not read.
    let status = bridge.wait_status("3 waiting, the rest paused", |s| {
        s.services[0].backlog == 3 && s.counters.callers_paused_budget >= 5
    });
    assert_eq!(status.services[0].backlog_max_seen, 3, "{status:#?}");
    assert_eq!(blocker.join().unwrap()[0].1, b"slept");
    for (tag, sender) in senders {
        let answers = sender.join().unwrap();
        assert!(
            answers[0].1[..] == echo_command(tag, 1 << 20)[5..],
            "caller {tag}'s own reply"
        );
    }
    assert!(bridge.service_status("faulty").backlog_max_seen <= 3);
}

#[test]
fn unix_callers_not_in_the_allow_list_are_refused_by_their_kernel_credentials() {
    // Proves listen.allowed_uids with SO_PEERCRED: the socket is open to everyone (0666), but
    // only uid 0 is allowed: nobody's connections are closed at accept and counted, root's
    // calls are served.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    let bridge = bridge()
        .public_socket()
        .listen("allowed_uids = [0]")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let nobody = hold(&bridge.unix, 3, None, Some(65534));
    assert_eq!((nobody.admitted, nobody.refused), (0, 3));
    assert!(echo_works(&bridge, false), "root is allowed");
    let counters = bridge.status().counters;
    assert_eq!(counters.connections_refused_not_allowed, 3);
    bridge.wait_log("not in listen.allowed_uids");
}

#[test]
fn tcp_callers_outside_allowed_clients_are_refused() {
    // Proves listen.allowed_clients: with only 127.0.0.2 allowed, a caller at 127.0.0.1 is
    // closed at accept, one at 127.0.0.2 is served.
    let bridge = bridge()
        .listen("allowed_clients = [\"127.0.0.2/32\"]")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let outsider = hold(&bridge.tcp, 2, Some("127.0.0.1"), None);
    assert_eq!((outsider.admitted, outsider.refused), (0, 2));
    let insider = hold(&bridge.tcp, 2, Some("127.0.0.2"), None);
    assert_eq!((insider.admitted, insider.refused), (2, 0));
    assert_eq!(bridge.status().counters.connections_refused_not_allowed, 2);
}

#[test]
fn a_plaintext_listener_reachable_from_other_hosts_is_refused_by_check() {
    // Proves the check: tcp on 0.0.0.0 without TLS is an error naming the fix; with
    // insecure_plaintext it passes, with a warning while allowed_clients is empty.
    let dir = tempfile::tempdir().unwrap();
    let check = |listen: &str| {
        let config = dir.path().join("bridge.toml");
        let text = bridge()
            .tcp("0.0.0.0:0")
            .listen(listen)
            .service(ServiceSpec::echo())
            .config_text(dir.path());
        std::fs::write(&config, text).unwrap();
        Command::new(crate::common::bridge_exe())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let refused = check("");
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("listen.tcp") && stderr.contains("insecure_plaintext"),
        "{stderr}"
    );
    let allowed = check("insecure_plaintext = true");
    let output = String::from_utf8_lossy(&allowed.stderr).into_owned()
        + &String::from_utf8_lossy(&allowed.stdout);
    assert!(allowed.status.success(), "{output}");
    assert!(output.contains("allowed_clients"), "the warning: {output}");
}

#[test]
fn the_admin_socket_answers_only_the_bridges_own_user_and_root() {
    // Proves the admin peer check: even with the admin socket opened to everyone (0666), a
    // command from nobody gets the connection closed unanswered; root's status works.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    let bridge = bridge()
        .public_socket()
        .top("admin_socket_mode = \"0666\"")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
try:
    s.sendall(b"status\n")
    data = s.recv(65536)
except OSError:
    data = b""
print("answered" if data else "closed", flush=True)
"#;
    // state_dir, where the admin socket is, is created 0700: open it up so that only the
    // socket's mode and the peer check stand between the other user and the bridge.
    crate::common::open_dir(bridge.admin.parent().unwrap());
    let output = python_as_nobody(script, &bridge.admin);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "closed",
        "{output:?}"
    );
    assert!(
        bridge.status().services[0].name == "echo",
        "root is answered"
    );
    bridge.wait_log("refusing an admin connection from another user");
}

#[test]
fn a_service_answers_only_the_callers_its_rules_allow() {
    // Proves the per-service rules: `echo` is for uid 0 only and `faulty` for Unix
    // callers only. An unprivileged caller on the (open) Unix socket gets code 11 from echo
    // and is served by faulty; a TCP caller gets code 11 from faulty; root over Unix gets both.
    // The refused requests never reach a worker, and the connection stays usable.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    let mut echo = ServiceSpec::echo().workers(1, 1);
    echo.extra = "allowed_uids = [0]\n".into();
    let mut faulty = ServiceSpec::faulty().workers(1, 1);
    faulty.extra = "allowed_listeners = [\"unix\"]\n".into();
    let bridge = bridge()
        .public_socket()
        .service(echo)
        .service(faulty)
        .start();
    // nobody: echo (id 1) then faulty (id 3) on one connection; prints each answer's kind and
    // code.
    let script = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def call(service, rid, payload):
    s.sendall(struct.pack("<HBBHHIIQ", 0xAC6B, 1, 1, 0, 0, service, len(payload), rid) + payload)
    head = b""
    while len(head) < 24:
        head += s.recv(24 - len(head))
    _, _, kind, _, code, _, length, answered = struct.unpack("<HBBHHIIQ", head)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    print(f"{answered} kind={kind} code={code}", flush=True)
call(1, 1, b"hi")
call(3, 2, b"echo there")
"#;
    let output = python_as_nobody(script, std::path::Path::new(&bridge.unix));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["1 kind=3 code=11", "2 kind=2 code=0"],
        "{output:?}"
    );
    let mut root = bridge.client();
    assert_eq!(root.call("echo", b"root").unwrap(), b"root");
    assert_eq!(root.call("faulty", b"echo unix").unwrap(), b"unix");
    let error = bridge.tcp_client().call("faulty", b"echo tcp").unwrap_err();
    assert_eq!(
        error.code(),
        Some(acgi_bridge::proto::ErrorCode::NotAllowed),
        "{error}"
    );
    let status = bridge.service_status("faulty");
    assert_eq!(
        status.requests_failed.get("not allowed"),
        Some(&1),
        "{status:?}"
    );
}

#[test]
fn unix_group_gives_the_socket_to_the_group_that_may_call() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: starting a caller as another user needs root");
        return;
    }
    // Proves listen.unix_owner / unix_group: with mode 0660 a caller of the socket's group is
    // served, while with the bridge's own group (root) the same caller cannot even connect.
    use std::os::unix::fs::MetadataExt;
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print('refused', e.errno)";
    let nobody_group = bridge()
        .traversable_dir()
        .listen("unix_owner = \"65534\"")
        .listen("unix_group = \"65534\"")
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let socket = std::path::Path::new(&nobody_group.unix);
    let meta = std::fs::metadata(socket).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.mode() & 0o777, 0o660, "the mode is kept");
    let output = python_as_nobody(script, socket);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "connected");
    let root_group = bridge()
        .traversable_dir()
        .service(ServiceSpec::echo().workers(1, 1))
        .start();
    let output = python_as_nobody(script, std::path::Path::new(&root_group.unix));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "refused 13",
        "without the group the same caller is refused"
    );
    // An unknown group is a config error naming the key.
    let error = bridge()
        .listen("unix_group = \"no-such-group-here\"")
        .service(ServiceSpec::echo())
        .try_start()
        .err()
        .expect("refused");
    assert!(
        error.contains("listen.unix_group") && error.contains("no-such-group-here"),
        "{error}"
    );
}
