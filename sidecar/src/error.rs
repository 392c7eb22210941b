//! The responses the sidecar makes itself, and the one table that maps their causes to status codes.
//!
//! Every such response carries `x-sidecar-error: <cause>` and a short JSON body naming the cause and the target,
//! so an app (or its operator) can always tell a sidecar failure from an upstream answer. None is ever a 2xx.

use std::borrow::Cow;
use std::fmt;
use std::io;

use actix_http::body::BoxBody;
use actix_http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use actix_http::{ConnectionType, Response, StatusCode};
use awc::error::{ConnectError, SendRequestError};

/// The header naming the cause on every response the sidecar makes itself.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-sidecar-error");

/// Why the sidecar answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No `target` header and no dispatch rules.
    MissingTarget,
    /// The `target` header is not an absolute http(s) URL (or service name with `internal: true`).
    BadTarget,
    /// The `internal` header is neither `true` nor `false`.
    BadInternal,
    /// The request header section is over the limit.
    HeadersTooLarge,
    /// `internal: true` named a service the registry does not know.
    UnknownService,
    /// The service exists but has no endpoint to send to.
    NoEndpoints,
    /// The upstream refused the connection.
    UpstreamRefused,
    /// The upstream's name did not resolve.
    UpstreamUnresolvable,
    /// The connection failed or was reset before a complete response head arrived.
    UpstreamReset,
    /// The upstream answered with something that is not HTTP.
    UpstreamProtocol,
    /// The TLS handshake with the upstream failed.
    UpstreamTls,
    /// Connecting took longer than the connect timeout.
    ConnectTimeout,
    /// The response head did not arrive within the request timeout.
    RequestTimeout,
    /// The app's request body failed while it was being sent.
    RequestBody,
    /// One attempt's per-try timeout expired and no retry followed.
    TryTimeout,
    /// The target's circuit breaker is open (or every endpoint's is).
    CircuitOpen,
    /// The target's concurrency limit and its queue are full, or the queue timeout expired.
    Overloaded,
    /// The caller is over the target's rate limit.
    RateLimited,
    /// Every endpoint of the service is ejected.
    NoHealthyEndpoint,
    /// The mesh peer is not allowed to make this request (or has no identity).
    Forbidden,
    /// The URL target's host is not in the egress allow-list.
    EgressDenied,
    /// A mesh request's path climbs above the root, has a malformed escape, or an encoded slash that
    /// `mesh.inbound.paths` does not allow.
    BadPath,
    /// A header name with `_` on the mesh hop, with `mesh.headers_with_underscores: reject`.
    UnderscoreHeader,
    /// The request body is over the limit of a fan-out group, which reads it whole before sending.
    BodyTooLarge,
    /// The `fanout` header names no group of the policy.
    NoFanoutGroup,
}

/// How an attempt that failed with a cause may be retried (the policy's `retries.on` decides whether it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request never left (no connection, no TLS): safe to send again whatever the method;
    /// `retries.on.connect_failure`. Reason label `connect-failure`.
    NeverSent,
    /// The connection failed after the request may have left; `retries.on.reset`. Reason label `reset`.
    Reset,
    /// One attempt's per-try timeout: a gateway timeout of that attempt, retried as a 504 would be. Reason label
    /// `per-try-timeout`.
    AsGatewayTimeout,
    /// Never retried.
    No,
}

/// What a cause means: the status the app sees, how an attempt that failed with it is retried, and whether it
/// counts against a circuit breaker (a failure of the upstream, not of the app's own request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub status: StatusCode,
    pub retry: Retry,
    pub breaker: bool,
}

impl Cause {
    /// The table: one status, retry class and breaker class per cause.
    pub const fn class(self) -> Class {
        use Cause::*;
        const fn c(status: StatusCode, retry: Retry, breaker: bool) -> Class {
            Class {
                status,
                retry,
                breaker,
            }
        }
        const BAD: StatusCode = StatusCode::BAD_REQUEST;
        const GATEWAY: StatusCode = StatusCode::BAD_GATEWAY;
        const UNAVAILABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
        const TIMEOUT: StatusCode = StatusCode::GATEWAY_TIMEOUT;
        match self {
            MissingTarget | BadInternal | BadPath | UnderscoreHeader => c(BAD, Retry::No, false),
            // Only a client error of the sidecar's own (a URL awc cannot send): says nothing of the upstream.
            BadTarget => c(BAD, Retry::No, false),
            // The app's body failed: its fault, not the upstream's.
            RequestBody => c(BAD, Retry::No, false),
            HeadersTooLarge => c(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Retry::No,
                false,
            ),
            Forbidden | EgressDenied => c(StatusCode::FORBIDDEN, Retry::No, false),
            UpstreamRefused | UpstreamUnresolvable | UpstreamTls => {
                c(GATEWAY, Retry::NeverSent, true)
            }
            ConnectTimeout => c(TIMEOUT, Retry::NeverSent, true),
            UpstreamReset => c(GATEWAY, Retry::Reset, true),
            UpstreamProtocol => c(GATEWAY, Retry::No, true),
            TryTimeout => c(TIMEOUT, Retry::AsGatewayTimeout, true),
            RequestTimeout => c(TIMEOUT, Retry::No, true),
            UnknownService | NoEndpoints | CircuitOpen | Overloaded | NoHealthyEndpoint => {
                c(UNAVAILABLE, Retry::No, false)
            }
            RateLimited => c(StatusCode::TOO_MANY_REQUESTS, Retry::No, false),
            BodyTooLarge => c(StatusCode::PAYLOAD_TOO_LARGE, Retry::No, false),
            NoFanoutGroup => c(UNAVAILABLE, Retry::No, false),
        }
    }

    /// The status the app sees.
    pub const fn status(self) -> StatusCode {
        self.class().status
    }

    /// The short cause, as it appears in `x-sidecar-error`.
    pub fn as_str(self) -> &'static str {
        use Cause::*;
        match self {
            MissingTarget => "missing-target",
            BadTarget => "bad-target",
            BadInternal => "bad-internal-header",
            HeadersTooLarge => "headers-too-large",
            UnknownService => "unknown-service",
            NoEndpoints => "no-endpoints",
            UpstreamRefused => "upstream-refused",
            UpstreamUnresolvable => "upstream-unresolvable",
            UpstreamReset => "upstream-reset",
            UpstreamProtocol => "upstream-protocol-error",
            UpstreamTls => "upstream-tls-error",
            ConnectTimeout => "connect-timeout",
            RequestTimeout => "request-timeout",
            RequestBody => "request-body-error",
            TryTimeout => "per-try-timeout",
            CircuitOpen => "circuit-open",
            Overloaded => "overloaded",
            RateLimited => "rate-limited",
            NoHealthyEndpoint => "no-healthy-endpoint",
            Forbidden => "forbidden",
            EgressDenied => "egress-denied",
            BadPath => "bad-path",
            UnderscoreHeader => "underscore-header",
            BodyTooLarge => "body-too-large",
            NoFanoutGroup => "no-fanout-group",
        }
    }

    /// Every cause, for documentation tests.
    pub const ALL: [Cause; 25] = {
        use Cause::*;
        [
            MissingTarget,
            BadTarget,
            BadInternal,
            HeadersTooLarge,
            UnknownService,
            NoEndpoints,
            UpstreamRefused,
            UpstreamUnresolvable,
            UpstreamReset,
            UpstreamProtocol,
            UpstreamTls,
            ConnectTimeout,
            RequestTimeout,
            RequestBody,
            TryTimeout,
            CircuitOpen,
            Overloaded,
            RateLimited,
            NoHealthyEndpoint,
            Forbidden,
            EgressDenied,
            BadPath,
            UnderscoreHeader,
            BodyTooLarge,
            NoFanoutGroup,
        ]
    };
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of the sidecar's own: the cause, the target it concerned and a human detail.
#[derive(Debug)]
pub struct ProxyError {
    pub cause: Cause,
    pub target: String,
    pub detail: Cow<'static, str>,
    /// Headers added to the response (`Retry-After`, `RateLimit`, ...).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.cause, self.target, self.detail)
    }
}

impl std::error::Error for ProxyError {}

impl ProxyError {
    pub fn new(
        cause: Cause,
        target: impl Into<String>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            cause,
            target: target.into(),
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// Adds `Retry-After` in whole seconds, rounded up (at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.headers
            .push((RETRY_AFTER, seconds_value(seconds.max(1))));
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Classifies an upstream client error.
    pub fn from_send(err: &SendRequestError, target: impl Into<String>) -> Self {
        let cause = match err {
            SendRequestError::Url(_) => Cause::BadTarget,
            SendRequestError::Connect(c) => match c {
                ConnectError::Timeout => Cause::ConnectTimeout,
                ConnectError::Resolver(_) | ConnectError::NoRecords | ConnectError::Unresolved => {
                    Cause::UpstreamUnresolvable
                }
                ConnectError::SslIsNotSupported => Cause::UpstreamTls,
                ConnectError::Io(e) if e.kind() == io::ErrorKind::TimedOut => Cause::ConnectTimeout,
                // The TCP connection stood (a refused one is `ConnectionRefused`): an end or a reset before the
                // connection is ready can only come from the TLS handshake. That is an endpoint that does not
                // speak TLS (it closed on our ClientHello) or that refused us; the request never left.
                ConnectError::Io(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    Cause::UpstreamTls
                }
                ConnectError::Io(e) => classify_io(e),
                _ => Cause::UpstreamReset,
            },
            SendRequestError::Send(e) => classify_io(e),
            SendRequestError::Response(actix_http::error::ParseError::Io(e)) => classify_io(e),
            SendRequestError::Response(actix_http::error::ParseError::Incomplete) => {
                Cause::UpstreamReset
            }
            SendRequestError::Response(_) => Cause::UpstreamProtocol,
            SendRequestError::Timeout => Cause::RequestTimeout,
            SendRequestError::Body(_) => Cause::RequestBody,
            _ => Cause::UpstreamReset,
        };
        Self::new(cause, target, err.to_string())
    }

    /// The JSON body: `{"detail":…,"error":…,"status":…,"target":…}`, written in one buffer (no JSON value is
    /// built: refusals are the hot path under overload).
    pub fn body(&self) -> Vec<u8> {
        let cause = self.cause;
        let mut body = Vec::with_capacity(64 + self.detail.len() + self.target.len());
        body.extend_from_slice(b"{\"detail\":");
        json_string(&mut body, &self.detail);
        body.extend_from_slice(b",\"error\":\"");
        body.extend_from_slice(cause.as_str().as_bytes());
        body.extend_from_slice(b"\",\"status\":");
        body.extend_from_slice(cause.status().as_str().as_bytes());
        body.extend_from_slice(b",\"target\":");
        json_string(&mut body, &self.target);
        body.push(b'}');
        body
    }

    /// The response the app receives.
    pub fn to_response(&self) -> Response<BoxBody> {
        let cause = self.cause;
        let body = self.body();
        let mut res = Response::with_body(cause.status(), BoxBody::new(body));
        let headers = res.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(cause.as_str()));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        if cause == Cause::RequestBody || cause == Cause::HeadersTooLarge {
            // The request body was not read (or failed): never read another request from this connection.
            res.head_mut().set_connection_type(ConnectionType::Close);
        }
        res
    }
}

/// A number of seconds as a header value: static for the waits refusals usually ask for (no allocation).
fn seconds_value(seconds: u64) -> HeaderValue {
    const SMALL: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    match SMALL.get(seconds as usize) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(seconds),
    }
}

/// `text` as a JSON string, quotes included.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    if serde_json::to_writer(&mut *out, text).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

fn classify_io(e: &io::Error) -> Cause {
    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
        return Cause::UpstreamTls;
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Cause::UpstreamRefused,
        io::ErrorKind::InvalidData => Cause::UpstreamProtocol,
        _ => Cause::UpstreamReset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_never_answers_2xx_for_itself() {
        for cause in Cause::ALL {
            let s = cause.status();
            assert!(
                s.is_client_error() || s.is_server_error(),
                "{cause} maps to {s}"
            );
        }
    }

    #[test]
    fn the_body_is_json_naming_cause_status_target_and_detail() {
        let e = ProxyError::new(Cause::CircuitOpen, "orders \"eu\"", "line\nbreak");
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "error": "circuit-open",
                "status": 503,
                "target": "orders \"eu\"",
                "detail": "line\nbreak",
            })
        );
    }

    #[test]
    fn only_upstream_failures_count_against_breakers_and_only_attempt_failures_retry() {
        for cause in Cause::ALL {
            let class = cause.class();
            if class.retry != Retry::No {
                assert!(
                    class.breaker,
                    "{cause} is retried but not an upstream failure"
                );
            }
        }
        assert!(!Cause::RequestBody.class().breaker);
        assert_eq!(Cause::ConnectTimeout.class().retry, Retry::NeverSent);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        for (wait, expected) in [
            (0, "1"),
            (1, "1"),
            (1_500, "2"),
            (10_000, "10"),
            (61_000, "61"),
        ] {
            let e = ProxyError::new(Cause::RateLimited, "", "")
                .retry_after(std::time::Duration::from_millis(wait));
            assert_eq!(e.headers[0].1, expected, "{wait} ms");
        }
    }

    #[test]
    fn the_response_names_cause_and_target() {
        let res = ProxyError::new(Cause::UpstreamRefused, "http://h:1", "connection refused")
            .to_response();
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(res.headers().get(ERROR_HEADER).unwrap(), "upstream-refused");
        assert_eq!(res.headers().get(CONTENT_TYPE).unwrap(), "application/json");
    }
}
