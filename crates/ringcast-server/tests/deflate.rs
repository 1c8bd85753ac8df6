//! permessage-deflate through the real server, over loopback sockets: what the upgrade answers, the
//! echo endpoint compressing (with and without server context takeover, on every read-buffer strategy),
//! client-protocol replies and publications compressed, and the inflate cap (1009).
//!
//! The client side is ours (`ringcast_wire` in the client role), fed the raw frames read from the
//! socket, so each test sees RSV1 on every frame as well as what it decodes to.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ringcast_wire::buffer::{fill_from, GrowableBuffer};
use ringcast_wire::deflate::compressed_frame;
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{DeflateParams, Event, Limits, Reader};
use support::{TestServer, KEY, STRATEGIES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// What browsers offer.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A message as the server sent it: RSV1 (compressed?), opcode, and the decoded payload.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    compressed: bool,
    opcode: u8,
    /// Size of the frame on the wire.
    wire_len: usize,
    payload: Vec<u8>,
}

struct DeflateClient {
    stream: TcpStream,
    /// The response's Sec-WebSocket-Extensions value, if any.
    extensions: Option<String>,
    params: Option<DeflateParams>,
    /// Decodes what the server sends, as a client that negotiated `params` (keeps its window when the
    /// server has context takeover).
    reader: Reader,
    buf: GrowableBuffer,
}

impl DeflateClient {
    async fn connect(addr: SocketAddr, path: &str, offer: Option<&str>) -> DeflateClient {
        let (stream, head) = support::upgrade_raw(addr, path, offer).await;
        let resp =
            ringcast_wire::handshake::parse_response(&head, KEY.as_bytes()).expect("101 response").expect("complete");
        let text = String::from_utf8_lossy(&head).into_owned();
        let extensions = text.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_string())
        });
        let mut reader = Reader::new(Role::Client, Limits { max_frame_payload: 1 << 26, max_message_size: 1 << 26 });
        if let Some(p) = &resp.deflate {
            reader.enable_deflate(p);
        }
        DeflateClient { stream, extensions, params: resp.deflate, reader, buf: GrowableBuffer::new(4096, 1 << 26) }
    }

    /// Sends one message, compressed (RSV1 set) or not.
    async fn send(&mut self, opcode: OpCode, payload: &[u8], compress: bool) {
        let mut out = Vec::new();
        if compress {
            let frame = compressed_frame(opcode, payload, 6, 15);
            let (b0, body) = split_frame(&frame);
            assert_eq!(b0 & 0x40, 0x40);
            encode_client_frame(&mut out, true, opcode, body, [5, 6, 7, 8]);
            out[0] |= 0x40;
        } else {
            encode_client_frame(&mut out, true, opcode, payload, [5, 6, 7, 8]);
        }
        self.stream.write_all(&out).await.expect("send");
    }

    /// The next frame from the server, decoded.
    async fn recv(&mut self) -> Frame {
        tokio::time::timeout(T, self.recv_inner()).await.expect("server sent nothing in time")
    }

    async fn recv_inner(&mut self) -> Frame {
        let mut hdr = [0u8; 2];
        self.stream.read_exact(&mut hdr).await.expect("frame header");
        let mut raw = hdr.to_vec();
        assert_eq!(hdr[1] & 0x80, 0, "server frames are unmasked");
        let len = match hdr[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.stream.read_exact(&mut l).await.expect("length");
                raw.extend_from_slice(&l);
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                self.stream.read_exact(&mut l).await.expect("length");
                raw.extend_from_slice(&l);
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let start = raw.len();
        raw.resize(start + len as usize, 0);
        self.stream.read_exact(&mut raw[start..]).await.expect("payload");
        // Decode it as a client of this connection would.
        self.reader.settle(&mut self.buf);
        let n = fill_from(&mut self.buf, &raw);
        assert_eq!(n, raw.len());
        let payload = match self.reader.next(&mut self.buf).expect("a valid frame from the server") {
            Some(Event::Message { payload, .. }) => payload.to_vec(),
            Some(Event::Close { code, .. }) => code.0.to_be_bytes().to_vec(),
            Some(Event::Ping(p) | Event::Pong(p)) => p.to_vec(),
            None => panic!("one whole frame did not make an event"),
        };
        Frame { compressed: hdr[0] & 0x40 != 0, opcode: hdr[0] & 0x0f, wire_len: raw.len(), payload }
    }

    /// Expects a close frame with `code`.
    async fn expect_close(&mut self, code: u16) {
        let f = self.recv().await;
        assert_eq!(f.opcode, 8, "expected close {code}, got {f:?}");
        assert_eq!(&f.payload[..2], &code.to_be_bytes(), "close code");
    }
}

/// (first header byte, payload) of one unmasked frame.
fn split_frame(frame: &[u8]) -> (u8, &[u8]) {
    let (len, at) = match frame[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes")) as usize, 10),
        n => (usize::from(n), 2),
    };
    (frame[0], &frame[at..at + len])
}

fn json(n: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = seed;
    while out.len() < n {
        out.extend_from_slice(
            format!("{{\"channel\":\"news:{}\",\"offset\":{},\"text\":\"hello\"}}", i % 7, i).as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

#[tokio::test]
async fn negotiation_answers_the_parameters_in_force() {
    let server = TestServer::start(&[("compression", "true")]).await;
    let c = DeflateClient::connect(server.addr, "/echo", Some(BROWSER_OFFER)).await;
    let value = c.extensions.as_deref().expect("extension accepted");
    // Our defaults: neither side keeps a context, and the client's window is answered as offered.
    assert!(value.starts_with("permessage-deflate"), "{value}");
    assert!(value.contains("server_no_context_takeover"), "{value}");
    assert!(value.contains("client_no_context_takeover"), "{value}");
    let p = c.params.expect("params parsed by the client");
    assert!(p.server_no_context_takeover() && p.client_no_context_takeover());

    // The first acceptable offer wins; a malformed one is declined, never a failed handshake.
    let c = DeflateClient::connect(
        server.addr,
        "/echo",
        Some("permessage-deflate; server_max_window_bits=7, permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    let value = c.extensions.as_deref().expect("second offer accepted");
    assert!(value.contains("server_max_window_bits=10"), "{value}");
    let c = DeflateClient::connect(server.addr, "/echo", Some("permessage-deflate; bogus_param")).await;
    assert_eq!(c.extensions, None, "no acceptable offer: no extension, and still a 101");
    let c = DeflateClient::connect(server.addr, "/echo", Some("x-webkit-deflate-frame")).await;
    assert_eq!(c.extensions, None);
    server.stop().await;

    // Off (the default): every offer is ignored.
    let server = TestServer::start(&[]).await;
    let c = DeflateClient::connect(server.addr, "/echo", Some(BROWSER_OFFER)).await;
    assert_eq!(c.extensions, None);
    server.stop().await;
}

#[tokio::test]
async fn the_client_protocol_never_gets_server_context_takeover() {
    let server = TestServer::start(&[("compression", "true"), ("compression_context_takeover", "true")]).await;
    let echo = DeflateClient::connect(server.addr, "/echo", Some("permessage-deflate")).await;
    let value = echo.extensions.as_deref().expect("accepted");
    assert!(!value.contains("server_no_context_takeover"), "echo gets what is configured: {value}");
    let client = DeflateClient::connect(server.addr, "/connection/websocket", Some("permessage-deflate")).await;
    let value = client.extensions.as_deref().expect("accepted");
    assert!(value.contains("server_no_context_takeover"), "publications are shared: {value}");
    server.stop().await;
}

#[tokio::test]
async fn echo_is_compressed_both_ways_on_every_strategy() {
    for strategy in STRATEGIES {
        let server = TestServer::start(&[
            ("compression", "true"),
            ("read_buffer", strategy),
            ("ring_buffer_size", "256"),
            ("pool_buffer_size", "256"),
        ])
        .await;
        let mut c = DeflateClient::connect(server.addr, "/echo", Some(BROWSER_OFFER)).await;
        let big = json(20_000, 1);
        // Compressed in, compressed out (a frame larger than the small buffers: streamed and inflated).
        c.send(OpCode::Text, &big, true).await;
        let f = c.recv().await;
        assert_eq!((f.compressed, f.opcode), (true, 1), "strategy {strategy}");
        assert_eq!(f.payload, big, "strategy {strategy}");
        assert!(f.wire_len < big.len() / 3, "compressed: {} of {}", f.wire_len, big.len());
        // Uncompressed in: the server still compresses its echo.
        c.send(OpCode::Binary, &big, false).await;
        let f = c.recv().await;
        assert_eq!((f.compressed, f.opcode, &f.payload), (true, 2, &big), "strategy {strategy}");
        // Below compression_min_size (64): plain, RSV1 clear, even when the client compressed it.
        c.send(OpCode::Text, b"short", true).await;
        let f = c.recv().await;
        assert_eq!((f.compressed, &f.payload[..]), (false, &b"short"[..]), "strategy {strategy}");
        // Control frames are never compressed.
        let mut ping = Vec::new();
        encode_client_frame(&mut ping, true, OpCode::Ping, &big[..100], [1, 1, 1, 1]);
        c.stream.write_all(&ping).await.expect("ping");
        let f = c.recv().await;
        assert_eq!((f.compressed, f.opcode, &f.payload[..]), (false, 0xA, &big[..100]), "strategy {strategy}");
        server.stop().await;
    }
}

#[tokio::test]
async fn compress_plain_compress_with_context_takeover_decodes_all_three() {
    // With server context takeover the client inflates with the window of everything compressed before.
    // The middle message is below compression_min_size and goes out plain: it must not have entered the
    // server's compressor, or the third message would refer to bytes the client never inflated (our
    // client's inflater would then fail, or decode something else).
    let server = TestServer::start(&[
        ("compression", "true"),
        ("compression_context_takeover", "true"),
        ("compression_min_size", "64"),
    ])
    .await;
    let mut c = DeflateClient::connect(server.addr, "/echo", Some("permessage-deflate")).await;
    let p = c.params.expect("negotiated");
    assert!(!p.server_no_context_takeover(), "context takeover in force");
    let first = json(600, 0);
    let small = b"{\"channel\":\"news:3\"}".to_vec();
    let mut third = small.clone();
    third.extend_from_slice(&small);
    third.extend_from_slice(&json(300, 0));
    let mut got = Vec::new();
    for m in [&first, &small, &third] {
        c.send(OpCode::Text, m, false).await;
        got.push(c.recv().await);
    }
    assert_eq!(got.iter().map(|f| f.compressed).collect::<Vec<_>>(), [true, false, true]);
    assert_eq!(got[0].payload, first);
    assert_eq!(got[1].payload, small);
    assert_eq!(got[2].payload, third);
    // The takeover is real: the third message costs less than it does compressed alone.
    let alone = compressed_frame(OpCode::Text, &third, 6, 15);
    assert!(got[2].wire_len < alone.len(), "{} vs {} alone", got[2].wire_len, alone.len());
    server.stop().await;
}

#[tokio::test]
async fn inflated_size_past_the_limit_closes_1009() {
    for strategy in STRATEGIES {
        let server =
            TestServer::start(&[("compression", "true"), ("read_buffer", strategy), ("max_message_size", "1048576")])
                .await;
        let mut c = DeflateClient::connect(server.addr, "/echo", Some(BROWSER_OFFER)).await;
        // ~16 KiB on the wire (far below every limit), 16 MiB inflated.
        c.send(OpCode::Binary, &vec![0u8; 16 << 20], true).await;
        c.expect_close(1009).await;
        server.stop().await;
    }
}

/// Reads frames until one carries `needle`.
async fn recv_until(c: &mut DeflateClient, needle: &str) -> Frame {
    loop {
        let f = c.recv().await;
        if String::from_utf8_lossy(&f.payload).contains(needle) {
            return f;
        }
    }
}

#[tokio::test]
async fn client_protocol_replies_and_publications_are_compressed() {
    let server = TestServer::start(&[("compression", "true")]).await;
    let url = "/connection/websocket";
    let mut compressed = DeflateClient::connect(server.addr, url, Some(BROWSER_OFFER)).await;
    let mut small_window =
        DeflateClient::connect(server.addr, url, Some("permessage-deflate; server_max_window_bits=10")).await;
    let mut plain = DeflateClient::connect(server.addr, url, None).await;
    assert!(compressed.params.is_some() && small_window.params.is_some() && plain.params.is_none());
    for c in [&mut compressed, &mut small_window, &mut plain] {
        let negotiated = c.params.is_some();
        c.send(OpCode::Text, br#"{"id":1,"connect":{}}"#, negotiated).await;
        // The connect reply (~100 bytes) is compressed by the connection's own deflater when negotiated.
        let reply = recv_until(c, r#""client":""#).await;
        assert_eq!(reply.compressed, negotiated, "{:?}", String::from_utf8_lossy(&reply.payload));
        c.send(OpCode::Text, br#"{"id":2,"subscribe":{"channel":"news"}}"#, false).await;
        recv_until(c, r#""id":2"#).await;
    }
    let text = String::from_utf8(json(1500, 9)).expect("ascii");
    let publish =
        format!(r#"{{"id":3,"publish":{{"channel":"news","data":{{"text":"{}"}}}}}}"#, text.replace('"', "'"));
    plain.send(OpCode::Text, publish.as_bytes(), false).await;
    let needle = &text.replace('"', "'")[..200];
    // The compress-once frame (RSV1), the one a smaller window cannot share (plain), and plain.
    let f = recv_until(&mut compressed, needle).await;
    assert!(f.compressed && f.wire_len < 1000, "{} bytes, compressed: {}", f.wire_len, f.compressed);
    let f = recv_until(&mut small_window, needle).await;
    assert!(!f.compressed, "a frame made with a 15-bit window is not sent to a 10-bit client");
    let f = recv_until(&mut plain, needle).await;
    assert!(!f.compressed);
    server.stop().await;
}
