//! The TCP protocol client against the real server on loopback.

use std::time::Duration;

use ringcast_bench::tcp::{Message, TcpClient, TcpClientError};
use ringcast_server::{Config, Server};

/// A `--dev` server on ephemeral ports (its TCP protocol listener included); returns its TCP address.
async fn server(flags: &[(&str, &str)]) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut all: Vec<(String, String)> = vec![("listen".into(), "127.0.0.1:0".into()), ("dev".into(), "true".into())];
    all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (config, settings) = Config::load(None, |_| None, &all).expect("config");
    let server = Server::bind(config, settings).expect("bind");
    let addr = server.tcp_addr().expect("--dev listens for TCP");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn subscribe_publish_and_receive_in_order() {
    let (addr, _stop) = server(&[]).await;
    let mut sub = TcpClient::connect(addr, "").await.expect("connect");
    assert_eq!(sub.client_id().len(), 36);
    sub.subscribe("bench").await.expect("subscribe");
    let mut publisher = TcpClient::connect(addr, "").await.expect("connect");
    for n in 1..=5u64 {
        assert_eq!(publisher.publish("bench", &n.to_be_bytes()).await.expect("publish"), n);
    }
    for n in 1..=5u64 {
        let m = tokio::time::timeout(T, sub.next_message()).await.expect("in time").expect("message");
        assert_eq!(m, Message { channel: "bench".into(), offset: n, data: n.to_be_bytes().to_vec() });
    }
    sub.ping(b"hi").await.expect("pong");
    sub.unsubscribe("bench").await.expect("unsubscribe");
}

#[tokio::test]
async fn a_refusal_is_reported_with_its_code() {
    let (addr, _stop) = server(&[("tcp_listen", "127.0.0.1:0"), ("dev", "false")]).await;
    match TcpClient::connect(addr, "").await {
        Err(TcpClientError::Refused(code)) => assert_eq!(code.0, 7, "anonymous is not allowed without --dev"),
        Err(e) => panic!("expected ERROR 7, got {e}"),
        Ok(_) => panic!("expected ERROR 7, got CONNECTED"),
    }
}

#[tokio::test]
async fn the_client_answers_server_pings_so_a_reading_client_stays_connected() {
    // Pings after 100 ms of silence, 600 ms to answer: a client that did not answer would be closed
    // (ERROR 11) well within the five rounds below; one that reads every 200 ms answers in time.
    let flags = [("tcp_ping_interval", "100ms"), ("tcp_pong_timeout_min", "600ms"), ("tcp_pong_timeout_max", "600ms")];
    let (addr, _stop) = server(&flags).await;
    let mut sub = TcpClient::connect(addr, "").await.expect("connect");
    sub.subscribe("pings").await.expect("subscribe");
    let mut publisher = TcpClient::connect(addr, "").await.expect("connect");
    for n in 1..=5u64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publisher.publish("pings", b"x").await.expect("publish");
        let m = tokio::time::timeout(T, sub.next_message()).await.expect("in time").expect("still connected");
        assert_eq!(m.offset, n);
    }
}
