//! The admin listener (`127.0.0.1:9901` by default, never public unless configured so).
//!
//! Owns: the HTTP surface operators use on a running sidecar. `GET /admin/policy` shows the active policy's
//! version, source files, content hash, reload counters and the last reload error; `POST /admin/reload` reloads
//! now and answers 200 when the policy was applied or unchanged, 422 with every error when it was rejected.
//! `GET /healthz` says the process is alive; `GET /readyz` says it should get traffic (policy loaded, listeners
//! bound, not draining), or answers 503 with the reason. `GET /admin/targets` shows each target's live
//! resilience state: breakers (and each endpoint's), requests in flight and queued, retry budget use.
//! Every request that could change state (any method but GET and HEAD) is refused with 403 when a browser could
//! have been made to send it from another site: a foreign `Origin`, `Sec-Fetch-Site` other than `same-origin` or
//! `none`, or a content type an HTML form can send ([`cross_site`]).
//! Does not own: the policy itself ([`crate::control::store`]). The telemetry issue adds the rest of the surface.

use std::net::TcpListener;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::{Method, header};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpResponse, HttpServer, web};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::control::store::{PolicyHandle, ReloadResult};
use crate::snapshot::SharedSnapshot;

/// Set once a SIGTERM/SIGINT starts the drain; readiness turns false.
pub type Draining = Arc<AtomicBool>;

async fn metrics(snapshot: web::Data<SharedSnapshot>) -> HttpResponse {
    let metrics = snapshot.load().hub.metrics;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "alive" }))
}

async fn readyz(handle: web::Data<PolicyHandle>, draining: web::Data<Draining>) -> HttpResponse {
    if draining.load(Ordering::Acquire) {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "ready": false, "reason": "draining: shutting down" }));
    }
    match handle.status().await {
        Ok(status) => HttpResponse::Ok().json(serde_json::json!({ "ready": true, "policy_version": status.version })),
        Err(e) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "ready": false, "reason": format!("policy store unavailable: {e}") })),
    }
}

async fn policy(handle: web::Data<PolicyHandle>) -> HttpResponse {
    match handle.status().await {
        Ok(status) => HttpResponse::Ok().json(status),
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e.to_string() }))
        }
    }
}

async fn targets(snapshot: web::Data<SharedSnapshot>) -> HttpResponse {
    HttpResponse::Ok().json(snapshot.load().targets())
}

/// The mesh certificates in use: identity, expiry, reloads; 404 when this sidecar is not in a mesh.
async fn mesh(identity: web::Data<Option<Arc<crate::mesh::Identity>>>) -> HttpResponse {
    match identity.as_ref() {
        Some(identity) => HttpResponse::Ok().json(identity.state()),
        None => HttpResponse::NotFound()
            .json(serde_json::json!({ "error": "this sidecar has no mesh section" })),
    }
}

async fn reload(handle: web::Data<PolicyHandle>) -> HttpResponse {
    match handle.reload("admin").await {
        Ok(report) if report.result == ReloadResult::Rejected => {
            HttpResponse::UnprocessableEntity().json(report)
        }
        Ok(report) => HttpResponse::Ok().json(report),
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e.to_string() }))
        }
    }
}

/// Why a state-changing request looks like one a browser was made to send from another site (a page on any
/// port of this machine can make a browser post to the admin listener), or `None`. Non-browser clients (curl,
/// scripts, probes) send neither `Origin` nor `Sec-Fetch-Site` and no body, and pass.
///
/// The admin listener's own origin is `http://` its address; on a loopback listener also `localhost` with its
/// port; on an unspecified address (`0.0.0.0`) the `Host` the request names when that is an IP literal with the
/// listener's port (a name could be rebound by DNS to this machine, an IP literal cannot).
pub fn cross_site(req: &ServiceRequest) -> Option<String> {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let header = |name: &str| {
        req.headers().get(name).map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
    };
    if let Some(site) = header("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    if let Some(origin) = header("origin") {
        let local = req.app_config().local_addr();
        if !own_origin(&origin, local, header("host").as_deref()) {
            return Some(format!(
                "Origin {origin} is not this admin listener's (http://{local})"
            ));
        }
    }
    let form = header(header::CONTENT_TYPE.as_str()).is_some_and(|t| {
        let essence = t.split(';').next().unwrap_or_default().trim().to_string();
        matches!(
            essence.as_str(),
            "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
        )
    });
    if form {
        return Some(
            "a content type an HTML form can send; admin requests take no body (curl -X POST)"
                .into(),
        );
    }
    None
}

fn own_origin(origin: &str, local: std::net::SocketAddr, host: Option<&str>) -> bool {
    let Some(authority) = origin.strip_prefix("http://") else {
        return false;
    };
    let authority = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    let port = local.port();
    if authority.parse::<std::net::SocketAddr>() == Ok(local) {
        return true;
    }
    if local.ip().is_loopback() && authority == format!("localhost:{port}") {
        return true;
    }
    local.ip().is_unspecified()
        && host.is_some_and(|h| h == authority)
        && authority
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() == port)
}

async fn refuse_cross_site(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(reason) = cross_site(&req) else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    tracing::warn!(path = %req.path(), reason = %reason, "cross-site admin request refused");
    let res = HttpResponse::Forbidden().json(serde_json::json!({
        "error": "cross-site-request",
        "detail": format!(
            "refused: {reason}; state-changing admin requests are taken from non-browser clients and the \
             admin listener's own origin only"
        ),
    }));
    Ok(req.into_response(res))
}

/// Builds the admin server on a pre-bound listener.
pub fn server(
    handle: PolicyHandle,
    draining: Draining,
    snapshot: SharedSnapshot,
    identity: Option<Arc<crate::mesh::Identity>>,
    listener: TcpListener,
) -> std::io::Result<Server> {
    let (handle, draining) = (web::Data::new(handle), web::Data::new(draining));
    let recorder = snapshot.load().hub.metrics;
    let (snapshot, identity) = (web::Data::new(snapshot), web::Data::new(identity));
    Ok(HttpServer::new(move || {
        // Once per worker thread: the thread is this sidecar's, and counts into its recorder.
        recorder.enter_thread();
        App::new()
            .wrap(from_fn(refuse_cross_site))
            .app_data(handle.clone())
            .app_data(draining.clone())
            .app_data(snapshot.clone())
            .app_data(identity.clone())
            .route("/admin/targets", web::get().to(targets))
            .route("/admin/mesh", web::get().to(mesh))
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/admin/policy", web::get().to(policy))
            .route("/admin/reload", web::post().to(reload))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run())
}
