//! The serde mirror of a policy file, exactly as operators write it, and its validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::errors::Issue;
use super::http::{EncodedSlashes, PathOptions, UnderscoreAction};
use super::seed::RawDispatch;
use super::traffic::{
    RawBalancer, RawBreaker, RawConcurrency, RawOutliers, RawRateLimit, RawResilience, RawRetries,
};
use super::{
    AllowRule, Discovery, DiscoverySource, HealthCheck, Inbound, Listeners, Mesh, Policy,
    ServicePolicy, Timeouts, UpstreamSettings, duration, units,
};
use crate::access_log::AccessLogPolicy;
use crate::upstream::Upstream;

const DEFAULT_EGRESS: &str = "127.0.0.1:5000";
const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
const DEFAULT_MAX_HEADER_SIZE: u64 = 64 << 10;
/// The HTTP codec refuses heads over 128 KiB before the sidecar sees them.
const MAX_HEADER_SIZE_LIMIT: u64 = 128 << 10;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// actix-web's own default for a request head (`client_request_timeout`).
const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[serde(default)]
    access_log: Option<RawAccessLog>,
    #[serde(default)]
    dns: Option<RawDns>,
    #[serde(default)]
    mesh: Option<RawMesh>,
    #[serde(default)]
    egress: Option<super::egress::RawEgress>,
    #[serde(default)]
    fanout: BTreeMap<String, super::fanout::RawGroup>,
    /// Which file each top-level part came from, for "defined twice" messages.
    #[serde(skip)]
    origin: Origins,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    enabled: Option<bool>,
    sample: Option<String>,
    query: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    trust_domain: Option<String>,
    identity: Option<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    tls12: Option<bool>,
    headers_with_underscores: Option<String>,
    inbound: Option<RawInbound>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    listen: Option<String>,
    app: Option<String>,
    #[serde(default, with = "duration::serde_opt")]
    request_timeout: Option<Duration>,
    authorization: Option<Vec<RawAllow>>,
    rate_limit: Option<super::traffic::RawRateLimit>,
    concurrency: Option<super::traffic::RawConcurrency>,
    paths: Option<RawPaths>,
}

/// `mesh.inbound.paths`: how request paths are normalized before authorization.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    merge_slashes: Option<bool>,
    encoded_slashes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    nameservers: Vec<String>,
}

/// Where a service's endpoints come from besides `endpoints`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    dns: Option<String>,
    port: Option<u16>,
    srv: Option<String>,
    hosts_file: Option<String>,
    #[serde(default, with = "duration::serde_opt")]
    min_ttl: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    max_ttl: Option<Duration>,
}

#[derive(Debug, Default)]
struct Origins {
    access_log: Option<String>,
    dns: Option<String>,
    mesh: Option<String>,
    egress: Option<String>,
    file: String,
    services: BTreeMap<String, String>,
    fanout: BTreeMap<String, String>,
    dispatch: Option<String>,
    listeners: Option<String>,
    defaults: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners {
    egress: Option<String>,
    admin: Option<String>,
    workers: Option<usize>,
    #[serde(default, with = "units::serde_size")]
    max_header_size: Option<u64>,
    #[serde(default, with = "duration::serde_opt")]
    drain_timeout: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    head_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    pool: RawPool,
    retries: Option<RawRetries>,
    circuit_breaker: Option<RawBreaker>,
    concurrency: Option<RawConcurrency>,
    rate_limit: Option<RawRateLimit>,
    load_balancer: Option<RawBalancer>,
    outlier_detection: Option<RawOutliers>,
}

impl RawDefaults {
    fn resilience(&self) -> RawResilience {
        RawResilience {
            per_try: self.timeouts.per_try,
            retries: self.retries.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            concurrency: self.concurrency.clone(),
            rate_limit: self.rate_limit.clone(),
            load_balancer: self.load_balancer.clone(),
            outlier_detection: self.outlier_detection.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default, with = "duration::serde_opt")]
    connect: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    request: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    per_try: Option<Duration>,
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
    retries: Option<RawRetries>,
    circuit_breaker: Option<RawBreaker>,
    concurrency: Option<RawConcurrency>,
    rate_limit: Option<RawRateLimit>,
    load_balancer: Option<RawBalancer>,
    outlier_detection: Option<RawOutliers>,
    discovery: Option<RawDiscovery>,
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    mesh: bool,
    #[serde(default)]
    shadow: Vec<super::copies::RawCopy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: Option<String>,
    #[serde(default, with = "duration::serde_opt")]
    interval: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    timeout: Option<Duration>,
    healthy_threshold: Option<u32>,
    unhealthy_threshold: Option<u32>,
}

impl RawService {
    fn resilience(&self) -> RawResilience {
        RawResilience {
            per_try: self.timeouts.per_try,
            retries: self.retries.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            concurrency: self.concurrency.clone(),
            rate_limit: self.rate_limit.clone(),
            load_balancer: self.load_balancer.clone(),
            outlier_detection: self.outlier_detection.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceTimeouts {
    #[serde(default, with = "duration::serde_opt")]
    request: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    per_try: Option<Duration>,
}

impl RawPolicy {
    pub(super) fn set_origin(&mut self, file: &str) {
        self.origin.file = file.to_string();
        self.origin.services = self
            .services
            .keys()
            .map(|k| (k.clone(), file.to_string()))
            .collect();
        self.origin.fanout = self
            .fanout
            .keys()
            .map(|k| (k.clone(), file.to_string()))
            .collect();
        self.origin.dispatch = self.dispatch.as_ref().map(|_| file.to_string());
        self.origin.access_log = self.access_log.as_ref().map(|_| file.to_string());
        self.origin.dns = self.dns.as_ref().map(|_| file.to_string());
        self.origin.mesh = self.mesh.as_ref().map(|_| file.to_string());
        self.origin.egress = self.egress.as_ref().map(|_| file.to_string());
        let l = &self.listeners;
        let listeners_set = l.egress.is_some()
            || l.admin.is_some()
            || l.workers.is_some()
            || l.max_header_size.is_some()
            || l.drain_timeout.is_some()
            || l.head_timeout.is_some();
        self.origin.listeners = listeners_set.then(|| file.to_string());
        let d = &self.defaults;
        let defaults_set = d.timeouts.connect.is_some()
            || d.timeouts.request.is_some()
            || d.resilience().is_set()
            || d.pool.idle_timeout.is_some()
            || d.pool.max_connections.is_some();
        self.origin.defaults = defaults_set.then(|| file.to_string());
    }

    /// Merges another file into this one. A name defined in both is an error naming both files.
    pub(super) fn merge(&mut self, other: RawPolicy) -> Result<(), Vec<Issue>> {
        let mut issues = Vec::new();
        let o = other.origin;
        take_once(
            "listeners",
            (&mut self.listeners, &mut self.origin.listeners),
            (other.listeners, o.listeners),
            &mut issues,
        );
        take_once(
            "defaults",
            (&mut self.defaults, &mut self.origin.defaults),
            (other.defaults, o.defaults),
            &mut issues,
        );
        take_once(
            "access_log",
            (&mut self.access_log, &mut self.origin.access_log),
            (other.access_log, o.access_log),
            &mut issues,
        );
        take_once(
            "mesh",
            (&mut self.mesh, &mut self.origin.mesh),
            (other.mesh, o.mesh),
            &mut issues,
        );
        take_once(
            "egress",
            (&mut self.egress, &mut self.origin.egress),
            (other.egress, o.egress),
            &mut issues,
        );
        take_once(
            "dns",
            (&mut self.dns, &mut self.origin.dns),
            (other.dns, o.dns),
            &mut issues,
        );
        take_once(
            "dispatch",
            (&mut self.dispatch, &mut self.origin.dispatch),
            (other.dispatch, o.dispatch),
            &mut issues,
        );
        for (name, service) in other.services {
            let b = o.services.get(&name).cloned().unwrap_or_default();
            if let Some(a) = self.origin.services.get(&name) {
                issues.push(twice(&format!("services.{name}"), a, &b));
                continue;
            }
            self.origin.services.insert(name.clone(), b);
            self.services.insert(name, service);
        }
        for (name, group) in other.fanout {
            let b = o.fanout.get(&name).cloned().unwrap_or_default();
            if let Some(a) = self.origin.fanout.get(&name) {
                issues.push(twice(&format!("fanout.{name}"), a, &b));
                continue;
            }
            self.origin.fanout.insert(name.clone(), b);
            self.fanout.insert(name, group);
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }

    pub(super) fn validate(self, source: &str) -> Result<Policy, Vec<Issue>> {
        let mut issues = Vec::new();
        let file_of =
            |origin: &Option<String>| origin.clone().unwrap_or_else(|| source.to_string());
        let listeners_file = file_of(&self.origin.listeners);
        let defaults_file = file_of(&self.origin.defaults);

        let address = |field: &str, text: Option<&str>, default: &str, issues: &mut Vec<Issue>| {
            let text = text.unwrap_or(default);
            text.parse::<SocketAddr>().unwrap_or_else(|_| {
                issues.push(Issue::new(
                    &listeners_file,
                    field,
                    format!("must be an address such as 127.0.0.1:5000, got {text:?}"),
                ));
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let egress = address(
            "listeners.egress",
            self.listeners.egress.as_deref(),
            DEFAULT_EGRESS,
            &mut issues,
        );
        let admin = address(
            "listeners.admin",
            self.listeners.admin.as_deref(),
            DEFAULT_ADMIN,
            &mut issues,
        );
        let workers = self.listeners.workers.unwrap_or(1);
        if workers == 0 || workers > 256 {
            issues.push(Issue::new(
                &listeners_file,
                "listeners.workers",
                format!("must be between 1 and 256, got {workers}"),
            ));
        }
        let max_header_size = self
            .listeners
            .max_header_size
            .unwrap_or(DEFAULT_MAX_HEADER_SIZE);
        if !(1024..=MAX_HEADER_SIZE_LIMIT).contains(&max_header_size) {
            issues.push(Issue::new(
                &listeners_file,
                "listeners.max_header_size",
                format!(
                    "must be between 1KiB and {}, got {}",
                    units::format_size(MAX_HEADER_SIZE_LIMIT),
                    units::format_size(max_header_size)
                ),
            ));
        }
        let head_timeout = self.listeners.head_timeout.unwrap_or(DEFAULT_HEAD_TIMEOUT);
        if head_timeout.is_zero() {
            issues.push(Issue::new(
                &listeners_file,
                "listeners.head_timeout",
                "must be more than 0, got 0",
            ));
        }

        let t = &self.defaults.timeouts;
        let timeouts = Timeouts {
            connect: t.connect.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            request: t.request.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        };
        let idle_timeout = self
            .defaults
            .pool
            .idle_timeout
            .unwrap_or(DEFAULT_IDLE_TIMEOUT);
        for (field, value) in [
            ("defaults.timeouts.connect", timeouts.connect),
            ("defaults.timeouts.request", timeouts.request),
            ("defaults.pool.idle_timeout", idle_timeout),
        ] {
            if value.is_zero() {
                issues.push(Issue::new(
                    &defaults_file,
                    field,
                    "must be more than 0, got 0",
                ));
            }
        }

        let default_resilience = self.defaults.resilience();
        let before = issues.len();
        let resilience = default_resilience.validate(&defaults_file, "defaults", &mut issues);
        let default_issues: Vec<(String, String)> = issues[before..]
            .iter()
            .map(|i| {
                let path = i.path.strip_prefix("defaults.").unwrap_or(&i.path);
                (path.to_string(), i.message.clone())
            })
            .collect();

        let mut services = BTreeMap::new();
        let mut shadow = super::ShadowPolicy::default();
        let mut copies_at = Vec::new();
        for (name, raw) in self.services {
            let file = self
                .origin
                .services
                .get(&name)
                .filter(|s| !s.is_empty())
                .cloned()
                .unwrap_or_else(|| source.to_string());
            let field = format!("services.{name}");
            if !is_service_name(&name) {
                issues.push(Issue::new(
                    &file,
                    &field,
                    format!("a service name is letters, digits, '-', '_' and '.', got {name:?}"),
                ));
            }
            let discovery = raw
                .discovery
                .as_ref()
                .and_then(|d| validate_discovery(d, &file, &field, &mut issues));
            let health_check = raw
                .health_check
                .as_ref()
                .and_then(|h| validate_health_check(h, &file, &field, &mut issues));
            if raw.endpoints.is_empty() && raw.discovery.is_none() {
                issues.push(Issue::new(
                    &file,
                    format!("{field}.endpoints"),
                    "must list at least one endpoint, or name a `discovery` source",
                ));
            }
            let mut endpoints = Vec::with_capacity(raw.endpoints.len());
            if raw.mesh && self.mesh.is_none() {
                issues.push(Issue::new(
                    &file,
                    format!("{field}.mesh"),
                    "needs the top-level `mesh` section (this sidecar's identity and certificates)",
                ));
            }
            for (i, e) in raw.endpoints.iter().enumerate() {
                match Upstream::parse_endpoint(e) {
                    Ok(u) if raw.mesh => endpoints.push(u.into_https()),
                    Ok(u) => endpoints.push(u),
                    Err(why) => issues.push(Issue::new(
                        &file,
                        format!("{field}.endpoints[{i}]"),
                        format!("{why}, got {e:?}"),
                    )),
                }
            }
            let request_timeout = raw.timeouts.request.unwrap_or(timeouts.request);
            if request_timeout.is_zero() {
                issues.push(Issue::new(
                    &file,
                    format!("{field}.timeouts.request"),
                    "must be more than 0, got 0",
                ));
            }
            let field_shadow = format!("{field}.shadow");
            if let Some(c) = super::copies::validate(&raw.shadow, &file, &field_shadow, &mut issues)
            {
                copies_at.push((c.clone(), file.clone(), field_shadow));
                shadow.services.insert(name.clone(), c);
            }
            let own = raw.resilience();
            let service_resilience = if own.is_set() {
                let mut found = Vec::new();
                let r = own
                    .over(&default_resilience)
                    .validate(&file, &field, &mut found);
                // A bad value inherited from `defaults` is reported there, once.
                let prefix = format!("{field}.");
                found.retain(|i| {
                    let suffix = i.path.strip_prefix(&prefix).unwrap_or(&i.path);
                    !default_issues
                        .iter()
                        .any(|(p, m): &(String, String)| p == suffix && *m == i.message)
                });
                issues.append(&mut found);
                r
            } else {
                resilience.clone()
            };
            services.insert(
                name,
                ServicePolicy {
                    endpoints,
                    request_timeout,
                    resilience: service_resilience,
                    discovery,
                    health_check,
                    mesh: raw.mesh,
                },
            );
        }

        let mut access_log = AccessLogPolicy::default();
        if let Some(raw) = &self.access_log {
            let file = file_of(&self.origin.access_log);
            // Writing the section turns the log on unless it says `enabled: false`.
            access_log.enabled = raw.enabled.unwrap_or(true);
            access_log.query = raw.query.unwrap_or(false);
            if let Some(text) = &raw.sample {
                match units::Percent::parse(text) {
                    Ok(p) => access_log.sample = p.fraction(),
                    Err(why) => issues.push(Issue::new(&file, "access_log.sample", why)),
                }
            }
        }

        let mut nameservers = Vec::new();
        if let Some(dns) = &self.dns {
            let file = file_of(&self.origin.dns);
            for (i, text) in dns.nameservers.iter().enumerate() {
                let parsed = text.parse::<SocketAddr>().or_else(|_| {
                    text.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match parsed {
                    Ok(addr) => nameservers.push(addr),
                    Err(_) => issues.push(Issue::new(
                        &file,
                        format!("dns.nameservers[{i}]"),
                        format!("must be an IP address, with a port or not (127.0.0.1:5353), got {text:?}"),
                    )),
                }
            }
        }

        let mesh = self.mesh.as_ref().and_then(|m| {
            validate_mesh(
                m,
                &file_of(&self.origin.mesh),
                timeouts.request,
                &mut issues,
            )
        });

        let egress_policy = match &self.egress {
            Some(raw) => super::egress::validate(raw).unwrap_or_else(|problems| {
                let file = file_of(&self.origin.egress);
                issues.extend(
                    problems
                        .into_iter()
                        .map(|(field, why)| Issue::new(&file, field, why)),
                );
                super::egress::Egress::default()
            }),
            None => super::egress::Egress::default(),
        };

        if let Some(raw) = &self.egress {
            let file = file_of(&self.origin.egress);
            for (url, list) in &raw.shadow {
                let field = format!("egress.shadow.{url}");
                let Ok(u) = Upstream::parse(url) else {
                    issues.push(Issue::new(
                        &file,
                        &field,
                        format!("the key must be a target's http(s) URL, such as http://api.example.com, got {url:?}"),
                    ));
                    continue;
                };
                if let Some(c) = super::copies::validate(list, &file, &field, &mut issues) {
                    let a = u.authority();
                    let port = a.port_u16().unwrap_or(if u.is_https() { 443 } else { 80 });
                    let host = a.host().to_ascii_lowercase();
                    if shadow.urls.iter().any(|(h, p, _)| *h == host && *p == port) {
                        issues.push(Issue::new(
                            &file,
                            &field,
                            format!("{host}:{port} is listed twice"),
                        ));
                    }
                    copies_at.push((c.clone(), file.clone(), field));
                    shadow.urls.push((host, port, c));
                }
            }
        }

        let dispatch = match self.dispatch {
            Some(d) => match d.validate(&file_of(&self.origin.dispatch), "dispatch.") {
                Ok(rules) => Some(rules),
                Err(mut e) => {
                    issues.append(&mut e);
                    None
                }
            },
            None => None,
        };
        if let Some(rules) = &dispatch {
            let file = file_of(&self.origin.dispatch);
            if let Some(c) = &rules.default.copies {
                copies_at.push((c.clone(), file.clone(), "dispatch.shadow".to_string()));
            }
            let mut values: Vec<_> = rules.rewrites.iter().collect();
            values.sort_by(|a, b| a.0.cmp(b.0));
            for (value, rewrite) in values {
                if let Some(c) = &rewrite.copies
                    && !rules
                        .default
                        .copies
                        .as_ref()
                        .is_some_and(|d| Arc::ptr_eq(d, c))
                {
                    let field = format!(
                        "dispatch.rewrites.{}.shadow",
                        String::from_utf8_lossy(value)
                    );
                    copies_at.push((c.clone(), file.clone(), field));
                }
            }
        }
        for (c, file, field) in &copies_at {
            let mesh = |s: &str| services.get(s).map(|p: &ServicePolicy| p.mesh);
            super::copies::unknown_services(c, mesh, file, field, &mut issues);
        }
        let fanout = super::fanout::validate(
            self.fanout,
            |group| {
                self.origin
                    .fanout
                    .get(group)
                    .filter(|f| !f.is_empty())
                    .cloned()
                    .unwrap_or_else(|| source.to_string())
            },
            |s| services.get(s).map(|_| ()),
            &mut issues,
        );

        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Policy {
            source: source.to_string(),
            files: Vec::new(),
            hash: 0,
            listeners: Listeners {
                egress,
                admin,
                workers,
                max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
                drain_timeout: self
                    .listeners
                    .drain_timeout
                    .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
                head_timeout,
            },
            upstream: UpstreamSettings {
                timeouts,
                idle_timeout,
                max_connections: self.defaults.pool.max_connections.unwrap_or(0),
                resilience,
            },
            services,
            dispatch,
            access_log,
            nameservers,
            mesh,
            egress: egress_policy,
            shadow,
            fanout: std::sync::Arc::new(fanout),
        })
    }
}

fn twice(what: &str, a: &str, b: &str) -> Issue {
    Issue::new(b, what, format!("defined twice: in {a} and in {b}"))
}

/// Takes a section from a later file unless an earlier file defined it, which is an error naming both.
fn take_once<T>(
    what: &str,
    (mine, mine_from): (&mut T, &mut Option<String>),
    (theirs, theirs_from): (T, Option<String>),
    issues: &mut Vec<Issue>,
) {
    match (mine_from.as_deref(), theirs_from) {
        (Some(a), Some(b)) => issues.push(twice(what, a, &b)),
        (None, Some(b)) => {
            *mine = theirs;
            *mine_from = Some(b);
        }
        (_, None) => {}
    }
}

fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_discovery(
    raw: &RawDiscovery,
    file: &str,
    field: &str,
    issues: &mut Vec<Issue>,
) -> Option<Discovery> {
    let at = |key: &str| format!("{field}.discovery.{key}");
    let sources = [
        raw.dns.is_some(),
        raw.srv.is_some(),
        raw.hosts_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        issues.push(Issue::new(
            file,
            format!("{field}.discovery"),
            "name exactly one source: `dns` (with `port`), `srv` or `hosts_file`",
        ));
        return None;
    }
    let min_ttl = raw.min_ttl.unwrap_or(Duration::from_secs(1));
    let max_ttl = raw.max_ttl.unwrap_or(Duration::from_secs(60)).max(min_ttl);
    if min_ttl.is_zero() {
        issues.push(Issue::new(
            file,
            at("min_ttl"),
            "must be more than 0, got 0",
        ));
    }
    let source = if let Some(name) = &raw.dns {
        let Some(port) = raw.port.filter(|p| *p > 0) else {
            issues.push(Issue::new(
                file,
                at("port"),
                "is required with `dns`: the port the A/AAAA records' addresses serve on",
            ));
            return None;
        };
        DiscoverySource::Dns {
            name: name.trim().to_string(),
            port,
        }
    } else if let Some(name) = &raw.srv {
        DiscoverySource::Srv {
            name: name.trim().to_string(),
        }
    } else {
        DiscoverySource::HostsFile {
            path: raw.hosts_file.clone().unwrap_or_default().into(),
        }
    };
    if let DiscoverySource::Dns { name, .. } | DiscoverySource::Srv { name } = &source
        && (name.is_empty() || name.contains(char::is_whitespace))
    {
        issues.push(Issue::new(
            file,
            at(if raw.dns.is_some() { "dns" } else { "srv" }),
            format!("must be a DNS name, got {name:?}"),
        ));
    }
    Some(Discovery {
        source,
        min_ttl,
        max_ttl,
    })
}

fn validate_health_check(
    raw: &RawHealthCheck,
    file: &str,
    field: &str,
    issues: &mut Vec<Issue>,
) -> Option<HealthCheck> {
    let at = |key: &str| format!("{field}.health_check.{key}");
    let text = raw.path.as_deref().unwrap_or("/healthz");
    let path = match text.parse::<actix_http::Uri>() {
        Ok(uri) if text.starts_with('/') => uri,
        _ => {
            issues.push(Issue::new(
                file,
                at("path"),
                format!("must be a path such as /healthz, got {text:?}"),
            ));
            return None;
        }
    };
    let interval = raw.interval.unwrap_or(Duration::from_secs(5));
    let timeout = raw.timeout.unwrap_or(Duration::from_secs(1));
    for (key, value) in [("interval", interval), ("timeout", timeout)] {
        if value.is_zero() {
            issues.push(Issue::new(file, at(key), "must be more than 0, got 0"));
        }
    }
    let healthy_threshold = raw.healthy_threshold.unwrap_or(2);
    let unhealthy_threshold = raw.unhealthy_threshold.unwrap_or(3);
    for (key, value) in [
        ("healthy_threshold", healthy_threshold),
        ("unhealthy_threshold", unhealthy_threshold),
    ] {
        if value == 0 {
            issues.push(Issue::new(file, at(key), "must be at least 1, got 0"));
        }
    }
    Some(HealthCheck {
        path,
        interval,
        timeout,
        healthy_threshold: healthy_threshold.max(1),
        unhealthy_threshold: unhealthy_threshold.max(1),
    })
}

fn validate_mesh(
    raw: &RawMesh,
    file: &str,
    request_timeout: Duration,
    issues: &mut Vec<Issue>,
) -> Option<Mesh> {
    let mut required = |key: &str, value: &Option<String>| -> String {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => {
                issues.push(Issue::new(file, format!("mesh.{key}"), "is required"));
                String::new()
            }
        }
    };
    let identity = required("identity", &raw.identity);
    let ca = required("ca", &raw.ca);
    let cert = required("cert", &raw.cert);
    let key = required("key", &raw.key);
    let trust_domain = raw
        .trust_domain
        .clone()
        .unwrap_or_else(|| "mesh.local".to_string());
    if !identity.is_empty() && !is_service_name(&identity) {
        issues.push(Issue::new(
            file,
            "mesh.identity",
            format!("a service name is letters, digits, '-', '_' and '.', got {identity:?}"),
        ));
    }
    let inbound = match &raw.inbound {
        None => None,
        Some(i) => {
            let listen = i.listen.as_deref().unwrap_or("0.0.0.0:5443");
            let listen = match listen.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    issues.push(Issue::new(
                        file,
                        "mesh.inbound.listen",
                        format!("must be an address such as 0.0.0.0:5443, got {listen:?}"),
                    ));
                    return None;
                }
            };
            let app_text = i.app.as_deref().unwrap_or("127.0.0.1:8080");
            let app = match Upstream::parse_endpoint(app_text) {
                Ok(u) => u,
                Err(why) => {
                    issues.push(Issue::new(
                        file,
                        "mesh.inbound.app",
                        format!("{why}, got {app_text:?}"),
                    ));
                    return None;
                }
            };
            let authorization = i.authorization.as_ref().map(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .map(|(n, r)| {
                        if r.from.is_empty() {
                            issues.push(Issue::new(
                                file,
                                format!("mesh.inbound.authorization[{n}].from"),
                                "must name at least one peer (a service, a spiffe:// id, or `*`)",
                            ));
                        }
                        for (k, p) in r.paths.iter().enumerate() {
                            if !p.starts_with('/') {
                                issues.push(Issue::new(
                                    file,
                                    format!("mesh.inbound.authorization[{n}].paths[{k}]"),
                                    format!("must start with '/', got {p:?}"),
                                ));
                            }
                        }
                        AllowRule {
                            from: r
                                .from
                                .iter()
                                .map(|f| {
                                    if f == "*" || f.starts_with("spiffe://") {
                                        f.clone()
                                    } else {
                                        crate::certs::spiffe_id(&trust_domain, f)
                                    }
                                })
                                .collect(),
                            methods: r.methods.clone(),
                            paths: r.paths.clone(),
                        }
                    })
                    .collect()
            });
            let (rate_limit, concurrency) = super::traffic::validate_inbound_limits(
                i.rate_limit.as_ref(),
                i.concurrency.as_ref(),
                &mut |field, why| {
                    issues.push(Issue::new(file, format!("mesh.inbound.{field}"), why));
                },
            );
            let paths = i.paths.as_ref().map_or_else(PathOptions::default, |p| {
                let encoded_slashes = match p.encoded_slashes.as_deref() {
                    None | Some("reject") => EncodedSlashes::Reject,
                    Some("allow") => EncodedSlashes::Allow,
                    Some(other) => {
                        issues.push(Issue::new(
                            file,
                            "mesh.inbound.paths.encoded_slashes",
                            format!("must be reject or allow, got {other:?}"),
                        ));
                        EncodedSlashes::Reject
                    }
                };
                PathOptions {
                    merge_slashes: p.merge_slashes.unwrap_or(false),
                    encoded_slashes,
                }
            });
            Some(Inbound {
                listen,
                app,
                request_timeout: i.request_timeout.unwrap_or(request_timeout),
                authorization,
                rate_limit,
                concurrency,
                paths,
            })
        }
    };
    let headers_with_underscores = match raw.headers_with_underscores.as_deref() {
        None | Some("drop") => UnderscoreAction::Drop,
        Some("reject") => UnderscoreAction::Reject,
        Some("allow") => UnderscoreAction::Allow,
        Some(other) => {
            issues.push(Issue::new(
                file,
                "mesh.headers_with_underscores",
                format!("must be drop, reject or allow, got {other:?}"),
            ));
            UnderscoreAction::Drop
        }
    };
    if identity.is_empty() || ca.is_empty() || cert.is_empty() || key.is_empty() {
        return None;
    }
    Some(Mesh {
        trust_domain,
        identity,
        ca: ca.into(),
        cert: cert.into(),
        key: key.into(),
        tls12: raw.tls12.unwrap_or(false),
        headers_with_underscores,
        inbound,
    })
}
