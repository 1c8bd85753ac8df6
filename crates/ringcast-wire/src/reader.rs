//! The message reader: bytes in a [`ReadBuffer`] in, WebSocket events out.
//!
//! This is where RFC 6455's receive-side rules live: masking, fragmentation, interleaved control frames,
//! UTF-8 of text messages, close payloads and size limits. It never touches a socket: the driver reads
//! into the buffer, then calls [`Reader::next`] until it returns `Ok(None)` ("need more bytes").
//!
//! # How bytes move
//! * A header is consumed from the buffer as soon as it is complete; the reader keeps it.
//! * The payload is unmasked (and, for text, UTF-8-checked) as soon as its bytes arrive, even before the
//!   frame is complete: a peer streaming an invalid text message is stopped at the first impossible byte.
//!   `processed` counts the payload bytes at the front of the buffer that are already unmasked/checked.
//! * A single-frame message that completes inside the buffer is handed out *in place*, as up to two
//!   slices of the buffer (two when a ring wraps): no copy. The bytes are consumed on the next call.
//! * Fragmented messages, and frames too large to wait for in the buffer
//!   ([`ReadBuffer::frame_capacity`]), are appended to the message buffer as they arrive and consumed
//!   from the read buffer at once, so the read buffer never needs to hold more than one buffer's worth.
//!   The message buffer is freed after delivery unless it is small, so one huge message does not pin
//!   memory for the rest of a connection's life.
//!
//! Limits are checked from the header, before any payload is buffered.
//!
//! # permessage-deflate
//! Off unless [`Reader::enable_deflate`] is called with the negotiated parameters; until then RSV1 is a
//! protocol error like any reserved bit. With it on, RSV1 on the first frame of a data message marks
//! the message compressed (RSV1 on a control or continuation frame: 1002). A compressed message always
//! takes the streaming path: as its bytes arrive they are unmasked, inflated into the message buffer
//! (never past `max_message_size`, 1009 the moment it would be), and for text UTF-8-checked *after*
//! inflating, so the in-place path for uncompressed messages is untouched and allocates nothing. The
//! compressed size of a message is held to `max_message_size` too. The message buffer and the inflater
//! share one box that exists only while a message is being assembled — or, with client context
//! takeover, while the inflater must keep its window — so an idle connection holds neither, and the
//! reader costs no more per connection than it did without the extension (see [`crate::deflate`]).

use crate::buffer::ReadBuffer;
use crate::close::{parse_close_payload, CloseCode};
use crate::deflate::{DeflateParams, Inflater};
use crate::error::WireError;
use crate::frame::{decode_header, FrameHeader, OpCode, Role, MAX_HEADER_LEN};
use crate::mask::apply_mask;
use crate::utf8::Utf8Validator;

/// Size limits, enforced from frame headers. Values above `u32::MAX` (4 GiB − 1) act as `u32::MAX`: the
/// reader keeps them, and its position in a frame, as `u32`, because every idle connection carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame payload, in bytes (→ 1009).
    pub max_frame_payload: u64,
    /// Largest accepted message (sum of its fragments), in bytes (→ 1009).
    pub max_message_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 }
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A payload, as it lies in memory: `first` then `second` (non-empty only when a ring buffer wraps).
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    pub first: &'a [u8],
    pub second: &'a [u8],
}

impl<'a> Payload<'a> {
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as one slice when it is contiguous (always, unless a ring wrapped).
    pub fn contiguous(&self) -> Option<&'a [u8]> {
        if self.second.is_empty() {
            Some(self.first)
        } else if self.first.is_empty() {
            Some(self.second)
        } else {
            None
        }
    }

    /// Appends the payload to `out`.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.first);
        out.extend_from_slice(self.second);
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.copy_to(&mut v);
        v
    }
}

/// What the peer sent.
#[derive(Debug)]
pub enum Event<'a> {
    /// A complete data message (text is valid UTF-8).
    Message { opcode: OpCode, payload: Payload<'a> },
    /// A ping: answer with a pong carrying the same payload.
    Ping(Payload<'a>),
    /// A pong (solicited or not).
    Pong(Payload<'a>),
    /// A valid close frame; `code` is `NO_STATUS` (1005) when the payload was empty.
    Close { code: CloseCode, reason: &'a [u8] },
}

/// Message buffers up to this capacity are kept between messages; larger ones are freed after delivery.
const KEEP_MESSAGE_CAPACITY: usize = 0;

/// RSV1: the message is compressed (permessage-deflate, RFC 7692 §6).
const RSV1: u8 = 0x40;

/// What a message in assembly needs: its buffer and, for permessage-deflate, the inflater. Boxed, and
/// present only while used, so that an idle connection pays one pointer for both.
#[derive(Debug, Default)]
struct Assembly {
    message: Vec<u8>,
    /// Created on the first compressed message; kept between messages only with context takeover.
    inflater: Option<Inflater>,
    /// The message in progress is compressed (RSV1 on its first frame).
    compressed: bool,
    /// Compressed payload bytes of that message so far (held to the message limit as well).
    wire_len: u64,
}

/// The receive-side state of one WebSocket connection.
#[derive(Debug)]
pub struct Reader {
    role: Role,
    max_frame_payload: u32,
    max_message_size: u32,
    allowed_rsv: u8,
    /// Header of the frame whose payload is being received.
    frame: Option<FrameHeader>,
    /// Payload bytes of `frame` already moved out of the read buffer (streamed).
    frame_streamed: u32,
    /// Payload bytes at the front of the read buffer already unmasked (and UTF-8 checked). `u32`: read
    /// buffers are below 4 GiB, and every idle connection carries this struct.
    processed: u32,
    /// Opcode of the fragmented message in progress, if any.
    message: Option<OpCode>,
    /// Whether the payload of the frame in progress is streamed into the message buffer (`assembly`).
    streaming: bool,
    assembly: Option<Box<Assembly>>,
    utf8: Utf8Validator,
    /// The peer's largest deflate window (base-2 log); 0 while permessage-deflate is off.
    inflate_bits: u8,
    /// The peer resets its compressor after every message: so do we, and keep no inflater.
    inflate_no_context_takeover: bool,
    /// Read-buffer bytes to consume at the next call (the last event borrowed them).
    pending_consume: u32,
    /// The last event borrowed the message buffer; clear it at the next call.
    pending_clear: bool,
    /// A close frame was delivered; nothing after it is read.
    closed: bool,
}

impl Reader {
    pub fn new(role: Role, limits: Limits) -> Self {
        Reader {
            role,
            max_frame_payload: clamp_u32(limits.max_frame_payload),
            max_message_size: clamp_u32(limits.max_message_size),
            allowed_rsv: 0,
            frame: None,
            frame_streamed: 0,
            processed: 0,
            message: None,
            streaming: false,
            assembly: None,
            utf8: Utf8Validator::new(),
            inflate_bits: 0,
            inflate_no_context_takeover: true,
            pending_consume: 0,
            pending_clear: false,
            closed: false,
        }
    }

    /// Whether the reader is in the middle of a frame or message (bytes are owed to it).
    pub fn is_mid_message(&self) -> bool {
        self.frame.is_some() || self.message.is_some()
    }

    /// Turns permessage-deflate on with the negotiated parameters: RSV1 becomes legal on the first frame
    /// of a data message, and such messages are inflated. Call once the handshake has agreed on it.
    pub fn enable_deflate(&mut self, params: &DeflateParams) {
        // We inflate what the other end compresses.
        let (no_context_takeover, bits) = params.sender(self.role == Role::Client);
        self.allowed_rsv |= RSV1;
        self.inflate_bits = bits;
        self.inflate_no_context_takeover = no_context_takeover;
    }

    /// Heap bytes held for message assembly (the inflater's zlib state counted as an estimate: 15 KiB
    /// plus its window, ~47 KiB at 15 bits as measured in `tests/inflate_alloc.rs`).
    pub fn held_bytes(&self) -> usize {
        self.assembly.as_deref().map_or(0, |a| {
            let inflater =
                if a.inflater.is_some() { (15 << 10) + (1usize << self.inflate_bits.clamp(9, 15)) } else { 0 };
            std::mem::size_of::<Assembly>() + a.message.capacity() + inflater
        })
    }

    /// Whether an inflater (zlib state) is held right now.
    pub fn holds_inflater(&self) -> bool {
        self.assembly.as_deref().is_some_and(|a| a.inflater.is_some())
    }

    fn compressed(&self) -> bool {
        self.assembly.as_deref().is_some_and(|a| a.compressed)
    }

    fn assembly(&mut self) -> &mut Assembly {
        self.assembly.get_or_insert_with(Box::default)
    }

    /// After a message was delivered: frees its buffer, and the inflater unless its window must be kept.
    fn clear_assembly(&mut self) {
        let Some(a) = self.assembly.as_deref_mut() else { return };
        a.message.clear();
        if a.message.capacity() > KEEP_MESSAGE_CAPACITY {
            a.message = Vec::new();
        }
        a.compressed = false;
        a.wire_len = 0;
        if self.inflate_no_context_takeover {
            a.inflater = None;
        }
        if a.inflater.is_none() && a.message.capacity() == 0 {
            self.assembly = None;
        }
    }

    /// Inflates compressed payload bytes of the message in progress into the message buffer.
    fn inflate(&mut self, input: &[u8], text: bool) -> Result<(), WireError> {
        let cap = self.max_message_size as usize;
        let bits = self.inflate_bits;
        let a = self.assembly.get_or_insert_with(Box::default);
        let inflater = a.inflater.get_or_insert_with(|| Inflater::new(bits));
        inflater.inflate(input, &mut a.message, cap, text.then_some(&mut self.utf8))
    }

    /// Ends a compressed message: the stripped tail is inflated, the inflater readied for the next.
    fn finish_inflate(&mut self, text: bool) -> Result<(), WireError> {
        let cap = self.max_message_size as usize;
        let bits = self.inflate_bits;
        let a = self.assembly.get_or_insert_with(Box::default);
        let inflater = a.inflater.get_or_insert_with(|| Inflater::new(bits));
        inflater.finish_message(&mut a.message, cap, text.then_some(&mut self.utf8))
    }

    /// Applies what the previous event borrowed. Call before reading more into the buffer, so that the
    /// buffer has the room the last event was occupying (`next` also does this itself).
    ///
    /// Called several times per read by the driver and by `next`, and nearly always with nothing to do:
    /// the check is inlined, the work is not.
    #[inline]
    pub fn settle<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) {
        if self.pending_consume > 0 || self.pending_clear {
            self.settle_pending(buf);
        }
    }

    fn settle_pending<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) {
        if self.pending_consume > 0 {
            buf.consume(self.pending_consume as usize);
            self.pending_consume = 0;
        }
        if self.pending_clear {
            self.pending_clear = false;
            self.clear_assembly();
        }
    }

    /// Returns the next event, `Ok(None)` when more bytes are needed, or the protocol violation that
    /// must close the connection (see [`WireError::close_code`]).
    #[inline]
    pub fn next<'a, B: ReadBuffer + ?Sized>(&'a mut self, buf: &'a mut B) -> Result<Option<Event<'a>>, WireError> {
        buf.next_event(self)
    }

    /// [`Self::next`], reached through [`ReadBuffer::next_event`] with the buffer's concrete type.
    pub(crate) fn next_in<'a, B: ReadBuffer + ?Sized>(
        &'a mut self,
        buf: &'a mut B,
    ) -> Result<Option<Event<'a>>, WireError> {
        self.settle(buf);
        if self.closed {
            return Ok(None);
        }
        if self.frame.is_none() && self.message.is_none() {
            if buf.is_empty() {
                // The usual end of a read: every event parsed. In any state, no bytes means no event.
                return Ok(None);
            }
            let (first, _) = buf.readable_mut();
            if let Some(whole) = self.whole_frame(first) {
                return self.deliver_whole(buf, whole);
            }
        }
        loop {
            let header = match self.frame {
                Some(h) => h,
                None => match self.read_header(buf)? {
                    Some(h) => h,
                    None => return Ok(None),
                },
            };
            let remaining = header.payload_len - u64::from(self.frame_streamed);
            let available = (buf.len() as u64).min(remaining) as usize;
            if available > self.processed as usize {
                self.process(buf, &header, available)?;
            }
            let complete = available as u64 == remaining;

            if header.opcode.is_control() {
                if !complete {
                    // Control payloads are ≤ 125 bytes and every buffer holds at least 256: wait.
                    return Ok(None);
                }
                self.frame = None;
                self.processed = 0;
                self.pending_consume = available as u32;
                // Nothing after a close frame is read.
                self.closed = header.opcode == OpCode::Close;
                let (a, b) = buf.readable_mut();
                let (a, b) = split_prefix(a, b, available);
                let payload = Payload { first: a, second: b };
                return match header.opcode {
                    OpCode::Ping => Ok(Some(Event::Ping(payload))),
                    OpCode::Pong => Ok(Some(Event::Pong(payload))),
                    _ => {
                        // Close: its payload must be contiguous to parse; only a wrapped ring isn't.
                        let bytes: &[u8] = match payload.contiguous() {
                            Some(s) => s,
                            None => {
                                // Nothing is read after a close, so a message in assembly is moot.
                                let a = self.assembly.get_or_insert_with(Box::default);
                                a.message.clear();
                                payload.copy_to(&mut a.message);
                                self.pending_clear = true;
                                &a.message
                            }
                        };
                        let (code, reason) = parse_close_payload(bytes)?;
                        Ok(Some(Event::Close { code, reason }))
                    }
                };
            }

            let opcode = if header.opcode == OpCode::Continuation {
                self.message.unwrap_or(OpCode::Binary)
            } else {
                header.opcode
            };

            let compressed = self.compressed();
            if complete && !self.streaming && header.fin && self.message.is_none() && !compressed {
                // The common case: a whole single-frame message in the buffer, handed out in place.
                if opcode == OpCode::Text {
                    self.utf8.finish().map_err(|_| WireError::InvalidUtf8)?;
                }
                self.frame = None;
                self.processed = 0;
                self.pending_consume = available as u32;
                let (a, b) = buf.readable_mut();
                let (a, b) = split_prefix(a, b, available);
                return Ok(Some(Event::Message { opcode, payload: Payload { first: a, second: b } }));
            }

            // Here the frame is a fragment, already streaming, compressed, or incomplete (a fragment's
            // `fin == false` implies `message.is_some()`).
            let must_stream = self.streaming
                || self.message.is_some()
                || compressed
                || header.payload_len > buf.frame_capacity() as u64;
            if !must_stream {
                // A single frame that will fit: wait for the rest of it in place.
                return Ok(None);
            }
            self.streaming = true;
            {
                let (a, b) = buf.readable_mut();
                let (a, b) = split_prefix(a, b, available);
                if compressed {
                    let text = opcode == OpCode::Text;
                    self.inflate(a, text)?;
                    self.inflate(b, text)?;
                } else {
                    let message = &mut self.assembly().message;
                    message.extend_from_slice(a);
                    message.extend_from_slice(b);
                }
            }
            buf.consume(available);
            // Below the frame's length, which the limit kept within `u32`.
            self.frame_streamed += available as u32;
            self.processed = 0;
            if !complete {
                return Ok(None);
            }
            self.frame = None;
            self.frame_streamed = 0;
            self.streaming = false;
            if !header.fin {
                // More fragments to come; the next header continues the message.
                continue;
            }
            self.message = None;
            if compressed {
                self.finish_inflate(opcode == OpCode::Text)?;
            }
            if opcode == OpCode::Text {
                self.utf8.finish().map_err(|_| WireError::InvalidUtf8)?;
            }
            self.pending_clear = true;
            let message: &[u8] = self.assembly.as_deref().map_or(&[], |a| &a.message);
            return Ok(Some(Event::Message { opcode, payload: Payload { first: message, second: &[] } }));
        }
    }

    /// The fast path's test: whether the first readable region starts with a whole frame that the general
    /// path would hand out in place with no other effect — a final, uncompressed text or binary frame
    /// with a 7-bit length, masked as our role requires and within both limits. Anything else (control
    /// frames, fragments, RSV bits, longer or cut frames, a header the general path would reject) is
    /// `None` and goes the general way, which gives the same events and errors for these frames too.
    /// Call only between messages (`frame` and `message` empty).
    #[inline]
    fn whole_frame(&self, first: &[u8]) -> Option<WholeFrame> {
        let (&b0, &b1) = (first.first()?, first.get(1)?);
        let opcode = match b0 {
            0x81 => OpCode::Text,
            0x82 => OpCode::Binary,
            _ => return None,
        };
        let masked = b1 & 0x80 != 0;
        if masked != (self.role == Role::Server) {
            return None;
        }
        let len = b1 & 0x7f;
        if len >= 126 || u32::from(len) > self.max_frame_payload || u32::from(len) > self.max_message_size {
            return None;
        }
        let header_len = if masked { 6 } else { 2 };
        if first.len() < header_len + len as usize {
            return None;
        }
        let mask = masked.then(|| [first[2], first[3], first[4], first[5]]);
        Some(WholeFrame { opcode, header_len: header_len as u8, len, mask })
    }

    /// Unmasks, checks and hands out the frame [`Self::whole_frame`] found; header and payload are
    /// consumed together at the next call.
    #[inline]
    fn deliver_whole<'a, B: ReadBuffer + ?Sized>(
        &'a mut self,
        buf: &'a mut B,
        whole: WholeFrame,
    ) -> Result<Option<Event<'a>>, WireError> {
        let start = whole.header_len as usize;
        let end = start + whole.len as usize;
        // The same region `whole_frame` measured (nothing ran in between), so the range is in bounds.
        let (first, _) = buf.readable_mut();
        let payload = &mut first[start..end];
        if let Some(key) = whole.mask {
            apply_mask(payload, key, 0);
        }
        if whole.opcode == OpCode::Text && !crate::utf8::is_valid(payload) {
            return Err(WireError::InvalidUtf8);
        }
        self.pending_consume = end as u32;
        Ok(Some(Event::Message { opcode: whole.opcode, payload: Payload { first: payload, second: &[] } }))
    }

    /// Decodes and consumes the next header, applying the fragmentation rules and limits to it.
    fn read_header<B: ReadBuffer + ?Sized>(&mut self, buf: &mut B) -> Result<Option<FrameHeader>, WireError> {
        let (a, b) = buf.readable_mut();
        let decoded = if a.len() >= MAX_HEADER_LEN || b.is_empty() {
            decode_header(a, self.role, self.allowed_rsv)?
        } else {
            // The header straddles the end of a ring: look at it through a small copy.
            let mut tmp = [0u8; MAX_HEADER_LEN];
            let n1 = a.len();
            let n2 = b.len().min(MAX_HEADER_LEN - n1);
            tmp[..n1].copy_from_slice(a);
            tmp[n1..n1 + n2].copy_from_slice(&b[..n2]);
            decode_header(&tmp[..n1 + n2], self.role, self.allowed_rsv)?
        };
        let Some((header, header_len)) = decoded else {
            return Ok(None);
        };
        // `decode_header` let RSV1 through only if permessage-deflate is on; it is legal only on the first
        // frame of a data message.
        let rsv1 = header.rsv & RSV1 != 0;
        match header.opcode {
            OpCode::Continuation if self.message.is_none() => return Err(WireError::UnexpectedContinuation),
            OpCode::Text | OpCode::Binary => {
                if self.message.is_some() {
                    return Err(WireError::ExpectedContinuation);
                }
                self.utf8.reset();
                if !header.fin {
                    self.message = Some(header.opcode);
                }
                if rsv1 {
                    let a = self.assembly();
                    a.compressed = true;
                    a.wire_len = 0;
                }
            }
            _ if rsv1 => return Err(WireError::MisplacedRsv1),
            _ => {}
        }
        if !header.opcode.is_control() {
            if header.payload_len > u64::from(self.max_frame_payload) {
                return Err(WireError::FrameTooLarge);
            }
            let max = u64::from(self.max_message_size);
            match self.assembly.as_deref_mut() {
                // Compressed: the inflated size is capped as it is produced; the wire size here.
                Some(a) if a.compressed => {
                    a.wire_len += header.payload_len;
                    if a.wire_len > max {
                        return Err(WireError::MessageTooLarge);
                    }
                }
                a => {
                    let held = a.map_or(0, |a| a.message.len() as u64);
                    if held + header.payload_len > max {
                        return Err(WireError::MessageTooLarge);
                    }
                }
            }
        }
        buf.consume(header_len);
        self.frame = Some(header);
        self.frame_streamed = 0;
        self.processed = 0;
        Ok(Some(header))
    }

    /// Unmasks (and UTF-8-checks) payload bytes `processed..available` at the front of the buffer.
    fn process<B: ReadBuffer + ?Sized>(
        &mut self,
        buf: &mut B,
        header: &FrameHeader,
        available: usize,
    ) -> Result<(), WireError> {
        // A compressed message is UTF-8-checked after inflating, not here.
        let is_text = !self.compressed()
            && match header.opcode {
                OpCode::Text => true,
                OpCode::Continuation => self.message == Some(OpCode::Text),
                _ => false,
            };
        let (a, b) = buf.readable_mut();
        let (a, b) = split_prefix_mut(a, b, available);
        let (a, b) = skip_prefix_mut(a, b, self.processed as usize);
        let offset = (self.frame_streamed as usize).wrapping_add(self.processed as usize);
        if let Some(key) = header.mask {
            apply_mask(a, key, offset);
            apply_mask(b, key, offset.wrapping_add(a.len()));
        }
        if is_text {
            self.utf8.feed(a).map_err(|_| WireError::InvalidUtf8)?;
            self.utf8.feed(b).map_err(|_| WireError::InvalidUtf8)?;
        }
        self.processed = available as u32;
        Ok(())
    }
}

/// A whole small frame at the front of the buffer, found by [`Reader::whole_frame`].
#[derive(Clone, Copy)]
struct WholeFrame {
    opcode: OpCode,
    header_len: u8,
    len: u8,
    mask: Option<[u8; 4]>,
}

/// The first `n` bytes of the two-slice sequence `(a, b)`.
fn split_prefix<'a>(a: &'a [u8], b: &'a [u8], n: usize) -> (&'a [u8], &'a [u8]) {
    if n <= a.len() {
        (&a[..n], &[])
    } else {
        (a, &b[..n - a.len()])
    }
}

fn split_prefix_mut<'a>(a: &'a mut [u8], b: &'a mut [u8], n: usize) -> (&'a mut [u8], &'a mut [u8]) {
    if n <= a.len() {
        (&mut a[..n], &mut [])
    } else {
        let al = a.len();
        (a, &mut b[..n - al])
    }
}

/// The two-slice sequence `(a, b)` without its first `n` bytes.
fn skip_prefix_mut<'a>(a: &'a mut [u8], b: &'a mut [u8], n: usize) -> (&'a mut [u8], &'a mut [u8]) {
    if n <= a.len() {
        (&mut a[n..], b)
    } else {
        let al = a.len();
        (&mut [], &mut b[n - al..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{fill_from, GrowableBuffer, RingBuffer};
    use crate::frame::encode_client_frame;

    /// What stays buffered right after `next` handed out a message: the fast path consumes a frame's
    /// header together with its payload at the next call, the general path consumes the header at once.
    fn buffered_after_message(buf: &mut dyn ReadBuffer, reader: &mut Reader) -> usize {
        match reader.next(buf) {
            Ok(Some(Event::Message { .. })) => {}
            other => panic!("expected a message, got {other:?}"),
        }
        buf.len()
    }

    /// The integration tests' "whole read" feeds must reach the fast path, and cut or unusual frames
    /// must not: this pins which path each kind of frame takes.
    #[test]
    fn only_whole_small_final_data_frames_take_the_fast_path() {
        let server = Limits::default();
        let masked = |fin: bool, op: OpCode, payload: &[u8]| {
            let mut f = Vec::new();
            encode_client_frame(&mut f, fin, op, payload, [1, 2, 3, 4]);
            f
        };
        // Fast: a whole masked text or binary frame of 7-bit length.
        for (op, payload) in
            [(OpCode::Text, &b"hello"[..]), (OpCode::Binary, &[0u8; 125][..]), (OpCode::Text, &b""[..])]
        {
            let f = masked(true, op, payload);
            let mut buf = GrowableBuffer::new(4096, 4096);
            let mut reader = Reader::new(Role::Server, server);
            fill_from(&mut buf, &f);
            assert_eq!(buffered_after_message(&mut buf, &mut reader), f.len(), "{op:?} {}", payload.len());
            assert!(matches!(reader.next(&mut buf), Ok(None)));
            assert_eq!(buf.len(), 0);
        }
        // General: a 16-bit length, and a frame that completes only in a later read.
        let f = masked(true, OpCode::Binary, &[9u8; 126]);
        let mut buf = GrowableBuffer::new(4096, 4096);
        let mut reader = Reader::new(Role::Server, server);
        fill_from(&mut buf, &f);
        assert_eq!(buffered_after_message(&mut buf, &mut reader), 126);
        let f = masked(true, OpCode::Text, b"cut in two");
        let mut buf = GrowableBuffer::new(4096, 4096);
        let mut reader = Reader::new(Role::Server, server);
        fill_from(&mut buf, &f[..8]);
        assert!(matches!(reader.next(&mut buf), Ok(None)));
        fill_from(&mut buf, &f[8..]);
        assert_eq!(buffered_after_message(&mut buf, &mut reader), 10);
        // General: a frame that wraps around the end of a ring.
        let mut ring = RingBuffer::new(256);
        let mut reader = Reader::new(Role::Server, server);
        let mut st = masked(true, OpCode::Binary, &[4u8; 242]);
        assert_eq!(st.len(), 250);
        st.extend(masked(true, OpCode::Binary, &[5u8; 20]));
        assert_eq!(fill_from(&mut ring, &st), 256);
        assert_eq!(buffered_after_message(&mut ring, &mut reader), 242 + 6);
        reader.settle(&mut ring);
        fill_from(&mut ring, &st[256..]);
        assert_eq!(buffered_after_message(&mut ring, &mut reader), 20);
        // A client reads unmasked frames the same way.
        let f = [0x82, 3, 7, 8, 9];
        let mut buf = GrowableBuffer::new(4096, 4096);
        let mut reader = Reader::new(Role::Client, server);
        fill_from(&mut buf, &f);
        assert_eq!(buffered_after_message(&mut buf, &mut reader), f.len());
    }

    /// Every connection carries a reader, and the server's connection future is at a size-class edge
    /// (ARCHITECTURE.md): the extension must not make the reader any larger than the 72 B it was.
    #[test]
    fn reader_stays_small() {
        let size = std::mem::size_of::<Reader>();
        println!("Reader: {size} B");
        assert!(size <= 72, "Reader grew to {size} B");
    }
}
