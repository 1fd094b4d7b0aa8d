//! Frozen-weight storage: the formats a frozen base weight may keep in memory
//! (bitsandbytes NF4/FP4/int8, half floats, llama.cpp's GGML blocks), their reference
//! (de)quantization, and the tile-dequantizing products the kernels use.
//!
//! Layout of this module:
//! - [`bnb`]: bitsandbytes' 4-bit formats (NF4, FP4, double-quantized absmax),
//!   bit-compatible with bitsandbytes 0.50's CPU kernels;
//! - [`int8`]: bitsandbytes' LLM.int8() row-wise codes (no outlier split);
//! - [`float16`]: bf16 / f16 bits;
//! - [`matrix`]: [`QuantMatrix`] (owned) and [`QuantView`] (borrowed): a `[rows, cols]`
//!   weight in one [`Format`], dequantized a few rows or a tile at a time;
//! - [`saved`]: pre-quantized bitsandbytes checkpoints as transformers saves them;
//! - [`ggml`]: GGML/GGUF block types (`Q4_0`, `Q4_K`, ...), their sizes and reference
//!   dequantization, bit-exact with the `gguf` Python package (on x86-64 with AVX2 the
//!   common types decode eight values at a time in `ggml_x86`, bit-identical);
//! - with the `flex` feature, [`matmul_xwt`] / [`matmul_dyw`]: `x·Wᵀ` and `dy·W` on the
//!   CPU with `W` dequantized one tile at a time into per-thread scratch, and for at most
//!   [`MATVEC_MAX_ROWS`] rows of `x` (decoding) read in its stored format directly
//!   (bf16, f16, int8; GGML blocks decoded a few blocks at a time into a stack buffer);
//! - [`FrozenWeight`] / [`frozen_linear`]: the burn glue (a module holding a frozen weight
//!   in its format on any backend).

pub mod bnb;
pub mod float16;
pub(crate) mod frozen;
pub mod ggml;
#[cfg(target_arch = "x86_64")]
mod ggml_x86;
pub mod int8;
pub mod matrix;
mod rows;
pub mod saved;

pub use bnb::{Absmax, AbsmaxView, Bnb4View, Bnb4bit, FourBit, NestedAbsmax};
pub(crate) use frozen::note_reference_path;
pub use frozen::{frozen_linear, frozen_linear_reference, FrozenWeight, QuantizedWeight};
pub use matrix::{Blob, Format, QuantMatrix, QuantView, Storage, ViewData};
pub use rows::RowBlocks;
pub use saved::{load_bnb_4bit, load_bnb_int8, SavedTensor};

/// Products `x·Wᵀ` with at most this many rows of `x` (one new token per sequence while
/// decoding) read a bf16, f16, int8 or GGML-block weight as matrix–vector products in
/// its stored format, on the `flex` CPU kernels; more rows take the tiled `gemm` path (and f32
/// weights `gemm` at any row count).
pub const MATVEC_MAX_ROWS: usize = 4;

#[cfg(feature = "flex")]
pub use crate::flex::qgemm::{matmul_dyw, matmul_xwt, COL_TILE, DYW_COLUMN_TILES_FROM, ROW_TILE};
