//! Issue 11: the TLS listener. Certificates are made here (rcgen): a CA, a server certificate
//! for 127.0.0.1 and localhost, two client certificates (alice, named by her common name; bob,
//! by a DNS subject alternative name), and one from another CA. Every call goes through the
//! real bridge, its TLS thread, a socket pair and a core, to real echo workers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use acgi_client::{CallError, ConnectOptions, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

use crate::common::{bridge, tagged_payload, Bridge, BridgeBuilder, ServiceSpec};
use crate::reload::reload;

/// PEM files of a test PKI, in a temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    alice: (PathBuf, PathBuf),
    bob: (PathBuf, PathBuf),
    /// Signed by another CA: chains to nothing the bridge trusts.
    mallory: (PathBuf, PathBuf),
    /// A key that belongs to no certificate here.
    stray_key: PathBuf,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf signed by `ca`, written as NAME.pem and NAME.key.
fn leaf(
    dir: &Path,
    ca: &Ca,
    name: &str,
    params: CertificateParams,
    purpose: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let mut params = params;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![purpose];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let root = ca("acgi test CA");
    let other = ca("some other CA");
    let ca_path = path.join("ca.pem");
    std::fs::write(&ca_path, root.cert.pem()).unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server = leaf(
        path,
        &root,
        "server",
        server,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let none = || CertificateParams::new(Vec::<String>::new()).unwrap();
    let alice = leaf(
        path,
        &root,
        "alice",
        none(),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let bob_params = CertificateParams::new(vec!["bob.clients.test".to_string()]).unwrap();
    let bob = leaf(
        path,
        &root,
        "bob",
        bob_params,
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let mallory = leaf(
        path,
        &other,
        "alice-forged",
        none(),
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stray_key = path.join("stray.key");
    std::fs::write(&stray_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    Pki {
        ca: ca_path,
        server,
        alice,
        bob,
        mallory,
        stray_key,
        _dir: dir,
    }
}

/// A bridge builder with a TLS listener on an ephemeral port of 127.0.0.1.
fn tls_bridge(pki: &Pki, mutual: bool) -> BridgeBuilder {
    let mut builder = bridge()
        .listen("tls = \"127.0.0.1:0\"")
        .listen(&format!(
            "tls_cert = {:?}",
            pki.server.0.display().to_string()
        ))
        .listen(&format!(
            "tls_key = {:?}",
            pki.server.1.display().to_string()
        ));
    if mutual {
        builder = builder.listen(&format!(
            "tls_client_ca = {:?}",
            pki.ca.display().to_string()
        ));
    }
    builder
}

/// The TLS listener's address, from the bridge's startup log.
fn tls_addr(bridge: &Bridge) -> String {
    let log = bridge.wait_log("listening on TLS");
    let line = log
        .lines()
        .find(|line| line.contains("listening on TLS"))
        .expect("the line");
    let addr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .expect("addr= in the line");
    format!("tls:{addr}")
}

fn echo() -> ServiceSpec {
    let mut spec = ServiceSpec::echo().workers(1, 2);
    spec.slot_size_bytes = 2 << 20;
    spec
}

fn options(pki: &Pki, client: Option<&(PathBuf, PathBuf)>) -> ConnectOptions {
    let mut tls = TlsConfig::new(&pki.ca).unwrap();
    if let Some((cert, key)) = client {
        tls = tls.client_cert(cert, key).unwrap();
    }
    ConnectOptions::new()
        .io_timeout(Duration::from_secs(20))
        .tls(tls)
}

/// One echo call; the reply byte-checked.
fn echo_call(options: &ConnectOptions, addr: &str, tag: u64, len: usize) -> Result<(), CallError> {
    let mut client = options.blocking(addr)?;
    let payload = tagged_payload(tag, len);
    let reply = client.call("echo", &payload)?;
    assert!(reply == payload, "reply to {tag} ({len} B) differs");
    Ok(())
}

#[test]
fn tls_callers_get_byte_exact_replies_small_and_large_blocking_async_and_cli() {
    // Proves the TLS listener end to end: 64 B and 1 MiB both ways through the blocking
    // client, 16 calls in flight on the async client, and `acgi-bridge call --connect tls:`.
    let pki = pki();
    let bridge = tls_bridge(&pki, false).service(echo()).start();
    let addr = tls_addr(&bridge);
    let options = options(&pki, None);
    let mut client = options.blocking(&addr).expect("TLS connect");
    for (tag, len) in [(1, 64), (2, 1 << 20), (3, 64 << 10), (4, 1)] {
        let payload = tagged_payload(tag, len);
        assert!(client.call("echo", &payload).unwrap() == payload, "{len} B");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = acgi_client::Client::connect_with(&addr, &options)
            .await
            .expect("async TLS connect");
        let calls = (0..16u64).map(|tag| {
            let client = client.clone();
            async move {
                let payload = tagged_payload(100 + tag, if tag % 4 == 0 { 256 << 10 } else { 64 });
                let reply = client.call("echo", payload.clone()).await.unwrap();
                assert!(reply == payload, "async reply {tag}");
            }
        });
        futures_join_all(calls).await;
    });
    let cli = Command::new(crate::common::bridge_exe())
        .args(["call", "--connect", &addr, "--tls-ca"])
        .arg(&pki.ca)
        .args(["echo", "over TLS"])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(cli.stdout, b"over TLS");
    // Without the CA, the CLI cannot verify the bridge, and says what to pass.
    let blind = Command::new(crate::common::bridge_exe())
        .args(["call", "--connect", &addr, "echo", "x"])
        .output()
        .unwrap();
    assert!(!blind.status.success());
    assert!(String::from_utf8_lossy(&blind.stderr).contains("ConnectOptions::tls"));
    let counters = bridge.status().counters;
    assert_eq!(
        counters.tls_handshakes, 3,
        "blocking, async, cli: {counters:?}"
    );
    assert_eq!(counters.tls_handshakes_failed, 0, "{counters:?}");
}

/// Join futures without another dependency: spawn them on the current runtime's local set.
async fn futures_join_all<F: std::future::Future<Output = ()> + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let local = tokio::task::LocalSet::new();
    let handles: Vec<_> = futures.map(|f| local.spawn_local(f)).collect();
    local
        .run_until(async {
            for handle in handles {
                handle.await.unwrap();
            }
        })
        .await;
}

#[test]
fn mutual_tls_serves_only_certificates_that_chain_to_the_client_ca() {
    // Proves tls_client_ca: no client certificate is refused, one from another CA is refused
    // (both counted as failed handshakes), alice's is served.
    let pki = pki();
    let bridge = tls_bridge(&pki, true).service(echo()).start();
    let addr = tls_addr(&bridge);
    let anonymous = echo_call(&options(&pki, None), &addr, 1, 64);
    assert!(anonymous.is_err(), "no certificate: {anonymous:?}");
    let forged = echo_call(&options(&pki, Some(&pki.mallory)), &addr, 2, 64);
    assert!(forged.is_err(), "another CA: {forged:?}");
    echo_call(&options(&pki, Some(&pki.alice)), &addr, 3, 1 << 20).expect("alice is served");
    let status = bridge.wait_status("the failed handshakes counted", |s| {
        s.counters.tls_handshakes_failed >= 2
    });
    assert_eq!(
        status.counters.tls_handshakes_failed, 2,
        "{:?}",
        status.counters
    );
    // Refused before a core ever saw them: no caller connection is left over.
    assert_eq!(
        bridge
            .wait_status("no callers left", |s| s.connections == 0)
            .connections,
        0
    );
}

#[test]
fn a_service_acl_admits_the_tls_identities_it_names() {
    // Proves allowed_tls_identities: alice (by her common name) may call `secret`, bob (by
    // his DNS name) gets error 11; both may call the open `echo`; a Unix caller, who has no
    // TLS identity, gets error 11 from `secret` too.
    let pki = pki();
    let mut secret = ServiceSpec::new(2, "secret", crate::common::example("echo")).workers(1, 1);
    secret.extra = "allowed_tls_identities = [\"alice\"]".to_string();
    let bridge = tls_bridge(&pki, true)
        .service(echo())
        .service(secret)
        .start();
    let addr = tls_addr(&bridge);
    let mut alice = options(&pki, Some(&pki.alice)).blocking(&addr).unwrap();
    assert_eq!(alice.call("secret", b"for alice").unwrap(), b"for alice");
    let mut bob = options(&pki, Some(&pki.bob)).blocking(&addr).unwrap();
    let refused = bob.call("secret", b"for bob").unwrap_err();
    assert_eq!(
        refused.code(),
        Some(acgi_client::proto::ErrorCode::NotAllowed),
        "{refused}"
    );
    assert_eq!(bob.call("echo", b"still open").unwrap(), b"still open");
    let unix = bridge.client().call("secret", b"x").unwrap_err();
    assert_eq!(
        unix.code(),
        Some(acgi_client::proto::ErrorCode::NotAllowed),
        "{unix}"
    );
}

#[test]
fn a_caller_stalling_mid_handshake_is_dropped_at_the_timeout_while_others_are_served() {
    // Proves tls_handshake_timeout_ms: a connection that sends half a ClientHello and stops
    // is closed by the bridge once the timeout passes (and counted); meanwhile another caller
    // completes its handshake and is served.
    let pki = pki();
    let bridge = tls_bridge(&pki, false)
        .listen("tls_handshake_timeout_ms = 500")
        .service(echo())
        .start();
    let addr = tls_addr(&bridge);
    let mut staller = TcpStream::connect(addr.trim_start_matches("tls:")).unwrap();
    // A handshake record header announcing 512 bytes, and 3 of them.
    staller
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .unwrap();
    let started = Instant::now();
    echo_call(&options(&pki, None), &addr, 1, 64 << 10).expect("served meanwhile");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "served before the timeout"
    );
    staller
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    let outcome = staller.read(&mut byte);
    let waited = started.elapsed();
    assert!(
        matches!(outcome, Ok(0))
            || outcome.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the bridge closed the stalled connection"
    );
    assert!(
        waited >= Duration::from_millis(450),
        "not before the timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "near the timeout: {waited:?}"
    );
    let counters = bridge.status().counters;
    assert_eq!(counters.tls_handshake_timeouts, 1, "{counters:?}");
    assert_eq!(counters.tls_handshakes, 1, "{counters:?}");
    bridge.wait_log("did not finish its handshake");
}

#[test]
fn check_names_a_missing_certificate_and_a_key_that_does_not_match() {
    // Proves the TLS files are read at load: a missing tls_cert and a key of another
    // certificate are each a problem `check` names by its key; the good pair passes.
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let check = |cert: &Path, key: &Path| {
        let config = dir.path().join("bridge.toml");
        let text = bridge()
            .listen("tls = \"127.0.0.1:0\"")
            .listen(&format!("tls_cert = {:?}", cert.display().to_string()))
            .listen(&format!("tls_key = {:?}", key.display().to_string()))
            .service(ServiceSpec::echo())
            .config_text(dir.path());
        std::fs::write(&config, text).unwrap();
        let output = Command::new(crate::common::bridge_exe())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        (output.status.success(), text)
    };
    let (ok, text) = check(Path::new("/no/such/cert.pem"), &pki.server.1);
    assert!(!ok, "{text}");
    assert!(
        text.contains("listen.tls_cert") && text.contains("/no/such/cert.pem"),
        "{text}"
    );
    let (ok, text) = check(&pki.server.0, &pki.stray_key);
    assert!(!ok, "{text}");
    assert!(
        text.contains("listen.tls_key") && text.contains("does not go with"),
        "{text}"
    );
    let (ok, text) = check(&pki.server.0, &pki.server.1);
    assert!(ok, "{text}");
}

#[test]
fn a_binary_upgrade_hands_the_tls_listener_to_the_new_bridge() {
    // Proves the TLS listener is passed at an upgrade like the others: the new bridge serves
    // TLS callers at the same address (it could not bind it while the old one holds it), and
    // the old one exits.
    let pki = pki();
    let mut bridge = tls_bridge(&pki, false).service(echo()).start();
    let addr = tls_addr(&bridge);
    let options = options(&pki, None);
    echo_call(&options, &addr, 1, 64).unwrap();
    let mut successor = crate::upgrade::upgrade(&bridge.admin);
    let exit = bridge
        .wait_exit(Duration::from_secs(30))
        .expect("the old bridge exits");
    assert!(exit.success(), "{exit:?}");
    echo_call(&options, &addr, 2, 65536).expect("the new bridge serves TLS at the same address");
    assert_eq!(successor.stop(), 0, "the new bridge stops cleanly");
}

/// A server certificate for 127.0.0.1 signed by a new CA, written over `cert` and `key`; the
/// CA's PEM is written to `ca`.
fn renew(cert: &Path, key: &Path, ca_path: &Path) {
    let authority = ca("renewed CA");
    std::fs::write(ca_path, authority.cert.pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let (new_cert, new_key) = leaf(
        dir.path(),
        &authority,
        "server",
        params,
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    std::fs::copy(new_cert, cert).unwrap();
    std::fs::copy(new_key, key).unwrap();
}

#[test]
fn a_reload_takes_a_renewed_certificate_for_new_handshakes_and_keeps_open_connections() {
    // Proves TLS certificate reload: the files are rewritten in place (as a renewal does) and
    // `reload` answers that new handshakes use them; a new connection then verifies only
    // against the new CA, while a connection opened before keeps being served; a broken
    // certificate refuses the reload, naming the key, and the renewed one stays in use.
    let pki = pki();
    // Copies the test may rewrite: the bridge reads these.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(&pki.server.0, &cert).unwrap();
    std::fs::copy(&pki.server.1, &key).unwrap();
    let bridge = bridge()
        .listen("tls = \"127.0.0.1:0\"")
        .listen(&format!("tls_cert = {:?}", cert.display().to_string()))
        .listen(&format!("tls_key = {:?}", key.display().to_string()))
        .service(echo())
        .start();
    let addr = tls_addr(&bridge);
    let old = options(&pki, None);
    let mut open = old.blocking(&addr).expect("a connection before the reload");
    assert_eq!(open.call("echo", b"before").unwrap(), b"before");
    let (ok, text) = reload(&bridge);
    assert!(ok && text.contains("nothing changed"), "{text}");

    let new_ca = dir.path().join("new-ca.pem");
    renew(&cert, &key, &new_ca);
    let (ok, text) = reload(&bridge);
    assert!(ok, "{text}");
    assert!(
        text.contains("TLS: new handshakes use the certificate reloaded from"),
        "{text}"
    );
    let new = ConnectOptions::new()
        .io_timeout(Duration::from_secs(20))
        .tls(TlsConfig::new(&new_ca).unwrap());
    echo_call(&new, &addr, 1, 64).expect("the renewed certificate verifies against its CA");
    assert!(
        echo_call(&old, &addr, 2, 64).is_err(),
        "a new handshake must not present the old certificate"
    );
    assert_eq!(open.call("echo", b"after").unwrap(), b"after", "kept open");

    std::fs::write(&cert, "not a certificate\n").unwrap();
    let (ok, text) = reload(&bridge);
    assert!(!ok, "{text}");
    assert!(
        text.contains("reload refused, the running configuration stays")
            && text.contains("listen.tls_cert"),
        "{text}"
    );
    echo_call(&new, &addr, 3, 64).expect("the running certificate stays");
    assert_eq!(open.call("echo", b"still").unwrap(), b"still");
}
