//! What a client sees of a stream the memory broker forgot (see `broker.rs`, "Forgetting"), over real
//! sockets in `--dev`: a never-published channel's stream goes with its last subscriber and comes back
//! with the same epoch, so recovering from offset 0 succeeds with nothing to replay; once something is
//! published the stream outlives its subscribers, and a gap is never presented as recovered.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod support;
use support::TestServer;

const T: Duration = Duration::from_secs(5);

/// A JSON protocol client that reads replies in order (pushes are skipped).
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u32,
    inbox: Vec<Value>,
}

impl Client {
    async fn connect(server: &TestServer) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(server.url("/connection/websocket")).await.expect("connect");
        let mut c = Client { ws, next_id: 0, inbox: Vec::new() };
        let reply = c.call(json!({"connect": {}})).await;
        assert!(reply["connect"]["client"].is_string(), "{reply}");
        c
    }

    async fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        self.ws.send(Message::Text(cmd.to_string())).await.expect("send");
        loop {
            while !self.inbox.is_empty() {
                let v = self.inbox.remove(0);
                if v["id"] == json!(self.next_id) {
                    return v;
                }
            }
            match tokio::time::timeout(T, self.ws.next()).await.expect("a reply in time") {
                Some(Ok(Message::Text(t))) => {
                    for line in t.split('\n').filter(|l| !l.trim().is_empty()) {
                        self.inbox.push(serde_json::from_str(line).expect("JSON"));
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    async fn subscribe(&mut self, channel: &str, recover: Option<(u64, &str)>) -> Value {
        // Recoverable, as SDKs ask: only then does the reply carry the stream's epoch and offset.
        let mut sub = json!({"channel": channel, "recoverable": true});
        if let Some((offset, epoch)) = recover {
            sub["recover"] = json!(true);
            sub["offset"] = json!(offset);
            sub["epoch"] = json!(epoch);
        }
        let reply = self.call(json!({ "subscribe": sub })).await;
        reply.get("subscribe").cloned().unwrap_or_else(|| panic!("subscribe refused: {reply}"))
    }

    async fn unsubscribe(&mut self, channel: &str) {
        let reply = self.call(json!({"unsubscribe": {"channel": channel}})).await;
        assert!(reply.get("unsubscribe").is_some(), "{reply}");
    }
}

#[tokio::test]
async fn a_forgotten_never_published_stream_recovers_from_offset_zero() {
    let server = TestServer::start(&[]).await;
    let mut c = Client::connect(&server).await;
    let first = c.subscribe("quiet", None).await;
    let epoch = first["epoch"].as_str().expect("an epoch to recover against").to_string();
    assert!(!epoch.is_empty());
    c.unsubscribe("quiet").await; // the last subscriber: the stream is dropped
    let again = c.subscribe("quiet", Some((0, &epoch))).await;
    assert_eq!(
        (&again["was_recovering"], &again["recovered"], &again["epoch"]),
        (&json!(true), &json!(true), &json!(epoch)),
        "nothing was ever published, so nothing was missed: {again}"
    );
    assert!(again.get("publications").is_none_or(|p| p == &json!([])), "{again}");
    // Another epoch is another stream's: not recovered.
    c.unsubscribe("quiet").await;
    let other = c.subscribe("quiet", Some((0, "0123456789abcdef"))).await;
    // (`recovered: false` is left out of the JSON, as Centrifugo leaves out false fields.)
    assert_eq!((&other["was_recovering"], other.get("recovered")), (&json!(true), None), "{other}");
    assert_eq!(other["epoch"], json!(epoch), "the stream's own epoch, to recover against next time");
    server.stop().await;
}

#[tokio::test]
async fn a_published_stream_outlives_its_subscribers_and_gaps_are_not_recovered() {
    let server = TestServer::start(&[]).await;
    let mut c = Client::connect(&server).await;
    let first = c.subscribe("news", None).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=3 {
        let reply = c.call(json!({"publish": {"channel": "news", "data": {"n": n}}})).await;
        assert!(reply.get("publish").is_some(), "{reply}");
    }
    c.unsubscribe("news").await;
    // Saw offset 1, missed 2 and 3: both replayed, same epoch.
    let back = c.subscribe("news", Some((1, &epoch))).await;
    assert_eq!((&back["recovered"], &back["epoch"], &back["offset"]), (&json!(true), &json!(epoch), &json!(3)));
    let replayed: Vec<&Value> = back["publications"].as_array().expect("publications").iter().collect();
    assert_eq!(replayed.iter().map(|p| p["offset"].clone()).collect::<Vec<_>>(), [json!(2), json!(3)]);
    c.unsubscribe("news").await;
    // Offset 0 of this epoch is no longer "nothing missed": three publications were.
    let zero = c.subscribe("news", Some((0, &epoch))).await;
    let got = zero["publications"].as_array().map_or(0, Vec::len);
    assert!(zero.get("recovered").is_none() || got == 3, "a gap presented as recovered: {zero}");
    server.stop().await;
}
