//! Redis sharding (`redis_url` with several instances): each channel lives on one Redis, chosen by a
//! consistent hash of its name, so that publications, history, presence and PUB/SUB spread over several
//! single-threaded Redis processes instead of saturating one.
//!
//! # Why one whole shard per channel
//! Everything the engine guarantees for a channel rests on one Redis doing it: the publish script assigns
//! the offset and PUBLISHes in one step, so PUB/SUB order is offset order; recovery reads the history the
//! same script appended to; presence is one hash. So a channel's publish, history, presence and this node's
//! PUB/SUB subscription all go to the same shard ([`ShardedRedis::shard`]), and each shard is a complete
//! single-instance [`RedisEngine`] with its own connections, PUB/SUB task, reconnect handling and presence
//! refresh. Nothing orders publications across channels, so nothing has to span shards.
//!
//! # Choosing the shard
//! The channel name is hashed with 64-bit FNV-1a and the hash mapped to a shard with jump consistent hash
//! (Lamping and Veach, 2014): what Centrifugo's Redis engine does, so ringcast and Centrifugo nodes given
//! the same address list agree on where a channel lives. The shard is a pure function of the channel
//! name and the *order* of `redis_url`: every node must list the same instances in the same order. Adding
//! an instance at the end moves about 1/N of the channels (their history and presence stay behind on the
//! old shard, as with Centrifugo); reordering moves most of them.
//!
//! # Node-wide traffic
//! Control messages (API disconnect, subscribe, unsubscribe, refresh of a client on another node) are
//! published on, and received from, the first instance of `redis_url` only. When that one is down, control
//! calls answer error 100 while channels on the other shards keep working.
//!
//! # Failing separately
//! A shard that is down fails only its own channels. The circuit breaker keeps to that: it has one state
//! per shard ([`super::breaker`], through [`Sharded`]), so a dead shard's breaker opening leaves the
//! others' channels alone; control calls go through the first shard's breaker.
//!
//! # Refused
//! Redis Cluster (`redis_cluster_address`, a `cluster-enabled` server) is not supported: the publish
//! script touches keys of one channel only, but the PUB/SUB connection of a cluster would need to follow
//! slot migrations, which this engine does not do. Shard over independent instances instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use ringcast_protocol::messages::{ClientInfo, Publication};

use super::redis::{RedisEngine, RedisSettings};
use super::{Broker, Control, EngineFuture, EngineStatus, HistoryStore, Inbound, PresenceManager, Sharded};
use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// 64-bit FNV-1a of `bytes`.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash: the bucket in `0..buckets` of `key` (`buckets >= 1`). Growing `buckets` from n to
/// n+1 moves a key only into the new bucket, and for about 1/(n+1) of the keys.
fn jump(mut key: u64, buckets: usize) -> usize {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    // Each step moves j forward; bounded by `buckets`.
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

/// The shard of `channel` among `shards` instances (0 when there is one).
pub fn shard_index(channel: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    jump(fnv1a64(channel.as_bytes()), shards)
}

/// N single-instance Redis engines, one per `redis_url`, each channel routed to one of them.
#[derive(Debug)]
pub struct ShardedRedis {
    /// The first instance: shard 0, and the one control messages go through.
    first: Arc<RedisEngine>,
    /// Every instance in `redis_url` order, `first` included.
    shards: Vec<Arc<RedisEngine>>,
}

impl ShardedRedis {
    /// Connects every shard (each must answer: a node that cannot reach one of its shards does not start,
    /// as with one Redis). Control messages go through the first.
    pub async fn connect(
        urls: &[String],
        prefix: &str,
        timeout: std::time::Duration,
        presence_ttl: std::time::Duration,
    ) -> Result<Arc<ShardedRedis>, String> {
        let mut shards = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let settings =
                RedisSettings { url: url.clone(), prefix: prefix.to_string(), timeout, presence_ttl, control: i == 0 };
            shards.push(RedisEngine::connect(&settings).await?);
        }
        let first = shards.first().cloned().ok_or("redis_url: no instance")?;
        Ok(Arc::new(ShardedRedis { first, shards }))
    }

    pub fn set_inbound(&self, inbound: Weak<dyn Inbound>) {
        for s in &self.shards {
            s.set_inbound(inbound.clone());
        }
    }

    /// How many instances channels are spread over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that holds everything of `channel`.
    pub fn shard(&self, channel: &str) -> &RedisEngine {
        self.shards.get(shard_index(channel, self.shards.len())).unwrap_or(&self.first)
    }
}

impl Broker for ShardedRedis {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        self.shard(channel).publish(channel, publication, history)
    }

    fn subscribe_node<'a>(&'a self, channel: &'a str, history: HistoryOptions) -> EngineFuture<'a, ()> {
        self.shard(channel).subscribe_node(channel, history)
    }

    fn unsubscribe_node(&self, channel: &str) {
        self.shard(channel).unsubscribe_node(channel)
    }

    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        self.first.control(control)
    }

    fn barrier<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.shard(channel).barrier(channel)
    }

    fn status(&self) -> EngineStatus {
        EngineStatus::of_shards(self.shard_statuses())
    }
}

impl Sharded for ShardedRedis {
    fn shards(&self) -> usize {
        self.shards.len()
    }

    fn shard_of(&self, channel: &str) -> usize {
        shard_index(channel, self.shards.len())
    }

    fn shard_statuses(&self) -> Vec<EngineStatus> {
        self.shards.iter().map(|s| s.status()).collect()
    }
}

impl HistoryStore for ShardedRedis {
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        self.shard(channel).history(channel, filter, history)
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.shard(channel).remove_history(channel)
    }
}

impl PresenceManager for ShardedRedis {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        self.shard(channel).add_presence(channel, client, info)
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()> {
        self.shard(channel).remove_presence(channel, client)
    }

    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        self.shard(channel).presence(channel)
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        self.shard(channel).presence_stats(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Values from a separate implementation of Centrifugo's shard choice (a Python port of its Go code:
    /// FNV-1a 64 of the name, then jump hash), so a ringcast node and a Centrifugo node given the same
    /// address list put these channels on the same instance.
    #[test]
    fn shard_choice_agrees_with_centrifugos() {
        let cases: [(&str, [usize; 4]); 5] = [
            ("news", [1, 2, 3, 3]),
            ("chat:index", [0, 0, 0, 0]),
            ("a", [1, 2, 2, 2]),
            ("spread-1", [0, 2, 2, 2]),
            ("user#42", [1, 2, 2, 2]),
        ];
        for (channel, want) in cases {
            let got = [2, 3, 5, 10].map(|n| shard_index(channel, n));
            assert_eq!(got, want, "{channel}");
        }
    }

    #[test]
    fn one_shard_takes_every_channel() {
        for c in ["", "a", "news", "chat:room#1"] {
            assert_eq!(shard_index(c, 1), 0);
            assert_eq!(shard_index(c, 0), 0);
        }
    }

    #[test]
    fn channels_spread_over_shards_and_stay_in_range() {
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let s = shard_index(&format!("channel-{i}"), 3);
            assert!(s < 3);
            counts[s] += 1;
        }
        // Uniform in expectation (1000 each); a broken hash puts everything in one.
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
    }

    #[test]
    fn adding_a_shard_moves_channels_only_to_the_new_one() {
        let mut moved = 0;
        for i in 0..2000 {
            let c = format!("ch{i}");
            let (before, after) = (shard_index(&c, 2), shard_index(&c, 3));
            if before != after {
                assert_eq!(after, 2, "{c} moved between old shards");
                moved += 1;
            }
        }
        // About a third moves.
        assert!((400..900).contains(&moved), "{moved}");
    }
}
