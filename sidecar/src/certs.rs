//! `sidecar certs`: a development mesh CA and per-service certificates, for docker-compose and tests.
//!
//! Development tooling, not a production CA: the CA key is written next to the certificates, nothing is
//! revoked, and every certificate lives as long as `--days` says. Each service certificate names its service
//! in a SPIFFE URI SAN (`spiffe://<trust-domain>/service/<name>`), which is the identity sidecars verify, and
//! carries both client and server authentication, since a sidecar is both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject as _;

/// The SPIFFE identity of a service in a trust domain.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

/// A validity window: from `start` (relative to now, may be negative) for `days`.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub start_days: i64,
    pub days: i64,
}

impl Default for Validity {
    fn default() -> Self {
        Self {
            start_days: -1,
            days: 365,
        }
    }
}

fn window(params: &mut CertificateParams, validity: Validity) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let day = 86_400;
    let start = now + validity.start_days * day;
    let end = start + validity.days * day;
    params.not_before = timestamp(start);
    params.not_after = timestamp(end);
}

fn timestamp(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A development CA: its certificate and key, in PEM, and the issuer made of them.
#[derive(Debug)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn generate(trust_domain: &str, validity: Validity) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            format!("sidecar development mesh CA ({trust_domain})"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        window(&mut params, validity);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA kept from before (`ca.pem` and `ca-key.pem`, or any CA certificate and its key in PEM), to issue
    /// more certificates that chain to it. Fails when the key is not the certificate's.
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let key = KeyPair::from_pem(key_pem).context("the CA key is not a PEM private key")?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .context("the CA certificate is not a PEM certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("the CA certificate cannot be parsed: {e}"))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            anyhow::bail!("the CA key is not the key of the CA certificate");
        }
        if !cert.is_ca() {
            anyhow::bail!("the CA certificate is not a CA (no basicConstraints CA:TRUE)");
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .context("the CA certificate cannot issue certificates")?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// A certificate for `service`: its chain (leaf, then CA) and key, in PEM.
    pub fn issue(
        &self,
        trust_domain: &str,
        service: &str,
        validity: Validity,
    ) -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec![service.to_string(), "localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::URI(spiffe_id(trust_domain, service).try_into()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, service);
        params.distinguished_name = name;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        window(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }
}

/// Which CA `sidecar certs` issues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `ca.pem` and `ca-key.pem` of the output directory when they are there (certificates issued before keep
    /// chaining), else a new CA written there.
    Kept,
    /// A CA certificate and its key, elsewhere; nothing of the CA is written.
    Given { cert: PathBuf, key: PathBuf },
    /// A new CA, replacing the one in the output directory (`--force`): what it issued before stops chaining.
    Replace,
}

/// The CA in use and whether `write` created it.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// True when the CA was created by this run (none was there, or `--force`).
    pub new_ca: bool,
    pub services: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes one certificate per service into `dir` (`<service>.pem`, `<service>-key.pem`), issued by the CA
/// `source` names; a new CA goes to `dir/ca.pem` and `dir/ca-key.pem`. Each certificate is valid from a day
/// ago (clocks differ) until `days` days from now.
pub fn write(
    dir: &Path,
    trust_domain: &str,
    services: &[String],
    days: i64,
    source: &CaSource,
) -> anyhow::Result<Written> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let validity = Validity {
        start_days: -1,
        days: days + 1,
    };
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let (here, here_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (ca, ca_path, ca_key_path, new_ca) = match source {
        CaSource::Given { cert, key } => {
            let ca = Ca::load(&read(cert)?, &read(key)?)
                .with_context(|| format!("{} and {}", cert.display(), key.display()))?;
            (ca, cert.clone(), key.clone(), false)
        }
        CaSource::Kept if here.exists() || here_key.exists() => {
            if !(here.exists() && here_key.exists()) {
                anyhow::bail!(
                    "{} holds only one of ca.pem and ca-key.pem: restore the other, or pass --force to replace the \
                     CA (certificates it issued stop chaining)",
                    dir.display()
                );
            }
            let ca = Ca::load(&read(&here)?, &read(&here_key)?)
                .with_context(|| format!("{} (pass --force to replace the CA)", here.display()))?;
            (ca, here, here_key, false)
        }
        CaSource::Kept | CaSource::Replace => {
            let ca = Ca::generate(trust_domain, validity)?;
            write_file(&here, &ca.cert_pem, false)?;
            write_file(&here_key, &ca.key_pem, true)?;
            (ca, here, here_key, true)
        }
    };
    let mut written = Vec::new();
    for service in services {
        let (chain, key) = ca.issue(trust_domain, service, validity)?;
        let (cert_path, key_path) = (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}-key.pem")),
        );
        write_file(&cert_path, &chain, false)?;
        write_file(&key_path, &key, true)?;
        written.push((service.clone(), cert_path, key_path));
    }
    Ok(Written {
        ca: ca_path,
        ca_key: ca_key_path,
        new_ca,
        services: written,
    })
}

fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_certificate_names_its_spiffe_identity() {
        let ca = Ca::generate("mesh.test", Validity::default()).unwrap();
        let (chain, key) = ca
            .issue("mesh.test", "orders", Validity::default())
            .unwrap();
        assert_eq!(
            chain.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf then CA"
        );
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(
            spiffe_id("mesh.test", "orders"),
            "spiffe://mesh.test/service/orders"
        );
    }
}
