//! The node registry: which ringcast nodes share this engine, and what each one serves.
//!
//! The server API's `info` method answers for the whole cluster, as Centrifugo's does. No node can ask
//! another for its figures synchronously (nodes only meet through the engine), so each node announces
//! its own stats to every node on a timer, as a control message ([`crate::engine::Control::Node`]), and
//! every node keeps the latest announcement of each peer with the time it arrived.
//!
//! A node that stops announcing (killed, partitioned from the engine) is left out of `info` once its
//! last announcement is older than [`MAX_AGE`], and forgotten at that point: the registry holds at most
//! one entry per node that announced within that window, so it cannot grow without bound.
//!
//! The node's own entry is never read from the registry: `info` builds it fresh, so a node whose engine
//! is down still reports itself.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::Control;
use crate::pubsub::node::Node;

/// How often a node announces itself (Centrifugo's node info interval).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);
/// An announcement older than this no longer counts: two missed announcements and a second of slack
/// for a slow engine, as Centrifugo allows.
pub const MAX_AGE: Duration = Duration::from_secs(7);

/// One node's figures, as it announces them and as `info` reports them (`api::NodeJson` is this type:
/// the announcement is the reply's shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_clients: u32,
    pub num_users: u32,
    /// Client subscriptions on the node (Centrifugo v5+; older clients ignore it).
    pub num_subs: u32,
    pub num_channels: u32,
    /// Seconds since the node started.
    pub uptime: u32,
}

/// The latest announcement of each peer (see the module docs).
#[derive(Debug, Default)]
pub struct NodeRegistry {
    peers: Mutex<HashMap<String, (NodeStats, Instant)>>,
}

impl NodeRegistry {
    /// An announcement arrived (any node's, this one's included: the caller filters nothing).
    pub fn record(&self, stats: NodeStats, now: Instant) {
        self.lock().insert(stats.uid.clone(), (stats, now));
    }

    /// The peers heard from within [`MAX_AGE`] of `now`, except `own_uid`, by uid; forgets the others.
    pub fn live(&self, own_uid: &str, now: Instant) -> Vec<NodeStats> {
        let mut peers = self.lock();
        peers.retain(|_, (_, seen)| now.saturating_duration_since(*seen) <= MAX_AGE);
        let mut out: Vec<NodeStats> =
            peers.values().filter(|(s, _)| s.uid != own_uid).map(|(s, _)| s.clone()).collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (NodeStats, Instant)>> {
        match self.peers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Announces the node's stats through its engine every [`ANNOUNCE_EVERY`] until the node is dropped. A
/// failed announcement is logged by the engine's error counter and tried again at the next tick.
pub async fn announce(node: Weak<Node>) {
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let Some(remote) = node.remote.clone() else { return };
        let control = Control::Node(node.stats());
        drop(node);
        if let Err(e) = remote.broker.control(&control).await {
            crate::engine::failed("node_info", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(uid: &str) -> NodeStats {
        NodeStats { uid: uid.into(), name: uid.into(), ..Default::default() }
    }

    #[test]
    fn a_peer_that_stops_announcing_drops_out_and_is_forgotten() {
        let r = NodeRegistry::default();
        let t0 = Instant::now();
        r.record(stats("a"), t0);
        r.record(stats("b"), t0 + Duration::from_secs(5));
        r.record(stats("self"), t0 + Duration::from_secs(5));
        let uids = |v: Vec<NodeStats>| v.into_iter().map(|s| s.uid).collect::<Vec<_>>();
        assert_eq!(uids(r.live("self", t0 + MAX_AGE)), ["a", "b"]);
        assert_eq!(uids(r.live("self", t0 + MAX_AGE + Duration::from_millis(1))), ["b"]);
        assert_eq!(r.lock().len(), 2, "a is forgotten, self and b kept");
        // A later announcement brings a node back.
        r.record(stats("a"), t0 + Duration::from_secs(9));
        assert_eq!(uids(r.live("self", t0 + Duration::from_secs(9))), ["a", "b"]);
    }
}
