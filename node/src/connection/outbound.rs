//! From session queue to socket: the pump within the inflight window, retained messages
//! for new subscriptions, resends on resume, and waiting for a congested subscriber.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmq_cluster::message::now_us;
use raftmq_cluster::session::{InflightStage, QueuedMessage};
use tokio::io::{AsyncRead, AsyncWrite};

use super::client::Client;
use super::framed::Framed;
use crate::broker::Broker;
use crate::codec::{Packet, Properties, PubKind, PubResponse, PublishRef};
use crate::session::{SessionSlot, Window};
use crate::telemetry::stats::DropReason;

pub(super) fn resend_inflight<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
) {
    let now = now_us();
    slot.for_each_inflight(|id, m| match m.stage {
        InflightStage::Published => {
            encode_delivery(broker, client, framed, &m.queued, id, true, now);
        }
        InflightStage::Released => {
            framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, id, 0)));
        }
    });
}

/// Encodes one delivery; returns false if it exceeds the client's Maximum Packet Size and
/// was discarded instead [MQTT-3.1.2-25]. Uses a topic alias when the client allows them:
/// an alias is only recorded once the packet that defines it is known to fit.
pub(super) fn encode_delivery<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    client: &mut Client,
    framed: &mut Framed<S>,
    item: &QueuedMessage,
    packet_id: u16,
    dup: bool,
    now_us: u64,
) -> bool {
    let m = &item.message;
    let mut props = Properties::default();
    let mut topic = m.topic.as_str();
    let mut new_alias = None;
    if client.protocol.is_v5() {
        props.set_application(&m.properties);
        props.message_expiry_interval = m.remaining_expiry(now_us / 1000);
        props.subscription_identifiers.clone_from(&item.subscription_ids);
        let defined = client.aliases.as_ref().map_or(0, |a| a.outbound.len());
        if let Some(alias) = client.aliases.as_ref().and_then(|a| a.outbound.get(&m.topic)) {
            props.topic_alias = Some(*alias);
            topic = "";
        } else if defined < usize::from(client.client_alias_max) {
            let alias = defined as u16 + 1;
            props.topic_alias = Some(alias);
            new_alias = Some(alias);
        }
    }
    let body = props.body();
    let publish = PublishRef { dup, qos: item.qos, retain: item.retain, topic, packet_id, properties: &body, payload: &m.payload };
    if publish.wire_len(client.protocol) > framed.max_out {
        broker.stats.drop(DropReason::TooLarge, 1);
        return false;
    }
    if let Some(alias) = new_alias {
        client.aliases.get_or_insert_default().outbound.insert(m.topic.clone(), alias);
    }
    publish.write(client.protocol, &mut framed.wbuf);
    let stats = &broker.stats;
    stats.sent_by_qos[item.qos as usize].fetch_add(1, Ordering::Relaxed);
    stats.packets_sent[3].fetch_add(1, Ordering::Relaxed);
    broker.metrics.delivered(m.received_at_us, now_us);
    true
}

/// Moves queued deliveries into the socket buffer within the inflight window, under the
/// same lock that records a received packet (for the keep-alive sweep) and tells whether
/// the connection must close. Returns the reason code to close with.
pub(super) fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
    got_packet: bool,
) -> Option<u8> {
    let partial = !framed.rbuf.is_empty();
    let window = Window {
        size: usize::from(broker.config.mqtt.max_inflight.min(client.receive_maximum)),
        retained_batch: RETAINED_BATCH,
        limits: broker.queue_limits(),
    };
    let now_us = now_us();
    let conn_id = client.conn_id;
    let pumped = slot.pump(conn_id, got_packet, partial, window, |item, packet_id| {
        encode_delivery(broker, client, framed, item, packet_id, false, now_us)
    });
    if pumped.expired > 0 {
        broker.stats.drop(DropReason::Expired, pumped.expired);
    }
    pumped.close
}

/// Most retained messages one pass of [`pump`] writes: a subscription matching thousands
/// goes out in socket-sized steps, not in one huge write buffer.
pub(super) const RETAINED_BATCH: usize = 256;

/// Waits until `slot`'s queue has drained to a quarter, at most `max`, and only while it
/// drains: a subscriber whose queue did not shrink over `slice` is marked
/// stalled, and publishers stop waiting for it (its queue overflows and drops, counted)
/// until it catches up. So a client that never reads cannot throttle anyone.
pub(super) async fn wait_drained(slot: Arc<SessionSlot>, max: Duration, slice: Duration) {
    let started = Instant::now();
    loop {
        let drained = slot.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        let Some(before) = slot.congested_backlog() else { return };
        let left = max.saturating_sub(started.elapsed());
        if left.is_zero() || tokio::time::timeout(slice.min(left), drained).await.is_ok() {
            return;
        }
        if slot.mark_stalled_unless_shrunk(before) {
            return;
        }
    }
}
