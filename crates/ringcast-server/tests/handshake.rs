//! The HTTP upgrade over real sockets: each refusal has its status.

mod support;

use support::{http_exchange, TestServer};

fn upgrade(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")
}

#[tokio::test]
async fn valid_upgrade_gets_101_with_the_rfc_accept_key() {
    let server = TestServer::start(&[]).await;
    let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(upgrade("/echo", "").as_bytes()).await.unwrap();
    let mut b = vec![0u8; 1024];
    let n = c.read(&mut b).await.unwrap();
    let head = String::from_utf8_lossy(&b[..n]);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
    server.stop().await;
}

#[tokio::test]
async fn wrong_version_gets_426_naming_version_13() {
    let server = TestServer::start(&[]).await;
    let r = http_exchange(server.addr, upgrade("/echo", "").replace("Version: 13", "Version: 8").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(r.contains("Sec-WebSocket-Version: 13\r\n"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn bad_key_gets_400() {
    let server = TestServer::start(&[]).await;
    let r =
        http_exchange(server.addr, upgrade("/echo", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn garbage_gets_400() {
    let server = TestServer::start(&[]).await;
    let r = http_exchange(server.addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let server = TestServer::start(&[("max_request_head", "1024")]).await;
    let pad = format!("X-Pad: {}\r\n", "a".repeat(2000));
    let r = http_exchange(server.addr, upgrade("/echo", &pad).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn unknown_path_gets_404() {
    let server = TestServer::start(&[]).await;
    let r = http_exchange(server.addr, upgrade("/nope", "").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn foreign_origin_gets_403_outside_dev_mode() {
    let server = TestServer::start(&[("dev", "false"), ("echo", "true")]).await;
    let r = http_exchange(server.addr, upgrade("/echo", "Origin: https://evil.example\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Same-origin is fine.
    let r = http_exchange(server.addr, upgrade("/echo", "Origin: http://localhost\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    server.stop().await;

    let server =
        TestServer::start(&[("dev", "false"), ("echo", "true"), ("allowed_origins", "https://app.example")]).await;
    let r = http_exchange(server.addr, upgrade("/echo", "Origin: https://app.example\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    server.stop().await;
}

#[tokio::test]
async fn post_gets_405() {
    let server = TestServer::start(&[]).await;
    let r = http_exchange(server.addr, upgrade("/echo", "").replacen("GET", "POST", 1).as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    server.stop().await;
}
