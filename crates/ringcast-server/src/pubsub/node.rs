//! The node: one server's pub/sub state and the operations on it, shared by every client session and
//! by the HTTP API.
//!
//! It ties together the [`Hub`] (who is subscribed here), the [`Broker`] (ordering, history, presence),
//! channel namespaces and tokens, and a registry of connected clients by user (so the API can
//! disconnect a user). It does no IO: sessions and the API call it, and it queues frames on clients.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ringcast_protocol::messages::{ClientInfo, Join, Leave, Publication, Push, Reply};
use ringcast_protocol::{encode_reply, publication_push_bytes, ErrorCode, Format};

use crate::broker::{Broker, BrokerError, HistoryFilter, HistoryOptions, StreamPos};
use crate::engine::{failed, Control, EngineError, Inbound, Remote};
use crate::policy::auth::TokenVerifier;
use crate::policy::namespace::{ChannelOptions, Namespaces};
use crate::pubsub::client::{ClientId, ServerCommand};
use crate::pubsub::client::{ClientSet, ClientShared};
use crate::pubsub::hub::Frames;
use crate::pubsub::hub::{FanOut, Hub};

/// Limits the node holds every client session to (from the configuration; [`Node::with_client_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// `client_user_connection_limit`: connections one (non-anonymous) user may hold here; 0: unlimited.
    pub user_connection_limit: usize,
    /// `history_max_publication_limit`: most publications in one client history reply; 0: no cap.
    pub history_max_publication_limit: usize,
    /// `client_command_rate` / `client_command_burst` / `client_flood_disconnect_after`: the command
    /// bucket every client session has (see `session::CommandBucket`); `None`: unlimited.
    pub commands: Option<crate::session::CommandQuota>,
    /// `client_channel_publish_rate` / `client_channel_publish_burst`: publications one connection may
    /// make to one channel (`session::ChannelBuckets`); `None`: unlimited.
    pub publications: Option<crate::session::CommandQuota>,
}

impl Default for ClientLimits {
    /// Centrifugo's defaults: no connection limit, 300 publications per history reply.
    fn default() -> Self {
        ClientLimits {
            user_connection_limit: 0,
            history_max_publication_limit: 300,
            commands: None,
            publications: None,
        }
    }
}

/// Subscriptions a connection may hold by default (Centrifugo's `client_channel_limit`).
pub const DEFAULT_CLIENT_CHANNEL_LIMIT: usize = 128;

/// What the configuration says clients may do: the part of the node a reload replaces
/// ([`Node::set_policy`]). Read through one `ArcSwap`: a load is a few atomic operations, no lock, and
/// an operation that started under the old policy finishes under it.
#[derive(Debug)]
pub struct Policy {
    pub namespaces: Namespaces,
    pub tokens: Option<Arc<TokenVerifier>>,
    pub allow_anonymous: bool,
    pub client_limits: ClientLimits,
    /// Subscriptions one connection may hold (0: no limit).
    pub client_channel_limit: usize,
    /// `allowed_origins` as applied (`*` in dev mode when none are configured), checked at the upgrade.
    pub allowed_origins: Vec<String>,
}

pub struct Node {
    pub hub: Hub,
    pub broker: Arc<dyn Broker>,
    /// The networked engine (`broker = "redis"`), if any: then publications, history, presence and API
    /// control go through it, and [`Node::broker`] is not used for them.
    pub remote: Option<Remote>,
    /// Subscribers being recovered over the network, by channel: what arrives for the channel meanwhile
    /// is kept for them ([`Node::subscribe_remote`]).
    recovering: Mutex<HashMap<String, Vec<Pending>>>,
    policy: arc_swap::ArcSwap<Policy>,
    /// Set when the node's streams were handed to a successor process (zero-downtime upgrade): from then
    /// on publications are refused here, so none is lost between the snapshot and the drain.
    frozen: std::sync::atomic::AtomicBool,
    /// Publications between their frozen check and their broker append (what `freeze` waits out).
    publishing: std::sync::atomic::AtomicUsize,
    /// Results of API publications made with an idempotency key.
    pub idempotency: crate::pubsub::idempotency::IdempotencyCache<StreamPos>,
    /// Connected clients by user id ("" for anonymous).
    /// A set per user, so that connecting and disconnecting are O(1) however many clients share a user
    /// (every anonymous client shares "").
    users: Mutex<HashMap<String, ClientSet>>,
    pub started: Instant,
    pub name: String,
    /// This node's unique id (random per process), as reported by the API's `info`.
    pub uid: String,
    /// The other nodes on the same engine, as they last announced themselves.
    pub nodes: crate::pubsub::registry::NodeRegistry,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("allow_anonymous", &self.policy().allow_anonymous)
            .finish_non_exhaustive()
    }
}

/// A push, encoded for one format (the payload: framing is the transport's).
pub fn push_payload(format: Format, push: Push) -> Option<Bytes> {
    let mut payload = BytesMut::new();
    encode_reply(format, &Reply::push(push), &mut payload).ok()?;
    Some(payload.freeze())
}

impl Node {
    pub fn new(
        broker: Arc<dyn Broker>,
        namespaces: Namespaces,
        tokens: Option<TokenVerifier>,
        allow_anonymous: bool,
    ) -> Node {
        Node {
            hub: Hub::new(),
            broker,
            remote: None,
            recovering: Mutex::new(HashMap::new()),
            policy: arc_swap::ArcSwap::from_pointee(Policy {
                namespaces,
                tokens: tokens.map(Arc::new),
                allow_anonymous,
                client_limits: ClientLimits::default(),
                client_channel_limit: DEFAULT_CLIENT_CHANNEL_LIMIT,
                allowed_origins: Vec::new(),
            }),
            frozen: std::sync::atomic::AtomicBool::new(false),
            publishing: std::sync::atomic::AtomicUsize::new(0),
            idempotency: Default::default(),
            users: Mutex::new(HashMap::new()),
            started: Instant::now(),
            name: "ringcast".into(),
            uid: format!("{}", crate::pubsub::client::ClientId::random()),
            nodes: Default::default(),
        }
    }

    /// Uses a networked engine (see [`crate::engine`]); the engine delivers to this node through
    /// [`Inbound`] once it is told of it ([`crate::engine::redis::RedisEngine::set_inbound`]).
    pub fn with_remote(mut self, remote: Remote) -> Node {
        self.remote = Some(remote);
        self
    }

    /// Sets how many subscriptions one connection may hold (0: no limit).
    pub fn with_client_channel_limit(self, limit: usize) -> Node {
        self.update_policy(|p| p.client_channel_limit = limit);
        self
    }

    /// The policy in force (lock-free; hold it only for the operation at hand).
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Replaces the policy: operations that start from now on see the new one (a config reload).
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    fn update_policy(&self, f: impl FnOnce(&mut Policy)) {
        let old = self.policy.load_full();
        let mut p = Policy {
            namespaces: old.namespaces.clone(),
            tokens: old.tokens.clone(),
            allow_anonymous: old.allow_anonymous,
            client_limits: old.client_limits,
            client_channel_limit: old.client_channel_limit,
            allowed_origins: old.allowed_origins.clone(),
        };
        f(&mut p);
        self.set_policy(p);
    }

    /// Refuses publications from now on and waits for those already past the check to reach the
    /// broker: after it returns, the broker's streams change no more (the upgrade's snapshot).
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.frozen.store(true, SeqCst);
        while self.publishing.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    /// Takes publications again (the successor failed to take over).
    pub fn thaw(&self) {
        self.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn users(&self) -> MutexGuard<'_, HashMap<String, ClientSet>> {
        match self.users.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The options of a channel named by a client or the API: the name's length, its namespace and its
    /// form are checked ([`Namespaces::channel_options`]), each refusal with its reply code.
    pub fn options(&self, channel: &str) -> Result<Arc<ChannelOptions>, ErrorCode> {
        self.policy.load().namespaces.channel_options_shared(channel).map_err(|d| d.error_code())
    }

    pub fn history_options(opts: &ChannelOptions) -> HistoryOptions {
        if !opts.history_enabled() {
            return HistoryOptions::default();
        }
        HistoryOptions { size: opts.history_size, ttl: opts.history_ttl, meta_ttl: opts.effective_history_meta_ttl() }
    }

    /// Sets the limits sessions apply (the server does, from its configuration).
    pub fn with_client_limits(self, limits: ClientLimits) -> Node {
        self.update_policy(|p| p.client_limits = limits);
        self
    }

    /// Registers `client` unless its user already holds `client_user_connection_limit` connections here
    /// (checked and registered under one lock, so concurrent connects cannot both slip in). Anonymous
    /// clients are not counted against a limit, as in Centrifugo. Returns whether it was registered.
    pub fn try_register_client(&self, user: &str, client: &Arc<ClientShared>) -> bool {
        let limit = self.policy.load().client_limits.user_connection_limit;
        let mut users = self.users();
        if let Some(set) = users.get_mut(user) {
            if limit > 0 && !user.is_empty() && set.len() >= limit {
                return false;
            }
            set.insert(client);
        } else {
            let mut set = ClientSet::default();
            set.insert(client);
            users.insert(user.to_string(), set);
        }
        true
    }

    pub fn unregister_client(&self, user: &str, client: &Arc<ClientShared>) {
        let mut users = self.users();
        if let Some(set) = users.get_mut(user) {
            set.remove(client);
            if set.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Clients of `user` (optionally only the one with id `client`).
    pub fn user_clients(&self, user: &str, client: Option<&str>) -> Vec<Arc<ClientShared>> {
        self.users()
            .get(user)
            .map(|l| l.iter().filter(|c| client.is_none_or(|id| c.id.to_string() == id)).cloned().collect())
            .unwrap_or_default()
    }

    /// The clients with the largest outbound backlogs (bytes delivered to their queues and not yet
    /// taken for writing), at least `min` bytes each: at most `k`, largest first.
    ///
    /// Walks every registered client, holding the registry's lock for the walk and each client's queue
    /// lock for a read of its length (lock order: registry → client queue; nothing takes them the other
    /// way). Memory shedding calls it only while the node is over its watermark (`app::memory`), never
    /// under normal load; it keeps at most `2k` candidates at a time.
    pub fn largest_backlogs(&self, k: usize, min: usize) -> Vec<(usize, Arc<ClientShared>)> {
        let by_size_desc =
            |top: &mut Vec<(usize, Arc<ClientShared>)>| top.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        let mut top: Vec<(usize, Arc<ClientShared>)> = Vec::new();
        if k == 0 {
            return top;
        }
        {
            let users = self.users();
            for client in users.values().flat_map(ClientSet::iter) {
                let backlog = client.queued_bytes();
                if backlog < min.max(1) {
                    continue;
                }
                top.push((backlog, client.clone()));
                if top.len() >= 2 * k {
                    by_size_desc(&mut top);
                    top.truncate(k);
                }
            }
        }
        by_size_desc(&mut top);
        top.truncate(k);
        top
    }

    /// Every connected client (the drain disconnects them one by one).
    pub fn clients(&self) -> Vec<Arc<ClientShared>> {
        self.users().values().flat_map(|set| set.iter().cloned()).collect()
    }

    /// (connected clients, distinct users).
    pub fn counts(&self) -> (usize, usize) {
        let users = self.users();
        (users.values().map(ClientSet::len).sum(), users.len())
    }

    /// Publishes to `channel`: appends to history (per its namespace) and delivers to every local
    /// subscriber, encoded once per format. Returns the stream position.
    pub fn publish(
        &self,
        channel: &str,
        data: Bytes,
        info: Option<ClientInfo>,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        let opts = self.options(channel)?;
        self.publish_to(channel, data, info, Self::history_options(&opts), &opts)
    }

    /// Publishes without appending to history (the API's `skip_history`).
    pub fn publish_without_history(&self, channel: &str, data: Bytes) -> Result<(StreamPos, FanOut), ErrorCode> {
        let opts = self.options(channel)?;
        self.publish_to(channel, data, None, HistoryOptions::default(), &opts)
    }

    /// An API publication with `tags` (delivered and kept with it), to history unless `skip_history`.
    pub fn publish_tagged(
        &self,
        channel: &str,
        data: Bytes,
        tags: std::collections::BTreeMap<String, String>,
        skip_history: bool,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        let opts = self.options(channel)?;
        let opts = &*opts;
        let history = if skip_history { HistoryOptions::default() } else { Self::history_options(opts) };
        self.publish_publication(channel, Publication { data, tags, ..Default::default() }, history, opts)
    }

    fn publish_to(
        &self,
        channel: &str,
        data: Bytes,
        info: Option<ClientInfo>,
        history: HistoryOptions,
        opts: &ChannelOptions,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        self.publish_publication(channel, Publication { data, info, ..Default::default() }, history, opts)
    }

    /// `opts` are the channel's namespace options: with a networked engine they decide whether a
    /// publication the engine never got is delivered here alone ([`Node::deliver_alone`]).
    fn publish_publication(
        &self,
        channel: &str,
        publication: Publication,
        history: HistoryOptions,
        opts: &ChannelOptions,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        use std::sync::atomic::Ordering::SeqCst;
        // Counted before the check, so `freeze` either sees this publication in flight or it sees the flag.
        self.publishing.fetch_add(1, SeqCst);
        if self.frozen.load(SeqCst) {
            self.publishing.fetch_sub(1, SeqCst);
            // Temporary (SDKs and API clients retry): the successor process takes it.
            return Err(ErrorCode::INTERNAL);
        }
        if let Some(remote) = &self.remote {
            // The engine assigns the position; every node (this one too) delivers the publication when it
            // comes back on the channel's subscription (`deliver_inbound`).
            let result = match remote.resolve(remote.broker.publish(channel, &publication, history)) {
                Ok(pos) => Ok((pos, FanOut::default())),
                Err(e) => {
                    // Never sent, so it cannot arrive through the engine later: this node's subscribers
                    // get it once. Not with positions (only the engine assigns an offset), and never
                    // after a `Timeout`/`Lost` (it may have run: it may still arrive).
                    if e == EngineError::Unavailable && !opts.keeps_positions() {
                        self.deliver_alone(channel, publication);
                    }
                    Err(failed("publish", e).code())
                }
            };
            self.publishing.fetch_sub(1, SeqCst);
            return result;
        }
        let ((_, pos), fan) = self.hub.publish_with(
            channel,
            || {
                let mut publication = publication;
                let pos = self.broker.publish(channel, &mut publication, history);
                (publication, pos)
            },
            |(publication, _), format| publication_push_bytes(format, channel, publication).ok(),
            // TCP subscribers' MESSAGE: the channel, the offset and the data as published.
            |(publication, pos)| ringcast_wire::tcp::encode_message(channel, pos.offset, &publication.data).ok(),
        );
        self.publishing.fetch_sub(1, SeqCst);
        // Delivery counts are recorded by the hub; the publish-to-delivery histogram by whoever writes the
        // frames: the subscriber's connection when it takes them (`ClientShared::take`), or the fan-out
        // writing to an idle subscriber (`ClientShared::flush_claimed`).
        Ok((pos, fan))
    }

    pub fn history(&self, channel: &str, filter: &HistoryFilter) -> Result<(Vec<Publication>, StreamPos), ErrorCode> {
        let opts = self.options(channel)?;
        let opts = &*opts;
        if !opts.history_enabled() {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        if let Some(remote) = &self.remote {
            return remote
                .resolve(remote.history.history(channel, filter, Self::history_options(opts)))
                .map_err(|e| failed("history", e).code());
        }
        self.broker.history(channel, filter).map_err(|e| match e {
            BrokerError::UnrecoverablePosition => ErrorCode::UNRECOVERABLE_POSITION,
        })
    }

    /// Sends a join push to the channel's other subscribers, on every node.
    pub fn join(&self, channel: &str, info: &ClientInfo, skip: &Arc<ClientShared>) {
        self.membership_push(channel, Some(skip), true, info);
        self.announce_membership(channel, true, info);
    }

    /// Sends a leave push to the channel's other subscribers, on every node.
    pub fn leave(&self, channel: &str, info: &ClientInfo, skip: &Arc<ClientShared>) {
        self.membership_push(channel, Some(skip), false, info);
        self.announce_membership(channel, false, info);
    }

    /// With a networked engine, tells the other nodes (a control message, sent without waiting: a join
    /// or leave never holds up the subscribe or unsubscribe that caused it). The origin has delivered
    /// locally already and skips its own message ([`Node::apply_control`]). Control messages travel apart
    /// from the channel's publications, so across nodes a join/leave is not ordered with them.
    fn announce_membership(&self, channel: &str, join: bool, info: &ClientInfo) {
        let Some(remote) = self.remote.clone() else { return };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        use prost::Message;
        let control = Control::Membership {
            origin: self.uid.clone(),
            channel: channel.to_string(),
            join,
            info: info.encode_to_vec(),
        };
        handle.spawn(async move {
            if let Err(e) = remote.broker.control(&control).await {
                failed("membership", e);
            }
        });
    }

    /// Join/leave pushes go to the subscribers that asked for them (or all, when the namespace forces
    /// it; [`crate::pubsub::hub::Hub::listen_join_leave`]), in the channel's order with its publications.
    fn membership_push(&self, channel: &str, skip: Option<&Arc<ClientShared>>, join: bool, info: &ClientInfo) {
        let push = |format| {
            let mut push = Push { channel: channel.to_string(), ..Default::default() };
            if join {
                push.join = Some(Join { info: Some(info.clone()) });
            } else {
                push.leave = Some(Leave { info: Some(info.clone()) });
            }
            push_payload(format, push)
        };
        self.hub.broadcast_join_leave(channel, skip, &push);
    }

    /// Presence of a channel, keyed by client id.
    pub fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, ErrorCode> {
        let opts = self.options(channel)?;
        let opts = &*opts;
        if !opts.presence {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        if let Some(remote) = &self.remote {
            return remote.resolve(remote.presence.presence(channel)).map_err(|e| failed("presence", e).code());
        }
        Ok(self.broker.presence(channel))
    }

    pub fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ErrorCode> {
        let opts = self.options(channel)?;
        let opts = &*opts;
        if !opts.presence {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        if let Some(remote) = &self.remote {
            return remote
                .resolve(remote.presence.presence_stats(channel))
                .map_err(|e| failed("presence_stats", e).code());
        }
        Ok(self.broker.presence_stats(channel))
    }
}

/// A subscriber being recovered over the network and the publications that arrived for it meanwhile.
#[derive(Debug)]
struct Pending {
    client: Arc<ClientShared>,
    arrived: Vec<Publication>,
}

/// What a subscribe asks of the stream's position.
#[derive(Debug, Clone)]
pub enum Positioning {
    /// Neither recovery nor a position.
    None,
    /// The current position only.
    Position,
    /// Publications after `(offset, epoch)`.
    Recover(u64, String),
}

/// The stream part of a subscribe reply made with a networked engine.
#[derive(Debug, Default)]
pub struct Positioned {
    pub offset: u64,
    pub epoch: String,
    pub recovered: bool,
    pub publications: Vec<Publication>,
}

impl Node {
    /// Adds a presence entry (the engine's, or this node's memory). An engine that fails is logged and
    /// counted; the subscription stands.
    pub fn add_presence(&self, channel: &str, client: ClientId, info: ClientInfo) {
        match &self.remote {
            Some(remote) => {
                let _ = remote
                    .resolve(remote.presence.add_presence(channel, client, &info))
                    .map_err(|e| failed("presence_add", e));
            }
            None => self.broker.add_presence(channel, client, info),
        }
    }

    pub fn remove_presence(&self, channel: &str, client: ClientId) {
        match &self.remote {
            Some(remote) => {
                let _ = remote
                    .resolve(remote.presence.remove_presence(channel, client))
                    .map_err(|e| failed("presence_remove", e));
            }
            None => self.broker.remove_presence(channel, client),
        }
    }

    /// As [`Self::remove_presence`] for a client whose connection has ended, without waiting for a
    /// networked engine: the removal runs as a task of its own. A session that ends must not hold a
    /// worker thread: when thousands of connections close at once, each waiting in `block_in_place`
    /// used up tokio's blocking threads (512) before `engine_max_waiting` (1024) refused any, and with
    /// every worker waiting nothing was left to run the engine's connection: the node hung. Nothing
    /// depends on the removal's result (the client is gone, and its entry expires after
    /// `redis_presence_ttl` if the removal fails), so nothing is lost by not waiting.
    pub fn remove_presence_of_ended(&self, channel: &str, client: ClientId) {
        let Some(remote) = &self.remote else { return self.broker.remove_presence(channel, client) };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.remove_presence(channel, client);
        };
        let presence = remote.presence.clone();
        let channel = channel.to_string();
        runtime.spawn(async move {
            let _ = presence.remove_presence(&channel, client).await.map_err(|e| failed("presence_remove", e));
        });
    }

    /// A local subscriber left `channel` (after the hub forgot it): with a networked engine, the node
    /// stops receiving the channel after its last one.
    pub fn left(&self, channel: &str) {
        if let Some(remote) = &self.remote {
            remote.broker.unsubscribe_node(channel);
        }
    }

    fn recovering(&self) -> MutexGuard<'_, HashMap<String, Vec<Pending>>> {
        match self.recovering.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Subscribes `client` with a networked engine: the node is subscribed to the channel on the engine
    /// first (its publications arrive from then on); what arrives is kept for this client while the
    /// stream is read; then, in one step with respect to arrivals, the client is registered, and the
    /// publications it must still get (after the position read) are queued behind the reply. So a
    /// publication that raced the subscribe reaches the client exactly once: in the reply's replay or as
    /// a push. No lock is held while the engine is waited for.
    ///
    /// `reply` makes the reply from the position (it runs in the channel's section) and is queued by
    /// the caller before the pushes this queues (the connection writes its replies first).
    pub fn subscribe_remote<T>(
        &self,
        channel: &str,
        client: &Arc<ClientShared>,
        positioning: Positioning,
        history: HistoryOptions,
        reply: impl FnOnce(Positioned) -> T,
    ) -> Result<(T, Arc<str>), ErrorCode> {
        let Some(remote) = &self.remote else { return Err(ErrorCode::INTERNAL) };
        remote.resolve(remote.broker.subscribe_node(channel, history)).map_err(|e| failed("subscribe", e).code())?;
        let filter = match &positioning {
            Positioning::None => {
                return self.hub.subscribe_with(
                    channel,
                    client,
                    || {},
                    || Ok::<_, ErrorCode>(reply(Positioned::default())),
                );
            }
            Positioning::Position => HistoryFilter { since: None, limit: 0, reverse: false },
            Positioning::Recover(offset, epoch) => {
                HistoryFilter { since: Some((*offset, epoch.clone())), limit: -1, reverse: false }
            }
        };
        self.recovering()
            .entry(channel.to_string())
            .or_default()
            .push(Pending { client: client.clone(), arrived: Vec::new() });
        let mut read = remote.resolve(remote.history.history(channel, &filter, history));
        let mut recovered = false;
        if let (Err(crate::engine::EngineError::UnrecoverablePosition), Positioning::Recover(..)) =
            (&read, &positioning)
        {
            let position = HistoryFilter { since: None, limit: 0, reverse: false };
            read = remote.resolve(remote.history.history(channel, &position, history));
        } else if read.is_ok() {
            recovered = matches!(positioning, Positioning::Recover(..));
        }
        // Publications the read returned may still be on their way in (the PUB/SUB connection lags the
        // command one): wait until they were handed over and kept for this client, not pushed to it.
        if read.is_ok() {
            if let Err(e) = remote.resolve(remote.broker.barrier(channel)) {
                read = Err(e);
            }
        }
        let mut waiting = self.recovering();
        let arrived = match waiting.get_mut(channel) {
            Some(list) => {
                let at = list.iter().position(|p| Arc::ptr_eq(&p.client, client));
                let mine = at.map(|i| list.swap_remove(i).arrived).unwrap_or_default();
                if list.is_empty() {
                    waiting.remove(channel);
                }
                mine
            }
            None => Vec::new(),
        };
        let (missed, pos) = match read {
            Ok(r) => r,
            Err(e) => {
                drop(waiting);
                remote.broker.unsubscribe_node(channel);
                return Err(failed("subscribe_history", e).code());
            }
        };
        if let Positioning::Recover(offset, epoch) = &positioning {
            recovered = recovered && *pos.epoch == **epoch && crate::broker::recovery_complete(&missed, *offset, &pos);
        }
        // Still holding `recovering`: no arrival is delivered between this and the registration.
        let result = self.hub.subscribe_with(
            channel,
            client,
            || {},
            || {
                let positioned = Positioned {
                    offset: pos.offset,
                    epoch: pos.epoch.to_string(),
                    recovered,
                    publications: if recovered { missed } else { Vec::new() },
                };
                let out = reply(positioned);
                // Arrivals after the position read are pushed behind the reply.
                let now = crate::metrics::clock_us();
                for p in arrived.iter().filter(|p| p.offset > pos.offset || p.offset == 0) {
                    let payload = |f| publication_push_bytes(f, channel, p).ok();
                    let message = || ringcast_wire::tcp::encode_message(channel, p.offset, &p.data).ok();
                    let mut frames = Frames::new(&payload, &message);
                    if let Some(frame) = frames.get(client.encoding) {
                        client.deliver(frame, now);
                    }
                }
                Ok::<_, ErrorCode>(out)
            },
        );
        drop(waiting);
        if result.is_err() {
            remote.broker.unsubscribe_node(channel);
        }
        result
    }

    /// Runs a control message here: to this node's clients of `user` (optionally the one client).
    pub fn apply_control(&self, control: Control) {
        match control {
            Control::Disconnect { user, client, code, reason } => {
                for c in self.user_clients(&user, client.as_deref()) {
                    c.request_disconnect(code, &reason);
                }
            }
            Control::Subscribe { user, client, channel } => {
                for c in self.user_clients(&user, client.as_deref()) {
                    c.command(ServerCommand::Subscribe(channel.clone()));
                }
            }
            Control::Unsubscribe { user, client, channel } => {
                for c in self.user_clients(&user, client.as_deref()) {
                    c.command(ServerCommand::Unsubscribe(channel.clone()));
                }
            }
            Control::Refresh { user, client, expire_at, expired } => {
                for c in self.user_clients(&user, client.as_deref()) {
                    c.command(ServerCommand::Refresh { expire_at, expired });
                }
            }
            Control::Node(stats) => self.nodes.record(stats, Instant::now()),
            Control::Membership { origin, channel, join, info } => {
                if origin == self.uid {
                    return;
                }
                use prost::Message;
                match ClientInfo::decode(&info[..]) {
                    Ok(info) => self.membership_push(&channel, None, join, &info),
                    Err(e) => tracing::warn!(error = %e, "malformed join/leave from another node"),
                }
            }
        }
    }

    /// This node's figures, as `info` reports them and the registry announces them.
    pub fn stats(&self) -> crate::pubsub::registry::NodeStats {
        let (clients, users) = self.counts();
        let channels = self.hub.channels();
        crate::pubsub::registry::NodeStats {
            uid: self.uid.clone(),
            name: self.name.clone(),
            version: crate::session::VERSION.to_string(),
            num_clients: clients as u32,
            num_users: users as u32,
            num_subs: channels.iter().map(|(_, n)| *n as u32).sum(),
            num_channels: channels.len() as u32,
            uptime: self.started.elapsed().as_secs() as u32,
        }
    }

    /// Sends a control message to every node (with a networked engine) or runs it here.
    pub fn control(&self, control: Control) -> Result<(), ErrorCode> {
        match &self.remote {
            Some(remote) => remote.resolve(remote.broker.control(&control)).map_err(|e| failed("control", e).code()),
            None => {
                self.apply_control(control);
                Ok(())
            }
        }
    }

    /// A publication of a channel without positions that the engine never got (its publish failed with
    /// [`EngineError::Unavailable`]: the engine is out of reach): delivered to this node's subscribers
    /// through the same section as one from the engine, so local delivery goes on during an outage. The
    /// publisher still gets error 100 (the other nodes did not get it; a retry that succeeds delivers it
    /// here a second time). Counted in `ringcast_engine_local_only_total`.
    fn deliver_alone(&self, channel: &str, publication: Publication) {
        metrics::counter!("ringcast_engine_local_only_total").increment(1);
        tracing::debug!(channel, "engine unavailable: publication delivered to this node's subscribers only");
        self.deliver_inbound(channel, publication);
    }

    /// A publication from the engine: kept for subscribers being recovered, delivered to the others
    /// through the channel's section, in arrival order (the engine's offset order).
    pub fn deliver_inbound(&self, channel: &str, publication: Publication) {
        let mut waiting = self.recovering();
        if let Some(list) = waiting.get_mut(channel) {
            for p in list.iter_mut() {
                p.arrived.push(publication.clone());
            }
        }
        let ((), _, writes) = self.hub.publish_holding(
            channel,
            || (),
            |(), format| publication_push_bytes(format, channel, &publication).ok(),
            |()| ringcast_wire::tcp::encode_message(channel, publication.offset, &publication.data).ok(),
        );
        drop(waiting);
        // No lock across a socket write: idle subscribers are written to after `waiting` is released.
        writes.write();
    }
}

impl Inbound for Node {
    fn publication(&self, channel: &str, publication: Publication) {
        self.deliver_inbound(channel, publication);
    }

    fn control(&self, control: Control) {
        self.apply_control(control);
    }

    /// Publications of these channels may have been missed while the connection was down: their
    /// subscribers here are unsubscribed with 2500 (insufficient state), so SDKs resubscribe and recover.
    fn resubscribed(&self, channels: &[String]) {
        for channel in channels {
            for client in self.hub.subscribers(channel) {
                client.command(ServerCommand::Resubscribe(channel.clone()));
            }
        }
    }
}
