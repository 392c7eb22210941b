//! Listeners: the egress listener that apps call on `localhost:5000`, and the admin listener.
//!
//! Owns: building the actix-web servers (one [`Forwarder`], and so one upstream client, per egress worker),
//! starting the policy store, SIGHUP, and replacing a listener's server when a reload changes its address or
//! its worker count: the new server starts first, the old one drains (see [`Slot::replace`]), and the other
//! listener's connections are never touched. A change of upstream pool settings needs no new server: each
//! worker's forwarder rebuilds its client. Does not own: what a request does (see
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
use crate::dispatch::{client, forward::Forwarder};
use crate::policy::store::{ListenerControl, PolicyHandle, PolicySource, PolicyStore};
use crate::policy::{Listeners as ListenerSettings, Policy};
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
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Handle SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload). The binary does; in-process tests do not.
    pub signals: bool,
}

/// Every server running now, and every task to wait for (servers being drained included).
#[derive(Default)]
struct Tasks {
    /// Running servers: id, whether it is the admin listener, handle.
    handles: Vec<(u64, bool, ServerHandle)>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    next_id: u64,
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
    let handles = std::mem::take(&mut tasks.borrow_mut().handles);
    let (admin, egress): (Vec<_>, Vec<_>) = handles.into_iter().partition(|(_, admin, _)| *admin);
    for (_, _, handle) in egress.into_iter().chain(admin) {
        handle.stop(graceful).await;
    }
}

/// Builds egress servers: the same snapshot and TLS settings, the listener settings of a policy.
#[derive(Clone)]
struct EgressFactory {
    snapshot: SharedSnapshot,
    tls: Arc<rustls::ClientConfig>,
    identity: Option<Arc<crate::mesh::Identity>>,
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
        let server = HttpServer::new(move || {
            // Runs once per worker thread: the awc client is !Send and lives with its worker.
            let forwarder = Rc::new(Forwarder::new(
                snapshot.clone(),
                tls.clone(),
                identity.clone(),
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

impl Slot {
    fn start(
        tasks: &Rc<RefCell<Tasks>>,
        listener: TcpListener,
        admin: bool,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let socket = listener.try_clone()?;
        let (id, handle) = Tasks::spawn(tasks, build(listener)?, admin);
        Ok(Self {
            addr,
            socket,
            id,
            handle,
            closing: None,
        })
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
        let old = std::mem::replace(self, next);
        tasks
            .borrow_mut()
            .handles
            .retain(|(id, _, _)| *id != old.id);
        let moved = old.addr != addr;
        // Nothing waits for the old server here.
        actix_rt::spawn(async move {
            old.handle.pause().await;
            if moved
                && let Err(e) =
                    socket2::SockRef::from(&old.socket).shutdown(std::net::Shutdown::Both)
            {
                tracing::warn!(addr = %old.addr, error = %e, "could not close the old listening socket; it closes when the old server stops");
            }
            if let Some((closing, grace)) = &old.closing {
                closing.store(true, Ordering::Relaxed);
                actix_rt::time::sleep(*grace).await;
            }
            old.handle.stop(true).await;
        });
        Ok(())
    }

    /// Starts the egress server of `settings` on `listener`.
    fn egress(
        tasks: &Rc<RefCell<Tasks>>,
        factory: &EgressFactory,
        listener: TcpListener,
        settings: &ListenerSettings,
    ) -> std::io::Result<Self> {
        let closing = Arc::new(AtomicBool::new(false));
        let flag = closing.clone();
        let mut slot = Self::start(tasks, listener, false, |l| factory.build(l, settings, flag))?;
        slot.closing = Some((closing, settings.drain_timeout));
        Ok(slot)
    }
}

/// The listeners as the policy store sees them.
struct Servers {
    tasks: Rc<RefCell<Tasks>>,
    egress_factory: EgressFactory,
    egress: Slot,
    admin: Option<(Slot, PolicyHandle)>,
    draining: Draining,
}

impl ListenerControl for Servers {
    fn apply(&mut self, running: &Policy, next: &Policy) -> Vec<Result<String, String>> {
        let mut done = Vec::new();
        let (a, b) = (&running.listeners, &next.listeners);
        // Upstream pool settings need no new server: the workers' forwarders follow the snapshot.
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
        done
    }
}

impl Servers {
    fn bound(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.egress.addr, self.admin.as_ref().map(|(s, _)| s.addr))
    }
}

/// Starts the sidecar on pre-bound sockets: the policy store, the egress listener and the admin listener.
/// Call it inside an actix system: the servers are spawned on it and run until stopped.
pub fn start(
    source: PolicySource,
    policy: Policy,
    listeners: Listeners,
    options: RunOptions,
) -> std::io::Result<Running> {
    crate::install_crypto_provider();
    if crate::telemetry::recorder().is_some() {
        actix::Actor::start(crate::telemetry::Upkeep);
    }
    let snapshot = Snapshot::shared(&policy);
    actix::Actor::start(crate::resilience::monitor::Monitor::new(snapshot.clone()));
    actix::Actor::start(crate::discovery::Discovery::new(snapshot.clone()));
    actix::Actor::start(crate::health::HealthChecker::new(
        snapshot.clone(),
        &policy.upstream,
    ));
    // The mesh certificates: read and checked now, so a bad file stops start-up with its reason; then watched.
    let identity = match policy.mesh.as_ref() {
        Some(mesh) => {
            let identity = crate::mesh::Identity::load(mesh)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            actix::Actor::start(crate::mesh::CertWatcher(identity.clone()));
            Some(identity)
        }
        None => None,
    };
    let tasks = Rc::new(RefCell::new(Tasks::default()));
    let draining = Draining::default();
    let egress_factory = EgressFactory {
        snapshot: snapshot.clone(),
        tls: client::egress_tls(&policy.egress.roots)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?,
        identity: identity.clone(),
    };
    let egress = Slot::egress(&tasks, &egress_factory, listeners.egress, &policy.listeners)?;

    // The admin routes talk to the store, and the store controls the admin listener: give the store its
    // address before it runs.
    let context = Context::<PolicyStore>::new();
    let handle = PolicyHandle::from(context.address());
    let admin = match listeners.admin {
        Some(listener) => {
            let (h, d, s) = (handle.clone(), draining.clone(), snapshot.clone());
            let i = identity.clone();
            Some((
                Slot::start(&tasks, listener, true, |l| {
                    crate::admin::server(h, d, s, i, l)
                })?,
                handle.clone(),
            ))
        }
        None => None,
    };
    // The mesh's inbound listener: bound and configured now, so a bad certificate or a taken port stops
    // start-up with its reason.
    let inbound = match policy.mesh.as_ref().zip(identity.as_ref()) {
        Some((mesh, identity)) => match crate::mesh::bind(mesh).map_err(std::io::Error::other)? {
            Some((listener, addr)) => {
                let (m, upstream) = (mesh.clone(), policy.upstream.clone());
                let workers = policy.listeners.workers;
                Slot::start(&tasks, listener, false, |l| {
                    crate::mesh::server(&m, identity, &upstream, l, workers)
                        .map_err(|e| std::io::Error::other(format!("{e:#}")))
                })?;
                tracing::info!(%addr, "mesh inbound listener (mTLS) ready");
                Some(addr)
            }
            None => None,
        },
        None => None,
    };
    let servers = Servers {
        tasks: tasks.clone(),
        egress_factory,
        egress,
        admin,
        draining: draining.clone(),
    };
    let (egress, admin) = servers.bound();
    let store =
        PolicyStore::new(source, policy, snapshot.clone()).with_listeners(Box::new(servers));
    context.run(store);
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
