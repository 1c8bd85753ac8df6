//! The admin dashboard over real sockets: off unless configured, refused without a login or with a
//! wrong password, served on the internal listener when there is one, and its WebSocket feed
//! (ringcast's own codec, handed over by hyper) carrying snapshots that reflect real subscriptions.
//! The browser side (login form, charts under `ringcast bench`) is tests/admin-ui, run by test.sh.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use ringcast_server::{Config, Server};
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{Event, GrowableBuffer, Limits, ReadBuffer, Reader};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "open sesame";
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    internal: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), ringcast_server::ServerError>>,
}

impl Running {
    async fn start(flags: &[(&str, &str)]) -> Running {
        let mut all: Vec<(String, String)> =
            vec![("listen".into(), "127.0.0.1:0".into()), ("close_timeout".into(), "500ms".into())];
        all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (config, settings) = Config::load(None, |_| None, &all).expect("test config");
        let server = Server::bind(config, settings).expect("bind");
        let addr = server.local_addr().expect("addr");
        let internal = server.internal_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Running { addr, internal, stop: Some(tx), handle }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
    }
}

/// One HTTP/1.1 request (Connection: close); the whole response as text.
async fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await.expect("response in time").expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> u16 {
    response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn login(addr: SocketAddr, password: &str) -> String {
    let body = format!("password={}", password.replace(' ', "+"));
    exchange(addr, "POST", "/admin/login", &[("Content-Type", "application/x-www-form-urlencoded")], &body).await
}

/// Logs in and returns the `Cookie` header value to send.
async fn session_cookie(addr: SocketAddr) -> String {
    let response = login(addr, PASSWORD).await;
    assert_eq!(status(&response), 303, "{response}");
    let set = header(&response, "set-cookie").expect("a session cookie");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().expect("name=value").to_string()
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Opens `/admin/ws` with these extra headers; the response head, and the stream if it was a 101.
async fn open_feed(addr: SocketAddr, headers: &[(&str, &str)]) -> (String, Option<TcpStream>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "GET /admin/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("send upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await.expect("response in time") {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if status(&head) != 101 {
        return (head, None);
    }
    let parsed = ringcast_wire::handshake::parse_response(head.as_bytes(), WS_KEY.as_bytes());
    assert!(matches!(parsed, Ok(Some(_))), "a valid 101: {head}");
    (head, Some(stream))
}

/// Reads server frames until a text message arrives; returns it as JSON.
async fn next_snapshot(stream: &mut TcpStream, buf: &mut GrowableBuffer, reader: &mut Reader) -> Value {
    let read = async {
        loop {
            match reader.next(buf) {
                Ok(Some(Event::Message { opcode: OpCode::Text, payload })) => {
                    return serde_json::from_slice::<Value>(&payload.to_vec()).expect("JSON snapshot");
                }
                Ok(Some(other)) => panic!("unexpected frame {other:?}"),
                Ok(None) => {}
                Err(e) => panic!("invalid frame from the dashboard feed: {e}"),
            }
            reader.settle(buf);
            let (a, _) = buf.writable();
            let n = stream.read(a).await.expect("read");
            assert!(n > 0, "feed closed");
            buf.commit(n);
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("a snapshot in time")
}

#[tokio::test]
async fn admin_is_off_unless_configured() {
    let server = Running::start(&[("allow_anonymous", "true")]).await;
    for path in ["/admin", "/admin/snapshot", "/admin/dashboard.js"] {
        let r = exchange(server.addr, "GET", path, &[], "").await;
        assert_eq!(status(&r), 404, "{path}: {r}");
    }
    assert_eq!(status(&login(server.addr, PASSWORD).await), 404);
    let (head, stream) = open_feed(server.addr, &[]).await;
    assert!(stream.is_none() && status(&head) == 404, "{head}");
    server.stop().await;
}

#[tokio::test]
async fn admin_without_a_login_gets_the_form_and_nothing_else() {
    let server = Running::start(&[("admin", "true"), ("admin_password", PASSWORD)]).await;
    let page = exchange(server.addr, "GET", "/admin", &[], "").await;
    assert_eq!(status(&page), 200);
    assert!(page.contains(r#"name="password""#) && !page.contains("dashboard.js"), "the login form: {page}");
    assert_eq!(status(&exchange(server.addr, "GET", "/admin/snapshot", &[], "").await), 401);
    let (head, stream) = open_feed(server.addr, &[]).await;
    assert!(stream.is_none() && status(&head) == 401, "no feed without a session: {head}");
    // A forged or tampered token is no session either.
    let forged = [("Cookie", "ringcast_admin=99999999999.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")];
    assert_eq!(status(&exchange(server.addr, "GET", "/admin/snapshot", &forged, "").await), 401);
    let cookie = session_cookie(server.addr).await;
    let tampered = format!("{}0", cookie);
    assert_eq!(status(&exchange(server.addr, "GET", "/admin/snapshot", &[("Cookie", &tampered)], "").await), 401);
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_the_right_one_opens_the_dashboard() {
    let server = Running::start(&[("admin", "true"), ("admin_password", PASSWORD)]).await;
    for wrong in ["", "open", "open sesame!", "OPEN SESAME"] {
        let r = login(server.addr, wrong).await;
        assert_eq!(status(&r), 401, "{wrong:?}: {r}");
        assert!(header(&r, "set-cookie").is_none(), "no session for a wrong password");
        assert!(r.contains("Wrong password"), "{r}");
    }
    let cookie = session_cookie(server.addr).await;
    let page = exchange(server.addr, "GET", "/admin", &[("Cookie", &cookie)], "").await;
    assert_eq!(status(&page), 200);
    assert!(page.contains("/admin/dashboard.js"), "the dashboard: {page}");
    let token = cookie.split_once('=').expect("name=value").1.to_string();
    let by_header = [("Authorization", format!("token {token}"))];
    let by_header: Vec<(&str, &str)> = by_header.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = exchange(server.addr, "GET", "/admin/snapshot", &by_header, "").await;
    assert_eq!(status(&r), 200, "an admin token works as the cookie does: {r}");
    let body = r.split_once("\r\n\r\n").expect("body").1;
    let snapshot: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(snapshot["engine"]["kind"], "memory");
    assert!(snapshot["process"]["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{snapshot}");
    server.stop().await;
}

#[tokio::test]
async fn password_guessing_is_rate_limited() {
    let server = Running::start(&[("admin", "true"), ("admin_password", PASSWORD)]).await;
    // Ten attempts at once, then 429 for right and wrong passwords alike (one more every 6 s).
    for i in 0..10 {
        assert_eq!(status(&login(server.addr, "guess").await), 401, "attempt {i}");
    }
    let r = login(server.addr, "guess").await;
    assert_eq!(status(&r), 429, "{r}");
    assert!(header(&r, "retry-after").is_some(), "{r}");
    assert_eq!(status(&login(server.addr, PASSWORD).await), 429, "the limit is spent, whatever the password");
    server.stop().await;
}

#[tokio::test]
async fn on_the_internal_listener_when_there_is_one() {
    let server = Running::start(&[
        ("admin", "true"),
        ("admin_password", PASSWORD),
        ("internal_listen", "127.0.0.1:0"),
        ("allow_anonymous", "true"),
    ])
    .await;
    let internal = server.internal.expect("internal listener");
    assert_eq!(status(&exchange(server.addr, "GET", "/admin", &[], "").await), 404, "not on the public port");
    assert_eq!(status(&login(server.addr, PASSWORD).await), 404);
    let (head, _) = open_feed(server.addr, &[]).await;
    assert_eq!(status(&head), 404, "{head}");
    let cookie = session_cookie(internal).await;
    let (head, stream) = open_feed(internal, &[("Cookie", &cookie)]).await;
    let mut stream = stream.unwrap_or_else(|| panic!("feed on the internal listener: {head}"));
    let mut buf = GrowableBuffer::new(4096, 1 << 20);
    let mut reader = Reader::new(Role::Client, Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 });
    let s = next_snapshot(&mut stream, &mut buf, &mut reader).await;
    assert!(s["connections"]["websocket"].is_number(), "{s}");
    server.stop().await;
}

/// A client-protocol client subscribed to `channel` (JSON protocol, anonymous).
async fn subscriber(addr: SocketAddr, channel: &str) -> support::RawClient {
    let mut c = support::RawClient::connect(addr, "/connection/websocket").await;
    let cmds = format!("{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"{channel}\"}}}}");
    c.send_frame(true, OpCode::Text, cmds.as_bytes()).await;
    match c.recv(WAIT).await {
        support::Got::Msg(_, m) => {
            let text = String::from_utf8_lossy(&m).into_owned();
            assert!(text.contains("\"id\":2") || text.contains("\"id\":1"), "{text}");
        }
        other => panic!("connect reply expected, got {other:?}"),
    }
    c
}

#[tokio::test]
async fn the_feed_on_the_main_listener_shows_the_busiest_channels_and_goes_away_on_shutdown() {
    // --dev turns the dashboard on; the password is given so the test can log in.
    let server = Running::start(&[("dev", "true"), ("admin_password", PASSWORD), ("tcp_listen", "off")]).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(subscriber(server.addr, "admin-test-busy").await);
    }
    clients.push(subscriber(server.addr, "admin-test-quiet").await);
    let cookie = session_cookie(server.addr).await;
    // Another site's page cannot open the feed with the cookie.
    let (head, stream) = open_feed(server.addr, &[("Cookie", &cookie), ("Origin", "http://evil.example")]).await;
    assert!(stream.is_none() && status(&head) == 403, "{head}");
    let origin = format!("http://{}", server.addr);
    let (head, stream) = open_feed(server.addr, &[("Cookie", &cookie), ("Origin", &origin)]).await;
    let mut stream = stream.unwrap_or_else(|| panic!("same-origin feed: {head}"));
    let mut buf = GrowableBuffer::new(4096, 1 << 20);
    let mut reader = Reader::new(Role::Client, Limits { max_frame_payload: 1 << 20, max_message_size: 1 << 20 });
    // Subscriptions settle within a snapshot or two; bounded by the count of snapshots read.
    let mut found = None;
    for _ in 0..5 {
        let s = next_snapshot(&mut stream, &mut buf, &mut reader).await;
        let top = s["channels"]["top"].as_array().cloned().unwrap_or_default();
        let busy = top.iter().position(|t| t["channel"] == "admin-test-busy");
        let quiet = top.iter().position(|t| t["channel"] == "admin-test-quiet");
        if let (Some(b), Some(q)) = (busy, quiet) {
            found = Some((s.clone(), b, q, top[b]["subscribers"].clone()));
            break;
        }
    }
    let (s, busy, quiet, n) = found.expect("both channels in the top list within 5 snapshots");
    assert!(busy < quiet, "ranked by subscribers: {s}");
    assert_eq!(n, 3, "{s}");
    assert!(s["connections"]["websocket"].as_f64().is_some_and(|c| c >= 4.0), "{s}");
    // A ping is answered; then shutdown closes the feed with 1001.
    let mut ping = Vec::new();
    encode_client_frame(&mut ping, true, OpCode::Ping, b"p", [1, 2, 3, 4]);
    stream.write_all(&ping).await.expect("ping");
    server.stop().await;
    let closed = async {
        loop {
            match reader.next(&mut buf) {
                Ok(Some(Event::Close { code, .. })) => return code.0,
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("{e}"),
            }
            reader.settle(&mut buf);
            let (a, _) = buf.writable();
            let n = stream.read(a).await.expect("read");
            assert!(n > 0, "EOF before a close frame");
            buf.commit(n);
        }
    };
    assert_eq!(tokio::time::timeout(WAIT, closed).await.expect("closed in time"), 1001);
    drop(clients);
}
