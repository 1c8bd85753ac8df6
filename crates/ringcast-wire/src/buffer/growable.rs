//! The baseline: a per-connection buffer that grows to fit and keeps its size.
//!
//! Simple and fast for busy connections, but a connection that once received a big frame keeps that
//! memory until it closes, and every connection that ever read anything holds at least `initial` bytes.

use super::ReadBuffer;

#[derive(Debug)]
pub struct GrowableBuffer {
    /// Always fully initialized: its length is its size. Readable bytes are `start..end`. A boxed slice
    /// rather than a `Vec`: a `Vec`'s capacity would be [`super::AnyBuffer`]'s niche, and decoding it
    /// on every buffer call costs more than the explicit tag the enum gets without it.
    buf: Box<[u8]>,
    // u32: the buffer never exceeds `max_frame` (≤ 1 GiB) plus one read, and idle connections carry these.
    start: u32,
    end: u32,
    initial: u32,
    max_frame: u32,
}

/// Largest `max_frame` a growable buffer holds whole (positions inside it are `u32`).
pub const MAX_GROWABLE_FRAME: usize = 1 << 30;

impl GrowableBuffer {
    /// `initial`: the first allocation; `max_frame`: the largest frame held whole before streaming.
    pub fn new(initial: usize, max_frame: usize) -> Self {
        GrowableBuffer {
            buf: Box::default(),
            start: 0,
            end: 0,
            initial: initial.clamp(256, MAX_GROWABLE_FRAME) as u32,
            max_frame: max_frame.clamp(256, MAX_GROWABLE_FRAME) as u32,
        }
    }
}

impl ReadBuffer for GrowableBuffer {
    #[inline]
    fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        (&mut self.buf[self.start as usize..self.end as usize], &mut [])
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n as u32;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn writable(&mut self) -> (&mut [u8], &mut [u8]) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; self.initial as usize].into_boxed_slice();
        } else if self.end as usize == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start as usize..self.end as usize, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // Grow, but never past what the largest held frame needs (streamed frames don't grow it).
                let size = (self.buf.len() * 2).min(self.max_frame as usize + 64 * 1024);
                if size > self.buf.len() {
                    let mut grown = std::mem::take(&mut self.buf).into_vec();
                    grown.resize(size, 0);
                    self.buf = grown.into_boxed_slice();
                }
            }
        }
        (&mut self.buf[self.end as usize..], &mut [])
    }

    fn commit(&mut self, n: usize) {
        self.end += n as u32;
        debug_assert!(self.end as usize <= self.buf.len());
    }

    fn frame_capacity(&self) -> usize {
        self.max_frame as usize
    }

    fn held_bytes(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::fill_from;

    #[test]
    fn grows_when_full_and_keeps_bytes() {
        let mut g = GrowableBuffer::new(256, 1 << 20);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut off = 0;
        while off < data.len() {
            off += fill_from(&mut g, &data[off..]);
        }
        assert_eq!(g.readable_mut().0, &data[..]);
        assert!(g.held_bytes() >= 1000);
    }
}
