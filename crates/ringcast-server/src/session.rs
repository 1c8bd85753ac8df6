//! One client's Centrifugo protocol session: commands in, replies out, node operations in between.
//!
//! The connection hands every received WebSocket message to [`Session::on_message`], which decodes the
//! commands it carries (JSON lines or varint-delimited Protobuf), runs each against the [`Node`], and
//! appends the encoded replies to one buffer the connection sends as one frame. A protocol violation
//! returns the disconnect the protocol prescribes; the connection closes with its code and reason.
//!
//! Replies are written by the connection in the same pass that produced them, before it next takes
//! frames delivered by publishers, so a subscribe reply always precedes the first push of its channel.
//!
//! Replies count against `client_queue_max_size` as pushes do (see [`Session::on_message`]): what one
//! client can make the server hold for it is its queue limit, whatever it asks for in one frame.
//!
//! Every command ends in one [`Outcome`]: a reply, an error reply (the connection stays), a disconnect,
//! or nothing (a pong, a `send`). Handlers return `Result<_, Refusal>`; an [`ErrorCode`] converts into a
//! [`Refusal`] but a disconnect never turns into an error on the way, so `?` cannot weaken one.
//!
//! What a client may do on a channel is decided by [`crate::policy::namespace`] (one source of policy, shared with
//! the tests that pin it); this module only asks, and maps the answer to the protocol. As in Centrifugo's
//! `client.go`:
//! * before `connect`, anything but a `connect` with an id disconnects 3501;
//! * a command with id 0 (and no `send`) is the pong answering our ping; one we did not ask for
//!   disconnects 3501, and so does a command with an id but no method we know (`{"id":2,"frobnicate":{}}`,
//!   `{"id":2,"subscribe":null}`, an unknown Protobuf field);
//! * a channel command with an empty channel disconnects 3501; a channel name over `channel_max_length`,
//!   or not matching the namespace's form, is answered 107 and the connection stays;
//! * subscribing over `client_channel_limit` is answered 106.

use std::num::NonZeroI64;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use ringcast_protocol::messages::{
    ClientInfo, Command, ConnectRequest, ConnectResult, HistoryResult, PresenceResult, PresenceStatsResult,
    PublishResult, Push, RefreshResult, Reply, Request, SubRefreshResult, Subscribe, SubscribeRequest, SubscribeResult,
    Unsubscribe, UnsubscribeResult,
};
use ringcast_protocol::{decode_commands_from, encode_reply, DisconnectCode, ErrorCode, Format};

use crate::broker::{recovery_complete, HistoryFilter};
use crate::policy::namespace::{self, Features, Requested};
use crate::pubsub::client::ClientShared;
use crate::pubsub::node::Node;
use crate::pubsub::node::Positioning;

/// The version string sent in connect replies.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Most commands of one frame that are run. A decoded `Command` is ~650 bytes, against 3 for its shortest
/// encoding (`{}` and a newline), so commands are decoded this many at a time; the commands of a frame
/// beyond the first `MAX_COMMANDS_PER_FRAME` are not run: each is answered with error 111 "too many
/// requests" (temporary, so SDKs retry it; Centrifugo's answer to a client over a command rate limit), and
/// the connection stays. Centrifugo itself has no per-frame count (its decoder streams), so no SDK frame
/// that stays within `client_channel_limit` subscriptions comes near it.
pub const MAX_COMMANDS_PER_FRAME: usize = 1024;

/// How one command ended. The only way a handler's decision reaches the wire: [`Session::handle`]
/// returns it, [`Session::on_message`] encodes it.
// A `Reply` is large (every result is an inline `Option`), but an `Outcome` lives for one command and is
// consumed at once: moving it costs less than the allocation a `Box` would add to every command.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The command's result (its `id` set).
    Reply(Reply),
    /// An error reply with this code; the connection stays.
    Error(ErrorCode),
    /// Close the connection with this code.
    Disconnect(DisconnectCode),
    /// Nothing to send (the pong answering our ping, an asynchronous `send`).
    Silent,
}

/// Why a handler refuses a command. `From<ErrorCode>` lets `?` carry reply errors; a disconnect is only
/// ever made on purpose, and stays one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Error(ErrorCode),
    Disconnect(DisconnectCode),
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal::Error(code)
    }
}

impl From<crate::policy::auth::Outcome> for Refusal {
    fn from(o: crate::policy::auth::Outcome) -> Refusal {
        match o {
            crate::policy::auth::Outcome::Error(code) => Refusal::Error(code),
            crate::policy::auth::Outcome::Disconnect(code) => Refusal::Disconnect(code),
        }
    }
}

/// A channel command's channel: Centrifugo disconnects a client that sends one without.
fn required(channel: &str) -> Result<&str, Refusal> {
    if channel.is_empty() {
        Err(Refusal::Disconnect(DisconnectCode::BAD_REQUEST))
    } else {
        Ok(channel)
    }
}

// Every subscribed idle connection carries a session and its subscriptions, so both are kept compact:
// what most subscriptions do not have (subscription-token info and expiry) is boxed and absent, and
// subscriptions sit in a sorted, exactly sized boxed slice (32 bytes each) while they are few.

struct Sub {
    /// Shared with the hub's registry (and every other subscriber of the channel).
    channel: Arc<str>,
    /// What a subscription token gave, if there was one.
    extra: Option<Box<SubExtra>>,
    presence: bool,
    /// Subscribing emitted a join, so leaving emits a leave.
    join_leave: bool,
    /// This subscriber gets join/leave pushes (see [`namespace::push_join_leave`]).
    push_join_leave: bool,
    /// Made by the server (token `channels`, server API), not by a subscribe command.
    server_side: bool,
}

/// What only subscriptions made with a subscription token carry.
struct SubExtra {
    /// `info` from the token.
    chan_info: Bytes,
    /// Unix seconds when the subscription token expires (a `sub_refresh` moves it).
    expires_at: Option<i64>,
}

impl Sub {
    fn chan_info(&self) -> Bytes {
        self.extra.as_ref().map(|e| e.chan_info.clone()).unwrap_or_default()
    }

    fn expires_at(&self) -> Option<i64> {
        self.extra.as_ref().and_then(|e| e.expires_at)
    }
}

/// Subscriptions above this count move from the exact-size sorted slice to a hash map: below it an
/// insert copies a few hundred bytes; above it, copying every entry per subscribe is what made a
/// connection holding 40,000 channels slow for everyone.
const SMALL_SUBS: usize = 64;

/// A connection's subscriptions by channel name. 16 bytes inline: an idle connection keeps what it kept
/// before (one exact-size allocation of 32 bytes per subscription) while lookups are a binary search
/// (small) or a hash (large), never a scan.
enum Subs {
    /// Sorted by channel name, exactly sized.
    Small(Box<[Sub]>),
    // Boxed on purpose: a bare map (48 bytes) would triple what every idle connection holds here.
    #[allow(clippy::box_collection)]
    Large(Box<std::collections::HashMap<Arc<str>, Sub>>),
}

impl Default for Subs {
    fn default() -> Subs {
        Subs::Small(Box::default())
    }
}

impl Subs {
    fn len(&self) -> usize {
        match self {
            Subs::Small(s) => s.len(),
            Subs::Large(m) => m.len(),
        }
    }

    fn get(&self, channel: &str) -> Option<&Sub> {
        match self {
            Subs::Small(s) => s.binary_search_by(|x| (*x.channel).cmp(channel)).ok().map(|i| &s[i]),
            Subs::Large(m) => m.get(channel),
        }
    }

    fn get_mut(&mut self, channel: &str) -> Option<&mut Sub> {
        match self {
            Subs::Small(s) => s.binary_search_by(|x| (*x.channel).cmp(channel)).ok().map(|i| &mut s[i]),
            Subs::Large(m) => m.get_mut(channel),
        }
    }

    fn insert(&mut self, sub: Sub) {
        match self {
            Subs::Small(s) if s.len() < SMALL_SUBS => {
                let at = s.binary_search_by(|x| (*x.channel).cmp(&sub.channel)).unwrap_or_else(|i| i);
                let mut v = std::mem::take(s).into_vec();
                v.reserve_exact(1);
                v.insert(at, sub);
                *s = v.into_boxed_slice();
            }
            Subs::Small(s) => {
                let mut m: std::collections::HashMap<Arc<str>, Sub> =
                    std::mem::take(s).into_vec().into_iter().map(|x| (x.channel.clone(), x)).collect();
                m.insert(sub.channel.clone(), sub);
                *self = Subs::Large(Box::new(m));
            }
            Subs::Large(m) => {
                m.insert(sub.channel.clone(), sub);
            }
        }
    }

    fn remove(&mut self, channel: &str) -> Option<Sub> {
        match self {
            Subs::Small(s) => {
                let at = s.binary_search_by(|x| (*x.channel).cmp(channel)).ok()?;
                let mut v = std::mem::take(s).into_vec();
                let sub = v.remove(at);
                *s = v.into_boxed_slice();
                Some(sub)
            }
            Subs::Large(m) => m.remove(channel),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &Sub> + '_> {
        match self {
            Subs::Small(s) => Box::new(s.iter()),
            Subs::Large(m) => Box::new(m.values()),
        }
    }

    fn drain(&mut self) -> Vec<Sub> {
        match std::mem::take(self) {
            Subs::Small(s) => s.into_vec(),
            Subs::Large(m) => m.into_values().collect(),
        }
    }
}

/// Who the token said the client is (anonymous clients have none).
/// What only some sessions need, boxed: who the client is (a token's user and info; absent for an
/// anonymous client) and, while it matters, its command bucket. An anonymous client under
/// `client_command_rate` gets one of these (with an empty user) once it sends commands, and gives it back
/// at a pong that finds its bucket full again.
#[derive(Default)]
struct Identity {
    user: String,
    conn_info: Bytes,
    /// Boxed once more: only while the client has spent tokens, and this struct stays 64.
    buckets: Option<Box<Buckets>>,
}

/// A session's rate-limit state, while it has any.
#[derive(Debug, Default)]
struct Buckets {
    /// `client_command_rate`.
    commands: Option<CommandBucket>,
    /// `client_channel_publish_rate`: a bucket per channel the client published to lately (empty for a
    /// client that never publishes).
    publications: ChannelBuckets,
}

/// `client_command_rate`, `client_command_burst` and `client_flood_disconnect_after`, as a GCRA's
/// parameters (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandQuota {
    /// Time one token takes to come back.
    interval_us: u64,
    /// How far ahead of now the bucket may run: (burst − 1) intervals.
    tolerance_us: u64,
    /// A client refused this long without its bucket filling up again is disconnected; 0: never.
    flood_after_us: u64,
}

impl CommandQuota {
    /// `None` when `rate` is 0 (unlimited). `burst` 0 means the rate.
    pub fn new(rate: u32, burst: u32, flood_after: std::time::Duration) -> Option<CommandQuota> {
        if rate == 0 {
            return None;
        }
        let burst = if burst == 0 { rate } else { burst };
        let interval_us = (1_000_000 / u64::from(rate)).max(1);
        Some(CommandQuota {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(burst) - 1),
            flood_after_us: u64::try_from(flood_after.as_micros()).unwrap_or(u64::MAX),
        })
    }
}

/// One client's command bucket, as a GCRA (the governor crate's algorithm, in 16 bytes rather than a
/// limiter per connection): the theoretical arrival time of the next command. A bucket whose time is
/// not ahead of now is full, the same as no bucket at all.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CommandBucket {
    tat_us: u64,
    /// Since when its commands have been refused (0: they are not), for the flood disconnect.
    refused_since_us: u64,
}

/// What the bucket says of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Throttle {
    Run,
    /// Answer 111; `first` when this starts a run of refusals (logged once).
    Refuse {
        first: bool,
    },
    /// Refused for `client_flood_disconnect_after`: disconnect 3013.
    Flood,
}

impl CommandBucket {
    /// Full again: holding it is the same as holding none (the TCP connection gives it back then).
    pub(crate) fn is_full(&self, now_us: u64) -> bool {
        self.tat_us <= now_us
    }

    pub(crate) fn check(&mut self, q: &CommandQuota, now_us: u64) -> Throttle {
        let tat = self.tat_us.max(now_us);
        if tat - now_us <= q.tolerance_us {
            // The run of refusals ends once the bucket was full again, not at the first token a flooding
            // client gets back (a flood at twice the rate gets every other token).
            if self.tat_us <= now_us {
                self.refused_since_us = 0;
            }
            self.tat_us = tat + q.interval_us;
            return Throttle::Run;
        }
        if self.refused_since_us == 0 {
            self.refused_since_us = now_us;
            return Throttle::Refuse { first: true };
        }
        if q.flood_after_us > 0 && now_us - self.refused_since_us >= q.flood_after_us {
            return Throttle::Flood;
        }
        Throttle::Refuse { first: false }
    }
}

/// Most channels one connection holds a non-full publication bucket for at once: a publication to yet
/// another channel is refused 111 until one of them is full again (it bounds the state a client can make
/// us keep; the limit of a client that publishes to a few channels is never reached).
pub(crate) const MAX_PUBLISH_CHANNELS: usize = 256;

/// One connection's `client_channel_publish_rate` buckets, one per channel it published to while that
/// channel's bucket is not full again: (a 64-bit hash of the channel, its GCRA). A lookup is a scan of a
/// few entries; a publication to a channel already here allocates nothing; a new channel first drops the
/// buckets that are full again (the same as having none), so the vector holds only channels the client
/// is publishing to now. Two channels whose hashes collide share a bucket (stricter, never looser).
#[derive(Debug, Default)]
pub(crate) struct ChannelBuckets {
    entries: Vec<(u64, CommandBucket)>,
}

impl ChannelBuckets {
    /// Whether a publication to `channel` may run now (and spends its token if so).
    pub(crate) fn allow(&mut self, channel: &str, q: &CommandQuota, now_us: u64) -> bool {
        let key = channel_key(channel);
        if let Some((_, bucket)) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            return bucket.check(q, now_us) == Throttle::Run;
        }
        self.entries.retain(|(_, b)| !b.is_full(now_us));
        if self.entries.len() >= MAX_PUBLISH_CHANNELS {
            return false;
        }
        let mut bucket = CommandBucket::default();
        let run = bucket.check(q, now_us) == Throttle::Run;
        self.entries.push((key, bucket));
        run
    }

    /// Every bucket is full again: holding these is the same as holding none.
    pub(crate) fn all_full(&self, now_us: u64) -> bool {
        self.entries.iter().all(|(_, b)| b.is_full(now_us))
    }
}

fn channel_key(channel: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(channel)
}

/// Microseconds since the first call, plus one (so 0 never is a time): the command buckets' clock.
pub(crate) fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
}

pub struct Session {
    pub shared: Arc<ClientShared>,
    node: Arc<Node>,
    identity: Option<Box<Identity>>,
    /// Unix seconds when the connection's token expires (`None`: never; a token's 0 is stored as
    /// `i64::MIN`, long expired either way).
    expires_at: Option<NonZeroI64>,
    subs: Subs,
    /// Heartbeat settings announced in the connect reply (seconds).
    ping_interval: u32,
    connected: bool,
    /// The client answered the last server ping (an empty command).
    pub pong_received: bool,
    /// Some subscription has a token expiry (so pongs check for expired subscriptions).
    expiring_subs: bool,
}

fn expiry(unix_secs: Option<i64>) -> Option<NonZeroI64> {
    unix_secs.map(|t| NonZeroI64::new(t).unwrap_or(NonZeroI64::MIN))
}

thread_local! {
    /// Decoded commands of the message being handled. Per worker thread, not per session: a `Command` is
    /// ~650 bytes, and a buffer of them kept by every idle session cost kilobytes per connection.
    static COMMANDS: std::cell::RefCell<Vec<Command>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn error_reply(id: u32, code: ErrorCode) -> Reply {
    Reply::error(id, code.to_message())
}

/// Seconds left until `at`, for a reply's `ttl` (clamped to what the field holds).
fn ttl(at: i64) -> u32 {
    at.saturating_sub(now_unix()).clamp(0, i64::from(u32::MAX)) as u32
}

/// Seconds a client has past its subscription token's `exp` to send a `sub_refresh` before the
/// subscription ends (Centrifugo's `client_expired_sub_close_delay`, 25 s by default).
pub const EXPIRED_SUB_CLOSE_DELAY: i64 = 25;

impl Session {
    pub fn new(node: Arc<Node>, shared: Arc<ClientShared>, ping_interval: u32) -> Session {
        Session {
            shared,
            node,
            identity: None,
            expires_at: None,
            subs: Subs::default(),
            ping_interval,
            connected: false,
            pong_received: true,
            expiring_subs: false,
        }
    }

    /// The user id from the token ("" for anonymous clients).
    fn user(&self) -> &str {
        self.identity.as_ref().map_or("", |i| &i.user)
    }

    pub fn format(&self) -> Format {
        self.shared.format()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The payload of a server ping: an empty reply.
    pub fn ping_payload(&self) -> Bytes {
        let mut out = BytesMut::new();
        // An empty reply always encodes.
        let _ = encode_reply(self.format(), &Reply::server_ping(), &mut out);
        out.freeze()
    }

    fn client_info(&self, chan_info: Bytes) -> ClientInfo {
        ClientInfo {
            user: self.user().to_string(),
            client: self.shared.id.to_string(),
            conn_info: self.identity.as_ref().map(|i| i.conn_info.clone()).unwrap_or_default(),
            chan_info,
        }
    }

    /// Handles one received WebSocket message; replies are appended to `replies` (one frame's payload).
    ///
    /// `backlog` is what the connection already holds for this client and has not written (its own queue
    /// and unwritten replies); with what publishers queued in [`ClientShared`], it counts against
    /// `client_queue_max_size` together with these replies. Once they pass it the client is disconnected
    /// as slow (3008), as Centrifugo does when its write queue (pushes and replies alike) overflows: the
    /// rest of the frame is not run and the replies are dropped.
    pub fn on_message(&mut self, payload: &[u8], replies: &mut BytesMut, backlog: usize) -> Result<(), DisconnectCode> {
        // Taken out of the thread-local for the duration (handling never re-enters it), then put back.
        let mut commands = COMMANDS.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let result = self.run(payload, replies, &mut commands, backlog);
        commands.clear();
        if commands.capacity() <= 64 {
            COMMANDS.with(|c| *c.borrow_mut() = commands);
        }
        result
    }

    fn run(
        &mut self,
        payload: &[u8],
        replies: &mut BytesMut,
        commands: &mut Vec<Command>,
        backlog: usize,
    ) -> Result<(), DisconnectCode> {
        let limit = self.shared.max_queue();
        let queued = backlog.saturating_add(self.shared.queued_bytes());
        // The frame's size is bounded by the WebSocket layer (`max_message_size`, before buffering); here
        // only the number of commands decoded at once is.
        let mut pos = 0;
        let mut over_cap = false;
        let mut ponged = false;
        // One clock read per frame, and only with a command rate configured.
        let limits = self.node.policy().client_limits;
        let now = (limits.commands.is_some() || limits.publications.is_some()).then(now_us);
        loop {
            decode_commands_from(self.format(), payload, &mut pos, MAX_COMMANDS_PER_FRAME, commands).map_err(|e| {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => e.label()).increment(1);
                tracing::info!(client = %self.shared.id, error = %e, "disconnecting: malformed command");
                e.disconnect()
            })?;
            metrics::counter!("ringcast_messages_in_total").increment(commands.len() as u64);
            for cmd in commands.iter_mut() {
                ponged |= cmd.id == 0 && cmd.send.is_none();
                // Commands past the per-frame cap are not counted against the rate (short circuit).
                let reply = if over_cap || self.throttled(cmd, now)? {
                    self.refuse_over_cap(cmd)
                } else {
                    self.cap_request(cmd);
                    match self.handle(cmd) {
                        Outcome::Reply(reply) => Some(reply),
                        Outcome::Error(code) => Some(error_reply(cmd.id, code)),
                        Outcome::Disconnect(code) => return Err(code),
                        Outcome::Silent => None,
                    }
                };
                let Some(reply) = reply else { continue };
                // Checked before encoding, so one huge reply (a history of large publications, a crowded
                // presence) is never built in full: its payloads alone would pass the limit.
                let room = limit.saturating_sub(queued.saturating_add(replies.len()));
                if payload_len(&reply) > room {
                    return Err(self.slow(queued + replies.len() + payload_len(&reply)));
                }
                if encode_reply(self.format(), &reply, replies).is_err() {
                    return Err(DisconnectCode::SERVER_ERROR);
                }
                if queued + replies.len() > limit {
                    return Err(self.slow(queued + replies.len()));
                }
            }
            if pos >= payload.len() {
                break;
            }
            if !over_cap {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => "too_many_commands")
                    .increment(1);
                tracing::info!(client = %self.shared.id, limit = MAX_COMMANDS_PER_FRAME, "commands over the per-frame limit answered 111");
            }
            over_cap = true;
        }
        if let (true, Some(now)) = (ponged, now) {
            self.drop_full_bucket(now);
        }
        // Every live client answers our ping once per ping interval: the moment to end subscriptions whose
        // token expired (an exact timer needs the connection to arm one at `sub_expires_in`).
        if ponged && self.expiring_subs {
            for push in self.expire_subscriptions(now_unix())? {
                if encode_reply(self.format(), &Reply::push(push), replies).is_err() {
                    return Err(DisconnectCode::SERVER_ERROR);
                }
            }
        }
        Ok(())
    }

    /// Whether `client_command_rate` refuses this command (pongs are never counted); a client refused for
    /// `client_flood_disconnect_after` is disconnected 3013.
    fn throttled(&mut self, cmd: &Command, now: Option<u64>) -> Result<bool, DisconnectCode> {
        let (Some(quota), Some(now)) = (self.node.policy().client_limits.commands, now) else { return Ok(false) };
        if cmd.request().is_none() {
            return Ok(false);
        }
        let identity = self.identity.get_or_insert_with(Box::default);
        let bucket = identity.buckets.get_or_insert_with(Box::default).commands.get_or_insert_with(Default::default);
        match bucket.check(&quota, now) {
            Throttle::Run => Ok(false),
            Throttle::Refuse { first } => {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => "command_rate").increment(1);
                if first {
                    tracing::info!(client = %self.shared.id, "commands over client_command_rate answered 111");
                }
                Ok(true)
            }
            Throttle::Flood => {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => "command_flood").increment(1);
                tracing::info!(client = %self.shared.id, "disconnecting: over client_command_rate for client_flood_disconnect_after");
                Err(DisconnectCode::TOO_MANY_REQUESTS)
            }
        }
    }

    /// Whether `client_channel_publish_rate` lets this client publish to `channel` now. Nothing is kept
    /// for a client until it publishes with the limit on.
    fn publication_allowed(&mut self, channel: &str) -> bool {
        let Some(quota) = self.node.policy().client_limits.publications else { return true };
        let now = now_us();
        let identity = self.identity.get_or_insert_with(Box::default);
        let buckets = &mut identity.buckets.get_or_insert_with(Box::default).publications;
        if buckets.allow(channel, &quota, now) {
            return true;
        }
        metrics::counter!("ringcast_client_protocol_errors_total", "reason" => "channel_publish_rate").increment(1);
        tracing::debug!(client = %self.shared.id, channel, "publication over client_channel_publish_rate answered 111");
        false
    }

    /// Gives back a command bucket that is full again (and the box that held it, for an anonymous client):
    /// a quiet client holds no limiter state.
    fn drop_full_bucket(&mut self, now: u64) {
        let Some(identity) = self.identity.as_deref_mut() else { return };
        if identity
            .buckets
            .as_ref()
            .is_some_and(|b| b.commands.as_ref().is_none_or(|c| c.tat_us <= now) && b.publications.all_full(now))
        {
            identity.buckets = None;
        }
        if identity.buckets.is_none() && identity.user.is_empty() && identity.conn_info.is_empty() {
            self.identity = None;
        }
    }

    /// A command past [`MAX_COMMANDS_PER_FRAME`], or over `client_command_rate`: not run; answered "too many
    /// requests" if it expects a reply.
    fn refuse_over_cap(&mut self, cmd: &Command) -> Option<Reply> {
        match cmd.request() {
            None => {
                self.pong_received = true;
                None
            }
            Some(_) if cmd.id == 0 => None,
            Some(_) => Some(error_reply(cmd.id, ErrorCode::TOO_MANY_REQUESTS)),
        }
    }

    /// Lowers what a command may ask for to the node's limits (Centrifugo's `history_max_publication_limit`:
    /// a history without a limit, or over it, gets the limit).
    fn cap_request(&self, cmd: &mut Command) {
        let cap = self.node.policy().client_limits.history_max_publication_limit;
        if let Some(h) = cmd.history.as_mut() {
            let cap = i32::try_from(cap).unwrap_or(i32::MAX);
            if cap > 0 && (h.limit < 0 || h.limit > cap) {
                h.limit = cap;
            }
        }
    }

    /// The backlog passed `client_queue_max_size`: nothing more is queued for this client (its shared
    /// queue is dropped and closed), and the connection closes with 3008.
    fn slow(&self, backlog: usize) -> DisconnectCode {
        metrics::counter!(crate::metrics::SLOW_DISCONNECTS_TOTAL).increment(1);
        tracing::info!(client = %self.shared.id, backlog, limit = self.shared.max_queue(), "disconnecting slow client: replies over the queue limit");
        let d = DisconnectCode::SLOW;
        self.shared.request_disconnect(d.code, d.reason);
        d
    }

    /// Decides what one command does, as Centrifugo's `client.go` dispatches it.
    pub fn handle(&mut self, cmd: &Command) -> Outcome {
        let id = cmd.id;
        let request = cmd.request();
        if !self.connected {
            // Nothing but a connect (with an id) before the connect.
            return match request {
                Some(Request::Connect(req)) if id != 0 => self.connect(id, req),
                _ => Outcome::Disconnect(DisconnectCode::BAD_REQUEST),
            };
        }
        let request = match request {
            // Asynchronous: no reply, whatever its id.
            Some(Request::Send(_)) => return Outcome::Silent,
            // Id 0 is the pong (what else it carries is not looked at, as in Centrifugo).
            _ if id == 0 => return self.pong(),
            Some(request) => request,
            // An id but no method we know: the client cannot be answered in a way it understands.
            None => return Outcome::Disconnect(DisconnectCode::BAD_REQUEST),
        };
        let result = match request {
            Request::Connect(_) => Err(Refusal::Disconnect(DisconnectCode::BAD_REQUEST)),
            Request::Subscribe(req) => self.subscribe(req).map(|r| Reply { subscribe: Some(r), ..Default::default() }),
            Request::Unsubscribe(req) => required(&req.channel).map(|channel| {
                self.unsubscribe(channel);
                Reply { unsubscribe: Some(UnsubscribeResult {}), ..Default::default() }
            }),
            Request::Publish(req) => self
                .publish(&req.channel, req.data.clone())
                .map(|()| Reply { publish: Some(PublishResult {}), ..Default::default() }),
            Request::Presence(req) => self
                .presence(&req.channel)
                .map(|presence| Reply { presence: Some(PresenceResult { presence }), ..Default::default() }),
            Request::PresenceStats(req) => self.presence_stats(&req.channel).map(|(num_clients, num_users)| Reply {
                presence_stats: Some(PresenceStatsResult { num_clients, num_users }),
                ..Default::default()
            }),
            Request::History(req) => self.history(req).map(|h| Reply { history: Some(h), ..Default::default() }),
            Request::Ping(_) => Ok(Reply { ping: Some(Default::default()), ..Default::default() }),
            Request::Refresh(req) => self.refresh(&req.token).map(|r| Reply { refresh: Some(r), ..Default::default() }),
            Request::SubRefresh(req) => {
                self.sub_refresh(&req.channel, &req.token).map(|r| Reply { sub_refresh: Some(r), ..Default::default() })
            }
            Request::Send(_) => return Outcome::Silent,
            Request::Rpc(_) => Err(ErrorCode::METHOD_NOT_FOUND.into()),
        };
        match result {
            Ok(reply) => Outcome::Reply(Reply { id, ..reply }),
            Err(Refusal::Error(code)) => Outcome::Error(code),
            Err(Refusal::Disconnect(code)) => Outcome::Disconnect(code),
        }
    }

    /// The client's answer to our ping. One we did not ask for is a protocol violation (Centrifugo:
    /// "unnecessary pong").
    fn pong(&mut self) -> Outcome {
        if self.pong_received {
            return Outcome::Disconnect(DisconnectCode::BAD_REQUEST);
        }
        self.pong_received = true;
        Outcome::Silent
    }

    fn connect(&mut self, id: u32, req: &ConnectRequest) -> Outcome {
        let mut channels = Vec::new();
        let policy = self.node.policy();
        if req.token.is_empty() {
            if !policy.allow_anonymous {
                tracing::info!(client = %self.shared.id, "disconnecting: connect without a token");
                return Outcome::Disconnect(DisconnectCode::INVALID_TOKEN);
            }
        } else {
            let Some(verifier) = &policy.tokens else {
                return Outcome::Disconnect(DisconnectCode::INVALID_TOKEN);
            };
            match verifier.verify_connect(&req.token, now_unix()) {
                Ok(claims) => {
                    if !claims.user.is_empty() || !claims.info.is_empty() {
                        // Kept if there is one already: it may hold the command bucket.
                        let identity = self.identity.get_or_insert_with(Box::default);
                        identity.user = claims.user;
                        identity.conn_info = claims.info;
                    }
                    self.expires_at = expiry(claims.expires_at);
                    channels = claims.channels;
                }
                Err(e) => {
                    metrics::counter!("ringcast_auth_failures_total", "kind" => "connect").increment(1);
                    tracing::info!(client = %self.shared.id, error = %e, "connect token rejected");
                    return match e.for_connect() {
                        crate::policy::auth::Outcome::Error(code) => Outcome::Error(code),
                        crate::policy::auth::Outcome::Disconnect(code) => Outcome::Disconnect(code),
                    };
                }
            }
        }
        if !self.node.try_register_client(self.user(), &self.shared) {
            tracing::info!(client = %self.shared.id, user = self.user(), "disconnecting: user connection limit reached");
            return Outcome::Disconnect(DisconnectCode::CONNECTION_LIMIT);
        }
        self.connected = true;
        let mut result = ConnectResult {
            client: self.shared.id.to_string(),
            version: VERSION.to_string(),
            ping: self.ping_interval,
            pong: true,
            ..Default::default()
        };
        if let Some(at) = self.expires_at {
            result.expires = true;
            result.ttl = ttl(at.get());
        }
        // Server-side subscriptions from the token's `channels` claim.
        for channel in channels {
            let sub = SubscribeRequest { channel: channel.clone(), ..Default::default() };
            if let Ok(r) = self.do_subscribe(&sub, true) {
                result.subs.insert(channel, r);
            }
        }
        Outcome::Reply(Reply { id, connect: Some(result), ..Default::default() })
    }

    /// Runs a command from the server API; returns the push to send the client, if any.
    pub fn server_command(&mut self, command: crate::pubsub::client::ServerCommand) -> Option<Push> {
        use crate::pubsub::client::ServerCommand;
        match command {
            ServerCommand::Subscribe(channel) => {
                let req = SubscribeRequest { channel: channel.clone(), ..Default::default() };
                let r = self.do_subscribe(&req, true).ok()?;
                Some(Push {
                    channel,
                    subscribe: Some(Subscribe {
                        recoverable: r.recoverable,
                        epoch: r.epoch,
                        offset: r.offset,
                        positioned: r.positioned,
                        data: Bytes::new(),
                    }),
                    ..Default::default()
                })
            }
            ServerCommand::Unsubscribe(channel) => {
                self.subs.get(&channel)?;
                self.unsubscribe(&channel);
                Some(Push {
                    channel,
                    unsubscribe: Some(Unsubscribe { code: 2000, reason: "server unsubscribe".into() }),
                    ..Default::default()
                })
            }
            ServerCommand::Resubscribe(channel) => {
                self.subs.get(&channel)?;
                self.unsubscribe(&channel);
                Some(Push {
                    channel,
                    unsubscribe: Some(Unsubscribe { code: 2500, reason: "insufficient state".into() }),
                    ..Default::default()
                })
            }
            ServerCommand::Refresh { expire_at, expired } => {
                self.expires_at = expiry(if expired { Some(now_unix()) } else { expire_at });
                None
            }
        }
    }

    /// Seconds until the connection expires (`None`: never).
    pub fn expires_in(&self) -> Option<i64> {
        self.expires_at.map(|e| e.get().saturating_sub(now_unix()))
    }

    /// Seconds until [`Session::expire_subscriptions`] has something to end (`None`: no subscription
    /// expires). The connection arms its timer for it, as for [`Session::expires_in`].
    pub fn sub_expires_in(&self) -> Option<i64> {
        self.subs
            .iter()
            .filter_map(Sub::expires_at)
            .min()
            .map(|at| at.saturating_add(EXPIRED_SUB_CLOSE_DELAY).saturating_sub(now_unix()))
    }

    /// Ends the subscriptions whose token expired more than [`EXPIRED_SUB_CLOSE_DELAY`] before `now`
    /// (Unix seconds) without a `sub_refresh`, as Centrifugo does: a client-side subscription gets an
    /// unsubscribe push with code 2501 ("subscription expired"; the SDK resubscribes, fetching a new
    /// token), a server-side one disconnects 3006. The connection sends the pushes (or closes).
    pub fn expire_subscriptions(&mut self, now: i64) -> Result<Vec<Push>, DisconnectCode> {
        let expired: Vec<(Arc<str>, bool)> = self
            .subs
            .iter()
            .filter(|s| s.expires_at().is_some_and(|at| at.saturating_add(EXPIRED_SUB_CLOSE_DELAY) < now))
            .map(|s| (s.channel.clone(), s.server_side))
            .collect();
        if expired.iter().any(|(_, server_side)| *server_side) {
            return Err(DisconnectCode::SUB_EXPIRED);
        }
        if !expired.is_empty() {
            self.expiring_subs = self.subs.iter().any(|s| s.expires_at().is_some());
        }
        let mut pushes = Vec::with_capacity(expired.len());
        for (channel, _) in expired {
            self.unsubscribe(&channel);
            pushes.push(Push {
                channel: channel.to_string(),
                unsubscribe: Some(Unsubscribe { code: 2501, reason: "subscription expired".into() }),
                ..Default::default()
            });
        }
        Ok(pushes)
    }

    /// Verifies a subscription token; `refresh` picks the `sub_refresh` outcomes over the `subscribe` ones.
    fn verify_sub_token(
        &self,
        token: &str,
        channel: &str,
        refresh: bool,
    ) -> Result<crate::policy::auth::SubscribeClaims, Refusal> {
        let policy = self.node.policy();
        let verifier = policy.tokens.as_ref().ok_or(ErrorCode::PERMISSION_DENIED)?;
        verifier.verify_subscribe(token, self.user(), channel, now_unix()).map_err(|e| {
            metrics::counter!("ringcast_auth_failures_total", "kind" => if refresh { "sub_refresh" } else { "subscribe" })
                .increment(1);
            Refusal::from(if refresh { e.for_sub_refresh() } else { e.for_subscribe() })
        })
    }

    fn subscribe(&mut self, req: &SubscribeRequest) -> Result<SubscribeResult, Refusal> {
        required(&req.channel)?;
        self.do_subscribe(req, false)
    }

    /// Subscribes this client; `server_side` skips the client permission checks (token `channels`, the
    /// server API) and asks for no optional features, as Centrifugo's server-side subscriptions.
    fn do_subscribe(&mut self, req: &SubscribeRequest, server_side: bool) -> Result<SubscribeResult, Refusal> {
        let channel = req.channel.as_str();
        let node = self.node.clone();
        let opts = node.options(channel)?;
        let opts = &*opts;
        if self.subs.get(channel).is_some() {
            return Err(ErrorCode::ALREADY_SUBSCRIBED.into());
        }
        let limit = node.policy().client_channel_limit;
        if limit > 0 && self.subs.len() >= limit {
            return Err(ErrorCode::LIMIT_EXCEEDED.into());
        }
        let mut extra = None;
        let mut requested = Requested::default();
        if !server_side {
            let has_token = if req.token.is_empty() {
                false
            } else {
                let claims = self.verify_sub_token(&req.token, channel, false)?;
                if claims.expires_at.is_some_and(|at| at <= now_unix()) {
                    return Err(ErrorCode::EXPIRED.into());
                }
                extra = Some(Box::new(SubExtra { chan_info: claims.info, expires_at: claims.expires_at }));
                true
            };
            namespace::can_subscribe(opts, channel, self.user(), has_token).map_err(|d| d.error_code())?;
            requested =
                Requested { recoverable: req.recoverable, positioned: req.positioned, join_leave: req.join_leave };
        }
        let features = namespace::features(opts, self.user(), requested);
        let Features { recoverable, positioned, .. } = features;
        let history = Node::history_options(opts);
        let recovering = req.recover && recoverable;
        let remote = node.remote.is_some().then(|| {
            let positioning = if recovering {
                Positioning::Recover(req.offset, req.epoch.clone())
            } else if positioned {
                Positioning::Position
            } else {
                Positioning::None
            };
            node.subscribe_remote(channel, &self.shared, positioning, history, |p| {
                let mut r = SubscribeResult { recoverable, positioned, ..Default::default() };
                if recovering {
                    r.was_recovering = true;
                    r.recovered = p.recovered;
                    r.publications = p.publications;
                }
                if recovering || positioned {
                    r.epoch = p.epoch;
                    r.offset = p.offset;
                }
                r
            })
        });
        let (mut result, name) = if let Some(remote) = remote {
            remote?
        } else {
            node.hub.subscribe_with(
                channel,
                &self.shared,
                || node.broker.subscribe_node(channel),
                || {
                    let mut r = SubscribeResult { recoverable, positioned, ..Default::default() };
                    if recovering {
                        r.was_recovering = true;
                        let filter =
                            HistoryFilter { since: Some((req.offset, req.epoch.clone())), limit: -1, reverse: false };
                        match node.broker.history(channel, &filter) {
                            Ok((missed, pos)) => {
                                // The epoch must be the stream's: a history read takes an empty one as "any"
                                // (as Centrifugo's API does), a recovery never does.
                                r.recovered = *pos.epoch == *req.epoch && recovery_complete(&missed, req.offset, &pos);
                                if r.recovered {
                                    r.publications = missed;
                                }
                                r.epoch = pos.epoch.to_string();
                                r.offset = pos.offset;
                            }
                            Err(_) => {
                                let pos = node.broker.position(channel, history);
                                r.epoch = pos.epoch.to_string();
                                r.offset = pos.offset;
                            }
                        }
                    } else if positioned {
                        let pos = node.broker.position(channel, history);
                        r.epoch = pos.epoch.to_string();
                        r.offset = pos.offset;
                    }
                    Ok::<_, ErrorCode>(r)
                },
            )?
        };
        if recovering {
            metrics::counter!("ringcast_recoveries_total", "recovered" => if result.recovered { "true" } else { "false" })
                .increment(1);
        }
        if let Some(at) = extra.as_ref().and_then(|e| e.expires_at) {
            result.expires = true;
            result.ttl = ttl(at);
        }
        let info = self.client_info(extra.as_ref().map(|e| e.chan_info.clone()).unwrap_or_default());
        if features.presence {
            node.add_presence(channel, self.shared.id, info.clone());
        }
        if features.push_join_leave {
            node.hub.listen_join_leave(&name, &self.shared);
        }
        if features.emit_join_leave {
            node.join(channel, &info, &self.shared);
        }
        // Token info or expiry are what most subscriptions lack: no box for them.
        let extra = extra.filter(|e| !e.chan_info.is_empty() || e.expires_at.is_some());
        self.expiring_subs |= extra.as_ref().is_some_and(|e| e.expires_at.is_some());
        self.subs.insert(Sub {
            channel: name,
            extra,
            presence: features.presence,
            join_leave: features.emit_join_leave,
            push_join_leave: features.push_join_leave,
            server_side,
        });
        metrics::gauge!("ringcast_subscriptions").increment(1.0);
        Ok(result)
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Some(sub) = self.subs.remove(channel) {
            self.leave(&sub, false);
        }
    }

    /// `ended`: the session is being dropped (its connection is gone), so nothing waits on the engine.
    fn leave(&self, sub: &Sub, ended: bool) {
        if self.node.hub.unsubscribe(&sub.channel, &self.shared, || self.node.broker.unsubscribe_node(&sub.channel)) {
            self.node.left(&sub.channel);
        }
        if sub.presence && ended {
            self.node.remove_presence_of_ended(&sub.channel, self.shared.id);
        } else if sub.presence {
            self.node.remove_presence(&sub.channel, self.shared.id);
        }
        if sub.push_join_leave {
            // (The hub forgets its join/leave listener with the subscription.)
        }
        if sub.join_leave {
            self.node.leave(&sub.channel, &self.client_info(sub.chan_info()), &self.shared);
        }
        metrics::gauge!("ringcast_subscriptions").decrement(1.0);
    }

    fn publish(&mut self, channel: &str, data: Bytes) -> Result<(), Refusal> {
        let channel = required(channel)?;
        let opts = self.node.options(channel)?;
        let opts = &*opts;
        namespace::can_publish(opts, self.user(), self.subs.get(channel).is_some()).map_err(|d| d.error_code())?;
        if !self.publication_allowed(channel) {
            return Err(ErrorCode::TOO_MANY_REQUESTS.into());
        }
        let sub = self.subs.get(channel);
        let info = self.client_info(sub.map(Sub::chan_info).unwrap_or_default());
        self.node.publish(channel, data, Some(info))?;
        Ok(())
    }

    fn presence(&self, channel: &str) -> Result<std::collections::BTreeMap<String, ClientInfo>, Refusal> {
        let channel = required(channel)?;
        let opts = self.node.options(channel)?;
        let opts = &*opts;
        namespace::can_presence(opts, self.user(), self.subs.get(channel).is_some()).map_err(|d| d.error_code())?;
        Ok(self.node.presence(channel)?)
    }

    fn presence_stats(&self, channel: &str) -> Result<(u32, u32), Refusal> {
        let channel = required(channel)?;
        let opts = self.node.options(channel)?;
        let opts = &*opts;
        namespace::can_presence(opts, self.user(), self.subs.get(channel).is_some()).map_err(|d| d.error_code())?;
        Ok(self.node.presence_stats(channel)?)
    }

    fn history(&self, req: &ringcast_protocol::messages::HistoryRequest) -> Result<HistoryResult, Refusal> {
        let channel = required(&req.channel)?;
        let opts = self.node.options(channel)?;
        let opts = &*opts;
        namespace::can_history(opts, self.user(), self.subs.get(channel).is_some()).map_err(|d| d.error_code())?;
        let filter = HistoryFilter {
            since: req.since.as_ref().map(|s| (s.offset, s.epoch.clone())),
            limit: req.limit,
            reverse: req.reverse,
        };
        let (publications, pos) = self.node.history(channel, &filter)?;
        Ok(HistoryResult { publications, epoch: pos.epoch.to_string(), offset: pos.offset })
    }

    /// `sub_refresh`: a new subscription token for a channel the client is subscribed to moves the
    /// subscription's expiry (and its info).
    fn sub_refresh(&mut self, channel: &str, token: &str) -> Result<SubRefreshResult, Refusal> {
        let channel = required(channel)?;
        if self.subs.get(channel).is_none() {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        if token.is_empty() {
            return Err(ErrorCode::BAD_REQUEST.into());
        }
        let claims = self.verify_sub_token(token, channel, true)?;
        let mut result = SubRefreshResult::default();
        if let Some(at) = claims.expires_at {
            if at <= now_unix() {
                return Err(ErrorCode::EXPIRED.into());
            }
            result.expires = true;
            result.ttl = ttl(at);
        }
        self.expiring_subs |= claims.expires_at.is_some();
        if let Some(sub) = self.subs.get_mut(channel) {
            sub.extra = (!claims.info.is_empty() || claims.expires_at.is_some())
                .then(|| Box::new(SubExtra { chan_info: claims.info, expires_at: claims.expires_at }));
        }
        Ok(result)
    }

    /// `refresh`: a new connection token for the same user moves the connection's expiry. An expired
    /// token disconnects 3005, an invalid one (or another user's) 3500, as Centrifugo.
    fn refresh(&mut self, token: &str) -> Result<RefreshResult, Refusal> {
        if token.is_empty() {
            return Err(Refusal::Disconnect(DisconnectCode::BAD_REQUEST));
        }
        let policy = self.node.policy();
        let verifier = policy.tokens.as_ref().ok_or(ErrorCode::NOT_AVAILABLE)?;
        let claims = verifier.verify_connect(token, now_unix()).map_err(|e| {
            metrics::counter!("ringcast_auth_failures_total", "kind" => "refresh").increment(1);
            Refusal::from(e.for_refresh())
        })?;
        if claims.user != self.user() {
            return Err(Refusal::Disconnect(DisconnectCode::INVALID_TOKEN));
        }
        self.expires_at = expiry(claims.expires_at);
        let mut result =
            RefreshResult { client: self.shared.id.to_string(), version: VERSION.to_string(), ..Default::default() };
        if let Some(at) = self.expires_at {
            result.expires = true;
            result.ttl = ttl(at.get());
        }
        Ok(result)
    }
}

/// The bytes of payload a reply carries (publication data, client info): a lower bound of its encoded size
/// in either format, known without encoding. Zero for replies without such payloads.
fn payload_len(reply: &Reply) -> usize {
    fn info(i: &ClientInfo) -> usize {
        i.user.len() + i.client.len() + i.conn_info.len() + i.chan_info.len()
    }
    fn publications(p: &[ringcast_protocol::Publication]) -> usize {
        p.iter().map(|p| p.data.len() + p.info.as_ref().map_or(0, info)).sum()
    }
    let mut n = 0;
    if let Some(h) = &reply.history {
        n += publications(&h.publications);
    }
    if let Some(s) = &reply.subscribe {
        n += publications(&s.publications);
    }
    if let Some(p) = &reply.presence {
        n += p.presence.iter().map(|(k, v)| k.len() + info(v)).sum::<usize>();
    }
    n
}

impl Drop for Session {
    fn drop(&mut self) {
        for sub in self.subs.drain() {
            self.leave(&sub, true);
        }
        if self.connected {
            self.node.unregister_client(self.user(), &self.shared);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The session's decisions, through [`Outcome`]: no socket, a real node.
    use super::*;
    use crate::broker::MemoryBroker;
    use crate::policy::auth::{make_hs256_subscription_token, make_hs256_token, TokenConfig, TokenVerifier};
    use crate::policy::namespace::{ChannelOptions, NamespaceConfig, Namespaces};
    use crate::pubsub::client::ClientId;
    use ringcast_protocol::messages::{
        HistoryRequest, PresenceRequest, PublishRequest, RefreshRequest, SendRequest, SubRefreshRequest,
        UnsubscribeRequest,
    };

    const SECRET: &str = "session-unit-secret";

    fn node(namespaces: Namespaces) -> Arc<Node> {
        let tokens = TokenVerifier::new(&TokenConfig { hmac_secret: Some(SECRET.into()), ..Default::default() }).ok();
        Arc::new(Node::new(Arc::new(MemoryBroker::new()), namespaces, tokens, true))
    }

    fn session(node: &Arc<Node>) -> Session {
        Session::new(
            node.clone(),
            ClientShared::new(ClientId::random(), crate::transport::Encoding::websocket(Format::Json), 1 << 20),
            25,
        )
    }

    /// A connected session (anonymous when `user` is empty).
    fn connected(node: &Arc<Node>, user: &str) -> Session {
        let mut s = session(node);
        let token = if user.is_empty() { String::new() } else { make_hs256_token(SECRET, user, None, &[]).unwrap() };
        let out = s.handle(&cmd(1, |c| c.connect = Some(ConnectRequest { token, ..Default::default() })));
        assert!(matches!(out, Outcome::Reply(Reply { connect: Some(_), .. })), "{out:?}");
        s
    }

    fn cmd(id: u32, set: impl FnOnce(&mut Command)) -> Command {
        let mut c = Command { id, ..Default::default() };
        set(&mut c);
        c
    }

    fn subscribe(channel: &str) -> Command {
        cmd(7, |c| c.subscribe = Some(SubscribeRequest { channel: channel.into(), ..Default::default() }))
    }

    fn presence(channel: &str) -> Command {
        cmd(8, |c| c.presence = Some(PresenceRequest { channel: channel.into() }))
    }

    fn reported() -> Namespaces {
        let room = ChannelOptions {
            presence: true,
            history_size: 10,
            history_ttl: std::time::Duration::from_secs(60),
            allow_subscribe_for_anonymous: true,
            allow_subscribe_for_client: true,
            ..Default::default()
        };
        Namespaces::new(ChannelOptions::default(), vec![NamespaceConfig { name: "room".into(), options: room }])
            .unwrap()
    }

    #[test]
    fn anything_but_connect_before_connect_disconnects_3501() {
        let n = node(Namespaces::dev_mode());
        let mut s = session(&n);
        assert_eq!(s.handle(&subscribe("news")), Outcome::Disconnect(DisconnectCode::BAD_REQUEST));
        let mut s = session(&n);
        assert_eq!(s.handle(&Command::default()), Outcome::Disconnect(DisconnectCode::BAD_REQUEST), "a pong");
        let mut s = session(&n);
        let id0 = cmd(0, |c| c.connect = Some(ConnectRequest::default()));
        assert_eq!(s.handle(&id0), Outcome::Disconnect(DisconnectCode::BAD_REQUEST), "a connect without an id");
    }

    #[test]
    fn a_command_with_an_id_and_no_known_method_disconnects_3501() {
        let n = node(Namespaces::dev_mode());
        let mut s = connected(&n, "");
        assert_eq!(s.handle(&cmd(2, |_| {})), Outcome::Disconnect(DisconnectCode::BAD_REQUEST));
    }

    #[test]
    fn id_zero_is_the_pong_and_an_unasked_one_disconnects_3501() {
        let n = node(Namespaces::dev_mode());
        let mut s = connected(&n, "");
        s.pong_received = false; // a ping went out
        assert_eq!(s.handle(&cmd(0, |_| {})), Outcome::Silent);
        assert!(s.pong_received);
        let id0_subscribe =
            cmd(0, |c| c.subscribe = Some(SubscribeRequest { channel: "x".into(), ..Default::default() }));
        assert_eq!(s.handle(&id0_subscribe), Outcome::Disconnect(DisconnectCode::BAD_REQUEST), "not executed");
        assert!(s.subs.get("x").is_none());
    }

    #[test]
    fn send_is_silent_whatever_its_id() {
        let n = node(Namespaces::dev_mode());
        let mut s = connected(&n, "");
        assert_eq!(s.handle(&cmd(0, |c| c.send = Some(SendRequest::default()))), Outcome::Silent);
        assert_eq!(s.handle(&cmd(5, |c| c.send = Some(SendRequest::default()))), Outcome::Silent);
    }

    #[test]
    fn the_session_asks_the_namespace_presence_and_history_need_their_permission() {
        let n = node(reported());
        for user in ["", "alice"] {
            let mut s = connected(&n, user);
            assert!(matches!(s.handle(&subscribe("room:1")), Outcome::Reply(_)));
            assert_eq!(s.handle(&presence("room:1")), Outcome::Error(ErrorCode::PERMISSION_DENIED), "{user:?}");
            let history =
                cmd(9, |c| c.history = Some(HistoryRequest { channel: "room:1".into(), ..Default::default() }));
            assert_eq!(s.handle(&history), Outcome::Error(ErrorCode::PERMISSION_DENIED), "{user:?}");
            let publish =
                cmd(10, |c| c.publish = Some(PublishRequest { channel: "room:1".into(), data: Bytes::new() }));
            assert_eq!(s.handle(&publish), Outcome::Error(ErrorCode::PERMISSION_DENIED), "{user:?}");
        }
    }

    #[test]
    fn channel_names_empty_disconnect_too_long_is_107() {
        let n = node(Namespaces::dev_mode().with_max_channel_length(8));
        let mut s = connected(&n, "");
        assert_eq!(s.handle(&subscribe("")), Outcome::Disconnect(DisconnectCode::BAD_REQUEST));
        let mut s = connected(&n, "");
        assert_eq!(s.handle(&subscribe("123456789")), Outcome::Error(ErrorCode::BAD_REQUEST));
        assert_eq!(s.handle(&presence("123456789")), Outcome::Error(ErrorCode::BAD_REQUEST));
        let unsub = cmd(3, |c| c.unsubscribe = Some(UnsubscribeRequest { channel: String::new() }));
        assert_eq!(s.handle(&unsub), Outcome::Disconnect(DisconnectCode::BAD_REQUEST));
    }

    #[test]
    fn client_channel_limit_is_106() {
        let n = Arc::new(
            Node::new(Arc::new(MemoryBroker::new()), Namespaces::dev_mode(), None, true).with_client_channel_limit(2),
        );
        let mut s = connected(&n, "");
        assert!(matches!(s.handle(&subscribe("a")), Outcome::Reply(_)));
        assert!(matches!(s.handle(&subscribe("b")), Outcome::Reply(_)));
        assert_eq!(s.handle(&subscribe("c")), Outcome::Error(ErrorCode::LIMIT_EXCEEDED));
        assert_eq!(s.handle(&subscribe("a")), Outcome::Error(ErrorCode::ALREADY_SUBSCRIBED));
    }

    #[test]
    fn refresh_codes_are_centrifugo_s() {
        let n = node(Namespaces::dev_mode());
        let refresh = |token: String| cmd(4, |c| c.refresh = Some(RefreshRequest { token }));
        let mut s = connected(&n, "u");
        let expired = make_hs256_token(SECRET, "u", Some(now_unix() - 5), &[]).unwrap();
        assert_eq!(s.handle(&refresh(expired)), Outcome::Disconnect(DisconnectCode::EXPIRED));
        assert_eq!(s.handle(&refresh("garbage".into())), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        let other = make_hs256_token(SECRET, "v", None, &[]).unwrap();
        assert_eq!(s.handle(&refresh(other)), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        assert_eq!(s.handle(&refresh(String::new())), Outcome::Disconnect(DisconnectCode::BAD_REQUEST));
        let later = make_hs256_token(SECRET, "u", Some(now_unix() + 100), &[]).unwrap();
        match s.handle(&refresh(later)) {
            Outcome::Reply(Reply { refresh: Some(r), id: 4, .. }) => assert!(r.expires && r.ttl > 90, "{r:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subscription_tokens_expire_and_sub_refresh_moves_the_expiry() {
        let n = node(Namespaces::default());
        let mut s = connected(&n, "u");
        let t = make_hs256_subscription_token(SECRET, "u", "$a", Some(now_unix() + 60)).unwrap();
        let sub =
            cmd(2, |c| c.subscribe = Some(SubscribeRequest { channel: "$a".into(), token: t, ..Default::default() }));
        match s.handle(&sub) {
            Outcome::Reply(Reply { subscribe: Some(r), .. }) => {
                assert!(r.expires && (50..=60).contains(&r.ttl), "{r:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(s.sub_expires_in().is_some_and(|t| t <= 60 + EXPIRED_SUB_CLOSE_DELAY));
        assert_eq!(s.expire_subscriptions(now_unix()), Ok(vec![]), "not yet");
        assert_eq!(s.expire_subscriptions(now_unix() + 70), Ok(vec![]), "within the close delay");
        let t = make_hs256_subscription_token(SECRET, "u", "$a", Some(now_unix() + 600)).unwrap();
        let refresh = cmd(3, |c| c.sub_refresh = Some(SubRefreshRequest { channel: "$a".into(), token: t }));
        match s.handle(&refresh) {
            Outcome::Reply(Reply { sub_refresh: Some(r), .. }) => assert!(r.expires && r.ttl > 590, "{r:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.expire_subscriptions(now_unix() + 300), Ok(vec![]), "moved by sub_refresh");
        let pushes = s.expire_subscriptions(now_unix() + 600 + EXPIRED_SUB_CLOSE_DELAY + 1).unwrap();
        assert_eq!(pushes.len(), 1);
        assert_eq!(pushes[0].unsubscribe.as_ref().map(|u| u.code), Some(2501), "the SDK resubscribes");
        assert!(s.subs.get("$a").is_none());
    }

    #[test]
    fn another_user_s_subscription_token_disconnects_3500_an_invalid_one_is_103() {
        let n = node(Namespaces::default());
        let mut s = connected(&n, "u");
        let sub = |token: String| {
            cmd(2, |c| c.subscribe = Some(SubscribeRequest { channel: "$a".into(), token, ..Default::default() }))
        };
        assert_eq!(s.handle(&sub("garbage".into())), Outcome::Error(ErrorCode::PERMISSION_DENIED));
        let theirs = make_hs256_subscription_token(SECRET, "v", "$a", None).unwrap();
        assert_eq!(s.handle(&sub(theirs)), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
        let mut s = connected(&n, "u");
        let ok = make_hs256_subscription_token(SECRET, "u", "$a", None).unwrap();
        assert!(matches!(s.handle(&sub(ok)), Outcome::Reply(_)));
        let refresh = cmd(3, |c| c.sub_refresh = Some(SubRefreshRequest { channel: "$a".into(), token: "bad".into() }));
        assert_eq!(s.handle(&refresh), Outcome::Disconnect(DisconnectCode::INVALID_TOKEN));
    }

    #[test]
    fn a_pong_ends_expired_subscriptions_with_an_unsubscribe_push() {
        let n = node(Namespaces::default());
        let mut s = connected(&n, "u");
        let t = make_hs256_subscription_token(SECRET, "u", "$a", Some(now_unix() + 60)).unwrap();
        let sub =
            cmd(2, |c| c.subscribe = Some(SubscribeRequest { channel: "$a".into(), token: t, ..Default::default() }));
        assert!(matches!(s.handle(&sub), Outcome::Reply(_)));
        if let Some(sub) = s.subs.get_mut("$a") {
            if let Some(extra) = sub.extra.as_mut() {
                extra.expires_at = Some(now_unix() - EXPIRED_SUB_CLOSE_DELAY - 1);
                // as if long past
            }
        }
        s.pong_received = false; // a ping went out
        let mut replies = BytesMut::new();
        assert_eq!(s.on_message(b"{}", &mut replies, 0), Ok(()));
        let text = String::from_utf8_lossy(&replies);
        assert!(text.contains(r#""unsubscribe":{"code":2501"#) && text.contains(r#""channel":"$a""#), "{text}");
        assert!(s.subs.get("$a").is_none());
        assert_eq!(n.hub.num_subscribers("$a"), 0);
    }

    #[test]
    fn an_expired_server_side_subscription_disconnects_3006() {
        let n = node(Namespaces::dev_mode());
        let mut s = connected(&n, "u");
        let req = SubscribeRequest { channel: "srv".into(), ..Default::default() };
        assert!(s.do_subscribe(&req, true).is_ok());
        if let Some(sub) = s.subs.get_mut("srv") {
            sub.extra = Some(Box::new(SubExtra { chan_info: Bytes::new(), expires_at: Some(now_unix()) }));
        }
        let later = now_unix() + EXPIRED_SUB_CLOSE_DELAY + 1;
        assert_eq!(s.expire_subscriptions(later), Err(DisconnectCode::SUB_EXPIRED));
    }

    #[test]
    fn subs_stay_sorted_and_small_until_many_then_hash() {
        assert_eq!(std::mem::size_of::<Subs>(), 16, "no bigger than the boxed slice it replaced");
        assert_eq!(std::mem::size_of::<Sub>(), 32);
        let n = node(Namespaces::dev_mode());
        let mut s = connected(&n, "");
        for i in (0..SMALL_SUBS).rev() {
            assert!(matches!(s.handle(&subscribe(&format!("c{i:03}"))), Outcome::Reply(_)));
        }
        match &s.subs {
            Subs::Small(v) => assert!(v.windows(2).all(|w| w[0].channel < w[1].channel), "sorted"),
            Subs::Large(_) => panic!("still small at {SMALL_SUBS}"),
        }
        assert!(matches!(s.handle(&subscribe("more")), Outcome::Reply(_)));
        assert!(matches!(s.subs, Subs::Large(_)));
        assert_eq!(s.subs.len(), SMALL_SUBS + 1);
        assert!(s.subs.get("c010").is_some() && s.subs.get("more").is_some());
        s.unsubscribe("c010");
        assert!(s.subs.get("c010").is_none());
        assert_eq!(n.hub.num_subscribers("c010"), 0);
        drop(s);
        assert_eq!(n.hub.num_subscribers("more"), 0, "every subscription is left on drop");
    }

    #[test]
    fn command_bucket_runs_the_burst_refuses_then_floods_only_while_never_full_again() {
        use super::{CommandBucket, CommandQuota, Throttle};
        let q = CommandQuota::new(10, 3, std::time::Duration::from_secs(1)).expect("a quota");
        let mut b = CommandBucket::default();
        let t0 = 1_000_000;
        for _ in 0..3 {
            assert_eq!(b.check(&q, t0), Throttle::Run);
        }
        assert_eq!(b.check(&q, t0), Throttle::Refuse { first: true });
        assert_eq!(b.check(&q, t0), Throttle::Refuse { first: false });
        // A token back after 100 ms: one command runs, the run of refusals goes on.
        assert_eq!(b.check(&q, t0 + 100_000), Throttle::Run);
        assert_eq!(b.check(&q, t0 + 100_000), Throttle::Refuse { first: false });
        // Flooding at six times the rate: the bucket is never full again, and a second after the first
        // refusal the client is disconnected.
        let mut flooded_at = None;
        for step in 2..=40u64 {
            let now = t0 + step * 50_000;
            if (0..3).any(|_| b.check(&q, now) == Throttle::Flood) {
                flooded_at = Some(now);
                break;
            }
        }
        assert_eq!(flooded_at, Some(t0 + 1_000_000));
        // Once the bucket is full again, the client starts afresh.
        let mut b = CommandBucket::default();
        for _ in 0..4 {
            b.check(&q, t0);
        }
        assert_eq!(b.check(&q, t0 + 5_000_000), Throttle::Run);
        assert_eq!(b.check(&q, t0 + 5_000_000), Throttle::Run);
        assert_eq!(b.check(&q, t0 + 5_000_000), Throttle::Run);
        assert_eq!(b.check(&q, t0 + 5_000_000), Throttle::Refuse { first: true });
        assert_eq!(CommandQuota::new(0, 5, std::time::Duration::ZERO), None, "0: unlimited");
        assert_eq!(std::mem::size_of::<super::Identity>(), 64, "a size class");
    }

    #[test]
    fn channel_buckets_limit_each_channel_apart_and_reuse_their_storage() {
        use super::{ChannelBuckets, CommandQuota, MAX_PUBLISH_CHANNELS};
        let q = CommandQuota::new(1, 2, std::time::Duration::ZERO).expect("a quota");
        let mut b = ChannelBuckets::default();
        let t0 = 1_000_000;
        assert!(b.allow("a", &q, t0));
        assert!(b.allow("a", &q, t0));
        assert!(!b.allow("a", &q, t0), "over the burst");
        assert!(b.allow("b", &q, t0), "another channel");
        // Steady state: publications to channels already held never grow (or move) the storage.
        let (ptr, cap) = (b.entries.as_ptr(), b.entries.capacity());
        for i in 0..1000u64 {
            let now = t0 + 1_000_000 + i * 1_000_000;
            assert!(b.allow("a", &q, now));
            assert!(b.allow("b", &q, now));
        }
        assert_eq!((b.entries.as_ptr(), b.entries.capacity()), (ptr, cap));
        assert!(!b.all_full(t0 + 1_000 * 1_000_000));
        assert!(b.all_full(t0 + 2_000 * 1_000_000), "both full again after the quiet");
        // Channels whose buckets are full again are forgotten to make room; past the cap, refused.
        let now = t0 + 3_000 * 1_000_000;
        for i in 0..MAX_PUBLISH_CHANNELS {
            assert!(b.allow(&format!("c{i}"), &q, now));
        }
        assert_eq!(b.entries.len(), MAX_PUBLISH_CHANNELS, "a and b, full again, were dropped");
        assert!(!b.allow("one-more", &q, now));
        assert!(b.allow("one-more", &q, now + 2_000_000), "room once the others are full again");
    }
}
