//! Frame headers (RFC 6455 §5.2): decoding what peers send, encoding what we send.
//!
//! Decoding is a cheap check over at most 14 bytes: `Ok(None)` means "not all of the header is buffered
//! yet", which is a normal outcome, not an error. Everything that can be rejected from the first two
//! bytes (reserved bits, opcode, control-frame rules, the mask bit) is rejected before the extended
//! length has even arrived, so a bad peer is stopped at the earliest byte that proves it bad.
//!
//! Encoding writes our (server → client: unmasked; client → server: masked) headers with the minimal
//! length form into a caller's stack array; [`encode_frame`] builds a whole frame as one `Bytes` that
//! any number of connections can share without copying.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::WireError;
use crate::mask::apply_mask;

/// The longest header: 2 bytes + 8 bytes of extended length + 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Which end of the connection we are. A server requires masked frames; a client forbids them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0,
    Text = 1,
    Binary = 2,
    Close = 8,
    Ping = 9,
    Pong = 10,
}

impl OpCode {
    pub fn from_u8(v: u8) -> Result<OpCode, WireError> {
        Ok(match v {
            0 => OpCode::Continuation,
            1 => OpCode::Text,
            2 => OpCode::Binary,
            8 => OpCode::Close,
            9 => OpCode::Ping,
            10 => OpCode::Pong,
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..RSV3 as the top three bits of the first byte (0 unless an extension negotiated them).
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// Decodes a header from the start of `buf`. `Ok(None)`: more bytes are needed. On success also returns
/// the header's length in bytes. `allowed_rsv` holds the RSV bits a negotiated extension permits.
pub fn decode_header(buf: &[u8], role: Role, allowed_rsv: u8) -> Result<Option<(FrameHeader, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let fin = b0 & 0x80 != 0;
    let rsv = b0 & 0x70;
    if rsv & !allowed_rsv != 0 {
        return Err(WireError::ReservedBits);
    }
    let opcode = OpCode::from_u8(b0 & 0x0f)?;
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(WireError::UnmaskedFrame),
        (Role::Client, true) => return Err(WireError::MaskedFrame),
        _ => {}
    }
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(WireError::ControlFragmented);
        }
        if len7 > 125 {
            return Err(WireError::ControlTooLong);
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WireError::LengthTopBit);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let key = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some((FrameHeader { fin, rsv, opcode, mask, payload_len }, pos)))
}

/// Writes a header into `out` and returns its length. `mask` is `Some` only for client frames.
#[inline]
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if payload_len < 126 {
        out[1] = mask_bit | payload_len as u8;
        2
    } else if payload_len <= u64::from(u16::MAX) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Encodes one unmasked (server) frame into a single shareable buffer: one allocation, however many
/// connections it is then queued on.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.put_slice(&hdr[..n]);
    out.put_slice(payload);
    out.freeze()
}

/// Encodes one masked (client) frame, appending to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, fin, opcode, payload.len() as u64, Some(key));
    out.extend_from_slice(&hdr[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(bytes: &[u8]) -> Result<Option<(FrameHeader, usize)>, WireError> {
        decode_header(bytes, Role::Server, 0)
    }

    #[test]
    fn unmasked_client_frame_closes_1002() {
        let e = hdr(&[0x81, 0x05]).unwrap_err();
        assert_eq!(e, WireError::UnmaskedFrame);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn masked_server_frame_is_rejected_by_a_client() {
        assert_eq!(decode_header(&[0x81, 0x85, 1, 2, 3, 4], Role::Client, 0).unwrap_err(), WireError::MaskedFrame);
    }

    #[test]
    fn reserved_bits_close_1002() {
        for rsv in [0x40u8, 0x20, 0x10, 0x70] {
            let e = hdr(&[0x81 | rsv, 0x80]).unwrap_err();
            assert_eq!(e, WireError::ReservedBits);
            assert_eq!(e.close_code().0, 1002);
        }
        // An extension that negotiated RSV1 lets it through.
        assert!(decode_header(&[0xc1, 0x80, 0, 0, 0, 0], Role::Server, 0x40).unwrap().is_some());
    }

    #[test]
    fn unknown_opcodes_close_1002() {
        for op in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
            let e = hdr(&[0x80 | op, 0x80]).unwrap_err();
            assert_eq!(e, WireError::UnknownOpcode(op));
            assert_eq!(e.close_code().0, 1002);
        }
    }

    #[test]
    fn control_frame_over_125_bytes_closes_1002() {
        let e = hdr(&[0x89, 0x80 | 126, 0, 126]).unwrap_err();
        assert_eq!(e, WireError::ControlTooLong);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn fragmented_control_frame_closes_1002() {
        let e = hdr(&[0x09, 0x80]).unwrap_err();
        assert_eq!(e, WireError::ControlFragmented);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn length_with_top_bit_closes_1002() {
        let mut b = vec![0x82, 0x80 | 127];
        b.extend_from_slice(&(1u64 << 63).to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        let e = hdr(&b).unwrap_err();
        assert_eq!(e, WireError::LengthTopBit);
        assert_eq!(e.close_code().0, 1002);
    }

    #[test]
    fn bad_frames_are_rejected_from_the_first_two_bytes() {
        // The extended length and mask have not arrived, yet the RSV bits already condemn the frame.
        assert_eq!(hdr(&[0xf2, 0xff]).unwrap_err(), WireError::ReservedBits);
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let mut full = [0u8; MAX_HEADER_LEN];
        let n = encode_header(&mut full, true, OpCode::Binary, 70_000, Some([9, 8, 7, 6]));
        assert_eq!(n, 14);
        for cut in 0..n {
            assert_eq!(hdr(&full[..cut]).unwrap(), None, "cut {cut}");
        }
        let (h, len) = hdr(&full[..n]).unwrap().unwrap();
        assert_eq!(len, 14);
        assert_eq!(h.payload_len, 70_000);
        assert_eq!(h.mask, Some([9, 8, 7, 6]));
    }

    #[test]
    fn lengths_use_the_minimal_form() {
        for (len, expect) in [(0u64, 2usize), (125, 2), (126, 4), (65_535, 4), (65_536, 10), (1 << 40, 10)] {
            let mut out = [0u8; MAX_HEADER_LEN];
            assert_eq!(encode_header(&mut out, true, OpCode::Text, len, None), expect, "len {len}");
            let (h, n) = decode_header(&out, Role::Client, 0).unwrap().unwrap();
            assert_eq!((h.payload_len, n), (len, expect));
        }
    }

    #[test]
    fn encoded_frame_is_header_plus_payload() {
        let f = encode_frame(OpCode::Text, b"hello");
        assert_eq!(&f[..], b"\x81\x05hello");
    }
}
