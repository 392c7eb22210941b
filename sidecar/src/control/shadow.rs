//! The shadow actor: it owns the traffic copies' state and sends them, on an arbiter (a thread) of its own, so
//! that no copy shares the primary's event loop, connections, retry budget, limits or breaker.
//!
//! Each copy entry of the policy has here its own upstream client (its own pool), its own breaker (the default
//! breaker policy) and its count in flight, bounded by its `max_concurrency`; its state is rebuilt when its
//! policy changes. A copy's response is read to its end and discarded. The request path hands copies over with
//! [`Shadows::offer`], a bounded `try_send` that never waits.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix::prelude::*;
use actix_http::header::{HOST, HeaderMap, HeaderValue};
use actix_http::{Method, Uri};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::dispatch::shadow::CopyStream;
use crate::policy::UpstreamSettings;
use crate::policy::copies::Copy;
use crate::resilience::breaker::{Admit, Breaker};
use crate::resilience::monitor::{Hub, Kind, Scope};
use crate::snapshot::Service;
use crate::upstream::Upstream;

/// Copies waiting for the actor, at most; past it a copy is dropped (`queue_full`).
pub const MAILBOX: usize = 1024;

/// Where one copy goes, resolved when the request was routed.
#[derive(Debug)]
pub enum CopyDest {
    Url(Arc<Upstream>),
    Service(Arc<Service>),
}

/// A copy's body.
#[derive(Debug)]
pub enum CopyBody {
    None,
    /// The primary's body, kept for replay: the same bytes; `chunked` when the app sent it so.
    Whole {
        bytes: Bytes,
        chunked: bool,
    },
    /// Teed from the primary's stream; `Some(length)` when the app announced one.
    Teed {
        length: Option<u64>,
        stream: CopyStream,
    },
}

/// Where the primary's and a copy's status classes meet, when the copy compares: whichever ends second
/// compares them.
#[derive(Debug, Default)]
pub struct Meet {
    primary: OnceLock<u16>,
    copy: OnceLock<u16>,
}

impl Meet {
    /// The primary's final status (the sidecar's own refusal included).
    pub fn primary(&self, status: u16, copy: &Copy) {
        if self.primary.set(status).is_ok()
            && let Some(c) = self.copy.get()
        {
            compare(status, *c, copy);
        }
    }

    /// The copy's status; 0 when it got no response.
    fn copy(&self, status: u16, copy: &Copy) {
        if self.copy.set(status).is_ok()
            && let Some(p) = self.primary.get()
        {
            compare(*p, status, copy);
        }
    }
}

fn compare(primary: u16, copy: u16, c: &Copy) {
    if primary / 100 != copy / 100 {
        c.counters().mismatches.increment(1);
    }
}

/// One copy handed to the actor.
#[derive(Debug)]
pub struct CopyJob {
    pub copy: Arc<Copy>,
    pub dest: CopyDest,
    pub method: Method,
    /// The app's request URI (path and query), joined with the copy's upstream as the primary's is.
    pub uri: Uri,
    /// The primary's upstream headers, marked as a copy.
    pub headers: HeaderMap,
    pub body: CopyBody,
    /// The copy's span, child of the request's server span.
    pub trace: Option<opentelemetry::Context>,
    /// Whether the span's `url.full` may carry the query (the access log's `query`).
    pub span_query: bool,
    pub meet: Option<Arc<Meet>>,
    pub handed: Instant,
}

impl Message for CopyJob {
    type Result = ();
}

/// The request path's handle on its sidecar's shadow actor: set once the actor runs.
#[derive(Debug, Clone, Default)]
pub struct Shadows(Arc<OnceLock<Recipient<CopyJob>>>);

impl Shadows {
    /// Hands a copy over without waiting; a full mailbox (or no actor) drops it, counted.
    pub fn offer(&self, job: CopyJob) -> bool {
        let refused = match self.0.get() {
            Some(r) => match r.try_send(job) {
                Ok(()) => return true,
                Err(SendError::Full(job) | SendError::Closed(job)) => job,
            },
            None => job,
        };
        refused.copy.counters().queue_full.increment(1);
        if let Some(meet) = &refused.meet {
            meet.copy(0, &refused.copy);
        }
        if let Some(cx) = &refused.trace {
            crate::traces::end_span_failed(cx, "queue-full");
        }
        false
    }

    fn connect(&self, actor: Recipient<CopyJob>) {
        let _ = self.0.set(actor);
    }
}

/// One copy entry's state.
struct State {
    policy: Arc<Copy>,
    client: awc::Client,
    breaker: Option<Arc<Breaker>>,
    in_flight: Rc<Cell<usize>>,
}

/// Sends the copies of one sidecar.
pub struct Shadower {
    shadows: Shadows,
    settings: Arc<UpstreamSettings>,
    tls: Arc<rustls::ClientConfig>,
    hub: Hub,
    states: HashMap<Arc<str>, State>,
}

impl std::fmt::Debug for Shadower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadower")
            .field("copies", &self.states.len())
            .finish_non_exhaustive()
    }
}

impl Shadower {
    pub fn new(
        shadows: Shadows,
        settings: Arc<UpstreamSettings>,
        tls: Arc<rustls::ClientConfig>,
        hub: Hub,
    ) -> Self {
        Self {
            shadows,
            settings,
            tls,
            hub,
            states: HashMap::new(),
        }
    }

    fn state(&mut self, copy: &Arc<Copy>) -> &State {
        let stale = self
            .states
            .get(&copy.name)
            .is_none_or(|s| *s.policy != **copy);
        if stale {
            // The copy's own breaker, on a hub of its own: its transitions are not a service's and are not
            // published as one's.
            let breaker = crate::policy::traffic::Resilience::default()
                .breaker
                .map(|p| {
                    Breaker::new(
                        p,
                        Scope {
                            service: metrics::SharedString::from(copy.name.clone()),
                            endpoint: None,
                            kind: Kind::Authority,
                            hub: Hub::new(self.hub.clock.clone(), self.hub.metrics),
                        },
                    )
                });
            self.states.insert(
                copy.name.clone(),
                State {
                    policy: copy.clone(),
                    client: crate::dispatch::client::build(&self.settings, self.tls.clone()),
                    breaker,
                    in_flight: Rc::default(),
                },
            );
        }
        &self.states[&copy.name]
    }
}

impl Actor for Shadower {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        self.shadows.connect(ctx.address().recipient());
    }
}

impl Handler<CopyJob> for Shadower {
    type Result = ();

    fn handle(&mut self, job: CopyJob, _: &mut Self::Context) {
        let copy = job.copy.clone();
        let counters = copy.counters().clone();
        let drop_with = |counter: &metrics::Counter, job: &CopyJob, reason: &'static str| {
            counter.increment(1);
            if let Some(meet) = &job.meet {
                meet.copy(0, &job.copy);
            }
            if let Some(cx) = &job.trace {
                crate::traces::end_span_failed(cx, reason);
            }
        };
        let state = self.state(&copy);
        if state.in_flight.get() >= copy.max_concurrency {
            return drop_with(&counters.concurrency, &job, "concurrency");
        }
        let ticket = match state.breaker.as_ref().map(Breaker::admit) {
            None => None,
            Some(Admit::Pass(t)) => Some(t),
            Some(Admit::Refuse(wait)) => {
                copy.gate.refuse_until(self.hub.clock.now() + wait);
                return drop_with(&counters.circuit_open, &job, "circuit-open");
            }
        };
        let upstream = match &job.dest {
            CopyDest::Url(u) => u.as_ref().clone(),
            CopyDest::Service(s) => match s.pick(None, None) {
                Some(i) => s.endpoints[i].upstream.clone(),
                None => return drop_with(&counters.no_endpoint, &job, "no-endpoint"),
            },
        };
        let Ok(target) = upstream.uri_for(&job.uri) else {
            return drop_with(&counters.no_endpoint, &job, "no-endpoint");
        };
        let mut headers = job.headers;
        let host = if copy.host_suffix {
            suffixed(upstream.host_header())
        } else {
            upstream.host_header().clone()
        };
        headers.insert(HOST, host);
        if let Some(cx) = &job.trace {
            crate::traces::set_peer(cx, &target, job.span_query);
            let mut extra = HeaderMap::new();
            crate::traces::inject(cx, &headers, &mut extra);
            for (k, v) in extra {
                headers.insert(k, v);
            }
        }
        let mut request = state.client.request(job.method, target).no_decompress();
        *request.headers_mut() = headers;
        let in_flight = state.in_flight.clone();
        in_flight.set(in_flight.get() + 1);
        copy.gate.started();
        let (meet, trace, handed, body) = (job.meet, job.trace, job.handed, job.body);
        actix_rt::spawn(async move {
            let sending = async move {
                let response = match body {
                    CopyBody::None => request.send_body(actix_http::body::None::new()).await,
                    CopyBody::Whole {
                        bytes,
                        chunked: false,
                    } => request.send_body(bytes).await,
                    CopyBody::Whole {
                        bytes,
                        chunked: true,
                    } => {
                        let once = futures_util::stream::once(std::future::ready(Ok::<
                            _,
                            actix_http::error::PayloadError,
                        >(
                            bytes
                        )));
                        request.send_stream(once).await
                    }
                    CopyBody::Teed {
                        length: Some(n),
                        stream,
                    } => {
                        request
                            .send_body(actix_http::body::SizedStream::new(n, stream))
                            .await
                    }
                    CopyBody::Teed {
                        length: None,
                        stream,
                    } => request.send_stream(stream).await,
                };
                let mut response = response.map_err(|_| ())?;
                let status = response.status();
                // Read to the end, so the connection can serve the next copy.
                while let Some(chunk) = response.next().await {
                    chunk.map_err(|_| ())?;
                }
                Ok::<_, ()>(status)
            };
            let outcome = tokio::time::timeout(copy.timeout, sending).await;
            in_flight.set(in_flight.get().saturating_sub(1));
            copy.gate.finished();
            let (status, failure) = match outcome {
                Ok(Ok(status)) => (Some(status), ""),
                Ok(Err(())) => (None, "failed"),
                Err(_) => (None, "timeout"),
            };
            if let Some(ticket) = ticket {
                ticket.record(status.is_none_or(|s| s.is_server_error()));
            }
            counters.duration.record(handed.elapsed().as_secs_f64());
            match status {
                Some(_) => counters.ok.increment(1),
                None => counters.failed.increment(1),
            }
            if let Some(meet) = &meet {
                meet.copy(status.map_or(0, |s| s.as_u16()), &copy);
            }
            if let Some(cx) = &trace {
                match status {
                    Some(status) => crate::traces::end_client_span(cx, Ok(status)),
                    None => crate::traces::end_span_failed(cx, failure),
                }
            }
        });
    }
}

/// `Host` with `-shadow` after the name, before the port; an IP literal is left as it is (a suffix would make
/// it no address at all).
fn suffixed(host: &HeaderValue) -> HeaderValue {
    let Ok(text) = host.to_str() else {
        return host.clone();
    };
    if text.starts_with('[') {
        return host.clone();
    }
    let (name, port) = match text.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (text, None),
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return host.clone();
    }
    let value = match port {
        Some(p) => format!("{name}-shadow:{p}"),
        None => format!("{name}-shadow"),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| host.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_suffix_goes_before_the_port_and_never_into_an_address() {
        let s = |h: &'static str| {
            suffixed(&HeaderValue::from_static(h))
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(s("api.internal:8080"), "api.internal-shadow:8080");
        assert_eq!(s("api.internal"), "api.internal-shadow");
        assert_eq!(s("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(s("[::1]:80"), "[::1]:80");
    }
}
