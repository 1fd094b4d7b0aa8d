//! bitsandbytes' LLM.int8() weight format without the outlier split: one int8 code per
//! element and one f32 scale per row (`int8_vectorwise_quant(w, threshold=0.0)`, the
//! `weight` / `SCB` pair transformers saves for 8-bit checkpoints).

/// `1/127` as bitsandbytes' `int8_vectorwise_dequant` writes it (`7.874015718698502e-3`,
/// rounded to f32).
pub const INV_127: f32 = 0.007874016;

/// Codes and row scales of a row-major `[rows, cols]` weight, as bitsandbytes' default
/// kernel: `SCB[r] = max |w[r, :]|`, `codes = round(w · (127 / SCB[r]))`, where
/// `127 / SCB` is torch's `reciprocal(SCB) · 127` and `round` sends halves to even; an
/// all-zero row gets codes 0. Returns `(codes, scales)`.
pub fn quantize_int8(w: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks_exact(cols.max(1)).take(rows) {
        let am = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        scales.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0i8, row.len()));
            continue;
        }
        let s = (1.0 / am) * 127.0;
        codes.extend(row.iter().map(|&v| (v * s).round_ties_even() as i8));
    }
    (codes, scales)
}

/// `dst[j] = (code · scale) · (1/127)`: bitsandbytes' `int8_vectorwise_dequant` for the
/// elements of one row.
#[inline]
pub(crate) fn dequantize_run(codes: &[i8], scale: f32, dst: &mut [f32]) {
    for (d, &c) in dst.iter_mut().zip(codes) {
        *d = (f32::from(c) * scale) * INV_127;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand derivation: row [0.5, -1.0, 0.25] has SCB 1.0, scale 127: codes
    /// round(63.5) = 64 (half to even), -127, round(31.75) = 32; a zero row gives 0s.
    #[test]
    fn rows_round_half_to_even() {
        let (codes, scales) = quantize_int8(&[0.5, -1.0, 0.25, 0.0, 0.0, 0.0], 3);
        assert_eq!(scales, vec![1.0, 0.0]);
        assert_eq!(codes, vec![64, -127, 32, 0, 0, 0]);
        let mut out = [0.0f32; 3];
        dequantize_run(&codes[..3], 1.0, &mut out);
        assert_eq!(out, [64.0 * INV_127, -127.0 * INV_127, 32.0 * INV_127]);
    }
}
