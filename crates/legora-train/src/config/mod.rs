//! The run file: one TOML file that describes a whole training run.
//!
//! The format is documented in `docs/run-file.md` (repository root) and in
//! [`RunFile`]'s fields. The schema is in `file.rs`, the spans that errors point at in
//! `spans.rs`, a stage's resolved settings in `settings.rs`; this module checks a file and
//! resolves it ([`RunConfig`]). Every table rejects unknown keys; every error names the file,
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

mod file;
mod settings;
mod spans;

pub use file::{
    DataSection, EvalSection, ExpertsMode, ModelSection, Precision, RunFile, StageSection,
    StagesSection, TaskSection, LORAPLUS_LR_EMBEDDING, MAX_BATCH, MAX_SEQ_LEN,
};
pub use settings::{StageKind, TrainSettings};
use spans::{line_col, named_field, SpanIndex};

use std::ops::Range;
use std::path::{Path, PathBuf};

use legora_data::{Mixing, Template, ValSplit};
use legora_nn::{ConfigError, LoraConfig, RouterConfig};
use toml::de::DeTable;

use crate::error::{Result, TrainError};
use crate::lr_groups::ParamKind;
use crate::schedule::ScheduleKind;

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

    /// Replace `model.path` with a path (absolute, or relative to the run file's folder) or
    /// a Hugging Face repo id: a command-line override such as `legora demo --model`.
    pub fn set_model_path(&mut self, path: String) {
        self.file.model.path = serde_spanned::Spanned::new(0..0, path);
    }

    /// The model folder (resolved).
    pub fn model_path(&self) -> PathBuf {
        self.resolve(self.file.model.path.get_ref())
    }

    /// Check that `model.path` is an existing folder or `.gguf` file (relative to the run
    /// file), or a Hugging Face repo id whose snapshot the local cache holds
    /// ([`legora_hub::resolve_model`]).
    pub fn check_model_path(&self) -> Result<PathBuf> {
        let p = self.model_path();
        if p.is_dir() || (p.is_file() && legora_hub::gguf::is_gguf_path(&p)) {
            return Ok(p);
        }
        let raw = Path::new(self.file.model.path.get_ref());
        let cached = (!raw.exists())
            .then(|| legora_hub::resolve_model(raw).ok())
            .flatten()
            .filter(|d| d.is_dir());
        cached.ok_or_else(|| {
            self.spanned_error(
                "model.path",
                self.file.model.path.span(),
                format!(
                    "expected an existing model folder, a .gguf file or the repo id of a \
                     model in the Hugging Face cache, found no folder at {}",
                    p.display()
                ),
            )
        })
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
