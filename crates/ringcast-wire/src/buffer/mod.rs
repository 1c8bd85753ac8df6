//! Read-buffer strategies: where a connection's unparsed bytes live between a read and the parser.
//!
//! The strategy decides the memory an idle connection costs and how many copies a message takes, so it
//! is pluggable and the three are benchmarked side by side (BENCHMARKS.md):
//!
//! * [`RingBuffer`]: one fixed allocation per connection, for its whole life. Frames are parsed in place,
//!   even one that wraps past the end (readable bytes come as up to two slices); a frame larger than the
//!   ring is streamed out into the message buffer instead of growing the ring. Predictable, but every
//!   idle connection pays the full capacity.
//! * [`PooledBuffer`]: borrows a buffer from a shared [`BufferPool`] only while it holds unparsed bytes
//!   and gives it back as soon as it is drained. An idle connection holds no read buffer at all — this is
//!   why it is the default.
//! * [`GrowableBuffer`]: a plain `Vec` that grows to fit and keeps its size: the simple baseline.
//!
//! All three implement [`ReadBuffer`]; the reader ([`crate::reader`]) is written once against the trait,
//! and every codec test runs against each strategy.

mod growable;
mod pool;
mod ring;

pub use growable::GrowableBuffer;
pub use pool::{BufferPool, PooledBuffer};
pub use ring::RingBuffer;

use crate::error::WireError;
use crate::reader::{Event, Reader};

/// Storage for bytes read from the peer and not yet parsed.
///
/// Readable bytes are in arrival order as `(first, second)`; only a ring that wraps returns a non-empty
/// `second`. Writable space likewise comes as up to two regions, to be filled in order (a vectored read).
pub trait ReadBuffer {
    /// Number of readable (unparsed) bytes.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The readable bytes, mutable so that payloads can be unmasked in place.
    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]);

    /// Drops the first `n` readable bytes. `n <= len()`.
    fn consume(&mut self, n: usize);

    /// Free space to read into. Empty (both regions) only when the buffer is full; the reader guarantees
    /// progress by streaming out any frame that cannot complete in place (see [`Self::frame_capacity`]).
    fn writable(&mut self) -> (&mut [u8], &mut [u8]);

    /// Marks `n` bytes of the writable regions (in order) as filled.
    fn commit(&mut self, n: usize);

    /// The largest frame payload this buffer will hold whole so it can be parsed in place; a larger frame
    /// is streamed into the message buffer as it arrives.
    fn frame_capacity(&self) -> usize;

    /// Called when the connection goes idle. Gives back memory the strategy does not need to keep
    /// (a pooled buffer returns to its pool once empty).
    fn release(&mut self) {}

    /// Heap bytes this buffer holds right now (for memory accounting and tests).
    fn held_bytes(&self) -> usize;

    /// [`Reader::next`] on this buffer; `Reader::next` calls it, and nothing else should. It exists for
    /// [`AnyBuffer`], which overrides it to choose its strategy once per event and then parse with the
    /// concrete buffer type (every buffer call inlined), instead of dispatching on each of the several
    /// buffer calls one event takes.
    #[doc(hidden)]
    #[inline]
    fn next_event<'a>(&'a mut self, reader: &'a mut Reader) -> Result<Option<Event<'a>>, WireError> {
        reader.next_in(self)
    }
}

/// The strategy names accepted by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    Ring,
    Pool,
    Growable,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::Ring, Strategy::Pool, Strategy::Growable];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ring => "ring",
            Strategy::Pool => "pool",
            Strategy::Growable => "growable",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|st| st.name() == s)
    }
}

/// One of the three strategies, chosen at run time. An enum rather than a trait object keeps the
/// per-byte calls statically dispatched and the connection state free of an extra allocation.
#[derive(Debug)]
pub enum AnyBuffer {
    Ring(RingBuffer),
    Pool(PooledBuffer),
    Growable(GrowableBuffer),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBuffer::Ring($b) => $e,
            AnyBuffer::Pool($b) => $e,
            AnyBuffer::Growable($b) => $e,
        }
    };
}

impl ReadBuffer for AnyBuffer {
    #[inline]
    fn len(&self) -> usize {
        dispatch!(self, b => b.len())
    }
    #[inline]
    fn readable_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        dispatch!(self, b => b.readable_mut())
    }
    #[inline]
    fn consume(&mut self, n: usize) {
        dispatch!(self, b => b.consume(n))
    }
    #[inline]
    fn writable(&mut self) -> (&mut [u8], &mut [u8]) {
        dispatch!(self, b => b.writable())
    }
    #[inline]
    fn commit(&mut self, n: usize) {
        dispatch!(self, b => b.commit(n))
    }
    #[inline]
    fn frame_capacity(&self) -> usize {
        dispatch!(self, b => b.frame_capacity())
    }
    #[inline]
    fn release(&mut self) {
        dispatch!(self, b => b.release())
    }
    fn held_bytes(&self) -> usize {
        dispatch!(self, b => b.held_bytes())
    }
    #[inline]
    fn next_event<'a>(&'a mut self, reader: &'a mut Reader) -> Result<Option<Event<'a>>, WireError> {
        dispatch!(self, b => reader.next_in(b))
    }
}

/// Copies `data` into the writable regions of `buf` (as a socket read would), returning how much fit.
/// Used by tests, benches and fuzzers to drive a buffer without IO.
pub fn fill_from<B: ReadBuffer + ?Sized>(buf: &mut B, data: &[u8]) -> usize {
    let (a, b) = buf.writable();
    let n1 = a.len().min(data.len());
    a[..n1].copy_from_slice(&data[..n1]);
    let n2 = b.len().min(data.len() - n1);
    b[..n2].copy_from_slice(&data[n1..n1 + n2]);
    buf.commit(n1 + n2);
    n1 + n2
}

#[cfg(test)]
mod tests {
    /// Every connection carries one: the strategies' switch to a boxed slice (for a cheap enum tag) must
    /// not make it larger than it was.
    #[test]
    fn any_buffer_stays_small() {
        let size = std::mem::size_of::<super::AnyBuffer>();
        println!("AnyBuffer: {size} B");
        assert!(size <= 40, "AnyBuffer grew to {size} B");
    }
}
