//! The Alpaca `instruction` / `input` / `output` layout (the seed's
//! `train.json`), shared by every plugin that accepts it.
//!
//! Accepts a JSON array (`train.json`) or JSON Lines. Each item becomes a
//! completion record whose prompt is the instruction, followed by the input on
//! a new line when the input is not empty; `meta.instruction` and
//! `meta.input` keep the two fields apart for Alpaca-style prompt templates.
//! With the `choices` parameter (a
//! list of strings) the output must be one of them and becomes the label.

use serde::Deserialize;

use crate::error::PluginError;
use crate::rows::{RowPos, RowSink};
use crate::types::{FormatInfo, ParamInfo, ParseOutput, ParseRequest, Record};

/// One Alpaca item.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AlpacaRow {
    /// The task description.
    pub instruction: String,
    /// Optional context for the task (`null` and absent read as empty).
    #[serde(default)]
    pub input: Option<String>,
    /// The expected answer.
    pub output: String,
}

/// `instruction`, plus `"\n" + input` when the input is not blank.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.trim().to_string()
    } else {
        format!("{}\n{}", instruction.trim(), input.trim())
    }
}

/// A [`FormatInfo`] for the Alpaca format, with the given default evaluator.
pub fn alpaca_format_info(default_evaluator: &str) -> FormatInfo {
    FormatInfo::new(
        "alpaca",
        "Alpaca instruction data: a JSON array (train.json) or JSONL of \
         {instruction, input, output}",
    )
    .extensions(&["json", "jsonl"])
    .default_evaluator(default_evaluator)
    .param(ParamInfo::new(
        "choices",
        "optional list of allowed outputs; the output then becomes the record's label",
        serde_json::Value::Null,
    ))
}

/// Parses Alpaca data into completion records of task `task`.
pub fn parse_alpaca(request: &ParseRequest, task: &str) -> Result<ParseOutput, PluginError> {
    let choices = request
        .param_str_list("choices")
        .map_err(PluginError::invalid_request)?
        .unwrap_or_default();
    let mut sink = RowSink::new(request);
    let convert = |row: AlpacaRow, _pos: RowPos| -> Result<Vec<Record>, String> {
        if row.instruction.trim().is_empty() {
            return Err("empty `instruction`".into());
        }
        let output = row.output.trim().to_string();
        if output.is_empty() {
            return Err("empty `output`".into());
        }
        let input = row.input.as_deref().unwrap_or("").trim();
        let prompt = alpaca_prompt(&row.instruction, input);
        let mut record = Record::completion(task, prompt, output.clone())
            .with_meta("instruction", row.instruction.trim());
        if !input.is_empty() {
            record = record.with_meta("input", input);
        }
        if !choices.is_empty() {
            if !choices.contains(&output) {
                return Err(format!(
                    "output `{output}` is not one of the choices {choices:?}"
                ));
            }
            record = record
                .with_label(output)
                .with_choices(choices.iter().cloned());
        }
        Ok(vec![record])
    };
    let first = request
        .data
        .iter()
        .find(|b| !b.is_ascii_whitespace() && **b != 0xEF && **b != 0xBB && **b != 0xBF);
    if first == Some(&b'[') {
        sink.json_array(convert)?;
    } else {
        sink.jsonl(convert);
    }
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ParseOptions;

    #[test]
    fn array_and_jsonl_forms() {
        let data = br#"[{"instruction":"Classify.","input":"chest pain","output":"cardiology"},
 {"instruction":"Say hi.","input":"","output":"hi"}]"#;
        let req = ParseRequest::new("alpaca", "train.json", data.to_vec());
        let out = parse_alpaca(&req, "x/alpaca").expect("parses");
        assert_eq!(
            out.records[0].prompt.as_deref(),
            Some("Classify.\nchest pain")
        );
        assert_eq!(out.records[1].prompt.as_deref(), Some("Say hi."));
        assert_eq!(out.records[0].meta["instruction"], "Classify.");
        assert_eq!(out.records[0].meta["input"], "chest pain");
        assert!(!out.records[1].meta.contains_key("input"));
        let data = b"{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"a\"}\n";
        let req = ParseRequest::new("alpaca", "t.jsonl", data.to_vec())
            .with_options(ParseOptions::lenient());
        let out = parse_alpaca(&req, "x/alpaca").expect("parses");
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.errors[0].line, Some(2));
    }

    #[test]
    fn choices_make_labels() {
        let data = br#"[{"instruction":"i","input":"","output":"yes"},{"instruction":"i","output":"maybe"}]"#;
        let req = ParseRequest::new("alpaca", "t.json", data.to_vec())
            .with_options(ParseOptions::lenient().with_param("choices", "yes,no"));
        let out = parse_alpaca(&req, "x").expect("parses");
        assert_eq!(out.records[0].label.as_deref(), Some("yes"));
        assert_eq!(out.records[0].choices, vec!["yes", "no"]);
        assert!(out.errors[0].message.contains("not one of the choices"));
    }
}
