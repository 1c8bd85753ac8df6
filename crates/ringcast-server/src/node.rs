//! The node: one server's pub/sub state and the operations on it, shared by every client session and
//! by the HTTP API.
//!
//! It ties together the [`Hub`] (who is subscribed here), the [`Broker`] (ordering, history, presence),
//! channel namespaces and tokens, and a registry of connected clients by user (so the API can
//! disconnect a user). It does no IO: sessions and the API call it, and it queues frames on clients.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use ringcast_protocol::messages::{ClientInfo, Join, Leave, Publication, Push, Reply};
use ringcast_protocol::{encode_reply, publication_push_bytes, ErrorCode, Format};
use ringcast_wire::frame::{encode_header, OpCode, MAX_HEADER_LEN};

use crate::auth::TokenVerifier;
use crate::broker::{Broker, BrokerError, HistoryFilter, HistoryOptions, StreamPos};
use crate::client::{ClientId, ClientShared};
use crate::hub::{FanOut, Hub};
use crate::namespace::{ChannelOptions, Namespaces};

pub struct Node {
    pub hub: Hub,
    pub broker: Arc<dyn Broker>,
    pub namespaces: Namespaces,
    pub tokens: Option<TokenVerifier>,
    pub allow_anonymous: bool,
    /// Connected clients by user id ("" for anonymous).
    users: Mutex<HashMap<String, Vec<Arc<ClientShared>>>>,
    pub started: Instant,
    pub name: String,
    /// This node's unique id (random per process), as reported by the API's `info`.
    pub uid: String,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

/// Wraps a protocol payload in one unmasked WebSocket frame (text for JSON, binary for Protobuf).
pub fn ws_frame(format: Format, payload: &[u8]) -> Bytes {
    let opcode = if format.is_binary() { OpCode::Binary } else { OpCode::Text };
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    let mut out = BytesMut::with_capacity(h + payload.len());
    out.put_slice(&hdr[..h]);
    out.put_slice(payload);
    out.freeze()
}

/// A push, encoded and framed for one format.
pub fn push_frame(format: Format, push: Push) -> Option<Bytes> {
    let mut payload = BytesMut::new();
    encode_reply(format, &Reply::push(push), &mut payload).ok()?;
    Some(ws_frame(format, &payload))
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
            namespaces,
            tokens,
            allow_anonymous,
            users: Mutex::new(HashMap::new()),
            started: Instant::now(),
            name: "ringcast".into(),
            uid: format!("{}", crate::client::ClientId::random()),
        }
    }

    fn users(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<ClientShared>>>> {
        match self.users.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn options(&self, channel: &str) -> Result<&ChannelOptions, ErrorCode> {
        if !crate::namespace::is_valid_channel_name(channel) {
            return Err(ErrorCode::BAD_REQUEST);
        }
        self.namespaces.resolve(channel).map_err(|_| ErrorCode::UNKNOWN_CHANNEL)
    }

    pub fn history_options(opts: &ChannelOptions) -> HistoryOptions {
        HistoryOptions { size: opts.history_size, ttl: opts.history_ttl, ..Default::default() }
    }

    pub fn register_client(&self, user: &str, client: &Arc<ClientShared>) {
        self.users().entry(user.to_string()).or_default().push(client.clone());
    }

    pub fn unregister_client(&self, user: &str, client: ClientId) {
        let mut users = self.users();
        if let Some(list) = users.get_mut(user) {
            list.retain(|c| c.id != client);
            if list.is_empty() {
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

    /// (connected clients, distinct users).
    pub fn counts(&self) -> (usize, usize) {
        let users = self.users();
        (users.values().map(Vec::len).sum(), users.len())
    }

    /// Publishes to `channel`: appends to history (per its namespace) and delivers to every local
    /// subscriber, encoded once per format. Returns the stream position.
    pub fn publish(
        &self,
        channel: &str,
        data: Bytes,
        info: Option<ClientInfo>,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        let history = Self::history_options(self.options(channel)?);
        self.publish_to(channel, data, info, history)
    }

    /// Publishes without appending to history (the API's `skip_history`).
    pub fn publish_without_history(&self, channel: &str, data: Bytes) -> Result<(StreamPos, FanOut), ErrorCode> {
        self.options(channel)?;
        self.publish_to(channel, data, None, HistoryOptions::default())
    }

    fn publish_to(
        &self,
        channel: &str,
        data: Bytes,
        info: Option<ClientInfo>,
        history: HistoryOptions,
    ) -> Result<(StreamPos, FanOut), ErrorCode> {
        let ((_, pos), fan) = self.hub.publish_with(
            channel,
            || {
                let mut publication = Publication { data, info, ..Default::default() };
                let pos = self.broker.publish(channel, &mut publication, history);
                (publication, pos)
            },
            |(publication, _), format| {
                let payload = publication_push_bytes(format, channel, publication).ok()?;
                Some(ws_frame(format, &payload))
            },
        );
        // Delivery counts are recorded by the hub; the publish-to-delivery histogram is recorded by each subscriber's connection, when it takes
        // the frames to write them (`ClientShared::take`).
        Ok((pos, fan))
    }

    pub fn history(&self, channel: &str, filter: &HistoryFilter) -> Result<(Vec<Publication>, StreamPos), ErrorCode> {
        let opts = self.options(channel)?;
        if opts.history_size == 0 {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        self.broker.history(channel, filter).map_err(|e| match e {
            BrokerError::UnrecoverablePosition => ErrorCode::UNRECOVERABLE_POSITION,
        })
    }

    /// Sends a join push to the channel's other subscribers.
    pub fn join(&self, channel: &str, info: &ClientInfo, skip: ClientId) {
        self.membership_push(channel, skip, |push| push.join = Some(Join { info: Some(info.clone()) }));
    }

    /// Sends a leave push to the channel's other subscribers.
    pub fn leave(&self, channel: &str, info: &ClientInfo, skip: ClientId) {
        self.membership_push(channel, skip, |push| push.leave = Some(Leave { info: Some(info.clone()) }));
    }

    fn membership_push(&self, channel: &str, skip: ClientId, set: impl Fn(&mut Push)) {
        let push = |format| {
            let mut push = Push { channel: channel.to_string(), ..Default::default() };
            set(&mut push);
            push_frame(format, push)
        };
        self.hub.broadcast(channel, Some(skip), &push);
    }

    /// Presence of a channel, keyed by client id.
    pub fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfo>, ErrorCode> {
        let opts = self.options(channel)?;
        if !opts.presence {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        Ok(self.broker.presence(channel))
    }

    pub fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ErrorCode> {
        let opts = self.options(channel)?;
        if !opts.presence {
            return Err(ErrorCode::NOT_AVAILABLE);
        }
        Ok(self.broker.presence_stats(channel))
    }
}
