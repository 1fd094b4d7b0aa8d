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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use legora_data::{derive_seed, Batch, Loader};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    latest_checkpoint, load_checkpoint, load_trainable, prune_checkpoints, save_checkpoint,
    save_trainable, AdamWOptimizer, TrainerState, CHECKPOINT_VERSION,
};
use crate::clip::{clip_grad_norm, global_grad_norm, scalar};
use crate::config::TrainSettings;
use crate::error::{Result, TrainError};
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
    /// `batch.labels` follow the HF convention (unshifted, `-100` = no loss).
    fn forward_loss(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
    ) -> std::result::Result<StepOutput<B>, ModelError>;

    /// Parts of `batch` whose objectives sum to the batch's objective (so their
    /// gradients sum to its gradient). The trainer runs forward and backward part by
    /// part, so only one part's activations are alive at a time; logged terms are
    /// combined weighted by each part's share of the target tokens. Default: the batch
    /// whole.
    fn micro_batches(&self, batch: Batch) -> Vec<Batch> {
        vec![batch]
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
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _step: usize, _path: &Path) {}
    /// The stage ended.
    fn on_stage_end(&mut self, _summary: &StageSummary) {}
    /// Polled after every step: `true` stops the stage cleanly (with a checkpoint).
    fn should_stop(&mut self) -> bool {
        false
    }
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

/// Runs one stage. Build with [`Trainer::new`], adjust, then [`Trainer::run`].
pub struct Trainer<'a> {
    stage: String,
    dir: PathBuf,
    settings: TrainSettings,
    metrics_path: Option<PathBuf>,
    resume: bool,
    stop_after: Option<usize>,
    callback: Option<&'a mut dyn TrainCallback>,
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

    /// The checkpoint folder.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
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
        let s = self.settings.clone();
        check_settings(&s)?;
        if s.early_stopping_patience.is_some() && val.iter().all(|v| v.batches.is_empty()) {
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
        let ckpt_dir = self.checkpoint_dir();
        let best_path = self.dir.join("best.safetensors");
        let metrics = MetricsWriter::new(
            self.metrics_path
                .clone()
                .unwrap_or_else(|| self.dir.join("metrics.jsonl")),
        )?;
        let schedule = LrSchedule::new(s.learning_rate, s.warmup_steps, s.total_steps, s.schedule)
            .with_min_ratio(s.min_lr_ratio);
        let mut optim: AdamWOptimizer<M, B> = AdamWConfig::new()
            .with_beta_1(s.adam_beta1 as f32)
            .with_beta_2(s.adam_beta2 as f32)
            .with_epsilon(s.adam_epsilon as f32)
            .with_weight_decay(s.weight_decay as f32)
            .init();
        let mut model = model;
        let mut state = TrainerState {
            version: CHECKPOINT_VERSION,
            stage: self.stage.clone(),
            step: 0,
            total_steps: s.total_steps,
            loader: loader.state(),
            best_val_loss: None,
            best_step: None,
            bad_evals: 0,
            metrics_len: None,
            param_ids: BTreeMap::new(),
        };
        let mut last_checkpoint = None;
        if !self.resume {
            // a fresh run starts over: stale checkpoints would otherwise be resumed later
            for stale in [ckpt_dir.clone(), best_path.clone()] {
                let r = if stale.is_dir() {
                    std::fs::remove_dir_all(&stale)
                } else if stale.exists() {
                    std::fs::remove_file(&stale)
                } else {
                    Ok(())
                };
                r.map_err(|e| TrainError::io(&stale, e))?;
            }
        }
        if self.resume {
            if let Some(dir) = latest_checkpoint(&ckpt_dir)? {
                let (m, o, st) = load_checkpoint(&dir, model, optim, device)?;
                if st.stage != self.stage {
                    return Err(TrainError::checkpoint(
                        &dir,
                        format!(
                            "expected a checkpoint of stage `{}`, found stage `{}`",
                            self.stage, st.stage
                        ),
                    ));
                }
                model = m;
                optim = o;
                loader.restore(st.loader.clone())?;
                if let Some(len) = st.metrics_len {
                    metrics.truncate(len)?;
                }
                state = st;
                state.total_steps = s.total_steps;
                last_checkpoint = Some(dir);
            }
        }

        let start_step = state.step;
        cb.on_stage_start(&self.stage, start_step, s.total_steps);
        let started = Instant::now();
        let rows_per_epoch = loader.num_rows().max(1) as f64;
        let mut last_eval = None;
        let mut stop = StopReason::Completed;

        let stage = self.stage.clone();
        let non_finite = |step: usize, quantity: &str, value: f64, last: &Option<PathBuf>| {
            TrainError::NonFinite {
                stage: stage.clone(),
                step,
                quantity: quantity.to_string(),
                value,
                last_checkpoint: last.clone(),
            }
        };

        while state.step < s.total_steps {
            if self.stop_after.is_some_and(|n| state.step >= n) {
                stop = StopReason::Interrupted { step: state.step };
                break;
            }
            let step = state.step;
            B::seed(device, derive_seed(s.seed, &[step as u64]));
            let lr = schedule.lr(step);
            let t0 = Instant::now();
            let accum = s.gradient_accumulation_steps;
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut loss_sum = 0.0;
            let mut terms: BTreeMap<String, f64> = BTreeMap::new();
            let mut target_tokens = 0;
            let mut tokens = 0;
            let mut grads_single = None;
            for micro in 0..accum {
                let batch = loader.next_batch()?;
                target_tokens += batch.num_target_tokens();
                tokens += batch.num_tokens();
                let ctx = StepContext {
                    stage: &self.stage,
                    step,
                    micro_step: micro,
                    training: true,
                };
                let parts = model.micro_batches(batch);
                let part_tokens: Vec<usize> = parts.iter().map(|p| p.num_target_tokens()).collect();
                let all_tokens: usize = part_tokens.iter().sum();
                let single = accum == 1 && parts.len() == 1;
                for (part, part_tokens) in parts.iter().zip(&part_tokens) {
                    // a part's logged terms weigh by its share of the target tokens
                    let share = if parts.len() == 1 || all_tokens == 0 {
                        1.0 / parts.len() as f64
                    } else {
                        *part_tokens as f64 / all_tokens as f64
                    };
                    let out = model
                        .forward_loss(part, &ctx)
                        .map_err(|e| TrainError::Model {
                            stage: self.stage.clone(),
                            step,
                            message: e.to_string(),
                        })?;
                    for (name, t) in &out.terms {
                        *terms.entry(name.clone()).or_default() +=
                            scalar(t.clone()) * share / accum as f64;
                    }
                    let loss = out.loss;
                    let lv = scalar(loss.clone());
                    if !lv.is_finite() {
                        return Err(non_finite(step, "loss", lv, &last_checkpoint));
                    }
                    loss_sum += lv;
                    let scaled = if accum > 1 {
                        loss.div_scalar(accum as f64)
                    } else {
                        loss
                    };
                    let grads = GradientsParams::from_grads(scaled.backward(), &model);
                    if single {
                        grads_single = Some(grads);
                    } else {
                        accumulator.accumulate(&model, grads);
                    }
                }
            }
            let mut grads = grads_single.unwrap_or_else(|| accumulator.grads());
            let grad_norm = match s.max_grad_norm {
                Some(max) => clip_grad_norm::<B, M>(&model, &mut grads, max),
                None => global_grad_norm::<B, M>(&model, &grads),
            };
            if !grad_norm.is_finite() {
                return Err(non_finite(step, "grad_norm", grad_norm, &last_checkpoint));
            }
            model = optim.step(lr, model, grads);
            state.step += 1;
            let step_done = state.step;
            let dt = t0.elapsed().as_secs_f64().max(1e-9);
            let tm = TrainMetrics {
                stage: self.stage.clone(),
                step: step_done,
                total_steps: s.total_steps,
                epoch: (step_done * accum * loader.batch_size()) as f64 / rows_per_epoch,
                loss: loss_sum / accum as f64,
                terms,
                lr,
                grad_norm,
                target_tokens,
                tokens_per_second: tokens as f64 / dt,
                elapsed_s: started.elapsed().as_secs_f64(),
            };
            if step_done % s.logging_steps == 0 || step_done == s.total_steps {
                metrics.write(&MetricLine::Train(tm.clone()))?;
            }
            cb.on_step(&tm);

            // validation + early stopping
            let eval_due = s.eval_steps.is_some_and(|n| step_done % n == 0)
                || (step_done == s.total_steps && !val.is_empty());
            let mut early_stop = false;
            if eval_due && val.iter().any(|v| !v.batches.is_empty()) {
                let mut em = evaluate::<B, M>(&model, val, &self.stage, step_done)?;
                let improved = match state.best_val_loss {
                    None => true,
                    Some(best) => em.val_loss < best - s.early_stopping_threshold,
                };
                if improved {
                    state.best_val_loss = Some(em.val_loss);
                    state.best_step = Some(step_done);
                    state.bad_evals = 0;
                    em.is_best = true;
                    if s.early_stopping_patience.is_some() {
                        save_trainable(&model, &best_path)?;
                    }
                } else {
                    state.bad_evals += 1;
                }
                metrics.write(&MetricLine::Eval(em.clone()))?;
                cb.on_eval(&em);
                last_eval = Some(em);
                if let Some(p) = s.early_stopping_patience {
                    if state.bad_evals >= p {
                        early_stop = true;
                    }
                }
            }

            let interrupted = self.stop_after.is_some_and(|n| step_done >= n) || cb.should_stop();
            let save_due = s.save_steps.is_some_and(|n| step_done % n == 0)
                || step_done == s.total_steps
                || early_stop
                || interrupted;
            if save_due {
                state.loader = loader.state();
                state.metrics_len = Some(metrics.len());
                let path = save_checkpoint(&ckpt_dir, &model, &optim, &state)?;
                prune_checkpoints(&ckpt_dir, s.save_total_limit)?;
                cb.on_checkpoint(step_done, &path);
                last_checkpoint = Some(path);
            }
            if early_stop {
                stop = StopReason::EarlyStopped {
                    best_step: state.best_step.unwrap_or(step_done),
                };
                break;
            }
            if interrupted && step_done < s.total_steps {
                stop = StopReason::Interrupted { step: step_done };
                break;
            }
        }

        let finished = !matches!(stop, StopReason::Interrupted { .. });
        if finished && s.early_stopping_patience.is_some() && best_path.exists() {
            model = load_trainable(model, &best_path, device)?;
        }
        let summary = StageSummary {
            stage: self.stage.clone(),
            steps: state.step,
            total_steps: s.total_steps,
            stop,
            best_val_loss: state.best_val_loss,
            best_step: state.best_step,
            last_eval,
            last_checkpoint,
            steps_this_run: state.step - start_step,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        cb.on_stage_end(&summary);
        Ok(StageResult { model, summary })
    }
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
    if !(s.learning_rate > 0.0 && s.learning_rate.is_finite()) {
        return Err(TrainError::invalid(
            "learning_rate",
            "a finite number > 0",
            s.learning_rate,
        ));
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
