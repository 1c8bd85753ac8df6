//! Publish/subscribe on one node, independent of any transport.
//!
//! * [`node::Node`]: the operations sessions and the HTTP API call (publish, history, presence, the
//!   registry of connected clients by user).
//! * [`hub::Hub`]: who is subscribed to what, and the per-channel sequencer that assigns a publication's
//!   position and queues it on every subscriber in one step.
//! * [`client::ClientShared`]: the part of a connection other tasks can reach: its shared queue and the
//!   requests (disconnect, server-side commands) made of it.
//! * [`spread`]: a long list of a fan-out's direct writes split between the runtime's workers.
//! * [`idempotency`]: results of API publications made with an idempotency key.
//!
//! Nothing here does IO or knows how a transport frames bytes: a subscriber names its
//! [`crate::transport::Encoding`] and receives frames made once per encoding.

pub mod client;
pub mod hub;
pub mod idempotency;
pub mod node;
pub mod registry;
pub mod spread;
