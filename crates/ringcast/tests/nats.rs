//! Several `ringcast serve` processes sharing channels through NATS (`broker = "nats"`): the shared
//! NATS at 127.0.0.1:4222 (with a subject prefix of each test's own, `nats_prefix`), or, for the
//! restart test, a nats-server of the test's own on port 21300 with JetStream and a temporary store.
//! Presence alongside NATS comes from the real Redis at 127.0.0.1:6379 under a prefix of the test's own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "nats-key";
const SECRET: &str = "nats-secret";
const ADMIN_PASSWORD: &str = "nats-admin";

/// The channel options every node of a test shares: no history (refused under nats).
const CHANNELS: &str = r#"
token_hmac_secret_key = "nats-secret"
[channels]
allow_subscribe_for_client = true
allow_publish_for_client = true
allow_presence_for_client = true
"#;

/// One node: a `ringcast serve` process with its log collected.
struct Node {
    child: Child,
    log: Arc<Mutex<String>>,
    dir: PathBuf,
    port: u16,
}

impl Node {
    /// A node on the NATS at `nats_port` with `prefix`; `extra` is more top-level configuration,
    /// `tables` more tables (after the channel options).
    fn start(prefix: &str, n: usize, nats_port: u16, extra: &str, tables: &str) -> Node {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ringcast-nats-{prefix}-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\napi_key = \"{KEY}\"\nadmin = true\nadmin_password = \"{ADMIN_PASSWORD}\"\nbroker = \"nats\"\nnats_url = \"nats://127.0.0.1:{nats_port}\"\nnats_prefix = \"{prefix}\"\n{extra}\n{CHANNELS}\n{tables}"
        );
        std::fs::write(dir.join("c.toml"), config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(["serve", "--config"])
            .arg(dir.join("c.toml"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ringcast");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let node = Node { child, log, dir, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.log.lock().unwrap().contains("ringcast listening") {
            assert!(Instant::now() < deadline, "node did not start:\n{}", node.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = match self.log.lock() {
                Ok(l) => l.clone(),
                Err(p) => p.into_inner().clone(),
            };
            eprintln!("--- node on port {} ---\n{log}", self.port);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A subject prefix (and Redis prefix) of this test's own.
fn unique(name: &str) -> String {
    format!("rc-nats-{name}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request (`Connection: close`); the whole response, head and body.
fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> String {
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
fn api(port: u16, method: &str, body: &Value) -> Value {
    let headers = format!("X-API-Key: {KEY}\r\nContent-Type: application/json\r\n");
    let out = http(port, "POST", &format!("/api/{method}"), &headers, &body.to_string());
    let (_, body) = out.split_once("\r\n\r\n").expect("http reply");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `/admin` dashboard's engine panel of the node on `port` (`kind`, `state`, `detail`), polled until
/// its state is `want` (the sampler makes a snapshot once a second while someone polls), bounded.
fn engine_panel(port: u16, want: &str) -> Value {
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

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Got {
    Json(Vec<Value>),
    Closed(Option<(u16, String)>),
}

async fn next(ws: &mut Ws) -> Got {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Json(
                    t.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect(),
                )
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Got::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())))
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return Got::Closed(None),
        }
    }
}

/// Sends a command; returns its reply and the pushes read before it.
async fn call(ws: &mut Ws, cmd: Value) -> (Value, Vec<Value>) {
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
async fn client(port: u16, user: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let token = ringcast_server::policy::auth::make_hs256_token(SECRET, user, None, &[]).unwrap();
    let (r, _) = call(&mut ws, json!({"id":1,"connect":{"token": token}})).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    ws
}

/// The data of the publications of `channel` among `msgs` (pushes).
fn data(msgs: &[Value], channel: &str) -> Vec<Value> {
    msgs.iter()
        .filter_map(|m| m.get("push"))
        .filter(|m| m["channel"] == channel && m.get("pub").is_some())
        .map(|m| m["pub"]["data"].clone())
        .collect()
}

/// Reads until an unsubscribe push arrives; returns it.
async fn unsubscribe_push(ws: &mut Ws) -> Value {
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

/// Reads pushes until `count` publications of `channel` arrived; returns their data in order, and
/// every push read meanwhile.
async fn read_data(ws: &mut Ws, channel: &str, count: usize) -> (Vec<Value>, Vec<Value>) {
    let mut got = Vec::new();
    let mut all = Vec::new();
    while got.len() < count {
        match next(ws).await {
            Got::Json(msgs) => {
                got.extend(data(&msgs, channel));
                all.extend(msgs);
            }
            Got::Closed(c) => panic!("closed after {} of {count} publications: {c:?}", got.len()),
        }
    }
    (got, all)
}

/// The error code of an API reply (0: none).
fn api_error_code(r: &Value) -> u64 {
    r["error"]["code"].as_u64().unwrap_or(0)
}

/// A channel name with every character NATS gives a meaning to: escaped, it is one subject token.
const TRICKY: &str = "race.a*b>c d";
/// A channel that, unescaped, would be a wildcard subscription covering [`TRICKY`].
const WILDCARD: &str = "race.>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_two_nodes_every_subscriber_gets_each_publication_once_in_its_publishers_order() {
    let prefix = unique("order");
    let nodes = [Node::start(&prefix, 0, 4222, "", ""), Node::start(&prefix, 1, 4222, "", "")];
    const EACH: u64 = 50;
    const PUBLISHERS: u64 = 4;
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut ws = client(node.port, &format!("sub{i}")).await;
        for (id, channel) in [(2, TRICKY), (3, WILDCARD)] {
            let (r, _) = call(&mut ws, json!({"id":id,"subscribe":{"channel":channel}})).await;
            assert!(r.get("error").is_none(), "{r}");
            assert_eq!(r["subscribe"]["offset"].as_u64().unwrap_or(0), 0, "no positions under nats: {r}");
        }
        subs.push(ws);
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let port = nodes[(p % 2) as usize].port;
        publishers.push(tokio::spawn(async move {
            let mut ws = client(port, &format!("pub{p}")).await;
            for n in 0..EACH {
                let (r, _) =
                    call(&mut ws, json!({"id": 10 + n, "publish":{"channel":TRICKY,"data":{"p":p,"n":n}}})).await;
                assert!(r.get("error").is_none(), "{r}");
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Then one publication to the other channel: once it arrives, anything the wildcard would have
    // widened to has arrived too.
    let r = api(nodes[0].port, "publish", &json!({"channel":WILDCARD,"data":{"marker":true}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    for (i, ws) in subs.iter_mut().enumerate() {
        let (got, mut pushes) = read_data(ws, TRICKY, (PUBLISHERS * EACH) as usize).await;
        let mut by_publisher: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for d in &got {
            by_publisher.entry(d["p"].as_u64().unwrap()).or_default().push(d["n"].as_u64().unwrap());
        }
        for p in 0..PUBLISHERS {
            let expected: Vec<u64> = (0..EACH).collect();
            assert_eq!(by_publisher.get(&p), Some(&expected), "node {i}, publisher {p}: each once, in its order");
        }
        while data(&pushes, WILDCARD).is_empty() {
            match next(ws).await {
                Got::Json(msgs) => pushes.extend(msgs),
                Got::Closed(c) => panic!("closed: {c:?}"),
            }
        }
        assert_eq!(
            data(&pushes, WILDCARD),
            [json!({"marker":true})],
            "node {i}: {WILDCARD:?} is a channel, not a wildcard"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_disconnect_and_unsubscribe_reach_a_client_on_another_node() {
    let prefix = unique("control");
    let nodes = [Node::start(&prefix, 0, 4222, "", ""), Node::start(&prefix, 1, 4222, "", "")];
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut carol = client(b, "carol").await;
    let (r, _) = call(&mut carol, json!({"id":2,"subscribe":{"channel":"news"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let r = api(a, "unsubscribe", &json!({"user":"carol","channel":"news"}));
    assert!(r.get("error").is_none(), "{r}");
    let push = unsubscribe_push(&mut carol).await;
    assert_eq!(push["channel"], "news", "{push}");
    let r = api(a, "disconnect", &json!({"user":"carol","disconnect":{"code":4005,"reason":"moved"}}));
    assert!(r.get("error").is_none(), "{r}");
    loop {
        match next(&mut carol).await {
            Got::Json(_) => continue,
            Got::Closed(c) => {
                assert_eq!(c, Some((4005, "moved".to_string())), "the API's code and reason, from the other node");
                break;
            }
        }
    }
}

/// Deletes a test's Redis keys (never a FLUSH on the shared Redis).
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let keys = Command::new("redis-cli").args(["--scan", "--pattern", &format!("{}:*", self.0)]).output();
        if let Ok(out) = keys {
            for key in String::from_utf8_lossy(&out.stdout).lines().filter(|k| !k.is_empty()) {
                let _ = Command::new("redis-cli").args(["DEL", key]).output();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_from_redis_alongside_nats_is_cluster_wide() {
    let prefix = unique("presence");
    let _keys = RedisKeys(prefix.clone());
    let extra = format!(
        "presence_manager = \"redis\"\nredis_url = [\"redis://127.0.0.1:6379\"]\nredis_prefix = \"{prefix}\"\n"
    );
    let tables = "[[namespaces]]\nname = \"room\"\npresence = true\nallow_subscribe_for_client = true\nallow_presence_for_client = true\nallow_publish_for_client = true\n";
    let nodes = [Node::start(&prefix, 0, 4222, &extra, tables), Node::start(&prefix, 1, 4222, &extra, tables)];
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut alice = client(a, "alice").await;
    let mut bob = client(b, "bob").await;
    for ws in [&mut alice, &mut bob] {
        let (r, _) = call(ws, json!({"id":2,"subscribe":{"channel":"room:1"}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let s = api(a, "presence_stats", &json!({"channel":"room:1"}));
    assert_eq!((s["result"]["num_clients"].as_u64(), s["result"]["num_users"].as_u64()), (Some(2), Some(2)), "{s}");
    let (r, _) = call(&mut bob, json!({"id":3,"presence":{"channel":"room:1"}})).await;
    assert_eq!(r["presence"]["presence"].as_object().map(|o| o.len()), Some(2), "{r}");
    // And publications still travel over NATS.
    let r = api(b, "publish", &json!({"channel":"room:1","data":{"hi":1}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    assert_eq!(read_data(&mut alice, "room:1", 1).await.0, [json!({"hi":1})]);
}

/// A nats-server of this test's own (port 21300-21399, JetStream on, a temporary store), stopped when
/// dropped. The shared one on 4222 is never touched.
struct OwnNats {
    child: Child,
    port: u16,
    store: PathBuf,
}

impl OwnNats {
    fn start(port: u16, store: PathBuf) -> OwnNats {
        std::fs::create_dir_all(&store).unwrap();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server on {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnNats { child, port, store }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.store).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_publishes_fail_100_then_nodes_resubscribe_and_tell_clients_2500() {
    let store = std::env::temp_dir().join(format!("ringcast-nats-store-{}", std::process::id()));
    let mut nats = OwnNats::start(21300, store.clone());
    let prefix = unique("restart");
    let extra = "nats_write_timeout = \"300ms\"";
    let nodes = [Node::start(&prefix, 0, nats.port, extra, ""), Node::start(&prefix, 1, nats.port, extra, "")];
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut ws = client(a, "watcher").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"f"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let ok = api(b, "publish", &json!({"channel":"f","data":{"n":1}}));
    assert_eq!(api_error_code(&ok), 0, "{ok}");
    assert_eq!(read_data(&mut ws, "f", 1).await.0, [json!({"n":1})]);
    let panel = engine_panel(a, "up");
    assert_eq!((&panel["kind"], &panel["state"]), (&json!("nats"), &json!("up")), "{panel}");
    assert!(panel["detail"].as_str().is_some_and(|d| d.contains("127.0.0.1:21300")), "{panel}");
    // NATS gone: once the node has seen the connection drop, a publish answers error 100 (API and
    // client protocol), and the dashboard says down.
    nats.kill();
    assert_eq!(engine_panel(b, "down")["state"], "down");
    let r = api(b, "publish", &json!({"channel":"f","data":{"n":2}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    let mut publisher = client(a, "publisher").await;
    assert_eq!(engine_panel(a, "down")["state"], "down");
    let (r, _) = call(&mut publisher, json!({"id":3,"publish":{"channel":"f","data":{"n":2}}})).await;
    assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
    // Back: both nodes reconnect and subscribe again; the subscriber may have missed publications, so
    // it is unsubscribed with 2500 (insufficient state) and resubscribes, as SDKs do.
    nats = OwnNats::start(21300, store);
    let push = unsubscribe_push(&mut ws).await;
    assert_eq!(push["unsubscribe"]["code"], 2500, "{push}");
    let (r, _) = call(&mut ws, json!({"id":4,"subscribe":{"channel":"f"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    // The other node may still be reconnecting: error 100 is temporary, retried as API clients do.
    let mut r = Value::Null;
    for _ in 0..50 {
        r = api(b, "publish", &json!({"channel":"f","data":{"n":3}}));
        if api_error_code(&r) != 100 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api_error_code(&r), 0, "{r}");
    assert_eq!(read_data(&mut ws, "f", 1).await.0, [json!({"n":3})]);
    assert_eq!(engine_panel(b, "up")["state"], "up", "the dashboard sees the broker back");
    drop(nodes);
    drop(nats);
}
