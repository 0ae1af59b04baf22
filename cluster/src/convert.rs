//! Conversions between domain messages and the `cluster.proto` wire types, kept at the
//! boundary so neither side leaks into the other.

use bytes::Bytes;
use raftmq_proto::v1 as pb;

use crate::message::{Message, MessageProperties, QoS};

/// Why a wire message could not become a domain message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// QoS outside 0..=2.
    #[error("invalid qos {0}")]
    InvalidQos(u32),
    /// Payload format indicator outside 0..=1.
    #[error("invalid payload format indicator {0}")]
    InvalidPayloadFormat(u32),
}

impl From<&Message> for pb::Message {
    fn from(m: &Message) -> Self {
        let p = &m.properties;
        pb::Message {
            topic: m.topic.clone(),
            payload: m.payload.to_vec(),
            qos: m.qos as u32,
            retain: m.retain,
            properties: (!p.is_empty()).then(|| pb::MessageProperties {
                payload_format_indicator: p.payload_format_indicator.map(u32::from),
                message_expiry_interval: p.message_expiry_interval,
                content_type: p.content_type.clone(),
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
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
                correlation_data: p.correlation_data.map(Bytes::from),
                user_properties: p.user_properties.into_iter().map(|u| (u.key, u.value)).collect(),
            },
        };
        Ok(Message {
            topic: m.topic,
            payload: Bytes::from(m.payload),
            qos,
            retain: m.retain,
            properties,
            received_at_us: m.received_at_ms.saturating_mul(1000),
            publisher: m.publisher,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
