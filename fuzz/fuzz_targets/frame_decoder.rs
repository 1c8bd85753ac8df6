//! Differential fuzzing of the frame decoder: any byte stream, cut into pieces chosen by the input,
//! must never panic, and the three read-buffer strategies must produce the same events and the same
//! error, byte for byte. A bit of the first byte turns permessage-deflate on, so that compressed
//! messages (inflated as they arrive, capped at the message limit) are held to the same agreement.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast_wire::buffer::{fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer};
use ringcast_wire::deflate::{negotiate, DeflateConfig};
use ringcast_wire::frame::Role;
use ringcast_wire::{Event, Limits, Reader, Strategy, WireError};

#[derive(Debug, PartialEq)]
enum Ev {
    Msg(u8, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, Vec<u8>),
}

fn run(strategy: Strategy, data: &[u8], cut: u8, role: Role, deflate: bool) -> (Vec<Ev>, Option<WireError>) {
    let mut buf = match strategy {
        Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(256)),
        Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(BufferPool::new(256, 2))),
        Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(256, 1024)),
    };
    let mut reader = Reader::new(role, Limits { max_frame_payload: 4096, max_message_size: 8192 });
    if deflate {
        let config = DeflateConfig { client_context_takeover: true, server_context_takeover: true, ..DeflateConfig::enabled() };
        if let Some(params) = negotiate([b"permessage-deflate".as_slice()], &config) {
            reader.enable_deflate(&params);
        }
    }
    let mut events = Vec::new();
    let step = usize::from(cut % 64) + 1;
    let mut off = 0;
    while off < data.len() {
        reader.settle(&mut buf);
        let end = (off + step).min(data.len());
        let n = fill_from(&mut buf, &data[off..end]);
        off += n;
        loop {
            match reader.next(&mut buf) {
                Ok(Some(ev)) => events.push(match ev {
                    Event::Message { opcode, payload } => Ev::Msg(opcode as u8, payload.to_vec()),
                    Event::Ping(p) => Ev::Ping(p.to_vec()),
                    Event::Pong(p) => Ev::Pong(p.to_vec()),
                    Event::Close { code, reason } => Ev::Close(code.0, reason.to_vec()),
                }),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        // Nothing after a close frame is read (the server stops reading there too).
        if matches!(events.last(), Some(Ev::Close(..))) {
            return (events, None);
        }
        reader.settle(&mut buf);
        buf.release();
        if n == 0 && buf.writable().0.is_empty() && buf.writable().1.is_empty() {
            panic!("{strategy:?}: buffer full and no progress");
        }
    }
    (events, None)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else { return };
    let role = if cut & 0x80 != 0 { Role::Client } else { Role::Server };
    let deflate = cut & 0x40 != 0;
    let reference = run(Strategy::Growable, data, cut, role, deflate);
    for s in [Strategy::Ring, Strategy::Pool] {
        assert_eq!(run(s, data, cut, role, deflate), reference, "{s:?} disagrees with growable");
    }
});
