//! Close discipline (RFC 6455 §5.5.1): once the server has sent its Close frame, it sends no other data
//! frame on that connection, however much is published to the channels the client was subscribed to.

mod support;

use std::time::Duration;

use ringcast_wire::frame::OpCode;
use support::{RawClient, TestServer};
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn publications_after_our_close_frame_are_never_written() {
    // The client never answers the protocol's ping, so the server closes it with 3012; it also never
    // answers the Close, so the connection lingers in the closing handshake for `close_timeout`, while
    // publications keep arriving on its channel.
    let server = TestServer::start(&[
        ("api_key", "k"),
        ("ping_interval", "200ms"),
        ("pong_timeout", "200ms"),
        ("close_timeout", "2s"),
    ])
    .await;
    let mut c = RawClient::connect(server.addr, "/connection/websocket").await;
    c.send_frame(true, OpCode::Text, br#"{"id":1,"connect":{}}"#).await;
    c.send_frame(true, OpCode::Text, br#"{"id":2,"subscribe":{"channel":"after"}}"#).await;
    let publish = |n: u32| async move {
        let body = format!(r#"{{"channel":"after","data":{{"n":{n}}}}}"#);
        let (status, text) =
            support::http_request(server.addr, "POST", "/api/publish", &[("X-API-Key", "k")], &body).await;
        assert_eq!(status, 200, "{text}");
    };
    publish(0).await;
    // Read raw bytes, not through a WebSocket reader (which stops parsing at a close frame, so it would
    // not see what follows it).
    let mut stream = c.stream;
    let mut bytes = Vec::new();
    let mut published_after = false;
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, stream.read(&mut chunk)).await.expect("in time").unwrap_or(0);
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        if !published_after && frames(&bytes).iter().any(|(op, _)| *op == 8) {
            published_after = true;
            for n in 1..=20 {
                publish(n).await;
            }
        }
    }
    let frames = frames(&bytes);
    let close = frames.iter().position(|(op, _)| *op == 8).expect("a close frame");
    assert_eq!(u16::from_be_bytes([frames[close].1[0], frames[close].1[1]]), 3012);
    assert!(
        frames[..close].iter().any(|(_, p)| String::from_utf8_lossy(p).contains(r#""n":0"#)),
        "published before the close"
    );
    assert_eq!(close, frames.len() - 1, "{} frame(s) written behind the close frame", frames.len() - 1 - close);
    server.stop().await;
}

/// The complete (opcode, payload) frames of an unmasked server byte stream.
fn frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        if b.len() < head + len {
            break;
        }
        out.push((b[0] & 0x0f, b[head..head + len].to_vec()));
        b = &b[head + len..];
    }
    out
}
