//! GGML block formats (llama.cpp / GGUF): type ids, block sizes, reference
//! dequantization.
//!
//! Interface (fixed; implementations to be filled in):
//! - [`GgmlType`]: every type id of `ggml.h`'s `enum ggml_type` that a GGUF file may name;
//! - `GgmlType::block_size()` (elements per block) and `GgmlType::type_size()` (bytes per
//!   block), as `gguf.constants.GGML_QUANT_SIZES`;
//! - `dequantize(ty, src, dst)`: `src` holds whole blocks, `dst.len()` =
//!   blocks × `block_size()`; bit-exact with `gguf.quants.dequantize`.
