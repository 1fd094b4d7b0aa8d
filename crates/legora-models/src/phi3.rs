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
//! adapters over a frozen base in evaluation mode). The long-context variants' `longrope`
//! (Phi-3.5-mini, Phi-3-mini-128k) and Phi-4-mini's `partial_rotary_factor` are in
//! [`crate::Rope`].

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
    fn longrope_of_phi3_5_mini() {
        // Phi-3.5-mini-instruct: 48 factors per list, original context 4096 of 131072
        let mut v: serde_json::Value = serde_json::from_str(PHI3_MINI_4K).unwrap();
        v["max_position_embeddings"] = serde_json::json!(131072);
        v["rope_scaling"] = serde_json::json!({"type": "longrope",
            "short_factor": vec![1.0; 48], "long_factor": vec![2.0; 48]});
        let m = Config::from_json(&v.to_string())
            .unwrap()
            .resolve()
            .unwrap();
        let crate::RopeKind::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ref long_inv_freq,
        } = m.rope.kind
        else {
            panic!("{:?}", m.rope.kind)
        };
        assert_eq!(original_max_position_embeddings, 4096);
        // sqrt(1 + ln(32) / ln(4096))
        assert!(
            (attention_factor - 1.1902381).abs() < 1e-6,
            "{attention_factor}"
        );
        assert_eq!(long_inv_freq[0], 0.5);
        assert_eq!(m.rope.inv_freq[0], 1.0);
        v["rope_scaling"]["long_factor"] = serde_json::json!([1.0]);
        let e = Config::from_json(&v.to_string())
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("long_factor"), "{e}");
    }
}
