//! The client protocol v2 messages, one Rust struct per message of Centrifugo's `client.proto`.
//!
//! Each struct serves both wire formats:
//!
//! * **Protobuf** through a hand-written `prost::Message` derive. The tags are the published field numbers;
//!   they are the wire format, so a tag here must never change (tests in this module pin several of them
//!   against hand-computed bytes). Fields reserved in the proto are simply absent.
//! * **JSON** through serde, shaped like Centrifugo's own encoder: field names as in the proto (snake_case),
//!   fields in proto order, zero values (0, false, "", empty list/map, absent message) omitted, `null` read
//!   as absent, unknown fields ignored. `data`-like `bytes` fields hold the *raw JSON text* of an embedded
//!   value in JSON mode and opaque bytes in Protobuf mode (the `serde_helpers` module).
//!
//! A few fields are always written in JSON because Centrifugo always writes them and the SDKs read them
//! without a fallback: `ClientInfo.user`/`client`, `PresenceResult.presence`, `PresenceStatsResult`'s counts
//! and all of `HistoryResult`.
//!
//! Every `Option<…Result>` in [`Reply`] is a presence flag as much as a value: an SDK resolves a call by
//! looking for its result key, so an empty result must still be sent (`{"id":3,"publish":{}}`), which
//! `Some(PublishResult {})` does in both formats.
//!
//! Maps are `BTreeMap` so that encoding is deterministic (tests and byte-identical fast paths rely on it).
//!
//! This module holds data only; framing (several messages per WebSocket message) lives in [`crate::codec`].

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::serde_helpers::{is_default, nullable, raw_json};

// ---------------------------------------------------------------------------------------------------------
// Envelopes
// ---------------------------------------------------------------------------------------------------------

/// An error in a [`Reply`]. Codes and messages are in [`crate::codes`].
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Error {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub code: u32,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub message: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub temporary: bool,
}

/// A command from a client. At most one request field is meant to be set; [`Command::request`] picks the
/// first one in proto order, as Centrifugo does. A command with no request at all is the client's pong
/// (`{}` in JSON, an empty message in Protobuf).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Command {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub id: u32,
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectRequest>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeRequest>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<UnsubscribeRequest>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishRequest>,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceRequest>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsRequest>,
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryRequest>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<PingRequest>,
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<SendRequest>,
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcRequest>,
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshRequest>,
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshRequest>,
}

/// The method of a [`Command`], for dispatch, logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Connect,
    Subscribe,
    Unsubscribe,
    Publish,
    Presence,
    PresenceStats,
    History,
    Ping,
    Send,
    Rpc,
    Refresh,
    SubRefresh,
}

impl Method {
    /// The JSON field name of the request, also a stable metric label.
    pub fn name(self) -> &'static str {
        match self {
            Method::Connect => "connect",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::Publish => "publish",
            Method::Presence => "presence",
            Method::PresenceStats => "presence_stats",
            Method::History => "history",
            Method::Ping => "ping",
            Method::Send => "send",
            Method::Rpc => "rpc",
            Method::Refresh => "refresh",
            Method::SubRefresh => "sub_refresh",
        }
    }
}

/// A borrowed view of the request a [`Command`] carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Request<'a> {
    Connect(&'a ConnectRequest),
    Subscribe(&'a SubscribeRequest),
    Unsubscribe(&'a UnsubscribeRequest),
    Publish(&'a PublishRequest),
    Presence(&'a PresenceRequest),
    PresenceStats(&'a PresenceStatsRequest),
    History(&'a HistoryRequest),
    Ping(&'a PingRequest),
    Send(&'a SendRequest),
    Rpc(&'a RpcRequest),
    Refresh(&'a RefreshRequest),
    SubRefresh(&'a SubRefreshRequest),
}

impl Request<'_> {
    pub fn method(&self) -> Method {
        match self {
            Request::Connect(_) => Method::Connect,
            Request::Subscribe(_) => Method::Subscribe,
            Request::Unsubscribe(_) => Method::Unsubscribe,
            Request::Publish(_) => Method::Publish,
            Request::Presence(_) => Method::Presence,
            Request::PresenceStats(_) => Method::PresenceStats,
            Request::History(_) => Method::History,
            Request::Ping(_) => Method::Ping,
            Request::Send(_) => Method::Send,
            Request::Rpc(_) => Method::Rpc,
            Request::Refresh(_) => Method::Refresh,
            Request::SubRefresh(_) => Method::SubRefresh,
        }
    }
}

impl Command {
    /// The request this command carries: the first set field in proto order (later ones are ignored, as
    /// Centrifugo does), or `None` for an empty command — the pong answering a server ping.
    pub fn request(&self) -> Option<Request<'_>> {
        // Written as a chain so the order is visibly the proto's field order.
        (self.connect.as_ref().map(Request::Connect))
            .or_else(|| self.subscribe.as_ref().map(Request::Subscribe))
            .or_else(|| self.unsubscribe.as_ref().map(Request::Unsubscribe))
            .or_else(|| self.publish.as_ref().map(Request::Publish))
            .or_else(|| self.presence.as_ref().map(Request::Presence))
            .or_else(|| self.presence_stats.as_ref().map(Request::PresenceStats))
            .or_else(|| self.history.as_ref().map(Request::History))
            .or_else(|| self.ping.as_ref().map(Request::Ping))
            .or_else(|| self.send.as_ref().map(Request::Send))
            .or_else(|| self.rpc.as_ref().map(Request::Rpc))
            .or_else(|| self.refresh.as_ref().map(Request::Refresh))
            .or_else(|| self.sub_refresh.as_ref().map(Request::SubRefresh))
    }

    /// The method of [`Command::request`].
    pub fn method(&self) -> Option<Method> {
        self.request().map(|r| r.method())
    }
}

/// A message from the server: the reply to a command (`id > 0`, with `error` or one result), an
/// asynchronous [`Push`] (`id == 0`), or — with nothing set, `{}` — the server's ping.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Reply {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub id: u32,
    #[prost(message, optional, tag = "2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    #[prost(message, optional, tag = "4")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectResult>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeResult>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<UnsubscribeResult>,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishResult>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceResult>,
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsResult>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryResult>,
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping: Option<PingResult>,
    #[prost(message, optional, tag = "13")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcResult>,
    #[prost(message, optional, tag = "14")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshResult>,
    #[prost(message, optional, tag = "15")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<SubRefreshResult>,
}

impl Reply {
    /// The empty reply the server sends as a ping when `ConnectResult.pong` is set.
    pub fn server_ping() -> Reply {
        Reply::default()
    }

    /// An error reply to command `id`.
    pub fn error(id: u32, error: Error) -> Reply {
        Reply { id, error: Some(error), ..Reply::default() }
    }

    /// An asynchronous push (no id).
    pub fn push(push: Push) -> Reply {
        Reply { push: Some(push), ..Reply::default() }
    }

    /// Whether this is the server's ping: no id, no error, no push, no result.
    pub fn is_server_ping(&self) -> bool {
        *self == Reply::default()
    }
}

/// An asynchronous message about `channel` (or the connection, for `connect`/`disconnect`/`refresh`). One of
/// the payload fields is set.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Push {
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
    /// `pub` on the wire (a Rust keyword).
    #[prost(message, optional, tag = "4")]
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    pub publication: Option<Publication>,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<Join>,
    #[prost(message, optional, tag = "6")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leave: Option<Leave>,
    #[prost(message, optional, tag = "7")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<Unsubscribe>,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[prost(message, optional, tag = "9")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Subscribe>,
    #[prost(message, optional, tag = "10")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Connect>,
    #[prost(message, optional, tag = "11")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<Disconnect>,
    #[prost(message, optional, tag = "12")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Refresh>,
}

// ---------------------------------------------------------------------------------------------------------
// Push payloads
// ---------------------------------------------------------------------------------------------------------

/// Who a client is, as shown in presence, join/leave and publications.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientInfo {
    /// Always written in JSON, even empty (anonymous user).
    #[prost(string, tag = "1")]
    #[serde(deserialize_with = "nullable")]
    pub user: String,
    /// Always written in JSON.
    #[prost(string, tag = "2")]
    #[serde(deserialize_with = "nullable")]
    pub client: String,
    #[prost(bytes = "bytes", tag = "3")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub conn_info: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub chan_info: Bytes,
}

/// A message published into a channel.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Publication {
    #[prost(bytes = "bytes", tag = "4")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(message, optional, tag = "5")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    /// Position in the channel's stream; its epoch travels in `SubscribeResult`.
    #[prost(uint64, tag = "6")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub offset: u64,
    #[prost(btree_map = "string, string", tag = "7")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub tags: BTreeMap<String, String>,
    /// `data` is a delta against the previous publication (delta compression).
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub delta: bool,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Join {
    #[prost(message, optional, tag = "1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Leave {
    #[prost(message, optional, tag = "1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
}

/// The server unsubscribed the client from a channel (codes below 2500 mean "do not resubscribe").
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Unsubscribe {
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub code: u32,
    #[prost(string, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub reason: String,
}

/// The server subscribed the client to a channel (server-side subscription).
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Subscribe {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub recoverable: bool,
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub epoch: String,
    #[prost(uint64, tag = "5")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub offset: u64,
    #[prost(bool, tag = "6")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub positioned: bool,
    #[prost(bytes = "bytes", tag = "7")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
}

/// An asynchronous message to one client (not through a channel).
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Message {
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
}

/// Connection established without a connect command (unidirectional transports).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Connect {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub client: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub version: String,
    #[prost(bytes = "bytes", tag = "3")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(btree_map = "string, message", tag = "4")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub subs: BTreeMap<String, SubscribeResult>,
    #[prost(bool, tag = "5")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "6")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
    #[prost(uint32, tag = "7")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ping: u32,
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub pong: bool,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub session: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub node: String,
}

/// The server is closing the connection (sent before the close frame on transports without close codes).
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Disconnect {
    #[prost(uint32, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub code: u32,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub reason: String,
    /// Protocol v1 leftover; v2 clients decide from `code` ([`crate::codes::reconnect`]).
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub reconnect: bool,
}

/// The connection's expiry was extended server-side.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct Refresh {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
}

// ---------------------------------------------------------------------------------------------------------
// Requests and results
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub token: String,
    #[prost(bytes = "bytes", tag = "2")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    /// Subscriptions to restore in the same round trip (channel → request).
    #[prost(btree_map = "string, message", tag = "3")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub subs: BTreeMap<String, SubscribeRequest>,
    /// SDK name, e.g. "js".
    #[prost(string, tag = "4")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub name: String,
    /// SDK version.
    #[prost(string, tag = "5")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub version: String,
    /// Emulated HTTP headers (transports that cannot set real ones).
    #[prost(btree_map = "string, string", tag = "6")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectResult {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub client: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub version: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
    #[prost(bytes = "bytes", tag = "5")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(btree_map = "string, message", tag = "6")]
    #[serde(skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "nullable")]
    pub subs: BTreeMap<String, SubscribeResult>,
    /// Server ping interval in seconds (0 = no server pings).
    #[prost(uint32, tag = "7")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ping: u32,
    /// The client must answer each server ping with an empty command.
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub pong: bool,
    #[prost(string, tag = "9")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub session: String,
    #[prost(string, tag = "10")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub node: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub token: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RefreshResult {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub client: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub version: String,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "4")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub token: String,
    /// Recover missed publications from `epoch`/`offset`.
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub recover: bool,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub epoch: String,
    #[prost(uint64, tag = "7")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub offset: u64,
    #[prost(bytes = "bytes", tag = "8")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub positioned: bool,
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub recoverable: bool,
    #[prost(bool, tag = "11")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub join_leave: bool,
    /// Requested delta compression format ("fossil"), empty for none.
    #[prost(string, tag = "12")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub delta: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscribeResult {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
    #[prost(bool, tag = "3")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub recoverable: bool,
    #[prost(string, tag = "6")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub epoch: String,
    /// Recovered publications, oldest first.
    #[prost(message, repeated, tag = "7")]
    #[serde(skip_serializing_if = "Vec::is_empty", deserialize_with = "nullable")]
    pub publications: Vec<Publication>,
    #[prost(bool, tag = "8")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub recovered: bool,
    #[prost(uint64, tag = "9")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub offset: u64,
    #[prost(bool, tag = "10")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub positioned: bool,
    #[prost(bytes = "bytes", tag = "11")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(bool, tag = "12")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub was_recovering: bool,
    #[prost(bool, tag = "13")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub delta: bool,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub token: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SubRefreshResult {
    #[prost(bool, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub expires: bool,
    #[prost(uint32, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub ttl: u32,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct UnsubscribeRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct UnsubscribeResult {}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
    #[prost(bytes = "bytes", tag = "2")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct PublishResult {}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceResult {
    /// client id → info. Always written in JSON, `{}` when nobody is present.
    #[prost(btree_map = "string, message", tag = "1")]
    #[serde(deserialize_with = "nullable")]
    pub presence: BTreeMap<String, ClientInfo>,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceStatsRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
}

/// Both counts are always written in JSON, zeros included.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct PresenceStatsResult {
    #[prost(uint32, tag = "1")]
    #[serde(deserialize_with = "nullable")]
    pub num_clients: u32,
    #[prost(uint32, tag = "2")]
    #[serde(deserialize_with = "nullable")]
    pub num_users: u32,
}

/// A position in a channel's stream: the offset is only meaningful within its epoch.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamPosition {
    #[prost(uint64, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub offset: u64,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub epoch: String,
}

#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryRequest {
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub channel: String,
    #[prost(int32, tag = "7")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub limit: i32,
    #[prost(message, optional, tag = "8")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
    #[prost(bool, tag = "9")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub reverse: bool,
}

/// All three fields are always written in JSON (`"publications":[]` when there are none).
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct HistoryResult {
    #[prost(message, repeated, tag = "1")]
    #[serde(deserialize_with = "nullable")]
    pub publications: Vec<Publication>,
    #[prost(string, tag = "2")]
    #[serde(deserialize_with = "nullable")]
    pub epoch: String,
    #[prost(uint64, tag = "3")]
    #[serde(deserialize_with = "nullable")]
    pub offset: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct PingRequest {}

#[derive(Clone, Copy, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
pub struct PingResult {}

/// `RPCRequest` in the proto.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcRequest {
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "is_default", deserialize_with = "nullable")]
    pub method: String,
}

/// `RPCResult` in the proto.
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcResult {
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
}

/// A message to the server that expects no reply (and carries no id).
#[derive(Clone, PartialEq, Eq, prost::Message, Serialize, Deserialize)]
#[serde(default)]
pub struct SendRequest {
    #[prost(bytes = "bytes", tag = "1")]
    #[serde(skip_serializing_if = "Bytes::is_empty", with = "raw_json")]
    pub data: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use serde_json::json;

    fn to_json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_json::from_str(text).unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    }

    // --- JSON shapes (PROTOCOL-NOTES.md, Centrifugo's encoder) -------------------------------------------

    #[test]
    fn connect_command_and_reply_json_shapes() {
        let cmd: Command = from_json(r#"{"id":1,"connect":{"token":"<jwt>","name":"js"}}"#);
        assert_eq!(cmd.id, 1);
        let connect = cmd.connect.as_ref().unwrap();
        assert_eq!((connect.token.as_str(), connect.name.as_str()), ("<jwt>", "js"));

        let reply = Reply {
            id: 1,
            connect: Some(ConnectResult {
                client: "8b1c".into(),
                version: "0.1.0".into(),
                ping: 25,
                pong: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(to_json(&reply), r#"{"id":1,"connect":{"client":"8b1c","version":"0.1.0","ping":25,"pong":true}}"#);
    }

    #[test]
    fn subscribe_with_recovery_json_shapes() {
        let cmd: Command =
            from_json(r#"{"id":2,"subscribe":{"channel":"news","recover":true,"epoch":"ab12","offset":5}}"#);
        let sub = cmd.subscribe.unwrap();
        assert_eq!((sub.channel.as_str(), sub.recover, sub.epoch.as_str(), sub.offset), ("news", true, "ab12", 5));

        let reply = Reply {
            id: 2,
            subscribe: Some(SubscribeResult {
                recoverable: true,
                epoch: "ab12".into(),
                offset: 7,
                was_recovering: true,
                recovered: true,
                publications: vec![
                    Publication { data: Bytes::from_static(br#"{"n":6}"#), offset: 6, ..Default::default() },
                    Publication { data: Bytes::from_static(br#"{"n":7}"#), offset: 7, ..Default::default() },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = to_json(&reply);
        // Proto field order, as Centrifugo writes it …
        assert_eq!(
            text,
            r#"{"id":2,"subscribe":{"recoverable":true,"epoch":"ab12","publications":[{"data":{"n":6},"offset":6},{"data":{"n":7},"offset":7}],"recovered":true,"offset":7,"was_recovering":true}}"#
        );
        // … and the same object as the notes' example.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            json!({"id":2,"subscribe":{"recoverable":true,"epoch":"ab12","offset":7,"was_recovering":true,
                   "recovered":true,"publications":[{"data":{"n":6},"offset":6},{"data":{"n":7},"offset":7}]}})
        );
    }

    #[test]
    fn error_reply_json_shape() {
        let reply = Reply::error(3, crate::codes::ErrorCode::PERMISSION_DENIED.into());
        assert_eq!(to_json(&reply), r#"{"id":3,"error":{"code":103,"message":"permission denied"}}"#);
        let temporary = Reply::error(4, crate::codes::ErrorCode::INTERNAL.into());
        assert_eq!(
            to_json(&temporary),
            r#"{"id":4,"error":{"code":100,"message":"internal server error","temporary":true}}"#
        );
    }

    #[test]
    fn empty_result_is_still_sent_so_the_sdk_sees_its_key() {
        // The SDKs resolve a call by reading `reply.publish` / `reply.subscribe` …: an absent key would
        // leave them with `undefined`.
        let reply = Reply { id: 3, publish: Some(PublishResult {}), ..Default::default() };
        assert_eq!(to_json(&reply), r#"{"id":3,"publish":{}}"#);
        let reply = Reply { id: 4, subscribe: Some(SubscribeResult::default()), ..Default::default() };
        assert_eq!(to_json(&reply), r#"{"id":4,"subscribe":{}}"#);
        // In Protobuf the empty message is present too: tag 8, length 0.
        let reply = Reply { id: 3, publish: Some(PublishResult {}), ..Default::default() };
        assert_eq!(hex(&reply.encode_to_vec()), "08 03 42 00");
        assert_eq!(Reply::decode(&[0x08, 0x03, 0x42, 0x00][..]).unwrap(), reply);
    }

    #[test]
    fn ping_is_an_empty_object_both_ways() {
        assert_eq!(to_json(&Reply::server_ping()), "{}");
        assert!(Reply::server_ping().is_server_ping());
        assert!(Reply::server_ping().encode_to_vec().is_empty());
        let pong: Command = from_json("{}");
        assert_eq!(pong, Command::default());
        assert_eq!(pong.method(), None);
        assert_eq!(to_json(&Command::default()), "{}");
    }

    #[test]
    fn publication_push_json_shape() {
        let reply = Reply::push(Push {
            channel: "news".into(),
            publication: Some(Publication { data: Bytes::from_static(br#"{"x":1}"#), offset: 8, ..Default::default() }),
            ..Default::default()
        });
        assert_eq!(to_json(&reply), r#"{"push":{"channel":"news","pub":{"data":{"x":1},"offset":8}}}"#);
    }

    #[test]
    fn other_push_json_shapes() {
        let info = ClientInfo { user: "u".into(), client: "c".into(), ..Default::default() };
        let cases = [
            (
                Push { channel: "ch".into(), join: Some(Join { info: Some(info.clone()) }), ..Default::default() },
                r#"{"channel":"ch","join":{"info":{"user":"u","client":"c"}}}"#,
            ),
            (
                Push { channel: "ch".into(), leave: Some(Leave { info: Some(info) }), ..Default::default() },
                r#"{"channel":"ch","leave":{"info":{"user":"u","client":"c"}}}"#,
            ),
            (
                Push {
                    channel: "ch".into(),
                    unsubscribe: Some(Unsubscribe { code: 2000, reason: "server unsubscribe".into() }),
                    ..Default::default()
                },
                r#"{"channel":"ch","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}"#,
            ),
            (
                Push { message: Some(Message { data: Bytes::from_static(b"\"hi\"") }), ..Default::default() },
                r#"{"message":{"data":"hi"}}"#,
            ),
            (
                Push { disconnect: Some(crate::codes::DisconnectCode::SHUTDOWN.to_message()), ..Default::default() },
                r#"{"disconnect":{"code":3001,"reason":"shutdown","reconnect":true}}"#,
            ),
            (
                Push { refresh: Some(Refresh { expires: true, ttl: 60 }), ..Default::default() },
                r#"{"refresh":{"expires":true,"ttl":60}}"#,
            ),
        ];
        for (push, expected) in cases {
            assert_eq!(to_json(&push), expected);
            assert_eq!(from_json::<Push>(expected), push);
        }
    }

    #[test]
    fn fields_centrifugo_always_writes() {
        let anonymous = ClientInfo { client: "c".into(), ..Default::default() };
        assert_eq!(to_json(&anonymous), r#"{"user":"","client":"c"}"#);
        assert_eq!(to_json(&PresenceStatsResult::default()), r#"{"num_clients":0,"num_users":0}"#);
        assert_eq!(to_json(&HistoryResult::default()), r#"{"publications":[],"epoch":"","offset":0}"#);
        assert_eq!(to_json(&PresenceResult::default()), r#"{"presence":{}}"#);
        let presence = PresenceResult { presence: BTreeMap::from([("c".to_owned(), anonymous)]) };
        assert_eq!(to_json(&presence), r#"{"presence":{"c":{"user":"","client":"c"}}}"#);
    }

    // --- JSON decoding rules ------------------------------------------------------------------------------

    #[test]
    fn data_is_embedded_raw_json_not_base64_or_string() {
        for data in [r#"{"a":[1,2,{"b":null}]}"#, r#""text""#, "42", "-1.5e3", "true", "[]", r#"{"k":"\u00e9\n"}"#] {
            let text = format!(r#"{{"id":3,"publish":{{"channel":"c","data":{data}}}}}"#);
            let cmd: Command = from_json(&text);
            assert_eq!(cmd.publish.as_ref().unwrap().data, data.as_bytes(), "{data}");
            assert_eq!(to_json(&cmd), text, "written back verbatim");
        }
    }

    #[test]
    fn data_keeps_inner_whitespace_and_drops_outer() {
        let cmd: Command = from_json("{\"publish\":{\"data\":  { \"a\" : 1 }  }}");
        assert_eq!(cmd.publish.unwrap().data, Bytes::from_static(b"{ \"a\" : 1 }"));
        let raw = PublishRequest { channel: String::new(), data: Bytes::from_static(b"\n [1] \t") };
        assert_eq!(to_json(&raw), r#"{"data":[1]}"#);
    }

    #[test]
    fn null_reads_as_absent() {
        let cmd: Command = from_json(
            r#"{"id":null,"connect":null,"subscribe":{"channel":"news","token":null,"recover":null,"offset":null,"data":null}}"#,
        );
        assert_eq!(cmd.id, 0);
        assert_eq!(cmd.connect, None);
        assert_eq!(cmd.subscribe, Some(SubscribeRequest { channel: "news".into(), ..Default::default() }));
        let connect: ConnectRequest = from_json(r#"{"subs":null,"headers":null,"data":null}"#);
        assert_eq!(connect, ConnectRequest::default());
        let history: HistoryResult = from_json(r#"{"publications":null,"epoch":null}"#);
        assert_eq!(history, HistoryResult::default());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let cmd: Command = from_json(
            r#"{"id":1,"subscribe":{"channel":"c","tf":{"op":"and","nodes":[]},"flag":3,"type":1},"emulation":{"x":[1]}}"#,
        );
        assert_eq!(cmd.subscribe, Some(SubscribeRequest { channel: "c".into(), ..Default::default() }));
        let result: PublishResult = from_json(r#"{"debounce":100}"#);
        assert_eq!(result, PublishResult {});
    }

    #[test]
    fn first_request_in_proto_order_wins() {
        let cmd: Command = from_json(r#"{"id":1,"publish":{"channel":"b"},"subscribe":{"channel":"a"}}"#);
        assert_eq!(cmd.method(), Some(Method::Subscribe));
        match cmd.request() {
            Some(Request::Subscribe(s)) => assert_eq!(s.channel, "a"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Method::PresenceStats.name(), "presence_stats");
    }

    #[test]
    fn every_command_method_is_recognised_by_its_json_key() {
        for (key, method) in [
            ("connect", Method::Connect),
            ("subscribe", Method::Subscribe),
            ("unsubscribe", Method::Unsubscribe),
            ("publish", Method::Publish),
            ("presence", Method::Presence),
            ("presence_stats", Method::PresenceStats),
            ("history", Method::History),
            ("ping", Method::Ping),
            ("send", Method::Send),
            ("rpc", Method::Rpc),
            ("refresh", Method::Refresh),
            ("sub_refresh", Method::SubRefresh),
        ] {
            let cmd: Command = from_json(&format!(r#"{{"id":1,"{key}":{{}}}}"#));
            assert_eq!(cmd.method(), Some(method));
            assert_eq!(method.name(), key);
        }
    }

    // --- Protobuf: tags pinned by hand-computed bytes --------------------------------------------------

    #[test]
    fn protobuf_subscribe_command_bytes() {
        let cmd = Command {
            id: 1,
            subscribe: Some(SubscribeRequest {
                channel: "news".into(),
                recover: true,
                offset: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        // id(1)=1 | subscribe(5) len 10 { channel(1) "news" | recover(3)=1 | offset(7)=5 }
        assert_eq!(hex(&cmd.encode_to_vec()), "08 01 2a 0a 0a 04 6e 65 77 73 18 01 38 05");
        // Length-delimited, as in a frame.
        assert_eq!(cmd.encode_length_delimited_to_vec()[0], 14);
    }

    #[test]
    fn protobuf_error_reply_bytes() {
        let reply = Reply::error(3, crate::codes::ErrorCode::PERMISSION_DENIED.into());
        let mut expected = vec![0x08, 0x03, 0x12, 0x15, 0x08, 0x67, 0x12, 0x11];
        expected.extend_from_slice(b"permission denied");
        assert_eq!(reply.encode_to_vec(), expected);
    }

    #[test]
    fn protobuf_publication_push_bytes() {
        let reply = Reply::push(Push {
            channel: "news".into(),
            publication: Some(Publication { data: Bytes::from_static(b"{}"), offset: 8, ..Default::default() }),
            ..Default::default()
        });
        // push(4) len 14 { channel(2) "news" | pub(4) len 6 { data(4) "{}" | offset(6)=8 } }
        assert_eq!(hex(&reply.encode_to_vec()), "22 0e 12 04 6e 65 77 73 22 06 22 02 7b 7d 30 08");
    }

    #[test]
    fn protobuf_connect_result_bytes_with_map() {
        let result = ConnectResult {
            client: "c".into(),
            subs: BTreeMap::from([("a".to_owned(), SubscribeResult { recovered: true, ..Default::default() })]),
            ping: 25,
            pong: true,
            ..Default::default()
        };
        // client(1) "c" | subs(6) entry { key(1) "a" | value(2) { recovered(8)=1 } } | ping(7)=25 | pong(8)=1
        assert_eq!(hex(&result.encode_to_vec()), "0a 01 63 32 07 0a 01 61 12 02 40 01 38 19 40 01");
    }

    #[test]
    fn protobuf_subscribe_result_recovery_bytes() {
        let result = SubscribeResult {
            epoch: "e".into(),
            publications: vec![Publication { offset: 6, ..Default::default() }],
            recovered: true,
            offset: 7,
            was_recovering: true,
            ..Default::default()
        };
        // epoch(6) | publications(7) { offset(6)=6 } | recovered(8) | offset(9)=7 | was_recovering(12)
        assert_eq!(hex(&result.encode_to_vec()), "32 01 65 3a 02 30 06 40 01 48 07 60 01");
    }

    #[test]
    fn protobuf_more_tags() {
        let history = HistoryRequest {
            channel: "c".into(),
            limit: 10,
            since: Some(StreamPosition { offset: 5, epoch: "e".into() }),
            reverse: true,
        };
        assert_eq!(hex(&history.encode_to_vec()), "0a 01 63 38 0a 42 05 08 05 12 01 65 48 01");

        let join = Push {
            channel: "c".into(),
            join: Some(Join { info: Some(ClientInfo { user: "u".into(), client: "k".into(), ..Default::default() }) }),
            ..Default::default()
        };
        assert_eq!(hex(&join.encode_to_vec()), "12 01 63 2a 08 0a 06 0a 01 75 12 01 6b");

        let sub_refresh = Command {
            id: 2,
            sub_refresh: Some(SubRefreshRequest { channel: "c".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(hex(&sub_refresh.encode_to_vec()), "08 02 7a 03 0a 01 63");

        let rpc = Command {
            rpc: Some(RpcRequest { data: Bytes::from_static(b"1"), method: "m".into() }),
            ..Default::default()
        };
        assert_eq!(hex(&rpc.encode_to_vec()), "6a 06 0a 01 31 12 01 6d");

        let tagged =
            Publication { tags: BTreeMap::from([("k".to_owned(), "v".to_owned())]), delta: true, ..Default::default() };
        assert_eq!(hex(&tagged.encode_to_vec()), "3a 06 0a 01 6b 12 01 76 40 01");

        let presence_stats = Reply {
            id: 1,
            presence_stats: Some(PresenceStatsResult { num_clients: 2, num_users: 1 }),
            ..Default::default()
        };
        assert_eq!(hex(&presence_stats.encode_to_vec()), "08 01 52 04 08 02 10 01");
    }

    // --- Round trips --------------------------------------------------------------------------------------

    fn full_command() -> Command {
        let sub = SubscribeRequest {
            channel: "news".into(),
            token: "st".into(),
            recover: true,
            epoch: "ab12".into(),
            offset: 5,
            data: Bytes::from_static(br#"{"s":1}"#),
            positioned: true,
            recoverable: true,
            join_leave: true,
            delta: "fossil".into(),
        };
        Command {
            id: u32::MAX,
            connect: Some(ConnectRequest {
                token: "jwt".into(),
                data: Bytes::from_static(b"[1]"),
                subs: BTreeMap::from([("news".to_owned(), sub.clone())]),
                name: "js".into(),
                version: "5.0.0".into(),
                headers: BTreeMap::from([("X-A".to_owned(), "b".to_owned())]),
            }),
            subscribe: Some(sub),
            unsubscribe: Some(UnsubscribeRequest { channel: "a".into() }),
            publish: Some(PublishRequest { channel: "b".into(), data: Bytes::from_static(b"\"x\"") }),
            presence: Some(PresenceRequest { channel: "c".into() }),
            presence_stats: Some(PresenceStatsRequest { channel: "d".into() }),
            history: Some(HistoryRequest {
                channel: "e".into(),
                limit: -1,
                since: Some(StreamPosition { offset: u64::MAX, epoch: "x".into() }),
                reverse: true,
            }),
            ping: Some(PingRequest {}),
            send: Some(SendRequest { data: Bytes::from_static(b"\"s\"") }),
            rpc: Some(RpcRequest { data: Bytes::from_static(b"{}"), method: "m".into() }),
            refresh: Some(RefreshRequest { token: "t2".into() }),
            sub_refresh: Some(SubRefreshRequest { channel: "f".into(), token: "t3".into() }),
        }
    }

    fn full_reply() -> Reply {
        let info = ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: Bytes::from_static(br#"{"n":"x"}"#),
            chan_info: Bytes::from_static(b"1"),
        };
        let publication = Publication {
            data: Bytes::from_static(br#"{"v":[true,false]}"#),
            info: Some(info.clone()),
            offset: 42,
            tags: BTreeMap::from([("t".to_owned(), "1".to_owned())]),
            delta: true,
        };
        let sub_result = SubscribeResult {
            expires: true,
            ttl: 30,
            recoverable: true,
            epoch: "ep".into(),
            publications: vec![publication.clone(), Publication::default()],
            recovered: true,
            offset: 43,
            positioned: true,
            data: Bytes::from_static(b"{}"),
            was_recovering: true,
            delta: true,
        };
        Reply {
            id: 7,
            error: Some(Error { code: 400, message: "custom".into(), temporary: true }),
            push: Some(Push {
                channel: "news".into(),
                publication: Some(publication.clone()),
                join: Some(Join { info: Some(info.clone()) }),
                leave: Some(Leave { info: Some(info.clone()) }),
                unsubscribe: Some(Unsubscribe { code: 2500, reason: "r".into() }),
                message: Some(Message { data: Bytes::from_static(b"[]") }),
                subscribe: Some(Subscribe {
                    recoverable: true,
                    epoch: "e".into(),
                    offset: 1,
                    positioned: true,
                    data: Bytes::from_static(b"2"),
                }),
                connect: Some(Connect {
                    client: "c".into(),
                    version: "v".into(),
                    data: Bytes::from_static(b"3"),
                    subs: BTreeMap::from([("s".to_owned(), sub_result.clone())]),
                    expires: true,
                    ttl: 1,
                    ping: 2,
                    pong: true,
                    session: "se".into(),
                    node: "n".into(),
                }),
                disconnect: Some(Disconnect { code: 4000, reason: "custom".into(), reconnect: true }),
                refresh: Some(Refresh { expires: true, ttl: 9 }),
            }),
            connect: Some(ConnectResult {
                client: "c".into(),
                version: "v".into(),
                expires: true,
                ttl: 3,
                data: Bytes::from_static(b"4"),
                subs: BTreeMap::from([("s".to_owned(), sub_result.clone())]),
                ping: 25,
                pong: true,
                session: "se".into(),
                node: "n".into(),
            }),
            subscribe: Some(sub_result),
            unsubscribe: Some(UnsubscribeResult {}),
            publish: Some(PublishResult {}),
            presence: Some(PresenceResult { presence: BTreeMap::from([("c".to_owned(), info)]) }),
            presence_stats: Some(PresenceStatsResult { num_clients: 3, num_users: 2 }),
            history: Some(HistoryResult { publications: vec![publication], epoch: "ep".into(), offset: 42 }),
            ping: Some(PingResult {}),
            rpc: Some(RpcResult { data: Bytes::from_static(b"\"ok\"") }),
            refresh: Some(RefreshResult { client: "c".into(), version: "v".into(), expires: true, ttl: 5 }),
            sub_refresh: Some(SubRefreshResult { expires: true, ttl: 6 }),
        }
    }

    #[test]
    fn every_field_round_trips_through_protobuf() {
        let cmd = full_command();
        assert_eq!(Command::decode(&cmd.encode_to_vec()[..]).unwrap(), cmd);
        let reply = full_reply();
        assert_eq!(Reply::decode(&reply.encode_to_vec()[..]).unwrap(), reply);
    }

    #[test]
    fn every_field_round_trips_through_json() {
        let cmd = full_command();
        let text = to_json(&cmd);
        assert_eq!(from_json::<Command>(&text), cmd, "{text}");
        let reply = full_reply();
        let text = to_json(&reply);
        assert_eq!(from_json::<Reply>(&text), reply, "{text}");
    }

    #[test]
    fn protobuf_data_is_opaque_bytes() {
        let cmd = Command {
            publish: Some(PublishRequest { channel: "c".into(), data: Bytes::from_static(&[0xff, 0x00, b'{']) }),
            ..Default::default()
        };
        assert_eq!(Command::decode(&cmd.encode_to_vec()[..]).unwrap(), cmd);
        // …and not JSON: the JSON encoder refuses it instead of writing a broken frame.
        assert!(serde_json::to_string(&cmd).is_err());
    }
}
