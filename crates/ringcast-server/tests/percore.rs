//! `runtime = "per-core"`: echo and pub/sub with connections spread over several single-thread runtimes,
//! and graceful shutdown with every connection told 1001.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{RawClient, TestServer};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const T: Duration = Duration::from_secs(5);
const PER_CORE: [(&str, &str); 2] = [("runtime", "per-core"), ("workers", "2")];

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The next JSON object carrying `key` from the server (pings and other objects skipped).
async fn next_with(ws: &mut Ws, key: &str) -> Value {
    loop {
        let msg = tokio::time::timeout(T, ws.next()).await.expect("server sent nothing in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                for line in t.split('\n').filter(|l| !l.trim().is_empty()) {
                    let v: Value = serde_json::from_str(line).expect("server sent invalid JSON");
                    if v.get(key).is_some() {
                        return v;
                    }
                }
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// A connected JSON-protocol client (dev mode takes an empty token).
async fn client(server: &TestServer) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/connection/websocket")).await.expect("connect");
    ws.send(Message::Text(json!({"id": 1, "connect": {"token": ""}}).to_string())).await.expect("send");
    let reply = next_with(&mut ws, "id").await;
    assert!(reply.get("connect").is_some(), "{reply}");
    ws
}

#[tokio::test]
async fn echo_and_pubsub_work_with_connections_on_several_cores() {
    let server = TestServer::start(&PER_CORE).await;
    // 16 echo connections, each echoing on whichever core took it.
    let mut echo = Vec::new();
    for _ in 0..16 {
        let (ws, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.expect("connect");
        echo.push(ws);
    }
    for (i, ws) in echo.iter_mut().enumerate() {
        ws.send(Message::Text(format!("hello {i}"))).await.expect("send");
    }
    for (i, ws) in echo.iter_mut().enumerate() {
        let got = tokio::time::timeout(T, ws.next()).await.expect("echo in time").expect("open").expect("ok");
        assert_eq!(got, Message::Text(format!("hello {i}")));
    }
    // 8 subscribers and a publisher: every publication reaches every core's subscribers, in order.
    let mut subscribers = Vec::new();
    for _ in 0..8 {
        let mut ws = client(&server).await;
        ws.send(Message::Text(json!({"id": 2, "subscribe": {"channel": "room"}}).to_string())).await.expect("send");
        let reply = next_with(&mut ws, "id").await;
        assert!(reply.get("error").is_none(), "{reply}");
        subscribers.push(ws);
    }
    let mut publisher = client(&server).await;
    for n in 0..5 {
        let cmd = json!({"id": 10 + n, "publish": {"channel": "room", "data": {"n": n}}});
        publisher.send(Message::Text(cmd.to_string())).await.expect("send");
        let reply = next_with(&mut publisher, "id").await;
        assert_eq!(reply["publish"], json!({}), "{reply}");
    }
    for ws in &mut subscribers {
        for n in 0..5 {
            let push = next_with(ws, "push").await;
            assert_eq!(push["push"]["pub"]["data"], json!({"n": n}), "{push}");
        }
    }
    // 25 connections over 2 cores by the kernel's SO_REUSEPORT hash: all on one would be a 1 in 2^24 draw.
    let accepted = server.ctx.cores.accepted();
    assert_eq!(accepted.len(), 2, "one count per core: {accepted:?}");
    assert_eq!(accepted.iter().sum::<u64>(), 25, "{accepted:?}");
    assert!(accepted.iter().all(|&n| n > 0), "connections landed on one core only: {accepted:?}");
    server.stop().await;
}

#[tokio::test]
async fn per_core_shutdown_closes_every_connection_with_1001_and_returns() {
    let server = TestServer::start(&PER_CORE).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(RawClient::connect(server.addr, "/echo").await);
    }
    let addr = server.addr;
    let ctx = server.ctx.clone();
    let stopping = tokio::spawn(server.stop());
    for c in &mut clients {
        c.expect_close(1001).await;
    }
    tokio::time::timeout(T, stopping).await.expect("server stopped in time").unwrap();
    assert!(ctx.live.is_empty(), "connections left after shutdown: {}", ctx.live.len());
    assert!(TcpStream::connect(addr).await.is_err(), "a core still accepting after shutdown");
}
