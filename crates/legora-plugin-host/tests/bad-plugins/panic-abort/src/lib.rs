//! A plugin that behaves as if built with `panic = "abort"`: its panics in
//! `parse` and `evaluate` end the process instead of unwinding into the
//! `catch_unwind` of `export_plugin!` (its preset works). With
//! `LEGORA_TEST_FAULT_AT=manifest` (or `load`) it panics in `manifest`.
//!
//! `panic = "abort"` is a profile setting, and profiles are per workspace, not
//! per crate, so this crate gets the same behaviour from a panic hook: under
//! `panic = "abort"` the runtime runs the panic hook (the default one prints
//! `thread '...' panicked at ...` and the message) and then aborts; this hook
//! calls the default hook and then `std::process::abort()`, before any
//! unwinding starts. Same output, same SIGABRT.
//!
//! The hook is process-wide, like `panic = "abort"` itself: loaded into a host
//! in process, this plugin would abort the host on its next panic anywhere.

use std::sync::Once;

use legora_plugin_api::prelude::*;

/// Panics (and so aborts) on parse and evaluate.
#[derive(Default)]
pub struct PanicAbort;

legora_plugin_api::export_plugin!(PanicAbort);

/// Makes every panic from now on abort, as `panic = "abort"` does.
fn panics_abort() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            std::process::abort();
        }));
    });
}

impl Plugin for PanicAbort {
    fn manifest(&self) -> Manifest {
        if std::env::var("LEGORA_TEST_FAULT_AT").is_ok_and(|v| v == "manifest" || v == "load") {
            panics_abort();
            panic!("the manifest of panic-abort exploded");
        }
        Manifest::new("panic-abort", "0.0.0")
            .format(FormatInfo::new("lines", "panics").default_evaluator("boom"))
            .evaluator(EvaluatorInfo::new("boom", "panics", &["x"]))
            .preset(PresetInfo::new("ok", "works"))
    }

    fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        panics_abort();
        let v: Vec<u8> = Vec::new();
        // index out of bounds: a panic that is not a plain panic! call
        Ok(ParseOutput {
            skipped: v[request.data.len() + 3] as usize,
            ..ParseOutput::default()
        })
    }

    fn evaluate(&self, request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        panics_abort();
        panic!("the evaluator exploded on {} examples", request.len())
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        Ok(Preset::new("ok", "", LoraConfig::new(2, 4.0, &["q_proj"])))
    }
}

/// Also exported under the fallback entry name, so that a copy of this library
/// under any file name loads (the listing tests copy it as
/// `liblegora_plugin_panic-abort.so`, a name plugin folders are searched for).
#[unsafe(no_mangle)]
pub extern "C" fn legora_plugin_entry() -> *const legora_plugin_api::abi::PluginVTable {
    unsafe extern "C" {
        #[link_name = "legora_plugin_entry_legora_test_plugin_panic_abort"]
        fn named_entry() -> *const legora_plugin_api::abi::PluginVTable;
    }
    // SAFETY: the entry export_plugin! generated above, in this library.
    unsafe { named_entry() }
}
