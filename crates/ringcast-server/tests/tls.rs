//! TLS on the public listener (`tls_cert`/`tls_key`), over real sockets, with certificates made here
//! (rcgen): wss:// and https:// on one port, plain HTTP refused, a stalled handshake timed out, and the
//! certificate reloaded (a bad file keeps the old one). SIGHUP itself is tested on the binary
//! (crates/ringcast/tests/tls.rs); the SDKs over wss in tests/sdk-python and tests/sdk-js.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringcast_server::app::tls::Tls;
use ringcast_server::{Config, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const T: Duration = Duration::from_secs(10);
const API_KEY: &str = "tls-test-key";

/// A CA and leaf certificates it signs for localhost / 127.0.0.1, as PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ringcast-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "ringcast test CA");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
        Pki { dir, ca, ca_key }
    }

    /// A new leaf (common name `cn`) written to cert.pem / key.pem; returns its DER.
    fn issue(&self, cn: &str) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("leaf cert");
        std::fs::write(self.cert(), cert.pem()).expect("write cert");
        std::fs::write(self.key(), key.serialize_pem()).expect("write key");
        cert.der().to_vec()
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn client(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("trust the test CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Running {
    addr: SocketAddr,
    tls: Arc<Tls>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), ringcast_server::ServerError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
    }
}

async fn start(pki: &Pki, flags: &[(&str, &str)]) -> Running {
    let cert = pki.cert().display().to_string();
    let key = pki.key().display().to_string();
    let mut all: Vec<(String, String)> = vec![
        ("dev".into(), "true".into()),
        ("listen".into(), "127.0.0.1:0".into()),
        ("tcp_listen".into(), "off".into()),
        ("close_timeout".into(), "500ms".into()),
        ("api_key".into(), API_KEY.into()),
        ("tls_cert".into(), cert),
        ("tls_key".into(), key),
    ];
    all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (config, settings) = Config::load(None, |_| None, &all).expect("test config");
    let server = Server::bind(config, settings).expect("bind");
    let addr = server.local_addr().expect("addr");
    let tls = server.tls().expect("TLS is on");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running { addr, tls, stop: Some(tx), handle }
}

type TlsTcp = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsTcp {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(T, connector.connect(name, tcp)).await.expect("handshake in time").expect("TLS handshake")
}

/// The end-entity certificate the server presented.
fn presented(stream: &TlsTcp) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).expect("server certificate")
}

/// One HTTPS request (`Connection: close`); returns (status, body).
async fn https(addr: SocketAddr, connector: &TlsConnector, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tls_connect(addr, connector).await;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {API_KEY}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("send request");
    let mut out = Vec::new();
    // The server may end with close_notify or just FIN; either way the response is complete.
    let _ = tokio::time::timeout(T, stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

type Ws = WebSocketStream<TlsTcp>;

/// A client-protocol connection over wss, connected (anonymous, --dev).
async fn wss_client(addr: SocketAddr, connector: &TlsConnector) -> Ws {
    let stream = tls_connect(addr, connector).await;
    let url = format!("wss://localhost:{}/connection/websocket", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.expect("wss upgrade");
    let reply = call(&mut ws, json!({"id": 1, "connect": {}})).await;
    assert!(reply.get("connect").is_some(), "connect over wss: {reply}");
    ws
}

/// Sends a command and returns the first message that answers its id.
async fn call(ws: &mut Ws, cmd: Value) -> Value {
    let id = cmd["id"].clone();
    ws.send(Message::Text(cmd.to_string())).await.expect("send");
    loop {
        let v = next(ws).await;
        if v["id"] == id {
            return v;
        }
    }
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("server sent nothing in time") {
            Some(Ok(Message::Text(t))) => {
                if let Some(line) = t.split('\n').find(|l| !l.trim().is_empty()) {
                    return serde_json::from_str(line).expect("JSON");
                }
            }
            Some(Ok(Message::Close(f))) => return json!({"closed": f.map(|f| u16::from(f.code))}),
            Some(Ok(_)) => {}
            Some(Err(e)) => return json!({"error": e.to_string()}),
            None => return json!({"closed": null}),
        }
    }
}

async fn publish(addr: SocketAddr, connector: &TlsConnector, channel: &str, data: Value) {
    let (status, body) =
        https(addr, connector, "POST", "/api/publish", &json!({"channel": channel, "data": data}).to_string()).await;
    assert_eq!(status, 200, "publish over https: {body}");
    assert!(!body.contains("\"error\""), "publish over https: {body}");
}

/// Waits for the publication push carrying `data` on `ws`.
async fn expect_publication(ws: &mut Ws, data: &Value) {
    loop {
        let v = next(ws).await;
        assert!(v.get("closed").is_none() && v.get("error").is_none(), "connection ended: {v}");
        if v["push"]["pub"]["data"] == *data {
            return;
        }
    }
}

/// `name{labels} value` from /metrics over https (0 when absent).
async fn metric(addr: SocketAddr, connector: &TlsConnector, series: &str) -> u64 {
    let (status, body) = https(addr, connector, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "/metrics over https");
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap_or(0.0) as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_subscribe_receives_a_publication_sent_over_https() {
    let pki = Pki::new("pubsub");
    pki.issue("ringcast test");
    let server = start(&pki, &[]).await;
    let connector = pki.client();
    let mut ws = wss_client(server.addr, &connector).await;
    let sub = call(&mut ws, json!({"id": 2, "subscribe": {"channel": "news"}})).await;
    assert!(sub.get("subscribe").is_some(), "subscribe over wss: {sub}");
    for i in 0..20 {
        let data = json!({"n": i, "pad": "x".repeat(i * 500)});
        publish(server.addr, &connector, "news", data.clone()).await;
        expect_publication(&mut ws, &data).await;
    }
    // /health on the same TLS port.
    let (status, _) = https(server.addr, &connector, "GET", "/health", "").await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_http11_is_negotiated() {
    let pki = Pki::new("alpn");
    pki.issue("ringcast test");
    let server = start(&pki, &[]).await;
    let stream = tls_connect(server.addr, &pki.client()).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    server.stop().await;
}

/// Many frames at once over TLS (the queue handed to rustls as one vectored write): all arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_publications_arrives_in_order_over_tls() {
    let pki = Pki::new("burst");
    pki.issue("ringcast test");
    let server = start(&pki, &[]).await;
    let connector = pki.client();
    let mut ws = wss_client(server.addr, &connector).await;
    call(&mut ws, json!({"id": 2, "subscribe": {"channel": "burst"}})).await;
    // One HTTPS connection, many publishes back to back (keep-alive), while the subscriber does not read.
    let mut api = tls_connect(server.addr, &connector).await;
    const N: usize = 300;
    let mut reqs = Vec::new();
    for i in 0..N {
        let body = json!({"channel": "burst", "data": {"i": i, "pad": "y".repeat(300)}}).to_string();
        reqs.extend_from_slice(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    api.write_all(&reqs).await.expect("send publishes");
    let mut seen = 0;
    while seen < N {
        let v = next(&mut ws).await;
        assert!(v.get("closed").is_none() && v.get("error").is_none(), "connection ended: {v}");
        if let Some(i) = v["push"]["pub"]["data"]["i"].as_u64() {
            assert_eq!(i as usize, seen, "publications out of order");
            seen += 1;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_is_answered_400_and_counted() {
    let pki = Pki::new("plain");
    pki.issue("ringcast test");
    let server = start(&pki, &[]).await;
    let connector = pki.client();
    let before = metric(server.addr, &connector, "ringcast_tls_handshake_failures_total{reason=\"plaintext\"}").await;
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.expect("server closes").expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("speaks TLS"), "{text}");
    // A plain WebSocket upgrade is refused the same way.
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    tcp.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut out)).await.expect("server closes").expect("read");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400 "));
    let after = metric(server.addr, &connector, "ringcast_tls_handshake_failures_total{reason=\"plaintext\"}").await;
    assert!(after >= before + 2, "plaintext refusals counted: {before} -> {after}");
    // And TLS clients are served as before.
    let mut ws = wss_client(server.addr, &connector).await;
    let sub = call(&mut ws, json!({"id": 2, "subscribe": {"channel": "still"}})).await;
    assert!(sub.get("subscribe").is_some(), "{sub}");
    server.stop().await;
}

/// Reads until EOF or error; true when the server ended the connection.
async fn closed_by_server(tcp: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    loop {
        match tokio::time::timeout(T, tcp.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_timed_out() {
    let pki = Pki::new("stall");
    pki.issue("ringcast test");
    let server = start(&pki, &[("handshake_timeout", "300ms")]).await;
    let connector = pki.client();
    let before = metric(server.addr, &connector, "ringcast_tls_handshake_failures_total{reason=\"timeout\"}").await;
    // Silent: not even the first byte.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    // The start of a ClientHello record, then nothing.
    let mut partial = TcpStream::connect(server.addr).await.expect("connect");
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.expect("send");
    assert!(closed_by_server(&mut silent).await, "a silent connection must be closed");
    assert!(closed_by_server(&mut partial).await, "a half-sent ClientHello must be closed");
    let after = metric(server.addr, &connector, "ringcast_tls_handshake_failures_total{reason=\"timeout\"}").await;
    assert!(after >= before + 2, "timeouts counted: {before} -> {after}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_with_garbage_is_refused_and_the_server_carries_on() {
    let pki = Pki::new("garbage");
    pki.issue("ringcast test");
    let server = start(&pki, &[]).await;
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    // A handshake record whose body is not a ClientHello.
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend_from_slice(&[0xAB; 0x40]);
    tcp.write_all(&junk).await.expect("send");
    assert!(closed_by_server(&mut tcp).await, "a broken handshake must end the connection");
    let connector = pki.client();
    let _ws = wss_client(server.addr, &connector).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let pki = Pki::new("reload");
    let first = pki.issue("first");
    let server = start(&pki, &[]).await;
    let connector = pki.client();
    // A connection made with the first certificate, subscribed.
    let before = tls_connect(server.addr, &connector).await;
    assert_eq!(presented(&before), first);
    drop(before);
    let mut ws = wss_client(server.addr, &connector).await;
    call(&mut ws, json!({"id": 2, "subscribe": {"channel": "kept"}})).await;

    let second = pki.issue("second");
    server.tls.reload().expect("reload with a good pair");
    let after = tls_connect(server.addr, &connector).await;
    assert_eq!(presented(&after), second, "a new connection gets the new certificate");
    drop(after);
    // The connection from before the reload still works, both ways.
    let data = json!({"after": "reload"});
    publish(server.addr, &connector, "kept", data.clone()).await;
    expect_publication(&mut ws, &data).await;
    let r = call(&mut ws, json!({"id": 3, "subscribe": {"channel": "kept2"}})).await;
    assert!(r.get("subscribe").is_some(), "{r}");

    // A bad key file: the reload fails, says which file, and the second certificate stays.
    std::fs::write(pki.key(), "-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
        .expect("write");
    let e = server.tls.reload().expect_err("a broken key must not load");
    assert!(e.to_string().contains("tls_key"), "{e}");
    assert_eq!(presented(&tls_connect(server.addr, &connector).await), second);
    // A key that is not the certificate's.
    let other = rcgen::KeyPair::generate().expect("key");
    std::fs::write(pki.key(), other.serialize_pem()).expect("write");
    let e = server.tls.reload().expect_err("a key of another certificate must not load");
    assert!(e.to_string().contains("tls_cert") || e.to_string().contains("tls_key"), "{e}");
    // A missing certificate file.
    std::fs::remove_file(pki.cert()).expect("remove");
    let e = server.tls.reload().expect_err("a missing certificate must not load");
    assert!(e.to_string().contains("tls_cert"), "{e}");
    assert_eq!(presented(&tls_connect(server.addr, &connector).await), second);
    let data = json!({"after": "bad reloads"});
    publish(server.addr, &connector, "kept", data.clone()).await;
    expect_publication(&mut ws, &data).await;
    server.stop().await;
}

#[test]
fn bad_files_at_start_are_errors_naming_the_key() {
    let pki = Pki::new("start");
    pki.issue("ringcast test");
    let bind = |cert: &Path, key: &Path| {
        let flags = [
            ("listen".to_string(), "127.0.0.1:0".to_string()),
            ("tls_cert".to_string(), cert.display().to_string()),
            ("tls_key".to_string(), key.display().to_string()),
        ];
        let (config, settings) = Config::load(None, |_| None, &flags).expect("config");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async { Server::bind(config, settings).map(|_| ()) })
    };
    assert!(bind(&pki.cert(), &pki.key()).is_ok());
    let missing = pki.dir.join("missing.pem");
    let e = bind(&missing, &pki.key()).expect_err("missing cert");
    assert!(e.to_string().contains("`tls_cert`"), "{e}");
    let e = bind(&pki.cert(), &pki.cert()).expect_err("a certificate is not a key");
    assert!(e.to_string().contains("`tls_key`"), "{e}");
}
