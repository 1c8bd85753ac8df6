//! Recording in the hot path: per-thread shards of counters and histograms.
//!
//! Every delivered message is counted and its latency recorded, from many tasks on several threads at
//! once. One shared histogram behind one lock would make the generator, not the server, the bottleneck.
//! So the [`Meter`] holds a few shards, and a thread always records into "its" shard (chosen once per
//! thread), making the lock uncontended in practice. A task takes the lock once per *read* (all the
//! messages parsed from one `read`), never across a syscall or an `.await`.
//!
//! Each shard keeps two histograms: the measured window (messages *sent* inside the window, so late
//! deliveries of measured messages still count and warm-up messages never do), and the current
//! one-second interval for the live line and the plot, swapped out by [`Meter::take_interval`].
//! Throughput counts deliveries *received* inside the window, the same window the CPU figures cover.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::histogram::{new_histogram, Hist};

/// The measured window, in monotonic nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// When load starts (warm-up begins).
    pub start: u64,
    /// Warm-up ends: measuring starts.
    pub from: u64,
    /// Measuring (and sending) ends.
    pub to: u64,
}

impl Window {
    #[inline]
    pub fn sent_inside(&self, t: u64) -> bool {
        t >= self.from && t < self.to
    }

    #[inline]
    pub fn received_inside(&self, t: u64) -> bool {
        t >= self.from && t <= self.to
    }
}

/// What one second looked like, in one process (or merged over all of them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Interval {
    /// Seconds since the start of load: this interval covers `(second - 1, second]`.
    pub second: u32,
    pub messages: u64,
    pub bytes: u64,
    /// Failures so far (cumulative).
    pub errors: u64,
    /// Connections open at the end of the interval.
    pub open: u64,
    pub latency: Hist,
    /// The last interval of a run, shorter than a second (its rate is not per second).
    #[serde(default)]
    pub partial: bool,
}

pub struct Shard {
    window: Window,
    window_latency: Histogram<u64>,
    interval_latency: Histogram<u64>,
    interval_messages: u64,
    interval_bytes: u64,
    window_messages: u64,
    window_bytes: u64,
}

impl Shard {
    /// Records one delivery: sent (or intended to be sent) at `sent`, received at `now`.
    #[inline]
    pub fn record(&mut self, sent: u64, now: u64, bytes: usize) {
        let latency = now.saturating_sub(sent);
        self.interval_latency.saturating_record(latency);
        self.interval_messages += 1;
        self.interval_bytes += bytes as u64;
        if self.window.sent_inside(sent) {
            self.window_latency.saturating_record(latency);
        }
        if self.window.received_inside(now) {
            self.window_messages += 1;
            self.window_bytes += bytes as u64;
        }
    }
}

/// Deliveries parsed from one read, recorded under one lock at the end of the read.
///
/// A task cannot hold the shard's guard itself: a `MutexGuard` may not cross an `.await`, and the
/// handler that records lives across many. So it collects up to [`BATCH`] samples on its stack and
/// records them in one go.
pub struct Batch {
    now: u64,
    sent: [u64; BATCH],
    bytes: [u32; BATCH],
    len: usize,
}

pub const BATCH: usize = 64;

impl Default for Batch {
    fn default() -> Self {
        Batch { now: 0, sent: [0; BATCH], bytes: [0; BATCH], len: 0 }
    }
}

impl Batch {
    /// Starts a read: every delivery in it is received at `now`.
    #[inline]
    pub fn begin(&mut self, now: u64) {
        self.now = now;
    }

    #[inline]
    pub fn now(&self) -> u64 {
        self.now
    }

    #[inline]
    pub fn push(&mut self, meter: &Meter, sent: u64, bytes: usize) {
        if self.len == BATCH {
            self.flush(meter);
        }
        self.sent[self.len] = sent;
        self.bytes[self.len] = bytes.min(u32::MAX as usize) as u32;
        self.len += 1;
    }

    pub fn flush(&mut self, meter: &Meter) {
        if self.len == 0 {
            return;
        }
        let mut shard = meter.shard();
        for i in 0..self.len {
            shard.record(self.sent[i], self.now, self.bytes[i] as usize);
        }
        self.len = 0;
    }
}

/// Shards enough that two threads rarely share one.
const SHARDS: usize = 16;

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: usize = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
}

/// One process's recorder.
pub struct Meter {
    shards: Box<[Mutex<Shard>]>,
    /// Connections open now.
    pub open: AtomicU64,
    /// Failures so far.
    pub errors: AtomicU64,
}

/// What the meter holds at the end of a run.
pub struct Totals {
    pub latency: Hist,
    pub messages: u64,
    pub bytes: u64,
}

impl Meter {
    pub fn new() -> Meter {
        let window = Window { start: 0, from: u64::MAX, to: 0 };
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    window,
                    window_latency: new_histogram(),
                    interval_latency: new_histogram(),
                    interval_messages: 0,
                    interval_bytes: 0,
                    window_messages: 0,
                    window_bytes: 0,
                })
            })
            .collect();
        Meter { shards, open: AtomicU64::new(0), errors: AtomicU64::new(0) }
    }

    /// Sets the measured window (before load starts).
    pub fn set_window(&self, window: Window) {
        for s in self.shards.iter() {
            lock(s).window = window;
        }
    }

    /// This thread's shard. Hold it only while parsing what one read returned.
    #[inline]
    pub fn shard(&self) -> MutexGuard<'_, Shard> {
        let slot = SLOT.with(|s| *s);
        lock(&self.shards[slot % SHARDS])
    }

    /// Swaps out the current interval.
    pub fn take_interval(&self, second: u32) -> Interval {
        let mut iv = Interval {
            second,
            errors: self.errors.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            ..Interval::default()
        };
        for s in self.shards.iter() {
            let mut s = lock(s);
            iv.latency.add(&s.interval_latency);
            s.interval_latency.reset();
            iv.messages += std::mem::take(&mut s.interval_messages);
            iv.bytes += std::mem::take(&mut s.interval_bytes);
        }
        iv
    }

    /// Everything recorded in the measured window.
    pub fn totals(&self) -> Totals {
        let mut t = Totals { latency: Hist::default(), messages: 0, bytes: 0 };
        for s in self.shards.iter() {
            let s = lock(s);
            t.latency.add(&s.window_latency);
            t.messages += s.window_messages;
            t.bytes += s.window_bytes;
        }
        t
    }

    pub fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Meter {
    fn default() -> Self {
        Meter::new()
    }
}

/// A poisoned shard only means a recording thread panicked mid-record; the counts are still usable.
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_filters_by_send_time_and_throughput_by_receive_time() {
        let m = Meter::new();
        m.set_window(Window { start: 0, from: 1000, to: 2000 });
        {
            let mut s = m.shard();
            s.record(500, 1500, 10); // warm-up message received in the window: throughput, no latency
            s.record(1500, 1600, 10); // measured
            s.record(1900, 2500, 10); // measured, delivered after the window: latency, no throughput
        }
        let t = m.totals();
        assert_eq!(t.latency.0.len(), 2);
        assert_eq!((t.messages, t.bytes), (2, 20));
        let iv = m.take_interval(1);
        assert_eq!((iv.messages, iv.latency.0.len()), (3, 3));
        assert_eq!(m.take_interval(2).messages, 0);
    }
}
