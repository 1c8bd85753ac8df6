//! What the kernel knows about processes: CPU time and resident memory, for the server (by pid, from
//! /proc) and for the generator itself (getrusage).
//!
//! The point of reporting CPU is to turn "N messages per second" into "µs of CPU per message", a figure
//! that does not depend on how many cores the machine happened to give each side. /proc counts in clock
//! ticks (usually 10 ms), so short windows are coarse; the report states the window length next to it.

use std::io;

/// Reads the server's CPU time (user + system) in microseconds from `/proc/PID/stat`.
pub fn process_cpu_us(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = parse_stat_times(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/stat format")))?;
    Ok((utime + stime).saturating_mul(1_000_000) / clock_ticks_per_sec())
}

/// utime and stime (fields 14 and 15) in clock ticks. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted from the *last* ')'.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is field 14, i.e. the 12th item here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name, handled below.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Resident set size in bytes (`VmRSS` of `/proc/PID/status`).
pub fn process_rss(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vmrss(&status)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no VmRSS in /proc/{pid}/status")))
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | None => 1024,
        Some("mB") => 1024 * 1024,
        Some(_) => return None,
    };
    Some(value * unit)
}

/// CPU time (user + system) this process has used, in microseconds.
pub fn self_cpu_us() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of the plain-data struct getrusage fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF is always a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| (t.tv_sec as u64).saturating_mul(1_000_000).saturating_add(t.tv_usec as u64);
    tv(ru.ru_utime).saturating_add(tv(ru.ru_stime))
}

/// This process's own resident memory.
pub fn self_rss() -> u64 {
    process_rss(std::process::id()).unwrap_or(0)
}

/// Raises the soft open-file limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: an all-zero rlimit is valid plain data.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a valid rlimit that does not exceed the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    lim.rlim_cur
}

/// Server CPU over the measured window.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpan {
    pub start_us: Option<u64>,
    pub end_us: Option<u64>,
}

impl CpuSpan {
    pub fn used_us(&self) -> Option<u64> {
        Some(self.end_us?.saturating_sub(self.start_us?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000 10";
        assert_eq!(parse_stat_times(stat), Some((250, 75)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn own_figures_are_plausible() {
        let me = std::process::id();
        let rss = process_rss(me).unwrap();
        assert!(rss > 1 << 20 && rss < 64 << 30, "rss {rss}");
        // Burn a little CPU so the counters move.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(self_cpu_us() > 0);
        assert!(process_cpu_us(me).is_ok());
        assert_eq!(parse_vmrss("Name: x\nVmRSS:\t  2048 kB\n"), Some(2048 * 1024));
    }
}
