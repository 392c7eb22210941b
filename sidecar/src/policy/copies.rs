//! Traffic copies as written: the `shadow` lists of a service, of the dispatch rules (the top level and each
//! rewrite) and of a URL target's authority (`egress.shadow`).
//!
//! Owns: the serde mirror of a copy and its checks, turning it into a [`Copy`]. Does not own: sampling and
//! teeing the body ([`crate::dispatch::shadow`]) or sending copies ([`crate::control::shadow`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_http::Method;
use actix_http::header::HeaderName;
use serde::Deserialize;

use super::duration;
use super::errors::Issue;
use super::units;
use crate::upstream::Upstream;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_CONCURRENCY: usize = 32;
const DEFAULT_BUFFER: u64 = 1 << 20;
const MAX_BUFFER: u64 = 64 << 20;
/// Copies per target: each is a request of its own.
const MAX_COPIES: usize = 8;

/// One copy as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCopy {
    to: Option<String>,
    name: Option<String>,
    sample: Option<String>,
    key: Option<String>,
    methods: Option<Vec<String>>,
    #[serde(default, with = "duration::serde_opt")]
    timeout: Option<Duration>,
    max_concurrency: Option<usize>,
    #[serde(default, with = "units::serde_size")]
    buffer: Option<u64>,
    host_suffix: Option<bool>,
    compare: Option<bool>,
}

/// Where a copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyTo {
    /// A service of the registry: one of its endpoints, chosen by its balancer.
    Service(Arc<str>),
    /// One upstream, by URL.
    Url(Arc<Upstream>),
}

/// Which methods are copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Methods {
    Any,
    Only(Vec<Method>),
}

impl Methods {
    pub fn allows(&self, method: &Method) -> bool {
        match self {
            Methods::Any => true,
            Methods::Only(list) => list.contains(method),
        }
    }
}

/// A validated copy: where it goes, which requests it takes, and what it may spend.
#[derive(Debug)]
pub struct Copy {
    /// The metrics label and the access log's name for it: `name`, or the destination as written.
    pub name: Arc<str>,
    pub to: CopyTo,
    /// The share of requests copied, in [0, 1].
    pub sample: f64,
    /// Sample by this header's value instead of at random: every request with the same value is copied or not
    /// (a `traceparent` is read for its trace id, so one trace is copied whole).
    pub key: Option<HeaderName>,
    pub methods: Methods,
    /// The copy's own limit, from hand-off to the end of its response body.
    pub timeout: Duration,
    /// Copies of this entry in flight at once; past it a copy is dropped.
    pub max_concurrency: usize,
    /// Body bytes queued for the copy while the primary streams; past it the copy is abandoned.
    pub buffer: usize,
    /// `Host` gets `-shadow` after its name (before the port); IP literals are left alone.
    pub host_suffix: bool,
    /// Count copies whose status class differs from the primary's.
    pub compare: bool,
    /// The copy's metric handles, made on first use in its sidecar's recorder.
    pub counters: OnceLock<crate::telemetry::CopyCounters>,
    /// What the request path reads of the copy's state, kept by the shadow actor.
    pub gate: Gate,
}

/// A copy's state as the request path sees it, written by the shadow actor: the copies in flight, and until
/// when the copy's breaker refuses. A copy that the actor would drop is dropped before it is handed off, so a
/// dead or hanging copy costs a request two atomic loads, not a hand-off and a wake-up of the actor's thread.
/// The actor still decides: these are read without ordering and may be a moment stale.
#[derive(Debug)]
pub struct Gate {
    base: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds past `base` until which the breaker refuses; 0 when it does not.
    refused_until: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            refused_until: AtomicU64::new(0),
        }
    }
}

impl Gate {
    /// Whether `max` copies are in flight.
    pub fn full(&self, max: usize) -> bool {
        self.in_flight.load(Ordering::Relaxed) >= max
    }

    /// Whether the breaker refuses at `now`.
    pub fn refusing(&self, now: Instant) -> bool {
        let until = self.refused_until.load(Ordering::Relaxed);
        until != 0 && self.nanos(now) < until
    }

    /// The breaker refuses until `at`.
    pub fn refuse_until(&self, at: Instant) {
        self.refused_until
            .store(self.nanos(at).max(1), Ordering::Relaxed);
    }

    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl PartialEq for Copy {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.to == o.to
            && self.sample.to_bits() == o.sample.to_bits()
            && self.key == o.key
            && self.methods == o.methods
            && self.timeout == o.timeout
            && self.max_concurrency == o.max_concurrency
            && self.buffer == o.buffer
            && self.host_suffix == o.host_suffix
            && self.compare == o.compare
    }
}

/// A target's copies, in the order written; shared by every request that routes there.
pub type Copies = Arc<[Arc<Copy>]>;

/// Checks a `shadow` list at `field`. Service destinations are checked against the registry by the caller
/// ([`unknown_services`]).
pub(super) fn validate(
    raw: &[RawCopy],
    file: &str,
    field: &str,
    issues: &mut Vec<Issue>,
) -> Option<Copies> {
    if raw.is_empty() {
        return None;
    }
    if raw.len() > MAX_COPIES {
        issues.push(Issue::new(
            file,
            field,
            format!("at most {MAX_COPIES} copies, got {}", raw.len()),
        ));
    }
    let mut copies = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let at = |k: &str| format!("{field}[{i}].{k}");
        let to = match c.to.as_deref().map(str::trim) {
            None | Some("") => {
                issues.push(Issue::new(
                    file,
                    at("to"),
                    "required: a service of the registry, or an http(s) URL",
                ));
                continue;
            }
            Some(text) if text.contains("://") => match Upstream::parse(text) {
                Ok(u) => CopyTo::Url(Arc::new(u)),
                Err(why) => {
                    issues.push(Issue::new(file, at("to"), format!("{why}, got {text:?}")));
                    continue;
                }
            },
            Some(text) => CopyTo::Service(Arc::from(text)),
        };
        let sample = match c.sample.as_deref() {
            None => 1.0,
            Some(text) => match units::Percent::parse(text) {
                Ok(p) => p.fraction(),
                Err(why) => {
                    issues.push(Issue::new(file, at("sample"), why));
                    0.0
                }
            },
        };
        let key = c.key.as_deref().and_then(|k| {
            HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|_| {
                    issues.push(Issue::new(
                        file,
                        at("key"),
                        format!("not a valid header name, got {k:?}"),
                    ));
                })
                .ok()
        });
        let methods = match &c.methods {
            None => Methods::Only(vec![Method::GET, Method::HEAD, Method::OPTIONS]),
            Some(list) if list.iter().any(|m| m.trim() == "*") => Methods::Any,
            Some(list) => {
                let mut methods = Vec::with_capacity(list.len());
                for (j, m) in list.iter().enumerate() {
                    match Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()) {
                        Ok(m) => methods.push(m),
                        Err(_) => issues.push(Issue::new(
                            file,
                            format!("{field}[{i}].methods[{j}]"),
                            format!("not an HTTP method, got {m:?}"),
                        )),
                    }
                }
                Methods::Only(methods)
            }
        };
        let timeout = c.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            issues.push(Issue::new(
                file,
                at("timeout"),
                "must be more than 0, got 0",
            ));
        }
        let max_concurrency = c.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
        if max_concurrency == 0 {
            issues.push(Issue::new(
                file,
                at("max_concurrency"),
                "must be at least 1, got 0",
            ));
        }
        let buffer = c.buffer.unwrap_or(DEFAULT_BUFFER);
        if !(1024..=MAX_BUFFER).contains(&buffer) {
            issues.push(Issue::new(
                file,
                at("buffer"),
                format!(
                    "must be between 1KiB and {}, got {}",
                    units::format_size(MAX_BUFFER),
                    units::format_size(buffer)
                ),
            ));
        }
        let name = match c.name.as_deref().map(str::trim) {
            Some("") => {
                issues.push(Issue::new(file, at("name"), "must not be empty"));
                continue;
            }
            Some(n) => Arc::from(n),
            None => Arc::from(c.to.as_deref().unwrap_or_default().trim()),
        };
        copies.push(Arc::new(Copy {
            name,
            to,
            sample,
            key,
            methods,
            timeout,
            max_concurrency,
            buffer: usize::try_from(buffer).unwrap_or(usize::MAX),
            host_suffix: c.host_suffix.unwrap_or(false),
            compare: c.compare.unwrap_or(false),
            counters: OnceLock::new(),
            gate: Gate::default(),
        }));
    }
    Some(copies.into())
}

/// Issues for copies that name a service the registry lacks, or a mesh service; `mesh` says whether a service
/// is one (`None`: no such service).
pub(super) fn unknown_services(
    copies: &Copies,
    mesh: impl Fn(&str) -> Option<bool>,
    file: &str,
    field: &str,
    issues: &mut Vec<Issue>,
) {
    for (i, c) in copies.iter().enumerate() {
        let CopyTo::Service(s) = &c.to else { continue };
        let why = match mesh(s) {
            None => {
                format!("no service {s:?} in the registry (a URL needs its scheme: http://...)")
            }
            Some(true) => format!(
                "{s:?} is a mesh service: copies are sent without mTLS, so they cannot go there"
            ),
            Some(false) => continue,
        };
        issues.push(Issue::new(file, format!("{field}[{i}].to"), why));
    }
}

/// Two lists of copies are the same policy.
pub fn same(a: &Option<Copies>, b: &Option<Copies>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| **x == **y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;

    #[test]
    fn a_gate_refuses_until_the_breakers_instant_and_counts_what_is_in_flight() {
        let gate = super::Gate::default();
        let now = std::time::Instant::now();
        assert!(!gate.refusing(now), "a new gate lets copies through");
        gate.refuse_until(now + std::time::Duration::from_secs(1));
        assert!(gate.refusing(now));
        assert!(!gate.refusing(now + std::time::Duration::from_secs(1)));
        assert!(!gate.full(1));
        gate.started();
        assert!(gate.full(1));
        gate.finished();
        gate.finished();
        assert!(!gate.full(1), "never below zero");
        gate.started();
        assert!(gate.full(1));
    }

    fn refused(yaml: &str) -> String {
        Policy::from_yaml("t.yaml", yaml).unwrap_err().to_string()
    }

    #[test]
    fn copies_are_checked_where_they_are_written() {
        let err = refused(
            "services:\n  a:\n    endpoints: ['127.0.0.1:1']\n    shadow:\n      - to: nowhere\n      - {to: 'http://x:1', sample: 120%, methods: ['G E T'], timeout: 0s, buffer: 10B}\n",
        );
        for field in [
            "services.a.shadow[0].to",
            "services.a.shadow[1].sample",
            "services.a.shadow[1].methods[0]",
            "services.a.shadow[1].timeout",
            "services.a.shadow[1].buffer",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
        let err = refused(
            "egress:\n  shadow:\n    not-a-url:\n      - to: http://x:1\ndispatch:\n  destination: http://d:1\n  shadow:\n    - to: missing\n",
        );
        assert!(err.contains("egress.shadow.not-a-url"), "{err}");
        assert!(err.contains("dispatch.shadow[0].to"), "{err}");
    }

    #[test]
    fn a_rewrite_inherits_the_top_level_copies_unless_it_writes_its_own() {
        let p = Policy::from_yaml(
            "t.yaml",
            "dispatch:\n  key: env\n  destination: http://d:1\n  shadow:\n    - to: http://copy:1\n  rewrites:\n    dev:\n      destination: http://dev:1\n    off:\n      shadow: []\n",
        )
        .unwrap();
        let rules = p.dispatch.unwrap();
        assert_eq!(
            rules.default.copies.as_ref().unwrap()[0].name.as_ref(),
            "http://copy:1"
        );
        assert!(rules.rewrites[b"dev".as_slice()].copies.is_some());
        assert!(rules.rewrites[b"off".as_slice()].copies.is_none());
    }

    #[test]
    fn url_copies_are_found_by_host_and_effective_port() {
        let p = Policy::from_yaml(
            "t.yaml",
            "egress:\n  shadow:\n    http://API.example.com:\n      - to: http://copy:1\n",
        )
        .unwrap();
        let found = |a: &'static str, https| p.shadow.url(&a.parse().unwrap(), https).is_some();
        assert!(found("api.example.com", false));
        assert!(found("api.example.com:80", false));
        assert!(!found("api.example.com", true));
        assert!(!found("other.example.com", false));
    }
}
