//! Every connection's next deadline in one sharded table, swept by one task; also how shutdown reaches
//! every connection.
//!
//! # Why not a `tokio::time::Sleep` per connection
//! A `Sleep` is 112 bytes inside each connection's future, and shutdown needed another ~70-byte waiter
//! next to it. For a server whose idle connections must cost under 1 KiB each (tokio's task cell and
//! socket registration already take ~900 B), that was the difference between the 640- and the
//! 448-byte allocator class for every task. Here a connection holds an 8-byte [`Key`] and its table entry
//! costs 24 bytes, in chunks of [`CHUNK`] entries that never move (a doubling slab cost 40-50 bytes an
//! entry at 10,000 connections).
//!
//! # How it works
//! A connection arms its entry with a deadline (milliseconds on this table's clock) and its waker when
//! it is about to wait. The sweeper wakes every armed entry whose deadline has passed, every
//! [`TICK`]; the connection then checks its real deadlines itself (they may have moved later: re-arming
//! is lazy, done only when a deadline comes earlier or after the entry fired). Timeouts are therefore
//! accurate to one tick, which is plenty for handshake, idle, write and close timeouts.
//!
//! Shutdown sets a flag and wakes every entry, armed or not.
//!
//! Times are `u32` milliseconds that wrap every ~49 days; comparisons use wrapping arithmetic, which is
//! exact for intervals under ~24 days (configured timeouts are validated to be far shorter).
//!
//! # The clock
//! Connections read it on every wake, so it is the kernel's coarse monotonic clock (Linux's
//! `CLOCK_MONOTONIC_COARSE`: the time of the last timer interrupt, read from the vDSO without touching
//! the time-stamp counter) turned into milliseconds with integer arithmetic, not `Instant` and
//! `Duration`. Its resolution is one kernel tick (a few milliseconds), well inside the sweep's [`TICK`].
//! Every reader of this table's time, the sweep included, goes through [`Deadlines::now_ms`], so all of
//! them agree on one clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

/// How often the sweeper looks for expired deadlines.
pub const TICK: Duration = Duration::from_millis(50);

const SHARDS: usize = 32;

/// A connection's entry in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    shard: u32,
    index: u32,
}

#[derive(Debug, Default)]
struct Entry {
    live: bool,
    armed: bool,
    at: u32,
    waker: Option<Waker>,
}

/// Entries per chunk of a shard's table.
pub const CHUNK: usize = 64;

/// One shard's entries: fixed-size chunks, a free list of vacated indices, and the high-water mark.
#[derive(Debug, Default)]
struct Table {
    /// Boxed chunks: growing the table moves pointers, never entries, and needs no doubled copy.
    #[allow(clippy::vec_box)]
    chunks: Vec<Box<[Entry; CHUNK]>>,
    free: Vec<u32>,
    used: u32,
    len: usize,
}

impl Table {
    fn insert(&mut self) -> u32 {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.used as usize == self.chunks.len() * CHUNK {
                    self.chunks.push(Box::new(std::array::from_fn(|_| Entry::default())));
                }
                self.used += 1;
                self.used - 1
            }
        };
        if let Some(e) = self.get_any(index) {
            *e = Entry { live: true, armed: false, at: 0, waker: None };
        }
        self.len += 1;
        index
    }

    fn get_any(&mut self, index: u32) -> Option<&mut Entry> {
        let i = index as usize;
        self.chunks.get_mut(i / CHUNK).map(|c| &mut c[i % CHUNK])
    }

    fn get_mut(&mut self, index: u32) -> Option<&mut Entry> {
        self.get_any(index).filter(|e| e.live)
    }

    fn remove(&mut self, index: u32) {
        if let Some(e) = self.get_mut(index) {
            *e = Entry::default();
            self.free.push(index);
            self.len -= 1;
        }
    }

    fn live_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.chunks.iter_mut().flat_map(|c| c.iter_mut()).filter(|e| e.live)
    }
}

#[derive(Debug)]
pub struct Deadlines {
    shards: Box<[Mutex<Table>]>,
    /// [`clock_ms`] when the table was made: times start near zero.
    epoch: u32,
    shutdown: AtomicBool,
    /// For tasks that are not in the table (HTTP connections) and wait for shutdown as a future.
    shutdown_notify: tokio::sync::Notify,
}

/// Whether time `now` has reached `at` (wrapping milliseconds).
#[inline]
pub fn reached(now: u32, at: u32) -> bool {
    now.wrapping_sub(at) as i32 >= 0
}

/// The clock chosen in the module docs, in wrapping milliseconds.
#[cfg(target_os = "linux")]
const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC_COARSE;
#[cfg(not(target_os = "linux"))]
const CLOCK: libc::clockid_t = libc::CLOCK_MONOTONIC;

#[inline]
fn clock_ms() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; a monotonic clock that exists cannot fail to be read
    // (and if it did, `ts` would stay zero: a stuck clock, never undefined behaviour).
    unsafe { libc::clock_gettime(CLOCK, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1000).wrapping_add(ts.tv_nsec as u64 / 1_000_000) as u32
}

impl Deadlines {
    pub fn new() -> Arc<Self> {
        Arc::new(Deadlines {
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
            epoch: clock_ms(),
            shutdown: AtomicBool::new(false),
            shutdown_notify: tokio::sync::Notify::new(),
        })
    }

    fn shard(&self, i: u32) -> MutexGuard<'_, Table> {
        // A poisoned shard only means a panic elsewhere while it was held; the slab itself is sound.
        match self.shards[i as usize].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Milliseconds on this table's clock.
    #[inline]
    pub fn now_ms(&self) -> u32 {
        clock_ms().wrapping_sub(self.epoch)
    }

    /// Adds an entry (unarmed). `spread` picks the shard (any number that varies between connections).
    pub fn register(&self, spread: usize) -> Key {
        let shard = (spread % SHARDS) as u32;
        let index = self.shard(shard).insert();
        Key { shard, index }
    }

    /// Arms `key` to wake `waker` once the clock reaches `at`.
    pub fn arm(&self, key: Key, at: u32, waker: &Waker) {
        let mut shard = self.shard(key.shard);
        if let Some(e) = shard.get_mut(key.index) {
            e.armed = true;
            e.at = at;
            match &e.waker {
                Some(w) if w.will_wake(waker) => {}
                _ => e.waker = Some(waker.clone()),
            }
        }
    }

    pub fn remove(&self, key: Key) {
        self.shard(key.shard).remove(key.index);
    }

    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Begins shutdown: every connection is woken and sees [`Self::is_shutdown`].
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.shutdown_notify.notify_waiters();
        let mut wake = Vec::new();
        for i in 0..SHARDS as u32 {
            wake.extend(self.shard(i).live_mut().filter_map(|e| e.waker.clone()));
            for w in wake.drain(..) {
                w.wake();
            }
        }
    }

    /// Resolves once shutdown has begun.
    pub async fn wait_shutdown(&self) {
        let notified = self.shutdown_notify.notified();
        if self.is_shutdown() {
            return;
        }
        notified.await;
    }

    /// Wakes every armed entry whose deadline has passed. Returns how many were woken.
    /// `scratch` is reused between sweeps so a sweep allocates nothing once warm.
    pub fn sweep(&self, scratch: &mut Vec<Waker>) -> usize {
        let now = self.now_ms();
        let mut woken = 0;
        for i in 0..SHARDS as u32 {
            {
                let mut shard = self.shard(i);
                for e in shard.live_mut() {
                    if e.armed && reached(now, e.at) {
                        e.armed = false;
                        if let Some(w) = &e.waker {
                            scratch.push(w.clone());
                        }
                    }
                }
            }
            // Wake outside the lock: a woken task may run at once on another thread and re-arm.
            woken += scratch.len();
            for w in scratch.drain(..) {
                w.wake();
            }
        }
        woken
    }

    /// The sweeper task: sweeps every [`TICK`] until the table is dropped by everyone else.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scratch = Vec::new();
        loop {
            interval.tick().await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            self.sweep(&mut scratch);
        }
    }

    /// Entries in the table (live connections).
    pub fn len(&self) -> usize {
        (0..SHARDS as u32).map(|i| self.shard(i).len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wrapping_comparison() {
        assert!(reached(10, 10));
        assert!(reached(11, 10));
        assert!(!reached(9, 10));
        assert!(reached(5, u32::MAX - 5), "past the wrap");
        assert!(!reached(u32::MAX - 5, 5));
    }

    /// The coarse clock moves with real time, within a kernel tick or two.
    #[test]
    fn the_clock_follows_real_time() {
        let d = Deadlines::new();
        let (start, real) = (d.now_ms(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(150));
        let (ms, real) = (d.now_ms().wrapping_sub(start), real.elapsed().as_millis() as u32);
        assert!(ms + 25 >= real && ms <= real + 25, "the table's clock moved {ms} ms in {real} ms");
        assert!(d.now_ms() < 60_000, "the table's times start near zero");
    }

    #[test]
    fn only_expired_armed_entries_are_woken_once() {
        let d = Deadlines::new();
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        let now = d.now_ms();
        let a = d.register(0);
        let b = d.register(1);
        let _unarmed = d.register(2);
        d.arm(a, now.wrapping_sub(1), &w);
        d.arm(b, now + 60_000, &w);
        let mut scratch = Vec::new();
        assert_eq!(d.sweep(&mut scratch), 1);
        assert_eq!(d.sweep(&mut scratch), 0, "a fired entry is disarmed until re-armed");
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        d.remove(a);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn vacated_entries_are_reused_and_never_fire() {
        let d = Deadlines::new();
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        let keys: Vec<Key> = (0..(CHUNK * 2 + 3)).map(|_| d.register(0)).collect();
        assert_eq!(d.len(), CHUNK * 2 + 3);
        for k in &keys {
            d.arm(*k, d.now_ms().wrapping_sub(1), &w);
        }
        for k in &keys[..CHUNK] {
            d.remove(*k);
        }
        d.remove(keys[0]); // twice: no effect
        d.arm(keys[1], 0, &w); // after removal: no effect
        assert_eq!(d.len(), CHUNK + 3);
        let again = d.register(0);
        assert!(keys[..CHUNK].contains(&again), "a vacated index is reused");
        assert_eq!(d.shard(0).chunks.len(), 3, "no new chunk while indices are free");
        let mut scratch = Vec::new();
        assert_eq!(d.sweep(&mut scratch), CHUNK + 3, "removed entries never fire; the new one is unarmed");
        assert_eq!(c.0.load(Ordering::SeqCst), CHUNK + 3);
    }

    #[test]
    fn shutdown_wakes_everyone() {
        let d = Deadlines::new();
        let c = Arc::new(Counter(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        for i in 0..100 {
            let k = d.register(i);
            d.arm(k, d.now_ms() + 60_000, &w);
        }
        d.shutdown();
        assert!(d.is_shutdown());
        assert_eq!(c.0.load(Ordering::SeqCst), 100);
    }
}
