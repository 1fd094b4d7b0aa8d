//! The run file resolved against the plugins and the base model into a typed plan, with
//! every check that can fail done here, before the first step: formats, evaluators and
//! presets exist, task parameters are ones the format documents, every expert's LoRA
//! targets modules of the base, the output folder is not inside the model folder, the
//! mode's inputs are there. Errors name the run-file key with its line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use legora_nn::{LoraConfig, RouterConfig};
use legora_plugin_host::PluginHost;

use crate::config::{RunConfig, StageKind};
use crate::error::Result;

/// What a run does with its experts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    /// Train every stage (default).
    #[default]
    Train,
    /// Use these PEFT adapter folders as the experts (one per `[[tasks]]` entry, in
    /// order; X-LoRA / LoRAHub style), then train the router and evaluate. An entry
    /// that is not a folder may name an expert a plugin ships (`medical/demo-specialty`).
    Compose(Vec<PathBuf>),
    /// Train nothing: evaluate the mixture (and `single_lora/`) already in the output
    /// folder.
    EvalOnly,
}

/// A model the evaluation compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// The frozen base alone.
    Base,
    /// One LoRA trained on all tasks with the experts' parameter budget.
    SingleLora,
    /// The experts with the learned router.
    Mixture,
    /// The experts with each task routed to its own expert: what a perfect router would
    /// give, separating the router's cost from the experts' quality.
    Oracle,
}

impl Variant {
    /// Every variant, in report column order.
    pub const ALL: [Variant; 4] = [
        Variant::Base,
        Variant::SingleLora,
        Variant::Mixture,
        Variant::Oracle,
    ];

    /// The run-file and report name (`base`, `single_lora`, `mixture`, `oracle`).
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Base => "base",
            Variant::SingleLora => "single_lora",
            Variant::Mixture => "mixture",
            Variant::Oracle => "oracle",
        }
    }

    /// The variant called `name`.
    pub fn from_name(name: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

/// Where a composed expert comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertSource {
    /// A PEFT adapter folder.
    Folder(PathBuf),
    /// An expert a plugin ships, by qualified name (`<plugin>/<expert>`); written as a
    /// PEFT folder under `<output_dir>/plugin-experts/` before it is loaded.
    Plugin(String),
}

/// One task, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPlan {
    /// Task and expert name.
    pub name: String,
    /// Plugin format `<plugin>/<format>`.
    pub format: String,
    /// Evaluator `<plugin>/<evaluator>`.
    pub evaluator: String,
    /// The evaluator's headline metric and whether higher is better.
    pub headline: Option<(String, bool)>,
    /// Training file.
    pub train: PathBuf,
    /// Held-out file, if any.
    pub eval: Option<PathBuf>,
    /// Parse parameters: the preset's format options, then the task's `params`.
    pub params: BTreeMap<String, serde_json::Value>,
    /// At most this many training records.
    pub max_samples: Option<usize>,
    /// The expert's LoRA settings (the preset's, else `[lora]`).
    pub lora: LoraConfig,
    /// Where the LoRA settings came from (`[lora]` or `preset <name>`).
    pub lora_source: String,
    /// The expert's own learning rate in the `experts` stage (`None`: the stage's).
    pub learning_rate: Option<f64>,
}

/// The whole run, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// What the run does.
    pub mode: Mode,
    /// The base model folder.
    pub model_path: PathBuf,
    /// How the base's frozen weights are stored.
    pub load_options: legora_hub::LoadOptions,
    /// The output folder.
    pub output_dir: PathBuf,
    /// The tasks, in expert order.
    pub tasks: Vec<TaskPlan>,
    /// The routers' settings (`num_experts` = number of tasks).
    pub router: RouterConfig,
    /// The single-LoRA baseline's settings, when it is trained.
    pub single_lora: Option<LoraConfig>,
    /// Whether the router stage trains.
    pub train_router: bool,
    /// The compared models, in report order (empty: no evaluation).
    pub variants: Vec<Variant>,
    /// The experts to compose, one per task ([`Mode::Compose`]; empty otherwise).
    pub experts: Vec<ExpertSource>,
}

impl RunPlan {
    /// Resolve and check `cfg` for `mode` against the plugins of `host`.
    pub fn resolve(
        cfg: &RunConfig,
        host: &PluginHost,
        mode: Mode,
        skip_eval: bool,
    ) -> Result<Self> {
        let model_path = cfg.check_model_path()?;
        let load_options = cfg.load_options()?;
        let output_dir = cfg.output_dir();
        check_output_dir(cfg, &mode, &model_path, &output_dir)?;
        let model = model_config(cfg, &model_path)?;
        let context = model.max_position_embeddings;
        if cfg.has_key("model.max_seq_len") && cfg.file.model.max_seq_len > context {
            return Err(cfg.error_at(
                "model.max_seq_len",
                format!(
                    "expected at most the base model's context (max_position_embeddings = \
                     {context}), found {}",
                    cfg.file.model.max_seq_len
                ),
            ));
        }
        let tasks = (0..cfg.file.tasks.len())
            .map(|i| resolve_task(cfg, host, i, &model))
            .collect::<Result<Vec<_>>>()?;
        let experts = check_mode(cfg, host, &mode, &output_dir)?;
        let eval = &cfg.file.stages.eval;
        let variants: Vec<Variant> = if skip_eval || !eval.enabled {
            Vec::new()
        } else {
            eval.baselines
                .iter()
                .filter_map(|b| Variant::from_name(b))
                .collect()
        };
        let single_lora = (mode != Mode::EvalOnly && variants.contains(&Variant::SingleLora))
            .then(|| single_lora_config(cfg, &tasks));
        Ok(Self {
            train_router: mode != Mode::EvalOnly && cfg.stage_enabled(StageKind::Router),
            mode,
            model_path,
            load_options,
            output_dir,
            tasks,
            router: cfg.router_config(),
            single_lora,
            variants,
            experts,
        })
    }

    /// The task names, in expert order.
    pub fn task_names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }
}

/// Refuse an output folder equal to or inside the model folder (a run would write its
/// router and experts among the base's files), or, when composing, inside one of the
/// expert folders it reads.
fn check_output_dir(cfg: &RunConfig, mode: &Mode, model: &Path, out: &Path) -> Result<()> {
    let mut inputs = vec![("the base model's folder", model.to_path_buf())];
    if let Mode::Compose(dirs) = mode {
        inputs.extend(dirs.iter().map(|d| ("an expert folder", d.clone())));
    }
    for (what, dir) in inputs {
        if legora_hub::io::path_within(out, &dir) {
            return Err(cfg.error_at(
                "output_dir",
                format!(
                    "expected a folder outside {what} {}, found {}",
                    dir.display(),
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The base's resolved architecture (from its config.json alone).
fn model_config(cfg: &RunConfig, model: &Path) -> Result<legora_models::ModelConfig> {
    legora_hub::load_model_config(model).map_err(|e| cfg.error_at("model.path", e.to_string()))
}

/// Task `i` checked against the plugins and the model.
fn resolve_task(
    cfg: &RunConfig,
    host: &PluginHost,
    i: usize,
    model: &legora_models::ModelConfig,
) -> Result<TaskPlan> {
    let t = &cfg.file.tasks[i];
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
    let ev = host
        .evaluator(&evaluator)
        .map_err(|e| cfg.error_at(&format!("{key}.evaluator"), e.to_string()))?;
    let headline = ev.info().headline().map(|(m, h)| (m.to_string(), h));
    let mut params = BTreeMap::new();
    let (lora, lora_source, preset_lr) = match &t.preset {
        Some(name) => {
            let p = host
                .preset(name)
                .map_err(|e| cfg.error_at(&format!("{key}.preset"), e.to_string()))?;
            if let Some(opts) = p.format_options.get(&t.format) {
                params.extend(opts.clone());
            }
            let lr = p.training.get("learning_rate").and_then(|v| v.as_f64());
            (p.lora, format!("preset {name}"), lr)
        }
        None => (cfg.lora_config(), "[lora]".to_string(), None),
    };
    params.extend(t.params.clone());
    let info = format.info();
    check_params(cfg, &key, &params, info)?;
    for a in &info.attachments {
        if let Some(v) = t.params.get(&a.option) {
            let at = format!("{key}.params.{}", a.option);
            params.insert(a.option.clone(), attachment_paths(cfg, &at, v)?);
        }
    }
    check_targets(cfg, &key, t.preset.is_some(), &lora, model)?;
    Ok(TaskPlan {
        name: t.name.clone(),
        format: t.format.clone(),
        evaluator,
        headline,
        train: cfg.train_file(i),
        eval: cfg.eval_file(i),
        params,
        max_samples: t.max_samples,
        lora,
        lora_source,
        learning_rate: t.learning_rate.or(preset_lr),
    })
}

/// Every parse parameter must be one the format documents: one of its parameters or one
/// of its attachment options (`cards` of `game-npc/dialogue`).
fn check_params(
    cfg: &RunConfig,
    key: &str,
    params: &BTreeMap<String, serde_json::Value>,
    info: &legora_plugin_api::FormatInfo,
) -> Result<()> {
    for (name, value) in params {
        let empty = match value {
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::String(s) => s.trim().is_empty(),
            _ => false,
        };
        if empty {
            return Err(cfg.error_at(
                &format!("{key}.params.{name}"),
                "expected at least one value (or no such key), found an empty one",
            ));
        }
        let names: Vec<&str> = (info.params.iter().map(|p| p.name.as_str()))
            .chain(info.attachments.iter().map(|a| a.option.as_str()))
            .collect();
        if !names.contains(&name.as_str()) {
            return Err(cfg.error_at(
                &format!("{key}.params.{name}"),
                format!("unknown parameter of this format (it takes {names:?})"),
            ));
        }
    }
    Ok(())
}

/// An attachment option's value from the run file (a path or a list of paths, relative
/// to the run file's folder) with each path resolved against that folder.
fn attachment_paths(cfg: &RunConfig, at: &str, v: &serde_json::Value) -> Result<serde_json::Value> {
    use serde_json::Value;
    let resolve = |v: &Value| match v {
        Value::String(s) => Ok(Value::String(cfg.dir.join(s).display().to_string())),
        other => Err(cfg.error_at(
            at,
            format!("expected a path (a string) or a list of paths, found {other}"),
        )),
    };
    match v {
        Value::Array(items) => Ok(Value::Array(
            items.iter().map(resolve).collect::<Result<_>>()?,
        )),
        other => resolve(other),
    }
}

/// The expert's LoRA config must be valid and adapt at least one module of the base.
fn check_targets(
    cfg: &RunConfig,
    key: &str,
    from_preset: bool,
    lora: &LoraConfig,
    model: &legora_models::ModelConfig,
) -> Result<()> {
    let key_of = |field: &str| {
        if from_preset {
            format!("{key}.preset")
        } else {
            format!("lora.{field}")
        }
    };
    let at = key_of("target_modules");
    lora.validate().map_err(|e| {
        cfg.error_at(
            &key_of(e.field()),
            format!("`{}`: {}", e.field(), e.message()),
        )
    })?;
    let slots = model.slot_ids();
    for &id in slots
        .iter()
        .filter(|id| lora.is_target(&id.to_string(), id.is_output_head()))
    {
        let r = lora.spec_for(&id.to_string()).r;
        let (out, inp) = model.slot_dims(id);
        if r > out.max(inp) {
            return Err(cfg.error_at(
                &key_of("r"),
                format!(
                    "`{id}` is {inp} -> {out}: expected a rank r <= {}, found {r}",
                    out.max(inp)
                ),
            ));
        }
    }
    let matched = slots
        .iter()
        .any(|id| lora.is_target(&id.to_string(), id.is_output_head()));
    if !matched {
        return Err(cfg.error_at(
            &at,
            format!(
                "target_modules {} match no module of the base model (its slots are {})",
                serde_json::to_string(&lora.target_modules).unwrap_or_default(),
                model.slot_names()
            ),
        ));
    }
    Ok(())
}

/// The inputs of the mode exist: one expert per task to compose (a folder or a
/// plugin's shipped expert), or a trained mixture.
fn check_mode(
    cfg: &RunConfig,
    host: &PluginHost,
    mode: &Mode,
    out: &Path,
) -> Result<Vec<ExpertSource>> {
    let n = cfg.file.tasks.len();
    match mode {
        Mode::Train => Ok(Vec::new()),
        Mode::Compose(dirs) if dirs.len() != n => Err(cfg.error_at(
            "tasks",
            format!(
                "{} expert folders given for {n} [[tasks]] entries ({}): pass one adapter folder \
                 per task, in the same order",
                dirs.len(),
                cfg.task_names().join(", ")
            ),
        )),
        Mode::Compose(dirs) => dirs
            .iter()
            .enumerate()
            .map(|(i, d)| expert_source(cfg, host, i, d))
            .collect(),
        Mode::EvalOnly if !out.join(legora_hub::MOE_CONFIG).is_file() => Err(cfg.error_at(
            "output_dir",
            format!(
                "no trained mixture to evaluate in {} (no {}); train the run first",
                out.display(),
                legora_hub::MOE_CONFIG
            ),
        )),
        Mode::EvalOnly => Ok(Vec::new()),
    }
}

/// A folder, else an expert a plugin ships by that name.
fn expert_source(cfg: &RunConfig, host: &PluginHost, i: usize, dir: &Path) -> Result<ExpertSource> {
    if dir.is_dir() {
        return Ok(ExpertSource::Folder(dir.to_path_buf()));
    }
    let name = dir.to_string_lossy();
    if host.expert_info(&name).is_ok() {
        return Ok(ExpertSource::Plugin(name.into_owned()));
    }
    let known = host.expert_names();
    Err(cfg.error_at(
        &format!("tasks[{i}]"),
        format!(
            "expert `{name}` for task `{}` is neither an adapter folder nor an expert a loaded \
             plugin ships ({})",
            cfg.task_names()[i],
            if known.is_empty() {
                "no plugin ships experts".to_string()
            } else {
                format!("shipped: {}", known.join(", "))
            }
        ),
    ))
}

/// The single-LoRA baseline: `[lora]` with the experts' summed rank (the same
/// trainable-parameter budget when they target the same modules) unless
/// `single_lora_r` says otherwise, `lora_alpha` scaled to keep `[lora]`'s scaling.
fn single_lora_config(cfg: &RunConfig, tasks: &[TaskPlan]) -> LoraConfig {
    let base = cfg.lora_config();
    let r = cfg
        .file
        .stages
        .eval
        .single_lora_r
        .unwrap_or_else(|| tasks.iter().map(|t| t.lora.r).sum());
    let mut single = base.clone();
    single.lora_alpha = base.lora_alpha * r as f64 / base.r as f64;
    single.r = r;
    single
}
