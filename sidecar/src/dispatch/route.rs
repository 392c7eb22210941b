//! Phase **route**: from a request's headers and the snapshot to one destination and its [`Plan`]: the
//! upstream (or service), its live resilience state, the request's deadline and consistent-hashing key.
//!
//! Pure and synchronous: no I/O, no actor. A `target` header wins; dispatch rules decide for requests without
//! one; with neither the request is refused. A worker parses each distinct `target` URL once ([`Targets`]): an
//! app calls the same few targets over and over. The plan owns what it took from the snapshot (reference
//! counts), so no snapshot guard is held while the request waits.
//! May answer: 400 `missing-target`, `bad-target`, `bad-internal-header`, `underscore-header`; 403
//! `egress-denied`; 503 `unknown-service`, `no-endpoints`. See `docs/request-path.md`.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;
use std::time::Instant;

use actix_http::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use metrics::SharedString;

use super::headers::{INTERNAL, TARGET};
use crate::balance::stable_hash;
use crate::error::{Cause, ProxyError};
use crate::fxhash::FxHashMap;
use crate::policy::copies::Copies;
use crate::policy::seed::Rewrite;
use crate::policy::traffic::{BalancerKind, HashKey};
use crate::resilience::Target;
use crate::snapshot::{Service, Snapshot};
use crate::upstream::Upstream;

/// Where one request goes and what is done to it on the way.
#[derive(Debug)]
pub struct Route<'a> {
    pub upstream: Dest<'a>,
    /// Headers set on the upstream request (dispatch rules' `patch`), replacing the app's.
    pub patch: &'a [(HeaderName, HeaderValue)],
    /// The dispatch rule's rewrite that `patch` comes from, for a plan to keep.
    pub rewrite: Option<&'a Arc<Rewrite>>,
    /// Append the client address to `X-Forwarded-For` (dispatch rules, as the seed does).
    pub forwarded_for: bool,
    pub request_timeout: Duration,
    /// The `service` label of its metrics: the service name, `external` or `dispatch`.
    pub label: SharedString,
}

/// Where the request goes: a URL parsed for this request, a dispatch destination, or a service whose
/// endpoint is chosen per attempt.
#[derive(Debug)]
pub enum Dest<'a> {
    Url(Arc<Upstream>),
    Dispatch(&'a Arc<Upstream>),
    Service(&'a Arc<Service>),
}

impl std::fmt::Display for Dest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Url(u) => u.fmt(f),
            Dest::Dispatch(u) => u.fmt(f),
            Dest::Service(s) => f.write_str(&s.name),
        }
    }
}

/// One worker's parsed `target` URLs, by the header's bytes. Parsing a URL costs two allocations and about
/// a third of the route phase; a cached one costs a hash lookup and a reference count. Bounded: at
/// [`Targets::CAPACITY`] distinct values the cache starts afresh, so an app sending ever-new targets costs
/// parsing, never memory. Only valid URLs are kept; the egress allow-list is checked on every request, since
/// a reload may change it.
#[derive(Debug, Default)]
pub struct Targets {
    parsed: RefCell<FxHashMap<Box<[u8]>, Arc<Upstream>>>,
}

impl Targets {
    pub const CAPACITY: usize = 256;

    fn parse(&self, text: &str) -> Result<Arc<Upstream>, &'static str> {
        if let Some(upstream) = self.parsed.borrow().get(text.as_bytes()) {
            return Ok(upstream.clone());
        }
        let upstream = Arc::new(Upstream::parse(text)?);
        let mut parsed = self.parsed.borrow_mut();
        if parsed.len() >= Self::CAPACITY {
            parsed.clear();
        }
        parsed.insert(text.as_bytes().into(), upstream.clone());
        Ok(upstream)
    }

    /// How many URLs are cached.
    pub fn len(&self) -> usize {
        self.parsed.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Picks the route for a request; `targets` is the worker's cache of parsed `target` URLs.
pub fn route<'a>(
    snapshot: &'a Snapshot,
    headers: &HeaderMap,
    targets: &Targets,
) -> Result<Route<'a>, ProxyError> {
    if let Some(target) = headers.get(TARGET) {
        return route_target(snapshot, target, headers.get(INTERNAL), targets);
    }
    match &snapshot.dispatch {
        Some(rules) => {
            let rewrite = rules.select(headers);
            Ok(Route {
                upstream: Dest::Dispatch(&rewrite.destination),
                patch: &rewrite.patch,
                rewrite: Some(rewrite),
                forwarded_for: true,
                request_timeout: snapshot.request_timeout,
                label: SharedString::const_str("dispatch"),
            })
        }
        None => Err(ProxyError::new(
            Cause::MissingTarget,
            "",
            "the request has no `target` header and no dispatch rules are configured",
        )),
    }
}

fn route_target<'a>(
    snapshot: &'a Snapshot,
    target: &HeaderValue,
    internal: Option<&HeaderValue>,
    targets: &Targets,
) -> Result<Route<'a>, ProxyError> {
    let text = target.to_str().map_err(|_| {
        ProxyError::new(
            Cause::BadTarget,
            "",
            "the `target` header is not visible ASCII",
        )
    })?;
    let internal = match internal.map(|v| v.as_bytes().trim_ascii()) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"true") => true,
        Some(v) if v.eq_ignore_ascii_case(b"false") => false,
        Some(_) => {
            return Err(ProxyError::new(
                Cause::BadInternal,
                text,
                "the `internal` header must be `true` or `false`",
            ));
        }
    };
    if internal {
        let name = text.trim();
        let service = snapshot.services.get(name).ok_or_else(|| {
            ProxyError::new(
                Cause::UnknownService,
                name,
                format!("no service named {name:?} in the service registry"),
            )
        })?;
        if service.endpoints.is_empty() {
            return Err(ProxyError::new(
                Cause::NoEndpoints,
                name,
                "the service has no endpoints",
            ));
        }
        return Ok(Route {
            upstream: Dest::Service(service),
            patch: &[],
            rewrite: None,
            forwarded_for: false,
            request_timeout: service.request_timeout(),
            label: SharedString::from(service.name.clone()),
        });
    }
    let upstream = targets.parse(text).map_err(|why| {
        let detail = if text.contains("://") {
            format!("`target` {why}")
        } else {
            format!("`target` {why} (a service name needs `internal: true`)")
        };
        ProxyError::new(Cause::BadTarget, text, detail)
    })?;
    if let Some(allow) = &snapshot.egress_allow
        && !allow.permits(upstream.host())
    {
        return Err(ProxyError::new(
            Cause::EgressDenied,
            text,
            format!(
                "{} is not in egress.allow (hosts or cidrs)",
                upstream.host()
            ),
        ));
    }
    Ok(Route {
        upstream: Dest::Url(upstream),
        patch: &[],
        rewrite: None,
        forwarded_for: false,
        request_timeout: snapshot.request_timeout,
        label: SharedString::const_str("external"),
    })
}

/// The destination and resilience state of one request, owned so that no snapshot guard is held across awaits.
#[derive(Debug)]
pub struct Plan {
    pub upstreams: Upstreams,
    /// The target's live resilience state: the service's, or the URL or dispatch authority's.
    pub target: Arc<Target>,
    /// The `service` label of its metrics: the service name, `external` or `dispatch`.
    pub label: SharedString,
    /// The request timeout's end: it bounds every attempt, backoff and queue wait together.
    pub deadline: Instant,
    pub timeout: std::time::Duration,
    /// The dispatch rule's rewrite: headers to patch, and `X-Forwarded-For` to append.
    pub rewrite: Option<Arc<Rewrite>>,
    /// The request's consistent-hashing key.
    pub hash: Option<u64>,
    /// For a `mesh: true` service: its name and this sidecar's mesh settings.
    pub mesh: Option<(Arc<str>, Arc<crate::policy::Mesh>)>,
    /// Whether attempt spans may carry the query (`access_log.query`), as the routing snapshot says.
    pub span_query: bool,
    /// The target's traffic copies, as the routing snapshot says.
    pub copies: Option<Copies>,
}

/// Where attempts go: one upstream, or an endpoint of a service chosen per attempt.
#[derive(Debug)]
pub enum Upstreams {
    One(Arc<Upstream>),
    Service(Arc<Service>),
}

impl Upstreams {
    /// The name in error responses: the upstream's URL or the service's name.
    pub fn name(&self) -> String {
        match self {
            Upstreams::One(u) => u.to_string(),
            Upstreams::Service(s) => s.name.to_string(),
        }
    }
}

impl Plan {
    /// Dispatch rules set `Host` themselves: keep theirs.
    pub fn host_patched(&self) -> bool {
        self.rewrite
            .as_ref()
            .is_some_and(|r| r.patch.iter().any(|(name, _)| name == HOST))
    }
}

/// The route phase: the route of a request whose head arrived at `started`, made into a plan; `label` is set
/// to the route's metrics label as soon as it is known (a refusal below still carries it). For a mesh service,
/// the app's header names with `_` are handled as `mesh.headers_with_underscores` says (dropped, or the request
/// refused) here, before anything is spent on the request.
pub fn plan(
    snapshot: &Snapshot,
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    targets: &Targets,
    started: Instant,
    label: &mut SharedString,
) -> Result<Plan, ProxyError> {
    let route = route(snapshot, headers, targets)?;
    *label = route.label.clone();
    plan_route(snapshot, route, headers, peer, started)
}

/// A fan-out target's plan: its service or URL as the route, with the group's timeout when that is shorter
/// than the target's own. The target's own copies are not made: the fan-out is the copy.
pub fn plan_target(
    snapshot: &Snapshot,
    to: &crate::policy::fanout::TargetTo,
    timeout: Option<Duration>,
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    started: Instant,
) -> Result<Plan, ProxyError> {
    use crate::policy::fanout::TargetTo;
    let route = match to {
        TargetTo::Service(name) => {
            let service = snapshot.services.get(&**name).ok_or_else(|| {
                ProxyError::new(
                    Cause::UnknownService,
                    name.to_string(),
                    format!("no service named {name:?} in the service registry"),
                )
            })?;
            if service.endpoints.is_empty() {
                return Err(ProxyError::new(
                    Cause::NoEndpoints,
                    name.to_string(),
                    "the service has no endpoints",
                ));
            }
            Route {
                upstream: Dest::Service(service),
                patch: &[],
                rewrite: None,
                forwarded_for: false,
                request_timeout: service.request_timeout(),
                label: SharedString::from(service.name.clone()),
            }
        }
        TargetTo::Url(u) => Route {
            upstream: Dest::Url(u.clone()),
            patch: &[],
            rewrite: None,
            forwarded_for: false,
            request_timeout: snapshot.request_timeout,
            label: SharedString::const_str("external"),
        },
    };
    let route = Route {
        request_timeout: timeout.map_or(route.request_timeout, |t| t.min(route.request_timeout)),
        ..route
    };
    let mut plan = plan_route(snapshot, route, headers, peer, started)?;
    plan.copies = None;
    Ok(plan)
}

/// A route made into a plan: its live resilience state, copies, hashing key and mesh settings.
fn plan_route(
    snapshot: &Snapshot,
    route: Route<'_>,
    headers: &mut HeaderMap,
    peer: Option<IpAddr>,
    started: Instant,
) -> Result<Plan, ProxyError> {
    let (upstreams, target, copies) = match route.upstream {
        Dest::Url(u) => {
            let target = snapshot.external.get(u.authority().as_str());
            let copies = snapshot.shadow.url(u.authority(), u.is_https()).cloned();
            (Upstreams::One(u), target, copies)
        }
        Dest::Dispatch(u) => {
            let target = snapshot.dispatch_targets.get(u.authority().as_str());
            let copies = route.rewrite.and_then(|r| r.copies.clone());
            (Upstreams::One(u.clone()), target, copies)
        }
        Dest::Service(s) => {
            let copies = snapshot.shadow.services.get(&*s.name).cloned();
            (Upstreams::Service(s.clone()), s.target.clone(), copies)
        }
    };
    let hash = match &upstreams {
        Upstreams::Service(s)
            if s.policy.resilience.balancer.kind == BalancerKind::ConsistentHash =>
        {
            Some(match &s.policy.resilience.balancer.hash_key {
                HashKey::Header(name) => headers.get(name).map_or(0, |v| stable_hash(v.as_bytes())),
                HashKey::Source => peer.map_or(0, |ip| match ip {
                    IpAddr::V4(ip) => stable_hash(&ip.octets()),
                    IpAddr::V6(ip) => stable_hash(&ip.octets()),
                }),
            })
        }
        _ => None,
    };
    let mesh = match &upstreams {
        Upstreams::Service(s) if s.policy.mesh => {
            snapshot.mesh.clone().map(|m| (s.name.clone(), m))
        }
        _ => None,
    };
    if let Some((_, m)) = &mesh {
        super::headers::underscores(headers, m.headers_with_underscores, "outbound").map_err(
            |name| {
                ProxyError::new(
                    Cause::UnderscoreHeader,
                    upstreams.name(),
                    format!(
                        "the header name {name} has '_' (mesh.headers_with_underscores: reject)"
                    ),
                )
            },
        )?;
    }
    Ok(Plan {
        label: route.label,
        rewrite: route.rewrite.cloned(),
        deadline: started + route.request_timeout,
        timeout: route.request_timeout,
        span_query: snapshot.access_log.query,
        upstreams,
        target,
        hash,
        mesh,
        copies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    /// Routes with a cache of its own: one request's view.
    fn route_once<'a>(s: &'a Snapshot, h: &HeaderMap) -> Result<Route<'a>, ProxyError> {
        route(s, h, &Targets::default())
    }

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::from_policy(&Policy::from_yaml("t.yaml", yaml).unwrap())
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    const WITH_RULES: &str = "services:\n  orders:\n    endpoints: ['10.0.0.1:80', '10.0.0.2:80']\ndispatch:\n  key: environment\n  destination: http://default:1\n  rewrites:\n    dev:\n      destination: http://dev:1\n      patch:\n        - key: Host\n          val: example.com\n";

    #[test]
    fn target_wins_over_dispatch_rules() {
        let s = snapshot(WITH_RULES);
        let r = route_once(
            &s,
            &headers(&[("target", "http://t:9/x"), ("environment", "dev")]),
        )
        .unwrap();
        assert_eq!(r.upstream.to_string(), "http://t:9/x");
        assert!(r.patch.is_empty());
    }

    #[test]
    fn dispatch_rules_match_the_value_exactly() {
        let s = snapshot(WITH_RULES);
        let dev = route_once(&s, &headers(&[("environment", "dev")])).unwrap();
        assert_eq!(dev.upstream.to_string(), "http://dev:1");
        assert_eq!(dev.patch.len(), 1);
        let other = route_once(&s, &headers(&[("environment", "Dev")])).unwrap();
        assert_eq!(other.upstream.to_string(), "http://default:1");
        let missing = route_once(&s, &headers(&[])).unwrap();
        assert_eq!(missing.upstream.to_string(), "http://default:1");
        assert!(missing.forwarded_for);
    }

    #[test]
    fn internal_targets_resolve_through_the_registry() {
        let s = snapshot(WITH_RULES);
        let h = headers(&[("target", "orders"), ("internal", "TRUE")]);
        assert_eq!(route_once(&s, &h).unwrap().upstream.to_string(), "orders");
        let orders = &s.services["orders"];
        let a = orders.pick(None, None);
        assert!(a.is_some());
        assert_ne!(
            orders.pick(a, None),
            a,
            "a failed endpoint is avoided on retry"
        );
        let unknown = route_once(
            &s,
            &headers(&[("target", "payments"), ("internal", "true")]),
        );
        assert_eq!(unknown.unwrap_err().cause, Cause::UnknownService);
    }

    #[test]
    fn refusals_are_precise() {
        let s = snapshot("{}");
        let cause = |h| route_once(&s, &h).unwrap_err().cause;
        assert_eq!(cause(headers(&[])), Cause::MissingTarget);
        assert_eq!(cause(headers(&[("target", "orders")])), Cause::BadTarget);
        assert_eq!(
            cause(headers(&[("target", "orders"), ("internal", "yes")])),
            Cause::BadInternal
        );
    }

    #[test]
    fn a_worker_parses_each_target_once_and_stays_bounded() {
        let s = snapshot("{}");
        let targets = Targets::default();
        let h = headers(&[("target", "http://t:9/x")]);
        let first = route(&s, &h, &targets).unwrap();
        let again = route(&s, &h, &targets).unwrap();
        let (Dest::Url(a), Dest::Url(b)) = (first.upstream, again.upstream) else {
            panic!("URL targets route to URLs");
        };
        assert!(Arc::ptr_eq(&a, &b), "the second request reuses the parse");
        assert_eq!(targets.len(), 1);
        let guarded = snapshot("egress:\n  allow:\n    hosts: [other]\n");
        assert_eq!(
            route(&guarded, &h, &targets).unwrap_err().cause,
            Cause::EgressDenied,
            "a cached target still passes the allow-list of the policy now"
        );

        let bad = headers(&[("target", "ftp://t/x")]);
        assert_eq!(
            route(&s, &bad, &targets).unwrap_err().cause,
            Cause::BadTarget
        );
        assert_eq!(targets.len(), 1, "refused targets are not kept");

        for i in 0..Targets::CAPACITY + 10 {
            let text = format!("http://t{i}:9");
            let mut h = HeaderMap::new();
            h.insert(TARGET, HeaderValue::from_str(&text).unwrap());
            let r = route(&s, &h, &targets).unwrap();
            assert_eq!(r.upstream.to_string(), text);
        }
        assert!(targets.len() <= Targets::CAPACITY);
    }
}
