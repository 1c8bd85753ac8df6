//! Registry operations against the size of what they touch: a subscribe + unsubscribe on a channel that
//! already has N subscribers, and a client's connect + disconnect when N clients share its user (every
//! anonymous client shares ""). Both must cost the same at N = 10 and N = 100,000 (a scan of a Vec under
//! the lock made them O(N), and a mass disconnect O(N²)).
//!
//! `cargo bench -p ringcast-server --bench hub`; figures in BENCHMARKS.md.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringcast_protocol::Format;
use ringcast_server::broker::MemoryBroker;
use ringcast_server::policy::namespace::Namespaces;
use ringcast_server::pubsub::client::{ClientId, ClientShared};
use ringcast_server::pubsub::hub::Hub;
use ringcast_server::pubsub::node::Node;
use ringcast_server::transport::Encoding;

fn client(i: u128) -> Arc<ClientShared> {
    ClientShared::new(ClientId(i), Encoding::websocket(Format::Json), 1 << 20)
}

fn registry(c: &mut Criterion) {
    let mut group = c.benchmark_group("subscribe+unsubscribe, channel of N");
    for n in [10u128, 1_000, 100_000] {
        let hub = Hub::new();
        for i in 0..n {
            hub.subscribe_with("big", &client(i), || {}, || Ok::<_, ()>(())).expect("subscribed");
        }
        let me = client(u128::MAX);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                hub.subscribe_with("big", &me, || {}, || Ok::<_, ()>(())).expect("subscribed");
                hub.unsubscribe("big", &me, || {});
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("connect+disconnect, user with N clients");
    for n in [10u128, 1_000, 100_000] {
        let node = Node::new(Arc::new(MemoryBroker::new()), Namespaces::dev_mode(), None, true);
        let others: Vec<_> = (0..n).map(client).collect();
        for c in &others {
            assert!(node.try_register_client("", c));
        }
        let me = client(u128::MAX);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                node.try_register_client("", &me);
                node.unregister_client("", &me);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
