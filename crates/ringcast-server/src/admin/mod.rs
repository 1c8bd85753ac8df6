//! The live admin dashboard: `/admin`, a page that shows what the server is doing, updated every
//! second over a WebSocket to ringcast itself (`/admin/ws`).
//!
//! Off unless `admin` is on (on by default with `--dev`). Served on the `internal_listen` address when
//! it is set, else on `listen` (plain requests reach it through the HTTP server; the upgrade of
//! `/admin/ws` is handed there too, see `ws::connection::upgrade`). Every route but the login page and
//! the static script needs a session ([`session`]): the login form checks `admin_password` and sets a
//! signed, expiring cookie.
//!
//! | route | what |
//! |---|---|
//! | `GET /admin` | the dashboard, or the login form without a valid session |
//! | `POST /admin/login` | `password=...` (a form): 303 to `/admin` with the session cookie, or 401 |
//! | `POST /admin/logout` | clears the cookie |
//! | `GET /admin/snapshot` | the latest snapshot as JSON (for scripts: `Authorization: token ...`) |
//! | `GET /admin/ws` | WebSocket: one snapshot a second, as a text frame |
//! | `GET /admin/dashboard.js` | the page's script (embedded in the binary, as the pages are) |
//!
//! What it refuses to do: run commands (publish, disconnect) — the server API does that, with its key.
//! One sampler task makes the snapshots ([`snapshot`]), only while someone is looking.

pub mod session;
mod snapshot;
mod socket;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes as Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use tokio::sync::watch;

use crate::pubsub::node::Node;
use session::{Sessions, COOKIE, SESSION_TTL};

/// The path the WebSocket feed is served on (the upgrade routing hands it to the HTTP server).
pub const WS_PATH: &str = "/admin/ws";

const LOGIN_HTML: &str = include_str!("assets/login.html");
const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
/// The login form again, saying why.
static LOGIN_FAILED_HTML: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    LOGIN_HTML.replace("<!--ERROR-->", r#"<p class="error" id="error">Wrong password.</p>"#)
});

/// How often a snapshot is made while someone watches.
const TICK: Duration = Duration::from_secs(1);
/// A `/admin/snapshot` request keeps the sampler running this long without a WebSocket viewer.
const POLL_KEEPS_SAMPLING_MS: u64 = 10_000;

/// The dashboard's shared state: who may log in, and the latest snapshot.
pub struct Admin {
    sessions: Sessions,
    node: Arc<Node>,
    sampler: Mutex<snapshot::Sampler>,
    /// The latest snapshot, encoded once as a WebSocket text frame.
    feed: watch::Sender<Feed>,
    /// The latest snapshot's JSON, for `/admin/snapshot`.
    latest: Mutex<Bytes>,
    /// When `/admin/snapshot` was last asked (ms since start of the process clock).
    polled_at: AtomicU64,
    started: std::time::Instant,
    /// Login attempts, right or wrong, for the whole node: [`LOGIN_BURST`] at once, then one every
    /// [`LOGIN_EVERY`]; over it 429. Guessing the password is bounded to that rate.
    logins: governor::DefaultDirectRateLimiter,
}

/// Login attempts allowed at once.
const LOGIN_BURST: u32 = 10;
/// One more login attempt is allowed after this long.
const LOGIN_EVERY: Duration = Duration::from_secs(6);

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("viewers", &self.feed.receiver_count()).finish_non_exhaustive()
    }
}

/// What viewers receive from the sampler.
#[derive(Debug, Clone)]
pub enum Feed {
    /// No snapshot yet.
    Empty,
    /// The latest snapshot, as one WebSocket text frame.
    Frame(Bytes),
    /// The server is shutting down: close with 1001.
    Closed,
}

fn login_quota() -> governor::Quota {
    let burst = std::num::NonZeroU32::new(LOGIN_BURST).unwrap_or(std::num::NonZeroU32::MIN);
    governor::Quota::with_period(LOGIN_EVERY).map_or(governor::Quota::per_minute(burst), |q| q.allow_burst(burst))
}

fn relock<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Admin {
    pub fn new(password: &str, secret: &str, node: Arc<Node>) -> Arc<Admin> {
        Arc::new(Admin {
            sessions: Sessions::new(password, secret),
            node,
            sampler: Mutex::new(snapshot::Sampler::default()),
            feed: watch::Sender::new(Feed::Empty),
            latest: Mutex::new(Bytes::new()),
            polled_at: AtomicU64::new(0),
            started: std::time::Instant::now(),
            logins: governor::RateLimiter::direct(login_quota()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The broker's state for the dashboard. The memory broker is embedded and always up; a networked
    /// engine (Redis) reports whether publications reach this node and whether its last command failed.
    fn engine(&self) -> serde_json::Value {
        match &self.node.remote {
            None => {
                serde_json::json!({ "kind": "memory", "state": "up", "detail": "embedded: positions, history and presence in this process" })
            }
            Some(remote) => {
                let status = remote.broker.status();
                serde_json::json!({ "kind": status.kind, "state": status.state.label(), "detail": status.detail })
            }
        }
    }

    /// Makes one snapshot and hands it to every viewer.
    fn tick(&self) {
        let snapshot = relock(self.sampler.lock()).sample(&self.node, self.engine());
        let json = Bytes::from(snapshot.to_string());
        *relock(self.latest.lock()) = json.clone();
        self.feed.send_replace(Feed::Frame(ringcast_wire::encode_frame(ringcast_wire::OpCode::Text, &json)));
    }

    fn watched(&self) -> bool {
        self.feed.receiver_count() > 0
            || match self.polled_at.load(Ordering::Relaxed) {
                // Never polled: nobody is watching (a fresh node does not sample on its own).
                0 => false,
                at => (self.now_ms() + 1).saturating_sub(at) < POLL_KEEPS_SAMPLING_MS,
            }
    }

    /// The sampler: a snapshot every second while a viewer is connected (or polled lately), until
    /// `shutdown`; then every viewer is closed with 1001.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tick.tick() => if self.watched() { self.tick() },
                () = &mut shutdown => break,
            }
        }
        self.feed.send_replace(Feed::Closed);
    }

    /// The session's expiry, when the request carries a valid one.
    fn session(&self, headers: &HeaderMap) -> Option<u64> {
        session::token_of(headers).and_then(|t| self.sessions.verify(t))
    }
}

/// The dashboard's routes, to merge into the listener's router.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin", get(index))
        .route("/admin/", get(index))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/snapshot", get(snapshot_json))
        .route("/admin/dashboard.js", get(script))
        .route(WS_PATH, get(websocket))
        .with_state(admin)
}

fn html(status: StatusCode, body: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body.to_owned())
        .into_response()
}

async fn index(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    match admin.session(&headers) {
        Some(_) => html(StatusCode::OK, DASHBOARD_HTML),
        None => html(StatusCode::OK, LOGIN_HTML),
    }
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], DASHBOARD_JS).into_response()
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let pair = body.split(|&b| b == b'&').find_map(|p| p.strip_prefix(name.as_bytes())?.strip_prefix(b"="))?;
    let mut out = Vec::with_capacity(pair.len());
    let mut i = 0;
    while i < pair.len() {
        match pair[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = pair.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn session_cookie(value: &str, max_age: u64) -> HeaderValue {
    let cookie = format!("{COOKIE}={value}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static("ringcast_admin=; Path=/admin; Max-Age=0"))
}

async fn login(State(admin): State<Arc<Admin>>, body: Body) -> Response {
    if admin.logins.check().is_err() {
        metrics::counter!(crate::metrics::ADMIN_LOGIN_FAILURES_TOTAL).increment(1);
        tracing::warn!("admin: login attempts over the limit; answered 429");
        let retry = LOGIN_EVERY.as_secs().to_string();
        return (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, retry)], "too many login attempts\n")
            .into_response();
    }
    let password = form_value(&body, "password").unwrap_or_default();
    if !admin.sessions.password_matches(&password) {
        metrics::counter!(crate::metrics::ADMIN_LOGIN_FAILURES_TOTAL).increment(1);
        tracing::warn!("admin: login with a wrong password");
        return html(StatusCode::UNAUTHORIZED, &LOGIN_FAILED_HTML);
    }
    tracing::info!("admin: login");
    let token = admin.sessions.issue();
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, HeaderValue::from_static("/admin")),
            (header::SET_COOKIE, session_cookie(&token, SESSION_TTL.as_secs())),
        ],
    )
        .into_response()
}

async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, HeaderValue::from_static("/admin")), (header::SET_COOKIE, session_cookie("", 0))],
    )
        .into_response()
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::CACHE_CONTROL, "no-store")], "log in at /admin\n").into_response()
}

async fn snapshot_json(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if admin.session(&headers).is_none() {
        return unauthorized();
    }
    admin.polled_at.store(admin.now_ms() + 1, Ordering::Relaxed);
    let mut latest = relock(admin.latest.lock()).clone();
    if latest.is_empty() {
        admin.tick();
        latest = relock(admin.latest.lock()).clone();
    }
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], latest).into_response()
}

/// `GET /admin/ws`: checks the session, the Origin (same origin only: the cookie must not let another
/// site's page read the feed) and the upgrade headers, answers 101 and serves the feed.
async fn websocket(State(admin): State<Arc<Admin>>, mut req: Request) -> Response {
    let headers = req.headers();
    let Some(expiry) = admin.session(headers) else { return unauthorized() };
    let value = |name: header::HeaderName| headers.get(name).map(HeaderValue::as_bytes);
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return (StatusCode::BAD_REQUEST, "WebSocket upgrade required\n").into_response();
    }
    if value(header::SEC_WEBSOCKET_VERSION).map(<[u8]>::trim_ascii) != Some(b"13") {
        return (StatusCode::UPGRADE_REQUIRED, [(header::SEC_WEBSOCKET_VERSION, "13")], "").into_response();
    }
    let Some(key) = value(header::SEC_WEBSOCKET_KEY).map(<[u8]>::trim_ascii).filter(|k| k.len() == 24) else {
        return (StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key\n").into_response();
    };
    if !ringcast_wire::handshake::origin_allowed(value(header::ORIGIN), value(header::HOST), &[]) {
        return (StatusCode::FORBIDDEN, "cross-origin dashboard socket refused\n").into_response();
    }
    let accept = ringcast_wire::handshake::accept_key(key);
    let Ok(accept) = HeaderValue::from_bytes(&accept) else {
        return (StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key\n").into_response();
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let feed = admin.feed.subscribe();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => socket::serve(upgraded, feed, expiry).await,
            Err(e) => tracing::debug!(error = %e, "admin: upgrade failed"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_percent_decoded() {
        assert_eq!(form_value(b"password=a%20b+c%26d", "password").as_deref(), Some("a b c&d"));
        assert_eq!(form_value(b"x=1&password=p", "password").as_deref(), Some("p"));
        assert_eq!(form_value(b"passwordx=p", "password"), None);
        assert_eq!(form_value(b"password=%zz", "password"), None);
        assert_eq!(form_value(b"password=%f", "password"), None);
    }
}
