//! The server layer's error type: what can stop the server itself (per-connection failures are handled,
//! logged and counted where they happen, and never end the process).

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::app::tls::TlsError),
    #[error(transparent)]
    Config(#[from] crate::app::config::ConfigError),
}
