//! Pooled read buffers: memory only while there are unparsed bytes.
//!
//! Most WebSocket connections are idle most of the time. Giving each one its own read buffer means the
//! idle ones pay for memory they use a few microseconds a minute. Here a connection takes a buffer from
//! the shared [`BufferPool`] when a read is about to happen and hands it back as soon as every byte in it
//! has been parsed ([`ReadBuffer::release`]). A connection holds a buffer across reads only while a frame
//! is partially received.
//!
//! The pool is a mutex-protected free list, no allocation once warm, fronted by a one-buffer cache per
//! thread: a connection that drains its buffer at the end of a read hands it to its thread's cache, and
//! the next read on that thread (usually the next connection's) takes it back without a lock, while the
//! buffer is still in that core's cache. A cached buffer belongs to nobody, exactly like one on the free
//! list: it is moved out of the cache, never shared. `max_pooled` bounds the idle buffers of both
//! kinds together and [`BufferPool::pooled`] counts both, so the cache changes neither the memory an
//! idle server keeps nor what it reports (with `max_pooled == 0` nothing is cached); beyond the bound,
//! released buffers are freed. A thread's cached buffer goes back to the free list when the thread
//! exits, and one left behind by a pool that no longer exists is freed when the cache is next used.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use super::ReadBuffer;

/// Largest pooled buffer (positions inside one are `u32`).
pub const MAX_POOL_BUFFER: usize = 1 << 30;

/// A shared free list of equally sized buffers.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Box<[u8]>>>,
    /// Idle buffers: those on `free` plus those in threads' caches. Raised (within `max_pooled`) before a
    /// buffer is parked, lowered after one is taken, so it never undercounts what is parked.
    idle: AtomicUsize,
    buffer_size: usize,
    max_pooled: usize,
}

/// One thread's cached buffer, and the pool it belongs to (kept across uses, so that parking and taking
/// touch no reference count; a `Weak` also keeps the pool's address from being reused while held).
struct ThreadCache {
    pool: Weak<BufferPool>,
    buf: Option<Box<[u8]>>,
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        // The thread is exiting: its buffer stays idle, on the free list (or is freed with a dead pool).
        if let (Some(buf), Some(pool)) = (self.buf.take(), self.pool.upgrade()) {
            pool.give_shared(buf);
        }
    }
}

thread_local! {
    static CACHE: RefCell<ThreadCache> = const { RefCell::new(ThreadCache { pool: Weak::new(), buf: None }) };
}

impl BufferPool {
    pub fn new(buffer_size: usize, max_pooled: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::with_capacity(max_pooled.min(4096))),
            idle: AtomicUsize::new(0),
            buffer_size: buffer_size.clamp(super::ring::MIN_RING_CAPACITY, MAX_POOL_BUFFER),
            max_pooled,
        })
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// Buffers currently idle in the pool (on its free list or in a thread's cache).
    pub fn pooled(&self) -> usize {
        self.idle.load(Relaxed)
    }

    /// Counts one more idle buffer if the bound allows it; `false`: the buffer is to be freed.
    fn reserve_idle(&self) -> bool {
        self.idle.fetch_update(Relaxed, Relaxed, |n| (n < self.max_pooled).then_some(n + 1)).is_ok()
    }

    fn take(self: &Arc<Self>) -> Box<[u8]> {
        let cached = CACHE.try_with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            if !std::ptr::eq(c.pool.as_ptr(), Arc::as_ptr(self)) {
                return None;
            }
            c.buf.take()
        });
        if let Ok(Some(buf)) = cached {
            self.idle.fetch_sub(1, Relaxed);
            return buf;
        }
        // A poisoned lock only means another thread panicked mid-push/pop; the Vec is still sound.
        let popped = match self.free.lock() {
            Ok(mut f) => f.pop(),
            Err(p) => p.into_inner().pop(),
        };
        match popped {
            Some(buf) => {
                self.idle.fetch_sub(1, Relaxed);
                buf
            }
            None => vec![0u8; self.buffer_size].into_boxed_slice(),
        }
    }

    fn give(self: &Arc<Self>, buf: Box<[u8]>) {
        if !self.reserve_idle() {
            return;
        }
        // The thread's cache if it is empty (or holds a dead pool's buffer), else the free list.
        let mut buf = Some(buf);
        let _ = CACHE.try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else { return };
            if !std::ptr::eq(c.pool.as_ptr(), Arc::as_ptr(self)) {
                if c.buf.is_some() && c.pool.strong_count() > 0 {
                    return;
                }
                // Replacing the entry frees a dead pool's buffer along with its `Weak`.
                *c = ThreadCache { pool: Arc::downgrade(self), buf: None };
            }
            if c.buf.is_none() {
                c.buf = buf.take();
            }
        });
        if let Some(buf) = buf {
            self.give_shared(buf);
        }
    }

    /// Puts an already counted idle buffer on the free list.
    fn give_shared(&self, buf: Box<[u8]>) {
        let mut free = match self.free.lock() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        free.push(buf);
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
    fn a_drained_buffer_is_reused_on_the_same_thread_and_counted_as_pooled() {
        let pool = BufferPool::new(1024, 8);
        let mut a = PooledBuffer::new(pool.clone());
        let first = cycle(&mut a);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(cycle(&mut a), first, "the thread's cached buffer comes back");
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
        assert_eq!(pool.pooled(), 2, "one in the thread's cache, one on the free list");
    }

    #[test]
    fn max_pooled_bounds_cached_and_listed_buffers_together() {
        let pool = BufferPool::new(1024, 1);
        let (mut a, mut b) = (PooledBuffer::new(pool.clone()), PooledBuffer::new(pool.clone()));
        fill_from(&mut a, b"x");
        fill_from(&mut b, b"y");
        for p in [&mut a, &mut b] {
            p.consume(1);
            p.release();
        }
        assert_eq!(pool.pooled(), 1);
        // With no idle buffers allowed, nothing is cached either.
        let none = BufferPool::new(1024, 0);
        let mut c = PooledBuffer::new(none.clone());
        cycle(&mut c);
        assert_eq!(none.pooled(), 0);
        assert_eq!(c.held_bytes(), 0);
    }

    #[test]
    fn a_thread_gives_its_cached_buffer_back_when_it_exits() {
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
    fn a_dead_pools_cached_buffer_makes_way() {
        let old = BufferPool::new(1024, 8);
        cycle(&mut PooledBuffer::new(old.clone()));
        drop(old);
        let pool = BufferPool::new(512, 8);
        let mut b = PooledBuffer::new(pool.clone());
        let first = cycle(&mut b);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(cycle(&mut b), first, "cached on this thread in place of the dead pool's buffer");
        fill_from(&mut b, b"x");
        assert_eq!(b.held_bytes(), 512);
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
