//! The run file: one TOML file that describes a whole training run.
//!
//! The format is documented in `docs/run-file.md` (repository root) and in
//! [`RunFile`]'s fields. Every table rejects unknown keys; every error names the file,
//! the line and column, the dotted key (`stages.experts.learning_rate`,
//! `tasks[1].train`) and what was expected versus found.
//!
//! ```toml
//! seed = 42
//! output_dir = "runs/demo"
//!
//! [model]
//! path = "models/tiny-llama"
//! template = "alpaca"
//!
//! [[tasks]]
//! name = "medical"
//! format = "medical/alpaca"
//! train = "data/medical/train.json"
//!
//! [lora]
//! r = 8
//! lora_alpha = 16
//! target_modules = ["q_proj", "v_proj"]
//!
//! [stages.experts]
//! learning_rate = 2e-4
//! max_steps = 200
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use legora_data::{Mixing, Template, ValSplit};
use legora_nn::{ConfigError, LoraConfig, RouterConfig};
use serde::{Deserialize, Serialize};
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{Result, TrainError};
use crate::lr_groups::{LrGroups, ParamKind};
use crate::schedule::ScheduleKind;

/// PEFT's default `loraplus_lr_embedding`, the only value accepted.
pub const LORAPLUS_LR_EMBEDDING: f64 = 1e-6;

fn default_seed() -> u64 {
    42
}
fn default_template() -> String {
    "alpaca".into()
}
/// Largest `batch_size`, `eval_batch_size` and `gradient_accumulation_steps` accepted
/// (rows are allocated per batch: a size past this is refused before any data is read).
pub const MAX_BATCH: usize = 1 << 16;

/// Largest `model.max_seq_len` accepted before the model is read (the model's own
/// `max_position_embeddings` is checked once it is).
pub const MAX_SEQ_LEN: usize = 1 << 24;

fn default_max_seq_len() -> usize {
    512
}
fn default_true() -> bool {
    true
}

/// The whole run file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Run name (default: the run file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Where outputs go, relative to the run file's folder (default `runs/<name>`).
    #[serde(default)]
    pub output_dir: Option<String>,
    /// Seed of everything random: splits, shuffles, sampling, initialisation, dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The frozen base model.
    pub model: ModelSection,
    /// Data pipeline options shared by all tasks.
    #[serde(default)]
    pub data: DataSection,
    /// One entry per task (= per expert), in expert order.
    pub tasks: Vec<TaskSection>,
    /// Adapter settings of every expert without a preset: PEFT's `LoraConfig`, with
    /// PEFT's names and defaults (`r = 8`, `lora_alpha = 8`, `target_modules` unset =
    /// PEFT's default for Llama-family models, `["q_proj", "v_proj"]`).
    #[serde(default)]
    pub lora: LoraConfig,
    /// Router settings, MixLoRA names (`num_experts` is the number of tasks).
    #[serde(default)]
    pub moe: RouterConfig,
    /// The training stages and the evaluation.
    #[serde(default)]
    pub stages: StagesSection,
}

/// The storage dtype of the frozen base weights (the products, the adapters and the
/// optimizer state stay f32: each weight tile is widened to f32 inside the products).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16 frozen weights.
    Bf16,
    /// IEEE half frozen weights.
    F16,
}

impl Precision {
    /// The hub's dtype.
    pub fn dtype(self) -> legora_hub::FloatDtype {
        match self {
            Precision::F32 => legora_hub::FloatDtype::F32,
            Precision::Bf16 => legora_hub::FloatDtype::BF16,
            Precision::F16 => legora_hub::FloatDtype::F16,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF model folder (config.json, safetensors, tokenizer.json), relative to the run file.
    pub path: Spanned<String>,
    /// Prompt template: `alpaca`, `chatml`, `raw`, or `model` (the tokenizer's
    /// `chat_template`).
    #[serde(default = "default_template")]
    pub template: String,
    /// Longest training sequence in tokens (longer ones are truncated).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// The frozen weights' storage: `f32` (default), `bf16` or `f16`.
    #[serde(default)]
    pub precision: Precision,
    /// `[model.quantization]`: transformers' `BitsAndBytesConfig` (`load_in_4bit`,
    /// `load_in_8bit`, `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`,
    /// `bnb_4bit_compute_dtype`) for the frozen projections.
    #[serde(default)]
    pub quantization: Option<legora_hub::BitsAndBytesConfig>,
    /// Keep only each decoder layer's input in the forward pass and recompute the layer
    /// in the backward: the same gradients, one layer's activations in memory instead of
    /// all of them (transformers' `gradient_checkpointing_enable()`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn default_mixing() -> String {
    "proportional".into()
}
fn default_val_fraction() -> f64 {
    0.1
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// `proportional` (default), `uniform`, `temperature` or `balanced`.
    #[serde(default = "default_mixing")]
    pub mixing: String,
    /// T of temperature mixing, `p_i ∝ n_i^(1/T)`.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Share of each task held out for validation when the task has no `eval` file.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Pack several examples of one task into each row.
    #[serde(default)]
    pub packing: bool,
    /// Round padded lengths up to a multiple of this.
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
    /// In the `experts` and `single_lora` stages, run each task's rows of a batch as
    /// their own forward pass padded to their own longest row: the same loss and
    /// gradients, fewer padded tokens when the tasks' lengths differ (the router stage
    /// always runs whole batches, since its load-balancing loss spans the tasks).
    #[serde(default)]
    pub pad_per_task: bool,
    /// In the `experts` stage, each task's rows of a batch run forward *and backward* on
    /// their own, one task after another, their gradients summed before the optimizer
    /// step: the same gradients as the whole batch, with only one task's activations
    /// alive at a time (peak memory of one task's rows instead of all of them).
    #[serde(default)]
    pub backward_per_task: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            mixing: default_mixing(),
            temperature: None,
            val_fraction: default_val_fraction(),
            packing: false,
            pad_to_multiple_of: None,
            pad_per_task: false,
            backward_per_task: false,
        }
    }
}

/// One `[[tasks]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// Task and expert name (`[a-z0-9][a-z0-9._-]*`), used for `experts/<name>/`.
    pub name: String,
    /// Plugin format `<plugin>/<format>`, e.g. `medical/alpaca`.
    pub format: String,
    /// Training file, relative to the run file.
    pub train: Spanned<String>,
    /// Held-out file for validation and evaluation (default: a `val_fraction` split).
    #[serde(default)]
    pub eval: Option<Spanned<String>>,
    /// Evaluator `<plugin>/<evaluator>` (default: the format's default evaluator).
    #[serde(default)]
    pub evaluator: Option<String>,
    /// Parameters passed to the format parser.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Use at most this many training records.
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// A plugin's adapter preset `<plugin>/<preset>`: its LoRA settings (r, lora_alpha,
    /// target_modules, dropout, …) replace `[lora]` for this task's expert, and its
    /// training hints may set the expert's learning rate.
    #[serde(default)]
    pub preset: Option<String>,
    /// Learning rate of this task's expert in the `experts` stage (default: the preset's
    /// `learning_rate` hint, else the stage's).
    #[serde(default)]
    pub learning_rate: Option<f64>,
}

/// `[stages]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagesSection {
    /// Stage 1: one expert per task, trained concurrently (task-routed).
    #[serde(default)]
    pub experts: StageSection,
    /// Stage 2: the router (experts frozen by default).
    #[serde(default)]
    pub router: StageSection,
    /// Stage 3: evaluation.
    #[serde(default)]
    pub eval: EvalSection,
}

/// Whether the experts train during the router stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertsMode {
    /// Experts frozen; only the router trains (default).
    #[default]
    Frozen,
    /// Experts and router train together.
    Joint,
}

/// One training stage (`[stages.experts]`, `[stages.router]`). Names follow HF
/// `TrainingArguments`; every key is optional.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    /// Run this stage (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Peak learning rate (default 2e-4 for experts, 1e-3 for the router).
    #[serde(default)]
    pub learning_rate: Option<f64>,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): `lora_B` and DoRA's
    /// `lora_magnitude_vector` train at `learning_rate × loraplus_lr_ratio` (default: no
    /// LoRA+, every tensor at `learning_rate`).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
    /// PEFT's learning rate of LoRA on embedding layers under LoRA+; legora has no
    /// embedding LoRA, so only PEFT's default, 1e-6, is accepted.
    #[serde(default)]
    pub loraplus_lr_embedding: Option<f64>,
    /// Per-kind multipliers of `learning_rate` (`lora_A`, `lora_B`,
    /// `lora_magnitude_vector`, `router`).
    #[serde(default)]
    pub lr_groups: LrGroups,
    /// Optimizer steps; overrides `num_train_epochs`.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Passes over the training rows (default 1).
    #[serde(default)]
    pub num_train_epochs: Option<f64>,
    /// Rows per micro-batch (default 8).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[serde(default)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Linear warmup steps (default 0).
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// Warmup as a share of all steps (exclusive with `warmup_steps`).
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// `cosine` (default), `linear` or `constant`.
    #[serde(default)]
    pub lr_scheduler_type: Option<String>,
    /// Floor of the decay as a share of `learning_rate` (default 0).
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    /// Global-norm gradient clipping (default 1.0; 0 disables).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay (default 0).
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// AdamW β1 (default 0.9).
    #[serde(default)]
    pub adam_beta1: Option<f64>,
    /// AdamW β2 (default 0.999).
    #[serde(default)]
    pub adam_beta2: Option<f64>,
    /// AdamW ε (default 1e-8).
    #[serde(default)]
    pub adam_epsilon: Option<f64>,
    /// Validate every this many steps (default: only at the end).
    #[serde(default)]
    pub eval_steps: Option<usize>,
    /// Rows per validation batch (default `batch_size`).
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Checkpoint every this many steps (default: only at the end).
    #[serde(default)]
    pub save_steps: Option<usize>,
    /// Checkpoints kept (default 2; the best one is kept apart).
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    /// Stop after this many validations without improvement (default: never).
    #[serde(default)]
    pub early_stopping_patience: Option<usize>,
    /// Improvement smaller than this does not count (default 0).
    #[serde(default)]
    pub early_stopping_threshold: Option<f64>,
    /// Write a metrics line every this many steps (default 1).
    #[serde(default)]
    pub logging_steps: Option<usize>,
    /// Stage seed (default: the run's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Router stage only: `frozen` (default) or `joint`.
    #[serde(default)]
    pub experts: Option<ExpertsMode>,
    /// Router stage only: weight of the supervised routing loss (cross-entropy of the
    /// router's probabilities against each row's task), default 0.
    #[serde(default)]
    pub routing_loss_coef: Option<f64>,
}

fn default_eval_batch() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_baselines() -> Vec<String> {
    vec![
        "base".into(),
        "single_lora".into(),
        "mixture".into(),
        "oracle".into(),
    ]
}

/// `[stages.eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Run the evaluation (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Rows per generation/scoring batch (default 8).
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Generation budget per answer (default 64).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Evaluate at most this many held-out records per task.
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Which models to compare: `base`, `single_lora`, `mixture`, `oracle` (the experts
    /// with each task routed to its own expert).
    #[serde(default = "default_baselines")]
    pub baselines: Vec<String>,
    /// Rank of the single-LoRA baseline (default `r × number of tasks`: the same
    /// trainable-parameter budget as the experts).
    #[serde(default)]
    pub single_lora_r: Option<usize>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: default_eval_batch(),
            max_new_tokens: default_max_new_tokens(),
            max_samples: None,
            baselines: default_baselines(),
            single_lora_r: None,
        }
    }
}

/// Which training stage a [`StageSection`] configures (their defaults differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    /// Concurrent task-routed expert training.
    Experts,
    /// Router training.
    Router,
    /// The single-LoRA baseline (trained with the experts stage's settings).
    SingleLora,
}

impl StageKind {
    /// `experts`, `router`, `single_lora`.
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Experts => "experts",
            StageKind::Router => "router",
            StageKind::SingleLora => "single_lora",
        }
    }
}

/// A stage's settings with defaults applied and steps resolved against the data size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// LoRA+ ratio of `lora_B`'s (and `lora_magnitude_vector`'s) learning rate to
    /// `learning_rate` (`None` = 1).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
    /// Per-kind multipliers of the learning rate (they override `loraplus_lr_ratio`).
    #[serde(default)]
    pub lr_groups: LrGroups,
    /// Optimizer steps.
    pub total_steps: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Decay shape.
    pub schedule: ScheduleKind,
    /// Floor of the decay (share of the peak).
    pub min_lr_ratio: f64,
    /// Global-norm clipping threshold (`None` = off).
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Validate every this many steps (`None` = at the end only).
    pub eval_steps: Option<usize>,
    /// Rows per validation batch.
    pub eval_batch_size: usize,
    /// Checkpoint every this many steps (`None` = at the end only).
    pub save_steps: Option<usize>,
    /// Checkpoints kept.
    pub save_total_limit: usize,
    /// Early-stopping patience in validations.
    pub early_stopping_patience: Option<usize>,
    /// Minimal improvement.
    pub early_stopping_threshold: f64,
    /// Metrics line every this many steps.
    pub logging_steps: usize,
    /// Seed of this stage (data order, dropout).
    pub seed: u64,
    /// Router stage: experts frozen or joint.
    pub experts: ExpertsMode,
    /// Router stage: supervised routing loss weight.
    pub routing_loss_coef: f64,
}

impl TrainSettings {
    /// Settings for `total_steps` steps with every default (lr 2e-4, batch 8, cosine,
    /// no warmup, clipping at 1.0, AdamW ε 1e-8, no weight decay).
    pub fn new(total_steps: usize, seed: u64) -> Self {
        Self {
            learning_rate: 2e-4,
            loraplus_lr_ratio: None,
            lr_groups: LrGroups::default(),
            total_steps,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            warmup_steps: 0,
            schedule: ScheduleKind::Cosine,
            min_lr_ratio: 0.0,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            eval_steps: None,
            eval_batch_size: 8,
            save_steps: None,
            save_total_limit: 2,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            logging_steps: 1,
            seed,
            experts: ExpertsMode::Frozen,
            routing_loss_coef: 0.0,
        }
    }

    /// The multiplier of the learning rate for tensors of `kind`: its `lr_groups` entry,
    /// else `loraplus_lr_ratio` for `lora_B` and `lora_magnitude_vector` (PEFT's LoRA+
    /// puts every 1-D tensor with `lora_B`), else 1.
    pub fn lr_scale(&self, kind: ParamKind) -> f64 {
        let loraplus = matches!(kind, ParamKind::LoraB | ParamKind::LoraMagnitudeVector);
        self.lr_groups
            .get(kind)
            .or(self.loraplus_lr_ratio.filter(|_| loraplus))
            .unwrap_or(1.0)
    }
}

/// A loaded, checked run file.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The parsed file.
    pub file: RunFile,
    /// Path of the run file.
    pub path: PathBuf,
    /// Its folder: relative paths are resolved against it.
    pub dir: PathBuf,
    source: String,
    index: SpanIndex,
}

/// One key of the document: its dotted path, the key's span and the value's span.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    key: Range<usize>,
    value: Range<usize>,
}

#[derive(Debug, Clone, Default)]
struct SpanIndex {
    entries: Vec<Entry>,
}

impl SpanIndex {
    fn build(table: &DeTable<'_>) -> Self {
        let mut idx = Self::default();
        idx.walk_table(table, "");
        idx
    }

    fn walk_table(&mut self, table: &DeTable<'_>, prefix: &str) {
        for (k, v) in table.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            self.entries.push(Entry {
                path: path.clone(),
                key: k.span(),
                value: v.span(),
            });
            self.walk_value(v.get_ref(), &path);
        }
    }

    fn walk_value(&mut self, v: &DeValue<'_>, path: &str) {
        match v {
            DeValue::Table(t) => self.walk_table(t, path),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.entries.push(Entry {
                        path: p.clone(),
                        key: item.span(),
                        value: item.span(),
                    });
                    self.walk_value(item.get_ref(), &p);
                }
            }
            _ => {}
        }
    }

    /// The innermost key whose key or value span contains `pos`.
    fn path_at(&self, span: &Range<usize>) -> Option<&Entry> {
        let within = |r: &Range<usize>| {
            r.start <= span.start && span.end <= r.end.max(r.start + 1) && r.start < r.end
        };
        self.entries
            .iter()
            .filter(|e| within(&e.key) || within(&e.value))
            .min_by_key(|e| {
                let k = e.key.end.saturating_sub(e.key.start);
                let v = e.value.end.saturating_sub(e.value.start);
                if within(&e.key) {
                    k
                } else {
                    v
                }
            })
    }

    /// The innermost entry whose value encloses `span` (a table holding it);
    /// `None` at the top level.
    fn table_at(&self, span: &Range<usize>) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| {
                e.value.start < e.value.end
                    && e.value.start <= span.start
                    && span.end <= e.value.end
            })
            .min_by_key(|e| e.value.end - e.value.start)
    }

    fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(pos, |i| pos - i - 1) + 1;
    (line, col)
}

/// The field named in a serde message such as "unknown field `x`, expected ..." or
/// "missing field `x`".
fn named_field(message: &str) -> Option<&str> {
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return rest.split('`').next();
        }
    }
    None
}

impl RunConfig {
    /// Read, parse and check a run file (task files must exist; the model folder is
    /// checked by [`check_model_path`](Self::check_model_path)).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = legora_hub::io::read_regular(path)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            TrainError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        Self::parse(&text, path)
    }

    /// Parse run-file `text` as if read from `path` (relative paths resolve against
    /// `path`'s folder) and check it.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let config_err =
            |line: Option<(usize, usize)>, key: String, message: String| TrainError::Config {
                file: path.to_path_buf(),
                line: line.map(|l| l.0),
                column: line.map(|l| l.1),
                key,
                message,
            };
        let doc = DeTable::parse(text).map_err(|e| {
            let at = e.span().map(|s| line_col(text, s.start));
            config_err(at, "(syntax)".into(), e.message().trim().to_string())
        })?;
        let index = SpanIndex::build(doc.get_ref());
        let file: RunFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            let span = e.span().unwrap_or(0..0);
            let entry = if message.starts_with("missing field `") {
                // the span is the table that lacks the field (the whole document for
                // a top-level key): name the field under that table, not under the
                // key the span happens to start at
                index.table_at(&span)
            } else {
                index.path_at(&span)
            };
            let mut key = entry.map(|e| e.path.clone()).unwrap_or_default();
            if let Some(field) = named_field(&message) {
                let ends_with_field = key == field || key.ends_with(&format!(".{field}"));
                if !ends_with_field {
                    key = if key.is_empty() {
                        field.to_string()
                    } else {
                        format!("{key}.{field}")
                    };
                }
            }
            if key.is_empty() {
                key = "(document)".into();
            }
            config_err(Some(line_col(text, span.start)), key, message)
        })?;
        let cfg = Self {
            file,
            path: path.to_path_buf(),
            dir,
            source: text.to_string(),
            index,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the run file sets `key` (a dotted path such as `model.max_seq_len`), as
    /// opposed to leaving it to its default.
    pub fn has_key(&self, key: &str) -> bool {
        self.index.get(key).is_some()
    }

    /// An error about `key`, located at its line when the key is in the file (else at
    /// its table's line).
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> TrainError {
        let mut probe = key.to_string();
        let entry = loop {
            if let Some(e) = self.index.get(&probe) {
                break Some(e);
            }
            match probe.rfind(['.', '[']) {
                Some(i) => probe.truncate(i),
                None => break None,
            }
        };
        let at = entry.map(|e| line_col(&self.source, e.key.start));
        TrainError::Config {
            file: self.path.clone(),
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn spanned_error(&self, key: &str, span: Range<usize>, message: String) -> TrainError {
        let (line, col) = line_col(&self.source, span.start);
        TrainError::Config {
            file: self.path.clone(),
            line: Some(line),
            column: Some(col),
            key: key.to_string(),
            message,
        }
    }

    /// Resolve a path written in the run file against the run file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The run name: `name`, else the run file's stem.
    pub fn name(&self) -> String {
        self.file.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into())
        })
    }

    /// The output folder (resolved).
    pub fn output_dir(&self) -> PathBuf {
        match &self.file.output_dir {
            Some(d) => self.resolve(d),
            None => self.dir.join("runs").join(self.name()),
        }
    }

    /// How the base's frozen weights are stored (`[model] precision` and
    /// `[model.quantization]`), checked: a bad key is an error pointing at it.
    pub fn load_options(&self) -> Result<legora_hub::LoadOptions> {
        let m = &self.file.model;
        let quantize = match &m.quantization {
            None => None,
            Some(q) => q.quantize().map_err(|e| {
                let key = match &e {
                    legora_hub::HubError::Options { key, .. } => {
                        format!("model.quantization.{key}")
                    }
                    _ => "model.quantization".into(),
                };
                self.error_at(&key, e.to_string())
            })?,
        };
        Ok(legora_hub::LoadOptions::new(m.precision.dtype(), quantize))
    }

    /// The model folder (resolved).
    pub fn model_path(&self) -> PathBuf {
        self.resolve(self.file.model.path.get_ref())
    }

    /// Check that `model.path` is an existing folder.
    pub fn check_model_path(&self) -> Result<PathBuf> {
        let p = self.model_path();
        if !p.is_dir() {
            return Err(self.spanned_error(
                "model.path",
                self.file.model.path.span(),
                format!(
                    "expected an existing model folder, found no folder at {}",
                    p.display()
                ),
            ));
        }
        Ok(p)
    }

    /// Training file of task `i` (resolved).
    pub fn train_file(&self, i: usize) -> PathBuf {
        self.resolve(self.file.tasks[i].train.get_ref())
    }

    /// Held-out file of task `i` (resolved), if given.
    pub fn eval_file(&self, i: usize) -> Option<PathBuf> {
        self.file.tasks[i]
            .eval
            .as_ref()
            .map(|e| self.resolve(e.get_ref()))
    }

    /// Task names in expert order.
    pub fn task_names(&self) -> Vec<String> {
        self.file.tasks.iter().map(|t| t.name.clone()).collect()
    }

    /// The prompt template (`model` must be resolved by the caller, which owns the
    /// tokenizer's chat template; this returns `None` for it).
    pub fn template(&self) -> Option<Template> {
        match self.file.model.template.as_str() {
            "model" => None,
            s => s.parse().ok(),
        }
    }

    /// The mixing rule of `[data]`.
    pub fn mixing(&self) -> Mixing {
        Mixing::from_name(&self.file.data.mixing, self.file.data.temperature)
            .expect("validated at load")
    }

    /// How much of a task without an `eval` file is held out.
    pub fn val_split(&self) -> ValSplit {
        ValSplit::Fraction(self.file.data.val_fraction)
    }

    /// The PEFT config of `[lora]` (every expert without a preset).
    pub fn lora_config(&self) -> LoraConfig {
        self.file.lora.clone()
    }

    /// The router config (`num_experts` = number of tasks).
    pub fn router_config(&self) -> RouterConfig {
        RouterConfig {
            num_experts: self.file.tasks.len(),
            ..self.file.moe.clone()
        }
    }

    /// Whether a stage runs.
    pub fn stage_enabled(&self, stage: StageKind) -> bool {
        match stage {
            StageKind::Experts | StageKind::SingleLora => {
                self.file.stages.experts.enabled.unwrap_or(true)
            }
            StageKind::Router => self.file.stages.router.enabled.unwrap_or(true),
        }
    }

    /// The settings of a stage, with `batches_per_epoch` (from the stage's loader)
    /// turning `num_train_epochs` into steps.
    pub fn train_settings(
        &self,
        stage: StageKind,
        batches_per_epoch: usize,
    ) -> Result<TrainSettings> {
        let (s, key) = match stage {
            StageKind::Experts | StageKind::SingleLora => {
                (&self.file.stages.experts, "stages.experts")
            }
            StageKind::Router => (&self.file.stages.router, "stages.router"),
        };
        let mut t = TrainSettings::new(0, s.seed.unwrap_or(self.file.seed));
        if stage == StageKind::Router {
            t.learning_rate = 1e-3;
        }
        t.learning_rate = s.learning_rate.unwrap_or(t.learning_rate);
        t.loraplus_lr_ratio = s.loraplus_lr_ratio;
        t.lr_groups = s.lr_groups;
        t.batch_size = s.batch_size.unwrap_or(t.batch_size);
        t.gradient_accumulation_steps = s.gradient_accumulation_steps.unwrap_or(1);
        t.total_steps = match (s.max_steps, s.num_train_epochs) {
            (Some(n), _) => n,
            (None, epochs) => {
                let epochs = epochs.unwrap_or(1.0);
                let micro = (epochs * batches_per_epoch as f64).ceil() as usize;
                micro.div_ceil(t.gradient_accumulation_steps).max(1)
            }
        };
        t.warmup_steps = match (s.warmup_steps, s.warmup_ratio) {
            (Some(n), _) => n,
            (None, Some(r)) => (r * t.total_steps as f64).ceil() as usize,
            (None, None) => 0,
        };
        if let Some(kind) = &s.lr_scheduler_type {
            t.schedule = kind
                .parse()
                .map_err(|m: String| self.error_at(&format!("{key}.lr_scheduler_type"), m))?;
        }
        t.min_lr_ratio = s.min_lr_ratio.unwrap_or(0.0);
        t.max_grad_norm = match s.max_grad_norm {
            Some(v) if v <= 0.0 => None,
            Some(v) => Some(v),
            None => Some(1.0),
        };
        t.weight_decay = s.weight_decay.unwrap_or(t.weight_decay);
        t.adam_beta1 = s.adam_beta1.unwrap_or(t.adam_beta1);
        t.adam_beta2 = s.adam_beta2.unwrap_or(t.adam_beta2);
        t.adam_epsilon = s.adam_epsilon.unwrap_or(t.adam_epsilon);
        t.eval_steps = s.eval_steps;
        t.eval_batch_size = s.eval_batch_size.unwrap_or(t.batch_size);
        t.save_steps = s.save_steps;
        t.save_total_limit = s.save_total_limit.unwrap_or(2);
        t.early_stopping_patience = s.early_stopping_patience;
        t.early_stopping_threshold = s.early_stopping_threshold.unwrap_or(0.0);
        t.logging_steps = s.logging_steps.unwrap_or(1);
        t.experts = s.experts.unwrap_or_default();
        t.routing_loss_coef = s.routing_loss_coef.unwrap_or(0.0);
        Ok(t)
    }

    fn validate(&self) -> Result<()> {
        let f = &self.file;
        // model
        if f.model.max_seq_len == 0 || f.model.max_seq_len > MAX_SEQ_LEN {
            return Err(self.error_at(
                "model.max_seq_len",
                format!("expected 1..={MAX_SEQ_LEN}, found {}", f.model.max_seq_len),
            ));
        }
        if f.model.template != "model" {
            if let Err(e) = f.model.template.parse::<Template>() {
                return Err(self.error_at("model.template", data_message(&e)));
            }
        }
        // data
        if let Err(e) = Mixing::from_name(&f.data.mixing, f.data.temperature) {
            let key = match &e {
                legora_data::DataError::Config { key, .. } if key == "temperature" => {
                    "data.temperature"
                }
                _ => "data.mixing",
            };
            return Err(self.error_at(key, data_message(&e)));
        }
        // Settings the pipeline cannot honour yet are refused, not silently ignored.
        self.load_options()?;
        if f.data.packing {
            return Err(self.error_at(
                "data.packing",
                "expected false, found true (packing several examples into one row needs \
                 per-segment attention masks, which the models do not implement yet)",
            ));
        }
        if f.stages.experts.enabled == Some(false) {
            return Err(self.error_at(
                "stages.experts.enabled",
                "expected true, found false (the experts stage cannot be skipped: build a \
                 mixture from existing adapter folders with `legora compose`)",
            ));
        }
        if !(0.0..1.0).contains(&f.data.val_fraction) {
            return Err(self.error_at(
                "data.val_fraction",
                format!("expected a share in [0, 1), found {}", f.data.val_fraction),
            ));
        }
        // tasks
        if f.tasks.is_empty() {
            return Err(self.error_at("tasks", "expected at least one [[tasks]] entry, found none"));
        }
        for (i, t) in f.tasks.iter().enumerate() {
            let valid = !t.name.is_empty()
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                && t.name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric());
            if !valid {
                return Err(self.error_at(
                    &format!("tasks[{i}].name"),
                    format!(
                        "expected a name of [a-z0-9][a-z0-9._-]* (it names the expert folder), found \"{}\"",
                        t.name
                    ),
                ));
            }
            if let Some(j) = f.tasks[..i].iter().position(|o| o.name == t.name) {
                return Err(self.error_at(
                    &format!("tasks[{i}].name"),
                    format!(
                        "expected a unique task name, found \"{}\" again (tasks[{j}])",
                        t.name
                    ),
                ));
            }
            if let Some(p) = &t.preset {
                if !p.contains('/') {
                    return Err(self.error_at(
                        &format!("tasks[{i}].preset"),
                        format!("expected a plugin preset \"<plugin>/<preset>\", found \"{p}\""),
                    ));
                }
            }
            if let Some(lr) = t.learning_rate {
                if !(lr > 0.0 && lr.is_finite()) {
                    return Err(self.error_at(
                        &format!("tasks[{i}].learning_rate"),
                        format!("expected a finite number > 0, found {lr}"),
                    ));
                }
            }
            if !t.format.contains('/') {
                return Err(self.error_at(
                    &format!("tasks[{i}].format"),
                    format!(
                        "expected a plugin format \"<plugin>/<format>\", found \"{}\"",
                        t.format
                    ),
                ));
            }
            let files =
                std::iter::once(("train", &t.train)).chain(t.eval.as_ref().map(|e| ("eval", e)));
            for (field, p) in files {
                let resolved = self.resolve(p.get_ref());
                if !resolved.is_file() {
                    return Err(self.spanned_error(
                        &format!("tasks[{i}].{field}"),
                        p.span(),
                        format!(
                            "expected an existing file, found nothing at {}",
                            resolved.display()
                        ),
                    ));
                }
            }
        }
        self.validate_lora_moe()?;
        // stages
        for (key, s, router) in [
            ("stages.experts", &f.stages.experts, false),
            ("stages.router", &f.stages.router, true),
        ] {
            self.validate_stage(key, s, router)?;
        }
        let e = &f.stages.eval;
        if e.batch_size == 0 || e.batch_size > MAX_BATCH {
            return Err(self.error_at(
                "stages.eval.batch_size",
                format!("expected 1..={MAX_BATCH}, found {}", e.batch_size),
            ));
        }
        for (i, b) in e.baselines.iter().enumerate() {
            if crate::plan::Variant::from_name(b).is_none() {
                return Err(self.error_at(
                    &format!("stages.eval.baselines[{i}]"),
                    format!(
                        "expected one of \"base\", \"single_lora\", \"mixture\", \"oracle\", \
                         found \"{b}\""
                    ),
                ));
            }
        }
        if e.single_lora_r == Some(0) {
            return Err(self.error_at("stages.eval.single_lora_r", "expected >= 1, found 0"));
        }
        Ok(())
    }

    /// `[lora]` and `[moe]` through legora-config's own checks, errors mapped to the
    /// key's line; keys PEFT has but the run file does not take are refused.
    fn validate_lora_moe(&self) -> Result<()> {
        let f = &self.file;
        if let Some(key) = f.lora.extra.keys().next() {
            return Err(self.error_at(
                &format!("lora.{key}"),
                "unknown key (the run file takes PEFT LoraConfig keys that legora implements: \
                 r, lora_alpha, lora_dropout, target_modules, use_rslora, init_lora_weights, \
                 rank_pattern, alpha_pattern, layers_to_transform, layers_pattern, bias, \
                 modules_to_save)",
            ));
        }
        if let Err(e) = f.lora.validate() {
            return Err(self.nn_error("lora", e));
        }
        let n = f.tasks.len();
        if f.moe.num_experts != 0 && f.moe.num_experts != n {
            return Err(self.error_at(
                "moe.num_experts",
                format!(
                    "expected the number of [[tasks]] ({n}) or no value, found {}",
                    f.moe.num_experts
                ),
            ));
        }
        if let Err(e) = self.router_config().validate() {
            return Err(self.nn_error("moe", e));
        }
        Ok(())
    }

    fn nn_error(&self, section: &str, e: ConfigError) -> TrainError {
        self.error_at(&format!("{section}.{}", e.field()), e.message())
    }

    fn validate_stage(&self, key: &str, s: &StageSection, router: bool) -> Result<()> {
        let at = |field: &str, msg: String| self.error_at(&format!("{key}.{field}"), msg);
        let positive = |field: &str, v: Option<f64>| -> Result<()> {
            match v {
                Some(x) if !(x > 0.0 && x.is_finite()) => Err(at(
                    field,
                    format!("expected a finite number > 0, found {x}"),
                )),
                _ => Ok(()),
            }
        };
        let non_negative = |field: &str, v: Option<f64>| -> Result<()> {
            match v {
                Some(x) if !(x >= 0.0 && x.is_finite()) => Err(at(
                    field,
                    format!("expected a finite number >= 0, found {x}"),
                )),
                _ => Ok(()),
            }
        };
        let at_least_one = |field: &str, v: Option<usize>| -> Result<()> {
            match v {
                Some(0) => Err(at(field, "expected >= 1, found 0".into())),
                _ => Ok(()),
            }
        };
        positive("learning_rate", s.learning_rate)?;
        positive("loraplus_lr_ratio", s.loraplus_lr_ratio)?;
        for kind in ParamKind::ALL {
            positive(&format!("lr_groups.{}", kind.name()), s.lr_groups.get(kind))?;
        }
        if s.loraplus_lr_ratio.is_some() && s.lr_groups.lora_B.is_some() {
            return Err(at(
                "lr_groups.lora_B",
                "expected either loraplus_lr_ratio or lr_groups.lora_B, found both".into(),
            ));
        }
        if let Some(v) = s.loraplus_lr_embedding {
            if v != LORAPLUS_LR_EMBEDDING {
                return Err(at(
                    "loraplus_lr_embedding",
                    format!(
                        "expected PEFT's default {LORAPLUS_LR_EMBEDDING} (legora has no LoRA on \
                         embedding layers), found {v}"
                    ),
                ));
            }
        }
        positive("num_train_epochs", s.num_train_epochs)?;
        positive("adam_epsilon", s.adam_epsilon)?;
        non_negative("max_grad_norm", s.max_grad_norm)?;
        non_negative("weight_decay", s.weight_decay)?;
        non_negative("early_stopping_threshold", s.early_stopping_threshold)?;
        non_negative("routing_loss_coef", s.routing_loss_coef)?;
        for f in [
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "eval_steps",
            "eval_batch_size",
            "save_steps",
            "save_total_limit",
            "early_stopping_patience",
            "logging_steps",
        ] {
            let v = match f {
                "max_steps" => s.max_steps,
                "batch_size" => s.batch_size,
                "gradient_accumulation_steps" => s.gradient_accumulation_steps,
                "eval_steps" => s.eval_steps,
                "eval_batch_size" => s.eval_batch_size,
                "save_steps" => s.save_steps,
                "save_total_limit" => s.save_total_limit,
                "early_stopping_patience" => s.early_stopping_patience,
                _ => s.logging_steps,
            };
            at_least_one(f, v)?;
            if matches!(
                f,
                "batch_size" | "eval_batch_size" | "gradient_accumulation_steps"
            ) {
                if let Some(v) = v.filter(|v| *v > MAX_BATCH) {
                    return Err(at(f, format!("expected at most {MAX_BATCH}, found {v}")));
                }
            }
        }
        for (f, v) in [("adam_beta1", s.adam_beta1), ("adam_beta2", s.adam_beta2)] {
            if let Some(b) = v {
                if !(0.0..1.0).contains(&b) {
                    return Err(at(f, format!("expected a value in [0, 1), found {b}")));
                }
            }
        }
        for (f, v) in [
            ("warmup_ratio", s.warmup_ratio),
            ("min_lr_ratio", s.min_lr_ratio),
        ] {
            if let Some(r) = v {
                if !(0.0..=1.0).contains(&r) {
                    return Err(at(f, format!("expected a share in [0, 1], found {r}")));
                }
            }
        }
        if s.warmup_steps.is_some() && s.warmup_ratio.is_some() {
            return Err(at(
                "warmup_ratio",
                "expected either warmup_steps or warmup_ratio, found both".into(),
            ));
        }
        if let Some(kind) = &s.lr_scheduler_type {
            kind.parse::<ScheduleKind>()
                .map_err(|m| at("lr_scheduler_type", m))?;
        }
        if s.early_stopping_patience.is_some() && s.eval_steps.is_none() {
            return Err(at(
                "early_stopping_patience",
                "expected eval_steps to be set too (early stopping acts on periodic validation), found no eval_steps".into(),
            ));
        }
        if !router {
            for (f, set) in [
                ("experts", s.experts.is_some()),
                ("routing_loss_coef", s.routing_loss_coef.is_some()),
            ] {
                if set {
                    return Err(at(
                        f,
                        "expected this key only in [stages.router], found it here".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn data_message(e: &legora_data::DataError) -> String {
    match e {
        legora_data::DataError::Config {
            expected, found, ..
        } => {
            format!("expected {expected}, found {found}")
        }
        other => other.to_string(),
    }
}
