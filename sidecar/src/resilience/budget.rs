//! The retry budget: over a sliding window, retries may be at most `ratio` of the requests plus a floor of
//! `min_per_second` (Linkerd's budget), so a failing upstream sees at most (1 + ratio) × the load plus the
//! floor, never the load × the attempts.
//!
//! The floor is a rate: `min_per_second` × the span of time the window holds now (shorter while the budget is
//! new, and a whole slot shorter just after the oldest slot expires), and at least one second's worth so the
//! first failures of a new target can be retried. A burst of floor retries at start-up therefore cannot be
//! followed by a second full burst when it expires: over any run of T ≥ 1 seconds the floor adds at most
//! `min_per_second` × T.
//!
//! No lock: requests and retries are counted in [`super::buckets`], one atomic word per tenth of the window.
//! A withdrawal reads the window and then counts itself, so retries that workers withdraw at the same instant
//! can pass the limit by at most one each (there are as many as workers, not more). Time comes from the
//! sidecar's [`Clock`].

use std::time::{Duration, Instant};

use super::buckets::{BUCKETS, Buckets};
use crate::clock::Clock;
use crate::policy::traffic::BudgetPolicy;

#[derive(Debug)]
pub struct RetryBudget {
    policy: BudgetPolicy,
    slot_ns: u64,
    clock: Clock,
    epoch: Instant,
    requests: Buckets,
    retries: Buckets,
}

impl RetryBudget {
    pub fn new(policy: BudgetPolicy, clock: Clock) -> Self {
        let slot = (policy.window / BUCKETS as u32).max(Duration::from_millis(1));
        Self {
            policy,
            slot_ns: u64::try_from(slot.as_nanos()).unwrap_or(u64::MAX),
            epoch: clock.now(),
            clock,
            requests: Buckets::default(),
            retries: Buckets::default(),
        }
    }

    /// Nanoseconds since the epoch, and the slot number they fall in.
    fn now(&self) -> (u64, u64) {
        let elapsed = self.clock.now().saturating_duration_since(self.epoch);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        (ns, ns / self.slot_ns)
    }

    /// Counts one request (not its retries).
    pub fn deposit(&self) {
        let (_, at) = self.now();
        self.requests.add(at as u32);
    }

    /// Requests and retries in the window now, for the admin state.
    pub fn usage(&self) -> (u64, u64) {
        let (_, at) = self.now();
        (self.requests.sum(at as u32), self.retries.sum(at as u32))
    }

    /// Takes one retry from the budget, or says it is spent.
    pub fn try_withdraw(&self) -> bool {
        let (age, at) = self.now();
        let requests = self.requests.sum(at as u32);
        let retries = self.retries.sum(at as u32);
        // The slots before the current one, plus the part of the current one that has passed.
        let into_current = age - at * self.slot_ns;
        let span_ns = (self.slot_ns * (BUCKETS as u64 - 1))
            .saturating_add(into_current)
            .min(age);
        let per_second = f64::from(self.policy.min_per_second);
        let floor = (per_second * span_ns as f64 / 1e9).max(per_second);
        let allowed = self.policy.ratio * requests as f64 + floor;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        self.retries.add(at as u32);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget_on(clock: &Clock, ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(
            BudgetPolicy {
                ratio,
                min_per_second,
                window: Duration::from_secs(10),
            },
            clock.clone(),
        )
    }

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        budget_on(&Clock::manual(), ratio, min_per_second)
    }

    #[test]
    fn retries_are_a_share_of_requests_plus_the_floor() {
        let b = budget(0.2, 5);
        for _ in 0..100 {
            b.deposit();
        }
        // 20 % of 100 plus one second's floor of 5.
        let granted = (0..1000).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 25);
    }

    #[test]
    fn with_no_floor_and_no_requests_nothing_is_retried() {
        let b = budget(0.2, 0);
        assert!(!b.try_withdraw());
        for _ in 0..5 {
            b.deposit();
        }
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    #[test]
    fn old_slots_expire() {
        let clock = Clock::manual();
        let b = budget_on(&clock, 0.2, 0);
        // One request in each one-second slot of the ten-second window.
        for second in 0..10 {
            if second > 0 {
                clock.advance(Duration::from_secs(1));
            }
            b.deposit();
        }
        assert_eq!(b.usage().0, 10);
        // At 12 s the window is slots 3..=12: the requests of seconds 0, 1 and 2 have left it.
        clock.advance(Duration::from_secs(3));
        assert_eq!(b.usage().0, 7);
        clock.advance(Duration::from_secs(48));
        assert_eq!(b.usage(), (0, 0));
    }

    #[test]
    fn the_floor_grows_with_the_window_the_budget_has_seen() {
        let clock = Clock::manual();
        let b = budget_on(&clock, 0.0, 2);
        // New: one second's floor (2) at once, not the whole window's.
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), 2);
        // After 10 s the window spans nine whole slots and the current one's start: 18 retries in it, of
        // which the two first have left.
        clock.advance(Duration::from_secs(10));
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), 18);
    }
}
