//! One snapshot of what the server is doing, made once a second by one sampler task and shared by
//! every viewer.
//!
//! Nothing here is on the hot path, and nothing on the hot path was added for it: counters and gauges
//! are read from the Prometheus recorder's own render (the text `/metrics` serves, parsed here), the
//! publish-to-delivery latency from its atomic buckets (`metrics::delivery_counts`), the busiest
//! channels from the hub's per-channel atomic counts under each shard's read lock in turn (never a
//! channel's mutex; at most [`MAX_SCAN`] channels), and memory and CPU from `/proc/self`. Rates and
//! percentiles are differences between two snapshots, over the time between them.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

use crate::metrics::{self as m, DELIVERY_BUCKET_COUNT, PUBLISH_DELIVERY_BUCKETS};
use crate::pubsub::node::Node;

/// Channels listed as busiest.
pub const TOP_CHANNELS: usize = 10;
/// Most channels one snapshot looks at for the busiest ones: the scan's cost bound.
pub const MAX_SCAN: usize = 100_000;

/// The Linux clock tick `/proc/self/stat` counts CPU time in (USER_HZ: 100 on every architecture
/// the kernel exports it for).
const USER_HZ: f64 = 100.0;

/// Cumulative figures, kept from one snapshot to the next for rates.
#[derive(Debug, Clone)]
struct Totals {
    at: Instant,
    messages_in: f64,
    messages_out: f64,
    bytes_in: f64,
    bytes_out: f64,
    slow: f64,
    delivery: [u64; DELIVERY_BUCKET_COUNT],
    cpu_ticks: Option<u64>,
}

/// What the sampler keeps between snapshots.
#[derive(Debug, Default)]
pub struct Sampler {
    last: Option<Totals>,
}

/// The figures of one `/metrics` render the dashboard shows.
#[derive(Debug, Default)]
struct Scraped {
    ws_connections: f64,
    tcp_connections: f64,
    subscriptions: f64,
    messages_in: f64,
    messages_out: f64,
    bytes_in: f64,
    bytes_out: f64,
    slow: f64,
    drops: f64,
    /// Refusals by kind, then reason.
    refusals: BTreeMap<&'static str, BTreeMap<String, f64>>,
}

/// `name{labels} value` → (name, the value of the one label we group by, value).
fn parse_line(line: &str) -> Option<(&str, Option<&str>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    match series.split_once('{') {
        None => Some((series, None, value)),
        Some((name, labels)) => {
            // Each metric we group has exactly one label: `key="value"}`.
            let label = labels.split_once("=\"").and_then(|(_, rest)| rest.split_once('"')).map(|(v, _)| v);
            Some((name, label, value))
        }
    }
}

fn scrape(text: &str) -> Scraped {
    let mut s = Scraped::default();
    for (name, label, v) in text.lines().filter_map(parse_line) {
        let kind = match name {
            m::WS_CONNECTIONS => {
                s.ws_connections = v;
                continue;
            }
            crate::tcp::connection::TCP_CONNECTIONS => {
                s.tcp_connections = v;
                continue;
            }
            m::SUBSCRIPTIONS => {
                s.subscriptions = v;
                continue;
            }
            m::MESSAGES_IN_TOTAL => {
                s.messages_in = v;
                continue;
            }
            m::MESSAGES_OUT_TOTAL => {
                s.messages_out = v;
                continue;
            }
            m::BYTES_IN_TOTAL => {
                s.bytes_in = v;
                continue;
            }
            m::BYTES_OUT_TOTAL => {
                s.bytes_out = v;
                continue;
            }
            m::SLOW_DISCONNECTS_TOTAL => {
                s.slow = v;
                continue;
            }
            m::QUEUE_DROPS_TOTAL => {
                s.drops = v;
                continue;
            }
            m::ADMISSION_REFUSALS_TOTAL => "admission",
            m::HANDSHAKE_FAILURES_TOTAL => "handshake",
            m::API_REJECTED_TOTAL => "api",
            _ => continue,
        };
        *s.refusals.entry(kind).or_default().entry(label.unwrap_or("").to_string()).or_default() += v;
    }
    s
}

/// The latency (seconds) below which `q` of the samples in `buckets` fall, interpolated linearly
/// inside its bucket; the +Inf bucket reads as its lower bound. `None` without samples.
fn percentile(buckets: &[u64; DELIVERY_BUCKET_COUNT], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { PUBLISH_DELIVERY_BUCKETS[i - 1] };
            let Some(&upper) = PUBLISH_DELIVERY_BUCKETS.get(i) else { return Some(lower) };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        below += n;
    }
    PUBLISH_DELIVERY_BUCKETS.last().copied()
}

/// (resident bytes, CPU ticks used, threads) of this process, from `/proc/self`.
fn process() -> (Option<u64>, Option<u64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may contain spaces), from field 3 ("state") on.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu = field(14).zip(field(15)).map(|(u, s)| u + s);
    (rss, cpu, field(20))
}

impl Sampler {
    /// A snapshot of now, as the JSON object the dashboard reads (documented in the README).
    pub fn sample(&mut self, node: &Node, engine: Value) -> Value {
        let text = crate::metrics::install().map(|h| h.render()).unwrap_or_default();
        let s = scrape(&text);
        let (rss, cpu_ticks, threads) = process();
        let now = Totals {
            at: Instant::now(),
            messages_in: s.messages_in,
            messages_out: s.messages_out,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            slow: s.slow,
            delivery: crate::metrics::delivery_counts(),
            cpu_ticks,
        };
        let prev = self.last.replace(now.clone()).unwrap_or_else(|| now.clone());
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        let rate = |a: f64, b: f64| if secs > 0.0 { ((a - b) / secs).max(0.0) } else { 0.0 };
        let window: [u64; DELIVERY_BUCKET_COUNT] =
            std::array::from_fn(|i| now.delivery[i].saturating_sub(prev.delivery[i]));
        let ms = |q: f64| percentile(&window, q).map(|s| s * 1000.0);
        let cpu = match (now.cpu_ticks, prev.cpu_ticks) {
            (Some(a), Some(b)) if secs > 0.0 => Some(a.saturating_sub(b) as f64 / USER_HZ / secs * 100.0),
            _ => None,
        };
        let (top, scanned, truncated) = node.hub.top_channels(TOP_CHANNELS, MAX_SCAN);
        let top: Vec<Value> = top.iter().map(|(name, n)| json!({ "channel": &**name, "subscribers": n })).collect();
        let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        json!({
            "time_ms": unix_ms as u64,
            "node": { "name": node.name, "uid": node.uid, "uptime_s": node.started.elapsed().as_secs() },
            "interval_s": secs,
            "connections": { "websocket": s.ws_connections, "tcp": s.tcp_connections },
            "subscriptions": s.subscriptions,
            "channels": { "total": scanned, "truncated": truncated, "top": top },
            "rates": {
                "messages_in": rate(s.messages_in, prev.messages_in),
                "messages_out": rate(s.messages_out, prev.messages_out),
                "deliveries": window.iter().sum::<u64>() as f64 / if secs > 0.0 { secs } else { 1.0 },
                "bytes_in": rate(s.bytes_in, prev.bytes_in),
                "bytes_out": rate(s.bytes_out, prev.bytes_out),
                "slow_disconnects": rate(s.slow, prev.slow),
            },
            "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "samples": window.iter().sum::<u64>() },
            "totals": {
                "messages_in": s.messages_in,
                "messages_out": s.messages_out,
                "slow_disconnects": s.slow,
                "queue_drops": s.drops,
            },
            "refusals": s.refusals,
            "engine": engine,
            "process": {
                "rss_bytes": rss,
                "cpu_percent": cpu,
                "cpu_seconds": now.cpu_ticks.map(|t| t as f64 / USER_HZ),
                "threads": threads,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_reads_gauges_counters_and_refusals_by_reason() {
        let text =
            "# HELP ringcast_ws_connections x\n# TYPE ringcast_ws_connections gauge\nringcast_ws_connections 7\n\
            ringcast_messages_out_total 1200\n\
            ringcast_admission_refusals_total{reason=\"connect_rate\"} 3\n\
            ringcast_admission_refusals_total{reason=\"max_connections\"} 2\n\
            ringcast_handshake_failures_total{reason=\"origin\"} 1\n\
            ringcast_tcp_ping_rtt_seconds{quantile=\"0.5\"} 0.001\n";
        let s = scrape(text);
        assert_eq!(s.ws_connections, 7.0);
        assert_eq!(s.messages_out, 1200.0);
        assert_eq!(s.refusals["admission"]["connect_rate"], 3.0);
        assert_eq!(s.refusals["admission"]["max_connections"], 2.0);
        assert_eq!(s.refusals["handshake"]["origin"], 1.0);
        assert!(!s.refusals.contains_key("api"));
    }

    #[test]
    fn percentiles_interpolate_inside_buckets() {
        let mut b = [0u64; DELIVERY_BUCKET_COUNT];
        assert_eq!(percentile(&b, 0.5), None);
        b[0] = 50; // ≤ 0.5 ms
        b[1] = 50; // 0.5–1 ms
        assert_eq!(percentile(&b, 0.5), Some(0.0005));
        let p99 = percentile(&b, 0.99).unwrap();
        assert!((p99 - 0.00099).abs() < 1e-9, "{p99}");
        b[DELIVERY_BUCKET_COUNT - 1] = 900; // beyond the last bound
        assert_eq!(percentile(&b, 0.99), Some(2.5));
    }

    #[test]
    fn process_figures_come_from_proc() {
        let (rss, cpu, threads) = process();
        assert!(rss.is_some_and(|r| r > 0), "{rss:?}");
        assert!(cpu.is_some());
        assert!(threads.is_some_and(|t| t >= 1));
    }
}
