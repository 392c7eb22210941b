//! The request path, as its phases: one app request in, one upstream request out, the upstream's response
//! streamed back. The phases, what each may answer and the chart with the retry edge are in
//! `docs/request-path.md`; [`super::PHASES`] names them, a module each:
//! [`guard`](super::guard) → [`route`](super::route) → [`admit`](super::admit) → [`body`](super::body) →
//! [`attempt`](super::attempt) (choose, send, classify, decide) → [`respond`](super::respond), over one
//! per-request context ([`Exchange`]).
//!
//! Any failure becomes a [`ProxyError`] response. No actor round trip and no header copy: the app's header
//! map is moved into the upstream request and the upstream's into the response. No lock either: what the
//! shared per-target state costs instead is in `docs/request-path.md`.

use std::cell::Cell;
use std::mem;
use std::sync::Arc;

use actix_http::{Method, Request, Response};

use super::admit::{Asking, Gates, admit};
use super::attempt::{Outbound, attempt};
use super::body::{Body, request_body};
use super::exchange::{Exchange, Listener};
use super::guard::guard;
use super::respond::{ATTEMPTS, ProxyBody, answer, attempts_value, finish, relay};
use super::route::{Plan, Targets, plan};
use super::shadow;
use crate::access_log::Sampler;
use crate::control::shadow::Meet;
use crate::error::{Cause, ProxyError};
use crate::snapshot::SharedSnapshot;
use crate::telemetry::{Instruments, Timed};

/// The egress listener, as the exchange names it.
const EGRESS: Listener = Listener {
    direction: "egress",
    scheme: "http",
    service: "none",
};

/// One worker's forwarder: the shared snapshot and the worker's own upstream client.
pub struct Forwarder {
    snapshot: SharedSnapshot,
    /// TLS settings of the shared client, kept to rebuild it.
    tls: Arc<rustls::ClientConfig>,
    /// The snapshot's `pool_generation` that `client` and `settings` were built for.
    generation: Cell<u64>,
    client: std::cell::RefCell<awc::Client>,
    /// Pool settings of `client`, and of the mesh clients built on first use.
    settings: std::cell::RefCell<Arc<crate::policy::UpstreamSettings>>,
    /// This sidecar's mesh certificates, when the policy had a `mesh` section at start-up.
    identity: Option<Arc<crate::mesh::Identity>>,
    /// One mTLS client per `mesh: true` service (each verifies that service's identity), built on first use.
    mesh_clients: std::cell::RefCell<std::collections::HashMap<Arc<str>, awc::Client>>,
    /// The `target` URLs this worker has parsed.
    targets: Targets,
    instruments: Instruments,
    sampler: Sampler,
    /// This sidecar's shadow actor, which sends traffic copies.
    shadows: crate::control::shadow::Shadows,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Builds the worker's client from the snapshot's pool settings and `tls`; the mesh clients are built with
    /// the same pool settings, on `identity`.
    pub fn new(
        snapshot: SharedSnapshot,
        tls: Arc<rustls::ClientConfig>,
        identity: Option<Arc<crate::mesh::Identity>>,
        shadows: crate::control::shadow::Shadows,
    ) -> Self {
        let (generation, settings) = {
            let s = snapshot.load();
            (s.pool_generation, s.pool.clone())
        };
        Self {
            client: std::cell::RefCell::new(super::client::build(&settings, tls.clone())),
            snapshot,
            tls,
            generation: Cell::new(generation),
            settings: std::cell::RefCell::new(settings),
            identity,
            mesh_clients: std::cell::RefCell::default(),
            targets: Targets::default(),
            instruments: Instruments::default(),
            sampler: Sampler::default(),
            shadows,
        }
    }

    /// Rebuilds the clients when a reload changed the pool settings; requests in flight keep the old client,
    /// whose idle connections close when the last of them ends.
    fn follow_pool(&self, snapshot: &crate::snapshot::Snapshot) {
        if snapshot.pool_generation == self.generation.get() {
            return;
        }
        self.generation.set(snapshot.pool_generation);
        *self.client.borrow_mut() = super::client::build(&snapshot.pool, self.tls.clone());
        *self.settings.borrow_mut() = snapshot.pool.clone();
        self.mesh_clients.borrow_mut().clear();
    }

    /// The client for a plan: the shared one, or the mesh client that verifies the service's identity.
    fn client_for(&self, plan: &Plan) -> Result<awc::Client, ProxyError> {
        let Some((service, mesh)) = &plan.mesh else {
            return Ok(self.client.borrow().clone());
        };
        if let Some(c) = self.mesh_clients.borrow().get(service) {
            return Ok(c.clone());
        }
        let Some(identity) = &self.identity else {
            return Err(ProxyError::new(
                Cause::UpstreamTls,
                service.to_string(),
                "this sidecar started without a mesh section: restart it to call mesh services",
            ));
        };
        let config = identity.client_config(crate::certs::spiffe_id(&mesh.trust_domain, service));
        let client = super::client::build(&self.settings.borrow(), Arc::new(config));
        self.mesh_clients
            .borrow_mut()
            .insert(service.clone(), client.clone());
        Ok(client)
    }

    /// Handles one app request. Never fails: errors become responses.
    pub async fn handle(&self, req: Request) -> Response<Timed<ProxyBody>> {
        let log = self.snapshot.load().access_log;
        let mut exchange =
            Exchange::arriving(&req, EGRESS, log, &self.instruments, &self.sampler, None);
        let mut meets = Vec::new();
        let result = self.forward(req, &mut exchange, &mut meets).await;
        let (mut res, outcome) = answer(result);
        for (meet, copy) in meets {
            meet.primary(res.status().as_u16(), &copy);
        }
        if exchange.labels.attempts > 0 {
            res.headers_mut()
                .insert(ATTEMPTS, attempts_value(exchange.labels.attempts));
        }
        finish(exchange, res, outcome, &self.instruments, None)
    }

    /// The phases, in order; the first refusal is the answer.
    async fn forward(
        &self,
        req: Request,
        exchange: &mut Exchange,
        meets: &mut Vec<(Arc<Meet>, Arc<crate::policy::copies::Copy>)>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let peer = req.peer_addr().map(|p| p.ip());
        let (mut head, payload) = req.into_parts();
        let framing = request_body(&head);
        let method = mem::replace(&mut head.method, Method::GET);

        // Everything that needs the snapshot happens in this block: the guard is released before anything is
        // awaited, so a slow upstream never pins an old policy.
        let (plan, picked) = {
            let snapshot = self.snapshot.load();
            self.follow_pool(&snapshot);
            guard(&head, snapshot.max_header_size)?;
            let plan = plan(
                &snapshot,
                &mut head.headers,
                peer,
                &self.targets,
                exchange.started,
                &mut exchange.labels.service,
            )?;
            let picked = shadow::pick(&snapshot, plan.copies.as_ref(), &method, &head.headers);
            (plan, picked)
        };

        let asking = Asking {
            headers: &head.headers,
            peer,
            label: &plan.label,
            deadline: plan.deadline,
            timeout: plan.timeout,
        };
        let ticket = admit(
            Gates::from(&*plan.target),
            asking,
            || plan.upstreams.name(),
            &self.instruments,
            &mut exchange.hold,
        )
        .await?;

        let client = self.client_for(&plan)?;
        let retries = &plan.target.policy.retries;
        let replay = (retries.max_retries > 0).then_some(retries.max_body);
        let mut body = Body::read(
            framing,
            payload,
            replay,
            plan.deadline,
            &mut exchange.labels,
        )
        .await?;
        if !picked.is_empty() {
            let copy = shadow::Primary {
                plan: &plan,
                method: &method,
                uri: &head.uri,
                headers: &head.headers,
                peer,
                trace: exchange.trace(),
            };
            shadow::hand_off(picked, copy, &mut body, &self.shadows, meets);
        }

        let headers = mem::take(&mut head.headers);
        let outbound = Outbound {
            method,
            uri: &head.uri,
            headers,
            peer,
        };
        attempt(
            &plan,
            &client,
            outbound,
            &mut body,
            ticket,
            exchange,
            &self.instruments,
        )
        .await
        .map(relay)
    }
}
