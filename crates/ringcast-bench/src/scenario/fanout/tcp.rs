//! Fan-out over ringcast's TCP binary protocol (`--protocol tcp`, a `tcp://` URL: the server's
//! `tcp_listen`).
//!
//! The same run as the WebSocket fan-out (the parent module's orchestration, payload and accounting),
//! with other connections: a subscriber is a [`TcpClient`] that sent CONNECT (anonymous) and SUBSCRIBE
//! `bench`; a publisher one that sent CONNECT and then sends PUBLISH at its share of `--rate`. The
//! publication's data is the raw fan-out header (send time, publisher id, sequence number) and filler
//! up to `--size`, so every subscriber measures latency, loss and order exactly as a raw WebSocket
//! subscriber does. Frames are decoded in place from the read buffer ([`TcpClient::receive_now`]): the
//! generator allocates nothing per delivery.
//!
//! What it does not do: the windowed mode (`--rate 0`; refused at validation), and publishing through
//! the HTTP API (the TCP publisher is the protocol's own PUBLISH, as the WebSocket fan-out publishes
//! over its own connection).

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ringcast_wire::tcp::{Command, HEADER_LEN};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Deliveries, PubCfg, PubTally, SubCfg, MAX_PENDING};
use crate::client::{tcp_connect, Handler};
use crate::clock::{instant_at, next_slot, now_ns, Schedule, Slot};
use crate::failure::{classify, Failure};
use crate::meter::{Meter, Window};
use crate::params::{Params, CHANNEL};
use crate::payload::{fanout_header, FANOUT_HEADER};
use crate::scenario::echo::OPEN_CONCURRENCY;
use crate::scenario::{source_for, Phase, SubscriberTally, Tally, CLOSE_WAIT};
use crate::tcp::{Event, TcpClient, TcpClientError};

/// Stop trying after this many failures without a single success (as the WebSocket `open_many`).
const GIVE_UP_AFTER: u64 = 200;

fn to_failure(e: TcpClientError) -> Failure {
    match e {
        TcpClientError::Io(e) => classify(&e),
        TcpClientError::Closed => Failure::Closed("the server closed the connection".into()),
        TcpClientError::Turned { code, retry_after } => Failure::TcpRejected { code: code.0, retry_after },
        other => Failure::Protocol(other.to_string()),
    }
}

/// Opens TCP protocol connections `indices` (CONNECT, and SUBSCRIBE `bench` when `subscribe`), at most
/// [`OPEN_CONCURRENCY`] at a time, each bounded by `--connect-timeout`. Failures are counted in `tally`;
/// the connections that made it are returned in index order.
pub(crate) async fn open_many(
    p: &Params,
    addr: SocketAddr,
    indices: Range<u64>,
    subscribe: bool,
    tally: &mut Tally,
    meter: &Meter,
    mut progress: impl FnMut(u64, u64),
) -> Vec<(u64, TcpClient)> {
    let mut next = indices.start;
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity((indices.end - indices.start) as usize);
    let mut failed = 0u64;
    let mut last_progress = now_ns();
    loop {
        let give_up = failed >= GIVE_UP_AFTER && tally.established == 0;
        while next < indices.end && (set.len() as u64) < OPEN_CONCURRENCY && !give_up {
            let index = next;
            next += 1;
            tally.attempted += 1;
            let source = source_for(p, index);
            let timeout = p.connect_timeout;
            set.spawn(async move {
                let start = now_ns();
                let open = async {
                    let stream = tcp_connect(addr, source).await?;
                    let mut c = TcpClient::over(stream, "").await.map_err(to_failure)?;
                    if subscribe {
                        c.subscribe(CHANNEL).await.map_err(to_failure)?;
                    }
                    Ok::<_, Failure>(c)
                };
                let opened = tokio::time::timeout(timeout, open).await.unwrap_or(Err(Failure::Timeout));
                (index, opened.map(|c| (c, now_ns() - start)))
            });
        }
        let Some(joined) = set.join_next().await else { break };
        match joined {
            Ok((index, Ok((c, ns)))) => {
                tally.established += 1;
                tally.handshake.0.saturating_record(ns);
                meter.open.fetch_add(1, Ordering::Relaxed);
                out.push((index, c));
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
        if now - last_progress > crate::clock::SECOND / 4 {
            last_progress = now;
            progress(tally.established, tally.failures.total());
        }
    }
    progress(tally.established, tally.failures.total());
    tally.skipped += indices.end - next;
    out.sort_by_key(|(i, _)| *i);
    out
}

/// Handles what the socket has now; a close or an ERROR from the server ends the connection.
pub(crate) fn service(c: &mut TcpClient, mut on: impl FnMut(&Event<'_>)) -> Result<(), Failure> {
    let mut refused = None;
    let open = c
        .receive_now(|ev| {
            if let Event::Refused(code) = ev {
                refused.get_or_insert(code);
            }
            on(&ev);
        })
        .map_err(to_failure)?;
    if let Some(code) = refused {
        return Err(to_failure(TcpClientError::Refused(code)));
    }
    if !open {
        return Err(to_failure(TcpClientError::Closed));
    }
    Ok(())
}

/// Before the start: answers the server's pings and notices a close, until the run begins (`None`: it
/// was stopped first). Every MESSAGE that arrives meanwhile goes to `on_message` (a subscriber keeps
/// them: [`Deliveries`]).
async fn serve_until_run(
    c: &mut TcpClient,
    phase: &mut watch::Receiver<Phase>,
    mut on_message: impl FnMut(&[u8]),
) -> Result<Option<Window>, Failure> {
    loop {
        match *phase.borrow_and_update() {
            Phase::Run(w) => return Ok(Some(w)),
            Phase::Drain | Phase::Stop => return Ok(None),
            Phase::Wait => {}
        }
        service(c, |ev| {
            if let Event::Message { data, .. } = *ev {
                on_message(data);
            }
        })?;
        tokio::select! {
            r = c.stream().readable() => r?,
            r = c.stream().writable(), if c.unsent() > 0 => {
                r?;
                c.flush()?;
            }
            changed = phase.changed() => {
                if changed.is_err() {
                    return Ok(None);
                }
            }
        }
    }
}

/// A MESSAGE's header to a subscriber's [`Deliveries`].
fn message(d: &mut Deliveries<'_>, data: &[u8]) {
    match fanout_header(data) {
        Some((ts, p, s)) if data.len() >= FANOUT_HEADER => d.deliver(ts, p, s, data.len()),
        _ => d.foreign += 1,
    }
}

/// One TCP subscriber: every MESSAGE's header goes to [`Deliveries`] (latency, order, counts).
pub(super) async fn subscriber(
    mut c: TcpClient,
    cfg: SubCfg,
    meter: Arc<Meter>,
    mut phase: watch::Receiver<Phase>,
) -> (SubscriberTally, u64, Option<Failure>, bool, super::Wire) {
    let mut d = Deliveries::new(cfg, &meter);
    let mut held = false;
    let (window, mut failure) = match serve_until_run(&mut c, &mut phase, |data| message(&mut d, data)).await {
        Ok(w) => (w, None),
        Err(f) => (None, Some(f)),
    };
    let stop = phase.wait_for(|p| *p == Phase::Stop);
    tokio::pin!(stop);
    let mut wire_from = c.received_bytes();
    if let Some(window) = window {
        wire_from = c.received_bytes();
        d.started(window.start);
        loop {
            tokio::select! {
                r = c.stream().readable() => {
                    if let Err(e) = r {
                        failure = Some(classify(&e));
                        break;
                    }
                    // Each read is its own batch with its own receive time, as for WebSocket subscribers
                    // (`Handler::begin`). One clock read per `service` call used to stamp later reads'
                    // frames too: a publication sent after that stamp looked like it came from the
                    // future, was counted "not ours" and so as lost (2–7 per million in bench-tcp.sh).
                    d.begin();
                    let r = service(&mut c, |ev| match *ev {
                        Event::Read => {
                            d.end();
                            d.begin();
                        }
                        Event::Message { data, .. } => message(&mut d, data),
                        _ => {}
                    });
                    d.end();
                    if let Err(f) = r {
                        failure = Some(f);
                        break;
                    }
                }
                r = c.stream().writable(), if c.unsent() > 0 => {
                    if let Err(e) = r.and_then(|()| c.flush()) {
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
    meter.open.fetch_sub(1, Ordering::Relaxed);
    if failure.is_some() {
        meter.failed();
    }
    let t = SubscriberTally { index: d.cfg.index, received: d.received, out_of_order: d.out_of_order };
    let wire = super::Wire { bytes: c.received_bytes() - wire_from, deflate: false };
    (t, d.foreign, failure, held, wire)
}

/// What a TCP publisher has heard back.
#[derive(Default)]
struct Acks {
    published: u64,
    refused: u64,
    example: Option<String>,
}

impl Acks {
    fn on(&mut self, ev: &Event<'_>) {
        match ev {
            Event::Published(_) => self.published += 1,
            Event::Refused(code) => {
                self.refused += 1;
                if self.example.is_none() {
                    self.example = Some(format!("publish refused: error {} ({})", code.0, code.message()));
                }
            }
            _ => {}
        }
    }

    fn receive(&mut self, c: &mut TcpClient) -> Result<bool, Failure> {
        c.receive_now(|ev| self.on(&ev)).map_err(to_failure)
    }
}

/// One TCP publisher: PUBLISH on the open-loop schedule (latency is measured from the intended send
/// time), PUBLISHED replies counted; a refused publication is not counted as published.
pub(super) async fn publisher(
    mut c: TcpClient,
    cfg: PubCfg,
    meter: &Meter,
    mut phase: watch::Receiver<Phase>,
) -> PubTally {
    let mut t = PubTally::default();
    let window = match serve_until_run(&mut c, &mut phase, |_| {}).await {
        Ok(Some(w)) => w,
        Ok(None) => return t,
        Err(f) => {
            meter.failed();
            t.failures.add(&f);
            return t;
        }
    };
    drop(phase);
    // Validation refuses `--rate 0` with this protocol; a missing schedule sends nothing.
    let mut schedule = Schedule::new(cfg.rate, cfg.offset, window.start);
    let mut data: Vec<u8> = (0..cfg.size.max(FANOUT_HEADER)).map(|i| b'a' + (i % 26) as u8).collect();
    let mut seq: u32 = 0;
    let mut sent = 0u64;
    let mut acks = Acks::default();
    let mut failure: Option<Failure> = None;
    let timer = tokio::time::sleep_until(instant_at(0));
    tokio::pin!(timer);
    let mut sending = schedule.is_some();
    while sending && failure.is_none() {
        let now = now_ns();
        while c.unsent() < MAX_PENDING {
            match next_slot(&mut schedule, now, window.to) {
                Slot::Done => {
                    sending = false;
                    break;
                }
                Slot::Wait => break,
                Slot::Send(ts) => {
                    data[..8].copy_from_slice(&ts.to_le_bytes());
                    data[8..12].copy_from_slice(&cfg.id.to_le_bytes());
                    data[12..16].copy_from_slice(&seq.to_le_bytes());
                    if let Err(e) = c.queue(Command::Publish { channel: CHANNEL, data: &data }) {
                        failure = Some(Failure::Protocol(e.to_string()));
                        break;
                    }
                    seq = seq.wrapping_add(1);
                    sent += 1;
                }
            }
        }
        if let Err(e) = c.flush() {
            failure = Some(classify(&e));
        }
        if !sending || failure.is_some() {
            break;
        }
        let due = schedule.as_ref().map(Schedule::due).filter(|_| c.unsent() < MAX_PENDING);
        if let Some(d) = due {
            timer.as_mut().reset(instant_at(d));
        }
        tokio::select! {
            r = c.stream().readable() => {
                failure = match r.map_err(|e| classify(&e)).and_then(|()| acks.receive(&mut c)) {
                    Ok(true) => None,
                    Ok(false) => Some(to_failure(TcpClientError::Closed)),
                    Err(f) => Some(f),
                };
            }
            r = c.stream().writable(), if c.unsent() > 0 => {
                failure = r.and_then(|()| c.flush()).err().map(|e| classify(&e));
            }
            _ = &mut timer, if due.is_some() => {}
        }
    }

    // Sending is over: write out what is queued and collect the replies, bounded.
    if failure.is_none() {
        let finish = async {
            while c.unsent() > 0 {
                c.stream().writable().await.map_err(|e| classify(&e))?;
                c.flush().map_err(|e| classify(&e))?;
            }
            while acks.published + acks.refused < sent {
                c.stream().readable().await.map_err(|e| classify(&e))?;
                if !acks.receive(&mut c)? {
                    return Err(to_failure(TcpClientError::Closed));
                }
            }
            Ok::<(), Failure>(())
        };
        if let Ok(Err(f)) = tokio::time::timeout(CLOSE_WAIT * 2, finish).await {
            failure = Some(f);
        }
    }
    // What never left the queue was not published.
    let frame_len = HEADER_LEN + 2 + CHANNEL.len() + data.len();
    let unsent = c.unsent().div_ceil(frame_len) as u64;
    t.published = sent.saturating_sub(unsent).saturating_sub(acks.refused);
    if let Some(ex) = &acks.example {
        for _ in 0..acks.refused {
            t.failures.add(&Failure::Protocol(ex.clone()));
        }
    }
    if let Some(f) = failure {
        meter.failed();
        t.failures.add(&f);
    }
    t
}
