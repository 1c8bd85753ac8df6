//! A queue of encoded frames waiting for a socket.
//!
//! Frames are `Bytes`: already encoded, possibly shared by many connections (a publication is encoded
//! once and queued everywhere). A queued frame is never mutated; a partial write only advances the front
//! `Bytes` (a pointer bump, no copy). [`Outbound::flush`] hands the socket up to [`MAX_IOV`] frames per
//! `writev`, so a burst of small frames costs one syscall, not one each.
//!
//! The first frame lives inline (`head`), so a connection that has one frame at a time in flight — the
//! usual case for a subscriber — never allocates queue storage, and an idle connection holds none. The
//! `VecDeque` behind it is only used for bursts, and freed when drained.
//!
//! The same type serves as a connection's private queue (owned by its task, written with non-blocking
//! `try_write_vectored`) and, inside a mutex, as the queue other tasks deliver into
//! ([`crate::pubsub::client::ClientShared`]); [`Outbound::take_all`] moves one into the other without copying.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};

use super::stream::Stream;

/// Most frames handed to one `writev` (Linux allows 1024; 64 already amortizes the syscall).
pub const MAX_IOV: usize = 64;

#[derive(Debug, Default)]
pub struct Outbound {
    head: Option<Bytes>,
    rest: VecDeque<Bytes>,
    queued: usize,
}

impl Outbound {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    pub fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.queued += frame.len();
        if self.head.is_none() {
            self.head = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    /// Takes every frame of a plain deque (`bytes` long in all) when we are empty, which the caller
    /// ensures: the deque's storage and ours trade places, so frames are neither copied nor allocated
    /// for, and in steady state both sides keep a buffer big enough for a burst. This is how a
    /// connection takes what publishers queued in [`crate::pubsub::client::ClientShared`], whose queue is a bare
    /// `VecDeque` (no inline head: 32 bytes less in every client's shared state).
    pub fn take_deque(&mut self, other: &mut VecDeque<Bytes>, bytes: usize) {
        debug_assert!(self.is_empty());
        std::mem::swap(&mut self.rest, other);
        self.head = self.rest.pop_front();
        self.queued = if self.head.is_some() { bytes } else { 0 };
    }

    /// Moves every frame of `other` behind ours. Without copying frames, and without allocating when we
    /// were empty (the usual case: the storage of the two queues trades places).
    pub fn take_all(&mut self, other: &mut Outbound) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        self.queued += other.queued;
        other.queued = 0;
        if let Some(h) = other.head.take() {
            self.rest.push_back(h);
        }
        self.rest.append(&mut other.rest);
    }

    /// Takes the first queued frame out (whole: only for frames nothing has been written of).
    pub fn pop_front(&mut self) -> Option<Bytes> {
        let head = self.head.take()?;
        self.queued -= head.len();
        self.head = self.rest.pop_front();
        Some(head)
    }

    /// Drops the queue's storage once empty, so an idle connection keeps none.
    pub fn shrink_if_empty(&mut self) {
        if self.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
    }

    /// Forgets every queued frame except the first (which may be partly written already: dropping it
    /// would cut a frame in half on the wire). Used before a disconnect that must not wait for a backlog.
    pub fn drop_backlog(&mut self) -> usize {
        let dropped = self.rest.len();
        self.rest = VecDeque::new();
        self.queued = self.head.as_ref().map_or(0, Bytes::len);
        dropped
    }

    /// Forgets every queued frame; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let dropped = usize::from(self.head.is_some()) + self.rest.len();
        self.head = None;
        self.rest = VecDeque::new();
        self.queued = 0;
        dropped
    }

    /// Writes as much as the socket accepts without blocking. `Ok(true)`: everything is written;
    /// `Ok(false)`: the socket is full, await writability and call again.
    /// Over TLS, the frames are encrypted into records (several per record where they fit), and the
    /// records rustls could not write yet count as not written.
    pub fn flush<S: Stream>(&mut self, stream: &mut S) -> io::Result<bool> {
        while let Some(head) = &self.head {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            iov[0] = IoSlice::new(head);
            let mut n = 1;
            for f in self.rest.iter().take(MAX_IOV - 1) {
                iov[n] = IoSlice::new(f);
                n += 1;
            }
            match stream.try_write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        stream.flush_pending()
    }

    /// Removes `n` written bytes from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.head.as_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                self.head = self.rest.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_writes_advance_across_frames() {
        let mut q = Outbound::new();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        q.push(Bytes::from_static(b""));
        assert_eq!(q.queued_bytes(), 7);
        q.advance(4);
        assert_eq!(q.queued_bytes(), 3);
        assert_eq!(q.head.as_deref(), Some(&b"efg"[..]));
        q.advance(3);
        assert!(q.is_empty());
    }

    #[test]
    fn one_frame_at_a_time_needs_no_storage() {
        let mut q = Outbound::new();
        q.push(Bytes::from_static(b"one"));
        assert_eq!(q.rest.capacity(), 0);
        q.advance(3);
        q.push(Bytes::from_static(b"two"));
        assert_eq!(q.rest.capacity(), 0);
    }

    #[test]
    fn take_all_keeps_order() {
        let mut a = Outbound::new();
        let mut b = Outbound::new();
        a.push(Bytes::from_static(b"1"));
        b.push(Bytes::from_static(b"2"));
        b.push(Bytes::from_static(b"3"));
        a.take_all(&mut b);
        assert!(b.is_empty());
        assert_eq!(b.queued_bytes(), 0);
        assert_eq!(a.queued_bytes(), 3);
        let mut out = Vec::new();
        while let Some(h) = a.head.clone() {
            out.extend_from_slice(&h);
            a.advance(h.len());
        }
        assert_eq!(out, b"123");
        // Moving into an empty queue swaps storage: nothing is copied or allocated.
        let mut c = Outbound::new();
        let mut d = Outbound::new();
        d.push(Bytes::from_static(b"x"));
        c.take_all(&mut d);
        assert_eq!(c.queued_bytes(), 1);
        assert!(d.is_empty());
    }

    #[test]
    fn take_deque_trades_storage_and_keeps_order() {
        let mut local = Outbound::new();
        let mut shared: VecDeque<Bytes> = VecDeque::new();
        shared.push_back(Bytes::from_static(b"ab"));
        shared.push_back(Bytes::from_static(b"c"));
        local.take_deque(&mut shared, 3);
        assert_eq!((local.queued_bytes(), shared.len()), (3, 0));
        assert_eq!(local.head.as_deref(), Some(&b"ab"[..]));
        local.advance(3);
        assert!(local.is_empty());
        let kept = local.rest.capacity();
        assert!(kept > 0, "the deque's storage came along");
        // Next round: the shared side gets our (empty) storage back, with room; nothing is allocated.
        shared.push_back(Bytes::from_static(b"d"));
        local.take_deque(&mut shared, 1);
        assert!(shared.capacity() >= kept, "storage circulates between the two sides");
        assert_eq!(local.queued_bytes(), 1);
    }
}
