//! A cluster when something fails: a node killed (SIGKILL, no shutdown), Redis paused. Nodes are child
//! processes on the real Redis (127.0.0.1:6379) with a prefix of their own, or on a redis-server a test
//! starts on a port of the 21100-21199 range.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::*;

/// The uids `info` on `port` lists.
fn info_uids(port: u16) -> Vec<String> {
    let r = api(port, "info", &json!({}));
    let nodes = r["result"]["nodes"].as_array().cloned().unwrap_or_else(|| panic!("{r}"));
    nodes.iter().map(|n| n["uid"].as_str().unwrap_or_default().to_string()).collect()
}

/// Polls `info` on `port` (bounded: 300 tries, 100 ms apart) until `done` holds of its nodes.
fn poll_info(port: u16, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut nodes = Vec::new();
    for _ in 0..300 {
        let r = api(port, "info", &json!({}));
        nodes = r["result"]["nodes"].as_array().cloned().unwrap_or_default();
        if done(&nodes) {
            return nodes;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("info on {port}: never {what}: {nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_lists_every_live_node_and_a_killed_one_drops_out() {
    let mut cluster = Cluster::start("registry", 2);
    let (a, b) = (cluster.port(0), cluster.port(1));
    let own_a = info_uids(a)[0].clone();
    let own_b = info_uids(b)[0].clone();
    assert_ne!(own_a, own_b, "each node has its own uid and lists itself first");
    // A client on B (subscribed to one channel) shows in B's entry as A sees it.
    let mut ws = client(b, "counted").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"seen"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let nodes = poll_info(a, "B with its client", |n| {
        n.iter().any(|n| n["uid"] == own_b.as_str() && n["num_clients"] == 1 && n["num_channels"] == 1)
    });
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes[0]["uid"], own_a.as_str(), "the answering node first");
    for n in &nodes {
        for field in ["name", "version", "num_clients", "num_users", "num_subs", "num_channels", "uptime"] {
            assert!(n.get(field).is_some(), "{field} in {n}");
        }
    }
    poll_info(b, "A", |n| n.len() == 2 && n[1]["uid"] == own_a.as_str());
    drop(ws);
    cluster.nodes[1].kill();
    let nodes = poll_info(a, "without the killed node", |n| n.len() == 1);
    assert_eq!(nodes[0]["uid"], own_a.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_recover_exactly_on_another_while_publishers_keep_publishing() {
    let mut cluster = Cluster::start("killed", 2);
    let (a, b) = (cluster.port(0), cluster.port(1));
    const READERS: usize = 3;
    const TOTAL: u64 = 300;
    let mut readers = Vec::new();
    let mut epoch = String::new();
    for i in 0..READERS {
        let mut ws = client(b, &format!("reader{i}")).await;
        let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"feed","recoverable":true}})).await;
        epoch = r["subscribe"]["epoch"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
        readers.push(ws);
    }
    // Two publishers through A's API, one through a client on A: all keep going across the kill.
    let mut publishers = Vec::new();
    for p in 0..2u64 {
        publishers.push(std::thread::spawn(move || {
            for n in 0..TOTAL / 3 {
                let r = api(a, "publish", &json!({"channel":"feed","data":{"p":p,"n":n}}));
                assert!(r["result"]["offset"].is_u64(), "{r}");
            }
        }));
    }
    let client_publisher = tokio::spawn(async move {
        let mut ws = client(a, "writer").await;
        for n in 0..TOTAL / 3 {
            let (r, _) = call(&mut ws, json!({"id": 10 + n, "publish":{"channel":"feed","data":{"p":2,"n":n}}})).await;
            assert!(r.get("error").is_none(), "{r}");
        }
    });
    // Each reader sees a few publications on B, then B dies under it.
    let mut seen = Vec::new();
    for ws in readers.iter_mut() {
        seen.push(read_publications(ws, "feed", 5, Vec::new()).await);
    }
    cluster.nodes[1].kill();
    let mut all = Vec::new();
    for (i, ws) in readers.iter_mut().enumerate() {
        // What arrived before the kill was noticed counts: the client recovers from its last offset.
        let mut got = seen[i].clone();
        while let Got::Json(msgs) = next(ws).await {
            got.extend(offsets(&msgs, "feed"));
        }
        let last = *got.last().expect("some before the kill");
        let mut ws = client(a, &format!("reader{i}")).await;
        let (r, pushes) = call(
            &mut ws,
            json!({"id":2,"subscribe":{"channel":"feed","recoverable":true,"recover":true,"offset":last,"epoch":epoch}}),
        )
        .await;
        assert_eq!(r["subscribe"]["recovered"], true, "reader {i}: {r}");
        assert_eq!(r["subscribe"]["epoch"].as_str(), Some(epoch.as_str()), "one epoch across nodes");
        assert!(offsets(&pushes, "feed").is_empty(), "no push before the subscribe reply");
        let replay = r["subscribe"]["publications"]
            .as_array()
            .map(|p| p.iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect::<Vec<_>>())
            .unwrap_or_default();
        let before = got.len();
        eprintln!("reader {i}: {before} before the kill, up to {last}; replay {replay:?}");
        got.extend(replay);
        all.push((got, ws));
    }
    for p in publishers {
        p.join().expect("publisher");
    }
    client_publisher.await.expect("client publisher");
    for (i, (got, ws)) in all.iter_mut().enumerate() {
        let got = read_publications(ws, "feed", TOTAL as usize, std::mem::take(got)).await;
        let expected: Vec<u64> = (1..=TOTAL).collect();
        assert_eq!(got, expected, "reader {i}: every offset once, in order, across the kill");
    }
}

/// A counter or gauge from /metrics on `port` (0 when absent).
fn metric(port: u16, series: &str) -> f64 {
    let out = http(port, "GET", "/metrics", "", "");
    let prefix = format!("{series} ");
    out.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse().unwrap_or(-1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_times_publishes_out_and_waiting_calls_never_exceed_engine_max_waiting() {
    let redis = OwnRedis::start(21100);
    let prefix = format!("rc-stall-{}", std::process::id());
    let node = Node::start_with(&prefix, 0, redis.port, "15s", "engine_max_waiting = 2\n", "");
    let port = node.port;
    let ok = api(port, "publish", &json!({"channel":"s","data":{"n":0}}));
    assert_eq!(ok["result"]["offset"], 1, "{ok}");
    let mut stuck = Vec::new();
    for i in 0..2 {
        stuck.push(client(port, &format!("w{i}")).await);
    }
    redis.signal(libc::SIGSTOP);
    // Two client publishes wait on the stalled Redis: the bound is reached.
    let mut waiting = Vec::new();
    for (i, mut ws) in stuck.into_iter().enumerate() {
        waiting.push(tokio::spawn(async move {
            call(&mut ws, json!({"id": 10 + i, "publish":{"channel":"s","data":{"i":i}}})).await.0
        }));
    }
    let mut now = 0.0;
    for _ in 0..100 {
        now = metric(port, "ringcast_engine_waiting");
        if now == 2.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(now, 2.0, "two calls wait on Redis");
    // Over the bound: refused at once with error 100, counted, and nothing more waits.
    for n in 0..5 {
        let r = api(port, "publish", &json!({"channel":"s","data":{"n":n}}));
        assert_eq!(api_error_code(&r), 100, "{r}");
    }
    assert_eq!(metric(port, "ringcast_engine_refused_total"), 5.0);
    assert_eq!(metric(port, "ringcast_engine_waiting"), 2.0, "refused calls do not pile up");
    // The two waiting ones time out (redis_timeout) with error 100.
    for w in waiting {
        let r = w.await.expect("publisher");
        assert_eq!(r["error"]["code"], 100, "{r}");
    }
    assert_eq!(metric(port, "ringcast_engine_waiting"), 0.0);
    redis.signal(libc::SIGCONT);
    let published = publish_until_accepted(port, "s", json!({"n":9}), 50);
    assert!(published["result"]["offset"].is_u64(), "publishing works again: {published}");
}
