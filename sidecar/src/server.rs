//! Listeners: the egress listener that apps call on `localhost:5000`.
//!
//! Owns: building the actix-web `HttpServer` with one [`Forwarder`] (and so one upstream client) per worker.
//! Does not own: what a request does (see [`crate::dispatch`]). Called by `main.rs` and by the tests, which hand
//! it pre-bound listeners.

use std::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

use actix_http::Request;
use actix_web::HttpServer;
use actix_web::dev::{Server, ServerHandle};

use crate::dispatch::{client, forward::Forwarder};
use crate::policy::Policy;
use crate::snapshot::{SharedSnapshot, Snapshot};

/// How long the egress listener keeps an idle app connection: longer than common client pool idle timeouts
/// (Go's 90 s), so the app never reuses a connection the sidecar is closing.
const APP_KEEP_ALIVE: Duration = Duration::from_secs(120);

/// A running sidecar.
pub struct Running {
    pub egress: std::net::SocketAddr,
    pub snapshot: SharedSnapshot,
    server: Server,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("egress", &self.egress)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// A handle that stops the listeners.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Runs until the listeners stop.
    pub async fn wait(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Options that are not policy: how the process is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Handle SIGINT/SIGTERM (the binary does; in-process tests do not).
    pub signals: bool,
}

/// Starts the egress listener on a pre-bound socket. Call it inside an actix system; the returned server runs
/// once polled (`Running::wait`) or spawned.
pub fn start(
    policy: &Policy,
    egress: TcpListener,
    options: RunOptions,
) -> std::io::Result<Running> {
    crate::install_crypto_provider();
    let snapshot = Snapshot::shared(policy);
    let upstream = policy.upstream.clone();
    let tls = client::tls_config();
    let addr = egress.local_addr()?;

    let worker_snapshot = snapshot.clone();
    let mut server = HttpServer::new(move || {
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
    .workers(policy.listeners.workers)
    .keep_alive(APP_KEEP_ALIVE)
    .tcp_nodelay(true)
    .listen(egress)?;
    if !options.signals {
        server = server.disable_signals();
    }
    let server = server.run();
    Ok(Running {
        egress: addr,
        snapshot,
        server,
    })
}
