//! The channel registry: who is subscribed to what, and the per-channel sequencer that orders and fans
//! out publications.
//!
//! # Order
//! Every channel is a [`Channel`] with its own mutex. A publication's position is assigned (the broker
//! appends it to history and returns its offset) *and* its frame is queued on every local subscriber in
//! one critical section of that mutex ([`Hub::publish_with`]). So two publishers on one channel cannot
//! interleave between "offset assigned" and "queued": every subscriber receives the channel's
//! publications in the order their positions were assigned — strictly increasing offsets with history,
//! one total order without — and all subscribers see the same order. Each subscriber's queue is FIFO and
//! written by one writer at a time — its connection's task, or (while the connection is idle) the one
//! fan-out that claimed it, which writes after leaving the section (see [`crate::pubsub::client`]) —
//! so that order reaches the socket. Publishes on *other* channels take other
//! mutexes: unrelated channels never serialize on each other. No IO happens inside the section: the
//! memory broker assigns positions in memory, and queuing is a push onto a subscriber's in-memory queue.
//!
//! A channel without local subscribers has no `Channel`; its publications are sequenced under the
//! shard's read lock instead, which excludes the creation of the channel (a write lock). So a
//! subscriber that creates the channel sees each such publication in its recovery read, or not at all.
//!
//! A networked broker (a later issue) assigns positions remotely; its publications come back on one
//! ordered subscription per channel and are delivered through the same section, so the guarantee is
//! the same: the section is the one place where a position meets the subscriber queues.
//!
//! # Direct writes
//! Subscribers whose connection is idle are not woken: [`deliver_all`] claims them onto a per-thread
//! list, and once the section is left each is written to directly (one `sendmsg`), so the common
//! delivery costs no task wake-up, no poll and no lock across the write. A fan-out that claimed many
//! hands half of them to the other worker in one wake-up ([`crate::pubsub::spread`]).
//!
//! # Subscribe
//! A subscribe runs `before` (read history for recovery, queue the subscribe reply) and registers in the
//! same section, so a publication reaches a recovering subscriber exactly once: in its replay or as a
//! push, never both and never neither. Subscribers are kept in a set keyed by the address of their
//! [`ClientShared`]: subscribe and unsubscribe are O(1) whatever the channel's size, and take only the
//! channel's mutex (the shard's write lock only to create or remove a channel).
//!
//! # Lock order
//! shard lock → channel mutex → subscriber queue / broker shard. Nothing takes them the other way round,
//! and none is held across a socket write.
//!
//! # Encode once
//! A publication is encoded into a payload once per wire format and framed once per [`Encoding`] in use,
//! lazily — only for encodings some subscriber uses — and that one `Bytes` is queued on every subscriber:
//! no per-subscriber serialization, copy or allocation. This module does not know how a transport frames
//! bytes ([`crate::transport`] does).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use ringcast_protocol::Format;

use crate::pubsub::client::{ClientSet, ClientShared, Delivery};
use crate::pubsub::spread::Spread;
use crate::transport::Encoding;

const SHARDS: usize = 64;

thread_local! {
    /// The subscribers a fan-out on this thread claimed, written once its section is left. Taken out
    /// for the fan-out and put back after, so its capacity is kept (no allocation per publication).
    static CLAIMED: RefCell<Vec<Arc<ClientShared>>> = const { RefCell::new(Vec::new()) };
}

type Channels = HashMap<Arc<str>, Arc<Channel>>;

#[derive(Debug)]
pub struct Hub {
    shards: Box<[RwLock<Channels>]>,
    /// Where fan-outs hand half of a long list of direct writes to the other worker.
    spread: Arc<Spread>,
    hasher: std::collections::hash_map::RandomState,
}

/// One channel with local subscribers: its sequencer section and its subscriber set.
#[derive(Debug)]
struct Channel {
    state: Mutex<ChannelState>,
    /// `state.subs.len()`, kept beside the mutex (written under it) so that the admin dashboard's
    /// top-channels scan ([`Hub::top_channels`]) reads it without taking the channel's mutex, which
    /// every publication on the channel takes.
    subscribers: AtomicU32,
}

#[derive(Debug, Default)]
struct ChannelState {
    subs: ClientSet,
    /// The subscribers that receive join/leave pushes (they asked, or the namespace forces it): a subset
    /// of `subs`, empty (no allocation) on most channels.
    join_leave: ClientSet,
    /// Removed from the registry (its last subscriber left): whoever still holds it looks again.
    dead: bool,
}

impl Channel {
    fn lock(&self) -> MutexGuard<'_, ChannelState> {
        relock(self.state.lock())
    }
}

/// A poisoned lock only means a panic elsewhere mid-update; the registry is still consistent (every
/// update is a single insert or remove).
fn relock<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    match r {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A publication's frames, made on first use: the payload once per format, the frame once per encoding.
///
/// Two builders: `payload` makes the Centrifugo push payload of a format (framed per encoding by
/// [`Encoding::frame`]); `message` makes the whole frame of a raw encoding ([`Encoding::is_raw`]: the
/// TCP MESSAGE, built from the channel, offset and data rather than from a push). Each is called at
/// most once per fan-out; `message` returning `None` (join/leave have no TCP form) skips those
/// subscribers.
pub struct Frames<'a> {
    payload: &'a dyn Fn(Format) -> Option<Bytes>,
    message: &'a dyn Fn() -> Option<Bytes>,
    payloads: [Option<Option<Bytes>>; 2],
    frames: [Option<Option<Bytes>>; Encoding::COUNT],
}

impl<'a> Frames<'a> {
    pub fn new(payload: &'a dyn Fn(Format) -> Option<Bytes>, message: &'a dyn Fn() -> Option<Bytes>) -> Self {
        Frames { payload, message, payloads: Default::default(), frames: Default::default() }
    }

    pub fn get(&mut self, encoding: Encoding) -> Option<&Bytes> {
        let Frames { payload, message, payloads, frames } = self;
        frames[encoding.index()]
            .get_or_insert_with(|| {
                if encoding.is_raw() {
                    return message();
                }
                let slot = match encoding.format {
                    Format::Json => &mut payloads[0],
                    Format::Protobuf => &mut payloads[1],
                };
                slot.get_or_insert_with(|| payload(encoding.format)).as_ref().and_then(|p| encoding.frame(p))
            })
            .as_ref()
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
    /// channel's section is left.
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

/// The subscribers a fan-out claimed (idle connections it writes to itself instead of waking them):
/// written when this is dropped ([`Self::write`] says so where it matters), which the caller does once
/// it holds no lock — not the channel's section, nor one of its own. A long list is split with the
/// other worker ([`crate::pubsub::spread`]).
#[must_use = "dropping it writes at once; keep it until the caller's locks are released"]
pub struct DirectWrites<'a> {
    claimed: Vec<Arc<ClientShared>>,
    spread: &'a Spread,
}

impl<'a> DirectWrites<'a> {
    fn new(spread: &'a Spread) -> Self {
        DirectWrites { claimed: CLAIMED.try_with(|c| c.take()).unwrap_or_default(), spread }
    }

    /// Writes to the claimed subscribers now (the same as dropping it).
    pub fn write(self) {}
}

impl Drop for DirectWrites<'_> {
    fn drop(&mut self) {
        self.spread.write(&mut self.claimed);
        // The list goes back with its capacity: the next fan-out on this thread allocates nothing.
        if self.claimed.capacity() > 0 {
            let list = std::mem::take(&mut self.claimed);
            let _ = CLAIMED.try_with(|c| c.replace(list));
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            spread: Arc::new(Spread::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

/// Who a sequenced fan-out goes to.
#[derive(Debug, Clone, Copy)]
enum Audience {
    Subscribers,
    JoinLeave,
}

/// Where a channel's section was entered from.
enum Section<'a> {
    /// The channel has local subscribers: its own mutex.
    Channel(Arc<Channel>),
    /// It has none: the shard's read lock, which keeps it from being created meanwhile.
    Empty(RwLockReadGuard<'a, Channels>),
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Splits fan-outs that claimed at least `min` subscribers between this runtime's workers, from
    /// now on ([`crate::pubsub::spread`]); spawns its helper tasks on the current tokio runtime.
    pub fn spread_direct_writes(&self, min: usize) {
        self.spread.start(min);
    }

    fn shard_of(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn read(&self, i: usize) -> RwLockReadGuard<'_, Channels> {
        relock(self.shards[i].read())
    }

    fn write(&self, i: usize) -> RwLockWriteGuard<'_, Channels> {
        relock(self.shards[i].write())
    }

    /// Finds `channel` for a sequenced operation: its `Channel` if it has local subscribers, else the
    /// shard's read lock.
    fn section(&self, channel: &str) -> Section<'_> {
        let shard = self.read(self.shard_of(channel));
        match shard.get(channel) {
            Some(ch) => Section::Channel(ch.clone()),
            None => Section::Empty(shard),
        }
    }

    /// Runs `during` (assign the position: append to history) and queues the frames `payload` (a push
    /// per format) and `message` (a raw encoding's frame: TCP) make of its result on every subscriber, in
    /// one section of the channel's sequencer (see the module docs).
    pub fn publish_with<T>(
        &self,
        channel: &str,
        during: impl FnOnce() -> T,
        payload: impl Fn(&T, Format) -> Option<Bytes>,
        message: impl Fn(&T) -> Option<Bytes>,
    ) -> (T, FanOut) {
        let (value, fan, writes) = self.publish_holding(channel, during, payload, message);
        writes.write();
        (value, fan)
    }

    /// [`Self::publish_with`] for a caller that holds a lock of its own around it: the direct writes to
    /// idle subscribers are handed back, to be written once that lock is released.
    pub fn publish_holding<T>(
        &self,
        channel: &str,
        during: impl FnOnce() -> T,
        payload: impl Fn(&T, Format) -> Option<Bytes>,
        message: impl Fn(&T) -> Option<Bytes>,
    ) -> (T, FanOut, DirectWrites<'_>) {
        self.sequenced_to(Audience::Subscribers, channel, None, during, payload, message)
    }

    /// Fans a frame out to every subscriber of `channel` except `skip` (join/leave pushes), in the
    /// channel's order with its publications.
    pub fn broadcast(
        &self,
        channel: &str,
        skip: Option<&Arc<ClientShared>>,
        payload: &dyn Fn(Format) -> Option<Bytes>,
    ) -> FanOut {
        let ((), fan, writes) =
            self.sequenced_to(Audience::Subscribers, channel, skip, || (), |(), f| payload(f), |()| None);
        writes.write();
        fan
    }

    /// Fans a join/leave push out to the channel's join/leave listeners except `skip`, in the channel's
    /// order with its publications.
    pub fn broadcast_join_leave(
        &self,
        channel: &str,
        skip: Option<&Arc<ClientShared>>,
        payload: &dyn Fn(Format) -> Option<Bytes>,
    ) -> FanOut {
        let ((), fan, writes) =
            self.sequenced_to(Audience::JoinLeave, channel, skip, || (), |(), f| payload(f), |()| None);
        writes.write();
        fan
    }

    /// `client`, subscribed to `channel`, receives its join/leave pushes from now on (until it
    /// unsubscribes). Returns whether it is subscribed.
    pub fn listen_join_leave(&self, channel: &str, client: &Arc<ClientShared>) -> bool {
        let ch = self.read(self.shard_of(channel)).get(channel).cloned();
        let Some(ch) = ch else { return false };
        let mut state = ch.lock();
        if state.dead || !state.subs.contains(client) {
            return false;
        }
        state.join_leave.insert(client);
        true
    }

    fn sequenced_to<T>(
        &self,
        audience: Audience,
        channel: &str,
        skip: Option<&Arc<ClientShared>>,
        during: impl FnOnce() -> T,
        payload: impl Fn(&T, Format) -> Option<Bytes>,
        message: impl Fn(&T) -> Option<Bytes>,
    ) -> (T, FanOut, DirectWrites<'_>) {
        loop {
            let ch = match self.section(channel) {
                Section::Empty(_shard) => {
                    return (during(), FanOut::default(), DirectWrites { claimed: Vec::new(), spread: &self.spread })
                }
                Section::Channel(ch) => ch,
            };
            let state = ch.lock();
            if state.dead {
                // Its last subscriber left between the lookup and the lock: look again.
                continue;
            }
            let value = during();
            let encode = |f: Format| payload(&value, f);
            let raw = || message(&value);
            let to = match audience {
                Audience::Subscribers => &state.subs,
                Audience::JoinLeave => &state.join_leave,
            };
            let mut writes = DirectWrites::new(&self.spread);
            let fan = deliver_all(to, skip, &encode, &raw, &mut writes.claimed);
            drop(state);
            fan.record();
            return (value, fan, writes);
        }
    }

    /// Registers `client` on `channel` while `before` runs in the channel's section (read history,
    /// queue the subscribe reply). `before` returning `Err` aborts the subscription. `first` runs (in the
    /// section) when the channel gets its first subscriber on this node. Also returns the channel's name
    /// as the registry holds it, for the subscriber to keep.
    pub fn subscribe_with<T, E>(
        &self,
        channel: &str,
        client: &Arc<ClientShared>,
        first: impl FnOnce(),
        before: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Arc<str>), E> {
        let i = self.shard_of(channel);
        loop {
            // The channel exists: only its own mutex.
            {
                let shard = self.read(i);
                if let Some((name, ch)) = shard.get_key_value(channel) {
                    let (name, ch) = (name.clone(), ch.clone());
                    drop(shard);
                    let mut state = ch.lock();
                    if state.dead {
                        continue;
                    }
                    let out = before()?;
                    if state.subs.insert(client) {
                        ch.subscribers.store(state.subs.len() as u32, Ordering::Relaxed);
                    }
                    return Ok((out, name));
                }
            }
            // It does not: create it under the shard's write lock, which also keeps publications of the
            // subscriber-less channel out while `before` reads its history.
            let mut shard = self.write(i);
            if shard.contains_key(channel) {
                continue;
            }
            let out = before()?;
            first();
            let name: Arc<str> = Arc::from(channel);
            let mut state = ChannelState::default();
            state.subs.insert(client);
            let channel = Channel { state: Mutex::new(state), subscribers: AtomicU32::new(1) };
            shard.insert(name.clone(), Arc::new(channel));
            return Ok((out, name));
        }
    }

    /// Removes `client` from `channel`; `last` runs (in the section, under the shard's write lock) when
    /// that was the channel's last subscriber on this node. Returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, client: &Arc<ClientShared>, last: impl FnOnce()) -> bool {
        let i = self.shard_of(channel);
        let ch = {
            let shard = self.read(i);
            let Some(ch) = shard.get(channel) else { return false };
            ch.clone()
        };
        {
            let mut state = ch.lock();
            if !state.subs.remove(client) {
                return false;
            }
            ch.subscribers.store(state.subs.len() as u32, Ordering::Relaxed);
            state.join_leave.remove(client);
            if !state.subs.is_empty() {
                return true;
            }
        }
        // It was the last one: remove the channel, unless somebody subscribed meanwhile.
        let mut shard = self.write(i);
        if let Some(current) = shard.get(channel).cloned() {
            let mut state = current.lock();
            if state.subs.is_empty() && !state.dead {
                state.dead = true;
                shard.remove(channel);
                last();
            }
        }
        true
    }

    /// The local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> Vec<Arc<ClientShared>> {
        let ch = self.read(self.shard_of(channel)).get(channel).cloned();
        ch.map_or_else(Vec::new, |ch| ch.lock().subs.iter().cloned().collect())
    }

    pub fn num_subscribers(&self, channel: &str) -> usize {
        let ch = self.read(self.shard_of(channel)).get(channel).cloned();
        ch.map_or(0, |ch| ch.lock().subs.len())
    }

    /// The `n` channels with the most local subscribers (most first), the number of channels looked
    /// at, and whether the scan stopped at `max_scan` before seeing every channel. Takes each shard's
    /// read lock in turn (never a channel's mutex: counts are read from an atomic), so its cost is
    /// bounded by `max_scan` and it delays no publication; for the admin dashboard, once a second.
    pub fn top_channels(&self, n: usize, max_scan: usize) -> (Vec<(Arc<str>, u32)>, usize, bool) {
        let mut top: Vec<(Arc<str>, u32)> = Vec::with_capacity(n + 1);
        let mut scanned = 0usize;
        for i in 0..SHARDS {
            let shard = self.read(i);
            for (name, ch) in shard.iter() {
                if scanned == max_scan {
                    return (top, scanned, true);
                }
                scanned += 1;
                let count = ch.subscribers.load(Ordering::Relaxed);
                if n == 0 || (top.len() == n && top.last().is_some_and(|&(_, c)| c >= count)) {
                    continue;
                }
                let at = top.partition_point(|&(_, c)| c >= count);
                top.insert(at, (name.clone(), count));
                top.truncate(n);
            }
        }
        (top, scanned, false)
    }

    /// Every channel with at least one local subscriber, with its subscriber count.
    pub fn channels(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let shard = self.read(i);
            out.extend(shard.iter().map(|(k, ch)| (k.to_string(), ch.lock().subs.len())));
        }
        out
    }
}

/// Queues the frame for each subscriber's encoding on every subscriber but `skip` (framing each
/// encoding at most once). Idle subscribers are claimed rather than woken and added to `claimed`, for
/// the caller to write to once it has left the section ([`ClientShared::flush_claimed`]).
fn deliver_all(
    to: &ClientSet,
    skip: Option<&Arc<ClientShared>>,
    payload: &dyn Fn(Format) -> Option<Bytes>,
    message: &dyn Fn() -> Option<Bytes>,
    claimed: &mut Vec<Arc<ClientShared>>,
) -> FanOut {
    let mut frames = Frames::new(payload, message);
    let mut fan = FanOut::default();
    let now = crate::metrics::clock_us();
    for client in to.iter() {
        if skip.is_some_and(|s| Arc::ptr_eq(s, client)) {
            continue;
        }
        let Some(frame) = frames.get(client.encoding) else { continue };
        let (delivery, claim) = client.deliver_or_claim(frame, now);
        if claim {
            claimed.push(client.clone());
        }
        match delivery {
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
    use crate::pubsub::client::ClientId;
    use crate::transport::outbound::Outbound;

    fn payload_for(format: Format) -> Option<Bytes> {
        Some(Bytes::from(match format {
            Format::Json => "json",
            Format::Protobuf => "pb",
        }))
    }

    fn client(id: u128, format: Format, max_queue: usize) -> Arc<ClientShared> {
        ClientShared::new(ClientId(id), Encoding::websocket(format), max_queue)
    }

    fn subscribe(hub: &Hub, channel: &str, c: &Arc<ClientShared>) {
        hub.subscribe_with(channel, c, || {}, || Ok::<_, ()>(())).expect("subscribed");
    }

    fn taken(c: &ClientShared) -> Outbound {
        let mut out = Outbound::new();
        c.take(&mut out, std::task::Waker::noop());
        out
    }

    #[test]
    fn top_channels_ranks_by_subscribers_and_stops_at_the_scan_bound() {
        let hub = Hub::new();
        let clients: Vec<_> = (0..6).map(|i| client(i, Format::Json, 1 << 20)).collect();
        // "c3" gets 3 subscribers, "c2" 2, "c1" 1; then one leaves "c3".
        for (name, n) in [("c1", 1), ("c2", 2), ("c3", 4)] {
            for c in &clients[..n] {
                subscribe(&hub, name, c);
            }
        }
        hub.unsubscribe("c3", &clients[0], || {});
        let (top, scanned, truncated) = hub.top_channels(2, 1000);
        let top: Vec<_> = top.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(top, [("c3".to_string(), 3), ("c2".to_string(), 2)]);
        assert_eq!((scanned, truncated), (3, false));
        let (top, scanned, truncated) = hub.top_channels(5, 2);
        assert_eq!((top.len(), scanned, truncated), (2, 2, true), "looks at no more than max_scan channels");
        for c in &clients[..2] {
            hub.unsubscribe("c2", c, || {});
        }
        let (top, _, _) = hub.top_channels(5, 1000);
        assert!(top.iter().all(|(n, _)| &**n != "c2"), "a channel whose last subscriber left is gone");
    }

    #[test]
    fn publication_is_encoded_once_per_format_and_shared() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let b = client(2, Format::Json, 1 << 20);
        let c = client(3, Format::Protobuf, 1 << 20);
        for cl in [&a, &b, &c] {
            subscribe(&hub, "news", cl);
        }
        let calls = std::cell::Cell::new(0);
        let ((), fan) = hub.publish_with(
            "news",
            || (),
            |_, f| {
                calls.set(calls.get() + 1);
                payload_for(f)
            },
            |_| None,
        );
        assert_eq!(fan, FanOut { delivered: 3, slow: 0, dropped: 0 });
        assert_eq!(calls.get(), 2, "one encoding per format, not per subscriber");
        // "json" framed: a 2-byte header and the 4-byte payload.
        assert_eq!(taken(&a).queued_bytes(), 6);
        assert_eq!(taken(&b).queued_bytes(), 6);
        assert_eq!(taken(&c).queued_bytes(), 4);
    }

    #[test]
    fn a_publication_is_compressed_once_for_every_deflate_subscriber() {
        use crate::transport::{DeflateFraming, Framing};
        let hub = Hub::new();
        let deflate = Framing::WebSocketDeflate(DeflateFraming { level: 6, window_bits: 15, min_size: 16 });
        let compressed =
            |id| ClientShared::new(ClientId(id), Encoding { format: Format::Json, framing: deflate }, 1 << 20);
        let (a, b, plain) = (compressed(1), compressed(2), client(3, Format::Json, 1 << 20));
        for cl in [&a, &b, &plain] {
            subscribe(&hub, "news", cl);
        }
        let body = Bytes::from("{\"text\":\"".to_string() + &"abc".repeat(200) + "\"}");
        let ((), fan) = hub.publish_with("news", || (), |_, _| Some(body.clone()), |_| None);
        assert_eq!(fan.delivered, 3);
        let (fa, fb, fp) = (taken(&a).pop_front(), taken(&b).pop_front(), taken(&plain).pop_front());
        let (fa, fb, fp) = (fa.expect("a got it"), fb.expect("b got it"), fp.expect("plain got it"));
        // One compressed frame, the same allocation for both deflate subscribers.
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "compressed once and shared");
        assert_eq!(fa[0], 0xC1, "FIN + RSV1, text");
        assert!(fa.len() < body.len() / 4, "{} of {}", fa.len(), body.len());
        assert_eq!(fp[0], 0x81, "the plain subscriber gets its own uncompressed frame");
    }

    #[test]
    fn tcp_subscribers_share_one_message_frame_built_from_the_publication() {
        let hub = Hub::new();
        let ws = client(1, Format::Json, 1 << 20);
        let tcp: Vec<_> = (2..5).map(|i| ClientShared::new(ClientId(i), Encoding::tcp(), 1 << 20)).collect();
        subscribe(&hub, "news", &ws);
        for c in &tcp {
            subscribe(&hub, "news", c);
        }
        let messages = std::cell::Cell::new(0);
        let ((), fan) = hub.publish_with(
            "news",
            || (),
            |_, f| payload_for(f),
            |_| {
                messages.set(messages.get() + 1);
                ringcast_wire::tcp::encode_message("news", 1, b"{\"x\":1}").ok()
            },
        );
        assert_eq!(fan.delivered, 4);
        assert_eq!(messages.get(), 1, "one MESSAGE frame for every TCP subscriber");
        let frames: Vec<Bytes> = tcp.iter().map(|c| taken(c).pop_front().expect("a frame")).collect();
        // The known-answer MESSAGE of docs/tcp-protocol.md, the very same buffer on every subscriber.
        assert_eq!(frames[0][..9], [0x42, 0x4d, 1, 0x80, 0x10, 0, 0, 0, 0x15]);
        assert!(frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()), "shared, not copied");
        assert_eq!(taken(&ws).queued_bytes(), 6, "the WebSocket subscriber gets the push");
        // Join/leave pushes have no TCP form: TCP subscribers are skipped.
        assert_eq!(hub.broadcast("news", None, &payload_for).delivered, 1);
    }

    #[test]
    fn unsubscribe_removes_and_forgets_empty_channels() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let firsts = std::cell::Cell::new(0);
        let lasts = std::cell::Cell::new(0);
        hub.subscribe_with("x", &a, || firsts.set(firsts.get() + 1), || Ok::<_, ()>(())).unwrap();
        hub.subscribe_with("x", &a, || firsts.set(firsts.get() + 1), || Ok::<_, ()>(())).unwrap();
        assert_eq!(hub.num_subscribers("x"), 1, "subscribing twice registers once");
        assert_eq!(firsts.get(), 1, "the node subscribes to the broker once per channel");
        assert!(hub.unsubscribe("x", &a, || lasts.set(lasts.get() + 1)));
        assert!(!hub.unsubscribe("x", &a, || lasts.set(lasts.get() + 1)));
        assert_eq!(lasts.get(), 1);
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn a_slow_client_is_counted_with_what_was_dropped() {
        let hub = Hub::new();
        let slow = client(1, Format::Json, 1024);
        let fast = client(2, Format::Json, 1 << 20);
        for c in [&slow, &fast] {
            subscribe(&hub, "ch", c);
        }
        // 400-byte payloads: 404-byte frames.
        let frame = |_: Format| Some(Bytes::from(vec![0u8; 400]));
        let first = hub.broadcast("ch", None, &frame);
        let second = hub.broadcast("ch", None, &frame);
        assert_eq!(first, FanOut { delivered: 2, slow: 0, dropped: 0 });
        assert_eq!(second, first);
        // The third frame does not fit in 1024 bytes: two queued + this one are dropped.
        assert_eq!(hub.broadcast("ch", None, &frame), FanOut { delivered: 1, slow: 1, dropped: 3 });
        assert_eq!(hub.broadcast("ch", None, &frame), FanOut { delivered: 1, slow: 0, dropped: 1 });
    }

    #[test]
    fn failed_subscribe_registers_nothing() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let b = client(2, Format::Json, 1 << 20);
        assert_eq!(hub.subscribe_with("x", &a, || {}, || Err::<(), _>("denied")).map(|_| ()), Err("denied"));
        assert_eq!(hub.num_subscribers("x"), 0);
        assert!(hub.channels().is_empty(), "a refused first subscriber creates no channel");
        subscribe(&hub, "x", &b);
        assert_eq!(hub.subscribe_with("x", &a, || {}, || Err::<(), _>("denied")).map(|_| ()), Err("denied"));
        assert_eq!(hub.num_subscribers("x"), 1);
    }

    #[test]
    fn broadcast_skips_the_sender() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let b = client(2, Format::Json, 1 << 20);
        subscribe(&hub, "x", &a);
        subscribe(&hub, "x", &b);
        assert_eq!(hub.broadcast("x", Some(&a), &payload_for).delivered, 1);
    }

    #[test]
    fn subscribers_share_one_copy_of_the_channel_name() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let b = client(2, Format::Json, 1 << 20);
        let ((), first) = hub.subscribe_with("room:42", &a, || {}, || Ok::<_, ()>(())).unwrap();
        let ((), second) = hub.subscribe_with("room:42", &b, || {}, || Ok::<_, ()>(())).unwrap();
        assert_eq!(&*first, "room:42");
        assert!(Arc::ptr_eq(&first, &second), "one allocation for the name, however many subscribers");
    }

    #[test]
    fn a_channel_emptied_and_refilled_is_a_new_channel() {
        let hub = Hub::new();
        let a = client(1, Format::Json, 1 << 20);
        let firsts = std::cell::Cell::new(0);
        for _ in 0..3 {
            hub.subscribe_with("x", &a, || firsts.set(firsts.get() + 1), || Ok::<_, ()>(())).unwrap();
            assert!(hub.unsubscribe("x", &a, || {}));
        }
        assert_eq!(firsts.get(), 3);
        assert!(hub.channels().is_empty());
    }

    /// Many publishers on several threads, each assigning positions from one shared counter as the
    /// broker does: every subscriber must receive strictly increasing positions, and all of them the same
    /// sequence. Before the sequencer (positions assigned under a shared read lock, queued afterwards),
    /// this saw inversions within a few thousand publications.
    #[test]
    fn concurrent_publishers_deliver_in_position_order_to_every_subscriber() {
        use std::sync::atomic::{AtomicU64, Ordering};
        const THREADS: usize = 4;
        const EACH: usize = 2_000;
        let hub = Arc::new(Hub::new());
        let subs: Vec<_> = (0..5).map(|i| client(i, Format::Json, 1 << 30)).collect();
        for s in &subs {
            subscribe(&hub, "race", s);
        }
        let counter = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (hub, counter) = (hub.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        hub.publish_with(
                            "race",
                            || {
                                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                                // Widen the window between assigning and queuing.
                                std::hint::spin_loop();
                                n
                            },
                            |n, _| Some(Bytes::copy_from_slice(&n.to_be_bytes())),
                            |_| None,
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("publisher");
        }
        let expected: Vec<u64> = (1..=(THREADS * EACH) as u64).collect();
        for s in &subs {
            let mut out = taken(s);
            let mut got = Vec::new();
            while let Some(frame) = out.pop_front() {
                // A 2-byte WebSocket header, then the 8-byte position.
                let n: [u8; 8] = frame[2..10].try_into().expect("8 bytes");
                got.push(u64::from_be_bytes(n));
            }
            let first_wrong = got.iter().zip(&expected).position(|(g, e)| g != e);
            assert_eq!(first_wrong, None, "subscriber {:?}: out of order from index {first_wrong:?}", s.id);
            assert_eq!(got.len(), expected.len(), "subscriber {:?}", s.id);
        }
    }
}
