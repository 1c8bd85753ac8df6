//! A connection's queue of frames waiting for the socket.
//!
//! Frames are `Bytes`: already encoded, possibly shared by many connections (a publication is encoded
//! once and queued everywhere). A queued frame is never mutated; a partial write only advances the front
//! `Bytes` (a pointer bump, no copy). [`Outbound::flush`] hands the socket up to [`MAX_IOV`] frames per
//! `writev`, so a burst of small frames costs one syscall, not one each.
//!
//! The queue itself never blocks and never holds a lock: the connection task owns it and writes with
//! non-blocking `try_write_vectored`, awaiting writability only when the kernel buffer is full.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;

/// Most frames handed to one `writev` (Linux allows 1024; 64 already amortizes the syscall).
pub const MAX_IOV: usize = 64;

#[derive(Debug, Default)]
pub struct Outbound {
    frames: VecDeque<Bytes>,
    queued: usize,
}

impl Outbound {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    pub fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.queued += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// Heap bytes held by the queue's own storage (not counting shared frames).
    pub fn held_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<Bytes>()
    }

    /// Drops the queue's storage once empty, so an idle connection keeps none.
    pub fn shrink_if_empty(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }

    /// Writes as much as the socket accepts without blocking. `Ok(true)`: everything is written;
    /// `Ok(false)`: the socket is full, await writability and call again.
    pub fn flush(&mut self, stream: &TcpStream) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for f in self.frames.iter().take(MAX_IOV) {
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
        Ok(true)
    }

    /// Removes `n` written bytes from the front of the queue.
    fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.frames.front_mut() else { break };
            if n >= front.len() {
                n -= front.len();
                self.frames.pop_front();
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
        assert_eq!(&q.frames[0][..], b"efg");
        q.advance(3);
        assert!(q.is_empty());
    }
}
