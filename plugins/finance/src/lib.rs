//! # legora finance plugin
//!
//! Formats (qualified names `finance/<name>`):
//! - `cuad`: contract clause extraction in the CUAD / SQuAD 2.0 layout
//!   (`{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
//!   "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`).
//!   Every question becomes a completion record: prompt
//!   `Contract: <context>\nQ: <question>\nA:`, completion the first answer (or
//!   [`NO_ANSWER`] for an impossible question); `meta` keeps `id`, `title`,
//!   all gold `answers` and `is_impossible`. Each answer's `answer_start` (a
//!   character offset) must point at its text in the context.
//! - `transactions`: card-transaction CSV with a fraud label. Parameters:
//!   `label_column` (default `is_fraud`), `id_column` (default `txn_id`, used
//!   when present), `feature_columns` (default: every other column, in header
//!   order), `positive_values` (label values meaning fraud; default
//!   `1,true,yes,y,fraud`; `0,false,no,n,legit` mean legit). Each row becomes
//!   a classification prompt `Card transaction: col=value, ...\nFraud or legit?`
//!   with label `fraud` / `legit` and choices `[legit, fraud]`. A required
//!   column missing from the header fails the file (line 1); a row with a
//!   missing field is a row error.
//! - `alpaca`: Alpaca `instruction` / `input` / `output` JSON.
//!
//! Evaluators:
//! - `extraction` → `exact_match`, `f1`: SQuAD 2.0 scoring: normalized exact
//!   match and token F1, each the best over the gold answers
//!   (`meta.answers` when given, else the reference); a no-answer reference
//!   scores 1 only for a no-answer prediction (empty, `none`, `n/a`, ...).
//! - `fraud` → `precision`, `recall`, `f1`, `accuracy` from the predicted
//!   labels (positive class `fraud`, parameter `positive`), and `roc_auc`
//!   from per-choice `scores` (softmax over `choices`, probability of the
//!   positive choice).
//! - `label_accuracy` → `accuracy` (see
//!   [`legora_plugin_api::metrics::label_accuracy`]).
//!
//! Preset `compliance`: LoRA r=8, alpha=16 on attention, with the
//! `transactions` column names and the sentiment labels of the `alpaca`
//! sample data.
//!
//! Expert `demo-sentiment`: a LoRA trained with the `compliance` preset on the
//! `alpaca` sample data (headline → sentiment) over the demo base `demo/base`,
//! shipped inside the library (`plugins/demo-experts/make.sh` made it);
//! `legora compose --experts finance/demo-sentiment …` uses it.

use legora_plugin_api::alpaca::{alpaca_format_info, parse_alpaca};
use legora_plugin_api::prelude::*;
use legora_plugin_api::rows::line_of;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// The finance plugin.
#[derive(Debug, Default, Clone, Copy)]
pub struct FinancePlugin;

legora_plugin_api::export_plugin!(FinancePlugin);

/// Plugin name.
pub const NAME: &str = "finance";

/// Completion of an impossible (unanswerable) extraction question.
pub const NO_ANSWER: &str = "none";

/// Label of a fraudulent transaction.
pub const FRAUD: &str = "fraud";
/// Label of a legitimate transaction.
pub const LEGIT: &str = "legit";

/// Default feature columns of the shipped transaction CSV.
pub const FEATURE_COLUMNS: [&str; 6] = [
    "amount",
    "merchant_category",
    "channel",
    "country",
    "hour",
    "distance_km",
];

/// Sentiment labels of the shipped `alpaca` sample data.
pub const SENTIMENTS: [&str; 3] = ["positive", "negative", "neutral"];

impl Plugin for FinancePlugin {
    fn manifest(&self) -> Manifest {
        Manifest::new(NAME, env!("CARGO_PKG_VERSION"))
            .description("Contract clause extraction, card fraud detection and headline sentiment")
            .format(
                FormatInfo::new(
                    "cuad",
                    "contract clause extraction, CUAD / SQuAD 2.0 JSON (context, qas, answers, is_impossible)",
                )
                .extensions(&["json"])
                .default_evaluator("extraction"),
            )
            .format(
                FormatInfo::new(
                    "transactions",
                    "card transactions CSV with a fraud label; rows become classification prompts",
                )
                .extensions(&["csv"])
                .default_evaluator("fraud")
                .param(ParamInfo::new("label_column", "column holding the fraud label", json!("is_fraud")))
                .param(ParamInfo::new("id_column", "transaction id column (kept in meta)", json!("txn_id")))
                .param(ParamInfo::new(
                    "feature_columns",
                    "columns shown in the prompt (default: all but id and label)",
                    Value::Null,
                ))
                .param(ParamInfo::new(
                    "positive_values",
                    "label values meaning fraud",
                    json!(["1", "true", "yes", "y", "fraud"]),
                )),
            )
            .format(alpaca_format_info("label_accuracy"))
            .evaluator(EvaluatorInfo::new(
                "extraction",
                "SQuAD 2.0 exact match and token F1 (best over gold answers in meta.answers)",
                &["exact_match", "f1"],
            ))
            .evaluator(
                EvaluatorInfo::new(
                    "fraud",
                    "binary fraud detection: precision/recall/F1/accuracy of predicted labels, \
                     ROC-AUC from per-choice scores",
                    &["precision", "recall", "f1", "accuracy", "roc_auc"],
                )
                .primary("f1")
                .uses_scores()
                .param(ParamInfo::new("positive", "the positive label", json!(FRAUD))),
            )
            .evaluator(
                EvaluatorInfo::new(
                    "label_accuracy",
                    "normalized exact match of a label (or argmax of per-choice scores)",
                    &["accuracy"],
                )
                .uses_scores(),
            )
            .preset(PresetInfo::new(
                "compliance",
                "LoRA r=8/alpha=16 on attention; transaction CSV columns and sentiment labels",
            ))
            .expert(ExpertInfo::new(
                "demo-sentiment",
                "headline -> market sentiment (finance/alpaca), preset compliance, for the demo base",
                "demo/base",
            ))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        let task = request.task_or(&format!("{NAME}/{}", request.format));
        match request.format.as_str() {
            "cuad" => parse_cuad(request, &task),
            "transactions" => parse_transactions(request, &task),
            "alpaca" => parse_alpaca(request, &task),
            other => Err(PluginError::UnknownFormat { name: other.into() }),
        }
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        match request.evaluator.as_str() {
            "extraction" => Ok(extraction(request)),
            "fraud" => fraud(request),
            "label_accuracy" => Ok(metrics::label_accuracy(request)),
            other => Err(PluginError::UnknownEvaluator { name: other.into() }),
        }
    }

    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        match name {
            "compliance" => Ok(compliance_preset()),
            other => Err(PluginError::UnknownPreset { name: other.into() }),
        }
    }

    fn expert(&self, name: &str) -> Result<ExpertFiles, PluginError> {
        match name {
            "demo-sentiment" => ExpertFiles::new(
                include_str!("../experts/demo-sentiment/adapter_config.json"),
                include_bytes!("../experts/demo-sentiment/adapter_model.safetensors"),
            )
            .map_err(PluginError::other),
            other => Err(PluginError::UnknownExpert { name: other.into() }),
        }
    }
}

// ---------------------------------------------------------------------------
// CUAD / SQuAD
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct SquadDoc<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Article<'a> {
    #[serde(default)]
    title: String,
    #[serde(borrow)]
    paragraphs: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Paragraph<'a> {
    context: String,
    #[serde(borrow)]
    qas: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Qa {
    #[serde(default)]
    id: Option<String>,
    question: String,
    #[serde(default)]
    answers: Vec<Answer>,
    #[serde(default)]
    is_impossible: Option<bool>,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
    answer_start: i64,
}

/// Deserializes a borrowed part of `text`; errors carry the absolute line.
fn part<'a, T: Deserialize<'a>>(text: &'a str, raw: &'a RawValue) -> Result<T, (u64, String)> {
    serde_json::from_str::<T>(raw.get()).map_err(|e| {
        let line = line_of(text, raw.get()) + (e.line() as u64).saturating_sub(1);
        (line, legora_plugin_api::rows::json_error_message(&e, false))
    })
}

fn parse_cuad(request: &ParseRequest, task: &str) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    let text = sink.text()?;
    let doc: SquadDoc =
        serde_json::from_str(legora_plugin_api::rows::strip_bom(text)).map_err(|e| {
            sink.fatal(
                Some(e.line() as u64),
                format!(
                    "not a SQuAD/CUAD document: {}",
                    legora_plugin_api::rows::json_error_message(&e, false)
                ),
            )
        })?;
    let mut row = 0u64;
    for raw_article in doc.data {
        let article: Article = match part(text, raw_article) {
            Ok(a) => a,
            Err((line, msg)) => {
                sink.reject(Some(line), None, format!("data item: {msg}"));
                continue;
            }
        };
        for raw_paragraph in article.paragraphs {
            let paragraph: Paragraph = match part(text, raw_paragraph) {
                Ok(p) => p,
                Err((line, msg)) => {
                    sink.reject(Some(line), None, format!("paragraph: {msg}"));
                    continue;
                }
            };
            for raw_qa in paragraph.qas {
                row += 1;
                let line = line_of(text, raw_qa.get());
                match part::<Qa>(text, raw_qa) {
                    Ok(qa) => match qa_record(task, &article.title, &paragraph.context, qa) {
                        Ok(record) => sink.push(record),
                        Err(msg) => sink.reject(Some(line), Some(row), msg),
                    },
                    Err((line, msg)) => sink.reject(Some(line), Some(row), msg),
                }
            }
        }
    }
    sink.finish()
}

fn qa_record(task: &str, title: &str, context: &str, qa: Qa) -> Result<Record, String> {
    if qa.question.trim().is_empty() {
        return Err("empty `question`".into());
    }
    let impossible = qa.is_impossible.unwrap_or(qa.answers.is_empty());
    if !impossible && qa.answers.is_empty() {
        return Err("`answers` is empty but `is_impossible` is false".into());
    }
    if impossible && !qa.answers.is_empty() {
        return Err("`is_impossible` is true but `answers` is not empty".into());
    }
    for a in &qa.answers {
        let found: Option<String> = usize::try_from(a.answer_start).ok().map(|start| {
            context
                .chars()
                .skip(start)
                .take(a.text.chars().count())
                .collect()
        });
        if found.as_deref() != Some(a.text.as_str()) {
            return Err(format!(
                "answer `{}` is not at answer_start {} of the context",
                a.text, a.answer_start
            ));
        }
    }
    let completion = qa
        .answers
        .first()
        .map(|a| a.text.clone())
        .unwrap_or_else(|| NO_ANSWER.to_string());
    let mut record = Record::completion(
        task,
        format!(
            "Contract: {}\nQ: {}\nA:",
            context.trim(),
            qa.question.trim()
        ),
        completion,
    )
    .with_meta(
        "answers",
        Value::from(
            qa.answers
                .iter()
                .map(|a| a.text.clone())
                .collect::<Vec<_>>(),
        ),
    )
    .with_meta("is_impossible", impossible);
    if let Some(id) = qa.id {
        record = record.with_meta("id", id);
    }
    if !title.is_empty() {
        record = record.with_meta("title", title);
    }
    Ok(record)
}

// ---------------------------------------------------------------------------
// Transactions CSV
// ---------------------------------------------------------------------------

fn parse_transactions(request: &ParseRequest, task: &str) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    let label_column = request
        .param_str("label_column")
        .unwrap_or("is_fraud")
        .to_string();
    let id_column = request
        .param_str("id_column")
        .unwrap_or("txn_id")
        .to_string();
    let features = request
        .param_str_list("feature_columns")
        .map_err(PluginError::invalid_request)?;
    let positive: Vec<String> = request
        .param_str_list("positive_values")
        .map_err(PluginError::invalid_request)?
        .unwrap_or_else(|| ["1", "true", "yes", "y", FRAUD].map(String::from).to_vec())
        .iter()
        .map(|v| v.trim().to_lowercase())
        .collect();
    let negative = ["0", "false", "no", "n", LEGIT];

    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(request.data.as_slice());
    let header: Vec<String> = match reader.headers() {
        Ok(h) => h
            .iter()
            .map(|s| s.trim().trim_start_matches('\u{feff}').to_string())
            .collect(),
        Err(e) => return Err(sink.fatal(Some(1), format!("unreadable CSV header: {e}"))),
    };
    let index = |name: &str| header.iter().position(|h| h == name);
    let mut required = vec![label_column.clone()];
    if let Some(f) = &features {
        required.extend(f.iter().cloned());
    }
    let missing: Vec<&String> = required.iter().filter(|c| index(c).is_none()).collect();
    if !missing.is_empty() {
        return Err(sink.fatal(
            Some(1),
            format!(
                "header lacks column{} {} (header: {})",
                if missing.len() == 1 { "" } else { "s" },
                missing
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                header.join(",")
            ),
        ));
    }
    let label_idx = index(&label_column).unwrap_or_default();
    let id_idx = index(&id_column);
    let feature_cols: Vec<(String, usize)> = match &features {
        Some(f) => f
            .iter()
            .map(|c| (c.clone(), index(c).unwrap_or_default()))
            .collect(),
        None => header
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != label_idx && Some(*i) != id_idx)
            .map(|(i, h)| (h.clone(), i))
            .collect(),
    };

    let mut row = 0u64;
    for result in reader.records() {
        row += 1;
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line());
                sink.reject(line, Some(row), format!("unreadable CSV row: {e}"));
                continue;
            }
        };
        let line = record.position().map(|p| p.line());
        if record.len() != header.len() {
            let missing = header.get(record.len()..).map(|cols| cols.join(", "));
            sink.reject(
                line,
                Some(row),
                match (record.len() < header.len(), missing) {
                    (true, Some(cols)) => format!(
                        "row has {} fields, header has {} (missing column value(s): {cols})",
                        record.len(),
                        header.len()
                    ),
                    _ => format!(
                        "row has {} fields, header has {}",
                        record.len(),
                        header.len()
                    ),
                },
            );
            continue;
        }
        let raw_label = record
            .get(label_idx)
            .unwrap_or_default()
            .trim()
            .to_lowercase();
        let label = if positive.contains(&raw_label) {
            FRAUD
        } else if negative.contains(&raw_label.as_str()) {
            LEGIT
        } else {
            sink.reject(
                line,
                Some(row),
                format!("`{label_column}` is `{raw_label}`, expected one of {positive:?} or {negative:?}"),
            );
            continue;
        };
        let mut parts = Vec::with_capacity(feature_cols.len());
        let mut empty = None;
        for (name, i) in &feature_cols {
            let value = record.get(*i).unwrap_or_default().trim();
            if value.is_empty() {
                empty = Some(name.clone());
                break;
            }
            parts.push(format!("{name}={value}"));
        }
        if let Some(name) = empty {
            sink.reject(line, Some(row), format!("empty value in column `{name}`"));
            continue;
        }
        let mut rec = Record::completion(
            task,
            format!("Card transaction: {}\nFraud or legit?", parts.join(", ")),
            label,
        )
        .with_label(label)
        .with_choices([LEGIT, FRAUD]);
        if let Some(id) = id_idx.and_then(|i| record.get(i)) {
            rec = rec.with_meta("id", id.trim());
        }
        sink.push(rec);
    }
    sink.finish()
}

// ---------------------------------------------------------------------------
// Evaluators
// ---------------------------------------------------------------------------

fn is_no_answer(text: &str) -> bool {
    matches!(
        metrics::normalize_answer(text).as_str(),
        "" | "none" | "na" | "no answer" | "not found" | "not mentioned" | "unanswerable"
    )
}

fn extraction(request: &EvalRequest) -> EvalOutput {
    let n = request.len();
    if n == 0 {
        return EvalOutput::new(0).warn("no examples");
    }
    let (mut em_sum, mut f1_sum) = (0.0, 0.0);
    for i in 0..n {
        let prediction = &request.predictions[i];
        let meta = request.meta.get(i);
        let mut golds: Vec<String> = meta
            .and_then(|m| m.get("answers"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if golds.is_empty() {
            golds.push(request.references[i].clone());
        }
        let impossible = meta
            .and_then(|m| m.get("is_impossible"))
            .and_then(Value::as_bool)
            .unwrap_or_else(|| golds.iter().all(|g| is_no_answer(g)));
        let (em, f1) = if impossible {
            let s = if is_no_answer(prediction) { 1.0 } else { 0.0 };
            (s, s)
        } else {
            let p_norm = metrics::normalize_answer(prediction);
            let p_tok = metrics::answer_tokens(prediction);
            golds.iter().fold((0.0f64, 0.0f64), |(em, f1), g| {
                let e = if metrics::normalize_answer(g) == p_norm {
                    1.0
                } else {
                    0.0
                };
                let f = metrics::token_f1(&p_tok, &metrics::answer_tokens(g));
                (em.max(e), f1.max(f))
            })
        };
        em_sum += em;
        f1_sum += f1;
    }
    EvalOutput::new(n)
        .metric("exact_match", em_sum / n as f64)
        .metric("f1", f1_sum / n as f64)
}

fn fraud(request: &EvalRequest) -> Result<EvalOutput, PluginError> {
    let positive = match request.params.get("positive") {
        None | Some(Value::Null) => FRAUD.to_string(),
        Some(Value::String(s)) => metrics::normalize_label(s),
        Some(_) => return Err(PluginError::invalid_request("`positive` must be a string")),
    };
    let n = request.len();
    if n == 0 {
        return Ok(EvalOutput::new(0).warn("no examples"));
    }
    let actual: Vec<bool> = request
        .references
        .iter()
        .map(|r| metrics::normalize_label(r) == positive)
        .collect();
    let confusion = metrics::Confusion::from_pairs(
        request
            .predictions
            .iter()
            .map(|p| metrics::normalize_label(p) == positive)
            .zip(actual.iter().copied()),
    );
    let prf = confusion.prf();
    let mut out = EvalOutput::new(n)
        .metric("precision", prf.precision)
        .metric("recall", prf.recall)
        .metric("f1", prf.f1)
        .metric("accuracy", confusion.accuracy());
    if request.scores.is_empty() {
        out = out.warn("roc_auc needs per-choice scores");
    } else {
        let Some(pos) = request
            .choices
            .iter()
            .position(|c| metrics::normalize_label(c) == positive)
        else {
            return Err(PluginError::invalid_request(format!(
                "`choices` {:?} do not include the positive label `{positive}`",
                request.choices
            )));
        };
        let probs: Vec<f64> = request
            .scores
            .iter()
            .map(|row| metrics::softmax(row)[pos])
            .collect();
        match metrics::roc_auc(&probs, &actual) {
            Some(auc) => out = out.metric("roc_auc", auc),
            None => out = out.warn("roc_auc needs both classes among the references"),
        }
    }
    Ok(out)
}

fn compliance_preset() -> Preset {
    let mut lora = LoraConfig::new(8, 16.0, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    lora.lora_dropout = 0.05;
    let mut preset = Preset::new(
        "compliance",
        "Clause extraction, fraud screening and headline sentiment: LoRA r=8, alpha=16 on attention",
        lora,
    );
    let object = |v: Value| v.as_object().cloned().unwrap_or_default();
    preset.format_options.insert(
        "finance/transactions".into(),
        object(json!({
            "label_column": "is_fraud",
            "id_column": "txn_id",
            "feature_columns": FEATURE_COLUMNS,
            "positive_values": ["1"],
        })),
    );
    preset.format_options.insert(
        "finance/alpaca".into(),
        object(json!({"choices": SENTIMENTS})),
    );
    preset.training = object(json!({"learning_rate": 3e-4, "epochs": 3, "max_seq_len": 256}));
    preset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_answer_forms() {
        assert!(is_no_answer("None."));
        assert!(is_no_answer("N/A"));
        assert!(is_no_answer(""));
        assert!(!is_no_answer("Delaware"));
    }

    #[test]
    fn preset_is_valid() {
        FinancePlugin
            .preset("compliance")
            .expect("preset")
            .validate()
            .expect("valid");
    }
}
