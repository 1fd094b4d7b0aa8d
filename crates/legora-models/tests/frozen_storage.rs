//! Every storage type of the frozen weights through a tiny model's slots: the model whose
//! projections keep their weights as bf16 / f16 / int8 / NF4 / FP4 (with and without
//! double quantization) gives the logits and the gradients of the model whose projections
//! hold the same weights dequantized to f32 (the reference: f32 products, burn's
//! autodiff), with LoRA adapters, with a router-gated mixture and with task-routed
//! experts. Sizes are odd on purpose: `k_proj` (12 × 24 = 288 elements) and the MLP
//! (36 × 24 = 864) end in a partial 64-element 4-bit block, and fewer blocks than a
//! 256-block nested absmax group.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Tensor};
use legora_kernels::quant::{Format, QuantMatrix};
use legora_kernels::FrozenWeight;
use legora_models::{CausalLm, Config, LmInput, Slot};
use legora_nn::{InitLoraWeights, LoraAdapter, LoraConfig, RouterConfig};

type B = Autodiff<Flex>;

fn model() -> CausalLm<B> {
    let cfg = Config::from_json(
        r#"{"model_type": "qwen2", "vocab_size": 37, "hidden_size": 24,
            "intermediate_size": 36, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    B::seed(&Default::default(), 7);
    CausalLm::random(cfg.resolve().unwrap(), 0.3, &Default::default()).unwrap()
}

fn lora(r: usize, targets: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init_lora_weights = InitLoraWeights::Random; // B ≠ 0: the adapters change outputs
    c
}

/// `m` with every projection (and `lm_head`) stored as `format`, and `m` with the same
/// weights dequantized to f32.
fn stored_and_reference(m: &CausalLm<B>, format: Format) -> (CausalLm<B>, CausalLm<B>) {
    let (mut q, mut r) = (m.clone(), m.clone());
    let device = Default::default();
    for ((id, sq), (_, sr)) in q.slots_mut().into_iter().zip(r.slots_mut()) {
        let w = sq.weight();
        let [rows, cols] = w.dims();
        let values = w.into_data().to_vec::<f32>().unwrap();
        let qm = QuantMatrix::quantize(&id.to_string(), &values, rows, cols, format).unwrap();
        let deq = Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(qm.dequantize(), [rows, cols]),
            &device,
        );
        *sq.frozen_weight_mut() = FrozenWeight::from_quant(qm, &device);
        *sr.frozen_weight_mut() = FrozenWeight::dense(deq);
        assert_eq!(sq.format(), format, "{id}");
    }
    (q, r)
}

fn rows() -> Vec<Vec<u32>> {
    vec![vec![3, 9, 1, 22, 5, 17, 8], vec![30, 2, 2, 14, 36, 0, 11]]
}

/// A loss that weighs every logit differently (so every output element's gradient
/// differs).
fn loss(logits: Tensor<B, 3>) -> Tensor<B, 1> {
    let n = logits.shape().num_elements();
    let w = Tensor::<B, 1, burn::tensor::Int>::arange(0..n as i64, &logits.device())
        .float()
        .mul_scalar(0.37)
        .sin()
        .reshape(logits.dims());
    (logits * w).sum()
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// `max |a − b| ≤ tol · max(1, max |b|)`.
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    legora_testing::assert_close(what, a, b, tol, 1.0);
}

/// Every adapter's `lora_A` / `lora_B` gradient, by slot and name.
fn adapter_grads(
    m: &CausalLm<B>,
    grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let mut push = |name: String, a: &LoraAdapter<B>| {
        for (k, t) in [("A", a.lora_A.val()), ("B", a.lora_B.val())] {
            let g = t.grad(grads).expect("adapter weights get gradients");
            out.push((format!("{name}.lora_{k}"), values(g)));
        }
    };
    for (id, slot) in m.slots() {
        match slot {
            Slot::Lora(l) => {
                for n in l.adapter_names() {
                    push(format!("{id}.{n}"), l.adapter(n).unwrap());
                }
            }
            Slot::Moe(moe) => {
                for e in 0..moe.num_experts() {
                    if let Some(a) = moe.expert(e) {
                        push(format!("{id}.expert{e}"), a);
                    }
                }
            }
            Slot::Linear(_) => {}
        }
    }
    out
}

/// Logits and adapter gradients of `m` on `input`.
fn run(m: &CausalLm<B>, input: LmInput<B>) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let logits = m.forward(input).unwrap().logits;
    let grads = loss(logits.clone()).backward();
    (values(logits.inner()), adapter_grads(m, &grads))
}

fn compare(what: &str, m: &CausalLm<B>, input: impl Fn() -> LmInput<B>) {
    for format in Format::ALL {
        let (stored, reference) = stored_and_reference(m, format);
        let (ls, gs) = run(&stored, input());
        let (lr, gr) = run(&reference, input());
        let what = format!("{what} {}", format.name());
        assert_close(&format!("{what} logits"), &ls, &lr, 1e-5);
        assert!(!gs.is_empty());
        for ((name, a), (_, b)) in gs.iter().zip(&gr) {
            assert_close(&format!("{what} d {name}"), a, b, 1e-4);
        }
    }
}

fn input() -> LmInput<B> {
    LmInput::from_tokens(&rows(), &Default::default()).unwrap()
}

#[test]
fn lora_slots_in_every_storage_match_the_dequantized_model() {
    let _serial = legora_testing::serial();
    let mut m = model();
    // q, v and up adapted; k, o, gate, down and lm_head stay plain frozen slots.
    m.add_adapter("a", &lora(3, &["q_proj", "v_proj", "up_proj"]))
        .unwrap();
    compare("lora", &m, input);
}

#[test]
fn mixture_slots_in_every_storage_match_the_dequantized_model() {
    let _serial = legora_testing::serial();
    let mut m = model();
    m.add_adapter("e0", &lora(2, &["q_proj", "down_proj"]))
        .unwrap();
    m.add_adapter("e1", &lora(3, &["q_proj", "k_proj"]))
        .unwrap();
    m.adapters_to_mixture(&["e0", "e1"], Some(&RouterConfig::new(2)))
        .unwrap();
    compare("router-gated mixture", &m, input);
    compare("task-routed experts", &m, || input().with_task_ids(&[1, 0]));
}

#[test]
fn quantized_slots_keep_their_storage_through_adapter_changes() {
    let _serial = legora_testing::serial();
    let m = model();
    let (mut q, _) = stored_and_reference(&m, Format::Nf4 { double_quant: true });
    q.add_adapter("a", &lora(2, &["q_proj"])).unwrap();
    q.adapters_to_mixture(&["a"], None).unwrap();
    // Quantized weights count their elements, not their codes and scales.
    assert_eq!(q.parameter_report().total, {
        let mut r = m.clone();
        r.add_adapter("a", &lora(2, &["q_proj"])).unwrap();
        r.adapters_to_mixture(&["a"], None).unwrap();
        r.parameter_report().total
    });
    let formats: Vec<Format> = q.slots().iter().map(|(_, s)| s.format()).collect();
    assert!(formats
        .iter()
        .all(|f| *f == Format::Nf4 { double_quant: true }));
    // Merging folds the adapter into a dequantized f32 weight.
    let mut q2 = stored_and_reference(&m, Format::Int8).0;
    q2.add_adapter("a", &lora(2, &["q_proj"])).unwrap();
    let merged = q2.merge_and_unload().unwrap();
    let f = merged.slots()[0].1.format();
    assert_eq!(f, Format::F32);
}

/// `CausalLm::random_frozen` asks its maker for exactly the weights
/// `ModelConfig::frozen_weights` lists, with their shapes and in that order, and keeps
/// each in the storage the maker returned; a weight of the wrong shape, or a maker's
/// error, is refused naming the tensor.
#[test]
fn random_frozen_makes_every_frozen_weight_in_its_storage() {
    let _serial = legora_testing::serial();
    let cfg = model().config().clone();
    let nf4 = Format::Nf4 { double_quant: true };
    let mut asked = Vec::new();
    let mut make = |name: &str, [rows, cols]: [usize; 2]| {
        asked.push((name.to_string(), (rows, cols)));
        let format = if name.contains("embed") {
            Format::Bf16
        } else {
            nf4
        };
        let w = vec![0.25; rows * cols];
        Ok(QuantMatrix::quantize(name, &w, rows, cols, format)?)
    };
    let m = CausalLm::<B>::random_frozen(cfg.clone(), 0.3, &mut make, &Default::default()).unwrap();
    assert_eq!(asked, cfg.frozen_weights());
    assert_eq!(
        asked.len(),
        2 * 7 + 2,
        "untied: projections, embeddings, lm_head"
    );
    for (id, slot) in m.slots() {
        assert_eq!(slot.format(), nf4, "{id}");
    }
    assert_eq!(m.model.embed_tokens.format(), Format::Bf16);
    let logits = m.forward(input()).unwrap().logits;
    assert!(values(logits.inner()).iter().all(|v| v.is_finite()));

    let mut wrong = |name: &str, [rows, cols]: [usize; 2]| {
        let cols = if name.contains("v_proj") {
            cols + 1
        } else {
            cols
        };
        Ok(QuantMatrix::quantize(
            name,
            &vec![0.1; rows * cols],
            rows,
            cols,
            Format::F32,
        )?)
    };
    let err = CausalLm::<B>::random_frozen(cfg.clone(), 0.3, &mut wrong, &Default::default())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.layers.0.self_attn.v_proj.weight"),
        "{err}"
    );
    let mut failing =
        |name: &str, _: [usize; 2]| -> Result<QuantMatrix, legora_models::SourceError> {
            Err(format!("no memory for {name}").into())
        };
    let err = CausalLm::<B>::random_frozen(cfg, 0.3, &mut failing, &Default::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("q_proj"), "{err}");
}
