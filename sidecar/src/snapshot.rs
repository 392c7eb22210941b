//! The coherent view of the policy that the request path reads: one `ArcSwap` load per request.
//!
//! Owns: [`Snapshot`] (services with their endpoints, dispatch rules, timeouts, limits) and [`SharedSnapshot`],
//! the atomic cell that publishes it. Does not own: loading or validating policies ([`crate::policy`]) or
//! deciding when to publish ([`crate::policy::store`]).
//! Called by the request path ([`crate::dispatch`]) for reads; replaced whole by the policy store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use metrics::SharedString;

use crate::access_log::AccessLogPolicy;
use crate::dispatch::target::Upstream;
use crate::policy::{DispatchRules, Policy, ServicePolicy};
use crate::resilience::breaker::Breaker;
use crate::resilience::monitor::{Kind, Scope};
use crate::resilience::{Authorities, Target};

/// The cell the request path reads and the control plane swaps.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Everything one request needs to be routed, consistent with itself.
#[derive(Debug)]
pub struct Snapshot {
    /// The policy version this snapshot was built from (1 for the first).
    pub version: u64,
    pub services: HashMap<Box<str>, Arc<Service>>,
    pub dispatch: Option<DispatchRules>,
    /// Request timeout for targets that are URLs rather than services.
    pub request_timeout: Duration,
    /// Request heads above this size get 431.
    pub max_header_size: usize,
    pub access_log: AccessLogPolicy,
    /// Resilience state of URL targets, per authority.
    pub external: Arc<Authorities>,
    /// Resilience state of dispatch destinations, per authority.
    pub dispatch_targets: Arc<Authorities>,
}

/// A service of the registry: its policy and the state that outlives a reload when the policy is unchanged.
#[derive(Debug)]
pub struct Service {
    /// Shared with the metrics labels of its requests.
    pub name: Arc<str>,
    pub policy: ServicePolicy,
    pub endpoints: Vec<Endpoint>,
    /// Retries, breaker and limits of the service as a whole.
    pub target: Arc<Target>,
    /// Round-robin position: carried over by reusing the whole `Arc<Service>`.
    next: AtomicUsize,
}

/// One endpoint of a service, with its own breaker when the service has more than one endpoint (so a failing
/// instance is skipped while the others serve).
#[derive(Debug)]
pub struct Endpoint {
    pub upstream: Upstream,
    pub breaker: Option<Arc<Breaker>>,
    /// `host:port`, for logs and metrics.
    pub label: SharedString,
}

impl Service {
    fn new(name: &str, policy: &ServicePolicy) -> Self {
        let name: Arc<str> = Arc::from(name);
        let label = SharedString::from(name.clone());
        let several = policy.endpoints.len() > 1;
        let endpoints = policy
            .endpoints
            .iter()
            .map(|upstream| {
                let authority: Arc<str> = Arc::from(upstream.authority().as_str());
                let scope = Scope {
                    service: label.clone(),
                    endpoint: Some(authority.clone()),
                    kind: Kind::Endpoint,
                };
                Endpoint {
                    upstream: upstream.clone(),
                    breaker: policy
                        .resilience
                        .breaker
                        .filter(|_| several)
                        .map(|p| Breaker::new(p, scope)),
                    label: SharedString::from(authority),
                }
            })
            .collect();
        let scope = Scope {
            service: label,
            endpoint: None,
            kind: Kind::Service,
        };
        Self {
            target: Arc::new(Target::new(&policy.resilience, scope)),
            name,
            policy: policy.clone(),
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.policy.request_timeout
    }

    /// The live state of the service and its endpoints, as `GET /admin/targets` shows it.
    pub fn state(&self) -> serde_json::Value {
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .map(|e| {
                serde_json::json!({
                    "address": e.label.as_ref(),
                    "breaker": e.breaker.as_ref().map(|b| b.state().as_str()),
                    "available": e.breaker.as_ref().is_none_or(|b| b.is_available()),
                })
            })
            .collect();
        let mut state = self.target.state();
        if let Some(object) = state.as_object_mut() {
            object.insert("endpoints".into(), endpoints.into());
        }
        state
    }

    /// The next endpoint in turn whose breaker admits requests, skipping `avoid` (the endpoint that just
    /// failed) when another is available. `None` when every endpoint's breaker is open.
    pub fn pick(&self, avoid: Option<usize>) -> Option<usize> {
        let n = self.endpoints.len();
        if n <= 1 {
            return (n == 1).then_some(0);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let index = (start + i) % n;
            let available = self.endpoints[index]
                .breaker
                .as_ref()
                .is_none_or(|b| b.is_available());
            if !available {
                continue;
            }
            if Some(index) == avoid {
                fallback = Some(index);
                continue;
            }
            return Some(index);
        }
        fallback
    }
}

impl Snapshot {
    /// Every target's live state: services, URL authorities and dispatch destinations.
    pub fn targets(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> = self
            .services
            .iter()
            .map(|(name, s)| (name.to_string(), s.state()))
            .collect();
        serde_json::json!({
            "policy_version": self.version,
            "services": services,
            "external": self.external.state(),
            "dispatch": self.dispatch_targets.state(),
        })
    }

    /// Builds a snapshot; services whose policy is unchanged from `previous` keep their state (the same `Arc`).
    pub fn build(policy: &Policy, version: u64, previous: Option<&Snapshot>) -> Self {
        let services = policy
            .services
            .iter()
            .map(|(name, p)| {
                let kept = previous
                    .and_then(|prev| prev.services.get(name.as_str()))
                    .filter(|s| s.policy == *p)
                    .cloned();
                let service = kept.unwrap_or_else(|| Arc::new(Service::new(name, p)));
                (Box::from(name.as_str()), service)
            })
            .collect();
        let resilience = &policy.upstream.resilience;
        let authorities = |previous: Option<&Arc<Authorities>>, label| {
            previous
                .filter(|a| a.policy == *resilience)
                .cloned()
                .unwrap_or_else(|| Arc::new(Authorities::new(resilience, label)))
        };
        Self {
            version,
            services,
            external: authorities(previous.map(|p| &p.external), "external"),
            dispatch_targets: authorities(previous.map(|p| &p.dispatch_targets), "dispatch"),
            dispatch: policy.dispatch.clone(),
            request_timeout: policy.upstream.timeouts.request,
            max_header_size: policy.listeners.max_header_size,
            access_log: policy.access_log,
        }
    }

    pub fn from_policy(policy: &Policy) -> Self {
        Self::build(policy, 1, None)
    }

    pub fn shared(policy: &Policy) -> SharedSnapshot {
        Arc::new(ArcSwap::from_pointee(Self::from_policy(policy)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_services_keep_their_state_across_a_rebuild() {
        let v1 = Policy::from_yaml(
            "p",
            "services:\n  a:\n    endpoints: ['h:1', 'h:2']\n  b:\n    endpoints: ['h:3']\n",
        )
        .unwrap();
        let v2 = Policy::from_yaml(
            "p",
            "services:\n  a:\n    endpoints: ['h:1', 'h:2']\n  b:\n    endpoints: ['h:4']\n",
        )
        .unwrap();
        let first = Snapshot::from_policy(&v1);
        let second = Snapshot::build(&v2, 2, Some(&first));
        assert!(Arc::ptr_eq(&first.services["a"], &second.services["a"]));
        assert!(!Arc::ptr_eq(&first.services["b"], &second.services["b"]));
        assert_eq!(second.version, 2);
    }
}
