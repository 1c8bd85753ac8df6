//! The TCP binary protocol's decoder, run against every read-buffer strategy.
//!
//! Buffers are deliberately small (256 bytes) so that frames wrap around the ring, get compacted in the
//! pool buffer, and bodies larger than the buffer are streamed rather than held whole. Frames are built
//! here by hand (header, `crc32fast::hash`) rather than by the encoder, so that the decoder is checked
//! against the specification and not only against its own other half.

mod support;

use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use ringcast_wire::buffer::{
    fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer, Strategy,
};
use ringcast_wire::frame::Role;
use ringcast_wire::tcp::{Command, Decoder, ErrorCode, Malformed, TcpError, DEFAULT_MAX_BODY, HEADER_LEN};
use support::cut_at;

/// A frame as the decoder delivered it: its command code, body, and what decoding its command gave
/// (`None`: a valid command).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    cmd: u16,
    body: Vec<u8>,
    command_error: Option<TcpError>,
}

fn buffer(strategy: Strategy, size: usize) -> AnyBuffer {
    match strategy {
        Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(size)),
        Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(BufferPool::new(size, 4))),
        Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(size, size)),
    }
}

/// Feeds `chunks` (as successive socket reads) through a server-side decoder; returns the frames and
/// the fatal error, if any. The decoder's own buffer is checked to be empty between frames.
fn decode_with(strategy: Strategy, size: usize, max_body: u32, chunks: &[&[u8]]) -> (Vec<Out>, Option<TcpError>) {
    let mut buf = buffer(strategy, size);
    let mut decoder = Decoder::new(max_body);
    let mut frames = Vec::new();
    for chunk in chunks {
        let mut off = 0;
        let mut stalled = 0;
        loop {
            decoder.settle(&mut buf);
            let n = fill_from(&mut buf, &chunk[off..]);
            off += n;
            loop {
                match decoder.next(&mut buf) {
                    Ok(Some(f)) => frames.push(Out {
                        cmd: f.cmd,
                        body: f.body.to_vec(),
                        command_error: f.command(Role::Server).err(),
                    }),
                    Ok(None) => break,
                    Err(e) => {
                        assert!(e.is_fatal(), "{e:?} came from the framing but is not fatal");
                        return (frames, Some(e));
                    }
                }
            }
            decoder.settle(&mut buf);
            if !decoder.is_mid_frame() {
                assert_eq!(decoder.held_bytes(), 0, "{strategy:?}: body buffer kept between frames");
            }
            buf.release();
            if off == chunk.len() {
                break;
            }
            stalled = if n == 0 { stalled + 1 } else { 0 };
            assert!(stalled < 2, "{strategy:?}: buffer full and decoder made no progress");
        }
    }
    (frames, None)
}

fn decode(strategy: Strategy, chunks: &[&[u8]]) -> (Vec<Out>, Option<TcpError>) {
    decode_with(strategy, 256, DEFAULT_MAX_BODY, chunks)
}

/// A frame built from the specification's table: magic, version, cmd, body_len, CRC over bytes 0..9
/// and the body, then the body.
fn frame(cmd: u16, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0x42, 0x4D, 0x01];
    f.extend_from_slice(&cmd.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let mut hashed = f.clone();
    hashed.extend_from_slice(body);
    f.extend_from_slice(&crc32fast::hash(&hashed).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn publish_body(channel: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (channel.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(channel.as_bytes());
    b.extend_from_slice(data);
    b
}

fn ok(cmd: u16, body: &[u8]) -> Out {
    Out { cmd, body: body.to_vec(), command_error: None }
}

macro_rules! for_each_strategy {
    ($($name:ident => $body:expr;)*) => {
        $(
            mod $name {
                use super::*;
                #[test] fn ring() { ($body)(Strategy::Ring) }
                #[test] fn pool() { ($body)(Strategy::Pool) }
                #[test] fn growable() { ($body)(Strategy::Growable) }
            }
        )*
    };
}

for_each_strategy! {
    single_publish_decodes => |s| {
        let body = publish_body("news", br#"{"x":1}"#);
        let (out, err) = decode(s, &[&frame(0x0004, &body)]);
        assert_eq!(err, None);
        assert_eq!(out, vec![ok(0x0004, &body)]);
    };
    glued_frames_decode_in_order => |s| {
        let mut glued = Vec::new();
        let mut expected = Vec::new();
        for i in 0..30u8 {
            let body = publish_body("ch", &[i; 9]);
            glued.extend(frame(0x0004, &body));
            expected.push(ok(0x0004, &body));
        }
        let (out, err) = decode(s, &[&glued]);
        assert_eq!(err, None);
        assert_eq!(out, expected);
    };
    one_byte_at_a_time_decodes => |s| {
        let mut stream = frame(0x0001, b"token");
        stream.extend(frame(0x0002, "ns:κόσμε".as_bytes()));
        stream.extend(frame(0x0005, b""));
        stream.extend(frame(0x0004, &publish_body("news", &[0xAB; 300])));
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, err) = decode(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(out, vec![
            ok(0x0001, b"token"),
            ok(0x0002, "ns:κόσμε".as_bytes()),
            ok(0x0005, b""),
            ok(0x0004, &publish_body("news", &[0xAB; 300])),
        ]);
    };
    body_larger_than_the_buffer_is_streamed => |s| {
        let data: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let body = publish_body("big", &data);
        let mut stream = frame(0x0004, &body);
        stream.extend(frame(0x0005, b"after"));
        let pieces: Vec<&[u8]> = stream.chunks(1000).collect();
        let (out, err) = decode(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(out, vec![ok(0x0004, &body), ok(0x0005, b"after")]);
    };
    one_mib_body_decodes => |s| {
        // A body of exactly the default limit, 1 MiB, through a 64 KiB buffer, in 64 KiB reads.
        let data: Vec<u8> = (0..(1u32 << 20) - 6).map(|i| (i % 253) as u8).collect();
        let body = publish_body("news", &data);
        assert_eq!(body.len(), 1 << 20);
        let stream = frame(0x0004, &body);
        let pieces: Vec<&[u8]> = stream.chunks(65_536).collect();
        let (out, err) = decode_with(s, 65_536, DEFAULT_MAX_BODY, &pieces);
        assert_eq!(err, None);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0], ok(0x0004, &body));
        // And whole, through a buffer large enough to hold it in place.
        let (out, err) = decode_with(s, 2 << 20, DEFAULT_MAX_BODY, &[&stream]);
        assert_eq!(err, None);
        assert_eq!(out, vec![ok(0x0004, &body)]);
    };
    body_over_the_limit_is_error_4_before_the_body_arrives => |s| {
        // The header alone of a frame whose body is one byte over 1 MiB: no body byte has been sent.
        let mut header = frame(0x0004, b"");
        header[5..9].copy_from_slice(&(DEFAULT_MAX_BODY + 1).to_be_bytes());
        let (out, err) = decode(s, &[&header[..9]]);
        assert_eq!(out, vec![]);
        assert_eq!(err, Some(TcpError::BodyTooLarge { len: DEFAULT_MAX_BODY + 1, max: DEFAULT_MAX_BODY }));
        assert_eq!(err.map(TcpError::code), Some(ErrorCode::BODY_TOO_LARGE));
        // After a good frame, too.
        let mut stream = frame(0x0005, b"p");
        stream.extend_from_slice(&header);
        let (out, err) = decode(s, &[&stream]);
        assert_eq!(out, vec![ok(0x0005, b"p")]);
        assert_eq!(err.map(TcpError::code), Some(ErrorCode::BODY_TOO_LARGE));
    };
    bad_magic_is_error_1_and_ends_the_stream => |s| {
        let mut stream = frame(0x0005, b"p");
        stream.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        stream.extend(frame(0x0005, b"never"));
        let (out, err) = decode(s, &[&stream]);
        assert_eq!(out, vec![ok(0x0005, b"p")]);
        assert_eq!(err, Some(TcpError::BadMagic));
        assert_eq!(err.map(TcpError::code), Some(ErrorCode::BAD_MAGIC));
    };
    unsupported_version_is_error_2 => |s| {
        let mut f = frame(0x0005, b"p");
        f[2] = 2;
        let (out, err) = decode(s, &[&f[..3]]);
        assert_eq!(out, vec![]);
        assert_eq!(err, Some(TcpError::UnsupportedVersion(2)));
        assert_eq!(err.map(TcpError::code), Some(ErrorCode::UNSUPPORTED_VERSION));
    };
    crc_mismatch_is_error_3_in_place_and_streamed => |s| {
        for data_len in [10usize, 5_000] {
            let body = publish_body("news", &vec![7u8; data_len]);
            let mut f = frame(0x0004, &body);
            let last = f.len() - 1;
            f[last] ^= 0x80;
            let pieces: Vec<&[u8]> = f.chunks(97).collect();
            let (out, err) = decode(s, &pieces);
            assert_eq!(out, vec![], "body of {data_len}");
            assert!(matches!(err, Some(TcpError::CrcMismatch { .. })), "body of {data_len}: {err:?}");
            assert_eq!(err.map(TcpError::code), Some(ErrorCode::CRC_MISMATCH));
        }
    };
    unknown_command_is_error_5_and_the_next_frame_decodes => |s| {
        let mut stream = frame(0x0077, b"whatever");
        // MESSAGE is the server's push: a server receiving one treats it as unknown too.
        stream.extend(frame(0x8010, b"\x00\x01c\0\0\0\0\0\0\0\x01d"));
        stream.extend(frame(0x0002, b"news"));
        let (out, err) = decode(s, &[&stream]);
        assert_eq!(err, None);
        assert_eq!(out, vec![
            Out { cmd: 0x0077, body: b"whatever".to_vec(), command_error: Some(TcpError::UnknownCommand(0x0077)) },
            Out {
                cmd: 0x8010,
                body: b"\x00\x01c\0\0\0\0\0\0\0\x01d".to_vec(),
                command_error: Some(TcpError::UnknownCommand(0x8010)),
            },
            ok(0x0002, b"news"),
        ]);
        assert_eq!(out[0].command_error.map(TcpError::code), Some(ErrorCode::UNKNOWN_COMMAND));
    };
    malformed_body_is_error_6_and_the_next_frame_decodes => |s| {
        let cases: [(u16, &[u8], Malformed); 4] = [
            (0x0002, b"ne\xffws", Malformed::InvalidUtf8),
            (0x0004, b"\x00", Malformed::ShortBody),
            (0x0004, b"\x00\x09news", Malformed::ChannelPastEnd),
            (0x0005, &[0u8; 126], Malformed::PingTooLong),
        ];
        for (cmd, body, why) in cases {
            let mut stream = frame(cmd, body);
            stream.extend(frame(0x0003, b"news"));
            let (out, err) = decode(s, &[&stream]);
            assert_eq!(err, None);
            assert_eq!(out, vec![
                Out { cmd, body: body.to_vec(), command_error: Some(TcpError::MalformedBody(why)) },
                ok(0x0003, b"news"),
            ]);
            assert_eq!(out[0].command_error.map(TcpError::code), Some(ErrorCode::MALFORMED_BODY));
        }
    };
}

#[test]
fn commands_borrow_the_body_in_place() {
    let body = publish_body("news", b"payload");
    let mut buf = GrowableBuffer::new(256, 256);
    fill_from(&mut buf, &frame(0x0004, &body));
    let mut decoder = Decoder::default();
    let f = decoder.next(&mut buf).unwrap().unwrap();
    assert_eq!(f.command(Role::Server), Ok(Command::Publish { channel: "news", data: b"payload" }));
    assert_eq!(decoder.held_bytes(), 0, "an in-place frame is not copied");
}

#[test]
fn a_frame_at_every_ring_offset_decodes() {
    // The frame starts at each of the ring's 256 positions in turn, so that its header, its channel
    // length, its channel and its data each straddle the end of the ring at some offset.
    let body = publish_body("wrapped", &[9; 100]);
    let wrapped = frame(0x0004, &body);
    let mut straddled = 0;
    for shift in 0..256 {
        let mut ring = RingBuffer::new(256);
        let mut decoder = Decoder::default();
        // Move the ring's head to `shift` (an emptied ring rewinds to 0, so keep one byte in it).
        let mut prefix = vec![0u8; shift];
        prefix.push(wrapped[0]);
        assert_eq!(fill_from(&mut ring, &prefix), shift + 1);
        ring.consume(shift);
        assert_eq!(fill_from(&mut ring, &wrapped[1..]), wrapped.len() - 1);
        if !ring.readable_mut().1.is_empty() {
            straddled += 1;
        }
        let f = decoder.next(&mut ring).unwrap().unwrap();
        assert_eq!(
            f.command(Role::Server),
            Ok(Command::Publish { channel: "wrapped", data: &[9; 100] }),
            "shift {shift}"
        );
        decoder.settle(&mut ring);
        assert_eq!(ring.len(), 0);
    }
    assert_eq!(straddled, wrapped.len() - 1);
}

#[test]
fn encoder_output_matches_the_specification() {
    // The encoder and the hand-built frames of this file agree, byte for byte.
    let mut out = Vec::new();
    Command::Publish { channel: "news", data: br#"{"x":1}"# }.encode(&mut out).unwrap();
    assert_eq!(out, frame(0x0004, &publish_body("news", br#"{"x":1}"#)));
    assert_eq!(out.len(), HEADER_LEN + 13);
}

/// One frame of a random stream, and what the decoder must deliver for it.
#[derive(Debug, Clone)]
enum Item {
    Connect(String),
    Subscribe(String),
    Unsubscribe(String),
    Publish(String, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Unknown(u16, Vec<u8>),
    BadUtf8Subscribe,
}

fn item() -> impl proptest::strategy::Strategy<Value = Item> {
    let text = "[a-z:κό]{0,40}";
    prop_oneof![
        text.prop_map(Item::Connect),
        text.prop_map(Item::Subscribe),
        text.prop_map(Item::Unsubscribe),
        (text, proptest::collection::vec(any::<u8>(), 0..700)).prop_map(|(c, d)| Item::Publish(c, d)),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Item::Ping),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Item::Pong),
        (0x0006u16..0x8000, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(c, b)| Item::Unknown(c, b)),
        Just(Item::BadUtf8Subscribe),
    ]
}

fn encode_items(items: &[Item]) -> (Vec<u8>, Vec<Out>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for it in items {
        let (cmd, body, command_error) = match it {
            Item::Connect(t) => (0x0001, t.as_bytes().to_vec(), None),
            Item::Subscribe(c) => (0x0002, c.as_bytes().to_vec(), None),
            Item::Unsubscribe(c) => (0x0003, c.as_bytes().to_vec(), None),
            Item::Publish(c, d) => (0x0004, publish_body(c, d), None),
            Item::Ping(b) => (0x0005, b.clone(), None),
            Item::Pong(b) => (0x8005, b.clone(), None),
            Item::Unknown(c, b) => (*c, b.clone(), Some(TcpError::UnknownCommand(*c))),
            Item::BadUtf8Subscribe => {
                (0x0002, b"\xc0\xafx".to_vec(), Some(TcpError::MalformedBody(Malformed::InvalidUtf8)))
            }
        };
        stream.extend(frame(cmd, &body));
        expected.push(Out { cmd, body, command_error });
    }
    (stream, expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_frame_sequence_cut_anywhere_decodes_identically(
        items in proptest::collection::vec(item(), 1..12),
        cuts in proptest::collection::vec(0usize..20_000, 0..40),
        size in prop_oneof![Just(256usize), Just(300), Just(4096)],
    ) {
        let (stream, expected) = encode_items(&items);
        let pieces = cut_at(&stream, cuts);
        for s in Strategy::ALL {
            let (out, err) = decode_with(s, size, DEFAULT_MAX_BODY, &pieces);
            prop_assert_eq!(err, None, "{:?}", s);
            prop_assert_eq!(&out, &expected, "{:?}", s);
        }
    }

    #[test]
    fn valid_commands_decode_to_what_was_encoded(
        channel in "[a-z:κό]{0,40}",
        data in proptest::collection::vec(any::<u8>(), 0..700),
        offset in any::<u64>(),
    ) {
        // Encoder → decoder over a ring, for the server's push (as a client receives it).
        let push = ringcast_wire::tcp::encode_message(&channel, offset, &data).unwrap();
        let mut ring = RingBuffer::new(256);
        let mut decoder = Decoder::default();
        let mut got = None;
        for piece in push.chunks(37) {
            decoder.settle(&mut ring);
            fill_from(&mut ring, piece);
            if let Some(f) = decoder.next(&mut ring).unwrap() {
                got = Some(match f.command(Role::Client).unwrap() {
                    Command::Message { channel, offset, data } => (channel.to_owned(), offset, data.to_vec()),
                    other => panic!("{other:?}"),
                });
            }
        }
        prop_assert_eq!(got, Some((channel, offset, data)));
    }
}
