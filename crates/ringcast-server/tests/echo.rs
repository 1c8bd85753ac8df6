//! The echo endpoint over real sockets, with an independent client (tokio-tungstenite), on every
//! read-buffer strategy; and the close codes a misbehaving peer gets.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringcast_wire::frame::OpCode;
use support::{Got, RawClient, TestServer, STRATEGIES};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn echoes_text_and_binary_with_their_opcode_on_every_strategy() {
    for strategy in STRATEGIES {
        let server =
            TestServer::start(&[("read_buffer", strategy), ("ring_buffer_size", "256"), ("pool_buffer_size", "256")])
                .await;
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.expect("connect");
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let msgs = vec![
            Message::Text("hello".into()),
            Message::Binary(vec![0, 1, 2, 255]),
            Message::Text("κόσμε ".repeat(300)),
            Message::Binary(big.clone()),
            Message::Text(String::new()),
        ];
        for m in &msgs {
            ws.send(m.clone()).await.expect("send");
        }
        for m in &msgs {
            let got = tokio::time::timeout(T, ws.next()).await.expect("reply in time").expect("open").expect("ok");
            assert_eq!(&got, m, "strategy {strategy}");
        }
        ws.close(None).await.expect("close");
        server.stop().await;
    }
}

#[tokio::test]
async fn many_glued_messages_come_back_in_order() {
    for strategy in STRATEGIES {
        let server = TestServer::start(&[("read_buffer", strategy), ("ring_buffer_size", "256")]).await;
        let mut c = RawClient::connect(server.addr, "/echo").await;
        let mut burst = Vec::new();
        for i in 0..500u32 {
            ringcast_wire::frame::encode_client_frame(&mut burst, true, OpCode::Binary, &i.to_be_bytes(), [7, 7, 7, 7]);
        }
        c.send_raw(&burst).await;
        for i in 0..500u32 {
            assert_eq!(c.recv(T).await, Got::Msg(OpCode::Binary, i.to_be_bytes().to_vec()), "strategy {strategy}");
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn ping_gets_a_pong_with_the_same_payload() {
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_frame(true, OpCode::Ping, b"are you there").await;
    assert_eq!(c.recv(T).await, Got::Pong(b"are you there".to_vec()));
    // An unsolicited pong is ignored: the next thing back is the echo.
    c.send_frame(true, OpCode::Pong, b"unsolicited").await;
    c.send_frame(true, OpCode::Text, b"after").await;
    assert_eq!(c.recv(T).await, Got::Msg(OpCode::Text, b"after".to_vec()));
    server.stop().await;
}

#[tokio::test]
async fn close_is_answered_with_the_same_code_then_tcp_closes() {
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_frame(true, OpCode::Close, &[0x0f, 0xa0, b'o', b'k']).await; // 4000
    assert_eq!(c.recv(T).await, Got::Close(4000, String::new()));
    assert_eq!(c.recv(T).await, Got::Eof);
    server.stop().await;
}

#[tokio::test]
async fn unmasked_client_frame_closes_1002() {
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_raw(b"\x81\x05hello").await;
    c.expect_close(1002).await;
    server.stop().await;
}

#[tokio::test]
async fn reserved_opcode_closes_1002() {
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_raw(&[0x83, 0x80, 0, 0, 0, 0]).await;
    c.expect_close(1002).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_1007_after_echoing_what_came_before() {
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_frame(true, OpCode::Text, b"fine").await;
    c.send_frame(true, OpCode::Text, &[b'a', 0xc0, 0xaf]).await;
    assert_eq!(c.recv(T).await, Got::Msg(OpCode::Text, b"fine".to_vec()));
    c.expect_close(1007).await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_1009_before_its_payload_arrives() {
    let server = TestServer::start(&[("max_message_size", "1000"), ("max_frame_size", "1000")]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    // Header announcing 2000 bytes, and no payload at all.
    c.send_raw(&[0x82, 0x80 | 126, 0x07, 0xd0, 1, 2, 3, 4]).await;
    c.expect_close(1009).await;
    server.stop().await;
}

#[tokio::test]
async fn one_bad_connection_does_not_disturb_the_others() {
    let server = TestServer::start(&[]).await;
    let (mut good, _) = tokio_tungstenite::connect_async(server.url("/echo")).await.expect("connect");
    let mut bad = RawClient::connect(server.addr, "/echo").await;
    bad.send_raw(b"\x81\x05hello").await;
    bad.expect_close(1002).await;
    good.send(Message::Text("still here".into())).await.expect("send");
    let got = tokio::time::timeout(T, good.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(got, Message::Text("still here".into()));
    server.stop().await;
}

#[tokio::test]
async fn tungstenite_sees_1002_for_a_fragmented_ping() {
    // A control frame with FIN clear: the independent client must see our close code.
    let server = TestServer::start(&[]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    c.send_frame(false, OpCode::Ping, b"x").await;
    c.expect_close(TCloseCode::Protocol.into()).await;
    server.stop().await;
}

#[tokio::test]
async fn echo_path_can_be_the_root_for_load_tools() {
    let server = TestServer::start(&[("echo_path", "/")]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("/")).await.expect("connect at /");
    ws.send(Message::Binary(vec![42; 20])).await.expect("send");
    let got = tokio::time::timeout(T, ws.next()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(got, Message::Binary(vec![42; 20]));
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_gets_backpressure_not_data_loss() {
    // The client writes 4 MiB of echo requests without reading; the server must stop reading while its
    // queue is over the limit, and deliver every echo once the client reads.
    let server = TestServer::start(&[("client_queue_max_size", "65536")]).await;
    let mut c = RawClient::connect(server.addr, "/echo").await;
    let payload = vec![0x5a; 4096];
    let mut burst = Vec::new();
    for _ in 0..1024 {
        ringcast_wire::frame::encode_client_frame(&mut burst, true, OpCode::Binary, &payload, [3, 1, 4, 1]);
    }
    let (mut rd, mut wr) = c.stream.split();
    let writer = async {
        use tokio::io::AsyncWriteExt;
        wr.write_all(&burst).await.expect("write burst");
    };
    let reader = async {
        use tokio::io::AsyncReadExt;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut total = 0usize;
        let expect = 1024 * (4 + 4096);
        let mut b = vec![0u8; 65536];
        while total < expect {
            let n = tokio::time::timeout(T, rd.read(&mut b)).await.expect("in time").expect("read");
            assert!(n > 0, "server closed early after {total} bytes");
            total += n;
        }
        total
    };
    let ((), total) = tokio::join!(writer, reader);
    assert_eq!(total, 1024 * (4 + 4096));
    server.stop().await;
}
