//! Shared by the wire tests: cutting a byte stream where a proptest says (as a socket may split it), and
//! an independent permessage-deflate peer: miniz_oxide, a different deflate implementation
//! from the zlib-rs the codec uses, so a round trip checks the codec against someone else's reading of
//! RFC 1951 and RFC 7692 rather than against itself.
#![allow(dead_code)]

use miniz_oxide::deflate::core::{create_comp_flags_from_zip_params, CompressorOxide};
use miniz_oxide::inflate::stream::InflateState;
use miniz_oxide::{DataFormat, MZFlush, MZStatus};

/// A raw-deflate compressor that keeps its window between messages unless `reset` is called.
pub struct PeerDeflate(Box<CompressorOxide>);

impl PeerDeflate {
    pub fn new(level: i32) -> Self {
        // Negative window bits: raw deflate, no zlib wrapper.
        PeerDeflate(Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(level, -15, 0))))
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// One message: compressed, sync-flushed, `00 00 ff ff` stripped (RFC 7692 §7.2.1).
    pub fn message(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; data.len() + 64];
        let mut pos = 0;
        let mut input = data;
        loop {
            let r = miniz_oxide::deflate::stream::deflate(&mut self.0, input, &mut out[pos..], MZFlush::Sync);
            r.status.expect("deflate");
            input = &input[r.bytes_consumed..];
            pos += r.bytes_written;
            if input.is_empty() && pos < out.len() {
                break;
            }
            out.resize(out.len() * 2, 0);
        }
        out.truncate(pos);
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "sync flush ends with the empty stored block");
        out.truncate(pos - 4);
        out
    }
}

/// A raw-deflate inflater (what a browser does with our frames).
pub struct PeerInflate(Box<InflateState>);

impl PeerInflate {
    pub fn new() -> Self {
        PeerInflate(InflateState::new_boxed(DataFormat::Raw))
    }

    /// Inflates one message's payload (the tail appended back, RFC 7692 §7.2.2).
    pub fn message(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = vec![0u8; 1024];
        let mut pos = 0;
        let mut rest = &input[..];
        loop {
            let r = miniz_oxide::inflate::stream::inflate(&mut self.0, rest, &mut out[pos..], MZFlush::Sync);
            rest = &rest[r.bytes_consumed..];
            pos += r.bytes_written;
            match r.status {
                Ok(MZStatus::Ok) | Ok(MZStatus::StreamEnd) | Err(miniz_oxide::MZError::Buf) => {}
                other => return Err(format!("inflate: {other:?}")),
            }
            if rest.is_empty() && pos < out.len() {
                break;
            }
            if pos == out.len() {
                out.resize(out.len() * 2, 0);
            } else if r.bytes_consumed == 0 && r.bytes_written == 0 {
                return Err("inflate made no progress".into());
            }
        }
        out.truncate(pos);
        Ok(out)
    }
}

/// Splits a server frame (unmasked, 7-bit/16-bit/64-bit length) into (first byte, payload).
pub fn parse_server_frame(frame: &[u8]) -> (u8, &[u8]) {
    let len7 = frame[1] & 0x7f;
    let (len, at) = match len7 {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    assert_eq!(frame.len(), at + len, "one whole frame");
    (frame[0], &frame[at..])
}

/// `stream` cut at `cuts` (any numbers: taken modulo the stream's length + 1, then sorted), as the reads
/// of a socket that split it there would deliver it; empty pieces included.
pub fn cut_at(stream: &[u8], cuts: Vec<usize>) -> Vec<&[u8]> {
    let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.sort();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for c in cuts {
        pieces.push(&stream[start..c]);
        start = c;
    }
    pieces.push(&stream[start..]);
    pieces
}
