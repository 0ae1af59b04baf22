//! PUBLISH and its four acknowledgements (§3.3-§3.7).

use bytes::{BufMut, Bytes, BytesMut};
use raftmq_cluster::message::QoS;

use super::wire::{read_string, read_u16, varint_len, write_string, write_varint};
use super::{read_reason_tail, write_frame, write_reason_tail, DecodeError, Properties, PropertyContext, Protocol};

/// PUBLISH: an application message in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: this may be a re-delivery.
    pub dup: bool,
    /// QoS of this transfer.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name; empty when an MQTT 5 Topic Alias stands for it.
    pub topic: String,
    /// Packet identifier, 0 for QoS 0.
    pub packet_id: u16,
    /// PUBLISH properties (MQTT 5).
    pub properties: Properties,
    /// Application payload.
    pub payload: Bytes,
}

impl Publish {
    pub(super) fn read(flags: u8, mut b: Bytes, protocol: Protocol) -> Result<Publish, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::Malformed("DUP set on QoS 0 PUBLISH"));
        }
        let topic = read_string(&mut b)?;
        let packet_id = if qos == QoS::AtMostOnce { 0 } else { read_u16(&mut b)? };
        if qos != QoS::AtMostOnce && packet_id == 0 {
            return Err(DecodeError::Malformed("packet identifier 0"));
        }
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::Publish)? } else { Properties::default() };
        Ok(Publish { dup, qos, retain, topic, packet_id, properties, payload: b })
    }

    fn as_ref<'a>(&'a self, props_body: &'a [u8]) -> PublishRef<'a> {
        PublishRef {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            packet_id: self.packet_id,
            properties: props_body,
            payload: &self.payload,
        }
    }

    /// Encoded size of the whole packet, given its encoded property body.
    pub fn wire_len(&self, protocol: Protocol, props_body: &[u8]) -> usize {
        self.as_ref(props_body).wire_len(protocol)
    }

    /// Writes the packet with a pre-encoded property body.
    pub fn write_with(&self, protocol: Protocol, props_body: &[u8], out: &mut BytesMut) {
        self.as_ref(props_body).write(protocol, out);
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let props = if protocol.is_v5() { self.properties.body() } else { BytesMut::new() };
        self.write_with(protocol, &props, out);
    }
}

/// A PUBLISH to encode from borrowed parts, so a delivery to many subscribers copies
/// neither topic nor payload.
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    /// DUP flag.
    pub dup: bool,
    /// QoS of this transfer.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (empty when a topic alias stands for it).
    pub topic: &'a str,
    /// Packet identifier, 0 for QoS 0.
    pub packet_id: u16,
    /// Pre-encoded MQTT 5 property block body.
    pub properties: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

impl PublishRef<'_> {
    fn body_len(&self, protocol: Protocol) -> usize {
        let mut body = 2 + self.topic.len() + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            body += 2;
        }
        if protocol.is_v5() {
            body += Properties::wire_len(self.properties);
        }
        body
    }

    /// Encoded size of the whole packet.
    pub fn wire_len(&self, protocol: Protocol) -> usize {
        let body = self.body_len(protocol);
        1 + varint_len(body) + body
    }

    /// Appends the packet to `out`.
    pub fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let body = self.body_len(protocol);
        out.reserve(1 + varint_len(body) + body);
        let mut first = 0x30 | ((self.qos as u8) << 1);
        if self.dup {
            first |= 0x08;
        }
        if self.retain {
            first |= 0x01;
        }
        out.put_u8(first);
        write_varint(out, body);
        write_string(out, self.topic);
        if self.qos != QoS::AtMostOnce {
            out.put_u16(self.packet_id);
        }
        if protocol.is_v5() {
            Properties::write_body(out, self.properties);
        }
        out.put_slice(self.payload);
    }
}

/// Which acknowledgement a [`PubResponse`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubKind {
    /// QoS 1 acknowledgement.
    PubAck,
    /// QoS 2, step 1.
    PubRec,
    /// QoS 2, step 2.
    PubRel,
    /// QoS 2, step 3.
    PubComp,
}

impl PubKind {
    /// Lower-case packet name.
    pub fn name(self) -> &'static str {
        match self {
            PubKind::PubAck => "puback",
            PubKind::PubRec => "pubrec",
            PubKind::PubRel => "pubrel",
            PubKind::PubComp => "pubcomp",
        }
    }

    fn first_byte(self) -> u8 {
        match self {
            PubKind::PubAck => 0x40,
            PubKind::PubRec => 0x50,
            PubKind::PubRel => 0x62,
            PubKind::PubComp => 0x70,
        }
    }
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResponse {
    /// Which of the four.
    pub kind: PubKind,
    /// Packet identifier of the PUBLISH.
    pub packet_id: u16,
    /// Reason code (MQTT 5; always 0 on 3.x).
    pub reason: u8,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

impl PubResponse {
    /// A response with no properties.
    pub fn new(kind: PubKind, packet_id: u16, reason: u8) -> PubResponse {
        PubResponse { kind, packet_id, reason, properties: Properties::default() }
    }

    pub(super) fn read(kind: PubKind, mut b: Bytes, protocol: Protocol) -> Result<PubResponse, DecodeError> {
        let packet_id = read_u16(&mut b)?;
        if packet_id == 0 {
            return Err(DecodeError::Malformed("packet identifier 0"));
        }
        if !protocol.is_v5() {
            if !b.is_empty() {
                return Err(DecodeError::Malformed("unexpected bytes at end of acknowledgement"));
            }
            return Ok(PubResponse::new(kind, packet_id, 0));
        }
        let (reason, properties) = read_reason_tail(&mut b, PropertyContext::PubResponse)?;
        Ok(PubResponse { kind, packet_id, reason, properties })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::with_capacity(4);
        body.put_u16(self.packet_id);
        if protocol.is_v5() {
            write_reason_tail(&mut body, self.reason, &self.properties);
        }
        write_frame(out, self.kind.first_byte(), &body);
    }
}
