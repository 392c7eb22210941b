//! The admin listener (`127.0.0.1:9901` by default, never public unless configured so).
//!
//! Owns: the HTTP surface operators use on a running sidecar. `GET /admin/policy` shows the active policy's
//! version, source files, content hash, reload counters and the last reload error; `POST /admin/reload` reloads
//! now and answers 200 when the policy was applied or unchanged, 422 with every error when it was rejected.
//! `GET /healthz` says the process is alive; `GET /readyz` says it should get traffic (policy loaded, listeners
//! bound, not draining), or answers 503 with the reason. `GET /admin/targets` shows each target's live
//! resilience state: breakers (and each endpoint's), requests in flight and queued, retry budget use.
//! Does not own: the policy itself ([`crate::policy::store`]). The telemetry issue adds the rest of the surface.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::policy::store::{PolicyHandle, ReloadResult};
use crate::snapshot::SharedSnapshot;

/// Set once a SIGTERM/SIGINT starts the drain; readiness turns false.
pub type Draining = Arc<AtomicBool>;

async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::telemetry::render())
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

/// Builds the admin server on a pre-bound listener.
pub fn server(
    handle: PolicyHandle,
    draining: Draining,
    snapshot: SharedSnapshot,
    identity: Option<Arc<crate::mesh::Identity>>,
    listener: TcpListener,
) -> std::io::Result<Server> {
    let (handle, draining) = (web::Data::new(handle), web::Data::new(draining));
    let (snapshot, identity) = (web::Data::new(snapshot), web::Data::new(identity));
    Ok(HttpServer::new(move || {
        App::new()
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
