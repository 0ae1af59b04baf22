//! CONNECT and CONNACK (§3.1, §3.2), for all three protocol versions.

use bytes::{BufMut, Bytes, BytesMut};
use raftmq_cluster::message::QoS;

use super::wire::{read_binary, read_string, read_u16, read_u8, write_binary, write_string};
use super::{write_frame, DecodeError, Properties, PropertyContext, Protocol};

/// The will message declared in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Will topic (validated as a topic name by the connection).
    pub topic: String,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will retain flag.
    pub retain: bool,
    /// Will properties (MQTT 5).
    pub properties: Properties,
}

/// CONNECT: the first packet of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Negotiated protocol.
    pub protocol: Protocol,
    /// Clean Session (3.x) or Clean Start (5).
    pub clean_start: bool,
    /// Keep alive in seconds, 0 = off.
    pub keep_alive: u16,
    /// CONNECT properties (MQTT 5).
    pub properties: Properties,
    /// Client identifier, possibly empty.
    pub client_id: String,
    /// Will, if the Will Flag is set.
    pub will: Option<LastWill>,
    /// User name, if its flag is set.
    pub username: Option<String>,
    /// Password, if its flag is set.
    pub password: Option<Bytes>,
}

impl Connect {
    pub(super) fn read(mut b: Bytes) -> Result<Connect, DecodeError> {
        let name = read_string(&mut b)?;
        let level = read_u8(&mut b)?;
        let protocol = match (name.as_str(), level) {
            ("MQTT", 4) => Protocol::V311,
            ("MQTT", 5) => Protocol::V5,
            ("MQIsdp", 3) => Protocol::V31,
            _ => return Err(DecodeError::UnsupportedProtocol { level }),
        };
        let flags = read_u8(&mut b)?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::Malformed("CONNECT reserved flag set"));
        }
        let clean_start = flags & 0x02 != 0;
        let will_flag = flags & 0x04 != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let password_flag = flags & 0x40 != 0;
        let username_flag = flags & 0x80 != 0;
        let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
        if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::Malformed("will QoS or retain without will flag"));
        }
        if !protocol.is_v5() && password_flag && !username_flag {
            return Err(DecodeError::Malformed("password without user name"));
        }
        let keep_alive = read_u16(&mut b)?;
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::Connect)? } else { Properties::default() };
        let client_id = read_string(&mut b)?;
        let will = if will_flag {
            let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::Will)? } else { Properties::default() };
            let topic = read_string(&mut b)?;
            let payload = read_binary(&mut b)?;
            Some(LastWill { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if username_flag { Some(read_string(&mut b)?) } else { None };
        let password = if password_flag { Some(read_binary(&mut b)?) } else { None };
        if !b.is_empty() {
            return Err(DecodeError::Malformed("unexpected bytes at end of CONNECT"));
        }
        Ok(Connect { protocol, clean_start, keep_alive, properties, client_id, will, username, password })
    }

    pub(super) fn write(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_string(&mut body, if self.protocol == Protocol::V31 { "MQIsdp" } else { "MQTT" });
        body.put_u8(self.protocol.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | ((w.qos as u8) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.put_u8(flags);
        body.put_u16(self.keep_alive);
        if self.protocol.is_v5() {
            Properties::write_body(&mut body, &self.properties.body());
        }
        write_string(&mut body, &self.client_id);
        if let Some(w) = &self.will {
            if self.protocol.is_v5() {
                Properties::write_body(&mut body, &w.properties.body());
            }
            write_string(&mut body, &w.topic);
            write_binary(&mut body, &w.payload);
        }
        if let Some(u) = &self.username {
            write_string(&mut body, u);
        }
        if let Some(p) = &self.password {
            write_binary(&mut body, p);
        }
        write_frame(out, 0x10, &body);
    }
}

/// CONNACK: the answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// Reason code (5) or return code (3.x).
    pub code: u8,
    /// CONNACK properties (MQTT 5).
    pub properties: Properties,
}

impl ConnAck {
    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<ConnAck, DecodeError> {
        let flags = read_u8(&mut b)?;
        if flags & 0xfe != 0 {
            return Err(DecodeError::Malformed("CONNACK reserved flags set"));
        }
        let code = read_u8(&mut b)?;
        let properties = if protocol.is_v5() { Properties::read(&mut b, PropertyContext::ConnAck)? } else { Properties::default() };
        if !b.is_empty() {
            return Err(DecodeError::Malformed("unexpected bytes at end of CONNACK"));
        }
        Ok(ConnAck { session_present: flags & 1 != 0, code, properties })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::with_capacity(8);
        // MQTT 3.1 has no Session Present flag: the byte is reserved and 0.
        body.put_u8(u8::from(self.session_present && protocol != Protocol::V31));
        body.put_u8(self.code);
        if protocol.is_v5() {
            Properties::write_body(&mut body, &self.properties.body());
        }
        write_frame(out, 0x20, &body);
    }
}
