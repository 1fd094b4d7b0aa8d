//! `LmModel::pad_per_task`: running each task's rows as their own, shorter forward pass
//! gives the loss and the adapter gradients of the padded batch.

use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;
use legora_data::{prepare_task, Batcher, ByteTokenizer, Record, Template, TokenizeOptions};
use legora_models::{CausalLm, Config, Slot};
use legora_nn::{LoraConfig, TargetModules};
use legora_train::{LmModel, Objective, StepContext, TrainModel};

type AD = Autodiff<Flex>;

fn mixture(names: &[&str], routed: bool) -> CausalLm<AD> {
    let cfg = Config::from_json(
        r#"{"model_type": "llama", "vocab_size": 260, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    let mut m = CausalLm::<AD>::random(cfg.resolve().unwrap(), 0.2, &Default::default()).unwrap();
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        init_lora_weights: legora_nn::InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    for n in names {
        m.add_adapter(n, &lora).unwrap();
    }
    if routed {
        m.adapters_to_mixture(names, None).unwrap();
    }
    m
}

/// Rows of two tasks with very different lengths, interleaved.
fn batch() -> legora_data::Batch {
    let tok = ByteTokenizer;
    let opts = TokenizeOptions::new(256);
    let short: Vec<Record> = (0..3)
        .map(|i| Record::completion("s", format!("q{i}"), format!(" a{i}")))
        .collect();
    let long: Vec<Record> = (0..2)
        .map(|i| {
            Record::completion(
                "l",
                format!("a much longer prompt number {i} with many more bytes in it"),
                format!(" and a longer answer {i} too"),
            )
        })
        .collect();
    let s = prepare_task(&short, 0, &Template::Raw, &tok, &opts)
        .unwrap()
        .0;
    let l = prepare_task(&long, 1, &Template::Raw, &tok, &opts)
        .unwrap()
        .0;
    let rows = [&s[0], &l[0], &s[1], &l[1], &s[2]];
    Batcher::for_tokenizer(&tok).collate(&rows).unwrap()
}

/// The context of a first training step.
fn training_step() -> StepContext<'static> {
    StepContext {
        stage: "t",
        step: 0,
        micro_step: 0,
        training: true,
        totals: None,
    }
}

fn grads_of(m: &CausalLm<AD>, loss: Tensor<AD, 1>) -> Vec<f32> {
    let grads = loss.backward();
    let mut out = Vec::new();
    for p in m.slot_ids() {
        match m.slot(p).unwrap() {
            Slot::Moe(x) => {
                for e in &x.experts {
                    for t in [e.lora_A.val(), e.lora_B.val()] {
                        // an expert no row of the batch reached has no gradient: zeros
                        let g = t.grad(&grads).unwrap_or_else(|| t.zeros_like().inner());
                        out.extend(g.into_data().to_vec::<f32>().unwrap());
                    }
                }
            }
            Slot::Lora(x) => {
                for e in x.adapter_names().iter().map(|n| x.adapter(n).unwrap()) {
                    for t in [e.lora_A.val(), e.lora_B.val()] {
                        if let Some(g) = t.grad(&grads) {
                            out.extend(g.into_data().to_vec::<f32>().unwrap());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn per_task_passes_give_the_padded_batch_loss_and_gradients() {
    let _serial = crate::common::serial();
    let batch = batch();
    let ctx = training_step();
    for (objective, routed) in [(Objective::TaskRouted, true), (Objective::Lm, false)] {
        let m = mixture(&["a", "b"], routed);
        let one = LmModel::new(m.clone(), objective);
        let split = LmModel::new(m, objective).with_pad_per_task(true);
        let l1 = one.forward_loss(&batch, &ctx).unwrap().loss;
        let l2 = split.forward_loss(&batch, &ctx).unwrap().loss;
        let (v1, v2) = (l1.clone().into_scalar(), l2.clone().into_scalar());
        assert!((v1 - v2).abs() < 1e-5, "{objective:?}: loss {v1} vs {v2}");
        let (g1, g2) = (grads_of(&one.model, l1), grads_of(&split.model, l2));
        assert_eq!(g1.len(), g2.len());
        assert!(!g1.is_empty());
        let d = g1
            .iter()
            .zip(&g2)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = g1.iter().fold(0f32, |m, a| m.max(a.abs()));
        assert!(
            scale > 0.0 && d < 1e-5 * scale.max(1.0),
            "{objective:?}: grad diff {d}"
        );
    }
}

#[test]
fn backward_per_task_parts_sum_to_the_batch_loss_and_gradients() {
    let _serial = crate::common::serial();
    let batch = batch();
    let ctx = training_step();
    let m = mixture(&["a", "b"], true);
    let whole = LmModel::new(m.clone(), Objective::TaskRouted);
    let split = LmModel::new(m, Objective::TaskRouted).with_backward_per_task(true);
    assert_eq!(whole.micro_batches(batch.clone()).len(), 1);
    let parts = split.micro_batches(batch.clone());
    assert_eq!(parts.len(), 2, "one part per task");
    for p in &parts {
        assert!(p.task_ids.iter().all(|t| *t == p.task_ids[0]));
    }
    let l1 = whole.forward_loss(&batch, &ctx).unwrap().loss;
    let v1 = l1.clone().into_scalar();
    let g1 = grads_of(&whole.model, l1);
    // forward and backward part by part, gradients summed (what the trainer does)
    let (mut v2, mut g2) = (0.0f32, vec![0.0f32; g1.len()]);
    for p in &parts {
        let l = split.forward_loss(p, &ctx).unwrap().loss;
        v2 += l.clone().into_scalar();
        for (acc, g) in g2.iter_mut().zip(grads_of(&split.model, l)) {
            *acc += g;
        }
    }
    assert!((v1 - v2).abs() < 1e-5, "loss {v1} vs {v2}");
    let d = g1
        .iter()
        .zip(&g2)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = g1.iter().fold(0f32, |m, a| m.max(a.abs()));
    assert!(scale > 0.0 && d < 1e-5 * scale.max(1.0), "grad diff {d}");
    // the Lm objective (a token mean over the whole batch) is never split
    let lm = LmModel::new(mixture(&["a"], false), Objective::Lm).with_backward_per_task(true);
    assert_eq!(lm.micro_batches(batch).len(), 1);
}
