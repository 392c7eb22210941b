//! Circuit breakers: closed, open for a growing time after failures accrue, half-open with a bounded number of
//! probes, closed again on a probe's success.
//!
//! failsafe provides the failure accrual (consecutive failures, and an exponentially weighted success rate over
//! a window with a minimum of requests) and hands back the open duration from a backoff. Its own
//! `StateMachine` is not used: its half-open state admits every call, it cannot say how long it stays open
//! (which `Retry-After` needs), and it cannot tell a probe's result from a straggler's. The state machine here
//! is small: one atomic read while closed, one uncontended lock to record an outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use failsafe::failure_policy::{
    ConsecutiveFailures, FailurePolicy, SuccessRateOverTimeWindow, consecutive_failures,
    success_rate_over_time_window,
};

use super::monitor::{self, Scope};
use crate::policy::resilience::BreakerPolicy;

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
    accrual: Accrual,
    /// The last open duration, doubled when a probe fails and the accrual offers none.
    last_open: Duration,
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
    limit: std::sync::atomic::AtomicUsize,
    ejected: std::sync::atomic::AtomicUsize,
}

impl Ejections {
    /// `share` of `endpoints`, but at least one (as Envoy's `max_ejection_percent`).
    pub fn new(share: f64, endpoints: usize) -> Arc<Self> {
        let e = Self {
            share,
            limit: std::sync::atomic::AtomicUsize::new(0),
            ejected: std::sync::atomic::AtomicUsize::new(0),
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
        Arc::new(Self {
            policy,
            ejections,
            tripped: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                state: Phase::Closed,
                accrual: Accrual::new(&policy),
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
        let now = Instant::now();
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

    fn record(&self, probe: bool, failed: bool) {
        let mut shared = self.lock();
        let transition = match (shared.state, probe, failed) {
            (Phase::Closed, _, false) => {
                shared.accrual.record_success();
                None
            }
            (Phase::Closed, _, true) => shared
                .accrual
                .mark_dead_on_failure()
                // Past the ejection cap the endpoint stays in rotation: better a failing endpoint than too
                // few to carry the load.
                .filter(|_| self.ejections.as_ref().is_none_or(|e| e.try_take()))
                .map(|open| {
                    self.open(&mut shared, open);
                    State::Open
                }),
            (Phase::HalfOpen { .. }, true, false) => {
                if let Some(e) = &self.ejections {
                    e.give_back();
                }
                shared.accrual.revived();
                shared.last_open = self.policy.open_base;
                shared.state = Phase::Closed;
                self.tripped.store(false, Ordering::Release);
                Some(State::Closed)
            }
            (Phase::HalfOpen { .. }, true, true) => {
                let doubled = shared.last_open.saturating_mul(2);
                let open = shared.accrual.mark_dead_on_failure().unwrap_or(doubled);
                self.open(&mut shared, open);
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

    fn open(&self, shared: &mut Shared, open: Duration) {
        let open = open.clamp(self.policy.open_base, self.policy.open_max);
        shared.last_open = open;
        shared.state = Phase::Open {
            until: Instant::now() + open,
        };
        self.tripped.store(true, Ordering::Release);
    }

    /// The endpoint left the service (discovery): an ejection it held no longer counts.
    pub fn forget(&self) {
        let shared = self.lock();
        if !matches!(shared.state, Phase::Closed)
            && let Some(e) = &self.ejections
        {
            e.give_back();
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

/// The open durations: `base`, doubling up to `max`. failsafe's own exponential backoff refuses bases under
/// a second, so it cannot serve sub-second settings.
#[derive(Debug, Clone)]
struct Doubling {
    next: Duration,
    max: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        Some(now)
    }
}

/// failsafe's accrual policies, each optional.
#[derive(Debug)]
struct Accrual {
    consecutive: Option<ConsecutiveFailures<Doubling>>,
    rate: Option<SuccessRateOverTimeWindow<Doubling>>,
}

impl Accrual {
    fn new(policy: &BreakerPolicy) -> Self {
        let backoff = Doubling {
            next: policy.open_base,
            max: policy.open_max,
        };
        Self {
            consecutive: (policy.consecutive_failures > 0)
                .then(|| consecutive_failures(policy.consecutive_failures, backoff.clone())),
            rate: policy.failure_rate.map(|r| {
                success_rate_over_time_window(
                    (1.0 - r.threshold).clamp(0.0, 1.0),
                    r.min_requests,
                    r.window,
                    backoff,
                )
            }),
        }
    }
}

impl FailurePolicy for Accrual {
    fn record_success(&mut self) {
        if let Some(c) = &mut self.consecutive {
            c.record_success();
        }
        if let Some(r) = &mut self.rate {
            r.record_success();
        }
    }

    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        let a = self
            .consecutive
            .as_mut()
            .and_then(FailurePolicy::mark_dead_on_failure);
        let b = self
            .rate
            .as_mut()
            .and_then(FailurePolicy::mark_dead_on_failure);
        a.max(b)
    }

    fn revived(&mut self) {
        if let Some(c) = &mut self.consecutive {
            c.revived();
        }
        if let Some(r) = &mut self.rate {
            r.revived();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(consecutive: u32, probes: u32) -> Arc<Breaker> {
        Breaker::new(
            BreakerPolicy {
                consecutive_failures: consecutive,
                failure_rate: None,
                open_base: Duration::from_millis(40),
                open_max: Duration::from_millis(100),
                half_open_probes: probes,
                max_ejected: None,
            },
            Scope::detached(),
        )
    }

    fn pass(b: &Arc<Breaker>) -> Ticket {
        match b.admit() {
            Admit::Pass(t) => t,
            Admit::Refuse(d) => panic!("refused for {d:?}"),
        }
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
        assert!(matches!(b.admit(), Admit::Refuse(d) if d <= Duration::from_millis(40)));
    }

    #[test]
    fn half_open_admits_only_the_probes_and_their_result_decides() {
        let b = breaker(1, 2);
        pass(&b).record(true);
        std::thread::sleep(Duration::from_millis(45));
        let p1 = pass(&b);
        let p2 = pass(&b);
        assert!(matches!(b.admit(), Admit::Refuse(_)));
        assert_eq!(b.state(), State::HalfOpen);
        // A probe whose request was abandoned frees its slot.
        drop(p2);
        let p3 = pass(&b);
        p1.record(true);
        assert_eq!(b.state(), State::Open);
        // The second trip without a success in between stays open longer.
        assert!(b.remaining_open() > Duration::from_millis(45));
        drop(p3);
        std::thread::sleep(Duration::from_millis(101));
        pass(&b).record(false);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn the_open_time_doubles_up_to_the_cap() {
        let mut d = Doubling {
            next: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let seq: Vec<u64> = (0..5).map(|_| d.next().unwrap().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 5, 5]);
    }
}
