//! What other tasks may do to a connection: deliver frames to it, and ask it to disconnect.
//!
//! Publishers never touch a connection's socket. They push an already-encoded frame (a `Bytes` shared
//! with every other subscriber) into the connection's [`ClientShared`] queue and wake its task; the task
//! moves the queue into its own (no copy, no allocation when it was empty) and writes. The mutex here is
//! held for a push or a take — never across IO.
//!
//! A queue over `client_queue_max_size` bytes means the peer does not read fast enough: the connection
//! is marked for disconnect with the protocol's "slow" code (3008), its queued frames are dropped, and
//! nothing more is queued. Other subscribers are not affected.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::Bytes;
use ringcast_protocol::Format;

use crate::transport::outbound::Outbound;
use crate::transport::Encoding;

/// A client id: random 128 bits, shown as a UUID (what Centrifugo SDKs expect in `client`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u128);

impl ClientId {
    pub fn random() -> ClientId {
        // Version-4 UUID layout: random bits with the version and variant nibbles set.
        let r = (u128::from(fastrand::u64(..)) << 64) | u128::from(fastrand::u64(..));
        ClientId((r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62))
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_be_bytes();
        for (i, byte) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A disconnect asked for by another task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisconnectRequest {
    pub code: u16,
    pub reason: String,
}

/// Something another task (the HTTP API) asks a connection's session to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    Subscribe(String),
    Unsubscribe(String),
    /// Publications of the channel may have been missed (the engine's connection was lost): unsubscribe
    /// with 2500 (insufficient state), so the SDK resubscribes and recovers.
    Resubscribe(String),
    /// New expiry (Unix seconds; `None`: never), or expire now.
    Refresh {
        expire_at: Option<i64>,
        expired: bool,
    },
}

/// Outcome of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The queue overflowed now: the client is being disconnected as slow; its backlog and this frame
    /// (that many frames) were dropped.
    Slow(usize),
    /// The client is already disconnecting; the frame was dropped.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    /// Frames for the connection (no inline head, unlike [`Outbound`]: this struct is per client).
    out: VecDeque<Bytes>,
    /// Their total length (below `max_queue`, so `u32`).
    queued: u32,
    waker: Option<Waker>,
    /// The task was woken and has not taken the queue since: no need to wake it again.
    notified: bool,
    /// A disconnect was requested: nothing is queued any more (stays set after the pick-up).
    closed: bool,
    /// When the oldest frame in `out` was published ([`crate::metrics::clock_us`]).
    oldest_us: u32,
    /// What other tasks rarely ask for; boxed, so that the idle connections that never see one carry 8
    /// bytes instead of 56 (every subscribed connection holds one of these structs).
    requests: Option<Box<Requests>>,
}

#[derive(Debug, Default)]
struct Requests {
    /// A disconnect the connection has not picked up yet.
    disconnect: Option<DisconnectRequest>,
    /// Commands for the session, in order.
    commands: Vec<ServerCommand>,
}

impl State {
    fn requests(&mut self) -> &mut Requests {
        self.requests.get_or_insert_with(Box::default)
    }

    /// Drops every queued frame; returns how many there were.
    fn clear(&mut self) -> usize {
        let n = self.out.len();
        self.out = VecDeque::new();
        self.queued = 0;
        n
    }
}

/// The part of a connection other tasks can reach.
#[derive(Debug)]
pub struct ClientShared {
    pub id: ClientId,
    /// The wire format and transport framing its frames are made for.
    pub encoding: Encoding,
    /// `client_queue_max_size`, which the configuration keeps below 4 GiB.
    max_queue: u32,
    state: Mutex<State>,
}

impl ClientShared {
    pub fn new(id: ClientId, encoding: Encoding, max_queue: usize) -> Arc<ClientShared> {
        let max_queue = u32::try_from(max_queue).unwrap_or(u32::MAX);
        Arc::new(ClientShared { id, encoding, max_queue, state: Mutex::new(State::default()) })
    }

    pub fn format(&self) -> Format {
        self.encoding.format
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning only means a panic elsewhere mid-push; the queue is still consistent.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Queues a frame for this client and wakes its task. `published_us`: when it was published
    /// ([`crate::metrics::clock_us`]), for the publish-to-delivery histogram.
    pub fn deliver(&self, frame: &Bytes, published_us: u32) -> Delivery {
        let waker;
        let outcome;
        {
            let mut st = self.lock();
            if st.closed {
                return Delivery::Closed;
            }
            if st.queued as usize + frame.len() > self.max_queue as usize {
                let dropped = st.clear() + 1;
                st.requests().disconnect = Some(DisconnectRequest { code: 3008, reason: "slow".into() });
                st.closed = true;
                outcome = Delivery::Slow(dropped);
            } else {
                if st.out.is_empty() {
                    st.oldest_us = published_us;
                }
                // Within `max_queue`, itself a u32.
                st.queued += frame.len() as u32;
                st.out.push_back(frame.clone());
                outcome = Delivery::Queued;
            }
            waker = if st.notified { None } else { st.waker.clone() };
            st.notified = true;
        }
        if let Some(w) = waker {
            w.wake();
        }
        outcome
    }

    /// The connection queued its close frame (RFC 6455 §5.5.1: nothing may follow it): the queue is
    /// closed, what it holds is dropped, and every later delivery is refused and counted as dropped.
    /// Returns how many queued frames were dropped.
    pub fn close(&self) -> usize {
        let mut st = self.lock();
        st.closed = true;
        st.clear()
    }

    /// Asks the connection to disconnect with `code` (it sends the close frame itself).
    pub fn request_disconnect(&self, code: u16, reason: &str) {
        let waker = {
            let mut st = self.lock();
            if !st.closed {
                st.requests().disconnect = Some(DisconnectRequest { code, reason: reason.to_string() });
                st.closed = true;
                st.clear();
            }
            st.notified = true;
            st.waker.clone()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Asks the connection's session to run `command` (server-side subscribe and the like).
    pub fn command(&self, command: ServerCommand) {
        let waker = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.requests().commands.push(command);
            st.notified = true;
            st.waker.clone()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// `client_queue_max_size`: the bytes of pushes and replies this client may have waiting.
    pub fn max_queue(&self) -> usize {
        self.max_queue as usize
    }

    /// Bytes delivered here and not yet taken by the connection.
    pub fn queued_bytes(&self) -> usize {
        self.lock().queued as usize
    }

    /// Frees the queue's storage if nothing is queued (a quiet connection keeps none).
    pub fn shrink_if_empty(&self) {
        let mut st = self.lock();
        if st.out.is_empty() && st.out.capacity() > 0 {
            st.out = VecDeque::new();
        }
    }

    /// Moves pending session commands into `out` (called by the connection's task).
    pub fn take_commands(&self, out: &mut Vec<ServerCommand>) {
        let mut st = self.lock();
        if let Some(r) = st.requests.as_mut() {
            out.append(&mut r.commands);
            if r.disconnect.is_none() {
                st.requests = None;
            }
        }
    }

    /// Called by the connection's task: registers its waker, moves queued frames into `local` once
    /// `local` has been written out, and returns a pending disconnect request, if any.
    ///
    /// Frames stay here while the connection still has unwritten ones of its own, so the backlog of a
    /// client that does not read accumulates *here*, where [`Self::deliver`] measures it against the
    /// limit (the connection's own queue then holds at most one earlier batch).
    ///
    /// Taking frames records how long the oldest of them waited since its publish.
    pub fn take(&self, local: &mut Outbound, waker: &Waker) -> Option<DisconnectRequest> {
        let mut st = self.lock();
        match &st.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => st.waker = Some(waker.clone()),
        }
        st.notified = false;
        let mut taken_since = None;
        if local.is_empty() && !st.out.is_empty() && !st.closed {
            let bytes = st.queued as usize;
            local.take_deque(&mut st.out, bytes);
            st.queued = 0;
            taken_since = Some(st.oldest_us);
        }
        let disconnect = match st.requests.as_mut() {
            None => None,
            Some(r) => {
                let d = r.disconnect.take();
                if r.commands.is_empty() {
                    // Handled: an idle connection goes back to carrying nothing here.
                    st.requests = None;
                }
                d
            }
        };
        drop(st);
        if let Some(since) = taken_since {
            crate::metrics::record_delivery(crate::metrics::clock_us().wrapping_sub(since));
        }
        disconnect
    }
}

/// A set of clients, by the address of their shared state: O(1) insert and remove however large it
/// grows (a channel's subscribers, a user's connections), 8 bytes an entry plus the table's control byte,
/// iterated in address order (see [`AddrHasher`]).
#[derive(Debug, Default)]
pub struct ClientSet(HashSet<ByAddr, BuildHasherDefault<AddrHasher>>);

impl ClientSet {
    /// Returns whether it was not there yet.
    pub fn insert(&mut self, client: &Arc<ClientShared>) -> bool {
        self.0.insert(ByAddr(client.clone()))
    }

    /// Returns whether it was there.
    pub fn remove(&mut self, client: &Arc<ClientShared>) -> bool {
        self.0.remove(&ByAddr(client.clone()))
    }

    pub fn contains(&self, client: &Arc<ClientShared>) -> bool {
        self.0.contains(&ByAddr(client.clone()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ClientShared>> {
        self.0.iter().map(|c| &c.0)
    }
}

/// A client compared and hashed by the address of its shared state: unique while it is alive, and the
/// set holds it alive.
#[derive(Debug, Clone)]
struct ByAddr(Arc<ClientShared>);

impl PartialEq for ByAddr {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ByAddr {}

impl Hash for ByAddr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(Arc::as_ptr(&self.0) as usize);
    }
}

/// Hashes an address so that the table keeps clients in address order.
///
/// The hub walks a channel's set for every publication, and the order matters: each delivery touches
/// the client's queue and wakes its task, and visiting 10,000 subscribers in a scattered (hashed) order
/// cost 29% more server CPU per delivery than visiting them in the order they were allocated, which is
/// the order they connected (BENCHMARKS.md, "Registry"). hashbrown places an entry by the hash's low
/// bits and iterates in bucket order, and compares the top 7 bits as a tag. So the low bits are the
/// address in units of a `ClientShared` allocation (128 bytes: consecutive allocations land in
/// consecutive buckets, and iteration follows memory), and the top 7 bits are a mix of the address, so
/// tags still tell entries apart. Only speed depends on this; correctness is the set's.
#[derive(Debug, Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_usize(usize::from(*b) ^ (self.0 as usize));
        }
    }

    fn write_usize(&mut self, n: usize) {
        const LOW: u64 = (1 << 57) - 1;
        let n = n as u64;
        let tag = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) & !LOW;
        self.0 = ((n >> 7) & LOW) | tag;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_looks_like_a_v4_uuid() {
        let s = ClientId::random().to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(ClientId::random(), ClientId::random());
    }

    #[test]
    fn frames_wait_here_while_the_connection_has_its_own_backlog() {
        let c = ClientShared::new(ClientId(1), Encoding::websocket(Format::Json), 10);
        let mut local = Outbound::new();
        local.push(Bytes::from_static(b"unwritten"));
        assert_eq!(c.deliver(&Bytes::from_static(b"12345"), 0), Delivery::Queued);
        c.take(&mut local, std::task::Waker::noop());
        assert_eq!(local.queued_bytes(), 9, "not moved while the local queue is busy");
        assert_eq!(c.deliver(&Bytes::from_static(b"123456"), 0), Delivery::Slow(2), "the backlog is measured here");
    }

    #[test]
    fn requests_are_boxed_only_while_pending() {
        let c = ClientShared::new(ClientId(1), Encoding::websocket(Format::Json), 1024);
        let mut local = Outbound::new();
        c.command(ServerCommand::Subscribe("a".into()));
        c.command(ServerCommand::Unsubscribe("a".into()));
        assert!(c.lock().requests.is_some());
        assert_eq!(c.take(&mut local, std::task::Waker::noop()), None, "no disconnect asked for");
        assert!(c.lock().requests.is_some(), "commands still pending");
        let mut commands = Vec::new();
        c.take_commands(&mut commands);
        assert_eq!(commands, vec![ServerCommand::Subscribe("a".into()), ServerCommand::Unsubscribe("a".into())]);
        assert!(c.lock().requests.is_none(), "an idle client carries no request box");
        c.request_disconnect(3001, "bye");
        c.command(ServerCommand::Subscribe("b".into()));
        let req = c.take(&mut local, std::task::Waker::noop());
        assert_eq!(req, Some(DisconnectRequest { code: 3001, reason: "bye".into() }));
        commands.clear();
        c.take_commands(&mut commands);
        assert!(commands.is_empty(), "nothing is queued for a client being disconnected");
    }

    #[test]
    fn client_set_iterates_in_address_order_and_removes_once() {
        let clients: Vec<_> =
            (0..1000).map(|i| ClientShared::new(ClientId(i), Encoding::websocket(Format::Json), 1024)).collect();
        let mut set = ClientSet::default();
        for c in &clients {
            assert!(set.insert(c));
            assert!(!set.insert(c), "already there");
        }
        let addrs: Vec<usize> = set.iter().map(|c| Arc::as_ptr(c) as usize).collect();
        let ascending = addrs.windows(2).filter(|w| w[0] < w[1]).count();
        // Address order, but for the table's wrap-around (allocations need not be contiguous).
        assert!(ascending * 10 >= addrs.len() * 9, "{ascending} of {} steps ascend", addrs.len());
        for c in clients.iter().step_by(2) {
            assert!(set.remove(c));
            assert!(!set.remove(c), "removed once");
        }
        assert_eq!(set.len(), 500);
        assert!(clients.iter().skip(1).step_by(2).all(|c| set.contains(c)));
    }

    #[test]
    fn nothing_is_queued_behind_a_close() {
        let c = ClientShared::new(ClientId(1), Encoding::websocket(Format::Json), 1024);
        assert_eq!(c.deliver(&Bytes::from_static(b"before"), 0), Delivery::Queued);
        assert_eq!(c.close(), 1, "what was queued behind the close is dropped");
        assert_eq!(c.deliver(&Bytes::from_static(b"after"), 0), Delivery::Closed);
        let mut local = Outbound::new();
        assert_eq!(c.take(&mut local, std::task::Waker::noop()), None);
        assert!(local.is_empty(), "nothing reaches the connection once it closed");
    }

    #[test]
    fn overflow_marks_slow_and_drops_the_queue() {
        let c = ClientShared::new(ClientId(1), Encoding::websocket(Format::Json), 10);
        assert_eq!(c.deliver(&Bytes::from_static(b"123456"), 0), Delivery::Queued);
        assert_eq!(c.deliver(&Bytes::from_static(b"123456"), 0), Delivery::Slow(2), "its backlog and itself");
        assert_eq!(c.deliver(&Bytes::from_static(b"1"), 0), Delivery::Closed);
        let mut local = Outbound::new();
        let req = c.take(&mut local, std::task::Waker::noop());
        assert_eq!(req.map(|r| r.code), Some(3008));
        assert!(local.is_empty(), "a slow client's backlog is dropped, not written");
        assert_eq!(c.deliver(&Bytes::from_static(b"1"), 0), Delivery::Closed, "still closed after the pick-up");
        assert_eq!(c.take(&mut local, std::task::Waker::noop()), None, "the disconnect is reported once");
    }
}
