//! `$SYS` topics: broker information and statistics every `sys.interval_secs`, and client
//! connected/disconnected events, all published by the broker itself.
//!
//! Information and statistics are retained (as Mosquitto does), so a new subscriber sees
//! the latest values at once; client events are not. Clients can never publish to `$SYS/`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftmq_cluster::message::{now_ms, Message, QoS};

use crate::broker::Broker;

/// Runs the periodic `$SYS` publisher until shutdown (nothing when the interval is 0).
pub fn spawn(broker: Arc<Broker>) {
    let interval = broker.config.sys.interval_secs;
    if interval == 0 {
        return;
    }
    let started = Instant::now();
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => publish_all(&broker, started).await,
                _ = broker.shutdown.cancelled() => return,
            }
        }
    });
}

async fn publish_all(broker: &Broker, started: Instant) {
    let node = broker.config.node_name.as_str();
    let stats = &broker.stats;
    let prefix = format!("$SYS/brokers/{node}");
    let values: Vec<(String, String)> = vec![
        ("$SYS/brokers".to_owned(), node.to_owned()),
        (format!("{prefix}/version"), env!("CARGO_PKG_VERSION").to_owned()),
        (format!("{prefix}/sysdescr"), "raftmq MQTT broker".to_owned()),
        (format!("{prefix}/uptime"), started.elapsed().as_secs().to_string()),
        (format!("{prefix}/datetime"), rfc3339(now_ms() / 1000)),
        (format!("{prefix}/stats/connections/count"), stats.connections.load(Ordering::Relaxed).to_string()),
        (format!("{prefix}/stats/connections/max"), stats.connections_max.load(Ordering::Relaxed).to_string()),
        (format!("{prefix}/stats/sessions/count"), broker.session_count().to_string()),
        (format!("{prefix}/stats/subscriptions/count"), broker.subscription_filter_count().to_string()),
        (format!("{prefix}/stats/retained/count"), broker.retained_count().to_string()),
        (format!("{prefix}/metrics/messages/received"), stats.messages_received().to_string()),
        (format!("{prefix}/metrics/messages/sent"), stats.messages_sent().to_string()),
        (format!("{prefix}/metrics/messages/dropped"), stats.messages_dropped().to_string()),
        (format!("{prefix}/metrics/bytes/received"), stats.bytes_received.load(Ordering::Relaxed).to_string()),
        (format!("{prefix}/metrics/bytes/sent"), stats.bytes_sent.load(Ordering::Relaxed).to_string()),
    ];
    for (topic, value) in values {
        publish(broker, topic, Bytes::from(value), true).await;
    }
}

/// Publishes a broker-originated message (QoS 0).
pub async fn publish(broker: &Broker, topic: String, payload: Bytes, retain: bool) {
    let message = Arc::new(Message::new(topic, payload, QoS::AtMostOnce, retain, String::new()));
    if let Err(e) = broker.publish(&message).await {
        tracing::warn!(error = %e, "failed to publish $SYS message");
    }
}

/// Escapes a client id for use as one topic level: `/`, `+`, `#` and `%` are
/// percent-encoded, so no client id can add levels or wildcards.
pub fn topic_level(client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len().min(MAX_ID_LEVEL));
    for c in client_id.chars() {
        match c {
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    if out.len() > MAX_ID_LEVEL {
        // A topic is at most 65,535 bytes, and client ids may be as long (escaping makes
        // them longer): keep the start and tell ids apart by a hash of the whole id. The
        // event's payload carries the full id.
        let mut cut = MAX_ID_LEVEL - 17;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("~{:016x}", raftmq_cluster::stable_hash(client_id.as_bytes())));
    }
    out
}

/// Longest client-id level in a `$SYS` topic.
const MAX_ID_LEVEL: usize = 1024;

/// What happened to a client, for its `$SYS` event.
#[derive(Debug)]
pub enum ClientEvent<'a> {
    /// CONNECT accepted.
    Connected {
        /// User name from CONNECT.
        username: Option<&'a str>,
        /// Peer address.
        address: std::net::SocketAddr,
        /// Protocol level (3, 4 or 5).
        protocol: u8,
        /// Keep alive in force, seconds.
        keep_alive: u16,
        /// Clean Session / Clean Start.
        clean_start: bool,
    },
    /// Connection ended.
    Disconnected {
        /// User name from CONNECT.
        username: Option<&'a str>,
        /// Why, in words.
        reason: &'a str,
    },
}

/// Publishes `$SYS/brokers/<node>/clients/<clientid>/connected|disconnected`.
pub async fn client_event(broker: &Broker, client_id: &str, event: ClientEvent<'_>) {
    if !broker.config.sys.client_events {
        return;
    }
    let ts = now_ms();
    let (kind, payload) = match event {
        ClientEvent::Connected { username, address, protocol, keep_alive, clean_start } => (
            "connected",
            serde_json::json!({
                "clientid": client_id, "username": username, "ipaddress": address.ip().to_string(),
                "port": address.port(), "proto_ver": protocol, "keepalive": keep_alive,
                "clean_start": clean_start, "ts": ts,
            }),
        ),
        ClientEvent::Disconnected { username, reason } => {
            ("disconnected", serde_json::json!({ "clientid": client_id, "username": username, "reason": reason, "ts": ts }))
        }
    };
    let topic = format!("$SYS/brokers/{}/clients/{}/{kind}", broker.config.node_name, topic_level(client_id));
    publish(broker, topic, Bytes::from(payload.to_string()), false).await;
}

/// Publishes `$SYS/brokers/<node>/cluster/nodes/<peer>` (retained): a peer came up or went
/// down as this node sees it.
pub async fn node_event(broker: &Broker, peer: &str, up: bool) {
    let status = if up { "up" } else { "down" };
    let payload = serde_json::json!({ "node": peer, "status": status, "ts": now_ms() });
    let topic = format!("$SYS/brokers/{}/cluster/nodes/{}", broker.config.node_name, topic_level(peer));
    publish(broker, topic, Bytes::from(payload.to_string()), true).await;
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn client_ids_cannot_add_levels_or_wildcards() {
        assert_eq!(topic_level("a/b+c#d%e"), "a%2Fb%2Bc%23d%25e");
    }
}
