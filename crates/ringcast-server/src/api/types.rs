//! The API's JSON, field for field as Centrifugo's `apiproto` (`internal/apiproto/api.proto`), so its client
//! libraries parse our replies unchanged.
//!
//! Requests borrow from the request body: `data` stays the exact bytes the caller sent (a [`RawValue`] is a
//! view of the input, never re-encoded), so a publication reaches subscribers byte for byte, with the
//! caller's number formatting and escapes intact.
//!
//! Results carry raw JSON as [`Bytes`] (publication data, `conn_info`, `chan_info`): the node stores what was
//! published and we splice it back into the reply as is. Splicing is checked: bytes that are not one JSON value
//! fail serialization (and the call answers 100 "internal server error") rather than produce a reply no client
//! can parse.
//!
//! Which fields are left out when empty follows Centrifugo's encoder (Go `omitempty`) where clients are known to
//! rely on it (`offset`/`epoch` absent when history is off) and the docs' "Optional: no" otherwise
//! (`num_clients`, `presence`, `publications` are always present).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::ser::Error as _;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// A position in a channel's publication stream: the offset of the last publication and the stream's epoch
/// (which changes when the stream is lost, so an offset from another epoch is meaningless).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

/// Result of `publish`; both fields are zero/empty (and left out of the JSON) when the channel keeps no history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublishResult {
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
}

/// One connection as presence and publications describe it. `conn_info`/`chan_info` are raw JSON (from the
/// connection token's `info` and the subscription's `info`); `None` or empty bytes leave the field out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientInfoJson {
    pub client: String,
    pub user: String,
    #[serde(skip_serializing_if = "raw_absent", serialize_with = "raw_opt")]
    pub conn_info: Option<Bytes>,
    #[serde(skip_serializing_if = "raw_absent", serialize_with = "raw_opt")]
    pub chan_info: Option<Bytes>,
}

/// One publication in a history reply. `data` is raw JSON, exactly as published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublicationJson {
    #[serde(serialize_with = "raw")]
    pub data: Bytes,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfoJson>,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Result of `history`: the publications asked for (none when `limit` was 0) and the stream's current top
/// position (left out when the channel keeps no history).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HistoryResultJson {
    pub publications: Vec<PublicationJson>,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
}

/// One node in an `info` reply: the figures a node announces to the others, serialized as they are
/// (every field always present: Centrifugo's docs example shows zeros and empty strings rather than
/// omitting them).
pub type NodeJson = crate::pubsub::registry::NodeStats;

/// Result of `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InfoJson {
    pub nodes: Vec<NodeJson>,
}

// ---- results that only the API layer builds ----

#[derive(Serialize)]
pub(crate) struct Empty {}

#[derive(Serialize)]
pub(crate) struct PresenceResult<'a> {
    pub presence: &'a BTreeMap<String, ClientInfoJson>,
}

#[derive(Serialize)]
pub(crate) struct PresenceStatsResult {
    pub num_clients: u32,
    pub num_users: u32,
}

#[derive(Serialize)]
pub(crate) struct ChannelInfo {
    pub num_clients: u32,
}

#[derive(Serialize)]
pub(crate) struct ChannelsResult {
    pub channels: BTreeMap<String, ChannelInfo>,
}

/// The `{"code","message"}` object of every error reply.
#[derive(Serialize)]
pub(crate) struct ErrorJson<'a> {
    pub code: u32,
    pub message: &'a str,
}

/// One element of a broadcast's `responses`: a publish reply of its own.
#[derive(Serialize)]
pub(crate) struct PublishResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a PublishResult>,
}

#[derive(Serialize)]
pub(crate) struct BroadcastResult<'a> {
    pub responses: Vec<PublishResponse<'a>>,
}

// ---- requests: every field defaults, as Go's decoder leaves absent fields zero; unknown fields are ignored ----

#[derive(Deserialize)]
pub(crate) struct PublishRequest<'a> {
    #[serde(default)]
    pub channel: String,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub b64data: String,
    #[serde(default)]
    pub skip_history: bool,
    /// Publication tags, delivered with it (Centrifugo's `tags`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// A retried call with the same key (per channel, within 5 minutes) returns the first result and
    /// publishes nothing.
    #[serde(default)]
    pub idempotency_key: String,
}

#[derive(Deserialize)]
pub(crate) struct BroadcastRequest<'a> {
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub b64data: String,
    #[serde(default)]
    pub skip_history: bool,
    /// Publication tags, delivered with it (Centrifugo's `tags`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// A retried call with the same key (per channel, within 5 minutes) returns the first result and
    /// publishes nothing.
    #[serde(default)]
    pub idempotency_key: String,
}

/// `subscribe` and `unsubscribe`.
#[derive(Deserialize)]
pub(crate) struct SubscriptionRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub client: String,
}

#[derive(Deserialize)]
pub(crate) struct DisconnectObject {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub reason: String,
}

#[derive(Deserialize)]
pub(crate) struct DisconnectRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub disconnect: Option<DisconnectObject>,
}

#[derive(Deserialize)]
pub(crate) struct RefreshRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub expired: bool,
    #[serde(default)]
    pub expire_at: i64,
}

/// `presence`, `presence_stats`, `history_remove`.
#[derive(Deserialize)]
pub(crate) struct ChannelRequest {
    #[serde(default)]
    pub channel: String,
}

#[derive(Deserialize)]
pub(crate) struct HistoryRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub limit: i32,
    #[serde(default)]
    pub since: Option<StreamPosition>,
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Deserialize)]
pub(crate) struct ChannelsRequest {
    #[serde(default)]
    pub pattern: String,
}

#[derive(Deserialize)]
pub(crate) struct InfoRequest {}

// ---- raw JSON splicing ----

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn raw_absent(b: &Option<Bytes>) -> bool {
    !matches!(b, Some(b) if !b.is_empty())
}

/// Writes `bytes` into the output as the JSON value they already are, after checking that they are one.
fn raw<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    let text = std::str::from_utf8(bytes).map_err(|_| S::Error::custom("raw JSON is not UTF-8"))?;
    let value: &RawValue = serde_json::from_str(text).map_err(S::Error::custom)?;
    value.serialize(s)
}

fn raw_opt<S: Serializer>(bytes: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(b) => raw(b, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("serializable")
    }

    #[test]
    fn publish_result_omits_zero_offset_and_empty_epoch() {
        assert_eq!(to_value(&PublishResult::default()), json!({}));
        assert_eq!(to_value(&PublishResult { offset: 3, epoch: "xyz".into() }), json!({"offset": 3, "epoch": "xyz"}));
    }

    #[test]
    fn client_info_splices_raw_json_and_omits_absent_or_empty_info() {
        let info = ClientInfoJson {
            client: "c1".into(),
            user: "42".into(),
            conn_info: Some(Bytes::from_static(br#"{"name":"Alice"}"#)),
            chan_info: Some(Bytes::new()),
        };
        assert_eq!(to_value(&info), json!({"client": "c1", "user": "42", "conn_info": {"name": "Alice"}}));
    }

    #[test]
    fn raw_data_is_written_byte_for_byte() {
        let data = Bytes::from_static(br#"{"n":1.50,"big":123456789012345678901234567890,"s":"\u00e9"}"#);
        let pub_ = PublicationJson { data: data.clone(), offset: 2, ..Default::default() };
        let out = serde_json::to_string(&pub_).expect("serializable");
        assert_eq!(out, format!(r#"{{"data":{},"offset":2}}"#, std::str::from_utf8(&data).expect("utf-8")));
    }

    #[test]
    fn raw_data_that_is_not_json_fails_serialization() {
        let pub_ = PublicationJson { data: Bytes::from_static(b"{not json"), ..Default::default() };
        assert!(serde_json::to_string(&pub_).is_err());
        let pub_ = PublicationJson { data: Bytes::from_static(b"1 2"), ..Default::default() };
        assert!(serde_json::to_string(&pub_).is_err());
    }

    #[test]
    fn node_fields_are_always_present() {
        assert_eq!(
            to_value(&NodeJson::default()),
            json!({"uid": "", "name": "", "version": "", "num_clients": 0, "num_users": 0, "num_subs": 0,
                   "num_channels": 0, "uptime": 0})
        );
    }

    #[test]
    fn history_result_always_has_publications() {
        assert_eq!(to_value(&HistoryResultJson::default()), json!({"publications": []}));
    }
}
