//! ringcast-bench: the load generator behind `ringcast bench`, as a library the CLI drives.
//!
//! A benchmark is only worth its weakest number, so the generator is built to be believed:
//! * it speaks plain RFC 6455 through ringcast-wire's sans-IO codec, so it works against any WebSocket
//!   server, not just ringcast;
//! * it is not the bottleneck: a multi-threaded runtime, frames encoded once per connection, messages
//!   parsed in place without allocation, recording into per-thread shards, and `--processes` /
//!   `--source-ips` when one process or one source address is not enough;
//! * its latencies are honest: HDR histograms (exact merges), warm-up excluded, and in rate mode
//!   measured from the intended send time so a stall cannot hide (coordinated omission);
//! * it says what went wrong: failures are counted by kind (refused, HTTP status, timeout, protocol,
//!   closed, local resources), and a run that measured nothing exits non-zero.
//!
//! Modules, by what they hold:
//! * [`params`]: what a run is asked to do; [`report`]: what it found (table, JSON); [`plot`]: SVG.
//! * [`scenario`]: echo, fanout, connect, idle, and the phases and splitting they share.
//! * [`reconnect`]: clients that come back (and recover) whenever the server lets them go, recorded as a
//!   timeline of handshakes per second: the curve of an upgrade or a restart.
//! * [`client`]: one client connection over tokio; [`centrifuge`]: Centrifugo protocol v2 client bits;
//!   [`payload`]: what a message carries; [`tcp`]: a client of ringcast's TCP binary protocol.
//! * [`meter`], [`histogram`]: recording; [`proc`]: CPU and memory from /proc and getrusage;
//!   [`clock`]: the monotonic clock shared by all processes; [`failure`]: failure kinds.
//! * `conductor`, `worker`, `progress`: coordination of one or many processes, and the live line.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringcast_bench::BenchError> {
//! use ringcast_bench::{Params, Scenario};
//! let mut p = Params::new(Scenario::Echo, "ws://127.0.0.1:8000/echo");
//! p.connections = 100;
//! p.duration = std::time::Duration::from_secs(5);
//! let report = ringcast_bench::run(&p).await?;
//! println!("{}", report.table());
//! # Ok(()) }
//! ```

pub mod centrifuge;
mod cli;
pub mod client;
pub mod clock;
pub mod compare;
mod conductor;
pub mod error;
pub mod failure;
pub mod histogram;
pub mod meter;
pub mod params;
pub mod payload;
pub mod plot;
pub mod proc;
mod progress;
pub mod reconnect;
pub mod report;
pub mod scenario;
pub mod stream;
pub mod tcp;
mod worker;

pub use cli::{command, main, params_from};
pub use error::BenchError;
pub use params::{Params, PayloadKind, Protocol, Scenario};
pub use report::Report;
pub use worker::WORKER_ARGS;

use client::Endpoint;

/// Runs a benchmark as `params` describe (in this process, or over `params.processes` workers) and
/// returns what it measured. Per-connection failures are in the report; an `Err` means the run could
/// not take place at all.
pub async fn run(params: &Params) -> Result<Report, BenchError> {
    params.validate()?;
    let limit = proc::raise_nofile_limit();
    let per_process = params.total_connections().div_ceil(params.processes as u64);
    if per_process + 64 > limit {
        let flag = if params.scenario == Scenario::Fanout { "subscribers" } else { "connections" };
        return Err(BenchError::invalid(
            flag,
            format!(
                "{per_process} connections per process exceed the open-file limit ({limit}); add --processes {}",
                params.total_connections().div_ceil(limit.saturating_sub(64).max(1))
            ),
        ));
    }
    if params.processes > 1 {
        return worker::run_processes(params).await;
    }
    let ep = endpoint(params).await?;
    let mut conductor = conductor::Conductor::new(params, 1);
    let shares = scenario::split(params, 1);
    let Some(share) = shares.first() else { return Err(BenchError::invalid("processes", "no work to split")) };
    let tally = {
        let mut link = conductor::LocalLink { conductor: &mut conductor };
        scenario::run_share(params, &ep, share, &mut link).await?
    };
    conductor.finish(tally).await
}

/// Resolves the target once per process.
pub(crate) async fn endpoint(params: &Params) -> Result<Endpoint, BenchError> {
    params.validate()?;
    endpoint_of(params, &params.url).await
}

/// Resolves one server URL (`--url` or one of `--urls`).
pub(crate) async fn endpoint_of(params: &Params, url: &str) -> Result<Endpoint, BenchError> {
    let target = params::Target::parse(url)?;
    let prefer_v4 = params.source_ips.first().map(|ip| ip.is_ipv4());
    let addr = target.resolve(prefer_v4).await?;
    let tls = match target.tls {
        true => Some(
            crate::stream::TlsClient::new(&target.host, params.insecure).map_err(|e| BenchError::invalid("url", e))?,
        ),
        false => None,
    };
    Ok(Endpoint { addr, host: target.host_header(), path: target.path.clone(), deflate: params.compression, tls })
}
