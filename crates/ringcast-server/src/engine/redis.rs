//! The Redis engine (`broker = "redis"`): publications, history, presence and control shared by every
//! node that points at the same Redis and `redis_prefix`.
//!
//! # Keys (prefix `P`, channel `C`)
//! * `P:ch:C` — the PUB/SUB channel of C's publications; `P:control` — control messages between nodes.
//! * `P:m:C` — the stream's meta hash: `s` (the last offset), `e` (the epoch); expires `history_meta_ttl`
//!   after its last use.
//! * `P:h:C` — the history list, newest first, trimmed to `history_size`, expiring `history_ttl` after
//!   the last publication.
//! * `P:p:C` — presence hash (client id → protobuf `ClientInfo`); `P:pe:C` — sorted set of the same
//!   clients by expiry time. Each node re-adds its own clients' entries every [`refresh_every`] of
//!   `redis_presence_ttl`; a crashed node's entries pass their expiry and are dropped by the next
//!   presence read.
//!
//! # Order
//! One Lua script assigns the offset (HINCRBY), appends to the list and PUBLISHes the publication with
//! its offset and epoch: Redis runs scripts one at a time, so the order of offsets is the order of the
//! PUB/SUB messages every subscribed node receives.
//!
//! # Subscriptions
//! One dedicated PUB/SUB connection per node, driven by one task. `subscribe_node` counts local
//! subscribers per channel; the task reconciles the wanted set with the subscribed one, sending every
//! pending change as one SUBSCRIBE and one UNSUBSCRIBE (a reconnect of many clients costs a few round
//! trips, not one per client). When the connection is lost, the task reconnects with backoff, subscribes
//! to every wanted channel again, and tells the node ([`Inbound::resubscribed`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use prost::Message;
use redis::aio::ConnectionManager;
use redis::Script;
use ringcast_protocol::messages::{ClientInfo, Publication};
use tokio::sync::{mpsc, oneshot};

use super::{
    random_epoch, read_after, select, Broker, Control, EngineError, EngineFuture, EngineState, EngineStatus,
    HistoryStore, Inbound, InboundSlot, PresenceManager, CONTROL_LOG_MAX, CONTROL_LOG_TTL,
};
use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// The longest a node waits between re-adding its clients' presence entries.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(20);

/// How often entries living `ttl` are re-added: a third of it (two refreshes may fail before an entry of
/// a live client expires), at most [`PRESENCE_REFRESH`].
pub fn refresh_every(ttl: Duration) -> Duration {
    (ttl / 3).min(PRESENCE_REFRESH)
}

const PUBLISH: &str = r"
local size = tonumber(ARGV[3])
if size == 0 then
  redis.call('publish', ARGV[1], '0::' .. ARGV[2])
  return {0, ''}
end
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('hset', KEYS[2], 'e', epoch)
end
local offset = redis.call('hincrby', KEYS[2], 's', 1)
local msg = offset .. ':' .. epoch .. ':' .. ARGV[2]
redis.call('lpush', KEYS[1], msg)
redis.call('ltrim', KEYS[1], 0, size - 1)
redis.call('expire', KEYS[1], ARGV[4])
redis.call('expire', KEYS[2], ARGV[5])
redis.call('publish', ARGV[1], msg)
return {offset, epoch}
";

/// Appends a control message to the control log and publishes it with its log ID (`ID JSON`), in one
/// step: a node that receives it live and one that reads it from the log see the same ID.
const CONTROL: &str = r"
local id = redis.call('xadd', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[2])
redis.call('expire', KEYS[1], ARGV[4])
redis.call('publish', ARGV[1], id .. ' ' .. ARGV[2])
return id
";

/// Reads the control log: its last generated ID, its first entry's ID, how many entries it ever got and
/// how many it holds (more ever added than held: it was trimmed), and up to `ARGV[2]` entries after
/// `ARGV[1]` (none when `ARGV[1]` is empty). A missing log answers empty.
const CONTROL_READ: &str = r"
if redis.call('exists', KEYS[1]) == 0 then return {'0-0', '', '0', '0', {}} end
local info = redis.call('xinfo', 'stream', KEYS[1])
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local first = ''
if f['first-entry'] then first = f['first-entry'][1] end
local items = {}
if ARGV[1] ~= '' then items = redis.call('xrange', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2]) end
return {f['last-generated-id'], first, tostring(f['entries-added']), tostring(f['length']), items}
";

const HISTORY: &str = r"
local s = redis.call('hget', KEYS[2], 's')
if not s then s = '0' end
local e = redis.call('hget', KEYS[2], 'e')
if not e then
  e = ARGV[2]
  redis.call('hset', KEYS[2], 'e', e)
end
redis.call('expire', KEYS[2], ARGV[1])
local items = {}
if ARGV[3] == '1' then items = redis.call('lrange', KEYS[1], 0, -1) end
return {s, e, items}
";

const PRESENCE_ADD: &str = r"
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], ARGV[3], ARGV[1])
redis.call('expire', KEYS[1], ARGV[4])
redis.call('expire', KEYS[2], ARGV[4])
return 1
";

const PRESENCE_GET: &str = r"
local gone = redis.call('zrangebyscore', KEYS[2], '-inf', ARGV[1])
for _, c in ipairs(gone) do redis.call('hdel', KEYS[1], c) end
redis.call('zremrangebyscore', KEYS[2], '-inf', ARGV[1])
return redis.call('hgetall', KEYS[1])
";

/// Settings of one Redis instance of the engine (from `redis_url`, `redis_prefix`, `redis_timeout`,
/// `redis_presence_ttl`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub timeout: Duration,
    /// This instance carries the control messages between nodes (the first of `redis_url`; see
    /// [`super::shards`]): its PUB/SUB connection subscribes to `P:control` as well.
    pub control: bool,
    /// How long a presence entry lives without being refreshed.
    pub presence_ttl: Duration,
}

enum SubRequest {
    /// Reconcile; answer once the wanted channels are subscribed.
    Sync(Option<oneshot::Sender<Result<(), EngineError>>>),
}

struct Scripts {
    publish: Script,
    control: Script,
    control_read: Script,
    history: Script,
    presence_add: Script,
    presence_get: Script,
}

pub struct RedisEngine {
    conn: ConnectionManager,
    url: String,
    prefix: String,
    timeout: Duration,
    /// Subscribed to the control channel (see [`RedisSettings::control`]).
    control: bool,
    presence_ttl: Duration,
    scripts: Scripts,
    /// Local subscribers per channel (of `subscribe_node` calls that succeeded or are under way).
    wanted: Mutex<HashMap<String, usize>>,
    requests: mpsc::UnboundedSender<SubRequest>,
    inbound: InboundSlot,
    /// This node's presence entries, re-added on a timer: (channel, client) → encoded info.
    present: Mutex<HashMap<(String, ClientId), Vec<u8>>>,
    /// The PUB/SUB connection is made and subscribed (the dashboard's "up"/"down").
    receiving: AtomicBool,
    /// The last command (publish, history, presence, control) failed ("degraded").
    last_failed: AtomicBool,
    /// The ID of the last logged control message applied here (see [`ControlId`]); `None` until the
    /// PUB/SUB task first read the log's end.
    control_seen: Mutex<Option<ControlId>>,
}

/// Entries read from the control log per round trip while catching up.
const CONTROL_PAGE: usize = 500;

/// The ID of a control message in the control log (`ms-seq`, a Redis Stream ID). Redis runs the script
/// that logs and publishes one message at a time, so IDs grow in the order every node receives the
/// messages live; a node applies only IDs above the last it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ControlId(u64, u64);

impl ControlId {
    fn parse(s: &str) -> Option<ControlId> {
        let (ms, seq) = s.split_once('-')?;
        Some(ControlId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for ControlId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Whether the message `id` is to be applied after `seen` (the last applied): only above it, and then
/// it is the last applied. `None` (the log's end not read yet) takes everything.
fn advance(seen: &mut Option<ControlId>, id: ControlId) -> bool {
    if seen.is_some_and(|s| id <= s) {
        return false;
    }
    *seen = Some(id);
    true
}

/// A control message as it travels on `P:control`: `ID JSON` when logged, bare JSON when not (node
/// announcements).
fn split_control(payload: &[u8]) -> Option<(Option<ControlId>, &[u8])> {
    if payload.first() == Some(&b'{') {
        return Some((None, payload));
    }
    let space = payload.iter().position(|&b| b == b' ')?;
    let id = ControlId::parse(std::str::from_utf8(&payload[..space]).ok()?)?;
    Some((Some(id), &payload[space + 1..]))
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn relock<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    match r {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1) + u64::from(d.subsec_nanos() > 0)
}

/// What a failed Redis call tells of its command ([`EngineError`]). `Unavailable` only where Redis
/// certainly did not execute it: the connection was refused (the command is written only on a
/// connection made), or the server refused the command before running it (`LOADING` while a restarted
/// Redis reads its data, `READONLY`, `MASTERDOWN`). A timeout is `Timeout`. Anything else is `Lost`:
/// a broken pipe, a reset or an end of stream may come after the command was written and run (the
/// client cannot tell which), and an unexpected reply means it ran.
fn map_err(e: &redis::RedisError) -> EngineError {
    use redis::ErrorKind;
    if e.is_timeout() {
        EngineError::Timeout
    } else if e.is_connection_refusal()
        || matches!(e.kind(), ErrorKind::BusyLoadingError | ErrorKind::ReadOnly | ErrorKind::MasterDown)
    {
        EngineError::Unavailable
    } else {
        EngineError::Lost
    }
}

/// A publication as it travels: `offset:epoch:` then the protobuf `Publication` (offset 0 inside).
fn parse_message(msg: &[u8]) -> Option<(u64, &str, Publication)> {
    let first = msg.iter().position(|&b| b == b':')?;
    let offset: u64 = std::str::from_utf8(&msg[..first]).ok()?.parse().ok()?;
    let rest = &msg[first + 1..];
    let second = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..second]).ok()?;
    let mut publication = Publication::decode(&rest[second + 1..]).ok()?;
    publication.offset = offset;
    Some((offset, epoch, publication))
}

/// `redis_url` as the dashboard shows it: any user and password left out.
fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        _ => url.to_string(),
    }
}

impl RedisEngine {
    /// Connects (the first connection must succeed: a node that starts without its engine says so) and
    /// starts the subscription task. `inbound` is set later ([`RedisEngine::set_inbound`]).
    pub async fn connect(settings: &RedisSettings) -> Result<Arc<RedisEngine>, String> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| format!("redis_url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(settings.timeout)
            .set_connection_timeout(settings.timeout)
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let conn = tokio::time::timeout(settings.timeout * 5, client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| format!("redis at {}: no answer within {:?}", settings.url, settings.timeout * 5))?
            .map_err(|e| format!("redis at {}: {e}", settings.url))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let engine = Arc::new(RedisEngine {
            conn,
            url: settings.url.clone(),
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            control: settings.control,
            presence_ttl: settings.presence_ttl,
            scripts: Scripts {
                publish: Script::new(PUBLISH),
                control: Script::new(CONTROL),
                control_read: Script::new(CONTROL_READ),
                history: Script::new(HISTORY),
                presence_add: Script::new(PRESENCE_ADD),
                presence_get: Script::new(PRESENCE_GET),
            },
            wanted: Mutex::new(HashMap::new()),
            requests: tx,
            inbound: InboundSlot::default(),
            present: Mutex::new(HashMap::new()),
            receiving: AtomicBool::new(false),
            last_failed: AtomicBool::new(false),
            control_seen: Mutex::new(None),
        });
        tokio::spawn(subscriptions(Arc::downgrade(&engine), client, rx));
        tokio::spawn(refresh_presence(Arc::downgrade(&engine), refresh_every(settings.presence_ttl)));
        Ok(engine)
    }

    pub fn set_inbound(&self, inbound: Weak<dyn Inbound>) {
        self.inbound.set(inbound);
    }

    fn inbound(&self) -> Option<Arc<dyn Inbound>> {
        self.inbound.get()
    }

    fn wanted(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        relock(self.wanted.lock())
    }

    fn seen(&self) -> MutexGuard<'_, Option<ControlId>> {
        relock(self.control_seen.lock())
    }

    fn key(&self, kind: &str, channel: &str) -> String {
        format!("{}:{kind}:{channel}", self.prefix)
    }

    fn control_channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Bounds a call by `redis_timeout`.
    async fn bounded<T>(&self, f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, EngineError> {
        self.bounded_by(self.timeout, f).await
    }

    /// Bounds a call by `limit` (what is left of `redis_timeout` for a call made of two commands).
    async fn bounded_by<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        let r = match tokio::time::timeout(limit, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(&e)),
            Err(_) => Err(EngineError::Timeout),
        };
        self.last_failed.store(r.is_err(), Ordering::Relaxed);
        r
    }

    /// Whether the command connection may be dead: the PUB/SUB connection is down (Redis went away) or
    /// the last command failed. Then a publish asks for a PING first ([`Broker::publish`]).
    fn suspect(&self) -> bool {
        !self.receiving.load(Ordering::Relaxed) || self.last_failed.load(Ordering::Relaxed)
    }

    fn set_receiving(engine: &Weak<RedisEngine>, up: bool) {
        if let Some(e) = engine.upgrade() {
            e.receiving.store(up, Ordering::Relaxed);
        }
    }

    /// The channels this node wants to receive.
    fn wanted_channels(&self) -> HashSet<String> {
        self.wanted().iter().filter(|(_, n)| **n > 0).map(|(c, _)| c.clone()).collect()
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let Some(inbound) = self.inbound() else { return };
        if self.control && channel == self.control_channel() {
            let Some((id, json)) = split_control(payload) else {
                tracing::warn!("redis: malformed control message");
                return;
            };
            if let Some(id) = id {
                // Already applied from the log while catching up (or a duplicate): skipped.
                if !advance(&mut self.seen(), id) {
                    return;
                }
            }
            apply_control(&*inbound, json);
            return;
        }
        let Some(name) = channel.strip_prefix(&self.prefix).and_then(|c| c.strip_prefix(":ch:")) else { return };
        match parse_message(payload) {
            Some((_, _, publication)) => inbound.publication(name, publication),
            None => {
                metrics::counter!("ringcast_engine_errors_total", "op" => "inbound", "error" => "malformed")
                    .increment(1);
                tracing::warn!(channel = name, "redis: malformed publication");
            }
        }
    }
}

fn apply_control(inbound: &dyn Inbound, json: &[u8]) {
    match serde_json::from_slice::<Control>(json) {
        Ok(c) => inbound.control(c),
        Err(e) => tracing::warn!(error = %e, "redis: malformed control message"),
    }
}

impl RedisEngine {
    fn control_log(&self) -> String {
        format!("{}:control:log", self.prefix)
    }

    /// Run by the PUB/SUB task once subscribed to the control channel. The first time, the node starts
    /// from the log's end (nothing older is applied here). After a reconnect, it applies, in order,
    /// the logged messages after the last one it applied (missed while it was not subscribed); those
    /// that also arrive live are skipped by their ID ([`advance`]). Reports a gap when the log was
    /// trimmed past that message. Returns how many it applied.
    async fn catch_up_control(&self) -> Result<u64, EngineError> {
        let start = *self.seen();
        let mut conn = self.conn.clone();
        let Some(mut after) = start else {
            let mut inv = self.scripts.control_read.prepare_invoke();
            inv.key(self.control_log()).arg("").arg(0);
            let (end, ..): ControlRead = self.bounded(inv.invoke_async(&mut conn)).await?;
            let end = ControlId::parse(&end).unwrap_or(ControlId(0, 0));
            let mut seen = self.seen();
            // Anything live that arrived meanwhile was applied (`None` takes all): keep the larger.
            *seen = Some(seen.map_or(end, |s| s.max(end)));
            return Ok(0);
        };
        let mut applied = 0;
        let mut first_page = true;
        loop {
            let mut inv = self.scripts.control_read.prepare_invoke();
            inv.key(self.control_log()).arg(after.to_string()).arg(CONTROL_PAGE);
            let (_, first, added, len, items): ControlRead = self.bounded(inv.invoke_async(&mut conn)).await?;
            if first_page {
                first_page = false;
                let trimmed = added.parse::<u64>().unwrap_or(0) > len.parse::<u64>().unwrap_or(0);
                let first = ControlId::parse(&first);
                if trimmed && first.is_some_and(|f| f > after) {
                    metrics::counter!("ringcast_control_log_gaps_total").increment(1);
                    tracing::warn!(
                        last_applied = %after,
                        first_logged = %first.map_or(String::new(), |f| f.to_string()),
                        "redis: the control log was trimmed past the last control message applied here; \
                         control messages may have been missed"
                    );
                }
            }
            let Some(inbound) = self.inbound() else { return Ok(applied) };
            let count = items.len();
            for (id, fields) in items {
                let Some(id) = ControlId::parse(&id) else { continue };
                after = id;
                let json = fields.chunks_exact(2).find(|f| f[0] == b"m").map(|f| f[1].as_slice());
                if !advance(&mut self.seen(), id) {
                    continue;
                }
                if let Some(json) = json {
                    apply_control(&*inbound, json);
                    applied += 1;
                    metrics::counter!("ringcast_control_log_applied_total").increment(1);
                }
            }
            if count < CONTROL_PAGE {
                return Ok(applied);
            }
        }
    }
}

/// [`CONTROL_READ`]'s answer: last generated ID, first entry's ID, entries ever added, entries held,
/// (ID, [field, value, ...]) of the entries read.
type ControlRead = (String, String, String, String, Vec<(String, Vec<Vec<u8>>)>);

/// The PUB/SUB connection's task: reconciles subscriptions, reads messages, reconnects with backoff.
async fn subscriptions(engine: Weak<RedisEngine>, client: redis::Client, mut rx: mpsc::UnboundedReceiver<SubRequest>) {
    let mut backoff = Duration::from_millis(50);
    let mut connected_before = false;
    'connect: loop {
        // Down from here until this connection is made and subscribed.
        RedisEngine::set_receiving(&engine, false);
        let Some(control) = engine.upgrade().map(|e| e.control.then(|| e.control_channel())) else { return };
        // What a barrier subscribes to: a channel nothing is published on, so only its reply matters.
        let Some(barrier) = engine.upgrade().map(|e| format!("{}:barrier", e.prefix)) else { return };
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "redis: PUB/SUB connection failed; retrying");
                // Requests made meanwhile fail at once: nobody waits for a connection that is not there.
                while let Ok(SubRequest::Sync(reply)) = rx.try_recv() {
                    if let Some(r) = reply {
                        let _ = r.send(Err(EngineError::Unavailable));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        let mut active: HashSet<String> = HashSet::new();
        if let Some(control) = &control {
            if sink.subscribe(control).await.is_err() {
                continue;
            }
        }
        // Everything wanted, in one SUBSCRIBE.
        let Some(e) = engine.upgrade() else { return };
        let wanted = e.wanted_channels();
        let names: Vec<String> = wanted.iter().map(|c| e.key("ch", c)).collect();
        drop(e);
        if !wanted.is_empty() {
            if sink.subscribe(&names).await.is_err() {
                continue;
            }
            active = wanted;
        }
        // Subscribed to the control channel: what was logged since the last control message applied
        // here (after a reconnect), or where the log ends (the first time).
        if control.is_some() {
            let Some(e) = engine.upgrade() else { return };
            match e.catch_up_control().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(applied = n, "redis: control messages missed while reconnecting applied"),
                Err(err) => {
                    drop(e);
                    tracing::warn!(error = %err, ?backoff, "redis: control log read failed; reconnecting");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
        }
        if connected_before {
            tracing::info!(channels = active.len(), "redis: PUB/SUB connection made again; channels resubscribed");
            metrics::counter!("ringcast_engine_reconnects_total").increment(1);
            if let Some(inbound) = engine.upgrade().and_then(|e| e.inbound()) {
                let channels: Vec<String> = active.iter().cloned().collect();
                inbound.resubscribed(&channels);
            }
        }
        connected_before = true;
        RedisEngine::set_receiving(&engine, true);
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some(first) = req else { return };
                    let mut waiters = Vec::new();
                    let SubRequest::Sync(w) = first;
                    waiters.extend(w);
                    while let Ok(SubRequest::Sync(w)) = rx.try_recv() {
                        waiters.extend(w);
                    }
                    let Some(e) = engine.upgrade() else { return };
                    let wanted = e.wanted_channels();
                    let ch = |c: &String| e.key("ch", c);
                    let add: Vec<String> = wanted.difference(&active).map(ch).collect();
                    let remove: Vec<String> = active.difference(&wanted).map(ch).collect();
                    drop(e);
                    let mut ok = true;
                    if !add.is_empty() {
                        ok &= sink.subscribe(&add).await.is_ok();
                    }
                    if ok && !remove.is_empty() {
                        ok &= sink.unsubscribe(&remove).await.is_ok();
                    }
                    // A barrier for the waiters (`Broker::barrier`): Redis answers this SUBSCRIBE after
                    // every message it sent before, and those are queued on `stream` by the time the
                    // answer is; hand them over before answering.
                    if ok && !waiters.is_empty() {
                        ok &= sink.subscribe(&barrier).await.is_ok();
                        let Some(e) = engine.upgrade() else { return };
                        for _ in 0..100_000 {
                            match stream.next().now_or_never() {
                                Some(Some(msg)) => e.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                                _ => break,
                            }
                        }
                    }
                    for w in waiters {
                        let _ = w.send(if ok { Ok(()) } else { Err(EngineError::Unavailable) });
                    }
                    if !ok {
                        continue 'connect;
                    }
                    active = wanted;
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        tracing::warn!("redis: PUB/SUB connection lost; reconnecting");
                        continue 'connect;
                    };
                    let Some(e) = engine.upgrade() else { return };
                    e.dispatch(msg.get_channel_name(), msg.get_payload_bytes());
                }
            }
        }
    }
}

/// Re-adds this node's presence entries before they expire.
async fn refresh_presence(engine: Weak<RedisEngine>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(e) = engine.upgrade() else { return };
        let entries: Vec<((String, ClientId), Vec<u8>)> =
            relock(e.present.lock()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for ((channel, client), info) in entries {
            if let Err(err) = e.write_presence(&channel, client, info).await {
                tracing::warn!(error = %err, "redis: presence refresh failed");
                break;
            }
        }
    }
}

impl RedisEngine {
    async fn write_presence(&self, channel: &str, client: ClientId, info: Vec<u8>) -> Result<(), EngineError> {
        let expire_at = unix_ms() + self.presence_ttl.as_millis() as u64;
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.presence_add.prepare_invoke();
        inv.key(self.key("p", channel))
            .key(self.key("pe", channel))
            .arg(client.to_string())
            .arg(info)
            .arg(expire_at)
            .arg(secs(self.presence_ttl) * 2);
        self.bounded(inv.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn read_presence(&self, channel: &str) -> Result<Vec<(String, ClientInfo)>, EngineError> {
        let mut conn = self.conn.clone();
        let mut inv = self.scripts.presence_get.prepare_invoke();
        inv.key(self.key("p", channel)).key(self.key("pe", channel)).arg(unix_ms());
        let flat: Vec<Vec<u8>> = self.bounded(inv.invoke_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            let id = String::from_utf8_lossy(&pair[0]).into_owned();
            if let Ok(info) = ClientInfo::decode(&pair[1][..]) {
                out.push((id, info));
            }
        }
        Ok(out)
    }
}

impl Broker for RedisEngine {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // While Redis may be gone, the script goes out only after a PING came back: if the PING
            // fails, the publication was certainly not executed (`Unavailable`, whatever the PING's
            // own failure), which is what lets the node deliver it locally. A script that was sent and
            // failed is `Timeout` or `Lost` (see `map_err`). Costs a round trip only while suspect.
            // Both within one `redis_timeout`.
            let started = tokio::time::Instant::now();
            if self.suspect() {
                self.bounded(redis::cmd("PING").query_async::<()>(&mut conn))
                    .await
                    .map_err(|_| EngineError::Unavailable)?;
            }
            let left = self.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                // The PING took it all: the script is not sent.
                return Err(EngineError::Unavailable);
            }
            let meta_ttl = history.effective_meta_ttl();
            let mut inv = self.scripts.publish.prepare_invoke();
            inv.key(self.key("h", channel))
                .key(self.key("m", channel))
                .arg(self.key("ch", channel))
                .arg(publication.encode_to_vec())
                .arg(history.size)
                .arg(secs(history.ttl))
                .arg(secs(meta_ttl))
                .arg(random_epoch());
            let (offset, epoch): (u64, String) = self.bounded_by(left, inv.invoke_async(&mut conn)).await?;
            Ok(StreamPos { offset, epoch: epoch.into() })
        })
    }

    fn subscribe_node<'a>(&'a self, channel: &'a str, _history: HistoryOptions) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            *self.wanted().entry(channel.to_string()).or_insert(0) += 1;
            let (tx, rx) = oneshot::channel();
            let sent = self.requests.send(SubRequest::Sync(Some(tx))).is_ok();
            let result = if !sent {
                Err(EngineError::Unavailable)
            } else {
                match tokio::time::timeout(self.timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(EngineError::Unavailable),
                    Err(_) => Err(EngineError::Timeout),
                }
            };
            if result.is_err() {
                self.unsubscribe_node(channel);
            }
            result
        })
    }

    fn unsubscribe_node(&self, channel: &str) {
        let last = {
            let mut wanted = self.wanted();
            match wanted.get_mut(channel) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    wanted.remove(channel);
                    true
                }
                None => false,
            }
        };
        if last {
            let _ = self.requests.send(SubRequest::Sync(None));
        }
    }

    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let payload = serde_json::to_vec(control).map_err(|_| EngineError::Unavailable)?;
            let mut conn = self.conn.clone();
            let channel = self.control_channel();
            if let Control::Node(_) = control {
                // Announcements come every few seconds and each replaces the last: not logged.
                self.bounded(redis::cmd("PUBLISH").arg(channel).arg(payload).query_async::<i64>(&mut conn)).await?;
                return Ok(());
            }
            let mut inv = self.scripts.control.prepare_invoke();
            inv.key(self.control_log()).arg(channel).arg(payload).arg(CONTROL_LOG_MAX).arg(secs(CONTROL_LOG_TTL));
            self.bounded(inv.invoke_async::<String>(&mut conn)).await?;
            Ok(())
        })
    }

    fn barrier<'a>(&'a self, _channel: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if self.requests.send(SubRequest::Sync(Some(tx))).is_err() {
                return Err(EngineError::Unavailable);
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(EngineError::Unavailable),
                Err(_) => Err(EngineError::Timeout),
            }
        })
    }

    fn status(&self) -> EngineStatus {
        let state = if !self.receiving.load(Ordering::Relaxed) {
            EngineState::Down
        } else if self.last_failed.load(Ordering::Relaxed) {
            EngineState::Degraded
        } else {
            EngineState::Up
        };
        let channels = self.wanted().len();
        EngineStatus {
            kind: "redis",
            state,
            detail: format!(
                "{} (prefix {}): {channels} channels received by this node",
                without_password(&self.url),
                self.prefix
            ),
        }
    }
}

impl HistoryStore for RedisEngine {
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let meta_ttl = history.effective_meta_ttl();
            let mut inv = self.scripts.history.prepare_invoke();
            inv.key(self.key("h", channel))
                .key(self.key("m", channel))
                .arg(secs(meta_ttl))
                .arg(random_epoch())
                .arg(if filter.limit == 0 { "0" } else { "1" });
            let (top, epoch, items): (u64, String, Vec<Vec<u8>>) = self.bounded(inv.invoke_async(&mut conn)).await?;
            let after = read_after(filter, top, &epoch)?;
            let pos = StreamPos { offset: top, epoch: epoch.into() };
            if filter.limit == 0 {
                return Ok((Vec::new(), pos));
            }
            // Stored newest first.
            let pubs = items.iter().rev().filter_map(|m| parse_message(m).map(|(_, _, p)| p)).collect();
            let pubs = select(pubs, after, filter);
            Ok((pubs, pos))
        })
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.bounded(redis::cmd("DEL").arg(self.key("h", channel)).query_async::<i64>(&mut conn)).await?;
            Ok(())
        })
    }
}

impl PresenceManager for RedisEngine {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let encoded = info.encode_to_vec();
            relock(self.present.lock()).insert((channel.to_string(), client), encoded.clone());
            self.write_presence(channel, client, encoded).await
        })
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            relock(self.present.lock()).remove(&(channel.to_string(), client));
            let mut conn = self.conn.clone();
            let id = client.to_string();
            let mut pipe = redis::pipe();
            pipe.hdel(self.key("p", channel), &id).ignore().zrem(self.key("pe", channel), &id).ignore();
            self.bounded(pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        Box::pin(async move { Ok(self.read_presence(channel).await?.into_iter().collect()) })
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        Box::pin(async move {
            let entries = self.read_presence(channel).await?;
            let users: HashSet<&str> = entries.iter().map(|(_, i)| i.user.as_str()).collect();
            Ok((entries.len() as u32, users.len() as u32))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_message_carries_offset_epoch_and_publication() {
        let p = Publication { data: Bytes::from_static(b"{\"a\":1}"), ..Default::default() };
        let mut msg = b"17:beef:".to_vec();
        msg.extend(p.encode_to_vec());
        let (offset, epoch, got) = parse_message(&msg).expect("parsed");
        assert_eq!((offset, epoch), (17, "beef"));
        assert_eq!((got.offset, got.data), (17, p.data));
        assert!(parse_message(b"x:y:z").is_none());
        assert!(parse_message(b"12").is_none());
    }

    #[test]
    fn only_a_command_redis_certainly_did_not_run_is_unavailable() {
        use std::io::{Error, ErrorKind as Io};
        let io = |kind| map_err(&redis::RedisError::from(Error::from(kind)));
        // Refused at connect: nothing was written.
        assert_eq!(io(Io::ConnectionRefused), EngineError::Unavailable);
        // Refused by the server before running it.
        for kind in [redis::ErrorKind::BusyLoadingError, redis::ErrorKind::ReadOnly, redis::ErrorKind::MasterDown] {
            assert_eq!(map_err(&redis::RedisError::from((kind, "refused"))), EngineError::Unavailable, "{kind:?}");
        }
        // Sent, perhaps, and no answer: it may have run.
        assert_eq!(io(Io::TimedOut), EngineError::Timeout);
        for kind in [Io::BrokenPipe, Io::ConnectionReset, Io::UnexpectedEof] {
            assert_eq!(io(kind), EngineError::Lost, "{kind:?}");
        }
        let answered = redis::RedisError::from((redis::ErrorKind::TypeError, "unexpected reply"));
        assert_eq!(map_err(&answered), EngineError::Lost, "a reply came: it ran");
    }

    #[test]
    fn control_ids_apply_strictly_increasing_once_each() {
        let id = |s| ControlId::parse(s).expect("id");
        assert!(id("5-0") < id("5-1") && id("5-9") < id("6-0") && id("10-0") > id("9-99"), "numeric, ms then seq");
        assert!(ControlId::parse("5").is_none() && ControlId::parse("x-1").is_none());
        assert_eq!(id("1796651438139-3").to_string(), "1796651438139-3");
        // Before the log's end is known, everything live is taken.
        let mut seen = None;
        assert!(advance(&mut seen, id("7-0")));
        // Caught up from the log to 9-0; the same messages arriving live afterwards are skipped.
        assert!(advance(&mut seen, id("8-0")) && advance(&mut seen, id("9-0")));
        for old in ["7-0", "8-0", "9-0", "3-5"] {
            assert!(!advance(&mut seen, id(old)), "{old} applied twice");
        }
        assert!(advance(&mut seen, id("9-1")), "the next one is applied");
        assert_eq!(seen, Some(id("9-1")));
    }

    #[test]
    fn a_logged_control_message_carries_its_id_and_an_announcement_none() {
        assert_eq!(split_control(b"12-3 {\"op\":\"x\"}"), Some((Some(ControlId(12, 3)), &b"{\"op\":\"x\"}"[..])));
        assert_eq!(split_control(b"{\"op\":\"node\"}"), Some((None, &b"{\"op\":\"node\"}"[..])));
        assert_eq!(split_control(b"garbage"), None);
        assert_eq!(split_control(b"1-x {}"), None);
    }

    #[test]
    fn the_dashboard_never_shows_a_redis_password() {
        assert_eq!(without_password("redis://:s3cret@10.0.0.1:6379/0"), "redis://10.0.0.1:6379/0");
        assert_eq!(without_password("rediss://user:p@ss@host:6380"), "rediss://host:6380");
        assert_eq!(without_password("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
