//! The integration tests of `legora-nn`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-nn --test integration MODULE::`.

mod layers;
mod peft_merges;
