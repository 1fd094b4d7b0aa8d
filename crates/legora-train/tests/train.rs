//! The training loop on a toy model made of legora-nn layers: exact resume, NaN guard,
//! gradient accumulation, early stopping, clipping, metrics.

use super::common;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use common::*;
use legora_data::Mixing;
use legora_train::*;

fn settings(total: usize) -> TrainSettings {
    let mut s = TrainSettings::new(total, 7);
    s.learning_rate = 5e-2;
    s.batch_size = 4;
    s.warmup_steps = 2;
    s.schedule = ScheduleKind::Cosine;
    s.max_grad_norm = Some(0.5);
    s.weight_decay = 0.01;
    s.gradient_accumulation_steps = 2;
    s.eval_steps = Some(3);
    s
}

fn val_sets() -> Vec<ValSet> {
    let mut l = loader(99, 4, Mixing::Balanced);
    vec![ValSet {
        task: "all".into(),
        batches: (0..2).map(|_| l.next_batch().unwrap()).collect(),
    }]
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let total = 9;
    let val = val_sets();

    let dir_a = tmp_dir("resume-a");
    let mut la = loader(5, 4, Mixing::Temperature { temperature: 2.0 });
    let a = Trainer::new("experts", &dir_a, settings(total))
        .run(Toy::<AD>::new(1, 2, &device), &mut la, &val, &device)
        .unwrap();
    assert_eq!(a.summary.stop, StopReason::Completed);
    assert_eq!(a.summary.steps, total);

    // stop after 4 steps ("killed"), then a new process rebuilds model and data and resumes
    let dir_b = tmp_dir("resume-b");
    let mut lb = loader(5, 4, Mixing::Temperature { temperature: 2.0 });
    let b1 = Trainer::new("experts", &dir_b, settings(total))
        .stop_after(Some(4))
        .run(Toy::<AD>::new(1, 2, &device), &mut lb, &val, &device)
        .unwrap();
    assert_eq!(b1.summary.stop, StopReason::Interrupted { step: 4 });
    drop(b1);
    let mut lb2 = loader(5, 4, Mixing::Temperature { temperature: 2.0 });
    let fresh = Toy::<AD>::new(1, 2, &device); // new parameter ids, untrained values
    assert!(max_abs_diff(&trainable_values(&fresh), &trainable_values(&a.model)) > 1e-3);
    let b2 = Trainer::new("experts", &dir_b, settings(total))
        .resume(true)
        .run(fresh, &mut lb2, &val, &device)
        .unwrap();
    assert_eq!(b2.summary.steps_this_run, total - 4);
    let diff = max_abs_diff(&trainable_values(&a.model), &trainable_values(&b2.model));
    assert!(diff <= 1e-6, "resumed adapters differ by {diff}");
    assert_eq!(a.summary.best_val_loss, b2.summary.best_val_loss);

    // metrics.jsonl of the resumed run has each step once, like the uninterrupted one
    let steps = |dir: &std::path::Path| -> Vec<usize> {
        read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                MetricLine::Train(t) => Some(t.step),
                _ => None,
            })
            .collect()
    };
    assert_eq!(steps(&dir_b), (1..=total).collect::<Vec<_>>());
    assert_eq!(steps(&dir_a), steps(&dir_b));
    // the frozen base never enters a checkpoint
    let ckpt = latest_checkpoint(&dir_b.join("checkpoints"))
        .unwrap()
        .unwrap();
    let bytes = std::fs::read(ckpt.join("trainable.safetensors")).unwrap();
    let saved = tensors_from_safetensors(&bytes, &ckpt).unwrap();
    assert!(
        saved.keys().all(|k| k.contains("lora_")),
        "{:?}",
        saved.keys()
    );
    assert_eq!(saved.len(), 2 * 2 * 2); // 2 layers × 2 experts × (A, B)
}

#[test]
fn nan_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let dir = tmp_dir("nan");
    let mut s = settings(10);
    s.save_steps = Some(2);
    s.eval_steps = None;
    let mut model = Toy::<AD>::new(3, 2, &device);
    model.poison_at = Some(5); // the 6th step's loss is NaN
    let mut l = loader(5, 4, Mixing::Uniform);
    let err = Trainer::new("experts", &dir, s.clone())
        .run(model, &mut l, &[], &device)
        .unwrap_err();
    let ckpt = dir.join("checkpoints").join("step-000004");
    match &err {
        TrainError::NonFinite {
            step,
            quantity,
            last_checkpoint,
            ..
        } => {
            assert_eq!(*step, 5);
            assert_eq!(quantity, "loss");
            assert_eq!(last_checkpoint.as_deref(), Some(ckpt.as_path()));
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    assert!(err.to_string().contains("step 5: loss is NaN"), "{err}");
    assert_eq!(
        latest_checkpoint(&dir.join("checkpoints")).unwrap(),
        Some(ckpt.clone())
    );
    // the kept checkpoint holds exactly the state after 4 good steps
    let dir4 = tmp_dir("nan-ref");
    let mut l4 = loader(5, 4, Mixing::Uniform);
    let mut s4 = s;
    s4.total_steps = 10;
    let four = Trainer::new("experts", &dir4, s4)
        .stop_after(Some(4))
        .run(Toy::<AD>::new(3, 2, &device), &mut l4, &[], &device)
        .unwrap();
    let restored = load_trainable(
        Toy::<AD>::new(3, 2, &device),
        &ckpt.join("trainable.safetensors"),
        &device,
    )
    .unwrap();
    let d = max_abs_diff(&trainable_values(&four.model), &trainable_values(&restored));
    assert!(d <= 1e-6, "{d}");
    assert_eq!(read_state(&ckpt).unwrap().step, 4);
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    let _serial = crate::common::serial();
    // Every toy row has the same number of targets, so the mean of two micro-batch means
    // equals the mean over the merged batch, and the loader hands out the same rows.
    let device = Default::default();
    let mut two = settings(3);
    two.eval_steps = None;
    two.batch_size = 2;
    two.gradient_accumulation_steps = 2;
    let mut one = two.clone();
    one.batch_size = 4;
    one.gradient_accumulation_steps = 1;
    let mut la = loader(8, 2, Mixing::Proportional);
    let mut lb = loader(8, 4, Mixing::Proportional);
    let a = Trainer::new("x", tmp_dir("accum-a"), two)
        .run(Toy::<AD>::new(4, 2, &device), &mut la, &[], &device)
        .unwrap();
    let b = Trainer::new("x", tmp_dir("accum-b"), one)
        .run(Toy::<AD>::new(4, 2, &device), &mut lb, &[], &device)
        .unwrap();
    let d = max_abs_diff(&trainable_values(&a.model), &trainable_values(&b.model));
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn early_stopping_restores_the_best_weights() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let dir = tmp_dir("early");
    let mut s = settings(20);
    s.eval_steps = Some(2);
    s.early_stopping_patience = Some(2);
    // no later validation can beat the first one by this much
    s.early_stopping_threshold = 1e9;
    let val = val_sets();
    let mut l = loader(5, 4, Mixing::Uniform);
    let r = Trainer::new("router", &dir, s.clone())
        .run(Toy::<AD>::new(6, 2, &device), &mut l, &val, &device)
        .unwrap();
    assert_eq!(r.summary.stop, StopReason::EarlyStopped { best_step: 2 });
    assert_eq!(r.summary.steps, 6); // evals at 2 (best), 4, 6 (2 without improvement)
                                    // the returned model is the one after step 2
    let mut l2 = loader(5, 4, Mixing::Uniform);
    let two = Trainer::new("router", tmp_dir("early-ref"), s)
        .stop_after(Some(2))
        .run(Toy::<AD>::new(6, 2, &device), &mut l2, &val, &device)
        .unwrap();
    let d = max_abs_diff(&trainable_values(&r.model), &trainable_values(&two.model));
    assert!(d <= 1e-6, "{d}");
    let evals: Vec<EvalMetrics> = read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            MetricLine::Eval(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[0].is_best && !evals[1].is_best);
    let routing = evals[0].routing.as_ref().unwrap();
    assert_eq!(routing.load[0], vec![0.5, 0.5]);
    assert_eq!(evals[0].task_losses.len(), 1);
}

#[derive(Module, Debug)]
struct Two<B: burn::tensor::backend::Backend> {
    a: burn::module::Param<Tensor<B, 1>>,
    b: burn::module::Param<Tensor<B, 2>>,
    frozen: burn::module::Param<Tensor<B, 1>>,
}

#[test]
fn global_norm_clipping_matches_hand_computation() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let p1 = |v: Vec<f32>, n| Tensor::<AD, 1>::from_data(TensorData::new(v, [n]), &device);
    let m = Two::<AD> {
        a: burn::module::Param::from_tensor(p1(vec![0.0; 2], 2)),
        b: burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.0f32; 2], [1, 2]),
            &device,
        )),
        frozen: burn::module::Param::from_tensor(p1(vec![1.0; 2], 2)).set_require_grad(false),
    };
    // loss = 3·a0 + 4·a1 + 12·b00 + 0·b01 + 100·Σ frozen → grads (3, 4) and (12, 0);
    // global norm = sqrt(9 + 16 + 144) = 13 (the frozen parameter has no gradient)
    let loss = (m.a.val() * p1(vec![3.0, 4.0], 2)).sum()
        + (m.b.val() * Tensor::from_data(TensorData::new(vec![12.0f32, 0.0], [1, 2]), &device))
            .sum()
        + m.frozen.val().sum() * 100.0;
    let mut grads = GradientsParams::from_grads(loss.backward(), &m);
    assert!((global_grad_norm::<AD, _>(&m, &grads) - 13.0).abs() < 1e-5);
    let norm = clip_grad_norm::<AD, _>(&m, &mut grads, 6.5);
    assert!((norm - 13.0).abs() < 1e-5);
    // coef = 6.5 / (13 + 1e-6): every gradient halves, the norm becomes 6.5
    let coef = 6.5 / (13.0 + 1e-6);
    let ga: Vec<f32> = grads
        .get::<Inner, 1>(m.a.id)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let gb: Vec<f32> = grads
        .get::<Inner, 2>(m.b.id)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    for (g, want) in ga.iter().chain(&gb).zip([3.0, 4.0, 12.0, 0.0]) {
        assert!(
            (f64::from(*g) - want * coef).abs() < 1e-5,
            "{g} vs {}",
            want * coef
        );
    }
    assert!((global_grad_norm::<AD, _>(&m, &grads) - 6.5).abs() < 1e-5);
    assert!(grads.get::<Inner, 1>(m.frozen.id).is_none());
    // below the threshold nothing changes
    let before = global_grad_norm::<AD, _>(&m, &grads);
    clip_grad_norm::<AD, _>(&m, &mut grads, 100.0);
    assert!((global_grad_norm::<AD, _>(&m, &grads) - before).abs() < 1e-9);
}

#[test]
fn checkpoint_refuses_a_model_that_does_not_fit() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let dir = tmp_dir("mismatch");
    let mut s = settings(2);
    s.eval_steps = None;
    let mut l = loader(5, 4, Mixing::Uniform);
    Trainer::new("experts", &dir, s.clone())
        .run(Toy::<AD>::new(1, 2, &device), &mut l, &[], &device)
        .unwrap();
    // three experts: lora tensors of expert 2 are not in the checkpoint
    let mut l = loader(5, 4, Mixing::Uniform);
    let e = Trainer::new("experts", &dir, s.clone())
        .resume(true)
        .run(Toy::<AD>::new(1, 3, &device), &mut l, &[], &device)
        .unwrap_err();
    assert!(e.to_string().contains("experts.2.lora_A"), "{e}");
    // a checkpoint of another stage is refused
    let mut l = loader(5, 4, Mixing::Uniform);
    let e = Trainer::new("router", &dir, s)
        .resume(true)
        .run(Toy::<AD>::new(1, 2, &device), &mut l, &[], &device)
        .unwrap_err();
    assert!(e.to_string().contains("found stage `experts`"), "{e}");
}
