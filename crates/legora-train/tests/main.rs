//! The integration tests of `legora-train`, compiled as one test binary: one link of
//! burn and the crate's dependencies instead of one per file. Each module is one
//! former test file; run one with `cargo test -p legora-train --test integration MODULE::`.

mod checkpointing;
mod common;
mod concurrent;
mod config;
mod families;
mod fuzz;
mod gguf_base;
mod loraplus;
mod outputs;
mod pad_per_task;
mod resume_dropout;
mod train;
