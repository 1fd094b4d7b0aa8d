//! # legora-plugin-api: the contract between legora and its plugins
//!
//! Plugins bring domain knowledge into legora:
//! - **formats** parse the files a domain already has (MedQA JSONL, CUAD
//!   JSON, transaction CSV, character cards, ...) into training [`Record`]s;
//! - **evaluators** compute the metrics the domain judges by;
//! - **presets** carry LoRA / mixture settings that suit the domain.
//!
//! A plugin is a Rust crate built as a `cdylib` (loaded at run time by
//! `legora-plugin-host`) and as an `rlib` (linked and registered statically,
//! e.g. by tests). This crate has no burn dependency and does no I/O.
//!
//! ## Writing a plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "legora-plugin-mydomain"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! legora-plugin-api = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! ```
//!
//! `src/lib.rs`: implement [`Plugin`] and call [`export_plugin!`] once. There
//! is nothing unsafe to write.
//!
//! ```
//! use legora_plugin_api::prelude::*;
//!
//! #[derive(Default)]
//! pub struct MyPlugin;
//!
//! #[derive(serde::Deserialize)]
//! struct Row { question: String, answer: String }
//!
//! impl Plugin for MyPlugin {
//!     fn manifest(&self) -> Manifest {
//!         Manifest::new("mydomain", env!("CARGO_PKG_VERSION"))
//!             .description("question/answer pairs")
//!             .format(FormatInfo::new("qa", "JSONL of {question, answer}")
//!                 .extensions(&["jsonl"])
//!                 .default_evaluator("exact"))
//!             .evaluator(EvaluatorInfo::new("exact", "normalized exact match", &["exact_match"]))
//!             .preset(PresetInfo::new("small", "r=8 on q/v"))
//!     }
//!
//!     fn parse(&self, req: &ParseRequest) -> Result<ParseOutput, PluginError> {
//!         // `req.format` is already known to be in the manifest.
//!         let task = req.task_or("mydomain/qa");
//!         let mut sink = RowSink::new(req);
//!         sink.jsonl(|row: Row, _pos| {
//!             if row.answer.is_empty() {
//!                 return Err("empty `answer`".into()); // becomes a row error with file:line
//!             }
//!             Ok(vec![Record::completion(&task, row.question, row.answer)])
//!         });
//!         sink.finish() // strict: fails on any bad row; lenient: skips and counts
//!     }
//!
//!     fn evaluate(&self, req: &EvalRequest) -> Result<EvalOutput, PluginError> {
//!         // predictions and references are already checked to line up.
//!         let hits = req.predictions.iter().zip(&req.references)
//!             .filter(|(p, r)| metrics::normalize_label(p) == metrics::normalize_label(r))
//!             .count();
//!         let acc = if req.is_empty() { 0.0 } else { hits as f64 / req.len() as f64 };
//!         Ok(EvalOutput::new(req.len()).metric("exact_match", acc))
//!     }
//!
//!     fn preset(&self, _name: &str) -> Result<Preset, PluginError> {
//!         Ok(Preset::new("small", "r=8 on q/v", LoraConfig::new(8, 16.0, &["q_proj", "v_proj"])))
//!     }
//! }
//!
//! legora_plugin_api::export_plugin!(MyPlugin);
//! # fn main() {
//! #     let out = legora_plugin_api::handle_request(&MyPlugin,
//! #         br#"{"schema_version":1,"call":{"method":"manifest"}}"#, &[]);
//! #     assert!(String::from_utf8(out).unwrap().contains("mydomain"));
//! # }
//! ```
//!
//! Build it with `cargo build --release -p legora-plugin-mydomain`; the host
//! loads `target/release/liblegora_plugin_mydomain.so` (`.dylib`, `.dll`) by
//! path, or by the name `mydomain` from a plugin directory. A complete,
//! copyable example lives in the repository's `examples/plugin-minimal/`.
//!
//! ### Rules of the road
//! - Names are lowercase (`[a-z0-9][a-z0-9._-]*`). The host registers every
//!   item as `<plugin>/<item>`, so `medical/medqa` and `finance/fraud` never
//!   clash.
//! - `parse` receives the file's bytes (and declared side files as
//!   [`Attachment`]s); never read files yourself. Report malformed rows with
//!   [`rows::RowSink::reject`] (file, line and row numbers are what users see)
//!   and let the mode decide: [`ParseMode::Strict`] fails the file on any bad
//!   row, [`ParseMode::Lenient`] skips and counts them. Problems that make the
//!   whole file unreadable are [`rows::RowSink::fatal`].
//! - Evaluators return named metrics; only finite numbers survive (JSON has no
//!   NaN), an undefined metric is dropped with a warning.
//! - A panic never crosses into the host: it comes back as
//!   [`PluginError::Panicked`] with its message. Do not build plugins with
//!   `panic = "abort"`.
//! - Everything the host sees is in the [`Manifest`]; calls for names that are
//!   not in it are refused before your code runs.
//!
//! ## The binary interface
//!
//! See [`abi`]: one exported entry symbol per library
//! (`legora_plugin_entry_<lib name>`), returning a table whose first field is
//! [`ABI_VERSION`], which the host checks before anything else. Requests and
//! responses are JSON ([`protocol`]) with a [`SCHEMA_VERSION`]; the plugin
//! allocates the response and frees it when the host hands it back.
//! [`handle_request`] is the whole dispatcher; the host's static path calls it
//! directly, so both paths run the same code.

#![deny(missing_docs)]

pub mod abi;
pub mod alpaca;
mod error;
pub mod metrics;
mod plugin;
pub mod protocol;
pub mod rows;
mod types;

pub use abi::{ABI_VERSION, ENTRY_SYMBOL_FALLBACK, ENTRY_SYMBOL_PREFIX};
pub use error::PluginError;
pub use plugin::{encode_response, handle_request, panic_message, Plugin};
pub use types::*;

/// Everything a plugin author usually needs.
pub mod prelude {
    pub use crate::metrics;
    pub use crate::rows::{RowPos, RowSink};
    pub use crate::{
        AttachmentInfo, EvalOutput, EvalRequest, EvaluatorInfo, ExpertFiles, ExpertInfo,
        FormatInfo, LoraConfig, Manifest, Message, MixtureConfig, ParamInfo, ParseMode,
        ParseOptions, ParseOutput, ParseRequest, Plugin, PluginError, Preset, PresetInfo, Record,
        Role, RoutingStrategy, TargetModules,
    };
}

/// Exports a [`Plugin`] through the C ABI.
///
/// `export_plugin!(MyPlugin)` builds the instance with `Default`;
/// `export_plugin!(MyPlugin, MyPlugin::new(...))` with an expression. The
/// instance is created on the first call (inside `catch_unwind`) and lives for
/// the rest of the process. Use it once per crate.
///
/// It generates the entry function under the symbol
/// `legora_plugin_entry_<crate name>` (see [`abi`]), a static
/// [`abi::PluginVTable`] with [`ABI_VERSION`], and the `call` / `free_buffer`
/// functions that wrap [`handle_request`]. Because the symbol carries the
/// crate name, several plugin crates can be linked into one binary as rlibs.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, <$plugin as ::core::default::Default>::default());
    };
    ($plugin:ty, $init:expr) => {
        const _: () = {
            fn __legora_instance() -> &'static $plugin {
                static INSTANCE: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();
                INSTANCE.get_or_init(|| $init)
            }

            unsafe extern "C" fn __legora_call(
                request: $crate::abi::ByteSlice,
                payload: $crate::abi::ByteSlice,
            ) -> $crate::abi::OwnedBuffer {
                // SAFETY: the host passes byte ranges that stay valid for the
                // duration of the call (ABI contract, see `abi`).
                unsafe {
                    $crate::abi::__exported_call::<$plugin>(__legora_instance, request, payload)
                }
            }

            static __LEGORA_VTABLE: $crate::abi::PluginVTable = $crate::abi::PluginVTable {
                abi_version: $crate::abi::ABI_VERSION,
                call: __legora_call,
                free_buffer: $crate::abi::__free_buffer,
            };

            #[unsafe(export_name = concat!("legora_plugin_entry_", env!("CARGO_CRATE_NAME")))]
            extern "C" fn __legora_plugin_entry() -> *const $crate::abi::PluginVTable {
                &__LEGORA_VTABLE
            }
        };
    };
}
