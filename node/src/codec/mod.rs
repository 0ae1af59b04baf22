//! The MQTT wire format (3.1, 3.1.1 and 5.0): an IO-free, two-phase codec.
//!
//! [`decode`] first checks that the fixed header and Remaining Length are complete and that
//! the packet fits the size limit, and only then splits the packet off the read buffer. An
//! incomplete packet is `Ok(None)`, never an error, and nothing is allocated for a packet
//! that will be refused. Encoders write straight into the connection's output buffer.
//!
//! Architecture invariant: no function here panics on any input.

mod connect;
mod control;
mod properties;
mod publish;
mod subscribe;
pub mod wire;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use connect::{ConnAck, Connect, LastWill};
pub use control::{Auth, Disconnect};
pub use properties::{Properties, PropertyContext};
pub use publish::{PubKind, PubResponse, Publish, PublishRef};
pub use subscribe::{SubAck, Subscribe, UnsubAck, Unsubscribe};

use wire::{parse_varint, varint_len, write_varint};

/// Protocol version negotiated by CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// MQTT 3.1 ("MQIsdp", level 3).
    V31,
    /// MQTT 3.1.1 ("MQTT", level 4).
    V311,
    /// MQTT 5.0 ("MQTT", level 5).
    V5,
}

impl Protocol {
    /// True for MQTT 5, which has properties and reason codes everywhere.
    pub fn is_v5(self) -> bool {
        self == Protocol::V5
    }

    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V31 => 3,
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Reason codes of MQTT 5 (§2.4) used by the broker; MQTT 3 CONNACK codes are in
/// [`connack_v3`].
#[allow(missing_docs)]
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NORMAL_DISCONNECTION: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

    /// Whether a client may acknowledge a PUBLISH of `kind` with `code` (§3.4.2.1,
    /// §3.5.2.1, §3.6.2.1, §3.7.2.1); any other code is a malformed packet.
    pub fn client_may_send(kind: super::PubKind, code: u8) -> bool {
        match kind {
            super::PubKind::PubAck | super::PubKind::PubRec => {
                matches!(code, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
            }
            super::PubKind::PubRel | super::PubKind::PubComp => matches!(code, 0x00 | 0x92),
        }
    }

    /// Whether a client may send DISCONNECT with `code` (§3.14.2.1 lists who sends what).
    pub fn client_may_disconnect_with(code: u8) -> bool {
        matches!(code, 0x00 | 0x04 | 0x80..=0x83 | 0x90 | 0x93..=0x99)
    }
}

/// CONNACK return codes of MQTT 3.1 and 3.1.1.
#[allow(missing_docs)]
pub mod connack_v3 {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// Why bytes could not become a packet. Each variant maps to the reason code the spec
/// names for it ([`DecodeError::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Remaining Length over 4 bytes or not minimally encoded [MQTT-1.5.5-1].
    #[error("malformed remaining length")]
    MalformedLength,
    /// The packet is larger than the Maximum Packet Size in force.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Announced size.
        size: usize,
        /// Limit in force.
        max: usize,
    },
    /// The bytes do not follow the packet's grammar.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed bytes that break a protocol rule.
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// A string is not well-formed UTF-8 or contains U+0000.
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// CONNECT names a protocol or level this broker does not speak.
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocol {
        /// Protocol level byte as sent.
        level: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code for this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::ProtocolError(_) => reason::PROTOCOL_ERROR,
            DecodeError::UnsupportedProtocol { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::MalformedLength | DecodeError::Malformed(_) | DecodeError::InvalidUtf8 => reason::MALFORMED_PACKET,
        }
    }
}

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubResponse(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet type number of the fixed header (1-15).
    pub fn kind(&self) -> u8 {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubResponse(r) => match r.kind {
                PubKind::PubAck => 4,
                PubKind::PubRec => 5,
                PubKind::PubRel => 6,
                PubKind::PubComp => 7,
            },
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }

    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "connect",
            Packet::ConnAck(_) => "connack",
            Packet::Publish(_) => "publish",
            Packet::PubResponse(r) => r.kind.name(),
            Packet::Subscribe(_) => "subscribe",
            Packet::SubAck(_) => "suback",
            Packet::Unsubscribe(_) => "unsubscribe",
            Packet::UnsubAck(_) => "unsuback",
            Packet::PingReq => "pingreq",
            Packet::PingResp => "pingresp",
            Packet::Disconnect(_) => "disconnect",
            Packet::Auth(_) => "auth",
        }
    }
}

impl Packet {
    /// The same packet without its Reason String and User Properties, which the sender may
    /// drop to fit the receiver's Maximum Packet Size [MQTT-3.1.2-25] (§3.2.2.3.9 and the
    /// matching rule of every acknowledgement); `None` for packets without such properties.
    pub fn without_diagnostics(&self) -> Option<Packet> {
        let mut slim = self.clone();
        let properties = match &mut slim {
            Packet::ConnAck(p) => &mut p.properties,
            Packet::PubResponse(p) => &mut p.properties,
            Packet::SubAck(p) => &mut p.properties,
            Packet::UnsubAck(p) => &mut p.properties,
            Packet::Disconnect(p) => &mut p.properties,
            Packet::Auth(p) => &mut p.properties,
            _ => return None,
        };
        if properties.reason_string.is_none() && properties.user_properties.is_empty() {
            return None;
        }
        properties.reason_string = None;
        properties.user_properties.clear();
        Some(slim)
    }
}

const CONNECT: u8 = 1;

/// Decodes one packet from the front of `buf`.
///
/// `protocol` is `None` until CONNECT has been accepted; then only CONNECT may arrive, and
/// any other packet type is refused from its first byte. `max_size` bounds the whole packet
/// (fixed header included) and is checked before the body is buffered.
pub fn decode(buf: &mut BytesMut, protocol: Option<Protocol>, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let kind = first >> 4;
    let flags = first & 0x0f;
    if protocol.is_none() && kind != CONNECT {
        return Err(DecodeError::ProtocolError("first packet must be CONNECT"));
    }
    let Some((remaining, len_bytes)) = parse_varint(&buf[1..])? else { return Ok(None) };
    let total = 1 + len_bytes + remaining as usize;
    if total > max_size {
        return Err(DecodeError::PacketTooLarge { size: total, max: max_size });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let mut body = buf.split_to(total).freeze();
    body.advance(1 + len_bytes);
    decode_body(kind, flags, body, protocol).map(Some)
}

/// How many bytes the packet at the front of `buf` needs in total, once its header is known.
pub fn pending_len(buf: &[u8]) -> Option<usize> {
    let rest = buf.get(1..)?;
    let (remaining, len_bytes) = parse_varint(rest).ok().flatten()?;
    Some(1 + len_bytes + remaining as usize)
}

fn expect_flags(flags: u8, want: u8) -> Result<(), DecodeError> {
    if flags != want {
        return Err(DecodeError::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

fn expect_empty(body: &Bytes) -> Result<(), DecodeError> {
    if !body.is_empty() {
        return Err(DecodeError::Malformed("unexpected bytes at end of packet"));
    }
    Ok(())
}

fn decode_body(kind: u8, flags: u8, body: Bytes, protocol: Option<Protocol>) -> Result<Packet, DecodeError> {
    if kind == CONNECT {
        expect_flags(flags, 0)?;
        if protocol.is_some() {
            return Err(DecodeError::ProtocolError("second CONNECT"));
        }
        return Ok(Packet::Connect(Box::new(Connect::read(body)?)));
    }
    let protocol = protocol.unwrap_or(Protocol::V311);
    Ok(match kind {
        2 => {
            expect_flags(flags, 0)?;
            Packet::ConnAck(ConnAck::read(body, protocol)?)
        }
        3 => Packet::Publish(Publish::read(flags, body, protocol)?),
        4..=7 => {
            let kind = match kind {
                4 => PubKind::PubAck,
                5 => PubKind::PubRec,
                6 => PubKind::PubRel,
                _ => PubKind::PubComp,
            };
            expect_flags(flags, if kind == PubKind::PubRel { 2 } else { 0 })?;
            Packet::PubResponse(PubResponse::read(kind, body, protocol)?)
        }
        8 => {
            expect_flags(flags, 2)?;
            Packet::Subscribe(Subscribe::read(body, protocol)?)
        }
        9 => {
            expect_flags(flags, 0)?;
            Packet::SubAck(SubAck::read(body, protocol)?)
        }
        10 => {
            expect_flags(flags, 2)?;
            Packet::Unsubscribe(Unsubscribe::read(body, protocol)?)
        }
        11 => {
            expect_flags(flags, 0)?;
            Packet::UnsubAck(UnsubAck::read(body, protocol)?)
        }
        12 | 13 => {
            expect_flags(flags, 0)?;
            expect_empty(&body)?;
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => {
            expect_flags(flags, 0)?;
            Packet::Disconnect(Disconnect::read(body, protocol)?)
        }
        15 if protocol.is_v5() => {
            expect_flags(flags, 0)?;
            Packet::Auth(Auth::read(body)?)
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    })
}

/// Writes a fixed header and `body` as one packet.
pub(crate) fn write_frame(out: &mut BytesMut, first_byte: u8, body: &[u8]) {
    out.reserve(1 + varint_len(body.len()) + body.len());
    out.put_u8(first_byte);
    write_varint(out, body.len());
    out.put_slice(body);
}

/// Reads the optional MQTT 5 tail "reason code, then properties" shared by the PUBLISH
/// acknowledgements, DISCONNECT and AUTH: both parts may be omitted (reason 0, no properties).
pub(crate) fn read_reason_tail(b: &mut Bytes, ctx: PropertyContext) -> Result<(u8, Properties), DecodeError> {
    let mut reason = 0;
    let mut properties = Properties::default();
    if !b.is_empty() {
        reason = wire::read_u8(b)?;
    }
    if !b.is_empty() {
        properties = Properties::read(b, ctx)?;
    }
    if !b.is_empty() {
        return Err(DecodeError::Malformed("unexpected bytes at end of packet"));
    }
    Ok((reason, properties))
}

/// Writes the shortest form of the reason-and-properties tail.
pub(crate) fn write_reason_tail(body: &mut BytesMut, reason: u8, properties: &Properties) {
    let props = properties.body();
    if reason != 0 || !props.is_empty() {
        body.put_u8(reason);
    }
    if !props.is_empty() {
        Properties::write_body(body, &props);
    }
}

/// Writes "packet identifier, then properties (MQTT 5)", the head of the SUBSCRIBE family.
pub(crate) fn write_id_and_properties(body: &mut BytesMut, packet_id: u16, properties: &Properties, protocol: Protocol) {
    body.put_u16(packet_id);
    if protocol.is_v5() {
        Properties::write_body(body, &properties.body());
    }
}

/// Size of a whole packet with a body of `body_len` bytes.
pub fn frame_len(body_len: usize) -> usize {
    1 + varint_len(body_len) + body_len
}

/// Encodes `packet` for a peer speaking `protocol`.
pub fn encode(packet: &Packet, protocol: Protocol, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => c.write(out),
        Packet::ConnAck(c) => c.write(protocol, out),
        Packet::Publish(p) => p.write(protocol, out),
        Packet::PubResponse(r) => r.write(protocol, out),
        Packet::Subscribe(s) => s.write(protocol, out),
        Packet::SubAck(s) => s.write(protocol, out),
        Packet::Unsubscribe(u) => u.write(protocol, out),
        Packet::UnsubAck(u) => u.write(protocol, out),
        Packet::PingReq => write_frame(out, 0xC0, &[]),
        Packet::PingResp => write_frame(out, 0xD0, &[]),
        Packet::Disconnect(d) => d.write(protocol, out),
        Packet::Auth(a) => a.write(out),
    }
}

#[cfg(test)]
mod tests;
