//! Operating a running `ringcast serve` process: reload (SIGHUP, `POST /api/reload`), graceful drain
//! (SIGTERM) and the zero-downtime upgrade (SIGUSR2), each against the real binary over real sockets.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::Got;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "ops-key";

/// A `ringcast serve` process with its log collected.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
    dir: PathBuf,
    /// `listen` and `api_key`, kept in every version of the file.
    header: String,
}

impl Proc {
    fn start(name: &str, config: &str) -> (Proc, u16) {
        Proc::start_as(name, config, free_port(), |config| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_ringcast"));
            c.args(["serve", "--config"]).arg(config);
            c
        })
    }

    /// Starts the command `command(config file)` makes, with `listen` on `port` in the config.
    fn start_as(name: &str, config: &str, port: u16, command: impl FnOnce(&Path) -> Command) -> (Proc, u16) {
        let dir = std::env::temp_dir().join(format!("ringcast-ops-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = format!("listen = \"127.0.0.1:{port}\"\napi_key = \"{KEY}\"\n");
        std::fs::write(dir.join("c.toml"), format!("{header}{config}")).unwrap();
        let (child, log) = support::spawn_logged(command(&dir.join("c.toml")));
        let p = Proc { child, log, dir, header };
        p.wait_log("ringcast listening", 1);
        (p, port)
    }

    /// Rewrites the config file (the same `listen` and `api_key`).
    fn write_config(&self, body: &str) {
        std::fs::write(self.dir.join("c.toml"), format!("{}{body}", self.header)).unwrap();
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `needle` occurs `count` times in the log (bounded: 30 s, then panics with the log).
    fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < count {
            assert!(Instant::now() < deadline, "no {count}x {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        signal(self.child.id(), sig);
    }

    /// Waits for the process to exit (bounded), returning whether it exited successfully.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "process still running:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid} {sig}");
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive (its parent, the old process, may not be there to reap it yet).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP API call on a fresh connection (`Connection: close`, so it reaches whichever process
/// accepts now): the JSON body, or `None` if the connection failed.
fn api(port: u16, method: &str, body: &Value) -> Option<Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let body = body.to_string();
    let req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (_, body) = out.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(port: u16) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{port}/connection/websocket");
    tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws).map_err(|e| e.to_string())
}

/// The next frame's objects or the close, waiting at most 30 s for a frame.
async fn next(ws: &mut Ws) -> Got {
    support::next_within(ws, Duration::from_secs(30)).await
}

/// Sends one command and returns its reply (pushes before it are returned too, in order).
async fn call(ws: &mut Ws, cmd: Value) -> Result<(Value, Vec<Value>), Option<(u16, String)>> {
    let id = cmd["id"].clone();
    ws.send(Message::Text(cmd.to_string())).await.map_err(|_| None)?;
    let mut pushes = Vec::new();
    loop {
        match next(ws).await {
            Got::Json(msgs) => {
                for m in msgs {
                    if m.get("id") == Some(&id) {
                        return Ok((m, pushes));
                    }
                    pushes.push(m);
                }
            }
            Got::Closed(c) => return Err(c),
        }
    }
}

fn token(secret: &str, user: &str) -> String {
    ringcast_server::policy::auth::make_hs256_token(secret, user, None, &[]).unwrap()
}

const RELOAD_BASE: &str = r#"
token_hmac_secret_key = "secret-one"
[[namespaces]]
name = "ns"
allow_subscribe_for_client = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_namespaces_and_token_keys_and_existing_connections_stay() {
    let (p, port) = Proc::start("reload", RELOAD_BASE);
    // An existing connection, subscribed under the first configuration.
    let mut old = ws(port).await.unwrap();
    let (r, _) = call(&mut old, json!({"id":1,"connect":{"token": token("secret-one", "u1")}})).await.unwrap();
    assert!(r.get("connect").is_some(), "{r}");
    let (r, _) = call(&mut old, json!({"id":2,"subscribe":{"channel":"ns:a"}})).await.unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");

    // New key, and subscriptions in `ns` no longer allowed for clients.
    let second = RELOAD_BASE.replace("secret-one", "secret-two").replace("allow_subscribe_for_client = true", "");
    p.write_config(&second);
    p.signal(libc::SIGHUP);
    p.wait_log("configuration reloaded", 1);
    let log = p.log();
    assert!(log.contains("token_hmac_secret_key") && log.contains("namespaces"), "{log}");

    // New operations see it: the old connection's next subscribe is refused (103)…
    let (r, _) = call(&mut old, json!({"id":3,"subscribe":{"channel":"ns:b"}})).await.unwrap();
    assert_eq!(r["error"]["code"], 103, "{r}");
    // …a token signed with the old key is refused (3500), one with the new key is accepted…
    let mut c = ws(port).await.unwrap();
    let refused = call(&mut c, json!({"id":1,"connect":{"token": token("secret-one", "u2")}})).await;
    assert!(matches!(refused, Err(Some((3500, _)))), "old key still accepted");
    let mut c = ws(port).await.unwrap();
    let (r, _) = call(&mut c, json!({"id":1,"connect":{"token": token("secret-two", "u3")}})).await.unwrap();
    assert!(r.get("connect").is_some(), "{r}");
    // …and the existing connection stays, with its subscription: it gets what is published there.
    let published = api(port, "publish", &json!({"channel":"ns:a","data":{"n":1}})).unwrap();
    assert!(published.get("result").is_some(), "{published}");
    match next(&mut old).await {
        Got::Json(m) => assert_eq!(m[0]["push"]["pub"]["data"]["n"], 1, "{m:?}"),
        Got::Closed(c) => panic!("the existing connection was closed: {c:?}"),
    }

    // An invalid file is rejected as a whole, naming the key; the second configuration stays.
    let invalid = second.replace("secret-two", "secret-three") + "[[namespaces]]\nname = \"x\"\n";
    p.write_config(&invalid);
    p.signal(libc::SIGHUP);
    p.wait_log("configuration reload rejected", 1);
    assert!(p.log().contains("`namespaces`"), "the log line names the key:\n{}", p.log());
    let mut c = ws(port).await.unwrap();
    let (r, _) = call(&mut c, json!({"id":1,"connect":{"token": token("secret-two", "u4")}})).await.unwrap();
    assert!(r.get("connect").is_some(), "the old configuration is in force: {r}");

    // A key that cannot change at run time is reported, by the API and in the log.
    p.write_config(&format!("read_buffer = \"ring\"\n{second}"));
    let reply = api(port, "reload", &json!({})).unwrap();
    assert_eq!(reply["result"]["needs_restart"], json!(["read_buffer"]), "{reply}");
    p.wait_log("need a restart", 1);
    // And a rejected reload through the API says which key.
    p.write_config(&invalid);
    let reply = api(port, "reload", &json!({})).unwrap();
    assert_eq!(reply["error"]["key"], "namespaces", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_3001_spread_over_the_shutdown_timeout() {
    const N: usize = 40;
    let (mut p, port) = Proc::start("drain", "allow_anonymous = true\nshutdown_timeout = \"4s\"\n");
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = ws(port).await.unwrap();
        let (r, _) = call(&mut c, json!({"id":1,"connect":{}})).await.unwrap();
        assert!(r.get("connect").is_some(), "client {i}: {r}");
        clients.push(c);
    }
    let order = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let order = order.clone();
            tokio::spawn(async move {
                loop {
                    if let Got::Closed(close) = next(&mut c).await {
                        return (order.fetch_add(1, Ordering::SeqCst), started.elapsed(), close);
                    }
                }
            })
        })
        .collect();
    p.signal(libc::SIGTERM);
    // The first disconnect comes at once; meanwhile new connections are refused.
    while order.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ws(port).await.is_err(), "a new connection was accepted during the drain");
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    for (_, _, close) in &seen {
        assert_eq!(close.as_ref().map(|(c, r)| (*c, r.as_str())), Some((3001, "shutdown")), "{seen:?}");
    }
    // Spread, not all at once: counted at points of the drain, relative to its own first and last
    // disconnect (so a slow machine stretches the points with it). Spread evenly, a quarter of the
    // clients go in each quarter; all at once would put them all in the first.
    seen.sort_by_key(|s| s.1);
    let (first, last) = (seen[0].1, seen[N - 1].1);
    let span = last - first;
    let within = |f: f64| seen.iter().filter(|s| s.1 <= first + span.mul_f64(f)).count();
    assert!(span > Duration::ZERO);
    assert!(within(0.25) < N / 2, "half the clients went in the first quarter: {seen:?}");
    assert!(within(0.75) < N, "everyone went before the last quarter: {seen:?}");
    assert!(p.wait_exit(), "exit status:\n{}", p.log());
}

/// Shared state of the upgrade test's clients.
#[derive(Default)]
struct Load {
    /// Handshakes (subscribers' reconnects and the connect loop) that did not get 101.
    refused: AtomicUsize,
    handshakes: AtomicUsize,
    subscribed: AtomicUsize,
    stop: AtomicBool,
    /// The last offset the publisher got a success for.
    published: AtomicU64,
    done_publishing: AtomicBool,
}

struct Received {
    offsets: Vec<u64>,
    numbers: Vec<u64>,
    reconnects: usize,
    shutdown_closes: usize,
}

async fn subscriber(port: u16, load: Arc<Load>) -> Received {
    let mut got = Received { offsets: Vec::new(), numbers: Vec::new(), reconnects: 0, shutdown_closes: 0 };
    let mut position: Option<(u64, String)> = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let Ok(mut c) = ws(port).await else {
            load.refused.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        load.handshakes.fetch_add(1, Ordering::SeqCst);
        let mut sub = json!({"channel":"c","recoverable":true});
        if let Some((offset, epoch)) = &position {
            sub["recover"] = json!(true);
            sub["offset"] = json!(offset);
            sub["epoch"] = json!(epoch);
        }
        let record = |got: &mut Received, position: &mut Option<(u64, String)>, publication: &Value| {
            let offset = publication["offset"].as_u64().unwrap();
            got.offsets.push(offset);
            got.numbers.push(publication["data"]["n"].as_u64().unwrap());
            if let Some(p) = position.as_mut() {
                p.0 = offset;
            }
        };
        let subscribed = async {
            call(&mut c, json!({"id":1,"connect":{}})).await?;
            call(&mut c, json!({"id":2,"subscribe":sub})).await
        };
        let (reply, pushes) = match subscribed.await {
            Ok(v) => v,
            Err(close) => {
                got.shutdown_closes += usize::from(matches!(close, Some((3001, _))));
                continue;
            }
        };
        let r = &reply["subscribe"];
        assert!(r.is_object(), "subscribe refused: {reply}");
        if position.is_none() {
            load.subscribed.fetch_add(1, Ordering::SeqCst);
        } else {
            got.reconnects += 1;
            assert_eq!(r["recovered"], true, "recovery across the upgrade is exact: {reply}");
        }
        position = Some((r["offset"].as_u64().unwrap_or(0), r["epoch"].as_str().unwrap().to_string()));
        // Recovered publications come first, then pushes that arrived meanwhile.
        for publication in r["publications"].as_array().cloned().unwrap_or_default() {
            record(&mut got, &mut position, &publication);
        }
        for push in pushes {
            record(&mut got, &mut position, &push["push"]["pub"]);
        }
        loop {
            let target = load.published.load(Ordering::SeqCst);
            if load.stop.load(Ordering::SeqCst)
                || (load.done_publishing.load(Ordering::SeqCst) && position.as_ref().is_some_and(|p| p.0 >= target))
            {
                return got;
            }
            match tokio::time::timeout(Duration::from_millis(200), next(&mut c)).await {
                Err(_) => continue,
                Ok(Got::Json(msgs)) => {
                    for m in msgs {
                        if m["push"]["pub"].is_object() {
                            record(&mut got, &mut position, &m["push"]["pub"]);
                        }
                    }
                }
                Ok(Got::Closed(close)) => {
                    got.shutdown_closes += usize::from(matches!(close, Some((3001, _))));
                    break;
                }
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrade_under_load_refuses_no_handshake_and_loses_no_publication() {
    const SUBSCRIBERS: usize = 12;
    const PUBLICATIONS: u64 = 150;
    let pid_dir = std::env::temp_dir().join(format!("ringcast-ops-pid-{}", std::process::id()));
    std::fs::create_dir_all(&pid_dir).unwrap();
    let pid_file = pid_dir.join("ringcast.pid");
    let config = format!(
        "allow_anonymous = true\ndrain_window = \"2s\"\npid_file = \"{}\"\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\nallow_recovery = true\nhistory_size = 1000\nhistory_ttl = \"600s\"\n",
        pid_file.display()
    );
    let (mut p, port) = Proc::start("upgrade", &config);
    let old_pid = read_pid(&pid_file);
    assert_eq!(old_pid, p.child.id(), "the pid file names the process");
    let load = Arc::new(Load::default());

    let subs: Vec<_> = (0..SUBSCRIBERS).map(|_| tokio::spawn(subscriber(port, load.clone()))).collect();
    // The connect loop: a new WebSocket every 10 ms, closed at once, each one counted.
    let connector = {
        let load = load.clone();
        tokio::spawn(async move {
            for _ in 0..3000 {
                if load.stop.load(Ordering::SeqCst) || load.done_publishing.load(Ordering::SeqCst) {
                    break;
                }
                match ws(port).await {
                    Ok(mut c) => {
                        load.handshakes.fetch_add(1, Ordering::SeqCst);
                        let _ = c.close(None).await;
                    }
                    Err(_) => {
                        load.refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Every subscriber subscribed before the first publication (so each must receive all of them).
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.subscribed.load(Ordering::SeqCst) < SUBSCRIBERS {
        assert!(subs.iter().all(|s| !s.is_finished()), "a subscriber failed:\n{}", p.log());
        assert!(Instant::now() < deadline, "subscribers did not subscribe:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The steady publisher, retrying what a process refuses (the old one, once it has handed over).
    let publisher = {
        let load = load.clone();
        tokio::task::spawn_blocking(move || {
            let mut retries = 0;
            for n in 1..=PUBLICATIONS {
                loop {
                    let r = api(port, "publish", &json!({"channel":"c","data":{"n":n}}));
                    if let Some(offset) = r.as_ref().and_then(|r| r["result"]["offset"].as_u64()) {
                        load.published.store(offset, Ordering::SeqCst);
                        break;
                    }
                    retries += 1;
                    assert!(retries < 2000, "publication {n} kept failing: {r:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(Duration::from_millis(15));
            }
            load.done_publishing.store(true, Ordering::SeqCst);
            retries
        })
    };
    while load.published.load(Ordering::SeqCst) < PUBLICATIONS / 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal(libc::SIGUSR2);
    // The new process rewrites the pid file; the old one exits after its drain window.
    let new_pid = successor(&p, &pid_file, old_pid).await;
    assert!(tokio::task::block_in_place(|| p.wait_exit()), "the old process failed:\n{}", p.log());
    assert!(alive(new_pid), "the new process is running");
    let retries = publisher.await.unwrap();
    let mut all = Vec::new();
    for s in subs {
        all.push(s.await.unwrap());
    }
    load.stop.store(true, Ordering::SeqCst);
    connector.await.unwrap();
    let last = load.published.load(Ordering::SeqCst);
    let log = p.log();
    assert_eq!(load.refused.load(Ordering::SeqCst), 0, "handshakes refused during the switch:\n{log}");
    assert_eq!(last, PUBLICATIONS, "one offset per publication, continued across the upgrade");
    for (i, got) in all.iter().enumerate() {
        assert!(got.reconnects >= 1 && got.shutdown_closes >= 1, "subscriber {i} never moved: {}", got.reconnects);
        let mut offsets = got.offsets.clone();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), got.offsets.len(), "subscriber {i} got a publication twice");
        assert_eq!(offsets, (1..=last).collect::<Vec<_>>(), "subscriber {i} missed publications");
        let mut numbers = got.numbers.clone();
        numbers.sort_unstable();
        assert_eq!(numbers, (1..=PUBLICATIONS).collect::<Vec<_>>(), "subscriber {i}: data");
    }
    eprintln!(
        "upgrade: {} handshakes, 0 refused, {retries} publish retries, {} reconnects",
        load.handshakes.load(Ordering::SeqCst),
        all.iter().map(|g| g.reconnects).sum::<usize>()
    );
    terminate(new_pid).await;
    std::fs::remove_dir_all(&pid_dir).ok();
}

fn read_pid(path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid file at {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ringcast bench reconnect` (the load generator's reconnect mode, as the CLI runs it) across a SIGUSR2
/// upgrade: every client is let go by the old process with 3001, comes back to the new one, and recovers
/// exactly — the figures BENCHMARKS.md's upgrade curve is made of, checked here at a small scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reconnect_follows_an_upgrade_and_every_client_recovers() {
    const CLIENTS: u64 = 40;
    let pid_dir = std::env::temp_dir().join(format!("ringcast-ops-bench-pid-{}", std::process::id()));
    std::fs::create_dir_all(&pid_dir).unwrap();
    let pid_file = pid_dir.join("ringcast.pid");
    let config = format!(
        "allow_anonymous = true\ndrain_window = \"1s\"\npid_file = \"{}\"\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\nallow_recovery = true\nhistory_size = 1000\nhistory_ttl = \"600s\"\n",
        pid_file.display()
    );
    let (mut p, port) = Proc::start("bench-reconnect", &config);
    let old_pid = read_pid(&pid_file);
    let mut params =
        ringcast_bench::reconnect::ReconnectParams::new(format!("ws://127.0.0.1:{port}/connection/websocket"));
    params.clients = CLIENTS;
    params.duration = Duration::from_secs(8);
    params.settle = Duration::from_secs(10);
    params.bucket = Duration::from_millis(250);
    params.backoff_min = Duration::from_millis(100);
    params.api_key = Some(KEY.to_string());
    params.rate = 20.0;
    let run = tokio::spawn(async move { ringcast_bench::reconnect::run(&params).await });
    // Every client subscribed (the server says so) before the upgrade.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let subscribed = tokio::task::block_in_place(|| api(port, "channels", &json!({})))
            .and_then(|r| r["result"]["channels"]["bench"]["num_clients"].as_u64());
        if subscribed == Some(CLIENTS) {
            break;
        }
        assert!(Instant::now() < deadline, "clients did not subscribe ({subscribed:?}):\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.signal(libc::SIGUSR2);
    let new_pid = successor(&p, &pid_file, old_pid).await;
    assert!(tokio::task::block_in_place(|| p.wait_exit()), "the old process failed:\n{}", p.log());
    let report = run.await.unwrap().expect("the run takes place");
    eprintln!("{}", report.table());
    let log = p.log();
    assert_eq!(report.initial, CLIENTS, "{log}");
    assert_eq!(report.disconnect_reasons.get("close 3001"), Some(&CLIENTS), "one drain close each: {report:?}");
    assert_eq!(report.disconnect_reasons.len(), 1, "{report:?}");
    assert_eq!(report.reconnected, CLIENTS, "{report:?}");
    assert_eq!(report.recovered, CLIENTS, "recovery across the upgrade is exact: {report:?}");
    assert_eq!(report.not_connected_at_end, 0, "{report:?}");
    assert!(report.failure_reasons.is_empty(), "no attempt failed: {report:?}");
    assert!(report.published > 0);
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.duplicated, 0, "{report:?}");
    assert_eq!(report.received, report.published * CLIENTS, "{report:?}");
    let handshakes: u64 = report.timeline.iter().map(|b| b.handshakes).sum();
    let resubscribes: u64 = report.timeline.iter().map(|b| b.resubscribes).sum();
    assert_eq!((handshakes, resubscribes), (2 * CLIENTS, CLIENTS), "the timeline counts every handshake");
    terminate(new_pid).await;
    std::fs::remove_dir_all(&pid_dir).ok();
}

/// One client of the presence test: subscribes to "p", and whenever the server lets it go, connects and
/// subscribes again, publishing its current client id in `ids[i]`.
async fn present(port: u16, i: usize, ids: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let Ok(mut c) = ws(port).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok((reply, _)) = call(&mut c, json!({"id":1,"connect":{}})).await else { continue };
        let id = reply["connect"]["client"].as_str().unwrap_or_default().to_string();
        if call(&mut c, json!({"id":2,"subscribe":{"channel":"p"}})).await.is_err() {
            continue;
        }
        ids.lock().unwrap()[i] = id;
        while !stop.load(Ordering::SeqCst) {
            match tokio::time::timeout(Duration::from_millis(100), next(&mut c)).await {
                Ok(Got::Closed(_)) => break,
                Ok(Got::Json(msgs)) => {
                    if msgs.iter().any(|m| m == &json!({})) {
                        let _ = c.send(Message::Text("{}".into())).await;
                    }
                }
                Err(_) => {}
            }
        }
    }
}

/// Presence across an upgrade, with the memory broker: presence is not handed over (README, "Presence
/// across an upgrade"). Each process holds the entries of its own clients; a handed-over entry would be a
/// ghost, since the client it names leaves the old process and comes back under a new client id. So the
/// new process never counts a client twice while the old one drains, and once the old one is gone its
/// presence is exact: every client, under its new id, and none of the old ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_after_an_upgrade_is_exact_and_never_counts_a_client_twice() {
    const CLIENTS: usize = 8;
    let pid_dir = std::env::temp_dir().join(format!("ringcast-ops-presence-pid-{}", std::process::id()));
    std::fs::create_dir_all(&pid_dir).unwrap();
    let pid_file = pid_dir.join("ringcast.pid");
    let config = format!(
        "allow_anonymous = true\ndrain_window = \"2s\"\npid_file = \"{}\"\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\npresence = true\n",
        pid_file.display()
    );
    let (mut p, port) = Proc::start("presence", &config);
    let old_pid = read_pid(&pid_file);
    let ids = Arc::new(Mutex::new(vec![String::new(); CLIENTS]));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(present(port, i, ids.clone(), stop.clone()))).collect();
    let stats = || {
        tokio::task::block_in_place(|| api(port, "presence_stats", &json!({"channel":"p"})))
            .and_then(|r| r["result"]["num_clients"].as_u64())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats() != Some(CLIENTS as u64) {
        assert!(Instant::now() < deadline, "clients did not subscribe:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<String> = ids.lock().unwrap().clone();
    p.signal(libc::SIGUSR2);
    // While the old process drains, the process answering the API (the new one, once it accepts) counts
    // the clients that moved: never more than there are.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit:\n{}", p.log());
        if let Some(n) = stats() {
            seen.push(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.iter().all(|&n| n <= CLIENTS as u64), "a client counted twice: {seen:?}");
    let new_pid = read_pid(&pid_file);
    assert_ne!(new_pid, old_pid);
    // After the drain: exactly the clients, under their new ids.
    let deadline = Instant::now() + Duration::from_secs(30);
    let present = loop {
        let r = tokio::task::block_in_place(|| api(port, "presence", &json!({"channel":"p"})));
        let now: Vec<String> = ids.lock().unwrap().clone();
        if let Some(map) = r.as_ref().and_then(|r| r["result"]["presence"].as_object()) {
            let mut got: Vec<String> = map.keys().cloned().collect();
            got.sort();
            let mut want = now.clone();
            want.sort();
            if got == want {
                break got;
            }
        }
        assert!(Instant::now() < deadline, "presence never matched the clients: {r:?} vs {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(before.iter().all(|id| !present.contains(id)), "an old client id survived the upgrade: {present:?}");
    eprintln!("presence during the drain (API, every 50 ms): {seen:?}");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    terminate(new_pid).await;
    std::fs::remove_dir_all(&pid_dir).ok();
}

/// Socket activation as systemd does it: the test holds the listening socket (as `ringcast.socket`
/// would) and starts `ringcast serve` with it as fd 3, `LISTEN_FDS=1` and `LISTEN_PID` its own pid. A
/// client that connected before the server ran waits in the backlog and is served; the server binds
/// nothing itself (the port is taken by the test's socket, so a bind would fail); and a SIGUSR2 upgrade
/// from a socket-activated process hands the same socket on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_the_backlog_and_upgrades() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Before the server exists: the TCP handshake completes in the kernel, the upgrade waits.
    let early = tokio::spawn(async move {
        let mut c = ws(port).await?;
        call(&mut c, json!({"id":1,"connect":{}})).await.map_err(|e| format!("{e:?}"))?;
        Ok::<_, String>(c)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!early.is_finished(), "nobody accepts yet");
    let pid_dir = std::env::temp_dir().join(format!("ringcast-ops-activation-pid-{}", std::process::id()));
    std::fs::create_dir_all(&pid_dir).unwrap();
    let pid_file = pid_dir.join("ringcast.pid");
    let config = format!("allow_anonymous = true\ndrain_window = \"1s\"\npid_file = \"{}\"\n", pid_file.display());
    let fd = listener.as_raw_fd();
    let (mut p, _) = Proc::start_as("activation", &config, port, |config| {
        // `sh` sets LISTEN_PID to its own pid, which `exec` keeps: what systemd sets.
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=listen exec \"$0\" serve --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_ringcast"))
            .arg(config);
        // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec; `fd` stays open in the parent.
        unsafe {
            c.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) != 3 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    });
    let early = tokio::time::timeout(Duration::from_secs(30), early).await;
    let mut early = early.expect("the backlog was served").unwrap().expect("upgraded and connected");
    assert_eq!(read_pid(&pid_file), p.child.id(), "socket-activated, same pid as started");
    // The upgrade hands the inherited socket on.
    let old_pid = p.child.id();
    p.signal(libc::SIGUSR2);
    let new_pid = successor(&p, &pid_file, old_pid).await;
    // The early client is drained by the old process (3001) and the new one accepts on the same socket.
    let closed = loop {
        match next(&mut early).await {
            Got::Closed(c) => break c,
            Got::Json(_) => continue,
        }
    };
    assert_eq!(closed.map(|c| c.0), Some(3001), "{}", p.log());
    assert!(tokio::task::block_in_place(|| p.wait_exit()), "the old process failed:\n{}", p.log());
    let mut late = ws(port).await.expect("the new process accepts");
    call(&mut late, json!({"id":1,"connect":{}})).await.expect("and serves");
    drop(listener);
    terminate(new_pid).await;
    std::fs::remove_dir_all(&pid_dir).ok();
}

/// Waits (bounded) until the pid file names a process other than `old_pid`, and returns it.
async fn successor(p: &Proc, pid_file: &Path, old_pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_pid(pid_file) == old_pid {
        assert!(Instant::now() < deadline, "the pid file was not rewritten:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    read_pid(pid_file)
}

/// SIGTERM to a process this test did not spawn itself (an upgrade's successor), and waits (bounded)
/// for it to exit.
async fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
