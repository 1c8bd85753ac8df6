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
    fn monotonic_and_close_to_instant() {
        let a = now_ns();
        let i = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = now_ns();
        let elapsed = ns(i.elapsed());
        assert!(b > a);
        assert!((b - a).abs_diff(elapsed) < 5_000_000, "{} vs {}", b - a, elapsed);
    }
}
