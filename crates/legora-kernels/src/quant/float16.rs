//! Half-precision storage: bf16 and IEEE f16 kept as their `u16` bit patterns, converted
//! from f32 with round-to-nearest-even (as the `half` crate and torch's `.to()` do).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// The bf16 bits of each value (round to nearest, ties to even).
pub fn to_bf16_bits(w: &[f32]) -> Vec<u16> {
    w.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

/// The f16 bits of each value (round to nearest, ties to even; beyond ±65504 gives ±inf,
/// which the storage constructors reject).
pub fn to_f16_bits(w: &[f32]) -> Vec<u16> {
    w.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

/// bf16 bits to f32 (exact).
#[inline]
pub(crate) fn bf16_run(bits: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(bits) {
        *d = f32::from_bits(u32::from(b) << 16);
    }
}

/// f16 bits to f32 (exact; hardware conversion where the CPU has one).
#[inline]
pub(crate) fn f16_run(bits: &[u16], dst: &mut [f32]) {
    let halves: &[f16] = bits.reinterpret_cast();
    halves.convert_to_f32_slice(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand derivation: 1 + 2^-8 lies halfway between the bf16s 1.0 and 1 + 2^-7; the
    /// tie goes to the even one (1.0, bits 0x3F80). 1 + 3·2^-8 goes up to 1 + 2^-6
    /// (0x3F82). f16: 1 + 2^-11 → 1.0 (0x3C00).
    #[test]
    fn ties_round_to_even() {
        let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)];
        assert_eq!(to_bf16_bits(&x), vec![0x3F80, 0x3F82]);
        assert_eq!(to_f16_bits(&[1.0 + 2f32.powi(-11)]), vec![0x3C00]);
        let mut out = [0.0f32; 2];
        bf16_run(&[0x3F80, 0x3F82], &mut out);
        assert_eq!(out, [1.0, 1.0 + 2f32.powi(-6)]);
        let mut out = [0.0f32; 1];
        f16_run(&[0x3C01], &mut out);
        assert_eq!(out, [1.0 + 2f32.powi(-10)]);
    }
}
