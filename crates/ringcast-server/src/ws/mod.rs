//! WebSocket connections: one task per accepted socket, from the first byte of its HTTP upgrade to the
//! FIN after its close handshake.

mod connection;

pub use connection::{Connection, CLIENT_PATH};
