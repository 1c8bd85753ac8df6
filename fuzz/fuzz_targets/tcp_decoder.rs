//! Differential fuzzing of the TCP binary protocol's decoder: any byte stream, cut into pieces chosen
//! by the input, must never panic; the three read-buffer strategies must produce the same frames and the
//! same error, and so must one decode of the whole input at once (the outcome never depends on where
//! the stream was cut). Every command that decodes must re-encode to exactly the frame it came from.
//!
//! The first input byte picks the cut size and the mode. In raw mode the rest is the stream itself; in
//! built mode it is a list of `cmd (2 bytes), len (1 byte), body` records made into frames with correct
//! CRCs, so the fuzzer reaches the command decoder without having to solve CRC-32.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast_wire::buffer::{fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer};
use ringcast_wire::frame::Role;
use ringcast_wire::tcp::{Command, Decoder, TcpError};
use ringcast_wire::Strategy;

const MAX_BODY: u32 = 2048;

#[derive(Debug, PartialEq)]
struct Out {
    cmd: u16,
    body: Vec<u8>,
    as_server: Result<(), TcpError>,
    as_client: Result<(), TcpError>,
}

/// Decodes a command both ways and checks that a valid one re-encodes to the same frame.
fn check_command(role: Role, cmd: u16, body: &[u8]) -> Result<(), TcpError> {
    let c = Command::decode(role, cmd, body)?;
    let mut again = Vec::new();
    if let Err(e) = c.encode(&mut again) {
        panic!("{c:?} decoded but cannot be encoded: {e}");
    }
    assert_eq!(&again[13..], body, "{c:?} re-encodes to a different body");
    assert_eq!(u16::from_be_bytes([again[3], again[4]]), cmd);
    Ok(())
}

fn run(buf: &mut AnyBuffer, data: &[u8], step: usize) -> (Vec<Out>, Option<TcpError>) {
    let mut decoder = Decoder::new(MAX_BODY);
    let mut frames = Vec::new();
    let mut off = 0;
    while off < data.len() {
        decoder.settle(buf);
        let end = (off + step).min(data.len());
        let n = fill_from(buf, &data[off..end]);
        off += n;
        loop {
            match decoder.next(buf) {
                Ok(Some(f)) => frames.push(Out {
                    cmd: f.cmd,
                    body: f.body.to_vec(),
                    as_server: check_command(Role::Server, f.cmd, f.body),
                    as_client: check_command(Role::Client, f.cmd, f.body),
                }),
                Ok(None) => break,
                Err(e) => {
                    assert!(e.is_fatal(), "framing error {e:?} is not fatal");
                    return (frames, Some(e));
                }
            }
        }
        decoder.settle(buf);
        buf.release();
        if n == 0 && buf.writable().0.is_empty() && buf.writable().1.is_empty() {
            panic!("buffer full and no progress");
        }
    }
    (frames, None)
}

/// Frames with correct CRCs from `cmd (2), len (1), body` records.
fn build(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [c0, c1, len, rest @ ..] = data {
        let len = usize::from(*len).min(rest.len());
        let (body, tail) = rest.split_at(len);
        let mut f = vec![0x42, 0x4D, 0x01, *c0, *c1];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&f);
        h.update(body);
        f.extend_from_slice(&h.finalize().to_be_bytes());
        f.extend_from_slice(body);
        out.extend_from_slice(&f);
        data = tail;
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
    let built;
    let stream = if mode & 0x80 != 0 {
        built = build(data);
        &built[..]
    } else {
        data
    };
    let step = usize::from(mode & 0x3f) + 1;
    let mut whole = AnyBuffer::Growable(GrowableBuffer::new(8192, 8192));
    let reference = run(&mut whole, stream, stream.len().max(1));
    for s in Strategy::ALL {
        let mut buf = match s {
            Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(256)),
            Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(BufferPool::new(256, 2))),
            Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(256, 1024)),
        };
        assert_eq!(run(&mut buf, stream, step), reference, "{s:?} in pieces of {step} disagrees with one decode");
    }
});
