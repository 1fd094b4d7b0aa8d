//! The wgpu backend against flex and transformers, run on whatever adapter wgpu finds (in
//! CI: Mesa's lavapipe, a Vulkan device on the CPU).
//!
//! - every kernel's reference path (what wgpu runs) against flex's fused kernels on
//!   random inputs: values and the gradient of every input, within 1e-4;
//! - the model fixtures' logits within 1e-4 of transformers and 20 greedy tokens identical;
//! - two training steps of a tiny router-gated mixture within 1e-4 of the same steps on
//!   flex;
//! - half-precision and NF4 bases: f16 where the device has it, bf16 refused at load (wgpu
//!   has none), a quantized base's embeddings kept f32 instead of bf16.
//!
//! Every test holds `legora_testing::serial()`: they share one device, and on lavapipe
//! shader compilation of two tests at once is slower than one after the other (the lock
//! does what `--test-threads=1` did, which one binary of a workspace run cannot be given).
//!
//! Build and run with `cargo test -p legora --features wgpu --test wgpu` (`.ci/run` runs
//! them inside `cargo test --workspace --features legora/wgpu`, with
//! `CUBECL_AUTOTUNE_LEVEL=minimal`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::DType;
use burn::tensor::{Int, Tensor, TensorData};
use legora::backend::{Autodiff, Flex, Wgpu};
use legora::data::Batch;
use legora::hub::{FloatDtype, LoadOptions, PeftModel, PretrainedModel, Quantize};
use legora::kernels::quant::{Format, FrozenWeight, QuantMatrix};
use legora::kernels::{self as k, Gating, KvSeq, StackedLora};
use legora::models::{GenerationConfig, LmInput};
use legora::nn::{InitLoraWeights, LoraConfig, RouterConfig};
use legora::train::{LmModel, Objective, TrainSettings, Trainer};
use safetensors::SafeTensors;

type AF = Autodiff<Flex>;
type AW = Autodiff<Wgpu>;

const TOL: f32 = 1e-4;

// ---------------------------------------------------------------------------------------
// Helpers

/// Values in about [-3.4, 3.4] from a local SplitMix64 (tests run in parallel and must not
/// share a backend's generator; both backends get the same numbers).
fn random(shape: &[usize], seed: u64) -> TensorData {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((0..4).map(|_| uniform()).sum::<f32>() - 2.0) * 1.7)
        .collect();
    TensorData::new(v, shape.to_vec())
}

fn constant<B: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    Tensor::from_data(random(&shape, seed), &Default::default())
}

fn leaf<B: AutodiffBackend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    constant::<B, D>(shape, seed).require_grad()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// `Σ out ⊙ w` for a fixed random `w`: every output element gets its own gradient.
fn probe<B: Backend, const D: usize>(out: Tensor<B, D>, seed: u64) -> Tensor<B, 1> {
    let w = constant::<B, D>(out.dims(), seed);
    (out * w).sum()
}

/// The largest `|a - b| / (1 + |b|)`.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max)
}

/// A kernel case: its named outputs (the value, then input gradients) on one backend.
type Outputs = Vec<(&'static str, Vec<f32>)>;

/// Every output of a case on wgpu within [`TOL`] of the same output on flex.
fn assert_same(case: &str, wgpu: &Outputs, flex: &Outputs) {
    assert_eq!(wgpu.len(), flex.len(), "{case}: outputs");
    for ((what, a), (_, b)) in wgpu.iter().zip(flex) {
        let d = worst(a, b);
        assert!(d <= TOL, "{case} {what}: wgpu vs flex {d} > {TOL}");
    }
}

/// Runs `case` on `Autodiff<Wgpu>` and `Autodiff<Flex>` and compares every output.
macro_rules! same_on_both {
    ($name:literal, $case:ident) => {
        assert_same($name, &$case::<AW>(), &$case::<AF>())
    };
}

// ---------------------------------------------------------------------------------------
// Kernels

#[test]
fn the_wgpu_tests_run_on_a_wgpu_device_without_fused_kernels() {
    let _serial = legora_testing::serial();
    assert!(!k::has_fused_kernels::<AW>());
    assert!(k::has_fused_kernels::<AF>());
    let t = constant::<Wgpu, 2>([2, 3], 1);
    assert_eq!(host(t.clone() * 2.0).len(), 6);
}

/// Mixed ranks `[2, 3]`, a trainable weight and bias, and each gating.
fn stacked<B: AutodiffBackend>(gating: usize) -> Outputs {
    let (n, din, dout) = (7, 12, 10);
    let x = leaf::<B, 2>([n, din], 1);
    let w = leaf::<B, 2>([dout, din], 2);
    let bias = leaf::<B, 1>([dout], 3);
    let a = leaf::<B, 2>([5, din], 4);
    let b = leaf::<B, 2>([dout, 5], 5);
    let gates = leaf::<B, 2>([n, 2], 6);
    let rows: Arc<[Option<usize>]> = (0..n).map(|i| [Some(0), Some(1), None][i % 3]).collect();
    let lora = StackedLora {
        lora_a: a.clone(),
        lora_b: b.clone(),
        ranks: vec![2, 3],
        scales: vec![0.5, 2.0],
        dropout: 0.0,
        gating: match gating {
            0 => Gating::Single(1),
            1 => Gating::Rows(rows),
            _ => Gating::Dense(gates.clone()),
        },
    };
    let y = k::stacked_lora_linear(x.clone(), w.clone(), Some(bias.clone()), lora);
    let g = probe(y.clone(), 7).backward();
    let mut out = vec![("y", host(y))];
    for (what, t) in [("dx", x), ("dW", w), ("dA", a), ("dB", b)] {
        out.push((what, host(t.grad(&g).unwrap())));
    }
    out.push(("dbias", host(bias.grad(&g).unwrap())));
    if gating == 2 {
        out.push(("dgates", host(gates.grad(&g).unwrap())));
    }
    out
}

fn stacked_single<B: AutodiffBackend>() -> Outputs {
    stacked::<B>(0)
}
fn stacked_rows<B: AutodiffBackend>() -> Outputs {
    stacked::<B>(1)
}
fn stacked_dense<B: AutodiffBackend>() -> Outputs {
    stacked::<B>(2)
}

#[test]
fn stacked_lora_linear_equals_flex() {
    let _serial = legora_testing::serial();
    same_on_both!("stacked_lora_linear single", stacked_single);
    same_on_both!("stacked_lora_linear rows", stacked_rows);
    same_on_both!("stacked_lora_linear dense", stacked_dense);
}

fn lora_linear<B: AutodiffBackend>() -> Outputs {
    let x = leaf::<B, 2>([6, 9], 11);
    let a = leaf::<B, 2>([3, 9], 12);
    let b = leaf::<B, 2>([8, 3], 13);
    let w = constant::<B, 2>([8, 9], 14);
    let term = k::LoraTerm {
        lora_a: a.clone(),
        lora_b: b.clone(),
        scale: 1.5,
        dropout: 0.0,
    };
    let y = k::lora_linear(x.clone(), w, None, term);
    let g = probe(y.clone(), 15).backward();
    vec![
        ("y", host(y)),
        ("dx", host(x.grad(&g).unwrap())),
        ("dA", host(a.grad(&g).unwrap())),
        ("dB", host(b.grad(&g).unwrap())),
    ]
}

#[test]
fn lora_linear_equals_flex() {
    let _serial = legora_testing::serial();
    same_on_both!("lora_linear", lora_linear);
}

/// The quantized frozen formats: a 4-bit or int8 weight is dequantized with burn ops on
/// wgpu (the reference path) and tile by tile inside the products on flex.
fn frozen<B: AutodiffBackend>(format: Format) -> Outputs {
    let (n, din, dout) = (5, 70, 45);
    let w = random(&[dout, din], 21).to_vec::<f32>().unwrap();
    let m = QuantMatrix::quantize("w", &w, dout, din, format).unwrap();
    let w = FrozenWeight::<B>::from_quant(m, &Default::default());
    let x = leaf::<B, 2>([n, din], 22);
    let a = leaf::<B, 2>([5, din], 23);
    let b = leaf::<B, 2>([dout, 5], 24);
    let gates = leaf::<B, 2>([n, 2], 25);
    let lora = StackedLora {
        lora_a: a.clone(),
        lora_b: b.clone(),
        ranks: vec![2, 3],
        scales: vec![0.5, 2.0],
        dropout: 0.0,
        gating: Gating::Dense(gates.clone()),
    };
    let y = k::stacked_lora_frozen(x.clone(), &w, None, lora);
    let g = probe(y.clone(), 26).backward();
    vec![
        ("y", host(y)),
        ("dx", host(x.grad(&g).unwrap())),
        ("dA", host(a.grad(&g).unwrap())),
        ("dB", host(b.grad(&g).unwrap())),
        ("dgates", host(gates.grad(&g).unwrap())),
    ]
}

#[test]
fn quantized_frozen_weights_equal_flex() {
    let _serial = legora_testing::serial();
    for format in [
        Format::Int8,
        Format::Nf4 {
            double_quant: false,
        },
        Format::Nf4 { double_quant: true },
        Format::Fp4 { double_quant: true },
    ] {
        assert_same(format.name(), &frozen::<AW>(format), &frozen::<AF>(format));
    }
}

/// Grouped-query attention (4 query heads over 2 kv heads), two cached keys, a mask with
/// blocked positions per row.
fn attention<B: AutodiffBackend>() -> Outputs {
    let (b, s, t, h, kv, hd) = (2, 5, 7, 4, 2, 8);
    let q = leaf::<B, 4>([b, s, h, hd], 31);
    let kk = leaf::<B, 4>([b, t, kv, hd], 32);
    let v = leaf::<B, 4>([b, t, kv, hd], 33);
    let mask: Vec<f32> = (0..b * s * t)
        .map(|i| {
            let (row, j) = ((i / t) % s, i % t);
            if j > row + 2 || (i / (s * t) == 1 && j == 0) {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [b, 1, s, t]), &Default::default());
    let y = k::attention(
        q.clone(),
        kk.clone(),
        v.clone(),
        k::AttnMask::Dense(mask),
        0.35,
    );
    let g = probe(y.clone(), 34).backward();
    vec![
        ("y", host(y)),
        ("dq", host(q.grad(&g).unwrap())),
        ("dk", host(kk.grad(&g).unwrap())),
        ("dv", host(v.grad(&g).unwrap())),
    ]
}

fn rms_norm<B: AutodiffBackend>() -> Outputs {
    let x = leaf::<B, 3>([2, 3, 16], 41);
    let w = leaf::<B, 1>([16], 42);
    let y = k::rms_norm(x.clone(), w.clone(), 1e-6);
    let g = probe(y.clone(), 43).backward();
    vec![
        ("y", host(y)),
        ("dx", host(x.grad(&g).unwrap())),
        ("dweight", host(w.grad(&g).unwrap())),
    ]
}

fn rotary<B: AutodiffBackend>() -> Outputs {
    let x = leaf::<B, 4>([2, 5, 3, 8], 51);
    let (c, s) = (
        constant::<B, 4>([2, 5, 1, 8], 52),
        constant([2, 5, 1, 8], 53),
    );
    let y = k::rotary(x.clone(), &c, &s);
    let g = probe(y.clone(), 54).backward();
    vec![("y", host(y)), ("dx", host(x.grad(&g).unwrap()))]
}

fn swiglu<B: AutodiffBackend>() -> Outputs {
    let (gate, up) = (leaf::<B, 2>([3, 40], 61), leaf::<B, 2>([3, 40], 62));
    let y = k::swiglu(gate.clone(), up.clone());
    let g = probe(y.clone(), 63).backward();
    vec![
        ("y", host(y)),
        ("dgate", host(gate.grad(&g).unwrap())),
        ("dup", host(up.grad(&g).unwrap())),
    ]
}

fn next_token_nll<B: AutodiffBackend>() -> Outputs {
    let (b, s, v) = (3, 6, 37);
    let logits = leaf::<B, 3>([b, s, v], 71);
    let targets: Vec<i64> = (0..b * (s - 1)).map(|i| (i * 13 % v) as i64).collect();
    let y = k::next_token_nll(logits.clone(), &targets);
    let g = probe(y.clone(), 72).backward();
    vec![("y", host(y)), ("dlogits", host(logits.grad(&g).unwrap()))]
}

#[test]
fn attention_norm_rotary_swiglu_and_nll_equal_flex() {
    let _serial = legora_testing::serial();
    same_on_both!("attention", attention);
    same_on_both!("rms_norm", rms_norm);
    same_on_both!("rotary", rotary);
    same_on_both!("swiglu", swiglu);
    same_on_both!("next_token_nll", next_token_nll);
}

/// Continuous batching's attention: three sequences with 0, 3 and 5 cached rows, with and
/// without a sliding window; the output and the updated buffers.
fn packed<B: Backend>(window: Option<usize>) -> Vec<Vec<f32>> {
    let (h, kv, hd) = (4, 2, 8);
    let shape = [(0usize, 4usize), (3, 1), (5, 2)];
    let t: usize = shape.iter().map(|s| s.1).sum();
    let seqs = shape
        .iter()
        .enumerate()
        .map(|(i, &(past, rows))| KvSeq {
            k: constant::<B, 3>([9, kv, hd], 80 + i as u64),
            v: constant::<B, 3>([9, kv, hd], 90 + i as u64),
            past,
            rows,
        })
        .collect();
    let (q, kn, vn) = (
        constant::<B, 3>([t, h, hd], 81),
        constant::<B, 3>([t, kv, hd], 82),
        constant::<B, 3>([t, kv, hd], 83),
    );
    let (y, seqs) = k::packed_attention(q, kn, vn, seqs, window, 0.35).unwrap();
    let mut out = vec![host(y)];
    for s in seqs {
        out.push(host(s.k.slice(0..s.past + s.rows)));
        out.push(host(s.v.slice(0..s.past + s.rows)));
    }
    out
}

#[test]
fn packed_attention_equals_flex() {
    let _serial = legora_testing::serial();
    for window in [None, Some(3)] {
        let (w, f) = (packed::<Wgpu>(window), packed::<Flex>(window));
        for (i, (a, b)) in w.iter().zip(&f).enumerate() {
            let d = worst(a, b);
            assert!(d <= TOL, "packed attention {window:?} output {i}: {d}");
        }
    }
}

#[test]
fn dropout_on_wgpu_keeps_the_expected_fraction_and_scale() {
    let _serial = legora_testing::serial();
    let x = Tensor::<AW, 2>::ones([2, 20_000], &Default::default()).require_grad();
    assert_eq!(host(k::dropout(x.clone(), 0.0)), vec![1.0; 40_000]);
    let y = k::dropout(x.clone(), 0.25);
    let g = y.clone().sum().backward();
    let (y, dx) = (host(y), host(x.grad(&g).unwrap()));
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    let scale = 1.0 / 0.75;
    assert!(y.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-6));
    assert_eq!(y, dx, "the gradient is the mask times the scale");
}

// ---------------------------------------------------------------------------------------
// Models against transformers

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// The reference tensors transformers wrote for one family (make_model_fixtures.py).
struct Reference(Vec<u8>);

impl Reference {
    fn load(family: &str) -> Self {
        let path = fixtures().join(format!("reference/{family}.safetensors"));
        Self(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn bytes(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        (v.shape().to_vec(), v.data().to_vec())
    }

    fn ints(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (shape, data) = self.bytes(name);
        let v = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()));
        (shape, v.collect())
    }

    fn floats(&self, name: &str) -> Vec<f32> {
        let (_, data) = self.bytes(name);
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        v.collect()
    }

    fn rows(&self, name: &str) -> Vec<Vec<u32>> {
        let (shape, v) = self.ints(name);
        v.chunks(shape[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }

    fn int_tensor<B: Backend>(&self, name: &str) -> Tensor<B, 2, Int> {
        let (shape, v) = self.ints(name);
        Tensor::from_data(
            TensorData::new(v, [shape[0], shape[1]]),
            &Default::default(),
        )
    }

    fn batch<B: Backend>(&self) -> LmInput<B> {
        LmInput::new(self.int_tensor("input_ids"))
            .with_attention_mask(self.int_tensor("attention_mask"))
            .with_position_ids(self.int_tensor("position_ids"))
    }

    /// The prompts without their left padding.
    fn prompts(&self) -> Vec<Vec<u32>> {
        let (ids, mask) = (self.rows("input_ids"), self.rows("attention_mask"));
        ids.iter()
            .zip(&mask)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect()
    }

    /// Max |logits - `name`| over the real (unpadded) positions.
    fn max_diff<B: Backend>(&self, logits: Tensor<B, 3>, name: &str) -> f32 {
        let [_, _, v] = logits.dims();
        let (got, want) = (host(logits), self.floats(name));
        assert_eq!(got.len(), want.len(), "{name}: logits size");
        let (_, mask) = self.ints("attention_mask");
        let real = mask.iter().enumerate().filter(|(_, &m)| m == 1);
        real.flat_map(|(pos, _)| pos * v..(pos + 1) * v)
            .map(|i| (got[i] - want[i]).abs())
            .fold(0.0, f32::max)
    }
}

#[test]
fn model_fixtures_match_transformers_on_wgpu() {
    let _serial = legora_testing::serial();
    for family in ["llama", "qwen2", "mistral"] {
        let r = Reference::load(family);
        let base =
            PretrainedModel::<Wgpu>::from_pretrained(fixtures().join(family), &Default::default())
                .unwrap();
        let d = r.max_diff(base.model.forward(r.batch()).unwrap().logits, "logits_base");
        assert!(d < TOL, "{family}: logits differ from transformers by {d}");
        let cfg = GenerationConfig::greedy(20);
        let got = base.model.generate(&r.prompts(), &cfg, None).unwrap();
        assert_eq!(got, r.rows("gen_base"), "{family}: 20 greedy tokens");
        let p =
            PeftModel::from_pretrained(base, fixtures().join(format!("{family}-lora-qv"))).unwrap();
        let d = r.max_diff(p.model().forward(r.batch()).unwrap().logits, "logits_qv");
        assert!(
            d < TOL,
            "{family} + LoRA q,v: logits differ from PEFT by {d}"
        );
        let got = p.model().generate(&r.prompts(), &cfg, None).unwrap();
        assert_eq!(
            got,
            r.rows("gen_qv"),
            "{family} + LoRA q,v: 20 greedy tokens"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Training

/// Two AdamW steps of a router-gated mixture of two experts (r 2 and 4, on q/v and
/// gate/down) over the tiny Llama; every trainable tensor after each step.
fn train_two_steps<B: AutodiffBackend>(mixture: &Path, tmp: &Path) -> Vec<Vec<(String, Vec<f32>)>> {
    let device = Default::default();
    let mut m = PretrainedModel::<B>::from_pretrained(fixtures().join("llama"), &device)
        .unwrap()
        .model;
    legora::hub::load_mixture(&mut m, mixture).unwrap();
    let mut lm = LmModel::new(m, Objective::Lm);
    let mut s = TrainSettings::new(2, 0);
    s.learning_rate = 1e-2;
    let trainer = Trainer::new("experts", tmp, s);
    let mut optim = trainer.optimizer::<B, LmModel<B>>();
    let batch = tiny_batch();
    let mut after = Vec::new();
    for step in 0..2 {
        let (next, _) = trainer
            .step(lm, &mut optim, step, &mut || Ok(batch.clone()), &device)
            .unwrap();
        lm = next;
        after.push(trainables::<B, _>(&lm.model));
    }
    after
}

/// 2 rows of 8 tokens, the second left-padded by 2, loss on every real token.
fn tiny_batch() -> Batch {
    let (b, s) = (2usize, 8usize);
    let input_ids: Vec<u32> = (0..b * s).map(|i| (i * 7 % 50 + 3) as u32).collect();
    let attention_mask: Vec<u32> = (0..b * s).map(|i| u32::from(i < s || i % s >= 2)).collect();
    let labels = input_ids
        .iter()
        .zip(&attention_mask)
        .map(|(&t, &m)| if m == 1 { i64::from(t) } else { -100 })
        .collect();
    let position_ids = (0..b * s)
        .map(|i| {
            if i < s {
                i as u32
            } else {
                (i % s).saturating_sub(2) as u32
            }
        })
        .collect();
    Batch {
        batch_size: b,
        seq_len: s,
        input_ids,
        labels,
        attention_mask,
        position_ids,
        sequence_ids: vec![0; b * s],
        task_ids: vec![0; b],
    }
}

/// Every trainable tensor (the experts' A/B, the routers), in the module's visiting
/// order, with its shape.
fn trainables<B: AutodiffBackend, M: Module<B>>(m: &M) -> Vec<(String, Vec<f32>)> {
    struct Collect(Vec<(String, Vec<f32>)>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if p.is_require_grad() {
                let i = self.0.len();
                self.0
                    .push((format!("#{i} {:?}", p.shape().dims::<D>()), host(p.val())));
            }
        }
    }
    let mut c = Collect(Vec::new());
    m.visit(&mut c);
    c.0
}

#[test]
fn two_training_steps_of_a_mixture_equal_flex() {
    let _serial = legora_testing::serial();
    let dir = std::env::temp_dir().join(format!("legora-wgpu-mixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut base =
        PretrainedModel::<Flex>::from_pretrained(fixtures().join("llama"), &Default::default())
            .unwrap()
            .model;
    for (name, r, targets) in [
        ("e0", 2, ["q_proj", "v_proj"]),
        ("e1", 4, ["gate_proj", "down_proj"]),
    ] {
        let mut c = LoraConfig::new(r, 2.0 * r as f64, &targets);
        c.init_lora_weights = InitLoraWeights::Random;
        base.add_adapter(name, &c).unwrap();
    }
    base.adapters_to_mixture(&["e0", "e1"], Some(&RouterConfig::new(2)))
        .unwrap();
    legora::hub::save_mixture(&base, &dir.join("mixture"), None, None).unwrap();
    let flex = train_two_steps::<AF>(&dir.join("mixture"), &dir.join("flex"));
    let wgpu = train_two_steps::<AW>(&dir.join("mixture"), &dir.join("wgpu"));
    for (step, (f, w)) in flex.iter().zip(&wgpu).enumerate() {
        assert_eq!(f.len(), w.len());
        assert!(
            f.len() > 4,
            "the mixture has its experts and routers: {}",
            f.len()
        );
        for ((name, a), (_, b)) in f.iter().zip(w) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(d <= TOL, "step {}: {name} differs by {d}", step + 1);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// f16 frozen weights compute on wgpu where the device has f16 (lavapipe does) and are
/// refused with a typed error where it does not; bf16, which wgpu lacks, is refused at
/// load, and a quantized base keeps its embeddings f32 there instead of bf16.
#[test]
fn half_precision_bases_compute_or_are_refused() {
    let _serial = legora_testing::serial();
    let device = Default::default();
    let dir = fixtures().join("llama");
    let load = |dtype, quantize| {
        let o = LoadOptions::new(dtype, quantize);
        PretrainedModel::<Wgpu>::from_pretrained_with(&dir, &device, &o)
    };
    if <Wgpu as Backend>::supports_dtype(&device, DType::F16) {
        assert_same(
            "f16",
            &frozen::<AW>(Format::F16),
            &frozen::<AF>(Format::F16),
        );
        let r = Reference::load("llama");
        let m = load(FloatDtype::F16, None).unwrap();
        let d = r.max_diff(m.model.forward(r.batch()).unwrap().logits, "logits_base");
        assert!(
            d < 5e-2,
            "f16 base: logits differ from transformers f32 by {d}"
        );
    } else {
        let e = load(FloatDtype::F16, None).unwrap_err().to_string();
        assert!(e.contains("found f16"), "{e}");
    }
    assert!(!<Wgpu as Backend>::supports_dtype(&device, DType::BF16));
    let e = load(FloatDtype::BF16, None).unwrap_err().to_string();
    assert!(
        e.contains("load option `dtype (of the projections)`") && e.contains("found bf16"),
        "{e}"
    );
    // NF4 projections with f32 embeddings: the same logits as flex with the same storage.
    let nf4 = Some(Quantize::Nf4 { double_quant: true });
    let m = load(FloatDtype::F32, nf4).unwrap();
    let mut o = LoadOptions::new(FloatDtype::F32, nf4);
    o.lm_head = Some(Format::F32);
    let f = PretrainedModel::<Flex>::from_pretrained_with(&dir, &Default::default(), &o).unwrap();
    let r = Reference::load("llama");
    let (w, f) = (
        host(m.model.forward(r.batch()).unwrap().logits),
        host(f.model.forward(r.batch()).unwrap().logits),
    );
    let d = worst(&w, &f);
    assert!(d <= TOL, "nf4 base: wgpu vs flex logits {d}");
}
