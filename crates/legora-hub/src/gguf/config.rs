//! The model config of a GGUF file, from its metadata: the transformers `config.json` it
//! stands for (as transformers' `load_gguf_checkpoint` builds it), parsed by legora-models'
//! own [`Config`].
//!
//! | GGUF key (`{arch}.` prefix) | config.json |
//! |---|---|
//! | `block_count` | `num_hidden_layers` |
//! | `embedding_length` | `hidden_size` |
//! | `feed_forward_length` | `intermediate_size` |
//! | `attention.head_count` / `head_count_kv` | `num_attention_heads` / `num_key_value_heads` |
//! | `attention.key_length` (else `rope.dimension_count` for llama) | `head_dim` |
//! | `attention.layer_norm_rms_epsilon` | `rms_norm_eps` |
//! | `rope.freq_base` | `rope_theta` |
//! | `rope.scaling.type` `linear` + `rope.scaling.factor` (or `rope.scale_linear`) | `rope_scaling` |
//! | `context_length` | `max_position_embeddings` |
//! | `vocab_size`, else the length of `tokenizer.ggml.tokens` | `vocab_size` |
//! | no `output.weight` tensor | `tie_word_embeddings: true` |
//! | `attention.sliding_window` (phi3) | `sliding_window` |
//! | `blk.0.attn_q.bias` / `blk.0.ffn_gate.bias` tensors (llama) | `attention_bias` / `mlp_bias` |
//! | `tokenizer.ggml.{bos,eos,padding}_token_id` | `bos_token_id`, `eos_token_id`, `pad_token_id` |

use legora_models::{Config, ModelConfig, ModelError};
use serde_json::{json, Map, Value};

use super::file::GgufFile;
use crate::error::{HubError, Result};

/// The architectures legora loads from GGUF, with transformers' `model_type` and class
/// name. `mistral` files are rare (llama.cpp writes Mistral models as `llama`); they are
/// read like `llama`. A `gemma3` file holds the text model only (`gemma3_text`).
const ARCHITECTURES: [(&str, &str, &str); 6] = [
    ("llama", "llama", "LlamaForCausalLM"),
    ("qwen2", "qwen2", "Qwen2ForCausalLM"),
    ("mistral", "mistral", "MistralForCausalLM"),
    ("qwen3", "qwen3", "Qwen3ForCausalLM"),
    ("phi3", "phi3", "Phi3ForCausalLM"),
    ("gemma3", "gemma3_text", "Gemma3ForCausalLM"),
];

/// `general.architecture`, checked to be one legora implements.
pub fn architecture(file: &GgufFile) -> Result<&str> {
    let arch = file.require_str("general.architecture")?;
    if ARCHITECTURES.iter().any(|(a, ..)| *a == arch) {
        Ok(arch)
    } else {
        Err(HubError::GgufMetadata {
            path: file.path().to_path_buf(),
            key: "general.architecture".into(),
            expected: format!(
                "one of {}",
                ARCHITECTURES.map(|(a, ..)| format!("\"{a}\"")).join(", ")
            ),
            found: format!("\"{arch}\""),
        })
    }
}

/// Whether llama.cpp permuted this file's `attn_q` / `attn_k` rows (`LlamaModel.permute`):
/// the `llama` (and `mistral`) architectures; Qwen2, Qwen3 and Phi-3 are converted
/// unpermuted.
pub fn permuted_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "mistral")
}

/// The config.json (transformers' keys) this GGUF file's metadata describes.
pub fn config_json(file: &GgufFile) -> Result<Value> {
    let arch = architecture(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let err = |k: String, expected: &str, found: String| HubError::GgufMetadata {
        path: file.path().to_path_buf(),
        key: k,
        expected: expected.into(),
        found,
    };
    let (model_type, class) = ARCHITECTURES
        .iter()
        .find(|(a, ..)| *a == arch)
        .map_or((arch, ""), |(_, t, c)| (*t, *c));
    let mut m = Map::new();
    m.insert("architectures".into(), json!([class]));
    m.insert("model_type".into(), json!(model_type));
    let heads = file.require_usize(&key("attention.head_count"))?;
    let kv_heads = file
        .get_u64(&key("attention.head_count_kv"))?
        .unwrap_or(heads as u64);
    let hidden = file.require_usize(&key("embedding_length"))?;
    m.insert("hidden_size".into(), json!(hidden));
    m.insert(
        "intermediate_size".into(),
        json!(file.require_usize(&key("feed_forward_length"))?),
    );
    m.insert(
        "num_hidden_layers".into(),
        json!(file.require_usize(&key("block_count"))?),
    );
    m.insert("num_attention_heads".into(), json!(heads));
    m.insert("num_key_value_heads".into(), json!(kv_heads));
    if let Some(h) = head_dim(file, arch)? {
        m.insert("head_dim".into(), json!(h));
    }
    let eps = file
        .get_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            err(
                key("attention.layer_norm_rms_epsilon"),
                "a number",
                "no such key".into(),
            )
        })?;
    m.insert("rms_norm_eps".into(), json!(eps));
    if arch == "gemma3" {
        gemma3_keys(&mut m, file)?;
    } else {
        m.insert("hidden_act".into(), json!("silu"));
    }
    if let Some(n) = file.get_u64(&key("context_length"))? {
        m.insert("max_position_embeddings".into(), json!(n));
    }
    m.insert(
        "rope_theta".into(),
        json!(file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0)),
    );
    if let Some(t) = ["rope_factors_long.weight", "rope_factors_short.weight"]
        .into_iter()
        .find(|t| file.tensor_info(t).is_some())
    {
        // llama.cpp's Phi-3 LongRoPE (Phi-3.5-mini, Phi-3-mini-128k): read from the HF
        // folder instead, whose rope_scaling legora applies as transformers does
        return Err(HubError::GgufTensor {
            path: file.path().to_path_buf(),
            tensor: t.into(),
            expected: "no LongRoPE factors: a GGUF's LongRoPE is not implemented (load the \
                       model's Hugging Face folder, whose longrope legora runs)"
                .into(),
            found: "the tensor".into(),
        });
    }
    if let Some(s) = rope_scaling(file, arch)? {
        m.insert("rope_scaling".into(), s);
    }
    m.insert("vocab_size".into(), json!(vocab_size(file, arch)?));
    m.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor_info("output.weight").is_none()),
    );
    if let Some(w) = file.get_u64(&key("attention.sliding_window"))? {
        // llama.cpp's Phi-3 converter writes `sliding_window` here (transformers' GGUF
        // loader drops it; the model was trained with it)
        m.insert("sliding_window".into(), json!(w));
    }
    if arch != "qwen2" {
        let bias = |t: &str| file.tensor_info(t).is_some();
        m.insert("attention_bias".into(), json!(bias("blk.0.attn_q.bias")));
        m.insert("mlp_bias".into(), json!(bias("blk.0.ffn_gate.bias")));
    }
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file.get_u64(gguf)? {
            let id = u32::try_from(id)
                .map_err(|_| err(gguf.into(), "a token id (u32)", id.to_string()))?;
            m.insert(hf.into(), json!(id));
        }
    }
    if let Some(name) = file.get_str("general.name")? {
        m.insert("_name_or_path".into(), json!(name));
    }
    m.insert("torch_dtype".into(), json!("float32"));
    Ok(Value::Object(m))
}

/// What a `gemma3` file leaves to the runtime, as llama.cpp runs it: GeGLU, the query
/// scale `query_pre_attn_scalar ** -0.5` with the scalar = `head_dim`, except for Gemma 3
/// 27B (62 layers) where it is `hidden_size / num_attention_heads` (llama.cpp's
/// `f_attention_scale`; both equal the checkpoints' `query_pre_attn_scalar`), and the
/// local layers' RoPE base 10000 and window pattern 6 (its defaults, and transformers').
fn gemma3_keys(m: &mut Map<String, Value>, file: &GgufFile) -> Result<()> {
    m.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    let n = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    let per_head = n("hidden_size") / n("num_attention_heads").max(1);
    let scalar = match m.get("head_dim").and_then(Value::as_u64) {
        Some(h) if n("num_hidden_layers") != 62 => h,
        _ => per_head,
    };
    if scalar == 0 {
        return Err(HubError::GgufMetadata {
            path: file.path().to_path_buf(),
            key: "gemma3.attention.key_length".into(),
            expected: "a head dimension > 0".into(),
            found: "0".into(),
        });
    }
    m.insert("query_pre_attn_scalar".into(), json!(scalar));
    Ok(())
}

/// `attention.key_length`, else (llama, as transformers maps it) `rope.dimension_count`.
/// Different key / value / rotary widths are refused: legora's decoder has one head_dim
/// and rotates all of it.
fn head_dim(file: &GgufFile, arch: &str) -> Result<Option<u64>> {
    let key_len = file.get_u64(&format!("{arch}.attention.key_length"))?;
    let value_len = file.get_u64(&format!("{arch}.attention.value_length"))?;
    let rope_dims = file.get_u64(&format!("{arch}.rope.dimension_count"))?;
    if let (Some(k), Some(v)) = (key_len, value_len) {
        if k != v {
            return Err(HubError::GgufMetadata {
                path: file.path().to_path_buf(),
                key: format!("{arch}.attention.value_length"),
                expected: format!("the key length ({k}): legora's attention has one head_dim"),
                found: v.to_string(),
            });
        }
    }
    let head = key_len.or(if arch == "qwen2" { None } else { rope_dims });
    if let (Some(h), Some(r)) = (head, rope_dims) {
        if h != r {
            return Err(HubError::GgufMetadata {
                path: file.path().to_path_buf(),
                key: format!("{arch}.rope.dimension_count"),
                expected: format!(
                    "the head dimension ({h}): partial rotary embeddings are not implemented"
                ),
                found: r.to_string(),
            });
        }
    }
    Ok(head)
}

/// `rope.scaling.*` as transformers' `rope_scaling` (`None` for no scaling).
fn rope_scaling(file: &GgufFile, arch: &str) -> Result<Option<Value>> {
    let ty_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    let ty = file.get_str(&ty_key)?;
    let factor = file.get_f64(&factor_key)?;
    let legacy = file.get_f64(&format!("{arch}.rope.scale_linear"))?;
    match (ty, factor.or(legacy)) {
        (Some("none"), _) | (None, None | Some(1.0)) => Ok(None),
        (None | Some("linear"), Some(f)) => Ok(Some(json!({"rope_type": "linear", "factor": f}))),
        (Some("linear"), None) => Err(HubError::GgufMetadata {
            path: file.path().to_path_buf(),
            key: factor_key,
            expected: "a scaling factor (rope.scaling.type is \"linear\")".into(),
            found: "no such key".into(),
        }),
        (Some(other), _) => Err(HubError::GgufMetadata {
            path: file.path().to_path_buf(),
            key: ty_key,
            expected: "\"none\" or \"linear\" (other RoPE scalings are not implemented)".into(),
            found: format!("\"{other}\""),
        }),
    }
}

/// `{arch}.vocab_size`, else the number of `tokenizer.ggml.tokens` (as transformers does).
fn vocab_size(file: &GgufFile, arch: &str) -> Result<usize> {
    if let Some(v) = file.get_u64(&format!("{arch}.vocab_size"))? {
        return Ok(v as usize);
    }
    match file.get_strings("tokenizer.ggml.tokens")? {
        Some(t) => Ok(t.len()),
        None => Err(HubError::GgufMetadata {
            path: file.path().to_path_buf(),
            key: "tokenizer.ggml.tokens".into(),
            expected: format!("the token list (or {arch}.vocab_size) to size the vocabulary"),
            found: "no such key".into(),
        }),
    }
}

/// The file's [`Config`] and config.json, and the runtime config with llama.cpp's
/// `rope_freqs.weight` (per-frequency divisors, which is how Llama 3.1+ files carry their
/// `llama3` RoPE scaling) applied to the inverse frequencies.
pub fn load_gguf_config(file: &GgufFile) -> Result<(Config, Value, ModelConfig)> {
    let raw = config_json(file)?;
    let cfg: Config = serde_json::from_value(raw.clone()).map_err(|e| HubError::Model {
        path: file.path().to_path_buf(),
        source: ModelError::InvalidConfig {
            field: "config.json (from GGUF metadata)".into(),
            expected: "a transformers causal-LM config".into(),
            found: e.to_string(),
        },
    })?;
    let mut resolved = cfg.resolve().map_err(HubError::model(file.path()))?;
    if let Some(factors) = file.dequantize("rope_freqs.weight")? {
        let inv = &mut resolved.rope.inv_freq;
        if factors.len() != inv.len() {
            return Err(HubError::GgufTensor {
                path: file.path().to_path_buf(),
                tensor: "rope_freqs.weight".into(),
                expected: format!("{} factors (head_dim / 2)", inv.len()),
                found: factors.len().to_string(),
            });
        }
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(HubError::GgufTensor {
                path: file.path().to_path_buf(),
                tensor: "rope_freqs.weight".into(),
                expected: "finite factors > 0".into(),
                found: bad.to_string(),
            });
        }
        // ggml_rope_ext: theta = pos · θ^(-2i/d) / freq_factors[i]
        for (f, d) in inv.iter_mut().zip(&factors) {
            *f /= d;
        }
    }
    Ok((cfg, raw, resolved))
}
