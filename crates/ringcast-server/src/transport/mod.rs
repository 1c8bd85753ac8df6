//! How a protocol payload becomes bytes on a subscriber's transport.
//!
//! The pub/sub layer ([`crate::pubsub::hub`], [`crate::pubsub::node`]) fans out *payloads*: a push encoded once per wire
//! format (JSON, Protobuf). It does not know how a transport frames them. Each subscriber names its
//! [`Encoding`] — format and framing — and a publication is framed once per encoding in use and that one
//! `Bytes` is shared by every subscriber with the same encoding. A new transport (a compressed
//! WebSocket variant) is a new [`Framing`] here; the fan-out does not change.
//!
//! [`Framing::Tcp`] (the binary protocol of docs/tcp-protocol.md) is the one framing that does not wrap
//! a Centrifugo push: its MESSAGE frame carries the channel, the offset and the publication's raw data.
//! So a fan-out hands the hub two builders ([`crate::pubsub::hub::Frames`]): the push payload per format
//! for WebSocket framings, and the MESSAGE frame for TCP, each called at most once per publication.
//! Pushes that have no TCP form (join/leave) have no MESSAGE builder and skip TCP subscribers.
//!
//! Also here, because every transport's connection task uses them: [`outbound`], the queue of shared,
//! pre-encoded frames flushed with `writev`, and [`deadline`], every connection's deadlines in one swept
//! table (also how shutdown reaches them), and [`stream`], the plain or TLS byte stream under a connection.

pub mod deadline;
pub mod outbound;
pub mod stream;

use bytes::{BufMut, Bytes, BytesMut};
use ringcast_protocol::Format;
use ringcast_wire::deflate::compressed_frame;
use ringcast_wire::frame::{encode_header, OpCode, MAX_HEADER_LEN};

/// How a transport delimits messages on its byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// One unmasked, unfragmented RFC 6455 frame per message (text for JSON, binary for Protobuf).
    WebSocket,
    /// The same, compressed with permessage-deflate without server context takeover (RSV1 set), so
    /// one frame serves every subscriber that negotiated it: a publication is compressed once.
    /// Messages shorter than `min_size` are framed as [`Framing::WebSocket`] (RSV1 clear).
    ///
    /// The parameters are the server's (`compression_*`), the same for every subscriber of a node,
    /// which is why all values share one cache slot. Only subscribers whose negotiated
    /// `server_max_window_bits` is the configured one get this framing; one that asked for a smaller
    /// window receives publications uncompressed (a frame made with a larger window could refer past
    /// its window), and no client-protocol connection is granted server context takeover.
    WebSocketDeflate(DeflateFraming),
    /// The raw TCP binary protocol: a publication is one MESSAGE frame (`ringcast_wire::tcp`); the
    /// format is irrelevant (its data is sent as published).
    Tcp,
}

/// How [`Framing::WebSocketDeflate`] compresses: small, so an [`Encoding`] stays a few bytes in every
/// subscriber's shared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeflateFraming {
    /// zlib level, 0–9.
    pub level: u8,
    /// Compressor window, 9–15.
    pub window_bits: u8,
    /// Shorter payloads go uncompressed (`compression_min_size`, validated to fit).
    pub min_size: u16,
}

impl Framing {
    /// One of each kind (the cache is indexed by kind, not by parameters).
    const ALL: [Framing; 3] = [
        Framing::WebSocket,
        Framing::WebSocketDeflate(DeflateFraming { level: 6, window_bits: 15, min_size: 64 }),
        Framing::Tcp,
    ];

    fn index(self) -> usize {
        match self {
            Framing::WebSocket => 0,
            Framing::WebSocketDeflate(_) => 1,
            Framing::Tcp => 2,
        }
    }
}

/// What a subscriber receives: payloads in `format`, framed by `framing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoding {
    pub format: Format,
    pub framing: Framing,
}

impl Encoding {
    /// How many distinct encodings exist: the size of a per-publication frame cache.
    pub const COUNT: usize = Framing::ALL.len() * 2;

    pub const fn websocket(format: Format) -> Encoding {
        Encoding { format, framing: Framing::WebSocket }
    }

    /// A TCP subscriber. Its format is fixed (JSON) so that every TCP subscriber shares one cache slot.
    pub const fn tcp() -> Encoding {
        Encoding { format: Format::Json, framing: Framing::Tcp }
    }

    /// A dense index in `0..COUNT`, for caches.
    pub fn index(self) -> usize {
        let format = match self.format {
            Format::Json => 0,
            Format::Protobuf => 1,
        };
        self.framing.index() * 2 + format
    }

    /// Whether this encoding's frames are built from the publication itself (channel, offset, raw data)
    /// rather than from a Centrifugo push payload: TCP.
    pub fn is_raw(self) -> bool {
        self.framing == Framing::Tcp
    }

    /// Frames one Centrifugo push payload for this encoding; `None` for framings that do not carry
    /// Centrifugo pushes (TCP: its frames are built from the publication itself).
    pub fn frame(self, payload: &[u8]) -> Option<Bytes> {
        match self.framing {
            Framing::WebSocket => Some(ws_frame(self.format, payload)),
            Framing::WebSocketDeflate(d) if payload.len() >= usize::from(d.min_size) => {
                Some(compressed_frame(opcode(self.format), payload, u32::from(d.level), d.window_bits))
            }
            Framing::WebSocketDeflate(_) => Some(ws_frame(self.format, payload)),
            Framing::Tcp => None,
        }
    }
}

fn opcode(format: Format) -> OpCode {
    if format.is_binary() {
        OpCode::Binary
    } else {
        OpCode::Text
    }
}

/// Wraps a protocol payload in one unmasked WebSocket frame (text for JSON, binary for Protobuf).
pub fn ws_frame(format: Format, payload: &[u8]) -> Bytes {
    let opcode = opcode(format);
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    let mut out = BytesMut::with_capacity(h + payload.len());
    out.put_slice(&hdr[..h]);
    out.put_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_has_its_own_cache_slot() {
        let mut seen = [false; Encoding::COUNT];
        for framing in Framing::ALL {
            for format in [Format::Json, Format::Protobuf] {
                let i = Encoding { format, framing }.index();
                assert!(!seen[i], "slot {i} taken twice");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn websocket_framing_picks_text_or_binary_by_format() {
        assert_eq!(Encoding::websocket(Format::Json).frame(b"{}").as_deref(), Some(&[0x81, 2, b'{', b'}'][..]));
        assert_eq!(Encoding::websocket(Format::Protobuf).frame(b"\x01").as_deref(), Some(&[0x82, 1, 1][..]));
        assert_eq!(Encoding::tcp().frame(b"{}"), None, "TCP frames are not Centrifugo pushes");
    }

    #[test]
    fn deflate_framing_sets_rsv1_only_from_min_size() {
        let d = DeflateFraming { level: 6, window_bits: 15, min_size: 16 };
        let enc = Encoding { format: Format::Json, framing: Framing::WebSocketDeflate(d) };
        assert_eq!(&enc.frame(b"{}").expect("a frame")[..], &[0x81, 2, b'{', b'}'], "short: plain, RSV1 clear");
        let long = br#"{"text":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#;
        let frame = enc.frame(long).expect("a frame");
        assert_eq!(frame[0], 0xC1, "compressed text: FIN + RSV1");
        assert!(frame.len() < long.len(), "{} >= {}", frame.len(), long.len());
    }
}
