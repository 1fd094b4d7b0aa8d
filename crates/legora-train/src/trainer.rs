//! The generic training loop of one stage.
//!
//! A model crate implements [`TrainModel`] (one `forward_loss` for any backend); the
//! loop does the rest: AdamW, warmup + decay schedule, gradient accumulation,
//! global-norm clipping, the NaN/inf guard, periodic validation with early stopping,
//! checkpoints that resume exactly, `metrics.jsonl`, and progress callbacks.
//!
//! Exact resumption: a checkpoint holds the trainable tensors, the optimizer moments,
//! the data-stream state and the early-stopping state; the backend RNG (dropout,
//! router jitter) is re-seeded at every optimizer step from `(seed, step)`, so a run
//! stopped after step `k` and resumed takes the same steps as one that never stopped.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use legora_data::{derive_seed, Batch, BatchTotals, Loader};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    latest_checkpoint, load_checkpoint, load_trainable, prune_checkpoints, save_checkpoint,
    save_trainable, AdamWOptimizer, TrainerState, CHECKPOINT_VERSION,
};
use crate::clip::{clip_grad_norm, global_grad_norm, scalar, take_grads};
use crate::config::TrainSettings;
use crate::distributed::{reduce_step, Peer};
use crate::error::{Result, TrainError};
use crate::lr_groups::ParamKind;
use crate::metrics::{EvalMetrics, MetricLine, MetricsWriter, RoutingStats, TrainMetrics};
use crate::schedule::LrSchedule;

/// Boxed error a model returns from [`TrainModel::forward_loss`].
pub type ModelError = Box<dyn std::error::Error + Send + Sync>;

/// What the model is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepContext<'a> {
    /// Stage name (`experts`, `router`, `single_lora`, ...).
    pub stage: &'a str,
    /// Optimizer step being computed (0-based).
    pub step: usize,
    /// Micro-batch within the step (gradient accumulation).
    pub micro_step: usize,
    /// Training (true) or validation (false).
    pub training: bool,
    /// The counts of the whole batch this one is a part or a data-parallel shard of: the
    /// loss is normalised by them, so the parts' losses sum to the whole batch's (`None`:
    /// the batch is whole).
    pub totals: Option<&'a BatchTotals>,
}

/// The model's answer for one batch.
#[derive(Debug, Clone)]
pub struct StepOutput<B: Backend> {
    /// The objective to minimise (e.g. LM loss + aux loss), shape `[1]`.
    pub loss: Tensor<B, 1>,
    /// Named terms for logging, each shape `[1]` (`lm_loss` is used as the validation
    /// loss when present).
    pub terms: Vec<(String, Tensor<B, 1>)>,
    /// Routing statistics, when the model routes.
    pub routing: Option<RoutingStats>,
}

impl<B: Backend> StepOutput<B> {
    /// An output with just the objective.
    pub fn new(loss: Tensor<B, 1>) -> Self {
        Self {
            loss,
            terms: Vec::new(),
            routing: None,
        }
    }

    /// Add a logged term.
    pub fn with_term(mut self, name: impl Into<String>, value: Tensor<B, 1>) -> Self {
        self.terms.push((name.into(), value));
        self
    }

    /// Attach routing statistics.
    pub fn with_routing(mut self, routing: RoutingStats) -> Self {
        self.routing = Some(routing);
        self
    }
}

/// A model the trainer can train: a loss for a batch. Implement it once for every
/// `B: Backend`, so it serves training (autodiff) and validation (inner backend).
///
/// Which parameters train is the model's business: frozen ones carry
/// `require_grad = false` (no gradient, no optimizer state, not in checkpoints).
pub trait TrainModel<B: Backend>: Module<B> {
    /// The objective and logged terms for `batch`.
    ///
    /// `batch.labels` follow the HF convention (unshifted, `-100` = no loss). In training
    /// `ctx.totals` holds the counts of the whole batch `batch` is a part or a
    /// data-parallel shard of: a loss that is a mean over tokens divides by them, so the
    /// parts' objectives (and logged terms) add up to the whole batch's.
    fn forward_loss(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
    ) -> std::result::Result<StepOutput<B>, ModelError>;

    /// Parts of `batch` whose objectives sum to the batch's objective (so their
    /// gradients sum to its gradient). The trainer runs forward and backward part by
    /// part, so only one part's activations are alive at a time, and adds up their
    /// objectives and logged terms. Default: the batch whole.
    fn micro_batches(&self, batch: Batch) -> Vec<Batch> {
        vec![batch]
    }

    /// The objective of `batch` and its gradients (the objective times `scale`), for a
    /// model that runs its own backward (gradient checkpointing); `None`, the default:
    /// the trainer differentiates [`TrainModel::forward_loss`].
    fn checkpointed_gradients(
        &self,
        _batch: &Batch,
        _ctx: &StepContext<'_>,
        _scale: f64,
    ) -> Option<std::result::Result<(StepOutput<B>, GradientsParams), ModelError>>
    where
        B: AutodiffBackend,
        Self: AutodiffModule<B>,
    {
        None
    }
}

/// Progress hooks (the CLI drives its progress bars with them). All methods have empty
/// defaults.
pub trait TrainCallback {
    /// The stage starts (or resumes) at `start_step` of `total_steps`.
    fn on_stage_start(&mut self, _stage: &str, _start_step: usize, _total_steps: usize) {}
    /// An optimizer step finished (called every step, logged or not).
    fn on_step(&mut self, _metrics: &TrainMetrics) {}
    /// A validation finished.
    fn on_eval(&mut self, _metrics: &EvalMetrics) {}
    /// The evaluation stage scored or generated another batch of samples.
    fn on_eval_progress(&mut self, _progress: &EvalProgress) {}
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _step: usize, _path: &Path) {}
    /// The stage ended.
    fn on_stage_end(&mut self, _summary: &StageSummary) {}
    /// Polled after every step: `true` stops the stage cleanly (with a checkpoint).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// Where the evaluation stage is: one model variant on one task at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalProgress {
    /// The variant (`base`, `single_lora`, `mixture`, `oracle`).
    pub variant: String,
    /// The task.
    pub task: String,
    /// Samples of this variant and task done.
    pub done: usize,
    /// Samples of this variant and task.
    pub total: usize,
    /// This (variant, task) pair's position, from 1.
    pub pair: usize,
    /// Pairs in the evaluation.
    pub pairs: usize,
}

/// A callback that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCallback;

impl TrainCallback for NoCallback {}

/// Why a stage ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum StopReason {
    /// All planned steps done.
    Completed,
    /// Validation loss stopped improving; the best weights were restored.
    EarlyStopped {
        /// Step of the best validation loss.
        best_step: usize,
    },
    /// Stopped on request (`stop_after` or [`TrainCallback::should_stop`]); resume with
    /// the checkpoint.
    Interrupted {
        /// Steps completed.
        step: usize,
    },
}

/// What a finished (or stopped) stage reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Stage name.
    pub stage: String,
    /// Steps completed.
    pub steps: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// Why it ended.
    pub stop: StopReason,
    /// Best validation loss seen (this run and, on resume, before).
    pub best_val_loss: Option<f64>,
    /// Its step.
    pub best_step: Option<usize>,
    /// Last validation of this process.
    pub last_eval: Option<EvalMetrics>,
    /// Newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Steps taken by this process.
    pub steps_this_run: usize,
    /// Wall time of this process, seconds.
    pub elapsed_s: f64,
}

/// A trained model and its summary.
#[derive(Debug)]
pub struct StageResult<M> {
    /// The model after the stage (best weights after early stopping).
    pub model: M,
    /// The summary.
    pub summary: StageSummary,
}

/// Validation data of one task.
#[derive(Debug, Clone)]
pub struct ValSet {
    /// Task name.
    pub task: String,
    /// Fixed batches.
    pub batches: Vec<Batch>,
}

/// A set of parameters trained with their own learning rate: `scale ×` the schedule's
/// (a task's expert with the learning rate of its preset, LoRA+'s `B` matrices; see
/// [`param_groups`](crate::param_groups)). Groups must not share parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LrGroup {
    /// What the group is (for logs and errors).
    pub name: String,
    /// Its parameters.
    pub params: HashSet<ParamId>,
    /// Multiplier of the stage's learning rate.
    pub scale: f64,
}

/// Wall time of the parts of one optimizer step, seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPhases {
    /// Forward passes and loss reads.
    pub forward: f64,
    /// Backward passes (and gradient accumulation).
    pub backward: f64,
    /// Global-norm clipping.
    pub clip: f64,
    /// The optimizer update.
    pub optim: f64,
}

/// What one optimizer step did ([`Trainer::step`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Mean objective over the micro-batches.
    pub loss: f64,
    /// Logged terms, weighted as the objective.
    pub terms: BTreeMap<String, f64>,
    /// Learning rate of the step (before group scales).
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens of the step's batches.
    pub target_tokens: usize,
    /// Tokens of the step's batches.
    pub tokens: usize,
    /// Rows of the step's batches.
    pub rows: usize,
    /// Where the time went.
    pub phases: StepPhases,
}

/// Runs one stage. Build with [`Trainer::new`], adjust, then [`Trainer::run`] (or drive
/// [`Trainer::step`] yourself, as `legora bench` does).
pub struct Trainer<'a> {
    stage: String,
    dir: PathBuf,
    settings: TrainSettings,
    metrics_path: Option<PathBuf>,
    resume: bool,
    stop_after: Option<usize>,
    callback: Option<&'a mut dyn TrainCallback>,
    groups: Vec<LrGroup>,
    peer: Option<&'a Peer>,
}

/// The state of a stage while it runs.
struct Session {
    state: TrainerState,
    /// `None` on data-parallel ranks other than 0 (they write nothing).
    metrics: Option<MetricsWriter>,
    last_checkpoint: Option<PathBuf>,
    last_eval: Option<EvalMetrics>,
    started: Instant,
    start_step: usize,
    rows_per_epoch: f64,
}

impl<'a> Trainer<'a> {
    /// A trainer for stage `stage` writing into `dir` (checkpoints in
    /// `dir/checkpoints`, best weights in `dir/best.safetensors`, metrics in
    /// `dir/metrics.jsonl` unless [`metrics_path`](Self::metrics_path) says otherwise).
    pub fn new(stage: impl Into<String>, dir: impl Into<PathBuf>, settings: TrainSettings) -> Self {
        Self {
            stage: stage.into(),
            dir: dir.into(),
            settings,
            metrics_path: None,
            resume: false,
            stop_after: None,
            callback: None,
            groups: Vec::new(),
            peer: None,
        }
    }

    /// Append metrics to this file instead (e.g. one `metrics.jsonl` for the whole run).
    pub fn metrics_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.metrics_path = Some(p.into());
        self
    }

    /// Continue from the latest checkpoint in `dir/checkpoints` when there is one.
    /// Without it a run starts over and deletes the stage's old checkpoints and best
    /// weights (`metrics.jsonl` is appended to; the caller owns it).
    pub fn resume(mut self, on: bool) -> Self {
        self.resume = on;
        self
    }

    /// Stop (with a checkpoint) once this many steps are done in total.
    pub fn stop_after(mut self, steps: Option<usize>) -> Self {
        self.stop_after = steps;
        self
    }

    /// Progress hooks.
    pub fn callback(mut self, cb: &'a mut dyn TrainCallback) -> Self {
        self.callback = Some(cb);
        self
    }

    /// Parameter groups with their own learning rate (the others use the stage's).
    pub fn lr_groups(mut self, groups: Vec<LrGroup>) -> Self {
        self.groups = groups;
        self
    }

    /// Train data-parallel with the other ranks of `peer`: each step every rank takes
    /// its shard of the batch (`batch_size` rows per rank), and the gradients are summed
    /// before the update. Only rank 0 writes checkpoints, best weights and metrics; every
    /// rank resumes from rank 0's checkpoints (a folder all ranks see).
    pub fn peer(mut self, peer: Option<&'a Peer>) -> Self {
        self.peer = peer.filter(|p| p.world_size() > 1);
        self
    }

    /// Whether this process writes the stage's files (no peers, or rank 0).
    fn is_writer(&self) -> bool {
        self.peer.is_none_or(|p| p.is_writer())
    }

    /// The checkpoint folder.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    fn best_path(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }

    /// The AdamW optimizer of the stage's settings.
    pub fn optimizer<B, M>(&self) -> AdamWOptimizer<M, B>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        let s = &self.settings;
        AdamWConfig::new()
            .with_beta_1(s.adam_beta1 as f32)
            .with_beta_2(s.adam_beta2 as f32)
            .with_epsilon(s.adam_epsilon as f32)
            .with_weight_decay(s.weight_decay as f32)
            .init()
    }

    /// The learning-rate schedule of the stage's settings.
    pub fn schedule(&self) -> LrSchedule {
        let s = &self.settings;
        LrSchedule::new(s.learning_rate, s.warmup_steps, s.total_steps, s.schedule)
            .with_min_ratio(s.min_lr_ratio)
    }

    /// One optimizer step `step` (0-based): the backend RNG seeded from `(seed, step)`,
    /// `gradient_accumulation_steps` batches from `next_batch`, forward and backward per
    /// micro-batch part (gradients summed), global-norm clipping, the NaN/inf guard, and
    /// AdamW at the scheduled learning rate (times each [`LrGroup`]'s scale).
    pub fn step<B, M>(
        &self,
        model: M,
        optim: &mut AdamWOptimizer<M, B>,
        step: usize,
        next_batch: &mut dyn FnMut() -> Result<Batch>,
        device: &B::Device,
    ) -> Result<(M, StepReport)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TrainModel<B>,
    {
        let s = &self.settings;
        check_settings(s)?;
        let rank = self.peer.map_or(0, |p| p.rank());
        let parts: &[u64] = if rank == 0 {
            &[step as u64]
        } else {
            &[step as u64, rank as u64]
        };
        B::seed(device, derive_seed(s.seed, parts));
        let lr = self.schedule().lr(step);
        let (grads, mut report) = self.gradients(&model, step, next_batch)?;
        let mut grads = grads;
        if let Some(peer) = self.peer {
            reduce_step::<B, M>(peer, &model, &mut grads, &mut report, &self.stage, step)?;
        }
        report.lr = lr;
        let t = Instant::now();
        report.grad_norm = match s.max_grad_norm {
            Some(max) => clip_grad_norm::<B, M>(&model, &mut grads, max),
            None => global_grad_norm::<B, M>(&model, &grads),
        };
        if !report.grad_norm.is_finite() {
            return Err(self.non_finite(step, "grad_norm", report.grad_norm));
        }
        report.phases.clip = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut model = model;
        for g in &self.groups {
            let part = take_grads::<B, M>(&model, &mut grads, &g.params);
            model = optim.step(lr * g.scale, model, part);
        }
        model = optim.step(lr, model, grads);
        B::sync(device).map_err(|e| TrainError::Model {
            stage: self.stage.clone(),
            step,
            message: format!("backend sync failed: {e:?}"),
        })?;
        report.phases.optim = t.elapsed().as_secs_f64();
        Ok((model, report))
    }

    /// The summed gradients of one step's micro-batches, and what they reported.
    fn gradients<B, M>(
        &self,
        model: &M,
        step: usize,
        next_batch: &mut dyn FnMut() -> Result<Batch>,
    ) -> Result<(GradientsParams, StepReport)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TrainModel<B>,
    {
        let accum = self.settings.gradient_accumulation_steps;
        let mut report = StepReport {
            loss: 0.0,
            terms: BTreeMap::new(),
            lr: 0.0,
            grad_norm: 0.0,
            target_tokens: 0,
            tokens: 0,
            rows: 0,
            phases: StepPhases::default(),
        };
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut single = None;
        for micro in 0..accum {
            let batch = next_batch()?;
            report.target_tokens += batch.num_target_tokens();
            report.tokens += batch.num_tokens();
            report.rows += batch.batch_size;
            let totals = batch.totals();
            let batch = match self.peer {
                Some(p) => batch.shard(p.rank(), p.world_size()),
                None => batch,
            };
            let ctx = StepContext {
                stage: &self.stage,
                step,
                micro_step: micro,
                training: true,
                totals: Some(&totals),
            };
            let mut parts = if batch.batch_size == 0 {
                Vec::new()
            } else {
                model.micro_batches(batch.clone())
            };
            if parts.is_empty() && self.peer.is_some() && batch.batch_size > 0 {
                // a shard without targets still reports the terms every rank sums
                parts.push(batch);
            }
            let one = accum == 1 && parts.len() == 1;
            for part in &parts {
                let grads = self.part_gradients(model, part, &ctx, &mut report)?;
                if one {
                    single = Some(grads);
                } else {
                    accumulator.accumulate(model, grads);
                }
            }
        }
        report.loss /= accum as f64;
        let grads = single.unwrap_or_else(|| accumulator.grads());
        Ok((grads, report))
    }

    /// Forward and backward of one micro-batch part (its loss normalised by the counts of
    /// the whole batch, `ctx.totals`).
    fn part_gradients<B, M>(
        &self,
        model: &M,
        part: &Batch,
        ctx: &StepContext<'_>,
        report: &mut StepReport,
    ) -> Result<GradientsParams>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TrainModel<B>,
    {
        let accum = self.settings.gradient_accumulation_steps as f64;
        let model_error = |e: ModelError| TrainError::Model {
            stage: self.stage.clone(),
            step: ctx.step,
            message: e.to_string(),
        };
        let t = Instant::now();
        if let Some(done) = model.checkpointed_gradients(part, ctx, 1.0 / accum) {
            // forward and backward in one pass, timed as the backward
            let (out, grads) = done.map_err(model_error)?;
            self.record(&out, ctx.step, report)?;
            report.phases.backward += t.elapsed().as_secs_f64();
            return Ok(grads);
        }
        let out = model.forward_loss(part, ctx).map_err(model_error)?;
        self.record(&out, ctx.step, report)?;
        report.phases.forward += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let loss = if accum > 1.0 {
            out.loss.div_scalar(accum)
        } else {
            out.loss
        };
        let grads = GradientsParams::from_grads(loss.backward(), model);
        report.phases.backward += t.elapsed().as_secs_f64();
        Ok(grads)
    }

    /// Adds a part's loss and logged terms to the step's report (a non-finite loss is
    /// an error).
    fn record<B: Backend>(
        &self,
        out: &StepOutput<B>,
        step: usize,
        report: &mut StepReport,
    ) -> Result<()> {
        let accum = self.settings.gradient_accumulation_steps as f64;
        for (name, t) in &out.terms {
            // parts are normalised by the whole batch's counts: their terms add up
            *report.terms.entry(name.clone()).or_default() += scalar(t.clone()) / accum;
        }
        let lv = scalar(out.loss.clone());
        if !lv.is_finite() {
            return Err(self.non_finite(step, "loss", lv));
        }
        report.loss += lv;
        Ok(())
    }

    fn non_finite(&self, step: usize, quantity: &str, value: f64) -> TrainError {
        TrainError::NonFinite {
            stage: self.stage.clone(),
            step,
            quantity: quantity.to_string(),
            value,
            last_checkpoint: None,
        }
    }

    /// Train `model` on `loader`, validating on `val`.
    pub fn run<B, M>(
        mut self,
        model: M,
        loader: &mut Loader,
        val: &[ValSet],
        device: &B::Device,
    ) -> Result<StageResult<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B> + TrainModel<B>,
        M::InnerModule: TrainModel<B::InnerBackend>,
    {
        check_settings(&self.settings)?;
        if self.settings.early_stopping_patience.is_some()
            && val.iter().all(|v| v.batches.is_empty())
        {
            return Err(TrainError::invalid(
                "early_stopping_patience",
                "validation data to stop on",
                "no validation batches",
            ));
        }
        let mut noop = NoCallback;
        let cb: &mut dyn TrainCallback = match self.callback.take() {
            Some(c) => c,
            None => &mut noop,
        };
        let mut optim = self.optimizer::<B, M>();
        let (mut model, mut session) = self.begin(model, &mut optim, loader, device)?;
        cb.on_stage_start(&self.stage, session.start_step, self.settings.total_steps);
        let mut stop = StopReason::Completed;
        while session.state.step < self.settings.total_steps {
            if self.stop_after.is_some_and(|n| session.state.step >= n) {
                stop = StopReason::Interrupted {
                    step: session.state.step,
                };
                break;
            }
            let t0 = Instant::now();
            let step = session.state.step;
            let (m, report) = self
                .step(
                    model,
                    &mut optim,
                    step,
                    &mut || loader.next_batch().map_err(Into::into),
                    device,
                )
                .map_err(|e| with_checkpoint(e, &session.last_checkpoint))?;
            model = m;
            session.state.step += 1;
            self.log_step(&session, &report, t0, loader, cb)?;
            let early_stop = self.validate_if_due(&model, val, &mut session, cb)?;
            let interrupted =
                self.stop_after.is_some_and(|n| session.state.step >= n) || cb.should_stop();
            self.checkpoint_if_due(
                &model,
                &optim,
                loader,
                &mut session,
                early_stop || interrupted,
                cb,
            )?;
            if early_stop {
                let best_step = session.state.best_step.unwrap_or(session.state.step);
                stop = StopReason::EarlyStopped { best_step };
                break;
            }
            if interrupted && session.state.step < self.settings.total_steps {
                stop = StopReason::Interrupted {
                    step: session.state.step,
                };
                break;
            }
        }
        self.finish(model, session, stop, cb, device)
    }

    /// Open the metrics, start over (deleting stale checkpoints) or resume from the
    /// latest checkpoint.
    fn begin<B, M>(
        &self,
        model: M,
        optim: &mut AdamWOptimizer<M, B>,
        loader: &mut Loader,
        device: &B::Device,
    ) -> Result<(M, Session)>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        let path = self
            .metrics_path
            .clone()
            .unwrap_or_else(|| self.dir.join("metrics.jsonl"));
        let metrics = if self.is_writer() {
            Some(MetricsWriter::new(path)?)
        } else {
            None
        };
        let mut session = Session {
            state: TrainerState {
                version: CHECKPOINT_VERSION,
                stage: self.stage.clone(),
                step: 0,
                total_steps: self.settings.total_steps,
                loader: loader.state(),
                best_val_loss: None,
                best_step: None,
                bad_evals: 0,
                metrics_len: None,
                param_ids: BTreeMap::new(),
                files: BTreeMap::new(),
            },
            metrics,
            last_checkpoint: None,
            last_eval: None,
            started: Instant::now(),
            start_step: 0,
            rows_per_epoch: loader.num_rows().max(1) as f64,
        };
        let ckpt_dir = self.checkpoint_dir();
        if !self.resume {
            // a fresh run starts over: stale checkpoints would otherwise be resumed later
            if self.is_writer() {
                for stale in [ckpt_dir.clone(), self.best_path()] {
                    remove_path(&stale)?;
                }
            }
            return Ok((model, session));
        }
        let Some(dir) = latest_checkpoint(&ckpt_dir)? else {
            return Ok((model, session));
        };
        let fresh = std::mem::replace(optim, self.optimizer::<B, M>());
        let (m, o, st) = load_checkpoint(&dir, model, fresh, device)?;
        if st.stage != self.stage {
            return Err(TrainError::checkpoint(
                &dir,
                format!(
                    "expected a checkpoint of stage `{}`, found stage `{}`",
                    self.stage, st.stage
                ),
            ));
        }
        *optim = o;
        loader.restore(st.loader.clone())?;
        if let (Some(len), Some(m)) = (st.metrics_len, &session.metrics) {
            m.truncate(len)?;
        }
        session.state = st;
        session.state.total_steps = self.settings.total_steps;
        session.start_step = session.state.step;
        session.last_checkpoint = Some(dir);
        Ok((m, session))
    }

    /// The step's metrics line (every `logging_steps`) and the callback.
    fn log_step(
        &self,
        session: &Session,
        r: &StepReport,
        t0: Instant,
        loader: &Loader,
        cb: &mut dyn TrainCallback,
    ) -> Result<()> {
        let s = &self.settings;
        let step = session.state.step;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        let accum = s.gradient_accumulation_steps;
        let tm = TrainMetrics {
            stage: self.stage.clone(),
            step,
            total_steps: s.total_steps,
            epoch: (step * accum * loader.batch_size()) as f64 / session.rows_per_epoch,
            loss: r.loss,
            terms: r.terms.clone(),
            lr: r.lr,
            grad_norm: r.grad_norm,
            target_tokens: r.target_tokens,
            tokens_per_second: r.tokens as f64 / dt,
            elapsed_s: session.started.elapsed().as_secs_f64(),
        };
        if let Some(m) = session.metrics.as_ref() {
            if step % s.logging_steps == 0 || step == s.total_steps {
                m.write(&MetricLine::Train(tm.clone()))?;
            }
        }
        cb.on_step(&tm);
        Ok(())
    }

    /// Validate when due; returns whether early stopping says stop.
    fn validate_if_due<B, M>(
        &self,
        model: &M,
        val: &[ValSet],
        session: &mut Session,
        cb: &mut dyn TrainCallback,
    ) -> Result<bool>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        M::InnerModule: TrainModel<B::InnerBackend>,
    {
        let s = &self.settings;
        let step = session.state.step;
        let due = s.eval_steps.is_some_and(|n| step % n == 0)
            || (step == s.total_steps && !val.is_empty());
        if !due || val.iter().all(|v| v.batches.is_empty()) {
            return Ok(false);
        }
        let mut em = evaluate::<B, M>(model, val, &self.stage, step)?;
        let st = &mut session.state;
        let improved = st
            .best_val_loss
            .is_none_or(|best| em.val_loss < best - s.early_stopping_threshold);
        if improved {
            st.best_val_loss = Some(em.val_loss);
            st.best_step = Some(step);
            st.bad_evals = 0;
            em.is_best = true;
            if s.early_stopping_patience.is_some() && self.is_writer() {
                save_trainable(model, &self.best_path())?;
            }
        } else {
            st.bad_evals += 1;
        }
        if let Some(m) = &session.metrics {
            m.write(&MetricLine::Eval(em.clone()))?;
        }
        cb.on_eval(&em);
        session.last_eval = Some(em);
        Ok(s.early_stopping_patience
            .is_some_and(|p| session.state.bad_evals >= p))
    }

    /// Write a checkpoint when due (every `save_steps`, at the end, or when stopping).
    fn checkpoint_if_due<B, M>(
        &self,
        model: &M,
        optim: &AdamWOptimizer<M, B>,
        loader: &Loader,
        session: &mut Session,
        stopping: bool,
        cb: &mut dyn TrainCallback,
    ) -> Result<()>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        let s = &self.settings;
        let step = session.state.step;
        let due = s.save_steps.is_some_and(|n| step % n == 0) || step == s.total_steps;
        let Some(metrics) = &session.metrics else {
            return Ok(()); // a data-parallel rank other than 0
        };
        if !(due || stopping) {
            return Ok(());
        }
        let ckpt_dir = self.checkpoint_dir();
        session.state.loader = loader.state();
        session.state.metrics_len = Some(metrics.len());
        let path = save_checkpoint(&ckpt_dir, model, optim, &session.state)?;
        prune_checkpoints(&ckpt_dir, s.save_total_limit)?;
        cb.on_checkpoint(step, &path);
        session.last_checkpoint = Some(path);
        Ok(())
    }

    /// Restore the best weights after early stopping and report the stage.
    fn finish<B, M>(
        &self,
        model: M,
        session: Session,
        stop: StopReason,
        cb: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<StageResult<M>>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
    {
        let mut model = model;
        let finished = !matches!(stop, StopReason::Interrupted { .. });
        let best = self.best_path();
        if finished && self.settings.early_stopping_patience.is_some() && best.exists() {
            model = load_trainable(model, &best, device)?;
        }
        let st = &session.state;
        let summary = StageSummary {
            stage: self.stage.clone(),
            steps: st.step,
            total_steps: self.settings.total_steps,
            stop,
            best_val_loss: st.best_val_loss,
            best_step: st.best_step,
            last_eval: session.last_eval,
            last_checkpoint: session.last_checkpoint,
            steps_this_run: st.step - session.start_step,
            elapsed_s: session.started.elapsed().as_secs_f64(),
        };
        cb.on_stage_end(&summary);
        Ok(StageResult { model, summary })
    }
}

/// A non-finite error names the newest checkpoint, kept untouched.
fn with_checkpoint(e: TrainError, last: &Option<PathBuf>) -> TrainError {
    match e {
        TrainError::NonFinite {
            stage,
            step,
            quantity,
            value,
            ..
        } => TrainError::NonFinite {
            stage,
            step,
            quantity,
            value,
            last_checkpoint: last.clone(),
        },
        other => other,
    }
}

/// Remove a file or folder if it exists.
fn remove_path(p: &Path) -> Result<()> {
    let r = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else if p.exists() {
        std::fs::remove_file(p)
    } else {
        Ok(())
    };
    r.map_err(|e| TrainError::io(p, e))
}

fn check_settings(s: &TrainSettings) -> Result<()> {
    let one = |k: &str, v: usize| {
        if v == 0 {
            Err(TrainError::invalid(k, ">= 1", 0))
        } else {
            Ok(())
        }
    };
    one("batch_size", s.batch_size)?;
    one("gradient_accumulation_steps", s.gradient_accumulation_steps)?;
    one("logging_steps", s.logging_steps)?;
    one("save_total_limit", s.save_total_limit)?;
    if let Some(n) = s.eval_steps {
        one("eval_steps", n)?;
    }
    if let Some(n) = s.save_steps {
        one("save_steps", n)?;
    }
    let multipliers = ParamKind::ALL
        .iter()
        .map(|k| (format!("lr_groups.{}", k.name()), s.lr_groups.get(*k)));
    let rates = [("learning_rate".to_string(), Some(s.learning_rate))]
        .into_iter()
        .chain([("loraplus_lr_ratio".to_string(), s.loraplus_lr_ratio)])
        .chain(multipliers);
    for (key, v) in rates {
        if let Some(v) = v.filter(|v| !(*v > 0.0 && v.is_finite())) {
            return Err(TrainError::invalid(key, "a finite number > 0", v));
        }
    }
    Ok(())
}

/// Token-weighted validation loss (per task and overall) of `model` on `val`, with the
/// inner (non-autodiff) backend. Routing statistics are averaged the same way.
pub fn evaluate<B, M>(model: &M, val: &[ValSet], stage: &str, step: usize) -> Result<EvalMetrics>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    M::InnerModule: TrainModel<B::InnerBackend>,
{
    let inner = model.valid();
    evaluate_inner(&inner, val, stage, step)
}

/// [`evaluate`] for a model on a plain backend.
pub fn evaluate_inner<B: Backend, M: TrainModel<B>>(
    model: &M,
    val: &[ValSet],
    stage: &str,
    step: usize,
) -> Result<EvalMetrics> {
    let mut task_losses = BTreeMap::new();
    let (mut sum, mut weight) = (0.0, 0.0);
    let mut routing = Vec::new();
    for set in val {
        let (mut ts, mut tw) = (0.0, 0.0);
        for batch in &set.batches {
            let ctx = StepContext {
                stage,
                step,
                micro_step: 0,
                training: false,
                totals: None,
            };
            let out = model
                .forward_loss(batch, &ctx)
                .map_err(|e| TrainError::Model {
                    stage: stage.to_string(),
                    step,
                    message: format!("validation on task `{}`: {e}", set.task),
                })?;
            let lm = out
                .terms
                .iter()
                .find(|(n, _)| n == "lm_loss")
                .map(|(_, t)| t.clone())
                .unwrap_or(out.loss);
            let v = scalar(lm);
            let w = batch.num_target_tokens().max(1) as f64;
            ts += v * w;
            tw += w;
            if let Some(r) = out.routing {
                routing.push((r, w));
            }
        }
        if tw > 0.0 {
            task_losses.insert(set.task.clone(), ts / tw);
            sum += ts;
            weight += tw;
        }
    }
    Ok(EvalMetrics {
        stage: stage.to_string(),
        step,
        val_loss: if weight > 0.0 { sum / weight } else { f64::NAN },
        task_losses,
        routing: RoutingStats::weighted_mean(&routing),
        is_best: false,
    })
}
