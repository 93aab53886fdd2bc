//! Issue 13's behaviour suite: the same requests through a Rust, a Python and a C worker (the
//! three SDKs' echo twins: `examples/same_echo.rs`, `sdk/python/examples/echo.py`,
//! `sdk/c/examples/echo.c`) get identical answers: replies byte for byte, errors by code and
//! message, on the slot path, the copy path both ways, one at a time and pipelined.

use acgi_bridge::client::BlockingClient;
use acgi_bridge::proto::Kind;

use crate::common::{bridge, example, python3, tagged_payload, ServiceSpec};

const SLOT_BYTES: u32 = 4096;

/// What a caller sees: a reply's bytes, or an error's code and message.
type Outcome = Result<Vec<u8>, (u16, String)>;

fn outcome(client: &mut BlockingClient, service: &str, payload: &[u8]) -> Outcome {
    match client.call(service, payload) {
        Ok(reply) => Ok(reply),
        Err(error) => Err((error.code().map_or(0, |c| c as u16), error.to_string())),
    }
}

#[test]
fn rust_python_and_c_workers_answer_every_request_alike() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let c_echo = crate::sdk_c::c_build().join("echo");
    let mut services = vec![
        ServiceSpec::new(41, "rust", example("same_echo")),
        ServiceSpec::new(42, "python", python3().into())
            .args(&[&format!("{repo}/sdk/python/examples/echo.py")]),
        ServiceSpec::new(43, "c", c_echo),
    ];
    services[1].extra = format!(
        "env = {{ PYTHONPATH = {:?} }}\n",
        format!("{repo}/sdk/python")
    );
    let mut builder = bridge().top("max_payload_bytes = 1048576");
    for mut service in services {
        service.slot_size_bytes = SLOT_BYTES;
        builder = builder.service(service.workers(1, 2));
    }
    let bridge = builder.start();
    let slot = SLOT_BYTES as usize;
    let mut requests: Vec<Vec<u8>> = [0, 1, 100, slot - 1, slot, slot + 1, 200_000, 1 << 20]
        .into_iter()
        .enumerate()
        .map(|(tag, len)| tagged_payload(tag as u64, len))
        .collect();
    requests.push(b"fail:no such thing".to_vec());
    requests.push("fail:caf\u{e9} \u{2603}".as_bytes().to_vec());
    requests.push(b"fail:".to_vec());
    let mut clients: Vec<BlockingClient> = (0..3).map(|_| bridge.client()).collect();
    for request in &requests {
        let answers: Vec<Outcome> = ["rust", "python", "c"]
            .iter()
            .zip(&mut clients)
            .map(|(service, client)| outcome(client, service, request))
            .collect();
        if let Ok(reply) = &answers[0] {
            assert!(
                reply == request,
                "the Rust worker echoes {} bytes",
                request.len()
            );
        }
        assert!(
            answers[1] == answers[0] && answers[2] == answers[0],
            "a request of {} bytes ({:?}...) was answered differently: {:?}",
            request.len(),
            String::from_utf8_lossy(&request[..request.len().min(16)]),
            answers
                .iter()
                .map(|a| a.as_ref().map(Vec::len))
                .collect::<Vec<_>>()
        );
    }
    // Pipelined on one connection each, mixed sizes and errors: the same answer to each id.
    let mut sets = Vec::new();
    for (service_id, client) in [41u32, 42, 43].into_iter().zip(&mut clients) {
        let ids: Vec<u64> = (0..60)
            .map(|i| {
                let request = &requests[i % requests.len()];
                client.send(service_id, request).unwrap()
            })
            .collect();
        let mut answers = std::collections::BTreeMap::new();
        for _ in 0..ids.len() {
            let answer = client.receive().unwrap();
            let position = ids
                .iter()
                .position(|&id| id == answer.header.request_id)
                .unwrap();
            let outcome = if answer.header.kind == Kind::Reply {
                Ok(answer.payload)
            } else {
                Err((
                    answer.header.code,
                    String::from_utf8_lossy(&answer.payload).into_owned(),
                ))
            };
            answers.insert(position, outcome);
        }
        sets.push(answers);
    }
    assert!(
        sets[1] == sets[0],
        "Python differs from Rust when pipelined"
    );
    assert!(sets[2] == sets[0], "C differs from Rust when pipelined");
}
