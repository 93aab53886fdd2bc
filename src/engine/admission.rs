//! Who may hold how many caller connections.
//!
//! Three bounds are checked at accept, in this order, for every caller connection of every core:
//!
//! 1. `connections_max`: caller connections over all listeners;
//! 2. TCP callers together hold at most `connections_max - unix_connections_reserved` (when the
//!    bridge also listens on a Unix socket), so that a flood over TCP, which any local user or
//!    host that can reach the port may start, cannot lock out the local callers of the Unix
//!    socket, whose mode and owner already say who they may be;
//! 3. one peer holds at most `connections_per_uid_max` (a Unix caller, by its `SO_PEERCRED`
//!    uid) or `connections_per_ip_max` (a TCP caller, by its address) connections.
//!
//! A refused connection is closed at once and counted by the reason. The counts are shared by
//! all cores under one mutex: accepting is a syscall and a registration already, and callers'
//! connections are long-lived, so the lock is off the request path. The per-peer map holds an
//! entry only for peers with a connection open: at most `connections_max` entries.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::config::Config;

/// Who is at the other end of a caller connection, as far as the limits are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix-socket caller: its uid from `SO_PEERCRED`.
    Uid(u32),
    /// A TCP caller: its address (the port is not part of who it is).
    Ip(IpAddr),
}

impl Peer {
    /// The peer of a freshly accepted connection; `None` when the kernel will not say (the
    /// caller has gone already): such a connection is refused.
    pub fn of(fd: &OwnedFd, tcp: bool) -> Option<Peer> {
        if tcp {
            let addr = rustix::net::getpeername(fd).ok()??;
            let ip = std::net::SocketAddr::try_from(addr).ok()?.ip();
            // A v4 caller on a dual-stack socket is the same peer as over v4.
            Some(Peer::Ip(match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            }))
        } else {
            let cred = rustix::net::sockopt::socket_peercred(fd).ok()?;
            Some(Peer::Uid(cred.uid.as_raw()))
        }
    }

    fn is_tcp(self) -> bool {
        matches!(self, Peer::Ip(_))
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Uid(uid) => write!(f, "uid {uid}"),
            Peer::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `connections_max` connections are open.
    Full,
    /// TCP callers hold all but the connections reserved for Unix callers.
    TcpShare,
    /// This peer holds its `connections_per_uid_max` / `connections_per_ip_max`.
    PeerFull,
}

/// A connection's place in the counts: given at admission, returned when it closes.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket must be returned to Admission::release when its connection goes"]
pub struct Ticket {
    peer: Peer,
}

impl Ticket {
    pub fn peer(&self) -> Peer {
        self.peer
    }
}

/// The limits, from the config.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: u32,
    pub tcp: u32,
    pub per_uid: u32,
    pub per_ip: u32,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        let reserved = if config.listen.unix.is_some() {
            config.unix_connections_reserved.min(config.connections_max)
        } else {
            0
        };
        Limits {
            total: config.connections_max,
            tcp: config.connections_max - reserved,
            per_uid: config.connections_per_uid_max,
            per_ip: config.connections_per_ip_max,
        }
    }
}

#[derive(Default)]
struct Counts {
    total: u32,
    tcp: u32,
    per_peer: HashMap<Peer, u32>,
}

/// The shared counts of caller connections.
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Count a new connection from `peer`, or say which bound refuses it.
    pub fn admit(&self, peer: Peer) -> Result<Ticket, Refused> {
        let mut counts = self.counts.lock().expect("not poisoned");
        if counts.total >= self.limits.total {
            return Err(Refused::Full);
        }
        if peer.is_tcp() && counts.tcp >= self.limits.tcp {
            return Err(Refused::TcpShare);
        }
        let peer_max = if peer.is_tcp() {
            self.limits.per_ip
        } else {
            self.limits.per_uid
        };
        let held = counts.per_peer.get(&peer).copied().unwrap_or(0);
        if held >= peer_max {
            return Err(Refused::PeerFull);
        }
        counts.per_peer.insert(peer, held + 1);
        counts.total += 1;
        if peer.is_tcp() {
            counts.tcp += 1;
        }
        Ok(Ticket { peer })
    }

    /// The connection holding `ticket` has gone.
    pub fn release(&self, ticket: Ticket) {
        let mut counts = self.counts.lock().expect("not poisoned");
        let peer = ticket.peer;
        match counts.per_peer.get_mut(&peer) {
            Some(held) if *held > 1 => *held -= 1,
            Some(_) => {
                counts.per_peer.remove(&peer);
            }
            None => debug_assert!(false, "released a ticket of {peer} that was not counted"),
        }
        counts.total -= 1;
        if peer.is_tcp() {
            counts.tcp -= 1;
        }
    }

    /// Connections open now: (all, over TCP).
    pub fn open(&self) -> (u32, u32) {
        let counts = self.counts.lock().expect("not poisoned");
        (counts.total, counts.tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn admission() -> Admission {
        Admission::new(Limits {
            total: 6,
            tcp: 4,
            per_uid: 3,
            per_ip: 2,
        })
    }

    const A: Peer = Peer::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
    const B: Peer = Peer::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    const C: Peer = Peer::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));

    #[test]
    fn each_bound_refuses_in_its_turn_and_release_gives_room_back() {
        let admission = admission();
        let a1 = admission.admit(A).unwrap();
        let _a2 = admission.admit(A).unwrap();
        assert_eq!(admission.admit(A), Err(Refused::PeerFull));
        let _b1 = admission.admit(B).unwrap();
        let _b2 = admission.admit(B).unwrap();
        // Four TCP connections: the other two are the Unix callers'.
        assert_eq!(admission.admit(C), Err(Refused::TcpShare));
        let _u1 = admission.admit(Peer::Uid(1000)).unwrap();
        let _u2 = admission.admit(Peer::Uid(0)).unwrap();
        assert_eq!(admission.admit(Peer::Uid(0)), Err(Refused::Full));
        assert_eq!(admission.open(), (6, 4));
        admission.release(a1);
        assert_eq!(admission.open(), (5, 3));
        let _c1 = admission.admit(C).unwrap();
        assert_eq!(admission.admit(Peer::Uid(5)), Err(Refused::Full));
    }

    #[test]
    fn the_peer_map_forgets_peers_with_nothing_open() {
        let admission = admission();
        for _ in 0..100 {
            let ticket = admission.admit(Peer::Uid(7)).unwrap();
            admission.release(ticket);
        }
        assert!(admission.counts.lock().unwrap().per_peer.is_empty());
        assert_eq!(admission.open(), (0, 0));
    }

    #[test]
    fn uids_are_bounded_apart_from_addresses() {
        let admission = admission();
        let _t: Vec<Ticket> = (0..3)
            .map(|_| admission.admit(Peer::Uid(9)).unwrap())
            .collect();
        assert_eq!(admission.admit(Peer::Uid(9)), Err(Refused::PeerFull));
        assert!(admission.admit(Peer::Uid(10)).is_ok());
    }
}
