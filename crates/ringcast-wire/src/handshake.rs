//! The opening handshake (RFC 6455 §4), server side and client side, without IO.
//!
//! [`parse_request`] looks at the bytes received so far: `Ok(None)` while the request head is incomplete,
//! and a [`Request`] that borrows from those bytes once it is whole. Headers are parsed by httparse into a
//! fixed array on the stack: nothing is allocated per header. Each way a request can be wrong maps to the
//! HTTP status the server answers with ([`HandshakeError::status`]).
//!
//! Extensions: [`parse_request_with`] also negotiates permessage-deflate from every
//! `Sec-WebSocket-Extensions` line (see [`crate::deflate`]); the outcome travels in [`Request::deflate`]
//! and [`write_response`] answers it, as it does the subprotocol. An offer we cannot accept only means
//! no extension, never a failed handshake.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

use crate::deflate::{self, DeflateConfig, DeflateParams};

/// The GUID every Sec-WebSocket-Accept is derived with (RFC 6455 §1.3).
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most headers a request may carry before it is refused (431).
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
    #[error("unsupported Sec-WebSocket-Version")]
    UnsupportedVersion,
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
    #[error("request head too large")]
    HeadTooLarge,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("no such endpoint")]
    NotFound,
}

impl HandshakeError {
    /// The HTTP status to answer with.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::Malformed(_) | HandshakeError::NotUpgrade(_) | HandshakeError::BadKey => 400,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::HeadTooLarge => 431,
            HandshakeError::OriginNotAllowed => 403,
            HandshakeError::NotFound => 404,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::MethodNotAllowed => "method",
            HandshakeError::NotUpgrade(_) => "not_upgrade",
            HandshakeError::UnsupportedVersion => "version",
            HandshakeError::BadKey => "key",
            HandshakeError::HeadTooLarge => "head_too_large",
            HandshakeError::OriginNotAllowed => "origin",
            HandshakeError::NotFound => "not_found",
        }
    }

    /// A complete HTTP response for this error (426 carries the version we speak).
    pub fn response(self) -> &'static [u8] {
        match self.status() {
            400 => b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            403 => b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            404 => b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            405 => b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            426 => b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nUpgrade: websocket\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            _ => b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        }
    }
}

/// A WebSocket upgrade request, borrowing from the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request target's path, without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: Option<&'a [u8]>,
    pub origin: Option<&'a [u8]>,
    /// The client's Sec-WebSocket-Key, validated (24 base64 characters encoding 16 bytes).
    pub key: &'a [u8],
    /// The subprotocol chosen from the server's list, in the client's order of preference.
    pub protocol: Option<&'static str>,
    /// permessage-deflate, when negotiated: the parameters in force (answered by [`write_response`]).
    pub deflate: Option<DeflateParams>,
    /// Length of the request head, including the blank line: bytes after it are WebSocket frames.
    pub head_len: usize,
}

/// Case-insensitive membership of `token` in a comma-separated header value.
fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses an upgrade request from `buf`. `Ok(None)`: the head is not complete yet (and is still within
/// `max_head`). `supported_protocols` is the server's list of subprotocols. No extension is negotiated
/// (see [`parse_request_with`]).
pub fn parse_request<'a>(
    buf: &'a [u8],
    max_head: usize,
    supported_protocols: &[&'static str],
) -> Result<Option<Request<'a>>, HandshakeError> {
    parse_request_with(buf, max_head, supported_protocols, &DeflateConfig::default())
}

/// [`parse_request`], also negotiating permessage-deflate under `deflate` (off unless `deflate.enabled`).
pub fn parse_request_with<'a>(
    buf: &'a [u8],
    max_head: usize,
    supported_protocols: &[&'static str],
    deflate: &DeflateConfig,
) -> Result<Option<Request<'a>>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head {
                return Err(HandshakeError::HeadTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::HeadTooLarge),
        Err(_) => return Err(HandshakeError::Malformed("unparsable request head")),
    };
    if head_len > max_head {
        return Err(HandshakeError::HeadTooLarge);
    }
    if req.method != Some("GET") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::Malformed("HTTP/1.1 required"));
    }
    let target = req.path.ok_or(HandshakeError::Malformed("no request target"))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };

    let (mut upgrade, mut connection, mut version, mut key, mut host, mut origin) =
        (false, false, None, None, None, None);
    let mut protocol: Option<(usize, &'static str)> = None;
    let mut offered_index = 0usize;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(HandshakeError::BadKey);
            }
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for offered in h.value.split(|&b| b == b',') {
                let offered = offered.trim_ascii();
                if offered.is_empty() {
                    continue;
                }
                if protocol.is_none() {
                    if let Some(p) = supported_protocols.iter().find(|p| p.as_bytes() == offered) {
                        protocol = Some((offered_index, p));
                    }
                }
                offered_index += 1;
            }
        }
    }
    if !upgrade {
        return Err(HandshakeError::NotUpgrade("missing Upgrade: websocket"));
    }
    if !connection {
        return Err(HandshakeError::NotUpgrade("missing Connection: upgrade"));
    }
    if version.map(|v| v.trim_ascii()) != Some(b"13".as_slice()) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = key.map(|k| k.trim_ascii()).ok_or(HandshakeError::BadKey)?;
    let mut decoded = [0u8; 18];
    match BASE64.decode_slice(key, &mut decoded) {
        Ok(16) if key.len() == 24 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    // Every Sec-WebSocket-Extensions line, in order: the headers are still on the stack.
    let extensions =
        req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions")).map(|h| h.value);
    let deflate = deflate::negotiate(extensions, deflate);
    Ok(Some(Request { path, query, host, origin, key, protocol: protocol.map(|(_, p)| p), deflate, head_len }))
}

/// Sec-WebSocket-Accept for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; 28];
    // 20 bytes of digest always encode to exactly 28 base64 characters.
    let n = BASE64.encode_slice(digest, &mut out).unwrap_or(0);
    debug_assert_eq!(n, 28);
    out
}

/// Appends the 101 response for `req` to `out`.
pub fn write_response(req: &Request<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&accept_key(req.key));
    if let Some(p) = req.protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    if let Some(d) = &req.deflate {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        d.write_header_value(out);
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Whether `origin` is allowed. `allowed` entries are full origins (`https://example.com`) or `*`.
/// With an empty list, requests without an Origin header (non-browser clients) and same-origin requests
/// (the Origin's host equals the Host header) are allowed: a browser page from another site cannot open
/// a socket that carries its user's cookies, unless the operator lists that site.
pub fn origin_allowed(origin: Option<&[u8]>, host: Option<&[u8]>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.iter().any(|a| a == "*" || a.as_bytes().eq_ignore_ascii_case(origin)) {
        return true;
    }
    if !allowed.is_empty() {
        return false;
    }
    // Same-origin: compare the origin's authority with the Host header.
    let authority = origin.splitn(2, |&b| b == b':').nth(1).and_then(|rest| rest.strip_prefix(b"//"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim_ascii()))
}

/// Client side: writes an upgrade request (used by the load generator and tests).
pub fn write_client_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str, protocols: &[&str]) {
    write_client_request_with(out, host, path, key, protocols, None);
}

/// [`write_client_request`] with a `Sec-WebSocket-Extensions` offer, e.g.
/// `Some("permessage-deflate; client_max_window_bits")` (what browsers send).
pub fn write_client_request_with(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    key: &str,
    protocols: &[&str],
    extensions: Option<&str>,
) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(key.as_bytes());
    if !protocols.is_empty() {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(protocols.join(", ").as_bytes());
    }
    if let Some(e) = extensions {
        out.extend_from_slice(b"\r\nSec-WebSocket-Extensions: ");
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    #[error("malformed response")]
    Malformed,
    #[error("server answered HTTP {0}")]
    Status(u16),
    #[error("wrong Sec-WebSocket-Accept")]
    BadAccept,
    #[error("malformed Sec-WebSocket-Extensions in the response")]
    BadExtension,
}

/// A server's accepted upgrade, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response<'a> {
    /// Length of the response head: bytes after it are WebSocket frames.
    pub head_len: usize,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<&'a [u8]>,
    /// permessage-deflate, when the server accepted it: the parameters in force (enable them on the
    /// client's reader with [`Reader::enable_deflate`](crate::reader::Reader::enable_deflate)).
    pub deflate: Option<DeflateParams>,
}

/// Client side: checks a server's response head. `Ok(None)` while incomplete.
pub fn parse_response<'a>(buf: &'a [u8], key: &[u8]) -> Result<Option<Response<'a>>, ClientHandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ClientHandshakeError::Malformed),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(ClientHandshakeError::Status(code));
    }
    let expected = accept_key(key);
    let mut ok = false;
    let mut protocol = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
            ok = h.value.trim_ascii() == expected;
        } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocol = Some(h.value.trim_ascii());
        }
    }
    if !ok {
        return Err(ClientHandshakeError::BadAccept);
    }
    let extensions =
        resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions")).map(|h| h.value);
    let deflate = DeflateParams::from_response(extensions).map_err(|_| ClientHandshakeError::BadExtension)?;
    Ok(Some(Response { head_len: n, protocol, deflate }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str) -> String {
        format!("GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(&accept_key(KEY.as_bytes()), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn valid_request_parses_and_answers_101() {
        let r = req("");
        let parsed = parse_request(r.as_bytes(), 8192, &[]).unwrap().unwrap();
        assert_eq!(parsed.path, "/chat");
        assert_eq!(parsed.query, Some("x=1"));
        assert_eq!(parsed.head_len, r.len());
        let mut out = Vec::new();
        write_response(&parsed, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn header_tokens_are_case_insensitive_lists() {
        let r = "GET / HTTP/1.1\r\nHost: h\r\nupgrade: WebSocket\r\nconnection: keep-alive, UPGRADE\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";
        assert!(parse_request(r.as_bytes(), 8192, &[]).unwrap().is_some());
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        let r = req("");
        for cut in 0..r.len() {
            assert_eq!(parse_request(&r.as_bytes()[..cut], 8192, &[]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn wrong_version_answers_426_with_our_version() {
        let r = req("").replace("Version: 13", "Version: 8");
        let e = parse_request(r.as_bytes(), 8192, &[]).unwrap_err();
        assert_eq!(e.status(), 426);
        assert!(String::from_utf8_lossy(e.response()).contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn bad_keys_answer_400() {
        for bad in ["", "abc", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ=!", "dGhlIHNhbXBsZSBub25jZSEhIQ=="] {
            let r = req("").replace(KEY, bad);
            assert_eq!(parse_request(r.as_bytes(), 8192, &[]).unwrap_err().status(), 400, "key {bad:?}");
        }
        let r = req("").replace("Sec-WebSocket-Key", "X-Other");
        assert_eq!(parse_request(r.as_bytes(), 8192, &[]).unwrap_err(), HandshakeError::BadKey);
    }

    #[test]
    fn missing_upgrade_or_connection_answers_400() {
        let r = req("").replace("Upgrade: websocket\r\n", "");
        assert_eq!(parse_request(r.as_bytes(), 8192, &[]).unwrap_err().status(), 400);
        let r = req("").replace("Connection: Upgrade", "Connection: keep-alive");
        assert_eq!(parse_request(r.as_bytes(), 8192, &[]).unwrap_err().status(), 400);
    }

    #[test]
    fn non_get_answers_405_and_garbage_400() {
        let r = req("").replacen("GET", "POST", 1);
        assert_eq!(parse_request(r.as_bytes(), 8192, &[]).unwrap_err().status(), 405);
        assert_eq!(parse_request(b"\x00\x01garbage\r\n\r\n", 8192, &[]).unwrap_err().status(), 400);
    }

    #[test]
    fn oversized_head_answers_431() {
        let big = format!("X-Pad: {}\r\n", "a".repeat(9000));
        assert_eq!(parse_request(req(&big).as_bytes(), 8192, &[]).unwrap_err().status(), 431);
        // Even before the head is complete.
        let partial = format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(9000));
        assert_eq!(parse_request(partial.as_bytes(), 8192, &[]).unwrap_err().status(), 431);
    }

    #[test]
    fn subprotocol_follows_the_clients_preference() {
        let supported = ["centrifuge-json", "centrifuge-protobuf"];
        let r = req("Sec-WebSocket-Protocol: chat, centrifuge-protobuf\r\nSec-WebSocket-Protocol: centrifuge-json\r\n");
        assert_eq!(
            parse_request(r.as_bytes(), 8192, &supported).unwrap().unwrap().protocol,
            Some("centrifuge-protobuf")
        );
        let r = req("Sec-WebSocket-Protocol: other\r\n");
        assert_eq!(parse_request(r.as_bytes(), 8192, &supported).unwrap().unwrap().protocol, None);
    }

    #[test]
    fn permessage_deflate_is_negotiated_and_answered() {
        let on = DeflateConfig::enabled();
        // Offers over two header lines; the first one is malformed and declined.
        let r = req("Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=20\r\nSec-WebSocket-Extensions: x-other, permessage-deflate; client_max_window_bits\r\n");
        let parsed = parse_request_with(r.as_bytes(), 8192, &[], &on).unwrap().unwrap();
        let params = parsed.deflate.expect("negotiated");
        assert!(params.server_no_context_takeover() && params.client_no_context_takeover());
        let mut out = Vec::new();
        write_response(&parsed, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
            "{text}"
        );
        // Disabled (and through the old entry point): no extension, and no header in the answer.
        for parsed in [
            parse_request(r.as_bytes(), 8192, &[]).unwrap().unwrap(),
            parse_request_with(r.as_bytes(), 8192, &[], &DeflateConfig::default()).unwrap().unwrap(),
        ] {
            assert_eq!(parsed.deflate, None);
            let mut out = Vec::new();
            write_response(&parsed, &mut out);
            assert!(!String::from_utf8(out).unwrap().contains("Extensions"));
        }
        // Nothing acceptable: the handshake still succeeds, without the extension.
        let r = req("Sec-WebSocket-Extensions: permessage-deflate; bogus\r\n");
        assert_eq!(parse_request_with(r.as_bytes(), 8192, &[], &on).unwrap().unwrap().deflate, None);
    }

    #[test]
    fn client_offers_deflate_and_reads_the_answer() {
        let mut request = Vec::new();
        write_client_request_with(&mut request, "h", "/", KEY, &[], Some("permessage-deflate; client_max_window_bits"));
        let parsed = parse_request_with(&request, 8192, &[], &DeflateConfig::enabled()).unwrap().unwrap();
        let mut response = Vec::new();
        write_response(&parsed, &mut response);
        let resp = parse_response(&response, KEY.as_bytes()).unwrap().unwrap();
        assert_eq!(resp.deflate, parsed.deflate);
        assert!(resp.deflate.is_some());
        let bad =
            String::from_utf8(response).unwrap().replace("server_no_context_takeover", "server_no_context_takeover=1");
        assert_eq!(parse_response(bad.as_bytes(), KEY.as_bytes()), Err(ClientHandshakeError::BadExtension));
    }

    #[test]
    fn origin_policy() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(origin_allowed(None, Some(b"x"), &[]));
        assert!(origin_allowed(Some(b"https://app.example"), Some(b"api.example"), &allowed));
        assert!(!origin_allowed(Some(b"https://evil.example"), Some(b"api.example"), &allowed));
        assert!(origin_allowed(Some(b"http://localhost:8000"), Some(b"localhost:8000"), &[]));
        assert!(!origin_allowed(Some(b"http://evil.example"), Some(b"localhost:8000"), &[]));
        assert!(origin_allowed(Some(b"http://evil.example"), Some(b"localhost:8000"), &["*".to_string()]));
    }

    #[test]
    fn client_checks_the_accept_key() {
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(
            parse_response(resp, KEY.as_bytes()).unwrap(),
            Some(Response { head_len: resp.len(), protocol: None, deflate: None })
        );
        assert_eq!(parse_response(resp, b"AAAAAAAAAAAAAAAAAAAAAA==").unwrap_err(), ClientHandshakeError::BadAccept);
    }
}
