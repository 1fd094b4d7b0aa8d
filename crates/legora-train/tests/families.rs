//! Every model family trains a router-gated mixture: two LoRA experts on every
//! projection and a top-1 router per layer over a tiny random model of each family
//! (Qwen3 with its per-head q/k norms and a head_dim that is not hidden / heads, Phi-3
//! with its fused qkv_proj / gate_up_proj as single expert slots, Gemma 3 with a local
//! layer of window 3 and a global one), three
//! steps of the `Routed` objective through `Trainer::run`, experts and routers moving.

use super::common;

use common::*;
use legora_data::Mixing;
use legora_models::CausalLm;
use legora_nn::RouterConfig;
use legora_train::*;

fn mixture(model_type: &str, extra: &str) -> CausalLm<AD> {
    let mut m = tiny_random(model_type, extra, 5);
    let lora = all_linear_lora();
    for name in ["a", "b"] {
        m.add_adapter(name, &lora).unwrap();
    }
    let rc = RouterConfig::new(2).with_top_k(1).with_aux_loss(0.01);
    m.adapters_to_mixture(&["a", "b"], Some(&rc)).unwrap();
    m
}

#[test]
fn a_router_gated_mixture_trains_on_every_family() {
    let _serial = common::serial();
    let device = Default::default();
    for (ty, extra) in [
        ("llama", ""),
        ("qwen2", ""),
        ("mistral", r#", "sliding_window": 8"#),
        ("qwen3", r#", "head_dim": 6"#),
        ("phi3", r#", "sliding_window": 8"#),
        (
            "gemma3_text",
            r#", "head_dim": 6, "sliding_window": 3, "sliding_window_pattern": 2"#,
        ),
    ] {
        let objective = Objective::Routed {
            routing_loss_coef: 0.1,
        };
        let m = LmModel::new(mixture(ty, extra), objective);
        let start = trainable_values(&m);
        let mut settings = TrainSettings::new(3, 5);
        settings.learning_rate = 5e-2;
        settings.batch_size = 4;
        let mut l = loader(3, 4, Mixing::Uniform);
        let out = Trainer::new("experts", tmp_dir(&format!("family-{ty}")), settings)
            .run(m, &mut l, &[], &device)
            .unwrap();
        assert_eq!(out.summary.steps, 3, "{ty}");
        let end = trainable_values(&out.model);
        assert!(max_abs_diff(&end, &start) > 1e-3, "{ty}: nothing trained");
        let routers = end.iter().filter(|(p, _)| p.contains("router")).count();
        assert_eq!(routers, 2, "{ty}: one router per layer");
        assert!(
            end.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())),
            "{ty}"
        );
    }
}
