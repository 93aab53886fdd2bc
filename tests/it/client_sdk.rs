//! The Rust client SDK's guards (issue 11): it can check who serves a Unix socket, and it
//! bounds the replies it accepts on their headers.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

use acgi_bridge::client::{BlockingClient, CallError, ConnectOptions};
use acgi_bridge::proto::{Header, Kind};

use crate::common::{bridge, ServiceSpec};

#[test]
fn expected_uid_refuses_a_socket_served_by_someone_else() {
    // Proves the SO_PEERCRED check: the bridge (root here) passes expected_uid(its uid); the
    // same socket with another expected uid is refused before a byte is sent; and a squatter
    // serving a socket path as nobody gets nothing from a client that expects root.
    let bridge = bridge().service(ServiceSpec::echo().workers(1, 1)).start();
    let me = rustix::process::geteuid().as_raw();
    let mut client = ConnectOptions::new()
        .expected_uid(me)
        .blocking(&bridge.unix)
        .unwrap();
    assert_eq!(client.call("echo", b"mine").unwrap(), b"mine");
    match ConnectOptions::new()
        .expected_uid(me + 1)
        .blocking(&bridge.unix)
    {
        Err(CallError::Protocol(why)) => assert!(why.contains("not the expected"), "{why}"),
        other => panic!("a wrong owner must be refused: {:?}", other.map(|_| ())),
    }
    if me != 0 {
        eprintln!("skipped the squatter part: starting it as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.path().join("squat.sock");
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
conn.recv(1024)
"#;
    let mut squatter = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            crate::common::python3(),
            "-c",
            script,
        ])
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "listening");
    let refused = ConnectOptions::new()
        .expected_uid(0)
        .blocking(path.to_str().unwrap());
    match refused {
        Err(CallError::Protocol(why)) => assert!(why.contains("uid 65534"), "{why}"),
        other => panic!("the squatter must be refused: {:?}", other.map(|_| ())),
    }
    let _ = squatter.kill();
    let _ = squatter.wait();
}

#[test]
fn replies_over_the_clients_bound_are_refused_on_their_header() {
    // Proves the reply bound: a fake server announcing a 1 GiB reply is a protocol error for a
    // default client (16 MiB), found on the header; and a bridge reply over a client's own
    // smaller bound is refused the same way.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 24 + 2];
        std::io::Read::read_exact(&mut stream, &mut request).unwrap();
        let header = Header::new(Kind::Reply, 1, 1, 1 << 30);
        stream.write_all(&header.encode()).unwrap();
        // (No payload follows: a client that believed the header would wait for 1 GiB.)
        std::thread::sleep(std::time::Duration::from_secs(5));
    });
    let mut client = BlockingClient::connect(path.to_str().unwrap()).unwrap();
    client.send(1, b"hi").unwrap();
    let started = std::time::Instant::now();
    match client.receive() {
        Err(CallError::Protocol(why)) => assert!(why.contains("payload"), "{why}"),
        other => panic!(
            "a 1 GiB claim must be refused: {:?}",
            other.map(|a| a.header)
        ),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    drop(client);
    drop(server);

    let bridge = bridge().service(ServiceSpec::echo().workers(1, 1)).start();
    let mut small = ConnectOptions::new()
        .reply_bytes_max(100)
        .blocking(&bridge.unix)
        .unwrap();
    assert_eq!(small.call("echo", &[7u8; 100]).unwrap(), [7u8; 100]);
    match small.call("echo", &[7u8; 101]) {
        Err(CallError::Protocol(_)) => {}
        other => panic!("a reply over the bound must be refused: {other:?}"),
    }
}
