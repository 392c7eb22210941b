//! The retry budget: over a sliding window, retries may be at most `ratio` of the requests plus a floor of
//! `min_per_second` (Linkerd's budget), so a failing upstream sees at most (1 + ratio) × the load plus the
//! floor, never the load × the attempts.
//!
//! The floor is a rate: `min_per_second` × the span of time the window holds now (shorter while the budget is
//! new, and a whole slot shorter just after the oldest slot expires), and at least one second's worth so the
//! first failures of a new target can be retried. A burst of floor retries at start-up therefore cannot be
//! followed by a second full burst when it expires: over any run of T ≥ 1 seconds the floor adds at most
//! `min_per_second` × T.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::policy::traffic::BudgetPolicy;

/// The window is kept as this many slots; the oldest expires as time moves on.
const SLOTS: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    policy: BudgetPolicy,
    slot: Duration,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    start: Instant,
    /// The slot number (since `start`) that `slots[current % SLOTS]` counts.
    current: u64,
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl Ring {
    fn advance(&mut self, slot: Duration, now: Instant) {
        let at =
            (now.saturating_duration_since(self.start).as_nanos() / slot.as_nanos().max(1)) as u64;
        if at <= self.current {
            return;
        }
        let stale = (at - self.current).min(SLOTS as u64);
        for i in 0..stale {
            let index = ((at - i) % SLOTS as u64) as usize;
            self.requests[index] = 0;
            self.retries[index] = 0;
        }
        self.current = at;
    }

    fn index(&self) -> usize {
        (self.current % SLOTS as u64) as usize
    }
}

impl RetryBudget {
    pub fn new(policy: BudgetPolicy) -> Self {
        Self {
            policy,
            slot: policy.window / SLOTS as u32,
            ring: Mutex::new(Ring {
                start: Instant::now(),
                current: 0,
                requests: [0; SLOTS],
                retries: [0; SLOTS],
            }),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request (not its retries).
    pub fn deposit(&self) {
        let mut ring = self.ring();
        ring.advance(self.slot, Instant::now());
        let i = ring.index();
        ring.requests[i] += 1;
    }

    /// Requests and retries in the window now, for the admin state.
    pub fn usage(&self) -> (u64, u64) {
        let mut ring = self.ring();
        ring.advance(self.slot, Instant::now());
        (ring.requests.iter().sum(), ring.retries.iter().sum())
    }

    /// Takes one retry from the budget, or says it is spent.
    pub fn try_withdraw(&self) -> bool {
        let mut ring = self.ring();
        ring.advance(self.slot, Instant::now());
        let requests: u64 = ring.requests.iter().sum();
        let retries: u64 = ring.retries.iter().sum();
        let now = Instant::now();
        let age = now.saturating_duration_since(ring.start);
        // The slots before the current one, plus the part of the current one that has passed.
        let into_current = age.saturating_sub(self.slot * ring.current as u32);
        let span = (self.slot * (SLOTS as u32 - 1) + into_current).min(age);
        let per_second = f64::from(self.policy.min_per_second);
        let floor = (per_second * span.as_secs_f64()).max(per_second);
        let allowed = self.policy.ratio * requests as f64 + floor;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        let i = ring.index();
        ring.retries[i] += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(BudgetPolicy {
            ratio,
            min_per_second,
            window: Duration::from_secs(10),
        })
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
        let mut ring = Ring {
            start: Instant::now(),
            current: 0,
            requests: [1; SLOTS],
            retries: [1; SLOTS],
        };
        let slot = Duration::from_secs(1);
        ring.advance(slot, ring.start + Duration::from_secs(3));
        assert_eq!(ring.requests.iter().sum::<u64>(), 7);
        ring.advance(slot, ring.start + Duration::from_secs(60));
        assert_eq!(ring.requests.iter().sum::<u64>(), 0);
    }
}
