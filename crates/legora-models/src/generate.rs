//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p),
//! repetition penalty, stop tokens, `max_new_tokens`; batched with left padding.
//!
//! Follows transformers' `GenerationMixin._sample`: prompts are left-padded, positions
//! are `cumsum(mask) - 1`, logits processors run in HF's order (repetition penalty, then
//! — only when sampling — temperature, top-k, top-p), a finished row keeps receiving the
//! pad token until every row is done. Logits processing runs on the host, one
//! `[batch, vocab]` row set per step.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::TokenIds;
use crate::decoder::{CausalLm, LmInput};
use crate::error::{ModelError, Result};

/// Tokens generated at most when nothing says otherwise (transformers' default).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

fn default_max_new() -> Option<usize> {
    Some(DEFAULT_MAX_NEW_TOKENS)
}
fn default_top_k() -> Option<usize> {
    Some(50)
}

/// Decoding settings; reads generation_config.json (HF keys and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Tokens to generate at most (default 20).
    #[serde(default = "default_max_new")]
    pub max_new_tokens: Option<usize>,
    /// Sample (`true`) or take the argmax (`false`, default).
    #[serde(default)]
    pub do_sample: bool,
    /// Softmax temperature when sampling (default 1).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens when sampling (default 50; `null`/0 = off).
    #[serde(default = "default_top_k")]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass (default 1 = off).
    #[serde(default)]
    pub top_p: Option<f64>,
    /// CTRL repetition penalty (default 1 = off): seen tokens' positive logits are
    /// divided by it, negative ones multiplied.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Stop token(s); generation of a row ends after emitting one.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Token used for left padding and for finished rows (default: the first eos, else 0).
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    /// Beginning-of-sequence token (informational).
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// RNG seed for sampling (legora's key; HF has none).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Every other key, kept.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl GenerationConfig {
    /// `max_new_tokens`, or [`DEFAULT_MAX_NEW_TOKENS`] when unset.
    pub fn max_new(&self) -> usize {
        self.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS)
    }

    /// Greedy decoding of `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens: Some(max_new_tokens),
            ..Self::default()
        }
    }

    /// Parse generation_config.json text.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig {
            field: "generation_config.json".into(),
            expected: "a transformers GenerationConfig".into(),
            found: e.to_string(),
        })
    }

    /// The stop tokens.
    pub fn stop_tokens(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|t| t.to_vec())
            .unwrap_or_default()
    }

    /// The padding token.
    pub fn pad_token(&self) -> u32 {
        self.pad_token_id
            .as_ref()
            .and_then(|t| t.to_vec().first().copied())
            .or_else(|| self.stop_tokens().first().copied())
            .unwrap_or(0)
    }

    /// Check the values' domains; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.temperature {
            if self.do_sample && !(t > 0.0 && t.is_finite()) {
                return Err(ModelError::config("temperature", "a finite number > 0", t));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ModelError::config("top_p", "a value in (0, 1]", p));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return Err(ModelError::config(
                    "repetition_penalty",
                    "a finite number > 0",
                    r,
                ));
            }
        }
        Ok(())
    }
}

/// `RepetitionPenaltyLogitsProcessor`: for every token in `seen`, a positive logit is
/// divided by `penalty`, a negative one multiplied.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let l = logits[t];
            logits[t] = if l < 0.0 { l * penalty } else { l / penalty };
        }
    }
}

/// `TopKLogitsWarper`: tokens below the k-th largest logit get `-inf` (ties kept).
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for l in logits.iter_mut() {
        if *l < kth {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper`: keep the smallest set of most likely tokens whose probability
/// mass reaches `top_p` (at least one token); the others get `-inf`.
pub fn top_p_filter(logits: &mut [f32], top_p: f64) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // sorted ascending, as transformers does
    order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(a.cmp(&b)));
    let mut cum = 0.0f64;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i] as f64;
        // sorted_indices_to_remove = cumulative_probs <= (1 - top_p); keep the last one
        if cum <= 1.0 - top_p && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax of a logit row (in f64 for the sum).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Index of the largest logit (first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draw from softmax(logits).
pub fn sample(logits: &[f32], rng: &mut impl Rng) -> u32 {
    let probs = softmax(logits);
    let u: f64 = rng.random();
    let mut cum = 0.0f64;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last_nonzero = i;
        }
        cum += p as f64;
        if u < cum {
            return i as u32;
        }
    }
    last_nonzero as u32
}

/// Choose the next token of one row from its logits.
pub fn next_token(
    logits: &mut [f32],
    seen: &[u32],
    cfg: &GenerationConfig,
    rng: &mut impl Rng,
) -> u32 {
    apply_repetition_penalty(logits, seen, cfg.repetition_penalty.unwrap_or(1.0) as f32);
    if !cfg.do_sample {
        return argmax(logits);
    }
    let t = cfg.temperature.unwrap_or(1.0) as f32;
    if t != 1.0 {
        for l in logits.iter_mut() {
            *l /= t;
        }
    }
    if let Some(k) = cfg.top_k {
        top_k_filter(logits, k);
    }
    top_p_filter(logits, cfg.top_p.unwrap_or(1.0));
    sample(logits, rng)
}

impl<B: Backend> CausalLm<B> {
    /// Generate a continuation of every prompt (batched, left-padded, KV-cached).
    ///
    /// Returns the new tokens of each row, up to and including its stop token.
    /// `task_ids` routes row `b` to expert `task_ids[b]` in task-routed mixtures.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        task_ids: Option<&[usize]>,
    ) -> Result<Vec<Vec<u32>>> {
        cfg.validate()?;
        let vocab = self.config().vocab_size;
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(ModelError::Input("generate needs non-empty prompts".into()));
        }
        if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size = {vocab})"
            )));
        }
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let context = self.config().max_position_embeddings;
        if len >= context {
            return Err(ModelError::Input(format!(
                "the prompt is {len} tokens long: it does not fit the model's context \
                 (max_position_embeddings = {context})"
            )));
        }
        // Generation stops at the model's context length.
        let max_new = cfg.max_new().min(context - len);
        let b = prompts.len();
        if max_new == 0 {
            return Ok(vec![Vec::new(); b]);
        }
        let device = self.model.embed_tokens.device();
        let pad = cfg.pad_token();
        let stops = cfg.stop_tokens();
        let mut ids = Vec::with_capacity(b * len);
        let mut mask = Vec::with_capacity(b * len);
        for p in prompts {
            ids.extend(std::iter::repeat_n(pad as i64, len - p.len()));
            ids.extend(p.iter().map(|&t| t as i64));
            mask.extend(std::iter::repeat_n(0i64, len - p.len()));
            mask.extend(std::iter::repeat_n(1i64, p.len()));
        }
        let mut mask_t: Tensor<B, 2, Int> =
            Tensor::from_data(TensorData::new(mask, [b, len]), &device);
        let mut input = LmInput::new(Tensor::from_data(TensorData::new(ids, [b, len]), &device))
            .with_attention_mask(mask_t.clone());
        if let Some(t) = task_ids {
            input = input.with_task_ids(t);
        }
        let mut cache = self.new_cache();
        let mut rng = StdRng::seed_from_u64(cfg.seed.unwrap_or(0));
        let mut seen: Vec<Vec<u32>> = prompts.to_vec();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for step in 0..max_new {
            let logits = self.forward_cached(input, &mut cache)?.logits;
            let [_, s, v] = logits.dims();
            let last = logits.narrow(1, s - 1, 1).reshape([b, v]);
            let host: Vec<f32> = last
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| ModelError::InvalidState(format!("reading logits: {e:?}")))?;
            let mut next = Vec::with_capacity(b);
            for r in 0..b {
                if done[r] {
                    next.push(pad);
                    continue;
                }
                let mut row = host[r * v..(r + 1) * v].to_vec();
                if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                    return Err(ModelError::Input(format!(
                        "the model produced non-finite logits at new token {step} \
                         (NaN or infinite weights, adapter weights or mixing weights)"
                    )));
                }
                let t = next_token(&mut row, &seen[r], cfg, &mut rng);
                seen[r].push(t);
                out[r].push(t);
                if stops.contains(&t) {
                    done[r] = true;
                }
                next.push(t);
            }
            if done.iter().all(|d| *d) || step + 1 == max_new {
                break;
            }
            mask_t = Tensor::cat(vec![mask_t, Tensor::ones([b, 1], &device)], 1);
            let next: Vec<i64> = next.iter().map(|&t| t as i64).collect();
            input = LmInput::new(Tensor::from_data(TensorData::new(next, [b, 1]), &device))
                .with_attention_mask(mask_t.clone());
            if let Some(t) = task_ids {
                input = input.with_task_ids(t);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_the_k_largest() {
        let mut l = vec![1.0, 3.0, 2.0, 3.0, 0.0];
        top_k_filter(&mut l, 2);
        assert_eq!(
            l,
            vec![
                f32::NEG_INFINITY,
                3.0,
                f32::NEG_INFINITY,
                3.0,
                f32::NEG_INFINITY
            ]
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probs = [0.1, 0.2, 0.3, 0.4] (logits are their logs). Ascending cumulative mass:
        // 0.1, 0.3, 0.6, 1.0. top_p = 0.7 removes cum <= 0.3 → tokens 0 and 1 go.
        let p = [0.1f32, 0.2, 0.3, 0.4];
        let mut l: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        top_p_filter(&mut l, 0.7);
        assert!(l[0].is_infinite() && l[1].is_infinite());
        assert!(l[2].is_finite() && l[3].is_finite());
        // top_p tiny: only the most likely token survives.
        let mut l: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        top_p_filter(&mut l, 0.01);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 1);
        assert!(l[3].is_finite());
    }

    #[test]
    fn sampling_is_seeded_and_respects_filters() {
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: Some(2),
            temperature: Some(0.5),
            ..GenerationConfig::default()
        };
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| next_token(&mut [0.0, 1.0, 1.5, -3.0], &[], &cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same draws");
        assert!(
            a.iter().all(|&t| t == 1 || t == 2),
            "top-2 keeps tokens 1 and 2 only"
        );
        // softmax([1, 1.5] / 0.5) = [e^2, e^3] / Σ → P(2) ≈ 0.73
        let share = a.iter().filter(|&&t| t == 2).count() as f64 / a.len() as f64;
        assert!((share - 0.731).abs() < 0.1, "{share}");
    }

    #[test]
    fn generation_config_reads_hf_json() {
        let g = GenerationConfig::from_json(
            r#"{"bos_token_id": 1, "do_sample": true, "eos_token_id": [2, 32000],
                "pad_token_id": 0, "temperature": 0.6, "top_p": 0.9, "top_k": null,
                "transformers_version": "4.44.0"}"#,
        )
        .unwrap();
        assert_eq!(g.stop_tokens(), vec![2, 32000]);
        assert_eq!(g.pad_token(), 0);
        assert_eq!(g.top_k, None);
        assert_eq!(g.max_new_tokens, Some(20));
        let bad = GenerationConfig {
            top_p: Some(1.5),
            ..g
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
    }
}
