//! The byte stream under a WebSocket connection: a plain TCP socket, or TLS over one.
//!
//! [`crate::ws::Connection`] is generic over [`Stream`], so each kind is its own monomorphisation: the
//! plain path calls tokio's `TcpStream` methods directly, as before (the trait's extra hooks are
//! constant `false`/`Ok(true)` there and compile away), and its future keeps its size. TLS connections
//! are `Connection<TlsStream>`.
//!
//! # Why TLS is driven by hand
//! The connection is readiness-based: it waits with `poll_read_ready`/`poll_write_ready` (state parked
//! in the socket's registration, nothing in the future) and then calls non-blocking `try_*` methods.
//! tokio-rustls's `TlsStream` is `AsyncRead`/`AsyncWrite`, which does not fit that shape, so after
//! tokio-rustls has done the handshake ([`crate::app::tls`]) we drive its rustls session ourselves, sans
//! IO: ciphertext goes in with `read_tls` from the socket's `try_read`, plaintext comes out of
//! `reader()`; plaintext goes in with `writer()` and ciphertext out with `write_tls` (rustls writes its
//! queued records with one `writev`). The `TlsStream` itself is kept (boxed: 8 bytes in the future),
//! so a plain HTTP request on the TLS port (`https://…/api`) can be handed to hyper as it is.
//!
//! # Zero-copy fan-out over TLS
//! A publication is still encoded once and shared as one `Bytes`; each TLS connection encrypts it into
//! its own records. The queue is handed to rustls as an `IoSlice` array (`write_vectored`), which packs
//! several frames into one record where they fit, so a burst costs one seal per 16 KiB, not one per frame.
//!
//! # Ciphertext rustls still holds
//! `writer()` accepts plaintext as long as rustls's buffer has room (64 KiB by default) and encrypts it
//! at once; what the socket does not take stays inside rustls. The connection must not think itself
//! drained while that is so: [`Stream::has_pending_output`] says so, and [`Stream::flush_pending`]
//! writes it when the socket is writable.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

/// What one read gave: `len` bytes (0: the end of the stream), and whether the stream is `drained`, so
/// that reading again before its next readiness would only say `WouldBlock`. The stream decides: plain
/// TCP when the read left room in its buffers (that read also cleared the socket's readiness); never
/// TLS (rustls hands out the plaintext of the records it has, while more ciphertext may wait in the
/// socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOutcome {
    pub len: usize,
    pub drained: bool,
}

/// What a connection needs of its byte stream. Every method is non-blocking.
pub trait Stream: Unpin + Send + 'static {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Reads into `iov`; `WouldBlock` means wait for readiness.
    fn try_read_vectored(&mut self, iov: &mut [IoSliceMut<'_>]) -> io::Result<ReadOutcome>;
    /// Reads into `buf`'s spare capacity (growing its length by what was read).
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Bytes accepted earlier that are still waiting for the socket (TLS records); never for TCP.
    fn has_pending_output(&self) -> bool;
    /// Writes those bytes; `Ok(true)` once none are left.
    fn flush_pending(&mut self) -> io::Result<bool>;
    /// Ends our sending side (TLS: close_notify first), best effort.
    fn shutdown_write(&mut self);
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    /// The socket's descriptor when bytes written to it go to the peer as they are (plain TCP), for
    /// fan-outs that write pushes straight to an idle connection ([`crate::pubsub::client`]); `None`
    /// for TLS, where every byte must go through the connection's rustls session.
    fn raw_fd(&self) -> Option<RawFd>;

    /// The stream as the HTTP server reads it (a request that is not a WebSocket upgrade).
    type Http: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Gives the stream to the HTTP server; this connection then ends without touching it again.
    fn take_for_http(&mut self) -> io::Result<Self::Http>;
}

impl Stream for TcpStream {
    #[inline]
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    #[inline]
    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }
    /// A read that leaves room in `iov` took all the kernel had: it is `drained`, and it also clears the
    /// socket's read readiness, as a `WouldBlock` would, so the caller's next read returns `WouldBlock`
    /// without a syscall and the connection waits for the next edge instead of asking the kernel again.
    #[inline]
    fn try_read_vectored(&mut self, iov: &mut [IoSliceMut<'_>]) -> io::Result<ReadOutcome> {
        let room: usize = iov.iter().map(|b| b.len()).sum();
        let mut short = 0;
        // `try_io` clears the readiness it observed before the call when the closure says `WouldBlock`,
        // and only if no event arrived since (tokio compares the event's tick): bytes that land after
        // the read bring a new edge and a new readiness, which that clear leaves alone.
        let r = self.try_io(tokio::io::Interest::READABLE, || match read_vectored(self, iov)? {
            n if n > 0 && n < room => {
                short = n;
                Err(io::ErrorKind::WouldBlock.into())
            }
            n => Ok(n),
        });
        // `try_io` hands the closure's result back as it was: a short read is that `WouldBlock`.
        if short > 0 {
            Ok(ReadOutcome { len: short, drained: true })
        } else {
            r.map(|len| ReadOutcome { len, drained: false })
        }
    }
    #[inline]
    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
    /// tokio's `try_write` with [`send`] as the system call: same readiness handling, same flags.
    #[inline]
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || send(self, buf))
    }
    #[inline]
    fn try_write_vectored(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, iov)
    }
    #[inline]
    fn has_pending_output(&self) -> bool {
        false
    }
    #[inline]
    fn flush_pending(&mut self) -> io::Result<bool> {
        Ok(true)
    }
    fn shutdown_write(&mut self) {
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::peer_addr(self)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.as_raw_fd())
    }

    type Http = TcpStream;
    /// The socket is duplicated rather than moved out: the connection then ends, closing only its own
    /// descriptor.
    fn take_for_http(&mut self) -> io::Result<TcpStream> {
        use std::os::fd::AsFd;
        self.as_fd()
            .try_clone_to_owned()
            .map(std::net::TcpStream::from)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(TcpStream::from_std)
    }
}

/// One non-blocking read into `iov`, leaving the socket's readiness to the caller's `try_io`. It goes
/// to the socket layer directly (`recv`, or `recvmsg` for two regions), as `send` does for writes:
/// `readv` takes the file layer first (iovec import, permission and notify hooks), which profiles as
/// about a fifth of the read syscall's cost (BENCHMARKS.md, "Echo: reading until a short read").
#[inline]
fn read_vectored(tcp: &TcpStream, iov: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
    match iov {
        [one] => recv(tcp, one),
        [one, two] if two.is_empty() => recv(tcp, one),
        _ => (&*socket2::SockRef::from(tcp)).read_vectored(iov),
    }
}

// The per-message system calls of a plain-TCP connection are made directly (rustix's raw Linux
// backend), not through glibc's `recv`/`send`: those are cancellation points, which in a multi-threaded
// process switch the thread's cancellation state with two atomic updates around every call. Nothing
// here uses thread cancellation. Same calls, same flags, same results as `std`'s (`send` with
// `MSG_NOSIGNAL`, as `std` writes to sockets).

/// `recv(fd, buf, 0)`.
#[inline]
fn recv(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match rustix::net::recv(tcp, buf, rustix::net::RecvFlags::empty()) {
        Ok((n, _)) => Ok(n),
        Err(e) => Err(e.into()),
    }
}

/// `send(fd, buf, MSG_NOSIGNAL)`: a peer that reset the connection yields `EPIPE`, never a SIGPIPE.
#[inline]
fn send(tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    rustix::net::send(tcp, buf, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
}

/// A TLS connection whose handshake is done: tokio-rustls's stream, boxed (the rustls session is over
/// a kilobyte; the future carries only the pointer). `None` once handed to the HTTP server.
pub struct TlsStream(Option<Box<tokio_rustls::server::TlsStream<TcpStream>>>);

/// `io::Read`/`io::Write` over a tokio socket's non-blocking calls, for rustls's `read_tls`/`write_tls`.
struct Io<'a>(&'a TcpStream);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(iov)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn gone() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl TlsStream {
    pub fn new(stream: tokio_rustls::server::TlsStream<TcpStream>) -> TlsStream {
        TlsStream(Some(Box::new(stream)))
    }

    /// The stream for the HTTP server (hyper reads and writes it through tokio-rustls).
    pub fn take(&mut self) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        self.0.take().map(|b| *b)
    }

    /// Writes queued records until none are left (`Ok(true)`) or the socket is full (`Ok(false)`).
    fn write_records(tcp: &TcpStream, tls: &mut tokio_rustls::rustls::ServerConnection) -> io::Result<bool> {
        while tls.wants_write() {
            match tls.write_tls(&mut Io(tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Plaintext into `read`; ciphertext is read from the socket only when none is buffered.
    fn read_with(&mut self, mut read: impl FnMut(&mut dyn Read) -> io::Result<usize>) -> io::Result<usize> {
        let s = self.0.as_deref_mut().ok_or_else(gone)?;
        let (tcp, tls) = s.get_mut();
        loop {
            match read(&mut tls.reader()) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP EOF without close_notify: most clients end that way; it is the end of the stream.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut Io(tcp))? == 0 {
                // EOF from the socket: rustls now reports the end (or the truncation) on the next read.
                tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                continue;
            }
            if let Err(e) = tls.process_new_packets() {
                // rustls queued an alert saying why; send it before the connection ends.
                let _ = Self::write_records(tcp, tls);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // A KeyUpdate or similar produced records of its own.
            Self::write_records(tcp, tls)?;
        }
    }
}

impl Stream for TlsStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(s) = self.0.as_deref_mut() else { return Poll::Ready(Err(gone())) };
        let (tcp, tls) = s.get_mut();
        // Decrypted bytes we have not read yet (a read stopped for fairness or a full buffer) are ready
        // without the socket; so is an error or the peer's close_notify.
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => tcp.poll_read_ready(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.as_deref_mut() {
            Some(s) => s.get_mut().0.poll_write_ready(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn try_read_vectored(&mut self, iov: &mut [IoSliceMut<'_>]) -> io::Result<ReadOutcome> {
        self.read_with(|r| r.read_vectored(iov)).map(|len| ReadOutcome { len, drained: false })
    }

    fn try_read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        // Handshake heads only: zeroing the spare room is cheap next to the TLS handshake before it.
        let start = buf.len();
        if buf.capacity() == start {
            buf.reserve(1024);
        }
        buf.resize(buf.capacity(), 0);
        let r = self.read_with(|r| r.read(&mut buf[start..]));
        buf.truncate(start + *r.as_ref().unwrap_or(&0));
        r
    }

    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }

    fn try_write_vectored(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        let s = self.0.as_deref_mut().ok_or_else(gone)?;
        let (tcp, tls) = s.get_mut();
        // Records queued before go first; while the socket refuses them, nothing new is taken.
        if !Self::write_records(tcp, tls)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = tls.writer().write_vectored(iov)?;
        // Push the new records now; what the socket leaves is `has_pending_output`.
        Self::write_records(tcp, tls)?;
        if n == 0 && iov.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn has_pending_output(&self) -> bool {
        self.0.as_deref().is_some_and(|s| s.get_ref().1.wants_write())
    }

    fn flush_pending(&mut self) -> io::Result<bool> {
        let s = self.0.as_deref_mut().ok_or_else(gone)?;
        let (tcp, tls) = s.get_mut();
        Self::write_records(tcp, tls)
    }

    fn shutdown_write(&mut self) {
        if let Some(s) = self.0.as_deref_mut() {
            let (tcp, tls) = s.get_mut();
            tls.send_close_notify();
            let _ = Self::write_records(tcp, tls);
            let _ = socket2::SockRef::from(&*tcp).shutdown(std::net::Shutdown::Write);
        }
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.as_deref().ok_or_else(gone)?.get_ref().0.peer_addr()
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    type Http = tokio_rustls::server::TlsStream<TcpStream>;
    fn take_for_http(&mut self) -> io::Result<Self::Http> {
        self.take().ok_or_else(gone)
    }
}

/// Writes `frames` (at most [`super::outbound::MAX_IOV`]; more are not looked at) to the socket `fd`
/// with one non-blocking `sendmsg`, as one `writev` would, but with `MSG_NOSIGNAL`: a peer that reset
/// the connection yields `EPIPE`, never a SIGPIPE that would kill the process. Returns the bytes the
/// kernel took (fewer than asked: the rest waits for the connection's task); `WouldBlock` when none.
///
/// The caller guarantees `fd` is a connected TCP socket that stays open during the call (the fan-out's
/// claim on the connection, which the connection's drop waits for: [`crate::pubsub::client`]).
pub fn send_frames(fd: RawFd, frames: &[bytes::Bytes]) -> io::Result<usize> {
    const MAX: usize = super::outbound::MAX_IOV;
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX];
    let n = frames.len().min(MAX);
    for (v, f) in iov.iter_mut().zip(&frames[..n]) {
        *v = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
    }
    // SAFETY: a zeroed `msghdr` is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    loop {
        // SAFETY: `msg` points at `n` iovecs, each over a live `Bytes` the caller holds for the call; the
        // kernel only reads them. `fd` is open (the caller's guarantee); a stale descriptor is at worst
        // EBADF, never memory unsafety.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (server, client)
    }

    /// Polls once: is the socket's read readiness set right now?
    async fn read_ready_now(s: &mut TcpStream) -> bool {
        poll_fn(|cx| Poll::Ready(Stream::poll_read_ready(s, cx).is_ready())).await
    }

    #[tokio::test]
    async fn short_read_clears_readiness_and_the_next_bytes_set_it_again() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"hello").await.expect("write");
        poll_fn(|cx| Stream::poll_read_ready(&mut server, cx)).await.expect("readable");
        let mut buf = [0u8; 64];
        let got = Stream::try_read_vectored(&mut server, &mut [IoSliceMut::new(&mut buf)]).expect("read");
        assert_eq!(&buf[..got.len], b"hello");
        assert!(got.drained, "a read that left room in the buffer did not say it drained the socket");
        // The kernel had no more: waiting now must not wake at once for a read that would block.
        assert!(!read_ready_now(&mut server).await, "a short read left the socket marked readable");
        // Bytes that arrive afterwards bring a new edge, and the connection wakes for them.
        client.write_all(b"world").await.expect("write");
        poll_fn(|cx| Stream::poll_read_ready(&mut server, cx)).await.expect("readable again");
        let got = Stream::try_read_vectored(&mut server, &mut [IoSliceMut::new(&mut buf)]).expect("read");
        assert_eq!(&buf[..got.len], b"world");
    }

    #[tokio::test]
    async fn full_read_keeps_readiness_and_reads_the_rest() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"abcdefgh").await.expect("write");
        poll_fn(|cx| Stream::poll_read_ready(&mut server, cx)).await.expect("readable");
        let (mut a, mut b) = ([0u8; 3], [0u8; 1]);
        let got = Stream::try_read_vectored(&mut server, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .expect("read");
        assert_eq!((got, &a, &b), (ReadOutcome { len: 4, drained: false }, b"abc", b"d"));
        // The buffer filled: more may be there, so the socket stays readable and the rest is read.
        assert!(read_ready_now(&mut server).await, "a full read cleared readiness");
        let mut rest = [0u8; 16];
        let got = Stream::try_read_vectored(&mut server, &mut [IoSliceMut::new(&mut rest)]).expect("read");
        assert_eq!(&rest[..got.len], b"efgh");
        let e = Stream::try_read_vectored(&mut server, &mut [IoSliceMut::new(&mut rest)]);
        assert_eq!(e.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
    }

    /// Polls once: is the socket's write readiness set right now?
    async fn write_ready_now(s: &mut TcpStream) -> bool {
        poll_fn(|cx| Poll::Ready(Stream::poll_write_ready(s, cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_full_socket_keeps_the_rest_queued_and_clears_write_readiness() {
        let (mut server, mut client) = pair().await;
        // Small buffers both ways, so a few dozen KiB fill the connection.
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("sndbuf");
        socket2::SockRef::from(&client).set_recv_buffer_size(4096).expect("rcvbuf");
        let mut out = super::super::outbound::Outbound::new();
        let mut expected = Vec::new();
        let mut full = false;
        // Frames of distinct bytes until the kernel refuses some (bounded: 8 MB at most).
        for i in 0..8192u32 {
            let frame: Vec<u8> = (0..1000u32).map(|j| (i * 7 + j) as u8).collect();
            expected.extend_from_slice(&frame);
            out.push(bytes::Bytes::from(frame));
            if !out.flush(&mut server).expect("flush") {
                full = true;
                break;
            }
        }
        assert!(full, "the socket never filled");
        assert!(out.queued_bytes() > 0);
        // The refused write cleared the readiness: the connection waits for the socket to drain rather
        // than spinning on writes that would block.
        assert!(!write_ready_now(&mut server).await, "a refused write left the socket marked writable");
        let e = Stream::try_write(&mut server, b"x").map_err(|e| e.kind());
        assert_eq!(e, Err(io::ErrorKind::WouldBlock));
        // The peer reads everything; each drain brings writability back and the rest goes out in order.
        let total = expected.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            client.read_exact(&mut got).await.expect("read");
            got
        });
        while !out.flush(&mut server).expect("flush") {
            poll_fn(|cx| Stream::poll_write_ready(&mut server, cx)).await.expect("writable again");
        }
        let got = reader.await.expect("reader");
        assert!(got == expected, "the bytes arrived out of order or cut");
    }
}
