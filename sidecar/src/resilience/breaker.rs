//! Circuit breakers: closed, open for a growing time after failures accrue, half-open with a bounded number of
//! probes, closed again on a probe's success.
//!
//! Failures accrue two ways, each optional: failures in a row, and the failure share over a sliding window
//! ([`Window`]: outcomes counted in [`BUCKETS`] time buckets, so the share is over the last `window` give or
//! take a tenth of it, judged once the window holds `min_requests`).
//!
//! No lock: the request path reads one atomic word, the [`Gate`] (state, probes taken, end of the open
//! time), and records an outcome with atomic counters. Every transition is a compare-and-swap of the gate, so
//! exactly one request makes each one and reports it ([`super::monitor::Hub::transition`]). The threshold is
//! judged by the request whose failure reaches it, which flips the gate at once: requests that other workers
//! admit between that failure being counted and the swap (a few instructions) still pass, a window the
//! contention bench measures. The monitor actor owns the open timer (it moves the gate to half-open when the
//! time is up); a request that finds an expired open gate moves it itself, so a lost message or an injected
//! clock never strands a breaker open. Time comes from the sidecar's [`Clock`].
//!
//! failsafe's `StateMachine` was not used: its half-open state admits every call, it cannot say how long it
//! stays open (which `Retry-After` needs), and it cannot tell a probe's result from a straggler's. Its
//! success-rate accrual was an exponentially weighted average, which a first failure biased for a whole
//! window: it is not "the failure share over the window" that the policy promises.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::buckets::{BUCKETS, Buckets};
use super::monitor::{Scope, Transition};
use crate::clock::Clock;
use crate::policy::traffic::{BreakerPolicy, FailureRate};

/// A breaker's state, as metrics and the admin state show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }

    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        }
    }
}

/// The breaker's state in one word: bits 0–1 the state, bits 2–21 the probes taken while half-open, bits
/// 22–63 the end of the open time in milliseconds since the breaker's epoch (rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate(u64);

const STATE_BITS: u64 = 0b11;
const PROBE_SHIFT: u32 = 2;
/// Probes taken are counted in 20 bits: `half_open_probes` above this is this.
const MAX_PROBES: u64 = (1 << 20) - 1;
const UNTIL_SHIFT: u32 = 22;

impl Gate {
    const CLOSED: Gate = Gate(0);

    fn open(until_ms: u64) -> Self {
        Gate(until_ms << UNTIL_SHIFT | 1)
    }

    fn half_open(probes: u64) -> Self {
        Gate(probes.min(MAX_PROBES) << PROBE_SHIFT | 2)
    }

    fn state(self) -> State {
        match self.0 & STATE_BITS {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn probes(self) -> u64 {
        (self.0 >> PROBE_SHIFT) & MAX_PROBES
    }

    fn until_ms(self) -> u64 {
        self.0 >> UNTIL_SHIFT
    }
}

/// One breaker: a service's, an external authority's, or one endpoint's.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    /// For endpoint breakers: the service's cap on endpoints ejected at once.
    ejections: Option<Arc<Ejections>>,
    gate: AtomicU64,
    /// Failures in a row while closed.
    consecutive: AtomicU32,
    window: Option<Window>,
    /// The last open time in milliseconds, doubled when a probe fails.
    last_open_ms: AtomicU64,
    clock: Clock,
    /// The clock's reading when the breaker was made: the gate's and the window's times count from it.
    epoch: Instant,
    scope: Scope,
}

/// What the breaker said to one request.
#[derive(Debug)]
pub enum Admit {
    /// Closed: go ahead.
    Pass(Ticket),
    /// Open: refused; half-open is this far away.
    Refuse(Duration),
}

/// Admission to a breaker: report the outcome with [`Ticket::record`]. A probe dropped without a result (the
/// app went away) frees its slot, so a breaker can never stay half-open with no probe left to send.
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl Ticket {
    pub fn record(mut self, failed: bool) {
        self.done = true;
        self.breaker.record(self.probe, failed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.release_probe();
        }
    }
}

/// How many of a service's endpoints may be ejected at once, and how many are.
#[derive(Debug)]
pub struct Ejections {
    share: f64,
    limit: AtomicUsize,
    ejected: AtomicUsize,
}

impl Ejections {
    /// `share` of `endpoints`, but at least one (as Envoy's `max_ejection_percent`).
    pub fn new(share: f64, endpoints: usize) -> Arc<Self> {
        let e = Self {
            share,
            limit: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
        };
        e.resize(endpoints);
        Arc::new(e)
    }

    /// The service's endpoint count changed (discovery).
    pub fn resize(&self, endpoints: usize) {
        let limit = ((self.share * endpoints as f64).floor() as usize).max(1);
        self.limit.store(limit, Ordering::Release);
    }

    fn try_take(&self) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Relaxed)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Breaker {
    pub fn new(policy: BreakerPolicy, scope: Scope) -> Arc<Self> {
        Self::with_ejections(policy, scope, None)
    }

    /// An endpoint's breaker, opening only while the service's ejection cap allows.
    pub fn with_ejections(
        policy: BreakerPolicy,
        scope: Scope,
        ejections: Option<Arc<Ejections>>,
    ) -> Arc<Self> {
        let clock = scope.hub.clock.clone();
        Arc::new(Self {
            policy,
            ejections,
            gate: AtomicU64::new(Gate::CLOSED.0),
            consecutive: AtomicU32::new(0),
            window: policy.failure_rate.map(Window::new),
            last_open_ms: AtomicU64::new(millis(policy.open_base)),
            epoch: clock.now(),
            clock,
            scope,
        })
    }

    fn gate(&self) -> Gate {
        Gate(self.gate.load(Ordering::Acquire))
    }

    /// Swaps the gate from `from` to `to`; false when another request changed it first.
    fn swap(&self, from: Gate, to: Gate) -> bool {
        self.gate
            .compare_exchange(from.0, to.0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Time since the epoch in nanoseconds.
    fn elapsed_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn until(&self, gate: Gate) -> Instant {
        self.epoch + Duration::from_millis(gate.until_ms())
    }

    /// Asks to send one request.
    pub fn admit(self: &Arc<Self>) -> Admit {
        let gate = self.gate();
        if gate == Gate::CLOSED {
            return Admit::Pass(self.ticket(false));
        }
        self.admit_slow(gate)
    }

    fn admit_slow(self: &Arc<Self>, mut gate: Gate) -> Admit {
        loop {
            match gate.state() {
                State::Closed => return Admit::Pass(self.ticket(false)),
                State::Open => {
                    let (until, now) = (self.until(gate), self.clock.now());
                    if now < until {
                        return Admit::Refuse(until - now);
                    }
                    if self.swap(gate, Gate::half_open(1)) {
                        self.report(State::HalfOpen);
                        return Admit::Pass(self.ticket(true));
                    }
                }
                State::HalfOpen => {
                    let probes = gate.probes();
                    if probes >= u64::from(self.policy.half_open_probes).min(MAX_PROBES) {
                        // Every probe slot is taken: the answer comes within one request's time.
                        return Admit::Refuse(Duration::from_secs(1));
                    }
                    if self.swap(gate, Gate::half_open(probes + 1)) {
                        return Admit::Pass(self.ticket(true));
                    }
                }
            }
            gate = self.gate();
        }
    }

    /// The monitor's open timer: an open gate whose time is up becomes half-open with no probe taken. True
    /// when it did; false when the time is not up (by the breaker's clock) or a request moved it already.
    pub fn half_open_if_due(&self) -> bool {
        let gate = self.gate();
        if gate.state() != State::Open || self.clock.now() < self.until(gate) {
            return false;
        }
        self.swap(gate, Gate::half_open(0))
    }

    /// How long an open breaker stays open from now (zero when it is not open, or its time is up).
    pub fn remaining_open(&self) -> Duration {
        let gate = self.gate();
        match gate.state() {
            State::Open => self.until(gate).saturating_duration_since(self.clock.now()),
            _ => Duration::ZERO,
        }
    }

    /// True when a request would be admitted now (without taking a probe slot): for choosing an endpoint.
    pub fn is_available(&self) -> bool {
        let gate = self.gate();
        match gate.state() {
            State::Closed => true,
            State::Open => self.clock.now() >= self.until(gate),
            State::HalfOpen => {
                gate.probes() < u64::from(self.policy.half_open_probes).min(MAX_PROBES)
            }
        }
    }

    pub fn state(&self) -> State {
        self.gate().state()
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    fn ticket(self: &Arc<Self>, probe: bool) -> Ticket {
        Ticket {
            breaker: self.clone(),
            probe,
            done: false,
        }
    }

    fn record(self: &Arc<Self>, probe: bool, failed: bool) {
        let gate = self.gate();
        match (gate.state(), probe, failed) {
            (State::Closed, _, false) => {
                // Stores only when there is something to reset: successes in a row write nothing shared.
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                if let Some(w) = &self.window {
                    w.record(false, self.elapsed_ns(self.clock.now()));
                }
            }
            (State::Closed, _, true) => {
                let now = self.clock.now();
                let in_a_row = self
                    .consecutive
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                let in_a_row = self.policy.consecutive_failures > 0
                    && in_a_row >= self.policy.consecutive_failures;
                let by_rate = self.window.as_ref().is_some_and(|w| {
                    w.record(true, self.elapsed_ns(now));
                    w.tripped(self.elapsed_ns(now))
                });
                if in_a_row || by_rate {
                    self.trip(gate, now);
                }
            }
            (State::HalfOpen, true, false) => {
                if self.swap(gate, Gate::CLOSED) {
                    if let Some(e) = &self.ejections {
                        e.give_back();
                    }
                    self.clear();
                    self.last_open_ms
                        .store(millis(self.policy.open_base), Ordering::Relaxed);
                    self.report(State::Closed);
                }
            }
            (State::HalfOpen, true, true) => {
                let doubled = self.last_open_ms.load(Ordering::Relaxed).saturating_mul(2);
                let now = self.clock.now();
                let open = self.open_gate(doubled, now);
                if self.swap(gate, open) {
                    self.clear();
                    self.report(State::Open);
                }
            }
            // A request admitted before the breaker tripped: its result says nothing about the probe.
            (State::Open | State::HalfOpen, false, _) => {}
            // A probe whose breaker was reset meanwhile.
            (State::Open, true, _) => {}
        }
    }

    /// Closed to open, when the ejection cap allows. Past the cap the endpoint stays in rotation: better a
    /// failing endpoint than too few to carry the load. Its count stays, so its next failure asks again.
    fn trip(self: &Arc<Self>, closed: Gate, now: Instant) {
        if closed != Gate::CLOSED {
            return;
        }
        if let Some(e) = &self.ejections
            && !e.try_take()
        {
            return;
        }
        let open = self.open_gate(millis(self.policy.open_base), now);
        if self.swap(Gate::CLOSED, open) {
            self.clear();
            self.report(State::Open);
        } else if let Some(e) = &self.ejections {
            // Another request tripped it first, and holds the ejection.
            e.give_back();
        }
    }

    /// An open gate for `open_ms` (within the policy's bounds) from `now`, remembering the time for the next.
    fn open_gate(&self, open_ms: u64, now: Instant) -> Gate {
        let open_ms = open_ms.clamp(millis(self.policy.open_base), millis(self.policy.open_max));
        self.last_open_ms.store(open_ms, Ordering::Relaxed);
        let now_ms = self.elapsed_ns(now).div_ceil(1_000_000);
        Gate::open(now_ms.saturating_add(open_ms))
    }

    /// Forgets the outcomes counted so far: a new closed period starts from nothing.
    fn clear(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(w) = &self.window {
            w.clear(self.elapsed_ns(self.clock.now()));
        }
    }

    fn report(self: &Arc<Self>, to: State) {
        self.scope.hub.transition(Transition {
            scope: self.scope.clone(),
            to,
            breaker: Arc::downgrade(self),
        });
    }

    /// Back to closed with nothing counted, giving back the ejection it held. For an endpoint that left the
    /// service, or that became its only endpoint (ejection needs somewhere else to go). True when it was not
    /// closed.
    pub fn reset(&self) -> bool {
        let was = Gate(self.gate.swap(Gate::CLOSED.0, Ordering::AcqRel));
        let was_closed = was == Gate::CLOSED;
        if !was_closed && let Some(e) = &self.ejections {
            e.give_back();
        }
        self.clear();
        self.last_open_ms
            .store(millis(self.policy.open_base), Ordering::Relaxed);
        !was_closed
    }

    /// The endpoint left the service (discovery): an ejection it held no longer counts. Requests still in
    /// flight to it record into a closed breaker, so nothing is given back twice.
    pub fn forget(&self) {
        self.reset();
    }

    /// An endpoint that is now its service's only one is readmitted at once, and says so.
    pub fn readmit(self: &Arc<Self>) {
        if self.reset() {
            self.report(State::Closed);
        }
    }

    fn release_probe(&self) {
        let mut gate = self.gate();
        while gate.state() == State::HalfOpen && gate.probes() > 0 {
            if self.swap(gate, Gate::half_open(gate.probes() - 1)) {
                return;
            }
            gate = self.gate();
        }
    }
}

/// Outcomes over the last `window`, counted in [`BUCKETS`] lock-free buckets of a tenth of it each
/// ([`super::buckets`]).
#[derive(Debug)]
struct Window {
    /// The threshold in millionths, so that the share is compared exactly (0.55 × 20 is not 11 in floats).
    threshold_ppm: u64,
    min_requests: u64,
    bucket_ns: u64,
    requests: Buckets,
    failures: Buckets,
}

impl Window {
    fn new(rate: FailureRate) -> Self {
        let bucket = (rate.window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            threshold_ppm: (rate.threshold * 1e6).round() as u64,
            min_requests: u64::from(rate.min_requests),
            bucket_ns: u64::try_from(bucket.as_nanos()).unwrap_or(u64::MAX),
            requests: Buckets::default(),
            failures: Buckets::default(),
        }
    }

    /// The bucket number of a time (nanoseconds since the epoch), wrapping at 32 bits.
    fn bucket(&self, elapsed_ns: u64) -> u32 {
        (elapsed_ns / self.bucket_ns) as u32
    }

    fn record(&self, failed: bool, elapsed_ns: u64) {
        let at = self.bucket(elapsed_ns);
        self.requests.add(at);
        if failed {
            self.failures.add(at);
        }
    }

    fn counts(&self, elapsed_ns: u64) -> (u64, u64) {
        let at = self.bucket(elapsed_ns);
        (self.requests.sum(at), self.failures.sum(at))
    }

    /// True when the window holds at least `min_requests` outcomes and the failure share reaches the
    /// threshold.
    fn tripped(&self, elapsed_ns: u64) -> bool {
        let (requests, failures) = self.counts(elapsed_ns);
        requests > 0
            && requests >= self.min_requests
            && failures * 1_000_000 >= self.threshold_ppm * requests
    }

    /// Empties every bucket.
    fn clear(&self, elapsed_ns: u64) {
        let at = self.bucket(elapsed_ns);
        self.requests.clear(at);
        self.failures.clear(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(consecutive: u32, probes: u32, rate: Option<FailureRate>) -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: consecutive,
            failure_rate: rate,
            open_base: 40 * MS,
            open_max: 100 * MS,
            half_open_probes: probes,
            max_ejected: None,
        }
    }

    /// A scope on a manual clock of its own: the tests move time with [`admit_at`] and [`record_at`].
    fn scope() -> Scope {
        Scope::detached().with_clock(Clock::manual())
    }

    fn breaker(consecutive: u32, probes: u32) -> Arc<Breaker> {
        Breaker::new(policy(consecutive, probes, None), scope())
    }

    /// Moves the breaker's clock to `now` (never back).
    fn set(b: &Breaker, now: Instant) {
        let at = b.clock.now();
        b.clock.advance(now.saturating_duration_since(at));
    }

    fn admit_at(b: &Arc<Breaker>, now: Instant) -> Admit {
        set(b, now);
        b.admit()
    }

    fn record_at(t: Ticket, failed: bool, now: Instant) {
        set(&t.breaker, now);
        t.record(failed);
    }

    /// A breaker on the failure rate alone: `threshold` over a 10 s window, at least `min_requests`.
    fn by_rate(threshold: f64, min_requests: u32) -> Arc<Breaker> {
        let rate = FailureRate {
            threshold,
            min_requests,
            window: Duration::from_secs(10),
        };
        Breaker::new(policy(0, 1, Some(rate)), scope())
    }

    fn pass_at(b: &Arc<Breaker>, now: Instant) -> Ticket {
        match admit_at(b, now) {
            Admit::Pass(t) => t,
            Admit::Refuse(d) => panic!("refused for {d:?}"),
        }
    }

    fn pass(b: &Arc<Breaker>) -> Ticket {
        pass_at(b, b.clock.now())
    }

    /// Records `outcomes` (true: failed) one every `every` from `start`; the time of the outcome that opened
    /// the breaker, if one did.
    fn feed(
        b: &Arc<Breaker>,
        start: Instant,
        every: Duration,
        outcomes: impl IntoIterator<Item = bool>,
    ) -> Option<Duration> {
        for (i, failed) in outcomes.into_iter().enumerate() {
            let now = start + every * i as u32;
            record_at(pass_at(b, now), failed, now);
            if b.state() == State::Open {
                return Some(now - start);
            }
        }
        None
    }

    /// `n` outcomes of which `failures` fail, spread evenly (Bresenham), the first one failing.
    fn spread(n: usize, failures: usize) -> impl Iterator<Item = bool> {
        (0..n).map(move |i| (i * failures) % n < failures)
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = breaker(3, 1);
        pass(&b).record(true);
        pass(&b).record(true);
        pass(&b).record(false);
        pass(&b).record(true);
        pass(&b).record(true);
        assert_eq!(b.state(), State::Closed);
        pass(&b).record(true);
        assert_eq!(b.state(), State::Open);
        assert!(matches!(b.admit(), Admit::Refuse(d) if d <= 40 * MS));
    }

    #[test]
    fn half_open_admits_only_the_probes_and_their_result_decides() {
        let b = breaker(1, 2);
        let t0 = b.clock.now();
        record_at(pass_at(&b, t0), true, t0);
        assert!(matches!(admit_at(&b, t0 + 39 * MS), Admit::Refuse(d) if d == MS));
        let t1 = t0 + 45 * MS;
        let p1 = pass_at(&b, t1);
        let p2 = pass_at(&b, t1);
        assert!(matches!(admit_at(&b, t1), Admit::Refuse(_)));
        assert_eq!(b.state(), State::HalfOpen);
        // A probe whose request was abandoned frees its slot.
        drop(p2);
        let p3 = pass_at(&b, t1);
        record_at(p1, true, t1);
        assert_eq!(b.state(), State::Open);
        // The second trip without a success in between stays open twice as long (80 ms).
        assert!(matches!(admit_at(&b, t1 + 79 * MS), Admit::Refuse(d) if d == MS));
        drop(p3);
        let t2 = t1 + 80 * MS;
        record_at(pass_at(&b, t2), true, t2);
        // Doubled again, up to the cap of 100 ms.
        assert!(matches!(admit_at(&b, t2 + 99 * MS), Admit::Refuse(d) if d == MS));
        let t3 = t2 + 100 * MS;
        record_at(pass_at(&b, t3), false, t3);
        assert_eq!(b.state(), State::Closed);
        // Closed by a success: the next trip starts from the base again.
        record_at(pass_at(&b, t3), true, t3);
        assert!(matches!(admit_at(&b, t3), Admit::Refuse(d) if d == 40 * MS));
    }

    #[test]
    fn a_failure_share_under_the_threshold_does_not_open_even_when_the_first_request_failed() {
        // The case: threshold 50 %, 41 % failures, the first one a failure (an exponentially
        // weighted average opened here).
        let b = by_rate(0.5, 20);
        let opened = feed(&b, b.clock.now(), 50 * MS, spread(400, 164));
        assert_eq!(opened, None, "41 % opened a 50 % breaker");
        // Failures first, then enough successes to bring the share under the threshold before the minimum.
        let b = by_rate(0.5, 20);
        let outcomes = [true; 9].into_iter().chain([false; 391]);
        assert_eq!(feed(&b, b.clock.now(), 50 * MS, outcomes), None);
    }

    #[test]
    fn a_failure_share_over_the_threshold_opens_within_one_window() {
        // The other case: 55 % did not open within two windows.
        let b = by_rate(0.5, 20);
        // 20 requests per second: the minimum is reached after one second, well within the 10 s window.
        let opened = feed(&b, b.clock.now(), 50 * MS, spread(400, 220));
        let at = opened.expect("55 % never opened a 50 % breaker");
        assert!(at < Duration::from_secs(2), "opened after {at:?}");
        // Exactly the threshold opens too (it is reached, as the policy says).
        let b = by_rate(0.5, 20);
        let alternating = (0..20).map(|i| i % 2 == 1);
        assert!(feed(&b, b.clock.now(), 50 * MS, alternating).is_some());
        // A share that is only reached after it has been lower: the old outcomes still count.
        let b = by_rate(0.5, 20);
        let outcomes = [false; 40].into_iter().chain([true; 40]);
        let at = feed(&b, b.clock.now(), 50 * MS, outcomes).expect("opened");
        assert_eq!(
            at,
            79 * 50 * MS,
            "opened at the 40th failure of 80 outcomes"
        );
    }

    #[test]
    fn the_failure_rate_waits_for_min_requests_in_the_window() {
        let b = by_rate(0.5, 20);
        let t0 = b.clock.now();
        // 19 failures are not enough, however bad the share.
        assert_eq!(feed(&b, t0, 100 * MS, [true; 19]), None);
        // Once they have left the window (10 s later) they no longer count: 19 more still do not open it.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(feed(&b, later, 100 * MS, [true; 19]), None);
        // The 20th within the window does.
        let last = later + 19 * 100 * MS;
        record_at(pass_at(&b, last), true, last);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn outcomes_leave_the_window_bucket_by_bucket() {
        let rate = FailureRate {
            threshold: 0.5,
            min_requests: 1,
            window: Duration::from_secs(10),
        };
        let w = Window::new(rate);
        let s = |secs: u64| secs * 1_000_000_000;
        for t in 0..10 {
            w.record(t % 2 == 0, s(t));
        }
        assert_eq!(w.counts(s(9)), (10, 5));
        assert_eq!(w.counts(s(13)), (6, 3));
        assert_eq!(w.counts(s(60)), (0, 0));
        // A bucket reused a window later starts afresh.
        w.record(true, s(20));
        assert_eq!(w.counts(s(20)), (1, 1));
        w.clear(s(20));
        assert_eq!(w.counts(s(20)), (0, 0));
    }

    #[test]
    fn a_trip_refused_by_the_ejection_cap_is_asked_again_on_the_next_failure() {
        let ejections = Ejections::new(0.5, 2);
        let p = policy(2, 1, None);
        let a = Breaker::with_ejections(p, scope(), Some(ejections.clone()));
        let b = Breaker::with_ejections(p, scope(), Some(ejections.clone()));
        for _ in 0..2 {
            pass(&a).record(true);
            pass(&b).record(true);
        }
        assert_eq!((a.state(), b.state()), (State::Open, State::Closed));
        assert_eq!(ejections.ejected(), 1);
        // `a` leaves the service: its ejection is given back, and `b`'s next failure ejects it.
        a.forget();
        pass(&b).record(true);
        assert_eq!(b.state(), State::Open);
        assert_eq!(ejections.ejected(), 1);
        b.readmit();
        assert_eq!((b.state(), ejections.ejected()), (State::Closed, 0));
    }

    #[test]
    fn two_threads_failing_at_once_pass_at_most_one_extra_request_each_before_the_gate_shuts() {
        // Each thread has one request in flight at a time: besides the threshold's five, a thread may have
        // been admitted before the fifth failure was counted (in flight) or between that count and the
        // gate's swap (the slip). Neither can happen twice: a thread's own next failure reaches the count.
        for _ in 0..500 {
            let b = Breaker::new(
                BreakerPolicy {
                    open_base: Duration::from_secs(60),
                    open_max: Duration::from_secs(60),
                    ..policy(5, 1, None)
                },
                Scope::detached(),
            );
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let passed: u32 = std::thread::scope(|s| {
                let threads: Vec<_> = (0..2)
                    .map(|_| {
                        let (b, barrier) = (b.clone(), barrier.clone());
                        s.spawn(move || {
                            barrier.wait();
                            let mut passed = 0;
                            while let Admit::Pass(ticket) = b.admit() {
                                passed += 1;
                                ticket.record(true);
                            }
                            passed
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).sum()
            });
            assert!((5..=7).contains(&passed), "{passed} requests passed");
            assert_eq!(b.state(), State::Open);
        }
    }
}
