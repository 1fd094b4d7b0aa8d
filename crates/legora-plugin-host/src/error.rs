//! The host's one error type.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use legora_plugin_api::{PluginError, RowError};
use thiserror::Error;

use crate::process::WorkerExit;

/// Everything that can go wrong while loading or calling plugins. Each
/// variant names what it is about (path, symbol, plugin, file and row).
#[derive(Debug, Error)]
pub enum HostError {
    /// No library for a plugin name in any search directory, or a path that
    /// does not exist.
    #[error("plugin `{name}` not found: looked for {} in {}", candidates.join(", "), dirs(searched))]
    NotFound {
        /// Requested name or path.
        name: String,
        /// File names tried in each directory.
        candidates: Vec<String>,
        /// Directories searched, in order.
        searched: Vec<PathBuf>,
    },
    /// The file exists but the dynamic loader refused it.
    #[error("`{}` is not a loadable library: {message}", path.display())]
    NotLoadable {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The library exports none of the entry symbols.
    #[error("`{}` is not a legora plugin: it exports no symbol {}", path.display(), symbols.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" or "))]
    MissingSymbol {
        /// The library.
        path: PathBuf,
        /// Symbols looked up.
        symbols: Vec<String>,
    },
    /// The library was built against another ABI version; nothing in it was
    /// called besides its entry function.
    #[error("`{}` speaks plugin ABI version {found}, this host speaks version {expected}: rebuild the plugin against this legora-plugin-api", path.display())]
    AbiMismatch {
        /// The library.
        path: PathBuf,
        /// This host's [`legora_plugin_api::ABI_VERSION`].
        expected: u32,
        /// The version the library reports.
        found: u32,
    },
    /// The plugin answered with an error.
    #[error("plugin `{plugin}` returned an error: {source}")]
    Plugin {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The plugin's error.
        #[source]
        source: PluginError,
    },
    /// The plugin panicked; the panic was caught inside the plugin.
    #[error("plugin `{plugin}` panicked: {message}")]
    Panicked {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The panic message.
        message: String,
    },
    /// The plugin's answer was not a valid response.
    #[error("plugin `{plugin}` sent a malformed response to `{method}`: {reason}")]
    MalformedResponse {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The call (`manifest`, `parse`, ...).
        method: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A plugin, format, evaluator or preset name is already registered.
    #[error("duplicate {kind} `{name}`: registered by {existing}, offered again by {new}")]
    Duplicate {
        /// `plugin`, `format`, `evaluator` or `preset`.
        kind: &'static str,
        /// The (qualified) name.
        name: String,
        /// Where the registered one came from.
        existing: String,
        /// Where the new one came from.
        new: String,
    },
    /// No registered item with this qualified name.
    #[error("no {kind} named `{name}`; known: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    Unknown {
        /// `plugin`, `format`, `evaluator` or `preset`.
        kind: &'static str,
        /// The requested name.
        name: String,
        /// Registered names of that kind.
        known: Vec<String>,
    },
    /// Malformed rows in strict mode, or a file-level problem.
    #[error("{}", rows(file, errors, *total))]
    InvalidRows {
        /// Plugin that parsed the file.
        plugin: String,
        /// The file.
        file: String,
        /// The first errors, each with file and line / row.
        errors: Vec<RowError>,
        /// Number of malformed rows in all.
        total: usize,
    },
    /// The request is unusable before reaching a plugin (bad option value,
    /// mismatched evaluation lengths, NaN score, ...).
    #[error("invalid request: {message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// The worker process of an isolated plugin ended (crashed, aborted, was
    /// killed, or exited) before answering a call. The host reaped it; the
    /// next call to the plugin starts a fresh worker.
    #[error(
        "plugin `{plugin}` crashed during `{method}`: its worker process {exit}{}",
        tail(stderr)
    )]
    Crashed {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The call (`load`, `manifest`, `parse`, ...).
        method: String,
        /// How the worker ended.
        exit: WorkerExit,
        /// The last lines the worker wrote to stderr (may be empty).
        stderr: String,
    },
    /// An isolated plugin did not answer within its time limit; its worker
    /// process was killed and reaped.
    #[error("plugin `{plugin}` did not answer `{method}` within {:.1} s: its worker process was killed (a longer limit: PluginHost::set_timeouts or {})", timeout.as_secs_f64(), crate::TIMEOUT_ENV)]
    Timeout {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The call (`load`, `manifest`, `parse`, ...).
        method: String,
        /// The limit that ran out.
        timeout: Duration,
    },
    /// A frame on the pipes to or from an isolated plugin's worker is longer
    /// than the limit (nothing of that size was allocated or sent).
    #[error("plugin `{plugin}`: the {direction} of `{method}` is a frame of {len} bytes, over the limit of {limit} bytes (PluginHost::set_max_frame_len)")]
    FrameTooLarge {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The call.
        method: String,
        /// `request` or `reply`.
        direction: &'static str,
        /// The frame's length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The worker of an isolated plugin wrote something that is not a valid
    /// frame of the worker protocol; it was killed and reaped.
    #[error("plugin `{plugin}` sent a bad frame in reply to `{method}`: {reason}")]
    BadFrame {
        /// Plugin name (or library path while loading).
        plugin: String,
        /// The call.
        method: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No worker program for isolated plugins could be found or started.
    #[error("cannot start a plugin worker for `{}`: {message}", path.display())]
    Worker {
        /// The plugin library.
        path: PathBuf,
        /// What went wrong (the command tried, the OS error).
        message: String,
    },
    /// An environment variable the host reads has an unusable value.
    #[error("environment variable {var}={value:?}: expected {expected}")]
    InvalidEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn dirs(searched: &[PathBuf]) -> String {
    if searched.is_empty() {
        return "no directory (add one with --plugin-dir or LEGORA_PLUGIN_PATH)".into();
    }
    searched
        .iter()
        .map(|p| format!("`{}`", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rows(file: &str, errors: &[RowError], total: usize) -> String {
    let mut s = format!(
        "{file}: {total} malformed row{}",
        if total == 1 { "" } else { "s" }
    );
    let shown = errors.len().min(5);
    for e in &errors[..shown] {
        let _ = write!(s, "\n  {e}");
    }
    if total > shown {
        let _ = write!(s, "\n  ... and {} more", total - shown);
    }
    s
}

/// The last stderr lines of a dead worker, indented, or nothing. From a Rust
/// panic, its header and message (they say more than the backtrace after them).
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let shown = match lines.iter().rposition(|l| l.contains("panicked at")) {
        Some(start) => {
            let end = lines[start..]
                .iter()
                .position(|l| l.starts_with("stack backtrace:") || l.starts_with("note: "))
                .map_or(lines.len(), |n| start + n);
            &lines[start..end.min(start + 6)]
        }
        None => &lines[lines.len().saturating_sub(6)..],
    };
    let mut s = String::from("; its last stderr lines:");
    for line in shown {
        let _ = write!(s, "\n  | {line}");
    }
    s
}
