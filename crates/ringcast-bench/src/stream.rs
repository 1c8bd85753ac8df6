//! A client connection's byte stream: plain TCP (`ws://`) or TLS over it (`wss://`).
//!
//! The generator is readiness-based (`readable()`, then non-blocking `try_read` until it would block),
//! so [`Stream`] offers exactly tokio's `TcpStream` calls, all on `&self`. Over TLS the rustls session
//! is driven by hand behind an uncontended mutex (one task owns each connection): ciphertext is read
//! with the socket's `try_read`, plaintext comes out of the session. Records rustls could not write yet
//! are flushed while the connection waits in [`Stream::readable`], which every loop here does, so they
//! never wait for the next send.
//!
//! The handshake is tokio-rustls's; `--insecure` replaces certificate verification with one that accepts
//! any certificate (handshake signatures are still checked), for test certificates. Without it the
//! roots are the PEM bundle in `SSL_CERT_FILE`, or the system's.

use std::io::{self, IoSliceMut, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};

/// How to reach a `wss://` server: the client configuration and the name its certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").field("name", &self.name).finish()
    }
}

/// The system CA bundle, where Debian and most distributions keep it.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

impl TlsClient {
    /// For `host` (as written in the URL; brackets of an IPv6 literal are dropped).
    pub fn new(host: &str, insecure: bool) -> Result<TlsClient, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name =
            ServerName::try_from(bare.to_string()).map_err(|e| format!("{bare:?} is not a TLS server name: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let path = std::env::var("SSL_CERT_FILE").unwrap_or_else(|_| SYSTEM_ROOTS.to_string());
            let mut roots = RootCertStore::empty();
            let certs = rustls_pki_types::pem::PemObject::pem_file_iter(&path).map_err(|e| {
                format!("CA bundle {path}: {e:?} (set SSL_CERT_FILE, or --insecure for a test certificate)")
            })?;
            for cert in certs {
                let cert: CertificateDer<'static> = cert.map_err(|e| format!("CA bundle {path}: {e:?}"))?;
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!("no CA certificate in {path} (set SSL_CERT_FILE, or --insecure)"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsClient { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }

    /// The TLS handshake over a connected socket.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        let (tcp, session) = tls.into_inner();
        Ok(Stream::Tls(Box::new(TlsConn { tcp, session: Mutex::new(session) })))
    }
}

/// Accepts any certificate (`--insecure`); the handshake's signatures are still verified.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection's byte stream.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

pub struct TlsConn {
    tcp: TcpStream,
    session: Mutex<ClientConnection>,
}

/// rustls's `read_tls`/`write_tls` over the socket's non-blocking calls.
struct Io<'a>(&'a TcpStream);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsConn {
    fn session(&self) -> MutexGuard<'_, ClientConnection> {
        // One task owns the connection; a poisoned lock only means a panic elsewhere already ended it.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes queued records; `Ok(true)` when none are left.
    fn write_records(&self, s: &mut ClientConnection) -> io::Result<bool> {
        while s.wants_write() {
            match s.write_tls(&mut Io(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn read_with(&self, mut read: impl FnMut(&mut dyn Read) -> io::Result<usize>) -> io::Result<usize> {
        let mut s = self.session();
        loop {
            match read(&mut s.reader()) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let n = s.read_tls(&mut Io(&self.tcp))?;
            let state = s.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            let _ = self.write_records(&mut s);
            state?;
            if n == 0 && s.wants_read() {
                return Ok(0);
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.session();
        if !self.write_records(&mut s)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = s.writer().write(buf)?;
        self.write_records(&mut s)?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    async fn readable(&self) -> io::Result<()> {
        loop {
            let (ready, pending) = {
                let mut s = self.session();
                let ready =
                    s.process_new_packets().map_or(true, |st| st.plaintext_bytes_to_read() > 0 || st.peer_has_closed());
                (ready, s.wants_write())
            };
            if ready {
                return Ok(());
            }
            if !pending {
                return self.tcp.readable().await;
            }
            tokio::select! {
                r = self.tcp.readable() => return r,
                r = self.tcp.writable() => {
                    r?;
                    let mut s = self.session();
                    self.write_records(&mut s)?;
                }
            }
        }
    }
}

impl Stream {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.readable().await,
            Stream::Tls(t) => t.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.writable().await,
            Stream::Tls(t) => t.tcp.writable().await,
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read(buf),
            Stream::Tls(t) => t.read_with(|r| r.read(buf)),
        }
    }

    pub fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read_vectored(bufs),
            Stream::Tls(t) => t.read_with(|r| r.read_vectored(bufs)),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(buf),
            Stream::Tls(t) => t.try_write(buf),
        }
    }

    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.tcp,
        }
    }
}
