//! Listeners: the egress listener that apps call on `localhost:5000`, and the admin listener.
//!
//! Owns: building the actix-web servers (one [`Forwarder`], and so one upstream client, per egress worker),
//! starting the policy store, and SIGHUP. Does not own: what a request does (see [`crate::dispatch`]).
//! Called by `main.rs` and by the tests, which hand it pre-bound listeners.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::time::Duration;

use actix_http::Request;
use actix_rt::task::JoinHandle;
use actix_web::HttpServer;
use actix_web::dev::ServerHandle;

use crate::dispatch::{client, forward::Forwarder};
use crate::policy::Policy;
use crate::policy::store::{PolicyHandle, PolicySource, PolicyStore};
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

/// A running sidecar.
pub struct Running {
    pub egress: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub snapshot: SharedSnapshot,
    pub policy: PolicyHandle,
    handles: Vec<ServerHandle>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
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
        for handle in &self.handles {
            handle.stop(graceful).await;
        }
    }

    /// Runs until every listener stops.
    pub async fn wait(self) -> std::io::Result<()> {
        for task in self.tasks {
            task.await.map_err(std::io::Error::other)??;
        }
        Ok(())
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
    let upstream = policy.upstream.clone();
    let workers = policy.listeners.workers;
    let tls = client::tls_config();
    let egress = listeners.egress.local_addr()?;
    let admin = listeners
        .admin
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;

    let worker_snapshot = snapshot.clone();
    let mut egress_server = HttpServer::new(move || {
        // Runs once per worker thread: the awc client is !Send and lives with its worker.
        let forwarder = Rc::new(Forwarder::new(
            worker_snapshot.clone(),
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
    .listen(listeners.egress)?;
    if !options.signals {
        egress_server = egress_server.disable_signals();
    }
    let egress_server = egress_server.run();
    let mut handles = vec![egress_server.handle()];
    let mut tasks = vec![actix_rt::spawn(egress_server)];

    let handle = PolicyHandle::start(PolicyStore::new(source, policy, snapshot.clone()));
    if let Some(listener) = listeners.admin {
        let admin_server = crate::admin::server(handle.clone(), listener, options.signals)?;
        handles.push(admin_server.handle());
        tasks.push(actix_rt::spawn(admin_server));
    }
    if options.signals {
        reload_on_sighup(handle.clone());
    }
    Ok(Running {
        egress,
        admin,
        snapshot,
        policy: handle,
        handles,
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
