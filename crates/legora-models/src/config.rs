//! `Config`: config.json as transformers writes it, and the runtime [`ModelConfig`]
//! each family resolves it into.
//!
//! Both RoPE spellings are read: transformers 5 writes `rope_parameters`
//! (`{"rope_type", "rope_theta", ...}`); transformers 4 wrote `rope_theta` next to an
//! optional `rope_scaling` (`{"type" | "rope_type", "factor", ...}`), which is what most
//! checkpoints on the Hub still carry.

use legora_nn::{Proj, SlotId};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::rope::Rope;

/// A token id or a list of them (`eos_token_id` is either in HF files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// RoPE settings: transformers 5 `rope_parameters` or transformers 4 `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear`, `llama3`, ... (transformers 5 and late 4 spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Early transformers 4 spelling of `rope_type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Base θ (transformers 5 keeps it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: low-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: high-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the model was pretrained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Fraction of the head dimension that is rotated (Phi-4-mini: 0.75).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// `longrope`: the frequency divisors past the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    /// `longrope`: the frequency divisors within the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    /// `longrope`: the cos/sin multiplier (default from `factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Any other key, kept.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RopeParameters {
    /// `rope_type`, falling back to `type`, then `"default"`.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.type_.as_deref())
            .unwrap_or("default")
    }
}

fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// config.json of a Llama-family causal LM, with transformers' key names.
///
/// Keys legora does not interpret are kept in [`extra`](Self::extra).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `llama`, `qwen2`, `mistral`, `qwen3`, `phi3` or `gemma3_text`.
    pub model_type: String,
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head dimension; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (only `silu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest position the model was configured for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm ε.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4: RoPE base θ.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 4: RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// transformers 5: RoPE type, θ and scaling in one object.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether `lm_head` shares `embed_tokens`' weight (family default when absent).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Llama: bias on q/k/v/o.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Llama: bias on gate/up/down.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Mistral / Qwen2: attention window (keys older than this many positions are masked).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used at all.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers below this index use full attention.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` / `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
    /// Every other key, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Parse config.json text. Errors name the offending key (serde's message).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig {
            field: "config.json".into(),
            expected: "a transformers causal-LM config".into(),
            found: e.to_string(),
        })
    }

    /// The RoPE settings wherever they are: `rope_parameters` (transformers 5) first,
    /// then `rope_scaling` + `rope_theta` (transformers 4). θ defaults to 10000.
    pub fn rope_parameters(&self) -> RopeParameters {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = Some(self.rope_theta.unwrap_or(10000.0));
        }
        // Phi-3 / Phi-4 keep these beside rope_scaling, at the top level
        let top = |key: &str| self.extra.get(key).and_then(serde_json::Value::as_f64);
        if p.partial_rotary_factor.is_none() {
            p.partial_rotary_factor = top("partial_rotary_factor");
        }
        if p.original_max_position_embeddings.is_none() {
            p.original_max_position_embeddings =
                top("original_max_position_embeddings").map(|n| n as usize);
        }
        // longrope: factor = config.max_position_embeddings / original_max_position_embeddings
        if p.long_factor.is_some() && p.factor.is_none() {
            if let Some(orig) = p.original_max_position_embeddings.filter(|n| *n > 0) {
                p.factor = Some(self.max_position_embeddings as f64 / orig as f64);
            }
        }
        p
    }

    /// Resolve into the runtime config of the family named by `model_type`.
    pub fn resolve(&self) -> Result<ModelConfig> {
        match self.model_type.as_str() {
            "llama" => crate::llama::resolve(self),
            "qwen2" => crate::qwen2::resolve(self),
            "mistral" => crate::mistral::resolve(self),
            "qwen3" => crate::qwen3::resolve(self),
            "phi3" => crate::phi3::resolve(self),
            "gemma3_text" => crate::gemma3::resolve(self),
            other => Err(ModelError::UnknownModelType {
                found: other.to_string(),
                supported: Family::ALL.iter().map(|f| f.model_type()).collect(),
            }),
        }
    }
}

/// The model families legora implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `llama` (Llama 2/3, CodeLlama, TinyLlama, ...).
    Llama,
    /// `qwen2` (Qwen1.5, Qwen2, Qwen2.5).
    Qwen2,
    /// `mistral`.
    Mistral,
    /// `qwen3` (Qwen3 dense models).
    Qwen3,
    /// `phi3` (Phi-3, Phi-4: fused `qkv_proj` and `gate_up_proj`).
    Phi3,
    /// `gemma3_text` (Gemma 3's text model).
    Gemma3,
}

impl Family {
    /// Every family.
    pub const ALL: [Family; 6] = [
        Family::Llama,
        Family::Qwen2,
        Family::Mistral,
        Family::Qwen3,
        Family::Phi3,
        Family::Gemma3,
    ];

    /// config.json's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Gemma3 => "gemma3_text",
        }
    }
}

/// The MLP's activation: `act_fn(gate_proj(x)) * up_proj(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU: Llama, Qwen, Mistral, Phi-3).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with tanh-approximated GELU: Gemma).
    GeluTanh,
}

impl Activation {
    /// The activation transformers' `ACT2FN` names `name`, if legora implements it.
    pub fn from_hf(field: &str, name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(ModelError::unsupported(
                field,
                format!("\"{other}\""),
                "legora implements \"silu\" (SwiGLU) and \"gelu_pytorch_tanh\" (GeGLU)",
            )),
        }
    }
}

/// The architecture as legora runs it, resolved from a [`Config`] by its family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family this came from.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: Rope,
    /// `max_position_embeddings` (informational; longer inputs are not refused).
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on gate/up/down.
    pub mlp_bias: bool,
    /// RMSNorm over each head of the queries and keys before RoPE (`q_norm`, `k_norm`:
    /// Qwen3).
    pub qk_norm: bool,
    /// Per layer: the attention window, if the layer uses one.
    pub sliding_windows: Vec<Option<usize>>,
    /// q/k/v and gate/up are each one linear (`qkv_proj`, `gate_up_proj`: Phi-3).
    pub fused_projections: bool,
    /// The MLP's activation.
    pub hidden_act: Activation,
    /// Added to every RMSNorm weight before it scales (Gemma's `1 + weight`): 0 or 1.
    pub norm_weight_offset: f64,
    /// Gemma: norms on the block outputs too (`post_attention_layernorm` on the attention
    /// output, `pre_feedforward_layernorm` before the MLP, `post_feedforward_layernorm`
    /// after it), four per layer.
    pub sandwich_norms: bool,
    /// Multiplier of the embeddings (Gemma: `hidden_size ** 0.5`).
    pub embed_scale: Option<f64>,
    /// Scale of the attention scores (`head_dim ** -0.5`; Gemma: `query_pre_attn_scalar
    /// ** -0.5`).
    pub attn_scale: f64,
    /// The rotary embedding of the sliding-window layers when it is not [`rope`](Self::rope)
    /// (Gemma 3's local base θ).
    pub local_rope: Option<Rope>,
}

impl ModelConfig {
    /// Check head counts and sizes shared by every family.
    pub(crate) fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ] {
            if v == 0 {
                return Err(ModelError::config(field, "a positive integer", v));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(ModelError::config(
                "num_key_value_heads",
                format!(
                    "a divisor of num_attention_heads ({})",
                    self.num_attention_heads
                ),
                self.num_key_value_heads,
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(ModelError::config(
                "head_dim",
                "an even positive integer (RoPE rotates pairs)",
                self.head_dim,
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(ModelError::config(
                "rms_norm_eps",
                "a finite number > 0",
                self.rms_norm_eps,
            ));
        }
        if let Some(w) = self.sliding_windows.iter().flatten().find(|w| **w == 0) {
            return Err(ModelError::config(
                "sliding_window",
                "a positive integer",
                w,
            ));
        }
        Ok(())
    }

    /// The projections of every decoder layer, in forward order: [`Proj::SEPARATE`], or
    /// [`Proj::FUSED`] for a model with fused projections.
    pub fn projections(&self) -> &'static [Proj] {
        if self.fused_projections {
            &Proj::FUSED
        } else {
            &Proj::SEPARATE
        }
    }

    /// Every adapter slot of the model, in model order (`lm_head` last).
    pub fn slot_ids(&self) -> Vec<SlotId> {
        SlotId::all(self.num_hidden_layers, self.projections()).collect()
    }

    /// The names of the model's adapter slots, space-separated, for messages
    /// (`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head`).
    pub fn slot_names(&self) -> String {
        let mut names: Vec<&str> = self.projections().iter().map(|p| p.hf_name()).collect();
        names.push("lm_head");
        names.join(" ")
    }

    /// `(out_features, in_features)` of projection `proj`.
    pub fn proj_dims(&self, proj: Proj) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        match proj {
            Proj::QProj => (q, h),
            Proj::KProj | Proj::VProj => (kv, h),
            Proj::QkvProj => (q + 2 * kv, h),
            Proj::OProj => (h, q),
            Proj::GateProj | Proj::UpProj => (i, h),
            Proj::GateUpProj => (2 * i, h),
            Proj::DownProj => (h, i),
        }
    }

    /// The HF name and `(out_features, in_features)` of every frozen weight the model
    /// keeps in a storage format, in load order: each decoder layer's projections, then
    /// `model.embed_tokens.weight`, then `lm_head.weight` unless tied to the embeddings.
    pub fn frozen_weights(&self) -> Vec<(String, (usize, usize))> {
        let layers = (0..self.num_hidden_layers).flat_map(|layer| {
            self.projections().iter().map(move |&proj| {
                let id = SlotId::layer(layer, proj);
                (format!("{id}.weight"), self.proj_dims(proj))
            })
        });
        let head = (self.vocab_size, self.hidden_size);
        let tail = [
            Some(("model.embed_tokens.weight".to_string(), head)),
            (!self.tie_word_embeddings).then(|| ("lm_head.weight".to_string(), head)),
        ];
        layers.chain(tail.into_iter().flatten()).collect()
    }

    /// `(out_features, in_features)` of the slot `id` (`lm_head`: `(vocab, hidden)`).
    pub fn slot_dims(&self, id: SlotId) -> (usize, usize) {
        match id.proj() {
            Some(p) => self.proj_dims(p),
            None => (self.vocab_size, self.hidden_size),
        }
    }

    /// Whether projection `proj` has a bias (Qwen2's q/k/v, `attention_bias`,
    /// `mlp_bias`).
    pub fn proj_bias(&self, proj: Proj) -> bool {
        match proj {
            Proj::QProj | Proj::KProj | Proj::VProj | Proj::QkvProj => self.qkv_bias,
            Proj::OProj => self.o_bias,
            _ => self.mlp_bias,
        }
    }
}

/// Largest accepted value of each size in config.json. Far above any released model
/// (Llama 3.1 405B: 126 layers, hidden 16384, vocab 128256, 131072 positions) and far
/// below sizes whose per-layer or per-position tables cannot be allocated: a size past
/// its bound is a typed error before anything is allocated from it.
pub const SIZE_LIMITS: [(&str, usize); 9] = [
    ("vocab_size", 1 << 24),
    ("hidden_size", 1 << 18),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1 << 12),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 14),
    ("max_position_embeddings", 1 << 24),
    ("sliding_window", 1 << 24),
];

/// The bound of `field` in [`SIZE_LIMITS`].
fn size_limit(field: &str) -> usize {
    SIZE_LIMITS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or(usize::MAX, |(_, l)| *l)
}

/// Refuse sizes past [`SIZE_LIMITS`] and projections whose element count overflows.
fn check_bounds(cfg: &Config) -> Result<()> {
    let sizes = [
        ("vocab_size", Some(cfg.vocab_size)),
        ("hidden_size", Some(cfg.hidden_size)),
        ("intermediate_size", Some(cfg.intermediate_size)),
        ("num_hidden_layers", Some(cfg.num_hidden_layers)),
        ("num_attention_heads", Some(cfg.num_attention_heads)),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
        ("max_position_embeddings", Some(cfg.max_position_embeddings)),
        ("sliding_window", cfg.sliding_window),
    ];
    for (field, v) in sizes {
        let limit = size_limit(field);
        if let Some(v) = v.filter(|v| *v > limit) {
            return Err(ModelError::config(field, format!("at most {limit}"), v));
        }
    }
    for (field, ids) in [
        ("bos_token_id", &cfg.bos_token_id),
        ("eos_token_id", &cfg.eos_token_id),
        ("pad_token_id", &cfg.pad_token_id),
    ] {
        let ids = ids.as_ref().map(TokenIds::to_vec).unwrap_or_default();
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::config(
                field,
                format!("a token id below vocab_size ({})", cfg.vocab_size),
                bad,
            ));
        }
    }
    let head_dim = cfg
        .head_dim
        .unwrap_or(cfg.hidden_size / cfg.num_attention_heads.max(1));
    let q = cfg.num_attention_heads * head_dim;
    if q > size_limit("hidden_size") {
        return Err(ModelError::config(
            "head_dim",
            format!(
                "num_attention_heads × head_dim at most {}",
                size_limit("hidden_size")
            ),
            format!("{} × {head_dim} = {q}", cfg.num_attention_heads),
        ));
    }
    Ok(())
}

/// Fields shared by every Llama-like family: sizes, heads, RoPE, norm.
pub(crate) fn resolve_common(cfg: &Config, family: Family) -> Result<ModelConfig> {
    let hidden_act = Activation::from_hf("hidden_act", &cfg.hidden_act)?;
    if cfg.num_attention_heads == 0 {
        return Err(ModelError::config(
            "num_attention_heads",
            "a positive integer",
            0,
        ));
    }
    check_bounds(cfg)?;
    let head_dim = cfg
        .head_dim
        .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
    let rope = Rope::from_parameters(&cfg.rope_parameters(), head_dim)?;
    Ok(ModelConfig {
        family,
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim,
        rms_norm_eps: cfg.rms_norm_eps,
        rope,
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_windows: vec![None; cfg.num_hidden_layers],
        fused_projections: false,
        hidden_act,
        norm_weight_offset: 0.0,
        sandwich_norms: false,
        embed_scale: None,
        attn_scale: (head_dim as f64).powf(-0.5),
        local_rope: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // transformers 4 style (Llama 3.1 8B's config.json, abridged).
    const LLAMA31_V4: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
      "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
      "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
      "vocab_size": 128256
    }"#;

    // transformers 4 style Qwen2.5-0.5B (abridged): tied, sliding window present but unused.
    const QWEN25_V4: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
      "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
      "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
      "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_sliding_window": false,
      "vocab_size": 151936
    }"#;

    #[test]
    fn reads_transformers_4_configs() {
        let cfg = Config::from_json(LLAMA31_V4).unwrap();
        assert_eq!(
            cfg.eos_token_id.as_ref().unwrap().to_vec(),
            vec![128001, 128008, 128009]
        );
        assert_eq!(cfg.extra["torch_dtype"], "bfloat16");
        let m = cfg.resolve().unwrap();
        assert_eq!((m.head_dim, m.num_key_value_heads), (128, 8));
        assert_eq!(m.rope.theta, 500000.0);
        assert!(matches!(
            m.rope.kind,
            crate::rope::RopeKind::Llama3 {
                original_max_position_embeddings: 8192,
                ..
            }
        ));

        let m = Config::from_json(QWEN25_V4).unwrap().resolve().unwrap();
        assert!(m.qkv_bias && !m.o_bias && m.tie_word_embeddings);
        assert_eq!(m.head_dim, 64);
        assert_eq!(
            m.sliding_windows,
            vec![None; 24],
            "use_sliding_window = false"
        );
    }

    #[test]
    fn sizes_past_their_bounds_are_refused_before_allocating() {
        for (field, value) in [
            ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
            ("head_dim", serde_json::json!(1u64 << 40)),
            ("max_position_embeddings", serde_json::json!(1u64 << 62)),
            ("vocab_size", serde_json::json!(1u64 << 40)),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(LLAMA31_V4).unwrap();
            v[field] = value;
            let e = Config::from_json(&v.to_string())
                .unwrap()
                .resolve()
                .unwrap_err();
            assert!(
                matches!(&e, ModelError::InvalidConfig { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let e = Config::from_json(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(e.to_string().contains("vocab_size"), "{e}");
        let mut cfg = Config::from_json(LLAMA31_V4).unwrap();
        cfg.model_type = "gpt2".into();
        let e = cfg.resolve().unwrap_err();
        assert!(
            matches!(&e, ModelError::UnknownModelType { found, .. } if found == "gpt2"),
            "{e}"
        );
        for family in ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text"] {
            assert!(e.to_string().contains(family), "{family}: {e}");
        }
        let mut cfg = Config::from_json(LLAMA31_V4).unwrap();
        cfg.num_key_value_heads = Some(5);
        let e = cfg.resolve().unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let mut cfg = Config::from_json(LLAMA31_V4).unwrap();
        cfg.hidden_act = "gelu".into();
        assert!(matches!(cfg.resolve(), Err(ModelError::Unsupported { .. })));
        cfg.hidden_act = "gelu_pytorch_tanh".into();
        assert_eq!(cfg.resolve().unwrap().hidden_act, Activation::GeluTanh);
        let mut cfg = Config::from_json(LLAMA31_V4).unwrap();
        cfg.rope_scaling.as_mut().unwrap().rope_type = Some("yarn".into());
        let e = cfg.resolve().unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }
}
