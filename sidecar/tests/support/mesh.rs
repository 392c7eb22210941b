//! Mesh peers for the tests: a development CA from `sidecar certs`' own code, certificates per service, and
//! an mTLS client that calls a sidecar's inbound listener as a peer sidecar would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidecar::certs::{Ca, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub const DOMAIN: &str = "mesh.test";

/// A mesh CA in a directory of its own.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        sidecar::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("sidecar-mesh-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let ca = Ca::generate(DOMAIN, Validity::default()).expect("a CA");
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write ca.pem");
        Self { dir, ca }
    }

    /// Writes `<service>.pem` and `<service>-key.pem` and returns their paths.
    pub fn issue(&self, service: &str, validity: Validity) -> (PathBuf, PathBuf) {
        let (chain, key) = self
            .ca
            .issue(DOMAIN, service, validity)
            .expect("a certificate");
        let (c, k) = (
            self.dir.join(format!("{service}.pem")),
            self.dir.join(format!("{service}-key.pem")),
        );
        std::fs::write(&c, chain).expect("write the certificate");
        std::fs::write(&k, key).expect("write the key");
        (c, k)
    }

    /// The `orders` sidecar's `mesh` section, its inbound listener on port 0 in front of `app`.
    pub fn policy(&self, app: SocketAddr) -> String {
        self.policy_on(app, "127.0.0.1:0")
    }

    /// The `orders` sidecar's `mesh` section, its inbound listener on `listen` in front of `app`.
    pub fn policy_on(&self, app: SocketAddr, listen: &str) -> String {
        let (cert, key) = self.issue("orders", Validity::default());
        self.policy_with(app, listen, &cert, &key)
    }

    /// The `orders` sidecar's `mesh` section with the given certificate and key files.
    pub fn policy_with(&self, app: SocketAddr, listen: &str, cert: &Path, key: &Path) -> String {
        format!(
            "mesh:\n  trust_domain: {DOMAIN}\n  identity: orders\n  ca: '{}'\n  cert: '{}'\n  key: '{}'\n  inbound:\n    listen: {listen}\n    app: '{app}'\n",
            self.dir.join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    }

    /// A client presenting `service`'s new certificate.
    pub fn peer(&self, service: &str) -> TlsConnector {
        let (cert, key) = self.issue(service, Validity::default());
        connector(&self.dir.join("ca.pem"), Some((&cert, &key)))
    }
}

/// A TLS client trusting `ca`, presenting `identity` (chain and key files) when given.
pub fn connector(ca: &Path, identity: Option<(&Path, &Path)>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the CA") {
        roots.add(cert.expect("a CA certificate")).expect("a root");
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
                .expect("read the chain")
                .map(|c| c.expect("a certificate"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("read the key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("a client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// One GET over TLS: the response status, or the error that ended the exchange.
pub async fn call(tls: &TlsConnector, addr: SocketAddr, extra: &str) -> Result<u16, String> {
    call_to(tls, addr, "GET /hello", extra).await
}

/// One request (`"METHOD /path"`) over TLS, on a connection of its own.
pub async fn call_to(
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

/// A kept-alive mTLS connection to an inbound listener, for requests one after another.
pub struct Peer {
    stream: TlsStream<TcpStream>,
}

impl Peer {
    pub async fn connect(tls: &TlsConnector, addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let stream = tls
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .expect("a TLS handshake");
        Self { stream }
    }

    /// One request (`"METHOD /path"`) with no body; the response status (its body has a `Content-Length`).
    pub async fn send(&mut self, line: &str) -> u16 {
        let request = format!("{line} HTTP/1.1\r\nhost: orders\r\ncontent-length: 0\r\n\r\n");
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("write the request");
        tokio::time::timeout(super::DEADLINE, self.read())
            .await
            .expect("a response in time")
    }

    async fn read(&mut self) -> u16 {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = super::find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        while buf.len() < head_end + length {
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed inside a body");
            buf.extend_from_slice(&chunk[..n]);
        }
        head.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status")
    }
}
