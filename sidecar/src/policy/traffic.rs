//! The resilience sections of a policy: retries with a budget, circuit breakers, concurrency limits and rate
//! limits, written once under `defaults` and overridden field by field under each service.
//!
//! Owns: the serde mirror of those sections (every field optional, so a service can override one knob), the
//! overlay of a service's sections on the defaults, the built-in defaults, and the checks that turn the result
//! into a [`Resilience`]. Does not own: enforcing them (that is [`crate::resilience`]).

use std::time::Duration;

use actix_http::header::HeaderName;
use serde::Deserialize;

use super::errors::Issue;
use super::{duration, units};

const DEFAULT_MAX_RETRIES: u32 = 2;
const DEFAULT_MAX_BODY: u64 = 64 << 10;
/// Bodies kept for replay live in memory once per request in flight: bound them.
const MAX_BODY_LIMIT: u64 = 16 << 20;
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
const DEFAULT_RETRY_AFTER_MAX: Duration = Duration::from_secs(1);
const DEFAULT_BUDGET_RATIO: f64 = 0.2;
const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);
const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_FAILURE_RATE: f64 = 0.5;
const DEFAULT_FAILURE_RATE_MIN_REQUESTS: u32 = 20;
const DEFAULT_FAILURE_RATE_WINDOW: Duration = Duration::from_secs(10);
const DEFAULT_OPEN_BASE: Duration = Duration::from_secs(1);
const DEFAULT_OPEN_MAX: Duration = Duration::from_secs(60);
const DEFAULT_HALF_OPEN_PROBES: u32 = 1;
const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
const DEFAULT_QUEUE: usize = 1024;
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_MAX_KEYS: usize = 10_000;
const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);
const DEFAULT_HASH_BALANCE_FACTOR: f64 = 1.25;
const DEFAULT_MAX_EJECTION: f64 = 0.5;

/// Copies each field the top layer leaves unset from the base layer.
macro_rules! overlay {
    ($top:expr, $base:expr; $($field:ident),+ $(,)?) => {
        $( if $top.$field.is_none() { $top.$field = $base.$field.clone(); } )+
    };
}

/// The resilience sections as written, under `defaults` or under a service.
#[derive(Debug, Default, Clone)]
pub(super) struct RawResilience {
    pub per_try: Option<Duration>,
    pub retries: Option<RawRetries>,
    pub circuit_breaker: Option<RawBreaker>,
    pub concurrency: Option<RawConcurrency>,
    pub rate_limit: Option<RawRateLimit>,
    pub load_balancer: Option<RawBalancer>,
    pub outlier_detection: Option<RawOutliers>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBalancer {
    policy: Option<String>,
    hash_key: Option<String>,
    hash_balance_factor: Option<f64>,
    #[serde(default, with = "duration::serde_opt")]
    decay: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutliers {
    enabled: Option<bool>,
    consecutive_failures: Option<u32>,
    #[serde(default, with = "duration::serde_opt")]
    base_ejection_time: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    max_ejection_time: Option<Duration>,
    max_ejection_percent: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetries {
    max_retries: Option<u32>,
    on: Option<Vec<RawCondition>>,
    non_idempotent: Option<bool>,
    #[serde(default, with = "units::serde_size")]
    max_body: Option<u64>,
    backoff: Option<RawBackoff>,
    #[serde(default, with = "duration::serde_opt")]
    retry_after_max: Option<Duration>,
    budget: Option<RawBudget>,
}

/// A retry condition: a name (`connect-failure`), a status (`503`) or a range (`"500-599"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawCondition {
    Status(u16),
    Text(String),
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    #[serde(default, with = "duration::serde_opt")]
    base: Option<Duration>,
    #[serde(default, with = "duration::serde_opt")]
    max: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    enabled: Option<bool>,
    ratio: Option<String>,
    min_per_second: Option<u32>,
    #[serde(default, with = "duration::serde_opt")]
    window: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    enabled: Option<bool>,
    consecutive_failures: Option<u32>,
    failure_rate: Option<RawFailureRate>,
    open: Option<RawBackoff>,
    half_open_probes: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailureRate {
    enabled: Option<bool>,
    threshold: Option<String>,
    min_requests: Option<u32>,
    #[serde(default, with = "duration::serde_opt")]
    window: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConcurrency {
    max_in_flight: Option<usize>,
    queue: Option<usize>,
    #[serde(default, with = "duration::serde_opt")]
    queue_timeout: Option<Duration>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    enabled: Option<bool>,
    rate: Option<String>,
    burst: Option<u32>,
    key: Option<String>,
    max_keys: Option<usize>,
}

impl RawResilience {
    /// This layer over `base`: every field this one leaves unset comes from `base`, nested sections included.
    pub fn over(mut self, base: &RawResilience) -> RawResilience {
        overlay!(self, base; per_try);
        self.retries = layer(self.retries, base.retries.as_ref(), |top, b| {
            overlay!(top, b; max_retries, on, non_idempotent, max_body, retry_after_max);
            top.backoff = layer(top.backoff.take(), b.backoff.as_ref(), |t, b| {
                overlay!(t, b; base, max);
            });
            top.budget = layer(top.budget.take(), b.budget.as_ref(), |t, b| {
                overlay!(t, b; enabled, ratio, min_per_second, window);
            });
        });
        self.circuit_breaker = layer(
            self.circuit_breaker,
            base.circuit_breaker.as_ref(),
            |t, b| {
                overlay!(t, b; enabled, consecutive_failures, half_open_probes);
                t.failure_rate = layer(t.failure_rate.take(), b.failure_rate.as_ref(), |t, b| {
                    overlay!(t, b; enabled, threshold, min_requests, window);
                });
                t.open = layer(t.open.take(), b.open.as_ref(), |t, b| {
                    overlay!(t, b; base, max);
                });
            },
        );
        self.concurrency = layer(self.concurrency, base.concurrency.as_ref(), |t, b| {
            overlay!(t, b; max_in_flight, queue, queue_timeout);
        });
        self.rate_limit = layer(self.rate_limit, base.rate_limit.as_ref(), |t, b| {
            overlay!(t, b; enabled, rate, burst, key, max_keys);
        });
        self.load_balancer = layer(self.load_balancer, base.load_balancer.as_ref(), |t, b| {
            overlay!(t, b; policy, hash_key, hash_balance_factor, decay);
        });
        self.outlier_detection = layer(
            self.outlier_detection,
            base.outlier_detection.as_ref(),
            |t, b| {
                overlay!(t, b; enabled, consecutive_failures, base_ejection_time, max_ejection_time, max_ejection_percent);
            },
        );
        self
    }

    /// True when any field is set, for "defined twice" bookkeeping.
    pub fn is_set(&self) -> bool {
        self.per_try.is_some()
            || self.retries.is_some()
            || self.circuit_breaker.is_some()
            || self.concurrency.is_some()
            || self.rate_limit.is_some()
            || self.load_balancer.is_some()
            || self.outlier_detection.is_some()
    }

    /// Checks every field and fills in the built-in defaults. `at` is the field path prefix (`defaults` or
    /// `services.orders`), `file` the file it came from.
    pub fn validate(&self, file: &str, at: &str, issues: &mut Vec<Issue>) -> Resilience {
        let mut issue = |field: &str, message: String| {
            issues.push(Issue::new(file, format!("{at}.{field}"), message));
        };
        if self.per_try.is_some_and(|d| d.is_zero()) {
            issue("timeouts.per_try", "must be more than 0, got 0".into());
        }
        let retries = validate_retries(self.retries.as_ref(), &mut issue);
        let breaker = validate_breaker(self.circuit_breaker.as_ref(), &mut issue);
        let concurrency = validate_concurrency(self.concurrency.as_ref(), &mut issue);
        let rate_limit = validate_rate_limit(self.rate_limit.as_ref(), &mut issue);
        let balancer = validate_balancer(self.load_balancer.as_ref(), &mut issue);
        let outliers = validate_outliers(self.outlier_detection.as_ref(), &mut issue);
        Resilience {
            per_try: self.per_try,
            retries,
            breaker,
            concurrency,
            rate_limit,
            balancer,
            outliers,
        }
    }
}

fn validate_balancer(raw: Option<&RawBalancer>, issue: &mut impl FnMut(&str, String)) -> Balancer {
    let empty = RawBalancer::default();
    let raw = raw.unwrap_or(&empty);
    let decay = raw.decay.unwrap_or(DEFAULT_EWMA_DECAY);
    if decay.is_zero() {
        issue("load_balancer.decay", "must be more than 0, got 0".into());
    }
    let factor = raw
        .hash_balance_factor
        .unwrap_or(DEFAULT_HASH_BALANCE_FACTOR);
    if factor.is_nan() || factor < 1.0 {
        issue(
            "load_balancer.hash_balance_factor",
            format!("must be at least 1.0 (1.25 allows 25 % over the average), got {factor}"),
        );
    }
    let key = match raw.hash_key.as_deref().map(str::trim) {
        None | Some("source") => HashKey::Source,
        Some(other) => match other
            .strip_prefix("header:")
            .map(str::trim)
            .map(HeaderName::try_from)
        {
            Some(Ok(name)) => HashKey::Header(name),
            _ => {
                issue(
                    "load_balancer.hash_key",
                    format!("must be `source` or `header:<name>`, got {other:?}"),
                );
                HashKey::Source
            }
        },
    };
    let kind = match raw.policy.as_deref().map(str::trim) {
        None | Some("p2c_ewma") => BalancerKind::P2cEwma,
        Some("round_robin") => BalancerKind::RoundRobin,
        Some("least_request") => BalancerKind::LeastRequest,
        Some("consistent_hash") => BalancerKind::ConsistentHash,
        Some(other) => {
            issue(
                "load_balancer.policy",
                format!(
                    "must be p2c_ewma, round_robin, least_request or consistent_hash, got {other:?}"
                ),
            );
            BalancerKind::P2cEwma
        }
    };
    Balancer {
        kind,
        hash_key: key,
        hash_balance_factor: factor.max(1.0),
        decay: decay.max(Duration::from_millis(1)),
    }
}

fn validate_outliers(
    raw: Option<&RawOutliers>,
    issue: &mut impl FnMut(&str, String),
) -> Option<BreakerPolicy> {
    let empty = RawOutliers::default();
    let raw = raw.unwrap_or(&empty);
    if raw.enabled == Some(false) {
        return None;
    }
    let consecutive_failures = raw
        .consecutive_failures
        .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES);
    if consecutive_failures == 0 {
        issue(
            "outlier_detection.consecutive_failures",
            "must be at least 1, got 0 (use `enabled: false` to turn ejection off)".into(),
        );
    }
    let base = raw.base_ejection_time.unwrap_or(DEFAULT_OPEN_BASE);
    let max = raw.max_ejection_time.unwrap_or(DEFAULT_OPEN_MAX.max(base));
    if base.is_zero() {
        issue(
            "outlier_detection.base_ejection_time",
            "must be more than 0, got 0".into(),
        );
    }
    if max < base {
        issue(
            "outlier_detection.max_ejection_time",
            format!("must be at least base_ejection_time ({base:?}), got {max:?}"),
        );
    }
    let share = match raw
        .max_ejection_percent
        .as_deref()
        .map(units::Percent::parse)
    {
        None => DEFAULT_MAX_EJECTION,
        Some(Ok(p)) => p.fraction(),
        Some(Err(why)) => {
            issue("outlier_detection.max_ejection_percent", why);
            DEFAULT_MAX_EJECTION
        }
    };
    Some(BreakerPolicy {
        consecutive_failures: consecutive_failures.max(1),
        failure_rate: None,
        open_base: base,
        open_max: max,
        half_open_probes: 1,
        max_ejected: Some(share),
    })
}

/// Overlays an optional section on an optional base section.
fn layer<T: Clone + Default>(
    top: Option<T>,
    base: Option<&T>,
    fill: impl FnOnce(&mut T, &T),
) -> Option<T> {
    match (top, base) {
        (Some(mut t), Some(b)) => {
            fill(&mut t, b);
            Some(t)
        }
        (Some(t), None) => Some(t),
        (None, b) => b.cloned(),
    }
}

fn validate_retries(raw: Option<&RawRetries>, issue: &mut impl FnMut(&str, String)) -> Retries {
    let empty = RawRetries::default();
    let raw = raw.unwrap_or(&empty);
    let max_retries = raw.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
    if max_retries > 10 {
        issue(
            "retries.max_retries",
            format!("must be at most 10, got {max_retries}"),
        );
    }
    let on = match &raw.on {
        None => RetryOn::default(),
        Some(list) => {
            let mut on = RetryOn::none();
            for (i, c) in list.iter().enumerate() {
                if let Err(why) = on.add(c) {
                    issue(&format!("retries.on[{i}]"), why);
                }
            }
            on
        }
    };
    let max_body = raw.max_body.unwrap_or(DEFAULT_MAX_BODY);
    if max_body > MAX_BODY_LIMIT {
        issue(
            "retries.max_body",
            format!(
                "must be at most {}, got {}",
                units::format_size(MAX_BODY_LIMIT),
                units::format_size(max_body)
            ),
        );
    }
    let backoff = raw.backoff.clone().unwrap_or_default();
    let backoff_base = backoff.base.unwrap_or(DEFAULT_BACKOFF_BASE);
    let backoff_max = backoff.max.unwrap_or(DEFAULT_BACKOFF_MAX.max(backoff_base));
    if backoff_max < backoff_base {
        issue(
            "retries.backoff.max",
            format!("must be at least backoff.base ({backoff_base:?}), got {backoff_max:?}"),
        );
    }
    let budget = raw.budget.clone().unwrap_or_default();
    let budget = if budget.enabled == Some(false) {
        None
    } else {
        let ratio = match budget.ratio.as_deref().map(units::Percent::parse) {
            None => DEFAULT_BUDGET_RATIO,
            Some(Ok(p)) => p.fraction(),
            Some(Err(why)) => {
                issue("retries.budget.ratio", why);
                DEFAULT_BUDGET_RATIO
            }
        };
        let window = budget.window.unwrap_or(DEFAULT_BUDGET_WINDOW);
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&window) {
            issue(
                "retries.budget.window",
                format!("must be between 1s and 5m, got {window:?}"),
            );
        }
        Some(BudgetPolicy {
            ratio,
            min_per_second: budget
                .min_per_second
                .unwrap_or(DEFAULT_BUDGET_MIN_PER_SECOND),
            window,
        })
    };
    Retries {
        max_retries,
        on,
        non_idempotent: raw.non_idempotent.unwrap_or(false),
        max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        backoff_base,
        backoff_max,
        retry_after_max: raw.retry_after_max.unwrap_or(DEFAULT_RETRY_AFTER_MAX),
        budget,
    }
}

fn validate_breaker(
    raw: Option<&RawBreaker>,
    issue: &mut impl FnMut(&str, String),
) -> Option<BreakerPolicy> {
    let empty = RawBreaker::default();
    let raw = raw.unwrap_or(&empty);
    if raw.enabled == Some(false) {
        return None;
    }
    let consecutive_failures = raw
        .consecutive_failures
        .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES);
    let rate = raw.failure_rate.clone().unwrap_or_default();
    let failure_rate = if rate.enabled == Some(false) {
        None
    } else {
        let threshold = match rate.threshold.as_deref().map(units::Percent::parse) {
            None => DEFAULT_FAILURE_RATE,
            Some(Ok(p)) if p.fraction() > 0.0 => p.fraction(),
            Some(Ok(_)) => {
                issue(
                    "circuit_breaker.failure_rate.threshold",
                    "must be more than 0%".into(),
                );
                DEFAULT_FAILURE_RATE
            }
            Some(Err(why)) => {
                issue("circuit_breaker.failure_rate.threshold", why);
                DEFAULT_FAILURE_RATE
            }
        };
        let window = rate.window.unwrap_or(DEFAULT_FAILURE_RATE_WINDOW);
        if window < Duration::from_secs(1) {
            issue(
                "circuit_breaker.failure_rate.window",
                format!("must be at least 1s, got {window:?}"),
            );
        }
        Some(FailureRate {
            threshold,
            min_requests: rate
                .min_requests
                .unwrap_or(DEFAULT_FAILURE_RATE_MIN_REQUESTS)
                .max(1),
            window,
        })
    };
    let open = raw.open.clone().unwrap_or_default();
    let open_base = open.base.unwrap_or(DEFAULT_OPEN_BASE);
    let open_max = open.max.unwrap_or(DEFAULT_OPEN_MAX.max(open_base));
    if open_base.is_zero() {
        issue(
            "circuit_breaker.open.base",
            "must be more than 0, got 0".into(),
        );
    }
    if open_max < open_base {
        issue(
            "circuit_breaker.open.max",
            format!("must be at least open.base ({open_base:?}), got {open_max:?}"),
        );
    }
    let half_open_probes = raw.half_open_probes.unwrap_or(DEFAULT_HALF_OPEN_PROBES);
    if half_open_probes == 0 {
        issue(
            "circuit_breaker.half_open_probes",
            "must be at least 1, got 0".into(),
        );
    }
    if consecutive_failures == 0 && failure_rate.is_none() {
        // Nothing could open it: say so rather than keep a breaker that never trips.
        return None;
    }
    Some(BreakerPolicy {
        consecutive_failures,
        failure_rate,
        open_base,
        open_max,
        half_open_probes,
        max_ejected: None,
    })
}

fn validate_concurrency(
    raw: Option<&RawConcurrency>,
    issue: &mut impl FnMut(&str, String),
) -> Option<ConcurrencyPolicy> {
    let empty = RawConcurrency::default();
    let raw = raw.unwrap_or(&empty);
    let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    let queue = raw.queue.unwrap_or(DEFAULT_QUEUE);
    let queue_timeout = raw.queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT);
    // tokio's semaphore holds at most usize::MAX >> 3 permits.
    if max_in_flight > 1 << 24 {
        issue(
            "concurrency.max_in_flight",
            format!("must be at most 16777216, got {max_in_flight}"),
        );
    }
    if queue > 0 && queue_timeout.is_zero() {
        issue(
            "concurrency.queue_timeout",
            "must be more than 0 when the queue is not empty, got 0".into(),
        );
    }
    // 0 means no limit.
    (max_in_flight > 0).then_some(ConcurrencyPolicy {
        max_in_flight,
        queue,
        queue_timeout,
    })
}

fn validate_rate_limit(
    raw: Option<&RawRateLimit>,
    issue: &mut impl FnMut(&str, String),
) -> Option<RateLimitPolicy> {
    let raw = raw?;
    if raw.enabled == Some(false) {
        return None;
    }
    let Some(text) = raw.rate.as_deref() else {
        issue(
            "rate_limit.rate",
            "is required, for example `100/s` or `6000/m`".into(),
        );
        return None;
    };
    let (requests, per) = match parse_rate(text) {
        Ok(rate) => rate,
        Err(why) => {
            issue("rate_limit.rate", why);
            return None;
        }
    };
    let burst = raw.burst.unwrap_or(requests);
    if burst == 0 {
        issue("rate_limit.burst", "must be at least 1, got 0".into());
    }
    let key = match raw.key.as_deref().map(str::trim) {
        None | Some("service") => LimitKey::Service,
        Some("source") => LimitKey::Source,
        Some(other) => match other.strip_prefix("header:").map(str::trim) {
            Some(name) => match HeaderName::try_from(name) {
                Ok(name) => LimitKey::Header(name),
                Err(_) => {
                    issue(
                        "rate_limit.key",
                        format!("{name:?} is not a valid header name"),
                    );
                    LimitKey::Service
                }
            },
            None => {
                issue(
                    "rate_limit.key",
                    format!("must be `service`, `source` or `header:<name>`, got {other:?}"),
                );
                LimitKey::Service
            }
        },
    };
    let max_keys = raw.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys == 0 {
        issue("rate_limit.max_keys", "must be at least 1, got 0".into());
    }
    Some(RateLimitPolicy {
        requests,
        per,
        burst: burst.max(1),
        key,
        max_keys: max_keys.max(1),
    })
}

/// The mesh inbound listener's limits: a rate limit keyed by the peer's identity unless it says otherwise
/// (`key: peer`, the default), and a concurrency limit with the same defaults as a target's. Fields are named
/// from `rate_limit.` and `concurrency.`.
pub(super) fn validate_inbound_limits(
    rate_limit: Option<&RawRateLimit>,
    concurrency: Option<&RawConcurrency>,
    issue: &mut impl FnMut(&str, String),
) -> (Option<RateLimitPolicy>, Option<ConcurrencyPolicy>) {
    let by_peer = rate_limit.map(|raw| {
        let mut raw = raw.clone();
        if matches!(raw.key.as_deref().map(str::trim), None | Some("peer")) {
            raw.key = Some(format!("header:{}", super::http::PEER_IDENTITY.as_str()));
        }
        raw
    });
    (
        validate_rate_limit(by_peer.as_ref(), issue),
        validate_concurrency(concurrency, issue),
    )
}

/// `100/s`, `6000/m`, `10/1s`, `5/250ms`: a number of requests per period.
fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("expected a rate such as 100/s or 6000/m, got {text:?}");
    let (n, per) = text.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = per.trim();
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => duration::parse(other).map_err(|_| bad())?,
    };
    if n == 0 || per.is_zero() {
        return Err(format!(
            "must allow at least one request per period, got {text:?}"
        ));
    }
    Ok((n, per))
}

/// The validated resilience policy of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    /// Each attempt's own limit; the request timeout still bounds the whole.
    pub per_try: Option<Duration>,
    pub retries: Retries,
    pub breaker: Option<BreakerPolicy>,
    pub concurrency: Option<ConcurrencyPolicy>,
    pub rate_limit: Option<RateLimitPolicy>,
    /// How a service's endpoints are chosen.
    pub balancer: Balancer,
    /// Passive outlier ejection of a service's endpoints (each endpoint's breaker).
    pub outliers: Option<BreakerPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Balancer {
    pub kind: BalancerKind,
    pub hash_key: HashKey,
    /// Consistent hashing with bounded loads: no endpoint takes more than this × the average load.
    pub hash_balance_factor: f64,
    /// Peak-EWMA: how fast a latency estimate forgets.
    pub decay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancerKind {
    /// Power of two choices over peak-EWMA latency × requests in flight (Linkerd's default).
    P2cEwma,
    RoundRobin,
    /// Power of two choices over requests in flight (Envoy's least_request).
    LeastRequest,
    /// Consistent hashing on a key, with bounded loads.
    ConsistentHash,
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Source,
    Header(HeaderName),
}

impl Default for Resilience {
    fn default() -> Self {
        RawResilience::default().validate("", "defaults", &mut Vec::new())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    /// Attempts after the first; 0 turns retries off.
    pub max_retries: u32,
    pub on: RetryOn,
    /// Retry POST and PATCH on the same conditions as idempotent methods (otherwise only on connect failure).
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept for replay; larger ones stream and are not retried.
    pub max_body: usize,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A `Retry-After` up to this long is honoured; a longer one ends the retries.
    pub retry_after_max: Duration,
    pub budget: Option<BudgetPolicy>,
}

/// Which failures are retried: connect failures, resets before any response byte, and statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    /// Bit `s` set: status `s` is retried (statuses 100–599).
    statuses: [u64; 10],
}

impl Default for RetryOn {
    fn default() -> Self {
        let mut on = Self::none();
        on.connect_failure = true;
        on.reset = true;
        for s in [502, 503, 504] {
            on.set(s);
        }
        on
    }
}

impl RetryOn {
    fn none() -> Self {
        Self {
            connect_failure: false,
            reset: false,
            statuses: [0; 10],
        }
    }

    fn set(&mut self, status: u16) {
        if let Some(word) = self.statuses.get_mut(usize::from(status / 64)) {
            *word |= 1 << (status % 64);
        }
    }

    pub fn status(&self, status: u16) -> bool {
        self.statuses
            .get(usize::from(status / 64))
            .is_some_and(|w| w & (1 << (status % 64)) != 0)
    }

    fn add(&mut self, condition: &RawCondition) -> Result<(), String> {
        let in_range = |s: u16| (100..=599).contains(&s);
        match condition {
            RawCondition::Status(s) if in_range(*s) => self.set(*s),
            RawCondition::Status(s) => return Err(format!("a status must be 100-599, got {s}")),
            RawCondition::Text(text) => match text.trim() {
                "connect-failure" => self.connect_failure = true,
                "reset" => self.reset = true,
                "gateway-error" => (502..=504).for_each(|s| self.set(s)),
                "5xx" => (500..=599).for_each(|s| self.set(s)),
                other => {
                    let range = other
                        .split_once('-')
                        .map(|(a, b)| (a.trim().parse(), b.trim().parse()));
                    let single = other.parse::<u16>().ok();
                    match (range, single) {
                        (_, Some(s)) if in_range(s) => self.set(s),
                        (Some((Ok(a), Ok(b))), _) if in_range(a) && in_range(b) && a <= b => {
                            (a..=b).for_each(|s| self.set(s))
                        }
                        _ => {
                            return Err(format!(
                                "expected connect-failure, reset, gateway-error, 5xx, a status or a range such as \"500-599\", got {other:?}"
                            ));
                        }
                    }
                }
            },
        }
        Ok(())
    }
}

/// Retries allowed over a window: `ratio` of the requests plus `min_per_second` (Linkerd's budget).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPolicy {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Opens after this many failures in a row (0: only the failure rate opens it).
    pub consecutive_failures: u32,
    pub failure_rate: Option<FailureRate>,
    /// Open for `open_base`, doubling on each trip without a success in between, up to `open_max`.
    pub open_base: Duration,
    pub open_max: Duration,
    /// Requests admitted at once while half-open.
    pub half_open_probes: u32,
    /// For endpoint ejection: the largest share of a service's endpoints ejected at once.
    pub max_ejected: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureRate {
    /// Opens when the share of failures reaches this (0–1).
    pub threshold: f64,
    pub min_requests: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyPolicy {
    pub max_in_flight: usize,
    /// Requests waiting for a slot; beyond this they are refused at once.
    pub queue: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// `requests` per `per`, with bursts of up to `burst`.
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: LimitKey,
    /// Distinct keys tracked at once; keys beyond share one limit.
    pub max_keys: usize,
}

/// Whose requests share a rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// All requests to the target.
    Service,
    /// Each client address.
    Source,
    /// Each value of this request header (requests without it share one limit).
    Header(HeaderName),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(raw: RawResilience) -> Result<Resilience, Vec<Issue>> {
        let mut issues = Vec::new();
        let r = raw.validate("p.yaml", "defaults", &mut issues);
        if issues.is_empty() {
            Ok(r)
        } else {
            Err(issues)
        }
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let r = Resilience::default();
        assert_eq!(r.retries.max_retries, 2);
        assert!(r.retries.on.connect_failure && r.retries.on.reset);
        assert!(r.retries.on.status(503) && !r.retries.on.status(500));
        assert_eq!(r.retries.max_body, 64 << 10);
        let budget = r.retries.budget.unwrap();
        assert_eq!((budget.ratio, budget.min_per_second), (0.2, 10));
        let breaker = r.breaker.unwrap();
        assert_eq!(breaker.consecutive_failures, 5);
        assert_eq!(breaker.half_open_probes, 1);
        assert_eq!(r.concurrency.unwrap().max_in_flight, 1024);
        assert!(r.rate_limit.is_none());
    }

    #[test]
    fn a_service_overrides_one_knob_and_keeps_the_rest() {
        let defaults: RawRetries =
            yaml_serde::from_str("max_retries: 3\nbackoff: {base: 10ms}\n").unwrap();
        let service: RawRetries = yaml_serde::from_str("backoff: {max: 1s}\n").unwrap();
        let base = RawResilience {
            retries: Some(defaults),
            ..Default::default()
        };
        let top = RawResilience {
            retries: Some(service),
            ..Default::default()
        };
        let r = validate(top.over(&base)).unwrap();
        assert_eq!(r.retries.max_retries, 3);
        assert_eq!(r.retries.backoff_base, Duration::from_millis(10));
        assert_eq!(r.retries.backoff_max, Duration::from_secs(1));
    }

    #[test]
    fn conditions_read_names_statuses_and_ranges() {
        let raw: RawRetries =
            yaml_serde::from_str("on: [reset, 429, \"500-502\", gateway-error]\n").unwrap();
        let on = validate(RawResilience {
            retries: Some(raw),
            ..Default::default()
        })
        .unwrap()
        .retries
        .on;
        assert!(on.reset && !on.connect_failure);
        for s in [429, 500, 501, 502, 503, 504] {
            assert!(on.status(s), "{s}");
        }
        assert!(!on.status(505));
        let bad: RawRetries = yaml_serde::from_str("on: [sometimes, 700]\n").unwrap();
        let issues = validate(RawResilience {
            retries: Some(bad),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(issues.len(), 2);
        assert_eq!(issues[0].path, "defaults.retries.on[0]");
    }

    #[test]
    fn rates_read_as_written() {
        assert_eq!(parse_rate("100/s"), Ok((100, Duration::from_secs(1))));
        assert_eq!(parse_rate("6000/m"), Ok((6000, Duration::from_secs(60))));
        assert_eq!(parse_rate("5/250ms"), Ok((5, Duration::from_millis(250))));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
