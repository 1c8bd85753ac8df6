//! One client WebSocket connection over tokio, driven by ringcast-wire's sans-IO codec.
//!
//! [`open`] does TCP connect (optionally bound to a chosen local address) and the HTTP upgrade, and
//! times both. The resulting [`Conn`] is split the way its users need it: [`Rx`] (the socket's read
//! buffer and the frame reader) and [`Tx`] (bytes waiting to be written, and the connection's mask key),
//! so that a handler can queue replies while it still borrows a received payload.
//!
//! # Why it reads and writes like this
//! * Reads go straight into the read buffer with `try_read_vectored` after `readable()`, and messages are
//!   handed to the handler *in place* (a slice of the buffer): nothing is allocated per message.
//! * Writes are queued into one reused `Vec` and written with one `try_write` per batch; only bytes the
//!   kernel refuses stay queued, and the caller waits for `writable()` only while something is queued.
//! * Client frames must be masked (RFC 6455 §5.3). The key is random per connection and fixed for its
//!   life, which lets callers pre-encode whole frames once and patch only the bytes that change.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ringcast_wire::buffer::{fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer};
use ringcast_wire::close::encode_close_payload;
use ringcast_wire::frame::encode_client_frame;
use ringcast_wire::handshake::{parse_response, write_client_request_with, ClientHandshakeError};
use ringcast_wire::{CloseCode, Event, Limits, OpCode, Reader, Role, WireError};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

pub use crate::stream::Stream;

use crate::clock::now_ns;
use crate::failure::{classify, Failure};

/// Where connections go.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The Host header.
    pub host: String,
    /// Request target: path and query.
    pub path: String,
    /// Offer permessage-deflate (RFC 7692) as browsers do; when the server accepts, what it sends
    /// compressed is inflated by the reader, so handlers see the same messages either way.
    pub deflate: bool,
    /// `wss://`: the TLS client (the HTTP API is then reached over https on the same address).
    pub tls: Option<crate::stream::TlsClient>,
}

/// The offer browsers send (no parameters the server must honour beyond letting it cap our window).
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Which read buffer a connection uses. Busy connections keep their own; idle ones borrow from a pool
/// only while they hold unparsed bytes (so 10,000 idle connections cost the generator no buffers).
#[derive(Debug, Clone)]
pub enum Buffers {
    Own,
    Pool(std::sync::Arc<BufferPool>),
}

impl Buffers {
    pub fn pool() -> Buffers {
        Buffers::Pool(BufferPool::new(16 * 1024, 64))
    }

    fn make(&self) -> AnyBuffer {
        match self {
            Buffers::Own => AnyBuffer::Growable(GrowableBuffer::new(8 * 1024, 1 << 20)),
            Buffers::Pool(p) => AnyBuffer::Pool(PooledBuffer::new(p.clone())),
        }
    }
}

/// What we accept from servers: generous, since this is a measuring tool, not a gatekeeper.
const LIMITS: Limits = Limits { max_frame_payload: 256 << 20, max_message_size: 256 << 20 };

/// The longest upgrade response head we wait for.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A connection that completed its upgrade, and how long that took.
pub struct Opened {
    pub conn: Conn,
    /// TCP connect time.
    pub tcp_ns: u64,
    /// TCP connect + upgrade.
    pub handshake_ns: u64,
}

/// Connects and upgrades, bounded by `timeout`.
pub async fn open(
    ep: &Endpoint,
    source: Option<IpAddr>,
    buffers: &Buffers,
    timeout: Duration,
) -> Result<Opened, Failure> {
    let start = now_ns();
    match tokio::time::timeout(timeout, open_inner(ep, source, buffers, start)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout),
    }
}

/// A TCP connection to `addr`, from `source` when given. Also used for the Centrifugo HTTP API.
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, Failure> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        bind_address_no_port(&socket);
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(classify(&e)),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // A non-blocking connect completes (or fails) when the socket becomes writable.
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(classify(&e));
    }
    Ok(stream)
}

/// Lets the kernel pick the local port at connect time rather than at bind time, so ports are unique
/// per 4-tuple instead of per source address: without it, binding caps a source address at ~28k
/// connections in all, whatever the destinations.
fn bind_address_no_port(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the fd is open (owned by `socket`), and the option value is a valid c_int of the given size.
    // Failure (an old kernel, IPv6) only means ports are allocated at bind time.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A TCP connection, then the TLS handshake when `tls` is given.
pub async fn connect_stream(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&crate::stream::TlsClient>,
) -> Result<Stream, Failure> {
    let tcp = tcp_connect(addr, source).await?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => tls.handshake(tcp).await.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => Failure::Protocol(format!("TLS: {e}")),
            _ => classify(&e),
        }),
    }
}

async fn open_inner(ep: &Endpoint, source: Option<IpAddr>, buffers: &Buffers, start: u64) -> Result<Opened, Failure> {
    let tcp = tcp_connect(ep.addr, source).await?;
    let tcp_ns = now_ns().saturating_sub(start);
    let stream = match &ep.tls {
        None => Stream::Plain(tcp),
        Some(tls) => tls.handshake(tcp).await.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => Failure::Protocol(format!("TLS: {e}")),
            _ => classify(&e),
        })?,
    };

    let key = BASE64.encode(fastrand::u128(..).to_ne_bytes());
    let mut request = Vec::with_capacity(256);
    write_client_request_with(&mut request, &ep.host, &ep.path, &key, &[], ep.deflate.then_some(DEFLATE_OFFER));
    write_all(&stream, &request).await?;

    let mut head: Vec<u8> = Vec::with_capacity(1024);
    let (head_len, deflate) = loop {
        stream.readable().await?;
        if head.len() == head.capacity() {
            head.reserve(head.capacity());
        }
        let start = head.len();
        head.resize(head.capacity(), 0);
        match stream.try_read(&mut head[start..]) {
            Ok(0) => return Err(Failure::Closed("server closed the connection during the upgrade".into())),
            Ok(n) => head.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                head.truncate(start);
                continue;
            }
            Err(e) => return Err(classify(&e)),
        }
        match parse_response(&head, key.as_bytes()) {
            Ok(Some(resp)) => break (resp.head_len, resp.deflate),
            Ok(None) if head.len() > MAX_RESPONSE_HEAD => {
                return Err(Failure::Protocol("upgrade response head larger than 16 KiB".into()))
            }
            Ok(None) => continue,
            Err(ClientHandshakeError::Status(code)) => return Err(crate::failure::upgrade_status(code, &head)),
            Err(e) => return Err(Failure::Protocol(format!("upgrade: {e}"))),
        }
    };
    let handshake_ns = now_ns().saturating_sub(start);
    let mut conn = Conn::new(stream, buffers.make());
    if let Some(params) = &deflate {
        // We never compress what we send (the extension allows that); we inflate what the server does.
        conn.rx.reader.enable_deflate(params);
        conn.rx.deflate = true;
    }
    // Frames the server sent right behind its 101 are parsed before anything read from the socket.
    // (Usually there are none; then the head's buffer is freed rather than kept for the connection's life.)
    if head.len() > head_len {
        head.drain(..head_len);
        conn.rx.backlog = head;
    }
    Ok(Opened { conn, tcp_ns, handshake_ns })
}

/// Writes all of `data`, waiting for the socket as needed (handshake and shutdown only).
pub async fn write_all(stream: &Stream, mut data: &[u8]) -> io::Result<()> {
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

/// The receive side: read buffer and frame reader.
pub struct Rx {
    reader: Reader,
    buf: AnyBuffer,
    /// Bytes that arrived with the upgrade response, not yet fed to the buffer.
    backlog: Vec<u8>,
    backlog_pos: usize,
    /// Copy of a message that a ring buffer split in two (never happens with our buffers, kept for
    /// correctness with any `ReadBuffer`).
    scratch: Vec<u8>,
    /// Bytes read from the socket (and the upgrade's leftovers): what the wire carried to us.
    wire_bytes: u64,
    /// permessage-deflate was negotiated.
    deflate: bool,
}

impl Rx {
    /// Bytes received since the upgrade: frames as they were on the wire (compressed, if they were).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Whether the server accepted our permessage-deflate offer.
    pub fn deflate(&self) -> bool {
        self.deflate
    }
}

/// What one read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Bytes arrived; `more`: the buffer was filled, so the socket may hold more.
    Data { more: bool },
    /// Nothing to read right now.
    Empty,
    /// The peer closed its side (TCP FIN).
    Eof,
}

/// How processing the buffered bytes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Every complete message was handled; more bytes are needed.
    Open,
    /// The server sent a close frame (already answered in `Tx`).
    Closed(CloseCode),
}

/// The send side: bytes waiting for the socket, and the mask key.
pub struct Tx {
    out: Vec<u8>,
    written: usize,
    key: [u8; 4],
    /// A close frame is queued: nothing may follow it (RFC 6455 §5.5.1).
    close_sent: bool,
}

/// Capacity the write queue keeps between bursts; a larger one is given back once drained.
const OUT_KEEP: usize = 256 * 1024;

impl Tx {
    pub fn key(&self) -> [u8; 4] {
        self.key
    }

    /// Queues a masked frame.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        encode_client_frame(&mut self.out, true, opcode, payload, self.key);
    }

    /// Queues bytes that are already a masked frame (or HTTP).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub fn close_frame(&mut self, code: CloseCode) {
        if std::mem::replace(&mut self.close_sent, true) {
            return;
        }
        let mut body = [0u8; 125];
        let n = if code == CloseCode::NO_STATUS { 0 } else { encode_close_payload(code, "", &mut body) };
        self.frame(OpCode::Close, &body[..n]);
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len() - self.written
    }

    /// Writes as much as the socket takes without waiting.
    pub fn flush(&mut self, stream: &Stream) -> io::Result<()> {
        while self.written < self.out.len() {
            match stream.try_write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        if self.out.capacity() > OUT_KEEP {
            self.out = Vec::new();
        }
        Ok(())
    }
}

/// An upgraded client connection.
pub struct Conn {
    pub stream: Stream,
    pub rx: Rx,
    pub tx: Tx,
}

impl Conn {
    fn new(stream: Stream, buf: AnyBuffer) -> Conn {
        Conn {
            stream,
            rx: Rx {
                reader: Reader::new(Role::Client, LIMITS),
                buf,
                backlog: Vec::new(),
                backlog_pos: 0,
                scratch: Vec::new(),
                wire_bytes: 0,
                deflate: false,
            },
            tx: Tx { out: Vec::new(), written: 0, key: fastrand::u32(..).to_ne_bytes(), close_sent: false },
        }
    }

    /// One non-blocking read into the buffer (the upgrade's leftover bytes first).
    pub fn read_once(&mut self) -> io::Result<Read> {
        let rx = &mut self.rx;
        rx.reader.settle(&mut rx.buf);
        if rx.backlog_pos < rx.backlog.len() {
            let n = fill_from(&mut rx.buf, &rx.backlog[rx.backlog_pos..]);
            rx.backlog_pos += n;
            rx.wire_bytes += n as u64;
            if rx.backlog_pos == rx.backlog.len() {
                rx.backlog = Vec::new();
                rx.backlog_pos = 0;
            }
            return Ok(Read::Data { more: true });
        }
        let (a, b) = rx.buf.writable();
        let space = a.len() + b.len();
        // One region (always, for our buffers): a plain read; two (a wrapped ring): a vectored one.
        let read = if b.is_empty() {
            self.stream.try_read(a)
        } else {
            self.stream.try_read_vectored(&mut [IoSliceMut::new(a), IoSliceMut::new(b)])
        };
        match read {
            Ok(0) => Ok(Read::Eof),
            Ok(n) => {
                rx.buf.commit(n);
                rx.wire_bytes += n as u64;
                Ok(Read::Data { more: n == space })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Empty),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Read::Data { more: true }),
            Err(e) => Err(e),
        }
    }

    /// Parses every complete message in the buffer. Data messages go to the handler (with the send side,
    /// to queue replies); pings are answered with pongs; a close frame is answered and ends processing.
    pub fn process<H: Handler + ?Sized>(&mut self, handler: &mut H) -> Result<Processed, WireError> {
        let Conn { rx, tx, .. } = self;
        let Rx { reader, buf, scratch, .. } = rx;
        loop {
            match reader.next(buf)? {
                None => return Ok(Processed::Open),
                Some(Event::Message { opcode, payload }) => match payload.contiguous() {
                    Some(bytes) => handler.message(opcode, bytes, tx),
                    None => {
                        scratch.clear();
                        payload.copy_to(scratch);
                        handler.message(opcode, scratch, tx);
                    }
                },
                Some(Event::Ping(p)) => {
                    // Control payloads are at most 125 bytes.
                    let mut body = [0u8; 125];
                    let n = p.len().min(125);
                    let (a, b) = (p.first, p.second);
                    let na = a.len().min(n);
                    body[..na].copy_from_slice(&a[..na]);
                    body[na..n].copy_from_slice(&b[..n - na]);
                    tx.frame(OpCode::Pong, &body[..n]);
                }
                Some(Event::Pong(_)) => {}
                Some(Event::Close { code, .. }) => {
                    tx.close_frame(code);
                    return Ok(Processed::Closed(code));
                }
            }
        }
    }

    /// Gives back the pooled read buffer if it is empty (call when going idle).
    pub fn release(&mut self) {
        self.rx.reader.settle(&mut self.rx.buf);
        self.rx.buf.release();
    }

    /// Reads and handles everything available now, then writes queued replies. `Ok(None)` while open.
    /// The handler's `begin`/`end` bracket the messages of each read, never a syscall.
    pub fn receive<H: Handler + ?Sized>(&mut self, handler: &mut H) -> Result<Option<Ended>, Failure> {
        loop {
            let more = match self.read_once()? {
                Read::Data { more } => more,
                Read::Empty => break,
                Read::Eof => return Ok(Some(Ended::Eof)),
            };
            handler.begin();
            let processed = self.process(handler);
            handler.end();
            match processed {
                Ok(Processed::Open) => {}
                Ok(Processed::Closed(code)) => {
                    let _ = self.tx.flush(&self.stream);
                    return Ok(Some(Ended::CloseFrame(code)));
                }
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
            if !more {
                break;
            }
        }
        self.tx.flush(&self.stream)?;
        Ok(None)
    }

    /// Ends the connection politely: a close frame, then (briefly) the server's close and FIN.
    pub async fn close(mut self, wait: Duration) {
        self.tx.close_frame(CloseCode::NORMAL);
        let _ = tokio::time::timeout(wait, async {
            if self.tx.flush(&self.stream).is_err() {
                return;
            }
            while self.tx.pending() > 0 {
                if self.stream.writable().await.is_err() || self.tx.flush(&self.stream).is_err() {
                    return;
                }
            }
            loop {
                if self.stream.readable().await.is_err() {
                    return;
                }
                match self.receive(&mut Discard) {
                    Ok(None) => continue,
                    _ => return,
                }
            }
        })
        .await;
    }
}

/// What a connection does with the data messages it receives.
pub trait Handler {
    /// Bytes arrived; the messages they complete follow.
    fn begin(&mut self) {}
    fn message(&mut self, opcode: OpCode, payload: &[u8], tx: &mut Tx);
    /// The messages of this read are done.
    fn end(&mut self) {}
}

impl<F: FnMut(OpCode, &[u8], &mut Tx)> Handler for F {
    fn message(&mut self, opcode: OpCode, payload: &[u8], tx: &mut Tx) {
        self(opcode, payload, tx)
    }
}

/// Ignores data messages (pings are still answered).
pub struct Discard;

impl Handler for Discard {
    fn message(&mut self, _: OpCode, _: &[u8], _: &mut Tx) {}
}

/// How the server ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Eof,
    CloseFrame(CloseCode),
}

impl Ended {
    pub fn failure(self) -> Failure {
        match self {
            Ended::Eof => Failure::Closed("server closed the TCP connection".into()),
            Ended::CloseFrame(code) => Failure::Closed(format!("server sent close {}", code.0)),
        }
    }
}
