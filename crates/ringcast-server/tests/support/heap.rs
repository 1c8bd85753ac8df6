//! The heap tests' shared parts: a counting global allocator, the lock that serialises measurements,
//! the real server started on a runtime the test owns, and a blocking WebSocket handshake.
//!
//! The allocator counts the whole process, so each heap test is a binary of its own (`alloc.rs`,
//! `deflate_alloc.rs`, `channel_memory.rs` include this file with `#[path]`), and every test in one
//! binary holds [`serial`] while it measures. The clients are blocking `std` sockets driven from the
//! test thread: they allocate only where a test says so, so what the counters see is the server's.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ringcast_server::{Config, Server};

/// Allocations and reallocations made so far.
pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Bytes held now.
pub static LIVE: AtomicI64 = AtomicI64::new(0);
/// The most bytes held at once since a test last stored a baseline here.
pub static PEAK: AtomicI64 = AtomicI64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicI64 = AtomicI64::new(0);
/// Blocks held now, by size (index 1,024 counts every larger one).
pub static SIZES: [AtomicI64; 1025] = [ZERO; 1025];

pub struct Counting;

impl Counting {
    fn held(delta: i64) {
        let now = LIVE.fetch_add(delta, Relaxed) + delta;
        PEAK.fetch_max(now, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        SIZES[layout.size().min(1024)].fetch_add(1, Relaxed);
        Counting::held(layout.size() as i64);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        SIZES[layout.size().min(1024)].fetch_sub(1, Relaxed);
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        SIZES[layout.size().min(1024)].fetch_sub(1, Relaxed);
        SIZES[new_size.min(1024)].fetch_add(1, Relaxed);
        Counting::held(new_size as i64 - layout.size() as i64);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

/// One measuring test at a time (the counters are process-wide); a failed test does not block the rest.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server on `127.0.0.1:0` with `flags` (and `file`, if given), run on `rt` until the sender is
/// dropped or sent to. Returns its WebSocket address, or its TCP protocol address with `tcp`.
pub fn start_on(
    rt: &tokio::runtime::Runtime,
    file: Option<&Path>,
    flags: &[(&str, &str)],
    tcp: bool,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut all = vec![("listen".to_string(), "127.0.0.1:0".to_string())];
    all.extend(flags.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (config, settings) = Config::load(file, |_| None, &all).expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let addr = rt.block_on(async {
        let server = Server::bind(config, settings).expect("bind");
        let addr = if tcp { server.tcp_addr().expect("tcp_listen is on") } else { server.local_addr().expect("addr") };
        tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        addr
    });
    (addr, tx)
}

/// The heap `n` connections made by `open` hold while all are open: the live bytes added per connection,
/// and the live blocks added (or freed: negative) by size, the sizes whose count changed. Waits 300 ms
/// for the server to settle before the baseline and again before the reading.
pub fn held_by<T>(n: usize, open: impl Fn() -> T) -> (i64, Vec<(usize, i64)>) {
    std::thread::sleep(Duration::from_millis(300));
    let baseline = LIVE.load(Relaxed);
    let sizes: Vec<i64> = SIZES.iter().map(|a| a.load(Relaxed)).collect();
    let held: Vec<T> = (0..n).map(|_| open()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let per_connection = (LIVE.load(Relaxed) - baseline) / n as i64;
    let added = SIZES.iter().zip(sizes).map(|(a, b)| a.load(Relaxed) - b).enumerate().filter(|x| x.1 != 0).collect();
    drop(held);
    (per_connection, added)
}

/// [`start_on`] with the WebSocket address and no file.
pub fn start(rt: &tokio::runtime::Runtime, flags: &[(&str, &str)]) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    start_on(rt, None, flags, false)
}

/// A blocking client upgraded on `path` (offering `extensions`, if given), with a read timeout of
/// `timeout`; panics unless the answer is 101. Returns the socket and the response head.
pub fn upgraded(addr: SocketAddr, path: &str, extensions: Option<&str>, timeout: Duration) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    let mut req = Vec::new();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    ringcast_wire::handshake::write_client_request_with(&mut req, &addr.to_string(), path, key, &[], extensions);
    s.write_all(&req).expect("upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).expect("read"), 1, "closed during handshake");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}
