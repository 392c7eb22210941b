//! Traffic copies, the request path's side: which copies a request gets, and the tee that feeds a streamed
//! body to them without ever waiting for them.
//!
//! A copy is picked in the route phase (its methods, then its sample) and handed to the sidecar's shadow actor
//! ([`crate::control::shadow`]) after the body phase, with a bounded `try_send`: a full mailbox drops the copy,
//! never delays the request. A body kept for replay goes to the copy as the same `Bytes`; a streamed body goes
//! through a [`Tee`], which passes every chunk on to the primary and queues a reference to it for each copy. A
//! copy whose queue holds more than its `buffer` bytes has fallen behind: it is abandoned (its stream ends in an
//! error, so the copy's upstream never takes a cut body for a whole one) and counted, and the primary goes on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use actix_http::error::PayloadError;
use actix_http::header::HeaderMap;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

use std::net::IpAddr;

use actix_http::header::HeaderValue;
use actix_http::{Method, Uri};

use super::body::{Body, BoxedPayload};
use super::route::Plan;
use crate::control::shadow::{CopyBody, CopyDest, CopyJob, Meet, Shadows};
use crate::policy::copies::{Copies, Copy, CopyTo};
use crate::snapshot::Snapshot;

/// The state of one copy's body stream, shared by the tee and the copy: streaming (0) until one of these.
const COMPLETE: u8 = 1;
const ABANDONED: u8 = 2;

/// What a copy's body stream shares with the tee: whether the primary's body ended whole, and the bytes queued.
#[derive(Debug, Default)]
pub struct Feed {
    state: AtomicU8,
    queued: AtomicUsize,
}

/// One copy's end of the tee: its chunks, in order; ends in an error unless the primary's body ended whole.
#[derive(Debug)]
pub struct CopyStream {
    chunks: mpsc::UnboundedReceiver<Bytes>,
    feed: Arc<Feed>,
}

impl Stream for CopyStream {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.chunks.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                self.feed.queued.fetch_sub(chunk.len(), Ordering::AcqRel);
                Poll::Ready(Some(Ok(chunk)))
            }
            // The sender is dropped after the state is set: `Acquire` sees it.
            Poll::Ready(None) => match self.feed.state.load(Ordering::Acquire) {
                COMPLETE => Poll::Ready(None),
                _ => Poll::Ready(Some(Err(PayloadError::Incomplete(None)))),
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

/// One copy fed by a tee.
struct Branch {
    copy: Arc<Copy>,
    chunks: mpsc::UnboundedSender<Bytes>,
    feed: Arc<Feed>,
}

/// Passes the primary's body through, queueing each chunk for the copies that keep up.
pub struct Tee<S> {
    inner: S,
    branches: Vec<Branch>,
}

impl<S> std::fmt::Debug for Tee<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee")
            .field("copies", &self.branches.len())
            .finish_non_exhaustive()
    }
}

impl<S> Tee<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            branches: Vec::new(),
        }
    }

    /// A copy's end of this tee.
    pub fn branch(&mut self, copy: Arc<Copy>) -> CopyStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::default());
        self.branches.push(Branch {
            copy,
            chunks: tx,
            feed: feed.clone(),
        });
        CopyStream { chunks: rx, feed }
    }

    fn end(&mut self, state: u8) {
        for b in self.branches.drain(..) {
            b.feed.state.store(state, Ordering::Release);
        }
    }
}

impl<S> Drop for Tee<S> {
    /// The primary stopped reading before the body ended (its upstream answered early, or failed): the copies
    /// cannot have the rest.
    fn drop(&mut self) {
        self.end(ABANDONED);
    }
}

impl<S> Stream for Tee<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = Pin::new(&mut this.inner).poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => this.branches.retain(|b| {
                let queued = b.feed.queued.fetch_add(chunk.len(), Ordering::AcqRel) + chunk.len();
                let kept = queued <= b.copy.buffer && b.chunks.send(chunk.clone()).is_ok();
                if !kept {
                    b.feed.state.store(ABANDONED, Ordering::Release);
                    if queued > b.copy.buffer {
                        b.copy.counters().slow.increment(1);
                    }
                }
                kept
            }),
            Poll::Ready(Some(Err(_))) => {
                for b in &this.branches {
                    b.copy.counters().body_error.increment(1);
                }
                this.end(ABANDONED);
            }
            Poll::Ready(None) => this.end(COMPLETE),
            Poll::Pending => {}
        }
        item
    }
}

/// Marks every copy with the target of the request it copies.
pub const SHADOW_HEADER: actix_http::header::HeaderName =
    actix_http::header::HeaderName::from_static("x-sidecar-shadow");

/// Whether a request with `headers` falls in a copy's sample: by the key header's hash when the copy has one
/// (a `traceparent` by its trace id, so that a trace is copied whole), else at random.
pub fn sampled(copy: &Copy, headers: &HeaderMap) -> bool {
    if copy.sample >= 1.0 {
        return true;
    }
    if copy.sample <= 0.0 {
        return false;
    }
    let draw = match copy.key.as_ref().and_then(|k| headers.get(k)) {
        Some(v) => {
            let bytes = v.as_bytes();
            // traceparent: version-traceid-parentid-flags; the trace id is bytes 3..35.
            let key = if copy.key.as_ref().is_some_and(|k| k == "traceparent") && bytes.len() >= 35
            {
                &bytes[3..35]
            } else {
                bytes
            };
            crate::balance::stable_hash(key)
        }
        None => crate::resilience::retry::random_below(u64::MAX),
    };
    (draw as f64 / u64::MAX as f64) < copy.sample
}

/// The copies a request gets: those whose methods include its method and whose sample it falls in, with their
/// destinations resolved under the routing snapshot.
pub fn pick(
    snapshot: &Snapshot,
    copies: Option<&Copies>,
    method: &Method,
    headers: &HeaderMap,
) -> Vec<(Arc<Copy>, CopyDest)> {
    let Some(copies) = copies else {
        return Vec::new();
    };
    let mut picked = Vec::new();
    let mut now = None;
    for copy in copies.iter() {
        if !copy.methods.allows(method) || !sampled(copy, headers) {
            continue;
        }
        // What the actor would drop is dropped here, with no hand-off.
        if copy.gate.full(copy.max_concurrency) {
            copy.counters().concurrency.increment(1);
            continue;
        }
        if copy
            .gate
            .refusing(*now.get_or_insert_with(|| snapshot.hub.clock.now()))
        {
            copy.counters().circuit_open.increment(1);
            continue;
        }
        let dest = match &copy.to {
            CopyTo::Url(u) => CopyDest::Url(u.clone()),
            CopyTo::Service(name) => match snapshot.services.get(&**name) {
                Some(s) => CopyDest::Service(s.clone()),
                None => {
                    copy.counters().no_endpoint.increment(1);
                    continue;
                }
            },
        };
        picked.push((copy.clone(), dest));
    }
    picked
}

/// One body per picked copy: a body kept for replay as the same bytes; a streamed one teed, the primary's
/// stream replaced by the tee that feeds the copies.
fn copy_bodies(picked: &[(Arc<Copy>, CopyDest)], body: &mut Body) -> Vec<CopyBody> {
    let whole = |bytes: &Bytes, chunked| CopyBody::Whole {
        bytes: bytes.clone(),
        chunked,
    };
    let teed = |length, inner: BoxedPayload| {
        let mut tee = Tee::new(inner);
        let bodies = picked
            .iter()
            .map(|(copy, _)| CopyBody::Teed {
                length,
                stream: tee.branch(copy.clone()),
            })
            .collect();
        (bodies, Box::pin(tee) as BoxedPayload)
    };
    let each = |make: &dyn Fn() -> CopyBody| picked.iter().map(|_| make()).collect();
    match body {
        Body::None => each(&|| CopyBody::None),
        Body::Empty => each(&|| whole(&Bytes::new(), false)),
        Body::Replay(bytes) => each(&|| whole(bytes, false)),
        Body::ReplayChunked(bytes) => each(&|| whole(bytes, true)),
        Body::Sized(n, payload) => match payload.take() {
            Some(p) => {
                let (bodies, tee) = teed(Some(*n), Box::pin(p));
                *payload = Some(actix_http::Payload::from(tee));
                bodies
            }
            None => each(&|| CopyBody::None),
        },
        Body::Stream(stream) => match stream.take() {
            Some(s) => {
                let (bodies, tee) = teed(None, s);
                *stream = Some(tee);
                bodies
            }
            None => each(&|| CopyBody::None),
        },
    }
}

/// The request a copy is made of.
#[derive(Debug)]
pub struct Primary<'a> {
    pub plan: &'a Plan,
    pub method: &'a Method,
    pub uri: &'a Uri,
    /// The app's headers, before the primary's upstream head takes them.
    pub headers: &'a HeaderMap,
    pub peer: Option<IpAddr>,
    pub trace: Option<&'a opentelemetry::Context>,
}

/// Hands each picked copy to the shadow actor, teeing a streamed body; the copies that compare leave their
/// meeting point in `meets`, for the primary's status.
pub fn hand_off(
    picked: Vec<(Arc<Copy>, CopyDest)>,
    primary: Primary<'_>,
    body: &mut Body,
    shadows: &Shadows,
    meets: &mut Vec<(Arc<Meet>, Arc<Copy>)>,
) -> u32 {
    let mut headers = super::attempt::rewrite(primary.plan, primary.headers.clone(), primary.peer);
    if let Ok(v) = HeaderValue::from_str(&primary.plan.upstreams.name()) {
        headers.insert(SHADOW_HEADER, v);
    }
    let bodies = copy_bodies(&picked, body);
    let last = picked.len().saturating_sub(1);
    let mut headers = Some(headers);
    let mut handed = 0;
    for (i, ((copy, dest), body)) in picked.into_iter().zip(bodies).enumerate() {
        // The last copy takes the headers; the others a copy each.
        let headers = if i == last {
            headers.take().unwrap_or_default()
        } else {
            headers.clone().unwrap_or_default()
        };
        let meet = copy.compare.then(|| {
            let m = Arc::new(Meet::default());
            meets.push((m.clone(), copy.clone()));
            m
        });
        let trace = primary
            .trace
            .map(|cx| crate::traces::copy_span(cx, primary.method, &copy.name));
        let job = CopyJob {
            copy,
            dest,
            method: primary.method.clone(),
            uri: primary.uri.clone(),
            headers,
            body,
            trace,
            span_query: primary.plan.span_query,
            meet,
            handed: std::time::Instant::now(),
        };
        handed += u32::from(shadows.offer(job));
    }
    handed
}

impl Copy {
    /// Its metric handles, made in the recorder of the thread that first needs them (every thread of a sidecar
    /// has that sidecar's).
    pub fn counters(&self) -> &crate::telemetry::CopyCounters {
        self.counters
            .get_or_init(|| crate::telemetry::CopyCounters::new(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use futures_util::{StreamExt, stream};

    fn copy(buffer: &str) -> Arc<Copy> {
        let yaml = format!(
            "services:\n  a:\n    endpoints: ['127.0.0.1:1']\n    shadow:\n      - to: http://127.0.0.1:2\n        buffer: {buffer}\n"
        );
        let policy = Policy::from_yaml("t.yaml", &yaml).unwrap();
        policy.shadow.services["a"][0].clone()
    }

    fn chunks(n: usize, size: usize) -> impl Stream<Item = Result<Bytes, PayloadError>> + Unpin {
        stream::iter((0..n).map(move |i| Ok(Bytes::from(vec![i as u8; size]))))
    }

    #[actix_rt::test]
    async fn a_copy_that_keeps_up_gets_every_byte_and_a_clean_end() {
        let mut tee = Tee::new(chunks(64, 1024));
        let mut copy_stream = tee.branch(copy("16KiB"));
        let mut primary = 0;
        let mut copied = 0;
        while let Some(chunk) = tee.next().await {
            primary += chunk.unwrap().len();
            copied += copy_stream.next().await.unwrap().unwrap().len();
        }
        drop(tee);
        assert_eq!((primary, copied), (64 * 1024, 64 * 1024));
        assert!(
            copy_stream.next().await.is_none(),
            "a whole body ends cleanly"
        );
    }

    #[actix_rt::test]
    async fn a_copy_that_falls_behind_is_abandoned_and_the_primary_reads_on() {
        let mut tee = Tee::new(chunks(64, 1024));
        let mut copy_stream = tee.branch(copy("4KiB"));
        let mut primary = 0;
        while let Some(chunk) = tee.next().await {
            primary += chunk.unwrap().len();
        }
        assert_eq!(primary, 64 * 1024, "the primary never waits for the copy");
        let mut copied = 0;
        let end = loop {
            match copy_stream.next().await {
                Some(Ok(c)) => copied += c.len(),
                other => break other,
            }
        };
        assert_eq!(copied, 4 * 1024, "no more than the buffer was queued");
        assert!(
            matches!(end, Some(Err(_))),
            "a cut body ends in an error, never cleanly: {end:?}"
        );
    }

    #[actix_rt::test]
    async fn a_primary_that_stops_reading_ends_the_copy_in_an_error() {
        let mut tee = Tee::new(chunks(8, 100));
        let mut copy_stream = tee.branch(copy("1MiB"));
        tee.next().await.unwrap().unwrap();
        drop(tee);
        assert_eq!(copy_stream.next().await.unwrap().unwrap().len(), 100);
        assert!(matches!(copy_stream.next().await, Some(Err(_))));
    }

    #[test]
    fn sampling_by_a_key_is_the_same_for_the_same_trace() {
        let yaml = "services:\n  a:\n    endpoints: ['127.0.0.1:1']\n    shadow:\n      - to: http://127.0.0.1:2\n        sample: 50%\n        key: traceparent\n";
        let policy = Policy::from_yaml("t.yaml", yaml).unwrap();
        let c = &policy.shadow.services["a"][0];
        let mut hits = 0;
        for trace in 0..1000u32 {
            let mut first = HeaderMap::new();
            let mut second = HeaderMap::new();
            let id = format!("{trace:032x}");
            first.insert(
                actix_http::header::HeaderName::from_static("traceparent"),
                format!("00-{id}-00f067aa0ba902b7-01").parse().unwrap(),
            );
            second.insert(
                actix_http::header::HeaderName::from_static("traceparent"),
                format!("00-{id}-b7ad6b7169203331-01").parse().unwrap(),
            );
            assert_eq!(
                sampled(c, &first),
                sampled(c, &second),
                "one trace is copied whole or not at all"
            );
            hits += usize::from(sampled(c, &first));
        }
        assert!(
            (400..=600).contains(&hits),
            "about half of the traces: {hits}"
        );
    }
}
