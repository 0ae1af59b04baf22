//! MQTT 5 properties (§2.2.2): one struct for every property, checked against the set each
//! packet type allows. Unknown, misplaced or duplicated properties are refused.

use bytes::{BufMut, Bytes, BytesMut};
use raftmq_cluster::message::MessageProperties;

use super::wire::{
    read_binary, read_string, read_u16, read_u32, read_u8, read_varint, varint_len, write_binary, write_string, write_varint,
};
use super::DecodeError;

/// Where a property block appears; each context allows a fixed set of identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    /// CONNECT variable header.
    Connect,
    /// Will properties in the CONNECT payload.
    Will,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PubResponse,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK and UNSUBACK.
    SubResponse,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

/// Every MQTT 5 property; `None`/empty means absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// Several in PUBLISH (server to client), at most one in SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u32 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u32 = 0x02;
    pub const CONTENT_TYPE: u32 = 0x03;
    pub const RESPONSE_TOPIC: u32 = 0x08;
    pub const CORRELATION_DATA: u32 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u32 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u32 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u32 = 0x12;
    pub const SERVER_KEEP_ALIVE: u32 = 0x13;
    pub const AUTHENTICATION_METHOD: u32 = 0x15;
    pub const AUTHENTICATION_DATA: u32 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u32 = 0x17;
    pub const WILL_DELAY_INTERVAL: u32 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u32 = 0x19;
    pub const RESPONSE_INFORMATION: u32 = 0x1A;
    pub const SERVER_REFERENCE: u32 = 0x1C;
    pub const REASON_STRING: u32 = 0x1F;
    pub const RECEIVE_MAXIMUM: u32 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u32 = 0x22;
    pub const TOPIC_ALIAS: u32 = 0x23;
    pub const MAXIMUM_QOS: u32 = 0x24;
    pub const RETAIN_AVAILABLE: u32 = 0x25;
    pub const USER_PROPERTY: u32 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u32 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u32 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u32 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u32 = 0x2A;
}

impl PropertyContext {
    /// Whether property `pid` may appear here (MQTT 5 §2.2.2.2 table).
    pub(crate) fn allows(self, pid: u32) -> bool {
        use id::*;
        use PropertyContext as C;
        match pid {
            PAYLOAD_FORMAT_INDICATOR | MESSAGE_EXPIRY_INTERVAL | CONTENT_TYPE | RESPONSE_TOPIC | CORRELATION_DATA => {
                matches!(self, C::Publish | C::Will)
            }
            SUBSCRIPTION_IDENTIFIER => matches!(self, C::Publish | C::Subscribe),
            SESSION_EXPIRY_INTERVAL => matches!(self, C::Connect | C::ConnAck | C::Disconnect),
            ASSIGNED_CLIENT_IDENTIFIER
            | SERVER_KEEP_ALIVE
            | RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE => self == C::ConnAck,
            AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(self, C::Connect | C::ConnAck | C::Auth),
            REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => self == C::Connect,
            WILL_DELAY_INTERVAL => self == C::Will,
            SERVER_REFERENCE => matches!(self, C::ConnAck | C::Disconnect),
            REASON_STRING => matches!(self, C::ConnAck | C::PubResponse | C::SubResponse | C::Disconnect | C::Auth),
            RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => matches!(self, C::Connect | C::ConnAck),
            TOPIC_ALIAS => self == C::Publish,
            USER_PROPERTY => true,
            _ => false,
        }
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::ProtocolError("duplicate property"));
    }
    *slot = Some(value);
    Ok(())
}

fn read_flag(buf: &mut Bytes) -> Result<u8, DecodeError> {
    let v = read_u8(buf)?;
    if v > 1 {
        return Err(DecodeError::ProtocolError("property value must be 0 or 1"));
    }
    Ok(v)
}

impl Properties {
    /// The application properties a PUBLISH (or a will) carries to its subscribers, the
    /// one mapping from the wire to [`MessageProperties`].
    pub fn application(&self) -> MessageProperties {
        MessageProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: self.message_expiry_interval,
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            user_properties: self.user_properties.clone(),
        }
    }

    /// Sets the application properties of an outgoing PUBLISH, the one mapping back to the
    /// wire (Message Expiry Interval is the time left, set by the caller).
    pub fn set_application(&mut self, p: &MessageProperties) {
        self.payload_format_indicator = p.payload_format_indicator;
        self.content_type.clone_from(&p.content_type);
        self.response_topic.clone_from(&p.response_topic);
        self.correlation_data.clone_from(&p.correlation_data);
        self.user_properties.clone_from(&p.user_properties);
    }
}

impl Properties {
    /// Reads a property block (length + properties) for `ctx`.
    pub fn read(buf: &mut Bytes, ctx: PropertyContext) -> Result<Properties, DecodeError> {
        let len = read_varint(buf)? as usize;
        if buf.len() < len {
            return Err(DecodeError::Malformed("property length exceeds packet"));
        }
        let mut block = buf.split_to(len);
        let mut p = Properties::default();
        while !block.is_empty() {
            let pid = read_varint(&mut block)?;
            if !ctx.allows(pid) {
                return Err(DecodeError::Malformed("property not allowed in this packet"));
            }
            let b = &mut block;
            match pid {
                id::PAYLOAD_FORMAT_INDICATOR => set_once(&mut p.payload_format_indicator, read_flag(b)?)?,
                id::MESSAGE_EXPIRY_INTERVAL => set_once(&mut p.message_expiry_interval, read_u32(b)?)?,
                id::CONTENT_TYPE => set_once(&mut p.content_type, read_string(b)?)?,
                id::RESPONSE_TOPIC => set_once(&mut p.response_topic, read_string(b)?)?,
                id::CORRELATION_DATA => set_once(&mut p.correlation_data, read_binary(b)?)?,
                id::SUBSCRIPTION_IDENTIFIER => {
                    let v = read_varint(b)?;
                    if v == 0 {
                        return Err(DecodeError::ProtocolError("subscription identifier 0"));
                    }
                    if ctx == PropertyContext::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::ProtocolError("duplicate property"));
                    }
                    p.subscription_identifiers.push(v);
                }
                id::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, read_u32(b)?)?,
                id::ASSIGNED_CLIENT_IDENTIFIER => set_once(&mut p.assigned_client_identifier, read_string(b)?)?,
                id::SERVER_KEEP_ALIVE => set_once(&mut p.server_keep_alive, read_u16(b)?)?,
                id::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, read_string(b)?)?,
                id::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, read_binary(b)?)?,
                id::REQUEST_PROBLEM_INFORMATION => set_once(&mut p.request_problem_information, read_flag(b)?)?,
                id::WILL_DELAY_INTERVAL => set_once(&mut p.will_delay_interval, read_u32(b)?)?,
                id::REQUEST_RESPONSE_INFORMATION => set_once(&mut p.request_response_information, read_flag(b)?)?,
                id::RESPONSE_INFORMATION => set_once(&mut p.response_information, read_string(b)?)?,
                id::SERVER_REFERENCE => set_once(&mut p.server_reference, read_string(b)?)?,
                id::REASON_STRING => set_once(&mut p.reason_string, read_string(b)?)?,
                id::RECEIVE_MAXIMUM => {
                    let v = read_u16(b)?;
                    if v == 0 {
                        return Err(DecodeError::ProtocolError("receive maximum 0"));
                    }
                    set_once(&mut p.receive_maximum, v)?
                }
                id::TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, read_u16(b)?)?,
                id::TOPIC_ALIAS => set_once(&mut p.topic_alias, read_u16(b)?)?,
                id::MAXIMUM_QOS => set_once(&mut p.maximum_qos, read_flag(b)?)?,
                id::RETAIN_AVAILABLE => set_once(&mut p.retain_available, read_flag(b)?)?,
                id::USER_PROPERTY => {
                    let k = read_string(b)?;
                    let v = read_string(b)?;
                    p.user_properties.push((k, v));
                }
                id::MAXIMUM_PACKET_SIZE => {
                    let v = read_u32(b)?;
                    if v == 0 {
                        return Err(DecodeError::ProtocolError("maximum packet size 0"));
                    }
                    set_once(&mut p.maximum_packet_size, v)?
                }
                id::WILDCARD_SUBSCRIPTION_AVAILABLE => set_once(&mut p.wildcard_subscription_available, read_flag(b)?)?,
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => set_once(&mut p.subscription_identifier_available, read_flag(b)?)?,
                id::SHARED_SUBSCRIPTION_AVAILABLE => set_once(&mut p.shared_subscription_available, read_flag(b)?)?,
                _ => return Err(DecodeError::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// Encodes the properties (without the length prefix) into a scratch buffer.
    fn encode_body(&self, out: &mut BytesMut) {
        fn u8p(out: &mut BytesMut, pid: u32, v: Option<u8>) {
            if let Some(v) = v {
                write_varint(out, pid as usize);
                out.put_u8(v);
            }
        }
        fn u16p(out: &mut BytesMut, pid: u32, v: Option<u16>) {
            if let Some(v) = v {
                write_varint(out, pid as usize);
                out.put_u16(v);
            }
        }
        fn u32p(out: &mut BytesMut, pid: u32, v: Option<u32>) {
            if let Some(v) = v {
                write_varint(out, pid as usize);
                out.put_u32(v);
            }
        }
        fn strp(out: &mut BytesMut, pid: u32, v: &Option<String>) {
            if let Some(v) = v {
                write_varint(out, pid as usize);
                write_string(out, v);
            }
        }
        fn binp(out: &mut BytesMut, pid: u32, v: &Option<Bytes>) {
            if let Some(v) = v {
                write_varint(out, pid as usize);
                write_binary(out, v);
            }
        }
        u8p(out, id::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        u32p(out, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        strp(out, id::CONTENT_TYPE, &self.content_type);
        strp(out, id::RESPONSE_TOPIC, &self.response_topic);
        binp(out, id::CORRELATION_DATA, &self.correlation_data);
        for sid in &self.subscription_identifiers {
            write_varint(out, id::SUBSCRIPTION_IDENTIFIER as usize);
            write_varint(out, *sid as usize);
        }
        u32p(out, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        strp(out, id::ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        u16p(out, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        strp(out, id::AUTHENTICATION_METHOD, &self.authentication_method);
        binp(out, id::AUTHENTICATION_DATA, &self.authentication_data);
        u8p(out, id::REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        u32p(out, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        u8p(out, id::REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        strp(out, id::RESPONSE_INFORMATION, &self.response_information);
        strp(out, id::SERVER_REFERENCE, &self.server_reference);
        strp(out, id::REASON_STRING, &self.reason_string);
        u16p(out, id::RECEIVE_MAXIMUM, self.receive_maximum);
        u16p(out, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        u16p(out, id::TOPIC_ALIAS, self.topic_alias);
        u8p(out, id::MAXIMUM_QOS, self.maximum_qos);
        u8p(out, id::RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            write_varint(out, id::USER_PROPERTY as usize);
            write_string(out, k);
            write_string(out, v);
        }
        u32p(out, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        u8p(out, id::WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        u8p(out, id::SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        u8p(out, id::SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
    }

    /// Encoded bytes of the properties, length prefix excluded.
    pub fn body(&self) -> BytesMut {
        let mut body = BytesMut::new();
        if *self != Properties::default() {
            self.encode_body(&mut body);
        }
        body
    }

    /// Writes a pre-encoded property body with its length prefix.
    pub fn write_body(out: &mut BytesMut, body: &[u8]) {
        write_varint(out, body.len());
        out.put_slice(body);
    }

    /// Size of the block on the wire, length prefix included.
    pub fn wire_len(body: &[u8]) -> usize {
        varint_len(body.len()) + body.len()
    }
}
