//! Pooled read buffers: memory only while there are unparsed bytes.
//!
//! Most WebSocket connections are idle most of the time. Giving each one its own read buffer means the
//! idle ones pay for memory they use a few microseconds a minute. Here a connection takes a buffer from
//! the shared [`BufferPool`] when a read is about to happen and hands it back as soon as every byte in it
//! has been parsed ([`ReadBuffer::release`]). A connection holds a buffer across reads only while a frame
//! is partially received.
//!
//! The pool is a mutex-protected free list: one uncontended lock per acquire/release, no allocation once
//! warm. It keeps at most `max_pooled` buffers; beyond that, released buffers are freed.

use std::sync::{Arc, Mutex};

use super::ReadBuffer;

/// Largest pooled buffer (positions inside one are `u32`).
pub const MAX_POOL_BUFFER: usize = 1 << 30;

/// A shared free list of equally sized buffers.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Box<[u8]>>>,
    buffer_size: usize,
    max_pooled: usize,
}

impl BufferPool {
    pub fn new(buffer_size: usize, max_pooled: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::with_capacity(max_pooled.min(4096))),
            buffer_size: buffer_size.clamp(super::ring::MIN_RING_CAPACITY, MAX_POOL_BUFFER),
            max_pooled,
        })
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// Buffers currently idle in the pool.
    pub fn pooled(&self) -> usize {
        match self.free.lock() {
            Ok(f) => f.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    fn take(&self) -> Box<[u8]> {
        // A poisoned lock only means another thread panicked mid-push/pop; the Vec is still sound.
        let popped = match self.free.lock() {
            Ok(mut f) => f.pop(),
            Err(p) => p.into_inner().pop(),
        };
        popped.unwrap_or_else(|| vec![0u8; self.buffer_size].into_boxed_slice())
    }

    fn give(&self, buf: Box<[u8]>) {
        let mut free = match self.free.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        if free.len() < self.max_pooled {
            free.push(buf);
        }
    }
}

/// A connection's handle on the pool, holding a buffer only while it has unparsed bytes.
#[derive(Debug)]
pub struct PooledBuffer {
    pool: Arc<BufferPool>,
    buf: Option<Box<[u8]>>,
    // u32: a pooled buffer is far below 4 GiB, and every idle connection carries these fields.
    start: u32,
    end: u32,
}

impl PooledBuffer {
    pub fn new(pool: Arc<BufferPool>) -> Self {
        PooledBuffer { pool, buf: None, start: 0, end: 0 }
    }
}

impl ReadBuffer for PooledBuffer {
    #[inline]
    fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    #[inline]
    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        match &mut self.buf {
            Some(b) => (&mut b[self.start as usize..self.end as usize], &mut []),
            None => (&mut [], &mut []),
        }
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n as u32;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    #[inline]
    fn writable(&mut self) -> (&mut [u8], &mut [u8]) {
        let pool = &self.pool;
        let buf = self.buf.get_or_insert_with(|| pool.take());
        if self.end as usize == buf.len() && self.start > 0 {
            // Move the partial frame to the front to make room behind it.
            buf.copy_within(self.start as usize..self.end as usize, 0);
            self.end -= self.start;
            self.start = 0;
        }
        (&mut buf[self.end as usize..], &mut [])
    }

    #[inline]
    fn commit(&mut self, n: usize) {
        self.end += n as u32;
        debug_assert!(self.buf.as_ref().is_some_and(|b| self.end as usize <= b.len()));
    }

    fn frame_capacity(&self) -> usize {
        self.pool.buffer_size
    }

    fn release(&mut self) {
        if self.start == self.end {
            if let Some(b) = self.buf.take() {
                self.pool.give(b);
            }
        }
    }

    fn held_bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::fill_from;

    #[test]
    fn idle_connection_holds_no_buffer() {
        let pool = BufferPool::new(1024, 8);
        let mut b = PooledBuffer::new(pool.clone());
        assert_eq!(b.held_bytes(), 0);
        fill_from(&mut b, b"hello");
        assert_eq!(b.held_bytes(), 1024);
        b.release();
        assert_eq!(b.held_bytes(), 1024, "unparsed bytes keep the buffer");
        b.consume(5);
        b.release();
        assert_eq!(b.held_bytes(), 0);
        assert_eq!(pool.pooled(), 1);
        // The next read reuses the pooled buffer instead of allocating.
        fill_from(&mut b, b"x");
        assert_eq!(pool.pooled(), 0);
    }

    /// Fills `b` with one byte and drains it: the read-then-idle cycle of a connection.
    fn cycle(b: &mut PooledBuffer) -> *const u8 {
        fill_from(b, b"x");
        let at = b.readable_mut().0.as_ptr();
        b.consume(1);
        b.release();
        at
    }

    #[test]
    fn a_drained_buffer_is_reused_and_never_shared() {
        let pool = BufferPool::new(1024, 8);
        let mut a = PooledBuffer::new(pool.clone());
        let first = cycle(&mut a);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(cycle(&mut a), first, "the drained buffer comes back");
        // Two connections holding buffers at once never get the same one.
        let mut b = PooledBuffer::new(pool.clone());
        fill_from(&mut a, b"x");
        fill_from(&mut b, b"y");
        assert_eq!(pool.pooled(), 0);
        assert_ne!(a.readable_mut().0.as_ptr(), b.readable_mut().0.as_ptr());
        a.consume(1);
        b.consume(1);
        a.release();
        b.release();
        assert_eq!(pool.pooled(), 2);
    }

    #[test]
    fn max_pooled_bounds_the_idle_buffers() {
        let pool = BufferPool::new(1024, 1);
        let (mut a, mut b) = (PooledBuffer::new(pool.clone()), PooledBuffer::new(pool.clone()));
        fill_from(&mut a, b"x");
        fill_from(&mut b, b"y");
        for p in [&mut a, &mut b] {
            p.consume(1);
            p.release();
        }
        assert_eq!(pool.pooled(), 1);
        // With no idle buffers allowed, a drained buffer is freed.
        let none = BufferPool::new(1024, 0);
        let mut c = PooledBuffer::new(none.clone());
        cycle(&mut c);
        assert_eq!(none.pooled(), 0);
        assert_eq!(c.held_bytes(), 0);
    }

    #[test]
    fn a_buffer_released_on_one_thread_is_taken_on_another() {
        let pool = BufferPool::new(1024, 8);
        let p = pool.clone();
        std::thread::spawn(move || {
            let mut b = PooledBuffer::new(p);
            cycle(&mut b);
        })
        .join()
        .expect("thread");
        assert_eq!(pool.pooled(), 1);
        let mut b = PooledBuffer::new(pool.clone());
        fill_from(&mut b, b"x");
        assert_eq!(pool.pooled(), 0, "taken from the free list");
    }

    #[test]
    fn partial_frame_is_compacted_to_make_room() {
        let pool = BufferPool::new(256, 8);
        let mut b = PooledBuffer::new(pool);
        fill_from(&mut b, &[7u8; 256]);
        b.consume(200);
        assert_eq!(fill_from(&mut b, &[9u8; 100]), 100);
        let (r, _) = b.readable_mut();
        assert_eq!(r.len(), 156);
        assert_eq!(r[55], 7);
        assert_eq!(r[56], 9);
    }
}
