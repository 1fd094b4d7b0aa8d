//! Mutation fuzzing of what legora-train reads from disk: run files (parsed, checked
//! and turned into stage settings) and checkpoints (`state.json`,
//! `trainable.safetensors`, `optimizer.bin`, restored into a model and its optimizer).
//! The engine is legora-hub's (`fuzz_engine`, included by path): every input must give
//! `Ok` or a typed error, with no panic and no allocation over its cap.
//!
//! A checkpoint data file is fuzzed twice over: as damaged on disk (its checksum in
//! `state.json` no longer matches, so it is refused before it is parsed) and as edited
//! deliberately (the sum recomputed, so the damaged bytes reach the safetensors reader
//! and the checks of every tensor's name, shape and values).

#[path = "../../legora-hub/tests/fuzz_engine/mod.rs"]
mod fuzz_engine;

use super::common;

use std::path::{Path, PathBuf};

use burn::optim::AdamWConfig;
use common::{loader, tmp_dir, Toy, AD};
use fuzz_engine::{fixtures, fuzz, Mutation};
use legora_data::Mixing;
use legora_train::{
    latest_checkpoint, load_checkpoint, FileSum, RunConfig, StageKind, TrainSettings, Trainer,
};

#[test]
fn fuzz_run_files() {
    let _serial = crate::common::serial();
    let demo = fixtures().join("../../demo");
    let seeds: Vec<Vec<u8>> = ["demo.toml", "compose.toml"]
        .iter()
        .map(|f| std::fs::read(demo.join(f)).unwrap())
        .collect();
    // parsed as if they sat in demo/, so that their data files exist
    let path = demo.join("fuzzed.toml");
    fuzz("run files", &seeds, Mutation::Toml, |b| {
        let Ok(cfg) = RunConfig::parse(&String::from_utf8_lossy(b), &path) else {
            return;
        };
        let _ = cfg.load_options();
        let _ = (cfg.lora_config(), cfg.router_config(), cfg.template());
        for stage in [StageKind::Experts, StageKind::Router, StageKind::SingleLora] {
            let _ = cfg.train_settings(stage, 7);
        }
    });
}

/// A real checkpoint of a toy mixture after two optimizer steps.
fn checkpoint(tag: &str) -> PathBuf {
    let dir = tmp_dir(&format!("fuzz-ckpt-{tag}"));
    let mut s = TrainSettings::new(2, 7);
    s.batch_size = 4;
    s.learning_rate = 1e-2;
    let mut l = loader(5, 4, Mixing::Uniform);
    Trainer::new("experts", &dir, s)
        .run(
            Toy::<AD>::new(1, 2, &Default::default()),
            &mut l,
            &[],
            &Default::default(),
        )
        .unwrap();
    latest_checkpoint(&dir.join("checkpoints"))
        .unwrap()
        .unwrap()
}

/// Copy checkpoint folder `from` to `to` (a `step-000002` folder of its own).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Fuzz checkpoint file `name`: write each mutation over a fresh copy of the
/// checkpoint (re-summed in `state.json` when `resum`) and restore it.
fn fuzz_checkpoint_file(name: &str, mutation: Mutation, resum: bool) {
    let good = checkpoint(&format!("{name}-{resum}"));
    let scratch = tmp_dir(&format!("fuzz-{name}-{resum}")).join(good.file_name().unwrap());
    copy_dir(&good, &scratch);
    let state = std::fs::read(good.join("state.json")).unwrap();
    let seed = std::fs::read(good.join(name)).unwrap();
    let label = format!(
        "checkpoint {name}{}",
        if resum { " (re-summed)" } else { "" }
    );
    let device = Default::default();
    fuzz(&label, &[seed], mutation, |b| {
        std::fs::write(scratch.join(name), b).unwrap();
        if resum {
            let mut v: serde_json::Value = serde_json::from_slice(&state).unwrap();
            v["files"][name] = serde_json::to_value(FileSum::of(b)).unwrap();
            std::fs::write(scratch.join("state.json"), v.to_string()).unwrap();
        }
        let model = Toy::<AD>::new(1, 2, &device);
        let optim = AdamWConfig::new().init::<AD, Toy<AD>>();
        let _ = load_checkpoint(&scratch, model, optim, &device);
    });
    // the good checkpoint still loads through the same path
    copy_dir(&good, &scratch);
    let optim = AdamWConfig::new().init::<AD, Toy<AD>>();
    load_checkpoint(&scratch, Toy::<AD>::new(1, 2, &device), optim, &device).unwrap();
}

#[test]
fn fuzz_checkpoint_state_json() {
    let _serial = crate::common::serial();
    fuzz_checkpoint_file("state.json", Mutation::Json, false);
}

#[test]
fn fuzz_checkpoint_trainable_safetensors() {
    let _serial = crate::common::serial();
    fuzz_checkpoint_file("trainable.safetensors", Mutation::Bytes, false);
    fuzz_checkpoint_file("trainable.safetensors", Mutation::Bytes, true);
}

#[test]
fn fuzz_checkpoint_optimizer_safetensors() {
    let _serial = crate::common::serial();
    fuzz_checkpoint_file("optimizer.safetensors", Mutation::Bytes, false);
    fuzz_checkpoint_file("optimizer.safetensors", Mutation::Bytes, true);
}
