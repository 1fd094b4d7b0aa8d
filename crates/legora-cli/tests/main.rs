//! The integration tests of `legora-cli`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-cli --test integration MODULE::`.

mod bench;
mod cli;
mod common;
mod distributed;
mod plugin_faults;
mod robust;
mod runs;
mod score;
