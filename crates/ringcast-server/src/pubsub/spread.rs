//! Splitting one publication's direct writes between the runtime's workers.
//!
//! A fan-out writes the idle subscribers it claimed itself, after its channel's section
//! ([`crate::pubsub::client`]). For a large channel that is a long run of `sendmsg`s on the publishing
//! thread while the other worker may idle, and the last subscriber's delivery waits for all of them.
//! So a fan-out that claimed at least `fanout_split_min` subscribers hands the second half of its list
//! to a helper task and writes the first half itself: one hand-off (one lock, one wake) per
//! publication, not one wake per subscriber.
//!
//! Why two tasks. tokio's multi-thread scheduler puts a task woken from a worker thread into that
//! worker's LIFO slot, which other workers never steal from: woken alone, the helper would run after the
//! publishing task on the same thread, one half after the other (a spawned task goes there too). Waking
//! a second task right after it (the *nudge*, which does nothing) moves the helper out of the slot to
//! the back of the worker's run queue, and a task pushed there makes the scheduler wake a parked worker
//! to steal it. So the other worker writes the second half while this one writes the first.
//! That is a property of tokio's scheduler, not of its API: if it stops holding, the helper runs later
//! on the same thread and the split costs a task poll, nothing else (the figures are in BENCHMARKS.md).
//!
//! What it keeps. A handed-off subscriber is still claimed, and only the claim's holder writes
//! ([`ClientShared::flush_claimed`] works from any thread), so the one-writer rule and the queue's
//! order are the claim protocol's, unchanged. The hand-off list and the helper's list swap buffers, so
//! in steady state nothing is allocated. No lock is held across a write: the helper takes the list
//! under the lock and writes after releasing it. Without running helpers (no runtime, `runtime =
//! "per-core"`, tests) nothing is handed off and the fan-out writes everything itself; a helper that is
//! dropped (its runtime shut down) writes what it was handed before it goes, so no claim is left
//! behind unwritten.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use crate::pubsub::client::ClientShared;

/// The hand-off point between fan-outs and the helper task.
#[derive(Debug)]
pub struct Spread {
    /// Claimed subscribers at which a fan-out splits its writes; `usize::MAX` while no helper runs.
    min: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Claimed subscribers handed off and not yet taken by the helper.
    pending: Vec<Arc<ClientShared>>,
    /// The helper task, and the task woken after it to move it out of the waking worker's LIFO slot.
    /// Both `None` until the helpers first wait, and again once the helper is gone.
    helper: Option<Waker>,
    nudge: Option<Waker>,
}

impl Default for Spread {
    fn default() -> Self {
        Spread::new()
    }
}

impl Spread {
    pub fn new() -> Spread {
        Spread { min: AtomicUsize::new(usize::MAX), state: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning only means a panic elsewhere mid-update; the list is still a list.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Writes the claimed subscribers in `claimed` (see [`ClientShared::flush_claimed`]), handing the
    /// second half to the helper when there are at least `min` of them; leaves `claimed` empty with its
    /// capacity. Returns (writes made here, bytes written here), already counted in the metrics.
    pub fn write(&self, claimed: &mut Vec<Arc<ClientShared>>) -> (u64, u64) {
        if claimed.len() >= self.min.load(Ordering::Relaxed) {
            self.hand_off(claimed);
        }
        flush_all(claimed)
    }

    /// Moves the second half of `claimed` to the helper and wakes it, then the nudge (in that order:
    /// see the module docs). Keeps everything if no helper is waiting to take it.
    fn hand_off(&self, claimed: &mut Vec<Arc<ClientShared>>) {
        let half = claimed.len() / 2;
        let (helper, nudge) = {
            let mut st = self.lock();
            let Some(helper) = st.helper.clone() else { return };
            st.pending.extend(claimed.drain(half..));
            (helper, st.nudge.clone())
        };
        helper.wake();
        if let Some(nudge) = nudge {
            nudge.wake();
        }
    }

    /// Starts splitting fan-outs of at least `min` claimed subscribers (at least 2): spawns the helper
    /// and the nudge on the current tokio runtime. They run until the runtime drops them. Once only:
    /// a second call does nothing.
    pub fn start(self: &Arc<Self>, min: usize) {
        if self.min.load(Ordering::Relaxed) != usize::MAX {
            return;
        }
        let helper = Helper { spread: self.clone(), mine: Vec::new() };
        tokio::spawn(helper.run());
        let spread = self.clone();
        tokio::spawn(poll_fn(move |cx| {
            let mut st = spread.lock();
            match &st.nudge {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.nudge = Some(cx.waker().clone()),
            }
            Poll::<()>::Pending
        }));
        self.min.store(min.max(2), Ordering::Relaxed);
    }
}

/// Writes every claimed subscriber in `list`, leaving it empty, and counts the writes in the metrics.
/// Returns (writes made, bytes written).
fn flush_all(list: &mut Vec<Arc<ClientShared>>) -> (u64, u64) {
    let (mut writes, mut written) = (0u64, 0u64);
    for client in list.drain(..) {
        let n = client.flush_claimed();
        writes += u64::from(n > 0);
        written += n as u64;
    }
    if writes > 0 {
        metrics::counter!(crate::metrics::FANOUT_DIRECT_WRITES_TOTAL).increment(writes);
        metrics::counter!(crate::metrics::BYTES_OUT_TOTAL).increment(written);
    }
    (writes, written)
}

/// The helper task: takes what fan-outs handed off and writes it.
struct Helper {
    spread: Arc<Spread>,
    /// The list being written; swapped with `pending`, so both keep their capacity.
    mine: Vec<Arc<ClientShared>>,
}

impl Helper {
    /// One list per poll: if more was handed off meanwhile, the helper wakes itself (to the back of
    /// the run queue) rather than loop, so a busy channel cannot keep other tasks off its worker.
    async fn run(mut self) {
        poll_fn(|cx| {
            {
                let mut st = self.spread.lock();
                match &st.helper {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => st.helper = Some(cx.waker().clone()),
                }
                if st.pending.is_empty() {
                    return Poll::<()>::Pending;
                }
                std::mem::swap(&mut st.pending, &mut self.mine);
            }
            flush_all(&mut self.mine);
            if !self.spread.lock().pending.is_empty() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }
}

impl Drop for Helper {
    /// No more hand-offs, and what was handed off is written now: a claim is never left unwritten.
    fn drop(&mut self) {
        self.spread.min.store(usize::MAX, Ordering::Relaxed);
        let mut st = self.spread.lock();
        st.helper = None;
        st.nudge = None;
        self.mine.append(&mut st.pending);
        drop(st);
        flush_all(&mut self.mine);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use bytes::Bytes;
    use ringcast_protocol::Format;

    use super::*;
    use crate::pubsub::client::{ClientId, Delivery};
    use crate::transport::outbound::Outbound;
    use crate::transport::Encoding;

    /// `n` idle clients (a Unix stream pair each: the same `sendmsg` as TCP), each claimed by a
    /// delivery of "x", in `claimed`; the peers to read them from.
    fn claimed_clients(n: usize) -> (Vec<Arc<ClientShared>>, Vec<(UnixStream, UnixStream)>) {
        let (mut claimed, mut sockets) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (ours, peer) = UnixStream::pair().expect("socket pair");
            ours.set_nonblocking(true).expect("nonblocking");
            peer.set_nonblocking(true).expect("nonblocking");
            let c = ClientShared::new(ClientId(i as u128), Encoding::websocket(Format::Json), 1 << 20);
            c.publish_fd(ours.as_raw_fd());
            assert_eq!(c.take(&mut Outbound::new(), Waker::noop()), None);
            assert!(!c.park(true), "parked idle");
            assert_eq!(c.deliver_or_claim(&Bytes::from_static(b"x"), 0), (Delivery::Queued, true), "claimed");
            claimed.push(c);
            sockets.push((ours, peer));
        }
        (claimed, sockets)
    }

    /// How many of the peers received their "x".
    fn received(sockets: &[(UnixStream, UnixStream)]) -> usize {
        use std::io::Read;
        let mut n = 0;
        for (_, peer) in sockets {
            let mut buf = [0u8; 8];
            if let Ok(1) = (&*peer).read(&mut buf) {
                n += 1;
            }
        }
        n
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime")
    }

    /// Runs the runtime's other tasks until `done` (a bounded number of turns, not a time).
    fn turn_until(rt: &tokio::runtime::Runtime, mut done: impl FnMut() -> bool) -> bool {
        rt.block_on(async {
            for _ in 0..1000 {
                if done() {
                    return true;
                }
                tokio::task::yield_now().await;
            }
            done()
        })
    }

    #[test]
    fn without_a_helper_the_fan_out_writes_everything_itself() {
        let spread = Spread::new();
        let (mut claimed, sockets) = claimed_clients(6);
        assert_eq!(spread.write(&mut claimed), (6, 6));
        assert!(claimed.is_empty());
        assert_eq!(received(&sockets), 6);
    }

    #[test]
    fn a_long_list_is_split_and_the_helper_writes_the_second_half() {
        let rt = current_thread();
        let spread = Arc::new(Spread::new());
        rt.block_on(async { spread.start(4) });
        assert!(turn_until(&rt, || spread.lock().helper.is_some() && spread.lock().nudge.is_some()), "helpers wait");

        let (mut short, short_sockets) = claimed_clients(3);
        assert_eq!(spread.write(&mut short), (3, 3), "under the threshold: all written here");
        assert_eq!(received(&short_sockets), 3);

        let (mut claimed, sockets) = claimed_clients(7);
        let capacity = claimed.capacity();
        assert_eq!(spread.write(&mut claimed), (3, 3), "the first half here");
        assert!(claimed.is_empty() && claimed.capacity() == capacity, "emptied, capacity kept");
        assert_eq!(spread.lock().pending.len(), 4, "the second half handed off, not written yet");
        assert!(turn_until(&rt, || spread.lock().pending.is_empty()), "the helper took its half");
        assert_eq!(received(&sockets), 7, "and wrote it");
    }

    #[test]
    fn a_helper_dropped_with_claims_handed_to_it_writes_them_first() {
        let rt = current_thread();
        let spread = Arc::new(Spread::new());
        rt.block_on(async { spread.start(2) });
        assert!(turn_until(&rt, || spread.lock().helper.is_some()), "the helper waits");
        let (mut claimed, sockets) = claimed_clients(4);
        assert_eq!(spread.write(&mut claimed), (2, 2));
        // The runtime ends before the helper ran: its claims must not be left unwritten.
        drop(rt);
        assert_eq!(received(&sockets), 4, "the handed-off half was written as the helper went");
        let (mut more, more_sockets) = claimed_clients(4);
        assert_eq!(spread.write(&mut more), (4, 4), "no helper any more: all written here");
        assert_eq!(received(&more_sockets), 4);
    }
}
