//! What a run is asked to do: the scenario, the target and every knob, as one serializable struct.
//!
//! The same [`Params`] drives a run from the CLI, from a test, and inside a worker process (it travels to
//! workers as JSON), and it is written into the `--json` report so a figure always comes with the
//! parameters that produced it. Parsing of the few structured values (the URL, source-address ranges,
//! durations) lives here too, with errors that name the flag.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// Which load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// C connections each keep W messages in flight to an echo endpoint.
    Echo,
    /// S subscribers, P publishers: delivery latency, loss and order.
    Fanout,
    /// A connection storm: handshakes per second and their latency.
    Connect,
    /// N connections held open: the server's memory per connection.
    Idle,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Fanout => "fanout",
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        [Scenario::Echo, Scenario::Fanout, Scenario::Connect, Scenario::Idle].into_iter().find(|x| x.name() == s)
    }
}

/// How fan-out messages are published and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Plain WebSocket broadcast: what a publisher sends, every subscriber receives.
    Raw,
    /// Centrifugo client protocol v2 (JSON): connect, subscribe to `bench`, publish.
    Centrifuge,
    /// ringcast's raw TCP binary protocol (docs/tcp-protocol.md) on a `tcp://` URL (the server's
    /// `tcp_listen`): CONNECT (anonymous), SUBSCRIBE `bench`, PUBLISH; the data is the raw fan-out header
    /// and filler.
    Tcp,
}

impl Protocol {
    /// What a URL implies when `--protocol` is not given: the Centrifugo protocol on its endpoint
    /// (`/connection/websocket`, where a raw client would be disconnected with 3501), raw elsewhere.
    pub fn for_url(url: &str) -> Protocol {
        if url.starts_with("tcp://") {
            return Protocol::Tcp;
        }
        let on_client_endpoint =
            Target::parse(url).is_ok_and(|t| t.path.split('?').next() == Some(crate::centrifuge::CLIENT_PATH));
        if on_client_endpoint {
            Protocol::Centrifuge
        } else {
            Protocol::Raw
        }
    }
}

/// What fills a Centrifugo fan-out publication up to `--size`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// One repeated letter: cheapest to make, and compresses to almost nothing.
    #[default]
    Filler,
    /// A realistic JSON document (an array of varied records with numbers that change per message),
    /// for measuring compression on what a push server actually carries.
    Json,
}

/// Every knob of a run. Fields that a scenario does not use are ignored by it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub scenario: Scenario,
    /// `ws://host[:port][/path]`.
    pub url: String,
    /// Connections (echo, connect, idle).
    pub connections: u64,
    /// Subscribers (fanout).
    pub subscribers: u64,
    /// Publishers (fanout).
    pub publishers: u64,
    /// Messages per second over all connections (echo, fanout) or handshakes per second (connect);
    /// 0: as fast as the window allows. With a rate, latency is measured from the *intended* send time.
    pub rate: f64,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages in flight per connection (echo; fanout with rate 0, per publisher), or handshakes in
    /// flight (connect, idle).
    pub window: u64,
    /// Measured time (after warm-up); for idle, how long connections are held.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Time before measuring starts; excluded from every figure except loss.
    #[serde(with = "secs")]
    pub warmup: Duration,
    pub protocol: Protocol,
    /// Local addresses connections are spread over (bound before connecting).
    pub source_ips: Vec<IpAddr>,
    /// The server's process, for CPU and memory figures read from /proc.
    pub server_pid: Option<u32>,
    /// Client processes to split the load over.
    pub processes: usize,
    /// Centrifugo HTTP API key: publish with `POST /api/publish` instead of over WebSocket.
    pub api_key: Option<String>,
    /// `wss://`: accept any server certificate (a test certificate); the handshake is still TLS.
    #[serde(default)]
    pub insecure: bool,
    /// Bound on each TCP connect + upgrade (and Centrifugo connect/subscribe).
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Offer permessage-deflate on every connection (what the server sends compressed is inflated
    /// before it is checked, so latency, loss and order mean the same with and without).
    #[serde(default)]
    pub compression: bool,
    /// What a Centrifugo fan-out publication's padding is (see [`PayloadKind`]).
    #[serde(default)]
    pub payload: PayloadKind,
    /// Fan-out: servers the subscribers connect to instead of `url`, in contiguous blocks (subscriber i
    /// of S goes to `sub_urls[i * len / S]`); publishers stay on `url`. Empty: everything on `url`.
    /// Several nodes of one cluster, to measure fan-out spread over nodes and cross-node delivery.
    #[serde(default)]
    pub sub_urls: Vec<String>,
    /// Draw the live progress line (the CLI sets this when attached to a terminal).
    #[serde(skip)]
    pub progress: bool,
}

/// The Centrifugo channel fan-out publishes to and subscribes on.
pub const CHANNEL: &str = "bench";

impl Params {
    /// Defaults for a scenario: modest enough to run anywhere, big enough to mean something.
    pub fn new(scenario: Scenario, url: impl Into<String>) -> Params {
        let (connections, window, warmup) = match scenario {
            Scenario::Echo => (100, 1, Duration::from_secs(1)),
            Scenario::Fanout => (0, 64, Duration::from_secs(1)),
            Scenario::Connect => (1000, 64, Duration::ZERO),
            Scenario::Idle => (1000, 64, Duration::ZERO),
        };
        Params {
            scenario,
            url: url.into(),
            connections,
            subscribers: 100,
            publishers: 1,
            rate: if scenario == Scenario::Fanout { 1000.0 } else { 0.0 },
            size: 32,
            window,
            duration: Duration::from_secs(10),
            warmup,
            protocol: Protocol::Raw,
            source_ips: Vec::new(),
            server_pid: None,
            processes: 1,
            api_key: None,
            insecure: false,
            connect_timeout: Duration::from_secs(10),
            compression: false,
            payload: PayloadKind::Filler,
            sub_urls: Vec::new(),
            progress: false,
        }
    }

    /// Checks values that would make a run meaningless or impossible; errors name the flag.
    pub fn validate(&self) -> Result<Target, BenchError> {
        let target = Target::parse(&self.url)?;
        let count_ok = |flag: &'static str, v: u64| {
            if v == 0 || v > 10_000_000 {
                Err(BenchError::invalid(flag, "must be between 1 and 10000000"))
            } else {
                Ok(())
            }
        };
        match self.scenario {
            Scenario::Echo | Scenario::Connect | Scenario::Idle => count_ok("connections", self.connections)?,
            Scenario::Fanout => {
                count_ok("subscribers", self.subscribers)?;
                count_ok("publishers", self.publishers)?;
                if self.publishers > u64::from(u32::MAX) {
                    return Err(BenchError::invalid("publishers", "too many"));
                }
            }
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return Err(BenchError::invalid("rate", "must be 0 (as fast as possible) or a positive number"));
        }
        if self.window == 0 || self.window > 1_000_000 {
            return Err(BenchError::invalid("window", "must be between 1 and 1000000"));
        }
        let min = self.min_size();
        if self.size < min || self.size > 64 << 20 {
            return Err(BenchError::invalid(
                "size",
                format!(
                    "must be between {min} and {} bytes for {} (the payload carries a timestamp{})",
                    64 << 20,
                    self.scenario.name(),
                    if self.scenario == Scenario::Fanout { ", publisher id and sequence number" } else { "" }
                ),
            ));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(24 * 3600) {
            return Err(BenchError::invalid("duration", "must be more than 0 and at most 24h"));
        }
        if self.warmup > Duration::from_secs(3600) {
            return Err(BenchError::invalid("warmup", "at most 1h"));
        }
        if self.connect_timeout.is_zero() {
            return Err(BenchError::invalid("connect-timeout", "must be more than 0"));
        }
        if self.processes == 0 || self.processes > 256 {
            return Err(BenchError::invalid("processes", "must be between 1 and 256"));
        }
        if self.api_key.is_some() && self.protocol != Protocol::Centrifuge {
            return Err(BenchError::invalid("api-key", "only applies to --protocol centrifuge"));
        }
        if !self.sub_urls.is_empty() {
            if self.scenario != Scenario::Fanout || self.protocol == Protocol::Tcp {
                return Err(BenchError::invalid("urls", "applies to fanout over WebSocket (raw or centrifuge)"));
            }
            for u in &self.sub_urls {
                Target::parse(u).map_err(|e| BenchError::invalid("urls", e.to_string()))?;
            }
        }
        let tcp_url = self.url.starts_with("tcp://");
        if tcp_url != (self.protocol == Protocol::Tcp) {
            return Err(BenchError::invalid(
                "protocol",
                "--protocol tcp takes a tcp://HOST:PORT URL, and a tcp:// URL takes --protocol tcp",
            ));
        }
        if self.protocol == Protocol::Tcp {
            if !matches!(self.scenario, Scenario::Fanout | Scenario::Idle) {
                return Err(BenchError::invalid("protocol", "tcp applies to fanout and idle"));
            }
            if self.scenario == Scenario::Fanout && self.rate == 0.0 {
                return Err(BenchError::invalid(
                    "rate",
                    "--protocol tcp publishes at a rate (the windowed mode, --rate 0, is WebSocket only)",
                ));
            }
        }
        if let Some(ip) = self.source_ips.iter().find(|ip| ip.is_ipv4() != target_is_v4(&target)) {
            if target_is_literal(&target) {
                return Err(BenchError::invalid(
                    "source-ips",
                    format!("{ip} is not of the same family as {}", target.host),
                ));
            }
        }
        Ok(target)
    }

    /// The smallest payload that can carry what the scenario puts in it.
    pub fn min_size(&self) -> usize {
        match (self.scenario, self.protocol) {
            (Scenario::Echo, _) => crate::payload::ECHO_HEADER,
            (Scenario::Fanout, Protocol::Raw | Protocol::Tcp) => crate::payload::FANOUT_HEADER,
            (Scenario::Fanout, Protocol::Centrifuge) => 1,
            _ => 1,
        }
    }

    /// Connections this run opens in all (for the progress line and limits).
    pub fn total_connections(&self) -> u64 {
        match self.scenario {
            Scenario::Fanout => self.subscribers + if self.api_key.is_some() { 0 } else { self.publishers },
            _ => self.connections,
        }
    }
}

fn target_is_literal(t: &Target) -> bool {
    t.host.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>().is_ok()
}

fn target_is_v4(t: &Target) -> bool {
    t.host.parse::<Ipv4Addr>().is_ok()
}

/// A parsed `ws://` (or `tcp://`) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host as written (IPv6 literals keep their brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `wss://`.
    pub tls: bool,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, BenchError> {
        let bad = |m: &str| BenchError::invalid("url", format!("{url:?}: {m}"));
        let (rest, tls) = if let Some(r) = url.strip_prefix("ws://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (r, true)
        } else if let Some(r) = url.strip_prefix("tcp://") {
            if r.contains(['/', '?']) {
                return Err(bad("a tcp:// URL is tcp://host:port, without a path"));
            }
            (r, false)
        } else {
            return Err(bad("expected ws://host[:port][/path], wss://host[:port][/path] or tcp://host:port"));
        };
        let default_port = if tls { 443 } else { 80 };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed '[' in host"))?;
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after the host")),
            };
            (format!("[{}]", &v6[..end]), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Target { host, port, path, tls })
    }

    /// The Host header: the host, with the port unless it is the scheme's default.
    pub fn host_header(&self) -> String {
        if self.port == if self.tls { 443 } else { 80 } {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host once; a literal address is used as is. Prefers the family of `prefer_v4`.
    pub async fn resolve(&self, prefer_v4: Option<bool>) -> Result<SocketAddr, BenchError> {
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, self.port))
            .await
            .map_err(|e| BenchError::Resolve { host: self.host.clone(), message: e.to_string() })?
            .collect();
        let pick = match prefer_v4 {
            Some(v4) => addrs.iter().find(|a| a.is_ipv4() == v4).or(addrs.first()),
            None => addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()),
        };
        pick.copied().ok_or_else(|| BenchError::Resolve { host: self.host.clone(), message: "no addresses".into() })
    }
}

/// Parses `127.0.0.1-127.0.0.8`, `10.0.0.1,10.0.0.2`, or a mix: a comma-separated list of addresses and
/// inclusive IPv4 ranges.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, BenchError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let bad = || {
                BenchError::invalid("source-ips", format!("{item:?}: expected an IPv4 range like 127.0.0.1-127.0.0.8"))
            };
            let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
            let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a >= 65_536 {
                return Err(BenchError::invalid(
                    "source-ips",
                    format!("{item:?}: empty or larger than 65536 addresses"),
                ));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip: IpAddr = item
                .parse()
                .map_err(|_| BenchError::invalid("source-ips", format!("{item:?} is not an IP address")))?;
            out.push(ip);
        }
    }
    if out.is_empty() {
        return Err(BenchError::invalid("source-ips", "no addresses given"));
    }
    Ok(out)
}

/// Parses a duration: a plain number is seconds (`5`, `0.5`), otherwise humantime (`500ms`, `2m`).
pub fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, BenchError> {
    if let Ok(secs) = s.trim().parse::<f64>() {
        if (0.0..1e9).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(BenchError::invalid(flag, format!("{s:?} is not a valid duration")));
    }
    humantime::parse_duration(s.trim()).map_err(|e| BenchError::invalid(flag, format!("{s:?}: {e}")))
}

/// Durations as fractional seconds in JSON (`"duration": 5.0`), readable next to the figures.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=1e12).contains(&v) {
            return Err(serde::de::Error::custom("duration out of range"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_endpoint_implies_the_centrifugo_protocol() {
        assert_eq!(Protocol::for_url("ws://127.0.0.1:8000/connection/websocket"), Protocol::Centrifuge);
        assert_eq!(Protocol::for_url("ws://127.0.0.1:8000/connection/websocket?x=1"), Protocol::Centrifuge);
        assert_eq!(Protocol::for_url("ws://127.0.0.1:8000/echo"), Protocol::Raw);
        assert_eq!(Protocol::for_url("ws://127.0.0.1:8000"), Protocol::Raw);
        assert_eq!(Protocol::for_url("tcp://127.0.0.1:7070"), Protocol::Tcp);
    }

    #[test]
    fn the_tcp_protocol_takes_a_tcp_url_and_a_rate() {
        let t = Target::parse("tcp://127.0.0.1:7070").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7070));
        assert!(Target::parse("tcp://127.0.0.1:7070/x").is_err());
        let mut p = Params::new(Scenario::Fanout, "tcp://127.0.0.1:7070");
        p.protocol = Protocol::Tcp;
        assert!(p.validate().is_ok());
        p.rate = 0.0;
        assert!(p.validate().unwrap_err().to_string().starts_with("--rate"));
        p.protocol = Protocol::Raw;
        assert!(p.validate().unwrap_err().to_string().starts_with("--protocol"));
        let mut p = Params::new(Scenario::Echo, "tcp://127.0.0.1:7070");
        p.protocol = Protocol::Tcp;
        assert!(p.validate().unwrap_err().to_string().starts_with("--protocol"));
    }

    #[test]
    fn subscriber_urls_are_checked_and_only_for_websocket_fanout() {
        let mut p = Params::new(Scenario::Fanout, "ws://127.0.0.1:8000/connection/websocket");
        p.protocol = Protocol::Centrifuge;
        p.sub_urls = vec!["ws://127.0.0.1:8001/connection/websocket".into()];
        assert!(p.validate().is_ok());
        p.sub_urls.push("http://x".into());
        assert!(p.validate().is_err());
        let mut e = Params::new(Scenario::Echo, "ws://127.0.0.1:8000/echo");
        e.sub_urls = vec!["ws://127.0.0.1:8001/echo".into()];
        assert!(e.validate().is_err());
    }

    #[test]
    fn urls_parse_with_defaults() {
        let t = Target::parse("ws://127.0.0.1:8000/echo").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("127.0.0.1", 8000, "/echo"));
        assert_eq!(t.host_header(), "127.0.0.1:8000");
        let t = Target::parse("ws://localhost").unwrap();
        assert_eq!((t.port, t.path.as_str(), t.host_header().as_str()), (80, "/", "localhost"));
        let t = Target::parse("ws://[::1]:9000?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("[::1]", 9000, "/?x=1"));
        let t = Target::parse("wss://localhost:8443/connection/websocket").unwrap();
        assert_eq!((t.tls, t.port, t.host_header().as_str()), (true, 8443, "localhost:8443"));
        let t = Target::parse("wss://example.org").unwrap();
        assert_eq!((t.tls, t.port, t.host_header().as_str()), (true, 443, "example.org"));
        assert!(!Target::parse("ws://x").unwrap().tls);
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("ws://:80/").is_err());
        assert!(Target::parse("ws://h:99999/").is_err());
    }

    #[test]
    fn source_ranges_expand() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.8").unwrap();
        assert_eq!(ips.len(), 8);
        assert_eq!(ips[7], "127.0.0.8".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.1, ::1").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("nope").is_err());
    }

    #[test]
    fn durations_accept_seconds_and_humantime() {
        assert_eq!(parse_duration("duration", "5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("duration", "0.25").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("duration", "1500ms").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("duration", "-1").is_err());
        assert!(parse_duration("duration", "soon").is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let mut p = Params::new(Scenario::Echo, "ws://127.0.0.1:1/");
        p.size = 4;
        assert!(p.validate().unwrap_err().to_string().starts_with("--size"));
        let mut p = Params::new(Scenario::Fanout, "ws://127.0.0.1:1/");
        p.api_key = Some("k".into());
        assert!(p.validate().unwrap_err().to_string().starts_with("--api-key"));
    }
}
