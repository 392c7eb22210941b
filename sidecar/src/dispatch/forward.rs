//! The request path: one app request in, one upstream request out, the upstream's response streamed back.
//!
//! Phases, in order (see `docs/request-path.md`):
//! 1. **snapshot**: one `ArcSwap` load of the policy view;
//! 2. **guard**: head size limit;
//! 3. **route**: `target` / `internal` headers or dispatch rules pick the upstream ([`super::route`]);
//! 4. **rewrite**: upstream URI, hop-by-hop and sidecar headers removed, `Host`, patch, `X-Forwarded-For`;
//! 5. **send**: the request body streams to the upstream with back pressure, under the request timeout;
//! 6. **respond**: status and end-to-end headers relayed as they are, the body streamed with its framing.
//!
//! Any failure becomes a [`ProxyError`] response. No lock, no actor round trip, no header copy: the app's
//! header map is moved into the upstream request and the upstream's into the response.

use std::cell::Cell;
use std::mem;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use actix_http::body::{self, BodySize, BodyStream, BoxBody, EitherBody, MessageBody, SizedStream};
use actix_http::header::{CONTENT_LENGTH, HOST, HeaderMap};
use actix_http::{Method, Payload, Request, RequestHead, Response, StatusCode};

use super::headers::{append_forwarded_for, head_size, strip_hop_by_hop, strip_request};
use super::route::route;
use crate::access_log::{Record, Sampler};
use crate::error::{Cause, ProxyError};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::{BytesIn, Counted, Instruments, RequestLabels, Timed, method_label};
use metrics::SharedString;

type Upstream = awc::ClientResponse;
/// The response body: the upstream's, with or without a known length, or the sidecar's own error body.
pub type ProxyBody = EitherBody<EitherBody<SizedStream<Upstream>, BodyStream<Upstream>>, BoxBody>;

/// One worker's forwarder: the shared snapshot and the worker's own upstream client.
pub struct Forwarder {
    snapshot: SharedSnapshot,
    client: awc::Client,
    instruments: Instruments,
    sampler: Sampler,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(snapshot: SharedSnapshot, client: awc::Client) -> Self {
        Self {
            snapshot,
            client,
            instruments: Instruments::default(),
            sampler: Sampler::default(),
        }
    }

    /// Handles one app request. Never fails: errors become responses.
    pub async fn handle(&self, req: Request) -> Response<Timed<ProxyBody>> {
        let started = Instant::now();
        let in_flight = self.instruments.in_flight();
        let log = self.snapshot.load().access_log;
        let mut record = (log.enabled && self.sampler.sample(log.sample)).then(|| Record {
            time: SystemTime::now(),
            method: req.method().clone(),
            service: SharedString::const_str("none"),
            path: logged_path(req.uri(), log.query),
            status: 0,
            upstream: None,
            attempts: 0,
            duration: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
        });
        let mut labels = RequestLabels {
            service: SharedString::const_str("none"),
            method: method_label(req.method()),
            upstream: None,
            attempts: 0,
            bytes_in: BytesIn::None,
        };
        let (res, outcome) = match self.forward(req, &mut labels).await {
            Ok(res) => (res, "ok"),
            Err(e) => {
                tracing::debug!(cause = %e.cause, target = %e.target, detail = %e.detail, "request refused");
                (
                    e.to_response().map_body(|_, b| EitherBody::right(b)),
                    e.cause.as_str(),
                )
            }
        };
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
        res.map_body(|_, body| Timed::new(body, histogram, started, in_flight, log))
    }

    async fn forward(
        &self,
        req: Request,
        labels: &mut RequestLabels,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let peer = req.peer_addr();
        let (mut head, payload) = req.into_parts();
        let body = request_body(&head);
        let method = mem::replace(&mut head.method, Method::GET);

        // Everything that needs the snapshot happens in this block: the guard is released before the upstream
        // is awaited, so a slow upstream never pins an old policy.
        let (uri, headers, timeout) = {
            let snapshot = self.snapshot.load();
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
            let route = route(&snapshot, &head.headers)?;
            let uri = route.upstream.uri_for(&head.uri).map_err(|why| {
                ProxyError::new(Cause::BadTarget, route.upstream.to_string(), why)
            })?;
            let mut headers = mem::take(&mut head.headers);
            strip_request(&mut headers);
            headers.insert(HOST, route.upstream.host_header().clone());
            for (name, value) in route.patch {
                headers.insert(name.clone(), value.clone());
            }
            if route.forwarded_for
                && let Some(peer) = peer
            {
                append_forwarded_for(&mut headers, peer.ip());
            }
            labels.service = route.label.clone();
            (uri, headers, route.request_timeout)
        };

        // Kept for the error body; cloning a URI only bumps reference counts.
        let target = uri.clone();
        let mut upstream = self
            .client
            .request(method, uri)
            .timeout(timeout)
            .no_decompress();
        *upstream.headers_mut() = headers;
        labels.upstream = target.authority().cloned();
        labels.attempts = 1;
        let sending = match body {
            // `send()` would add `content-length: 0` to every GET.
            BodySize::None => upstream.send_body(body::None::new()),
            BodySize::Sized(0) => upstream.send_body(()),
            BodySize::Sized(n) => {
                labels.bytes_in = BytesIn::Known(n);
                upstream.send_body(SizedStream::new(n, payload))
            }
            BodySize::Stream => {
                let count = Rc::new(Cell::new(0));
                labels.bytes_in = BytesIn::Counted(count.clone());
                upstream.send_stream(Counted::new(payload, count))
            }
        };
        let attempt = Instant::now();
        match sending.await {
            Ok(response) => {
                self.instruments.record_attempt(
                    labels,
                    attempt.elapsed(),
                    Some(response.status()),
                    "ok",
                );
                Ok(relay(response))
            }
            Err(e) => {
                let e = ProxyError::from_send(&e, target.to_string());
                self.instruments
                    .record_attempt(labels, attempt.elapsed(), None, e.cause.as_str());
                Err(e)
            }
        }
    }
}

/// The path for the access log: without the query unless the policy asks for it (queries often carry tokens).
fn logged_path(uri: &actix_http::Uri, with_query: bool) -> String {
    match (with_query, uri.path_and_query()) {
        (true, Some(pq)) => pq.as_str().to_string(),
        _ => uri.path().to_string(),
    }
}

/// The framing of the app's request body, read before its headers are moved.
fn request_body(head: &RequestHead) -> BodySize {
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
fn relay(response: awc::ClientResponse) -> Response<ProxyBody> {
    let status = response.status();
    let mut headers = HeaderMap::new();
    let response = response.map_body(|head, payload: Payload<_>| {
        headers = mem::take(&mut head.headers);
        payload
    });
    strip_hop_by_hop(&mut headers);
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
