//! `LmModel::gradient_checkpointing`: training with each decoder layer recomputed in the
//! backward ends at the weights of training with the whole graph kept, for every
//! objective and batch layout the pipeline uses.

use super::common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use common::*;
use legora_data::Mixing;
use legora_kernels::quant::{Format, QuantMatrix};
use legora_kernels::FrozenWeight;
use legora_models::CausalLm;
use legora_nn::RouterConfig;
use legora_train::*;

/// Two LoRA experts on every projection of a 2-layer Llama over the byte vocabulary,
/// task-routed, router-gated (with aux and z losses) or kept as plain adapters.
fn model(kind: &str) -> CausalLm<AD> {
    // the same start for every run
    let mut m = tiny_random("llama", "", 17);
    let lora = all_linear_lora();
    let names = if kind == "lm" {
        vec!["a"]
    } else {
        vec!["a", "b"]
    };
    for n in &names {
        m.add_adapter(n, &lora).unwrap();
    }
    match kind {
        "task" => {
            m.adapters_to_mixture(&names, None).unwrap();
        }
        "router" => {
            let rc = RouterConfig::new(2)
                .with_top_k(1)
                .with_aux_loss(0.01)
                .with_z_loss(0.001);
            m.adapters_to_mixture(&names, Some(&rc)).unwrap();
        }
        _ => {}
    }
    m
}

fn settings() -> TrainSettings {
    let mut s = TrainSettings::new(3, 5);
    s.learning_rate = 5e-2;
    s.batch_size = 4;
    s.gradient_accumulation_steps = 2;
    s.max_grad_norm = Some(1.0);
    s
}

/// (model kind, objective, pad_per_task): every objective, one forward per batch and
/// one per task.
fn cases() -> [(&'static str, Objective, bool); 4] {
    [
        ("task", Objective::TaskRouted, false),
        ("task", Objective::TaskRouted, true),
        ("lm", Objective::Lm, true),
        (
            "router",
            Objective::Routed {
                routing_loss_coef: 0.1,
            },
            false,
        ),
    ]
}

#[test]
fn checkpointed_training_ends_at_the_same_weights() {
    let _serial = common::serial();
    let device = Default::default();
    for (kind, objective, pad_per_task) in cases() {
        let run = |checkpointing: bool| {
            let m = LmModel::new(model(kind), objective)
                .with_pad_per_task(pad_per_task)
                .with_gradient_checkpointing(checkpointing);
            let mut l = loader(3, 4, Mixing::Uniform);
            let dir = tmp_dir(&format!("ckpt-{kind}-{pad_per_task}-{checkpointing}"));
            Trainer::new("experts", dir, settings())
                .run(m, &mut l, &[], &device)
                .unwrap()
        };
        let (plain, ckpt) = (run(false), run(true));
        assert_eq!(ckpt.summary.steps, 3);
        let (a, b) = (
            trainable_values(&plain.model),
            trainable_values(&ckpt.model),
        );
        let d = max_abs_diff(&a, &b);
        assert!(
            d <= 1e-5,
            "{kind} {objective:?} pad_per_task={pad_per_task}: {d}"
        );
        // the run really trained: the weights moved from their start
        let start = trainable_values(&LmModel::new(model(kind), objective));
        assert!(max_abs_diff(&a, &start) > 1e-3, "{kind}: nothing trained");
    }
}

/// Each parameter's gradient in `grads`, flattened, in visiting order.
struct Grads<'a>(&'a GradientsParams, Vec<(String, Vec<f32>)>);

impl ModuleVisitor<AD> for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        if let Some(g) = self
            .0
            .get::<<AD as burn::tensor::backend::AutodiffBackend>::InnerBackend, D>(param.id)
        {
            self.1
                .push((param.id.to_string(), g.into_data().to_vec::<f32>().unwrap()));
        }
    }
}

fn grads_of(m: &LmModel<AD>, g: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut v = Grads(g, Vec::new());
    m.visit(&mut v);
    v.1
}

/// `m` with every frozen projection (and `lm_head`) stored as `format`.
fn stored(mut m: CausalLm<AD>, format: Format) -> CausalLm<AD> {
    let device = Default::default();
    for (id, slot) in m.slots_mut() {
        let w = slot.weight();
        let [rows, cols] = w.dims();
        let values = w.into_data().to_vec::<f32>().unwrap();
        let q = QuantMatrix::quantize(&id.to_string(), &values, rows, cols, format).unwrap();
        *slot.frozen_weight_mut() = FrozenWeight::from_quant(q, &device);
    }
    m
}

/// One step's gradients with each layer recomputed equal those of the whole graph, with
/// the frozen weights in f32, bf16 and NF4 (double-quantized) storage.
#[test]
fn checkpointed_gradients_equal_the_one_graph_gradients() {
    let _serial = common::serial();
    let mut l = loader(3, 4, Mixing::Uniform);
    let batch = l.next_batch().unwrap();
    let ctx = StepContext {
        stage: "t",
        step: 0,
        micro_step: 0,
        training: true,
        totals: None,
    };
    let formats = [
        Format::F32,
        Format::Bf16,
        Format::Nf4 { double_quant: true },
    ];
    for ((kind, objective, pad_per_task), format) in
        cases().into_iter().flat_map(|c| formats.map(|f| (c, f)))
    {
        let base = stored(model(kind), format);
        let m = LmModel::new(base, objective).with_pad_per_task(pad_per_task);
        let out = m.forward_loss(&batch, &ctx).unwrap();
        let want_loss = out.loss.clone().into_scalar();
        let want = grads_of(
            &m,
            &GradientsParams::from_grads((out.loss * 0.5).backward(), &m),
        );
        let m = m.with_gradient_checkpointing(true);
        let (out, g) = m
            .checkpointed_gradients(&batch, &ctx, 0.5)
            .unwrap()
            .unwrap();
        let got = grads_of(&m, &g);
        let what = format!(
            "{kind} {objective:?} pad_per_task={pad_per_task} {}",
            format.name()
        );
        let loss = out.loss.into_scalar();
        assert!(
            (loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
            "{what}: {loss} vs {want_loss}"
        );
        assert!(want.len() >= 2 * 2 * 7, "{what}: {} gradients", want.len());
        let d = max_abs_diff(&want, &got);
        let scale = want
            .iter()
            .flat_map(|(_, v)| v)
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            scale > 1e-6 && d <= 1e-5 * scale,
            "{what}: {d} (max |g| {scale})"
        );
    }
}
