//! Timeouts, graceful shutdown, and connections that leave nothing behind.

mod support;

use std::time::{Duration, Instant};

use ringcast_wire::frame::OpCode;
use support::{Got, RawClient, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

async fn wait_for_eof(stream: &mut TcpStream, within: Duration) {
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {within:?}"),
        }
    }
}

#[tokio::test]
async fn silent_connection_is_dropped_at_the_handshake_timeout() {
    let server = TestServer::start(&[("handshake_timeout", "300ms")]).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    wait_for_eof(&mut c, T).await;
    server.stop().await;
    // Not before it (without timing it): under a deadline far longer than this test can take, a
    // connection that waits before its head is upgraded all the same.
    let server = TestServer::start(&[("handshake_timeout", "60s")]).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut req = Vec::new();
    ringcast_wire::handshake::write_client_request(&mut req, &server.addr.to_string(), "/echo", support::KEY, &[]);
    c.write_all(&req).await.unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    server.stop().await;
}

#[tokio::test]
async fn slowloris_dribbling_a_head_is_dropped_at_the_handshake_timeout() {
    let server = TestServer::start(&[("handshake_timeout", "500ms")]).await;
    let mut c = TcpStream::connect(server.addr).await.unwrap();
    let head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    c.write_all(head).await.unwrap();
    // Keep dribbling one byte every 50 ms: the deadline is for the whole head, not per byte. A per-byte
    // deadline would never fire; however slowly this runs, the whole-head one must (the cap, 30 s, only
    // ends a broken run).
    let mut closed = false;
    let mut dribbled = 0;
    for _ in 0..600 {
        dribbled += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if c.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), c.read(&mut b)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "slowloris connection survived {dribbled} bytes, one every 50 ms");
    server.stop().await;
}

#[tokio::test]
async fn idle_connection_gets_1001_at_the_idle_timeout_and_others_live_on() {
    // The busy client is never quiet for more than a tenth of the timeout (a margin for a loaded
    // machine), and keeps going past the point where the idle one is due.
    let server = TestServer::start(&[("idle_timeout", "1s")]).await;
    let mut idle = RawClient::connect(server.addr, "/echo").await;
    let mut busy = RawClient::connect(server.addr, "/echo").await;
    for i in 0..15u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        busy.send_frame(true, OpCode::Binary, &[i]).await;
        assert_eq!(busy.recv(T).await, Got::Msg(OpCode::Binary, vec![i]));
    }
    match idle.recv(T).await {
        Got::Close(1001, reason) => assert_eq!(reason, "idle timeout"),
        other => panic!("expected close 1001, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_reads_is_dropped_at_the_write_timeout() {
    let server = TestServer::start(&[("write_timeout", "500ms"), ("client_queue_max_size", "65536")]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    let mut burst = Vec::new();
    for _ in 0..2048 {
        ringcast_wire::frame::encode_client_frame(&mut burst, true, OpCode::Binary, &[1u8; 4096], [1, 1, 1, 1]);
    }
    // Write without reading until the server stops taking bytes, then stay silent.
    let _ = tokio::time::timeout(Duration::from_secs(2), c.stream.write_all(&burst)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Now read: we may get what was in flight, but the stream must end well short of all 8 MiB.
    let mut total = 0usize;
    let mut b = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(T, c.stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("connection still open after the write timeout ({total} bytes read)"),
        }
    }
    assert!(total < 2048 * 4100, "got every echo ({total} bytes): the server never gave up");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_1001_and_returns() {
    let server = TestServer::start(&[]).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(RawClient::connect(server.addr, "/echo").await);
    }
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    for c in &mut clients {
        match c.recv(T).await {
            Got::Close(1001, _) => {}
            other => panic!("expected 1001, got {other:?}"),
        }
        c.send_frame(true, OpCode::Close, &1001u16.to_be_bytes()).await;
        assert_eq!(c.recv(T).await, Got::Eof);
    }
    tokio::time::timeout(T, stopping).await.expect("server stopped in time").unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "listener still accepting after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_opened_and_closed_leave_no_task_behind() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let server = TestServer::start(&[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline = metrics.num_alive_tasks();
    let mut clients = Vec::new();
    for i in 0..1000u32 {
        let mut c = RawClient::connect(server.addr, "/echo").await;
        c.send_frame(true, OpCode::Binary, &i.to_be_bytes()).await;
        clients.push(c);
    }
    assert!(metrics.num_alive_tasks() >= baseline + 1000, "expected a task per connection");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.recv(T).await, Got::Msg(OpCode::Binary, (i as u32).to_be_bytes().to_vec()));
        if i % 2 == 0 {
            // Half close politely, half just vanish.
            c.send_frame(true, OpCode::Close, &1000u16.to_be_bytes()).await;
            assert_eq!(c.recv(T).await, Got::Close(1000, String::new()));
        }
    }
    drop(clients);
    let deadline = Instant::now() + T;
    while metrics.num_alive_tasks() > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.num_alive_tasks(), baseline, "connection tasks left behind");
    server.stop().await;
}
