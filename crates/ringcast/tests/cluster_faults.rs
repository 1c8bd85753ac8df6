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

/// A namespace without positions (no history, nothing forced): what a node delivers on its own while
/// the engine is out of reach.
const LIVE: &str = "
[[namespaces]]
name = \"live\"
presence = true
join_leave = true
allow_subscribe_for_client = true
allow_publish_for_client = true
allow_presence_for_client = true
";

/// Whether `m` is a publication push of `channel` with data `{"n": n}`.
fn is_pub(m: &Value, channel: &str, n: &str) -> bool {
    m["push"]["channel"] == channel && m["push"]["pub"]["data"]["n"] == n
}

fn is_unsubscribe(m: &Value) -> bool {
    m["push"].get("unsubscribe").is_some()
}

/// Reads whole frames into `log` until a message of it satisfies `found` (each read bounded by `next`).
async fn read_until(ws: &mut Ws, log: &mut Vec<Value>, what: &str, found: impl Fn(&Value) -> bool) {
    while !log.iter().any(&found) {
        match next(ws).await {
            Got::Json(msgs) => log.extend(msgs),
            Got::Closed(c) => panic!("closed before {what}: {c:?}; read {log:?}"),
        }
    }
}

/// Subscribes as an SDK does after a 2500: error 100 is temporary and retried (50 tries, 100 ms apart).
async fn resubscribe(ws: &mut Ws, first_id: u64, subscribe: Value) -> Value {
    let mut r = Value::Null;
    for id in first_id..first_id + 50 {
        r = call(ws, json!({"id": id, "subscribe": subscribe})).await.0;
        if r.get("error").is_none() {
            return r;
        }
        assert_eq!(r["error"]["code"], 100, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never subscribed again: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_each_node_delivers_its_own_history_less_publications_and_loses_no_acknowledged_one() {
    let dir = RemovedAtEnd(std::env::temp_dir().join(format!("ringcast-outage-redis-{}", std::process::id())));
    std::fs::remove_dir_all(&dir.0).ok();
    let mut redis = OwnRedis::start_durable(21120, &dir.0);
    let prefix = format!("rc-outage-{}", std::process::id());
    let top = "engine_breaker_failures = 3\nengine_breaker_cooldown = \"1s\"";
    let nodes = [
        Node::start_with(&prefix, 0, redis.port, "300ms", top, LIVE),
        Node::start_with(&prefix, 1, redis.port, "300ms", top, LIVE),
    ];
    let (a, b) = (nodes[0].port, nodes[1].port);
    const ROOM: &str = "live:room";
    // Subscribers of a history-less channel on both nodes (a1 listens for join/leave), and of a
    // history channel on both.
    let (mut a1, mut a2, mut b1) = (client(a, "a1").await, client(a, "a2").await, client(b, "b1").await);
    for (ws, join_leave) in [(&mut a1, true), (&mut a2, false), (&mut b1, false)] {
        let (r, _) = call(ws, json!({"id":2,"subscribe":{"channel": ROOM, "join_leave": join_leave}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let (mut ha, mut hb) = (client(a, "ha").await, client(b, "hb").await);
    let mut epoch = String::new();
    for ws in [&mut ha, &mut hb] {
        let (r, _) = call(ws, json!({"id":2,"subscribe":{"channel":"feed","recoverable":true}})).await;
        epoch = r["subscribe"]["epoch"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    }
    let (mut log_a1, mut log_a2, mut log_b1) = (Vec::new(), Vec::new(), Vec::new());

    // Redis up: everything goes through it; the acknowledged publications of the history channel get
    // offsets 1 and 2.
    let r = api(a, "publish", &json!({"channel": ROOM, "data":{"n":"before"}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    for n in 1..=2 {
        let r = api(a, "publish", &json!({"channel":"feed","data":{"n":n}}));
        assert_eq!(r["result"]["offset"], n, "{r}");
    }
    for (ws, log) in [(&mut a1, &mut log_a1), (&mut a2, &mut log_a2), (&mut b1, &mut log_b1)] {
        read_until(ws, log, "before", |m| is_pub(m, ROOM, "before")).await;
    }
    for ws in [&mut ha, &mut hb] {
        assert_eq!(read_publications(ws, "feed", 2, Vec::new()).await, [1, 2]);
    }

    // Redis paused: the publish times out (error 100) but Redis runs it when resumed. A timeout is never
    // delivered locally, or a1 would get it twice: once now, once from Redis.
    redis.signal(libc::SIGSTOP);
    let r = api(a, "publish", &json!({"channel": ROOM, "data":{"n":"paused"}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    redis.signal(libc::SIGCONT);
    publish_until_accepted(a, ROOM, json!({"n":"marker"}), 50);
    read_until(&mut a1, &mut log_a1, "marker", |m| is_pub(m, ROOM, "marker")).await;
    assert_eq!(log_a1.iter().filter(|m| is_pub(m, ROOM, "paused")).count(), 1, "once, from Redis: {log_a1:?}");

    // Redis killed. Once the nodes know it is down, a publish on A to the history-less channel answers
    // error 100 (API and client), yet A's subscribers get it; B's do not (checked below).
    redis.signal(libc::SIGKILL);
    let _ = redis.child.wait();
    assert_eq!(engine_panel(a, "down")["state"], "down");
    assert_eq!(engine_panel(b, "down")["state"], "down");
    let r = api(a, "publish", &json!({"channel": ROOM, "data":{"n":"alone-api"}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    let (r, pushes) = call(&mut a2, json!({"id":3,"publish":{"channel": ROOM,"data":{"n":"alone-client"}}})).await;
    assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
    log_a2.extend(pushes);
    for (ws, log) in [(&mut a1, &mut log_a1), (&mut a2, &mut log_a2)] {
        for n in ["alone-api", "alone-client"] {
            read_until(ws, log, n, |m| is_pub(m, ROOM, n)).await;
        }
    }
    assert_eq!(metric(a, "ringcast_engine_local_only_total"), 2.0);
    // The history channel: error 100, and nobody gets it (it would need an offset).
    let r = api(a, "publish", &json!({"channel":"feed","data":{"n":"refused"}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    // Local work goes on: a2 leaves, and a1 gets the leave push. Subscribing needs the engine: 100.
    let (r, pushes) = call(&mut a2, json!({"id":4,"unsubscribe":{"channel": ROOM}})).await;
    log_a2.extend(pushes);
    assert!(r.get("error").is_none(), "{r}");
    read_until(&mut a1, &mut log_a1, "a2's leave", |m| m["push"]["leave"]["info"]["user"] == "a2").await;
    let (r, _) = call(&mut a2, json!({"id":5,"subscribe":{"channel": ROOM}})).await;
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(metric(b, "ringcast_engine_local_only_total"), 0.0);

    // Redis back, with what it acknowledged. Both nodes resubscribe and tell every subscriber 2500.
    redis = OwnRedis::start_durable(21120, &dir.0);
    read_until(&mut a1, &mut log_a1, "2500", is_unsubscribe).await;
    read_until(&mut b1, &mut log_b1, "2500", is_unsubscribe).await;
    for log in [&log_a1, &log_b1] {
        let push = log.iter().find(|m| is_unsubscribe(m)).map(|m| m["push"].clone()).unwrap_or_default();
        assert_eq!((&push["channel"], &push["unsubscribe"]["code"]), (&json!(ROOM), &json!(2500)), "{push}");
    }
    assert!(
        !log_b1.iter().any(|m| is_pub(m, ROOM, "alone-api") || is_pub(m, ROOM, "alone-client")),
        "B never gets what A delivered alone: {log_b1:?}"
    );
    for ws in [&mut ha, &mut hb] {
        let mut log = Vec::new();
        read_until(ws, &mut log, "2500", is_unsubscribe).await;
        assert!(offsets(&log, "feed").is_empty(), "nothing of the history channel during the outage: {log:?}");
        // The acknowledged publications survived: recovery from offset 2 in the same epoch is complete.
        let r =
            resubscribe(ws, 10, json!({"channel":"feed","recoverable":true,"recover":true,"offset":2,"epoch":epoch}))
                .await;
        assert_eq!((&r["subscribe"]["recovered"], &r["subscribe"]["epoch"]), (&json!(true), &json!(epoch)), "{r}");
    }
    let h = api(b, "history", &json!({"channel":"feed","limit":10}));
    let kept: Vec<u64> = h["result"]["publications"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["offset"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(kept, [1, 2], "every acknowledged publication, nothing else: {h}");
    for ws in [&mut a1, &mut b1] {
        resubscribe(ws, 10, json!({"channel": ROOM})).await;
    }

    // Publishing works across nodes again.
    let r = publish_until_accepted(b, "feed", json!({"n":3}), 50);
    assert_eq!(r["result"]["offset"], 3, "{r}");
    for ws in [&mut ha, &mut hb] {
        assert_eq!(read_publications(ws, "feed", 1, Vec::new()).await, [3]);
    }
    let r = api(b, "publish", &json!({"channel": ROOM, "data":{"n":"again"}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    read_until(&mut a1, &mut log_a1, "again", |m| is_pub(m, ROOM, "again")).await;
    drop(nodes);
    drop(redis);
}

/// A directory removed when the test ends, passed or failed.
struct RemovedAtEnd(std::path::PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// `redis-cli` against the redis-server on `port`: its answer.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out =
        std::process::Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An API disconnect made through node A while node B's PUB/SUB connection is down reaches B's client
/// once B is connected again: B applies what it missed from the control log. B connects as a Redis
/// user of its own, so the window is deterministic: its PUB/SUB connection is killed and the user is
/// disabled (B's reconnects are refused, A is untouched) until the disconnect has been published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_disconnect_made_while_a_node_reconnects_reaches_its_client_from_the_control_log() {
    let redis = OwnRedis::start(21140);
    let port = redis.port;
    assert_eq!(redis_cli(port, &["ACL", "SETUSER", "nodeb", "on", ">nodeb-pw", "~*", "&*", "+@all"]).trim(), "OK");
    let prefix = format!("rc-ctllog-{}", std::process::id());
    let a = Node::start_on(&prefix, 0, port, "2s");
    let b = Node::launch(
        &format!("{prefix}-1"),
        &format!(
            "broker = \"redis\"\nredis_url = [\"redis://nodeb:nodeb-pw@127.0.0.1:{port}\"]\nredis_prefix = \"{prefix}\"\nredis_timeout = \"2s\"\n{CHANNELS}"
        ),
    );
    let mut carol = client(b.port, "carol").await;
    // Control reaches B live first.
    let r = api(a.port, "refresh", &json!({"user":"carol","expire_at": 4102444800u64}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    // B's PUB/SUB connection goes, and B may not make another.
    assert_eq!(redis_cli(port, &["ACL", "SETUSER", "nodeb", "off"]).trim(), "OK");
    let killed = redis_cli(port, &["CLIENT", "KILL", "USER", "nodeb", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "1", "B's one PUB/SUB connection");
    let panel = engine_panel(b.port, "down");
    assert_eq!(panel["state"], "down", "B knows it receives nothing: {panel}");
    let r = api(a.port, "disconnect", &json!({"user":"carol","disconnect":{"code":4005,"reason":"moved"}}));
    assert_eq!(api_error_code(&r), 0, "published while B is away: {r}");
    let subscribers = redis_cli(port, &["CLIENT", "LIST", "TYPE", "pubsub"]);
    assert!(!subscribers.contains("user=nodeb"), "B was not subscribed when it was sent: {subscribers}");
    // B comes back (its backoff is at most 2 s) and catches up.
    assert_eq!(redis_cli(port, &["ACL", "SETUSER", "nodeb", "on"]).trim(), "OK");
    assert_missed_disconnect_caught_up(&mut carol, b.port, "control log").await;
    drop((a, b));
}

/// Thousands of subscribed clients with presence leave at once (a load balancer dropping them, a
/// network blip): the node must stay up. Each ended session used to wait for its presence removal in
/// `block_in_place`; 2,000 at once used up tokio's 512 blocking threads before `engine_max_waiting`
/// (1024) refused any, every worker ended up waiting, and the node hung with its sockets in CLOSE-WAIT
/// (found with `ringcast bench idle` against a Redis node; BENCHMARKS.md, "50,000 connections").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_clients_closing_at_once_do_not_hang_the_node() {
    const CLIENTS: usize = 2000;
    let prefix = format!("massclose{}", std::process::id());
    let node = Node::start(&prefix, 0);
    let port = node.port;
    let mut clients = Vec::with_capacity(CLIENTS);
    for batch in 0..CLIENTS / 100 {
        let joined = futures_util::future::join_all((0..100).map(|i| async move {
            let mut ws = client(port, &format!("u{batch}-{i}")).await;
            let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":format!("room{}", i % 10)}})).await;
            assert!(r.get("error").is_none(), "{r}");
            ws
        }))
        .await;
        clients.extend(joined);
    }
    let before = api(port, "presence_stats", &json!({"channel":"room0"}));
    assert_eq!(before["result"]["num_clients"], CLIENTS / 10, "{before}");
    drop(clients);
    // The node answers and every entry goes (bounded: 300 tries, 100 ms apart); a hung node answers
    // neither (the HTTP helper's read times out and fails the test).
    let mut left = Value::Null;
    for _ in 0..300 {
        left = api(port, "presence_stats", &json!({"channel":"room0"}));
        if left["result"]["num_clients"] == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(left["result"]["num_clients"], 0, "presence after every client left: {left}");
    health(port);
}
