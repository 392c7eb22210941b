//! Fan-out groups as written: the `fanout` section, one group per name, each sending one request to all of its
//! targets in parallel and answering as its mode says.
//!
//! Owns: the serde mirror of a group and its checks, turning it into a [`Group`]; which group a request picks
//! ([`FanoutPolicy::select`]). Does not own: running the targets ([`crate::dispatch::fanout`]) or the queue of
//! fan-outs answered at once ([`crate::control::fanout`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::errors::Issue;
use super::units;
use crate::upstream::Upstream;

/// Bodies kept for the targets, by default: the body is read whole before anything is sent.
const DEFAULT_MAX_BODY: u64 = 4 << 20;
const MAX_MAX_BODY: u64 = 64 << 20;
const DEFAULT_QUEUE: usize = 1024;
const DEFAULT_REPORT_BODY: u64 = 4 << 10;
const MAX_REPORT_BODY: u64 = 1 << 20;
/// Targets per group: each is a request of its own.
const MAX_TARGETS: usize = 16;

/// One group as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    mode: Option<String>,
    answer: Option<String>,
    cancel_rest: Option<bool>,
    #[serde(default, with = "units::serde_size")]
    max_body: Option<u64>,
    #[serde(default, with = "duration::serde_opt")]
    timeout: Option<Duration>,
    queue: Option<usize>,
    #[serde(default, with = "units::serde_size")]
    report_body: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    to: Option<String>,
    name: Option<String>,
}

/// How a group answers the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 202 once the body is read and every target has a queue slot; the targets' answers are discarded.
    Async,
    /// The first 2xx wins.
    FirstSuccess,
    /// Every target's answer is awaited, then one is chosen (or reported).
    All(Answer),
}

/// Which answer `all` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The first 2xx in the order written; else the first target's answer.
    PreferSuccess,
    /// The first non-2xx in the order written; else the first target's answer.
    PreferFailure,
    /// A JSON report of every target's answer.
    Report,
}

impl Mode {
    /// The metrics label and the name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::FirstSuccess => "first_success",
            Mode::All(Answer::PreferSuccess) => "all_prefer_success",
            Mode::All(Answer::PreferFailure) => "all_prefer_failure",
            Mode::All(Answer::Report) => "all_report",
        }
    }
}

/// Where a target goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetTo {
    /// A service of the registry: its balancer, breakers and limits apply.
    Service(Arc<str>),
    /// One upstream by URL: its authority's resilience state applies, as a `target` URL's does.
    Url(Arc<Upstream>),
}

/// One target of a group.
#[derive(Debug)]
pub struct FanTarget {
    /// Its group's name, for its metric labels.
    pub group: Arc<str>,
    /// The metrics label, span name and report's name: `name`, or the destination as written.
    pub name: Arc<str>,
    pub to: TargetTo,
    /// Fan-outs of this target queued or in flight in async mode, bounded by the group's `queue`.
    queued: AtomicUsize,
    /// Its metric handles, made on first use in its sidecar's recorder.
    pub counters: OnceLock<crate::telemetry::FanCounters>,
}

impl PartialEq for FanTarget {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name && self.to == o.to
    }
}

/// A validated fan-out group.
#[derive(Debug, PartialEq)]
pub struct Group {
    pub name: Arc<str>,
    /// The `service` label of its requests' metrics: `fanout:<name>`.
    pub label: Arc<str>,
    /// `Host` values (lower case, no port) that select the group, as the seed's `spec.host` does.
    pub hosts: Vec<String>,
    pub targets: Vec<Arc<FanTarget>>,
    pub mode: Mode,
    /// `first_success`: stop the other targets once one succeeded (else they run on, answers discarded).
    pub cancel_rest: bool,
    /// The body is read whole, up to this, before anything is sent; past it: 413.
    pub max_body: usize,
    /// Each target's deadline: the smaller of this and the target's own request timeout.
    pub timeout: Option<Duration>,
    /// Async mode: fan-outs per target queued or in flight; past it: 503 `overloaded`.
    pub queue: usize,
    /// `all` with `answer: report`: body bytes of each target kept in the report.
    pub report_body: usize,
}

/// A queue slot of one target, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<FanTarget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Group {
    /// A queue slot for every target, or none at all: the first target whose queue is full, refused.
    pub fn slots(&self) -> Result<Vec<Slot>, Arc<FanTarget>> {
        let mut slots = Vec::with_capacity(self.targets.len());
        for t in &self.targets {
            if t.queued.fetch_add(1, Ordering::AcqRel) >= self.queue {
                t.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(t.clone());
            }
            slots.push(Slot(t.clone()));
        }
        Ok(slots)
    }
}

/// Every group, and which `Host` selects which.
#[derive(Debug, Default, PartialEq)]
pub struct FanoutPolicy {
    pub groups: BTreeMap<String, Arc<Group>>,
    hosts: Vec<(String, Arc<Group>)>,
}

impl FanoutPolicy {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The group a `Host` selects: the name compared without case, its port ignored.
    pub fn by_host(&self, host: &[u8]) -> Option<&Arc<Group>> {
        if self.hosts.is_empty() {
            return None;
        }
        let name = strip_port(host);
        self.hosts
            .iter()
            .find(|(h, _)| h.as_bytes().eq_ignore_ascii_case(name))
            .map(|(_, g)| g)
    }
}

/// A `Host` value's name: `[v6]:port` → `[v6]`, `name:port` → `name`.
fn strip_port(host: &[u8]) -> &[u8] {
    let host = host.trim_ascii();
    if host.starts_with(b"[") {
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) => &host[..colon],
        None => host,
    }
}

/// Checks the `fanout` section; service targets are checked against the registry by `service`, which says
/// whether a name is a service (`None`: no such service).
pub(super) fn validate(
    raw: BTreeMap<String, RawGroup>,
    file_of: impl Fn(&str) -> String,
    service: impl Fn(&str) -> Option<()>,
    issues: &mut Vec<Issue>,
) -> FanoutPolicy {
    let mut policy = FanoutPolicy::default();
    for (name, g) in raw {
        let file = file_of(&name);
        let field = format!("fanout.{name}");
        let at = |k: &str| format!("{field}.{k}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            issues.push(Issue::new(
                &file,
                &field,
                format!("a group name is letters, digits, '-', '_' and '.', got {name:?}"),
            ));
        }
        if g.targets.is_empty() {
            issues.push(Issue::new(
                &file,
                at("targets"),
                "required: at least one target (a service of the registry, or an http(s) URL)",
            ));
        }
        if g.targets.len() > MAX_TARGETS {
            issues.push(Issue::new(
                &file,
                at("targets"),
                format!("at most {MAX_TARGETS} targets, got {}", g.targets.len()),
            ));
        }
        let mut targets: Vec<Arc<FanTarget>> = Vec::with_capacity(g.targets.len());
        for (i, t) in g.targets.iter().enumerate() {
            let at = |k: &str| format!("{field}.targets[{i}].{k}");
            let text = t.to.as_deref().map(str::trim).unwrap_or_default();
            let to = if text.is_empty() {
                issues.push(Issue::new(
                    &file,
                    at("to"),
                    "required: a service of the registry, or an http(s) URL",
                ));
                continue;
            } else if text.contains("://") {
                match Upstream::parse(text) {
                    Ok(u) => TargetTo::Url(Arc::new(u)),
                    Err(why) => {
                        issues.push(Issue::new(&file, at("to"), format!("{why}, got {text:?}")));
                        continue;
                    }
                }
            } else {
                if service(text).is_none() {
                    issues.push(Issue::new(
                        &file,
                        at("to"),
                        format!(
                            "no service {text:?} in the registry (a URL needs its scheme: http://...)"
                        ),
                    ));
                }
                TargetTo::Service(Arc::from(text))
            };
            let label: Arc<str> = match t.name.as_deref().map(str::trim) {
                Some("") => {
                    issues.push(Issue::new(&file, at("name"), "must not be empty"));
                    continue;
                }
                Some(n) => Arc::from(n),
                None => Arc::from(text),
            };
            if targets.iter().any(|o| o.name == label) {
                issues.push(Issue::new(
                    &file,
                    at("name"),
                    format!("{label:?} names another target of the group too: give each a `name`"),
                ));
            }
            targets.push(Arc::new(FanTarget {
                group: Arc::from(name.as_str()),
                name: label,
                to,
                queued: AtomicUsize::new(0),
                counters: OnceLock::new(),
            }));
        }
        let mode = mode(g.mode.as_deref(), g.answer.as_deref())
            .map_err(|(k, why)| issues.push(Issue::new(&file, at(k), why)))
            .unwrap_or(Mode::Async);
        if g.cancel_rest.is_some() && mode != Mode::FirstSuccess {
            issues.push(Issue::new(
                &file,
                at("cancel_rest"),
                format!(
                    "only `first_success` has other targets to cancel; the mode is {}",
                    mode.as_str()
                ),
            ));
        }
        let bounded = |k: &str, value: u64, min: u64, max: u64, issues: &mut Vec<Issue>| {
            if !(min..=max).contains(&value) {
                issues.push(Issue::new(
                    &file,
                    at(k),
                    format!(
                        "must be between {} and {}, got {}",
                        units::format_size(min),
                        units::format_size(max),
                        units::format_size(value)
                    ),
                ));
            }
            usize::try_from(value).unwrap_or(usize::MAX)
        };
        let max_body = bounded(
            "max_body",
            g.max_body.unwrap_or(DEFAULT_MAX_BODY),
            0,
            MAX_MAX_BODY,
            issues,
        );
        let report_body = bounded(
            "report_body",
            g.report_body.unwrap_or(DEFAULT_REPORT_BODY),
            0,
            MAX_REPORT_BODY,
            issues,
        );
        if g.timeout.is_some_and(|t| t.is_zero()) {
            issues.push(Issue::new(
                &file,
                at("timeout"),
                "must be more than 0, got 0",
            ));
        }
        let queue = g.queue.unwrap_or(DEFAULT_QUEUE);
        if queue == 0 {
            issues.push(Issue::new(&file, at("queue"), "must be at least 1, got 0"));
        }
        let mut hosts = Vec::with_capacity(g.hosts.len());
        for (i, h) in g.hosts.iter().enumerate() {
            let host = h.trim().to_ascii_lowercase();
            let valid = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
                && strip_port(host.as_bytes()).len() == host.len();
            if !valid {
                issues.push(Issue::new(
                    &file,
                    format!("{field}.hosts[{i}]"),
                    format!("a host name without a port (the seed's `spec.host`), got {h:?}"),
                ));
                continue;
            }
            if let Some((_, other)) = policy.hosts.iter().find(|(o, _)| *o == host) {
                issues.push(Issue::new(
                    &file,
                    format!("{field}.hosts[{i}]"),
                    format!("{host:?} already selects the group {:?}", other.name),
                ));
                continue;
            }
            hosts.push(host);
        }
        let group = Arc::new(Group {
            name: Arc::from(name.as_str()),
            label: Arc::from(format!("fanout:{name}")),
            hosts: hosts.clone(),
            targets,
            mode,
            cancel_rest: g.cancel_rest.unwrap_or(true),
            max_body,
            timeout: g.timeout,
            queue,
            report_body,
        });
        for h in hosts {
            policy.hosts.push((h, group.clone()));
        }
        policy.groups.insert(name, group);
    }
    policy
}

/// The mode from `mode` and `answer`; the successor of the seed names the modes `Async`,
/// `AwaitAllPreferSuccessful`, `AwaitAllPreferFailed` and `AwaitAllReport`, accepted as written.
fn mode(mode: Option<&str>, answer: Option<&str>) -> Result<Mode, (&'static str, String)> {
    let answer = match answer.map(str::trim) {
        None => None,
        Some("prefer_success") => Some(Answer::PreferSuccess),
        Some("prefer_failure") => Some(Answer::PreferFailure),
        Some("report") => Some(Answer::Report),
        Some(other) => {
            return Err((
                "answer",
                format!("one of prefer_success, prefer_failure, report; got {other:?}"),
            ));
        }
    };
    let named = |m: Mode| match answer {
        None => Ok(m),
        Some(_) => Err((
            "answer",
            format!(
                "the mode {:?} says its answer already: leave `answer` out",
                mode.unwrap_or_default()
            ),
        )),
    };
    match mode.map(str::trim) {
        None | Some("async") => match answer {
            None => Ok(Mode::Async),
            Some(a) if mode.is_none() => Ok(Mode::All(a)),
            Some(_) => Err(("answer", "only `all` chooses an answer".to_string())),
        },
        Some("first_success") => match answer {
            None => Ok(Mode::FirstSuccess),
            Some(_) => Err(("answer", "only `all` chooses an answer".to_string())),
        },
        Some("all") => Ok(Mode::All(answer.unwrap_or(Answer::PreferSuccess))),
        Some("Async") => named(Mode::Async),
        Some("AwaitAllPreferSuccessful") => named(Mode::All(Answer::PreferSuccess)),
        Some("AwaitAllPreferFailed") => named(Mode::All(Answer::PreferFailure)),
        Some("AwaitAllReport") => named(Mode::All(Answer::Report)),
        Some(other) => Err((
            "mode",
            format!(
                "one of async, first_success, all (or Async, AwaitAllPreferSuccessful, AwaitAllPreferFailed, AwaitAllReport); got {other:?}"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn refused(yaml: &str) -> String {
        Policy::from_yaml("t.yaml", yaml).unwrap_err().to_string()
    }

    #[test]
    fn the_modes_are_read_in_both_spellings() {
        assert_eq!(mode(None, None), Ok(Mode::Async));
        assert_eq!(mode(Some("Async"), None), Ok(Mode::Async));
        assert_eq!(mode(Some("first_success"), None), Ok(Mode::FirstSuccess));
        assert_eq!(
            mode(Some("all"), None),
            Ok(Mode::All(Answer::PreferSuccess))
        );
        assert_eq!(
            mode(Some("all"), Some("report")),
            Ok(Mode::All(Answer::Report))
        );
        assert_eq!(
            mode(Some("AwaitAllPreferSuccessful"), None),
            Ok(Mode::All(Answer::PreferSuccess))
        );
        assert_eq!(
            mode(Some("AwaitAllPreferFailed"), None),
            Ok(Mode::All(Answer::PreferFailure))
        );
        assert_eq!(
            mode(Some("AwaitAllReport"), None),
            Ok(Mode::All(Answer::Report))
        );
        assert!(mode(Some("AwaitAllReport"), Some("prefer_success")).is_err());
        assert!(mode(Some("first_success"), Some("report")).is_err());
        assert!(mode(Some("fire_and_forget"), None).is_err());
    }

    #[test]
    fn groups_are_checked_where_they_are_written() {
        let err = refused(
            "fanout:\n  hooks:\n    hosts: ['a.example:80', '']\n    targets:\n      - to: nowhere\n      - to: 'ftp://x'\n      - {}\n    mode: sometimes\n    max_body: 1GiB\n    queue: 0\n    timeout: 0s\n  empty: {}\n",
        );
        for field in [
            "fanout.hooks.hosts[0]",
            "fanout.hooks.hosts[1]",
            "fanout.hooks.targets[0].to",
            "fanout.hooks.targets[1].to",
            "fanout.hooks.targets[2].to",
            "fanout.hooks.mode",
            "fanout.hooks.max_body",
            "fanout.hooks.queue",
            "fanout.hooks.timeout",
            "fanout.empty.targets",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
        let err = refused(
            "fanout:\n  a:\n    hosts: [hooks.example]\n    targets: [{to: 'http://x:1'}, {to: 'http://x:1'}]\n    cancel_rest: false\n  b:\n    hosts: [HOOKS.example]\n    targets: [{to: 'http://y:1'}]\n",
        );
        assert!(err.contains("fanout.a.targets[1].name"), "{err}");
        assert!(err.contains("fanout.a.cancel_rest"), "{err}");
        assert!(err.contains("fanout.b.hosts[0]"), "{err}");
    }

    #[test]
    fn a_group_is_found_by_its_host_without_port_or_case() {
        let p = Policy::from_yaml(
            "t.yaml",
            "services:\n  app-2:\n    endpoints: ['127.0.0.1:1']\nfanout:\n  hooks:\n    hosts: [webhook-receiver.example.com]\n    targets: [{to: 'http://app-1:80'}, {to: app-2}]\n",
        )
        .unwrap();
        let by = |h: &str| p.fanout.by_host(h.as_bytes()).map(|g| g.name.to_string());
        assert_eq!(
            by("Webhook-Receiver.example.com:8080").as_deref(),
            Some("hooks")
        );
        assert_eq!(by("webhook-receiver.example.com").as_deref(), Some("hooks"));
        assert_eq!(by("other.example.com"), None);
        let g = &p.fanout.groups["hooks"];
        assert_eq!(g.mode, Mode::Async);
        assert_eq!(g.targets[1].to, TargetTo::Service(Arc::from("app-2")));
    }

    #[test]
    fn queue_slots_are_taken_for_every_target_or_for_none() {
        let p = Policy::from_yaml(
            "t.yaml",
            "fanout:\n  g:\n    queue: 1\n    targets: [{to: 'http://a:1'}, {to: 'http://b:1'}]\n",
        )
        .unwrap();
        let g = &p.fanout.groups["g"];
        let held = g.slots().unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(g.slots().unwrap_err().name.as_ref(), "http://a:1");
        drop(held);
        assert!(g.slots().is_ok(), "slots come back when the fan-out ends");
    }
}
