//! Several `ringcast serve` processes sharing channels through the real Redis (127.0.0.1:6379, which
//! `scripts/test.sh` starts): each test runs its nodes as child processes on their own ports, with a key
//! prefix of its own (`redis_prefix`), so tests and other users of that Redis never meet.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_publishers_on_two_nodes_every_subscriber_gets_every_publication_in_offset_order() {
    let cluster = Cluster::start("order", 2);
    const EACH: usize = 50;
    const PUBLISHERS: usize = 4;
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut ws = client(cluster.port(i), &format!("sub{i}")).await;
        let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"race"}})).await;
        assert!(r.get("error").is_none(), "{r}");
        subs.push(ws);
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let port = cluster.port(p % 2);
        publishers.push(tokio::spawn(async move {
            let mut ws = client(port, &format!("pub{p}")).await;
            for n in 0..EACH {
                let (r, _) =
                    call(&mut ws, json!({"id": 10 + n, "publish":{"channel":"race","data":{"p":p,"n":n}}})).await;
                assert!(r.get("error").is_none(), "{r}");
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let expected: Vec<u64> = (1..=(PUBLISHERS * EACH) as u64).collect();
    for (i, ws) in subs.iter_mut().enumerate() {
        let got = read_publications(ws, "race", expected.len(), Vec::new()).await;
        assert_eq!(got, expected, "subscriber on node {i}: every offset once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_to_another_node_recovers_exactly_while_publications_race_it() {
    let cluster = Cluster::start("recover", 2);
    let (a, b) = (cluster.port(0), cluster.port(1));
    a_client_reconnecting_to_another_node_recovers_exactly(a, b, "feed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_cluster_wide() {
    let cluster = Cluster::start("presence", 2);
    let (a, b) = (cluster.port(0), cluster.port(1));
    let mut alice = client(a, "alice").await;
    let mut bob = client(b, "bob").await;
    let mut bob2 = client(b, "bob").await;
    for ws in [&mut alice, &mut bob, &mut bob2] {
        let (r, _) = call(ws, json!({"id":2,"subscribe":{"channel":"room"}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let p = api(a, "presence", &json!({"channel":"room"}));
    let users: std::collections::BTreeSet<String> = p["result"]["presence"]
        .as_object()
        .expect("presence")
        .values()
        .map(|v| v["user"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(users, ["alice".to_string(), "bob".to_string()].into(), "{p}");
    assert_eq!(p["result"]["presence"].as_object().map(|o| o.len()), Some(3), "{p}");
    let s = api(b, "presence_stats", &json!({"channel":"room"}));
    assert_eq!((s["result"]["num_clients"].as_u64(), s["result"]["num_users"].as_u64()), (Some(3), Some(2)), "{s}");
    // The client protocol's presence answers the same, from the other node.
    let (r, _) = call(&mut alice, json!({"id":3,"presence_stats":{"channel":"room"}})).await;
    assert_eq!(r["presence_stats"]["num_clients"], 3, "{r}");
    let (r, _) = call(&mut bob, json!({"id":3,"unsubscribe":{"channel":"room"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let s = api(a, "presence_stats", &json!({"channel":"room"}));
    assert_eq!((s["result"]["num_clients"].as_u64(), s["result"]["num_users"].as_u64()), (Some(2), Some(2)), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_disconnect_and_unsubscribe_reach_a_client_on_another_node() {
    let cluster = Cluster::start("control", 2);
    api_control_reaches_a_client_on_another_node(cluster.port(0), cluster.port(1)).await;
}

/// A redis-server of this test's own (port 6390-6399), stopped when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_times_out_redis_restarted_resubscribes_and_tells_clients_2500() {
    let mut redis = OwnRedis::start(6391);
    // The engine's own recovery, without the circuit breaker (tested on its own below) deciding when
    // calls reach it.
    let node = Node::start_with(
        &format!("rc-fault-{}", std::process::id()),
        0,
        redis.port,
        "300ms",
        "engine_breaker_failures = 0",
        "",
    );
    let port = node.port;
    let mut ws = client(port, "watcher").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"f","recoverable":true}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let ok = api(port, "publish", &json!({"channel":"f","data":{"n":1}}));
    assert_eq!(ok["result"]["offset"], 1, "{ok}");
    assert_eq!(read_publications(&mut ws, "f", 1, Vec::new()).await, [1]);
    let panel = engine_panel(port, "up");
    assert_eq!((&panel["kind"], &panel["state"]), (&json!("redis"), &json!("up")), "{panel}");
    assert!(panel["detail"].as_str().is_some_and(|d| d.contains("127.0.0.1:6391")), "{panel}");
    // A paused Redis: the publish answers error 100 (the timeout), not a hang and not a success.
    redis.signal(libc::SIGSTOP);
    let r = api(port, "publish", &json!({"channel":"f","data":{"n":2}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    let (r, _) = call(&mut ws, json!({"id":3,"publish":{"channel":"f","data":{"n":2}}})).await;
    assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
    // Its PUB/SUB connection is still open, but commands fail: the dashboard says degraded.
    assert_eq!(engine_panel(port, "degraded")["state"], "degraded");
    redis.signal(libc::SIGCONT);
    // Redis killed: publishes fail with 100 while it is away, and nothing arrives: down.
    redis.signal(libc::SIGKILL);
    let _ = redis.child.wait();
    let r = api(port, "publish", &json!({"channel":"f","data":{"n":3}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    assert_eq!(engine_panel(port, "down")["state"], "down");
    // Back (empty: a new epoch). The node reconnects and resubscribes; its subscriber may have missed
    // publications, so it is unsubscribed with 2500 (insufficient state) and resubscribes.
    redis = OwnRedis::start(6391);
    let push = unsubscribe_push(&mut ws).await;
    assert_eq!(push["unsubscribe"]["code"], 2500, "{push}");
    // As an SDK does: error 100 is temporary, retried (the command connection may still be reconnecting).
    let mut r = Value::Null;
    for id in 4..54 {
        r = call(&mut ws, json!({"id":id,"subscribe":{"channel":"f","recoverable":true}})).await.0;
        if r.get("error").is_none() {
            break;
        }
        assert_eq!(r["error"]["code"], 100, "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(r.get("error").is_none(), "{r}");
    // Publishing works again (the command connection reconnects on its own, with backoff).
    let published = publish_until_accepted(port, "f", json!({"n":4}), 50);
    let offset = published["result"]["offset"].as_u64().unwrap_or_else(|| panic!("{published}"));
    assert_eq!(read_publications(&mut ws, "f", 1, Vec::new()).await, [offset]);
    assert_eq!(engine_panel(port, "up")["state"], "up", "the dashboard sees the engine back");
    drop(node);
    drop(redis);
}

/// Reads until a join or leave push (`kind`) of `channel` arrives; returns its client info.
async fn membership_push(ws: &mut Ws, channel: &str, kind: &str) -> Value {
    loop {
        match next(ws).await {
            Got::Json(msgs) => {
                let found = msgs.into_iter().find(|m| m["push"]["channel"] == channel && m["push"].get(kind).is_some());
                if let Some(m) = found {
                    return m["push"][kind]["info"].clone();
                }
            }
            Got::Closed(c) => panic!("closed waiting for {kind}: {c:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_of_a_client_on_one_node_reach_subscribers_on_the_other() {
    let cluster = Cluster::start_with("joinleave", 2, "", "join_leave = true\n");
    let (a, b) = (cluster.port(0), cluster.port(1));
    let mut watcher = client(b, "watcher").await;
    let (r, _) = call(&mut watcher, json!({"id":2,"subscribe":{"channel":"room","join_leave":true}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let mut joiner = client(a, "joiner").await;
    let (r, _) = call(&mut joiner, json!({"id":2,"subscribe":{"channel":"room","join_leave":true}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let info = membership_push(&mut watcher, "room", "join").await;
    assert_eq!(info["user"], "joiner", "{info}");
    let (r, _) = call(&mut joiner, json!({"id":3,"unsubscribe":{"channel":"room"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let info = membership_push(&mut watcher, "room", "leave").await;
    assert_eq!(info["user"], "joiner", "{info}");
    // The joiner got the watcher's join? No: it subscribed later. But its own join never comes back to
    // it through the engine: after resubscribing, the first membership push it sees is the watcher's leave.
    let (r, _) = call(&mut joiner, json!({"id":4,"subscribe":{"channel":"room","join_leave":true}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let (r, _) = call(&mut watcher, json!({"id":3,"unsubscribe":{"channel":"room"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let mut first = Value::Null;
    while first.is_null() {
        match next(&mut joiner).await {
            Got::Json(msgs) => {
                first = msgs
                    .into_iter()
                    .find(|m| m["push"].get("join").is_some() || m["push"].get("leave").is_some())
                    .map_or(Value::Null, |m| m["push"].clone());
            }
            Got::Closed(c) => panic!("closed: {c:?}"),
        }
    }
    assert_eq!(first["leave"]["info"]["user"], "watcher", "no echo of its own join: {first}");
}

/// A series of the node's /metrics (0 when absent).
async fn metric(port: u16, series: &str) -> f64 {
    support::metric(std::net::SocketAddr::from(([127, 0, 0, 1], port)), series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_opens_the_circuit_breaker_calls_fail_fast_with_100_and_a_probe_closes_it() {
    // One redis_url: one shard, one breaker, labelled shard "0".
    const STATE: &str = "ringcast_engine_breaker_state{shard=\"0\"}";
    const TRIPS: &str = "ringcast_engine_breaker_trips_total{shard=\"0\"}";
    const REJECTED: &str = "ringcast_engine_breaker_rejected_total{shard=\"0\"}";
    let redis = OwnRedis::start(21000);
    let node = Node::start_with(
        &format!("rc-breaker-{}", std::process::id()),
        0,
        redis.port,
        "300ms",
        "engine_breaker_failures = 3\nengine_breaker_cooldown = \"2s\"",
        "",
    );
    let port = node.port;
    let mut ws = client(port, "watcher").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"b"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let ok = api(port, "publish", &json!({"channel":"b","data":{"n":1}}));
    assert_eq!(api_error_code(&ok), 0, "{ok}");
    assert_eq!((metric(port, STATE).await, metric(port, TRIPS).await), (0.0, 0.0), "closed at start");
    assert_eq!(health(port), "{}");

    // Paused: each publish waits out redis_timeout and answers 100; the third failure in a row opens it.
    redis.signal(libc::SIGSTOP);
    for n in 2..5 {
        let r = api(port, "publish", &json!({"channel":"b","data":{"n":n}}));
        assert_eq!(api_error_code(&r), 100, "{r}");
    }
    assert_eq!(metric(port, STATE).await, 1.0, "open after 3 consecutive failures");
    assert_eq!(metric(port, TRIPS).await, 1.0);
    let h = health(port);
    assert!(h.contains("\"status\":\"degraded\"") && h.contains("open"), "{h}");
    let panel = engine_panel(port, "degraded");
    assert!(panel["detail"].as_str().is_some_and(|d| d.contains("circuit breaker open")), "{panel}");

    // Open: publishes (API and client) still answer 100, now without reaching the engine: the
    // fast-failed counter moves. (A call after the cool-down would be the probe instead and time out;
    // so the loop is bounded, not a single call.)
    let rejected = metric(port, REJECTED).await;
    let mut fast = false;
    for n in 5..25 {
        let r = api(port, "publish", &json!({"channel":"b","data":{"n":n}}));
        assert_eq!(api_error_code(&r), 100, "{r}");
        let (r, _) = call(&mut ws, json!({"id":n,"publish":{"channel":"b","data":{"n":n}}})).await;
        assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
        if metric(port, REJECTED).await >= rejected + 2.0 {
            fast = true;
            break;
        }
    }
    assert!(fast, "no publish was failed fast by the open breaker");

    // Resumed: after the cool-down one probe goes through, succeeds, and closes the breaker.
    redis.signal(libc::SIGCONT);
    let published = publish_until_accepted(port, "b", json!({"n":"after"}), 100);
    let offset = published["result"]["offset"].as_u64().unwrap_or_else(|| panic!("never closed: {published}"));
    assert_eq!(metric(port, STATE).await, 0.0, "closed after the probe");
    assert_eq!(health(port), "{}", "healthy again");
    read_until_offset(&mut ws, "b", offset).await;
    drop(node);
    drop(redis);
}
