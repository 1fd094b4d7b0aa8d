//! `LoraConfig`: PEFT's `adapter_config.json`, with PEFT's names and meanings.
//!
//! The struct reads and writes the same JSON that PEFT's `LoraConfig.save_pretrained`
//! writes. Keys legora does not interpret (`task_type`, `revision`, `megatron_config`, …)
//! are kept in [`LoraConfig::extra`] and written back unchanged.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

/// Which modules receive an adapter (PEFT `target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A list of module names; a module matches when its full path equals a name or
    /// ends with `.{name}`.
    List(Vec<String>),
    /// A regular expression that must match the whole module path (`re.fullmatch`),
    /// or the special value `"all-linear"` (every linear layer but the output head).
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl TargetModules {
    /// Whether the module at `path` is named: equal to a list entry or ending with
    /// `.{entry}`, or matched whole by the pattern (`"all-linear"` is not special here).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            TargetModules::Pattern(p) => full_match(p).is_ok_and(|re| re.is_match(path)),
            TargetModules::List(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }
}

/// The regex that matches a whole module path, as Python's `re.fullmatch(p, path)`.
fn full_match(p: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{p})$"))
}

/// PEFT's `init_lora_weights`: how a new adapter starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform (a = √5, as `nn.Linear`), B zero — an exact no-op.
    #[default]
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `false`: A and B both random (kaiming-uniform); only for tests.
    Random,
}

impl Serialize for InitLoraWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => s.serialize_bool(true),
            InitLoraWeights::Random => s.serialize_bool(false),
            InitLoraWeights::Gaussian => s.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(InitLoraWeights::Default),
            Raw::Bool(false) => Ok(InitLoraWeights::Random),
            Raw::Str(s) if s == "gaussian" => Ok(InitLoraWeights::Gaussian),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "init_lora_weights: expected true, false or \"gaussian\", found \"{s}\" \
                 (PiSSA/OLoRA/LoftQ/EVA/CorDA initialisations are not supported)"
            ))),
        }
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_peft_type() -> String {
    "LORA".into()
}

/// A PEFT LoRA configuration (`adapter_config.json`).
///
/// Defaults follow PEFT's `LoraConfig` (`r = 8`, `lora_alpha = 8`, `lora_dropout = 0`,
/// `bias = "none"`, `init_lora_weights = true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Rank of every adapter unless [`rank_pattern`](Self::rank_pattern) says otherwise.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: `scale = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    #[serde(default = "default_alpha", serialize_with = "ser_number")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA path's input, training only. In `[0, 1)`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Modules to adapt (names, a full-match regex, or `"all-linear"`); unset: PEFT's
    /// default for Llama-family models, [`DEFAULT_TARGETS`].
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted even when `target_modules` selects them (names matched as
    /// `target_modules` names are, or a full-match regex), as PEFT's `exclude_modules`.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// rsLoRA: `scale = lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA): a trained magnitude per output row
    /// (`lora_magnitude_vector`) rescales `W + scale·B·A` row by row.
    #[serde(default)]
    pub use_dora: bool,
    /// Bias training: only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Initialisation of new adapters.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Per-module rank overrides: key is matched as `(.*\.)?{key}$` against the module path.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, matched like `rank_pattern`.
    #[serde(default, serialize_with = "ser_number_map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only adapt these layer indices (an int or a list), as PEFT.
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// Name of the `ModuleList` holding the layers (`"layers"` for Llama-family models).
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Extra fully-trained modules: not supported, must be empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Every other key of the JSON file, kept verbatim and written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// PEFT's `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// PEFT's `layers_pattern`: one name or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// A single module-list name.
    One(String),
    /// Several names.
    Many(Vec<String>),
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// The settings of one adapter on one module, resolved from a [`LoraConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterSpec {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// Dropout probability on the LoRA path.
    pub lora_dropout: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// DoRA: the adapter has a magnitude vector (PEFT `use_dora`).
    pub use_dora: bool,
    /// Initialisation.
    pub init: InitLoraWeights,
}

impl AdapterSpec {
    /// A spec with PEFT's defaults for the other fields.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            init: InitLoraWeights::Default,
        }
    }

    /// Set DoRA.
    pub fn with_dora(mut self, on: bool) -> Self {
        self.use_dora = on;
        self
    }

    /// Set the dropout.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// Set rsLoRA.
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Set the initialisation.
    pub fn with_init(mut self, init: InitLoraWeights) -> Self {
        self.init = init;
        self
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (PEFT `update_layer`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Check `r > 0`, `lora_dropout ∈ [0, 1)`, finite alpha.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.r > MAX_RANK {
            return Err(ConfigError::invalid(
                "r",
                format!("a rank in [1, {MAX_RANK}]"),
                self.r,
            ));
        }

        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(ConfigError::invalid(
                "lora_dropout",
                "a probability in [0, 1)",
                self.lora_dropout,
            ));
        }
        if !self.lora_alpha.is_finite() {
            return Err(ConfigError::invalid(
                "lora_alpha",
                "a finite number",
                self.lora_alpha,
            ));
        }
        Ok(())
    }
}

/// Largest LoRA rank accepted in a config (far above any published adapter; a model
/// also refuses a rank larger than the module it adapts).
pub const MAX_RANK: usize = 1 << 16;

/// The modules PEFT targets in Llama-family models when `target_modules` is unset.
pub const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// PEFT `LoraConfig` keys whose methods legora does not implement: refused when set
/// (not null, false, or empty), with what they would turn on.
pub const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("arrow_config", "Arrow routing"),
    ("corda_config", "CorDA initialisation"),
    ("eva_config", "EVA initialisation"),
    ("fan_in_fan_out", "Conv1D (GPT-2 style) weights"),
    ("kasa_config", "KaSA"),
    ("layer_replication", "layer replication"),
    ("loftq_config", "LoftQ initialisation"),
    ("lora_bias", "a bias on lora_B"),
    ("lora_ga_config", "LoRA-GA initialisation"),
    ("megatron_config", "Megatron parallel layers"),
    ("monteclora_config", "MonteCLoRA"),
    ("target_parameters", "LoRA on nn.Parameter targets"),
    ("trainable_token_indices", "trainable tokens"),
    ("use_bdlora", "BD-LoRA"),
    ("use_qalora", "QA-LoRA"),
    ("velora_config", "VeLoRA"),
];

/// PEFT `LoraConfig` keys that change nothing legora computes, kept and written back:
/// bookkeeping (`auto_mapping`, `inference_mode`, `peft_version`, `revision`), and options
/// that only act together with a refused one (`megatron_core` with `megatron_config`,
/// `qalora_group_size` with `use_qalora`, `ensure_weight_tying` with `modules_to_save` or
/// `trainable_token_indices`). `task_type` is checked to be `"CAUSAL_LM"`.
pub const KEPT_AS_IS: &[&str] = &[
    "auto_mapping",
    "ensure_weight_tying",
    "inference_mode",
    "megatron_core",
    "peft_version",
    "qalora_group_size",
    "revision",
    "task_type",
];

/// Whether a JSON option is set: not null, false, or an empty object / list / string.
fn is_set(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::Object(m) => !m.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Default `layers_pattern` names tried by PEFT when none is given.
const DEFAULT_LAYERS_PATTERNS: [&str; 4] = ["layers", "h", "blocks", "layer"];

impl LoraConfig {
    /// A config with rank `r`, `lora_alpha` and `target_modules` names.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                target_modules.iter().map(|s| s.to_string()).collect(),
            )),
            ..Self::default()
        }
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora` (PEFT's
    /// `LoraLayer`), for modules without a `rank_pattern` / `alpha_pattern` entry.
    pub fn scaling(&self) -> f64 {
        self.spec_with(self.r, self.lora_alpha).scaling()
    }

    /// Parse `adapter_config.json` text and validate it.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ConfigError::InvalidConfig {
            field: "adapter_config.json".into(),
            expected: "a PEFT LoraConfig".into(),
            found: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serialize as PEFT writes it (pretty JSON, unknown keys preserved).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("LoraConfig serializes")
    }

    /// Check every field legora interprets; errors name the field and the value.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(ConfigError::invalid(
                "peft_type",
                "\"LORA\"",
                &self.peft_type,
            ));
        }
        self.spec_with(self.r, self.lora_alpha).validate()?;
        if self.bias != "none" {
            return Err(ConfigError::Unsupported {
                field: "bias".into(),
                found: format!("\"{}\"", self.bias),
                reason: "only \"none\" is supported (the base bias stays frozen)".into(),
            });
        }
        if let Some(m) = &self.modules_to_save {
            if !m.is_empty() {
                return Err(ConfigError::Unsupported {
                    field: "modules_to_save".into(),
                    found: format!("{m:?}"),
                    reason: "fully trained extra modules are not supported; use LoRA targets"
                        .into(),
                });
            }
        }
        for (key, &r) in &self.rank_pattern {
            if r == 0 || r > MAX_RANK {
                return Err(ConfigError::invalid(
                    format!("rank_pattern.{key}"),
                    format!("a rank in [1, {MAX_RANK}]"),
                    r,
                ));
            }
            pattern_regex(key)?;
        }
        for key in self.alpha_pattern.keys() {
            pattern_regex(key)?;
        }
        for (key, modules) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(TargetModules::Pattern(p)) = modules {
                if p != "all-linear" {
                    full_match(p)
                        .map_err(|e| ConfigError::invalid(key, "a valid regular expression", e))?;
                }
            }
        }
        self.validate_extra()
    }

    /// PEFT options kept in [`extra`](Self::extra): the ones legora does not implement
    /// are refused when set; `task_type` must be a causal LM's.
    fn validate_extra(&self) -> Result<()> {
        for &(key, what) in NOT_IMPLEMENTED {
            if let Some(v) = self.extra.get(key).filter(|v| is_set(v)) {
                return Err(ConfigError::Unsupported {
                    field: key.into(),
                    found: v.to_string(),
                    reason: format!("{what} is not implemented by legora"),
                });
            }
        }
        match self.extra.get("task_type") {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::String(t)) if t == "CAUSAL_LM" => Ok(()),
            Some(v) => Err(ConfigError::Unsupported {
                field: "task_type".into(),
                found: v.to_string(),
                reason: "legora adapts causal language models (\"CAUSAL_LM\")".into(),
            }),
        }
    }

    fn spec_with(&self, r: usize, alpha: f64) -> AdapterSpec {
        AdapterSpec {
            r,
            lora_alpha: alpha,
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            init: self.init_lora_weights,
        }
    }

    /// Whether the module at `path` (e.g. `model.layers.3.self_attn.q_proj`) gets an
    /// adapter, following PEFT's `check_target_module_exists`.
    ///
    /// `is_output_head` marks the LM head, which `"all-linear"` excludes. A module that
    /// `exclude_modules` names is never a target.
    pub fn is_target(&self, path: &str, is_output_head: bool) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|e| e.matches(path))
        {
            return false;
        }
        let matched = match &self.target_modules {
            // PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for the Llama,
            // Qwen2 and Mistral families
            None => DEFAULT_TARGETS
                .iter()
                .any(|n| path.ends_with(&format!(".{n}"))),
            Some(TargetModules::Pattern(p)) if p == "all-linear" => !is_output_head,
            Some(t) => t.matches(path),
        };
        if !matched {
            return false;
        }
        match &self.layers_to_transform {
            None => true,
            Some(layers) => {
                let wanted: Vec<usize> = match layers {
                    LayersToTransform::One(i) => vec![*i],
                    LayersToTransform::Many(v) => v.clone(),
                };
                match self.layer_index(path) {
                    Some(i) => wanted.contains(&i),
                    None => false,
                }
            }
        }
    }

    /// The layer index in `path` found through `layers_pattern` (PEFT's regex
    /// `.*\.{pattern}\.(\d+)\.`).
    pub fn layer_index(&self, path: &str) -> Option<usize> {
        let patterns: Vec<String> = match &self.layers_pattern {
            None => DEFAULT_LAYERS_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            Some(LayersPattern::One(p)) => vec![p.clone()],
            Some(LayersPattern::Many(v)) => v.clone(),
        };
        let parts: Vec<&str> = path.split('.').collect();
        for w in parts.windows(3) {
            if patterns.iter().any(|p| p == w[0]) {
                if let Ok(i) = w[1].parse::<usize>() {
                    return Some(i);
                }
            }
        }
        None
    }

    /// The adapter settings for the module at `path`, with `rank_pattern` and
    /// `alpha_pattern` applied (first matching key, as PEFT's `get_pattern_key`).
    pub fn spec_for(&self, path: &str) -> AdapterSpec {
        let r = first_pattern_match(&self.rank_pattern, path).unwrap_or(self.r);
        let alpha = first_pattern_match(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        self.spec_with(r, alpha)
    }
}

/// Write integral floats as JSON integers, as Python does for `lora_alpha=16`.
fn ser_number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_number_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        let v = if v.fract() == 0.0 && v.abs() < 1e15 {
            serde_json::Value::from(*v as i64)
        } else {
            serde_json::Value::from(*v)
        };
        map.serialize_entry(k, &v)?;
    }
    map.end()
}

fn pattern_regex(key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| ConfigError::invalid(format!("pattern key `{key}`"), "a valid regex", e))
}

fn first_pattern_match<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        pattern_regex(k)
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| *v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // A config as PEFT 0.17 writes it (abridged to the keys that vary).
    const PEFT_JSON: &str = r#"{
      "alpha_pattern": {},
      "auto_mapping": null,
      "base_model_name_or_path": "tiny-llama",
      "bias": "none",
      "fan_in_fan_out": false,
      "inference_mode": true,
      "init_lora_weights": true,
      "layers_pattern": null,
      "layers_to_transform": null,
      "lora_alpha": 16,
      "lora_dropout": 0.05,
      "modules_to_save": null,
      "peft_type": "LORA",
      "r": 8,
      "rank_pattern": {},
      "revision": null,
      "target_modules": ["v_proj", "q_proj"],
      "task_type": "CAUSAL_LM",
      "use_dora": false,
      "use_rslora": false
    }"#;

    #[test]
    fn peft_json_round_trips_with_unknown_keys() {
        let cfg = LoraConfig::from_json(PEFT_JSON).unwrap();
        assert_eq!(cfg.r, 8);
        assert_eq!(cfg.lora_alpha, 16.0);
        assert_eq!(cfg.extra["task_type"], "CAUSAL_LM");
        let back: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        let orig: serde_json::Value = serde_json::from_str(PEFT_JSON).unwrap();
        for (k, v) in orig.as_object().unwrap() {
            assert_eq!(v, &back[k], "key {k}");
        }
    }

    #[test]
    fn target_matching_follows_peft() {
        let cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
        assert!(cfg.is_target("model.layers.0.self_attn.q_proj", false));
        assert!(!cfg.is_target("model.layers.0.self_attn.k_proj", false));
        assert!(!cfg.is_target("model.layers.0.self_attn.xq_proj", false));
        let mut cfg = cfg;
        cfg.target_modules = Some(TargetModules::Pattern(r".*\.(q|k)_proj".into()));
        assert!(cfg.is_target("model.layers.1.self_attn.k_proj", false));
        assert!(!cfg.is_target("model.layers.1.self_attn.v_proj", false));
        cfg.target_modules = Some(TargetModules::Pattern("all-linear".into()));
        assert!(cfg.is_target("model.layers.1.mlp.down_proj", false));
        assert!(!cfg.is_target("lm_head", true));
        cfg.layers_to_transform = Some(LayersToTransform::Many(vec![1]));
        assert!(cfg.is_target("model.layers.1.mlp.down_proj", false));
        assert!(!cfg.is_target("model.layers.0.mlp.down_proj", false));
        assert!(!cfg.is_target("model.layers.10.mlp.down_proj", false));
    }

    #[test]
    fn exclude_modules_follow_peft() {
        let mut cfg = LoraConfig {
            target_modules: Some(TargetModules::Pattern("all-linear".into())),
            exclude_modules: Some(TargetModules::List(vec!["down_proj".into()])),
            ..LoraConfig::default()
        };
        assert!(cfg.is_target("model.layers.0.mlp.up_proj", false));
        assert!(!cfg.is_target("model.layers.0.mlp.down_proj", false));
        // a regex must match the whole path
        cfg.exclude_modules = Some(TargetModules::Pattern(r".*\.0\.self_attn\..*".into()));
        assert!(!cfg.is_target("model.layers.0.self_attn.q_proj", false));
        assert!(cfg.is_target("model.layers.1.self_attn.q_proj", false));
        cfg.exclude_modules = Some(TargetModules::Pattern("self_attn".into()));
        assert!(cfg.is_target("model.layers.1.self_attn.q_proj", false));
        let back = LoraConfig::from_json(&cfg.to_json()).unwrap();
        assert_eq!(back.exclude_modules, cfg.exclude_modules);
    }

    #[test]
    fn unset_targets_are_pefts_llama_default() {
        let cfg = LoraConfig::default();
        assert!(cfg.is_target("model.layers.0.self_attn.q_proj", false));
        assert!(cfg.is_target("model.layers.3.self_attn.v_proj", false));
        assert!(!cfg.is_target("model.layers.0.self_attn.k_proj", false));
        assert!(!cfg.is_target("lm_head", true));
    }

    #[test]
    fn rank_and_alpha_patterns() {
        let mut cfg = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
        cfg.rank_pattern.insert("v_proj".into(), 2);
        cfg.alpha_pattern
            .insert(r"layers\.1\.self_attn\.q_proj".into(), 4.0);
        let s = cfg.spec_for("model.layers.0.self_attn.v_proj");
        assert_eq!((s.r, s.lora_alpha), (2, 16.0));
        let s = cfg.spec_for("model.layers.1.self_attn.q_proj");
        assert_eq!((s.r, s.lora_alpha), (8, 4.0));
        assert_eq!(s.scaling(), 0.5);
        let s = cfg.spec_for("model.layers.0.self_attn.q_proj");
        assert_eq!(s.scaling(), 2.0);
        cfg.use_rslora = true;
        assert_eq!(
            cfg.spec_for("model.layers.0.self_attn.q_proj").scaling(),
            16.0 / 8f64.sqrt()
        );
    }

    #[test]
    fn bad_configs_name_field_and_value() {
        let e = LoraConfig::from_json(r#"{"r": 0}"#).unwrap_err();
        assert!(
            matches!(&e, ConfigError::InvalidConfig { field, found, .. } if field == "r" && found == "0"),
            "{e}"
        );
        let e = LoraConfig::from_json(r#"{"lora_dropout": 1.0}"#).unwrap_err();
        assert!(
            e.to_string().contains("lora_dropout") && e.to_string().contains('1'),
            "{e}"
        );
        let e = LoraConfig::from_json(r#"{"lora_dropout": -0.1}"#).unwrap_err();
        assert!(e.to_string().contains("lora_dropout"), "{e}");
        let e = LoraConfig::from_json(r#"{"bias": "all"}"#).unwrap_err();
        assert!(
            e.to_string().contains("bias") && e.to_string().contains("all"),
            "{e}"
        );
        let e = LoraConfig::from_json(r#"{"modules_to_save": ["lm_head"]}"#).unwrap_err();
        assert!(e.to_string().contains("modules_to_save"), "{e}");
        let e = LoraConfig::from_json(r#"{"lora_bias": true}"#).unwrap_err();
        assert!(e.to_string().contains("lora_bias"), "{e}");
        let e = LoraConfig::from_json(r#"{"exclude_modules": "(unclosed"}"#).unwrap_err();
        assert!(e.to_string().contains("exclude_modules"), "{e}");
        let e = LoraConfig::from_json(r#"{"init_lora_weights": "pissa"}"#).unwrap_err();
        assert!(e.to_string().contains("pissa"), "{e}");
        let e = LoraConfig::from_json(r#"{"r": "eight"}"#).unwrap_err();
        assert!(e.to_string().contains("adapter_config.json"), "{e}");
        let e = LoraConfig::from_json(r#"{"target_modules": "(unclosed"}"#).unwrap_err();
        assert!(e.to_string().contains("target_modules"), "{e}");
    }

    #[test]
    fn init_lora_weights_serde() {
        for (json, v) in [
            ("true", InitLoraWeights::Default),
            ("false", InitLoraWeights::Random),
            ("\"gaussian\"", InitLoraWeights::Gaussian),
        ] {
            let got: InitLoraWeights = serde_json::from_str(json).unwrap();
            assert_eq!(got, v);
            assert_eq!(serde_json::to_string(&v).unwrap(), json);
        }
    }
}
