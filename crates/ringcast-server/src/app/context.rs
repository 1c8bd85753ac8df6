//! What every connection task shares: the validated configuration, the node, the buffer pool, the
//! deadline table, the HTTP routers and the live-connection count. Built once at start
//! ([`Context::new`]); connections hold an `Arc` of it.

use std::sync::Arc;

use ringcast_wire::buffer::{AnyBuffer, GrowableBuffer, PooledBuffer, RingBuffer};
use ringcast_wire::{BufferPool, Limits, Strategy};

use crate::app::config::{Config, ConfigError, Settings};
use crate::app::error::ServerError;
use crate::app::reload::{ConfigSource, Reloader};
use crate::broker::MemoryBroker;
use crate::policy::namespace::Namespaces;
use crate::pubsub::node::Node;
use crate::transport::deadline::Deadlines;

/// What every connection task shares: read-only settings and the buffer pool.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub settings: Settings,
    pub limits: Limits,
    pub pool: Arc<BufferPool>,
    /// `allowed_origins` at start (what is in force is the node's policy: reloads change it).
    pub allowed_origins: Vec<String>,
    /// SIGHUP and `POST /api/reload`: re-reads the configuration and applies what can change.
    pub reloader: Arc<Reloader>,
    /// Every connection's deadlines; also how shutdown reaches them.
    pub deadlines: Arc<Deadlines>,
    /// Channels, subscriptions, history, presence.
    pub node: Arc<Node>,
    /// The node's broker (the embedded memory broker): what an upgrade hands to the next process.
    pub memory: Arc<MemoryBroker>,
    /// What plain HTTP requests on the public listener reach: the HTTP API, /health and /metrics, or only
    /// /health when `internal_listen` is set.
    pub router: axum::Router,
    /// The HTTP API, /health and /metrics for the `internal_listen` address, when set.
    pub internal_router: Option<axum::Router>,
    /// Connection tasks alive; shutdown waits for them.
    pub live: Live,
    /// Which upgrade requests are let in (`max_connections`, per-address limits and connect rate).
    pub admission: crate::app::admission::Admission,
    /// The admin dashboard, when `admin` is on (its routes are in `router` or `internal_router`).
    pub admin: Option<Arc<crate::admin::Admin>>,
    /// Socket byte counters (handles registered once: an increment is one atomic add).
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
    /// `runtime = "per-core"`: connections each core's runtime accepted (empty under "shared").
    pub cores: crate::app::percore::CoreStats,
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

/// `POST /api/reload`'s answer: 200 with what changed, or 400 naming the key that was refused.
fn reload_reply(reloader: &Reloader) -> (axum::http::StatusCode, String) {
    match reloader.reload() {
        Ok(report) => (axum::http::StatusCode::OK, serde_json::json!({ "result": report }).to_string()),
        Err(e) => {
            let key = match &e {
                ConfigError::Invalid { key, .. } => Some(key.clone()),
                _ => None,
            };
            (
                axum::http::StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": { "message": e.to_string(), "key": key } }).to_string(),
            )
        }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", fastrand::u8(..))).collect()
}

impl Context {
    /// A new connection's read buffer, of the configured strategy (every transport reads through one).
    pub fn read_buffer(&self) -> AnyBuffer {
        let cfg = &self.config;
        match self.settings.strategy {
            Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(cfg.ring_buffer_size)),
            Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(self.pool.clone())),
            Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(
                cfg.growable_initial_size,
                usize::try_from(cfg.max_frame_size).unwrap_or(usize::MAX),
            )),
        }
    }

    pub fn new(mut config: Config, settings: Settings) -> Result<Self, ServerError> {
        let loaded = config.clone();
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
        let policy = crate::app::reload::build_policy(&config)?;
        let memory = Arc::new(MemoryBroker::new());
        let allowed_origins = policy.allowed_origins.clone();
        // The policy from the configuration replaces the placeholder at once; reloads replace it again.
        let mut node = Node::new(memory.clone(), Namespaces::default(), None, false);
        let mut redis = None;
        let mut nats = None;
        let breaker = crate::engine::breaker::BreakerPolicy {
            failures: config.engine_breaker_failures,
            cooldown: config.engine_breaker_cooldown,
        };
        // One bound for the engine calls sessions wait on, whichever engine (`engine_max_waiting`).
        let waiting = Arc::new(crate::engine::WaitLimit::new(config.engine_max_waiting));
        if config.broker == "redis" {
            let engine = connect_redis(&config)?;
            node = node.with_remote(crate::engine::Remote::guarded(engine.clone(), breaker, waiting.clone()));
            redis = Some(engine);
        } else if config.broker == "nats" {
            let engine = connect_nats(&config)?;
            // Presence from Redis when asked (its PUB/SUB side stays unused: no inbound is set on it).
            let presence: Arc<dyn crate::engine::PresenceManager> =
                if config.presence_manager == "redis" { connect_redis(&config)? } else { engine.clone() };
            let parts = crate::engine::breaker::Parts { broker: engine.clone(), history: engine.clone(), presence };
            node = node.with_remote(crate::engine::Remote::guarded(Arc::new(parts), breaker, waiting));
            nats = Some(engine);
        }
        let node = Arc::new(node);
        let inbound: Arc<dyn crate::engine::Inbound> = node.clone();
        if let Some(engine) = redis {
            engine.set_inbound(Arc::downgrade(&inbound));
        }
        if let Some(engine) = nats {
            engine.set_inbound(Arc::downgrade(&inbound));
        }
        if node.remote.is_some() {
            // Every networked engine carries control messages: the node announces itself to the others.
            tokio::spawn(crate::pubsub::registry::announce(Arc::downgrade(&node)));
        }
        node.set_policy(policy);
        let reloader = Arc::new(Reloader::new(ConfigSource::default(), loaded, config.clone(), node.clone()));
        let limits = Limits { max_frame_payload: config.max_frame_size, max_message_size: config.max_message_size };
        let pool = BufferPool::new(config.pool_buffer_size, config.pool_max_buffers);
        let api = crate::api::ApiConfig { api_key: config.api_key.clone(), insecure: false };
        let reload: crate::api::ReloadFn = {
            let reloader = reloader.clone();
            Arc::new(move || reload_reply(&reloader))
        };
        let mut full = crate::api::router_with_reload(node.clone(), api, crate::metrics::install(), Some(reload));
        if let Some(remote) = &node.remote {
            // After `install`, so each shard's breaker series are there (closed, 0) before its first change.
            for breaker in remote.breakers.iter() {
                breaker.report();
            }
        }
        let admin = settings.admin.then(|| {
            if config.admin_password.is_empty() {
                // Only reachable with --dev (validation refuses `admin` without a password otherwise).
                config.admin_password = random_hex(12);
                tracing::warn!(admin_password = %config.admin_password, "dev mode: generated admin password (set admin_password to choose one)");
            }
            crate::admin::Admin::new(&config.admin_password, &config.admin_secret, node.clone())
        });
        if let Some(admin) = &admin {
            full = full.merge(crate::admin::router(admin.clone()));
        }
        // Centrifugo's internal port: operators keep the API, metrics and dashboard off the port clients reach.
        let (router, internal_router) = match settings.internal_listen {
            Some(_) => (crate::api::health_router(node.clone()), Some(full)),
            None => (full, None),
        };
        // After `install`: a handle taken before a recorder exists stays a no-op.
        let bytes_in = metrics::counter!(crate::metrics::BYTES_IN_TOTAL);
        let bytes_out = metrics::counter!(crate::metrics::BYTES_OUT_TOTAL);
        let admission = crate::app::admission::Admission::new(&config).with_watermarks(settings.memory);
        Ok(Context {
            config,
            settings,
            limits,
            pool,
            allowed_origins,
            reloader,
            memory,
            deadlines: Deadlines::new(),
            node,
            router,
            internal_router,
            live: Live::default(),
            admission,
            admin,
            bytes_in,
            bytes_out,
            cores: Default::default(),
        })
    }
}

/// Connects the Redis engine, one shard per `redis_url` (the node does not start without every one of
/// them: a cluster node that cannot reach its engine would serve a channel nobody else sees).
fn connect_redis(config: &Config) -> Result<Arc<crate::engine::shards::ShardedRedis>, ServerError> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| ServerError::Runtime(std::io::Error::other(format!("broker = \"redis\" needs a runtime: {e}"))))?;
    let connect = crate::engine::shards::ShardedRedis::connect(
        &config.redis_url,
        &config.redis_prefix,
        config.redis_timeout,
        config.redis_presence_ttl,
    );
    let engine = tokio::task::block_in_place(|| handle.block_on(connect));
    let engine = engine.map_err(|e| ServerError::Runtime(std::io::Error::other(e)))?;
    tracing::info!(shards = engine.shard_count(), prefix = %config.redis_prefix, "broker: redis");
    Ok(engine)
}

/// Connects the NATS broker (the node does not start without it, as with Redis).
fn connect_nats(config: &Config) -> Result<Arc<crate::engine::nats::NatsEngine>, ServerError> {
    let settings = crate::engine::nats::NatsSettings {
        url: config.nats_url.clone(),
        prefix: config.nats_prefix.clone(),
        dial_timeout: config.nats_dial_timeout,
        write_timeout: config.nats_write_timeout,
        history: config.nats_history_limits(),
    };
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| ServerError::Runtime(std::io::Error::other(format!("broker = \"nats\" needs a runtime: {e}"))))?;
    let connect = crate::engine::nats::NatsEngine::connect(&settings);
    let engine = tokio::task::block_in_place(|| handle.block_on(connect));
    let engine = engine.map_err(|e| ServerError::Runtime(std::io::Error::other(e)))?;
    tracing::info!(prefix = %settings.prefix, presence_manager = %config.presence_manager, "broker: nats");
    Ok(engine)
}
