//! The coherent view of the policy that the request path reads with `ArcSwap` loads (two per request, see
//! `docs/request-path.md`).
//!
//! Owns: [`Snapshot`] (services with their endpoints, dispatch rules, timeouts, limits) and [`SharedSnapshot`],
//! the atomic cell that publishes it. Does not own: loading or validating policies ([`crate::policy`]) or
//! deciding when to publish ([`crate::control::store`]).
//! Called by the request path ([`crate::dispatch`]) for reads; replaced whole by the policy store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use metrics::SharedString;

use crate::access_log::AccessLogPolicy;
use crate::balance::{Clock, Load, Ring, load_bound};
use crate::policy::traffic::BalancerKind;
use crate::policy::{DispatchRules, Policy, ServicePolicy, UpstreamSettings};
use crate::resilience::breaker::{Breaker, Ejections};
use crate::resilience::monitor::{Hub, Kind, Scope};
use crate::resilience::retry::random_below;
use crate::resilience::{Authorities, Target};
use crate::upstream::Upstream;

/// The cell the request path reads and the control plane swaps.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

/// Everything one request needs to be routed, consistent with itself. Cloning shares every service and
/// target (they are `Arc`s).
#[derive(Debug, Clone)]
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
    /// DNS servers for discovery; empty: the system's.
    pub nameservers: Vec<std::net::SocketAddr>,
    /// This sidecar's mesh identity and certificates, for calls to `mesh: true` services.
    pub mesh: Option<Arc<crate::policy::Mesh>>,
    /// `egress.allow`: when set, the hosts URL targets may name.
    pub egress_allow: Option<Arc<crate::policy::AllowList>>,
    /// The settings the workers' upstream clients are built with; only the pool's are read (connect timeout,
    /// idle timeout, connection limit).
    pub pool: Arc<UpstreamSettings>,
    /// Changes exactly when the pool settings do: a worker whose client was built for another generation
    /// builds a new one (one integer compare per request), so a pool change needs no new listener.
    pub pool_generation: u64,
    /// This sidecar's clock and monitor, for the breakers of every snapshot it builds.
    pub hub: Hub,
    /// Traffic copies of services and URL authorities (a dispatch rule's are in its rewrite).
    pub shadow: Arc<crate::policy::ShadowPolicy>,
    /// Fan-out groups, by name and by the `Host` that selects them.
    pub fanout: Arc<crate::policy::fanout::FanoutPolicy>,
}

/// A service of the registry: its policy and the state that outlives a reload when the policy is unchanged.
#[derive(Debug)]
pub struct Service {
    /// Shared with the metrics labels of its requests.
    pub name: Arc<str>,
    pub policy: ServicePolicy,
    /// Shared with the next version of the service when discovery changes the set, so an endpoint that stays
    /// keeps its load, latency estimate and ejection.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Retries, breaker and limits of the service as a whole.
    pub target: Arc<Target>,
    /// The cap on endpoints ejected at once, shared by the endpoints' breakers.
    pub ejections: Option<Arc<Ejections>>,
    /// Round-robin position: carried over by reusing the whole `Arc<Service>`.
    next: AtomicUsize,
    ring: Option<Ring>,
    clock: Clock,
    hub: Hub,
}

/// One endpoint of a service, with its own breaker (passive outlier ejection) when the service has
/// `outlier_detection`, and its load for the balancer. The breaker is built even while the endpoint is its
/// service's only one, when it is not used ([`Service::outlier`]), so that an endpoint kept when discovery
/// adds others is ejected like them.
#[derive(Debug)]
pub struct Endpoint {
    pub upstream: Upstream,
    pub breaker: Option<Arc<Breaker>>,
    /// `host:port`, for logs and metrics.
    pub label: SharedString,
    pub load: Load,
    /// False while active health checks fail ([`crate::control::health`]); true without health checks.
    pub healthy: std::sync::atomic::AtomicBool,
}

/// An attempt in flight to one endpoint: counted in its load until dropped.
#[derive(Debug)]
pub struct InFlight {
    service: Arc<Service>,
    index: usize,
    started: std::time::Instant,
}

impl InFlight {
    /// Records the attempt's response time in the endpoint's latency estimate.
    pub fn observe(&self) {
        let s = &self.service;
        s.endpoints[self.index].load.observe(
            self.started.elapsed(),
            s.clock.now_ns(),
            s.policy.resilience.balancer.decay,
        );
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.service.endpoints[self.index].load.end();
    }
}

impl Service {
    /// The service for a changed policy. A discovered service keeps the endpoints discovery published for
    /// `previous` while the discovery source and `mesh` are unchanged: its static endpoints (usually none)
    /// would otherwise serve until discovery publishes again. Those endpoints keep their load, health and
    /// ejection when the outlier policy is unchanged too; otherwise they start afresh under the new one.
    fn rebuilt(name: &str, policy: &ServicePolicy, previous: Option<&Service>, hub: &Hub) -> Self {
        let discovered = previous.filter(|p| {
            p.policy.discovery.is_some()
                && p.policy.discovery == policy.discovery
                && p.policy.mesh == policy.mesh
                && !p
                    .endpoints
                    .iter()
                    .map(|e| &e.upstream)
                    .eq(p.policy.endpoints.iter())
        });
        let name: Arc<str> = Arc::from(name);
        let label = SharedString::from(name.clone());
        let scope = Scope {
            service: label,
            endpoint: None,
            kind: Kind::Service,
            hub: hub.clone(),
        };
        let ejections = policy
            .resilience
            .outliers
            .map(|o| Ejections::new(o.max_ejected.unwrap_or(1.0), policy.endpoints.len()));
        let mut service = Self {
            target: Arc::new(Target::new(&policy.resilience, scope)),
            name,
            policy: policy.clone(),
            endpoints: Vec::new(),
            ejections,
            next: AtomicUsize::new(0),
            ring: None,
            clock: Clock::default(),
            hub: hub.clone(),
        };
        match discovered {
            Some(previous) => {
                let upstreams: Vec<Upstream> = previous
                    .endpoints
                    .iter()
                    .map(|e| e.upstream.clone())
                    .collect();
                if previous.policy.resilience.outliers == policy.resilience.outliers {
                    // The kept endpoints' breakers count against the previous service's ejection cap.
                    service.ejections = previous.ejections.clone();
                    service.set_endpoints(&upstreams, &previous.endpoints);
                } else {
                    service.set_endpoints(&upstreams, &[]);
                }
            }
            None => service.set_endpoints(&policy.endpoints, &[]),
        }
        service
    }

    /// This service with another set of endpoints (from discovery): endpoints in both keep their state, the
    /// service keeps its breaker, budget and limits.
    pub fn with_endpoints(&self, upstreams: &[Upstream]) -> Self {
        let mut next = Self {
            name: self.name.clone(),
            policy: self.policy.clone(),
            endpoints: Vec::new(),
            target: self.target.clone(),
            ejections: self.ejections.clone(),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
            ring: None,
            clock: self.clock,
            hub: self.hub.clone(),
        };
        next.set_endpoints(upstreams, &self.endpoints);
        for gone in self
            .endpoints
            .iter()
            .filter(|e| !upstreams.contains(&e.upstream))
        {
            if let Some(b) = &gone.breaker {
                b.forget();
            }
        }
        // Scaled in to one: ejection needs somewhere else to go, so an endpoint ejected before is readmitted
        // and the service's breaker guards it from now on.
        if let [alone] = next.endpoints.as_slice()
            && let Some(b) = &alone.breaker
        {
            b.readmit();
        }
        next
    }

    fn set_endpoints(&mut self, upstreams: &[Upstream], previous: &[Arc<Endpoint>]) {
        let resilience = &self.policy.resilience;
        if let Some(e) = &self.ejections {
            e.resize(upstreams.len());
        }
        let label = SharedString::from(self.name.clone());
        self.endpoints = upstreams
            .iter()
            .map(|upstream| {
                if let Some(kept) = previous.iter().find(|e| e.upstream == *upstream) {
                    return kept.clone();
                }
                let authority: Arc<str> = Arc::from(upstream.authority().as_str());
                let scope = Scope {
                    service: label.clone(),
                    endpoint: Some(authority.clone()),
                    kind: Kind::Endpoint,
                    hub: self.hub.clone(),
                };
                Arc::new(Endpoint {
                    upstream: upstream.clone(),
                    breaker: resilience
                        .outliers
                        .map(|p| Breaker::with_ejections(p, scope, self.ejections.clone())),
                    label: SharedString::from(authority),
                    load: Load::default(),
                    healthy: std::sync::atomic::AtomicBool::new(true),
                })
            })
            .collect();
        self.ring = (resilience.balancer.kind == BalancerKind::ConsistentHash)
            .then(|| Ring::new(self.endpoints.iter().map(|e| e.label.as_ref())));
    }

    /// The breaker that ejects endpoint `index`: none while the service has one endpoint (ejection needs
    /// somewhere else to go; the service's breaker guards it), nor without `outlier_detection`.
    pub fn outlier(&self, index: usize) -> Option<&Arc<Breaker>> {
        if self.endpoints.len() > 1 {
            self.endpoints.get(index).and_then(|e| e.breaker.as_ref())
        } else {
            None
        }
    }

    pub fn request_timeout(&self) -> Duration {
        self.policy.request_timeout
    }

    /// The live state of the service and its endpoints, as `GET /admin/targets` shows it.
    pub fn state(&self) -> serde_json::Value {
        let (now, decay) = (self.clock.now_ns(), self.policy.resilience.balancer.decay);
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let breaker = self.outlier(i);
                serde_json::json!({
                    "address": e.label.as_ref(),
                    "breaker": breaker.map(|b| b.state().as_str()),
                    "healthy": e.healthy.load(Ordering::Acquire),
                    "available": breaker.is_none_or(|b| b.is_available()),
                    "in_flight": e.load.in_flight(),
                    "latency_ewma_ms": (e.load.latency_ns(now, decay) / 1e6 * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        let mut state = self.target.state();
        if let Some(object) = state.as_object_mut() {
            object.insert("endpoints".into(), endpoints.into());
            object.insert(
                "ejected".into(),
                self.ejections.as_ref().map_or(0, |e| e.ejected()).into(),
            );
        }
        state
    }

    fn available(&self, index: usize) -> bool {
        self.endpoints[index].healthy.load(Ordering::Acquire)
            && self.outlier(index).is_none_or(|b| b.is_available())
    }

    /// Chooses the endpoint for an attempt with the service's balancer, among the endpoints not ejected,
    /// avoiding `avoid` (the endpoint that just failed) when another is available. `key` is the request's
    /// hash for consistent hashing. `None` when no endpoint is available.
    pub fn pick(&self, avoid: Option<usize>, key: Option<u64>) -> Option<usize> {
        let n = self.endpoints.len();
        if n <= 1 {
            return (n == 1 && self.endpoints[0].healthy.load(Ordering::Acquire)).then_some(0);
        }
        let eligible = |i: usize| Some(i) != avoid && self.available(i);
        let balancer = &self.policy.resilience.balancer;
        let chosen = match balancer.kind {
            BalancerKind::RoundRobin => {
                // A turn that falls on an endpoint out of rotation is used up, not handed to the next one:
                // the neighbour of an ejected endpoint would otherwise get two turns per round. A race with
                // other workers' turns may skip an endpoint in these `n` turns; then the next one in order.
                let mut turn = 0;
                (0..n)
                    .find_map(|_| {
                        turn = self.next.fetch_add(1, Ordering::Relaxed);
                        Some(turn % n).filter(|&i| eligible(i))
                    })
                    .or_else(|| {
                        (1..=n)
                            .map(|k| turn.wrapping_add(k) % n)
                            .find(|&i| eligible(i))
                    })
            }
            BalancerKind::P2cEwma => {
                let now = self.clock.now_ns();
                self.two_choices(&eligible, |i| {
                    self.endpoints[i].load.cost(now, balancer.decay)
                })
            }
            BalancerKind::LeastRequest => {
                self.two_choices(&eligible, |i| f64::from(self.endpoints[i].load.in_flight()))
            }
            BalancerKind::ConsistentHash => {
                let total: u64 = self
                    .endpoints
                    .iter()
                    .map(|e| u64::from(e.load.in_flight()))
                    .sum();
                let bound = load_bound(total, n, balancer.hash_balance_factor);
                let key = key.unwrap_or(0);
                self.ring.as_ref().and_then(|ring| {
                    ring.walk(key, |i| {
                        eligible(i) && u64::from(self.endpoints[i].load.in_flight()) < bound
                    })
                    .or_else(|| ring.walk(key, eligible))
                })
            }
        };
        // The endpoint that just failed is still better than none.
        chosen.or_else(|| avoid.filter(|&i| self.available(i)))
    }

    /// Power of two choices: two distinct endpoints at random, the cheaper one.
    fn two_choices(
        &self,
        eligible: &impl Fn(usize) -> bool,
        cost: impl Fn(usize) -> f64,
    ) -> Option<usize> {
        let n = self.endpoints.len() as u64;
        for _ in 0..4 {
            let a = random_below(n) as usize;
            let mut b = random_below(n - 1) as usize;
            if b >= a {
                b += 1;
            }
            match (eligible(a), eligible(b)) {
                (true, true) => return Some(if cost(a) <= cost(b) { a } else { b }),
                (true, false) => return Some(a),
                (false, true) => return Some(b),
                (false, false) => {}
            }
        }
        // Most endpoints are out: the cheapest of those left.
        (0..self.endpoints.len())
            .filter(|&i| eligible(i))
            .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
    }

    /// Counts an attempt to endpoint `index` in its load until the returned guard drops.
    pub fn begin(self: &Arc<Self>, index: usize) -> InFlight {
        self.endpoints[index].load.begin();
        InFlight {
            service: self.clone(),
            index,
            started: std::time::Instant::now(),
        }
    }
}

impl Snapshot {
    /// This snapshot with one service replaced (discovery publishing a new endpoint set); the version stays.
    pub fn with_service(&self, name: &str, service: Arc<Service>) -> Self {
        let mut next = self.clone();
        next.services.insert(Box::from(name), service);
        next
    }

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

    /// Builds a snapshot; services whose policy is unchanged from `previous` keep their state (the same `Arc`),
    /// and a discovered service whose policy changed keeps its discovered endpoints (`Service::rebuilt`).
    pub fn build(policy: &Policy, version: u64, previous: Option<&Snapshot>) -> Self {
        let hub = previous.map(|p| p.hub.clone()).unwrap_or_default();
        Self::assemble(policy, version, previous, hub)
    }

    fn assemble(policy: &Policy, version: u64, previous: Option<&Snapshot>, hub: Hub) -> Self {
        let services = policy
            .services
            .iter()
            .map(|(name, p)| {
                let kept = previous
                    .and_then(|prev| prev.services.get(name.as_str()))
                    .filter(|s| s.policy == *p)
                    .cloned();
                let service = kept.unwrap_or_else(|| {
                    let previous = previous.and_then(|prev| prev.services.get(name.as_str()));
                    Arc::new(Service::rebuilt(name, p, previous.map(AsRef::as_ref), &hub))
                });
                (Box::from(name.as_str()), service)
            })
            .collect();
        let (pool, pool_generation) = match previous {
            Some(p) if same_pool(&p.pool, &policy.upstream) => (p.pool.clone(), p.pool_generation),
            _ => (
                Arc::new(policy.upstream.clone()),
                previous.map_or(1, |p| p.pool_generation + 1),
            ),
        };
        let resilience = &policy.upstream.resilience;
        let authorities = |previous: Option<&Arc<Authorities>>, label| {
            previous
                .filter(|a| a.policy == *resilience)
                .cloned()
                .unwrap_or_else(|| Arc::new(Authorities::new(resilience, label, hub.clone())))
        };
        Self {
            version,
            services,
            external: authorities(previous.map(|p| &p.external), "external"),
            dispatch_targets: authorities(previous.map(|p| &p.dispatch_targets), "dispatch"),
            nameservers: policy.nameservers.clone(),
            mesh: policy.mesh.clone().map(Arc::new),
            egress_allow: policy.egress.allow.clone().map(Arc::new),
            dispatch: policy.dispatch.clone(),
            request_timeout: policy.upstream.timeouts.request,
            max_header_size: policy.listeners.max_header_size,
            access_log: policy.access_log,
            pool,
            pool_generation,
            hub,
            shadow: Arc::new(policy.shadow.clone()),
            fanout: policy.fanout.clone(),
        }
    }

    /// The first snapshot, on the system clock and reporting to no monitor (unit tests and benches).
    pub fn from_policy(policy: &Policy) -> Self {
        Self::assemble(policy, 1, None, Hub::default())
    }

    /// The first snapshot of a sidecar whose breakers read `hub`'s clock and report to its monitor.
    pub fn shared(policy: &Policy, hub: Hub) -> SharedSnapshot {
        Arc::new(ArcSwap::from_pointee(Self::assemble(policy, 1, None, hub)))
    }
}

/// Whether two settings build the same upstream client.
fn same_pool(a: &UpstreamSettings, b: &UpstreamSettings) -> bool {
    a.timeouts.connect == b.timeouts.connect
        && a.idle_timeout == b.idle_timeout
        && a.max_connections == b.max_connections
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

    #[test]
    fn a_discovered_service_keeps_its_endpoints_across_a_policy_edit() {
        let policy = |timeout: &str, failures: u32| {
            Policy::from_yaml(
                "p",
                &format!(
                    "services:\n  a:\n    discovery:\n      hosts_file: /h.json\n    timeouts:\n      request: {timeout}\n    outlier_detection:\n      consecutive_failures: {failures}\n"
                ),
            )
            .unwrap()
        };
        let first = Snapshot::from_policy(&policy("1s", 3));
        let found = [
            Upstream::parse_endpoint("h:1").unwrap(),
            Upstream::parse_endpoint("h:2").unwrap(),
        ];
        let discovered =
            first.with_service("a", Arc::new(first.services["a"].with_endpoints(&found)));

        let edited = Snapshot::build(&policy("2s", 3), 2, Some(&discovered));
        let (before, after) = (&discovered.services["a"], &edited.services["a"]);
        assert_eq!(after.request_timeout(), Duration::from_secs(2));
        assert!(
            Arc::ptr_eq(&before.endpoints[1], &after.endpoints[1]),
            "state kept"
        );

        let stricter = Snapshot::build(&policy("2s", 5), 3, Some(&edited));
        let (before, after) = (&edited.services["a"], &stricter.services["a"]);
        assert_eq!(after.endpoints.len(), 2, "still the discovered set");
        assert!(
            !Arc::ptr_eq(&before.endpoints[1], &after.endpoints[1]),
            "new breakers"
        );
    }
}
