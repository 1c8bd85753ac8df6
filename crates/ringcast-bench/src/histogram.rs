//! Latency histograms: HDR histograms of nanoseconds, their percentile summary, and the compact text form
//! worker processes send to the parent.
//!
//! An HDR histogram keeps every value to 3 significant digits at a fixed memory cost, and histograms
//! merge exactly, which is what lets per-thread, per-second and per-process recordings be combined into
//! true percentiles (averaging percentiles would not be). Workers serialize with the standard V2 format
//! (the one every HdrHistogram implementation reads), base64-encoded into their JSON.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency kept exactly: 100 s. Larger values are recorded as 100 s.
pub const MAX_NS: u64 = 100_000_000_000;

/// An empty latency histogram (nanoseconds, 3 significant digits, up to [`MAX_NS`]).
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2·low, sigfig ≤ 5).
    match Histogram::new_with_bounds(1, MAX_NS, 3) {
        Ok(h) => h,
        Err(_) => unreachable!("constant histogram bounds are valid"),
    }
}

/// A histogram that (de)serializes as base64 of its V2 encoding.
#[derive(Debug, Clone)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(new_histogram())
    }
}

impl Hist {
    pub fn add(&mut self, other: &Histogram<u64>) {
        // Both come from `new_histogram`, so the bounds match and addition cannot fail; a value beyond
        // them would have been saturated when recorded.
        let _ = self.0.add(other);
    }

    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        // Serializing into a Vec cannot fail on IO; an encoding error leaves an empty histogram.
        if V2Serializer::new().serialize(&self.0, &mut bytes).is_err() {
            bytes.clear();
        }
        BASE64.encode(bytes)
    }

    pub fn decode(s: &str) -> Result<Hist, String> {
        if s.is_empty() {
            return Ok(Hist::default());
        }
        let bytes = BASE64.decode(s).map_err(|e| format!("histogram base64: {e}"))?;
        let h: Histogram<u64> =
            Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| format!("histogram: {e:?}"))?;
        let mut out = Hist::default();
        out.0.add(&h).map_err(|e| format!("histogram: {e:?}"))?;
        Ok(out)
    }
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hist, D::Error> {
        let s = String::deserialize(d)?;
        Hist::decode(&s).map_err(serde::de::Error::custom)
    }
}

/// The figures a latency histogram is reported as, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// `None` when nothing was recorded.
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Percentiles {
            samples: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialization_round_trips_and_merges() {
        let mut a = Hist::default();
        for v in 1..=10_000u64 {
            a.0.saturating_record(v * 1000);
        }
        let json = serde_json::to_string(&a).unwrap();
        let b: Hist = serde_json::from_str(&json).unwrap();
        assert_eq!(b.0.len(), 10_000);
        assert_eq!(b.0.value_at_quantile(0.5), a.0.value_at_quantile(0.5));
        let mut m = Hist::default();
        m.add(&a.0);
        m.add(&b.0);
        assert_eq!(m.0.len(), 20_000);
        let p = Percentiles::of(&m.0).unwrap();
        assert!((p.p50_us - 5000.0).abs() < 10.0, "{p:?}");
        assert!((p.max_us - 10_000.0).abs() < 10.0, "{p:?}");
        assert!(Percentiles::of(&new_histogram()).is_none());
    }

    #[test]
    fn out_of_range_values_saturate() {
        let mut h = new_histogram();
        h.saturating_record(u64::MAX);
        assert!(h.max() >= MAX_NS);
        assert!(Hist::decode("not base64!").is_err());
    }
}
