//! A small, serializable PRNG (SplitMix64) for shuffles, splits and sampling.
//!
//! The whole state is one `u64`, so a checkpoint stores it and training resumes
//! on exactly the same random stream. Not for cryptography.

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea & Flood 2014; the seeding generator of xoshiro).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    /// The generator state; the next output is a function of `state + γ`.
    pub state: u64,
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 finalizer step: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string: a stable (cross-platform, cross-version) name hash used to
/// derive per-task seeds, so a task's data order does not depend on the other tasks.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// A seed derived from a parent seed and a list of integers (e.g. task hash, epoch).
pub fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed ^ GAMMA), |acc, p| {
        mix64(acc ^ mix64(p.wrapping_add(GAMMA)))
    })
}

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[0, n)`, without modulo bias (Lemire's method).
    ///
    /// # Panics
    /// If `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Fisher–Yates shuffle in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        self.shuffle(&mut p);
        p
    }

    /// Index drawn from the discrete distribution `probs` (need not be normalized;
    /// non-positive weights are never drawn).
    ///
    /// # Panics
    /// If no weight is positive.
    pub fn weighted(&mut self, probs: &[f64]) -> usize {
        let total: f64 = probs.iter().filter(|p| **p > 0.0).sum();
        assert!(total > 0.0, "Rng::weighted: no positive weight");
        let mut u = self.next_f64() * total;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p <= 0.0 {
                continue;
            }
            last = i;
            if u < p {
                return i;
            }
            u -= p;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // Vigna's reference `splitmix64.c` with x = 0: the first output is
        // mix64(0x9E3779B97F4A7C15) = 0xE220A8397B1DCDAF (also checked against
        // an independent Python transcription of the C code).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::new(7);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[r.below(5)] += 1;
        }
        for c in counts {
            // expected 10_000, std ≈ 89: ±5 std
            assert!((9_550..=10_450).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = Rng::new(3).permutation(100);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(p, Rng::new(3).permutation(100));
        assert_ne!(p, Rng::new(4).permutation(100));
    }

    #[test]
    fn derived_seeds_differ() {
        let a = derive_seed(1, &[stable_hash("medical"), 0]);
        let b = derive_seed(1, &[stable_hash("finance"), 0]);
        let c = derive_seed(1, &[stable_hash("medical"), 1]);
        assert!(a != b && a != c && b != c);
        // FNV-1a("a") from the FNV reference table
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
