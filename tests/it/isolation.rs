//! The worker boundary (docs/security.md): what a hostile worker can no longer do to the bridge,
//! to other services' workers or to the machine. Each test starts the real bridge with real
//! `faulty` workers that attempt the attack, and checks both that the attempt fails and that the
//! bridge goes on serving.

use crate::common::{bridge, ServiceSpec};

#[test]
fn a_worker_cannot_truncate_or_grow_its_slot() {
    // Proves slots are sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) before a worker sees
    // them: ftruncate fails with EPERM for both directions, and the bridge, which would take a
    // SIGBUS reading a truncated slot, survives and serves other callers.
    let bridge = bridge()
        .top("cores = 1")
        .service(ServiceSpec::faulty().workers(2, 2))
        .start();
    let mut attacker = bridge.client();
    let mut bystander = bridge.client();
    for command in ["truncate-slot", "grow-slot"] {
        let reply = attacker.call("faulty", command.as_bytes()).unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(
            reply, "ftruncate refused: errno 1 (Operation not permitted (os error 1))",
            "{command}"
        );
        assert_eq!(bystander.call("faulty", b"echo still").unwrap(), b"still");
    }
    // The same worker, its slot intact, keeps serving in-slot replies of every size.
    for len in [0usize, 1, 1000, 65536] {
        let mut request = b"echo ".to_vec();
        request.extend(std::iter::repeat_n(b'z', len));
        assert_eq!(attacker.call("faulty", &request).unwrap().len(), len);
    }
    let status = bridge.service_status("faulty");
    assert_eq!(status.spawns, 2, "no worker was lost: {status:#?}");
}
