//! Matrix–vector products for decoding: `y[n, out] (+)= x[n, in] · Wᵀ` for a few rows of
//! `x` (`n ≤` [`MATVEC_MAX_ROWS`]: one new token per sequence), reading `W` in its stored
//! format (bf16, f16 or int8) straight from memory and converting eight values at a
//! time in registers. A decode step reads every frozen weight once, so its speed is the
//! memory's: bf16 halves the bytes of f32, int8 quarters them — the gemm path, which
//! first expands a tile to f32 in a scratch buffer, reads and writes more than it saves.
//!
//! The rows of `W` are split across the rayon threads in a few contiguous chunks; each
//! chunk computes its rows' dot products with all `n` rows of `x` (one pass over the
//! weight, `n` accumulators). On x86-64 with AVX2, FMA and F16C (checked at run time) the
//! dot products use those instructions; elsewhere a portable loop over the same values.
//! GGML blocks (a GGUF base) are decoded a row at a time, [`GGML_CHUNK`] values at a time
//! into a stack buffer (by [`ggml::block_decoder`], AVX2 for the common types), and
//! multiplied from there: the weight is read once, in its blocks, and the decoded values
//! never leave the L1 cache — except `Q8_0` and `Q4_0`, whose products are llama.cpp's
//! integer dot products with `x` quantized to `Q8_0` ([`super::qdot`]). bitsandbytes' 4-bit formats keep the tile path of
//! [`super::qgemm`].

use rayon::prelude::*;

use super::{qdot, SendPtr};
use crate::quant::ggml::{self, GgmlType};
use crate::quant::int8::INV_127;
use crate::quant::{QuantView, ViewData};

pub(crate) use crate::quant::MATVEC_MAX_ROWS;

/// Values of a GGML row decoded at a time (one K-quant super-block, eight 32-blocks).
const GGML_CHUNK: usize = ggml::QK_K;

/// Whether [`xwt`] serves this weight: bf16, f16, int8 and GGML blocks. An f32 weight
/// keeps `gemm`'s own matrix–vector path, which is as fast (both run at the memory's
/// speed) and gives few rows exactly the sums the batched products give.
pub(crate) fn supports(w: &QuantView<'_>) -> bool {
    match w.data() {
        ViewData::Bf16(_) | ViewData::F16(_) | ViewData::Int8 { .. } => true,
        ViewData::Ggml { ty, .. } => ggml::is_block_storage(ty),
        ViewData::F32(_) | ViewData::Bnb4(_) => false,
    }
}

/// `y[n, out] (+)= x[n, in] · Wᵀ` for `1 ≤ n ≤` [`MATVEC_MAX_ROWS`] and a weight that
/// [`supports`] accepts; sizes checked by the caller (`x` is `n · in`, `y` is `n · out`).
///
/// # Shapes
/// - x: `[n, in]`, w: `[out, in]`, y: `[n, out]`
pub(crate) fn xwt(n: usize, x: &[f32], w: &QuantView<'_>, y: &mut [f32], accumulate: bool) {
    let (dout, din) = (w.rows(), w.cols());
    debug_assert!((1..=MATVEC_MAX_ROWS).contains(&n) && supports(w));
    debug_assert!(x.len() == n * din && y.len() == n * dout);
    let chunk = rows_per_task(dout);
    let y_p = SendPtr(y.as_mut_ptr());
    // Q8_0 / Q4_0 blocks: x quantized to Q8_0 once, integer dot products (llama.cpp's),
    // unless the weight asks for exact (f32) decoding.
    let xq = match w.data() {
        ViewData::Ggml { ty, .. } if qdot::supports(ty) && !w.exact_decode() => {
            Some(qdot::Q8Rows::new(n, din, x))
        }
        _ => None,
    };
    (0..dout.div_ceil(chunk)).into_par_iter().for_each(|t| {
        let j0 = t * chunk;
        let j1 = (j0 + chunk).min(dout);
        let mut dots = [0.0f32; MATVEC_MAX_ROWS];
        for j in j0..j1 {
            row_dots(n, x, xq.as_ref(), w, j, &mut dots);
            for (r, &d) in dots[..n].iter().enumerate() {
                // SAFETY: task t alone owns columns j0..j1 of every row of y ([n, dout],
                // checked by the caller); r < n and j < dout.
                unsafe {
                    let p = y_p.get().add(r * dout + j);
                    *p = if accumulate { *p + d } else { d };
                }
            }
        }
    });
}

/// Rows of `W` per parallel task: about two tasks per thread (each call is short, so
/// fewer, longer tasks keep the scheduling cost down), at least 16 rows.
fn rows_per_task(dout: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    dout.div_ceil(2 * threads).max(16)
}

/// `dots[r] = x[r, :] · W[j, :]` for `r < n` (`xq`: `x` quantized for [`qdot`]).
fn row_dots(
    n: usize,
    x: &[f32],
    xq: Option<&qdot::Q8Rows>,
    w: &QuantView<'_>,
    j: usize,
    dots: &mut [f32; MATVEC_MAX_ROWS],
) {
    let din = w.cols();
    let span = j * din..(j + 1) * din;
    match w.data() {
        ViewData::Bf16(v) => dots_of(n, x, din, Stored::<Bf16>::elems(&v[span]), dots),
        ViewData::F16(v) => dots_of(n, x, din, Stored::<F16>::elems(&v[span]), dots),
        ViewData::Ggml { ty, data } => {
            // (the data may end in up to 3 bytes of padding to whole i32 words)
            let row_bytes = din / ty.block_size() * ty.type_size();
            let row = &data[j * row_bytes..(j + 1) * row_bytes];
            match xq {
                Some(xq) => qdot::dots(ty, row, xq, dots),
                None => ggml_dots(n, x, ty, row, dots),
            }
        }
        ViewData::Int8 { codes, scales } => {
            dots_of(n, x, din, Stored::<I8>::elems(&codes[span]), dots);
            let s = scales[j];
            // As bitsandbytes' dequantization: (code · SCB) · (1/127), here summed first.
            dots[..n].iter_mut().for_each(|d| *d = (*d * s) * INV_127);
        }
        ViewData::F32(_) | ViewData::Bnb4(_) => {
            unreachable!("supports() excludes f32 and 4-bit weights")
        }
    }
}

/// `dots[r] = x[r, :] · W[j, :]` for `r < n`, `row` the blocks of `W[j, :]` (type `ty`,
/// whole blocks): [`GGML_CHUNK`] values decoded at a time, each chunk's dot products added.
fn ggml_dots(n: usize, x: &[f32], ty: GgmlType, row: &[u8], dots: &mut [f32; MATVEC_MAX_ROWS]) {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let din = row.len() / ts * bs;
    let Ok(decode) = ggml::block_decoder(ty) else {
        dots[..n].fill(f32::NAN);
        return;
    };
    let mut buf = [0.0f32; GGML_CHUNK];
    let mut part = [0.0f32; MATVEC_MAX_ROWS];
    dots[..n].fill(0.0);
    for (c, blocks) in row.chunks(GGML_CHUNK / bs * ts).enumerate() {
        let len = blocks.len() / ts * bs;
        decode(blocks, &mut buf[..len]);
        dots_of(
            n,
            &x[c * GGML_CHUNK..],
            din,
            Stored::<F32>::elems(&buf[..len]),
            &mut part,
        );
        for (d, p) in dots[..n].iter_mut().zip(&part) {
            *d += p;
        }
    }
}

/// One stored element type: its scalar conversion (and, on x86-64, eight at a time).
trait Elem: Copy {
    /// The value as f32.
    fn get(self) -> f32;
    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` must address eight readable elements; the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

/// A bf16 weight element (its bits).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Bf16(u16);
/// An IEEE half weight element (its bits).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct F16(u16);
/// A decoded f32 weight value.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct F32(f32);
/// An int8 weight code (scaled per row after the sum).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct I8(i8);

/// A stored slice seen as [`Elem`]s (each `Elem` is a `repr(transparent)` wrapper of the
/// raw element, so the cast is free).
trait Stored<E: Elem> {
    /// The same memory as `E`s.
    fn elems(&self) -> &[E];
}

macro_rules! elem {
    ($t:ident, $raw:ty, |$v:ident| $get:expr, |$p:ident| $load:expr) => {
        impl Elem for $t {
            #[inline(always)]
            fn get(self) -> f32 {
                let $v = self.0;
                $get
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
                #[allow(unused_imports)]
                use std::arch::x86_64::*;
                let $p = p as *const $raw;
                // SAFETY: the caller guarantees eight elements at p and the features.
                unsafe { $load }
            }
        }
        impl Stored<$t> for [$raw] {
            fn elems(&self) -> &[$t] {
                // SAFETY: $t is a repr(transparent) Copy wrapper of $raw: same size
                // and alignment (also asserted below), every bit pattern valid.
                unsafe { std::slice::from_raw_parts(self.as_ptr() as *const $t, self.len()) }
            }
        }
        const _: () = assert!(
            std::mem::size_of::<$t>() == std::mem::size_of::<$raw>()
                && std::mem::align_of::<$t>() == std::mem::align_of::<$raw>()
        );
    };
}

elem!(Bf16, u16, |v| f32::from_bits(u32::from(v) << 16), |p| {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
        _mm_loadu_si128(p as *const __m128i),
    )))
});
elem!(F16, u16, |v| half::f16::from_bits(v).to_f32(), |p| {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
});
elem!(F32, f32, |v| v, |p| _mm256_loadu_ps(p));
elem!(I8, i8, |v| f32::from(v), |p| _mm256_cvtepi32_ps(
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
));

/// `dots[r] = x[r·stride..][..row.len()] · row` for `r < n`, `row` one stored weight row
/// (or a piece of one; `stride` is the length of a row of `x`).
fn dots_of<E: Elem>(
    n: usize,
    x: &[f32],
    stride: usize,
    row: &[E],
    dots: &mut [f32; MATVEC_MAX_ROWS],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked at run time).
        unsafe { avx::dots(n, x, stride, row, dots) };
        return;
    }
    portable_dots(n, x, stride, row, dots);
}

/// The portable dot products (any CPU), eight partial sums per row of `x`.
fn portable_dots<E: Elem>(
    n: usize,
    x: &[f32],
    stride: usize,
    row: &[E],
    dots: &mut [f32; MATVEC_MAX_ROWS],
) {
    let din = row.len();
    for (r, d) in dots[..n].iter_mut().enumerate() {
        let xr = &x[r * stride..r * stride + din];
        let mut acc = [0.0f32; 8];
        let mut xc = xr.chunks_exact(8);
        let mut wc = row.chunks_exact(8);
        for (xs, ws) in (&mut xc).zip(&mut wc) {
            for k in 0..8 {
                acc[k] += xs[k] * ws[k].get();
            }
        }
        let tail: f32 = xc
            .remainder()
            .iter()
            .zip(wc.remainder())
            .map(|(a, b)| a * b.get())
            .sum();
        *d = acc.iter().sum::<f32>() + tail;
    }
}

/// Whether the AVX2 + FMA + F16C dot products can run (std caches the detection).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx {
    use super::{Elem, MATVEC_MAX_ROWS};
    use std::arch::x86_64::*;

    /// [`super::portable_dots`] with AVX2: the row is read 16 values at a time, each
    /// group converted once and multiplied into every row of `x`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots<E: Elem>(
        n: usize,
        x: &[f32],
        stride: usize,
        row: &[E],
        dots: &mut [f32; MATVEC_MAX_ROWS],
    ) {
        assert!((1..=MATVEC_MAX_ROWS).contains(&n) && stride >= row.len());
        assert!(x.len() >= (n - 1) * stride + row.len());
        match n {
            1 => dots_n::<E, 1>(x, stride, row, dots),
            2 => dots_n::<E, 2>(x, stride, row, dots),
            3 => dots_n::<E, 3>(x, stride, row, dots),
            _ => dots_n::<E, 4>(x, stride, row, dots),
        }
    }

    /// [`dots`] for `N` rows of `x`, two accumulators per row.
    // `r` indexes two accumulator arrays and the rows of `x` together.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn dots_n<E: Elem, const N: usize>(
        x: &[f32],
        stride: usize,
        row: &[E],
        dots: &mut [f32; MATVEC_MAX_ROWS],
    ) {
        let din = row.len();
        let (xp, wp) = (x.as_ptr(), row.as_ptr());
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        // SAFETY: for every load below, i + 16 ≤ din (or i + 8 ≤ din), so the 8-wide reads
        // at wp + i (+ 8) and xp + r·stride + i (+ 8) stay inside `row` and inside `x`
        // (its length is at least (N − 1)·stride + din, checked by `dots`).
        unsafe {
            while i + 16 <= din {
                let w0 = E::load8(wp.add(i));
                let w1 = E::load8(wp.add(i + 8));
                for r in 0..N {
                    let xr = xp.add(r * stride + i);
                    acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, acc1[r]);
                }
                i += 16;
            }
            if i + 8 <= din {
                let w0 = E::load8(wp.add(i));
                for r in 0..N {
                    let xr = xp.add(r * stride + i);
                    acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc0[r]);
                }
                i += 8;
            }
        }
        for r in 0..N {
            let mut d = hsum(_mm256_add_ps(acc0[r], acc1[r]));
            for k in i..din {
                d += x[r * stride + k] * row[k].get();
            }
            dots[r] = d;
        }
    }

    /// The sum of the eight lanes (also [`super::super::qdot`]'s).
    #[inline(always)]
    pub(in crate::flex) fn hsum(v: __m256) -> f32 {
        // SAFETY: plain register arithmetic; the caller's target features include AVX.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A deterministic spread of values in about [-1, 1] (also [`super::super::qdot`]'s
    /// tests').
    pub(in crate::flex) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The fast (AVX2) dot products equal the portable ones, for every element type,
    /// every row count and lengths around the 8- and 16-wide steps (the sums differ only
    /// in their order).
    #[test]
    fn fast_dots_equal_portable_dots() {
        for din in [1, 7, 8, 9, 16, 23, 64, 197] {
            let w = values(din, din as u32);
            let bf: Vec<Bf16> = w
                .iter()
                .map(|&v| Bf16(half::bf16::from_f32(v).to_bits()))
                .collect();
            let hf: Vec<F16> = w
                .iter()
                .map(|&v| F16(half::f16::from_f32(v).to_bits()))
                .collect();
            let q: Vec<I8> = w.iter().map(|&v| I8((v * 127.0) as i8)).collect();
            for n in 1..=MATVEC_MAX_ROWS {
                let x = values(n * din, 7 + n as u32);
                check(n, &x, &bf);
                check(n, &x, &hf);
                check(n, &x, &q);
            }
        }
    }

    fn check<E: Elem>(n: usize, x: &[f32], row: &[E]) {
        let mut portable = [0.0f32; MATVEC_MAX_ROWS];
        portable_dots(n, x, row.len(), row, &mut portable);
        let (mut exact, mut bound) = ([0.0f32; MATVEC_MAX_ROWS], [0.0f32; MATVEC_MAX_ROWS]);
        for r in 0..n {
            let xr = &x[r * row.len()..(r + 1) * row.len()];
            let terms = xr
                .iter()
                .zip(row)
                .map(|(a, b)| f64::from(*a) * f64::from(b.get()));
            exact[r] = terms.clone().sum::<f64>() as f32;
            // f32 sums in any order stay within a few ulps of Σ|terms| per step.
            bound[r] = 1e-6 * terms.map(f64::abs).sum::<f64>() as f32 * 4.0 + 1e-30;
        }
        let mut fast = [0.0f32; MATVEC_MAX_ROWS];
        dots_of(n, x, row.len(), row, &mut fast);
        for r in 0..n {
            let (p, f, e) = (portable[r], fast[r], exact[r]);
            assert!((p - e).abs() <= bound[r], "portable row {r}: {p} vs {e}");
            assert!((f - e).abs() <= bound[r], "fast row {r}: {f} vs {e}");
        }
    }
}
