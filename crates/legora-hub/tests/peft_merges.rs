//! `PeftModel::add_weighted_adapter` on the whole tiny Llama against PEFT 0.21's
//! (tests/fixtures/peft/merges, made by tests/fixtures/make_peft_merges.py): every module
//! the sources target gets PEFT's ΔW, the merged adapter saves as a plain PEFT folder at
//! scaling 1 (also when the first source is rsLoRA), and a refused combination leaves the
//! model as it was.

use super::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{TempDir, B};
use legora_hub::{HubError, PeftModel, PretrainedModel};
use legora_nn::{Combination, LoraConfig, MergeOptions};
use safetensors::SafeTensors;

fn merges_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/merges")
}

/// The fixture's adapters `a` (loaded as `default`), `b` (rsLoRA) and `c` on the tiny
/// Llama.
fn model() -> PeftModel<B> {
    let base = PretrainedModel::<B>::from_pretrained(common::fixture("llama"), &Default::default())
        .unwrap();
    let mut m = PeftModel::from_pretrained(base, merges_dir().join("a")).unwrap();
    m.load_adapter(merges_dir().join("b"), "b").unwrap();
    m.load_adapter(merges_dir().join("c"), "c").unwrap();
    m
}

/// PEFT's `<module>.delta` tensors of one case.
fn peft_deltas(case: &str) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(merges_dir().join(format!("{case}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter_map(|(name, v)| {
            let module = name.strip_suffix(".delta")?.to_string();
            let values = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            Some((module, values))
        })
        .collect()
}

/// Every module's ΔW of adapter `name` equals PEFT's for `case`.
fn assert_deltas(m: &PeftModel<B>, name: &str, case: &str) {
    let want = peft_deltas(case);
    let modules = m.base.model.adapter_modules(name);
    let got: Vec<String> = modules.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(
        got,
        want.keys().cloned().collect::<Vec<_>>(),
        "{case}: modules"
    );
    for (id, adapter) in modules {
        let ours: Vec<f32> = adapter.delta_weight().into_data().to_vec().unwrap();
        let theirs = &want[&id.to_string()];
        let d = ours
            .iter()
            .zip(theirs)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "{case} {id}: max |ΔW - PEFT| = {d:e}");
    }
}

#[test]
fn model_level_combinations_match_peft() {
    let mut m = model();
    let o = MergeOptions::default();
    m.add_weighted_adapter(
        &["default", "b"],
        &[0.6, 0.4],
        "ties",
        Combination::Ties,
        &o.with_density(0.5),
    )
    .unwrap();
    assert_deltas(&m, "ties", "ties");
    m.add_weighted_adapter(
        &["default", "b", "c"],
        &[0.5, 0.25, -1.0],
        "svd6",
        Combination::Svd,
        &o.with_svd_rank(6),
    )
    .unwrap();
    assert_deltas(&m, "svd6", "svd_rank6");
    m.add_weighted_adapter(
        &["default", "c"],
        &[0.6, 0.4],
        "tsvd",
        Combination::TiesSvd,
        &o.with_density(0.5),
    )
    .unwrap();
    assert_deltas(&m, "tsvd", "ties_svd");
}

#[test]
fn an_rslora_first_merge_saves_at_scaling_one_and_reloads_with_its_delta() {
    let mut m = model();
    m.add_weighted_adapter(
        &["b", "default"],
        &[0.5, 0.5],
        "mix",
        Combination::Cat,
        &MergeOptions::default(),
    )
    .unwrap();
    assert_deltas(&m, "mix", "rslora_first_cat");
    let cfg = m.peft_config("mix").unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (8, 8.0, false));
    let dir = TempDir::new("merge-rslora");
    m.save_pretrained(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("mix/adapter_config.json")).unwrap();
    let saved = LoraConfig::from_json(&text).unwrap();
    assert_eq!(
        (saved.r, saved.lora_alpha, saved.use_rslora),
        (8, 8.0, false)
    );
    // the saved folder loads back with the intended ΔW
    let mut again = model();
    again.load_adapter(dir.path().join("mix"), "mix").unwrap();
    assert_deltas(&again, "mix", "rslora_first_cat");
}

#[test]
fn a_refused_combination_leaves_the_model_unchanged() {
    let mut m = model();
    let before = m.base.model.adapter_names();
    // svd_rank 40 fits q_proj [64, 64] but not v_proj [32, 64]
    let e = m
        .add_weighted_adapter(
            &["default", "c"],
            &[1.0, 1.0],
            "big",
            Combination::Svd,
            &MergeOptions::default().with_svd_rank(40),
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::Model { .. }), "{msg}");
    assert!(
        msg.contains("v_proj") && msg.contains("svd_rank") && msg.contains("32"),
        "{msg}"
    );
    assert_eq!(m.base.model.adapter_names(), before);
    assert!(m.base.model.adapter_modules("big").is_empty());
    assert!(m.peft_config("big").is_none());
}
