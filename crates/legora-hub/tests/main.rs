//! The integration tests of `legora-hub`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-hub --test integration MODULE::`.

mod bad_input;
mod common;
mod fuzz;
mod gguf;
mod gguf_bad_input;
mod hf_cache;
mod peft_format;
mod peft_merges;
mod peft_variants;
mod quantized;
mod transformers_parity;
