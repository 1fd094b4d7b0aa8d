//! The LoRA variants against PEFT 0.21 on the tiny Llama (tests/fixtures/peft, made by
//! tests/fixtures/make_peft_parity.py): logits within 1e-4, the gradient of every trainable
//! tensor within 1e-4 relative, merged logits, and the files legora writes have PEFT's
//! keys, shapes and config.

use super::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use common::TempDir;
use legora_hub::{get_peft_model, read_adapter, PeftModel, PretrainedModel};
use legora_models::{CausalLm, LmInput, Slot};
use legora_nn::LoraConfig;
use safetensors::SafeTensors;

type AD = Autodiff<Flex>;

const TOL: f32 = 1e-4;

fn peft_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft")
}

fn base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama")
}

/// A reference tensor: shape, f32 values (float tensors) and i64 values (the ids).
type RefTensor = (Vec<usize>, Vec<f32>, Vec<i64>);

/// The reference tensors of one case, by name.
fn reference(case: &str) -> BTreeMap<String, RefTensor> {
    let path = peft_dir()
        .join("reference")
        .join(format!("{case}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let shape = v.shape().to_vec();
            let (f, i) = match v.dtype() {
                safetensors::Dtype::I64 => (
                    vec![],
                    v.data()
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                _ => (
                    v.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
            };
            (name, (shape, f, i))
        })
        .collect()
}

fn ids(r: &BTreeMap<String, RefTensor>) -> Tensor<AD, 2, Int> {
    let (shape, _, v) = &r["input_ids"];
    Tensor::from_data(
        TensorData::new(v.clone(), [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// transformers' causal-LM loss with `labels = input_ids`: mean NLL of token t+1 at t.
fn causal_lm_loss(logits: Tensor<AD, 3>, ids: Tensor<AD, 2, Int>) -> Tensor<AD, 1> {
    let [b, s, v] = logits.dims();
    let pred = logits
        .slice([0..b, 0..s - 1, 0..v])
        .reshape([b * (s - 1), v]);
    let target = ids.slice([0..b, 1..s]).reshape([b * (s - 1), 1]);
    let nll = log_softmax(pred, 1).gather(1, target).neg();
    nll.mean()
}

fn peft_model(case: &str) -> PeftModel<AD> {
    let base = PretrainedModel::<AD>::from_pretrained(base_dir(), &Default::default()).unwrap();
    PeftModel::from_pretrained(base, peft_dir().join(case)).unwrap()
}

/// Every trainable tensor's gradient under its adapter_model.safetensors key.
fn grads(m: &CausalLm<AD>, g: &<AD as AutodiffBackend>::Gradients) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for (id, slot) in m.slots() {
        let Slot::Lora(l) = slot else { continue };
        for n in l.adapter_names() {
            let a = l.adapter(n).unwrap();
            let key = |k: &str| format!("base_model.model.{id}.{k}");
            out.insert(
                key("lora_A.weight"),
                values(a.lora_A.val().grad(g).unwrap()),
            );
            out.insert(
                key("lora_B.weight"),
                values(a.lora_B.val().grad(g).unwrap()),
            );
            if let Some(mag) = &a.lora_magnitude_vector {
                out.insert(
                    key("lora_magnitude_vector"),
                    values(mag.val().grad(g).unwrap()),
                );
            }
        }
    }
    out
}

/// Logits, loss and gradients against PEFT's; the merged model's logits too.
fn check_case(case: &str) {
    let r = reference(case);
    let m = peft_model(case);
    let input = ids(&r);
    let logits = m
        .model()
        .forward(LmInput::new(input.clone()))
        .unwrap()
        .logits;
    let d = max_abs_diff(&values(logits.clone().inner()), &r["logits"].1);
    eprintln!("{case}: max |Δlogits| = {d:.2e}");
    assert!(d < TOL, "{case}: logits {d}");
    let loss = causal_lm_loss(logits, input.clone());
    let dl = (values(loss.clone().inner())[0] - r["loss"].1[0]).abs();
    assert!(dl < 1e-5, "{case}: loss {dl}");
    let g = grads(m.model(), &loss.backward());
    let want: Vec<&String> = r.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        g.len(),
        want.len(),
        "{case}: trainable tensors {:?}",
        g.keys()
    );
    for k in want {
        let key = &k["grad.".len()..];
        let ours = g
            .get(key)
            .unwrap_or_else(|| panic!("{case}: no gradient for {key}"));
        let theirs = &r[k].1;
        let scale = theirs.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
        let rel = max_abs_diff(ours, theirs) / scale;
        assert!(rel < TOL, "{case}: {key}: relative gradient error {rel}");
    }
    // merge_and_unload gives PEFT's merged logits
    let merged = m.merge_and_unload().unwrap();
    let logits = merged.model.forward(LmInput::new(input)).unwrap().logits;
    let d = max_abs_diff(&values(logits.inner()), &r["logits_merged"].1);
    assert!(d < TOL, "{case}: merged logits {d}");
}

#[test]
fn dora_matches_peft_in_logits_gradients_and_merge() {
    check_case("dora");
}

#[test]
fn exclude_modules_match_peft() {
    check_case("exclude");
    check_case("exclude_re");
}

/// legora places an adapter from PEFT's config on exactly the modules PEFT did.
#[test]
fn exclude_modules_select_the_modules_peft_selected() {
    for case in ["exclude", "exclude_re", "dora"] {
        let files = read_adapter(&peft_dir().join(case)).unwrap();
        let base = PretrainedModel::<AD>::from_pretrained(base_dir(), &Default::default()).unwrap();
        let ours: Vec<String> = base
            .model
            .target_slots(&files.config)
            .iter()
            .map(|s| s.to_string())
            .collect();
        let theirs: Vec<String> = files.modules.iter().map(|(p, _, _)| p.clone()).collect();
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        assert_eq!(ours_sorted, theirs, "{case}");
    }
}

/// Saved again by legora, a PEFT DoRA folder has PEFT's keys, shapes and config, and
/// loads with the same logits; so does a fresh DoRA adapter, whose magnitude starts as
/// the base weight's row norms (the output is the base's until it trains).
#[test]
fn dora_files_round_trip_with_pefts_keys() {
    let r = reference("dora");
    let m = peft_model("dora");
    let tmp = TempDir::new("dora-save");
    m.save_pretrained(tmp.path()).unwrap();
    let read = |dir: &Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(k, t)| (k, t.shape().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(read(tmp.path()), read(&peft_dir().join("dora")));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["use_dora"], true);
    let again = PeftModel::from_pretrained(
        PretrainedModel::<AD>::from_pretrained(base_dir(), &Default::default()).unwrap(),
        tmp.path(),
    )
    .unwrap();
    let logits = again.model().forward(LmInput::new(ids(&r))).unwrap().logits;
    assert!(max_abs_diff(&values(logits.inner()), &r["logits"].1) < TOL);

    // a fresh DoRA adapter (B = 0) is an exact no-op, as PEFT's
    let base = PretrainedModel::<AD>::from_pretrained(base_dir(), &Default::default()).unwrap();
    let plain = values(
        base.model
            .forward(LmInput::new(ids(&r)))
            .unwrap()
            .logits
            .inner(),
    );
    let mut c = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    c.use_dora = true;
    let fresh = get_peft_model(base, &c).unwrap();
    let logits = fresh.model().forward(LmInput::new(ids(&r))).unwrap().logits;
    let d = max_abs_diff(&values(logits.inner()), &plain);
    assert!(d < 1e-5, "fresh DoRA changes the output by {d}");
}

/// A DoRA folder whose magnitudes are missing, extra or mis-sized is refused by name.
#[test]
fn damaged_dora_files_are_refused_with_the_tensor() {
    let tmp = TempDir::copy_of("dora-bad", &peft_dir().join("dora"));
    let cfg_path = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"use_dora\": true", "\"use_dora\": false"),
    )
    .unwrap();
    let e = read_adapter(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("lora_magnitude_vector") && e.contains("use_dora"),
        "{e}"
    );
    // a magnitude of the wrong length
    std::fs::write(&cfg_path, &text).unwrap();
    let w = tmp.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            if k == key {
                (k, vec![3], vec![0u8; 12])
            } else {
                (k, t.shape().to_vec(), t.data().to_vec())
            }
        })
        .collect();
    tensors.sort();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (k.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &w).unwrap();
    let base = PretrainedModel::<AD>::from_pretrained(base_dir(), &Default::default()).unwrap();
    let e = PeftModel::from_pretrained(base, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(key) && e.contains("[64]") && e.contains("[3]"),
        "{e}"
    );
}
