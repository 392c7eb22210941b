//! A fast hasher for maps whose keys are short and not chosen by an attacker who could exploit collisions.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Fx hashing (rustc's): the keys are a short string and three addresses, so a fast hasher is enough.
#[derive(Debug, Default)]
pub struct FxHasher(u64);

/// A map whose keys come from the operator's policy or this worker's own traffic, hashed with [`FxHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, FxBuildHasher>;

/// Builds [`FxHasher`]s, for maps other than std's.
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
