//! `LoraLinear::add_weighted_adapter` against PEFT 0.21's, every combination type, on the
//! fixtures of `tests/fixtures/make_peft_merges.py` (three adapters on the tiny Llama's
//! layer-0 q_proj and v_proj, one of them rsLoRA; PEFT's resulting lora_A / lora_B / ΔW per
//! module, and the DARE masks PEFT drew).
//!
//! Deterministic non-SVD types compare A and B within 1e-6; SVD types compare ΔW within
//! 1e-5 (singular vectors are defined up to sign); DARE goes through PEFT's own masks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor, TensorData};
use legora_nn::svd::clamp_quantile;
use legora_nn::*;
use safetensors::SafeTensors;
use serde_json::Value;

type B = Flex;

fn merges_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/peft/merges")
}

/// A fixture tensor: shape and values as f32 (uint8 masks converted).
type Ref = (Vec<usize>, Vec<f32>);

fn tensors(path: &Path) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = match v.dtype() {
                safetensors::Dtype::U8 => v.data().iter().map(|b| f32::from(*b)).collect(),
                _ => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            };
            (name, (v.shape().to_vec(), values))
        })
        .collect()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(merges_dir().join("cases.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn case(name: &str) -> Value {
    cases().into_iter().find(|c| c["name"] == name).unwrap()
}

const MODULES: [&str; 2] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
];

/// A layer of `module`'s shape holding the fixture's adapters `a`, `b`, `c` (the base
/// weight plays no part in a merge, so it is zero).
fn layer(module: &str) -> LoraLinear<B> {
    let mut layer: Option<LoraLinear<B>> = None;
    for name in ["a", "b", "c"] {
        let dir = merges_dir().join(name);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let t = tensors(&dir.join("adapter_model.safetensors"));
        let key = |ab: &str| format!("base_model.model.{module}.{ab}.weight");
        let (a, b) = (&t[&key("lora_A")], &t[&key("lora_B")]);
        let (r, d_in, d_out) = (a.0[0], a.0[1], b.0[0]);
        let spec = AdapterSpec::new(r, cfg["lora_alpha"].as_f64().unwrap())
            .with_rslora(cfg["use_rslora"].as_bool().unwrap());
        let l = layer.get_or_insert_with(|| {
            LoraLinear::new(Tensor::zeros([d_out, d_in], &Default::default()), None).unwrap()
        });
        let adapter = LoraAdapter::from_tensors(tensor(a), tensor(b), &spec, d_in, d_out).unwrap();
        l.insert_adapter(name, adapter).unwrap();
    }
    layer.unwrap()
}

fn tensor(r: &Ref) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(r.1.clone(), [r.0[0], r.0[1]]),
        &Default::default(),
    )
}

fn vals(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn options(c: &Value) -> MergeOptions {
    MergeOptions {
        density: c["density"].as_f64(),
        svd_rank: c["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: c["svd_clamp"].as_f64(),
        majority_sign_method: c["majority_sign_method"]
            .as_str()
            .map_or(MajoritySignMethod::Total, |m| m.parse().unwrap()),
        seed: 0,
    }
}

fn names(c: &Value) -> Vec<String> {
    c["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn weights(c: &Value) -> Vec<f64> {
    c["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Run one fixture case on one module, with PEFT's DARE masks when it has them.
fn merged(c: &Value, module: &str, reference: &BTreeMap<String, Ref>) -> LoraLinear<B> {
    let mut l = layer(module);
    let names = names(c);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let combination: Combination = c["combination_type"].as_str().unwrap().parse().unwrap();
    let n_masks = c["masks_per_module"].as_u64().unwrap() as usize;
    let masks: Vec<Vec<bool>> = (0..n_masks)
        .map(|i| {
            let m = &reference[&format!("{module}.mask.{i}")].1;
            m.iter().map(|x| *x != 0.0).collect()
        })
        .collect();
    let name = c["name"].as_str().unwrap();
    let opts = options(c);
    if n_masks > 0 {
        l.add_weighted_adapter_with_masks(&refs, &weights(c), name, combination, &opts, &masks)
    } else {
        l.add_weighted_adapter(&refs, &weights(c), name, combination, &opts)
    }
    .unwrap_or_else(|e| panic!("{name} on {module}: {e}"));
    l
}

/// Compare legora's result of `case_name` with PEFT's: ΔW always, A and B unless SVD.
fn check_case(case_name: &str) {
    let c = case(case_name);
    let combination: Combination = c["combination_type"].as_str().unwrap().parse().unwrap();
    let reference = tensors(&merges_dir().join(format!("{case_name}.safetensors")));
    for module in MODULES {
        let l = merged(&c, module, &reference);
        let new = l.adapter(case_name).unwrap();
        assert_eq!(
            new.rank() as u64,
            c["new_rank"].as_u64().unwrap(),
            "{case_name}"
        );
        assert!(
            !new.use_rslora && new.scaling() == 1.0,
            "{case_name}: scaling 1"
        );
        let delta = vals(new.delta_weight());
        let d = max_diff(&delta, &reference[&format!("{module}.delta")].1);
        assert!(d < 1e-5, "{case_name} {module}: max |ΔW - PEFT| = {d:e}");
        if !combination.uses_svd() {
            for ab in ["lora_A", "lora_B"] {
                let ours = vals(match ab {
                    "lora_A" => new.lora_A.val(),
                    _ => new.lora_B.val(),
                });
                let d = max_diff(&ours, &reference[&format!("{module}.{ab}")].1);
                assert!(d < 1e-6, "{case_name} {module} {ab}: max diff {d:e}");
            }
        }
    }
}

#[test]
fn cat_and_linear_match_peft() {
    check_case("cat");
    check_case("linear");
}

#[test]
fn ties_and_magnitude_prune_match_peft_on_a_and_b() {
    check_case("ties");
    check_case("ties_frequency");
    check_case("magnitude_prune");
}

#[test]
fn svd_combinations_match_peft_delta_weights() {
    check_case("svd");
    check_case("svd_rank6");
    check_case("ties_svd");
    check_case("magnitude_prune_svd");
}

#[test]
fn dare_combinations_match_peft_given_its_masks() {
    check_case("dare_linear");
    check_case("dare_ties");
    check_case("dare_linear_svd");
    check_case("dare_ties_svd");
}

#[test]
fn svd_clamp_matches_peft() {
    // PEFT's clamp applied to PEFT's own unclamped factors (the "svd" case, same inputs)
    let plain = tensors(&merges_dir().join("svd.safetensors"));
    let clamped = tensors(&merges_dir().join("svd_clamp.safetensors"));
    let q = case("svd_clamp")["svd_clamp"].as_f64().unwrap();
    for module in MODULES {
        let f64s = |k: &str| -> Vec<f64> {
            plain[&format!("{module}.{k}")]
                .1
                .iter()
                .map(|x| f64::from(*x))
                .collect()
        };
        let (mut b, mut a) = (f64s("lora_B"), f64s("lora_A"));
        clamp_quantile(&mut b, &mut a, q).unwrap();
        for (ab, ours) in [("lora_B", b), ("lora_A", a)] {
            let ours: Vec<f32> = ours.iter().map(|x| *x as f32).collect();
            let d = max_diff(&ours, &clamped[&format!("{module}.{ab}")].1);
            assert!(d < 1e-6, "{module} {ab}: {d:e}");
        }
        // and legora's own svd + clamp is the clamp of legora's own svd
        let c = case("svd_clamp");
        let l = merged(&c, module, &clamped);
        let unclamped = merged(&case("svd"), module, &plain);
        let (new, raw) = (
            l.adapter("svd_clamp").unwrap(),
            unclamped.adapter("svd").unwrap(),
        );
        let to64 =
            |t: Tensor<B, 2>| -> Vec<f64> { vals(t).iter().map(|x| f64::from(*x)).collect() };
        let (mut b, mut a) = (to64(raw.lora_B.val()), to64(raw.lora_A.val()));
        clamp_quantile(&mut b, &mut a, q).unwrap();
        let a32: Vec<f32> = a.iter().map(|x| *x as f32).collect();
        assert!(max_diff(&vals(new.lora_A.val()), &a32) < 1e-6, "{module}");
        // the clamp is active at this quantile
        assert!(max_diff(&vals(new.lora_A.val()), &vals(raw.lora_A.val())) > 1e-3);
    }
}

#[test]
fn rslora_sources_fold_their_real_scaling() {
    // PEFT copies the first adapter's config (use_rslora) to the merged one, so its
    // ΔW is √r times the intended; legora's merged adapter is plain LoRA at scaling 1.
    for name in ["rslora_first_cat", "rslora_first_svd"] {
        let c = case(name);
        let r = c["new_rank"].as_f64().unwrap();
        let peft_scaling = c["peft_scaling"].as_f64().unwrap();
        assert!(
            (peft_scaling - r.sqrt()).abs() < 1e-9,
            "{name}: PEFT's scaling"
        );
        check_case(name);
    }
    // the intended ΔW, from legora's own source deltas: 0.5·ΔW_b + 0.5·ΔW_a, with
    // ΔW_b at scaling 16/√4 = 8
    let reference = tensors(&merges_dir().join("rslora_first_cat.safetensors"));
    for module in MODULES {
        let l = merged(&case("rslora_first_cat"), module, &reference);
        assert_eq!(l.adapter("b").unwrap().scaling(), 8.0);
        let want: Vec<f32> = vals(
            l.adapter("b").unwrap().delta_weight() * 0.5
                + l.adapter("a").unwrap().delta_weight() * 0.5,
        );
        let got = vals(l.adapter("rslora_first_cat").unwrap().delta_weight());
        assert!(max_diff(&got, &want) < 1e-5, "{module}");
    }
}

/// Two random rank-8 adapters on a 96×80 layer.
fn random_layer() -> LoraLinear<B> {
    let dev = Default::default();
    let w = Tensor::<B, 2>::zeros([96, 80], &dev);
    let mut l = LoraLinear::new(w, None).unwrap();
    for name in ["x", "y"] {
        let a = Tensor::random([8, 80], Distribution::Normal(0.0, 1.0), &dev);
        let b = Tensor::random([96, 8], Distribution::Normal(0.0, 1.0), &dev);
        let adapter = LoraAdapter::from_tensors(a, b, &AdapterSpec::new(8, 16.0), 80, 96).unwrap();
        l.insert_adapter(name, adapter).unwrap();
    }
    l
}

#[test]
fn seeded_dare_keeps_a_density_fraction_rescaled_and_repeats_for_a_seed() {
    let mut l = random_layer();
    let opts = MergeOptions::default().with_density(0.3).with_seed(5);
    // weight 0 on `y`: the result is `x`'s pruned, rescaled tensors alone
    let run = |l: &mut LoraLinear<B>, name: &str, o: &MergeOptions| {
        l.add_weighted_adapter(&["x", "y"], &[0.5, 0.0], name, Combination::DareLinear, o)
            .unwrap();
        vals(l.adapter(name).unwrap().lora_A.val())
    };
    let first = run(&mut l, "d1", &opts);
    let again = run(&mut l, "d2", &opts);
    let other = run(&mut l, "d3", &opts.with_seed(6));
    assert_eq!(first, again, "one seed, one mask");
    assert_ne!(first, other, "another seed, another mask");
    let src = vals(l.adapter("x").unwrap().lora_A.val());
    // A = √(w·s) · mask · A_x / density with w·s = 0.5 · 2
    let scale = (0.5f32 * 2.0).sqrt() / 0.3;
    let mut kept = 0;
    for (got, a) in first.iter().zip(&src) {
        if *got != 0.0 {
            kept += 1;
            assert!((got - a * scale).abs() < 1e-5, "{got} vs {}", a * scale);
        }
    }
    let frac = kept as f64 / first.len() as f64;
    assert!((frac - 0.3).abs() < 0.05, "kept fraction {frac}");
    // density 1 prunes nothing: dare_linear is linear
    let full = MergeOptions::default().with_density(1.0);
    l.add_weighted_adapter(
        &["x", "y"],
        &[0.5, 0.2],
        "d4",
        Combination::DareLinear,
        &full,
    )
    .unwrap();
    l.add_weighted_adapter(&["x", "y"], &[0.5, 0.2], "lin", Combination::Linear, &full)
        .unwrap();
    let d4 = vals(l.adapter("d4").unwrap().delta_weight());
    assert!(max_diff(&d4, &vals(l.adapter("lin").unwrap().delta_weight())) < 1e-6);
}

fn err(
    l: &mut LoraLinear<B>,
    names: &[&str],
    weights: &[f64],
    c: Combination,
    o: MergeOptions,
) -> String {
    l.add_weighted_adapter(names, weights, "bad", c, &o)
        .unwrap_err()
        .to_string()
}

#[test]
fn invalid_arguments_are_typed_errors_naming_the_key() {
    let mut l = random_layer();
    let d = MergeOptions::default();
    let e = "average".parse::<Combination>().unwrap_err().to_string();
    assert!(
        e.contains("combination_type") && e.contains("\"average\""),
        "{e}"
    );
    for bad in [1.5, -0.1, f64::NAN] {
        let e = err(
            &mut l,
            &["x", "y"],
            &[1.0, 1.0],
            Combination::Ties,
            d.with_density(bad),
        );
        assert!(e.contains("density") && e.contains("[0, 1]"), "{e}");
    }
    let e = err(&mut l, &["x", "y"], &[1.0, 1.0], Combination::DareTies, d);
    assert!(
        e.contains("density") && e.contains("dare_ties") && e.contains("none"),
        "{e}"
    );
    let e = err(&mut l, &["x", "y"], &[1.0], Combination::Svd, d);
    assert!(
        e.contains("weights") && e.contains("2 adapters") && e.contains("1 weights"),
        "{e}"
    );
    let e = err(
        &mut l,
        &["x", "y"],
        &[1.0, f64::INFINITY],
        Combination::Svd,
        d,
    );
    assert!(e.contains("weights") && e.contains("finite"), "{e}");
    let e = err(
        &mut l,
        &["x", "y"],
        &[1.0, 1.0],
        Combination::Svd,
        d.with_svd_rank(0),
    );
    assert!(e.contains("svd_rank") && e.contains("at least 1"), "{e}");
    let e = err(
        &mut l,
        &["x", "y"],
        &[1.0, 1.0],
        Combination::TiesSvd,
        d.with_density(0.5).with_svd_rank(81),
    );
    assert!(
        e.contains("svd_rank") && e.contains("80") && e.contains("81"),
        "{e}"
    );
    let e = err(
        &mut l,
        &["x", "y"],
        &[1.0, 1.0],
        Combination::Svd,
        d.with_svd_clamp(2.0),
    );
    assert!(e.contains("svd_clamp") && e.contains('2'), "{e}");
    let e = "majority"
        .parse::<MajoritySignMethod>()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("majority_sign_method") && e.contains("\"majority\""),
        "{e}"
    );
    // unequal ranks for a factor-wise combination
    let spec = AdapterSpec::new(2, 4.0);
    l.insert_adapter(
        "z",
        LoraAdapter::init(&spec, 80, 96, &Default::default()).unwrap(),
    )
    .unwrap();
    let e = err(
        &mut l,
        &["x", "z"],
        &[1.0, 1.0],
        Combination::Ties,
        d.with_density(0.5),
    );
    assert!(e.contains("combination_type") && e.contains("r = 2"), "{e}");
    // a DoRA source
    l.add_adapter("dora", &AdapterSpec::new(8, 16.0).with_dora(true))
        .unwrap();
    let e = err(&mut l, &["x", "dora"], &[1.0, 1.0], Combination::Svd, d);
    assert!(
        e.contains("adapters") && e.contains("DoRA adapter `dora`"),
        "{e}"
    );
    // given masks: too few, too many
    let masks = vec![vec![true; 8 * 80]];
    let e = l
        .add_weighted_adapter_with_masks(
            &["x", "y"],
            &[1.0, 1.0],
            "m",
            Combination::DareLinear,
            &d.with_density(0.5),
            &masks,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("masks") && e.contains("too few"), "{e}");
    let e = l
        .add_weighted_adapter_with_masks(
            &["x", "y"],
            &[1.0, 1.0],
            "m",
            Combination::Svd,
            &d,
            &masks,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("masks") && e.contains("1 left over"), "{e}");
    // and nothing was added by a failed call
    assert_eq!(l.adapter_names(), ["x", "y", "z", "dora"]);
    // a name already taken
    l.add_weighted_adapter(&["x", "y"], &[1.0, 1.0], "ok", Combination::Cat, &d)
        .unwrap();
    let e = l
        .add_weighted_adapter(&["x", "y"], &[1.0, 1.0], "ok", Combination::Cat, &d)
        .unwrap_err();
    assert!(matches!(e, NnError::DuplicateAdapter { .. }), "{e}");
}
