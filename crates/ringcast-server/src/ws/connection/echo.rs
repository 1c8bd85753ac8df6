//! The echo endpoint (`--dev`, `echo_path`): every message comes back as it was received, in a frame of
//! the same type. It exists to measure the WebSocket core alone (Autobahn|Testsuite, `ringcast bench
//! echo`), so it does nothing else: no session, no queue of its own, no allocation per message (the echo
//! is encoded into the pass's reply batch). With permessage-deflate negotiated the echo is compressed
//! by the connection's [`Deflater`] (with server context takeover when `compression_context_takeover`
//! is on: the echo endpoint is where Autobahn's compression groups exercise it).

use ringcast_wire::{Deflater, OpCode, Payload};

use super::emit_data;
use crate::transport::outbound::Outbound;

/// Answers one message.
pub(super) fn echo(
    scratch: &mut Vec<u8>,
    out: &mut Outbound,
    deflate: Option<&mut Deflater>,
    opcode: OpCode,
    payload: Payload<'_>,
) {
    emit_data(scratch, out, deflate, opcode, payload);
}
