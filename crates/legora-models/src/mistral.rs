//! Mistral (`model_type: "mistral"`): Mistral 7B v0.1–v0.3 and fine-tunes.
//!
//! Mirrors `transformers/models/mistral/modeling_mistral.py`: the Llama decoder without
//! biases, an explicit `head_dim` in recent configs, and sliding-window attention on every
//! layer when `sliding_window` is set (v0.1 uses 4096; v0.2+ set it to null). The window is
//! honoured, in the forward pass and in the KV cache: query `q` sees key `k` iff
//! `q - window < k ≤ q` (transformers' `sliding_window_overlay`).

use crate::config::{resolve_common, Config, Family, ModelConfig};
use crate::error::Result;

/// Resolve a Mistral config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Mistral)?;
    // mask_function = create_causal_mask if sliding_window is None else create_sliding_window_causal_mask
    m.sliding_windows = vec![cfg.sliding_window; cfg.num_hidden_layers];
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_on_every_layer() {
        let cfg = Config::from_json(
            r#"{"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "head_dim": 2,
                "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "sliding_window": 3}"#,
        )
        .unwrap();
        let m = resolve(&cfg).unwrap();
        assert_eq!(m.sliding_windows, vec![Some(3), Some(3)]);
        assert_eq!(m.head_dim, 2);
        let mut cfg = cfg;
        cfg.sliding_window = Some(0);
        assert!(resolve(&cfg)
            .unwrap_err()
            .to_string()
            .contains("sliding_window"));
    }
}
