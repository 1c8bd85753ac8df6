//! Why a connection failed, and how many failed each way.
//!
//! When a target misbehaves, "it failed" is useless and "1,000 refused" or "37 × HTTP 503, 12 timeouts"
//! is the answer. Every failure of a connection (to connect, to upgrade, or later) is classified once,
//! here, into a small set of kinds; [`Failures`] counts them and keeps the first detail of each kind so
//! the report can show an example (`protocol: server frame is masked`).

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

/// One failed connection (or connection attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// TCP connection refused: nothing listens there.
    Refused,
    /// No answer within the connect timeout (TCP, upgrade, or protocol setup).
    Timeout,
    /// The server answered the upgrade with this HTTP status instead of 101.
    Status(u16),
    /// The server's admission control turned the upgrade away (429 or 503): the server is up and
    /// protecting itself, which a report must not mix up with it misbehaving. `Retry-After` in seconds.
    Rejected { status: u16, retry_after: Option<u64> },
    /// The same for a TCP protocol connection: the server's first frame was ERROR `code` (12 server
    /// unavailable; 9 for the connect rate), then it closed; the wait its message asked for.
    TcpRejected { code: u16, retry_after: Option<u64> },
    /// The server broke the WebSocket (or Centrifugo) protocol, or refused a command.
    Protocol(String),
    /// The server closed the connection (TCP EOF or reset, or a close frame) before we were done.
    Closed(String),
    /// Out of a local resource: file descriptors, ephemeral ports, memory.
    Local(String),
    /// Any other IO error.
    Io(String),
}

impl Failure {
    /// The stable label this failure is counted under.
    pub fn label(&self) -> String {
        match self {
            Failure::Refused => "refused".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Status(code) => format!("http_{code}"),
            Failure::Rejected { status, .. } => format!("rejected_{status}"),
            Failure::TcpRejected { code, .. } => format!("rejected_tcp_error_{code}"),
            Failure::Protocol(_) => "protocol".into(),
            Failure::Closed(_) => "closed".into(),
            Failure::Local(_) => "local".into(),
            Failure::Io(_) => "io".into(),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Failure::Refused => "connection refused".into(),
            Failure::Timeout => "timed out".into(),
            Failure::Status(code) => format!("server answered the upgrade with HTTP {code}"),
            Failure::Rejected { status, retry_after: Some(s) } => {
                format!("server refused the upgrade: HTTP {status}, Retry-After {s}s")
            }
            Failure::Rejected { status, retry_after: None } => format!("server refused the upgrade: HTTP {status}"),
            Failure::TcpRejected { code, retry_after: Some(s) } => {
                format!("server refused the connection: ERROR {code}, retry after {s}s")
            }
            Failure::TcpRejected { code, retry_after: None } => format!("server refused the connection: ERROR {code}"),
            Failure::Protocol(m) | Failure::Closed(m) | Failure::Local(m) | Failure::Io(m) => m.clone(),
        }
    }
}

/// What a non-101 answer to an upgrade is: 429 and 503 are refusals (with their `Retry-After`, read from
/// the response head), any other status a failure.
pub fn upgrade_status(code: u16, head: &[u8]) -> Failure {
    if code != 429 && code != 503 {
        return Failure::Status(code);
    }
    let retry_after = head.split(|&b| b == b'\n').find_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("retry-after").then(|| value.trim().parse().ok())?
    });
    Failure::Rejected { status: code, retry_after }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        classify(&e)
    }
}

/// Classifies an IO error.
pub fn classify(e: &io::Error) -> Failure {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Failure::Refused,
        K::TimedOut | K::WouldBlock => Failure::Timeout,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => Failure::Closed(format!("{e}")),
        K::AddrNotAvailable | K::AddrInUse | K::OutOfMemory => Failure::Local(local_hint(e)),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                Failure::Local(local_hint(e))
            }
            Some(libc::ETIMEDOUT) => Failure::Timeout,
            _ => Failure::Io(e.to_string()),
        },
    }
}

fn local_hint(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => {
            format!("{e} (open-file limit: use fewer connections per process, or --processes)")
        }
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => {
            format!("{e} (out of ephemeral ports: spread over --source-ips 127.0.0.1-127.0.0.8)")
        }
        _ => e.to_string(),
    }
}

/// Failure counts by label, with the first detail seen for each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    pub counts: BTreeMap<String, u64>,
    pub examples: BTreeMap<String, String>,
}

impl Failures {
    pub fn add(&mut self, f: &Failure) {
        let label = f.label();
        *self.counts.entry(label.clone()).or_insert(0) += 1;
        self.examples.entry(label).or_insert_with(|| f.detail());
    }

    pub fn merge(&mut self, other: &Failures) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &other.examples {
            self.examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn count(&self, label: &str) -> u64 {
        self.counts.get(label).copied().unwrap_or(0)
    }

    /// Connections the server's admission control turned away (HTTP 429/503, TCP ERROR 12 or 9 at accept).
    pub fn rejected(&self) -> u64 {
        self.counts.iter().filter(|(k, _)| k.starts_with("rejected_")).map(|(_, v)| v).sum()
    }

    /// `refused 100, http_404 3 (server answered the upgrade with HTTP 404)`, or `none`.
    pub fn summary(&self) -> String {
        if self.counts.is_empty() {
            return "none".into();
        }
        self.counts
            .iter()
            .map(|(k, v)| match self.examples.get(k) {
                Some(ex) if k != "refused" && k != "timeout" => format!("{k} {v} ({ex})"),
                _ => format!("{k} {v}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_counted_with_an_example() {
        let mut f = Failures::default();
        f.add(&classify(&io::Error::from(io::ErrorKind::ConnectionRefused)));
        f.add(&Failure::Status(404));
        f.add(&Failure::Status(404));
        f.add(&Failure::Status(503));
        f.add(&classify(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert_eq!(f.count("refused"), 1);
        assert_eq!(f.count("http_404"), 2);
        assert_eq!(f.count("local"), 1);
        assert_eq!(f.total(), 5);
        assert!(f.summary().contains("--processes"), "{}", f.summary());
        let mut g = Failures::default();
        g.merge(&f);
        g.merge(&f);
        assert_eq!(g.count("http_404"), 4);
    }

    #[test]
    fn admission_refusals_are_counted_apart_with_their_retry_after() {
        let head = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\nContent-Length: 0\r\n\r\n";
        let f = upgrade_status(429, head);
        assert_eq!(f, Failure::Rejected { status: 429, retry_after: Some(3) });
        assert_eq!(f.label(), "rejected_429");
        assert!(f.detail().contains("Retry-After 3s"), "{}", f.detail());
        assert_eq!(upgrade_status(503, b"HTTP/1.1 503 Service Unavailable\r\n\r\n").label(), "rejected_503");
        let mut all = Failures::default();
        all.add(&f);
        all.add(&Failure::TcpRejected { code: 12, retry_after: Some(1) });
        all.add(&Failure::Status(404));
        assert_eq!(all.rejected(), 2);
        assert_eq!(all.count("rejected_tcp_error_12"), 1);
        assert_eq!(upgrade_status(404, b"HTTP/1.1 404 Not Found\r\n\r\n"), Failure::Status(404));
    }
}
