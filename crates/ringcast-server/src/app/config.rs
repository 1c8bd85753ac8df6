//! Configuration: one typed struct, with defaults, loaded from a TOML file, environment and flags.
//!
//! Every key can be set three ways besides its default, in this order of precedence:
//! a command-line flag of the same name (`read_buffer` → `--read-buffer pool`), an environment variable
//! (`RINGCAST_READ_BUFFER=pool`), the TOML file. [`KEYS`] is the single list of keys with their docs; the
//! CLI builds its flags from it, [`Config::load`] reads the environment from it, and `genconfig` prints it.
//! A test keeps it in step with the struct.
//!
//! Every value is checked at start ([`Config::validate`]); an error names the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use ringcast_wire::{DeflateConfig, Strategy};

/// What kind of value a key takes (how a flag or environment string is turned into TOML).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    Str,
    /// A list of strings; comma-separated on the command line and in the environment.
    List,
    /// A TOML table or array of tables: set in the config file only.
    Table,
}

/// A configuration key and its documentation.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn key(name: &'static str, kind: Kind, help: &'static str) -> Key {
    Key { name, kind, help }
}

/// Every configuration key, in the order `genconfig` documents them.
pub const KEYS: &[Key] = &[
    key("listen", Kind::Str, "Address the server listens on; WebSocket endpoints and the HTTP API share it."),
    key("dev", Kind::Bool, "Development mode: enables the echo endpoint and allows any Origin."),
    key("workers", Kind::Int, "Runtime worker threads; 0 means one per CPU core."),
    key("runtime", Kind::Str, "How connections are driven: \"shared\" (default; one multi-thread tokio runtime of `workers` threads, work stealing) or \"per-core\" (`workers` threads, each a single-thread runtime with its own SO_REUSEPORT listener on `listen`, driving the connections it accepts, which never migrate; background tasks on one more thread). per-core needs broker = \"memory\" and serves no SIGUSR2 upgrade (refused, this process stays)."),
    key("read_buffer", Kind::Str, "Read-buffer strategy: \"pool\" (default; idle connections hold no buffer), \"ring\" (fixed per connection), \"growable\"."),
    key("ring_buffer_size", Kind::Int, "Bytes of each connection's ring buffer (read_buffer = \"ring\")."),
    key("pool_buffer_size", Kind::Int, "Bytes of each pooled read buffer (read_buffer = \"pool\")."),
    key("pool_max_buffers", Kind::Int, "Idle buffers the pool keeps for reuse; more are freed."),
    key("growable_initial_size", Kind::Int, "First allocation of a growable read buffer (read_buffer = \"growable\")."),
    key("max_frame_size", Kind::Int, "Largest accepted frame payload in bytes; larger closes with 1009."),
    key("max_message_size", Kind::Int, "Largest accepted message (all fragments) in bytes; larger closes with 1009."),
    key("max_request_head", Kind::Int, "Largest accepted HTTP upgrade request head in bytes; larger answers 431."),
    key("client_queue_max_size", Kind::Int, "Bytes of outbound frames (pushes and replies) a connection may have queued; over it a client is disconnected 3008 (slow). A client's socket is not read while its queue is over half of it; the echo endpoint stops reading while over it."),
    key("fanout_direct_write", Kind::Bool, "Fan-out writes a publication straight to the socket of an idle subscriber (plain ws:// client connections; not TLS, not the TCP protocol) instead of waking its connection's task; only what the kernel does not take is queued for the task. false: every delivery queues and wakes (for A/B measurements)."),
    key("fanout_split_min", Kind::Int, "A fan-out that claimed at least this many idle subscribers for direct writes hands half of them to a helper task the other worker runs, and writes the other half itself. 0: never split (every direct write on the publishing thread). Not with runtime = \"per-core\"."),
    key("handshake_timeout", Kind::Str, "Time a new connection has to complete its upgrade request (slowloris guard)."),
    key("idle_timeout", Kind::Str, "Close a connection that sends nothing for this long; \"0s\" disables."),
    key("write_timeout", Kind::Str, "Close a connection whose socket accepts no bytes for this long while we have bytes to send."),
    key("close_timeout", Kind::Str, "How long to wait for the peer's close frame after we sent ours."),
    key("shutdown_timeout", Kind::Str, "On SIGINT/SIGTERM, the drain window: clients are disconnected with 3001 (shutdown, reconnect) spread evenly over it, then the rest get close_timeout to close before the process exits."),
    key("drain_window", Kind::Str, "On an upgrade (SIGUSR2), the time over which the old process disconnects its clients with 3001 (shutdown, reconnect), spread evenly, so they reconnect to the new process without a storm."),
    key("pid_file", Kind::Str, "File the server writes its process id to (and, after an upgrade, the new process rewrites). Empty: none."),
    key("echo", Kind::Bool, "Serve the echo endpoint (default: on with --dev, off otherwise)."),
    key("echo_path", Kind::Str, "Path of the echo endpoint; \"/\" works for load tools that always request /."),
    key("compression", Kind::Bool, "Accept permessage-deflate (RFC 7692) offers: messages both ways may be compressed. Publications are compressed once for every subscriber that shares the parameters."),
    key("compression_level", Kind::Int, "permessage-deflate: zlib level, 0 (store) to 9 (smallest, slowest)."),
    key("compression_min_size", Kind::Int, "permessage-deflate: messages shorter than this many bytes are sent uncompressed (at most 65535)."),
    key("compression_context_takeover", Kind::Bool, "permessage-deflate: let the server keep its compressor between messages on the echo endpoint (better ratio, ~370 KiB per connection that uses it). Client-protocol connections never get it, so publications stay compressed once and shared."),
    key("compression_server_max_window_bits", Kind::Int, "permessage-deflate: largest window (base-2 log, 9-15) the server compresses with; a client may ask for less."),
    key("compression_client_max_window_bits", Kind::Int, "permessage-deflate: largest window (base-2 log, 8-15) a client may compress with, when its offer lets us limit it (smaller: less inflater memory)."),
    key("allowed_origins", Kind::List, "Origins allowed to open WebSockets (\"*\" for any). Empty: requests without Origin and same-origin requests only."),
    key("log_level", Kind::Str, "Log filter (tracing EnvFilter syntax), e.g. \"info\" or \"ringcast_server=debug\"."),
    key("ping_interval", Kind::Str, "Client protocol: how often the server pings a connected client (it must answer)."),
    key("pong_timeout", Kind::Str, "Client protocol: how long a client has to answer a ping before disconnect 3012."),
    key("client_stale_close_delay", Kind::Str, "Client protocol: a WebSocket that has not sent a successful connect this long after opening is closed with 3502 (stale); \"0s\" disables."),
    key("client_user_connection_limit", Kind::Int, "Client protocol: connections one user (non-empty user id) may hold on this node; one more is disconnected 3504 (connection limit). 0: unlimited."),
    key("history_max_publication_limit", Kind::Int, "Client protocol: most publications one history reply carries (a client's larger or absent limit is lowered to it). 0: no cap."),
    key("allow_anonymous", Kind::Bool, "Client protocol: accept connect commands without a token (user \"\")."),
    key("token_hmac_secret_key", Kind::Str, "Secret for HS256/384/512 connection and subscription tokens."),
    key("token_rsa_public_key", Kind::Str, "PEM public key for RS256/384/512 tokens."),
    key("token_ecdsa_public_key", Kind::Str, "PEM public key for ES256/384 tokens."),
    key("tls_cert", Kind::Str, "PEM file of the certificate chain (leaf first) the listener serves TLS with: wss:// and https:// (API, /metrics, /health) on `listen`, ALPN http/1.1. Reloaded with tls_key on SIGHUP; a file that does not load keeps the old pair. Empty: plain ws:// and http://."),
    key("tls_key", Kind::Str, "PEM file of the private key (PKCS#8, PKCS#1 or SEC1) for tls_cert. Set both or neither."),
    key("internal_listen", Kind::Str, "Address (HOST:PORT) serving /api, /metrics and /health on their own; when set, the public listener serves only WebSockets and /health. Empty: all on `listen`."),
    key("tcp_listen", Kind::Str, "Address (HOST:PORT) of the raw TCP binary protocol (docs/tcp-protocol.md). Empty: off, except with --dev, where it is `listen`'s host on port 7070 (an ephemeral port when `listen`'s port is 0). \"off\": off even with --dev."),
    key("tcp_max_body_size", Kind::Int, "TCP protocol: largest accepted frame body in bytes; a larger body_len is answered ERROR 4 and the connection closed."),
    key("tcp_ping_interval", Kind::Str, "TCP protocol: the server pings a client silent for this long; \"0s\" disables server pings."),
    key("tcp_pong_timeout_min", Kind::Str, "TCP protocol: the shortest time a client has to answer a ping (the deadline is 1.5 x the median of its last round trips, within these bounds)."),
    key("tcp_pong_timeout_max", Kind::Str, "TCP protocol: the longest time a client has to answer a ping (also the deadline before any round trip was measured); late: ERROR 11 and close."),
    key("api_key", Kind::Str, "Key the server HTTP API requires (X-API-Key or Authorization: apikey). Empty: the API refuses every call."),
    key("admin", Kind::Bool, "Serve the live admin dashboard at /admin (on `internal_listen` when set, else on `listen`). Default: on with --dev, off otherwise."),
    key("admin_password", Kind::Str, "Password of the admin dashboard's login form; required when `admin` is on (with --dev and none set, one is generated and logged)."),
    key("admin_secret", Kind::Str, "Key that signs admin session tokens (HMAC-SHA256; the login cookie, or `Authorization: token ...`). Empty: a random key per process (sessions end at restart)."),
    key("channel_max_length", Kind::Int, "Longest channel name in bytes (Centrifugo's channel_max_length); longer names are answered 107."),
    key("client_channel_limit", Kind::Int, "Subscriptions one connection may hold (Centrifugo's client_channel_limit); one more is answered 106. 0: no limit."),
    key("max_connections", Kind::Int, "Admission: client connections this node holds at once, WebSocket and TCP protocol (tcp_listen) together; one more upgrade request is answered 503 with Retry-After, one more TCP connection ERROR 12 and closed. 0: unlimited."),
    key("client_connect_rate", Kind::Int, "Admission: connections per second one source address (IPv4 /32, IPv6 /64) may open, WebSocket upgrades and TCP protocol connections from one token bucket; over it an upgrade is answered 429 with Retry-After, a TCP connection ERROR 9 and closed. 0: unlimited."),
    key("client_connect_burst", Kind::Int, "Admission: connections one source address may open at once before client_connect_rate applies (the bucket's size). 0: the rate (one second's worth)."),
    key("client_max_connections_per_ip", Kind::Int, "Admission: connections one source address (IPv4 /32, IPv6 /64) may hold at once, WebSocket and TCP together; one more upgrade request is answered 503 with Retry-After, one more TCP connection ERROR 12 and closed. 0: unlimited."),
    key("memory_high_watermark", Kind::Str, "Admission: resident memory (RSS) over which the node refuses new connections (WebSocket: 503 with Retry-After: 5; TCP: ERROR 12) and disconnects the clients with the largest outbound backlogs with 3008, largest first, until RSS is below memory_low_watermark. Bytes (\"1073741824\", \"768MiB\", \"2GB\") or a percentage of the cgroup's memory limit (\"80%\"; cgroup v2 memory.max or v1 memory.limit_in_bytes; an error when there is none). Empty: off."),
    key("memory_low_watermark", Kind::Str, "Admission: once over memory_high_watermark, the node admits connections again when RSS falls below this (bytes or a percentage, as for the high watermark). Empty: 90% of memory_high_watermark."),
    key("client_command_rate", Kind::Int, "Client protocol: commands per second one connection may send (a token bucket; pongs are not counted); a command over it is answered error 111 (too many requests, temporary). 0: unlimited."),
    key("client_command_burst", Kind::Int, "Client protocol: commands one connection may send at once before client_command_rate applies (the bucket's size). 0: the rate (one second's worth)."),
    key("client_channel_publish_rate", Kind::Int, "Client protocol: publications per second one connection may make to one channel (a token bucket per connection and channel, kept only while the client publishes there); a publication over it is answered error 111 (too many requests, temporary; TCP protocol: ERROR 9) and the connection stays. 0: unlimited."),
    key("client_channel_publish_burst", Kind::Int, "Client protocol: publications one connection may make to one channel at once before client_channel_publish_rate applies (the bucket's size). 0: the rate (one second's worth)."),
    key("client_flood_disconnect_after", Kind::Str, "Client protocol: a connection whose commands are still refused this long after its first refusal is disconnected with 3013 (too many requests; SDKs reconnect with backoff). \"0s\": never."),
    key("broker", Kind::Str, "Engine of publications, history and presence: \"memory\" (default; this node only, nothing else needed), \"redis\" (several nodes share channels, history and presence through redis_url) or \"nats\" (several nodes share publications through nats_url; history, positioning and recovery in one JetStream stream, so the NATS server needs JetStream when a namespace keeps history; presence only with presence_manager = \"redis\")."),
    key("redis_url", Kind::List, "broker = \"redis\": the Redis instances (redis://HOST:PORT[/DB], rediss:// for TLS), 1 to 64. Several: each channel lives on one of them, chosen by a consistent hash of its name (FNV-1a + jump hash, as Centrifugo); every node must list the same URLs in the same order; control messages go through the first. Redis Cluster is not supported (redis_cluster_address is refused)."),
    key("redis_prefix", Kind::Str, "broker = \"redis\": prefix of every Redis key and PUB/SUB channel ringcast uses, so several clusters (or tests) can share one Redis."),
    key("redis_presence_ttl", Kind::Str, "broker = \"redis\": how long a client's presence entry outlives its last refresh (1s to 24h), Centrifugo's option of that name; a node re-adds its clients' entries every third of it (at most every 20s), so a killed node's clients leave presence within this time."),
    key("engine_max_waiting", Kind::Int, "broker = \"redis\" or \"nats\": engine calls client commands may wait on at once (1 to 100000); a command over it answers error 100 (internal, temporary) at once and counts in ringcast_engine_refused_total, so a slow engine cannot hold every worker thread."),
    key("redis_timeout", Kind::Str, "broker = \"redis\": bound of every Redis call (10ms to 60s); a publish, history or presence call that takes longer answers error 100 (internal, temporary)."),
    key("engine_breaker_failures", Kind::Int, "broker = \"redis\" or \"nats\": circuit breaker in front of the engine, one per Redis shard: after this many consecutive failed calls to one shard (unavailable, or over redis_timeout / nats_write_timeout), publish, history, presence and subscribe calls on that shard's channels fail fast with error 100 (internal, temporary) without touching the engine, and /health reports degraded. 0: off. At most 10000."),
    key("engine_breaker_cooldown", Kind::Str, "broker = \"redis\" or \"nats\": how long the circuit breaker stays open before letting one probe call through (100ms to 10m); the probe's success closes it, its failure opens it for another cool-down."),
    key("nats_url", Kind::Str, "broker = \"nats\": the NATS server (nats://HOST:PORT, tls:// for TLS)."),
    key("nats_prefix", Kind::Str, "broker = \"nats\": first subject tokens of every subject ringcast uses (Centrifugo's nats_prefix), so several clusters can share one NATS."),
    key("nats_dial_timeout", Kind::Str, "broker = \"nats\": bound of the connection to NATS and of each reconnection attempt (Centrifugo's nats_dial_timeout)."),
    key("nats_write_timeout", Kind::Str, "broker = \"nats\": bound of every publish, subscribe and control call (Centrifugo's nats_write_timeout); a publish that takes longer, or any while NATS is unreachable, answers error 100."),
    key("presence_manager", Kind::Str, "Where presence is kept, when not in the broker: \"\" (default: the broker's own; none with broker = \"nats\") or \"redis\" (with broker = \"nats\": presence in Redis at redis_url under redis_prefix, as the Redis engine keeps it)."),
    key("channels", Kind::Table, "Options of channels outside any namespace ([channels] table: allow_subscribe_for_client, presence, history_size, ...)."),
    key("namespaces", Kind::Table, "Channel namespaces ([[namespaces]] with name = \"ns\" and the channel options); channel \"ns:x\" uses namespace \"ns\"."),
];

/// The most Redis instances `redis_url` may list (each is a connection pair per node).
const MAX_REDIS_SHARDS: usize = 64;

/// Centrifugo options of Redis deployments ringcast does not support, refused by name with the reason
/// (rather than as unknown keys). Redis Cluster: see `engine::shards`.
const REFUSED_KEYS: &[(&str, &str)] = &[
    (
        "redis_cluster_address",
        "Redis Cluster is not supported; list independent instances in redis_url (channels are sharded over them)",
    ),
    (
        "redis_cluster_addrs",
        "Redis Cluster is not supported; list independent instances in redis_url (channels are sharded over them)",
    ),
    ("redis_sentinel_address", "Redis Sentinel is not supported; list the instances in redis_url"),
];

/// Whether `url` names a Redis server (the scheme only; the connection is what proves it).
fn redis_client_url(url: &str) -> Option<&str> {
    (url.starts_with("redis://") || url.starts_with("rediss://")).then_some(url)
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub dev: bool,
    pub workers: usize,
    pub runtime: String,
    pub read_buffer: String,
    pub ring_buffer_size: usize,
    pub pool_buffer_size: usize,
    pub pool_max_buffers: usize,
    pub growable_initial_size: usize,
    pub max_frame_size: u64,
    pub max_message_size: u64,
    pub max_request_head: usize,
    pub client_queue_max_size: usize,
    pub fanout_direct_write: bool,
    pub fanout_split_min: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    pub pid_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    pub echo_path: String,
    pub compression: bool,
    pub compression_level: u32,
    pub compression_min_size: usize,
    pub compression_context_takeover: bool,
    pub compression_server_max_window_bits: u8,
    pub compression_client_max_window_bits: u8,
    pub allowed_origins: Vec<String>,
    pub log_level: String,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub client_stale_close_delay: Duration,
    pub client_user_connection_limit: usize,
    pub history_max_publication_limit: usize,
    pub allow_anonymous: bool,
    pub token_hmac_secret_key: String,
    pub token_rsa_public_key: String,
    pub token_ecdsa_public_key: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub internal_listen: String,
    pub tcp_listen: String,
    pub tcp_max_body_size: u32,
    #[serde(with = "humantime_serde")]
    pub tcp_ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_pong_timeout_min: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_pong_timeout_max: Duration,
    pub api_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    pub admin_password: String,
    pub admin_secret: String,
    pub channel_max_length: usize,
    pub client_channel_limit: usize,
    pub max_connections: usize,
    pub client_connect_rate: u32,
    pub client_connect_burst: u32,
    pub client_max_connections_per_ip: u32,
    #[serde(deserialize_with = "size_or_string")]
    pub memory_high_watermark: String,
    #[serde(deserialize_with = "size_or_string")]
    pub memory_low_watermark: String,
    pub client_command_rate: u32,
    pub client_command_burst: u32,
    pub client_channel_publish_rate: u32,
    pub client_channel_publish_burst: u32,
    #[serde(with = "humantime_serde")]
    pub client_flood_disconnect_after: Duration,
    pub broker: String,
    pub redis_url: Vec<String>,
    pub redis_prefix: String,
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    pub engine_breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub engine_breaker_cooldown: Duration,
    #[serde(with = "humantime_serde")]
    pub redis_presence_ttl: Duration,
    pub engine_max_waiting: usize,
    pub nats_url: String,
    pub nats_prefix: String,
    #[serde(with = "humantime_serde")]
    pub nats_dial_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub nats_write_timeout: Duration,
    pub presence_manager: String,
    #[serde(deserialize_with = "crate::policy::namespace::deserialize_options")]
    pub channels: crate::policy::namespace::ChannelOptions,
    pub namespaces: Vec<crate::policy::namespace::NamespaceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".into(),
            dev: false,
            workers: 0,
            runtime: "shared".into(),
            read_buffer: "pool".into(),
            ring_buffer_size: 4096,
            pool_buffer_size: 16 * 1024,
            pool_max_buffers: 1024,
            growable_initial_size: 4096,
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
            max_request_head: 8 * 1024,
            client_queue_max_size: 1 << 20,
            fanout_direct_write: true,
            fanout_split_min: 128,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(3),
            shutdown_timeout: Duration::from_secs(10),
            drain_window: Duration::from_secs(30),
            pid_file: String::new(),
            echo: None,
            echo_path: "/echo".into(),
            compression: false,
            compression_level: 6,
            compression_min_size: 64,
            compression_context_takeover: false,
            compression_server_max_window_bits: 15,
            compression_client_max_window_bits: 15,
            allowed_origins: Vec::new(),
            log_level: "info".into(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            client_stale_close_delay: Duration::from_secs(10),
            client_user_connection_limit: 0,
            history_max_publication_limit: 300,
            allow_anonymous: false,
            token_hmac_secret_key: String::new(),
            token_rsa_public_key: String::new(),
            token_ecdsa_public_key: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            internal_listen: String::new(),
            tcp_listen: String::new(),
            tcp_max_body_size: ringcast_wire::tcp::DEFAULT_MAX_BODY,
            tcp_ping_interval: Duration::from_secs(25),
            tcp_pong_timeout_min: Duration::from_secs(2),
            tcp_pong_timeout_max: Duration::from_secs(10),
            api_key: String::new(),
            admin: None,
            admin_password: String::new(),
            admin_secret: String::new(),
            channel_max_length: crate::policy::namespace::DEFAULT_CHANNEL_MAX_LENGTH,
            client_channel_limit: crate::pubsub::node::DEFAULT_CLIENT_CHANNEL_LIMIT,
            max_connections: 0,
            client_connect_rate: 0,
            client_connect_burst: 0,
            client_max_connections_per_ip: 0,
            memory_high_watermark: String::new(),
            memory_low_watermark: String::new(),
            client_command_rate: 0,
            client_command_burst: 0,
            client_channel_publish_rate: 0,
            client_channel_publish_burst: 0,
            client_flood_disconnect_after: Duration::from_secs(10),
            broker: "memory".into(),
            redis_url: vec!["redis://127.0.0.1:6379".into()],
            redis_prefix: "ringcast".into(),
            redis_timeout: Duration::from_secs(1),
            engine_breaker_failures: 5,
            engine_breaker_cooldown: Duration::from_secs(5),
            redis_presence_ttl: Duration::from_secs(60),
            engine_max_waiting: 1024,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_prefix: "ringcast".into(),
            nats_dial_timeout: Duration::from_secs(1),
            nats_write_timeout: Duration::from_secs(1),
            presence_manager: String::new(),
            channels: crate::policy::namespace::ChannelOptions::default(),
            namespaces: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown configuration key `{0}`")]
    UnknownKey(String),
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// Turns a flag or environment string into the TOML value its key takes.
fn to_toml(key: &Key, raw: &str) -> Result<toml::Value, ConfigError> {
    Ok(match key.kind {
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "" | "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            other => return Err(invalid(key.name, format!("expected true or false, got {other:?}"))),
        },
        Kind::Int => match raw.trim().parse::<i64>() {
            Ok(v) => toml::Value::Integer(v),
            Err(_) => return Err(invalid(key.name, format!("expected a whole number, got {raw:?}"))),
        },
        Kind::Str => toml::Value::String(raw.to_string()),
        Kind::List => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into())).collect(),
        ),
        Kind::Table => return Err(invalid(key.name, "can only be set in the config file")),
    })
}

/// The environment variable for a key: `RINGCAST_` + the key in upper case.
pub fn env_var(key: &str) -> String {
    format!("RINGCAST_{}", key.to_ascii_uppercase())
}

/// The TCP protocol's port under `--dev` when `tcp_listen` is not set (issue 11).
pub const DEV_TCP_PORT: u16 = 7070;

/// The effective settings derived from a validated [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `internal_listen`, when set.
    pub internal_listen: Option<SocketAddr>,
    /// Where the TCP binary protocol listens, when on (`tcp_listen`, or the `--dev` default).
    pub tcp_listen: Option<SocketAddr>,
    pub strategy: Strategy,
    pub echo: bool,
    /// permessage-deflate as configured (`compression*`; `enabled: false` when off).
    pub deflate: DeflateConfig,
    /// The admin dashboard is served (`admin`, or `--dev`).
    pub admin: bool,
    /// `memory_high_watermark` / `memory_low_watermark` in bytes, when on.
    pub memory: Option<crate::app::memory::Watermarks>,
    /// `tls_cert` and `tls_key`, when set (loaded, and checked, when the server binds).
    pub tls: Option<crate::app::tls::TlsFiles>,
}

/// A size key may be a TOML integer (bytes) or a string ("512MiB", "80%").
fn size_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::Int(n) => n.to_string(),
        Raw::Str(s) => s,
    })
}

impl Config {
    /// Loads the configuration: defaults, overridden by `file`, then by environment variables (looked up
    /// through `env`), then by `flags` (key name → raw value, as given on the command line).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &[(String, String)],
    ) -> Result<(Config, Settings), ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        for k in KEYS.iter().filter(|k| k.kind != Kind::Table) {
            if let Some(raw) = env(&env_var(k.name)) {
                table.insert(k.name.to_string(), to_toml(k, &raw)?);
            }
        }
        for (name, raw) in flags {
            let k = KEYS.iter().find(|k| k.name == name).ok_or_else(|| ConfigError::UnknownKey(name.clone()))?;
            table.insert(k.name.to_string(), to_toml(k, raw)?);
        }
        if let Some((key, why)) = REFUSED_KEYS.iter().find(|(k, _)| table.contains_key(*k)) {
            return Err(invalid(key, *why));
        }
        let config: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            // toml names the offending key in its message ("unknown field `x`", "invalid type ... for key `y`").
            ConfigError::Parse {
                path: file.map_or("(flags/environment)".into(), |p| p.display().to_string()),
                message: e.to_string(),
            }
        })?;
        let settings = config.validate()?;
        Ok((config, settings))
    }

    /// Checks every value; errors name the key.
    /// Under `broker = "nats"`: history (and so positioning and recovery) is kept in a JetStream stream
    /// sized from the namespaces at start ([`Config::nats_history_limits`]); presence is refused unless
    /// `presence_manager = "redis"`; dev mode (any namespace, presence everywhere) is refused.
    fn check_nats_channels(&self, redis_presence: bool) -> Result<(), ConfigError> {
        if self.dev {
            return Err(invalid(
                "dev",
                "dev mode turns presence on in every channel and takes any namespace, which broker = \"nats\" cannot keep presence for or size its history stream by; set the [channels] options instead",
            ));
        }
        for (scope, opts) in self.channel_scopes() {
            if opts.presence && !redis_presence {
                return Err(invalid(
                    "namespaces",
                    format!("{scope}: presence under broker = \"nats\" needs presence_manager = \"redis\""),
                ));
            }
        }
        Ok(())
    }

    /// `[channels]` and each namespace's options, with the name an error gives them.
    fn channel_scopes(&self) -> impl Iterator<Item = (&str, &crate::policy::namespace::ChannelOptions)> {
        std::iter::once(("[channels]", &self.channels))
            .chain(self.namespaces.iter().map(|n| (n.name.as_str(), &n.options)))
    }

    /// Under `broker = "nats"`, the history stream's limits: the largest `history_size` and
    /// `history_meta_ttl` of the namespaces that keep history; `None` when none does (JetStream unused).
    pub fn nats_history_limits(&self) -> Option<crate::engine::jetstream::StreamLimits> {
        let kept = self.channel_scopes().map(|(_, o)| o).filter(|o| o.history_enabled());
        kept.fold(None, |acc, o| {
            let (size, age) = (o.history_size, o.effective_history_meta_ttl());
            Some(match acc {
                None => crate::engine::jetstream::StreamLimits { max_per_subject: size, max_age: age },
                Some(l) => crate::engine::jetstream::StreamLimits {
                    max_per_subject: l.max_per_subject.max(size),
                    max_age: l.max_age.max(age),
                },
            })
        })
    }

    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let listen: SocketAddr =
            self.listen.parse().map_err(|e| invalid("listen", format!("{e} (expected HOST:PORT)")))?;
        let strategy = Strategy::parse(&self.read_buffer).ok_or_else(|| {
            invalid("read_buffer", format!("{:?} is not one of \"pool\", \"ring\", \"growable\"", self.read_buffer))
        })?;
        if self.ring_buffer_size < 256 {
            return Err(invalid("ring_buffer_size", "must be at least 256 bytes"));
        }
        if self.pool_buffer_size < 256 {
            return Err(invalid("pool_buffer_size", "must be at least 256 bytes"));
        }
        if self.growable_initial_size < 256 {
            return Err(invalid("growable_initial_size", "must be at least 256 bytes"));
        }
        if self.max_frame_size == 0 || self.max_frame_size > 1 << 30 {
            return Err(invalid("max_frame_size", "must be between 1 byte and 1 GiB"));
        }
        for (name, v) in [
            ("ring_buffer_size", self.ring_buffer_size),
            ("pool_buffer_size", self.pool_buffer_size),
            ("growable_initial_size", self.growable_initial_size),
        ] {
            if v > 1 << 30 {
                return Err(invalid(name, "must be at most 1 GiB"));
            }
        }
        if self.max_message_size == 0 || self.max_message_size > u64::from(u32::MAX) {
            return Err(invalid("max_message_size", "must be between 1 byte and 4 GiB"));
        }
        if self.max_request_head < 256 {
            return Err(invalid("max_request_head", "must be at least 256 bytes"));
        }
        if !self.dev {
            // The channel options are checked here, with everything else, so that a bad one is a config
            // error (exit 2) naming the namespace and option; `--dev` does not use them.
            crate::policy::namespace::Namespaces::new(self.channels.clone(), self.namespaces.clone())
                .map_err(|e| invalid("namespaces", e.to_string()))?;
        }
        if self.channel_max_length == 0 || self.channel_max_length > 1 << 16 {
            return Err(invalid("channel_max_length", "must be between 1 and 65536 bytes"));
        }
        if self.client_queue_max_size < 1024 {
            return Err(invalid("client_queue_max_size", "must be at least 1024 bytes"));
        }
        if self.client_queue_max_size > u32::MAX as usize {
            return Err(invalid("client_queue_max_size", "must be below 4 GiB"));
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("write_timeout", self.write_timeout),
            ("close_timeout", self.close_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(name, "must be positive"));
            }
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_timeout", self.write_timeout),
            ("close_timeout", self.close_timeout),
            ("client_stale_close_delay", self.client_stale_close_delay),
            ("client_flood_disconnect_after", self.client_flood_disconnect_after),
            ("shutdown_timeout", self.shutdown_timeout),
            ("drain_window", self.drain_window),
        ] {
            if d > Duration::from_secs(86_400) {
                return Err(invalid(name, "must be at most 24h"));
            }
        }
        for (name, d) in [("ping_interval", self.ping_interval), ("pong_timeout", self.pong_timeout)] {
            if d > Duration::from_secs(3600) {
                return Err(invalid(name, "must be at most 1h"));
            }
        }
        if !self.ping_interval.is_zero() && self.pong_timeout.is_zero() {
            return Err(invalid("pong_timeout", "must be positive when ping_interval is"));
        }
        if !matches!(self.broker.as_str(), "memory" | "redis" | "nats") {
            return Err(invalid("broker", format!("{:?} is not one of \"memory\", \"redis\", \"nats\"", self.broker)));
        }
        match self.runtime.as_str() {
            "shared" => {}
            // A networked engine waits for its calls with `block_in_place`, which a single-thread runtime
            // cannot do (it panics).
            "per-core" if self.broker != "memory" => {
                return Err(invalid("runtime", "\"per-core\" needs broker = \"memory\" (a networked broker blocks a worker thread in its calls, which a single-thread runtime cannot)"))
            }
            "per-core" => {}
            other => return Err(invalid("runtime", format!("{other:?} is not one of \"shared\", \"per-core\""))),
        }
        let redis_presence = match self.presence_manager.as_str() {
            "" => false,
            "redis" if self.broker == "nats" => true,
            "redis" => {
                return Err(invalid(
                    "presence_manager",
                    "\"redis\" is for broker = \"nats\" (the memory and redis engines keep their own presence)",
                ))
            }
            other => return Err(invalid("presence_manager", format!("{other:?} is not one of \"\", \"redis\""))),
        };
        if self.broker == "nats" {
            if !self.nats_url.starts_with("nats://") && !self.nats_url.starts_with("tls://") {
                return Err(invalid("nats_url", format!("{:?} is not a nats:// or tls:// URL", self.nats_url)));
            }
            if !crate::engine::nats::valid_prefix(&self.nats_prefix) {
                return Err(invalid(
                    "nats_prefix",
                    "must be non-empty subject tokens separated by '.', without wildcards or whitespace",
                ));
            }
            for (name, d) in
                [("nats_dial_timeout", self.nats_dial_timeout), ("nats_write_timeout", self.nats_write_timeout)]
            {
                if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
                    return Err(invalid(name, "must be between 10ms and 60s"));
                }
            }
            self.check_nats_channels(redis_presence)?;
        }
        if self.broker == "redis" || redis_presence {
            if self.redis_url.is_empty() || self.redis_url.len() > MAX_REDIS_SHARDS {
                return Err(invalid(
                    "redis_url",
                    format!("broker = \"redis\" takes 1 to {MAX_REDIS_SHARDS} URLs (several: channels are sharded over them)"),
                ));
            }
            for (i, url) in self.redis_url.iter().enumerate() {
                if redis_client_url(url).is_none() {
                    return Err(invalid("redis_url", format!("{url:?} is not a redis:// or rediss:// URL")));
                }
                if self.redis_url[..i].contains(url) {
                    return Err(invalid("redis_url", format!("{url:?} is listed twice")));
                }
            }
            if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
                return Err(invalid("redis_prefix", "must be non-empty, without whitespace"));
            }
            if self.redis_timeout < Duration::from_millis(10) || self.redis_timeout > Duration::from_secs(60) {
                return Err(invalid("redis_timeout", "must be between 10ms and 60s"));
            }
            if self.redis_presence_ttl < Duration::from_secs(1) || self.redis_presence_ttl > Duration::from_secs(86_400)
            {
                return Err(invalid("redis_presence_ttl", "must be between 1s and 24h"));
            }
        }
        if !(1..=100_000).contains(&self.engine_max_waiting) {
            return Err(invalid("engine_max_waiting", "must be between 1 and 100000"));
        }
        if self.engine_breaker_failures > 10_000 {
            return Err(invalid("engine_breaker_failures", "must be at most 10000 (0 turns the breaker off)"));
        }
        if self.engine_breaker_cooldown < Duration::from_millis(100)
            || self.engine_breaker_cooldown > Duration::from_secs(600)
        {
            return Err(invalid("engine_breaker_cooldown", "must be between 100ms and 10m"));
        }
        if !self.echo_path.starts_with('/') {
            return Err(invalid("echo_path", "must start with '/'"));
        }
        match (self.tls_cert.is_empty(), self.tls_key.is_empty()) {
            (false, true) => return Err(invalid("tls_key", "must be set when tls_cert is")),
            (true, false) => return Err(invalid("tls_cert", "must be set when tls_key is")),
            _ => {}
        }
        let internal_listen = match self.internal_listen.as_str() {
            "" => None,
            s => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| invalid("internal_listen", format!("{e} (expected HOST:PORT, or empty)")))?,
            ),
        };
        if internal_listen.is_some_and(|a| a == listen && a.port() != 0) {
            return Err(invalid("internal_listen", "must differ from `listen`"));
        }
        if self.compression_level > 9 {
            return Err(invalid("compression_level", "must be between 0 and 9"));
        }
        if self.compression_min_size > usize::from(u16::MAX) {
            return Err(invalid("compression_min_size", "must be at most 65535 bytes"));
        }
        if !(9..=15).contains(&self.compression_server_max_window_bits) {
            // zlib cannot compress a raw stream with an 8-bit window.
            return Err(invalid("compression_server_max_window_bits", "must be between 9 and 15"));
        }
        if !(8..=15).contains(&self.compression_client_max_window_bits) {
            return Err(invalid("compression_client_max_window_bits", "must be between 8 and 15"));
        }
        let deflate = DeflateConfig {
            enabled: self.compression,
            server_context_takeover: self.compression_context_takeover,
            client_context_takeover: false,
            server_max_window_bits: self.compression_server_max_window_bits,
            client_max_window_bits: self.compression_client_max_window_bits,
            level: self.compression_level,
            min_size: self.compression_min_size,
        };
        let tcp_listen = match self.tcp_listen.as_str() {
            "off" => None,
            // `--dev` turns it on next to `listen`; a test server on port 0 gets an ephemeral port too.
            "" if self.dev => Some(SocketAddr::new(listen.ip(), if listen.port() == 0 { 0 } else { DEV_TCP_PORT })),
            "" => None,
            s => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| invalid("tcp_listen", format!("{e} (expected HOST:PORT, \"off\" or empty)")))?,
            ),
        };
        if tcp_listen.is_some_and(|a| a.port() != 0 && (a == listen || Some(a) == internal_listen)) {
            return Err(invalid("tcp_listen", "must differ from `listen` and `internal_listen`"));
        }
        if self.tcp_max_body_size == 0 || self.tcp_max_body_size > 1 << 30 {
            return Err(invalid("tcp_max_body_size", "must be between 1 byte and 1 GiB"));
        }
        for (name, d) in [
            ("tcp_ping_interval", self.tcp_ping_interval),
            ("tcp_pong_timeout_min", self.tcp_pong_timeout_min),
            ("tcp_pong_timeout_max", self.tcp_pong_timeout_max),
        ] {
            if d > Duration::from_secs(3600) {
                return Err(invalid(name, "must be at most 1h"));
            }
        }
        if self.tcp_pong_timeout_min.is_zero() {
            return Err(invalid("tcp_pong_timeout_min", "must be positive"));
        }
        if self.tcp_pong_timeout_max < self.tcp_pong_timeout_min {
            return Err(invalid("tcp_pong_timeout_max", "must be at least tcp_pong_timeout_min"));
        }
        let admin = self.admin.unwrap_or(self.dev);
        if admin && self.admin_password.is_empty() && !self.dev {
            return Err(invalid("admin_password", "must be set when `admin` is on"));
        }
        let memory = crate::app::memory::Watermarks::resolve(
            &self.memory_high_watermark,
            &self.memory_low_watermark,
            crate::app::memory::cgroup_limit,
        )
        .map_err(|(key, message)| invalid(key, message))?;
        let tls = (!self.tls_cert.is_empty()).then(|| crate::app::tls::TlsFiles {
            cert: self.tls_cert.clone().into(),
            key: self.tls_key.clone().into(),
        });
        Ok(Settings {
            listen,
            internal_listen,
            tcp_listen,
            strategy,
            echo: self.echo.unwrap_or(self.dev),
            deflate,
            admin,
            memory,
            tls,
        })
    }

    /// A documented TOML file with every key at its default.
    pub fn documented_toml() -> String {
        let defaults = toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Table(toml::Table::new()));
        let mut out = String::from("# ringcast configuration. Every key can also be set by a flag of the same name\n# (`read_buffer` -> `--read-buffer`) or by an environment variable (`RINGCAST_READ_BUFFER`).\n# Precedence: flag > environment > this file > default.\n\n");
        for k in KEYS {
            for line in k.help.lines() {
                out.push_str("# ");
                out.push_str(line);
                out.push('\n');
            }
            match defaults.get(k.name) {
                Some(v) => out.push_str(&format!("{} = {}\n\n", k.name, v)),
                None => out.push_str(&format!("# {} =\n\n", k.name)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_valid() {
        let (c, s) = Config::load(None, no_env, &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(s.strategy, Strategy::Pool);
        assert_eq!(s.listen.to_string(), "127.0.0.1:8000");
        assert!(!s.echo);
    }

    #[test]
    fn key_table_matches_the_struct() {
        // Every serialized field is documented…
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for name in defaults.as_table().unwrap().keys() {
            assert!(KEYS.iter().any(|k| k.name == name), "`{name}` is missing from KEYS");
        }
        // …and every documented key is a field that takes a value of its kind.
        for k in KEYS {
            let sample = match k.kind {
                Kind::Bool => "true",
                Kind::Int => "4096",
                Kind::Str => "x",
                Kind::List => "a,b",
                Kind::Table => continue,
            };
            let mut t = toml::Table::new();
            t.insert(k.name.into(), to_toml(k, sample).unwrap());
            let r: Result<Config, _> = toml::Value::Table(t).try_into();
            // Strings that must parse further (durations) may fail on "x", but never as an unknown field.
            if let Err(e) = r {
                assert!(!e.to_string().contains("unknown field"), "{}: {e}", k.name);
            }
        }
    }

    #[test]
    fn precedence_is_flag_over_env_over_file() {
        let dir = std::env::temp_dir().join(format!("ringcast-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "read_buffer = \"ring\"\nring_buffer_size = 1000\nidle_timeout = \"5s\"\n").unwrap();
        let env = |k: &str| match k {
            "RINGCAST_READ_BUFFER" => Some("growable".to_string()),
            "RINGCAST_RING_BUFFER_SIZE" => Some("2000".to_string()),
            _ => None,
        };
        let (c, s) = Config::load(Some(&file), env, &[("ring_buffer_size".into(), "3000".into())]).unwrap();
        assert_eq!(s.strategy, Strategy::Growable, "env beats file");
        assert_eq!(c.ring_buffer_size, 3000, "flag beats env");
        assert_eq!(c.idle_timeout, Duration::from_secs(5), "file beats default");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::load(None, no_env, &[("read_buffer".into(), "bogus".into())]).unwrap_err();
        assert!(e.to_string().contains("`read_buffer`"), "{e}");
        let e = Config::load(None, no_env, &[("ring_buffer_size".into(), "lots".into())]).unwrap_err();
        assert!(e.to_string().contains("`ring_buffer_size`"), "{e}");
        let e = Config::load(None, no_env, &[("idle_timeout".into(), "soon".into())]).unwrap_err();
        assert!(e.to_string().contains("idle_timeout"), "{e}");
        let e = Config::load(None, |k| (k == "RINGCAST_LISTEN").then(|| "nowhere".into()), &[]).unwrap_err();
        assert!(e.to_string().contains("`listen`"), "{e}");
    }

    #[test]
    fn engine_breaker_keys_have_defaults_and_refuse_values_out_of_range() {
        let (c, _) = Config::load(None, no_env, &[]).unwrap();
        assert_eq!((c.engine_breaker_failures, c.engine_breaker_cooldown), (5, Duration::from_secs(5)));
        let (c, _) = Config::load(None, no_env, &[("engine_breaker_failures".into(), "0".into())]).unwrap();
        assert_eq!(c.engine_breaker_failures, 0, "0 turns it off");
        for (key, value) in [
            ("engine_breaker_failures", "10001"),
            ("engine_breaker_failures", "-1"),
            ("engine_breaker_failures", "many"),
            ("engine_breaker_cooldown", "10ms"),
            ("engine_breaker_cooldown", "11m"),
            ("engine_breaker_cooldown", "soon"),
        ] {
            let e = Config::load(None, no_env, &[(key.into(), value.into())]).unwrap_err();
            assert!(e.to_string().contains(key), "{key} = {value}: {e}");
        }
    }

    #[test]
    fn redis_presence_ttl_and_engine_max_waiting_are_checked_by_name() {
        let redis =
            |k: &str, v: &str| Config::load(None, no_env, &[("broker".into(), "redis".into()), (k.into(), v.into())]);
        let (c, _) = redis("redis_presence_ttl", "15s").unwrap();
        assert_eq!(c.redis_presence_ttl, Duration::from_secs(15));
        assert_eq!(Config::default().redis_presence_ttl, Duration::from_secs(60), "Centrifugo's default");
        for bad in ["500ms", "25h", "soon"] {
            let e = redis("redis_presence_ttl", bad).unwrap_err();
            assert!(e.to_string().contains("redis_presence_ttl"), "{bad}: {e}");
        }
        assert_eq!(redis("engine_max_waiting", "8").unwrap().0.engine_max_waiting, 8);
        for bad in ["0", "100001", "-1"] {
            let e = redis("engine_max_waiting", bad).unwrap_err();
            assert!(e.to_string().contains("engine_max_waiting"), "{bad}: {e}");
        }
    }

    #[test]
    fn internal_listen_is_optional_and_checked() {
        let (_, s) = Config::load(None, no_env, &[]).unwrap();
        assert_eq!(s.internal_listen, None, "off by default: everything on `listen`");
        let (_, s) = Config::load(None, no_env, &[("internal_listen".into(), "127.0.0.1:9000".into())]).unwrap();
        assert_eq!(s.internal_listen.map(|a| a.port()), Some(9000));
        let e = Config::load(None, no_env, &[("internal_listen".into(), "nowhere".into())]).unwrap_err();
        assert!(e.to_string().contains("`internal_listen`"), "{e}");
        let same = [("internal_listen".into(), "127.0.0.1:8000".into())];
        let e = Config::load(None, no_env, &same).unwrap_err();
        assert!(e.to_string().contains("`internal_listen`"), "the public address cannot be the internal one: {e}");
    }

    #[test]
    fn client_limits_default_as_in_centrifugo() {
        let c = Config::default();
        assert_eq!(c.client_stale_close_delay, Duration::from_secs(10));
        assert_eq!(c.client_user_connection_limit, 0, "unlimited");
        assert_eq!(c.history_max_publication_limit, 300);
    }

    #[test]
    fn redis_url_takes_several_distinct_instances_and_redis_cluster_is_refused_by_name() {
        let redis = |urls: &str| {
            Config::load(None, no_env, &[("broker".into(), "redis".into()), ("redis_url".into(), urls.into())])
        };
        let (c, _) = redis("redis://127.0.0.1:6379,redis://127.0.0.1:6380").unwrap();
        assert_eq!(c.redis_url.len(), 2);
        let e = redis("redis://127.0.0.1:6379,redis://127.0.0.1:6379").unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        let e = redis("redis://127.0.0.1:6379,127.0.0.1:6380").unwrap_err();
        assert!(e.to_string().contains("redis_url"), "{e}");
        let dir = std::env::temp_dir().join(format!("ringcast-config-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "broker = \"redis\"\nredis_cluster_address = [\"127.0.0.1:7000\"]\n").unwrap();
        let e = Config::load(Some(&file), no_env, &[]).unwrap_err();
        assert!(e.to_string().contains("redis_cluster_address") && e.to_string().contains("not supported"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("ringcast-config-unk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "read_bufer = \"ring\"\n").unwrap();
        let e = Config::load(Some(&file), no_env, &[]).unwrap_err();
        assert!(e.to_string().contains("read_bufer"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tcp_listen_is_off_unless_configured_or_dev() {
        let (_, s) = Config::load(None, no_env, &[]).unwrap();
        assert_eq!(s.tcp_listen, None, "off by default");
        let (_, s) = Config::load(None, no_env, &[("dev".into(), "true".into())]).unwrap();
        assert_eq!(s.tcp_listen.map(|a| a.to_string()), Some("127.0.0.1:7070".into()));
        let dev_ephemeral = [("dev".into(), "true".into()), ("listen".into(), "127.0.0.1:0".into())];
        let (_, s) = Config::load(None, no_env, &dev_ephemeral).unwrap();
        assert_eq!(s.tcp_listen.map(|a| a.port()), Some(0), "a test server on port 0 gets an ephemeral TCP port");
        let off = [("dev".into(), "true".into()), ("tcp_listen".into(), "off".into())];
        assert_eq!(Config::load(None, no_env, &off).unwrap().1.tcp_listen, None);
        let (_, s) = Config::load(None, no_env, &[("tcp_listen".into(), "127.0.0.1:7071".into())]).unwrap();
        assert_eq!(s.tcp_listen.map(|a| a.port()), Some(7071));
        let e = Config::load(None, no_env, &[("tcp_listen".into(), "nowhere".into())]).unwrap_err();
        assert!(e.to_string().contains("`tcp_listen`"), "{e}");
        let e = Config::load(None, no_env, &[("tcp_listen".into(), "127.0.0.1:8000".into())]).unwrap_err();
        assert!(e.to_string().contains("`tcp_listen`"), "cannot share the public port: {e}");
        let bounds = [("tcp_pong_timeout_min".into(), "5s".into()), ("tcp_pong_timeout_max".into(), "1s".into())];
        let e = Config::load(None, no_env, &bounds).unwrap_err();
        assert!(e.to_string().contains("`tcp_pong_timeout_max`"), "{e}");
    }

    #[test]
    fn tls_needs_both_files() {
        let (_, s) = Config::load(None, no_env, &[]).unwrap();
        assert!(s.tls.is_none(), "plain by default");
        let e = Config::load(None, no_env, &[("tls_cert".into(), "c.pem".into())]).unwrap_err();
        assert!(e.to_string().contains("`tls_key`"), "{e}");
        let e = Config::load(None, no_env, &[("tls_key".into(), "k.pem".into())]).unwrap_err();
        assert!(e.to_string().contains("`tls_cert`"), "{e}");
        let both = [("tls_cert".into(), "c.pem".into()), ("tls_key".into(), "k.pem".into())];
        let (_, s) = Config::load(None, no_env, &both).unwrap();
        assert_eq!(s.tls.map(|t| t.cert), Some("c.pem".into()), "the files are read when the server binds");
    }

    #[test]
    fn dev_turns_echo_on_unless_told_otherwise() {
        let (_, s) = Config::load(None, no_env, &[("dev".into(), "true".into())]).unwrap();
        assert!(s.echo);
        let (_, s) =
            Config::load(None, no_env, &[("dev".into(), "true".into()), ("echo".into(), "false".into())]).unwrap();
        assert!(!s.echo);
    }

    #[test]
    fn admin_is_off_unless_configured_or_dev_and_needs_a_password() {
        assert!(!Config::load(None, no_env, &[]).unwrap().1.admin, "off by default");
        assert!(Config::load(None, no_env, &[("dev".into(), "true".into())]).unwrap().1.admin, "on with --dev");
        let e = Config::load(None, no_env, &[("admin".into(), "true".into())]).unwrap_err();
        assert!(e.to_string().contains("`admin_password`"), "{e}");
        let on = [("admin".into(), "true".into()), ("admin_password".into(), "pw".into())];
        assert!(Config::load(None, no_env, &on).unwrap().1.admin);
        let dev_off = [("dev".into(), "true".into()), ("admin".into(), "false".into())];
        assert!(!Config::load(None, no_env, &dev_off).unwrap().1.admin);
    }

    #[test]
    fn compression_is_off_by_default_and_checked() {
        let (_, s) = Config::load(None, no_env, &[]).unwrap();
        assert!(!s.deflate.enabled);
        assert!(!s.deflate.server_context_takeover, "defaults suit many connections");
        let (_, s) = Config::load(None, no_env, &[("compression".into(), "".into())]).unwrap();
        assert!(s.deflate.enabled, "`--compression` alone turns it on");
        for (key, bad) in [
            ("compression_level", "10"),
            ("compression_min_size", "70000"),
            ("compression_server_max_window_bits", "8"),
            ("compression_client_max_window_bits", "16"),
        ] {
            let e = Config::load(None, no_env, &[(key.into(), bad.into())]).unwrap_err();
            assert!(e.to_string().contains(&format!("`{key}`")), "{e}");
        }
    }

    #[test]
    fn memory_watermarks_are_off_by_default_and_named_in_errors() {
        let (_, s) = Config::load(None, no_env, &[]).unwrap();
        assert_eq!(s.memory, None);
        let flags = [("memory_high_watermark".into(), "64MiB".into())];
        let (_, s) = Config::load(None, no_env, &flags).unwrap();
        assert_eq!(s.memory.map(|m| (m.high, m.low)), Some((64 << 20, (64 << 20) / 10 * 9)));
        let e = Config::load(None, no_env, &[("memory_high_watermark".into(), "lots".into())]).unwrap_err();
        assert!(e.to_string().contains("`memory_high_watermark`"), "{e}");
        let flags = [("memory_high_watermark".into(), "64MiB".into()), ("memory_low_watermark".into(), "1GiB".into())];
        let e = Config::load(None, no_env, &flags).unwrap_err();
        assert!(e.to_string().contains("`memory_low_watermark`"), "{e}");
        // A TOML integer is bytes.
        let c: Config = toml::from_str("memory_high_watermark = 134217728").unwrap();
        assert_eq!(c.validate().unwrap().memory.map(|m| m.high), Some(128 << 20));
    }

    #[test]
    fn documented_toml_round_trips_to_the_defaults() {
        let text = Config::documented_toml();
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c, Config::default());
    }
}

#[cfg(test)]
mod nats_tests {
    use super::*;

    fn validate(src: &str) -> Result<Settings, ConfigError> {
        let config: Config = match toml::from_str(src) {
            Ok(c) => c,
            Err(e) => panic!("test config does not parse: {e}"),
        };
        config.validate()
    }

    fn refused_key(src: &str) -> (String, String) {
        match validate(src) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn per_core_runtime_is_refused_with_a_networked_broker() {
        assert!(validate("runtime = \"per-core\"\n").is_ok());
        assert!(validate("runtime = \"shared\"\nbroker = \"redis\"\n").is_ok());
        assert_eq!(refused_key("runtime = \"per-core\"\nbroker = \"redis\"\n").0, "runtime");
        assert_eq!(refused_key("runtime = \"per-core\"\nbroker = \"nats\"\n").0, "runtime");
        assert_eq!(refused_key("runtime = \"threads\"\n").0, "runtime");
    }

    #[test]
    fn nats_broker_alone_is_valid_without_history_or_presence() {
        assert!(validate("broker = \"nats\"\n[channels]\nallow_subscribe_for_client = true\n").is_ok());
    }

    #[test]
    fn nats_history_sizes_one_stream_by_the_largest_namespace() {
        let src = "broker = \"nats\"\n[channels]\nhistory_size = 10\nhistory_ttl = \"60s\"\n[[namespaces]]\nname = \"chat\"\nhistory_size = 50\nhistory_ttl = \"60s\"\nhistory_meta_ttl = \"7200s\"\n[[namespaces]]\nname = \"none\"\n";
        assert!(validate(src).is_ok());
        let config: Config = toml::from_str(src).expect("parses");
        let limits = config.nats_history_limits().expect("history kept");
        assert_eq!(limits.max_per_subject, 50);
        assert_eq!(limits.max_age, crate::broker::DEFAULT_META_TTL, "[channels] keeps the default meta TTL");
        let without: Config = toml::from_str("broker = \"nats\"\n").expect("parses");
        assert_eq!(without.nats_history_limits(), None, "no namespace keeps history: JetStream unused");
        assert_eq!(refused_key("broker = \"nats\"\ndev = true\n").0, "dev");
    }

    #[test]
    fn nats_presence_needs_the_redis_presence_manager() {
        let src = "broker = \"nats\"\n[[namespaces]]\nname = \"room\"\npresence = true\n";
        let (key, message) = refused_key(src);
        assert_eq!(key, "namespaces");
        assert!(message.contains("room") && message.contains("presence_manager"), "{message}");
        assert!(validate(&format!("presence_manager = \"redis\"\n{src}")).is_ok());
    }

    #[test]
    fn presence_manager_is_only_for_nats_and_only_redis() {
        assert_eq!(refused_key("broker = \"redis\"\npresence_manager = \"redis\"\n").0, "presence_manager");
        assert_eq!(refused_key("presence_manager = \"redis\"\n").0, "presence_manager");
        assert_eq!(refused_key("broker = \"nats\"\npresence_manager = \"nats\"\n").0, "presence_manager");
        assert_eq!(
            refused_key("broker = \"nats\"\npresence_manager = \"redis\"\nredis_url = [\"http://x\"]\n").0,
            "redis_url"
        );
    }

    #[test]
    fn nats_settings_are_checked_by_name() {
        assert_eq!(refused_key("broker = \"nats\"\nnats_url = \"http://127.0.0.1:4222\"\n").0, "nats_url");
        assert_eq!(refused_key("broker = \"nats\"\nnats_prefix = \"a.*\"\n").0, "nats_prefix");
        assert_eq!(refused_key("broker = \"nats\"\nnats_prefix = \"\"\n").0, "nats_prefix");
        assert_eq!(refused_key("broker = \"nats\"\nnats_write_timeout = \"0s\"\n").0, "nats_write_timeout");
        assert_eq!(refused_key("broker = \"nats\"\nnats_dial_timeout = \"2m\"\n").0, "nats_dial_timeout");
        assert_eq!(refused_key("broker = \"kafka\"\n").0, "broker");
        assert_eq!(refused_key("broker = \"nats\"\ndev = true\n").0, "dev");
    }
}
