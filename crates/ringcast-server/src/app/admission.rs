//! Admission: whether a new connection is let in — a WebSocket upgrade request, decided before the 101
//! and answered with plain HTTP when it is not, or a TCP binary-protocol connection (`tcp_listen`),
//! decided as it is accepted and answered with an ERROR frame (docs/tcp-protocol.md: 9 for the connect
//! rate, 12 for the other limits) before it is closed.
//!
//! Both transports share one set of counts: `max_connections` bounds the node's client connections,
//! whichever listener they came through, and an address's connections and connect tokens are the same
//! whether it opens WebSockets or TCP connections (an operator sizing the node for N sockets means N).
//! Refusals are counted by transport as well as by reason.
//!
//! Four limits, checked in this order (cheapest and node-wide first):
//! * memory: while the process is over `memory_high_watermark` (and until it is back below
//!   `memory_low_watermark`), every upgrade is refused 503 (`app::memory` samples RSS and sets the
//!   flag read here).
//! * `max_connections`: client connections (WebSocket and TCP) the node holds; one more is refused 503.
//! * `client_max_connections_per_ip`: connections one source address holds; one more is refused 503.
//! * `client_connect_rate` / `client_connect_burst`: a token bucket per source address (the governor
//!   crate's GCRA); an upgrade without a token is refused 429, `Retry-After` saying when one is due.
//!
//! A source address is an IPv4 address (/32) or an IPv6 /64 (one subscriber's prefix: counting whole
//! IPv6 addresses would let one host take as many as it likes). The counts are reserved before the rate
//! is checked and given back if a later check refuses, so a refused request holds nothing and only
//! admitted upgrades spend tokens. Every count is exact: a reservation is a compare-and-swap, never a
//! blind add that a concurrent refusal would have to take back.
//!
//! What this module refuses to do: keep state per connection. An admitted connection is given back with
//! [`Admission::release`] when it ends (the connection knows it was admitted because it has an endpoint,
//! and its address because it keeps the [`IpKey`] — see `ws::connection`). Refusals are counted by
//! reason and transport (`ringcast_admission_refusals_total`) and logged at most once a second, so a
//! storm does not turn into a log storm.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ringcast_wire::tcp::{Command, ErrorCode};

use crate::app::config::Config;
use crate::app::memory::{Memory, Watermarks};

/// Seconds a client refused for a full node (or a full address) is told to wait. Not derived from
/// anything: a connection may free up any moment; SDKs add their own backoff and jitter.
pub const FULL_RETRY_AFTER_SECS: u64 = 1;

/// Shards of the per-address counts (a storm from many addresses spreads over their locks).
const SHARDS: usize = 16;

/// A source address as admission counts it: an IPv4 address, or the /64 prefix of an IPv6 one, in 8
/// bytes that are never zero (so `Option<IpKey>` is 8 bytes too, in every connection's future). An IPv6
/// prefix is its 64 bits; an IPv4 (or IPv4-mapped IPv6) address is its 32 bits with bit 32 set, and the
/// IPv6 prefix `::/64` (where `::1` lives) is `2 << 32`. Both stand where IPv6 prefixes whose first 31
/// bits are zero would: the reserved `::/8`, never a client's source address but for `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(NonZeroU64);

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        let key = match ip {
            IpAddr::V4(v4) => (1 << 32) | u64::from(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (1 << 32) | u64::from(u32::from(v4)),
                None => match (u128::from(v6) >> 64) as u64 {
                    0 => 2 << 32,
                    prefix => prefix,
                },
            },
        };
        IpKey(NonZeroU64::new(key).unwrap_or(NonZeroU64::MIN))
    }
}

/// Which listener a connection came through (the `transport` label of the refusal metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `listen`: a WebSocket upgrade (plain or TLS).
    WebSocket,
    /// `tcp_listen`: the TCP binary protocol.
    Tcp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Tcp => "tcp",
        }
    }
}

/// Why an upgrade request was refused: its HTTP status, its metric label and its `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached: 503.
    NodeFull,
    /// `client_max_connections_per_ip` reached for this address: 503.
    AddressFull,
    /// `client_connect_rate` exceeded for this address: 429, retry after this many seconds (≥ 1).
    Rate { retry_after_secs: u64 },
    /// Over the memory watermark (`memory_high_watermark`, until below `memory_low_watermark`): 503.
    Memory,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::NodeFull | Refusal::AddressFull | Refusal::Memory => 503,
            Refusal::Rate { .. } => 429,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Refusal::NodeFull => "max_connections",
            Refusal::AddressFull => "max_connections_per_ip",
            Refusal::Rate { .. } => "connect_rate",
            Refusal::Memory => "memory",
        }
    }

    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refusal::NodeFull | Refusal::AddressFull => FULL_RETRY_AFTER_SECS,
            Refusal::Rate { retry_after_secs } => retry_after_secs,
            Refusal::Memory => crate::app::memory::MEMORY_RETRY_AFTER_SECS,
        }
    }

    /// The complete HTTP response.
    pub fn response(self) -> Bytes {
        let reason = match self.status() {
            429 => "Too Many Requests",
            _ => "Service Unavailable",
        };
        Bytes::from(format!(
            "HTTP/1.1 {} {reason}\r\nRetry-After: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.status(),
            self.retry_after_secs()
        ))
    }

    /// The TCP binary protocol's answer: one ERROR frame, 9 (rate limited) for the connect rate and 12
    /// (server unavailable) for the rest, its message naming the limit and the seconds to wait.
    pub fn tcp_frame(self) -> Bytes {
        let code = match self {
            Refusal::Rate { .. } => ErrorCode::RATE_LIMITED,
            Refusal::NodeFull | Refusal::AddressFull | Refusal::Memory => ErrorCode::UNAVAILABLE,
        };
        let message = format!("{}: retry after {} s", self.label(), self.retry_after_secs());
        let mut frame = BytesMut::new();
        if let Err(e) = (Command::Error { code, message: &message }).encode(&mut frame) {
            // Cannot happen (a short message); the close alone still says "go away".
            tracing::warn!(error = %e, "tcp refusal not encodable");
        }
        frame.freeze()
    }
}

type ConnectLimiter = RateLimiter<IpKey, DefaultKeyedStateStore<IpKey>, DefaultClock>;

/// The node's admission state; one per [`crate::app::context::Context`].
pub struct Admission {
    max_connections: usize,
    /// Connections (WebSocket and TCP) admitted and not yet released.
    live: AtomicUsize,
    per_ip_max: u32,
    /// Connections per address, for `client_max_connections_per_ip` (empty when it is 0). An address
    /// is removed when its last connection ends, so the map holds only addresses that are connected.
    per_ip: Box<[Mutex<HashMap<IpKey, u32>>]>,
    connect: Option<(ConnectLimiter, DefaultClock)>,
    /// The memory watermarks and whether the node is over them now.
    pub memory: Memory,
    /// When a refusal was last logged (milliseconds on the deadline clock), and how many were not.
    last_log_ms: AtomicU32,
    unlogged: AtomicU64,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max_connections", &self.max_connections)
            .field("live", &self.live.load(Ordering::Relaxed))
            .field("per_ip_max", &self.per_ip_max)
            .field("connect_rate", &self.connect.is_some())
            .finish()
    }
}

impl Admission {
    pub fn new(config: &Config) -> Admission {
        let connect = NonZeroU32::new(config.client_connect_rate).map(|rate| {
            let burst = NonZeroU32::new(config.client_connect_burst).unwrap_or(rate);
            let clock = DefaultClock::default();
            let limiter = RateLimiter::dashmap_with_clock(Quota::per_second(rate).allow_burst(burst), clock.clone());
            (limiter, clock)
        });
        let shards = if config.client_max_connections_per_ip > 0 { SHARDS } else { 0 };
        Admission {
            max_connections: config.max_connections,
            live: AtomicUsize::new(0),
            per_ip_max: config.client_max_connections_per_ip,
            per_ip: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            connect,
            memory: Memory::new(None),
            last_log_ms: AtomicU32::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Sets the memory watermarks (`Settings::memory`; none: off).
    pub fn with_watermarks(mut self, marks: Option<Watermarks>) -> Admission {
        self.memory = Memory::new(marks);
        self
    }

    /// Admitted connections (WebSocket and TCP) alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Lets a connection from `ip` in (counting it until [`Admission::release`]) or says why not.
    /// `now_ms` (the deadline clock) only paces the log.
    pub fn admit(&self, transport: Transport, ip: IpKey, now_ms: u32) -> Result<(), Refusal> {
        let outcome = self.try_admit(ip);
        if let Err(refusal) = outcome {
            metrics::counter!(
                crate::metrics::ADMISSION_REFUSALS_TOTAL,
                "reason" => refusal.label(),
                "transport" => transport.label()
            )
            .increment(1);
            self.log(refusal, transport, now_ms);
        }
        outcome
    }

    fn try_admit(&self, ip: IpKey) -> Result<(), Refusal> {
        if self.memory.under_pressure() {
            return Err(Refusal::Memory);
        }
        let max = self.max_connections;
        let reserved = self.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            if max == 0 || n < max {
                Some(n + 1)
            } else {
                None
            }
        });
        if reserved.is_err() {
            return Err(Refusal::NodeFull);
        }
        if !self.reserve_ip(ip) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::AddressFull);
        }
        if let Some((limiter, clock)) = &self.connect {
            if let Err(not_until) = limiter.check_key(&ip) {
                self.release(ip);
                let wait = not_until.wait_time_from(clock.now());
                return Err(Refusal::Rate { retry_after_secs: ceil_secs(wait) });
            }
        }
        Ok(())
    }

    /// Gives back what [`Admission::admit`] took for a connection from `ip` that has ended.
    pub fn release(&self, ip: IpKey) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        if let Some(shard) = self.shard(ip) {
            let mut counts = lock(shard);
            if let Some(n) = counts.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }

    /// Forgets rate-limit state of addresses whose buckets are full again (call now and then: the
    /// limiter otherwise keeps an entry for every address that ever connected).
    pub fn prune(&self) {
        if let Some((limiter, _)) = &self.connect {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    fn reserve_ip(&self, ip: IpKey) -> bool {
        let Some(shard) = self.shard(ip) else { return true };
        let mut counts = lock(shard);
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return false;
        }
        *n += 1;
        true
    }

    fn shard(&self, ip: IpKey) -> Option<&Mutex<HashMap<IpKey, u32>>> {
        if self.per_ip.is_empty() {
            return None;
        }
        // Fibonacci hashing: addresses of one subnet differ in their low bits.
        let h = ip.0.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        self.per_ip.get(h as usize % self.per_ip.len())
    }

    /// Logs a refusal, at most once a second (with how many went unlogged since).
    fn log(&self, refusal: Refusal, transport: Transport, now_ms: u32) {
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let due = now_ms.wrapping_sub(last) >= 1000 || last == 0;
        if due && self.last_log_ms.compare_exchange(last, now_ms | 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let unlogged = self.unlogged.swap(0, Ordering::AcqRel);
            tracing::warn!(
                status = refusal.status(),
                reason = refusal.label(),
                transport = transport.label(),
                live = self.live(),
                refused_unlogged = unlogged,
                "refusing connections (logged at most once a second)"
            );
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn lock(m: &Mutex<HashMap<IpKey, u32>>) -> std::sync::MutexGuard<'_, HashMap<IpKey, u32>> {
    // A panic elsewhere mid-update leaves a count at worst one off; keep serving.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` would invite an immediate retry).
fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(f: impl FnOnce(&mut Config)) -> Admission {
        let mut c = Config::default();
        f(&mut c);
        Admission::new(&c)
    }

    fn ip(s: &str) -> IpKey {
        IpKey::of(s.parse().expect("address"))
    }

    #[test]
    fn ipv6_is_counted_by_its_64_bit_prefix_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:127.0.0.2"), ip("127.0.0.2"));
        assert_ne!(ip("127.0.0.2"), ip("127.0.0.3"));
        assert_ne!(ip("::1"), ip("0.0.0.0"));
        assert_eq!(std::mem::size_of::<Option<IpKey>>(), 8);
    }

    #[test]
    fn node_full_refuses_503_until_a_connection_is_released() {
        let a = admission(|c| c.max_connections = 2);
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.1"), 1).is_ok());
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1).is_ok());
        assert_eq!(a.admit(Transport::WebSocket, ip("127.0.0.3"), 1), Err(Refusal::NodeFull));
        assert_eq!(a.live(), 2, "a refusal holds nothing");
        a.release(ip("127.0.0.1"));
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.3"), 1).is_ok());
    }

    #[test]
    fn per_address_limit_counts_each_address_apart() {
        let a = admission(|c| c.client_max_connections_per_ip = 1);
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1).is_ok());
        assert_eq!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1), Err(Refusal::AddressFull));
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.3"), 1).is_ok());
        a.release(ip("127.0.0.2"));
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1).is_ok());
        assert_eq!(a.live(), 2);
    }

    #[test]
    fn connect_rate_refuses_429_after_the_burst_and_spends_no_token_on_refusals() {
        let a = admission(|c| {
            c.client_connect_rate = 1;
            c.client_connect_burst = 2;
            c.max_connections = 3;
        });
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1).is_ok());
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.2"), 1).is_ok());
        match a.admit(Transport::WebSocket, ip("127.0.0.2"), 1) {
            Err(r @ Refusal::Rate { retry_after_secs }) => {
                assert_eq!(r.status(), 429);
                assert!(retry_after_secs >= 1);
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        // Another address has its own bucket.
        assert!(a.admit(Transport::WebSocket, ip("127.0.0.3"), 1).is_ok());
        assert_eq!(a.live(), 3);
    }

    #[test]
    fn responses_carry_status_and_retry_after() {
        let r = Refusal::Rate { retry_after_secs: 3 }.response();
        assert!(r.starts_with(b"HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(r.windows(16).any(|w| w == b"Retry-After: 3\r\n"), "{r:?}");
        let f = Refusal::NodeFull.response();
        assert!(f.starts_with(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"));
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn tcp_refusals_are_one_error_frame_9_for_the_rate_12_for_the_rest() {
        use ringcast_wire::Role;
        let decode = |r: Refusal| {
            let frame = r.tcp_frame();
            assert_eq!(&frame[..3], b"BM\x01");
            let cmd = u16::from_be_bytes([frame[3], frame[4]]);
            let len = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) as usize;
            assert_eq!(frame.len(), 13 + len, "one whole frame");
            match Command::decode(Role::Client, cmd, &frame[13..]).expect("valid ERROR") {
                Command::Error { code, message } => (code, message.to_string()),
                other => panic!("expected ERROR, got {other:?}"),
            }
        };
        assert_eq!(
            decode(Refusal::Rate { retry_after_secs: 3 }),
            (ErrorCode::RATE_LIMITED, "connect_rate: retry after 3 s".to_string())
        );
        assert_eq!(decode(Refusal::NodeFull), (ErrorCode::UNAVAILABLE, "max_connections: retry after 1 s".to_string()));
        assert_eq!(decode(Refusal::AddressFull).0, ErrorCode::UNAVAILABLE);
        assert_eq!(decode(Refusal::Memory).0, ErrorCode::UNAVAILABLE);
    }
}
