//! The broker's counters: plain atomics on the hot path, read by the Prometheus exporter
//! and `$SYS` at their own pace.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use raftmq_cluster::StoreError;

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
    /// A copy for another node that could not be sent or was not confirmed (the peer's
    /// queue stayed full, or it went down).
    ForwardFailed,
}

impl DropReason {
    /// Every reason, in label order (the order of the discriminants, which index
    /// [`Stats::dropped_by_reason`]).
    pub const ALL: [DropReason; 7] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::NoSubscribers,
        DropReason::TooLarge,
        DropReason::NotAuthorized,
        DropReason::NotQueued,
        DropReason::ForwardFailed,
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
            DropReason::ForwardFailed => "forward_failed",
        }
    }
}

/// Outcome of a CONNECT (the `result` label of `raftmq_connects_total`): one table from
/// variant to label, and from a refusal's MQTT 5 reason code to its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ConnectResult {
    /// Accepted.
    Success,
    /// Wrong credentials (0x86).
    BadCredentials,
    /// Not authorized (0x87), or a refusal with no outcome of its own.
    NotAuthorized,
    /// Banned (0x8A).
    Banned,
    /// Client identifier not valid (0x85).
    ClientIdRejected,
    /// Unsupported protocol version (0x84 / 0x01).
    UnsupportedProtocol,
    /// Bad authentication method (0x8C).
    BadAuthMethod,
    /// Keep alive above the maximum (MQTT 3).
    KeepAliveRejected,
    /// Will topic invalid or retain not supported (0x90, 0x9A).
    InvalidWill,
    /// Session store unavailable (0x88).
    ServerUnavailable,
    /// No valid CONNECT, or one that breaks a rule closing without CONNACK.
    Malformed,
    /// Password checks saturated (0x89).
    ServerBusy,
    /// The failed-login limit (0x9F).
    TooManyFailures,
    /// `mqtt.max_sessions` reached (0x97).
    TooManySessions,
}

impl ConnectResult {
    /// Every outcome, in label order (the order of the discriminants).
    pub const ALL: [ConnectResult; 14] = [
        ConnectResult::Success,
        ConnectResult::BadCredentials,
        ConnectResult::NotAuthorized,
        ConnectResult::Banned,
        ConnectResult::ClientIdRejected,
        ConnectResult::UnsupportedProtocol,
        ConnectResult::BadAuthMethod,
        ConnectResult::KeepAliveRejected,
        ConnectResult::InvalidWill,
        ConnectResult::ServerUnavailable,
        ConnectResult::Malformed,
        ConnectResult::ServerBusy,
        ConnectResult::TooManyFailures,
        ConnectResult::TooManySessions,
    ];

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            ConnectResult::Success => "success",
            ConnectResult::BadCredentials => "bad_credentials",
            ConnectResult::NotAuthorized => "not_authorized",
            ConnectResult::Banned => "banned",
            ConnectResult::ClientIdRejected => "client_id_rejected",
            ConnectResult::UnsupportedProtocol => "unsupported_protocol",
            ConnectResult::BadAuthMethod => "bad_auth_method",
            ConnectResult::KeepAliveRejected => "keep_alive_rejected",
            ConnectResult::InvalidWill => "invalid_will",
            ConnectResult::ServerUnavailable => "server_unavailable",
            ConnectResult::Malformed => "malformed",
            ConnectResult::ServerBusy => "server_busy",
            ConnectResult::TooManyFailures => "too_many_failures",
            ConnectResult::TooManySessions => "too_many_sessions",
        }
    }

    /// The outcome of a CONNACK refusal with MQTT 5 reason `code` (0: the MQTT 3-only
    /// keep-alive refusal).
    pub fn of_refusal(code: u8) -> ConnectResult {
        match code {
            0x86 => ConnectResult::BadCredentials,
            0x8A => ConnectResult::Banned,
            0x85 => ConnectResult::ClientIdRejected,
            0x8C => ConnectResult::BadAuthMethod,
            0x90 | 0x9A => ConnectResult::InvalidWill,
            0x88 => ConnectResult::ServerUnavailable,
            0x89 => ConnectResult::ServerBusy,
            0x9F => ConnectResult::TooManyFailures,
            0x97 => ConnectResult::TooManySessions,
            0 => ConnectResult::KeepAliveRejected,
            _ => ConnectResult::NotAuthorized,
        }
    }
}

/// Counters exposed to tests, `$SYS` and metrics. Plain atomics on the hot path; the
/// metrics exporter reads them at scrape time.
#[derive(Debug, Default)]
pub struct Stats {
    /// PUBLISH received, by QoS.
    pub received_by_qos: [AtomicU64; 3],
    /// PUBLISH sent, by QoS.
    pub sent_by_qos: [AtomicU64; 3],
    /// Drops by [`DropReason`] (index = position in [`DropReason::ALL`]).
    pub dropped_by_reason: [AtomicU64; DropReason::ALL.len()],
    /// Packets received, by packet type (1-15).
    pub packets_received: [AtomicU64; 16],
    /// Packets sent, by packet type.
    pub packets_sent: [AtomicU64; 16],
    /// CONNECT outcomes (index = [`ConnectResult`] discriminant).
    pub connects: [AtomicU64; ConnectResult::ALL.len()],
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
    /// Persistent sessions adopted from nodes that were gone (the Raft leader does it).
    pub adopted: AtomicU64,
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
    /// Store operations that failed, by [`STORE_ERRORS`] label.
    pub store_errors: [AtomicU64; STORE_ERRORS.len()],
}

/// The `reason` labels of `raftmq_store_errors_total` ([`StoreError::label`]).
pub const STORE_ERRORS: [&str; 5] = ["poisoned", "unavailable", "not_leader", "fenced", "timeout"];

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

    /// Counts a failed store operation.
    pub fn store_error(&self, e: &StoreError) {
        if let Some(i) = STORE_ERRORS.iter().position(|l| *l == e.label()) {
            self.store_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection closed with reason `code` (0x80 and above).
    pub fn protocol_error(&self, code: u8) {
        if let Some(counter) = code.checked_sub(0x80).and_then(|i| self.protocol_errors.0.get(usize::from(i))) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a CONNECT outcome.
    pub fn connect_result(&self, result: ConnectResult) {
        self.connects[result as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// What the broker holds right now, for the metrics exposition (gauges, read when scraped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Session operations lost to a full journal (each session caught up with its whole
    /// state afterwards).
    pub journal_lost: u64,
    /// The cluster as this node sees it (`None` without one).
    pub cluster: Option<ClusterGauges>,
    /// The replicated store's group as this node sees it (`None` without one).
    pub raft: Option<raftmq_cluster::raft::RaftView>,
}

/// The cluster, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterGauges {
    /// Every peer, as the mesh sees it.
    pub peers: Vec<raftmq_cluster::mesh::NodeView>,
    /// Forwarded messages received that no local session could take.
    pub undeliverable: u64,
    /// Shared deliveries given to another member because their node died.
    pub redelivered: u64,
    /// Introductions to new addresses that failed.
    pub failed_dials: u64,
    /// Messages one peer's forward queue holds at most (`cluster.forward_queue`).
    pub forward_queue_capacity: usize,
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
    fn connect_results_index_their_counters_in_label_order() {
        for (i, result) in ConnectResult::ALL.iter().enumerate() {
            assert_eq!(*result as usize, i, "{result:?}");
        }
    }

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
