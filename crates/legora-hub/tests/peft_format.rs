//! Adapter, merged-export and mixture folders, compared with the PEFT-written fixtures.

use super::common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{fixture, Reference, TempDir, B};
use legora_hub::{
    get_peft_model, load_mixture, read_adapter, save_mixture, PeftModel, PretrainedModel,
    SafetensorsFile, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use legora_nn::{Combination, InitLoraWeights, LoraConfig, RouterConfig, TargetModules};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn base(family: &str) -> PretrainedModel<B> {
    PretrainedModel::from_pretrained(fixture(family), &Default::default()).unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `(key, dtype, shape)` of every tensor, and the metadata pairs.
type Layout = (Vec<(String, String, Vec<usize>)>, Vec<(String, String)>);

/// Keys, dtypes, shapes and metadata of a safetensors file.
fn layout(path: &Path) -> Layout {
    let f = SafetensorsFile::open(path).unwrap();
    let keys = f
        .names()
        .into_iter()
        .map(|n| {
            let (d, s) = f.info(&n).unwrap();
            (n, d, s)
        })
        .collect();
    let mut meta: Vec<(String, String)> = f.metadata().into_iter().collect();
    meta.sort();
    (keys, meta)
}

fn as_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, found {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_peft_adapter_is_written_back_identically() {
    for family in ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"] {
        for tag in ["qv", "all"] {
            let src = fixture(&format!("{family}-lora-{tag}"));
            let m = PeftModel::from_pretrained(base(family), &src).unwrap();
            let out = TempDir::new("rewrite");
            m.save_pretrained(out.path()).unwrap();
            let (a, b) = (src.join(ADAPTER_WEIGHTS), out.path().join(ADAPTER_WEIGHTS));
            assert_eq!(
                layout(&a),
                layout(&b),
                "{family}-{tag}: keys/dtypes/shapes/metadata"
            );
            let (fa, fb) = (
                read_adapter(&src).unwrap(),
                read_adapter(out.path()).unwrap(),
            );
            for ((pa, aa, ba), (pb, ab, bb)) in fa.modules.iter().zip(&fb.modules) {
                assert_eq!(pa, pb);
                assert_eq!(aa, ab, "{pa}.lora_A values");
                assert_eq!(ba, bb, "{pa}.lora_B values");
            }
            assert_eq!(
                json(&src.join(ADAPTER_CONFIG)),
                json(&out.path().join(ADAPTER_CONFIG)),
                "{family}-{tag}: adapter_config.json"
            );
        }
    }
}

/// A fresh legora adapter against PEFT's file for the same module set.
fn compare_fresh(cfg: &LoraConfig, fixture_name: &str) {
    let m = get_peft_model(base("llama"), cfg).unwrap();
    let out = TempDir::new("fresh");
    m.save_pretrained(out.path()).unwrap();
    let peft = fixture(fixture_name);
    assert_eq!(
        layout(&peft.join(ADAPTER_WEIGHTS)),
        layout(&out.path().join(ADAPTER_WEIGHTS)),
        "{fixture_name}: key names, dtypes, shapes, metadata"
    );
    let (want, got) = (
        json(&peft.join(ADAPTER_CONFIG)),
        json(&out.path().join(ADAPTER_CONFIG)),
    );
    let (w, g) = (want.as_object().unwrap(), got.as_object().unwrap());
    let wk: BTreeSet<&String> = w.keys().collect();
    let gk: BTreeSet<&String> = g.keys().collect();
    assert_eq!(wk, gk, "{fixture_name}: config fields");
    for (k, v) in w {
        if k == "target_modules" {
            assert_eq!(as_set(v), as_set(&g[k]), "target_modules (a set in PEFT)");
        } else {
            assert_eq!(v, &g[k], "{fixture_name}: field `{k}`");
        }
    }
    // Written keys sorted, as PEFT's json.dumps(sort_keys=True).
    let text = std::fs::read_to_string(out.path().join(ADAPTER_CONFIG)).unwrap();
    let order: Vec<usize> = w
        .keys()
        .map(|k| text.find(&format!("\"{k}\"")).unwrap())
        .collect();
    let mut sorted_keys: Vec<&String> = w.keys().collect();
    sorted_keys.sort();
    let by_pos: Vec<&String> = {
        let mut v: Vec<(usize, &String)> = order.into_iter().zip(w.keys()).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    };
    assert_eq!(by_pos, sorted_keys);
}

#[test]
fn a_fresh_adapter_has_peft_keys_shapes_dtypes_and_fields() {
    // PEFT fixture: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj","v_proj"],
    // init_lora_weights=False, task_type="CAUSAL_LM") on the model named "llama".
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Random;
    cfg.base_model_name_or_path = Some("llama".into());
    compare_fresh(&cfg, "llama-lora-qv");

    // PEFT fixture: r=8, alpha=16, "all-linear", rank_pattern {"down_proj": 2}.
    let mut cfg = LoraConfig::new(8, 16.0, &[]);
    cfg.target_modules = Some(TargetModules::Pattern("all-linear".into()));
    cfg.rank_pattern.insert("down_proj".into(), 2);
    cfg.init_lora_weights = InitLoraWeights::Random;
    cfg.base_model_name_or_path = Some("llama".into());
    compare_fresh(&cfg, "llama-lora-all");
}

#[test]
fn several_named_adapters_in_sub_folders() {
    let r = Reference::load("llama");
    let mut m = PeftModel::from_pretrained_all(base("llama"), fixture("llama-multi")).unwrap();
    assert_eq!(m.adapter_names(), vec!["default", "all"]);
    assert_eq!(m.active_adapters(), vec!["default"]);
    let d = r.max_diff(m.model().forward(r.batch()).unwrap().logits, "logits_qv");
    assert!(d < TOL, "default: {d}");
    m.set_adapter("all").unwrap();
    let d = r.max_diff(m.model().forward(r.batch()).unwrap().logits, "logits_all");
    assert!(d < TOL, "all: {d}");
    assert!(m.set_adapter("nope").is_err());

    let out = TempDir::new("multi");
    m.save_pretrained(out.path()).unwrap();
    for sub in ["", "all"] {
        let (a, b) = (fixture("llama-multi").join(sub), out.path().join(sub));
        assert_eq!(
            layout(&a.join(ADAPTER_WEIGHTS)),
            layout(&b.join(ADAPTER_WEIGHTS)),
            "{sub}"
        );
    }
}

#[test]
fn weighted_adapter_saves_and_reloads() {
    let r = Reference::load("llama");
    let mut m = PeftModel::from_pretrained(base("llama"), fixture("llama-lora-all")).unwrap();
    // "cat" with one adapter at weight 1 is exactly that adapter (rank pattern kept).
    m.add_weighted_adapter(
        &["default"],
        &[1.0],
        "copy",
        Combination::Cat,
        &Default::default(),
    )
    .unwrap();
    m.set_adapter("copy").unwrap();
    let d = r.max_diff(m.model().forward(r.batch()).unwrap().logits, "logits_all");
    assert!(d < TOL, "{d}");
    let out = TempDir::new("weighted");
    m.save_pretrained(out.path()).unwrap();
    let copy = PeftModel::from_pretrained(base("llama"), out.path().join("copy")).unwrap();
    let d = r.max_diff(
        copy.model().forward(r.batch()).unwrap().logits,
        "logits_all",
    );
    assert!(d < TOL, "reloaded: {d}");
}

#[test]
fn merged_export_reloads_with_the_adapter_logits() {
    for (family, tag) in [("llama", "qv"), ("qwen2", "all"), ("mistral", "all")] {
        let r = Reference::load(family);
        let m = PeftModel::from_pretrained(base(family), fixture(&format!("{family}-lora-{tag}")))
            .unwrap();
        let merged = m.merge_and_unload().unwrap();
        let d = r.max_diff(
            merged.model.forward(r.batch()).unwrap().logits,
            &format!("logits_{tag}"),
        );
        assert!(d < TOL, "{family}: merged in memory: {d}");
        let out = TempDir::new("merged");
        merged.save_pretrained(out.path()).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            assert!(out.path().join(f).exists(), "{family}: {f}");
        }
        let cfg = json(&out.path().join("config.json"));
        assert_eq!(cfg["model_type"], family);
        assert_eq!(cfg["dtype"], "float32");
        let again = PretrainedModel::<B>::from_pretrained(out.path(), &Default::default()).unwrap();
        let d = r.max_diff(
            again.model.forward(r.batch()).unwrap().logits,
            &format!("logits_{tag}"),
        );
        assert!(d < TOL, "{family}: merged folder reloaded: {d}");
        // Same tensor names as transformers' own checkpoint (tied: no lm_head.weight).
        let keys: BTreeSet<String> = SafetensorsFile::open(&out.path().join("model.safetensors"))
            .unwrap()
            .names()
            .into_iter()
            .collect();
        let idx = fixture(family).join("model.safetensors.index.json");
        let want: BTreeSet<String> = if idx.exists() {
            json(&idx)["weight_map"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        } else {
            SafetensorsFile::open(&fixture(family).join("model.safetensors"))
                .unwrap()
                .names()
                .into_iter()
                .collect()
        };
        assert_eq!(keys, want, "{family}: tensor names");
    }
}

#[test]
fn mixture_folder_round_trip() {
    let r = Reference::load("llama");
    // Two experts on q_proj,v_proj: PEFT's qv adapter and a fresh random one.
    let mut m = PeftModel::from_pretrained(base("llama"), fixture("llama-lora-qv")).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Random;
    m.add_adapter("other", &cfg).unwrap();
    m.model_mut()
        .adapters_to_mixture(
            &["default", "other"],
            Some(&RouterConfig::new(2).with_top_k(1)),
        )
        .unwrap();
    // Task-routed: row 0 through expert 0 (PEFT's adapter) gives PEFT's logits for row 0.
    let out = m.model().forward(r.batch().with_task_ids(&[0, 0])).unwrap();
    assert!(out.routing.is_empty(), "task ids bypass the routers");
    let d = r.max_diff(out.logits, "logits_qv");
    assert!(d < TOL, "task-routed expert 0: {d}");

    let routed = m.model().forward(r.batch()).unwrap();
    assert_eq!(routed.routing.len(), 2, "one router per decoder layer");
    let aux: f32 = routed.aux_loss().unwrap().into_scalar();
    assert!(aux.is_finite() && aux > 0.0);

    let dir = TempDir::new("moe");
    let saved = save_mixture(m.model(), dir.path(), None, Some("llama".into())).unwrap();
    assert_eq!(saved.experts, vec!["default", "other"]);
    assert_eq!(saved.layers, vec![0, 1]);
    // Each expert is a plain PEFT folder with PEFT's layout.
    assert_eq!(
        layout(&dir.path().join("experts/default").join(ADAPTER_WEIGHTS)),
        layout(&fixture("llama-lora-qv").join(ADAPTER_WEIGHTS))
    );
    let expert =
        PeftModel::from_pretrained(base("llama"), dir.path().join("experts/default")).unwrap();
    let d = r.max_diff(
        expert.model().forward(r.batch()).unwrap().logits,
        "logits_qv",
    );
    assert!(d < TOL, "expert folder as a PEFT adapter: {d}");

    let mut fresh = base("llama");
    let cfg = load_mixture(&mut fresh.model, dir.path()).unwrap();
    assert_eq!(cfg, saved);
    let again = fresh.model.forward(r.batch()).unwrap();
    let diff = (again.logits - routed.logits).abs().max().into_scalar();
    assert!(diff < 1e-6, "router-gated logits after reload: {diff}");
}
