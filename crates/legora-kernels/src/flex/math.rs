//! Branch-free `exp` and sum that the compiler vectorizes (`f32::exp` is a libm call per
//! element: 5–7% of a training step in attention softmax, the NLL and SwiGLU).

/// `eˣ`: range reduction `x = n·ln2 + r` (n rounded with the 1.5·2²³ trick), Cephes'
/// degree-5 polynomial for `eʳ`, `2ⁿ` built in the exponent bits. Within 2 ulp of
/// `f32::exp` on [-87.3, 88.3]; 0 below that range, ~2e38 (not ∞) above it.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold n: 2ⁿ = bits (n + 127) << 23.
    let n_int = t.to_bits() as i32 - 0x4B40_0000;
    let e = y * f32::from_bits(((n_int + 127) << 23) as u32);
    // Exactly 0 below the range, as `f32::exp` underflows: masked attention scores must
    // give exact zeros, or the products of ~1e-38 with gradients fall into subnormals,
    // which x86 computes ~100× slower.
    if below {
        0.0
    } else {
        e
    }
}

/// `eˣ` of every element, in place.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

/// Sum with eight independent accumulators (vectorizes; the order differs from a
/// sequential sum by rounding only).
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ aᵢ·bᵢ`, with eight independent accumulators like [`sum`].
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 2 ulp of f32 ≈ 2.4e-7
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert!(exp(1e9).is_finite());
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn sum_matches_sequential_sum() {
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = xs.iter().map(|v| *v as f64).sum();
        assert!((sum(&xs) as f64 - want).abs() < 1e-4);
    }
}
