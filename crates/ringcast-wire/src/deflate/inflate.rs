//! Inflating a compressed message into the message buffer, with the message limit as a hard cap.
//!
//! The compressed bytes are fed as they arrive (a frame at a time, or part of one). Output goes into the
//! spare capacity of the message buffer, which grows in bounded steps and never past the cap: flate2's
//! `decompress_vec` writes only into capacity that is already there. When the buffer is full *at* the
//! cap, a one-byte probe asks zlib for more output; any byte is one too many and the message fails with
//! 1009 right there, however much the rest of the input would have inflated to. So a small frame that
//! inflates to gigabytes costs at most the cap (plus zlib's own state), and its CPU stops at the cap too.

use flate2::{Decompress, FlushDecompress, Status};

use super::TAIL;
use crate::error::WireError;
use crate::utf8::Utf8Validator;

/// The first allocation for inflated bytes, and the least the buffer grows by.
const FIRST_CHUNK: usize = 4096;

/// One connection's inflater (zlib-rs state and window: ~47 KiB at 15 bits, see `tests/inflate_alloc.rs`).
pub(crate) struct Inflater {
    inner: Decompress,
    /// The peer's stream ended with a final block (BFINAL): no more data may follow in this message,
    /// and the next message starts a new stream.
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("total_in", &self.inner.total_in()).field("ended", &self.ended).finish()
    }
}

impl Inflater {
    /// A raw-deflate inflater for streams compressed with a window of at most 2^`window_bits` bytes.
    pub(crate) fn new(window_bits: u8) -> Self {
        // zlib inflates 8-bit streams with a 9-bit window just as well, and flate2 accepts only 9..=15.
        Inflater { inner: Decompress::new_with_window_bits(false, window_bits.clamp(9, 15)), ended: false }
    }

    /// Inflates the next compressed bytes of a message onto `out`, which never grows past `cap` bytes.
    /// `utf8` checks the inflated bytes of a text message as they are produced.
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        cap: usize,
        utf8: Option<&mut Utf8Validator>,
    ) -> Result<(), WireError> {
        if input.is_empty() {
            return Ok(());
        }
        if self.ended {
            // Data after the final block: not a deflate stream any more.
            return Err(WireError::InflateFailed);
        }
        self.run(input, out, cap, utf8)
    }

    /// Ends a message: inflates the tail the sender stripped (RFC 7692 §7.2.2), so that all its bytes
    /// are out, and prepares the stream for the next message.
    pub(crate) fn finish_message(
        &mut self,
        out: &mut Vec<u8>,
        cap: usize,
        utf8: Option<&mut Utf8Validator>,
    ) -> Result<(), WireError> {
        if !self.ended {
            self.run(&TAIL, out, cap, utf8)?;
        }
        if self.ended {
            // After a final block the sender starts a fresh stream: so do we, context takeover or not.
            self.inner.reset(false);
            self.ended = false;
        }
        Ok(())
    }

    fn run(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        cap: usize,
        mut utf8: Option<&mut Utf8Validator>,
    ) -> Result<(), WireError> {
        loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    // At the cap: may zlib produce another byte? If so the message is too big.
                    let mut probe = [0u8; 1];
                    let (consumed, produced, status) = self.step_slice(input, &mut probe);
                    if produced > 0 {
                        return Err(WireError::MessageTooLarge);
                    }
                    let status = status?;
                    input = &input[consumed..];
                    if status == Status::StreamEnd {
                        self.ended = true;
                        return if input.is_empty() { Ok(()) } else { Err(WireError::InflateFailed) };
                    }
                    if input.is_empty() {
                        return Ok(());
                    }
                    if consumed == 0 {
                        return Err(WireError::InflateFailed);
                    }
                    continue;
                }
                // Grow geometrically, in bounded steps, never past the cap.
                let target = out.capacity().saturating_mul(2).max(out.len() + FIRST_CHUNK).min(cap);
                out.reserve_exact(target - out.len());
            }
            let start = out.len();
            let before_in = self.inner.total_in();
            let result = self.inner.decompress_vec(input, out, FlushDecompress::None);
            // The bytes produced before a broken stream was noticed are checked first: which error a
            // peer gets must not depend on how its bytes were split into reads (the fuzzer holds the
            // three buffer strategies to that), and a smaller read would have checked them already.
            if let Some(v) = utf8.as_deref_mut() {
                v.feed(&out[start..]).map_err(|_| WireError::InvalidUtf8)?;
            }
            let status = result.map_err(|_| WireError::InflateFailed)?;
            let consumed = (self.inner.total_in() - before_in) as usize;
            input = &input[consumed..];
            if status == Status::StreamEnd {
                self.ended = true;
                return if input.is_empty() { Ok(()) } else { Err(WireError::InflateFailed) };
            }
            let full = out.len() == out.capacity();
            if input.is_empty() && !full {
                // Everything consumed and zlib had room to spare: nothing is pending inside it.
                return Ok(());
            }
            if consumed == 0 && out.len() == start && !full {
                // Input and room, yet no progress: zlib cannot go on with this stream.
                return Err(WireError::InflateFailed);
            }
        }
    }

    /// One call into `out`: bytes consumed, bytes produced (also when the stream broke), the outcome.
    fn step_slice(&mut self, input: &[u8], out: &mut [u8]) -> (usize, usize, Result<Status, WireError>) {
        let (before_in, before_out) = (self.inner.total_in(), self.inner.total_out());
        let status = self.inner.decompress(input, out, FlushDecompress::None).map_err(|_| WireError::InflateFailed);
        ((self.inner.total_in() - before_in) as usize, (self.inner.total_out() - before_out) as usize, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    /// Raw deflate with a sync flush and the tail stripped: a permessage-deflate payload.
    fn deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut input = data;
        loop {
            let before = c.total_in();
            c.compress_vec(input, &mut out, FlushCompress::Sync).unwrap();
            input = &input[(c.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity() + 64);
        }
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    }

    fn inflate_all(inf: &mut Inflater, pieces: &[&[u8]], cap: usize) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        for p in pieces {
            inf.inflate(p, &mut out, cap, None)?;
        }
        inf.finish_message(&mut out, cap, None)?;
        Ok(out)
    }

    #[test]
    fn inflates_byte_by_byte() {
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(50);
        let z = deflate(&mut Compress::new(Compression::default(), false), text.as_bytes());
        let pieces: Vec<&[u8]> = z.chunks(1).collect();
        assert_eq!(inflate_all(&mut Inflater::new(15), &pieces, 1 << 20).unwrap(), text.as_bytes());
    }

    #[test]
    fn exactly_the_cap_passes_and_one_more_byte_fails() {
        let data = vec![b'a'; 10_000];
        let z = deflate(&mut Compress::new(Compression::default(), false), &data);
        assert_eq!(inflate_all(&mut Inflater::new(15), &[&z], 10_000).unwrap().len(), 10_000);
        assert_eq!(inflate_all(&mut Inflater::new(15), &[&z], 9_999), Err(WireError::MessageTooLarge));
    }

    #[test]
    fn the_buffer_never_grows_past_the_cap() {
        let data = vec![0u8; 1 << 22];
        let z = deflate(&mut Compress::new(Compression::fast(), false), &data);
        let mut out = Vec::new();
        let e = Inflater::new(15).inflate(&z, &mut out, 100_000, None);
        assert_eq!(e, Err(WireError::MessageTooLarge));
        assert!(out.capacity() <= 100_000, "capacity {}", out.capacity());
    }

    #[test]
    fn corrupt_stream_fails() {
        // Block type 3 is reserved: invalid from the first byte.
        assert_eq!(inflate_all(&mut Inflater::new(15), &[&[0xff, 0xff, 0xff]], 1 << 20), Err(WireError::InflateFailed));
        assert_eq!(WireError::InflateFailed.close_code().0, 1002);
    }

    #[test]
    fn data_after_a_final_block_fails() {
        // A complete stream (BFINAL) followed by more bytes in the same message.
        let mut c = Compress::new(Compression::default(), false);
        let mut z = Vec::with_capacity(128);
        c.compress_vec(b"hello", &mut z, FlushCompress::Finish).unwrap();
        let good = z.clone();
        assert_eq!(inflate_all(&mut Inflater::new(15), &[&good], 1 << 20).unwrap(), b"hello");
        z.extend_from_slice(&[0x4a, 0x4c]);
        assert_eq!(inflate_all(&mut Inflater::new(15), &[&z], 1 << 20), Err(WireError::InflateFailed));
        // After a final block, the next message is a new stream even with context takeover.
        let mut inf = Inflater::new(15);
        assert_eq!(inflate_all(&mut inf, &[&good], 1 << 20).unwrap(), b"hello");
        assert_eq!(inflate_all(&mut inf, &[&good], 1 << 20).unwrap(), b"hello");
    }

    #[test]
    fn invalid_utf8_is_found_in_the_inflated_bytes() {
        let z = deflate(&mut Compress::new(Compression::default(), false), &[b'a', 0xff, b'b']);
        let mut v = Utf8Validator::new();
        let mut out = Vec::new();
        assert_eq!(Inflater::new(15).inflate(&z, &mut out, 1 << 20, Some(&mut v)), Err(WireError::InvalidUtf8));
    }

    #[test]
    fn context_is_kept_between_messages() {
        let mut c = Compress::new(Compression::default(), false);
        let msg = b"a message that repeats itself, a message that repeats itself";
        let first = deflate(&mut c, msg);
        let second = deflate(&mut c, msg);
        assert!(second.len() < first.len() / 2, "the second refers back to the first");
        let mut inf = Inflater::new(15);
        assert_eq!(inflate_all(&mut inf, &[&first], 1 << 20).unwrap(), msg);
        assert_eq!(inflate_all(&mut inf, &[&second], 1 << 20).unwrap(), msg);
        // A fresh inflater cannot decode the second one alone.
        assert!(inflate_all(&mut Inflater::new(15), &[&second], 1 << 20).map(|o| o != msg).unwrap_or(true));
    }
}
