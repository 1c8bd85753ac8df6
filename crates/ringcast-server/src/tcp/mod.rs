//! The raw TCP binary protocol's server side (issue 11, docs/tcp-protocol.md): one task per connection.
//!
//! The codec is `ringcast_wire::tcp` (sans-IO: frames in, typed commands out). Here are the parts that
//! own IO, time and policy:
//!
//! * [`connection`]: the driver. It reads into the configured read-buffer strategy, runs the decoder,
//!   answers in command order, writes through the same [`crate::transport::outbound::Outbound`] queue
//!   with vectored writes, and keeps its timers (idle, ping, pong, write stall, close) in the shared
//!   deadline table, which is also how shutdown reaches it.
//! * [`session`]: what a command does: CONNECT (token or anonymous), SUBSCRIBE, UNSUBSCRIBE, PUBLISH on
//!   the node, with the namespace decisions of `policy::namespace` (the same functions WebSocket
//!   sessions call: nothing is restated here) and the protocol's error codes 7–10.
//! * [`keepalive`]: the adaptive pong deadline (1.5 × the median of the last round trips, clamped).
//!
//! A TCP subscriber is an ordinary [`crate::pubsub::client::ClientShared`] whose encoding is
//! [`crate::transport::Encoding::tcp`]: the hub builds one MESSAGE frame per publication for all of them
//! and queues that `Bytes` on each, and the slow-client rule (a queue over `client_queue_max_size` is
//! dropped and the client disconnected) and the close discipline (nothing queued after the connection
//! decided to close) are the shared ones.
//!
//! What this module refuses to do: Centrifugo features the binary protocol has no frame for — presence,
//! join/leave, history, recovery, subscription tokens, server-side subscriptions from the token or the API
//! (a TCP client's pending server commands are dropped).

pub mod connection;
pub mod keepalive;
pub mod session;

pub use connection::Connection;
