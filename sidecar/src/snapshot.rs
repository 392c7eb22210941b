//! The coherent view of the policy that the request path reads: one `ArcSwap` load per request.
//!
//! Owns: [`Snapshot`] (services with their endpoints, dispatch rules, timeouts) and [`SharedSnapshot`], the
//! atomic cell that publishes it. Does not own: loading or validating policies ([`crate::policy`]).
//! Called by the request path ([`crate::dispatch`]) for reads; replaced whole by whoever publishes a policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::dispatch::target::Upstream;
use crate::policy::{DispatchRules, Policy};

/// The cell the request path reads and the control plane swaps.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Everything one request needs to be routed, consistent with itself.
#[derive(Debug)]
pub struct Snapshot {
    pub services: HashMap<Box<str>, Arc<Service>>,
    pub dispatch: Option<DispatchRules>,
    /// Request timeout for targets that are URLs rather than services.
    pub request_timeout: Duration,
}

/// A service of the registry: its endpoints and policy.
#[derive(Debug)]
pub struct Service {
    pub name: Box<str>,
    pub endpoints: Vec<Upstream>,
    pub request_timeout: Duration,
    next: AtomicUsize,
}

impl Service {
    /// The next endpoint in turn, or `None` when the service has none.
    pub fn pick(&self) -> Option<&Upstream> {
        match self.endpoints.len() {
            0 => None,
            1 => self.endpoints.first(),
            n => self
                .endpoints
                .get(self.next.fetch_add(1, Ordering::Relaxed) % n),
        }
    }
}

impl Snapshot {
    pub fn from_policy(policy: &Policy) -> Self {
        let services = policy
            .services
            .iter()
            .map(|(name, s)| {
                let service = Service {
                    name: name.as_str().into(),
                    endpoints: s.endpoints.clone(),
                    request_timeout: s.request_timeout,
                    next: AtomicUsize::new(0),
                };
                (Box::from(name.as_str()), Arc::new(service))
            })
            .collect();
        Self {
            services,
            dispatch: policy.dispatch.clone(),
            request_timeout: policy.upstream.timeouts.request,
        }
    }

    pub fn shared(policy: &Policy) -> SharedSnapshot {
        Arc::new(ArcSwap::from_pointee(Self::from_policy(policy)))
    }
}
