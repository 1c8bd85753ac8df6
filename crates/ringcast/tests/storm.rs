//! A connection storm against the real binary: 20,000 WebSocket handshakes from four generator
//! processes (a process may hold 20,000 descriptors on the test machines, so no single client could)
//! against `max_connections = 10000`. Exactly the excess is refused 503, every admitted client connects,
//! subscribes and receives a publication, the server's RSS stays bounded, and it does not fall over.
//!
//! The generators are this test binary run again with `STORM_ADDR` set (the ignored test
//! `storm_generator`); each prints one `READY` line when its handshakes are done and its admitted
//! clients subscribed, then one `DONE` line when each of them has received the publication.
//!
//! Duration (debug build, the shared 2-core machine): see BENCHMARKS.md, "Connection storm".

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{http_request, metric, Answer, ServerProcess, Ws};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "storm-test-key";
const MAX_CONNECTIONS: usize = 10_000;
const GENERATORS: usize = 4;
const PER_GENERATOR: usize = 5_000;
/// Handshakes in flight per generator.
const WINDOW: usize = 128;

/// One upgrade from source address `from` (each generator has its own, so each has its own range of
/// ephemeral ports).
async fn upgrade_from(addr: SocketAddr, from: std::net::IpAddr) -> Answer {
    let socket = match TcpSocket::new_v4() {
        Ok(s) => s,
        Err(e) => return Answer::Failed(format!("socket: {e}")),
    };
    if let Err(e) = socket.bind(SocketAddr::new(from, 0)) {
        return Answer::Failed(format!("bind: {e}"));
    }
    support::upgrade_on(socket, addr, Duration::from_secs(60)).await
}

/// Connects and subscribes to "storm" in one frame; Err on anything but the two replies.
async fn subscribe(ws: &mut Ws) -> Result<(), String> {
    let frame = format!("{}\n{}", json!({"id": 1, "connect": {}}), json!({"id": 2, "subscribe": {"channel": "storm"}}));
    ws.send(Message::text(frame)).await.map_err(|e| e.to_string())?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.map_err(|_| "no reply in 60 s")?;
        let Some(Ok(Message::Text(t))) = msg else { return Err(format!("instead of replies: {msg:?}")) };
        for line in t.as_str().lines() {
            let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            if v.get("error").is_some() {
                return Err(v.to_string());
            }
            if v["id"] == json!(2) {
                return Ok(());
            }
        }
    }
}

/// Waits for the publication on "storm".
async fn receive(mut ws: Ws) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.as_str().lines().any(|l| {
                    serde_json::from_str::<Value>(l).is_ok_and(|v| v["push"]["pub"]["data"]["storm"] == json!(true))
                }) {
                    return true;
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return false,
        }
    }
}

/// The generator side: `PER_GENERATOR` handshakes, `WINDOW` in flight; prints
/// `READY admitted refused503 retry_after_ok failed elapsed_ms`, then `DONE received`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a generator process of `storm_of_20000_handshakes_refuses_exactly_the_excess`"]
async fn storm_generator() {
    let Ok(addr) = std::env::var("STORM_ADDR") else { return };
    let addr: SocketAddr = addr.parse().expect("STORM_ADDR");
    let from: std::net::IpAddr = std::env::var("STORM_FROM").expect("STORM_FROM").parse().expect("STORM_FROM");
    let start = Instant::now();
    let mut set = JoinSet::new();
    let (mut admitted, mut refused, mut retry_after_ok, mut failed) = (Vec::new(), 0u64, 0u64, 0u64);
    let mut started = 0;
    while started < PER_GENERATOR || !set.is_empty() {
        while started < PER_GENERATOR && set.len() < WINDOW {
            set.spawn(async move {
                match upgrade_from(addr, from).await {
                    Answer::Upgraded(ws) => {
                        let mut ws = *ws;
                        match subscribe(&mut ws).await {
                            Ok(()) => Answer::Upgraded(Box::new(ws)),
                            Err(e) => Answer::Failed(format!("subscribe: {e}")),
                        }
                    }
                    other => other,
                }
            });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Answer::Upgraded(ws))) => admitted.push(*ws),
            Some(Ok(Answer::Refused(503, retry_after))) => {
                refused += 1;
                retry_after_ok += u64::from(retry_after.as_deref() == Some("1"));
            }
            Some(Ok(Answer::Refused(status, _))) => {
                eprintln!("generator: refused {status}");
                failed += 1;
            }
            Some(Ok(Answer::Failed(e))) => {
                if failed < 5 {
                    eprintln!("generator: {e}");
                }
                failed += 1;
            }
            Some(Err(e)) => panic!("handshake task: {e}"),
            None => {}
        }
    }
    let elapsed = start.elapsed().as_millis();
    println!("READY {} {refused} {retry_after_ok} {failed} {elapsed}", admitted.len());
    let mut waits: JoinSet<bool> = admitted.into_iter().map(receive).collect();
    let mut received = 0u64;
    while let Some(r) = waits.join_next().await {
        received += u64::from(r.unwrap_or(false));
    }
    println!("DONE {received}");
}

/// What one generator reported.
#[derive(Debug, Default, Clone, Copy)]
struct Report {
    admitted: u64,
    refused: u64,
    retry_after_ok: u64,
    failed: u64,
    elapsed_ms: u64,
    received: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_20000_handshakes_refuses_exactly_the_excess() {
    let server = ServerProcess::start(&[
        "--dev",
        "--tcp-listen",
        "off",
        "--api-key",
        KEY,
        "--max-connections",
        &MAX_CONNECTIONS.to_string(),
        // The clients hold still until the publication: no pings to answer, no idle timeout.
        "--ping-interval",
        "0s",
        "--idle-timeout",
        "0s",
    ]);
    let addr = server.addr;
    let rss_idle = server.status_bytes("VmRSS:");
    let start = Instant::now();
    let exe = std::env::current_exe().expect("test binary");
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children = Vec::new();
    for g in 0..GENERATORS {
        let mut child = Command::new(&exe)
            .args(["storm_generator", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("STORM_ADDR", addr.to_string())
            .env("STORM_FROM", format!("127.0.0.{}", 10 + g))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn generator");
        let out = child.stdout.take().expect("generator stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            // With --nocapture libtest's "test storm_generator ... " may start the same line.
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(at) = line.find("READY ").or_else(|| line.find("DONE ")) {
                    let _ = tx.send((g, line[at..].to_string()));
                }
            }
        });
        children.push(child);
    }
    let mut reports = [Report::default(); GENERATORS];
    let next_line = |what: &str| -> (usize, Vec<u64>) {
        let (g, line) = rx.recv_timeout(Duration::from_secs(600)).unwrap_or_else(|_| panic!("no {what} line"));
        let numbers = line.split_whitespace().skip(1).map(|n| n.parse().expect("number")).collect();
        (g, numbers)
    };
    for _ in 0..GENERATORS {
        let (g, n) = next_line("READY");
        reports[g] = Report {
            admitted: n[0],
            refused: n[1],
            retry_after_ok: n[2],
            failed: n[3],
            elapsed_ms: n[4],
            received: None,
        };
    }
    let storm_secs = start.elapsed().as_secs_f64();
    fn sum(reports: &[Report], f: fn(&Report) -> u64) -> u64 {
        reports.iter().map(f).sum()
    }
    let attempts = (GENERATORS * PER_GENERATOR) as u64;
    assert_eq!(sum(&reports, |r| r.failed), 0, "handshakes neither admitted nor refused 503: {reports:?}");
    assert_eq!(sum(&reports, |r| r.admitted), MAX_CONNECTIONS as u64, "{reports:?}");
    assert_eq!(
        sum(&reports, |r| r.refused),
        attempts - MAX_CONNECTIONS as u64,
        "exactly the excess refused: {reports:?}"
    );
    assert_eq!(sum(&reports, |r| r.retry_after_ok), sum(&reports, |r| r.refused), "every 503 says Retry-After: 1");
    let counted = metric(addr, r#"ringcast_admission_refusals_total{reason="max_connections",transport="ws"}"#).await;
    assert_eq!(counted, (attempts - MAX_CONNECTIONS as u64) as f64, "refusals counted in /metrics");
    assert_eq!(metric(addr, "ringcast_ws_connections").await, MAX_CONNECTIONS as f64);

    // One publication reaches every admitted client.
    let body = json!({"channel": "storm", "data": {"storm": true}});
    let (status, text) = http_request(addr, "POST", "/api/publish", &[("X-API-Key", KEY)], &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    for _ in 0..GENERATORS {
        let (g, n) = next_line("DONE");
        reports[g].received = Some(n[0]);
    }
    for (g, r) in reports.iter().enumerate() {
        assert_eq!(r.received, Some(r.admitted), "generator {g}: every admitted client received the publication");
    }
    for mut child in children {
        let status = child.wait().expect("generator exit");
        assert!(status.success(), "generator {status}");
    }
    let peak = server.status_bytes("VmHWM:");
    let mut server = server;
    assert!(server.alive(), "the server survived the storm");
    // Bounded: 10,000 idle client connections cost a few KiB each (BENCHMARKS.md); 256 MiB would be a
    // leak per refused handshake or an unbounded buffer.
    assert!(peak < 256 << 20, "server peak RSS {peak} B");
    let slowest_ms = reports.iter().map(|r| r.elapsed_ms).max().unwrap_or(1).max(1);
    eprintln!(
        "storm: {attempts} handshakes in {:.1} s from {GENERATORS} processes ({:.0} handshakes/s by the slowest generator's clock), {} admitted, {} refused 503; server RSS idle {:.1} MiB, peak {:.1} MiB",
        storm_secs,
        attempts as f64 * 1000.0 / slowest_ms as f64,
        sum(&reports, |r| r.admitted),
        sum(&reports, |r| r.refused),
        rss_idle as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    assert_eq!(server.stop(Duration::from_secs(30)), Some(0), "graceful exit after the storm");
}
