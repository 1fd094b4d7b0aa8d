//! The integration tests of `legora-kernels`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-kernels --test integration MODULE::`.

mod common;
mod fused_vs_reference;
mod packed_attention;
mod quant_bnb;
mod quant_frozen;
mod quant_products;
mod quant_stacked;
