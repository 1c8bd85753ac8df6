//! One connection, from the first byte of its HTTP upgrade to the FIN after its close handshake.
//!
//! A single task owns the socket, the read buffer, the reader and the outbound queue, so nothing here
//! is locked. The task sleeps in one `select!` on: the socket becoming readable, the socket becoming
//! writable (only while frames are queued), its one timer, and shutdown.
//!
//! # Why the write path looks like this
//! Replies produced while parsing one read (echoes, pongs, a close) are encoded into a per-thread
//! scratch buffer and written with a single non-blocking `write` at the end of the pass: one syscall for
//! a whole burst, and no allocation. Only bytes the kernel does not take right away are copied into a
//! `Bytes` and queued ([`Outbound`]); from then on replies go behind them in the queue, preserving order.
//! The scratch buffer is thread-local and only touched between two `.await`s, so tasks migrating between
//! worker threads never share it.
//!
//! # Memory of an idle connection
//! An idle connection holds: the task and this future (socket handle, reader state, an empty queue, one
//! timer), and whatever its read-buffer strategy keeps (nothing for `pool`). No read or write buffer, no
//! message buffer.
//!
//! # Timers
//! One `Sleep`, re-armed lazily: reads only record the time; when the timer fires the real deadline is
//! recomputed (idle, write stall, close wait) and either acted on or re-armed. No timer-wheel work per
//! message.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringcast_wire::buffer::{fill_from, AnyBuffer, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer};
use ringcast_wire::close::encode_close_payload;
use ringcast_wire::frame::{encode_header, MAX_HEADER_LEN};
use ringcast_wire::handshake::{self, HandshakeError};
use ringcast_wire::{CloseCode, Event, OpCode, Payload, Reader, Role, Strategy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::outbound::Outbound;
use crate::server::Context;
use crate::shutdown::Shutdown;

thread_local! {
    /// Replies produced during one parse pass, written with one syscall. Per worker thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Scratch capacity kept between passes; a pass that needed more (a huge echo) gives it back.
const SCRATCH_KEEP: usize = 256 * 1024;

/// What an endpoint does with messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Echo,
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// We sent a close frame and wait (bounded) for the peer's.
    Closing,
    /// The peer broke the protocol: we sent a close with the code for it. The byte stream can no longer be
    /// parsed, so after our close we send FIN and discard input until EOF (bounded by `close_timeout`);
    /// discarding rather than just closing avoids an RST that could destroy our close frame in flight.
    Failed,
    /// The close handshake is over (or abandoned): flush, FIN, done.
    Done,
}

/// Serves one accepted TCP connection to the end.
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>, mut shutdown: Shutdown) {
    let cfg = &ctx.config;
    let upgraded = tokio::select! {
        r = tokio::time::timeout(cfg.handshake_timeout, handshake(&stream, &ctx)) => match r {
            Ok(r) => r,
            Err(_) => {
                metrics::counter!("ringcast_handshake_failures_total", "reason" => "timeout").increment(1);
                tracing::debug!(%peer, "handshake timed out");
                return;
            }
        },
        _ = shutdown.recv() => return,
    };
    let (endpoint, leftover) = match upgraded {
        Ok(v) => v,
        Err(HandshakeFailure::Io(e)) => {
            tracing::debug!(%peer, error = %e, "connection lost during handshake");
            return;
        }
        Err(HandshakeFailure::Rejected(e)) => {
            metrics::counter!("ringcast_handshake_failures_total", "reason" => e.label()).increment(1);
            tracing::info!(%peer, status = e.status(), error = %e, "handshake rejected");
            let mut stream = stream;
            let _ = tokio::time::timeout(cfg.write_timeout, stream.write_all(e.response())).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    metrics::counter!("ringcast_ws_connections_total").increment(1);
    metrics::gauge!("ringcast_ws_connections").increment(1.0);
    let mut conn = Conn::new(stream, peer, ctx.clone(), endpoint);
    let result = conn.run(leftover, &mut shutdown).await;
    metrics::gauge!("ringcast_ws_connections").decrement(1.0);
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an IO error");
    }
}

enum HandshakeFailure {
    Io(io::Error),
    Rejected(HandshakeError),
}

/// Reads and answers the upgrade request. Returns the endpoint and any bytes that followed the head.
async fn handshake(stream: &TcpStream, ctx: &Context) -> Result<(Endpoint, Vec<u8>), HandshakeFailure> {
    let cfg = &ctx.config;
    let max = cfg.max_request_head;
    let mut head: Vec<u8> = Vec::with_capacity(1024);
    loop {
        stream.readable().await.map_err(HandshakeFailure::Io)?;
        if head.len() == head.capacity() {
            head.reserve((head.capacity()).min(max + 1 - head.len()).max(1));
        }
        let spare = head.capacity() - head.len();
        let start = head.len();
        head.resize(start + spare, 0);
        match stream.try_read(&mut head[start..]) {
            Ok(0) => return Err(HandshakeFailure::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => head.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                head.truncate(start);
                continue;
            }
            Err(e) => return Err(HandshakeFailure::Io(e)),
        }
        let req = match handshake::parse_request(&head, max, &[]) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => return Err(HandshakeFailure::Rejected(e)),
        };
        let endpoint = if ctx.settings.echo && req.path == cfg.echo_path {
            Endpoint::Echo
        } else {
            return Err(HandshakeFailure::Rejected(HandshakeError::NotFound));
        };
        if !handshake::origin_allowed(req.origin, req.host, &ctx.allowed_origins) {
            return Err(HandshakeFailure::Rejected(HandshakeError::OriginNotAllowed));
        }
        let mut response = Vec::with_capacity(160);
        handshake::write_response(&req, &mut response);
        let head_len = req.head_len;
        let mut w = stream;
        write_all(&mut w, &response).await.map_err(HandshakeFailure::Io)?;
        let leftover = head.split_off(head_len);
        return Ok((endpoint, leftover));
    }
}

async fn write_all(stream: &mut &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A WebSocket connection after its upgrade.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    endpoint: Endpoint,
    buf: AnyBuffer,
    reader: Reader,
    out: Outbound,
    phase: Phase,
    /// The peer sent EOF: nothing more to read.
    read_closed: bool,
    last_read: Instant,
    /// Since when queued bytes have been waiting for a writable socket.
    write_stalled_since: Option<Instant>,
    closing_since: Option<Instant>,
    fin_sent: bool,
}

impl Conn {
    fn new(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>, endpoint: Endpoint) -> Self {
        let cfg = &ctx.config;
        let buf = match ctx.settings.strategy {
            Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(cfg.ring_buffer_size)),
            Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(ctx.pool.clone())),
            Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(
                cfg.growable_initial_size,
                cfg.max_frame_size.min(usize::MAX as u64) as usize,
            )),
        };
        let reader = Reader::new(Role::Server, ctx.limits);
        Conn {
            stream,
            peer,
            ctx,
            endpoint,
            buf,
            reader,
            out: Outbound::new(),
            phase: Phase::Open,
            read_closed: false,
            last_read: Instant::now(),
            write_stalled_since: None,
            closing_since: None,
            fin_sent: false,
        }
    }

    async fn run(&mut self, leftover: Vec<u8>, shutdown: &mut Shutdown) -> io::Result<()> {
        // Frames the client sent right behind its upgrade request.
        let mut rest: &[u8] = &leftover;
        while !rest.is_empty() && self.phase != Phase::Done {
            self.reader.settle(&mut self.buf);
            let n = fill_from(&mut self.buf, rest);
            rest = &rest[n..];
            self.process_and_reply()?;
        }
        drop(leftover);

        let timer = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            if self.phase == Phase::Done && self.out.is_empty() {
                break;
            }
            if self.phase == Phase::Failed && self.out.is_empty() && !self.fin_sent {
                self.fin_sent = true;
                let _ = self.stream.shutdown().await;
            }
            let want_read = !self.read_closed
                && self.phase != Phase::Done
                && self.out.queued_bytes() <= self.ctx.config.client_queue_max_size;
            let want_write = !self.out.is_empty();
            let shutting_down = self.phase == Phase::Open;
            tokio::select! {
                r = self.stream.readable(), if want_read => {
                    r?;
                    self.on_readable()?;
                }
                w = self.stream.writable(), if want_write => {
                    w?;
                    self.flush()?;
                }
                _ = timer.as_mut() => {
                    if self.on_timer() {
                        break;
                    }
                }
                _ = shutdown.recv(), if shutting_down => {
                    self.start_close(CloseCode::GOING_AWAY, "server shutting down");
                    self.flush()?;
                }
            }
            let deadline = self.next_deadline();
            if deadline < timer.deadline() || timer.is_elapsed() {
                timer.as_mut().reset(deadline);
            }
            if self.out.is_empty() {
                self.out.shrink_if_empty();
            }
        }
        // The server closes the TCP connection first (RFC 6455 §7.1.1): FIN after the last frame.
        let _ = self.stream.shutdown().await;
        Ok(())
    }

    /// Reads everything the socket has, parsing and replying as it goes.
    fn on_readable(&mut self) -> io::Result<()> {
        loop {
            self.reader.settle(&mut self.buf);
            let (a, b) = self.buf.writable();
            let space = a.len() + b.len();
            let mut iov = [io::IoSliceMut::new(a), io::IoSliceMut::new(b)];
            match self.stream.try_read_vectored(&mut iov) {
                Ok(0) => {
                    self.read_closed = true;
                    if self.phase != Phase::Done {
                        tracing::debug!(peer = %self.peer, "peer closed TCP without a close handshake");
                        self.phase = Phase::Done;
                    }
                    self.buf.release();
                    return Ok(());
                }
                Ok(n) => {
                    self.buf.commit(n);
                    self.last_read = Instant::now();
                    if self.phase == Phase::Failed {
                        let len = self.buf.len();
                        self.buf.consume(len);
                        continue;
                    }
                    self.process_and_reply()?;
                    if n < space || self.phase == Phase::Done {
                        // The socket is (very likely) drained; don't pay a syscall to hear WouldBlock.
                        break;
                    }
                    if self.out.queued_bytes() > self.ctx.config.client_queue_max_size {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.reader.settle(&mut self.buf);
        self.buf.release();
        Ok(())
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
        let Conn { reader, buf, out, phase, endpoint, peer, closing_since, .. } = self;
        loop {
            if matches!(*phase, Phase::Done | Phase::Failed) {
                return;
            }
            match reader.next(buf) {
                Ok(None) => return,
                Ok(Some(event)) => match event {
                    Event::Message { opcode, payload } => {
                        if *phase == Phase::Open {
                            match endpoint {
                                Endpoint::Echo => emit(scratch, out, opcode, payload),
                            }
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
                        tracing::info!(peer = %peer, code = e.close_code().0, error = %e, "closing connection: protocol violation");
                        let mut body = [0u8; 125];
                        let n = encode_close_payload(e.close_code(), &e.to_string(), &mut body);
                        emit(scratch, out, OpCode::Close, Payload { first: &body[..n], second: &[] });
                    }
                    *phase = Phase::Failed;
                    *closing_since = Some(Instant::now());
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
            self.write_stalled_since = Some(Instant::now());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let before = self.out.queued_bytes();
        let done = self.out.flush(&self.stream)?;
        if done {
            self.write_stalled_since = None;
        } else if self.out.queued_bytes() < before {
            // Progress resets the stall clock: a slow reader is fine, a stuck one is not.
            self.write_stalled_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Sends a close frame of our own (shutdown, timeouts) and waits for the peer's.
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
        self.phase = Phase::Closing;
        self.closing_since = Some(Instant::now());
    }

    fn next_deadline(&self) -> Instant {
        let cfg = &self.ctx.config;
        let far = Instant::now() + Duration::from_secs(86_400);
        let mut d = if cfg.idle_timeout.is_zero() || self.phase != Phase::Open {
            far
        } else {
            self.last_read + cfg.idle_timeout
        };
        if let Some(t) = self.write_stalled_since {
            d = d.min(t + cfg.write_timeout);
        }
        if let Some(t) = self.closing_since {
            d = d.min(t + cfg.close_timeout);
        }
        d
    }

    /// The timer fired: act on whichever deadline really passed. Returns true to drop the connection.
    fn on_timer(&mut self) -> bool {
        let cfg = &self.ctx.config;
        let now = Instant::now();
        if let Some(t) = self.write_stalled_since {
            if now >= t + cfg.write_timeout {
                metrics::counter!("ringcast_ws_timeouts_total", "kind" => "write").increment(1);
                tracing::info!(peer = %self.peer, "closing connection: write timeout");
                return true;
            }
        }
        if let Some(t) = self.closing_since {
            if now >= t + cfg.close_timeout {
                tracing::debug!(peer = %self.peer, "peer did not answer our close in time");
                return true;
            }
        }
        if self.phase == Phase::Open && !cfg.idle_timeout.is_zero() && now >= self.last_read + cfg.idle_timeout {
            metrics::counter!("ringcast_ws_timeouts_total", "kind" => "idle").increment(1);
            tracing::debug!(peer = %self.peer, "closing connection: idle timeout");
            self.start_close(CloseCode::GOING_AWAY, "idle timeout");
            // A write error here surfaces on the next flush; the close timer bounds the wait either way.
            let _ = self.flush();
        }
        false
    }
}

/// Encodes one server frame for `payload` into the batch, or behind the queue if frames are waiting.
fn emit(scratch: &mut Vec<u8>, out: &mut Outbound, opcode: OpCode, payload: Payload<'_>) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let h = encode_header(&mut hdr, true, opcode, payload.len() as u64, None);
    if out.is_empty() {
        scratch.extend_from_slice(&hdr[..h]);
        scratch.extend_from_slice(payload.first);
        scratch.extend_from_slice(payload.second);
    } else {
        let mut frame = Vec::with_capacity(h + payload.len());
        frame.extend_from_slice(&hdr[..h]);
        payload.copy_to(&mut frame);
        out.push(Bytes::from(frame));
    }
}
