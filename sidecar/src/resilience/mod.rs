//! Resilience on the request path: per-target retries with a budget, circuit breakers, concurrency limits and
//! rate limits.
//!
//! Owns: the live state of each target ([`Target`]): a service of the registry, or an authority reached by URL
//! or by dispatch rules ([`Authorities`]). The state is built from the policy and carried across reloads while
//! the target's policy is unchanged. The request path enforces it with atomics and lock-free maps, never a
//! lock or an actor round trip; the sidecar's monitor actor
//! ([`crate::control::monitor`]) reports transitions and runs the open timers.
//! Does not own: the policy's shape and defaults ([`crate::policy::traffic`]), or the forwarding loop that
//! uses all this ([`crate::dispatch::admit`] and [`crate::dispatch::attempt`]).

pub mod breaker;
pub mod buckets;
pub mod budget;
pub mod limits;
pub mod monitor;
pub mod retry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::SharedString;

use crate::fxhash::FxBuildHasher;
use crate::policy::traffic::Resilience;
use breaker::Breaker;
use budget::RetryBudget;
use limits::{Concurrency, RateLimit};
use monitor::{Hub, Kind, Scope};

/// The live resilience state of one target.
#[derive(Debug)]
pub struct Target {
    pub policy: Resilience,
    pub breaker: Option<Arc<Breaker>>,
    pub budget: Option<RetryBudget>,
    pub concurrency: Option<Concurrency>,
    pub rate_limit: Option<RateLimit>,
}

impl Target {
    /// The live state, as `GET /admin/targets` shows it.
    pub fn state(&self) -> serde_json::Value {
        let breaker = self.breaker.as_ref().map(|b| {
            serde_json::json!({
                "state": b.state().as_str(),
                "probes_in_ms": b.remaining_open().as_millis() as u64,
            })
        });
        let concurrency = self
            .concurrency
            .as_ref()
            .map(|c| serde_json::json!({ "in_flight": c.in_flight(), "queued": c.queued() }));
        let budget = self.budget.as_ref().map(|b| {
            let (requests, retries) = b.usage();
            serde_json::json!({ "requests_in_window": requests, "retries_in_window": retries })
        });
        serde_json::json!({
            "breaker": breaker,
            "concurrency": concurrency,
            "retry_budget": budget,
            "rate_limit_keys": self.rate_limit.as_ref().map(RateLimit::keys),
        })
    }

    pub fn new(policy: &Resilience, scope: Scope) -> Self {
        let name: Arc<str> = Arc::from(scope.service.as_ref());
        let clock = scope.hub.clock.clone();
        Self {
            policy: policy.clone(),
            budget: policy
                .retries
                .budget
                .map(|p| RetryBudget::new(p, clock.clone())),
            concurrency: policy.concurrency.map(Concurrency::new),
            rate_limit: policy
                .rate_limit
                .clone()
                .map(|p| RateLimit::new(p, name, clock)),
            breaker: policy.breaker.map(|p| Breaker::new(p, scope)),
        }
    }
}

/// Targets reached by URL (or by dispatch rules), one per authority, created on first use.
///
/// Bounded: past [`MAX_AUTHORITIES`], the least recently used authorities (those no request holds first) are
/// forgotten, an eighth at a time, so that a new authority always gets its own fresh state and one caller
/// that tries many authorities cannot make the others share a breaker. A forgotten authority that is called
/// again starts afresh. `GET /admin/targets` lists the same bounded set.
///
/// No lock on the way of a request: the map is papaya's, whose lookups and inserts never wait. A known
/// authority costs a lookup, an `Arc` clone and one relaxed atomic read (and at most one store per clock
/// tick) for its last use. Only eviction is serialised, by a mutex that a request tries and never waits
/// for: while one request evicts, the others insert past the bound (by at most one each) and go on. The
/// clock of last uses is coarse and cheap: milliseconds since creation, advanced when an authority is added
/// (so it runs fine while new authorities pour in, when eviction matters) and by the monitor's tick every
/// second.
#[derive(Debug)]
pub struct Authorities {
    pub policy: Resilience,
    label: SharedString,
    hub: Hub,
    map: papaya::HashMap<Box<str>, Tracked, FxBuildHasher>,
    limit: usize,
    evicting: Mutex<()>,
    epoch: Instant,
    /// Milliseconds since `epoch`, as of the last advance.
    clock: AtomicU64,
}

/// One authority's state and when it was last used (the coarse clock's reading).
#[derive(Debug)]
struct Tracked {
    target: Arc<Target>,
    used: AtomicU64,
}

/// Authorities tracked at once, for URL targets and again for dispatch destinations.
pub const MAX_AUTHORITIES: usize = 1024;

impl Authorities {
    pub fn new(policy: &Resilience, label: &'static str, hub: Hub) -> Self {
        Self::with_limit(policy, label, hub, MAX_AUTHORITIES)
    }

    fn with_limit(policy: &Resilience, label: &'static str, hub: Hub, limit: usize) -> Self {
        Self {
            policy: policy.clone(),
            label: SharedString::const_str(label),
            epoch: hub.clock.now(),
            hub,
            map: papaya::HashMap::with_hasher(FxBuildHasher::default()),
            limit: limit.max(1),
            evicting: Mutex::new(()),
            clock: AtomicU64::new(0),
        }
    }

    /// The state of one authority (`scheme://host:port`).
    pub fn get(&self, authority: &str) -> Arc<Target> {
        if let Some(t) = self.map.pin().get(authority) {
            let now = self.clock.load(Ordering::Relaxed);
            if t.used.load(Ordering::Relaxed) != now {
                t.used.store(now, Ordering::Relaxed);
            }
            return t.target.clone();
        }
        self.add(authority)
    }

    /// Advances the coarse clock to the real one and returns it.
    fn advance(&self) -> u64 {
        let now = self
            .hub
            .clock
            .now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64;
        self.clock.fetch_max(now, Ordering::Relaxed).max(now)
    }

    fn add(&self, authority: &str) -> Arc<Target> {
        let now = self.advance();
        if self.map.len() >= self.limit
            && let Ok(_one_at_a_time) = self.evicting.try_lock()
        {
            self.evict();
        }
        let map = self.map.pin();
        let tracked = map.get_or_insert_with(Box::from(authority), || {
            let scope = Scope {
                service: self.label.clone(),
                endpoint: Some(Arc::from(authority)),
                kind: Kind::Authority,
                hub: self.hub.clone(),
            };
            Tracked {
                target: Arc::new(Target::new(&self.policy, scope)),
                used: AtomicU64::new(now),
            }
        });
        tracked.used.store(now, Ordering::Relaxed);
        tracked.target.clone()
    }

    /// Forgets the least recently used eighth of the authorities (at least one), preferring those no request
    /// holds: one pass over the map per `limit / 8` new authorities.
    fn evict(&self) {
        let map = self.map.pin();
        let rank = |t: &Tracked| {
            (
                Arc::strong_count(&t.target) > 1,
                t.used.load(Ordering::Relaxed),
            )
        };
        let mut ranks: Vec<(bool, u64)> = map.values().map(rank).collect();
        if ranks.is_empty() {
            return;
        }
        let count = (self.limit / 8).clamp(1, ranks.len());
        let (_, &mut cutoff, _) = ranks.select_nth_unstable(count - 1);
        // Everything ranked below the cutoff goes, and of those tied with it only as many as make `count`.
        let below = ranks.iter().filter(|&&r| r < cutoff).count();
        let mut ties = count - below;
        map.retain(|_, t| {
            let r = rank(t);
            if r < cutoff {
                false
            } else if r == cutoff && ties > 0 {
                ties -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Every authority's state, by authority.
    pub fn state(&self) -> serde_json::Value {
        let all: serde_json::Map<String, serde_json::Value> = self
            .map
            .pin()
            .iter()
            .map(|(authority, t)| (authority.to_string(), t.target.state()))
            .collect();
        serde_json::Value::Object(all)
    }

    /// Evicts idle rate-limit keys of every authority, and moves the clock of last uses on (every second).
    pub fn evict_idle(&self) {
        self.advance();
        for t in self.map.pin().values() {
            if let Some(limit) = &t.target.rate_limit {
                limit.evict_idle();
            }
        }
    }

    /// Authorities tracked now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorities(limit: usize) -> Authorities {
        Authorities::with_limit(&Resilience::default(), "external", Hub::default(), limit)
    }

    #[test]
    fn a_new_authority_past_the_limit_gets_its_own_state() {
        let a = authorities(16);
        let first: Vec<Arc<Target>> = (0..16).map(|i| a.get(&format!("h{i}:80"))).collect();
        drop(first);
        for i in 16..100 {
            let t = a.get(&format!("h{i}:80"));
            assert!(
                Arc::ptr_eq(&t, &a.get(&format!("h{i}:80"))),
                "h{i} keeps its state while it is used"
            );
            assert!(a.len() <= 16);
        }
        let fresh = a.get("new:80");
        assert!(
            fresh
                .breaker
                .as_ref()
                .is_some_and(|b| b.state() == breaker::State::Closed)
        );
        assert!(a.state().get("new:80").is_some());
        assert!(a.len() <= 16);
    }

    #[test]
    fn the_least_recently_used_go_first_and_those_in_use_last() {
        let a = authorities(8);
        let held = a.get("held:80");
        for i in 0..7 {
            a.get(&format!("old{i}:80"));
        }
        // Time passes (the clock moves 10 ms); `old6` is used again, the others are not.
        a.clock.fetch_add(10, Ordering::Relaxed);
        let recent = a.get("old6:80");
        drop(recent);
        // Full: the next authority evicts one, the least recently used that no request holds.
        a.get("new:80");
        let state = a.state();
        assert!(state.get("held:80").is_some(), "{state}");
        assert!(state.get("old6:80").is_some(), "{state}");
        assert!(state.get("new:80").is_some(), "{state}");
        assert_eq!(a.len(), 8);
        drop(held);
    }
}
