//! TLS on the public listener (`tls_cert`, `tls_key`): the certificate, its reload, and the handshake.
//!
//! With both keys set, every connection on `listen` speaks TLS first (rustls, the aws-lc-rs provider
//! jsonwebtoken already links; ALPN `http/1.1`): `wss://` and `https://` (the API, /metrics, /health)
//! share the port, as `ws://` and `http://` do without TLS. The handshake runs in a short task of its own
//! ([`handshake`], tokio-rustls's acceptor, bounded by `handshake_timeout`); the established connection
//! is then spawned as `Connection<TlsStream>` (see [`crate::transport::stream`] for why the session is
//! driven by hand from there). So a connection in its TLS handshake holds rustls's handshake state, and
//! an established one holds none of it in its future: the session is boxed.
//!
//! A client that speaks plain HTTP to the TLS port is answered `400` in plain text and closed (the first
//! byte of a TLS connection is a handshake record, 0x16; an HTTP request starts with a method's letter),
//! logged and counted (`ringcast_tls_handshake_failures_total{reason="plaintext"}`).
//!
//! # Reload
//! [`Tls`] holds the `ServerConfig` in an `ArcSwap`: [`Tls::reload`] reads both files again and swaps
//! the new config in only if they load and match; each handshake takes the config current when it
//! starts, and established connections keep the session they have. A bad file leaves the old pair in
//! place and says why. The configuration reload (`app::reload`: SIGHUP, `POST /api/reload`) reads the pair
//! again as one of its parts ([`TlsReload`]): a pair that does not load rejects that reload as a whole,
//! like any other invalid key, and the old pair stays. The files' paths themselves need a restart.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ServerConfig};

/// Where the certificate chain and its key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`tls_cert` {path}: {message}")]
    Cert { path: String, message: String },
    #[error("`tls_key` {path}: {message}")]
    Key { path: String, message: String },
    #[error("`tls_cert`/`tls_key`: {0}")]
    Pair(String),
}

/// The listener's TLS configuration, replaceable while the server runs.
pub struct Tls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Loads the pair; an error names the key whose file is wrong.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let config = server_config(&files)?;
        Ok(Tls { files, config: ArcSwap::from_pointee(config) })
    }

    /// Reads both files again. On success new handshakes use them; on error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        self.config.store(Arc::new(config));
        Ok(())
    }

    /// The configuration a handshake starting now uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let cert_err = |message: String| TlsError::Cert { path: files.cert.display().to_string(), message };
    let key_err = |message: String| TlsError::Key { path: files.key.display().to_string(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(pem_message(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(pem_message(e)))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE block in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| key_err(pem_message(e)))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        // Checks that the key is usable and is the certificate's (rustls compares the public keys).
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn pem_message(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM block of the expected kind in the file".into(),
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not a valid PEM file ({other:?})"),
    }
}

/// What a client that sent plain HTTP to the TLS port is told.
const PLAINTEXT_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\nConnection: close\r\n\r\nThis port speaks TLS: use https:// or wss://.\n";

/// How a TLS handshake failed (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// The client spoke plain HTTP (or anything that is not TLS) and was answered 400.
    Plaintext,
    /// Not done within `handshake_timeout`.
    Timeout,
    /// rustls refused it (alert sent), or the socket failed.
    Error,
}

impl Failed {
    pub fn label(self) -> &'static str {
        match self {
            Failed::Plaintext => "plaintext",
            Failed::Timeout => "timeout",
            Failed::Error => "error",
        }
    }
}

/// Runs the server side of a TLS handshake on `tcp`, within `timeout` (one budget for reading the first
/// byte and the whole handshake). A plain HTTP client is answered 400 and closed here. Failures are
/// counted (`ringcast_tls_handshake_failures_total{reason}`) and logged here, before any wait.
pub async fn handshake(
    tls: &Tls,
    tcp: TcpStream,
    timeout: Duration,
    close_timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Failed> {
    let result = shake(tls, tcp, timeout, close_timeout).await;
    match &result {
        Ok(_) => metrics::counter!("ringcast_tls_handshakes_total").increment(1),
        Err(Failed::Plaintext) => {}
        Err(failed) => {
            metrics::counter!("ringcast_tls_handshake_failures_total", "reason" => failed.label()).increment(1);
        }
    }
    result
}

async fn shake(
    tls: &Tls,
    tcp: TcpStream,
    timeout: Duration,
    close_timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Failed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Err(_) => {
            tracing::debug!("TLS handshake timed out before the first byte");
            return Err(Failed::Timeout);
        }
        Ok(Err(_)) | Ok(Ok(0)) => return Err(Failed::Error),
        // A TLS record of type handshake.
        Ok(Ok(_)) if first[0] == 0x16 => {}
        Ok(Ok(_)) => {
            metrics::counter!("ringcast_tls_handshake_failures_total", "reason" => Failed::Plaintext.label())
                .increment(1);
            tracing::info!(peer = ?tcp.peer_addr().ok(), "plain HTTP on the TLS port: answered 400");
            refuse_plaintext(tcp, close_timeout).await;
            return Err(Failed::Plaintext);
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            Err(Failed::Timeout)
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            Err(Failed::Error)
        }
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Answers 400, sends FIN, and reads (discarding) until the client closes, so our answer is not
/// destroyed by the RST that closing with unread input would send. Bounded by `close_timeout`.
async fn refuse_plaintext(mut tcp: TcpStream, close_timeout: Duration) {
    let _ = tokio::time::timeout(close_timeout, async {
        tcp.write_all(PLAINTEXT_RESPONSE).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// The TLS pair as a part of the configuration reload: each reload reads both files again.
pub struct TlsReload(pub Arc<Tls>);

impl crate::app::reload::ReloadHook for TlsReload {
    fn keys(&self) -> &'static [&'static str] {
        // Changing the paths needs a restart; what is re-read is the files at the paths in force.
        &[]
    }

    fn prepare(&self, _new: &crate::app::config::Config) -> Result<crate::app::reload::Commit, crate::ConfigError> {
        let tls = self.0.clone();
        match server_config(&tls.files) {
            Ok(config) => Ok(Box::new(move || {
                tls.config.store(Arc::new(config));
                metrics::counter!("ringcast_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(cert = %tls.files.cert.display(), "TLS certificate and key reloaded");
            })),
            Err(e) => {
                metrics::counter!("ringcast_tls_reloads_total", "result" => "error").increment(1);
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate and key");
                let key = match e {
                    TlsError::Key { .. } => "tls_key",
                    TlsError::Cert { .. } | TlsError::Pair(_) => "tls_cert",
                };
                Err(crate::ConfigError::Invalid { key: key.into(), message: e.to_string() })
            }
        }
    }
}
