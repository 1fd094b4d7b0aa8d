//! # legora-plugin-host: load plugins and use their formats, evaluators and presets
//!
//! ```no_run
//! use legora_plugin_host::PluginHost;
//! use legora_plugin_api::{EvalRequest, ParseOptions};
//!
//! # fn main() -> Result<(), legora_plugin_host::HostError> {
//! let mut host = PluginHost::new();
//! host.add_search_dir("target/release");         // --plugin-dir
//! host.load_name("medical")?;                     // liblegora_plugin_medical.so
//! host.load_path("/opt/plugins/libmy_plugin.so")?;
//!
//! let out = host.parse_file("medical/medqa", "data/medqa/train.jsonl", &ParseOptions::strict())?;
//! let metrics = host.evaluate(
//!     "medical/mc_accuracy",
//!     EvalRequest::new(["A", "C"], ["A", "B"]),
//! )?;
//! let preset = host.preset("medical/clinical")?;
//! # Ok(()) }
//! ```
//!
//! - **Search order** for [`PluginHost::load_name`]: directories added with
//!   [`PluginHost::add_search_dir`] (the CLI's `--plugin-dir`), then the
//!   entries of `LEGORA_PLUGIN_PATH` (platform path-list syntax), then the
//!   directory of the running executable. In each, the file names
//!   `{lib}legora_plugin_{name}{.so|.dylib|.dll}` and `{lib}{name}{ext}` are
//!   tried (`-` in the name read as `_`).
//! - **Handshake**: the entry symbol is looked up, the ABI version read from
//!   the first field of its table and compared before anything else is
//!   called; then the manifest is fetched and its names checked.
//! - **Registry**: every format, evaluator and preset is registered under
//!   `<plugin>/<name>`; a second plugin with the same name is refused.
//! - **Static registration**: [`PluginHost::register_static`] takes a
//!   [`Plugin`] linked into the binary (a plugin crate used as an rlib). Calls
//!   go through the same request dispatcher and JSON encoding as dynamic ones,
//!   so both paths give identical results and errors.
//! - Libraries are never unloaded (a Rust `cdylib` cannot be safely
//!   `dlclose`d while anything it created may still be referenced).
//!
//! ## Process isolation (the default for dynamic plugins)
//!
//! Each dynamic plugin runs in a worker process of its own, and nothing of
//! the library is ever loaded into the host: not even to list it. A plugin
//! that aborts, segfaults, is built with `panic = "abort"` and panics, loops
//! forever, writes garbage, or is a truncated file is then an error naming
//! the plugin and the call, and the host goes on:
//!
//! | what happened | error |
//! | --- | --- |
//! | the worker died (signal or exit code; its last stderr lines quoted) | [`HostError::Crashed`] |
//! | no answer within the time limit (the worker is killed) | [`HostError::Timeout`] |
//! | a reply frame over the size limit, nothing allocated for it | [`HostError::FrameTooLarge`] |
//! | bytes on the pipe that are not a frame | [`HostError::BadFrame`] |
//! | a reply that is not a valid response, or a reply buffer whose length is out of bounds | [`HostError::MalformedResponse`] |
//! | the worker program could not be found or started | [`HostError::Worker`] |
//!
//! A dead or killed worker is always reaped (no zombie) and the next call to
//! the plugin starts a fresh one, which must report the same manifest. The
//! worker turns its core dumps off and exits when the host goes away.
//!
//! - **The worker** is started as `<program> <args> <library>`, through
//!   pipes on its stdin and stdout. The program is, in order: the one given
//!   to [`PluginHost::set_worker_command`]; the [`WORKER_ENV`] environment
//!   variable (`LEGORA_PLUGIN_WORKER`, run as `<program> plugin-worker
//!   <library>`); the one a binary registered with
//!   [`set_default_worker_command`] (the `legora` binary registers itself:
//!   `legora plugin-worker`); a `legora-plugin-worker` or `legora` program
//!   next to the running executable. This crate ships the
//!   `legora-plugin-worker` program; any binary can serve as its own worker
//!   by calling [`worker::run`].
//! - **Protocol**: the same JSON [`Request`] / [`Response`] bytes as the C
//!   ABI carries in process, in frames of a little-endian `u64` length and
//!   that many bytes; the worker first sends a hello with its protocol and
//!   ABI versions and the outcome of opening the library (the same checks,
//!   and the same [`HostError::NotLoadable`], [`HostError::MissingSymbol`]
//!   and [`HostError::AbiMismatch`] as in process); then the manifest is
//!   fetched and checked as in process.
//! - **Limits**: every frame is at most [`DEFAULT_MAX_FRAME_LEN`] (256 MiB;
//!   [`PluginHost::set_max_frame_len`]): a longer request is refused before
//!   it is sent, a longer reply before it is read. Time limits
//!   ([`Timeouts`], [`PluginHost::set_timeouts`], or [`TIMEOUT_ENV`] in
//!   seconds): 10 s for the handshake (start, open, manifest), 60 s for every
//!   other call. Calls to one plugin are serialized; different plugins run
//!   in different processes.
//! - **In process**: [`PluginHost::set_isolation`]`(`[`Isolation::InProcess`]`)`
//!   (or [`set_default_isolation`]; the CLI's `--plugins-in-process`) loads
//!   dynamic libraries into the host as before: calls cost a function call
//!   instead of a pipe round trip, and a crashing plugin takes the host down.
//!   Both paths check the reply buffer a plugin reports (non-null, length
//!   within its capacity and the frame limit) before reading it, and refuse
//!   a library file whose loadable segments reach past its end.
//! - Static plugins always run in the host.

#![deny(missing_docs)]

mod dylib;
mod error;
mod frame;
mod process;
pub mod worker;

use std::collections::BTreeMap;
use std::env;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use legora_plugin_api::abi::{self, PluginVTable};
use legora_plugin_api::protocol::{Call, ParseHeader, Reply, Request, Response};
use legora_plugin_api::{
    handle_request, Attachment, EvalOutput, EvalRequest, EvaluatorInfo, ExpertFiles, ExpertInfo,
    FormatInfo, Manifest, ParseOptions, ParseOutput, ParseRequest, Plugin, PluginError, Preset,
    PresetInfo, SCHEMA_VERSION,
};
use serde_json::Value;

pub use error::HostError;
pub use frame::DEFAULT_MAX_FRAME_LEN;
pub use legora_plugin_api as api;
pub use process::{Isolation, Timeouts, WorkerCommand, WorkerExit};

use process::{Isolated, WorkerConfig};

/// Environment variable holding extra plugin directories.
pub const PLUGIN_PATH_ENV: &str = "LEGORA_PLUGIN_PATH";

/// Environment variable naming the worker program for isolated plugins; it
/// is started as `<program> plugin-worker <library>`.
pub const WORKER_ENV: &str = "LEGORA_PLUGIN_WORKER";

/// Environment variable with the time limit, in seconds, of every call to an
/// isolated plugin, the handshake included (by default 10 s for the handshake
/// and 60 s for the other calls).
pub const TIMEOUT_ENV: &str = "LEGORA_PLUGIN_TIMEOUT";

/// File names of worker programs looked for next to the running executable.
const WORKER_PROGRAMS: [&str; 2] = ["legora-plugin-worker", "legora"];

/// Process-wide defaults read by [`PluginHost::new`].
struct Defaults {
    isolation: Isolation,
    worker: Option<WorkerCommand>,
}

static DEFAULTS: Mutex<Defaults> = Mutex::new(Defaults {
    isolation: Isolation::Process,
    worker: None,
});

/// Sets the [`Isolation`] of every [`PluginHost`] created from now on (the
/// `legora` binary's `--plugins-in-process` flag). A host's own
/// [`PluginHost::set_isolation`] overrides it.
pub fn set_default_isolation(isolation: Isolation) {
    DEFAULTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .isolation = isolation;
}

/// Sets the worker program of every [`PluginHost`] created from now on, for a
/// binary that serves as its own worker (the `legora` binary registers
/// `legora plugin-worker`). [`WORKER_ENV`] and a host's own
/// [`PluginHost::set_worker_command`] come first.
pub fn set_default_worker_command(command: WorkerCommand) {
    DEFAULTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .worker = Some(command);
}

/// Where a plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// A dynamic library at this path.
    Dynamic(PathBuf),
    /// Linked into the binary and registered with [`PluginHost::register_static`].
    Static,
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Dynamic(path) => write!(f, "`{}`", path.display()),
            PluginSource::Static => f.write_str("a statically linked plugin"),
        }
    }
}

enum Backend {
    /// Table of a leaked (never unloaded) library with a matching ABI version,
    /// and the largest reply accepted from it.
    Dynamic {
        table: &'static PluginVTable,
        max_reply_len: u64,
    },
    /// A library served by a worker process (boxed: it is much larger than
    /// the other variants).
    Isolated(Box<Isolated>),
    Static(Box<dyn Plugin>),
}

struct Inner {
    manifest: Manifest,
    source: PluginSource,
    backend: Backend,
}

/// A loaded plugin. Cheap to clone; usable from several threads.
#[derive(Clone)]
pub struct PluginHandle(Arc<Inner>);

impl fmt::Debug for PluginHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginHandle")
            .field("name", &self.name())
            .field("version", &self.0.manifest.version)
            .field("source", &self.0.source)
            .finish()
    }
}

impl PluginHandle {
    /// Plugin name.
    pub fn name(&self) -> &str {
        &self.0.manifest.name
    }

    /// The manifest fetched at load time.
    pub fn manifest(&self) -> &Manifest {
        &self.0.manifest
    }

    /// Where it came from.
    pub fn source(&self) -> &PluginSource {
        &self.0.source
    }

    /// Where a dynamic plugin runs: in a worker process or in the host
    /// (`None` for a static plugin).
    pub fn isolation(&self) -> Option<Isolation> {
        match self.0.backend {
            Backend::Dynamic { .. } => Some(Isolation::InProcess),
            Backend::Isolated(_) => Some(Isolation::Process),
            Backend::Static(_) => None,
        }
    }

    /// The process id of an isolated plugin's worker while one runs (`None`
    /// in process, for static plugins, and between a worker's death and the
    /// next call, which starts a new one).
    pub fn worker_pid(&self) -> Option<u32> {
        match &self.0.backend {
            Backend::Isolated(worker) => worker.pid(),
            _ => None,
        }
    }

    /// Sends one call and returns the plugin's (non-error) reply. Lower level
    /// than [`PluginHandle::parse`] and friends, which also check the reply's type.
    pub fn call(&self, call: Call, payload: &[u8]) -> Result<Reply, HostError> {
        call_backend(&self.0.backend, self.name(), call, payload)
    }

    /// Parses with a local format name in `request.format`.
    pub fn parse(&self, request: &ParseRequest) -> Result<ParseOutput, HostError> {
        let (header, payload) = ParseHeader::split(request);
        match self.call(Call::Parse(header), &payload)? {
            Reply::Parse(output) => Ok(output),
            other => Err(self.wrong_reply("parse", &other)),
        }
    }

    /// Evaluates with a local evaluator name in `request.evaluator`.
    ///
    /// Infinite scores are clamped to ±`f64::MAX` (JSON has no infinity; the
    /// order is kept); NaN scores are an [`HostError::InvalidRequest`].
    pub fn evaluate(&self, mut request: EvalRequest) -> Result<EvalOutput, HostError> {
        for row in &mut request.scores {
            for v in row.iter_mut() {
                if v.is_infinite() {
                    *v = if *v > 0.0 { f64::MAX } else { f64::MIN };
                }
            }
        }
        request
            .validate()
            .map_err(|message| HostError::InvalidRequest { message })?;
        match self.call(Call::Evaluate(request), &[])? {
            Reply::Evaluate(output) => Ok(output),
            other => Err(self.wrong_reply("evaluate", &other)),
        }
    }

    /// Fetches a preset by local name.
    pub fn preset(&self, name: &str) -> Result<Preset, HostError> {
        match self.call(
            Call::Preset {
                name: name.to_string(),
            },
            &[],
        )? {
            Reply::Preset(preset) => Ok(preset),
            other => Err(self.wrong_reply("preset", &other)),
        }
    }

    /// Fetches a shipped expert's files by local name.
    pub fn expert(&self, name: &str) -> Result<ExpertFiles, HostError> {
        match self.call(
            Call::Expert {
                name: name.to_string(),
            },
            &[],
        )? {
            Reply::Expert(files) => Ok(files),
            other => Err(self.wrong_reply("expert", &other)),
        }
    }

    fn wrong_reply(&self, method: &str, reply: &Reply) -> HostError {
        HostError::MalformedResponse {
            plugin: self.name().to_string(),
            method: method.to_string(),
            reason: format!("expected a `{method}` reply, got `{}`", reply.kind()),
        }
    }
}

fn call_backend(
    backend: &Backend,
    plugin: &str,
    call: Call,
    payload: &[u8],
) -> Result<Reply, HostError> {
    let method = call.method();
    let request =
        serde_json::to_vec(&Request::new(call)).map_err(|e| HostError::InvalidRequest {
            message: format!("cannot encode the request: {e}"),
        })?;
    let malformed = |reason: String| HostError::MalformedResponse {
        plugin: plugin.to_string(),
        method: method.to_string(),
        reason,
    };
    match backend {
        Backend::Static(plugin_impl) => {
            let response = handle_request(plugin_impl.as_ref(), &request, payload);
            decode_reply(plugin, method, &response)
        }
        Backend::Dynamic {
            table,
            max_reply_len,
        } => {
            let response =
                dylib::call_table(table, &request, payload, *max_reply_len).map_err(malformed)?;
            decode_reply(plugin, method, &response)
        }
        Backend::Isolated(worker) => {
            let reply = worker
                .call(plugin, method, &request, payload)?
                .map_err(malformed)?;
            decode_reply(plugin, method, reply.body())
        }
    }
}

/// Decode the bytes of plugin `plugin`'s reply to a `method` call: the response
/// envelope of [`legora_plugin_api::protocol`], its schema version, and every record
/// of a parse reply. An error reply becomes the matching [`HostError`]; anything
/// else that is not a valid reply is a [`HostError::MalformedResponse`] naming the
/// plugin and the call. Every path (static, in-process, worker process) decodes
/// replies here.
pub fn decode_reply(plugin: &str, method: &str, bytes: &[u8]) -> Result<Reply, HostError> {
    let malformed = |reason: String| HostError::MalformedResponse {
        plugin: plugin.to_string(),
        method: method.to_string(),
        reason,
    };
    let response: Response = serde_json::from_slice(bytes).map_err(|e| {
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
        malformed(format!("{e} (response starts with {head:?})"))
    })?;
    if response.schema_version != SCHEMA_VERSION {
        return Err(malformed(format!(
            "schema_version {}, this host reads {SCHEMA_VERSION}",
            response.schema_version
        )));
    }
    match response.reply {
        Reply::Error(error) => Err(plugin_error(plugin, error)),
        Reply::Parse(output) => {
            for (i, record) in output.records.iter().enumerate() {
                record
                    .validate()
                    .map_err(|e| malformed(format!("record #{} is invalid: {e}", i + 1)))?;
            }
            Ok(Reply::Parse(output))
        }
        reply => Ok(reply),
    }
}

fn plugin_error(plugin: &str, error: PluginError) -> HostError {
    match error {
        PluginError::Panicked { message } => HostError::Panicked {
            plugin: plugin.to_string(),
            message,
        },
        PluginError::InvalidRows {
            file,
            errors,
            total,
        } => HostError::InvalidRows {
            plugin: plugin.to_string(),
            file,
            errors,
            total,
        },
        source => HostError::Plugin {
            plugin: plugin.to_string(),
            source,
        },
    }
}

/// A registered format (`medical/medqa`): parses files into records.
#[derive(Debug, Clone)]
pub struct Format {
    name: String,
    info: FormatInfo,
    plugin: PluginHandle,
}

impl Format {
    /// Qualified name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the plugin says about it.
    pub fn info(&self) -> &FormatInfo {
        &self.info
    }

    /// The plugin.
    pub fn plugin(&self) -> &PluginHandle {
        &self.plugin
    }

    /// Qualified name of the evaluator that scores this format's records.
    pub fn default_evaluator(&self) -> Option<String> {
        self.info.default_evaluator.as_ref().map(|e| {
            if e.contains('/') {
                e.clone()
            } else {
                format!("{}/{e}", self.plugin.name())
            }
        })
    }

    /// Parses bytes; `file_name` appears in error messages. Attachments are
    /// not resolved (use [`Format::parse_request`] to pass them).
    pub fn parse_bytes(
        &self,
        file_name: &str,
        data: Vec<u8>,
        options: &ParseOptions,
    ) -> Result<ParseOutput, HostError> {
        self.parse_request(ParseRequest::new("", file_name, data).with_options(options.clone()))
    }

    /// Parses a full request (its `format` is set to this format).
    pub fn parse_request(&self, mut request: ParseRequest) -> Result<ParseOutput, HostError> {
        request.format = self.info.name.clone();
        self.plugin.parse(&request)
    }

    /// Reads and parses a file. Errors name the path as given. Declared
    /// attachments are read from the paths in `options.params`, or from their
    /// default location next to the file.
    pub fn parse_file(
        &self,
        path: impl AsRef<Path>,
        options: &ParseOptions,
    ) -> Result<ParseOutput, HostError> {
        let path = path.as_ref();
        let data = read_regular(path).map_err(|source| HostError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let attachments = read_attachments(&self.info, path, options)?;
        let mut request = ParseRequest::new(&self.info.name, path.display().to_string(), data)
            .with_options(options.clone());
        request.attachments = attachments;
        self.parse_request(request)
    }
}

fn read_attachments(
    info: &FormatInfo,
    data_path: &Path,
    options: &ParseOptions,
) -> Result<Vec<Attachment>, HostError> {
    let mut out = Vec::new();
    for spec in &info.attachments {
        let (paths, explicit): (Vec<PathBuf>, bool) = match options.params.get(&spec.option) {
            None | Some(Value::Null) => match &spec.default {
                Some(default) => {
                    let base = data_path.parent().unwrap_or_else(|| Path::new("."));
                    (vec![base.join(default)], false)
                }
                None => continue,
            },
            Some(Value::String(s)) => (vec![PathBuf::from(s)], true),
            Some(Value::Array(items)) => {
                let paths = items
                    .iter()
                    .map(|v| v.as_str().map(PathBuf::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| HostError::InvalidRequest {
                        message: format!("option `{}` must list paths as strings", spec.option),
                    })?;
                (paths, true)
            }
            Some(_) => {
                return Err(HostError::InvalidRequest {
                    message: format!("option `{}` must be a path or a list of paths", spec.option),
                })
            }
        };
        for path in paths {
            if path.is_dir() {
                let entries = std::fs::read_dir(&path).map_err(|source| HostError::Io {
                    path: path.clone(),
                    source,
                })?;
                let mut files = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|source| HostError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    let file = entry.path();
                    let ext_ok = spec.extensions.is_empty()
                        || file.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            spec.extensions.iter().any(|x| x.eq_ignore_ascii_case(e))
                        });
                    if file.is_file() && ext_ok {
                        files.push(file);
                    }
                }
                files.sort();
                for file in files {
                    out.push(read_attachment(&file)?);
                }
            } else if path.is_file() || explicit {
                out.push(read_attachment(&path)?);
            }
        }
    }
    Ok(out)
}

/// Read a data file: anything but a regular file (a FIFO, a device or a link to one, a
/// folder) is refused before a byte is read, so it can neither block nor stream for ever.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK (Linux 0o4000, macOS 0x4): opening a FIFO must not wait for a writer.
        opts.custom_flags(if cfg!(target_os = "linux") {
            0o4000
        } else {
            0x4
        });
    }
    let f = opts.open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        let found = if meta.is_dir() {
            "a folder"
        } else {
            "a FIFO, device or socket"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("expected a regular file, found {found}"),
        ));
    }
    let mut bytes = Vec::new();
    f.take(meta.len()).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_attachment(path: &Path) -> Result<Attachment, HostError> {
    let data = read_regular(path).map_err(|source| HostError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Attachment {
        name: path.display().to_string(),
        data,
    })
}

/// A registered evaluator (`finance/fraud`).
#[derive(Debug, Clone)]
pub struct Evaluator {
    name: String,
    info: EvaluatorInfo,
    plugin: PluginHandle,
}

impl Evaluator {
    /// Qualified name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the plugin says about it.
    pub fn info(&self) -> &EvaluatorInfo {
        &self.info
    }

    /// The plugin.
    pub fn plugin(&self) -> &PluginHandle {
        &self.plugin
    }

    /// Computes the metrics (`request.evaluator` is set to this evaluator).
    pub fn evaluate(&self, mut request: EvalRequest) -> Result<EvalOutput, HostError> {
        request.evaluator = self.info.name.clone();
        self.plugin.evaluate(request)
    }
}

/// Loads plugins and keeps the registry of their formats, evaluators and
/// presets under qualified names.
pub struct PluginHost {
    plugins: Vec<PluginHandle>,
    formats: BTreeMap<String, Format>,
    evaluators: BTreeMap<String, Evaluator>,
    presets: BTreeMap<String, (PresetInfo, PluginHandle)>,
    experts: BTreeMap<String, (ExpertInfo, PluginHandle)>,
    search_dirs: Vec<PathBuf>,
    use_env_path: bool,
    use_exe_dir: bool,
    isolation: Isolation,
    worker: Option<WorkerCommand>,
    timeouts: Timeouts,
    /// A bad [`TIMEOUT_ENV`] value, reported by the first dynamic load.
    timeout_env_error: Option<String>,
    max_frame_len: u64,
}

impl Default for PluginHost {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginHost")
            .field("plugins", &self.plugins)
            .field("search_dirs", &self.search_dirs)
            .field("isolation", &self.isolation)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl PluginHost {
    /// An empty host that searches `LEGORA_PLUGIN_PATH` and the executable's
    /// directory, and runs dynamic plugins in worker processes (unless
    /// [`set_default_isolation`] said otherwise), with the time limits of
    /// [`TIMEOUT_ENV`] when it is set.
    pub fn new() -> Self {
        let isolation = DEFAULTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .isolation;
        let mut timeouts = Timeouts::default();
        let mut timeout_env_error = None;
        if let Some(value) = env::var_os(TIMEOUT_ENV) {
            let text = value.to_string_lossy().into_owned();
            match text.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => {
                    let limit = Duration::from_secs_f64(s);
                    timeouts = Timeouts {
                        handshake: limit,
                        call: limit,
                    };
                }
                _ => timeout_env_error = Some(text),
            }
        }
        Self {
            plugins: Vec::new(),
            formats: BTreeMap::new(),
            evaluators: BTreeMap::new(),
            presets: BTreeMap::new(),
            experts: BTreeMap::new(),
            search_dirs: Vec::new(),
            use_env_path: true,
            use_exe_dir: true,
            isolation,
            worker: None,
            timeouts,
            timeout_env_error,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }

    /// Where dynamic plugins loaded from now on run (default
    /// [`Isolation::Process`]). Static plugins always run in the host.
    pub fn set_isolation(&mut self, isolation: Isolation) -> &mut Self {
        self.isolation = isolation;
        self
    }

    /// Where dynamic plugins loaded from now on run.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The worker program for isolated plugins: started as
    /// `<program> <args...> <library>`. Without it the host uses
    /// [`WORKER_ENV`], then the command set by [`set_default_worker_command`],
    /// then a `legora-plugin-worker` or `legora` program next to the running
    /// executable (or one folder up, from cargo's `deps` folder), each with
    /// the argument `plugin-worker`.
    pub fn set_worker_command<I, S>(&mut self, program: impl Into<PathBuf>, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let command = args
            .into_iter()
            .fold(WorkerCommand::new(program), |c, a| c.arg(a));
        self.worker = Some(command);
        self
    }

    /// The worker program isolated plugins would be started with (see
    /// [`PluginHost::set_worker_command`] for the order), or the places looked
    /// at when there is none.
    pub fn worker_command(&self) -> Result<WorkerCommand, Vec<PathBuf>> {
        if let Some(command) = &self.worker {
            return Ok(command.clone());
        }
        if let Some(program) = env::var_os(WORKER_ENV).filter(|p| !p.is_empty()) {
            return Ok(WorkerCommand::new(program).arg(worker::WORKER_SUBCOMMAND));
        }
        if let Some(command) = DEFAULTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .worker
            .clone()
        {
            return Ok(command);
        }
        let mut tried = Vec::new();
        if let Some(dir) = env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            let mut dirs = vec![dir.clone()];
            if dir.file_name().is_some_and(|n| n == "deps") {
                dirs.extend(dir.parent().map(Path::to_path_buf));
            }
            for dir in dirs {
                for name in WORKER_PROGRAMS {
                    let program = dir.join(format!("{name}{}", env::consts::EXE_SUFFIX));
                    if program.is_file() {
                        return Ok(WorkerCommand::new(program).arg(worker::WORKER_SUBCOMMAND));
                    }
                    tried.push(program);
                }
            }
        }
        Err(tried)
    }

    /// Time limits for isolated plugins loaded from now on (overrides
    /// [`TIMEOUT_ENV`]).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) -> &mut Self {
        self.timeouts = timeouts;
        self.timeout_env_error = None;
        self
    }

    /// Time limits for isolated plugins loaded from now on.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The largest request or reply, in bytes, exchanged with a dynamic plugin
    /// loaded from now on (default [`DEFAULT_MAX_FRAME_LEN`], 256 MiB): a
    /// larger reply is an error, never an allocation.
    pub fn set_max_frame_len(&mut self, bytes: u64) -> &mut Self {
        self.max_frame_len = bytes;
        self
    }

    fn worker_config(&self, path: &Path) -> Result<WorkerConfig, HostError> {
        if let Some(value) = &self.timeout_env_error {
            return Err(HostError::InvalidEnv {
                var: TIMEOUT_ENV,
                value: value.clone(),
                expected: "a positive number of seconds",
            });
        }
        let command = self.worker_command().map_err(|tried| HostError::Worker {
            path: path.to_path_buf(),
            message: format!(
                "no worker program found (looked for {}); set {WORKER_ENV}, call \
                 PluginHost::set_worker_command, or load plugins in process",
                if tried.is_empty() {
                    "nothing: the running executable's folder is unknown".to_string()
                } else {
                    tried
                        .iter()
                        .map(|p| format!("`{}`", p.display()))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        })?;
        Ok(WorkerConfig {
            command,
            timeouts: self.timeouts,
            max_frame_len: self.max_frame_len,
        })
    }

    /// Adds a directory searched first, in the order added (`--plugin-dir`).
    pub fn add_search_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.search_dirs.push(dir.into());
        self
    }

    /// Whether `LEGORA_PLUGIN_PATH` is searched (default true).
    pub fn use_env_path(&mut self, yes: bool) -> &mut Self {
        self.use_env_path = yes;
        self
    }

    /// Whether the executable's directory is searched (default true).
    pub fn use_exe_dir(&mut self, yes: bool) -> &mut Self {
        self.use_exe_dir = yes;
        self
    }

    /// The directories [`PluginHost::load_name`] searches, in order, without
    /// repeats.
    pub fn search_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = self.search_dirs.clone();
        if self.use_env_path {
            if let Some(value) = env::var_os(PLUGIN_PATH_ENV) {
                dirs.extend(env::split_paths(&value).filter(|p| !p.as_os_str().is_empty()));
            }
        }
        if self.use_exe_dir {
            if let Some(dir) = env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_path_buf))
            {
                dirs.push(dir);
            }
        }
        let mut seen = Vec::new();
        dirs.retain(|d| {
            if seen.contains(d) {
                false
            } else {
                seen.push(d.clone());
                true
            }
        });
        dirs
    }

    /// Plugin library files (`{lib}legora_plugin_*{ext}`) in the search
    /// directories, in search order.
    pub fn discover(&self) -> Vec<PathBuf> {
        let prefix = format!("{}legora_plugin_", env::consts::DLL_PREFIX);
        let mut found = Vec::new();
        for dir in self.search_dirs() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&prefix) && n.ends_with(env::consts::DLL_SUFFIX)
                    })
                })
                .collect();
            files.sort();
            found.extend(files);
        }
        found
    }

    /// Loads a plugin by name from the search directories (see the crate docs
    /// for the order and file names).
    pub fn load_name(&mut self, name: &str) -> Result<PluginHandle, HostError> {
        let candidates = library_file_names(name);
        let searched = self.search_dirs();
        for dir in &searched {
            for file in &candidates {
                let path = dir.join(file);
                if path.is_file() {
                    return self.load_path(path);
                }
            }
        }
        Err(HostError::NotFound {
            name: name.to_string(),
            candidates,
            searched,
        })
    }

    /// Loads a plugin library by path: open, find the entry symbol, check the
    /// ABI version, fetch and check the manifest, register. With
    /// [`Isolation::Process`] (the default) all of that but the registration
    /// happens in a new worker process, which serves the plugin's calls from
    /// then on; in process, the library stays loaded for the life of the
    /// process, even when loading fails later on.
    pub fn load_path(&mut self, path: impl AsRef<Path>) -> Result<PluginHandle, HostError> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(HostError::NotFound {
                name: path.display().to_string(),
                candidates: path
                    .file_name()
                    .map(|n| vec![n.to_string_lossy().into_owned()])
                    .unwrap_or_default(),
                searched: path
                    .parent()
                    .map(|p| vec![p.to_path_buf()])
                    .unwrap_or_default(),
            });
        }
        let backend = match self.isolation {
            Isolation::InProcess => Backend::Dynamic {
                table: dylib::open_library(&path).map_err(|s| dylib::load_error(&path, s))?,
                max_reply_len: self.max_frame_len,
            },
            Isolation::Process => Backend::Isolated(Box::new(Isolated::start(
                &path,
                self.worker_config(&path)?,
            )?)),
        };
        let manifest = fetch_manifest(&backend, &path.display().to_string())?;
        if let Backend::Isolated(worker) = &backend {
            worker.set_manifest(manifest.clone());
        }
        self.register(manifest, PluginSource::Dynamic(path), backend)
    }

    /// Registers a plugin linked into this binary (a plugin crate used as an
    /// rlib): `host.register_static(legora_plugin_medical::MedicalPlugin)`.
    /// It behaves exactly like the same plugin loaded dynamically.
    pub fn register_static(&mut self, plugin: impl Plugin) -> Result<PluginHandle, HostError> {
        self.register_boxed(Box::new(plugin))
    }

    /// [`PluginHost::register_static`] for a boxed trait object.
    pub fn register_boxed(&mut self, plugin: Box<dyn Plugin>) -> Result<PluginHandle, HostError> {
        let backend = Backend::Static(plugin);
        let manifest = fetch_manifest(&backend, "static plugin")?;
        self.register(manifest, PluginSource::Static, backend)
    }

    fn register(
        &mut self,
        manifest: Manifest,
        source: PluginSource,
        backend: Backend,
    ) -> Result<PluginHandle, HostError> {
        let new = source.to_string();
        if let Some(existing) = self.plugins.iter().find(|p| p.name() == manifest.name) {
            return Err(HostError::Duplicate {
                kind: "plugin",
                name: manifest.name.clone(),
                existing: existing.source().to_string(),
                new,
            });
        }
        check_manifest(&manifest, &new)?;
        let handle = PluginHandle(Arc::new(Inner {
            manifest,
            source,
            backend,
        }));
        let plugin = handle.name().to_string();
        for info in &handle.manifest().formats {
            let name = format!("{plugin}/{}", info.name);
            self.formats.insert(
                name.clone(),
                Format {
                    name,
                    info: info.clone(),
                    plugin: handle.clone(),
                },
            );
        }
        for info in &handle.manifest().evaluators {
            let name = format!("{plugin}/{}", info.name);
            self.evaluators.insert(
                name.clone(),
                Evaluator {
                    name,
                    info: info.clone(),
                    plugin: handle.clone(),
                },
            );
        }
        for info in &handle.manifest().presets {
            self.presets.insert(
                format!("{plugin}/{}", info.name),
                (info.clone(), handle.clone()),
            );
        }
        for info in &handle.manifest().experts {
            self.experts.insert(
                format!("{plugin}/{}", info.name),
                (info.clone(), handle.clone()),
            );
        }
        self.plugins.push(handle.clone());
        Ok(handle)
    }

    /// Loaded plugins, in load order.
    pub fn plugins(&self) -> &[PluginHandle] {
        &self.plugins
    }

    /// A plugin by name.
    pub fn plugin(&self, name: &str) -> Result<&PluginHandle, HostError> {
        self.plugins
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| HostError::Unknown {
                kind: "plugin",
                name: name.to_string(),
                known: self.plugins.iter().map(|p| p.name().to_string()).collect(),
            })
    }

    /// Qualified names of all formats, sorted.
    pub fn format_names(&self) -> Vec<String> {
        self.formats.keys().cloned().collect()
    }

    /// Qualified names of all evaluators, sorted.
    pub fn evaluator_names(&self) -> Vec<String> {
        self.evaluators.keys().cloned().collect()
    }

    /// Qualified names of all presets, sorted.
    pub fn preset_names(&self) -> Vec<String> {
        self.presets.keys().cloned().collect()
    }

    /// A format by qualified name (`medical/medqa`).
    pub fn format(&self, name: &str) -> Result<&Format, HostError> {
        self.formats.get(name).ok_or_else(|| HostError::Unknown {
            kind: "format",
            name: name.to_string(),
            known: self.format_names(),
        })
    }

    /// An evaluator by qualified name (`finance/fraud`).
    pub fn evaluator(&self, name: &str) -> Result<&Evaluator, HostError> {
        self.evaluators.get(name).ok_or_else(|| HostError::Unknown {
            kind: "evaluator",
            name: name.to_string(),
            known: self.evaluator_names(),
        })
    }

    /// Description of a preset by qualified name.
    pub fn preset_info(&self, name: &str) -> Result<&PresetInfo, HostError> {
        self.presets
            .get(name)
            .map(|(info, _)| info)
            .ok_or_else(|| self.unknown_preset(name))
    }

    /// Fetches a preset by qualified name (`game-npc/persona`).
    pub fn preset(&self, name: &str) -> Result<Preset, HostError> {
        let (info, plugin) = self
            .presets
            .get(name)
            .ok_or_else(|| self.unknown_preset(name))?;
        plugin.preset(&info.name)
    }

    /// Qualified names of all shipped experts, sorted.
    pub fn expert_names(&self) -> Vec<String> {
        self.experts.keys().cloned().collect()
    }

    /// Description of a shipped expert by qualified name (`medical/demo-specialty`).
    pub fn expert_info(&self, name: &str) -> Result<&ExpertInfo, HostError> {
        self.experts
            .get(name)
            .map(|(info, _)| info)
            .ok_or_else(|| self.unknown_expert(name))
    }

    /// Fetches a shipped expert's files by qualified name.
    pub fn expert(&self, name: &str) -> Result<ExpertFiles, HostError> {
        let (info, plugin) = self
            .experts
            .get(name)
            .ok_or_else(|| self.unknown_expert(name))?;
        plugin.expert(&info.name)
    }

    fn unknown_expert(&self, name: &str) -> HostError {
        HostError::Unknown {
            kind: "expert",
            name: name.to_string(),
            known: self.expert_names(),
        }
    }

    fn unknown_preset(&self, name: &str) -> HostError {
        HostError::Unknown {
            kind: "preset",
            name: name.to_string(),
            known: self.preset_names(),
        }
    }

    /// Reads and parses a file with a format given by qualified name.
    pub fn parse_file(
        &self,
        format: &str,
        path: impl AsRef<Path>,
        options: &ParseOptions,
    ) -> Result<ParseOutput, HostError> {
        self.format(format)?.parse_file(path, options)
    }

    /// Parses bytes with a format given by qualified name.
    pub fn parse_bytes(
        &self,
        format: &str,
        file_name: &str,
        data: Vec<u8>,
        options: &ParseOptions,
    ) -> Result<ParseOutput, HostError> {
        self.format(format)?.parse_bytes(file_name, data, options)
    }

    /// Evaluates with an evaluator given by qualified name.
    pub fn evaluate(&self, evaluator: &str, request: EvalRequest) -> Result<EvalOutput, HostError> {
        self.evaluator(evaluator)?.evaluate(request)
    }
}

/// File names tried for a plugin name in each search directory.
pub fn library_file_names(name: &str) -> Vec<String> {
    let stem = name.replace('-', "_");
    let (pre, suf) = (env::consts::DLL_PREFIX, env::consts::DLL_SUFFIX);
    let mut names = Vec::new();
    if !stem.starts_with("legora_plugin_") {
        names.push(format!("{pre}legora_plugin_{stem}{suf}"));
    }
    names.push(format!("{pre}{stem}{suf}"));
    names
}

/// Entry symbols tried for a library file, in order: the one named after the
/// file's library name, then [`legora_plugin_api::ENTRY_SYMBOL_FALLBACK`].
pub fn entry_symbols(path: &Path) -> Vec<String> {
    let mut symbols = Vec::new();
    if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
        if let Some(bare) = stem.strip_prefix("lib") {
            symbols.push(abi::entry_symbol(bare));
        }
        symbols.push(abi::entry_symbol(stem));
    }
    symbols.push(legora_plugin_api::ENTRY_SYMBOL_FALLBACK.to_string());
    symbols.dedup();
    symbols
}

fn fetch_manifest(backend: &Backend, who: &str) -> Result<Manifest, HostError> {
    match call_backend(backend, who, Call::Manifest, &[])? {
        Reply::Manifest(manifest) => Ok(manifest),
        other => Err(HostError::MalformedResponse {
            plugin: who.to_string(),
            method: "manifest".into(),
            reason: format!("expected a `manifest` reply, got `{}`", other.kind()),
        }),
    }
}

fn check_manifest(manifest: &Manifest, source: &str) -> Result<(), HostError> {
    let malformed = |reason: String| HostError::MalformedResponse {
        plugin: manifest.name.clone(),
        method: "manifest".into(),
        reason,
    };
    if manifest.schema_version != SCHEMA_VERSION {
        return Err(malformed(format!(
            "manifest schema_version {}, this host reads {SCHEMA_VERSION}",
            manifest.schema_version
        )));
    }
    if !legora_plugin_api::is_valid_name(&manifest.name) {
        return Err(malformed(format!(
            "invalid plugin name `{}`",
            manifest.name
        )));
    }
    let kinds: [(&'static str, Vec<&str>); 4] = [
        (
            "format",
            manifest.formats.iter().map(|f| f.name.as_str()).collect(),
        ),
        (
            "evaluator",
            manifest
                .evaluators
                .iter()
                .map(|e| e.name.as_str())
                .collect(),
        ),
        (
            "preset",
            manifest.presets.iter().map(|p| p.name.as_str()).collect(),
        ),
        (
            "expert",
            manifest.experts.iter().map(|e| e.name.as_str()).collect(),
        ),
    ];
    for (kind, names) in kinds {
        let mut seen = std::collections::BTreeSet::new();
        for name in names {
            if !legora_plugin_api::is_valid_name(name) {
                return Err(malformed(format!("invalid {kind} name `{name}`")));
            }
            if !seen.insert(name) {
                return Err(HostError::Duplicate {
                    kind,
                    name: format!("{}/{name}", manifest.name),
                    existing: source.to_string(),
                    new: source.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use legora_plugin_api::{EvaluatorInfo, FormatInfo, PresetInfo};

    #[derive(Default)]
    struct Dup;

    impl Plugin for Dup {
        fn manifest(&self) -> Manifest {
            Manifest::new("dup", "0.0.0")
                .format(FormatInfo::new("x", ""))
                .format(FormatInfo::new("x", ""))
        }
    }

    struct Named(&'static str);

    impl Plugin for Named {
        fn manifest(&self) -> Manifest {
            Manifest::new(self.0, "0.0.0")
                .format(FormatInfo::new("f", ""))
                .evaluator(EvaluatorInfo::new("e", "", &[]))
                .preset(PresetInfo::new("p", ""))
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let mut host = PluginHost::new();
        let err = host.register_static(Dup).expect_err("duplicate format");
        assert!(
            matches!(err, HostError::Duplicate { kind: "format", .. }),
            "{err}"
        );
        host.register_static(Named("a")).expect("first");
        let err = host
            .register_static(Named("a"))
            .expect_err("duplicate plugin");
        assert!(
            matches!(err, HostError::Duplicate { kind: "plugin", .. }),
            "{err}"
        );
        host.register_static(Named("b")).expect("other name");
        assert_eq!(host.format_names(), vec!["a/f", "b/f"]);
        assert_eq!(host.evaluator_names(), vec!["a/e", "b/e"]);
        assert_eq!(host.preset_names(), vec!["a/p", "b/p"]);
        // the default preset impl answers UnknownPreset through the same path
        let err = host.preset("a/p").expect_err("not implemented");
        assert!(matches!(
            err,
            HostError::Plugin {
                source: PluginError::UnknownPreset { .. },
                ..
            }
        ));
        let err = host.format("a/nope").expect_err("unknown");
        assert!(err.to_string().contains("known: a/f, b/f"), "{err}");
    }

    #[test]
    fn handles_are_thread_safe() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<PluginHost>();
        send_sync::<PluginHandle>();
        send_sync::<Format>();
        send_sync::<Evaluator>();
        send_sync::<HostError>();
    }

    #[test]
    fn names_and_symbols() {
        let names = library_file_names("game-npc");
        assert!(names[0].contains("legora_plugin_game_npc"));
        let syms = entry_symbols(Path::new("/x/liblegora_plugin_medical.so"));
        assert_eq!(syms[0], "legora_plugin_entry_legora_plugin_medical");
        assert_eq!(syms.last().map(String::as_str), Some("legora_plugin_entry"));
    }

    #[test]
    fn load_errors_are_typed() {
        let mut host = PluginHost::new();
        // Unit tests have no worker program at hand: tests/isolation.rs covers
        // the same errors through workers.
        host.set_isolation(Isolation::InProcess);
        host.use_env_path(false).use_exe_dir(false);
        host.add_search_dir("/nonexistent-legora-dir");
        let err = host.load_name("medical").expect_err("missing");
        let text = err.to_string();
        assert!(matches!(err, HostError::NotFound { .. }));
        assert!(text.contains("/nonexistent-legora-dir"), "{text}");
        let dir = std::env::temp_dir().join(format!("legora-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let fake = dir.join(format!(
            "{}legora_plugin_fake{}",
            env::consts::DLL_PREFIX,
            env::consts::DLL_SUFFIX
        ));
        std::fs::write(&fake, b"not a library").expect("write");
        let err = host.load_path(&fake).expect_err("not loadable");
        assert!(matches!(err, HostError::NotLoadable { .. }), "{err}");
        host.add_search_dir(&dir);
        assert_eq!(host.discover(), vec![fake.clone()]);
        let err = host.load_name("fake").expect_err("not loadable");
        assert!(matches!(err, HostError::NotLoadable { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
