//! Close codes (RFC 6455 §7.4) and close frame payloads.
//!
//! A received code is valid when it is one the RFC lets an endpoint *send*: 1000–1003, 1007–1011 and the
//! registered/private range 3000–4999. 1004, 1005, 1006 and 1015 are reserved for local reporting and
//! never appear on the wire, so receiving them is a protocol error.

use crate::error::WireError;
use crate::utf8;

/// A WebSocket close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const UNSUPPORTED: CloseCode = CloseCode(1003);
    /// Reserved: "no status received"; never sent on the wire.
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);

    /// Whether a peer may put this code in a close frame.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

/// Validates a received close frame payload and returns its code (`NO_STATUS` when empty) and reason.
pub fn parse_close_payload(payload: &[u8]) -> Result<(CloseCode, &[u8]), WireError> {
    match payload.len() {
        0 => Ok((CloseCode::NO_STATUS, &[])),
        1 => Err(WireError::CloseOneByte),
        _ => {
            let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
            if !code.is_valid_on_wire() {
                return Err(WireError::InvalidCloseCode(code.0));
            }
            let reason = &payload[2..];
            if !utf8::is_valid(reason) {
                return Err(WireError::InvalidCloseReason);
            }
            Ok((code, reason))
        }
    }
}

/// Writes a close payload (code + reason truncated to fit 125 bytes at a char boundary) into `out` and
/// returns its length.
pub fn encode_close_payload(code: CloseCode, reason: &str, out: &mut [u8; 125]) -> usize {
    out[..2].copy_from_slice(&code.0.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    2 + end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_the_rfc_verdict() {
        for c in 0..=u16::MAX {
            let valid = CloseCode(c).is_valid_on_wire();
            let expected = (1000..=1003).contains(&c) || (1007..=1011).contains(&c) || (3000..=4999).contains(&c);
            assert_eq!(valid, expected, "code {c}");
        }
    }

    #[test]
    fn reserved_codes_close_1002() {
        for c in [0u16, 999, 1004, 1005, 1006, 1012, 1015, 2999, 5000, 65535] {
            let err = parse_close_payload(&c.to_be_bytes()).unwrap_err();
            assert_eq!(err, WireError::InvalidCloseCode(c));
            assert_eq!(err.close_code(), CloseCode::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn one_byte_close_payload_closes_1002() {
        assert_eq!(parse_close_payload(&[3]).unwrap_err().close_code(), CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn invalid_utf8_reason_closes_1007() {
        let err = parse_close_payload(&[
            0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80,
        ])
        .unwrap_err();
        assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn empty_and_valid_payloads_parse() {
        assert_eq!(parse_close_payload(&[]).unwrap(), (CloseCode::NO_STATUS, &[][..]));
        let p = [0x03, 0xe8, b'b', b'y', b'e'];
        assert_eq!(parse_close_payload(&p).unwrap(), (CloseCode::NORMAL, &b"bye"[..]));
    }

    #[test]
    fn long_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let mut out = [0u8; 125];
        let n = encode_close_payload(CloseCode::NORMAL, &reason, &mut out);
        assert!(n <= 125);
        assert!(std::str::from_utf8(&out[2..n]).is_ok());
        assert_eq!(n, 2 + 122);
    }
}
