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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use legora_data::{
    eval_batches, prepare_task, split_indices, Batcher, Example, Loader, Record, Template,
    TokenizeOptions, IGNORE_INDEX,
};
use legora_hub::PretrainedModel;
use legora_models::{CausalLm, GenerationConfig, Slot};
use legora_nn::trainable_parameters;
use legora_plugin_api::{EvalRequest, ParseOptions};
use legora_plugin_host::PluginHost;

use crate::config::{ExpertsMode, RunConfig, StageKind, TrainSettings};
use crate::error::{Result, TrainError};
use crate::lm::{lm_input, shifted_targets, token_nll, LmModel, Objective};
use crate::metrics::{read_metrics, RoutingStats};
use crate::plot::{plot_routing_load, plot_stage_losses};
use crate::report::{ModelMetrics, ParamCount, Report, TaskReport};
use crate::tok::HubTokenizer;
use crate::trainer::{evaluate_inner, StageSummary, TrainCallback, Trainer, ValSet};

/// How to run the pipeline.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Continue stages from their latest checkpoints.
    pub resume: bool,
    /// Stop every stage after this many steps (testing / interruption).
    pub stop_after: Option<usize>,
    /// Skip the evaluation (outputs of the training stages only).
    pub skip_eval: bool,
    /// Compose existing PEFT adapter folders instead of training the `experts` stage
    /// (X-LoRA / LoRAHub style): folder `i` becomes the expert of `[[tasks]]` entry `i`
    /// (the counts must match); the router stage, the baseline and the evaluation run as
    /// usual.
    pub experts_from: Option<Vec<PathBuf>>,
    /// Train nothing: evaluate the mixture (and `single_lora/`, when present) already in
    /// the output folder; the stage summaries come from the previous `report.json`.
    pub eval_only: bool,
}

/// One task's data, parsed and tokenized.
struct TaskData {
    name: String,
    evaluator: String,
    train: Vec<Example>,
    val: Vec<Example>,
    eval_records: Vec<Record>,
}

fn other(e: impl std::fmt::Display, what: &str) -> TrainError {
    TrainError::Invalid {
        key: what.to_string(),
        expected: "success".into(),
        found: e.to_string(),
    }
}

/// Load the plugins' records of every task, split and tokenize them.
fn load_tasks(
    cfg: &RunConfig,
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
    for (i, t) in cfg.file.tasks.iter().enumerate() {
        let key = format!("tasks[{i}]");
        let format = host
            .format(&t.format)
            .map_err(|e| cfg.error_at(&format!("{key}.format"), e.to_string()))?;
        let evaluator = match &t.evaluator {
            Some(e) => e.clone(),
            None => format.default_evaluator().ok_or_else(|| {
                cfg.error_at(
                    &format!("{key}.evaluator"),
                    "the format names no default evaluator: set one",
                )
            })?,
        };
        host.evaluator(&evaluator)
            .map_err(|e| cfg.error_at(&format!("{key}.evaluator"), e.to_string()))?;
        let mut popts = ParseOptions {
            task: Some(t.name.clone()),
            ..ParseOptions::default()
        };
        popts.params = t.params.clone().into_iter().collect();
        let parse = |p: &Path| {
            host.parse_file(&t.format, p, &popts)
                .map(|o| o.records)
                .map_err(|e| other(e, &format!("{key}: {}", p.display())))
        };
        let mut train_records = parse(&cfg.train_file(i))?;
        if let Some(n) = t.max_samples {
            train_records.truncate(n);
        }
        let (train_records, val_records) = match cfg.eval_file(i) {
            Some(p) => (train_records, parse(&p)?),
            None => {
                let split =
                    split_indices(train_records.len(), cfg.val_split(), cfg.file.seed, &t.name)?;
                (
                    split
                        .train
                        .iter()
                        .map(|&j| train_records[j].clone())
                        .collect(),
                    split
                        .val
                        .iter()
                        .map(|&j| train_records[j].clone())
                        .collect::<Vec<_>>(),
                )
            }
        };
        let (train, _) = prepare_task(&train_records, i, template, tok, &opts)?;
        let (val, _) = prepare_task(&val_records, i, template, tok, &opts)?;
        let mut eval_records = val_records;
        if let Some(n) = cfg.file.stages.eval.max_samples {
            eval_records.truncate(n);
        }
        out.push(TaskData {
            name: t.name.clone(),
            evaluator,
            train,
            val,
            eval_records,
        });
    }
    Ok(out)
}

fn loader(
    cfg: &RunConfig,
    tasks: &[TaskData],
    batch_size: usize,
    batcher: &Batcher,
    seed: u64,
) -> Result<Loader> {
    // The single-LoRA baseline draws the same task mixture as the experts (`[data]
    // mixing`), so both see the same kind of batches; its `Lm` objective ignores the
    // rows' task ids, except to pad each task's rows apart (`pad_per_task`).
    let data: Vec<(String, Vec<Example>)> = tasks
        .iter()
        .map(|t| (t.name.clone(), t.train.clone()))
        .collect();
    let pack = cfg.file.data.packing.then_some(cfg.file.model.max_seq_len);
    Ok(Loader::new(
        data,
        cfg.mixing(),
        seed,
        *batcher,
        batch_size,
        pack,
    )?)
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

fn set_experts_trainable<B: Backend>(model: &mut CausalLm<B>, trainable: bool) -> Result<()> {
    for (_, slot) in model.slots_mut() {
        if let Slot::Moe(m) = slot {
            *m = m.clone().set_experts_trainable(trainable);
        }
    }
    Ok(())
}

/// What every training stage of a run shares, and what the stages report.
struct Stages<'a> {
    cfg: &'a RunConfig,
    tasks: &'a [TaskData],
    batcher: &'a Batcher,
    options: &'a PipelineOptions,
    out: &'a Path,
    metrics_path: &'a Path,
    summaries: Vec<StageSummary>,
    params: BTreeMap<String, ParamCount>,
}

impl Stages<'_> {
    /// The stage's settings, `num_train_epochs` counted on its own loader.
    fn settings(&self, kind: StageKind) -> Result<TrainSettings> {
        let l = loader(self.cfg, self.tasks, 1, self.batcher, self.cfg.file.seed)?;
        self.cfg.train_settings(kind, l.batches_per_epoch())
    }

    /// Train `model` for one stage (checkpoints under `stages/<name>`), record its
    /// trainable-parameter count and summary, and return the trained model.
    fn run<B: AutodiffBackend>(
        &mut self,
        name: &str,
        settings: TrainSettings,
        single_task: bool,
        model: LmModel<B>,
        callback: &mut dyn TrainCallback,
        device: &B::Device,
    ) -> Result<CausalLm<B>> {
        let (cfg, tasks, batcher) = (self.cfg, self.tasks, self.batcher);
        let mut l = loader(cfg, tasks, settings.batch_size, batcher, settings.seed)?;
        let val = val_sets(tasks, settings.eval_batch_size, batcher, single_task)?;
        let p = trainable_parameters(&model);
        self.params.insert(
            name.to_string(),
            ParamCount {
                trainable: p.trainable,
                total: p.total,
            },
        );
        let res = Trainer::new(name, self.out.join("stages").join(name), settings)
            .resume(self.options.resume)
            .stop_after(self.options.stop_after)
            .metrics_path(self.metrics_path)
            .callback(callback)
            .run(model, &mut l, &val, device)?;
        self.summaries.push(res.summary);
        Ok(res.model.model)
    }
}

/// Run every enabled stage of `cfg`, then the evaluation, and write the outputs.
pub fn run_pipeline<B: AutodiffBackend>(
    cfg: &RunConfig,
    host: &PluginHost,
    options: &PipelineOptions,
    callback: &mut dyn TrainCallback,
    device: &B::Device,
) -> Result<Report> {
    let out = cfg.output_dir();
    std::fs::create_dir_all(&out).map_err(|e| TrainError::io(&out, e))?;
    let model_path = cfg.check_model_path()?;
    let base = PretrainedModel::<B>::from_pretrained(&model_path, device)
        .map_err(|e| cfg.error_at("model.path", e.to_string()))?;
    let tok = HubTokenizer::from_model(&base).map_err(|e| cfg.error_at("model.path", e))?;
    let template = match cfg.template() {
        Some(t) => t,
        None => crate::tok::chat_template(&base).map_err(|e| cfg.error_at("model.template", e))?,
    };
    let tasks = load_tasks(cfg, host, &template, &tok)?;
    let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let batcher = Batcher::for_tokenizer(&tok);
    write_val_data(&out, &tasks)?;
    let metrics_path = out.join("metrics.jsonl");
    if !options.resume && !options.eval_only {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let lora = cfg.lora_config();
    let mut stage = Stages {
        cfg,
        tasks: &tasks,
        batcher: &batcher,
        options,
        out: &out,
        metrics_path: &metrics_path,
        summaries: Vec::new(),
        params: BTreeMap::new(),
    };
    if options.eval_only {
        // the previous run's stage summaries and parameter counts stay in the report
        if let Ok(prev) = Report::read_json(&out.join("report.json")) {
            stage.summaries = prev.stages;
            stage.params = prev.params;
        }
    }
    let hub_err = |e: legora_hub::HubError| other(e, "write");

    // 1. experts: one adapter per task, trained concurrently over one frozen base (or
    //    existing adapter folders with `experts_from`, or this run's mixture with
    //    `eval_only`)
    let mut mixture = if options.eval_only {
        load_trained_mixture(cfg, &base.model, &out)?
    } else if let Some(dirs) = &options.experts_from {
        compose_experts(cfg, &base.model, &names, dirs)?
    } else {
        let mut experts_model = base.model.clone();
        for n in &names {
            experts_model
                .add_adapter(n, &lora)
                .map_err(|e| cfg.error_at("lora.target_modules", e.to_string()))?;
        }
        experts_model
            .adapters_to_mixture(&name_refs, None)
            .map_err(|e| other(e, "experts"))?;
        let settings = stage.settings(StageKind::Experts)?;
        let model = LmModel::new(experts_model, Objective::TaskRouted)
            .with_pad_per_task(cfg.file.data.pad_per_task)
            .with_backward_per_task(cfg.file.data.backward_per_task);
        stage.run("experts", settings, false, model, callback, device)?
    };
    if !options.eval_only {
        legora_hub::save_mixture(
            &mixture,
            &out,
            Some(&lora),
            Some(model_path.display().to_string()),
        )
        .map_err(hub_err)?;
    }

    // 2. router over the trained experts
    let rc = cfg.router_config();
    // eval_only: the loaded mixture keeps its trained routers
    let new_routers = if options.eval_only {
        Vec::new()
    } else {
        moe_layers(&mixture)
    };
    for layer in new_routers {
        let r = legora_nn::Router::init(&rc, base.config.hidden_size, device)?;
        mixture
            .set_layer_router(layer, r)
            .map_err(|e| other(e, "router"))?;
    }
    let router_settings = stage.settings(StageKind::Router)?;
    set_experts_trainable(&mut mixture, router_settings.experts == ExpertsMode::Joint)?;
    if cfg.stage_enabled(StageKind::Router) && !options.eval_only {
        let objective = Objective::Routed {
            routing_loss_coef: router_settings.routing_loss_coef,
        };
        let model = LmModel::new(mixture, objective);
        mixture = stage.run("router", router_settings, false, model, callback, device)?;
    }
    if !options.eval_only {
        legora_hub::save_mixture(
            &mixture,
            &out,
            Some(&lora),
            Some(model_path.display().to_string()),
        )
        .map_err(hub_err)?;
    }

    // 3. the single-LoRA baseline with the same trainable-parameter budget
    let variants = &cfg.file.stages.eval.baselines;
    let mut single_model = None;
    if options.eval_only {
        single_model = load_trained_single(cfg, &base.model, &out)?;
    } else if variants.iter().any(|v| v == "single_lora") {
        let r = cfg
            .file
            .stages
            .eval
            .single_lora_r
            .unwrap_or(lora.r * names.len());
        let mut single_cfg = lora.clone();
        single_cfg.lora_alpha = lora.lora_alpha * r as f64 / lora.r as f64;
        single_cfg.r = r;
        let mut m = base.model.clone();
        m.add_adapter("single_lora", &single_cfg)
            .map_err(|e| other(e, "single_lora"))?;
        let settings = stage.settings(StageKind::SingleLora)?;
        let model = LmModel::new(m, Objective::Lm).with_pad_per_task(cfg.file.data.pad_per_task);
        let m = stage.run("single_lora", settings, true, model, callback, device)?;
        legora_hub::save_adapter(&m, "single_lora", &single_cfg, &out.join("single_lora"))
            .map_err(hub_err)?;
        single_model = Some(m);
    }

    let mut report = Report {
        run: cfg.name(),
        base_model: model_path.display().to_string(),
        experts: names.clone(),
        variants: variants.clone(),
        params: stage.params,
        stages: stage.summaries,
        ..Report::default()
    };

    // 4. evaluation: base vs single LoRA vs mixture, through each plugin's evaluator
    if !options.skip_eval && cfg.file.stages.eval.enabled {
        let mut base_plain = base.model.valid();
        base_plain.disable_adapters();
        let mixture_plain = mixture.valid();
        let single_plain = single_model.map(|m| m.valid());
        let eval_bs = cfg.file.stages.eval.batch_size;
        let val = val_sets(&tasks, eval_bs, &batcher, false)?;
        let mut all_routing = Vec::new();
        for (ti, task) in tasks.iter().enumerate() {
            let mut tr = TaskReport {
                task: task.name.clone(),
                evaluator: task.evaluator.clone(),
                n_eval: task.eval_records.len(),
                ..TaskReport::default()
            };
            for variant in variants {
                let (model, objective) = match variant.as_str() {
                    "base" => (&base_plain, Objective::Lm),
                    "single_lora" => match &single_plain {
                        Some(m) => (m, Objective::Lm),
                        None => continue,
                    },
                    "mixture" => (
                        &mixture_plain,
                        Objective::Routed {
                            routing_loss_coef: 0.0,
                        },
                    ),
                    other_name => {
                        return Err(cfg.error_at(
                            "stages.eval.baselines",
                            format!("unknown variant `{other_name}` (base, single_lora, mixture)"),
                        ))
                    }
                };
                let lm = LmModel::new(model.clone(), objective);
                let m = evaluate_inner(&lm, std::slice::from_ref(&val[ti]), "eval", 0)?;
                if variant == "mixture" {
                    if let Some(rs) = &m.routing {
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
                        all_routing.push((rs.clone(), task.val.len() as f64));
                    }
                }
                let metrics = task_metrics(host, model, task, &template, &tok, cfg, &batcher)?;
                tr.models.insert(
                    variant.clone(),
                    ModelMetrics {
                        val_loss: Some(m.val_loss),
                        metrics,
                    },
                );
            }
            // the task's own expert alone (task-routed): the number an expert folder
            // reproduces when loaded in PEFT (demo/check_peft.py)
            let lm = LmModel::new(mixture_plain.clone(), Objective::TaskRouted);
            let m = evaluate_inner(&lm, std::slice::from_ref(&val[ti]), "eval", 0)?;
            tr.models.insert(
                "expert".to_string(),
                ModelMetrics {
                    val_loss: Some(m.val_loss),
                    metrics: BTreeMap::new(),
                },
            );
            report.tasks.push(tr);
        }
        report.routing = RoutingStats::weighted_mean(&all_routing);
    }

    // plots
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| TrainError::io(&plots, e))?;
    let lines = read_metrics(&metrics_path)?;
    for p in plot_stage_losses(&lines, &plots)? {
        report.plots.push(rel(&out, &p));
    }
    if let Some(rs) = &report.routing {
        let p = plots.join("routing_load.png");
        plot_routing_load(&p, rs, &names)?;
        report.plots.push(rel(&out, &p));
    }
    report.write(&out)?;
    Ok(report)
}

/// Existing PEFT adapter folders as the experts (`experts_from`): folder `i` becomes
/// the expert named after task `i`, then all of them one mixture (no routers yet).
fn compose_experts<B: Backend>(
    cfg: &RunConfig,
    base: &CausalLm<B>,
    names: &[String],
    dirs: &[PathBuf],
) -> Result<CausalLm<B>> {
    if dirs.len() != names.len() {
        return Err(cfg.error_at(
            "tasks",
            format!(
                "{} expert folders given for {} [[tasks]] entries ({}): pass one adapter folder \
                 per task, in the same order",
                dirs.len(),
                names.len(),
                names.join(", ")
            ),
        ));
    }
    let mut m = base.clone();
    for (i, (name, dir)) in names.iter().zip(dirs).enumerate() {
        legora_hub::load_adapter(&mut m, dir, name).map_err(|e| {
            cfg.error_at(
                &format!("tasks[{i}]"),
                format!("loading expert `{name}` from {}: {e}", dir.display()),
            )
        })?;
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    m.adapters_to_mixture(&refs, None)
        .map_err(|e| cfg.error_at("tasks", format!("the expert folders do not combine: {e}")))?;
    Ok(m)
}

/// The mixture a previous run wrote to `out` (`eval_only`); its experts must be the run
/// file's tasks, in order, and it must have routers.
fn load_trained_mixture<B: Backend>(
    cfg: &RunConfig,
    base: &CausalLm<B>,
    out: &Path,
) -> Result<CausalLm<B>> {
    let mut m = base.clone();
    let moe = legora_hub::load_mixture(&mut m, out).map_err(|e| {
        cfg.error_at(
            "output_dir",
            format!("no trained mixture to evaluate ({e}); train the run first"),
        )
    })?;
    let want = cfg.task_names();
    if moe.experts != want {
        return Err(cfg.error_at(
            "tasks",
            format!(
                "the mixture in {} has experts {:?}, the run file's tasks are {:?}",
                out.display(),
                moe.experts,
                want
            ),
        ));
    }
    if moe.router.is_none() {
        return Err(cfg.error_at(
            "output_dir",
            format!(
                "the mixture in {} has no routers (the router stage did not finish)",
                out.display()
            ),
        ));
    }
    Ok(m)
}

/// The `single_lora` baseline a previous run wrote to `out`, when there is one.
fn load_trained_single<B: Backend>(
    cfg: &RunConfig,
    base: &CausalLm<B>,
    out: &Path,
) -> Result<Option<CausalLm<B>>> {
    let dir = out.join("single_lora");
    if !dir.join(legora_hub::ADAPTER_CONFIG).exists() {
        return Ok(None);
    }
    let mut m = base.clone();
    legora_hub::load_adapter(&mut m, &dir, "single_lora")
        .map_err(|e| cfg.error_at("stages.eval.baselines", e.to_string()))?;
    Ok(Some(m))
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

/// Predictions of `model` on the task's held-out records, scored by its evaluator.
///
/// Records with `choices` are scored by the log-likelihood of each choice after the
/// prompt (prediction = the best choice, and the per-choice scores go to the
/// evaluator, e.g. for ROC-AUC); others are answered by greedy generation.
fn task_metrics<B: Backend>(
    host: &PluginHost,
    model: &CausalLm<B>,
    task: &TaskData,
    template: &Template,
    tok: &HubTokenizer,
    cfg: &RunConfig,
    batcher: &Batcher,
) -> Result<BTreeMap<String, f64>> {
    use legora_data::Tokenize;
    let eval = &cfg.file.stages.eval;
    let recs = &task.eval_records;
    if recs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut prompts = Vec::with_capacity(recs.len());
    let mut references = Vec::with_capacity(recs.len());
    for (i, r) in recs.iter().enumerate() {
        let rendered = template.render(r, i)?;
        let mut ids = tok.encode(&rendered.prompt(), true)?;
        let keep = cfg
            .file
            .model
            .max_seq_len
            .saturating_sub(eval.max_new_tokens)
            .max(1);
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
        prompts.push(ids);
        references.push(r.reference().unwrap_or_default().to_string());
    }
    let choices = recs[0].choices.clone();
    let same_choices = !choices.is_empty() && recs.iter().all(|r| r.choices == choices);
    let mut request = EvalRequest::new(Vec::<String>::new(), references);
    if same_choices {
        let choice_ids: Vec<Vec<u32>> = choices
            .iter()
            .map(|c| tok.encode(c, false))
            .collect::<legora_data::Result<_>>()?;
        let scores = choice_scores(model, &prompts, &choice_ids, eval.batch_size, batcher)?;
        request.predictions = scores
            .iter()
            .map(|s| {
                let best = (0..s.len())
                    .max_by(|&a, &b| s[a].total_cmp(&s[b]))
                    .unwrap_or(0);
                choices[best].clone()
            })
            .collect();
        request.choices = choices;
        request.scores = scores;
    } else {
        let mut gen = GenerationConfig::greedy(eval.max_new_tokens);
        if let Some(eos) = tok.eos_id() {
            gen.eos_token_id = Some(legora_models::TokenIds::One(eos));
        }
        for chunk in prompts.chunks(eval.batch_size.max(1)) {
            let outs = model
                .generate(chunk, &gen, None)
                .map_err(|e| other(e, "generate"))?;
            for o in outs {
                let text = tok.decode(&o)?;
                request.predictions.push(text.trim().to_string());
            }
        }
    }
    request.meta = recs.iter().map(|r| r.meta.clone()).collect();
    let out = host
        .evaluate(&task.evaluator, request)
        .map_err(|e| other(e, &task.evaluator))?;
    Ok(out.metrics)
}

/// `scores[i][c]` = log p(choice c | prompt i), summed over the choice's tokens.
fn choice_scores<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    choices: &[Vec<u32>],
    batch_size: usize,
    batcher: &Batcher,
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
        let out = model
            .forward(lm_input(&batch, false, &device))
            .map_err(|e| other(e, "score choices"))?;
        let (b, s) = (batch.batch_size, batch.seq_len);
        let (ids, valid) = shifted_targets(&batch);
        let nll: Vec<f32> = token_nll(out.logits, &ids)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| other(format!("{e:?}"), "score choices"))?;
        for r in 0..b {
            let mut sum = 0.0;
            for t in 0..s - 1 {
                if valid[r * (s - 1) + t] {
                    sum -= nll[r * (s - 1) + t] as f64;
                }
            }
            flat.push(sum);
        }
    }
    Ok(flat
        .chunks(choices.len().max(1))
        .map(|c| c.to_vec())
        .collect())
}
