//! The baseline: a per-connection buffer that grows to fit and keeps its size.
//!
//! Simple and fast for busy connections, but a connection that once received a big frame keeps that
//! memory until it closes, and every connection that ever read anything holds at least `initial` bytes.

use super::ReadBuffer;

#[derive(Debug)]
pub struct GrowableBuffer {
    /// Always fully initialized: its length is its size. Readable bytes are `start..end`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    initial: usize,
    max_frame: usize,
}

impl GrowableBuffer {
    /// `initial`: the first allocation; `max_frame`: the largest frame held whole before streaming.
    pub fn new(initial: usize, max_frame: usize) -> Self {
        GrowableBuffer { buf: Vec::new(), start: 0, end: 0, initial: initial.max(256), max_frame: max_frame.max(256) }
    }
}

impl ReadBuffer for GrowableBuffer {
    #[inline]
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        (&mut self.buf[self.start..self.end], &mut [])
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn writable(&mut self) -> (&mut [u8], &mut [u8]) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; self.initial];
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let size = self.buf.len() * 2;
                self.buf.resize(size, 0);
            }
        }
        (&mut self.buf[self.end..], &mut [])
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    fn frame_capacity(&self) -> usize {
        self.max_frame
    }

    fn held_bytes(&self) -> usize {
        self.buf.capacity()
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
