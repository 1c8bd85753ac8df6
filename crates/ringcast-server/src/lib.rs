//! ringcast-server: everything that owns IO and policy.
//!
//! The protocol itself lives in `ringcast-wire` (no IO); this crate drives it over tokio sockets:
//! * [`server`]: the listener, the accept loop, graceful shutdown.
//! * [`connection`]: one task per connection: handshake, read → parse → reply, timeouts, close.
//! * [`outbound`]: the per-connection queue of shared, pre-encoded frames, flushed with `writev`.
//! * [`deadline`]: every connection's deadlines in one swept table; also how shutdown reaches them.
//! * [`config`]: the typed configuration (file, environment, flags) and its validation.
//! * [`error`]: errors that stop the server (connection errors never do).

pub mod api;
pub mod auth;
pub mod broker;
pub mod client;
pub mod config;
pub mod connection;
pub mod deadline;
pub mod error;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod outbound;
pub mod server;
pub mod session;
pub mod transport;

pub use config::{Config, ConfigError, Settings};
pub use error::ServerError;
pub use server::{run_blocking, Server};
