//! The run file's schema: [`RunFile`] and its sections, as serde reads them, with their
//! defaults. What the values mean once checked is [`super::RunConfig`]'s and
//! [`super::TrainSettings`]'s.

use std::collections::BTreeMap;

use legora_nn::{LoraConfig, RouterConfig};
use serde::{Deserialize, Serialize};
use serde_spanned::Spanned;

use crate::lr_groups::LrGroups;

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
