//! The generator's one clock: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! Message timestamps are read by a different task, thread or even process (`--processes`) than the one
//! that wrote them, so the clock must mean the same thing everywhere on the machine. `std::time::Instant`
//! is CLOCK_MONOTONIC on Linux but opaque; reading the clock directly gives a plain `u64` that can travel
//! inside a payload and across a pipe. It is read through the vDSO (no syscall), about 20 ns.

use std::time::Duration;

/// Nanoseconds on the system-wide monotonic clock.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, and on the
    // (impossible) failure `ts` stays zeroed, which is still a valid value to return.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// The tokio instant at which the monotonic clock reads `t` (now, if `t` has passed).
pub fn instant_at(t: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_nanos(t.saturating_sub(now_ns()))
}

/// Sleeps until the monotonic clock reads `t`.
pub async fn sleep_until(t: u64) {
    tokio::time::sleep_until(instant_at(t)).await
}

pub const SECOND: u64 = 1_000_000_000;

pub fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_the_same_clock_as_instant() {
        // Both read CLOCK_MONOTONIC, so an interval of one bracketed by readings of the other is ordered
        // exactly, however long the thread is descheduled between readings (no tolerance to flake on).
        let outer = std::time::Instant::now();
        let a = now_ns();
        let inner = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let inner_elapsed = ns(inner.elapsed());
        let b = now_ns();
        let outer_elapsed = ns(outer.elapsed());
        assert!(b > a);
        assert!(inner_elapsed <= b - a && b - a <= outer_elapsed, "{inner_elapsed} <= {} <= {outer_elapsed}", b - a);
    }
}

/// The open-loop schedule of one sender: message k is due at `base + (offset + k) · interval`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    base: u64,
    offset: f64,
    interval_ns: f64,
    k: u64,
}

/// What a sender may do at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Send a message stamped with this intended send time.
    Send(u64),
    /// Nothing is due yet.
    Wait,
    /// The sender's time is over.
    Done,
}

impl Schedule {
    /// `rate` messages per second starting at `base`, phase `offset` (0..1); `None` for a closed loop
    /// (rate 0: send as fast as the window allows).
    pub fn new(rate: f64, offset: f64, base: u64) -> Option<Schedule> {
        (rate > 0.0).then(|| Schedule { base, offset, interval_ns: 1e9 / rate, k: 0 })
    }

    /// When the next message is due.
    pub fn due(&self) -> u64 {
        self.base + ((self.offset + self.k as f64) * self.interval_ns) as u64
    }

    /// The due message was sent.
    pub fn advance(&mut self) {
        self.k += 1;
    }
}

/// The next message of a sender that stops at `until`: the schedule's due time once it has come (open
/// loop, stamped with the *intended* time), or now (closed loop).
pub fn next_slot(schedule: &mut Option<Schedule>, now: u64, until: u64) -> Slot {
    match schedule {
        Some(s) => {
            let due = s.due();
            if due >= until {
                Slot::Done
            } else if due > now {
                Slot::Wait
            } else {
                s.advance();
                Slot::Send(due)
            }
        }
        None if now >= until => Slot::Done,
        None => Slot::Send(now),
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn open_loop_sends_at_intended_times_until_the_end() {
        let mut s = Schedule::new(1000.0, 0.5, 10_000);
        assert_eq!(next_slot(&mut s, 10_000, 20_000_000), Slot::Wait, "first message at base + 0.5 ms");
        assert_eq!(next_slot(&mut s, 12_000_000, 20_000_000), Slot::Send(510_000), "stamped with the due time");
        assert_eq!(next_slot(&mut s, 12_000_000, 20_000_000), Slot::Send(1_510_000));
        assert_eq!(next_slot(&mut s, 12_000_000, 1_000_000), Slot::Done);
        let mut closed = None;
        assert_eq!(next_slot(&mut closed, 7, 8), Slot::Send(7));
        assert_eq!(next_slot(&mut closed, 8, 8), Slot::Done);
    }
}
