//! Primitive MQTT data types (§1.5): integers, Variable Byte Integers, UTF-8 strings and
//! binary data. Readers take a `Bytes` and never panic on short or hostile input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::DecodeError;

/// Reads one byte.
pub fn read_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    if buf.remaining() < 1 {
        return Err(DecodeError::Malformed("packet too short"));
    }
    Ok(buf.get_u8())
}

/// Reads a big-endian u16.
pub fn read_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    if buf.remaining() < 2 {
        return Err(DecodeError::Malformed("packet too short"));
    }
    Ok(buf.get_u16())
}

/// Reads a big-endian u32.
pub fn read_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    if buf.remaining() < 4 {
        return Err(DecodeError::Malformed("packet too short"));
    }
    Ok(buf.get_u32())
}

/// Reads a Variable Byte Integer: at most 4 bytes, minimally encoded [MQTT-1.5.5-1].
pub fn read_varint(buf: &mut Bytes) -> Result<u32, DecodeError> {
    match parse_varint(buf.chunk())? {
        Some((value, len)) => {
            buf.advance(len);
            Ok(value)
        }
        None => Err(DecodeError::Malformed("truncated variable byte integer")),
    }
}

/// Parses a Variable Byte Integer at the start of `bytes` without consuming it.
/// `Ok(None)` means more bytes are needed.
pub fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if i == 4 {
            return Err(DecodeError::MalformedLength);
        }
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // A last byte of zero after the first means a non-minimal encoding.
            if i > 0 && *byte == 0 {
                return Err(DecodeError::MalformedLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(DecodeError::MalformedLength);
    }
    Ok(None)
}

/// Number of bytes `value` takes as a Variable Byte Integer.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a Variable Byte Integer (values above 268,435,455 are the caller's bug and are
/// clamped by the encoders' size checks before reaching here).
pub fn write_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Reads Binary Data (two-byte length prefix), sharing the input buffer.
pub fn read_binary(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = usize::from(read_u16(buf)?);
    if buf.remaining() < len {
        return Err(DecodeError::Malformed("length exceeds packet"));
    }
    Ok(buf.split_to(len))
}

/// Reads a UTF-8 Encoded String: well-formed UTF-8 with no surrogates [MQTT-1.5.4-1] and
/// no U+0000 [MQTT-1.5.4-2]; a BOM is kept [MQTT-1.5.4-3].
pub fn read_string(buf: &mut Bytes) -> Result<String, DecodeError> {
    let raw = read_binary(buf)?;
    let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(DecodeError::InvalidUtf8);
    }
    Ok(s.to_owned())
}

/// Writes Binary Data with its two-byte length (callers check the 65,535 limit).
pub fn write_binary(out: &mut BytesMut, data: &[u8]) {
    out.put_u16(data.len() as u16);
    out.put_slice(data);
}

/// Writes a UTF-8 Encoded String.
pub fn write_string(out: &mut BytesMut, s: &str) {
    write_binary(out, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_mqtt_1_5_5() {
        for (value, len) in [(0usize, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4), (268_435_455, 4)] {
            let mut out = BytesMut::new();
            write_varint(&mut out, value);
            assert_eq!(out.len(), len);
            assert_eq!(varint_len(value), len);
            assert_eq!(parse_varint(&out).ok().flatten(), Some((value as u32, len)));
        }
    }

    #[test]
    fn varint_rejects_five_bytes_and_non_minimal_mqtt_1_5_5_1() {
        assert!(matches!(parse_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]), Err(DecodeError::MalformedLength)));
        assert!(matches!(parse_varint(&[0xff, 0xff, 0xff, 0xff]), Err(DecodeError::MalformedLength)));
        assert!(matches!(parse_varint(&[0x80, 0x00]), Err(DecodeError::MalformedLength)));
        assert!(matches!(parse_varint(&[0x80, 0x80]), Ok(None)));
    }

    #[test]
    fn strings_reject_null_and_surrogates_keep_bom_mqtt_1_5_4() {
        let mut b = Bytes::from_static(&[0, 3, b'a', 0, b'b']);
        assert!(matches!(read_string(&mut b), Err(DecodeError::InvalidUtf8)));
        // U+D800 encoded as CESU-8 is not well-formed UTF-8.
        let mut b = Bytes::from_static(&[0, 3, 0xed, 0xa0, 0x80]);
        assert!(matches!(read_string(&mut b), Err(DecodeError::InvalidUtf8)));
        let mut b = Bytes::from_static(&[0, 4, 0xef, 0xbb, 0xbf, b'x']);
        assert_eq!(read_string(&mut b).ok().as_deref(), Some("\u{feff}x"));
        let mut b = Bytes::from_static(&[0, 9, b'a']);
        assert!(read_string(&mut b).is_err());
    }
}
