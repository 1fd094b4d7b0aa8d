//! Gemma 3 (`model_type: "gemma3_text"`): the text model of Gemma 3 (`Gemma3ForCausalLM`:
//! 270M, 1B; the text part of the larger multimodal checkpoints).
//!
//! Mirrors `transformers/models/gemma3/modeling_gemma3.py`; every difference from Llama:
//! - GeGLU MLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with `hidden_activation`
//!   `gelu_pytorch_tanh`;
//! - RMSNorm scales by `1 + weight` (`output * (1.0 + self.weight.float())`), and four
//!   norms per layer: `post_attention_layernorm` on the attention output,
//!   `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP;
//! - per-head `q_norm` / `k_norm` (as Qwen3) before RoPE;
//! - embeddings scaled by `hidden_size ** 0.5` (`Gemma3TextScaledWordEmbedding`);
//! - attention scores scaled by `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`;
//! - sliding-window layers (`layer_types`, else every layer but each
//!   `sliding_window_pattern`-th) with their own RoPE base (`rope_parameters
//!   ["sliding_attention"]`, transformers 4: `rope_local_base_freq`), global layers with
//!   `rope_parameters["full_attention"]` (transformers 4: `rope_theta` + `rope_scaling`);
//! - tied embeddings by default.
//!
//! Refused by name: `final_logit_softcapping` / `attn_logit_softcapping` (Gemma 2; null
//! in Gemma 3) and `use_bidirectional_attention`.

use serde_json::{json, Map, Value};

use crate::config::{resolve_common, Activation, Config, Family, ModelConfig, RopeParameters};
use crate::error::{ModelError, Result};
use crate::rope::Rope;

/// `Gemma3TextConfig.default_theta`: the global and local RoPE bases.
const DEFAULT_THETA: (f64, f64) = (1_000_000.0, 10_000.0);

/// `Gemma3TextConfig`'s defaults, for the keys a config.json may leave out (the
/// `text_config` of the multimodal checkpoints names only what differs from them).
fn text_defaults() -> [(&'static str, Value); 12] {
    [
        ("vocab_size", json!(262_208)),
        ("hidden_size", json!(2304)),
        ("intermediate_size", json!(9216)),
        ("num_hidden_layers", json!(26)),
        ("num_attention_heads", json!(8)),
        ("num_key_value_heads", json!(4)),
        ("head_dim", json!(256)),
        ("max_position_embeddings", json!(131_072)),
        ("rms_norm_eps", json!(1e-6)),
        ("pad_token_id", json!(0)),
        ("eos_token_id", json!(1)),
        ("bos_token_id", json!(2)),
    ]
}

/// The config.json of the text model in `raw`, a Gemma 3 config.json: a `gemma3_text`
/// config as it is, or the `text_config` of a multimodal `gemma3` one
/// (`Gemma3ForConditionalGeneration`; its token ids where the text config has none), with
/// `Gemma3TextConfig`'s defaults for the keys it leaves out. `None` for another family.
pub fn text_config(raw: &Value) -> Result<Option<Value>> {
    let mut text = match raw.get("model_type").and_then(Value::as_str) {
        Some("gemma3_text") => raw.as_object().cloned().unwrap_or_default(),
        Some("gemma3") => {
            let mut text = match raw.get("text_config") {
                Some(Value::Object(t)) => t.clone(),
                None | Some(Value::Null) => Map::new(),
                Some(other) => {
                    return Err(ModelError::config(
                        "text_config",
                        "an object (the text model's config)",
                        other,
                    ))
                }
            };
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let (None, Some(v)) = (text.get(key), raw.get(key)) {
                    text.insert(key.into(), v.clone());
                }
            }
            text
        }
        _ => return Ok(None),
    };
    text.insert("model_type".into(), json!("gemma3_text"));
    text.insert("architectures".into(), json!(["Gemma3ForCausalLM"]));
    for (key, value) in text_defaults() {
        if text.get(key).is_none_or(Value::is_null) {
            text.insert(key.into(), value);
        }
    }
    Ok(Some(Value::Object(text)))
}

/// Resolve a Gemma 3 text config.json.
pub fn resolve(cfg: &Config) -> Result<ModelConfig> {
    let mut m = resolve_common(cfg, Family::Gemma3)?;
    for key in [
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
    ] {
        match cfg.extra.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(v) => {
                return Err(ModelError::unsupported(
                    key,
                    v,
                    "not implemented (Gemma 3 checkpoints leave it null)",
                ))
            }
        }
    }
    let act = match cfg.extra.get("hidden_activation") {
        Some(Value::String(name)) => name.clone(),
        _ => "gelu_pytorch_tanh".into(),
    };
    m.hidden_act = Activation::from_hf("hidden_activation", &act)?;
    // self.q_proj = nn.Linear(..., bias=config.attention_bias) (k, v and o_proj too)
    let bias = cfg.attention_bias.unwrap_or(false);
    m.qkv_bias = bias;
    m.o_bias = bias;
    m.mlp_bias = false;
    m.qk_norm = true;
    m.norm_weight_offset = 1.0;
    m.sandwich_norms = true;
    // Gemma3TextScaledWordEmbedding(..., embed_scale=self.config.hidden_size**0.5)
    m.embed_scale = Some((cfg.hidden_size as f32).sqrt() as f64);
    // self.scaling = config.query_pre_attn_scalar**-0.5
    let scalar = positive(cfg, "query_pre_attn_scalar", 256.0)?;
    m.attn_scale = scalar.powf(-0.5);
    m.tie_word_embeddings = cfg.tie_word_embeddings.unwrap_or(true);
    let (global, local) = rope_parameters(cfg)?;
    m.rope = Rope::from_parameters(&global, m.head_dim)?;
    m.local_rope = Some(Rope::from_parameters(&local, m.head_dim)?);
    m.sliding_windows = sliding_windows(cfg)?;
    m.validate()?;
    Ok(m)
}

/// A positive number under `key` in the config's other keys, else `default`.
fn positive(cfg: &Config, key: &str, default: f64) -> Result<f64> {
    match cfg.extra.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(ModelError::config(key, "a finite number > 0", v)),
        },
    }
}

/// The RoPE settings of the global and the sliding layers, from either spelling.
fn rope_parameters(cfg: &Config) -> Result<(RopeParameters, RopeParameters)> {
    let nested = cfg.rope_parameters.as_ref().map(|p| &p.extra);
    let read = |key: &str| -> Result<Option<RopeParameters>> {
        match nested.and_then(|e| e.get(key)) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                ModelError::config(format!("rope_parameters.{key}"), "RoPE settings", e)
            }),
        }
    };
    let mut global = match read("full_attention")? {
        Some(p) => p,
        // transformers 4: rope_scaling (applied to the global layers) + rope_theta
        None => cfg.rope_scaling.clone().unwrap_or_default(),
    };
    if global.rope_theta.is_none() {
        global.rope_theta = Some(cfg.rope_theta.unwrap_or(DEFAULT_THETA.0));
    }
    let mut local = read("sliding_attention")?.unwrap_or_default();
    if local.rope_theta.is_none() {
        local.rope_theta = Some(positive(cfg, "rope_local_base_freq", DEFAULT_THETA.1)?);
    }
    Ok((global, local))
}

/// The window of each layer: `sliding_window` (default 4096) on the `sliding_attention`
/// layers of `layer_types`, else on all but every `sliding_window_pattern`-th (6).
fn sliding_windows(cfg: &Config) -> Result<Vec<Option<usize>>> {
    let n = cfg.num_hidden_layers;
    let window = cfg.sliding_window.unwrap_or(4096);
    let types: Vec<String> = match &cfg.layer_types {
        Some(t) => t.clone(),
        None => {
            let pattern = positive(cfg, "sliding_window_pattern", 6.0)?;
            if pattern.fract() != 0.0 || pattern < 1.0 {
                return Err(ModelError::config(
                    "sliding_window_pattern",
                    "a positive integer",
                    pattern,
                ));
            }
            let pattern = pattern as usize;
            // "sliding_attention" if bool((i + 1) % self._sliding_window_pattern) else "full_attention"
            (0..n)
                .map(|i| {
                    if (i + 1) % pattern != 0 {
                        "sliding_attention".into()
                    } else {
                        "full_attention".into()
                    }
                })
                .collect()
        }
    };
    crate::qwen2::windows_of_layer_types(&types, n, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    // google/gemma-3-1b-it's config.json (abridged, transformers 4 style).
    const GEMMA3_1B: &str = r#"{
      "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
      "attn_logit_softcapping": null, "bos_token_id": 2, "eos_token_id": [1, 106],
      "final_logit_softcapping": null, "head_dim": 256,
      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
      "intermediate_size": 6912, "max_position_embeddings": 32768,
      "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
      "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
      "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
      "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
      "vocab_size": 262144
    }"#;

    #[test]
    fn gemma3_1b() {
        let m = Config::from_json(GEMMA3_1B).unwrap().resolve().unwrap();
        assert_eq!(m.family, Family::Gemma3);
        assert_eq!(m.hidden_act, Activation::GeluTanh);
        assert!(m.tie_word_embeddings && m.qk_norm && m.sandwich_norms);
        assert_eq!(m.norm_weight_offset, 1.0);
        assert_eq!(m.attn_scale, 1.0 / 16.0);
        assert_eq!(m.rope.theta, 1e6);
        assert_eq!(m.local_rope.as_ref().unwrap().theta, 1e4);
        let global: Vec<usize> = (0..26)
            .filter(|&i| m.sliding_windows[i].is_none())
            .collect();
        assert_eq!(global, vec![5, 11, 17, 23]);
        assert_eq!(m.sliding_windows[0], Some(512));
    }

    // google/gemma-3-4b-it's config.json (abridged): the text config names only what
    // differs from Gemma3TextConfig's defaults.
    const GEMMA3_4B: &str = r#"{
      "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
      "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
      "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
      "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
        "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
      "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model"}
    }"#;

    #[test]
    fn the_text_model_of_a_multimodal_checkpoint() {
        let raw: Value = serde_json::from_str(GEMMA3_4B).unwrap();
        let text = text_config(&raw).unwrap().unwrap();
        assert_eq!(text["eos_token_id"], json!([1, 106]));
        let m = Config::from_json(&text.to_string())
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(m.family, Family::Gemma3);
        assert_eq!(
            (m.num_attention_heads, m.num_key_value_heads, m.head_dim),
            (8, 4, 256)
        );
        assert_eq!((m.vocab_size, m.hidden_size), (262_208, 2560));
        assert_eq!(m.rms_norm_eps, 1e-6);
        assert!(matches!(m.rope.kind, crate::RopeKind::Linear { factor } if factor == 8.0));
        assert_eq!(m.local_rope.as_ref().unwrap().theta, 1e4);
        assert_eq!(m.sliding_windows[5], None);
        assert_eq!(m.sliding_windows[4], Some(1024));
        let llama = json!({"model_type": "llama"});
        assert!(text_config(&llama).unwrap().is_none());
        let bad = json!({"model_type": "gemma3", "text_config": 3});
        assert!(text_config(&bad)
            .unwrap_err()
            .to_string()
            .contains("text_config"));
    }

    #[test]
    fn transformers_5_rope_parameters_and_refusals() {
        let mut v: serde_json::Value = serde_json::from_str(GEMMA3_1B).unwrap();
        v["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}});
        let m = Config::from_json(&v.to_string())
            .unwrap()
            .resolve()
            .unwrap();
        assert!(matches!(m.rope.kind, crate::RopeKind::Linear { factor } if factor == 8.0));
        for (key, value) in [
            ("final_logit_softcapping", serde_json::json!(30.0)),
            ("use_bidirectional_attention", serde_json::json!(true)),
            ("hidden_activation", serde_json::json!("relu")),
            ("sliding_window_pattern", serde_json::json!(0.5)),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = Config::from_json(&bad.to_string())
                .unwrap()
                .resolve()
                .unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }
}
