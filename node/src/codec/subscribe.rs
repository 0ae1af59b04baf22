//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (§3.8-§3.11).

use bytes::{BufMut, Bytes, BytesMut};
use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;

use super::wire::{read_string, read_u16, read_u8, write_string};
use super::{write_frame, write_id_and_properties, DecodeError, Properties, PropertyContext, Protocol};

fn read_packet_id(b: &mut Bytes) -> Result<u16, DecodeError> {
    let id = read_u16(b)?;
    if id == 0 {
        return Err(DecodeError::Malformed("packet identifier 0"));
    }
    Ok(id)
}

/// SUBSCRIBE: one or more filters with their options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// Properties (MQTT 5: Subscription Identifier, User Property).
    pub properties: Properties,
    /// Filters in request order.
    pub filters: Vec<(String, SubscriptionOptions)>,
}

impl Subscribe {
    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<Subscribe, DecodeError> {
        let packet_id = read_packet_id(&mut b)?;
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::Subscribe)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !b.is_empty() {
            let filter = read_string(&mut b)?;
            let opts = read_u8(&mut b)?;
            let reserved = if protocol.is_v5() { 0xc0 } else { 0xfc };
            if opts & reserved != 0 {
                return Err(DecodeError::Malformed("subscription options reserved bits set"));
            }
            let qos = QoS::from_u8(opts & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
            let retain_handling = (opts >> 4) & 0x03;
            if retain_handling == 3 {
                return Err(DecodeError::ProtocolError("retain handling 3"));
            }
            filters.push((
                filter,
                SubscriptionOptions {
                    qos,
                    no_local: opts & 0x04 != 0,
                    retain_as_published: opts & 0x08 != 0,
                    retain_handling,
                    subscription_identifier: properties.subscription_identifiers.first().copied(),
                },
            ));
        }
        if filters.is_empty() {
            return Err(DecodeError::ProtocolError("SUBSCRIBE without topic filters"));
        }
        Ok(Subscribe { packet_id, properties, filters })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_id_and_properties(&mut body, self.packet_id, &self.properties, protocol);
        for (filter, o) in &self.filters {
            write_string(&mut body, filter);
            let mut opts = o.qos as u8;
            if protocol.is_v5() {
                opts |= u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | (o.retain_handling & 3) << 4;
            }
            body.put_u8(opts);
        }
        write_frame(out, 0x82, &body);
    }
}

/// SUBACK: one return/reason code per requested filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: u16,
    /// Properties (MQTT 5).
    pub properties: Properties,
    /// Granted QoS or failure code, in request order.
    pub codes: Vec<u8>,
}

impl SubAck {
    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<SubAck, DecodeError> {
        let packet_id = read_packet_id(&mut b)?;
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::SubResponse)? } else { Properties::default() };
        Ok(SubAck { packet_id, properties, codes: b.to_vec() })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_id_and_properties(&mut body, self.packet_id, &self.properties, protocol);
        body.put_slice(&self.codes);
        write_frame(out, 0x90, &body);
    }
}

/// UNSUBSCRIBE: filters to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: u16,
    /// Properties (MQTT 5: User Property).
    pub properties: Properties,
    /// Filters in request order.
    pub filters: Vec<String>,
}

impl Unsubscribe {
    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<Unsubscribe, DecodeError> {
        let packet_id = read_packet_id(&mut b)?;
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::Unsubscribe)? } else { Properties::default() };
        let mut filters = Vec::new();
        while !b.is_empty() {
            filters.push(read_string(&mut b)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::ProtocolError("UNSUBSCRIBE without topic filters"));
        }
        Ok(Unsubscribe { packet_id, properties, filters })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_id_and_properties(&mut body, self.packet_id, &self.properties, protocol);
        for f in &self.filters {
            write_string(&mut body, f);
        }
        write_frame(out, 0xA2, &body);
    }
}

/// UNSUBACK: MQTT 5 carries one reason code per filter, 3.x none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: u16,
    /// Properties (MQTT 5).
    pub properties: Properties,
    /// Reason codes (MQTT 5 only).
    pub codes: Vec<u8>,
}

impl UnsubAck {
    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<UnsubAck, DecodeError> {
        let packet_id = read_packet_id(&mut b)?;
        if !protocol.is_v5() {
            if !b.is_empty() {
                return Err(DecodeError::Malformed("unexpected bytes at end of UNSUBACK"));
            }
            return Ok(UnsubAck { packet_id, properties: Properties::default(), codes: Vec::new() });
        }
        let properties = Properties::read(&mut b, PropertyContext::SubResponse)?;
        Ok(UnsubAck { packet_id, properties, codes: b.to_vec() })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_id_and_properties(&mut body, self.packet_id, &self.properties, protocol);
        if protocol.is_v5() {
            body.put_slice(&self.codes);
        }
        write_frame(out, 0xB0, &body);
    }
}
