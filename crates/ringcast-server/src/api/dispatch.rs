//! One API call without HTTP: decode a method's params ([`Call::decode`], pure), then run it against the
//! backend ([`Call::run`], the only step with effects), and wrap replies in the three envelopes Centrifugo
//! uses: per-method (`{"result"}`/`{"error"}`), legacy `/api` (one reply per line, with the command's `id`),
//! and `/api/batch` (`{"replies":[{"<method>":…}]}`).
//!
//! Decoding is split from running so a request that is malformed anywhere runs nothing: a batch or a legacy
//! body is decoded whole before its first command touches the node (Centrifugo's legacy endpoint runs
//! commands as it decodes them, so a bad third command leaves the first two done and still answers 400; we
//! answer the same 400 with nothing done).
//!
//! Validation here is exactly Centrifugo's executor's: an empty `channel` where one is required, an empty
//! `channels` list, or a missing `data` is error 107; everything about the channel itself (namespace, history
//! or presence enabled) is the backend's to decide.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::{to_raw_value, RawValue};

use super::types::{
    BroadcastRequest, BroadcastResult, ChannelInfo, ChannelRequest, ChannelsRequest, ChannelsResult, DisconnectRequest,
    Empty, ErrorJson, HistoryRequest, InfoRequest, PresenceResult, PresenceStatsResult, PublishRequest,
    PublishResponse, RefreshRequest, SubscriptionRequest,
};
use super::{ApiBackend, ApiError, PublishOptions, RequestError};

/// The disconnect a `disconnect` call without a `disconnect` object sends: Centrifugo's
/// `DisconnectForceNoReconnect`.
pub const DEFAULT_DISCONNECT: (u32, &str) = (3503, "force disconnect");

/// The methods ringcast serves. Others Centrifugo has (rpc, connections, user status, push…) answer 404 on
/// their path and 104 inside legacy and batch requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Publish,
    Broadcast,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Presence,
    PresenceStats,
    History,
    HistoryRemove,
    Info,
    Refresh,
    Channels,
}

impl Method {
    /// In the order of the fields of Centrifugo's batch `Command`: when a command sets several, the first wins.
    pub(crate) const ALL: [Method; 12] = [
        Method::Publish,
        Method::Broadcast,
        Method::Subscribe,
        Method::Unsubscribe,
        Method::Disconnect,
        Method::Presence,
        Method::PresenceStats,
        Method::History,
        Method::HistoryRemove,
        Method::Info,
        Method::Refresh,
        Method::Channels,
    ];

    /// The path segment (`/api/<name>`), the batch key, and the `method` label of API metrics.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Method::Publish => "publish",
            Method::Broadcast => "broadcast",
            Method::Subscribe => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::Disconnect => "disconnect",
            Method::Presence => "presence",
            Method::PresenceStats => "presence_stats",
            Method::History => "history",
            Method::HistoryRemove => "history_remove",
            Method::Info => "info",
            Method::Refresh => "refresh",
            Method::Channels => "channels",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Centrifugo's legacy `Command.MethodType` numbers (a legacy command may name its method by number).
    fn from_legacy_number(n: u64) -> Option<Method> {
        Some(match n {
            0 => Method::Publish,
            1 => Method::Broadcast,
            2 => Method::Unsubscribe,
            3 => Method::Disconnect,
            4 => Method::Presence,
            5 => Method::PresenceStats,
            6 => Method::History,
            7 => Method::HistoryRemove,
            8 => Method::Channels,
            9 => Method::Info,
            11 => Method::Subscribe,
            12 => Method::Refresh,
            _ => return None,
        })
    }
}

/// Method names Centrifugo's legacy endpoint knows but ringcast does not serve: they decode (and answer 104),
/// where a name Centrifugo does not know fails the whole request with 400.
const LEGACY_UNSERVED: &[&str] = &[
    "rpc",
    "connections",
    "update_user_status",
    "get_user_status",
    "delete_user_status",
    "block_user",
    "unblock_user",
    "revoke_token",
    "invalidate_user_tokens",
    "device_register",
    "device_update",
    "device_remove",
    "device_list",
    "device_topic_list",
    "device_topic_update",
    "user_topic_list",
    "user_topic_update",
    "send_push_notification",
    "update_push_status",
    "cancel_push",
];

/// What a call produced: the result (goes under `"result"`, or the method's key in a batch) or an API error.
pub(crate) type Reply = Result<Box<RawValue>, ApiError>;

/// A decoded call, borrowing from the request body.
pub(crate) enum Call<'a> {
    Publish(PublishRequest<'a>),
    Broadcast(BroadcastRequest<'a>),
    Subscribe(SubscriptionRequest),
    Unsubscribe(SubscriptionRequest),
    Disconnect(DisconnectRequest),
    Presence(ChannelRequest),
    PresenceStats(ChannelRequest),
    History(HistoryRequest),
    HistoryRemove(ChannelRequest),
    Info,
    Refresh(RefreshRequest),
    Channels(ChannelsRequest),
}

impl<'a> Call<'a> {
    /// Decodes `params` as `method`'s request. Fails only when they are not JSON of that shape (HTTP 400 on
    /// the method's own path, error 107 inside a legacy reply); missing fields are not failures here.
    pub(crate) fn decode(method: Method, params: &'a [u8]) -> Result<Call<'a>, serde_json::Error> {
        // serde would also take a struct from an array of its fields in order; Go's decoder (and so
        // Centrifugo) takes objects only.
        if params.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(de::Error::custom("params must be a JSON object"));
        }
        Ok(match method {
            Method::Publish => Call::Publish(serde_json::from_slice(params)?),
            Method::Broadcast => Call::Broadcast(serde_json::from_slice(params)?),
            Method::Subscribe => Call::Subscribe(serde_json::from_slice(params)?),
            Method::Unsubscribe => Call::Unsubscribe(serde_json::from_slice(params)?),
            Method::Disconnect => Call::Disconnect(serde_json::from_slice(params)?),
            Method::Presence => Call::Presence(serde_json::from_slice(params)?),
            Method::PresenceStats => Call::PresenceStats(serde_json::from_slice(params)?),
            Method::History => Call::History(serde_json::from_slice(params)?),
            Method::HistoryRemove => Call::HistoryRemove(serde_json::from_slice(params)?),
            Method::Info => {
                let InfoRequest {} = serde_json::from_slice(params)?;
                Call::Info
            }
            Method::Refresh => Call::Refresh(serde_json::from_slice(params)?),
            Method::Channels => Call::Channels(serde_json::from_slice(params)?),
        })
    }

    pub(crate) fn method(&self) -> Method {
        match self {
            Call::Publish(_) => Method::Publish,
            Call::Broadcast(_) => Method::Broadcast,
            Call::Subscribe(_) => Method::Subscribe,
            Call::Unsubscribe(_) => Method::Unsubscribe,
            Call::Disconnect(_) => Method::Disconnect,
            Call::Presence(_) => Method::Presence,
            Call::PresenceStats(_) => Method::PresenceStats,
            Call::History(_) => Method::History,
            Call::HistoryRemove(_) => Method::HistoryRemove,
            Call::Info => Method::Info,
            Call::Refresh(_) => Method::Refresh,
            Call::Channels(_) => Method::Channels,
        }
    }

    /// Runs the call. `body` is the buffer the params were decoded from: publication data is handed to the
    /// backend as a slice of it, not a copy.
    pub(crate) fn run(self, backend: &dyn ApiBackend, body: &Bytes) -> Reply {
        let method = self.method();
        metrics::counter!(crate::metrics::API_REQUESTS_TOTAL, "method" => method.name()).increment(1);
        let reply = self.execute(backend, body);
        if let Err(e) = &reply {
            metrics::counter!(crate::metrics::API_ERRORS_TOTAL, "method" => method.name(), "code" => e.code_label())
                .increment(1);
            tracing::debug!(method = method.name(), error = %e, "API call failed");
        }
        reply
    }

    fn execute(self, backend: &dyn ApiBackend, body: &Bytes) -> Reply {
        match self {
            Call::Publish(req) => {
                require(&req.channel)?;
                let data = publication_data(req.data, &req.b64data, body)?;
                let opts = PublishOptions {
                    skip_history: req.skip_history,
                    tags: req.tags,
                    idempotency_key: req.idempotency_key,
                };
                encode(&backend.publish_with(&req.channel, data, &opts)?)
            }
            Call::Broadcast(req) => broadcast(backend, req, body),
            Call::Subscribe(req) => {
                require(&req.channel)?;
                backend.subscribe(&req.user, &req.channel, non_empty(&req.client))?;
                encode(&Empty {})
            }
            Call::Unsubscribe(req) => {
                // No channel check: Centrifugo passes an empty channel through (the node's choice what it means).
                backend.unsubscribe(&req.user, &req.channel, non_empty(&req.client))?;
                encode(&Empty {})
            }
            Call::Disconnect(req) => {
                let (code, reason) = match &req.disconnect {
                    Some(d) => (d.code, d.reason.as_str()),
                    None => DEFAULT_DISCONNECT,
                };
                backend.disconnect(&req.user, code, reason, non_empty(&req.client))?;
                encode(&Empty {})
            }
            Call::Presence(req) => {
                require(&req.channel)?;
                encode(&PresenceResult { presence: &backend.presence(&req.channel)? })
            }
            Call::PresenceStats(req) => {
                require(&req.channel)?;
                let (num_clients, num_users) = backend.presence_stats(&req.channel)?;
                encode(&PresenceStatsResult { num_clients, num_users })
            }
            Call::History(req) => {
                require(&req.channel)?;
                encode(&backend.history(&req.channel, req.limit, req.since, req.reverse)?)
            }
            Call::HistoryRemove(req) => {
                require(&req.channel)?;
                backend.history_remove(&req.channel)?;
                encode(&Empty {})
            }
            Call::Info => encode(&backend.info()?),
            Call::Refresh(req) => {
                let expire_at = (req.expire_at != 0).then_some(req.expire_at);
                backend.refresh(&req.user, expire_at, req.expired, non_empty(&req.client))?;
                encode(&Empty {})
            }
            Call::Channels(req) => {
                let channels = backend.channels(non_empty(&req.pattern))?;
                let channels = channels.into_iter().map(|(name, n)| (name, ChannelInfo { num_clients: n })).collect();
                encode(&ChannelsResult { channels })
            }
        }
    }
}

/// Broadcast: the list must not be empty; an empty name inside it fails that one publication only (as in
/// Centrifugo), and the backend never sees it.
fn broadcast(backend: &dyn ApiBackend, req: BroadcastRequest<'_>, body: &Bytes) -> Reply {
    if req.channels.is_empty() {
        return Err(ApiError::BadRequest);
    }
    let data = publication_data(req.data, &req.b64data, body)?;
    let named: Vec<String>;
    let to_publish = if req.channels.iter().any(String::is_empty) {
        named = req.channels.iter().filter(|c| !c.is_empty()).cloned().collect();
        &named
    } else {
        &req.channels
    };
    let opts = PublishOptions { skip_history: req.skip_history, tags: req.tags, idempotency_key: req.idempotency_key };
    let results = if to_publish.is_empty() { Vec::new() } else { backend.broadcast_with(to_publish, data, &opts) };
    if results.len() != to_publish.len() {
        tracing::error!(
            channels = to_publish.len(),
            results = results.len(),
            "broadcast backend returned a wrong count"
        );
        return Err(ApiError::Internal);
    }
    let mut results = results.iter();
    let responses = req
        .channels
        .iter()
        .map(|channel| {
            let outcome = if channel.is_empty() {
                Err(&ApiError::BadRequest)
            } else {
                results.next().map_or(Err(&ApiError::Internal), Result::as_ref)
            };
            match outcome {
                Ok(result) => PublishResponse { error: None, result: Some(result) },
                Err(e) => PublishResponse { error: Some(error_json(*e)), result: None },
            }
        })
        .collect();
    encode(&BroadcastResult { responses })
}

fn require(channel: &str) -> Result<(), ApiError> {
    if channel.is_empty() {
        Err(ApiError::BadRequest)
    } else {
        Ok(())
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The publication payload, as Centrifugo's API takes it: `b64data` decoded (standard base64) when set,
/// else `data` exactly as sent. Neither, or base64 that does not decode: 107.
fn publication_data(data: Option<&RawValue>, b64data: &str, body: &Bytes) -> Result<Bytes, ApiError> {
    use base64::Engine as _;
    if !b64data.is_empty() {
        return base64::engine::general_purpose::STANDARD
            .decode(b64data)
            .map(Bytes::from)
            .map_err(|_| ApiError::BadRequest);
    }
    match data {
        Some(raw) => Ok(share(body, raw.get().as_bytes())),
        None => Err(ApiError::BadRequest),
    }
}

/// `part` as a slice of `body` when it lies inside it (it does for anything decoded from `body`), else a copy.
/// Checked by address rather than with `Bytes::slice_ref`, which panics on a foreign slice.
fn share(body: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    if start <= body.len() && part.len() <= body.len() - start {
        body.slice(start..start + part.len())
    } else {
        Bytes::copy_from_slice(part)
    }
}

fn encode<T: Serialize>(result: &T) -> Reply {
    to_raw_value(result).map_err(|e| {
        tracing::error!(error = %e, "API result does not serialize (raw JSON from the backend is not JSON?)");
        ApiError::Internal
    })
}

fn error_json(e: ApiError) -> ErrorJson<'static> {
    ErrorJson { code: e.code(), message: e.message() }
}

/// Serializes an envelope; they hold only validated raw JSON, strings and integers, so this cannot fail in
/// practice, but if it did the caller still gets a well-formed error reply.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "API envelope does not serialize");
        r#"{"error":{"code":100,"message":"internal server error"}}"#.to_string()
    })
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorJson<'static>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    fn new(id: Option<u32>, reply: &'a Reply) -> Self {
        match reply {
            Ok(result) => Envelope { id, error: None, result: Some(result) },
            Err(e) => Envelope { id, error: Some(error_json(*e)), result: None },
        }
    }
}

/// The body of a per-method reply: `{"result":…}` or `{"error":{"code","message"}}`.
pub(crate) fn envelope(reply: &Reply) -> String {
    to_json(&Envelope::new(None, reply))
}

/// The body of a transport-error-mode reply (`X-Centrifugo-Error-Mode: transport`): the bare error object.
pub(crate) fn bare_error(e: ApiError) -> String {
    to_json(&error_json(e))
}

/// A method named by a legacy command: a string (any case) or Centrifugo's enum number. `None` is a method
/// Centrifugo knows and ringcast does not serve. Absent means publish (Go's zero value, which Centrifugo keeps).
struct LegacyMethod(Option<Method>);

impl Default for LegacyMethod {
    fn default() -> Self {
        LegacyMethod(Some(Method::Publish))
    }
}

impl<'de> Deserialize<'de> for LegacyMethod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LegacyMethod;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a method name or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LegacyMethod, E> {
                let name = v.to_ascii_lowercase();
                match Method::from_name(&name) {
                    Some(m) => Ok(LegacyMethod(Some(m))),
                    None if LEGACY_UNSERVED.contains(&name.as_str()) => Ok(LegacyMethod(None)),
                    None => Err(E::custom(format_args!("unknown method {v:?}"))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LegacyMethod, E> {
                Ok(LegacyMethod(Method::from_legacy_number(v)))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LegacyMethod, E> {
                Ok(LegacyMethod(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct LegacyCommand<'a> {
    #[serde(default)]
    id: u32,
    #[serde(default)]
    method: LegacyMethod,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

/// The legacy single endpoint (`POST /api`, deprecated in Centrifugo v5, still served by v6): a stream of
/// `{"id"?,"method","params"}` objects, answered by one `{"id"?,"error"?,"result"?}` per line, in order.
/// Params that do not fit the method answer 107 in that command's reply; a body that is not a stream of
/// command objects (or names a method Centrifugo does not know) is a 400 and runs nothing.
pub(crate) fn legacy(backend: &dyn ApiBackend, body: &Bytes) -> Result<String, RequestError> {
    if body.is_empty() {
        return Err(RequestError::EmptyBody);
    }
    let commands =
        serde_json::Deserializer::from_slice(body).into_iter::<LegacyCommand<'_>>().collect::<Result<Vec<_>, _>>()?;
    let mut out = String::new();
    for (i, command) in commands.into_iter().enumerate() {
        let reply = match command.method.0 {
            None => Err(ApiError::NotFound),
            Some(Method::Info) => Call::Info.run(backend, body),
            Some(method) => match command.params.map(|p| Call::decode(method, p.get().as_bytes())) {
                Some(Ok(call)) => call.run(backend, body),
                Some(Err(_)) | None => Err(ApiError::BadRequest),
            },
        };
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&to_json(&Envelope::new((command.id != 0).then_some(command.id), &reply)));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct BatchRequest<'a> {
    #[serde(borrow, default)]
    commands: Vec<BTreeMap<String, &'a RawValue>>,
}

/// `POST /api/batch`: `{"commands":[{"<method>":{params}},…]}` → `{"replies":[{"<method>":result}|{"error":…}]}`,
/// run in order (`"parallel"` is accepted and makes no difference: the backend is synchronous). Every
/// command is decoded before any runs; one that does not fit its method makes the whole batch a 400, as in
/// Centrifugo. A command naming no method ringcast serves answers 104.
pub(crate) fn batch(backend: &dyn ApiBackend, body: &Bytes) -> Result<String, RequestError> {
    let request: BatchRequest<'_> = serde_json::from_slice(body)?;
    let calls = request
        .commands
        .iter()
        .map(|command| {
            let found = Method::ALL.into_iter().find_map(|m| command.get(m.name()).map(|params| (m, *params)));
            found.map(|(m, params)| Call::decode(m, params.get().as_bytes())).transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;

    #[derive(Serialize)]
    struct BatchReply {
        replies: Vec<BTreeMap<&'static str, Box<RawValue>>>,
    }
    let replies = calls
        .into_iter()
        .map(|call| {
            let reply = match call {
                Some(call) => {
                    let method = call.method();
                    call.run(backend, body).map(|result| (method.name(), result))
                }
                None => Err(ApiError::NotFound),
            };
            let reply = reply.or_else(|e| to_raw_value(&error_json(e)).map(|error| ("error", error)));
            match reply {
                Ok((key, value)) => BTreeMap::from([(key, value)]),
                Err(_) => BTreeMap::new(),
            }
        })
        .collect();
    Ok(to_json(&BatchReply { replies }))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use serde_json::{json, Value};

    use super::*;
    use crate::api::types::{ClientInfoJson, HistoryResultJson, InfoJson, PublishResult, StreamPosition};

    /// Records every call as a line; answers with fixed results. Channel `unknown:*` is an unknown namespace.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub calls: Mutex<Vec<String>>,
        /// The last publication's data, as handed over.
        pub last_data: Mutex<Option<Bytes>>,
        /// Makes `broadcast` answer one result too few (a backend bug the API must not turn into a panic).
        pub short_broadcast: std::sync::atomic::AtomicBool,
    }

    impl Recorder {
        fn log(&self, line: String) {
            self.calls.lock().expect("lock").push(line);
        }
        pub(crate) fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().expect("lock"))
        }
    }

    fn check(channel: &str) -> Result<(), ApiError> {
        if channel.starts_with("unknown:") {
            Err(ApiError::UnknownChannel)
        } else {
            Ok(())
        }
    }

    impl ApiBackend for Recorder {
        fn publish(&self, channel: &str, data: Bytes, skip_history: bool) -> Result<PublishResult, ApiError> {
            self.log(format!("publish {channel} {} {skip_history}", String::from_utf8_lossy(&data)));
            *self.last_data.lock().expect("lock") = Some(data);
            check(channel)?;
            Ok(PublishResult { offset: 1, epoch: "e".into() })
        }
        fn broadcast(&self, channels: &[String], data: Bytes, _: bool) -> Vec<Result<PublishResult, ApiError>> {
            self.log(format!("broadcast {} {}", channels.join(","), String::from_utf8_lossy(&data)));
            let mut results: Vec<_> = channels.iter().map(|c| check(c).map(|()| PublishResult::default())).collect();
            if self.short_broadcast.load(std::sync::atomic::Ordering::Relaxed) {
                results.pop();
            }
            results
        }
        fn subscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
            self.log(format!("subscribe {user} {channel} {client:?}"));
            check(channel)
        }
        fn unsubscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
            self.log(format!("unsubscribe {user} {channel} {client:?}"));
            Ok(())
        }
        fn disconnect(&self, user: &str, code: u32, reason: &str, client: Option<&str>) -> Result<(), ApiError> {
            self.log(format!("disconnect {user} {code} {reason} {client:?}"));
            Ok(())
        }
        fn refresh(
            &self,
            user: &str,
            expire_at: Option<i64>,
            expired: bool,
            client: Option<&str>,
        ) -> Result<(), ApiError> {
            self.log(format!("refresh {user} {expire_at:?} {expired} {client:?}"));
            Ok(())
        }
        fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfoJson>, ApiError> {
            self.log(format!("presence {channel}"));
            Err(ApiError::NotAvailable)
        }
        fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ApiError> {
            self.log(format!("presence_stats {channel}"));
            Ok((3, 2))
        }
        fn history(
            &self,
            channel: &str,
            limit: i32,
            since: Option<StreamPosition>,
            reverse: bool,
        ) -> Result<HistoryResultJson, ApiError> {
            self.log(format!("history {channel} {limit} {since:?} {reverse}"));
            Err(ApiError::UnrecoverablePosition)
        }
        fn history_remove(&self, channel: &str) -> Result<(), ApiError> {
            self.log(format!("history_remove {channel}"));
            Ok(())
        }
        fn channels(&self, pattern: Option<&str>) -> Result<BTreeMap<String, u32>, ApiError> {
            self.log(format!("channels {pattern:?}"));
            Ok(BTreeMap::from([("chat".to_string(), 2)]))
        }
        fn info(&self) -> Result<InfoJson, ApiError> {
            self.log("info".into());
            Ok(InfoJson::default())
        }
    }

    fn run(backend: &Recorder, method: &str, params: &str) -> Value {
        let body = Bytes::copy_from_slice(params.as_bytes());
        let method = Method::from_name(method).expect("method");
        let call = Call::decode(method, &body).expect("decodes");
        serde_json::from_str(&envelope(&call.run(backend, &body))).expect("json")
    }

    fn bad_request() -> Value {
        json!({"error": {"code": 107, "message": "bad request"}})
    }

    #[test]
    fn publish_without_channel_or_data_is_107_and_never_reaches_the_backend() {
        let b = Recorder::default();
        assert_eq!(run(&b, "publish", r#"{"data":{}}"#), bad_request());
        assert_eq!(run(&b, "publish", r#"{"channel":"a"}"#), bad_request());
        assert_eq!(run(&b, "publish", r#"{"channel":"a","data":null}"#), bad_request());
        assert!(b.take().is_empty());
    }

    #[test]
    fn publish_with_b64data_publishes_the_decoded_bytes_and_bad_base64_is_107() {
        let b = Recorder::default();
        let r = run(&b, "publish", r#"{"channel":"a","data":{},"b64data":"AAE="}"#);
        assert!(r.get("result").is_some(), "b64data wins: {r}");
        assert_eq!(b.last_data.lock().expect("lock").as_deref(), Some(&[0u8, 1][..]));
        assert!(run(&b, "publish", r#"{"channel":"a","b64data":"AAE="}"#).get("result").is_some());
        b.take();
        assert_eq!(run(&b, "publish", r#"{"channel":"a","b64data":"not base64!"}"#), bad_request());
        assert!(b.take().is_empty(), "nothing published");
    }

    #[test]
    fn a_backend_without_tags_or_idempotency_refuses_them_108_instead_of_dropping_them() {
        let b = Recorder::default();
        let r = run(&b, "publish", r#"{"channel":"a","data":{},"tags":{"k":"v"}}"#);
        assert_eq!(r["error"]["code"], json!(108), "{r}");
        let r = run(&b, "publish", r#"{"channel":"a","data":{},"idempotency_key":"x"}"#);
        assert_eq!(r["error"]["code"], json!(108), "{r}");
        assert!(b.take().is_empty());
    }

    #[test]
    fn publish_hands_data_over_as_a_slice_of_the_body() {
        let body = Bytes::from_static(br#"{"channel":"a","data": [1, 2.50 ,"\u00e9"] }"#);
        let b = Recorder::default();
        let call = Call::decode(Method::Publish, &body).expect("decodes");
        assert!(call.run(&b, &body).is_ok());
        let data = b.last_data.lock().expect("lock").take().expect("published");
        assert_eq!(&data[..], br#"[1, 2.50 ,"\u00e9"]"#);
        let offset = data.as_ptr() as usize - body.as_ptr() as usize;
        assert!(offset + data.len() <= body.len(), "data is a view into the body, not a copy");
    }

    #[test]
    fn share_copies_a_slice_from_elsewhere() {
        let body = Bytes::from_static(b"hello");
        let other = b"hello".to_vec();
        assert_eq!(&share(&body, &other)[..], b"hello");
        assert_eq!(&share(&body, &body[1..3])[..], b"el");
        assert_eq!(&share(&body, &body[5..])[..], b"");
    }

    #[test]
    fn backend_errors_come_back_with_their_code() {
        let b = Recorder::default();
        assert_eq!(
            run(&b, "publish", r#"{"channel":"unknown:x","data":1}"#),
            json!({"error": {"code": 102, "message": "unknown channel"}})
        );
        assert_eq!(
            run(&b, "presence", r#"{"channel":"x"}"#),
            json!({"error": {"code": 108, "message": "not available"}})
        );
        assert_eq!(
            run(&b, "history", r#"{"channel":"x","limit":-1,"since":{"offset":5,"epoch":"ab"},"reverse":true}"#),
            json!({"error": {"code": 112, "message": "unrecoverable position"}})
        );
        assert_eq!(
            b.take(),
            [
                "publish unknown:x 1 false",
                "presence x",
                r#"history x -1 Some(StreamPosition { offset: 5, epoch: "ab" }) true"#
            ]
        );
    }

    #[test]
    fn channel_is_required_where_centrifugo_requires_it() {
        let b = Recorder::default();
        for method in ["subscribe", "presence", "presence_stats", "history", "history_remove"] {
            assert_eq!(run(&b, method, r#"{"user":"u"}"#), bad_request(), "{method}");
        }
        assert!(b.take().is_empty());
        assert_eq!(run(&b, "unsubscribe", r#"{"user":"u"}"#), json!({"result": {}}));
        assert_eq!(b.take(), ["unsubscribe u  None"]);
    }

    #[test]
    fn disconnect_without_object_sends_force_disconnect_3503() {
        let b = Recorder::default();
        assert_eq!(run(&b, "disconnect", r#"{"user":"u"}"#), json!({"result": {}}));
        assert_eq!(
            run(&b, "disconnect", r#"{"user":"u","client":"c","disconnect":{"code":4000,"reason":"bye"}}"#),
            json!({"result": {}})
        );
        assert_eq!(b.take(), ["disconnect u 3503 force disconnect None", r#"disconnect u 4000 bye Some("c")"#]);
    }

    #[test]
    fn refresh_zero_expire_at_means_none() {
        let b = Recorder::default();
        run(&b, "refresh", r#"{"user":"u"}"#);
        run(&b, "refresh", r#"{"user":"u","expire_at":1700000000,"expired":true,"client":"c"}"#);
        assert_eq!(b.take(), ["refresh u None false None", r#"refresh u Some(1700000000) true Some("c")"#]);
    }

    #[test]
    fn broadcast_rules() {
        let b = Recorder::default();
        assert_eq!(run(&b, "broadcast", r#"{"channels":[],"data":1}"#), bad_request());
        assert_eq!(run(&b, "broadcast", r#"{"channels":["a"]}"#), bad_request());
        assert!(b.take().is_empty());
        assert_eq!(
            run(&b, "broadcast", r#"{"channels":["a","","unknown:b"],"data":{"x":1}}"#),
            json!({"result": {"responses": [
                {"result": {}},
                {"error": {"code": 107, "message": "bad request"}},
                {"error": {"code": 102, "message": "unknown channel"}},
            ]}})
        );
        assert_eq!(b.take(), [r#"broadcast a,unknown:b {"x":1}"#], "the empty name never reaches the backend");
    }

    #[test]
    fn broadcast_backend_returning_a_wrong_count_is_internal_error() {
        let b = Recorder::default();
        b.short_broadcast.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            run(&b, "broadcast", r#"{"channels":["a","b"],"data":1}"#),
            json!({"error": {"code": 100, "message": "internal server error"}})
        );
    }

    #[test]
    fn broadcast_of_only_empty_names_never_calls_the_backend() {
        let b = Recorder::default();
        assert_eq!(
            run(&b, "broadcast", r#"{"channels":["",""],"data":1}"#),
            json!({"result": {"responses": [
                {"error": {"code": 107, "message": "bad request"}},
                {"error": {"code": 107, "message": "bad request"}},
            ]}})
        );
        assert!(b.take().is_empty());
    }

    #[test]
    fn malformed_params_fail_decoding() {
        assert!(Call::decode(Method::Publish, b"").is_err());
        assert!(Call::decode(Method::Publish, b"{").is_err());
        assert!(Call::decode(Method::Publish, br#"{"channel":5}"#).is_err());
        assert!(Call::decode(Method::History, br#"{"channel":"a","limit":"x"}"#).is_err());
        assert!(Call::decode(Method::Info, b"[]").is_err());
        assert!(Call::decode(Method::Presence, br#"["chat"]"#).is_err(), "structs from arrays are serde's, not Go's");
        assert!(Call::decode(Method::Info, b"{}").is_ok());
        assert!(Call::decode(Method::Publish, br#"{"channel":"a","unknown_field":[1]}"#).is_ok());
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
        }
        assert_eq!(Method::from_name("batch"), None);
        assert_eq!(Method::from_name("Publish"), None, "paths are case-sensitive");
    }

    fn legacy_lines(b: &Recorder, body: &str) -> Vec<Value> {
        let out = legacy(b, &Bytes::copy_from_slice(body.as_bytes())).expect("legacy ok");
        out.split('\n').map(|l| serde_json::from_str(l).expect("json line")).collect()
    }

    #[test]
    fn legacy_answers_each_command_on_its_own_line_with_its_id() {
        let b = Recorder::default();
        let body = concat!(
            r#"{"id":1,"method":"publish","params":{"channel":"a","data":{"t":1}}}"#,
            "\n",
            r#"{"id":2,"method":"PRESENCE_STATS","params":{"channel":"a"}}"#,
            r#" {"method":9}"#,
            r#"{"id":4,"method":"rpc","params":{}}"#,
            r#"{"id":5,"method":"subscribe","params":{"channel":7}}"#,
            r#"{"id":6,"method":"history_remove"}"#,
        );
        assert_eq!(
            legacy_lines(&b, body),
            [
                json!({"id": 1, "result": {"offset": 1, "epoch": "e"}}),
                json!({"id": 2, "result": {"num_clients": 3, "num_users": 2}}),
                json!({"result": {"nodes": []}}),
                json!({"id": 4, "error": {"code": 104, "message": "not found"}}),
                json!({"id": 5, "error": {"code": 107, "message": "bad request"}}),
                json!({"id": 6, "error": {"code": 107, "message": "bad request"}}),
            ]
        );
        assert_eq!(b.take(), [r#"publish a {"t":1} false"#, "presence_stats a", "info"]);
    }

    #[test]
    fn legacy_without_method_publishes_as_centrifugo_does() {
        let b = Recorder::default();
        assert_eq!(
            legacy_lines(&b, r#"{"params":{"channel":"a","data":2}}"#),
            [json!({"result": {"offset": 1, "epoch": "e"}})]
        );
    }

    #[test]
    fn legacy_malformed_body_is_400_and_runs_nothing() {
        let b = Recorder::default();
        let run = |body: &str| legacy(&b, &Bytes::copy_from_slice(body.as_bytes()));
        assert!(matches!(run(""), Err(RequestError::EmptyBody)));
        let first_ok_then_garbage = r#"{"method":"publish","params":{"channel":"a","data":1}} {"#;
        assert!(matches!(run(first_ok_then_garbage), Err(RequestError::Malformed(_))));
        assert!(matches!(run(r#"{"method":"nosuch","params":{}}"#), Err(RequestError::Malformed(_))));
        assert!(b.take().is_empty());
    }

    #[test]
    fn batch_replies_in_order_under_the_method_key() {
        let b = Recorder::default();
        let body = r#"{"commands":[
            {"publish":{"channel":"a","data":{}}},
            {"publish":{"channel":"unknown:x","data":{}}},
            {"channels":{}},
            {"rpc":{"method":"x"}}
        ],"parallel":true}"#;
        let out = batch(&b, &Bytes::copy_from_slice(body.as_bytes())).expect("batch ok");
        assert_eq!(
            serde_json::from_str::<Value>(&out).expect("json"),
            json!({"replies": [
                {"publish": {"offset": 1, "epoch": "e"}},
                {"error": {"code": 102, "message": "unknown channel"}},
                {"channels": {"channels": {"chat": {"num_clients": 2}}}},
                {"error": {"code": 104, "message": "not found"}},
            ]})
        );
    }

    #[test]
    fn batch_with_one_malformed_command_is_400_and_runs_nothing() {
        let b = Recorder::default();
        let body = r#"{"commands":[{"publish":{"channel":"a","data":{}}},{"history":{"limit":"ten"}}]}"#;
        assert!(matches!(batch(&b, &Bytes::copy_from_slice(body.as_bytes())), Err(RequestError::Malformed(_))));
        assert!(b.take().is_empty());
    }
}
