//! The networked engine boundary: what several ringcast nodes share when one machine is not enough.
//!
//! The embedded [`crate::broker::MemoryBroker`] is local, synchronous and infallible: it assigns a
//! publication's position inside the hub's per-channel section and cannot fail. A networked engine
//! (Redis, [`redis::RedisEngine`]) is none of those: every call is a round trip that may fail or stall.
//! So its boundary is async and fallible, and split by capability as Centrifugo's is:
//! * [`Broker`]: publish (the engine assigns the position), subscribe this node to a channel, control
//!   messages between nodes (API disconnect/subscribe/unsubscribe/refresh of a client on another node);
//! * [`HistoryStore`]: positions and history reads (recovery);
//! * [`PresenceManager`]: presence entries with a TTL, refreshed by the node that holds the client.
//!
//! The NATS engine ([`nats::NatsEngine`]) provides the first two (history in JetStream, [`jetstream`];
//! control messages kept in JetStream too, [`control_stream`], as Redis keeps them in a log); its
//! presence may come from Redis.
//!
//! Errors are [`EngineError::Unavailable`] (certainly not executed: never sent), [`EngineError::Timeout`]
//! and [`EngineError::Lost`] (sent, or perhaps sent, and no answer: it may have been executed): a client
//! publish, history or presence answers error 100 (internal, temporary: SDKs retry), an API call answers
//! error 100. Nothing is dropped silently. Every call goes through a circuit breaker ([`breaker`]), one per Redis shard (the
//! shard that holds the call's channel): after repeated failures that shard's calls fail fast with
//! `Unavailable` for a cool-down instead of waiting for a dead instance, and the other shards' calls go on.
//!
//! # Delivery with a networked engine
//! The node that publishes does not deliver locally. Every node, the origin included, receives the
//! channel's publications on its one ordered PUB/SUB subscription and delivers them through the hub's
//! channel section ([`crate::pubsub::node::Node::deliver_inbound`]), so a node's own publications are
//! delivered once, and all nodes deliver in the order the engine assigned offsets (the engine appends and
//! publishes in one atomic step).
//!
//! One exception, while the engine is out of reach: a publish that fails with
//! [`EngineError::Unavailable`] (never sent) to a channel whose namespace keeps no positions (no history,
//! no forced positioning or recovery) is delivered by the origin to its own subscribers through the
//! same section, and the publisher still gets error 100 (the other nodes did not get it). A `Timeout` or
//! `Lost` publish may have run, and may still arrive through the engine: never delivered locally, so no
//! subscriber gets it twice. A channel with history is never delivered locally: its publications need
//! an offset, which only the engine assigns.
//!
//! # Sessions
//! Session commands are synchronous (`Session::handle` returns the reply). An engine call is driven by
//! [`resolve`]: polled once (an engine that completes immediately costs nothing more), otherwise the
//! connection's worker thread hands its other tasks to the runtime and waits for the call
//! (`block_in_place`), bounded by the engine's timeout. No lock is held while it waits.
//!
//! Each waiting call holds a thread, so a slow engine under load would grow the runtime's threads with
//! every command in flight. [`WaitLimit`] bounds them (`engine_max_waiting`): a call over the bound is
//! not started and answers error 100 at once ([`EngineError::Busy`], counted in
//! `ringcast_engine_refused_total`); `ringcast_engine_waiting` is the number waiting now.

pub mod breaker;
pub mod control_stream;
pub mod jetstream;
pub mod nats;
pub mod redis;
pub mod shards;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use ringcast_protocol::messages::{ClientInfo, Publication};
use ringcast_protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// Control messages a control log keeps (Redis's `XADD MAXLEN ~`, NATS's stream `max_msgs`): far more
/// than a node misses while its connection to the engine is made again.
pub const CONTROL_LOG_MAX: u64 = 10_000;

/// How long a control log keeps a message: Redis's log expires this long after its last message, NATS's
/// stream drops each message this long after it was stored. A prefix no node uses any more goes.
pub const CONTROL_LOG_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Why an engine call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The call was not executed: it was never sent (the connection is known down or refused, or the
    /// shard's circuit breaker is open). Only this error lets a publication be delivered locally
    /// ([`crate::pubsub::node`]): nothing can deliver it a second time.
    #[error("engine unavailable")]
    Unavailable,
    /// The engine did not answer within the configured bound (`redis_timeout`): it may have executed
    /// the call.
    #[error("engine timed out")]
    Timeout,
    /// The connection failed with the call sent, or perhaps sent (broken pipe, reset, end of stream):
    /// the engine may have executed it, as after a [`EngineError::Timeout`].
    #[error("engine connection lost")]
    Lost,
    /// `engine_max_waiting` calls are already waiting on the engine: this one was not started.
    #[error("engine busy")]
    Busy,
    /// `since` names another epoch, or publications after it are gone (protocol error 112).
    #[error("unrecoverable position")]
    UnrecoverablePosition,
}

impl EngineError {
    /// The client protocol's reply code: 100 (internal, temporary) for an engine that failed.
    pub fn code(self) -> ErrorCode {
        match self {
            EngineError::UnrecoverablePosition => ErrorCode::UNRECOVERABLE_POSITION,
            EngineError::Unavailable | EngineError::Timeout | EngineError::Lost | EngineError::Busy => {
                ErrorCode::INTERNAL
            }
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            EngineError::Unavailable => "unavailable",
            EngineError::Timeout => "timeout",
            EngineError::Lost => "lost",
            EngineError::Busy => "busy",
            EngineError::UnrecoverablePosition => "unrecoverable",
        }
    }
}

pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>;

/// Something the server API asks of a client wherever it is connected: sent to every node, applied by
/// the one(s) holding the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    Disconnect {
        user: String,
        client: Option<String>,
        code: u16,
        reason: String,
    },
    Subscribe {
        user: String,
        client: Option<String>,
        channel: String,
    },
    Unsubscribe {
        user: String,
        client: Option<String>,
        channel: String,
    },
    Refresh {
        user: String,
        client: Option<String>,
        expire_at: Option<i64>,
        expired: bool,
    },
    /// A node's periodic announcement of itself ([`crate::pubsub::registry`]).
    Node(crate::pubsub::registry::NodeStats),
    /// A client joined (`join: true`) or left `channel` on node `origin`; `info` is its protobuf
    /// `ClientInfo`. The other nodes push it to their subscribers of the channel that listen for it.
    Membership {
        origin: String,
        channel: String,
        join: bool,
        info: Vec<u8>,
    },
}

/// Publications between nodes.
pub trait Broker: Send + Sync + 'static {
    /// Assigns the publication's position (appending it to history when `history.size > 0`) and sends it
    /// to every node subscribed to the channel, this one included. Returns the position once assigned.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos>;
    /// One more local subscriber of `channel` (whose namespace keeps `history`): the first makes the node
    /// receive its publications. Resolves once the engine confirmed the subscription (publications made
    /// after it arrive). An engine that delivers a history channel from its stored history (NATS with
    /// JetStream) tells the two kinds apart by `history.size`.
    fn subscribe_node<'a>(&'a self, channel: &'a str, history: HistoryOptions) -> EngineFuture<'a, ()>;
    /// One local subscriber of `channel` fewer (of those whose `subscribe_node` succeeded): after the last,
    /// the node stops receiving it. Batched with other (un)subscriptions; never waits.
    fn unsubscribe_node(&self, channel: &str);
    /// Sends a control message to every node (this one included).
    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()>;
    /// Resolves once every publication the engine sent this node before the call has been handed to
    /// [`Inbound`]: a subscriber being recovered is registered only after it, so a publication its
    /// history read already returned cannot reach it a second time as a push.
    fn barrier<'a>(&'a self, _channel: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    /// What the dashboard shows of the engine (read by the admin sampler once a second while watched).
    fn status(&self) -> EngineStatus;
}

/// An engine's state as an operator sees it (the `/admin` dashboard's engine panel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatus {
    /// "redis", ...
    pub kind: &'static str,
    pub state: EngineState,
    /// Where it is and what this node holds there, in words.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// Publications arrive and the last command was answered.
    Up,
    /// Publications arrive, but the last command failed (a slow or overloaded engine).
    Degraded,
    /// The node is not receiving publications: its subscription connection is down.
    Down,
}

impl EngineState {
    pub fn label(self) -> &'static str {
        match self {
            EngineState::Up => "up",
            EngineState::Degraded => "degraded",
            EngineState::Down => "down",
        }
    }
}

impl EngineStatus {
    /// One status for an engine of several shards: the worst shard's state, and a detail naming each
    /// shard by its index (as the breaker metrics' `shard` label does) with its own state and detail.
    /// With one shard, its status as it is.
    pub fn of_shards(mut shards: Vec<EngineStatus>) -> EngineStatus {
        if shards.len() == 1 {
            if let Some(one) = shards.pop() {
                return one;
            }
        }
        let rank = |s: EngineState| match s {
            EngineState::Up => 0,
            EngineState::Degraded => 1,
            EngineState::Down => 2,
        };
        let kind = shards.first().map_or("redis", |s| s.kind);
        let state = shards.iter().map(|s| s.state).max_by_key(|s| rank(*s)).unwrap_or(EngineState::Down);
        let detail = shards
            .iter()
            .enumerate()
            .map(|(i, s)| format!("shard {i} {}: {}", s.state.label(), s.detail))
            .collect::<Vec<_>>()
            .join("; ");
        EngineStatus { kind, state, detail }
    }
}

/// Positions and history of channels.
pub trait HistoryStore: Send + Sync + 'static {
    /// Reads history after `filter.since` (limit 0: only the position). The stream is created (it gets
    /// an epoch) if it does not exist, so that subscribers learn an epoch to recover against.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)>;
    /// Drops the publications, keeping offset and epoch.
    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()>;
}

/// Who is subscribed to a channel, cluster-wide.
pub trait PresenceManager: Send + Sync + 'static {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()>;
    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()>;
    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>>;
    /// (clients, distinct users).
    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)>;
}

/// A networked engine made of shards that fail independently (Redis instances, [`shards`]): each
/// channel lives on one shard, control messages travel on the first. The circuit breaker keeps one
/// state per shard ([`breaker::Guarded`]).
pub trait Sharded: Broker + HistoryStore + PresenceManager {
    /// How many shards (at least 1).
    fn shards(&self) -> usize;
    /// The shard that holds everything of `channel`, in `0..shards()`.
    fn shard_of(&self, channel: &str) -> usize;
    /// Each shard's status, in shard order.
    fn shard_statuses(&self) -> Vec<EngineStatus>;
}

/// What a networked engine hands to the node it serves.
pub trait Inbound: Send + Sync + 'static {
    /// A publication of `channel` (with its offset), in the channel's order.
    fn publication(&self, channel: &str, publication: Publication);
    fn control(&self, control: Control);
    /// The engine's subscription connection was lost and made again: publications of `channels` may have
    /// been missed meanwhile.
    fn resubscribed(&self, channels: &[String]);
}

/// Where an engine hands what arrives ([`Inbound`]): the node, set once after both are made. Held
/// weakly: the node owns the engine, so a strong reference back would keep both alive for ever. Empty
/// (or the node gone), what arrives is dropped.
#[derive(Default)]
pub struct InboundSlot(std::sync::OnceLock<std::sync::Weak<dyn Inbound>>);

impl InboundSlot {
    /// The first call sets it; later calls are ignored.
    pub fn set(&self, inbound: std::sync::Weak<dyn Inbound>) {
        let _ = self.0.set(inbound);
    }

    /// The node, while it is set and alive.
    pub fn get(&self) -> Option<std::sync::Arc<dyn Inbound>> {
        self.0.get().and_then(std::sync::Weak::upgrade)
    }
}

/// The networked engine a node uses, by capability.
#[derive(Clone)]
pub struct Remote {
    pub broker: std::sync::Arc<dyn Broker>,
    pub history: std::sync::Arc<dyn HistoryStore>,
    pub presence: std::sync::Arc<dyn PresenceManager>,
    /// The circuit breakers the calls above go through, one per shard in shard order, never empty
    /// ([`Remote::guarded`]).
    pub breakers: std::sync::Arc<[breaker::Breaker]>,
    /// Bounds the calls waited on at once (shared by every clone).
    pub waiting: std::sync::Arc<WaitLimit>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Remote")
    }
}

/// How many engine calls are waited on at once, and how many may be (see the module docs).
#[derive(Debug)]
pub struct WaitLimit {
    max: usize,
    now: AtomicUsize,
}

/// One call counted in a [`WaitLimit`] until dropped.
struct Waiting<'a>(&'a WaitLimit);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("ringcast_engine_waiting").decrement(1.0);
    }
}

impl WaitLimit {
    pub fn new(max: usize) -> WaitLimit {
        WaitLimit { max, now: AtomicUsize::new(0) }
    }

    /// Calls being waited on now.
    pub fn waiting(&self) -> usize {
        self.now.load(Ordering::Acquire)
    }

    fn enter(&self) -> Option<Waiting<'_>> {
        if self.now.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.now.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("ringcast_engine_refused_total").increment(1);
            return None;
        }
        metrics::gauge!("ringcast_engine_waiting").increment(1.0);
        Some(Waiting(self))
    }
}

impl Remote {
    /// Runs an engine call to completion from synchronous code (see the module docs): refused with
    /// [`EngineError::Busy`] before it starts when `engine_max_waiting` calls are waiting; else polled
    /// once, then, on a multi-threaded runtime, waited for with `block_in_place`. Outside one it cannot
    /// wait: `Unavailable`.
    pub fn resolve<T>(&self, fut: EngineFuture<'_, T>) -> Result<T, EngineError> {
        let Some(_counted) = self.waiting.enter() else { return Err(EngineError::Busy) };
        resolve(fut)
    }
}

fn resolve<T>(mut fut: EngineFuture<'_, T>) -> Result<T, EngineError> {
    if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        return r;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        _ => {
            tracing::warn!("engine call outside a multi-threaded runtime");
            Err(EngineError::Unavailable)
        }
    }
}

/// A fresh epoch for a stream that has none.
pub(crate) fn random_epoch() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// The offset a history read starts after: `filter.since`'s, checked against the stream's position
/// (`top`, `epoch`). Another epoch (an empty one counts as any) or an offset beyond `top` is
/// unrecoverable.
pub(crate) fn read_after(filter: &HistoryFilter, top: u64, epoch: &str) -> Result<Option<u64>, EngineError> {
    match &filter.since {
        Some((offset, since_epoch)) => {
            if (!since_epoch.is_empty() && since_epoch != epoch) || *offset > top {
                return Err(EngineError::UnrecoverablePosition);
            }
            Ok(Some(*offset))
        }
        None => Ok(None),
    }
}

/// What a history read answers from a stream's publications (oldest first): after `after` (before it,
/// newest first, when `filter.reverse`), at most `filter.limit` (negative: all), as Centrifugo's
/// history API does.
pub(crate) fn select(pubs: Vec<Publication>, after: Option<u64>, filter: &HistoryFilter) -> Vec<Publication> {
    let limit = if filter.limit < 0 { usize::MAX } else { filter.limit as usize };
    match (filter.reverse, after) {
        (true, Some(since)) => pubs.into_iter().rev().filter(|p| p.offset < since).take(limit).collect(),
        (true, None) => pubs.into_iter().rev().take(limit).collect(),
        (false, since) => pubs.into_iter().filter(|p| p.offset > since.unwrap_or(0)).take(limit).collect(),
    }
}

/// Counts a failed engine call (`ringcast_engine_errors_total{op, error}`) and logs it.
pub fn failed(op: &'static str, e: EngineError) -> EngineError {
    metrics::counter!("ringcast_engine_errors_total", "op" => op, "error" => e.label()).increment(1);
    if e != EngineError::UnrecoverablePosition {
        tracing::warn!(op, error = %e, "engine call failed");
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_over_engine_max_waiting_are_refused_and_the_others_counted_out() {
        let limit = WaitLimit::new(2);
        let a = limit.enter().expect("first");
        let b = limit.enter().expect("second");
        assert!(limit.enter().is_none(), "a third waits on nothing: refused");
        assert_eq!(limit.waiting(), 2, "the refusal is not counted as waiting");
        drop(a);
        let c = limit.enter().expect("room again");
        drop((b, c));
        assert_eq!(limit.waiting(), 0);
        assert_eq!(EngineError::Busy.code(), ErrorCode::INTERNAL, "error 100, as a timeout");
    }
}
