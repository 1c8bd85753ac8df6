//! Memory watermarks against the real binary (its allocator, its RSS, its sampling task): clients that
//! never read while publications flow push the server over `memory_high_watermark`; then new
//! connections are refused 503, the slow readers are disconnected 3008, the clients that read miss
//! nothing, and admission resumes once RSS is back under `memory_low_watermark`.
//!
//! Publications are 32 KiB and shared by every subscriber, so the slow readers' backlogs hold the same
//! frames, and memory comes back only once every one of them is gone. The publisher waits for the
//! fast clients to have each publication before the next one: a client that keeps up has at most one
//! frame queued, which is what "fast" means here and below the shedding floor by construction.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{http_request, metric, upgrade, Answer, ServerProcess, Ws};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "memory-test-key";
const PAYLOAD: usize = 32 * 1024;
const FAST: usize = 3;
const SLOW: usize = 4;
/// 4,000 × 32 KiB = 125 MiB: far past the high mark (48 MiB above idle), whatever the kernel buffers absorb.
const MAX_PUBLICATIONS: usize = 4000;
/// Publications made after the first 503 (while the slow readers are being shed).
const DURING: usize = 20;

async fn call(ws: &mut Ws, cmd: Value) -> Value {
    let id = cmd["id"].clone();
    ws.send(Message::text(cmd.to_string())).await.expect("send command");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a reply in time")
            .expect("connection open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            for line in t.as_str().lines() {
                let v: Value = serde_json::from_str(line).expect("JSON reply");
                if v["id"] == id {
                    return v;
                }
            }
        }
    }
}

async fn subscriber(addr: std::net::SocketAddr, recv_buffer: Option<u32>) -> Ws {
    let mut ws = match upgrade(addr, recv_buffer).await {
        Answer::Upgraded(ws) => *ws,
        Answer::Refused(status, _) => panic!("subscriber refused {status} before the load"),
        Answer::Failed(e) => panic!("subscriber: {e}"),
    };
    let reply = call(&mut ws, json!({"id": 1, "connect": {}})).await;
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    let reply = call(&mut ws, json!({"id": 2, "subscribe": {"channel": "news"}})).await;
    assert!(reply.get("subscribe").is_some(), "{reply}");
    ws
}

/// What a client read: the publication numbers in order, and the close code that ended it, if any.
struct Read {
    numbers: Vec<u64>,
    close: Option<u16>,
}

/// Reads publications until the one marked `end` (a fast client) or the server's close frame.
async fn read_all(mut ws: Ws, progress: Arc<AtomicUsize>) -> Read {
    let mut numbers = Vec::new();
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(120), ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(other) => panic!("connection ended without a close frame: {other:?}"),
            Err(_) => panic!("nothing from the server for 120 s after {} publications", numbers.len()),
        };
        match msg {
            Message::Text(t) => {
                for line in t.as_str().lines() {
                    let v: Value = serde_json::from_str(line).expect("JSON push");
                    let data = &v["push"]["pub"]["data"];
                    if let Some(i) = data["i"].as_u64() {
                        numbers.push(i);
                        progress.store(numbers.len(), Ordering::Release);
                    }
                    if data["end"] == json!(true) {
                        return Read { numbers, close: None };
                    }
                }
            }
            Message::Close(frame) => return Read { numbers, close: frame.map(|f| u16::from(f.code)) },
            _ => {}
        }
    }
}

async fn publish(addr: std::net::SocketAddr, i: usize, pad: &str, end: bool) {
    let body = json!({"channel": "news", "data": {"i": i, "end": end, "pad": pad}, "skip_history": true});
    let (status, text) = http_request(addr, "POST", "/api/publish", &[("X-API-Key", KEY)], &body.to_string()).await;
    assert_eq!(status, 200, "publish {i}: {text}");
    assert!(!text.contains("\"error\""), "publish {i}: {text}");
}

/// Waits until every fast client has read `n` publications (bounded: they read as fast as they can).
async fn caught_up(progress: &[Arc<AtomicUsize>], n: usize) {
    for _ in 0..30_000 {
        if progress.iter().all(|p| p.load(Ordering::Acquire) >= n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("fast clients did not receive publication {n}");
}

/// One upgrade attempt: `Some(retry_after)` when refused 503, `None` when admitted (the client is
/// served: it connects; then it leaves).
async fn probe(addr: std::net::SocketAddr) -> Option<Option<String>> {
    match upgrade(addr, None).await {
        Answer::Refused(503, retry_after) => Some(retry_after),
        Answer::Refused(status, _) => panic!("refused with {status}, not 503"),
        Answer::Failed(e) => panic!("upgrade failed: {e}"),
        Answer::Upgraded(ws) => {
            let mut ws = *ws;
            let reply = call(&mut ws, json!({"id": 1, "connect": {}})).await;
            assert!(reply["connect"]["client"].is_string(), "{reply}");
            None
        }
    }
}

/// What an idle server of this build holds (`ringcast_memory_rss_bytes`), read from a first server of
/// its own with a watermark far out of reach. Most of an idle debug build's RSS is its own code, whose
/// size changes with every dependency, so the watermarks below are set above this, not at fixed sizes.
async fn idle_rss() -> u64 {
    let probe = ServerProcess::start(&["--dev", "--tcp-listen", "off", "--memory-high-watermark", "8GiB"]);
    let mut rss = 0.0;
    for _ in 0..100 {
        rss = metric(probe.addr, "ringcast_memory_rss_bytes").await;
        if rss > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rss > 0.0, "the probe server reports its RSS");
    rss as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_high_watermark_slow_readers_go_3008_new_clients_get_503_and_fast_clients_miss_nothing() {
    const MIB: u64 = 1024 * 1024;
    let idle = idle_rss().await;
    let (high, low) = ((idle + 48 * MIB).to_string(), idle + 28 * MIB);
    let low_flag = low.to_string();
    let server = ServerProcess::start(&[
        "--dev",
        "--tcp-listen",
        "off",
        "--api-key",
        KEY,
        "--memory-high-watermark",
        &high,
        "--memory-low-watermark",
        &low_flag,
        // Far above the watermark: here memory, not the per-client limit, decides.
        "--client-queue-max-size",
        "1073741824",
        // Slow readers send nothing and read nothing until the end: no timeout may end them first.
        "--idle-timeout",
        "0s",
        "--ping-interval",
        "0s",
        "--write-timeout",
        "10m",
        "--close-timeout",
        "10m",
    ]);
    let addr = server.addr;
    // The first sample is taken at start; the idle server is well below the low mark.
    let mut rss = 0.0;
    for _ in 0..100 {
        rss = metric(addr, "ringcast_memory_rss_bytes").await;
        if rss > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rss > 0.0 && rss < low as f64, "idle RSS {rss}, low mark {low}");

    let progress: Vec<Arc<AtomicUsize>> = (0..FAST).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut fast = Vec::new();
    for p in &progress {
        let ws = subscriber(addr, None).await;
        fast.push(tokio::spawn(read_all(ws, p.clone())));
    }
    // Subscribed, then never read (until the end): a 4 KiB receive buffer keeps the backlog in the server.
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        slow.push(subscriber(addr, Some(4096)).await);
    }

    let pad = "x".repeat(PAYLOAD);
    let mut published = 0;
    let mut refused = 0u64;
    while published < MAX_PUBLICATIONS {
        publish(addr, published, &pad, false).await;
        published += 1;
        caught_up(&progress, published).await;
        if let Some(retry_after) = probe(addr).await {
            assert_eq!(retry_after.as_deref(), Some("5"), "Retry-After of a memory refusal");
            refused += 1;
            break;
        }
    }
    assert_eq!(refused, 1, "no 503 after {published} publications of {PAYLOAD} B");
    let rss_at_refusal = metric(addr, "ringcast_memory_rss_bytes").await;
    // Publications keep flowing while the slow readers are shed.
    for _ in 0..DURING {
        publish(addr, published, &pad, false).await;
        published += 1;
        caught_up(&progress, published).await;
    }
    // Admission resumes once RSS is under the low mark (bounded: a minute of 100-ms probes).
    let mut admitted = false;
    for _ in 0..600 {
        match probe(addr).await {
            Some(retry_after) => {
                assert_eq!(retry_after.as_deref(), Some("5"));
                refused += 1;
            }
            None => {
                admitted = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "admission did not resume (RSS {})", metric(addr, "ringcast_memory_rss_bytes").await);
    assert_eq!(metric(addr, "ringcast_memory_pressure").await, 0.0);

    // The last publication; every fast client has all of them, in order, and is still connected.
    publish(addr, published, &pad, true).await;
    published += 1;
    for task in fast {
        let read = task.await.expect("fast client task");
        assert_eq!(read.close, None, "a fast client was disconnected");
        assert_eq!(read.numbers, (0..published as u64).collect::<Vec<_>>(), "a fast client missed publications");
    }
    // Every slow reader was disconnected 3008 (slow), after what its socket already held.
    for (k, ws) in slow.into_iter().enumerate() {
        let read = read_all(ws, Arc::new(AtomicUsize::new(0))).await;
        assert_eq!(read.close, Some(3008), "slow reader {k} after {} publications", read.numbers.len());
        assert!(read.numbers.len() < published, "slow reader {k} got everything: it was not slow");
    }
    assert_eq!(
        metric(addr, "ringcast_memory_shed_disconnects_total").await,
        SLOW as f64,
        "exactly the slow readers were shed"
    );
    assert_eq!(
        metric(addr, r#"ringcast_admission_refusals_total{reason="memory",transport="ws"}"#).await,
        refused as f64
    );
    eprintln!(
        "memory watermark: 503 after {} publications at RSS {:.1} MiB; {refused} refusals; peak RSS {:.1} MiB",
        published - DURING - 1,
        rss_at_refusal / 1048576.0,
        server.status_bytes("VmHWM:") as f64 / 1048576.0
    );
    let mut server = server;
    assert!(server.alive(), "the server survived");
}
