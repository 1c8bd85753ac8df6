//! The result of a run: every figure, the parameters that produced it, and its two renderings — the
//! table printed at the end and the JSON written by `--json`.
//!
//! Figures are derived here, in one place, from the merged [`Tally`] and the conductor's server
//! samples, so the table, the JSON and the tests can never disagree about what "loss" or "µs per
//! message" means:
//! * throughput = deliveries *received* in the measured window ÷ its length;
//! * latency = messages *sent* in the window (warm-up excluded), late arrivals included;
//! * loss = expected − received over the whole run, after the drain (echo: sent − echoed; fan-out:
//!   per subscriber, all messages published in all processes − what that subscriber received);
//! * CPU per message = CPU time in the window ÷ deliveries in the window.

use serde::{Deserialize, Serialize};

use crate::failure::Failures;
use crate::histogram::Percentiles;
use crate::params::{Params, Protocol, Scenario};
use crate::scenario::Tally;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    /// The parameters (the API key, if any, redacted).
    pub params: Params,
    /// Length of the measured window, seconds (connect: how long the storm took).
    pub measured_secs: f64,
    pub connections: Connections,
    pub messages: Option<Messages>,
    /// Echo round trip, fan-out delivery, or (connect) handshake latency, for the measured window.
    pub latency: Option<Percentiles>,
    /// TCP connect + upgrade, for every connection opened.
    pub handshake: Option<Percentiles>,
    pub fanout: Option<Fanout>,
    pub memory: Option<Memory>,
    pub cpu: Cpu,
    pub failures: Failures,
    pub timeline: Vec<Second>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connections {
    pub attempted: u64,
    /// Not attempted, because every attempt so far had failed (see `failures`).
    pub skipped: u64,
    pub established: u64,
    pub failed: u64,
    /// Still open when the run stopped (idle: held for the whole duration).
    pub held: u64,
    /// Successful handshakes per second (connect).
    pub per_sec: Option<f64>,
    /// Connections on which the server accepted permessage-deflate (`--compression`; idle, and
    /// fan-out's subscribers).
    #[serde(default)]
    pub compressed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Messages {
    /// Sent (echo) or published (fan-out), whole run.
    pub sent: u64,
    /// Echoed, or delivered to subscribers, whole run.
    pub received: u64,
    /// Expected but not received after the drain.
    pub lost: u64,
    pub out_of_order: u64,
    /// Received messages that were not the generator's.
    pub foreign: u64,
    /// Received inside the measured window.
    pub received_in_window: u64,
    pub per_sec: f64,
    pub bytes_per_sec: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fanout {
    pub published: u64,
    /// Subscribers that connected (and subscribed).
    pub subscribers: u64,
    pub expected_per_subscriber: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub subscribers_with_loss: u64,
    pub max_loss: u64,
    /// Times a windowed publisher waited a whole second for its probe (see scenario::fanout).
    pub window_stalls: u64,
    /// Subscribers whose server accepted permessage-deflate (`--compression`).
    #[serde(default)]
    pub compressed_subscribers: u64,
    /// Bytes subscribers read from their sockets from the start of the run (frames with headers,
    /// compressed or not, plus the few pings), and that ÷ deliveries: what the wire carried per delivery.
    #[serde(default)]
    pub wire_bytes: u64,
    #[serde(default)]
    pub wire_bytes_per_delivery: Option<f64>,
    pub per_subscriber: Vec<SubscriberLoss>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberLoss {
    pub index: u64,
    pub received: u64,
    pub lost: u64,
    pub out_of_order: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub server_rss_before: Option<u64>,
    pub server_rss_after: Option<u64>,
    pub server_bytes_per_connection: Option<f64>,
    pub generator_rss_before: u64,
    pub generator_rss_after: u64,
    pub generator_bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cpu {
    /// The window the CPU figures cover, seconds.
    pub window_secs: f64,
    /// The generator's CPU time (all its processes) in the window.
    pub generator_us: u64,
    pub generator_us_per_message: Option<f64>,
    pub server_pid: Option<u32>,
    pub server_us: Option<u64>,
    pub server_us_per_message: Option<f64>,
}

/// One second of the run (including warm-up).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since load started; covers `(second - 1, second]`.
    pub second: u32,
    pub messages: u64,
    pub bytes: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Failures so far.
    pub errors: u64,
    pub open: u64,
    /// The run's last, shorter-than-a-second interval (drain): its count is not a rate.
    pub partial: bool,
}

/// What the conductor sampled from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSamples {
    pub pid: Option<u32>,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    pub cpu_us: Option<u64>,
}

impl Report {
    pub(crate) fn build(p: &Params, t: &Tally, server: ServerSamples, timeline: Vec<Second>) -> Report {
        let mut params = p.clone();
        if params.api_key.is_some() {
            params.api_key = Some("(redacted)".into());
        }
        let window = p.duration.as_secs_f64();
        let per_window = |n: u64| if window > 0.0 { n as f64 / window } else { 0.0 };
        let failed = t.failures.total();
        let connections = Connections {
            attempted: t.attempted,
            skipped: t.skipped,
            established: t.established,
            failed: t.attempted.saturating_sub(t.established),
            held: t.held,
            per_sec: (p.scenario == Scenario::Connect && t.elapsed_ns > 0)
                .then(|| t.established as f64 / (t.elapsed_ns as f64 / 1e9)),
            compressed: t.deflate,
        };
        let _ = failed;
        let mut fanout = None;
        let messages = match p.scenario {
            Scenario::Echo | Scenario::Fanout => {
                let lost = match p.scenario {
                    Scenario::Echo => t.sent.saturating_sub(t.received),
                    _ => {
                        let f = fanout_figures(t);
                        let lost = f.lost;
                        fanout = Some(f);
                        lost
                    }
                };
                Some(Messages {
                    sent: t.sent,
                    received: t.received,
                    lost,
                    out_of_order: t.out_of_order,
                    foreign: t.foreign,
                    received_in_window: t.received_in_window,
                    per_sec: per_window(t.received_in_window),
                    bytes_per_sec: per_window(t.bytes_in_window),
                })
            }
            Scenario::Connect | Scenario::Idle => None,
        };
        let memory = (p.scenario == Scenario::Idle).then(|| {
            let per_conn = |before: u64, after: u64| {
                (t.established > 0).then(|| (after as f64 - before as f64) / t.established as f64)
            };
            Memory {
                server_rss_before: server.rss_before,
                server_rss_after: server.rss_after,
                server_bytes_per_connection: match (server.rss_before, server.rss_after) {
                    (Some(b), Some(a)) => per_conn(b, a),
                    _ => None,
                },
                generator_rss_before: t.rss_before,
                generator_rss_after: t.rss_after,
                generator_bytes_per_connection: per_conn(t.rss_before, t.rss_after),
            }
        });
        let measured_messages = match p.scenario {
            Scenario::Echo | Scenario::Fanout | Scenario::Connect => t.received_in_window,
            Scenario::Idle => 0,
        };
        let per_message = |us: u64| (measured_messages > 0).then(|| us as f64 / measured_messages as f64);
        let cpu_window = match p.scenario {
            Scenario::Connect => t.elapsed_ns as f64 / 1e9,
            _ => window,
        };
        let cpu = Cpu {
            window_secs: cpu_window,
            generator_us: t.cpu_us,
            generator_us_per_message: per_message(t.cpu_us),
            server_pid: server.pid,
            server_us: server.cpu_us,
            server_us_per_message: server.cpu_us.and_then(per_message),
        };
        Report {
            scenario: p.scenario,
            params,
            measured_secs: if p.scenario == Scenario::Connect { t.elapsed_ns as f64 / 1e9 } else { window },
            connections,
            messages,
            latency: Percentiles::of(&t.latency.0),
            handshake: Percentiles::of(&t.handshake.0),
            fanout,
            memory,
            cpu,
            failures: t.failures.clone(),
            timeline,
        }
    }

    /// Whether the run measured anything at all (the CLI exits non-zero otherwise).
    pub fn measured(&self) -> bool {
        match self.scenario {
            Scenario::Echo | Scenario::Fanout => self.messages.as_ref().is_some_and(|m| m.received > 0),
            Scenario::Connect | Scenario::Idle => self.connections.established > 0,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The final table.
    pub fn table(&self) -> String {
        let p = &self.params;
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            out.push_str(&format!("  {k:<14}{v}\n"));
        };
        let what = match self.scenario {
            Scenario::Echo => format!(
                "{} connections · window {} · {} B{}",
                count(p.connections),
                p.window,
                p.size,
                rate_text(p.rate)
            ),
            Scenario::Fanout => format!(
                "{} subscribers · {} publishers · {} B{} · {}{}",
                count(p.subscribers),
                count(p.publishers),
                p.size,
                if p.rate > 0.0 { rate_text(p.rate) } else { format!(" · window {}", p.window) },
                match p.protocol {
                    Protocol::Raw => "raw",
                    Protocol::Centrifuge => "centrifuge",
                    Protocol::Tcp => "tcp",
                },
                if p.api_key.is_some() { " (HTTP API publish)" } else { "" }
            ),
            Scenario::Connect => format!(
                "up to {} connections · {} handshakes in flight{}",
                count(p.connections),
                p.window,
                rate_text(p.rate)
            ),
            Scenario::Idle => format!("{} connections held", count(p.connections)),
        };
        let timing = match self.scenario {
            Scenario::Echo | Scenario::Fanout => {
                format!("{:.1} s measured after {:.1} s warm-up", p.duration.as_secs_f64(), p.warmup.as_secs_f64())
            }
            Scenario::Connect => {
                format!("storm took {:.2} s (limit {:.1} s)", self.measured_secs, p.duration.as_secs_f64())
            }
            Scenario::Idle => format!("held {:.1} s", p.duration.as_secs_f64()),
        };
        let procs = if p.processes > 1 { format!(" · {} processes", p.processes) } else { String::new() };
        let header = format!("ringcast bench {}  {}\n  {what} · {timing}{procs}\n\n", self.scenario.name(), p.url);
        let c = &self.connections;
        let mut conn = format!("{} established of {}", count(c.established), count(c.attempted));
        // The server's admission turning connections away is the server working, not failing: said apart.
        let refused = self.failures.rejected().min(c.failed);
        if refused > 0 {
            conn.push_str(&format!(", {} refused by the server's limits", count(refused)));
        }
        if c.failed > refused {
            conn.push_str(&format!(", {} failed", count(c.failed - refused)));
        }
        if c.skipped > 0 {
            conn.push_str(&format!(", {} not attempted (no connection was succeeding)", count(c.skipped)));
        }
        if self.scenario == Scenario::Idle {
            conn.push_str(&format!(", {} held to the end", count(c.held)));
        }
        if let Some(r) = c.per_sec {
            conn.push_str(&format!(" · {}/s", count(r.round() as u64)));
        }
        if c.compressed > 0 {
            conn.push_str(&format!(" · permessage-deflate on {}", count(c.compressed)));
        }
        line("connections", conn);
        if let Some(h) = self.handshake.as_ref().filter(|_| self.scenario != Scenario::Connect) {
            line("handshakes", percentiles(h));
        }
        if let Some(m) = &self.messages {
            let (sent, received) = match self.scenario {
                Scenario::Fanout => ("published", "delivered"),
                _ => ("sent", "echoed"),
            };
            let mut s = format!("{sent} {} · {received} {} · lost {}", count(m.sent), count(m.received), count(m.lost));
            if m.out_of_order > 0 {
                s.push_str(&format!(" · out of order {}", count(m.out_of_order)));
            }
            if m.foreign > 0 {
                s.push_str(&format!(" · not ours {}", count(m.foreign)));
            }
            line("messages", s);
            line("throughput", format!("{} msg/s · {}/s", count(m.per_sec.round() as u64), bytes(m.bytes_per_sec)));
        }
        if let Some(f) = &self.fanout {
            let mut s = format!(
                "{} subscribers × {} expected · {} with loss",
                count(f.subscribers),
                count(f.expected_per_subscriber),
                count(f.subscribers_with_loss)
            );
            if f.max_loss > 0 {
                s.push_str(&format!(" (worst: {} lost)", count(f.max_loss)));
            }
            if f.window_stalls > 0 {
                s.push_str(&format!(" · {} window stalls", count(f.window_stalls)));
            }
            line("fan-out", s);
            if let Some(w) = f.wire_bytes_per_delivery {
                line(
                    "wire",
                    format!("{} per delivery ({} to subscribers in all)", bytes(w), bytes(f.wire_bytes as f64)),
                );
            }
        }
        if let Some(l) = &self.latency {
            let name = match self.scenario {
                Scenario::Echo => "round trip",
                Scenario::Fanout => "delivery",
                _ => "handshake",
            };
            let co = match (p.rate > 0.0, self.scenario) {
                (false, _) => "",
                (true, Scenario::Connect) => " (from intended start)",
                (true, _) => " (from intended send time)",
            };
            line(name, format!("{}{co}", percentiles(l)));
        }
        if let Some(m) = &self.memory {
            let server = match (m.server_rss_before, m.server_rss_after, m.server_bytes_per_connection) {
                (Some(b), Some(a), Some(per)) => {
                    format!("{} → {} · {} per connection", bytes(b as f64), bytes(a as f64), bytes(per))
                }
                _ => "(pass --server-pid to measure)".into(),
            };
            line("server rss", server);
            let gen =
                m.generator_bytes_per_connection.map_or(String::new(), |b| format!(" · {} per connection", bytes(b)));
            line(
                "generator rss",
                format!("{} → {}{gen}", bytes(m.generator_rss_before as f64), bytes(m.generator_rss_after as f64)),
            );
        }
        let cpu = &self.cpu;
        let util = |us: u64| {
            if cpu.window_secs > 0.0 {
                format!(" ({:.0}% of a core)", us as f64 / 1e4 / cpu.window_secs)
            } else {
                String::new()
            }
        };
        let unit = if self.scenario == Scenario::Connect { "handshake" } else { "msg" };
        let per = |v: Option<f64>| v.map_or(String::new(), |v| format!(" · {v:.2} µs/{unit}"));
        match (cpu.server_pid, cpu.server_us) {
            (Some(_), Some(us)) => {
                line("server cpu", format!("{}{}{}", secs(us), util(us), per(cpu.server_us_per_message)))
            }
            (Some(pid), None) => line("server cpu", format!("(could not read /proc/{pid}/stat)")),
            (None, _) => {}
        }
        line(
            "generator cpu",
            format!("{}{}{}", secs(cpu.generator_us), util(cpu.generator_us), per(cpu.generator_us_per_message)),
        );
        line("failures", self.failures.summary());
        format!("{header}{out}")
    }
}

fn fanout_figures(t: &Tally) -> Fanout {
    let expected_each = t.sent;
    let per_subscriber: Vec<SubscriberLoss> = t
        .subscribers
        .iter()
        .map(|s| SubscriberLoss {
            index: s.index,
            received: s.received,
            lost: expected_each.saturating_sub(s.received),
            out_of_order: s.out_of_order,
        })
        .collect();
    let lost: u64 = per_subscriber.iter().map(|s| s.lost).sum();
    Fanout {
        published: t.sent,
        subscribers: per_subscriber.len() as u64,
        expected_per_subscriber: expected_each,
        expected: expected_each * per_subscriber.len() as u64,
        delivered: t.received,
        lost,
        subscribers_with_loss: per_subscriber.iter().filter(|s| s.lost > 0).count() as u64,
        max_loss: per_subscriber.iter().map(|s| s.lost).max().unwrap_or(0),
        window_stalls: t.stalls,
        compressed_subscribers: t.deflate,
        wire_bytes: t.wire_bytes,
        wire_bytes_per_delivery: (t.received > 0).then(|| t.wire_bytes as f64 / t.received as f64),
        per_subscriber,
    }
}

fn rate_text(rate: f64) -> String {
    if rate > 0.0 {
        format!(" · rate {}/s", count(rate.round() as u64))
    } else {
        String::new()
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
        micros(p.p50_us),
        micros(p.p90_us),
        micros(p.p99_us),
        micros(p.p999_us),
        micros(p.max_us),
        count(p.samples)
    )
}

/// `1234567` → `1,234,567`.
pub(crate) fn count(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let mut groups: Vec<&[u8]> = digits.rchunks(3).collect();
    groups.reverse();
    groups.iter().map(|g| String::from_utf8_lossy(g)).collect::<Vec<_>>().join(",")
}

/// Microseconds, in the unit that reads best.
pub(crate) fn micros(us: f64) -> String {
    if us < 999.5 {
        format!("{us:.0} µs")
    } else if us < 999_995.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn secs(us: u64) -> String {
    format!("{:.2} s", us as f64 / 1e6)
}

fn bytes(b: f64) -> String {
    let sign = if b < 0.0 { "-" } else { "" };
    let b = b.abs();
    if b < 1024.0 {
        format!("{sign}{b:.0} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{sign}{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{sign}{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{sign}{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(micros(381.2), "381 µs");
        assert_eq!(micros(1500.0), "1.50 ms");
        assert_eq!(micros(999.9), "1.00 ms");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(-512.0), "-512 B");
    }

    #[test]
    fn fanout_loss_is_expected_minus_received_per_subscriber() {
        let t = Tally {
            sent: 100,
            received: 190,
            subscribers: vec![
                crate::scenario::SubscriberTally { index: 0, received: 90, out_of_order: 0 },
                crate::scenario::SubscriberTally { index: 1, received: 100, out_of_order: 2 },
            ],
            ..Tally::default()
        };
        let f = fanout_figures(&t);
        assert_eq!((f.expected, f.lost, f.subscribers_with_loss, f.max_loss), (200, 10, 1, 10));
        assert_eq!(f.per_subscriber[0].lost, 10);
    }
}
