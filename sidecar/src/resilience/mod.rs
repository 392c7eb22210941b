//! Resilience on the request path: per-target retries with a budget, circuit breakers, concurrency limits and
//! rate limits.
//!
//! Owns: the live state of each target ([`Target`]): a service of the registry, or an authority reached by URL
//! or by dispatch rules ([`Authorities`]). The state is built from the policy and carried across reloads while
//! the target's policy is unchanged. The request path enforces it with atomics and short uncontended locks,
//! never an actor round trip; the [`monitor`] actor reports transitions and runs the timers.
//! Does not own: the policy's shape and defaults ([`crate::policy::resilience`]), or the forwarding loop that
//! uses all this ([`crate::dispatch::forward`]).

pub mod breaker;
pub mod budget;
pub mod limits;
pub mod monitor;
pub mod retry;

use std::sync::{Arc, RwLock};

use metrics::SharedString;

use crate::policy::resilience::Resilience;
pub(crate) use crate::telemetry::FxHashMap;
use breaker::Breaker;
use budget::RetryBudget;
use limits::{Concurrency, RateLimit};
use monitor::{Kind, Scope};

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
        Self {
            policy: policy.clone(),
            breaker: policy.breaker.map(|p| Breaker::new(p, scope)),
            budget: policy.retries.budget.map(RetryBudget::new),
            concurrency: policy.concurrency.map(Concurrency::new),
            rate_limit: policy.rate_limit.clone().map(|p| RateLimit::new(p, name)),
        }
    }
}

/// Targets reached by URL (or by dispatch rules), one per authority, created on first use. Bounded: past
/// `MAX_AUTHORITIES`, further authorities share one state.
#[derive(Debug)]
pub struct Authorities {
    pub policy: Resilience,
    label: SharedString,
    map: RwLock<FxHashMap<Box<str>, Arc<Target>>>,
    overflow: Arc<Target>,
}

const MAX_AUTHORITIES: usize = 1024;

impl Authorities {
    pub fn new(policy: &Resilience, label: &'static str) -> Self {
        let label = SharedString::const_str(label);
        let scope = Scope {
            service: label.clone(),
            endpoint: Some(Arc::from("(others)")),
            kind: Kind::Authority,
        };
        Self {
            policy: policy.clone(),
            overflow: Arc::new(Target::new(policy, scope)),
            label,
            map: RwLock::new(FxHashMap::default()),
        }
    }

    /// The state of one authority (`scheme://host:port`).
    pub fn get(&self, authority: &str) -> Arc<Target> {
        if let Some(t) = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(authority)
        {
            return t.clone();
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = map.get(authority) {
            return t.clone();
        }
        if map.len() >= MAX_AUTHORITIES {
            return self.overflow.clone();
        }
        let scope = Scope {
            service: self.label.clone(),
            endpoint: Some(Arc::from(authority)),
            kind: Kind::Authority,
        };
        let target = Arc::new(Target::new(&self.policy, scope));
        map.insert(Box::from(authority), target.clone());
        target
    }

    /// Every authority's state, by authority.
    pub fn state(&self) -> serde_json::Value {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let all: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(authority, t)| (authority.to_string(), t.state()))
            .collect();
        serde_json::Value::Object(all)
    }

    /// Evicts idle rate-limit keys of every authority.
    pub fn evict_idle(&self) {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        for t in map.values().chain([&self.overflow]) {
            if let Some(limit) = &t.rate_limit {
                limit.evict_idle();
            }
        }
    }
}
