//! Other cores: the inbox, placement of requests on the core with an idle worker, forwards and
//! their answers, backlog rebalancing and the published placement counts.

use super::*;

impl Core {
    pub(super) fn arm_inbox(&mut self) {
        self.inbox_in_flight = true;
        let fd = self.shared.cores[self.index].wake.as_raw_fd();
        let entry = op::read(fd, &mut self.inbox_buf[..], Token::core(OpKind::Inbox, 0));
        self.ring.push(entry);
    }

    /// Send a message to another core, waking it through our ring (the write goes out with
    /// this turn's submit).
    pub(super) fn post(&mut self, core: CoreIndex, msg: Msg) {
        debug_assert_ne!(core, self.index);
        if self.shared.post(core, msg) {
            // An eventfd adds the 8-byte native-endian count written to it.
            static ONE: [u8; 8] = 1u64.to_ne_bytes();
            let fd = self.shared.cores[core].wake.as_raw_fd();
            let entry = op::write_static(fd, &ONE, Token::core(OpKind::WakeSent, core.usize()));
            self.ring.push(entry);
        }
    }

    pub(super) fn on_inbox(&mut self, result: Result<u32, Errno>) {
        self.inbox_in_flight = false;
        if let Err(error) = result.or_else(|e| if e == Errno::AGAIN { Ok(0) } else { Err(e) }) {
            tracing::error!(%error, "reading the inbox eventfd failed");
        }
        let mut batch = std::mem::take(&mut self.inbox_batch);
        self.shared.drain(self.index, &mut batch);
        for msg in batch.drain(..) {
            self.on_message(msg);
        }
        self.inbox_batch = batch;
        self.arm_inbox();
    }

    pub(super) fn on_message(&mut self, msg: Msg) {
        match msg {
            Msg::Forward(forward) => self.on_forward(forward),
            Msg::Answer { request, frame } => {
                self.on_answer(RequestHandle::from_raw(request), frame)
            }
            Msg::Connection { fd, ticket } => self.add_conn(fd, ticket, true),
            Msg::Shutdown { now: false } => self.on_stop(shutdown::Stop::Signal),
            Msg::Shutdown { now: true } => self.on_stop_now(),
            Msg::Drain => self.on_stop(shutdown::Stop::Drain),
            Msg::Report {
                end_interval,
                reply,
            } => self.on_report_request(end_interval, reply),
            Msg::Reload(step) => self.on_reload(step),
            Msg::Admin { command, reply } => self.on_admin(command, reply),
            Msg::Wake => {}
        }
    }

    /// Where a new request of `service` should run: here, or on the core returned.
    ///
    /// In order: an idle worker here; an idle worker on another core (claimed); a busy worker
    /// here with room for a queued job, or room here to start one; room to start one on another
    /// core (claimed); our backlog. A core with no shard of the service sends everything to
    /// the core with the shortest backlog.
    pub(super) fn place(&mut self, service: ServiceSlot) -> Option<CoreIndex> {
        let cores = self.shared.cores.len();
        let pool = &self.services[service].pool;
        if cores == 1 || pool.idle() > 0 || self.stopping() {
            return None;
        }
        if let Some(core) = self.claim_on_other_core(service, |c| &c.idle) {
            return Some(core);
        }
        let pool = &self.services[service].pool;
        if pool.takes_now() || pool.room() > 0 {
            return None;
        }
        if let Some(core) = self.claim_on_other_core(service, |c| &c.room) {
            return Some(core);
        }
        if self.services[service].pool.policy().max_workers > 0 {
            return None;
        }
        self.shared
            .cores
            .indices()
            .filter(|&c| {
                self.shared.cores[c].services[service]
                    .max_workers
                    .load(Ordering::Relaxed)
                    > 0
            })
            .min_by_key(|&c| {
                self.shared.cores[c].services[service]
                    .backlog
                    .load(Ordering::Relaxed)
            })
    }

    /// Claim one unit of another core's published count for `service`, searching from a
    /// rotating start so that forwards spread.
    pub(super) fn claim_on_other_core(
        &mut self,
        service: ServiceSlot,
        count: impl Fn(&shared::ShardCounts) -> &std::sync::atomic::AtomicU32,
    ) -> Option<CoreIndex> {
        let cores = self.shared.cores.len();
        for step in 1..=cores {
            let core = CoreIndex::from_usize((self.next_core.usize() + step) % cores);
            if core == self.index {
                continue;
            }
            if shared::claim(count(&self.shared.cores[core].services[service])) {
                self.next_core = core;
                return Some(core);
            }
        }
        None
    }

    /// Send a request of ours to another core to run. Returns false (and changes nothing) when
    /// the bridge is shutting down: then it runs here.
    pub(super) fn forward(&mut self, request: RequestHandle, core: CoreIndex) -> bool {
        let index = request;
        if let Origin::Core {
            core: home,
            request: home_request,
        } = self.requests[index].origin
        {
            // Forwarded to us and waiting in our backlog: pass it on, answered to its home
            // core directly. It stays one forward (counted once, when it left home).
            let mut entry = self.requests.remove(index);
            let forward = entry.forward(home, home_request);
            self.counters.requests_forwarded += 1;
            self.post(core, Msg::Forward(forward));
            return true;
        }
        // Count first, then look at the flag (see `shared`).
        self.shared
            .forwards_in_flight
            .fetch_add(1, Ordering::SeqCst);
        if self.shared.shutdown.load(Ordering::SeqCst) {
            self.forward_settled();
            return false;
        }
        let entry = &mut self.requests[index];
        entry.forwarded_to = Some(core);
        let forward = entry.forward(self.index, request);
        self.counters.requests_forwarded += 1;
        self.post(core, Msg::Forward(forward));
        true
    }

    /// A forwarded request was answered (or given up): when the bridge is stopping and it was
    /// the last, every core may be waiting for it.
    pub(super) fn forward_settled(&mut self) {
        let previous = self
            .shared
            .forwards_in_flight
            .fetch_sub(1, Ordering::SeqCst);
        if previous == 1 && self.shared.shutdown.load(Ordering::SeqCst) {
            self.wake_all();
        }
    }

    pub(super) fn wake_all(&mut self) {
        for core in self.shared.cores.indices() {
            if core != self.index {
                self.post(core, Msg::Wake);
            }
        }
    }

    /// Another core sent us a request to run.
    pub(super) fn on_forward(&mut self, forward: Forward) {
        let service = self.serving_slot(forward.service);
        let now = self.now;
        if forward.from == self.index {
            // One of ours, passed back to us by the core we sent it to: run it here.
            let request = RequestHandle::from_raw(forward.request);
            let entry = &mut self.requests[request];
            debug_assert!(entry.forwarded_to.is_some());
            entry.forwarded_to = None;
            entry.payload = forward.payload;
            entry.service = service;
            self.forward_settled();
            self.services[service]
                .pool
                .on_request(now, request.to_raw(), forward.deadline);
            self.pool_touched(service);
            return;
        }
        let payload_len = forward.payload.len() as u32;
        let request = self.requests.insert(Request {
            origin: Origin::Core {
                core: forward.from,
                request: RequestHandle::from_raw(forward.request),
            },
            forwarded_to: None,
            direct: false,
            caller_request_id: forward.caller_request_id,
            service,
            payload: forward.payload,
            held_bytes: 0,
            deadline: forward.deadline,
            arrived: forward.arrived,
            dispatched: None,
            caller: forward.caller,
            request_bytes: payload_len,
            slow_logged: false,
        });
        self.services[service]
            .pool
            .on_request(now, request.to_raw(), forward.deadline);
        self.pool_touched(service);
    }

    /// The answer to a request we forwarded: pass it to the caller.
    pub(super) fn on_answer(&mut self, request: RequestHandle, frame: Vec<u8>) {
        self.forward_settled();
        let entry = self.requests.remove(request);
        debug_assert!(entry.forwarded_to.is_some());
        let conn_handle = match entry.origin {
            Origin::Conn(conn) => conn,
            Origin::Core { .. } => unreachable!("forwarded requests are not forwarded again"),
        };
        self.recycle_payload(entry.payload);
        if let Some(conn) = self.conns.get_mut(conn_handle) {
            conn.requests_in_flight -= 1;
        }
        self.release_request_bytes(conn_handle, entry.held_bytes);
        if let Some(conn) = self.live_conn(conn_handle) {
            self.conns[conn].send.tail().extend_from_slice(&frame);
            self.conn_touched(conn);
        }
        self.recycle_payload(frame);
    }

    /// Send the answer frame for a request another core forwarded to us.
    pub(super) fn send_answer(&mut self, core: CoreIndex, request: RequestHandle, frame: Vec<u8>) {
        let request = request.to_raw();
        self.post(core, Msg::Answer { request, frame });
    }

    /// Move waiting requests to cores that have idle workers for them.
    pub(super) fn rebalance(&mut self) {
        if self.stopping() {
            return;
        }
        for service in self.services.indices() {
            while self.services[service].pool.backlog_len() > 0 {
                let Some(core) = self.claim_on_other_core(service, |c| &c.idle) else {
                    break;
                };
                let now = self.now;
                let Some(request) = self.services[service].pool.take_backlogged(now) else {
                    break;
                };
                let request = RequestHandle::from_raw(request);
                if !self.forward(request, core) {
                    // Stopping after all: it goes back to the end of our backlog.
                    let deadline = self.requests[request].deadline;
                    self.services[service]
                        .pool
                        .on_request(now, request.to_raw(), deadline);
                    self.pool_touched(service);
                    break;
                }
            }
        }
    }

    /// Store our placement counts for the other cores. When an idle worker appears and another
    /// core has a backlog for it, wake that core so that it forwards.
    pub(super) fn publish(&mut self) {
        for service in self.services.indices() {
            if self.services[service].phase == SlotPhase::Retired {
                // (Zeroed when it was retired: nobody forwards to it any more.)
                continue;
            }
            let pool = &self.services[service].pool;
            // Idle workers of a paused or draining pool take nothing: none to offer.
            let idle = if pool.intake() == crate::pool::Intake::Open {
                pool.idle()
            } else {
                0
            };
            let (room, backlog) = (pool.room(), pool.backlog_len());
            let counts = &self.shared.cores[self.index].services[service];
            let had_idle = shared::publish(&counts.idle, idle) > 0;
            shared::publish(&counts.room, room);
            shared::publish(&counts.backlog, backlog);
            if idle > 0 && !had_idle {
                for core in self.shared.cores.indices() {
                    let backlog = &self.shared.cores[core].services[service].backlog;
                    if core != self.index && backlog.load(Ordering::Relaxed) > 0 {
                        // (A core woken twice in one turn costs nothing: wake-ups coalesce.)
                        self.post(core, Msg::Wake);
                    }
                }
            }
        }
    }
}
