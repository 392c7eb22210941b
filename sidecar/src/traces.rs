//! Traces: OpenTelemetry spans for every request the sidecar serves (egress and mesh inbound) and every
//! upstream attempt, exported with OTLP over HTTP/protobuf. Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set.
//!
//! Owns: the tracer provider (the standard `OTEL_*` variables: endpoint, `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER` and its argument), context propagation (W3C `traceparent`/`tracestate` in and out,
//! B3 accepted in, and written out again in the app's own B3 form when the app sent B3), and the export queue. Export never blocks a request: ended spans go into a bounded queue
//! that one thread drains; when it is full they are dropped and counted in
//! `sidecar_trace_spans_dropped_total`.

use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use actix_http::StatusCode;
use actix_http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithHttpConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};

pub use crate::telemetry::names::{SPANS_DROPPED as DROPPED, SPANS_EXPORTED as EXPORTED};

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const DELAY: Duration = Duration::from_millis(500);

/// The process's tracing, when configured.
#[derive(Debug)]
pub struct Traces {
    pub tracer: SdkTracer,
    provider: SdkTracerProvider,
}

static TRACES: OnceLock<Option<Traces>> = OnceLock::new();

/// The tracer, when `OTEL_EXPORTER_OTLP_ENDPOINT` configures one (read once per process).
pub fn get() -> Option<&'static Traces> {
    TRACES.get_or_init(from_env).as_ref()
}

/// Flushes what is queued (at shutdown).
pub fn shutdown() {
    if let Some(Some(t)) = TRACES.get() {
        let _ = t.provider.shutdown();
    }
}

fn from_env() -> Option<Traces> {
    let configured = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    if !configured
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return None;
    }
    let mut exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client::PlainHttp)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "traces disabled: the OTLP exporter cannot be built");
            return None;
        }
    };
    // The SDK reads OTEL_SERVICE_NAME and OTEL_TRACES_SAMPLER(_ARG) itself; a service name defaults to ours.
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("sidecar");
    }
    let resource = resource.build();
    // The exporter leaves for the export thread: it learns the resource first.
    exporter.set_resource(&resource);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Queue::start(exporter))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("sidecar");
    tracing::info!("traces export with OTLP over HTTP");
    Some(Traces { tracer, provider })
}

/// Reads the caller's trace context: W3C `traceparent`/`tracestate`, else B3 (single `b3` or `X-B3-*`).
pub fn extract(headers: &HeaderMap) -> Context {
    if !["traceparent", "b3", "x-b3-traceid"]
        .iter()
        .any(|h| headers.contains_key(*h))
    {
        return Context::new();
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        return cx;
    }
    match b3(headers) {
        Some(span) => Context::new().with_remote_span_context(span),
        None => cx,
    }
}

/// The span of a request the sidecar serves (on the egress listener, `scheme` `http`; on the mesh inbound
/// listener, `https`), child of the caller's context (W3C or B3) when it sent one. `None` when the sampler
/// says no: an unsampled request then costs one sampling decision, and its `traceparent`, if any, passes on
/// untouched.
pub fn server_span(
    traces: &Traces,
    req: &actix_http::Request,
    scheme: &'static str,
) -> Option<Context> {
    let parent = extract(&req.head().headers);
    let builder = traces
        .tracer
        .span_builder(crate::telemetry::method_label(req.method()))
        .with_kind(SpanKind::Server);
    let span = traces.tracer.build_with_context(builder, &parent);
    if !span.is_recording() {
        return None;
    }
    let cx = parent.with_span(span);
    cx.span().set_attributes([
        KeyValue::new("http.request.method", req.method().as_str().to_string()),
        KeyValue::new("url.path", req.path().to_string()),
        KeyValue::new("url.scheme", scheme),
    ]);
    Some(cx)
}

/// The response's status and the sidecar's error cause on the server span.
pub fn record_server_outcome(cx: &Context, status: StatusCode, outcome: &'static str) {
    let span = cx.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if outcome != "ok" {
        span.set_attribute(KeyValue::new("error.type", outcome));
    }
    if status.is_server_error() {
        span.set_status(Status::error(outcome));
    }
}

/// The span id of a client span's parent (the server span), kept in the client span's context for B3's parent
/// field.
#[derive(Debug, Clone, Copy)]
pub struct ParentSpanId(pub SpanId);

/// Writes `traceparent` (and `tracestate`) for the span in `cx` into `headers`, the extra headers of an upstream
/// request whose own headers (the app's) are `app`. When the app sent B3 (`b3`, or `X-B3-TraceId`), writes it
/// too, in the same form, naming the sidecar's span: a Zipkin-instrumented upstream then sees the sidecar's span
/// as its parent (as behind Envoy's Zipkin tracer), not the app's, and never two disagreeing contexts.
pub fn inject(cx: &Context, app: &HeaderMap, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
    let (single, multi) = (app.contains_key("b3"), app.contains_key("x-b3-traceid"));
    if !single && !multi {
        return;
    }
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    let (trace, id) = (sc.trace_id().to_string(), sc.span_id().to_string());
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let parent = cx.get::<ParentSpanId>().map(|p| p.0.to_string());
    let mut out = HeadersMut(headers);
    if single {
        let mut value = format!("{trace}-{id}-{sampled}");
        if let Some(parent) = &parent {
            value = format!("{value}-{parent}");
        }
        out.set("b3", value);
    }
    if multi {
        out.set("x-b3-traceid", trace);
        out.set("x-b3-spanid", id);
        // Debug (`X-B3-Flags: 1`) implies sampling and is sent without `X-B3-Sampled`.
        if !app.contains_key("x-b3-flags") {
            out.set("x-b3-sampled", sampled.to_string());
        }
        if let Some(parent) = parent {
            out.set("x-b3-parentspanid", parent);
        }
    }
}

/// The span of one upstream attempt, child of the server span. Its `url.full` leaves the query out unless the
/// access log's `query` option lets queries (which often carry tokens) leave the process.
pub fn client_span(
    parent: &Context,
    method: &actix_http::Method,
    uri: &actix_http::Uri,
    attempt: u32,
    query: bool,
) -> Context {
    let Some(traces) = get() else {
        return parent.clone();
    };
    let url = span_url(uri, query);
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.as_str().to_string()),
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
        .span_builder(method.as_str().to_string())
        .with_kind(SpanKind::Client)
        .with_attributes(attributes)
        .start_with_context(&traces.tracer, parent);
    let parent_id = ParentSpanId(parent.span().span_context().span_id());
    parent.with_span(span).with_value(parent_id)
}

/// The span of one traffic copy, child of the server span: named by its method like an attempt, marked with
/// the copy's name; the shadow actor adds its peer (`set_peer`) once it has chosen the endpoint.
pub fn copy_span(parent: &Context, method: &actix_http::Method, copy: &str) -> Context {
    let Some(traces) = get() else {
        return parent.clone();
    };
    let span = traces
        .tracer
        .span_builder(method.as_str().to_string())
        .with_kind(SpanKind::Client)
        .with_attributes(vec![
            KeyValue::new("http.request.method", method.as_str().to_string()),
            KeyValue::new("sidecar.shadow.copy", copy.to_string()),
        ])
        .start_with_context(&traces.tracer, parent);
    let parent_id = ParentSpanId(parent.span().span_context().span_id());
    parent.with_span(span).with_value(parent_id)
}

/// `url.full` of a client span: without the query unless `query`.
fn span_url(uri: &actix_http::Uri, query: bool) -> String {
    if query {
        return uri.to_string();
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    format!(
        "{}://{authority}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.path()
    )
}

/// Names a client span's peer once it is chosen: a traffic copy's span begins on the request path, and the
/// shadow actor picks the copy's endpoint afterwards.
pub fn set_peer(cx: &Context, uri: &actix_http::Uri, query: bool) {
    let span = cx.span();
    if !span.is_recording() {
        return;
    }
    let url = span_url(uri, query);
    span.set_attribute(KeyValue::new(
        "server.address",
        uri.host().unwrap_or_default().to_string(),
    ));
    if let Some(port) = uri.port_u16() {
        span.set_attribute(KeyValue::new("server.port", i64::from(port)));
    }
    span.set_attribute(KeyValue::new("url.full", url));
}

/// Ends a span that did not get an answer, with why (`concurrency`, `timeout`, ...).
pub fn end_span_failed(cx: &Context, reason: &'static str) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("error.type", reason));
    span.set_status(Status::error(reason));
    span.end();
}

/// The span of one fan-out target, child of the server span: the target's attempts are its children, so a
/// trace shows each target of the group as one branch.
pub fn fanout_span(parent: &Context, group: &str, target: &str) -> Context {
    let Some(traces) = get() else {
        return parent.clone();
    };
    let span = traces
        .tracer
        .span_builder(format!("fanout {target}"))
        .with_kind(SpanKind::Internal)
        .with_attributes(vec![
            KeyValue::new("sidecar.fanout.group", group.to_string()),
            KeyValue::new("sidecar.fanout.target", target.to_string()),
        ])
        .start_with_context(&traces.tracer, parent);
    parent.with_span(span)
}

/// Ends an attempt's span with its response status, or the cause it failed with.
pub fn end_client_span(cx: &Context, result: Result<StatusCode, crate::error::Cause>) {
    let span = cx.span();
    match result {
        Ok(status) => {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_server_error() {
                span.set_attribute(KeyValue::new("error.type", status.as_str().to_string()));
                span.set_status(Status::error(status.as_str().to_string()));
            }
        }
        Err(cause) => {
            span.set_attribute(KeyValue::new("error.type", cause.as_str()));
            span.set_status(Status::error(cause.as_str()));
        }
    }
    span.end();
}

/// The trace id of the span in `cx`, when there is one.
pub fn trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

fn b3(headers: &HeaderMap) -> Option<SpanContext> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (trace, span, sampled) = match text("b3") {
        Some(single) => {
            let mut parts = single.split('-');
            let trace = parts.next()?;
            let span = parts.next()?;
            (trace, span, parts.next())
        }
        None => (
            text("x-b3-traceid")?,
            text("x-b3-spanid")?,
            text("x-b3-sampled").or(text("x-b3-flags")),
        ),
    };
    // 64-bit B3 trace ids are padded to 128 bits.
    let trace = TraceId::from_hex(&format!("{trace:0>32}")).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = match sampled {
        Some("1" | "d" | "true") => TraceFlags::SAMPLED,
        _ => TraceFlags::default(),
    };
    let sc = SpanContext::new(trace, span, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

/// The span processor: a bounded queue and one export thread.
#[derive(Debug)]
struct Queue {
    sender: SyncSender<Message>,
}

enum Message {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
}

impl Queue {
    fn start<E: SpanExporter + 'static>(exporter: E) -> Self {
        let (sender, receiver) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("sidecar-traces".into())
            .spawn(move || export_loop(exporter, receiver));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "traces: cannot start the export thread; spans will be dropped");
        }
        Self { sender }
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sender.try_send(Message::Span(Box::new(span)))
        {
            metrics::counter!(DROPPED).increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done, wait) = sync_channel(1);
        self.sender
            .send(Message::Flush(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(Duration::from_secs(5))
            .map_err(|_| OTelSdkError::Timeout(Duration::from_secs(5)))
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        self.force_flush()
    }
}

fn export_loop<E: SpanExporter>(exporter: E, receiver: Receiver<Message>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!(error = %e, "traces: no runtime for the exporter");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut deadline = Instant::now() + DELAY;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let mut flush = None;
        match receiver.recv_timeout(wait) {
            Ok(Message::Span(span)) => batch.push(*span),
            Ok(Message::Flush(done)) => flush = Some(done),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                send(&runtime, &exporter, &mut batch);
                return;
            }
        }
        if batch.len() >= BATCH || flush.is_some() || Instant::now() >= deadline {
            send(&runtime, &exporter, &mut batch);
            deadline = Instant::now() + DELAY;
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

fn send<E: SpanExporter>(
    runtime: &tokio::runtime::Runtime,
    exporter: &E,
    batch: &mut Vec<SpanData>,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    let result = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), exporter.export(spans)).await
    });
    let outcome = match result {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, spans = n, "traces: export failed");
            "error"
        }
        Err(_) => {
            tracing::warn!(spans = n, "traces: export timed out");
            "error"
        }
    };
    metrics::counter!(EXPORTED, "result" => outcome).increment(n);
}

/// The OTLP exporter's HTTP client: plain HTTP/1.1 to a collector (usually a local agent), on the export
/// thread's own runtime, so the exporter needs no second HTTP stack.
mod client {
    use std::time::Duration;

    use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[derive(Debug)]
    pub struct PlainHttp;

    #[async_trait::async_trait]
    impl HttpClient for PlainHttp {
        async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
            tokio::time::timeout(Duration::from_secs(10), exchange(request))
                .await
                .map_err(|_| HttpError::from("the OTLP collector did not answer within 10 s"))?
        }
    }

    async fn exchange(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(format!("only http:// OTLP endpoints are supported, got {uri}").into());
        }
        let host = uri.host().ok_or("the OTLP endpoint has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let mut stream = TcpStream::connect((host, port)).await?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!(
            "{} {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-length: {}\r\nconnection: close\r\n",
            request.method(),
            request.body().len()
        );
        for (name, value) in request.headers() {
            if name != "content-length" && name != "host" && name != "connection" {
                head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
            }
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(request.body()).await?;
        let mut answer = Vec::new();
        stream.take(4 << 20).read_to_end(&mut answer).await?;
        let end = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("the OTLP collector's answer has no head")?;
        let status_line = std::str::from_utf8(&answer[..end])?
            .lines()
            .next()
            .unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("the OTLP collector's answer has no status")?;
        let body = Bytes::copy_from_slice(&answer[end + 4..]);
        Ok(Response::builder().status(status).body(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn w3c_and_b3_contexts_are_read() {
        let w3c = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(
            trace_id(&w3c).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let single = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        )]));
        assert_eq!(
            trace_id(&single).as_deref(),
            Some("80f198ee56343ba864fe8b2a57d3eff7")
        );
        let multi = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            trace_id(&multi).as_deref(),
            Some("0000000000000000a3ce929d0e0e4736")
        );
        assert!(trace_id(&extract(&HeaderMap::new())).is_none());
    }
}
