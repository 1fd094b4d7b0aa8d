//! Qwen3 (`model_type: "qwen3"`): the dense Qwen3 models (0.6B to 32B).
//!
//! Mirrors `transformers/models/qwen3/modeling_qwen3.py`: the Qwen2 decoder with an
//! RMSNorm over each head of the queries and of the keys before RoPE (`self_attn.q_norm`,
//! `self_attn.k_norm`, weight `[head_dim]`), biases on q/k/v/o only when `attention_bias`
//! (no bias by default), an explicit `head_dim` (Qwen3-0.6B: 16 heads × 128 over a
//! hidden size of 1024), and Qwen2's optional sliding-window layers.

use crate::config::{resolve_common, Config, Family, ModelConfig};
use crate::error::Result;

/// Resolve a Qwen3 config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Qwen3)?;
    // self.q_proj = nn.Linear(..., bias=config.attention_bias) (k, v and o_proj too)
    let bias = cfg.attention_bias.unwrap_or(false);
    m.qkv_bias = bias;
    m.o_bias = bias;
    m.mlp_bias = false;
    // self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # unlike olmo, only on the head dim!
    m.qk_norm = true;
    m.sliding_windows = crate::qwen2::sliding_windows(cfg)?;
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Qwen3-0.6B's config.json (abridged): head_dim 128 ≠ hidden / heads, tied.
    const QWEN3_06B: &str = r#"{
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "bos_token_id": 151643,
      "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
      "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
      "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
      "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
      "sliding_window": null, "tie_word_embeddings": true, "use_sliding_window": false,
      "vocab_size": 151936
    }"#;

    #[test]
    fn qwen3_06b() {
        let m = Config::from_json(QWEN3_06B).unwrap().resolve().unwrap();
        assert_eq!(m.family, Family::Qwen3);
        assert_eq!(
            (m.head_dim, m.num_attention_heads, m.num_key_value_heads),
            (128, 16, 8)
        );
        assert!(m.qk_norm && !m.qkv_bias && !m.o_bias && !m.mlp_bias);
        assert!(m.tie_word_embeddings);
        assert_eq!(m.sliding_windows, vec![None; 28]);
        let mut cfg = Config::from_json(QWEN3_06B).unwrap();
        cfg.attention_bias = Some(true);
        let m = resolve(&cfg).unwrap();
        assert!(m.qkv_bias && m.o_bias);
    }
}
