//! Server → client compression, checked by independent inflaters: miniz_oxide (another deflate
//! implementation) and our own reader in the client role.

mod support;

use ringcast_wire::buffer::{fill_from, GrowableBuffer};
use ringcast_wire::deflate::{compressed_frame, negotiate, DeflateConfig, DeflateParams, Deflater, FrameCompressor};
use ringcast_wire::frame::{OpCode, Role};
use ringcast_wire::{Event, Limits, Reader};
use support::{parse_server_frame, PeerInflate};

fn params(offer: &str, config: &DeflateConfig) -> DeflateParams {
    negotiate([offer.as_bytes()], config).expect("negotiated")
}

fn json(n: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = seed;
    while out.len() < n {
        out.extend_from_slice(
            format!("{{\"channel\":\"news:{}\",\"offset\":{},\"data\":\"hello\"}}", i % 7, i).as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

/// Decodes a sequence of server frames with a client-role reader using `params`.
fn client_decode(params: &DeflateParams, frames: &[u8]) -> Vec<Vec<u8>> {
    let mut buf = GrowableBuffer::new(4096, 1 << 20);
    let mut reader = Reader::new(Role::Client, Limits::default());
    reader.enable_deflate(params);
    let mut out = Vec::new();
    let mut rest = frames;
    while !rest.is_empty() {
        reader.settle(&mut buf);
        let n = fill_from(&mut buf, rest);
        rest = &rest[n..];
        while let Some(ev) = reader.next(&mut buf).expect("valid frames") {
            if let Event::Message { payload, .. } = ev {
                out.push(payload.to_vec());
            }
        }
    }
    out
}

/// The client side of one server frame: (compressed?, message) as miniz_oxide inflates it.
fn peer_read(peer: &mut PeerInflate, frame: &[u8]) -> (bool, Vec<u8>) {
    let (b0, payload) = parse_server_frame(frame);
    assert_eq!(b0 & 0x80, 0x80, "FIN");
    assert_eq!(b0 & 0x30, 0, "RSV2/RSV3 clear");
    if b0 & 0x40 != 0 {
        (true, peer.message(payload).expect("inflates"))
    } else {
        (false, payload.to_vec())
    }
}

#[test]
fn uncompressed_message_does_not_touch_the_context() {
    // Server context takeover: the client mirrors our window message by message. The middle message is
    // below min_size and goes out plain: had it entered our compressor, the third message would refer to
    // bytes the client never inflated.
    let config = DeflateConfig { server_context_takeover: true, min_size: 32, ..DeflateConfig::enabled() };
    let p = params("permessage-deflate", &config);
    assert!(!p.server_no_context_takeover());
    let mut d = Deflater::new(&p, &config);
    let first = json(600, 0);
    let small = b"{\"channel\":\"news:3\"}".to_vec(); // 20 bytes: below min_size
                                                      // The third message repeats the small one and the first: a compressor that saw the small one
                                                      // refers back to it.
    let mut third = small.clone();
    third.extend_from_slice(&small);
    third.extend_from_slice(&json(300, 0));
    let frames: Vec<Vec<u8>> =
        [&first, &small, &third].iter().map(|m| d.encode_frame(OpCode::Text, m).to_vec()).collect();
    assert!(d.holds_state(), "context takeover keeps a compressor");

    let mut peer = PeerInflate::new();
    assert_eq!(peer_read(&mut peer, &frames[0]), (true, first.clone()));
    assert_eq!(peer_read(&mut peer, &frames[1]), (false, small.clone()));
    assert_eq!(peer_read(&mut peer, &frames[2]), (true, third.clone()));
    // The takeover is real: the third frame is much smaller than the same message compressed alone.
    let alone = FrameCompressor::new(6, 15).encode_frame(OpCode::Text, &third);
    assert!(frames[2].len() < alone.len(), "{} vs {}", frames[2].len(), alone.len());

    // And our own reader, as a client, reads the same.
    let all: Vec<u8> = frames.concat();
    assert_eq!(client_decode(&p, &all), vec![first, small, third]);
}

#[test]
fn many_messages_with_context_takeover_round_trip() {
    let config = DeflateConfig { server_context_takeover: true, min_size: 100, ..DeflateConfig::enabled() };
    let p = params("permessage-deflate", &config);
    let mut d = Deflater::new(&p, &config);
    let mut peer = PeerInflate::new();
    for i in 0..200u32 {
        let msg = json(((i * 37) % 400) as usize, i);
        let f = d.encode_frame(OpCode::Binary, &msg);
        let (compressed, got) = peer_read(&mut peer, &f);
        assert_eq!(compressed, msg.len() >= 100, "message {i}");
        assert_eq!(got, msg, "message {i}");
    }
}

#[test]
fn without_context_takeover_one_frame_serves_every_subscriber() {
    let config = DeflateConfig::enabled();
    let browser = params("permessage-deflate; client_max_window_bits", &config);
    let other = params("permessage-deflate; server_no_context_takeover", &config);
    let (a, b) = (Deflater::new(&browser, &config), Deflater::new(&other, &config));
    assert_eq!(a.shared_window(), Some(15));
    assert_eq!(b.shared_window(), Some(15));
    assert!(!a.holds_state() && !b.holds_state(), "no zlib state per connection");
    let publication = json(1500, 42);
    let shared = compressed_frame(OpCode::Text, &publication, a.level(), 15);
    assert!(shared.len() < publication.len() / 2);
    assert_eq!(shared[0] & 0x40, 0x40, "RSV1");
    // Every subscriber inflates it with a fresh inflater (no shared history needed), repeatedly.
    let mut peer = PeerInflate::new();
    for _ in 0..3 {
        assert_eq!(peer_read(&mut peer, &shared), (true, publication.clone()));
        assert_eq!(peer_read(&mut PeerInflate::new(), &shared), (true, publication.clone()));
    }
    // Compressing again gives the same bytes: the frame depends only on the message.
    assert_eq!(compressed_frame(OpCode::Text, &publication, a.level(), 15), shared);
    // A connection's own Deflater without takeover makes the same frame too.
    let mut a = a;
    assert_eq!(a.encode_frame(OpCode::Text, &publication), shared);
    assert!(!a.holds_state());
}

/// What a connection keeps instead of its `Deflater` when it has no server context takeover: the window
/// bits alone, from which `Deflater::shared` makes one that sends exactly the same frames.
#[test]
fn a_deflater_without_context_takeover_is_made_again_from_its_window() {
    let config = DeflateConfig { level: 3, min_size: 100, ..DeflateConfig::enabled() };
    let small = json(99, 5);
    let large = json(4000, 6);
    for offer in [
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=9",
        "permessage-deflate; server_max_window_bits=12",
    ] {
        let p = params(offer, &config);
        let mut kept = Deflater::new(&p, &config);
        let bits = kept.shared_window().expect("no server context takeover");
        let mut made = Deflater::shared(bits, &config);
        assert_eq!(made.shared_window(), Some(bits), "{offer}");
        assert_eq!(made.level(), kept.level(), "{offer}");
        for msg in [&small, &large, &small, &large] {
            assert_eq!(made.compresses(msg.len()), kept.compresses(msg.len()), "{offer}");
            let frame = made.encode_frame(OpCode::Text, msg);
            assert_eq!(frame, kept.encode_frame(OpCode::Text, msg), "{offer}");
            assert_eq!(client_decode(&p, &frame), vec![msg.clone()], "{offer}");
        }
        assert!(!made.holds_state() && !kept.holds_state());
    }
}

#[test]
fn shared_frames_need_a_window_no_larger_than_the_subscribers() {
    let config = DeflateConfig::enabled();
    let p = params("permessage-deflate; server_max_window_bits=10", &config);
    let d = Deflater::new(&p, &config);
    assert_eq!(d.shared_window(), Some(10));
    let msg = json(5000, 1);
    let f = compressed_frame(OpCode::Binary, &msg, 6, 10);
    assert_eq!(peer_read(&mut PeerInflate::new(), &f), (true, msg.clone()));
    assert_eq!(client_decode(&p, &f), vec![msg]);
}

#[test]
fn server_window_of_8_bits_sends_uncompressed() {
    let config = DeflateConfig::enabled();
    let p = params("permessage-deflate; server_max_window_bits=8", &config);
    assert_eq!(
        p.header_value(),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8"
    );
    let mut d = Deflater::new(&p, &config);
    assert!(!d.compresses(10_000));
    assert_eq!(d.shared_window(), None);
    let msg = json(2000, 3);
    let f = d.encode_frame(OpCode::Text, &msg);
    assert_eq!(peer_read(&mut PeerInflate::new(), &f), (false, msg));
}

#[test]
fn messages_below_min_size_are_plain_frames() {
    let config = DeflateConfig { min_size: 64, ..DeflateConfig::enabled() };
    let p = params("permessage-deflate", &config);
    let mut d = Deflater::new(&p, &config);
    assert_eq!(&d.encode_frame(OpCode::Text, b"hello")[..], b"\x81\x05hello");
    let mut out = b"prefix".to_vec();
    d.encode_frame_into(OpCode::Binary, &[1, 2, 3], &mut out);
    assert_eq!(&out[..], b"prefix\x82\x03\x01\x02\x03");
}

#[test]
fn frames_append_after_existing_bytes_with_every_header_length() {
    // 7-bit, 16-bit and 64-bit payload lengths, appended behind bytes already in the buffer.
    let config = DeflateConfig { min_size: 0, level: 0, ..DeflateConfig::enabled() };
    let p = params("permessage-deflate", &config);
    let mut d = Deflater::new(&p, &config);
    for n in [0usize, 10, 200, 70_000] {
        let msg = json(n, 9);
        let mut out = b"xyz".to_vec();
        d.encode_frame_into(OpCode::Binary, &msg, &mut out);
        assert_eq!(&out[..3], b"xyz");
        assert_eq!(peer_read(&mut PeerInflate::new(), &out[3..]), (true, msg.clone()), "n {n}");
        assert_eq!(client_decode(&p, &out[3..]), vec![msg], "n {n}");
    }
}

#[test]
fn client_reader_inflates_with_server_context_takeover() {
    let config = DeflateConfig { server_context_takeover: true, min_size: 10, ..DeflateConfig::enabled() };
    let p = params("permessage-deflate", &config);
    let mut d = Deflater::new(&p, &config);
    let msgs: Vec<Vec<u8>> = (0..50).map(|i| json(50 + i * 13, i as u32)).collect();
    let stream: Vec<u8> = msgs.iter().flat_map(|m| d.encode_frame(OpCode::Text, m).to_vec()).collect();
    assert_eq!(client_decode(&p, &stream), msgs);
}
