//! Reconnect: N Centrifugo clients that stay connected and come back whenever the server lets them go,
//! recording when each one got back, why it left, and whether it recovered what it missed.
//!
//! This is the measurement behind an upgrade or a restart: what matters is not a steady rate but a
//! curve — handshakes per second over time — and whether anyone was lost on the way. So, unlike the
//! other scenarios, the run has no measured window; it has a timeline of fixed buckets from its start.
//!
//! # What each client does
//! 1. Opens a WebSocket, sends `connect`, then `subscribe` to channel `bench` asking for a recoverable
//!    stream (`recoverable`) — after its first subscription with `recover`, the `offset` and the `epoch`
//!    it last saw, as the SDKs do.
//! 2. Holds the connection: answers the server's pings, follows the offset of every publication, and
//!    checks the publisher's sequence numbers (a gap is a lost publication, a repeat a duplicate).
//! 3. When the server ends the connection (a close frame, EOF, a reset), it records the reason and comes
//!    back after a backoff with full jitter: a uniform delay in `[0, min(max, min·2^attempt))`, the
//!    attempt counter reset by each successful subscription (the shape of the official SDKs' backoff).
//!
//! A successful subscription is the "handshake" the curve counts: the moment a client is back in
//! business, not merely upgraded. Events are counted into atomic buckets, so recording costs no lock.
//!
//! # The publisher
//! With `--api-key` and `--rate`, one publisher sends sequence numbers over the HTTP API (a publication
//! the server refuses — a draining process answers error 100 — or that fails is retried until a server
//! takes it). It starts once every client subscribed the first time, and stops at `--duration`; then the
//! clients get `--settle` to catch up with its last number before the run ends and the rest is counted
//! lost.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringcast_wire::OpCode;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};

use crate::centrifuge::{command_with, field_u64, find, lines, parse_line, write_data, HttpPublisher, Line, Seen};
use crate::client::{open, Buffers, Conn, Ended, Endpoint, Tx};
use crate::clock::{now_ns, ns, sleep_until, SECOND};
use crate::error::BenchError;
use crate::failure::{classify, Failure};
use crate::params::{Target, CHANNEL};

/// What a reconnect run is asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct ReconnectParams {
    /// A Centrifugo client endpoint, `ws://HOST:PORT/connection/websocket`.
    pub url: String,
    pub clients: u64,
    /// From the start (the first connections included) to the publisher's stop.
    pub duration: Duration,
    /// Handshakes in flight while the clients connect the first time.
    pub window: u64,
    /// Backoff: the first retry waits up to `backoff_min`, doubling per failed attempt up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Width of one timeline bucket.
    pub bucket: Duration,
    /// Publish over the HTTP API with this key (no publisher without it).
    pub api_key: Option<String>,
    /// Publications per second.
    pub rate: f64,
    /// Publication size in bytes.
    pub size: usize,
    /// Bound on each connect + upgrade + connect/subscribe replies.
    pub connect_timeout: Duration,
    /// After `duration`: how long clients may take to receive the last publication.
    pub settle: Duration,
    /// Print a line when every client subscribed the first time, and when the run ends.
    pub progress: bool,
}

impl ReconnectParams {
    pub fn new(url: impl Into<String>) -> ReconnectParams {
        ReconnectParams {
            url: url.into(),
            clients: 1000,
            duration: Duration::from_secs(60),
            window: 64,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(20),
            bucket: Duration::from_secs(1),
            api_key: None,
            rate: 10.0,
            size: 64,
            connect_timeout: Duration::from_secs(10),
            settle: Duration::from_secs(10),
            progress: false,
        }
    }

    fn validate(&self) -> Result<Target, BenchError> {
        let target = Target::parse(&self.url)?;
        if target.tls {
            return Err(BenchError::invalid("url", "reconnect speaks ws:// only"));
        }
        if self.clients == 0 {
            return Err(BenchError::invalid("clients", "at least one client"));
        }
        if self.window == 0 {
            return Err(BenchError::invalid("window", "at least one handshake in flight"));
        }
        if self.bucket < Duration::from_millis(10) || self.bucket > self.duration.max(Duration::from_secs(1)) {
            return Err(BenchError::invalid("bucket", "between 10ms and the duration"));
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return Err(BenchError::invalid("backoff-max", "backoff-min > 0 and backoff-max >= backoff-min"));
        }
        if self.api_key.is_some() && !(self.rate > 0.0 && self.rate <= 10_000.0) {
            return Err(BenchError::invalid("rate", "a publisher needs a rate in (0, 10000]"));
        }
        if self.size < 64 || self.size > 1 << 20 {
            return Err(BenchError::invalid("size", "between 64 bytes (sequence numbers) and 1 MiB"));
        }
        Ok(target)
    }
}

/// One bucket of the timeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bucket {
    /// Start of the bucket, seconds from the run's start.
    pub t: f64,
    /// Clients that completed connect + subscribe.
    pub handshakes: u64,
    /// Of those, subscriptions that asked to recover.
    pub resubscribes: u64,
    /// Established connections the server ended.
    pub disconnects: u64,
    /// Attempts that failed (refused, timed out, refused upgrade or command).
    pub failed: u64,
}

/// What a reconnect run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconnectReport {
    pub params: Option<ReconnectParams>,
    pub clients: u64,
    pub bucket_s: f64,
    pub timeline: Vec<Bucket>,
    /// Clients subscribed the first time.
    pub initial: u64,
    /// Seconds from the start until every client was subscribed the first time (None: never).
    pub initial_done_s: Option<f64>,
    /// Successful re-subscriptions (after a disconnect).
    pub reconnected: u64,
    /// Of those, with `recovered: true`.
    pub recovered: u64,
    /// Of those, with `recovered: false` (the position was lost: a new epoch, or too old).
    pub not_recovered: u64,
    /// Why established connections ended: `close 3001`, `eof`, ...
    pub disconnect_reasons: BTreeMap<String, u64>,
    /// Why attempts failed: `refused`, `timeout`, `http_503`, ...
    pub failure_reasons: BTreeMap<String, u64>,
    /// Clients that were not subscribed when the run ended.
    pub not_connected_at_end: u64,
    /// Seconds from the start: the first disconnect of an established client, the last reconnect.
    pub first_disconnect_s: Option<f64>,
    pub last_reconnect_s: Option<f64>,
    /// Handshakes per second in the busiest bucket after the first disconnect.
    pub peak_per_s: f64,
    /// Per reconnect: time from the disconnect to being subscribed again (ms): p50, p99, max.
    pub gap_ms: [f64; 3],
    pub published: u64,
    pub publish_retries: u64,
    /// Publications received, by all clients (recovered ones included).
    pub received: u64,
    /// Publications some client never received (summed over clients).
    pub lost: u64,
    /// Publications a client received more than once.
    pub duplicated: u64,
}

impl ReconnectReport {
    /// A human-readable summary and the timeline (rows from the first non-empty bucket to the last).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}s"));
        let _ = writeln!(s, "clients            {} (all subscribed at {})", self.clients, opt(self.initial_done_s));
        let _ = writeln!(
            s,
            "reconnected        {} (recovered {}, not recovered {}), not connected at the end {}",
            self.reconnected, self.recovered, self.not_recovered, self.not_connected_at_end
        );
        let _ = writeln!(
            s,
            "first disconnect   {}   last reconnect {}   peak {:.0} handshakes/s",
            opt(self.first_disconnect_s),
            opt(self.last_reconnect_s),
            self.peak_per_s
        );
        let _ = writeln!(
            s,
            "reconnect gap      p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
            self.gap_ms[0], self.gap_ms[1], self.gap_ms[2]
        );
        let _ = writeln!(s, "disconnects        {}", reasons(&self.disconnect_reasons));
        let _ = writeln!(s, "failed attempts    {}", reasons(&self.failure_reasons));
        let _ = writeln!(
            s,
            "publications       {} published ({} retries), {} received, {} lost, {} duplicated",
            self.published, self.publish_retries, self.received, self.lost, self.duplicated
        );
        let _ = writeln!(
            s,
            "{:>8} {:>11} {:>13} {:>12} {:>12} {:>8}",
            "t(s)", "handshakes", "handshakes/s", "resubscribes", "disconnects", "failed"
        );
        let busy = |b: &Bucket| b.handshakes + b.disconnects + b.failed > 0;
        let first = self.timeline.iter().position(busy).unwrap_or(0);
        let last = self.timeline.iter().rposition(busy).unwrap_or(0);
        for b in self.timeline.iter().take(last + 1).skip(first) {
            let _ = writeln!(
                s,
                "{:>8.2} {:>11} {:>13.0} {:>12} {:>12} {:>8}",
                b.t,
                b.handshakes,
                b.handshakes as f64 / self.bucket_s,
                b.resubscribes,
                b.disconnects,
                b.failed
            );
        }
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn reasons(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{v} × {k}")).collect::<Vec<_>>().join(", ")
}

/// Counters shared by every client task.
struct Shared {
    start: u64,
    bucket_ns: u64,
    handshakes: Vec<AtomicU64>,
    resubscribes: Vec<AtomicU64>,
    disconnects: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
    initial: AtomicU64,
    initial_done: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    /// Rare events (a disconnect, a failed attempt, a reconnect's gap): a lock is fine.
    rare: Mutex<Rare>,
}

#[derive(Default)]
struct Rare {
    disconnect_reasons: BTreeMap<String, u64>,
    failure_reasons: BTreeMap<String, u64>,
    gaps: Vec<u64>,
    first_disconnect: Option<u64>,
    last_reconnect: Option<u64>,
}

impl Shared {
    fn slot(&self, t: u64) -> usize {
        (((t.saturating_sub(self.start)) / self.bucket_ns) as usize).min(self.handshakes.len() - 1)
    }

    fn rare(&self) -> std::sync::MutexGuard<'_, Rare> {
        // A panicking client task cannot leave the maps half-updated in a way that matters for counts.
        self.rare.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, f: &Failure) {
        self.failed[self.slot(now_ns())].fetch_add(1, Ordering::Relaxed);
        *self.rare().failure_reasons.entry(f.label()).or_default() += 1;
    }

    fn disconnected(&self, reason: String, at: u64) {
        self.disconnects[self.slot(at)].fetch_add(1, Ordering::Relaxed);
        let mut r = self.rare();
        *r.disconnect_reasons.entry(reason).or_default() += 1;
        r.first_disconnect = Some(r.first_disconnect.map_or(at, |f| f.min(at)));
    }
}

/// What every client task shares.
struct Ctx {
    ep: Endpoint,
    p: ReconnectParams,
    shared: Arc<Shared>,
    buffers: Buffers,
}

/// The run's phase, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Run,
    /// The publisher stopped at this sequence number: a client that has it may stop.
    Settle(u32),
    Stop,
}

/// One client's position and accounting, kept across its connections.
#[derive(Default)]
struct Position {
    /// Offset and epoch of the last publication (or subscribe reply) seen; `None` before the first subscribe.
    epoch: Option<String>,
    offset: u64,
    last_seq: u32,
    subscribed_once: bool,
    received: u64,
    lost: u64,
    duplicated: u64,
}

impl Position {
    fn publication(&mut self, seq: u32) {
        self.received += 1;
        if seq <= self.last_seq {
            self.duplicated += 1;
        } else {
            self.lost += u64::from(seq - self.last_seq - 1);
            self.last_seq = seq;
        }
    }

    /// A push line: its sequence number (if it is the publisher's) and its offset.
    fn push(&mut self, line: &[u8]) {
        if let Line::Push(Some((_, 0, seq))) = parse_line(line) {
            self.publication(seq);
        }
        if let Some(offset) = field_u64(line, b"\"offset\":") {
            self.offset = self.offset.max(offset);
        }
    }

    /// A subscribe reply: epoch, the stream's offset, and recovered publications in order.
    /// Returns `recovered`.
    fn subscribed(&mut self, line: &[u8]) -> bool {
        let mut rest = line;
        while let Some(at) = find(rest, b"\"data\":") {
            rest = &rest[at..];
            if let (Some(0), Some(seq)) = (field_u64(rest, b"\"p\":"), field_u64(rest, b"\"s\":")) {
                if let Ok(seq) = u32::try_from(seq) {
                    self.publication(seq);
                }
            }
        }
        // The reply's own offset is the stream's top; recovered publications carry lower ones.
        let mut top = 0;
        let mut rest = line;
        while let Some(at) = find(rest, b"\"offset\":") {
            top = top.max(field_u64(&rest[at - 9..], b"\"offset\":").unwrap_or(0));
            rest = &rest[at..];
        }
        let epoch = find(line, b"\"epoch\":\"").map(|at| {
            let e = &line[at..];
            String::from_utf8_lossy(&e[..e.iter().position(|&b| b == b'"').unwrap_or(0)]).into_owned()
        });
        // A new epoch is a new stream: offsets of the old one mean nothing in it.
        self.offset = if epoch != self.epoch { top } else { self.offset.max(top) };
        self.epoch = epoch;
        self.subscribed_once = true;
        find(line, b"\"recovered\":true").is_some()
    }

    fn subscribe_command(&self) -> String {
        match &self.epoch {
            None => format!("{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\",\"recoverable\":true}}}}"),
            Some(epoch) => format!(
                "{{\"id\":2,\"subscribe\":{{\"channel\":\"{CHANNEL}\",\"recoverable\":true,\"recover\":true,\"offset\":{},\"epoch\":\"{epoch}\"}}}}",
                self.offset
            ),
        }
    }
}

/// How a session ended.
enum Outcome {
    /// The attempt failed before the client was subscribed.
    Failed(Failure),
    /// The server ended an established session.
    Ended(String),
    /// The run is over (or this client has everything).
    Done,
}

/// Runs the clients (and the publisher) as `p` describes and returns the timeline and totals.
pub async fn run(p: &ReconnectParams) -> Result<ReconnectReport, BenchError> {
    let target = p.validate()?;
    let limit = crate::proc::raise_nofile_limit();
    if p.clients + 64 > limit {
        return Err(BenchError::invalid(
            "clients",
            format!("{} clients exceed the open-file limit ({limit}); run several processes", p.clients),
        ));
    }
    let addr: SocketAddr = target.resolve(None).await?;
    let ep = Endpoint { addr, host: target.host_header(), path: target.path.clone(), deflate: false, tls: None };
    let start = now_ns();
    let end = start + ns(p.duration);
    let slots = (ns(p.duration + p.settle) / ns(p.bucket)) as usize + 2;
    let counters = || (0..slots).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let shared = Arc::new(Shared {
        start,
        bucket_ns: ns(p.bucket),
        handshakes: counters(),
        resubscribes: counters(),
        disconnects: counters(),
        failed: counters(),
        initial: AtomicU64::new(0),
        initial_done: AtomicU64::new(0),
        recovered: AtomicU64::new(0),
        not_recovered: AtomicU64::new(0),
        rare: Mutex::new(Rare::default()),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let ramp = Arc::new(Semaphore::new(p.window as usize));
    let ctx = Arc::new(Ctx { ep: ep.clone(), p: p.clone(), shared: shared.clone(), buffers: Buffers::pool() });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..p.clients {
        tasks.spawn(client(ctx.clone(), phase_rx.clone(), ramp.clone()));
    }

    // Every client subscribed once (or the run is over) before the publisher starts.
    while shared.initial.load(Ordering::Relaxed) < p.clients && now_ns() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if shared.initial.load(Ordering::Relaxed) == p.clients {
        shared.initial_done.store(now_ns(), Ordering::Relaxed);
        if p.progress {
            eprintln!(
                "reconnect: all {} clients subscribed at {:.2}s",
                p.clients,
                (now_ns() - start) as f64 / SECOND as f64
            );
        }
    }
    let (published, retries) = match &p.api_key {
        Some(key) => publish(&ep, key, p, end).await,
        None => {
            sleep_until(end).await;
            (0, 0)
        }
    };
    let _ = phase_tx.send(Phase::Settle(published));
    let settle_end = now_ns() + ns(p.settle);
    let stopper = tokio::spawn(async move {
        sleep_until(settle_end).await;
        let _ = phase_tx.send(Phase::Stop);
        phase_tx
    });
    let mut positions = Vec::with_capacity(p.clients as usize);
    let mut not_connected = 0;
    // Every client task ends by the settle deadline plus one connect timeout; bounded again here.
    let hard_end = tokio::time::Instant::now() + p.settle + p.connect_timeout * 2 + Duration::from_secs(5);
    while let Ok(Some(r)) = tokio::time::timeout_at(hard_end, tasks.join_next()).await {
        if let Ok((pos, connected)) = r {
            not_connected += u64::from(!connected);
            positions.push(pos);
        }
    }
    not_connected += p.clients - positions.len() as u64;
    tasks.abort_all();
    stopper.abort();

    let mut report = ReconnectReport {
        params: Some(p.clone()),
        clients: p.clients,
        bucket_s: p.bucket.as_secs_f64(),
        initial: shared.initial.load(Ordering::Relaxed),
        recovered: shared.recovered.load(Ordering::Relaxed),
        not_recovered: shared.not_recovered.load(Ordering::Relaxed),
        not_connected_at_end: not_connected,
        published: u64::from(published),
        publish_retries: retries,
        ..ReconnectReport::default()
    };
    report.reconnected = report.recovered + report.not_recovered;
    let secs = |t: u64| (t.saturating_sub(start)) as f64 / SECOND as f64;
    let done = shared.initial_done.load(Ordering::Relaxed);
    report.initial_done_s = (done > 0).then(|| secs(done));
    for pos in &positions {
        report.received += pos.received;
        report.duplicated += pos.duplicated;
        report.lost += pos.lost + u64::from(published.saturating_sub(pos.last_seq));
    }
    let rare = shared.rare();
    report.disconnect_reasons = rare.disconnect_reasons.clone();
    report.failure_reasons = rare.failure_reasons.clone();
    report.first_disconnect_s = rare.first_disconnect.map(secs);
    report.last_reconnect_s = rare.last_reconnect.map(secs);
    let mut gaps = rare.gaps.clone();
    gaps.sort_unstable();
    let pick = |q: f64| {
        if gaps.is_empty() {
            0.0
        } else {
            gaps[((gaps.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
        }
    };
    report.gap_ms = [pick(0.5), pick(0.99), pick(1.0)];
    let first_disconnect_slot = rare.first_disconnect.map(|t| shared.slot(t));
    drop(rare);
    let load = |v: &[AtomicU64], i: usize| v[i].load(Ordering::Relaxed);
    let last = (0..slots)
        .rev()
        .find(|&i| load(&shared.handshakes, i) + load(&shared.disconnects, i) + load(&shared.failed, i) > 0)
        .unwrap_or(0);
    report.timeline = (0..=last)
        .map(|i| Bucket {
            t: i as f64 * report.bucket_s,
            handshakes: load(&shared.handshakes, i),
            resubscribes: load(&shared.resubscribes, i),
            disconnects: load(&shared.disconnects, i),
            failed: load(&shared.failed, i),
        })
        .collect();
    if let Some(from) = first_disconnect_slot {
        report.peak_per_s =
            report.timeline.iter().skip(from).map(|b| b.resubscribes).max().unwrap_or(0) as f64 / report.bucket_s;
    }
    if p.progress {
        eprintln!("reconnect: done at {:.2}s", secs(now_ns()));
    }
    Ok(report)
}

/// One client, from its first connection to the end of the run. Returns its accounting and whether it
/// was subscribed at the end.
async fn client(ctx: Arc<Ctx>, mut phase: watch::Receiver<Phase>, ramp: Arc<Semaphore>) -> (Position, bool) {
    let (p, shared) = (&ctx.p, &ctx.shared);
    let mut pos = Position::default();
    let mut attempt: u32 = 0;
    let mut disconnected_at: Option<u64> = None;
    let mut permit = ramp.acquire_owned().await.ok();
    loop {
        if *phase.borrow() == Phase::Stop {
            return (pos, false);
        }
        let outcome = session(&ctx, &mut phase, &mut pos, &mut disconnected_at, &mut permit).await;
        match outcome {
            Outcome::Done => return (pos, true),
            Outcome::Failed(f) => {
                shared.failed(&f);
                attempt = attempt.saturating_add(1);
            }
            Outcome::Ended(reason) => {
                let at = now_ns();
                shared.disconnected(reason, at);
                disconnected_at = Some(at);
                attempt = 0;
            }
        }
        // Full jitter: uniform in [0, min(max, min·2^attempt)).
        let cap = p.backoff_min.saturating_mul(1u32 << attempt.min(16)).min(p.backoff_max);
        let delay = cap.mul_f64(fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_stop(&mut phase) => return (pos, false),
        }
    }
}

async fn wait_stop(phase: &mut watch::Receiver<Phase>) {
    while *phase.borrow_and_update() != Phase::Stop {
        if phase.changed().await.is_err() {
            return;
        }
    }
}

/// One connection: open, connect, subscribe (recovering), hold.
async fn session(
    ctx: &Ctx,
    phase: &mut watch::Receiver<Phase>,
    pos: &mut Position,
    disconnected_at: &mut Option<u64>,
    ramp: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> Outcome {
    let Ctx { ep, p, shared, buffers } = ctx;
    let deadline = tokio::time::Instant::now() + p.connect_timeout;
    let mut conn = match open(ep, None, buffers, p.connect_timeout).await {
        Ok(o) => o.conn,
        Err(f) => return Outcome::Failed(f),
    };
    let resubscribe = pos.subscribed_once;
    conn.tx.frame(OpCode::Text, br#"{"id":1,"connect":{}}"#);
    let setup = async {
        reply(&mut conn, pos, 1).await?;
        let cmd = pos.subscribe_command();
        conn.tx.frame(OpCode::Text, cmd.as_bytes());
        reply(&mut conn, pos, 2).await
    };
    let setup = tokio::time::timeout_at(deadline, setup).await;
    // The first connection's place in the ramp is given back once it is set up (or failed).
    ramp.take();
    let recovered = match setup {
        Ok(Ok(r)) => r,
        Ok(Err(f)) => return Outcome::Failed(f),
        Err(_) => return Outcome::Failed(Failure::Timeout),
    };
    let now = now_ns();
    let slot = shared.slot(now);
    shared.handshakes[slot].fetch_add(1, Ordering::Relaxed);
    if resubscribe {
        shared.resubscribes[slot].fetch_add(1, Ordering::Relaxed);
        let counter = if recovered { &shared.recovered } else { &shared.not_recovered };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut rare = shared.rare();
        if let Some(at) = disconnected_at.take() {
            rare.gaps.push(now.saturating_sub(at));
        }
        rare.last_reconnect = Some(rare.last_reconnect.map_or(now, |l| l.max(now)));
    } else {
        shared.initial.fetch_add(1, Ordering::Relaxed);
    }
    hold(&mut conn, phase, pos).await
}

/// Flushes what is queued and reads until the reply to command `id`; for the subscribe reply, returns
/// `recovered`. Pushes that arrive first count as received.
async fn reply(conn: &mut Conn, pos: &mut Position, id: u64) -> Result<bool, Failure> {
    command_with(conn, id, |seen| match seen {
        Seen::Reply(line) => Some(id == 2 && pos.subscribed(line)),
        Seen::Push(line) => {
            pos.push(line);
            None
        }
    })
    .await
}

/// Holds a subscribed connection until the server ends it or the run is over.
async fn hold(conn: &mut Conn, phase: &mut watch::Receiver<Phase>, pos: &mut Position) -> Outcome {
    loop {
        match *phase.borrow_and_update() {
            Phase::Stop => return Outcome::Done,
            Phase::Settle(last) if pos.last_seq >= last => return Outcome::Done,
            _ => {}
        }
        let received = conn.receive(&mut |_: OpCode, bytes: &[u8], tx: &mut Tx| {
            for line in lines(bytes) {
                match parse_line(line) {
                    Line::Ping => tx.frame(OpCode::Text, b"{}"),
                    Line::Push(_) => pos.push(line),
                    _ => {}
                }
            }
        });
        match received {
            Ok(None) => conn.release(),
            Ok(Some(Ended::CloseFrame(code))) => return Outcome::Ended(format!("close {}", code.0)),
            Ok(Some(Ended::Eof)) => return Outcome::Ended("eof".into()),
            Err(f) => return Outcome::Ended(f.label()),
        }
        tokio::select! {
            r = conn.stream.readable() => {
                if let Err(e) = r {
                    return Outcome::Ended(classify(&e).label());
                }
            }
            r = conn.stream.writable(), if conn.tx.pending() > 0 => {
                if let Err(e) = r.and_then(|()| conn.tx.flush(&conn.stream)) {
                    return Outcome::Ended(classify(&e).label());
                }
            }
            _ = phase.changed() => {}
        }
    }
}

/// Publishes sequence numbers 1, 2, ... at `p.rate` until `end`, retrying each until a server takes it.
/// Returns the last number published and the retries.
async fn publish(ep: &Endpoint, key: &str, p: &ReconnectParams, end: u64) -> (u32, u64) {
    let mut publisher = HttpPublisher::new(ep.addr, None, None, &ep.host, key);
    let interval = Duration::from_secs_f64(1.0 / p.rate);
    let mut next = tokio::time::Instant::now();
    let mut seq: u32 = 0;
    let mut retries = 0;
    let mut data = Vec::with_capacity(p.size);
    while now_ns() < end {
        tokio::time::sleep_until(next).await;
        next += interval;
        seq += 1;
        loop {
            data.clear();
            write_data(&mut data, now_ns(), 0, seq, p.size);
            if publisher.publish(&data, p.connect_timeout).await.is_ok() {
                break;
            }
            retries += 1;
            if now_ns() >= end + ns(p.settle) {
                // No server took it in time: it was never published.
                return (seq - 1, retries);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A server that is down for long must not make the publisher burst to catch up.
        next = next.max(tokio::time::Instant::now());
    }
    (seq, retries)
}

/// Draws handshakes (and disconnects) per second over the run as SVG.
pub fn write_svg(report: &ReconnectReport, title: &str, path: &Path) -> Result<(), BenchError> {
    use plotters::prelude::*;
    let fail = |e: String| BenchError::Output { path: path.display().to_string(), message: e };
    if report.timeline.is_empty() {
        return Err(fail("nothing to plot: no events".into()));
    }
    let per_s = |v: u64| v as f64 / report.bucket_s;
    let last = report.timeline.len() as f64 * report.bucket_s;
    let max = report.timeline.iter().map(|b| per_s(b.handshakes.max(b.disconnects))).fold(1.0, f64::max) * 1.1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..last, 0.0..max)?;
        chart.configure_mesh().x_desc("seconds from start").y_desc("per second").draw()?;
        let series = |f: fn(&Bucket) -> u64| {
            report.timeline.iter().map(move |b| (b.t + report.bucket_s / 2.0, per_s(f(b)))).collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(series(|b| b.handshakes), &BLUE))?
            .label("handshakes (connect + subscribe)/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(series(|b| b.disconnects), &RED))?
            .label("disconnects/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| fail(e.to_string()))
}
