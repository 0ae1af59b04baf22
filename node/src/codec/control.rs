//! DISCONNECT and AUTH (§3.14, §3.15).

use bytes::{Bytes, BytesMut};

use super::{read_reason_tail, write_frame, write_reason_tail, DecodeError, Properties, PropertyContext, Protocol};

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
        if !protocol.is_v5() {
            if !b.is_empty() {
                return Err(DecodeError::Malformed("unexpected bytes at end of DISCONNECT"));
            }
            return Ok(Disconnect::default());
        }
        let (reason, properties) = read_reason_tail(&mut b, PropertyContext::Disconnect)?;
        Ok(Disconnect { reason, properties })
    }

    pub(super) fn write(&self, protocol: Protocol, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        if protocol.is_v5() {
            write_reason_tail(&mut body, self.reason, &self.properties);
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
        let (reason, properties) = read_reason_tail(&mut b, PropertyContext::Auth)?;
        Ok(Auth { reason, properties })
    }

    pub(super) fn write(&self, out: &mut BytesMut) {
        let mut body = BytesMut::new();
        write_reason_tail(&mut body, self.reason, &self.properties);
        write_frame(out, 0xF0, &body);
    }
}
