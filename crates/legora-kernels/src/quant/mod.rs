//! Frozen-weight storage: the block formats a frozen base weight may keep in memory
//! (bitsandbytes NF4/FP4/int8, llama.cpp's GGML blocks, half floats), their reference
//! (de)quantization, and the tile-dequantizing products the kernels use.
//!
//! Layout of this module:
//! - [`ggml`]: GGML/GGUF block types (`Q4_0`, `Q4_K`, ...), their sizes and reference
//!   dequantization, bit-exact with the `gguf` Python package;
//! - (more to come: bitsandbytes formats, the storage enum, tiled products).

pub mod ggml;
