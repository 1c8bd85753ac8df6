//! The NATS engine's history channels against the real NATS with JetStream (127.0.0.1:4222), without
//! ringcast nodes around it: what `Node::subscribe_remote` relies on, checked on the engine itself.
//! Each test has a prefix (and so a stream) of its own and deletes its stream at the end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringcast_protocol::messages::Publication;
use ringcast_server::broker::HistoryOptions;
use ringcast_server::engine::jetstream::{delete_stream, StreamLimits};
use ringcast_server::engine::nats::{NatsEngine, NatsSettings};
use ringcast_server::engine::{Broker, Control, Inbound};

/// Records the offsets handed over, each after a pause: the engine's reader falls behind the stream,
/// as a busy node's does, so what is stored and what has arrived differ for a while.
#[derive(Default)]
struct SlowInbound(Mutex<Vec<u64>>);

impl Inbound for SlowInbound {
    fn publication(&self, _channel: &str, publication: Publication) {
        std::thread::sleep(Duration::from_millis(30));
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(publication.offset);
    }

    fn control(&self, _control: Control) {}

    fn resubscribed(&self, _channels: &[String]) {}
}

const HISTORY: HistoryOptions =
    HistoryOptions { size: 100, ttl: Duration::from_secs(300), meta_ttl: Duration::from_secs(3600) };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_returns_once_every_stored_publication_was_handed_over() {
    let prefix = format!("rc-js-barrier-{}-{:08x}", std::process::id(), fastrand::u32(..));
    let settings = NatsSettings {
        url: "nats://127.0.0.1:4222".into(),
        prefix: prefix.clone(),
        dial_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(5),
        history: Some(StreamLimits { max_per_subject: 100, max_age: Duration::from_secs(3600) }),
    };
    let engine = NatsEngine::connect(&settings).await.expect("nats with JetStream at 127.0.0.1:4222");
    let inbound = Arc::new(SlowInbound::default());
    let dyn_inbound: Arc<dyn Inbound> = inbound.clone();
    engine.set_inbound(Arc::downgrade(&dyn_inbound));
    engine.subscribe_node("c", HISTORY).await.expect("subscribed");
    for n in 1..=8u64 {
        let p = Publication { data: format!("{{\"n\":{n}}}").into(), ..Default::default() };
        let pos = engine.publish("c", &p, HISTORY).await.expect("stored");
        assert_eq!(pos.offset, n);
    }
    engine.barrier("c").await.expect("barrier");
    let seen = inbound.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    engine.unsubscribe_node("c");
    delete_stream(&settings.url, &prefix).await.expect("stream deleted");
    assert_eq!(seen, (1..=8).collect::<Vec<_>>(), "all stored, all handed over, in offset order");
}
