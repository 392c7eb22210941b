//! The time the resilience state reads: breakers, retry budgets and rate limits take `now` from a [`Clock`],
//! so that their stories move time forward instead of sleeping.
//!
//! A sidecar has one clock, given to it at start ([`crate::server::RunOptions`]) and shared by every target of
//! every snapshot. The system clock costs one `Instant::now()`; a manual clock (tests) reads a fixed start
//! plus an offset that only [`Clock::advance`] moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Monotonic time: the system's, or a manual one that tests advance.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    start: Instant,
    /// Nanoseconds past `start`.
    offset: AtomicU64,
}

impl Clock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that stands still until [`Clock::advance`] moves it (every clone moves with it).
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                start: Instant::now(),
                offset: AtomicU64::new(0),
            })),
        }
    }

    #[inline]
    pub fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => m.start + Duration::from_nanos(m.offset.load(Ordering::Acquire)),
        }
    }

    /// Moves a manual clock forward by `by`. The system clock moves by itself: this is a no-op for it.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            m.offset.fetch_add(nanos, Ordering::AcqRel);
        }
    }

    /// True for a clock that only [`Clock::advance`] moves.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

/// governor's rate limiters read the same clock.
impl governor::clock::Clock for Clock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        Clock::now(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_its_clones_move_with_it() {
        let clock = Clock::manual();
        let copy = clock.clone();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        copy.advance(Duration::from_secs(3));
        assert_eq!(clock.now() - t0, Duration::from_secs(3));
    }

    #[test]
    fn the_system_clock_moves_by_itself() {
        let clock = Clock::system();
        let t0 = clock.now();
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() - t0 < Duration::from_secs(60));
    }
}
