//! The policy model: what operators write in `policies/*.yaml`, checked and turned into validated types.
//!
//! Owns: the serde mirror of the files (`raw`), the checks that turn it into a [`Policy`], the seed dispatcher's
//! `config.yaml` format ([`seed`]), and loading from the embedded default, a file, or a directory.
//! Does not own: what the request path does with a policy (that is [`crate::snapshot`] and [`crate::dispatch`]).
//! Called by `main.rs` at start-up and by `sidecar check`.

pub mod copies;
pub mod duration;
pub mod egress;
mod errors;
pub mod fanout;
pub mod http;
pub mod locate;
mod prescan;
mod raw;
pub mod seed;
pub mod traffic;
pub mod units;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::upstream::Upstream;
pub use egress::{AllowList, Egress, Roots};
pub use errors::PolicyErrors;
use errors::{Sources, yaml_error};
pub use seed::DispatchRules;

/// The default policy, embedded in the binary so `sidecar` runs with no files at all.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.yaml");

/// A validated policy: every value in here has been checked, so the request path never re-validates.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Where the policy came from (a file, a directory or the embedded default), for messages.
    pub source: String,
    /// The files it was read from, in merge order (empty for the embedded default).
    pub files: Vec<PathBuf>,
    /// A hash of the sources' names and contents (FNV-1a), to tell versions apart.
    pub hash: u64,
    pub listeners: Listeners,
    pub upstream: UpstreamSettings,
    /// Per-service policy keyed by the name apps use with `internal: true`.
    pub services: BTreeMap<String, ServicePolicy>,
    /// Dispatch rules in the seed dispatcher's format, when configured.
    pub dispatch: Option<DispatchRules>,
    pub access_log: crate::access_log::AccessLogPolicy,
    /// DNS servers for service discovery (`dns.nameservers`); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// This sidecar's place in the mesh: identity, certificates, inbound listener.
    pub mesh: Option<Mesh>,
    /// What URL targets may name, and which roots verify `https` ones.
    pub egress: Egress,
    /// Traffic copies of services and URL authorities (a dispatch rule's are in its rewrite).
    pub shadow: ShadowPolicy,
    /// Fan-out groups: one request sent to several targets.
    pub fanout: std::sync::Arc<fanout::FanoutPolicy>,
}

/// The `shadow` lists of services and of URL targets' authorities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowPolicy {
    pub services: BTreeMap<String, copies::Copies>,
    /// `egress.shadow`: by host (lower case) and port, the scheme's default when the URL has none.
    pub urls: Vec<(String, u16, copies::Copies)>,
}

impl ShadowPolicy {
    /// The copies of a URL target's authority.
    pub fn url(
        &self,
        authority: &actix_http::uri::Authority,
        https: bool,
    ) -> Option<&copies::Copies> {
        if self.urls.is_empty() {
            return None;
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host();
        self.urls
            .iter()
            .find(|(h, p, _)| *p == port && h.eq_ignore_ascii_case(host))
            .map(|(_, _, c)| c)
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.urls.is_empty()
    }
}

/// The `mesh` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    pub trust_domain: String,
    /// This sidecar's service: its certificate says `spiffe://<trust_domain>/service/<identity>`.
    pub identity: String,
    /// PEM files: the mesh CA bundle, this sidecar's chain and key.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Accept TLS 1.2 too (TLS 1.3 only otherwise).
    pub tls12: bool,
    /// What the mesh hop (both directions) does with header names that contain `_`.
    pub headers_with_underscores: crate::policy::http::UnderscoreAction,
    pub inbound: Option<Inbound>,
}

/// The inbound listener: peer sidecars in, the local app out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub listen: SocketAddr,
    pub app: Upstream,
    pub request_timeout: Duration,
    /// Allow rules: once there is one, a request no rule allows is denied (403 `forbidden`).
    pub authorization: Option<Vec<AllowRule>>,
    /// Requests per peer identity (unless keyed otherwise); 429 `rate-limited` beyond.
    pub rate_limit: Option<traffic::RateLimitPolicy>,
    /// Requests in flight to the app, and a bounded queue; 503 `overloaded` beyond.
    pub concurrency: Option<traffic::ConcurrencyPolicy>,
    /// How request paths are normalized before authorization and forwarding.
    pub paths: crate::policy::http::PathOptions,
}

/// Who may call which methods and paths of the local app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// SPIFFE ids (a bare service name means `spiffe://<trust_domain>/service/<name>`); `*` is any peer.
    pub from: Vec<String>,
    /// Methods allowed; empty: any.
    pub methods: Vec<String>,
    /// Paths allowed: exact, or a prefix ending in `*`; empty: any.
    pub paths: Vec<String>,
}

impl AllowRule {
    pub fn allows(&self, peer: &str, method: &str, path: &str) -> bool {
        let from = self.from.iter().any(|f| f == "*" || f == peer);
        let method =
            self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
        let path = self.paths.is_empty()
            || self.paths.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => p == path,
            });
        from && method && path
    }
}

/// Listener addresses, the worker count and limits of the egress listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// The app's private door, `127.0.0.1:5000` by default.
    pub egress: SocketAddr,
    /// The admin listener (`/admin/policy`, `/admin/reload`), `127.0.0.1:9901` by default.
    pub admin: SocketAddr,
    /// Worker threads serving the egress listener.
    pub workers: usize,
    /// Request heads above this size get 431.
    pub max_header_size: usize,
    /// On SIGTERM/SIGINT (and when a listener is replaced), how long requests in flight may take to finish.
    pub drain_timeout: Duration,
    /// How long a client may take to send a request head, on a new connection or a reused one.
    pub head_timeout: Duration,
}

/// Timeouts, connection-pool settings and resilience used for every upstream unless a service overrides them.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub timeouts: Timeouts,
    /// How long an idle pooled upstream connection is kept: shorter than common app keep-alives (Node's 5 s), so
    /// the sidecar never reuses a connection the upstream is about to close.
    pub idle_timeout: Duration,
    /// Upstream connections per worker (0: no limit).
    pub max_connections: usize,
    /// Retries, breaker, limits for URL targets and dispatch destinations; the base of every service's.
    pub resilience: traffic::Resilience,
}

/// Request timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP (and TLS) connection, DNS included.
    pub connect: Duration,
    /// From the request's arrival until the upstream's response head: sending the request body is included,
    /// streaming the response body is not.
    pub request: Duration,
}

/// The policy of one service reached with `internal: true`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    pub endpoints: Vec<Upstream>,
    /// Time allowed until the response head, all attempts included; the default's when not set.
    pub request_timeout: Duration,
    /// The defaults' resilience with this service's overrides.
    pub resilience: traffic::Resilience,
    /// Where endpoints come from besides `endpoints` (which serve until the first answer).
    pub discovery: Option<Discovery>,
    /// Active health checks of the endpoints.
    pub health_check: Option<HealthCheck>,
    /// The endpoints are peer sidecars: reached over mTLS, and each must prove it is this service.
    pub mesh: bool,
}

/// An active HTTP health check: `GET path` on each endpoint every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: actix_http::Uri,
    pub interval: Duration,
    pub timeout: Duration,
    /// Successes in a row that bring an unhealthy endpoint back.
    pub healthy_threshold: u32,
    /// Failures in a row (non-2xx, timeout, refused) that take an endpoint out.
    pub unhealthy_threshold: u32,
}

/// A dynamic source of a service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub source: DiscoverySource,
    /// Re-resolved when the answer's TTL expires, but never sooner than `min_ttl` nor later than `max_ttl`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySource {
    /// A/AAAA records of a name, each address with `port`.
    Dns { name: String, port: u16 },
    /// SRV records of a name: host and port each.
    Srv { name: String },
    /// A JSON array of `"host:port"` (the ringpop seed's hosts file), re-read when it changes.
    HostsFile { path: PathBuf },
}

impl Policy {
    /// The embedded default policy.
    pub fn embedded_default() -> Result<Self, PolicyErrors> {
        Self::from_yaml("embedded default policy", DEFAULT_POLICY)
    }

    /// Parses and validates one YAML document; `source` names it in every message.
    pub fn from_yaml(source: &str, text: &str) -> Result<Self, PolicyErrors> {
        prescan::check_not_blank(source, text)?;
        prescan::check_depth(source, text)?;
        let raw: raw::RawPolicy = yaml_serde::from_str(text).map_err(|e| yaml_error(source, &e))?;
        let sources = Sources::one(source, text);
        let mut policy = raw
            .validate(source)
            .map_err(|issues| PolicyErrors::render(issues, &sources))?;
        policy.hash = sources.hash();
        Ok(policy)
    }

    /// Loads a policy file, or every `*.yaml`/`*.yml` file of a directory in name order.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let files = policy_files(path)?;
        let mut merged: Option<raw::RawPolicy> = None;
        let mut sources = Sources::default();
        let mut errors = Vec::new();
        let mut issues = Vec::new();
        for file in &files {
            let name = file.display().to_string();
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(format!("{name}: cannot read: {e}"));
                    continue;
                }
            };
            let parsed = prescan::check_not_blank(&name, &text)
                .and_then(|()| prescan::check_depth(&name, &text))
                .and_then(|()| {
                    yaml_serde::from_str::<raw::RawPolicy>(&text).map_err(|e| yaml_error(&name, &e))
                });
            match parsed {
                Ok(mut part) => {
                    part.set_origin(&name);
                    match merged.as_mut() {
                        None => merged = Some(part),
                        Some(all) => {
                            if let Err(mut e) = all.merge(part) {
                                issues.append(&mut e);
                            }
                        }
                    }
                }
                Err(e) => errors.extend(e.errors),
            }
            sources.push(name, text);
        }
        let source = path.display().to_string();
        let validated = match merged.unwrap_or_default().validate(&source) {
            Ok(policy) => Some(policy),
            Err(more) => {
                issues.extend(more);
                None
            }
        };
        errors.extend(PolicyErrors::render(issues, &sources).errors);
        let Some(mut policy) = validated.filter(|_| errors.is_empty()) else {
            return Err(PolicyErrors { errors });
        };
        policy.source = source;
        policy.files = files;
        policy.hash = sources.hash();
        Ok(policy)
    }

    /// Adds dispatch rules from a seed dispatcher `config.yaml`; a policy that already has rules is an error
    /// naming both places, never a silent choice.
    pub fn with_seed_dispatch(mut self, file: &Path) -> Result<Self, PolicyErrors> {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file)
            .map_err(|e| PolicyErrors::one(format!("{name}: cannot read dispatch config: {e}")))?;
        // The rules and the hash come from the same read, so a file replaced meanwhile cannot pair new
        // contents with an old hash.
        let rules = DispatchRules::from_seed_yaml(&name, &text)?;
        let mut mixed = Sources::one(&name, &text);
        mixed.push(String::new(), self.hash.to_string());
        self.hash = mixed.hash();
        if self.dispatch.is_some() {
            return Err(PolicyErrors::one(format!(
                "{}: dispatch rules are defined twice: in {} and in the policy {}",
                file.display(),
                file.display(),
                self.source
            )));
        }
        self.dispatch = Some(rules);
        Ok(self)
    }
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyErrors> {
    let meta = std::fs::metadata(path)
        .map_err(|e| PolicyErrors::one(format!("{}: cannot read: {e}", path.display())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| PolicyErrors::one(format!("{}: cannot list: {e}", path.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PolicyErrors::one(format!(
            "{}: no *.yaml policy files in this directory",
            path.display()
        )));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_a_directory_merge_and_a_name_defined_twice_names_both_files() {
        let dir = std::env::temp_dir().join(format!("sidecar-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "listeners:\n  workers: 2\nservices:\n  orders:\n    endpoints: ['h:1']\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.yaml"), "defaults:\n  timeouts:\n    request: 3s\nservices:\n  payments:\n    endpoints: ['h:2']\n").unwrap();
        let merged = Policy::load(&dir).unwrap();
        assert_eq!(merged.listeners.workers, 2);
        assert_eq!(merged.upstream.timeouts.request, Duration::from_secs(3));
        assert_eq!(merged.services.len(), 2);
        assert_eq!(merged.files.len(), 2);

        std::fs::write(
            dir.join("c.yaml"),
            "listeners:\n  workers: 3\nservices:\n  orders:\n    endpoints: ['h:3']\n",
        )
        .unwrap();
        let err = Policy::load(&dir).unwrap_err().to_string();
        let (a, c) = (
            dir.join("a.yaml").display().to_string(),
            dir.join("c.yaml").display().to_string(),
        );
        assert!(
            err.contains(&format!("listeners: defined twice: in {a} and in {c}")),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "services.orders: defined twice: in {a} and in {c}"
            )),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_key_gets_a_suggestion_when_one_is_close() {
        let err = Policy::from_yaml("p.yaml", "listeners:\n  egres: 127.0.0.1:5000\n").unwrap_err();
        assert!(err.to_string().ends_with("did you mean `egress`?"), "{err}");
        let err = Policy::from_yaml("p.yaml", "listeners:\n  colour: blue\n").unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
    }

    #[test]
    fn semantic_errors_name_file_line_column_field_and_value() {
        let yaml = "services:\n  orders:\n    endpoints:\n      - 10.0.0.1:80\n      - 'ftp://x'\n";
        let err = Policy::from_yaml("policies/orders.yaml", yaml).unwrap_err();
        assert_eq!(
            err.to_string(),
            "policies/orders.yaml:5:9: services.orders.endpoints[1]: must be an absolute http or https URL, got \"ftp://x\""
        );
    }

    #[test]
    fn mesh_path_and_underscore_keys_are_checked() {
        let mesh = "mesh:\n  identity: orders\n  ca: ca.pem\n  cert: c.pem\n  key: k.pem\n";
        let ok = Policy::from_yaml(
            "p.yaml",
            &format!("{mesh}  headers_with_underscores: reject\n  inbound:\n    paths:\n      merge_slashes: true\n      encoded_slashes: allow\n"),
        )
        .unwrap();
        let m = ok.mesh.unwrap();
        assert_eq!(
            m.headers_with_underscores,
            crate::policy::http::UnderscoreAction::Reject
        );
        let paths = m.inbound.unwrap().paths;
        assert!(paths.merge_slashes);
        assert_eq!(
            paths.encoded_slashes,
            crate::policy::http::EncodedSlashes::Allow
        );
        let err = Policy::from_yaml(
            "p.yaml",
            &format!("{mesh}  headers_with_underscores: keep\n  inbound:\n    paths:\n      encoded_slashes: decode\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "mesh.headers_with_underscores: must be drop, reject or allow, got \"keep\""
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "mesh.inbound.paths.encoded_slashes: must be reject or allow, got \"decode\""
            ),
            "{err}"
        );
        let err = Policy::from_yaml(
            "p.yaml",
            &format!("{mesh}  inbound:\n    paths:\n      normalize: true\n"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("normalize"), "{err}");
    }

    #[test]
    fn the_embedded_default_spells_out_the_built_in_resilience() {
        let p = Policy::embedded_default().unwrap();
        assert_eq!(p.upstream.resilience, traffic::Resilience::default());
    }

    #[test]
    fn embedded_default_is_valid_and_listens_on_loopback_5000() {
        let p = Policy::embedded_default().unwrap();
        assert_eq!(p.listeners.egress, "127.0.0.1:5000".parse().unwrap());
        assert!(p.dispatch.is_none());
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = Policy::from_yaml("p.yaml", "listeners:\n  egres: 127.0.0.1:5000\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("p.yaml:2:3: "), "{text}");
        assert!(text.contains("egres"), "{text}");
    }

    #[test]
    fn resilience_errors_name_the_field_and_line() {
        let yaml = "defaults:\n  retries:\n    on: [reset, sometimes]\nservices:\n  orders:\n    endpoints: ['h:1']\n    rate_limit:\n      rate: fast\n";
        let err = Policy::from_yaml("p.yaml", yaml).unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert!(
            err.errors[0].starts_with("p.yaml:3:")
                && err.errors[0].contains("defaults.retries.on[1]"),
            "{err}"
        );
        assert!(
            err.errors[1].starts_with("p.yaml:8:")
                && err.errors[1].contains("services.orders.rate_limit.rate"),
            "{err}"
        );
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let yaml = "services:\n  a:\n    endpoints: []\n  b:\n    endpoints: ['ftp://x:1']\n";
        let err = Policy::from_yaml("p.yaml", yaml).unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert!(err.errors[0].contains("services.a.endpoints"), "{err}");
        assert!(err.errors[1].contains("services.b.endpoints[0]"), "{err}");
    }
}
