//! sidecar: a single-container service-mesh sidecar. An app sends its outbound HTTP calls to
//! `localhost:5000`, naming the destination with a `target` header (or letting dispatch rules choose), and the
//! sidecar forwards them transparently, applying the operator's policies.
//!
//! # Layout
//!
//! Two planes. The **data plane** is the request path: lock-free, it reads one snapshot per request and never
//! waits on an actor. The **control plane** owns state and timers and publishes snapshots.
//!
//! - [`policy`]: the policy files' model, validation, the seed dispatcher's `config.yaml` format, and the
//!   policy store actor that reloads them live ([`policy::store`]).
//! - [`snapshot`]: the coherent, atomically swapped view of the policy that the request path reads.
//! - [`balance`]: load balancing over a service's endpoints (P2C peak-EWMA, least request, round robin,
//!   consistent hashing with bounded loads).
//! - [`certs`]: `sidecar certs`, a development mesh CA and per-service certificates (not a production CA).
//! - [`discovery`]: the actor that keeps services' endpoints current from DNS (A/AAAA, SRV) or a hosts file.
//! - [`dispatch`]: the request path: route selection, header hygiene, forwarding, the upstream client.
//! - [`mesh`]: the inbound listener: mTLS from peer sidecars, SPIFFE identities, forwarding to the local app.
//! - [`health`]: the actor that runs active HTTP health checks of service endpoints.
//! - [`error`]: the sidecar's own responses and the one table mapping causes to status codes.
//! - [`server`]: listeners; `start` builds the egress and admin listeners on pre-bound sockets.
//! - [`admin`]: the admin listener's routes (`/metrics`, `/healthz`, `/readyz`, `/admin/policy`,
//!   `/admin/reload`, `/admin/targets`, `/admin/mesh`).
//! - [`resilience`]: per-target retries with budgets, circuit breakers, concurrency and rate limits, and the
//!   actor that reports on them.
//! - [`telemetry`]: the Prometheus recorder, metric names and request timing.
//! - [`traces`]: OpenTelemetry spans per request and per attempt, W3C/B3 propagation, OTLP export.
//! - [`probe`]: `sidecar health` (a container health check against the admin listener) and `sidecar pause`.
//! - [`access_log`]: one JSON line per request on stdout, written off the request path.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod certs;
pub mod discovery;
pub mod dispatch;
pub mod error;
pub mod health;
pub mod mesh;
pub mod policy;
pub mod probe;
pub mod resilience;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod traces;

/// Installs ring as the process's rustls crypto provider, so that no second provider compiled into the tree
/// can make `ServerConfig::builder()` panic. Idempotent.
pub fn install_crypto_provider() {
    // Err only means a provider was already installed, which is what we want.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}
