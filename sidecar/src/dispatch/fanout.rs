//! Fan-out: one app request sent to every target of a group in parallel, answered as the group's mode says.
//!
//! A group is chosen in the route phase ([`select`]): by the `fanout` header, or by the request's `Host` when
//! it has no `target`. The body is read whole (up to the group's `max_body`; past it 413 before anything is
//! sent) and every target gets the same bytes. Each target is a [`Leg`]: its own plan (its service's or URL
//! authority's resilience state, so its rate limit, breaker, concurrency slot, retries and budget apply), its
//! own span under the server span, and its own metrics. [`run`] sends one leg through the admit and attempt
//! phases; the modes ([`answer`]) decide what the app hears:
//! - `async`: 202 once every target has a queue slot; the legs go to the fan-out actor
//!   ([`crate::control::fanout`]);
//! - `first_success`: the first 2xx is relayed; the others are cancelled, or run on with their answers
//!   discarded;
//! - `all`: every leg is awaited, then the first 2xx (`prefer_success`) or non-2xx (`prefer_failure`) in the
//!   order written is relayed, or a JSON report of all of them answers (`report`).
//!
//! Every answer says what happened in `x-sidecar-fanout` (`ok=2,failed=1,timeout=0`). Answers not relayed are
//! read to their end in the background (so their connections stay pooled) or dropped past a bound.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::body::{BoxBody, EitherBody};
use actix_http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use actix_http::uri::Authority;
use actix_http::{Method, Response, StatusCode, Uri};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::admit::{Asking, Gates, admit};
use super::attempt::{Outbound, attempt};
use super::body::Whole;
use super::client::Clients;
use super::exchange::Seen;
use super::headers::{FANOUT, TARGET};
use super::respond::{ProxyBody, relay};
use super::route::{Plan, plan_target};
use crate::error::{Cause, ProxyError};
use crate::policy::fanout::{Answer, FanTarget, Group, Mode};
use crate::snapshot::Snapshot;
use crate::telemetry::{BytesIn, FanCounters, Hold, Instruments, RequestLabels, method_label};
use crate::traces;

/// What every fan-out answer says about its targets.
pub const FANOUT_HEADER: HeaderName = HeaderName::from_static("x-sidecar-fanout");

/// An answer not relayed is read to its end in the background up to this many bytes; a longer one is dropped
/// (its connection closed) rather than read for nothing.
const DISCARD_LIMIT: usize = 1 << 20;
/// And for at most this long.
const DISCARD_TIME: Duration = Duration::from_secs(5);

/// The group a request goes to: the `fanout` header's (a name no group has is refused: 503
/// `no-fanout-group`, as the seed answers a host no clone matches), else the group whose host is the request's
/// `Host`, for a request without a `target` header.
pub fn select(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Option<Arc<Group>>, ProxyError> {
    if let Some(value) = headers.get(FANOUT) {
        let name = value.to_str().map(str::trim).unwrap_or_default();
        return match snapshot.fanout.groups.get(name) {
            Some(group) => Ok(Some(group.clone())),
            None => Err(ProxyError::new(
                Cause::NoFanoutGroup,
                name,
                format!("no fan-out group named {name:?} in the policy"),
            )),
        };
    }
    if snapshot.fanout.is_empty() || headers.contains_key(TARGET) {
        return Ok(None);
    }
    Ok(headers
        .get(HOST)
        .and_then(|h| snapshot.fanout.by_host(h.as_bytes()))
        .cloned())
}

/// One target's request, owned: it runs on its own, on the worker or on the fan-out actor's thread.
#[derive(Debug)]
pub struct Leg {
    pub target: Arc<FanTarget>,
    /// Its plan, or why it has none (a service with no endpoints, for one).
    pub plan: Result<Plan, ProxyError>,
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub peer: Option<IpAddr>,
    pub body: Whole,
    /// The leg's span, child of the server span.
    pub trace: Option<opentelemetry::Context>,
}

/// The legs of a group, planned on the snapshot the request was routed with; each target gets the app's
/// headers (the sidecar's own are removed when its attempt is sent).
pub fn legs(
    snapshot: &Snapshot,
    group: &Group,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    started: Instant,
) -> Vec<(Arc<FanTarget>, Result<Plan, ProxyError>, HeaderMap)> {
    group
        .targets
        .iter()
        .map(|t| {
            let mut headers = headers.clone();
            let plan = plan_target(snapshot, &t.to, group.timeout, &mut headers, peer, started);
            (t.clone(), plan, headers)
        })
        .collect()
}

/// How one leg ended.
#[derive(Debug)]
pub struct Landed {
    pub target: Arc<FanTarget>,
    pub result: Result<awc::ClientResponse, ProxyError>,
    pub elapsed: Duration,
    pub upstream: Option<Authority>,
    pub attempts: u32,
    /// The target's concurrency slot, held until its answer is relayed or read.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What a leg's answer counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ok,
    Failed,
    Timeout,
}

impl Landed {
    pub fn kind(&self) -> Kind {
        match &self.result {
            Ok(r) if r.status().is_success() => Kind::Ok,
            Ok(_) => Kind::Failed,
            Err(e)
                if matches!(
                    e.cause,
                    Cause::RequestTimeout | Cause::TryTimeout | Cause::ConnectTimeout
                ) =>
            {
                Kind::Timeout
            }
            Err(_) => Kind::Failed,
        }
    }

    fn status(&self) -> StatusCode {
        match &self.result {
            Ok(r) => r.status(),
            Err(e) => e.cause.status(),
        }
    }
}

impl FanTarget {
    /// Its metric handles, made in the recorder of the thread that first needs them (every thread of a sidecar
    /// has that sidecar's).
    pub fn counters(&self) -> &FanCounters {
        self.counters
            .get_or_init(|| FanCounters::new(&self.group, &self.name))
    }
}

/// Sends one leg: the admit phase on its target's gates, then its attempts. `client` is the client for its
/// plan (`None` when it has no plan). Counts its outcome and ends its span.
pub async fn run(
    leg: Leg,
    client: Option<Result<awc::Client, ProxyError>>,
    instruments: Rc<Instruments>,
) -> Landed {
    let started = Instant::now();
    let Leg {
        target,
        plan,
        method,
        uri,
        headers,
        peer,
        body,
        trace,
    } = leg;
    let mut labels = RequestLabels {
        service: metrics::SharedString::const_str("fanout"),
        method: method_label(&method),
        upstream: None,
        attempts: 0,
        bytes_in: BytesIn::None,
    };
    let mut hold = Hold::default();
    let result = async {
        let plan = plan?;
        let client = match client {
            Some(c) => c?,
            None => {
                return Err(ProxyError::new(
                    Cause::BadTarget,
                    plan.upstreams.name(),
                    "no upstream client for the target",
                ));
            }
        };
        labels.service = plan.label.clone();
        let asking = Asking {
            headers: &headers,
            peer,
            label: &plan.label,
            deadline: plan.deadline,
            timeout: plan.timeout,
        };
        let ticket = admit(
            Gates::from(&*plan.target),
            asking,
            || plan.upstreams.name(),
            &instruments,
            &mut hold,
        )
        .await?;
        let mut body = body.body();
        let outbound = Outbound {
            method,
            uri: &uri,
            headers,
            peer,
        };
        let seen = Seen {
            labels: &mut labels,
            trace: trace.as_ref(),
        };
        attempt(
            &plan,
            &client,
            outbound,
            &mut body,
            ticket,
            seen,
            &instruments,
        )
        .await
    }
    .await;
    let landed = Landed {
        target,
        result,
        elapsed: started.elapsed(),
        upstream: labels.upstream.take(),
        attempts: labels.attempts,
        permit: hold.permit.take(),
    };
    let counters = landed.target.counters();
    counters.duration.record(landed.elapsed.as_secs_f64());
    match landed.kind() {
        Kind::Ok => counters.ok.increment(1),
        Kind::Failed => counters.failed.increment(1),
        Kind::Timeout => counters.timeout.increment(1),
    }
    if let Some(cx) = &trace {
        traces::end_client_span(
            cx,
            landed
                .result
                .as_ref()
                .map(|r| r.status())
                .map_err(|e| e.cause),
        );
    }
    landed
}

/// The tally of a fan-out: how many targets answered 2xx, failed, timed out, were cancelled or still run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub ok: usize,
    pub failed: usize,
    pub timeout: usize,
    pub cancelled: usize,
    pub running: usize,
}

impl Tally {
    fn of<'a>(landed: impl Iterator<Item = &'a Landed>) -> Self {
        let mut t = Tally::default();
        for l in landed {
            match l.kind() {
                Kind::Ok => t.ok += 1,
                Kind::Failed => t.failed += 1,
                Kind::Timeout => t.timeout += 1,
            }
        }
        t
    }

    /// The `x-sidecar-fanout` value: `ok=2,failed=1,timeout=0`, then `cancelled=` and `running=` when not 0.
    pub fn header(&self) -> HeaderValue {
        let mut text = format!(
            "ok={},failed={},timeout={}",
            self.ok, self.failed, self.timeout
        );
        if self.cancelled > 0 {
            text.push_str(&format!(",cancelled={}", self.cancelled));
        }
        if self.running > 0 {
            text.push_str(&format!(",running={}", self.running));
        }
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("ok=0"))
    }
}

/// What a synchronous fan-out answers with: the relayed response (or a target's refusal), and the winner's
/// upstream, attempts and concurrency slot for the request's telemetry.
#[derive(Debug)]
pub struct Answered {
    pub result: Result<Response<ProxyBody>, ProxyError>,
    pub upstream: Option<Authority>,
    pub attempts: u32,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Runs the legs of a `first_success` or `all` group on this worker and answers as its mode says.
pub async fn answer(
    group: &Group,
    legs: Vec<Leg>,
    clients: &Clients,
    instruments: &Rc<Instruments>,
) -> Answered {
    let count = legs.len();
    let mut running: FuturesUnordered<_> = legs
        .into_iter()
        .enumerate()
        .map(|(i, leg)| {
            let client = leg.plan.as_ref().ok().map(|p| clients.client_for(p));
            let instruments = instruments.clone();
            async move { (i, run(leg, client, instruments).await) }
        })
        .collect();
    let mut landed: Vec<Option<Landed>> = (0..count).map(|_| None).collect();
    let mut tally = Tally::default();
    let chosen = match group.mode {
        Mode::FirstSuccess => {
            let mut winner = None;
            while let Some((i, l)) = running.next().await {
                let ok = l.kind() == Kind::Ok;
                landed[i] = Some(l);
                if ok {
                    winner = Some(i);
                    break;
                }
            }
            let rest = running.len();
            if rest > 0 {
                if group.cancel_rest {
                    for (i, slot) in landed.iter().enumerate() {
                        if slot.is_none() {
                            group.targets[i].counters().cancelled.increment(1);
                        }
                    }
                    tally.cancelled = rest;
                    drop(running);
                } else {
                    tally.running = rest;
                    actix_rt::spawn(async move {
                        while let Some((_, l)) = running.next().await {
                            discard(l);
                        }
                    });
                }
            }
            winner.unwrap_or_else(|| choose(&landed, Answer::PreferSuccess))
        }
        Mode::All(answer) => {
            while let Some((i, l)) = running.next().await {
                landed[i] = Some(l);
            }
            if answer == Answer::Report {
                let all: Vec<Landed> = landed.into_iter().flatten().collect();
                return report(group, all).await;
            }
            choose(&landed, answer)
        }
        // Async groups never run here; answered as `all` would be, should one arrive.
        Mode::Async => {
            while let Some((i, l)) = running.next().await {
                landed[i] = Some(l);
            }
            choose(&landed, Answer::PreferSuccess)
        }
    };
    let counted = Tally::of(landed.iter().flatten());
    tally.ok = counted.ok;
    tally.failed = counted.failed;
    tally.timeout = counted.timeout;
    let header = tally.header();
    let mut winner = None;
    for (i, l) in landed.into_iter().enumerate() {
        match l {
            Some(l) if i == chosen => winner = Some(l),
            Some(l) => discard(l),
            None => {}
        }
    }
    let Some(winner) = winner else {
        return Answered {
            result: Err(ProxyError::new(
                Cause::NoFanoutGroup,
                group.name.to_string(),
                "no target of the group answered",
            )
            .with_header(FANOUT_HEADER, header)),
            upstream: None,
            attempts: 0,
            permit: None,
        };
    };
    let result = match winner.result {
        Ok(response) => {
            let mut res = relay(response);
            res.headers_mut().insert(FANOUT_HEADER, header);
            Ok(res)
        }
        Err(e) => Err(e.with_header(FANOUT_HEADER, header)),
    };
    Answered {
        result,
        upstream: winner.upstream,
        attempts: winner.attempts,
        permit: winner.permit,
    }
}

/// The index of the answer chosen among landed legs (in the order written): the first 2xx, or the first
/// non-2xx, as `answer` prefers; else the first leg.
fn choose(landed: &[Option<Landed>], answer: Answer) -> usize {
    let wanted = |l: &Landed| match answer {
        Answer::PreferFailure => l.kind() != Kind::Ok,
        Answer::PreferSuccess | Answer::Report => l.kind() == Kind::Ok,
    };
    landed
        .iter()
        .position(|l| l.as_ref().is_some_and(wanted))
        .or_else(|| landed.iter().position(Option::is_some))
        .unwrap_or(0)
}

/// Reads an answer nobody will see to its end in the background, so its connection goes back to the pool;
/// one longer than [`DISCARD_LIMIT`] or slower than [`DISCARD_TIME`] is dropped, which closes it.
pub fn discard(landed: Landed) {
    let Ok(mut response) = landed.result else {
        return;
    };
    let permit = landed.permit;
    actix_rt::spawn(async move {
        let reading = async {
            let mut read = 0;
            while let Some(Ok(chunk)) = response.next().await {
                read += chunk.len();
                if read > DISCARD_LIMIT {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIME, reading).await;
        drop(permit);
    });
}

/// `all` with `answer: report`: every target's status, headers, duration and body (up to the group's
/// `report_body`, marked when cut), as JSON. 200 when every target answered 2xx, else 502: a report of
/// failures is not a success.
async fn report(group: &Group, landed: Vec<Landed>) -> Answered {
    let tally = Tally::of(landed.iter());
    let limit = group.report_body;
    let entries = futures_util::future::join_all(landed.into_iter().map(|l| entry(l, limit))).await;
    let all_ok = tally.failed == 0 && tally.timeout == 0;
    let body = serde_json::json!({
        "group": &*group.name,
        "ok": tally.ok,
        "failed": tally.failed,
        "timeout": tally.timeout,
        "targets": entries,
    });
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let mut res = Response::with_body(
        status,
        EitherBody::right(BoxBody::new(Bytes::from(body.to_string()))),
    );
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(FANOUT_HEADER, tally.header());
    Answered {
        result: Ok(res),
        upstream: None,
        attempts: 0,
        permit: None,
    }
}

/// One target's entry in a report.
async fn entry(landed: Landed, limit: usize) -> serde_json::Value {
    use base64::Engine as _;
    let kind = landed.kind();
    let status = landed.status().as_u16();
    let duration_ms = landed.elapsed.as_secs_f64() * 1000.0;
    let mut value = serde_json::json!({
        "target": &*landed.target.name,
        "outcome": match kind { Kind::Ok => "ok", Kind::Failed => "failed", Kind::Timeout => "timeout" },
        "status": status,
        "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
        "attempts": landed.attempts,
    });
    match landed.result {
        Err(e) => {
            value["error"] = serde_json::json!(e.cause.as_str());
            value["detail"] = serde_json::json!(e.detail);
        }
        Ok(mut response) => {
            let mut headers = serde_json::Map::new();
            for (name, v) in response.headers() {
                let text = String::from_utf8_lossy(v.as_bytes()).into_owned();
                if let serde_json::Value::Array(list) = headers
                    .entry(name.as_str())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                {
                    list.push(serde_json::Value::String(text));
                }
            }
            value["headers"] = serde_json::Value::Object(headers);
            let mut kept = BytesMut::new();
            let mut truncated = false;
            let mut error = None;
            let reading = async {
                while let Some(chunk) = response.next().await {
                    match chunk {
                        Ok(chunk) => {
                            let room = limit - kept.len();
                            if chunk.len() > room {
                                kept.extend_from_slice(&chunk[..room]);
                                truncated = true;
                                break;
                            }
                            kept.extend_from_slice(&chunk);
                        }
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
            };
            if tokio::time::timeout(DISCARD_TIME, reading).await.is_err() {
                error = Some("the body did not end in time".to_string());
            }
            match std::str::from_utf8(&kept) {
                Ok(text) => value["body"] = serde_json::json!(text),
                Err(_) => {
                    value["body_base64"] =
                        serde_json::json!(base64::engine::general_purpose::STANDARD.encode(&kept))
                }
            }
            value["body_truncated"] = serde_json::json!(truncated);
            if let Some(e) = error {
                value["body_error"] = serde_json::json!(e);
            }
        }
    }
    value
}

/// The 202 of an async fan-out whose legs were queued.
pub fn accepted(queued: usize) -> Response<ProxyBody> {
    let mut res = Response::with_body(StatusCode::ACCEPTED, EitherBody::right(BoxBody::new(())));
    if let Ok(v) = HeaderValue::from_str(&format!("queued={queued}")) {
        res.headers_mut().insert(FANOUT_HEADER, v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_says_what_happened() {
        let t = Tally {
            ok: 2,
            failed: 1,
            ..Tally::default()
        };
        assert_eq!(t.header(), "ok=2,failed=1,timeout=0");
        let t = Tally {
            ok: 1,
            cancelled: 2,
            ..Tally::default()
        };
        assert_eq!(t.header(), "ok=1,failed=0,timeout=0,cancelled=2");
    }
}
