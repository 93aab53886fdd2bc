//! The admission tests: budgets, shares and per-caller limits, refused and released.

use super::*;
use std::net::Ipv4Addr;

fn admission() -> Admission {
    Admission::new(
        Limits {
            total: 6,
            tcp: 4,
            per_uid: 3,
            per_ip: 2,
        },
        Access::default(),
    )
}

#[test]
fn address_blocks_contain_what_their_prefix_says() {
    let net = IpNet::parse("10.1.0.0/16").unwrap();
    assert!(net.contains("10.1.255.3".parse().unwrap()));
    assert!(!net.contains("10.2.0.1".parse().unwrap()));
    assert!(
        net.contains("::ffff:10.1.0.9".parse().unwrap()),
        "v4-mapped is v4"
    );
    let one = IpNet::parse("127.0.0.2").unwrap();
    assert!(one.contains("127.0.0.2".parse().unwrap()));
    assert!(!one.contains("127.0.0.1".parse().unwrap()));
    assert!(IpNet::parse("0.0.0.0/0")
        .unwrap()
        .contains("8.8.8.8".parse().unwrap()));
    assert!(IpNet::parse("::1")
        .unwrap()
        .contains("::1".parse().unwrap()));
    assert!(IpNet::parse("10.0.0.0/33").is_err());
    assert!(IpNet::parse("example.com").is_err());
}

#[test]
fn the_allow_lists_let_in_only_whom_they_name() {
    let access = Access {
        uids: vec![1000],
        gids: vec![50],
        clients: vec![IpNet::parse("127.0.0.2").unwrap()],
    };
    let unix = |uid, gid| Caller {
        peer: Peer::Uid(uid),
        gid: Some(gid),
        tls: None,
    };
    assert!(access.allows(&unix(1000, 1)));
    assert!(access.allows(&unix(7, 50)));
    assert!(!access.allows(&unix(65534, 65534)));
    let tcp = |ip: &str| Caller {
        peer: Peer::Ip(ip.parse().unwrap()),
        gid: None,
        tls: None,
    };
    assert!(access.allows(&tcp("127.0.0.2")));
    assert!(!access.allows(&tcp("127.0.0.1")));
    assert!(Access::default().allows(&tcp("127.0.0.1")));
}

const A: Caller = ip(1);
const B: Caller = ip(2);
const C: Caller = ip(3);

const fn ip(last: u8) -> Caller {
    Caller {
        peer: Peer::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))),
        gid: None,
        tls: None,
    }
}

fn uid(uid: u32) -> Caller {
    Caller {
        peer: Peer::Uid(uid),
        gid: Some(uid),
        tls: None,
    }
}

fn service(extra: &str) -> crate::config::ServiceConfig {
    let text = format!("id = 1\nname = \"s\"\nexec = \"/bin/true\"\n{extra}");
    toml::from_str(&text).expect("a service table")
}

fn tls_caller(identity: Option<&str>) -> Caller {
    let mut caller = Caller::tls("127.0.0.1".parse().unwrap());
    caller.tls = Some(TlsCaller {
        identity: identity.map(Into::into),
    });
    caller
}

#[test]
fn service_acls_combine_listeners_and_one_union_of_identities() {
    // Proves the rule ServiceAcl documents, for each kind of caller.
    assert!(ServiceAcl::from_config(&service("")).is_none(), "open");
    let by_name = ServiceAcl::from_config(&service(
        "allowed_tls_identities = [\"alice\"]\nallowed_uids = [1000]",
    ))
    .unwrap();
    assert!(by_name.allows(&tls_caller(Some("alice"))));
    assert!(!by_name.allows(&tls_caller(Some("bob"))));
    assert!(
        !by_name.allows(&tls_caller(None)),
        "no certificate, no name"
    );
    assert!(by_name.allows(&uid(1000)));
    assert!(!by_name.allows(&uid(1001)));
    assert!(!by_name.allows(&A), "plain TCP proves nothing");
    let tls_only =
        ServiceAcl::from_config(&service("allowed_tls_identities = [\"alice\"]")).unwrap();
    assert!(
        !tls_only.allows(&uid(0)),
        "naming identities closes it to Unix callers"
    );
    let listeners =
        ServiceAcl::from_config(&service("allowed_listeners = [\"unix\", \"tls\"]")).unwrap();
    assert!(listeners.allows(&tls_caller(None)));
    assert!(listeners.allows(&uid(5)));
    assert!(!listeners.allows(&A));
    let no_tls = ServiceAcl::from_config(&service(
        "allowed_listeners = [\"tcp\"]\nallowed_tls_identities = [\"alice\"]",
    ))
    .unwrap();
    assert!(
        !no_tls.allows(&tls_caller(Some("alice"))),
        "the listener must be listed"
    );
    assert_eq!(tls_caller(None).listener(), "tls");
    assert_eq!(A.listener(), "tcp");
    assert_eq!(uid(1).listener(), "unix");
}

#[test]
fn each_bound_refuses_in_its_turn_and_release_gives_room_back() {
    let admission = admission();
    let a1 = admission.admit_caller(&A).unwrap();
    let _a2 = admission.admit_caller(&A).unwrap();
    assert_eq!(admission.admit_caller(&A), Err(Refused::PeerFull));
    let _b1 = admission.admit_caller(&B).unwrap();
    let _b2 = admission.admit_caller(&B).unwrap();
    // Four TCP connections: the other two are the Unix callers'.
    assert_eq!(admission.admit_caller(&C), Err(Refused::TcpShare));
    let _u1 = admission.admit_caller(&uid(1000)).unwrap();
    let _u2 = admission.admit_caller(&uid(0)).unwrap();
    assert_eq!(admission.admit_caller(&uid(0)), Err(Refused::Full));
    assert_eq!(admission.open(), (6, 4));
    admission.release(a1);
    assert_eq!(admission.open(), (5, 3));
    let _c1 = admission.admit_caller(&C).unwrap();
    assert_eq!(admission.admit_caller(&uid(5)), Err(Refused::Full));
}

#[test]
fn the_peer_map_forgets_peers_with_nothing_open() {
    let admission = admission();
    for _ in 0..100 {
        let ticket = admission.admit_caller(&uid(7)).unwrap();
        admission.release(ticket);
    }
    assert!(admission.counts.lock().unwrap().per_peer.is_empty());
    assert_eq!(admission.open(), (0, 0));
}

#[test]
fn uids_are_bounded_apart_from_addresses() {
    let admission = admission();
    let _t: Vec<Ticket> = (0..3)
        .map(|_| admission.admit_caller(&uid(9)).unwrap())
        .collect();
    assert_eq!(admission.admit_caller(&uid(9)), Err(Refused::PeerFull));
    assert!(admission.admit_caller(&uid(10)).is_ok());
}
