//! How long a TCP client has to answer our PING: adapted to the round trips it has shown.
//!
//! A fixed pong timeout is wrong both ways: on a slow link (a device on a cellular modem) it cuts off a
//! client that is merely far away, and on a fast link it takes seconds to notice a dead one. So the
//! deadline is 1.5 × the median of the last [`WINDOW`] measured round trips, clamped to the configured
//! `tcp_pong_timeout_min` and `tcp_pong_timeout_max`. Before any round trip is measured it is the
//! maximum. The median (not the mean) keeps one slow outlier from stretching the deadline.

use std::time::Duration;

/// Round trips remembered per connection.
pub const WINDOW: usize = 8;

/// The last round trips of one connection, in microseconds (a fixed array: no allocation).
#[derive(Debug, Default, Clone)]
pub struct RttWindow {
    samples: [u32; WINDOW],
    len: u8,
    next: u8,
}

impl RttWindow {
    /// Remembers one measured round trip (the oldest is forgotten once the window is full).
    pub fn record(&mut self, rtt: Duration) {
        let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
        self.samples[usize::from(self.next)] = us;
        self.next = ((usize::from(self.next) + 1) % WINDOW) as u8;
        self.len = (usize::from(self.len) + 1).min(WINDOW) as u8;
    }

    /// The median of the remembered round trips (the lower middle of an even count).
    pub fn median(&self) -> Option<Duration> {
        let n = usize::from(self.len);
        if n == 0 {
            return None;
        }
        let mut sorted = self.samples;
        sorted[..n].sort_unstable();
        Some(Duration::from_micros(u64::from(sorted[(n - 1) / 2])))
    }

    /// The pong deadline: 1.5 × the median, within `[min, max]`; `max` before any measurement.
    pub fn pong_timeout(&self, min: Duration, max: Duration) -> Duration {
        match self.median() {
            None => max,
            Some(m) => (m * 3 / 2).clamp(min, max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn before_any_round_trip_the_deadline_is_the_maximum() {
        assert_eq!(RttWindow::default().pong_timeout(MIN, MAX), MAX);
    }

    #[test]
    fn the_deadline_is_one_and_a_half_medians_within_bounds() {
        let mut w = RttWindow::default();
        for ms in [200, 1_000, 200, 9_000, 200] {
            w.record(Duration::from_millis(ms));
        }
        assert_eq!(w.median(), Some(Duration::from_millis(200)), "outliers do not move the median");
        assert_eq!(w.pong_timeout(MIN, MAX), Duration::from_millis(300));
        let mut fast = RttWindow::default();
        fast.record(Duration::from_micros(50));
        assert_eq!(fast.pong_timeout(MIN, MAX), MIN, "clamped up to the minimum");
        let mut slow = RttWindow::default();
        slow.record(Duration::from_secs(60));
        assert_eq!(slow.pong_timeout(MIN, MAX), MAX, "clamped down to the maximum");
    }

    #[test]
    fn only_the_last_round_trips_count() {
        let mut w = RttWindow::default();
        for _ in 0..WINDOW {
            w.record(Duration::from_secs(5));
        }
        for _ in 0..WINDOW {
            w.record(Duration::from_millis(400));
        }
        assert_eq!(w.median(), Some(Duration::from_millis(400)));
    }
}
