//! Phase **respond**: the app's response. An upstream's response is relayed (its status and header map moved,
//! hop-by-hop headers removed, its body streamed with its own framing); a refusal becomes the sidecar's own
//! error response ([`ProxyError::to_response`]). Then the request's telemetry is settled: the server span's
//! outcome, the duration histogram (recorded when the body ends), the access-log line. Both listeners use it.
//! Answers: whatever the upstream answered, or the refusal of an earlier phase. See `docs/request-path.md`.

use std::mem;

use actix_http::body::{BodyStream, BoxBody, EitherBody, MessageBody, SizedStream};
use actix_http::header::{CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING};
use actix_http::{Payload, Response, StatusCode};
use metrics::SharedString;

use super::body::content_length;
use super::exchange::Exchange;
use super::headers::strip_hop_by_hop;
use crate::error::ProxyError;
use crate::telemetry::{Instruments, Timed};
use crate::traces;

type UpstreamBody = awc::ClientResponse;
/// The response body: the upstream's, with or without a known length, or the sidecar's own error body.
pub type ProxyBody =
    EitherBody<EitherBody<SizedStream<UpstreamBody>, BodyStream<UpstreamBody>>, BoxBody>;

/// How many attempts the sidecar made for a response.
pub const ATTEMPTS: HeaderName = HeaderName::from_static("x-sidecar-attempts");

/// The `x-sidecar-attempts` value: a static one for the counts retries usually reach, so the common response
/// costs no allocation.
pub fn attempts_value(attempts: u32) -> HeaderValue {
    match attempts {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        4 => HeaderValue::from_static("4"),
        n => HeaderValue::from(n),
    }
}

/// The response for a request's result, and its outcome: `ok`, or the refusal's cause.
pub fn answer(
    result: Result<Response<ProxyBody>, ProxyError>,
) -> (Response<ProxyBody>, &'static str) {
    match result {
        Ok(res) => (res, "ok"),
        Err(e) => {
            tracing::debug!(cause = %e.cause, target = %e.target, detail = %e.detail, "request refused");
            (
                e.to_response().map_body(|_, b| EitherBody::right(b)),
                e.cause.as_str(),
            )
        }
    }
}

/// Settles the request's telemetry and wraps the body so that its duration is recorded, its access-log line
/// written and what it holds released when it ends. `peer` is the mesh peer's label, for inbound requests.
pub fn finish(
    exchange: Exchange,
    res: Response<ProxyBody>,
    outcome: &'static str,
    instruments: &Instruments,
    peer: Option<&SharedString>,
) -> Response<Timed<ProxyBody>> {
    let Exchange {
        started,
        mut labels,
        hold,
        record,
        in_flight,
    } = exchange;
    if let Some(cx) = &hold.trace {
        traces::record_server_outcome(cx, res.status(), outcome);
    }
    let histogram = match peer {
        Some(peer) => instruments.server_histogram_of_peer(&labels, peer, res.status(), outcome),
        None => instruments.server_histogram(&labels, res.status(), outcome),
    };
    let log = record.map(|mut r| {
        r.service = labels.service.clone();
        r.status = res.status().as_u16();
        r.upstream = labels.upstream.take();
        r.attempts = labels.attempts;
        r.error = (outcome != "ok").then_some(outcome);
        (r, mem::take(&mut labels.bytes_in))
    });
    res.map_body(|_, body| Timed::new(body, histogram, started, in_flight, log, hold))
}

/// Turns the upstream's response into the app's: status and end-to-end headers as they are (the header map is
/// moved, not copied), the body streamed with the upstream's framing.
///
/// An HTTP/1.1 response with both `Transfer-Encoding: chunked` and `Content-Length` was decoded by its chunks
/// (the codec lets chunked win, RFC 9112 §6.3): its length is dropped and the body goes to the app chunked, so
/// the app never receives a length that disagrees with the body. Several `Content-Length` values, equal or
/// not, never get here: the codec refuses them and the app gets 502 `upstream-protocol-error`.
pub fn relay(response: awc::ClientResponse) -> Response<ProxyBody> {
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
