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
}

fn main() -> std::process::ExitCode {
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
