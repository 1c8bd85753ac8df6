//! The decompression bomb, measured with a counting global allocator: a compressed frame that would
//! inflate far past the message limit fails with 1009 at the limit, having allocated no more than the
//! limit (plus zlib's fixed state), for every read-buffer strategy.
//!
//! It also records what zlib's state costs, the figures the `deflate` module doc quotes.
//!
//! The allocator counts the whole process, so this file holds one test.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};

use ringcast_wire::buffer::{fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, RingBuffer};
use ringcast_wire::deflate::{negotiate, DeflateConfig, Deflater};
use ringcast_wire::frame::{encode_client_frame, OpCode, Role};
use ringcast_wire::{Limits, Reader, Strategy, WireError};
use support::PeerDeflate;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(by: i64, size: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as i64, layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as i64 - layout.size() as i64, new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: usize = 1 << 20;

/// The process's peak resident set size (`VmHWM` in /proc/self/status), bytes; `None` off Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[test]
fn a_frame_inflating_to_a_gibibyte_fails_at_the_cap_within_the_cap() {
    // 1 MiB of zeros deflates to about 1 KiB; the block (with its sync flush) refers only to itself, so
    // 1024 copies in a row are one valid stream of ~1 MiB that inflates to 1 GiB.
    let block = {
        let mut b = PeerDeflate::new(9).message(&vec![0u8; MIB]);
        b.extend_from_slice(&[0, 0, 0xff, 0xff]);
        b
    };
    assert!(block.len() < 1200, "{}", block.len());
    let mut payload = Vec::with_capacity(block.len() * 1024);
    for _ in 0..1024 {
        payload.extend_from_slice(&block);
    }
    payload.truncate(payload.len() - 4);
    let mut frame = Vec::with_capacity(payload.len() + 14);
    encode_client_frame(&mut frame, true, OpCode::Binary, &payload, [1, 2, 3, 4]);
    frame[0] |= 0x40;
    drop(payload);

    let cap = 4 * MIB;
    let limits = Limits { max_frame_payload: 2 * MIB as u64, max_message_size: cap as u64 };
    let params = negotiate([b"permessage-deflate".as_slice()], &DeflateConfig::enabled()).unwrap();
    let pool = BufferPool::new(16 << 10, 4);
    // RSS as the kernel sees it, besides the allocator's count: the process's peak resident set.
    let hwm_before = peak_rss();
    for strategy in Strategy::ALL {
        let mut buf = match strategy {
            Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(16 << 10)),
            Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(pool.clone())),
            Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(16 << 10, 16 << 10)),
        };
        let mut reader = Reader::new(Role::Server, limits);
        reader.enable_deflate(&params);

        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        LARGEST.store(0, Relaxed);
        let mut fed = 0;
        let result = loop {
            reader.settle(&mut buf);
            let n = fill_from(&mut buf, &frame[fed..(fed + 4096).min(frame.len())]);
            fed += n;
            match reader.next(&mut buf) {
                Ok(None) if fed < frame.len() => {}
                other => break other.map(|e| e.is_some()),
            }
        };
        let peak = (PEAK.load(Relaxed) - base) as usize;
        let largest = LARGEST.load(Relaxed);
        println!(
            "{strategy:?}: fed {fed} of {} B, peak {peak} B above the start, largest allocation {largest} B",
            frame.len()
        );

        assert_eq!(result, Err(WireError::MessageTooLarge), "{strategy:?}");
        assert_eq!(WireError::MessageTooLarge.close_code().0, 1009);
        // At the moment the cap is crossed: 4 MiB of output come from ~4 KiB of input, a few reads.
        assert!(fed < 32 << 10, "{strategy:?}: {fed} B fed before the error");
        // No allocation past the cap, and everything together within the cap plus zlib's state and a
        // read buffer (the message buffer doubles by realloc, counted here as its growth).
        assert!(largest <= cap, "{strategy:?}: an allocation of {largest} B");
        assert!(peak <= cap + (128 << 10), "{strategy:?}: {peak} B live at the peak");
        drop(reader);
        drop(buf);
    }

    // RSS stayed flat: the peak resident set grew by the cap and change, not by the gibibyte the
    // frames inflate to (three of them, one per strategy).
    if let (Some(before), Some(after)) = (hwm_before, peak_rss()) {
        println!("peak RSS (VmHWM) {before} B before the bombs, {after} B after: +{} B", after - before);
        assert!(after - before < 64 * MIB as u64, "peak RSS grew by {} B", after - before);
    }

    // What the state costs, live: an inflater (15 bits) held with client context takeover, and a
    // compressor (level 6, 15 bits) held with server context takeover.
    let config =
        DeflateConfig { client_context_takeover: true, server_context_takeover: true, ..DeflateConfig::enabled() };
    let params = negotiate([b"permessage-deflate".as_slice()], &config).unwrap();
    let msg = PeerDeflate::new(6).message(&[b'a'; 1000]);
    let mut f = Vec::new();
    encode_client_frame(&mut f, true, OpCode::Text, &msg, [1, 2, 3, 4]);
    f[0] |= 0x40;
    let mut buf = GrowableBuffer::new(4096, 4096);
    fill_from(&mut buf, &f);
    let mut reader = Reader::new(Role::Server, Limits::default());
    reader.enable_deflate(&params);
    let base = LIVE.load(Relaxed);
    assert!(matches!(reader.next(&mut buf), Ok(Some(_))));
    reader.settle(&mut buf);
    assert!(reader.holds_inflater());
    let inflater = (LIVE.load(Relaxed) - base) as usize;
    let mut deflater = Deflater::new(&params, &config);
    let base = LIVE.load(Relaxed);
    let frame = deflater.encode_frame(OpCode::Text, &[b'a'; 1000]);
    drop(frame);
    assert!(deflater.holds_state());
    let compressor = (LIVE.load(Relaxed) - base) as usize;
    println!("held between messages: inflater {inflater} B, compressor {compressor} B");
    assert!(inflater > 32 << 10 && inflater < 64 << 10, "inflater {inflater} B");
    assert!(compressor > 128 << 10 && compressor < 512 << 10, "compressor {compressor} B");
}
