//! The request path: one app request in, one upstream request out, the upstream's response streamed back.
//!
//! Phases, in order (see `docs/request-path.md`):
//! 1. **snapshot**: two `ArcSwap` loads of the policy view: one for the access log settings when the request
//!    arrives, one for routing (a reload in between can make them two versions);
//! 2. **guard**: head size limit;
//! 3. **route**: `target` / `internal` headers or dispatch rules pick the upstream ([`super::route`]);
//! 4. **rewrite**: upstream URI, hop-by-hop and sidecar headers removed, `Host`, patch, `X-Forwarded-For`;
//! 5. **send**: the request body streams to the upstream with back pressure, under the request timeout;
//! 6. **respond**: status and end-to-end headers relayed as they are, the body streamed with its framing.
//!
//! Any failure becomes a [`ProxyError`] response. No actor round trip and no header copy: the app's header
//! map is moved into the upstream request and the upstream's into the response. Not lock-free: a request
//! may take the retry budget's `Mutex` (deposit, and withdraw on a retry), the breaker records' `Mutex`es of
//! the service and the endpoint (outcomes, and admission while tripped), the URL authorities' `RwLock`
//! (lookup, write on a new authority) and, under a keyed rate limit, that limiter's key map `RwLock`.

use std::cell::Cell;
use std::mem;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::body::{self, BodySize, BodyStream, BoxBody, EitherBody, MessageBody, SizedStream};
use actix_http::error::PayloadError;
use actix_http::header::{
    CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING,
};
use actix_http::{Method, Payload, Request, RequestHead, Response, StatusCode};
use awc::FrozenClientRequest;
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};

use super::headers::{append_forwarded_for, head_size, strip_hop_by_hop, strip_request};
use super::route::{Dest, Targets, route};
use crate::access_log::{Record, Sampler};
use crate::balance::stable_hash;
use crate::error::{Cause, ProxyError};
use crate::policy::traffic::Retries;
use crate::policy::traffic::{BalancerKind, HashKey};
use crate::resilience::Target;
use crate::resilience::breaker::{Admit, Breaker, Ticket};
use crate::resilience::limits::Overload;
use crate::resilience::monitor;
use crate::resilience::retry::{Attempt, backoff, idempotent, retry_after};
use crate::snapshot::{InFlight, Service, SharedSnapshot};
use crate::telemetry::{BytesIn, Counted, Hold, Instruments, RequestLabels, Timed, method_label};
use crate::traces;
use crate::upstream::Upstream;
use metrics::SharedString;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

type UpstreamBody = awc::ClientResponse;
/// The response body: the upstream's, with or without a known length, or the sidecar's own error body.
pub type ProxyBody =
    EitherBody<EitherBody<SizedStream<UpstreamBody>, BodyStream<UpstreamBody>>, BoxBody>;

/// How many attempts the sidecar made for a response.
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-sidecar-attempts");
/// The `x-sidecar-attempts` value: a static one for the counts retries usually reach, so the common response
/// costs no allocation.
fn attempts_value(attempts: u32) -> HeaderValue {
    match attempts {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        4 => HeaderValue::from_static("4"),
        n => HeaderValue::from(n),
    }
}

/// draft-ietf-httpapi-ratelimit-headers: the quota policy.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// draft-ietf-httpapi-ratelimit-headers: what remains and when it resets.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// One worker's forwarder: the shared snapshot and the worker's own upstream client.
pub struct Forwarder {
    snapshot: SharedSnapshot,
    /// TLS settings of the shared client, kept to rebuild it.
    tls: Arc<rustls::ClientConfig>,
    /// The snapshot's `pool_generation` that `client` and `settings` were built for.
    generation: Cell<u64>,
    client: std::cell::RefCell<awc::Client>,
    /// Pool settings of `client`, and of the mesh clients built on first use.
    settings: std::cell::RefCell<Arc<crate::policy::UpstreamSettings>>,
    /// This sidecar's mesh certificates, when the policy had a `mesh` section at start-up.
    identity: Option<Arc<crate::mesh::Identity>>,
    /// One mTLS client per `mesh: true` service (each verifies that service's identity), built on first use.
    mesh_clients: std::cell::RefCell<std::collections::HashMap<Arc<str>, awc::Client>>,
    /// The `target` URLs this worker has parsed.
    targets: Targets,
    instruments: Instruments,
    sampler: Sampler,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Builds the worker's client from the snapshot's pool settings and `tls`; the mesh clients are built with
    /// the same pool settings, on `identity`.
    pub fn new(
        snapshot: SharedSnapshot,
        tls: Arc<rustls::ClientConfig>,
        identity: Option<Arc<crate::mesh::Identity>>,
    ) -> Self {
        let (generation, settings) = {
            let s = snapshot.load();
            (s.pool_generation, s.pool.clone())
        };
        Self {
            client: std::cell::RefCell::new(super::client::build(&settings, tls.clone())),
            snapshot,
            tls,
            generation: Cell::new(generation),
            settings: std::cell::RefCell::new(settings),
            identity,
            mesh_clients: std::cell::RefCell::default(),
            targets: Targets::default(),
            instruments: Instruments::default(),
            sampler: Sampler::default(),
        }
    }

    /// Rebuilds the clients when a reload changed the pool settings; requests in flight keep the old client,
    /// whose idle connections close when the last of them ends.
    fn follow_pool(&self, snapshot: &crate::snapshot::Snapshot) {
        if snapshot.pool_generation == self.generation.get() {
            return;
        }
        self.generation.set(snapshot.pool_generation);
        *self.client.borrow_mut() = super::client::build(&snapshot.pool, self.tls.clone());
        *self.settings.borrow_mut() = snapshot.pool.clone();
        self.mesh_clients.borrow_mut().clear();
    }

    /// The client for a plan: the shared one, or the mesh client that verifies the service's identity.
    fn client_for(&self, plan: &Plan) -> Result<awc::Client, ProxyError> {
        let Some((service, mesh)) = &plan.mesh else {
            return Ok(self.client.borrow().clone());
        };
        if let Some(c) = self.mesh_clients.borrow().get(service) {
            return Ok(c.clone());
        }
        let Some(identity) = &self.identity else {
            return Err(ProxyError::new(
                Cause::UpstreamTls,
                service.to_string(),
                "this sidecar started without a mesh section: restart it to call mesh services",
            ));
        };
        let config = identity.client_config(crate::certs::spiffe_id(&mesh.trust_domain, service));
        let client = super::client::build(&self.settings.borrow(), Arc::new(config));
        self.mesh_clients
            .borrow_mut()
            .insert(service.clone(), client.clone());
        Ok(client)
    }

    /// Handles one app request. Never fails: errors become responses.
    pub async fn handle(&self, req: Request) -> Response<Timed<ProxyBody>> {
        let started = Instant::now();
        let trace = traces::get().and_then(|t| traces::server_span(t, &req, "http"));
        let in_flight = self.instruments.in_flight();
        let log = self.snapshot.load().access_log;
        let mut record = (log.enabled && self.sampler.sample(log.sample)).then(|| {
            Record::arriving(
                &req,
                "egress",
                SharedString::const_str("none"),
                log.query,
                trace.as_ref().and_then(traces::trace_id),
                None,
            )
        });
        let mut labels = RequestLabels {
            service: SharedString::const_str("none"),
            method: method_label(req.method()),
            upstream: None,
            attempts: 0,
            bytes_in: BytesIn::None,
        };
        let mut hold = Hold::default();
        let forwarded = self
            .forward(req, started, &mut labels, &mut hold, trace.as_ref())
            .await;
        let (mut res, outcome) = match forwarded {
            Ok(res) => (res, "ok"),
            Err(e) => {
                tracing::debug!(cause = %e.cause, target = %e.target, detail = %e.detail, "request refused");
                (
                    e.to_response().map_body(|_, b| EitherBody::right(b)),
                    e.cause.as_str(),
                )
            }
        };
        if labels.attempts > 0 {
            res.headers_mut()
                .insert(ATTEMPTS, attempts_value(labels.attempts));
        }
        if let Some(cx) = trace {
            traces::record_server_outcome(&cx, res.status(), outcome);
            // Ended when the response body ends, with the request's duration.
            hold.trace = Some(cx);
        }
        let histogram = self
            .instruments
            .server_histogram(&labels, res.status(), outcome);
        let log = record.take().map(|mut r| {
            r.service = labels.service.clone();
            r.status = res.status().as_u16();
            r.upstream = labels.upstream.take();
            r.attempts = labels.attempts;
            r.error = (outcome != "ok").then_some(outcome);
            (r, mem::take(&mut labels.bytes_in))
        });
        res.map_body(|_, body| Timed::new(body, histogram, started, in_flight, log, hold))
    }

    async fn forward(
        &self,
        req: Request,
        started: Instant,
        labels: &mut RequestLabels,
        hold: &mut Hold,
        trace: Option<&Context>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let peer = req.peer_addr();
        let (mut head, payload) = req.into_parts();
        let framing = request_body(&head);
        let method = mem::replace(&mut head.method, Method::GET);

        // Everything that needs the snapshot happens in this block: the guard is released before the upstream
        // is awaited, so a slow upstream never pins an old policy.
        let (plan, headers) = {
            let snapshot = self.snapshot.load();
            self.follow_pool(&snapshot);
            if head_size(&head) > snapshot.max_header_size {
                return Err(ProxyError::new(
                    Cause::HeadersTooLarge,
                    "",
                    format!(
                        "the request header section is over {} bytes",
                        snapshot.max_header_size
                    ),
                ));
            }
            let route = route(&snapshot, &head.headers, &self.targets)?;
            labels.service = route.label.clone();
            let (upstreams, target) = match route.upstream {
                Dest::Url(u) => {
                    let target = snapshot.external.get(u.authority().as_str());
                    (Upstreams::One(u), target)
                }
                Dest::Dispatch(u) => {
                    let target = snapshot.dispatch_targets.get(u.authority().as_str());
                    (Upstreams::One(u.clone()), target)
                }
                Dest::Service(s) => (Upstreams::Service(s.clone()), s.target.clone()),
            };
            // The rate limit reads the app's headers as they came, before any patch.
            if let Some(limit) = &target.rate_limit
                && let Err(limited) = limit.check(&head.headers, peer.map(|p| p.ip()))
            {
                metrics::counter!(monitor::RATE_LIMITED, "service" => labels.service.clone())
                    .increment(1);
                return Err(ProxyError::new(
                    Cause::RateLimited,
                    upstreams.name(),
                    "over the rate limit",
                )
                .retry_after(limited.retry_after)
                .with_header(RATELIMIT_POLICY, limit.policy_header().clone())
                .with_header(RATELIMIT, limit.refusal_header(limited)));
            }
            // Read before the app's header map is moved into the upstream request below.
            let hash = match &upstreams {
                Upstreams::Service(s)
                    if s.policy.resilience.balancer.kind == BalancerKind::ConsistentHash =>
                {
                    Some(match &s.policy.resilience.balancer.hash_key {
                        HashKey::Header(name) => head
                            .headers
                            .get(name)
                            .map_or(0, |v| stable_hash(v.as_bytes())),
                        HashKey::Source => peer.map_or(0, |p| match p.ip() {
                            std::net::IpAddr::V4(ip) => stable_hash(&ip.octets()),
                            std::net::IpAddr::V6(ip) => stable_hash(&ip.octets()),
                        }),
                    })
                }
                _ => None,
            };
            let mut headers = mem::take(&mut head.headers);
            strip_request(&mut headers);
            for (name, value) in route.patch {
                headers.insert(name.clone(), value.clone());
            }
            if route.forwarded_for
                && let Some(peer) = peer
            {
                append_forwarded_for(&mut headers, peer.ip());
            }
            let mesh = match &upstreams {
                Upstreams::Service(s) if s.policy.mesh => {
                    snapshot.mesh.clone().map(|m| (s.name.clone(), m))
                }
                _ => None,
            };
            if let Some((_, m)) = &mesh {
                super::headers::underscores(&mut headers, m.headers_with_underscores, "outbound")
                    .map_err(|name| {
                    ProxyError::new(
                        Cause::UnderscoreHeader,
                        upstreams.name(),
                        format!(
                            "the header name {name} has '_' (mesh.headers_with_underscores: reject)"
                        ),
                    )
                })?;
            }
            let plan = Plan {
                mesh,
                hash,
                host_patched: route.patch.iter().any(|(name, _)| name == HOST),
                upstreams,
                target,
                deadline: started + route.request_timeout,
                timeout: route.request_timeout,
                span_query: snapshot.access_log.query,
            };
            (plan, headers)
        };
        let target = &plan.target;
        let retries = &target.policy.retries;

        let mut ticket = match target.breaker.as_ref().map(Breaker::admit) {
            None => None,
            Some(Admit::Pass(ticket)) => Some(ticket),
            Some(Admit::Refuse(wait)) => {
                metrics::counter!(monitor::CIRCUIT_OPEN, "service" => labels.service.clone())
                    .increment(1);
                return Err(ProxyError::new(
                    Cause::CircuitOpen,
                    plan.upstreams.name(),
                    "the circuit breaker is open after repeated failures",
                )
                .retry_after(wait));
            }
        };
        if let Some(limit) = &target.concurrency {
            match limit.acquire(plan.deadline).await {
                Ok(permit) => hold.permit = Some(permit),
                Err(overload) => {
                    metrics::counter!(
                        monitor::OVERLOADED,
                        "service" => labels.service.clone(),
                        "reason" => overload.as_str(),
                    )
                    .increment(1);
                    let (cause, detail) = match overload {
                        Overload::Deadline => (
                            Cause::RequestTimeout,
                            format!("the request timeout ({:?}) expired in the queue", plan.timeout),
                        ),
                        Overload::QueueFull => (
                            Cause::Overloaded,
                            "too many requests in flight and the queue is full".to_string(),
                        ),
                        Overload::QueueTimeout => (
                            Cause::Overloaded,
                            "too many requests in flight; no slot came free within the queue timeout"
                                .to_string(),
                        ),
                    };
                    return Err(ProxyError::new(cause, plan.upstreams.name(), detail));
                }
            }
        }
        if let Some(budget) = &target.budget {
            budget.deposit();
        }

        let client = self.client_for(&plan)?;
        let mut body = Body::read(framing, payload, retries, plan.deadline, labels).await?;
        let mut request: Option<(usize, FrozenClientRequest)> = None;
        let mut headers = Some(headers);
        let mut avoid = None;
        loop {
            let Chosen {
                index,
                upstream,
                ticket: endpoint_ticket,
                load,
            } = plan.choose(avoid)?;
            let frozen = match request.take() {
                Some((i, frozen)) if i == index => frozen,
                previous => {
                    // A new endpoint: its own URI and Host. The app's headers are moved into the first request
                    // and copied only when a retry goes elsewhere.
                    let mut map = match (headers.take(), &previous) {
                        (Some(h), _) => h,
                        (None, Some((_, p))) => p.headers().clone(),
                        (None, None) => HeaderMap::new(),
                    };
                    if !plan.host_patched {
                        map.insert(HOST, upstream.host_header().clone());
                    }
                    let uri = upstream.uri_for(&head.uri).map_err(|why| {
                        ProxyError::new(Cause::BadTarget, upstream.to_string(), why)
                    })?;
                    let mut builder = client.request(method.clone(), uri).no_decompress();
                    *builder.headers_mut() = map;
                    builder.freeze().map_err(|e| {
                        ProxyError::new(Cause::BadTarget, upstream.to_string(), e.to_string())
                    })?
                }
            };
            labels.upstream = Some(upstream.authority().clone());
            labels.attempts += 1;

            let now = Instant::now();
            let remaining = plan.deadline.saturating_duration_since(now);
            let (limit, per_try) = match target.policy.per_try {
                Some(p) if p < remaining => (p, true),
                _ => (remaining, false),
            };
            let attempt_span =
                trace.map(|cx| client_span(cx, &frozen, labels.attempts, plan.span_query));
            let sending = match &attempt_span {
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
            let attempt = match &result {
                Ok(response) => {
                    self.instruments
                        .record_attempt(labels, elapsed, Some(response.status()), "ok");
                    Attempt::Status(response.status().as_u16())
                }
                Err(e) => {
                    self.instruments
                        .record_attempt(labels, elapsed, None, e.cause.as_str());
                    Attempt::Failed(e.cause)
                }
            };
            if let Some(t) = endpoint_ticket {
                t.record(attempt.is_failure());
            }
            if let Some(load) = load {
                load.observe();
            }
            if let Some(cx) = attempt_span {
                end_client_span(&cx, &result);
            }

            let decision = self.decide(&plan, &method, &body, attempt, &result, labels.attempts);
            match decision {
                Decision::Retry(wait) => {
                    metrics::counter!(
                        monitor::RETRIES,
                        "service" => labels.service.clone(),
                        "reason" => attempt.reason(),
                    )
                    .increment(1);
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
                    metrics::counter!(
                        monitor::RETRIES_SKIPPED,
                        "service" => labels.service.clone(),
                        "reason" => reason,
                    )
                    .increment(1);
                }
                Decision::Done => {}
            }
            if let Some(t) = ticket.take() {
                t.record(attempt.is_failure());
            }
            return result.map(relay);
        }
    }

    /// Whether to retry after an attempt, and after how long.
    fn decide(
        &self,
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
}

/// The span of one upstream attempt, child of the server span. Its `url.full` leaves the query out unless the
/// access log's `query` option lets queries (which often carry tokens) leave the process.
fn client_span(
    parent: &Context,
    request: &FrozenClientRequest,
    attempt: u32,
    query: bool,
) -> Context {
    let Some(traces) = traces::get() else {
        return parent.clone();
    };
    let uri = request.get_uri();
    let url = if query {
        uri.to_string()
    } else {
        let authority = uri.authority().map_or("", |a| a.as_str());
        format!(
            "{}://{authority}{}",
            uri.scheme_str().unwrap_or("http"),
            uri.path()
        )
    };
    let mut attributes = vec![
        KeyValue::new(
            "http.request.method",
            request.get_method().as_str().to_string(),
        ),
        KeyValue::new("server.address", uri.host().unwrap_or_default().to_string()),
        KeyValue::new("url.full", url),
    ];
    if let Some(port) = uri.port_u16() {
        attributes.push(KeyValue::new("server.port", i64::from(port)));
    }
    if attempt > 1 {
        attributes.push(KeyValue::new(
            "http.request.resend_count",
            i64::from(attempt - 1),
        ));
    }
    let span = traces
        .tracer
        .span_builder(request.get_method().as_str().to_string())
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .start_with_context(&traces.tracer, parent);
    let parent_id = traces::ParentSpanId(parent.span().span_context().span_id());
    parent.with_span(span).with_value(parent_id)
}

fn end_client_span(cx: &Context, result: &Result<awc::ClientResponse, ProxyError>) {
    let span = cx.span();
    match result {
        Ok(response) => {
            let status = response.status();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_server_error() {
                span.set_attribute(KeyValue::new("error.type", status.as_str().to_string()));
                span.set_status(Status::error(status.as_str().to_string()));
            }
        }
        Err(e) => {
            span.set_attribute(KeyValue::new("error.type", e.cause.as_str()));
            span.set_status(Status::error(e.cause.as_str()));
        }
    }
    span.end();
}

/// The destination and resilience state of one request, owned so no snapshot guard is held across awaits.
struct Plan {
    upstreams: Upstreams,
    target: Arc<Target>,
    /// The request timeout's end: it bounds every attempt, backoff and queue wait together.
    deadline: Instant,
    timeout: Duration,
    /// Dispatch rules set `Host` themselves: keep theirs.
    host_patched: bool,
    /// The request's consistent-hashing key.
    hash: Option<u64>,
    /// For a `mesh: true` service: its name and this sidecar's mesh settings.
    mesh: Option<(Arc<str>, Arc<crate::policy::Mesh>)>,
    /// Whether attempt spans may carry the query (`access_log.query`), as the routing snapshot says.
    span_query: bool,
}

enum Upstreams {
    One(Arc<Upstream>),
    Service(Arc<Service>),
}

impl Upstreams {
    fn name(&self) -> String {
        match self {
            Upstreams::One(u) => u.to_string(),
            Upstreams::Service(s) => s.name.to_string(),
        }
    }
}

impl Plan {
    /// The upstream for the next attempt, with the endpoint breaker's admission when it has one.
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

/// The app's request body, kept for replay when it is small enough, streamed once otherwise.
enum Body {
    None,
    Empty,
    Replay(Bytes),
    /// Kept for replay, sent chunked as the app sent it.
    ReplayChunked(Bytes),
    Sized(u64, Option<Payload>),
    Stream(Option<BoxedPayload>),
}

impl Body {
    /// Reads a body of up to `max_body` bytes into memory when retries are on; streams anything larger.
    async fn read(
        framing: BodySize,
        payload: Payload,
        retries: &Retries,
        deadline: Instant,
        labels: &mut RequestLabels,
    ) -> Result<Self, ProxyError> {
        let keep = retries.max_retries > 0;
        match framing {
            BodySize::None => Ok(Body::None),
            BodySize::Sized(0) => Ok(Body::Empty),
            BodySize::Sized(n) if keep && n <= retries.max_body as u64 => {
                labels.bytes_in = BytesIn::Known(n);
                let (chunks, rest) = collect(payload, retries.max_body, deadline).await?;
                match rest {
                    None => Ok(Body::Replay(concat(chunks))),
                    // More bytes than announced: the codec refuses that before we see it, so this only keeps
                    // the stream intact rather than cutting it.
                    Some(rest) => Ok(Body::Sized(
                        n,
                        Some(Payload::from(Box::pin(
                            stream::iter(chunks.into_iter().map(Ok)).chain(rest),
                        ) as BoxedPayload)),
                    )),
                }
            }
            BodySize::Sized(n) => {
                labels.bytes_in = BytesIn::Known(n);
                Ok(Body::Sized(n, Some(payload)))
            }
            BodySize::Stream => {
                let count = Rc::new(Cell::new(0));
                labels.bytes_in = BytesIn::Counted(count.clone());
                if keep {
                    let (chunks, rest) = collect(payload, retries.max_body, deadline).await?;
                    match rest {
                        None => {
                            let body = concat(chunks);
                            count.set(body.len() as u64);
                            return Ok(Body::ReplayChunked(body));
                        }
                        Some(rest) => {
                            let all = stream::iter(chunks.into_iter().map(Ok)).chain(rest);
                            return Ok(Body::Stream(Some(Box::pin(Counted::new(all, count)))));
                        }
                    }
                }
                Ok(Body::Stream(Some(Box::pin(Counted::new(payload, count)))))
            }
        }
    }

    /// Whether a retry can send the same body again.
    fn replayable(&self) -> bool {
        matches!(
            self,
            Body::None | Body::Empty | Body::Replay(_) | Body::ReplayChunked(_)
        )
    }

    /// Sends the request with this body; a streamed body goes with its first attempt.
    fn send(&mut self, request: impl Sender) -> awc::SendClientRequest {
        match self {
            // `send()` would add `content-length: 0` to every GET.
            Body::None => request.body(body::None::new()),
            Body::Empty => request.body(()),
            Body::Replay(bytes) => request.body(bytes.clone()),
            Body::ReplayChunked(bytes) => {
                request.stream(Box::pin(stream::once(std::future::ready(Ok::<
                    _,
                    PayloadError,
                >(
                    bytes.clone()
                )))))
            }
            Body::Sized(n, payload) => match payload.take() {
                Some(p) => request.body(SizedStream::new(*n, p)),
                None => request.body(()),
            },
            Body::Stream(stream) => match stream.take() {
                Some(s) => request.stream(s),
                None => request.body(()),
            },
        }
    }
}

/// What a body is sent with: the frozen request as it is, or with this attempt's extra headers.
trait Sender {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest;
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest;
}

impl Sender for &FrozenClientRequest {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest {
        self.send_body(body)
    }
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest {
        self.send_stream(stream)
    }
}

impl Sender for awc::FrozenSendBuilder {
    fn body(self, body: impl MessageBody + 'static) -> awc::SendClientRequest {
        self.send_body(body)
    }
    fn stream(self, stream: BoxedPayload) -> awc::SendClientRequest {
        self.send_stream(stream)
    }
}

type BoxedPayload = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// Reads the body until it ends (`None` rest) or passes `limit` bytes (the rest of the stream returned), by the
/// request's deadline.
async fn collect(
    mut payload: Payload,
    limit: usize,
    deadline: Instant,
) -> Result<(Vec<Bytes>, Option<Payload>), ProxyError> {
    let mut chunks = Vec::new();
    let mut read = 0;
    let reading = async {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ProxyError::new(
                    Cause::RequestBody,
                    "",
                    format!("reading the request body: {e}"),
                )
            })?;
            read += chunk.len();
            chunks.push(chunk);
            if read > limit {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let complete = tokio::time::timeout_at(deadline.into(), reading)
        .await
        .map_err(|_| {
            ProxyError::new(
                Cause::RequestTimeout,
                "",
                "the request body did not arrive within the request timeout",
            )
        })??;
    Ok((chunks, (!complete).then_some(payload)))
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}

/// The framing of the app's request body, read before its headers are moved.
pub(crate) fn request_body(head: &RequestHead) -> BodySize {
    if head
        .headers
        .contains_key(actix_http::header::TRANSFER_ENCODING)
    {
        // The codec has already refused anything but a final `chunked` coding.
        return BodySize::Stream;
    }
    content_length(&head.headers).map_or(BodySize::None, BodySize::Sized)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Turns the upstream's response into the app's: status and end-to-end headers as they are (the header map is
/// moved, not copied), the body streamed with the upstream's framing.
///
/// An HTTP/1.1 response with both `Transfer-Encoding: chunked` and `Content-Length` was decoded by its chunks
/// (the codec lets chunked win, RFC 9112 §6.3): its length is dropped and the body goes to the app chunked, so
/// the app never receives a length that disagrees with the body. Several `Content-Length` values, equal or
/// not, never get here: the codec refuses them and the app gets 502 `upstream-protocol-error`.
pub(crate) fn relay(response: awc::ClientResponse) -> Response<ProxyBody> {
    let status = response.status();
    let chunked = response.version() == actix_http::Version::HTTP_11
        && response
            .headers()
            .get(TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"));
    let mut headers = HeaderMap::new();
    let response = response.map_body(|head, payload: Payload<_>| {
        headers = mem::take(&mut head.headers);
        payload
    });
    strip_hop_by_hop(&mut headers);
    if chunked && headers.remove(CONTENT_LENGTH).next().is_some() {
        tracing::debug!(
            %status,
            "upstream response had Content-Length beside chunked framing: length dropped"
        );
    }
    let length = content_length(&headers);

    let body = if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        // No body follows, whatever `Content-Length` says (a 304 keeps it as a header). Dropping the upstream
        // response closes its connection rather than waiting for bytes that will not come.
        drop(response);
        EitherBody::right(BoxBody::new(()))
    } else {
        match length {
            // For HEAD the upstream's length is kept and no byte follows (the codec writes none).
            Some(n) => EitherBody::left(EitherBody::left(SizedStream::new(n, response))),
            None => EitherBody::left(EitherBody::right(BodyStream::new(response))),
        }
    };
    let mut res = Response::with_body(status, body);
    *res.headers_mut() = headers;
    res
}

// Keep the body type honest: both arms must be message bodies for `Response<ProxyBody>`.
const _: fn() = || {
    fn is_body<B: MessageBody>() {}
    is_body::<ProxyBody>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_values_are_the_count() {
        for n in [1, 2, 3, 4, 5, 17] {
            assert_eq!(
                attempts_value(n).to_str().ok(),
                Some(n.to_string().as_str())
            );
        }
    }
}
