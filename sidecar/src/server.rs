//! Listeners: the egress listener that apps call on `localhost:5000`, and the admin listener.
//!
//! Owns: building the actix-web servers (one [`Forwarder`], and so one upstream client, per egress worker),
//! starting the policy store, SIGHUP, and replacing a listener's server when a reload changes its address,
//! its worker count or its upstream pool settings: the new server starts first, the old one drains, and the
//! other listener's connections are never touched. Does not own: what a request does (see
//! [`crate::dispatch`]). Called by `main.rs` and by the tests, which hand it pre-bound listeners.

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::{AsyncContext, Context};
use actix_http::Request;
use actix_rt::task::JoinHandle;
use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};

use crate::dispatch::{client, forward::Forwarder};
use crate::policy::store::{ListenerControl, PolicyHandle, PolicySource, PolicyStore};
use crate::policy::{Policy, UpstreamSettings};
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
    /// Handle SIGINT/SIGTERM (stop) and SIGHUP (reload). The binary does; in-process tests do not.
    pub signals: bool,
}

/// Every server running now, and every task to wait for (servers being drained included).
#[derive(Default)]
struct Tasks {
    handles: Vec<(u64, ServerHandle)>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    next_id: u64,
}

impl Tasks {
    fn spawn(shared: &Rc<RefCell<Tasks>>, server: Server) -> (u64, ServerHandle) {
        let handle = server.handle();
        let mut tasks = shared.borrow_mut();
        tasks.next_id += 1;
        let id = tasks.next_id;
        tasks.handles.push((id, handle.clone()));
        tasks.tasks.push(actix_rt::spawn(server));
        (id, handle)
    }
}

/// A running sidecar.
pub struct Running {
    pub egress: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub snapshot: SharedSnapshot,
    pub policy: PolicyHandle,
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
    /// Stops every listener; with `graceful`, in-flight requests finish first.
    pub async fn stop(&self, graceful: bool) {
        let handles = std::mem::take(&mut self.tasks.borrow_mut().handles);
        for (_, handle) in handles {
            handle.stop(graceful).await;
        }
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

/// Builds egress servers: the same snapshot and TLS settings, the worker count and pool settings of a policy.
#[derive(Clone)]
struct EgressFactory {
    snapshot: SharedSnapshot,
    tls: Arc<rustls::ClientConfig>,
    signals: bool,
}

impl EgressFactory {
    fn build(
        &self,
        listener: TcpListener,
        workers: usize,
        upstream: UpstreamSettings,
    ) -> std::io::Result<Server> {
        let (snapshot, tls) = (self.snapshot.clone(), self.tls.clone());
        let server = HttpServer::new(move || {
            // Runs once per worker thread: the awc client is !Send and lives with its worker.
            let forwarder = Rc::new(Forwarder::new(
                snapshot.clone(),
                client::build(&upstream, tls.clone()),
            ));
            actix_service::fn_service(move |req: Request| {
                let forwarder = Rc::clone(&forwarder);
                async move { Ok::<_, actix_web::Error>(forwarder.handle(req).await) }
            })
        })
        .workers(workers)
        .keep_alive(APP_KEEP_ALIVE)
        .tcp_nodelay(true)
        .listen(listener)?;
        Ok(if self.signals {
            server.run()
        } else {
            server.disable_signals().run()
        })
    }
}

/// One listener's current server and a duplicate of its socket (to start a replacement on the same port).
struct Slot {
    addr: SocketAddr,
    socket: TcpListener,
    id: u64,
    handle: ServerHandle,
}

impl Slot {
    fn start(
        tasks: &Rc<RefCell<Tasks>>,
        listener: TcpListener,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let socket = listener.try_clone()?;
        let (id, handle) = Tasks::spawn(tasks, build(listener)?);
        Ok(Self {
            addr,
            socket,
            id,
            handle,
        })
    }

    /// Starts `build` on `addr` (the same socket when the address is unchanged), then drains the old server.
    fn replace(
        &mut self,
        tasks: &Rc<RefCell<Tasks>>,
        addr: SocketAddr,
        build: impl FnOnce(TcpListener) -> std::io::Result<Server>,
    ) -> std::io::Result<()> {
        let listener = if addr == self.addr {
            self.socket.try_clone()?
        } else {
            TcpListener::bind(addr)?
        };
        let next = Self::start(tasks, listener, build)?;
        let old = std::mem::replace(self, next);
        tasks.borrow_mut().handles.retain(|(id, _)| *id != old.id);
        // The old server stops accepting at once and finishes what it has; nothing waits for it here.
        actix_rt::spawn(async move { old.handle.stop(true).await });
        Ok(())
    }
}

/// The listeners as the policy store sees them.
struct Servers {
    tasks: Rc<RefCell<Tasks>>,
    egress_factory: EgressFactory,
    egress: Slot,
    admin: Option<(Slot, PolicyHandle)>,
    signals: bool,
}

impl ListenerControl for Servers {
    fn apply(&mut self, running: &Policy, next: &Policy) -> Vec<Result<String, String>> {
        let mut done = Vec::new();
        let (a, b) = (&running.listeners, &next.listeners);
        let pool_changed = running.upstream.timeouts.connect != next.upstream.timeouts.connect
            || running.upstream.idle_timeout != next.upstream.idle_timeout
            || running.upstream.max_connections != next.upstream.max_connections;
        if a.egress != b.egress || a.workers != b.workers || pool_changed {
            let factory = self.egress_factory.clone();
            let (workers, upstream) = (b.workers, next.upstream.clone());
            let what = format!(
                "egress listener restarted on {} with {} worker(s); the previous one drains",
                b.egress, b.workers
            );
            done.push(
                self.egress
                    .replace(&self.tasks, b.egress, |l| {
                        factory.build(l, workers, upstream)
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
            let (handle, signals) = (handle.clone(), self.signals);
            done.push(
                slot.replace(&self.tasks, b.admin, |l| {
                    crate::admin::server(handle, l, signals)
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
    let snapshot = Snapshot::shared(&policy);
    let tasks = Rc::new(RefCell::new(Tasks::default()));
    let egress_factory = EgressFactory {
        snapshot: snapshot.clone(),
        tls: client::tls_config(),
        signals: options.signals,
    };
    let (workers, upstream) = (policy.listeners.workers, policy.upstream.clone());
    let factory = egress_factory.clone();
    let egress = Slot::start(&tasks, listeners.egress, |l| {
        factory.build(l, workers, upstream)
    })?;

    // The admin routes talk to the store, and the store controls the admin listener: give the store its
    // address before it runs.
    let context = Context::<PolicyStore>::new();
    let handle = PolicyHandle::from(context.address());
    let admin = match listeners.admin {
        Some(listener) => {
            let (h, signals) = (handle.clone(), options.signals);
            Some((
                Slot::start(&tasks, listener, |l| crate::admin::server(h, l, signals))?,
                handle.clone(),
            ))
        }
        None => None,
    };
    let servers = Servers {
        tasks: tasks.clone(),
        egress_factory,
        egress,
        admin,
        signals: options.signals,
    };
    let (egress, admin) = servers.bound();
    let store =
        PolicyStore::new(source, policy, snapshot.clone()).with_listeners(Box::new(servers));
    context.run(store);
    if options.signals {
        reload_on_sighup(handle.clone());
    }
    Ok(Running {
        egress,
        admin,
        snapshot,
        policy: handle,
        tasks,
    })
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
