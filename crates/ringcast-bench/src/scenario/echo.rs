//! Echo: C connections each keep up to W messages of S bytes in flight to an echo endpoint.
//!
//! Each message carries its send time; the echo brings it back, so round-trip latency needs no
//! per-message bookkeeping. Closed loop (the default, `--rate 0`): a connection sends its next message
//! as soon as an echo frees a slot in its window. Open loop (`--rate R`): each connection sends on a
//! fixed schedule (R/C per second, phases spread evenly); the timestamp is the *intended* send time, so
//! when a full window or a slow socket delays a send, that delay counts as latency instead of silently
//! thinning the schedule (coordinated omission).
//!
//! Frames are encoded once per connection ([`Template`]); sending patches 8 masked timestamp bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ringcast_wire::OpCode;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{
    end_connection, join_all, open_many, run_window, serve_until_run, ConnTally, Link, Opening, Phase, Setup, Share,
    Tally, CLOSE_WAIT, DRAIN,
};
use crate::client::{Buffers, Conn, Discard, Endpoint, Handler, Tx};
use crate::clock::{instant_at, next_slot, now_ns, ns, Schedule, Slot};
use crate::error::BenchError;
use crate::failure::{classify, Failure};
use crate::meter::{Batch, Meter};
use crate::params::Params;
use crate::payload::{timestamp, Template};
use crate::proc::self_rss;

/// Handshakes in flight while connecting.
pub(crate) const OPEN_CONCURRENCY: u64 = 256;

pub(crate) async fn run<L: Link>(p: &Params, ep: &Endpoint, share: &Share, link: &mut L) -> Result<Tally, BenchError> {
    let meter = Arc::new(Meter::new());
    let mut tally = Tally { rss_before: self_rss(), ..Tally::default() };
    let conns = open_many(
        p,
        ep,
        share.connections.clone(),
        Opening { buffers: Buffers::Own, concurrency: OPEN_CONCURRENCY, setup: Setup::None },
        &mut tally,
        &meter,
        |o, e| link.preparing(o, e),
    )
    .await;
    tally.rss_after = self_rss();

    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let n = conns.len();
    let rate = if share.rate > 0.0 && n > 0 { share.rate / n as f64 } else { 0.0 };
    let mut set = JoinSet::new();
    for (k, (_, conn)) in conns.into_iter().enumerate() {
        let cfg = Cfg { size: p.size, window: p.window, rate, offset: k as f64 / n.max(1) as f64 };
        set.spawn(connection(conn, cfg, meter.clone(), phase_rx.clone()));
    }
    drop(phase_rx);

    let (window, mut ticker) = run_window(p, link, &meter, &mut tally, &phase_tx).await?;
    let _ = phase_tx.send(Phase::Drain);
    let results = join_all(&mut ticker, &mut set, window.to + ns(DRAIN), &phase_tx, CLOSE_WAIT * 2).await;
    ticker.flush();
    for r in &results {
        r.add_to(&mut tally);
    }
    let totals = meter.totals();
    tally.latency = totals.latency;
    tally.received_in_window = totals.messages;
    tally.bytes_in_window = totals.bytes;
    Ok(tally)
}

#[derive(Debug, Clone, Copy)]
struct Cfg {
    size: usize,
    window: u64,
    /// Messages per second for this connection; 0: closed loop.
    rate: f64,
    /// Where in the schedule's period this connection sends (0..1), so connections don't send in lockstep.
    offset: f64,
}

/// Decides when the next message goes out, and sends it.
struct Sender {
    template: Template,
    window: u64,
    inflight: u64,
    sent: u64,
    sending: bool,
    /// No message is sent at or after this time.
    until: u64,
    schedule: Option<Schedule>,
}

impl Sender {
    /// Queues every message allowed now.
    fn fill(&mut self, tx: &mut Tx, now: u64) {
        while self.sending && self.inflight < self.window {
            let ts = match next_slot(&mut self.schedule, now, self.until) {
                Slot::Done => {
                    self.sending = false;
                    break;
                }
                Slot::Wait => break,
                Slot::Send(ts) => ts,
            };
            self.template.set(0, &ts.to_le_bytes());
            tx.raw(self.template.bytes());
            self.inflight += 1;
            self.sent += 1;
        }
    }

    /// When the timer must wake us (open loop, a free slot in the window).
    fn next_due(&self) -> Option<u64> {
        match &self.schedule {
            Some(s) if self.sending && self.inflight < self.window => Some(s.due()),
            _ => None,
        }
    }
}

struct Echoes<'m> {
    meter: &'m Meter,
    batch: Batch,
    size: usize,
    start: u64,
    sender: Sender,
    received: u64,
    foreign: u64,
}

impl Handler for Echoes<'_> {
    fn begin(&mut self) {
        self.batch.begin(now_ns());
    }

    fn message(&mut self, _: OpCode, payload: &[u8], tx: &mut Tx) {
        let now = self.batch.now();
        match timestamp(payload) {
            Some(ts) if payload.len() == self.size && ts >= self.start && ts <= now => {
                self.batch.push(self.meter, ts, payload.len());
                self.received += 1;
                self.sender.inflight = self.sender.inflight.saturating_sub(1);
                self.sender.fill(tx, now);
            }
            _ => self.foreign += 1,
        }
    }

    fn end(&mut self) {
        self.batch.flush(self.meter);
    }
}

async fn connection(mut conn: Conn, cfg: Cfg, meter: Arc<Meter>, mut phase: watch::Receiver<Phase>) -> ConnTally {
    let mut t = ConnTally::default();
    let window = match serve_until_run(&mut conn, &mut phase, &mut Discard).await {
        Ok(Some(w)) => w,
        Ok(None) => {
            meter.open.fetch_sub(1, Ordering::Relaxed);
            conn.close(CLOSE_WAIT).await;
            return t;
        }
        Err(f) => {
            meter.open.fetch_sub(1, Ordering::Relaxed);
            meter.failed();
            t.failure = Some(f);
            return t;
        }
    };
    let schedule = Schedule::new(cfg.rate, cfg.offset, window.start);
    let sender = Sender {
        template: Template::new(cfg.size, conn.tx.key()),
        window: cfg.window,
        inflight: 0,
        sent: 0,
        sending: true,
        until: window.to,
        schedule,
    };
    let mut h = Echoes {
        meter: &meter,
        batch: Batch::default(),
        size: cfg.size,
        start: window.start,
        sender,
        received: 0,
        foreign: 0,
    };
    // After the start, the task keeps its own time: phase changes would cost a watch-channel
    // registration per loop iteration. Sending ends at `window.to`; whatever has not come back by the
    // end of the drain never will.
    drop(phase);
    let timer = tokio::time::sleep_until(instant_at(0));
    tokio::pin!(timer);
    let mut armed: Option<u64> = None;
    let end = tokio::time::sleep_until(instant_at(window.to));
    tokio::pin!(end);
    let mut ended = false;
    let give_up = tokio::time::sleep_until(instant_at(window.to + ns(DRAIN)));
    tokio::pin!(give_up);

    let mut failure: Option<Failure> = match conn.receive(&mut h) {
        Ok(None) => None,
        Ok(Some(end)) => Some(end.failure()),
        Err(f) => Some(f),
    };
    if failure.is_none() {
        h.sender.fill(&mut conn.tx, now_ns());
        failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
    }
    while failure.is_none() {
        if !h.sender.sending && h.sender.inflight == 0 {
            break;
        }
        let due = h.sender.next_due();
        if due != armed {
            if let Some(d) = due {
                timer.as_mut().reset(instant_at(d));
            }
            armed = due;
        }
        tokio::select! {
            r = conn.stream.readable() => {
                failure = match r.map_err(|e| classify(&e)).and_then(|()| conn.receive(&mut h)) {
                    Ok(None) => None,
                    Ok(Some(end)) => Some(end.failure()),
                    Err(f) => Some(f),
                };
            }
            r = conn.stream.writable(), if conn.tx.pending() > 0 => {
                failure = r.and_then(|()| conn.tx.flush(&conn.stream)).err().map(|e| classify(&e));
            }
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                h.sender.fill(&mut conn.tx, now_ns());
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
            _ = &mut end, if !ended => {
                // Messages due before the end that the timer has not sent yet still go out.
                ended = true;
                h.sender.fill(&mut conn.tx, now_ns());
                h.sender.sending = false;
                failure = conn.tx.flush(&conn.stream).err().map(|e| classify(&e));
            }
            _ = &mut give_up => {
                t.held = true;
                break;
            }
        }
    }
    t.sent = h.sender.sent;
    t.received = h.received;
    t.foreign = h.foreign;
    end_connection(conn, &meter, failure.is_some()).await;
    t.failure = failure;
    t
}
