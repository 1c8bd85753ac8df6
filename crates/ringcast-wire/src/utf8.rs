//! UTF-8 validation, incremental across fragments and reads (RFC 6455 §8.1).
//!
//! A text message may be split anywhere, even inside a code point, so [`Utf8Validator`] keeps the up to
//! three bytes of an unfinished code point between calls. It fails at the first chunk that makes the
//! sequence impossible to complete, so a peer streaming an invalid text message is stopped at the bad
//! byte rather than after the whole message has been buffered. The bulk work is simdutf8's.

use simdutf8::compat::from_utf8;

/// Whether `bytes` is complete, valid UTF-8.
#[inline]
pub fn is_valid(bytes: &[u8]) -> bool {
    simdutf8::basic::from_utf8(bytes).is_ok()
}

/// Validates a byte stream chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// Length of the code point introduced by lead byte `b` (0 for a byte that cannot lead one).
fn width(b: u8) -> usize {
    match b {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
    }

    /// Feeds the next chunk. `Err(())` as soon as the stream can no longer be valid UTF-8.
    #[allow(clippy::result_unit_err)]
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ()> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let w = width(self.pending[0]);
            let take = (w - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            let have = have + take;
            data = &data[take..];
            match from_utf8(&self.pending[..have]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() && have < w => {
                    self.pending_len = have as u8;
                    return Ok(());
                }
                Err(_) => return Err(()),
            }
        }
        match from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(()),
                None => {
                    let tail = &data[e.valid_up_to()..];
                    self.pending[..tail.len()].copy_from_slice(tail);
                    self.pending_len = tail.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Ends the stream: valid only when no code point is left unfinished.
    #[allow(clippy::result_unit_err)]
    pub fn finish(&mut self) -> Result<(), ()> {
        let ok = self.pending_len == 0;
        self.pending_len = 0;
        if ok {
            Ok(())
        } else {
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_validate(bytes: &[u8], cuts: &[usize]) -> bool {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &c in cuts {
            let c = c.min(bytes.len()).max(start);
            if v.feed(&bytes[start..c]).is_err() {
                return false;
            }
            start = c;
        }
        v.feed(&bytes[start..]).is_ok() && v.finish().is_ok()
    }

    #[test]
    fn fails_fast_on_the_first_bad_byte() {
        let mut v = Utf8Validator::new();
        assert!(v.feed("κόσμε".as_bytes()).is_ok());
        // 0xed 0xa0 0x80 is a UTF-16 surrogate: impossible from its second byte on.
        assert!(v.feed(&[0xed]).is_ok());
        assert!(v.feed(&[0xa0]).is_err());
    }

    #[test]
    fn unfinished_code_point_fails_at_finish() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xe2, 0x82]).is_ok());
        assert!(v.finish().is_err());
    }

    proptest! {
        #[test]
        fn chunked_validation_agrees_with_whole(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                                cuts in proptest::collection::vec(0usize..64, 0..8)) {
            let mut cuts = cuts;
            cuts.sort();
            prop_assert_eq!(split_validate(&bytes, &cuts), std::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        fn chunked_valid_strings_pass(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let mut cuts = cuts;
            cuts.sort();
            prop_assert!(split_validate(s.as_bytes(), &cuts));
        }
    }
}
