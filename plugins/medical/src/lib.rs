//! # legora medical plugin
//!
//! Formats (qualified names `medical/<name>`):
//! - `medqa`: MedQA-style multiple choice, JSON Lines of
//!   `{"question", "options": {"A": .., "E": ..}, "answer_idx": "C", "answer"?}`.
//!   Each row becomes a completion record: the prompt is the question, one
//!   `X. option` line per option and `Answer:`; the completion and the label
//!   are the letter; the choices are the option letters; `meta.answer` holds
//!   the answer text.
//! - `notes`: clinical note → summary pairs, JSON Lines of `{"note", "summary"}`
//!   (optional `id`). Prompt `Clinical note: <note>\nSummary:`.
//! - `alpaca`: Alpaca `instruction` / `input` / `output` (the seed's
//!   `train.json`); see [`legora_plugin_api::alpaca`].
//!
//! Evaluators:
//! - `mc_accuracy` → `accuracy`: the predicted letter is the argmax of the
//!   per-choice `scores` when given, else the letter read from the prediction
//!   text (`C`, `c.`, `(C)`, `The answer is C`).
//! - `summary` → `rouge_l` (ROUGE-L F1 over lowercase alphanumeric tokens)
//!   and `token_f1` (SQuAD-normalized bag-of-tokens F1), both averaged.
//! - `label_accuracy` → `accuracy`: normalized exact match (case, surrounding
//!   space and trailing punctuation ignored), or argmax of `scores`.
//!
//! Preset `clinical`: LoRA r=16, alpha=32 on the attention projections, with
//! a 3-expert mixture (one expert per format) routed top-2.
//!
//! Expert `demo-specialty`: a LoRA trained with the `clinical` preset on the
//! `alpaca` sample data (symptoms → specialty) over the demo base `demo/base`,
//! shipped inside the library (`plugins/demo-experts/make.sh` made it);
//! `legora compose --experts medical/demo-specialty …` uses it.

use std::collections::BTreeMap;

use legora_plugin_api::alpaca::{alpaca_format_info, parse_alpaca};
use legora_plugin_api::prelude::*;
use serde::Deserialize;
use serde_json::json;

/// The medical plugin.
#[derive(Debug, Default, Clone, Copy)]
pub struct MedicalPlugin;

legora_plugin_api::export_plugin!(MedicalPlugin);

/// Plugin name.
pub const NAME: &str = "medical";

impl Plugin for MedicalPlugin {
    fn manifest(&self) -> Manifest {
        Manifest::new(NAME, env!("CARGO_PKG_VERSION"))
            .description("Clinical question answering, note summarization and referral labels")
            .format(
                FormatInfo::new(
                    "medqa",
                    "MedQA-style multiple choice JSONL: question, options {A..E}, answer_idx",
                )
                .extensions(&["jsonl"])
                .default_evaluator("mc_accuracy"),
            )
            .format(
                FormatInfo::new("notes", "clinical note -> summary pairs, JSONL of {note, summary}")
                    .extensions(&["jsonl"])
                    .default_evaluator("summary"),
            )
            .format(alpaca_format_info("label_accuracy"))
            .evaluator(
                EvaluatorInfo::new(
                    "mc_accuracy",
                    "multiple-choice accuracy: argmax of per-choice scores, else the letter in the prediction",
                    &["accuracy"],
                )
                .uses_scores(),
            )
            .evaluator(EvaluatorInfo::new(
                "summary",
                "summary quality: mean ROUGE-L F1 and mean SQuAD token F1 against the reference",
                &["rouge_l", "token_f1"],
            ))
            .evaluator(
                EvaluatorInfo::new(
                    "label_accuracy",
                    "normalized exact match of a label (or argmax of per-choice scores)",
                    &["accuracy"],
                )
                .uses_scores(),
            )
            .preset(PresetInfo::new(
                "clinical",
                "LoRA r=16/alpha=32 on q,k,v,o with a 3-expert top-2 mixture over the medical tasks",
            ))
            .expert(ExpertInfo::new(
                "demo-specialty",
                "symptoms -> referral specialty (medical/alpaca), preset clinical, for the demo base",
                "demo/base",
            ))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        let task = request.task_or(&format!("{NAME}/{}", request.format));
        match request.format.as_str() {
            "medqa" => parse_medqa(request, &task),
            "notes" => parse_notes(request, &task),
            "alpaca" => parse_alpaca(request, &task),
            other => Err(PluginError::UnknownFormat { name: other.into() }),
        }
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        match request.evaluator.as_str() {
            "mc_accuracy" => Ok(mc_accuracy(request)),
            "summary" => Ok(summary(request)),
            "label_accuracy" => Ok(metrics::label_accuracy(request)),
            other => Err(PluginError::UnknownEvaluator { name: other.into() }),
        }
    }

    fn preset(&self, name: &str) -> Result<Preset, PluginError> {
        match name {
            "clinical" => Ok(clinical_preset()),
            other => Err(PluginError::UnknownPreset { name: other.into() }),
        }
    }

    fn expert(&self, name: &str) -> Result<ExpertFiles, PluginError> {
        match name {
            "demo-specialty" => ExpertFiles::new(
                include_str!("../experts/demo-specialty/adapter_config.json"),
                include_bytes!("../experts/demo-specialty/adapter_model.safetensors"),
            )
            .map_err(PluginError::other),
            other => Err(PluginError::UnknownExpert { name: other.into() }),
        }
    }
}

#[derive(Deserialize)]
struct MedQaRow {
    question: String,
    options: BTreeMap<String, String>,
    answer_idx: String,
    #[serde(default)]
    answer: Option<String>,
}

fn parse_medqa(request: &ParseRequest, task: &str) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    sink.jsonl(|row: MedQaRow, _| {
        if row.question.trim().is_empty() {
            return Err("empty `question`".into());
        }
        if row.options.len() < 2 {
            return Err("`options` needs at least two entries".into());
        }
        if let Some(bad) = row
            .options
            .keys()
            .find(|k| k.len() != 1 || !k.chars().all(|c| c.is_ascii_uppercase()))
        {
            return Err(format!("option key `{bad}` is not a single capital letter"));
        }
        let answer_idx = row.answer_idx.trim().to_string();
        let Some(answer_text) = row.options.get(&answer_idx) else {
            return Err(format!(
                "answer_idx `{answer_idx}` is not one of the options {:?}",
                row.options.keys().collect::<Vec<_>>()
            ));
        };
        if let Some(answer) = &row.answer {
            if answer.trim() != answer_text.trim() {
                return Err(format!(
                    "answer `{answer}` differs from option {answer_idx} `{answer_text}`"
                ));
            }
        }
        let mut prompt = row.question.trim().to_string();
        for (letter, text) in &row.options {
            prompt.push_str(&format!("\n{letter}. {}", text.trim()));
        }
        prompt.push_str("\nAnswer:");
        let record = Record::completion(task, prompt, answer_idx.clone())
            .with_label(answer_idx)
            .with_choices(row.options.keys().cloned())
            .with_meta("answer", answer_text.trim());
        Ok(vec![record])
    });
    sink.finish()
}

#[derive(Deserialize)]
struct NoteRow {
    note: String,
    summary: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

fn parse_notes(request: &ParseRequest, task: &str) -> Result<ParseOutput, PluginError> {
    let mut sink = RowSink::new(request);
    sink.jsonl(|row: NoteRow, _| {
        if row.note.trim().is_empty() {
            return Err("empty `note`".into());
        }
        if row.summary.trim().is_empty() {
            return Err("empty `summary`".into());
        }
        let mut record = Record::completion(
            task,
            format!("Clinical note: {}\nSummary:", row.note.trim()),
            row.summary.trim(),
        );
        if let Some(id) = row.id {
            record = record.with_meta("id", id);
        }
        Ok(vec![record])
    });
    sink.finish()
}

/// Reads the chosen letter from a free-text answer: a leading letter that
/// stands alone (`C`, `c.`, `(C)`), else the first standalone capital letter
/// among `letters` (`The answer is C`).
pub fn extract_choice(prediction: &str, letters: &[String]) -> Option<String> {
    let is_letter = |s: &str| letters.iter().any(|l| l == s);
    let trimmed = prediction
        .trim()
        .trim_start_matches(['(', '[', '*', '"', '\'']);
    let mut chars = trimmed.chars();
    if let Some(first) = chars.next() {
        let up = first.to_ascii_uppercase().to_string();
        if is_letter(&up) && chars.next().is_none_or(|c| !c.is_alphanumeric()) {
            return Some(up);
        }
    }
    trimmed
        .split(|c: char| !c.is_alphanumeric())
        .find(|tok| tok.len() == 1 && tok.chars().all(|c| c.is_ascii_uppercase()) && is_letter(tok))
        .map(str::to_string)
}

fn default_letters() -> Vec<String> {
    ["A", "B", "C", "D", "E"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn mc_accuracy(request: &EvalRequest) -> EvalOutput {
    let letters = if request.choices.is_empty() {
        default_letters()
    } else {
        request
            .choices
            .iter()
            .map(|c| c.trim().to_uppercase())
            .collect()
    };
    let n = request.len();
    let mut correct = 0usize;
    for i in 0..n {
        let chosen = if request.scores.is_empty() {
            extract_choice(&request.predictions[i], &letters)
        } else {
            metrics::argmax(&request.scores[i]).map(|j| letters[j].clone())
        };
        if chosen.as_deref() == Some(request.references[i].trim().to_uppercase().as_str()) {
            correct += 1;
        }
    }
    let out = EvalOutput::new(n);
    if n == 0 {
        return out.warn("no examples");
    }
    out.metric("accuracy", correct as f64 / n as f64)
}

fn summary(request: &EvalRequest) -> EvalOutput {
    let pairs = request.predictions.iter().zip(&request.references);
    let rouge = metrics::mean(
        pairs
            .clone()
            .map(|(p, r)| metrics::rouge_l(&metrics::words(p), &metrics::words(r)).f1),
    );
    let f1 =
        metrics::mean(pairs.map(|(p, r)| {
            metrics::token_f1(&metrics::answer_tokens(p), &metrics::answer_tokens(r))
        }));
    match (rouge, f1) {
        (Some(rouge), Some(f1)) => EvalOutput::new(request.len())
            .metric("rouge_l", rouge)
            .metric("token_f1", f1),
        _ => EvalOutput::new(0).warn("no examples"),
    }
}

fn clinical_preset() -> Preset {
    let mut lora = LoraConfig::new(16, 32.0, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    lora.lora_dropout = 0.05;
    let mut mixture = MixtureConfig::new(3, 2);
    mixture.experts = vec![
        "medical/medqa".into(),
        "medical/notes".into(),
        "medical/alpaca".into(),
    ];
    let mut preset = Preset::new(
        "clinical",
        "Clinical QA, note summaries and referrals: LoRA r=16, alpha=32 on attention, \
         3 experts (one per task) routed top-2",
        lora,
    );
    preset.mixture = Some(mixture);
    preset.format_options.insert(
        "medical/alpaca".into(),
        json!({"choices": SPECIALTIES})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    preset.training = json!({"learning_rate": 2e-4, "epochs": 3, "max_seq_len": 256})
        .as_object()
        .cloned()
        .unwrap_or_default();
    preset
}

/// The referral labels of the shipped `alpaca` sample data.
pub const SPECIALTIES: [&str; 11] = [
    "cardiology",
    "dermatology",
    "endocrinology",
    "gastroenterology",
    "hematology",
    "neurology",
    "psychiatry",
    "pulmonology",
    "rheumatology",
    "surgery",
    "urology",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn letters() -> Vec<String> {
        default_letters()
    }

    #[test]
    fn choice_extraction() {
        assert_eq!(extract_choice("C", &letters()).as_deref(), Some("C"));
        assert_eq!(extract_choice(" b.", &letters()).as_deref(), Some("B"));
        assert_eq!(extract_choice("(D) gout", &letters()).as_deref(), Some("D"));
        assert_eq!(
            extract_choice("The answer is E.", &letters()).as_deref(),
            Some("E")
        );
        assert_eq!(
            extract_choice("Answer: A", &letters()).as_deref(),
            Some("A")
        );
        assert_eq!(extract_choice("gout", &letters()), None);
    }

    #[test]
    fn preset_is_valid() {
        let p = MedicalPlugin.preset("clinical").expect("preset");
        p.validate().expect("valid");
        assert_eq!(p.lora.scaling(), 2.0);
    }
}
