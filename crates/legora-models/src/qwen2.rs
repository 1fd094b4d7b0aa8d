//! Qwen2 (`model_type: "qwen2"`): Qwen1.5, Qwen2, Qwen2.5.
//!
//! Mirrors `transformers/models/qwen2/modeling_qwen2.py`: the Llama decoder with a bias
//! on q/k/v (not on o_proj), usually tied embeddings (small sizes), a large `rope_theta`,
//! and optional sliding-window attention on the layers at or above `max_window_layers`
//! when `use_sliding_window` is true (transformers 5 spells it out as `layer_types`).

use crate::config::{resolve_common, Config, Family, ModelConfig};
use crate::error::{ModelError, Result};

/// Resolve a Qwen2 config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Qwen2)?;
    // self.q_proj = nn.Linear(config.hidden_size, ..., bias=True) (k, v too; o_proj bias=False)
    m.qkv_bias = true;
    m.o_bias = false;
    m.mlp_bias = false;
    m.sliding_windows = sliding_windows(cfg)?;
    m.validate()?;
    Ok(m)
}

/// The attention window of each layer, as Qwen2 and Qwen3 configs say it: none unless
/// `use_sliding_window`; then `layer_types` where given (transformers 5), else the layers
/// at or above `max_window_layers`.
pub(crate) fn sliding_windows(cfg: &Config) -> Result<Vec<Option<usize>>> {
    let n = cfg.num_hidden_layers;
    // self.sliding_window = self.sliding_window if self.use_sliding_window else None
    if !cfg.use_sliding_window.unwrap_or(false) {
        return Ok(vec![None; n]);
    }
    let window = cfg.sliding_window.ok_or_else(|| {
        ModelError::config(
            "sliding_window",
            "a window size (use_sliding_window is true)",
            "null",
        )
    })?;
    match &cfg.layer_types {
        Some(types) => windows_of_layer_types(types, n, window),
        // "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
        None => {
            let start = cfg.max_window_layers.unwrap_or(28);
            Ok((0..n).map(|i| (i >= start).then_some(window)).collect())
        }
    }
}

/// The window of each of `n` layers from `layer_types` (transformers 5):
/// `window` on `"sliding_attention"`, none on `"full_attention"`.
pub(crate) fn windows_of_layer_types(
    types: &[String],
    n: usize,
    window: usize,
) -> Result<Vec<Option<usize>>> {
    if types.len() != n {
        return Err(ModelError::config(
            "layer_types",
            format!("one entry per layer ({n})"),
            types.len(),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "sliding_attention" => Ok(Some(window)),
            "full_attention" => Ok(None),
            other => Err(ModelError::config(
                "layer_types",
                "\"full_attention\" or \"sliding_attention\"",
                format!("\"{other}\""),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_only_when_enabled() {
        let mut cfg = Config::from_json(
            r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                "num_key_value_heads": 1, "sliding_window": 4, "max_window_layers": 1}"#,
        )
        .unwrap();
        let m = resolve(&cfg).unwrap();
        assert!(m.qkv_bias && !m.o_bias);
        assert_eq!(m.sliding_windows, vec![None, None, None]);
        cfg.use_sliding_window = Some(true);
        assert_eq!(
            resolve(&cfg).unwrap().sliding_windows,
            vec![None, Some(4), Some(4)]
        );
        cfg.layer_types = Some(vec!["sliding_attention".into(), "full_attention".into()]);
        assert!(resolve(&cfg)
            .unwrap_err()
            .to_string()
            .contains("layer_types"));
    }
}
