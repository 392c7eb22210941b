//! The admin listener (`127.0.0.1:9901` by default, never public unless configured so).
//!
//! Owns: the HTTP surface operators use on a running sidecar. `GET /admin/policy` shows the active policy's
//! version, source files, content hash, reload counters and the last reload error; `POST /admin/reload` reloads
//! now and answers 200 when the policy was applied or unchanged, 422 with every error when it was rejected.
//! Does not own: the policy itself ([`crate::policy::store`]). The telemetry issue adds the rest of the surface.

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};

use crate::policy::store::{PolicyHandle, ReloadResult};

async fn policy(handle: web::Data<PolicyHandle>) -> HttpResponse {
    match handle.status().await {
        Ok(status) => HttpResponse::Ok().json(status),
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "error": e.to_string() }))
        }
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
    listener: TcpListener,
    signals: bool,
) -> std::io::Result<Server> {
    let data = web::Data::new(handle);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/admin/policy", web::get().to(policy))
            .route("/admin/reload", web::post().to(reload))
    })
    .workers(1)
    .listen(listener)?;
    if !signals {
        server = server.disable_signals();
    }
    Ok(server.run())
}
