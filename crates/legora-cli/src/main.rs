//! `legora`: the command-line front end. One module per subcommand under `cmd/`.

mod backend;
mod cmd;
mod text;

use clap::{Parser, Subcommand};

/// Mixtures of LoRA experts on Hugging Face models.
#[derive(Debug, Parser)]
#[command(name = "legora", version, about)]
struct Cli {
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
    /// Training-step speed and peak memory on random-weight models (issue 6 cases).
    Bench(cmd::bench::Args),
    /// An OpenAI-compatible server with continuous batching over adapters and mixtures.
    Serve(cmd::serve::Args),
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
    let result = match Cli::parse().command {
        Command::Score(args) => cmd::score::run(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Compose(args) => cmd::compose::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Plugins(args) => cmd::plugins::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Serve(args) => cmd::serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the error and its causes on one line, no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
