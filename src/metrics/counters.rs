//! Counters defined once. Each bridge-wide counter is one line of [`define_counters!`]: its
//! field, with its doc comment as the Prometheus help text. From that line it is summed across
//! cores (`add`), shown by `status` (text and `--json`, as a field of `Status`), and exported
//! as `acgi_bridge_<name>_total` by `/metrics` (`each`).

/// Define a struct of `u64` counters with `add` (sum another into it) and `each` (name, help,
/// value of every counter, in definition order).
macro_rules! define_counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])+ $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $name {
            $( $(#[doc = $doc])+ #[serde(default)] pub $field: u64, )*
        }

        impl $name {
            /// How many counters there are.
            pub const COUNT: usize = [$(stringify!($field)),*].len();

            /// Add every counter of `other` into this one.
            pub fn add(&mut self, other: &$name) {
                $( self.$field += other.$field; )*
            }

            /// Every counter: its name, its help text (the doc comment), its value.
            pub fn each(&self) -> [(&'static str, &'static str, u64); $name::COUNT] {
                [$( (stringify!($field), concat!($($doc),+), self.$field) ),*]
            }
        }
    };
}

define_counters! {
    /// What every core counts, summed across cores for status and `/metrics`.
    pub struct BridgeCounters {
        /// Requests answered with a reply.
        requests_ok,
        /// Requests answered with an error (every code; by service and code in
        /// acgi_bridge_requests_total).
        requests_failed,
        /// Caller frames that broke the protocol (answered with error 7, then the connection
        /// closed).
        malformed_frames,
        /// Connections refused at accept (every reason: connections_max, the Unix reserve, a
        /// peer's limit, the admin and metrics budget, or shutting down).
        connections_refused,
        /// TCP connections refused because TCP callers held all but
        /// unix_connections_reserved of connections_max.
        connections_refused_tcp_share,
        /// Connections refused because their peer (uid on Unix, address on TCP) held
        /// connections_per_uid_max / connections_per_ip_max.
        connections_refused_per_peer,
        /// Connections refused because their caller is not in listen.allowed_uids /
        /// allowed_gids (Unix, by SO_PEERCRED) or listen.allowed_clients (TCP).
        connections_refused_not_allowed,
        /// Callers disconnected for stalling mid-frame (caller_frame_timeout_ms).
        callers_timed_out,
        /// Caller connections closed after idling (caller_idle_timeout_ms).
        callers_idle_closed,
        /// Times a caller connection stopped being read because it had
        /// caller_requests_in_flight_max requests or caller_bytes_in_flight_max payload bytes
        /// in flight.
        callers_paused_in_flight,
        /// Times a caller connection stopped being read because its core's share of
        /// request_bytes_buffered_max was spent.
        callers_paused_budget,
        /// Callers disconnected for not reading their answers (write_queue_max_bytes).
        slow_callers_disconnected,
        /// Callers disconnected because the answers queued for all callers passed
        /// answer_bytes_buffered_max (the one with the most unread went first; also counted in
        /// slow_callers_disconnected).
        answer_budget_disconnects,
        /// Replies sent straight from a worker's slot (no copy through the bridge).
        replies_sent_from_slot,
        /// Sends from a slot that fell short and were finished from a copy.
        slot_sends_spilled,
        /// Requests whose payload was read from the caller's socket straight into a slot.
        requests_read_into_slot,
        /// Payload bytes of direct reads that had arrived with the header, and were copied.
        direct_read_prefix_bytes,
        /// Multishot receives that found every provided buffer in use (then plain receives).
        provided_buffers_ran_out,
        /// Requests dropped before they ran because their caller's connection closed while
        /// they waited for a worker.
        requests_abandoned,
        /// Requests given back to their pool because the worker they were dispatched to
        /// went before it was sent their job (they run on another worker, once).
        requests_requeued,
        /// Requests run on another core than their caller's, to use an idle worker there.
        requests_forwarded,
        /// Connections handed to another core at accept (the one with the fewest).
        connections_handed_over,
        /// Log lines dropped because the reader of the bridge's stderr did not keep up (the
        /// log queue holds at most LOG_LINES_BUFFERED_MAX lines).
        log_lines_dropped,
        /// Lines of worker output not logged because their service was over its
        /// log_lines_per_second.
        worker_lines_suppressed,
        /// Configuration reloads that took effect (SIGHUP or `acgi-bridge reload`).
        reloads,
        /// Reloads refused: a bad config, new workers that did not come up in
        /// reload_timeout_ms, or the service slots spent (the running config stayed).
        reloads_failed,
        /// Caller connections closed with the drain notice (Error 6, request id 0) because a
        /// new bridge took over at a binary upgrade.
        connections_drained,
        /// Access log lines dropped because its writer did not keep up (its queue holds at
        /// most ACCESS_LOG_LINES_BUFFERED_MAX lines).
        access_log_lines_dropped,
        /// TLS handshakes completed (the caller then handed to a core).
        tls_handshakes,
        /// TLS handshakes that failed: a protocol error, a client certificate missing or not
        /// chaining to listen.tls_client_ca, or the caller closing mid-handshake.
        tls_handshakes_failed,
        /// TLS callers dropped for not finishing their handshake in
        /// listen.tls_handshake_timeout_ms.
        tls_handshake_timeouts,
        /// Times a TLS connection's pump buffer filled (one direction stopped being read until
        /// the other side took the bytes).
        tls_buffers_full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_listed_once_with_its_help_and_sums() {
        // Proves the table: names are distinct, each has help text, add sums every field.
        let mut a = BridgeCounters {
            requests_ok: 2,
            requests_forwarded: 1,
            ..Default::default()
        };
        let b = BridgeCounters {
            requests_ok: 3,
            connections_handed_over: 4,
            ..Default::default()
        };
        a.add(&b);
        let each = a.each();
        assert_eq!(each.len(), BridgeCounters::COUNT);
        let mut names: Vec<_> = each.iter().map(|(name, _, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BridgeCounters::COUNT);
        assert!(each.iter().all(|(_, help, _)| !help.trim().is_empty()));
        let value = |name: &str| each.iter().find(|(n, _, _)| *n == name).unwrap().2;
        assert_eq!(value("requests_ok"), 5);
        assert_eq!(value("requests_forwarded"), 1);
        assert_eq!(value("connections_handed_over"), 4);
    }
}
