//! The echo endpoint (`--dev`, `echo_path`): every message comes back as it was received, in a frame of
//! the same type. It exists to measure the WebSocket core alone (Autobahn|Testsuite, `ringcast bench
//! echo`), so it does nothing else: no session, no queue of its own, no allocation per message (the echo
//! is encoded into the pass's reply batch).

use ringcast_wire::{OpCode, Payload};

use super::emit;
use crate::transport::outbound::Outbound;

/// Answers one message.
pub(super) fn echo(scratch: &mut Vec<u8>, out: &mut Outbound, opcode: OpCode, payload: Payload<'_>) {
    emit(scratch, out, opcode, payload);
}
