//! Retry decisions: which failures are retried for which methods, how long to wait between attempts (full
//! jitter), and what an upstream's `Retry-After` asks for.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use actix_http::Method;
use actix_http::header::{HeaderMap, HttpDate, RETRY_AFTER};

use crate::error::{Cause, Retry};
use crate::policy::traffic::Retries;

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A response head with this status.
    Status(u16),
    /// The sidecar's own failure of this attempt.
    Failed(Cause),
}

impl Attempt {
    /// Connect failures: the request never left, so even a POST is safe to send again.
    pub fn never_sent(self) -> bool {
        matches!(self, Attempt::Failed(c) if c.class().retry == Retry::NeverSent)
    }

    /// Whether the policy's conditions cover this outcome.
    pub fn matches(self, retries: &Retries) -> bool {
        match self {
            Attempt::Status(s) => retries.on.status(s),
            Attempt::Failed(c) => match c.class().retry {
                Retry::NeverSent => retries.on.connect_failure,
                Retry::Reset => retries.on.reset,
                Retry::AsGatewayTimeout => retries.on.status(504),
                Retry::No => false,
            },
        }
    }

    /// The `reason` label of the retry it causes.
    pub fn reason(self) -> &'static str {
        match self {
            Attempt::Status(s) if s >= 500 => "5xx",
            Attempt::Status(_) => "4xx",
            Attempt::Failed(c) => match c.class().retry {
                Retry::NeverSent => "connect-failure",
                Retry::AsGatewayTimeout => "per-try-timeout",
                Retry::Reset | Retry::No => "reset",
            },
        }
    }

    /// Counts against a breaker: a 5xx, or a cause the error table classes as an upstream failure.
    pub fn is_failure(self) -> bool {
        match self {
            Attempt::Status(s) => s >= 500,
            Attempt::Failed(c) => c.class().breaker,
        }
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE and TRACE are idempotent (RFC 9110 §9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The wait before retry number `n` (1 for the first retry): uniform in [0, min(max, base × 2ⁿ⁻¹)].
pub fn backoff(retries: &Retries, n: u32) -> Duration {
    let ceiling = retries
        .backoff_base
        .saturating_mul(1 << n.saturating_sub(1).min(20))
        .min(retries.backoff_max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(random_below(nanos.saturating_add(1)))
}

/// An upstream's `Retry-After`: delay seconds or an HTTP date, as a wait from now.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date: HttpDate = value.parse().ok()?;
    Some(
        SystemTime::from(date)
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is seeded from the OS once per thread: enough to decorrelate workers and processes.
    RandomState::new().hash_one(std::thread::current().id()) | 1
}

/// A uniform number in [0, bound): xorshift64*, plenty for jitter.
pub fn random_below(bound: u64) -> u64 {
    if bound <= 1 {
        return 0;
    }
    RNG.with(|cell| {
        let mut x = cell.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        cell.set(x);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((u128::from(r) * u128::from(bound)) >> 64) as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::traffic::Resilience;

    #[test]
    fn backoff_is_jittered_under_a_growing_ceiling() {
        let retries = Resilience::default().retries;
        for n in 1..8 {
            let ceiling =
                Duration::from_millis(25 * (1 << (n - 1))).min(Duration::from_millis(250));
            let samples: Vec<Duration> = (0..200).map(|_| backoff(&retries, n)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {n}");
            // Full jitter: spread over the whole range, not bunched at the ceiling.
            assert!(samples.iter().any(|d| *d < ceiling / 4), "retry {n}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn conditions_follow_the_policy_and_the_method() {
        let retries = Resilience::default().retries;
        assert!(Attempt::Status(503).matches(&retries));
        assert!(!Attempt::Status(500).matches(&retries));
        assert!(Attempt::Failed(Cause::UpstreamRefused).matches(&retries));
        assert!(Attempt::Failed(Cause::UpstreamReset).matches(&retries));
        assert!(Attempt::Failed(Cause::TryTimeout).matches(&retries));
        assert!(!Attempt::Failed(Cause::UpstreamProtocol).matches(&retries));
        assert!(idempotent(&Method::PUT) && !idempotent(&Method::POST));
        assert!(!Attempt::Failed(Cause::RequestBody).is_failure());
    }
}
