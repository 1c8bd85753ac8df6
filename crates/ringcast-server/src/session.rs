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
use crate::client::ClientShared;
use crate::node::Node;

/// The version string sent in connect replies.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Most commands of one frame that are run. A decoded `Command` is ~650 bytes, against 3 for its shortest
/// encoding (`{}` and a newline), so commands are decoded this many at a time; the commands of a frame
/// beyond the first `MAX_COMMANDS_PER_FRAME` are not run: each is answered with error 111 "too many
/// requests" (temporary, so SDKs retry it; Centrifugo's answer to a client over a command rate limit), and
/// the connection stays. Centrifugo itself has no per-frame count (its decoder streams), so no SDK frame
/// that stays within `client_channel_limit` subscriptions comes near it.
pub const MAX_COMMANDS_PER_FRAME: usize = 1024;

// Every subscribed idle connection carries a session and its subscriptions, so both are kept compact:
// what most clients do not have (a user and connection info, subscription-token info) is boxed and
// absent, and subscriptions sit in an exactly sized boxed slice (32 bytes each).

struct Sub {
    /// Shared with the hub's registry (and every other subscriber of the channel).
    channel: Arc<str>,
    /// `info` from the subscription token, if there was one.
    chan_info: Option<Box<Bytes>>,
    presence: bool,
    join_leave: bool,
}

impl Sub {
    fn chan_info(&self) -> Bytes {
        self.chan_info.as_deref().cloned().unwrap_or_default()
    }
}

/// Who the token said the client is (anonymous clients have none).
struct Identity {
    user: String,
    conn_info: Bytes,
}

pub struct Session {
    pub shared: Arc<ClientShared>,
    node: Arc<Node>,
    identity: Option<Box<Identity>>,
    /// Unix seconds when the connection's token expires (`None`: never; a token's 0 is stored as
    /// `i64::MIN`, long expired either way).
    expires_at: Option<NonZeroI64>,
    subs: Box<[Sub]>,
    /// Heartbeat settings announced in the connect reply (seconds).
    ping_interval: u32,
    connected: bool,
    /// The client answered the last server ping (an empty command).
    pub pong_received: bool,
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

impl Session {
    pub fn new(node: Arc<Node>, shared: Arc<ClientShared>, ping_interval: u32) -> Session {
        Session {
            shared,
            node,
            identity: None,
            expires_at: None,
            subs: Box::default(),
            ping_interval,
            connected: false,
            pong_received: true,
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
        loop {
            decode_commands_from(self.format(), payload, &mut pos, MAX_COMMANDS_PER_FRAME, commands).map_err(|e| {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => e.label()).increment(1);
                tracing::info!(client = %self.shared.id, error = %e, "disconnecting: malformed command");
                e.disconnect()
            })?;
            metrics::counter!("ringcast_messages_in_total").increment(commands.len() as u64);
            for cmd in commands.iter_mut() {
                let reply = if over_cap {
                    self.refuse_over_cap(cmd)
                } else {
                    self.cap_request(cmd);
                    self.handle(cmd)?
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
                return Ok(());
            }
            if !over_cap {
                metrics::counter!("ringcast_client_protocol_errors_total", "reason" => "too_many_commands")
                    .increment(1);
                tracing::info!(client = %self.shared.id, limit = MAX_COMMANDS_PER_FRAME, "commands over the per-frame limit answered 111");
            }
            over_cap = true;
        }
    }

    /// A command past [`MAX_COMMANDS_PER_FRAME`]: not run; answered "too many requests" if it expects a reply.
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
        let cap = self.node.client_limits.history_max_publication_limit;
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

    fn handle(&mut self, cmd: &Command) -> Result<Option<Reply>, DisconnectCode> {
        let id = cmd.id;
        let Some(request) = cmd.request() else {
            // An empty command answers our ping.
            self.pong_received = true;
            return Ok(None);
        };
        if !self.connected {
            return match request {
                Request::Connect(req) => self.connect(id, req).map(Some),
                _ => Err(DisconnectCode::BAD_REQUEST),
            };
        }
        let reply = match request {
            Request::Connect(_) => return Err(DisconnectCode::BAD_REQUEST),
            Request::Subscribe(req) => self.subscribe(id, req),
            Request::Unsubscribe(req) => {
                self.unsubscribe(&req.channel);
                Ok(Reply { id, unsubscribe: Some(UnsubscribeResult {}), ..Default::default() })
            }
            Request::Publish(req) => self.publish(id, &req.channel, req.data.clone()),
            Request::Presence(req) => self.check_read(&req.channel, |o| o.allow_presence_for_client).and_then(|_| {
                let presence = self.node.presence(&req.channel)?;
                Ok(Reply { id, presence: Some(PresenceResult { presence }), ..Default::default() })
            }),
            Request::PresenceStats(req) => {
                self.check_read(&req.channel, |o| o.allow_presence_for_client).and_then(|_| {
                    let (num_clients, num_users) = self.node.presence_stats(&req.channel)?;
                    Ok(Reply {
                        id,
                        presence_stats: Some(PresenceStatsResult { num_clients, num_users }),
                        ..Default::default()
                    })
                })
            }
            Request::History(req) => self.check_read(&req.channel, |o| o.allow_history_for_client).and_then(|_| {
                let filter = HistoryFilter {
                    since: req.since.as_ref().map(|s| (s.offset, s.epoch.clone())),
                    limit: req.limit,
                    reverse: req.reverse,
                };
                let (publications, pos) = self.node.history(&req.channel, &filter)?;
                Ok(Reply {
                    id,
                    history: Some(HistoryResult { publications, epoch: pos.epoch.to_string(), offset: pos.offset }),
                    ..Default::default()
                })
            }),
            Request::Ping(_) => Ok(Reply { id, ping: Some(Default::default()), ..Default::default() }),
            Request::Refresh(req) => self.refresh(id, &req.token),
            Request::SubRefresh(req) => {
                if !self.subs.iter().any(|s| *s.channel == *req.channel) {
                    Err(ErrorCode::PERMISSION_DENIED)
                } else {
                    self.verify_sub_token(&req.token, &req.channel).map(|_| Reply {
                        id,
                        sub_refresh: Some(SubRefreshResult::default()),
                        ..Default::default()
                    })
                }
            }
            Request::Send(_) => return Ok(None),
            Request::Rpc(_) => Err(ErrorCode::METHOD_NOT_FOUND),
        };
        Ok(Some(reply.unwrap_or_else(|code| error_reply(id, code))))
    }

    fn connect(&mut self, id: u32, req: &ConnectRequest) -> Result<Reply, DisconnectCode> {
        let mut channels = Vec::new();
        if req.token.is_empty() {
            if !self.node.allow_anonymous {
                tracing::info!(client = %self.shared.id, "disconnecting: connect without a token");
                return Err(DisconnectCode::INVALID_TOKEN);
            }
        } else {
            let Some(verifier) = &self.node.tokens else {
                return Err(DisconnectCode::INVALID_TOKEN);
            };
            match verifier.verify_connect(&req.token, now_unix()) {
                Ok(claims) => {
                    if !claims.user.is_empty() || !claims.info.is_empty() {
                        self.identity = Some(Box::new(Identity { user: claims.user, conn_info: claims.info }));
                    }
                    self.expires_at = expiry(claims.expires_at);
                    channels = claims.channels;
                }
                Err(e) => {
                    metrics::counter!("ringcast_auth_failures_total", "kind" => "connect").increment(1);
                    tracing::info!(client = %self.shared.id, error = %e, "connect token rejected");
                    return match e.for_connect() {
                        crate::auth::ConnectOutcome::Error(code) => Ok(error_reply(id, code)),
                        crate::auth::ConnectOutcome::Disconnect(code) => Err(code),
                    };
                }
            }
        }
        if !self.node.try_register_client(self.user(), &self.shared) {
            tracing::info!(client = %self.shared.id, user = self.user(), "disconnecting: user connection limit reached");
            return Err(DisconnectCode::CONNECTION_LIMIT);
        }
        self.connected = true;
        let mut result = ConnectResult {
            client: self.shared.id.to_string(),
            version: VERSION.to_string(),
            ping: self.ping_interval,
            pong: true,
            ..Default::default()
        };
        if let Some(secs) = self.expires_in() {
            result.expires = true;
            result.ttl = secs.clamp(0, i64::from(u32::MAX)) as u32;
        }
        // Server-side subscriptions from the token's `channels` claim.
        for channel in channels {
            let sub = SubscribeRequest { channel: channel.clone(), ..Default::default() };
            if let Ok(r) = self.do_subscribe(&sub, true) {
                result.subs.insert(channel, r);
            }
        }
        Ok(Reply { id, connect: Some(result), ..Default::default() })
    }

    /// Runs a command from the server API; returns the push to send the client, if any.
    pub fn server_command(&mut self, command: crate::client::ServerCommand) -> Option<Push> {
        use crate::client::ServerCommand;
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
                if !self.subs.iter().any(|s| *s.channel == *channel) {
                    return None;
                }
                self.unsubscribe(&channel);
                Some(Push {
                    channel,
                    unsubscribe: Some(Unsubscribe { code: 2000, reason: "server unsubscribe".into() }),
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

    fn verify_sub_token(&self, token: &str, channel: &str) -> Result<Bytes, ErrorCode> {
        let verifier = self.node.tokens.as_ref().ok_or(ErrorCode::PERMISSION_DENIED)?;
        verifier.verify_subscribe(token, self.user(), channel, now_unix()).map(|c| c.info).map_err(|e| {
            metrics::counter!("ringcast_auth_failures_total", "kind" => "subscribe").increment(1);
            e.for_subscribe()
        })
    }

    fn subscribe(&mut self, id: u32, req: &SubscribeRequest) -> Result<Reply, ErrorCode> {
        self.do_subscribe(req, false).map(|r| Reply { id, subscribe: Some(r), ..Default::default() })
    }

    /// Subscribes this client; `server_side` skips the client permission checks (token `channels`).
    fn do_subscribe(&mut self, req: &SubscribeRequest, server_side: bool) -> Result<SubscribeResult, ErrorCode> {
        let channel = req.channel.as_str();
        let node = self.node.clone();
        let opts = node.options(channel)?;
        if self.subs.iter().any(|s| *s.channel == *channel) {
            return Err(ErrorCode::ALREADY_SUBSCRIBED);
        }
        let mut chan_info = None;
        if !server_side {
            let has_token = if req.token.is_empty() {
                false
            } else {
                chan_info = Some(self.verify_sub_token(&req.token, channel)?).filter(|i| !i.is_empty());
                true
            };
            crate::namespace::can_subscribe(opts, channel, self.user(), has_token)
                .map_err(|_| ErrorCode::PERMISSION_DENIED)?;
        }
        let history = Node::history_options(opts);
        let recoverable = history.size > 0;
        let recovering = req.recover && recoverable;
        let (result, name) = node.hub.subscribe_with(
            channel,
            &self.shared,
            || node.broker.subscribe_node(channel),
            || {
                let mut r = SubscribeResult { recoverable, ..Default::default() };
                if recovering {
                    r.was_recovering = true;
                    let filter =
                        HistoryFilter { since: Some((req.offset, req.epoch.clone())), limit: -1, reverse: false };
                    match node.broker.history(channel, &filter) {
                        Ok((missed, pos)) => {
                            r.recovered = recovery_complete(&missed, req.offset, &pos);
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
                } else if recoverable {
                    let pos = node.broker.position(channel, history);
                    r.epoch = pos.epoch.to_string();
                    r.offset = pos.offset;
                }
                Ok::<_, ErrorCode>(r)
            },
        )?;
        if recovering {
            metrics::counter!("ringcast_recoveries_total", "recovered" => if result.recovered { "true" } else { "false" })
                .increment(1);
        }
        let info = self.client_info(chan_info.clone().unwrap_or_default());
        if opts.presence {
            node.broker.add_presence(channel, self.shared.id, info.clone());
        }
        if opts.join_leave {
            node.join(channel, &info, &self.shared);
        }
        // Exactly sized: one more element each time (subscribing is rare next to holding subscriptions).
        let mut subs = std::mem::take(&mut self.subs).into_vec();
        subs.reserve_exact(1);
        subs.push(Sub {
            channel: name,
            chan_info: chan_info.map(Box::new),
            presence: opts.presence,
            join_leave: opts.join_leave,
        });
        self.subs = subs.into_boxed_slice();
        metrics::gauge!("ringcast_subscriptions").increment(1.0);
        Ok(result)
    }

    fn unsubscribe(&mut self, channel: &str) {
        let Some(pos) = self.subs.iter().position(|s| *s.channel == *channel) else { return };
        let mut subs = std::mem::take(&mut self.subs).into_vec();
        let sub = subs.swap_remove(pos);
        self.subs = subs.into_boxed_slice();
        self.leave(&sub);
    }

    fn leave(&self, sub: &Sub) {
        self.node.hub.unsubscribe(&sub.channel, &self.shared, || self.node.broker.unsubscribe_node(&sub.channel));
        if sub.presence {
            self.node.broker.remove_presence(&sub.channel, self.shared.id);
        }
        if sub.join_leave {
            self.node.leave(&sub.channel, &self.client_info(sub.chan_info()), &self.shared);
        }
        metrics::gauge!("ringcast_subscriptions").decrement(1.0);
    }

    fn publish(&self, id: u32, channel: &str, data: Bytes) -> Result<Reply, ErrorCode> {
        let opts = self.node.options(channel)?;
        let sub = self.subs.iter().find(|s| *s.channel == *channel);
        crate::namespace::can_publish(opts, self.user(), sub.is_some()).map_err(|_| ErrorCode::PERMISSION_DENIED)?;
        let info = self.client_info(sub.map(Sub::chan_info).unwrap_or_default());
        self.node.publish(channel, data, Some(info))?;
        Ok(Reply { id, publish: Some(PublishResult {}), ..Default::default() })
    }

    /// Presence and history from a client need the namespace's permission (or a subscription).
    fn check_read(
        &self,
        channel: &str,
        allowed: impl Fn(&crate::namespace::ChannelOptions) -> bool,
    ) -> Result<(), ErrorCode> {
        let opts = self.node.options(channel)?;
        if allowed(opts) || self.subs.iter().any(|s| *s.channel == *channel) {
            Ok(())
        } else {
            Err(ErrorCode::PERMISSION_DENIED)
        }
    }

    fn refresh(&mut self, id: u32, token: &str) -> Result<Reply, ErrorCode> {
        let verifier = self.node.tokens.as_ref().ok_or(ErrorCode::PERMISSION_DENIED)?;
        let claims = verifier.verify_connect(token, now_unix()).map_err(|e| match e.for_refresh() {
            crate::auth::Outcome::Error(code) => code,
            crate::auth::Outcome::Disconnect(_) => ErrorCode::PERMISSION_DENIED,
        })?;
        if claims.user != self.user() {
            return Err(ErrorCode::PERMISSION_DENIED);
        }
        self.expires_at = expiry(claims.expires_at);
        let mut result =
            RefreshResult { client: self.shared.id.to_string(), version: VERSION.to_string(), ..Default::default() };
        if let Some(secs) = self.expires_in() {
            result.expires = true;
            result.ttl = secs.clamp(0, i64::from(u32::MAX)) as u32;
        }
        Ok(Reply { id, refresh: Some(result), ..Default::default() })
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
        for sub in std::mem::take(&mut self.subs) {
            self.leave(&sub);
        }
        if self.connected {
            self.node.unregister_client(self.user(), &self.shared);
        }
    }
}
