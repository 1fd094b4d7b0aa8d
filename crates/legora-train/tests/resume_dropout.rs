//! Exact resume with LoRA dropout: the trainer re-seeds the backend RNG at every step
//! from (seed, step), so the dropout masks after a resume are the ones an uninterrupted
//! run draws. Alone in its own test binary: the backend RNG is process-global, and a
//! concurrently running test would draw from it.

use super::common;

use common::*;
use legora_data::Mixing;
use legora_train::*;

#[test]
fn resume_is_exact_with_dropout() {
    let _serial = crate::common::serial();
    let device = Default::default();
    let mut s = TrainSettings::new(6, 11);
    s.learning_rate = 5e-2;
    s.batch_size = 4;
    let run = |dir: &std::path::Path, stop: Option<usize>, resume: bool| {
        let mut l = loader(2, 4, Mixing::Uniform);
        Trainer::new("experts", dir, s.clone())
            .stop_after(stop)
            .resume(resume)
            .run(
                Toy::<AD>::with_dropout(9, 2, 0.3, &device),
                &mut l,
                &[],
                &device,
            )
            .unwrap()
    };
    let full = run(&tmp_dir("dropout-a"), None, false);
    let dir = tmp_dir("dropout-b");
    run(&dir, Some(3), false);
    let resumed = run(&dir, None, true);
    let d = max_abs_diff(
        &trainable_values(&full.model),
        &trainable_values(&resumed.model),
    );
    assert!(d <= 1e-6, "resumed adapters differ by {d}");
    // dropout is really on: a run with another seed ends elsewhere
    let mut other = s.clone();
    other.seed = 12;
    let mut l = loader(2, 4, Mixing::Uniform);
    let o = Trainer::new("experts", tmp_dir("dropout-c"), other)
        .run(
            Toy::<AD>::with_dropout(9, 2, 0.3, &device),
            &mut l,
            &[],
            &device,
        )
        .unwrap();
    assert!(max_abs_diff(&trainable_values(&full.model), &trainable_values(&o.model)) > 1e-4);
}
