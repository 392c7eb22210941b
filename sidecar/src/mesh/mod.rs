//! The mesh hop, inbound side: a listener that accepts mTLS from peer sidecars only, takes the peer's identity
//! from its certificate (a SPIFFE URI SAN), and forwards to the local app with that identity in
//! `x-sidecar-peer-identity`.
//!
//! Owns: the rustls server configuration (TLS 1.3 by default, 1.2 only when configured; a client certificate
//! signed by the mesh CA is required), reading the identity from a verified certificate, and the inbound
//! forwarder (path normalized before authorization, underscore header names handled per policy). The certificates themselves, and their reload, are [`tls`]'s. Does not own: the policy's `mesh` section ([`crate::policy::Mesh`]).

use std::any::Any;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;

use actix_http::body::{self, BodySize, EitherBody, SizedStream};
use actix_http::header::{HOST, HeaderName, HeaderValue};
use actix_http::{Request, Response};
use actix_web::HttpServer;
use actix_web::dev::{Extensions, Server};
use anyhow::Context as _;

use std::pin::Pin;
use std::task::Poll;

use actix_http::body::MessageBody;
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::dispatch::forward::{ProxyBody, RATELIMIT, RATELIMIT_POLICY, relay, request_body};
use crate::dispatch::headers::{UnderscoreAction, strip_request, underscores};
use crate::dispatch::path::{self, PathOptions};
use crate::dispatch::target::Upstream;
use crate::error::{Cause, ProxyError};
use crate::policy::{Mesh, UpstreamSettings};
use crate::resilience::limits::{Concurrency, RateLimit};

mod tls;
pub use tls::{CertWatcher, Identity, describe};

/// The verified identity of the peer sidecar, on every request the app receives through the mesh. The same
/// header arriving from outside is removed.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-sidecar-peer-identity");

/// The peer's identity, read once per connection from its verified certificate.
#[derive(Debug, Clone)]
struct PeerIdentity(Option<HeaderValue>);

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
    extensions.insert(PeerIdentity(
        identity.and_then(|id| HeaderValue::from_str(&id).ok()),
    ));
}

/// One worker's inbound forwarder: where requests go (the local app), and the worker's client to it.
struct Local {
    app: Upstream,
    timeout: std::time::Duration,
    authorization: Option<Vec<crate::policy::AllowRule>>,
    paths: PathOptions,
    underscores: UnderscoreAction,
    limits: Arc<Limits>,
    client: awc::Client,
}

/// The inbound listener's limits, shared by every worker: one rate limit (per peer identity by default) and
/// one concurrency limit in front of the app.
#[derive(Debug)]
struct Limits {
    rate: Option<RateLimit>,
    concurrency: Option<Concurrency>,
}

/// The response body, holding the request's concurrency slot until it ends.
pub struct Held<B> {
    inner: B,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B> std::fmt::Debug for Held<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").finish_non_exhaustive()
    }
}

impl<B: MessageBody + Unpin> MessageBody for Held<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_next(cx)
    }
}

/// Builds the inbound server on a pre-bound listener. Like the egress listener it serves a raw `actix_http`
/// service, so the peer's header maps are moved to the app and back, never copied.
pub fn server(
    mesh: &Mesh,
    identity: &Arc<Identity>,
    upstream: &UpstreamSettings,
    listener: TcpListener,
    workers: usize,
) -> anyhow::Result<Server> {
    let Some(inbound) = mesh.inbound.clone() else {
        anyhow::bail!("mesh.inbound is not configured");
    };
    let config = identity.server_config();
    let settings = upstream.clone();
    let name: Arc<str> = Arc::from("inbound");
    let limits = Arc::new(Limits {
        rate: inbound
            .rate_limit
            .clone()
            .map(|p| RateLimit::new(p, name.clone())),
        concurrency: inbound.concurrency.map(Concurrency::new),
    });
    let tls = crate::dispatch::client::tls_config();
    let underscores = mesh.headers_with_underscores;
    let server = HttpServer::new(move || {
        // Once per worker: the awc client is !Send and lives with its worker.
        let local = Rc::new(Local {
            app: inbound.app.clone(),
            timeout: inbound.request_timeout,
            authorization: inbound.authorization.clone(),
            paths: inbound.paths,
            underscores,
            limits: limits.clone(),
            client: crate::dispatch::client::build(&settings, tls.clone()),
        });
        actix_service::fn_service(move |req: Request| {
            let local = Rc::clone(&local);
            async move {
                let res = match local.forward(req).await {
                    Ok(res) => res,
                    Err(e) => e.to_response().map_body(|_, b| Held {
                        inner: EitherBody::right(b),
                        _permit: None,
                    }),
                };
                Ok::<_, actix_web::Error>(res)
            }
        })
    })
    .workers(workers)
    .disable_signals()
    .tcp_nodelay(true)
    .on_connect(on_connect)
    .listen_rustls_0_23(listener, config)?
    .run();
    Ok(server)
}

impl Local {
    /// Forwards one inbound request to the local app, with the peer's verified identity.
    async fn forward(&self, req: Request) -> Result<Response<Held<ProxyBody>>, ProxyError> {
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
        let started = std::time::Instant::now();
        if let Some(limit) = &self.limits.rate
            && let Err(limited) = limit.check(&headers, req_peer)
        {
            metrics::counter!(crate::resilience::monitor::RATE_LIMITED, "service" => "inbound")
                .increment(1);
            return Err(
                ProxyError::new(Cause::RateLimited, app(), "over the inbound rate limit")
                    .retry_after(limited.retry_after)
                    .with_header(RATELIMIT_POLICY, limit.policy_header().clone())
                    .with_header(RATELIMIT, limit.refusal_header(limited)),
            );
        }
        let permit = match &self.limits.concurrency {
            Some(c) => match c.acquire(started + self.timeout).await {
                Ok(permit) => Some(permit),
                Err(overload) => {
                    metrics::counter!(crate::resilience::monitor::OVERLOADED, "service" => "inbound", "reason" => overload.as_str())
                        .increment(1);
                    return Err(ProxyError::new(
                        Cause::Overloaded,
                        app(),
                        format!(
                            "the app's inbound concurrency limit is reached ({})",
                            overload.as_str()
                        ),
                    ));
                }
            },
            None => None,
        };
        // The request timeout covers the queue wait too.
        let timeout = self.timeout.saturating_sub(started.elapsed());
        let mut request = self
            .client
            .request(head.method.clone(), uri)
            .timeout(timeout)
            .no_decompress();
        *request.headers_mut() = headers;
        let sending = match framing {
            BodySize::None => request.send_body(body::None::new()),
            BodySize::Sized(0) => request.send_body(()),
            BodySize::Sized(n) => request.send_body(SizedStream::new(n, payload)),
            BodySize::Stream => request.send_stream(payload),
        };
        sending
            .await
            .map(|res| {
                relay(res).map_body(|_, inner| Held {
                    inner,
                    _permit: permit,
                })
            })
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
