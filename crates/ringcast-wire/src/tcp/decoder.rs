//! The frame decoder: bytes in a [`ReadBuffer`] in, whole CRC-checked frames out.
//!
//! TCP has no message boundaries, so frames arrive glued together and split anywhere, one byte at a time
//! included. The driver reads into the buffer (any strategy of [`crate::buffer`]), then calls
//! [`Decoder::next`] until it returns `Ok(None)` ("need more bytes"). The three outcomes STYLE.md asks
//! of a sans-IO decoder are `Ok(Some(frame))` (decoded), `Ok(None)` (incomplete) and `Err(error)`; every
//! error here is fatal (codes 1–4). Codes 5 and 6 belong to the frame's *command*, decoded by
//! [`Frame::command`] from a frame that was whole and intact, so the stream is never in doubt after them.
//!
//! # How bytes move
//! * The header is checked byte by byte as it arrives: a wrong first byte is bad magic (1) at once, a
//!   wrong version byte (2) before the length has come, and `body_len` is checked against the limit (4) as
//!   soon as its four bytes are buffered — before the CRC, and before a byte of the body is buffered.
//!   A whole header is consumed from the buffer; the decoder keeps it (cmd, length, CRC).
//! * A body no larger than [`ReadBuffer::frame_capacity`] waits in the buffer and is handed out *in
//!   place*: no copy. Its bytes are consumed on the next call (or by [`Decoder::settle`]).
//! * A larger body is streamed into the decoder's own buffer as it arrives and consumed from the read
//!   buffer at once, so the read buffer never needs to hold more than its capacity. That buffer is freed
//!   after delivery, so one huge frame does not pin memory for the rest of a connection's life.
//! * A body that wraps around a ring buffer is copied into that same buffer once: commands have fields
//!   that must be contiguous (a channel is a `&str`), unlike WebSocket payloads, which the reader can
//!   hand out as two slices.
//! * The CRC is checked over the whole frame before it is handed out (3): a frame is never acted on
//!   unless every byte of it is as the sender wrote it.
//!
//! After an error the decoder returns the same error forever: nothing after a framing error is trusted.

use crate::buffer::ReadBuffer;
use crate::frame::Role;
use crate::tcp::command::Command;
use crate::tcp::error::TcpError;
use crate::tcp::{frame_crc, header_prefix, DEFAULT_MAX_BODY, HEADER_LEN, MAGIC, VERSION};

/// The decoded fields of a header whose body is being received.
#[derive(Debug, Clone, Copy)]
struct Header {
    cmd: u16,
    body_len: u32,
    crc: u32,
}

/// A whole frame whose CRC matched. `body` borrows the read buffer or the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub cmd: u16,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The typed command, as received by `role` (a server accepts client → server commands, a client the
    /// server's). Errors are 5 (unknown command, or one that does not flow this way) and 6 (malformed
    /// body); neither is fatal.
    pub fn command(&self, role: Role) -> Result<Command<'a>, TcpError> {
        Command::decode(role, self.cmd, self.body)
    }
}

/// Where the frame that just completed lies.
enum Ready {
    /// The first `len` readable bytes of the read buffer.
    InPlace(u32),
    /// The decoder's `body`.
    Assembled,
}

/// Body buffers up to this capacity are kept between frames; larger ones are freed after delivery.
const KEEP_BODY_CAPACITY: usize = 0;

/// The receive-side state of one TCP connection.
#[derive(Debug)]
pub struct Decoder {
    max_body: u32,
    /// Header of the frame whose body is being received (its bytes are consumed).
    frame: Option<Header>,
    /// Whether the body of `frame` is streamed into `body`.
    streaming: bool,
    /// Streamed bodies, and bodies that wrapped around a ring.
    body: Vec<u8>,
    /// Read-buffer bytes to consume at the next call (the last frame borrowed them).
    pending_consume: u32,
    /// The last frame borrowed `body`; clear it at the next call.
    pending_clear: bool,
    /// The framing error that ended the stream.
    failed: Option<TcpError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_BODY)
    }
}

impl Decoder {
    /// A decoder that rejects bodies longer than `max_body` bytes (error 4).
    pub fn new(max_body: u32) -> Self {
        Decoder {
            max_body,
            frame: None,
            streaming: false,
            body: Vec::new(),
            pending_consume: 0,
            pending_clear: false,
            failed: None,
        }
    }

    /// The configured body limit.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// Whether a frame is partially received (its header has been consumed, bytes are owed to it).
    pub fn is_mid_frame(&self) -> bool {
        self.frame.is_some()
    }

    /// Heap bytes held for bodies (zero between frames).
    pub fn held_bytes(&self) -> usize {
        self.body.capacity()
    }

    /// Applies what the previous frame borrowed. Call before reading more into the buffer, so that the
    /// buffer has the room the last frame was occupying (`next` also does this itself).
    pub fn settle<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) {
        if self.pending_consume > 0 {
            buf.consume(self.pending_consume as usize);
            self.pending_consume = 0;
        }
        if self.pending_clear {
            self.pending_clear = false;
            self.body.clear();
            if self.body.capacity() > KEEP_BODY_CAPACITY {
                self.body = Vec::new();
            }
        }
    }

    /// Returns the next whole frame, `Ok(None)` when more bytes are needed, or the framing error (always
    /// fatal: send ERROR with [`TcpError::code`] and close).
    pub fn next<'a, B: ReadBuffer + ?Sized>(&'a mut self, buf: &'a mut B) -> Result<Option<Frame<'a>>, TcpError> {
        self.settle(buf);
        if let Some(e) = self.failed {
            return Err(e);
        }
        let (cmd, ready) = match self.advance(buf) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.failed = Some(e);
                self.frame = None;
                self.streaming = false;
                self.body = Vec::new();
                return Err(e);
            }
        };
        let body: &'a [u8] = match ready {
            Ready::InPlace(len) => {
                let (a, _) = buf.readable_mut();
                &a[..len as usize]
            }
            Ready::Assembled => &self.body,
        };
        Ok(Some(Frame { cmd, body }))
    }

    /// Moves the decoder forward over the buffered bytes; on a complete frame, says where it lies.
    fn advance<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) -> Result<Option<(u16, Ready)>, TcpError> {
        let header = match self.frame {
            Some(h) => h,
            None => match self.read_header(buf)? {
                Some(h) => h,
                None => return Ok(None),
            },
        };
        let body_len = header.body_len as usize;
        if !self.streaming {
            if buf.len() >= body_len {
                self.frame = None;
                let (a, b) = buf.readable_mut();
                let (a, b) = split_prefix(a, b, body_len);
                check_crc(&header, &[a, b])?;
                if b.is_empty() {
                    // Below `max_body`, a `u32`.
                    self.pending_consume = header.body_len;
                    return Ok(Some((header.cmd, Ready::InPlace(header.body_len))));
                }
                // Wrapped around a ring: one copy, so that the command's fields are contiguous.
                self.body.clear();
                self.body.extend_from_slice(a);
                self.body.extend_from_slice(b);
                buf.consume(body_len);
                self.pending_clear = true;
                return Ok(Some((header.cmd, Ready::Assembled)));
            }
            if body_len <= buf.frame_capacity() {
                // It will fit: wait for the rest of it in place.
                return Ok(None);
            }
            self.streaming = true;
            self.body.clear();
        }
        let available = buf.len().min(body_len - self.body.len());
        {
            let (a, b) = buf.readable_mut();
            let (a, b) = split_prefix(a, b, available);
            self.body.extend_from_slice(a);
            self.body.extend_from_slice(b);
        }
        buf.consume(available);
        if self.body.len() < body_len {
            return Ok(None);
        }
        self.frame = None;
        self.streaming = false;
        self.pending_clear = true;
        check_crc(&header, &[&self.body])?;
        Ok(Some((header.cmd, Ready::Assembled)))
    }

    /// Checks the header as far as it is buffered, and consumes it once whole.
    fn read_header<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) -> Result<Option<Header>, TcpError> {
        let mut h = [0u8; HEADER_LEN];
        let n = {
            let (a, b) = buf.readable_mut();
            let n1 = a.len().min(HEADER_LEN);
            h[..n1].copy_from_slice(&a[..n1]);
            let n2 = b.len().min(HEADER_LEN - n1);
            h[n1..n1 + n2].copy_from_slice(&b[..n2]);
            n1 + n2
        };
        // Each check runs as soon as its bytes are here: a bad peer is stopped at the first byte that
        // proves it bad, and a too-large body is refused before any of it is buffered.
        if (n >= 1 && h[0] != MAGIC[0]) || (n >= 2 && h[1] != MAGIC[1]) {
            return Err(TcpError::BadMagic);
        }
        if n >= 3 && h[2] != VERSION {
            return Err(TcpError::UnsupportedVersion(h[2]));
        }
        if n >= 9 {
            let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
            if len > self.max_body {
                return Err(TcpError::BodyTooLarge { len, max: self.max_body });
            }
        }
        if n < HEADER_LEN {
            return Ok(None);
        }
        let header = Header {
            cmd: u16::from_be_bytes([h[3], h[4]]),
            body_len: u32::from_be_bytes([h[5], h[6], h[7], h[8]]),
            crc: u32::from_be_bytes([h[9], h[10], h[11], h[12]]),
        };
        buf.consume(HEADER_LEN);
        self.frame = Some(header);
        Ok(Some(header))
    }
}

/// Compares the header's CRC with the one computed over header bytes 0..9 (rebuilt from the checked
/// fields, so identical to those received) and the body.
fn check_crc(header: &Header, body: &[&[u8]]) -> Result<(), TcpError> {
    let computed = frame_crc(&header_prefix(header.cmd, header.body_len), body);
    if computed != header.crc {
        return Err(TcpError::CrcMismatch { declared: header.crc, computed });
    }
    Ok(())
}

/// The first `n` bytes of the two-slice sequence `(a, b)`; `n <= a.len() + b.len()`.
fn split_prefix<'a>(a: &'a [u8], b: &'a [u8], n: usize) -> (&'a [u8], &'a [u8]) {
    if n <= a.len() {
        (&a[..n], &[])
    } else {
        (a, &b[..n - a.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{fill_from, GrowableBuffer};
    use crate::tcp::{Command, ErrorCode};

    fn publish(channel: &str, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Command::Publish { channel, data }.encode(&mut out).unwrap();
        out
    }

    /// Feeds `bytes` into a fresh buffer and decodes: the first outcome.
    fn first(decoder: &mut Decoder, bytes: &[u8]) -> Result<Option<(u16, Vec<u8>)>, TcpError> {
        let mut buf = GrowableBuffer::new(256, 1 << 20);
        assert_eq!(fill_from(&mut buf, bytes), bytes.len());
        decoder.next(&mut buf).map(|f| f.map(|f| (f.cmd, f.body.to_vec())))
    }

    #[test]
    fn bad_magic_is_error_1_from_the_first_byte() {
        let e = first(&mut Decoder::default(), b"G").unwrap_err();
        assert_eq!(e, TcpError::BadMagic);
        assert_eq!(e.code(), ErrorCode::BAD_MAGIC);
        assert!(e.is_fatal());
        assert_eq!(first(&mut Decoder::default(), b"BX"), Err(TcpError::BadMagic));
        // An HTTP request sent to the TCP port.
        assert_eq!(first(&mut Decoder::default(), b"GET / HTTP/1.1\r\n"), Err(TcpError::BadMagic));
    }

    #[test]
    fn unsupported_version_is_error_2_from_the_third_byte() {
        let e = first(&mut Decoder::default(), b"BM\x02").unwrap_err();
        assert_eq!(e, TcpError::UnsupportedVersion(2));
        assert_eq!(e.code(), ErrorCode::UNSUPPORTED_VERSION);
        assert!(e.is_fatal());
        assert_eq!(first(&mut Decoder::default(), b"BM\x00"), Err(TcpError::UnsupportedVersion(0)));
    }

    #[test]
    fn crc_mismatch_is_error_3() {
        let good = publish("news", b"data");
        // A flipped bit anywhere but the magic, version and length: in the cmd, the CRC, or the body.
        for i in [3, 4, 9, 12, 13, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let e = first(&mut Decoder::default(), &bad).unwrap_err();
            assert!(matches!(e, TcpError::CrcMismatch { .. }), "byte {i}: {e:?}");
            assert_eq!(e.code(), ErrorCode::CRC_MISMATCH);
            assert!(e.is_fatal());
        }
    }

    #[test]
    fn body_too_large_is_error_4_from_the_length_before_the_body() {
        let mut d = Decoder::new(4);
        let frame = publish("news", b"data");
        // Only bytes 0..9 (no CRC yet, no body at all) are enough.
        let e = first(&mut d, &frame[..9]).unwrap_err();
        assert_eq!(e, TcpError::BodyTooLarge { len: 10, max: 4 });
        assert_eq!(e.code(), ErrorCode::BODY_TOO_LARGE);
        assert!(e.is_fatal());
        assert_eq!(d.held_bytes(), 0);
        // At the limit is fine.
        let mut d = Decoder::new(10);
        assert_eq!(first(&mut d, &frame), Ok(Some((0x0004, frame[13..].to_vec()))));
    }

    #[test]
    fn a_header_cut_short_asks_for_more() {
        let frame = publish("news", b"data");
        for cut in 0..frame.len() {
            assert_eq!(first(&mut Decoder::default(), &frame[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn errors_are_sticky() {
        let mut d = Decoder::default();
        let mut buf = GrowableBuffer::new(256, 1 << 20);
        fill_from(&mut buf, b"XX");
        assert_eq!(d.next(&mut buf).unwrap_err(), TcpError::BadMagic);
        // Even a good frame after it is not trusted.
        fill_from(&mut buf, &publish("a", b""));
        assert_eq!(d.next(&mut buf).unwrap_err(), TcpError::BadMagic);
    }

    #[test]
    fn an_idle_decoder_is_small() {
        // Every TCP connection carries one, idle or not (the WebSocket reader is 72 bytes), and the
        // connection future's size is a hard line (ARCHITECTURE.md): keep it within 64 bytes and free of heap.
        assert!(std::mem::size_of::<Decoder>() <= 64, "{}", std::mem::size_of::<Decoder>());
        assert_eq!(Decoder::default().held_bytes(), 0);
    }

    #[test]
    fn empty_body_decodes() {
        let mut out = Vec::new();
        Command::Ping(b"").encode(&mut out).unwrap();
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(first(&mut Decoder::default(), &out), Ok(Some((0x0005, vec![]))));
    }
}
