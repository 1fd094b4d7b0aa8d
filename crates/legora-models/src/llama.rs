//! Llama (`model_type: "llama"`): Llama 2/3/3.1/3.2, TinyLlama, CodeLlama, ...
//!
//! Mirrors `transformers/models/llama/modeling_llama.py`: pre-norm decoder layers
//! (`input_layernorm` → self-attention → residual, `post_attention_layernorm` → SwiGLU MLP
//! → residual), GQA, RoPE with `rope_theta` and `rope_scaling` `linear` / `llama3`,
//! optional `attention_bias` (q/k/v/o) and `mlp_bias`, untied `lm_head` by default.
//! The decoder itself is shared by every family: see [`crate::decoder`].

use crate::config::{resolve_common, Config, Family, ModelConfig};
use crate::error::Result;

/// Resolve a Llama config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Llama)?;
    // self.q_proj = nn.Linear(..., bias=config.attention_bias) (also k/v/o)
    let attention_bias = cfg.attention_bias.unwrap_or(false);
    m.qkv_bias = attention_bias;
    m.o_bias = attention_bias;
    // self.gate_proj = nn.Linear(..., bias=config.mlp_bias) (also up/down)
    m.mlp_bias = cfg.mlp_bias.unwrap_or(false);
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_and_mlp_bias_flags() {
        let mut cfg = Config::from_json(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let m = resolve(&cfg).unwrap();
        assert!(!m.qkv_bias && !m.o_bias && !m.mlp_bias && !m.tie_word_embeddings);
        assert_eq!((m.head_dim, m.num_key_value_heads), (4, 2));
        cfg.attention_bias = Some(true);
        cfg.mlp_bias = Some(true);
        let m = resolve(&cfg).unwrap();
        assert!(m.qkv_bias && m.o_bias && m.mlp_bias);
    }
}
