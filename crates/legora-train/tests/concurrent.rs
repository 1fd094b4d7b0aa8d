//! Concurrent (task-routed) expert training equals training each expert alone on the
//! same rows in the same order with the same seed: the mLoRA/BatchLoRA claim, on a real
//! (tiny, random) Llama with adapters on every linear layer.

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use legora_data::{
    prepare_task, Batcher, ByteTokenizer, Loader, Mixing, Record, Template, TokenizeOptions,
};
use legora_models::{CausalLm, Config, Slot};
use legora_nn::{LoraConfig, TargetModules};
use legora_train::{LmModel, Objective, TrainSettings, Trainer};

type AD = Autodiff<Flex>;

fn tiny_model() -> CausalLm<AD> {
    let cfg = Config::from_json(
        r#"{"model_type": "llama", "vocab_size": 260, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}"#,
    )
    .unwrap();
    CausalLm::<AD>::random(cfg.resolve().unwrap(), 0.2, &Default::default()).unwrap()
}

fn records(task: &str, n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::completion(task, format!("{task} q{i}:"), format!(" a{}", (i * 7) % 10)))
        .collect()
}

fn vals(t: burn::tensor::Tensor<Flex, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn concurrent_experts_equal_experts_trained_alone() {
    let _serial = crate::common::serial();
    // whole batches, and forward + backward per task with summed gradients
    for per_task in [false, true] {
        concurrent_equals_alone(per_task);
    }
}

fn concurrent_equals_alone(per_task: bool) {
    let tok = ByteTokenizer;
    let opts = TokenizeOptions::new(64);
    let names = ["beta", "alpha"];
    let examples: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            prepare_task(&records(n, 12), i, &Template::Raw, &tok, &opts)
                .unwrap()
                .0
        })
        .collect();
    let batcher = Batcher::for_tokenizer(&tok);
    let lora = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        init_lora_weights: legora_nn::InitLoraWeights::Random,
        ..LoraConfig::default()
    };
    let mut settings = TrainSettings::new(5, 11);
    settings.learning_rate = 1e-2;
    settings.max_grad_norm = None; // global-norm clipping couples experts by design
    settings.weight_decay = 0.01;
    settings.warmup_steps = 1;

    // concurrent: both experts in one task-routed mixture, balanced batches of 2 + 2 rows
    let mut model = tiny_model();
    for n in names {
        model.add_adapter(n, &lora).unwrap();
    }
    model.adapters_to_mixture(&names, None).unwrap();
    let initial = model.clone();
    let mut loader = Loader::new(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(examples.iter().cloned())
            .collect(),
        Mixing::Balanced,
        3,
        batcher,
        4,
        None,
    )
    .unwrap();
    settings.batch_size = 4;
    let dir = tempdir(&format!("concurrent-{per_task}"));
    let res = Trainer::new("experts", &dir, settings.clone())
        .run(
            LmModel::new(model, Objective::TaskRouted).with_backward_per_task(per_task),
            &mut loader,
            &[],
            &Default::default(),
        )
        .unwrap();
    let together = res.model.model.valid();

    for (e, name) in names.iter().enumerate() {
        // alone: a plain LoRA model holding only this expert's initial weights, fed only
        // this task's rows (balanced sampling gives each task the same order either way)
        let mut alone = initial.clone();
        for p in initial.slot_ids() {
            let Ok(Slot::Moe(m)) = initial.slot(p) else {
                continue;
            };
            let base = alone.slot_mut(p).unwrap();
            let mut l =
                legora_nn::LoraLinear::new(m.weight.val(), m.bias.as_ref().map(|b| b.val()))
                    .unwrap();
            l.insert_adapter(name, m.experts[e].clone()).unwrap();
            *base = Slot::Lora(l);
        }
        let mut single_loader = Loader::new(
            vec![(
                name.to_string(),
                examples[e]
                    .iter()
                    .cloned()
                    .map(|mut x| {
                        x.task = 0;
                        x
                    })
                    .collect(),
            )],
            Mixing::Balanced,
            3,
            batcher,
            2,
            None,
        )
        .unwrap();
        let mut s = settings.clone();
        s.batch_size = 2;
        let dir = tempdir(&format!("{name}-{per_task}"));
        let res = Trainer::new("alone", &dir, s)
            .run(
                LmModel::new(alone, Objective::Lm),
                &mut single_loader,
                &[],
                &Default::default(),
            )
            .unwrap();
        let alone = res.model.model.valid();
        let mut compared = 0;
        for p in together.slot_ids() {
            let Ok(Slot::Moe(m)) = together.slot(p) else {
                continue;
            };
            let Ok(Slot::Lora(l)) = alone.slot(p) else {
                panic!("{p} lost its adapter")
            };
            let a = l.adapter(name).unwrap();

            for (x, y) in [
                (vals(m.experts[e].lora_A.val()), vals(a.lora_A.val())),
                (vals(m.experts[e].lora_B.val()), vals(a.lora_B.val())),
            ] {
                let diff = x
                    .iter()
                    .zip(&y)
                    .fold(0f32, |d, (p, q)| d.max((p - q).abs()));
                assert!(
                    diff < 1e-5,
                    "{name} at {p} (per_task {per_task}): max diff {diff}"
                );
            }
            // and training really moved it
            let init = match initial.slot(p).unwrap() {
                Slot::Moe(m0) => vals(m0.experts[e].lora_B.val().inner()),
                _ => unreachable!(),
            };
            assert_ne!(init, vals(m.experts[e].lora_B.val()));
            compared += 1;
        }
        assert_eq!(compared, 14, "2 layers x 7 projections");
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("legora-concurrent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn padding_does_not_change_real_tokens() {
    let _serial = crate::common::serial();
    use legora_models::LmInput;
    let model = tiny_model().valid();
    let dev = Default::default();
    let row = vec![5u32, 9, 33, 70, 2];
    let a = LmInput::<Flex>::from_tokens(std::slice::from_ref(&row), &dev).unwrap();
    let mut padded = row.clone();
    padded.extend([258, 258, 258]);
    let mask: burn::tensor::Tensor<Flex, 2, burn::tensor::Int> = burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(vec![1i64, 1, 1, 1, 1, 0, 0, 0], [1, 8]),
        &dev,
    );
    let b = LmInput::<Flex>::from_tokens(&[padded], &dev)
        .unwrap()
        .with_attention_mask(mask);
    let la: Vec<f32> = model
        .forward(a)
        .unwrap()
        .logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let lb: Vec<f32> = model
        .forward(b)
        .unwrap()
        .logits
        .narrow(1, 0, 5)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let diff = la
        .iter()
        .zip(&lb)
        .fold(0f32, |d, (p, q)| d.max((p - q).abs()));
    assert!(diff < 1e-5, "{diff}");
}
