//! [`TrainModel`] for legora-models' [`CausalLm`]: the shifted next-token loss honouring
//! `-100`, task-routed or router-gated mixtures, the router's aux losses, the supervised
//! routing loss, and routing statistics.

use std::borrow::Cow;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use legora_data::{Batch, BatchTotals, IGNORE_INDEX};
use legora_models::{CausalLm, HeadOutput, LmInput, LossOutput};

use crate::metrics::RoutingStats;
use crate::trainer::{ModelError, StepContext, StepOutput, TrainModel};

/// What a [`LmModel`] minimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Mean next-token loss over all target tokens (a single adapter, or the base).
    Lm,
    /// Task-routed mixture: row `b` goes through expert `task_ids[b]`; the objective is
    /// `Σ_task mean_loss(task)`, so each expert's gradient is exactly what training it
    /// alone on its own rows would give.
    TaskRouted,
    /// Router-gated mixture: mean LM loss + Σ aux/z losses + `routing_loss_coef` ·
    /// cross-entropy between each layer router and the row's task (0 = unsupervised),
    /// averaged over the layers and with every task of the batch weighing the same.
    Routed {
        /// Weight of the supervised routing loss.
        routing_loss_coef: f64,
    },
}

/// A causal LM with its training objective.
#[derive(Module, Debug)]
pub struct LmModel<B: Backend> {
    /// The model (frozen base + adapters / mixtures).
    pub model: CausalLm<B>,
    /// The objective.
    #[module(skip)]
    pub objective: Objective,
    /// Run each task's rows of a batch as their own forward pass, padded to their own
    /// longest row (`Lm` and `TaskRouted` only; the loss is the same, the padding less).
    #[module(skip)]
    pub pad_per_task: bool,
    /// `TaskRouted` only: hand the trainer each task's rows as a micro-batch of its own
    /// (forward and backward per task, gradients summed; see
    /// [`TrainModel::micro_batches`]).
    #[module(skip)]
    pub backward_per_task: bool,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (see [`CausalLm::backward_checkpointed`]): the gradients are the same, the memory
    /// one layer's activations instead of all of them.
    #[module(skip)]
    pub gradient_checkpointing: bool,
}

impl<B: Backend> LmModel<B> {
    /// Wrap a model.
    pub fn new(model: CausalLm<B>, objective: Objective) -> Self {
        Self {
            model,
            objective,
            pad_per_task: false,
            backward_per_task: false,
            gradient_checkpointing: false,
        }
    }

    /// Gradient checkpointing (see [`LmModel::gradient_checkpointing`]).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Forward and backward per task (see [`LmModel::backward_per_task`]).
    pub fn with_backward_per_task(mut self, on: bool) -> Self {
        self.backward_per_task = on;
        self
    }

    /// Pad each task's rows separately (see [`LmModel::pad_per_task`]).
    pub fn with_pad_per_task(mut self, on: bool) -> Self {
        self.pad_per_task = on;
        self
    }

    /// `Lm` / `TaskRouted` loss as one forward pass per task of the batch: the token mean
    /// over the whole batch (`lm_loss`) and the sum of per-task means, each part weighted
    /// as in the unsplit batch (normalised by `totals`, the whole batch's counts).
    fn per_task_losses(
        &self,
        batch: &Batch,
        totals: &BatchTotals,
        device: &B::Device,
    ) -> std::result::Result<(Tensor<B, 1>, Tensor<B, 1>), ModelError> {
        let task_routed = self.objective == Objective::TaskRouted;
        let mut lm = Tensor::zeros([1], device);
        let mut per_task = Tensor::zeros([1], device);
        for (part, t) in task_parts(batch, totals) {
            let out = self
                .model
                .forward_for_loss(lm_input(&part, task_routed, device))?;
            let (l, p) = part_losses(out.head, &t);
            lm = lm + l;
            per_task = per_task + p;
        }
        Ok((lm, per_task))
    }
}

/// The parts of `batch` split by task that carry loss, with their targets weighted by
/// `totals`.
fn task_parts<'a>(
    batch: &'a Batch,
    totals: &'a BatchTotals,
) -> impl Iterator<Item = (Batch, Targets)> + 'a {
    batch.split_by_task().into_iter().filter_map(move |part| {
        let t = targets(&part, totals);
        (t.count > 0 && part.seq_len >= 2).then_some((part, t))
    })
}

/// A task part's token-mean and per-task-mean NLL (see [`Targets`]).
fn part_losses<B: Backend>(head: HeadOutput<B>, t: &Targets) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let nll = head.token_nll(&t.ids);
    (
        weighted_sum(nll.clone(), &t.mean_w),
        weighted_sum(nll, &t.task_w),
    )
}

/// The counts a batch's loss is normalised by: the whole batch's when `ctx` has them (a
/// data-parallel shard or a micro-batch), else the batch's own.
fn totals_of<'a>(ctx: &StepContext<'a>, batch: &Batch) -> Cow<'a, BatchTotals> {
    ctx.totals
        .map_or_else(|| Cow::Owned(batch.totals()), Cow::Borrowed)
}

fn device_of<B: Backend, M: Module<B>>(m: &M) -> B::Device {
    m.devices().into_iter().next().unwrap_or_default()
}

/// Host-side targets of a batch after the HF shift: label ids (0 where ignored) and the
/// per-target weights of the token-mean and of the per-task-mean objectives.
struct Targets {
    ids: Vec<i64>,
    mean_w: Vec<f32>,
    task_w: Vec<f32>,
    count: usize,
}

/// The HF shift of a batch's labels: target ids `[batch · (seq − 1)]` (0 where ignored)
/// and whether each position carries loss.
pub fn shifted_targets(batch: &Batch) -> (Vec<i64>, Vec<bool>) {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let mut ids = vec![0i64; b * (s - 1)];
    let mut valid = vec![false; b * (s - 1)];
    for r in 0..b {
        for t in 0..s - 1 {
            let l = batch.labels[r * s + t + 1];
            if l != IGNORE_INDEX {
                ids[r * (s - 1) + t] = l;
                valid[r * (s - 1) + t] = true;
            }
        }
    }
    (ids, valid)
}

/// The targets of `batch`, weighted by the counts of `totals` (the batch's own, or the
/// whole batch's when `batch` is a data-parallel shard of it).
fn targets(batch: &Batch, totals: &BatchTotals) -> Targets {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let n = b * (s - 1);
    let (ids, valid) = shifted_targets(batch);
    let count = valid.iter().filter(|v| **v).count();
    let mut mean_w = vec![0f32; n];
    let mut task_w = vec![0f32; n];
    for r in 0..b {
        let task = batch.task_ids.get(r).copied().unwrap_or(0);
        for t in 0..s - 1 {
            let i = r * (s - 1) + t;
            if valid[i] {
                mean_w[i] = 1.0 / totals.target_tokens.max(1) as f32;
                task_w[i] = 1.0 / totals.task_targets(task).max(1) as f32;
            }
        }
    }
    Targets {
        ids,
        mean_w,
        task_w,
        count,
    }
}

/// Token-level model input of a batch (ids, mask, positions; task ids when routed by task).
pub fn lm_input<B: Backend>(batch: &Batch, task_routed: bool, device: &B::Device) -> LmInput<B> {
    let shape = [batch.batch_size, batch.seq_len];
    let ints = |v: &[u32]| -> Tensor<B, 2, Int> {
        let data: Vec<i64> = v.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    };
    let input = LmInput::new(ints(&batch.input_ids))
        .with_attention_mask(ints(&batch.attention_mask))
        .with_position_ids(ints(&batch.position_ids));
    if task_routed {
        input.with_task_ids(&batch.task_ids)
    } else {
        input
    }
}

/// Per-token negative log-likelihood of the shifted targets, `[batch · (seq − 1)]`.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, ids: `batch · (seq − 1)` → `[batch · (seq − 1)]`
pub fn token_nll<B: Backend>(logits: Tensor<B, 3>, ids: &[i64]) -> Tensor<B, 1> {
    legora_kernels::next_token_nll(logits, ids)
}

fn weighted_sum<B: Backend>(x: Tensor<B, 1>, w: &[f32]) -> Tensor<B, 1> {
    let device = x.device();
    let w: Tensor<B, 1> = Tensor::from_data(TensorData::new(w.to_vec(), [w.len()]), &device);
    (x * w).sum()
}

impl<B: Backend> TrainModel<B> for LmModel<B> {
    /// With `backward_per_task` and the `TaskRouted` objective (a sum of per-task
    /// means), each task's rows with targets; otherwise the batch as is.
    fn micro_batches(&self, batch: Batch) -> Vec<Batch> {
        let several_tasks = batch
            .task_ids
            .iter()
            .any(|t| Some(t) != batch.task_ids.first());
        if !(self.backward_per_task && several_tasks && self.objective == Objective::TaskRouted) {
            return vec![batch];
        }
        batch
            .split_by_task()
            .into_iter()
            .filter(|part| part.num_target_tokens() > 0)
            .collect()
    }

    fn forward_loss(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
    ) -> std::result::Result<StepOutput<B>, ModelError> {
        check_batch(batch)?;
        let device = device_of::<B, _>(&self.model);
        let totals = totals_of(ctx, batch);
        let totals = &*totals;
        if self.splits_by_task(batch) {
            let (lm_loss, per_task) = self.per_task_losses(batch, totals, &device)?;
            let loss = if self.objective == Objective::TaskRouted {
                per_task
            } else {
                lm_loss.clone()
            };
            return Ok(StepOutput::new(loss).with_term("lm_loss", lm_loss));
        }
        let task_routed = self.objective == Objective::TaskRouted;
        let out = self
            .model
            .forward_for_loss(lm_input(batch, task_routed, &device))?;
        self.objective_of(batch, ctx, totals, out)
    }

    fn checkpointed_gradients(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
        scale: f64,
    ) -> Option<std::result::Result<(StepOutput<B>, GradientsParams), ModelError>>
    where
        B: AutodiffBackend,
        Self: AutodiffModule<B>,
    {
        self.gradient_checkpointing
            .then(|| self.checkpointed(batch, ctx, scale))
    }
}

impl<B: Backend> LmModel<B> {
    /// Whether `batch` runs as one forward pass per task (`pad_per_task` with several
    /// tasks, `Lm` / `TaskRouted` objectives).
    fn splits_by_task(&self, batch: &Batch) -> bool {
        let several_tasks = batch
            .task_ids
            .iter()
            .any(|t| Some(t) != batch.task_ids.first());
        self.pad_per_task && several_tasks && !matches!(self.objective, Objective::Routed { .. })
    }

    /// The objective and logged terms of the model's output `out` for `batch`.
    fn objective_of(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
        totals: &BatchTotals,
        out: LossOutput<B>,
    ) -> std::result::Result<StepOutput<B>, ModelError> {
        let device = out.head.device();
        let t = targets(batch, totals);
        let nll = out.head.clone().token_nll(&t.ids);
        let lm_loss = if t.count == 0 {
            Tensor::zeros([1], &device)
        } else {
            weighted_sum(nll.clone(), &t.mean_w)
        };
        let mut step = match self.objective {
            Objective::Lm => StepOutput::new(lm_loss.clone()),
            Objective::TaskRouted => StepOutput::new(weighted_sum(nll, &t.task_w)),
            Objective::Routed { .. } => StepOutput::new(lm_loss.clone()),
        }
        .with_term("lm_loss", lm_loss);

        if let Objective::Routed { routing_loss_coef } = self.objective {
            step = routed_terms(step, batch, ctx, totals, &out, routing_loss_coef)?;
        }
        Ok(step)
    }
}

impl<B: AutodiffBackend> LmModel<B> {
    /// [`TrainModel::checkpointed_gradients`]: the step's objective (scaled by `scale`)
    /// differentiated one decoder layer at a time.
    fn checkpointed(
        &self,
        batch: &Batch,
        ctx: &StepContext<'_>,
        scale: f64,
    ) -> std::result::Result<(StepOutput<B>, GradientsParams), ModelError> {
        check_batch(batch)?;
        let totals = totals_of(ctx, batch);
        let totals = &*totals;
        let mut acc = GradientsAccumulator::<Self>::new();
        let mut on_grads =
            |g: B::Gradients| acc.accumulate(self, GradientsParams::from_grads(g, self));
        let step = if self.splits_by_task(batch) {
            self.checkpointed_per_task(batch, totals, scale, &mut on_grads)?
        } else {
            let task_routed = self.objective == Objective::TaskRouted;
            let device = device_of::<B, _>(&self.model);
            self.model.backward_checkpointed(
                lm_input(batch, task_routed, &device),
                |out| {
                    let step = self.objective_of(batch, ctx, totals, out)?;
                    Ok::<_, ModelError>((step.loss.clone() * scale, detached(step)))
                },
                &mut on_grads,
            )?
        };
        Ok((step, acc.grads()))
    }

    /// [`LmModel::per_task_losses`] with one checkpointed backward per task.
    fn checkpointed_per_task(
        &self,
        batch: &Batch,
        totals: &BatchTotals,
        scale: f64,
        on_grads: &mut dyn FnMut(B::Gradients),
    ) -> std::result::Result<StepOutput<B>, ModelError> {
        let task_routed = self.objective == Objective::TaskRouted;
        let device = device_of::<B, _>(&self.model);
        let mut lm = Tensor::zeros([1], &device);
        let mut per_task = Tensor::zeros([1], &device);
        for (part, t) in task_parts(batch, totals) {
            let (l, p) = self.model.backward_checkpointed(
                lm_input(&part, task_routed, &device),
                |out| {
                    let (l, p) = part_losses(out.head, &t);
                    let objective = if task_routed { p.clone() } else { l.clone() };
                    Ok::<_, ModelError>((objective * scale, (l.detach(), p.detach())))
                },
                on_grads,
            )?;
            lm = lm + l;
            per_task = per_task + p;
        }
        let loss = if task_routed { per_task } else { lm.clone() };
        Ok(StepOutput::new(loss).with_term("lm_loss", lm))
    }
}

/// `step` with its tensors cut from the graph (their values are all the trainer reads).
fn detached<B: Backend>(step: StepOutput<B>) -> StepOutput<B> {
    StepOutput {
        loss: step.loss.detach(),
        terms: step
            .terms
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect(),
        routing: step.routing,
    }
}

/// The `Routed` objective's terms added to `step`: the routers' aux losses and the
/// supervised routing loss (cross-entropy of the layer routers' probabilities against each
/// token's task), with the routing statistics.
fn routed_terms<B: Backend>(
    mut step: StepOutput<B>,
    batch: &Batch,
    ctx: &StepContext<'_>,
    totals: &BatchTotals,
    out: &LossOutput<B>,
    routing_loss_coef: f64,
) -> std::result::Result<StepOutput<B>, ModelError> {
    let device = out.head.device();
    let layer_routers: Vec<_> = out
        .routing
        .iter()
        .filter(|r| r.slot.is_none() && r.layer.is_some())
        .collect();
    if let Some(aux) = out.aux_loss() {
        // over this batch's tokens; a data-parallel shard's weighs by its share
        // of the whole batch's real tokens
        let share = batch.num_tokens() as f64 / totals.real_tokens.max(1) as f64;
        let aux = if ctx.totals.is_some() {
            aux * share
        } else {
            aux
        };
        step.loss = step.loss + aux.clone();
        step = step.with_term("aux_loss", aux);
    }
    let (b, s) = (batch.batch_size, batch.seq_len);
    if routing_loss_coef > 0.0 && !layer_routers.is_empty() && totals.real_tokens > 0 {
        let e = layer_routers[0].output.probs.dims()[1];
        if let Some(task) = batch.task_ids.iter().find(|t| **t >= e) {
            return Err(format!("task id {task} has no expert (E = {e})").into());
        }
        // One-hot target expert of each real token. Every task present in the
        // (whole) batch weighs the same, whatever its rows' lengths (long dialogue
        // rows would otherwise pull the routers towards their expert): weight
        // 1 / (tasks · task's real tokens · layers).
        let tasks = totals.tasks_present();
        let mut w = vec![0f32; b * s * e];
        for r in 0..b {
            let task = batch.task_ids[r];
            let n = totals.task_real(task).max(1);
            let scale = 1.0 / (tasks * n * layer_routers.len()) as f32;
            for j in 0..s {
                if batch.attention_mask[r * s + j] != 0 {
                    w[(r * s + j) * e + task] = scale;
                }
            }
        }
        let w: Tensor<B, 2> = Tensor::from_data(TensorData::new(w, [b * s, e]), &device);
        let ce = layer_routers
            .iter()
            .map(|r| {
                (r.output.probs.clone().clamp_min(1e-9).log() * w.clone())
                    .sum()
                    .neg()
            })
            .reduce(|a, c| a + c)
            .expect("non-empty");
        step.loss = step.loss + ce.clone() * routing_loss_coef;
        step = step.with_term("routing_loss", ce);
    }
    if !layer_routers.is_empty() {
        step = step.with_routing(routing_stats(batch, &layer_routers));
    }
    Ok(step)
}

/// The batch shapes `CausalLm` trains on.
fn check_batch(batch: &Batch) -> std::result::Result<(), ModelError> {
    if batch.is_packed() {
        return Err(
            "packed batches are not supported by CausalLm (set data.packing = false)".into(),
        );
    }
    if batch.seq_len < 2 {
        return Err(format!("sequences of length {} have no next token", batch.seq_len).into());
    }
    Ok(())
}

/// Load per expert, routing accuracy (top expert = the row's task) and mean entropy of
/// the layer routers, over the batch's real tokens.
fn routing_stats<B: Backend>(
    batch: &Batch,
    routers: &[&legora_models::Routing<B>],
) -> RoutingStats {
    let (b, s) = (batch.batch_size, batch.seq_len);
    let mut layers = Vec::new();
    let mut load = Vec::new();
    let (mut hits, mut total, mut ent) = (0usize, 0usize, 0f64);
    for r in routers {
        let e = r.output.probs.dims()[1];
        let probs: Vec<f32> = r
            .output
            .probs
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let gates: Vec<f32> = r
            .output
            .gates
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let mut l = vec![0f64; e];
        for row in 0..b {
            for j in 0..s {
                let tok = row * s + j;
                if batch.attention_mask[tok] == 0 || probs.len() < (tok + 1) * e {
                    continue;
                }
                let p = &probs[tok * e..(tok + 1) * e];
                let g = &gates[tok * e..(tok + 1) * e];
                let top = (0..e).max_by(|&a, &c| p[a].total_cmp(&p[c])).unwrap_or(0);
                hits += usize::from(top == batch.task_ids[row]);
                total += 1;
                ent -= p
                    .iter()
                    .filter(|v| **v > 0.0)
                    .map(|v| (*v as f64) * (*v as f64).ln())
                    .sum::<f64>();
                for (k, gv) in g.iter().enumerate() {
                    if *gv > 0.0 {
                        l[k] += 1.0;
                    }
                }
            }
        }
        let sum: f64 = l.iter().sum();
        if sum > 0.0 {
            l.iter_mut().for_each(|v| *v /= sum);
        }
        layers.push(format!("model.layers.{}.router", r.layer.unwrap_or(0)));
        load.push(l);
    }
    RoutingStats {
        layers,
        load,
        accuracy: (total > 0).then(|| hits as f64 / total as f64),
        entropy: (total > 0).then(|| ent / total as f64),
    }
}
