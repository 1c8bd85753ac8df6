//! `runtime = "per-core"`: one single-thread tokio runtime per worker thread, each accepting on its own
//! listening socket and driving the connections it accepted, so that a connection never moves between
//! threads (no work stealing, no cross-thread wake of its task when its own socket is ready).
//!
//! Every core's socket is bound with SO_REUSEPORT to the listener's address, and the kernel spreads new
//! connections over them by a hash of the 4-tuple; core 0 accepts on (a duplicate of) the server's own
//! listener, which was bound with SO_REUSEPORT too. A listener that was inherited (socket activation, an
//! upgrade) was not: then every core accepts from that one socket (the first to wake takes each
//! connection; it still never migrates). What is not a connection (signals, the deadline sweeper, the
//! memory watcher, admin, `internal_listen`, `tcp_listen`) stays on the runtime that called
//! [`crate::app::server::Server::run_with`].
//!
//! Shutdown runs in two steps driven from that runtime: [`Cores::stop_accepting`] (every core drops its
//! socket, its connections run on), then, once the drain is over, [`Cores::finish`] (every core's runtime
//! ends, dropping what is left, and its thread is joined).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::context::Context;
use crate::app::tls::Tls;

/// How many connections each core accepted (set when the cores start; empty under "shared").
#[derive(Debug, Default)]
pub struct CoreStats {
    accepted: OnceLock<Vec<AtomicU64>>,
}

impl CoreStats {
    /// Connections accepted so far, one entry per core.
    pub fn accepted(&self) -> Vec<u64> {
        self.accepted.get().map(|v| v.iter().map(|n| n.load(Ordering::Relaxed)).collect()).unwrap_or_default()
    }

    fn count(&self, core: usize) {
        if let Some(n) = self.accepted.get().and_then(|v| v.get(core)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where the cores are in shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Serving,
    NotAccepting,
    Finished,
}

/// The running cores: their threads and the shutdown switch.
pub struct Cores {
    stage: watch::Sender<Stage>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The number of cores `workers` asks for (0: one per CPU).
pub fn core_count(workers: usize) -> usize {
    if workers > 0 {
        workers
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }
}

/// A listening socket bound with SO_REUSEPORT (and SO_REUSEADDR) to `addr`.
pub fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

impl Cores {
    /// Starts `ctx.config.workers` cores (one per CPU when 0) accepting on `listener`'s address: core 0
    /// on a duplicate of `listener`, the others on sockets of their own when `own_sockets` (the listener
    /// was bound with SO_REUSEPORT), else on duplicates of it too.
    pub fn start(
        listener: &TcpListener,
        own_sockets: bool,
        tls: Option<Arc<Tls>>,
        ctx: &Arc<Context>,
    ) -> std::io::Result<Cores> {
        let n = core_count(ctx.config.workers);
        let addr = listener.local_addr()?;
        let mut sockets = Vec::with_capacity(n);
        for core in 0..n {
            let socket: std::net::TcpListener = if core == 0 || !own_sockets {
                SockRef::from(listener).try_clone()?.into()
            } else {
                bind_reuse_port(addr)?
            };
            socket.set_nonblocking(true)?;
            sockets.push(socket);
        }
        let _ = ctx.cores.accepted.set((0..n).map(|_| AtomicU64::new(0)).collect());
        let (stage, watching) = watch::channel(Stage::Serving);
        let mut threads = Vec::with_capacity(n);
        for (core, socket) in sockets.into_iter().enumerate() {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            if ctx.settings.memory.is_some() {
                builder.on_thread_park(crate::app::memory::on_worker_park);
            }
            let runtime = builder.enable_all().build()?;
            let (ctx, tls, stage) = (ctx.clone(), tls.clone(), watching.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ringcast-core-{core}"))
                .spawn(move || runtime.block_on(serve_core(core, socket, tls, ctx, stage)))?;
            threads.push(thread);
        }
        tracing::info!(cores = n, own_sockets, "runtime = per-core: one single-thread runtime per core");
        Ok(Cores { stage, threads })
    }

    /// Every core stops accepting and closes its socket; its connections run on.
    pub fn stop_accepting(&self) {
        self.stage.send_replace(Stage::NotAccepting);
    }

    /// Every core's runtime ends (what is left of its connections is dropped); waits for the threads.
    pub async fn finish(self) {
        self.stage.send_replace(Stage::Finished);
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a per-core runtime thread panicked");
                }
            }
        })
        .await;
        if let Err(e) = joined {
            tracing::error!(error = %e, "per-core: could not wait for the core threads");
        }
    }
}

/// One core: accepts on its socket until told to stop, then keeps driving its connections until the
/// drain is over.
async fn serve_core(
    core: usize,
    socket: std::net::TcpListener,
    tls: Option<Arc<Tls>>,
    ctx: Arc<Context>,
    mut stage: watch::Receiver<Stage>,
) {
    match TcpListener::from_std(socket) {
        Ok(listener) => {
            let mut accepted_count = 0usize;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if crate::app::server::serve_accepted(accepted, &tls, &ctx, &mut accepted_count).await {
                            ctx.cores.count(core);
                        }
                    }
                    _ = stage.wait_for(|s| *s >= Stage::NotAccepting) => break,
                }
            }
        }
        Err(e) => tracing::error!(core, error = %e, "per-core: cannot register the listening socket"),
    }
    let _ = stage.wait_for(|s| *s >= Stage::Finished).await;
}
