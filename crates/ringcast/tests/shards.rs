//! Redis sharding (`redis_url` with two instances): two `ringcast serve` child processes over two
//! redis-server processes each test starts on its own ports (21200-21299 and 21400-21499, stopped
//! afterwards). Where a channel lives is checked in the Redis instances themselves (its keys), against
//! the hash the server uses.

mod support;

use std::time::Duration;

use ringcast_server::engine::shards::shard_index;
use serde_json::{json, Value};
use support::cluster::*;

/// A node over the Redis instances on `redis_ports` (one shard each, in that order), with `extra`
/// top-level keys.
fn shard_node(prefix: &str, n: usize, redis_ports: &[u16], extra: &str) -> Node {
    let urls: Vec<String> = redis_ports.iter().map(|p| format!("\"redis://127.0.0.1:{p}\"")).collect();
    let engine = format!(
        "broker = \"redis\"\nredis_url = [{}]\nredis_prefix = \"{prefix}\"\nredis_timeout = \"500ms\"\n{extra}\n{CHANNELS}",
        urls.join(", ")
    );
    Node::launch(&format!("shards-{prefix}-{n}"), &engine)
}

fn prefix(name: &str) -> String {
    format!("rc-shards-{name}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// The first channel named `base-N` that the hash places on `shard` of 2.
fn channel_on(shard: usize, base: &str) -> String {
    (0..1000).map(|i| format!("{base}-{i}")).find(|c| shard_index(c, 2) == shard).expect("a channel on the shard")
}

/// Reads pushes until `count` publications of `channel` arrived (an unsubscribe push of it fails the
/// test); returns their offsets in order.
async fn read_publications(ws: &mut Ws, channel: &str, count: usize, mut got: Vec<u64>) -> Vec<u64> {
    while got.len() < count {
        match next(ws).await {
            Got::Json(msgs) => {
                for m in &msgs {
                    let p = &m["push"];
                    assert!(!(p["channel"] == channel && p.get("unsubscribe").is_some()), "unsubscribed: {m}");
                }
                got.extend(offsets(&msgs, channel));
            }
            Got::Closed(c) => panic!("closed after {} of {count} publications: {c:?}", got.len()),
        }
    }
    got
}

/// Reads until an unsubscribe push of `channel` arrives; returns it.
async fn unsubscribe_push(ws: &mut Ws, channel: &str) -> Value {
    loop {
        match next(ws).await {
            Got::Json(msgs) => {
                if let Some(m) =
                    msgs.into_iter().find(|m| m["push"]["channel"] == channel && m["push"].get("unsubscribe").is_some())
                {
                    return m["push"].clone();
                }
            }
            Got::Closed(c) => panic!("closed: {c:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_live_on_the_shard_their_hash_names_and_deliver_in_offset_order_across_nodes() {
    let shards = [OwnRedis::start(21210), OwnRedis::start(21211)];
    let ports = [shards[0].port, shards[1].port];
    let prefix = prefix("place");
    let nodes = [shard_node(&prefix, 0, &ports, ""), shard_node(&prefix, 1, &ports, "")];
    // Twelve channels: each one's keys are in the instance the hash names, and only there.
    let names: Vec<String> = (0..12).map(|i| format!("spread-{i}")).collect();
    for c in &names {
        let r = api(nodes[0].port, "publish", &json!({"channel": c, "data": {"x": 1}}));
        assert_eq!(r["result"]["offset"], 1, "{r}");
    }
    let mut per_shard = [0, 0];
    for c in &names {
        let s = shard_index(c, 2);
        per_shard[s] += 1;
        assert_eq!(shards[s].keys(&format!("{prefix}:h:{c}")).len(), 1, "{c} on shard {s}");
        assert!(shards[1 - s].keys(&format!("{prefix}:*:{c}")).is_empty(), "{c} not on shard {}", 1 - s);
    }
    assert!(per_shard[0] > 0 && per_shard[1] > 0, "both shards hold channels: {per_shard:?}");

    // One channel per shard; four publishers on two nodes race on both; subscribers on both nodes see
    // every offset of each channel once, in order.
    let chans = [channel_on(0, "race"), channel_on(1, "race")];
    const EACH: usize = 25;
    const PUBLISHERS: usize = 4;
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut ws = client(node.port, &format!("sub{i}")).await;
        for (k, c) in chans.iter().enumerate() {
            let (r, _) = call(&mut ws, json!({"id": 2 + k, "subscribe":{"channel": c}})).await;
            assert!(r.get("error").is_none(), "{r}");
        }
        subs.push(ws);
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let port = nodes[p % 2].port;
        let chans = chans.clone();
        publishers.push(tokio::spawn(async move {
            let mut ws = client(port, &format!("pub{p}")).await;
            for n in 0..EACH {
                for (k, c) in chans.iter().enumerate() {
                    let id = 10 + 2 * n + k;
                    let (r, _) = call(&mut ws, json!({"id": id, "publish":{"channel": c,"data":{"p":p,"n":n}}})).await;
                    assert!(r.get("error").is_none(), "{r}");
                }
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let expected: Vec<u64> = (1..=(PUBLISHERS * EACH) as u64).collect();
    for (i, ws) in subs.iter_mut().enumerate() {
        // Pushes of the two channels interleave; split them by channel as they come.
        let mut got = [Vec::new(), Vec::new()];
        while got.iter().any(|g| g.len() < expected.len()) {
            match next(ws).await {
                Got::Json(msgs) => {
                    for (k, c) in chans.iter().enumerate() {
                        got[k].extend(offsets(&msgs, c));
                    }
                }
                Got::Closed(c) => panic!("subscriber on node {i} closed: {c:?} after {got:?}"),
            }
        }
        for (k, c) in chans.iter().enumerate() {
            assert_eq!(got[k], expected, "{c} (shard {k}) at the subscriber on node {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_and_presence_of_a_channel_on_the_second_shard_work_across_nodes() {
    let shards = [OwnRedis::start(21220), OwnRedis::start(21221)];
    let ports = [shards[0].port, shards[1].port];
    let prefix = prefix("recover");
    let (a, b) = (shard_node(&prefix, 0, &ports, ""), shard_node(&prefix, 1, &ports, ""));
    let feed = channel_on(1, "feed");
    let mut ws = client(a.port, "reader").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel": feed,"recoverable":true}})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_string();
    for n in 0..3 {
        let r = api(b.port, "publish", &json!({"channel": feed,"data":{"n":n}}));
        assert!(r["result"]["offset"].is_u64(), "{r}");
    }
    assert_eq!(read_publications(&mut ws, &feed, 3, Vec::new()).await, [1, 2, 3], "published on B, delivered on A");
    drop(ws);
    for n in 3..8 {
        api(a.port, "publish", &json!({"channel": feed,"data":{"n":n}}));
    }
    let mut ws = client(b.port, "reader").await;
    let (r, _) = call(
        &mut ws,
        json!({"id":2,"subscribe":{"channel": feed,"recoverable":true,"recover":true,"offset":3,"epoch":epoch}}),
    )
    .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let replay: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .map(|p| p.iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    assert_eq!(replay, [4, 5, 6, 7, 8], "the five missed, from the second shard's history");
    assert_eq!(shards[1].keys(&format!("{prefix}:h:{feed}")).len(), 1, "history on shard 1");

    // Presence: clients on both nodes, read from either.
    let mut alice = client(a.port, "alice").await;
    let (r, _) = call(&mut alice, json!({"id":2,"subscribe":{"channel": feed}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let s = api(a.port, "presence_stats", &json!({"channel": feed}));
    assert_eq!((s["result"]["num_clients"].as_u64(), s["result"]["num_users"].as_u64()), (Some(2), Some(2)), "{s}");
    let p = api(b.port, "presence", &json!({"channel": feed}));
    assert_eq!(p["result"]["presence"].as_object().map(|o| o.len()), Some(2), "{p}");
    assert_eq!(shards[1].keys(&format!("{prefix}:p:{feed}")).len(), 1, "presence on shard 1");
    assert!(shards[0].keys(&format!("{prefix}:p:*")).is_empty(), "no presence on shard 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shard_fails_its_channels_with_100_while_the_other_shard_keeps_working() {
    let mut shards = [OwnRedis::start(21230), OwnRedis::start(21231)];
    let ports = [shards[0].port, shards[1].port];
    let prefix = prefix("kill");
    let (a, b) = (shard_node(&prefix, 0, &ports, ""), shard_node(&prefix, 1, &ports, ""));
    let (alive, doomed) = (channel_on(0, "alive"), channel_on(1, "doomed"));
    let mut ws = client(b.port, "watcher").await;
    for (id, c) in [(2, &alive), (3, &doomed)] {
        let (r, _) = call(&mut ws, json!({"id": id, "subscribe":{"channel": c,"recoverable":true}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    for c in [&alive, &doomed] {
        let r = api(a.port, "publish", &json!({"channel": c, "data":{"n":1}}));
        assert_eq!(r["result"]["offset"], 1, "{r}");
        assert_eq!(read_publications(&mut ws, c, 1, Vec::new()).await, [1]);
    }

    // Shard 1 killed.
    let _ = shards[1].child.kill();
    let _ = shards[1].child.wait();
    let r = api(a.port, "publish", &json!({"channel": doomed, "data":{"n":2}}));
    assert_eq!(api_error_code(&r), 100, "a channel of the killed shard: {r}");
    let (r, _) = call(&mut ws, json!({"id":4,"publish":{"channel": doomed,"data":{"n":2}}})).await;
    assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
    let other = channel_on(1, "other");
    let (r, _) = call(&mut ws, json!({"id":5,"subscribe":{"channel": other}})).await;
    assert_eq!(r["error"]["code"], 100, "subscribing to a channel of the killed shard: {r}");
    // The other shard's channel works, across nodes, and its subscriber is left alone.
    for n in 2..5 {
        let r = api(a.port, "publish", &json!({"channel": alive, "data":{"n":n}}));
        assert_eq!(r["result"]["offset"], n, "{r}");
    }
    assert_eq!(read_publications(&mut ws, &alive, 3, Vec::new()).await, [2, 3, 4]);
    // Control messages go through shard 0: still delivered.
    let r = api(a.port, "unsubscribe", &json!({"user":"watcher","channel": alive}));
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(unsubscribe_push(&mut ws, &alive).await["channel"], json!(alive));

    // Shard 1 back (empty). Its subscriber is told it may have missed publications (2500) and, as an SDK
    // does with error 100, resubscribes until it can.
    shards[1] = OwnRedis::start(21231);
    let push = unsubscribe_push(&mut ws, &doomed).await;
    assert_eq!(push["unsubscribe"]["code"], 2500, "{push}");
    let mut r = Value::Null;
    for id in 10..60 {
        r = call(&mut ws, json!({"id": id, "subscribe":{"channel": doomed}})).await.0;
        if r.get("error").is_none() {
            break;
        }
        assert_eq!(r["error"]["code"], 100, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(r.get("error").is_none(), "{r}");
    let published = publish_until_accepted(a.port, &doomed, json!({"n":3}), 50);
    let offset = published["result"]["offset"].as_u64().unwrap_or_else(|| panic!("{published}"));
    assert_eq!(read_publications(&mut ws, &doomed, 1, Vec::new()).await, [offset]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_first_shard_down_control_answers_100_and_the_dashboard_names_the_shard() {
    let mut shards = [OwnRedis::start(21240), OwnRedis::start(21241)];
    let ports = [shards[0].port, shards[1].port];
    let prefix = prefix("first");
    let (a, b) = (shard_node(&prefix, 0, &ports, ""), shard_node(&prefix, 1, &ports, ""));
    let panel = engine_panel(a.port, "up");
    assert_eq!(panel["state"], "up", "{panel}");
    let detail = panel["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("shard 0 up") && detail.contains("shard 1 up"), "{panel}");
    assert!(detail.contains(":21240") && detail.contains(":21241"), "{panel}");
    let second = channel_on(1, "second");
    let mut ws = client(b.port, "dave").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel": second}})).await;
    assert!(r.get("error").is_none(), "{r}");

    let _ = shards[0].child.kill();
    let _ = shards[0].child.wait();
    // Control messages travel through shard 0 only: an API disconnect cannot reach other nodes.
    let r = api(a.port, "disconnect", &json!({"user":"dave","disconnect":{"code":4005,"reason":"x"}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    // Channels of shard 1 keep working across nodes.
    let r = api(a.port, "publish", &json!({"channel": second, "data":{"n":1}}));
    assert_eq!(r["result"]["offset"], 1, "{r}");
    assert_eq!(read_publications(&mut ws, &second, 1, Vec::new()).await, [1]);
    let panel = engine_panel(a.port, "down");
    assert_eq!(panel["state"], "down", "the worst shard's state: {panel}");
    assert!(
        panel["detail"].as_str().is_some_and(|d| d.contains("shard 0 down") && d.contains("shard 1 up")),
        "{panel}"
    );
    // Back: control works again once the command connection has reconnected (as a client retries 100).
    shards[0] = OwnRedis::start(21240);
    // A control message published while a node's PUB/SUB connection is still reconnecting is not seen by
    // that node (Redis PUB/SUB keeps nothing): wait until B receives again.
    assert_eq!(engine_panel(b.port, "up")["state"], "up", "node B resubscribed to shard 0");
    let mut r = Value::Null;
    for _ in 0..50 {
        r = api(a.port, "disconnect", &json!({"user":"dave","disconnect":{"code":4005,"reason":"moved"}}));
        if api_error_code(&r) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api_error_code(&r), 0, "{r}");
    let c = closed(&mut ws).await;
    assert_eq!(c, Some((4005, "moved".to_string())), "delivered to the client on the other node");
    assert_eq!(engine_panel(a.port, "up")["state"], "up", "the dashboard sees shard 0 back");
}

/// A series of the node's `/metrics` (`None`: not exported).
fn metric(port: u16, series: &str) -> Option<f64> {
    let out = http(port, "GET", "/metrics", "", "");
    let prefix = format!("{series} ");
    out.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_shard_opens_only_its_own_breaker_and_the_other_shards_channels_keep_working() {
    let state = |s: usize| format!("ringcast_engine_breaker_state{{shard=\"{s}\"}}");
    let trips = |s: usize| format!("ringcast_engine_breaker_trips_total{{shard=\"{s}\"}}");
    let rejected = |s: usize| format!("ringcast_engine_breaker_rejected_total{{shard=\"{s}\"}}");
    let shards = [OwnRedis::start(21410), OwnRedis::start(21411)];
    let ports = [shards[0].port, shards[1].port];
    let prefix = prefix("breaker");
    let node = shard_node(&prefix, 0, &ports, "engine_breaker_failures = 3\nengine_breaker_cooldown = \"2s\"");
    let port = node.port;
    let (healthy, dead) = (channel_on(0, "healthy"), channel_on(1, "dead"));
    let mut ws = client(port, "watcher").await;
    for (id, c) in [(2, &healthy), (3, &dead)] {
        let (r, _) = call(&mut ws, json!({"id": id, "subscribe":{"channel": c}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    for c in [&healthy, &dead] {
        let r = api(port, "publish", &json!({"channel": c, "data":{"n":1}}));
        assert_eq!(r["result"]["offset"], 1, "{r}");
        assert_eq!(read_publications(&mut ws, c, 1, Vec::new()).await, [1]);
    }
    assert_eq!(health(port), "{}");

    // Shard 1 paused: each publish to its channel waits out redis_timeout and answers 100, until its
    // breaker opens (the third failure in a row) and /health says so.
    shards[1].signal(libc::SIGSTOP);
    let mut degraded = String::new();
    for n in 2..20 {
        let r = api(port, "publish", &json!({"channel": dead, "data":{"n":n}}));
        assert_eq!(api_error_code(&r), 100, "a channel of the paused shard: {r}");
        let h = health(port);
        if h.contains("degraded") {
            degraded = h;
            break;
        }
    }
    assert!(degraded.contains("open"), "shard 1's breaker never opened: {degraded:?}");

    // The healthy shard's channel still publishes and delivers, from the API and from a client.
    for n in 2..6 {
        let r = api(port, "publish", &json!({"channel": healthy, "data":{"n":n}}));
        assert_eq!(r["result"]["offset"], n, "a channel of the healthy shard while shard 1's breaker is open: {r}");
    }
    let (r, pushes) = call(&mut ws, json!({"id":4,"publish":{"channel": healthy,"data":{"n":6}}})).await;
    assert!(r.get("error").is_none(), "a client publish to the healthy shard: {r}");
    let got = read_publications(&mut ws, &healthy, 5, offsets(&pushes, &healthy)).await;
    assert_eq!(got, [2, 3, 4, 5, 6], "delivered");
    assert!(degraded.contains("shard 1"), "/health names the shard: {degraded}");
    assert_eq!(metric(port, &state(1)), Some(1.0), "shard 1's breaker open");
    assert_eq!(metric(port, &trips(1)), Some(1.0));
    assert_eq!(metric(port, &state(0)), Some(0.0), "shard 0's breaker closed");
    assert_eq!(metric(port, &trips(0)), Some(0.0));

    // The dead shard's channel now fails fast (its rejected counter moves); the healthy one's does not.
    let before = metric(port, &rejected(1)).unwrap_or(0.0);
    let mut fast = false;
    for n in 20..40 {
        let r = api(port, "publish", &json!({"channel": dead, "data":{"n":n}}));
        assert_eq!(api_error_code(&r), 100, "{r}");
        let r = api(port, "publish", &json!({"channel": healthy, "data":{"n":n}}));
        assert_eq!(api_error_code(&r), 0, "{r}");
        if metric(port, &rejected(1)).unwrap_or(0.0) >= before + 1.0 {
            fast = true;
            break;
        }
    }
    assert!(fast, "no publish to shard 1 was failed fast by its open breaker");
    assert_eq!(metric(port, &rejected(0)), Some(0.0), "nothing of the healthy shard was failed fast");
    let panel = engine_panel(port, "degraded");
    let detail = panel["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("shard 0 up") && detail.contains("circuit breaker open"), "worst state: {panel}");

    // Resumed: after the cool-down the probe succeeds and shard 1's breaker closes.
    shards[1].signal(libc::SIGCONT);
    let published = publish_until_accepted(port, &dead, json!({"n":"after"}), 100);
    let offset = published["result"]["offset"].as_u64().unwrap_or_else(|| panic!("never closed: {published}"));
    assert_eq!(metric(port, &state(1)), Some(0.0), "shard 1's breaker closed after the probe");
    assert_eq!(health(port), "{}", "healthy again");
    read_until_offset(&mut ws, &dead, offset).await;
    assert_eq!(metric(port, &rejected(0)), Some(0.0));
}
