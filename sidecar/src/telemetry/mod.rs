//! Telemetry: the Prometheus recorder, the metric names, and the timing of requests.
//!
//! Owns: each sidecar's `metrics` recorder ([`Metrics`]: metrics-exporter-prometheus as a recorder only; its
//! render is served by the admin listener's `/metrics`), the upkeep actor that drains its histograms, and [`Timed`], the
//! body wrapper that records a request's duration when its response body ends. Names follow the OpenTelemetry
//! HTTP semantic conventions, in seconds, with bounded labels: the service (or `external` for URL targets,
//! `dispatch` for dispatch rules, `none` before routing), the method (`_OTHER` for non-standard ones), the
//! status class and the outcome (`ok` or the sidecar's error cause); on the server histogram also the
//! `direction` (`egress`, `inbound`) and, for mesh peers' requests, the peer's SPIFFE identity (capped at
//! [`MAX_PEER_LABELS`] distinct values, then `other`). Never a raw path or a peer address.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future;

use actix::prelude::{Actor, Addr, AsyncContext};
use actix_http::body::{BodySize, MessageBody};
use actix_http::{Method, StatusCode};
use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::access_log::{self, Record};
use crate::fxhash::FxHashMap;

pub mod names;

pub use names::{
    ACTIVE_REQUESTS, BUILD_INFO, CLIENT_DURATION, POLICY_RELOADS, POLICY_VERSION, SERVER_DURATION,
};

/// Latency buckets in seconds, from 0.5 ms (a loopback hop) to 30 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One sidecar's metrics: its own Prometheus recorder and the handle that renders it.
///
/// Every sidecar gets its own, so that two sidecars in one process (the test binaries) never count into each
/// other's registry. The recorder is set as the thread's local recorder on each of the sidecar's worker threads
/// ([`Metrics::enter_thread`]), and around every poll of its control-plane actors ([`Metrics::start`]), which
/// share the thread that started the sidecar. The first recorder of the process is also the global one: it
/// counts what runs on threads no sidecar owns (the trace exporter's), and, in the binary, the one sidecar.
/// A recorder lives as long as the process (one per sidecar started: one in the binary).
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    own: Option<&'static Own>,
}

#[derive(Debug)]
struct Own {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

static GLOBAL: OnceLock<()> = OnceLock::new();

impl Metrics {
    /// A recorder of its own; none (metrics go to the global recorder, if any) when it cannot be built.
    pub fn new() -> Self {
        let recorder = match PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        {
            Ok(builder) => builder.build_recorder(),
            Err(e) => {
                tracing::warn!(error = %e, "metrics disabled: cannot build the recorder");
                return Self::default();
            }
        };
        let handle = recorder.handle();
        let own: &'static Own = Box::leak(Box::new(Own { recorder, handle }));
        GLOBAL.get_or_init(|| {
            if let Err(e) = metrics::set_global_recorder(&own.recorder) {
                tracing::warn!(error = %e, "another global metrics recorder is installed");
            }
        });
        let metrics = Self { own: Some(own) };
        metrics.scope(|| {
            names::describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        });
        metrics
    }

    /// Runs `f` with this sidecar's recorder as the thread's.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        match self.own {
            Some(own) => metrics::with_local_recorder(&own.recorder, f),
            None => f(),
        }
    }

    /// Makes this sidecar's recorder the current thread's for good: for the sidecar's own worker threads,
    /// which serve nothing else and end with its servers.
    pub fn enter_thread(&self) {
        if let Some(own) = self.own {
            std::mem::forget(metrics::set_default_local_recorder(&own.recorder));
        }
    }

    /// Starts an actor whose every poll (its `started`, handlers and timers) records into this recorder.
    pub fn start<A>(&self, actor: A) -> Addr<A>
    where
        A: Actor<Context = actix::Context<A>>,
    {
        self.run(actix::Context::new(), actor)
    }

    /// [`Metrics::start`] on a context made beforehand (whose address was handed out already).
    pub fn run<A>(&self, context: actix::Context<A>, actor: A) -> Addr<A>
    where
        A: Actor<Context = actix::Context<A>>,
    {
        let address = context.address();
        actix_rt::spawn(InScope {
            metrics: *self,
            inner: Box::pin(context.into_future(actor)),
        });
        address
    }

    /// The Prometheus text exposition of every metric, histograms drained first so a scrape is current.
    pub fn render(&self) -> String {
        self.own.map_or_else(String::new, |own| {
            own.handle.run_upkeep();
            own.handle.render()
        })
    }

    /// Drains histogram samples into their buckets.
    pub fn upkeep(&self) {
        if let Some(own) = self.own {
            own.handle.run_upkeep();
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.own.is_some()
    }
}

/// A future polled with a sidecar's recorder as the thread's.
struct InScope<F> {
    metrics: Metrics,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for InScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let inner = this.inner.as_mut();
        this.metrics.scope(|| inner.poll(cx))
    }
}

/// Drains histogram samples into their buckets on a timer (the exporter's histograms need it).
#[derive(Debug)]
pub struct Upkeep(pub Metrics);

impl Actor for Upkeep {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every second: samples wait in per-histogram buffers until drained, so this bounds their memory.
        ctx.run_interval(Duration::from_secs(1), |this, _| this.0.upkeep());
    }
}

/// The method label: standard methods by name, anything else `_OTHER` (semantic conventions), so a client
/// cannot grow the label set.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The labels of one request, known once it is routed and answered, and what its access log line needs.
#[derive(Debug, Clone)]
pub struct RequestLabels {
    pub service: SharedString,
    pub method: &'static str,
    /// The upstream the request went to.
    pub upstream: Option<actix_http::uri::Authority>,
    pub attempts: u32,
    /// Request body bytes: known from `Content-Length`, or counted as a chunked body streams.
    pub bytes_in: BytesIn,
}

/// How many request body bytes were sent on.
#[derive(Debug, Clone, Default)]
pub enum BytesIn {
    #[default]
    None,
    Known(u64),
    Counted(Rc<Cell<u64>>),
}

impl BytesIn {
    fn get(&self) -> u64 {
        match self {
            Self::None => 0,
            Self::Known(n) => *n,
            Self::Counted(c) => c.get(),
        }
    }
}

/// A request body stream that counts what passes.
pub struct Counted<S> {
    inner: S,
    count: Rc<Cell<u64>>,
}

impl<S> std::fmt::Debug for Counted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("count", &self.count.get())
            .finish_non_exhaustive()
    }
}

impl<S> Counted<S> {
    pub fn new(inner: S, count: Rc<Cell<u64>>) -> Self {
        Self { inner, count }
    }
}

impl<S, E> futures_util::Stream for Counted<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            this.count.set(this.count.get() + chunk.len() as u64);
        }
        next
    }
}

/// Distinct peer identities that get a label value of their own; the others share [`OTHER_PEERS`]. Meshes
/// have tens of services, so this is generous, and it bounds what a CA issuing many identities can cost.
pub const MAX_PEER_LABELS: usize = 100;
/// The `peer` label of identities beyond [`MAX_PEER_LABELS`].
pub const OTHER_PEERS: &str = "other";

/// The `peer` label of a mesh peer's SPIFFE identity: the identity itself for the first [`MAX_PEER_LABELS`]
/// distinct ones this process sees, `other` after. Called once per inbound connection, not per request.
pub fn peer_label(identity: &str) -> SharedString {
    static SEEN: std::sync::Mutex<Option<FxHashMap<Box<str>, SharedString>>> =
        std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    bounded_label(
        seen.get_or_insert_with(FxHashMap::default),
        identity,
        MAX_PEER_LABELS,
    )
}

fn bounded_label(
    seen: &mut FxHashMap<Box<str>, SharedString>,
    value: &str,
    max: usize,
) -> SharedString {
    if let Some(label) = seen.get(value) {
        return label.clone();
    }
    if seen.len() >= max {
        return SharedString::const_str(OTHER_PEERS);
    }
    let label = SharedString::from_shared(std::sync::Arc::<str>::from(value));
    seen.insert(value.into(), label.clone());
    label
}

/// One histogram's labels; the `&'static str` parts compare and hash by address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    service: SharedString,
    method: usize,
    status: usize,
    outcome: usize,
    peer: Option<SharedString>,
}

impl Key {
    fn new(
        labels: &RequestLabels,
        status: &'static str,
        outcome: &'static str,
        peer: Option<&SharedString>,
    ) -> Self {
        Self {
            service: labels.service.clone(),
            method: labels.method.as_ptr() as usize,
            status: status.as_ptr() as usize,
            outcome: outcome.as_ptr() as usize,
            peer: peer.cloned(),
        }
    }
}

type Cache = RefCell<FxHashMap<Key, Histogram>>;

/// A counter's identity: its name and reason (static strings, by address and length) and its service label.
type CounterKey = ((usize, usize), SharedString, (usize, usize));

fn static_id(text: &'static str) -> (usize, usize) {
    (text.as_ptr() as usize, text.len())
}

/// One worker's metric handles: registered once, then used without the registry's lookups and locks.
#[derive(Debug)]
pub struct Instruments {
    in_flight: Gauge,
    server: Cache,
    client: Cache,
    /// Refusal and retry counters (`service`, and `reason` for some): counted without a registry lookup, since
    /// refusals are the hot path under overload.
    counters: RefCell<FxHashMap<CounterKey, Counter>>,
    /// The `direction` label of the server histogram: `egress` (the app's calls out) or `inbound` (mesh peers'
    /// calls in).
    direction: &'static str,
}

/// The egress listener's.
impl Default for Instruments {
    fn default() -> Self {
        Self {
            in_flight: metrics::gauge!(ACTIVE_REQUESTS),
            server: Cache::default(),
            client: Cache::default(),
            counters: RefCell::default(),
            direction: "egress",
        }
    }
}

impl Instruments {
    /// The mesh inbound listener's.
    pub fn inbound() -> Self {
        Self {
            direction: "inbound",
            ..Self::default()
        }
    }

    fn histogram(
        cache: &Cache,
        name: &'static str,
        labels: &RequestLabels,
        status: &'static str,
        outcome: &'static str,
    ) -> Histogram {
        let key = Key::new(labels, status, outcome, None);
        if let Some(h) = cache.borrow().get(&key) {
            return h.clone();
        }
        let h = metrics::histogram!(
            name,
            "service" => labels.service.clone(),
            "http_request_method" => labels.method,
            "status_class" => status,
            "outcome" => outcome,
        );
        cache.borrow_mut().insert(key, h.clone());
        h
    }

    /// The server histogram: the labels of [`Self::histogram`], the direction, and the peer for inbound
    /// requests.
    fn server(
        &self,
        labels: &RequestLabels,
        status: &'static str,
        outcome: &'static str,
        peer: Option<&SharedString>,
    ) -> Histogram {
        let key = Key::new(labels, status, outcome, peer);
        if let Some(h) = self.server.borrow().get(&key) {
            return h.clone();
        }
        let mut set = vec![
            metrics::Label::new("service", labels.service.clone()),
            metrics::Label::from_static_parts("http_request_method", labels.method),
            metrics::Label::from_static_parts("status_class", status),
            metrics::Label::from_static_parts("outcome", outcome),
            metrics::Label::from_static_parts("direction", self.direction),
        ];
        if let Some(peer) = peer {
            set.push(metrics::Label::new("peer", peer.clone()));
        }
        let h = metrics::histogram!(SERVER_DURATION, set);
        self.server.borrow_mut().insert(key, h.clone());
        h
    }

    /// Records an upstream attempt that took `elapsed` until its response head (or its failure).
    pub fn record_attempt(
        &self,
        labels: &RequestLabels,
        elapsed: Duration,
        status: Option<StatusCode>,
        outcome: &'static str,
    ) {
        let status = status.map_or("none", status_class);
        Self::histogram(&self.client, CLIENT_DURATION, labels, status, outcome).record(elapsed);
    }

    /// The server-duration histogram for a response with this status and outcome.
    pub fn server_histogram(
        &self,
        labels: &RequestLabels,
        status: StatusCode,
        outcome: &'static str,
    ) -> Histogram {
        self.server(labels, status_class(status), outcome, None)
    }

    /// The server-duration histogram of an inbound request from `peer` (a [`peer_label`]).
    pub fn server_histogram_of_peer(
        &self,
        labels: &RequestLabels,
        peer: &SharedString,
        status: StatusCode,
        outcome: &'static str,
    ) -> Histogram {
        self.server(labels, status_class(status), outcome, Some(peer))
    }

    /// Adds one to the counter `name` of `service` (and `reason`, when it has one).
    pub fn count(&self, name: &'static str, service: &SharedString, reason: Option<&'static str>) {
        let key = (
            static_id(name),
            service.clone(),
            reason.map_or((0, 0), static_id),
        );
        if let Some(c) = self.counters.borrow().get(&key) {
            c.increment(1);
            return;
        }
        let counter = match reason {
            Some(reason) => {
                metrics::counter!(name, "service" => service.clone(), "reason" => reason)
            }
            None => metrics::counter!(name, "service" => service.clone()),
        };
        counter.increment(1);
        self.counters.borrow_mut().insert(key, counter);
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.in_flight.clone())
    }
}

/// The in-flight gauge, counted down on drop.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What the request holds until its response body ends.
#[derive(Debug, Default)]
pub struct Hold {
    /// The target's concurrency slot.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The server span, ended with the body.
    pub trace: Option<opentelemetry::Context>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(cx) = self.trace.take() {
            opentelemetry::trace::TraceContextExt::span(&cx).end();
        }
    }
}

/// A response body that records the request's duration when it ends (or is dropped: the app went away).
pub struct Timed<B> {
    inner: B,
    histogram: Histogram,
    started: Instant,
    _in_flight: InFlight,
    /// The access log line, for a sampled request; completed and handed to the writer on drop.
    log: Option<(Record, BytesIn)>,
    bytes_out: u64,
    /// Whatever the request holds until its body ends (its concurrency slot).
    _hold: Hold,
}

impl<B> std::fmt::Debug for Timed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed").finish_non_exhaustive()
    }
}

impl<B> Timed<B> {
    pub fn new(
        inner: B,
        histogram: Histogram,
        started: Instant,
        in_flight: InFlight,
        log: Option<(Record, BytesIn)>,
        hold: Hold,
    ) -> Self {
        Self {
            inner,
            histogram,
            started,
            _in_flight: in_flight,
            log,
            bytes_out: 0,
            _hold: hold,
        }
    }
}

impl<B> Drop for Timed<B> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.histogram.record(elapsed);
        if let Some((mut record, bytes_in)) = self.log.take() {
            record.duration = elapsed;
            record.bytes_in = bytes_in.get();
            record.bytes_out = self.bytes_out;
            access_log::emit(record);
        }
    }
}

impl<B: MessageBody + Unpin> MessageBody for Timed<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            this.bytes_out += chunk.len() as u64;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(
            method_label(&Method::from_bytes(b"PURGE").unwrap()),
            "_OTHER"
        );
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(status_class(StatusCode::NOT_MODIFIED), "3xx");
        assert_eq!(status_class(StatusCode::from_u16(599).unwrap()), "5xx");
    }

    #[test]
    fn peer_labels_stay_bounded_with_an_other_bucket() {
        let mut seen = FxHashMap::default();
        let a = bounded_label(&mut seen, "spiffe://mesh.test/service/a", 2);
        assert_eq!(&*a, "spiffe://mesh.test/service/a");
        bounded_label(&mut seen, "spiffe://mesh.test/service/b", 2);
        assert_eq!(
            &*bounded_label(&mut seen, "spiffe://mesh.test/service/c", 2),
            OTHER_PEERS
        );
        // An identity seen before the cap keeps its own label.
        assert_eq!(
            &*bounded_label(&mut seen, "spiffe://mesh.test/service/a", 2),
            "spiffe://mesh.test/service/a"
        );
        assert_eq!(seen.len(), 2);
    }
}

/// One traffic copy's metric handles (label `copy`: its name; `source`: the primary's route label), made once
/// in its sidecar's recorder and then used from any thread without a registry lookup.
#[derive(Debug, Clone)]
pub struct CopyCounters {
    pub ok: Counter,
    pub failed: Counter,
    pub queue_full: Counter,
    pub concurrency: Counter,
    pub circuit_open: Counter,
    pub no_endpoint: Counter,
    pub slow: Counter,
    pub body_error: Counter,
    pub duration: metrics::Histogram,
    pub mismatches: Counter,
}

impl CopyCounters {
    pub fn new(copy: &std::sync::Arc<str>) -> Self {
        use names::{SHADOW_DROPPED, SHADOW_DURATION, SHADOW_MISMATCHES, SHADOW_SENT};
        let copy = SharedString::from(copy.clone());
        let dropped = |reason: &'static str| metrics::counter!(SHADOW_DROPPED, "copy" => copy.clone(), "reason" => reason);
        Self {
            ok: metrics::counter!(SHADOW_SENT, "copy" => copy.clone(), "outcome" => "ok"),
            failed: metrics::counter!(SHADOW_SENT, "copy" => copy.clone(), "outcome" => "failed"),
            queue_full: dropped("queue_full"),
            concurrency: dropped("concurrency"),
            circuit_open: dropped("circuit_open"),
            no_endpoint: dropped("no_endpoint"),
            slow: dropped("slow"),
            body_error: dropped("body_error"),
            duration: metrics::histogram!(SHADOW_DURATION, "copy" => copy.clone()),
            mismatches: metrics::counter!(SHADOW_MISMATCHES, "copy" => copy),
        }
    }
}

/// One fan-out target's metric handles (labels `group` and `target`), made once in its sidecar's recorder.
#[derive(Debug, Clone)]
pub struct FanCounters {
    pub ok: Counter,
    pub failed: Counter,
    pub timeout: Counter,
    pub cancelled: Counter,
    pub queue_full: Counter,
    pub duration: metrics::Histogram,
}

impl FanCounters {
    pub fn new(group: &std::sync::Arc<str>, target: &std::sync::Arc<str>) -> Self {
        use names::{FANOUT_DURATION, FANOUT_SENT};
        let group = SharedString::from(group.clone());
        let target = SharedString::from(target.clone());
        let sent = |outcome: &'static str| metrics::counter!(FANOUT_SENT, "group" => group.clone(), "target" => target.clone(), "outcome" => outcome);
        Self {
            ok: sent("ok"),
            failed: sent("failed"),
            timeout: sent("timeout"),
            cancelled: sent("cancelled"),
            queue_full: sent("queue_full"),
            duration: metrics::histogram!(FANOUT_DURATION, "group" => group.clone(), "target" => target.clone()),
        }
    }
}
