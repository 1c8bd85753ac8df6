//! The server HTTP API over real loopback sockets: `http::serve` on a socket whose request head was partly
//! consumed already (as the WebSocket handshake parser leaves it), keep-alive, `/health`, `/metrics`, the
//! key check, and every API method against a fake backend, compared as parsed JSON (and raw `data` byte for
//! byte).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ringcast_server::api::{
    self, ApiBackend, ApiConfig, ApiError, ClientInfoJson, HistoryResultJson, InfoJson, NodeJson, PublicationJson,
    PublishResult, StreamPosition,
};
use ringcast_server::http::{self, ServeOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "s3cret";
const WAIT: Duration = Duration::from_secs(5);

// ---- a fake node ----

/// Records every call as one line (publication data verbatim); answers with fixed results.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn log(&self, line: String) {
        self.calls.lock().expect("lock").push(line);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().expect("lock"))
    }
}

fn position(channel: &str) -> Result<PublishResult, ApiError> {
    match channel {
        c if c.starts_with("unknown:") => Err(ApiError::UnknownChannel),
        "nohistory" => Ok(PublishResult::default()),
        _ => Ok(PublishResult { offset: 42, epoch: "abc".into() }),
    }
}

/// Publication data as a node would have stored it: odd spacing, an escape, a number serde would reformat.
const STORED: &str = r#"{"text": "h\u00e9llo",  "n": 1.50, "big": 123456789012345678901234567890}"#;

impl ApiBackend for Fake {
    fn publish(&self, channel: &str, data: Bytes, skip_history: bool) -> Result<PublishResult, ApiError> {
        self.log(format!("publish {channel} {skip_history} {}", String::from_utf8_lossy(&data)));
        position(channel)
    }
    fn broadcast(&self, channels: &[String], data: Bytes, skip_history: bool) -> Vec<Result<PublishResult, ApiError>> {
        self.log(format!("broadcast {} {skip_history} {}", channels.join(","), String::from_utf8_lossy(&data)));
        channels.iter().map(|c| position(c)).collect()
    }
    fn subscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
        self.log(format!("subscribe {user} {channel} {client:?}"));
        position(channel).map(drop)
    }
    fn unsubscribe(&self, user: &str, channel: &str, client: Option<&str>) -> Result<(), ApiError> {
        self.log(format!("unsubscribe {user} {channel} {client:?}"));
        Ok(())
    }
    fn disconnect(&self, user: &str, code: u32, reason: &str, client: Option<&str>) -> Result<(), ApiError> {
        self.log(format!("disconnect {user} {code} {reason:?} {client:?}"));
        Ok(())
    }
    fn refresh(&self, user: &str, expire_at: Option<i64>, expired: bool, client: Option<&str>) -> Result<(), ApiError> {
        self.log(format!("refresh {user} {expire_at:?} {expired} {client:?}"));
        Ok(())
    }
    fn presence(&self, channel: &str) -> Result<BTreeMap<String, ClientInfoJson>, ApiError> {
        self.log(format!("presence {channel}"));
        if channel == "nopresence" {
            return Err(ApiError::NotAvailable);
        }
        Ok(BTreeMap::from([
            (
                "c1".to_string(),
                ClientInfoJson {
                    client: "c1".into(),
                    user: "42".into(),
                    conn_info: Some(Bytes::from_static(br#"{"name": "Alice"}"#)),
                    chan_info: Some(Bytes::from_static(b"[1,2]")),
                },
            ),
            (
                "c2".to_string(),
                ClientInfoJson { client: "c2".into(), user: "".into(), conn_info: None, chan_info: None },
            ),
        ]))
    }
    fn presence_stats(&self, channel: &str) -> Result<(u32, u32), ApiError> {
        self.log(format!("presence_stats {channel}"));
        Ok((2, 1))
    }
    fn history(
        &self,
        channel: &str,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<HistoryResultJson, ApiError> {
        self.log(format!("history {channel} {limit} {since:?} {reverse}"));
        if since.as_ref().is_some_and(|s| s.epoch != "qFhv") {
            return Err(ApiError::UnrecoverablePosition);
        }
        let publications = if limit == 0 {
            Vec::new()
        } else {
            vec![
                PublicationJson { data: Bytes::from_static(STORED.as_bytes()), offset: 3, ..Default::default() },
                PublicationJson {
                    data: Bytes::from_static(b"7"),
                    offset: 4,
                    info: Some(ClientInfoJson { client: "c1".into(), user: "42".into(), ..Default::default() }),
                    tags: BTreeMap::from([("k".to_string(), "v".to_string())]),
                },
            ]
        };
        Ok(HistoryResultJson { publications, offset: 4, epoch: "qFhv".into() })
    }
    fn history_remove(&self, channel: &str) -> Result<(), ApiError> {
        self.log(format!("history_remove {channel}"));
        Ok(())
    }
    fn channels(&self, pattern: Option<&str>) -> Result<BTreeMap<String, u32>, ApiError> {
        self.log(format!("channels {pattern:?}"));
        Ok(BTreeMap::from([("chat".to_string(), 2), ("news".to_string(), 1)]))
    }
    fn info(&self) -> Result<InfoJson, ApiError> {
        self.log("info".into());
        Ok(InfoJson {
            nodes: vec![NodeJson {
                uid: "f844a2ed".into(),
                name: "node1".into(),
                version: "0.1.0".into(),
                num_clients: 5,
                num_users: 3,
                num_subs: 7,
                num_channels: 2,
                uptime: 60,
            }],
        })
    }
}

// ---- a listener that hands sockets to `http::serve`, the way the connection code will ----

struct Server {
    addr: SocketAddr,
    fake: Arc<Fake>,
}

/// Serves with the API key [`KEY`]; each accepted socket has its first `pre_read` bytes consumed first and
/// handed to `serve` as `already_read`.
async fn start(pre_read: usize) -> Server {
    start_with(ApiConfig { api_key: KEY.into(), insecure: false }, pre_read, ServeOptions::default()).await
}

async fn start_with(config: ApiConfig, pre_read: usize, options: ServeOptions) -> Server {
    let fake = Arc::new(Fake::default());
    let router = api::router(fake.clone(), config, ringcast_server::metrics::install());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (router, options) = (router.clone(), options.clone());
            tokio::spawn(async move {
                let mut head = vec![0; pre_read];
                if stream.read_exact(&mut head).await.is_ok() {
                    http::serve_with(stream, head, router, options, std::future::pending()).await;
                }
            });
        }
    });
    Server { addr, fake }
}

// ---- a minimal HTTP/1.1 client that can also misbehave ----

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client { stream: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads until EOF; true if the server closed within [`WAIT`].
    async fn closed(&mut self) -> bool {
        let mut scratch = [0; 256];
        matches!(tokio::time::timeout(WAIT, self.stream.read(&mut scratch)).await, Ok(Ok(0) | Err(_)))
    }

    async fn fill(&mut self) {
        let mut chunk = [0; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await.expect("reply in time").expect("read");
        assert!(n > 0, "connection closed mid-reply; got {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn reply(&mut self) -> Reply {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "test client reads Content-Length bodies only");
        let len: usize =
            headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().expect("length"));
        while self.buf.len() < head_end + len {
            self.fill().await;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Reply { status, headers, body }
    }

    async fn call(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        self.send(&request(method, path, headers, body)).await;
        self.reply().await
    }

    /// `POST /api/<method>` with the right key.
    async fn api(&mut self, method: &str, body: &str) -> Reply {
        self.call("POST", &format!("/api/{method}"), &[("X-API-Key", KEY)], body).await
    }
}

async fn api_json(server: &Server, method: &str, body: &str) -> Value {
    let reply = Client::connect(server.addr).await.api(method, body).await;
    assert_eq!(reply.status, 200, "{method}: {}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    reply.json()
}

// ---- the listener hand-over ----

#[tokio::test]
async fn request_whose_head_was_partly_read_already_is_served() {
    let body = r#"{"channel":"chat","data":{"a":1}}"#;
    let raw = request("POST", "/api/publish", &[("X-API-Key", KEY)], body);
    let head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    for pre_read in [1, 4, 17, head_len - 1, head_len, head_len + 5, raw.len()] {
        let server = start(pre_read).await;
        let mut client = Client::connect(server.addr).await;
        client.send(&raw).await;
        let reply = client.reply().await;
        assert_eq!(
            (reply.status, reply.json()),
            (200, json!({"result": {"offset": 42, "epoch": "abc"}})),
            "pre_read {pre_read}"
        );
        assert_eq!(server.fake.take(), [r#"publish chat false {"a":1}"#], "pre_read {pre_read}");
    }
}

#[tokio::test]
async fn keep_alive_serves_further_requests_on_the_connection() {
    let server = start(10).await;
    let mut client = Client::connect(server.addr).await;
    assert_eq!(
        client.api("presence_stats", r#"{"channel":"a"}"#).await.json(),
        json!({"result": {"num_clients": 2, "num_users": 1}})
    );
    assert_eq!(client.api("history_remove", r#"{"channel":"a"}"#).await.json(), json!({"result": {}}));
    // Two requests in one write (pipelined): answered in order.
    let mut both = request("POST", "/api/info", &[("X-API-Key", KEY)], "{}");
    both.extend(request("GET", "/health", &[], ""));
    client.send(&both).await;
    assert_eq!(client.reply().await.json()["result"]["nodes"][0]["uid"], "f844a2ed");
    assert_eq!(client.reply().await.text(), "{}");
    assert_eq!(server.fake.take(), ["presence_stats a", "history_remove a", "info"]);
}

#[tokio::test]
async fn health_and_metrics() {
    let server = start(3).await;
    let mut client = Client::connect(server.addr).await;
    let health = client.call("GET", "/health", &[], "").await;
    assert_eq!((health.status, health.json()), (200, json!({})));
    client.api("publish", r#"{"channel":"m","data":1}"#).await;
    let metrics = client.call("GET", "/metrics", &[], "").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").is_some_and(|t| t.starts_with("text/plain")));
    let text = metrics.text();
    assert!(text.contains(r#"ringcast_api_requests_total{method="publish"}"#), "{text}");
    assert!(text.contains("# HELP ringcast_api_requests_total"), "{text}");
    assert!(text.contains("ringcast_http_connections_total"), "{text}");
    assert_eq!(client.call("GET", "/nosuch", &[], "").await.status, 404);
}

// ---- the key check ----

#[tokio::test]
async fn wrong_or_missing_key_is_401_and_reaches_nothing() {
    let server = start(0).await;
    let mut client = Client::connect(server.addr).await;
    let body = r#"{"channel":"a","data":1}"#;
    for headers in [
        vec![],
        vec![("X-API-Key", "wrong")],
        vec![("X-API-Key", "s3crett")],
        vec![("Authorization", "apikey wrong")],
        vec![("Authorization", "Bearer s3cret")],
    ] {
        let reply = client.call("POST", "/api/publish", &headers, body).await;
        assert_eq!((reply.status, reply.body.len()), (401, 0), "{headers:?}");
    }
    assert_eq!(client.call("POST", "/api", &[], r#"{"method":"info","params":{}}"#).await.status, 401);
    assert_eq!(client.call("POST", "/api/batch", &[], r#"{"commands":[]}"#).await.status, 401);
    assert!(server.fake.take().is_empty());

    for (path, headers) in [
        ("/api/publish", vec![("X-API-Key", KEY)]),
        ("/api/publish", vec![("Authorization", "apikey s3cret")]),
        ("/api/publish?api_key=s3cret", vec![]),
    ] {
        let reply = client.call("POST", path, &headers, body).await;
        assert_eq!(reply.status, 200, "{path} {headers:?}");
    }
    assert_eq!(server.fake.take().len(), 3);
}

#[tokio::test]
async fn no_configured_key_refuses_everything_unless_insecure() {
    let closed = start_with(ApiConfig::default(), 0, ServeOptions::default()).await;
    let mut client = Client::connect(closed.addr).await;
    assert_eq!(client.call("POST", "/api/info", &[("X-API-Key", "")], "{}").await.status, 401);
    assert_eq!(client.call("POST", "/api/info", &[], "{}").await.status, 401);
    assert_eq!(client.call("GET", "/health", &[], "").await.status, 200, "health needs no key");

    let open = start_with(ApiConfig { api_key: String::new(), insecure: true }, 0, ServeOptions::default()).await;
    let reply = Client::connect(open.addr).await.call("POST", "/api/info", &[], "{}").await;
    assert_eq!(reply.status, 200);
}

// ---- every method, exact JSON ----

#[tokio::test]
async fn publish_keeps_data_byte_for_byte() {
    let server = start(0).await;
    let data = r#"{"text": "h\u00e9llo",  "n": 1.50, "big": 123456789012345678901234567890, "l": [ 1 ,2 ]}"#;
    // (tags and idempotency_key reach the real node through `publish_with`; tests/policy.rs covers them.)
    let body = format!(r#"{{"channel":"chat","data":{data},"skip_history":true}}"#);
    assert_eq!(api_json(&server, "publish", &body).await, json!({"result": {"offset": 42, "epoch": "abc"}}));
    assert_eq!(server.fake.take(), [format!("publish chat true {data}")]);
    assert_eq!(api_json(&server, "publish", r#"{"channel":"nohistory","data":"x"}"#).await, json!({"result": {}}));
    assert_eq!(
        api_json(&server, "publish", r#"{"channel":"unknown:chat","data":{}}"#).await,
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
    assert_eq!(
        api_json(&server, "publish", r#"{"channel":"chat"}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
    assert_eq!(server.fake.take(), [r#"publish nohistory false "x""#, "publish unknown:chat false {}"]);
}

#[tokio::test]
async fn broadcast() {
    let server = start(0).await;
    let reply = api_json(&server, "broadcast", r#"{"channels":["a","unknown:b","nohistory",""],"data":[1, 2]}"#).await;
    assert_eq!(
        reply,
        json!({"result": {"responses": [
            {"result": {"offset": 42, "epoch": "abc"}},
            {"error": {"code": 102, "message": "unknown channel"}},
            {"result": {}},
            {"error": {"code": 107, "message": "bad request"}},
        ]}})
    );
    assert_eq!(server.fake.take(), ["broadcast a,unknown:b,nohistory false [1, 2]"]);
    assert_eq!(
        api_json(&server, "broadcast", r#"{"channels":[],"data":1}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
}

#[tokio::test]
async fn subscribe_unsubscribe_disconnect_refresh() {
    let server = start(0).await;
    let ok = json!({"result": {}});
    assert_eq!(
        api_json(&server, "subscribe", r#"{"user":"42","channel":"chat","client":"c1","info":{"x":1}}"#).await,
        ok
    );
    assert_eq!(
        api_json(&server, "subscribe", r#"{"user":"42","channel":"unknown:x"}"#).await,
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
    assert_eq!(
        api_json(&server, "subscribe", r#"{"user":"42"}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
    assert_eq!(api_json(&server, "unsubscribe", r#"{"user":"42","channel":"chat"}"#).await, ok);
    assert_eq!(api_json(&server, "disconnect", r#"{"user":"42"}"#).await, ok);
    assert_eq!(
        api_json(&server, "disconnect", r#"{"user":"42","client":"c1","disconnect":{"code":4001,"reason":"banned"}}"#)
            .await,
        ok
    );
    assert_eq!(api_json(&server, "refresh", r#"{"user":"42","expire_at":1893456000}"#).await, ok);
    assert_eq!(api_json(&server, "refresh", r#"{"user":"42","client":"c1","expired":true}"#).await, ok);
    assert_eq!(
        server.fake.take(),
        [
            r#"subscribe 42 chat Some("c1")"#,
            "subscribe 42 unknown:x None",
            "unsubscribe 42 chat None",
            r#"disconnect 42 3503 "force disconnect" None"#,
            r#"disconnect 42 4001 "banned" Some("c1")"#,
            "refresh 42 Some(1893456000) false None",
            r#"refresh 42 None true Some("c1")"#,
        ]
    );
}

#[tokio::test]
async fn presence_and_presence_stats() {
    let server = start(0).await;
    assert_eq!(
        api_json(&server, "presence", r#"{"channel":"chat"}"#).await,
        json!({"result": {"presence": {
            "c1": {"client": "c1", "user": "42", "conn_info": {"name": "Alice"}, "chan_info": [1, 2]},
            "c2": {"client": "c2", "user": ""},
        }}})
    );
    assert_eq!(
        api_json(&server, "presence", r#"{"channel":"nopresence"}"#).await,
        json!({"error": {"code": 108, "message": "not available"}})
    );
    assert_eq!(
        api_json(&server, "presence_stats", r#"{"channel":"chat"}"#).await,
        json!({"result": {"num_clients": 2, "num_users": 1}})
    );
    assert_eq!(server.fake.take(), ["presence chat", "presence nopresence", "presence_stats chat"]);
}

#[tokio::test]
async fn history_returns_stored_data_byte_for_byte() {
    let server = start(0).await;
    let reply =
        Client::connect(server.addr).await.api("history", r#"{"channel":"chat","limit":10,"reverse":true}"#).await;
    assert!(reply.text().contains(STORED), "stored data spliced in verbatim: {}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"result": {
            "publications": [
                {"data": serde_json::from_str::<Value>(STORED).expect("json"), "offset": 3},
                {"data": 7, "offset": 4, "info": {"client": "c1", "user": "42"}, "tags": {"k": "v"}},
            ],
            "offset": 4,
            "epoch": "qFhv",
        }})
    );
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"chat"}"#).await,
        json!({"result": {"publications": [], "offset": 4, "epoch": "qFhv"}})
    );
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"chat","limit":1,"since":{"offset":2,"epoch":"old"}}"#).await,
        json!({"error": {"code": 112, "message": "unrecoverable position"}})
    );
    assert_eq!(api_json(&server, "history_remove", r#"{"channel":"chat"}"#).await, json!({"result": {}}));
    assert_eq!(
        server.fake.take(),
        [
            "history chat 10 None true",
            "history chat 0 None false",
            r#"history chat 1 Some(StreamPosition { offset: 2, epoch: "old" }) false"#,
            "history_remove chat",
        ]
    );
}

#[tokio::test]
async fn channels_and_info() {
    let server = start(0).await;
    assert_eq!(
        api_json(&server, "channels", r#"{"pattern":"c*"}"#).await,
        json!({"result": {"channels": {"chat": {"num_clients": 2}, "news": {"num_clients": 1}}}})
    );
    api_json(&server, "channels", "{}").await;
    assert_eq!(
        api_json(&server, "info", "{}").await,
        json!({"result": {"nodes": [{
            "uid": "f844a2ed", "name": "node1", "version": "0.1.0", "num_clients": 5, "num_users": 3,
            "num_subs": 7, "num_channels": 2, "uptime": 60,
        }]}})
    );
    assert_eq!(server.fake.take(), [r#"channels Some("c*")"#, "channels None", "info"]);
}

#[tokio::test]
async fn legacy_single_endpoint_and_batch() {
    let server = start(0).await;
    let mut client = Client::connect(server.addr).await;
    let legacy = concat!(
        r#"{"id":1,"method":"publish","params":{"channel":"chat","data":{"text":"hello"}}}"#,
        "\n",
        r#"{"id":2,"method":"info","params":{}}"#
    );
    let reply = client.call("POST", "/api", &[("Authorization", "apikey s3cret")], legacy).await;
    assert_eq!(reply.status, 200);
    let lines: Vec<Value> = reply.text().lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines[0], json!({"id": 1, "result": {"offset": 42, "epoch": "abc"}}));
    assert_eq!(lines[1]["id"], 2);
    assert_eq!(lines[1]["result"]["nodes"][0]["name"], "node1");

    let batch = concat!(
        r#"{"commands":[{"publish":{"channel":"a","data":{}}},{"presence_stats":{"channel":"a"}},"#,
        r#"{"publish":{"channel":"unknown:x","data":{}}}]}"#
    );
    let reply = client.call("POST", "/api/batch", &[("X-API-Key", KEY)], batch).await;
    assert_eq!(
        reply.json(),
        json!({"replies": [
            {"publish": {"offset": 42, "epoch": "abc"}},
            {"presence_stats": {"num_clients": 2, "num_users": 1}},
            {"error": {"code": 102, "message": "unknown channel"}},
        ]})
    );
    assert_eq!(
        server.fake.take(),
        [
            r#"publish chat false {"text":"hello"}"#,
            "info",
            "publish a false {}",
            "presence_stats a",
            "publish unknown:x false {}"
        ]
    );
}

#[tokio::test]
async fn malformed_body_is_400_and_unknown_method_404() {
    let server = start(0).await;
    let mut client = Client::connect(server.addr).await;
    for body in ["{", "", "[]", r#"{"channel":1,"data":{}}"#] {
        let reply = client.api("publish", body).await;
        assert_eq!(reply.status, 400, "{body:?}");
    }
    assert_eq!(client.api("rpc", r#"{"method":"x"}"#).await.status, 404);
    assert_eq!(client.call("GET", "/api/info", &[("X-API-Key", KEY)], "").await.status, 405);
    assert!(server.fake.take().is_empty());
    // The connection survives all of it.
    assert_eq!(client.api("info", "{}").await.status, 200);
}

// ---- slow and idle clients ----

fn short_timeouts() -> ServeOptions {
    ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
        keep_alive: true,
    }
}

#[tokio::test]
async fn unfinished_request_head_is_closed_after_the_header_timeout() {
    let server = start_with(ApiConfig { api_key: KEY.into(), insecure: false }, 4, short_timeouts()).await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"POST /api/info HTTP/1.1\r\nHost: te").await;
    let started = tokio::time::Instant::now();
    assert!(client.closed().await, "slow head closed");
    assert!(started.elapsed() >= Duration::from_millis(250), "not before the timeout: {:?}", started.elapsed());
}

#[tokio::test]
async fn idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let server = start_with(ApiConfig { api_key: KEY.into(), insecure: false }, 0, short_timeouts()).await;
    let mut client = Client::connect(server.addr).await;
    assert_eq!(client.call("GET", "/health", &[], "").await.status, 200);
    assert!(client.closed().await, "idle keep-alive connection closed");
}

#[tokio::test]
async fn trickled_body_is_answered_408() {
    let server = start_with(ApiConfig { api_key: KEY.into(), insecure: false }, 0, short_timeouts()).await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"POST /api/info HTTP/1.1\r\nHost: t\r\nX-API-Key: s3cret\r\nContent-Length: 10\r\n\r\n{}").await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 408);
    assert!(client.closed().await);
    assert!(server.fake.take().is_empty());
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_closes() {
    // (A connection idle or still sending a request head is closed at once instead: nothing was started.)
    let fake = Arc::new(Fake::default());
    let router = api::router(fake.clone(), ApiConfig { api_key: KEY.into(), insecure: false }, None);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let shutdown = async move {
            let _ = stopped.await;
        };
        http::serve_with(stream, Vec::new(), router, ServeOptions::default(), shutdown).await;
    });
    let mut client = Client::connect(addr).await;
    assert_eq!(client.api("info", "{}").await.status, 200);
    // A request whose head has arrived and whose body is still coming when shutdown comes: it is finished and
    // answered, then the connection closes.
    let whole = request("POST", "/api/presence_stats", &[("X-API-Key", KEY)], r#"{"channel":"a"}"#);
    let split = whole.len() - 5;
    client.send(&whole[..split]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.send(&whole[split..]).await;
    let reply = client.reply().await;
    assert_eq!(reply.json(), json!({"result": {"num_clients": 2, "num_users": 1}}));
    assert!(client.closed().await);
    tokio::time::timeout(WAIT, served).await.expect("serve returns").expect("no panic");
}
