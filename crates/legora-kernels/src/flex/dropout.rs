//! Dropout masks drawn on the host with a counter-based SplitMix64 (in parallel chunks)
//! instead of one `Bernoulli` sample per element from the backend's ChaCha generator.
//! One 48-bit seed per mask comes from the backend's generator, so `B::seed` still makes
//! every mask reproducible, independent of the thread count.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rayon::prelude::*;

use super::{all_f32, mode};

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Elements `start..start + out.len()` of the mask of `seed`: each `1/keep` with
/// probability `keep`, else 0. Counter-based (element `i` takes 24 bits of half `i % 2`
/// of `mix(seed + (i / 2)·golden)`, so it depends on `seed` and `i` only): any range can
/// be drawn, or drawn again, on its own.
pub(crate) fn mask_range(seed: u64, keep: f64, start: usize, out: &mut [f32]) {
    let threshold = (keep * (1u64 << 24) as f64) as u32;
    let scale = (1.0 / keep) as f32;
    let pick = |z: u64, half: usize| {
        if (((z >> (32 * half)) as u32) >> 8) < threshold {
            scale
        } else {
            0.0
        }
    };
    let draw = |pair: usize| mix(seed.wrapping_add((pair as u64).wrapping_mul(GOLDEN)));
    let (mut i, end) = (start, start + out.len());
    let mut rest: &mut [f32] = out;
    if i % 2 == 1 && i < end {
        rest[0] = pick(draw(i / 2), 1);
        rest = &mut rest[1..];
        i += 1;
    }
    let mut pairs = rest.chunks_exact_mut(2);
    for (k, pair) in (&mut pairs).enumerate() {
        let z = draw(i / 2 + k);
        pair[0] = pick(z, 0);
        pair[1] = pick(z, 1);
    }
    if let [last] = pairs.into_remainder() {
        *last = pick(draw((end - 1) / 2), 0);
    }
}

/// `n` mask values of [`mask_range`], drawn in parallel.
pub(crate) fn mask(n: usize, keep: f64, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 13;
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| mask_range(seed, keep, c * CHUNK, chunk));
    out
}

/// A fresh 48-bit mask seed from backend `B`'s seeded generator (so `B::seed` governs it).
pub(crate) fn draw_seed<B: Backend>(device: &B::Device) -> u64 {
    let draw: Vec<f32> = Tensor::<B, 1>::random([2], Distribution::Default, device)
        .into_data()
        .to_vec()
        .unwrap_or_default();
    draw.iter().fold(0u64, |acc, u| {
        (acc << 24) ^ ((u * (1u32 << 24) as f32) as u64)
    })
}

/// Fused [`crate::dropout`] (the caller has checked that autodiff is on and `p > 0`).
pub(crate) fn dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    p: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if mode::<B>().is_none() || !all_f32(&[x.dtype()]) {
        return Err(x);
    }
    let device = x.device();
    let seed = draw_seed::<B>(&device);
    let shape = x.dims();
    let m = mask(shape.iter().product(), 1.0 - p, seed);
    Ok(x * Tensor::from_data(TensorData::new(m, shape), &device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_draws_the_same_elements_as_the_whole_mask() {
        let whole = mask(1001, 0.7, 5);
        for (start, len) in [
            (0, 1001),
            (1, 10),
            (2, 9),
            (3, 1),
            (500, 501),
            (999, 2),
            (1000, 1),
        ] {
            let mut part = vec![0.0f32; len];
            mask_range(5, 0.7, start, &mut part);
            assert_eq!(part, whole[start..start + len], "range {start}..+{len}");
        }
    }
}
