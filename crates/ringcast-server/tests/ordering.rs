//! Per-channel order under concurrency, over real sockets: many publishers at once (server API and
//! client publishes, from several tasks on several worker threads), several subscribers, and every
//! subscriber must see strictly increasing offsets, the same sequence as every other subscriber, and
//! each publisher's messages in the order it sent them.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::TestServer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const T: Duration = Duration::from_secs(10);
const API_PUBLISHERS: usize = 4;
const CLIENT_PUBLISHERS: usize = 4;
const EACH: u64 = 150;
const SUBSCRIBERS: usize = 5;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connected(server: &TestServer) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/connection/websocket")).await.expect("connect");
    ws.send(Message::Text(json!({"id": 1, "connect": {}}).to_string())).await.expect("send");
    let reply = next_lines(&mut ws).await;
    assert!(reply.iter().any(|v| v["id"] == json!(1) && v.get("connect").is_some()), "{reply:?}");
    ws
}

/// The JSON objects of the next text frame.
async fn next_lines(ws: &mut Ws) -> Vec<Value> {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("server sent nothing in time") {
            Some(Ok(Message::Text(t))) => {
                return t
                    .split('\n')
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| serde_json::from_str(l).expect("valid JSON"))
                    .collect()
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn api_publish(addr: SocketAddr, data: Value) {
    let body = json!({"channel": "race", "data": data}).to_string();
    let (status, text) = support::http_request(addr, "POST", "/api/publish", &[("X-API-Key", "k")], &body).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"offset\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_api_and_client_publishers_reach_every_subscriber_in_offset_order() {
    publishers_race(&[("api_key", "k")]).await;
}

/// The same race with every fan-out of 2 or more direct writes split with the helper task
/// (`fanout_split_min`): a handed-off subscriber is still written by its one claim's holder, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_fan_outs_reach_every_subscriber_in_offset_order() {
    publishers_race(&[("api_key", "k"), ("fanout_split_min", "2")]).await;
}

async fn publishers_race(flags: &[(&str, &str)]) {
    let server = TestServer::start(flags).await;
    let total = (API_PUBLISHERS + CLIENT_PUBLISHERS) as u64 * EACH;

    let mut subscribers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut ws = connected(&server).await;
        ws.send(Message::Text(json!({"id": 2, "subscribe": {"channel": "race"}}).to_string())).await.expect("send");
        let reply = next_lines(&mut ws).await;
        assert!(reply.iter().any(|v| v["id"] == json!(2) && v.get("subscribe").is_some()), "{reply:?}");
        subscribers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while (seen.len() as u64) < total {
                for v in next_lines(&mut ws).await {
                    if let Some(p) = v["push"].get("pub") {
                        let offset = p["offset"].as_u64().expect("offset");
                        let who = p["data"]["p"].as_str().expect("publisher").to_string();
                        seen.push((offset, who, p["data"]["n"].as_u64().expect("n")));
                    }
                }
            }
            seen
        }));
    }

    let mut publishers = Vec::new();
    for i in 0..API_PUBLISHERS {
        let addr = server.addr;
        publishers.push(tokio::spawn(async move {
            for n in 0..EACH {
                api_publish(addr, json!({"p": format!("api{i}"), "n": n})).await;
            }
        }));
    }
    for i in 0..CLIENT_PUBLISHERS {
        let mut ws = connected(&server).await;
        publishers.push(tokio::spawn(async move {
            // Several publishes per frame, to race inside one connection's pass too.
            for chunk in 0..EACH / 3 {
                let lines: Vec<String> = (0..3)
                    .map(|k| {
                        let n = chunk * 3 + k;
                        json!({"id": 10 + n, "publish": {"channel": "race", "data": {"p": format!("ws{i}"), "n": n}}})
                            .to_string()
                    })
                    .collect();
                ws.send(Message::Text(lines.join("\n"))).await.expect("send");
            }
            // Every publish acknowledged (replies may come several per frame).
            let mut acked = 0;
            while acked < EACH {
                for v in next_lines(&mut ws).await {
                    assert!(v.get("error").is_none(), "{v}");
                    if v.get("publish").is_some() {
                        acked += 1;
                    }
                }
            }
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }

    let mut sequences = Vec::new();
    for s in subscribers {
        sequences.push(tokio::time::timeout(T * 3, s).await.expect("all publications in time").expect("subscriber"));
    }
    for (k, seen) in sequences.iter().enumerate() {
        let offsets: Vec<u64> = seen.iter().map(|(o, _, _)| *o).collect();
        let inversion = offsets.windows(2).position(|w| w[1] != w[0] + 1);
        assert_eq!(inversion, None, "subscriber {k}: offsets not consecutive at {inversion:?}");
        assert_eq!(offsets.len() as u64, total, "subscriber {k}");
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (_, who, n) in seen {
            if let Some(prev) = last.insert(who, *n) {
                assert!(*n > prev, "subscriber {k}: {who} sent {prev} before {n}");
            }
        }
        assert_eq!(seen, &sequences[0], "subscriber {k} saw another order than subscriber 0");
    }
    server.stop().await;
}

/// With direct writes from the fan-out (the default), a subscriber joining a busy channel still gets
/// its subscribe reply before the channel's first push, and from then on every publication, in order:
/// fan-outs write straight to idle subscribers' sockets, but never while the connection's own task is
/// the writer (it is, from the read that carries the subscribe until the reply is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_subscribe_reply_precedes_the_first_push_while_the_channel_is_busy() {
    const JOINERS: usize = 24;
    const PUSHES_AFTER: usize = 5;
    const MAX_EACH: u64 = 20_000;
    let server = TestServer::start(&[("api_key", "k")]).await;
    assert!(ringcast_server::Config::default().fanout_direct_write, "direct writes are on by default");

    // Subscribers already there, reading: the fan-out writes to them directly.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut background = Vec::new();
    for _ in 0..3 {
        let mut ws = connected(&server).await;
        ws.send(Message::Text(json!({"id": 2, "subscribe": {"channel": "race"}}).to_string())).await.expect("send");
        let done = done.clone();
        background.push(tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                next_lines(&mut ws).await;
            }
        }));
    }
    // Publishers (clients: many publications per frame), until the joiners are through (bounded).
    let mut publishers = Vec::new();
    for i in 0..2 {
        let (mut ws, done) = (connected(&server).await, done.clone());
        publishers.push(tokio::spawn(async move {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < MAX_EACH {
                let lines: Vec<String> = (n..n + 10)
                    .map(|k| {
                        json!({"id": 10 + k, "publish": {"channel": "race", "data": {"p": i, "n": k}}}).to_string()
                    })
                    .collect();
                ws.send(Message::Text(lines.join("\n"))).await.expect("send");
                let mut acked = 0;
                while acked < 10 {
                    acked += next_lines(&mut ws).await.iter().filter(|v| v.get("publish").is_some()).count();
                }
                n += 10;
            }
        }));
    }

    let mut joiners = Vec::new();
    for j in 0..JOINERS {
        let mut ws = connected(&server).await;
        joiners.push(tokio::spawn(async move {
            // The subscribe, then work that keeps the connection's pass going after it registered (the
            // reply is written at the end of the pass): publications arriving meanwhile must wait.
            let mut lines = vec![json!({"id": 7, "subscribe": {"channel": "race"}}).to_string()];
            lines.extend((0..40).map(|k| {
                json!({"id": 100 + k, "publish": {"channel": format!("elsewhere{j}"), "data": {"k": k}}}).to_string()
            }));
            ws.send(Message::Text(lines.join("\n"))).await.expect("send");
            let mut replied = false;
            let mut offsets = Vec::new();
            while offsets.len() < PUSHES_AFTER {
                for v in next_lines(&mut ws).await {
                    if v["id"] == json!(7) {
                        assert!(v.get("subscribe").is_some(), "joiner {j}: {v}");
                        replied = true;
                    } else if let Some(p) = v["push"].get("pub") {
                        assert!(replied, "joiner {j}: a push before the subscribe reply: {v}");
                        offsets.push(p["offset"].as_u64().expect("offset"));
                    }
                }
            }
            let gap = offsets.windows(2).position(|w| w[1] != w[0] + 1);
            assert_eq!(gap, None, "joiner {j}: offsets {offsets:?}");
        }));
        // Joiners arrive one after another, while the channel is being published to.
        tokio::task::yield_now().await;
    }
    for j in joiners {
        tokio::time::timeout(T * 3, j).await.expect("joiners in time").expect("joiner");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.expect("publisher");
    }
    for b in background {
        b.abort();
    }
    let (_, metrics) = support::http_request(server.addr, "GET", "/metrics", &[], "").await;
    let direct = metrics
        .lines()
        .find(|l| l.starts_with("ringcast_fanout_direct_writes_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(direct > 0.0, "the fan-out wrote to sockets itself:\n{metrics}");
    server.stop().await;
}
