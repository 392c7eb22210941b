//! Listeners: the egress listener that apps call on `localhost:5000`, the admin listener, and the mesh's
//! inbound listener.
//!
//! Owns: building the actix-web servers (one [`Forwarder`], and so one upstream client, per egress worker),
//! starting the policy store, SIGHUP, and replacing a listener's server when a reload changes its address or
//! its worker count: the new server starts first, the old one drains (see [`Slot::stop`]), and the other
//! listener's connections are never touched. A change of upstream pool settings needs no new server: each
//! worker's forwarder rebuilds its client. For the mesh, a reload's new certificate files are read and checked
//! before anything changes (a bad set rejects the reload), the inbound settings (app, timeout, authorization,
//! limits) are swapped without a new listener, and a new address or TLS versions restart the inbound
//! listener. Does not own: what a request does (see
//! [`crate::dispatch`]). Called by `main.rs` and by the tests, which hand it pre-bound listeners.

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::{AsyncContext, Context};
use actix_http::{ConnectionType, Request};
use actix_rt::task::JoinHandle;
use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};

use crate::admin::Draining;
use crate::control::store::{ListenerControl, PolicyHandle, PolicySource, PolicyStore};
use crate::dispatch::{client, forward::Forwarder};
use crate::mesh::{Identity, Prepared, Settings, SharedSettings};
use crate::policy::{Inbound, Listeners as ListenerSettings, Mesh, Policy, UpstreamSettings};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// How long the egress listener keeps an idle app connection: longer than common client pool idle timeouts
/// (Go's 90 s), so the app never reuses a connection the sidecar is closing.
const APP_KEEP_ALIVE: Duration = Duration::from_secs(120);

/// Pre-bound sockets for the listeners.
#[derive(Debug)]
pub struct Listeners {
    pub egress: TcpListener,
    /// The admin listener; none when the caller does not want one.
    pub admin: Option<TcpListener>,
}

/// Options that are not policy: how the process is run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Handle SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload). The binary does; in-process tests do not.
    pub signals: bool,
    /// The clock of breakers, budgets and rate limits: the system's, or a manual one a test advances.
    pub clock: crate::clock::Clock,
}

/// Every server running now, and every task to wait for (servers being drained included).
#[derive(Default)]
struct Tasks {
    /// Running servers: id, whether it is the admin listener, handle.
    handles: Vec<(u64, bool, ServerHandle)>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    next_id: u64,
    /// Async fan-outs accepted and not yet sent, which a graceful stop waits for.
    fanouts: crate::control::fanout::Fanouts,
    /// How long a graceful stop waits for them: the policy's drain timeout.
    drain_timeout: std::time::Duration,
    /// The threads of the shadow and fan-out actors, stopped last.
    arbiters: Vec<actix_rt::Arbiter>,
}

impl Tasks {
    fn spawn(shared: &Rc<RefCell<Tasks>>, server: Server, admin: bool) -> (u64, ServerHandle) {
        let handle = server.handle();
        let mut tasks = shared.borrow_mut();
        tasks.next_id += 1;
        let id = tasks.next_id;
        tasks.handles.push((id, admin, handle.clone()));
        tasks.tasks.push(actix_rt::spawn(server));
        (id, handle)
    }
}

/// A running sidecar.
pub struct Running {
    pub egress: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The mesh's inbound (mTLS) listener, when the policy has one.
    pub inbound: Option<SocketAddr>,
    pub snapshot: SharedSnapshot,
    pub policy: PolicyHandle,
    draining: Draining,
    tasks: Rc<RefCell<Tasks>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("egress", &self.egress)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stops every listener; with `graceful`, readiness turns false and requests in flight finish first (within
    /// the drain timeout) while the admin listener keeps answering.
    pub async fn stop(&self, graceful: bool) {
        drain(&self.tasks, &self.draining, graceful).await;
    }

    /// Runs until every listener stops, those started by later reloads included.
    pub async fn wait(self) -> std::io::Result<()> {
        loop {
            let next = self.tasks.borrow_mut().tasks.pop();
            match next {
                Some(task) => task.await.map_err(std::io::Error::other)??,
                None => return Ok(()),
            }
        }
    }
}

async fn drain(tasks: &Rc<RefCell<Tasks>>, draining: &Draining, graceful: bool) {
    draining.store(true, Ordering::Release);
    let (handles, fanouts, timeout, arbiters) = {
        let mut t = tasks.borrow_mut();
        (
            std::mem::take(&mut t.handles),
            t.fanouts.clone(),
            t.drain_timeout,
            std::mem::take(&mut t.arbiters),
        )
    };
    let (admin, egress): (Vec<_>, Vec<_>) = handles.into_iter().partition(|(_, admin, _)| *admin);
    for (_, _, handle) in egress {
        handle.stop(graceful).await;
    }
    // The fan-outs the app was answered 202 for run on a thread of their own: once no listener takes new ones,
    // they get what is left of the drain timeout to be sent.
    if graceful {
        fanouts.settle(timeout).await;
    }
    for (_, _, handle) in admin {
        handle.stop(graceful).await;
    }
    // Copies still in flight are abandoned with their threads: a copy is never worth holding an exit for.
    for arbiter in arbiters {
        arbiter.stop();
    }
}

/// Builds egress servers: the same snapshot and TLS settings, the listener settings of a policy.
#[derive(Clone)]
struct EgressFactory {
    snapshot: SharedSnapshot,
    tls: Arc<rustls::ClientConfig>,
    identity: Option<Arc<Identity>>,
    shadows: crate::control::shadow::Shadows,
    fanouts: crate::control::fanout::Fanouts,
}

impl EgressFactory {
    /// Once `closing` is set, every response says `Connection: close` (the server is being replaced).
    fn build(
        &self,
        listener: TcpListener,
        settings: &ListenerSettings,
        closing: Arc<AtomicBool>,
    ) -> std::io::Result<Server> {
        let (snapshot, tls) = (self.snapshot.clone(), self.tls.clone());
        let identity = self.identity.clone();
        let shadows = self.shadows.clone();
        let fanouts = self.fanouts.clone();
        let metrics = snapshot.load().hub.metrics;
        let server = HttpServer::new(move || {
            // Runs once per worker thread: the awc client is !Send and lives with its worker, and the thread
            // is this sidecar's, counting into its recorder.
            metrics.enter_thread();
            let forwarder = Rc::new(Forwarder::new(
                snapshot.clone(),
                tls.clone(),
                identity.clone(),
                shadows.clone(),
                fanouts.clone(),
            ));
            let closing = closing.clone();
            actix_service::fn_service(move |req: Request| {
                let forwarder = Rc::clone(&forwarder);
                let closing = closing.clone();
                async move {
                    let mut res = forwarder.handle(req).await;
                    if closing.load(Ordering::Relaxed) {
                        res.head_mut().set_connection_type(ConnectionType::Close);
                    }
                    Ok::<_, actix_web::Error>(res)
                }
            })
        })
        .workers(settings.workers)
        .keep_alive(APP_KEEP_ALIVE)
        // Every request head, on a new connection or a reused one (our actix-http patch), must arrive in time.
        .client_request_timeout(settings.head_timeout)
        .tcp_nodelay(true)
        // Signals are the lifecycle task's: actix would stop at once on SIGINT.
        .disable_signals()
        .shutdown_timeout(settings.drain_timeout.as_secs().max(1))
        .listen(listener)?;
        Ok(server.run())
    }
}

/// One listener's current server and a duplicate of its socket (to start a replacement on the same port).
struct Slot {
    addr: SocketAddr,
    socket: TcpListener,
    id: u64,
    handle: ServerHandle,
    /// For a server whose responses can be marked `Connection: close` while it is replaced, the flag that
    /// does it and how long its idle connections are kept once it is set.
    closing: Option<(Arc<AtomicBool>, Duration)>,
}

/// A server built on its listener but not running yet (a `Server` does nothing until it is spawned).
struct Built {
    addr: SocketAddr,
    socket: TcpListener,
    server: Server,
    /// As [`Slot::closing`].
    closing: Option<(Arc<AtomicBool>, Duration)>,
}

impl Built {
    fn new(
        listener: TcpListener,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let socket = listener.try_clone()?;
        Ok(Self {
            addr,
            socket,
            server: build(listener)?,
            closing: None,
        })
    }

    /// The egress server of `settings` on `listener`, whose responses say `Connection: close` once it is
    /// being replaced.
    fn egress(
        factory: &EgressFactory,
        listener: TcpListener,
        settings: &ListenerSettings,
    ) -> std::io::Result<Self> {
        let closing = Arc::new(AtomicBool::new(false));
        let flag = closing.clone();
        let mut built = Self::new(listener, |l| factory.build(l, settings, flag))?;
        built.closing = Some((closing, settings.drain_timeout));
        Ok(built)
    }

    fn spawn(self, tasks: &Rc<RefCell<Tasks>>, admin: bool) -> Slot {
        let (id, handle) = Tasks::spawn(tasks, self.server, admin);
        Slot {
            addr: self.addr,
            socket: self.socket,
            id,
            handle,
            closing: self.closing,
        }
    }
}

impl Slot {
    fn start(
        tasks: &Rc<RefCell<Tasks>>,
        listener: TcpListener,
        admin: bool,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<Self> {
        Ok(Built::new(listener, build)?.spawn(tasks, admin))
    }

    /// Stops the server: it stops accepting at once and, unless a successor serves on the same socket
    /// (`kept`), its socket is shut, so connections there are refused rather than accepted and reset. With a
    /// closing flag, it then answers the requests still sent on its connections with `Connection: close` for
    /// the grace, so a client learns to leave each connection with a response rather than a reset; only then
    /// are the connections that stayed idle closed, and the requests in flight finish within the drain
    /// timeout. Nothing waits for it here.
    fn stop(self, tasks: &Rc<RefCell<Tasks>>, kept: bool) {
        let Self {
            addr,
            socket,
            id,
            handle,
            closing,
        } = self;
        tasks.borrow_mut().handles.retain(|(i, _, _)| *i != id);
        actix_rt::spawn(async move {
            handle.pause().await;
            if !kept
                && let Err(e) = socket2::SockRef::from(&socket).shutdown(std::net::Shutdown::Both)
            {
                tracing::warn!(%addr, error = %e, "could not close the old listening socket; it closes when the old server stops");
            }
            drop(socket);
            if let Some((closing, grace)) = &closing {
                closing.store(true, Ordering::Relaxed);
                actix_rt::time::sleep(*grace).await;
            }
            handle.stop(true).await;
        });
    }

    /// Starts `build` on `addr` (the same socket when the address is unchanged), then drains the old server:
    /// it stops accepting at once, and on a moved address its socket closes, so connections there are refused
    /// rather than accepted and reset. With a closing flag, it then answers the requests still sent on its
    /// connections with `Connection: close` for the grace, so a client learns to leave each connection with a
    /// response rather than a reset; only then are the connections that stayed idle closed, and the requests in
    /// flight finish within the drain timeout.
    fn replace(
        &mut self,
        tasks: &Rc<RefCell<Tasks>>,
        addr: SocketAddr,
        admin: bool,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<()> {
        self.replace_with(tasks, addr, |l| Self::start(tasks, l, admin, build))
    }

    /// As [`Slot::replace`], with the new slot started by `start`.
    fn replace_with(
        &mut self,
        tasks: &Rc<RefCell<Tasks>>,
        addr: SocketAddr,
        start: impl FnOnce(TcpListener) -> std::io::Result<Self>,
    ) -> std::io::Result<()> {
        let listener = if addr == self.addr {
            self.socket.try_clone()?
        } else {
            TcpListener::bind(addr)?
        };
        let next = start(listener)?;
        let moved = self.addr != addr;
        std::mem::replace(self, next).stop(tasks, !moved);
        Ok(())
    }

    /// Starts the egress server of `settings` on `listener`.
    fn egress(
        tasks: &Rc<RefCell<Tasks>>,
        factory: &EgressFactory,
        listener: TcpListener,
        settings: &ListenerSettings,
    ) -> std::io::Result<Self> {
        Ok(Built::egress(factory, listener, settings)?.spawn(tasks, false))
    }
}

/// The listeners as the policy store sees them.
struct Servers {
    tasks: Rc<RefCell<Tasks>>,
    egress_factory: EgressFactory,
    egress: Slot,
    admin: Option<(Slot, PolicyHandle)>,
    draining: Draining,
    /// The mesh, when the sidecar started with one.
    mesh: Option<MeshState>,
}

/// The mesh as the listeners run it.
struct MeshState {
    identity: Arc<Identity>,
    /// The `mesh` section in effect: what a reload compares against (a listener that could not move keeps its
    /// old address here).
    running: Mesh,
    /// What the inbound listener applies per request; swapped by a reload without a new listener.
    settings: Option<SharedSettings>,
    inbound: Option<Slot>,
    /// The certificate files a reload names, read and checked by `prepare`, used by `apply`.
    prepared: Option<Prepared>,
}

/// Builds the inbound server: the identity's TLS versions, the shared settings, the policy's pool, workers and
/// drain timeout.
fn inbound_builder(
    identity: Arc<Identity>,
    settings: SharedSettings,
    snapshot: SharedSnapshot,
    upstream: UpstreamSettings,
    listeners: &crate::policy::Listeners,
) -> impl FnOnce(TcpListener) -> std::io::Result<Server> {
    let (workers, drain) = (listeners.workers, listeners.drain_timeout);
    move |listener| {
        crate::mesh::server(
            &identity, settings, snapshot, &upstream, listener, workers, drain,
        )
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

/// What of the inbound settings changed, by key, for the reload report.
fn inbound_changes(was: Option<&Inbound>, next: &Inbound) -> Vec<&'static str> {
    let Some(was) = was else {
        return vec![
            "app",
            "request_timeout",
            "authorization",
            "paths",
            "rate_limit",
            "concurrency",
        ];
    };
    [
        ("app", was.app != next.app),
        (
            "request_timeout",
            was.request_timeout != next.request_timeout,
        ),
        ("authorization", was.authorization != next.authorization),
        ("paths", was.paths != next.paths),
        ("rate_limit", was.rate_limit != next.rate_limit),
        ("concurrency", was.concurrency != next.concurrency),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

impl MeshState {
    /// Applies `next`'s mesh section: new files (checked by `prepare`), the inbound settings, the listener.
    fn apply(
        &mut self,
        tasks: &Rc<RefCell<Tasks>>,
        snapshot: &SharedSnapshot,
        running: &Policy,
        next: &Policy,
        done: &mut Vec<Result<String, String>>,
    ) {
        let Some(mesh) = &next.mesh else {
            if let Some(slot) = self.inbound.take() {
                let addr = slot.addr;
                slot.stop(tasks, false);
                done.push(Ok(format!(
                    "mesh inbound listener on {addr} stopped: the policy has no mesh section \
                     (the certificates stay loaded until a restart)"
                )));
            }
            self.running.inbound = None;
            return;
        };
        let was = self.running.clone();
        if let Some(prepared) = self.prepared.take() {
            self.identity.retarget(prepared);
            done.push(Ok(format!(
                "mesh identity {} now read from {} and {}, CA bundle {}",
                self.identity.spiffe_id(),
                mesh.cert.display(),
                mesh.key.display(),
                mesh.ca.display()
            )));
        }
        let mesh_services = next.services.values().any(|s| s.mesh);
        if mesh_services && was.trust_domain != mesh.trust_domain {
            done.push(Err(format!(
                "mesh.trust_domain: {} -> {}: mesh services already called keep verifying their peers in {} \
                 (restart to apply)",
                was.trust_domain, mesh.trust_domain, was.trust_domain
            )));
        }
        if mesh_services && was.tls12 != mesh.tls12 {
            done.push(Err(
                "mesh.tls12: mesh services already called keep the TLS versions they started with \
                 (restart to apply)"
                    .into(),
            ));
        }
        let mut applied = mesh.clone();
        match (&mesh.inbound, self.inbound.as_mut()) {
            (None, None) => {}
            (None, Some(_)) => {
                if let Some(slot) = self.inbound.take() {
                    let addr = slot.addr;
                    slot.stop(tasks, false);
                    done.push(Ok(format!(
                        "mesh inbound listener on {addr} stopped: the policy has no mesh.inbound"
                    )));
                }
            }
            (Some(inbound), slot) => {
                let mut changes = inbound_changes(was.inbound.as_ref(), inbound);
                if was.headers_with_underscores != mesh.headers_with_underscores {
                    changes.push("headers_with_underscores");
                }
                let settings = match &self.settings {
                    Some(shared) => {
                        if !changes.is_empty() {
                            let current = shared.load_full();
                            shared.store(Arc::new(Settings::new(
                                inbound,
                                mesh.headers_with_underscores,
                                Some(&current),
                                &snapshot.load().hub.clock,
                            )));
                            if slot.is_some() {
                                done.push(Ok(format!(
                                    "mesh inbound {} applied to the next requests",
                                    changes.join(", ")
                                )));
                            }
                        }
                        shared.clone()
                    }
                    None => self
                        .settings
                        .insert(Settings::shared(
                            inbound,
                            mesh.headers_with_underscores,
                            &snapshot.load().hub.clock,
                        ))
                        .clone(),
                };
                let build = inbound_builder(
                    self.identity.clone(),
                    settings,
                    snapshot.clone(),
                    next.upstream.clone(),
                    &next.listeners,
                );
                match slot {
                    Some(slot) => {
                        let moved = was.inbound.as_ref().map(|i| i.listen) != Some(inbound.listen);
                        let (a, b) = (&running.upstream, &next.upstream);
                        let rebuilt = was.tls12 != mesh.tls12
                            || running.listeners.workers != next.listeners.workers
                            || running.listeners.drain_timeout != next.listeners.drain_timeout
                            || a.timeouts.connect != b.timeouts.connect
                            || a.idle_timeout != b.idle_timeout
                            || a.max_connections != b.max_connections;
                        if moved || rebuilt {
                            let (from, to) =
                                (slot.addr, if moved { inbound.listen } else { slot.addr });
                            match slot.replace(tasks, to, false, build) {
                                Ok(()) => done.push(Ok(format!(
                                    "mesh inbound listener restarted on {}; the previous one drains",
                                    slot.addr
                                ))),
                                Err(e) => {
                                    done.push(Err(format!(
                                        "mesh.inbound.listen: cannot move to {to}: {e}; still on {from}"
                                    )));
                                    if let (Some(kept), Some(old)) = (applied.inbound.as_mut(), &was.inbound) {
                                        kept.listen = old.listen;
                                    }
                                }
                            }
                        }
                    }
                    None => {
                        let started = TcpListener::bind(inbound.listen)
                            .and_then(|l| Slot::start(tasks, l, false, build));
                        match started {
                            Ok(slot) => {
                                done.push(Ok(format!(
                                    "mesh inbound listener (mTLS) started on {}",
                                    slot.addr
                                )));
                                self.inbound = Some(slot);
                            }
                            Err(e) => {
                                done.push(Err(format!(
                                    "mesh.inbound.listen: cannot listen on {}: {e}",
                                    inbound.listen
                                )));
                                applied.inbound = None;
                            }
                        }
                    }
                }
            }
        }
        self.running = applied;
    }
}

impl ListenerControl for Servers {
    fn prepare(&mut self, _running: &Policy, next: &Policy) -> Result<(), Vec<String>> {
        let (Some(state), Some(mesh)) = (self.mesh.as_mut(), next.mesh.as_ref()) else {
            return Ok(());
        };
        state.prepared = None;
        if state.identity.serves(mesh) {
            return Ok(());
        }
        let prepared = Identity::prepare(mesh)
            .map_err(|e| vec![format!("{e:#} (the mesh keeps its current certificates)")])?;
        state.prepared = Some(prepared);
        Ok(())
    }

    fn apply(&mut self, running: &Policy, next: &Policy) -> Vec<Result<String, String>> {
        let mut done = Vec::new();
        let (a, b) = (&running.listeners, &next.listeners);
        // Upstream pool settings need no new server: the workers' forwarders follow the snapshot.
        self.tasks.borrow_mut().drain_timeout = b.drain_timeout;
        if a.egress != b.egress
            || a.workers != b.workers
            || a.drain_timeout != b.drain_timeout
            || a.head_timeout != b.head_timeout
        {
            let factory = self.egress_factory.clone();
            let what = format!(
                "egress listener restarted on {} with {} worker(s); the previous one drains",
                b.egress, b.workers
            );
            done.push(
                self.egress
                    .replace_with(&self.tasks, b.egress, |l| {
                        Slot::egress(&self.tasks, &factory, l, b)
                    })
                    .map(|()| what)
                    .map_err(|e| {
                        format!(
                            "listeners.egress: cannot move to {}: {e}; still on {}",
                            b.egress, a.egress
                        )
                    }),
            );
        }
        if a.admin != b.admin
            && let Some((slot, handle)) = &mut self.admin
        {
            let (handle, draining) = (handle.clone(), self.draining.clone());
            let snapshot = self.egress_factory.snapshot.clone();
            let identity = self.egress_factory.identity.clone();
            done.push(
                slot.replace(&self.tasks, b.admin, true, |l| {
                    crate::admin::server(handle, draining, snapshot, identity, l)
                })
                .map(|()| format!("admin listener moved to {}", b.admin))
                .map_err(|e| {
                    format!(
                        "listeners.admin: cannot move to {}: {e}; still on {}",
                        b.admin, a.admin
                    )
                }),
            );
        }
        match &mut self.mesh {
            Some(mesh) => mesh.apply(
                &self.tasks,
                &self.egress_factory.snapshot,
                running,
                next,
                &mut done,
            ),
            None if next.mesh.is_some() => done.push(Err(
                "mesh: added, but this sidecar started without one (restart to join the mesh)"
                    .into(),
            )),
            None => {}
        }
        done
    }
}

impl Servers {
    fn bound(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.egress.addr, self.admin.as_ref().map(|(s, _)| s.addr))
    }
}

/// Starts the sidecar on pre-bound sockets: the policy store, the egress listener, the admin listener and the
/// mesh's inbound listener. Call it inside an actix system: the servers are spawned on it and run until
/// stopped.
///
/// Every step that can fail comes first (the mesh files, the egress TLS roots, the inbound port, building each
/// server), before any server or actor is spawned: a start-up error then leaves nothing behind. (An actor
/// spawned and dropped unpolled with the runtime runs its `started` outside the runtime, which panics.)
pub fn start(
    source: PolicySource,
    policy: Policy,
    listeners: Listeners,
    options: RunOptions,
) -> std::io::Result<Running> {
    let metrics = crate::telemetry::Metrics::new();
    metrics.scope(|| start_in(source, policy, listeners, options, metrics))
}

/// [`start`], with the sidecar's recorder as the thread's.
fn start_in(
    source: PolicySource,
    policy: Policy,
    listeners: Listeners,
    options: RunOptions,
    metrics: crate::telemetry::Metrics,
) -> std::io::Result<Running> {
    crate::install_crypto_provider();
    let fail = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
    // The mesh certificates: read and checked now, so a bad file stops start-up with its reason; then watched.
    let identity = policy
        .mesh
        .as_ref()
        .map(Identity::load)
        .transpose()
        .map_err(fail)?;
    let tls = client::egress_tls(&policy.egress.roots).map_err(fail)?;
    // The mesh's inbound listener: bound now, so a taken port stops start-up with its reason.
    let inbound_listener = match policy.mesh.as_ref() {
        Some(mesh) => crate::mesh::bind(mesh).map_err(fail)?,
        None => None,
    };
    let hub = crate::resilience::monitor::Hub::new(options.clock.clone(), metrics);
    let snapshot = Snapshot::shared(&policy, hub);
    let fanouts = crate::control::fanout::Fanouts::default();
    let tasks = Rc::new(RefCell::new(Tasks {
        fanouts: fanouts.clone(),
        drain_timeout: policy.listeners.drain_timeout,
        ..Tasks::default()
    }));
    let draining = Draining::default();
    let shadows = crate::control::shadow::Shadows::default();
    let egress_factory = EgressFactory {
        snapshot: snapshot.clone(),
        tls: tls.clone(),
        identity: identity.clone(),
        shadows: shadows.clone(),
        fanouts: fanouts.clone(),
    };
    let egress = Built::egress(&egress_factory, listeners.egress, &policy.listeners)?;

    // The admin routes talk to the store, and the store controls the admin listener: give the store its
    // address before it runs.
    let context = Context::<PolicyStore>::new();
    let handle = PolicyHandle::from(context.address());
    let admin = match listeners.admin {
        Some(listener) => {
            let (h, d, s) = (handle.clone(), draining.clone(), snapshot.clone());
            let i = identity.clone();
            Some(Built::new(listener, |l| {
                crate::admin::server(h, d, s, i, l)
            })?)
        }
        None => None,
    };
    let mesh = match (policy.mesh.as_ref(), identity) {
        (Some(mesh), Some(identity)) => {
            let settings = mesh.inbound.as_ref().map(|inbound| {
                Settings::shared(inbound, mesh.headers_with_underscores, &options.clock)
            });
            let inbound = match (inbound_listener, &settings) {
                (Some((listener, _)), Some(settings)) => Some(Built::new(
                    listener,
                    inbound_builder(
                        identity.clone(),
                        settings.clone(),
                        snapshot.clone(),
                        policy.upstream.clone(),
                        &policy.listeners,
                    ),
                )?),
                _ => None,
            };
            Some((mesh.clone(), identity, settings, inbound))
        }
        _ => None,
    };

    // Nothing below fails: the servers, then the actors.
    let egress = egress.spawn(&tasks, false);
    let admin = admin.map(|built| (built.spawn(&tasks, true), handle.clone()));
    let mesh = mesh.map(|(running, identity, settings, inbound)| MeshState {
        identity,
        running,
        settings,
        inbound: inbound.map(|built| built.spawn(&tasks, false)),
        prepared: None,
    });
    let inbound = mesh
        .as_ref()
        .and_then(|m| m.inbound.as_ref())
        .map(|s| s.addr);
    if let Some(addr) = inbound {
        tracing::info!(%addr, "mesh inbound listener (mTLS) ready");
    }
    // The control plane's actors run on this thread, which other sidecars may share: each poll of theirs
    // records into this sidecar's recorder.
    if metrics.is_enabled() {
        metrics.start(crate::telemetry::Upkeep(metrics));
    }
    metrics.start(crate::control::monitor::Monitor::new(snapshot.clone()));
    metrics.start(crate::control::discovery::Discovery::new(snapshot.clone()));
    // Traffic copies are sent from a thread of their own: no copy shares a worker's event loop. It runs even
    // while no policy asks for copies, so that a reload can add some; it stops when the sidecar has drained.
    // So are the fan-outs answered 202 at once: they outlive the connection that brought them.
    {
        let (snapshot, tls) = (snapshot.clone(), tls.clone());
        let identity = egress_factory.identity.clone();
        let arbiter = actix_rt::Arbiter::new();
        let started = arbiter.spawn_fn(move || {
            metrics.enter_thread();
            let fanner = crate::control::fanout::Fanner::new(fanouts, snapshot, tls, identity);
            actix::Actor::start(fanner);
        });
        if !started {
            tracing::warn!("cannot start the fan-out thread: async fan-outs are refused (503)");
        }
        tasks.borrow_mut().arbiters.push(arbiter);
    }
    {
        let (pool, hub) = (snapshot.load().pool.clone(), snapshot.load().hub.clone());
        let arbiter = actix_rt::Arbiter::new();
        let started = arbiter.spawn_fn(move || {
            metrics.enter_thread();
            let shadower = crate::control::shadow::Shadower::new(shadows, pool, tls, hub);
            actix::Actor::start(shadower);
        });
        if !started {
            tracing::warn!("cannot start the shadow thread: traffic copies are dropped");
        }
        tasks.borrow_mut().arbiters.push(arbiter);
    }
    metrics.start(crate::control::health::HealthChecker::new(
        snapshot.clone(),
        &policy.upstream,
    ));
    if let Some(mesh) = &mesh {
        metrics.start(crate::control::cert_watcher::CertWatcher(
            mesh.identity.clone(),
        ));
    }
    let servers = Servers {
        tasks: tasks.clone(),
        egress_factory,
        egress,
        admin,
        draining: draining.clone(),
        mesh,
    };
    let (egress, admin) = servers.bound();
    let store =
        PolicyStore::new(source, policy, snapshot.clone()).with_listeners(Box::new(servers));
    metrics.run(context, store);
    if options.signals {
        reload_on_sighup(handle.clone());
        drain_on_termination(tasks.clone(), draining.clone());
    }
    Ok(Running {
        egress,
        admin,
        inbound,
        snapshot,
        policy: handle,
        draining,
        tasks,
    })
}

/// SIGTERM or SIGINT: readiness turns false, the listeners stop accepting, requests in flight finish within the
/// drain timeout, then the process exits. A second signal exits at once.
fn drain_on_termination(tasks: Rc<RefCell<Tasks>>, draining: Draining) {
    use actix_rt::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM/SIGINT; they will end the process at once");
            return;
        }
    };
    actix_rt::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(
            "shutting down: not ready, draining requests in flight (a second signal exits now)"
        );
        actix_rt::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(1);
        });
        drain(&tasks, &draining, true).await;
        tracing::info!("drained; exiting");
    });
}

fn reload_on_sighup(handle: PolicyHandle) {
    use actix_rt::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        }
    };
    actix_rt::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(e) = handle.reload("SIGHUP").await {
                tracing::warn!(error = %e, "policy store is gone; SIGHUP ignored");
                return;
            }
        }
    });
}
