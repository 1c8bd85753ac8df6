//! Idle: open N connections, hold them for D seconds doing nothing but answering pings, and see what
//! each one costs the server in memory (and, while idle, in CPU).
//!
//! The server's RSS is sampled before the first connection and after the last, once it has settled
//! (see the conductor). The held connections borrow read buffers from a pool only while bytes are
//! unparsed, so the generator's own footprint per connection stays small too, and is reported.
//!
//! With `--protocol centrifuge` each connection also sends connect and subscribes to the bench channel
//! before it goes idle (Centrifugo server pings, every 25 s by default, are not answered: keep `--duration`
//! below the server's ping interval plus pong timeout).
//!
//! With `--protocol tcp` (a `tcp://` URL) each connection speaks the TCP binary protocol: CONNECT
//! (anonymous) and SUBSCRIBE `bench`, then idle; the server's pings are answered.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{
    end_connection, join_all, open_many, ConnTally, Link, Opening, Phase, Setup, Share, Tally, Ticker, CLOSE_WAIT,
};
use crate::client::{Buffers, Conn, Discard, Endpoint};
use crate::clock::{now_ns, ns, sleep_until};
use crate::error::BenchError;
use crate::failure::classify;
use crate::meter::{Meter, Window};
use crate::params::Params;
use crate::proc::{self_cpu_us, self_rss};

pub(crate) async fn run<L: Link>(p: &Params, ep: &Endpoint, share: &Share, link: &mut L) -> Result<Tally, BenchError> {
    let meter = Arc::new(Meter::new());
    let mut tally = Tally { rss_before: self_rss(), ..Tally::default() };
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let tcp = p.protocol == crate::params::Protocol::Tcp;
    let tcp_conns = if tcp {
        super::fanout::tcp::open_many(p, ep.addr, share.connections.clone(), true, &mut tally, &meter, |o, e| {
            link.preparing(o, e)
        })
        .await
    } else {
        Vec::new()
    };
    let conns = if tcp {
        Vec::new()
    } else {
        open_many(
            p,
            ep,
            share.connections.clone(),
            Opening {
                buffers: Buffers::pool(),
                concurrency: share.concurrency,
                // With the Centrifugo protocol every held connection is also subscribed (to the bench channel):
                // the memory of subscribed idle clients is what a pub/sub server is sized by.
                setup: if p.protocol == crate::params::Protocol::Centrifuge {
                    Setup::CentrifugeSubscribe
                } else {
                    Setup::None
                },
            },
            &mut tally,
            &meter,
            |o, e| link.preparing(o, e),
        )
        .await
    };
    tally.deflate = conns.iter().filter(|(_, c)| c.rx.deflate()).count() as u64;
    let mut set = JoinSet::new();
    for (_, conn) in conns {
        set.spawn(hold(conn, meter.clone(), phase_rx.clone()));
    }
    for (_, conn) in tcp_conns {
        set.spawn(hold_tcp(conn, meter.clone(), phase_rx.clone()));
    }
    drop(phase_rx);
    tally.rss_after = self_rss();

    let start = link.ready(tally.established).await?;
    let window = Window { start, from: start, to: start + ns(p.duration) };
    meter.set_window(window);
    let mut ticker = Ticker::new(link, &meter, start);
    sleep_until(start).await;
    let _ = phase_tx.send(Phase::Run(window));
    let cpu_from = self_cpu_us();
    ticker.sleep_until(window.to).await;
    tally.cpu_us = self_cpu_us().saturating_sub(cpu_from);
    let _ = phase_tx.send(Phase::Stop);
    let results = join_all(&mut ticker, &mut set, now_ns() + ns(CLOSE_WAIT * 2), &phase_tx, CLOSE_WAIT).await;
    ticker.flush();
    for r in &results {
        r.add_to(&mut tally);
    }
    Ok(tally)
}

/// Holds one connection: answers pings, notices closes, until told to stop.
async fn hold(mut conn: Conn, meter: Arc<Meter>, mut phase: watch::Receiver<Phase>) -> ConnTally {
    let mut t = ConnTally::default();
    let mut failure = match conn.receive(&mut Discard) {
        Ok(None) => None,
        Ok(Some(end)) => Some(end.failure()),
        Err(f) => Some(f),
    };
    while failure.is_none() {
        tokio::select! {
            r = conn.stream.readable() => {
                match r.map_err(|e| classify(&e)).and_then(|()| conn.receive(&mut Discard)) {
                    Ok(None) => conn.release(),
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
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Stop {
                    t.held = true;
                    break;
                }
            }
        }
    }
    end_connection(conn, &meter, failure.is_some()).await;
    t.failure = failure;
    t
}

/// Holds one TCP protocol connection: answers the server's pings, notices a close, until told to stop.
async fn hold_tcp(mut c: crate::tcp::TcpClient, meter: Arc<Meter>, mut phase: watch::Receiver<Phase>) -> ConnTally {
    let mut t = ConnTally::default();
    let mut failure = super::fanout::tcp::service(&mut c, |_| {}).err();
    while failure.is_none() {
        tokio::select! {
            r = c.stream().readable() => {
                failure = match r.map_err(|e| classify(&e)) {
                    Ok(()) => super::fanout::tcp::service(&mut c, |_| {}).err(),
                    Err(f) => Some(f),
                };
            }
            r = c.stream().writable(), if c.unsent() > 0 => {
                failure = r.and_then(|()| c.flush()).err().map(|e| classify(&e));
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Stop {
                    t.held = true;
                    break;
                }
            }
        }
    }
    meter.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if failure.is_some() {
        meter.failed();
    }
    t.failure = failure;
    t
}
