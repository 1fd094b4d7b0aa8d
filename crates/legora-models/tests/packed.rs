//! The packed forward of continuous batching against the reference, the forward over
//! each sequence alone: sequences of different lengths in one step, prompts prefilled in
//! chunks, rows on different experts, the base and router-gated mixtures in one step,
//! two mixtures in one model.

use burn::backend::Flex;
use burn::tensor::Tensor;
use legora_models::{
    CausalLm, Config, Experts, LmInput, PackedSeq, RouterGroup, SeqCache, SeqExperts, Slot,
};
use legora_nn::{InitLoraWeights, LoraConfig, RouterConfig, RouterPooling};

type B = Flex;

fn model(model_type: &str, extra: &str) -> CausalLm<B> {
    let cfg = Config::from_json(&format!(
        r#"{{"model_type": "{model_type}", "vocab_size": 40, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5 {extra}}}"#
    ))
    .unwrap();
    CausalLm::random(cfg.resolve().unwrap(), 0.3, &Default::default()).unwrap()
}

fn lora(r: usize, targets: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init_lora_weights = InitLoraWeights::Random; // B ≠ 0: the adapter changes outputs
    c
}

/// The logits of every position of `tokens` alone, `[seq, vocab]`, with `experts`.
fn alone(m: &CausalLm<B>, tokens: &[u32], experts: Option<Experts<B>>) -> Tensor<B, 2> {
    let mut input = LmInput::from_tokens(&[tokens.to_vec()], &Default::default()).unwrap();
    if let Some(e) = experts {
        input = input.with_experts(e);
    }
    let logits = m.forward(input).unwrap().logits;
    let [_, s, v] = logits.dims();
    logits.reshape([s, v])
}

fn max_diff(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// One sequence of a test: its tokens, experts, and how many tokens each step feeds
/// (0: sits the step out).
struct Plan {
    tokens: Vec<u32>,
    experts: SeqExperts,
    chunks: Vec<usize>,
}

/// Run the plans step by step; returns, per sequence, `(position, logits [1, vocab])` of
/// each step it took part in.
fn run(
    m: &CausalLm<B>,
    plans: &[Plan],
    groups: &[RouterGroup<B>],
) -> Vec<Vec<(usize, Tensor<B, 2>)>> {
    let mut caches: Vec<SeqCache<B>> = plans.iter().map(|_| m.new_seq_cache()).collect();
    let mut fed = vec![0usize; plans.len()];
    let mut out = vec![Vec::new(); plans.len()];
    let steps = plans.iter().map(|p| p.chunks.len()).max().unwrap();
    for step in 0..steps {
        let mut seqs = Vec::new();
        let mut idx = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            let n = p.chunks.get(step).copied().unwrap_or(0);
            if n > 0 {
                seqs.push(PackedSeq {
                    tokens: &p.tokens[fed[i]..fed[i] + n],
                    experts: p.experts,
                    logits: true,
                });
                idx.push(i);
            }
        }
        let mut refs: Vec<&mut SeqCache<B>> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| idx.contains(i))
            .map(|(_, c)| c)
            .collect();
        let logits = m.forward_packed(&seqs, &mut refs, groups).unwrap();
        assert_eq!(logits.dims()[0], seqs.len());
        for (row, &i) in idx.iter().enumerate() {
            fed[i] += seqs[row].tokens.len();
            out[i].push((fed[i] - 1, logits.clone().narrow(0, row, 1)));
        }
    }
    for (i, c) in caches.iter().enumerate() {
        assert_eq!(c.len(), fed[i]);
    }
    out
}

/// Every step's logits equal the reference's at that position.
fn check(name: &str, got: &[(usize, Tensor<B, 2>)], reference: Tensor<B, 2>) {
    for (pos, logits) in got {
        let d = max_diff(logits.clone(), reference.clone().narrow(0, *pos, 1));
        assert!(d < 1e-4, "{name} at position {pos}: {d}");
    }
}

const A: [u32; 9] = [3, 9, 1, 22, 5, 17, 8, 30, 2];
const C: [u32; 6] = [11, 4, 4, 39, 0, 7];

#[test]
fn packed_steps_equal_each_sequence_alone() {
    let _serial = legora_testing::serial();
    for (ty, extra) in [
        ("llama", ""),
        ("qwen2", ""),
        ("mistral", r#", "sliding_window": 3"#),
        ("qwen3", r#", "head_dim": 6"#),
        ("phi3", r#", "sliding_window": 4"#),
        (
            "gemma3_text",
            r#", "head_dim": 6, "sliding_window": 3, "sliding_window_pattern": 2"#,
        ),
    ] {
        let m = model(ty, extra);
        let plans = [
            // a prompt in two chunks, then decoding
            Plan {
                tokens: A.to_vec(),
                experts: SeqExperts::Base,
                chunks: vec![4, 3, 1, 1],
            },
            // joins later, one token at a time
            Plan {
                tokens: vec![5, 6, 7],
                experts: SeqExperts::Base,
                chunks: vec![0, 1, 1, 1],
            },
            Plan {
                tokens: C.to_vec(),
                experts: SeqExperts::Base,
                chunks: vec![2, 0, 4],
            },
        ];
        let got = run(&m, &plans, &[]);
        for (p, g) in plans.iter().zip(&got) {
            check(ty, g, alone(&m, &p.tokens, None));
        }
    }
}

#[test]
fn experts_and_the_base_share_a_step() {
    let _serial = legora_testing::serial();
    let mut m = model("llama", "");
    m.add_adapter("e0", &lora(2, &["q_proj", "v_proj", "up_proj"]))
        .unwrap();
    m.add_adapter("e1", &lora(3, &["v_proj", "down_proj"]))
        .unwrap();
    m.adapters_to_mixture(&["e0", "e1"], None).unwrap();
    let plans = [
        Plan {
            tokens: A.to_vec(),
            experts: SeqExperts::Expert(1),
            chunks: vec![5, 1, 1, 1],
        },
        Plan {
            tokens: C.to_vec(),
            experts: SeqExperts::Base,
            chunks: vec![3, 2, 1],
        },
        Plan {
            tokens: A[..6].to_vec(),
            experts: SeqExperts::Expert(0),
            chunks: vec![0, 4, 1, 1],
        },
    ];
    let got = run(&m, &plans, &[]);
    let per_row = |e: Option<usize>, n| Some(Experts::per_batch_row(&[e], n));
    check("e1", &got[0], alone(&m, &A, per_row(Some(1), A.len())));
    check("base", &got[1], alone(&m, &C, per_row(None, C.len())));
    check("e0", &got[2], alone(&m, &A[..6], per_row(Some(0), 6)));
}

fn routed_mixture(model_type: &str, targets: &[&str], pooling: RouterPooling) -> CausalLm<B> {
    let extra = match model_type {
        "qwen3" => r#", "head_dim": 6"#,
        "gemma3_text" => r#", "head_dim": 6, "sliding_window": 3, "sliding_window_pattern": 2"#,
        _ => "",
    };
    let mut m = model(model_type, extra);
    for e in ["e0", "e1", "e2"] {
        m.add_adapter(e, &lora(2, targets)).unwrap();
    }
    let rc = RouterConfig::new(3).with_top_k(1).with_pooling(pooling);
    m.adapters_to_mixture(&["e0", "e1", "e2"], Some(&rc))
        .unwrap();
    m
}

#[test]
fn router_gated_rows_beside_fixed_rows() {
    let _serial = legora_testing::serial();
    for (ty, targets, pooling) in [
        (
            "llama",
            &["gate_proj", "down_proj"][..],
            RouterPooling::PrefixMean,
        ),
        (
            "llama",
            &["q_proj", "up_proj"][..],
            RouterPooling::PrefixMean,
        ),
        (
            "llama",
            &["q_proj", "o_proj", "up_proj"][..],
            RouterPooling::Token,
        ),
        (
            "qwen3",
            &["q_proj", "k_proj", "up_proj"][..],
            RouterPooling::Token,
        ),
        (
            "phi3",
            &["qkv_proj", "gate_up_proj"][..],
            RouterPooling::Token,
        ),
        (
            "gemma3_text",
            &["q_proj", "up_proj"][..],
            RouterPooling::PrefixMean,
        ),
    ] {
        let m = routed_mixture(ty, targets, pooling);
        let group = m.router_group().expect("layer routers");
        assert_eq!(group.experts, vec![0, 1, 2]);
        let plans = [
            // the prompt in chunks: the prefix mean continues across them
            Plan {
                tokens: A.to_vec(),
                experts: SeqExperts::Routed(0),
                chunks: vec![3, 3, 1, 1, 1],
            },
            Plan {
                tokens: C.to_vec(),
                experts: SeqExperts::Expert(2),
                chunks: vec![2, 1, 1, 1, 1],
            },
            Plan {
                tokens: A[2..].to_vec(),
                experts: SeqExperts::Base,
                chunks: vec![4, 0, 1, 1, 1],
            },
            Plan {
                tokens: C[1..].to_vec(),
                experts: SeqExperts::Routed(0),
                chunks: vec![0, 2, 1, 1, 1],
            },
        ];
        let got = run(&m, &plans, std::slice::from_ref(&group));
        let name = format!("{targets:?}");
        check(&name, &got[0], alone(&m, &A, None));
        check(
            &name,
            &got[1],
            alone(&m, &C, Some(Experts::per_batch_row(&[Some(2)], C.len()))),
        );
        check(
            &name,
            &got[2],
            alone(
                &m,
                &A[2..],
                Some(Experts::per_batch_row(&[None], A.len() - 2)),
            ),
        );
        check(&name, &got[3], alone(&m, &C[1..], None));
    }
}

/// The experts of `from`'s mixture slots appended to `into`'s (absent ones too), in
/// order, on every slot of the model.
fn append_experts(into: &mut CausalLm<B>, from: &CausalLm<B>, prefix: &str) {
    let n = from.num_experts().unwrap();
    for (id, slot) in from.slots() {
        let names: Vec<String> = (0..n).map(|e| format!("{prefix}{e}")).collect();
        let target = into.slot_mut(id).unwrap().as_moe_mut(id).unwrap();
        for (e, name) in names.iter().enumerate() {
            match slot {
                Slot::Moe(m) if m.expert(e).is_some() => target
                    .insert_expert(name, m.expert(e).unwrap().clone())
                    .unwrap(),
                _ => target.insert_absent_expert(name).unwrap(),
            }
        }
    }
}

#[test]
fn two_mixtures_and_an_adapter_in_one_model() {
    let _serial = legora_testing::serial();
    let base = model("llama", "");
    // Mixture a: experts on attention and the MLP (its routers read the attention input).
    let mut ma = base.clone();
    for e in ["a0", "a1"] {
        ma.add_adapter(e, &lora(2, &["q_proj", "up_proj"])).unwrap();
    }
    let rc = RouterConfig::new(2).with_top_k(1);
    ma.adapters_to_mixture(&["a0", "a1"], Some(&rc)).unwrap();
    // Mixture b: MLP experts, prefix-mean routers on the MLP input, dense gates.
    let mut mb = base.clone();
    for e in ["b0", "b1", "b2"] {
        mb.add_adapter(e, &lora(3, &["gate_proj", "down_proj"]))
            .unwrap();
    }
    let rc = RouterConfig::new(3).with_pooling(RouterPooling::PrefixMean);
    mb.adapters_to_mixture(&["b0", "b1", "b2"], Some(&rc))
        .unwrap();
    // A plain adapter.
    let mut mc = base.clone();
    mc.add_adapter("c", &lora(4, &["v_proj", "down_proj"]))
        .unwrap();
    let mut mc_moe = mc.clone();
    mc_moe.adapters_to_mixture(&["c"], None).unwrap();

    let mut all = base.clone();
    append_experts(&mut all, &ma, "a");
    append_experts(&mut all, &mb, "b");
    append_experts(&mut all, &mc_moe, "c");
    assert_eq!(all.num_experts(), Some(6));
    let mut ga = ma.router_group().unwrap();
    ga.experts = vec![0, 1];
    let mut gb = mb.router_group().unwrap();
    gb.experts = vec![2, 3, 4];
    let plans = [
        Plan {
            tokens: A.to_vec(),
            experts: SeqExperts::Routed(1),
            chunks: vec![4, 2, 2, 1],
        },
        Plan {
            tokens: C.to_vec(),
            experts: SeqExperts::Routed(0),
            chunks: vec![3, 1, 1, 1],
        },
        Plan {
            tokens: A[1..].to_vec(),
            experts: SeqExperts::Expert(5),
            chunks: vec![2, 2, 1, 1],
        },
        Plan {
            tokens: C.to_vec(),
            experts: SeqExperts::Base,
            chunks: vec![1, 1, 1, 1],
        },
    ];
    let got = run(&all, &plans, &[ga, gb]);
    check("mixture b", &got[0], alone(&mb, &A, None));
    check("mixture a", &got[1], alone(&ma, &C, None));
    check("adapter c", &got[2], alone(&mc, &A[1..], None));
    check("base", &got[3], alone(&base, &C, None));
}

#[test]
fn caches_grow_geometrically_and_bad_steps_are_errors() {
    let _serial = legora_testing::serial();
    let m = model("llama", "");
    let mut c = m.new_seq_cache();
    assert_eq!((c.len(), c.capacity(), c.bytes()), (0, 0, 0));
    let step = |m: &CausalLm<B>, c: &mut SeqCache<B>, tokens: &[u32], experts| {
        let seqs = [PackedSeq {
            tokens,
            experts,
            logits: false,
        }];
        m.forward_packed(&seqs, &mut [c], &[])
    };
    let out = step(&m, &mut c, &A[..5], SeqExperts::Base).unwrap();
    assert_eq!(out.dims(), [0, 40], "no row asked for logits");
    // 16 positions × 2 kv heads × 4 dims × (k, v) × 2 layers × 4 bytes
    assert_eq!((c.len(), c.capacity(), c.bytes()), (5, 16, 2048));
    for _ in 0..3 {
        step(&m, &mut c, &A[..4], SeqExperts::Base).unwrap();
    }
    assert_eq!((c.len(), c.capacity()), (17, 32));
    // Bad input: errors naming the problem; the cache is untouched.
    let errors = [
        step(&m, &mut c, &[], SeqExperts::Base),
        step(&m, &mut c, &[40], SeqExperts::Base),
        step(&m, &mut c, &[1], SeqExperts::Expert(0)),
        step(&m, &mut c, &[1], SeqExperts::Routed(0)),
    ];
    for (e, want) in errors
        .into_iter()
        .zip(["no new tokens", "vocabulary", "expert 0", "group 0"])
    {
        let e = e.unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let mut other = SeqCache::<B>::new(3);
    let seqs = [PackedSeq {
        tokens: &[1],
        experts: SeqExperts::Base,
        logits: true,
    }];
    assert!(m.forward_packed(&seqs, &mut [&mut other], &[]).is_err());
    assert_eq!(c.len(), 17);
    assert!(step(&m, &mut c, &[1], SeqExperts::Base).is_ok());
}
