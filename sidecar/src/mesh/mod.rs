//! The mesh hop, inbound side: a listener that accepts mTLS from peer sidecars only, takes the peer's identity
//! from its certificate (a SPIFFE URI SAN), and forwards to the local app with that identity in
//! `x-sidecar-peer-identity`.
//!
//! Owns: the rustls server configuration (TLS 1.3 by default, 1.2 only when configured; a client certificate
//! signed by the mesh CA is required), reading the identity from a verified certificate, the inbound
//! forwarder (the path normalized before authorization, underscore header names handled per policy), its
//! [`Settings`] (app, timeout, authorization, path and header options, limits: swapped whole by a reload, so
//! new rules need no new listener) and its telemetry (server span, duration histogram, access log line, each
//! with the peer's identity). The certificates themselves, and their reload, are [`tls`]'s. Does not own: the
//! policy's `mesh` section ([`crate::policy::Mesh`]), replacing the listener ([`crate::server`]).

use std::any::Any;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::header::{HOST, HeaderValue};
use actix_http::{Request, Response};
use actix_web::HttpServer;
use actix_web::dev::{Extensions, Server};
use anyhow::Context as _;
use arc_swap::ArcSwap;

use metrics::SharedString;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;

use crate::access_log::Sampler;
use crate::clock::Clock;
use crate::dispatch::admit::{Asking, Gates, admit};
use crate::dispatch::body::{Body, request_body};
use crate::dispatch::exchange::{Exchange, Listener};
use crate::dispatch::headers::{UnderscoreAction, strip_request, underscores};
use crate::dispatch::path::{self, PathOptions};
use crate::dispatch::respond::{ProxyBody, answer, finish, relay};
use crate::error::{Cause, ProxyError};
use crate::policy::{Inbound, Mesh, UpstreamSettings};
use crate::resilience::limits::{Concurrency, RateLimit};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::{Instruments, Timed};
use crate::traces;
use crate::upstream::Upstream;

pub mod tls;
pub use tls::{Identity, Prepared};

pub use crate::policy::http::PEER_IDENTITY;

/// The `service` label, access log field and error target of requests the inbound listener serves.
const INBOUND: &str = "inbound";

/// The peer's identity, read once per connection from its verified certificate.
#[derive(Debug, Clone)]
struct PeerIdentity(Option<HeaderValue>);

/// The peer's identity as a metric label (bounded, see [`crate::telemetry::peer_label`]) and as logged.
#[derive(Debug, Clone)]
struct Peer {
    label: SharedString,
    id: Option<Arc<str>>,
}

/// The SPIFFE URI SAN of a certificate (`spiffe://...`), if it has exactly one.
pub fn spiffe_identity(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
        _ => None,
    });
    let first = uris.next()?;
    uris.next().is_none().then_some(first)
}

/// Reads the peer's identity when a TLS connection is accepted.
fn on_connect(connection: &dyn Any, extensions: &mut Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let identity = connection.downcast_ref::<Tls>().and_then(|tls| {
        let (_, session) = tls.get_ref();
        let leaf = session.peer_certificates()?.first()?;
        spiffe_identity(leaf.as_ref())
    });
    let header = identity
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok());
    extensions.insert(Peer {
        label: identity
            .as_deref()
            .map_or(SharedString::const_str("none"), |id| {
                crate::telemetry::peer_label(id)
            }),
        id: header.as_ref().and_then(|h| h.to_str().ok()).map(Arc::from),
    });
    extensions.insert(PeerIdentity(header));
}

/// What the inbound listener applies to each request: the policy's `mesh.inbound`, less the address. Read once
/// per request; a reload swaps it whole (see [`SharedSettings`]).
#[derive(Debug)]
pub struct Settings {
    app: Upstream,
    timeout: Duration,
    authorization: Option<Vec<crate::policy::AllowRule>>,
    paths: PathOptions,
    underscores: UnderscoreAction,
    limits: Arc<Limits>,
}

/// The settings every worker of the inbound listener (and of its replacements) reads.
pub type SharedSettings = Arc<ArcSwap<Settings>>;

impl Settings {
    /// The settings of `inbound`; the limits (and their buckets and slots) of `previous` are kept when their
    /// policies did not change, so a reload of other settings does not refill every peer's bucket.
    pub fn new(
        inbound: &Inbound,
        underscores: UnderscoreAction,
        previous: Option<&Self>,
        clock: &Clock,
    ) -> Self {
        let policies = (inbound.rate_limit.clone(), inbound.concurrency);
        let limits = match previous {
            Some(p) if p.limits.policies == policies => p.limits.clone(),
            _ => Arc::new(Limits {
                rate: policies
                    .0
                    .clone()
                    .map(|p| RateLimit::new(p, Arc::from(INBOUND), clock.clone())),
                concurrency: policies.1.map(Concurrency::new),
                policies,
            }),
        };
        Self {
            app: inbound.app.clone(),
            timeout: inbound.request_timeout,
            authorization: inbound.authorization.clone(),
            paths: inbound.paths,
            underscores,
            limits,
        }
    }

    pub fn shared(
        inbound: &Inbound,
        underscores: UnderscoreAction,
        clock: &Clock,
    ) -> SharedSettings {
        Arc::new(ArcSwap::from_pointee(Self::new(
            inbound,
            underscores,
            None,
            clock,
        )))
    }
}

/// One inbound request's forwarder: the settings current when it arrived, and its worker's client to the app.
struct Local {
    settings: Arc<Settings>,
    client: awc::Client,
}

/// `self.app`, `self.timeout`... in [`Local::forward`] read the request's settings.
impl std::ops::Deref for Local {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// The inbound listener's limits, shared by every worker: one rate limit (per peer identity by default) and
/// one concurrency limit in front of the app.
#[derive(Debug)]
struct Limits {
    rate: Option<RateLimit>,
    concurrency: Option<Concurrency>,
    /// What they were made from, to tell whether a reload changes them.
    policies: (
        Option<crate::policy::traffic::RateLimitPolicy>,
        Option<crate::policy::traffic::ConcurrencyPolicy>,
    ),
}

/// Builds the inbound server on a pre-bound listener, with the identity's current TLS versions. Like the egress
/// listener it serves a raw `actix_http` service, so the peer's header maps are moved to the app and back,
/// never copied. The server does nothing until it is spawned.
pub fn server(
    identity: &Arc<Identity>,
    settings: SharedSettings,
    snapshot: SharedSnapshot,
    upstream: &UpstreamSettings,
    listener: TcpListener,
    workers: usize,
    drain_timeout: Duration,
) -> anyhow::Result<Server> {
    let config = identity.server_config();
    let pool = upstream.clone();
    let tls = crate::dispatch::client::tls_config();
    let metrics = snapshot.load().hub.metrics;
    let server = HttpServer::new(move || {
        // Once per worker: the awc client is !Send and lives with its worker, and the thread is this
        // sidecar's, counting into its recorder.
        metrics.enter_thread();
        let worker = Rc::new(Worker {
            settings: settings.clone(),
            snapshot: snapshot.clone(),
            client: crate::dispatch::client::build(&pool, tls.clone()),
            instruments: Instruments::inbound(),
            sampler: Sampler::default(),
        });
        actix_service::fn_service(move |req: Request| {
            let worker = Rc::clone(&worker);
            async move { Ok::<_, actix_web::Error>(worker.handle(req).await) }
        })
    })
    .workers(workers)
    .disable_signals()
    // Requests in flight when the listener is replaced or the sidecar drains get the drain timeout, as on the
    // egress listener.
    .shutdown_timeout(drain_timeout.as_secs().max(1))
    .tcp_nodelay(true)
    .on_connect(on_connect)
    .listen_rustls_0_23(listener, config)?
    .run();
    Ok(server)
}

/// One worker of the inbound listener.
struct Worker {
    settings: SharedSettings,
    /// For the access log's settings.
    snapshot: SharedSnapshot,
    client: awc::Client,
    instruments: Instruments,
    sampler: Sampler,
}

/// The inbound listener, as the exchange names it.
const LISTENER: Listener = Listener {
    direction: INBOUND,
    scheme: "https",
    service: INBOUND,
};

impl Worker {
    /// Serves one inbound request, with the telemetry of every request the sidecar serves: a server span (child
    /// of the peer's), the duration histogram and the access log line, each with the peer's identity.
    async fn handle(&self, mut req: Request) -> Response<Timed<ProxyBody>> {
        let peer = req.conn_data::<Peer>().cloned().unwrap_or(Peer {
            label: SharedString::const_str("none"),
            id: None,
        });
        let log = self.snapshot.load().access_log;
        let mut exchange = Exchange::arriving(
            &req,
            LISTENER,
            log,
            &self.instruments,
            &self.sampler,
            peer.id.clone(),
        );
        if let Some(cx) = exchange.trace() {
            let span = cx.span();
            span.set_attribute(KeyValue::new("sidecar.direction", INBOUND));
            if let Some(id) = &peer.id {
                span.set_attribute(KeyValue::new("sidecar.peer.identity", id.to_string()));
            }
            // The app continues the trace from this span, not from the peer's (in B3 too, when the peer sent B3).
            let mut extra = actix_http::header::HeaderMap::new();
            traces::inject(cx, &req.head().headers, &mut extra);
            for (name, value) in extra {
                req.headers_mut().insert(name, value);
            }
        }
        let local = Local {
            settings: self.settings.load_full(),
            client: self.client.clone(),
        };
        exchange.labels.upstream = Some(local.app.authority().clone());
        exchange.labels.attempts = 1;
        let result = local.forward(req, &mut exchange, &self.instruments).await;
        if let Err(e) = &result
            && matches!(
                e.cause,
                Cause::Forbidden | Cause::RateLimited | Cause::Overloaded | Cause::BadTarget
            )
        {
            // Refused by the sidecar: the app never saw it.
            exchange.labels.attempts = 0;
        }
        let (res, outcome) = answer(result);
        finish(exchange, res, outcome, &self.instruments, Some(&peer.label))
    }
}

impl Local {
    /// Forwards one inbound request to the local app, with the peer's verified identity: the path normalized
    /// and authorized, the headers cleaned, then the shared phases admit (the inbound limits), body and
    /// respond.
    async fn forward(
        &self,
        req: Request,
        exchange: &mut Exchange,
        instruments: &Instruments,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let app = || self.app.to_string();
        let identity = req
            .conn_data::<PeerIdentity>()
            .and_then(|p| p.0.clone())
            .ok_or_else(|| {
                ProxyError::new(
                    Cause::Forbidden,
                    app(),
                    "the peer certificate has no SPIFFE identity (one spiffe:// URI SAN)",
                )
            })?;
        let req_peer = req.peer_addr().map(|p| p.ip());
        let (mut head, payload) = req.into_parts();
        // One path for authorization and the app alike: normalized before any rule reads it, and the normalized
        // form is what the app receives.
        let bad_path = |why: String| ProxyError::new(Cause::BadPath, app(), why);
        let normalized = match path::normalize(head.uri.path(), self.paths) {
            Ok(std::borrow::Cow::Borrowed(_)) => None,
            Ok(std::borrow::Cow::Owned(p)) => Some(p),
            Err(why) => return Err(bad_path(format!("{why}: {}", head.uri.path()))),
        };
        if let Some(normal) = normalized {
            head.uri =
                path::with_path(&head.uri, &normal).map_err(|why| bad_path(why.to_string()))?;
        }
        if let Some(rules) = &self.authorization {
            let peer = identity.to_str().unwrap_or_default();
            let (method, path) = (head.method.as_str(), head.uri.path());
            if !rules.iter().any(|r| r.allows(peer, method, path)) {
                tracing::warn!(
                    peer,
                    method,
                    path,
                    "mesh request denied: no authorization rule allows it"
                );
                return Err(ProxyError::new(
                    Cause::Forbidden,
                    app(),
                    format!("{peer} may not {method} {path}"),
                ));
            }
        }
        let uri = self
            .app
            .uri_for(&head.uri)
            .map_err(|why| ProxyError::new(Cause::BadTarget, app(), why))?;
        let framing = request_body(&head);
        let mut headers = std::mem::take(&mut head.headers);
        strip_request(&mut headers);
        underscores(&mut headers, self.underscores, "inbound").map_err(|name| {
            ProxyError::new(
                Cause::UnderscoreHeader,
                app(),
                format!("the header name {name} has '_' (mesh.headers_with_underscores: reject)"),
            )
        })?;
        headers.insert(PEER_IDENTITY, identity);
        headers.insert(HOST, self.app.host_header().clone());
        let label = SharedString::const_str(INBOUND);
        let asking = Asking {
            headers: &headers,
            peer: req_peer,
            label: &label,
            deadline: exchange.started + self.timeout,
            timeout: self.timeout,
        };
        let gates = Gates {
            rate_limit: self.limits.rate.as_ref(),
            concurrency: self.limits.concurrency.as_ref(),
            ..Gates::default()
        };
        admit(gates, asking, app, instruments, &mut exchange.hold).await?;
        // The inbound hop does not retry: the body streams to the app.
        let mut body = Body::read(
            framing,
            payload,
            None,
            exchange.started + self.timeout,
            &mut exchange.labels,
        )
        .await?;
        // The request timeout covers the queue wait too.
        let timeout = self.timeout.saturating_sub(exchange.started.elapsed());
        let mut request = self
            .client
            .request(head.method.clone(), uri)
            .timeout(timeout)
            .no_decompress();
        *request.headers_mut() = headers;
        body.send(
            &request
                .freeze()
                .map_err(|e| ProxyError::new(Cause::BadTarget, app(), e.to_string()))?,
        )
        .await
        .map(relay)
        .map_err(|e| ProxyError::from_send(&e, app()))
    }
}

/// Binds the inbound listener from the policy (before the servers start, so a taken port fails start-up).
pub fn bind(mesh: &Mesh) -> anyhow::Result<Option<(TcpListener, SocketAddr)>> {
    let Some(inbound) = &mesh.inbound else {
        return Ok(None);
    };
    let listener = TcpListener::bind(inbound.listen)
        .with_context(|| format!("mesh.inbound.listen: cannot bind {}", inbound.listen))?;
    let addr = listener.local_addr()?;
    Ok(Some((listener, addr)))
}
