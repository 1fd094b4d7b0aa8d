//! A toy model built from legora-nn layers (two task-routed `MoeLinear`s), with
//! deterministic host-side initialisation, and toy data.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use legora_data::{
    prepare_task, Batcher, ByteTokenizer, Loader, Mixing, Record, Rng, Template, TokenizeOptions,
    IGNORE_INDEX,
};
use legora_nn::{AdapterSpec, Experts, LoraAdapter, MoeLinear};
use legora_train::{ModelError, RoutingStats, StepContext, StepOutput, TrainModel};

pub type Inner = Flex;
pub type AD = Autodiff<Inner>;

pub const D_IN: usize = 6;
pub const D_HID: usize = 8;
pub const D_OUT: usize = 3;

#[derive(Module, Debug)]
pub struct Toy<B: Backend> {
    pub l1: MoeLinear<B>,
    pub l2: MoeLinear<B>,
    /// Training step at which the loss is multiplied by NaN (fault injection).
    #[module(skip)]
    pub poison_at: Option<usize>,
}

fn host(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

fn tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn moe<B: Backend>(
    rng: &mut Rng,
    d_in: usize,
    d_out: usize,
    experts: usize,
    dropout: f64,
    device: &B::Device,
) -> MoeLinear<B> {
    let w = tensor(host(rng, d_out * d_in, 0.5), [d_out, d_in], device);
    let b = tensor(host(rng, d_out, 0.1), [d_out], device);
    let mut m = MoeLinear::new(w, Some(b)).unwrap();
    for e in 0..experts {
        let r = 2;
        let spec = AdapterSpec::new(r, 4.0).with_dropout(dropout);
        let a = tensor(host(rng, r * d_in, 0.4), [r, d_in], device);
        let bb = tensor(host(rng, d_out * r, 0.4), [d_out, r], device);
        let ad = LoraAdapter::from_tensors(a, bb, &spec, d_in, d_out).unwrap();
        m.insert_expert(&format!("e{e}"), ad).unwrap();
    }
    m
}

impl<B: Backend> Toy<B> {
    /// Same values for the same seed; fresh parameter ids every call.
    pub fn new(seed: u64, experts: usize, device: &B::Device) -> Self {
        Self::with_dropout(seed, experts, 0.0, device)
    }

    /// With LoRA dropout `p` on every expert.
    pub fn with_dropout(seed: u64, experts: usize, p: f64, device: &B::Device) -> Self {
        let mut rng = Rng::new(seed);
        Self {
            l1: moe(&mut rng, D_IN, D_HID, experts, p, device),
            l2: moe(&mut rng, D_HID, D_OUT, experts, p, device),
            poison_at: None,
        }
    }
}

impl<B: Backend> TrainModel<B> for Toy<B> {
    fn forward_loss(
        &self,
        batch: &legora_data::Batch,
        ctx: &StepContext<'_>,
    ) -> Result<StepOutput<B>, ModelError> {
        let (b, s) = (batch.batch_size, batch.seq_len);
        let device = self.l1.weight.device();
        let mut x = Vec::with_capacity(b * s * D_IN);
        let mut y = Vec::with_capacity(b * s * D_OUT);
        let mut m = Vec::with_capacity(b * s * D_OUT);
        for (i, (&id, &label)) in batch.input_ids.iter().zip(&batch.labels).enumerate() {
            let task = batch.task_ids[i / s] as f32;
            let id = id as f32;
            x.extend((0..D_IN).map(|k| (0.037 * id * (k as f32 + 1.0)).sin()));
            y.extend((0..D_OUT).map(|k| (0.021 * id * (k as f32 + 1.0) + task).cos()));
            let keep = if label == IGNORE_INDEX { 0.0 } else { 1.0 };
            m.extend(std::iter::repeat_n(keep, D_OUT));
        }
        let x: Tensor<B, 3> = tensor(x, [b, s, D_IN], &device);
        let t: Tensor<B, 3> = tensor(y, [b, s, D_OUT], &device);
        let mask: Tensor<B, 3> = tensor(m, [b, s, D_OUT], &device);
        let ids: Vec<Option<usize>> = batch.task_ids.iter().map(|&t| Some(t)).collect();
        let experts = Experts::per_batch_row(&ids, s);
        let h = self.l1.forward(x, &experts)?.0.tanh();
        let out = self.l2.forward(h, &experts)?.0;
        let count = mask.clone().sum();
        let mut loss = ((out - t).powi_scalar(2) * mask).sum() / count;
        if ctx.training && self.poison_at == Some(ctx.step) {
            loss = loss * f32::NAN;
        }
        let e = self.l1.num_experts();
        let mut load = vec![0.0; e];
        for &task in &batch.task_ids {
            load[task] += 1.0 / b as f64;
        }
        Ok(StepOutput::new(loss.clone())
            .with_term("lm_loss", loss)
            .with_routing(RoutingStats {
                layers: vec!["l1".into(), "l2".into()],
                load: vec![load.clone(), load],
                accuracy: Some(1.0),
                entropy: Some(0.0),
            }))
    }
}

/// Two tasks of fixed-length examples (every row has the same number of targets).
pub fn records(task: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            Record::completion(
                task,
                format!("q{:03}", i),
                format!("a{:03}", (i * 7) % 1000),
            )
        })
        .collect()
}

pub fn loader(seed: u64, batch_size: usize, mixing: Mixing) -> Loader {
    let opts = TokenizeOptions::new(64);
    let tasks = ["alpha", "beta"]
        .iter()
        .enumerate()
        .map(|(t, name)| {
            let (ex, _) = prepare_task(
                &records(name, 10 + 3 * t),
                t,
                &Template::Raw,
                &ByteTokenizer,
                &opts,
            )
            .unwrap();
            (name.to_string(), ex)
        })
        .collect();
    Loader::new(
        tasks,
        mixing,
        seed,
        Batcher::new(ByteTokenizer::PAD),
        batch_size,
        None,
    )
    .unwrap()
}

pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("legora-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// All trainable values, concatenated in path order.
pub fn trainable_values<B: Backend, M: Module<B>>(m: &M) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = legora_train::trainable_tensors(m)
        .into_iter()
        .map(|t| (t.path, t.values))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

pub fn max_abs_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for ((pa, va), (pb, vb)) in a.iter().zip(b) {
        assert_eq!(pa, pb);
        assert_eq!(va.len(), vb.len());
        for (x, y) in va.iter().zip(vb) {
            m = m.max((x - y).abs());
        }
    }
    m
}

/// Every test of this binary holds it (see [`legora_testing::serial`]).
pub use legora_testing::serial;

/// A random 2-layer model of family `model_type` over the byte vocabulary (hidden 16,
/// 4 / 2 heads; `extra` adds config keys), the backend seeded with `seed` first.
pub fn tiny_random(model_type: &str, extra: &str, seed: u64) -> legora_models::CausalLm<AD> {
    let cfg = legora_models::Config::from_json(&format!(
        r#"{{"model_type": "{model_type}", "vocab_size": 260, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256 {extra}}}"#
    ))
    .unwrap();
    let device = Default::default();
    AD::seed(&device, seed);
    legora_models::CausalLm::random(cfg.resolve().unwrap(), 0.2, &device).unwrap()
}

/// LoRA r = 2, alpha 4 on every linear projection, both factors random (B != 0).
pub fn all_linear_lora() -> legora_nn::LoraConfig {
    legora_nn::LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(legora_nn::TargetModules::Pattern("all-linear".into())),
        init_lora_weights: legora_nn::InitLoraWeights::Random,
        ..legora_nn::LoraConfig::default()
    }
}
