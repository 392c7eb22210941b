//! Circuit breakers: closed, open for a growing time after failures accrue, half-open with a bounded number of
//! probes, closed again on a probe's success.
//!
//! Failures accrue two ways, each optional: failures in a row, and the failure share over a sliding window
//! ([`Window`]: outcomes counted in [`BUCKETS`] time buckets, judged once the window holds `min_requests`).
//! The state machine takes `now` as an argument so that it is tested without sleeping; the request path
//! passes the clock. While closed, admission is one atomic read and recording an outcome one short
//! uncontended lock.
//!
//! failsafe's `StateMachine` was not used: its half-open state admits every call, it cannot say how long it
//! stays open (which `Retry-After` needs), and it cannot tell a probe's result from a straggler's. Its
//! success-rate accrual was an exponentially weighted average, which a first failure biased for a whole
//! window: it is not "the failure share over the window" that the policy promises.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::monitor::{self, Scope};
use crate::policy::traffic::{BreakerPolicy, FailureRate};

/// The failure-rate window is kept as this many buckets; the oldest expires as time moves on, so the share
/// is over the last `window` give or take one bucket (a tenth).
pub const BUCKETS: usize = 10;

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

/// One breaker: a service's, an external authority's, or one endpoint's.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    /// For endpoint breakers: the service's cap on endpoints ejected at once.
    ejections: Option<Arc<Ejections>>,
    /// False while closed: the request path admits with one atomic load.
    tripped: AtomicBool,
    shared: Mutex<Shared>,
    scope: Scope,
}

#[derive(Debug)]
struct Shared {
    state: Phase,
    /// Failures in a row while closed.
    consecutive: u32,
    window: Option<Window>,
    /// The last open duration, doubled when a probe fails.
    last_open: Duration,
}

impl Shared {
    /// Forgets the outcomes counted so far: a new closed period starts from nothing.
    fn clear(&mut self) {
        self.consecutive = 0;
        if let Some(w) = &mut self.window {
            w.clear();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probes: u32 },
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
    pub fn record(self, failed: bool) {
        self.record_at(failed, Instant::now());
    }

    fn record_at(mut self, failed: bool, now: Instant) {
        self.done = true;
        self.breaker.record(self.probe, failed, now);
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
        let now = Instant::now();
        Arc::new(Self {
            policy,
            ejections,
            tripped: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                state: Phase::Closed,
                consecutive: 0,
                window: policy.failure_rate.map(|rate| Window::new(rate, now)),
                last_open: policy.open_base,
            }),
            scope,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the state half-updated in a way that matters more than
        // refusing all traffic would: keep going with what is there.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks to send one request.
    pub fn admit(self: &Arc<Self>) -> Admit {
        if !self.tripped.load(Ordering::Acquire) {
            return Admit::Pass(self.ticket(false));
        }
        self.admit_at(Instant::now())
    }

    fn admit_at(self: &Arc<Self>, now: Instant) -> Admit {
        let mut shared = self.lock();
        match shared.state {
            Phase::Closed => Admit::Pass(self.ticket(false)),
            Phase::Open { until } if now < until => Admit::Refuse(until - now),
            Phase::Open { .. } => {
                shared.state = Phase::HalfOpen { probes: 1 };
                drop(shared);
                monitor::transition(&self.scope, State::HalfOpen);
                Admit::Pass(self.ticket(true))
            }
            Phase::HalfOpen { probes } if probes < self.policy.half_open_probes => {
                shared.state = Phase::HalfOpen { probes: probes + 1 };
                Admit::Pass(self.ticket(true))
            }
            // Every probe slot is taken: the answer comes within one request's time.
            Phase::HalfOpen { .. } => Admit::Refuse(Duration::from_secs(1)),
        }
    }

    /// True when a request would be admitted now (without taking a probe slot): for choosing an endpoint.
    pub fn is_available(&self) -> bool {
        if !self.tripped.load(Ordering::Acquire) {
            return true;
        }
        match self.lock().state {
            Phase::Closed => true,
            Phase::Open { until } => Instant::now() >= until,
            Phase::HalfOpen { probes } => probes < self.policy.half_open_probes,
        }
    }

    /// How long until the breaker would admit again (zero when it would now).
    pub fn remaining_open(&self) -> Duration {
        match self.lock().state {
            Phase::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    pub fn state(&self) -> State {
        match self.lock().state {
            Phase::Closed => State::Closed,
            Phase::Open { .. } => State::Open,
            Phase::HalfOpen { .. } => State::HalfOpen,
        }
    }

    fn ticket(self: &Arc<Self>, probe: bool) -> Ticket {
        Ticket {
            breaker: self.clone(),
            probe,
            done: false,
        }
    }

    fn record(&self, probe: bool, failed: bool, now: Instant) {
        let mut shared = self.lock();
        let transition = match (shared.state, probe, failed) {
            (Phase::Closed, _, false) => {
                shared.consecutive = 0;
                if let Some(w) = &mut shared.window {
                    w.record(false, now);
                }
                None
            }
            (Phase::Closed, _, true) => {
                shared.consecutive = shared.consecutive.saturating_add(1);
                let in_a_row = self.policy.consecutive_failures > 0
                    && shared.consecutive >= self.policy.consecutive_failures;
                let by_rate = shared.window.as_mut().is_some_and(|w| {
                    w.record(true, now);
                    w.tripped()
                });
                // Past the ejection cap the endpoint stays in rotation: better a failing endpoint than too
                // few to carry the load. Its count stays, so its next failure asks again.
                ((in_a_row || by_rate) && self.ejections.as_ref().is_none_or(|e| e.try_take()))
                    .then(|| {
                        self.open(&mut shared, self.policy.open_base, now);
                        State::Open
                    })
            }
            (Phase::HalfOpen { .. }, true, false) => {
                if let Some(e) = &self.ejections {
                    e.give_back();
                }
                shared.clear();
                shared.last_open = self.policy.open_base;
                shared.state = Phase::Closed;
                self.tripped.store(false, Ordering::Release);
                Some(State::Closed)
            }
            (Phase::HalfOpen { .. }, true, true) => {
                let doubled = shared.last_open.saturating_mul(2);
                self.open(&mut shared, doubled, now);
                Some(State::Open)
            }
            // A request admitted before the breaker tripped: its result says nothing about the probe.
            (Phase::Open { .. } | Phase::HalfOpen { .. }, false, _) => None,
            // A probe whose breaker was reset meanwhile.
            (Phase::Open { .. }, true, _) => None,
        };
        drop(shared);
        if let Some(state) = transition {
            monitor::transition(&self.scope, state);
        }
    }

    fn open(&self, shared: &mut Shared, open: Duration, now: Instant) {
        let open = open.clamp(self.policy.open_base, self.policy.open_max);
        shared.last_open = open;
        shared.clear();
        shared.state = Phase::Open { until: now + open };
        self.tripped.store(true, Ordering::Release);
    }

    /// Back to closed with nothing counted, giving back the ejection it held. For an endpoint that left the
    /// service, or that became its only endpoint (ejection needs somewhere else to go). True when it was not
    /// closed.
    pub fn reset(&self) -> bool {
        let mut shared = self.lock();
        let was_closed = matches!(shared.state, Phase::Closed);
        if !was_closed && let Some(e) = &self.ejections {
            e.give_back();
        }
        shared.clear();
        shared.last_open = self.policy.open_base;
        shared.state = Phase::Closed;
        self.tripped.store(false, Ordering::Release);
        !was_closed
    }

    /// The endpoint left the service (discovery): an ejection it held no longer counts. Requests still in
    /// flight to it record into a closed breaker, so nothing is given back twice.
    pub fn forget(&self) {
        self.reset();
    }

    /// An endpoint that is now its service's only one is readmitted at once, and says so.
    pub fn readmit(&self) {
        if self.reset() {
            monitor::transition(&self.scope, State::Closed);
        }
    }

    fn release_probe(&self) {
        let mut shared = self.lock();
        if let Phase::HalfOpen { probes } = shared.state {
            shared.state = Phase::HalfOpen {
                probes: probes.saturating_sub(1),
            };
        }
    }
}

/// Outcomes over the last `window`, counted in [`BUCKETS`] buckets of a tenth of it each.
#[derive(Debug)]
struct Window {
    /// The threshold in millionths, so that the share is compared exactly (0.55 × 20 is not 11 in floats).
    threshold_ppm: u64,
    min_requests: u64,
    bucket: Duration,
    start: Instant,
    /// The bucket number (since `start`) that `requests[current % BUCKETS]` counts.
    current: u64,
    requests: [u32; BUCKETS],
    failures: [u32; BUCKETS],
}

impl Window {
    fn new(rate: FailureRate, now: Instant) -> Self {
        Self {
            threshold_ppm: (rate.threshold * 1e6).round() as u64,
            min_requests: u64::from(rate.min_requests),
            bucket: (rate.window / BUCKETS as u32).max(Duration::from_millis(1)),
            start: now,
            current: 0,
            requests: [0; BUCKETS],
            failures: [0; BUCKETS],
        }
    }

    /// Moves to the bucket of `now`, emptying those that fell out of the window.
    fn advance(&mut self, now: Instant) {
        let at =
            (now.saturating_duration_since(self.start).as_nanos() / self.bucket.as_nanos()) as u64;
        if at <= self.current {
            return;
        }
        let stale = (at - self.current).min(BUCKETS as u64);
        for i in 0..stale {
            let index = ((at - i) % BUCKETS as u64) as usize;
            self.requests[index] = 0;
            self.failures[index] = 0;
        }
        self.current = at;
    }

    fn record(&mut self, failed: bool, now: Instant) {
        self.advance(now);
        let i = (self.current % BUCKETS as u64) as usize;
        self.requests[i] = self.requests[i].saturating_add(1);
        if failed {
            self.failures[i] = self.failures[i].saturating_add(1);
        }
    }

    /// True when the window holds at least `min_requests` outcomes and the failure share reaches the
    /// threshold.
    fn tripped(&self) -> bool {
        let requests: u64 = self.requests.iter().map(|&n| u64::from(n)).sum();
        let failures: u64 = self.failures.iter().map(|&n| u64::from(n)).sum();
        requests > 0
            && requests >= self.min_requests
            && failures * 1_000_000 >= self.threshold_ppm * requests
    }

    fn clear(&mut self) {
        self.requests = [0; BUCKETS];
        self.failures = [0; BUCKETS];
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

    fn breaker(consecutive: u32, probes: u32) -> Arc<Breaker> {
        Breaker::new(policy(consecutive, probes, None), Scope::detached())
    }

    /// A breaker on the failure rate alone: `threshold` over a 10 s window, at least `min_requests`.
    fn by_rate(threshold: f64, min_requests: u32) -> Arc<Breaker> {
        let rate = FailureRate {
            threshold,
            min_requests,
            window: Duration::from_secs(10),
        };
        Breaker::new(policy(0, 1, Some(rate)), Scope::detached())
    }

    fn pass_at(b: &Arc<Breaker>, now: Instant) -> Ticket {
        match b.admit_at(now) {
            Admit::Pass(t) => t,
            Admit::Refuse(d) => panic!("refused for {d:?}"),
        }
    }

    fn pass(b: &Arc<Breaker>) -> Ticket {
        pass_at(b, Instant::now())
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
            pass_at(b, now).record_at(failed, now);
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
        let t0 = Instant::now();
        pass_at(&b, t0).record_at(true, t0);
        assert!(matches!(b.admit_at(t0 + 39 * MS), Admit::Refuse(d) if d == MS));
        let t1 = t0 + 45 * MS;
        let p1 = pass_at(&b, t1);
        let p2 = pass_at(&b, t1);
        assert!(matches!(b.admit_at(t1), Admit::Refuse(_)));
        assert_eq!(b.state(), State::HalfOpen);
        // A probe whose request was abandoned frees its slot.
        drop(p2);
        let p3 = pass_at(&b, t1);
        p1.record_at(true, t1);
        assert_eq!(b.state(), State::Open);
        // The second trip without a success in between stays open twice as long (80 ms).
        assert!(matches!(b.admit_at(t1 + 79 * MS), Admit::Refuse(d) if d == MS));
        drop(p3);
        let t2 = t1 + 80 * MS;
        pass_at(&b, t2).record_at(true, t2);
        // Doubled again, up to the cap of 100 ms.
        assert!(matches!(b.admit_at(t2 + 99 * MS), Admit::Refuse(d) if d == MS));
        let t3 = t2 + 100 * MS;
        pass_at(&b, t3).record_at(false, t3);
        assert_eq!(b.state(), State::Closed);
        // Closed by a success: the next trip starts from the base again.
        pass_at(&b, t3).record_at(true, t3);
        assert!(matches!(b.admit_at(t3), Admit::Refuse(d) if d == 40 * MS));
    }

    #[test]
    fn a_failure_share_under_the_threshold_does_not_open_even_when_the_first_request_failed() {
        // The case: threshold 50 %, 41 % failures, the first one a failure (an exponentially
        // weighted average opened here).
        let b = by_rate(0.5, 20);
        let opened = feed(&b, Instant::now(), 50 * MS, spread(400, 164));
        assert_eq!(opened, None, "41 % opened a 50 % breaker");
        // Failures first, then enough successes to bring the share under the threshold before the minimum.
        let b = by_rate(0.5, 20);
        let outcomes = [true; 9].into_iter().chain([false; 391]);
        assert_eq!(feed(&b, Instant::now(), 50 * MS, outcomes), None);
    }

    #[test]
    fn a_failure_share_over_the_threshold_opens_within_one_window() {
        // The other case: 55 % did not open within two windows.
        let b = by_rate(0.5, 20);
        // 20 requests per second: the minimum is reached after one second, well within the 10 s window.
        let opened = feed(&b, Instant::now(), 50 * MS, spread(400, 220));
        let at = opened.expect("55 % never opened a 50 % breaker");
        assert!(at < Duration::from_secs(2), "opened after {at:?}");
        // Exactly the threshold opens too (it is reached, as the policy says).
        let b = by_rate(0.5, 20);
        let alternating = (0..20).map(|i| i % 2 == 1);
        assert!(feed(&b, Instant::now(), 50 * MS, alternating).is_some());
        // A share that is only reached after it has been lower: the old outcomes still count.
        let b = by_rate(0.5, 20);
        let outcomes = [false; 40].into_iter().chain([true; 40]);
        let at = feed(&b, Instant::now(), 50 * MS, outcomes).expect("opened");
        assert_eq!(
            at,
            79 * 50 * MS,
            "opened at the 40th failure of 80 outcomes"
        );
    }

    #[test]
    fn the_failure_rate_waits_for_min_requests_in_the_window() {
        let b = by_rate(0.5, 20);
        let t0 = Instant::now();
        // 19 failures are not enough, however bad the share.
        assert_eq!(feed(&b, t0, 100 * MS, [true; 19]), None);
        // Once they have left the window (10 s later) they no longer count: 19 more still do not open it.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(feed(&b, later, 100 * MS, [true; 19]), None);
        // The 20th within the window does.
        let last = later + 19 * 100 * MS;
        pass_at(&b, last).record_at(true, last);
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn outcomes_leave_the_window_bucket_by_bucket() {
        let rate = FailureRate {
            threshold: 0.5,
            min_requests: 1,
            window: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut w = Window::new(rate, t0);
        for s in 0..10 {
            w.record(s % 2 == 0, t0 + Duration::from_secs(s));
        }
        assert_eq!(w.requests.iter().sum::<u32>(), 10);
        w.advance(t0 + Duration::from_secs(13));
        assert_eq!(w.requests.iter().sum::<u32>(), 6);
        assert_eq!(w.failures.iter().sum::<u32>(), 3);
        w.advance(t0 + Duration::from_secs(60));
        assert_eq!(w.requests.iter().sum::<u32>(), 0);
    }

    #[test]
    fn a_trip_refused_by_the_ejection_cap_is_asked_again_on_the_next_failure() {
        let ejections = Ejections::new(0.5, 2);
        let p = policy(2, 1, None);
        let a = Breaker::with_ejections(p, Scope::detached(), Some(ejections.clone()));
        let b = Breaker::with_ejections(p, Scope::detached(), Some(ejections.clone()));
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
}
