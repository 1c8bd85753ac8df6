//! A client of ringcast's raw TCP binary protocol (docs/tcp-protocol.md), over tokio.
//!
//! Why here and not in ringcast-server: it is the client side of a codec that lives in ringcast-wire,
//! exactly as this crate's WebSocket client is, and its first user is the load generator; putting it in
//! the server crate would make every device or backend that wants a client depend on the whole server
//! (axum, the broker, the policy). It needs only ringcast-wire and tokio.
//!
//! The protocol answers commands in order and may push MESSAGEs between the replies, so a call waits
//! for its reply and keeps the pushes that came first, in order, for [`TcpClient::next_message`]. A
//! server PING is answered at once with a PONG carrying the same bytes, whatever the client is waiting
//! for — so a client that is reading never times out.
//!
//! A load generator's connections use the non-waiting half instead: [`TcpClient::queue`] and
//! [`TcpClient::flush`] write without waiting, and [`TcpClient::receive_now`] hands every frame the
//! socket has to a callback as an [`Event`] borrowed from the read buffer — no allocation or copy per
//! message, so the generator's CPU (it shares the machine with the server) stays low.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use ringcast_wire::buffer::{fill_from, GrowableBuffer, ReadBuffer};
use ringcast_wire::tcp::{Command, Decoder, ErrorCode, TcpError, DEFAULT_MAX_BODY};
use ringcast_wire::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A publication pushed to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub channel: String,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum TcpClientError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The server's bytes broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] TcpError),
    /// The server answered ERROR with this code.
    #[error("server error {} ({})", .0 .0, .0.message())]
    Refused(ErrorCode),
    /// The server's admission turned the connection away before CONNECT (ERROR 12, or 9 for the connect
    /// rate, as the first frame, then a close): the server is up and protecting itself.
    #[error("server turned the connection away: ERROR {} ({}){}", .code.0, .code.message(), match .retry_after { Some(s) => format!(", retry after {s} s"), None => String::new() })]
    Turned { code: ErrorCode, retry_after: Option<u64> },
    #[error("the server closed the connection")]
    Closed,
    #[error("unexpected reply {0:?}")]
    Unexpected(String),
}

/// One frame received by [`TcpClient::receive_now`], borrowed from the read buffer (or the mark of a
/// read).
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Bytes were just read from the socket; the frames that follow come (at least partly) from them.
    /// A caller that stamps frames with a receive time takes a new one here: one `receive_now` may read
    /// several times, and a frame of a later read can have been sent after an earlier read.
    Read,
    /// A publication pushed to this client.
    Message { channel: &'a str, offset: u64, data: &'a [u8] },
    /// The reply to a PUBLISH sent without waiting.
    Published(u64),
    /// An ERROR from the server (for a command sent without waiting, or before a close).
    Refused(ErrorCode),
    /// Any other reply (answers to commands sent without waiting).
    Other,
}

/// One reply, owned.
#[derive(Debug)]
enum Reply {
    Connected(String),
    Subscribed,
    Unsubscribed,
    Published(u64),
    Pong(Vec<u8>),
}

/// A connection speaking the TCP binary protocol.
pub struct TcpClient {
    stream: TcpStream,
    buf: GrowableBuffer,
    decoder: Decoder,
    /// Read from the socket, not yet moved into `buf`.
    pending: Vec<u8>,
    /// Pushes received while waiting for a reply.
    messages: VecDeque<Message>,
    client_id: String,
    /// Frames queued by [`Self::queue`] (and PONGs of [`Self::receive_now`]) not yet written.
    unsent: Vec<u8>,
    /// Bytes read from the socket so far (the wire cost of what was received).
    received: u64,
    /// The wait the last ERROR's message asked for (`…: retry after N s`), if it did.
    retry_after: Option<u64>,
}

impl TcpClient {
    /// Opens a connection and sends CONNECT with `token` (empty: anonymous, if the server allows it).
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<TcpClient, TcpClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::over(stream, token).await
    }

    /// Speaks the protocol over an already connected stream (a bound source address, say).
    pub async fn over(stream: TcpStream, token: &str) -> Result<TcpClient, TcpClientError> {
        let max = DEFAULT_MAX_BODY as usize + 64;
        let mut c = TcpClient {
            stream,
            buf: GrowableBuffer::new(4096, max),
            decoder: Decoder::new(DEFAULT_MAX_BODY + 64),
            pending: Vec::new(),
            messages: VecDeque::new(),
            client_id: String::new(),
            unsent: Vec::new(),
            received: 0,
            retry_after: None,
        };
        match c.call(Command::Connect { token }).await {
            Ok(Reply::Connected(id)) => c.client_id = id,
            Ok(other) => return Err(TcpClientError::Unexpected(format!("{other:?}"))),
            // Admission answers before CONNECT is read: 12, or 9 with a wait (a 9 for CONNECT over the
            // command rate has none and leaves the connection open).
            Err(TcpClientError::Refused(code))
                if code == ErrorCode::UNAVAILABLE || (code == ErrorCode::RATE_LIMITED && c.retry_after.is_some()) =>
            {
                return Err(TcpClientError::Turned { code, retry_after: c.retry_after });
            }
            Err(e) => return Err(e),
        }
        Ok(c)
    }

    /// The client id the server assigned.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub async fn subscribe(&mut self, channel: &str) -> Result<(), TcpClientError> {
        match self.call(Command::Subscribe { channel }).await? {
            Reply::Subscribed => Ok(()),
            other => Err(TcpClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> Result<(), TcpClientError> {
        match self.call(Command::Unsubscribe { channel }).await? {
            Reply::Unsubscribed => Ok(()),
            other => Err(TcpClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Publishes and returns the publication's offset (0 when the channel keeps no history).
    pub async fn publish(&mut self, channel: &str, data: &[u8]) -> Result<u64, TcpClientError> {
        match self.call(Command::Publish { channel, data }).await? {
            Reply::Published(offset) => Ok(offset),
            other => Err(TcpClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends PING with `body` (≤ 125 bytes) and waits for its PONG.
    pub async fn ping(&mut self, body: &[u8]) -> Result<(), TcpClientError> {
        match self.call(Command::Ping(body)).await? {
            Reply::Pong(b) if b == body => Ok(()),
            other => Err(TcpClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends PUBLISH without waiting for PUBLISHED (a load generator's publisher). The reply is
    /// consumed by a later call, or discarded by [`Self::next_message`].
    pub async fn publish_nowait(&mut self, channel: &str, data: &[u8]) -> Result<(), TcpClientError> {
        self.send(Command::Publish { channel, data }).await
    }

    /// The next publication pushed to this client (ones received during calls first).
    pub async fn next_message(&mut self) -> Result<Message, TcpClientError> {
        loop {
            if let Some(m) = self.messages.pop_front() {
                return Ok(m);
            }
            // Replies to un-awaited publishes are dropped here; errors are reported.
            self.read_one().await?;
        }
    }

    /// Bytes read from the socket since the connection was made.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }

    /// The socket, to wait for readiness on (the non-waiting half).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Appends a command to the unsent frames; [`Self::flush`] writes them.
    pub fn queue(&mut self, cmd: Command<'_>) -> Result<(), TcpClientError> {
        cmd.encode(&mut self.unsent).map_err(|e| TcpClientError::Unexpected(e.to_string()))
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// Writes what the socket takes now of the queued frames; the rest stays queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.unsent.len() {
            match self.stream.try_write(&self.unsent[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.unsent.drain(..written);
        Ok(())
    }

    /// Decodes every frame already received and everything the socket has now, without waiting, and
    /// hands each to `on` (server PINGs are answered, and not passed on). Returns `Ok(false)` once the
    /// server has closed the connection. Pushes left from waiting calls are dropped.
    pub fn receive_now(&mut self, mut on: impl FnMut(Event<'_>)) -> Result<bool, TcpClientError> {
        self.messages.clear();
        let mut open = true;
        loop {
            if !self.pending.is_empty() {
                let n = fill_from(&mut self.buf, &self.pending);
                self.pending.drain(..n);
            }
            let TcpClient { buf, decoder, unsent, .. } = self;
            while let Some(frame) = decoder.next(buf)? {
                match frame.command(Role::Client)? {
                    Command::Message { channel, offset, data } => on(Event::Message { channel, offset, data }),
                    Command::Published { offset } => on(Event::Published(offset)),
                    Command::Error { code, .. } => on(Event::Refused(code)),
                    Command::Ping(body) => {
                        Command::Pong(body).encode(unsent).map_err(|e| TcpClientError::Unexpected(e.to_string()))?
                    }
                    _ => on(Event::Other),
                }
            }
            if !self.pending.is_empty() {
                continue;
            }
            if !open {
                break;
            }
            self.decoder.settle(&mut self.buf);
            let (a, b) = self.buf.writable();
            let mut iov = [io::IoSliceMut::new(a), io::IoSliceMut::new(b)];
            match self.stream.try_read_vectored(&mut iov) {
                Ok(0) => open = false,
                Ok(n) => {
                    self.received += n as u64;
                    self.buf.commit(n);
                    on(Event::Read);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !self.unsent.is_empty() && open {
            self.flush()?;
        }
        Ok(open)
    }

    async fn send(&mut self, cmd: Command<'_>) -> Result<(), TcpClientError> {
        let mut frame = Vec::with_capacity(cmd.encoded_len());
        cmd.encode(&mut frame).map_err(|e| TcpClientError::Unexpected(e.to_string()))?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    async fn call(&mut self, cmd: Command<'_>) -> Result<Reply, TcpClientError> {
        self.send(cmd).await?;
        loop {
            if let Some(reply) = self.read_one().await? {
                return Ok(reply);
            }
        }
    }

    /// Reads until one frame is decoded: a reply is returned, a push queued, a ping answered (`None`).
    async fn read_one(&mut self) -> Result<Option<Reply>, TcpClientError> {
        loop {
            let n = fill_from(&mut self.buf, &self.pending);
            self.pending.drain(..n);
            let mut pong = None;
            let decoded = match self.decoder.next(&mut self.buf)? {
                None => None,
                Some(frame) => Some(match frame.command(Role::Client)? {
                    Command::Connected { client } => Some(Reply::Connected(client.to_string())),
                    Command::Subscribed { .. } => Some(Reply::Subscribed),
                    Command::Unsubscribed { .. } => Some(Reply::Unsubscribed),
                    Command::Published { offset } => Some(Reply::Published(offset)),
                    Command::Pong(b) => Some(Reply::Pong(b.to_vec())),
                    Command::Ping(b) => {
                        pong = Some(b.to_vec());
                        None
                    }
                    Command::Message { channel, offset, data } => {
                        self.messages.push_back(Message { channel: channel.to_string(), offset, data: data.to_vec() });
                        None
                    }
                    Command::Error { code, message } => {
                        self.retry_after = retry_after(message);
                        return Err(TcpClientError::Refused(code));
                    }
                    other => return Err(TcpClientError::Unexpected(format!("{other:?}"))),
                }),
            };
            if let Some(body) = pong {
                self.send(Command::Pong(&body)).await?;
            }
            if let Some(frame) = decoded {
                return Ok(frame);
            }
            if !self.pending.is_empty() {
                // The buffer had no whole frame yet but bytes are waiting: move them in first.
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(TcpClientError::Closed);
            }
            self.received += n as u64;
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The seconds in an ERROR message of the form `…: retry after N s` (the server's admission refusals).
fn retry_after(message: &str) -> Option<u64> {
    message.rsplit_once("retry after ")?.1.strip_suffix(" s")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::retry_after;

    #[test]
    fn the_wait_is_read_from_an_admission_refusal_message() {
        assert_eq!(retry_after("connect_rate: retry after 3 s"), Some(3));
        assert_eq!(retry_after("max_connections: retry after 1 s"), Some(1));
        assert_eq!(retry_after("rate limited"), None);
        assert_eq!(retry_after("retry after soon s"), None);
    }
}
