//! ringcast-wire: the WebSocket protocol (RFC 6455) without IO.
//!
//! Bytes and buffers go in; events, frames and handshake responses come out. Nothing here touches a
//! socket, spawns a task or reads a clock, so every rule of the protocol is testable with plain byte
//! slices, under proptest and under a fuzzer — and the same code serves the server and the load
//! generator's client.
//!
//! * [`frame`]: header decode/encode, the shareable encoded frame.
//! * [`mask`]: word-at-a-time (un)masking.
//! * [`reader`]: the receive state machine (fragments, control frames, UTF-8, limits).
//! * [`buffer`]: the three read-buffer strategies.
//! * [`handshake`]: the HTTP upgrade, both sides.
//! * [`tcp`]: the raw TCP binary protocol (header, body, CRC-32) over the same read buffers.
//! * [`deflate`]: permessage-deflate (RFC 7692): negotiation, inflate (in the reader), deflate.
//! * [`close`], [`utf8`], [`error`]: close codes, UTF-8 validation, and the one error type of this layer.

pub mod buffer;
pub mod close;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod reader;
pub mod tcp;
pub mod utf8;

pub use buffer::{AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer, Strategy};
pub use close::CloseCode;
pub use deflate::{DeflateConfig, DeflateParams, Deflater};
pub use error::WireError;
pub use frame::{encode_frame, OpCode, Role};
pub use reader::{Event, Limits, Payload, Reader};
