//! The client protocol over real sockets: what an SDK sees.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringcast_protocol::messages::{Command, ConnectRequest, PublishRequest, Reply, SubscribeRequest};
use ringcast_protocol::{decode_replies, encode_command, Format};
use serde_json::{json, Value};
use support::{JsonClient as Client, TestServer};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

impl Client {
    async fn send(&mut self, mut cmd: Value) -> u32 {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        self.ws.send(Message::Text(cmd.to_string())).await.expect("send");
        self.next_id
    }

    /// Sends a command and returns its reply (pushes received meanwhile stay in the inbox).
    async fn call(&mut self, cmd: Value) -> Value {
        let id = self.send(cmd).await;
        let mut held = Vec::new();
        loop {
            let v = self.next().await;
            if v["id"] == json!(id) || v.get("closed").is_some() {
                held.append(&mut self.inbox);
                self.inbox = held;
                return v;
            }
            held.push(v);
        }
    }

    async fn connect(server: &TestServer, token: &str) -> (Client, Value) {
        let mut c = Client::open(server).await;
        let reply = c.call(json!({"connect": {"token": token, "name": "test"}})).await;
        (c, reply)
    }

    /// The next publication push (skipping join/leave pushes and pings).
    async fn publication(&mut self) -> Value {
        loop {
            let v = self.push().await;
            if v["push"].get("pub").is_some() || v.get("closed").is_some() {
                return v;
            }
        }
    }

    /// The next push (skipping server pings).
    async fn push(&mut self) -> Value {
        loop {
            let v = self.next().await;
            if v.get("push").is_some() || v.get("closed").is_some() {
                return v;
            }
        }
    }
}

async fn dev() -> TestServer {
    TestServer::start(&[]).await
}

#[tokio::test]
async fn json_clients_publish_and_receive_in_order() {
    let server = dev().await;
    let (mut a, r) = Client::connect(&server, "").await;
    assert_eq!(r["connect"]["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(r["connect"]["client"].as_str().map(str::len), Some(36));
    assert_eq!(r["connect"]["pong"], json!(true));
    let a_client = r["connect"]["client"].clone();
    let (mut b, _) = Client::connect(&server, "").await;
    // SDKs ask for recovery with `recoverable` (Centrifugo grants it where allow_recovery is on, as in dev).
    let sub = b.call(json!({"subscribe": {"channel": "news", "recoverable": true}})).await;
    assert!(sub.get("error").is_none(), "{sub}");
    assert_eq!(sub["subscribe"]["recoverable"], json!(true), "dev mode keeps history");
    for i in 0..20 {
        let r = a.call(json!({"publish": {"channel": "news", "data": {"n": i, "text": "hello"}}})).await;
        assert_eq!(r["publish"], json!({}), "{r}");
    }
    for i in 0..20u64 {
        let p = b.push().await;
        assert_eq!(p["push"]["channel"], json!("news"));
        assert_eq!(p["push"]["pub"]["data"], json!({"n": i, "text": "hello"}), "raw JSON data kept as is");
        assert_eq!(p["push"]["pub"]["offset"], json!(i + 1));
        assert_eq!(p["push"]["pub"]["info"]["client"], a_client, "publisher info attached");
    }
    server.stop().await;
}

#[tokio::test]
async fn protobuf_client_speaks_the_same_protocol() {
    let server = dev().await;
    let mut req = server.url("/connection/websocket").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "centrifuge-protobuf".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connect");
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "centrifuge-protobuf");
    let mut frame = bytes::BytesMut::new();
    let cmds = [
        Command { id: 1, connect: Some(ConnectRequest::default()), ..Default::default() },
        Command {
            id: 2,
            subscribe: Some(SubscribeRequest { channel: "pb".into(), ..Default::default() }),
            ..Default::default()
        },
        Command {
            id: 3,
            publish: Some(PublishRequest { channel: "pb".into(), data: bytes::Bytes::from_static(b"\x00\x01binary") }),
            ..Default::default()
        },
    ];
    for c in &cmds {
        encode_command(Format::Protobuf, c, &mut frame).unwrap();
    }
    // Three commands in one frame.
    ws.send(Message::Binary(frame.to_vec())).await.unwrap();
    let mut replies: Vec<Reply> = Vec::new();
    while replies.len() < 4 {
        match tokio::time::timeout(T, ws.next()).await.expect("in time") {
            Some(Ok(Message::Binary(b))) => {
                let mut got = Vec::new();
                decode_replies(Format::Protobuf, &b, &mut got).expect("valid protobuf replies");
                replies.extend(got);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(replies[0].connect.is_some());
    assert!(replies[1].subscribe.is_some());
    assert!(replies.iter().any(|r| r.id == 3 && r.publish.is_some()));
    let push = replies.iter().find_map(|r| r.push.as_ref()).expect("a publication push");
    assert_eq!(push.channel, "pb");
    assert_eq!(&push.publication.as_ref().unwrap().data[..], b"\x00\x01binary");
    server.stop().await;
}

#[tokio::test]
async fn reconnecting_client_recovers_exactly_what_it_missed() {
    let server = dev().await;
    let (mut a, _) = Client::connect(&server, "").await;
    let sub = a.call(json!({"subscribe": {"channel": "chat", "recoverable": true}})).await;
    let epoch = sub["subscribe"]["epoch"].clone();
    let (mut p, _) = Client::connect(&server, "").await;
    p.call(json!({"publish": {"channel": "chat", "data": {"m": 1}}})).await;
    let first = a.push().await;
    let seen = first["push"]["pub"]["offset"].as_u64().unwrap();
    drop(a); // the client goes away
    for m in 2..=4 {
        p.call(json!({"publish": {"channel": "chat", "data": {"m": m}}})).await;
    }
    let (mut a2, _) = Client::connect(&server, "").await;
    let rec = a2.call(json!({"subscribe": {"channel": "chat", "recoverable": true, "recover": true, "offset": seen, "epoch": epoch}})).await;
    let s = &rec["subscribe"];
    assert_eq!(s["recovered"], json!(true), "{rec}");
    assert_eq!(s["was_recovering"], json!(true));
    let data: Vec<Value> = s["publications"].as_array().unwrap().iter().map(|p| p["data"].clone()).collect();
    assert_eq!(data, vec![json!({"m": 2}), json!({"m": 3}), json!({"m": 4})]);
    assert_eq!(s["offset"], json!(4));
    // And live publications continue after the recovered ones.
    p.call(json!({"publish": {"channel": "chat", "data": {"m": 5}}})).await;
    assert_eq!(a2.push().await["push"]["pub"]["offset"], json!(5));

    // A wrong epoch cannot be recovered, and nothing is replayed as if it were.
    let (mut a3, _) = Client::connect(&server, "").await;
    let rec = a3.call(json!({"subscribe": {"channel": "chat", "recoverable": true, "recover": true, "offset": 1, "epoch": "nope"}})).await;
    assert_eq!(rec["subscribe"]["recovered"], Value::Null, "{rec}");
    assert!(rec["subscribe"].get("publications").is_none(), "{rec}");
    server.stop().await;
}

#[tokio::test]
async fn presence_and_join_leave() {
    let dir = std::env::temp_dir().join(format!("ringcast-joinleave-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringcast.toml");
    std::fs::write(
        &file,
        r#"
allow_anonymous = true
[[namespaces]]
name = "rooms"
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
allow_presence_for_subscriber = true
allow_presence_for_anonymous = true
presence = true
join_leave = true
"#,
    )
    .unwrap();
    let server = TestServer::start_with_file(&file, &[]).await;
    let room = "rooms:lobby";
    let (mut a, _) = Client::connect(&server, "").await;
    // Join/leave pushes go to subscribers that ask for them (Centrifugo's `join_leave` request flag).
    let r = a.call(json!({"subscribe": {"channel": room, "join_leave": true}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let (mut b, rb) = Client::connect(&server, "").await;
    b.call(json!({"subscribe": {"channel": room}})).await;
    let join = a.push().await;
    assert_eq!(join["push"]["join"]["info"]["client"], rb["connect"]["client"], "{join}");
    let pres = a.call(json!({"presence": {"channel": room}})).await;
    assert_eq!(pres["presence"]["presence"].as_object().map(|m| m.len()), Some(2), "{pres}");
    let stats = a.call(json!({"presence_stats": {"channel": room}})).await;
    assert_eq!(stats["presence_stats"]["num_clients"], json!(2));
    b.call(json!({"unsubscribe": {"channel": room}})).await;
    let leave = a.push().await;
    assert_eq!(leave["push"]["leave"]["info"]["client"], rb["connect"]["client"]);
    server.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn commands_before_connect_and_garbage_close_3501() {
    let server = dev().await;
    let mut c = Client::open(&server).await;
    let r = c.call(json!({"subscribe": {"channel": "x"}})).await;
    assert_eq!(r["closed"], json!(3501), "{r}");
    let mut c = Client::open(&server).await;
    c.ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(c.next().await["closed"], json!(3501));
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_answer_pings_is_disconnected_3012() {
    let server = TestServer::start(&[("ping_interval", "200ms"), ("pong_timeout", "200ms")]).await;
    let (mut quiet, r) = Client::connect(&server, "").await;
    assert!(
        r["connect"].get("ping").is_none(),
        "a sub-second interval announces 0 s (omitted); the server still pings"
    );
    let (mut good, _) = Client::connect(&server, "").await;
    // The good client answers every ping with an empty command.
    let good_task = tokio::spawn(async move {
        for _ in 0..4 {
            let v = good.next().await;
            if v.get("closed").is_some() {
                return Some(v);
            }
            if v.as_object().is_some_and(|o| o.is_empty()) {
                good.ws.send(Message::Text("{}".into())).await.unwrap();
            }
        }
        None
    });
    // The quiet one gets pinged ({}), says nothing, and is disconnected.
    let ping = quiet.next().await;
    assert_eq!(ping, json!({}));
    assert_eq!(quiet.next().await["closed"], json!(3012));
    assert_eq!(tokio::time::timeout(T, good_task).await.unwrap().unwrap(), None, "the answering client stays");
    server.stop().await;
}

#[tokio::test]
async fn slow_subscriber_is_disconnected_3008_and_a_fast_one_gets_everything() {
    // Generous close/write timeouts: the slow peer reads only at the end, and must then find our close.
    let server =
        TestServer::start(&[("client_queue_max_size", "65536"), ("close_timeout", "30s"), ("write_timeout", "30s")])
            .await;
    let (mut fast, _) = Client::connect(&server, "").await;
    fast.call(json!({"subscribe": {"channel": "firehose"}})).await;
    // The slow subscriber: a raw socket that subscribes and then never reads.
    let mut slow = support::RawClient::connect(server.addr, "/connection/websocket").await;
    slow.send_frame(true, ringcast_wire::OpCode::Text, br#"{"id":1,"connect":{}}"#).await;
    slow.send_frame(true, ringcast_wire::OpCode::Text, br#"{"id":2,"subscribe":{"channel":"firehose"}}"#).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut publisher, _) = Client::connect(&server, "").await;
    let slow_before = scrape(&server, "ringcast_slow_disconnects_total").await;
    let drops_before = scrape(&server, "ringcast_queue_drops_total").await;
    let payload = "x".repeat(4000);
    let total = 3000;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < total {
            let p = fast.publication().await;
            assert_eq!(p["push"]["pub"]["offset"], json!(got + 1), "{p}");
            got += 1;
        }
        got
    });
    for _ in 0..total {
        let r = publisher.call(json!({"publish": {"channel": "firehose", "data": {"p": payload}}})).await;
        assert_eq!(r["publish"], json!({}));
    }
    assert_eq!(tokio::time::timeout(Duration::from_secs(30), reader).await.unwrap().unwrap(), total);
    // The slow one finds, after whatever the kernel had buffered, a close with 3008.
    loop {
        match slow.recv(Duration::from_secs(10)).await {
            support::Got::Close(code, reason) => {
                assert_eq!((code, reason.as_str()), (3008, "slow"));
                break;
            }
            support::Got::Eof => panic!("closed without 3008"),
            _ => {}
        }
    }
    // Counted (other tests share the process-wide recorder: at least): one slow client, and at least
    // the pushes it was sent beyond what 64 KiB of queue (16 pushes of 4 KB) and the kernel held.
    assert!(scrape(&server, "ringcast_slow_disconnects_total").await >= slow_before + 1.0);
    assert!(scrape(&server, "ringcast_queue_drops_total").await >= drops_before + 100.0);
    server.stop().await;
}

async fn api(server: &TestServer, method: &str, body: Value) -> Value {
    support::api_json(server.addr, "test-key", method, &body).await
}

#[tokio::test]
async fn server_api_shares_the_listener_and_drives_the_node() {
    let server = TestServer::start(&[("api_key", "test-key")]).await;
    let (mut c, rc) = Client::connect(&server, "").await;
    c.call(json!({"subscribe": {"channel": "news"}})).await;

    let r = api(&server, "publish", json!({"channel": "news", "data": {"from": "api"}})).await;
    assert_eq!(r["result"]["offset"], json!(1), "{r}");
    let epoch = r["result"]["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()));
    let p = c.publication().await;
    assert_eq!(p["push"]["pub"]["data"], json!({"from": "api"}));

    let h = api(&server, "history", json!({"channel": "news", "limit": -1})).await;
    assert_eq!(h["result"]["publications"][0]["data"], json!({"from": "api"}), "{h}");
    assert_eq!(h["result"]["epoch"], epoch);
    let stats = api(&server, "presence_stats", json!({"channel": "news"})).await;
    assert_eq!(stats["result"]["num_clients"], json!(1), "{stats}");
    let info = api(&server, "info", json!({})).await;
    assert_eq!(info["result"]["nodes"][0]["num_clients"], json!(1), "{info}");
    let chans = api(&server, "channels", json!({})).await;
    assert_eq!(chans["result"]["channels"]["news"]["num_clients"], json!(1), "{chans}");

    // Wrong key: 401; health and metrics on the same port.
    let (status, _) = support::http_request(server.addr, "POST", "/api/info", &[("X-API-Key", "wrong")], "{}").await;
    assert_eq!(status, 401);
    let (status, _) = support::http_request(server.addr, "GET", "/health", &[], "").await;
    assert_eq!(status, 200);
    let (status, metrics) = support::http_request(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("ringcast_ws_connections"), "{metrics}");

    // Server-side subscribe: the client is told, then receives.
    let user = rc["connect"]["client"].as_str().unwrap().to_string();
    api(&server, "subscribe", json!({"user": "", "channel": "extra", "client": user})).await;
    let sub_push = c.push().await;
    assert_eq!(sub_push["push"]["channel"], json!("extra"), "{sub_push}");
    assert!(sub_push["push"].get("subscribe").is_some(), "{sub_push}");
    api(&server, "publish", json!({"channel": "extra", "data": 7})).await;
    assert_eq!(c.publication().await["push"]["pub"]["data"], json!(7));

    // Disconnect through the API, with a reconnect code.
    api(&server, "disconnect", json!({"user": "", "disconnect": {"code": 3011, "reason": "force reconnect"}})).await;
    loop {
        let v = c.next().await;
        if v.get("closed").is_some() {
            assert_eq!(v["closed"], json!(3011));
            break;
        }
    }
    server.stop().await;
}

const SECRET: &str = "test-secret-for-ringcast";

fn token(user: &str, exp: Option<i64>) -> String {
    ringcast_server::policy::auth::make_hs256_token(SECRET, user, exp, &[]).expect("token")
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A production-like server: tokens required, channels closed unless a namespace opens them.
async fn strict() -> TestServer {
    let dir = std::env::temp_dir().join(format!("ringcast-strict-{}-{}", std::process::id(), fastrand_u32()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ringcast.toml");
    std::fs::write(
        &file,
        r#"
[channels]
allow_subscribe_for_client = false

[[namespaces]]
name = "public"
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
presence = true
history_size = 10
history_ttl = "60s"
"#,
    )
    .unwrap();
    TestServer::start_with_file(&file, &[("dev", "false"), ("token_hmac_secret_key", SECRET)]).await
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

#[tokio::test]
async fn connect_needs_a_valid_token() {
    let server = strict().await;
    let (_, r) = Client::connect(&server, "").await;
    assert_eq!(r["closed"], json!(3500), "no token, no anonymous access: {r}");
    let (_, r) = Client::connect(&server, "not.a.jwt").await;
    assert_eq!(r["closed"], json!(3500), "{r}");
    let forged = ringcast_server::policy::auth::make_hs256_token("another-secret", "mallory", None, &[]).unwrap();
    let (_, r) = Client::connect(&server, &forged).await;
    assert_eq!(r["closed"], json!(3500), "bad signature: {r}");
    let (_, r) = Client::connect(&server, &token("alice", Some(now() - 10))).await;
    assert_eq!(r["error"]["code"], json!(109), "expired token gets 'token expired': {r}");
    let (_, r) = Client::connect(&server, &token("alice", Some(now() + 3600))).await;
    assert!(r["connect"]["client"].is_string(), "{r}");
    assert_eq!(r["connect"]["expires"], json!(true));
    server.stop().await;
}

#[tokio::test]
async fn namespaces_decide_what_a_client_may_do() {
    let server = strict().await;
    let (mut c, _) = Client::connect(&server, &token("alice", None)).await;
    let r = c.call(json!({"subscribe": {"channel": "secret-room"}})).await;
    assert_eq!(r["error"]["code"], json!(103), "default namespace closed: {r}");
    let r = c.call(json!({"subscribe": {"channel": "nowhere:x"}})).await;
    assert_eq!(r["error"]["code"], json!(102), "unknown namespace: {r}");
    let r = c.call(json!({"publish": {"channel": "public:lobby", "data": {}}})).await;
    assert_eq!(r["error"]["code"], json!(103), "publishing needs a subscription here: {r}");
    let r = c.call(json!({"subscribe": {"channel": "public:lobby"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let r = c.call(json!({"subscribe": {"channel": "public:lobby"}})).await;
    assert_eq!(r["error"]["code"], json!(105), "already subscribed: {r}");
    let r = c.call(json!({"publish": {"channel": "public:lobby", "data": {"hi": 1}}})).await;
    assert_eq!(r["publish"], json!({}), "{r}");
    assert_eq!(c.publication().await["push"]["pub"]["info"]["user"], json!("alice"));
    let r = c.call(json!({"subscribe": {"channel": "$private"}})).await;
    assert_eq!(r["error"]["code"], json!(103), "private channel without a subscription token: {r}");
    server.stop().await;
}

/// The value of an unlabelled metric in a Prometheus scrape (0 when absent).
async fn scrape(server: &TestServer, name: &str) -> f64 {
    let (status, text) = support::http_request(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap_or_else(|e| panic!("{name}: {e}: {v}")))
}

#[tokio::test]
async fn metrics_count_socket_bytes_and_publish_to_delivery_latency() {
    // The recorder is process-wide and other tests run alongside: compare before/after, at least.
    let server = TestServer::start(&[("api_key", "test-key")]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    c.call(json!({"subscribe": {"channel": "metered"}})).await;
    let count = "ringcast_publish_delivery_seconds_count";
    let (deliveries, bytes_in, bytes_out) = (
        scrape(&server, count).await,
        scrape(&server, "ringcast_bytes_in_total").await,
        scrape(&server, "ringcast_bytes_out_total").await,
    );
    let payload = "x".repeat(5000);
    for i in 0..3 {
        api(&server, "publish", json!({"channel": "metered", "data": {"i": i, "pad": payload}})).await;
        let p = c.publication().await;
        assert_eq!(p["push"]["pub"]["data"]["i"], json!(i));
    }
    c.call(json!({"publish": {"channel": "metered", "data": {"pad": payload}}})).await;
    assert!(scrape(&server, count).await >= deliveries + 3.0, "each publication taken for writing is timed");
    assert!(scrape(&server, "ringcast_bytes_out_total").await >= bytes_out + 15_000.0, "three 5 KB pushes went out");
    assert!(scrape(&server, "ringcast_bytes_in_total").await >= bytes_in + 5_000.0, "a 5 KB publish came in");
    let (_, text) = support::http_request(server.addr, "GET", "/metrics", &[], "").await;
    assert!(text.contains("# TYPE ringcast_publish_delivery_seconds histogram"), "{text}");
    assert!(text.contains(r#"ringcast_publish_delivery_seconds_bucket{le="+Inf"}"#), "{text}");
    server.stop().await;
}
