//! Harness for tests of several `ringcast serve` nodes sharing channels through Redis: nodes as child
//! processes with their logs collected, a Redis of a test's own, and a WebSocket client that speaks the
//! JSON protocol. Shared by `cluster.rs`, `cluster_faults.rs`, `shards.rs` and `nats.rs` (whose nodes
//! bring their own engine keys through [`Node::launch`]).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub const KEY: &str = "cluster-key";
pub const SECRET: &str = "cluster-secret";
pub const ADMIN_PASSWORD: &str = "cluster-admin";

/// The channel options every node of a test shares.
pub const CHANNELS: &str = r#"
token_hmac_secret_key = "cluster-secret"
[channels]
allow_subscribe_for_client = true
allow_publish_for_client = true
allow_presence_for_client = true
allow_history_for_client = true
allow_recovery = true
allow_positioning = true
presence = true
history_size = 1000
history_ttl = "300s"
"#;

/// One node: a `ringcast serve` process with its log collected.
pub struct Node {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub dir: PathBuf,
    pub port: u16,
}

impl Node {
    pub fn start(prefix: &str, n: usize) -> Node {
        Node::start_on(prefix, n, 6379, "2s")
    }

    /// A node on the Redis at `redis_port`, with `redis_timeout`.
    pub fn start_on(prefix: &str, n: usize, redis_port: u16, timeout: &str) -> Node {
        Node::start_with(prefix, n, redis_port, timeout, "", "")
    }

    /// As [`Node::start_on`], with more top-level keys (`top`) and more `[channels]` options (`channels`).
    pub fn start_with(prefix: &str, n: usize, redis_port: u16, timeout: &str, top: &str, channels: &str) -> Node {
        let engine = format!(
            "broker = \"redis\"\nredis_url = [\"redis://127.0.0.1:{redis_port}\"]\nredis_prefix = \"{prefix}\"\nredis_timeout = \"{timeout}\"\n{top}\n{CHANNELS}{channels}\n"
        );
        Node::launch(&format!("{prefix}-{n}"), &engine)
    }

    /// A node whose configuration is the harness's listener, API key and dashboard, then `rest` (the
    /// engine's keys, channel options, tables); `tag` names its directory. Waits until it listens.
    pub fn launch(tag: &str, rest: &str) -> Node {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ringcast-cluster-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\napi_key = \"{KEY}\"\nadmin = true\nadmin_password = \"{ADMIN_PASSWORD}\"\n{rest}"
        );
        std::fs::write(dir.join("c.toml"), config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        command.args(["serve", "--config"]).arg(dir.join("c.toml"));
        let (child, log) = super::spawn_logged(command);
        let node = Node { child, log, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.log().contains("ringcast listening") {
            assert!(Instant::now() < deadline, "node did not start:\n{}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// What the node has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Node {
    /// SIGKILL: no shutdown, no goodbye to the cluster; what a crash looks like to the others.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- node on port {} ---\n{}", self.port, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// `n` nodes on one fresh prefix; the prefix's keys are deleted when the cluster is dropped.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub prefix: String,
}

impl Cluster {
    pub fn start(name: &str, n: usize) -> Cluster {
        Cluster::start_with(name, n, "", "")
    }

    /// `n` nodes with more top-level keys and `[channels]` options ([`Node::start_with`]).
    pub fn start_with(name: &str, n: usize, top: &str, channels: &str) -> Cluster {
        let prefix = format!("rc-test-{name}-{}-{:08x}", std::process::id(), fastrand::u32(..));
        Cluster { nodes: (0..n).map(|i| Node::start_with(&prefix, i, 6379, "2s", top, channels)).collect(), prefix }
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        // Only this test's keys (never a FLUSH on the shared Redis).
        let keys = Command::new("redis-cli").args(["--scan", "--pattern", &format!("{}:*", self.prefix)]).output();
        if let Ok(out) = keys {
            for key in String::from_utf8_lossy(&out.stdout).lines().filter(|k| !k.is_empty()) {
                let _ = Command::new("redis-cli").args(["DEL", key]).output();
            }
        }
    }
}

/// Waits until something accepts on 127.0.0.1:`port` (`what`: a server a test started); panics after 10 s.
pub fn wait_accepting(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request (`Connection: close`); the whole response, head and body.
pub fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// One HTTP API call: the JSON reply.
pub fn api(port: u16, method: &str, body: &Value) -> Value {
    let headers = format!("X-API-Key: {KEY}\r\nContent-Type: application/json\r\n");
    let out = http(port, "POST", &format!("/api/{method}"), &headers, &body.to_string());
    let (_, body) = out.split_once("\r\n\r\n").expect("http reply");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A counter or gauge from /metrics on `port` (0 when absent).
pub fn metric(port: u16, series: &str) -> f64 {
    let out = http(port, "GET", "/metrics", "", "");
    let prefix = format!("{series} ");
    out.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse().unwrap_or(-1.0))
}

/// The `/admin` dashboard's engine panel of the node on `port` (`kind`, `state`, `detail`), polled until
/// its state is `want` (the sampler makes a snapshot once a second while someone polls), bounded.
pub fn engine_panel(port: u16, want: &str) -> Value {
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    let login = http(port, "POST", "/admin/login", form, &format!("password={ADMIN_PASSWORD}"));
    let cookie = login
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")))
        .and_then(|(_, v)| v.trim().split(';').next())
        .unwrap_or_else(|| panic!("no session: {login}"))
        .to_string();
    let mut engine = Value::Null;
    for _ in 0..100 {
        let out = http(port, "GET", "/admin/snapshot", &format!("Cookie: {cookie}\r\n"), "");
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        engine = serde_json::from_str::<Value>(body).map_or(Value::Null, |s| s["engine"].clone());
        if engine["state"] == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    engine
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub use super::Got;

/// The next frame's objects or the close, waiting at most 20 s for a frame.
pub async fn next(ws: &mut Ws) -> Got {
    super::next_within(ws, Duration::from_secs(20)).await
}

/// Reads (and drops) pushes until the connection closes; returns the close's code and reason.
pub async fn closed(ws: &mut Ws) -> Option<(u16, String)> {
    loop {
        if let Got::Closed(c) = next(ws).await {
            return c;
        }
    }
}

/// After the node on `port`, cut off from its engine, is back: `carol` (its client) is closed by the API
/// disconnect (4005 "moved") made through another node meanwhile, the node counts it as caught up from
/// its control `log` (named in the messages) with nothing trimmed, and its engine panel is "up" again.
pub async fn assert_missed_disconnect_caught_up(carol: &mut Ws, port: u16, log: &str) {
    let c = closed(carol).await;
    assert_eq!(c, Some((4005, "moved".to_string())), "the missed disconnect, from the {log}");
    assert!(metric(port, "ringcast_control_log_applied_total") >= 1.0, "counted as caught up");
    assert_eq!(metric(port, "ringcast_control_log_gaps_total"), 0.0, "nothing trimmed");
    assert_eq!(engine_panel(port, "up")["state"], "up");
}

/// Sends a command; returns its reply and the pushes read before it.
pub async fn call(ws: &mut Ws, cmd: Value) -> (Value, Vec<Value>) {
    let id = cmd["id"].clone();
    ws.send(Message::Text(cmd.to_string())).await.expect("send");
    let mut pushes = Vec::new();
    loop {
        match next(ws).await {
            Got::Json(msgs) => {
                for m in msgs {
                    if m.get("id") == Some(&id) {
                        return (m, pushes);
                    }
                    pushes.push(m);
                }
            }
            Got::Closed(c) => panic!("closed while waiting for reply {id}: {c:?}"),
        }
    }
}

/// A connected client of `user` on `port`.
pub async fn client(port: u16, user: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let token = ringcast_server::policy::auth::make_hs256_token(SECRET, user, None, &[]).unwrap();
    let (r, _) = call(&mut ws, json!({"id":1,"connect":{"token": token}})).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    ws
}

/// Offsets of the publications of `channel` among `msgs` (pushes).
pub fn offsets(msgs: &[Value], channel: &str) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| m.get("push"))
        .filter(|m| m["channel"] == channel && m.get("pub").is_some())
        .map(|m| m["pub"]["offset"].as_u64().unwrap_or(0))
        .collect()
}

/// Reads until an unsubscribe push arrives; returns it.
pub async fn unsubscribe_push(ws: &mut Ws) -> Value {
    loop {
        match next(ws).await {
            Got::Json(msgs) => {
                if let Some(m) = msgs.into_iter().find(|m| m["push"].get("unsubscribe").is_some()) {
                    return m["push"].clone();
                }
            }
            Got::Closed(c) => panic!("closed: {c:?}"),
        }
    }
}

/// Reads pushes until `count` publications of `channel` arrived; returns their offsets in order.
pub async fn read_publications(ws: &mut Ws, channel: &str, count: usize, mut got: Vec<u64>) -> Vec<u64> {
    while got.len() < count {
        match next(ws).await {
            Got::Json(msgs) => got.extend(offsets(&msgs, channel)),
            Got::Closed(c) => panic!("closed after {} of {count} publications: {c:?}", got.len()),
        }
    }
    got
}

pub struct OwnRedis {
    pub child: Child,
    pub port: u16,
}

impl OwnRedis {
    /// A redis-server that keeps nothing: restarted, it is empty.
    pub fn start(port: u16) -> OwnRedis {
        OwnRedis::start_args(port, &["--save", "", "--appendonly", "no"])
    }

    /// A redis-server that writes every command to its append-only file in `dir` before answering
    /// (`appendfsync always`): killed and started again on the same `dir`, it has everything it
    /// acknowledged.
    pub fn start_durable(port: u16, dir: &std::path::Path) -> OwnRedis {
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.to_str().expect("utf-8 path");
        OwnRedis::start_args(port, &["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", dir])
    }

    fn start_args(port: u16, args: &[&str]) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        wait_accepting(port, "redis-server");
        OwnRedis { child, port }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the redis-server this test started.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Keys of this instance matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--scan", "--pattern", pattern])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(String::from).collect()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The error code of an API reply (0: none).
pub fn api_error_code(r: &Value) -> u64 {
    r["error"]["code"].as_u64().unwrap_or(0)
}

/// The body of the node's `GET /health`, which must answer 200.
pub fn health(port: u16) -> String {
    let out = http(port, "GET", "/health", "", "");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string())
}

/// Reads pushes until the publication of `channel` at `offset` arrived (earlier ones may come first:
/// publishes that timed out against a paused Redis are still run by it when it resumes).
pub async fn read_until_offset(ws: &mut Ws, channel: &str, offset: u64) {
    for _ in 0..200 {
        match next(ws).await {
            Got::Json(msgs) if offsets(&msgs, channel).contains(&offset) => return,
            Got::Json(_) => {}
            Got::Closed(c) => panic!("closed before offset {offset} of {channel}: {c:?}"),
        }
    }
    panic!("offset {offset} of {channel} never arrived");
}

/// The API's `unsubscribe` and `disconnect` called on node `a` reach user carol's client on node `b`,
/// whatever engine carries them: the push names the channel, the close carries the API's code and reason.
pub async fn api_control_reaches_a_client_on_another_node(a: u16, b: u16) {
    let mut carol = client(b, "carol").await;
    let (r, _) = call(&mut carol, json!({"id":2,"subscribe":{"channel":"news"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let r = api(a, "unsubscribe", &json!({"user":"carol","channel":"news"}));
    assert!(r.get("error").is_none(), "{r}");
    let push = unsubscribe_push(&mut carol).await;
    assert_eq!(push["channel"], "news", "{push}");
    let r = api(a, "disconnect", &json!({"user":"carol","disconnect":{"code":4005,"reason":"moved"}}));
    assert!(r.get("error").is_none(), "{r}");
    let c = closed(&mut carol).await;
    assert_eq!(c, Some((4005, "moved".to_string())), "the API's code and reason, from the other node");
}

/// Publishes `data` to `channel` through node `port`'s API until it is accepted, as an API client retries
/// error 100 (temporary) while the engine comes back: at most `tries` calls, 100 ms apart, and every
/// refusal must be error 100. Returns the accepted reply (its `result` holds the offset).
pub fn publish_until_accepted(port: u16, channel: &str, data: Value, tries: usize) -> Value {
    let mut reply = Value::Null;
    for _ in 0..tries {
        reply = api(port, "publish", &json!({"channel": channel, "data": data}));
        if api_error_code(&reply) == 0 {
            return reply;
        }
        assert_eq!(api_error_code(&reply), 100, "{reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{channel}: no publish accepted in {tries} tries: {reply}");
}

/// A client subscribed with recovery to `channel` on node `a` sees 3 publications made on `b`, goes
/// away while 5 more are made, and reconnects to `b` while a publisher on `a` keeps going: it recovers
/// exactly the missed ones (one epoch across nodes, the one it learnt before the first publication),
/// then gets the racing ones once each, contiguous, whatever engine the nodes share.
pub async fn a_client_reconnecting_to_another_node_recovers_exactly(a: u16, b: u16, channel: &str) {
    let mut ws = client(a, "reader").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":channel,"recoverable":true}})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty(), "an epoch before the first publication: {r}");
    for n in 0..3 {
        let r = api(b, "publish", &json!({"channel":channel,"data":{"n":n}}));
        assert_eq!(r["result"]["epoch"].as_str(), Some(epoch.as_str()), "the first publication keeps it: {r}");
    }
    let seen = read_publications(&mut ws, channel, 3, Vec::new()).await;
    assert_eq!(seen, [1, 2, 3], "published on B, delivered on A");
    drop(ws);
    // Missed while away: 5 publications; and a publisher that keeps going while the client recovers.
    for n in 3..8 {
        let r = api(a, "publish", &json!({"channel":channel,"data":{"n":n}}));
        assert_eq!(api_error_code(&r), 0, "{r}");
    }
    let owned = channel.to_string();
    let racer = std::thread::spawn(move || {
        let mut last = 0;
        for n in 8..68 {
            let r = api(a, "publish", &json!({"channel":owned,"data":{"n":n}}));
            last = r["result"]["offset"].as_u64().expect("offset");
        }
        last
    });
    let mut ws = client(b, "reader").await;
    let (r, pushes) = call(
        &mut ws,
        json!({"id":2,"subscribe":{"channel":channel,"recoverable":true,"recover":true,"offset":3,"epoch":epoch}}),
    )
    .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["epoch"].as_str(), Some(epoch.as_str()), "one epoch across nodes");
    let replay: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .map(|p| p.iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    assert!(replay.len() >= 5 && replay[..5] == [4, 5, 6, 7, 8][..], "the missed five first: {replay:?}");
    assert!(offsets(&pushes, channel).is_empty(), "no push before the subscribe reply");
    let last = racer.join().unwrap();
    let all = read_publications(&mut ws, channel, (last - 3) as usize, replay).await;
    let expected: Vec<u64> = (4..=last).collect();
    assert_eq!(all, expected, "replay then pushes: each publication once, none missing");
}
