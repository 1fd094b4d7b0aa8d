//! GGML block formats (llama.cpp / GGUF): type ids, block sizes, reference
//! dequantization.
//!
//! Interface:
//! - [`GgmlType`]: every type id of `ggml.h`'s `enum ggml_type` that a GGUF file may name;
//! - [`GgmlType::block_size`] (elements per block) and [`GgmlType::type_size`] (bytes per
//!   block), as `gguf.constants.GGML_QUANT_SIZES` (except `Q8_1`, see there);
//! - [`dequantize`]`(ty, src, dst)`: `src` holds whole blocks, `dst.len()` =
//!   blocks × `block_size()`; bit-exact with `gguf.quants.dequantize`.
//!
//! A row of a GGML tensor (`ne0` elements, the innermost dimension) is `ne0 / block_size`
//! consecutive blocks: [`GgmlType::row_bytes`] checks the divisibility, and
//! [`dequantize_row`] decodes one row, so callers can dequantize a tensor row by row (or a
//! tile of rows) without a full-size temporary.
//!
//! Every block layout below is the one `ggml-common.h` defines (`block_q4_K`, ...); the
//! arithmetic is done in f32 in the order `gguf.quants` does it (`d * sc` first, then `* q`,
//! then `- dmin * m`), which makes the results bit-identical to it.

use std::fmt;

use half::f16;

use crate::error::{KernelError, Result};

/// Elements per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

/// A GGML tensor type (`enum ggml_type` in `ggml.h`; `GGMLQuantizationType` in the `gguf`
/// package). The discriminant is the id stored in GGUF tensor infos.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// IEEE f32.
    F32 = 0,
    /// IEEE f16.
    F16 = 1,
    /// 32 × 4-bit, one f16 scale: `x = d·(q − 8)`.
    Q4_0 = 2,
    /// 32 × 4-bit, f16 scale and min: `x = d·q + m`.
    Q4_1 = 3,
    /// 32 × 5-bit, one f16 scale: `x = d·(q − 16)`.
    Q5_0 = 6,
    /// 32 × 5-bit, f16 scale and min: `x = d·q + m`.
    Q5_1 = 7,
    /// 32 × int8, one f16 scale: `x = d·q`.
    Q8_0 = 8,
    /// 32 × int8 with an f16 scale and sum (an activation format of ggml's dot products).
    Q8_1 = 9,
    /// K-quant, 2-bit: 16 sub-blocks of 16 with 4-bit scales and mins.
    Q2_K = 10,
    /// K-quant, 3-bit: 16 sub-blocks of 16 with 6-bit scales.
    Q3_K = 11,
    /// K-quant, 4-bit: 8 sub-blocks of 32 with 6-bit scales and mins.
    Q4_K = 12,
    /// K-quant, 5-bit: 8 sub-blocks of 32 with 6-bit scales and mins.
    Q5_K = 13,
    /// K-quant, 6-bit: 16 sub-blocks of 16 with int8 scales.
    Q6_K = 14,
    /// K-quant, 8-bit with an f32 scale and block sums (activation format).
    Q8_K = 15,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS = 16,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS = 17,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS = 18,
    /// i-quant, 1.56 bits per weight.
    IQ1_S = 19,
    /// Non-linear 4-bit (a 16-entry codebook), blocks of 32.
    IQ4_NL = 20,
    /// i-quant, 3.44 bits per weight.
    IQ3_S = 21,
    /// i-quant, 2.5 bits per weight.
    IQ2_S = 22,
    /// Non-linear 4-bit with 6-bit sub-block scales, blocks of 256.
    IQ4_XS = 23,
    /// int8.
    I8 = 24,
    /// int16.
    I16 = 25,
    /// int32.
    I32 = 26,
    /// int64.
    I64 = 27,
    /// IEEE f64.
    F64 = 28,
    /// i-quant, 1.75 bits per weight.
    IQ1_M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary, 1.69 bits per weight (base-3 packed).
    TQ1_0 = 34,
    /// Ternary, 2.06 bits per weight.
    TQ2_0 = 35,
    /// OCP microscaling FP4 (e2m1 values, an e8m0 scale per 32).
    MXFP4 = 39,
    /// NVIDIA FP4 (e2m1 values, a ue4m3 scale per 16).
    NVFP4 = 40,
    /// 1-bit, blocks of 128.
    Q1_0 = 41,
}

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 34] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
    ];

    /// The type with GGUF id `id`, or `None` for an unknown (or retired: 4, 5, 31–33,
    /// 36–38) id.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The name ggml and the `gguf` package use (`"Q4_K"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }

    /// Elements per block (1 for the plain number types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 => 64,
            Q1_0 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_q4_K)`, ...).
    ///
    /// `Q8_1` is 36 bytes (`ggml_half d, s; int8_t qs[32]`, as ggml has it since 2023);
    /// the `gguf` package's table still lists the older 40.
    pub fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            F64 | I64 => 8,
            I8 => 1,
            Q4_0 | IQ4_NL => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 2 + 2 + 32,
            Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Q4_K => 2 + 2 + QK_K / 2 + 12,
            Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Q8_K => 4 + QK_K + QK_K / 8,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + 4 * 13,
            TQ2_0 => 2 + 64,
            MXFP4 => 1 + 16,
            NVFP4 => 4 + 32,
            Q1_0 => 2 + 16,
        }
    }

    /// Whether the type packs several elements per block.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | TQ1_0
                | TQ2_0
                | IQ4_NL
                | IQ4_XS
                | MXFP4
        )
    }

    /// Bytes of one row of `ne0` elements: `ne0 / block_size` blocks. An error when `ne0`
    /// is not a whole number of blocks (or the size overflows).
    pub fn row_bytes(self, ne0: u64) -> Result<usize> {
        let bs = self.block_size() as u64;
        if ne0 % bs != 0 {
            return Err(KernelError::Invalid {
                what: format!("{self} row"),
                message: format!(
                    "expected a multiple of the block size {bs} elements, found {ne0}"
                ),
            });
        }
        (ne0 / bs)
            .checked_mul(self.type_size() as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| KernelError::Invalid {
                what: format!("{self} row"),
                message: format!("{ne0} elements overflow the address space"),
            })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decode whole blocks of type `ty` from `src` into `dst` (f32), bit-exact with
/// `gguf.quants.dequantize`.
///
/// `src.len()` must be a multiple of [`GgmlType::type_size`] and `dst.len()` the matching
/// number of elements (blocks × [`GgmlType::block_size`]). Types [`GgmlType::can_dequantize`]
/// refuses (the i-quants with codebooks, the activation formats `Q8_1` / `Q8_K`, integers,
/// ...) are a [`KernelError::Unsupported`].
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if src.len() % ts != 0 {
        return Err(KernelError::Size {
            what: format!("{ty} blocks"),
            expected: src.len().div_ceil(ts) * ts,
            found: src.len(),
        });
    }
    let blocks = src.len() / ts;
    if dst.len() != blocks * bs {
        return Err(KernelError::Size {
            what: format!("{ty} output ({blocks} blocks of {bs} elements, 4 bytes each)"),
            expected: blocks * bs * 4,
            found: dst.len() * 4,
        });
    }
    block_decoder(ty)?(src, dst);
    Ok(())
}

/// Decodes consecutive whole blocks: `k · type_size` bytes into `k · block_size` elements
/// (`k` = the whole blocks that both slices hold).
pub type BlockDecoder = fn(&[u8], &mut [f32]);

/// The function that decodes whole blocks of `ty`, or an error naming a type legora does
/// not decode. On x86-64 with AVX2 (checked at run time) the common types (Q8_0, Q4_0,
/// Q4_1, Q4_K, Q6_K) decode eight values at a time with the same arithmetic: the values
/// are bit-identical to the scalar decoders'.
pub fn block_decoder(ty: GgmlType) -> Result<BlockDecoder> {
    #[cfg(target_arch = "x86_64")]
    if let Some(fast) = super::ggml_x86::decoder(ty) {
        return Ok(fast);
    }
    scalar_decoder(ty)
}

/// Applies the one-block decoder `one` to each whole block of `src` (`ts` bytes) and of
/// `dst` (`bs` elements).
#[inline(always)]
fn each_block(src: &[u8], dst: &mut [f32], ts: usize, bs: usize, one: fn(&[u8], &mut [f32])) {
    for (b, out) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs)) {
        one(b, out);
    }
}

/// `fn $name(src, dst)`: [`each_block`] with the one-block decoder `$one` of type `$ty`.
macro_rules! whole_blocks {
    ($($name:ident = $one:ident for $ty:ident;)*) => {
        /// The whole-block decoders (see [`BlockDecoder`]) over the one-block ones.
        mod whole {
            use super::*;
            $(pub(super) fn $name(src: &[u8], dst: &mut [f32]) {
                let t = GgmlType::$ty;
                each_block(src, dst, t.type_size(), t.block_size(), $one);
            })*
        }
    };
}

whole_blocks! {
    f32_blocks = f32_block for F32;
    f16_blocks = f16_block for F16;
    bf16_blocks = bf16_block for BF16;
    q4_0_blocks = q4_0 for Q4_0;
    q4_1_blocks = q4_1 for Q4_1;
    q5_0_blocks = q5_0 for Q5_0;
    q5_1_blocks = q5_1 for Q5_1;
    q8_0_blocks = q8_0 for Q8_0;
    q2_k_blocks = q2_k for Q2_K;
    q3_k_blocks = q3_k for Q3_K;
    q4_k_blocks = q4_k for Q4_K;
    q5_k_blocks = q5_k for Q5_K;
    q6_k_blocks = q6_k for Q6_K;
    tq1_0_blocks = tq1_0 for TQ1_0;
    tq2_0_blocks = tq2_0 for TQ2_0;
    iq4_nl_blocks = iq4_nl for IQ4_NL;
    iq4_xs_blocks = iq4_xs for IQ4_XS;
    mxfp4_blocks = mxfp4 for MXFP4;
}

/// [`block_decoder`] without the AVX2 decoders: the reference the fast ones equal.
pub(crate) fn scalar_decoder(ty: GgmlType) -> Result<BlockDecoder> {
    use whole::*;
    Ok(match ty {
        GgmlType::F32 => f32_blocks,
        GgmlType::F16 => f16_blocks,
        GgmlType::BF16 => bf16_blocks,
        GgmlType::Q4_0 => q4_0_blocks,
        GgmlType::Q4_1 => q4_1_blocks,
        GgmlType::Q5_0 => q5_0_blocks,
        GgmlType::Q5_1 => q5_1_blocks,
        GgmlType::Q8_0 => q8_0_blocks,
        GgmlType::Q2_K => q2_k_blocks,
        GgmlType::Q3_K => q3_k_blocks,
        GgmlType::Q4_K => q4_k_blocks,
        GgmlType::Q5_K => q5_k_blocks,
        GgmlType::Q6_K => q6_k_blocks,
        GgmlType::TQ1_0 => tq1_0_blocks,
        GgmlType::TQ2_0 => tq2_0_blocks,
        GgmlType::IQ4_NL => iq4_nl_blocks,
        GgmlType::IQ4_XS => iq4_xs_blocks,
        GgmlType::MXFP4 => mxfp4_blocks,
        other => {
            return Err(KernelError::Unsupported {
                what: "GGML dequantization".into(),
                format: other.name().into(),
                message: "legora decodes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                          Q2_K..Q6_K, TQ1_0, TQ2_0, IQ4_NL, IQ4_XS and MXFP4"
                    .into(),
            })
        }
    })
}

/// Whether `ty` can be kept as a frozen weight's storage: a block type (more than one
/// element per block) that [`block_decoder`] decodes.
pub fn is_block_storage(ty: GgmlType) -> bool {
    ty.block_size() > 1 && ty.block_size() <= QK_K && block_decoder(ty).is_ok()
}

/// Flat elements `start..start + out.len()` of a row-major `[rows, cols]` weight stored
/// as `ty` blocks (`data`: each row's whole blocks, rows back to back), as f32. The whole
/// blocks of each row in range decode in one call; blocks cut by the range are decoded
/// whole into a stack buffer. In range, `cols` a multiple of the block size and `ty` a
/// [`is_block_storage`] type: the caller's duty.
pub(crate) fn dequantize_span(
    ty: GgmlType,
    data: &[u8],
    cols: usize,
    start: usize,
    out: &mut [f32],
) {
    let Ok(decode) = block_decoder(ty) else {
        out.fill(f32::NAN);
        return;
    };
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let row_bytes = cols / bs * ts;
    let mut block = [0.0f32; QK_K];
    let end = start + out.len();
    let mut i = start;
    while i < end {
        let (row, col) = (i / cols, i % cols);
        let (b, off) = (col / bs, col % bs);
        // The row's elements in range from this one: whole blocks when aligned.
        let left = (cols - col).min(end - i);
        let n = if off == 0 && left >= bs {
            left / bs * bs
        } else {
            (bs - off).min(left)
        };
        let src = &data[row * row_bytes + b * ts..][..n.div_ceil(bs) * ts];
        let dst = &mut out[i - start..i - start + n];
        if off == 0 && n % bs == 0 {
            decode(src, dst);
        } else {
            decode(src, &mut block[..bs]);
            dst.copy_from_slice(&block[off..off + n]);
        }
        i += n;
    }
}

/// Decode one row of `dst.len()` elements from its blocks `src`: [`dequantize`] after
/// checking that the row is a whole number of blocks and `src` has exactly its bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let want = ty.row_bytes(dst.len() as u64)?;
    if src.len() != want {
        return Err(KernelError::Size {
            what: format!("{ty} row of {} elements", dst.len()),
            expected: want,
            found: src.len(),
        });
    }
    dequantize(ty, src, dst)
}

/// The little-endian IEEE half at byte `at`, as f32.
pub(super) fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn f32_block(b: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], out: &mut [f32]) {
    out[0] = half(b, 0);
}

fn bf16_block(b: &[u8], out: &mut [f32]) {
    // (blocks.view(np.int16).astype(np.int32) << 16).view(np.float32)
    out[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
}

/// Nibble `i` of a 32-element block: low nibbles of `qs[0..16]`, then the high ones.
fn nibble32(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

// block_q4_0 { ggml_half d; uint8_t qs[16]; }
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * (nibble32(&b[2..], i) as i32 - 8) as f32;
    }
}

// block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }
fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * nibble32(&b[4..], i) as f32 + m;
    }
}

/// The 5-bit value `i` of a Q5 block: low nibble from `qs`, fifth bit `i` of `qh`.
fn five_bit(qh: u32, qs: &[u8], i: usize) -> u8 {
    nibble32(qs, i) | ((((qh >> i) & 1) as u8) << 4)
}

// block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }
fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * (five_bit(qh, &b[6..], i) as i32 - 16) as f32;
    }
}

// block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }
fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * five_bit(qh, &b[8..], i) as f32 + m;
    }
}

// block_q8_0 { ggml_half d; int8_t qs[32]; }
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (i, o) in out.iter_mut().enumerate() {
        *o = (b[2 + i] as i8) as f32 * d;
    }
}

/// Two bits of a K-quant value `e` packed as `(n, 2, 4, 32)`: byte `(e/128)·32 + e%32`,
/// shift `2·((e%128)/32)`.
fn crumb(qs: &[u8], e: usize) -> u8 {
    (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

// block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; }
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (j, sub) in out.chunks_exact_mut(16).enumerate() {
        let dl = d * (scales[j] & 0x0F) as f32;
        let ml = dmin * (scales[j] >> 4) as f32;
        for (k, o) in sub.iter_mut().enumerate() {
            *o = dl * crumb(qs, j * 16 + k) as f32 - ml;
        }
    }
}

// block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    for (j, sub) in out.chunks_exact_mut(16).enumerate() {
        // 6-bit scale j: low nibble from sc[j % 8] (>> 4 for j ≥ 8), high 2 bits from
        // sc[8 + j % 4] >> 2·(j / 4).
        let low = (sc[j % 8] >> (4 * (j / 8))) & 0x0F;
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        for (k, o) in sub.iter_mut().enumerate() {
            let e = j * 16 + k;
            let h = (hmask[e % 32] >> (e / 32)) & 1;
            // the offset is 4 when the mask bit is 0
            let q = crumb(qs, e) as i32 - (((h ^ 1) as i32) << 2);
            *o = dl * q as f32;
        }
    }
}

/// `Q4_K.get_scale_min`: the 6-bit scale and min of sub-block `j` (of 8) from the 12
/// packed bytes.
pub(super) fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 0x3F, s[j + 4] & 0x3F)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30),
            (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30),
        )
    }
}

/// Nibble of Q4_K/Q5_K value `e`: byte `(e/64)·32 + e%32`, high nibble when `e%64 ≥ 32`.
fn nibble_k(qs: &[u8], e: usize) -> u8 {
    (qs[(e / 64) * 32 + e % 32] >> (4 * ((e % 64) / 32))) & 0x0F
}

// block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (k, o) in sub.iter_mut().enumerate() {
            *o = dl * nibble_k(qs, j * 32 + k) as f32 - ml;
        }
    }
}

// block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (k, o) in sub.iter_mut().enumerate() {
            let e = j * 32 + k;
            let q = nibble_k(qs, e) | (((qh[e % 32] >> (e / 32)) & 1) << 4);
            *o = dl * q as f32 - ml;
        }
    }
}

// block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for (j, sub) in out.chunks_exact_mut(16).enumerate() {
        let dl = d * (scales[j] as i8) as f32;
        for (k, o) in sub.iter_mut().enumerate() {
            let e = j * 16 + k;
            let (h, r) = (e / 128, e % 128);
            let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
            let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
            *o = dl * ((low | (high << 4)) as i32 - 32) as f32;
        }
    }
}

// block_tq1_0 { uint8_t qs[48]; uint8_t qh[4]; ggml_half d; }: five base-3 digits per byte
// (`qs`), four per byte (`qh`), each digit recovered as `((byte · 3^p mod 256) · 3) >> 8`.
fn tq1_0(b: &[u8], out: &mut [f32]) {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let d = half(b, 52);
    let trit = |byte: u8, p: usize| ((byte.wrapping_mul(POW3[p]) as u16 * 3) >> 8) as i32 - 1;
    let mut e = 0;
    // qs[0..32]: (1, 5, 32) → value p·32 + l; qs[32..48]: (1, 5, 16); qh: (1, 4, 4).
    for (range, n_pow) in [(0..32, 5), (32..48, 5), (48..52, 4)] {
        let bytes = &b[range];
        for p in 0..n_pow {
            for &byte in bytes {
                out[e] = d * trit(byte, p) as f32;
                e += 1;
            }
        }
    }
}

// block_tq2_0 { uint8_t qs[64]; ggml_half d; }: x = d·(q − 1), q two bits.
fn tq2_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 64);
    for (e, o) in out.iter_mut().enumerate() {
        *o = d * (crumb(&b[0..64], e) as i32 - 1) as f32;
    }
}

/// `kvalues_iq4nl`: the IQ4 codebook.
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

// block_iq4_nl { ggml_half d; uint8_t qs[16]; }
fn iq4_nl(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * KVALUES_IQ4NL[nibble32(&b[2..], i) as usize] as f32;
    }
}

// block_iq4_xs { ggml_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; }
fn iq4_xs(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
        let high = ((scales_h >> (2 * j)) & 3) as u8;
        let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        for (k, o) in sub.iter_mut().enumerate() {
            let q = (qs[j * 16 + k % 16] >> (4 * (k / 16))) & 0x0F;
            *o = dl * KVALUES_IQ4NL[q as usize] as f32;
        }
    }
}

/// `kvalues_mxfp4`: e2m1 values, doubled.
const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

// block_mxfp4 { uint8_t e; uint8_t qs[16]; }: x = 2^(e − 128) · kvalue (ggml_e8m0_to_fp32_half).
fn mxfp4(b: &[u8], out: &mut [f32]) {
    let e = b[0] as u32;
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e - 1) << 23
    };
    let d = f32::from_bits(bits);
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * KVALUES_MXFP4[nibble32(&b[1..], i) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sizes_match_ggml() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::from_id(1000), None);
        // sizeof(block_q4_K) = 2·2 + 12 + 128; sizeof(block_q6_K) = 128 + 64 + 16 + 2
        assert_eq!(
            (GgmlType::Q4_K.block_size(), GgmlType::Q4_K.type_size()),
            (256, 144)
        );
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q8_0.to_string(), "Q8_0");
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        assert_eq!(GgmlType::Q4_0.row_bytes(64).unwrap(), 36);
        let e = GgmlType::Q4_K.row_bytes(88).unwrap_err();
        assert!(
            e.to_string().contains("256") && e.to_string().contains("88"),
            "{e}"
        );
        let mut out = [0f32; 32];
        // 35 bytes: one Q8_0 block (34) plus a stray byte
        let e = dequantize(GgmlType::Q8_0, &[0; 35], &mut out).unwrap_err();
        assert!(matches!(e, KernelError::Size { found: 35, .. }), "{e}");
        let e = dequantize(GgmlType::Q8_0, &[0; 34], &mut out[..16]).unwrap_err();
        assert!(matches!(e, KernelError::Size { .. }), "{e}");
        let e = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut [0f32; 256]).unwrap_err();
        assert!(e.to_string().contains("IQ2_XXS"), "{e}");
        assert!(dequantize_row(GgmlType::Q8_0, &[0; 34], &mut [0f32; 33]).is_err());
    }

    #[test]
    fn q8_0_by_hand() {
        // d = 0.5 (f16 0x3800), q = [-128, 1, 2, ...]: x = 0.5·q
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|i: i32| if i == 0 { 0x80 } else { i as u8 }));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        assert_eq!(out[0], -64.0);
        assert_eq!(out[5], 2.5);
    }
}
