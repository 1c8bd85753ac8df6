//! What the generator puts in a message, and how it reads it back.
//!
//! Raw messages are binary and start with a fixed little-endian header; the rest is filler up to
//! `--size`:
//!
//! | scenario | bytes 0..8 | 8..12 | 12..16 |
//! |---|---|---|---|
//! | echo   | send time (monotonic ns; the *intended* time in rate mode) | filler | filler |
//! | fanout | send time | publisher id | sequence number (per publisher, from 0) |
//!
//! # Encode once
//! A client frame is masked, so the bytes on the wire depend on the payload *and* the key. The key is
//! fixed per connection, so a [`Template`] encodes the whole frame once; sending a message then means
//! XOR-ing the few header bytes that change into place and copying the frame into the write queue —
//! no allocation and no re-masking of the filler.

use ringcast_wire::frame::encode_client_frame;
use ringcast_wire::OpCode;

/// Echo payloads carry an 8-byte timestamp.
pub const ECHO_HEADER: usize = 8;
/// Fan-out payloads carry a timestamp, a publisher id and a sequence number.
pub const FANOUT_HEADER: usize = 16;

/// A pre-encoded, pre-masked frame whose payload bytes can be patched in place.
pub struct Template {
    frame: Vec<u8>,
    payload_at: usize,
    key: [u8; 4],
}

impl Template {
    /// A binary frame carrying `size` bytes of filler.
    pub fn new(size: usize, key: [u8; 4]) -> Template {
        let filler: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        let mut frame = Vec::with_capacity(size + 14);
        encode_client_frame(&mut frame, true, OpCode::Binary, &filler, key);
        let payload_at = frame.len() - size;
        Template { frame, payload_at, key }
    }

    /// Writes `bytes` at payload offset `at` (masked, as the frame requires).
    #[inline]
    pub fn set(&mut self, at: usize, bytes: &[u8]) {
        let base = self.payload_at + at;
        for (i, b) in bytes.iter().enumerate() {
            self.frame[base + i] = b ^ self.key[(at + i) & 3];
        }
    }

    /// Sets the fan-out header.
    #[inline]
    pub fn set_fanout(&mut self, ts: u64, publisher: u32, seq: u32) {
        let mut h = [0u8; FANOUT_HEADER];
        h[..8].copy_from_slice(&ts.to_le_bytes());
        h[8..12].copy_from_slice(&publisher.to_le_bytes());
        h[12..16].copy_from_slice(&seq.to_le_bytes());
        self.set(0, &h);
    }

    pub fn bytes(&self) -> &[u8] {
        &self.frame
    }
}

/// The timestamp at the start of a payload.
#[inline]
pub fn timestamp(payload: &[u8]) -> Option<u64> {
    let b: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// `(send time, publisher, sequence)` of a raw fan-out payload.
#[inline]
pub fn fanout_header(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let ts = timestamp(payload)?;
    let p: [u8; 4] = payload.get(8..12)?.try_into().ok()?;
    let s: [u8; 4] = payload.get(12..16)?.try_into().ok()?;
    Some((ts, u32::from_le_bytes(p), u32::from_le_bytes(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_wire::buffer::{fill_from, GrowableBuffer};
    use ringcast_wire::{Event, Limits, Reader, Role};

    #[test]
    fn patched_template_decodes_to_the_patched_payload() {
        let mut t = Template::new(40, [0xde, 0xad, 0xbe, 0xef]);
        t.set_fanout(0x0102_0304_0506_0708, 7, 99);
        let mut buf = GrowableBuffer::new(256, 1 << 20);
        fill_from(&mut buf, t.bytes());
        let mut reader = Reader::new(Role::Server, Limits::default());
        match reader.next(&mut buf).unwrap() {
            Some(Event::Message { opcode, payload }) => {
                assert_eq!(opcode, OpCode::Binary);
                let p = payload.to_vec();
                assert_eq!(p.len(), 40);
                assert_eq!(fanout_header(&p), Some((0x0102_0304_0506_0708, 7, 99)));
                assert_eq!(&p[16..20], b"qrst");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fanout_header(&[0u8; 15]), None);
    }
}
