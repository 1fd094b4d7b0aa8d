//! Writes what `tests/fixtures/make_model_fixtures.py --check` loads with PEFT and
//! transformers: a LoRA adapter made by legora on the tiny Llama fixture, its logits on the
//! fixture's reference batch, and the merged (`merge_and_unload`) export.
//!
//! ```text
//! cargo run --example peft_roundtrip -- OUT_DIR
//! ```
//! writes `OUT_DIR/adapter/` (PEFT folder), `OUT_DIR/merged/` (HF folder) and
//! `OUT_DIR/legora_logits.safetensors` (`logits_adapter`, `[2, 15, 300]`).

use std::path::{Path, PathBuf};

mod common;

use anyhow::Context;
use burn::tensor::backend::Backend as _;
use legora::backend::Flex;
use legora::hub::io::write_safetensors;
use legora::prelude::*;

type B = Flex;

fn reference_batch(path: &Path, device: &burn::tensor::Device<B>) -> anyhow::Result<LmInput<B>> {
    let bytes = common::read(path)?;
    let get = |name: &str| common::int_tensor::<B>(&bytes, name, device);
    Ok(LmInput::new(get("input_ids")?)
        .with_attention_mask(get("attention_mask")?)
        .with_position_ids(get("position_ids")?))
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: peft_roundtrip OUT_DIR")?,
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let device = Default::default();
    B::seed(&device, 2024);

    let base = PretrainedModel::<B>::from_pretrained(fixtures.join("llama"), &device)?;
    // Three module kinds, random B (a non-zero delta), rsLoRA and a rank pattern: every
    // field PEFT must honour to reproduce the logits.
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Random;
    cfg.use_rslora = true;
    cfg.rank_pattern.insert("down_proj".into(), 2);
    let model = get_peft_model(base, &cfg)?;
    model.save_pretrained(out.join("adapter"))?;

    let batch = reference_batch(&fixtures.join("reference/llama.safetensors"), &device)?;
    let logits = model.model().forward(batch.clone())?.logits;
    write_safetensors(
        &out.join("legora_logits.safetensors"),
        &[("logits_adapter".to_string(), logits.clone().into_data())],
        FloatDtype::F32,
    )?;

    let merged = model.merge_and_unload()?;
    let merged_logits = merged.model.forward(batch)?.logits;
    let d: f32 = (merged_logits - logits).abs().max().into_scalar();
    println!("legora: merged vs adapter logits, max |Δ| = {d:.3e}");
    merged.save_pretrained(out.join("merged"))?;
    println!("wrote {}", out.display());
    Ok(())
}
