//! `--compare`: two real servers (ringcast, in this process), alternating rounds, every round counted.

use std::time::Duration;

use ringcast_bench::compare::{self, Side};
use ringcast_bench::{Params, Protocol, Scenario};
use tokio::sync::oneshot;

async fn ringcast_server() -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let flags = vec![("listen".to_string(), "127.0.0.1:0".to_string()), ("dev".into(), "true".into())];
    let (config, settings) = ringcast_server::Config::load(None, |_| None, &flags).expect("test config is valid");
    let server = ringcast_server::Server::bind(config, settings).expect("bind 127.0.0.1:0");
    let addr = server.local_addr().expect("bound address");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        rx.await.ok();
    }));
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_both_servers_in_alternating_rounds() {
    let (a, _stop_a) = ringcast_server().await;
    let (b, _stop_b) = ringcast_server().await;
    let mut p = Params::new(Scenario::Fanout, format!("ws://{a}/connection/websocket"));
    p.protocol = Protocol::Centrifuge;
    p.duration = Duration::from_millis(500);
    p.warmup = Duration::from_millis(100);
    p.subscribers = 5;
    p.rate = 100.0;
    p.progress = false;
    let other = Side { url: format!("ws://{b}/connection/websocket"), server_pid: None, protocol: None };
    let cmp = compare::run(&p, &other, 2).await.expect("the comparison takes place");
    assert_eq!((cmp.a.len(), cmp.b.len()), (2, 2));
    assert!(cmp.a.iter().all(|r| r.params.url == p.url));
    assert!(cmp.b.iter().all(|r| r.params.url == other.url && r.params.protocol == Protocol::Centrifuge));
    for r in cmp.a.iter().chain(&cmp.b) {
        let f = r.fanout.as_ref().expect("fan-out figures");
        assert!(f.published > 0);
        assert_eq!((f.lost, f.delivered), (0, f.published * 5), "{}", r.params.url);
    }
    assert!(cmp.measured());
    let table = cmp.table();
    assert!(table.contains("latency p99") && table.contains("B/A"), "{table}");
}
