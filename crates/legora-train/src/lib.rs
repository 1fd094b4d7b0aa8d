//! # legora-train
//!
//! Training stages for mixtures of LoRA experts on any `B: AutodiffBackend`:
//!
//! - [`RunConfig`]: the TOML run file (`docs/run-file.md`), errors with key and line;
//! - [`Trainer`]: the loop over any [`TrainModel`] — AdamW, [`LrSchedule`] (warmup +
//!   cosine/linear), gradient accumulation, global-norm clipping ([`clip_grad_norm`]),
//!   NaN/inf guard, early stopping, progress [`TrainCallback`]s, `metrics.jsonl`;
//! - data-parallel training across processes ([`Peer`], [`DistributedConfig`]): each
//!   rank trains on its shard of every batch and the gradients are summed each step;
//! - checkpoints ([`save_checkpoint`], [`load_checkpoint`]): trainable tensors only,
//!   optimizer state, data cursor, written atomically, resuming exactly;
//! - outputs: PNG plots ([`plot_loss_curves`], [`plot_routing_load`]) and the
//!   `report.json` / `report.md` writers ([`Report`]).

mod checkpoint;
mod clip;
mod config;
mod distributed;
mod error;
mod lm;
mod lr_groups;
mod metrics;
mod optim_state;
mod pipeline;
mod plan;
mod plot;
mod report;
mod schedule;
mod tok;
mod trainer;

pub use checkpoint::{
    all_tensors, checkpoint_name, latest_checkpoint, load_checkpoint, load_tensors, load_trainable,
    param_ids, prune_checkpoints, read_state, save_checkpoint, save_trainable,
    tensors_from_safetensors, tensors_to_safetensors, trainable_tensors, write_atomic,
    AdamWOptimizer, FileSum, NamedTensor, TensorMap, TrainerState, CHECKPOINT_VERSION,
};
pub use clip::{clip_grad_norm, global_grad_norm, scalar, scale_grads};
pub use config::{
    DataSection, EvalSection, ExpertsMode, ModelSection, Precision, RunConfig, RunFile, StageKind,
    StageSection, StagesSection, TaskSection, TrainSettings, LORAPLUS_LR_EMBEDDING,
};
pub use distributed::{DistributedConfig, FrameTag, Peer};
pub use error::{Result, TrainError};
pub use lm::{lm_input, shifted_targets, token_nll, LmModel, Objective};
pub use lr_groups::{param_groups, LrGroups, ParamKind};
pub use metrics::{
    read_metrics, EvalMetrics, MetricLine, MetricsWriter, RoutingStats, TrainMetrics,
};
pub use pipeline::{run_pipeline, PipelineOptions};
pub use plan::{ExpertSource, Mode, RunPlan, TaskPlan, Variant};
pub use plot::{plot_loss_curves, plot_routing_load, plot_stage_losses, Series};
pub use report::{ModelMetrics, ParamCount, Report, TaskReport};
pub use schedule::{LrSchedule, ScheduleKind};
pub use tok::{chat_template, HubTokenizer};
pub use trainer::{
    evaluate, evaluate_inner, EvalProgress, LrGroup, ModelError, NoCallback, StageResult,
    StageSummary, StepContext, StepOutput, StepPhases, StepReport, StopReason, TrainCallback,
    TrainModel, Trainer, ValSet,
};
