//! A well-formed plugin whose parser and evaluator panic.

use legora_plugin_api::prelude::*;

/// Panics on parse and evaluate; its preset works.
#[derive(Default)]
pub struct Panics;

legora_plugin_api::export_plugin!(Panics);

impl Plugin for Panics {
    fn manifest(&self) -> Manifest {
        Manifest::new("panics", "0.0.0")
            .format(FormatInfo::new("lines", "panics"))
            .evaluator(EvaluatorInfo::new("boom", "panics", &["x"]))
            .preset(PresetInfo::new("ok", "works"))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        let v: Vec<u8> = Vec::new();
        // index out of bounds: a panic that is not a plain panic! call
        Ok(ParseOutput {
            skipped: v[request.data.len() + 3] as usize,
            ..ParseOutput::default()
        })
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        panic!("the evaluator exploded on {} examples", request.len())
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        Ok(Preset::new("ok", "", LoraConfig::new(2, 4.0, &["q_proj"])))
    }
}
