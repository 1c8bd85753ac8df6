//! Several `ringcast serve` processes sharing channels through NATS (`broker = "nats"`): the shared
//! NATS at 127.0.0.1:4222 (with a subject prefix of each test's own, `nats_prefix`, whose JetStream
//! streams the test deletes), or, for the restart tests, a nats-server of the test's own on port 21300
//! with JetStream and a temporary store.
//! Presence alongside NATS comes from the real Redis at 127.0.0.1:6379 under a prefix of the test's own.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::*;

/// The channel options every node of a test shares: no history outside the `hist` namespace of the
/// JetStream tests ([`HISTORY`]).
const CHANNELS: &str = r#"
token_hmac_secret_key = "cluster-secret"
[channels]
allow_subscribe_for_client = true
allow_publish_for_client = true
allow_presence_for_client = true
"#;

/// A node on the NATS at `nats_port` with `prefix`; `extra` is more top-level configuration, `tables`
/// more tables (after the channel options).
fn nats_node(prefix: &str, n: usize, nats_port: u16, extra: &str, tables: &str) -> Node {
    let engine = format!(
        "broker = \"nats\"\nnats_url = \"nats://127.0.0.1:{nats_port}\"\nnats_prefix = \"{prefix}\"\n{extra}\n{CHANNELS}\n{tables}"
    );
    Node::launch(&format!("nats-{prefix}-{n}"), &engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_lists_both_nodes_and_a_killed_one_drops_out() {
    let prefix = unique("info");
    let _streams = Stream(prefix.clone());
    let mut nodes = [nats_node(&prefix, 0, 4222, "", ""), nats_node(&prefix, 1, 4222, "", "")];
    let a = nodes[0].port;
    // The registry's announcements travel as control messages over NATS too (bounded poll: 30 s).
    let count = |port| api(port, "info", &json!({}))["result"]["nodes"].as_array().map_or(0, Vec::len);
    let mut seen = 0;
    for _ in 0..300 {
        seen = count(a);
        if seen == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 2, "node A never listed node B");
    nodes[1].kill();
    for _ in 0..300 {
        seen = count(a);
        if seen == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 1, "the killed node was still listed");
}

/// A subject prefix (and Redis prefix) of this test's own.
fn unique(name: &str) -> String {
    format!("rc-nats-{name}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// The data of the publications of `channel` among `msgs` (pushes).
fn data(msgs: &[Value], channel: &str) -> Vec<Value> {
    msgs.iter()
        .filter_map(|m| m.get("push"))
        .filter(|m| m["channel"] == channel && m.get("pub").is_some())
        .map(|m| m["pub"]["data"].clone())
        .collect()
}

/// Reads pushes until `count` publications of `channel` arrived; returns their data in order, and
/// every push read meanwhile.
async fn read_data(ws: &mut Ws, channel: &str, count: usize) -> (Vec<Value>, Vec<Value>) {
    let mut got = Vec::new();
    let mut all = Vec::new();
    while got.len() < count {
        match next(ws).await {
            Got::Json(msgs) => {
                got.extend(data(&msgs, channel));
                all.extend(msgs);
            }
            Got::Closed(c) => panic!("closed after {} of {count} publications: {c:?}", got.len()),
        }
    }
    (got, all)
}

/// A channel name with every character NATS gives a meaning to: escaped, it is one subject token.
const TRICKY: &str = "race.a*b>c d";
/// A channel that, unescaped, would be a wildcard subscription covering [`TRICKY`].
const WILDCARD: &str = "race.>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_two_nodes_every_subscriber_gets_each_publication_once_in_its_publishers_order() {
    let prefix = unique("order");
    let _streams = Stream(prefix.clone());
    let nodes = [nats_node(&prefix, 0, 4222, "", ""), nats_node(&prefix, 1, 4222, "", "")];
    const EACH: u64 = 50;
    const PUBLISHERS: u64 = 4;
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut ws = client(node.port, &format!("sub{i}")).await;
        for (id, channel) in [(2, TRICKY), (3, WILDCARD)] {
            let (r, _) = call(&mut ws, json!({"id":id,"subscribe":{"channel":channel}})).await;
            assert!(r.get("error").is_none(), "{r}");
            assert_eq!(r["subscribe"]["offset"].as_u64().unwrap_or(0), 0, "no positions under nats: {r}");
        }
        subs.push(ws);
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let port = nodes[(p % 2) as usize].port;
        publishers.push(tokio::spawn(async move {
            let mut ws = client(port, &format!("pub{p}")).await;
            for n in 0..EACH {
                let (r, _) =
                    call(&mut ws, json!({"id": 10 + n, "publish":{"channel":TRICKY,"data":{"p":p,"n":n}}})).await;
                assert!(r.get("error").is_none(), "{r}");
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    // Then one publication to the other channel: once it arrives, anything the wildcard would have
    // widened to has arrived too.
    let r = api(nodes[0].port, "publish", &json!({"channel":WILDCARD,"data":{"marker":true}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    for (i, ws) in subs.iter_mut().enumerate() {
        let (got, mut pushes) = read_data(ws, TRICKY, (PUBLISHERS * EACH) as usize).await;
        let mut by_publisher: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for d in &got {
            by_publisher.entry(d["p"].as_u64().unwrap()).or_default().push(d["n"].as_u64().unwrap());
        }
        for p in 0..PUBLISHERS {
            let expected: Vec<u64> = (0..EACH).collect();
            assert_eq!(by_publisher.get(&p), Some(&expected), "node {i}, publisher {p}: each once, in its order");
        }
        while data(&pushes, WILDCARD).is_empty() {
            match next(ws).await {
                Got::Json(msgs) => pushes.extend(msgs),
                Got::Closed(c) => panic!("closed: {c:?}"),
            }
        }
        assert_eq!(
            data(&pushes, WILDCARD),
            [json!({"marker":true})],
            "node {i}: {WILDCARD:?} is a channel, not a wildcard"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_disconnect_and_unsubscribe_reach_a_client_on_another_node() {
    let prefix = unique("control");
    let _streams = Stream(prefix.clone());
    let nodes = [nats_node(&prefix, 0, 4222, "", ""), nats_node(&prefix, 1, 4222, "", "")];
    api_control_reaches_a_client_on_another_node(nodes[0].port, nodes[1].port).await;
}

/// A TCP relay between one node and NATS that the test cuts: while cut, its connections are dropped
/// and new ones closed at once, so that node loses NATS and cannot reconnect while the others keep
/// theirs. Mended, it relays again.
struct Relay {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut node, _)) = listener.accept().await {
                let mut open = watch.clone();
                if !*open.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut nats) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut node, &mut nats) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Relay { port, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn mend(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_disconnect_made_while_a_node_reconnects_reaches_its_client_from_the_control_stream() {
    let prefix = unique("ctlstream");
    let _streams = Stream(prefix.clone());
    let relay = Relay::start(4222).await;
    let a = nats_node(&prefix, 0, 4222, "", "");
    let b = nats_node(&prefix, 1, relay.port, "", "");
    let mut carol = client(b.port, "carol").await;
    // Control reaches B live first.
    let r = api(a.port, "refresh", &json!({"user":"carol","expire_at": 4102444800u64}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    // B's connection to NATS goes, and B may not make another; A keeps its own.
    relay.cut();
    let panel = engine_panel(b.port, "down");
    assert_eq!(panel["state"], "down", "B knows it receives nothing: {panel}");
    let r = api(a.port, "disconnect", &json!({"user":"carol","disconnect":{"code":4005,"reason":"moved"}}));
    assert_eq!(api_error_code(&r), 0, "sent while B is away: {r}");
    // B comes back (its backoff is at most 2 s) and reads what it missed from the control stream.
    relay.mend();
    assert_missed_disconnect_caught_up(&mut carol, b.port, "control stream").await;
    drop((a, b));
}

/// Deletes a test's Redis keys (never a FLUSH on the shared Redis).
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let keys = Command::new("redis-cli").args(["--scan", "--pattern", &format!("{}:*", self.0)]).output();
        if let Ok(out) = keys {
            for key in String::from_utf8_lossy(&out.stdout).lines().filter(|k| !k.is_empty()) {
                let _ = Command::new("redis-cli").args(["DEL", key]).output();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_from_redis_alongside_nats_is_cluster_wide() {
    let prefix = unique("presence");
    let _streams = Stream(prefix.clone());
    let _keys = RedisKeys(prefix.clone());
    let extra = format!(
        "presence_manager = \"redis\"\nredis_url = [\"redis://127.0.0.1:6379\"]\nredis_prefix = \"{prefix}\"\n"
    );
    let tables = "[[namespaces]]\nname = \"room\"\npresence = true\nallow_subscribe_for_client = true\nallow_presence_for_client = true\nallow_publish_for_client = true\n";
    let nodes = [nats_node(&prefix, 0, 4222, &extra, tables), nats_node(&prefix, 1, 4222, &extra, tables)];
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut alice = client(a, "alice").await;
    let mut bob = client(b, "bob").await;
    for ws in [&mut alice, &mut bob] {
        let (r, _) = call(ws, json!({"id":2,"subscribe":{"channel":"room:1"}})).await;
        assert!(r.get("error").is_none(), "{r}");
    }
    let s = api(a, "presence_stats", &json!({"channel":"room:1"}));
    assert_eq!((s["result"]["num_clients"].as_u64(), s["result"]["num_users"].as_u64()), (Some(2), Some(2)), "{s}");
    let (r, _) = call(&mut bob, json!({"id":3,"presence":{"channel":"room:1"}})).await;
    assert_eq!(r["presence"]["presence"].as_object().map(|o| o.len()), Some(2), "{r}");
    // And publications still travel over NATS.
    let r = api(b, "publish", &json!({"channel":"room:1","data":{"hi":1}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    assert_eq!(read_data(&mut alice, "room:1", 1).await.0, [json!({"hi":1})]);
}

/// A nats-server of this test's own (port 21300-21399, JetStream on with a temporary store unless
/// started [`OwnNats::without_jetstream`]), stopped when dropped. The shared one on 4222 is never touched.
struct OwnNats {
    child: Child,
    port: u16,
    /// `None`: no JetStream.
    store: Option<PathBuf>,
}

impl OwnNats {
    fn start(port: u16, store: PathBuf) -> OwnNats {
        std::fs::create_dir_all(&store).unwrap();
        let store = Some(store);
        let child = OwnNats::spawn(port, &store);
        OwnNats { child, port, store }
    }

    fn without_jetstream(port: u16) -> OwnNats {
        OwnNats { child: OwnNats::spawn(port, &None), port, store: None }
    }

    fn spawn(port: u16, store: &Option<PathBuf>) -> Child {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(store) = store {
            command.args(["-js", "-sd"]).arg(store);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("nats-server");
        wait_accepting(port, "nats-server");
        child
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Started again (after [`OwnNats::kill`]) on the same port and store: what JetStream kept is there.
    fn restart(&mut self) {
        self.kill();
        self.child = OwnNats::spawn(self.port, &self.store);
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        if let Some(store) = &self.store {
            std::fs::remove_dir_all(store).ok();
        }
    }
}

/// A nats-server of the test's own on `port` (its store named for `name`), and two nodes on it with
/// `tables` and a short `nats_write_timeout`.
fn own_nats_and_two_nodes(port: u16, name: &str, tables: &str) -> (OwnNats, [Node; 2]) {
    let store = std::env::temp_dir().join(format!("ringcast-nats-store-{name}-{}", std::process::id()));
    let nats = OwnNats::start(port, store);
    let prefix = unique(name);
    let extra = "nats_write_timeout = \"300ms\"";
    let nodes = [nats_node(&prefix, 0, port, extra, tables), nats_node(&prefix, 1, port, extra, tables)];
    (nats, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_publishes_fail_100_then_nodes_resubscribe_and_tell_clients_2500() {
    let (mut nats, nodes) = own_nats_and_two_nodes(21300, "restart", "");
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut ws = client(a, "watcher").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"f"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    let ok = api(b, "publish", &json!({"channel":"f","data":{"n":1}}));
    assert_eq!(api_error_code(&ok), 0, "{ok}");
    assert_eq!(read_data(&mut ws, "f", 1).await.0, [json!({"n":1})]);
    let panel = engine_panel(a, "up");
    assert_eq!((&panel["kind"], &panel["state"]), (&json!("nats"), &json!("up")), "{panel}");
    let detail = panel["detail"].as_str().unwrap_or("");
    assert!(detail.contains("127.0.0.1:21300") && detail.contains("control in JetStream"), "{panel}");
    // NATS gone: once the node has seen the connection drop, a publish answers error 100 (API and
    // client protocol), and the dashboard says down.
    nats.kill();
    assert_eq!(engine_panel(b, "down")["state"], "down");
    let r = api(b, "publish", &json!({"channel":"f","data":{"n":2}}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    let mut publisher = client(a, "publisher").await;
    assert_eq!(engine_panel(a, "down")["state"], "down");
    let (r, _) = call(&mut publisher, json!({"id":3,"publish":{"channel":"f","data":{"n":2}}})).await;
    assert_eq!(r["error"]["code"], 100, "a client publish too: {r}");
    // Never sent (the connection is known down) and no positions under NATS: A's own subscriber gets it.
    assert_eq!(read_data(&mut ws, "f", 1).await.0, [json!({"n":2})]);
    // Back: both nodes reconnect and subscribe again; the subscriber may have missed publications, so
    // it is unsubscribed with 2500 (insufficient state) and resubscribes, as SDKs do.
    nats.restart();
    let push = unsubscribe_push(&mut ws).await;
    assert_eq!(push["unsubscribe"]["code"], 2500, "{push}");
    let (r, _) = call(&mut ws, json!({"id":4,"subscribe":{"channel":"f"}})).await;
    assert!(r.get("error").is_none(), "{r}");
    // The other node may still be reconnecting: error 100 is temporary, retried as API clients do.
    publish_until_accepted(b, "f", json!({"n":3}), 50);
    assert_eq!(read_data(&mut ws, "f", 1).await.0, [json!({"n":3})]);
    assert_eq!(engine_panel(b, "up")["state"], "up", "the dashboard sees the broker back");
    drop(nodes);
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_control_travels_over_core_nats_and_still_reaches_another_node() {
    let nats = OwnNats::without_jetstream(21302);
    let prefix = unique("nojs");
    let nodes = [nats_node(&prefix, 0, nats.port, "", ""), nats_node(&prefix, 1, nats.port, "", "")];
    let panel = engine_panel(nodes[1].port, "up");
    assert!(panel["detail"].as_str().is_some_and(|d| d.contains("control over core NATS")), "{panel}");
    api_control_reaches_a_client_on_another_node(nodes[0].port, nodes[1].port).await;
    drop(nodes);
    drop(nats);
}

/// The history namespace of the JetStream tests: history, recovery and positioning as under redis.
const HISTORY: &str = "[[namespaces]]\nname = \"hist\"\nhistory_size = 1000\nhistory_ttl = \"300s\"\nallow_subscribe_for_client = true\nallow_publish_for_client = true\nallow_history_for_client = true\nallow_recovery = true\n";

/// Deletes a test's JetStream streams (history and control) on the shared NATS when dropped (also after
/// a failure); declared before the nodes, so dropped after them.
struct Stream(String);

impl Drop for Stream {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        // Its own thread and runtime: dropped inside the test's runtime, which cannot block on it.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            Some(rt.block_on(ringcast_server::engine::jetstream::delete_stream("nats://127.0.0.1:4222", &prefix)))
        })
        .join();
        if !matches!(deleted, Ok(Some(Ok(())))) {
            eprintln!("streams of {} not deleted: {deleted:?}", self.0);
        }
    }
}

/// Two nodes with the history namespace on the shared NATS, and the guard of their stream (dropped
/// after them).
fn history_nodes(name: &str) -> ([Node; 2], Stream) {
    let prefix = unique(name);
    let guard = Stream(prefix.clone());
    ([nats_node(&prefix, 0, 4222, "", HISTORY), nats_node(&prefix, 1, 4222, "", HISTORY)], guard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_publishers_on_two_nodes_get_offsets_one_to_n_and_every_subscriber_sees_them_in_order() {
    let (nodes, _stream) = history_nodes("jsorder");
    const EACH: u64 = 100;
    const PUBLISHERS: u64 = 4;
    let mut subs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut ws = client(node.port, &format!("sub{i}")).await;
        let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"hist:race","recoverable":true}})).await;
        assert!(r.get("error").is_none(), "{r}");
        subs.push(ws);
    }
    let ports = [nodes[0].port, nodes[1].port];
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let port = ports[(p % 2) as usize];
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|n| {
                        let r = api(port, "publish", &json!({"channel":"hist:race","data":{"p":p,"n":n}}));
                        assert_eq!(api_error_code(&r), 0, "{r}");
                        (
                            r["result"]["offset"].as_u64().unwrap_or(0),
                            r["result"]["epoch"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut replies: Vec<(u64, String)> = publishers.into_iter().flat_map(|p| p.join().unwrap()).collect();
    replies.sort();
    let expected: Vec<u64> = (1..=PUBLISHERS * EACH).collect();
    assert_eq!(replies.iter().map(|r| r.0).collect::<Vec<_>>(), expected, "each offset assigned once, no gap");
    let epoch = replies[0].1.clone();
    assert!(!epoch.is_empty() && replies.iter().all(|r| r.1 == epoch), "one epoch");
    for (i, ws) in subs.iter_mut().enumerate() {
        let got = read_publications(ws, "hist:race", expected.len(), Vec::new()).await;
        assert_eq!(got, expected, "subscriber on node {i}: every offset once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_a_client_reconnecting_to_another_node_recovers_exactly_while_publications_race_it() {
    let (nodes, _stream) = history_nodes("jsrecover");
    a_client_reconnecting_to_another_node_recovers_exactly(nodes[0].port, nodes[1].port, "hist:feed").await;
    let mut ws = client(nodes[1].port, "other").await;
    // A position from another epoch cannot be recovered: told so, with the stream's position.
    let (r, _) = call(
        &mut ws,
        json!({"id":3,"subscribe":{"channel":"hist:other","recoverable":true,"recover":true,"offset":1,"epoch":"nope"}}),
    )
    .await;
    assert!(!r["subscribe"]["recovered"].as_bool().unwrap_or(false), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_answers_limit_since_and_reverse_as_under_redis() {
    let (nodes, _stream) = history_nodes("jshistory");
    let (a, b) = (nodes[0].port, nodes[1].port);
    let offsets_of = |r: &Value| -> Vec<u64> {
        r["result"]["publications"]
            .as_array()
            .map(|p| p.iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    let empty = api(b, "history", &json!({"channel":"hist:log","limit":-1}));
    assert_eq!((offsets_of(&empty), empty["result"]["offset"].as_u64()), (vec![], None), "{empty}");
    let epoch = empty["result"]["epoch"].as_str().unwrap_or("").to_string();
    assert!(!epoch.is_empty(), "an empty stream has an epoch already: {empty}");
    for n in 1..=5 {
        let r = api(if n % 2 == 0 { a } else { b }, "publish", &json!({"channel":"hist:log","data":{"n":n}}));
        assert_eq!(r["result"]["offset"].as_u64(), Some(n), "{r}");
    }
    let history = |body: Value| api(a, "history", &body);
    let all = history(json!({"channel":"hist:log","limit":-1}));
    assert_eq!(offsets_of(&all), [1, 2, 3, 4, 5], "{all}");
    assert_eq!(all["result"]["publications"][0]["data"], json!({"n":1}), "{all}");
    assert_eq!((all["result"]["offset"].as_u64(), all["result"]["epoch"].as_str()), (Some(5), Some(epoch.as_str())));
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":2}))), [1, 2]);
    let since = json!({"offset":2,"epoch":epoch});
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":-1,"since":since}))), [3, 4, 5]);
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":2,"since":since}))), [3, 4]);
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":2,"reverse":true}))), [5, 4]);
    let since4 = json!({"offset":4,"epoch":epoch});
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":-1,"since":since4,"reverse":true}))), [3, 2, 1]);
    let position = history(json!({"channel":"hist:log","limit":0}));
    assert_eq!((offsets_of(&position), position["result"]["offset"].as_u64()), (vec![], Some(5)), "{position}");
    let wrong = history(json!({"channel":"hist:log","limit":-1,"since":{"offset":2,"epoch":"other"}}));
    assert_eq!(api_error_code(&wrong), 112, "another epoch is unrecoverable: {wrong}");
    // Removing the history keeps the position: the next publication continues it.
    let r = api(b, "history_remove", &json!({"channel":"hist:log"}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    let after = history(json!({"channel":"hist:log","limit":-1}));
    assert_eq!((offsets_of(&after), after["result"]["offset"].as_u64()), (vec![], Some(5)), "{after}");
    let r = api(a, "publish", &json!({"channel":"hist:log","data":{"n":6}}));
    assert_eq!((r["result"]["offset"].as_u64(), r["result"]["epoch"].as_str()), (Some(6), Some(epoch.as_str())), "{r}");
    assert_eq!(offsets_of(&history(json!({"channel":"hist:log","limit":-1}))), [6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_nats_restarted_publishes_fail_100_then_subscribers_told_2500_recover_what_was_stored() {
    let (mut nats, nodes) = own_nats_and_two_nodes(21301, "jsrestart", HISTORY);
    let (a, b) = (nodes[0].port, nodes[1].port);
    let mut ws = client(a, "watcher").await;
    let (r, _) = call(&mut ws, json!({"id":2,"subscribe":{"channel":"hist:f","recoverable":true}})).await;
    let epoch = r["subscribe"]["epoch"].as_str().expect("epoch").to_string();
    let ok = api(b, "publish", &json!({"channel":"hist:f","data":{"n":1}}));
    assert_eq!(ok["result"]["offset"].as_u64(), Some(1), "{ok}");
    assert_eq!(read_publications(&mut ws, "hist:f", 1, Vec::new()).await, [1]);
    nats.kill();
    assert_eq!(engine_panel(b, "down")["state"], "down");
    let r = api(b, "publish", &json!({"channel":"hist:f","data":{"n":2}}));
    assert_eq!(api_error_code(&r), 100, "not stored, and said so: {r}");
    let r = api(b, "history", &json!({"channel":"hist:f","limit":-1}));
    assert_eq!(api_error_code(&r), 100, "{r}");
    // Back with its store: the stream is there; subscribers are told 2500 and recover from it.
    nats.restart();
    let push = unsubscribe_push(&mut ws).await;
    assert_eq!(push["unsubscribe"]["code"], 2500, "{push}");
    let r = publish_until_accepted(b, "hist:f", json!({"n":3}), 50);
    assert_eq!(r["result"]["offset"].as_u64(), Some(2), "the refused publication took no offset: {r}");
    let (r, _) = call(
        &mut ws,
        json!({"id":3,"subscribe":{"channel":"hist:f","recoverable":true,"recover":true,"offset":1,"epoch":epoch}}),
    )
    .await;
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["publications"][0]["data"], json!({"n":3}), "{r}");
    let r = api(a, "publish", &json!({"channel":"hist:f","data":{"n":4}}));
    assert_eq!(api_error_code(&r), 0, "{r}");
    assert_eq!(read_publications(&mut ws, "hist:f", 1, Vec::new()).await, [3], "live again, contiguous");
    drop(nodes);
    drop(nats);
}
