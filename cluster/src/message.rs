//! An application message as the broker routes and stores it: a PUBLISH without framing.
//!
//! Messages are shared as `Arc<Message>` between subscribers, queues and the retained index,
//! so a fan-out to N subscribers copies no payload.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged, may repeat.
    AtLeastOnce = 1,
    /// Acknowledged in two steps, never repeated.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, `None` for 3 and above.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 properties that travel with a message from publisher to subscribers unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// 0 = unspecified bytes, 1 = UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// Lifetime in seconds counted from [`Message::received_at_ms`].
    pub message_expiry_interval: Option<u32>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Topic for a response (request/response pattern).
    pub response_topic: Option<String>,
    /// Opaque data linking a response to its request.
    pub correlation_data: Option<Bytes>,
    /// User properties in the order the publisher sent them.
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    /// True when no property is set (the common case for MQTT 3 traffic).
    pub fn is_empty(&self) -> bool {
        *self == MessageProperties::default()
    }
}

/// One published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name (never a filter).
    pub topic: String,
    /// Application payload, shared, never copied per subscriber.
    pub payload: Bytes,
    /// QoS the publisher used; delivery uses min(this, granted).
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers.
    pub properties: MessageProperties,
    /// Wall-clock receive time in microseconds since the Unix epoch, set once by the
    /// receiving node: the start of message expiry and of delivery latency.
    pub received_at_us: u64,
    /// Client id of the publisher (No Local, hashing strategies); empty for system messages.
    pub publisher: String,
}

/// Milliseconds since the Unix epoch, the time base of message and session expiry.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Message {
    /// A message received now, without application properties; every publisher (a client's
    /// PUBLISH, a will, `$SYS`, the admin API) builds its message here.
    pub fn new(topic: String, payload: Bytes, qos: QoS, retain: bool, publisher: String) -> Message {
        Message { topic, payload, qos, retain, properties: MessageProperties::default(), received_at_us: now_us(), publisher }
    }

    /// The same message with these application properties.
    pub fn with_properties(mut self, properties: MessageProperties) -> Message {
        self.properties = properties;
        self
    }

    /// Size in bytes counted against queue and retained byte caps.
    pub fn weight(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }

    /// Seconds left before the message expires at `now_ms`: `None` if it never expires,
    /// `Some(0)` once expired.
    pub fn remaining_expiry(&self, now_ms: u64) -> Option<u32> {
        let interval = self.properties.message_expiry_interval?;
        let elapsed = now_ms.saturating_sub(self.received_at_us / 1000) / 1000;
        Some(u32::try_from(u64::from(interval).saturating_sub(elapsed)).unwrap_or(0))
    }

    /// Whether the message must no longer be delivered [MQTT-3.3.2-5].
    pub fn is_expired(&self, now_ms: u64) -> bool {
        match self.properties.message_expiry_interval {
            Some(interval) => now_ms.saturating_sub(self.received_at_us / 1000) >= u64::from(interval) * 1000,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_from_receive_time() {
        let mut m = Message {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
            received_at_us: 10_000_000,
            publisher: String::new(),
        };
        assert_eq!(m.remaining_expiry(20_000), None);
        assert!(!m.is_expired(u64::MAX));
        m.properties.message_expiry_interval = Some(5);
        assert_eq!(m.remaining_expiry(12_500), Some(3));
        assert!(!m.is_expired(14_999));
        assert!(m.is_expired(15_000));
        assert_eq!(m.remaining_expiry(99_000), Some(0));
    }
}
