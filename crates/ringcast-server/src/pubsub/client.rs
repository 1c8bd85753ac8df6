//! What other tasks may do to a connection: deliver frames to it, and ask it to disconnect.
//!
//! Publishers never hold a lock across a connection's socket write. They push an already-encoded frame
//! (a `Bytes` shared with every other subscriber) into the connection's [`ClientShared`] queue. The mutex
//! here is held for a push or a take — never across IO.
//!
//! # Direct writes from the fan-out
//! Waking a connection's task for every delivery (a futex wake, often on the other worker thread, a
//! poll, a take) cost more CPU than the `writev` itself. So when the connection is *idle* — its task is
//! not inside a poll and holds nothing unwritten ([`ClientShared::park`]), its shared queue is empty,
//! and it published a plain TCP socket ([`ClientShared::publish_fd`]) — a fan-out *claims* it instead of
//! waking it ([`ClientShared::deliver_or_claim`]): the frame is queued as usual, and after the fan-out
//! has left the channel's section it writes the queue to the socket itself with one non-blocking
//! `sendmsg` ([`ClientShared::flush_claimed`]), no lock held. Only what the kernel does not take (or an
//! error) wakes the task, which then finds the rest at the front of the queue.
//!
//! One writer at a time, so the queue's order is the socket's: a fan-out writes only under a claim, and
//! claims only an idle connection; the task marks itself busy when it takes ([`ClientShared::take`]),
//! which revokes a claim not yet written and waits out one being written (a single non-blocking
//! `sendmsg`). Until it parks again the task is the only writer and fan-outs queue and wake as before, so
//! its replies keep their order with pushes (the subscribe reply, written in the pass that subscribed,
//! precedes the first push; nothing follows a close frame, since a closed queue is never claimed). The
//! descriptor is withdrawn before the socket is closed ([`ClientShared::withdraw_fd`], which waits out a
//! write in progress): a fan-out never writes to a descriptor number the kernel may have reused.
//!
//! A queue over `client_queue_max_size` bytes means the peer does not read fast enough: the connection
//! is marked for disconnect with the protocol's "slow" code (3008), its queued frames are dropped, and
//! nothing more is queued. Other subscribers are not affected.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::{Buf, Bytes};
use ringcast_protocol::Format;

use crate::transport::outbound::{Outbound, MAX_IOV};
use crate::transport::Encoding;

thread_local! {
    /// The frames a fan-out on this thread is writing to one claimed connection (at most [`MAX_IOV`];
    /// its capacity is kept, so a direct write allocates nothing).
    static BATCH: RefCell<Vec<Bytes>> = const { RefCell::new(Vec::new()) };
}

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

#[derive(Debug)]
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
    /// The connection's plain TCP socket, for fan-outs to write to while it is idle; -1 when there is
    /// none (TLS, the TCP protocol, `fanout_direct_write = false`) or once withdrawn before the close.
    fd: RawFd,
    /// Who may write to the socket now (one byte: this struct is in every subscribed connection).
    writer: Writer,
}

/// Who writes a connection's socket. Exactly one at a time, so the queue's order is the socket's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// The connection's task: inside a poll, or holding unwritten bytes of its own. Deliveries queue
    /// and wake it. From creation until the task first parks.
    Task,
    /// The task parked with nothing to write: the next delivery to an empty queue claims it.
    Idle,
    /// A fan-out queued a frame on the idle connection and will write the queue itself after leaving
    /// its channel's section (instead of waking the task). Later deliveries queue behind, unwoken.
    Claimed,
    /// That fan-out is inside its `sendmsg` now: the front frames are out of `out`, in its hands.
    Writing,
}

impl Default for State {
    fn default() -> Self {
        State {
            out: VecDeque::new(),
            queued: 0,
            waker: None,
            notified: false,
            closed: false,
            oldest_us: 0,
            requests: None,
            fd: -1,
            writer: Writer::Task,
        }
    }
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

    /// The waker to call for new work, unless the task was woken already and has not taken since.
    fn wake(&mut self) -> Option<Waker> {
        let w = if self.notified { None } else { self.waker.clone() };
        self.notified = true;
        w
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
        self.deliver_inner(frame, published_us, false).0
    }

    /// Queues a frame like [`Self::deliver`], but an idle connection with a published socket is
    /// *claimed* instead of woken (the second value): the caller must then call
    /// [`Self::flush_claimed`] once it holds no lock (after its channel's section), and must not call
    /// it otherwise. For a fan-out; see the module docs.
    pub fn deliver_or_claim(&self, frame: &Bytes, published_us: u32) -> (Delivery, bool) {
        self.deliver_inner(frame, published_us, true)
    }

    fn deliver_inner(&self, frame: &Bytes, published_us: u32, may_claim: bool) -> (Delivery, bool) {
        let waker;
        let outcome;
        {
            let mut st = self.lock();
            if st.closed {
                return (Delivery::Closed, false);
            }
            if st.queued as usize + frame.len() > self.max_queue as usize {
                let dropped = st.clear() + 1;
                st.requests().disconnect = Some(DisconnectRequest { code: 3008, reason: "slow".into() });
                st.closed = true;
                outcome = Delivery::Slow(dropped);
            } else {
                let claim = may_claim && st.out.is_empty() && st.writer == Writer::Idle && st.fd >= 0;
                if st.out.is_empty() {
                    st.oldest_us = published_us;
                }
                // Within `max_queue`, itself a u32.
                st.queued += frame.len() as u32;
                st.out.push_back(frame.clone());
                outcome = Delivery::Queued;
                if claim {
                    st.writer = Writer::Claimed;
                    return (outcome, true);
                }
                if matches!(st.writer, Writer::Claimed | Writer::Writing) {
                    // The claim's holder writes (or hands to the task) everything queued, this too.
                    return (outcome, false);
                }
            }
            waker = st.wake();
        }
        if let Some(w) = waker {
            w.wake();
        }
        (outcome, false)
    }

    /// Writes what is queued for a client this thread claimed ([`Self::deliver_or_claim`]) straight
    /// to its socket: up to [`MAX_IOV`] frames taken from the queue's front, one non-blocking
    /// `sendmsg` with no lock held, then what the kernel did not take goes back to the front (the
    /// partly written frame as a shorter view of itself; a queued frame is never mutated). The claim is
    /// released; anything still queued (a remainder, frames that arrived meanwhile, or everything after
    /// an error, which the task will meet itself) wakes the task. Returns the bytes written.
    ///
    /// A claim the task revoked meanwhile (it started a poll), or that another fan-out's flush already
    /// served, is left alone.
    pub fn flush_claimed(&self) -> usize {
        BATCH.with(|batch| match batch.try_borrow_mut() {
            Ok(mut batch) => self.flush_with(&mut batch),
            // Only if a flush ran inside a flush on one thread (it does not): write with a batch of its own.
            Err(_) => self.flush_with(&mut Vec::new()),
        })
    }

    fn flush_with(&self, batch: &mut Vec<Bytes>) -> usize {
        batch.clear();
        let mut st = self.lock();
        if st.writer != Writer::Claimed {
            return 0;
        }
        let fd = st.fd;
        if st.closed || fd < 0 {
            // Closed, or the connection is closing its socket: the task (if any) takes it from here.
            st.writer = Writer::Idle;
            let waker = if st.out.is_empty() { None } else { st.wake() };
            drop(st);
            if let Some(w) = waker {
                w.wake();
            }
            return 0;
        }
        let n = st.out.len().min(MAX_IOV);
        batch.extend(st.out.drain(..n));
        st.writer = Writer::Writing;
        let since = st.oldest_us;
        drop(st);

        let result = crate::transport::stream::send_frames(fd, batch);
        let written = *result.as_ref().unwrap_or(&0);
        if written > 0 {
            crate::metrics::record_delivery(crate::metrics::clock_us().wrapping_sub(since));
        }
        // Drop what the kernel took; the frame it took part of becomes a view of its rest.
        let mut left = written;
        let mut done = 0;
        for f in batch.iter_mut() {
            if left < f.len() {
                f.advance(left);
                break;
            }
            left -= f.len();
            done += 1;
        }
        batch.drain(..done);

        let mut st = self.lock();
        if st.closed {
            // A disconnect (slow, API) cleared the queue meanwhile: the rest is dropped with it.
            batch.clear();
        } else {
            st.queued = st.queued.saturating_sub(written as u32);
            if !batch.is_empty() {
                st.oldest_us = since;
            }
            while let Some(f) = batch.pop() {
                st.out.push_front(f);
            }
        }
        // The task parked before the claim and cannot have taken over while we wrote (it waits).
        st.writer = Writer::Idle;
        let waker = if st.out.is_empty() { None } else { st.wake() };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        written
    }

    /// Lets fan-outs write to the connection's socket `fd` while the connection is idle. Only for a
    /// socket where bytes go to the peer as written (plain TCP), and only with a matching
    /// [`Self::withdraw_fd`] before the socket is closed.
    pub fn publish_fd(&self, fd: RawFd) {
        self.lock().fd = fd;
    }

    /// Takes the socket back from fan-outs, before it is closed: no fan-out writes to it afterwards
    /// (this waits out one writing now: a single non-blocking `sendmsg`).
    pub fn withdraw_fd(&self) {
        let mut st = self.lock();
        st.fd = -1;
        let mut spins = 0;
        while st.writer == Writer::Writing {
            drop(st);
            pause(&mut spins);
            st = self.lock();
        }
    }

    /// Called by the connection's task before it waits (returns `Pending`). `idle`: it holds nothing
    /// unwritten of its own. An idle connection stops being the writer (fan-outs may claim it) unless
    /// frames arrived since its last take: then it returns `true`, and the task should take them now
    /// (no wake-up is lost between its last take and this call).
    pub fn park(&self, idle: bool) -> bool {
        let mut st = self.lock();
        if !idle {
            return false;
        }
        if !st.out.is_empty() && !st.closed {
            return true;
        }
        st.writer = Writer::Idle;
        false
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
    ///
    /// It also makes the task the connection's only writer until it parks ([`Self::park`]): a claim a
    /// fan-out has not started writing is revoked (its frames are the task's to write), and one being
    /// written is waited out (a single non-blocking `sendmsg`) before the task may touch the socket.
    pub fn take(&self, local: &mut Outbound, waker: &Waker) -> Option<DisconnectRequest> {
        let mut st = self.lock();
        let mut spins = 0;
        while st.writer == Writer::Writing {
            drop(st);
            pause(&mut spins);
            st = self.lock();
        }
        // A claim not yet written is revoked: its frames are the task's now.
        st.writer = Writer::Task;
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

/// Waits a moment for another thread to finish one `sendmsg`: spins briefly, then yields the CPU (the
/// writer may have been preempted).
fn pause(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
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

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn woken(c: &Count) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A client with a published socket (one end of a Unix stream pair: the same `sendmsg` as TCP),
    /// whose task has taken once (registering `waker`) and parked idle.
    fn idle_client(
        max_queue: usize,
        waker: &Waker,
    ) -> (Arc<ClientShared>, std::os::unix::net::UnixStream, std::os::unix::net::UnixStream) {
        use std::os::fd::AsRawFd;
        let (ours, peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("nonblocking");
        peer.set_nonblocking(true).expect("nonblocking");
        let c = ClientShared::new(ClientId(1), Encoding::websocket(Format::Json), max_queue);
        c.publish_fd(ours.as_raw_fd());
        assert_eq!(c.take(&mut Outbound::new(), waker), None);
        assert!(!c.park(true), "nothing arrived: parked");
        (c, ours, peer)
    }

    fn read_all(peer: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    #[test]
    fn an_idle_client_is_claimed_not_woken_and_written_by_the_fan_out() {
        let (count, waker) = counting();
        let (c, _ours, mut peer) = idle_client(1 << 20, &waker);
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"one"), 0), (Delivery::Queued, true), "claimed");
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"two"), 0), (Delivery::Queued, false), "behind the claim");
        assert_eq!(woken(&count), 0, "a claimed client's task is not woken");
        assert_eq!(c.flush_claimed(), 6);
        assert_eq!(c.flush_claimed(), 0, "a claim is served once");
        assert_eq!(read_all(&mut peer), b"onetwo", "both frames, in order");
        assert_eq!(woken(&count), 0, "everything was written: still no wake-up");
        assert_eq!(c.queued_bytes(), 0);
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"three"), 0), (Delivery::Queued, true), "idle again");
    }

    #[test]
    fn a_busy_client_is_queued_and_woken() {
        let (count, waker) = counting();
        let (c, _ours, mut peer) = idle_client(1 << 20, &waker);
        let mut local = Outbound::new();
        local.push(Bytes::from_static(b"reply"));
        // The task starts a poll: it is the writer until it parks with nothing of its own left.
        assert_eq!(c.take(&mut local, &waker), None);
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"push"), 0), (Delivery::Queued, false));
        assert_eq!(woken(&count), 1, "a busy client is woken");
        assert!(!c.park(false), "not idle: it stays the writer");
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"push2"), 0), (Delivery::Queued, false), "still busy");
        local.clear();
        assert!(c.park(true), "pushes arrived since the take: take them instead of waiting");
        c.take(&mut local, &waker);
        assert_eq!(local.queued_bytes(), 9, "the task writes them itself");
        assert!(read_all(&mut peer).is_empty(), "the fan-out wrote nothing");
    }

    #[test]
    fn a_claim_the_task_takes_over_is_not_written_by_the_fan_out() {
        let (_count, waker) = counting();
        let (c, _ours, mut peer) = idle_client(1 << 20, &waker);
        assert!(c.deliver_or_claim(&Bytes::from_static(b"push"), 0).1);
        // The task starts a poll (its socket became readable) before the fan-out left its section.
        let mut local = Outbound::new();
        c.take(&mut local, &waker);
        assert_eq!(local.queued_bytes(), 4, "the frame is the task's to write");
        assert_eq!(c.flush_claimed(), 0, "the revoked claim writes nothing");
        assert!(read_all(&mut peer).is_empty());
    }

    #[test]
    fn what_the_kernel_does_not_take_goes_back_to_the_front_and_wakes_the_task() {
        let (count, waker) = counting();
        let (c, ours, mut peer) = idle_client(8 << 20, &waker);
        socket2::SockRef::from(&ours).set_send_buffer_size(4096).expect("sndbuf");
        let big = Bytes::from((0..1 << 20).map(|i| i as u8).collect::<Vec<u8>>());
        assert!(c.deliver_or_claim(&big, 0).1);
        assert!(!c.deliver_or_claim(&Bytes::from_static(b"next"), 0).1);
        let written = c.flush_claimed();
        assert!(written > 0 && written < big.len(), "a partial write ({written} B)");
        assert_eq!(woken(&count), 1, "the rest is the task's: woken");
        assert_eq!(c.queued_bytes(), big.len() + 4 - written, "the queue counts what is left");
        let mut local = Outbound::new();
        c.take(&mut local, &waker);
        let first = local.pop_front().expect("the remainder");
        assert_eq!(first, big.slice(written..), "the unwritten rest of the frame, first");
        assert_eq!(local.pop_front(), Some(Bytes::from_static(b"next")), "then what was queued behind it");
        assert_eq!(&read_all(&mut peer)[..], &big[..written]);
        assert_eq!(big[0], 0, "the shared frame itself is untouched");
    }

    #[test]
    fn a_withdrawn_socket_is_never_claimed() {
        let (count, waker) = counting();
        let (c, _ours, mut peer) = idle_client(1 << 20, &waker);
        assert!(c.deliver_or_claim(&Bytes::from_static(b"claimed"), 0).1);
        // The connection closes its socket before the fan-out's flush.
        c.withdraw_fd();
        assert_eq!(c.flush_claimed(), 0, "no write to a withdrawn descriptor");
        assert_eq!(woken(&count), 1, "the frame is left to the task");
        let mut local = Outbound::new();
        c.take(&mut local, &waker);
        assert!(!c.park(true));
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"later"), 0), (Delivery::Queued, false));
        assert_eq!(woken(&count), 2, "queued and woken");
        assert!(read_all(&mut peer).is_empty());
    }

    #[test]
    fn a_closed_queue_is_never_claimed() {
        let (_count, waker) = counting();
        let (c, _ours, mut peer) = idle_client(1 << 20, &waker);
        assert!(c.deliver_or_claim(&Bytes::from_static(b"claimed"), 0).1);
        c.close();
        assert_eq!(c.flush_claimed(), 0, "nothing is written behind a close");
        assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"x"), 0), (Delivery::Closed, false));
        assert!(read_all(&mut peer).is_empty());
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
