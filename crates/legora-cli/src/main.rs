//! `legora`: the command-line front end. One module per subcommand under `cmd/`.

mod backend;
mod cmd;

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
