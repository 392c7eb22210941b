//! The policy model: what operators write in `policies/*.yaml`, checked and turned into validated types.
//!
//! Owns: the serde mirror of the files (`raw`), the checks that turn it into a [`Policy`], the seed dispatcher's
//! `config.yaml` format ([`seed`]), and loading from the embedded default, a file, or a directory.
//! Does not own: what the request path does with a policy (that is [`crate::snapshot`] and [`crate::dispatch`]).
//! Called by `main.rs` at start-up and by `sidecar check`.

pub mod duration;
mod raw;
pub mod seed;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dispatch::target::Upstream;
pub use seed::DispatchRules;

/// The default policy, embedded in the binary so `sidecar` runs with no files at all.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.yaml");

/// A validated policy: every value in here has been checked, so the request path never re-validates.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Where the policy came from (a file, a directory or the embedded default), for messages.
    pub source: String,
    pub listeners: Listeners,
    pub upstream: UpstreamSettings,
    /// Per-service policy keyed by the name apps use with `internal: true`.
    pub services: BTreeMap<String, ServicePolicy>,
    /// Dispatch rules in the seed dispatcher's format, when configured.
    pub dispatch: Option<DispatchRules>,
}

/// Listener addresses and the worker count.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// The app's private door, `127.0.0.1:5000` by default.
    pub egress: SocketAddr,
    /// Worker threads serving the egress listener.
    pub workers: usize,
}

/// Timeouts and connection-pool settings used for every upstream unless a service overrides them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub timeouts: Timeouts,
    /// How long an idle pooled upstream connection is kept: shorter than common app keep-alives (Node's 5 s), so
    /// the sidecar never reuses a connection the upstream is about to close.
    pub idle_timeout: Duration,
    /// Upstream connections per worker (0: no limit).
    pub max_connections: usize,
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
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    pub endpoints: Vec<Upstream>,
    /// Time allowed until the response head; the default's when not set.
    pub request_timeout: Duration,
}

/// Every problem found in a policy, each on its own line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors {
    pub errors: Vec<String>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(e)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl PolicyErrors {
    fn one(message: impl Into<String>) -> Self {
        Self {
            errors: vec![message.into()],
        }
    }
}

impl Policy {
    /// The embedded default policy.
    pub fn embedded_default() -> Result<Self, PolicyErrors> {
        Self::from_yaml("embedded default policy", DEFAULT_POLICY)
    }

    /// Parses and validates one YAML document; `source` names it in every message.
    pub fn from_yaml(source: &str, text: &str) -> Result<Self, PolicyErrors> {
        let raw: raw::RawPolicy = yaml_serde::from_str(text).map_err(|e| yaml_error(source, &e))?;
        raw.validate(source)
    }

    /// Loads a policy file, or every `*.yaml`/`*.yml` file of a directory in name order.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let files = policy_files(path)?;
        let mut merged: Option<raw::RawPolicy> = None;
        let mut errors = Vec::new();
        for file in &files {
            let name = file.display().to_string();
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(format!("{name}: cannot read: {e}"));
                    continue;
                }
            };
            match yaml_serde::from_str::<raw::RawPolicy>(&text) {
                Ok(mut part) => {
                    part.set_origin(&name);
                    match merged.as_mut() {
                        None => merged = Some(part),
                        Some(all) => {
                            if let Err(mut e) = all.merge(part) {
                                errors.append(&mut e);
                            }
                        }
                    }
                }
                Err(e) => errors.extend(yaml_error(&name, &e).errors),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors { errors });
        }
        let source = path.display().to_string();
        merged.unwrap_or_default().validate(&source).map(|mut p| {
            p.source = source;
            p
        })
    }

    /// Adds dispatch rules from a seed dispatcher `config.yaml`; a policy that already has rules is an error
    /// naming both places, never a silent choice.
    pub fn with_seed_dispatch(mut self, file: &Path) -> Result<Self, PolicyErrors> {
        let rules = DispatchRules::load_seed_file(file)?;
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

    /// The timeouts for a service (or for a plain URL target when `service` is `None`).
    pub fn request_timeout(&self, service: Option<&str>) -> Duration {
        service
            .and_then(|s| self.services.get(s))
            .map_or(self.upstream.timeouts.request, |s| s.request_timeout)
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

/// Formats a YAML/serde error as `file:line:column: message`.
pub(crate) fn yaml_error(source: &str, e: &yaml_serde::Error) -> PolicyErrors {
    let message = e.to_string();
    // yaml_serde appends " at line L column C" to its message; we lead with it instead.
    let message = match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    match e.location() {
        Some(loc) => PolicyErrors::one(format!(
            "{source}:{}:{}: {message}",
            loc.line(),
            loc.column()
        )),
        None => PolicyErrors::one(format!("{source}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn every_error_is_reported_not_just_the_first() {
        let yaml = "services:\n  a:\n    endpoints: []\n  b:\n    endpoints: ['ftp://x:1']\n";
        let err = Policy::from_yaml("p.yaml", yaml).unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert!(err.errors[0].contains("services.a.endpoints"), "{err}");
        assert!(err.errors[1].contains("services.b.endpoints[0]"), "{err}");
    }
}
