//! One TCP protocol connection, from accept to FIN: read → decode → answer, pushes, timers, close.
//!
//! # Shape
//! One task per connection, an `async fn` loop around one `select!` over the socket's readiness, the
//! client's shared queue (publishers wake it) and its deadline-table entry (timers and shutdown). No
//! other task touches the socket, buffers or decoder, so nothing here is locked. Unlike the WebSocket
//! connection this is not a hand-written future: its size is not yet held to a per-connection budget
//! (BENCHMARKS.md has no TCP idle-memory figure yet).
//!
//! # Reading
//! The read buffer is the configured strategy (`pool`, `ring`, `growable`); the decoder consumes headers
//! and hands bodies out in place, or streams a body larger than the buffer into its own. Frames are
//! decoded until the buffer is exhausted; each command's reply (or ERROR) is appended to one reply batch,
//! in command order, and the batch is written with one `write` at the end of the pass — straight to the
//! socket when nothing is queued ahead of it, else behind the queue. The socket is not read while the
//! queue is over half of `client_queue_max_size`: a peer that does not read cannot make us produce
//! replies without bound; one over the whole limit is disconnected as slow.
//!
//! # Closing
//! A fatal framing error (codes 1–4), a ping timeout (11) or an expired token (7) queues an ERROR frame;
//! then the client's shared queue is closed (nothing more is delivered behind the error), the queue is
//! flushed, FIN is sent, and input is read and discarded until EOF (bounded by `close_timeout`), so no
//! RST destroys the ERROR in flight. A slow client, a disconnect asked for by the API, the idle timeout
//! and shutdown close the same way without an ERROR (the protocol has no code for them).

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringcast_protocol::DisconnectCode;
use ringcast_wire::buffer::{AnyBuffer, ReadBuffer};
use ringcast_wire::tcp::{Command, Decoder, ErrorCode, MAX_PING_BODY};
use ringcast_wire::Role;
use tokio::net::TcpStream;

use crate::app::context::Context;
use crate::pubsub::client::{ClientId, ClientShared, DisconnectRequest};
use crate::tcp::keepalive::RttWindow;
use crate::tcp::session::{emit, emit_error, Admit, TcpSession};
use crate::transport::deadline::{reached, Key};
use crate::transport::outbound::Outbound;
use crate::transport::stream::{ReadOutcome, Stream};
use crate::transport::Encoding;

/// Reads one wake-up may do before the loop looks at timers and the queue again.
const READS_PER_PASS: usize = 16;

/// Reply-batch capacity kept between passes; a pass that needed more gives it back.
const REPLIES_KEEP: usize = 64 * 1024;

/// Metric names of this module.
pub const TCP_CONNECTIONS: &str = "ringcast_tcp_protocol_connections";
pub const TCP_ERRORS_TOTAL: &str = "ringcast_tcp_protocol_errors_total";
pub const TCP_TIMEOUTS_TOTAL: &str = "ringcast_tcp_protocol_timeouts_total";
pub const TCP_PING_RTT_SECONDS: &str = "ringcast_tcp_ping_rtt_seconds";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Our last bytes are queued; after them FIN, then input is discarded until EOF (since: ms).
    Draining(u32),
    /// The peer closed: flush what is queued, then drop the socket.
    Done,
}

/// A PING we sent and wait to see answered.
#[derive(Debug, Clone, Copy)]
struct Ping {
    body: [u8; 8],
    sent: Instant,
    /// When the answer is due (deadline-table milliseconds).
    due: u32,
}

/// One accepted TCP protocol connection. [`Connection::run`] is its task.
pub struct Connection {
    stream: TcpStream,
    ctx: Arc<Context>,
    buf: AnyBuffer,
    decoder: Decoder,
    out: Outbound,
    session: TcpSession,
    replies: Vec<u8>,
    phase: Phase,
    read_closed: bool,
    fin_sent: bool,
    key: Key,
    armed: Option<u32>,
    /// Deadline-table time of the last bytes read (or of the accept).
    last_read: u32,
    write_stalled_since: Option<u32>,
    ping: Option<Ping>,
    pings_sent: u64,
    rtt: RttWindow,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.ctx.live.leave();
        self.ctx.deadlines.remove(self.key);
        metrics::gauge!(TCP_CONNECTIONS).decrement(1.0);
    }
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX / 4)) as u32
}

fn earlier(a: u32, b: u32) -> u32 {
    if reached(a, b) {
        b
    } else {
        a
    }
}

enum Wake {
    Readable(io::Result<()>),
    Writable(io::Result<()>),
    Queue(Option<DisconnectRequest>),
    Timer,
}

impl Connection {
    pub fn new(stream: TcpStream, ctx: Arc<Context>, spread: usize) -> Connection {
        ctx.live.enter();
        metrics::gauge!(TCP_CONNECTIONS).increment(1.0);
        let key = ctx.deadlines.register(spread);
        let now = ctx.deadlines.now_ms();
        let shared = ClientShared::new(ClientId::random(), Encoding::tcp(), ctx.config.client_queue_max_size);
        Connection {
            buf: ctx.read_buffer(),
            decoder: Decoder::new(ctx.config.tcp_max_body_size),
            out: Outbound::new(),
            session: TcpSession::new(ctx.node.clone(), shared),
            replies: Vec::new(),
            phase: Phase::Open,
            read_closed: false,
            fin_sent: false,
            key,
            armed: None,
            last_read: now,
            write_stalled_since: None,
            ping: None,
            pings_sent: 0,
            rtt: RttWindow::default(),
            stream,
            ctx,
        }
    }

    /// Serves the connection until it is closed; IO errors end it (counted and logged at debug).
    ///
    /// Not an `async fn`: its argument would be moved into the future and then into a local of it, two
    /// copies of the connection in every task (1,032 B measured). The block captures `self` and only
    /// borrows it.
    #[allow(clippy::manual_async_fn)] // deliberately not `async fn`: see above
    pub fn run(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            if let Err(e) = self.serve().await {
                metrics::counter!(crate::metrics::IO_ERRORS_TOTAL).increment(1);
                tracing::debug!(error = %e, "tcp connection ended with an IO error");
            }
        }
    }

    async fn serve(&mut self) -> io::Result<()> {
        loop {
            // One unit of tokio's cooperative budget a turn: a connection whose wake-ups keep coming
            // (a flood of pushes, say) yields its worker now and then instead of holding it.
            tokio::task::coop::consume_budget().await;
            if self.phase == Phase::Open && self.ctx.deadlines.is_shutdown() {
                tracing::debug!("tcp: closing for shutdown");
                self.close(None);
            }
            if self.phase == Phase::Open {
                self.take_shared().await;
            } else {
                self.close_shared();
            }
            let now = self.ctx.deadlines.now_ms();
            if self.on_timer(now)? {
                return Ok(());
            }
            if self.out.is_empty() {
                match self.phase {
                    Phase::Done => return Ok(()),
                    Phase::Draining(_) => {
                        if !self.fin_sent {
                            self.fin_sent = true;
                            let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
                        }
                        // Our FIN is out and the peer's has come: nothing is left to wait for (not
                        // even `close_timeout`).
                        if self.read_closed {
                            return Ok(());
                        }
                    }
                    Phase::Open => {}
                }
            }
            let deadline = self.next_deadline(now);
            let wants_read = self.wants_read();
            let wants_write = !self.out.is_empty();
            let open = self.phase == Phase::Open;
            let Connection { stream, session, out, ctx, key, armed, .. } = self;
            // One poll function rather than `select!` over `readable()`/`writable()` futures: the
            // socket's readiness wakers live in tokio's registration, so the wait adds nothing to
            // this task's future (which every idle connection pays for; see the size test below).
            let wake = poll_fn(|cx| {
                if wants_read {
                    if let Poll::Ready(r) = stream.poll_read_ready(cx) {
                        return Poll::Ready(Wake::Readable(r));
                    }
                }
                if wants_write {
                    if let Poll::Ready(r) = stream.poll_write_ready(cx) {
                        return Poll::Ready(Wake::Writable(r));
                    }
                }
                if open {
                    if let Poll::Ready(request) = poll_queue(&session.shared, out, cx) {
                        return Poll::Ready(Wake::Queue(request));
                    }
                }
                match poll_timer(ctx, *key, armed, deadline, open, cx) {
                    Poll::Ready(()) => Poll::Ready(Wake::Timer),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            match wake {
                Wake::Readable(r) => {
                    r?;
                    self.on_readable()?;
                }
                Wake::Writable(r) => {
                    r?;
                    self.flush()?;
                }
                Wake::Queue(Some(request)) => self.on_disconnect_request(request),
                Wake::Queue(None) | Wake::Timer => {}
            }
        }
    }

    /// Moves what publishers queued into our queue and acts on a disconnect asked of us (slow, API).
    async fn take_shared(&mut self) {
        let Connection { session, out, .. } = self;
        let was_empty = out.is_empty();
        let request = poll_fn(|cx| Poll::Ready(session.shared.take(out, cx.waker()))).await;
        // Server-side commands (API subscribe/unsubscribe) have no TCP form: dropped.
        let mut commands = Vec::new();
        session.shared.take_commands(&mut commands);
        if was_empty && !self.out.is_empty() && self.write_stalled_since.is_none() {
            self.write_stalled_since = Some(self.ctx.deadlines.now_ms());
        }
        if let Some(request) = request {
            self.on_disconnect_request(request);
        }
    }

    /// A disconnect asked of us by another task: the slow-client rule (its backlog is dropped: a peer
    /// that does not read would never reach what follows it) or the API.
    fn on_disconnect_request(&mut self, request: DisconnectRequest) {
        if request.code == DisconnectCode::SLOW.code {
            let dropped = self.out.drop_backlog();
            metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
            tracing::info!(client = %self.session.shared.id, dropped, "tcp: disconnecting slow client");
        } else {
            tracing::info!(client = %self.session.shared.id, code = request.code, "tcp: disconnect requested");
        }
        self.close(None);
    }

    /// Nothing may be delivered behind our last bytes: the shared queue is closed (idempotent).
    fn close_shared(&self) {
        let dropped = self.session.shared.close();
        if dropped > 0 {
            metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
        }
    }

    fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Open => !self.read_closed && self.out.queued_bytes() <= self.ctx.config.client_queue_max_size / 2,
            Phase::Draining(_) => !self.read_closed,
            Phase::Done => false,
        }
    }

    /// Ends the conversation: `error` (if any) is our last frame, then FIN and draining.
    fn close(&mut self, error: Option<ErrorCode>) {
        if self.phase != Phase::Open {
            return;
        }
        if let Some(code) = error {
            let mut frame = Vec::new();
            emit_error(&mut frame, code);
            self.queue(Bytes::from(frame));
        }
        self.phase = Phase::Draining(self.ctx.deadlines.now_ms());
        self.close_shared();
    }

    fn queue(&mut self, frame: Bytes) {
        self.out.push(frame);
        if self.write_stalled_since.is_none() {
            self.write_stalled_since = Some(self.ctx.deadlines.now_ms());
        }
    }

    fn on_readable(&mut self) -> io::Result<()> {
        for _ in 0..READS_PER_PASS {
            if !self.wants_read() {
                break;
            }
            self.decoder.settle(&mut self.buf);
            let (a, b) = self.buf.writable();
            let mut iov = [io::IoSliceMut::new(a), io::IoSliceMut::new(b)];
            // The same read as a WebSocket connection's ([`Stream`]): `recv` as a raw system call, and a
            // read that took all the socket had clears its readiness and ends the reading.
            let ReadOutcome { len: n, drained } = match Stream::try_read_vectored(&mut self.stream, &mut iov) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.read_closed = true;
                if self.phase == Phase::Open {
                    self.phase = Phase::Done;
                    self.close_shared();
                }
                break;
            }
            self.ctx.bytes_in.increment(n as u64);
            self.buf.commit(n);
            self.last_read = self.ctx.deadlines.now_ms();
            if self.phase == Phase::Open {
                self.process();
                self.write_replies()?;
            } else {
                let len = self.buf.len();
                self.buf.consume(len);
            }
            if drained {
                break;
            }
        }
        self.decoder.settle(&mut self.buf);
        self.buf.release();
        Ok(())
    }

    /// Decodes every whole frame buffered and appends each answer to the reply batch, in order.
    fn process(&mut self) {
        let max_queue = self.ctx.config.client_queue_max_size;
        let Connection { decoder, buf, session, replies, ping, rtt, out, .. } = self;
        let mut fatal = None;
        let mut slow = false;
        // One clock read per pass, and only with a command rate configured.
        let now_us = session.rate_limited().then(crate::session::now_us);
        loop {
            let frame = match decoder.next(buf) {
                Ok(None) => break,
                Ok(Some(frame)) => frame,
                Err(e) => {
                    metrics::counter!(TCP_ERRORS_TOTAL, "reason" => e.label()).increment(1);
                    tracing::info!(code = e.code().0, error = %e, "tcp: closing connection: framing error");
                    fatal = Some(e.code());
                    break;
                }
            };
            match frame.command(Role::Server) {
                Ok(Command::Pong(body)) => {
                    if let Some(p) = (*ping).filter(|p| p.body[..] == *body) {
                        let sample = p.sent.elapsed();
                        rtt.record(sample);
                        metrics::histogram!(TCP_PING_RTT_SECONDS).record(sample.as_secs_f64());
                        *ping = None;
                    }
                }
                Ok(cmd) => match session.admit(&cmd, now_us) {
                    Admit::Run => {
                        if let Err(refusal) = session.handle(cmd, replies) {
                            metrics::counter!(TCP_ERRORS_TOTAL, "reason" => "refused").increment(1);
                            emit_error(replies, refusal.code());
                        }
                    }
                    Admit::Refuse => emit_error(replies, ErrorCode::RATE_LIMITED),
                    Admit::Flood => {
                        fatal = Some(ErrorCode::RATE_LIMITED);
                        break;
                    }
                },
                Err(e) => {
                    metrics::counter!(TCP_ERRORS_TOTAL, "reason" => e.label()).increment(1);
                    emit_error(replies, e.code());
                }
            }
            if replies.len() + out.queued_bytes() + session.shared.queued_bytes() > max_queue {
                // Replies count against the same limit as pushes: a client asking for more than it reads
                // is a slow client, not unbounded heap.
                slow = true;
                break;
            }
        }
        if slow {
            replies.clear();
            let dropped = out.drop_backlog();
            metrics::counter!(crate::metrics::QUEUE_DROPS_TOTAL).increment(dropped as u64);
            metrics::counter!(crate::metrics::SLOW_DISCONNECTS_TOTAL).increment(1);
            tracing::info!(client = %session.shared.id, "tcp: disconnecting slow client (replies)");
            self.close(None);
        } else if let Some(code) = fatal {
            self.write_replies_later();
            self.close(Some(code));
        }
    }

    /// Moves the reply batch behind the queue (used before a close, which queues its own frame).
    fn write_replies_later(&mut self) {
        if !self.replies.is_empty() {
            let frame = Bytes::copy_from_slice(&self.replies);
            self.replies.clear();
            self.queue(frame);
        }
    }

    /// Writes the reply batch right away when nothing is queued ahead of it; queues what the kernel
    /// refuses.
    fn write_replies(&mut self) -> io::Result<()> {
        let mut written = 0;
        if self.out.is_empty() {
            while written < self.replies.len() {
                match Stream::try_write(&mut self.stream, &self.replies[written..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        written += n;
                        self.ctx.bytes_out.increment(n as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        if written < self.replies.len() {
            let rest = Bytes::copy_from_slice(&self.replies[written..]);
            self.queue(rest);
        }
        self.replies.clear();
        if self.replies.capacity() > REPLIES_KEEP {
            self.replies = Vec::new();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let before = self.out.queued_bytes();
        let done = self.out.flush(&mut self.stream);
        self.ctx.bytes_out.increment((before - self.out.queued_bytes()) as u64);
        if done? {
            self.write_stalled_since = None;
        } else if self.out.queued_bytes() < before || self.write_stalled_since.is_none() {
            // Progress resets the stall clock: a slow reader is fine, a stuck one is not.
            self.write_stalled_since = Some(self.ctx.deadlines.now_ms());
        }
        Ok(())
    }

    fn pong_timeout(&self) -> Duration {
        let cfg = &self.ctx.config;
        self.rtt.pong_timeout(cfg.tcp_pong_timeout_min, cfg.tcp_pong_timeout_max)
    }

    /// The earliest deadline that applies now (deadline-table milliseconds).
    fn next_deadline(&self, now: u32) -> u32 {
        let cfg = &self.ctx.config;
        let mut d = now.wrapping_add(ms(Duration::from_secs(86_400)));
        // Only a stall with bytes waiting is a deadline (`on_timer` acts on nothing else): a stale
        // one would be a deadline forever passed, a timer always ready.
        if let Some(t) = self.write_stalled_since.filter(|_| !self.out.is_empty()) {
            d = earlier(d, t.wrapping_add(ms(cfg.write_timeout)));
        }
        match self.phase {
            Phase::Draining(since) => d = earlier(d, since.wrapping_add(ms(cfg.close_timeout))),
            Phase::Done => {}
            Phase::Open => {
                if !cfg.idle_timeout.is_zero() {
                    d = earlier(d, self.last_read.wrapping_add(ms(cfg.idle_timeout)));
                }
                match self.ping {
                    Some(p) => d = earlier(d, p.due),
                    None if !cfg.tcp_ping_interval.is_zero() => {
                        d = earlier(d, self.last_read.wrapping_add(ms(cfg.tcp_ping_interval)));
                    }
                    None => {}
                }
                if let Some(secs) = self.session.expires_in() {
                    d = earlier(d, now.wrapping_add((secs.clamp(0, 86_400) as u32) * 1000));
                }
            }
        }
        d
    }

    /// Acts on every deadline that has passed. Returns true to drop the connection now.
    fn on_timer(&mut self, now: u32) -> io::Result<bool> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
        if let Some(t) = self.write_stalled_since {
            if !self.out.is_empty() && reached(now, t.wrapping_add(ms(cfg.write_timeout))) {
                metrics::counter!(TCP_TIMEOUTS_TOTAL, "kind" => "write").increment(1);
                tracing::info!("tcp: closing connection: write timeout");
                return Ok(true);
            }
        }
        match self.phase {
            Phase::Draining(since) => {
                if reached(now, since.wrapping_add(ms(cfg.close_timeout))) {
                    return Ok(true);
                }
            }
            Phase::Done => {}
            Phase::Open => {
                if self.session.expires_in().is_some_and(|s| s <= 0) {
                    metrics::counter!(TCP_TIMEOUTS_TOTAL, "kind" => "expired").increment(1);
                    self.close(Some(ErrorCode::UNAUTHORIZED));
                } else if self.ping.is_some_and(|p| reached(now, p.due)) {
                    metrics::counter!(TCP_TIMEOUTS_TOTAL, "kind" => "pong").increment(1);
                    tracing::info!(client = %self.session.shared.id, "tcp: closing connection: ping timeout");
                    self.close(Some(ErrorCode::PING_TIMEOUT));
                } else if !cfg.idle_timeout.is_zero() && reached(now, self.last_read.wrapping_add(ms(cfg.idle_timeout)))
                {
                    metrics::counter!(TCP_TIMEOUTS_TOTAL, "kind" => "idle").increment(1);
                    tracing::debug!("tcp: closing connection: idle timeout");
                    self.close(None);
                } else if self.ping.is_none()
                    && !cfg.tcp_ping_interval.is_zero()
                    && reached(now, self.last_read.wrapping_add(ms(cfg.tcp_ping_interval)))
                {
                    self.send_ping(now)?;
                }
            }
        }
        Ok(false)
    }

    /// Sends a PING whose body is the ping's sequence number; the PONG must carry the same 8 bytes.
    fn send_ping(&mut self, now: u32) -> io::Result<()> {
        // The client has been silent a ping interval: its command bucket, if any, is full again.
        if self.session.rate_limited() {
            self.session.drop_full_bucket(crate::session::now_us());
        }
        self.pings_sent += 1;
        let body = self.pings_sent.to_be_bytes();
        const _: () = assert!(8 <= MAX_PING_BODY);
        emit(&mut self.replies, Command::Ping(&body));
        let due = now.wrapping_add(ms(self.pong_timeout()));
        self.ping = Some(Ping { body, sent: Instant::now(), due });
        self.write_replies()
    }
}

/// Ready when publishers queued frames for us (moved into `out` if it was empty) or asked us to
/// disconnect (returned).
fn poll_queue(
    shared: &ClientShared,
    out: &mut Outbound,
    cx: &mut std::task::Context<'_>,
) -> Poll<Option<DisconnectRequest>> {
    let had = out.queued_bytes();
    let request = shared.take(out, cx.waker());
    if request.is_some() || out.queued_bytes() != had {
        Poll::Ready(request)
    } else {
        Poll::Pending
    }
}

/// Ready when `deadline` passes or, for an `open` connection, shutdown begins. The table entry is armed
/// lazily, as the WebSocket connection does: only when the new deadline is earlier than the armed one,
/// or that one fired.
///
/// Shutdown wakes only an open connection: one that is already closing has acted on it, and a timer
/// that stayed ready would turn its wait into a busy loop inside one poll (it held a worker thread
/// until `close_timeout`, starving every task queued behind it).
fn poll_timer(
    ctx: &Context,
    key: Key,
    armed: &mut Option<u32>,
    deadline: u32,
    open: bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<()> {
    let now = ctx.deadlines.now_ms();
    if (open && ctx.deadlines.is_shutdown()) || reached(now, deadline) {
        return Poll::Ready(());
    }
    let arm = match *armed {
        None => true,
        Some(at) => reached(now, at) || !reached(deadline, at),
    };
    if arm {
        ctx.deadlines.arm(key, deadline, cx.waker());
        *armed = Some(deadline);
    }
    Poll::Pending
}
#[cfg(test)]
mod tests {
    /// The task's future is what every idle TCP connection pays for, in tokio's task cell (its 104 B of
    /// header and trailer plus the future, rounded up to a multiple of 128: `repr(align(128))`).
    /// BENCHMARKS.md has the RSS this adds up to.
    #[tokio::test]
    async fn connection_future_stays_small() {
        let (config, settings) =
            crate::Config::load(None, |_| None, &[("listen".into(), "127.0.0.1:0".into())]).expect("config");
        let ctx = std::sync::Arc::new(crate::app::context::Context::new(config, settings).expect("context"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let conn = super::Connection::new(stream, ctx, 0);
        let state = std::mem::size_of_val(&conn);
        let session = std::mem::size_of::<super::TcpSession>();
        let future = conn.run();
        let size = std::mem::size_of_val(&future);
        println!("tcp Connection: {state} B (TcpSession {session} B); its task's future: {size} B");
        // 576 B: the connection (456) and the `serve` loop's borrow and wait; with the cell's 104 B that
        // is a 768-B task. An `async fn run` held the connection twice (1,032 B, a 1,152-B task).
        assert!(size + 104 <= 768, "the TCP connection future grew to {size} B (task cell over 768 B)");
    }
}
