//! sidecar: a single-container service-mesh sidecar. An app sends its outbound HTTP calls to
//! `localhost:5000`, naming the destination with a `target` header (or letting dispatch rules choose), and the
//! sidecar forwards them transparently, applying the operator's policies.
//!
//! # Layout
//!
//! Two planes. The **data plane** is the request path, six phases ([`dispatch::PHASES`], charted in
//! `docs/request-path.md`): it reads the policy from one atomically swapped snapshot (loaded twice per request)
//! and never waits on an actor; the shared state it touches, and its cost, are listed in that document. The **control plane** owns state and timers and publishes snapshots.
//!
//! - [`policy`]: the policy files' model, validation and the seed dispatcher's `config.yaml` format; plain
//!   values, importing nothing from the data plane, the mesh or the control plane.
//! - [`control`]: the control-plane actors: the policy store that reloads policies live ([`control::store`]),
//!   discovery, health checks and the resilience monitor.
//! - [`snapshot`]: the coherent, atomically swapped view of the policy that the request path reads.
//! - [`balance`]: load balancing over a service's endpoints (P2C peak-EWMA, least request, round robin,
//!   consistent hashing with bounded loads).
//! - [`certs`]: `sidecar certs`, a development mesh CA and per-service certificates (not a production CA).
//! - [`dispatch`]: the request path as its phases (guard, route, admit, body, attempt, respond), header
//!   hygiene, the upstream client.
//! - [`mesh`]: the inbound listener: mTLS from peer sidecars, SPIFFE identities, forwarding to the local app.
//! - [`error`]: the sidecar's own responses and the one table classing each cause: its status, its retry class
//!   and whether it counts against a breaker.
//! - [`server`]: listeners; `start` builds the egress and admin listeners on pre-bound sockets.
//! - [`admin`]: the admin listener's routes (`/metrics`, `/healthz`, `/readyz`, `/admin/policy`,
//!   `/admin/reload`, `/admin/targets`, `/admin/mesh`).
//! - [`resilience`]: per-target retries with budgets, circuit breakers, concurrency and rate limits (their
//!   settings are [`policy::traffic`]; the actor that reports on them is [`control::monitor`]).
//! - [`telemetry`]: each sidecar's Prometheus recorder, every metric's name ([`telemetry::names`]) and request timing.
//! - [`upstream`]: where a request goes (a parsed URL, destination or endpoint); a value type, a leaf.
//! - [`fxhash`]: the fast hasher of the per-worker and per-target maps; a leaf.
//! - [`traces`]: OpenTelemetry spans per request and per attempt, W3C/B3 propagation, OTLP export.
//! - [`probe`]: `sidecar health` (a container health check against the admin listener) and `sidecar pause`.
//! - [`access_log`]: one JSON line per request on stdout, written off the request path.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod certs;
pub mod clock;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod fxhash;
pub mod mesh;
pub mod policy;
pub mod probe;
pub mod resilience;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod traces;
pub mod upstream;

/// Installs ring as the process's rustls crypto provider, so that no second provider compiled into the tree
/// can make `ServerConfig::builder()` panic. Idempotent.
pub fn install_crypto_provider() {
    // Err only means a provider was already installed, which is what we want.
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}
