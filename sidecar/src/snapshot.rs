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

use crate::access_log::AccessLogPolicy;
use crate::dispatch::target::Upstream;
use crate::policy::{DispatchRules, Policy, ServicePolicy};

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
}

/// A service of the registry: its policy and the state that outlives a reload when the policy is unchanged.
#[derive(Debug)]
pub struct Service {
    /// Shared with the metrics labels of its requests.
    pub name: Arc<str>,
    pub policy: ServicePolicy,
    /// Round-robin position: carried over by reusing the whole `Arc<Service>`.
    next: AtomicUsize,
}

impl Service {
    pub fn request_timeout(&self) -> Duration {
        self.policy.request_timeout
    }

    /// The next endpoint in turn, or `None` when the service has none.
    pub fn pick(&self) -> Option<&Upstream> {
        let endpoints = &self.policy.endpoints;
        match endpoints.len() {
            0 => None,
            1 => endpoints.first(),
            n => endpoints.get(self.next.fetch_add(1, Ordering::Relaxed) % n),
        }
    }
}

impl Snapshot {
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
                let service = kept.unwrap_or_else(|| {
                    Arc::new(Service {
                        name: name.as_str().into(),
                        policy: p.clone(),
                        next: AtomicUsize::new(0),
                    })
                });
                (Box::from(name.as_str()), service)
            })
            .collect();
        Self {
            version,
            services,
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
