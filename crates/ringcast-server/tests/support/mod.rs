//! Test harness: the real server on an ephemeral loopback port, and a raw client for breaking rules.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use ringcast_server::{Config, Server};
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{Event, GrowableBuffer, Limits, Reader};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct TestServer {
    pub addr: SocketAddr,
    /// The TCP binary protocol's address, when on (every `--dev` test server has one).
    pub tcp: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    /// What the server's connections share (to look at its state from a test).
    pub ctx: std::sync::Arc<ringcast_server::app::context::Context>,
    pub handle: JoinHandle<Result<(), ringcast_server::ServerError>>,
}

impl TestServer {
    /// Starts a server with `--dev` plus the given flags (key, value).
    pub async fn start(flags: &[(&str, &str)]) -> TestServer {
        let mut all = vec![("dev", "true")];
        all.extend_from_slice(flags);
        Self::launch(None, &all).await
    }

    /// Starts a server from a config file plus flags (no `--dev` unless given).
    pub async fn start_with_file(file: &std::path::Path, flags: &[(&str, &str)]) -> TestServer {
        Self::launch(Some(file), flags).await
    }

    /// Binds on an ephemeral loopback port (with a short close timeout) and runs the server in a task.
    async fn launch(file: Option<&std::path::Path>, flags: &[(&str, &str)]) -> TestServer {
        let mut all: Vec<(String, String)> =
            vec![("listen".into(), "127.0.0.1:0".into()), ("close_timeout".into(), "500ms".into())];
        all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (config, settings) = Config::load(file, |_| None, &all).expect("test config");
        let server = Server::bind(config, settings).expect("bind");
        let addr = server.local_addr().expect("addr");
        let tcp = server.tcp_addr();
        let ctx = server.context().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        TestServer { addr, tcp, stop: Some(tx), ctx, handle }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
    }
}

/// A WebSocket client that speaks raw frames, so tests can send what no library would.
pub struct RawClient {
    pub stream: TcpStream,
    buf: GrowableBuffer,
    reader: Reader,
}

/// What the server sent, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Msg(OpCode, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(u16, String),
    /// The server closed TCP.
    Eof,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Connects to `addr` and upgrades `path` (offering `extensions`, if any): the socket and the response
/// head, read a byte at a time so that nothing after it is consumed. Panics unless it is a complete 101.
pub async fn upgrade_raw(addr: SocketAddr, path: &str, extensions: Option<&str>) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let mut req = Vec::new();
    ringcast_wire::handshake::write_client_request_with(&mut req, &addr.to_string(), path, KEY, &[], extensions);
    stream.write_all(&req).await.expect("send upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read response");
        assert!(n > 0, "server closed during handshake: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let resp = ringcast_wire::handshake::parse_response(&head, KEY.as_bytes()).expect("101 response");
    assert!(resp.is_some(), "incomplete response head");
    (stream, head)
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let (stream, _) = upgrade_raw(addr, path, None).await;
        RawClient {
            stream,
            buf: GrowableBuffer::new(4096, 1 << 24),
            reader: Reader::new(Role::Client, Limits { max_frame_payload: 1 << 24, max_message_size: 1 << 24 }),
        }
    }

    pub async fn send_frame(&mut self, fin: bool, op: OpCode, payload: &[u8]) {
        let mut out = Vec::new();
        encode_client_frame(&mut out, fin, op, payload, [1, 2, 3, 4]);
        self.stream.write_all(&out).await.expect("send frame");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send raw");
    }

    /// The next thing the server sends (or EOF), within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Got {
        tokio::time::timeout(timeout, self.recv_inner()).await.expect("server sent nothing in time")
    }

    async fn recv_inner(&mut self) -> Got {
        use ringcast_wire::ReadBuffer;
        loop {
            match self.reader.next(&mut self.buf) {
                Ok(Some(ev)) => {
                    return match ev {
                        Event::Message { opcode, payload } => Got::Msg(opcode, payload.to_vec()),
                        Event::Ping(p) => Got::Ping(p.to_vec()),
                        Event::Pong(p) => Got::Pong(p.to_vec()),
                        Event::Close { code, reason } => {
                            Got::Close(code.0, String::from_utf8_lossy(reason).into_owned())
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => panic!("server sent an invalid frame: {e}"),
            }
            self.reader.settle(&mut self.buf);
            let (a, _) = self.buf.writable();
            match self.stream.read(a).await {
                Ok(0) | Err(_) => return Got::Eof,
                Ok(n) => self.buf.commit(n),
            }
        }
    }

    /// Expects a close frame with `code`, then the server closing TCP.
    pub async fn expect_close(&mut self, code: u16) {
        match self.recv(Duration::from_secs(5)).await {
            Got::Close(c, reason) => assert_eq!(c, code, "close reason: {reason}"),
            other => panic!("expected close {code}, got {other:?}"),
        }
        // Answer the close, as a well-behaved client does, then the server must drop TCP.
        let mut out = Vec::new();
        encode_client_frame(&mut out, true, OpCode::Close, &code.to_be_bytes(), [9, 9, 9, 9]);
        let _ = self.stream.write_all(&out).await;
        assert_eq!(self.recv(Duration::from_secs(5)).await, Got::Eof);
    }
}

/// Sends a raw HTTP request and returns the response head (up to the blank line, or whatever came
/// before the server closed).
pub async fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&b[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub const STRATEGIES: [&str; 3] = ["pool", "ring", "growable"];

/// A one-shot HTTP/1.1 request over loopback; returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Chunked bodies: keep it simple for JSON replies by stripping chunk-size lines.
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body.lines()
            .filter(|l| !l.is_empty() && u64::from_str_radix(l.trim(), 16).is_err())
            .collect::<Vec<_>>()
            .join("")
    } else {
        body
    };
    (status, body)
}

/// A server API call (`POST /api/METHOD` with `X-API-Key: key`) that must answer 200; returns its JSON.
pub async fn api_json(addr: SocketAddr, key: &str, method: &str, body: &serde_json::Value) -> serde_json::Value {
    let (status, text) =
        http_request(addr, "POST", &format!("/api/{method}"), &[("X-API-Key", key)], &body.to_string()).await;
    assert_eq!(status, 200, "{method}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method}: {e}: {text}"))
}

/// A JSON protocol client over tokio-tungstenite, for the tests of what an SDK sees. What it receives is
/// handed out one object at a time; each test file adds the commands it needs (`call`, `push`, ...) in an
/// `impl JsonClient` of its own.
pub struct JsonClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub next_id: u32,
    /// Pushes and replies received but not yet asked for.
    pub inbox: Vec<Value>,
}

impl JsonClient {
    pub async fn open(server: &TestServer) -> JsonClient {
        let (ws, _) = tokio_tungstenite::connect_async(server.url("/connection/websocket")).await.expect("ws connect");
        JsonClient { ws, next_id: 0, inbox: Vec::new() }
    }

    /// Next JSON object from the server (several may share one frame, separated by newlines); the close
    /// as `{"closed": code}`, a failed stream as `{"error": ...}`. Panics when nothing comes within 5 s.
    pub async fn next(&mut self) -> Value {
        loop {
            if !self.inbox.is_empty() {
                return self.inbox.remove(0);
            }
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await;
            match msg.expect("server sent nothing in time") {
                Some(Ok(Message::Text(t))) => {
                    for line in t.split('\n').filter(|l| !l.trim().is_empty()) {
                        self.inbox.push(serde_json::from_str(line).expect("server sent invalid JSON"));
                    }
                }
                Some(Ok(Message::Close(f))) => return json!({"closed": f.map(|f| u16::from(f.code))}),
                Some(Ok(_)) => {}
                Some(Err(e)) => return json!({"error": e.to_string()}),
                None => return json!({"closed": null}),
            }
        }
    }
}
