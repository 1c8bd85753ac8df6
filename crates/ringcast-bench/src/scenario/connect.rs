//! Connect: a connection storm. Up to N connections are opened as fast as `--window` handshakes in
//! flight allow (or on a schedule of `--rate` per second), for at most `--duration`, and each is kept
//! open until the end so the server carries the growing load.
//!
//! Handshake latency runs from the start of the TCP connect to the parsed `101`; with `--rate` it runs
//! from the *intended* start, so a generator that falls behind its schedule shows it as latency.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::{source_for, Link, Share, Tally, Ticker, CLOSE_WAIT};
use crate::client::{self, Buffers, Conn, Endpoint};
use crate::clock::{now_ns, ns, sleep_until, SECOND};
use crate::error::BenchError;
use crate::failure::Failure;
use crate::meter::{Meter, Window};
use crate::params::Params;
use crate::proc::{self_cpu_us, self_rss};

pub(crate) async fn run<L: Link>(p: &Params, ep: &Endpoint, share: &Share, link: &mut L) -> Result<Tally, BenchError> {
    let meter = Arc::new(Meter::new());
    let mut tally = Tally { rss_before: self_rss(), ..Tally::default() };
    let start = link.ready(0).await?;
    let window = Window { start, from: start, to: start + ns(p.duration) };
    meter.set_window(window);
    let mut ticker = Ticker::new(link, &meter, start);
    sleep_until(start).await;
    let cpu_from = self_cpu_us();

    let ep = Arc::new(ep.clone());
    let buffers = Buffers::pool();
    let mut conns: Vec<Conn> = Vec::new();
    let mut last_done = start;
    let interval = if share.rate > 0.0 { 1e9 / share.rate } else { 0.0 };
    let storm = async {
        let mut set = JoinSet::new();
        let mut next = share.connections.start;
        let mut k = 0u64;
        let mut give_up = false;
        loop {
            let now = now_ns();
            let mut next_due = None;
            while next < share.connections.end && (set.len() as u64) < share.concurrency && now < window.to && !give_up
            {
                let intended = if interval > 0.0 { start + (k as f64 * interval) as u64 } else { now };
                if intended > now {
                    next_due = Some(intended);
                    break;
                }
                let (ep, buffers, source, timeout) =
                    (ep.clone(), buffers.clone(), source_for(p, next), p.connect_timeout);
                set.spawn(async move {
                    let r = client::open(&ep, source, &buffers, timeout).await;
                    (intended, now_ns(), r)
                });
                next += 1;
                k += 1;
                tally.attempted += 1;
            }
            if set.is_empty() {
                match next_due {
                    Some(t) if t < window.to => {
                        sleep_until(t).await;
                        continue;
                    }
                    _ => break,
                }
            }
            tokio::select! {
                joined = set.join_next() => match joined {
                    Some(Ok((intended, done, Ok(opened)))) => {
                        tally.established += 1;
                        tally.handshake.0.saturating_record(opened.handshake_ns);
                        meter.open.fetch_add(1, Ordering::Relaxed);
                        meter.shard().record(intended, done, 0);
                        last_done = last_done.max(done);
                        conns.push(opened.conn);
                    }
                    Some(Ok((_, _, Err(f)))) => tally.fail(&meter, &f),
                    Some(Err(e)) => tally.fail(&meter, &Failure::Io(format!("connect task: {e}"))),
                    None => {}
                },
                _ = sleep_until(next_due.unwrap_or(0)), if next_due.is_some() => {}
            }
            give_up = tally.established == 0 && tally.failures.total() >= 200;
        }
    };
    // In-flight handshakes started before the end of the window get their timeout to finish.
    ticker.until(window.to + ns(p.connect_timeout) + SECOND, storm).await;
    tally.skipped =
        tally.skipped.max((share.connections.end - share.connections.start).saturating_sub(tally.attempted));
    tally.elapsed_ns = last_done.saturating_sub(start);
    tally.cpu_us = self_cpu_us().saturating_sub(cpu_from);
    ticker.link.window_closed();
    tally.rss_after = self_rss();
    tally.held = conns.len() as u64;

    let mut closing = JoinSet::new();
    for c in conns {
        closing.spawn(c.close(CLOSE_WAIT));
    }
    let close_all = async { while closing.join_next().await.is_some() {} };
    ticker.until(now_ns() + ns(CLOSE_WAIT * 2), close_all).await;
    meter.open.store(0, Ordering::Relaxed);
    ticker.flush();
    let totals = meter.totals();
    tally.latency = totals.latency;
    tally.received_in_window = totals.messages;
    Ok(tally)
}
