//! Client-side load balancing over a service's endpoints: power of two choices over peak-EWMA latency
//! (Linkerd's default), least request, round robin, and consistent hashing with bounded loads.
//!
//! Owns: each endpoint's load figures ([`Load`]: requests in flight and a peak-EWMA latency estimate, both
//! atomics) and the hash ring. Does not own: which endpoints exist or are ejected (the snapshot's services and
//! their breakers) — [`crate::snapshot::Service::pick`] combines the two.
//!
//! Everything here is lock-free and allocation-free on the request path.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latency assumed for an endpoint that has not answered yet (Linkerd's default RTT is 30 ms; ours is lower
/// because a sidecar's upstreams are usually near).
const DEFAULT_RTT: Duration = Duration::from_millis(5);

/// Virtual nodes per endpoint on the hash ring: enough for an even spread over a handful of endpoints.
const POINTS_PER_ENDPOINT: u32 = 160;

/// One endpoint's load: requests in flight and a peak-EWMA latency estimate.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicU32,
    /// The estimate in nanoseconds, as of `stamp`.
    ewma_ns: AtomicU64,
    /// Nanoseconds since the service's epoch of the last update.
    stamp_ns: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(DEFAULT_RTT.as_nanos() as u64),
            stamp_ns: AtomicU64::new(0),
        }
    }
}

impl Load {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The latency estimate at `now_ns`, decayed toward zero since its last update so that an endpoint that
    /// was slow once is tried again in time.
    pub fn latency_ns(&self, now_ns: u64, decay: Duration) -> f64 {
        let estimate = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let elapsed = now_ns.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        estimate * (-elapsed / decay.as_nanos() as f64).exp()
    }

    /// Peak-EWMA cost: the latency estimate × (requests in flight + 1).
    pub fn cost(&self, now_ns: u64, decay: Duration) -> f64 {
        self.latency_ns(now_ns, decay) * f64::from(self.in_flight() + 1)
    }

    /// Records one response time: a higher one replaces the estimate at once (the peak), a lower one is
    /// averaged in with a weight that grows with the time since the last update.
    pub fn observe(&self, rtt: Duration, now_ns: u64, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let last = self.stamp_ns.load(Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(last) as f64;
        let estimate = self.ewma_ns.load(Ordering::Relaxed) as f64;
        let next = if rtt > estimate {
            rtt
        } else {
            let w = (-elapsed / decay.as_nanos() as f64).exp();
            estimate * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next as u64, Ordering::Relaxed);
        self.stamp_ns.store(now_ns.max(last), Ordering::Relaxed);
    }
}

/// A monotonic nanosecond clock from a fixed epoch, for [`Load`].
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock {
    pub fn now_ns(self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// A stable 64-bit hash: FNV-1a finished with MurmurHash3's mixer. The same on every build and machine (never
/// std's `DefaultHasher`, whose output may change between releases).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The hash ring: [`POINTS_PER_ENDPOINT`] points per endpoint, placed by the hash of its address, so removing
/// an endpoint moves only the keys that were on its points.
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new<'a>(addresses: impl Iterator<Item = &'a str>) -> Self {
        let mut points = Vec::new();
        for (index, address) in addresses.enumerate() {
            for i in 0..POINTS_PER_ENDPOINT {
                let point = stable_hash(format!("{address}#{i}").as_bytes());
                points.push((point, index as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Walks the ring clockwise from `key` and returns the first endpoint that `accept`s (at most one lap).
    pub fn walk(&self, key: u64, mut accept: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < key);
        let n = self.points.len();
        (0..n)
            .map(|i| self.points[(start + i) % n].1 as usize)
            .find(|&index| accept(index))
    }
}

/// The most requests one endpoint may carry under consistent hashing with bounded loads: `factor` × the
/// average, counting the request being placed (Mirrokni et al.; Envoy's `hash_balance_factor`).
pub fn load_bound(total_in_flight: u64, endpoints: usize, factor: f64) -> u64 {
    let average = (total_in_flight + 1) as f64 / endpoints.max(1) as f64;
    (average * factor).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8080")).collect()
    }

    #[test]
    fn the_hash_is_stable_across_builds() {
        // Pinned values: a change here would move every consistent-hash key of every deployment.
        assert_eq!(stable_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(b"user-42"), 0xa395_32c7_ab05_1e8d);
    }

    #[test]
    fn removing_one_of_five_endpoints_moves_only_its_keys() {
        let five = addresses(5);
        let ring = Ring::new(five.iter().map(String::as_str));
        let four: Vec<&str> = five
            .iter()
            .map(String::as_str)
            .filter(|a| *a != five[2])
            .collect();
        let smaller = Ring::new(four.iter().copied());
        let mut moved = 0;
        for k in 0..10_000u32 {
            let key = stable_hash(&k.to_le_bytes());
            let before = &five[ring.walk(key, |_| true).unwrap()];
            let after = four[smaller.walk(key, |_| true).unwrap()];
            if before != &five[2] {
                assert_eq!(before, after, "key {k} moved without cause");
            } else {
                moved += 1;
            }
        }
        // Its share of the keys, give or take the spread of the ring.
        assert!(
            (1_000..3_000).contains(&moved),
            "{moved} keys were on the removed endpoint"
        );
    }

    #[test]
    fn bounded_loads_cap_every_endpoint_even_for_one_hot_key() {
        let five = addresses(5);
        let ring = Ring::new(five.iter().map(String::as_str));
        let mut load = [0u64; 5];
        // A hot key: every request has the same key, and none finishes.
        let hot = stable_hash(b"hot");
        for _ in 0..1_000 {
            let total: u64 = load.iter().sum();
            let bound = load_bound(total, 5, 1.25);
            let i = ring.walk(hot, |i| load[i] < bound).unwrap();
            load[i] += 1;
        }
        let max = *load.iter().max().unwrap();
        assert!(
            max <= 250,
            "max load {max} of 1000 over 5 endpoints, bound 1.25 × 200"
        );
        // Without load the same key always lands on the same endpoint.
        let a = ring.walk(hot, |_| true);
        assert_eq!(a, ring.walk(hot, |_| true));
    }

    #[test]
    fn peak_ewma_takes_a_peak_at_once_and_forgets_it_in_time() {
        let load = Load::default();
        let decay = Duration::from_secs(10);
        load.observe(Duration::from_millis(100), 1, decay);
        assert!((load.latency_ns(1, decay) - 100e6).abs() < 1.0);
        load.observe(Duration::from_millis(1), 2, decay);
        assert!(
            load.latency_ns(2, decay) > 99e6,
            "a quick answer right after barely moves it"
        );
        let later = 20_000_000_000;
        assert!(
            load.latency_ns(later, decay) < 15e6,
            "two decay periods later it is mostly gone"
        );
        load.begin();
        assert!(
            load.cost(2, decay) > 2.0 * 99e6,
            "requests in flight multiply the cost"
        );
        load.end();
    }
}
