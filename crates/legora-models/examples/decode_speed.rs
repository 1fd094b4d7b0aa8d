//! Decode speed of [`CausalLm::forward_packed`] on a random-weight SmolLM-135M-shape
//! Llama (hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152): `n`
//! sequences of a 32-token prompt decode 32 steps together; with `n = 1` it also times
//! [`CausalLm::generate`] on the same prompt.
//!
//! ```text
//! cargo run --release -p legora-models --example decode_speed -- [n]
//! ```

use std::time::Instant;

use burn::backend::Flex;
use legora_models::{CausalLm, Config, GenerationConfig, PackedSeq, SeqCache, SeqExperts};

type B = Flex;

const SMOLLM_135M: &str = r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "tie_word_embeddings": true, "max_position_embeddings": 2048}"#;

/// One packed step of every sequence over `tokens`; the logits read back to the host.
fn step(m: &CausalLm<B>, caches: &mut [SeqCache<B>], tokens: &[u32]) -> Vec<f32> {
    let seqs: Vec<PackedSeq> = caches
        .iter()
        .map(|_| PackedSeq {
            tokens,
            experts: SeqExperts::Base,
            logits: true,
        })
        .collect();
    let mut refs: Vec<&mut SeqCache<B>> = caches.iter_mut().collect();
    let logits = m
        .forward_packed(&seqs, &mut refs, &[])
        .expect("packed step");
    logits.into_data().to_vec().expect("f32 logits")
}

fn main() {
    let cfg = Config::from_json(SMOLLM_135M).expect("config");
    let m = CausalLm::<B>::random(cfg.resolve().expect("resolve"), 0.02, &Default::default())
        .expect("model");
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("n: a number of sequences"))
        .unwrap_or(1);
    let steps = 32;
    let prompt: Vec<u32> = (0..32).map(|i| i * 7 + 1).collect();
    let mut caches: Vec<SeqCache<B>> = (0..n).map(|_| m.new_seq_cache()).collect();
    step(&m, &mut caches, &prompt);
    let t = Instant::now();
    for s in 0..steps {
        let token = [(s as u32 * 13) % 49152];
        std::hint::black_box(step(&m, &mut caches, &token));
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "packed n={n}: {:.1} ms/step, {:.1} tok/s aggregate",
        dt * 1e3 / steps as f64,
        (n * steps) as f64 / dt
    );
    if n == 1 {
        let t = Instant::now();
        let out = m
            .generate(&[prompt], &GenerationConfig::greedy(steps), None)
            .expect("generate");
        let dt = t.elapsed().as_secs_f64();
        println!(
            "generate: {:.1} tok/s (prefill included)",
            out[0].len() as f64 / dt
        );
    }
}
