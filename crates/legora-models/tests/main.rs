//! The integration tests of `legora-models`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-models --test integration MODULE::`.

mod decoder;
mod frozen_storage;
mod packed;
