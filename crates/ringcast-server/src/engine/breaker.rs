//! The circuit breaker in front of the networked engine: when Redis (or, later, NATS) keeps failing,
//! stop asking it for a while.
//!
//! Why: with the engine down or stalled, every publish, history read and presence call waits up to
//! `redis_timeout` before answering error 100. Under load that turns an engine outage into thousands of
//! connection worker threads parked in `block_in_place`, and a recovering engine into one hit by every
//! retry at once. After [`BreakerPolicy::failures`] consecutive failed calls the breaker opens: calls
//! answer [`EngineError::Unavailable`] (client and API error 100, temporary, so SDKs retry with backoff)
//! at once, without touching the engine. After [`BreakerPolicy::cooldown`] it is half-open: exactly one
//! call (the probe) goes through; its success closes the breaker, its failure opens it for another
//! cool-down, and every other call meanwhile fails fast.
//!
//! What counts: [`EngineError::Unavailable`] and [`EngineError::Timeout`] are failures;
//! [`EngineError::UnrecoverablePosition`] is the engine answering correctly about a client's position,
//! so it counts as a success. Calls admitted while closed that finish after the breaker opened do not
//! move it (it already decided).
//!
//! Where: [`Guarded`] wraps the three engine capabilities ([`Broker`], [`HistoryStore`],
//! [`PresenceManager`]) once, in [`Remote::guarded`], so every engine call of the node and the API goes
//! through the one [`Breaker`]. The memory broker is in-process and infallible, so it has none. The
//! engine's own background work (its PUB/SUB connection's reconnects, presence refresh) is not
//! guarded: it already backs off on its own.
//!
//! The state machine ([`Breaker`]) is sans-IO: every transition takes `now`, so the unit tests drive it
//! with a manual clock. Its state sits behind one small mutex taken for a few instructions, never across
//! an engine call or `.await`; metrics are recorded after the lock is released.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ringcast_protocol::messages::{ClientInfo, Publication};

use super::{
    Broker, Control, EngineError, EngineFuture, EngineState, EngineStatus, HistoryStore, PresenceManager, Remote,
    WaitLimit,
};
use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// `ringcast_engine_breaker_state`: 0 closed, 1 open, 2 half-open.
pub const STATE_GAUGE: &str = "ringcast_engine_breaker_state";
/// `ringcast_engine_breaker_trips_total`: transitions into open (from closed, or a failed probe).
pub const TRIPS_TOTAL: &str = "ringcast_engine_breaker_trips_total";
/// `ringcast_engine_breaker_rejected_total`: calls failed fast without touching the engine.
pub const REJECTED_TOTAL: &str = "ringcast_engine_breaker_rejected_total";

/// When to open and for how long (`engine_breaker_failures`, `engine_breaker_cooldown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failed calls that open the breaker; 0: never (the breaker is off).
    pub failures: u32,
    /// How long it stays open before letting one probe through.
    pub cooldown: Duration,
}

/// The breaker's state as reported (`/metrics`, `/health`, the dashboard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of [`STATE_GAUGE`].
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// What [`Breaker::admit`] decided for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Closed: go ahead.
    Call,
    /// Half-open: this call is the one probe; its outcome decides.
    Probe,
    /// Open (or a probe is already out): fail fast with `Unavailable`.
    Reject,
}

/// How an admitted call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Dropped before it finished (its caller went away): says nothing about the engine.
    Abandoned,
}

impl Outcome {
    fn of<T>(result: &Result<T, EngineError>) -> Outcome {
        match result {
            Ok(_) | Err(EngineError::UnrecoverablePosition) => Outcome::Success,
            Err(EngineError::Unavailable | EngineError::Timeout) => Outcome::Failure,
            // Refused on this node before reaching the engine (`engine_max_waiting`).
            Err(EngineError::Busy) => Outcome::Abandoned,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Inner {
    fn state(self) -> BreakerState {
        match self {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

/// The breaker's state machine (see the module docs).
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// What a transition changed, for the metrics recorded after the lock is released.
struct Changed {
    state: Option<BreakerState>,
    tripped: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker { policy, inner: Mutex::new(Inner::Closed { failures: 0 }) }
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state now. An open breaker whose cool-down has passed reports open until a call arrives and
    /// becomes the probe.
    pub fn state(&self) -> BreakerState {
        self.lock().state()
    }

    /// Sets the state gauge (after the metrics recorder is installed, so that a scrape shows 0 before
    /// the first transition).
    pub fn report(&self) {
        metrics::gauge!(STATE_GAUGE).set(self.state().gauge());
    }

    /// Whether a call may go to the engine at `now`.
    pub fn admit(&self, now: Instant) -> Admit {
        if self.policy.failures == 0 {
            return Admit::Call;
        }
        let (admit, changed) = {
            let mut inner = self.lock();
            match *inner {
                Inner::Closed { .. } => (Admit::Call, None),
                Inner::Open { until } if now >= until => {
                    *inner = Inner::HalfOpen { probing: true };
                    (Admit::Probe, Some(BreakerState::HalfOpen))
                }
                Inner::HalfOpen { probing: false } => {
                    *inner = Inner::HalfOpen { probing: true };
                    (Admit::Probe, None)
                }
                Inner::Open { .. } | Inner::HalfOpen { probing: true } => (Admit::Reject, None),
            }
        };
        if let Some(state) = changed {
            metrics::gauge!(STATE_GAUGE).set(state.gauge());
        }
        if admit == Admit::Reject {
            metrics::counter!(REJECTED_TOTAL).increment(1);
        }
        admit
    }

    /// Records how a call that [`Breaker::admit`] let through ended, at `now`.
    pub fn record(&self, admit: Admit, outcome: Outcome, now: Instant) {
        if self.policy.failures == 0 {
            return;
        }
        let changed = {
            let mut inner = self.lock();
            self.transition(&mut inner, admit, outcome, now)
        };
        if let Some(state) = changed.state {
            metrics::gauge!(STATE_GAUGE).set(state.gauge());
            if state == BreakerState::Closed {
                tracing::info!("engine circuit breaker closed: the probe succeeded");
            }
        }
        if changed.tripped {
            metrics::counter!(TRIPS_TOTAL).increment(1);
            tracing::warn!(
                failures = self.policy.failures,
                cooldown = ?self.policy.cooldown,
                "engine circuit breaker open: engine calls fail fast with error 100 until a probe succeeds"
            );
        }
    }

    fn transition(&self, inner: &mut Inner, admit: Admit, outcome: Outcome, now: Instant) -> Changed {
        let open = Inner::Open { until: now + self.policy.cooldown };
        let unchanged = Changed { state: None, tripped: false };
        match (admit, *inner, outcome) {
            (Admit::Call, Inner::Closed { .. }, Outcome::Success) => {
                *inner = Inner::Closed { failures: 0 };
                unchanged
            }
            (Admit::Call, Inner::Closed { failures }, Outcome::Failure) => {
                let failures = failures.saturating_add(1);
                if failures >= self.policy.failures {
                    *inner = open;
                    Changed { state: Some(BreakerState::Open), tripped: true }
                } else {
                    *inner = Inner::Closed { failures };
                    unchanged
                }
            }
            (Admit::Probe, Inner::HalfOpen { .. }, Outcome::Success) => {
                *inner = Inner::Closed { failures: 0 };
                Changed { state: Some(BreakerState::Closed), tripped: false }
            }
            (Admit::Probe, Inner::HalfOpen { .. }, Outcome::Failure) => {
                *inner = open;
                Changed { state: Some(BreakerState::Open), tripped: true }
            }
            // The probe's caller went away: the next call probes instead.
            (Admit::Probe, Inner::HalfOpen { .. }, Outcome::Abandoned) => {
                *inner = Inner::HalfOpen { probing: false };
                unchanged
            }
            // A call admitted before the breaker changed state, or abandoned while closed: the breaker
            // already decided without it.
            _ => unchanged,
        }
    }
}

/// An admitted call's claim on the breaker: records its outcome once, or `Abandoned` when dropped
/// unfinished (so a cancelled probe cannot leave the breaker half-open for ever).
struct Permit<'a> {
    breaker: &'a Breaker,
    admit: Admit,
    done: bool,
}

impl Permit<'_> {
    fn finish<T>(mut self, result: &Result<T, EngineError>) {
        self.done = true;
        self.breaker.record(self.admit, Outcome::of(result), Instant::now());
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.admit, Outcome::Abandoned, Instant::now());
        }
    }
}

/// A networked engine behind a [`Breaker`]: the one place its calls are admitted and their outcomes
/// recorded.
pub struct Guarded {
    broker: Arc<dyn Broker>,
    history: Arc<dyn HistoryStore>,
    presence: Arc<dyn PresenceManager>,
    breaker: Arc<Breaker>,
}

impl Guarded {
    /// Runs `call` unless the breaker rejects it (then `Unavailable`, and `call` never runs, so the
    /// engine is not touched). One extra small allocation per engine call (the wrapping future), beside
    /// the engine's own.
    fn guard<'a, T: Send + 'a>(&'a self, call: impl FnOnce() -> EngineFuture<'a, T>) -> EngineFuture<'a, T> {
        let admit = self.breaker.admit(Instant::now());
        if admit == Admit::Reject {
            return Box::pin(std::future::ready(Err(EngineError::Unavailable)));
        }
        let permit = Permit { breaker: &self.breaker, admit, done: false };
        let fut = call();
        Box::pin(async move {
            let result = fut.await;
            permit.finish(&result);
            result
        })
    }
}

impl Broker for Guarded {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        self.guard(|| self.broker.publish(channel, publication, history))
    }

    fn subscribe_node<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.guard(|| self.broker.subscribe_node(channel))
    }

    fn unsubscribe_node(&self, channel: &str) {
        // Batched by the engine and never waited for: nothing to fail fast.
        self.broker.unsubscribe_node(channel);
    }

    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        self.guard(|| self.broker.control(control))
    }

    fn barrier<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.guard(|| self.broker.barrier(channel))
    }

    fn status(&self) -> EngineStatus {
        let mut status = self.broker.status();
        let state = self.breaker.state();
        if state != BreakerState::Closed {
            if status.state == EngineState::Up {
                status.state = EngineState::Degraded;
            }
            status.detail.push_str("; circuit breaker ");
            status.detail.push_str(state.label());
        }
        status
    }
}

impl HistoryStore for Guarded {
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        self.guard(|| self.history.history(channel, filter, history))
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.guard(|| self.history.remove_history(channel))
    }
}

impl PresenceManager for Guarded {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        self.guard(|| self.presence.add_presence(channel, client, info))
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()> {
        self.guard(|| self.presence.remove_presence(channel, client))
    }

    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        self.guard(|| self.presence.presence(channel))
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        self.guard(|| self.presence.presence_stats(channel))
    }
}

impl Remote {
    /// The node's view of a networked engine: every capability through one [`Breaker`] with `policy`.
    /// `waiting` bounds the calls sessions wait on at once (`engine_max_waiting`).
    pub fn guarded<E>(engine: Arc<E>, policy: BreakerPolicy, waiting: Arc<WaitLimit>) -> Remote
    where
        E: Broker + HistoryStore + PresenceManager,
    {
        Remote::guarded_parts(engine.clone(), engine.clone(), engine, policy, waiting)
    }

    /// [`Remote::guarded`] for capabilities from different engines (NATS publications with presence in
    /// Redis): still one breaker, since a node serves its clients through all of them together.
    pub fn guarded_parts(
        broker: Arc<dyn Broker>,
        history: Arc<dyn HistoryStore>,
        presence: Arc<dyn PresenceManager>,
        policy: BreakerPolicy,
        waiting: Arc<WaitLimit>,
    ) -> Remote {
        let breaker = Arc::new(Breaker::new(policy));
        let guarded = Arc::new(Guarded { broker, history, presence, breaker: breaker.clone() });
        Remote { broker: guarded.clone(), history: guarded.clone(), presence: guarded, breaker, waiting }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BreakerPolicy = BreakerPolicy { failures: 3, cooldown: Duration::from_secs(5) };

    fn fail(b: &Breaker, now: Instant) {
        let admit = b.admit(now);
        assert_eq!(admit, Admit::Call);
        b.record(admit, Outcome::Failure, now);
    }

    #[test]
    fn opens_after_n_consecutive_failures_and_a_success_resets_the_count() {
        let b = Breaker::new(POLICY);
        let t0 = Instant::now();
        fail(&b, t0);
        fail(&b, t0);
        // A success in between: the count starts again.
        let admit = b.admit(t0);
        b.record(admit, Outcome::Success, t0);
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t0), Admit::Reject);
    }

    #[test]
    fn open_rejects_until_the_cooldown_then_lets_exactly_one_probe_through() {
        let b = Breaker::new(POLICY);
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&b, t0));
        assert_eq!(b.admit(t0 + Duration::from_millis(4_999)), Admit::Reject);
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // While the probe is out, everyone else fails fast.
        assert_eq!(b.admit(t1), Admit::Reject);
        b.record(Admit::Probe, Outcome::Success, t1);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t1), Admit::Call);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let b = Breaker::new(POLICY);
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&b, t0));
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(Admit::Probe, Outcome::Failure, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t1 + Duration::from_millis(4_999)), Admit::Reject);
        assert_eq!(b.admit(t1 + POLICY.cooldown), Admit::Probe);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let b = Breaker::new(POLICY);
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&b, t0));
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(Admit::Probe, Outcome::Abandoned, t1);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admit::Probe);
    }

    #[test]
    fn late_results_of_calls_admitted_while_closed_do_not_move_an_open_breaker() {
        let b = Breaker::new(POLICY);
        let t0 = Instant::now();
        let late = b.admit(t0);
        (0..3).for_each(|_| fail(&b, t0));
        b.record(late, Outcome::Success, t0);
        assert_eq!(b.state(), BreakerState::Open);
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(late, Outcome::Failure, t1);
        assert_eq!(b.state(), BreakerState::HalfOpen, "only the probe decides");
    }

    #[test]
    fn unrecoverable_position_is_the_engine_answering_not_failing() {
        assert_eq!(Outcome::of::<()>(&Err(EngineError::UnrecoverablePosition)), Outcome::Success);
        assert_eq!(Outcome::of::<()>(&Err(EngineError::Timeout)), Outcome::Failure);
        assert_eq!(Outcome::of::<()>(&Err(EngineError::Unavailable)), Outcome::Failure);
    }

    #[test]
    fn zero_failures_turns_the_breaker_off() {
        let b = Breaker::new(BreakerPolicy { failures: 0, cooldown: POLICY.cooldown });
        let t0 = Instant::now();
        (0..100).for_each(|_| fail(&b, t0));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    /// An engine whose every call fails, counting the calls that reach it.
    struct Down(std::sync::atomic::AtomicUsize);

    impl Down {
        fn call<'a, T: Send + 'a>(&'a self) -> EngineFuture<'a, T> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(std::future::ready(Err(EngineError::Unavailable)))
        }
    }

    impl Broker for Down {
        fn publish<'a>(&'a self, _: &'a str, _: &'a Publication, _: HistoryOptions) -> EngineFuture<'a, StreamPos> {
            self.call()
        }
        fn subscribe_node<'a>(&'a self, _: &'a str) -> EngineFuture<'a, ()> {
            self.call()
        }
        fn unsubscribe_node(&self, _: &str) {}
        fn control<'a>(&'a self, _: &'a Control) -> EngineFuture<'a, ()> {
            self.call()
        }
        fn status(&self) -> EngineStatus {
            EngineStatus { kind: "test", state: EngineState::Up, detail: String::new() }
        }
    }

    impl HistoryStore for Down {
        fn history<'a>(
            &'a self,
            _: &'a str,
            _: &'a HistoryFilter,
            _: HistoryOptions,
        ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
            self.call()
        }
        fn remove_history<'a>(&'a self, _: &'a str) -> EngineFuture<'a, ()> {
            self.call()
        }
    }

    impl PresenceManager for Down {
        fn add_presence<'a>(&'a self, _: &'a str, _: ClientId, _: &'a ClientInfo) -> EngineFuture<'a, ()> {
            self.call()
        }
        fn remove_presence<'a>(&'a self, _: &'a str, _: ClientId) -> EngineFuture<'a, ()> {
            self.call()
        }
        fn presence<'a>(&'a self, _: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
            self.call()
        }
        fn presence_stats<'a>(&'a self, _: &'a str) -> EngineFuture<'a, (u32, u32)> {
            self.call()
        }
    }

    #[test]
    fn an_open_breaker_answers_without_calling_the_engine_and_is_shared_by_every_capability() {
        let engine = Arc::new(Down(Default::default()));
        let remote = Remote::guarded(engine.clone(), POLICY, Arc::new(WaitLimit::new(8)));
        for _ in 0..3 {
            assert_eq!(super::super::resolve(remote.presence.presence_stats("c")), Err(EngineError::Unavailable));
        }
        assert_eq!(remote.breaker.state(), BreakerState::Open);
        assert_eq!(remote.broker.status().state, EngineState::Degraded);
        let publication = Publication::default();
        let opts = HistoryOptions::default();
        assert_eq!(
            super::super::resolve(remote.broker.publish("c", &publication, opts)),
            Err(EngineError::Unavailable)
        );
        assert_eq!(super::super::resolve(remote.history.remove_history("c")), Err(EngineError::Unavailable));
        assert_eq!(engine.0.load(std::sync::atomic::Ordering::Relaxed), 3, "only the three that opened it");
    }
}
