//! Admission limits: how many requests a target has in flight (with a bounded queue), and how fast a client may
//! call it (governor's GCRA, one state per key in a bounded map).
//!
//! Both are shared by every worker (one `Arc` per target), so a limit is the sidecar's, never multiplied by
//! the worker count.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_http::header::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::fxhash::FxHashMap;
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

type Keyed = RateLimiter<ClientKey, SharedStore, DefaultClock, NoOpMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// A target's rate limit.
#[derive(Debug)]
pub struct RateLimit {
    policy: RateLimitPolicy,
    limiter: Limiter,
    clock: DefaultClock,
    /// `"<name>";q=<requests>;w=<seconds>`: the `RateLimit-Policy` header, built once.
    policy_header: HeaderValue,
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
    pub fn new(policy: RateLimitPolicy, name: Arc<str>) -> Self {
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        let period = policy.per / policy.requests.max(1);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        let clock = DefaultClock::default();
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
        Self {
            policy,
            limiter,
            clock,
            policy_header,
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
        let t = limited.retry_after.as_secs_f64().ceil().max(1.0);
        HeaderValue::from_str(&format!("\"{}\";r=0;t={t}", sf_string(&self.name)))
            .unwrap_or_else(|_| HeaderValue::from_static("\"default\";r=0;t=1"))
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
#[derive(Debug)]
pub struct BoundedStore {
    map: RwLock<FxHashMap<ClientKey, Entry>>,
    max_keys: usize,
    overflow: InMemoryState,
    /// How long an untouched bucket takes to refill completely: after that it is the same as a new one.
    idle: Duration,
    epoch: Instant,
}

#[derive(Debug, Default)]
struct Entry {
    state: InMemoryState,
    /// Milliseconds since `epoch` of the last request with this key.
    seen: AtomicU64,
}

impl BoundedStore {
    fn new(max_keys: usize, idle: Duration) -> Self {
        Self {
            map: RwLock::new(FxHashMap::default()),
            max_keys,
            overflow: InMemoryState::default(),
            idle,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Removes the keys idle for longer than a full refill; returns how many remain.
    pub fn evict_idle(&self) -> usize {
        let cutoff = self
            .now_ms()
            .saturating_sub(self.idle.as_millis() as u64 + 1);
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, e| e.seen.load(Ordering::Relaxed) > cutoff);
        map.len()
    }

    pub fn keys(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
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
        {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = map.get(key) {
                entry.seen.store(now, Ordering::Relaxed);
                return entry.state.measure_and_replace(&NotKeyed::NonKey, f);
            }
            if map.len() >= self.max_keys {
                return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
            }
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.max_keys && !map.contains_key(key) {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let entry = map.entry(key.clone()).or_default();
        entry.seen.store(now, Ordering::Relaxed);
        entry.state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}
