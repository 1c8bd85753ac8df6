//! Results of server-API publications made with an `idempotency_key`, so a retried call publishes nothing.
//!
//! Centrifugo keeps, per channel, the result of a publication made with an idempotency key for 5 minutes;
//! a publication to the same channel with the same key within that window returns the first result and is
//! not published again. This is that cache: bounded (a caller cannot grow it without limit: past
//! [`MAX_PER_SHARD`] entries the oldest is forgotten early) and expiring (entries older than the window are
//! dropped whenever their shard is touched).
//!
//! A lookup and the publish it guards run under the shard's lock ([`IdempotencyCache::run`]), so two
//! concurrent calls with one key publish once. Lock order: this lock, then the hub's; nothing takes them
//! the other way round.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a key's result is remembered (Centrifugo's idempotent result TTL).
pub const WINDOW: Duration = Duration::from_secs(300);
/// Entries kept per shard at most.
pub const MAX_PER_SHARD: usize = 8192;
const SHARDS: usize = 16;

type Key = (Box<str>, Box<str>);

#[derive(Default)]
struct Shard<T> {
    results: HashMap<Key, (T, Instant)>,
    /// Keys in insertion order, for expiry and the size bound.
    order: VecDeque<(Key, Instant)>,
}

impl<T> Shard<T> {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((key, at)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() <= MAX_PER_SHARD {
                break;
            }
            // The map entry goes only if it is this one (a key re-inserted later has a later stamp).
            if self.results.get(key).is_some_and(|(_, stamp)| stamp == at) {
                self.results.remove(key);
            }
            self.order.pop_front();
        }
    }
}

/// Per-channel results by idempotency key.
pub struct IdempotencyCache<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    hasher: std::collections::hash_map::RandomState,
    window: Duration,
}

impl<T: Clone> Default for IdempotencyCache<T> {
    fn default() -> Self {
        Self::with_window(WINDOW)
    }
}

impl<T: Clone> IdempotencyCache<T> {
    pub fn with_window(window: Duration) -> Self {
        IdempotencyCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { results: HashMap::new(), order: VecDeque::new() }))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            window,
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard<T>> {
        let i = (self.hasher.hash_one(channel) as usize) % SHARDS;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The result remembered for (`channel`, `key`), or `publish`'s, remembered if it succeeded. `Ok(
    /// (result, true))` when it was remembered (nothing was published).
    pub fn run<E>(&self, channel: &str, key: &str, publish: impl FnOnce() -> Result<T, E>) -> Result<(T, bool), E> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        shard.expire(now, self.window);
        let k: Key = (channel.into(), key.into());
        if let Some((result, _)) = shard.results.get(&k) {
            return Ok((result.clone(), true));
        }
        let result = publish()?;
        shard.results.insert(k.clone(), (result.clone(), now));
        shard.order.push_back((k, now));
        shard.expire(now, self.window);
        Ok((result, false))
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.results.len(),
                Err(p) => p.into_inner().results.len(),
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_returns_the_first_result_and_runs_nothing() {
        let c = IdempotencyCache::<u64>::default();
        assert_eq!(c.run("ch", "k", || Ok::<_, ()>(1)), Ok((1, false)));
        assert_eq!(c.run("ch", "k", || -> Result<u64, ()> { panic!("published twice") }), Ok((1, true)));
        assert_eq!(c.run("other", "k", || Ok::<_, ()>(2)), Ok((2, false)), "keys are per channel");
        assert_eq!(c.run("ch", "k2", || Ok::<_, ()>(3)), Ok((3, false)));
    }

    #[test]
    fn a_failed_publish_is_not_remembered() {
        let c = IdempotencyCache::<u64>::default();
        assert_eq!(c.run("ch", "k", || Err::<u64, _>("no")), Err("no"));
        assert_eq!(c.run("ch", "k", || Ok::<_, &str>(5)), Ok((5, false)));
    }

    #[test]
    fn keys_expire_after_the_window() {
        let c = IdempotencyCache::<u64>::with_window(Duration::ZERO);
        assert_eq!(c.run("ch", "k", || Ok::<_, ()>(1)), Ok((1, false)));
        assert_eq!(c.run("ch", "k", || Ok::<_, ()>(2)), Ok((2, false)), "a zero window remembers nothing");
        assert!(c.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = IdempotencyCache::<u64>::default();
        for i in 0..(MAX_PER_SHARD * SHARDS * 2) {
            let _ = c.run("one-channel", &i.to_string(), || Ok::<_, ()>(0));
        }
        assert!(c.len() <= MAX_PER_SHARD, "one channel lives in one shard: {}", c.len());
    }
}
