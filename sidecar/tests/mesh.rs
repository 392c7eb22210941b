//! The mesh hop, inbound: peer sidecars call over mTLS, the app behind receives the verified identity. Real
//! TLS on loopback, certificates from `sidecar certs`' own code.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidecar::certs::{Ca, Validity};
use support::{RawUpstream, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const DOMAIN: &str = "mesh.test";

struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(name: &str) -> Self {
        sidecar::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("sidecar-mesh-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::generate(DOMAIN, Validity::default()).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        Self { dir, ca }
    }

    /// Writes `<service>.pem` and `<service>-key.pem` and returns their paths.
    fn issue(&self, service: &str, validity: Validity) -> (PathBuf, PathBuf) {
        let (chain, key) = self.ca.issue(DOMAIN, service, validity).unwrap();
        let (c, k) = (
            self.dir.join(format!("{service}.pem")),
            self.dir.join(format!("{service}-key.pem")),
        );
        std::fs::write(&c, chain).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }

    fn policy(&self, app: SocketAddr) -> String {
        let (cert, key) = self.issue("orders", Validity::default());
        format!(
            "mesh:\n  trust_domain: {DOMAIN}\n  identity: orders\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\n  inbound:\n    listen: 127.0.0.1:0\n    app: '{app}'\n",
            self.dir.join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    }
}

/// A TLS client trusting `ca`, presenting `identity` (chain and key files) when given.
fn connector(ca: &Path, identity: Option<(&Path, &Path)>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// One GET over TLS: the response status, or the error that ended the exchange.
async fn call(tls: &TlsConnector, addr: SocketAddr, extra: &str) -> Result<u16, String> {
    call_to(tls, addr, "GET /hello", extra).await
}

/// One request (`"METHOD /path"`) over TLS.
async fn call_to(
    tls: &TlsConnector,
    addr: SocketAddr,
    line: &str,
    extra: &str,
) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let request = format!(
        "{line} HTTP/1.1\r\nhost: orders\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    // TLS 1.3 reports a refused client certificate on the first read, not in the handshake.
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

#[actix_rt::test]
async fn a_peer_with_a_mesh_certificate_reaches_the_app_with_its_identity() {
    let pki = Pki::new("valid");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let tls = connector(&pki.dir.join("ca.pem"), Some((&cert, &key)));

    // A forged identity header from the caller is replaced by the verified one.
    let status = call(
        &tls,
        inbound,
        "x-sidecar-peer-identity: spiffe://mesh.test/service/admin\r\n",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let seen = app.wait_for(1).await;
    assert_eq!(
        seen[0].all("x-sidecar-peer-identity"),
        ["spiffe://mesh.test/service/payments"]
    );
    assert_eq!(seen[0].target, "/hello");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn peers_without_a_valid_mesh_certificate_are_refused() {
    let pki = Pki::new("invalid");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let ca = pki.dir.join("ca.pem");

    // No client certificate.
    assert!(call(&connector(&ca, None), inbound, "").await.is_err());

    // A certificate from another CA.
    let other = Pki::new("other-ca");
    let (cert, key) = other.issue("payments", Validity::default());
    assert!(
        call(&connector(&ca, Some((&cert, &key))), inbound, "")
            .await
            .is_err()
    );

    // An expired certificate from the right CA.
    let (cert, key) = pki.issue(
        "expired",
        Validity {
            start_days: -30,
            days: 10,
        },
    );
    assert!(
        call(&connector(&ca, Some((&cert, &key))), inbound, "")
            .await
            .is_err()
    );

    assert!(app.received().is_empty(), "nothing reached the app");
    sidecar.stop().await;
}

#[actix_rt::test]
async fn curl_with_a_mesh_certificate_is_a_peer_too() {
    let pki = Pki::new("curl");
    let app = RawUpstream::ok().await;
    let sidecar = Sidecar::start(&pki.policy(app.addr));
    let inbound = sidecar.inbound.expect("an inbound listener");
    let (cert, key) = pki.issue("payments", Validity::default());
    let ca = pki.dir.join("ca.pem");
    let url = format!("https://127.0.0.1:{}/hello", inbound.port());
    let curl = |with_cert: bool| {
        let (url, ca, cert, key) = (url.clone(), ca.clone(), cert.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new("curl");
            cmd.args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .arg("--cacert")
            .arg(&ca);
            if with_cert {
                cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
            }
            let out = cmd
                .arg(&url)
                .output()
                .expect("curl (Debian's curl package)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert_eq!(curl(true).await.unwrap(), "200");
    // Without a client certificate curl gets no HTTP answer at all.
    assert_eq!(curl(false).await.unwrap(), "000");
    assert_eq!(
        app.wait_for(1).await[0].header("x-sidecar-peer-identity"),
        Some("spiffe://mesh.test/service/payments")
    );
    sidecar.stop().await;
}

impl Pki {
    /// A sidecar's `mesh` section for `identity`, without an inbound listener.
    fn outbound_policy(&self, identity: &str, services: &str) -> String {
        let (cert, key) = self.issue(identity, Validity::default());
        format!(
            "mesh:\n  trust_domain: {DOMAIN}\n  identity: {identity}\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\nservices:\n{services}",
            self.dir.join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    }
}

#[actix_rt::test]
async fn an_app_calls_a_peer_service_through_both_sidecars_over_mtls() {
    let pki = Pki::new("hop");
    let app = RawUpstream::ok().await;
    // The orders side: its sidecar's inbound listener in front of its app.
    let orders = Sidecar::start(&pki.policy(app.addr));
    let inbound = orders.inbound.expect("an inbound listener");
    // The payments side: its app calls `orders` through its own sidecar.
    let payments = Sidecar::start(&pki.outbound_policy(
        "payments",
        &format!(
            "  orders:\n    mesh: true\n    endpoints: ['{inbound}']\n  impostor:\n    mesh: true\n    endpoints: ['{inbound}']\n    retries:\n      max_retries: 0\n"
        ),
    ));
    for _ in 0..3 {
        let reply = support::get(
            payments.addr,
            "/pay",
            &[("target", "orders"), ("internal", "true")],
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let seen = app.wait_for(3).await;
    assert!(
        seen.iter()
            .all(|r| r.header("x-sidecar-peer-identity")
                == Some("spiffe://mesh.test/service/payments")),
        "the app sees who called"
    );

    // A service whose endpoint presents another identity is refused before any byte is sent.
    let reply = support::get(
        payments.addr,
        "/pay",
        &[("target", "impostor"), ("internal", "true")],
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("x-sidecar-error"), Some("upstream-tls-error"));
    assert!(
        reply
            .text()
            .contains("not spiffe://mesh.test/service/impostor"),
        "{}",
        reply.text()
    );
    assert_eq!(app.received().len(), 3);
    payments.stop().await;
    orders.stop().await;
}

#[actix_rt::test]
async fn authorization_allows_what_is_written_and_denies_the_rest() {
    let pki = Pki::new("authz");
    let app = RawUpstream::ok().await;
    let policy = pki.policy(app.addr)
        + "    authorization:\n      - from: [payments]\n        methods: [GET]\n        paths: ['/orders/*']\n      - from: ['spiffe://mesh.test/service/admin']\n";
    let sidecar = Sidecar::start(&policy);
    let inbound = sidecar.inbound.expect("an inbound listener");
    let ca = pki.dir.join("ca.pem");
    let as_peer = |name: &str| {
        let (cert, key) = pki.issue(name, Validity::default());
        connector(&ca, Some((&cert, &key)))
    };
    let (payments, inventory, admin) =
        (as_peer("payments"), as_peer("inventory"), as_peer("admin"));
    assert_eq!(
        call_to(&payments, inbound, "GET /orders/7", "").await,
        Ok(200)
    );
    assert_eq!(
        call_to(&payments, inbound, "POST /orders/7", "").await,
        Ok(403)
    );
    assert_eq!(call_to(&payments, inbound, "GET /admin", "").await, Ok(403));
    assert_eq!(
        call_to(&inventory, inbound, "GET /orders/7", "").await,
        Ok(403)
    );
    assert_eq!(
        call_to(&admin, inbound, "DELETE /anything", "").await,
        Ok(200)
    );
    assert_eq!(
        app.received().len(),
        2,
        "denied requests never reach the app"
    );
    sidecar.stop().await;
}
