//! The process: configuration, what every connection shares, the listeners, and shutdown.
//!
//! [`context::Context`] is built once from the [`config::Config`] and handed to every connection task;
//! [`server::Server`] binds the listeners and spawns the tasks. Connections depend on the context, never
//! on the server, so there is no import cycle between the two.

pub mod admission;
pub mod config;
pub mod context;
pub mod error;
pub mod memory;
pub mod percore;
pub mod reload;
pub mod server;
pub mod tls;
pub mod upgrade;
