//! Packets from the client: acknowledgements, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, AUTH and
//! DISCONNECT.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmq_cluster::message::{Message, QoS};
use raftmq_cluster::routes::ForwardReceipt;
use raftmq_cluster::session::{InflightStage, QueuedMessage};
use raftmq_cluster::topic::{self, TopicError};
use raftmq_cluster::StoreError;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::broker::{Broker, EndKind};
use crate::codec::{
    self, reason, Auth, DecodeError, Packet, Properties, PubKind, PubResponse, Publish, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::config::{DenyAction, RateAction};
use crate::routing::shared;
use crate::security::acl::Access;
use crate::session::{Ack, Durability, SessionSlot};
use crate::telemetry::printable::Printable;
use crate::telemetry::stats::DropReason;

use super::client::Client;
use super::framed::Framed;
use super::handshake::authenticate;
use super::{violation, ConnectionError, Handled};

/// Longest a PUBLISH that matches nothing waits for other connections' packets.
pub(super) const LAND_MAX: Duration = Duration::from_millis(1);

/// How long it waits at least: about the time it takes a parked worker thread to wake up
/// and start handling a socket that became readable before this one.
pub(super) const LAND_MIN: Duration = Duration::from_micros(100);

/// Gives a SUBSCRIBE that reached the broker before this PUBLISH the chance to take effect
/// first. Sockets that become readable together are handled by tasks in no set order (and
/// on two cores in parallel), so a client that sends SUBSCRIBE and then has another client
/// publish could miss the message (83 of 200 did here; Mosquitto, single-threaded, none).
/// No rule requires the order, but request/response clients and test suites assume it.
///
/// So a PUBLISH that matches nothing yields, letting tasks woken before it run, for at
/// least [`LAND_MIN`] and, while other connections are handling packets they have read
/// ([`Broker::handling`]) and still nothing matches, at most [`LAND_MAX`]; then it routes
/// as usual. Only the first PUBLISH of each read pays it. Those waits yield rather than
/// sleep (a timer has millisecond granularity), so they are rationed by
/// `Broker::land_budget`: a fleet publishing into the void at a high rate gets a single
/// yield per publish once the budget of the second is spent, and the CPU the waits take
/// stays a few percent of a core.
pub(super) async fn let_earlier_packets_land(broker: &Broker, message: &Arc<Message>) {
    if !broker.matches_nothing(message) {
        return;
    }
    if !broker.take_land_budget() {
        tokio::task::yield_now().await;
        return;
    }
    let started = Instant::now();
    loop {
        tokio::task::yield_now().await;
        // This connection counts itself.
        let waited = started.elapsed();
        let others_busy = broker.handling.load(Ordering::Acquire) > 1;
        if (!others_busy && waited >= LAND_MIN) || waited >= LAND_MAX || !broker.matches_nothing(message) {
            return;
        }
    }
}

/// Handles the packets that need no waiting (acknowledgements, PINGREQ, DISCONNECT and
/// protocol errors) without allocating a future; hands the others back.
pub(super) fn handle_quick<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
    packet: Packet,
) -> Result<Handled, ConnectionError> {
    let v5 = client.protocol.is_v5();
    match packet {
        Packet::PubResponse(r) => {
            if v5 && !codec::reason::client_may_send(r.kind, r.reason) {
                return Err(ConnectionError::Decode(DecodeError::Malformed("invalid reason code in acknowledgement")));
            }
            let failed = v5 && r.reason >= 0x80;
            match r.kind {
                PubKind::PubAck => {
                    let (ack, origin) = slot.complete(r.packet_id, InflightStage::Published);
                    if ack == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBACK for a QoS 2 message"));
                    }
                    if let Some(origin) = origin {
                        broker.settled(origin);
                    }
                }
                PubKind::PubRec => {
                    let (ack, origin, durability) = slot.received(r.packet_id, failed);
                    if let Some(origin) = origin {
                        broker.settled(origin);
                    }
                    if ack == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBREC for a QoS 1 message"));
                    }
                    let known = ack == Ack::Known;
                    if known && !failed && !matches!(durability, Durability::Memory) {
                        // Sent once the stage is stored (after this read's packets).
                        client.pending_rel.push((r.packet_id, durability));
                    } else if known && !failed {
                        framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, r.packet_id, 0)));
                    } else if !known && v5 {
                        framed.send(&client.ack(
                            PubKind::PubRel,
                            r.packet_id,
                            reason::PACKET_IDENTIFIER_NOT_FOUND,
                            "unknown packet identifier",
                        ));
                    }
                }
                PubKind::PubComp => {
                    if slot.complete(r.packet_id, InflightStage::Released).0 == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBCOMP for a message not released"));
                    }
                }
                PubKind::PubRel => {
                    let known = slot.inbound_released(r.packet_id);
                    let code = if known || !v5 { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
                    framed.send(&client.ack(PubKind::PubComp, r.packet_id, code, "unknown packet identifier"));
                }
            }
        }
        Packet::PingReq => {
            framed.send(&Packet::PingResp);
        }
        Packet::Disconnect(d) => {
            if v5 && !codec::reason::client_may_disconnect_with(d.reason) {
                // Not a normal disconnect: the will is published.
                return Err(ConnectionError::Decode(DecodeError::Malformed("invalid DISCONNECT reason code")));
            }
            if let Some(new_expiry) = d.properties.session_expiry_interval {
                if client.connect_expiry == 0 && new_expiry != 0 {
                    // [MQTT-3.14.2-2]
                    return Err(violation(reason::PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 in CONNECT"));
                }
                let expiry = new_expiry.min(broker.config.mqtt.max_session_expiry_secs);
                slot.set_expiry(expiry);
            }
            return Ok(Handled::End(if d.reason == reason::DISCONNECT_WITH_WILL { EndKind::PublishWill } else { EndKind::Normal }));
        }
        Packet::Connect(_) => return Err(violation(reason::PROTOCOL_ERROR, "second CONNECT")),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            return Err(violation(reason::PROTOCOL_ERROR, "server-to-client packet sent by a client"));
        }
        other @ (Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::Auth(_)) => return Ok(Handled::Async(other)),
    }
    Ok(Handled::Done)
}

/// Handles the packets whose handling may wait: PUBLISH (a durable store, a rate limit),
/// SUBSCRIBE (retained messages), UNSUBSCRIBE and AUTH.
pub(super) async fn handle_packet<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
    packet: Packet,
) -> Result<(), ConnectionError> {
    match packet {
        Packet::Publish(p) => handle_publish(broker, slot, client, framed, p).await,
        Packet::Subscribe(s) => handle_subscribe(broker, slot, client, framed, s).await,
        Packet::Unsubscribe(u) => handle_unsubscribe(broker, slot, client, framed, u).await,
        Packet::Auth(a) => reauthenticate(broker, client, framed, a).await,
        // `handle_quick` answers every other packet and never hands one over.
        _ => Ok(()),
    }
}

pub(super) async fn handle_publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
    p: Publish,
) -> Result<(), ConnectionError> {
    let cfg = &broker.config.mqtt;
    let v5 = client.protocol.is_v5();
    broker.stats.received_by_qos[p.qos as usize].fetch_add(1, Ordering::Relaxed);
    if let Some(limiter) = client.rate.as_mut() {
        if let Some(wait) = limiter.take() {
            match cfg.publish_rate_action {
                // Not reading while we wait is the backpressure: TCP pushes back on the client.
                RateAction::Throttle => tokio::time::sleep(wait).await,
                RateAction::Disconnect => return Err(violation(reason::MESSAGE_RATE_TOO_HIGH, "publish rate above the limit")),
            }
        }
    }
    let mut p = p;
    if let Some(alias) = p.properties.topic_alias {
        // [MQTT-3.3.2-7], [MQTT-3.3.2-8]: 0 and values above our Topic Alias Maximum are invalid.
        if alias == 0 || alias > cfg.max_topic_alias {
            return Err(violation(reason::TOPIC_ALIAS_INVALID, "topic alias out of range"));
        }
        if p.topic.is_empty() {
            match client.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                Some(t) => p.topic = t.clone(),
                None => return Err(violation(reason::PROTOCOL_ERROR, "unknown topic alias")),
            }
        } else {
            topic::validate_topic_name(&p.topic, cfg.max_topic_levels)
                .map_err(|_| violation(reason::TOPIC_NAME_INVALID, "invalid topic name"))?;
            client.aliases.get_or_insert_default().inbound.insert(alias, p.topic.clone());
        }
    }
    if !p.properties.subscription_identifiers.is_empty() {
        return Err(violation(reason::PROTOCOL_ERROR, "subscription identifier in client PUBLISH"));
    }
    if p.properties.response_topic.as_deref().is_some_and(|t| topic::validate_topic_name(t, cfg.max_topic_levels).is_err()) {
        return Err(violation(reason::PROTOCOL_ERROR, "invalid response topic"));
    }
    match topic::validate_topic_name(&p.topic, cfg.max_topic_levels) {
        Ok(()) => {}
        Err(TopicError::Empty) => return Err(violation(reason::PROTOCOL_ERROR, "empty topic without topic alias")),
        Err(_) => return Err(violation(reason::TOPIC_NAME_INVALID, "invalid topic name")),
    }
    if p.retain && !broker.config.retained.enabled {
        return Err(violation(reason::RETAIN_NOT_SUPPORTED, "retain not supported"));
    }
    let ack_kind = match p.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(PubKind::PubAck),
        QoS::ExactlyOnce => Some(PubKind::PubRec),
    };
    if p.qos == QoS::ExactlyOnce {
        let (awaited, awaiting) = slot.inbound_pending(p.packet_id);
        if awaited {
            // A re-sent QoS 2 PUBLISH: acknowledge again, never deliver twice [MQTT-4.3.3-10].
            framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, p.packet_id, 0)));
            return Ok(());
        }
        let limit = if v5 { usize::from(cfg.receive_maximum) } else { cfg.max_awaiting_rel };
        if awaiting >= limit {
            // B21, B23: more QoS 2 messages in flight than allowed.
            return Err(violation(reason::RECEIVE_MAXIMUM_EXCEEDED, "too many QoS 2 messages awaiting PUBREL"));
        }
    }
    if p.topic.starts_with("$SYS") {
        // Clients never publish to $SYS; the message is dropped.
        broker.stats.drop(DropReason::NotAuthorized, 1);
        if let (Some(kind), true) = (ack_kind, v5) {
            framed.send(&client.ack(kind, p.packet_id, reason::NOT_AUTHORIZED, "clients may not publish to $SYS"));
        } else if let Some(kind) = ack_kind {
            framed.send(&Packet::PubResponse(PubResponse::new(kind, p.packet_id, 0)));
            if kind == PubKind::PubRec {
                // Dropped anyway: a re-sent copy is dropped the same way.
                let _ = slot.inbound_received(p.packet_id);
            }
        }
        return Ok(());
    }
    if !client.allowed(broker, Access::Publish, &p.topic) {
        if broker.config.acl.deny_action == DenyAction::Disconnect {
            return Err(violation(reason::NOT_AUTHORIZED, "publish not authorized"));
        }
        broker.stats.drop(DropReason::NotAuthorized, 1);
        if let Some(kind) = ack_kind {
            // MQTT 3 has no way to say no: the handshake completes and the message is dropped.
            let code = if v5 { reason::NOT_AUTHORIZED } else { 0 };
            framed.send(&client.ack(kind, p.packet_id, code, "publish not authorized"));
            if kind == PubKind::PubRec && code == 0 {
                let _ = slot.inbound_received(p.packet_id);
            }
        }
        return Ok(());
    }
    if v5 && p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
        if let Some(kind) = ack_kind {
            framed.send(&client.ack(kind, p.packet_id, reason::PAYLOAD_FORMAT_INVALID, "payload is not valid UTF-8"));
            return Ok(());
        }
        return Err(violation(reason::PAYLOAD_FORMAT_INVALID, "payload is not UTF-8"));
    }
    let properties = p.properties.application();
    let message = Arc::new(Message::new(p.topic, p.payload, p.qos, p.retain, client.client_id.to_string()).with_properties(properties));
    if std::mem::take(&mut client.may_yield) {
        Box::pin(let_earlier_packets_land(broker, &message)).await;
    }
    let (routed, receipt, durable) = match broker.publish_routed(&message).await {
        Ok(r) => r,
        Err(e) => return refuse_publish(broker, client, framed, ack_kind, p.packet_id, e),
    };
    if routed.congested.is_some() && cfg.publish_backpressure_ms > 0 {
        client.congested = routed.congested;
    }
    if routed.matched == 0 {
        broker.stats.drop(DropReason::NoSubscribers, 1);
    }
    let Some(kind) = ack_kind else {
        // QoS 0: nothing to confirm; copies that could not be queued are counted.
        broker.stats.drop(DropReason::ForwardFailed, receipt.failed as u64);
        return Ok(());
    };
    // Exactly once from here on, even before the PUBREC goes out [MQTT-4.3.3-10]; a
    // persistent session's PUBREC waits until the id is recorded in the store, which
    // happens once the copies are stored (`finish_ack`).
    let record = kind == PubKind::PubRec && slot.inbound_accepted(p.packet_id);
    let ack = PendingAck { kind, packet_id: p.packet_id, qos: p.qos, matched: routed.matched, receipt, durable, record };
    if ack.receipt.is_settled() && ack.durable.is_empty() && !ack.record && client.deferred.is_empty() {
        // Nothing to wait for (the common case): answered at once, with no await that
        // would grow every PUBLISH's future.
        let failed = ack.receipt.failed;
        return answer(broker, slot, client, framed, &ack, broker.confirmed(ack.qos, failed));
    }
    // Waiting for other nodes: the acknowledgement goes out, in order, once every PUBLISH
    // of this read was handled, so a burst waits for one round trip, not one each.
    client.deferred.push(ack);
    if client.deferred.len() >= MAX_DEFERRED {
        settle_deferred(broker, slot, client, framed).await?;
    }
    Ok(())
}

/// Sends the PUBRELs whose QoS 2 stage change is now in the store, in order.
pub(super) async fn send_recorded_pubrels<S: AsyncRead + AsyncWrite + Unpin + Send>(
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
) -> Result<(), ConnectionError> {
    for (packet_id, durability) in std::mem::take(&mut client.pending_rel) {
        slot.stored_here(durability).await?;
        framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, packet_id, 0)));
    }
    Ok(())
}

/// Acknowledgements waiting for other nodes at most, per connection.
const MAX_DEFERRED: usize = 256;

/// A PUBLISH's acknowledgement waiting for the copies sent to other nodes.
pub(super) struct PendingAck {
    kind: PubKind,
    packet_id: u16,
    qos: QoS,
    matched: usize,
    receipt: ForwardReceipt,
    /// The local persistent subscribers' appends on their way to the store.
    durable: crate::broker::Durable,
    /// A QoS 2 packet id to record in the store once the copies are stored.
    record: bool,
}

/// Sends the acknowledgements waiting for other nodes, in the order the PUBLISHes came
/// [MQTT-4.6.0-2].
pub(super) async fn settle_deferred<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
) -> Result<(), ConnectionError> {
    for ack in std::mem::take(&mut client.deferred) {
        finish_ack(broker, slot, client, framed, ack).await?;
    }
    Ok(())
}

async fn finish_ack<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
    mut ack: PendingAck,
) -> Result<(), ConnectionError> {
    let stored = std::mem::take(&mut ack.durable).wait().await;
    let failed = std::mem::take(&mut ack.receipt).wait().await;
    let mut confirmed = stored.and_then(|()| broker.confirmed(ack.qos, failed));
    if confirmed.is_ok() && ack.record {
        // Only now: the id says "delivered" once the copies are stored, never before.
        confirmed = slot.stored(slot.inbound_record(ack.packet_id)).await;
    }
    answer(broker, slot, client, framed, &ack, confirmed)
}

/// Sends the acknowledgement of a PUBLISH whose copies for other nodes are accounted for.
fn answer<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &Client,
    framed: &mut Framed<S>,
    ack: &PendingAck,
    confirmed: Result<(), StoreError>,
) -> Result<(), ConnectionError> {
    if let Err(e) = confirmed {
        if ack.kind == PubKind::PubRec {
            slot.inbound_released(ack.packet_id);
        }
        return refuse_publish(broker, client, framed, Some(ack.kind), ack.packet_id, e);
    }
    let code = if client.protocol.is_v5() && ack.matched == 0 { reason::NO_MATCHING_SUBSCRIBERS } else { 0 };
    framed.send(&Packet::PubResponse(PubResponse::new(ack.kind, ack.packet_id, code)));
    Ok(())
}

/// A PUBLISH that was not stored or delivered is never acknowledged as if it were: MQTT 5
/// gets 0x80 and may retry; MQTT 3 has no way to say no but closing.
fn refuse_publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Broker,
    client: &Client,
    framed: &mut Framed<S>,
    ack_kind: Option<PubKind>,
    packet_id: u16,
    e: StoreError,
) -> Result<(), ConnectionError> {
    broker.stats.store_error(&e);
    tracing::debug!(client_id = %Printable(&client.client_id), error = %e, "publish not stored");
    match ack_kind {
        Some(kind) if client.protocol.is_v5() => {
            framed.send(&client.ack(kind, packet_id, reason::UNSPECIFIED_ERROR, "message could not be stored"));
            Ok(())
        }
        Some(_) => Err(e.into()),
        None => Ok(()),
    }
}

pub(super) async fn handle_subscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &Client,
    framed: &mut Framed<S>,
    s: Subscribe,
) -> Result<(), ConnectionError> {
    let cfg = &broker.config.mqtt;
    let v5 = client.protocol.is_v5();
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut retained = Vec::new();
    let mut synced = false;
    for (filter, opts) in s.filters {
        let failure = |v5_code: u8| if v5 { v5_code } else { 0x80 };
        let (is_shared, inner_filter) = match shared::parse(&filter) {
            Ok(Some((_, inner))) => (true, inner),
            Ok(None) => (false, filter.as_str()),
            Err(_) => {
                codes.push(failure(reason::TOPIC_FILTER_INVALID));
                continue;
            }
        };
        if is_shared && opts.no_local {
            // [MQTT-3.8.3-4]
            return Err(violation(reason::PROTOCOL_ERROR, "No Local on a shared subscription"));
        }
        if topic::validate_topic_filter(inner_filter, cfg.max_topic_levels).is_err() {
            codes.push(failure(reason::TOPIC_FILTER_INVALID));
            continue;
        }
        if !client.allowed(broker, Access::Subscribe, inner_filter) {
            codes.push(failure(reason::NOT_AUTHORIZED));
            continue;
        }
        if slot.subscriptions_full(&filter, cfg.max_subscriptions) {
            codes.push(failure(reason::QUOTA_EXCEEDED));
            continue;
        }
        let existed = match broker.subscribe(slot, &filter, opts).await {
            Ok(existed) => existed,
            Err(e) => {
                // The subscription was not stored: refused, the connection goes on.
                broker.stats.store_error(&e);
                codes.push(failure(reason::UNSPECIFIED_ERROR));
                continue;
            }
        };
        codes.push(opts.qos as u8);
        // Retained messages for a new subscription; a repeated SUBSCRIBE counts as new
        // unless Retain Handling says otherwise [MQTT-3.3.1-9..11]. Never on a shared
        // subscription [MQTT-4.8.2-..]: the group would get one copy per member.
        if !is_shared && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed)) {
            if !synced {
                // A retained message acknowledged on another node before this SUBSCRIBE:
                // this node applies every entry it knows committed first (once per packet,
                // no round trip; the leader tells its followers of each commit at once).
                synced = true;
                Box::pin(broker.catch_up_with_cluster()).await;
            }
            for m in broker.retained_matching(&filter) {
                retained.push(QueuedMessage {
                    qos: m.qos.min(opts.qos),
                    retain: true,
                    subscription_ids: opts.subscription_identifier.into_iter().collect(),
                    shared: None,
                    message: m,
                    seq: 0,
                    origin: None,
                });
            }
        }
    }
    let properties =
        if codes.iter().any(|c| *c >= 0x80) { client.problem("one or more subscriptions refused") } else { Properties::default() };
    framed.send(&Packet::SubAck(SubAck { packet_id: s.packet_id, properties, codes }));
    if !retained.is_empty() {
        // Every matching retained message is delivered, paced by the client's inflight
        // window, not pushed through the bounded session queue; the pending list is
        // bounded by the retained store's own cap.
        let over = slot.add_retained(retained, broker.config.retained.max_messages);
        broker.stats.drop(DropReason::QueueFull, over as u64);
    }
    Ok(())
}

pub(super) async fn handle_unsubscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &Client,
    framed: &mut Framed<S>,
    u: Unsubscribe,
) -> Result<(), ConnectionError> {
    let mut codes = Vec::with_capacity(u.filters.len());
    let max_levels = broker.config.mqtt.max_topic_levels;
    for filter in u.filters {
        if shared::topic_filter(&filter).is_none_or(|f| topic::validate_topic_filter(f, max_levels).is_err()) {
            // [MQTT-4.7.3-1], [MQTT-4.8.2-2]: an empty or ill-formed filter. MQTT 3 has no
            // way to say so but closing.
            if !client.protocol.is_v5() {
                return Err(violation(reason::PROTOCOL_ERROR, "invalid topic filter in UNSUBSCRIBE"));
            }
            codes.push(reason::TOPIC_FILTER_INVALID);
            continue;
        }
        let existed = match broker.unsubscribe(slot, &filter).await {
            Ok(existed) => existed,
            Err(e) if client.protocol.is_v5() => {
                broker.stats.store_error(&e);
                codes.push(reason::UNSPECIFIED_ERROR);
                continue;
            }
            Err(e) => {
                broker.stats.store_error(&e);
                return Err(e.into());
            }
        };
        codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
    }
    if !client.protocol.is_v5() {
        codes.clear();
    }
    framed.send(&Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, properties: Properties::default(), codes }));
    Ok(())
}

/// MQTT 5 re-authentication [MQTT-4.12.1-..]: AUTH 0x19 with the method of CONNECT runs a
/// new exchange; success answers AUTH 0x00, failure ends the connection.
pub(super) async fn reauthenticate<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    client: &Client,
    framed: &mut Framed<S>,
    first: Auth,
) -> Result<(), ConnectionError> {
    let Some(method) = client.auth_method.as_deref() else {
        return Err(violation(reason::PROTOCOL_ERROR, "AUTH without an authentication method"));
    };
    if first.reason != reason::RE_AUTHENTICATE {
        return Err(violation(reason::PROTOCOL_ERROR, "AUTH outside an exchange"));
    }
    if first.properties.authentication_method.as_deref() != Some(method) {
        return Err(violation(reason::PROTOCOL_ERROR, "re-authentication with another method"));
    }
    match authenticate(broker, framed, &client.client_id, method, first.properties.authentication_data).await {
        Ok(data) => {
            let mut done = Auth::default();
            done.properties.authentication_method = Some(method.to_owned());
            done.properties.authentication_data = data;
            framed.send(&Packet::Auth(done));
            Ok(())
        }
        Err((code, what)) => Err(violation(code, what)),
    }
}
