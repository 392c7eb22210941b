//! Counts over a sliding window without a lock: the breaker's failure-rate window and the retry budget.
//!
//! The window is [`BUCKETS`] buckets of a tenth of it each. A bucket is one atomic word: the bucket's number
//! (since its owner's epoch, wrapping at 32 bits) in the high half and its count in the low half. A writer
//! that finds an older number starts the bucket afresh in the same compare-and-swap; a reader adds only the
//! buckets whose number is in the window. Nothing sweeps, and nothing is ever waited on.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets per window.
pub const BUCKETS: usize = 10;

/// One count over the window.
#[derive(Debug)]
pub struct Buckets {
    slots: [AtomicU64; BUCKETS],
}

impl Default for Buckets {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Buckets {
    /// Adds one to bucket number `at`.
    pub fn add(&self, at: u32) {
        let slot = &self.slots[at as usize % BUCKETS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(if (v >> 32) as u32 == at {
                // Saturates within the bucket: the count never carries into the number.
                v.saturating_add(1)
                    .min(u64::from(at) << 32 | u64::from(u32::MAX))
            } else {
                u64::from(at) << 32 | 1
            })
        });
    }

    /// The count of the window that ends with bucket number `at`.
    pub fn sum(&self, at: u32) -> u64 {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .filter(|v| at.wrapping_sub((v >> 32) as u32) < BUCKETS as u32)
            .map(|v| v & u64::from(u32::MAX))
            .sum()
    }

    /// Empties the window as of bucket number `at`: every bucket is marked with a number already out of it.
    pub fn clear(&self, at: u32) {
        let stale = u64::from(at.wrapping_sub(BUCKETS as u32)) << 32;
        for slot in &self.slots {
            slot.store(stale, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_leaves_the_window_ten_buckets_later() {
        let b = Buckets::default();
        b.add(3);
        b.add(3);
        b.add(7);
        assert_eq!(b.sum(7), 3);
        assert_eq!(b.sum(12), 3);
        assert_eq!(b.sum(13), 1, "bucket 3 is out of the window 4..=13");
        assert_eq!(b.sum(17), 0);
        // Bucket 13 reuses bucket 3's word and starts it afresh.
        b.add(13);
        assert_eq!(b.sum(13), 2);
    }

    #[test]
    fn numbers_wrap_without_losing_the_window() {
        let b = Buckets::default();
        b.add(u32::MAX);
        b.add(0);
        assert_eq!(b.sum(1), 2);
        b.clear(1);
        assert_eq!(b.sum(1), 0);
        b.add(1);
        assert_eq!(b.sum(1), 1);
    }
}
