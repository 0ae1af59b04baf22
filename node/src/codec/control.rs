//! DISCONNECT and AUTH (§3.14, §3.15).

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::read_u8;
use super::{write_frame, DecodeError, Properties, PropertyContext, Protocol};

/// DISCONNECT, from either side (MQTT 3.x: client only, no body).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Reason code (MQTT 5).
    pub reason: u8,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

impl Disconnect {
    /// A DISCONNECT with `reason` and no properties.
    pub fn new(reason: u8) -> Disconnect {
        Disconnect { reason, properties: Properties::default() }
    }

    pub(super) fn read(mut b: Bytes, protocol: Protocol) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        if protocol.is_v5() {
            if !b.is_empty() {
                d.reason = read_u8(&mut b)?;
            }
            if !b.is_empty() {
                d.properties = Properties::read(&mut b, PropertyContext::Disconnect)?;
            }
        }
        if !b.is_empty() {
            return Err(DecodeError::Malformed("unexpected bytes at end of DISCONNECT"));
        }
        Ok(d)
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        if protocol.is_v5() {
            let props = self.properties.body();
            if self.reason != 0 || !props.is_empty() {
                body.put_u8(self.reason);
            }
            if !props.is_empty() {
                Properties::write_body(&mut body, &props);
            }
        }
        write_frame(out, 0xE0, &body);
    }
}

/// AUTH: extended authentication exchange (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Reason code: 0x00 success, 0x18 continue, 0x19 re-authenticate.
    pub reason: u8,
    /// Properties (Authentication Method and Data, Reason String, User Property).
    pub properties: Properties,
}

impl Auth {
    pub(super) fn read(mut b: Bytes) -> Result<Auth, DecodeError> {
        let mut a = Auth::default();
        if !b.is_empty() {
            a.reason = read_u8(&mut b)?;
        }
        if !b.is_empty() {
            a.properties = Properties::read(&mut b, PropertyContext::Auth)?;
        }
        if !b.is_empty() {
            return Err(DecodeError::Malformed("unexpected bytes at end of AUTH"));
        }
        Ok(a)
    }

    pub(super) fn write(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        let props = self.properties.body();
        if self.reason != 0 || !props.is_empty() {
            body.put_u8(self.reason);
        }
        if !props.is_empty() {
            Properties::write_body(&mut body, &props);
        }
        write_frame(out, 0xF0, &body);
    }
}
