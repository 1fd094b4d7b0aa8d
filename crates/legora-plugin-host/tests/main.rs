//! The integration tests of `legora-plugin-host`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-plugin-host --test integration MODULE::`.

mod common;
mod dylib;
mod fuzz;
mod isolation;
