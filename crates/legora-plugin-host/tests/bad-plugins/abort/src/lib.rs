//! A well-formed plugin that calls `abort()` in `parse` and `evaluate` (its
//! preset works). With `LEGORA_TEST_FAULT_AT=manifest` (or `load`) it aborts
//! in `manifest` already, so it cannot even be listed.

use legora_plugin_api::prelude::*;

/// Aborts the process on parse and evaluate.
#[derive(Default)]
pub struct Abort;

legora_plugin_api::export_plugin!(Abort);

fn fault_at_manifest() -> bool {
    std::env::var("LEGORA_TEST_FAULT_AT").is_ok_and(|v| v == "manifest" || v == "load")
}

fn fault(method: &str) -> ! {
    eprintln!("abort plugin: calling abort() in `{method}`");
    std::process::abort()
}

impl Plugin for Abort {
    fn manifest(&self) -> Manifest {
        if fault_at_manifest() {
            fault("manifest");
        }
        Manifest::new("abort", "0.0.0")
            .format(FormatInfo::new("lines", "aborts").default_evaluator("boom"))
            .evaluator(EvaluatorInfo::new("boom", "aborts", &["x"]))
            .preset(PresetInfo::new("ok", "works"))
    }

    fn parse(&self, _request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        fault("parse")
    }

    fn evaluate(&self, _request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        fault("evaluate")
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        Ok(Preset::new("ok", "", LoraConfig::new(2, 4.0, &["q_proj"])))
    }
}

/// Also exported under the fallback entry name, so that a copy of this library
/// under any file name loads (the listing tests copy it as
/// `liblegora_plugin_abort.so`, a name plugin folders are searched for).
#[unsafe(no_mangle)]
pub extern "C" fn legora_plugin_entry() -> *const legora_plugin_api::abi::PluginVTable {
    unsafe extern "C" {
        #[link_name = "legora_plugin_entry_legora_test_plugin_abort"]
        fn named_entry() -> *const legora_plugin_api::abi::PluginVTable;
    }
    // SAFETY: the entry export_plugin! generated above, in this library.
    unsafe { named_entry() }
}
