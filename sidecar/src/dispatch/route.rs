//! Route selection: from a request's headers and the snapshot to one upstream, with the patch to apply.
//!
//! Pure and synchronous: no I/O, no locks, no actor. A `target` header wins; dispatch rules decide for requests
//! without one; with neither the request is refused.

use std::sync::Arc;
use std::time::Duration;

use actix_http::header::{HeaderMap, HeaderName, HeaderValue};
use metrics::SharedString;

use super::headers::{INTERNAL, TARGET};
use super::target::Upstream;
use crate::error::{Cause, ProxyError};
use crate::snapshot::{Service, Snapshot};

/// Where one request goes and what is done to it on the way.
#[derive(Debug)]
pub struct Route<'a> {
    pub upstream: Dest<'a>,
    /// Headers set on the upstream request (dispatch rules' `patch`), replacing the app's.
    pub patch: &'a [(HeaderName, HeaderValue)],
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
    Url(Upstream),
    Dispatch(&'a Upstream),
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

/// Picks the route for a request.
pub fn route<'a>(snapshot: &'a Snapshot, headers: &HeaderMap) -> Result<Route<'a>, ProxyError> {
    if let Some(target) = headers.get(TARGET) {
        return route_target(snapshot, target, headers.get(INTERNAL));
    }
    match &snapshot.dispatch {
        Some(rules) => {
            let rewrite = rules.select(headers);
            Ok(Route {
                upstream: Dest::Dispatch(&rewrite.destination),
                patch: &rewrite.patch,
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
            forwarded_for: false,
            request_timeout: service.request_timeout(),
            label: SharedString::from(service.name.clone()),
        });
    }
    let upstream = Upstream::parse(text).map_err(|why| {
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
        forwarded_for: false,
        request_timeout: snapshot.request_timeout,
        label: SharedString::const_str("external"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

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
        let r = route(
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
        let dev = route(&s, &headers(&[("environment", "dev")])).unwrap();
        assert_eq!(dev.upstream.to_string(), "http://dev:1");
        assert_eq!(dev.patch.len(), 1);
        let other = route(&s, &headers(&[("environment", "Dev")])).unwrap();
        assert_eq!(other.upstream.to_string(), "http://default:1");
        let missing = route(&s, &headers(&[])).unwrap();
        assert_eq!(missing.upstream.to_string(), "http://default:1");
        assert!(missing.forwarded_for);
    }

    #[test]
    fn internal_targets_resolve_through_the_registry() {
        let s = snapshot(WITH_RULES);
        let h = headers(&[("target", "orders"), ("internal", "TRUE")]);
        assert_eq!(route(&s, &h).unwrap().upstream.to_string(), "orders");
        let orders = &s.services["orders"];
        let a = orders.pick(None, None);
        assert!(a.is_some());
        assert_ne!(
            orders.pick(a, None),
            a,
            "a failed endpoint is avoided on retry"
        );
        let unknown = route(
            &s,
            &headers(&[("target", "payments"), ("internal", "true")]),
        );
        assert_eq!(unknown.unwrap_err().cause, Cause::UnknownService);
    }

    #[test]
    fn refusals_are_precise() {
        let s = snapshot("{}");
        let cause = |h| route(&s, &h).unwrap_err().cause;
        assert_eq!(cause(headers(&[])), Cause::MissingTarget);
        assert_eq!(cause(headers(&[("target", "orders")])), Cause::BadTarget);
        assert_eq!(
            cause(headers(&[("target", "orders"), ("internal", "yes")])),
            Cause::BadInternal
        );
    }
}
