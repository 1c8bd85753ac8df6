//! Routing and the upgrade: reads the HTTP request head, picks the endpoint by path (the echo endpoint,
//! the client protocol, or the HTTP server for everything that is not a WebSocket upgrade), checks the
//! Origin, and answers 101 — or an HTTP error, then drains.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use ringcast_protocol::{Format, PROTOBUF_SUBPROTOCOL};
use ringcast_wire::buffer::fill_from;
use ringcast_wire::handshake::{self, HandshakeError};
use ringcast_wire::{DeflateConfig, DeflateParams, Deflater};

use super::client::ClientState;
use super::{ms, stamp, Conn, Endpoint, Phase, Stage, SCRATCH, SCRATCH_KEEP};
use crate::app::admission::{IpKey, Refusal, Transport};
use crate::pubsub::client::{ClientId, ClientShared};
use crate::session::Session;
use crate::transport::stream::Stream;
use crate::transport::{DeflateFraming, Encoding, Framing};

thread_local! {
    /// Upgrade requests are read here first (see `Conn::read_handshake`). Per worker thread.
    static HEAD_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The path of the client protocol endpoint (what the Centrifugo SDKs connect to).
pub const CLIENT_PATH: &str = "/connection/websocket";

/// Subprotocols we speak on the client endpoint; JSON is the default without one.
const CLIENT_PROTOCOLS: &[&str] = &[PROTOBUF_SUBPROTOCOL, "centrifuge-json"];

impl<S: Stream> Conn<S> {
    /// The head bytes kept from earlier reads, if any.
    fn take_head(&mut self) -> Option<Vec<u8>> {
        match self.stage.take().map(|b| *b) {
            Some(Stage::Head(h)) => Some(h),
            other => {
                self.stage = other.map(Box::new);
                None
            }
        }
    }

    /// One read of the upgrade request; answers it once complete.
    ///
    /// The request is read into a per-thread buffer; only a head that arrives in pieces (or goes to the
    /// HTTP server) is copied into a buffer of the connection's own. So a connection storm costs no
    /// per-connection head buffer, which the allocator would otherwise keep around as resident memory.
    pub(super) fn read_handshake(&mut self) -> io::Result<Option<usize>> {
        let max = self.ctx.config.max_request_head;
        let own = self.take_head();
        let from_scratch = own.is_none();
        let mut buf = match own {
            Some(b) => b,
            None => HEAD_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut())),
        };
        // Room for one byte past the limit, so "too large" is detected rather than read forever.
        buf.reserve((max + 1).saturating_sub(buf.len()));
        let outcome = match self.stream.try_read_buf(&mut buf) {
            Ok(0) => Ok(Some(0)),
            Ok(n) => {
                self.ctx.bytes_in.increment(n as u64);
                self.on_head(&buf, n, max)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(Some(usize::MAX)),
                _ => Err(e),
            },
        };
        // Keep the bytes with the connection only while they are still needed.
        let keep = matches!(self.phase, Phase::Handshake | Phase::Http) && !buf.is_empty();
        if from_scratch {
            if keep {
                self.stage = Some(Box::new(Stage::Head(buf.clone())));
            }
            buf.clear();
            if buf.capacity() <= SCRATCH_KEEP {
                HEAD_SCRATCH.with(|s| *s.borrow_mut() = buf);
            }
        } else if keep {
            self.stage = Some(Box::new(Stage::Head(buf)));
        }
        outcome
    }

    /// Acts on the head bytes received so far (`n` of them just now).
    pub(super) fn on_head(&mut self, head: &[u8], n: usize, max: usize) -> io::Result<Option<usize>> {
        let deflate = self.deflate_config(head);
        let parsed = handshake::parse_request_with(head, max, CLIENT_PROTOCOLS, &deflate);
        let (endpoint, head_len) = match parsed {
            Ok(None) => return Ok(Some(n)),
            // Not a WebSocket upgrade: for our WebSocket paths that is a bad handshake (400/405); any
            // other path is the HTTP API's business (/api/..., /health, /metrics; it answers 404 itself).
            Err(e @ (HandshakeError::NotUpgrade(_) | HandshakeError::MethodNotAllowed)) => {
                let path = request_path(head);
                let ws_path =
                    path == Some(CLIENT_PATH) || (self.ctx.settings.echo && path == Some(&*self.ctx.config.echo_path));
                if ws_path {
                    self.reject(e);
                } else {
                    self.phase = Phase::Http;
                }
                return Ok(Some(n));
            }
            Err(e) => {
                self.reject(e);
                return Ok(Some(n));
            }
            Ok(Some(req)) => {
                // The admin dashboard's feed is the HTTP server's (it answers the upgrade itself), when
                // the dashboard is served on this listener.
                if req.path == crate::admin::WS_PATH
                    && self.ctx.admin.is_some()
                    && self.ctx.settings.internal_listen.is_none()
                {
                    self.phase = Phase::Http;
                    return Ok(Some(n));
                }
                let endpoint = if self.ctx.settings.echo && req.path == self.ctx.config.echo_path {
                    Endpoint::Echo
                } else if req.path == CLIENT_PATH {
                    Endpoint::Client
                } else {
                    self.reject(HandshakeError::NotFound);
                    return Ok(Some(n));
                };
                if !handshake::origin_allowed(req.origin, req.host, &self.ctx.node.policy().allowed_origins) {
                    self.reject(HandshakeError::OriginNotAllowed);
                    return Ok(Some(n));
                }
                // Admission last: only a request we would upgrade is counted (or spends a token).
                let ip = IpKey::of(self.stream.peer_addr()?.ip());
                if let Err(refusal) = self.ctx.admission.admit(Transport::WebSocket, ip, self.ctx.deadlines.now_ms()) {
                    self.refuse(refusal);
                    return Ok(Some(n));
                }
                self.admitted = Some(ip);
                if endpoint == Endpoint::Client {
                    let format =
                        if req.protocol == Some(PROTOBUF_SUBPROTOCOL) { Format::Protobuf } else { Format::Json };
                    let encoding = push_encoding(format, req.deflate.as_ref(), &deflate);
                    let shared = ClientShared::new(ClientId::random(), encoding, self.ctx.config.client_queue_max_size);
                    if self.ctx.config.fanout_direct_write {
                        // Plain TCP only (TLS: `None`); withdrawn in `Conn`'s drop, before the socket closes.
                        if let Some(fd) = self.stream.raw_fd() {
                            shared.publish_fd(fd);
                        }
                    }
                    let ping = self.ctx.config.ping_interval.as_secs() as u32;
                    let stale = self.ctx.config.client_stale_close_delay;
                    let now = self.ctx.deadlines.now_ms();
                    self.client = Some(Box::new(ClientState {
                        session: Session::new(self.ctx.node.clone(), shared, ping),
                        ping_at: (!stale.is_zero()).then(|| stamp(now.wrapping_add(ms(stale)))),
                        pong_due: None,
                    }));
                }
                if let Some(params) = &req.deflate {
                    self.reader.enable_deflate(params);
                    let deflater = Deflater::new(params, &deflate);
                    // Without server context takeover the deflater holds no state: its window bits are
                    // all a connection keeps (`Deflater::shared` makes it again per message); no box.
                    match deflater.shared_window() {
                        Some(bits) => self.deflate_window = bits,
                        None if deflater.compresses(usize::MAX) => {
                            self.stage = Some(Box::new(Stage::Deflate(deflater)));
                        }
                        // A window of 8 bits: everything goes uncompressed, nothing to keep.
                        None => {}
                    }
                    metrics::counter!("ringcast_ws_deflate_connections_total").increment(1);
                }
                // The 101 goes out through the reply batch: written straight away, copied only if the
                // kernel does not take it all.
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    scratch.clear();
                    handshake::write_response(&req, &mut scratch);
                    self.write_batch(&scratch)
                })?;
                (endpoint, req.head_len)
            }
        };
        self.endpoint = endpoint;
        self.phase = Phase::Open;
        self.last_read = self.ctx.deadlines.now_ms();
        metrics::counter!("ringcast_ws_connections_total").increment(1);
        metrics::gauge!("ringcast_ws_connections").increment(1.0);
        // Frames the client sent right behind its upgrade request.
        let mut rest = &head[head_len.min(head.len())..];
        while !rest.is_empty() && self.phase == Phase::Open {
            self.reader.settle(&mut self.buf);
            let filled = fill_from(&mut self.buf, rest);
            rest = &rest[filled..];
            self.process_and_reply()?;
        }
        Ok(Some(n))
    }

    /// The permessage-deflate settings this request is negotiated under: the configured ones, except
    /// that the client protocol never gets server context takeover. Its publications are compressed
    /// once and shared by every subscriber (`Framing::WebSocketDeflate`), which only a connection whose
    /// compressor forgets everything between messages can receive; a per-connection compressor would
    /// also cost ~370 KiB and a compression per delivery. The echo endpoint gets what is configured.
    fn deflate_config(&self, head: &[u8]) -> DeflateConfig {
        let mut config = self.ctx.settings.deflate;
        if config.enabled && config.server_context_takeover && request_path(head) == Some(CLIENT_PATH) {
            config.server_context_takeover = false;
        }
        config
    }

    /// Gives the socket (plain or TLS), and the bytes read so far, to the HTTP server (a task of its own).
    pub(super) fn hand_off_to_http(&mut self) {
        let head = self.take_head().unwrap_or_default();
        match self.stream.take_for_http() {
            Ok(stream) => {
                metrics::counter!("ringcast_http_connections_total").increment(1);
                let deadlines = self.ctx.deadlines.clone();
                tokio::spawn(crate::api::http::serve_with(
                    stream,
                    head,
                    self.ctx.router.clone(),
                    crate::api::http::ServeOptions::default(),
                    async move { deadlines.wait_shutdown().await },
                ));
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to the HTTP server"),
        }
    }

    /// Answers an upgrade request admission refused (429/503 with Retry-After), then drains.
    pub(super) fn refuse(&mut self, refusal: Refusal) {
        self.stage = None;
        self.out.push(refusal.response());
        self.phase = Phase::Draining;
        self.closing_since = Some(stamp(self.ctx.deadlines.now_ms()));
    }

    /// Answers a bad upgrade request with its HTTP status, then drains.
    pub(super) fn reject(&mut self, e: HandshakeError) {
        metrics::counter!("ringcast_handshake_failures_total", "reason" => e.label()).increment(1);
        tracing::info!(status = e.status(), error = %e, "handshake rejected");
        self.stage = None;
        self.out.push(Bytes::from_static(e.response()));
        self.phase = Phase::Draining;
        self.closing_since = Some(stamp(self.ctx.deadlines.now_ms()));
    }
}

/// What a client's publications are framed as: compressed once and shared when it negotiated
/// permessage-deflate without server context takeover and with the configured window (a frame made
/// with a larger window than the client allows could refer past it); uncompressed otherwise, which the
/// extension allows for any message. Its replies are compressed by its own [`Deflater`] either way.
fn push_encoding(format: Format, params: Option<&DeflateParams>, config: &DeflateConfig) -> Encoding {
    let window_bits = config.server_max_window_bits.clamp(9, 15);
    match params {
        Some(p) if p.server_no_context_takeover() && p.server_max_window_bits() >= window_bits => Encoding {
            format,
            framing: Framing::WebSocketDeflate(DeflateFraming {
                level: config.level.min(9) as u8,
                window_bits,
                min_size: u16::try_from(config.min_size).unwrap_or(u16::MAX),
            }),
        },
        _ => Encoding::websocket(format),
    }
}

/// The path (without query) of a complete HTTP request head.
pub(super) fn request_path(head: &[u8]) -> Option<&str> {
    let mut headers = [httparse::EMPTY_HEADER; handshake::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    req.path.map(|p| p.split_once('?').map_or(p, |(p, _)| p))
}
