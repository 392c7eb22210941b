//! Phase **attempt**: the upstream request, sent until an answer is final. The upstream head is written once
//! (the app's header map moved, not copied: hop-by-hop and sidecar headers removed, dispatch `patch`,
//! `X-Forwarded-For`); then each attempt runs four steps:
//! - **choose**: the endpoint (the service's balancer, avoiding the last one tried; its outlier breaker admits
//!   it) or the one upstream;
//! - **send**: the frozen head and the body, under the per-try timeout or what is left of the request's;
//! - **classify**: the response head's status, or the failure's [`Cause`], which the error table classes for
//!   retries and breakers ([`Cause::class`]); recorded on the endpoint's breaker, its load and the attempt's
//!   span and histogram;
//! - **decide**: retry after a backoff (or the upstream's `Retry-After`) when the policy's conditions, the
//!   method, the body, the deadline and the retry budget allow; else the answer is final and recorded on the
//!   target's breaker.
//!
//! May answer: 502 (`upstream-*`), 503 `no-healthy-endpoint` (every endpoint ejected), 504 `connect-timeout`,
//! `per-try-timeout`, `request-timeout`; 400 `bad-target`, `request-body-error`. See `docs/request-path.md`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use actix_http::header::{HOST, HeaderMap};
use actix_http::{Method, Uri};
use awc::FrozenClientRequest;

use super::body::Body;
use super::exchange::Seen;
use super::headers::{append_forwarded_for, strip_request};
use super::route::{Plan, Upstreams};
use crate::error::{Cause, ProxyError};
use crate::resilience::breaker::{Admit, Breaker, Ticket};
use crate::resilience::retry::{Attempt, backoff, idempotent, retry_after};
use crate::snapshot::{InFlight, Service};
use crate::telemetry::Instruments;
use crate::telemetry::names::{RETRIES, RETRIES_SKIPPED};
use crate::traces;
use crate::upstream::Upstream;

/// The request the attempts send: its method and URI, the app's headers and the client's address.
#[derive(Debug)]
pub struct Outbound<'a> {
    pub method: Method,
    pub uri: &'a Uri,
    pub headers: HeaderMap,
    pub peer: Option<IpAddr>,
}

/// The attempt phase: attempts until one is final; its response (or failure) is the request's. `ticket` is
/// the target breaker's admission, recorded with the final outcome.
pub async fn attempt(
    plan: &Plan,
    client: &awc::Client,
    outbound: Outbound<'_>,
    body: &mut Body,
    mut ticket: Option<Ticket>,
    seen: Seen<'_>,
    instruments: &Instruments,
) -> Result<awc::ClientResponse, ProxyError> {
    let Outbound {
        method,
        uri,
        headers,
        peer,
    } = outbound;
    let mut headers = Some(rewrite(plan, headers, peer));
    let host_patched = plan.host_patched();
    let Seen { labels, trace } = seen;
    let mut request: Option<(usize, FrozenClientRequest)> = None;
    let mut avoid = None;
    loop {
        // Choose.
        let Chosen {
            index,
            upstream,
            ticket: endpoint_ticket,
            load,
        } = plan.choose(avoid)?;
        let frozen = match request.take() {
            Some((i, frozen)) if i == index => frozen,
            previous => {
                // A new endpoint: its own URI and Host. The app's headers are moved into the first request and
                // copied only when a retry goes elsewhere.
                let mut map = match (headers.take(), &previous) {
                    (Some(h), _) => h,
                    (None, Some((_, p))) => p.headers().clone(),
                    (None, None) => HeaderMap::new(),
                };
                if !host_patched {
                    map.insert(HOST, upstream.host_header().clone());
                }
                let target = upstream
                    .uri_for(uri)
                    .map_err(|why| ProxyError::new(Cause::BadTarget, upstream.to_string(), why))?;
                let mut builder = client.request(method.clone(), target).no_decompress();
                *builder.headers_mut() = map;
                builder.freeze().map_err(|e| {
                    ProxyError::new(Cause::BadTarget, upstream.to_string(), e.to_string())
                })?
            }
        };
        labels.upstream = Some(upstream.authority().clone());
        labels.attempts += 1;

        // Send.
        let now = Instant::now();
        let remaining = plan.deadline.saturating_duration_since(now);
        let (limit, per_try) = match plan.target.policy.per_try {
            Some(p) if p < remaining => (p, true),
            _ => (remaining, false),
        };
        let span = trace.map(|cx| {
            traces::client_span(
                cx,
                frozen.get_method(),
                frozen.get_uri(),
                labels.attempts,
                plan.span_query,
            )
        });
        let sending = match &span {
            Some(cx) => {
                // Each attempt is its own span: the upstream sees it as its parent.
                let mut extra = HeaderMap::new();
                traces::inject(cx, frozen.headers(), &mut extra);
                body.send(frozen.extra_headers(extra))
            }
            None => body.send(&frozen),
        };
        // The attempt's deadline from the clock read just taken, not from another one.
        let result = tokio::time::timeout_at((now + limit).into(), sending).await;
        let elapsed = now.elapsed();

        // Classify.
        let result = match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ProxyError::from_send(&e, frozen.get_uri().to_string())),
            Err(_elapsed) if per_try => Err(ProxyError::new(
                Cause::TryTimeout,
                frozen.get_uri().to_string(),
                format!("no response head within the per-try timeout ({limit:?})"),
            )),
            Err(_elapsed) => Err(ProxyError::new(
                Cause::RequestTimeout,
                frozen.get_uri().to_string(),
                format!(
                    "no response head within the request timeout ({:?}, {} attempt(s))",
                    plan.timeout, labels.attempts
                ),
            )),
        };
        let outcome = match &result {
            Ok(response) => {
                instruments.record_attempt(labels, elapsed, Some(response.status()), "ok");
                Attempt::Status(response.status().as_u16())
            }
            Err(e) => {
                instruments.record_attempt(labels, elapsed, None, e.cause.as_str());
                Attempt::Failed(e.cause)
            }
        };
        if let Some(t) = endpoint_ticket {
            t.record(outcome.is_failure());
        }
        if let Some(load) = load {
            load.observe();
        }
        if let Some(cx) = span {
            traces::end_client_span(
                &cx,
                result.as_ref().map(|r| r.status()).map_err(|e| e.cause),
            );
        }

        // Decide.
        match decide(plan, &method, body, outcome, &result, labels.attempts) {
            Decision::Retry(wait) => {
                instruments.count(RETRIES, &labels.service, Some(outcome.reason()));
                // An unread error body closes its connection when dropped; the pool keeps the others.
                drop(result);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                avoid = Some(index);
                request = Some((index, frozen));
                continue;
            }
            Decision::Skip(reason) => {
                instruments.count(RETRIES_SKIPPED, &labels.service, Some(reason));
            }
            Decision::Done => {}
        }
        if let Some(t) = ticket.take() {
            t.record(outcome.is_failure());
        }
        return result;
    }
}

/// The upstream head's headers from the app's: hop-by-hop and sidecar headers removed, the dispatch rule's
/// patch set and the client appended to `X-Forwarded-For` (as the seed dispatcher does).
pub(super) fn rewrite(plan: &Plan, mut headers: HeaderMap, peer: Option<IpAddr>) -> HeaderMap {
    strip_request(&mut headers);
    if let Some(rewrite) = &plan.rewrite {
        for (name, value) in &rewrite.patch {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(peer) = peer {
            append_forwarded_for(&mut headers, peer);
        }
    }
    headers
}

impl Plan {
    /// The choose step: the upstream for the next attempt, with the endpoint breaker's admission when it has
    /// one.
    fn choose(&self, avoid: Option<usize>) -> Result<Chosen<'_>, ProxyError> {
        let service = match &self.upstreams {
            Upstreams::One(u) => {
                return Ok(Chosen {
                    index: 0,
                    upstream: u,
                    ticket: None,
                    load: None,
                });
            }
            Upstreams::Service(s) => s,
        };
        let refused = |service: &Service| {
            let wait = (0..service.endpoints.len())
                .filter_map(|i| service.outlier(i).map(|b| b.remaining_open()))
                .min()
                .unwrap_or_default();
            ProxyError::new(
                Cause::NoHealthyEndpoint,
                service.name.to_string(),
                "every endpoint of the service is ejected after failures",
            )
            .retry_after(wait)
        };
        let index = service
            .pick(avoid, self.hash)
            .ok_or_else(|| refused(service))?;
        let endpoint = &service.endpoints[index];
        let ticket = match service.outlier(index).map(Breaker::admit) {
            None => None,
            Some(Admit::Pass(t)) => Some(t),
            Some(Admit::Refuse(_)) => return Err(refused(service)),
        };
        Ok(Chosen {
            index,
            upstream: &endpoint.upstream,
            ticket,
            load: Some(service.begin(index)),
        })
    }
}

/// The endpoint of one attempt: its breaker admission and its load count.
struct Chosen<'a> {
    index: usize,
    upstream: &'a Upstream,
    ticket: Option<Ticket>,
    load: Option<InFlight>,
}

enum Decision {
    Retry(Duration),
    /// The conditions called for a retry that the policy does not allow now: the reason, counted.
    Skip(&'static str),
    Done,
}

/// The decide step: whether to retry after an attempt, and after how long.
fn decide(
    plan: &Plan,
    method: &Method,
    body: &Body,
    attempt: Attempt,
    result: &Result<awc::ClientResponse, ProxyError>,
    attempts: u32,
) -> Decision {
    let retries = &plan.target.policy.retries;
    if !attempt.matches(retries) {
        return Decision::Done;
    }
    if attempts > retries.max_retries {
        return if retries.max_retries == 0 {
            Decision::Done
        } else {
            Decision::Skip("attempts")
        };
    }
    if !(idempotent(method) || retries.non_idempotent || attempt.never_sent()) {
        return Decision::Skip("method");
    }
    if !body.replayable() {
        return Decision::Skip("body_not_replayable");
    }
    let asked = match (attempt, result) {
        (Attempt::Status(429 | 503), Ok(response)) => retry_after(response.headers()),
        _ => None,
    };
    let wait = match asked {
        Some(wait) if wait > retries.retry_after_max => {
            return Decision::Skip("retry_after_too_long");
        }
        Some(wait) => wait,
        None => backoff(retries, attempts),
    };
    if Instant::now() + wait >= plan.deadline {
        return Decision::Skip("deadline");
    }
    if let Some(budget) = &plan.target.budget
        && !budget.try_withdraw()
    {
        return Decision::Skip("budget_exhausted");
    }
    Decision::Retry(wait)
}
