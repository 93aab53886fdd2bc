//! Listeners and the spawner's wake-up: accepting caller connections (and handing them to the
//! core with the fewest), and taking the spawner's results.

use crate::engine::core::*;

impl Core {
    pub(in crate::engine::core) fn arm_accept(&mut self, index: ListenerIndex) {
        if self.stopping() {
            return;
        }
        let listener = &mut self.listeners[index];
        debug_assert!(!listener.accept_in_flight);
        listener.accept_in_flight = true;
        let entry = op::accept_multi(&listener.fd, Token::accept(index));
        self.ring.push(entry);
    }

    pub(in crate::engine::core) fn on_accept(
        &mut self,
        index: ListenerIndex,
        completion: Completion,
    ) {
        if !completion.more() {
            self.listeners[index].accept_in_flight = false;
        }
        let failed = matches!(completion.result, Err(error) if error != Errno::CANCELED);
        match completion.accepted() {
            Ok(fd) => self.on_new_connection(fd, self.listeners[index].kind),
            Err(Errno::CANCELED) => {}
            Err(error) => tracing::warn!(%error, "accept failed; retrying shortly"),
        }
        let stopping = self.stopping();
        let listener = &mut self.listeners[index];
        if !listener.accept_in_flight && !stopping {
            if failed {
                listener.rearm_at = Some(self.now + ACCEPT_RETRY_DELAY);
            } else {
                self.arm_accept(index);
            }
        }
    }

    pub(in crate::engine::core) fn on_new_connection(&mut self, fd: OwnedFd, kind: ListenerKind) {
        if self.stopping() {
            if self.draining() {
                self.refuse_with_drain_notice(&fd);
                return;
            }
            self.counters.connections_refused += 1;
            return;
        }
        let tcp = kind == ListenerKind::Tcp;
        let Some(caller) = Caller::of(&fd, tcp) else {
            // Gone before we could ask who it was.
            self.counters.connections_refused += 1;
            return;
        };
        let peer = caller.peer;
        let ticket = match self.shared.admission.admit_caller(&caller) {
            Ok(ticket) => ticket,
            Err(refused) => return self.refuse_connection(peer, refused),
        };
        if tcp {
            let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        }
        // Keep the cores' connection counts even: hand the connection to the core with the
        // fewest when that is not us (counted there at once, so that concurrent accepts see it).
        let cores = &self.shared.cores;
        let count = |core: CoreIndex| cores[core].callers.load(Ordering::Relaxed);
        let least = cores.indices().min_by_key(|&c| (count(c), c != self.index));
        if let Some(core) = least.filter(|&c| c != self.index && count(c) < count(self.index)) {
            cores[core].callers.fetch_add(1, Ordering::Relaxed);
            self.counters.connections_handed_over += 1;
            self.post(core, Msg::Connection { fd, ticket });
            return;
        }
        self.add_conn(fd, ticket, false);
    }

    /// Close a connection a bound refused (by dropping it), count it, and say so at most once
    /// a second per core.
    fn refuse_connection(&mut self, peer: Peer, refused: Refused) {
        self.counters.connections_refused += 1;
        let limits = self.shared.admission.limits();
        let (why, limit) = match (refused, peer) {
            (Refused::NotAllowed, _) => {
                self.counters.connections_refused_not_allowed += 1;
                let list = match peer {
                    Peer::Uid(_) => "not in listen.allowed_uids / allowed_gids",
                    Peer::Ip(_) => "not in listen.allowed_clients",
                };
                (list, None)
            }
            (Refused::Full, _) => ("connections_max reached", Some(limits.total)),
            (Refused::TcpShare, _) => {
                self.counters.connections_refused_tcp_share += 1;
                ("unix_connections_reserved reached", Some(limits.tcp))
            }
            (Refused::PeerFull, Peer::Uid(_)) => {
                self.counters.connections_refused_per_peer += 1;
                ("connections_per_uid_max reached", Some(limits.per_uid))
            }
            (Refused::PeerFull, Peer::Ip(_)) => {
                self.counters.connections_refused_per_peer += 1;
                ("connections_per_ip_max reached", Some(limits.per_ip))
            }
        };
        let due = self
            .refusal_logged
            .is_none_or(|at| self.now.duration_since(at) >= REFUSAL_LOG_INTERVAL);
        if !due {
            return;
        }
        self.refusal_logged = Some(self.now);
        let more = "further refusals are counted in connections_refused (by reason), and logged \
                    at most once a second";
        match limit {
            Some(limit) => {
                tracing::warn!(%peer, limit, "refusing a caller connection: {why} ({more})")
            }
            None => tracing::warn!(%peer, "refusing a caller connection: {why} ({more})"),
        }
    }

    /// Register a connection on this core. `counted`: it is in our `callers` count already
    /// (handed over by another core).
    pub(in crate::engine::core) fn add_conn(&mut self, fd: OwnedFd, ticket: Ticket, counted: bool) {
        if self.stopping() {
            // Handed over just as we began stopping.
            if counted {
                self.shared.cores[self.index]
                    .callers
                    .fetch_sub(1, Ordering::Relaxed);
            }
            self.shared.admission.release(ticket);
            if self.draining() {
                self.refuse_with_drain_notice(&fd);
                return;
            }
            self.counters.connections_refused += 1;
            return;
        }
        if !counted {
            self.shared.cores[self.index]
                .callers
                .fetch_add(1, Ordering::Relaxed);
        }
        let index = self.conns.insert(Conn {
            fd,
            // With provided buffers, a caller's buffer holds memory only while bytes wait in it.
            read: if self.provided.is_some() {
                ReadBuffer::released(CONN_READ_BYTES)
            } else {
                ReadBuffer::new(CONN_READ_BYTES)
            },
            recv: Recv::Idle,
            phase: Phase::Open,
            send: SendQueue::default(),
            answers_counted: 0,
            discard: 0,
            requests_in_flight: 0,
            slot_send: None,
            into_slot: None,
            file: None,
            provided_off: false,
            large_last: false,
            last_byte: self.now,
            cut_short: None,
            ticket: Some(ticket),
            paused: None,
            bytes_in_flight: 0,
            reserved: 0,
            awaiting: None,
            caller: None,
        });
        self.conns[index].caller = caller_addr(&self.conns[index]);
        self.conns[index].file = self.register_file(self.conns[index].fd.as_raw_fd());
        self.arm_conn_recv(index);
    }

    pub(in crate::engine::core) fn arm_spawn_wake(&mut self) {
        self.wake_in_flight = true;
        let token = Token::core(OpKind::SpawnWake, 0);
        let entry = op::read(self.spawner.wake.as_raw_fd(), &mut self.wake_buf[..], token);
        self.ring.push(entry);
    }

    pub(in crate::engine::core) fn on_spawn_wake(&mut self) {
        self.wake_in_flight = false;
        let mut results = std::mem::take(&mut self.spawn_results);
        self.spawner.take_results(&mut results);
        for result in results.drain(..) {
            self.on_spawned(result);
        }
        self.spawn_results = results;
        self.arm_spawn_wake();
    }
}

/// Who is at the other end of a new connection, for the access and slow logs: its uid (from
/// its admission ticket), or its TCP address with the port (one `getpeername`: the ticket
/// keeps only the address, which is what admission counts by).
fn caller_addr(conn: &Conn) -> Option<CallerAddr> {
    match conn.ticket.as_ref()?.peer() {
        Peer::Uid(uid) => Some(CallerAddr::Uid(uid)),
        Peer::Ip(_) => {
            let addr = rustix::net::getpeername(&conn.fd).ok()??;
            std::net::SocketAddr::try_from(addr)
                .ok()
                .map(CallerAddr::Tcp)
        }
    }
}
