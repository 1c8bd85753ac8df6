//! SIGHUP reloads the TLS certificate of a running `ringcast serve` (the binary, a real signal): a
//! connection made before keeps working, a new one sees the new certificate, and a bad file keeps the
//! old pair and is logged.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("ringcast-sighup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "ringcast test CA");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        Pki { dir, ca, ca_key }
    }

    fn issue(&self, cn: &str) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("leaf cert");
        std::fs::write(self.dir.join("cert.pem"), cert.pem()).expect("write cert");
        std::fs::write(self.dir.join("key.pem"), key.serialize_pem()).expect("write key");
        cert.der().to_vec()
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("trust the test CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hangup(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: sending a signal to our own child process by its pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP");
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn presented(addr: SocketAddr, connector: &TlsConnector) -> Vec<u8> {
    let s = tls_connect(addr, connector).await.expect("TLS connect");
    s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).expect("certificate")
}

fn log_text(path: &std::path::Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_connections() {
    let pki = Pki::new();
    let first = pki.issue("first");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log = pki.dir.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve", "--dev", "--tcp-listen", "off", "--listen", &addr.to_string(), "--log-level", "info"])
        .arg("--tls-cert")
        .arg(pki.dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(pki.dir.join("key.pem"))
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringcast");
    let serve = Serve(child);
    let connector = pki.connector();
    let mut up = false;
    for _ in 0..200 {
        if tls_connect(addr, &connector).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "server did not come up: {}", log_text(&log));
    assert_eq!(presented(addr, &connector).await, first);

    // A client-protocol connection made with the first certificate.
    let stream = tls_connect(addr, &connector).await.expect("connect");
    let url = format!("wss://localhost:{port}/connection/websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.expect("wss upgrade");
    let call = |id: u32, cmd: &str| (id, format!("{{\"id\":{id},{cmd}}}"));
    let (id, text) = call(1, "\"connect\":{}");
    ws.send(Message::Text(text)).await.expect("send");
    let reply = tokio::time::timeout(T, ws.next()).await.expect("reply in time").expect("open").expect("frame");
    assert!(reply.to_text().unwrap_or("").contains(&format!("\"id\":{id}")), "{reply:?}");

    // New pair, SIGHUP: new connections see it (once the signal was handled).
    let second = pki.issue("second");
    hangup(&serve.0);
    let mut now = presented(addr, &connector).await;
    for _ in 0..100 {
        if now == second {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = presented(addr, &connector).await;
    }
    assert_eq!(now, second, "the new certificate after SIGHUP: {}", log_text(&log));
    // The connection from before still works.
    let (id, text) = call(2, "\"subscribe\":{\"channel\":\"after-reload\"}");
    ws.send(Message::Text(text)).await.expect("send");
    let reply = tokio::time::timeout(T, ws.next()).await.expect("reply in time").expect("open").expect("frame");
    let reply = reply.to_text().unwrap_or("").to_string();
    assert!(reply.contains(&format!("\"id\":{id}")) && reply.contains("subscribe"), "{reply}");

    // A broken certificate file: SIGHUP logs why, and the second pair stays.
    std::fs::write(pki.dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        .expect("write");
    hangup(&serve.0);
    let mut logged = false;
    for _ in 0..100 {
        if log_text(&log).contains("TLS reload failed") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = log_text(&log);
    assert!(logged, "a failed reload is logged: {text}");
    assert!(text.contains("tls_cert"), "the log names the file's key: {text}");
    assert_eq!(presented(addr, &connector).await, second, "the old pair stays after a bad reload");
    let (id, text) = call(3, "\"subscribe\":{\"channel\":\"after-bad-reload\"}");
    ws.send(Message::Text(text)).await.expect("send");
    let reply = tokio::time::timeout(T, ws.next()).await.expect("reply in time").expect("open").expect("frame");
    assert!(reply.to_text().unwrap_or("").contains(&format!("\"id\":{id}")), "{reply:?}");
    drop(serve);
}
