//! The receive-side rules of RFC 6455, run against every read-buffer strategy.
//!
//! Buffers are deliberately small (256 bytes) so that frames wrap around the ring, get compacted in the
//! pool buffer, and larger messages are streamed rather than held whole.

use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use ringcast_wire::buffer::{
    fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer, Strategy,
};
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{CloseCode, Event, Limits, Reader, WireError};

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
    let mut buf = buffer(strategy, size);
    let mut reader = Reader::new(Role::Server, limits);
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
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort();
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut start = 0;
        for c in cuts {
            pieces.push(&stream[start..c]);
            start = c;
        }
        pieces.push(&stream[start..]);
        let limits = Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 };
        for s in Strategy::ALL {
            let (ev, err) = decode_with(s, size, limits, &pieces);
            prop_assert_eq!(err, None, "{:?}", s);
            prop_assert_eq!(&ev, &expected, "{:?}", s);
        }
    }
}
