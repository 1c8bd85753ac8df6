//! Plain HTTP on the WebSocket listener: the server API, `/health` and `/metrics` share the port clients
//! connect to, as in Centrifugo — unless `internal_listen` is set: then they are served there (sockets go
//! straight to [`serve_with`], nothing read ahead), and the public port answers only `/health`.
//!
//! The connection code reads a request head with its own parser (cheap, allocation-free, and tuned for
//! upgrade storms). When the head is not a WebSocket upgrade for a WebSocket path, it hands the socket here
//! with the bytes it has already consumed; [`serve`] replays those bytes ahead of the socket ([`Rewind`]) and
//! runs hyper's HTTP/1.1 server over the result, with the axum [`Router`] as the service. From then on the
//! connection is hyper's: keep-alive, pipelining, chunked bodies, `Expect: 100-continue`.
//!
//! # What it guards against
//! * A client that opens a connection and trickles (or never finishes) a request head: closed after
//!   [`ServeOptions::header_read_timeout`], which hyper also applies to the wait for the next request on a
//!   kept-alive connection.
//! * A client that sends a head and then trickles the body: the whole request (body read and handler) is
//!   bounded by [`ServeOptions::request_timeout`] and answered 408.
//!
//! Bodies are capped by the router (axum's 2 MiB default), heads by hyper (its ~400 KiB buffer limit).
//! HTTP/2 is not served: API clients speak HTTP/1.1, and the upgrade path is HTTP/1.1 by definition.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::ServiceExt;

/// Limits of one plain-HTTP connection.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long a request head may take to arrive, counted from the first byte the server waits for (also
    /// the idle limit between requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// How long one request may take from its head being read to its response being ready (body included).
    pub request_timeout: Duration,
    /// Serve more than one request per connection.
    pub keep_alive: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            keep_alive: true,
        }
    }
}

/// Serves `stream` as an HTTP/1.1 connection with `router`, reading `already_read` (the bytes the upgrade
/// parser consumed) before anything from the socket. Resolves when the connection is done; errors are
/// counted and logged, never returned. Meant to be spawned.
pub fn serve(stream: TcpStream, already_read: Vec<u8>, router: Router) -> impl Future<Output = ()> + Send + 'static {
    serve_with(stream, already_read, router, ServeOptions::default(), std::future::pending())
}

/// [`serve`] with explicit limits, and a `shutdown` signal: when it resolves, a request whose head has
/// arrived is finished and answered, then the connection is closed; a connection that is idle, or still
/// sending a request head, is closed at once (hyper's graceful shutdown).
pub fn serve_with<S, IO>(
    stream: IO,
    already_read: Vec<u8>,
    router: Router,
    options: ServeOptions,
    shutdown: S,
) -> impl Future<Output = ()> + Send + 'static
where
    S: Future<Output = ()> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A named `async fn` behind an explicit signature: the `Send + 'static` promise is checked here, not at
    // the caller's `spawn`.
    run(stream, already_read, router, options, shutdown)
}

async fn run<S: Future<Output = ()>, IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    stream: IO,
    already_read: Vec<u8>,
    router: Router,
    options: ServeOptions,
    shutdown: S,
) {
    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TOTAL).increment(1);
    let request_timeout = options.request_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        async move {
            let response = match tokio::time::timeout(request_timeout, router.oneshot(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => request_timed_out(),
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(Rewind::new(already_read, stream));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).keep_alive(options.keep_alive);
    // Upgrades: the admin dashboard's WebSocket feed (`admin::WS_PATH`) is answered 101 by its handler.
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = &mut shutdown, if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_parse() || e.is_parse_too_large() {
            "parse"
        } else if e.is_incomplete_message() {
            "incomplete"
        } else {
            "io"
        };
        metrics::counter!(crate::metrics::HTTP_ERRORS_TOTAL, "kind" => kind).increment(1);
        tracing::debug!(error = %e, kind, "HTTP connection ended with an error");
    }
}

fn request_timed_out() -> Response {
    metrics::counter!(crate::metrics::HTTP_ERRORS_TOTAL, "kind" => "request_timeout").increment(1);
    (StatusCode::REQUEST_TIMEOUT, [(axum::http::header::CONNECTION, "close")], "Request Timeout\n").into_response()
}

/// A stream that yields `prefix` before reading from `inner`; writes go straight to `inner`.
///
/// The prefix is dropped (its memory freed) as soon as it has been read out.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Vec<u8>,
    /// How much of `prefix` has been read.
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Rewind { prefix, pos: 0, inner }
    }

    /// The prefix bytes not read yet, and the inner stream.
    pub fn into_parts(self) -> (Vec<u8>, T) {
        let Rewind { mut prefix, pos, inner } = self;
        prefix.drain(..pos);
        (prefix, inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const WHOLE: &[u8] = b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

    async fn read_all_in_chunks<R: AsyncRead + Unpin>(mut r: R, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let n = r.read(&mut buf).await.expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_the_stream_for_every_split() {
        for split in 0..=WHOLE.len() {
            for chunk in [1, 3, 7, 64] {
                let rewind = Rewind::new(WHOLE[..split].to_vec(), &WHOLE[split..]);
                assert_eq!(read_all_in_chunks(rewind, chunk).await, WHOLE, "split {split}, chunk {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn rewind_frees_the_prefix_once_read() {
        let mut rewind = Rewind::new(b"abc".to_vec(), &b"def"[..]);
        let mut buf = [0; 2];
        assert_eq!(rewind.read(&mut buf).await.expect("read"), 2);
        assert_eq!(rewind.prefix.capacity(), 3);
        assert_eq!(rewind.read(&mut buf).await.expect("read"), 1);
        assert_eq!(rewind.prefix.capacity(), 0, "prefix dropped as soon as it is consumed");
        let (rest, inner) = rewind.into_parts();
        assert!(rest.is_empty());
        assert_eq!(inner, b"def");
    }

    #[tokio::test]
    async fn rewind_into_parts_keeps_the_unread_prefix() {
        let mut rewind = Rewind::new(b"abcd".to_vec(), &b""[..]);
        let mut buf = [0; 1];
        assert_eq!(rewind.read(&mut buf).await.expect("read"), 1);
        assert_eq!(rewind.into_parts().0, b"bcd");
    }

    #[tokio::test]
    async fn rewind_writes_go_to_the_inner_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut rewind = Rewind::new(b"ignored for writes".to_vec(), a);
        rewind.write_all(b"HTTP/1.1 200 OK\r\n").await.expect("write");
        rewind.flush().await.expect("flush");
        rewind.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n");
    }
}
