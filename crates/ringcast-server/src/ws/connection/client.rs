//! The client-protocol driver: what a connection on `/connection/websocket` does beyond WebSocket
//! framing. Messages go to the [`Session`]; its replies are framed into the connection's batch; the
//! protocol's heartbeat (server pings, the pong deadline, token expiry) and the server API's commands
//! (server-side subscribe, …) run here on the connection's deadlines.

use ringcast_protocol::DisconnectCode;
use ringcast_wire::{Deflater, OpCode, Payload};

use super::{emit_data, ms, stamp, Conn, Phase, Stamp};
use crate::session::Session;
use crate::transport::deadline::reached;
use crate::transport::outbound::Outbound;

/// Client-protocol state that only client connections pay for (boxed: echo connections stay small).
pub(super) struct ClientState {
    pub(super) session: Session,
    /// Once connected: when the next server ping is due (deadline-table milliseconds). Before: when the
    /// socket becomes stale (`client_stale_close_delay` after the upgrade) and is closed with 3502. One
    /// field for both: this struct is 64 bytes, a size class, and the two never apply at once.
    pub(super) ping_at: Option<Stamp>,
    /// When the client's answer to the last ping is due.
    pub(super) pong_due: Option<Stamp>,
}

impl<S: crate::transport::stream::Stream> Conn<S> {
    /// Runs what the server API asked of this client's session (server-side subscribe, …).
    pub(super) fn run_server_commands(&mut self) {
        let Some(c) = self.client.as_deref_mut() else { return };
        let mut commands = Vec::new();
        c.session.shared.take_commands(&mut commands);
        if commands.is_empty() || self.phase != Phase::Open {
            return;
        }
        let encoding = c.session.shared.encoding;
        for command in commands {
            if let Some(payload) = c
                .session
                .server_command(command)
                .and_then(|push| crate::pubsub::node::push_payload(encoding.format, push))
            {
                // A WebSocket encoding always frames a push.
                if let Some(frame) = encoding.frame(&payload) {
                    self.out.push(frame);
                }
            }
        }
    }

    /// Sends the protocol's ping when due; returns the disconnect when the last one went unanswered or
    /// the connection's token expired.
    pub(super) fn heartbeat(&mut self, now: u32) -> Option<DisconnectCode> {
        let cfg = &self.ctx.config;
        let c = self.client.as_deref_mut()?;
        if !c.session.is_connected() {
            // Before connect `ping_at` is the stale deadline: no successful connect in time.
            return c.ping_at.filter(|at| reached(now, at.get())).map(|_| DisconnectCode::STALE);
        }
        if c.session.expires_in().is_some_and(|s| s <= 0) {
            return Some(DisconnectCode::EXPIRED);
        }
        if let Some(due) = c.pong_due {
            if c.session.pong_received {
                c.pong_due = None;
            } else if reached(now, due.get()) {
                return Some(DisconnectCode::NO_PONG);
            }
        }
        if let Some(at) = c.ping_at {
            if reached(now, at.get()) {
                // Quiet since the last ping: give back queue storage kept for bursts.
                if self.out.is_empty() {
                    self.out.shrink_if_empty();
                    c.session.shared.shrink_if_empty();
                }
                let frame = c.session.shared.encoding.frame(&c.session.ping_payload()).unwrap_or_default();
                c.session.pong_received = false;
                c.pong_due = Some(stamp(now.wrapping_add(ms(cfg.pong_timeout))));
                c.ping_at = Some(stamp(now.wrapping_add(ms(cfg.ping_interval))));
                self.out.push(frame);
                if self.write_stalled_since.is_none() {
                    self.write_stalled_since = Some(stamp(now));
                }
            }
        }
        None
    }
}

/// Hands a client-protocol message to the session and frames its replies into the batch.
pub(super) fn client_message(
    state: &mut ClientState,
    payload: Payload<'_>,
    scratch: &mut Vec<u8>,
    out: &mut Outbound,
    deflate: Option<&mut Deflater>,
    now: u32,
    cfg: &crate::app::config::Config,
) -> Result<(), DisconnectCode> {
    let mut replies = bytes::BytesMut::new();
    let was_connected = state.session.is_connected();
    // What this connection holds for the client and has not written: its queue and this pass's batch.
    let backlog = out.queued_bytes() + scratch.len();
    match payload.contiguous() {
        Some(p) => state.session.on_message(p, &mut replies, backlog)?,
        None => state.session.on_message(&payload.to_vec(), &mut replies, backlog)?,
    }
    if !was_connected && state.session.is_connected() {
        // The stale deadline is over; pings take its place.
        state.ping_at = (!cfg.ping_interval.is_zero()).then(|| stamp(now.wrapping_add(ms(cfg.ping_interval))));
    }
    if !replies.is_empty() {
        let opcode = if state.session.format().is_binary() { OpCode::Binary } else { OpCode::Text };
        emit_data(scratch, out, deflate, opcode, Payload { first: &replies, second: &[] });
    }
    Ok(())
}
