//! A frozen linear weight as a burn module, in its storage format on any backend:
//! [`FrozenWeight`] and the product [`frozen_linear`].
//!
//! - Dense weights (f32, bf16, f16) are one `Param<Tensor<B, 2>>` of that burn dtype.
//! - Quantized weights (bitsandbytes NF4/FP4, with or without double quantization, int8,
//!   and a GGUF file's GGML blocks) keep their codes' bytes in int tensors, as
//!   little-endian `i32` words (a 4-bit word holds 8 codes in bitsandbytes' byte and
//!   nibble order, an int8 word 4 codes, GGML blocks their bytes as in the file), and
//!   their scales in f32 tensors (GGML blocks carry theirs inside): about the size of the
//!   file, on every backend.
//!
//! `Flex` and `Autodiff<Flex>` (feature `flex`) read those bytes in place (no copy) and
//! run the tile-dequantizing products ([`crate::quant::matmul_xwt`]); under autodiff one
//! backward node gives the input (and bias) gradient, the weight getting none. Every
//! other backend (and [`frozen_linear_reference`]) dequantizes the one projection with
//! burn ops (shift, mask, gather from the code book, multiply) and multiplies.

use std::sync::Arc;

use burn::module::{Module, Param, ParamId};
use burn::prelude::*;
use burn::tensor::{
    AllocationProperty, Bytes, DType, ElementConversion, TensorCreationOptions, TensorData,
};
use half::vec::HalfBitsVecExt;

use super::bnb::{Absmax, FourBit};
use super::int8::INV_127;
use super::matrix::{Blob, Format, QuantMatrix, Storage};

/// A frozen linear weight `[out, in]` (HF layout), dense or quantized.
// One per projection, never in bulk collections: the size gap between the variants
// (three params against one) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum FrozenWeight<B: Backend> {
    /// A dense weight in its burn dtype (f32, bf16 or f16), not requiring a gradient.
    Dense(Param<Tensor<B, 2>>),
    /// Quantized codes and scales.
    Quantized(QuantizedWeight<B>),
}

/// The tensors of a quantized [`FrozenWeight`]; made by [`FrozenWeight::from_quant`].
#[derive(Module, Debug)]
pub struct QuantizedWeight<B: Backend> {
    /// The codes' bytes as little-endian `i32` words, zero-padded (4-bit: to whole
    /// blocks).
    pub(crate) codes: Param<Tensor<B, 1, Int>>,
    /// f32 scales: the 4-bit block absmax, the int8 row scales (`SCB`), or with double
    /// quantization the nested absmax.
    pub(crate) scales: Param<Tensor<B, 1>>,
    /// With double quantization: the 8-bit absmax codes as `i32` words, zero-padded to
    /// whole nested blocks. (GGML blocks: one unused 0, their scales are in the blocks.)
    pub(crate) nested_codes: Option<Param<Tensor<B, 1, Int>>>,
    /// Sizes and format.
    #[module(skip)]
    pub(crate) meta: QuantMeta,
}

/// Sizes and format of a [`QuantizedWeight`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QuantMeta {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) scheme: Scheme,
    /// The codes were handed to the backend as a mapped file's bytes (no copy).
    pub(crate) mapped: bool,
    /// Decoding products keep f32 activations ([`QuantMatrix::with_exact_decode`]).
    pub(crate) exact_decode: bool,
}

/// The quantization scheme of a [`QuantizedWeight`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Scheme {
    /// LLM.int8() row-wise codes.
    Int8,
    /// bitsandbytes 4-bit.
    Bnb4 {
        kind: FourBit,
        blocksize: usize,
        /// `(nested_blocksize, offset, 256-entry code book)` with double quantization.
        nested: Option<(usize, f32, Arc<[f32]>)>,
    },
    /// GGML blocks of a GGUF file, each row its whole blocks.
    Ggml(super::ggml::GgmlType),
}

impl QuantMeta {
    /// The storage format.
    pub(crate) fn format(&self) -> Format {
        match &self.scheme {
            Scheme::Int8 => Format::Int8,
            Scheme::Ggml(ty) => Format::Ggml(*ty),
            Scheme::Bnb4 { kind, nested, .. } => {
                let double_quant = nested.is_some();
                match kind {
                    FourBit::Nf4 => Format::Nf4 { double_quant },
                    FourBit::Fp4 => Format::Fp4 { double_quant },
                }
            }
        }
    }
}

impl<B: Backend> FrozenWeight<B> {
    /// A dense weight `[out, in]` as given (any float dtype), marked as not requiring a
    /// gradient.
    pub fn dense(weight: Tensor<B, 2>) -> Self {
        FrozenWeight::Dense(Param::initialized(ParamId::new(), weight).set_require_grad(false))
    }

    /// Moves a [`QuantMatrix`] onto `device`: f32/bf16/f16 as a dense tensor of that
    /// dtype, int8 and 4-bit as codes and scales (see the module docs).
    pub fn from_quant(m: QuantMatrix, device: &B::Device) -> Self {
        let (rows, cols, exact_decode) = (m.rows(), m.cols(), m.exact_decode());
        let shape = [rows, cols];
        let float = |data: TensorData, dtype: DType| {
            let opts = TensorCreationOptions::new(device.clone()).with_dtype(dtype);
            Tensor::<B, 2>::from_data(data, opts)
        };
        let scheme;
        let (codes, scales, nested_codes) = match m.into_storage() {
            Storage::F32(w) => return Self::dense(float(TensorData::new(w, shape), DType::F32)),
            // The bits reinterpreted in place (same layout): no second copy while loading.
            Storage::Bf16(bits) => {
                let w: Vec<half::bf16> = bits.reinterpret_into();
                return Self::dense(float(TensorData::new(w, shape), DType::BF16));
            }
            Storage::F16(bits) => {
                let w: Vec<half::f16> = bits.reinterpret_into();
                return Self::dense(float(TensorData::new(w, shape), DType::F16));
            }
            Storage::Int8 { codes, scales } => {
                scheme = Scheme::Int8;
                let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
                (words(&bytes, bytes.len()), scales, None)
            }
            Storage::Ggml { ty, data } => {
                let mapped = matches!(&data, Blob::Mapped(b) if is_words(b));
                let codes = match data {
                    Blob::Mapped(b) if mapped => mapped_words(b, device),
                    data => int_param(words(&data, data.len()), device),
                };
                let meta = QuantMeta {
                    rows,
                    cols,
                    scheme: Scheme::Ggml(ty),
                    mapped,
                    exact_decode,
                };
                return Self::Quantized(QuantizedWeight {
                    codes,
                    scales: f32_param(vec![0.0], device),
                    nested_codes: None,
                    meta,
                });
            }
            Storage::Bnb4(q) => {
                let n = rows * cols;
                let blocks = n.div_ceil(q.blocksize);
                let codes = words(&q.packed, blocks * q.blocksize / 2);
                let (scales, nested, nested_codes) = match q.absmax {
                    Absmax::F32(a) => (a, None, None),
                    Absmax::Nested(nq) => {
                        let padded = blocks.div_ceil(nq.blocksize) * nq.blocksize;
                        let nested = (nq.blocksize, nq.offset, Arc::from(nq.code));
                        (nq.absmax, Some(nested), Some(words(&nq.codes, padded)))
                    }
                };
                scheme = Scheme::Bnb4 {
                    kind: q.kind,
                    blocksize: q.blocksize,
                    nested,
                };
                (codes, scales, nested_codes)
            }
        };
        FrozenWeight::Quantized(QuantizedWeight {
            codes: int_param(codes, device),
            scales: f32_param(scales, device),
            nested_codes: nested_codes.map(|w| int_param(w, device)),
            meta: QuantMeta {
                rows,
                cols,
                scheme,
                mapped: false,
                exact_decode,
            },
        })
    }

    /// Whether the weight's codes are a memory-mapped file's bytes, handed to the backend
    /// without a copy (the CPU backend reads them in place; a GPU backend copies them to
    /// its device).
    pub fn is_mapped(&self) -> bool {
        match self {
            FrozenWeight::Dense(_) => false,
            FrozenWeight::Quantized(q) => q.meta.mapped,
        }
    }

    /// The weight as an f32 tensor `[out, in]`: a dense f32 weight's own tensor (no
    /// copy), any other storage dequantized ([`FrozenWeight::dequantize`]). For merging
    /// and export; the products read the storage in place.
    pub fn val(&self) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(w) if w.val().dtype() == DType::F32 => w.val(),
            _ => self.dequantize(),
        }
    }

    /// The rows `ids` of the weight as f32 `[ids, in]` (an embedding lookup): a dense
    /// weight gathers its rows in its dtype and casts only those; a quantized one
    /// dequantizes only those rows on `Flex` / `Autodiff<Flex>`, and is dequantized whole
    /// first elsewhere.
    ///
    /// # Shapes
    /// - ids: `[n]` → `[n, in]`
    pub fn rows(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(w) => w.val().select(0, ids).cast(DType::F32),
            FrozenWeight::Quantized(_) => {
                #[cfg(feature = "flex")]
                if let Some(rows) = crate::flex::frozen::rows(self, &ids) {
                    return rows;
                }
                self.dequantize().select(0, ids)
            }
        }
    }

    /// The device the weight's tensors live on.
    pub fn device(&self) -> B::Device {
        match self {
            FrozenWeight::Dense(w) => w.device(),
            FrozenWeight::Quantized(q) => q.scales.device(),
        }
    }

    /// A dense weight holding `value` (detached), in the dtype of a dense `self` (f32 for
    /// a quantized one: a merged weight is no longer the quantized one), keeping a dense
    /// weight's parameter id.
    pub fn with_dense_value(&self, value: Tensor<B, 2>) -> Self {
        match self {
            FrozenWeight::Dense(w) => {
                let value = value.detach().cast(w.val().dtype());
                FrozenWeight::Dense(Param::initialized(w.id, value).set_require_grad(false))
            }
            FrozenWeight::Quantized(_) => Self::dense(value.detach()),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(w) => w.val().dims(),
            FrozenWeight::Quantized(q) => [q.meta.rows, q.meta.cols],
        }
    }

    /// The storage format (a dense weight's from its dtype; other float dtypes report
    /// [`Format::F32`]).
    pub fn format(&self) -> Format {
        match self {
            FrozenWeight::Dense(w) => match w.val().dtype() {
                DType::BF16 => Format::Bf16,
                DType::F16 => Format::F16,
                _ => Format::F32,
            },
            FrozenWeight::Quantized(q) => q.meta.format(),
        }
    }

    /// Memory held by the weight's tensors (and the double-quantization code book), in
    /// bytes.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(w) => {
                let w = w.val();
                w.shape().num_elements() * w.dtype().size()
            }
            FrozenWeight::Quantized(q) => {
                let table = match &q.meta.scheme {
                    Scheme::Bnb4 {
                        nested: Some((_, _, code)),
                        ..
                    } => 4 * code.len(),
                    _ => 0,
                };
                let nested = q.nested_codes.as_ref().map_or(0, |c| 4 * c.val().dims()[0]);
                4 * q.codes.val().dims()[0] + 4 * q.scales.val().dims()[0] + nested + table
            }
        }
    }

    /// Whether [`frozen_linear`] takes the fused CPU kernel for this weight on `B` (`Flex`
    /// or `Autodiff<Flex>` with the `flex` feature, the tensors stored as made by
    /// [`FrozenWeight::from_quant`] or [`FrozenWeight::dense`] with an f32/bf16/f16 dtype).
    pub fn has_fused_path(&self) -> bool {
        #[cfg(feature = "flex")]
        {
            crate::flex::frozen::has_fused_path(self)
        }
        #[cfg(not(feature = "flex"))]
        {
            false
        }
    }

    /// The weight as an f32 tensor `[out, in]`: on `Flex` / `Autodiff<Flex>` dequantized in
    /// Rust from the stored bytes, elsewhere by [`FrozenWeight::dequantize_reference`].
    pub fn dequantize(&self) -> Tensor<B, 2> {
        #[cfg(feature = "flex")]
        if let Some(w) = crate::flex::frozen::dequantize(self) {
            return w;
        }
        self.dequantize_reference()
    }

    /// The weight as an f32 tensor `[out, in]`, with burn tensor ops only (any backend):
    /// shift and mask the code words, gather from the code book, scale per block or row.
    pub fn dequantize_reference(&self) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(w) => w.val().cast(DType::F32),
            FrozenWeight::Quantized(q) => q.dequantize_reference(),
        }
    }
}

impl<B: Backend> QuantizedWeight<B> {
    /// See [`FrozenWeight::dequantize_reference`].
    fn dequantize_reference(&self) -> Tensor<B, 2> {
        let QuantMeta {
            rows, cols, scheme, ..
        } = &self.meta;
        let (rows, cols, n) = (*rows, *cols, rows * cols);
        let device = self.scales.val().device();
        let flat = match scheme {
            Scheme::Ggml(ty) => {
                // Decoded on the host (each block type's bit layout is not worth burn ops):
                // the codes' bytes read back, the blocks decoded as the fused path does.
                let words = self.codes.val().into_data().convert::<i32>();
                let words = words.as_slice::<i32>().unwrap_or_default();
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let mut out = vec![0.0f32; n];
                super::ggml::dequantize_span(*ty, &bytes, cols, 0, &mut out);
                let data = TensorData::new(out, [rows, cols]);
                return Tensor::from_data(data, &device);
            }
            Scheme::Int8 => {
                let codes = unpack(self.codes.val(), 4, 8, 0xFF)
                    .bitwise_xor_scalar(0x80.elem())
                    .sub_scalar(128)
                    .float()
                    .slice(0..n)
                    .reshape([rows, cols]);
                let scales = self.scales.val().reshape([rows, 1]);
                return (codes * scales).mul_scalar(INV_127);
            }
            Scheme::Bnb4 {
                kind,
                blocksize,
                nested,
            } => {
                let blocks = n.div_ceil(*blocksize);
                let absmax = match nested {
                    None => self.scales.val(),
                    Some((nbs, offset, code)) => {
                        let words = self.nested_codes.as_ref().map(|c| c.val());
                        let words = words.expect("double quantization keeps nested codes");
                        let map = Tensor::<B, 1>::from_floats(&code[..], &device);
                        let nested_blocks = blocks.div_ceil(*nbs);
                        let idx = unpack(words, 4, 8, 0xFF).slice(0..nested_blocks * nbs);
                        let scale = self.scales.val().reshape([nested_blocks, 1]);
                        let v = map.select(0, idx).reshape([nested_blocks, *nbs]) * scale;
                        v.reshape([nested_blocks * nbs])
                            .slice(0..blocks)
                            .add_scalar(*offset)
                    }
                };
                let book = Tensor::<B, 1>::from_floats(&kind.code()[..], &device);
                let idx = nibbles(self.codes.val()).slice(0..blocks * blocksize);
                let v = book.select(0, idx).reshape([blocks, *blocksize]);
                (v * absmax.reshape([blocks, 1])).reshape([blocks * blocksize])
            }
        };
        flat.slice(0..n).reshape([rows, cols])
    }
}

/// `bytes` zero-padded to `len` (at least `bytes.len()`) and then to whole words, as
/// little-endian `i32`s.
/// An `i32` tensor parameter of `w`.
fn int_param<B: Backend>(w: Vec<i32>, device: &B::Device) -> Param<Tensor<B, 1, Int>> {
    let len = w.len();
    let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::I32);
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(w, [len]), opts);
    Param::initialized(ParamId::new(), t)
}

/// An f32 tensor parameter of `v`, not requiring a gradient.
fn f32_param<B: Backend>(v: Vec<f32>, device: &B::Device) -> Param<Tensor<B, 1>> {
    let len = v.len();
    let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::F32);
    let t = Tensor::<B, 1>::from_data(TensorData::new(v, [len]), opts);
    Param::initialized(ParamId::new(), t).set_require_grad(false)
}

/// Whether mapped bytes can be read in place as little-endian `i32` words: aligned to 4,
/// a whole number of words, on a little-endian machine.
fn is_words(b: &bytes::Bytes) -> bool {
    cfg!(target_endian = "little") && b.as_ptr() as usize % 4 == 0 && b.len() % 4 == 0
}

/// The mapped bytes `b` (checked by [`is_words`]) as an `i32` tensor parameter without a
/// copy: burn's shared bytes keep the mapping alive and copy only if written to (a frozen
/// weight never is).
fn mapped_words<B: Backend>(b: bytes::Bytes, device: &B::Device) -> Param<Tensor<B, 1, Int>> {
    let len = b.len() / 4;
    let shared = Bytes::from_shared(b, AllocationProperty::File);
    let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::I32);
    let t = Tensor::<B, 1, Int>::from_data(TensorData::from_bytes(shared, [len], DType::I32), opts);
    Param::initialized(ParamId::new(), t)
}

fn words(bytes: &[u8], len: usize) -> Vec<i32> {
    let len = len.max(bytes.len()).next_multiple_of(4);
    let mut padded = bytes.to_vec();
    padded.resize(len, 0);
    padded
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The `per` fields of `bits` bits of every word, lowest first, masked with `mask`:
/// `[W]` → `[W·per]`.
fn unpack<B: Backend>(
    words: Tensor<B, 1, Int>,
    per: usize,
    bits: usize,
    mask: i32,
) -> Tensor<B, 1, Int> {
    let w = words.dims()[0];
    let parts: Vec<Tensor<B, 1, Int>> = (0..per)
        .map(|j| {
            words
                .clone()
                .bitwise_right_shift_scalar(((j * bits) as i32).elem())
                .bitwise_and_scalar(mask.elem())
        })
        .collect();
    Tensor::stack::<2>(parts, 1).reshape([w * per])
}

/// The 8 nibbles of every word in element order (byte `k` holds elements `2k` (high
/// nibble) and `2k + 1` (low)): `[W]` → `[8W]`.
fn nibbles<B: Backend>(words: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    let w = words.dims()[0];
    let parts: Vec<Tensor<B, 1, Int>> = (0..8)
        .map(|j| {
            let shift = 8 * (j / 2) + if j % 2 == 0 { 4 } else { 0 };
            words
                .clone()
                .bitwise_right_shift_scalar(shift.elem())
                .bitwise_and_scalar(0x0F.elem())
        })
        .collect();
    Tensor::stack::<2>(parts, 1).reshape([w * 8])
}

/// Says once per process (tracing, `warn`) that a quantized frozen weight runs the
/// reference path (dequantized per projection with burn ops) on a backend without the
/// fused CPU kernels; dense f32 weights say nothing (that is the designed path there).
pub(crate) fn note_reference_path<B: Backend>(weight: &FrozenWeight<B>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let format = weight.format();
    if format == Format::F32 {
        return;
    }
    ONCE.call_once(|| {
        tracing::warn!(
            "frozen weights stored as {} have no fused kernel on backend {}: each \
             projection is dequantized with burn ops, then multiplied (slower than the \
             CPU kernels of `Flex`)",
            format.name(),
            std::any::type_name::<B>()
        );
    });
}

/// `x·Wᵀ + bias` with a frozen weight: the tile-dequantizing CPU kernel on `Flex` and
/// `Autodiff<Flex>` (f32 activations; the backward gives `x` and `bias` their gradients,
/// the weight none), [`frozen_linear_reference`] elsewhere.
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]` → `[N, out]`
pub fn frozen_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, bias) = match crate::flex::frozen::frozen_linear(x, weight, bias) {
        Ok(out) => return out,
        Err(args) => args,
    };
    note_reference_path(weight);
    frozen_linear_reference(x, weight, bias)
}

/// The reference path of [`frozen_linear`]: dequantize the weight with burn ops
/// ([`FrozenWeight::dequantize_reference`]), then `x·Wᵀ + bias` (the weight detached: it
/// gets no gradient).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]` → `[N, out]`
pub fn frozen_linear_reference<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let w = weight.dequantize_reference().detach();
    let y = x.matmul(w.transpose());
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}
