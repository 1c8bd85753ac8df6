//! `reconnect` against the real ringcast server (in-process) that is stopped and started again on the
//! same port: the "everyone at once" restart. The new server has a new stream (a new epoch), so every
//! client comes back without recovery, and the tool must say so; its counts are checked against the
//! server's own view (its channel's subscriber count) and against each other.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringcast_bench::reconnect::{run, ReconnectParams};
use tokio::sync::oneshot;

const KEY: &str = "reconnect-key";
const CONFIG: &str = "allow_anonymous = true\napi_key = \"reconnect-key\"\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\nallow_recovery = true\nhistory_size = 1000\nhistory_ttl = \"600s\"\n";

/// The real server on `listen` (port 0: any), with history and recovery on every channel; it stops
/// (closing every client at once) when the sender is dropped, and the handle ends when it has.
fn start(listen: &str) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let file = std::env::temp_dir().join(format!("ringcast-bench-reconnect-{}.toml", std::process::id()));
    std::fs::write(&file, CONFIG).unwrap();
    let flags = [("listen".to_string(), listen.to_string()), ("tcp_listen".into(), "off".into())];
    let (config, settings) = ringcast_server::Config::load(Some(&file), |_| None, &flags).expect("valid config");
    let server = ringcast_server::Server::bind(config, settings).expect("bind");
    let addr = server.local_addr().expect("bound address");
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let _ = server
            .run(async {
                rx.await.ok();
            })
            .await;
    });
    (addr, tx, handle)
}

/// Subscribers of channel `bench`, as the server's HTTP API counts them.
fn subscribers(addr: SocketAddr) -> Option<u64> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("POST /api/channels HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let v: serde_json::Value = serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()?;
    v["result"]["channels"]["bench"]["num_clients"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_moves_every_client_and_the_lost_stream_is_reported() {
    const CLIENTS: u64 = 30;
    let (addr, stop, first) = start("127.0.0.1:0");
    let mut p = ReconnectParams::new(format!("ws://{addr}/connection/websocket"));
    p.clients = CLIENTS;
    p.duration = Duration::from_secs(6);
    p.settle = Duration::from_secs(10);
    p.bucket = Duration::from_millis(100);
    p.backoff_min = Duration::from_millis(100);
    p.backoff_max = Duration::from_millis(400);
    p.api_key = Some(KEY.into());
    p.rate = 20.0;
    let run = tokio::spawn(async move { run(&p).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::task::block_in_place(|| subscribers(addr)) != Some(CLIENTS) {
        assert!(Instant::now() < deadline, "the clients did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everyone at once: the server stops, then a fresh one (a new stream) takes the same port.
    drop(stop);
    first.await.unwrap();
    let (_, _stop_second, _second) = start(&addr.to_string());

    let r = run.await.unwrap().expect("the run takes place");
    eprintln!("{}", r.table());
    assert_eq!(r.initial, CLIENTS);
    assert_eq!(r.disconnect_reasons.values().sum::<u64>(), CLIENTS, "each client was let go once: {r:?}");
    assert_eq!(r.reconnected, CLIENTS, "{r:?}");
    assert_eq!((r.recovered, r.not_recovered), (0, CLIENTS), "a new stream cannot be recovered: {r:?}");
    assert_eq!(r.not_connected_at_end, 0, "{r:?}");
    assert_eq!(r.gap_ms.iter().filter(|g| **g > 0.0).count(), 3, "every reconnect took some time: {r:?}");
    assert!(r.published > 0);
    // Each client has every number once, or counted as lost.
    assert_eq!(r.received - r.duplicated + r.lost, r.published * CLIENTS, "{r:?}");
    let handshakes: u64 = r.timeline.iter().map(|b| b.handshakes).sum();
    let disconnects: u64 = r.timeline.iter().map(|b| b.disconnects).sum();
    assert_eq!((handshakes, disconnects), (2 * CLIENTS, CLIENTS), "the timeline counts every event");
    assert!(r.first_disconnect_s.is_some() && r.last_reconnect_s.is_some());
    assert!(r.peak_per_s > 0.0);
}
