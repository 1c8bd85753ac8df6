//! Heap discipline, measured with a counting global allocator:
//! * the echo hot path (read → parse → reply → write) allocates nothing per message in steady state,
//!   for every read-buffer strategy, with one message in flight and with bursts of glued messages;
//! * 1,000 connections opened and closed give back their memory;
//! * an idle connection, echo or subscribed client, holds no more heap than it did (issue 9's memory goal).
//!
//! The allocator counts the whole process and tests in one binary run concurrently, so every test here
//! holds `heap::serial()` while it measures.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ringcast_wire::frame::{encode_client_frame, OpCode};

#[path = "support/heap.rs"]
mod heap;
use heap::{serial, start_on, upgraded, ALLOCS, LIVE};

fn start(
    rt: &tokio::runtime::Runtime,
    strategy: &str,
    pooled: usize,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let pooled = pooled.to_string();
    heap::start(rt, &[("dev", "true"), ("read_buffer", strategy), ("pool_max_buffers", &pooled)])
}

/// A blocking client: handshake, then echo round trips with no allocation of its own.
fn client(addr: SocketAddr) -> TcpStream {
    client_at(addr, "/echo")
}

fn client_at(addr: SocketAddr, path: &str) -> TcpStream {
    upgraded(addr, path, None, Duration::from_secs(10)).0
}

/// Sends `rounds` bursts of `window` 20-byte messages, reading every echo back.
fn echo_rounds(s: &mut TcpStream, burst: &[u8], reply: &mut [u8], rounds: usize) {
    for _ in 0..rounds {
        s.write_all(burst).expect("write");
        s.read_exact(reply).expect("read echoes");
    }
}

fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one client-protocol command frame and reads replies until `expect` appears in one.
fn command(s: &mut TcpStream, json: &str, expect: &str) {
    let mut frame = Vec::new();
    encode_client_frame(&mut frame, true, OpCode::Text, json.as_bytes(), [9, 8, 7, 6]);
    s.write_all(&frame).expect("command");
    let mut seen = Vec::new();
    let mut b = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(expect) {
        let n = s.read(&mut b).expect("reply");
        assert!(n > 0, "closed while waiting for {expect}");
        seen.extend_from_slice(&b[..n]);
    }
}

const WARMUP: usize = 300;

/// Allocations made while `publications` messages are published to `subscribers` subscribers, with the
/// configuration `extra` on top of the defaults.
fn fanout_allocations(
    rt: &tokio::runtime::Runtime,
    subscribers: usize,
    publications: usize,
    extra: &[(&str, &str)],
) -> u64 {
    let mut config = vec![("dev", "true"), ("read_buffer", "pool"), ("pool_max_buffers", "8")];
    config.extend_from_slice(extra);
    let (addr, stop) = heap::start(rt, &config);
    let mut subs: Vec<TcpStream> = (0..subscribers).map(|_| client_at(addr, "/connection/websocket")).collect();
    for s in &mut subs {
        command(s, r#"{"id":1,"connect":{}}"#, r#""client":""#);
        command(s, r#"{"id":2,"subscribe":{"channel":"fan","recoverable":true}}"#, r#""epoch":""#);
    }
    let mut publisher = client_at(addr, "/connection/websocket");
    command(&mut publisher, r#"{"id":1,"connect":{}}"#, r#""client":""#);
    let mut frame = Vec::new();
    encode_client_frame(&mut frame, true, OpCode::Text, br#"{"id":7,"publish":{"channel":"fan","data":{"v":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123"}}}"#, [1, 2, 3, 4]);
    let reply = br#"{"id":7,"publish":{}}"#;
    let mut got = vec![0u8; reply.len() + 2];
    // Warm up: pools, history ring, and queue storage grown to the bursts this load produces.
    for _ in 0..WARMUP {
        publisher.write_all(&frame).expect("publish");
        publisher.read_exact(&mut got).expect("publish reply");
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = ALLOCS.load(Relaxed);
    for _ in 0..publications {
        publisher.write_all(&frame).expect("publish");
        publisher.read_exact(&mut got).expect("publish reply");
        assert_eq!(&got[2..], reply);
    }
    std::thread::sleep(Duration::from_millis(200));
    let allocs = ALLOCS.load(Relaxed) - before;
    // Every subscriber really got every publication (read after counting: the reads are ours, not the server's).
    for s in &mut subs {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut all = Vec::new();
        let mut b = [0u8; 65536];
        let expected = WARMUP + publications;
        while String::from_utf8_lossy(&all).matches(r#""pub":"#).count() < expected {
            match s.read(&mut b) {
                Ok(n) if n > 0 => all.extend_from_slice(&b[..n]),
                _ => break,
            }
        }
        let got = String::from_utf8_lossy(&all).matches(r#""pub":"#).count();
        assert_eq!(got, expected, "a subscriber missed publications");
    }
    let _ = stop.send(());
    allocs
}

#[test]
fn fan_out_allocates_per_publication_never_per_delivery() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let few = fanout_allocations(&rt, 10, 200, &[]);
    let many = fanout_allocations(&rt, 60, 200, &[]);
    println!("200 publications: {few} allocations with 10 subscribers, {many} with 60 (10,000 more deliveries)");
    // Queue storage grows to the largest burst this load produces and is then kept while traffic flows
    // (released when the connection goes quiet). That growth is amortized: how large bursts get depends
    // on scheduling (runs here measured +55 and +318 for 60 subscribers). A cost per delivery would show
    // as ≥ 10,000; eager freeing of queue storage did show as +2,413.
    assert!(
        many.saturating_sub(few) < 1_000,
        "50 more subscribers cost {} more allocations for 10,000 more deliveries",
        many.saturating_sub(few)
    );
}

/// The same, with every fan-out of 4 or more direct writes split with the helper task the other worker
/// runs (`fanout_split_min`): the hand-off reuses its lists, so it costs nothing per delivery either.
#[test]
fn a_split_fan_out_allocates_per_publication_never_per_delivery() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let split = [("fanout_split_min", "4")];
    let few = fanout_allocations(&rt, 10, 200, &split);
    let many = fanout_allocations(&rt, 60, 200, &split);
    println!("split, 200 publications: {few} allocations with 10 subscribers, {many} with 60");
    assert!(
        many.saturating_sub(few) < 1_000,
        "50 more subscribers cost {} more allocations for 10,000 more deliveries",
        many.saturating_sub(few)
    );
}

#[test]
fn echo_allocates_nothing_per_message_and_closed_connections_give_memory_back() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");

    for strategy in ["pool", "ring", "growable"] {
        let (addr, stop) = start(&rt, strategy, 8);
        for window in [1usize, 16] {
            let mut s = client(addr);
            let mut burst = Vec::new();
            for i in 0..window {
                encode_client_frame(&mut burst, true, OpCode::Binary, &[i as u8; 20], [1, 2, 3, 4]);
            }
            let mut reply = vec![0u8; window * 22];
            echo_rounds(&mut s, &burst, &mut reply, 2_000); // warm up: pools, scratch, runtime
            let before = ALLOCS.load(Relaxed);
            let rounds = 20_000 / window;
            echo_rounds(&mut s, &burst, &mut reply, rounds);
            let allocs = ALLOCS.load(Relaxed) - before;
            let messages = (rounds * window) as u64;
            println!("{strategy} window {window}: {allocs} allocations for {messages} echoed messages");
            assert_eq!(&reply[..2], &[0x82, 20]);
            // Not per message: a handful at most over 20,000 messages (runtime bookkeeping, if anything).
            assert!(allocs <= 8, "{strategy} window {window}: {allocs} allocations for {messages} messages");
        }
        let _ = stop.send(());
    }

    // Memory: open and close 1,000 connections; live heap must come back to where it was. The pool keeps
    // no idle buffers here, so whatever stays allocated is a leak, not a cache.
    let (addr, stop) = start(&rt, "pool", 0);
    let metrics = rt.metrics();
    std::thread::sleep(Duration::from_millis(100));
    let base_tasks = metrics.num_alive_tasks();
    let warm: Vec<TcpStream> = (0..1000).map(|_| client(addr)).collect();
    assert!(metrics.num_alive_tasks() >= base_tasks + 1000);
    drop(warm);
    wait_until(|| metrics.num_alive_tasks() <= base_tasks);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = LIVE.load(Relaxed);
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| client(addr)).collect();
    let mut frame = Vec::new();
    encode_client_frame(&mut frame, true, OpCode::Text, b"hello", [5, 6, 7, 8]);
    let mut reply = [0u8; 7];
    for c in &mut conns {
        c.write_all(&frame).expect("write");
        c.read_exact(&mut reply).expect("echo");
    }
    let during = LIVE.load(Relaxed);
    drop(conns);
    wait_until(|| metrics.num_alive_tasks() <= base_tasks);
    assert_eq!(metrics.num_alive_tasks(), base_tasks, "connection tasks left behind");
    std::thread::sleep(Duration::from_millis(200));
    let after = LIVE.load(Relaxed);
    println!("live heap: baseline {baseline} B, with 1000 open {during} B, after closing {after} B");
    assert!(during - baseline > 100_000, "1000 open connections should be visible in the heap");
    // A leak per connection shows as at least 1000 × the smallest allocation (16 B here). What the
    // runtime keeps once, by timing, does not: tokio's own bookkeeping (a list whose capacity depends on
    // how many sockets one driver turn deregisters) sometimes grows by ~5 KiB in this phase and not in
    // the warm-up, on main before session 8 as well (2 of 3 runs on a loaded machine).
    assert!(after - baseline < 12 * 1024, "{} bytes not given back after 1000 connections closed", after - baseline);
    let _ = stop.send(());
}

/// The server in dev mode with the TCP binary protocol on an ephemeral port: its TCP address.
fn start_tcp(rt: &tokio::runtime::Runtime) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_on(rt, None, &[("tcp_listen", "127.0.0.1:0"), ("dev", "true"), ("pool_max_buffers", "8")], true)
}

fn tcp_frame(cmd: ringcast_wire::tcp::Command<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    cmd.encode(&mut v).expect("encodable");
    v
}

/// A blocking TCP protocol client that sent CONNECT (and SUBSCRIBE `channel`, if given) and read the
/// replies (CONNECTED: a 36-byte client id; SUBSCRIBED: the channel).
fn tcp_client(addr: SocketAddr, channel: Option<&str>) -> TcpStream {
    use ringcast_wire::tcp::{Command, HEADER_LEN};
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&tcp_frame(Command::Connect { token: "" })).expect("connect");
    let mut connected = [0u8; HEADER_LEN + 36];
    s.read_exact(&mut connected).expect("CONNECTED");
    assert_eq!(&connected[3..5], &[0x80, 0x01], "CONNECTED");
    if let Some(channel) = channel {
        s.write_all(&tcp_frame(Command::Subscribe { channel })).expect("subscribe");
        let mut subscribed = vec![0u8; HEADER_LEN + channel.len()];
        s.read_exact(&mut subscribed).expect("SUBSCRIBED");
        assert_eq!(&subscribed[3..5], &[0x80, 0x02], "SUBSCRIBED");
    }
    s
}

#[test]
fn tcp_commands_allocate_nothing_per_message() {
    use ringcast_wire::tcp::Command;
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (addr, stop) = start_tcp(&rt);
    for window in [1usize, 16] {
        let mut s = tcp_client(addr, None);
        let ping = tcp_frame(Command::Ping(b"01234567"));
        let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * window).collect();
        let mut reply = vec![0u8; window * ping.len()];
        echo_rounds(&mut s, &burst, &mut reply, 2_000); // warm up
        let before = ALLOCS.load(Relaxed);
        let rounds = 20_000 / window;
        echo_rounds(&mut s, &burst, &mut reply, rounds);
        let allocs = ALLOCS.load(Relaxed) - before;
        println!("tcp PING/PONG window {window}: {allocs} allocations for {} commands", rounds * window);
        assert_eq!(&reply[3..5], &[0x80, 0x05], "PONG");
        assert!(allocs <= 8, "window {window}: {allocs} allocations for {} commands", rounds * window);
    }
    let _ = stop.send(());
}

/// Allocations made while a TCP publisher publishes `publications` 128-B messages to `subscribers` TCP
/// subscribers.
fn tcp_fanout_allocations(rt: &tokio::runtime::Runtime, subscribers: usize, publications: usize) -> u64 {
    use ringcast_wire::tcp::{Command, HEADER_LEN};
    let (addr, stop) = start_tcp(rt);
    let mut subs: Vec<TcpStream> = (0..subscribers).map(|_| tcp_client(addr, Some("fan"))).collect();
    let mut publisher = tcp_client(addr, None);
    let data = [b'x'; 128];
    let frame = tcp_frame(Command::Publish { channel: "fan", data: &data });
    let mut published = [0u8; HEADER_LEN + 8];
    for _ in 0..WARMUP {
        publisher.write_all(&frame).expect("publish");
        publisher.read_exact(&mut published).expect("PUBLISHED");
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = ALLOCS.load(Relaxed);
    for _ in 0..publications {
        publisher.write_all(&frame).expect("publish");
        publisher.read_exact(&mut published).expect("PUBLISHED");
        assert_eq!(&published[3..5], &[0x80, 0x04], "PUBLISHED");
    }
    std::thread::sleep(Duration::from_millis(200));
    let allocs = ALLOCS.load(Relaxed) - before;
    // Every subscriber got every publication, as MESSAGE frames in offset order.
    let message_len = HEADER_LEN + 2 + 3 + 8 + data.len();
    for s in &mut subs {
        let mut all = vec![0u8; (WARMUP + publications) * message_len];
        s.read_exact(&mut all).expect("every MESSAGE");
        for (i, m) in all.chunks(message_len).enumerate() {
            assert_eq!(&m[3..5], &[0x80, 0x10], "MESSAGE");
            assert_eq!(u64::from_be_bytes(m[18..26].try_into().expect("8 bytes")), i as u64 + 1, "offset");
        }
    }
    let _ = stop.send(());
    allocs
}

/// (The second server used to stall for seconds: the first one's TCP connections, closing at its
/// shutdown, spun on an always-ready timer and held the runtime's workers.)
#[test]
fn tcp_fan_out_allocates_per_publication_never_per_delivery() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let few = tcp_fanout_allocations(&rt, 10, 200);
    let many = tcp_fanout_allocations(&rt, 60, 200);
    println!("tcp, 200 publications: {few} allocations with 10 subscribers, {many} with 60 (10,000 more deliveries)");
    // As for WebSocket (above): queue storage growth is amortized; a cost per delivery would be ≥ 10,000.
    assert!(
        many.saturating_sub(few) < 1_000,
        "50 more TCP subscribers cost {} more allocations for 10,000 more deliveries",
        many.saturating_sub(few)
    );
}

/// What one more idle connection holds: the sizes of the heap blocks whose live count grew by at least half
/// a block per connection while `n` connections (each made by `open`) were opened — the runtime's
/// occasional allocations and the growth of shared tables stay below that — and the live heap added per
/// connection, those included. A first `n` opened and closed beforehand lets the shared tables grow.
fn idle_connection_blocks(n: usize, open: impl Fn() -> TcpStream) -> (Vec<usize>, i64) {
    drop((0..n).map(|_| open()).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(500));
    let (per_connection, added) = heap::held_by(n, open);
    let blocks = added.into_iter().filter(|&(_, count)| count >= (n / 2) as i64).map(|(size, _)| size).collect();
    (blocks, per_connection)
}

/// Issue 9 keeps idle memory per connection where it was (RSS figures: BENCHMARKS.md, "Idle memory per
/// connection after direct writes"). Measured exactly here: the bytes of the blocks an idle connection
/// holds may not grow. An echo connection on the pool strategy holds its task (the 280-B `Connection`
/// future in tokio's 384-B cell) and its socket registration (256); a subscribed client adds its
/// `ClientState` box (64), its `ClientShared` (128 with the `Arc`'s counts) and its subscription's entry
/// (32). ARCHITECTURE.md, "Memory per connection", has the table. A new per-connection allocation, or a
/// struct that grows, fails this; one that shrinks does not.
#[test]
fn an_idle_connection_holds_no_more_heap_than_before() {
    let _serial = serial();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let n = 2000;

    let (addr, stop) = start(&rt, "pool", 8);
    let echo = idle_connection_blocks(n, || {
        let mut s = client(addr);
        let mut frame = Vec::new();
        encode_client_frame(&mut frame, true, OpCode::Text, b"hello", [5, 6, 7, 8]);
        s.write_all(&frame).expect("write");
        s.read_exact(&mut [0u8; 7]).expect("echo");
        s
    });
    let _ = stop.send(());

    let config = std::env::temp_dir().join(format!("ringcast-alloc-idle-{}.toml", std::process::id()));
    let plain =
        "allow_anonymous = true\n[channels]\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n";
    std::fs::write(&config, plain).expect("config file");
    let (addr, stop) = start_on(&rt, Some(&config), &[("tcp_listen", "off")], false);
    let subscribed = idle_connection_blocks(n, || {
        let mut s = client_at(addr, "/connection/websocket");
        command(&mut s, r#"{"id":1,"connect":{}}"#, r#""client":""#);
        command(&mut s, r#"{"id":2,"subscribe":{"channel":"idle"}}"#, r#""id":2"#);
        s
    });
    let _ = stop.send(());
    let _ = std::fs::remove_file(&config);

    println!("idle echo connection: blocks {:?} B, {} B live heap each", echo.0, echo.1);
    println!("idle subscribed client: blocks {:?} B, {} B live heap each", subscribed.0, subscribed.1);
    let held = |blocks: &[usize]| blocks.iter().sum::<usize>();
    assert!(held(&echo.0) <= 640, "an idle echo connection holds blocks of {:?} B", echo.0);
    assert!(held(&subscribed.0) <= 864, "an idle subscribed client holds blocks of {:?} B", subscribed.0);
}
