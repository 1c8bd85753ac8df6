//! Admission control over real loopback sockets: each limit is exceeded, and the refusal checked for
//! its exact status, its `Retry-After`, its metric; clients admitted before and after keep working.
//! Source addresses other than 127.0.0.1 (127.0.0.2, …) stand for different clients.
//!
//! The refusal counter is process-wide and each test here owns one of its `reason` labels, so every
//! test can check the exact number it caused.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{http_request, TestServer};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// How an upgrade request was answered.
enum Answer {
    Upgraded(Box<Ws>),
    /// Not 101: the status and the `Retry-After` header, if any.
    Refused(u16, Option<String>),
}

/// One upgrade request to the client endpoint, from source address `from`.
async fn upgrade(addr: SocketAddr, from: &str) -> Answer {
    let from: IpAddr = from.parse().expect("source address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source address");
    let stream = socket.connect(addr).await.expect("connect");
    let url = format!("ws://{addr}/connection/websocket");
    let upgraded = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::client_async(url, stream))
        .await
        .expect("the server answered the upgrade in time");
    match upgraded {
        Ok((ws, _)) => Answer::Upgraded(Box::new(ws)),
        Err(WsError::Http(resp)) => Answer::Refused(
            resp.status().as_u16(),
            resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string),
        ),
        Err(e) => panic!("upgrade failed otherwise: {e}"),
    }
}

fn upgraded(answer: Answer) -> Ws {
    match answer {
        Answer::Upgraded(ws) => *ws,
        Answer::Refused(status, _) => panic!("expected 101, got {status}"),
    }
}

/// Sends a connect command and expects its reply: the client is really served.
async fn works(ws: &mut Ws, id: u32) {
    let reply = call(ws, json!({"id": id, "connect": {}})).await;
    assert!(reply["connect"]["client"].is_string(), "connect reply: {reply}");
}

/// A connected client subscribes (dev mode: any channel) and gets its reply.
async fn still_works(ws: &mut Ws, id: u32) {
    let reply = call(ws, json!({"id": id, "subscribe": {"channel": format!("c{id}")}})).await;
    assert!(reply.get("subscribe").is_some(), "subscribe reply: {reply}");
}

/// Sends one command and returns the reply with its id.
async fn call(ws: &mut Ws, cmd: Value) -> Value {
    let id = cmd["id"].clone();
    ws.send(Message::text(cmd.to_string())).await.expect("send command");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a reply in time")
            .expect("connection open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).expect("JSON reply");
            if v["id"] == id {
                return v;
            }
        }
    }
}

/// Closes a client and waits for the server to drop its socket: by then its admission is released (the
/// connection gives its count back before its socket is closed).
async fn close(mut ws: Ws) {
    ws.close(None).await.expect("send close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {}
}

/// `ringcast_admission_refusals_total{reason="…",transport="ws"}` from the server's /metrics (0 before
/// the first).
async fn refusals(addr: SocketAddr, reason: &str) -> u64 {
    let (status, body) = http_request(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    let series = format!("ringcast_admission_refusals_total{{reason=\"{reason}\",transport=\"ws\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse::<f64>().expect("counter value") as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_over_max_connections_refuses_exactly_the_excess_with_503() {
    const MAX: usize = 200;
    const STORM: usize = 300;
    let server = TestServer::start(&[("max_connections", "200")]).await;
    let addr = server.addr;
    let before = refusals(addr, "max_connections").await;
    let tasks: Vec<_> = (0..STORM).map(|_| tokio::spawn(upgrade(addr, "127.0.0.1"))).collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("handshake task") {
            Answer::Upgraded(ws) => admitted.push(*ws),
            Answer::Refused(status, retry_after) => {
                assert_eq!(status, 503);
                assert_eq!(retry_after.as_deref(), Some("1"));
                refused += 1;
            }
        }
    }
    assert_eq!(admitted.len(), MAX, "exactly max_connections admitted");
    assert_eq!(refused, STORM - MAX, "exactly the excess refused");
    assert_eq!(refusals(addr, "max_connections").await - before, (STORM - MAX) as u64);
    // A full node still answers plain HTTP (health checks, the API).
    assert_eq!(http_request(addr, "GET", "/health", &[], "").await.0, 200);
    for (i, ws) in admitted.iter_mut().enumerate() {
        works(ws, i as u32 + 1).await;
    }
    // One leaves: exactly one place is free again.
    let one = admitted.pop().expect("an admitted client");
    close(one).await;
    let mut again = upgraded(upgrade(addr, "127.0.0.1").await);
    works(&mut again, 1).await;
    assert!(matches!(upgrade(addr, "127.0.0.1").await, Answer::Refused(503, _)));
    server.stop().await;
}

#[tokio::test]
async fn connections_per_ip_over_the_limit_are_refused_503_per_address() {
    let server = TestServer::start(&[("client_max_connections_per_ip", "2")]).await;
    let addr = server.addr;
    let before = refusals(addr, "max_connections_per_ip").await;
    let mut a1 = upgraded(upgrade(addr, "127.0.0.2").await);
    let mut a2 = upgraded(upgrade(addr, "127.0.0.2").await);
    match upgrade(addr, "127.0.0.2").await {
        Answer::Refused(status, retry_after) => {
            assert_eq!(status, 503);
            assert_eq!(retry_after.as_deref(), Some("1"));
        }
        Answer::Upgraded(_) => panic!("a third connection from 127.0.0.2 was admitted"),
    }
    assert_eq!(refusals(addr, "max_connections_per_ip").await - before, 1);
    // Another address is counted apart.
    let mut b = upgraded(upgrade(addr, "127.0.0.3").await);
    works(&mut a1, 1).await;
    works(&mut a2, 1).await;
    works(&mut b, 1).await;
    // When one of 127.0.0.2's connections ends, it may open one again.
    close(a1).await;
    let mut a3 = upgraded(upgrade(addr, "127.0.0.2").await);
    works(&mut a3, 1).await;
    still_works(&mut a2, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn connect_rate_over_the_burst_is_refused_429_with_retry_after() {
    const BURST: usize = 3;
    let server = TestServer::start(&[("client_connect_rate", "1"), ("client_connect_burst", "3")]).await;
    let addr = server.addr;
    let before = refusals(addr, "connect_rate").await;
    // The burst is always there; after it one token a second, so a 429 comes within a few more tries
    // however slow this machine is (bounded: 60 tries would take a minute to refill).
    let mut admitted = Vec::new();
    let mut refused = 0u64;
    for _ in 0..BURST + 60 {
        match upgrade(addr, "127.0.0.4").await {
            Answer::Upgraded(ws) => admitted.push(*ws),
            Answer::Refused(status, retry_after) => {
                assert_eq!(status, 429);
                assert_eq!(retry_after.as_deref(), Some("1"), "one token a second");
                refused += 1;
                break;
            }
        }
    }
    assert_eq!(refused, 1, "no 429 after {} upgrades", admitted.len());
    assert!(admitted.len() >= BURST, "the burst was admitted: {}", admitted.len());
    assert_eq!(refusals(addr, "connect_rate").await - before, refused);
    // Another address has its own bucket; the admitted clients are served.
    let mut other = upgraded(upgrade(addr, "127.0.0.5").await);
    works(&mut other, 1).await;
    for ws in &mut admitted {
        works(ws, 1).await;
    }
    server.stop().await;
}

/// Sends one frame of `cmds` (JSON lines) and collects the replies that carry an id, until every
/// command with an id is answered. `None`: the server closed instead, with this code and reason.
async fn frame(ws: &mut Ws, cmds: &[Value]) -> Result<Vec<Value>, (u16, String)> {
    let text = cmds.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    ws.send(Message::text(text)).await.expect("send frame");
    let mut replies = Vec::new();
    while replies.len() < cmds.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a reply in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                for line in t.as_str().lines() {
                    let v: Value = serde_json::from_str(line).expect("JSON reply");
                    if v.get("id").is_some() {
                        replies.push(v);
                    }
                }
            }
            Some(Ok(Message::Close(Some(c)))) => return Err((u16::from(c.code), c.reason.to_string())),
            Some(Ok(_)) => {}
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
    Ok(replies)
}

#[tokio::test]
async fn commands_over_the_rate_are_answered_111_and_a_flood_is_disconnected_3013() {
    let server = TestServer::start(&[
        ("client_command_rate", "1"),
        ("client_command_burst", "4"),
        ("client_flood_disconnect_after", "300ms"),
    ])
    .await;
    let addr = server.addr;
    let mut flooder = upgraded(upgrade(addr, "127.0.0.6").await);
    works(&mut flooder, 1).await;
    // The connect took one token of 4: the next three run whatever the clock did; of ten, some are
    // refused 111 (one token a second cannot cover seven more in one frame).
    let cmds: Vec<Value> = (2..12).map(|id| json!({"id": id, "subscribe": {"channel": format!("c{id}")}})).collect();
    let replies = frame(&mut flooder, &cmds).await.expect("replies, not a close");
    assert_eq!(replies.len(), 10);
    for r in &replies[..3] {
        assert!(r.get("subscribe").is_some(), "within the burst: {r}");
    }
    let refused: Vec<&Value> = replies.iter().filter(|r| r.get("error").is_some()).collect();
    assert!(refused.len() >= 6, "{replies:?}");
    for r in &refused {
        assert_eq!(r["error"]["code"], json!(111), "{r}");
        assert_eq!(r["error"]["message"], json!("too many requests"), "{r}");
        assert_eq!(r["error"]["temporary"], json!(true), "{r}");
    }
    // Keep flooding: once refused for 300 ms without the bucket filling up, the client is disconnected
    // 3013. Bounded: 500 frames of 5 commands.
    let mut closed = None;
    for round in 0..500u32 {
        let cmds: Vec<Value> =
            (0..5).map(|i| json!({"id": 100 + round * 5 + i, "presence_stats": {"channel": "c2"}})).collect();
        if let Err(close) = frame(&mut flooder, &cmds).await {
            closed = Some(close);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(closed, Some((3013, "too many requests".to_string())));
    // Another client has its own bucket.
    let mut other = upgraded(upgrade(addr, "127.0.0.7").await);
    works(&mut other, 1).await;
    still_works(&mut other, 2).await;
    server.stop().await;
}

// The TCP binary protocol (`tcp_listen`) is admitted with the same counts: a refused connection gets
// one ERROR frame (12 server unavailable; 9 for the connect rate) and the end of the stream.

/// How the server answered a TCP protocol connection's CONNECT.
#[derive(Debug, PartialEq, Eq)]
enum TcpAnswer {
    Connected,
    /// ERROR before anything else: its code and message, then the stream ended.
    Refused(u16, String),
}

/// A TCP protocol connection from source address `from` that sent CONNECT (anonymous: `--dev`).
async fn tcp_connect(server: &TestServer, from: &str) -> (TcpStream, TcpAnswer) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let from: IpAddr = from.parse().expect("source address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source address");
    let mut stream = socket.connect(server.tcp.expect("--dev listens for TCP")).await.expect("connect");
    let mut frame = Vec::new();
    ringcast_wire::tcp::Command::Connect { token: "" }.encode(&mut frame).expect("encodable");
    // A refused connection may already be closed for writing; its answer is read below either way.
    let _ = stream.write_all(&frame).await;
    let mut got = Vec::new();
    let answer = loop {
        let mut chunk = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the server answered in time")
            .unwrap_or(0);
        assert!(n > 0, "the stream ended without a frame");
        got.extend_from_slice(&chunk[..n]);
        if got.len() < 13 {
            continue;
        }
        let len = u32::from_be_bytes([got[5], got[6], got[7], got[8]]) as usize;
        if got.len() < 13 + len {
            continue;
        }
        let cmd = u16::from_be_bytes([got[3], got[4]]);
        let command = ringcast_wire::tcp::Command::decode(ringcast_wire::Role::Client, cmd, &got[13..13 + len])
            .expect("a well-formed command");
        break match command {
            ringcast_wire::tcp::Command::Connected { .. } => TcpAnswer::Connected,
            ringcast_wire::tcp::Command::Error { code, message } => TcpAnswer::Refused(code.0, message.to_string()),
            other => panic!("unexpected first frame {other:?}"),
        };
    };
    if let TcpAnswer::Refused(..) = answer {
        // Nothing follows the ERROR: the server closes (after FIN, EOF; never a reset).
        let mut rest = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest))
            .await
            .expect("the server closed in time")
            .expect("a clean close, not a reset");
        assert_eq!(n, 0, "nothing after the ERROR");
    }
    (stream, answer)
}

/// `ringcast_admission_refusals_total{reason="…",transport="tcp"}`.
async fn tcp_refusals(addr: SocketAddr, reason: &str) -> u64 {
    let (_, body) = http_request(addr, "GET", "/metrics", &[], "").await;
    let series = format!("ringcast_admission_refusals_total{{reason=\"{reason}\",transport=\"tcp\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse::<f64>().expect("counter value") as u64)
}

/// Connects until admitted (a closed connection gives its count back just after its socket closes).
async fn tcp_admitted_eventually(server: &TestServer, from: &str) -> TcpStream {
    for _ in 0..500 {
        match tcp_connect(server, from).await {
            (stream, TcpAnswer::Connected) => return stream,
            (_, TcpAnswer::Refused(..)) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("never admitted again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_websocket_share_max_connections_and_tcp_over_it_gets_error_12() {
    let server = TestServer::start(&[("max_connections", "3")]).await;
    let addr = server.addr;
    let mut ws = upgraded(upgrade(addr, "127.0.0.1").await);
    let (t1, a1) = tcp_connect(&server, "127.0.0.1").await;
    let (_t2, a2) = tcp_connect(&server, "127.0.0.1").await;
    assert_eq!((a1, a2), (TcpAnswer::Connected, TcpAnswer::Connected));
    // The node holds 3: a TCP connection and an upgrade are both turned away.
    let (_, refused) = tcp_connect(&server, "127.0.0.1").await;
    assert_eq!(refused, TcpAnswer::Refused(12, "max_connections: retry after 1 s".into()));
    assert!(matches!(upgrade(addr, "127.0.0.1").await, Answer::Refused(503, _)));
    assert_eq!(tcp_refusals(addr, "max_connections").await, 1);
    works(&mut ws, 1).await;
    // A TCP connection leaves: its place is free again, for either transport.
    drop(t1);
    let _t3 = tcp_admitted_eventually(&server, "127.0.0.1").await;
    // Tries refused while t1's place was still held counted too: compare against the count now.
    let before = tcp_refusals(addr, "max_connections").await;
    let (_, refused) = tcp_connect(&server, "127.0.0.1").await;
    assert!(matches!(refused, TcpAnswer::Refused(12, _)));
    assert_eq!(tcp_refusals(addr, "max_connections").await, before + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_per_ip_over_the_limit_get_error_12_per_address() {
    let server = TestServer::start(&[("client_max_connections_per_ip", "2")]).await;
    let mut ws = upgraded(upgrade(server.addr, "127.0.0.12").await);
    let (_t1, a1) = tcp_connect(&server, "127.0.0.12").await;
    assert_eq!(a1, TcpAnswer::Connected);
    let (_, refused) = tcp_connect(&server, "127.0.0.12").await;
    assert_eq!(refused, TcpAnswer::Refused(12, "max_connections_per_ip: retry after 1 s".into()));
    assert_eq!(tcp_refusals(server.addr, "max_connections_per_ip").await, 1);
    // Another address is counted apart; the admitted ones are served.
    let (_t2, other) = tcp_connect(&server, "127.0.0.13").await;
    assert_eq!(other, TcpAnswer::Connected);
    works(&mut ws, 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_rate_over_the_burst_gets_error_9_with_the_wait() {
    const BURST: usize = 3;
    let server = TestServer::start(&[("client_connect_rate", "1"), ("client_connect_burst", "3")]).await;
    // As for upgrades: the burst, then one token a second; bounded at 60 more tries.
    let mut admitted = Vec::new();
    let mut refused = None;
    for _ in 0..BURST + 60 {
        match tcp_connect(&server, "127.0.0.14").await {
            (stream, TcpAnswer::Connected) => admitted.push(stream),
            (_, answer) => {
                refused = Some(answer);
                break;
            }
        }
    }
    assert_eq!(refused, Some(TcpAnswer::Refused(9, "connect_rate: retry after 1 s".into())));
    assert!(admitted.len() >= BURST, "the burst was admitted: {}", admitted.len());
    assert_eq!(tcp_refusals(server.addr, "connect_rate").await, 1);
    // The same bucket as upgrades from that address; another address has its own.
    assert!(matches!(upgrade(server.addr, "127.0.0.14").await, Answer::Refused(429, _)));
    let (_t, other) = tcp_connect(&server, "127.0.0.15").await;
    assert_eq!(other, TcpAnswer::Connected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_over_the_memory_watermark_get_error_12() {
    // A high watermark below any process's RSS: the first sample (every 100 ms) puts the node under
    // pressure, and it stays there.
    let server = TestServer::start(&[("memory_high_watermark", "1MiB"), ("memory_low_watermark", "512KiB")]).await;
    let mut refused = None;
    let mut admitted = Vec::new();
    for _ in 0..500 {
        match tcp_connect(&server, "127.0.0.16").await {
            (stream, TcpAnswer::Connected) => {
                admitted.push(stream);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (_, answer) => {
                refused = Some(answer);
                break;
            }
        }
    }
    assert_eq!(refused, Some(TcpAnswer::Refused(12, "memory: retry after 5 s".into())));
    assert_eq!(tcp_refusals(server.addr, "memory").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_over_a_channels_rate_are_answered_111_and_other_channels_have_their_own() {
    let server =
        TestServer::start(&[("client_channel_publish_rate", "1"), ("client_channel_publish_burst", "2")]).await;
    let mut ws = upgraded(upgrade(server.addr, "127.0.0.17").await);
    works(&mut ws, 1).await;
    // One frame: two publications to `a` are the burst, the third is over it (one token a second cannot
    // come back between commands of one frame); `b` has its own bucket.
    let publish = |id: u32, channel: &str| json!({"id": id, "publish": {"channel": channel, "data": {"n": id}}});
    let replies = frame(&mut ws, &[publish(2, "a"), publish(3, "a"), publish(4, "a"), publish(5, "b")])
        .await
        .expect("replies, not a close");
    let by_id = |id: u32| replies.iter().find(|r| r["id"] == json!(id)).expect("a reply per command").clone();
    assert!(by_id(2).get("publish").is_some(), "{replies:?}");
    assert!(by_id(3).get("publish").is_some(), "{replies:?}");
    assert_eq!(by_id(4)["error"]["code"], json!(111), "{replies:?}");
    assert_eq!(by_id(4)["error"]["temporary"], json!(true), "{replies:?}");
    assert!(by_id(5).get("publish").is_some(), "another channel: {replies:?}");
    // Not a flood: the connection stays and other commands run.
    still_works(&mut ws, 6).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_publications_over_a_channels_rate_are_answered_error_9() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server =
        TestServer::start(&[("client_channel_publish_rate", "1"), ("client_channel_publish_burst", "2")]).await;
    let (mut stream, answer) = tcp_connect(&server, "127.0.0.18").await;
    assert_eq!(answer, TcpAnswer::Connected);
    let mut out = Vec::new();
    for channel in ["a", "a", "a", "b"] {
        ringcast_wire::tcp::Command::Publish { channel, data: b"x" }.encode(&mut out).expect("encodable");
    }
    stream.write_all(&out).await.expect("send");
    // Four replies in command order: PUBLISHED, PUBLISHED, ERROR 9, PUBLISHED.
    let mut got = Vec::new();
    let mut replies = Vec::new();
    while replies.len() < 4 {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("replies in time")
            .expect("read");
        assert!(n > 0, "closed after {replies:?}");
        got.extend_from_slice(&chunk[..n]);
        while got.len() >= 13 {
            let len = u32::from_be_bytes([got[5], got[6], got[7], got[8]]) as usize;
            if got.len() < 13 + len {
                break;
            }
            let cmd = u16::from_be_bytes([got[3], got[4]]);
            let reply = match ringcast_wire::tcp::Command::decode(ringcast_wire::Role::Client, cmd, &got[13..13 + len])
                .expect("well-formed")
            {
                ringcast_wire::tcp::Command::Published { .. } => 0,
                ringcast_wire::tcp::Command::Error { code, .. } => code.0,
                other => panic!("unexpected {other:?}"),
            };
            replies.push(reply);
            got.drain(..13 + len);
        }
    }
    assert_eq!(replies, [0, 0, 9, 0]);
    server.stop().await;
}
