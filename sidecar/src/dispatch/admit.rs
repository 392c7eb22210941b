//! Phase **admit**: whether the target takes one more request now. In order: the rate limit (read on the
//! request's headers and client address), the circuit breaker, the concurrency slot (a bounded queue in front
//! of it, waited on until the request's deadline at most), and a deposit in the retry budget. Both listeners
//! use it: the egress listener with the target's state, the mesh inbound listener with its own limits in
//! front of the app.
//! May answer: 429 `rate-limited` (with `Retry-After`, `RateLimit-Policy` and `RateLimit`), 503
//! `circuit-open` (with `Retry-After`), 503 `overloaded`, 504 `request-timeout` (the deadline passed in the
//! queue). See `docs/request-path.md`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::header::{HeaderMap, HeaderName};
use metrics::SharedString;

use crate::error::{Cause, ProxyError};
use crate::resilience::Target;
use crate::resilience::breaker::{Admit, Breaker, Ticket};
use crate::resilience::budget::RetryBudget;
use crate::resilience::limits::{Concurrency, Overload, RateLimit};
use crate::telemetry::names::{CIRCUIT_OPEN, OVERLOADED, RATE_LIMITED};
use crate::telemetry::{Hold, Instruments};

/// draft-ietf-httpapi-ratelimit-headers: the quota policy.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// draft-ietf-httpapi-ratelimit-headers: what remains and when it resets.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// What admits a request to one target; each is optional.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gates<'a> {
    pub rate_limit: Option<&'a RateLimit>,
    pub breaker: Option<&'a Arc<Breaker>>,
    pub concurrency: Option<&'a Concurrency>,
    pub budget: Option<&'a RetryBudget>,
}

impl<'a> From<&'a Target> for Gates<'a> {
    fn from(target: &'a Target) -> Self {
        Self {
            rate_limit: target.rate_limit.as_ref(),
            breaker: target.breaker.as_ref(),
            concurrency: target.concurrency.as_ref(),
            budget: target.budget.as_ref(),
        }
    }
}

/// The request being admitted: what the gates read, and what a refusal names.
#[derive(Debug)]
pub struct Asking<'a> {
    /// The headers the rate limit's key is read from.
    pub headers: &'a HeaderMap,
    /// The client's address (a `source`-keyed rate limit).
    pub peer: Option<IpAddr>,
    /// The `service` label of the refusal counters.
    pub label: &'a SharedString,
    /// The request's deadline and its timeout (the queue wait ends at the deadline).
    pub deadline: Instant,
    pub timeout: Duration,
}

/// The admit phase. The concurrency slot goes into `hold` (released when the response body ends); the breaker's
/// ticket is returned, for the request's outcome.
pub async fn admit(
    gates: Gates<'_>,
    asking: Asking<'_>,
    target: impl Fn() -> String,
    instruments: &Instruments,
    hold: &mut Hold,
) -> Result<Option<Ticket>, ProxyError> {
    if let Some(limit) = gates.rate_limit
        && let Err(limited) = limit.check(asking.headers, asking.peer)
    {
        instruments.count(RATE_LIMITED, asking.label, None);
        return Err(
            ProxyError::new(Cause::RateLimited, target(), "over the rate limit")
                .retry_after(limited.retry_after)
                .with_header(RATELIMIT_POLICY, limit.policy_header().clone())
                .with_header(RATELIMIT, limit.refusal_header(limited)),
        );
    }
    let ticket = match gates.breaker.map(Breaker::admit) {
        None => None,
        Some(Admit::Pass(ticket)) => Some(ticket),
        Some(Admit::Refuse(wait)) => {
            instruments.count(CIRCUIT_OPEN, asking.label, None);
            return Err(ProxyError::new(
                Cause::CircuitOpen,
                target(),
                "the circuit breaker is open after repeated failures",
            )
            .retry_after(wait));
        }
    };
    if let Some(limit) = gates.concurrency {
        match limit.acquire(asking.deadline).await {
            Ok(permit) => hold.permit = Some(permit),
            Err(overload) => {
                instruments.count(OVERLOADED, asking.label, Some(overload.as_str()));
                return Err(overloaded(overload, asking.timeout, target()));
            }
        }
    }
    if let Some(budget) = gates.budget {
        budget.deposit();
    }
    Ok(ticket)
}

fn overloaded(overload: Overload, timeout: Duration, target: String) -> ProxyError {
    match overload {
        Overload::Deadline => ProxyError::new(
            Cause::RequestTimeout,
            target,
            format!("the request timeout ({timeout:?}) expired in the queue"),
        ),
        Overload::QueueFull => ProxyError::new(
            Cause::Overloaded,
            target,
            "too many requests in flight and the queue is full",
        ),
        Overload::QueueTimeout => ProxyError::new(
            Cause::Overloaded,
            target,
            "too many requests in flight; no slot came free within the queue timeout",
        ),
    }
}
