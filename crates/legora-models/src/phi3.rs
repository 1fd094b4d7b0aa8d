//! Phi-3 (`model_type: "phi3"`): Phi-3-mini/medium 4k, Phi-4 (14B).
//!
//! Mirrors `transformers/models/phi3/modeling_phi3.py`: the Llama decoder with q, k and v
//! in one linear (`self_attn.qkv_proj`, `[(heads + 2·kv_heads)·head_dim, hidden]`, split
//! as `qkv[..., :query_pos]`, then the keys, then the values) and gate and up in one
//! (`mlp.gate_up_proj`, `[2·intermediate, hidden]`, `gate, up_states =
//! up_states.chunk(2, dim=-1)`); no biases; `sliding_window`, when set, on every layer
//! (`mask_function = create_causal_mask if self.config.sliding_window is None else
//! create_sliding_window_causal_mask`). The fused linears are single adapter slots, as
//! PEFT targets them (`target_modules=["qkv_proj", "gate_up_proj"]`).
//!
//! `resid_pdrop` / `embd_pdrop` dropout of the base model is not applied (legora trains
//! adapters over a frozen base in evaluation mode). The long-context variants'
//! `longrope` and Phi-4-mini's partial rotary embeddings are refused by name.

use crate::config::{resolve_common, Config, Family, ModelConfig};
use crate::error::Result;

/// Resolve a Phi-3 config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Phi3)?;
    // self.qkv_proj = nn.Linear(config.hidden_size, op_size, bias=False)
    m.qkv_bias = false;
    m.o_bias = false;
    m.mlp_bias = false;
    m.fused_projections = true;
    m.sliding_windows = vec![cfg.sliding_window; cfg.num_hidden_layers];
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use legora_nn::Proj;

    // Phi-3-mini-4k-instruct's config.json (abridged, transformers 4 style).
    const PHI3_MINI_4K: &str = r#"{
      "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
      "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
      "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
      "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
      "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
      "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false,
      "torch_dtype": "bfloat16", "vocab_size": 32064
    }"#;

    #[test]
    fn phi3_mini_4k() {
        let m = Config::from_json(PHI3_MINI_4K).unwrap().resolve().unwrap();
        assert_eq!(m.family, Family::Phi3);
        assert_eq!(m.projections(), &Proj::FUSED);
        assert_eq!(m.proj_dims(Proj::QkvProj), (3 * 3072, 3072));
        assert_eq!(m.proj_dims(Proj::GateUpProj), (2 * 8192, 3072));
        assert_eq!(m.sliding_windows, vec![Some(2047); 32]);
        assert!(!m.qkv_bias && !m.tie_word_embeddings);
        assert_eq!(
            m.slot_names(),
            "qkv_proj o_proj gate_up_proj down_proj lm_head"
        );
        let names: Vec<String> = m.frozen_weights().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "model.layers.0.self_attn.qkv_proj.weight");
        assert_eq!(names[2], "model.layers.0.mlp.gate_up_proj.weight");
    }

    #[test]
    fn long_context_rope_is_refused_by_name() {
        let mut v: serde_json::Value = serde_json::from_str(PHI3_MINI_4K).unwrap();
        v["rope_scaling"] = serde_json::json!({"type": "longrope", "short_factor": [1.0],
            "long_factor": [1.0]});
        let e = Config::from_json(&v.to_string())
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("longrope"), "{e}");
    }
}
