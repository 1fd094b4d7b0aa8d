//! bitsandbytes' blockwise 4-bit formats, NF4 and FP4, with optional double quantization
//! of the block scales: bit-compatible with bitsandbytes 0.50 on the CPU
//! (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`).
//!
//! A weight of `n` elements is read flat, row-major, in blocks of `blocksize` (64 by
//! default; the last block may be short, so blocks straddle rows when the row length is
//! not a multiple of it). Each block keeps its absolute maximum (`absmax`) and one 4-bit
//! index per element into a 16-entry code book, two per byte, the even element in the
//! high nibble: `w[i] = code[q[i]] · absmax[i / blocksize]`.
//!
//! With double quantization (`compress_statistics=True`) the absmax values themselves are
//! stored as 8-bit indices into bitsandbytes' dynamic map, in blocks of 256, after
//! subtracting their mean (`offset`):
//! `absmax[b] = map[qabsmax[b]] · nested_absmax[b / 256] + offset`.

use crate::{KernelError, Result};

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`: quantiles of N(0, 1), scaled
/// to [-1, 1]), indexed by the 4-bit code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// bitsandbytes' FP4 code book (`get_4bit_type("fp4")`: 1 sign, 2 exponent and 1
/// mantissa bit, divided by its largest value 12), indexed by the 4-bit code.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// The FP4 codes in increasing order of their values (`torch.argsort` of [`FP4_CODE`],
/// as bitsandbytes' quantizer sorts them: `+0` before `-0`).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), the code book of the
/// double-quantized absmax; sorted.
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874,
    -0.9789063,
    -0.96484375,
    -0.9507812,
    -0.93671876,
    -0.92265624,
    -0.9085938,
    -0.89453125,
    -0.8804687,
    -0.86640626,
    -0.85234374,
    -0.8382813,
    -0.82421875,
    -0.8101562,
    -0.79609376,
    -0.78203124,
    -0.7679688,
    -0.75390625,
    -0.7398437,
    -0.72578126,
    -0.7117188,
    -0.6976563,
    -0.68359375,
    -0.6695312,
    -0.65546876,
    -0.6414063,
    -0.6273438,
    -0.61328125,
    -0.5992187,
    -0.58515626,
    -0.5710938,
    -0.5570313,
    -0.54296875,
    -0.5289062,
    -0.5148437,
    -0.50078124,
    -0.4867187,
    -0.47265625,
    -0.45859373,
    -0.44453126,
    -0.43046874,
    -0.41640624,
    -0.40234375,
    -0.38828123,
    -0.37421876,
    -0.36015624,
    -0.34609374,
    -0.33203125,
    -0.31796873,
    -0.30390626,
    -0.28984374,
    -0.27578127,
    -0.26171875,
    -0.24765624,
    -0.23359375,
    -0.21953125,
    -0.20546874,
    -0.19140625,
    -0.17734376,
    -0.16328125,
    -0.14921875,
    -0.13515624,
    -0.12109375,
    -0.107031256,
    -0.09859375,
    -0.09578126,
    -0.092968754,
    -0.09015625,
    -0.08734375,
    -0.08453125,
    -0.08171876,
    -0.07890625,
    -0.07609375,
    -0.07328125,
    -0.070468746,
    -0.067656256,
    -0.06484375,
    -0.06203125,
    -0.059218753,
    -0.05640625,
    -0.05359375,
    -0.05078125,
    -0.04796875,
    -0.04515625,
    -0.042343747,
    -0.03953125,
    -0.036718752,
    -0.03390625,
    -0.03109375,
    -0.028281251,
    -0.02546875,
    -0.02265625,
    -0.019843752,
    -0.01703125,
    -0.01421875,
    -0.01140625,
    -0.00971875,
    -0.009156249,
    -0.00859375,
    -0.00803125,
    -0.00746875,
    -0.00690625,
    -0.00634375,
    -0.00578125,
    -0.0052187503,
    -0.0046562497,
    -0.00409375,
    -0.0035312497,
    -0.00296875,
    -0.00240625,
    -0.00184375,
    -0.0012812499,
    -0.0009437501,
    -0.00083125,
    -0.00071875006,
    -0.0006062501,
    -0.00049375003,
    -0.00038125002,
    -0.00026875004,
    -0.00015625001,
    -0.00008875,
    -0.00006625,
    -0.00004375,
    -0.000021249998,
    -0.00000775,
    -0.0000032500002,
    -0.00000055000004,
    0.0,
    0.00000055000004,
    0.0000032500002,
    0.00000775,
    0.000021249998,
    0.00004375,
    0.00006625,
    0.00008875,
    0.00015625001,
    0.00026875004,
    0.00038125002,
    0.00049375003,
    0.0006062501,
    0.00071875006,
    0.00083125,
    0.0009437501,
    0.0012812499,
    0.00184375,
    0.00240625,
    0.00296875,
    0.0035312497,
    0.00409375,
    0.0046562497,
    0.0052187503,
    0.00578125,
    0.00634375,
    0.00690625,
    0.00746875,
    0.00803125,
    0.00859375,
    0.009156249,
    0.00971875,
    0.01140625,
    0.01421875,
    0.01703125,
    0.019843752,
    0.02265625,
    0.02546875,
    0.028281251,
    0.03109375,
    0.03390625,
    0.036718752,
    0.03953125,
    0.042343747,
    0.04515625,
    0.04796875,
    0.05078125,
    0.05359375,
    0.05640625,
    0.059218753,
    0.06203125,
    0.06484375,
    0.067656256,
    0.070468746,
    0.07328125,
    0.07609375,
    0.07890625,
    0.08171876,
    0.08453125,
    0.08734375,
    0.09015625,
    0.092968754,
    0.09578126,
    0.09859375,
    0.107031256,
    0.12109375,
    0.13515624,
    0.14921875,
    0.16328125,
    0.17734376,
    0.19140625,
    0.20546874,
    0.21953125,
    0.23359375,
    0.24765624,
    0.26171875,
    0.27578127,
    0.28984374,
    0.30390626,
    0.31796873,
    0.33203125,
    0.34609374,
    0.36015624,
    0.37421876,
    0.38828123,
    0.40234375,
    0.41640624,
    0.43046874,
    0.44453126,
    0.45859373,
    0.47265625,
    0.4867187,
    0.50078124,
    0.5148437,
    0.5289062,
    0.54296875,
    0.5570313,
    0.5710938,
    0.58515626,
    0.5992187,
    0.61328125,
    0.6273438,
    0.6414063,
    0.65546876,
    0.6695312,
    0.68359375,
    0.6976563,
    0.7117188,
    0.72578126,
    0.7398437,
    0.75390625,
    0.7679688,
    0.78203124,
    0.79609376,
    0.8101562,
    0.82421875,
    0.8382813,
    0.85234374,
    0.86640626,
    0.8804687,
    0.89453125,
    0.9085938,
    0.92265624,
    0.93671876,
    0.9507812,
    0.96484375,
    0.9789063,
    0.99296874,
    1.0,
];

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The 4-bit block size bitsandbytes (and transformers' `BitsAndBytesConfig`) uses by
/// default.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// The block size of the double quantization (`quantize_blockwise(absmax, blocksize=256)`).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FourBit {
    /// NormalFloat4 ([`NF4_CODE`]), QLoRA's format.
    Nf4,
    /// bitsandbytes' 4-bit float ([`FP4_CODE`]).
    Fp4,
}

impl FourBit {
    /// The 16 values the codes stand for.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBit::Nf4 => &NF4_CODE,
            FourBit::Fp4 => &FP4_CODE,
        }
    }

    /// bitsandbytes' name, `"nf4"` or `"fp4"` (its `quant_type`).
    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }

    /// The code book named by a bitsandbytes `quant_type`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nf4" => Some(FourBit::Nf4),
            "fp4" => Some(FourBit::Fp4),
            _ => None,
        }
    }

    /// The code of each sorted position and the midpoints between neighbouring sorted
    /// values (`_get_4bit_quantize_bounds`).
    fn bounds(self) -> ([u8; 16], [f32; 15]) {
        let order: [u8; 16] = match self {
            FourBit::Nf4 => std::array::from_fn(|i| i as u8),
            FourBit::Fp4 => FP4_ORDER,
        };
        let code = self.code();
        let mid =
            std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        (order, mid)
    }
}

/// The block scales of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`weight.absmax`, float32).
    F32(Vec<f32>),
    /// Double-quantized (`compress_statistics=True`).
    Nested(NestedAbsmax),
}

/// Double-quantized block scales: `absmax[b] = code[codes[b]] · absmax[b / blocksize] +
/// offset` (bitsandbytes' `dequantize_blockwise(qabsmax, state2) + offset`).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit index per 4-bit block (`weight.absmax`, uint8).
    pub codes: Vec<u8>,
    /// One scale per `blocksize` indices (`weight.nested_absmax`).
    pub absmax: Vec<f32>,
    /// The 256-entry code book (`weight.nested_quant_map`, [`DYNAMIC_MAP`] when made by
    /// bitsandbytes).
    pub code: Vec<f32>,
    /// Indices per nested block (`nested_blocksize`, 256).
    pub blocksize: usize,
    /// The mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

/// A 4-bit weight as bitsandbytes stores it: packed codes and block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4bit {
    /// The code book.
    pub kind: FourBit,
    /// Elements per block.
    pub blocksize: usize,
    /// `ceil(n / 2)` bytes, element `2k` in the high nibble of byte `k`.
    pub packed: Vec<u8>,
    /// The block scales.
    pub absmax: Absmax,
}

impl Bnb4bit {
    /// Quantizes a flat weight as `quantize_4bit(w, blocksize, quant_type,
    /// compress_statistics=double_quant)` does. The caller checks that the weight is
    /// finite and the block size one of [`BLOCKSIZES`].
    pub fn quantize(w: &[f32], kind: FourBit, blocksize: usize, double_quant: bool) -> Self {
        let (packed, absmax) = quantize_4bit(w, kind, blocksize);
        let absmax = if double_quant {
            Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::F32(absmax)
        };
        Bnb4bit {
            kind,
            blocksize,
            packed,
            absmax,
        }
    }

    /// The borrowed form the products read.
    pub fn view(&self) -> Bnb4View<'_> {
        Bnb4View {
            kind: self.kind,
            blocksize: self.blocksize,
            packed: &self.packed,
            absmax: match &self.absmax {
                Absmax::F32(a) => AbsmaxView::F32(a),
                Absmax::Nested(n) => AbsmaxView::Nested {
                    codes: &n.codes,
                    absmax: &n.absmax,
                    code: &n.code,
                    blocksize: n.blocksize,
                    offset: n.offset,
                },
            },
        }
    }
}

impl NestedAbsmax {
    /// Double quantization as `quantize_4bit(..., compress_statistics=True)`:
    /// `offset = mean(absmax)`, then [`quantize_blockwise`] of `absmax - offset` with
    /// [`DYNAMIC_MAP`] in blocks of [`NESTED_BLOCKSIZE`].
    ///
    /// The mean is the exactly rounded one (torch's float32 `mean` may differ from it in
    /// the last bit); [`NestedAbsmax::quantize_with_offset`] takes a given one.
    pub fn quantize(absmax: &[f32]) -> Self {
        let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (sum / absmax.len() as f64) as f32
        };
        Self::quantize_with_offset(absmax, offset)
    }

    /// Double quantization around a given `offset`.
    pub fn quantize_with_offset(absmax: &[f32], offset: f32) -> Self {
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, nested) = quantize_blockwise(&centered, &DYNAMIC_MAP, NESTED_BLOCKSIZE);
        NestedAbsmax {
            codes,
            absmax: nested,
            code: DYNAMIC_MAP.to_vec(),
            blocksize: NESTED_BLOCKSIZE,
            offset,
        }
    }

    /// The f32 scale of every 4-bit block.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len())
            .map(|b| {
                self.code[self.codes[b] as usize] * self.absmax[b / self.blocksize] + self.offset
            })
            .collect()
    }
}

/// The 4-bit codes and f32 block absmax of a flat weight, as bitsandbytes' CPU
/// `quantize_4bit` kernel computes them (`backends/default/ops.py`): in a whole block,
/// `x · (1 / max(absmax, 1e-38))`, in the short last block `x / max(absmax, 1e-38)`
/// (whose stored absmax is the clamped one), clamped to [-1, 1], then the index of the
/// nearest code with ties to the lower value (`torch.bucketize` on the midpoints); an odd
/// element count is padded with the code of 0. Returns `(packed, absmax)`.
pub fn quantize_4bit(w: &[f32], kind: FourBit, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let (order, mid) = kind.bounds();
    // the number of midpoints below `s` (they are sorted): a binary search
    let code_of = |s: f32| order[mid.partition_point(|&m| m < s)];
    let full = w.len() - w.len() % blocksize;
    let mut absmax = Vec::with_capacity(w.len().div_ceil(blocksize));
    let mut codes = Vec::with_capacity(w.len() + 1);
    for block in w[..full].chunks_exact(blocksize) {
        let am = abs_max(block);
        absmax.push(am);
        let inv = 1.0 / am.max(1e-38);
        codes.extend(block.iter().map(|&v| code_of((v * inv).clamp(-1.0, 1.0))));
    }
    if full < w.len() {
        let rest = &w[full..];
        let am = abs_max(rest).max(1e-38);
        absmax.push(am);
        codes.extend(rest.iter().map(|&v| code_of((v / am).clamp(-1.0, 1.0))));
    }
    if codes.len() % 2 == 1 {
        codes.push(code_of(0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// 8-bit blockwise quantization as bitsandbytes' CPU `quantize_blockwise` kernel
/// (`quantize_cpu`): per block `absmax = max |x|` (an all-zero block gets codes 0), then
/// `v = clamp(x · (1 / absmax), -1, 1)` looked up in a 65536-entry table of nearest codes
/// at `trunc((v + 1) · 0.5 · 65535 + 0.5)`. `code` must be sorted. Returns
/// `(codes, absmax)`.
pub fn quantize_blockwise(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(code);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = abs_max(block);
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| {
            let v = (v * inv).clamp(-1.0, 1.0);
            lut[((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize]
        }));
    }
    (codes, absmax)
}

/// bitsandbytes' `build_quantize_lut`: for each of 65536 evenly spaced values in [-1, 1],
/// the index of the code whose midpoint interval holds it.
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
    let mut lut = Vec::with_capacity(65536);
    let mut idx = 0usize;
    for i in 0..65536u32 {
        let val = -1.0 + (2.0 * i as f32) / 65535.0;
        while idx < mid.len() && mid[idx] < val {
            idx += 1;
        }
        lut.push(idx as u8);
    }
    lut
}

/// `max |v|` (0 for an empty slice).
fn abs_max(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// A borrowed 4-bit weight (slices of a [`Bnb4bit`], or of tensors holding the same
/// bytes).
#[derive(Clone, Copy, Debug)]
pub struct Bnb4View<'a> {
    /// The code book.
    pub kind: FourBit,
    /// Elements per block.
    pub blocksize: usize,
    /// At least `ceil(n / 2)` bytes (more are ignored: tensors may pad).
    pub packed: &'a [u8],
    /// The block scales.
    pub absmax: AbsmaxView<'a>,
}

/// Borrowed block scales.
#[derive(Clone, Copy, Debug)]
pub enum AbsmaxView<'a> {
    /// One f32 per block.
    F32(&'a [f32]),
    /// Double-quantized, as [`NestedAbsmax`].
    Nested {
        /// One index per block.
        codes: &'a [u8],
        /// One scale per `blocksize` indices.
        absmax: &'a [f32],
        /// 256 entries.
        code: &'a [f32],
        /// Indices per nested block.
        blocksize: usize,
        /// Added after scaling.
        offset: f32,
    },
}

impl AbsmaxView<'_> {
    /// The scale of block `b` (in range: checked by [`Bnb4View::validate`]).
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match *self {
            AbsmaxView::F32(a) => a[b],
            AbsmaxView::Nested {
                codes,
                absmax,
                code,
                blocksize,
                offset,
            } => code[codes[b] as usize] * absmax[b / blocksize] + offset,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match *self {
            AbsmaxView::F32(a) => 4 * a.len(),
            AbsmaxView::Nested {
                codes,
                absmax,
                code,
                ..
            } => codes.len() + 4 * absmax.len() + 4 * code.len(),
        }
    }
}

impl Bnb4View<'_> {
    /// Checks every size against a weight of `n` elements (`what` names it in errors).
    pub fn validate(&self, what: &str, n: usize) -> Result<()> {
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(KernelError::Invalid {
                what: what.to_string(),
                message: format!(
                    "4-bit blocksize must be one of {BLOCKSIZES:?}, found {}",
                    self.blocksize
                ),
            });
        }
        let bytes = n.div_ceil(2);
        if self.packed.len() < bytes {
            return Err(KernelError::Size {
                what: format!("{what} (packed {} codes)", self.kind.name()),
                expected: bytes,
                found: self.packed.len(),
            });
        }
        let blocks = n.div_ceil(self.blocksize);
        match self.absmax {
            AbsmaxView::F32(a) => check_len(&format!("{what}.absmax"), blocks, a.len()),
            AbsmaxView::Nested {
                codes,
                absmax,
                code,
                blocksize,
                offset,
            } => {
                check_len(&format!("{what}.absmax"), blocks, codes.len())?;
                check_len(&format!("{what}.nested_quant_map"), 256, code.len())?;
                if blocksize == 0 {
                    return Err(KernelError::Invalid {
                        what: format!("{what}.quant_state"),
                        message: "nested_blocksize must be positive, found 0".into(),
                    });
                }
                let nested = blocks.div_ceil(blocksize);
                check_len(&format!("{what}.nested_absmax"), nested, absmax.len())?;
                if !offset.is_finite() {
                    return Err(KernelError::Invalid {
                        what: format!("{what}.quant_state"),
                        message: format!("nested_offset must be finite, found {offset}"),
                    });
                }
                Ok(())
            }
        }
    }

    /// Bytes held (codes and scales, without any padding past `ceil(n / 2)`).
    pub fn bytes(&self, n: usize) -> usize {
        n.div_ceil(2) + self.absmax.bytes()
    }

    /// Elements `start..start + out.len()` of the flat weight, into `out`
    /// (bitsandbytes' `dequantize_4bit`: `code[q] · absmax`, one f32 product).
    pub(crate) fn dequantize_flat(&self, start: usize, out: &mut [f32]) {
        let code = self.kind.code();
        let end = start + out.len();
        let mut i = start;
        while i < end {
            let b = i / self.blocksize;
            let stop = ((b + 1) * self.blocksize).min(end);
            let scale = self.absmax.get(b);
            decode_run(
                self.packed,
                i,
                code,
                scale,
                &mut out[i - start..stop - start],
            );
            i = stop;
        }
    }
}

/// `dst[j] = code[q[first + j]] · scale` for the packed codes `q`.
#[inline]
fn decode_run(packed: &[u8], first: usize, code: &[f32; 16], scale: f32, dst: &mut [f32]) {
    let (mut idx, mut dst) = (first, dst);
    if idx % 2 == 1 {
        let Some((head, rest)) = dst.split_first_mut() else {
            return;
        };
        *head = code[(packed[idx / 2] & 0x0F) as usize] * scale;
        idx += 1;
        dst = rest;
    }
    let pairs = dst.len() / 2;
    let bytes = &packed[idx / 2..idx / 2 + pairs];
    let mut chunks = dst.chunks_exact_mut(2);
    for (pair, &byte) in (&mut chunks).zip(bytes) {
        pair[0] = code[(byte >> 4) as usize] * scale;
        pair[1] = code[(byte & 0x0F) as usize] * scale;
    }
    if let [last] = chunks.into_remainder() {
        *last = code[(packed[idx / 2 + pairs] >> 4) as usize] * scale;
    }
}

/// An element-count check.
pub(crate) fn check_len(what: &str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(KernelError::Length {
            what: what.to_string(),
            expected,
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FP4 sort order is the one `torch.argsort` gives bitsandbytes (the values it
    /// lists are increasing, +0 before -0).
    #[test]
    fn fp4_order_sorts_the_code_book() {
        let (order, mid) = FourBit::Fp4.bounds();
        let sorted: Vec<f32> = order.iter().map(|&c| FP4_CODE[c as usize]).collect();
        assert!(sorted.windows(2).all(|p| p[0] <= p[1]), "{sorted:?}");
        assert!(mid.windows(2).all(|p| p[0] <= p[1]));
    }

    /// Hand derivation: NF4 with blocksize 32, one block [1.0, -1.0, 0.0, m, ...] where m is
    /// the midpoint between codes 8 and 9 (a tie: the lower code, 8); padding to an
    /// even count uses the code of 0 (7).
    #[test]
    fn nf4_ties_go_to_the_lower_code() {
        let m = (NF4_CODE[8] + NF4_CODE[9]) / 2.0;
        let w = [1.0, -1.0, 0.0, m, 0.5];
        let (packed, absmax) = quantize_4bit(&w, FourBit::Nf4, 32);
        assert_eq!(absmax, vec![1.0]);
        // 1.0 → 15, -1.0 → 0, 0 → 7, m → 8, 0.5 → 12 (0.44070983 is 0.059 away,
        // 0.562617 0.063), pad → 7.
        assert_eq!(packed, vec![0xF0, 0x78, 0xC7]);
    }

    /// A zero block in a whole block keeps absmax 0; a short last block stores the clamp
    /// 1e-38 (bitsandbytes' `clamp(min=1e-38)` only feeds the stored value there).
    #[test]
    fn zero_blocks_follow_bitsandbytes() {
        let (_, absmax) = quantize_4bit(&[0.0; 40], FourBit::Nf4, 32);
        assert_eq!(absmax, vec![0.0, 1e-38]);
    }
}
