//! The mesh's certificates: read from PEM files, checked, and swapped in while the sidecar runs.
//!
//! Owns: this sidecar's [`Identity`] (the mesh CA bundle, its certificate chain and key), the rustls
//! configurations built on it; the actor that re-reads the files every second is
//! [`crate::control::cert_watcher`]. A new set of
//! files is used only when all three parse, the key matches the certificate, the certificate names this
//! sidecar's SPIFFE identity and chains to the (new) CA bundle, and it is valid now; anything else — a
//! half-written file, a key written before its certificate, a certificate from a CA the bundle does not hold
//! yet — keeps the current set and is retried on the next tick. Handshakes read the current set, so a rotation
//! reaches every new connection at once and never disturbs an established one. A reload that names other files
//! (or another identity) goes through the same checks first ([`Identity::prepare`]) and is refused when they
//! fail; a set that passes is swapped in whole ([`Identity::retarget`]) and watched from then on.
//!
//! Does not own: the policy's `mesh` section ([`crate::policy::Mesh`]), the listener ([`super::server`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::Serialize;

use crate::policy::Mesh;

pub use crate::telemetry::names::{CERT_EXPIRY as EXPIRY, CERT_RELOADS as RELOADS};

/// One consistent set of mesh TLS material, with what the admin state shows of it.
#[derive(Debug)]
struct Material {
    /// The file contents it was made from, to tell a change.
    files: [Vec<u8>; 3],
    roots: Arc<rustls::RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    key: Arc<CertifiedKey>,
    leaf: CertInfo,
    ca: Vec<CertInfo>,
}

/// What the admin state says of one certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub serial: String,
    /// The SPIFFE identity (URI SAN), for a sidecar's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// What happened to the files since start-up, for the admin state.
#[derive(Debug, Default)]
struct Reloads {
    applied: u64,
    rejected: u64,
    last_applied: Option<SystemTime>,
    /// Why the newest files on disk are not in use, while that lasts.
    pending_error: Option<String>,
    /// The contents last rejected, so the same half-written files are not parsed and logged every second.
    rejected_files: Option<[Vec<u8>; 3]>,
}

/// Which files an identity reads and what they must say: the policy's `mesh` section, less the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    paths: [PathBuf; 3],
    /// `spiffe://<trust domain>/service/<identity>`: what this sidecar's certificate must name.
    spiffe_id: String,
    tls12: bool,
}

impl Files {
    fn of(mesh: &Mesh) -> Self {
        Self {
            paths: [mesh.ca.clone(), mesh.cert.clone(), mesh.key.clone()],
            spiffe_id: crate::certs::spiffe_id(&mesh.trust_domain, &mesh.identity),
            tls12: mesh.tls12,
        }
    }
}

/// Files a reload names, read and checked, ready for [`Identity::retarget`].
#[derive(Debug)]
pub struct Prepared {
    files: Files,
    material: Material,
}

/// This sidecar's mesh identity: the certificate it presents and the CA it trusts, current at any moment.
#[derive(Debug)]
pub struct Identity {
    /// Swapped whole when a reload names other files or another identity.
    files: ArcSwap<Files>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Material>,
    reloads: Mutex<Reloads>,
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

impl Identity {
    /// Reads and checks the files the policy names; fails with the file and the reason.
    pub fn load(mesh: &Mesh) -> anyhow::Result<Arc<Self>> {
        let Prepared { files, material } = Self::prepare(mesh)?;
        let identity = Arc::new(Self {
            files: ArcSwap::from_pointee(files),
            provider: provider(),
            current: ArcSwap::from_pointee(material),
            reloads: Mutex::default(),
        });
        identity.publish_expiry();
        Ok(identity)
    }

    /// Reads and checks the files `mesh` names, as start-up does, without using them yet.
    pub fn prepare(mesh: &Mesh) -> anyhow::Result<Prepared> {
        let files = Files::of(mesh);
        let contents = read_files(&files.paths)?;
        let material = Material::parse(contents, &files.paths, &files.spiffe_id, &provider())?;
        Ok(Prepared { files, material })
    }

    /// Whether `mesh` names the files, identity and TLS versions in use.
    pub fn serves(&self, mesh: &Mesh) -> bool {
        **self.files.load() == Files::of(mesh)
    }

    /// Uses files a reload named and [`Identity::prepare`] checked: the next handshake, inbound and
    /// outbound, presents and verifies with them, and the watch follows the new paths.
    pub fn retarget(&self, prepared: Prepared) {
        let Prepared { files, material } = prepared;
        tracing::info!(
            identity = %files.spiffe_id,
            cert = %files.paths[1].display(),
            serial = %material.leaf.serial,
            "mesh identity files changed by the policy; new connections use them"
        );
        self.files.store(Arc::new(files));
        self.current.store(Arc::new(material));
        let mut reloads = self.lock();
        reloads.applied += 1;
        reloads.last_applied = Some(SystemTime::now());
        reloads.pending_error = None;
        reloads.rejected_files = None;
        drop(reloads);
        metrics::counter!(RELOADS, "result" => "applied").increment(1);
        self.publish_expiry();
    }

    /// The SPIFFE id this sidecar's certificate names.
    pub fn spiffe_id(&self) -> String {
        self.files.load().spiffe_id.clone()
    }

    /// Whether TLS 1.2 is accepted besides 1.3.
    pub fn tls12(&self) -> bool {
        self.files.load().tls12
    }

    /// Re-reads the files; swaps in the new material when they changed and hold a usable set.
    pub fn refresh(&self) {
        let target = self.files.load_full();
        let files = match read_files(&target.paths) {
            Ok(f) => f,
            Err(e) => {
                self.reject(None, format!("{e:#}"));
                return;
            }
        };
        if files == self.current.load().files {
            self.lock().pending_error = None;
            return;
        }
        if self.lock().rejected_files.as_ref() == Some(&files) {
            return;
        }
        match Material::parse(
            files.clone(),
            &target.paths,
            &target.spiffe_id,
            &self.provider,
        ) {
            // A reload that named other files meanwhile wins: these were read for the old ones.
            Ok(_) if !Arc::ptr_eq(&target, &self.files.load()) => {}
            Ok(material) => {
                tracing::info!(
                    serial = %material.leaf.serial,
                    not_after = material.leaf.not_after,
                    "mesh certificates reloaded; new connections use them"
                );
                self.current.store(Arc::new(material));
                let mut reloads = self.lock();
                reloads.applied += 1;
                reloads.last_applied = Some(SystemTime::now());
                reloads.pending_error = None;
                reloads.rejected_files = None;
                metrics::counter!(RELOADS, "result" => "applied").increment(1);
            }
            Err(e) => self.reject(Some(files), format!("{e:#}")),
        }
    }

    fn reject(&self, files: Option<[Vec<u8>; 3]>, why: String) {
        let mut reloads = self.lock();
        if reloads.pending_error.as_deref() != Some(why.as_str()) {
            tracing::warn!(error = %why, "mesh certificate files not used; the current ones keep serving");
            reloads.rejected += 1;
            metrics::counter!(RELOADS, "result" => "rejected").increment(1);
        }
        reloads.pending_error = Some(why);
        reloads.rejected_files = files;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reloads> {
        self.reloads.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn publish_expiry(&self) {
        let material = self.current.load();
        let now = unix_now();
        metrics::gauge!(EXPIRY, "certificate" => "identity")
            .set((material.leaf.not_after - now) as f64);
        if let Some(soonest) = material.ca.iter().map(|c| c.not_after).min() {
            metrics::gauge!(EXPIRY, "certificate" => "ca").set((soonest - now) as f64);
        }
    }

    /// The admin state: the certificates in use, their expiry, and the reloads.
    pub fn state(&self) -> serde_json::Value {
        let material = self.current.load();
        let files = self.files.load();
        let now = unix_now();
        let reloads = self.lock();
        serde_json::json!({
            "identity": files.spiffe_id,
            "files": {
                "ca": files.paths[0].display().to_string(),
                "cert": files.paths[1].display().to_string(),
                "key": files.paths[2].display().to_string(),
            },
            "certificate": material.leaf,
            "expires_in_seconds": material.leaf.not_after - now,
            "ca": material.ca,
            "ca_expires_in_seconds": material.ca.iter().map(|c| c.not_after - now).min(),
            "reloads": {
                "applied": reloads.applied,
                "rejected": reloads.rejected,
                "last_applied_unix": reloads.last_applied
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                "pending_error": reloads.pending_error,
            },
        })
    }

    /// The inbound listener's configuration: client certificates required and verified against the current
    /// CA bundle, our current certificate presented.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config =
            rustls::ServerConfig::builder_with_protocol_versions(versions(self.tls12()))
                .with_client_cert_verifier(Arc::new(CurrentClientVerifier(self.clone())))
                .with_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// A client configuration for calls to a peer that must prove the SPIFFE identity `expected`.
    pub fn client_config(self: &Arc<Self>, expected: String) -> rustls::ClientConfig {
        let verifier = Arc::new(SpiffeVerifier {
            identity: self.clone(),
            expected,
            algorithms: self.provider.signature_verification_algorithms,
        });
        let mut config =
            rustls::ClientConfig::builder_with_protocol_versions(versions(self.tls12()))
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

/// TLS 1.3 only, unless the mesh also allows 1.2.
fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static WITH_TLS12: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if tls12 { &WITH_TLS12 } else { &TLS13_ONLY }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read_files(paths: &[PathBuf; 3]) -> anyhow::Result<[Vec<u8>; 3]> {
    let read = |field: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("mesh.{field}: cannot read {}", path.display()))
    };
    Ok([
        read("ca", &paths[0])?,
        read("cert", &paths[1])?,
        read("key", &paths[2])?,
    ])
}

impl Material {
    fn parse(
        files: [Vec<u8>; 3],
        paths: &[PathBuf; 3],
        spiffe_id: &str,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let [ca_path, cert_path, key_path] = paths;
        let ca_certs = certificates(&files[0], "ca", ca_path)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca_certs {
            roots.add(cert.clone()).with_context(|| {
                format!(
                    "mesh.ca: {} holds a certificate rustls refuses",
                    ca_path.display()
                )
            })?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .context("mesh.ca: the bundle cannot verify client certificates")?;

        let chain = certificates(&files[1], "cert", cert_path)?;
        let key = PrivateKeyDer::from_pem_slice(&files[2]).map_err(|e| {
            anyhow::anyhow!(
                "mesh.key: {} holds no usable PEM private key ({e})",
                key_path.display()
            )
        })?;
        let key = CertifiedKey::from_der(chain.clone(), key, provider).with_context(|| {
            format!(
                "mesh.cert and mesh.key: {} does not hold the key of {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
        let leaf = info(&chain[0]).with_context(|| {
            format!(
                "mesh.cert: {} is not an X.509 certificate",
                cert_path.display()
            )
        })?;
        match &leaf.spiffe_id {
            Some(id) if id == spiffe_id => {}
            Some(id) => bail!(
                "mesh.cert: {} names {id}, but this sidecar is {spiffe_id}",
                cert_path.display()
            ),
            None => bail!(
                "mesh.cert: {} has no SPIFFE identity (one spiffe:// URI SAN); this sidecar is {spiffe_id}",
                cert_path.display()
            ),
        }
        // Our certificate must be one the peers, trusting this bundle, accept: chained to it and valid now.
        client_verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                anyhow::anyhow!(
                    "mesh.cert: {} is not valid under the CA bundle {} now: {e}",
                    cert_path.display(),
                    ca_path.display()
                )
            })?;
        let ca = ca_certs.iter().filter_map(info).collect();
        Ok(Self {
            files,
            roots,
            client_verifier,
            key: Arc::new(key),
            leaf,
            ca,
        })
    }
}

fn certificates(
    pem: &[u8],
    field: &str,
    path: &Path,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("mesh.{field}: {} is not PEM ({e})", path.display()))?;
    if certs.is_empty() {
        bail!("mesh.{field}: {} holds no certificate", path.display());
    }
    Ok(certs)
}

fn info(der: &CertificateDer<'_>) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(CertInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string(),
        spiffe_id: super::spiffe_identity(der.as_ref()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Presents the current certificate, on both sides of a handshake.
#[derive(Debug)]
struct CurrentCert(Arc<Identity>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Requires a client certificate and verifies it against the current CA bundle. It sends no CA names in its
/// request (a sidecar has one certificate to offer, and the names would have to outlive a rotation).
#[derive(Debug)]
struct CurrentClientVerifier(Arc<Identity>);

impl ClientCertVerifier for CurrentClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.0.current.load().client_verifier.clone();
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a peer sidecar: the chain to the current mesh CA bundle (as webpki does for any server), then the
/// SPIFFE identity instead of a DNS name, whatever address the peer was reached at.
#[derive(Debug)]
struct SpiffeVerifier {
    identity: Arc<Identity>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let roots = self.identity.current.load().roots.clone();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match super::spiffe_identity(end_entity.as_ref()) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "the peer is {id}, not {}",
                self.expected
            ))),
            None => Err(rustls::Error::General(
                "the peer certificate has no SPIFFE identity".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
