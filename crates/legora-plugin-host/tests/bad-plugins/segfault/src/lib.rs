//! A well-formed plugin that writes through an invalid pointer (SIGSEGV) in
//! `parse` and `evaluate` (its preset works). With
//! `LEGORA_TEST_FAULT_AT=manifest` it crashes in `manifest`; with
//! `LEGORA_TEST_FAULT_AT=load` (Linux) already in a library constructor, i.e.
//! while the library is being opened.

use legora_plugin_api::prelude::*;

/// Crashes on parse and evaluate.
#[derive(Default)]
pub struct Segfault;

legora_plugin_api::export_plugin!(Segfault);

fn fault_at(what: &str) -> bool {
    std::env::var("LEGORA_TEST_FAULT_AT").is_ok_and(|v| v == what)
}

fn crash() -> ! {
    eprintln!("segfault plugin: writing through an invalid pointer");
    // Address 8: non-null and aligned (so no debug-mode pointer check turns it
    // into a panic), inside the never-mapped first page.
    let bad = 8usize as *mut u8;
    // SAFETY: none: this deliberately faults, as a plugin with a memory bug would.
    unsafe { std::ptr::write_volatile(bad, 1) };
    unreachable!("the write above faults")
}

/// Runs when the library is opened (an ELF `.init_array` constructor).
#[cfg(target_os = "linux")]
extern "C" fn on_load() {
    if fault_at("load") {
        crash();
    }
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

impl Plugin for Segfault {
    fn manifest(&self) -> Manifest {
        if fault_at("manifest") {
            crash();
        }
        Manifest::new("segfault", "0.0.0")
            .format(FormatInfo::new("lines", "crashes").default_evaluator("boom"))
            .evaluator(EvaluatorInfo::new("boom", "crashes", &["x"]))
            .preset(PresetInfo::new("ok", "works"))
    }

    fn parse(&self, _request: &ParseRequest) -> Result<ParseOutput, PluginError> {
        crash()
    }

    fn evaluate(&self, _request: &EvalRequest) -> Result<EvalOutput, PluginError> {
        crash()
    }

    fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
        Ok(Preset::new("ok", "", LoraConfig::new(2, 4.0, &["q_proj"])))
    }
}

/// Also exported under the fallback entry name, so that a copy of this library
/// under any file name loads (the listing tests copy it as
/// `liblegora_plugin_segfault.so`, a name plugin folders are searched for).
#[unsafe(no_mangle)]
pub extern "C" fn legora_plugin_entry() -> *const legora_plugin_api::abi::PluginVTable {
    unsafe extern "C" {
        #[link_name = "legora_plugin_entry_legora_test_plugin_segfault"]
        fn named_entry() -> *const legora_plugin_api::abi::PluginVTable;
    }
    // SAFETY: the entry export_plugin! generated above, in this library.
    unsafe { named_entry() }
}
