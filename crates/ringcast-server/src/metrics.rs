//! Metrics: the process's one Prometheus recorder, and the catalogue of every metric ringcast emits.
//!
//! Code everywhere records through the `metrics` facade (`metrics::counter!(…)`), which is a no-op until a
//! recorder is installed; [`install`] installs the Prometheus one and returns the handle `GET /metrics`
//! renders. The names below are described once, at install, so a scrape documents itself (`# HELP`), and
//! are listed here so one file says what exists; emitting sites use these constants or the same literals.
//!
//! Recording is at boundaries (accept, handshake, close, publish, drop), never per frame.
//!
//! # Upkeep
//! The exporter buffers histogram samples until a scrape or an upkeep drains them; without scrapes that
//! buffer grows. [`install`] starts one small thread that runs upkeep every [`UPKEEP_INTERVAL`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

// Connections (emitted by `server` and `connection`).
pub const WS_CONNECTIONS: &str = "ringcast_ws_connections";
pub const WS_CONNECTIONS_TOTAL: &str = "ringcast_ws_connections_total";
pub const TCP_ACCEPTED_TOTAL: &str = "ringcast_tcp_accepted_total";
pub const TCP_ACCEPT_ERRORS_TOTAL: &str = "ringcast_tcp_accept_errors_total";
pub const HANDSHAKE_FAILURES_TOTAL: &str = "ringcast_handshake_failures_total";
pub const WS_PROTOCOL_ERRORS_TOTAL: &str = "ringcast_ws_protocol_errors_total";
pub const WS_TIMEOUTS_TOTAL: &str = "ringcast_ws_timeouts_total";
pub const IO_ERRORS_TOTAL: &str = "ringcast_io_errors_total";
// Pub/sub (emitted by the hub and client sessions).
pub const SUBSCRIPTIONS: &str = "ringcast_subscriptions";
pub const MESSAGES_IN_TOTAL: &str = "ringcast_messages_in_total";
pub const MESSAGES_OUT_TOTAL: &str = "ringcast_messages_out_total";
pub const BYTES_IN_TOTAL: &str = "ringcast_bytes_in_total";
pub const BYTES_OUT_TOTAL: &str = "ringcast_bytes_out_total";
pub const QUEUE_DROPS_TOTAL: &str = "ringcast_queue_drops_total";
pub const SLOW_DISCONNECTS_TOTAL: &str = "ringcast_slow_disconnects_total";
pub const PUBLISH_DELIVERY_SECONDS: &str = "ringcast_publish_delivery_seconds";
// HTTP and the server API (emitted by `http` and `api`).
pub const HTTP_CONNECTIONS_TOTAL: &str = "ringcast_http_connections_total";
pub const HTTP_ERRORS_TOTAL: &str = "ringcast_http_errors_total";
pub const API_REQUESTS_TOTAL: &str = "ringcast_api_requests_total";
pub const API_ERRORS_TOTAL: &str = "ringcast_api_errors_total";
pub const API_REJECTED_TOTAL: &str = "ringcast_api_rejected_total";

/// Upper bounds of the publish-to-delivery latency histogram, in seconds: half a millisecond (a local
/// fan-out) up to 2.5 s (a subscriber far behind), roughly ×2.5 per step.
pub const PUBLISH_DELIVERY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

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
    PrometheusBuilder::new()
        .upkeep_timeout(UPKEEP_INTERVAL)
        .set_buckets_for_metric(Matcher::Full(PUBLISH_DELIVERY_SECONDS.to_string()), PUBLISH_DELIVERY_BUCKETS)
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
    describe_counter!(MESSAGES_OUT_TOTAL, Unit::Count, "Messages sent to clients.");
    describe_counter!(BYTES_IN_TOTAL, Unit::Bytes, "Payload bytes received from clients.");
    describe_counter!(BYTES_OUT_TOTAL, Unit::Bytes, "Payload bytes sent to clients.");
    describe_counter!(QUEUE_DROPS_TOTAL, Unit::Count, "Messages dropped because a client's queue was full.");
    describe_counter!(SLOW_DISCONNECTS_TOTAL, Unit::Count, "Clients disconnected for reading too slowly.");
    describe_histogram!(
        PUBLISH_DELIVERY_SECONDS,
        Unit::Seconds,
        "Time from a publish until it is queued on every local subscriber (the socket write follows in that connection's next poll)."
    );
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent_and_buckets_the_delivery_histogram() {
        let first = install().expect("installed");
        let second = install().expect("still installed");
        metrics::histogram!(PUBLISH_DELIVERY_SECONDS).record(0.0007);
        metrics::counter!(API_REQUESTS_TOTAL, "method" => "publish").increment(1);
        let text = second.render();
        let bucket = r#"ringcast_publish_delivery_seconds_bucket{le="0.001"} 1"#;
        assert!(first.render().contains(bucket), "both calls return the same recorder");
        assert!(text.contains("# HELP ringcast_publish_delivery_seconds"), "{text}");
        assert!(text.contains(r#"ringcast_publish_delivery_seconds_bucket{le="0.0005"} 0"#), "{text}");
        assert!(text.contains(bucket), "{text}");
        assert!(text.contains(r#"ringcast_publish_delivery_seconds_bucket{le="2.5"} 1"#), "{text}");
        assert!(text.contains(r#"ringcast_api_requests_total{method="publish"}"#), "{text}");
    }

    #[test]
    fn buckets_are_increasing() {
        assert!(PUBLISH_DELIVERY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
