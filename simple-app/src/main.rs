//! simple-app: a small business app that shows the sidecar from the app's side.
//!
//! It calls other services only through its sidecar (`localhost:5000` with a `target` header), and it has
//! knobs for demos, tests and benchmarks. Every endpoint takes these query parameters:
//!
//! - `latency=250ms`: wait before answering;
//! - `status=503`: answer with this status;
//! - `fail_rate=0.2`: answer 500 to this share of requests;
//! - `size=1024`: answer a body of this many bytes.
//!
//! Endpoints: `GET /` (a short greeting), `ANY /echo` (what was received, as JSON), `GET /call` (call another
//! service through the sidecar: `?target=<url or service>&internal=true&path=/x`), `GET /healthz`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use serde::Deserialize;

#[derive(Debug, Parser, Clone)]
#[command(
    version,
    about = "A demo app that calls other services through its sidecar"
)]
struct Cli {
    /// Address to serve on.
    #[arg(long, env = "APP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// The sidecar's egress address.
    #[arg(long, env = "SIDECAR_URL", default_value = "http://127.0.0.1:5000")]
    sidecar: String,
    /// Worker threads.
    #[arg(long, env = "APP_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Name this instance reports in its answers (for load-balancing demos).
    #[arg(long, env = "APP_NAME", default_value = "simple-app")]
    name: String,
}

#[derive(Debug, Default, Deserialize)]
struct Knobs {
    latency: Option<String>,
    status: Option<u16>,
    fail_rate: Option<f64>,
    size: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct CallParams {
    target: String,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    path: Option<String>,
}

struct State {
    name: String,
    sidecar: String,
}

fn parse_latency(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = text.strip_suffix('s') {
        return s.parse::<f64>().ok().map(Duration::from_secs_f64);
    }
    text.parse().ok().map(Duration::from_millis)
}

/// A cheap pseudo-random number in [0, 1) for the failure knob (xorshift over a shared counter).
fn chance() -> f64 {
    static SEED: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Applies the knobs; returns the response to send instead of the normal one, if any.
async fn apply(knobs: &Knobs) -> Option<HttpResponse> {
    if let Some(d) = knobs.latency.as_deref().and_then(parse_latency) {
        tokio::time::sleep(d).await;
    }
    if let Some(rate) = knobs.fail_rate
        && chance() < rate
    {
        return Some(HttpResponse::InternalServerError().body("injected failure\n"));
    }
    if let Some(size) = knobs.size {
        let status = knobs
            .status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        return Some(HttpResponse::build(status).body(Bytes::from(vec![b'x'; size])));
    }
    None
}

async fn hello(knobs: web::Query<Knobs>, state: web::Data<State>) -> HttpResponse {
    if let Some(res) = apply(&knobs).await {
        return res;
    }
    let status = knobs
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    HttpResponse::build(status).body(format!("hello from {}\n", state.name))
}

async fn echo(
    req: HttpRequest,
    body: Bytes,
    knobs: web::Query<Knobs>,
    state: web::Data<State>,
) -> HttpResponse {
    if let Some(res) = apply(&knobs).await {
        return res;
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let status = knobs
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    HttpResponse::build(status).json(serde_json::json!({
        "app": state.name,
        "method": req.method().as_str(),
        "path": req.path(),
        "query": req.query_string(),
        "headers": headers,
        "body_bytes": body.len(),
        "body": String::from_utf8_lossy(&body),
    }))
}

async fn call(params: web::Query<CallParams>, state: web::Data<State>) -> HttpResponse {
    let client = awc::Client::builder().disable_timeout().finish();
    let path = params.path.as_deref().unwrap_or("/");
    let mut request = client
        .get(format!("{}{}", state.sidecar.trim_end_matches('/'), path))
        .insert_header(("target", params.target.as_str()));
    if params.internal {
        request = request.insert_header(("internal", "true"));
    }
    match request.send().await {
        Ok(mut res) => {
            let status = res.status().as_u16();
            let sidecar_error = res
                .headers()
                .get("x-sidecar-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = res.body().limit(1 << 20).await.unwrap_or_default();
            HttpResponse::Ok().json(serde_json::json!({
                "target": params.target,
                "status": status,
                "sidecar_error": sidecar_error,
                "body": String::from_utf8_lossy(&body),
            }))
        }
        Err(e) => HttpResponse::BadGateway().json(serde_json::json!({
            "target": params.target,
            "error": format!("cannot reach the sidecar at {}: {e}", state.sidecar),
        })),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let listen = cli.listen.clone();
    actix_rt::System::new().block_on(async move {
        let state = web::Data::new(State {
            name: cli.name.clone(),
            sidecar: cli.sidecar.clone(),
        });
        tracing::info!(listen = %listen, sidecar = %cli.sidecar, "simple-app listening");
        HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(64 << 20))
                .route("/", web::get().to(hello))
                .route("/healthz", web::get().to(healthz))
                .route("/call", web::get().to(call))
                .route("/echo", web::route().to(echo))
                .route("/echo/{tail:.*}", web::route().to(echo))
        })
        .workers(cli.workers)
        .tcp_nodelay(true)
        .bind(&listen)
        .with_context(|| format!("cannot listen on {listen}"))?
        .run()
        .await
        .context("server failed")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_knob_reads_human_units() {
        assert_eq!(parse_latency("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_latency("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_latency("20"), Some(Duration::from_millis(20)));
    }

    #[test]
    fn chance_stays_in_range() {
        assert!((0..1000).map(|_| chance()).all(|c| (0.0..1.0).contains(&c)));
    }
}
