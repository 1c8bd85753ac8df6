//! The listener: accept, hand each connection its own task, and drain them all on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::app::config::{Config, Settings};
use crate::app::context::Context;
use crate::app::error::ServerError;
use crate::app::tls::Tls;

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    /// The `internal_listen` listener (plain HTTP: API, metrics, health), when configured.
    internal: Option<TcpListener>,
    /// The `tcp_listen` listener (the raw TCP binary protocol), when on.
    tcp: Option<TcpListener>,
    /// `tls_cert`/`tls_key`, when set: every connection on `listener` speaks TLS first.
    tls: Option<Arc<Tls>>,
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
        let tcp = match settings.tcp_listen {
            Some(addr) => Some(bind(addr).map_err(|source| ServerError::Bind { addr, source })?),
            None => None,
        };
        let tls = match settings.tls.clone() {
            Some(files) => Some(Arc::new(Tls::load(files)?)),
            None => None,
        };
        Ok(Server { listener, internal, tcp, tls, ctx: Arc::new(Context::new(config, settings)?) })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The listener's TLS configuration, when `tls_cert`/`tls_key` are set (to reload it).
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    /// The bound `internal_listen` address, when configured.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound `tcp_listen` address (the TCP binary protocol), when on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `signal` resolves, then closes every connection with 1001 and waits for them, up to
    /// `shutdown_timeout`.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        tokio::spawn(self.ctx.deadlines.clone().run_sweeper());
        let pruner = tokio::spawn(prune_admission(self.ctx.clone()));
        if let Some(admin) = self.ctx.admin.clone() {
            let deadlines = self.ctx.deadlines.clone();
            tokio::spawn(admin.run(async move { deadlines.wait_shutdown().await }));
        }
        let memory = tokio::spawn(crate::app::memory::watch(self.ctx.clone()));
        let internal = match (self.internal, self.ctx.internal_router.clone()) {
            (Some(listener), Some(router)) => Some(tokio::spawn(serve_internal(listener, router, self.ctx.clone()))),
            _ => None,
        };
        let tcp = self.tcp.map(|listener| tokio::spawn(serve_tcp(listener, self.ctx.clone())));
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
                        match &self.tls {
                            None => {
                                tokio::spawn(crate::ws::Connection::new(stream, self.ctx.clone(), accepted_count));
                            }
                            Some(tls) => {
                                tokio::spawn(tls_connection(tls.clone(), stream, self.ctx.clone(), accepted_count));
                            }
                        }
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
        pruner.abort();
        memory.abort();
        // Accepting stops; open TCP connections are counted in `live` and close on the shutdown flag.
        if let Some(task) = tcp {
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

/// A TLS connection: the handshake (its own small task, so the established connection's task does not
/// carry the handshake's state), then the connection as `Connection<TlsStream>` in a task of its own.
async fn tls_connection(tls: Arc<Tls>, stream: TcpStream, ctx: Arc<Context>, spread: usize) {
    let config = &ctx.config;
    // Failures are counted and logged by `handshake`.
    if let Ok(stream) = crate::app::tls::handshake(&tls, stream, config.handshake_timeout, config.close_timeout).await {
        if !ctx.deadlines.is_shutdown() {
            let stream = crate::transport::stream::TlsStream::new(stream);
            tokio::spawn(crate::ws::Connection::new(stream, ctx, spread));
        }
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
                tokio::spawn(crate::api::http::serve_with(
                    stream,
                    Vec::new(),
                    router.clone(),
                    crate::api::http::ServeOptions::default(),
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

/// Now and then forgets the connect-rate state of addresses that have not connected lately.
async fn prune_admission(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ctx.admission.prune();
    }
}

/// Accepts TCP binary-protocol connections on `tcp_listen`, one task each, until the server shuts down
/// (the task is aborted; the connections themselves see the shutdown flag).
async fn serve_tcp(listener: TcpListener, ctx: Arc<Context>) {
    let mut accepted = 0usize;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::trace!(%peer, "tcp protocol: accepted");
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "set_nodelay failed");
                }
                accepted = accepted.wrapping_add(1);
                if ctx.deadlines.is_shutdown() {
                    continue;
                }
                tokio::spawn(crate::tcp::Connection::new(stream, ctx.clone(), accepted).run());
            }
            Err(e) => {
                metrics::counter!("ringcast_tcp_accept_errors_total").increment(1);
                tracing::warn!(error = %e, "tcp protocol listener: accept failed");
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
    if settings.memory.is_some() {
        builder.on_thread_park(crate::app::memory::on_worker_park);
    }
    let runtime = builder.enable_all().thread_name("ringcast").build().map_err(ServerError::Runtime)?;
    runtime.block_on(async move {
        let server = Server::bind(config, settings)?;
        let addr = server.local_addr().map_err(ServerError::Runtime)?;
        tracing::info!(%addr, strategy = server.ctx.settings.strategy.name(), echo = server.ctx.settings.echo, "ringcast listening");
        if let Some(tcp) = server.tcp_addr() {
            tracing::info!(%tcp, "TCP binary protocol listening");
        }
        if let Some(internal) = server.internal_addr() {
            tracing::info!(%internal, "internal listener: /api, /metrics, /health");
        }
        if server.ctx.admin.is_some() {
            let at = server.internal_addr().unwrap_or(addr);
            tracing::info!("admin dashboard: http://{at}/admin");
        }
        let scheme = if server.tls.is_some() { "wss" } else { "ws" };
        if server.ctx.settings.echo {
            tracing::info!("echo endpoint: {scheme}://{}{}", addr, server.ctx.config.echo_path);
        }
        #[cfg(unix)]
        if let Some(tls) = server.tls() {
            // Installed before anything is accepted: from then on SIGHUP reloads instead of ending us.
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(ServerError::Runtime)?;
            tracing::info!(cert = %tls.files().cert.display(), "TLS on: wss:// and https://; SIGHUP reloads the certificate");
            tokio::spawn(crate::app::tls::reload_on_sighup(tls, hangup));
        }
        server.run(termination_signal()).await
    })
}
