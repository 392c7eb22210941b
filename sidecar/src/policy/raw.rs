//! The serde mirror of a policy file, exactly as operators write it, and its validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::seed::RawDispatch;
use super::{Listeners, Policy, PolicyErrors, ServicePolicy, Timeouts, UpstreamSettings, duration};
use crate::dispatch::target::Upstream;

const DEFAULT_EGRESS: &str = "127.0.0.1:5000";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    listeners: RawListeners,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    #[serde(default)]
    dispatch: Option<RawDispatch>,
    /// Which file each top-level part came from, for "defined twice" messages.
    #[serde(skip)]
    origin: Origins,
}

#[derive(Debug, Default)]
struct Origins {
    file: String,
    services: BTreeMap<String, String>,
    dispatch: Option<String>,
    listeners: Option<String>,
    defaults: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners {
    egress: Option<String>,
    workers: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    pool: RawPool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default, with = "duration::serde_opt")]
    connect: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    request: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default, with = "duration::serde_opt")]
    idle_timeout: Option<Duration>,
    max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    timeouts: RawServiceTimeouts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceTimeouts {
    #[serde(default, with = "duration::serde_opt")]
    request: Option<Duration>,
}

impl RawPolicy {
    pub(super) fn set_origin(&mut self, file: &str) {
        self.origin.file = file.to_string();
        self.origin.services = self
            .services
            .keys()
            .map(|k| (k.clone(), file.to_string()))
            .collect();
        self.origin.dispatch = self.dispatch.as_ref().map(|_| file.to_string());
        let listeners_set = self.listeners.egress.is_some() || self.listeners.workers.is_some();
        self.origin.listeners = listeners_set.then(|| file.to_string());
        let d = &self.defaults;
        let defaults_set = d.timeouts.connect.is_some()
            || d.timeouts.request.is_some()
            || d.pool.idle_timeout.is_some()
            || d.pool.max_connections.is_some();
        self.origin.defaults = defaults_set.then(|| file.to_string());
    }

    /// Merges another file into this one. A name defined in both is an error naming both files.
    pub(super) fn merge(&mut self, other: RawPolicy) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let here = |o: &Option<String>| o.clone().unwrap_or_default();
        if let (Some(a), Some(b)) = (&self.origin.listeners, &other.origin.listeners) {
            errors.push(format!(
                "{b}: listeners are defined twice: in {a} and in {b}"
            ));
        } else if other.origin.listeners.is_some() {
            self.listeners = other.listeners;
            self.origin.listeners = other.origin.listeners.clone();
        }
        if let (Some(a), Some(b)) = (&self.origin.defaults, &other.origin.defaults) {
            errors.push(format!(
                "{b}: defaults are defined twice: in {a} and in {b}"
            ));
        } else if other.origin.defaults.is_some() {
            self.defaults = other.defaults;
            self.origin.defaults = other.origin.defaults.clone();
        }
        if let Some(d) = other.dispatch {
            match &self.origin.dispatch {
                Some(a) => {
                    let b = here(&other.origin.dispatch);
                    errors.push(format!("{b}: dispatch is defined twice: in {a} and in {b}"));
                }
                None => {
                    self.dispatch = Some(d);
                    self.origin.dispatch = other.origin.dispatch.clone();
                }
            }
        }
        for (name, service) in other.services {
            let b = other
                .origin
                .services
                .get(&name)
                .cloned()
                .unwrap_or_default();
            if let Some(a) = self.origin.services.get(&name) {
                errors.push(format!(
                    "{b}: services.{name} is defined twice: in {a} and in {b}"
                ));
                continue;
            }
            self.origin.services.insert(name.clone(), b);
            self.services.insert(name, service);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    pub(super) fn validate(self, source: &str) -> Result<Policy, PolicyErrors> {
        let mut errors = Vec::new();
        let at = |field: &str| -> String {
            let file = if self.origin.file.is_empty() {
                source
            } else {
                &self.origin.file
            };
            format!("{file}: {field}")
        };

        let egress_text = self.listeners.egress.as_deref().unwrap_or(DEFAULT_EGRESS);
        let egress = match egress_text.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                errors.push(format!(
                    "{}: must be an address such as 127.0.0.1:5000, got {egress_text:?}",
                    at("listeners.egress")
                ));
                DEFAULT_EGRESS
                    .parse()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 5000)))
            }
        };
        let workers = self.listeners.workers.unwrap_or(1);
        if workers == 0 || workers > 256 {
            errors.push(format!(
                "{}: must be between 1 and 256, got {workers}",
                at("listeners.workers")
            ));
        }

        let t = &self.defaults.timeouts;
        let timeouts = Timeouts {
            connect: t.connect.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            request: t.request.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        };
        for (field, value) in [
            ("defaults.timeouts.connect", timeouts.connect),
            ("defaults.timeouts.request", timeouts.request),
        ] {
            if value.is_zero() {
                errors.push(format!("{}: must be more than 0, got 0", at(field)));
            }
        }
        let idle_timeout = self
            .defaults
            .pool
            .idle_timeout
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);
        if idle_timeout.is_zero() {
            errors.push(format!(
                "{}: must be more than 0, got 0",
                at("defaults.pool.idle_timeout")
            ));
        }

        let mut services = BTreeMap::new();
        for (name, raw) in self.services {
            let file = self
                .origin
                .services
                .get(&name)
                .map_or(source, |s| if s.is_empty() { source } else { s.as_str() });
            let field = format!("services.{name}");
            if !is_service_name(&name) {
                errors.push(format!(
                    "{file}: {field}: a service name is letters, digits, '-', '_' and '.', got {name:?}"
                ));
            }
            if raw.endpoints.is_empty() {
                errors.push(format!(
                    "{file}: {field}.endpoints: must list at least one endpoint"
                ));
            }
            let mut endpoints = Vec::with_capacity(raw.endpoints.len());
            for (i, e) in raw.endpoints.iter().enumerate() {
                match Upstream::parse_endpoint(e) {
                    Ok(u) => endpoints.push(u),
                    Err(why) => {
                        errors.push(format!("{file}: {field}.endpoints[{i}]: {why}, got {e:?}"))
                    }
                }
            }
            let request_timeout = raw.timeouts.request.unwrap_or(timeouts.request);
            if request_timeout.is_zero() {
                errors.push(format!(
                    "{file}: {field}.timeouts.request: must be more than 0, got 0"
                ));
            }
            services.insert(
                name,
                ServicePolicy {
                    endpoints,
                    request_timeout,
                },
            );
        }

        let dispatch_file = self
            .origin
            .dispatch
            .clone()
            .unwrap_or_else(|| source.to_string());
        let dispatch = match self.dispatch {
            Some(d) => match d.validate(&dispatch_file, "dispatch.") {
                Ok(rules) => Some(rules),
                Err(mut e) => {
                    errors.append(&mut e.errors);
                    None
                }
            },
            None => None,
        };

        if !errors.is_empty() {
            return Err(PolicyErrors { errors });
        }
        Ok(Policy {
            source: source.to_string(),
            listeners: Listeners { egress, workers },
            upstream: UpstreamSettings {
                timeouts,
                idle_timeout,
                max_connections: self.defaults.pool.max_connections.unwrap_or(0),
            },
            services,
            dispatch,
        })
    }
}

fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
