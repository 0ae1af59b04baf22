//! Prometheus metrics (`GET /metrics`), built with the `metrics` crate and rendered by
//! `metrics-exporter-prometheus`. Families are documented one by one in docs/metrics.md.
//!
//! Each broker owns its recorder instead of installing a process-global one, so several
//! brokers in one process (the test suite) keep separate numbers. The hot path counts with
//! plain atomics in [`Stats`](crate::telemetry::stats::Stats); a scrape copies them into the recorder
//! and renders. Only the delivery-latency histogram is recorded as it happens, into fixed
//! buckets of atomics (the exporter's own histograms keep every sample until the next
//! scrape, which without a scraper is unbounded memory). Labels stay
//! small: QoS, packet type, drop reason, CONNECT result; never client ids or topics.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Instant;

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use raftmq_cluster::histogram::{Histogram, BOUNDS_US};

use crate::telemetry::stats::{ConnectResult, DropReason, Gauges, Stats, STORE_ERRORS};

const LATENCY: &str = "raftmq_delivery_latency_seconds";
const ROUTE_SETTLE: &str = "raftmq_cluster_route_settle_seconds";
const PROPOSAL_LATENCY: &str = "raftmq_raft_proposal_seconds";
const SNAPSHOT_BUILD: &str = "raftmq_raft_snapshot_build_seconds";

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

const PACKET_TYPES: [&str; 16] = [
    "reserved",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Help text of every family, in the order docs/metrics.md lists them.
pub const FAMILIES: &[(&str, &str)] = &[
    ("raftmq_build_info", "Build information; the value is always 1."),
    ("raftmq_uptime_seconds", "Seconds since the node started."),
    ("raftmq_connections", "Client connections with an accepted CONNECT."),
    ("raftmq_connections_max", "Highest number of connections since start."),
    ("raftmq_sessions", "Sessions, online and offline."),
    ("raftmq_sessions_persistent", "Sessions that outlive their connection."),
    ("raftmq_subscriptions", "Distinct subscribed topic filters, shared ones included."),
    ("raftmq_subscriptions_shared", "Distinct shared subscriptions (group and filter)."),
    ("raftmq_routes", "Routes in the route table."),
    ("raftmq_retained_messages", "Retained messages."),
    ("raftmq_retained_bytes", "Bytes held by retained messages."),
    ("raftmq_queued_messages", "Messages waiting in session queues."),
    ("raftmq_inflight_messages", "Outbound QoS 1/2 messages sent and not yet acknowledged."),
    ("raftmq_messages_received_total", "PUBLISH packets received from clients, by QoS."),
    ("raftmq_messages_sent_total", "PUBLISH packets sent to clients, by QoS."),
    ("raftmq_messages_dropped_total", "Messages or deliveries dropped, by reason."),
    ("raftmq_bytes_received_total", "Bytes read from clients."),
    ("raftmq_bytes_sent_total", "Bytes written to clients."),
    ("raftmq_packets_received_total", "MQTT packets received, by type."),
    ("raftmq_packets_sent_total", "MQTT packets sent, by type."),
    ("raftmq_connects_total", "CONNECT outcomes, by result."),
    ("raftmq_authentication_failures_total", "CONNECTs refused by authentication."),
    ("raftmq_acl_checks_total", "ACL decisions, by result."),
    ("raftmq_wills_published_total", "Will messages published."),
    ("raftmq_takeovers_total", "Sessions taken over by a new connection."),
    ("raftmq_sessions_adopted_total", "Persistent sessions this node adopted because their node was gone."),
    ("raftmq_protocol_errors_total", "Connections closed for bad input after CONNECT, by MQTT 5 reason code."),
    ("raftmq_store_errors_total", "Store operations that failed, by kind; the client was refused, never acknowledged."),
    (
        "raftmq_session_journal_lost_total",
        "Session operations lost to a full journal; each such session sent its whole state to the store next.",
    ),
    ("raftmq_cluster_nodes", "Nodes of the cluster as this node sees them (itself included), by status."),
    ("raftmq_cluster_peer_up", "1 while the link to a peer is up."),
    ("raftmq_cluster_peer_routes", "Routes a peer has sent this node."),
    ("raftmq_cluster_forwarded_messages_total", "Messages forwarded to a peer."),
    ("raftmq_cluster_forwarded_bytes_total", "Payload bytes forwarded to a peer."),
    (
        "raftmq_cluster_forward_dropped_total",
        "Messages for a peer dropped: its queue stayed full, its link was down, or it could not deliver them.",
    ),
    ("raftmq_cluster_forward_queue", "Messages waiting to be forwarded to a peer."),
    ("raftmq_cluster_forward_queue_capacity", "Messages one peer's forward queue holds at most (cluster.forward_queue)."),
    ("raftmq_cluster_undeliverable_total", "Messages peers forwarded here that no local session could take."),
    (
        "raftmq_cluster_failed_dials_total",
        "Introductions to a new node address that failed: unreachable, or refused for a wrong secret or certificate.",
    ),
    ("raftmq_cluster_redelivered_total", "Shared deliveries given to another member because the node they were forwarded to died first."),
    (ROUTE_SETTLE, "Time a SUBACK waited for every live peer to acknowledge its new route."),
    ("raftmq_raft_term", "Current Raft term of the store's group."),
    ("raftmq_raft_is_leader", "1 while this node leads the store's group."),
    ("raftmq_raft_has_leader", "1 while this node knows a leader of the store's group."),
    ("raftmq_raft_voters", "Voting members of the store's group."),
    ("raftmq_raft_last_log_index", "Index of the last entry in this node's Raft log."),
    ("raftmq_raft_commit_index", "Index of the last entry this node knows committed by a majority."),
    ("raftmq_raft_applied_index", "Index of the last entry applied to this node's state machine."),
    ("raftmq_raft_apply_lag", "Log entries this node holds but has not applied yet."),
    ("raftmq_raft_log_entries", "Entries held in this node's Raft log (the rest are in the snapshot)."),
    ("raftmq_raft_snapshot_index", "Index the last snapshot covers."),
    ("raftmq_raft_snapshots_total", "Snapshots built by this node since it started."),
    ("raftmq_raft_proposals_total", "Log entries this node's writer proposed."),
    ("raftmq_raft_proposed_operations_total", "Store operations in those entries (operations / proposals = batch size)."),
    ("raftmq_raft_proposal_errors_total", "Proposals that failed (no leader, store errors); their writers were refused."),
    (PROPOSAL_LATENCY, "Time from proposing a log entry to its being applied on this node (through the leader when this node follows)."),
    (SNAPSHOT_BUILD, "Time to build a snapshot of the state machine."),
    (LATENCY, "Time from receiving a PUBLISH to queueing it into a subscriber's socket buffer."),
];

/// `reason` label values of `raftmq_protocol_errors_total`: "0x80" to "0xff".
static REASON_LABELS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0x80..=0xffu8).map(|c| format!("{c:#04x}")).collect());

/// Appends histogram `name` in the Prometheus text format.
fn render_histogram(h: &Histogram, name: &str, out: &mut String) {
    render_buckets(h.read(), name, out);
}

/// Appends a histogram read with [`Histogram::read`] in the Prometheus text format.
fn render_buckets((buckets, sum_us): ([u64; BOUNDS_US.len() + 1], u64), name: &str, out: &mut String) {
    let help = FAMILIES.iter().find(|(n, _)| *n == name).map_or("", |(_, help)| help);
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, bound) in BOUNDS_US.iter().enumerate() {
        cumulative += buckets[i];
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    cumulative += buckets[BOUNDS_US.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}\n");
}

/// The metrics of one broker.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    latency: Histogram,
    route_settle: Histogram,
    started: Instant,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn peer_key(name: &'static str, peer: &str) -> Key {
    Key::from_parts(name, vec![Label::new("peer", peer.to_owned())])
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
}

impl Metrics {
    /// A recorder with every family described (the latency histogram is rendered apart).
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        for (name, help) in FAMILIES {
            let unit = if name.ends_with("_seconds") { Some(Unit::Seconds) } else { None };
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            if [LATENCY, ROUTE_SETTLE, PROPOSAL_LATENCY, SNAPSHOT_BUILD].contains(&name.as_str()) {
                continue;
            } else if name.as_str().ends_with("_total") {
                recorder.describe_counter(name, unit, help);
            } else {
                recorder.describe_gauge(name, unit, help);
            }
        }
        let handle = recorder.handle();
        Metrics { recorder, handle, latency: Histogram::default(), route_settle: Histogram::default(), started: Instant::now() }
    }

    /// Records the latency of a delivery, at `now_us`, of a message received at
    /// `received_at_us` (both from `message::now_us`, read once per batch by the caller).
    pub fn delivered(&self, received_at_us: u64, now_us: u64) {
        if received_at_us > 0 {
            self.latency.record(now_us.saturating_sub(received_at_us));
        }
    }

    /// Records how long a SUBACK waited for the peers to acknowledge its route.
    pub fn route_settled(&self, us: u64) {
        self.route_settle.record(us);
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// The cluster families: per peer (names are few and chosen by the operator, so they
    /// make a bounded label), and the route-settle time.
    fn render_cluster(&self, g: &Gauges) {
        let Some(cluster) = &g.cluster else { return };
        let is_up = |p: &raftmq_cluster::mesh::NodeView| p.status == raftmq_cluster::mesh::PeerStatus::Up;
        let up = cluster.peers.iter().filter(|p| is_up(p)).count() + 1;
        self.gauge("raftmq_cluster_nodes", &[("status", "up")]).set(up as f64);
        self.gauge("raftmq_cluster_nodes", &[("status", "down")]).set((cluster.peers.len() + 1 - up) as f64);
        for p in &cluster.peers {
            let gauge = |name| self.recorder.register_gauge(&peer_key(name, &p.name), &META);
            let counter = |name| self.recorder.register_counter(&peer_key(name, &p.name), &META);
            gauge("raftmq_cluster_peer_up").set(if is_up(p) { 1.0 } else { 0.0 });
            gauge("raftmq_cluster_peer_routes").set(p.routes as f64);
            gauge("raftmq_cluster_forward_queue").set(p.forward_queue as f64);
            counter("raftmq_cluster_forwarded_messages_total").absolute(p.forwarded);
            counter("raftmq_cluster_forwarded_bytes_total").absolute(p.forwarded_bytes);
            counter("raftmq_cluster_forward_dropped_total").absolute(p.forward_dropped);
        }
        self.counter("raftmq_cluster_undeliverable_total", &[]).absolute(cluster.undeliverable);
        self.counter("raftmq_cluster_redelivered_total", &[]).absolute(cluster.redelivered);
        self.counter("raftmq_cluster_failed_dials_total", &[]).absolute(cluster.failed_dials);
        self.gauge("raftmq_cluster_forward_queue_capacity", &[]).set(cluster.forward_queue_capacity as f64);
    }

    /// The replicated store's group.
    fn render_raft(&self, g: &Gauges) {
        let Some(r) = &g.raft else { return };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        self.gauge("raftmq_raft_term", &[]).set(r.term as f64);
        self.gauge("raftmq_raft_is_leader", &[]).set(flag(r.role == "leader"));
        self.gauge("raftmq_raft_has_leader", &[]).set(flag(r.leader.is_some()));
        self.gauge("raftmq_raft_voters", &[]).set(r.voters.len() as f64);
        self.gauge("raftmq_raft_last_log_index", &[]).set(r.last_log_index as f64);
        self.gauge("raftmq_raft_commit_index", &[]).set(r.committed_index as f64);
        self.gauge("raftmq_raft_applied_index", &[]).set(r.applied_index as f64);
        self.gauge("raftmq_raft_apply_lag", &[]).set(r.last_log_index.saturating_sub(r.applied_index) as f64);
        self.gauge("raftmq_raft_log_entries", &[]).set(r.log_entries as f64);
        self.gauge("raftmq_raft_snapshot_index", &[]).set(r.snapshot_index as f64);
        self.counter("raftmq_raft_snapshots_total", &[]).absolute(r.snapshots);
        self.counter("raftmq_raft_proposals_total", &[]).absolute(r.proposals);
        self.counter("raftmq_raft_proposed_operations_total", &[]).absolute(r.proposed_ops);
        self.counter("raftmq_raft_proposal_errors_total", &[]).absolute(r.proposal_errors);
    }

    /// Copies the broker's counters and gauges into the recorder and renders the text
    /// exposition.
    pub fn render(&self, s: &Stats, g: &Gauges) -> String {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let loadz = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
        self.gauge("raftmq_build_info", &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
        self.gauge("raftmq_uptime_seconds", &[]).set(self.started.elapsed().as_secs_f64());
        self.gauge("raftmq_connections", &[]).set(loadz(&s.connections));
        self.gauge("raftmq_connections_max", &[]).set(loadz(&s.connections_max));
        let sessions = &g.sessions;
        self.gauge("raftmq_sessions", &[]).set(sessions.sessions as f64);
        self.gauge("raftmq_sessions_persistent", &[]).set(sessions.persistent as f64);
        self.gauge("raftmq_queued_messages", &[]).set(sessions.queued as f64);
        self.gauge("raftmq_inflight_messages", &[]).set(sessions.inflight as f64);
        self.gauge("raftmq_subscriptions", &[]).set(g.subscriptions as f64);
        self.gauge("raftmq_subscriptions_shared", &[]).set(g.shared_subscriptions as f64);
        self.gauge("raftmq_routes", &[]).set(g.routes as f64);
        self.gauge("raftmq_retained_messages", &[]).set(g.retained_messages as f64);
        self.gauge("raftmq_retained_bytes", &[]).set(g.retained_bytes as f64);
        for (i, qos) in ["0", "1", "2"].iter().enumerate() {
            self.counter("raftmq_messages_received_total", &[("qos", qos)]).absolute(load(&s.received_by_qos[i]));
            self.counter("raftmq_messages_sent_total", &[("qos", qos)]).absolute(load(&s.sent_by_qos[i]));
        }
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            self.counter("raftmq_messages_dropped_total", &[("reason", reason.label())]).absolute(load(&s.dropped_by_reason[i]));
        }
        self.counter("raftmq_bytes_received_total", &[]).absolute(load(&s.bytes_received));
        self.counter("raftmq_bytes_sent_total", &[]).absolute(load(&s.bytes_sent));
        for (i, name) in PACKET_TYPES.iter().enumerate().skip(1) {
            self.counter("raftmq_packets_received_total", &[("type", name)]).absolute(load(&s.packets_received[i]));
            self.counter("raftmq_packets_sent_total", &[("type", name)]).absolute(load(&s.packets_sent[i]));
        }
        for (i, result) in ConnectResult::ALL.iter().enumerate() {
            self.counter("raftmq_connects_total", &[("result", result.label())]).absolute(load(&s.connects[i]));
        }
        self.counter("raftmq_authentication_failures_total", &[]).absolute(load(&s.auth_failures));
        self.counter("raftmq_acl_checks_total", &[("result", "allow")]).absolute(load(&s.acl_allowed));
        self.counter("raftmq_acl_checks_total", &[("result", "deny")]).absolute(load(&s.acl_denied));
        self.counter("raftmq_wills_published_total", &[]).absolute(load(&s.wills_published));
        self.counter("raftmq_takeovers_total", &[]).absolute(load(&s.takeovers));
        self.counter("raftmq_sessions_adopted_total", &[]).absolute(load(&s.adopted));
        self.counter("raftmq_session_journal_lost_total", &[]).absolute(g.journal_lost);
        self.render_cluster(g);
        self.render_raft(g);
        for (i, reason) in STORE_ERRORS.iter().enumerate() {
            self.counter("raftmq_store_errors_total", &[("reason", reason)]).absolute(load(&s.store_errors[i]));
        }
        for (i, counter) in s.protocol_errors.0.iter().enumerate() {
            let n = load(counter);
            if let (true, Some(label)) = (n > 0, REASON_LABELS.get(i)) {
                self.counter("raftmq_protocol_errors_total", &[("reason", label.as_str())]).absolute(n);
            }
        }
        let mut text = self.handle.render();
        render_histogram(&self.latency, LATENCY, &mut text);
        if g.cluster.is_some() {
            render_histogram(&self.route_settle, ROUTE_SETTLE, &mut text);
        }
        if let Some(r) = &g.raft {
            render_buckets(r.proposal_latency, PROPOSAL_LATENCY, &mut text);
            render_buckets(r.snapshot_build, SNAPSHOT_BUILD, &mut text);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = Histogram::default();
        for us in [10, 50, 51, 2_000_000, 9_000_000] {
            h.record(us);
        }
        let mut text = String::new();
        render_histogram(&h, LATENCY, &mut text);
        assert!(text.contains("raftmq_delivery_latency_seconds_bucket{le=\"0.00005\"} 2\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_bucket{le=\"0.0001\"} 3\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_bucket{le=\"5\"} 4\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_sum 11.000111\n"), "{text}");
        assert!(text.contains("raftmq_delivery_latency_seconds_count 5\n"), "{text}");
    }
}
