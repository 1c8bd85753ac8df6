//! Fan-out: S subscribers, P publishers, every published message expected at every subscriber.
//!
//! Each message carries its (intended) send time, its publisher's id and a per-publisher sequence
//! number. A subscriber records delivery latency from the timestamp, counts what it received, and
//! remembers the highest sequence number seen per publisher, so a smaller one is counted out of order.
//! Loss is counted, not guessed: when sending stops, the processes add up how many messages were
//! published (`Link::published`), and each subscriber's loss is that total minus what it received,
//! after a bounded drain (ended early once every local subscriber has everything, or after a quiet
//! second without deliveries).
//!
//! Subscribers connect (and subscribe) before any publisher sends. Publishers send at `--rate` (shared
//! evenly, schedules offset so they don't send in bursts) with latency from the intended send time, or,
//! with `--rate 0`, as fast as a window allows: at most W messages per publisher not yet seen by a
//! *probe* (this process's first subscriber). Without a local subscriber, TCP backpressure is the window.
//!
//! Raw publishers read and discard whatever the server sends them (a broadcast server may echo to them
//! too); not reading would stall the server's writes.
//!
//! With `--protocol tcp` ([`tcp`]) subscribers and publishers speak ringcast's TCP binary protocol
//! instead; the run, the payload header and every measurement are the same.

pub(crate) mod tcp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringcast_wire::OpCode;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::{
    end_connection, join_all, open_many, run_window, serve_until_run, source_for, wait_for_run, Link, Opening, Phase,
    Setup, Share, SubscriberTally, Tally, CLOSE_WAIT, DRAIN,
};
use crate::centrifuge::{self, lines, parse_line, HttpPublisher, Line};
use crate::client::{Buffers, Conn, Endpoint, Handler, Tx};
use crate::clock::{instant_at, next_slot, now_ns, ns, sleep_until, Schedule, Slot, SECOND};
use crate::error::BenchError;
use crate::failure::{classify, Failure, Failures};
use crate::meter::{Batch, Meter};
use crate::params::{Params, PayloadKind, Protocol};
use crate::payload::{fanout_header, Template, FANOUT_HEADER};
use crate::proc::self_rss;

use super::echo::OPEN_CONCURRENCY;

/// The drain ends early when no delivery arrived for this long.
const QUIET: u64 = SECOND;
/// A windowed publisher whose probe acknowledged nothing for this long stops waiting for it.
const STALL: Duration = Duration::from_secs(1);
/// A publisher stops adding to its write queue beyond this many unwritten bytes.
const MAX_PENDING: usize = 256 * 1024;

/// What the probe subscriber has seen of one local publisher.
#[derive(Default)]
struct Ack {
    /// Highest sequence number seen, plus one.
    seen: AtomicU64,
    notify: Notify,
}

/// Which server each of this share's subscribers connects to: all to `ep` (`--url`), or, with `--urls`,
/// subscriber i of S to `sub_urls[i * len / S]` (contiguous blocks, the same split in every process).
async fn subscriber_blocks(
    p: &Params,
    ep: &Endpoint,
    share: &Share,
) -> Result<Vec<(Endpoint, std::ops::Range<u64>)>, BenchError> {
    if p.sub_urls.is_empty() {
        return Ok(vec![(ep.clone(), share.subscribers.clone())]);
    }
    let n = p.sub_urls.len() as u64;
    let mut out = Vec::with_capacity(p.sub_urls.len());
    for (k, url) in p.sub_urls.iter().enumerate() {
        let k = k as u64;
        // First subscriber index of block k: the smallest i with i * n / S >= k.
        let block = (k * p.subscribers).div_ceil(n)..((k + 1) * p.subscribers).div_ceil(n);
        let range = block.start.max(share.subscribers.start)..block.end.min(share.subscribers.end);
        if range.start < range.end {
            out.push((crate::endpoint_of(p, url).await?, range));
        }
    }
    Ok(out)
}

pub(crate) async fn run<L: Link>(p: &Params, ep: &Endpoint, share: &Share, link: &mut L) -> Result<Tally, BenchError> {
    let meter = Arc::new(Meter::new());
    let mut tally = Tally { rss_before: self_rss(), ..Tally::default() };
    let centrifugo = p.protocol == Protocol::Centrifuge;

    // Subscribers first: every one of them must be listening before anything is published.
    let tcp_subs = if p.protocol == Protocol::Tcp {
        tcp::open_many(p, ep.addr, share.subscribers.clone(), true, &mut tally, &meter, |o, e| link.preparing(o, e))
            .await
    } else {
        Vec::new()
    };
    let mut subs = Vec::new();
    if p.protocol != Protocol::Tcp {
        for (sub_ep, range) in subscriber_blocks(p, ep, share).await? {
            subs.extend(
                open_many(
                    p,
                    &sub_ep,
                    range,
                    Opening {
                        buffers: Buffers::Own,
                        concurrency: OPEN_CONCURRENCY,
                        setup: if centrifugo { Setup::CentrifugeSubscribe } else { Setup::None },
                    },
                    &mut tally,
                    &meter,
                    |o, e| link.preparing(o, e),
                )
                .await,
            );
        }
    }

    // Publishers; their source addresses continue after the subscribers'.
    let mut pubs: Vec<(u32, PubConn)> = Vec::new();
    if p.protocol == Protocol::Tcp {
        let offset = p.subscribers;
        let range = (offset + share.publishers.start)..(offset + share.publishers.end);
        let opened = tcp::open_many(p, ep.addr, range, false, &mut tally, &meter, |o, e| link.preparing(o, e)).await;
        pubs.extend(opened.into_iter().map(|(i, c)| ((i - offset) as u32, PubConn::Tcp(Box::new(c)))));
    } else if let Some(key) = p.api_key.as_deref().filter(|_| centrifugo) {
        for j in share.publishers.clone() {
            tally.attempted += 1;
            let mut http = HttpPublisher::new(ep.addr, source_for(p, p.subscribers + j), ep.tls.clone(), &ep.host, key);
            match tokio::time::timeout(p.connect_timeout, http.connect()).await.unwrap_or(Err(Failure::Timeout)) {
                Ok(()) => {
                    tally.established += 1;
                    pubs.push((j as u32, PubConn::Http(Box::new(http))));
                }
                Err(f) => tally.fail(&meter, &f),
            }
        }
    } else {
        let offset = p.subscribers;
        let opened = open_many(
            p,
            ep,
            (offset + share.publishers.start)..(offset + share.publishers.end),
            Opening {
                buffers: Buffers::Own,
                concurrency: OPEN_CONCURRENCY,
                setup: if centrifugo { Setup::CentrifugeConnect } else { Setup::None },
            },
            &mut tally,
            &meter,
            |o, e| link.preparing(o, e),
        )
        .await;
        pubs.extend(opened.into_iter().map(|(i, c)| ((i - offset) as u32, PubConn::Ws(Box::new(c)))));
    }
    tally.rss_after = self_rss();

    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let delivered = Arc::new(AtomicU64::new(0));
    let local_pubs = share.publishers.end - share.publishers.start;
    let acks: Arc<Vec<Ack>> = Arc::new((0..local_pubs).map(|_| Ack::default()).collect());
    let probe_exists = !subs.is_empty() || !tcp_subs.is_empty();

    let n_subs = (subs.len() + tcp_subs.len()) as u64;
    let mut sub_set = JoinSet::new();
    for (k, (index, conn)) in subs.into_iter().enumerate() {
        let cfg = SubCfg {
            index,
            centrifugo,
            publishers: p.publishers as usize,
            delivered: delivered.clone(),
            probe: (k == 0).then(|| (share.publishers.start, acks.clone())),
        };
        sub_set.spawn(subscriber(conn, cfg, meter.clone(), phase_rx.clone()));
    }
    for (k, (index, conn)) in tcp_subs.into_iter().enumerate() {
        let cfg = SubCfg {
            index,
            centrifugo: false,
            publishers: p.publishers as usize,
            delivered: delivered.clone(),
            probe: (k == 0).then(|| (share.publishers.start, acks.clone())),
        };
        sub_set.spawn(tcp::subscriber(conn, cfg, meter.clone(), phase_rx.clone()));
    }
    let n_pubs = pubs.len();
    let rate = if share.rate > 0.0 && n_pubs > 0 { share.rate / n_pubs as f64 } else { 0.0 };
    let mut pub_set = JoinSet::new();
    for (k, (id, conn)) in pubs.into_iter().enumerate() {
        let cfg = PubCfg {
            id,
            size: p.size,
            rate,
            offset: k as f64 / n_pubs.max(1) as f64,
            window: p.window,
            ack: probe_exists.then(|| (acks.clone(), (u64::from(id) - share.publishers.start) as usize)),
            timeout: p.connect_timeout,
            centrifugo,
            payload: p.payload,
        };
        pub_set.spawn(publisher(conn, cfg, meter.clone(), phase_rx.clone()));
    }
    drop(phase_rx);

    let (window, mut ticker) = run_window(p, link, &meter, &mut tally, &phase_tx).await?;

    // Publishers stop and report; subscribers keep receiving.
    let _ = phase_tx.send(Phase::Drain);
    let published = {
        let (tx, _keep) = watch::channel(Phase::Drain);
        join_all(&mut ticker, &mut pub_set, window.to + ns(DRAIN), &tx, CLOSE_WAIT * 2).await
    };
    let mut local_published = 0;
    for r in &published {
        local_published += r.published;
        tally.stalls += r.stalls;
        tally.failures.merge(&r.failures);
    }
    tally.sent = local_published;
    let total = ticker.link.published(local_published).await?;

    // Drain: until every local subscriber has `total`, a quiet second, or the deadline.
    let target = total.saturating_mul(n_subs);
    let drained = async {
        let mut last = u64::MAX;
        let mut last_change = now_ns();
        loop {
            let d = delivered.load(Ordering::Relaxed);
            let now = now_ns();
            if d >= target {
                break;
            }
            if d != last {
                last = d;
                last_change = now;
            } else if now - last_change > QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    ticker.until(now_ns() + ns(DRAIN), drained).await;
    let _ = phase_tx.send(Phase::Stop);
    let subs = join_all(&mut ticker, &mut sub_set, now_ns() + ns(CLOSE_WAIT * 2), &phase_tx, CLOSE_WAIT).await;
    ticker.flush();
    for (s, foreign, failure, held, wire) in subs {
        tally.foreign += foreign;
        tally.wire_bytes += wire.bytes;
        tally.deflate += u64::from(wire.deflate);
        tally.received += s.received;
        tally.out_of_order += s.out_of_order;
        tally.held += u64::from(held);
        if let Some(f) = &failure {
            tally.failures.add(f);
        }
        tally.subscribers.push(s);
    }
    tally.subscribers.sort_by_key(|s| s.index);
    let totals = meter.totals();
    tally.latency = totals.latency;
    tally.received_in_window = totals.messages;
    tally.bytes_in_window = totals.bytes;
    Ok(tally)
}

struct SubCfg {
    index: u64,
    centrifugo: bool,
    /// Publishers in all (sequence numbers are tracked per publisher).
    publishers: usize,
    delivered: Arc<AtomicU64>,
    /// The probe (first local subscriber) acknowledges local publishers' messages for their windows:
    /// the first local publisher's global id, and one `Ack` per local publisher.
    probe: Option<(u64, Arc<Vec<Ack>>)>,
}

/// A subscriber's message handling.
struct Deliveries<'m> {
    cfg: SubCfg,
    meter: &'m Meter,
    batch: Batch,
    /// The window's start (its nanosecond clock); 0 until the subscriber has seen it.
    start: u64,
    /// Publications that arrived before the subscriber saw the start: (timestamp, publisher, sequence,
    /// bytes), counted by [`Deliveries::started`]. With the load spread over processes, one process can
    /// learn of the start after another's publishers began at it; such a publication used to be ignored
    /// and counted as lost (1 per subscriber in such a run).
    early: Vec<(u64, u32, u32, usize)>,
    /// Per publisher: highest sequence number seen, plus one (0: none yet).
    last: Vec<u64>,
    received: u64,
    out_of_order: u64,
    foreign: u64,
    /// Deliveries in the current read, added to the shared count once per read.
    pass: u64,
}

impl<'m> Deliveries<'m> {
    fn new(cfg: SubCfg, meter: &'m Meter) -> Self {
        let last = vec![0; cfg.publishers];
        Deliveries {
            cfg,
            meter,
            batch: Batch::default(),
            start: 0,
            early: Vec::new(),
            last,
            received: 0,
            out_of_order: 0,
            foreign: 0,
            pass: 0,
        }
    }

    #[inline]
    fn deliver(&mut self, ts: u64, publisher: u32, seq: u32, bytes: usize) {
        if self.start == 0 {
            self.early.push((ts, publisher, seq, bytes));
            return;
        }
        let Some(last) = self.last.get_mut(publisher as usize) else {
            self.foreign += 1;
            return;
        };
        if ts < self.start || ts > self.batch.now() {
            self.foreign += 1;
            return;
        }
        let seq = u64::from(seq);
        if seq < *last {
            self.out_of_order += 1;
        } else {
            *last = seq + 1;
        }
        self.received += 1;
        self.pass += 1;
        self.batch.push(self.meter, ts, bytes);
        if let Some((base, acks)) = &self.cfg.probe {
            if let Some(ack) = u64::from(publisher).checked_sub(*base).and_then(|i| acks.get(i as usize)) {
                ack.seen.fetch_max(seq + 1, Ordering::Relaxed);
                ack.notify.notify_one();
            }
        }
    }
}

impl Deliveries<'_> {
    /// The window starts at `start`: what arrived before the subscriber saw it is counted now (those
    /// from before the start are not ours, as for any other).
    fn started(&mut self, start: u64) {
        self.start = start;
        let early = std::mem::take(&mut self.early);
        if early.is_empty() {
            return;
        }
        self.begin();
        for (ts, p, s, bytes) in early {
            self.deliver(ts, p, s, bytes);
        }
        self.end();
    }
}

impl Handler for Deliveries<'_> {
    fn begin(&mut self) {
        self.batch.begin(now_ns());
    }

    fn message(&mut self, _: OpCode, payload: &[u8], tx: &mut Tx) {
        if self.cfg.centrifugo {
            for line in lines(payload) {
                match parse_line(line) {
                    Line::Ping => tx.frame(OpCode::Text, b"{}"),
                    Line::Push(Some((ts, p, s))) => self.deliver(ts, p, s, line.len()),
                    Line::Push(None) => self.foreign += 1,
                    Line::Reply { .. } | Line::Other => {}
                }
            }
        } else {
            match fanout_header(payload) {
                Some((ts, p, s)) if payload.len() >= FANOUT_HEADER => self.deliver(ts, p, s, payload.len()),
                _ => self.foreign += 1,
            }
        }
    }

    fn end(&mut self) {
        self.batch.flush(self.meter);
        if self.pass > 0 {
            self.cfg.delivered.fetch_add(std::mem::take(&mut self.pass), Ordering::Relaxed);
        }
    }
}

async fn subscriber(
    mut conn: Conn,
    cfg: SubCfg,
    meter: Arc<Meter>,
    mut phase: watch::Receiver<Phase>,
) -> (SubscriberTally, u64, Option<Failure>, bool, Wire) {
    let mut d = Deliveries::new(cfg, &meter);
    let mut held = false;
    // Before the start the subscriber's own handler answers pings and keeps what arrives.
    let (window, mut failure) = match serve_until_run(&mut conn, &mut phase, &mut d).await {
        Ok(w) => (w, None),
        Err(f) => (None, Some(f)),
    };
    // One pinned wait for the stop, polled (not re-registered) on every iteration.
    let stop = phase.wait_for(|p| *p == Phase::Stop);
    tokio::pin!(stop);
    // Bytes on the wire from the start of the run, against deliveries counted from the same moment.
    let mut wire_from = conn.rx.wire_bytes();
    if let Some(window) = window {
        wire_from = conn.rx.wire_bytes();
        d.started(window.start);
        loop {
            tokio::select! {
                r = conn.stream.readable() => {
                    match r.map_err(|e| classify(&e)).and_then(|()| conn.receive(&mut d)) {
                        Ok(None) => {}
                        Ok(Some(end)) => {
                            failure = Some(end.failure());
                            break;
                        }
                        Err(f) => {
                            failure = Some(f);
                            break;
                        }
                    }
                }
                r = conn.stream.writable(), if conn.tx.pending() > 0 => {
                    if let Err(e) = r.and_then(|()| conn.tx.flush(&conn.stream)) {
                        failure = Some(classify(&e));
                        break;
                    }
                }
                _ = &mut stop => {
                    held = true;
                    break;
                }
            }
        }
    }
    let wire = Wire { bytes: conn.rx.wire_bytes() - wire_from, deflate: conn.rx.deflate() };
    end_connection(conn, &meter, failure.is_some()).await;
    let t = SubscriberTally { index: d.cfg.index, received: d.received, out_of_order: d.out_of_order };
    (t, d.foreign, failure, held, wire)
}

/// What a subscriber's socket carried during the run, and whether it was compressed.
struct Wire {
    bytes: u64,
    deflate: bool,
}

enum PubConn {
    Ws(Box<Conn>),
    Http(Box<HttpPublisher>),
    Tcp(Box<crate::tcp::TcpClient>),
}

struct PubCfg {
    id: u32,
    size: usize,
    /// Messages per second for this publisher; 0: windowed.
    rate: f64,
    offset: f64,
    window: u64,
    /// The probe's acknowledgements and this publisher's slot in them.
    ack: Option<(Arc<Vec<Ack>>, usize)>,
    timeout: Duration,
    centrifugo: bool,
    payload: PayloadKind,
}

/// A Centrifugo publication's data, padded as `--payload` says.
fn write_payload(kind: PayloadKind, out: &mut Vec<u8>, ts: u64, id: u32, seq: u32, size: usize) {
    match kind {
        PayloadKind::Filler => centrifuge::write_data(out, ts, id, seq, size),
        PayloadKind::Json => centrifuge::write_json_data(out, ts, id, seq, size),
    }
}

#[derive(Debug, Default)]
struct PubTally {
    published: u64,
    stalls: u64,
    failures: Failures,
}

async fn publisher(conn: PubConn, cfg: PubCfg, meter: Arc<Meter>, phase: watch::Receiver<Phase>) -> PubTally {
    let t = match conn {
        PubConn::Ws(c) => ws_publisher(*c, cfg, &meter, phase).await,
        PubConn::Http(h) => http_publisher(*h, cfg, &meter, phase).await,
        PubConn::Tcp(c) => tcp::publisher(*c, cfg, &meter, phase).await,
    };
    meter.open.fetch_sub(1, Ordering::Relaxed);
    t
}

/// The open-loop schedule of one publisher: message k is due at `base + (offset + k) · interval`.
/// Produces a WebSocket publisher's messages.
struct Publish {
    /// Raw: the pre-encoded frame. Centrifugo: `None` (commands are JSON, encoded per message).
    template: Option<Template>,
    data: Vec<u8>,
    command: Vec<u8>,
    next_command: u64,
    id: u32,
    size: usize,
    payload: PayloadKind,
    seq: u32,
    sent: u64,
    sending: bool,
    until: u64,
    schedule: Option<Schedule>,
    window: u64,
    ack: Option<(Arc<Vec<Ack>>, usize)>,
    /// Messages forgiven after a stall (their acknowledgement never came).
    forgiven: u64,
}

impl Publish {
    fn seen(&self) -> Option<u64> {
        let (acks, i) = self.ack.as_ref()?;
        Some(acks.get(*i)?.seen.load(Ordering::Relaxed))
    }

    /// Windowed mode with a probe, and the window is full.
    fn window_full(&self) -> bool {
        match (self.schedule.is_none() && self.sending, self.seen()) {
            (true, Some(seen)) => self.sent >= seen + self.forgiven + self.window,
            _ => false,
        }
    }

    /// Queues every message allowed now.
    fn fill(&mut self, tx: &mut Tx, now: u64) {
        while self.sending && tx.pending() < MAX_PENDING {
            let ts = match next_slot(&mut self.schedule, now, self.until) {
                Slot::Done => {
                    self.sending = false;
                    break;
                }
                Slot::Wait => break,
                // Closed loop with a probe: the window of unseen messages is full.
                Slot::Send(_) if self.window_full() => break,
                Slot::Send(ts) => ts,
            };
            self.emit(tx, ts);
        }
    }

    fn emit(&mut self, tx: &mut Tx, ts: u64) {
        match &mut self.template {
            Some(t) => {
                t.set_fanout(ts, self.id, self.seq);
                tx.raw(t.bytes());
            }
            None => {
                self.data.clear();
                write_payload(self.payload, &mut self.data, ts, self.id, self.seq, self.size);
                self.command.clear();
                centrifuge::write_publish(&mut self.command, self.next_command, &self.data);
                self.next_command += 1;
                tx.frame(OpCode::Text, &self.command);
            }
        }
        self.seq = self.seq.wrapping_add(1);
        self.sent += 1;
    }

    /// When the schedule next needs us (open loop).
    fn next_due(&self, pending: usize) -> Option<u64> {
        match &self.schedule {
            Some(s) if self.sending && pending < MAX_PENDING => Some(s.due()),
            _ => None,
        }
    }
}

/// A publisher's view of what the server sends back: Centrifugo replies (and pings); anything else is
/// discarded.
struct Replies {
    centrifugo: bool,
    ok: u64,
    rejected: u64,
    example: Option<String>,
}

impl Handler for Replies {
    fn message(&mut self, _: OpCode, payload: &[u8], tx: &mut Tx) {
        if !self.centrifugo {
            return;
        }
        for line in lines(payload) {
            match parse_line(line) {
                Line::Ping => tx.frame(OpCode::Text, b"{}"),
                Line::Reply { id, error } if id >= FIRST_PUBLISH_ID => {
                    if error {
                        self.rejected += 1;
                        if self.example.is_none() {
                            self.example = Some(format!("publish rejected: {}", String::from_utf8_lossy(line)));
                        }
                    } else {
                        self.ok += 1;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Before the start: answers Centrifugo's pings (`{}`), ignores the rest.
struct Pings(bool);

impl Handler for Pings {
    fn message(&mut self, _: OpCode, payload: &[u8], tx: &mut Tx) {
        if self.0 && lines(payload).any(|l| parse_line(l) == Line::Ping) {
            tx.frame(OpCode::Text, b"{}");
        }
    }
}

/// Command ids 1 and 2 are connect and subscribe.
const FIRST_PUBLISH_ID: u64 = 3;

async fn ws_publisher(mut conn: Conn, cfg: PubCfg, meter: &Meter, mut phase: watch::Receiver<Phase>) -> PubTally {
    let mut t = PubTally::default();
    let window = match serve_until_run(&mut conn, &mut phase, &mut Pings(cfg.centrifugo)).await {
        Ok(Some(w)) => w,
        Ok(None) => {
            conn.close(CLOSE_WAIT).await;
            return t;
        }
        Err(f) => {
            meter.failed();
            t.failures.add(&f);
            return t;
        }
    };
    let mut s = Publish {
        template: (!cfg.centrifugo).then(|| Template::new(cfg.size, conn.tx.key())),
        data: Vec::with_capacity(cfg.size + 64),
        command: Vec::with_capacity(cfg.size + 128),
        next_command: FIRST_PUBLISH_ID,
        id: cfg.id,
        size: cfg.size,
        payload: cfg.payload,
        seq: 0,
        sent: 0,
        sending: true,
        until: window.to,
        schedule: Schedule::new(cfg.rate, cfg.offset, window.start),
        window: cfg.window,
        ack: cfg.ack.clone(),
        forgiven: 0,
    };
    let mut replies = Replies { centrifugo: cfg.centrifugo, ok: 0, rejected: 0, example: None };
    let notify = cfg.ack.as_ref().and_then(|(acks, i)| acks.get(*i)).map(|a| &a.notify);
    // From here on the publisher keeps its own time (sending ends at `window.to`): watching the phase
    // channel would cost a registration per loop iteration.
    drop(phase);
    let timer = tokio::time::sleep_until(instant_at(0));
    tokio::pin!(timer);
    let mut armed: Option<u64> = None;
    let end = tokio::time::sleep_until(instant_at(window.to));
    tokio::pin!(end);

    // Armed while the window is full: fires when the probe's acknowledgements have not moved for a
    // second. It is re-armed only when they move, so unrelated wake-ups cannot postpone it.
    let stall = tokio::time::sleep_until(instant_at(0));
    tokio::pin!(stall);
    let mut stall_since_seen: Option<u64> = None;

    let mut failure: Option<Failure> = None;
    s.fill(&mut conn.tx, now_ns());
    if let Err(e) = conn.tx.flush(&conn.stream) {
        failure = Some(classify(&e));
    }
    while failure.is_none() && s.sending {
        let due = s.next_due(conn.tx.pending());
        if due != armed {
            if let Some(d) = due {
                timer.as_mut().reset(instant_at(d));
            }
            armed = due;
        }
        if s.schedule.is_none() {
            // Windowed: acknowledgements may have freed the window since the last fill (even before we
            // got to wait for them); top it up before sleeping.
            s.fill(&mut conn.tx, now_ns());
            if let Err(e) = conn.tx.flush(&conn.stream) {
                failure = Some(classify(&e));
                break;
            }
        }
        let full = s.window_full();
        if full {
            let seen = s.seen().unwrap_or(0);
            if stall_since_seen != Some(seen) {
                stall.as_mut().reset(tokio::time::Instant::now() + STALL);
                stall_since_seen = Some(seen);
            }
        } else {
            stall_since_seen = None;
        }
        tokio::select! {
            r = conn.stream.readable() => {
                failure = match r.map_err(|e| classify(&e)).and_then(|()| conn.receive(&mut replies)) {
                    Ok(None) => None,
                    Ok(Some(end)) => Some(end.failure()),
                    Err(f) => Some(f),
                };
            }
            r = conn.stream.writable(), if conn.tx.pending() > 0 => {
                failure = r.and_then(|()| conn.tx.flush(&conn.stream)).err().map(|e| classify(&e));
                if failure.is_none() {
                    s.fill(&mut conn.tx, now_ns());
                    failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
                }
            }
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                s.fill(&mut conn.tx, now_ns());
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
            _ = async { if let Some(n) = notify { n.notified().await } else { std::future::pending().await } }, if full => {
                s.fill(&mut conn.tx, now_ns());
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
            _ = &mut stall, if stall_since_seen.is_some() => {
                // The probe has not acknowledged anything for a second (lost messages, or it died):
                // forgive what is outstanding rather than stop.
                stall_since_seen = None;
                t.stalls += 1;
                s.forgiven = s.sent.saturating_sub(s.seen().unwrap_or(0));
                s.fill(&mut conn.tx, now_ns());
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
            _ = &mut end => {
                // Messages due before the end that the timer has not sent yet still go out.
                s.fill(&mut conn.tx, now_ns());
                s.sending = false;
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
        }
    }

    // Sending is over: write out what is queued, and (Centrifugo) collect the replies, bounded.
    let deadline = tokio::time::Instant::now() + CLOSE_WAIT * 2;
    if failure.is_none() {
        let finish = async {
            while conn.tx.pending() > 0 {
                conn.stream.writable().await?;
                conn.tx.flush(&conn.stream)?;
            }
            while cfg.centrifugo && replies.ok + replies.rejected < s.sent {
                conn.stream.readable().await?;
                if let Some(end) = conn.receive(&mut replies).map_err(|f| std::io::Error::other(f.detail()))? {
                    return Err(std::io::Error::other(end.failure().detail()));
                }
            }
            Ok::<(), std::io::Error>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout_at(deadline, finish).await {
            failure = Some(classify(&e));
        }
    }
    // What never left the queue was not published.
    let frame_len = s.template.as_ref().map_or(cfg.size.max(1), |t| t.bytes().len());
    let unsent = conn.tx.pending().div_ceil(frame_len) as u64;
    t.published = s.sent.saturating_sub(unsent).saturating_sub(replies.rejected);
    for _ in 0..replies.rejected {
        if let Some(ex) = &replies.example {
            t.failures.add(&Failure::Protocol(ex.clone()));
        }
    }
    match failure {
        Some(f) => {
            meter.failed();
            t.failures.add(&f);
        }
        None => conn.close(CLOSE_WAIT).await,
    }
    t
}

async fn http_publisher(
    mut h: HttpPublisher,
    cfg: PubCfg,
    meter: &Meter,
    mut phase: watch::Receiver<Phase>,
) -> PubTally {
    let mut t = PubTally::default();
    let Some(window) = wait_for_run(&mut phase).await else { return t };
    let mut schedule = Schedule::new(cfg.rate, cfg.offset, window.start);
    let mut data = Vec::with_capacity(cfg.size + 64);
    let mut seq: u32 = 0;
    let mut failed_in_a_row = 0u32;
    loop {
        if !matches!(*phase.borrow(), Phase::Run(_)) {
            break;
        }
        let ts = match &mut schedule {
            Some(s) => {
                let due = s.due();
                if due >= window.to {
                    break;
                }
                if due > now_ns() {
                    tokio::select! {
                        _ = sleep_until(due) => {}
                        changed = phase.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            continue;
                        }
                    }
                }
                s.advance();
                due
            }
            None => {
                let now = now_ns();
                if now >= window.to {
                    break;
                }
                now
            }
        };
        data.clear();
        write_payload(cfg.payload, &mut data, ts, cfg.id, seq, cfg.size);
        match h.publish(&data, cfg.timeout).await {
            Ok(()) => {
                seq = seq.wrapping_add(1);
                t.published += 1;
                failed_in_a_row = 0;
            }
            Err(f) => {
                meter.failed();
                t.failures.add(&f);
                failed_in_a_row += 1;
                if failed_in_a_row >= 3 {
                    // Don't hammer an API that keeps failing; the schedule's backlog keeps its latency honest.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    t
}
