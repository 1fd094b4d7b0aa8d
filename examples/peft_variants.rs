//! Writes what `tests/fixtures/make_peft_parity.py --check` loads with PEFT: on the tiny
//! Llama fixture, legora's copy of PEFT's DoRA fixture (re-saved), a fresh DoRA adapter made
//! by legora (random B, magnitudes from legora's init) and an `exclude_modules` adapter,
//! each with the logits legora computes on the DoRA reference batch.
//!
//! ```text
//! cargo run --example peft_variants -- OUT_DIR
//! ```
//! writes `OUT_DIR/{dora-resaved,dora-fresh,exclude}/` (PEFT folders), each with
//! `legora_logits.safetensors` (`logits`, `[2, 10, 300]`).

use std::path::{Path, PathBuf};

mod common;

use anyhow::Context;
use burn::tensor::backend::Backend as _;
use burn::tensor::{Int, Tensor};
use legora::backend::Flex;
use legora::hub::io::write_safetensors;
use legora::prelude::*;

type B = Flex;

fn save(model: &PeftModel<B>, ids: &Tensor<B, 2, Int>, dir: &Path) -> anyhow::Result<()> {
    model.save_pretrained(dir)?;
    let logits = model.model().forward(LmInput::new(ids.clone()))?.logits;
    write_safetensors(
        &dir.join("legora_logits.safetensors"),
        &[("logits".to_string(), logits.into_data())],
        FloatDtype::F32,
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: peft_variants OUT_DIR")?,
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let device = Default::default();
    B::seed(&device, 2024);
    let base = || PretrainedModel::<B>::from_pretrained(fixtures.join("models/llama"), &device);
    let reference = common::read(&fixtures.join("peft/reference/dora.safetensors"))?;
    let ids = common::int_tensor::<B>(&reference, "input_ids", &device)?;

    let resaved = PeftModel::from_pretrained(base()?, fixtures.join("peft/dora"))?;
    save(&resaved, &ids, &out.join("dora-resaved"))?;

    let mut dora = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    dora.init_lora_weights = InitLoraWeights::Random;
    dora.use_dora = true;
    save(
        &get_peft_model(base()?, &dora)?,
        &ids,
        &out.join("dora-fresh"),
    )?;

    let mut exclude = LoraConfig::new(2, 4.0, &[]);
    exclude.target_modules = Some(TargetModules::Pattern("all-linear".into()));
    exclude.exclude_modules = Some(TargetModules::List(vec!["down_proj".into()]));
    exclude.init_lora_weights = InitLoraWeights::Random;
    save(
        &get_peft_model(base()?, &exclude)?,
        &ids,
        &out.join("exclude"),
    )
}
