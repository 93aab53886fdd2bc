//! Who may hold how many caller connections.
//!
//! Who may connect is checked first: a Unix caller's uid or gid against `listen.allowed_uids`
//! and `listen.allowed_gids` (from `SO_PEERCRED`, which the kernel fills in, so a caller cannot
//! lie), a TCP caller's address against `listen.allowed_clients` (addresses and CIDR blocks).
//! A caller on the TLS listener (`super::tls`) is a TCP caller for all of this: its address
//! is checked and counted before its handshake, and the identity its client certificate proves
//! is added to its [`Caller`] once the handshake is done, for the services' ACLs.
//! Then three bounds are checked, in this order, for every caller connection of every core:
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
use std::sync::{Arc, Mutex};

use crate::config::Config;

/// Who is at the other end of a caller connection, as far as the limits are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix-socket caller: its uid from `SO_PEERCRED`.
    Uid(u32),
    /// A TCP caller: its address (the port is not part of who it is).
    Ip(IpAddr),
}

/// A caller as the kernel reports it: its peer, and on Unix its primary gid; on the TLS
/// listener, what its handshake proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub peer: Peer,
    pub gid: Option<u32>,
    /// `Some` for a caller on the TLS listener (its `peer` is its TCP address).
    pub tls: Option<TlsCaller>,
}

/// What a TLS caller proved in its handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsCaller {
    /// The name its verified client certificate gives (the first DNS subject alternative
    /// name, else the subject's common name); `None` when the listener asks for no client
    /// certificate (no `listen.tls_client_ca`), or the certificate names nothing.
    pub identity: Option<std::sync::Arc<str>>,
}

impl Caller {
    /// The caller at the other end of a freshly accepted connection; `None` when the kernel
    /// will not say (the caller has gone already): such a connection is refused.
    pub fn of(fd: &OwnedFd, tcp: bool) -> Option<Caller> {
        if tcp {
            let addr = rustix::net::getpeername(fd).ok()??;
            let ip = std::net::SocketAddr::try_from(addr).ok()?.ip();
            // A v4 caller on a dual-stack socket is the same peer as over v4.
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            return Some(Caller {
                peer: Peer::Ip(ip),
                gid: None,
                tls: None,
            });
        }
        let cred = rustix::net::sockopt::socket_peercred(fd).ok()?;
        Some(Caller {
            peer: Peer::Uid(cred.uid.as_raw()),
            gid: Some(cred.gid.as_raw()),
            tls: None,
        })
    }

    /// A caller accepted on the TLS listener from `ip`, before its handshake.
    pub fn tls(ip: IpAddr) -> Caller {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        Caller {
            peer: Peer::Ip(ip),
            gid: None,
            tls: Some(TlsCaller::default()),
        }
    }

    /// Which listener it came through: `"unix"`, `"tcp"` or `"tls"` (as `allowed_listeners`
    /// names them).
    pub fn listener(&self) -> &'static str {
        match (self.peer, &self.tls) {
            (Peer::Uid(_), _) => "unix",
            (Peer::Ip(_), None) => "tcp",
            (Peer::Ip(_), Some(_)) => "tls",
        }
    }
}

/// An address block: an address and how many of its leading bits matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// `"10.0.0.0/8"`, `"fd00::/8"`, or one address (`"127.0.0.2"`, `"::1"`).
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an address or a CIDR block like \"10.0.0.0/8\"")
        })?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= bits => p,
                _ => return Err(format!("{text:?}: the prefix must be 0 to {bits}")),
            },
        };
        Ok(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Who may connect at all (the `listen.allowed_*` keys).
#[derive(Clone, Debug, Default)]
pub struct Access {
    uids: Vec<u32>,
    gids: Vec<u32>,
    clients: Vec<IpNet>,
}

impl Access {
    pub fn from_config(config: &Config) -> Access {
        Access {
            uids: config.listen.allowed_uids.clone(),
            gids: config.listen.allowed_gids.clone(),
            clients: config
                .listen
                .allowed_clients
                .iter()
                .map(|c| IpNet::parse(c).expect("validated"))
                .collect(),
        }
    }

    /// Whether this caller may connect.
    pub fn allows(&self, caller: &Caller) -> bool {
        match caller.peer {
            Peer::Uid(uid) => {
                (self.uids.is_empty() && self.gids.is_empty())
                    || self.uids.contains(&uid)
                    || caller.gid.is_some_and(|gid| self.gids.contains(&gid))
            }
            Peer::Ip(ip) => self.clients.is_empty() || self.clients.iter().any(|n| n.contains(ip)),
        }
    }
}

impl Peer {
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

/// Who may call one service (its `allowed_uids`, `allowed_gids`, `allowed_tls_identities`,
/// `allowed_listeners`).
///
/// How they combine: a caller may call the service when it came through a listener that
/// `allowed_listeners` names (`"unix"`, `"tcp"`, `"tls"`; default all three) *and*, when any of
/// the three identity lists is set, it is named by one of them: a Unix caller by its uid or
/// primary gid (`SO_PEERCRED`), a TLS caller by the identity its verified client certificate
/// gives. A plain TCP caller proves no identity, so it may call only services that set none;
/// the lists are one union, so a service that names TLS identities only is closed to every
/// Unix caller, and one that names uids only is closed to every TLS caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAcl {
    uids: Vec<u32>,
    gids: Vec<u32>,
    identities: Vec<String>,
    unix: bool,
    tcp: bool,
    tls: bool,
}

impl ServiceAcl {
    /// `None` when the service lets every caller that may connect call it.
    pub fn from_config(service: &crate::config::ServiceConfig) -> Option<ServiceAcl> {
        let listed = |name: &str| service.allowed_listeners.iter().any(|l| l == name);
        let acl = ServiceAcl {
            uids: service.allowed_uids.clone(),
            gids: service.allowed_gids.clone(),
            identities: service.allowed_tls_identities.clone(),
            unix: listed("unix"),
            tcp: listed("tcp"),
            tls: listed("tls"),
        };
        let open = !acl.by_identity() && acl.unix && acl.tcp && acl.tls;
        (!open).then_some(acl)
    }

    fn by_identity(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty() || !self.identities.is_empty()
    }

    /// Whether this caller may call the service.
    pub fn allows(&self, caller: &Caller) -> bool {
        let by_identity = self.by_identity();
        match (caller.peer, &caller.tls) {
            (Peer::Uid(uid), _) => {
                self.unix
                    && (!by_identity
                        || self.uids.contains(&uid)
                        || caller.gid.is_some_and(|gid| self.gids.contains(&gid)))
            }
            // A plain TCP caller has nothing to prove who it is with.
            (Peer::Ip(_), None) => self.tcp && !by_identity,
            (Peer::Ip(_), Some(tls)) => {
                self.tls
                    && (!by_identity
                        || tls
                            .identity
                            .as_deref()
                            .is_some_and(|id| self.identities.iter().any(|n| n == id)))
            }
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The caller is not in `listen.allowed_uids` / `allowed_gids` / `allowed_clients`.
    NotAllowed,
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
    caller: Caller,
}

impl Ticket {
    pub fn peer(&self) -> Peer {
        self.caller.peer
    }

    /// Who holds it, as the kernel said at accept (and, on the TLS listener, as its
    /// handshake proved).
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Record what a TLS caller's finished handshake proved (the TLS thread, before it hands
    /// the connection to a core). The counts do not change: they go by the peer's address.
    pub fn set_tls_identity(&mut self, identity: Option<std::sync::Arc<str>>) {
        self.caller.tls = Some(TlsCaller { identity });
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
    counts: Mutex<Counts>,
    /// The limits and access lists in force (replaced by a reload: connections already open
    /// stay, new ones meet the new rules).
    rules: Mutex<(Limits, Arc<Access>)>,
}

impl Admission {
    pub fn new(limits: Limits, access: Access) -> Admission {
        Admission {
            counts: Mutex::new(Counts::default()),
            rules: Mutex::new((limits, Arc::new(access))),
        }
    }

    /// Enforce new limits and access lists from now on (a reload).
    pub fn update(&self, limits: Limits, access: Access) {
        *self.rules.lock().expect("not poisoned") = (limits, Arc::new(access));
    }

    /// Count a new connection from `caller`, or say why it is refused.
    pub fn admit_caller(&self, caller: &Caller) -> Result<Ticket, Refused> {
        let (limits, access) = self.rules.lock().expect("not poisoned").clone();
        if !access.allows(caller) {
            return Err(Refused::NotAllowed);
        }
        self.admit(caller.clone(), limits)
    }

    /// Count a new connection from `caller`, or say which bound refuses it.
    fn admit(&self, caller: Caller, limits: Limits) -> Result<Ticket, Refused> {
        let peer = caller.peer;
        let mut counts = self.counts.lock().expect("not poisoned");
        if counts.total >= limits.total {
            return Err(Refused::Full);
        }
        if peer.is_tcp() && counts.tcp >= limits.tcp {
            return Err(Refused::TcpShare);
        }
        let peer_max = if peer.is_tcp() {
            limits.per_ip
        } else {
            limits.per_uid
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
        Ok(Ticket { caller })
    }

    /// The connection holding `ticket` has gone.
    pub fn release(&self, ticket: Ticket) {
        let mut counts = self.counts.lock().expect("not poisoned");
        let peer = ticket.caller.peer;
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

    /// The limits it enforces.
    pub fn limits(&self) -> Limits {
        self.rules.lock().expect("not poisoned").0
    }

    /// Connections open now: (all, over TCP).
    pub fn open(&self) -> (u32, u32) {
        let counts = self.counts.lock().expect("not poisoned");
        (counts.total, counts.tcp)
    }
}

#[cfg(test)]
mod tests;
