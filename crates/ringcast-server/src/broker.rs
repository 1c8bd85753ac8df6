//! Where publications are ordered and remembered: history streams and presence.
//!
//! [`Broker`] is the seam between one node and the outside world. The embedded [`MemoryBroker`] keeps
//! everything in this process; the Redis and NATS brokers of a later issue implement the same trait, so
//! the node, the hub and the client protocol do not change when channels span machines.
//!
//! # Streams
//! A channel with history is a stream: every publication gets the next offset (1, 2, 3…), the last
//! `history_size` publications younger than `history_ttl` are kept, and the stream has an *epoch*. A
//! client that recovers names the epoch it saw: if the epoch differs, the history it is asking about no
//! longer exists (the broker restarted, the stream expired) and nothing can be replayed as if complete.
//!
//! # Forgetting (what the memory broker holds, and for how long)
//! Centrifugo's semantics, as its memory engine implements them:
//! * **Publications** expire `history_ttl` after they were published ([`HistoryOptions::ttl`]); the
//!   stream's offset and epoch survive them.
//! * **The stream's meta** (offset and epoch) is removed `history_meta_ttl` after the stream was last
//!   used — published to, positioned (a subscribe), or read ([`HistoryOptions::meta_ttl`]; zero means
//!   Centrifugo's default, [`DEFAULT_META_TTL`], 30 days). It never goes before its publications do.
//! * **A stream that was never published to** (offset 0) exists only so that its subscribers learn an
//!   epoch. It is dropped when this node's last subscriber of the channel leaves
//!   ([`Broker::unsubscribe_node`]), so a crowd of subscribe-only channels leaves nothing behind.
//! * **Presence** entries go with their subscriber; a channel's presence map goes with its last entry.
//!
//! Expiry is bounded work: each shard keeps one entry per stream in an ordered queue (its next deadline),
//! and [`MemoryBroker::sweep`] (run every second by a background thread) pops only the entries that are
//! due. A publish reschedules a stream only when its deadline moves earlier (its first live publication);
//! otherwise the sweep finds the later deadline when it pops the entry and queues it again. Reads and
//! publishes also drop expired publications of the stream they touch. Maps shrink when they fall to a
//! quarter of their capacity, so a burst of channels does not keep its table.
//!
//! # Epochs of streams that come and go
//! Dropping a never-published stream must not make its subscribers' positions unrecoverable when nothing
//! happened. So a new stream's epoch is not random: it is a keyed hash (key random per process) of the
//! channel name and a *generation*. Re-creating a never-published stream gives the same epoch, and a
//! client that recovers `(offset 0, that epoch)` gets `recovered: true` with nothing to replay — correct,
//! since no publication ever existed. The generation (one counter per bucket of channel names, 8,192
//! buckets in all: fixed memory) is bumped whenever a stream that *had* publications is removed (meta
//! expiry); its next incarnation then gets a different epoch, and a client that saw the old one gets
//! `recovered: false`. A bump can also change the epoch of other channels of the bucket on their next
//! re-creation: a client that then recovers from offset 0 is told `recovered: false` although nothing
//! was missed — a false alarm, never a gap presented as complete. A channel without a stream reads as an
//! empty stream at offset 0 with that epoch (history and recovery do not create one).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringcast_protocol::messages::{ClientInfo, Publication};

use crate::pubsub::client::ClientId;

/// A position in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamPos {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// History settings of a channel (from its namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryOptions {
    /// Publications kept; 0 = no history.
    pub size: usize,
    /// How long a publication is kept after it was published.
    pub ttl: Duration,
    /// How long the stream's offset and epoch are kept after the stream was last used (Centrifugo's
    /// `history_meta_ttl`). Zero means [`DEFAULT_META_TTL`]; a value below `ttl` counts as `ttl` (the
    /// meta never goes before the publications it numbers).
    pub meta_ttl: Duration,
}

/// Centrifugo's default `history_meta_ttl`: 30 days.
pub const DEFAULT_META_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl HistoryOptions {
    /// The meta TTL in force: zero means [`DEFAULT_META_TTL`], and never below `ttl`.
    pub fn effective_meta_ttl(&self) -> Duration {
        let meta = if self.meta_ttl.is_zero() { DEFAULT_META_TTL } else { self.meta_ttl };
        meta.max(self.ttl)
    }
}

/// What a history read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryFilter {
    /// Only publications after this position (its epoch must match the stream's).
    pub since: Option<(u64, String)>,
    /// At most this many publications; negative = all; 0 = only the stream position.
    pub limit: i32,
    /// Newest first.
    pub reverse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// `since` names another epoch, or publications after it are gone (protocol error 112).
    #[error("unrecoverable position")]
    UnrecoverablePosition,
}

pub trait Broker: Send + Sync + 'static {
    /// This node now has a subscriber on `channel` (the first one): a networked broker starts receiving
    /// the channel's publications from other nodes here. The memory broker has no other nodes.
    fn subscribe_node(&self, _channel: &str) {}
    /// This node's last subscriber of `channel` left. The memory broker drops the channel's stream here
    /// if it was never published to (it held only an epoch for its subscribers).
    fn unsubscribe_node(&self, _channel: &str) {}
    /// Appends `publication` to `channel`'s stream when `history.size > 0`, setting its offset.
    /// Returns the stream position after it (offset 0 and an empty epoch without history).
    fn publish(&self, channel: &str, publication: &mut Publication, history: HistoryOptions) -> StreamPos;
    /// Reads history. A channel without a stream reads as an empty stream at offset 0.
    fn history(&self, channel: &str, filter: &HistoryFilter) -> Result<(Vec<Publication>, StreamPos), BrokerError>;
    /// The stream's current position (creating the stream if it does not exist, so that a subscriber
    /// learns an epoch to recover against).
    fn position(&self, channel: &str, history: HistoryOptions) -> StreamPos;
    fn remove_history(&self, channel: &str);
    fn add_presence(&self, channel: &str, client: ClientId, info: ClientInfo);
    fn remove_presence(&self, channel: &str, client: ClientId);
    fn presence(&self, channel: &str) -> BTreeMap<String, ClientInfo>;
    /// (clients, distinct users).
    fn presence_stats(&self, channel: &str) -> (u32, u32);
}

const SHARDS: usize = 32;
/// Epoch generations per shard (8,192 buckets of channel names in all).
const GENERATIONS: usize = 256;
/// How often the background thread sweeps expired streams (Centrifugo's TTLs have second precision).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Queue entries popped per shard lock acquisition, so a sweep never holds a shard for long.
const SWEEP_BATCH: usize = 1024;

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// Publications with the instant each expires.
    items: VecDeque<(Publication, Instant)>,
    /// When offset and epoch are forgotten, unless the stream is used again before.
    meta_expires: Instant,
    /// The meta TTL the stream was last published or positioned with (reads extend by it).
    meta_ttl: Duration,
    /// The deadline of this stream's one entry in the shard's expiry queue.
    queued: Instant,
}

impl Stream {
    fn pos(&self) -> StreamPos {
        StreamPos { offset: self.top, epoch: self.epoch.clone() }
    }

    fn expire(&mut self, now: Instant) {
        while self.items.front().is_some_and(|(_, at)| *at <= now) {
            self.items.pop_front();
        }
    }

    /// When the sweep must next look at this stream: its oldest publication expires, or its meta does.
    fn deadline(&self) -> Instant {
        self.items.front().map_or(self.meta_expires, |(_, at)| (*at).min(self.meta_expires))
    }

    fn touch(&mut self, now: Instant, meta_ttl: Duration) {
        self.meta_ttl = meta_ttl;
        self.meta_expires = self.meta_expires.max(now + meta_ttl);
    }
}

fn shrink<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[derive(Debug)]
struct Shard {
    streams: HashMap<Arc<str>, Stream>,
    /// One entry per stream: (its deadline, its name). Ordered, so a sweep pops only what is due.
    expiry: BTreeSet<(Instant, Arc<str>)>,
    /// Bumped when a stream that had publications is removed, so its next incarnation gets a new epoch.
    generations: Box<[u32]>,
    presence: HashMap<Box<str>, BTreeMap<ClientId, Present>>,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            streams: HashMap::new(),
            expiry: BTreeSet::new(),
            generations: vec![0; GENERATIONS].into_boxed_slice(),
            presence: HashMap::new(),
        }
    }
}

impl Shard {
    /// Moves `channel`'s queue entry earlier if its deadline now comes before the queued one. (A later
    /// deadline is left alone: the sweep finds it when the entry comes up, and queues it again.)
    fn reschedule(&mut self, channel: &str) {
        let Some((name, stream)) = self.streams.get_key_value(channel) else { return };
        let next = stream.deadline();
        if next >= stream.queued {
            return;
        }
        let name = name.clone();
        self.expiry.remove(&(stream.queued, name.clone()));
        self.expiry.insert((next, name.clone()));
        if let Some(s) = self.streams.get_mut(&name) {
            s.queued = next;
        }
    }

    fn remove_stream(&mut self, channel: &str) -> Option<Stream> {
        let (name, stream) = self.streams.remove_entry(channel)?;
        self.expiry.remove(&(stream.queued, name));
        shrink(&mut self.streams);
        Some(stream)
    }

    /// Handles up to `budget` due queue entries; returns how many it handled.
    fn sweep(&mut self, now: Instant, budget: usize, epochs: &Epochs) -> usize {
        let mut done = 0;
        while done < budget {
            match self.expiry.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            let Some((_, name)) = self.expiry.pop_first() else { break };
            done += 1;
            let Some(stream) = self.streams.get_mut(&name) else { continue };
            stream.expire(now);
            if stream.items.is_empty() {
                // An idle stream keeps no storage for publications it no longer has.
                stream.items = VecDeque::new();
            }
            if stream.meta_expires <= now {
                let had_publications = stream.top > 0;
                self.streams.remove(&name);
                shrink(&mut self.streams);
                if had_publications {
                    let g = &mut self.generations[epochs.bucket(&name)];
                    *g = g.wrapping_add(1);
                }
                continue;
            }
            let next = stream.deadline();
            stream.queued = next;
            self.expiry.insert((next, name));
        }
        done
    }
}

/// Derives epochs (see the module docs) and places channels in generation buckets.
#[derive(Debug)]
struct Epochs {
    key: std::collections::hash_map::RandomState,
}

impl Epochs {
    fn bucket(&self, channel: &str) -> usize {
        (self.key.hash_one(("bucket", channel)) as usize) % GENERATIONS
    }

    fn epoch(&self, channel: &str, generation: u32) -> Arc<str> {
        format!("{:016x}", self.key.hash_one((channel, generation))).into()
    }
}

/// A presence entry as kept here: 24 bytes instead of a `ClientInfo`'s 112 plus its heap-allocated
/// client id string. Every subscriber of a presence channel has one, so this is per-connection memory;
/// the id string is made again when presence is asked for, and connection/channel info (absent for most
/// clients) is boxed.
#[derive(Debug)]
struct Present {
    user: Box<str>,
    info: Option<Box<(Bytes, Bytes)>>,
}

impl Present {
    fn new(info: ClientInfo) -> Present {
        let extra = (!info.conn_info.is_empty() || !info.chan_info.is_empty())
            .then(|| Box::new((info.conn_info, info.chan_info)));
        Present { user: info.user.into_boxed_str(), info: extra }
    }

    fn client_info(&self, client: ClientId) -> ClientInfo {
        let (conn_info, chan_info) = self.info.as_deref().cloned().unwrap_or_default();
        ClientInfo { user: self.user.to_string(), client: client.to_string(), conn_info, chan_info }
    }
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    epochs: Epochs,
}

/// The embedded broker: streams and presence in this process's memory.
#[derive(Debug)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker whose expired streams are swept every second by a background thread (which ends when
    /// the broker is dropped).
    pub fn new() -> Self {
        let broker = Self::unswept();
        let weak: Weak<Inner> = Arc::downgrade(&broker.inner);
        let spawned = std::thread::Builder::new().name("ringcast-broker-sweep".into()).spawn(move || loop {
            std::thread::sleep(SWEEP_EVERY);
            let Some(inner) = weak.upgrade() else { return };
            inner.sweep(Instant::now());
        });
        if let Err(e) = spawned {
            // Reads and publishes still drop the expired publications of the streams they touch.
            tracing::warn!(error = %e, "no broker sweep thread: idle streams are not expired");
        }
        broker
    }

    /// A broker without the sweep thread: expiry happens only on access and on [`MemoryBroker::sweep`].
    pub fn unswept() -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                hasher: std::collections::hash_map::RandomState::new(),
                epochs: Epochs { key: std::collections::hash_map::RandomState::new() },
            }),
        }
    }

    /// Expires what is due at `now`: publications past their TTL, streams past their meta TTL. Work is
    /// proportional to the number of due entries, never to the number of streams.
    pub fn sweep(&self, now: Instant) {
        self.inner.sweep(now);
    }

    /// Streams held (for tests and metrics).
    pub fn num_streams(&self) -> usize {
        (0..SHARDS).map(|i| self.inner.lock(i).streams.len()).sum()
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard> {
        self.inner.lock(self.inner.shard_of(channel))
    }

    /// Runs `f` on the stream of `channel` (created, with its derived epoch, if missing), marking it used.
    fn with_stream<R>(
        &self,
        shard: &mut Shard,
        channel: &str,
        now: Instant,
        history: HistoryOptions,
        f: impl FnOnce(&mut Stream) -> R,
    ) -> R {
        let meta_ttl = history.effective_meta_ttl();
        if let Some(stream) = shard.streams.get_mut(channel) {
            stream.touch(now, meta_ttl);
            return f(stream);
        }
        let generation = shard.generations[self.inner.epochs.bucket(channel)];
        let name: Arc<str> = channel.into();
        let meta_expires = now + meta_ttl;
        shard.expiry.insert((meta_expires, name.clone()));
        let stream = shard.streams.entry(name).or_insert(Stream {
            epoch: self.inner.epochs.epoch(channel, generation),
            top: 0,
            items: VecDeque::new(),
            meta_expires,
            meta_ttl,
            queued: meta_expires,
        });
        f(stream)
    }

    /// Where a channel without a stream stands: offset 0, the epoch its stream would be created with.
    fn virtual_pos(&self, shard: &Shard, channel: &str) -> StreamPos {
        let generation = shard.generations[self.inner.epochs.bucket(channel)];
        StreamPos { offset: 0, epoch: self.inner.epochs.epoch(channel, generation) }
    }
}

/// The memory broker's streams as handed to the next process in a zero-downtime upgrade
/// ([`MemoryBroker::snapshot`], [`MemoryBroker::restore`]): every stream's epoch, offset and kept
/// publications, with their remaining lifetimes (instants do not cross processes; durations do).
///
/// Layout (little-endian): magic `RCMB1`, the stream count (u32), then per stream: name and epoch
/// (u32 length + bytes each), top offset (u64), meta TTL and meta time left in ms (u64 each), the
/// publication count (u32), and per publication its time left in ms (u64) and its Protobuf encoding
/// (u32 length + bytes).
const SNAPSHOT_MAGIC: &[u8] = b"RCMB1";

/// A snapshot that cannot be read (truncated, or from an incompatible version).
#[derive(Debug, thiserror::Error)]
#[error("broker snapshot: {0}")]
pub struct SnapshotError(&'static str);

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn ms_left(at: Instant, now: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
}

struct SnapshotReader<'a>(&'a [u8]);

impl<'a> SnapshotReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, SnapshotError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| SnapshotError("a name is not UTF-8"))
    }
}

impl MemoryBroker {
    /// Every stream, for the process taking over (see [`SNAPSHOT_MAGIC`] for the layout). Presence is not
    /// included: clients enter it again when they resubscribe. The caller stops publications first
    /// (`Node::freeze`), so the snapshot is the streams' final state here.
    pub fn snapshot(&self) -> Vec<u8> {
        use prost::Message;
        let now = Instant::now();
        let mut out = SNAPSHOT_MAGIC.to_vec();
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut count = 0u32;
        for i in 0..SHARDS {
            let shard = self.inner.lock(i);
            for (name, stream) in &shard.streams {
                count += 1;
                put_bytes(&mut out, name.as_bytes());
                put_bytes(&mut out, stream.epoch.as_bytes());
                out.extend_from_slice(&stream.top.to_le_bytes());
                let meta_ttl = u64::try_from(stream.meta_ttl.as_millis()).unwrap_or(u64::MAX);
                out.extend_from_slice(&meta_ttl.to_le_bytes());
                out.extend_from_slice(&ms_left(stream.meta_expires, now).to_le_bytes());
                out.extend_from_slice(&(stream.items.len() as u32).to_le_bytes());
                for (publication, expires) in &stream.items {
                    out.extend_from_slice(&ms_left(*expires, now).to_le_bytes());
                    put_bytes(&mut out, &publication.encode_to_vec());
                }
            }
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        out
    }

    /// Takes over the streams of a [`MemoryBroker::snapshot`] (replacing streams of the same name);
    /// returns how many. Epochs and offsets are kept, so a client recovers here exactly as it would have
    /// there.
    pub fn restore(&self, snapshot: &[u8]) -> Result<usize, SnapshotError> {
        use prost::Message;
        let now = Instant::now();
        let mut r = SnapshotReader(snapshot);
        if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
            return Err(SnapshotError("not a memory broker snapshot of this version"));
        }
        let count = r.u32()?;
        for _ in 0..count {
            let name: Arc<str> = r.str()?.into();
            let epoch: Arc<str> = r.str()?.into();
            let top = r.u64()?;
            let meta_ttl = Duration::from_millis(r.u64()?);
            let meta_expires = now + Duration::from_millis(r.u64()?);
            let n = r.u32()? as usize;
            let mut items = VecDeque::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let expires = now + Duration::from_millis(r.u64()?);
                let publication = Publication::decode(r.bytes()?).map_err(|_| SnapshotError("a publication"))?;
                items.push_back((publication, expires));
            }
            let mut stream = Stream { epoch, top, items, meta_expires, meta_ttl, queued: meta_expires };
            stream.queued = stream.deadline();
            let mut shard = self.shard(&name);
            shard.remove_stream(&name);
            shard.expiry.insert((stream.queued, name.clone()));
            shard.streams.insert(name, stream);
        }
        Ok(count as usize)
    }
}

impl Inner {
    fn shard_of(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn sweep(&self, now: Instant) {
        for i in 0..SHARDS {
            while self.lock(i).sweep(now, SWEEP_BATCH, &self.epochs) == SWEEP_BATCH {}
        }
    }
}

impl Broker for MemoryBroker {
    fn unsubscribe_node(&self, channel: &str) {
        let mut shard = self.shard(channel);
        if shard.streams.get(channel).is_some_and(|s| s.top == 0) {
            shard.remove_stream(channel);
        }
    }

    fn publish(&self, channel: &str, publication: &mut Publication, history: HistoryOptions) -> StreamPos {
        if history.size == 0 {
            publication.offset = 0;
            return StreamPos::default();
        }
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let pos = self.with_stream(&mut shard, channel, now, history, |stream| {
            stream.top += 1;
            publication.offset = stream.top;
            stream.expire(now);
            // History keeps its own copy of the data: a publication's `data` may be a view into a larger
            // buffer (an API request's body), which history would otherwise pin for `history_ttl`.
            let mut kept = publication.clone();
            kept.data = Bytes::copy_from_slice(&publication.data);
            stream.items.push_back((kept, now + history.ttl));
            while stream.items.len() > history.size {
                stream.items.pop_front();
            }
            stream.pos()
        });
        shard.reschedule(channel);
        pos
    }

    fn history(&self, channel: &str, filter: &HistoryFilter) -> Result<(Vec<Publication>, StreamPos), BrokerError> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let virtual_pos = self.virtual_pos(&shard, channel);
        let Some(stream) = shard.streams.get_mut(channel) else {
            if let Some((offset, epoch)) = &filter.since {
                // As with a stream: an empty epoch is "any epoch".
                if *offset > 0 || (!epoch.is_empty() && **epoch != *virtual_pos.epoch) {
                    return Err(BrokerError::UnrecoverablePosition);
                }
            }
            return Ok((Vec::new(), virtual_pos));
        };
        stream.expire(now);
        let meta_ttl = stream.meta_ttl;
        stream.touch(now, meta_ttl);
        let after = match &filter.since {
            Some((offset, epoch)) => {
                // An empty epoch is "any epoch" (a client that never learned one), as in Centrifugo.
                if (!epoch.is_empty() && **epoch != *stream.epoch) || *offset > stream.top {
                    return Err(BrokerError::UnrecoverablePosition);
                }
                Some(*offset)
            }
            None => None,
        };
        if filter.limit == 0 {
            return Ok((Vec::new(), stream.pos()));
        }
        let limit = if filter.limit < 0 { usize::MAX } else { filter.limit as usize };
        let items = stream.items.iter().map(|(p, _)| p);
        let pubs: Vec<Publication> = match (filter.reverse, after) {
            // Newest first, starting just before `since` (Centrifugo: from since.offset - 1 downwards).
            (true, Some(since)) => items.rev().filter(|p| p.offset < since).take(limit).cloned().collect(),
            (true, None) => items.rev().take(limit).cloned().collect(),
            (false, since) => items.filter(|p| p.offset > since.unwrap_or(0)).take(limit).cloned().collect(),
        };
        Ok((pubs, stream.pos()))
    }

    fn position(&self, channel: &str, history: HistoryOptions) -> StreamPos {
        if history.size == 0 {
            return StreamPos::default();
        }
        let mut shard = self.shard(channel);
        self.with_stream(&mut shard, channel, Instant::now(), history, |s| s.pos())
    }

    fn remove_history(&self, channel: &str) {
        let mut shard = self.shard(channel);
        if let Some(s) = shard.streams.get_mut(channel) {
            // Keep offset and epoch (positions stay comparable); drop the publications and their storage.
            s.items = VecDeque::new();
        }
    }

    fn add_presence(&self, channel: &str, client: ClientId, info: ClientInfo) {
        self.shard(channel).presence.entry(channel.into()).or_default().insert(client, Present::new(info));
    }

    fn remove_presence(&self, channel: &str, client: ClientId) {
        let mut shard = self.shard(channel);
        if let Some(p) = shard.presence.get_mut(channel) {
            p.remove(&client);
            if p.is_empty() {
                shard.presence.remove(channel);
                shrink(&mut shard.presence);
            }
        }
    }

    fn presence(&self, channel: &str) -> BTreeMap<String, ClientInfo> {
        let shard = self.shard(channel);
        shard
            .presence
            .get(channel)
            .map(|p| p.iter().map(|(id, present)| (id.to_string(), present.client_info(*id))).collect())
            .unwrap_or_default()
    }

    fn presence_stats(&self, channel: &str) -> (u32, u32) {
        let shard = self.shard(channel);
        match shard.presence.get(channel) {
            Some(p) => {
                let users: HashSet<&str> = p.values().map(|i| &*i.user).collect();
                (p.len() as u32, users.len() as u32)
            }
            None => (0, 0),
        }
    }
}

/// Whether a subscriber that saw `(offset, epoch)` can get every publication it missed: the replay is
/// complete only if the stream still holds the one right after `offset` (or nothing was missed).
pub fn recovery_complete(missed: &[Publication], since_offset: u64, pos: &StreamPos) -> bool {
    if since_offset == pos.offset {
        return true;
    }
    missed.first().is_some_and(|p| p.offset == since_offset + 1) && missed.len() as u64 == pos.offset - since_offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pubn(n: u8) -> Publication {
        Publication { data: Bytes::from(format!("{{\"n\":{n}}}")), ..Default::default() }
    }

    const H: HistoryOptions = HistoryOptions { size: 3, ttl: Duration::from_secs(60), meta_ttl: Duration::ZERO };

    #[test]
    fn a_snapshot_restores_epochs_offsets_and_publications() {
        let a = MemoryBroker::unswept();
        let h = HistoryOptions { size: 2, ttl: Duration::from_secs(60), meta_ttl: Duration::from_secs(600) };
        for n in 1..=3 {
            a.publish("c", &mut pubn(n), h);
        }
        a.publish("d", &mut pubn(9), h);
        let (before, pos) = a.history("c", &all()).unwrap();
        let b = MemoryBroker::unswept();
        assert_eq!(b.restore(&a.snapshot()).unwrap(), 2);
        let (after, pos_b) = b.history("c", &all()).unwrap();
        assert_eq!((after, pos_b.clone()), (before, pos.clone()), "same publications, offset and epoch");
        assert_eq!(b.publish("c", &mut pubn(4), h), StreamPos { offset: 4, epoch: pos.epoch.clone() });
        let (missed, _) = b.history("c", &since(3, &pos.epoch)).unwrap();
        assert_eq!(missed.len(), 1, "recovery from the old process's position is exact");
        assert!(b.restore(b"RCMB1\x05").is_err(), "truncated");
        assert!(b.restore(b"nope").is_err());
    }

    #[test]
    fn offsets_increase_and_history_keeps_the_last_n() {
        let b = MemoryBroker::unswept();
        let mut last = StreamPos::default();
        for i in 1..=5 {
            let mut p = pubn(i);
            last = b.publish("c", &mut p, H);
            assert_eq!(p.offset, u64::from(i));
        }
        assert_eq!(last.offset, 5);
        let (pubs, pos) = b.history("c", &HistoryFilter { since: None, limit: -1, reverse: false }).unwrap();
        assert_eq!(pubs.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(pos, last);
        let (rev, _) = b.history("c", &HistoryFilter { since: None, limit: 2, reverse: true }).unwrap();
        assert_eq!(rev.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![5, 4]);
    }

    #[test]
    fn since_with_another_epoch_is_unrecoverable() {
        let b = MemoryBroker::unswept();
        b.publish("c", &mut pubn(1), H);
        let f = HistoryFilter { since: Some((1, "other".into())), limit: -1, reverse: false };
        assert_eq!(b.history("c", &f), Err(BrokerError::UnrecoverablePosition));
    }

    #[test]
    fn recovery_is_complete_only_without_a_gap() {
        let b = MemoryBroker::unswept();
        for i in 1..=5 {
            b.publish("c", &mut pubn(i), H);
        }
        let pos = b.position("c", H);
        let f = |since: u64| HistoryFilter { since: Some((since, pos.epoch.to_string())), limit: -1, reverse: false };
        let (missed, p) = b.history("c", &f(3)).unwrap();
        assert!(recovery_complete(&missed, 3, &p), "4 and 5 are still there");
        let (missed, p) = b.history("c", &f(1)).unwrap();
        assert!(!recovery_complete(&missed, 1, &p), "2 fell out of the 3-item history");
        let (missed, p) = b.history("c", &f(5)).unwrap();
        assert!(missed.is_empty() && recovery_complete(&missed, 5, &p));
    }

    #[test]
    fn expired_publications_are_not_returned() {
        let b = MemoryBroker::unswept();
        b.publish("c", &mut pubn(1), H);
        b.sweep(Instant::now() + H.ttl + Duration::from_secs(1));
        let (pubs, pos) = b.history("c", &HistoryFilter { since: None, limit: -1, reverse: false }).unwrap();
        assert!(pubs.is_empty());
        assert_eq!(pos.offset, 1, "the position survives its publications");
        assert_eq!(b.num_streams(), 1);
    }

    fn all() -> HistoryFilter {
        HistoryFilter { since: None, limit: -1, reverse: false }
    }

    fn since(offset: u64, epoch: &str) -> HistoryFilter {
        HistoryFilter { since: Some((offset, epoch.to_string())), limit: -1, reverse: false }
    }

    #[test]
    fn a_never_published_stream_is_dropped_with_its_last_subscriber_and_comes_back_with_its_epoch() {
        let b = MemoryBroker::unswept();
        let first = b.position("c", H);
        assert_eq!((first.offset, b.num_streams()), (0, 1));
        b.unsubscribe_node("c");
        assert_eq!(b.num_streams(), 0, "nothing left of a subscribe-only channel");
        // Nothing was ever published: a client recovering from (0, epoch) missed nothing.
        let (missed, pos) = b.history("c", &since(0, &first.epoch)).unwrap();
        assert!(missed.is_empty() && recovery_complete(&missed, 0, &pos));
        assert_eq!(pos, first, "a channel without a stream reads at offset 0 with the epoch it would get");
        assert_eq!(b.num_streams(), 0, "reading does not create a stream");
        assert_eq!(b.position("c", H), first, "re-created with the same epoch");
        // Another epoch, or an offset the stream never had, is not recoverable.
        b.unsubscribe_node("c");
        assert_eq!(b.history("c", &since(0, "other")), Err(BrokerError::UnrecoverablePosition));
        assert_eq!(b.history("c", &since(1, &first.epoch)), Err(BrokerError::UnrecoverablePosition));
        assert_ne!(b.position("d", H).epoch, first.epoch, "each channel has its own epoch");
    }

    #[test]
    fn a_published_stream_outlives_its_subscribers() {
        let b = MemoryBroker::unswept();
        b.position("c", H);
        b.publish("c", &mut pubn(1), H);
        b.unsubscribe_node("c");
        let (pubs, pos) = b.history("c", &all()).unwrap();
        assert_eq!((pubs.len(), pos.offset), (1, 1));
    }

    #[test]
    fn meta_expires_after_the_meta_ttl_and_the_next_stream_gets_a_new_epoch() {
        let b = MemoryBroker::unswept();
        let h = HistoryOptions { size: 10, ttl: Duration::from_secs(5), meta_ttl: Duration::from_secs(60) };
        let start = Instant::now();
        let old = b.publish("c", &mut pubn(1), h);
        b.sweep(start + Duration::from_secs(30));
        let (pubs, pos) = b.history("c", &all()).unwrap();
        assert_eq!((pubs.len(), &pos), (0, &old), "publications gone after history_ttl, position kept");
        // The read above extended the meta by its TTL; a sweep past that removes the stream.
        b.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(b.num_streams(), 0);
        let new = b.position("c", h);
        assert_eq!(new.offset, 0);
        assert_ne!(new.epoch, old.epoch, "a stream that had publications never comes back under its epoch");
        assert_eq!(b.history("c", &since(0, &old.epoch)), Err(BrokerError::UnrecoverablePosition));
        assert_eq!(b.history("c", &since(1, &old.epoch)), Err(BrokerError::UnrecoverablePosition));
    }

    #[test]
    fn zero_meta_ttl_means_thirty_days_and_a_short_one_never_outruns_the_publications() {
        let b = MemoryBroker::unswept();
        let now = Instant::now();
        b.publish("default", &mut pubn(1), H);
        let short = HistoryOptions { size: 10, ttl: Duration::from_secs(120), meta_ttl: Duration::from_secs(1) };
        b.publish("short", &mut pubn(1), short);
        b.sweep(now + Duration::from_secs(60));
        assert_eq!(b.history("short", &all()).unwrap().0.len(), 1, "meta TTL below history_ttl counts as history_ttl");
        b.sweep(now + Duration::from_secs(29 * 24 * 3600));
        assert_eq!(b.num_streams(), 1, "`short` is gone, the default 30 days are not over");
        b.sweep(now + Duration::from_secs(31 * 24 * 3600));
        assert_eq!(b.num_streams(), 0);
    }

    #[test]
    fn expiry_queue_holds_one_entry_per_stream_and_a_sweep_touches_only_what_is_due() {
        let b = MemoryBroker::unswept();
        for i in 0..1000 {
            for n in 0..5 {
                b.publish(&format!("c{i}"), &mut pubn(n), H);
            }
            b.position(&format!("p{i}"), H);
        }
        let queued = || (0..SHARDS).map(|i| b.inner.lock(i).expiry.len()).sum::<usize>();
        assert_eq!((b.num_streams(), queued()), (2000, 2000));
        let due =
            |at: Instant| (0..SHARDS).map(|i| b.inner.lock(i).sweep(at, usize::MAX, &b.inner.epochs)).sum::<usize>();
        assert_eq!(due(Instant::now()), 0, "nothing is due yet: nothing is looked at");
        assert_eq!(due(Instant::now() + H.ttl + Duration::from_secs(1)), 1000, "only the published streams");
        assert_eq!(queued(), 2000, "each queued again, at its meta deadline");
    }

    #[test]
    fn tables_shrink_after_a_burst_of_channels() {
        let b = MemoryBroker::unswept();
        let capacity = || (0..SHARDS).map(|i| b.inner.lock(i).streams.capacity()).sum::<usize>();
        let presence = || (0..SHARDS).map(|i| b.inner.lock(i).presence.capacity()).sum::<usize>();
        let empty = capacity();
        for i in 0..20_000 {
            b.position(&format!("c{i}"), H);
            b.add_presence(&format!("c{i}"), ClientId(i), ClientInfo::default());
        }
        assert!(capacity() >= 20_000 && presence() >= 20_000);
        for i in 0..20_000 {
            b.unsubscribe_node(&format!("c{i}"));
            b.remove_presence(&format!("c{i}"), ClientId(i));
        }
        assert_eq!(b.num_streams(), 0);
        assert!(capacity() <= empty + SHARDS * 128, "stream tables kept {} slots", capacity());
        assert!(presence() <= SHARDS * 128, "presence tables kept {} slots", presence());
    }

    #[test]
    fn no_history_means_offset_zero() {
        let b = MemoryBroker::unswept();
        let mut p = pubn(1);
        assert_eq!(b.publish("c", &mut p, HistoryOptions::default()), StreamPos::default());
        assert_eq!(p.offset, 0);
    }

    #[test]
    fn presence_counts_clients_and_users() {
        let b = MemoryBroker::unswept();
        let info = |u: &str| ClientInfo { user: u.into(), ..Default::default() };
        b.add_presence("c", ClientId(1), info("alice"));
        b.add_presence("c", ClientId(2), info("alice"));
        b.add_presence("c", ClientId(3), info("bob"));
        assert_eq!(b.presence_stats("c"), (3, 2));
        b.remove_presence("c", ClientId(2));
        assert_eq!(b.presence("c").len(), 2);
    }

    #[test]
    fn presence_gives_back_what_was_added() {
        let b = MemoryBroker::unswept();
        let full = ClientInfo {
            user: "alice".into(),
            client: ClientId(7).to_string(),
            conn_info: Bytes::from_static(b"{\"name\":\"A\"}"),
            chan_info: Bytes::from_static(b"{\"role\":\"mod\"}"),
        };
        let bare = ClientInfo { user: String::new(), client: ClientId(8).to_string(), ..Default::default() };
        b.add_presence("c", ClientId(7), full.clone());
        b.add_presence("c", ClientId(8), bare.clone());
        let p = b.presence("c");
        assert_eq!(p.get(&ClientId(7).to_string()), Some(&full));
        assert_eq!(p.get(&ClientId(8).to_string()), Some(&bare));
    }
}
