//! The broker's counters: plain atomics on the hot path, read by the Prometheus exporter
//! and `$SYS` at their own pace.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Why a delivery or message was dropped (the `reason` label of
/// `raftmq_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A session queue was full.
    QueueFull,
    /// The message expired before it could be sent.
    Expired,
    /// A published message matched no subscription.
    NoSubscribers,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLarge,
    /// Refused by the ACL or the `$SYS` rule.
    NotAuthorized,
    /// QoS 0 for an offline session (not queued by default).
    NotQueued,
}

impl DropReason {
    /// Every reason, in label order (the order of the discriminants, which index
    /// [`Stats::dropped_by_reason`]).
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::NoSubscribers,
        DropReason::TooLarge,
        DropReason::NotAuthorized,
        DropReason::NotQueued,
    ];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::NoSubscribers => "no_subscribers",
            DropReason::TooLarge => "too_large",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::NotQueued => "not_queued",
        }
    }
}

/// Outcome of a CONNECT (the `result` label of `raftmq_connects_total`).
pub const CONNECT_RESULTS: [&str; 14] = [
    "success",
    "bad_credentials",
    "not_authorized",
    "banned",
    "client_id_rejected",
    "unsupported_protocol",
    "bad_auth_method",
    "keep_alive_rejected",
    "invalid_will",
    "server_unavailable",
    "malformed",
    "server_busy",
    "too_many_failures",
    "too_many_sessions",
];

/// Counters exposed to tests, `$SYS` and metrics. Plain atomics on the hot path; the
/// metrics exporter reads them at scrape time.
#[derive(Debug, Default)]
pub struct Stats {
    /// PUBLISH received, by QoS.
    pub received_by_qos: [AtomicU64; 3],
    /// PUBLISH sent, by QoS.
    pub sent_by_qos: [AtomicU64; 3],
    /// Drops by [`DropReason`] (index = position in [`DropReason::ALL`]).
    pub dropped_by_reason: [AtomicU64; 6],
    /// Packets received, by packet type (1-15).
    pub packets_received: [AtomicU64; 16],
    /// Packets sent, by packet type.
    pub packets_sent: [AtomicU64; 16],
    /// CONNECT outcomes (index = position in [`CONNECT_RESULTS`]).
    pub connects: [AtomicU64; CONNECT_RESULTS.len()],
    /// ACL checks that allowed.
    pub acl_allowed: AtomicU64,
    /// Connections with an accepted CONNECT.
    pub connections: AtomicUsize,
    /// Highest value `connections` reached.
    pub connections_max: AtomicUsize,
    /// Will messages published.
    pub wills_published: AtomicU64,
    /// Sessions taken over by a new connection.
    pub takeovers: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// CONNECTs refused by authentication.
    pub auth_failures: AtomicU64,
    /// PUBLISH and SUBSCRIBE requests refused by the ACL.
    pub acl_denied: AtomicU64,
    /// Connections closed for bad input after CONNECT, by MQTT 5 reason code (index =
    /// code - 0x80).
    pub protocol_errors: ReasonCounters,
}

/// One counter per failure reason code (0x80-0xFF).
#[derive(Debug)]
pub struct ReasonCounters(pub [AtomicU64; 128]);

impl Default for ReasonCounters {
    fn default() -> Self {
        ReasonCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Stats {
    /// Counts `n` drops for `reason`.
    pub fn drop(&self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped_by_reason[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    fn sum(counters: &[AtomicU64]) -> u64 {
        counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// PUBLISH packets received from clients (all QoS).
    pub fn messages_received(&self) -> u64 {
        Self::sum(&self.received_by_qos)
    }

    /// PUBLISH packets written to clients (all QoS).
    pub fn messages_sent(&self) -> u64 {
        Self::sum(&self.sent_by_qos)
    }

    /// Messages and deliveries dropped, for every reason.
    pub fn messages_dropped(&self) -> u64 {
        Self::sum(&self.dropped_by_reason)
    }

    /// Counts a connection closed with reason `code` (0x80 and above).
    pub fn protocol_error(&self, code: u8) {
        if let Some(counter) = code.checked_sub(0x80).and_then(|i| self.protocol_errors.0.get(usize::from(i))) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a CONNECT outcome (a label of [`CONNECT_RESULTS`]).
    pub fn connect_result(&self, result: &str) {
        if let Some(i) = CONNECT_RESULTS.iter().position(|r| *r == result) {
            self.connects[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What the broker holds right now, for the metrics exposition (gauges, read when scraped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions and what they hold.
    pub sessions: SessionSummary,
    /// Distinct subscribed filters.
    pub subscriptions: usize,
    /// Distinct shared subscriptions.
    pub shared_subscriptions: usize,
    /// Routes.
    pub routes: usize,
    /// Retained messages.
    pub retained_messages: usize,
    /// Bytes held by retained messages.
    pub retained_bytes: usize,
}

/// Totals over every session, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// Sessions.
    pub sessions: usize,
    /// Persistent sessions.
    pub persistent: usize,
    /// Queued messages.
    pub queued: usize,
    /// Inflight messages.
    pub inflight: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters_in_label_order() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        let stats = Stats::default();
        stats.drop(DropReason::Expired, 2);
        stats.drop(DropReason::NotQueued, 1);
        assert_eq!(stats.messages_dropped(), 3);
        assert_eq!(stats.dropped_by_reason[DropReason::Expired as usize].load(Ordering::Relaxed), 2);
    }
}
