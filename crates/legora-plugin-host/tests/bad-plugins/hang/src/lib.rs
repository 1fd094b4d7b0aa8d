//! A well-formed plugin that never returns from `parse` and `evaluate` (a busy
//! loop; its preset works). With `LEGORA_TEST_FAULT_AT=manifest` (or `load`)
//! it never returns from `manifest` either.

use legora_plugin_api::prelude::*;

/// Loops forever on parse and evaluate.
#[derive(Default)]
pub struct Hang;

legora_plugin_api::export_plugin!(Hang);

fn spin(method: &str) -> ! {
    eprintln!("hang plugin: looping forever in `{method}`");
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

impl Plugin for Hang {
    fn manifest(&self) -> Manifest {
        if std::env::var("LEGORA_TEST_FAULT_AT").is_ok_and(|v| v == "manifest" || v == "load") {
            spin("manifest");
        }
        Manifest::new("hang", "0.0.0")
            .format(FormatInfo::new("lines", "hangs").default_evaluator("boom"))
            .evaluator(EvaluatorInfo::new("boom", "hangs", &["x"]))
            .preset(PresetInfo::new("ok", "works"))
    }

    fn parse(&self, _request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        spin("parse")
    }

    fn evaluate(&self, _request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        spin("evaluate")
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        Ok(Preset::new("ok", "", LoraConfig::new(2, 4.0, &["q_proj"])))
    }
}

/// Also exported under the fallback entry name, so that a copy of this library
/// under any file name loads (the listing tests copy it as
/// `liblegora_plugin_hang.so`, a name plugin folders are searched for).
#[unsafe(no_mangle)]
pub extern "C" fn legora_plugin_entry() -> *const legora_plugin_api::abi::PluginVTable {
    unsafe extern "C" {
        #[link_name = "legora_plugin_entry_legora_test_plugin_hang"]
        fn named_entry() -> *const legora_plugin_api::abi::PluginVTable;
    }
    // SAFETY: the entry export_plugin! generated above, in this library.
    unsafe { named_entry() }
}
