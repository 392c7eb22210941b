//! The request path, as its phases: one app request in, one upstream request out, the upstream's response
//! streamed back. The phases, what each may answer and the chart with the retry edge are in
//! `docs/request-path.md`; [`super::PHASES`] names them, a module each:
//! [`guard`](super::guard) → [`route`](super::route) → [`admit`](super::admit) → [`body`](super::body) →
//! [`attempt`](super::attempt) (choose, send, classify, decide) → [`respond`](super::respond), over one
//! per-request context ([`Exchange`]).
//!
//! Any failure becomes a [`ProxyError`] response. No actor round trip and no header copy: the app's header
//! map is moved into the upstream request and the upstream's into the response. No lock either: what the
//! shared per-target state costs instead is in `docs/request-path.md`.

use std::mem;
use std::rc::Rc;
use std::sync::Arc;

use actix_http::{Method, Request, Response};

use super::admit::{Asking, Gates, admit};
use super::attempt::{Outbound, attempt};
use super::body::{Body, request_body};
use super::client::Clients;
use super::exchange::{Exchange, Listener};
use super::fanout;
use super::guard::guard;
use super::respond::{ATTEMPTS, ProxyBody, answer, attempts_value, finish, relay};
use super::route::{Plan, Targets, plan};
use super::shadow;
use crate::access_log::Sampler;
use crate::control::fanout::FanoutJob;
use crate::control::shadow::Meet;
use crate::error::{Cause, ProxyError};
use crate::policy::fanout::Mode;
use crate::snapshot::SharedSnapshot;
use crate::telemetry::{Instruments, Timed};

/// The egress listener, as the exchange names it.
const EGRESS: Listener = Listener {
    direction: "egress",
    scheme: "http",
    service: "none",
};

/// One worker's forwarder: the shared snapshot and the worker's own upstream clients.
pub struct Forwarder {
    snapshot: SharedSnapshot,
    clients: Clients,
    /// The `target` URLs this worker has parsed.
    targets: Targets,
    instruments: Rc<Instruments>,
    sampler: Sampler,
    /// This sidecar's shadow actor, which sends traffic copies.
    shadows: crate::control::shadow::Shadows,
    /// This sidecar's fan-out actor, which sends the fan-outs answered at once.
    fanouts: crate::control::fanout::Fanouts,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Builds the worker's clients from the snapshot's pool settings, `tls` and `identity`.
    pub fn new(
        snapshot: SharedSnapshot,
        tls: Arc<rustls::ClientConfig>,
        identity: Option<Arc<crate::mesh::Identity>>,
        shadows: crate::control::shadow::Shadows,
        fanouts: crate::control::fanout::Fanouts,
    ) -> Self {
        let clients = Clients::new(&snapshot.load(), tls, identity);
        Self {
            snapshot,
            clients,
            targets: Targets::default(),
            instruments: Rc::default(),
            sampler: Sampler::default(),
            shadows,
            fanouts,
        }
    }

    /// Handles one app request. Never fails: errors become responses.
    pub async fn handle(&self, req: Request) -> Response<Timed<ProxyBody>> {
        let log = self.snapshot.load().access_log;
        let mut exchange =
            Exchange::arriving(&req, EGRESS, log, &self.instruments, &self.sampler, None);
        let mut meets = Vec::new();
        let result = self.forward(req, &mut exchange, &mut meets).await;
        let (mut res, outcome) = answer(result);
        for (meet, copy) in meets {
            meet.primary(res.status().as_u16(), &copy);
        }
        if exchange.labels.attempts > 0 {
            res.headers_mut()
                .insert(ATTEMPTS, attempts_value(exchange.labels.attempts));
        }
        finish(exchange, res, outcome, &self.instruments, None)
    }

    /// The phases, in order; the first refusal is the answer.
    async fn forward(
        &self,
        req: Request,
        exchange: &mut Exchange,
        meets: &mut Vec<(Arc<Meet>, Arc<crate::policy::copies::Copy>)>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let peer = req.peer_addr().map(|p| p.ip());
        let (mut head, payload) = req.into_parts();
        let framing = request_body(&head);
        let method = mem::replace(&mut head.method, Method::GET);

        // Everything that needs the snapshot happens in this block: the guard is released before anything is
        // awaited, so a slow upstream never pins an old policy.
        let (plan, picked) = {
            let snapshot = self.snapshot.load();
            self.clients.follow_pool(&snapshot);
            guard(&head, snapshot.max_header_size)?;
            if let Some(group) = fanout::select(&snapshot, &head.headers)? {
                exchange.labels.service = metrics::SharedString::from(group.label.clone());
                let planned =
                    fanout::legs(&snapshot, &group, &head.headers, peer, exchange.started);
                let deadline = exchange.started + group.timeout.unwrap_or(snapshot.request_timeout);
                drop(snapshot);
                let request = Fanned {
                    group,
                    planned,
                    deadline,
                    method,
                    uri: head.uri.clone(),
                    peer,
                };
                return self.fan_out(request, framing, payload, exchange).await;
            }
            let plan = plan(
                &snapshot,
                &mut head.headers,
                peer,
                &self.targets,
                exchange.started,
                &mut exchange.labels.service,
            )?;
            let picked = shadow::pick(&snapshot, plan.copies.as_ref(), &method, &head.headers);
            (plan, picked)
        };

        let asking = Asking {
            headers: &head.headers,
            peer,
            label: &plan.label,
            deadline: plan.deadline,
            timeout: plan.timeout,
        };
        let ticket = admit(
            Gates::from(&*plan.target),
            asking,
            || plan.upstreams.name(),
            &self.instruments,
            &mut exchange.hold,
        )
        .await?;

        let client = self.clients.client_for(&plan)?;
        let retries = &plan.target.policy.retries;
        let replay = (retries.max_retries > 0).then_some(retries.max_body);
        let mut body = Body::read(
            framing,
            payload,
            replay,
            plan.deadline,
            &mut exchange.labels,
        )
        .await?;
        if !picked.is_empty() {
            let copy = shadow::Primary {
                plan: &plan,
                method: &method,
                uri: &head.uri,
                headers: &head.headers,
                peer,
                trace: exchange.trace(),
            };
            let handed = shadow::hand_off(picked, copy, &mut body, &self.shadows, meets);
            if let Some(record) = &mut exchange.record {
                record.copies = handed;
            }
        }

        let headers = mem::take(&mut head.headers);
        let outbound = Outbound {
            method,
            uri: &head.uri,
            headers,
            peer,
        };
        attempt(
            &plan,
            &client,
            outbound,
            &mut body,
            ticket,
            exchange.seen(),
            &self.instruments,
        )
        .await
        .map(relay)
    }

    /// A fan-out group's request: the body read whole (past the group's `max_body`: 413 before anything is
    /// sent), one leg per target, answered as the group's mode says.
    async fn fan_out(
        &self,
        request: Fanned,
        framing: actix_http::body::BodySize,
        payload: actix_http::Payload,
        exchange: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Fanned {
            group,
            planned,
            deadline,
            method,
            uri,
            peer,
        } = request;
        let too_large = || {
            ProxyError::new(
                Cause::BodyTooLarge,
                group.name.to_string(),
                format!(
                    "the request body is over the fan-out group's max_body ({}); nothing was sent",
                    crate::policy::units::format_size(group.max_body as u64)
                ),
            )
        };
        if let actix_http::body::BodySize::Sized(n) = framing
            && n > group.max_body as u64
        {
            return Err(too_large());
        }
        let body = Body::read(
            framing,
            payload,
            Some(group.max_body),
            deadline,
            &mut exchange.labels,
        )
        .await?;
        let whole = body.whole().ok_or_else(too_large)?;
        let legs: Vec<fanout::Leg> = planned
            .into_iter()
            .map(|(target, plan, headers)| fanout::Leg {
                trace: exchange
                    .trace()
                    .map(|cx| crate::traces::fanout_span(cx, &group.name, &target.name)),
                target,
                plan,
                method: method.clone(),
                uri: uri.clone(),
                headers,
                peer,
                body: whole.clone(),
            })
            .collect();
        if group.mode == Mode::Async {
            let slots = group.slots().map_err(|full| {
                full.counters().queue_full.increment(1);
                ProxyError::new(
                    Cause::Overloaded,
                    full.name.to_string(),
                    "the fan-out queue of this target is full",
                )
            })?;
            let queued = legs.len();
            let job = FanoutJob {
                group: group.clone(),
                legs,
                slots,
            };
            self.fanouts.offer(job).map_err(|job| {
                for t in &job.group.targets {
                    t.counters().queue_full.increment(1);
                }
                ProxyError::new(
                    Cause::Overloaded,
                    group.name.to_string(),
                    "the fan-out queue of this sidecar is full",
                )
            })?;
            if let Some(record) = &mut exchange.record {
                record.fanout = Some(format!("queued={queued}").into());
            }
            return Ok(fanout::accepted(queued));
        }
        let answered = fanout::answer(&group, legs, &self.clients, &self.instruments).await;
        if let Some(record) = &mut exchange.record {
            let tally = match &answered.result {
                Ok(res) => res.headers().get(fanout::FANOUT_HEADER),
                Err(e) => e
                    .headers
                    .iter()
                    .find(|(name, _)| *name == fanout::FANOUT_HEADER)
                    .map(|(_, v)| v),
            };
            record.fanout = tally.and_then(|v| v.to_str().ok()).map(Into::into);
        }
        exchange.labels.upstream = answered.upstream;
        exchange.labels.attempts = answered.attempts;
        if answered.permit.is_some() {
            exchange.hold.permit = answered.permit;
        }
        answered.result
    }
}

/// A request routed to a fan-out group: the group, each target's plan and headers, the deadline its body is
/// read by, and what every leg sends.
struct Fanned {
    group: Arc<crate::policy::fanout::Group>,
    planned: Vec<(
        Arc<crate::policy::fanout::FanTarget>,
        Result<Plan, ProxyError>,
        actix_http::header::HeaderMap,
    )>,
    deadline: std::time::Instant,
    method: Method,
    uri: actix_http::Uri,
    peer: Option<std::net::IpAddr>,
}
