//! Decoding products over `Q8_0` / `Q4_0` blocks as llama.cpp computes them
//! (`ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q8_0_q8_0`): each row of `x` is quantized to
//! `Q8_0` once per product ([`Q8Rows`]: per 32 values the scale `max|x| / 127` rounded to
//! f16 and the codes `round(x / scale)`), and each weight block's dot product with it is
//! taken in integers — on x86-64 with AVX2 (checked at run time) 32 products at a time by
//! `maddubs` on `|w| × sign(w)·x` — then scaled by the two block scales. A decode step
//! reads every weight once, and widening 4-bit codes to f32 costs more than reading
//! them: the integer products do a quarter of the work. The result differs from
//! dequantize-then-f32 by the activations' 8-bit rounding (a relative error of about
//! 1/254 per value, averaging out in the sums), as llama.cpp's does.

use crate::quant::ggml::GgmlType;
use crate::quant::MATVEC_MAX_ROWS;

/// Values per `Q8_0` block.
const QK8_0: usize = 32;

/// Whether [`dots`] serves weights of type `ty`.
pub(crate) fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0)
}

/// Up to [`MATVEC_MAX_ROWS`] rows of `x` quantized to `Q8_0`.
pub(crate) struct Q8Rows {
    /// Values per row (a multiple of 32).
    din: usize,
    /// Rows.
    n: usize,
    /// Per row, per block: the scale (an f16 value, as f32).
    d: Vec<f32>,
    /// Per row, the codes.
    qs: Vec<i8>,
}

impl Q8Rows {
    /// `x [n, din]` quantized as `quantize_row_q8_0_ref` does (`roundf`: halves away
    /// from zero); `din` must be a multiple of 32.
    pub(crate) fn new(n: usize, din: usize, x: &[f32]) -> Self {
        debug_assert!(din % QK8_0 == 0 && x.len() >= n * din);
        let blocks = din / QK8_0;
        let mut d = Vec::with_capacity(n * blocks);
        let mut qs = vec![0i8; n * din];
        for (xb, qb) in x[..n * din]
            .chunks_exact(QK8_0)
            .zip(qs.chunks_exact_mut(QK8_0))
        {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round() as i8;
            }
            d.push(half::f16::from_f32(scale).to_f32());
        }
        Q8Rows { din, n, d, qs }
    }

    /// Row `r`'s scales and codes.
    fn row(&self, r: usize) -> (&[f32], &[i8]) {
        let blocks = self.din / QK8_0;
        (
            &self.d[r * blocks..(r + 1) * blocks],
            &self.qs[r * self.din..(r + 1) * self.din],
        )
    }
}

/// `dots[r] = x[r] · W[j]` for the rows of `xq`, `row` the blocks of `W[j]` (type `ty`,
/// [`supports`]ed, `xq.din` values).
pub(crate) fn dots(ty: GgmlType, row: &[u8], xq: &Q8Rows, dots: &mut [f32; MATVEC_MAX_ROWS]) {
    debug_assert!(supports(ty) && row.len() == xq.din / QK8_0 * ty.type_size());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        // SAFETY: AVX2, FMA and F16C are present (checked above); the sizes are the caller's
        // contract (asserted in debug builds, and re-checked by `avx::dots`).
        unsafe { avx::dots(ty, row, xq, dots) };
        return;
    }
    portable_dots(ty, row, xq, dots);
}

/// The signed 4- or 8-bit code `k` of a weight block `b` (Q4_0: low nibbles first, minus
/// 8; Q8_0: the byte).
fn code(ty: GgmlType, b: &[u8], k: usize) -> i32 {
    match ty {
        GgmlType::Q4_0 if k < 16 => (b[2 + k] & 0x0F) as i32 - 8,
        GgmlType::Q4_0 => (b[2 + k - 16] >> 4) as i32 - 8,
        _ => b[2 + k] as i8 as i32,
    }
}

/// The portable dot products: one integer sum per block, scaled and added in f32 (as
/// ggml's scalar loop).
fn portable_dots(ty: GgmlType, row: &[u8], xq: &Q8Rows, dots: &mut [f32; MATVEC_MAX_ROWS]) {
    let ts = ty.type_size();
    for (r, out) in dots[..xq.n].iter_mut().enumerate() {
        let (d, qs) = xq.row(r);
        let mut sum = 0.0f32;
        for (i, b) in row.chunks_exact(ts).enumerate() {
            let qx = &qs[i * QK8_0..(i + 1) * QK8_0];
            let s: i32 = (0..QK8_0).map(|k| code(ty, b, k) * qx[k] as i32).sum();
            let dw = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            sum += s as f32 * (dw * d[i]);
        }
        *out = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Q8Rows, QK8_0};
    use crate::flex::matvec::avx::hsum;
    use crate::quant::ggml::GgmlType;
    use crate::quant::MATVEC_MAX_ROWS;
    use std::arch::x86_64::*;

    /// [`super::portable_dots`] with AVX2: per block, the 32 weight codes as signed
    /// bytes, `maddubs(|w|, sign(w)·x)` then `madd` with ones to eight `i32` sums, scaled
    /// by `dw · dx` into eight f32 accumulators per row of `x`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots(
        ty: GgmlType,
        row: &[u8],
        xq: &Q8Rows,
        dots: &mut [f32; MATVEC_MAX_ROWS],
    ) {
        let blocks = xq.din / QK8_0;
        assert!(row.len() >= blocks * ty.type_size() && (1..=MATVEC_MAX_ROWS).contains(&xq.n));
        assert!(xq.qs.len() >= xq.n * xq.din && xq.d.len() >= xq.n * blocks);
        // SAFETY: the sizes asserted above are what `dots_n` reads.
        unsafe {
            match (ty == GgmlType::Q4_0, xq.n) {
                (true, 1) => dots_n::<true, 1>(row, xq, dots),
                (true, 2) => dots_n::<true, 2>(row, xq, dots),
                (true, 3) => dots_n::<true, 3>(row, xq, dots),
                (true, _) => dots_n::<true, 4>(row, xq, dots),
                (false, 1) => dots_n::<false, 1>(row, xq, dots),
                (false, 2) => dots_n::<false, 2>(row, xq, dots),
                (false, 3) => dots_n::<false, 3>(row, xq, dots),
                (false, _) => dots_n::<false, 4>(row, xq, dots),
            }
        }
    }

    /// [`dots`] for `N` rows of `x` and Q4_0 (`Q4`) or Q8_0 weight blocks.
    ///
    /// # Safety
    /// `row` holds `xq.din / 32` blocks, `xq` at least `N` rows; AVX2, FMA, F16C.
    // `r` indexes the accumulators and the rows of `x` together.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn dots_n<const Q4: bool, const N: usize>(
        row: &[u8],
        xq: &Q8Rows,
        dots: &mut [f32; MATVEC_MAX_ROWS],
    ) {
        let ts = if Q4 { 18 } else { 34 };
        let blocks = xq.din / QK8_0;
        let (rp, qp, dp) = (row.as_ptr(), xq.qs.as_ptr(), xq.d.as_ptr());
        let ones = _mm256_set1_epi16(1);
        // two accumulators per row (even and odd blocks): two independent fma chains
        let mut acc = [[_mm256_setzero_ps(); N]; 2];
        // SAFETY: block b of the row is rp[b·ts..][..ts], and row r's codes and scales of
        // block b are qp[r·din + 32b..][..32] and dp[r·blocks + b]: inside the slices
        // (the caller's contract).
        unsafe {
            for b in 0..blocks {
                let blk = rp.add(b * ts);
                let bits = std::ptr::read_unaligned(blk as *const u16);
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))));
                let qw = weight_codes::<Q4>(blk.add(2));
                let aw = _mm256_sign_epi8(qw, qw);
                let acc = &mut acc[b % 2];
                for r in 0..N {
                    let qx = _mm256_loadu_si256(qp.add(r * xq.din + b * QK8_0).cast());
                    let sx = _mm256_sign_epi8(qx, qw);
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    let d = _mm256_set1_ps(dw * *dp.add(r * blocks + b));
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc[r]);
                }
            }
        }
        for (r, out) in dots[..N].iter_mut().enumerate() {
            *out = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
        }
    }

    /// A weight block's 32 codes as signed bytes, in element order (Q4_0: the low
    /// nibbles of the 16 bytes, then the high ones, minus 8).
    ///
    /// # Safety
    /// 16 (Q4_0) or 32 (Q8_0) bytes readable at `qs`; AVX2.
    #[inline(always)]
    unsafe fn weight_codes<const Q4: bool>(qs: *const u8) -> __m256i {
        // SAFETY: the caller's guarantees.
        unsafe {
            if Q4 {
                let q = _mm_loadu_si128(qs.cast());
                let m = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, m);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m);
                _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
            } else {
                _mm256_loadu_si256(qs.cast())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flex::matvec::tests::values;
    use crate::quant::ggml::dequantize;

    /// Random blocks of `ty` with finite half scales.
    fn blocks(ty: GgmlType, n: usize, seed: u32) -> Vec<u8> {
        let ts = ty.type_size();
        let mut bytes: Vec<u8> = values(n * ts, seed)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        for (i, b) in bytes.chunks_exact_mut(ts).enumerate() {
            let d = half::f16::from_f32(0.002 + 0.001 * (i % 7) as f32);
            b[..2].copy_from_slice(&d.to_le_bytes());
        }
        bytes
    }

    /// The AVX2 products equal the portable ones (the same integer sums, f32 sums in
    /// another order), and both are the dot product with the 8-bit activations — within
    /// 1% of the product with the f32 activations, for every row count.
    #[test]
    fn integer_dots_match_the_portable_ones_and_the_f32_product() {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
            for din in [32, 96, 576] {
                let row = blocks(ty, din / 32, din as u32);
                let mut w = vec![0.0f32; din];
                dequantize(ty, &row, &mut w).unwrap();
                for n in 1..=MATVEC_MAX_ROWS {
                    let x = values(n * din, 5 + n as u32);
                    let xq = Q8Rows::new(n, din, &x);
                    let (mut fast, mut slow) =
                        ([0.0f32; MATVEC_MAX_ROWS], [0.0f32; MATVEC_MAX_ROWS]);
                    dots(ty, &row, &xq, &mut fast);
                    portable_dots(ty, &row, &xq, &mut slow);
                    for r in 0..n {
                        let xr = &x[r * din..(r + 1) * din];
                        let exact: f32 = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
                        let scale: f32 = xr.iter().zip(&w).map(|(a, b)| (a * b).abs()).sum();
                        let what = format!("{ty} din {din} n {n} row {r}");
                        assert!((fast[r] - slow[r]).abs() <= 1e-5 * scale, "{what}");
                        assert!((slow[r] - exact).abs() <= 1e-2 * scale, "{what}");
                    }
                }
            }
        }
    }

    /// The activations round as llama.cpp's reference quantizer does.
    #[test]
    fn activations_quantize_as_ggml() {
        let mut x = vec![0.0f32; 32];
        x[0] = 31.75; // the largest: scale 31.75 / 127 = 0.25
        x[1] = -1.125; // -4.5 → -5 (halves away from zero)
        x[2] = 0.375; // 1.5 → 2
        x[3] = 0.125; // 0.5 → 1
        x[4] = 0.1; // 0.4 → 0
        let q = Q8Rows::new(1, 32, &x);
        assert_eq!(q.d[0], 0.25);
        assert_eq!(&q.qs[..5], &[127, -5, 2, 1, 0]);
        let zero = Q8Rows::new(1, 32, &[0.0; 32]);
        assert_eq!((zero.d[0], zero.qs[0]), (0.0, 0));
    }
}
