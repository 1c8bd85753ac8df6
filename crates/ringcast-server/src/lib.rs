//! ringcast-server: everything that owns IO and policy.
//!
//! The protocols themselves live in `ringcast-wire` and `ringcast-protocol` (no IO); this crate drives
//! them over tokio sockets. Modules are grouped by concern, and depend on each other in one direction:
//! `app` → `ws` → `session` → `pubsub` → `broker`, with `policy`, `transport` and `metrics` beside them.
//!
//! * [`app`]: the process: configuration, the shared [`app::context::Context`], the listeners and
//!   shutdown.
//! * [`ws`]: one task per WebSocket connection: upgrade and routing, the connection state machine, the
//!   echo endpoint and the client-protocol driver.
//! * [`tcp`]: one task per raw TCP binary-protocol connection (docs/tcp-protocol.md): the driver, its
//!   session on the node, the adaptive pong deadline.
//! * [`session`]: one client's Centrifugo protocol session: commands in, replies and node operations out.
//! * [`pubsub`]: the node (channels, publish, presence, history calls), the hub (per-channel sequencer
//!   and fan-out) and the part of a client other tasks can reach (its shared queue). It fans out
//!   payloads; it knows nothing of WebSocket framing.
//! * [`broker`]: where positions are assigned and history and presence kept (the embedded memory broker).
//! * [`policy`]: channel namespaces and what a client may do on a channel; connection and subscription
//!   tokens.
//! * [`transport`]: what every transport shares: how a payload is framed per encoding, the outbound
//!   queue flushed with `writev`, and the deadline table.
//! * [`api`]: the server HTTP API, and the HTTP server behind the listener's non-upgrade requests.
//! * [`metrics`]: Prometheus metrics and the publish-to-delivery histogram.
//! * [`admin`]: the live admin dashboard (`/admin`), its login and its WebSocket feed.

pub mod admin;
pub mod api;
pub mod app;
pub mod broker;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod pubsub;
pub mod session;
pub mod tcp;
pub mod transport;
pub mod ws;

pub use app::config::{Config, ConfigError, Settings};
pub use app::error::ServerError;
pub use app::server::{run_blocking, Server};
