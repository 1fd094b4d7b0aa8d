//! AVX2 decoders of the common GGML block types (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): the
//! arithmetic of the scalar decoders in [`super::ggml`] (the same f32 operations in the
//! same order), eight values at a time, so the values are bit-identical to theirs.
//! [`super::ggml::block_decoder`] hands them out when the CPU has AVX2 (checked at run
//! time); the products that decode a tile or a row at a time read the weights through
//! them.

use std::arch::x86_64::*;

use super::ggml::{half, scale_min_k4, BlockDecoder, GgmlType};

/// The AVX2 whole-block decoder of `ty`, when there is one and the CPU has AVX2.
pub(super) fn decoder(ty: GgmlType) -> Option<BlockDecoder> {
    if !is_x86_feature_detected!("avx2") {
        return None;
    }
    Some(match ty {
        GgmlType::Q8_0 => q8_0_blocks,
        GgmlType::Q4_0 => q4_0_blocks,
        GgmlType::Q4_1 => q4_1_blocks,
        GgmlType::Q4_K => q4_k_blocks,
        GgmlType::Q6_K => q6_k_blocks,
        _ => return None,
    })
}

/// `fn $name(src, dst)`: a [`BlockDecoder`] running the one-block AVX2 decoder `$one`
/// (block of `$ty`) over every whole block, inside one `avx2` function so that the
/// intrinsics inline.
macro_rules! avx2_blocks {
    ($($name:ident = $one:ident for $ty:ident;)*) => {$(
        fn $name(src: &[u8], dst: &mut [f32]) {
            #[target_feature(enable = "avx2")]
            unsafe fn run(src: &[u8], dst: &mut [f32]) {
                let t = GgmlType::$ty;
                for (b, out) in src.chunks_exact(t.type_size()).zip(dst.chunks_exact_mut(t.block_size())) {
                    // SAFETY: `b` is one whole block and `out` its elements (the chunk
                    // sizes), and the CPU has AVX2 (this function's caller checked it).
                    unsafe { $one(b, out) };
                }
            }
            // SAFETY: `decoder` hands these functions out only after detecting AVX2.
            unsafe { run(src, dst) }
        }
    )*};
}

avx2_blocks! {
    q8_0_blocks = q8_0 for Q8_0;
    q4_0_blocks = q4_0 for Q4_0;
    q4_1_blocks = q4_1 for Q4_1;
    q4_k_blocks = q4_k for Q4_K;
    q6_k_blocks = q6_k for Q6_K;
}

/// Eight bytes from `p` as `i32` lanes: zero-extended (`u8`).
///
/// # Safety
/// Eight bytes readable at `p`; AVX2.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller's guarantees.
    unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) }
}

/// Stores `v` (eight f32 lanes) at `out[at..at + 8]`.
///
/// # Safety
/// `at + 8 ≤ out.len()`; AVX2.
#[inline(always)]
unsafe fn store(out: &mut [f32], at: usize, v: __m256) {
    debug_assert!(at + 8 <= out.len());
    // SAFETY: the caller's guarantees.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), v) }
}

/// `block_q8_0 { half d; int8 qs[32]; }`: `q as f32 * d`.
///
/// # Safety
/// `b` is 34 bytes, `out` 32 values; AVX2.
#[inline(always)]
unsafe fn q8_0(b: &[u8], out: &mut [f32]) {
    debug_assert!(b.len() >= 34 && out.len() >= 32);
    // SAFETY: every read is inside b[2..34] and every store inside out[..32].
    unsafe {
        let d = _mm256_set1_ps(half(b, 0));
        for k in 0..4 {
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.as_ptr().add(2 + 8 * k).cast()));
            store(out, 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }
}

/// The 32 nibbles of `qs[0..16]` as four groups of eight `i32` lanes: the low nibbles of
/// bytes 0–7, 8–15, then the high nibbles of bytes 0–7, 8–15 (`nibble32`'s order).
///
/// # Safety
/// 16 bytes readable at `qs`; AVX2.
#[inline(always)]
unsafe fn nibbles32(qs: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller's guarantees.
    unsafe {
        let q = _mm_loadu_si128(qs as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m);
        [
            _mm256_cvtepu8_epi32(lo),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
            _mm256_cvtepu8_epi32(hi),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
        ]
    }
}

/// `block_q4_0 { half d; uint8 qs[16]; }`: `d * (q - 8) as f32`.
///
/// # Safety
/// `b` is 18 bytes, `out` 32 values; AVX2.
#[inline(always)]
unsafe fn q4_0(b: &[u8], out: &mut [f32]) {
    debug_assert!(b.len() >= 18 && out.len() >= 32);
    // SAFETY: the nibbles are b[2..18]; every store is inside out[..32].
    unsafe {
        let d = _mm256_set1_ps(half(b, 0));
        let eight = _mm256_set1_epi32(8);
        for (k, q) in nibbles32(b.as_ptr().add(2)).into_iter().enumerate() {
            let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight));
            store(out, 8 * k, _mm256_mul_ps(d, v));
        }
    }
}

/// `block_q4_1 { half d; half m; uint8 qs[16]; }`: `d * q as f32 + m`.
///
/// # Safety
/// `b` is 20 bytes, `out` 32 values; AVX2.
#[inline(always)]
unsafe fn q4_1(b: &[u8], out: &mut [f32]) {
    debug_assert!(b.len() >= 20 && out.len() >= 32);
    // SAFETY: the nibbles are b[4..20]; every store is inside out[..32].
    unsafe {
        let (d, m) = (_mm256_set1_ps(half(b, 0)), _mm256_set1_ps(half(b, 2)));
        for (k, q) in nibbles32(b.as_ptr().add(4)).into_iter().enumerate() {
            let v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
            store(out, 8 * k, _mm256_add_ps(v, m));
        }
    }
}

/// `block_q4_K { half d; half dmin; uint8 scales[12]; uint8 qs[128]; }`: sub-block `j`
/// (32 values) is `d * sc_j` times its nibbles minus `dmin * m_j`; its nibbles are the
/// low (even `j`) or high (odd `j`) halves of `qs[32·(j/2)..][..32]`.
///
/// # Safety
/// `b` is 144 bytes, `out` 256 values; AVX2.
#[inline(always)]
unsafe fn q4_k(b: &[u8], out: &mut [f32]) {
    debug_assert!(b.len() >= 144 && out.len() >= 256);
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    // SAFETY: the reads are inside qs = b[16..144] (byte 16 + 32·(j/2) + 8k + 8 ≤ 144);
    // every store is inside out[..256].
    unsafe {
        let mask = _mm256_set1_epi32(0x0F);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(scales, j);
            let dl = _mm256_set1_ps(d * sc as f32);
            let ml = _mm256_set1_ps(dmin * m as f32);
            let shift = _mm256_set1_epi32(4 * (j as i32 % 2));
            for k in 0..4 {
                let q = u8x8(b.as_ptr().add(16 + 32 * (j / 2) + 8 * k));
                let q = _mm256_and_si256(_mm256_srlv_epi32(q, shift), mask);
                let v = _mm256_mul_ps(dl, _mm256_cvtepi32_ps(q));
                store(out, 32 * j + 8 * k, _mm256_sub_ps(v, ml));
            }
        }
    }
}

/// `block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }`: value `e`
/// (of 256; `h = e / 128`, `r = e % 128`) is `d * scales[e / 16]` times its 6-bit code
/// minus 32; the code's low nibble is in `ql[64h + r % 64]` (shifted by `4·(r / 64)`),
/// its two high bits in `qh[32h + r % 32]` (shifted by `2·(r / 32)`).
///
/// # Safety
/// `b` is 210 bytes, `out` 256 values; AVX2.
#[inline(always)]
unsafe fn q6_k(b: &[u8], out: &mut [f32]) {
    debug_assert!(b.len() >= 210 && out.len() >= 256);
    let d = half(b, 208);
    // SAFETY: eight values at e (a multiple of 8) read ql[64h + r%64 ..][..8] (< 128)
    // and qh[32h + r%32 ..][..8] (< 64) — r%64 and r%32 are multiples of 8 that stay
    // within their 64 / 32 — and store inside out[..256].
    unsafe {
        let (low_mask, high_mask) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(3));
        let bias = _mm256_set1_epi32(32);
        for e in (0..256).step_by(8) {
            let dl = _mm256_set1_ps(d * (b[192 + e / 16] as i8) as f32);
            let (h, r) = (e / 128, e % 128);
            let low = u8x8(b.as_ptr().add(64 * h + r % 64));
            let low = _mm256_srlv_epi32(low, _mm256_set1_epi32(4 * (r / 64) as i32));
            let high = u8x8(b.as_ptr().add(128 + 32 * h + r % 32));
            let high = _mm256_srlv_epi32(high, _mm256_set1_epi32(2 * (r / 32) as i32));
            let q = _mm256_or_si256(
                _mm256_and_si256(low, low_mask),
                _mm256_slli_epi32::<4>(_mm256_and_si256(high, high_mask)),
            );
            let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, bias));
            store(out, e, _mm256_mul_ps(dl, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ggml::scalar_decoder;
    use super::*;

    /// Random blocks of `ty` whose half scales are finite (the code bytes are random).
    fn blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes: Vec<u8> = (0..n * ty.type_size())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8
            })
            .collect();
        let half_at: &[usize] = match ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => unreachable!(),
        };
        for (i, block) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
            for &at in half_at {
                let v = half::f16::from_f32(0.01 + 0.37 * (i + at) as f32 % 3.0 - 1.0);
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        bytes
    }

    /// Each AVX2 decoder gives the scalar decoder's values bit for bit, over several
    /// blocks (where the CPU has AVX2).
    #[test]
    fn avx2_decoders_equal_the_scalar_decoders_bit_for_bit() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let Some(fast) = decoder(ty) else {
                eprintln!("no AVX2 on this CPU: {ty} keeps the scalar decoder");
                continue;
            };
            let n = 5;
            let src = blocks(ty, n, ty.id() as u64 + 1);
            let mut want = vec![0.0f32; n * ty.block_size()];
            let mut got = vec![1.0f32; n * ty.block_size()];
            scalar_decoder(ty).unwrap()(&src, &mut want);
            fast(&src, &mut got);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.to_bits(), g.to_bits(), "{ty} value {i}: {w} vs {g}");
            }
        }
    }
}
