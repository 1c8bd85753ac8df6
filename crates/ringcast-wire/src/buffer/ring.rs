//! A fixed-capacity circular buffer.
//!
//! `head` is the index of the first readable byte and `len` the number readable; the buffer never
//! moves bytes and never grows. When readable bytes wrap past the end they are handed out as two slices,
//! and the reader unmasks and validates across the seam, so a frame that wraps is parsed where it lies.

use super::ReadBuffer;

#[derive(Debug)]
pub struct RingBuffer {
    buf: Box<[u8]>,
    head: usize,
    len: usize,
}

/// The ring must hold any control frame (125 bytes + a 14-byte header) whole, so that control frames
/// never need streaming.
pub const MIN_RING_CAPACITY: usize = 256;

impl RingBuffer {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(MIN_RING_CAPACITY);
        RingBuffer { buf: vec![0u8; capacity].into_boxed_slice(), head: 0, len: 0 }
    }

    fn cap(&self) -> usize {
        self.buf.len()
    }
}

impl ReadBuffer for RingBuffer {
    #[inline]
    fn len(&self) -> usize {
        self.len
    }

    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        let cap = self.cap();
        let end = self.head + self.len;
        if end <= cap {
            let (_, rest) = self.buf.split_at_mut(self.head);
            (&mut rest[..self.len], &mut [])
        } else {
            let (front, back) = self.buf.split_at_mut(self.head);
            (back, &mut front[..end - cap])
        }
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        // Rewinding an empty ring to 0 keeps the next read contiguous (one region, fewer wraps).
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.cap() };
    }

    fn writable(&mut self) -> (&mut [u8], &mut [u8]) {
        let cap = self.cap();
        let tail = self.head + self.len;
        if tail < cap {
            let (front, back) = self.buf.split_at_mut(tail);
            (back, &mut front[..self.head])
        } else {
            let t = tail - cap;
            (&mut self.buf[t..self.head], &mut [])
        }
    }

    fn commit(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.cap());
        self.len += n;
    }

    fn frame_capacity(&self) -> usize {
        // Header bytes are consumed before the payload is waited for, so the whole ring is payload space.
        self.cap()
    }

    fn held_bytes(&self) -> usize {
        self.cap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::fill_from;

    #[test]
    fn wraps_without_growing() {
        let mut r = RingBuffer::new(256);
        assert_eq!(fill_from(&mut r, &[1u8; 200]), 200);
        r.consume(150);
        // 50 readable at 150..200; 56 free at the end and 150 at the front.
        let data: Vec<u8> = (0..100u8).collect();
        assert_eq!(fill_from(&mut r, &data), 100);
        let (a, b) = r.readable_mut();
        assert_eq!(a.len() + b.len(), 150);
        assert_eq!(a.len(), 106);
        let mut all = a.to_vec();
        all.extend_from_slice(b);
        assert_eq!(&all[50..], &data[..]);
        assert_eq!(r.held_bytes(), 256);
    }

    #[test]
    fn full_ring_has_no_writable_space() {
        let mut r = RingBuffer::new(256);
        assert_eq!(fill_from(&mut r, &[0u8; 300]), 256);
        let (a, b) = r.writable();
        assert!(a.is_empty() && b.is_empty());
    }
}
