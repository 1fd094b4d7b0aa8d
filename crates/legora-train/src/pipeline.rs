//! The whole run of a run file: `experts` → `router` (+ the `single_lora` baseline) →
//! `eval`, with every output written under the run's output folder:
//!
//! ```text
//! <out>/experts/<task>/            each expert, a plain PEFT adapter folder
//! <out>/router.safetensors, moe_config.json   (and experts/ again: the mixture folder)
//! <out>/single_lora/               the single-LoRA baseline (PEFT folder)
//! <out>/report.json, report.md     the comparison
//! <out>/metrics.jsonl              every logged step and validation
//! <out>/plots/*.png                loss curves per stage, routing load per expert per layer
//! <out>/stages/<stage>/checkpoints resumable checkpoints (never the frozen base)
//! ```
//!
//! The run file is first resolved into a [`RunPlan`] (every run-file error is raised
//! there, before any data is read); then one function per stage runs on a [`Run`]
//! holding what the stages share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use legora_data::{
    derive_seed, eval_batches, prepare_task, split_indices, Batcher, Example, Loader, Record,
    Template, TokenizeOptions, IGNORE_INDEX,
};
use legora_hub::PretrainedModel;
use legora_models::{CausalLm, GenerationConfig, Slot};
use legora_nn::Router;
use legora_plugin_api::{EvalRequest, ParseOptions};
use legora_plugin_host::PluginHost;

use crate::checkpoint::write_atomic;
use crate::config::{ExpertsMode, RunConfig, StageKind, TrainSettings};
use crate::distributed::Peer;
use crate::error::{Result, TrainError};
use crate::lm::{lm_input, shifted_targets, token_nll, LmModel, Objective};
use crate::lr_groups::param_groups;
use crate::metrics::{read_metrics, RoutingStats};
use crate::plan::{ExpertSource, Mode, RunPlan, TaskPlan, Variant};
use crate::plot::{plot_routing_load, plot_stage_losses};
use crate::report::{ModelMetrics, ParamCount, Report, TaskReport};
use crate::tok::HubTokenizer;
use crate::trainer::{
    evaluate_inner, EvalProgress, LrGroup, StageSummary, TrainCallback, Trainer, ValSet,
};

/// Streams of [`derive_seed`] for initial weights: an expert's `A`, a layer's router,
/// the single LoRA's `A`.
const INIT_EXPERT: u64 = 0x1417_0001;
const INIT_ROUTER: u64 = 0x1417_0002;
const INIT_SINGLE_LORA: u64 = 0x1417_0003;

/// How to run the pipeline.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Train, compose existing experts, or only evaluate.
    pub mode: Mode,
    /// Continue stages from their latest checkpoints.
    pub resume: bool,
    /// Stop every stage after this many steps (testing / interruption).
    pub stop_after: Option<usize>,
    /// Skip the evaluation (outputs of the training stages only).
    pub skip_eval: bool,
    /// Start over in an output folder that holds checkpoints (they are deleted);
    /// without it (and without `resume`) such a folder is refused.
    pub overwrite: bool,
    /// How to store the base's frozen weights, instead of the run file's `[model]
    /// precision` / `[model.quantization]` (the CLI's `--dtype` / `--quantize`).
    pub load_options: Option<legora_hub::LoadOptions>,
    /// Train data-parallel with these peers (`legora train --world-size`): rank 0
    /// trains, evaluates and writes everything; the other ranks train and write nothing.
    pub peer: Option<Arc<Peer>>,
}

/// One task's data, parsed and tokenized.
struct TaskData {
    name: String,
    evaluator: String,
    train: Vec<Example>,
    val: Vec<Example>,
    eval_records: Vec<Record>,
}

/// What every stage of a run shares, and what the stages report.
struct Run<'a, B: Backend> {
    cfg: &'a RunConfig,
    plan: &'a RunPlan,
    host: &'a PluginHost,
    options: &'a PipelineOptions,
    base: PretrainedModel<B>,
    tok: HubTokenizer,
    template: Template,
    tasks: Vec<TaskData>,
    batcher: Batcher,
    out: PathBuf,
    metrics_path: PathBuf,
    summaries: Vec<StageSummary>,
    params: BTreeMap<String, ParamCount>,
}

/// Run `cfg`: resolve and check it, train its stages, evaluate, write the outputs.
pub fn run_pipeline<B: AutodiffBackend>(
    cfg: &RunConfig,
    host: &PluginHost,
    options: &PipelineOptions,
    callback: &mut dyn TrainCallback,
    device: &B::Device,
) -> Result<Report> {
    let mut plan = RunPlan::resolve(cfg, host, options.mode.clone(), options.skip_eval)?;
    if let Some(o) = options.load_options {
        plan.load_options = o;
    }
    if plan.mode != Mode::EvalOnly && !options.resume && !options.overwrite {
        if let Some(found) = crate::checkpoint::find_checkpoints(&plan.output_dir, 3) {
            return Err(cfg.error_at(
                "output_dir",
                format!(
                    "{} holds checkpoints ({}): pass --resume to continue the run, or \
                     --overwrite to delete them and start over",
                    plan.output_dir.display(),
                    found.display()
                ),
            ));
        }
    }
    if options.peer.is_some() && plan.mode != Mode::Train {
        let found = format!("{:?}", plan.mode);
        return Err(TrainError::invalid(
            "world-size",
            "1 unless training (`legora train`)",
            found,
        ));
    }
    let mut run = Run::<B>::open(cfg, &plan, host, options, device)?;
    let mixture = match &plan.mode {
        Mode::Train => run.experts_stage(callback, device)?,
        Mode::Compose(_) => run.compose(&plan.experts)?,
        Mode::EvalOnly => run.trained_mixture()?,
    };
    let mixture = run.router_stage(mixture, callback, device)?;
    let single = run.single_lora_stage(callback, device)?;
    let mut report = run.report_header();
    report.backend = B::InnerBackend::name(device);
    if !run.is_writer() {
        return Ok(report); // rank 0 evaluates and writes the outputs
    }
    if !plan.variants.is_empty() {
        run.evaluate(&mixture, single, &mut report, callback)?;
    }
    run.plots(&mut report)?;
    report.write(&run.out)?;
    Ok(report)
}

impl<'a, B: AutodiffBackend> Run<'a, B> {
    /// Load the base, its tokenizer and template, and every task's data.
    fn open(
        cfg: &'a RunConfig,
        plan: &'a RunPlan,
        host: &'a PluginHost,
        options: &'a PipelineOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let out = plan.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
        let base = PretrainedModel::<B>::from_pretrained_with(
            &plan.model_path,
            device,
            &plan.load_options,
        )
        .map_err(|e| cfg.error_at("model.path", e.to_string()))?;
        let tok = HubTokenizer::from_model(&base).map_err(|e| cfg.error_at("model.path", e))?;
        let template = match cfg.template() {
            Some(t) => t,
            None => {
                crate::tok::chat_template(&base).map_err(|e| cfg.error_at("model.template", e))?
            }
        };
        let tasks = load_tasks(cfg, plan, host, &template, &tok)?;
        let writer = options.peer.as_ref().is_none_or(|p| p.is_writer());
        if writer {
            write_val_data(&out, &tasks)?;
        }
        let metrics_path = out.join("metrics.jsonl");
        if writer && !options.resume && plan.mode != Mode::EvalOnly {
            let _ = std::fs::remove_file(&metrics_path);
        }
        let mut run = Self {
            batcher: Batcher::for_tokenizer(&tok),
            cfg,
            plan,
            host,
            options,
            base,
            tok,
            template,
            tasks,
            out,
            metrics_path,
            summaries: Vec::new(),
            params: BTreeMap::new(),
        };
        if plan.mode == Mode::EvalOnly {
            // the previous run's stage summaries and parameter counts stay in the report
            if let Ok(prev) = Report::read_json(&run.out.join("report.json")) {
                run.summaries = prev.stages;
                run.params = prev.params;
            }
        }
        Ok(run)
    }

    /// Stage 1: one adapter per task (its own LoRA settings), turned into a mixture
    /// without routers and trained concurrently over one frozen base (task-routed).
    fn experts_stage(
        &mut self,
        callback: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<CausalLm<B>> {
        let mut m = self.base.model.clone();
        for (i, t) in self.plan.tasks.iter().enumerate() {
            self.seed_init(device, &[INIT_EXPERT, i as u64]);
            m.add_adapter(&t.name, &t.lora).map_err(|e| {
                self.cfg.error_at(
                    &format!("tasks[{i}]"),
                    format!("{} ({}): {e}", t.name, t.lora_source),
                )
            })?;
        }
        let names = self.plan.task_names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        m.adapters_to_mixture(&refs, None)?;
        let settings = self.settings(StageKind::Experts)?;
        let expert_scales: Vec<f64> = self
            .plan
            .tasks
            .iter()
            .map(|t| {
                t.learning_rate
                    .map_or(1.0, |lr| lr / settings.learning_rate)
            })
            .collect();
        let groups = param_groups(&m, &settings, &expert_scales);
        let data = &self.cfg.file.data;
        let model = LmModel::new(m, Objective::TaskRouted)
            .with_pad_per_task(data.pad_per_task)
            .with_backward_per_task(data.backward_per_task)
            .with_gradient_checkpointing(self.cfg.file.model.gradient_checkpointing);
        self.train("experts", settings, false, groups, model, callback, device)
    }

    /// Seed the backend's generator from the run's seed before initialising trainable
    /// weights (LoRA `A`, routers), so the same run file gives the same weights in every
    /// process whatever ran before.
    fn seed_init(&self, device: &B::Device, what: &[u64]) {
        B::seed(device, derive_seed(self.cfg.file.seed, what));
    }

    /// Existing PEFT adapter folders as the experts: folder `i` becomes the expert of
    /// task `i`, then all of them one mixture (no routers yet).
    fn compose(&self, experts: &[ExpertSource]) -> Result<CausalLm<B>> {
        let mut m = self.base.model.clone();
        for (i, (t, source)) in self.plan.tasks.iter().zip(experts).enumerate() {
            let dir = match source {
                ExpertSource::Folder(dir) => dir.clone(),
                ExpertSource::Plugin(name) => self.plugin_expert(name)?,
            };
            legora_hub::load_adapter(&mut m, &dir, &t.name).map_err(|e| {
                self.cfg.error_at(
                    &format!("tasks[{i}]"),
                    format!("loading expert `{}` from {}: {e}", t.name, dir.display()),
                )
            })?;
        }
        let names = self.plan.task_names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        m.adapters_to_mixture(&refs, None).map_err(|e| {
            self.cfg
                .error_at("tasks", format!("the expert folders do not combine: {e}"))
        })?;
        Ok(m)
    }

    /// Writes the expert a plugin ships as a PEFT folder under
    /// `<out>/plugin-experts/<plugin>/<expert>/` and returns the folder.
    fn plugin_expert(&self, name: &str) -> Result<PathBuf> {
        let files = self.host.expert(name)?;
        let dir = self.out.join("plugin-experts").join(name);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let config = serde_json::to_vec_pretty(&files.adapter_config)
            .map_err(|e| TrainError::io(&dir, std::io::Error::other(e)))?;
        write_atomic(&dir.join(legora_hub::ADAPTER_CONFIG), &config)?;
        write_atomic(&dir.join(legora_hub::ADAPTER_WEIGHTS), &files.adapter_model)?;
        Ok(dir)
    }

    /// The mixture a previous run wrote (`eval_only`); its experts must be the run's
    /// tasks, in order, and it must have routers.
    fn trained_mixture(&self) -> Result<CausalLm<B>> {
        let mut m = self.base.model.clone();
        let moe = legora_hub::load_mixture(&mut m, &self.out).map_err(|e| {
            self.cfg.error_at(
                "output_dir",
                format!("no trained mixture to evaluate ({e}); train the run first"),
            )
        })?;
        let want = self.plan.task_names();
        if moe.experts != want {
            let msg = format!(
                "the mixture in {} has experts {:?}, the run file's tasks are {want:?}",
                self.out.display(),
                moe.experts
            );
            return Err(self.cfg.error_at("tasks", msg));
        }
        if moe.router.is_none() {
            let msg = format!(
                "the mixture in {} has no routers (the router stage did not finish)",
                self.out.display()
            );
            return Err(self.cfg.error_at("output_dir", msg));
        }
        Ok(m)
    }

    /// Stage 2: a router per mixture layer over the experts (frozen unless `joint`),
    /// trained with the LM loss, the aux losses and the supervised routing loss; then
    /// the mixture folder is written (`eval_only`: the loaded mixture as is).
    fn router_stage(
        &mut self,
        mut mixture: CausalLm<B>,
        callback: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<CausalLm<B>> {
        if self.plan.mode == Mode::EvalOnly {
            return Ok(mixture);
        }
        let hidden = self.base.model.config().hidden_size;
        for layer in moe_layers(&mixture) {
            self.seed_init(device, &[INIT_ROUTER, layer as u64]);
            let r = Router::init(&self.plan.router, hidden, device)?;
            mixture.set_layer_router(layer, r)?;
        }
        let settings = self.settings(StageKind::Router)?;
        set_experts_trainable(&mut mixture, settings.experts == ExpertsMode::Joint);
        if self.plan.train_router {
            let objective = Objective::Routed {
                routing_loss_coef: settings.routing_loss_coef,
            };
            let groups = param_groups(&mixture, &settings, &[]);
            let model = LmModel::new(mixture, objective)
                .with_gradient_checkpointing(self.cfg.file.model.gradient_checkpointing);
            mixture = self.train("router", settings, false, groups, model, callback, device)?;
        }
        if !self.is_writer() {
            return Ok(mixture);
        }
        let base_name = Some(self.plan.model_path.display().to_string());
        legora_hub::save_mixture(
            &mixture,
            &self.out,
            Some(&self.cfg.lora_config()),
            base_name,
        )?;
        Ok(mixture)
    }

    /// The single-LoRA baseline (`eval_only`: the one a previous run wrote, if any).
    fn single_lora_stage(
        &mut self,
        callback: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<Option<CausalLm<B>>> {
        let dir = self.out.join("single_lora");
        if self.plan.mode == Mode::EvalOnly {
            if !dir.join(legora_hub::ADAPTER_CONFIG).exists() {
                return Ok(None);
            }
            let mut m = self.base.model.clone();
            legora_hub::load_adapter(&mut m, &dir, "single_lora")
                .map_err(|e| self.cfg.error_at("stages.eval.baselines", e.to_string()))?;
            return Ok(Some(m));
        }
        let Some(cfg) = &self.plan.single_lora else {
            return Ok(None);
        };
        let mut m = self.base.model.clone();
        self.seed_init(device, &[INIT_SINGLE_LORA]);
        m.add_adapter("single_lora", cfg)?;
        let settings = self.settings(StageKind::SingleLora)?;
        let groups = param_groups(&m, &settings, &[]);
        let model = LmModel::new(m, Objective::Lm)
            .with_pad_per_task(self.cfg.file.data.pad_per_task)
            .with_gradient_checkpointing(self.cfg.file.model.gradient_checkpointing);
        let m = self.train(
            "single_lora",
            settings,
            true,
            groups,
            model,
            callback,
            device,
        )?;
        if self.is_writer() {
            legora_hub::save_adapter(&m, "single_lora", cfg, &dir)?;
        }
        Ok(Some(m))
    }

    /// Whether this process writes the run's outputs (no peers, or rank 0).
    fn is_writer(&self) -> bool {
        self.options.peer.as_ref().is_none_or(|p| p.is_writer())
    }

    /// A stage's settings, `num_train_epochs` counted in batches of the stage's batch
    /// size (times the data-parallel world size: every rank takes `batch_size` rows).
    fn settings(&self, kind: StageKind) -> Result<TrainSettings> {
        let rows = self.loader(1, self.cfg.file.seed)?.num_rows();
        let batch = self.cfg.train_settings(kind, rows)?.batch_size.max(1);
        self.cfg
            .train_settings(kind, rows.div_ceil(batch * self.world_size()))
    }

    /// Processes training together (1 without peers).
    fn world_size(&self) -> usize {
        self.options.peer.as_ref().map_or(1, |p| p.world_size())
    }

    /// The training stream: the task mixture of `[data] mixing` (also for the single-LoRA
    /// baseline, so both see the same kind of batches).
    fn loader(&self, batch_size: usize, seed: u64) -> Result<Loader> {
        let data: Vec<(String, Vec<Example>)> = self
            .tasks
            .iter()
            .map(|t| (t.name.clone(), t.train.clone()))
            .collect();
        Ok(Loader::new(
            data,
            self.cfg.mixing(),
            seed,
            self.batcher,
            batch_size,
            None,
        )?)
    }

    /// Train `model` for one stage (checkpoints under `stages/<name>`), record its
    /// trainable-parameter count and summary, and return the trained model.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &mut self,
        name: &str,
        settings: TrainSettings,
        single_task: bool,
        groups: Vec<LrGroup>,
        model: LmModel<B>,
        callback: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<CausalLm<B>> {
        // every rank reads the whole batch and keeps its shard of it
        let mut l = self.loader(settings.batch_size * self.world_size(), settings.seed)?;
        let val = val_sets(
            &self.tasks,
            settings.eval_batch_size,
            &self.batcher,
            single_task,
        )?;
        let p = model.model.parameter_report();
        let count = ParamCount {
            trainable: p.trainable,
            total: p.total,
        };
        self.params.insert(name.to_string(), count);
        let res = Trainer::new(name, self.out.join("stages").join(name), settings)
            .resume(self.options.resume)
            .stop_after(self.options.stop_after)
            .metrics_path(&self.metrics_path)
            .callback(callback)
            .lr_groups(groups)
            .peer(self.options.peer.as_deref())
            .run(model, &mut l, &val, device)?;
        self.summaries.push(res.summary);
        Ok(res.model.model)
    }

    /// The report's header fields (no results yet).
    fn report_header(&mut self) -> Report {
        Report {
            run: self.cfg.name(),
            base_model: self.plan.model_path.display().to_string(),
            base_storage: self.plan.load_options.describe(),
            experts: self.plan.task_names(),
            variants: self
                .plan
                .variants
                .iter()
                .map(|v| v.as_str().to_string())
                .collect(),
            params: std::mem::take(&mut self.params),
            stages: std::mem::take(&mut self.summaries),
            ..Report::default()
        }
    }

    /// Stage 4: every variant on every task, through each plugin's evaluator, with
    /// validation losses and the mixture's routing statistics.
    fn evaluate(
        &self,
        mixture: &CausalLm<B>,
        single: Option<CausalLm<B>>,
        report: &mut Report,
        callback: &mut dyn TrainCallback,
    ) -> Result<()> {
        let mut base = self.base.model.valid();
        base.disable_adapters();
        let mixture = mixture.valid();
        let single = single.map(|m| m.valid());
        let val = val_sets(
            &self.tasks,
            self.cfg.file.stages.eval.batch_size,
            &self.batcher,
            false,
        )?;
        let mut all_routing = Vec::new();
        let variants = self.plan.variants.len()
            - usize::from(single.is_none() && self.plan.variants.contains(&Variant::SingleLora));
        let pairs = self.tasks.len() * variants;
        let mut pair = 0;
        for (ti, task) in self.tasks.iter().enumerate() {
            let mut tr = TaskReport {
                task: task.name.clone(),
                evaluator: task.evaluator.clone(),
                n_eval: task.eval_records.len(),
                primary_metric: self.plan.tasks[ti].headline.clone(),
                ..TaskReport::default()
            };
            for &variant in &self.plan.variants {
                let (model, objective, route) = match variant {
                    Variant::Base => (&base, Objective::Lm, None),
                    Variant::SingleLora => match &single {
                        Some(m) => (m, Objective::Lm, None),
                        None => continue,
                    },
                    Variant::Mixture => (
                        &mixture,
                        Objective::Routed {
                            routing_loss_coef: 0.0,
                        },
                        None,
                    ),
                    Variant::Oracle => (&mixture, Objective::TaskRouted, Some(ti)),
                };
                let lm = LmModel::new(model.clone(), objective);
                let m = evaluate_inner(&lm, std::slice::from_ref(&val[ti]), "eval", 0)?;
                if variant == Variant::Mixture {
                    if let Some(rs) = &m.routing {
                        record_routing(&mut tr, rs);
                        all_routing.push((rs.clone(), task.val.len() as f64));
                    }
                }
                pair += 1;
                let mut progress = EvalProgress {
                    variant: variant.as_str().to_string(),
                    task: task.name.clone(),
                    done: 0,
                    total: task.eval_records.len(),
                    pair,
                    pairs,
                };
                callback.on_eval_progress(&progress);
                let mut report_done = |done: usize| {
                    progress.done = done;
                    callback.on_eval_progress(&progress);
                };
                let metrics = self.task_metrics(model, task, route, &mut report_done)?;
                let mm = ModelMetrics {
                    val_loss: Some(m.val_loss),
                    metrics,
                };
                tr.models.insert(variant.as_str().to_string(), mm);
            }
            report.tasks.push(tr);
        }
        report.routing = RoutingStats::weighted_mean(&all_routing);
        Ok(())
    }

    /// Loss curves per stage and the routing load, into `plots/`.
    fn plots(&self, report: &mut Report) -> Result<()> {
        let plots = self.out.join("plots");
        std::fs::create_dir_all(&plots).map_err(|e| TrainError::io(&plots, e))?;
        let lines = read_metrics(&self.metrics_path)?;
        for p in plot_stage_losses(&lines, &plots)? {
            report.plots.push(rel(&self.out, &p));
        }
        if let Some(rs) = &report.routing {
            let p = plots.join("routing_load.png");
            plot_routing_load(&p, rs, &report.experts)?;
            report.plots.push(rel(&self.out, &p));
        }
        Ok(())
    }
}

/// The mean expert load and the routing accuracy / entropy of one task.
fn record_routing(tr: &mut TaskReport, rs: &RoutingStats) {
    tr.routing_accuracy = rs.accuracy;
    tr.routing_entropy = rs.entropy;
    let e = rs.load.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; e];
    for row in &rs.load {
        for (k, v) in row.iter().enumerate() {
            mean[k] += v / rs.load.len() as f64;
        }
    }
    tr.expert_load = Some(mean);
}

/// Load the plugins' records of every task, split and tokenize them.
fn load_tasks(
    cfg: &RunConfig,
    plan: &RunPlan,
    host: &PluginHost,
    template: &Template,
    tok: &HubTokenizer,
) -> Result<Vec<TaskData>> {
    let opts = TokenizeOptions {
        max_seq_len: cfg.file.model.max_seq_len,
        add_special_tokens: true,
        append_eos: true,
    };
    let mut out = Vec::new();
    for (i, t) in plan.tasks.iter().enumerate() {
        let (train_records, val_records) = task_records(cfg, host, t)?;
        let (train, stats) = prepare_task(&train_records, i, template, tok, &opts)?;
        if train.is_empty() && stats.dropped > 0 {
            return Err(cfg.error_at(
                "model.max_seq_len",
                format!(
                    "task `{}`: all {} training records leave no answer token within {} \
                     tokens (raise max_seq_len, within the base's context)",
                    t.name, stats.dropped, opts.max_seq_len
                ),
            ));
        }
        let (val, _) = prepare_task(&val_records, i, template, tok, &opts)?;
        let mut eval_records = val_records;
        if let Some(n) = cfg.file.stages.eval.max_samples {
            eval_records.truncate(n);
        }
        out.push(TaskData {
            name: t.name.clone(),
            evaluator: t.evaluator.clone(),
            train,
            val,
            eval_records,
        });
    }
    Ok(out)
}

/// A task's training and held-out records (its `eval` file, else a seeded split).
fn task_records(
    cfg: &RunConfig,
    host: &PluginHost,
    t: &TaskPlan,
) -> Result<(Vec<Record>, Vec<Record>)> {
    let popts = ParseOptions {
        task: Some(t.name.clone()),
        params: t.params.clone().into_iter().collect(),
        ..ParseOptions::default()
    };
    let parse =
        |p: &Path| -> Result<Vec<Record>> { Ok(host.parse_file(&t.format, p, &popts)?.records) };
    let mut train = parse(&t.train)?;
    if let Some(n) = t.max_samples {
        train.truncate(n);
    }
    if let Some(p) = &t.eval {
        return Ok((train, parse(p)?));
    }
    let split = split_indices(train.len(), cfg.val_split(), cfg.file.seed, &t.name)?;
    let pick = |idx: &[usize]| idx.iter().map(|&j| train[j].clone()).collect::<Vec<_>>();
    Ok((pick(&split.train), pick(&split.val)))
}

fn val_sets(
    tasks: &[TaskData],
    batch_size: usize,
    batcher: &Batcher,
    single_task: bool,
) -> Result<Vec<ValSet>> {
    tasks
        .iter()
        .map(|t| {
            let mut ex = t.val.clone();
            if single_task {
                ex.iter_mut().for_each(|e| e.task = 0);
            }
            Ok(ValSet {
                task: t.name.clone(),
                batches: eval_batches(&ex, batch_size, batcher)?,
            })
        })
        .collect()
}

/// The layers holding mixture slots.
fn moe_layers<B: Backend>(model: &CausalLm<B>) -> Vec<usize> {
    let mut layers: Vec<usize> = model
        .slots()
        .into_iter()
        .filter(|(_, slot)| matches!(slot, Slot::Moe(_)))
        .filter_map(|(id, _)| id.layer_index())
        .collect();
    layers.dedup();
    layers
}

fn set_experts_trainable<B: Backend>(model: &mut CausalLm<B>, trainable: bool) {
    for (_, slot) in model.slots_mut() {
        if let Slot::Moe(m) = slot {
            *m = m.clone().set_experts_trainable(trainable);
        }
    }
}

/// `<out>/data/<task>.val.jsonl`: the tokenized validation examples (`input_ids`,
/// `labels` with -100 on prompt tokens), so that other tools (PEFT, see
/// `demo/check_peft.py`) can recompute the validation loss on exactly the same tokens.
fn write_val_data(out: &Path, tasks: &[TaskData]) -> Result<()> {
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    for t in tasks {
        let mut text = String::new();
        for e in &t.val {
            let line = serde_json::json!({ "input_ids": e.input_ids, "labels": e.labels });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let path = dir.join(format!("{}.val.jsonl", t.name));
        crate::checkpoint::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

impl<B: AutodiffBackend> Run<'_, B> {
    /// Predictions of `model` on the task's held-out records, scored by its evaluator;
    /// `route` sends every row to that expert (the oracle variant).
    ///
    /// Records with `choices` are scored by the log-likelihood of each choice after the
    /// prompt (prediction = the best choice, and the per-choice scores go to the
    /// evaluator, e.g. for ROC-AUC); others are answered by greedy generation.
    fn task_metrics(
        &self,
        model: &CausalLm<B::InnerBackend>,
        task: &TaskData,
        route: Option<usize>,
        done: &mut dyn FnMut(usize),
    ) -> Result<BTreeMap<String, f64>> {
        let recs = &task.eval_records;
        if recs.is_empty() {
            return Ok(BTreeMap::new());
        }
        let (prompts, references) = self.eval_prompts(recs)?;
        let choices = recs[0].choices.clone();
        let same_choices = !choices.is_empty() && recs.iter().all(|r| r.choices == choices);
        let mut request = EvalRequest::new(Vec::<String>::new(), references);
        if same_choices {
            let choice_ids: Vec<Vec<u32>> = choices
                .iter()
                .map(|c| legora_data::Tokenize::encode(&self.tok, c, false))
                .collect::<legora_data::Result<_>>()?;
            let bs = self.cfg.file.stages.eval.batch_size;
            let scores = choice_scores(
                model,
                &prompts,
                &choice_ids,
                (bs, &self.batcher),
                route,
                done,
            )?;
            request.predictions = scores.iter().map(|s| choices[argmax(s)].clone()).collect();
            request.choices = choices;
            request.scores = scores;
        } else {
            request.predictions = self.generate_answers(model, &prompts, route, done)?;
        }
        request.meta = recs.iter().map(|r| r.meta.clone()).collect();
        Ok(self.host.evaluate(&task.evaluator, request)?.metrics)
    }

    /// The prompts (left-truncated to leave room for the answer) and references.
    fn eval_prompts(&self, recs: &[Record]) -> Result<(Vec<Vec<u32>>, Vec<String>)> {
        let eval = &self.cfg.file.stages.eval;
        let keep = self
            .cfg
            .file
            .model
            .max_seq_len
            .saturating_sub(eval.max_new_tokens)
            .max(1);
        let mut prompts = Vec::with_capacity(recs.len());
        let mut references = Vec::with_capacity(recs.len());
        for (i, r) in recs.iter().enumerate() {
            let rendered = self.template.render(r, i)?;
            let mut ids = legora_data::Tokenize::encode(&self.tok, &rendered.prompt(), true)?;
            if ids.len() > keep {
                ids.drain(..ids.len() - keep);
            }
            prompts.push(ids);
            references.push(r.reference().unwrap_or_default().to_string());
        }
        Ok((prompts, references))
    }

    /// Greedy answers, batched.
    fn generate_answers(
        &self,
        model: &CausalLm<B::InnerBackend>,
        prompts: &[Vec<u32>],
        route: Option<usize>,
        done: &mut dyn FnMut(usize),
    ) -> Result<Vec<String>> {
        let eval = &self.cfg.file.stages.eval;
        let mut gen = GenerationConfig::greedy(eval.max_new_tokens);
        if let Some(eos) = legora_data::Tokenize::eos_id(&self.tok) {
            gen.eos_token_id = Some(legora_models::TokenIds::One(eos));
        }
        let mut answers = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(eval.batch_size.max(1)) {
            let ids: Option<Vec<usize>> = route.map(|e| vec![e; chunk.len()]);
            for o in model.generate(chunk, &gen, ids.as_deref())? {
                let text = legora_data::Tokenize::decode(&self.tok, &o)?;
                answers.push(text.trim().to_string());
            }
            done(answers.len());
        }
        Ok(answers)
    }
}

/// The index of the largest score.
fn argmax(s: &[f64]) -> usize {
    (0..s.len())
        .max_by(|&a, &b| s[a].total_cmp(&s[b]))
        .unwrap_or(0)
}

/// `scores[i][c]` = log p(choice c | prompt i), summed over the choice's tokens.
fn choice_scores<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    choices: &[Vec<u32>],
    (batch_size, batcher): (usize, &Batcher),
    route: Option<usize>,
    done: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let mut rows = Vec::new();
    for p in prompts {
        for c in choices {
            let mut ids = p.clone();
            ids.extend_from_slice(c);
            let mut labels = vec![IGNORE_INDEX; p.len()];
            labels.extend(c.iter().map(|&t| t as i64));
            rows.push(Example {
                input_ids: ids.clone(),
                labels,
                task: 0,
                seq_lens: vec![ids.len()],
            });
        }
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    let mut flat = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1) * choices.len().max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = batcher.collate(&refs)?;
        let mut input = lm_input(&batch, false, &device);
        if let Some(e) = route {
            input = input.with_task_ids(&vec![e; batch.batch_size]);
        }
        let out = model.forward(input)?;
        let (b, s) = (batch.batch_size, batch.seq_len);
        let (ids, valid) = shifted_targets(&batch);
        let nll: Vec<f32> = token_nll(out.logits, &ids)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| TrainError::invalid("choice scores", "f32 values", format!("{e:?}")))?;
        for r in 0..b {
            let mut sum = 0.0;
            for t in 0..s - 1 {
                if valid[r * (s - 1) + t] {
                    sum -= nll[r * (s - 1) + t] as f64;
                }
            }
            flat.push(sum);
        }
        done(flat.len() / choices.len().max(1));
    }
    Ok(flat
        .chunks(choices.len().max(1))
        .map(|c| c.to_vec())
        .collect())
}
