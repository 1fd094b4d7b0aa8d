//! Helpers shared by legora-kernels' tests and its benchmark (which includes this file).

/// Deterministic values in [-1, 1) (xorshift).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// GGML block types a GGUF frozen weight can keep, with where each block's f16 scale
/// fields sit (the rest of a block is integers: any bytes are valid).
#[allow(dead_code)]
pub const GGML_BLOCKS: [(legora_kernels::quant::ggml::GgmlType, &[usize]); 10] = {
    use legora_kernels::quant::ggml::GgmlType::*;
    [
        (Q8_0, &[0]),
        (Q4_0, &[0]),
        (Q4_1, &[0, 2]),
        (Q5_0, &[0]),
        (Q5_1, &[0, 2]),
        (Q2_K, &[80, 82]),
        (Q3_K, &[108]),
        (Q4_K, &[0, 2]),
        (Q5_K, &[0, 2]),
        (Q6_K, &[208]),
    ]
};

/// A `[rows, cols]` weight of random `ty` blocks (its f16 scales random in ±1/64, so the
/// values stay O(1)); `cols` a multiple of the block size.
#[allow(dead_code)]
pub fn ggml_matrix(
    ty: legora_kernels::quant::ggml::GgmlType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> legora_kernels::quant::QuantMatrix {
    use legora_kernels::quant::{QuantMatrix, Storage};
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let halves = GGML_BLOCKS
        .iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, h)| *h)
        .expect("a block type of GGML_BLOCKS");
    let blocks = rows * cols / bs;
    let noise = values(blocks * ts, seed);
    let mut data: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.5) as u8).collect();
    let scales = values(blocks * halves.len(), seed + 1);
    for (b, block) in data.chunks_exact_mut(ts).enumerate() {
        for (k, &at) in halves.iter().enumerate() {
            let s = half::f16::from_f32(scales[b * halves.len() + k] / 64.0);
            block[at..at + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
    let data = data.into();
    QuantMatrix::new("w", rows, cols, Storage::Ggml { ty, data }).expect("valid blocks")
}
