//! Conversions between domain messages and the `cluster.proto` wire types, kept at the
//! boundary so neither side leaks into the other.

use raftmq_proto::v1 as pb;

use std::sync::Arc;

use crate::message::{Message, MessageProperties, QoS};
use crate::session::{InflightMessage, InflightStage, QueuedMessage, SessionState, ShareTarget, SubscriptionOptions, WillMessage};

/// Why a wire message could not become a domain message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// QoS outside 0..=2.
    #[error("invalid qos {0}")]
    InvalidQos(u32),
    /// Payload format indicator outside 0..=1.
    #[error("invalid payload format indicator {0}")]
    InvalidPayloadFormat(u32),
    /// A required field is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A number outside its range (packet id, retain handling).
    #[error("{0} out of range")]
    OutOfRange(&'static str),
}

impl From<&Message> for pb::Message {
    fn from(m: &Message) -> Self {
        let p = &m.properties;
        pb::Message {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos as u32,
            retain: m.retain,
            properties: (!p.is_empty()).then(|| pb::MessageProperties {
                payload_format_indicator: p.payload_format_indicator.map(u32::from),
                message_expiry_interval: p.message_expiry_interval,
                content_type: p.content_type.clone(),
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p
                    .user_properties
                    .iter()
                    .map(|(key, value)| pb::UserProperty { key: key.clone(), value: value.clone() })
                    .collect(),
            }),
            received_at_ms: m.received_at_us / 1000,
            publisher: m.publisher.clone(),
        }
    }
}

impl TryFrom<pb::Message> for Message {
    type Error = ConvertError;

    fn try_from(m: pb::Message) -> Result<Self, Self::Error> {
        let qos = u8::try_from(m.qos).ok().and_then(QoS::from_u8).ok_or(ConvertError::InvalidQos(m.qos))?;
        let properties = match m.properties {
            None => MessageProperties::default(),
            Some(p) => MessageProperties {
                payload_format_indicator: match p.payload_format_indicator {
                    None => None,
                    Some(v @ 0..=1) => Some(v as u8),
                    Some(v) => return Err(ConvertError::InvalidPayloadFormat(v)),
                },
                message_expiry_interval: p.message_expiry_interval,
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties.into_iter().map(|u| (u.key, u.value)).collect(),
            },
        };
        Ok(Message {
            topic: m.topic,
            payload: m.payload,
            qos,
            retain: m.retain,
            properties,
            received_at_us: m.received_at_ms.saturating_mul(1000),
            publisher: m.publisher,
        })
    }
}

fn qos(v: u32) -> Result<QoS, ConvertError> {
    u8::try_from(v).ok().and_then(QoS::from_u8).ok_or(ConvertError::InvalidQos(v))
}

/// A subscription as the wire carries it.
pub fn subscription_to_wire(filter: &str, o: &SubscriptionOptions) -> pb::Subscription {
    pb::Subscription {
        filter: filter.to_owned(),
        qos: o.qos as u32,
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: u32::from(o.retain_handling),
        subscription_identifier: o.subscription_identifier,
    }
}

/// A subscription from the wire: its filter and options.
pub fn subscription_from_wire(sub: pb::Subscription) -> Result<(String, SubscriptionOptions), ConvertError> {
    let retain_handling = u8::try_from(sub.retain_handling).ok().filter(|r| *r <= 2).ok_or(ConvertError::OutOfRange("retain handling"))?;
    let options = SubscriptionOptions {
        qos: qos(sub.qos)?,
        no_local: sub.no_local,
        retain_as_published: sub.retain_as_published,
        retain_handling,
        subscription_identifier: sub.subscription_identifier,
    };
    Ok((sub.filter, options))
}

impl From<&WillMessage> for pb::Will {
    fn from(w: &WillMessage) -> Self {
        pb::Will { message: Some(pb::Message::from(&w.message)), delay_secs: w.delay_secs }
    }
}

impl TryFrom<pb::Will> for WillMessage {
    type Error = ConvertError;

    fn try_from(w: pb::Will) -> Result<Self, Self::Error> {
        Ok(WillMessage { message: Message::try_from(w.message.ok_or(ConvertError::Missing("will message"))?)?, delay_secs: w.delay_secs })
    }
}

impl From<&QueuedMessage> for pb::Queued {
    fn from(q: &QueuedMessage) -> Self {
        pb::Queued {
            message: Some(pb::Message::from(q.message.as_ref())),
            qos: q.qos as u32,
            retain: q.retain,
            subscription_ids: q.subscription_ids.clone(),
            share_group: q.shared.as_ref().map(|t| t.group.to_string()).unwrap_or_default(),
            share_filter: q.shared.as_ref().map(|t| t.filter.to_string()).unwrap_or_default(),
            shared: q.shared.is_some(),
            seq: q.seq,
        }
    }
}

impl TryFrom<pb::Queued> for QueuedMessage {
    type Error = ConvertError;

    fn try_from(q: pb::Queued) -> Result<Self, Self::Error> {
        let message = Message::try_from(q.message.ok_or(ConvertError::Missing("message"))?)?;
        Ok(QueuedMessage {
            message: Arc::new(message),
            qos: qos(q.qos)?,
            retain: q.retain,
            subscription_ids: q.subscription_ids,
            shared: q.shared.then(|| Arc::new(ShareTarget { group: Arc::from(q.share_group), filter: Arc::from(q.share_filter) })),
            seq: q.seq,
            // A session that moves is acknowledged for by its new node, as a new delivery.
            origin: None,
        })
    }
}

impl From<&SessionState> for pb::Session {
    fn from(s: &SessionState) -> Self {
        pb::Session {
            client_id: s.client_id.clone(),
            subscriptions: s.subscriptions.iter().map(|(filter, o)| subscription_to_wire(filter, o)).collect(),
            queue: s.queue.iter().map(pb::Queued::from).collect(),
            inflight: s
                .inflight
                .iter()
                .map(|(id, m)| pb::Inflight {
                    packet_id: u32::from(*id),
                    queued: Some(pb::Queued::from(&m.queued)),
                    released: m.stage == InflightStage::Released,
                })
                .collect(),
            awaiting_rel: s.awaiting_rel.iter().map(|id| u32::from(*id)).collect(),
            expiry_secs: s.expiry_secs,
            will: s.will.as_ref().map(pb::Will::from),
            owner: s.owner.clone(),
            epoch: s.epoch,
            disconnected_at_ms: s.disconnected_at_ms,
        }
    }
}

impl TryFrom<pb::Session> for SessionState {
    type Error = ConvertError;

    fn try_from(s: pb::Session) -> Result<Self, Self::Error> {
        let packet_id = |v: u32| u16::try_from(v).ok().filter(|id| *id != 0).ok_or(ConvertError::OutOfRange("packet id"));
        let mut subscriptions = std::collections::BTreeMap::new();
        for sub in s.subscriptions {
            let (filter, options) = subscription_from_wire(sub)?;
            subscriptions.insert(filter, options);
        }
        let mut inflight = std::collections::BTreeMap::new();
        for m in s.inflight {
            let queued = QueuedMessage::try_from(m.queued.ok_or(ConvertError::Missing("inflight message"))?)?;
            let stage = if m.released { InflightStage::Released } else { InflightStage::Published };
            inflight.insert(packet_id(m.packet_id)?, InflightMessage { queued, stage });
        }
        let will = s.will.map(WillMessage::try_from).transpose()?;
        Ok(SessionState {
            client_id: s.client_id,
            subscriptions,
            queue: s.queue.into_iter().map(QueuedMessage::try_from).collect::<Result<_, _>>()?,
            inflight,
            awaiting_rel: s.awaiting_rel.into_iter().map(packet_id).collect::<Result<_, _>>()?,
            expiry_secs: s.expiry_secs,
            will,
            disconnected_at_ms: s.disconnected_at_ms,
            owner: s.owner,
            epoch: s.epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn message_round_trips_through_wire_type() {
        let m = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(30),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            },
            received_at_us: 42_000,
            publisher: "pub".into(),
        };
        let wire = pb::Message::from(&m);
        assert_eq!(Message::try_from(wire).ok(), Some(m));
        let bad = pb::Message { qos: 3, ..Default::default() };
        assert_eq!(Message::try_from(bad).err(), Some(ConvertError::InvalidQos(3)));
    }

    #[test]
    fn session_round_trips_through_wire_type() {
        // Whole milliseconds: the wire carries receive times in ms.
        let at_ms = |m: Message| Message { received_at_us: 5_000, ..m };
        let message = Arc::new(at_ms(Message::new("a/b".into(), Bytes::from_static(b"x"), QoS::ExactlyOnce, false, "p".into())));
        let queued = |seq, shared: bool| QueuedMessage {
            message: Arc::clone(&message),
            qos: QoS::AtLeastOnce,
            retain: true,
            subscription_ids: vec![3, 9],
            shared: shared.then(|| Arc::new(ShareTarget { group: Arc::from("g"), filter: Arc::from("a/#") })),
            seq,
            origin: None,
        };
        let mut s = SessionState {
            client_id: "c".into(),
            awaiting_rel: vec![4, 7],
            expiry_secs: 60,
            will: Some(WillMessage {
                message: at_ms(Message::new("w".into(), Bytes::new(), QoS::AtMostOnce, true, "c".into())),
                delay_secs: 5,
            }),
            disconnected_at_ms: 99,
            owner: Some("alice".into()),
            epoch: 12,
            ..SessionState::default()
        };
        let opts = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2,
            subscription_identifier: Some(5),
        };
        s.subscriptions.insert("a/#".into(), opts);
        s.queue.push_back(queued(1, false));
        s.queue.push_back(queued(2, true));
        s.inflight.insert(10, InflightMessage { queued: queued(3, false), stage: InflightStage::Released });
        let wire = pb::Session::from(&s);
        assert_eq!(SessionState::try_from(wire).ok(), Some(s));
        let bad = pb::Session { awaiting_rel: vec![0], ..Default::default() };
        assert_eq!(SessionState::try_from(bad).err(), Some(ConvertError::OutOfRange("packet id")));
    }
}
