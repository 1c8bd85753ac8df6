//! The listener: accept, hand each connection its own task, and drain them all on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringcast_wire::{BufferPool, Limits};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::auth::{TokenConfig, TokenVerifier};
use crate::broker::MemoryBroker;
use crate::config::{Config, ConfigError, Settings};
use crate::deadline::Deadlines;
use crate::error::ServerError;
use crate::namespace::Namespaces;
use crate::node::Node;

/// What every connection task shares: read-only settings and the buffer pool.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub settings: Settings,
    pub limits: Limits,
    pub pool: Arc<BufferPool>,
    /// `allowed_origins`, or `*` in dev mode when none are configured.
    pub allowed_origins: Vec<String>,
    /// Every connection's deadlines; also how shutdown reaches them.
    pub deadlines: Arc<Deadlines>,
    /// Channels, subscriptions, history, presence.
    pub node: Arc<Node>,
    /// What plain HTTP requests on the public listener reach: the HTTP API, /health and /metrics, or only
    /// /health when `internal_listen` is set.
    pub router: axum::Router,
    /// The HTTP API, /health and /metrics for the `internal_listen` address, when set.
    pub internal_router: Option<axum::Router>,
    /// Connection tasks alive; shutdown waits for them.
    pub live: Live,
    /// Socket byte counters (handles registered once: an increment is one atomic add).
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
}

/// Counts live connection tasks so that shutdown can wait for the last one.
///
/// Not tokio-util's `TaskTracker`: its token would sit in every connection's future, and 8 more bytes
/// there push tokio's task allocation from 384 to 512 bytes (it grows in 128-byte steps) — for every
/// idle connection. Each connection enters in `Conn::new` and leaves in its `Drop`.
#[derive(Debug, Default)]
pub struct Live {
    count: std::sync::atomic::AtomicUsize,
    none_left: tokio::sync::Notify,
}

impl Live {
    pub fn enter(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn leave(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.none_left.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no connection is left.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.none_left.notified();
            tokio::pin!(notified);
            // Registered before the check, so a leave between the check and the await still wakes us.
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

fn key_error(key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.to_string() }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", fastrand::u8(..))).collect()
}

impl Context {
    pub fn new(mut config: Config, settings: Settings) -> Result<Self, ServerError> {
        if config.dev {
            // Development mode works out of the box: an API key and a token secret to try things with.
            if config.api_key.is_empty() {
                config.api_key = random_hex(16);
                tracing::warn!(api_key = %config.api_key, "dev mode: generated API key (set api_key to choose one)");
            }
            if config.token_hmac_secret_key.is_empty() {
                config.token_hmac_secret_key = random_hex(32);
                tracing::warn!(
                    token_hmac_secret_key = %config.token_hmac_secret_key,
                    "dev mode: generated token secret (ringcast gentoken --user U --secret ...)"
                );
            }
        }
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let token_config = TokenConfig {
            hmac_secret: opt(&config.token_hmac_secret_key),
            rsa_public_key: opt(&config.token_rsa_public_key),
            ecdsa_public_key: opt(&config.token_ecdsa_public_key),
        };
        let tokens = if token_config.hmac_secret.is_none()
            && token_config.rsa_public_key.is_none()
            && token_config.ecdsa_public_key.is_none()
        {
            None
        } else {
            Some(TokenVerifier::new(&token_config).map_err(|e| key_error("token_*_key", e))?)
        };
        let namespaces = if config.dev {
            Namespaces::dev_mode()
        } else {
            Namespaces::new(config.channels.clone(), config.namespaces.clone())
                .map_err(|e| key_error("namespaces", e))?
        }
        .with_max_channel_length(config.channel_max_length);
        let client_limits = crate::node::ClientLimits {
            user_connection_limit: config.client_user_connection_limit,
            history_max_publication_limit: config.history_max_publication_limit,
        };
        let node = Arc::new(
            Node::new(Arc::new(MemoryBroker::new()), namespaces, tokens, config.allow_anonymous || config.dev)
                .with_client_limits(client_limits)
                .with_client_channel_limit(config.client_channel_limit),
        );
        let limits = Limits { max_frame_payload: config.max_frame_size, max_message_size: config.max_message_size };
        let pool = BufferPool::new(config.pool_buffer_size, config.pool_max_buffers);
        let allowed_origins = if config.allowed_origins.is_empty() && config.dev {
            vec!["*".to_string()]
        } else {
            config.allowed_origins.clone()
        };
        let api = crate::api::ApiConfig { api_key: config.api_key.clone(), insecure: false };
        let full = crate::api::router(node.clone(), api, crate::metrics::install());
        // Centrifugo's internal port: operators keep the API and metrics off the port clients reach.
        let (router, internal_router) = match settings.internal_listen {
            Some(_) => (crate::api::health_router(), Some(full)),
            None => (full, None),
        };
        // After `install`: a handle taken before a recorder exists stays a no-op.
        let bytes_in = metrics::counter!(crate::metrics::BYTES_IN_TOTAL);
        let bytes_out = metrics::counter!(crate::metrics::BYTES_OUT_TOTAL);
        Ok(Context {
            config,
            settings,
            limits,
            pool,
            allowed_origins,
            deadlines: Deadlines::new(),
            node,
            router,
            internal_router,
            live: Live::default(),
            bytes_in,
            bytes_out,
        })
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    /// The `internal_listen` listener (plain HTTP: API, metrics, health), when configured.
    internal: Option<TcpListener>,
    ctx: Arc<Context>,
}

impl Server {
    /// Binds the listening socket (SO_REUSEADDR, a deep backlog for connection storms).
    pub fn bind(config: Config, settings: Settings) -> Result<Server, ServerError> {
        let addr = settings.listen;
        let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            TcpListener::from_std(socket.into())
        };
        let listener = bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
        let internal = match settings.internal_listen {
            Some(addr) => Some(bind(addr).map_err(|source| ServerError::Bind { addr, source })?),
            None => None,
        };
        Ok(Server { listener, internal, ctx: Arc::new(Context::new(config, settings)?) })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound `internal_listen` address, when configured.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `signal` resolves, then closes every connection with 1001 and waits for them, up to
    /// `shutdown_timeout`.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::spawn(self.ctx.deadlines.clone().run_sweeper());
        let internal = match (self.internal, self.ctx.internal_router.clone()) {
            (Some(listener), Some(router)) => Some(tokio::spawn(serve_internal(listener, router, self.ctx.clone()))),
            _ => None,
        };
        let mut accepted_count = 0usize;
        tokio::pin!(signal);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tracing::trace!(%peer, "accepted");
                        metrics::counter!("ringcast_tcp_accepted_total").increment(1);
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(%peer, error = %e, "set_nodelay failed");
                        }
                        accepted_count = accepted_count.wrapping_add(1);
                        tokio::spawn(crate::connection::Connection::new(stream, self.ctx.clone(), accepted_count));
                    }
                    Err(e) => {
                        // EMFILE/ENFILE/ECONNABORTED are per-accept troubles, not reasons to stop serving.
                        metrics::counter!("ringcast_tcp_accept_errors_total").increment(1);
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                _ = &mut signal => break,
            }
        }
        drop(self.listener);
        if let Some(task) = internal {
            task.abort();
        }
        tracing::info!(connections = self.ctx.live.len(), "shutting down: closing connections with 1001");
        self.ctx.deadlines.shutdown();
        if tokio::time::timeout(self.ctx.config.shutdown_timeout, self.ctx.live.wait_empty()).await.is_err() {
            tracing::warn!(remaining = self.ctx.live.len(), "shutdown timeout: dropping remaining connections");
        }
        Ok(())
    }
}

/// Accepts on the `internal_listen` address and serves each connection as plain HTTP (no WebSocket
/// there), until the server shuts down: in-flight requests are answered, idle connections closed.
async fn serve_internal(listener: TcpListener, router: axum::Router, ctx: Arc<Context>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let deadlines = ctx.deadlines.clone();
                tokio::spawn(crate::http::serve_with(
                    stream,
                    Vec::new(),
                    router.clone(),
                    crate::http::ServeOptions::default(),
                    async move { deadlines.wait_shutdown().await },
                ));
            }
            Err(e) => {
                metrics::counter!("ringcast_tcp_accept_errors_total").increment(1);
                tracing::warn!(error = %e, "internal listener: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Builds the runtime, binds, and serves until SIGINT/SIGTERM. What `ringcast serve` runs.
pub fn run_blocking(config: Config, settings: Settings) -> Result<(), ServerError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.workers > 0 {
        builder.worker_threads(config.workers);
    }
    let runtime = builder.enable_all().thread_name("ringcast").build().map_err(ServerError::Runtime)?;
    runtime.block_on(async move {
        let server = Server::bind(config, settings)?;
        let addr = server.local_addr().map_err(ServerError::Runtime)?;
        tracing::info!(%addr, strategy = server.ctx.settings.strategy.name(), echo = server.ctx.settings.echo, "ringcast listening");
        if let Some(internal) = server.internal_addr() {
            tracing::info!(%internal, "internal listener: /api, /metrics, /health");
        }
        if server.ctx.settings.echo {
            tracing::info!("echo endpoint: ws://{}{}", addr, server.ctx.config.echo_path);
        }
        server.run(termination_signal()).await
    })
}
