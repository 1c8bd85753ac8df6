//! permessage-deflate's heap discipline through the real server, measured with a counting allocator
//! (the pattern of `alloc.rs`; a binary of its own, because the allocator is process-wide):
//! * a deflate bomb (16 KiB on the wire, 32 MiB inflated) closes 1009 and the heap never grows by
//!   more than the message limit and an inflater, on every read-buffer strategy;
//! * a connection that negotiated compression and exchanged compressed messages holds no zlib state
//!   once idle (no server context takeover, our default) — and with server context takeover it does,
//!   which shows the measurement sees it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::Duration;

use ringcast_server::{Config, Server};
use ringcast_wire::deflate::compressed_frame;
use ringcast_wire::frame::{encode_client_frame, OpCode};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size() as i64, Relaxed) + layout.size() as i64;
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let delta = new_size as i64 - layout.size() as i64;
        let now = LIVE.fetch_add(delta, Relaxed) + delta;
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One measuring test at a time (the counters are process-wide).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(rt: &tokio::runtime::Runtime, flags: &[(&str, &str)]) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut all = vec![
        ("listen".to_string(), "127.0.0.1:0".to_string()),
        ("dev".to_string(), "true".to_string()),
        ("compression".to_string(), "true".to_string()),
    ];
    all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (config, settings) = Config::load(None, |_| None, &all).expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let addr = rt.block_on(async {
        let server = Server::bind(config, settings).expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        addr
    });
    (addr, tx)
}

/// A blocking client on the echo endpoint that offered permessage-deflate (and got it).
fn client(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut req = Vec::new();
    ringcast_wire::handshake::write_client_request_with(
        &mut req,
        &addr.to_string(),
        "/echo",
        "dGhlIHNhbXBsZSBub25jZQ==",
        &[],
        Some("permessage-deflate; client_max_window_bits"),
    );
    s.write_all(&req).expect("upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("read"), 1, "closed during handshake");
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains("permessage-deflate"), "not negotiated: {text}");
    s
}

/// A masked client frame carrying `payload` compressed (RSV1 set).
fn compressed_client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let frame = compressed_frame(opcode, payload, 9, 15);
    let (len, at) = match frame[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes")) as usize, 10),
        n => (usize::from(n), 2),
    };
    let mut out = Vec::new();
    encode_client_frame(&mut out, true, opcode, &frame[at..at + len], [3, 1, 4, 1]);
    out[0] |= 0x40;
    out
}

/// Reads one server frame into `payload` (reused); returns its first header byte.
fn read_frame(s: &mut TcpStream, payload: &mut Vec<u8>) -> u8 {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).expect("frame header");
    let len = match hdr[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).expect("length");
            usize::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).expect("length");
            u64::from_be_bytes(l) as usize
        }
        n => usize::from(n),
    };
    payload.resize(len, 0);
    s.read_exact(payload).expect("payload");
    hdr[0]
}

fn json(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u32;
    while out.len() < n {
        out.extend_from_slice(
            format!("{{\"channel\":\"news:{}\",\"offset\":{i},\"text\":\"hello\"}}", i % 7).as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

#[test]
fn deflate_bomb_closes_1009_with_the_heap_bounded_by_the_limit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // Made before measuring: the test's own 32 MiB input is not the server's.
    let bomb = compressed_client_frame(OpCode::Binary, &vec![0u8; 32 << 20]);
    assert!(bomb.len() < 64 << 10, "{} bytes on the wire", bomb.len());
    for strategy in ["pool", "ring", "growable"] {
        let (addr, stop) = start(&rt, &[("read_buffer", strategy), ("max_message_size", "1048576")]);
        let mut s = client(addr);
        std::thread::sleep(Duration::from_millis(100));
        let baseline = LIVE.load(Relaxed);
        PEAK.store(baseline, Relaxed);
        s.write_all(&bomb).expect("send bomb");
        let mut payload = Vec::with_capacity(256);
        let b0 = read_frame(&mut s, &mut payload);
        assert_eq!(b0 & 0x0f, 8, "{strategy}: a close frame");
        assert_eq!(&payload[..2], &1009u16.to_be_bytes(), "{strategy}: 1009");
        let grew = PEAK.load(Relaxed) - baseline;
        println!("{strategy}: heap peak +{grew} B for a 32 MiB bomb ({} B on the wire), limit 1 MiB", bomb.len());
        // The message limit (1 MiB, a buffer that may have doubled past it once), an inflater (~47 KiB),
        // read buffers: far below the 32 MiB it inflates to.
        assert!(grew < 4 << 20, "{strategy}: heap grew by {grew} B");
        let _ = stop.send(());
    }
}

/// Heap held by one connection after 50 compressed echoes, beyond what it held before them.
fn held_after_compressed_traffic(flags: &[(&str, &str)]) -> i64 {
    // One worker: the per-thread compressor is made once, by the warm-up, on the thread that measures.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (addr, stop) = start(&rt, flags);
    let message = json(2000);
    let frame = compressed_client_frame(OpCode::Text, &message);
    let mut payload = Vec::with_capacity(64 << 10);
    let mut warm = client(addr);
    for _ in 0..5 {
        warm.write_all(&frame).expect("write");
        let b0 = read_frame(&mut warm, &mut payload);
        assert_eq!(b0 & 0x40, 0x40, "the echo is compressed");
    }
    let mut s = client(addr);
    let mut hello = Vec::new();
    encode_client_frame(&mut hello, true, OpCode::Text, b"hello", [1, 2, 3, 4]);
    s.write_all(&hello).expect("write");
    read_frame(&mut s, &mut payload);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = LIVE.load(Relaxed);
    for _ in 0..50 {
        s.write_all(&frame).expect("write");
        let b0 = read_frame(&mut s, &mut payload);
        assert_eq!(b0 & 0x40, 0x40, "the echo is compressed");
    }
    std::thread::sleep(Duration::from_millis(200));
    let held = LIVE.load(Relaxed) - baseline;
    drop((s, warm));
    let _ = stop.send(());
    held
}

#[test]
fn idle_connection_with_compression_negotiated_holds_no_zlib_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let held = held_after_compressed_traffic(&[]);
    println!("no server context takeover: {held} B held after 50 compressed echoes");
    // An inflater kept would be ~47 KiB, a compressor ~370 KiB.
    assert!(held < 4 * 1024, "{held} B held by an idle connection with compression negotiated");
    // The same measurement sees a compressor that is kept: server context takeover on the echo endpoint.
    let held = held_after_compressed_traffic(&[("compression_context_takeover", "true")]);
    println!("server context takeover: {held} B held after 50 compressed echoes");
    assert!(held > 100 * 1024, "a kept compressor should show: {held} B");
}
