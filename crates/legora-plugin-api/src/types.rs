//! The serde types that cross the plugin boundary: manifest, records, parse and
//! evaluation requests/results, presets.
//!
//! Every top-level message carries a `schema_version` (see [`SCHEMA_VERSION`]);
//! fields added later are optional (`#[serde(default)]`), so an older plugin's
//! JSON keeps deserializing.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use legora_config::{
    InitLoraWeights, LoraConfig, Message, Role, RouterConfig, RoutingStrategy, TargetModules,
};

/// Version of the JSON schema of requests, responses, manifests and presets.
///
/// Bumped only on an incompatible change; new optional fields keep the number.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------

/// What a plugin offers: its name and the formats, evaluators and presets it
/// implements. The host registers each under the qualified name
/// `<plugin>/<item>` (for example `medical/medqa`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Schema version of this manifest ([`SCHEMA_VERSION`]).
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// Plugin name: lowercase ASCII letters, digits, `-`, `_`, `.` (see [`is_valid_name`]).
    pub name: String,
    /// Plugin version (semver string, usually `env!("CARGO_PKG_VERSION")`).
    pub version: String,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// Data formats: parsers from domain files to [`Record`]s.
    #[serde(default)]
    pub formats: Vec<FormatInfo>,
    /// Evaluators: metrics computed from predictions and references.
    #[serde(default)]
    pub evaluators: Vec<EvaluatorInfo>,
    /// Adapter presets: LoRA / mixture settings suited to the domain.
    #[serde(default)]
    pub presets: Vec<PresetInfo>,
    /// Trained experts the plugin ships (PEFT adapters for a named base).
    #[serde(default)]
    pub experts: Vec<ExpertInfo>,
}

impl Manifest {
    /// A manifest with a name and version and nothing registered yet.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            name: name.into(),
            version: version.into(),
            description: String::new(),
            formats: Vec::new(),
            evaluators: Vec::new(),
            presets: Vec::new(),
            experts: Vec::new(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Adds a format.
    pub fn format(mut self, format: FormatInfo) -> Self {
        self.formats.push(format);
        self
    }

    /// Adds an evaluator.
    pub fn evaluator(mut self, evaluator: EvaluatorInfo) -> Self {
        self.evaluators.push(evaluator);
        self
    }

    /// Adds a preset.
    pub fn preset(mut self, preset: PresetInfo) -> Self {
        self.presets.push(preset);
        self
    }

    /// Adds a shipped expert.
    pub fn expert(mut self, expert: ExpertInfo) -> Self {
        self.experts.push(expert);
        self
    }

    /// Looks up a format by its local (unqualified) name.
    pub fn find_format(&self, name: &str) -> Option<&FormatInfo> {
        self.formats.iter().find(|f| f.name == name)
    }

    /// Looks up an evaluator by its local (unqualified) name.
    pub fn find_evaluator(&self, name: &str) -> Option<&EvaluatorInfo> {
        self.evaluators.iter().find(|e| e.name == name)
    }

    /// Looks up a preset by its local (unqualified) name.
    pub fn find_preset(&self, name: &str) -> Option<&PresetInfo> {
        self.presets.iter().find(|p| p.name == name)
    }

    /// Looks up a shipped expert by its local (unqualified) name.
    pub fn find_expert(&self, name: &str) -> Option<&ExpertInfo> {
        self.experts.iter().find(|e| e.name == name)
    }

    /// Checks names: the plugin name and every item name must satisfy
    /// [`is_valid_name`], and no item name may repeat within its kind.
    /// Returns the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_name(&self.name) {
            return Err(format!("invalid plugin name `{}`", self.name));
        }
        let kinds: [(&str, Vec<&str>); 4] = [
            (
                "format",
                self.formats.iter().map(|f| f.name.as_str()).collect(),
            ),
            (
                "evaluator",
                self.evaluators.iter().map(|e| e.name.as_str()).collect(),
            ),
            (
                "preset",
                self.presets.iter().map(|p| p.name.as_str()).collect(),
            ),
            (
                "expert",
                self.experts.iter().map(|e| e.name.as_str()).collect(),
            ),
        ];
        for (kind, names) in kinds {
            let mut seen = std::collections::BTreeSet::new();
            for name in names {
                if !is_valid_name(name) {
                    return Err(format!("invalid {kind} name `{name}`"));
                }
                if !seen.insert(name) {
                    return Err(format!("duplicate {kind} `{}/{name}`", self.name));
                }
            }
        }
        Ok(())
    }
}

/// True for a non-empty name of lowercase ASCII letters, digits, `-`, `_` and
/// `.`, starting with a letter or digit. Names never contain `/`: the host
/// adds `<plugin>/` in front.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

/// A data format a plugin can parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatInfo {
    /// Local name, e.g. `medqa`.
    pub name: String,
    /// What files this format reads.
    #[serde(default)]
    pub description: String,
    /// File extensions usually holding this format, without the dot (`jsonl`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<String>,
    /// Evaluator that scores records of this format: a local name of the same
    /// plugin (`mc_accuracy`) or a qualified one (`other/metric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_evaluator: Option<String>,
    /// Other files this format needs besides the data file (for example the
    /// character cards a dialogue file refers to). The host reads them and
    /// passes them as [`Attachment`]s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentInfo>,
    /// Documented `ParseOptions::params` keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamInfo>,
}

impl FormatInfo {
    /// A format with a name and description.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            extensions: Vec::new(),
            default_evaluator: None,
            attachments: Vec::new(),
            params: Vec::new(),
        }
    }

    /// Sets the usual file extensions.
    pub fn extensions(mut self, extensions: &[&str]) -> Self {
        self.extensions = extensions.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets the default evaluator.
    pub fn default_evaluator(mut self, evaluator: impl Into<String>) -> Self {
        self.default_evaluator = Some(evaluator.into());
        self
    }

    /// Declares an attachment.
    pub fn attachment(mut self, attachment: AttachmentInfo) -> Self {
        self.attachments.push(attachment);
        self
    }

    /// Documents a parameter.
    pub fn param(mut self, param: ParamInfo) -> Self {
        self.params.push(param);
        self
    }
}

/// A side file (or folder of files) a format reads besides the data file.
///
/// The host looks at `ParseOptions::params[option]`: a path string or a list
/// of paths; a folder stands for the files in it with one of `extensions`
/// (sorted by name). Without the option it tries `default`, a path relative to
/// the data file's folder, and silently skips it when it does not exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    /// The `params` key naming the path(s).
    pub option: String,
    /// What the files are.
    #[serde(default)]
    pub description: String,
    /// Path tried when the option is absent, relative to the data file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Extensions (no dot) of the files taken from a folder; empty: all files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<String>,
}

/// A documented parameter of a format or evaluator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Key in `params`.
    pub name: String,
    /// Meaning and accepted values.
    #[serde(default)]
    pub description: String,
    /// Value used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

impl ParamInfo {
    /// A parameter with a default value.
    pub fn new(name: impl Into<String>, description: impl Into<String>, default: Value) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            default: if default.is_null() {
                None
            } else {
                Some(default)
            },
        }
    }
}

/// An evaluator a plugin implements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorInfo {
    /// Local name, e.g. `mc_accuracy`.
    pub name: String,
    /// What it measures and which [`EvalRequest`] fields it reads.
    #[serde(default)]
    pub description: String,
    /// Names of the metrics it returns.
    #[serde(default)]
    pub metrics: Vec<String>,
    /// Whether per-choice `scores` are needed for some metric.
    #[serde(default, skip_serializing_if = "is_false")]
    pub uses_scores: bool,
    /// Documented `EvalRequest::params` keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamInfo>,
    /// The headline metric reports compare models on (default: the first of `metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_metric: Option<String>,
    /// Metrics where lower is better (`repetition_rate`, `out_of_role_rate`); every other
    /// metric is better higher.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower_is_better: Vec<String>,
}

impl EvaluatorInfo {
    /// An evaluator with a name, description and metric names.
    pub fn new(name: impl Into<String>, description: impl Into<String>, metrics: &[&str]) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            metrics: metrics.iter().map(|s| s.to_string()).collect(),
            uses_scores: false,
            params: Vec::new(),
            primary_metric: None,
            lower_is_better: Vec::new(),
        }
    }

    /// Name the headline metric.
    pub fn primary(mut self, metric: impl Into<String>) -> Self {
        self.primary_metric = Some(metric.into());
        self
    }

    /// Mark metrics where lower is better.
    pub fn lower_is_better(mut self, metrics: &[&str]) -> Self {
        self.lower_is_better = metrics.iter().map(|m| m.to_string()).collect();
        self
    }

    /// The headline metric and whether higher is better (`None`: no metrics).
    pub fn headline(&self) -> Option<(&str, bool)> {
        let name = self
            .primary_metric
            .as_deref()
            .or_else(|| self.metrics.first().map(String::as_str))?;
        Some((name, !self.lower_is_better.iter().any(|m| m == name)))
    }

    /// Marks the evaluator as reading per-choice scores.
    pub fn uses_scores(mut self) -> Self {
        self.uses_scores = true;
        self
    }

    /// Documents a parameter.
    pub fn param(mut self, param: ParamInfo) -> Self {
        self.params.push(param);
        self
    }
}

/// A preset a plugin offers (the full [`Preset`] is fetched on demand).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresetInfo {
    /// Local name, e.g. `clinical`.
    pub name: String,
    /// What it is tuned for.
    #[serde(default)]
    pub description: String,
}

impl PresetInfo {
    /// A preset entry.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
        }
    }
}

/// A trained expert a plugin ships: a PEFT adapter for a named base (the full
/// [`ExpertFiles`] are fetched on demand).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertInfo {
    /// Local name, e.g. `demo-specialty`.
    pub name: String,
    /// What it was trained for.
    #[serde(default)]
    pub description: String,
    /// The base model it was trained on (its `base_model_name_or_path`).
    #[serde(default)]
    pub base_model: String,
}

impl ExpertInfo {
    /// An expert entry.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        base_model: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            base_model: base_model.into(),
        }
    }
}

/// The two files of a PEFT adapter folder, as a plugin ships them:
/// `adapter_config.json` (a JSON object) and `adapter_model.safetensors` (bytes,
/// base64 in the JSON reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertFiles {
    /// The contents of `adapter_config.json`.
    pub adapter_config: Map<String, Value>,
    /// The contents of `adapter_model.safetensors`.
    #[serde(with = "base64_bytes")]
    pub adapter_model: Vec<u8>,
}

impl ExpertFiles {
    /// The files from the text of `adapter_config.json` and the safetensors bytes
    /// (as `include_str!` / `include_bytes!` give them).
    pub fn new(adapter_config_json: &str, adapter_model: &[u8]) -> Result<Self, String> {
        let adapter_config = serde_json::from_str(adapter_config_json)
            .map_err(|e| format!("adapter_config.json is not a JSON object: {e}"))?;
        Ok(Self {
            adapter_config,
            adapter_model: adapter_model.to_vec(),
        })
    }
}

/// Bytes as a standard base64 string in JSON.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// One training / evaluation example.
///
/// Exactly one of the two shapes is used:
/// - chat: `messages` (system / user / assistant turns), or
/// - completion: `prompt` and `completion`.
///
/// `label` (with optional `choices`) marks classification and multiple-choice
/// examples: the label is the correct choice, and an evaluator may score the
/// model by per-choice likelihoods instead of free generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Task name, by default the qualified format name (`medical/medqa`).
    /// Used for multi-task sampling and task-routed experts.
    pub task: String,
    /// Chat turns (chat shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// Prompt text (completion shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Target text (completion shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// Correct class / choice, when the example is a classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Candidate answers (including `label`), for multiple choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Anything else (ids, gold answer lists, persona facts for evaluators).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub meta: Map<String, Value>,
}

impl Record {
    /// A completion-shaped record.
    pub fn completion(
        task: impl Into<String>,
        prompt: impl Into<String>,
        completion: impl Into<String>,
    ) -> Self {
        Self {
            task: task.into(),
            messages: Vec::new(),
            prompt: Some(prompt.into()),
            completion: Some(completion.into()),
            label: None,
            choices: Vec::new(),
            meta: Map::new(),
        }
    }

    /// A chat-shaped record.
    pub fn chat(task: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            task: task.into(),
            messages,
            prompt: None,
            completion: None,
            label: None,
            choices: Vec::new(),
            meta: Map::new(),
        }
    }

    /// Sets the label.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Sets the choices.
    pub fn with_choices<S: Into<String>>(mut self, choices: impl IntoIterator<Item = S>) -> Self {
        self.choices = choices.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a `meta` entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// True for the chat shape.
    pub fn is_chat(&self) -> bool {
        !self.messages.is_empty()
    }

    /// The reference an evaluator compares a prediction with: the label, else
    /// the completion, else the last assistant message.
    pub fn reference(&self) -> Option<&str> {
        if let Some(label) = &self.label {
            return Some(label);
        }
        if let Some(completion) = &self.completion {
            return Some(completion);
        }
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str())
    }

    /// Checks the shape: exactly one of chat / completion, a non-empty task,
    /// the chat ending with an assistant turn, and the label among the choices
    /// when both are given.
    pub fn validate(&self) -> Result<(), String> {
        if self.task.is_empty() {
            return Err("empty task".into());
        }
        let chat = !self.messages.is_empty();
        let completion = self.prompt.is_some() || self.completion.is_some();
        match (chat, completion) {
            (true, true) => return Err("has both `messages` and `prompt`/`completion`".into()),
            (false, false) => return Err("has neither `messages` nor `prompt`/`completion`".into()),
            (false, true) if self.prompt.is_none() || self.completion.is_none() => {
                return Err("`prompt` and `completion` must both be set".into())
            }
            (true, false) if self.messages.last().map(|m| m.role) != Some(Role::Assistant) => {
                return Err("the last message must be an assistant turn".into());
            }
            _ => {}
        }
        if let Some(label) = &self.label {
            if !self.choices.is_empty() && !self.choices.contains(label) {
                return Err(format!("label `{label}` is not one of the choices"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// What to do with malformed rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParseMode {
    /// Any malformed row fails the whole file (the default).
    #[default]
    Strict,
    /// Malformed rows are skipped and counted; their errors are reported as
    /// warnings. A file-level problem (unreadable document, missing CSV column
    /// in the header) still fails the file.
    Lenient,
}

fn default_max_errors() -> usize {
    100
}

/// Options of one parse call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParseOptions {
    /// Strict or lenient handling of malformed rows.
    #[serde(default)]
    pub mode: ParseMode,
    /// Task name given to every record (default: the qualified format name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// At most this many row errors are reported (all are counted).
    #[serde(default = "default_max_errors")]
    pub max_errors: usize,
    /// Format-specific parameters (see the format's [`FormatInfo::params`]).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self {
            mode: ParseMode::Strict,
            task: None,
            max_errors: default_max_errors(),
            params: Map::new(),
        }
    }
}

impl ParseOptions {
    /// Strict options (the default).
    pub fn strict() -> Self {
        Self::default()
    }

    /// Lenient options.
    pub fn lenient() -> Self {
        Self {
            mode: ParseMode::Lenient,
            ..Self::default()
        }
    }

    /// Sets a parameter.
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Sets the task name.
    pub fn with_task(mut self, task: impl Into<String>) -> Self {
        self.task = Some(task.into());
        self
    }
}

/// A side file handed to a parser (see [`AttachmentInfo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Path or name of the file, as the host read it.
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// A parse call as the plugin sees it.
///
/// Across the C ABI only the header (everything but the bytes) travels as
/// JSON; `data` and the attachments' bytes travel raw beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseRequest {
    /// Local format name (`medqa`).
    pub format: String,
    /// Name of the file the bytes came from (used in error messages).
    pub file_name: String,
    /// Options.
    pub options: ParseOptions,
    /// The file's bytes.
    pub data: Vec<u8>,
    /// Side files (see [`FormatInfo::attachments`]).
    pub attachments: Vec<Attachment>,
}

impl ParseRequest {
    /// A request with default (strict) options and no attachments.
    pub fn new(format: impl Into<String>, file_name: impl Into<String>, data: Vec<u8>) -> Self {
        Self {
            format: format.into(),
            file_name: file_name.into(),
            options: ParseOptions::default(),
            data,
            attachments: Vec::new(),
        }
    }

    /// Sets the options.
    pub fn with_options(mut self, options: ParseOptions) -> Self {
        self.options = options;
        self
    }

    /// The task name: `options.task`, else `default`.
    pub fn task_or(&self, default: &str) -> String {
        self.options
            .task
            .clone()
            .unwrap_or_else(|| default.to_string())
    }

    /// A string parameter, if present and a string.
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.options.params.get(key).and_then(Value::as_str)
    }

    /// A list-of-strings parameter: a JSON array of strings, or one string
    /// split on commas. `Err` names the key when the value has another type or is empty.
    pub fn param_str_list(&self, key: &str) -> Result<Option<Vec<String>>, String> {
        let list = self.param_str_list_raw(key)?;
        if list.as_ref().is_some_and(|l| l.is_empty()) {
            return Err(format!(
                "parameter `{key}` is empty: give at least one value, or leave it out"
            ));
        }
        Ok(list)
    }

    fn param_str_list_raw(&self, key: &str) -> Result<Option<Vec<String>>, String> {
        match self.options.params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("parameter `{key}` must hold strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(format!(
                "parameter `{key}` must be a string or a list of strings"
            )),
        }
    }
}

/// One malformed row (or a file-level problem when `row` is `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// The file (the request's `file_name`).
    pub file: String,
    /// 1-based line in the file, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 1-based row / item number (JSONL line with data, JSON array item,
    /// CSV data row, SQuAD question), when meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    /// What is wrong (`missing field \`question\``).
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(row) = self.row {
            write!(f, ": row {row}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The result of a parse call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParseOutput {
    /// Parsed records, in file order.
    pub records: Vec<Record>,
    /// Number of malformed rows skipped (lenient mode only).
    #[serde(default)]
    pub skipped: usize,
    /// Errors of the skipped rows (at most `max_errors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<RowError>,
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

/// An evaluation call: predictions against references, example by example.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalRequest {
    /// Local evaluator name (`mc_accuracy`); the host fills it in.
    #[serde(default)]
    pub evaluator: String,
    /// Model outputs, one per example.
    pub predictions: Vec<String>,
    /// Gold answers (usually [`Record::reference`]), one per example.
    pub references: Vec<String>,
    /// Labels of the columns of `scores` (the same for every example).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Per-example, per-choice scores (logits or log-likelihoods; evaluators
    /// softmax them over the choices). Empty when not available.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<Vec<f64>>,
    /// Per-example record `meta` (empty, or one map per example).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meta: Vec<Map<String, Value>>,
    /// Evaluator-specific parameters.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
}

impl EvalRequest {
    /// A request with predictions and references.
    pub fn new<P: Into<String>, R: Into<String>>(
        predictions: impl IntoIterator<Item = P>,
        references: impl IntoIterator<Item = R>,
    ) -> Self {
        Self {
            predictions: predictions.into_iter().map(Into::into).collect(),
            references: references.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Sets choices and per-choice scores.
    pub fn with_scores<S: Into<String>>(
        mut self,
        choices: impl IntoIterator<Item = S>,
        scores: Vec<Vec<f64>>,
    ) -> Self {
        self.choices = choices.into_iter().map(Into::into).collect();
        self.scores = scores;
        self
    }

    /// Sets the per-example meta maps.
    pub fn with_meta(mut self, meta: Vec<Map<String, Value>>) -> Self {
        self.meta = meta;
        self
    }

    /// Sets a parameter.
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.predictions.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.predictions.is_empty()
    }

    /// Checks that the per-example lists line up and that every score is a
    /// finite number (JSON has no NaN or infinity).
    pub fn validate(&self) -> Result<(), String> {
        let n = self.predictions.len();
        if self.references.len() != n {
            return Err(format!(
                "{n} predictions but {} references",
                self.references.len()
            ));
        }
        if !self.scores.is_empty() {
            if self.scores.len() != n {
                return Err(format!(
                    "{n} predictions but {} score rows",
                    self.scores.len()
                ));
            }
            if self.choices.is_empty() {
                return Err("`scores` given without `choices`".into());
            }
            for (i, row) in self.scores.iter().enumerate() {
                if row.len() != self.choices.len() {
                    return Err(format!(
                        "scores[{i}] has {} values for {} choices",
                        row.len(),
                        self.choices.len()
                    ));
                }
                if let Some(j) = row.iter().position(|v| !v.is_finite()) {
                    return Err(format!("scores[{i}][{j}] is not a finite number"));
                }
            }
        }
        if !self.meta.is_empty() && self.meta.len() != n {
            return Err(format!("{n} predictions but {} meta maps", self.meta.len()));
        }
        Ok(())
    }
}

/// The result of an evaluation call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvalOutput {
    /// Named metrics (`accuracy`, `rouge_l`, `roc_auc`, ...). Only finite
    /// values; an undefined metric is left out with a warning.
    pub metrics: BTreeMap<String, f64>,
    /// Number of examples scored.
    pub count: usize,
    /// Notes such as "roc_auc needs both classes".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl EvalOutput {
    /// An empty result for `count` examples.
    pub fn new(count: usize) -> Self {
        Self {
            metrics: BTreeMap::new(),
            count,
            warnings: Vec::new(),
        }
    }

    /// Adds a metric.
    pub fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }

    /// Adds a warning.
    pub fn warn(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }
}

// ---------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------

/// A mixture preset: the router settings (MixLoRA names, one definition shared with the
/// rest of legora) and, optionally, the expert names (one per expert, often task names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureConfig {
    /// Router settings (`num_experts`, `top_k`, `routing_strategy`, loss coefficients,
    /// jitter, pooling).
    #[serde(flatten)]
    pub router: RouterConfig,
    /// Optional expert names (one per expert).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<String>,
}

impl MixtureConfig {
    /// A top-k mixture with default coefficients.
    pub fn new(num_experts: usize, top_k: usize) -> Self {
        Self {
            router: RouterConfig::new(num_experts).with_top_k(top_k),
            experts: Vec::new(),
        }
    }
}

/// Adapter settings suited to a domain: a PEFT LoRA config, optional mixture
/// settings, parse options for the plugin's formats, and training hints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    /// Schema version ([`SCHEMA_VERSION`]).
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    /// Local preset name.
    pub name: String,
    /// What it is tuned for.
    #[serde(default)]
    pub description: String,
    /// The LoRA config (PEFT `adapter_config.json` keys).
    pub lora: LoraConfig,
    /// Mixture settings, when the preset is a mixture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixture: Option<MixtureConfig>,
    /// `ParseOptions::params` per format, keyed by qualified format name
    /// (e.g. the column names of `finance/transactions`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub format_options: BTreeMap<String, Map<String, Value>>,
    /// Training hints (`learning_rate`, `epochs`, `max_seq_len`, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub training: Map<String, Value>,
}

impl Preset {
    /// A preset around a LoRA config.
    pub fn new(name: impl Into<String>, description: impl Into<String>, lora: LoraConfig) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            name: name.into(),
            description: description.into(),
            lora,
            mixture: None,
            format_options: BTreeMap::new(),
            training: Map::new(),
        }
    }

    /// Checks the LoRA config as legora-config does (rank, alpha, dropout, targets,
    /// supported options), a non-empty target list, and for a mixture the router
    /// settings and one name per expert.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.lora;
        l.validate().map_err(|e| format!("lora.{}", e))?;
        if l.lora_alpha <= 0.0 {
            return Err("lora.lora_alpha must be a positive number".into());
        }
        match &l.target_modules {
            None => return Err("lora.target_modules is missing".into()),
            Some(TargetModules::List(list)) if list.is_empty() => {
                return Err("lora.target_modules is empty".into())
            }
            _ => {}
        }
        if let Some(m) = &self.mixture {
            m.router.validate().map_err(|e| format!("mixture.{e}"))?;
            if !m.experts.is_empty() && m.experts.len() != m.router.num_experts {
                return Err(format!(
                    "mixture.experts names {} experts, num_experts is {}",
                    m.experts.len(),
                    m.router.num_experts
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_shapes_validate() {
        let r = Record::completion("t", "p", "c");
        assert!(r.validate().is_ok());
        assert_eq!(r.reference(), Some("c"));
        let chat = Record::chat(
            "t",
            vec![
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "yo"),
            ],
        );
        assert!(chat.validate().is_ok());
        assert_eq!(chat.reference(), Some("yo"));
        let bad = Record::chat("t", vec![Message::new(Role::User, "hi")]);
        assert!(bad.validate().is_err());
        let bad = Record::completion("t", "p", "c")
            .with_choices(["A", "B"])
            .with_label("C");
        assert!(bad.validate().is_err());
    }

    #[test]
    fn lora_config_round_trips_unknown_peft_keys() {
        let json = r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":8,"lora_alpha":16,
            "lora_dropout":0.05,"target_modules":["q_proj","v_proj"],"use_rslora":true,
            "bias":"none","fan_in_fan_out":false,"rank_pattern":{},"init_lora_weights":true}"#;
        let c: LoraConfig = serde_json::from_str(json).expect("parses");
        assert_eq!(c.r, 8);
        // rsLoRA: 16 / sqrt(8)
        assert!((c.scaling() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.init_lora_weights, InitLoraWeights::Default);
        assert_eq!(c.extra.get("task_type"), Some(&Value::from("CAUSAL_LM")));
        let back = serde_json::to_value(&c).expect("serializes");
        assert_eq!(back["rank_pattern"], serde_json::json!({}));
        let regex: LoraConfig =
            serde_json::from_str(r#"{"r":4,"lora_alpha":8,"target_modules":".*proj"}"#)
                .expect("parses");
        assert_eq!(
            regex.target_modules,
            Some(TargetModules::Pattern(".*proj".into()))
        );
        assert_eq!(regex.peft_type, "LORA");
    }

    #[test]
    fn preset_validation() {
        let mut p = Preset::new("x", "", LoraConfig::new(8, 16.0, &["q_proj"]));
        assert!(p.validate().is_ok());
        p.mixture = Some(MixtureConfig::new(4, 5));
        assert!(p.validate().is_err());
        p.mixture = Some(MixtureConfig::new(4, 2));
        assert!(p.validate().is_ok());
        let s = serde_json::to_string(&p.mixture).expect("serializes");
        assert!(s.contains(r#""routing_strategy":"topk""#), "{s}");
    }

    #[test]
    fn names_and_manifest_validation() {
        assert!(is_valid_name("game-npc"));
        assert!(is_valid_name("mc_accuracy"));
        assert!(!is_valid_name("Medical"));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(""));
        let m = Manifest::new("m", "0.1.0")
            .format(FormatInfo::new("a", ""))
            .format(FormatInfo::new("a", ""));
        assert!(m.validate().unwrap_err().contains("duplicate format `m/a`"));
    }

    #[test]
    fn eval_request_validation() {
        let r = EvalRequest::new(["a"], ["a", "b"]);
        assert!(r.validate().is_err());
        let r = EvalRequest::new(["a"], ["b"]).with_scores(["x", "y"], vec![vec![0.0, f64::NAN]]);
        assert!(r.validate().unwrap_err().contains("scores[0][1]"));
    }

    #[test]
    fn row_error_display() {
        let e = RowError {
            file: "a.jsonl".into(),
            line: Some(3),
            row: Some(2),
            message: "missing field `question`".into(),
        };
        assert_eq!(e.to_string(), "a.jsonl:3: row 2: missing field `question`");
    }
}
