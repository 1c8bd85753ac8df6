//! Codec throughput: the three read-buffer strategies parsing the same byte stream, and frame encoding.
//!
//! Streams are client frames (masked), so parsing includes unmasking and, for text, UTF-8 validation —
//! what the server really does per byte. "glued" feeds the stream in large reads (many frames per read,
//! a frame crossing read boundaries now and then); "split" feeds it in small reads (every frame cut into
//! several pieces). Buffers have their default sizes (ring 4 KiB, pool 16 KiB, growable from 4 KiB).
//!
//! Run: `cargo bench -p ringcast-wire --bench codec` (results in BENCHMARKS.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_wire::buffer::{fill_from, AnyBuffer, BufferPool, GrowableBuffer, PooledBuffer, ReadBuffer, RingBuffer};
use ringcast_wire::frame::{encode_client_frame, encode_frame, OpCode, Role};
use ringcast_wire::{Event, Limits, Reader, Strategy};

fn stream(count: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    for i in 0..count {
        let key = [i as u8, 0x5a, 0xc3, 0x7e];
        encode_client_frame(&mut out, true, OpCode::Text, &payload, key);
    }
    out
}

fn buffer(strategy: Strategy, pool: &std::sync::Arc<BufferPool>) -> AnyBuffer {
    match strategy {
        Strategy::Ring => AnyBuffer::Ring(RingBuffer::new(4096)),
        Strategy::Pool => AnyBuffer::Pool(PooledBuffer::new(pool.clone())),
        Strategy::Growable => AnyBuffer::Growable(GrowableBuffer::new(4096, 1 << 20)),
    }
}

/// Feeds `data` in reads of at most `read` bytes, parsing after each; returns messages and payload bytes.
fn parse_all(buf: &mut AnyBuffer, reader: &mut Reader, data: &[u8], read: usize) -> (usize, usize) {
    let (mut msgs, mut bytes) = (0, 0);
    let mut off = 0;
    while off < data.len() {
        reader.settle(buf);
        let end = (off + read).min(data.len());
        off += fill_from(buf, &data[off..end]);
        while let Ok(Some(ev)) = reader.next(buf) {
            if let Event::Message { payload, .. } = ev {
                msgs += 1;
                bytes += black_box(payload).len();
            }
        }
        reader.settle(buf);
        buf.release();
    }
    (msgs, bytes)
}

fn parse(c: &mut Criterion) {
    let cases = [("small-20B", 2000usize, 20usize), ("large-64KiB", 32, 64 * 1024)];
    for (name, count, size) in cases {
        let data = stream(count, size);
        for (mode, read) in [("glued", 64 * 1024usize), ("split", if size < 100 { 7 } else { 1460 })] {
            let mut group = c.benchmark_group(format!("parse/{name}/{mode}"));
            group.throughput(Throughput::Bytes(data.len() as u64));
            for strategy in Strategy::ALL {
                let pool = BufferPool::new(16 * 1024, 64);
                let mut buf = buffer(strategy, &pool);
                let mut reader = Reader::new(Role::Server, Limits::default());
                let (m, _) = parse_all(&mut buf, &mut reader, &data, read);
                assert_eq!(m, count, "{strategy:?} {name} {mode}");
                group.bench_with_input(BenchmarkId::from_parameter(strategy.name()), &data, |b, data| {
                    b.iter(|| parse_all(&mut buf, &mut reader, data, read))
                });
            }
            group.finish();
        }
    }
}

/// The echo server's case: one small masked client frame per read, parsed through `Reader::next` and
/// the buffer given back when drained, as a connection does at the end of every read. With the pool
/// strategy this is a take and a give of the pooled buffer per message.
fn one_per_read(c: &mut Criterion) {
    let frame = stream(1, 20);
    let mut group = c.benchmark_group("parse/small-20B/one-per-read");
    group.throughput(Throughput::Elements(1));
    for strategy in Strategy::ALL {
        let pool = BufferPool::new(16 * 1024, 64);
        let mut buf = buffer(strategy, &pool);
        let mut reader = Reader::new(Role::Server, Limits::default());
        assert_eq!(parse_all(&mut buf, &mut reader, &frame, frame.len()).0, 1);
        group.bench_function(BenchmarkId::from_parameter(strategy.name()), |b| {
            b.iter(|| {
                // The frame is unmasked in place, so each read brings a fresh masked copy.
                fill_from(&mut buf, black_box(&frame));
                let mut n = 0;
                while let Ok(Some(ev)) = reader.next(&mut buf) {
                    if let Event::Message { payload, .. } = ev {
                        n += black_box(payload).len();
                    }
                }
                reader.settle(&mut buf);
                buf.release();
                n
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [20usize, 64 * 1024] {
        let payload = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("server-frame", size), &payload, |b, p| {
            b.iter(|| encode_frame(OpCode::Binary, black_box(p)))
        });
        let mut out = Vec::with_capacity(size + 14);
        group.bench_with_input(BenchmarkId::new("client-frame-masked", size), &payload, |b, p| {
            b.iter(|| {
                out.clear();
                encode_client_frame(&mut out, true, OpCode::Binary, black_box(p), [1, 2, 3, 4]);
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = parse, one_per_read, encode
}
criterion_main!(benches);
