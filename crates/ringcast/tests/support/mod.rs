//! Harness for tests that run the real `ringcast` binary (its allocator, its runtime, its RSS): start
//! it on a free loopback port, talk HTTP and WebSocket to it, read its memory from /proc.
#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// What a JSON-protocol client reads next: replies and pushes (one JSON object per line of a frame), or
/// the close.
pub enum Got {
    Json(Vec<Value>),
    Closed(Option<(u16, String)>),
}

/// The next text frame's objects, or the close: `Closed(None)` when the stream fails or ends without a
/// close frame, or no frame arrives within `timeout` (counted afresh after each skipped ping or pong).
pub async fn next_within<S>(ws: &mut WebSocketStream<S>, timeout: Duration) -> Got
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Json(
                    t.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect(),
                )
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Got::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())))
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return Got::Closed(None),
        }
    }
}

/// Spawns `command` (a `ringcast serve ...`, plain text log) with its standard output, the log,
/// collected line by line into the returned string as it comes; standard error stays the test's.
pub fn spawn_logged(mut command: Command) -> (Child, Arc<Mutex<String>>) {
    let mut child = command
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringcast");
    let log = Arc::new(Mutex::new(String::new()));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    (child, log)
}

/// A `ringcast serve` process, killed when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `ringcast serve --listen 127.0.0.1:PORT ARGS...` and waits until it accepts.
    pub fn start(args: &[&str]) -> ServerProcess {
        // A port the kernel just gave out and took back: free unless another process races for it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = std::env::temp_dir().join(format!("ringcast-test-server-{port}.log"));
        let log = std::fs::File::create(&log).expect("server log");
        // RINGCAST_SERVER_BIN: another build of the server (a release one, for BENCHMARKS.md's figures).
        let exe = std::env::var_os("RINGCAST_SERVER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ringcast").into());
        let child = Command::new(exe)
            .args(["serve", "--listen", &addr.to_string(), "--log-level", "info"])
            .args(args)
            .stdout(log.try_clone().map_or(Stdio::null(), Stdio::from))
            .stderr(log)
            .spawn()
            .expect("spawn ringcast serve");
        let mut server = ServerProcess { child, addr };
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("ringcast serve exited at start: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = server.child.kill();
        panic!("ringcast serve did not listen on {addr}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A line of /proc/PID/status in bytes (`VmRSS`, `VmHWM`: the peak).
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        let line = status.lines().find(|l| l.starts_with(field)).expect("field in /proc status");
        let kb: u64 = line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().expect("kB value");
        kb * 1024
    }

    /// Still running (no panic, no abort)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGINT (graceful shutdown) and the exit status; killed if it takes longer than `wait`.
    pub fn stop(mut self, wait: Duration) -> Option<i32> {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let steps = (wait.as_millis() / 50).max(1);
        for _ in 0..steps {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 request (`Connection: close`): (status, body).
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
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
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

/// A counter or gauge from /metrics (`series` with its labels, e.g. `x_total{reason="memory"}`); 0
/// when absent.
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (status, body) = http_request(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200, "/metrics");
    let prefix = format!("{series} ");
    body.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse().expect("metric value"))
}

/// How an upgrade request was answered.
pub enum Answer {
    Upgraded(Box<Ws>),
    /// Not 101: the status and the `Retry-After` header, if any.
    Refused(u16, Option<String>),
    /// No HTTP answer at all (reset, timeout): never expected from ringcast.
    Failed(String),
}

/// One upgrade request to the client endpoint. `recv_buffer`: a small SO_RCVBUF for a client that
/// will not read, so that what it does not read piles up in the server, not in this kernel.
pub async fn upgrade(addr: SocketAddr, recv_buffer: Option<u32>) -> Answer {
    let socket = match TcpSocket::new_v4() {
        Ok(s) => s,
        Err(e) => return Answer::Failed(format!("socket: {e}")),
    };
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    upgrade_on(socket, addr, Duration::from_secs(30)).await
}

/// One upgrade request to the client endpoint over `socket` (bound or sized by the caller), the
/// handshake bounded by `timeout`.
pub async fn upgrade_on(socket: TcpSocket, addr: SocketAddr, timeout: Duration) -> Answer {
    let stream = match socket.connect(addr).await {
        Ok(s) => s,
        Err(e) => return Answer::Failed(format!("connect: {e}")),
    };
    let url = format!("ws://{addr}/connection/websocket");
    match tokio::time::timeout(timeout, tokio_tungstenite::client_async(url, stream)).await {
        Err(_) => Answer::Failed("handshake timed out".into()),
        Ok(Ok((ws, _))) => Answer::Upgraded(Box::new(ws)),
        Ok(Err(WsError::Http(resp))) => Answer::Refused(
            resp.status().as_u16(),
            resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string),
        ),
        Ok(Err(e)) => Answer::Failed(e.to_string()),
    }
}
