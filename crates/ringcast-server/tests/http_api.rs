//! The server HTTP API over real loopback sockets, backed by a real [`Node`] (memory broker, namespaces,
//! hub): `http::serve` on a socket whose request head was partly consumed already (as the WebSocket
//! handshake parser leaves it), keep-alive, `/health`, `/metrics`, the key check, and every API method,
//! compared as parsed JSON (and raw `data` byte for byte), with each call's effect read back from the
//! node (what it stored, what it queued for a connection).
//!
//! What a real node cannot produce here is a connected client: that needs a socket and a session. A
//! client stands in as its [`ClientShared`] alone, registered with the node under its user (and, where
//! a test needs subscribers, in the hub) exactly as a session registers itself; what the API asks of the
//! connection (server-side subscribe, refresh, disconnect) is read from that shared state, which is where
//! the session would take it from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::messages::{ClientInfo, Publication};
use ringcast_protocol::Format;
use ringcast_server::api::http::{self, ServeOptions};
use ringcast_server::api::{self, ApiConfig};
use ringcast_server::broker::{HistoryFilter, MemoryBroker};
use ringcast_server::policy::namespace::{ChannelOptions, NamespaceConfig, Namespaces};
use ringcast_server::pubsub::client::{ClientId, ClientShared, DisconnectRequest, ServerCommand};
use ringcast_server::pubsub::node::Node;
use ringcast_server::transport::outbound::Outbound;
use ringcast_server::transport::Encoding;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "s3cret";
const WAIT: Duration = Duration::from_secs(5);

// ---- a real node ----

/// Channels without a namespace keep history (10 publications, 60 s) and presence; `nohistory:` keeps
/// no history, `nopresence:` no presence; any other namespace is unknown (102).
fn new_node() -> Arc<Node> {
    let history = |o: ChannelOptions| ChannelOptions { history_size: 10, history_ttl: Duration::from_secs(60), ..o };
    let default = history(ChannelOptions { presence: true, ..Default::default() });
    let namespaces = vec![
        NamespaceConfig { name: "nohistory".into(), options: ChannelOptions { presence: true, ..Default::default() } },
        NamespaceConfig { name: "nopresence".into(), options: history(ChannelOptions::default()) },
    ];
    let namespaces = Namespaces::new(default, namespaces).expect("valid namespaces");
    Arc::new(Node::new(Arc::new(MemoryBroker::new()), namespaces, None, false))
}

/// Everything `channel`'s stream holds, oldest first: (offset, data exactly as stored).
fn stored(node: &Node, channel: &str) -> Vec<(u64, String)> {
    let (pubs, _) = node.history(channel, &HistoryFilter { since: None, limit: -1, reverse: false }).expect("history");
    pubs.into_iter().map(|p| (p.offset, String::from_utf8_lossy(&p.data).into_owned())).collect()
}

/// The stream's epoch (random per node), for the replies that carry it.
fn epoch(node: &Node, channel: &str) -> String {
    node.history(channel, &HistoryFilter { since: None, limit: 0, reverse: false })
        .expect("position")
        .1
        .epoch
        .to_string()
}

/// A connected client of `user`, as the API finds it (see the module docs).
fn connected(node: &Node, user: &str) -> Arc<ClientShared> {
    let client = ClientShared::new(ClientId::random(), Encoding::websocket(Format::Json), 1 << 20);
    assert!(node.try_register_client(user, &client));
    client
}

/// A connected client subscribed to `channels` on this node.
fn subscriber(node: &Node, user: &str, channels: &[&str]) -> Arc<ClientShared> {
    let client = connected(node, user);
    for channel in channels {
        node.hub.subscribe_with(channel, &client, || (), || Ok::<_, ()>(())).expect("subscribed");
    }
    client
}

/// What the API asked the client's session to do, in order (taking it).
fn commands(client: &ClientShared) -> Vec<ServerCommand> {
    let mut out = Vec::new();
    client.take_commands(&mut out);
    out
}

/// The disconnect the API asked of the client, if any.
fn disconnect_request(client: &ClientShared) -> Option<DisconnectRequest> {
    client.take(&mut Outbound::new(), std::task::Waker::noop())
}

fn present(node: &Node, channel: &str, client: &ClientShared, user: &str, conn_info: &str, chan_info: &str) {
    let info = ClientInfo {
        user: user.into(),
        client: client.id.to_string(),
        conn_info: Bytes::copy_from_slice(conn_info.as_bytes()),
        chan_info: Bytes::copy_from_slice(chan_info.as_bytes()),
    };
    node.broker.add_presence(channel, client.id, info);
}

// ---- a listener that hands sockets to `http::serve`, the way the connection code does ----

struct Server {
    addr: SocketAddr,
    node: Arc<Node>,
}

/// Serves with the API key [`KEY`]; each accepted socket has its first `pre_read` bytes consumed first and
/// handed to `serve` as `already_read`.
async fn start(pre_read: usize) -> Server {
    start_with(ApiConfig { api_key: KEY.into(), insecure: false }, pre_read, ServeOptions::default()).await
}

async fn start_with(config: ApiConfig, pre_read: usize, options: ServeOptions) -> Server {
    let node = new_node();
    let router = api::router(node.clone(), config, ringcast_server::metrics::install());
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
    Server { addr, node }
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
        let epoch = epoch(&server.node, "chat");
        assert_eq!(
            (reply.status, reply.json()),
            (200, json!({"result": {"offset": 1, "epoch": epoch}})),
            "pre_read {pre_read}"
        );
        assert_eq!(stored(&server.node, "chat"), [(1, r#"{"a":1}"#.to_string())], "pre_read {pre_read}");
    }
}

#[tokio::test]
async fn keep_alive_serves_further_requests_on_the_connection() {
    let server = start(10).await;
    let node = &server.node;
    let (one, two) = (connected(node, "42"), connected(node, "42"));
    present(node, "a", &one, "42", "", "");
    present(node, "a", &two, "42", "", "");
    node.publish("a", Bytes::from_static(b"1"), None).expect("publish");
    let mut client = Client::connect(server.addr).await;
    assert_eq!(
        client.api("presence_stats", r#"{"channel":"a"}"#).await.json(),
        json!({"result": {"num_clients": 2, "num_users": 1}})
    );
    assert_eq!(client.api("history_remove", r#"{"channel":"a"}"#).await.json(), json!({"result": {}}));
    assert!(stored(node, "a").is_empty(), "history removed");
    // Two requests in one write (pipelined): answered in order.
    let mut both = request("POST", "/api/info", &[("X-API-Key", KEY)], "{}");
    both.extend(request("GET", "/health", &[], ""));
    client.send(&both).await;
    assert_eq!(client.reply().await.json()["result"]["nodes"][0]["uid"], json!(node.uid));
    assert_eq!(client.reply().await.text(), "{}");
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
    assert_eq!(
        client.call("POST", "/api", &[], r#"{"method":"publish","params":{"channel":"a","data":1}}"#).await.status,
        401
    );
    assert_eq!(
        client.call("POST", "/api/batch", &[], r#"{"commands":[{"publish":{"channel":"a","data":1}}]}"#).await.status,
        401
    );
    assert!(stored(&server.node, "a").is_empty(), "nothing was published");

    for (path, headers) in [
        ("/api/publish", vec![("X-API-Key", KEY)]),
        ("/api/publish", vec![("Authorization", "apikey s3cret")]),
        ("/api/publish?api_key=s3cret", vec![]),
    ] {
        let reply = client.call("POST", path, &headers, body).await;
        assert_eq!(reply.status, 200, "{path} {headers:?}");
    }
    let offsets: Vec<u64> = stored(&server.node, "a").iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [1, 2, 3]);
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
    let node = &server.node;
    let data = r#"{"text": "h\u00e9llo",  "n": 1.50, "big": 123456789012345678901234567890, "l": [ 1 ,2 ]}"#;
    // skip_history: delivered, not kept, so no position to report.
    let body =
        format!(r#"{{"channel":"chat","data":{data},"skip_history":true,"tags":{{"k":"v"}},"idempotency_key":"x"}}"#);
    assert_eq!(api_json(&server, "publish", &body).await, json!({"result": {}}));
    assert!(stored(node, "chat").is_empty());
    let body = format!(r#"{{"channel":"chat","data":{data}}}"#);
    let epoch = epoch(node, "chat");
    assert_eq!(api_json(&server, "publish", &body).await, json!({"result": {"offset": 1, "epoch": epoch}}));
    assert_eq!(stored(node, "chat"), [(1, data.to_string())], "stored exactly as sent");
    assert_eq!(api_json(&server, "publish", r#"{"channel":"nohistory:x","data":"x"}"#).await, json!({"result": {}}));
    assert_eq!(
        api_json(&server, "publish", r#"{"channel":"unknown:chat","data":{}}"#).await,
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
    assert_eq!(
        api_json(&server, "publish", r#"{"channel":"chat"}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
    assert_eq!(stored(node, "chat").len(), 1, "refused publishes store nothing");
}

#[tokio::test]
async fn broadcast() {
    let server = start(0).await;
    let node = &server.node;
    let reply =
        api_json(&server, "broadcast", r#"{"channels":["a","unknown:b","nohistory:c",""],"data":[1, 2]}"#).await;
    assert_eq!(
        reply,
        json!({"result": {"responses": [
            {"result": {"offset": 1, "epoch": epoch(node, "a")}},
            {"error": {"code": 102, "message": "unknown channel"}},
            {"result": {}},
            {"error": {"code": 107, "message": "bad request"}},
        ]}})
    );
    assert_eq!(stored(node, "a"), [(1, "[1, 2]".to_string())]);
    assert_eq!(
        api_json(&server, "broadcast", r#"{"channels":[],"data":1}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
}

#[tokio::test]
async fn subscribe_unsubscribe_disconnect_refresh() {
    let server = start(0).await;
    let node = &server.node;
    let (c1, c2, other) = (connected(node, "42"), connected(node, "42"), connected(node, "7"));
    let c1_id = c1.id.to_string();
    let ok = json!({"result": {}});
    let body = format!(r#"{{"user":"42","channel":"chat","client":"{c1_id}","info":{{"x":1}}}}"#);
    assert_eq!(api_json(&server, "subscribe", &body).await, ok);
    assert_eq!(commands(&c1), [ServerCommand::Subscribe("chat".into())]);
    assert_eq!(commands(&c2), [], "only the named client");
    assert_eq!(
        api_json(&server, "subscribe", r#"{"user":"42","channel":"unknown:x"}"#).await,
        json!({"error": {"code": 102, "message": "unknown channel"}})
    );
    assert_eq!(
        api_json(&server, "subscribe", r#"{"user":"42"}"#).await,
        json!({"error": {"code": 107, "message": "bad request"}})
    );
    assert_eq!((commands(&c1), commands(&c2)), (vec![], vec![]), "refused calls reach no client");
    assert_eq!(api_json(&server, "unsubscribe", r#"{"user":"42","channel":"chat"}"#).await, ok);
    assert_eq!(commands(&c1), [ServerCommand::Unsubscribe("chat".into())]);
    assert_eq!(commands(&c2), [ServerCommand::Unsubscribe("chat".into())]);
    assert_eq!(api_json(&server, "refresh", r#"{"user":"42","expire_at":1893456000}"#).await, ok);
    let later = ServerCommand::Refresh { expire_at: Some(1893456000), expired: false };
    assert_eq!((commands(&c1), commands(&c2)), (vec![later.clone()], vec![later]));
    let body = format!(r#"{{"user":"42","client":"{c1_id}","expired":true}}"#);
    assert_eq!(api_json(&server, "refresh", &body).await, ok);
    assert_eq!(commands(&c1), [ServerCommand::Refresh { expire_at: None, expired: true }]);
    assert_eq!(commands(&c2), []);
    let body = format!(r#"{{"user":"42","client":"{c1_id}","disconnect":{{"code":4001,"reason":"banned"}}}}"#);
    assert_eq!(api_json(&server, "disconnect", &body).await, ok);
    assert_eq!(disconnect_request(&c2), None, "only the named client");
    assert_eq!(api_json(&server, "disconnect", r#"{"user":"42"}"#).await, ok);
    assert_eq!(disconnect_request(&c2), Some(DisconnectRequest { code: 3503, reason: "force disconnect".into() }));
    assert_eq!(disconnect_request(&c1), Some(DisconnectRequest { code: 4001, reason: "banned".into() }), "first wins");
    assert_eq!((commands(&other), disconnect_request(&other)), (vec![], None), "another user is untouched");
}

#[tokio::test]
async fn presence_and_presence_stats() {
    let server = start(0).await;
    let node = &server.node;
    let (alice, anonymous) = (connected(node, "42"), connected(node, ""));
    present(node, "chat", &alice, "42", r#"{"name": "Alice"}"#, "[1,2]");
    present(node, "chat", &anonymous, "", "", "");
    let (a, b) = (alice.id.to_string(), anonymous.id.to_string());
    let reply = Client::connect(server.addr).await.api("presence", r#"{"channel":"chat"}"#).await;
    assert!(reply.text().contains(r#"{"name": "Alice"}"#), "conn_info spliced in verbatim: {}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"result": {"presence": {
            a.clone(): {"client": a, "user": "42", "conn_info": {"name": "Alice"}, "chan_info": [1, 2]},
            b.clone(): {"client": b, "user": ""},
        }}})
    );
    assert_eq!(
        api_json(&server, "presence", r#"{"channel":"nopresence:x"}"#).await,
        json!({"error": {"code": 108, "message": "not available"}})
    );
    assert_eq!(
        api_json(&server, "presence_stats", r#"{"channel":"chat"}"#).await,
        json!({"result": {"num_clients": 2, "num_users": 2}})
    );
}

/// Publication data as a node stores it: odd spacing, an escape, a number serde would reformat.
const STORED: &str = r#"{"text": "h\u00e9llo",  "n": 1.50, "big": 123456789012345678901234567890}"#;

#[tokio::test]
async fn history_returns_stored_data_byte_for_byte() {
    let server = start(0).await;
    let node = &server.node;
    node.publish("chat", Bytes::from_static(b"1"), None).expect("publish");
    node.publish("chat", Bytes::from_static(b"2"), None).expect("publish");
    node.publish("chat", Bytes::from_static(STORED.as_bytes()), None).expect("publish");
    let info = ClientInfo { user: "42".into(), client: "c1".into(), ..Default::default() };
    // Stored through the broker as the node stores a client's publication, with tags: the node's publish
    // does not take tags yet, and this is about how history gives them back.
    let mut tagged = Publication {
        data: Bytes::from_static(b"7"),
        info: Some(info),
        tags: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    node.broker.publish("chat", &mut tagged, Node::history_options(&node.options("chat").expect("options")));
    let epoch = epoch(node, "chat");
    let reply =
        Client::connect(server.addr).await.api("history", r#"{"channel":"chat","limit":2,"reverse":true}"#).await;
    assert!(reply.text().contains(STORED), "stored data spliced in verbatim: {}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"result": {
            "publications": [
                {"data": 7, "offset": 4, "info": {"client": "c1", "user": "42"}, "tags": {"k": "v"}},
                {"data": serde_json::from_str::<Value>(STORED).expect("json"), "offset": 3},
            ],
            "offset": 4,
            "epoch": epoch,
        }})
    );
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"chat"}"#).await,
        json!({"result": {"publications": [], "offset": 4, "epoch": epoch}})
    );
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"chat","limit":1,"since":{"offset":2,"epoch":"old"}}"#).await,
        json!({"error": {"code": 112, "message": "unrecoverable position"}})
    );
    let since = format!(r#"{{"channel":"chat","limit":1,"since":{{"offset":2,"epoch":"{epoch}"}}}}"#);
    let reply = api_json(&server, "history", &since).await;
    assert_eq!(
        reply["result"]["publications"],
        json!([{"data": serde_json::from_str::<Value>(STORED).expect("json"), "offset": 3}])
    );
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"nohistory:x","limit":1}"#).await,
        json!({"error": {"code": 108, "message": "not available"}})
    );
    assert_eq!(api_json(&server, "history_remove", r#"{"channel":"chat"}"#).await, json!({"result": {}}));
    assert_eq!(
        api_json(&server, "history", r#"{"channel":"chat","limit":-1}"#).await,
        json!({"result": {"publications": [], "offset": 4, "epoch": epoch}}),
        "publications gone, position kept"
    );
}

#[tokio::test]
async fn channels_and_info() {
    let server = start(0).await;
    let node = &server.node;
    let started = std::time::Instant::now();
    let _subscribers = [
        subscriber(node, "42", &["chat", "news"]),
        subscriber(node, "42", &["chat"]),
        subscriber(node, "7", &["other"]),
    ];
    assert_eq!(
        api_json(&server, "channels", r#"{"pattern":"c*"}"#).await,
        json!({"result": {"channels": {"chat": {"num_clients": 2}}}})
    );
    assert_eq!(
        api_json(&server, "channels", "{}").await,
        json!({"result": {"channels": {
            "chat": {"num_clients": 2}, "news": {"num_clients": 1}, "other": {"num_clients": 1},
        }}})
    );
    let mut info = api_json(&server, "info", "{}").await;
    // Uptime is whole seconds since the node started, which was after `started`: it cannot exceed the
    // time since then (read after the reply), whatever the machine's speed.
    let uptime = info["result"]["nodes"][0]["uptime"].take();
    assert!(uptime.as_u64().is_some_and(|u| u <= started.elapsed().as_secs()), "uptime {uptime}");
    assert_eq!(
        info,
        json!({"result": {"nodes": [{
            "uid": node.uid, "name": "ringcast", "version": ringcast_server::session::VERSION, "num_clients": 3,
            "num_users": 2, "num_subs": 4, "num_channels": 3, "uptime": null,
        }]}})
    );
}

#[tokio::test]
async fn legacy_single_endpoint_and_batch() {
    let server = start(0).await;
    let node = &server.node;
    let someone = connected(node, "42");
    present(node, "a", &someone, "42", "", "");
    let mut client = Client::connect(server.addr).await;
    let legacy = concat!(
        r#"{"id":1,"method":"publish","params":{"channel":"chat","data":{"text":"hello"}}}"#,
        "\n",
        r#"{"id":2,"method":"info","params":{}}"#
    );
    let reply = client.call("POST", "/api", &[("Authorization", "apikey s3cret")], legacy).await;
    assert_eq!(reply.status, 200);
    let lines: Vec<Value> = reply.text().lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines[0], json!({"id": 1, "result": {"offset": 1, "epoch": epoch(node, "chat")}}));
    assert_eq!(lines[1]["id"], 2);
    assert_eq!(lines[1]["result"]["nodes"][0]["name"], "ringcast");
    assert_eq!(stored(node, "chat"), [(1, r#"{"text":"hello"}"#.to_string())]);

    let batch = concat!(
        r#"{"commands":[{"publish":{"channel":"a","data":{}}},{"presence_stats":{"channel":"a"}},"#,
        r#"{"publish":{"channel":"unknown:x","data":{}}}]}"#
    );
    let reply = client.call("POST", "/api/batch", &[("X-API-Key", KEY)], batch).await;
    assert_eq!(
        reply.json(),
        json!({"replies": [
            {"publish": {"offset": 1, "epoch": epoch(node, "a")}},
            {"presence_stats": {"num_clients": 1, "num_users": 1}},
            {"error": {"code": 102, "message": "unknown channel"}},
        ]})
    );
    assert_eq!(stored(node, "a"), [(1, "{}".to_string())]);
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
    assert_eq!(
        client.call("GET", "/api/publish", &[("X-API-Key", KEY)], r#"{"channel":"chat","data":1}"#).await.status,
        405
    );
    assert!(stored(&server.node, "chat").is_empty(), "nothing was published");
    // The connection survives all of it.
    assert_eq!(client.api("info", "{}").await.status, 200);
}

// ---- slow and idle clients ----

fn timeouts(t: Duration) -> ServeOptions {
    ServeOptions { header_read_timeout: t, request_timeout: t, keep_alive: true }
}

fn short_timeouts() -> ServeOptions {
    timeouts(Duration::from_millis(300))
}

#[tokio::test]
async fn unfinished_request_head_is_closed_after_the_header_timeout() {
    let server = start_with(ApiConfig { api_key: KEY.into(), insecure: false }, 4, short_timeouts()).await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"POST /api/info HTTP/1.1\r\nHost: te").await;
    assert!(client.closed().await, "slow head closed");
    // Not before the timeout (shown without timing it): under a timeout far longer than this test can
    // take, a head sent in two parts, the second after a pause, is answered.
    let server =
        start_with(ApiConfig { api_key: KEY.into(), insecure: false }, 4, timeouts(Duration::from_secs(60))).await;
    let mut client = Client::connect(server.addr).await;
    let whole = request("POST", "/api/info", &[("X-API-Key", KEY)], "{}");
    client.send(&whole[..20]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.send(&whole[20..]).await;
    assert_eq!(client.reply().await.status, 200);
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
    let head = b"POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: s3cret\r\nContent-Length: 40\r\n\r\n";
    client.send(head).await;
    client.send(br#"{"channel":"chat""#).await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 408);
    assert!(client.closed().await);
    assert!(stored(&server.node, "chat").is_empty(), "nothing was published");
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_closes() {
    // (A connection idle or still sending a request head is closed at once instead: nothing was started.)
    let node = new_node();
    let (one, two) = (connected(&node, "42"), connected(&node, "42"));
    present(&node, "a", &one, "42", "", "");
    present(&node, "a", &two, "42", "", "");
    let router = api::router(node.clone(), ApiConfig { api_key: KEY.into(), insecure: false }, None);
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
