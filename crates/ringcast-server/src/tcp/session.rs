//! What a TCP client's commands do: connection, subscriptions and publications on the node.
//!
//! Permissions are the namespace policy's ([`crate::policy::namespace`]): `can_subscribe` and
//! `can_publish` decide, exactly as for a WebSocket client of the same user on the same channel. The
//! protocol's codes are decided in one place, [`Refusal::code`]:
//!
//! | refusal | code |
//! |---|---|
//! | CONNECT: no token and anonymous not allowed, invalid or expired token, token expired later | 7 unauthorized |
//! | CONNECT twice, user connection limit, channel options, namespace denial, channel limit | 8 permission denied |
//! | anything but CONNECT, PING, PONG before CONNECT | 10 not connected |
//! | a command over `client_command_rate` / `client_command_burst` | 9 rate limited |
//! | a PUBLISH over `client_channel_publish_rate` / `client_channel_publish_burst` for its channel | 9 rate limited |
//!
//! The command rate is the WebSocket session's (`session::CommandBucket`, one GCRA per connection, boxed
//! and only while the client has spent tokens): CONNECT, SUBSCRIBE, UNSUBSCRIBE and PUBLISH count, PING
//! does not (it is the keep-alive, and costs one PONG). A refused command is not run and is answered
//! ERROR 9 in its place in the reply order; the connection stays open. A client still refused
//! `client_flood_disconnect_after` after its first refusal (its bucket never full again meanwhile) gets
//! ERROR 9 as its last frame and is closed, as a WebSocket client is disconnected 3013.
//!
//! SUBSCRIBE to a channel already subscribed and UNSUBSCRIBE from one that is not are answered as if
//! they had just happened (SUBSCRIBED, UNSUBSCRIBED): a device retrying after a lost reply converges.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use ringcast_protocol::messages::ClientInfo;
use ringcast_wire::tcp::{Command, ErrorCode};

use crate::policy::namespace;
use crate::pubsub::client::ClientShared;
use crate::pubsub::node::Node;
use crate::session::{ChannelBuckets, CommandBucket, Throttle};
use crate::tcp::connection::TCP_ERRORS_TOTAL;

/// Why a command was refused: each becomes one error code ([`Refusal::code`]), never a disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token (or its absence) does not admit the client.
    Unauthorized,
    /// The policy does not allow this command here.
    Denied,
    /// The command needs a CONNECT first.
    NotConnected,
    /// Over `client_channel_publish_rate` for this channel.
    RateLimited,
}

impl Refusal {
    /// The ERROR frame's code.
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::Unauthorized => ErrorCode::UNAUTHORIZED,
            Refusal::Denied => ErrorCode::PERMISSION_DENIED,
            Refusal::NotConnected => ErrorCode::NOT_CONNECTED,
            Refusal::RateLimited => ErrorCode::RATE_LIMITED,
        }
    }
}

/// One TCP client's protocol state.
pub struct TcpSession {
    node: Arc<Node>,
    pub shared: Arc<ClientShared>,
    /// The user id once connected (`""` anonymous); `None` before CONNECT.
    user: Option<String>,
    /// The connection token's expiry (Unix seconds), if it has one.
    expires_at: Option<i64>,
    /// Channels subscribed, as the hub names them (shared with it).
    subs: Vec<Arc<str>>,
    /// The `client_command_rate` bucket, while the client has spent tokens (see the module docs).
    commands: Option<Box<CommandBucket>>,
    /// The `client_channel_publish_rate` buckets, once the client publishes with that limit on.
    publications: Option<Box<ChannelBuckets>>,
}

/// What the command rate says of one command ([`TcpSession::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Run,
    /// Answer ERROR 9 instead; the connection stays.
    Refuse,
    /// Refused for `client_flood_disconnect_after`: ERROR 9, then close.
    Flood,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Appends one reply frame. Replies built from decoded commands always fit their fields (a channel came
/// in a body whose length fits a u32), so an encoding error is our own bug: logged, never sent half.
pub fn emit<B: BufMut>(out: &mut B, cmd: Command<'_>) {
    if let Err(e) = cmd.encode(out) {
        tracing::warn!(error = %e, "tcp: reply not encodable");
    }
}

/// Appends an ERROR frame with the code's standard message.
pub fn emit_error<B: BufMut>(out: &mut B, code: ErrorCode) {
    emit(out, Command::Error { code, message: code.message() });
}

impl TcpSession {
    pub fn new(node: Arc<Node>, shared: Arc<ClientShared>) -> TcpSession {
        TcpSession { node, shared, user: None, expires_at: None, subs: Vec::new(), commands: None, publications: None }
    }

    pub fn is_connected(&self) -> bool {
        self.user.is_some()
    }

    /// Seconds until the connection token expires (negative: already), if it expires.
    pub fn expires_in(&self) -> Option<i64> {
        self.expires_at.map(|at| at - now_unix())
    }

    /// Whether a command or publication rate is configured (`client_command_rate` or
    /// `client_channel_publish_rate` > 0): the connection then reads the bucket clock.
    pub fn rate_limited(&self) -> bool {
        let limits = self.node.policy().client_limits;
        limits.commands.is_some() || limits.publications.is_some()
    }

    /// Whether `client_command_rate` lets `cmd` run; `now_us` is `session::now_us()`, read once per
    /// read pass (`None`: no rate configured). PING and PONG are never counted.
    pub fn admit(&mut self, cmd: &Command<'_>, now_us: Option<u64>) -> Admit {
        let (Some(quota), Some(now)) = (self.node.policy().client_limits.commands, now_us) else { return Admit::Run };
        if matches!(cmd, Command::Ping(_) | Command::Pong(_)) {
            return Admit::Run;
        }
        match self.commands.get_or_insert_with(Box::default).check(&quota, now) {
            Throttle::Run => Admit::Run,
            Throttle::Refuse { first } => {
                metrics::counter!(TCP_ERRORS_TOTAL, "reason" => "command_rate").increment(1);
                if first {
                    tracing::info!(client = %self.shared.id, "tcp: commands over client_command_rate answered 9");
                }
                Admit::Refuse
            }
            Throttle::Flood => {
                metrics::counter!(TCP_ERRORS_TOTAL, "reason" => "command_flood").increment(1);
                tracing::info!(client = %self.shared.id, "tcp: closing: over client_command_rate for client_flood_disconnect_after");
                Admit::Flood
            }
        }
    }

    /// Gives back a command bucket that is full again: a quiet client holds no limiter state. Called when
    /// the connection pings a silent client.
    pub fn drop_full_bucket(&mut self, now_us: u64) {
        if self.commands.as_ref().is_some_and(|b| b.is_full(now_us)) {
            self.commands = None;
        }
        if self.publications.as_ref().is_some_and(|b| b.all_full(now_us)) {
            self.publications = None;
        }
    }

    /// Runs one client command (never PONG: the connection's keepalive takes those) and appends its
    /// reply to `out`, or returns why it is refused.
    pub fn handle<B: BufMut>(&mut self, cmd: Command<'_>, out: &mut B) -> Result<(), Refusal> {
        match cmd {
            Command::Ping(body) => emit(out, Command::Pong(body)),
            Command::Connect { token } => {
                let client = self.connect(token)?;
                emit(out, Command::Connected { client: &client });
            }
            _ if !self.is_connected() => return Err(Refusal::NotConnected),
            Command::Subscribe { channel } => {
                self.subscribe(channel)?;
                emit(out, Command::Subscribed { channel });
            }
            Command::Unsubscribe { channel } => {
                self.unsubscribe(channel);
                emit(out, Command::Unsubscribed { channel });
            }
            Command::Publish { channel, data } => {
                let offset = self.publish(channel, data)?;
                emit(out, Command::Published { offset });
            }
            // What a server never receives is an unknown command for the decoder (`Role::Server`), so
            // none of these reach here; answered as unknown all the same, should one ever do.
            Command::Pong(_)
            | Command::Connected { .. }
            | Command::Subscribed { .. }
            | Command::Unsubscribed { .. }
            | Command::Published { .. }
            | Command::Message { .. }
            | Command::Error { .. } => emit_error(out, ErrorCode::UNKNOWN_COMMAND),
        }
        Ok(())
    }

    /// CONNECT: the same rules as a WebSocket connect (empty token: anonymous if allowed; otherwise a
    /// token the node's verifier accepts; the user connection limit). Returns the client id.
    fn connect(&mut self, token: &str) -> Result<String, Refusal> {
        if self.is_connected() {
            return Err(Refusal::Denied);
        }
        let (user, expires_at) = if token.is_empty() {
            if !self.node.policy().allow_anonymous {
                return Err(Refusal::Unauthorized);
            }
            (String::new(), None)
        } else {
            let policy = self.node.policy();
            let verifier = policy.tokens.as_ref().ok_or(Refusal::Unauthorized)?;
            match verifier.verify_connect(token, now_unix()) {
                Ok(claims) => (claims.user, claims.expires_at.filter(|at| *at > 0)),
                Err(e) => {
                    metrics::counter!("ringcast_auth_failures_total", "kind" => "tcp_connect").increment(1);
                    tracing::info!(client = %self.shared.id, error = %e, "tcp: connect token rejected");
                    return Err(Refusal::Unauthorized);
                }
            }
        };
        if expires_at.is_some_and(|at| at <= now_unix()) {
            return Err(Refusal::Unauthorized);
        }
        if !self.node.try_register_client(&user, &self.shared) {
            return Err(Refusal::Denied);
        }
        self.user = Some(user);
        self.expires_at = expires_at;
        Ok(self.shared.id.to_string())
    }

    fn user(&self) -> &str {
        self.user.as_deref().unwrap_or("")
    }

    fn subscribe(&mut self, channel: &str) -> Result<(), Refusal> {
        if self.subs.iter().any(|s| &**s == channel) {
            return Ok(());
        }
        let node = self.node.clone();
        let opts = node.options(channel).map_err(|_| Refusal::Denied)?;
        let opts = &*opts;
        let limit = node.policy().client_channel_limit;
        if limit > 0 && self.subs.len() >= limit {
            return Err(Refusal::Denied);
        }
        // No subscription tokens over TCP: the namespace must open the channel to this user.
        namespace::can_subscribe(opts, channel, self.user(), false).map_err(|_| Refusal::Denied)?;
        let ((), name) = if node.remote.is_some() {
            let history = crate::pubsub::node::Node::history_options(opts);
            let positioning = crate::pubsub::node::Positioning::None;
            node.subscribe_remote(channel, &self.shared, positioning, history, |_| ()).map_err(|_| Refusal::Denied)?
        } else {
            node.hub.subscribe_with(
                channel,
                &self.shared,
                || node.broker.subscribe_node(channel),
                || Ok::<_, Refusal>(()),
            )?
        };
        self.subs.push(name);
        metrics::gauge!("ringcast_subscriptions").increment(1.0);
        Ok(())
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Some(i) = self.subs.iter().position(|s| &**s == channel) {
            let name = self.subs.swap_remove(i);
            self.leave(&name);
        }
    }

    fn leave(&self, channel: &str) {
        if self.node.hub.unsubscribe(channel, &self.shared, || self.node.broker.unsubscribe_node(channel)) {
            self.node.left(channel);
        }
        metrics::gauge!("ringcast_subscriptions").decrement(1.0);
    }

    /// PUBLISH: `can_publish` as for a WebSocket client; returns the publication's offset (0 without
    /// history).
    fn publish(&mut self, channel: &str, data: &[u8]) -> Result<u64, Refusal> {
        let opts = self.node.options(channel).map_err(|_| Refusal::Denied)?;
        let opts = &*opts;
        let subscribed = self.subs.iter().any(|s| &**s == channel);
        namespace::can_publish(opts, self.user(), subscribed).map_err(|_| Refusal::Denied)?;
        if let Some(quota) = self.node.policy().client_limits.publications {
            let buckets = self.publications.get_or_insert_with(Box::default);
            if !buckets.allow(channel, &quota, crate::session::now_us()) {
                metrics::counter!(TCP_ERRORS_TOTAL, "reason" => "channel_publish_rate").increment(1);
                return Err(Refusal::RateLimited);
            }
        }
        let info =
            ClientInfo { user: self.user().to_string(), client: self.shared.id.to_string(), ..Default::default() };
        let (pos, _) =
            self.node.publish(channel, Bytes::copy_from_slice(data), Some(info)).map_err(|_| Refusal::Denied)?;
        metrics::counter!(crate::metrics::MESSAGES_IN_TOTAL).increment(1);
        Ok(pos.offset)
    }
}

impl Drop for TcpSession {
    fn drop(&mut self) {
        for channel in std::mem::take(&mut self.subs) {
            self.leave(&channel);
        }
        if let Some(user) = self.user.take() {
            self.node.unregister_client(&user, &self.shared);
        }
    }
}
