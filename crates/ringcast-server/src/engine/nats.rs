//! The NATS broker (`broker = "nats"`): publications and control messages between the nodes that point
//! at the same NATS server and `nats_prefix`, over core NATS subjects.
//!
//! # What it is, and what it refuses
//! Channels without history travel over core NATS, as with Centrifugo's NATS broker: at-most-once
//! PUB/SUB with no memory, offset 0, no epoch. Channels whose namespace keeps history are stored in one
//! JetStream stream ([`super::jetstream`]): contiguous per-channel offsets in one epoch, history reads,
//! positioning and recovery, and live delivery from one ordered consumer per channel per node, so every
//! node delivers them in offset order. Presence is not kept in NATS: with `presence_manager = "redis"`
//! it is kept in Redis by the Redis engine's presence manager (the same entries a Redis-engine cluster
//! keeps); without it, `presence = true` is refused.
//!
//! # Subjects (prefix `P`)
//! * `P.ch.T` — channel C's publications, `T` = [`escape`]`(C)`: one subject token whatever C holds, so
//!   `.`, `*`, `>` and whitespace in a channel name cannot split it, widen a subscription or collide
//!   with another channel.
//! * `P.h.T` — a history channel's stored publications, in the history stream (never subscribed to
//!   with core NATS: a core subscriber would also get publications the stream rejected).
//! * `P.control.log` — control messages (API disconnect, subscribe, unsubscribe, refresh of a client on
//!   whichever node holds it; join/leave), JSON, as with Redis, stored in the control stream
//!   ([`super::control_stream`]) so that a node that was away applies those it missed.
//! * `P.control` — the nodes' announcements (core NATS: a missed one is made good by the next), and
//!   every control message when the server has no JetStream.
//!
//! A publication travels as its protobuf encoding.
//!
//! # Order and delivery
//! A history channel's publications are delivered from its live consumer in stream order, which is
//! offset order ([`super::jetstream`]). For the others: the publishing node does not deliver locally: every node subscribed to the subject, the origin
//! included, receives the publication on its one subscription for the channel and delivers it through
//! the hub ([`Inbound::publication`]), so a node's own publications are delivered once. NATS keeps the
//! order of one connection's publications to a subject, so a node's publications to a channel reach
//! every node in the order it made them; publications of different nodes may interleave differently on
//! different nodes (there is no offset to order them by).
//!
//! # Subscriptions
//! One NATS subscription per channel per node: the first local subscriber opens it, the last one to
//! leave drops it. `subscribe_node` resolves only after a round trip through the server made after the
//! SUB (a request nobody answers: the server's "no responders" status comes back on the same
//! connection, after it has processed the SUB), so a publication made after it arrives.
//!
//! # Connection loss
//! async-nats reconnects by itself (backoff up to 2 s) and sends every subscription again. While the
//! connection is down a publish or control call answers error 100 at once rather than queueing a
//! message that may be lost. Once connected again, after a round trip (the re-sent subscriptions are
//! then in force), the node is told ([`Inbound::resubscribed`]), which makes each affected client
//! resubscribe: publications made while it was down are gone, and the client learns it. Control
//! messages sent meanwhile are not: the control stream's consumer is recreated from the last one the
//! node applied and delivers them, in order, before newer ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::push::{Ordered, OrderedErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use ringcast_protocol::messages::{ClientInfo, Publication};
use tokio::sync::{mpsc, watch, OnceCell};

use super::control_stream::{ControlStream, Cursor, Step};
use super::jetstream::{History, StreamLimits};
use super::{
    read_after, select, Broker, Control, EngineError, EngineFuture, EngineState, EngineStatus, HistoryStore, Inbound,
    InboundSlot, PresenceManager,
};
use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// Settings of the NATS broker (`nats_url`, `nats_prefix`, `nats_dial_timeout`, `nats_write_timeout`).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub prefix: String,
    /// Bound of the first connection and of each reconnection attempt.
    pub dial_timeout: Duration,
    /// Bound of every publish, subscribe and control call.
    pub write_timeout: Duration,
    /// The history stream's limits when a namespace keeps history (JetStream then must be enabled).
    pub history: Option<StreamLimits>,
}

/// One channel this node receives: how many local subscribers want it, and the tasks that read it.
struct Channel {
    count: usize,
    /// Set once the NATS subscription is confirmed; a failed attempt leaves it unset for the next caller.
    ready: Arc<OnceCell<()>>,
    /// The core subscription's reader, and for a history channel its live consumer's.
    tasks: Vec<tokio::task::AbortHandle>,
    /// A history channel: the stream sequence of the last message its live consumer handed over (or
    /// skipped as already seen when it was opened). [`Broker::barrier`] waits on it.
    delivered: Option<watch::Receiver<u64>>,
}

pub struct NatsEngine {
    client: async_nats::Client,
    me: Weak<NatsEngine>,
    url: String,
    prefix: String,
    timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    /// The history stream, when a namespace keeps history.
    history: Option<History>,
    inbound: InboundSlot,
    /// The last publish, subscribe or control call failed (the dashboard's "degraded").
    last_failed: AtomicBool,
    /// The control stream; `None` when the server has no JetStream (control over core NATS).
    control_stream: Option<ControlStream>,
    /// Which control messages applied here count as missed while away and caught up.
    catch_up: CatchUp,
}

/// Tells the control messages a node applies because it was away (counted in
/// `ringcast_control_log_applied_total`, as Redis counts those it reads from its log) from live ones:
/// those applied while its connection is lost or not yet confirmed again, and those stored before the
/// stream's last sequence as read once it was.
#[derive(Default)]
struct CatchUp {
    away: AtomicBool,
    top: AtomicU64,
}

impl CatchUp {
    fn lost(&self) {
        self.away.store(true, Ordering::Release);
    }

    /// Connected again; `top` is the stream's last sequence now (`None`: not read).
    fn back(&self, top: Option<u64>) {
        if let Some(top) = top {
            self.top.fetch_max(top, Ordering::AcqRel);
        }
        self.away.store(false, Ordering::Release);
    }

    fn missed(&self, seq: u64) -> bool {
        self.away.load(Ordering::Acquire) || seq <= self.top.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for NatsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEngine").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn relock<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    match r {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Whether a byte stands for itself in an escaped channel name: printable ASCII other than the subject
/// separator `.`, the wildcards `*` and `>`, and the escape character `%`.
fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'%')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A channel name as one NATS subject token: plain bytes as they are, every other byte (UTF-8 bytes of
/// non-ASCII characters included) as `%XX` in upper-case hex. The empty name is `%` alone (no escape is
/// a lone `%`). Reversible by [`unescape`], so two channels never share a subject.
pub fn escape(channel: &str) -> String {
    if channel.is_empty() {
        return "%".to_string();
    }
    let mut out = String::with_capacity(channel.len());
    for &b in channel.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

/// The channel name an [`escape`]d token stands for; `None` for a token `escape` never makes.
pub fn unescape(token: &str) -> Option<String> {
    if token == "%" {
        return Some(String::new());
    }
    if token.is_empty() {
        return None;
    }
    let digit = |b: u8| HEX.iter().position(|&h| h == b).map(|v| v as u8);
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = digit(*bytes.get(i + 1)?)?;
            let lo = digit(*bytes.get(i + 2)?)?;
            let v = hi << 4 | lo;
            if plain(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else if plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `prefix` can lead a subject: non-empty dot-separated tokens without wildcards or whitespace.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|t| !t.is_empty() && t != "*" && t != ">" && t.bytes().all(|b| b.is_ascii_graphic()))
        && !prefix.contains(['*', '>'])
}

/// `nats_url` as the dashboard shows it: any user, password or token left out.
fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        _ => url.to_string(),
    }
}

/// Bounds a NATS call by `nats_write_timeout`.
async fn bounded<T, E>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(EngineError::Unavailable),
        Err(_) => Err(EngineError::Timeout),
    }
}

impl NatsEngine {
    /// Connects (the first connection must succeed: a node that starts without its broker says so),
    /// subscribes to the control subject, makes the control stream and this node's consumer of it
    /// (from the stream's end), and starts the connection-event task. `inbound` is set later
    /// ([`NatsEngine::set_inbound`]).
    pub async fn connect(settings: &NatsSettings) -> Result<Arc<NatsEngine>, String> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let options = async_nats::ConnectOptions::new()
            .name("ringcast")
            .connection_timeout(settings.dial_timeout)
            .request_timeout(Some(settings.write_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50).saturating_mul(1u32 << attempts.min(6)).min(Duration::from_secs(2))
            })
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        let client = tokio::time::timeout(settings.dial_timeout * 5, options.connect(settings.url.as_str()))
            .await
            .map_err(|_| format!("nats at {}: no answer within {:?}", settings.url, settings.dial_timeout * 5))?
            .map_err(|e| format!("nats at {}: {e}", without_credentials(&settings.url)))?;
        let control = client
            .subscribe(format!("{}.control", settings.prefix))
            .await
            .map_err(|e| format!("nats: control subscription: {e}"))?;
        let control_stream = ControlStream::open(client.clone(), &settings.prefix, settings.write_timeout).await?;
        let control_log = match &control_stream {
            Some(stream) => {
                let failed = |e| format!("nats: control stream: {e}");
                let last = bounded_engine(settings.write_timeout, stream.last_sequence()).await.map_err(failed)?;
                let messages = bounded_engine(settings.write_timeout, stream.follow(last)).await.map_err(failed)?;
                Some((Cursor::at(last), messages))
            }
            None => {
                tracing::warn!(
                    "nats: the server has no JetStream: control messages travel over core NATS, and a node \
                     whose connection is down misses those sent meanwhile"
                );
                None
            }
        };
        let history = match settings.history {
            Some(limits) => {
                Some(History::open(client.clone(), &settings.prefix, limits, settings.write_timeout).await?)
            }
            None => None,
        };
        let engine = Arc::new_cyclic(|me| NatsEngine {
            client,
            me: me.clone(),
            url: settings.url.clone(),
            prefix: settings.prefix.clone(),
            timeout: settings.write_timeout,
            channels: Mutex::new(HashMap::new()),
            history,
            inbound: InboundSlot::default(),
            last_failed: AtomicBool::new(false),
            control_stream,
            catch_up: CatchUp::default(),
        });
        tokio::spawn(receive_control(Arc::downgrade(&engine), control));
        if let Some((cursor, messages)) = control_log {
            tokio::spawn(receive_control_log(Arc::downgrade(&engine), messages, cursor));
        }
        tokio::spawn(connection_events(Arc::downgrade(&engine), events_rx));
        Ok(engine)
    }

    pub fn set_inbound(&self, inbound: Weak<dyn Inbound>) {
        self.inbound.set(inbound);
    }

    fn inbound(&self) -> Option<Arc<dyn Inbound>> {
        self.inbound.get()
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        relock(self.channels.lock())
    }

    fn channel_subject(&self, channel: &str) -> String {
        format!("{}.ch.{}", self.prefix, escape(channel))
    }

    /// Where a history channel's publications are stored (in the history stream).
    fn history_subject(&self, channel: &str) -> String {
        format!("{}.h.{}", self.prefix, escape(channel))
    }

    /// The history stream; `Unavailable` when no namespace keeps history (validation and the node's
    /// namespace checks keep such calls from coming).
    fn stream(&self) -> Result<&History, EngineError> {
        self.history.as_ref().ok_or(EngineError::Unavailable)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn record<T>(&self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        self.last_failed.store(r.is_err(), Ordering::Relaxed);
        r
    }

    /// A round trip through the server on this connection: when it returns, every command sent before it
    /// (a SUB) has been processed. A request to a subject nobody serves; the server answers "no
    /// responders" at once.
    async fn round_trip(&self) -> Result<(), EngineError> {
        let subject = format!("{}.sync", self.prefix);
        match tokio::time::timeout(self.timeout, self.client.request(subject, Bytes::new())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Err(EngineError::Timeout),
            Ok(Err(_)) => Err(EngineError::Unavailable),
            Err(_) => Err(EngineError::Timeout),
        }
    }

    /// Publishes `payload` on `subject` and flushes. Refused with `Unavailable` at once while the
    /// connection is down (async-nats would otherwise queue it and maybe lose it), or when the client
    /// does not take it. Once the client took it, it may go out whatever the flush says (the client
    /// resends its buffer after a reconnect): a failed flush is `Lost`, not `Unavailable`.
    async fn send(&self, subject: String, payload: Bytes) -> Result<(), EngineError> {
        if !self.connected() {
            return self.record(Err(EngineError::Unavailable));
        }
        let r = match bounded(self.timeout, self.client.publish(subject, payload)).await {
            Ok(()) => match bounded(self.timeout, self.client.flush()).await {
                Err(EngineError::Unavailable) => Err(EngineError::Lost),
                other => other,
            },
            Err(e) => Err(e),
        };
        self.record(r)
    }

    /// Opens the channel's NATS subscription and its reading task, once confirmed, and for a history
    /// channel its live consumer from the stored message after the subject's last one now. If every
    /// local subscriber left meanwhile (the entry is gone or is another one), both are dropped.
    async fn open(&self, channel: &str, cell: &Arc<OnceCell<()>>, history: bool) -> Result<(), EngineError> {
        if !self.connected() {
            return Err(EngineError::Unavailable);
        }
        let sub = bounded(self.timeout, self.client.subscribe(self.channel_subject(channel))).await?;
        // Dropping `sub` (or `follow`) on an error below sends UNSUB.
        let follow = if history {
            let stream = self.stream()?;
            let subject = self.history_subject(channel);
            let last = bounded_engine(self.timeout, stream.last(&subject)).await?.map_or(0, |l| l.seq);
            let messages = bounded_engine(self.timeout, stream.follow(&subject, last + 1)).await?;
            Some((last, messages))
        } else {
            None
        };
        self.round_trip().await?;
        let mut tasks = vec![tokio::spawn(receive_channel(self.me.clone(), channel.to_string(), sub))];
        let mut delivered = None;
        if let Some((last, messages)) = follow {
            let (tx, rx) = watch::channel(last);
            tasks.push(tokio::spawn(receive_history(self.me.clone(), channel.to_string(), messages, tx)));
            delivered = Some(rx);
        }
        let mut channels = self.channels();
        match channels.get_mut(channel) {
            Some(c) if Arc::ptr_eq(&c.ready, cell) => {
                c.tasks = tasks.iter().map(|t| t.abort_handle()).collect();
                c.delivered = delivered;
            }
            _ => tasks.iter().for_each(|t| t.abort()),
        }
        Ok(())
    }

    fn apply_control(&self, json: &[u8]) {
        let Some(inbound) = self.inbound() else { return };
        match serde_json::from_slice::<Control>(json) {
            Ok(c) => inbound.control(c),
            Err(e) => tracing::warn!(error = %e, "nats: malformed control message"),
        }
    }

    /// A message of the control stream at sequence `seq`: applied if it is new here, counted if it was
    /// missed while away, and a gap before it said.
    fn apply_logged(&self, cursor: &mut Cursor, seq: u64, json: &[u8]) {
        let before = cursor.last();
        match cursor.step(seq) {
            Step::Skip => return,
            Step::Apply => {}
            Step::ApplyAfterGap => {
                metrics::counter!("ringcast_control_log_gaps_total").increment(1);
                tracing::warn!(
                    last_applied = before,
                    next = seq,
                    "nats: the control stream was trimmed past the last control message applied here; \
                     control messages may have been missed"
                );
            }
        }
        if self.catch_up.missed(seq) {
            metrics::counter!("ringcast_control_log_applied_total").increment(1);
        }
        self.apply_control(json);
    }

    /// The channels this node receives.
    fn wanted_channels(&self) -> Vec<String> {
        self.channels().iter().filter(|(_, c)| c.ready.initialized()).map(|(n, _)| n.clone()).collect()
    }
}

/// Bounds a call that already answers [`EngineError`] by `nats_write_timeout`.
async fn bounded_engine<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    tokio::time::timeout(timeout, f).await.unwrap_or(Err(EngineError::Timeout))
}

/// Reads a history channel's live consumer and hands each publication to the node in stream order,
/// which is offset order (each offset is stored only behind the one before it). A message at or
/// before the last one handed over is skipped: the ordered consumer, when it recreates itself after a
/// gap, starts again from the last sequence it delivered, or from the subject's first message when it
/// had delivered none.
async fn receive_history(
    engine: Weak<NatsEngine>,
    channel: String,
    mut messages: Ordered,
    delivered: watch::Sender<u64>,
) {
    let mut last = *delivered.borrow();
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) if e.kind() == OrderedErrorKind::MissingHeartbeat => {
                // The consumer recreates itself on the next poll.
                tracing::debug!(channel, error = %e, "nats: history consumer interrupted");
                continue;
            }
            Err(e) => {
                // Not to be polled again (async-nats 0.52 panics polling it after its connection-state
                // watcher ended). The channel's subscribers here resubscribe (2500) and recover; the
                // last one's leaving drops the channel, and the next subscriber makes a new consumer.
                tracing::warn!(channel, error = %e, "nats: history consumer ended");
                if let Some(inbound) = engine.upgrade().and_then(|e| e.inbound()) {
                    inbound.resubscribed(std::slice::from_ref(&channel));
                }
                return;
            }
        };
        let Ok(seq) = m.info().map(|i| i.stream_sequence) else { continue };
        if seq <= last {
            continue;
        }
        last = seq;
        if let Some(publication) = super::jetstream::stored_publication(&m) {
            let Some(inbound) = engine.upgrade().and_then(|e| e.inbound()) else { return };
            inbound.publication(&channel, publication);
        }
        delivered.send_replace(seq);
    }
}

/// Reads one channel's subscription and hands each publication to the node, in arrival order.
async fn receive_channel(engine: Weak<NatsEngine>, channel: String, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(inbound) = engine.upgrade().and_then(|e| e.inbound()) else { return };
        match Publication::decode(msg.payload) {
            Ok(publication) => inbound.publication(&channel, publication),
            Err(_) => {
                metrics::counter!("ringcast_engine_errors_total", "op" => "inbound", "error" => "malformed")
                    .increment(1);
                tracing::warn!(channel, "nats: malformed publication");
            }
        }
    }
}

async fn receive_control(engine: Weak<NatsEngine>, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(engine) = engine.upgrade() else { return };
        engine.apply_control(&msg.payload);
    }
}

/// Reads this node's consumer of the control stream and applies each message once, in stream order
/// ([`super::control_stream`]). A consumer that ends (its connection closing) or fails otherwise is not
/// polled again: a new one is made from the last message applied, with backoff.
async fn receive_control_log(engine: Weak<NatsEngine>, mut messages: Ordered, mut cursor: Cursor) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match messages.next().await {
            Some(Ok(m)) => {
                backoff = Duration::from_millis(50);
                let Ok(seq) = m.info().map(|i| i.stream_sequence) else { continue };
                let Some(e) = engine.upgrade() else { return };
                e.apply_logged(&mut cursor, seq, &m.payload);
            }
            Some(Err(e)) if e.kind() == OrderedErrorKind::MissingHeartbeat => {
                // The consumer recreates itself on the next poll.
                tracing::debug!(error = %e, "nats: control consumer interrupted");
            }
            ended => {
                if let Some(Err(e)) = ended {
                    tracing::warn!(error = %e, "nats: control consumer ended; making another");
                }
                loop {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    let Some(e) = engine.upgrade() else { return };
                    let Some(stream) = &e.control_stream else { return };
                    if let Ok(m) = bounded_engine(e.timeout, stream.follow(cursor.last())).await {
                        messages = m;
                        break;
                    }
                }
            }
        }
    }
}

/// Logs connection loss and, once connected again and the re-sent subscriptions are in force, tells the
/// node which channels may have lost publications.
async fn connection_events(engine: Weak<NatsEngine>, mut rx: mpsc::UnboundedReceiver<async_nats::Event>) {
    let mut lost = false;
    while let Some(event) = rx.recv().await {
        match event {
            async_nats::Event::Disconnected => {
                lost = true;
                if let Some(e) = engine.upgrade() {
                    e.catch_up.lost();
                }
                tracing::warn!("nats: connection lost; reconnecting");
            }
            async_nats::Event::Connected if lost => {
                let Some(e) = engine.upgrade() else { return };
                // Bounded: a few attempts; if the server is gone again, the next Connected event retries.
                let mut confirmed = false;
                for _ in 0..5 {
                    if e.round_trip().await.is_ok() {
                        confirmed = true;
                        break;
                    }
                }
                if !confirmed {
                    continue;
                }
                lost = false;
                let top = match &e.control_stream {
                    Some(stream) => bounded_engine(e.timeout, stream.last_sequence()).await.ok(),
                    None => None,
                };
                e.catch_up.back(top);
                let channels = e.wanted_channels();
                tracing::info!(channels = channels.len(), "nats: connection made again; channels resubscribed");
                metrics::counter!("ringcast_engine_reconnects_total").increment(1);
                if let Some(inbound) = e.inbound() {
                    inbound.resubscribed(&channels);
                }
            }
            async_nats::Event::SlowConsumer(sid) => {
                metrics::counter!("ringcast_engine_errors_total", "op" => "inbound", "error" => "slow_consumer")
                    .increment(1);
                tracing::warn!(sid, "nats: a subscription fell behind; the server dropped publications");
            }
            other => tracing::debug!(event = %other, "nats: connection event"),
        }
    }
}

impl Broker for NatsEngine {
    /// With history, appended to the history stream (the offset and epoch assigned there: see
    /// [`super::jetstream`]); every node's live consumer of the channel delivers it. Without, on the
    /// channel's core subject at offset 0, no epoch.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        Box::pin(async move {
            if !self.connected() {
                return self.record(Err(EngineError::Unavailable));
            }
            if history.size > 0 {
                let r = match self.stream() {
                    Ok(stream) => {
                        bounded_engine(self.timeout, stream.append(&self.history_subject(channel), publication)).await
                    }
                    Err(e) => Err(e),
                };
                return self.record(r.map(|p| StreamPos { offset: p.offset, epoch: p.epoch.into() }));
            }
            let payload = Bytes::from(publication.encode_to_vec());
            self.send(self.channel_subject(channel), payload).await.map(|()| StreamPos::default())
        })
    }

    /// A history channel (`history.size > 0`) is received from the history stream by a live consumer,
    /// and also on its core subject (publications made with `skip_history` travel there, at offset 0).
    fn subscribe_node<'a>(&'a self, channel: &'a str, history: HistoryOptions) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let cell = {
                let mut channels = self.channels();
                let c = channels.entry(channel.to_string()).or_insert_with(|| Channel {
                    count: 0,
                    ready: Arc::new(OnceCell::new()),
                    tasks: Vec::new(),
                    delivered: None,
                });
                c.count += 1;
                c.ready.clone()
            };
            let r = match tokio::time::timeout(
                self.timeout * 2,
                cell.get_or_try_init(|| self.open(channel, &cell, history.size > 0)),
            )
            .await
            {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(EngineError::Timeout),
            };
            if r.is_err() {
                self.unsubscribe_node(channel);
            }
            self.record(r)
        })
    }

    fn unsubscribe_node(&self, channel: &str) {
        let tasks = {
            let mut channels = self.channels();
            match channels.get_mut(channel) {
                Some(c) if c.count > 1 => {
                    c.count -= 1;
                    None
                }
                Some(_) => channels.remove(channel).map(|c| c.tasks),
                None => None,
            }
        };
        // Dropping the subscription (with its task) sends UNSUB; the live consumer, without interest,
        // is deleted by the server after its inactive threshold.
        for task in tasks.into_iter().flatten() {
            task.abort();
        }
    }

    /// For a history channel: every message stored on its subject before the call (up to the subject's
    /// last sequence, read now) has been handed over by its live consumer. A core channel has nothing
    /// to wait for: `subscribe_remote` reads no history for it.
    fn barrier<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let delivered = self.channels().get(channel).and_then(|c| c.delivered.clone());
            let Some(mut delivered) = delivered else { return Ok(()) };
            let r = async {
                let stream = self.stream()?;
                let top = stream.last(&self.history_subject(channel)).await?.map_or(0, |l| l.seq);
                delivered.wait_for(|seq| *seq >= top).await.map(|_| ()).map_err(|_| EngineError::Unavailable)
            };
            self.record(bounded_engine(self.timeout, r).await)
        })
    }

    /// Announcements on core NATS; the rest stored in the control stream when there is one.
    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let payload = Bytes::from(serde_json::to_vec(control).map_err(|_| EngineError::Unavailable)?);
            match &self.control_stream {
                Some(stream) if !matches!(control, Control::Node(_)) => {
                    if !self.connected() {
                        return self.record(Err(EngineError::Unavailable));
                    }
                    self.record(bounded_engine(self.timeout, stream.append(payload)).await)
                }
                _ => self.send(format!("{}.control", self.prefix), payload).await,
            }
        })
    }

    fn status(&self) -> EngineStatus {
        let state = if !self.connected() {
            EngineState::Down
        } else if self.last_failed.load(Ordering::Relaxed) {
            EngineState::Degraded
        } else {
            EngineState::Up
        };
        let channels = self.channels().len();
        EngineStatus {
            kind: "nats",
            state,
            detail: format!(
                "{} (prefix {}{}{}): {channels} channels received by this node",
                without_credentials(&self.url),
                self.prefix,
                if self.history.is_some() { ", history in JetStream" } else { "" },
                if self.control_stream.is_some() { ", control in JetStream" } else { ", control over core NATS" }
            ),
        }
    }
}

/// History from the history stream ([`super::jetstream`]).
impl HistoryStore for NatsEngine {
    /// The position is the subject's last message's (a marker with a fresh epoch is stored when it holds
    /// none); the publications are read only when asked for and the position is past `since`, and kept
    /// to the namespace's `history_size` newest and its `history_ttl`.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        Box::pin(async move {
            if !self.connected() {
                return self.record(Err(EngineError::Unavailable));
            }
            let r = async {
                let stream = self.stream()?;
                let subject = self.history_subject(channel);
                let last = stream.position(&subject).await?;
                let after = read_after(filter, last.pos.offset, &last.pos.epoch)?;
                let pos = StreamPos { offset: last.pos.offset, epoch: last.pos.epoch.into() };
                let nothing_after = !filter.reverse && after == Some(pos.offset);
                if filter.limit == 0 || pos.offset == 0 || nothing_after {
                    return Ok((Vec::new(), pos));
                }
                let mut pubs = stream.read(&subject, last.seq, history.ttl).await?;
                // The stream keeps the largest history_size of any namespace; this one keeps its own.
                let oldest = pos.offset.saturating_sub(history.size as u64);
                pubs.retain(|p| p.offset > oldest);
                Ok((select(pubs, after, filter), pos))
            };
            match bounded_engine(self.timeout, r).await {
                Err(EngineError::UnrecoverablePosition) => Err(EngineError::UnrecoverablePosition),
                r => self.record(r),
            }
        })
    }

    /// Drops the publications, keeping offset and epoch (a marker holds them).
    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        Box::pin(async move {
            let r = match self.stream() {
                Ok(stream) => bounded_engine(self.timeout, stream.remove(&self.history_subject(channel))).await,
                Err(e) => Err(e),
            };
            self.record(r)
        })
    }
}

/// Never reached in a valid configuration (presence under `broker = "nats"` needs
/// `presence_manager = "redis"`, which replaces this one).
impl PresenceManager for NatsEngine {
    fn add_presence<'a>(&'a self, _channel: &'a str, _client: ClientId, _info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        Box::pin(async { Err(EngineError::Unavailable) })
    }

    fn remove_presence<'a>(&'a self, _channel: &'a str, _client: ClientId) -> EngineFuture<'a, ()> {
        Box::pin(async { Err(EngineError::Unavailable) })
    }

    fn presence<'a>(&'a self, _channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        Box::pin(async { Err(EngineError::Unavailable) })
    }

    fn presence_stats<'a>(&'a self, _channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        Box::pin(async { Err(EngineError::Unavailable) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn separators_wildcards_and_whitespace_are_escaped() {
        assert_eq!(escape("news"), "news");
        assert_eq!(escape("chat:room.1"), "chat:room%2E1");
        assert_eq!(escape("a*b>c d\te"), "a%2Ab%3Ec%20d%09e");
        assert_eq!(escape("100%"), "100%25");
        assert_eq!(escape("é"), "%C3%A9");
        assert_eq!(escape(""), "%");
        assert_eq!(unescape("%"), Some(String::new()));
        // Tokens escape never makes are not channel names.
        for bad in ["", "%41", "%2e", "%2", "a.b", "a b", "a*", "%C3"] {
            assert_eq!(unescape(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_prefix_must_be_subject_tokens_without_wildcards() {
        assert!(valid_prefix("ringcast"));
        assert!(valid_prefix("app.ringcast"));
        for bad in ["", "a..b", ".a", "a.", "a.*", "a>", "a b", "a.>"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_dashboard_never_shows_nats_credentials() {
        assert_eq!(without_credentials("nats://user:pw@127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(without_credentials("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    proptest! {
        #[test]
        fn escaping_is_reversible(channel in any::<String>()) {
            prop_assert_eq!(unescape(&escape(&channel)), Some(channel));
        }

        #[test]
        fn an_escaped_name_is_one_plain_subject_token(channel in any::<String>()) {
            let token = escape(&channel);
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_graphic() && b != b'.' && b != b'*' && b != b'>'));
        }

        #[test]
        fn different_channels_never_share_a_subject(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(escape(&a), escape(&b));
        }

        #[test]
        fn names_made_of_separators_stay_apart(parts in proptest::collection::vec("[a.*> %]{0,4}", 1..4)) {
            let joined = parts.join(".");
            prop_assert_eq!(unescape(&escape(&joined)), Some(joined));
        }
    }
}
