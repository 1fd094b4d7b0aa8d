//! A stage's settings once the run file's defaults are applied ([`TrainSettings`]), and
//! which stage they are for ([`StageKind`]). One place holds the defaults a stage gets.

use serde::{Deserialize, Serialize};

use super::ExpertsMode;
use crate::lr_groups::{LrGroups, ParamKind};
use crate::schedule::ScheduleKind;

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
