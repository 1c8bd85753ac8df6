//! Every scenario, run briefly over real loopback sockets, with the counts checked against what the
//! server side independently knows.
//!
//! Echo, connect and idle run against the real ringcast server (in-process, dev mode, `/echo`), and so
//! does centrifuge fan-out (`/connection/websocket`, publishing over WebSocket and over the HTTP API).
//! Raw fan-out needs a plain broadcast server, which ringcast is not, so a minimal one is written here
//! with tokio-tungstenite (an independent WebSocket implementation): every message received on a
//! connection is forwarded to every other connection. It can drop every 10th message to the first
//! connection it accepted, and counts what it dropped, so the tool's loss figure is checked against the
//! truth. A Centrifugo stand-in checks the client side against the protocol description as well.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringcast_bench::{Params, PayloadKind, Protocol, Report, Scenario};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// The real server, in this process; stops when the returned sender is dropped.
async fn ringcast_server() -> (SocketAddr, oneshot::Sender<()>) {
    ringcast_server_with(&[]).await
}

/// The real server in dev mode, with extra configuration keys.
async fn ringcast_server_with(extra: &[(&str, &str)]) -> (SocketAddr, oneshot::Sender<()>) {
    let mut flags = vec![("listen".to_string(), "127.0.0.1:0".to_string()), ("dev".into(), "true".into())];
    flags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (config, settings) = ringcast_server::Config::load(None, |_| None, &flags).expect("test config is valid");
    let server = ringcast_server::Server::bind(config, settings).expect("bind 127.0.0.1:0");
    let addr = server.local_addr().expect("bound address");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        rx.await.ok();
    }));
    (addr, tx)
}

fn params(scenario: Scenario, url: String) -> Params {
    let mut p = Params::new(scenario, url);
    p.duration = Duration::from_secs(1);
    p.warmup = Duration::from_millis(200);
    p.connect_timeout = Duration::from_secs(5);
    p
}

async fn run(p: &Params) -> Report {
    ringcast_bench::run(p).await.expect("the run takes place")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_every_sent_message_comes_back() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Echo, format!("ws://{addr}/echo"));
    p.connections = 200;
    p.window = 2;
    p.size = 64;
    p.server_pid = Some(std::process::id());
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    assert_eq!((r.connections.attempted, r.connections.established), (200, 200));
    let m = r.messages.as_ref().expect("echo reports messages");
    // How many fit in the second is the machine's business (a benchmark's, not a test's): counts only.
    assert!(m.sent > 0, "nothing sent");
    assert_eq!(m.received, m.sent, "every sent message is echoed");
    assert_eq!((m.lost, m.foreign, m.out_of_order), (0, 0, 0));
    assert!(m.received_in_window > 0 && m.received_in_window <= m.received);
    assert!((m.bytes_per_sec - m.per_sec * 64.0).abs() < 1.0, "bytes/s is messages/s × size");
    let l = r.latency.as_ref().expect("latency recorded");
    assert!(l.samples > 0 && l.samples <= m.received, "{} samples of {}", l.samples, m.received);
    assert!(l.p50_us > 0.0 && l.p50_us <= l.p99_us && l.p99_us <= l.max_us);
    assert_eq!(r.handshake.as_ref().map(|h| h.samples), Some(200));
    assert!(r.cpu.server_us.is_some(), "CPU of our own pid is readable");
    assert!(r.cpu.generator_us > 0);
    assert!(r.measured());
    // The report renders, as a table and as JSON that reads back.
    assert!(r.table().contains("round trip"));
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("valid JSON");
    assert_eq!(json["messages"]["sent"], serde_json::json!(m.sent));
    assert_eq!(json["params"]["connections"], serde_json::json!(200));
    assert!(!r.timeline.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_rate_mode_keeps_the_schedule() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Echo, format!("ws://{addr}/echo"));
    p.connections = 50;
    p.rate = 2000.0;
    p.window = 100;
    let r = run(&p).await;
    let m = r.messages.as_ref().expect("messages");
    // An open-loop schedule never sends a message before it is due: by the end of 1.2 s (warm-up
    // included) at most 2000/s × 1.2 s, plus the first message of each connection. A slow machine sends
    // fewer (late messages are sent late, not dropped), so only the upper bound is a property of the
    // tool; how close it comes is a benchmark's figure.
    assert!(m.sent > 0 && m.sent <= 2400 + 50, "sent {}", m.sent);
    assert_eq!(m.received, m.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_every_connection() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Connect, format!("ws://{addr}/echo"));
    p.connections = 300;
    p.window = 32;
    p.duration = Duration::from_secs(5);
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    assert_eq!((r.connections.attempted, r.connections.established, r.connections.held), (300, 300, 300));
    assert_eq!(r.latency.as_ref().map(|l| l.samples), Some(300));
    let per_sec = r.connections.per_sec.expect("handshakes per second");
    assert!(per_sec > 0.0);
    assert!(r.measured_secs > 0.0, "{}", r.measured_secs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections_and_samples_memory() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Idle, format!("ws://{addr}/echo"));
    p.connections = 300;
    p.server_pid = Some(std::process::id());
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    assert_eq!((r.connections.established, r.connections.held), (300, 300));
    let mem = r.memory.as_ref().expect("idle reports memory");
    let before = mem.server_rss_before.expect("RSS of our own pid");
    let after = mem.server_rss_after.expect("RSS after connecting");
    assert!(before > 1 << 20 && before < 16 << 30, "implausible RSS {before}");
    assert!(after > 1 << 20 && after < 16 << 30, "implausible RSS {after}");
    assert!(mem.server_bytes_per_connection.is_some());
    assert!(mem.generator_rss_after > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_centrifuge_connections_are_subscribed_before_they_idle() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Idle, format!("ws://{addr}/connection/websocket"));
    p.protocol = ringcast_bench::params::Protocol::Centrifuge;
    p.connections = 200;
    p.server_pid = Some(std::process::id());
    let r = run(&p).await;
    // A connect or subscribe that fails (or gets no reply in time) is a setup failure here.
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    assert_eq!((r.connections.established, r.connections.held), (200, 200));
    // Against the echo endpoint the "replies" are our own commands: no subscribe reply ever comes.
    let mut wrong = params(Scenario::Idle, format!("ws://{addr}/echo"));
    wrong.protocol = ringcast_bench::params::Protocol::Centrifuge;
    wrong.connections = 5;
    wrong.connect_timeout = std::time::Duration::from_millis(500);
    let r = run(&wrong).await;
    assert!(r.failures.total() > 0 || r.connections.established < 5, "echo cannot pass for a Centrifugo server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_and_nothing_is_measured() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let mut p = params(Scenario::Echo, format!("ws://127.0.0.1:{port}/echo"));
    p.connections = 20;
    let r = run(&p).await;
    assert_eq!(r.failures.count("refused"), 20, "{:?}", r.failures);
    assert_eq!(r.connections.established, 0);
    assert!(!r.measured());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_of_a_refused_upgrade_is_counted() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Connect, format!("ws://{addr}/no-such-endpoint"));
    p.connections = 10;
    let r = run(&p).await;
    assert_eq!(r.failures.count("http_404"), 10, "{:?}", r.failures);
    assert!(!r.measured());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refusals_are_reported_as_refusals_with_their_status_over_ws_and_tcp() {
    let flags = [("listen", "127.0.0.1:0"), ("tcp_listen", "127.0.0.1:0"), ("dev", "true"), ("max_connections", "5")]
        .map(|(k, v)| (k.to_string(), v.to_string()));
    for protocol in [ringcast_bench::params::Protocol::Centrifuge, ringcast_bench::params::Protocol::Tcp] {
        // A fresh node per protocol: each run's connections hold its 5 places until they close.
        let (config, settings) = ringcast_server::Config::load(None, |_| None, &flags).expect("test config");
        let server = ringcast_server::Server::bind(config, settings).expect("bind");
        let url = match protocol {
            ringcast_bench::params::Protocol::Tcp => format!("tcp://{}", server.tcp_addr().expect("tcp listener")),
            _ => format!("ws://{}/connection/websocket", server.local_addr().expect("bound")),
        };
        let (stop, rx) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            rx.await.ok();
        }));
        let mut p = params(Scenario::Idle, url);
        p.protocol = protocol;
        p.connections = 8;
        p.window = 1;
        let r = run(&p).await;
        let label = match protocol {
            ringcast_bench::params::Protocol::Tcp => "rejected_tcp_error_12",
            _ => "rejected_503",
        };
        assert_eq!(r.failures.count(label), 3, "{:?}", r.failures);
        assert_eq!(r.failures.total(), 3, "{:?}", r.failures);
        assert_eq!(r.connections.established, 5);
        let table = r.table();
        assert!(table.contains("3 refused by the server's limits"), "{table}");
        assert!(!table.contains("failed"), "a refusal is not a failure: {table}");
        assert!(table.contains("retry after 1s") || table.contains("Retry-After 1s"), "{table}");
        drop(stop);
    }
}

/// A minimal broadcast server: every message is forwarded to every other connection. With `lossy`,
/// every 10th message for the first accepted connection is dropped (and counted in `dropped`).
struct Broadcast {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// Every connection, by accept order, and the queue its writer task drains.
type Peers = Vec<(usize, mpsc::UnboundedSender<Message>)>;

async fn broadcast_server(lossy: bool) -> Broadcast {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let peers: Arc<Mutex<Peers>> = Arc::default();
    let for_first = Arc::new(AtomicU64::new(0));
    let (r, d) = (received.clone(), dropped.clone());
    tokio::spawn(async move {
        let mut next_id = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let id = next_id;
            next_id += 1;
            let (peers, received, dropped, for_first) = (peers.clone(), r.clone(), d.clone(), for_first.clone());
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
                let (mut sink, mut source) = ws.split();
                let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
                peers.lock().unwrap().push((id, tx));
                tokio::spawn(async move {
                    while let Some(m) = rx.recv().await {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(msg)) = source.next().await {
                    if !msg.is_binary() && !msg.is_text() {
                        continue;
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                    let peers = peers.lock().unwrap();
                    for (peer, tx) in peers.iter() {
                        if *peer == id {
                            continue;
                        }
                        if lossy && *peer == 0 && for_first.fetch_add(1, Ordering::Relaxed) % 10 == 9 {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let _ = tx.send(msg.clone());
                    }
                }
                peers.lock().unwrap().retain(|(p, _)| *p != id);
            });
        }
    });
    Broadcast { addr, received, dropped }
}

fn fanout_params(addr: SocketAddr) -> Params {
    let mut p = params(Scenario::Fanout, format!("ws://{addr}/"));
    p.protocol = Protocol::Raw;
    p.subscribers = 50;
    p.publishers = 2;
    p.rate = 500.0;
    p.size = 48;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_raw_reports_no_loss_when_there_is_none() {
    let server = broadcast_server(false).await;
    let p = fanout_params(server.addr);
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    let f = r.fanout.as_ref().expect("fanout figures");
    let published = server.received.load(Ordering::Relaxed);
    assert_eq!(f.published, published, "the tool's count of published messages matches the server's");
    // Never ahead of the schedule: at most 500/s × 1.2 s, plus the first message of each publisher.
    assert!(published > 0 && published <= 600 + 2, "500/s for 1.2 s, got {published}");
    assert_eq!(f.subscribers, 50);
    assert_eq!((f.lost, f.subscribers_with_loss), (0, 0));
    assert_eq!(f.delivered, published * 50);
    assert!(f.per_subscriber.iter().all(|s| s.received == published && s.lost == 0));
    let m = r.messages.as_ref().expect("messages");
    assert_eq!((m.out_of_order, m.foreign), (0, 0));
    let l = r.latency.as_ref().expect("delivery latency");
    assert!(l.samples > 0 && l.samples <= f.delivered, "{} samples of {}", l.samples, f.delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_raw_reports_exactly_the_loss_the_server_caused() {
    let server = broadcast_server(true).await;
    let p = fanout_params(server.addr);
    let r = run(&p).await;
    let dropped = server.dropped.load(Ordering::Relaxed);
    // Every 10th of what the first subscriber was sent: how many depends on throughput, so only "some".
    assert!(dropped > 0, "the server dropped {dropped}");
    let f = r.fanout.as_ref().expect("fanout figures");
    assert_eq!(f.lost, dropped, "loss reported = messages the server dropped");
    assert_eq!((f.subscribers_with_loss, f.max_loss), (1, dropped));
    let victim: Vec<_> = f.per_subscriber.iter().filter(|s| s.lost > 0).collect();
    assert_eq!(victim.len(), 1);
    assert_eq!(victim[0].received + dropped, f.published);
    assert_eq!(r.messages.as_ref().map(|m| m.lost), Some(dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_raw_window_mode_refills_and_loses_nothing() {
    let server = broadcast_server(false).await;
    let mut p = fanout_params(server.addr);
    p.subscribers = 20;
    p.rate = 0.0;
    p.window = 1;
    p.duration = Duration::from_millis(500);
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    let f = r.fanout.as_ref().expect("fanout figures");
    // A window of 1 is refilled only from acknowledgements: more than one message published means a
    // refill happened (one that missed its acknowledgement waits out a 1-s stall, longer than this whole
    // run). How many more is throughput, a benchmark's figure.
    assert!(f.published > 1, "published {}", f.published);
    assert_eq!(f.published, server.received.load(Ordering::Relaxed));
    assert_eq!(f.lost, 0);
}

/// A stand-in for a Centrifugo server, as much of client protocol v2 (JSON) as fan-out uses: connect,
/// subscribe, publish (answered, and pushed to every subscriber). It pings each subscriber (`{}`) in the
/// same frame as the subscribe reply, so multi-message frames and ping answers are exercised too.
/// This checks the client side against the protocol description; it is not a Centrifugo.
struct Centrifugo {
    addr: SocketAddr,
    published: Arc<AtomicU64>,
    pongs: Arc<AtomicU64>,
}

async fn centrifugo_stand_in() -> Centrifugo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let published = Arc::new(AtomicU64::new(0));
    let pongs = Arc::new(AtomicU64::new(0));
    let subscribers: Arc<Mutex<Peers>> = Arc::default();
    let (p, q) = (published.clone(), pongs.clone());
    tokio::spawn(async move {
        let mut next_id = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let id = next_id;
            next_id += 1;
            let (subscribers, published, pongs) = (subscribers.clone(), p.clone(), q.clone());
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
                let (mut sink, mut source) = ws.split();
                let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
                tokio::spawn(async move {
                    while let Some(m) = rx.recv().await {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(Message::Text(text))) = source.next().await {
                    for line in text.lines() {
                        let Ok(cmd) = serde_json::from_str::<serde_json::Value>(line) else { return };
                        let cid = cmd["id"].as_u64().unwrap_or(0);
                        if cmd.as_object().is_some_and(|o| o.is_empty()) {
                            pongs.fetch_add(1, Ordering::Relaxed);
                        } else if cmd.get("connect").is_some() {
                            let _ = tx.send(Message::text(format!(r#"{{"id":{cid},"connect":{{"client":"c{id}"}}}}"#)));
                        } else if cmd.get("subscribe").is_some() {
                            subscribers.lock().unwrap().push((id, tx.clone()));
                            let _ = tx.send(Message::text(format!("{{\"id\":{cid},\"subscribe\":{{}}}}\n{{}}")));
                        } else if let Some(p) = cmd.get("publish") {
                            published.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.send(Message::text(format!(r#"{{"id":{cid},"publish":{{}}}}"#)));
                            let push = format!(
                                r#"{{"push":{{"channel":"bench","pub":{{"data":{},"offset":1}}}}}}"#,
                                p["data"]
                            );
                            for (_, sub) in subscribers.lock().unwrap().iter() {
                                let _ = sub.send(Message::text(push.clone()));
                            }
                        }
                    }
                }
                subscribers.lock().unwrap().retain(|(p, _)| *p != id);
            });
        }
    });
    Centrifugo { addr, published, pongs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_centrifuge_client_side_against_a_stand_in() {
    let server = centrifugo_stand_in().await;
    let mut p = fanout_params(server.addr);
    p.url = format!("ws://{}/connection/websocket", server.addr);
    p.protocol = Protocol::Centrifuge;
    p.subscribers = 20;
    p.size = 80;
    p.rate = 400.0;
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    let f = r.fanout.as_ref().expect("fanout figures");
    let published = server.published.load(Ordering::Relaxed);
    assert!(published > 0 && published <= 480 + 2, "400/s for 1.2 s, got {published}");
    assert_eq!(f.published, published);
    assert_eq!((f.lost, f.delivered), (0, published * 20));
    assert_eq!(r.messages.as_ref().map(|m| (m.out_of_order, m.foreign)), Some((0, 0)));
    assert_eq!(server.pongs.load(Ordering::Relaxed), 20, "every subscriber answered its ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_centrifuge_against_ringcast_over_websocket_and_http_api() {
    let (addr, _stop) = ringcast_server_with(&[("api_key", "bench-secret")]).await;
    for api_key in [None, Some("bench-secret".to_string())] {
        let mut p = fanout_params(addr);
        p.url = format!("ws://{addr}/connection/websocket");
        p.protocol = Protocol::Centrifuge;
        p.subscribers = 20;
        p.size = 64;
        p.rate = 400.0;
        p.api_key = api_key.clone();
        let r = run(&p).await;
        assert_eq!(r.failures.total(), 0, "api key {api_key:?}: {:?}", r.failures);
        let f = r.fanout.as_ref().expect("fanout figures");
        assert!(f.published > 0 && f.published <= 480 + 2, "api key {api_key:?}: published {}", f.published);
        assert_eq!((f.lost, f.delivered), (0, f.published * 20), "api key {api_key:?}");
        assert_eq!(r.messages.as_ref().map(|m| (m.out_of_order, m.foreign)), Some((0, 0)));
    }
}

#[test]
fn cli_arguments_become_params() {
    let m = ringcast_bench::command()
        .try_get_matches_from([
            "bench",
            "echo",
            "--url",
            "ws://127.0.0.1:9/echo",
            "--connections",
            "5",
            "--window",
            "3",
            "--size",
            "20",
            "--duration",
            "500ms",
            "--warmup",
            "0",
            "--source-ips",
            "127.0.0.1-127.0.0.3",
            "--server-pid",
            "42",
            "--processes",
            "2",
            "--rate",
            "100",
        ])
        .expect("valid arguments");
    let (name, sub) = m.subcommand().expect("a scenario");
    assert_eq!(name, "echo");
    let p = ringcast_bench::params_from(Scenario::Echo, sub).expect("valid params");
    assert_eq!((p.connections, p.window, p.size, p.processes), (5, 3, 20, 2));
    assert_eq!((p.duration, p.warmup), (Duration::from_millis(500), Duration::ZERO));
    assert_eq!(p.source_ips.len(), 3);
    assert_eq!(p.server_pid, Some(42));
    assert_eq!(p.rate, 100.0);

    let m = ringcast_bench::command()
        .try_get_matches_from(["bench", "fanout", "--url", "ws://h:1/", "--protocol", "centrifuge", "--api-key", "k"])
        .expect("valid arguments");
    let p = ringcast_bench::params_from(Scenario::Fanout, m.subcommand().expect("scenario").1).expect("params");
    assert_eq!((p.protocol, p.api_key.as_deref(), p.publishers), (Protocol::Centrifuge, Some("k"), 1));

    // Mistakes are caught, by clap or by validation naming the flag.
    let cmd = ringcast_bench::command;
    assert!(cmd().try_get_matches_from(["bench", "echo", "--connections", "many"]).is_err());
    assert!(cmd().try_get_matches_from(["bench", "fanout"]).is_err(), "fanout needs --url");
    assert!(cmd().try_get_matches_from(["bench", "idle", "--rate", "5"]).is_err(), "idle has no rate");
    let m = cmd().try_get_matches_from(["bench", "echo", "--size", "4"]).expect("parses");
    let e = ringcast_bench::params_from(Scenario::Echo, m.subcommand().expect("scenario").1).unwrap_err();
    assert!(e.to_string().starts_with("--size"), "{e}");
    // wss:// is accepted (issue 13); --insecure is carried to the workers.
    let m = cmd().try_get_matches_from(["bench", "echo", "--url", "wss://x/", "--insecure"]).expect("parses");
    let p = ringcast_bench::params_from(Scenario::Echo, m.subcommand().expect("scenario").1).expect("wss:// params");
    assert!(p.insecure);
    let m = cmd().try_get_matches_from(["bench", "echo", "--url", "http://x/"]).expect("parses");
    assert!(ringcast_bench::params_from(Scenario::Echo, m.subcommand().expect("scenario").1).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plot_draws_an_svg() {
    let (addr, _stop) = ringcast_server().await;
    let mut p = params(Scenario::Echo, format!("ws://{addr}/echo"));
    p.connections = 10;
    p.duration = Duration::from_millis(1500);
    let r = run(&p).await;
    let path = std::env::temp_dir().join(format!("ringcast-bench-plot-{}.svg", std::process::id()));
    ringcast_bench::plot::write_svg(&r, &path).expect("plot written");
    let svg = std::fs::read_to_string(&path).expect("readable");
    let _ = std::fs::remove_file(&path);
    assert!(svg.starts_with("<svg") && svg.contains("messages/s") && svg.contains("p99"));
}

/// `--compression` against the real server: offered, accepted, inflated before the checks (no loss, no
/// disorder, nothing foreign), and the wire carries fewer bytes per delivery than without it. A server
/// with compression off declines the same offer and the run is plain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_centrifuge_with_compression_inflates_and_counts_wire_bytes() {
    let (on, _stop_on) = ringcast_server_with(&[("compression", "true")]).await;
    let (off, _stop_off) = ringcast_server().await;
    let mut per_delivery = Vec::new();
    for (addr, offer, accepted) in [(on, false, false), (on, true, true), (off, true, false)] {
        let mut p = fanout_params(addr);
        p.url = format!("ws://{addr}/connection/websocket");
        p.protocol = Protocol::Centrifuge;
        p.subscribers = 20;
        p.size = 1500;
        p.payload = PayloadKind::Json;
        p.rate = 200.0;
        p.compression = offer;
        let r = run(&p).await;
        let case = format!("server {addr}, offer {offer}");
        assert_eq!(r.failures.total(), 0, "{case}: {:?}", r.failures);
        let f = r.fanout.as_ref().expect("fanout figures");
        assert!(f.published > 0, "{case}");
        assert_eq!((f.lost, f.delivered), (0, f.published * 20), "{case}");
        assert_eq!(r.messages.as_ref().map(|m| (m.out_of_order, m.foreign)), Some((0, 0)), "{case}");
        assert_eq!(f.compressed_subscribers, if accepted { 20 } else { 0 }, "{case}");
        let w = f.wire_bytes_per_delivery.expect("wire bytes per delivery");
        per_delivery.push(w);
    }
    // Uncompressed, a delivery carries at least its ~1.4 KB of data; compressed, well under half.
    let (plain, compressed, declined) = (per_delivery[0], per_delivery[1], per_delivery[2]);
    assert!(plain > 1300.0 && declined > 1300.0, "{per_delivery:?}");
    assert!(compressed < plain / 2.0, "{per_delivery:?}");
}

/// The real server in dev mode with its TCP binary protocol listener; (WebSocket address, TCP address).
async fn ringcast_server_with_tcp() -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let flags = vec![
        ("listen".to_string(), "127.0.0.1:0".to_string()),
        ("tcp_listen".into(), "127.0.0.1:0".into()),
        ("dev".into(), "true".into()),
    ];
    let (config, settings) = ringcast_server::Config::load(None, |_| None, &flags).expect("test config is valid");
    let server = ringcast_server::Server::bind(config, settings).expect("bind 127.0.0.1:0");
    let addr = server.local_addr().expect("bound address");
    let tcp = server.tcp_addr().expect("tcp_listen is on");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        rx.await.ok();
    }));
    (addr, tcp, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_the_tcp_protocol_delivers_every_publication_the_server_sequenced() {
    let (_, tcp, _stop) = ringcast_server_with_tcp().await;
    let mut p = params(Scenario::Fanout, format!("tcp://{tcp}"));
    p.protocol = Protocol::Tcp;
    p.subscribers = 20;
    p.publishers = 2;
    p.size = 64;
    p.rate = 400.0;
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    let f = r.fanout.as_ref().expect("fanout figures");
    assert!(f.published > 0 && f.published <= 480 + 2, "400/s for 1.2 s, published {}", f.published);
    assert_eq!((f.lost, f.delivered), (0, f.published * 20));
    assert_eq!(r.messages.as_ref().map(|m| (m.out_of_order, m.foreign)), Some((0, 0)));
    assert!(r.latency.as_ref().is_some_and(|l| l.p99_us > 0.0), "latency measured from the payload's send time");
    // The server's own count: --dev keeps history on "bench", so the next publication's offset is one
    // past every publication the run made.
    let mut c = ringcast_bench::tcp::TcpClient::connect(tcp, "").await.expect("connect");
    assert_eq!(c.publish("bench", b"after").await.expect("publish"), f.published + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_over_the_tcp_protocol_holds_subscribed_connections() {
    let (_, tcp, _stop) = ringcast_server_with_tcp().await;
    let mut p = params(Scenario::Idle, format!("tcp://{tcp}"));
    p.protocol = Protocol::Tcp;
    p.connections = 200;
    p.server_pid = Some(std::process::id());
    let r = run(&p).await;
    assert_eq!(r.failures.total(), 0, "{:?}", r.failures);
    assert_eq!((r.connections.established, r.connections.held), (200, 200));
    assert!(r.memory.as_ref().is_some_and(|m| m.server_bytes_per_connection.is_some()));
    // A WebSocket listener is not a TCP protocol server: its HTTP answer is no CONNECTED.
    let (ws, _, _stop2) = ringcast_server_with_tcp().await;
    let mut wrong = params(Scenario::Idle, format!("tcp://{ws}"));
    wrong.protocol = Protocol::Tcp;
    wrong.connections = 5;
    wrong.connect_timeout = Duration::from_millis(500);
    let r = run(&wrong).await;
    assert!(r.failures.total() > 0 && r.connections.established == 0, "{:?}", r.failures);
}
