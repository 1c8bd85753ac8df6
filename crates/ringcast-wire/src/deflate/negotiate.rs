//! Negotiation (RFC 7692 §5, §7.1): offers in, the parameters in force and the response value out.
//!
//! `Sec-WebSocket-Extensions` is an HTTP list (RFC 6455 §9.1): offers separated by commas, possibly over
//! several header lines, each an extension token followed by `; name[=value]` parameters whose values
//! are tokens or quoted strings. Offers are read in order and the first well-formed permessage-deflate
//! offer is accepted. Every well-formed offer is acceptable to us: each parameter a client can send only
//! ever asks us for something we can do (see the module doc of [`crate::deflate`] for window bits 8).
//! A malformed offer — bad syntax, an unknown or duplicated parameter, a value out of range — is
//! declined, and the next one is tried. Nothing here allocates: values are at most a few bytes and are
//! unquoted into a stack array.

use super::{DeflateConfig, EXTENSION_NAME};

/// The permessage-deflate parameters in force on a connection, as negotiated.
///
/// "server" and "client" are the RFC's: the server's compressor is limited by `server_*`, the client's
/// by `client_*`. Both ends can build their halves from the same value
/// ([`Reader::enable_deflate`](crate::reader::Reader::enable_deflate), [`Deflater::new`](super::Deflater::new)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: u8,
    client_max_window_bits: u8,
    /// Whether the response carries `server_max_window_bits` (only when the offer had it, §7.1.2.1).
    answer_server_bits: bool,
    /// Whether the response carries `client_max_window_bits` (only when the offer had it, §7.1.2.2).
    answer_client_bits: bool,
}

impl DeflateParams {
    /// The server resets its compressor after every message.
    pub fn server_no_context_takeover(&self) -> bool {
        self.server_no_context_takeover
    }

    /// The client resets its compressor after every message (so we reset our inflater).
    pub fn client_no_context_takeover(&self) -> bool {
        self.client_no_context_takeover
    }

    /// The largest window (base-2 log) the server compresses with, 8–15.
    pub fn server_max_window_bits(&self) -> u8 {
        self.server_max_window_bits
    }

    /// The largest window (base-2 log) the client compresses with, 8–15.
    pub fn client_max_window_bits(&self) -> u8 {
        self.client_max_window_bits
    }

    /// Whether `peer` resets its compressor after every message and the largest window it uses: what
    /// the end whose role is the *other* one inflates with.
    pub(crate) fn sender(&self, sender_is_server: bool) -> (bool, u8) {
        if sender_is_server {
            (self.server_no_context_takeover, self.server_max_window_bits)
        } else {
            (self.client_no_context_takeover, self.client_max_window_bits)
        }
    }

    /// Appends the response's `Sec-WebSocket-Extensions` value, e.g.
    /// `permessage-deflate; server_no_context_takeover; client_no_context_takeover`.
    pub fn write_header_value(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(EXTENSION_NAME.as_bytes());
        if self.server_no_context_takeover {
            out.extend_from_slice(b"; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.extend_from_slice(b"; client_no_context_takeover");
        }
        if self.answer_server_bits {
            out.extend_from_slice(b"; server_max_window_bits=");
            push_bits(out, self.server_max_window_bits);
        }
        if self.answer_client_bits {
            out.extend_from_slice(b"; client_max_window_bits=");
            push_bits(out, self.client_max_window_bits);
        }
    }

    /// The response value as a `String` (tests and logs).
    pub fn header_value(&self) -> String {
        let mut v = Vec::new();
        self.write_header_value(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Client side: the parameters a server's response puts in force. `Err(())` when the response
    /// is malformed (the client must then fail the connection, RFC 7692 §5). `Ok(None)`: the response
    /// names no permessage-deflate extension.
    #[allow(clippy::result_unit_err)]
    pub fn from_response<'a, I: IntoIterator<Item = &'a [u8]>>(values: I) -> Result<Option<DeflateParams>, ()> {
        let mut found = None;
        for value in values {
            for element in split_list(value) {
                match parse_offer(element) {
                    Parsed::Empty | Parsed::Other => {}
                    Parsed::Malformed => return Err(()),
                    Parsed::Deflate(offer) => {
                        if found.is_some() {
                            return Err(());
                        }
                        let client_max_window_bits = match offer.client_bits {
                            None => 15,
                            Some(Some(n)) => n,
                            // A response must give the value (§7.1.2.2).
                            Some(None) => return Err(()),
                        };
                        found = Some(DeflateParams {
                            server_no_context_takeover: offer.server_no_context_takeover,
                            client_no_context_takeover: offer.client_no_context_takeover,
                            server_max_window_bits: offer.server_bits.unwrap_or(15),
                            client_max_window_bits,
                            answer_server_bits: offer.server_bits.is_some(),
                            answer_client_bits: offer.client_bits.is_some(),
                        });
                    }
                }
            }
        }
        Ok(found)
    }
}

fn push_bits(out: &mut Vec<u8>, bits: u8) {
    if bits >= 10 {
        out.push(b'1');
    }
    out.push(b'0' + bits % 10);
}

/// Picks the first acceptable permessage-deflate offer from the request's `Sec-WebSocket-Extensions`
/// header values (in the order they appeared). `None`: the extension is not used on this connection.
pub fn negotiate<'a, I: IntoIterator<Item = &'a [u8]>>(values: I, config: &DeflateConfig) -> Option<DeflateParams> {
    if !config.enabled {
        return None;
    }
    for value in values {
        for element in split_list(value) {
            if let Parsed::Deflate(offer) = parse_offer(element) {
                return Some(accept(&offer, config));
            }
        }
    }
    None
}

/// The answer to a well-formed offer.
fn accept(offer: &Offer, config: &DeflateConfig) -> DeflateParams {
    // We may always declare that we will not take over our context, and may always ask the client not
    // to (§7.1.1.1, §7.1.1.2): both are how nothing is kept per connection.
    let server_no_context_takeover = offer.server_no_context_takeover || !config.server_context_takeover;
    let client_no_context_takeover = offer.client_no_context_takeover || !config.client_context_takeover;
    // server_max_window_bits: the client's limit binds us, and must be answered with the same or a
    // smaller value; without it we use our own and must not mention it.
    let (server_max_window_bits, answer_server_bits) = match offer.server_bits {
        Some(n) => (n.min(config.server_bits()), true),
        None => (config.server_bits(), false),
    };
    // client_max_window_bits: only when offered may we limit the client; a value in the offer is the
    // client's own limit. We answer when our limit is below what the client would otherwise use.
    let (client_max_window_bits, answer_client_bits) = match offer.client_bits {
        None => (15, false),
        Some(limit) => {
            let theirs = limit.unwrap_or(15);
            let bits = theirs.min(config.client_bits());
            (bits, bits < theirs || limit.is_some())
        }
    };
    DeflateParams {
        server_no_context_takeover,
        client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
        answer_server_bits,
        answer_client_bits,
    }
}

/// A syntactically valid permessage-deflate offer (or response).
#[derive(Debug, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_bits: Option<u8>,
    /// `Some(None)`: the valueless form.
    client_bits: Option<Option<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// An empty list element (`a, , b` is legal HTTP).
    Empty,
    /// A well-formed offer of another extension.
    Other,
    Deflate(Offer),
    Malformed,
}

/// Splits an HTTP list at the commas that are not inside a quoted string.
fn split_list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, &b) in s.iter().enumerate() {
            if quoted {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    quoted = false;
                }
            } else if b == b'"' {
                quoted = true;
            } else if b == b',' {
                rest = Some(&s[i + 1..]);
                return Some(&s[..i]);
            }
        }
        rest = None;
        Some(s)
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A parameter value, unquoted, if it is short enough to be one of ours.
struct Value {
    buf: [u8; 8],
    len: usize,
    too_long: bool,
}

impl Value {
    fn bytes(&self) -> Option<&[u8]> {
        (!self.too_long).then(|| &self.buf[..self.len])
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        } else {
            self.too_long = true;
        }
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn ows(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        while self.s.get(self.i).is_some_and(|&b| is_tchar(b)) {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }

    /// A token or a quoted string (RFC 7230 §3.2.6, with quoted-pairs).
    fn value(&mut self) -> Option<Value> {
        let mut v = Value { buf: [0; 8], len: 0, too_long: false };
        if self.eat(b'"') {
            loop {
                let &b = self.s.get(self.i)?;
                self.i += 1;
                match b {
                    b'"' => break,
                    b'\\' => {
                        let &e = self.s.get(self.i)?;
                        self.i += 1;
                        v.push(e);
                    }
                    _ => v.push(b),
                }
            }
            // RFC 6455 §9.1: a quoted value must still be a token once unquoted.
            if v.len == 0 || !v.buf[..v.len].iter().all(|&b| is_tchar(b)) {
                return None;
            }
        } else {
            for &b in self.token()? {
                v.push(b);
            }
        }
        Some(v)
    }
}

/// A window-bits value: 1*DIGIT without leading zeros, 8 to 15 (RFC 7692 §7.1.2).
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// Parses one list element.
fn parse_offer(element: &[u8]) -> Parsed {
    let mut c = Cursor { s: element, i: 0 };
    c.ows();
    if c.at_end() {
        return Parsed::Empty;
    }
    let Some(name) = c.token() else { return Parsed::Malformed };
    let ours = name.eq_ignore_ascii_case(EXTENSION_NAME.as_bytes());
    let mut offer = Offer::default();
    loop {
        c.ows();
        if c.at_end() {
            break;
        }
        if !c.eat(b';') {
            return Parsed::Malformed;
        }
        c.ows();
        let Some(param) = c.token() else { return Parsed::Malformed };
        c.ows();
        let value = if c.eat(b'=') {
            c.ows();
            match c.value() {
                Some(v) => Some(v),
                None => return Parsed::Malformed,
            }
        } else {
            None
        };
        if !ours {
            continue;
        }
        let value = value.as_ref().map(Value::bytes);
        let ok = if param.eq_ignore_ascii_case(b"server_no_context_takeover") {
            value.is_none() && !std::mem::replace(&mut offer.server_no_context_takeover, true)
        } else if param.eq_ignore_ascii_case(b"client_no_context_takeover") {
            value.is_none() && !std::mem::replace(&mut offer.client_no_context_takeover, true)
        } else if param.eq_ignore_ascii_case(b"server_max_window_bits") {
            match value.flatten().and_then(window_bits) {
                Some(n) if offer.server_bits.is_none() => {
                    offer.server_bits = Some(n);
                    true
                }
                _ => false,
            }
        } else if param.eq_ignore_ascii_case(b"client_max_window_bits") {
            let bits = match value {
                None => Some(None),
                Some(v) => v.and_then(window_bits).map(Some),
            };
            match bits {
                Some(b) if offer.client_bits.is_none() => {
                    offer.client_bits = Some(b);
                    true
                }
                _ => false,
            }
        } else {
            // An unknown parameter declines the offer (RFC 7692 §5.1).
            false
        };
        if !ok {
            return Parsed::Malformed;
        }
    }
    if ours {
        Parsed::Deflate(offer)
    } else {
        Parsed::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeflateConfig {
        DeflateConfig::enabled()
    }

    fn answer(values: &[&str], config: &DeflateConfig) -> Option<String> {
        negotiate(values.iter().map(|v| v.as_bytes()), config).map(|p| p.header_value())
    }

    const NO_TAKEOVER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn negotiation_table() {
        let takeover = DeflateConfig { server_context_takeover: true, client_context_takeover: true, ..cfg() };
        let small = DeflateConfig { server_max_window_bits: 10, client_max_window_bits: 9, ..cfg() };
        #[rustfmt::skip]
        let table: &[(&[&str], &DeflateConfig, Option<&str>)] = &[
            // The plain offer: our defaults keep no context on either side.
            (&["permessage-deflate"], &cfg(), Some(NO_TAKEOVER)),
            (&["permessage-deflate"], &takeover, Some("permessage-deflate")),
            // What browsers send.
            (&["permessage-deflate; client_max_window_bits"], &cfg(), Some(NO_TAKEOVER)),
            (&["permessage-deflate; client_max_window_bits"], &small,
             Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=9")),
            // Each parameter on its own.
            (&["permessage-deflate; server_no_context_takeover"], &takeover,
             Some("permessage-deflate; server_no_context_takeover")),
            (&["permessage-deflate; client_no_context_takeover"], &takeover,
             Some("permessage-deflate; client_no_context_takeover")),
            (&["permessage-deflate; server_max_window_bits=12"], &cfg(),
             Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12")),
            (&["permessage-deflate; server_max_window_bits=15"], &small,
             Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10")),
            (&["permessage-deflate; server_max_window_bits=8"], &takeover,
             Some("permessage-deflate; server_max_window_bits=8")),
            (&["permessage-deflate; client_max_window_bits=11"], &takeover,
             Some("permessage-deflate; client_max_window_bits=11")),
            (&["permessage-deflate; client_max_window_bits=11"], &small,
             Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=9")),
            (&["permessage-deflate; client_max_window_bits=8"], &takeover,
             Some("permessage-deflate; client_max_window_bits=8")),
            // All four, odd spacing and case.
            (&["PerMessage-Deflate ;Server_No_Context_Takeover ;client_no_context_takeover;server_max_window_bits=9 ; client_max_window_bits = 14"],
             &takeover,
             Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9; client_max_window_bits=14")),
            // Quoted values are tokens once unquoted.
            (&["permessage-deflate; server_max_window_bits=\"10\""], &takeover,
             Some("permessage-deflate; server_max_window_bits=10")),
            (&["permessage-deflate; client_max_window_bits=\"1\\3\""], &takeover,
             Some("permessage-deflate; client_max_window_bits=13")),
            // Malformed or duplicated: declined, and nothing else offered.
            (&["permessage-deflate; server_max_window_bits"], &cfg(), None),
            (&["permessage-deflate; server_max_window_bits=7"], &cfg(), None),
            (&["permessage-deflate; server_max_window_bits=16"], &cfg(), None),
            (&["permessage-deflate; server_max_window_bits=010"], &cfg(), None),
            (&["permessage-deflate; server_max_window_bits=1a"], &cfg(), None),
            (&["permessage-deflate; client_max_window_bits=0"], &cfg(), None),
            (&["permessage-deflate; client_max_window_bits=\"\""], &cfg(), None),
            (&["permessage-deflate; client_max_window_bits=\"1 0\""], &cfg(), None),
            (&["permessage-deflate; client_max_window_bits=\"10"], &cfg(), None),
            (&["permessage-deflate; server_no_context_takeover=1"], &cfg(), None),
            (&["permessage-deflate; client_no_context_takeover=\"x\""], &cfg(), None),
            (&["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], &cfg(), None),
            (&["permessage-deflate; client_no_context_takeover; client_no_context_takeover"], &cfg(), None),
            (&["permessage-deflate; server_max_window_bits=10; server_max_window_bits=10"], &cfg(), None),
            (&["permessage-deflate; client_max_window_bits; client_max_window_bits=10"], &cfg(), None),
            (&["permessage-deflate; unknown_param"], &cfg(), None),
            (&["permessage-deflate;"], &cfg(), None),
            (&["permessage-deflate; ; server_no_context_takeover"], &cfg(), None),
            (&["permessage-deflate server_no_context_takeover"], &cfg(), None),
            (&["x-webkit-deflate-frame"], &cfg(), None),
            (&[""], &cfg(), None),
            // Several offers: the first acceptable one wins, across elements and header lines.
            (&["permessage-deflate; server_max_window_bits=99, permessage-deflate; server_max_window_bits=11"], &takeover,
             Some("permessage-deflate; server_max_window_bits=11")),
            (&["foo; bar=\"a,b\", permessage-deflate; client_no_context_takeover"], &takeover,
             Some("permessage-deflate; client_no_context_takeover")),
            (&["permessage-deflate; bogus", "permessage-deflate; server_no_context_takeover"], &takeover,
             Some("permessage-deflate; server_no_context_takeover")),
            (&["permessage-deflate; server_max_window_bits=10", "permessage-deflate"], &takeover,
             Some("permessage-deflate; server_max_window_bits=10")),
            (&[", ,permessage-deflate"], &takeover, Some("permessage-deflate")),
        ];
        for (values, config, expect) in table {
            assert_eq!(answer(values, config).as_deref(), *expect, "offer {values:?}");
        }
    }

    #[test]
    fn disabled_config_never_negotiates() {
        assert_eq!(answer(&["permessage-deflate"], &DeflateConfig::default()), None);
    }

    #[test]
    fn parameters_in_force() {
        let p = negotiate([b"permessage-deflate; client_max_window_bits; server_max_window_bits=8".as_slice()], &cfg())
            .unwrap();
        assert!(p.server_no_context_takeover() && p.client_no_context_takeover());
        assert_eq!((p.server_max_window_bits(), p.client_max_window_bits()), (8, 15));
        // Without an offer of server_max_window_bits, our own limit applies (and is not announced).
        let config = DeflateConfig { server_max_window_bits: 11, client_max_window_bits: 3, ..cfg() };
        let p = negotiate([b"permessage-deflate".as_slice()], &config).unwrap();
        assert_eq!(p.server_max_window_bits(), 11);
        // Without client_max_window_bits offered we cannot limit the client: it may use 15.
        assert_eq!(p.client_max_window_bits(), 15);
        // Our configured 3 is clamped to 8 where it can apply.
        let p = negotiate([b"permessage-deflate; client_max_window_bits".as_slice()], &config).unwrap();
        assert_eq!(p.client_max_window_bits(), 8);
    }

    #[test]
    fn client_reads_the_response() {
        let ok = |v: &str| DeflateParams::from_response([v.as_bytes()]);
        let p = ok("permessage-deflate; server_no_context_takeover; server_max_window_bits=10").unwrap().unwrap();
        assert!(p.server_no_context_takeover() && !p.client_no_context_takeover());
        assert_eq!((p.server_max_window_bits(), p.client_max_window_bits()), (10, 15));
        assert_eq!(ok("other-ext").unwrap(), None);
        assert_eq!(ok("permessage-deflate; client_max_window_bits"), Err(()));
        assert_eq!(ok("permessage-deflate, permessage-deflate"), Err(()));
        assert_eq!(ok("permessage-deflate; nope"), Err(()));
        // What we write, a client reads back identically.
        for offer in ["permessage-deflate", "permessage-deflate; client_max_window_bits=9; server_max_window_bits=12"] {
            let ours = negotiate([offer.as_bytes()], &cfg()).unwrap();
            let mut v = Vec::new();
            ours.write_header_value(&mut v);
            assert_eq!(DeflateParams::from_response([v.as_slice()]), Ok(Some(ours)), "{offer}");
        }
    }
}
