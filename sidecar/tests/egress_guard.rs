//! Guarding egress: an allow-list turns the forward proxy into a guarded one, and `https` targets are verified
//! against the roots the operator chose. Real sockets and real TLS on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sidecar::certs::{Ca, Validity};
use support::{RawUpstream, Sidecar, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[actix_rt::test]
async fn with_an_allow_list_only_listed_hosts_and_addresses_are_reached() {
    let allowed = RawUpstream::ok().await;
    let Some(elsewhere) = RawUpstream::ok_on("127.0.0.2:0").await else {
        return; // a machine without 127.0.0.2 on loopback: nothing to show
    };
    let sidecar = Sidecar::start(
        "egress:\n  allow:\n    hosts: ['*.example.test', localhost]\n    cidrs: [127.0.0.1/32]\n",
    );
    let port = allowed.addr.port();

    let by_address = get(sidecar.addr, "/", &[("target", &allowed.url("/"))]).await;
    assert_eq!(by_address.status, 200);
    let by_name = format!("http://localhost:{port}/");
    assert_eq!(
        get(sidecar.addr, "/", &[("target", &by_name)]).await.status,
        200
    );

    let outside = get(sidecar.addr, "/", &[("target", &elsewhere.url("/"))]).await;
    assert_eq!(outside.status, 403);
    assert_eq!(outside.header("x-sidecar-error"), Some("egress-denied"));
    assert!(
        outside.text().contains("127.0.0.2 is not in egress.allow"),
        "{}",
        outside.text()
    );
    let unlisted = get(sidecar.addr, "/", &[("target", "http://example.test:9/")]).await;
    assert_eq!(unlisted.status, 403, "the pattern is for names under it");
    assert!(
        elsewhere.received().is_empty(),
        "a denied target is never contacted"
    );

    // Services and dispatch destinations are the operator's own: the list guards only the app's URLs.
    assert_eq!(allowed.received().len(), 2);
    sidecar.stop().await;
}

/// A TLS upstream on loopback with a certificate from `ca` (for 127.0.0.1), answering 200 "tls" to each
/// request, one request per connection.
async fn tls_upstream(ca: &Ca) -> SocketAddr {
    sidecar::install_crypto_provider();
    let (chain, key) = ca.issue("mesh.test", "api", Validity::default()).unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    actix_rt::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            actix_rt::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while support::find(&head, b"\r\n\r\n").is_none() {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer =
                    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\ntls";
                let _ = tls.write_all(answer).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[actix_rt::test]
async fn https_targets_are_verified_against_the_configured_bundle() {
    let ca = Ca::generate("mesh.test", Validity::default()).unwrap();
    let upstream = tls_upstream(&ca).await;
    let target = format!("https://127.0.0.1:{}/", upstream.port());

    // The built-in roots do not know a private CA.
    let default = Sidecar::start("{}");
    let refused = get(default.addr, "/", &[("target", &target)]).await;
    assert_eq!(refused.status, 502);
    assert_eq!(
        refused.header("x-sidecar-error"),
        Some("upstream-tls-error")
    );
    default.stop().await;

    let dir = std::env::temp_dir().join(format!("sidecar-egress-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("corp-ca.pem");
    std::fs::write(&bundle, &ca.cert_pem).unwrap();
    let trusting = Sidecar::start(&format!(
        "egress:\n  tls:\n    ca: '{}'\n",
        bundle.display()
    ));
    let reply = get(trusting.addr, "/", &[("target", &target)]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "tls");
    trusting.stop().await;
}
