//! Memory watermarks: refuse new connections and shed the clients holding the most outbound memory
//! while the process's resident set is too large.
//!
//! `memory_high_watermark` and `memory_low_watermark` are bytes of RSS, or percentages of the memory
//! limit of the process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`). A hysteresis between
//! them: once RSS passes *high*, the node is under pressure until RSS falls below *low*. Under
//! pressure, admission refuses every upgrade request with 503 (`app::admission`, reason `memory`), and
//! each sample disconnects the clients with the largest outbound backlog with 3008 (slow: SDKs
//! reconnect later, with backoff), largest first, until their backlogs add up to RSS − low.
//!
//! Why this shape:
//! * **Sampling is off the hot path.** One task reads `/proc/self/statm` every [`SAMPLE_INTERVAL`]
//!   (one small file read, a few microseconds) and stores the verdict in one atomic flag; admission
//!   reads that flag with one relaxed load. Connections and fan-out do nothing.
//! * **Nobody is scanned under normal load.** Finding the largest backlogs walks the node's client
//!   registry ([`crate::pubsub::node::Node::largest_backlogs`]), and that happens only in samples
//!   above the low watermark while under pressure. The walk holds the registry's lock and each
//!   client's queue lock for a read of its length; the disconnects are requested after the walk, with
//!   no lock held, and no socket is touched here (each connection writes its own close frame).
//! * **Backlog, not connection count, is what a client costs under load.** Publications are shared
//!   `Bytes`: a client that does not read keeps alive every frame queued for it, and the clients that
//!   read keep nothing. A client with less than [`MIN_SHED_BACKLOG`] queued is never shed: it is not
//!   what fills memory, and a reading client's queue holds a frame or two at any moment.
//! * **Frames are shared**, so shedding one slow client frees nothing while another still holds the
//!   same frames. The next sample (RSS still high) sheds the next one; the first client whose
//!   disconnect frees memory stops the rounds.
//!
//! * **Freed memory must reach the kernel.** An allocator keeps freed pages a while before returning
//!   them (mimalloc purges them after a delay, but only when the thread that owns them next allocates
//!   or frees), so the frames of a shed client can stay resident on an idle thread indefinitely. The
//!   binary registers its allocator's collect ([`set_allocator_collect`]); under pressure, each sample
//!   asks every runtime worker to run it once, when the worker next parks ([`on_worker_park`], a
//!   relaxed load otherwise). Measured: without it, RSS stayed at the high mark for a minute after
//!   every slow reader was gone (`tests/memory.rs` in the `ringcast` crate).
//!
//! What it refuses to do: guess at memory it cannot see. RSS is the measure (what the kernel's OOM
//! killer and cgroup accounting charge), not allocator statistics.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use crate::app::context::Context;

/// How often RSS is read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Seconds a client refused for memory is told to wait: memory takes longer to come back than a
/// connection slot, and a storm of retries is what a squeezed node does not need.
pub const MEMORY_RETRY_AFTER_SECS: u64 = 5;

/// A client with less than this queued is never shed (see the module docs).
pub const MIN_SHED_BACKLOG: usize = 64 * 1024;

/// Most clients shed in one sample: bounds the work of one round; the next sample continues.
pub const MAX_SHED_PER_ROUND: usize = 1024;

static COLLECT: OnceLock<fn()> = OnceLock::new();
/// Bumped for every collect request; 0 until the first.
static COLLECT_EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN_EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// Registers the allocator's "return free pages to the kernel now", run on each worker under memory
/// pressure (the `ringcast` binary: mimalloc's `mi_collect`). The first registration counts.
pub fn set_allocator_collect(collect: fn()) {
    let _ = COLLECT.set(collect);
}

/// The runtime's `on_thread_park` hook: runs the allocator's collect once per request on this thread.
/// When nothing was requested it is one relaxed load.
pub fn on_worker_park() {
    let epoch = COLLECT_EPOCH.load(Ordering::Relaxed);
    if epoch == 0 {
        return;
    }
    SEEN_EPOCH.with(|seen| {
        if seen.get() != epoch {
            seen.set(epoch);
            if let Some(collect) = COLLECT.get() {
                collect();
            }
        }
    });
}

/// Asks every worker to run the allocator's collect (and runs it here, now).
fn request_collect() {
    COLLECT_EPOCH.fetch_add(1, Ordering::Relaxed);
    on_worker_park();
}

/// A watermark as configured: bytes, or a percentage of the cgroup's memory limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mark {
    Bytes(u64),
    Percent(f64),
}

impl Mark {
    /// Parses `""`/`"0"` (off), `"268435456"`, `"256MiB"`, `"1.5GB"`, `"80%"`.
    pub fn parse(raw: &str) -> Result<Option<Mark>, String> {
        let s = raw.trim();
        if s.is_empty() || s == "0" {
            return Ok(None);
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("{raw:?} is not a percentage (e.g. \"80%\")"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{raw:?}: a percentage must be above 0 and at most 100"));
            }
            return Ok(Some(Mark::Percent(p)));
        }
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "{raw:?}: expected bytes (\"512MiB\", \"2GB\", \"1073741824\") or a percentage (\"80%\")"
                ))
            }
        };
        let n: f64 = num.parse().map_err(|_| format!("{raw:?} is not a size (e.g. \"512MiB\")"))?;
        let bytes = n * scale as f64;
        if !(1.0..2f64.powi(63)).contains(&bytes) {
            return Err(format!("{raw:?}: must be at least 1 byte"));
        }
        Ok(Some(Mark::Bytes(bytes as u64)))
    }

    fn resolve(self, key: &str, cgroup_limit: Option<u64>) -> Result<u64, String> {
        match self {
            Mark::Bytes(b) => Ok(b),
            Mark::Percent(p) => match cgroup_limit {
                Some(limit) => Ok((limit as f64 * p / 100.0) as u64),
                None => Err(format!(
                    "`{key}` is a percentage of the cgroup's memory limit, and this process has none (no cgroup v2 memory.max or v1 memory.limit_in_bytes below unlimited); give bytes instead"
                )),
            },
        }
    }
}

/// The resolved watermarks, in bytes of RSS (`low < high`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub high: u64,
    pub low: u64,
}

impl Watermarks {
    /// Resolves the two configured values. `cgroup_limit` is asked for only when a percentage needs it.
    /// An empty low watermark is 90% of the high one. Errors are `(key, message)`.
    pub fn resolve(
        high: &str,
        low: &str,
        cgroup_limit: impl FnOnce() -> Option<u64>,
    ) -> Result<Option<Watermarks>, (&'static str, String)> {
        const HIGH: &str = "memory_high_watermark";
        const LOW: &str = "memory_low_watermark";
        let high_mark = Mark::parse(high).map_err(|m| (HIGH, m))?;
        let low_mark = Mark::parse(low).map_err(|m| (LOW, m))?;
        let Some(high_mark) = high_mark else {
            if low_mark.is_some() {
                return Err((LOW, "needs memory_high_watermark".into()));
            }
            return Ok(None);
        };
        let needs_limit = matches!(high_mark, Mark::Percent(_)) || matches!(low_mark, Some(Mark::Percent(_)));
        let limit = if needs_limit { cgroup_limit() } else { None };
        let high = high_mark.resolve(HIGH, limit).map_err(|m| (HIGH, m))?;
        let low = match low_mark {
            Some(m) => m.resolve(LOW, limit).map_err(|m| (LOW, m))?,
            None => high / 10 * 9,
        };
        if low >= high {
            return Err((LOW, format!("must be below memory_high_watermark ({low} >= {high} bytes)")));
        }
        if high < 1 << 20 {
            return Err((HIGH, "must be at least 1 MiB".into()));
        }
        Ok(Some(Watermarks { high, low }))
    }
}

/// The memory limit of this process's cgroup, if it has one below "unlimited".
pub fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit_in(&own, Path::new("/sys/fs/cgroup"))
}

/// The limit for a process whose `/proc/self/cgroup` reads `own`, with the cgroup filesystems mounted
/// at `root`. The cgroup's own file first, then the root's (inside a container's cgroup namespace the
/// path may not resolve, and the root is the container's own cgroup).
fn cgroup_limit_in(own: &str, root: &Path) -> Option<u64> {
    let read = |p: &Path| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    // A v1 limit at or above 2^62 is the kernel's "unlimited" (9223372036854771712 with 4 KiB pages).
    let limited = |v: u64| (v < 1 << 62).then_some(v);
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // cgroup v2 (unified): "max" means no limit.
            for dir in [root.join(rel), root.to_path_buf()] {
                if let Some(v) = read(&dir.join("memory.max")) {
                    if let Some(limit) = v.parse::<u64>().ok().and_then(limited) {
                        return Some(limit);
                    }
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let base = root.join("memory");
            for dir in [base.join(rel), base.clone()] {
                if let Some(v) = read(&dir.join("memory.limit_in_bytes")) {
                    if let Some(limit) = v.parse::<u64>().ok().and_then(limited) {
                        return Some(limit);
                    }
                }
            }
        }
    }
    None
}

/// Reads this process's resident set size from `/proc/self/statm` (its second field, in pages).
pub fn rss_bytes(page_size: u64) -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name, handled below.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The node's memory state: the watermarks and whether it is under pressure now. Admission reads the
/// flag; [`watch`] writes it.
#[derive(Debug)]
pub struct Memory {
    marks: Option<Watermarks>,
    pressure: AtomicBool,
    rss: AtomicU64,
}

impl Memory {
    pub fn new(marks: Option<Watermarks>) -> Memory {
        Memory { marks, pressure: AtomicBool::new(false), rss: AtomicU64::new(0) }
    }

    pub fn watermarks(&self) -> Option<Watermarks> {
        self.marks
    }

    /// Over the high watermark and not yet back below the low one: refuse new connections.
    #[inline]
    pub fn under_pressure(&self) -> bool {
        self.pressure.load(Ordering::Relaxed)
    }

    /// RSS at the last sample (0 before the first, or when watermarks are off).
    pub fn rss(&self) -> u64 {
        self.rss.load(Ordering::Relaxed)
    }

    /// Takes one sample: updates the pressure flag (with hysteresis) and returns how many bytes of
    /// backlog should be shed now (RSS − low while under pressure, else 0).
    fn observe(&self, rss: u64) -> u64 {
        let Some(m) = self.marks else { return 0 };
        self.rss.store(rss, Ordering::Relaxed);
        let was = self.pressure.load(Ordering::Relaxed);
        let now = if was { rss >= m.low } else { rss > m.high };
        if now != was {
            self.pressure.store(now, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::MEMORY_PRESSURE).set(if now { 1.0 } else { 0.0 });
            if now {
                tracing::warn!(
                    rss,
                    high = m.high,
                    low = m.low,
                    "memory above the high watermark: refusing new connections, shedding the largest backlogs"
                );
            } else {
                tracing::warn!(rss, low = m.low, "memory below the low watermark: admitting connections again");
            }
        }
        if now {
            rss.saturating_sub(m.low)
        } else {
            0
        }
    }
}

/// The sampling task (one per server, started with it when watermarks are configured): reads RSS every
/// [`SAMPLE_INTERVAL`] and, under pressure, sheds.
pub async fn watch(ctx: Arc<Context>) {
    let memory = &ctx.admission.memory;
    let Some(marks) = memory.watermarks() else { return };
    metrics::gauge!(crate::metrics::MEMORY_HIGH_WATERMARK_BYTES).set(marks.high as f64);
    metrics::gauge!(crate::metrics::MEMORY_LOW_WATERMARK_BYTES).set(marks.low as f64);
    metrics::gauge!(crate::metrics::MEMORY_PRESSURE).set(0.0);
    let page = page_size();
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_log_ms = None::<u32>;
    loop {
        tick.tick().await;
        let Some(rss) = rss_bytes(page) else { continue };
        metrics::gauge!(crate::metrics::MEMORY_RSS_BYTES).set(rss as f64);
        let excess = memory.observe(rss);
        if excess == 0 {
            continue;
        }
        // What earlier rounds freed, back to the kernel.
        request_collect();
        let (shed, bytes) = shed(&ctx, excess);
        if shed > 0 {
            metrics::counter!(crate::metrics::MEMORY_SHED_DISCONNECTS_TOTAL).increment(shed as u64);
            metrics::counter!(crate::metrics::MEMORY_SHED_BYTES_TOTAL).increment(bytes as u64);
            let now = ctx.deadlines.now_ms();
            if last_log_ms.is_none_or(|t| now.wrapping_sub(t) >= 1000) {
                last_log_ms = Some(now);
                tracing::warn!(rss, clients = shed, backlog_bytes = bytes, "memory pressure: disconnecting clients with the largest backlogs (3008; logged at most once a second)");
            }
        }
    }
}

/// Disconnects (3008) the clients with the largest backlogs, largest first, until their backlogs add
/// up to `excess` bytes. Returns (clients, bytes of backlog).
fn shed(ctx: &Context, excess: u64) -> (usize, usize) {
    let candidates = ctx.node.largest_backlogs(MAX_SHED_PER_ROUND, MIN_SHED_BACKLOG);
    let mut freed = 0usize;
    let mut n = 0;
    for (backlog, client) in candidates {
        if freed as u64 >= excess {
            break;
        }
        let code = ringcast_protocol::DisconnectCode::SLOW;
        client.request_disconnect(code.code, code.reason);
        freed += backlog;
        n += 1;
    }
    (n, freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_bytes_units_and_percentages() {
        assert_eq!(Mark::parse(""), Ok(None));
        assert_eq!(Mark::parse("0"), Ok(None));
        assert_eq!(Mark::parse("1048576"), Ok(Some(Mark::Bytes(1 << 20))));
        assert_eq!(Mark::parse("256MiB"), Ok(Some(Mark::Bytes(256 << 20))));
        assert_eq!(Mark::parse("1.5 GiB"), Ok(Some(Mark::Bytes(3 << 29))));
        assert_eq!(Mark::parse("2GB"), Ok(Some(Mark::Bytes(2_000_000_000))));
        assert_eq!(Mark::parse("80%"), Ok(Some(Mark::Percent(80.0))));
        for bad in ["lots", "12 parsecs", "0%", "101%", "-5", "%"] {
            assert!(Mark::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn low_defaults_to_90_percent_of_high_and_must_be_below_it() {
        let none = || panic!("no cgroup lookup for byte values");
        assert_eq!(Watermarks::resolve("", "", none), Ok(None));
        assert_eq!(
            Watermarks::resolve("100MiB", "", none),
            Ok(Some(Watermarks { high: 100 << 20, low: (100 << 20) / 10 * 9 }))
        );
        assert_eq!(Watermarks::resolve("100MiB", "50MiB", none).map(|w| w.map(|w| w.low)), Ok(Some(50 << 20)));
        assert_eq!(Watermarks::resolve("100MiB", "100MiB", none).map_err(|e| e.0), Err("memory_low_watermark"));
        assert_eq!(Watermarks::resolve("", "50MiB", none).map_err(|e| e.0), Err("memory_low_watermark"));
        assert_eq!(Watermarks::resolve("bogus", "", none).map_err(|e| e.0), Err("memory_high_watermark"));
    }

    #[test]
    fn a_percentage_needs_a_cgroup_limit() {
        let e = Watermarks::resolve("80%", "", || None).unwrap_err();
        assert_eq!(e.0, "memory_high_watermark");
        assert!(e.1.contains("cgroup"), "{}", e.1);
        let w = Watermarks::resolve("80%", "60%", || Some(1 << 30)).unwrap().unwrap();
        assert_eq!(w, Watermarks { high: (0.8 * (1u64 << 30) as f64) as u64, low: (0.6 * (1u64 << 30) as f64) as u64 });
        let w = Watermarks::resolve("768MiB", "50%", || Some(1 << 30)).unwrap().unwrap();
        assert_eq!(w.low, 512 << 20);
        assert!(Watermarks::resolve("512MiB", "60%", || Some(1 << 30)).is_err(), "low above high");
    }

    #[test]
    fn cgroup_limits_are_read_from_v2_and_v1_files() {
        let dir = std::env::temp_dir().join(format!("ringcast-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // v2: the process's own cgroup, "max" meaning none.
        std::fs::create_dir_all(dir.join("v2/app.slice")).unwrap();
        std::fs::write(dir.join("v2/app.slice/memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_limit_in("0::/app.slice\n", &dir.join("v2")), Some(512 << 20));
        std::fs::write(dir.join("v2/app.slice/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit_in("0::/app.slice\n", &dir.join("v2")), None);
        // v2 in a container namespace: the path does not resolve; the root's file is the container's.
        std::fs::write(dir.join("v2/memory.max"), "1073741824\n").unwrap();
        assert_eq!(cgroup_limit_in("0::/elsewhere\n", &dir.join("v2")), Some(1 << 30));
        // v1: the memory controller's line; the kernel's "unlimited" is no limit.
        std::fs::create_dir_all(dir.join("v1/memory/job")).unwrap();
        std::fs::write(dir.join("v1/memory/job/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let own = "5:cpu,cpuacct:/job\n4:memory:/job\n0::/\n";
        assert_eq!(cgroup_limit_in(own, &dir.join("v1")), None);
        std::fs::write(dir.join("v1/memory/job/memory.limit_in_bytes"), "268435456\n").unwrap();
        assert_eq!(cgroup_limit_in(own, &dir.join("v1")), Some(256 << 20));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn pressure_starts_above_high_and_ends_below_low() {
        let m = Memory::new(Some(Watermarks { high: 1000, low: 600 }));
        assert_eq!(m.observe(900), 0);
        assert!(!m.under_pressure());
        assert_eq!(m.observe(1200), 600, "shed down to low");
        assert!(m.under_pressure());
        assert_eq!(m.observe(800), 200, "still above low: still under pressure");
        assert!(m.under_pressure());
        assert_eq!(m.observe(500), 0);
        assert!(!m.under_pressure());
        assert_eq!(m.observe(900), 0, "between the marks, from below: no pressure");
        assert!(!m.under_pressure());
    }

    #[test]
    fn rss_is_read_from_statm() {
        let rss = rss_bytes(page_size()).expect("statm");
        assert!(rss > 1 << 20, "{rss}");
    }
}
