//! The kv service through the bridge: operations, concurrent writers, durability.

use acgi_bridge::client::BlockingClient;

use crate::common::{bridge, ServiceSpec};

#[test]
fn put_get_scan_delete_through_the_bridge() {
    // Proves each kv operation works end to end with the documented replies.
    let bridge = bridge().service(ServiceSpec::kv()).start();
    let mut client = bridge.client();
    assert_eq!(client.call("kv", b"put user:1 alice").unwrap(), b"OK");
    assert_eq!(client.call("kv", b"put user:2 bob smith").unwrap(), b"OK");
    assert_eq!(client.call("kv", b"put other x").unwrap(), b"OK");
    assert_eq!(client.call("kv", b"get user:2").unwrap(), b"bob smith");
    assert_eq!(
        client.call("kv", b"scan 10 user:").unwrap(),
        b"user:1 5\nalice\nuser:2 9\nbob smith\n"
    );
    assert_eq!(client.call("kv", b"delete user:1").unwrap(), b"deleted 1");
    assert_eq!(client.call("kv", b"delete user:1").unwrap(), b"deleted 0");
    let error = client.call("kv", b"get user:1").unwrap_err();
    assert!(error.to_string().contains("not found"), "{error}");
    let error = client.call("kv", b"frobnicate x").unwrap_err();
    assert!(error.to_string().contains("bad request"), "{error}");
}

#[test]
fn concurrent_writers_through_several_workers_lose_nothing() {
    // Proves several kv workers writing the same database at once keep every write.
    let bridge = bridge().service(ServiceSpec::kv().workers(4, 4)).start();
    std::thread::scope(|scope| {
        for writer in 0..8 {
            let bridge = &bridge;
            scope.spawn(move || {
                let mut client = bridge.client();
                for i in 0..100 {
                    let put = format!("put w{writer}:k{i:03} value-{writer}-{i}");
                    assert_eq!(client.call("kv", put.as_bytes()).unwrap(), b"OK");
                }
            });
        }
    });
    let mut client = bridge.client();
    let scan = client.call("kv", b"scan 10000").unwrap();
    let entries = scan
        .split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"w"))
        .count();
    assert_eq!(entries, 800);
    assert_eq!(client.call("kv", b"get w7:k099").unwrap(), b"value-7-99");
}

#[test]
fn data_survives_a_bridge_restart() {
    // Proves kv data is on disk under state_dir: a new bridge on the same state reads it.
    let state = tempfile::tempdir().unwrap();
    {
        let mut bridge = bridge()
            .state_dir(state.path())
            .service(ServiceSpec::kv())
            .start();
        let mut client: BlockingClient = bridge.client();
        assert_eq!(client.call("kv", b"put durable yes").unwrap(), b"OK");
        assert!(bridge.stop().success());
    }
    let bridge = bridge()
        .state_dir(state.path())
        .service(ServiceSpec::kv())
        .start();
    assert_eq!(bridge.client().call("kv", b"get durable").unwrap(), b"yes");
    assert!(state.path().join("kv.sqlite3").exists());
}
