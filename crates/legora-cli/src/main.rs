//! `legora`: the command-line front end. One module per subcommand under `cmd/`.

#[macro_use]
mod text;
#[macro_use]
mod backend;
mod cmd;
mod progress;

use clap::{Parser, Subcommand};

/// Mixtures of LoRA experts on Hugging Face models.
#[derive(Debug, Parser)]
#[command(name = "legora", version, about)]
struct Cli {
    /// Load dynamic plugins into this process instead of a worker process each
    /// (faster calls; a crashing or hanging plugin then takes legora down).
    #[arg(long, global = true)]
    plugins_in_process: bool,
    /// The burn backend to run on: flex, ndarray, wgpu or cuda, among those compiled into
    /// this binary (default: the first compiled of cuda, wgpu, ndarray, flex).
    #[arg(long, global = true, value_parser = backend::Kind::parse)]
    backend: Option<backend::Kind>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mean token NLL and perplexity of a text file, as JSON.
    Score(cmd::score::Args),
    /// Train experts, router and baselines from a run file, then evaluate and report.
    Train(cmd::train::Args),
    /// The three-domain demo shipped with the repository (no download).
    Demo(cmd::demo::Args),
    /// Train a router over existing PEFT adapter folders (X-LoRA / LoRAHub style).
    Compose(cmd::compose::Args),
    /// Evaluate the trained outputs of a run file (no training).
    Eval(cmd::eval::Args),
    /// Complete a prompt or chat, with an adapter, a mixture or weighted adapters.
    Generate(cmd::generate::Args),
    /// Merge a PEFT adapter into its base and write a plain Hugging Face folder.
    Merge(cmd::merge::Args),
    /// List the plugins found in the search folders and what they register.
    Plugins(cmd::plugins::Args),
    /// Describe a model, PEFT adapter or mixture folder.
    Inspect(cmd::inspect::Args),
    /// Training-step speed and peak memory on random-weight models.
    Bench(cmd::bench::Args),
    /// An OpenAI-compatible server with continuous batching over adapters and mixtures.
    Serve(cmd::serve::Args),
    /// Serve one plugin library to a legora process over stdin / stdout (started by
    /// legora itself for every dynamic plugin).
    #[command(hide = true)]
    PluginWorker {
        /// The plugin library.
        path: std::path::PathBuf,
    },
}

/// Plugin hosts created from here on run dynamic plugins in workers that are this same
/// binary (`legora plugin-worker <library>`), or in process with `--plugins-in-process`.
fn configure_plugins(in_process: bool) {
    use legora_plugin_host::{
        set_default_isolation, set_default_worker_command, worker, Isolation, WorkerCommand,
    };
    if let Ok(exe) = std::env::current_exe() {
        set_default_worker_command(WorkerCommand::new(exe).arg(worker::WORKER_SUBCOMMAND));
    }
    if in_process {
        set_default_isolation(Isolation::InProcess);
    }
}

/// Keep freed tensor buffers in the heap instead of returning them to the kernel:
/// training allocates and frees the same large activation buffers every step, and with
/// glibc's defaults each one comes back as fresh pages (a page fault and a clear per 4 KiB;
/// measured 3–5% of a CPU training step). Buffers up to glibc's largest mmap threshold
/// (32 MiB) are reused; the top of the heap is trimmed only above 512 MiB free.
/// `MALLOC_*_` environment variables still override these, as glibc documents.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let from_env = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only changes allocator tuning parameters; called before any
        // thread is started.
        unsafe {
            if !from_env("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !from_env("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            }
            if !from_env("MALLOC_TOP_PAD_") {
                libc::mallopt(libc::M_TOP_PAD, 64 << 20);
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEGORA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    configure_plugins(cli.plugins_in_process);
    let kind = cli.backend.unwrap_or_else(backend::Kind::default_compiled);
    if !matches!(
        cli.command,
        Command::Plugins(_) | Command::PluginWorker { .. }
    ) {
        tracing::info!(backend = %kind, "backend");
    }
    let result = match cli.command {
        Command::Score(args) => on_backend!(kind, cmd::score::run(args)),
        Command::Train(args) => on_backend!(kind, cmd::train::run(args)),
        Command::Demo(args) => on_backend!(kind, cmd::demo::run(args)),
        Command::Compose(args) => on_backend!(kind, cmd::compose::run(args)),
        Command::Eval(args) => on_backend!(kind, cmd::eval::run(args)),
        Command::Generate(args) => on_backend!(kind, cmd::generate::run(args)),
        Command::Merge(args) => on_backend!(kind, cmd::merge::run(args)),
        Command::Plugins(args) => cmd::plugins::run(args),
        Command::Inspect(args) => on_backend!(kind, cmd::inspect::run(args)),
        Command::Bench(args) => on_backend!(kind, cmd::bench::run(args)),
        Command::Serve(args) => on_backend!(kind, cmd::serve::run(args)),
        // Nothing above writes to stdout: it carries the worker's replies.
        Command::PluginWorker { path } => return legora_plugin_host::worker::run(&path),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each message once: a cause whose text its
/// parent's message already embeds (thiserror's `"{path}: {source}"` variants) is not
/// repeated, so the line never reads "X: X".
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    /// Like a thiserror `#[error("{path}: {source}")]` variant.
    #[derive(Debug)]
    struct Outer {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_embedded_in_its_parent_is_printed_once() {
        let inner = std::io::Error::other("invalid value");
        let e = anyhow::Error::new(Outer {
            path: "q_proj".into(),
            source: inner,
        })
        .context("loading the adapter");
        assert_eq!(
            super::error_chain(&e),
            "loading the adapter: q_proj: invalid value"
        );
    }
}
