//! Centrifugo's channel options and command rules over real sockets (issue 8, sections 3–5): what a
//! client may do is what the namespace says, and malformed or unknown commands end as Centrifugo ends them.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use ringcast_protocol::messages::Command;
use ringcast_protocol::{encode_command, Format};
use serde_json::{json, Value};
use support::{JsonClient as Client, TestServer};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);
const SECRET: &str = "policy-test-secret";

impl Client {
    async fn connect(server: &TestServer, token: &str) -> (Client, Value) {
        let mut c = Client::open(server).await;
        let r = c.call(json!({"connect": {"token": token}})).await;
        (c, r)
    }

    async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text)).await.expect("send");
    }

    /// Sends `cmd` with the next id and returns its reply, or the close (`{"closed": code}`).
    async fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        self.send_text(cmd.to_string()).await;
        loop {
            let v = self.next().await;
            if v["id"] == json!(self.next_id) || v.get("closed").is_some() {
                return v;
            }
        }
    }

    /// Waits for the close and returns its code.
    async fn closed(&mut self) -> Value {
        loop {
            let v = self.next().await;
            if let Some(code) = v.get("closed") {
                return code.clone();
            }
        }
    }
}

fn token(user: &str, exp: Option<i64>) -> String {
    ringcast_server::policy::auth::make_hs256_token(SECRET, user, exp, &[]).expect("token")
}

fn sub_token(user: &str, channel: &str, exp: Option<i64>) -> String {
    ringcast_server::policy::auth::make_hs256_subscription_token(SECRET, user, channel, exp).expect("token")
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A server from `file_body` (TOML) with tokens and anonymous access, plus `flags`.
async fn with_config(file_body: &str, flags: &[(&str, &str)]) -> TestServer {
    let dir = std::env::temp_dir().join(format!("ringcast-policy-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("ringcast.toml");
    std::fs::write(&file, file_body).expect("write config");
    let mut all = vec![("dev", "false"), ("token_hmac_secret_key", SECRET), ("allow_anonymous", "true")];
    all.extend_from_slice(flags);
    TestServer::start_with_file(&file, &all).await
}

/// The namespace of the issue's report: presence and history on, subscribing open to everyone, and no
/// presence or history permission at all.
const REPORTED: &str = r#"
[[namespaces]]
name = "room"
presence = true
history_size = 10
history_ttl = "60s"
allow_subscribe_for_anonymous = true
allow_subscribe_for_client = true
"#;

#[tokio::test]
async fn presence_and_history_need_their_own_permission_even_for_subscribers() {
    let server = with_config(REPORTED, &[]).await;
    for who in ["", "alice"] {
        let (mut c, r) = Client::connect(&server, &if who.is_empty() { String::new() } else { token(who, None) }).await;
        assert!(r["connect"]["client"].is_string(), "{r}");
        let r = c.call(json!({"subscribe": {"channel": "room:1"}})).await;
        assert!(r.get("error").is_none(), "subscribing is open: {r}");
        for method in ["presence", "presence_stats", "history"] {
            let r = c.call(json!({method: {"channel": "room:1"}})).await;
            assert_eq!(r["error"]["code"], json!(103), "{who:?} {method}: {r}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn presence_for_subscriber_admits_subscribers_and_anonymous_only_with_for_anonymous() {
    let file = r#"
[[namespaces]]
name = "room"
presence = true
allow_subscribe_for_anonymous = true
allow_subscribe_for_client = true
allow_presence_for_subscriber = true
"#;
    let server = with_config(file, &[]).await;
    let (mut alice, _) = Client::connect(&server, &token("alice", None)).await;
    let r = alice.call(json!({"presence": {"channel": "room:1"}})).await;
    assert_eq!(r["error"]["code"], json!(103), "not subscribed yet: {r}");
    alice.call(json!({"subscribe": {"channel": "room:1"}})).await;
    let r = alice.call(json!({"presence_stats": {"channel": "room:1"}})).await;
    assert_eq!(r["presence_stats"]["num_clients"], json!(1), "{r}");
    let (mut anon, _) = Client::connect(&server, "").await;
    anon.call(json!({"subscribe": {"channel": "room:1"}})).await;
    let r = anon.call(json!({"presence": {"channel": "room:1"}})).await;
    assert_eq!(r["error"]["code"], json!(103), "anonymous needs allow_presence_for_anonymous: {r}");
    server.stop().await;
}

#[tokio::test]
async fn recoverable_and_positioned_are_in_the_reply_exactly_when_in_force() {
    let server = TestServer::start(&[]).await; // dev: allow_recovery and allow_positioning, history on
    let (mut c, _) = Client::connect(&server, "").await;
    let r = c.call(json!({"subscribe": {"channel": "plain"}})).await;
    assert_eq!(r["subscribe"], json!({}), "nothing asked, nothing forced: {r}");
    let r = c.call(json!({"subscribe": {"channel": "pos", "positioned": true}})).await;
    assert_eq!(r["subscribe"]["positioned"], json!(true), "{r}");
    assert!(r["subscribe"].get("recoverable").is_none(), "{r}");
    assert!(r["subscribe"]["epoch"].is_string(), "a positioned subscription learns the epoch: {r}");
    let r = c.call(json!({"subscribe": {"channel": "rec", "recoverable": true}})).await;
    assert_eq!((&r["subscribe"]["recoverable"], &r["subscribe"]["positioned"]), (&json!(true), &json!(true)), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn unknown_methods_and_id_zero_commands_disconnect_3501() {
    let server = TestServer::start(&[]).await;
    for bad in
        [r#"{"id":2,"frobnicate":{}}"#, r#"{"id":2,"subscribe":null}"#, r#"{"id":0,"subscribe":{"channel":"x"}}"#]
    {
        let (mut c, r) = Client::connect(&server, "").await;
        assert!(r["connect"]["client"].is_string(), "{r}");
        c.send_text(bad.to_string()).await;
        assert_eq!(c.closed().await, json!(3501), "{bad}");
    }
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_protobuf_field_disconnects_3501() {
    let server = TestServer::start(&[]).await;
    let url = server.url("/connection/websocket");
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).expect("request");
    req.headers_mut().insert("Sec-WebSocket-Protocol", "centrifuge-protobuf".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
    let mut frame = BytesMut::new();
    let connect = Command { id: 1, connect: Some(Default::default()), ..Default::default() };
    encode_command(Format::Protobuf, &connect, &mut frame).expect("encode");
    ws.send(Message::Binary(frame.to_vec())).await.expect("send");
    let _reply = tokio::time::timeout(T, ws.next()).await.expect("connect reply");
    // A command with id 2 and only field 50 (unknown to client.proto): varint length 5, then
    // tag 1 varint 2, tag 50 (wire type 0) varint 1.
    let unknown: &[u8] = &[5, 0x08, 0x02, 0x90, 0x03, 0x01];
    ws.send(Message::Binary(unknown.to_vec())).await.expect("send");
    let close = loop {
        match tokio::time::timeout(T, ws.next()).await.expect("server sent nothing in time") {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some(3501));
    server.stop().await;
}

#[tokio::test]
async fn a_too_long_channel_is_answered_107_and_the_connection_stays() {
    let server = TestServer::start(&[]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    let long = "x".repeat(100_000);
    let r = c.call(json!({"subscribe": {"channel": long}})).await;
    assert_eq!(r["error"]["code"], json!(107), "{}", &r.to_string()[..r.to_string().len().min(200)]);
    let r = c.call(json!({"ping": {}})).await;
    assert!(r.get("ping").is_some(), "still connected: {r}");
    server.stop().await;
}

#[tokio::test]
async fn channel_max_length_comes_from_the_config() {
    let server = TestServer::start(&[("channel_max_length", "10")]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    let r = c.call(json!({"subscribe": {"channel": "0123456789"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let r = c.call(json!({"publish": {"channel": "0123456789a", "data": {}}})).await;
    assert_eq!(r["error"]["code"], json!(107), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn an_empty_channel_disconnects_3501_as_in_centrifugo() {
    let server = TestServer::start(&[]).await;
    for method in ["subscribe", "publish", "presence", "history", "unsubscribe"] {
        let (mut c, _) = Client::connect(&server, "").await;
        let r = c.call(json!({method: {"channel": ""}})).await;
        assert_eq!(r["closed"], json!(3501), "{method}: {r}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_client_publish_of_200_kb_is_accepted_under_the_1_mib_limit() {
    let server = TestServer::start(&[]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    let big = "y".repeat(200_000);
    let r = c.call(json!({"publish": {"channel": "big", "data": {"text": big}}})).await;
    assert_eq!(r["publish"], json!({}), "{}", &r.to_string()[..r.to_string().len().min(200)]);
    server.stop().await;
}

#[tokio::test]
async fn client_channel_limit_answers_106_past_the_limit() {
    let server = TestServer::start(&[("client_channel_limit", "3")]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    for ch in ["a", "b", "c"] {
        let r = c.call(json!({"subscribe": {"channel": ch}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let r = c.call(json!({"subscribe": {"channel": "d"}})).await;
    assert_eq!(r["error"]["code"], json!(106), "{r}");
    c.call(json!({"unsubscribe": {"channel": "a"}})).await;
    let r = c.call(json!({"subscribe": {"channel": "d"}})).await;
    assert!(r.get("error").is_none(), "a freed slot can be used again: {r}");
    server.stop().await;
}

#[tokio::test]
async fn user_limited_channels_admit_only_the_listed_users() {
    let file = r#"
[[namespaces]]
name = "dm"
allow_user_limited_channels = true
allow_subscribe_for_client = true
"#;
    let server = with_config(file, &[]).await;
    let (mut u42, _) = Client::connect(&server, &token("42", None)).await;
    let r = u42.call(json!({"subscribe": {"channel": "dm:chat#42,43"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let (mut u7, _) = Client::connect(&server, &token("7", None)).await;
    let r = u7.call(json!({"subscribe": {"channel": "dm:chat#42,43"}})).await;
    assert_eq!(r["error"]["code"], json!(103), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn channel_regex_refuses_other_names_with_107() {
    let file = r#"
[[namespaces]]
name = "game"
channel_regex = "^[0-9]+$"
allow_subscribe_for_client = true
"#;
    let server = with_config(file, &[]).await;
    let (mut c, _) = Client::connect(&server, &token("u", None)).await;
    let r = c.call(json!({"subscribe": {"channel": "game:42"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let r = c.call(json!({"subscribe": {"channel": "game:x"}})).await;
    assert_eq!(r["error"]["code"], json!(107), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn refresh_with_an_expired_token_disconnects_3005_and_an_invalid_one_3500() {
    let server = with_config("", &[]).await;
    let (mut c, _) = Client::connect(&server, &token("u", Some(now() + 3600))).await;
    let r = c.call(json!({"refresh": {"token": token("u", Some(now() + 7200))}})).await;
    assert_eq!(r["refresh"]["expires"], json!(true), "{r}");
    let r = c.call(json!({"refresh": {"token": token("u", Some(now() - 10))}})).await;
    assert_eq!(r["closed"], json!(3005), "{r}");
    let (mut c, _) = Client::connect(&server, &token("u", Some(now() + 3600))).await;
    let r = c.call(json!({"refresh": {"token": "not.a.jwt"}})).await;
    assert_eq!(r["closed"], json!(3500), "{r}");
    let (mut c, _) = Client::connect(&server, &token("u", Some(now() + 3600))).await;
    let r = c.call(json!({"refresh": {"token": token("mallory", Some(now() + 3600))}})).await;
    assert_eq!(r["closed"], json!(3500), "another user's token: {r}");
    server.stop().await;
}

#[tokio::test]
async fn subscription_token_expiry_is_in_the_reply_and_sub_refresh_moves_it() {
    let server = with_config("", &[]).await;
    let (mut c, _) = Client::connect(&server, &token("u", None)).await;
    let r = c
        .call(json!({"subscribe": {"channel": "$secret", "token": sub_token("u", "$secret", Some(now() + 600))}}))
        .await;
    assert_eq!(r["subscribe"]["expires"], json!(true), "{r}");
    let ttl = r["subscribe"]["ttl"].as_u64().unwrap_or(0);
    assert!((590..=600).contains(&ttl), "{r}");
    let r = c
        .call(json!({"sub_refresh": {"channel": "$secret", "token": sub_token("u", "$secret", Some(now() + 3600))}}))
        .await;
    assert_eq!(r["sub_refresh"]["expires"], json!(true), "{r}");
    assert!(r["sub_refresh"]["ttl"].as_u64().unwrap_or(0) > 3000, "{r}");
    let r = c.call(json!({"subscribe": {"channel": "$old", "token": sub_token("u", "$old", Some(now() - 5))}})).await;
    assert_eq!(r["error"]["code"], json!(109), "an expired subscription token: {r}");
    server.stop().await;
}

#[tokio::test]
async fn centrifugo_options_ringcast_lacks_are_refused_at_start_by_name() {
    let dir = std::env::temp_dir().join(format!("ringcast-policy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("ringcast.toml");
    std::fs::write(&file, "[[namespaces]]\nname = \"chat\"\npublish_proxy_enabled = true\n").expect("write");
    let e = ringcast_server::Config::load(Some(&file), |_| None, &[]).map(|_| ()).expect_err("refused");
    let msg = e.to_string();
    assert!(msg.contains("publish_proxy_enabled") && msg.contains("not implement"), "{msg}");
    // Option rules are config errors too (the binary exits 2 on any ConfigError), not start-up failures.
    std::fs::write(&file, "[channels]\nhistory_size = 5\nhistory_ttl = \"60s\"\nhistory_meta_ttl = \"30s\"\n")
        .expect("write");
    let e = ringcast_server::Config::load(Some(&file), |_| None, &[]).map(|_| ()).expect_err("refused");
    assert!(matches!(&e, ringcast_server::ConfigError::Invalid { key, .. } if key == "namespaces"), "{e:?}");
    assert!(e.to_string().contains("history_meta_ttl"), "{e}");
}

#[tokio::test]
async fn reverse_history_with_since_returns_what_came_before_it_newest_first() {
    let server = TestServer::start(&[]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    for n in 1..=5 {
        c.call(json!({"publish": {"channel": "h", "data": {"n": n}}})).await;
    }
    let r = c.call(json!({"history": {"channel": "h", "limit": 0}})).await;
    let epoch = r["history"]["epoch"].clone();
    let r = c
        .call(json!({"history": {"channel": "h", "limit": 2, "reverse": true, "since": {"offset": 4, "epoch": epoch}}}))
        .await;
    let offsets: Vec<Value> = r["history"]["publications"]
        .as_array()
        .map(|a| a.iter().map(|p| p["offset"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(offsets, vec![json!(3), json!(2)], "{r}");
    let r = c.call(json!({"history": {"channel": "h", "limit": -1, "since": {"offset": 4, "epoch": epoch}}})).await;
    let offsets: Vec<Value> = r["history"]["publications"]
        .as_array()
        .map(|a| a.iter().map(|p| p["offset"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(offsets, vec![json!(5)], "forward: after since: {r}");
    server.stop().await;
}

#[tokio::test]
async fn recovering_onto_a_channel_without_a_stream_learns_the_epoch_later_publications_carry() {
    let server = TestServer::start(&[]).await;
    let (mut a, _) = Client::connect(&server, "").await;
    let r = a.call(json!({"subscribe": {"channel": "fresh", "recoverable": true, "recover": true, "offset": 0}})).await;
    let epoch = r["subscribe"]["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()), "an epoch to recover against: {r}");
    // No epoch to compare: not recovered (Centrifugo's isRecovered requires the epochs to match, even
    // at offset 0), but the reply names the epoch to recover against next time.
    assert_ne!(r["subscribe"]["recovered"], json!(true), "recovered without an epoch: {r}");
    let (mut p, _) = Client::connect(&server, "").await;
    p.call(json!({"publish": {"channel": "fresh", "data": {"n": 1}}})).await;
    let (mut b, _) = Client::connect(&server, "").await;
    let r = b
        .call(json!({"subscribe": {"channel": "fresh", "recoverable": true, "recover": true, "offset": 0, "epoch": epoch}}))
        .await;
    assert_eq!(r["subscribe"]["recovered"], json!(true), "the epoch learned first still holds: {r}");
    assert_eq!(r["subscribe"]["publications"][0]["data"], json!({"n": 1}), "{r}");
    server.stop().await;
}

async fn api(server: &TestServer, method: &str, body: Value) -> Value {
    support::api_json(server.addr, "policy-key", method, &body).await
}

#[tokio::test]
async fn api_publications_carry_tags_to_subscribers_and_history() {
    let server = TestServer::start(&[("api_key", "policy-key")]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    c.call(json!({"subscribe": {"channel": "tagged"}})).await;
    let r = api(&server, "publish", json!({"channel": "tagged", "data": {"n": 1}, "tags": {"kind": "news"}})).await;
    assert!(r["result"].is_object(), "{r}");
    let push = c.next().await;
    assert_eq!(push["push"]["pub"]["tags"], json!({"kind": "news"}), "{push}");
    let h = api(&server, "history", json!({"channel": "tagged", "limit": -1})).await;
    assert_eq!(h["result"]["publications"][0]["tags"], json!({"kind": "news"}), "{h}");
    let r = api(&server, "broadcast", json!({"channels": ["tagged"], "data": {"n": 2}, "tags": {"kind": "b"}})).await;
    assert!(r["result"]["responses"][0]["result"].is_object(), "{r}");
    assert_eq!(c.next().await["push"]["pub"]["tags"], json!({"kind": "b"}));
    server.stop().await;
}

#[tokio::test]
async fn api_b64data_publishes_the_decoded_bytes() {
    let server = TestServer::start(&[("api_key", "policy-key")]).await;
    let (mut c, _) = Client::connect(&server, "").await;
    c.call(json!({"subscribe": {"channel": "bin"}})).await;
    // base64 of the JSON text {"b":64}: a JSON subscriber can read it as JSON (Centrifugo embeds the bytes).
    let r = api(&server, "publish", json!({"channel": "bin", "b64data": "eyJiIjo2NH0="})).await;
    assert!(r["result"].is_object(), "{r}");
    assert_eq!(c.next().await["push"]["pub"]["data"], json!({"b": 64}));
    let r = api(&server, "publish", json!({"channel": "bin", "b64data": "%%%"})).await;
    assert_eq!(r["error"]["code"], json!(107), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn api_idempotency_key_returns_the_first_result_and_publishes_once() {
    let server = TestServer::start(&[("api_key", "policy-key")]).await;
    let body = json!({"channel": "once", "data": {"n": 1}, "idempotency_key": "k1"});
    let first = api(&server, "publish", body.clone()).await;
    let again = api(&server, "publish", body).await;
    assert_eq!(first, again, "the first result, repeated");
    let other = api(&server, "publish", json!({"channel": "once", "data": {"n": 2}, "idempotency_key": "k2"})).await;
    assert_ne!(other["result"]["offset"], first["result"]["offset"], "{other}");
    let elsewhere =
        api(&server, "publish", json!({"channel": "twice", "data": {"n": 1}, "idempotency_key": "k1"})).await;
    assert_eq!(elsewhere["result"]["offset"], json!(1), "keys are per channel: {elsewhere}");
    let h = api(&server, "history", json!({"channel": "once", "limit": -1})).await;
    assert_eq!(h["result"]["publications"].as_array().map(Vec::len), Some(2), "published once per key: {h}");
    server.stop().await;
}

#[tokio::test]
async fn join_leave_pushes_go_only_to_subscribers_that_asked_unless_forced() {
    let file = r#"
[[namespaces]]
name = "jl"
presence = true
join_leave = true
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
allow_presence_for_subscriber = true
allow_presence_for_anonymous = true

[[namespaces]]
name = "forced"
join_leave = true
force_push_join_leave = true
allow_subscribe_for_client = true
allow_subscribe_for_anonymous = true
"#;
    let server = with_config(file, &[]).await;
    let (mut asked, _) = Client::connect(&server, "").await;
    asked.call(json!({"subscribe": {"channel": "jl:room", "join_leave": true}})).await;
    let (mut quiet, _) = Client::connect(&server, "").await;
    quiet.call(json!({"subscribe": {"channel": "jl:room"}})).await;
    assert!(asked.next().await["push"]["join"].is_object(), "the asker sees the quiet one join");
    let (mut third, r3) = Client::connect(&server, "").await;
    third.call(json!({"subscribe": {"channel": "jl:room"}})).await;
    let join = asked.next().await;
    assert_eq!(join["push"]["join"]["info"]["client"], r3["connect"]["client"], "{join}");
    // The quiet subscriber got nothing: the first thing it sees next is the reply to its own ping.
    quiet.send_text(json!({"id": 99, "ping": {}}).to_string()).await;
    let first = quiet.next().await;
    assert_eq!(first["id"], json!(99), "no join/leave push before it: {first}");

    let (mut f1, _) = Client::connect(&server, "").await;
    f1.call(json!({"subscribe": {"channel": "forced:room"}})).await;
    let (mut f2, _) = Client::connect(&server, "").await;
    f2.call(json!({"subscribe": {"channel": "forced:room"}})).await;
    assert!(f1.next().await["push"]["join"].is_object(), "force_push_join_leave pushes to everyone");
    server.stop().await;
}
