//! A LoRA trained over a GGUF base whose projections stay in their GGML blocks (the Q4_K
//! fixture: `ffn_down` in Q4_K, the other projections in llama.cpp's Q5_0 fallback) saves
//! as a PEFT folder naming the file, and that folder loaded over the file again scores
//! held-out rows exactly as the trained model does. (That PEFT over transformers'
//! dequantization of the same file gives legora's loss is legora-hub's
//! `peft_lora_over_q4_k_blocks_matches_peft`.)

use super::common;

use std::path::PathBuf;

use common::*;
use legora_data::Mixing;
use legora_hub::{get_peft_model, PeftModel, PretrainedModel};
use legora_nn::{InitLoraWeights, LoraConfig, TargetModules};
use legora_train::*;

fn q4_k_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/llama-q4_k.gguf")
}

/// Held-out rows (byte tokens, as the loader's tokenizer gives them).
fn held_out() -> Vec<Vec<u32>> {
    ["q123 a861", "the fox reads q042"]
        .iter()
        .map(|s| s.bytes().map(u32::from).collect())
        .collect()
}

#[test]
fn a_lora_trained_over_q4_k_blocks_saves_as_peft_and_reloads() {
    let _serial = legora_testing::serial();
    let device = Default::default();
    let file = q4_k_file();
    let base = PretrainedModel::<AD>::from_pretrained(&file, &device).unwrap();
    let blocks: Vec<String> = base
        .model
        .slots()
        .into_iter()
        .map(|(_, slot)| slot.frozen_weight().format().name().to_string())
        .collect();
    assert!(
        blocks.iter().any(|f| f == "Q4_K") && blocks.iter().all(|f| f == "Q4_K" || f == "Q5_0"),
        "the frozen projections keep their blocks: {blocks:?}"
    );
    let cfg = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(TargetModules::List(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ])),
        init_lora_weights: InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let mut peft = get_peft_model(base, &cfg).unwrap();
    let before: Vec<f64> = held_out()
        .iter()
        .map(|ids| peft.base.model.score(ids, 64, None).unwrap().mean_nll)
        .collect();

    let mut settings = TrainSettings::new(4, 3);
    settings.learning_rate = 2e-2;
    settings.batch_size = 4;
    let mut data = loader(3, 4, Mixing::Uniform);
    let dir = tmp_dir("gguf-q4_k-lora");
    let start = trainable_values(&peft.base.model);
    let lm = LmModel::new(peft.base.model, Objective::Lm);
    let out = Trainer::new("lora", dir.join("run"), settings)
        .run(lm, &mut data, &[], &device)
        .unwrap();
    assert_eq!(out.summary.steps, 4);
    peft.base.model = out.model.model;
    assert!(max_abs_diff(&trainable_values(&peft.base.model), &start) > 1e-3);
    let trained: Vec<f64> = held_out()
        .iter()
        .map(|ids| peft.base.model.score(ids, 64, None).unwrap().mean_nll)
        .collect();
    assert_ne!(trained, before, "training changed nothing");

    peft.save_pretrained(dir.join("adapter")).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let named = config["base_model_name_or_path"].as_str().unwrap();
    assert!(named.ends_with("llama-q4_k.gguf"), "{named}");

    let base = PretrainedModel::<Inner>::from_pretrained(&file, &device).unwrap();
    let again = PeftModel::from_pretrained(base, dir.join("adapter")).unwrap();
    for (ids, want) in held_out().iter().zip(&trained) {
        let got = again.base.model.score(ids, 64, None).unwrap().mean_nll;
        assert!(
            (got - want).abs() < 1e-5,
            "reloaded {got} vs trained {want}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
