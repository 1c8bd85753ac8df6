//! The server HTTP API: Centrifugo's, method for method and byte for byte where clients can tell, so its
//! API libraries (cent, gocent, phpcent, …) and existing backends work against ringcast unchanged.
//!
//! # Shape
//! * [`ApiBackend`]: everything the API asks of the node, in twelve calls. The API owns HTTP, JSON and
//!   validation; the backend owns channels, history and presence, and decides what a channel allows.
//! * [`types`]: request and result JSON, field for field as Centrifugo's `apiproto`.
//! * `dispatch`: one call without HTTP: decode, run, wrap in an envelope. Every rule is tested there
//!   without a socket.
//! * `auth`: the API key check.
//! * [`router`] (here): the axum routes that tie them together, plus `/health` and `/metrics`.
//!
//! # Routes and statuses (as Centrifugo v5/v6)
//! * `POST /api/<method>` for publish, broadcast, subscribe, unsubscribe, disconnect, refresh, presence,
//!   presence_stats, history, history_remove, channels, info; `POST /api/batch`; and the legacy single
//!   endpoint `POST /api` (`{"method","params"}` objects, one reply per line; deprecated by Centrifugo v5 and
//!   still served by v6).
//! * 200 with `{"result":…}` or `{"error":{"code","message"}}`: every outcome of a call the API understood,
//!   including refusals. A request with header `X-Centrifugo-Error-Mode: transport` gets API errors as HTTP
//!   statuses instead (Centrifugo's mapping: 100→500, 102/104→404, 107/108→400, 112→416, 113→409) with the
//!   bare `{"code","message"}` as body.
//! * 400 (plain text): the body is not JSON of the method's shape. 401 (empty body): no valid key.
//!   404: a method ringcast does not serve. 405: not POST. 413: body over 2 MiB.
//!
//! # Publications
//! `data` (JSON) or `b64data` (base64, standard alphabet; it wins when both are set; invalid base64 is 107),
//! as Centrifugo: `b64data` is for binary payloads, which only Protobuf subscribers can receive as such (a
//! JSON subscriber gets the bytes embedded as they are, as from Centrifugo). `tags` travel with the
//! publication. `idempotency_key`: see [`crate::pubsub::idempotency`].
//!
//! # What it refuses to do
//! * Block: backend calls are synchronous and run on the request's task. The node's operations are
//!   in-memory map and queue updates; a backend that must wait (a remote broker) should hand the work to its
//!   own task and answer at once.

mod auth;
mod dispatch;
pub mod http;
mod node;
pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;

pub use dispatch::DEFAULT_DISCONNECT;
pub use types::{
    ClientInfoJson, HistoryResultJson, InfoJson, NodeJson, PublicationJson, PublishResult, StreamPosition,
};

use dispatch::{Call, Method};

/// What the API needs from the node. Synchronous on purpose: every operation is an in-memory update or
/// lookup, and a synchronous trait keeps the API free of boxed futures (see the module docs on blocking).
///
/// Channel names reaching the backend are non-empty wherever Centrifugo requires a channel (everything but
/// `unsubscribe`, where an empty channel is passed through). The backend answers channel-level refusals
/// itself: [`ApiError::UnknownChannel`] for an undefined namespace, [`ApiError::NotAvailable`] for history
/// or presence on a channel without them, [`ApiError::UnrecoverablePosition`] for a `since` it cannot serve.
pub trait ApiBackend: Send + Sync + 'static {
    /// Why the node is degraded (it serves, but a part it relies on is failing), for `GET /health`;
    /// `None`: healthy.
    fn degraded(&self) -> Option<String> {
        None
    }
    /// Publishes `data` (one JSON value, exactly as the caller sent it) to `channel`.
    fn publish(&self, channel: &str, data: Bytes, skip_history: bool) -> Result<PublishResult, ApiError>;
    /// Publishes the same `data` to every channel; one result per channel, in order.
    fn broadcast(&self, channels: &[String], data: Bytes, skip_history: bool) -> Vec<Result<PublishResult, ApiError>>;
    /// [`ApiBackend::publish`] with the publication's options. A backend that does not override it refuses
    /// tags and idempotency keys (108) rather than dropping them.
    fn publish_with(&self, channel: &str, data: Bytes, opts: &PublishOptions) -> Result<PublishResult, ApiError> {
        if opts.is_plain() {
            self.publish(channel, data, opts.skip_history)
        } else {
            Err(ApiError::NotAvailable)
        }
    }
    /// [`ApiBackend::broadcast`] with the publication's options (an idempotency key applies per channel).
    fn broadcast_with(
        &self,
        channels: &[String],
        data: Bytes,
        opts: &PublishOptions,
    ) -> Vec<Result<PublishResult, ApiError>> {
        if opts.is_plain() {
            self.broadcast(channels, data, opts.skip_history)
        } else {
            channels.iter().map(|c| self.publish_with(c, data.clone(), opts)).collect()
        }
    }
    /// Subscribes the user's connections (or only `client`) to `channel`, server-side.
    fn subscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError>;
    fn unsubscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError>;
    /// Disconnects the user's connections (or only `client`) with this code and reason
    /// ([`DEFAULT_DISCONNECT`] when the caller gave none).
    fn disconnect(&self, user: &str, code: u32, reason: &str, client: Option<&str>) -> Result<(), ApiError>;
    /// Moves the connections' expiry to `expire_at` (Unix seconds), or expires them now if `expired`.
    fn refresh(&self, user: &str, expire_at: Option<i64>, expired: bool, client: Option<&str>) -> Result<(), ApiError>;
    /// Client ID → client info, for everyone subscribed to `channel`.
    fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfoJson>, ApiError>;
    /// `(num_clients, num_users)` subscribed to `channel`.
    fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ApiError>;
    /// Up to `limit` publications after `since` (all from the start when `None`), newest first if `reverse`.
    /// `limit` 0 asks only for the stream position; Centrifugo's node treats a negative limit as "no limit".
    fn history(
        &self,
        channel: &str,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<HistoryResultJson, ApiError>;
    fn history_remove(&self, channel: &str) -> Result<(), ApiError>;
    /// Active channels (matching the glob `pattern`, if any) → number of subscribed connections.
    fn channels(&self, pattern: Option<&str>) -> Result<BTreeMap<String, u32>, ApiError>;
    fn info(&self) -> Result<InfoJson, ApiError>;
}

/// How a publication is made, beyond its channel and data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    pub skip_history: bool,
    pub tags: BTreeMap<String, String>,
    /// Empty: none.
    pub idempotency_key: String,
}

impl PublishOptions {
    /// Nothing but `skip_history`.
    pub fn is_plain(&self) -> bool {
        self.tags.is_empty() && self.idempotency_key.is_empty()
    }
}

/// An API-level refusal: answered with HTTP 200 and `{"error":{"code","message"}}`. Codes and messages are
/// Centrifugo's server API errors (`internal/apiproto/errors.go`, v6), which differ from its client protocol
/// errors: there is no "unauthorized" or "permission denied" here (a bad key is HTTP 401, and a backend
/// call is trusted with every channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub enum ApiError {
    /// 100: something broke on our side; the caller is not at fault.
    Internal,
    /// 102: the channel's namespace is not defined.
    UnknownChannel,
    /// 104: no such method (inside legacy and batch requests; on a path it is HTTP 404).
    NotFound,
    /// 106: a configured limit was hit (Centrifugo v4 had it in the server API; kept for the node's limits).
    LimitExceeded,
    /// 107: the params are incomplete (no channel, no data, binary data).
    BadRequest,
    /// 108: the channel has no history or presence to ask about.
    NotAvailable,
    /// 112: the stream no longer holds the asked-for position (trimmed, expired, or another epoch).
    UnrecoverablePosition,
    /// 113: the operation conflicts with the current state.
    Conflict,
}

impl ApiError {
    pub const fn code(self) -> u32 {
        match self {
            ApiError::Internal => 100,
            ApiError::UnknownChannel => 102,
            ApiError::NotFound => 104,
            ApiError::LimitExceeded => 106,
            ApiError::BadRequest => 107,
            ApiError::NotAvailable => 108,
            ApiError::UnrecoverablePosition => 112,
            ApiError::Conflict => 113,
        }
    }

    pub const fn message(self) -> &'static str {
        match self {
            ApiError::Internal => "internal server error",
            ApiError::UnknownChannel => "unknown channel",
            ApiError::NotFound => "not found",
            ApiError::LimitExceeded => "limit exceeded",
            ApiError::BadRequest => "bad request",
            ApiError::NotAvailable => "not available",
            ApiError::UnrecoverablePosition => "unrecoverable position",
            ApiError::Conflict => "conflict",
        }
    }

    /// The HTTP status in transport error mode (Centrifugo's `MapErrorToHTTPCode`; unmapped codes are 500).
    pub const fn http_status(self) -> StatusCode {
        match self {
            ApiError::UnknownChannel | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest | ApiError::NotAvailable => StatusCode::BAD_REQUEST,
            ApiError::UnrecoverablePosition => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::Internal | ApiError::LimitExceeded => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `code` label of `ringcast_api_errors_total`.
    const fn code_label(self) -> &'static str {
        match self {
            ApiError::Internal => "100",
            ApiError::UnknownChannel => "102",
            ApiError::NotFound => "104",
            ApiError::LimitExceeded => "106",
            ApiError::BadRequest => "107",
            ApiError::NotAvailable => "108",
            ApiError::UnrecoverablePosition => "112",
            ApiError::Conflict => "113",
        }
    }
}

/// A request the API could not take up at all: answered with an HTTP status, never a JSON error.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("missing or wrong API key")]
    Unauthorized,
    #[error("empty request body")]
    EmptyBody,
    #[error("request body is not JSON of the method's shape: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("no API method {0:?}")]
    UnknownMethod(String),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Unauthorized => StatusCode::UNAUTHORIZED,
            RequestError::EmptyBody | RequestError::Malformed(_) => StatusCode::BAD_REQUEST,
            RequestError::UnknownMethod(_) => StatusCode::NOT_FOUND,
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let status = self.status();
        metrics::counter!(crate::metrics::API_REJECTED_TOTAL, "status" => status.as_str().to_owned()).increment(1);
        tracing::debug!(status = status.as_u16(), error = %self, "API request rejected");
        match self {
            // Centrifugo answers 401 with no body at all.
            RequestError::Unauthorized => status.into_response(),
            _ => (status, format!("{}\n", status.canonical_reason().unwrap_or(""))).into_response(),
        }
    }
}

/// Who may call the API. With an empty `api_key` and `insecure` off, every call is refused (401): a
/// deployment that forgot its key is closed, not open.
#[derive(Clone, Default)]
pub struct ApiConfig {
    /// Compared with the `X-API-Key` header, `Authorization: apikey <key>`, or the `api_key` query parameter.
    pub api_key: String,
    /// Skip the key check entirely (development, or an API port only a trusted network reaches).
    pub insecure: bool,
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.api_key.is_empty() { "<none>" } else { "<redacted>" };
        f.debug_struct("ApiConfig").field("api_key", &key).field("insecure", &self.insecure).finish()
    }
}

#[derive(Clone)]
struct ApiState {
    backend: Arc<dyn ApiBackend>,
    config: Arc<ApiConfig>,
}

/// The HTTP routes served on the WebSocket listener: the API under `/api`, `GET /health` (200; see
/// [`health_router`]), and
/// `GET /metrics` (Prometheus text) when a handle is given.
pub fn router(backend: Arc<dyn ApiBackend>, api: ApiConfig, metrics: Option<PrometheusHandle>) -> Router {
    router_with_reload(backend, api, metrics, None)
}

/// Runs a configuration reload: the HTTP status and the JSON body to answer `POST /api/reload` with.
pub type ReloadFn = Arc<dyn Fn() -> (StatusCode, String) + Send + Sync>;

/// [`router`], plus `POST /api/reload` (behind the same key check) when `reload` is given.
pub fn router_with_reload(
    backend: Arc<dyn ApiBackend>,
    api: ApiConfig,
    metrics: Option<PrometheusHandle>,
    reload: Option<ReloadFn>,
) -> Router {
    let health = health_router(backend.clone());
    let state = ApiState { backend, config: Arc::new(api) };
    let mut api = Router::new();
    if let Some(reload) = reload {
        // A static path: it wins over `/api/{method}`.
        api = api.route(
            "/api/reload",
            post(move || {
                let reload = reload.clone();
                async move {
                    let (status, body) = reload();
                    with_json(status, body)
                }
            }),
        );
    }
    let api = api
        .route("/api", post(legacy_route))
        .route("/api/batch", post(batch_route))
        .route("/api/{method}", post(method_route))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .with_state(state);
    let mut router = health.merge(api);
    if let Some(handle) = metrics {
        router = router.route("/metrics", get(move || std::future::ready(render_metrics(&handle))));
    }
    router
}

/// `GET /health` alone: the routes of a public listener whose API and metrics are served on
/// `internal_listen` (everything else is 404), and part of [`router`].
///
/// Always 200 while the process serves: a load balancer must not take a node out because its engine
/// is failing (every node shares the engine; clients still get their replies, error 100 included).
/// The body is `{}` when healthy, as Centrifugo's, and says why when degraded:
/// `{"status":"degraded","reason":"..."}` (an engine circuit breaker is open or half-open; with several
/// Redis shards the reason names each such shard).
pub fn health_router(backend: Arc<dyn ApiBackend>) -> Router {
    Router::new().route("/health", get(move || std::future::ready(health(&*backend))))
}

async fn require_key(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if auth::authorized(&state.config, request.headers(), request.uri()) {
        next.run(request).await
    } else {
        RequestError::Unauthorized.into_response()
    }
}

async fn method_route(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, RequestError> {
    let method = Method::from_name(&name).ok_or(RequestError::UnknownMethod(name))?;
    let reply = Call::decode(method, &body)?.run(&*state.backend, &body);
    Ok(match reply {
        Err(e) if transport_errors(&headers) => with_json(e.http_status(), dispatch::bare_error(e)),
        reply => with_json(StatusCode::OK, dispatch::envelope(&reply)),
    })
}

async fn batch_route(State(state): State<ApiState>, body: Bytes) -> Result<Response, RequestError> {
    Ok(with_json(StatusCode::OK, dispatch::batch(&*state.backend, &body)?))
}

async fn legacy_route(State(state): State<ApiState>, body: Bytes) -> Result<Response, RequestError> {
    Ok(with_json(StatusCode::OK, dispatch::legacy(&*state.backend, &body)?))
}

fn health(backend: &dyn ApiBackend) -> Response {
    let body = match backend.degraded() {
        None => "{}".to_string(),
        Some(reason) => serde_json::json!({"status": "degraded", "reason": reason}).to_string(),
    };
    with_json(StatusCode::OK, body)
}

fn render_metrics(handle: &PrometheusHandle) -> Response {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    let mut text = handle.render();
    crate::metrics::render_delivery(&mut text);
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// Whether the caller asked for API errors as HTTP statuses (`X-Centrifugo-Error-Mode: transport`).
fn transport_errors(headers: &HeaderMap) -> bool {
    headers.get("x-centrifugo-error-mode").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"transport"))
}

fn with_json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::*;

    const CODES: [(ApiError, u32, &str); 8] = [
        (ApiError::Internal, 100, "internal server error"),
        (ApiError::UnknownChannel, 102, "unknown channel"),
        (ApiError::NotFound, 104, "not found"),
        (ApiError::LimitExceeded, 106, "limit exceeded"),
        (ApiError::BadRequest, 107, "bad request"),
        (ApiError::NotAvailable, 108, "not available"),
        (ApiError::UnrecoverablePosition, 112, "unrecoverable position"),
        (ApiError::Conflict, 113, "conflict"),
    ];

    #[test]
    fn error_codes_and_messages_are_centrifugos() {
        for (e, code, message) in CODES {
            assert_eq!((e.code(), e.message(), e.to_string().as_str()), (code, message, message));
            assert_eq!(e.code_label(), code.to_string());
        }
    }

    #[test]
    fn api_config_debug_never_shows_the_key() {
        let c = ApiConfig { api_key: "hunter2".into(), insecure: false };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    async fn send(router: &Router, method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut request = HttpRequest::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body.to_string())).expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        (status, String::from_utf8(body.to_vec()).expect("utf-8"))
    }

    fn test_router() -> Router {
        let backend = Arc::new(dispatch::tests::Recorder::default());
        router(backend, ApiConfig { api_key: "k".into(), insecure: false }, None)
    }

    #[tokio::test]
    async fn statuses_of_requests_the_api_cannot_take_up() {
        let r = test_router();
        let key = [("x-api-key", "k")];
        assert_eq!(send(&r, "POST", "/api/info", &[], "{}").await, (401, String::new()));
        assert_eq!(send(&r, "POST", "/api/info", &key, "{").await, (400, "Bad Request\n".into()));
        assert_eq!(send(&r, "POST", "/api/info", &key, "").await.0, 400);
        assert_eq!(send(&r, "POST", "/api/rpc", &key, "{}").await.0, 404);
        assert_eq!(send(&r, "GET", "/api/info", &key, "").await.0, 405);
        assert_eq!(send(&r, "POST", "/api", &key, "").await.0, 400);
        assert_eq!(send(&r, "GET", "/metrics", &[], "").await.0, 404, "no handle, no /metrics");
        assert_eq!(send(&r, "GET", "/health", &[], "").await, (200, "{}".into()));
    }

    #[tokio::test]
    async fn transport_error_mode_maps_api_errors_to_http_statuses() {
        let r = test_router();
        let headers = [("x-api-key", "k"), ("x-centrifugo-error-mode", "transport")];
        let (status, body) = send(&r, "POST", "/api/publish", &headers, r#"{"channel":"unknown:a","data":1}"#).await;
        assert_eq!(status, 404);
        assert_eq!(
            serde_json::from_str::<Value>(&body).expect("json"),
            json!({"code": 102, "message": "unknown channel"})
        );
        let (status, body) = send(&r, "POST", "/api/publish", &headers, r#"{"channel":"a","data":1}"#).await;
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).expect("json"), json!({"result": {"offset": 1, "epoch": "e"}}));
        let statuses: Vec<u16> = CODES.iter().map(|(e, ..)| e.http_status().as_u16()).collect();
        assert_eq!(statuses, [500, 404, 404, 500, 400, 400, 416, 409]);
    }
}
