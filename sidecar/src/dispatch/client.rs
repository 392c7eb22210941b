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

use crate::policy::UpstreamSettings;

/// TLS settings for `https` upstreams, built once and shared by every worker.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
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
