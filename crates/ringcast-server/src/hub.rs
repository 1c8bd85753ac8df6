//! The channel registry: who is subscribed to what, and fan-out of encoded frames to them.
//!
//! Sharded by channel name so that subscribes, unsubscribes and publishes on different channels never
//! contend on one lock. A publication is encoded into a WebSocket frame once per wire format (JSON,
//! Protobuf), lazily — only for formats some subscriber uses — and that one `Bytes` is queued on every
//! subscriber: no per-subscriber serialization, copy or allocation.
//!
//! The shard lock also orders a subscribe against publishes on the same channel: a publish appends to
//! history and fans out while holding the shard's *read* lock ([`Hub::publish_with`]); a subscribe reads
//! history, registers and queues its reply while holding the *write* lock ([`Hub::subscribe_with`]). So
//! every publication reaches a recovering subscriber exactly once: in its recovery replay or as a push,
//! never both and never neither. No lock here is held across a socket write.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use ringcast_protocol::Format;

use crate::client::{ClientId, ClientShared, Delivery};

const SHARDS: usize = 64;

/// Channel name → its local subscribers. The name is an `Arc<str>` that subscribers' sessions share
/// (no per-subscription copy of it).
type Channels = HashMap<Arc<str>, Vec<Arc<ClientShared>>>;

#[derive(Debug)]
pub struct Hub {
    shards: Box<[RwLock<Channels>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// A frame for every format, encoded on first use.
pub struct Frames<'a> {
    encode: &'a dyn Fn(Format) -> Option<Bytes>,
    json: Option<Option<Bytes>>,
    protobuf: Option<Option<Bytes>>,
}

impl<'a> Frames<'a> {
    pub fn new(encode: &'a dyn Fn(Format) -> Option<Bytes>) -> Self {
        Frames { encode, json: None, protobuf: None }
    }

    pub fn get(&mut self, format: Format) -> Option<&Bytes> {
        let slot = match format {
            Format::Json => &mut self.json,
            Format::Protobuf => &mut self.protobuf,
        };
        slot.get_or_insert_with(|| (self.encode)(format)).as_ref()
    }
}

/// Counts of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    pub delivered: usize,
    /// Clients disconnected as slow by this fan-out.
    pub slow: usize,
    /// Frames dropped: the backlog of clients found slow, and frames for clients already disconnecting.
    pub dropped: usize,
}

impl FanOut {
    /// Adds this fan-out to the metrics: every fan-out (publications, join/leave) once, after the
    /// shard lock is released.
    fn record(&self) {
        metrics::counter!(crate::metrics::MESSAGES_OUT_TOTAL).increment(self.delivered as u64);
        if self.slow > 0 {
            metrics::counter!(crate::metrics::SLOW_DISCONNECTS_TOTAL).increment(self.slow as u64);
        }
        if self.dropped > 0 {
            metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(self.dropped as u64);
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard_of(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn read(&self, i: usize) -> RwLockReadGuard<'_, Channels> {
        match self.shards[i].read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self, i: usize) -> RwLockWriteGuard<'_, Channels> {
        match self.shards[i].write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Registers `client` on `channel` while `before` runs under the channel's exclusive lock (read
    /// history, queue the subscribe reply). `before` returning `Err` aborts the subscription. `first`
    /// runs (under the lock) when the channel gets its first subscriber on this node. Also returns the
    /// channel's name as the registry holds it, for the subscriber to keep.
    pub fn subscribe_with<T, E>(
        &self,
        channel: &str,
        client: &Arc<ClientShared>,
        first: impl FnOnce(),
        before: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Arc<str>), E> {
        let mut shard = self.write(self.shard_of(channel));
        let out = before()?;
        let name = shard.get_key_value(channel).map_or_else(|| Arc::from(channel), |(k, _)| k.clone());
        let subs = shard.entry(name.clone()).or_default();
        if subs.is_empty() {
            first();
        }
        if !subs.iter().any(|c| c.id == client.id) {
            subs.push(client.clone());
        }
        Ok((out, name))
    }

    /// Removes `client` from `channel`; `last` runs (under the lock) when that was the channel's last
    /// subscriber on this node. Returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, client: ClientId, last: impl FnOnce()) -> bool {
        let mut shard = self.write(self.shard_of(channel));
        let Some(subs) = shard.get_mut(channel) else { return false };
        let Some(pos) = subs.iter().position(|c| c.id == client) else { return false };
        subs.swap_remove(pos);
        if subs.is_empty() {
            shard.remove(channel);
            last();
        }
        true
    }

    /// Runs `during` (append to history, assign the offset) and fans out the frames `encode` makes of
    /// its result, all under the channel's shared lock.
    pub fn publish_with<T>(
        &self,
        channel: &str,
        during: impl FnOnce() -> T,
        encode: impl Fn(&T, Format) -> Option<Bytes>,
    ) -> (T, FanOut) {
        let shard = self.read(self.shard_of(channel));
        let value = during();
        let enc = |f: Format| encode(&value, f);
        let fan = deliver_all(shard.get(channel), None, &enc);
        drop(shard);
        fan.record();
        (value, fan)
    }

    /// Fans a frame out to every subscriber of `channel` except `skip` (join/leave pushes).
    pub fn broadcast(&self, channel: &str, skip: Option<ClientId>, encode: &dyn Fn(Format) -> Option<Bytes>) -> FanOut {
        let fan = deliver_all(self.read(self.shard_of(channel)).get(channel), skip, encode);
        fan.record();
        fan
    }

    pub fn num_subscribers(&self, channel: &str) -> usize {
        self.read(self.shard_of(channel)).get(channel).map_or(0, Vec::len)
    }

    /// Every channel with at least one local subscriber, with its subscriber count.
    pub fn channels(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            out.extend(self.read(i).iter().map(|(k, v)| (k.to_string(), v.len())));
        }
        out
    }
}

/// Queues the frame for each subscriber's format on every subscriber but `skip` (encoding each format at
/// most once).
fn deliver_all(
    subs: Option<&Vec<Arc<ClientShared>>>,
    skip: Option<ClientId>,
    encode: &dyn Fn(Format) -> Option<Bytes>,
) -> FanOut {
    let mut frames = Frames::new(encode);
    let mut fan = FanOut::default();
    let Some(subs) = subs else { return fan };
    let now = crate::metrics::clock_us();
    for client in subs.iter().filter(|c| Some(c.id) != skip) {
        let Some(frame) = frames.get(client.format) else { continue };
        match client.deliver(frame, now) {
            Delivery::Queued => fan.delivered += 1,
            Delivery::Slow(dropped) => {
                fan.slow += 1;
                fan.dropped += dropped;
            }
            Delivery::Closed => fan.dropped += 1,
        }
    }
    fan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Outbound;

    fn frame_for(format: Format) -> Option<Bytes> {
        Some(Bytes::from(match format {
            Format::Json => "json",
            Format::Protobuf => "pb",
        }))
    }

    #[test]
    fn publication_is_encoded_once_per_format_and_shared() {
        let hub = Hub::new();
        let a = ClientShared::new(ClientId(1), Format::Json, 1 << 20);
        let b = ClientShared::new(ClientId(2), Format::Json, 1 << 20);
        let c = ClientShared::new(ClientId(3), Format::Protobuf, 1 << 20);
        for cl in [&a, &b, &c] {
            hub.subscribe_with("news", cl, || {}, || Ok::<_, ()>(())).unwrap();
        }
        let calls = std::cell::Cell::new(0);
        let ((), fan) = hub.publish_with(
            "news",
            || (),
            |_, f| {
                calls.set(calls.get() + 1);
                frame_for(f)
            },
        );
        assert_eq!(fan, FanOut { delivered: 3, slow: 0, dropped: 0 });
        assert_eq!(calls.get(), 2, "one encoding per format, not per subscriber");
        let mut la = Outbound::new();
        let mut lb = Outbound::new();
        a.take(&mut la, std::task::Waker::noop());
        b.take(&mut lb, std::task::Waker::noop());
        assert_eq!(la.queued_bytes(), 4);
        assert_eq!(lb.queued_bytes(), 4);
    }

    #[test]
    fn unsubscribe_removes_and_forgets_empty_channels() {
        let hub = Hub::new();
        let a = ClientShared::new(ClientId(1), Format::Json, 1 << 20);
        let firsts = std::cell::Cell::new(0);
        let lasts = std::cell::Cell::new(0);
        hub.subscribe_with("x", &a, || firsts.set(firsts.get() + 1), || Ok::<_, ()>(())).unwrap();
        hub.subscribe_with("x", &a, || firsts.set(firsts.get() + 1), || Ok::<_, ()>(())).unwrap();
        assert_eq!(hub.num_subscribers("x"), 1, "subscribing twice registers once");
        assert_eq!(firsts.get(), 1, "the node subscribes to the broker once per channel");
        assert!(hub.unsubscribe("x", ClientId(1), || lasts.set(lasts.get() + 1)));
        assert!(!hub.unsubscribe("x", ClientId(1), || lasts.set(lasts.get() + 1)));
        assert_eq!(lasts.get(), 1);
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn a_slow_client_is_counted_with_what_was_dropped() {
        let hub = Hub::new();
        let slow = ClientShared::new(ClientId(1), Format::Json, 1024);
        let fast = ClientShared::new(ClientId(2), Format::Json, 1 << 20);
        for c in [&slow, &fast] {
            hub.subscribe_with("ch", c, || {}, || Ok::<_, ()>(())).expect("subscribed");
        }
        let frame = |_: Format| Some(Bytes::from(vec![0u8; 400]));
        let first = hub.broadcast("ch", None, &frame);
        let second = hub.broadcast("ch", None, &frame);
        assert_eq!(first, FanOut { delivered: 2, slow: 0, dropped: 0 });
        assert_eq!(second, first);
        // The third 400-byte frame does not fit in 1024 bytes: two queued + this one are dropped.
        assert_eq!(hub.broadcast("ch", None, &frame), FanOut { delivered: 1, slow: 1, dropped: 3 });
        assert_eq!(hub.broadcast("ch", None, &frame), FanOut { delivered: 1, slow: 0, dropped: 1 });
    }

    #[test]
    fn failed_subscribe_registers_nothing() {
        let hub = Hub::new();
        let a = ClientShared::new(ClientId(1), Format::Json, 1 << 20);
        assert_eq!(hub.subscribe_with("x", &a, || {}, || Err::<(), _>("denied")).map(|_| ()), Err("denied"));
        assert_eq!(hub.num_subscribers("x"), 0);
    }

    #[test]
    fn broadcast_skips_the_sender() {
        let hub = Hub::new();
        let a = ClientShared::new(ClientId(1), Format::Json, 1 << 20);
        let b = ClientShared::new(ClientId(2), Format::Json, 1 << 20);
        hub.subscribe_with("x", &a, || {}, || Ok::<_, ()>(())).unwrap();
        hub.subscribe_with("x", &b, || {}, || Ok::<_, ()>(())).unwrap();
        assert_eq!(hub.broadcast("x", Some(ClientId(1)), &frame_for).delivered, 1);
    }

    #[test]
    fn subscribers_share_one_copy_of_the_channel_name() {
        let hub = Hub::new();
        let a = ClientShared::new(ClientId(1), Format::Json, 1 << 20);
        let b = ClientShared::new(ClientId(2), Format::Json, 1 << 20);
        let ((), first) = hub.subscribe_with("room:42", &a, || {}, || Ok::<_, ()>(())).unwrap();
        let ((), second) = hub.subscribe_with("room:42", &b, || {}, || Ok::<_, ()>(())).unwrap();
        assert_eq!(&*first, "room:42");
        assert!(Arc::ptr_eq(&first, &second), "one allocation for the name, however many subscribers");
    }
}
