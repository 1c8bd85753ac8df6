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
//! What counts: [`EngineError::Unavailable`], [`EngineError::Timeout`] and [`EngineError::Lost`] are
//! failures;
//! [`EngineError::UnrecoverablePosition`] is the engine answering correctly about a client's position,
//! so it counts as a success. Calls admitted while closed that finish after the breaker opened do not
//! move it (it already decided).
//!
//! Where: [`Guarded`] wraps the three engine capabilities ([`Broker`], [`HistoryStore`],
//! [`PresenceManager`]) once, in [`Remote::guarded`], with one [`Breaker`] per shard of the engine
//! ([`Sharded`]): a call about a channel goes through the breaker of the shard that holds the channel,
//! control messages through the first shard's (they travel on it). Why per shard: shards are separate
//! Redis processes that fail separately; with one breaker for all, a dead shard's failures would open
//! it for every channel, and the healthy shards' channels would answer error 100 for the cool-down —
//! the outage of one shard would become the outage of all. With one `redis_url` there is one breaker,
//! as before sharding. All breakers share the one [`BreakerPolicy`] from the configuration. The memory
//! broker is in-process and infallible, so it has none. The engine's own background work (its PUB/SUB
//! connections' reconnects, presence refresh) is not guarded: it already backs off on its own.
//!
//! Metrics carry a `shard` label: the shard's index in `redis_url` ("0" with one instance), the name the
//! dashboard's engine panel gives each shard.
//!
//! The state machine ([`Breaker`]) is sans-IO: every transition takes `now`, so the unit tests drive it
//! with a manual clock. Its state sits behind one small mutex taken for a few instructions, never across
//! an engine call or `.await`; metrics are recorded after the lock is released.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ringcast_protocol::messages::{ClientInfo, Publication};

use super::{
    Broker, Control, EngineError, EngineFuture, EngineState, EngineStatus, HistoryStore, PresenceManager, Remote,
    Sharded, WaitLimit,
};
use crate::broker::{HistoryFilter, HistoryOptions, StreamPos};
use crate::pubsub::client::ClientId;

/// The label naming a breaker's shard (its index in `redis_url`) on the three series below.
pub const SHARD_LABEL: &str = "shard";
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
            Err(EngineError::Unavailable | EngineError::Timeout | EngineError::Lost) => Outcome::Failure,
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
    /// The shard it guards (index in `redis_url`).
    shard: usize,
    inner: Mutex<Inner>,
    /// This shard's series, registered once (see [`Breaker::report`]) so that recording one is an
    /// atomic operation, not a key built per call.
    handles: OnceLock<Handles>,
}

#[derive(Debug)]
struct Handles {
    state: metrics::Gauge,
    trips: metrics::Counter,
    rejected: metrics::Counter,
}

/// What a transition changed, for the metrics recorded after the lock is released.
struct Changed {
    state: Option<BreakerState>,
    tripped: bool,
}

impl Breaker {
    /// The breaker of shard `shard` (0 with one instance).
    pub fn new(policy: BreakerPolicy, shard: usize) -> Breaker {
        Breaker { policy, shard, inner: Mutex::new(Inner::Closed { failures: 0 }), handles: OnceLock::new() }
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// The shard it guards.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The metric handles, taken at the first use: that must come after the metrics recorder is
    /// installed (a handle taken before stays a no-op), which [`Breaker::report`] at start ensures.
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| {
            let shard = self.shard.to_string();
            Handles {
                state: metrics::gauge!(STATE_GAUGE, SHARD_LABEL => shard.clone()),
                trips: metrics::counter!(TRIPS_TOTAL, SHARD_LABEL => shard.clone()),
                rejected: metrics::counter!(REJECTED_TOTAL, SHARD_LABEL => shard),
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state now. An open breaker whose cool-down has passed reports open until a call arrives and
    /// becomes the probe.
    pub fn state(&self) -> BreakerState {
        self.lock().state()
    }

    /// Registers this shard's series and sets the state gauge (after the metrics recorder is installed,
    /// so that a scrape shows the state and both counters at 0 before the first transition).
    pub fn report(&self) {
        let handles = self.handles();
        handles.state.set(self.state().gauge());
        handles.trips.increment(0);
        handles.rejected.increment(0);
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
            self.handles().state.set(state.gauge());
        }
        if admit == Admit::Reject {
            self.handles().rejected.increment(1);
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
            self.handles().state.set(state.gauge());
            if state == BreakerState::Closed {
                tracing::info!(shard = self.shard, "engine circuit breaker closed: the probe succeeded");
            }
        }
        if changed.tripped {
            self.handles().trips.increment(1);
            tracing::warn!(
                shard = self.shard,
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

/// Why `GET /health` says degraded: the breakers that are not closed (naming each one's shard when
/// there are several); `None` while all are closed.
pub fn degraded(breakers: &[Breaker]) -> Option<String> {
    if let [one] = breakers {
        return match one.state() {
            BreakerState::Closed => None,
            state => Some(format!("engine circuit breaker {}", state.label())),
        };
    }
    let reasons: Vec<String> = breakers
        .iter()
        .filter_map(|b| {
            let state = b.state();
            (state != BreakerState::Closed)
                .then(|| format!("engine circuit breaker of shard {} {}", b.shard, state.label()))
        })
        .collect();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// A networked engine behind one [`Breaker`] per shard: the one place its calls are admitted and their
/// outcomes recorded.
pub struct Guarded<E> {
    engine: Arc<E>,
    /// One per shard, in shard order (never empty).
    breakers: Arc<[Breaker]>,
}

impl<E: Sharded> Guarded<E> {
    /// Runs `call` through the breaker of `shard` unless it rejects it (then `Unavailable`, and `call`
    /// never runs, so the engine is not touched). One extra small allocation per engine call (the
    /// wrapping future), beside the engine's own.
    fn guard<'a, T: Send + 'a>(
        &'a self,
        shard: usize,
        call: impl FnOnce() -> EngineFuture<'a, T>,
    ) -> EngineFuture<'a, T> {
        // One breaker per shard by construction; an engine naming a shard it does not have is not
        // guarded rather than failing a call the engine might answer.
        let Some(breaker) = self.breakers.get(shard) else { return call() };
        let admit = breaker.admit(Instant::now());
        if admit == Admit::Reject {
            return Box::pin(std::future::ready(Err(EngineError::Unavailable)));
        }
        let permit = Permit { breaker, admit, done: false };
        let fut = call();
        Box::pin(async move {
            let result = fut.await;
            permit.finish(&result);
            result
        })
    }

    /// [`Guarded::guard`] by the breaker of the shard that holds `channel`.
    fn on<'a, T: Send + 'a>(
        &'a self,
        channel: &str,
        call: impl FnOnce() -> EngineFuture<'a, T>,
    ) -> EngineFuture<'a, T> {
        self.guard(self.engine.shard_of(channel), call)
    }
}

impl<E: Sharded> Broker for Guarded<E> {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        self.on(channel, || self.engine.publish(channel, publication, history))
    }

    fn subscribe_node<'a>(&'a self, channel: &'a str, history: HistoryOptions) -> EngineFuture<'a, ()> {
        self.on(channel, || self.engine.subscribe_node(channel, history))
    }

    fn unsubscribe_node(&self, channel: &str) {
        // Batched by the engine and never waited for: nothing to fail fast.
        self.engine.unsubscribe_node(channel);
    }

    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        // Control messages travel on the first shard.
        self.guard(0, || self.engine.control(control))
    }

    fn barrier<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.on(channel, || self.engine.barrier(channel))
    }

    /// Each shard's status with its breaker's state; the worst of them as the engine's.
    fn status(&self) -> EngineStatus {
        let shards = self
            .engine
            .shard_statuses()
            .into_iter()
            .zip(self.breakers.iter())
            .map(|(mut status, breaker)| {
                let state = breaker.state();
                if state != BreakerState::Closed {
                    if status.state == EngineState::Up {
                        status.state = EngineState::Degraded;
                    }
                    status.detail.push_str("; circuit breaker ");
                    status.detail.push_str(state.label());
                }
                status
            })
            .collect();
        EngineStatus::of_shards(shards)
    }
}

impl<E: Sharded> HistoryStore for Guarded<E> {
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        self.on(channel, || self.engine.history(channel, filter, history))
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.on(channel, || self.engine.remove_history(channel))
    }
}

impl<E: Sharded> PresenceManager for Guarded<E> {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        self.on(channel, || self.engine.add_presence(channel, client, info))
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()> {
        self.on(channel, || self.engine.remove_presence(channel, client))
    }

    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        self.on(channel, || self.engine.presence(channel))
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        self.on(channel, || self.engine.presence_stats(channel))
    }
}

/// A node's engine made of capabilities from different engines (NATS publications with presence in
/// Redis), guarded as one shard: a node serves its clients through all of them together.
pub struct Parts {
    pub broker: Arc<dyn Broker>,
    pub history: Arc<dyn HistoryStore>,
    pub presence: Arc<dyn PresenceManager>,
}

impl Broker for Parts {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: &'a Publication,
        history: HistoryOptions,
    ) -> EngineFuture<'a, StreamPos> {
        self.broker.publish(channel, publication, history)
    }

    fn subscribe_node<'a>(&'a self, channel: &'a str, history: HistoryOptions) -> EngineFuture<'a, ()> {
        self.broker.subscribe_node(channel, history)
    }

    fn unsubscribe_node(&self, channel: &str) {
        self.broker.unsubscribe_node(channel)
    }

    fn control<'a>(&'a self, control: &'a Control) -> EngineFuture<'a, ()> {
        self.broker.control(control)
    }

    fn barrier<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.broker.barrier(channel)
    }

    fn status(&self) -> EngineStatus {
        self.broker.status()
    }
}

impl HistoryStore for Parts {
    fn history<'a>(
        &'a self,
        channel: &'a str,
        filter: &'a HistoryFilter,
        history: HistoryOptions,
    ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
        self.history.history(channel, filter, history)
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, ()> {
        self.history.remove_history(channel)
    }
}

impl PresenceManager for Parts {
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientId, info: &'a ClientInfo) -> EngineFuture<'a, ()> {
        self.presence.add_presence(channel, client, info)
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> EngineFuture<'a, ()> {
        self.presence.remove_presence(channel, client)
    }

    fn presence<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
        self.presence.presence(channel)
    }

    fn presence_stats<'a>(&'a self, channel: &'a str) -> EngineFuture<'a, (u32, u32)> {
        self.presence.presence_stats(channel)
    }
}

impl Sharded for Parts {
    fn shards(&self) -> usize {
        1
    }

    fn shard_of(&self, _channel: &str) -> usize {
        0
    }

    fn shard_statuses(&self) -> Vec<EngineStatus> {
        vec![self.broker.status()]
    }
}

impl Remote {
    /// The node's view of a networked engine: every capability through the breaker of the shard a call
    /// is about, one [`Breaker`] per shard, all with `policy`; `waiting` bounds the calls sessions wait
    /// on at once (`engine_max_waiting`).
    pub fn guarded<E: Sharded>(engine: Arc<E>, policy: BreakerPolicy, waiting: Arc<WaitLimit>) -> Remote {
        let breakers: Arc<[Breaker]> = (0..engine.shards().max(1)).map(|i| Breaker::new(policy, i)).collect();
        let guarded = Arc::new(Guarded { engine, breakers: breakers.clone() });
        Remote { broker: guarded.clone(), history: guarded.clone(), presence: guarded, breakers, waiting }
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

    /// A breaker that POLICY's failures opened at the returned instant.
    fn tripped() -> (Breaker, Instant) {
        let b = Breaker::new(POLICY, 0);
        let t0 = Instant::now();
        (0..POLICY.failures).for_each(|_| fail(&b, t0));
        (b, t0)
    }

    #[test]
    fn opens_after_n_consecutive_failures_and_a_success_resets_the_count() {
        let b = Breaker::new(POLICY, 0);
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
        let (b, t0) = tripped();
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
        let (b, t0) = tripped();
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(Admit::Probe, Outcome::Failure, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t1 + Duration::from_millis(4_999)), Admit::Reject);
        assert_eq!(b.admit(t1 + POLICY.cooldown), Admit::Probe);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let (b, t0) = tripped();
        let t1 = t0 + POLICY.cooldown;
        assert_eq!(b.admit(t1), Admit::Probe);
        b.record(Admit::Probe, Outcome::Abandoned, t1);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admit::Probe);
    }

    #[test]
    fn late_results_of_calls_admitted_while_closed_do_not_move_an_open_breaker() {
        let b = Breaker::new(POLICY, 0);
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
        assert_eq!(Outcome::of::<()>(&Err(EngineError::Lost)), Outcome::Failure);
        assert_eq!(Outcome::of::<()>(&Err(EngineError::Unavailable)), Outcome::Failure);
    }

    #[test]
    fn zero_failures_turns_the_breaker_off() {
        let b = Breaker::new(BreakerPolicy { failures: 0, cooldown: POLICY.cooldown }, 0);
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
        fn subscribe_node<'a>(&'a self, _: &'a str, _: HistoryOptions) -> EngineFuture<'a, ()> {
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

    impl Sharded for Down {
        fn shards(&self) -> usize {
            1
        }
        fn shard_of(&self, _: &str) -> usize {
            0
        }
        fn shard_statuses(&self) -> Vec<EngineStatus> {
            vec![self.status()]
        }
    }

    #[test]
    fn an_open_breaker_answers_without_calling_the_engine_and_is_shared_by_every_capability() {
        let engine = Arc::new(Down(Default::default()));
        let remote = Remote::guarded(engine.clone(), POLICY, Arc::new(WaitLimit::new(8)));
        for _ in 0..3 {
            assert_eq!(super::super::resolve(remote.presence.presence_stats("c")), Err(EngineError::Unavailable));
        }
        assert_eq!(remote.breakers.len(), 1, "one shard, one breaker");
        assert_eq!(remote.breakers[0].state(), BreakerState::Open);
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

    /// Two shards: channels starting with "b" live on shard 1, the others on shard 0; the shard `down`
    /// fails every call, the other answers. Counts the calls that reach each shard.
    struct Split {
        down: usize,
        calls: [std::sync::atomic::AtomicUsize; 2],
    }

    impl Split {
        fn new(down: usize) -> Arc<Split> {
            Arc::new(Split { down, calls: Default::default() })
        }

        fn on<'a, T: Send + Default + 'a>(&'a self, shard: usize) -> EngineFuture<'a, T> {
            self.calls[shard].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let result = if shard == self.down { Err(EngineError::Unavailable) } else { Ok(T::default()) };
            Box::pin(std::future::ready(result))
        }

        fn calls(&self, shard: usize) -> usize {
            self.calls[shard].load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl Broker for Split {
        fn publish<'a>(&'a self, c: &'a str, _: &'a Publication, _: HistoryOptions) -> EngineFuture<'a, StreamPos> {
            self.on(self.shard_of(c))
        }
        fn subscribe_node<'a>(&'a self, c: &'a str, _: HistoryOptions) -> EngineFuture<'a, ()> {
            self.on(self.shard_of(c))
        }
        fn unsubscribe_node(&self, _: &str) {}
        fn control<'a>(&'a self, _: &'a Control) -> EngineFuture<'a, ()> {
            self.on(0)
        }
        fn status(&self) -> EngineStatus {
            EngineStatus::of_shards(self.shard_statuses())
        }
    }

    impl HistoryStore for Split {
        fn history<'a>(
            &'a self,
            c: &'a str,
            _: &'a HistoryFilter,
            _: HistoryOptions,
        ) -> EngineFuture<'a, (Vec<Publication>, StreamPos)> {
            self.on(self.shard_of(c))
        }
        fn remove_history<'a>(&'a self, c: &'a str) -> EngineFuture<'a, ()> {
            self.on(self.shard_of(c))
        }
    }

    impl PresenceManager for Split {
        fn add_presence<'a>(&'a self, c: &'a str, _: ClientId, _: &'a ClientInfo) -> EngineFuture<'a, ()> {
            self.on(self.shard_of(c))
        }
        fn remove_presence<'a>(&'a self, c: &'a str, _: ClientId) -> EngineFuture<'a, ()> {
            self.on(self.shard_of(c))
        }
        fn presence<'a>(&'a self, c: &'a str) -> EngineFuture<'a, BTreeMap<String, ClientInfo>> {
            self.on(self.shard_of(c))
        }
        fn presence_stats<'a>(&'a self, c: &'a str) -> EngineFuture<'a, (u32, u32)> {
            self.on(self.shard_of(c))
        }
    }

    impl Sharded for Split {
        fn shards(&self) -> usize {
            2
        }
        fn shard_of(&self, channel: &str) -> usize {
            usize::from(channel.starts_with('b'))
        }
        fn shard_statuses(&self) -> Vec<EngineStatus> {
            (0..2)
                .map(|i| EngineStatus {
                    kind: "test",
                    state: if i == self.down { EngineState::Degraded } else { EngineState::Up },
                    detail: format!("instance {i}"),
                })
                .collect()
        }
    }

    fn control() -> Control {
        Control::Disconnect { user: "u".into(), client: None, code: 4000, reason: String::new() }
    }

    #[test]
    fn a_failing_shard_opens_only_its_own_breaker() {
        use super::super::resolve;
        let engine = Split::new(1);
        let remote = Remote::guarded(engine.clone(), POLICY, Arc::new(WaitLimit::new(8)));
        assert_eq!(remote.breakers.len(), 2, "one breaker per shard");
        assert_eq!(degraded(&remote.breakers), None);
        let publication = Publication::default();
        let opts = HistoryOptions::default();
        for _ in 0..3 {
            assert_eq!(resolve(remote.broker.publish("b1", &publication, opts)), Err(EngineError::Unavailable));
        }
        assert_eq!(remote.breakers[1].state(), BreakerState::Open);
        assert_eq!(remote.breakers[0].state(), BreakerState::Closed);
        // Shard 1's channels fail fast, without reaching it; shard 0's, and control, still reach theirs.
        assert_eq!(resolve(remote.presence.presence_stats("b2")), Err(EngineError::Unavailable));
        assert_eq!(engine.calls(1), 3, "only the three that opened it");
        for _ in 0..10 {
            assert!(resolve(remote.broker.publish("a1", &publication, opts)).is_ok());
            assert!(resolve(remote.history.remove_history("a2")).is_ok());
        }
        assert!(resolve(remote.broker.control(&control())).is_ok());
        assert_eq!(engine.calls(0), 21);
        assert_eq!(remote.breakers[0].state(), BreakerState::Closed);
        // /health names the shard; the dashboard shows the worst state and which shard's breaker is open.
        assert_eq!(degraded(&remote.breakers).as_deref(), Some("engine circuit breaker of shard 1 open"));
        let status = remote.broker.status();
        assert_eq!(status.state, EngineState::Degraded);
        assert_eq!(status.detail, "shard 0 up: instance 0; shard 1 degraded: instance 1; circuit breaker open");
    }

    #[test]
    fn control_goes_through_the_first_shards_breaker() {
        use super::super::resolve;
        let engine = Split::new(0);
        let remote = Remote::guarded(engine.clone(), POLICY, Arc::new(WaitLimit::new(8)));
        for _ in 0..3 {
            assert_eq!(resolve(remote.broker.control(&control())), Err(EngineError::Unavailable));
        }
        assert_eq!(remote.breakers[0].state(), BreakerState::Open);
        assert_eq!(
            resolve(remote.broker.publish("a", &Publication::default(), HistoryOptions::default())),
            Err(EngineError::Unavailable)
        );
        assert_eq!(engine.calls(0), 3, "shard 0's channel failed fast after control opened its breaker");
        assert!(resolve(remote.broker.subscribe_node("b", HistoryOptions::default())).is_ok(), "shard 1 untouched");
        assert_eq!(remote.breakers[1].state(), BreakerState::Closed);
    }

    #[test]
    fn one_shard_reports_as_before_sharding() {
        let b = [Breaker::new(POLICY, 0)];
        let t0 = Instant::now();
        (0..3).for_each(|_| fail(&b[0], t0));
        assert_eq!(degraded(&b).as_deref(), Some("engine circuit breaker open"));
        assert_eq!(b[0].admit(t0 + POLICY.cooldown), Admit::Probe);
        assert_eq!(degraded(&b).as_deref(), Some("engine circuit breaker half-open"));
    }
}
