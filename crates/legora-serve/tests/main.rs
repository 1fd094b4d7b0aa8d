//! The integration tests of `legora-serve`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-serve --test integration MODULE::`.

mod adapters;
mod bad_requests;
mod common;
mod load;
mod serve;
