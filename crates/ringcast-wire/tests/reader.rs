//! The receive-side rules of RFC 6455, run against every read-buffer strategy.
//!
//! Buffers are deliberately small (256 bytes) so that frames wrap around the ring, get compacted in the
//! pool buffer, and larger messages are streamed rather than held whole.

mod support;

use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use ringcast_wire::buffer::{
    fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer, Strategy,
};
use ringcast_wire::deflate::{negotiate, DeflateConfig, DeflateParams};
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{CloseCode, Event, Limits, Reader, WireError};
use support::{cut_at, PeerDeflate};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Msg(OpCode, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, Vec<u8>),
}

fn buffer(strategy: Strategy, size: usize) -> AnyBuffer {
    match strategy {
        Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(size)),
        Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(BufferPool::new(size, 4))),
        Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(size, size)),
    }
}

/// Feeds `chunks` (as successive socket reads) through a reader; returns the events and the error.
fn decode_with(strategy: Strategy, size: usize, limits: Limits, chunks: &[&[u8]]) -> (Vec<Ev>, Option<WireError>) {
    decode_full(strategy, size, limits, None, chunks)
}

/// [`decode_with`], with permessage-deflate enabled on the reader when `deflate` is given.
fn decode_full(
    strategy: Strategy,
    size: usize,
    limits: Limits,
    deflate: Option<&DeflateParams>,
    chunks: &[&[u8]],
) -> (Vec<Ev>, Option<WireError>) {
    let mut buf = buffer(strategy, size);
    let mut reader = Reader::new(Role::Server, limits);
    if let Some(p) = deflate {
        reader.enable_deflate(p);
    }
    let mut events = Vec::new();
    for chunk in chunks {
        let mut off = 0;
        let mut stalled = 0;
        loop {
            reader.settle(&mut buf);
            let n = fill_from(&mut buf, &chunk[off..]);
            off += n;
            loop {
                match reader.next(&mut buf) {
                    Ok(Some(ev)) => events.push(match ev {
                        Event::Message { opcode, payload } => Ev::Msg(opcode, payload.to_vec()),
                        Event::Ping(p) => Ev::Ping(p.to_vec()),
                        Event::Pong(p) => Ev::Pong(p.to_vec()),
                        Event::Close { code, reason } => Ev::Close(code.0, reason.to_vec()),
                    }),
                    Ok(None) => break,
                    Err(e) => return (events, Some(e)),
                }
            }
            reader.settle(&mut buf);
            buf.release();
            if off == chunk.len() {
                break;
            }
            stalled = if n == 0 { stalled + 1 } else { 0 };
            assert!(stalled < 2, "{strategy:?}: buffer full and reader made no progress");
        }
    }
    (events, None)
}

fn decode(strategy: Strategy, chunks: &[&[u8]]) -> (Vec<Ev>, Option<WireError>) {
    decode_with(strategy, 256, Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 }, chunks)
}

fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client_frame(&mut out, fin, op, payload, [0x37, 0xfa, 0x21, 0x3d]);
    out
}

/// The parameters our defaults negotiate for a browser's offer (no context takeover either way).
fn deflate_params() -> DeflateParams {
    negotiate([b"permessage-deflate; client_max_window_bits".as_slice()], &DeflateConfig::enabled()).unwrap()
}

/// Parameters with client context takeover (the client keeps its window between messages).
fn takeover_params() -> DeflateParams {
    let config = DeflateConfig { client_context_takeover: true, ..DeflateConfig::enabled() };
    let p = negotiate([b"permessage-deflate".as_slice()], &config).unwrap();
    assert!(!p.client_no_context_takeover());
    p
}

fn decode_deflate(strategy: Strategy, chunks: &[&[u8]]) -> (Vec<Ev>, Option<WireError>) {
    let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
    decode_full(strategy, 256, limits, Some(&deflate_params()), chunks)
}

/// A masked client frame with RSV1 set (the mask does not cover the first byte).
fn rsv1_frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut f = frame(fin, op, payload);
    f[0] |= 0x40;
    f
}

/// Text of `n` bytes that compresses well but not trivially.
fn text(n: usize) -> Vec<u8> {
    let words = ["alpha ", "beta ", "gamma ", "delta ", "κόσμε ", "{\"k\":1} "];
    let mut out = Vec::new();
    let mut i = 0usize;
    while out.len() < n {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    // Cut at a character boundary at or below n, then pad with ASCII to exactly n.
    let mut cut = n;
    while std::str::from_utf8(&out[..cut]).is_err() {
        cut -= 1;
    }
    out.truncate(cut);
    out.resize(n, b'.');
    out
}

fn raw(bytes: &[u8]) -> Vec<u8> {
    bytes.to_vec()
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
    single_text_message_decodes => |s| {
        let (ev, err) = decode(s, &[&frame(true, OpCode::Text, b"Hello")]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, b"Hello".to_vec())]);
    };
    glued_frames_decode_in_order => |s| {
        let mut glued = Vec::new();
        for i in 0..20u8 {
            glued.extend(frame(true, OpCode::Binary, &[i; 7]));
        }
        let (ev, err) = decode(s, &[&glued]);
        assert_eq!(err, None);
        assert_eq!(ev, (0..20u8).map(|i| Ev::Msg(OpCode::Binary, vec![i; 7])).collect::<Vec<_>>());
    };
    one_byte_at_a_time_decodes => |s| {
        let mut stream = frame(true, OpCode::Text, "κόσμε".as_bytes());
        stream.extend(frame(true, OpCode::Binary, &[1, 2, 3]));
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        let (ev, err) = decode(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, "κόσμε".as_bytes().to_vec()), Ev::Msg(OpCode::Binary, vec![1, 2, 3])]);
    };
    message_larger_than_the_buffer_is_streamed => |s| {
        let big: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let f = frame(true, OpCode::Binary, &big);
        let pieces: Vec<&[u8]> = f.chunks(1000).collect();
        let (ev, err) = decode(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Binary, big)]);
    };
    fragments_are_reassembled_around_pings => |s| {
        let mut st = frame(false, OpCode::Text, b"frag");
        st.extend(frame(true, OpCode::Ping, b"p1"));
        st.extend(frame(false, OpCode::Continuation, b"men"));
        st.extend(frame(true, OpCode::Pong, b""));
        st.extend(frame(true, OpCode::Continuation, b"ted"));
        let (ev, err) = decode(s, &[&st]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Ping(b"p1".to_vec()), Ev::Pong(vec![]), Ev::Msg(OpCode::Text, b"fragmented".to_vec())]);
    };
    empty_messages_and_fragments_decode => |s| {
        let mut st = frame(true, OpCode::Text, b"");
        st.extend(frame(false, OpCode::Binary, b""));
        st.extend(frame(false, OpCode::Continuation, b""));
        st.extend(frame(true, OpCode::Continuation, b""));
        let (ev, err) = decode(s, &[&st]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, vec![]), Ev::Msg(OpCode::Binary, vec![])]);
    };
    continuation_without_a_message_closes_1002 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Continuation, b"x")]);
        assert_eq!(err, Some(WireError::UnexpectedContinuation));
        assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
    };
    data_frame_inside_a_fragmented_message_closes_1002 => |s| {
        let mut st = frame(false, OpCode::Text, b"a");
        st.extend(frame(true, OpCode::Text, b"b"));
        let (_, err) = decode(s, &[&st]);
        assert_eq!(err, Some(WireError::ExpectedContinuation));
        assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
    };
    unmasked_client_frame_closes_1002 => |s| {
        let (_, err) = decode(s, &[&raw(b"\x81\x02hi")]);
        assert_eq!(err.map(|e| e.close_code()), Some(CloseCode::PROTOCOL_ERROR));
    };
    invalid_utf8_text_closes_1007 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Text, &[0xce, 0xba, 0xff, b'a'])]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
        assert_eq!(err.unwrap().close_code(), CloseCode::INVALID_PAYLOAD);
    };
    invalid_utf8_fails_before_the_frame_is_complete => |s| {
        // Declare 1000 bytes, deliver only 10 of which the 3rd is impossible: the error must come now.
        let mut payload = vec![b'a'; 1000];
        payload[2] = 0xff;
        let f = frame(true, OpCode::Text, &payload);
        let (_, err) = decode(s, &[&f[..f.len() - 990]]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    invalid_utf8_across_fragments_fails_at_the_bad_fragment => |s| {
        let mut st = frame(false, OpCode::Text, &[0xce]);
        st.extend(frame(false, OpCode::Continuation, &[0xba, 0xed]));
        st.extend(frame(false, OpCode::Continuation, &[0xa0])); // surrogate: impossible here
        let (_, err) = decode(s, &[&st]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    code_point_split_across_fragments_is_valid => |s| {
        let mut st = frame(false, OpCode::Text, &[0xf0, 0x9f]);
        st.extend(frame(true, OpCode::Continuation, &[0x98, 0x80]));
        let (ev, err) = decode(s, &[&st]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, "😀".as_bytes().to_vec())]);
    };
    text_ending_mid_code_point_closes_1007 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Text, &[b'a', 0xe2, 0x82])]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    frame_over_the_limit_closes_1009_from_its_header => |s| {
        let limits = Limits { max_frame_payload: 1000, max_message_size: 1 << 20 };
        let f = frame(true, OpCode::Binary, &[0u8; 1001]);
        // Only the header is delivered: the limit is enforced before any payload is buffered.
        let (_, err) = decode_with(s, 256, limits, &[&f[..8]]);
        assert_eq!(err, Some(WireError::FrameTooLarge));
        assert_eq!(err.unwrap().close_code(), CloseCode::TOO_BIG);
    };
    limits_beyond_4_gib_act_as_4_gib => |s| {
        // A header announcing 4 GiB (one byte past u32::MAX): only the header is delivered.
        let limits = Limits { max_frame_payload: u64::MAX, max_message_size: u64::MAX };
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 32).to_be_bytes());
        h.extend_from_slice(&[1, 2, 3, 4]);
        let (_, err) = decode_with(s, 256, limits, &[&h]);
        assert_eq!(err, Some(WireError::FrameTooLarge));
        // One byte less is within the (clamped) limit: no error, the reader waits for the payload.
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(u64::from(u32::MAX)).to_be_bytes());
        h.extend_from_slice(&[1, 2, 3, 4]);
        let (_, err) = decode_with(s, 256, limits, &[&h]);
        assert_eq!(err, None);
    };
    message_over_the_limit_closes_1009 => |s| {
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1000 };
        let mut st = frame(false, OpCode::Binary, &[0u8; 600]);
        st.extend(frame(true, OpCode::Continuation, &[0u8; 600]));
        let (_, err) = decode_with(s, 256, limits, &[&st]);
        assert_eq!(err, Some(WireError::MessageTooLarge));
        assert_eq!(err.unwrap().close_code(), CloseCode::TOO_BIG);
    };
    whole_small_frame_over_a_small_limit_closes_1009 => |s| {
        // Whole 7-bit-length frames (the reader's fast path) are held to limits below 126 bytes too.
        let f = frame(true, OpCode::Binary, &[7u8; 20]);
        let frame_limit = Limits { max_frame_payload: 19, max_message_size: 1 << 20 };
        assert_eq!(decode_with(s, 256, frame_limit, &[&f]).1, Some(WireError::FrameTooLarge));
        let message_limit = Limits { max_frame_payload: 1 << 20, max_message_size: 19 };
        assert_eq!(decode_with(s, 256, message_limit, &[&f]).1, Some(WireError::MessageTooLarge));
        let exact = Limits { max_frame_payload: 20, max_message_size: 20 };
        assert_eq!(decode_with(s, 256, exact, &[&f]), (vec![Ev::Msg(OpCode::Binary, vec![7u8; 20])], None));
    };
    whole_small_frames_at_the_length_edges_decode => |s| {
        let mut st = Vec::new();
        let lens = [0usize, 1, 3, 4, 5, 15, 16, 17, 124, 125, 126, 127];
        for &n in &lens {
            st.extend(frame(true, OpCode::Binary, &vec![n as u8; n]));
            st.extend(frame(true, OpCode::Text, "é".repeat(n / 2).as_bytes()));
        }
        let expected: Vec<Ev> = lens
            .iter()
            .flat_map(|&n| [Ev::Msg(OpCode::Binary, vec![n as u8; n]), Ev::Msg(OpCode::Text, "é".repeat(n / 2).into_bytes())])
            .collect();
        assert_eq!(decode_with(s, 4096, Limits::default(), &[&st]), (expected, None));
    };
    whole_small_text_with_invalid_utf8_closes_1007_after_the_valid_ones => |s| {
        let mut st = frame(true, OpCode::Text, b"fine");
        st.extend(frame(true, OpCode::Text, &[b'a', 0xc3, 0x28]));
        st.extend(frame(true, OpCode::Text, b"never read"));
        let (ev, err) = decode(s, &[&st]);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, b"fine".to_vec())]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    close_frame_with_code_and_reason_decodes => |s| {
        let (ev, err) = decode(s, &[&frame(true, OpCode::Close, b"\x03\xe8bye")]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Close(1000, b"bye".to_vec())]);
    };
    empty_close_frame_reports_1005 => |s| {
        let (ev, _) = decode(s, &[&frame(true, OpCode::Close, b"")]);
        assert_eq!(ev, vec![Ev::Close(1005, vec![])]);
    };
    close_with_reserved_code_closes_1002 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Close, &1005u16.to_be_bytes())]);
        assert_eq!(err.map(|e| e.close_code()), Some(CloseCode::PROTOCOL_ERROR));
    };
    close_with_one_byte_closes_1002 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Close, b"\x03")]);
        assert_eq!(err, Some(WireError::CloseOneByte));
    };
    close_with_invalid_utf8_reason_closes_1007 => |s| {
        let (_, err) = decode(s, &[&frame(true, OpCode::Close, b"\x03\xe8\xff")]);
        assert_eq!(err.map(|e| e.close_code()), Some(CloseCode::INVALID_PAYLOAD));
    };
    nothing_is_read_after_close => |s| {
        let mut st = frame(true, OpCode::Close, b"\x03\xe8");
        st.extend(frame(true, OpCode::Text, b"late"));
        let (ev, err) = decode(s, &[&st]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Close(1000, vec![])]);
    };
    ping_payload_of_125_bytes_is_accepted => |s| {
        let (ev, err) = decode(s, &[&frame(true, OpCode::Ping, &[0xfe; 125])]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Ping(vec![0xfe; 125])]);
    };
    reserved_bits_close_1002 => |s| {
        let mut f = frame(true, OpCode::Text, b"x");
        f[0] |= 0x40;
        let (_, err) = decode(s, &[&f]);
        assert_eq!(err, Some(WireError::ReservedBits));
    };
    rsv1_without_the_extension_closes_1002 => |s| {
        let z = PeerDeflate::new(6).message(b"hello");
        let (_, err) = decode(s, &[&rsv1_frame(true, OpCode::Text, &z)]);
        assert_eq!(err, Some(WireError::ReservedBits));
        assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
    };
    rsv2_and_rsv3_close_1002_even_with_the_extension => |s| {
        for bit in [0x20u8, 0x10] {
            let mut f = frame(true, OpCode::Text, b"x");
            f[0] |= bit;
            let (_, err) = decode_deflate(s, &[&f]);
            assert_eq!(err, Some(WireError::ReservedBits));
        }
    };
    compressed_message_inflates => |s| {
        let msg = text(3000);
        let z = PeerDeflate::new(6).message(&msg);
        assert!(z.len() < msg.len() / 2);
        let (ev, err) = decode_deflate(s, &[&rsv1_frame(true, OpCode::Text, &z)]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, msg)]);
    };
    compressed_message_inflates_one_byte_at_a_time => |s| {
        let msg = text(700);
        let f = rsv1_frame(true, OpCode::Text, &PeerDeflate::new(6).message(&msg));
        let pieces: Vec<&[u8]> = f.chunks(1).collect();
        let (ev, err) = decode_deflate(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, msg)]);
    };
    compressed_fragments_inflate_around_control_frames => |s| {
        // One compressed message split over three frames (RSV1 on the first only), pings between.
        let msg = text(5000);
        let z = PeerDeflate::new(6).message(&msg);
        let (a, rest) = z.split_at(z.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut st = rsv1_frame(false, OpCode::Text, a);
        st.extend(frame(true, OpCode::Ping, b"p"));
        st.extend(frame(false, OpCode::Continuation, b));
        st.extend(frame(true, OpCode::Pong, b""));
        st.extend(frame(true, OpCode::Continuation, c));
        // An uncompressed message right behind it, still decoded in place.
        st.extend(frame(true, OpCode::Binary, &[7; 10]));
        for step in [1usize, 7, 100, st.len()] {
            let pieces: Vec<&[u8]> = st.chunks(step).collect();
            let (ev, err) = decode_deflate(s, &pieces);
            assert_eq!(err, None, "step {step}");
            assert_eq!(
                ev,
                vec![Ev::Ping(b"p".to_vec()), Ev::Pong(vec![]), Ev::Msg(OpCode::Text, msg.clone()), Ev::Msg(OpCode::Binary, vec![7; 10])],
                "step {step}"
            );
        }
    };
    compressed_and_plain_messages_interleave => |s| {
        // Without client context takeover every compressed message is a fresh stream.
        let mut st = Vec::new();
        let mut expected = Vec::new();
        for i in 0..6u8 {
            let msg = text(200 + usize::from(i) * 150);
            if i % 2 == 0 {
                st.extend(rsv1_frame(true, OpCode::Binary, &PeerDeflate::new(6).message(&msg)));
            } else {
                st.extend(frame(true, OpCode::Binary, &msg));
            }
            expected.push(Ev::Msg(OpCode::Binary, msg));
        }
        let pieces: Vec<&[u8]> = st.chunks(61).collect();
        let (ev, err) = decode_deflate(s, &pieces);
        assert_eq!(err, None);
        assert_eq!(ev, expected);
    };
    empty_compressed_message_decodes => |s| {
        // RFC 7692 §7.2.3.6: an empty message compresses to the single byte 0x00.
        let (ev, err) = decode_deflate(s, &[&rsv1_frame(true, OpCode::Text, &[0x00])]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, vec![])]);
    };
    rsv1_on_a_continuation_frame_closes_1002 => |s| {
        let z = PeerDeflate::new(6).message(&text(300));
        let mut st = rsv1_frame(false, OpCode::Text, &z[..10]);
        st.extend(rsv1_frame(true, OpCode::Continuation, &z[10..]));
        let (_, err) = decode_deflate(s, &[&st]);
        assert_eq!(err, Some(WireError::MisplacedRsv1));
        assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
        // Also when the first frame was not compressed.
        let mut st = frame(false, OpCode::Binary, b"abc");
        st.extend(rsv1_frame(true, OpCode::Continuation, b"def"));
        let (_, err) = decode_deflate(s, &[&st]);
        assert_eq!(err, Some(WireError::MisplacedRsv1));
    };
    rsv1_on_a_control_frame_closes_1002 => |s| {
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let (ev, err) = decode_deflate(s, &[&rsv1_frame(true, op, b"")]);
            assert_eq!(err, Some(WireError::MisplacedRsv1), "{op:?}");
            assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
            assert!(ev.is_empty());
        }
        // In the middle of a compressed message too.
        let z = PeerDeflate::new(6).message(&text(300));
        let mut st = rsv1_frame(false, OpCode::Text, &z[..5]);
        st.extend(rsv1_frame(true, OpCode::Ping, b"x"));
        let (_, err) = decode_deflate(s, &[&st]);
        assert_eq!(err, Some(WireError::MisplacedRsv1));
    };
    corrupt_deflate_data_closes_1002 => |s| {
        // BTYPE 11 is reserved: not a deflate stream.
        let (_, err) = decode_deflate(s, &[&rsv1_frame(true, OpCode::Binary, &[0xff, 0x00, 0x12])]);
        assert_eq!(err, Some(WireError::InflateFailed));
        assert_eq!(err.unwrap().close_code(), CloseCode::PROTOCOL_ERROR);
    };
    compressed_invalid_utf8_closes_1007 => |s| {
        let mut bad = text(100);
        bad[50] = 0xff;
        let (_, err) = decode_deflate(s, &[&rsv1_frame(true, OpCode::Text, &PeerDeflate::new(6).message(&bad))]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
        assert_eq!(err.unwrap().close_code(), CloseCode::INVALID_PAYLOAD);
    };
    compressed_invalid_utf8_fails_before_the_frame_is_complete => |s| {
        // The bad byte comes first; of a long frame only its first part is delivered.
        let mut bad = vec![0xffu8];
        bad.extend(text(20_000));
        let f = rsv1_frame(true, OpCode::Text, &PeerDeflate::new(0).message(&bad));
        let (_, err) = decode_deflate(s, &[&f[..f.len() / 4]]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    compressed_error_does_not_depend_on_read_sizes => |s| {
        // Inflated bytes that are not UTF-8, then a broken stream in the same frame: whether the frame
        // arrives whole or a byte at a time, the bad text is reported (found by the differential fuzzer).
        let mut z = PeerDeflate::new(0).message(&[b'a', 0xff, b'b', b'c']);
        // The message ends in the start of an empty stored block (one byte); its LEN and NLEN follow here
        // and disagree, which zlib sees in the same call that produced the text.
        z.extend_from_slice(&[0x01, 0x00, 0x00, 0x00]);
        let f = rsv1_frame(true, OpCode::Text, &z);
        let (_, whole) = decode_deflate(s, &[&f]);
        let pieces: Vec<&[u8]> = f.chunks(1).collect();
        let (_, split) = decode_deflate(s, &pieces);
        assert_eq!(whole, Some(WireError::InvalidUtf8));
        assert_eq!(split, Some(WireError::InvalidUtf8));
    };
    compressed_text_ending_mid_code_point_closes_1007 => |s| {
        let (_, err) = decode_deflate(s, &[&rsv1_frame(true, OpCode::Text, &PeerDeflate::new(6).message(&[b'a', 0xe2, 0x82]))]);
        assert_eq!(err, Some(WireError::InvalidUtf8));
    };
    inflated_size_over_the_limit_closes_1009 => |s| {
        // 1 MiB of zeros compresses to about 1 KiB; the limit is 64 KiB.
        let z = PeerDeflate::new(6).message(&vec![0u8; 1 << 20]);
        assert!(z.len() < 2048, "{}", z.len());
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 64 << 10 };
        let f = rsv1_frame(true, OpCode::Binary, &z);
        let (ev, err) = decode_full(s, 256, limits, Some(&deflate_params()), &[&f]);
        assert_eq!(err, Some(WireError::MessageTooLarge));
        assert_eq!(err.unwrap().close_code(), CloseCode::TOO_BIG);
        assert!(ev.is_empty());
        // It fails as soon as the cap is crossed: ~64 bytes of the compressed frame are enough.
        let (_, err) = decode_full(s, 256, limits, Some(&deflate_params()), &[&f[..f.len() / 4]]);
        assert_eq!(err, Some(WireError::MessageTooLarge));
        // Exactly at the limit is fine.
        let z = PeerDeflate::new(6).message(&vec![0u8; 64 << 10]);
        let (ev, err) = decode_full(s, 256, limits, Some(&deflate_params()), &[&rsv1_frame(true, OpCode::Binary, &z)]);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Binary, vec![0u8; 64 << 10])]);
    };
    inflated_fragments_over_the_limit_close_1009 => |s| {
        let z = PeerDeflate::new(6).message(&vec![b'x'; 100_000]);
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 50_000 };
        let (a, b) = z.split_at(z.len() / 2);
        let mut st = rsv1_frame(false, OpCode::Binary, a);
        st.extend(frame(true, OpCode::Continuation, b));
        let (_, err) = decode_full(s, 256, limits, Some(&deflate_params()), &[&st]);
        assert_eq!(err, Some(WireError::MessageTooLarge));
    };
    client_context_takeover_keeps_the_window => |s| {
        let msg = text(2000);
        let mut peer = PeerDeflate::new(6);
        let first = peer.message(&msg);
        let second = peer.message(&msg);
        assert!(second.len() < first.len(), "the second message refers back to the first");
        let mut st = rsv1_frame(true, OpCode::Text, &first);
        st.extend(frame(true, OpCode::Text, b"plain in between"));
        st.extend(rsv1_frame(true, OpCode::Text, &second));
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
        let pieces: Vec<&[u8]> = st.chunks(33).collect();
        let (ev, err) = decode_full(s, 256, limits, Some(&takeover_params()), &pieces);
        assert_eq!(err, None);
        assert_eq!(ev, vec![Ev::Msg(OpCode::Text, msg.clone()), Ev::Msg(OpCode::Text, b"plain in between".to_vec()), Ev::Msg(OpCode::Text, msg.clone())]);
        // Without context takeover the reader resets per message, so the second one cannot be read.
        let (_, err) = decode_full(s, 256, limits, Some(&deflate_params()), &pieces);
        assert!(err.is_some());
    };
    unknown_opcode_closes_1002 => |s| {
        let mut f = frame(true, OpCode::Text, b"x");
        f[0] = 0x83;
        let (_, err) = decode(s, &[&f]);
        assert_eq!(err, Some(WireError::UnknownOpcode(3)));
    };
}

#[test]
fn idle_pool_connection_holds_no_read_buffer_after_a_message() {
    let pool = BufferPool::new(4096, 16);
    let mut buf = PooledBuffer::new(pool.clone());
    let mut reader = Reader::new(Role::Server, Limits::default());
    fill_from(&mut buf, &frame(true, OpCode::Text, b"hi"));
    assert!(matches!(reader.next(&mut buf), Ok(Some(Event::Message { .. }))));
    assert!(matches!(reader.next(&mut buf), Ok(None)));
    buf.release();
    assert_eq!(buf.held_bytes(), 0);
    assert_eq!(reader.held_bytes(), 0);
    assert_eq!(pool.pooled(), 1);
}

#[test]
fn inflate_state_is_dropped_after_each_message_without_context_takeover() {
    for (params, keeps) in [(deflate_params(), false), (takeover_params(), true)] {
        let pool = BufferPool::new(4096, 16);
        let mut buf = PooledBuffer::new(pool.clone());
        let mut reader = Reader::new(Role::Server, Limits::default());
        reader.enable_deflate(&params);
        assert!(!reader.holds_inflater());
        assert_eq!(reader.held_bytes(), 0);
        let msg = text(1000);
        fill_from(&mut buf, &rsv1_frame(true, OpCode::Text, &PeerDeflate::new(6).message(&msg)));
        match reader.next(&mut buf) {
            Ok(Some(Event::Message { payload, .. })) => assert_eq!(payload.to_vec(), msg),
            other => panic!("{other:?}"),
        }
        assert!(reader.holds_inflater(), "the inflater exists while the message is out");
        assert!(matches!(reader.next(&mut buf), Ok(None)));
        buf.release();
        assert_eq!(buf.held_bytes(), 0);
        assert_eq!(reader.holds_inflater(), keeps);
        if !keeps {
            // An idle connection with the extension negotiated holds nothing.
            assert_eq!(reader.held_bytes(), 0);
        }
    }
}

#[test]
fn uncompressed_messages_stay_in_place_with_the_extension_on() {
    let mut buf = GrowableBuffer::new(4096, 4096);
    let mut reader = Reader::new(Role::Server, Limits::default());
    reader.enable_deflate(&deflate_params());
    fill_from(&mut buf, &frame(true, OpCode::Text, b"hi"));
    match reader.next(&mut buf) {
        Ok(Some(Event::Message { payload, .. })) => assert_eq!(payload.first, b"hi"),
        other => panic!("{other:?}"),
    }
    // No message buffer and no inflater were needed.
    assert_eq!(reader.held_bytes(), 0);
}

// ---- randomized chunking ----

#[derive(Debug, Clone)]
enum Item {
    /// A data message split into `parts` frames, with a ping before fragment `ping_at` if set.
    Message {
        text: bool,
        payload: Vec<u8>,
        parts: usize,
        ping_at: Option<usize>,
    },
    Ping(Vec<u8>),
}

fn item() -> impl proptest::strategy::Strategy<Value = Item> {
    prop_oneof![
        4 => (any::<bool>(), prop_oneof![proptest::collection::vec(any::<u8>(), 0..40), proptest::collection::vec(any::<u8>(), 200..1200)],
              1usize..4, proptest::option::of(0usize..4))
            .prop_map(|(text, payload, parts, ping_at)| {
                // Text payloads are made valid UTF-8 (invalid ones are covered by the rule tests).
                let payload = if text { String::from_utf8_lossy(&payload).into_owned().into_bytes() } else { payload };
                Item::Message { text, payload, parts, ping_at }
            }),
        1 => proptest::collection::vec(any::<u8>(), 0..126).prop_map(Item::Ping),
    ]
}

fn encode_items(items: &[Item], key_seed: u8) -> (Vec<u8>, Vec<Ev>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut k = key_seed;
    let mut key = || {
        k = k.wrapping_mul(31).wrapping_add(7);
        [k, k ^ 0x5a, k.wrapping_add(3), !k]
    };
    for it in items {
        match it {
            Item::Ping(p) => {
                encode_client_frame(&mut stream, true, OpCode::Ping, p, key());
                expected.push(Ev::Ping(p.clone()));
            }
            Item::Message { text, payload, parts, ping_at } => {
                let op = if *text { OpCode::Text } else { OpCode::Binary };
                let step = payload.len().div_ceil(*parts).max(1);
                let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[]] } else { payload.chunks(step).collect() };
                for (i, c) in chunks.iter().enumerate() {
                    if *ping_at == Some(i) && i > 0 {
                        encode_client_frame(&mut stream, true, OpCode::Ping, b"mid", key());
                        expected.push(Ev::Ping(b"mid".to_vec()));
                    }
                    let fop = if i == 0 { op } else { OpCode::Continuation };
                    encode_client_frame(&mut stream, i + 1 == chunks.len(), fop, c, key());
                }
                expected.push(Ev::Msg(op, payload.clone()));
            }
        }
    }
    (stream, expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_frame_sequence_cut_anywhere_decodes_identically(
        items in proptest::collection::vec(item(), 1..12),
        cuts in proptest::collection::vec(0usize..20_000, 0..40),
        key_seed in any::<u8>(),
        size in prop_oneof![Just(256usize), Just(300), Just(4096)],
    ) {
        let (stream, expected) = encode_items(&items, key_seed);
        let pieces = cut_at(&stream, cuts);
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
        for s in Strategy::ALL {
            let (ev, err) = decode_with(s, size, limits, &pieces);
            prop_assert_eq!(err, None, "{:?}", s);
            prop_assert_eq!(&ev, &expected, "{:?}", s);
        }
    }
}

/// Like [`encode_items`], with every message of `compress` (by index) compressed by the peer (a fresh
/// stream each time: no client context takeover) and its compressed bytes split over the same frames.
fn encode_compressed_items(items: &[Item], compress: &[bool], key_seed: u8) -> (Vec<u8>, Vec<Ev>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut k = key_seed;
    let mut key = || {
        k = k.wrapping_mul(31).wrapping_add(7);
        [k, k ^ 0x5a, k.wrapping_add(3), !k]
    };
    for (n, it) in items.iter().enumerate() {
        match it {
            Item::Ping(p) => {
                encode_client_frame(&mut stream, true, OpCode::Ping, p, key());
                expected.push(Ev::Ping(p.clone()));
            }
            Item::Message { text, payload, parts, ping_at } => {
                let op = if *text { OpCode::Text } else { OpCode::Binary };
                let compressed = compress.get(n).copied().unwrap_or(false);
                let wire = if compressed { PeerDeflate::new(6).message(payload) } else { payload.clone() };
                let step = wire.len().div_ceil(*parts).max(1);
                let chunks: Vec<&[u8]> = if wire.is_empty() { vec![&[]] } else { wire.chunks(step).collect() };
                for (i, c) in chunks.iter().enumerate() {
                    if *ping_at == Some(i) && i > 0 {
                        encode_client_frame(&mut stream, true, OpCode::Ping, b"mid", key());
                        expected.push(Ev::Ping(b"mid".to_vec()));
                    }
                    let fop = if i == 0 { op } else { OpCode::Continuation };
                    let at = stream.len();
                    encode_client_frame(&mut stream, i + 1 == chunks.len(), fop, c, key());
                    if compressed && i == 0 {
                        stream[at] |= 0x40;
                    }
                }
                expected.push(Ev::Msg(op, payload.clone()));
            }
        }
    }
    (stream, expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn compressed_and_plain_sequences_cut_anywhere_decode_identically(
        items in proptest::collection::vec(item(), 1..10),
        compress in proptest::collection::vec(any::<bool>(), 10),
        cuts in proptest::collection::vec(0usize..20_000, 0..40),
        key_seed in any::<u8>(),
        size in prop_oneof![Just(256usize), Just(300), Just(4096)],
    ) {
        let (stream, expected) = encode_compressed_items(&items, &compress, key_seed);
        let pieces = cut_at(&stream, cuts);
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
        let params = deflate_params();
        for s in Strategy::ALL {
            let (ev, err) = decode_full(s, size, limits, Some(&params), &pieces);
            prop_assert_eq!(err, None, "{:?}", s);
            prop_assert_eq!(&ev, &expected, "{:?}", s);
        }
    }
}

// ---- small whole frames: the reader's fast path against its general path ----

/// A stream of small frames, as the echo benchmark and most chat traffic send them: single-frame
/// messages of 7-bit length (the reader's fast path when a read holds one whole), mixed with what must
/// take the general path (control frames, fragmented messages, 16-bit lengths), optionally ending in a
/// text frame of invalid UTF-8.
#[derive(Debug, Clone)]
enum Small {
    Message(bool, Vec<u8>),
    Fragmented(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Long(Vec<u8>),
}

fn small() -> impl proptest::strategy::Strategy<Value = Small> {
    prop_oneof![
        8 => (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..=125)).prop_map(|(text, p)| {
            let p = if text { String::from_utf8_lossy(&p).into_owned().into_bytes() } else { p };
            // Lossy conversion can grow a payload past 125: keep it a 7-bit length.
            let mut p = p;
            while p.len() > 125 || (text && std::str::from_utf8(&p).is_err()) {
                p.pop();
            }
            Small::Message(text, p)
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..60).prop_map(Small::Fragmented),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Small::Ping),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Small::Pong),
        1 => proptest::collection::vec(any::<u8>(), 126..200).prop_map(Small::Long),
    ]
}

fn encode_small(items: &[Small], bad_tail: bool, key_seed: u8) -> (Vec<u8>, Vec<Ev>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut k = key_seed;
    let mut key = || {
        k = k.wrapping_mul(29).wrapping_add(11);
        [k, k.rotate_left(3), k ^ 0xa5, k.wrapping_mul(7)]
    };
    for it in items {
        match it {
            Small::Message(text, p) => {
                let op = if *text { OpCode::Text } else { OpCode::Binary };
                encode_client_frame(&mut stream, true, op, p, key());
                expected.push(Ev::Msg(op, p.clone()));
            }
            Small::Fragmented(p) => {
                let (a, b) = p.split_at(p.len() / 2);
                encode_client_frame(&mut stream, false, OpCode::Binary, a, key());
                encode_client_frame(&mut stream, true, OpCode::Ping, b"between", key());
                encode_client_frame(&mut stream, true, OpCode::Continuation, b, key());
                expected.push(Ev::Ping(b"between".to_vec()));
                expected.push(Ev::Msg(OpCode::Binary, p.clone()));
            }
            Small::Ping(p) => {
                encode_client_frame(&mut stream, true, OpCode::Ping, p, key());
                expected.push(Ev::Ping(p.clone()));
            }
            Small::Pong(p) => {
                encode_client_frame(&mut stream, true, OpCode::Pong, p, key());
                expected.push(Ev::Pong(p.clone()));
            }
            Small::Long(p) => {
                encode_client_frame(&mut stream, true, OpCode::Binary, p, key());
                expected.push(Ev::Msg(OpCode::Binary, p.clone()));
            }
        }
    }
    if bad_tail {
        encode_client_frame(&mut stream, true, OpCode::Text, &[b'o', b'k', 0xe2, 0x28, 0xa1], key());
        encode_client_frame(&mut stream, true, OpCode::Text, b"after the error", key());
    }
    (stream, expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The same stream, read whole (every frame complete in the buffer: the fast path, except where a
    /// ring wraps), cut at random points (frames completed across reads: the general path), and a byte
    /// at a time (never the fast path), through every strategy: the same events and the same error.
    #[test]
    fn small_frames_decode_the_same_whole_cut_and_byte_by_byte(
        items in proptest::collection::vec(small(), 1..24),
        bad_tail in any::<bool>(),
        cuts in proptest::collection::vec(0usize..5_000, 0..30),
        key_seed in any::<u8>(),
        size in prop_oneof![Just(256usize), Just(300), Just(4096)],
    ) {
        let (stream, expected) = encode_small(&items, bad_tail, key_seed);
        let expected_err = bad_tail.then_some(WireError::InvalidUtf8);
        let pieces = cut_at(&stream, cuts);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
        for s in Strategy::ALL {
            for feed in [&[stream.as_slice()][..], &pieces, &bytes] {
                let (ev, err) = decode_with(s, size, limits, feed);
                prop_assert_eq!(err, expected_err, "{:?} {} reads", s, feed.len());
                prop_assert_eq!(&ev, &expected, "{:?} {} reads", s, feed.len());
            }
        }
    }
}
