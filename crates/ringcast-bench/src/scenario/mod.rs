//! The scenarios, and what they share: how work is split over processes, how connections are opened in
//! bulk, the phases every connection task follows, and the per-process result ([`Tally`]).
//!
//! # The shape of a run, in every process
//! 1. *Prepare*: open (and set up) the connections this process owns ([`open_many`]); each gets a task
//!    that waits for the start.
//! 2. *Ready*: tell the [`Link`] (the parent process, or the in-process conductor) and receive the common
//!    start time. Processes start together because they share the monotonic clock.
//! 3. *Run*: warm-up, then the measured window; one interval per second goes to the link.
//! 4. *Drain*: stop sending, wait (bounded) for what is in flight, then stop and collect each task's
//!    counts into the [`Tally`].
//!
//! Every wait is bounded by a deadline derived from the parameters, so a silent server cannot hang a run.

pub mod connect;
pub mod echo;
pub mod fanout;
pub mod idle;

use std::future::Future;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{self, Buffers, Conn, Endpoint, Handler};
use crate::clock::{instant_at, now_ns, SECOND};
use crate::error::BenchError;
use crate::failure::{Failure, Failures};
use crate::histogram::Hist;
use crate::meter::{Interval, Meter, Window};
use crate::params::{Params, Scenario};

/// What connection tasks are told, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected, waiting for the start.
    Wait,
    /// Load is on.
    Run(Window),
    /// Stop sending; finish what is in flight.
    Drain,
    /// Stop now and report.
    Stop,
}

/// Waits for the start; `None` if the run was stopped first.
pub(crate) async fn wait_for_run(phase: &mut watch::Receiver<Phase>) -> Option<Window> {
    loop {
        match *phase.borrow_and_update() {
            Phase::Run(w) => return Some(w),
            Phase::Drain | Phase::Stop => return None,
            Phase::Wait => {}
        }
        if phase.changed().await.is_err() {
            return None;
        }
    }
}

/// Keeps a connection serviced (pings answered, closes noticed) while it waits for the start, which
/// can take long when many connections are being opened. Data messages before the start go to
/// `handler` (which ignores them, or answers protocol-level pings).
pub(crate) async fn serve_until_run<H: Handler + ?Sized>(
    conn: &mut Conn,
    phase: &mut watch::Receiver<Phase>,
    handler: &mut H,
) -> Result<Option<Window>, Failure> {
    loop {
        match *phase.borrow_and_update() {
            Phase::Run(w) => return Ok(Some(w)),
            Phase::Drain | Phase::Stop => return Ok(None),
            Phase::Wait => {}
        }
        if let Some(end) = conn.receive(handler)? {
            return Err(end.failure());
        }
        tokio::select! {
            r = conn.stream.readable() => r?,
            r = conn.stream.writable(), if conn.tx.pending() > 0 => {
                r?;
                conn.tx.flush(&conn.stream)?;
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(None);
                }
            }
        }
    }
}

/// The part of the load one process generates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Share {
    pub index: usize,
    pub of: usize,
    /// Global indices of this process's connections (echo, connect, idle).
    pub connections: Range<u64>,
    pub subscribers: Range<u64>,
    pub publishers: Range<u64>,
    /// This process's part of `--rate`.
    pub rate: f64,
    /// This process's part of `--window` where the window is per process (connect, idle).
    pub concurrency: u64,
}

fn part(total: u64, n: usize, i: usize) -> Range<u64> {
    let n = n as u64;
    let i = i as u64;
    (total * i / n)..(total * (i + 1) / n)
}

/// Splits the load over `n` processes: connections evenly, the rate in proportion.
pub fn split(p: &Params, n: usize) -> Vec<Share> {
    (0..n)
        .map(|i| {
            let connections = part(p.connections, n, i);
            let subscribers = part(p.subscribers, n, i);
            let publishers = part(p.publishers, n, i);
            let fraction = match p.scenario {
                Scenario::Fanout => (publishers.end - publishers.start) as f64 / p.publishers.max(1) as f64,
                _ => (connections.end - connections.start) as f64 / p.connections.max(1) as f64,
            };
            Share {
                index: i,
                of: n,
                connections,
                subscribers,
                publishers,
                rate: p.rate * fraction,
                concurrency: p.window.div_ceil(n as u64).max(1),
            }
        })
        .collect()
}

/// The local address for global connection `index`, round-robin over `--source-ips`.
pub(crate) fn source_for(p: &Params, index: u64) -> Option<IpAddr> {
    if p.source_ips.is_empty() {
        None
    } else {
        Some(p.source_ips[(index % p.source_ips.len() as u64) as usize])
    }
}

/// One subscriber's deliveries (fan-out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberTally {
    /// Global subscriber index.
    pub index: u64,
    pub received: u64,
    pub out_of_order: u64,
}

/// What one process measured. Workers send it to the parent, which merges them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Connections attempted / upgraded.
    pub attempted: u64,
    /// Connections not attempted: the first attempts all failed, so the rest were skipped.
    pub skipped: u64,
    pub established: u64,
    /// Connections still open when the run stopped.
    pub held: u64,
    /// Messages sent (echo) or published (fan-out).
    pub sent: u64,
    /// Echoes or deliveries received, over the whole run (loss is counted on these).
    pub received: u64,
    /// Deliveries received inside the measured window (throughput).
    pub received_in_window: u64,
    pub bytes_in_window: u64,
    pub out_of_order: u64,
    /// Messages that were not the generator's (wrong size, unknown publisher, not ours).
    pub foreign: u64,
    /// Times a publisher's window stayed full for a second (fan-out, rate 0).
    pub stalls: u64,
    /// Latency of messages sent inside the window (handshakes, for connect).
    pub latency: Hist,
    /// Handshake (TCP + upgrade) latency of every connection opened.
    pub handshake: Hist,
    pub failures: Failures,
    /// The generator's CPU time in the measured window.
    pub cpu_us: u64,
    /// The generator's resident memory before and after opening its connections.
    pub rss_before: u64,
    pub rss_after: u64,
    pub subscribers: Vec<SubscriberTally>,
    /// How long the storm took (connect).
    pub elapsed_ns: u64,
    /// Bytes subscribers read from their sockets from the start of the run (fan-out): frames as they
    /// were on the wire, compressed or not, with their headers.
    #[serde(default)]
    pub wire_bytes: u64,
    /// Subscribers whose server accepted permessage-deflate (fan-out).
    #[serde(default)]
    pub deflate: u64,
}

impl Tally {
    pub fn merge(&mut self, o: &Tally) {
        self.attempted += o.attempted;
        self.skipped += o.skipped;
        self.established += o.established;
        self.held += o.held;
        self.sent += o.sent;
        self.received += o.received;
        self.received_in_window += o.received_in_window;
        self.bytes_in_window += o.bytes_in_window;
        self.out_of_order += o.out_of_order;
        self.foreign += o.foreign;
        self.stalls += o.stalls;
        self.latency.add(&o.latency.0);
        self.handshake.add(&o.handshake.0);
        self.failures.merge(&o.failures);
        self.cpu_us += o.cpu_us;
        self.rss_before += o.rss_before;
        self.rss_after += o.rss_after;
        self.subscribers.extend(o.subscribers.iter().cloned());
        self.elapsed_ns = self.elapsed_ns.max(o.elapsed_ns);
        self.wire_bytes += o.wire_bytes;
        self.deflate += o.deflate;
    }

    pub(crate) fn fail(&mut self, meter: &Meter, f: &Failure) {
        self.failures.add(f);
        meter.failed();
    }
}

/// How a worker talks to whoever coordinates the run (the parent process, or the in-process conductor).
pub(crate) trait Link {
    /// Progress while connecting: connections open and failures so far.
    fn preparing(&mut self, open: u64, errors: u64);
    /// This process is connected: returns the common start time (monotonic ns).
    async fn ready(&mut self, established: u64) -> Result<u64, BenchError>;
    /// One second of measurements.
    fn tick(&mut self, interval: Interval);
    /// This process's measured window ended before the planned end (connect: the storm is over).
    fn window_closed(&mut self);
    /// Sending is over: this process published `n` messages; returns the total over all processes.
    async fn published(&mut self, n: u64) -> Result<u64, BenchError>;
}

/// Runs this process's share of the load.
pub(crate) async fn run_share<L: Link>(
    p: &Params,
    ep: &Endpoint,
    share: &Share,
    link: &mut L,
) -> Result<Tally, BenchError> {
    match p.scenario {
        Scenario::Echo => echo::run(p, ep, share, link).await,
        Scenario::Fanout => fanout::run(p, ep, share, link).await,
        Scenario::Connect => connect::run(p, ep, share, link).await,
        Scenario::Idle => idle::run(p, ep, share, link).await,
    }
}

/// Sends one interval per second to the link while waiting for other things.
pub(crate) struct Ticker<'a, L: Link> {
    pub link: &'a mut L,
    meter: &'a Meter,
    start: u64,
    second: u32,
}

impl<'a, L: Link> Ticker<'a, L> {
    pub fn new(link: &'a mut L, meter: &'a Meter, start: u64) -> Self {
        Ticker { link, meter, start, second: 0 }
    }

    /// Ticks until `fut` completes (`Some`) or `deadline` passes (`None`).
    pub async fn until<F: Future>(&mut self, deadline: u64, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            let next_tick = self.start + (u64::from(self.second) + 1) * SECOND;
            let wake = next_tick.min(deadline);
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep_until(instant_at(wake)) => {
                    let now = now_ns();
                    if now >= next_tick {
                        self.second += 1;
                        let iv = self.meter.take_interval(self.second);
                        self.link.tick(iv);
                    }
                    if now >= deadline {
                        return None;
                    }
                }
            }
        }
    }

    pub async fn sleep_until(&mut self, deadline: u64) {
        self.until(deadline, std::future::pending::<()>()).await;
    }

    /// Emits the last, partial interval (so the timeline holds every delivery).
    pub fn flush(&mut self) {
        let mut iv = self.meter.take_interval(self.second + 1);
        iv.partial = true;
        if iv.messages > 0 {
            self.second += 1;
            self.link.tick(iv);
        }
    }
}

/// What to do on a connection right after its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setup {
    None,
    /// Centrifugo connect.
    CentrifugeConnect,
    /// Centrifugo connect + subscribe.
    CentrifugeSubscribe,
}

/// Stop trying after this many failures without a single success: nothing is listening, say, and the
/// remaining attempts would only repeat the same answer.
const GIVE_UP_AFTER: u64 = 200;

/// How a batch of connections is opened.
#[derive(Debug, Clone)]
pub(crate) struct Opening {
    pub buffers: Buffers,
    /// Handshakes in flight.
    pub concurrency: u64,
    pub setup: Setup,
}

/// Opens connections `indices` as `how` says. Failures are counted in `tally`; the connections that
/// made it are returned in index order.
pub(crate) async fn open_many(
    p: &Params,
    ep: &Endpoint,
    indices: Range<u64>,
    how: Opening,
    tally: &mut Tally,
    meter: &Meter,
    mut progress: impl FnMut(u64, u64),
) -> Vec<(u64, Conn)> {
    let Opening { buffers, concurrency, setup } = how;
    let ep = Arc::new(ep.clone());
    let mut next = indices.start;
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity((indices.end - indices.start) as usize);
    let mut last_progress = now_ns();
    let mut failed = 0u64;
    loop {
        let give_up = failed >= GIVE_UP_AFTER && tally.established == 0;
        while next < indices.end && (set.len() as u64) < concurrency && !give_up {
            let index = next;
            next += 1;
            tally.attempted += 1;
            let ep = ep.clone();
            let buffers = buffers.clone();
            let source = source_for(p, index);
            let timeout = p.connect_timeout;
            set.spawn(async move {
                let opened = client::open(&ep, source, &buffers, timeout).await;
                let opened = match (opened, setup) {
                    (Ok(mut o), Setup::CentrifugeConnect | Setup::CentrifugeSubscribe) => {
                        let subscribe = setup == Setup::CentrifugeSubscribe;
                        crate::centrifuge::setup(&mut o.conn, subscribe, timeout).await.map(|()| o)
                    }
                    (r, _) => r,
                };
                (index, opened)
            });
        }
        let Some(joined) = set.join_next().await else { break };
        match joined {
            Ok((index, Ok(opened))) => {
                tally.established += 1;
                tally.handshake.0.saturating_record(opened.handshake_ns);
                meter.open.fetch_add(1, Ordering::Relaxed);
                out.push((index, opened.conn));
            }
            Ok((_, Err(f))) => {
                failed += 1;
                tally.fail(meter, &f);
            }
            Err(e) => {
                failed += 1;
                tally.fail(meter, &Failure::Io(format!("connect task: {e}")));
            }
        }
        let now = now_ns();
        if now - last_progress > SECOND / 4 {
            last_progress = now;
            progress(tally.established, tally.failures.total());
        }
    }
    progress(tally.established, tally.failures.total());
    tally.skipped += indices.end - next;
    out.sort_by_key(|(i, _)| *i);
    out
}

/// Waits for every task of `set`, bounded: after `deadline`, `stop` is sent and the rest get `grace`.
pub(crate) async fn join_all<T: 'static, L: Link>(
    ticker: &mut Ticker<'_, L>,
    set: &mut JoinSet<T>,
    deadline: u64,
    stop: &watch::Sender<Phase>,
    grace: Duration,
) -> Vec<T> {
    let mut done = Vec::with_capacity(set.len());
    {
        let collect = async {
            while let Some(r) = set.join_next().await {
                if let Ok(v) = r {
                    done.push(v);
                }
            }
        };
        ticker.until(deadline, collect).await;
    }
    if !set.is_empty() {
        let _ = stop.send(Phase::Stop);
        let rest = async {
            while let Some(r) = set.join_next().await {
                if let Ok(v) = r {
                    done.push(v);
                }
            }
        };
        if tokio::time::timeout(grace, rest).await.is_err() {
            set.abort_all();
        }
    }
    done
}

/// What a connection task reports at its end.
#[derive(Debug, Default)]
pub(crate) struct ConnTally {
    pub sent: u64,
    pub received: u64,
    pub foreign: u64,
    pub out_of_order: u64,
    pub stalls: u64,
    /// Still open when told to stop.
    pub held: bool,
    pub failure: Option<Failure>,
}

impl ConnTally {
    pub fn add_to(&self, tally: &mut Tally) {
        tally.sent += self.sent;
        tally.received += self.received;
        tally.foreign += self.foreign;
        tally.out_of_order += self.out_of_order;
        tally.stalls += self.stalls;
        tally.held += u64::from(self.held);
        if let Some(f) = &self.failure {
            tally.failures.add(f);
        }
    }
}

/// *Ready* and *Run* (steps 2 and 3 above) for a scenario with a measured window: reports ready, gets
/// the common start, tells the connection tasks to run, ticks through warm-up and the window, and puts
/// this process's CPU time over the window into `tally`. Returns the window and the ticker for the drain.
pub(crate) async fn run_window<'a, L: Link>(
    p: &Params,
    link: &'a mut L,
    meter: &'a Meter,
    tally: &mut Tally,
    phase_tx: &watch::Sender<Phase>,
) -> Result<(Window, Ticker<'a, L>), BenchError> {
    let start = link.ready(tally.established).await?;
    let from = start + crate::clock::ns(p.warmup);
    let window = Window { start, from, to: from + crate::clock::ns(p.duration) };
    meter.set_window(window);
    let mut ticker = Ticker::new(link, meter, start);
    crate::clock::sleep_until(start).await;
    let _ = phase_tx.send(Phase::Run(window));
    ticker.sleep_until(window.from).await;
    let cpu_from = crate::proc::self_cpu_us();
    ticker.sleep_until(window.to).await;
    tally.cpu_us = crate::proc::self_cpu_us().saturating_sub(cpu_from);
    Ok((window, ticker))
}

/// A connection task's end: it no longer counts as open; a failed one is counted as failed, a healthy
/// one is closed politely (waiting up to [`CLOSE_WAIT`] for the server's close).
pub(crate) async fn end_connection(conn: Conn, meter: &Meter, failed: bool) {
    meter.open.fetch_sub(1, Ordering::Relaxed);
    if failed {
        meter.failed();
    } else {
        conn.close(CLOSE_WAIT).await;
    }
}

/// How long a connection waits for the server's close frame when we end it.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long in-flight messages may take to arrive after sending stops.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        let mut p = Params::new(Scenario::Fanout, "ws://127.0.0.1:1/");
        p.subscribers = 10;
        p.publishers = 3;
        p.rate = 900.0;
        let shares = split(&p, 4);
        let subs: u64 = shares.iter().map(|s| s.subscribers.end - s.subscribers.start).sum();
        let pubs: u64 = shares.iter().map(|s| s.publishers.end - s.publishers.start).sum();
        let rate: f64 = shares.iter().map(|s| s.rate).sum();
        assert_eq!((subs, pubs), (10, 3));
        assert!((rate - 900.0).abs() < 1e-9);
        assert_eq!(shares[3].subscribers.end, 10);
        assert_eq!(shares[0].subscribers.start, 0);
    }
}
