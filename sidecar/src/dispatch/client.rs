//! The upstream client: one `awc::Client` per worker (it is `!Send`), configured as a proxy's client rather
//! than a browser's: no default headers, no redirects, no decompression, no timeout of its own (the request
//! path sets one per request), TCP_NODELAY on every connection, pooled keep-alive connections.

use std::sync::Arc;
use std::time::Duration;

use actix_http::Uri;
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ConnectorService, Resolver};
use futures_util::future::LocalBoxFuture;
use tokio::net::TcpStream;

use crate::policy::{Roots, UpstreamSettings};

/// TLS settings for `https` upstreams verified against the built-in (Mozilla) roots.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    with_roots(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
}

/// TLS settings for the app's `https` URL targets, as `egress.tls` says; built once and shared by every worker.
/// Fails naming the field when the roots cannot be read.
pub fn egress_tls(roots: &Roots) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::Builtin => return Ok(tls_config()),
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                anyhow::bail!(
                    "egress.tls.roots: system: the machine has no usable CA bundle (SSL_CERT_FILE, SSL_CERT_DIR or \
                     the platform's paths){}",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", errors.join("; "))
                    }
                );
            }
        }
        Roots::Bundle(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("egress.tls.ca: cannot read {}", path.display()))?
            {
                let cert =
                    cert.with_context(|| format!("egress.tls.ca: {} is not PEM", path.display()))?;
                store.add(cert).with_context(|| {
                    format!(
                        "egress.tls.ca: {} holds a certificate rustls refuses",
                        path.display()
                    )
                })?;
            }
            if store.is_empty() {
                anyhow::bail!("egress.tls.ca: {} holds no certificate", path.display());
            }
        }
    }
    Ok(with_roots(store))
}

fn with_roots(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 only: awc's HTTP/2 path takes `:authority` from the URI and drops `Host`, which would silently
    // undo a dispatch rule's `Host` patch.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Builds a worker's upstream client.
pub fn build(settings: &UpstreamSettings, tls: Arc<rustls::ClientConfig>) -> awc::Client {
    let tcp = NoDelay(actix_tls::connect::Connector::new(Resolver::default()).service());
    let connector = awc::Connector::new()
        .connector(tcp)
        .rustls_0_23(tls)
        .timeout(settings.timeouts.connect)
        .handshake_timeout(settings.timeouts.connect)
        .conn_keep_alive(settings.idle_timeout)
        .conn_lifetime(Duration::from_secs(300))
        .limit(settings.max_connections);
    awc::Client::builder()
        .connector(connector)
        .no_default_headers()
        .disable_redirects()
        .disable_timeout()
        .finish()
}

/// The TCP connector with Nagle's algorithm off: a proxy writes small heads it wants sent now.
#[derive(Clone)]
struct NoDelay(ConnectorService);

impl std::fmt::Debug for NoDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoDelay")
    }
}

impl Service<ConnectInfo<Uri>> for NoDelay {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let connecting = self.0.call(req);
        Box::pin(async move {
            let conn = connecting.await?;
            if let Err(e) = conn.io_ref().set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY on an upstream connection");
            }
            Ok(conn)
        })
    }
}

/// One thread's upstream clients: the shared one and, per `mesh: true` service, the mTLS client that verifies
/// that service's identity (built on first use). They follow the snapshot's pool settings: when a reload
/// changes them, the clients are built again; requests in flight keep the old ones, whose idle connections
/// close when the last of them ends.
pub struct Clients {
    /// TLS settings of the shared client, kept to rebuild it.
    tls: Arc<rustls::ClientConfig>,
    /// The snapshot's `pool_generation` that `client` and `settings` were built for.
    generation: std::cell::Cell<u64>,
    client: std::cell::RefCell<awc::Client>,
    /// Pool settings of `client`, and of the mesh clients built on first use.
    settings: std::cell::RefCell<Arc<UpstreamSettings>>,
    /// This sidecar's mesh certificates, when the policy had a `mesh` section at start-up.
    identity: Option<Arc<crate::mesh::Identity>>,
    mesh: std::cell::RefCell<std::collections::HashMap<Arc<str>, awc::Client>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").finish_non_exhaustive()
    }
}

impl Clients {
    /// Clients built from `snapshot`'s pool settings and `tls`; the mesh clients on `identity`.
    pub fn new(
        snapshot: &crate::snapshot::Snapshot,
        tls: Arc<rustls::ClientConfig>,
        identity: Option<Arc<crate::mesh::Identity>>,
    ) -> Self {
        Self {
            client: std::cell::RefCell::new(build(&snapshot.pool, tls.clone())),
            tls,
            generation: std::cell::Cell::new(snapshot.pool_generation),
            settings: std::cell::RefCell::new(snapshot.pool.clone()),
            identity,
            mesh: std::cell::RefCell::default(),
        }
    }

    /// Rebuilds the clients when a reload changed the pool settings.
    pub fn follow_pool(&self, snapshot: &crate::snapshot::Snapshot) {
        if snapshot.pool_generation == self.generation.get() {
            return;
        }
        self.generation.set(snapshot.pool_generation);
        *self.client.borrow_mut() = build(&snapshot.pool, self.tls.clone());
        *self.settings.borrow_mut() = snapshot.pool.clone();
        self.mesh.borrow_mut().clear();
    }

    /// The client for a plan: the shared one, or the mesh client that verifies the service's identity.
    pub fn client_for(
        &self,
        plan: &super::route::Plan,
    ) -> Result<awc::Client, crate::error::ProxyError> {
        let Some((service, mesh)) = &plan.mesh else {
            return Ok(self.client.borrow().clone());
        };
        if let Some(c) = self.mesh.borrow().get(service) {
            return Ok(c.clone());
        }
        let Some(identity) = &self.identity else {
            return Err(crate::error::ProxyError::new(
                crate::error::Cause::UpstreamTls,
                service.to_string(),
                "this sidecar started without a mesh section: restart it to call mesh services",
            ));
        };
        let config = identity.client_config(crate::certs::spiffe_id(&mesh.trust_domain, service));
        let client = build(&self.settings.borrow(), Arc::new(config));
        self.mesh
            .borrow_mut()
            .insert(service.clone(), client.clone());
        Ok(client)
    }
}
