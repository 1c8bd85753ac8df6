//! permessage-deflate (RFC 7692): negotiation, inflating what the peer sends, deflating what we send.
//!
//! Three parts, each usable without the others:
//!
//! * [`negotiate`] reads the offers in a request's `Sec-WebSocket-Extensions` headers and picks the first
//!   one the server's [`DeflateConfig`] can accept; the [`DeflateParams`] it returns are the parameters in
//!   force and write the response header value. An offer we cannot parse, or one with a duplicated or
//!   unknown parameter, is declined; when no offer is acceptable the connection simply has no extension
//!   (the handshake never fails because of this header).
//! * Inflating lives inside the [`Reader`](crate::reader::Reader) (enabled with
//!   [`Reader::enable_deflate`](crate::reader::Reader::enable_deflate)): RSV1 on the first frame of a
//!   data message marks it compressed; its payload is inflated into the message buffer *as it arrives*,
//!   in bounded steps, with the message-size limit as a hard cap on the inflated size, and text is UTF-8
//!   checked on the inflated bytes. Uncompressed messages take exactly the path they took before (handed
//!   out in place, no allocation), so only compressed traffic pays for compression.
//! * [`Deflater`] compresses one connection's outgoing messages (with or without context takeover);
//!   [`FrameCompressor`] / [`compressed_frame`] compress a publication once into a frame that every
//!   subscriber without server context takeover can share.
//!
//! # Memory: state only while it is used
//! zlib's state is large — measured in `tests/inflate_alloc.rs` with zlib-rs at 15 window bits: an
//! inflater holds ~47 KiB, a compressor at level 6 ~370 KiB — so none of it is kept by an idle
//! connection unless context takeover makes it necessary:
//!
//! * The inflater is created on the first compressed message. Without client context takeover (our
//!   default: we always answer `client_no_context_takeover`) it is dropped when that message has been
//!   delivered, so an idle connection holds nothing. With client context takeover it must keep its
//!   window between messages, and stays.
//! * A [`Deflater`] without server context takeover (our default) holds no compressor at all: it borrows
//!   a per-thread one, reset for every message. With server context takeover it creates its own on the
//!   first compressed message and keeps it.
//!
//! # Window bits 8
//! zlib (and so zlib-rs and flate2) cannot *compress* a raw deflate stream with a 256-byte window (8 bits):
//! it refuses `windowBits = -8`. RFC 7692 §7.1.2.1 lets a client demand `server_max_window_bits=8`, and
//! requires the answer to carry the same or a smaller value, so answering 9 would be a violation (a
//! 9-bit stream can refer 512 bytes back, beyond the client's window). We accept such an offer, answer
//! `server_max_window_bits=8`, and send that connection's messages *uncompressed* (RSV1 clear), which the
//! extension permits for any message: inbound compression still works, and nothing we send can break the
//! client. Inflating is not affected: a client's 8-bit stream is inflated with a 9-bit window, which
//! decodes every stream whose distances fit in 256 bytes.
//!
//! # Close codes
//! RSV1 on a control frame or a continuation frame, or RSV1 without the extension: 1002. A compressed
//! payload that is not a valid deflate stream (or has data after a final block): 1002, because it is the
//! extension's framing of the message that is broken, not the message's content. A compressed text
//! message whose *inflated* bytes are not UTF-8: 1007, like any text message. An inflated size past the
//! message limit: 1009, the moment the limit is crossed.

mod compress;
mod inflate;
mod negotiate;

pub use compress::{compressed_frame, Deflater, FrameCompressor};
pub(crate) use inflate::Inflater;
pub use negotiate::{negotiate, DeflateParams};

/// The extension token.
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// The tail a sender strips from a compressed message and a receiver appends back (RFC 7692 §7.2.1).
pub(crate) const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The server's permessage-deflate settings: what it accepts and how it compresses.
///
/// The defaults suit a server with very many connections: the extension is off until enabled, and with
/// it on neither side keeps a compression context between messages, so nothing is held per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Accept permessage-deflate offers at all.
    pub enabled: bool,
    /// Let the server keep its compressor's window between messages (better ratio, ~370 KiB per
    /// connection, and no sharing of compressed frames). Off: we answer `server_no_context_takeover`.
    pub server_context_takeover: bool,
    /// Let the client keep its compressor's window between messages (then we keep an inflater, ~47 KiB,
    /// per connection). Off: we answer `client_no_context_takeover`.
    pub client_context_takeover: bool,
    /// The largest window our compressor uses, 9–15 (values outside are clamped). A client's smaller
    /// `server_max_window_bits` wins.
    pub server_max_window_bits: u8,
    /// The largest window we let a client compress with, 8–15 (clamped), when its offer allows us to
    /// limit it (`client_max_window_bits`). Smaller means a smaller inflater per connection.
    pub client_max_window_bits: u8,
    /// zlib compression level, 0–9 (clamped).
    pub level: u32,
    /// Messages shorter than this are sent uncompressed (RSV1 clear): deflating a few bytes costs more
    /// than it saves.
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: false,
            server_context_takeover: false,
            client_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            level: 6,
            min_size: 64,
        }
    }
}

impl DeflateConfig {
    /// The defaults, enabled.
    pub fn enabled() -> Self {
        DeflateConfig { enabled: true, ..DeflateConfig::default() }
    }

    pub(crate) fn server_bits(&self) -> u8 {
        self.server_max_window_bits.clamp(9, 15)
    }

    pub(crate) fn client_bits(&self) -> u8 {
        self.client_max_window_bits.clamp(8, 15)
    }
}
