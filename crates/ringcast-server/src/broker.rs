//! Where publications are ordered and remembered: history streams and presence.
//!
//! [`Broker`] is the seam between one node and the outside world. The embedded [`MemoryBroker`] keeps
//! everything in this process; the Redis and NATS brokers of a later issue implement the same trait, so
//! the node, the hub and the client protocol do not change when channels span machines.
//!
//! # Streams
//! A channel with history is a stream: every publication gets the next offset (1, 2, 3…), the last
//! `history_size` publications younger than `history_ttl` are kept, and the stream has an *epoch* — a
//! random id chosen when the stream is created. A client that recovers names the epoch it saw: if the
//! epoch differs, the history it is asking about no longer exists (the broker restarted, the stream
//! expired) and nothing can be replayed as if complete.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringcast_protocol::messages::{ClientInfo, Publication};

use crate::client::ClientId;

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
    pub ttl: Duration,
    /// How long the stream's position (offset, epoch) outlives its last publication
    /// (`history_meta_ttl`); zero where no stream is kept.
    pub meta_ttl: Duration,
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
    /// This node's last subscriber of `channel` left.
    fn unsubscribe_node(&self, _channel: &str) {}
    /// Appends `publication` to `channel`'s stream when `history.size > 0`, setting its offset.
    /// Returns the stream position after it (offset 0 and an empty epoch without history).
    fn publish(&self, channel: &str, publication: &mut Publication, history: HistoryOptions) -> StreamPos;
    /// Reads history.
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

#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    top: u64,
    items: VecDeque<(Publication, Instant)>,
}

impl Stream {
    fn new() -> Stream {
        Stream { epoch: new_epoch(), top: 0, items: VecDeque::new() }
    }

    fn pos(&self) -> StreamPos {
        StreamPos { offset: self.top, epoch: self.epoch.clone() }
    }

    fn expire(&mut self, now: Instant) {
        while self.items.front().is_some_and(|(_, at)| *at <= now) {
            self.items.pop_front();
        }
    }
}

fn new_epoch() -> Arc<str> {
    format!("{:08x}", fastrand::u32(..)).into()
}

#[derive(Debug, Default)]
struct Shard {
    streams: HashMap<Box<str>, Stream>,
    presence: HashMap<Box<str>, BTreeMap<ClientId, Present>>,
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

/// The embedded broker: streams and presence in this process's memory.
#[derive(Debug)]
pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, Shard> {
        match self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, channel: &str, publication: &mut Publication, history: HistoryOptions) -> StreamPos {
        if history.size == 0 {
            publication.offset = 0;
            return StreamPos::default();
        }
        let now = Instant::now();
        let mut shard = self.shard(channel);
        let stream = shard.streams.entry(channel.into()).or_insert_with(Stream::new);
        stream.top += 1;
        publication.offset = stream.top;
        stream.expire(now);
        stream.items.push_back((publication.clone(), now + history.ttl));
        while stream.items.len() > history.size {
            stream.items.pop_front();
        }
        stream.pos()
    }

    fn history(&self, channel: &str, filter: &HistoryFilter) -> Result<(Vec<Publication>, StreamPos), BrokerError> {
        let now = Instant::now();
        let mut shard = self.shard(channel);
        // A read of a channel that has no stream yet creates it, as Centrifugo's brokers do: the reader
        // (a client recovering onto a channel nobody published to yet) learns the epoch that later
        // publications will carry, instead of an empty one no later stream matches.
        let stream = shard.streams.entry(channel.into()).or_insert_with(Stream::new);
        stream.expire(now);
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
        shard.streams.entry(channel.into()).or_insert_with(Stream::new).pos()
    }

    fn remove_history(&self, channel: &str) {
        let mut shard = self.shard(channel);
        if let Some(s) = shard.streams.get_mut(channel) {
            // Keep offset and epoch (positions stay comparable); drop the publications.
            s.items.clear();
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

    const H: HistoryOptions =
        HistoryOptions { size: 3, ttl: Duration::from_secs(60), meta_ttl: Duration::from_secs(3600) };

    #[test]
    fn offsets_increase_and_history_keeps_the_last_n() {
        let b = MemoryBroker::new();
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
        let b = MemoryBroker::new();
        b.publish("c", &mut pubn(1), H);
        let f = HistoryFilter { since: Some((1, "other".into())), limit: -1, reverse: false };
        assert_eq!(b.history("c", &f), Err(BrokerError::UnrecoverablePosition));
    }

    #[test]
    fn recovery_is_complete_only_without_a_gap() {
        let b = MemoryBroker::new();
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
        let b = MemoryBroker::new();
        let short = HistoryOptions { size: 10, ttl: Duration::from_millis(1), meta_ttl: Duration::from_secs(3600) };
        b.publish("c", &mut pubn(1), short);
        std::thread::sleep(Duration::from_millis(5));
        let (pubs, pos) = b.history("c", &HistoryFilter { since: None, limit: -1, reverse: false }).unwrap();
        assert!(pubs.is_empty());
        assert_eq!(pos.offset, 1, "the position survives its publications");
    }

    #[test]
    fn no_history_means_offset_zero() {
        let b = MemoryBroker::new();
        let mut p = pubn(1);
        assert_eq!(b.publish("c", &mut p, HistoryOptions::default()), StreamPos::default());
        assert_eq!(p.offset, 0);
    }

    #[test]
    fn presence_counts_clients_and_users() {
        let b = MemoryBroker::new();
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
        let b = MemoryBroker::new();
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
