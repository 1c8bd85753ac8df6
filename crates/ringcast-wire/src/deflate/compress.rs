//! Deflating what the server sends: per connection ([`Deflater`]) or once for many ([`FrameCompressor`]).
//!
//! A compressed message is raw deflate ended with a sync flush, whose trailing `00 00 ff ff` is stripped
//! (RFC 7692 §7.2.1), sent as one frame with RSV1 set. Frames are written whole: the body is compressed
//! straight into the output behind room for the longest header, then moved up against the real header.
//!
//! **Context takeover and uncompressed messages.** With server context takeover the compressor keeps its
//! window between messages, and the client's inflater mirrors it message by message. A message we send
//! *uncompressed* (shorter than `min_size`, RSV1 clear) never reaches the client's inflater, so it must
//! never reach our compressor either: it is written as a plain frame without touching the compressor.
//! (Feeding it to the compressor "to keep the window warm" would make the next compressed message refer
//! to bytes the client never inflated, and corrupt everything after it.)
//!
//! **Sharing.** Without server context takeover a compressed message depends on nothing but its own
//! bytes, the level and the window, so one frame serves every such subscriber whose negotiated
//! `server_max_window_bits` is at least the window it was compressed with ([`Deflater::shared_window`]).
//! A subscriber with context takeover needs its own compression: its frames depend on what it was sent
//! before, so they cost their own CPU and its ~370 KiB compressor.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};

use super::{DeflateConfig, DeflateParams, TAIL};
use crate::frame::{encode_frame, encode_header, OpCode, MAX_HEADER_LEN};

/// RSV1, in the first header byte: "this message is compressed".
const RSV1: u8 = 0x40;

/// Compresses `payload` as one message with `c` and appends the whole frame (RSV1 set) to `out`.
/// `false` (and `out` as it was) if zlib failed, which it does not for valid parameters.
fn deflate_frame(c: &mut Compress, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.resize(start + MAX_HEADER_LEN, 0);
    out.reserve(payload.len() / 2 + 64);
    let mut input = payload;
    loop {
        let before = c.total_in();
        if c.compress_vec(input, out, FlushCompress::Sync).is_err() {
            out.truncate(start);
            return false;
        }
        input = &input[(c.total_in() - before) as usize..];
        // A sync flush is complete once zlib returns with room to spare.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(input.len() / 2 + 256);
    }
    let body_start = start + MAX_HEADER_LEN;
    if !out[body_start..].ends_with(&TAIL) {
        out.truncate(start);
        return false;
    }
    out.truncate(out.len() - TAIL.len());
    let body = out.len() - body_start;
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, opcode, body as u64, None);
    hdr[0] |= RSV1;
    out.copy_within(body_start.., start + n);
    out.truncate(start + n + body);
    out[start..start + n].copy_from_slice(&hdr[..n]);
    true
}

/// Appends an uncompressed frame (RSV1 clear).
fn plain_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    out.extend_from_slice(&hdr[..n]);
    out.extend_from_slice(payload);
}

/// Compresses whole messages without context: every frame it makes stands alone, so it can be shared
/// by any number of subscribers that negotiated `server_no_context_takeover` and a window of at least
/// [`Self::window_bits`]. Keep one per thread (or per fan-out task): its zlib state is ~370 KiB.
pub struct FrameCompressor {
    inner: Compress,
    level: u32,
    window_bits: u8,
}

impl std::fmt::Debug for FrameCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCompressor").field("level", &self.level).field("window_bits", &self.window_bits).finish()
    }
}

impl FrameCompressor {
    /// `level` 0–9 and `window_bits` 9–15 (both clamped).
    pub fn new(level: u32, window_bits: u8) -> Self {
        let level = level.min(9);
        let window_bits = window_bits.clamp(9, 15);
        FrameCompressor {
            inner: Compress::new_with_window_bits(Compression::new(level), false, window_bits),
            level,
            window_bits,
        }
    }

    pub fn window_bits(&self) -> u8 {
        self.window_bits
    }

    /// Appends one complete server frame carrying `payload` compressed (RSV1 set). Should zlib ever
    /// fail, the frame is written uncompressed instead, which is always valid.
    pub fn encode_frame_into(&mut self, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
        self.inner.reset();
        if !deflate_frame(&mut self.inner, opcode, payload, out) {
            plain_frame(opcode, payload, out);
        }
    }

    /// One complete server frame as a shareable `Bytes` (one allocation, however many subscribers).
    pub fn encode_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len() / 2 + 64);
        self.encode_frame_into(opcode, payload, &mut out);
        Bytes::from(out)
    }
}

thread_local! {
    /// Per-thread compressors for messages without context, one per (level, window) in use.
    static COMPRESSORS: RefCell<Vec<FrameCompressor>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's context-free compressor for (`level`, `window_bits`).
fn with_thread_compressor<R>(level: u32, window_bits: u8, f: impl FnOnce(&mut FrameCompressor) -> R) -> R {
    let level = level.min(9);
    let window_bits = window_bits.clamp(9, 15);
    COMPRESSORS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut list) => {
            let i = match list.iter().position(|c| c.level == level && c.window_bits == window_bits) {
                Some(i) => i,
                None => {
                    list.push(FrameCompressor::new(level, window_bits));
                    list.len() - 1
                }
            };
            f(&mut list[i])
        }
        // Re-entered from inside `f` (not done here): use a temporary one rather than fail.
        Err(_) => f(&mut FrameCompressor::new(level, window_bits)),
    })
}

/// Compresses a publication once into a complete server frame (RSV1 set) that every subscriber with
/// `Deflater::shared_window() == Some(window_bits)` (or more) can be sent: the compress-once fan-out.
/// Uses a per-thread compressor, so it allocates only the frame itself.
pub fn compressed_frame(opcode: OpCode, payload: &[u8], level: u32, window_bits: u8) -> Bytes {
    with_thread_compressor(level, window_bits, |c| c.encode_frame(opcode, payload))
}

/// One connection's sending half of permessage-deflate (server → client frames).
///
/// Without server context takeover it holds no zlib state at all (it borrows the thread's compressor,
/// reset per message); with it, its own compressor is created on the first compressed message and kept.
pub struct Deflater {
    level: u32,
    min_size: usize,
    /// Our window; 8 means "the client demanded 8, which zlib cannot do": send everything uncompressed.
    window_bits: u8,
    context_takeover: bool,
    own: Option<Box<Compress>>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("level", &self.level)
            .field("min_size", &self.min_size)
            .field("window_bits", &self.window_bits)
            .field("context_takeover", &self.context_takeover)
            .field("holds_state", &self.own.is_some())
            .finish()
    }
}

impl Deflater {
    /// The server's sending half for a connection that negotiated `params` under `config`.
    pub fn new(params: &DeflateParams, config: &DeflateConfig) -> Self {
        Deflater {
            level: config.level.min(9),
            min_size: config.min_size,
            window_bits: params.server_max_window_bits().min(config.server_bits()),
            context_takeover: !params.server_no_context_takeover(),
            own: None,
        }
    }

    /// The sending half without server context takeover, for the window `bits` that
    /// [`Self::shared_window`] returned: equal to the `Deflater` that returned it. Such a `Deflater` holds
    /// no state between messages, so a connection can keep just `bits` (one byte) and make it again for
    /// each message it sends, rather than keep it on the heap.
    pub fn shared(bits: u8, config: &DeflateConfig) -> Self {
        Deflater {
            level: config.level.min(9),
            min_size: config.min_size,
            window_bits: bits,
            context_takeover: false,
            own: None,
        }
    }

    /// Whether a message of `len` bytes is sent compressed.
    pub fn compresses(&self, len: usize) -> bool {
        self.window_bits >= 9 && len >= self.min_size
    }

    /// `Some(bits)`: this connection has no server context takeover, so a frame compressed once with
    /// [`compressed_frame`] (or a [`FrameCompressor`]) of window `bits` or less is valid for it, for any
    /// message that [`Self::compresses`]. `None`: it needs its own compression ([`Self::encode_frame`]).
    pub fn shared_window(&self) -> Option<u8> {
        (!self.context_takeover && self.window_bits >= 9).then_some(self.window_bits)
    }

    /// The compression level, for [`compressed_frame`].
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Whether zlib state is held right now (only with context takeover, after a compressed message).
    pub fn holds_state(&self) -> bool {
        self.own.is_some()
    }

    /// Appends one complete server frame for `payload`: compressed with RSV1 set when it
    /// [`compresses`](Self::compresses), otherwise plain — and then the compressor is not touched.
    pub fn encode_frame_into(&mut self, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
        if !self.compresses(payload.len()) {
            plain_frame(opcode, payload, out);
            return;
        }
        if !self.context_takeover {
            with_thread_compressor(self.level, self.window_bits, |c| c.encode_frame_into(opcode, payload, out));
            return;
        }
        let (level, bits) = (self.level, self.window_bits);
        let c = self
            .own
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(Compression::new(level), false, bits)));
        if !deflate_frame(c, opcode, payload, out) {
            // The compressor's state is unknown now: drop it. A fresh stream is a valid continuation
            // for the client's inflater (it only refers to its own bytes).
            self.own = None;
            plain_frame(opcode, payload, out);
        }
    }

    /// [`Self::encode_frame_into`] as one `Bytes`.
    pub fn encode_frame(&mut self, opcode: OpCode, payload: &[u8]) -> Bytes {
        if !self.compresses(payload.len()) {
            return encode_frame(opcode, payload);
        }
        let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len() / 2 + 64);
        self.encode_frame_into(opcode, payload, &mut out);
        Bytes::from(out)
    }
}
