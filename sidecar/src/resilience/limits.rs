//! Admission limits: how many requests a target has in flight (with a bounded queue), and how fast a client may
//! call it (governor's GCRA, one state per key in a bounded map).
//!
//! Both are shared by every worker (one `Arc` per target), so a limit is the sidecar's, never multiplied by
//! the worker count. Neither takes a lock: the slots are a semaphore's atomic count, a bucket is governor's
//! one compare-and-swap, and a keyed limit finds its bucket in a lock-free map (papaya), whose readers never
//! wait for a writer. Rate limits read the sidecar's [`Clock`].

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_http::header::{HeaderMap, HeaderValue};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::clock::Clock;
use crate::policy::traffic::{ConcurrencyPolicy, LimitKey, RateLimitPolicy};

/// The in-flight limit of one target, with a bounded queue in front of it.
#[derive(Debug)]
pub struct Concurrency {
    policy: ConcurrencyPolicy,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
}

/// Why a request was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// The queue was full: refused at once.
    QueueFull,
    /// It waited the queue timeout without a slot coming free.
    QueueTimeout,
    /// The request's own deadline came first.
    Deadline,
}

impl Overload {
    pub fn as_str(self) -> &'static str {
        match self {
            Overload::QueueFull => "queue_full",
            Overload::QueueTimeout => "queue_timeout",
            Overload::Deadline => "deadline",
        }
    }
}

impl Concurrency {
    pub fn new(policy: ConcurrencyPolicy) -> Self {
        Self {
            policy,
            slots: Arc::new(Semaphore::new(policy.max_in_flight)),
            queued: AtomicUsize::new(0),
        }
    }

    /// A slot, held until the returned permit drops (when the response body ends).
    pub async fn acquire(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Overload> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(Overload::QueueFull),
            Err(TryAcquireError::NoPermits) => {}
        }
        // Join the queue only if it has room; the count and the check race benignly (a burst may overshoot by
        // the number of workers, never without bound).
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.policy.queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Overload::QueueFull);
        }
        let wait_until = (Instant::now() + self.policy.queue_timeout).min(deadline);
        let waited =
            tokio::time::timeout_at(wait_until.into(), self.slots.clone().acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Overload::QueueFull),
            Err(_elapsed) if wait_until >= deadline => Err(Overload::Deadline),
            Err(_elapsed) => Err(Overload::QueueTimeout),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.policy
            .max_in_flight
            .saturating_sub(self.slots.available_permits())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Whose bucket a request draws from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Address(IpAddr),
    Header(HeaderValue),
    /// The key header was missing: such requests share one bucket.
    Missing,
}

type Keyed = RateLimiter<ClientKey, SharedStore, Clock, NoOpMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, Clock, NoOpMiddleware>;

/// A target's rate limit.
#[derive(Debug)]
pub struct RateLimit {
    policy: RateLimitPolicy,
    limiter: Limiter,
    clock: Clock,
    /// `"<name>";q=<requests>;w=<seconds>`: the `RateLimit-Policy` header, built once.
    policy_header: HeaderValue,
    /// `"<name>";r=0;t=<seconds>`: the `RateLimit` header of a refusal, built once for each wait in whole
    /// seconds a refusal can give (1 to the limit's period, at most [`REFUSAL_HEADERS`]).
    refusal_headers: Vec<HeaderValue>,
    name: Arc<str>,
    /// The keyed limiter's store, shared with it so the control plane can evict idle keys.
    store: Option<Arc<BoundedStore>>,
}

#[derive(Debug)]
enum Limiter {
    Direct(Direct),
    Keyed(Keyed),
}

/// A refusal: wait this long before trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl RateLimit {
    pub fn new(policy: RateLimitPolicy, name: Arc<str>, clock: Clock) -> Self {
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        let period = policy.per / policy.requests.max(1);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let (limiter, store) = match policy.key {
            LimitKey::Service => (
                Limiter::Direct(RateLimiter::new(
                    quota,
                    InMemoryState::default(),
                    clock.clone(),
                )),
                None,
            ),
            LimitKey::Source | LimitKey::Header(_) => {
                let store = Arc::new(BoundedStore::new(
                    policy.max_keys,
                    quota.burst_size_replenished_in(),
                    clock.clone(),
                ));
                let limiter = RateLimiter::new(quota, SharedStore(store.clone()), clock.clone());
                (Limiter::Keyed(limiter), Some(store))
            }
        };
        let window = policy.per.as_secs().max(1);
        let policy_header = HeaderValue::from_str(&format!(
            "\"{}\";q={};w={window}",
            sf_string(&name),
            policy.requests
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\""));
        // A refusal waits for one request's share of the period at most: whole seconds 1 to the period's.
        let waits = window.min(REFUSAL_HEADERS);
        let refusal_headers = (1..=waits).map(|t| refusal_value(&name, t)).collect();
        Self {
            policy,
            limiter,
            clock,
            policy_header,
            refusal_headers,
            name,
            store,
        }
    }

    /// Takes one request from the caller's bucket.
    pub fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<(), Limited> {
        let outcome = match &self.limiter {
            Limiter::Direct(l) => l.check(),
            Limiter::Keyed(l) => {
                let key = match &self.policy.key {
                    LimitKey::Header(name) => headers
                        .get(name)
                        .map_or(ClientKey::Missing, |v| ClientKey::Header(v.clone())),
                    _ => peer.map_or(ClientKey::Missing, ClientKey::Address),
                };
                l.check_key(&key)
            }
        };
        outcome.map_err(|not_until| Limited {
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// The `RateLimit-Policy` header value.
    pub fn policy_header(&self) -> &HeaderValue {
        &self.policy_header
    }

    /// The `RateLimit` header value for a refusal: nothing remains, and when the next request fits.
    pub fn refusal_header(&self, limited: Limited) -> HeaderValue {
        let wait = limited.retry_after;
        let t = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        match self.refusal_headers.get(t as usize - 1) {
            Some(value) => value.clone(),
            None => refusal_value(&self.name, t),
        }
    }

    /// Forgets keys whose bucket has refilled (the control plane calls this on a timer); returns the keys
    /// still tracked.
    pub fn evict_idle(&self) -> usize {
        self.store.as_ref().map_or(1, |s| s.evict_idle())
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.store.as_ref().map_or(1, |s| s.keys())
    }
}

/// Refusal headers built ahead, one per whole second of wait.
const REFUSAL_HEADERS: u64 = 60;

fn refusal_value(name: &str, t: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{}\";r=0;t={t}", sf_string(name)))
        .unwrap_or_else(|_| HeaderValue::from_static("\"default\";r=0;t=1"))
}

/// A structured-field string's content: only printable ASCII, with `"` and `\` escaped.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars().filter(|c| c.is_ascii_graphic() || *c == ' ') {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A keyed state store that holds at most `max_keys` keys; requests with further keys share one overflow
/// bucket until idle keys are evicted. Bounded memory whatever the clients send.
///
/// The map is papaya's: a lookup takes no lock and never waits for an insert or an eviction. Keys are
/// chosen by clients (a source address, a header's value), so they are hashed with a keyed hash (SipHash),
/// not the fast one that policy names get. Workers that add new keys at the same instant may each pass the
/// bound by one before the count catches up.
#[derive(Debug)]
pub struct BoundedStore {
    map: papaya::HashMap<ClientKey, Entry>,
    max_keys: usize,
    overflow: InMemoryState,
    /// How long an untouched bucket takes to refill completely: after that it is the same as a new one.
    idle: Duration,
    clock: Clock,
    epoch: Instant,
    /// Held by the one eviction that runs at a time (the control plane's timer); requests never take it.
    evicting: Mutex<()>,
}

#[derive(Debug, Default)]
struct Entry {
    state: InMemoryState,
    /// Milliseconds since `epoch` of the last request with this key.
    seen: AtomicU64,
}

impl BoundedStore {
    fn new(max_keys: usize, idle: Duration, clock: Clock) -> Self {
        Self {
            map: papaya::HashMap::new(),
            max_keys,
            overflow: InMemoryState::default(),
            idle,
            epoch: clock.now(),
            clock,
            evicting: Mutex::new(()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock
            .now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
    }

    /// Removes the keys idle for longer than a full refill; returns how many remain.
    pub fn evict_idle(&self) -> usize {
        let _one_at_a_time = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        let cutoff = self
            .now_ms()
            .saturating_sub(self.idle.as_millis() as u64 + 1);
        let map = self.map.pin();
        map.retain(|_, e| e.seen.load(Ordering::Relaxed) > cutoff);
        map.len()
    }

    pub fn keys(&self) -> usize {
        self.map.len()
    }
}

/// The store as the limiter holds it.
#[derive(Debug)]
pub struct SharedStore(Arc<BoundedStore>);

impl StateStore for SharedStore {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure(key, f)
    }
}

impl BoundedStore {
    fn measure<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let now = self.now_ms();
        let map = self.map.pin();
        let entry = match map.get(key) {
            Some(entry) => entry,
            None if map.len() >= self.max_keys => {
                return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
            }
            None => map.get_or_insert_with(key.clone(), Entry::default),
        };
        if entry.seen.load(Ordering::Relaxed) != now {
            entry.seen.store(now, Ordering::Relaxed);
        }
        entry.state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_source(requests: u32, per: Duration, max_keys: usize, clock: &Clock) -> RateLimit {
        RateLimit::new(
            RateLimitPolicy {
                requests,
                per,
                burst: requests,
                key: LimitKey::Source,
                max_keys,
            },
            Arc::from("orders"),
            clock.clone(),
        )
    }

    fn peer(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_client_is_refused_past_its_rate_and_served_again_when_its_clock_says_so() {
        let clock = Clock::manual();
        let limit = by_source(2, Duration::from_secs(2), 16, &clock);
        let headers = HeaderMap::new();
        assert!(limit.check(&headers, peer(1)).is_ok());
        assert!(limit.check(&headers, peer(1)).is_ok());
        let refused = limit.check(&headers, peer(1)).expect_err("past the burst");
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(limit.refusal_header(refused), "\"orders\";r=0;t=1");
        // Another client has its own bucket.
        assert!(limit.check(&headers, peer(2)).is_ok());
        clock.advance(Duration::from_secs(1));
        assert!(limit.check(&headers, peer(1)).is_ok());
    }

    #[test]
    fn keys_past_the_bound_share_one_bucket_until_idle_ones_are_evicted() {
        let clock = Clock::manual();
        let limit = by_source(1, Duration::from_secs(1), 2, &clock);
        let headers = HeaderMap::new();
        assert!(limit.check(&headers, peer(1)).is_ok());
        assert!(limit.check(&headers, peer(2)).is_ok());
        assert_eq!(limit.keys(), 2);
        // Two keys is the bound: the third and the fourth client share the overflow bucket.
        assert!(limit.check(&headers, peer(3)).is_ok());
        assert!(limit.check(&headers, peer(4)).is_err());
        assert_eq!(limit.keys(), 2);
        // Once their buckets have refilled, the first two are forgotten and the others get their own.
        clock.advance(Duration::from_secs(2));
        assert_eq!(limit.evict_idle(), 0);
        assert!(limit.check(&headers, peer(4)).is_ok());
        assert_eq!(limit.keys(), 1);
    }

    #[test]
    fn a_refusal_header_past_the_ones_built_ahead_is_still_exact() {
        let limit = by_source(1, Duration::from_secs(3600), 2, &Clock::manual());
        let wait = |secs: f64| Limited {
            retry_after: Duration::from_secs_f64(secs),
        };
        assert_eq!(limit.refusal_header(wait(0.2)), "\"orders\";r=0;t=1");
        assert_eq!(limit.refusal_header(wait(59.5)), "\"orders\";r=0;t=60");
        assert_eq!(limit.refusal_header(wait(61.0)), "\"orders\";r=0;t=61");
        assert_eq!(limit.refusal_header(wait(3600.0)), "\"orders\";r=0;t=3600");
    }
}
