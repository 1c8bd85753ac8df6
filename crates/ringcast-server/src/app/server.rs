//! The listener: accept, hand each connection its own task, and drain them all on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::app::admission::{IpKey, Transport};
use crate::app::config::{Config, Settings};
use crate::app::context::Context;
use crate::app::error::ServerError;
use crate::app::tls::Tls;
use ringcast_protocol::DisconnectCode;

/// A bound, not yet running server.
pub struct Server {
    /// Shared with the accept loops, so that an upgrade that fails can start them again.
    listener: Arc<TcpListener>,
    /// The `internal_listen` listener (plain HTTP: API, metrics, health), when configured.
    internal: Option<Arc<TcpListener>>,
    /// The `tcp_listen` listener (the raw TCP binary protocol), when on.
    tcp: Option<Arc<TcpListener>>,
    /// `tls_cert`/`tls_key`, when set: every connection on `listener` speaks TLS first.
    tls: Option<Arc<Tls>>,
    ctx: Arc<Context>,
    /// `runtime = "per-core"` and `listener` was bound here (with SO_REUSEPORT), not inherited: each
    /// core binds a socket of its own beside it ([`crate::app::percore`]).
    own_sockets: bool,
}

/// How [`Server::run_with`] behaves beyond serving: what `ringcast serve` turns on.
#[derive(Debug, Default)]
pub struct Control {
    /// SIGTERM/SIGINT (the `signal` future) drain: clients are disconnected with 3001 spread over
    /// `shutdown_timeout`. Off: everyone is closed at once (what the library's [`Server::run`] does).
    pub drain_on_terminate: bool,
    /// SIGHUP reloads the configuration ([`crate::app::reload`]).
    pub reload_on_sighup: bool,
    /// SIGUSR2 starts the successor and hands over ([`crate::app::upgrade`]).
    pub upgrade_on_sigusr2: bool,
    /// This process was started by an upgrade: the handover socket to the old process.
    pub predecessor: Option<std::os::unix::net::UnixStream>,
    /// Written with our pid once we accept (`pid_file`).
    pub pid_file: Option<std::path::PathBuf>,
}

/// Listening sockets passed in (systemd socket activation or an upgrade), in the order `listen`,
/// `internal_listen`, `tcp_listen` (the configured ones only).
pub type Inherited = std::collections::VecDeque<std::net::TcpListener>;

/// Takes the sockets of `LISTEN_FDS`/`LISTEN_PID` (listenfd). Call it before any thread is started: it
/// removes the variables from the environment.
pub fn inherited_listeners() -> Inherited {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Inherited::new();
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => out.push_back(l),
            Ok(None) => {}
            Err(e) => tracing::warn!(fd = 3 + i, error = %e, "LISTEN_FDS: not a TCP listening socket; ignored"),
        }
    }
    out
}

impl Server {
    /// Binds the listening socket (SO_REUSEADDR, a deep backlog for connection storms).
    pub fn bind(config: Config, settings: Settings) -> Result<Server, ServerError> {
        Self::bind_inherited(config, settings, Inherited::new())
    }

    /// [`Server::bind`], taking each listener from `inherited` (in order) when one is left there.
    pub fn bind_inherited(config: Config, settings: Settings, mut inherited: Inherited) -> Result<Server, ServerError> {
        let addr = settings.listen;
        // per-core: the public listener is bound with SO_REUSEPORT, so that each core can bind beside it.
        let own_sockets = config.runtime == "per-core" && inherited.is_empty();
        if own_sockets {
            let bound =
                crate::app::percore::bind_reuse_port(addr).map_err(|source| ServerError::Bind { addr, source })?;
            inherited.push_front(bound);
        }
        let mut bind = |addr: SocketAddr| -> Result<Arc<TcpListener>, ServerError> {
            let listener = match inherited.pop_front() {
                Some(l) => l,
                None => {
                    let bound = || -> std::io::Result<std::net::TcpListener> {
                        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                        socket.set_reuse_address(true)?;
                        socket.bind(&addr.into())?;
                        socket.listen(4096)?;
                        Ok(socket.into())
                    };
                    bound().map_err(|source| ServerError::Bind { addr, source })?
                }
            };
            listener.set_nonblocking(true).map_err(|source| ServerError::Bind { addr, source })?;
            TcpListener::from_std(listener).map(Arc::new).map_err(|source| ServerError::Bind { addr, source })
        };
        let listener = bind(addr)?;
        let internal = match settings.internal_listen {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let tcp = match settings.tcp_listen {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let tls = match settings.tls.clone() {
            Some(files) => Some(Arc::new(Tls::load(files)?)),
            None => None,
        };
        Ok(Server { listener, internal, tcp, tls, ctx: Arc::new(Context::new(config, settings)?), own_sockets })
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

    /// What every connection shares (the reloader, the node).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Serves until `signal` resolves, then closes every connection at once (1001, 3001 for clients)
    /// and waits for them, up to `shutdown_timeout`.
    pub async fn run(self, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
        self.run_with(signal, Control::default()).await
    }

    /// Serves until `signal` resolves or an upgrade hands over, then drains (see [`Control`]).
    pub async fn run_with(self, signal: impl Future<Output = ()>, mut control: Control) -> Result<(), ServerError> {
        tokio::spawn(self.ctx.deadlines.clone().run_sweeper());
        let pruner = tokio::spawn(prune_admission(self.ctx.clone()));
        if let Some(admin) = self.ctx.admin.clone() {
            let deadlines = self.ctx.deadlines.clone();
            tokio::spawn(admin.run(async move { deadlines.wait_shutdown().await }));
        }
        let memory = tokio::spawn(crate::app::memory::watch(self.ctx.clone()));
        let mut side = self.start_side_listeners();
        let cores = match self.ctx.config.runtime.as_str() {
            "per-core" => Some(
                crate::app::percore::Cores::start(&self.listener, self.own_sockets, self.tls.clone(), &self.ctx)
                    .map_err(ServerError::Runtime)?,
            ),
            _ => None,
        };
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        if cores.is_none() && workers > 1 && self.ctx.config.fanout_direct_write && self.ctx.config.fanout_split_min > 0
        {
            self.ctx.node.hub.spread_direct_writes(self.ctx.config.fanout_split_min);
        }
        if let Some(mut sock) = control.predecessor.take() {
            // Accepting starts with the first `accept` below; the backlog holds whoever connects first.
            if let Err(e) = tokio::task::block_in_place(|| crate::app::upgrade::child_accepting(&mut sock)) {
                tracing::warn!(error = %e, "upgrade: could not tell the old process we accept");
            }
        }
        if let Some(path) = &control.pid_file {
            if let Err(e) = crate::app::upgrade::write_pid_file(path, std::process::id()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
        let mut hup = signal_stream(control.reload_on_sighup, SIGHUP);
        let mut usr2 = signal_stream(control.upgrade_on_sigusr2, SIGUSR2);
        let mut starting: Option<tokio::task::JoinHandle<std::io::Result<crate::app::upgrade::Successor>>> = None;
        let mut accepted_count = 0usize;
        let mut upgraded = false;
        tokio::pin!(signal);
        loop {
            tokio::select! {
                accepted = self.listener.accept(), if cores.is_none() => {
                    serve_accepted(accepted, &self.tls, &self.ctx, &mut accepted_count).await;
                }
                _ = &mut signal => break,
                Some(()) = recv(&mut hup) => {
                    let reloader = self.ctx.reloader.clone();
                    tokio::task::spawn_blocking(move || reloader.reload());
                }
                Some(()) = recv(&mut usr2) => {
                    if cores.is_some() {
                        // The cores' own sockets cannot be handed over: what waits in their queues would be lost.
                        tracing::error!("upgrade refused: runtime = \"per-core\" does not hand over; this process stays");
                    } else if starting.is_some() {
                        tracing::warn!("upgrade already under way; SIGUSR2 ignored");
                    } else {
                        tracing::info!("upgrade: starting the new process");
                        let fds = self.listener_fds();
                        starting = Some(tokio::task::spawn_blocking(move || {
                            let names: Vec<&str> = fds.iter().map(|(n, _)| *n).collect();
                            let raw: Vec<i32> = fds.iter().map(|(_, fd)| *fd).collect();
                            let mut s = crate::app::upgrade::start(&raw, &names)?;
                            crate::app::upgrade::parent_wait_ready(&mut s.socket)?;
                            Ok(s)
                        }));
                    }
                }
                started = join_opt(&mut starting) => {
                    starting = None;
                    match started {
                        Ok(Ok(successor)) => {
                            // Stop accepting before the snapshot: from here the successor takes every connection.
                            abort_side(&mut side);
                            if self.hand_over(successor).await {
                                upgraded = true;
                                break;
                            }
                            self.ctx.node.thaw();
                            side = self.start_side_listeners();
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "upgrade failed: the new process did not start; this one stays"),
                        Err(e) => tracing::error!(error = %e, "upgrade failed; this one stays"),
                    }
                }
            }
        }
        drop(self.listener);
        if let Some(cores) = &cores {
            cores.stop_accepting();
        }
        drop(self.internal);
        drop(self.tcp);
        abort_side(&mut side);
        pruner.abort();
        memory.abort();
        let window = if upgraded {
            self.ctx.config.drain_window
        } else if control.drain_on_terminate {
            self.ctx.config.shutdown_timeout
        } else {
            Duration::ZERO
        };
        drain(&self.ctx, window).await;
        if let Some(cores) = cores {
            cores.finish().await;
        }
        Ok(())
    }

    /// The listening sockets' fds, in the inherited order, with their `LISTEN_FDNAMES` names.
    fn listener_fds(&self) -> Vec<(&'static str, i32)> {
        use std::os::fd::AsRawFd;
        let mut v = vec![("listen", self.listener.as_raw_fd())];
        if let Some(l) = &self.internal {
            v.push(("internal", l.as_raw_fd()));
        }
        if let Some(l) = &self.tcp {
            v.push(("tcp", l.as_raw_fd()));
        }
        v
    }

    fn start_side_listeners(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut side = Vec::new();
        if let (Some(listener), Some(router)) = (self.internal.clone(), self.ctx.internal_router.clone()) {
            side.push(tokio::spawn(serve_internal(listener, router, self.ctx.clone())));
        }
        if let Some(listener) = self.tcp.clone() {
            side.push(tokio::spawn(serve_tcp(listener, self.ctx.clone())));
        }
        side
    }

    /// Freezes the node, sends the broker's streams, waits for the successor to accept. `false`: it
    /// failed, and this process goes on serving.
    async fn hand_over(&self, mut successor: crate::app::upgrade::Successor) -> bool {
        let ctx = self.ctx.clone();
        let pid = successor.pid;
        let result = tokio::task::spawn_blocking(move || {
            ctx.node.freeze();
            let snapshot = ctx.memory.snapshot();
            let streams = ctx.memory.num_streams();
            let sent = crate::app::upgrade::parent_hand_over(&mut successor.socket, &snapshot);
            if sent.is_err() && successor.exited() {
                tracing::error!(pid, "upgrade: the new process exited");
            }
            sent.map(|()| (snapshot.len(), streams))
        })
        .await;
        match result {
            Ok(Ok((bytes, streams))) => {
                tracing::info!(pid, streams, bytes, "upgrade: the new process accepts; draining this one");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(pid, error = %e, "upgrade failed: the new process did not take over; this one stays");
                false
            }
            Err(e) => {
                tracing::error!(pid, error = %e, "upgrade failed; this one stays");
                false
            }
        }
    }
}

/// One `accept` result on the public listener: the connection's task spawned on the current runtime
/// (`true`), or the error counted and logged, after a short pause (EMFILE/ENFILE/ECONNABORTED are
/// per-accept troubles, not reasons to stop serving).
pub(crate) async fn serve_accepted(
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
    tls: &Option<Arc<Tls>>,
    ctx: &Arc<Context>,
    accepted_count: &mut usize,
) -> bool {
    match accepted {
        Ok((stream, peer)) => {
            tracing::trace!(%peer, "accepted");
            metrics::counter!("ringcast_tcp_accepted_total").increment(1);
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "set_nodelay failed");
            }
            *accepted_count = accepted_count.wrapping_add(1);
            match tls {
                None => {
                    tokio::spawn(crate::ws::Connection::new(stream, ctx.clone(), *accepted_count));
                }
                Some(tls) => {
                    tokio::spawn(tls_connection(tls.clone(), stream, ctx.clone(), *accepted_count));
                }
            }
            true
        }
        Err(e) => {
            metrics::counter!("ringcast_tcp_accept_errors_total").increment(1);
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
            false
        }
    }
}

/// Disconnects every client with 3001 (shutdown: reconnect) spread evenly over `window` (client `i`
/// of `n` at `i/n` of it), so that they come back at a steady rate rather than all at once; then closes
/// what is left (echo and TCP connections, connections still in their handshake) with the shutdown
/// flag and waits up to `close_timeout` for them. A zero window closes everyone at once.
pub async fn drain(ctx: &Context, window: Duration) {
    let clients = ctx.node.clients();
    let n = clients.len();
    tracing::info!(clients = n, connections = ctx.live.len(), window = ?window, "shutting down: draining clients with 3001");
    let start = tokio::time::Instant::now();
    let mut done = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while done < n && !window.is_zero() {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64() / window.as_secs_f64();
        let due = ((elapsed * n as f64) as usize + 1).min(n);
        for client in &clients[done..due.max(done)] {
            client.request_disconnect(DisconnectCode::SHUTDOWN.code, DisconnectCode::SHUTDOWN.reason);
        }
        done = due.max(done);
    }
    drop(clients);
    ctx.deadlines.shutdown();
    let wait = if window.is_zero() { ctx.config.shutdown_timeout } else { ctx.config.close_timeout };
    if tokio::time::timeout(wait, ctx.live.wait_empty()).await.is_err() {
        tracing::warn!(remaining = ctx.live.len(), "shutdown timeout: dropping remaining connections");
    }
}

fn abort_side(side: &mut Vec<tokio::task::JoinHandle<()>>) {
    for task in side.drain(..) {
        task.abort();
    }
}

async fn join_opt<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
use tokio::signal::unix::{signal as unix_signal, Signal, SignalKind};

#[cfg(unix)]
const SIGHUP: fn() -> SignalKind = SignalKind::hangup;
#[cfg(unix)]
const SIGUSR2: fn() -> SignalKind = SignalKind::user_defined2;

fn signal_stream(on: bool, kind: fn() -> SignalKind) -> Option<Signal> {
    if !on {
        return None;
    }
    match unix_signal(kind()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for a signal");
            None
        }
    }
}

async fn recv(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
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
async fn serve_internal(listener: Arc<TcpListener>, router: axum::Router, ctx: Arc<Context>) {
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
/// (the task is aborted; the connections themselves see the shutdown flag). Admission decides first,
/// with the counts WebSocket upgrades use (`app::admission`): a refused connection gets one ERROR frame
/// (9 or 12) and is closed, an admitted one holds its count until its task ends.
async fn serve_tcp(listener: Arc<TcpListener>, ctx: Arc<Context>) {
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
                let ip = IpKey::of(peer.ip());
                match ctx.admission.admit(Transport::Tcp, ip, ctx.deadlines.now_ms()) {
                    Ok(()) => {
                        let admitted = Admitted { ctx: ctx.clone(), ip };
                        let connection = crate::tcp::Connection::new(stream, ctx.clone(), accepted);
                        tokio::spawn(async move {
                            connection.run().await;
                            drop(admitted);
                        });
                    }
                    Err(refusal) => {
                        tokio::spawn(refuse_tcp(stream, refusal.tcp_frame(), ctx.config.close_timeout));
                    }
                }
            }
            Err(e) => {
                metrics::counter!("ringcast_tcp_accept_errors_total").increment(1);
                tracing::warn!(error = %e, "tcp protocol listener: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A TCP connection's admission, given back when its task ends (or is dropped unpolled).
struct Admitted {
    ctx: Arc<Context>,
    ip: IpKey,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.ctx.admission.release(self.ip);
    }
}

/// Sends a refused TCP connection its ERROR frame, then FIN, then reads and discards until the peer
/// closes (so no RST destroys the frame in flight), all within `linger` (`close_timeout`).
async fn refuse_tcp(mut stream: TcpStream, frame: bytes::Bytes, linger: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let closed = tokio::time::timeout(linger, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 256];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
    if let Ok(Err(e)) = closed {
        tracing::debug!(error = %e, "tcp refusal: connection ended with an IO error");
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
    run_blocking_with(config, settings, RunOptions::default())
}

/// What `ringcast serve` adds to [`run_blocking`]: where the configuration came from (for reloads) and
/// the reloadable parts the CLI owns (the log filter).
#[derive(Default)]
pub struct RunOptions {
    pub source: crate::app::reload::ConfigSource,
    pub hooks: Vec<Box<dyn crate::app::reload::ReloadHook>>,
}

/// Builds the runtime, takes inherited sockets (socket activation, upgrade) or binds, serves until
/// SIGINT/SIGTERM (drained over `shutdown_timeout`) or an upgrade (drained over `drain_window`);
/// tokio's own bound on its blocking pool, kept for everything else that runs there.
const DEFAULT_BLOCKING_THREADS: usize = 512;

/// SIGHUP reloads the configuration, SIGUSR2 upgrades.
pub fn run_blocking_with(config: Config, settings: Settings, options: RunOptions) -> Result<(), ServerError> {
    // Before the runtime's threads exist: both read (and clear) environment variables.
    let inherited = inherited_listeners();
    let predecessor = crate::app::upgrade::inherited_socket();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime == "per-core" {
        // Connections run on the cores' own runtimes; this one keeps signals and background tasks.
        builder.worker_threads(1);
    } else if config.workers > 0 {
        builder.worker_threads(config.workers);
    }
    if settings.memory.is_some() {
        builder.on_thread_park(crate::app::memory::on_worker_park);
    }
    // Each engine call a session waits on holds a thread (`block_in_place` hands the worker's queue to
    // a replacement from the blocking pool). `engine_max_waiting` must be what refuses the next one,
    // never the pool running dry: with no replacement left, every worker would be waiting and nothing
    // would run the engine's connection.
    builder.max_blocking_threads(config.engine_max_waiting + DEFAULT_BLOCKING_THREADS);
    let runtime = builder.enable_all().thread_name("ringcast").build().map_err(ServerError::Runtime)?;
    runtime.block_on(async move {
        let from_fds = inherited.len();
        let pid_file = (!config.pid_file.is_empty()).then(|| std::path::PathBuf::from(&config.pid_file));
        let server = Server::bind_inherited(config, settings, inherited)?;
        server.ctx.reloader.set_source(options.source);
        for hook in options.hooks {
            server.ctx.reloader.add_hook(hook);
        }
        let mut predecessor = predecessor;
        if let Some(sock) = predecessor.as_mut() {
            // Started by an upgrade: take the old process's streams before the first accept.
            let snapshot = tokio::task::block_in_place(|| crate::app::upgrade::child_receive(sock))
                .map_err(ServerError::Runtime)?;
            match server.ctx.memory.restore(&snapshot) {
                Ok(streams) => tracing::info!(streams, bytes = snapshot.len(), "upgrade: took over the old process's streams"),
                Err(e) => {
                    tracing::error!(error = %e, "upgrade: cannot read the old process's streams");
                    return Err(ServerError::Runtime(std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
                }
            }
        }
        let addr = server.local_addr().map_err(ServerError::Runtime)?;
        tracing::info!(%addr, inherited = from_fds, strategy = server.ctx.settings.strategy.name(), echo = server.ctx.settings.echo, "ringcast listening");
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
        if let Some(tls) = server.tls() {
            tracing::info!(cert = %tls.files().cert.display(), "TLS on: wss:// and https://; a reload (SIGHUP) reads the pair again");
            server.ctx.reloader.add_hook(Box::new(crate::app::tls::TlsReload(tls)));
        }
        let control = Control {
            drain_on_terminate: true,
            reload_on_sighup: true,
            upgrade_on_sigusr2: true,
            predecessor,
            pid_file,
        };
        server.run_with(termination_signal(), control).await
    })
}
