//! The client side of the Centrifugo client protocol v2 (JSON over WebSocket), as much as fan-out needs.
//!
//! * Commands: `{"id":1,"connect":{}}`, `{"id":2,"subscribe":{"channel":"bench"}}`,
//!   `{"id":N,"publish":{"channel":"bench","data":{...}}}`. Replies carry the command's `id` and either
//!   a result or `"error"`.
//! * Publications arrive as `{"push":{"channel":"bench","pub":{"data":<json>}}}`, several per frame
//!   separated by `\n`. An empty object `{}` is the server's ping, answered with `{}`.
//! * With `--api-key`, publishing goes through the HTTP API instead: `POST /api/publish` with
//!   `X-API-Key` and `{"channel":"bench","data":{...}}`.
//!
//! The data is `{"t":<send ns>,"p":<publisher>,"s":<seq>,"x":"<padding to --size>"}`. Servers pass it
//! through verbatim (with `--payload json` the padding is `"x":[...]`, an array of realistic records, see
//! [`write_json_data`]), so subscribers find the three numbers with a byte scan after `"data":` instead of a
//! JSON parse: no allocation per publication. This module does no load logic; scenario::fanout does.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ringcast_wire::OpCode;

use crate::client::{connect_stream, write_all, Conn, Stream};
use crate::failure::{classify, Failure};
use crate::params::CHANNEL;

/// One line of what the server sent.
/// The Centrifugo client endpoint's path (also ringcast's).
pub const CLIENT_PATH: &str = "/connection/websocket";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// `{}`: a ping, to be answered with `{}`.
    Ping,
    /// A publication; `None` when its data is not ours (no `t`/`p`/`s`).
    Push(Option<(u64, u32, u32)>),
    /// A reply to command `id`.
    Reply {
        id: u64,
        error: bool,
    },
    Other,
}

/// Splits a frame into its newline-separated JSON messages.
pub fn lines(frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    frame.split(|&b| b == b'\n').map(|l| l.trim_ascii()).filter(|l| !l.is_empty())
}

pub fn parse_line(line: &[u8]) -> Line {
    if line == b"{}" {
        return Line::Ping;
    }
    if find(line, b"\"push\":").is_some() {
        // Only publications (`"pub"`) count; join/leave and other pushes are not deliveries.
        let Some(publication) = find(line, b"\"pub\":") else { return Line::Other };
        let Some(data) = find(&line[publication..], b"\"data\":").map(|d| publication + d) else {
            return Line::Push(None);
        };
        let data = &line[data..];
        let fields =
            (|| Some((field_u64(data, b"\"t\":")?, field_u64(data, b"\"p\":")?, field_u64(data, b"\"s\":")?)))();
        return Line::Push(fields.and_then(|(t, p, s)| Some((t, u32::try_from(p).ok()?, u32::try_from(s).ok()?))));
    }
    match field_u64(line, b"\"id\":") {
        Some(id) => Line::Reply { id, error: find(line, b"\"error\":").is_some() },
        None => Line::Other,
    }
}

/// Index just past the first occurrence of `needle`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle).map(|i| i + needle.len())
}

/// The unsigned integer after the first `key` (e.g. `"t":`).
pub(crate) fn field_u64(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(hay, key)?;
    let digits = hay[at..].iter().skip_while(|b| b.is_ascii_whitespace());
    let mut v: u64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

/// Appends the publication data: `{"t":..,"p":..,"s":..,"x":"xxx"}`, padded to `size` bytes when possible.
pub fn write_data(out: &mut Vec<u8>, ts: u64, publisher: u32, seq: u32, size: usize) {
    let start = out.len();
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{{\"t\":{ts},\"p\":{publisher},\"s\":{seq},\"x\":\"");
    let pad = size.saturating_sub(out.len() - start + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

const SYMBOLS: [&str; 12] =
    ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "BTC-USD", "ETH-USD", "AAPL", "MSFT", "NVDA", "TSLA", "XAU", "BRENT"];
const VENUES: [&str; 6] = ["LMAX", "CME", "NASDAQ", "NYSE", "Coinbase", "Kraken"];
const STATES: [&str; 4] = ["open", "halted", "auction", "closed"];

/// [`write_data`] with realistic JSON as the padding: `"x":[{record}, ...]`, records of a market-data
/// feed (symbols, venues, prices, volumes, timestamps) whose numbers change with every message, as many
/// as fit in `size` bytes (at least one). It compresses about as such feeds do (a few times, not the
/// hundreds of times of a repeated letter), which is what a compression figure needs.
pub fn write_json_data(out: &mut Vec<u8>, ts: u64, publisher: u32, seq: u32, size: usize) {
    let start = out.len();
    let _ = write!(out, "{{\"t\":{ts},\"p\":{publisher},\"s\":{seq},\"x\":[");
    // A small xorshift seeded per message: varied digits, reproducible runs.
    let mut state = (u64::from(seq) << 32 | u64::from(publisher)) ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut record = Vec::with_capacity(256);
    let mut first = true;
    for i in 0u64.. {
        record.clear();
        let r = next();
        let price = 100 + r % 90_000;
        let spread = 1 + (r >> 20) % 40;
        let _ = write!(
            record,
            "{}{{\"id\":{},\"symbol\":\"{}\",\"venue\":\"{}\",\"bid\":{}.{:02},\"ask\":{}.{:02},\"volume\":{},\"change\":{}{}.{:02},\"state\":\"{}\",\"updated\":\"2026-12-01T23:{:02}:{:02}.{:03}Z\",\"tags\":[\"live\",\"level{}\"]}}",
            if first { "" } else { "," },
            seq as u64 * 16 + i,
            SYMBOLS[(r % 12) as usize],
            VENUES[((r >> 8) % 6) as usize],
            price / 100,
            price % 100,
            (price + spread) / 100,
            (price + spread) % 100,
            (r >> 24) % 1_000_000,
            if r & (1 << 40) != 0 { "-" } else { "" },
            (r >> 41) % 5,
            (r >> 44) % 100,
            STATES[((r >> 52) % 4) as usize],
            (r >> 30) % 60,
            (r >> 36) % 60,
            (r >> 46) % 1000,
            1 + (r >> 58) % 3,
        );
        if !first && out.len() - start + record.len() + 2 > size {
            break;
        }
        out.extend_from_slice(&record);
        first = false;
    }
    out.extend_from_slice(b"]}");
}

/// Appends a publish command carrying `data`.
pub fn write_publish(out: &mut Vec<u8>, id: u64, data: &[u8]) {
    let _ = write!(out, "{{\"id\":{id},\"publish\":{{\"channel\":\"{CHANNEL}\",\"data\":");
    out.extend_from_slice(data);
    out.extend_from_slice(b"}}");
}

/// Sends connect (and subscribe) and waits for the replies.
pub async fn setup(conn: &mut Conn, subscribe: bool, timeout: Duration) -> Result<(), Failure> {
    let run = async {
        conn.tx.frame(OpCode::Text, br#"{"id":1,"connect":{}}"#);
        // A connect result always names the client; an echo of our command does not.
        command(conn, 1, |line| find(line, b"\"client\":").is_some()).await?;
        if subscribe {
            let cmd = format!("{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\"}}}}");
            conn.tx.frame(OpCode::Text, cmd.as_bytes());
            // A subscribe result never carries the channel; our request (or an echo of it) does.
            command(conn, 2, |line| find(line, b"\"channel\":").is_none()).await?;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, run).await.unwrap_or(Err(Failure::Timeout))
}

/// Writes what is queued and waits for the reply to command `id` (a line with that id that `is_reply`
/// accepts: an error, or the shape of the expected result).
async fn command(conn: &mut Conn, id: u64, is_reply: impl Fn(&[u8]) -> bool) -> Result<(), Failure> {
    command_with(conn, id, |seen| match seen {
        Seen::Reply(line) => is_reply(line).then_some(()),
        Seen::Push(_) => None,
    })
    .await
}

/// A line [`command_with`] hands to its caller.
pub(crate) enum Seen<'a> {
    /// A successful reply to the command.
    Reply(&'a [u8]),
    /// A push that arrived before it.
    Push(&'a [u8]),
}

/// [`command`] for callers that need more: `seen` reads the result out of the reply line (`None`: not the
/// reply, keep waiting) and sees every push that arrives before it. Pings are answered.
pub(crate) async fn command_with<T>(
    conn: &mut Conn,
    id: u64,
    mut seen: impl FnMut(Seen<'_>) -> Option<T>,
) -> Result<T, Failure> {
    conn.tx.flush(&conn.stream)?;
    while conn.tx.pending() > 0 {
        conn.stream.writable().await?;
        conn.tx.flush(&conn.stream)?;
    }
    loop {
        let mut outcome: Option<Result<T, Failure>> = None;
        let ended = conn.receive(&mut |_: OpCode, bytes: &[u8], tx: &mut crate::client::Tx| {
            for line in lines(bytes) {
                match parse_line(line) {
                    Line::Ping => tx.frame(OpCode::Text, b"{}"),
                    Line::Push(_) => {
                        seen(Seen::Push(line));
                    }
                    Line::Reply { id: got, error: true } if got == id => {
                        outcome =
                            Some(Err(Failure::Protocol(format!("centrifuge: {}", String::from_utf8_lossy(line)))));
                    }
                    Line::Reply { id: got, error: false } if got == id => {
                        if let Some(v) = seen(Seen::Reply(line)) {
                            outcome = Some(Ok(v));
                        }
                    }
                    _ => {}
                }
            }
        })?;
        if let Some(r) = outcome {
            return r;
        }
        if let Some(end) = ended {
            return Err(end.failure());
        }
        conn.stream.readable().await?;
    }
}

/// Publishes over the HTTP API on one keep-alive connection, one request at a time.
pub struct HttpPublisher {
    addr: SocketAddr,
    source: Option<IpAddr>,
    /// `wss://` targets: the API is https on the same address.
    tls: Option<crate::stream::TlsClient>,
    stream: Option<Stream>,
    head: Vec<u8>,
    request: Vec<u8>,
    body: Vec<u8>,
    response: Vec<u8>,
}

impl HttpPublisher {
    pub fn new(
        addr: SocketAddr,
        source: Option<IpAddr>,
        tls: Option<crate::stream::TlsClient>,
        host: &str,
        api_key: &str,
    ) -> HttpPublisher {
        let head = format!(
            "POST /api/publish HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {api_key}\r\nContent-Type: application/json\r\nContent-Length: "
        )
        .into_bytes();
        HttpPublisher {
            addr,
            source,
            tls,
            stream: None,
            head,
            request: Vec::new(),
            body: Vec::new(),
            response: Vec::with_capacity(1024),
        }
    }

    pub async fn connect(&mut self) -> Result<(), Failure> {
        if self.stream.is_none() {
            self.stream = Some(connect_stream(self.addr, self.source, self.tls.as_ref()).await?);
        }
        Ok(())
    }

    /// Publishes `data`; `Ok` once the server answered 200 without an error. On any failure the
    /// connection is dropped (a half-read response must not be mistaken for the next one's).
    pub async fn publish(&mut self, data: &[u8], timeout: Duration) -> Result<(), Failure> {
        self.body.clear();
        let _ = write!(self.body, "{{\"channel\":\"{CHANNEL}\",\"data\":");
        self.body.extend_from_slice(data);
        self.body.push(b'}');
        self.request.clear();
        self.request.extend_from_slice(&self.head);
        let _ = write!(self.request, "{}\r\n\r\n", self.body.len());
        self.request.extend_from_slice(&self.body);
        let result = tokio::time::timeout(timeout, async {
            self.connect().await?;
            self.exchange().await
        })
        .await
        .unwrap_or(Err(Failure::Timeout));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange(&mut self) -> Result<(), Failure> {
        let Some(stream) = &self.stream else { return Err(Failure::Closed("not connected".into())) };
        write_all(stream, &self.request).await?;
        self.response.clear();
        loop {
            if let Some(done) = self.parse()? {
                let keep_alive = done;
                if !keep_alive {
                    self.stream = None;
                }
                return Ok(());
            }
            let Some(stream) = &self.stream else { return Err(Failure::Closed("not connected".into())) };
            stream.readable().await?;
            let start = self.response.len();
            if self.response.capacity() - start < 512 {
                self.response.reserve(4096);
            }
            self.response.resize(self.response.capacity(), 0);
            match stream.try_read(&mut self.response[start..]) {
                Ok(0) => {
                    self.response.truncate(start);
                    return Err(Failure::Closed("HTTP API closed the connection".into()));
                }
                Ok(n) => self.response.truncate(start + n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.response.truncate(start),
                Err(e) => return Err(classify(&e)),
            }
            if self.response.len() > 1 << 20 {
                return Err(Failure::Protocol("HTTP API response larger than 1 MiB".into()));
            }
        }
    }

    /// `Ok(Some(keep_alive))` once a whole response is buffered and it was a success.
    fn parse(&self) -> Result<Option<bool>, Failure> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(&self.response) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Failure::Protocol(format!("HTTP API: {e}"))),
        };
        let code = resp.code.unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = true;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h.value.eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                keep_alive = !h.value.eq_ignore_ascii_case(b"close");
            }
        }
        let body = &self.response[head_len..];
        let complete = match (length, chunked) {
            (Some(n), _) => body.len() >= n,
            (None, true) => body.ends_with(b"0\r\n\r\n"),
            (None, false) => return Err(Failure::Protocol("HTTP API response without a length".into())),
        };
        if !complete {
            return Ok(None);
        }
        if code != 200 {
            return Err(Failure::Status(code));
        }
        if find(body, b"\"error\"").is_some() {
            return Err(Failure::Protocol(format!("HTTP API: {}", String::from_utf8_lossy(body).trim())));
        }
        Ok(Some(keep_alive))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_padded_and_read_back_from_a_push() {
        let mut data = Vec::new();
        write_data(&mut data, 123_456_789, 3, 42, 64);
        assert_eq!(data.len(), 64);
        let push = format!(
            "{{\"push\":{{\"channel\":\"bench\",\"pub\":{{\"data\":{},\"offset\":7}}}}}}",
            String::from_utf8(data.clone()).unwrap()
        );
        let frame = format!("{{}}\n{push}\n{push}\n{{\"id\":5,\"publish\":{{}}}}");
        let parsed: Vec<Line> = lines(frame.as_bytes()).map(parse_line).collect();
        assert_eq!(
            parsed,
            vec![
                Line::Ping,
                Line::Push(Some((123_456_789, 3, 42))),
                Line::Push(Some((123_456_789, 3, 42))),
                Line::Reply { id: 5, error: false }
            ]
        );
        assert_eq!(
            parse_line(br#"{"id":2,"error":{"code":102,"message":"unknown channel"}}"#),
            Line::Reply { id: 2, error: true }
        );
        assert_eq!(parse_line(br#"{"push":{"channel":"bench","pub":{"data":{"other":1}}}}"#), Line::Push(None));
        assert_eq!(
            parse_line(br#"{"push":{"channel":"bench","join":{"info":{"client":"c","user":""}}}}"#),
            Line::Other
        );
        // Too small to pad: still well-formed.
        let mut small = Vec::new();
        write_data(&mut small, 1, 0, 0, 5);
        assert_eq!(small, br#"{"t":1,"p":0,"s":0,"x":""}"#);
    }

    #[test]
    fn json_data_is_valid_json_within_size_read_back_and_compresses_like_json() {
        for (seq, size) in [(0u32, 1500usize), (7, 1024), (123_456, 2000), (9, 10)] {
            let mut data = Vec::new();
            write_json_data(&mut data, 987_654_321, 2, seq, size);
            let v: serde_json::Value = serde_json::from_slice(&data).expect("valid JSON");
            assert!(v["x"].as_array().is_some_and(|a| !a.is_empty()));
            if size >= 1000 {
                assert!(data.len() <= size && data.len() > size - 300, "{} for {size}", data.len());
                // Realistic, not a repeated letter: deflate shrinks it a few times, not a hundred.
                let z = ringcast_wire::deflate::compressed_frame(OpCode::Text, &data, 6, 15);
                let ratio = data.len() as f64 / z.len() as f64;
                assert!((1.5..10.0).contains(&ratio), "ratio {ratio}");
            }
            let push =
                format!(r#"{{"push":{{"channel":"bench","pub":{{"data":{}}}}}}}"#, String::from_utf8(data).unwrap());
            assert_eq!(parse_line(push.as_bytes()), Line::Push(Some((987_654_321, 2, seq))));
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_json_data(&mut a, 1, 0, 1, 1500);
        write_json_data(&mut b, 1, 0, 2, 1500);
        assert_ne!(a, b, "every message differs");
    }

    #[test]
    fn publish_command_wraps_the_data() {
        let mut out = Vec::new();
        write_publish(&mut out, 9, br#"{"t":1}"#);
        assert_eq!(out, br#"{"id":9,"publish":{"channel":"bench","data":{"t":1}}}"#);
    }
}
