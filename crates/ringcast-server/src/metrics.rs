//! Metrics: the process's one Prometheus recorder, and the catalogue of every metric ringcast emits.
//!
//! Code everywhere records through the `metrics` facade (`metrics::counter!(…)`), which is a no-op until a
//! recorder is installed; [`install`] installs the Prometheus one and returns the handle `GET /metrics`
//! renders. The names below are described once, at install, so a scrape documents itself (`# HELP`), and
//! are listed here so one file says what exists; emitting sites use these constants or the same literals.
//!
//! Recording is at boundaries (accept, handshake, close, publish, drop), never per frame. The two
//! exceptions are cheap by construction: socket byte counters are handles kept in the server's context
//! (one atomic add per read or write), and the publish-to-delivery histogram is a fixed array of atomic
//! buckets here ([`record_delivery`]), recorded once per batch a subscriber's task takes for writing —
//! the exporter's own histograms buffer every sample, which at 100,000 deliveries a second would mean
//! megabytes and allocations between scrapes.
//!
//! # Upkeep
//! The exporter buffers histogram samples until a scrape or an upkeep drains them; without scrapes that
//! buffer grows. [`install`] starts one small thread that runs upkeep every [`UPKEEP_INTERVAL`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

// Connections (emitted by `server` and `connection`).
pub const WS_CONNECTIONS: &str = "ringcast_ws_connections";
pub const WS_CONNECTIONS_TOTAL: &str = "ringcast_ws_connections_total";
pub const TCP_ACCEPTED_TOTAL: &str = "ringcast_tcp_accepted_total";
pub const TCP_ACCEPT_ERRORS_TOTAL: &str = "ringcast_tcp_accept_errors_total";
pub const HANDSHAKE_FAILURES_TOTAL: &str = "ringcast_handshake_failures_total";
pub const WS_PROTOCOL_ERRORS_TOTAL: &str = "ringcast_ws_protocol_errors_total";
pub const WS_TIMEOUTS_TOTAL: &str = "ringcast_ws_timeouts_total";
pub const IO_ERRORS_TOTAL: &str = "ringcast_io_errors_total";
pub const ADMISSION_REFUSALS_TOTAL: &str = "ringcast_admission_refusals_total";
// Memory watermarks (emitted by `app::memory`).
pub const MEMORY_RSS_BYTES: &str = "ringcast_memory_rss_bytes";
pub const MEMORY_HIGH_WATERMARK_BYTES: &str = "ringcast_memory_high_watermark_bytes";
pub const MEMORY_LOW_WATERMARK_BYTES: &str = "ringcast_memory_low_watermark_bytes";
pub const MEMORY_PRESSURE: &str = "ringcast_memory_pressure";
pub const MEMORY_SHED_DISCONNECTS_TOTAL: &str = "ringcast_memory_shed_disconnects_total";
pub const MEMORY_SHED_BYTES_TOTAL: &str = "ringcast_memory_shed_bytes_total";
// Pub/sub (emitted by the hub and client sessions).
pub const SUBSCRIPTIONS: &str = "ringcast_subscriptions";
pub const MESSAGES_IN_TOTAL: &str = "ringcast_messages_in_total";
pub const MESSAGES_OUT_TOTAL: &str = "ringcast_messages_out_total";
pub const BYTES_IN_TOTAL: &str = "ringcast_bytes_in_total";
pub const BYTES_OUT_TOTAL: &str = "ringcast_bytes_out_total";
pub const QUEUE_DROPS_TOTAL: &str = "ringcast_queue_drops_total";
pub const SLOW_DISCONNECTS_TOTAL: &str = "ringcast_slow_disconnects_total";
pub const FANOUT_DIRECT_WRITES_TOTAL: &str = "ringcast_fanout_direct_writes_total";
pub const PUBLISH_DELIVERY_SECONDS: &str = "ringcast_publish_delivery_seconds";
// HTTP and the server API (emitted by `http` and `api`).
pub const HTTP_CONNECTIONS_TOTAL: &str = "ringcast_http_connections_total";
pub const HTTP_ERRORS_TOTAL: &str = "ringcast_http_errors_total";
pub const API_REQUESTS_TOTAL: &str = "ringcast_api_requests_total";
pub const API_ERRORS_TOTAL: &str = "ringcast_api_errors_total";
pub const API_REJECTED_TOTAL: &str = "ringcast_api_rejected_total";
// The networked engine's circuit breaker (emitted by `engine::breaker`).
pub const ENGINE_BREAKER_STATE: &str = crate::engine::breaker::STATE_GAUGE;
pub const ENGINE_BREAKER_TRIPS_TOTAL: &str = crate::engine::breaker::TRIPS_TOTAL;
pub const ENGINE_BREAKER_REJECTED_TOTAL: &str = crate::engine::breaker::REJECTED_TOTAL;
// The admin dashboard (emitted by `admin`).
pub const ADMIN_LOGIN_FAILURES_TOTAL: &str = "ringcast_admin_login_failures_total";

/// Upper bounds of the publish-to-delivery latency histogram, in seconds: half a millisecond (a local
/// fan-out) up to 2.5 s (a subscriber far behind), roughly ×2.5 per step.
pub const PUBLISH_DELIVERY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

const DELIVERY_HELP: &str = "Time from a publish until a subscriber's connection takes the publication to write it to its socket (one sample per batch taken: its oldest frame).";

/// The same bounds in microseconds, for recording.
const DELIVERY_BOUNDS_US: [u32; 12] =
    [500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];

/// Publish-to-delivery samples: one counter per bucket (the last is +Inf), their sum and their count.
struct DeliveryHistogram {
    buckets: [AtomicU64; DELIVERY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

static DELIVERY: DeliveryHistogram = DeliveryHistogram::new();

impl DeliveryHistogram {
    const fn new() -> Self {
        DeliveryHistogram {
            buckets: [const { AtomicU64::new(0) }; DELIVERY_BOUNDS_US.len() + 1],
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn record(&self, micros: u32) {
        let i = DELIVERY_BOUNDS_US.iter().position(|&b| micros <= b).unwrap_or(DELIVERY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::from(micros), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {PUBLISH_DELIVERY_SECONDS} {DELIVERY_HELP}");
        let _ = writeln!(out, "# TYPE {PUBLISH_DELIVERY_SECONDS} histogram");
        let mut cumulative = 0;
        for (i, le) in PUBLISH_DELIVERY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{PUBLISH_DELIVERY_SECONDS}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[DELIVERY_BOUNDS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{PUBLISH_DELIVERY_SECONDS}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{PUBLISH_DELIVERY_SECONDS}_sum {sum}");
        let _ = writeln!(out, "{PUBLISH_DELIVERY_SECONDS}_count {}", self.count.load(Ordering::Relaxed));
    }
}

static CLOCK: OnceLock<Instant> = OnceLock::new();

/// Microseconds on a process-wide clock, wrapping every ~71 minutes: stamps for latencies far shorter
/// than that, compared with `wrapping_sub`.
pub fn clock_us() -> u32 {
    CLOCK.get_or_init(Instant::now).elapsed().as_micros() as u32
}

/// Records one publish-to-delivery latency. No allocation, no lock: three relaxed atomic adds.
pub fn record_delivery(micros: u32) {
    DELIVERY.record(micros);
}

/// Buckets of [`delivery_counts`]: one per bound in [`PUBLISH_DELIVERY_BUCKETS`], then +Inf.
pub const DELIVERY_BUCKET_COUNT: usize = DELIVERY_BOUNDS_US.len() + 1;

/// The publish-to-delivery histogram's samples so far, per bucket (not cumulative), read with relaxed
/// loads: what the admin dashboard turns into percentiles of the last second.
pub fn delivery_counts() -> [u64; DELIVERY_BUCKET_COUNT] {
    std::array::from_fn(|i| DELIVERY.buckets[i].load(Ordering::Relaxed))
}

/// Appends the publish-to-delivery histogram in the Prometheus text format (cumulative buckets).
pub fn render_delivery(out: &mut String) {
    DELIVERY.render(out);
}

/// How often histogram buffers are drained when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static INSTALLED: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global recorder, once. Every call returns the same
/// handle. `None` if installing failed (another recorder was installed first, outside this function): the
/// server then runs without `/metrics`, and says so in the log.
pub fn install() -> Option<PrometheusHandle> {
    INSTALLED
        .get_or_init(|| match build().and_then(PrometheusBuilder::install_recorder) {
            Ok(handle) => {
                describe();
                // Publish the descriptions now rather than at the first upkeep, 5 s later: that first
                // upkeep allocates, and would land in whatever the server is doing then.
                handle.run_upkeep();
                start_upkeep(handle.clone());
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics disabled");
                None
            }
        })
        .clone()
}

fn build() -> Result<PrometheusBuilder, BuildError> {
    Ok(PrometheusBuilder::new().upkeep_timeout(UPKEEP_INTERVAL))
}

fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("ringcast-metrics".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms drain only on scrape");
    }
}

/// `# HELP` and units for every metric in the catalogue.
fn describe() {
    describe_gauge!(WS_CONNECTIONS, Unit::Count, "Open WebSocket connections (upgraded, not yet closed).");
    describe_counter!(WS_CONNECTIONS_TOTAL, Unit::Count, "WebSocket connections upgraded since start.");
    describe_counter!(TCP_ACCEPTED_TOTAL, Unit::Count, "TCP connections accepted.");
    describe_counter!(TCP_ACCEPT_ERRORS_TOTAL, Unit::Count, "accept() failures (EMFILE, ECONNABORTED, ...).");
    describe_counter!(HANDSHAKE_FAILURES_TOTAL, Unit::Count, "Upgrade requests refused, by `reason`.");
    describe_counter!(
        ADMISSION_REFUSALS_TOTAL,
        Unit::Count,
        "Connections refused by admission control, by `reason` (max_connections, max_connections_per_ip and memory: HTTP 503 or TCP ERROR 12; connect_rate: HTTP 429 or TCP ERROR 9) and `transport` (ws: valid upgrade requests on listen; tcp: connections on tcp_listen)."
    );
    describe_gauge!(
        MEMORY_RSS_BYTES,
        Unit::Bytes,
        "Resident memory at the last watermark sample (sampled only when memory_high_watermark is set)."
    );
    describe_gauge!(MEMORY_HIGH_WATERMARK_BYTES, Unit::Bytes, "memory_high_watermark, resolved to bytes.");
    describe_gauge!(MEMORY_LOW_WATERMARK_BYTES, Unit::Bytes, "memory_low_watermark, resolved to bytes.");
    describe_gauge!(
        MEMORY_PRESSURE,
        Unit::Count,
        "1 while RSS is over the high watermark and not yet below the low one (new connections refused, large backlogs shed), else 0."
    );
    describe_counter!(
        MEMORY_SHED_DISCONNECTS_TOTAL,
        Unit::Count,
        "Clients disconnected (3008) under memory pressure for holding the largest outbound backlogs."
    );
    describe_counter!(
        MEMORY_SHED_BYTES_TOTAL,
        Unit::Bytes,
        "Outbound backlog dropped with the clients shed under memory pressure."
    );
    describe_counter!(
        WS_PROTOCOL_ERRORS_TOTAL,
        Unit::Count,
        "Connections closed for a protocol violation, by `reason`."
    );
    describe_counter!(
        WS_TIMEOUTS_TOTAL,
        Unit::Count,
        "Connections closed by a timeout, by `kind` (handshake, idle, write)."
    );
    describe_counter!(IO_ERRORS_TOTAL, Unit::Count, "Connections ended by a socket error.");
    describe_gauge!(SUBSCRIPTIONS, Unit::Count, "Active client subscriptions.");
    describe_counter!(MESSAGES_IN_TOTAL, Unit::Count, "Messages received from clients.");
    describe_counter!(MESSAGES_OUT_TOTAL, Unit::Count, "Pushes queued to clients (publications, join/leave).");
    describe_counter!(BYTES_IN_TOTAL, Unit::Bytes, "Bytes read from WebSocket client sockets (framing included).");
    describe_counter!(BYTES_OUT_TOTAL, Unit::Bytes, "Bytes written to WebSocket client sockets (framing included).");
    describe_counter!(
        FANOUT_DIRECT_WRITES_TOTAL,
        Unit::Count,
        "Writes a fan-out made itself to an idle subscriber's socket instead of waking its connection (fanout_direct_write)."
    );
    describe_counter!(
        QUEUE_DROPS_TOTAL,
        Unit::Count,
        "Pushes dropped unwritten: the backlog of clients disconnected as slow, and pushes for clients already disconnecting."
    );
    describe_counter!(SLOW_DISCONNECTS_TOTAL, Unit::Count, "Clients disconnected for reading too slowly.");
    describe_counter!(HTTP_CONNECTIONS_TOTAL, Unit::Count, "Connections served as plain HTTP (API, health, metrics).");
    describe_counter!(HTTP_ERRORS_TOTAL, Unit::Count, "Plain HTTP connections ended by an error, by `kind`.");
    describe_counter!(API_REQUESTS_TOTAL, Unit::Count, "Server API calls, by `method`.");
    describe_counter!(
        API_ERRORS_TOTAL,
        Unit::Count,
        "Server API calls answered with an error, by `method` and `code`."
    );
    describe_counter!(
        API_REJECTED_TOTAL,
        Unit::Count,
        "Server API requests refused with an HTTP status (401, 400, 404), by `status`."
    );
    describe_gauge!(
        ENGINE_BREAKER_STATE,
        Unit::Count,
        "The engine's circuit breaker of each Redis shard (`shard`: its index in redis_url): 0 closed, 1 open (the shard's calls fail fast with error 100), 2 half-open (one probe call out)."
    );
    describe_counter!(
        ENGINE_BREAKER_TRIPS_TOTAL,
        Unit::Count,
        "Times a shard's circuit breaker opened (after engine_breaker_failures consecutive failures, or a failed probe), by `shard`."
    );
    describe_counter!(
        ENGINE_BREAKER_REJECTED_TOTAL,
        Unit::Count,
        "Engine calls failed fast (error 100) by a shard's open circuit breaker, without touching the engine, by `shard`."
    );
    describe_counter!(
        ADMIN_LOGIN_FAILURES_TOTAL,
        Unit::Count,
        "Admin dashboard logins refused (a wrong password, or over the login rate: 429)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent() {
        let first = install().expect("installed");
        let second = install().expect("still installed");
        metrics::counter!(API_REQUESTS_TOTAL, "method" => "publish").increment(1);
        let text = second.render();
        assert!(first.render().contains(r#"ringcast_api_requests_total{method="publish"}"#), "same recorder");
        assert!(text.contains("# HELP ringcast_api_requests_total"), "{text}");
    }

    #[test]
    fn delivery_histogram_is_cumulative_and_sums_seconds() {
        let h = DeliveryHistogram::new(); // not the process-wide one: other tests deliver into that
        h.record(700); // 0.7 ms: in le=0.001 and every bucket above
        h.record(500); // on a bound: in le=0.0005
        h.record(3_000_000); // 3 s: only +Inf
        let mut text = String::new();
        h.render(&mut text);
        for line in [
            "# TYPE ringcast_publish_delivery_seconds histogram",
            r#"ringcast_publish_delivery_seconds_bucket{le="0.0005"} 1"#,
            r#"ringcast_publish_delivery_seconds_bucket{le="0.001"} 2"#,
            r#"ringcast_publish_delivery_seconds_bucket{le="2.5"} 2"#,
            r#"ringcast_publish_delivery_seconds_bucket{le="+Inf"} 3"#,
            "ringcast_publish_delivery_seconds_sum 3.0012",
            "ringcast_publish_delivery_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn bounds_match_the_published_buckets() {
        assert!(PUBLISH_DELIVERY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        for (us, s) in DELIVERY_BOUNDS_US.iter().zip(PUBLISH_DELIVERY_BUCKETS) {
            assert_eq!(f64::from(*us) / 1e6, *s);
        }
    }

    #[test]
    fn clock_wraps_only_after_an_hour() {
        let a = clock_us();
        std::thread::sleep(Duration::from_millis(2));
        let d = clock_us().wrapping_sub(a);
        assert!((2_000..1_000_000).contains(&d), "{d}");
    }
}
