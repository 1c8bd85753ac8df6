//! ringcast-protocol: Centrifugo's client protocol v2 without IO.
//!
//! The official SDKs (npm `centrifuge`, PyPI `centrifuge-python`) must work against ringcast unchanged, so
//! this crate reproduces the protocol as published in `centrifugal/protocol`'s `client.proto`: the same
//! messages and field numbers for Protobuf, and the JSON shape Centrifugo writes (proto field names, zero
//! values omitted, `data` embedded as raw JSON). Bytes go in, messages come out, and back; nothing here
//! touches a socket, spawns a task or reads a clock, so every rule is testable with plain byte slices.
//!
//! * [`messages`]: the protocol messages, each usable with both formats.
//! * [`codec`]: several messages per WebSocket message — decoding a received frame, batching replies.
//! * [`fanout`]: the hot path — one publication encoded once per format, shared by every subscriber.
//! * [`codes`]: reply error codes and disconnect codes, with Centrifugo's exact texts.
//! * [`error`]: the errors of this layer; every malformed frame maps to disconnect 3501 in one place.
//!
//! What this crate refuses to do: decide anything. Whether a client may subscribe, what a history query
//! returns, when to ping — that is `ringcast-server`.

pub mod codec;
pub mod codes;
pub mod error;
pub mod fanout;
pub mod messages;
mod serde_helpers;

pub use codec::{
    decode_commands, decode_commands_from, decode_commands_with, decode_replies, encode_command, encode_reply, Format,
    Limits, PROTOBUF_SUBPROTOCOL,
};
pub use codes::{reconnect, DisconnectCode, ErrorCode};
pub use error::{EncodeError, ProtocolError};
pub use fanout::{encode_publication_push, publication_push_bytes};
pub use messages::{Command, Method, Publication, Push, Reply, Request};
