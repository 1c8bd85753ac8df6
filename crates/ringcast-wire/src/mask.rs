//! Client-to-server masking (RFC 6455 §5.3).
//!
//! Unmasking touches every payload byte, so it works a machine word at a time: the 4-byte key is
//! rotated to the payload's phase and widened to a `u64`, and the slice is XORed eight bytes per step,
//! then four if four are left; at most the last three bytes go one by one. No `unsafe` is needed:
//! `chunks_exact_mut` plus `from_ne_bytes`/`to_ne_bytes` compile to plain word loads and stores.

/// XORs `buf` with `key`, where `buf[0]` is payload byte number `offset` (so a payload can be unmasked
/// in pieces, e.g. the two halves of a ring buffer or bytes that arrived in different reads).
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    // The key rotated to the payload's phase, as integer arithmetic: `<[u8; 4]>::rotate_left` is an
    // out-of-line generic rotation, paid on every call even when the phase is zero.
    let key = u32::from_le_bytes(key).rotate_right(8 * (offset % 4) as u32).to_le_bytes();
    // The key repeated twice, read in native order: XORing a native-order word of payload with it
    // XORs every byte with the right key byte on any endianness.
    let mut kw = [0u8; 8];
    kw[..4].copy_from_slice(&key);
    kw[4..].copy_from_slice(&key);
    let k64 = u64::from_ne_bytes(kw);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(w) ^ k64;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    // Fewer than eight left, still in phase: four at once if there are four, then byte by byte.
    let mut rest = chunks.into_remainder();
    if rest.len() >= 4 {
        let (word, tail) = rest.split_at_mut(4);
        let mut w = [0u8; 4];
        w.copy_from_slice(word);
        let v = u32::from_ne_bytes(w) ^ u32::from_ne_bytes(key);
        word.copy_from_slice(&v.to_ne_bytes());
        rest = tail;
    }
    for (b, k) in rest.iter_mut().zip(key) {
        *b ^= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    #[test]
    fn matches_bytewise_masking_at_every_length_and_offset() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..80 {
            for offset in 0..8 {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut a = data.clone();
                let mut b = data.clone();
                apply_mask(&mut a, key, offset);
                naive(&mut b, key, offset);
                assert_eq!(a, b, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn masking_in_pieces_equals_masking_whole() {
        let key = [1, 2, 3, 4];
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = data.clone();
        let (a, b) = pieces.split_at_mut(333);
        apply_mask(a, key, 0);
        apply_mask(b, key, 333);
        assert_eq!(whole, pieces);
    }
}
