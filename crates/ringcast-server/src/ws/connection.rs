//! One connection, from the first byte of its HTTP upgrade to the FIN after its close handshake.
//!
//! # Shape
//! A connection is one hand-written future, [`Connection`], owning the socket, the handshake bytes, the
//! read buffer, the reader and the outbound queue; its deadlines live in the shared [`Deadlines`] table
//! (8 bytes here instead of a 112-byte `Sleep`). Nothing of the connection is locked: no other task
//! touches it (a fan-out may write a parked client connection's socket, under the rules in
//! [`crate::pubsub::client`]; never its buffers). `poll` waits on the socket through tokio's
//! `poll_read_ready`/`poll_write_ready`, which park the waker in the socket's own registration, so
//! waiting costs no extra future state; an `async fn` with `select!` carried ~1.3 KiB of nested future
//! state per connection, which alone broke the 1 KiB-per-idle-connection budget.
//!
//! # Why the write path looks like this
//! Replies produced while parsing one read (echoes, pongs, a close) are encoded into a per-thread
//! scratch buffer and written with a single non-blocking `write` at the end of the pass: one syscall for
//! a whole burst, and no allocation. Only bytes the kernel does not take right away are copied into a
//! `Bytes` and queued ([`Outbound`]); from then on replies go behind them in the queue, preserving order.
//! A client connection that waits with nothing unwritten lets fan-outs write its pushes straight to the
//! socket meanwhile (`Conn::park`; [`crate::pubsub::client`] has the rules); its next step's take makes
//! it the only writer again before it touches the socket.
//! The scratch buffer is thread-local and only touched inside one `poll`, so tasks migrating between
//! worker threads never share it.
//!
//! # Memory of an idle connection
//! The task and this future (socket handle, reader state, an empty queue, a deadline key), a deadline
//! table entry, plus whatever the read-buffer strategy keeps (nothing for `pool`). No handshake buffer,
//! no read or write buffer, no message buffer once a connection is idle. A unit test bounds the size.
//!
//! # Timers
//! Re-armed lazily: reads only record the time; the table entry is moved only when a deadline comes
//! *earlier* (a write stall, a close wait) or after it fired and the real deadline (recomputed then) is
//! still ahead. No timer work per message. The clock is read once per `poll`, and that time serves the
//! whole poll (the time of its reads, the deadline check): a poll's rounds and reads are bounded, so it
//! ends long before that time is off by anything a timeout could notice.
//!
//! # One round per wake
//! A wake for bytes costs one round of `step`: the read that takes all the socket had ends the reading
//! (on plain TCP that read also cleared the socket's readiness, so another would only say `WouldBlock`),
//! and `poll_read_ready` is asked again at once, which parks our waker in the socket's registration.
//! Only when that finds more bytes, or the reads changed the phase, does `step` run another round.
//!
//! # What lives where
//! This module is the WebSocket state machine (phases, read → parse → reply, write, close, timers).
//! Its children hold the endpoint-specific parts, as `impl Conn` blocks on the same state:
//! [`upgrade`] (routing and the upgrade), [`echo`] (the echo endpoint) and [`client`] (the
//! client-protocol driver: session, heartbeat, server-side commands).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::DisconnectCode;
use ringcast_wire::buffer::{AnyBuffer, ReadBuffer};
use ringcast_wire::close::encode_close_payload;
use ringcast_wire::frame::{encode_header, MAX_HEADER_LEN};
use ringcast_wire::{CloseCode, Deflater, Event, OpCode, Payload, Reader, Role};
use tokio::net::TcpStream;

use crate::app::admission::IpKey;
use crate::app::context::Context;
use crate::transport::deadline::{reached, Key};
use crate::transport::outbound::Outbound;
use crate::transport::stream::{ReadOutcome, Stream};

mod client;
mod echo;
mod upgrade;

use client::{client_message, ClientState};
pub use upgrade::CLIENT_PATH;

thread_local! {
    /// Replies produced during one parse pass, written with one syscall. Per worker thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Scratch capacity kept between passes; a pass that needed more (a huge echo) gives it back.
const SCRATCH_KEEP: usize = 256 * 1024;

/// Reads one `poll` may do before yielding to other tasks (a flooding peer must not hog a worker).
const READS_PER_POLL: usize = 16;

/// Rounds of (shutdown, read, write, deadlines) one `poll` may run before yielding.
const ROUNDS_PER_POLL: usize = 32;

/// What an endpoint does with messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// Not chosen yet (still in the handshake).
    None,
    Echo,
    /// The Centrifugo client protocol (`/connection/websocket`); the session lives in `Conn::session`.
    Client,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake,
    Open,
    /// We sent a close frame and wait (bounded by `close_timeout`) for the peer's.
    Closing,
    /// We sent our last bytes (a close for a protocol violation, or an HTTP error) and the peer's input
    /// can no longer be parsed: after the queue is flushed we send FIN and discard input until EOF,
    /// bounded by `close_timeout`. Discarding, rather than closing at once, avoids the RST that a close
    /// with unread input triggers, which could destroy our last bytes in flight.
    Draining,
    /// Nothing more to say: flush what is queued, then drop the socket.
    Done,
    /// A plain HTTP request (the server API, /health, /metrics): the socket goes to the HTTP server.
    Http,
}

/// A connection's whole life as one future. Spawned once per accepted socket.
pub struct Connection<S: Stream = TcpStream> {
    conn: Conn<S>,
}

impl<S: Stream> Connection<S> {
    pub fn new(stream: S, ctx: Arc<Context>, spread: usize) -> Connection<S> {
        let mut conn = Conn::new(stream, ctx, spread);
        if conn.ctx.deadlines.is_shutdown() {
            conn.shutdown_seen = true;
            conn.phase = Phase::Done;
        }
        Connection { conn }
    }
}

impl<S: Stream> Future for Connection<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        // Every field is Unpin: the connection never relies on its own address.
        let conn = &mut self.get_mut().conn;
        let now = conn.ctx.deadlines.now_ms();
        for _ in 0..ROUNDS_PER_POLL {
            if !conn.shutdown_seen && conn.ctx.deadlines.is_shutdown() {
                conn.shutdown_seen = true;
                conn.on_shutdown();
            }
            match conn.step(cx, now) {
                Ok(Step::Again) => continue,
                Ok(Step::Wait) => {}
                Ok(Step::Finished) => return Poll::Ready(()),
                Err(e) => {
                    conn.log_io_error(&e);
                    return Poll::Ready(());
                }
            }
            let deadline = conn.next_deadline(now);
            if reached(now, deadline) {
                if conn.on_timer(now) {
                    return Poll::Ready(());
                }
                continue;
            }
            // Arm lazily: keep an earlier arming (it will fire, and we re-arm then), replace a later one,
            // or one that already fired.
            let arm = match conn.armed {
                None => true,
                Some(at) => reached(now, at.get()) || !reached(deadline, at.get()),
            };
            if arm {
                let at = stamp(deadline);
                conn.ctx.deadlines.arm(conn.key, at.get(), cx.waker());
                conn.armed = Some(at);
            }
            if conn.park() {
                // Frames were delivered since this step's take: they are ours to write.
                continue;
            }
            return Poll::Pending;
        }
        // Still busy after many rounds: let other connections run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: Stream> Drop for Conn<S> {
    fn drop(&mut self) {
        if let Some(client) = &self.client {
            // Before the socket closes (after this, with the fields): no fan-out may write to its
            // descriptor once the number can be reused.
            client.session.shared.withdraw_fd();
        }
        self.ctx.live.leave();
        self.ctx.deadlines.remove(self.key);
        if let Some(ip) = self.admitted {
            self.ctx.admission.release(ip);
        }
        if self.endpoint != Endpoint::None {
            metrics::gauge!("ringcast_ws_connections").decrement(1.0);
        }
    }
}

enum Step {
    /// Something happened; look again.
    Again,
    /// Nothing ready: wait for the socket, the timer or shutdown.
    Wait,
    Finished,
}

/// What a connection keeps in its one boxed slot, depending on where it stands.
enum Stage {
    /// The upgrade request as received so far (only a head that arrives in pieces, or one handed to the
    /// HTTP server, is kept; see `Conn::read_handshake`).
    Head(Vec<u8>),
    /// permessage-deflate's sending half with server context takeover (its compressor, once it has
    /// compressed a message). Without takeover a connection keeps only `Conn::deflate_window`.
    Deflate(Deflater),
}

struct Conn<S: Stream> {
    stream: S,
    ctx: Arc<Context>,
    phase: Phase,
    endpoint: Endpoint,
    /// The upgrade request as received so far, then (once upgraded) permessage-deflate's sending half:
    /// one boxed slot, 8 bytes in every connection's future, since the two never live at once.
    stage: Option<Box<Stage>>,
    /// permessage-deflate negotiated without server context takeover: the window bits its sending half
    /// compresses with (`Deflater::shared`); 0 otherwise. One byte instead of a boxed `Deflater`.
    deflate_window: u8,
    buf: AnyBuffer,
    reader: Reader,
    out: Outbound,
    client: Option<Box<ClientState>>,
    /// Once admission let the upgrade in: the source address it counted, given back on drop.
    admitted: Option<IpKey>,
    /// The peer sent EOF: nothing more to read.
    read_closed: bool,
    fin_sent: bool,
    shutdown_seen: bool,
    key: Key,
    /// The deadline the table entry is armed with (milliseconds on the table's clock), if any.
    armed: Option<Stamp>,
    /// Start of the handshake, then the time of the last read.
    last_read: u32,
    /// Since when queued bytes have been waiting for a writable socket.
    write_stalled_since: Option<Stamp>,
    closing_since: Option<Stamp>,
}

impl<S: Stream> Conn<S> {
    fn new(stream: S, ctx: Arc<Context>, spread: usize) -> Self {
        let buf = ctx.read_buffer();
        let reader = Reader::new(Role::Server, ctx.limits);
        ctx.live.enter();
        let key = ctx.deadlines.register(spread);
        let now = ctx.deadlines.now_ms();
        Conn {
            stream,
            ctx,
            phase: Phase::Handshake,
            endpoint: Endpoint::None,
            stage: None,
            deflate_window: 0,
            buf,
            reader,
            out: Outbound::new(),
            client: None,
            admitted: None,
            read_closed: false,
            fin_sent: false,
            shutdown_seen: false,
            key,
            armed: None,
            last_read: now,
            write_stalled_since: None,
            closing_since: None,
        }
    }

    /// One round: deliveries and commands, reads, writes, the end of the phase. `now` is the poll's time.
    fn step(&mut self, cx: &mut TaskContext<'_>, now: u32) -> io::Result<Step> {
        let mut progressed = false;
        if let Some(client) = self.client.as_deref().filter(|_| self.phase != Phase::Open) {
            // Our close frame is queued (or the peer's arrived): nothing may follow it (RFC 6455 §5.5.1),
            // so the shared queue is closed (idempotent; a few steps at most per connection) and whatever
            // publishers still send is dropped and counted, never written behind the close.
            let dropped = client.session.shared.close();
            if dropped > 0 {
                metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
            }
        }
        if let Some(client) = &self.client {
            // Frames publishers delivered, and disconnects asked for by others (slow, API).
            let was_empty = self.out.is_empty();
            if let Some(req) = client.session.shared.take(&mut self.out, cx.waker()) {
                if req.code == DisconnectCode::SLOW.code && self.phase == Phase::Open {
                    // A peer that does not read would never get our close behind its backlog.
                    let dropped = self.out.drop_backlog();
                    metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
                    tracing::info!(client = %client.session.shared.id, dropped, "disconnecting slow client");
                }
                self.start_close(CloseCode(req.code), &req.reason);
            }
            self.run_server_commands();
            if was_empty && !self.out.is_empty() && self.write_stalled_since.is_none() {
                self.write_stalled_since = Some(stamp(now));
            }
        }
        if self.wants_read() {
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let phase = self.phase;
                    let drained = self.on_readable(now)?;
                    // The socket gave all it had: asking again now parks our waker in its registration,
                    // and the reads need no other round. More bytes already there, a new phase or input
                    // no longer wanted: look again.
                    progressed = !(drained
                        && self.phase == phase
                        && self.wants_read()
                        && self.stream.poll_read_ready(cx).is_pending());
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        if !self.out.is_empty() || self.stream.has_pending_output() {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.flush()?;
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        if self.phase == Phase::Http {
            self.hand_off_to_http();
            return Ok(Step::Finished);
        }
        if self.out.is_empty() && !self.stream.has_pending_output() {
            match self.phase {
                Phase::Done => return Ok(Step::Finished),
                Phase::Draining if !self.fin_sent => {
                    self.fin_sent = true;
                    // FIN after our last bytes; input is still read (and discarded) until EOF.
                    self.stream.shutdown_write();
                }
                _ => {}
            }
        }
        Ok(if progressed { Step::Again } else { Step::Wait })
    }

    /// Before waiting: an idle client connection (nothing unwritten of its own) lets fan-outs write its
    /// pushes straight to the socket until its next step ([`crate::pubsub::client`]). Returns true when
    /// pushes arrived since the step's take, to be taken now instead of waiting.
    fn park(&self) -> bool {
        let Some(client) = &self.client else { return false };
        let idle = self.phase == Phase::Open && self.out.is_empty() && !self.stream.has_pending_output();
        client.session.shared.park(idle)
    }

    fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Handshake | Phase::Draining => !self.read_closed,
            // A client's frames are not read while its queue is over half the limit: replies it asks for
            // count against the same limit as pushes (the session disconnects it 3008 once they pass it),
            // and a peer that does not read should not be able to keep us producing replies.
            Phase::Open if self.client.is_some() => {
                !self.read_closed && self.out.queued_bytes() <= self.ctx.config.client_queue_max_size / 2
            }
            Phase::Open | Phase::Closing => {
                !self.read_closed && self.out.queued_bytes() <= self.ctx.config.client_queue_max_size
            }
            Phase::Done | Phase::Http => false,
        }
    }

    fn on_shutdown(&mut self) {
        match self.phase {
            Phase::Handshake => self.phase = Phase::Done,
            Phase::Open if self.client.is_some() => {
                let d = DisconnectCode::SHUTDOWN;
                self.start_close(CloseCode(d.code), d.reason)
            }
            Phase::Open => self.start_close(CloseCode::GOING_AWAY, "server shutting down"),
            _ => {}
        }
    }

    /// Reads what the socket has (until it would block, or a few reads for fairness). Returns true when
    /// it stopped because the socket had nothing more (`read_frames`' `None`), false for any other reason.
    /// Only called when [`Self::wants_read`]; each read may change that, so it is asked again after each.
    fn on_readable(&mut self, now: u32) -> io::Result<bool> {
        let mut drained = false;
        for _ in 0..READS_PER_POLL {
            let n = match self.phase {
                Phase::Handshake => self.read_handshake()?,
                _ => self.read_frames(now)?,
            };
            match n {
                None => {
                    drained = true;
                    break;
                }
                Some(0) => {
                    self.read_closed = true;
                    if !matches!(self.phase, Phase::Done) {
                        if self.phase == Phase::Open {
                            tracing::debug!("peer closed TCP without a close handshake");
                        }
                        self.phase = Phase::Done;
                    }
                    break;
                }
                Some(_) => {}
            }
            if !self.wants_read() {
                break;
            }
        }
        self.reader.settle(&mut self.buf);
        self.buf.release();
        Ok(drained)
    }

    /// One read of frames, at time `now`. `Ok(None)`: nothing more to read now (it would block, or the
    /// stream says this read drained it: [`ReadOutcome`]); `Ok(Some(0))`: EOF.
    fn read_frames(&mut self, now: u32) -> io::Result<Option<usize>> {
        self.reader.settle(&mut self.buf);
        let (a, b) = self.buf.writable();
        let mut iov = [io::IoSliceMut::new(a), io::IoSliceMut::new(b)];
        let ReadOutcome { len: n, drained } = match self.stream.try_read_vectored(&mut iov) {
            Ok(got) => got,
            Err(e) => {
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => Ok(Some(usize::MAX)),
                    _ => Err(e),
                }
            }
        };
        if n == 0 {
            return Ok(Some(0));
        }
        self.ctx.bytes_in.increment(n as u64);
        self.buf.commit(n);
        self.last_read = now;
        if self.phase == Phase::Draining {
            let len = self.buf.len();
            self.buf.consume(len);
        } else {
            self.process_and_reply()?;
        }
        Ok(if drained { None } else { Some(n) })
    }

    /// Parses every complete event in the buffer; replies are batched into one write.
    fn process_and_reply(&mut self) -> io::Result<()> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            self.process(&mut scratch);
            let result = self.write_batch(&scratch);
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::new();
            }
            result
        })
    }

    fn process(&mut self, scratch: &mut Vec<u8>) {
        // Every caller has just set `last_read` from the deadline clock: no second clock read per pass.
        let now = self.last_read;
        let Conn { reader, buf, out, phase, endpoint, closing_since, client, ctx, stage, deflate_window, .. } = self;
        let mut shared;
        let mut deflate = match stage.as_deref_mut() {
            Some(Stage::Deflate(d)) => Some(d),
            _ if *deflate_window != 0 => {
                shared = Deflater::shared(*deflate_window, &ctx.settings.deflate);
                Some(&mut shared)
            }
            _ => None,
        };
        loop {
            if !matches!(*phase, Phase::Open | Phase::Closing) {
                return;
            }
            match reader.next(buf) {
                Ok(None) => return,
                Ok(Some(event)) => match event {
                    Event::Message { opcode, payload } => {
                        if *phase != Phase::Open {
                            continue;
                        }
                        match (*endpoint, client.as_deref_mut()) {
                            (Endpoint::Echo, _) => echo::echo(scratch, out, deflate.as_deref_mut(), opcode, payload),
                            (Endpoint::Client, Some(state)) => {
                                let deflate = deflate.as_deref_mut();
                                if let Err(d) = client_message(state, payload, scratch, out, deflate, now, &ctx.config)
                                {
                                    tracing::info!(code = d.code, reason = d.reason, "disconnecting client");
                                    if d == DisconnectCode::SLOW {
                                        // Replies passed the queue limit: the close must not wait behind a
                                        // backlog the peer is not reading.
                                        let dropped = out.drop_backlog();
                                        metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
                                    }
                                    emit_close(scratch, out, CloseCode(d.code), d.reason);
                                    *phase = Phase::Closing;
                                    *closing_since = Some(stamp(now));
                                }
                            }
                            _ => {}
                        }
                    }
                    Event::Ping(payload) => {
                        if *phase == Phase::Open {
                            emit(scratch, out, OpCode::Pong, payload);
                        }
                    }
                    Event::Pong(_) => {}
                    Event::Close { code, .. } => {
                        if *phase == Phase::Open {
                            // Echo the peer's code (RFC 6455 §5.5.1); an empty close is answered empty.
                            let mut body = [0u8; 125];
                            let n = if code == CloseCode::NO_STATUS {
                                0
                            } else {
                                encode_close_payload(code, "", &mut body)
                            };
                            emit(scratch, out, OpCode::Close, Payload { first: &body[..n], second: &[] });
                        }
                        *phase = Phase::Done;
                        return;
                    }
                },
                Err(e) => {
                    metrics::counter!("ringcast_ws_protocol_errors_total", "reason" => e.label()).increment(1);
                    if *phase == Phase::Open {
                        tracing::info!(code = e.close_code().0, error = %e, "closing connection: protocol violation");
                        emit_close(scratch, out, e.close_code(), &e.to_string());
                    }
                    *phase = Phase::Draining;
                    *closing_since = Some(stamp(now));
                    return;
                }
            }
        }
    }

    /// Writes the batch right away when nothing is queued ahead of it; queues what the kernel refuses.
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut written = 0;
        if self.out.is_empty() {
            loop {
                match self.stream.try_write(&batch[written..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        written += n;
                        self.ctx.bytes_out.increment(n as u64);
                        if written == batch.len() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        self.out.push(Bytes::copy_from_slice(&batch[written..]));
        if self.write_stalled_since.is_none() {
            self.write_stalled_since = Some(stamp(self.ctx.deadlines.now_ms()));
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let before = self.out.queued_bytes();
        let done = self.out.flush(&mut self.stream);
        self.ctx.bytes_out.increment((before - self.out.queued_bytes()) as u64);
        if done? {
            self.write_stalled_since = None;
            // A client connection keeps its queue storage while traffic flows (freeing it after every
            // drain would make each burst allocate: per-delivery allocations); it is released at the
            // next ping if the connection has gone quiet (`heartbeat`).
            if self.client.is_none() {
                self.out.shrink_if_empty();
            }
        } else if self.out.queued_bytes() < before {
            // Progress resets the stall clock: a slow reader is fine, a stuck one is not.
            self.write_stalled_since = Some(stamp(self.ctx.deadlines.now_ms()));
        } else if self.write_stalled_since.is_none() {
            self.write_stalled_since = Some(stamp(self.ctx.deadlines.now_ms()));
        }
        Ok(())
    }

    /// Sends a close frame of our own (shutdown, idle timeout) and waits for the peer's.
    fn start_close(&mut self, code: CloseCode, reason: &str) {
        if self.phase != Phase::Open {
            return;
        }
        let mut body = [0u8; 125];
        let n = encode_close_payload(code, reason, &mut body);
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let h = encode_header(&mut hdr, true, OpCode::Close, n as u64, None);
        let mut frame = Vec::with_capacity(h + n);
        frame.extend_from_slice(&hdr[..h]);
        frame.extend_from_slice(&body[..n]);
        self.out.push(Bytes::from(frame));
        if self.write_stalled_since.is_none() {
            self.write_stalled_since = Some(stamp(self.ctx.deadlines.now_ms()));
        }
        self.phase = Phase::Closing;
        self.closing_since = Some(stamp(self.ctx.deadlines.now_ms()));
    }

    /// The earliest deadline that applies now (milliseconds on the deadline table's clock).
    fn next_deadline(&self, now: u32) -> u32 {
        let cfg = &self.ctx.config;
        let mut d = match self.phase {
            Phase::Handshake => self.last_read.wrapping_add(ms(cfg.handshake_timeout)),
            Phase::Open if !cfg.idle_timeout.is_zero() => self.last_read.wrapping_add(ms(cfg.idle_timeout)),
            _ => self.last_read.wrapping_add(ms(Duration::from_secs(86_400))),
        };
        if let Some(t) = self.write_stalled_since {
            d = earlier(d, t.get().wrapping_add(ms(cfg.write_timeout)));
        }
        if let Some(t) = self.closing_since {
            d = earlier(d, t.get().wrapping_add(ms(cfg.close_timeout)));
        }
        if let (Some(c), Phase::Open) = (&self.client, self.phase) {
            if let Some(t) = c.ping_at {
                d = earlier(d, t.get());
            }
            if let Some(secs) = c.session.expires_in() {
                d = earlier(d, now.wrapping_add((secs.clamp(0, 86_400) as u32) * 1000));
            }
            if let Some(t) = c.pong_due {
                d = earlier(d, t.get());
            }
        }
        d
    }

    /// A deadline passed: act on whichever really did. Returns true to drop the connection.
    fn on_timer(&mut self, now: u32) -> bool {
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
        if self.phase == Phase::Handshake && reached(now, self.last_read.wrapping_add(ms(cfg.handshake_timeout))) {
            metrics::counter!("ringcast_handshake_failures_total", "reason" => "timeout").increment(1);
            tracing::debug!("handshake timed out");
            return true;
        }
        if let Some(t) = self.write_stalled_since {
            if reached(now, t.get().wrapping_add(ms(cfg.write_timeout))) {
                metrics::counter!("ringcast_ws_timeouts_total", "kind" => "write").increment(1);
                tracing::info!("closing connection: write timeout");
                return true;
            }
        }
        if let Some(t) = self.closing_since {
            if reached(now, t.get().wrapping_add(ms(cfg.close_timeout))) {
                tracing::debug!("peer did not finish the close in time");
                return true;
            }
        }
        if self.phase == Phase::Open && self.client.is_some() {
            if let Some(d) = self.heartbeat(now) {
                let kind = match d {
                    DisconnectCode::EXPIRED => "expired",
                    DisconnectCode::STALE => "stale",
                    _ => "pong",
                };
                metrics::counter!("ringcast_ws_timeouts_total", "kind" => kind).increment(1);
                tracing::info!(code = d.code, reason = d.reason, "disconnecting client");
                self.start_close(CloseCode(d.code), d.reason);
                return false;
            }
        }
        if self.phase == Phase::Open
            && !cfg.idle_timeout.is_zero()
            && reached(now, self.last_read.wrapping_add(ms(cfg.idle_timeout)))
        {
            metrics::counter!("ringcast_ws_timeouts_total", "kind" => "idle").increment(1);
            tracing::debug!("closing connection: idle timeout");
            self.start_close(CloseCode::GOING_AWAY, "idle timeout");
            return false;
        }
        // Nothing was due after all (a deadline moved later since it was armed).
        false
    }

    fn log_io_error(&self, e: &io::Error) {
        metrics::counter!("ringcast_io_errors_total").increment(1);
        tracing::debug!(peer = ?self.stream.peer_addr().ok(), error = %e, "connection ended with an IO error");
    }
}

/// A time on the deadline table's clock, made odd so it is never zero: an `Option<Stamp>` is 4 bytes.
/// (One millisecond of resolution is the price; deadlines are only checked every 50 ms anyway.)
type Stamp = std::num::NonZeroU32;

fn stamp(ms: u32) -> Stamp {
    Stamp::new(ms | 1).unwrap_or(Stamp::MIN)
}

/// A duration in the deadline table's milliseconds (configured timeouts are validated to be ≤ 1 day).
fn ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX / 4)) as u32
}

/// The earlier of two wrapping-millisecond times.
fn earlier(a: u32, b: u32) -> u32 {
    if reached(a, b) {
        b
    } else {
        a
    }
}

/// Encodes a close frame with `code` and `reason` (cut to fit) into the batch.
fn emit_close(scratch: &mut Vec<u8>, out: &mut Outbound, code: CloseCode, reason: &str) {
    let mut body = [0u8; 125];
    let n = encode_close_payload(code, reason, &mut body);
    emit(scratch, out, OpCode::Close, Payload { first: &body[..n], second: &[] });
}

/// Encodes one server frame for `payload` into the batch, or behind the queue if frames are waiting.
fn emit(scratch: &mut Vec<u8>, out: &mut Outbound, opcode: OpCode, payload: Payload<'_>) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    if out.is_empty() {
        scratch.reserve(h + payload.len());
        scratch.extend_from_slice(&hdr[..h]);
        scratch.extend_from_slice(payload.first);
        if !payload.second.is_empty() {
            scratch.extend_from_slice(payload.second);
        }
    } else {
        let mut frame = Vec::with_capacity(h + payload.len());
        frame.extend_from_slice(&hdr[..h]);
        payload.copy_to(&mut frame);
        out.push(Bytes::from(frame));
    }
}

/// Encodes one data message into the batch (or behind the queue), compressed when the connection
/// negotiated permessage-deflate and the message is long enough. Control frames never go through here.
fn emit_data(
    scratch: &mut Vec<u8>,
    out: &mut Outbound,
    deflate: Option<&mut Deflater>,
    opcode: OpCode,
    payload: Payload<'_>,
) {
    let Some(d) = deflate.filter(|d| d.compresses(payload.len())) else {
        return emit(scratch, out, opcode, payload);
    };
    // The compressor wants one slice; a message split by a ring buffer's wrap is copied (rare).
    let joined;
    let bytes = match payload.contiguous() {
        Some(p) => p,
        None => {
            joined = payload.to_vec();
            &joined
        }
    };
    if out.is_empty() {
        d.encode_frame_into(opcode, bytes, scratch);
    } else {
        out.push(d.encode_frame(opcode, bytes));
    }
}

#[cfg(test)]
mod tests {
    /// The future is what every idle connection pays for; keep an eye on it (see BENCHMARKS.md for RSS).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let (config, settings) =
            crate::Config::load(None, |_| None, &[("listen".into(), "127.0.0.1:0".into())]).expect("config");
        let ctx = std::sync::Arc::new(crate::app::context::Context::new(config, settings).expect("context"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let conn = super::Connection::new(stream, ctx, 0);
        let size = std::mem::size_of_val(&conn);
        println!("Connection future: {size} B");
        // tokio's task cell is its header (32 B), scheduler and id (16 B), the stage tag (8 B), the future
        // and a trailer (48 B), rounded up to a multiple of 128 (it is `repr(align(128))`): 104 + 280 =
        // 384 B per connection; one byte more and every connection's task costs 512.
        assert!(size <= 280, "Connection grew to {size} B");
    }

    /// A TLS connection is its own monomorphisation (`Connection<TlsStream>`): the session is boxed, so the
    /// future is no larger than the plain one and stays in the same task size class. The box is what TLS
    /// adds to every connection (its buffers come on top while they hold bytes).
    #[test]
    fn tls_connection_future_stays_small() {
        let plain = std::mem::size_of::<super::Connection>();
        let tls = std::mem::size_of::<super::Connection<crate::transport::stream::TlsStream>>();
        let session = std::mem::size_of::<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>();
        println!("Connection<TcpStream>: {plain} B, Connection<TlsStream>: {tls} B, boxed TLS session: {session} B");
        assert!(tls <= plain, "Connection<TlsStream> grew to {tls} B (plain: {plain} B)");
    }

    /// What a client connection adds: its boxed state and the shared queue (an `Arc`: 16 more bytes).
    /// 64 and 128 are allocator size classes (mimalloc); BENCHMARKS.md has the RSS they add up to.
    #[test]
    fn client_state_stays_small() {
        let state = std::mem::size_of::<super::ClientState>();
        let shared = std::mem::size_of::<crate::pubsub::client::ClientShared>();
        println!("ClientState: {state} B, ClientShared: {shared} B");
        assert!(state <= 64, "ClientState grew to {state} B");
        assert!(shared + 16 <= 128, "ClientShared grew to {shared} B");
    }
}
