//! A minimal legora plugin: copy this crate to start your own.
//!
//! - format `minimal/tsv`: lines `prompt<TAB>completion`; blank lines and
//!   lines starting with `#` are skipped; a line without a tab is a row error.
//! - evaluator `minimal/exact_match`: share of predictions equal to the
//!   reference after trimming and lowercasing.
//! - preset `minimal/tiny`: LoRA r=4, alpha=8 on `q_proj` and `v_proj`.

use legora_plugin_api::prelude::*;

/// The plugin. `Default` is what [`legora_plugin_api::export_plugin!`] uses to
/// build it.
#[derive(Debug, Default)]
pub struct MinimalPlugin;

// The only glue needed: exports the C entry point for the host.
legora_plugin_api::export_plugin!(MinimalPlugin);

impl Plugin for MinimalPlugin {
    fn manifest(&self) -> Manifest {
        Manifest::new("minimal", env!("CARGO_PKG_VERSION"))
            .description("tab-separated prompt/completion pairs scored by exact match")
            .format(
                FormatInfo::new("tsv", "lines of prompt<TAB>completion")
                    .extensions(&["tsv", "txt"])
                    .default_evaluator("exact_match"),
            )
            .evaluator(EvaluatorInfo::new(
                "exact_match",
                "trimmed, case-insensitive exact match",
                &["exact_match"],
            ))
            .preset(PresetInfo::new(
                "tiny",
                "LoRA r=4, alpha=8 on q_proj and v_proj",
            ))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        // The host already checked that `request.format` is in the manifest.
        let task = request.task_or("minimal/tsv");
        let mut sink = RowSink::new(request);
        let text = sink.text()?; // file-level error if the bytes are not UTF-8
        for (i, line) in text.lines().enumerate() {
            let line_no = i as u64 + 1;
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('\t') {
                Some((prompt, completion)) if !completion.trim().is_empty() => {
                    sink.push(Record::completion(&task, prompt.trim(), completion.trim()));
                }
                // Report the problem with its line; strict mode fails the file,
                // lenient mode skips the row and counts it.
                _ => sink.reject(Some(line_no), None, "expected `prompt<TAB>completion`"),
            }
        }
        sink.finish()
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        // predictions and references are already checked to have equal lengths.
        let n = request.len();
        let hits = request
            .predictions
            .iter()
            .zip(&request.references)
            .filter(|(p, r)| p.trim().to_lowercase() == r.trim().to_lowercase())
            .count();
        let score = if n == 0 { 0.0 } else { hits as f64 / n as f64 };
        Ok(EvalOutput::new(n).metric("exact_match", score))
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        // Only names listed in the manifest reach this point.
        Ok(Preset::new(
            "tiny",
            "LoRA r=4, alpha=8 on q_proj and v_proj",
            LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_scores() {
        let req = ParseRequest::new(
            "tsv",
            "pairs.tsv",
            b"2+2\t4\n# comment\nbad line\n".to_vec(),
        )
        .with_options(ParseOptions::lenient());
        let out = MinimalPlugin.parse(&req).expect("lenient parse");
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.skipped, 1);
        assert_eq!(
            out.errors[0].to_string(),
            "pairs.tsv:3: expected `prompt<TAB>completion`"
        );
        let eval = MinimalPlugin
            .evaluate(&EvalRequest::new(["4", "5"], ["4", "4"]))
            .expect("evaluates");
        assert_eq!(eval.metrics["exact_match"], 0.5);
    }
}
