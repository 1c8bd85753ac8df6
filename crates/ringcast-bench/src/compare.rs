//! Two servers side by side in one run: `--compare URL2`.
//!
//! This machine is shared and noisy, so a ratio is only worth quoting when both figures were measured
//! close together. A comparison runs the same scenario in alternating rounds — A, B, A, B, … — each round
//! a complete run of its own (connect, warm up, measure, drain), and reports every round and the ratio
//! of the medians (B ÷ A). Each side has its own URL, server pid (for its CPU) and protocol (when
//! `--protocol` is not given, each URL implies its own, so a Centrifugo endpoint can be compared with a
//! raw broadcast peer).

use serde::Serialize;

use crate::error::BenchError;
use crate::params::{Params, Protocol};
use crate::report::Report;

/// The second server of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub url: String,
    pub server_pid: Option<u32>,
    /// `None`: what the URL implies.
    pub protocol: Option<Protocol>,
}

/// Every round of both sides.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: Vec<Report>,
    pub b: Vec<Report>,
}

/// The figures compared, each as (name, unit, how to read it from a report).
type Figure = (&'static str, &'static str, fn(&Report) -> Option<f64>);

const FIGURES: [Figure; 6] = [
    ("server CPU per message", "µs", |r| r.cpu.server_us_per_message),
    ("wire bytes per delivery", "B", |r| r.fanout.as_ref().and_then(|f| f.wire_bytes_per_delivery)),
    ("messages per second", "/s", |r| r.messages.as_ref().map(|m| m.per_sec)),
    ("latency p50", "ms", |r| r.latency.as_ref().map(|l| l.p50_us / 1000.0)),
    ("latency p99", "ms", |r| r.latency.as_ref().map(|l| l.p99_us / 1000.0)),
    ("lost", "", |r| r.messages.as_ref().map(|m| m.lost as f64)),
];

/// The two sides' parameters: `base` is side A; B takes `other`'s URL, pid and protocol.
pub fn sides(base: &Params, other: &Side) -> (Params, Params) {
    let mut b = base.clone();
    b.url = other.url.clone();
    b.server_pid = other.server_pid;
    b.protocol = other.protocol.unwrap_or_else(|| Protocol::for_url(&other.url));
    (base.clone(), b)
}

/// Runs `rounds` rounds of each side, alternating, starting with A.
pub async fn run(base: &Params, other: &Side, rounds: usize) -> Result<Comparison, BenchError> {
    let (pa, pb) = sides(base, other);
    let mut cmp = Comparison { a: Vec::new(), b: Vec::new() };
    for _ in 0..rounds.max(1) {
        cmp.a.push(crate::run(&pa).await?);
        cmp.b.push(crate::run(&pb).await?);
    }
    Ok(cmp)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "—".into(),
    }
}

impl Comparison {
    /// Both sides measured something in every round.
    pub fn measured(&self) -> bool {
        self.a.iter().chain(&self.b).all(Report::measured)
    }

    /// Median of a figure over one side's rounds.
    pub fn median_of(reports: &[Report], figure: fn(&Report) -> Option<f64>) -> Option<f64> {
        median(reports.iter().filter_map(figure).collect())
    }

    /// One line per figure: every round of A, every round of B, the medians and B ÷ A.
    pub fn table(&self) -> String {
        let url = |r: &[Report]| r.first().map_or(String::new(), |r| r.params.url.clone());
        let mut out =
            format!("A: {}\nB: {}\nrounds: {} each, alternating A, B\n", url(&self.a), url(&self.b), self.a.len());
        out.push_str(&format!(
            "{:<24} {:>24} {:>24} {:>10} {:>10} {:>7}\n",
            "figure", "A rounds", "B rounds", "A median", "B median", "B/A"
        ));
        for (name, unit, figure) in FIGURES {
            let rounds = |r: &[Report]| r.iter().map(|r| fmt(figure(r))).collect::<Vec<_>>().join(" ");
            let (ma, mb) = (Self::median_of(&self.a, figure), Self::median_of(&self.b, figure));
            let ratio = match (ma, mb) {
                (Some(a), Some(b)) if a != 0.0 => format!("{:.2}", b / a),
                _ => "—".into(),
            };
            let label = if unit.is_empty() { name.to_string() } else { format!("{name} ({unit})") };
            out.push_str(&format!(
                "{label:<24} {:>24} {:>24} {:>10} {:>10} {ratio:>7}\n",
                rounds(&self.a),
                rounds(&self.b),
                fmt(ma),
                fmt(mb)
            ));
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Scenario;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn side_b_takes_its_own_url_pid_and_implied_protocol() {
        let mut base = Params::new(Scenario::Fanout, "ws://127.0.0.1:8000/connection/websocket");
        base.protocol = Protocol::Centrifuge;
        base.server_pid = Some(10);
        let other = Side { url: "ws://127.0.0.1:9000/".into(), server_pid: Some(20), protocol: None };
        let (a, b) = sides(&base, &other);
        assert_eq!((a.url.as_str(), a.server_pid, a.protocol), (base.url.as_str(), Some(10), Protocol::Centrifuge));
        assert_eq!((b.url.as_str(), b.server_pid, b.protocol), ("ws://127.0.0.1:9000/", Some(20), Protocol::Raw));
        let forced = Side { protocol: Some(Protocol::Centrifuge), ..other };
        assert_eq!(sides(&base, &forced).1.protocol, Protocol::Centrifuge);
    }
}
