//! `legora train`: run every stage of a run file (experts → router → eval) and write
//! the experts, the mixture, the report, plots and metrics.

use std::path::PathBuf;

use anyhow::Context;
use legora::train::{run_pipeline, PipelineOptions, RunConfig};
use legora_plugin_host::PluginHost;

pub use crate::progress::Progress;
use burn::tensor::backend::Backend;
use legora::backend::Autodiff;

/// Arguments of `legora train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// The run file (TOML; see docs/run-file.md).
    #[arg(long)]
    pub config: PathBuf,
    /// Extra plugin folders (searched before LEGORA_PLUGIN_PATH and the binary's folder).
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Continue every stage from its latest checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Delete the checkpoints of an earlier run in the output folder and start over
    /// (without it, or --resume, such a folder is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop each stage after this many optimizer steps (a checkpoint is kept).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Skip the evaluation stage.
    #[arg(long)]
    pub skip_eval: bool,
}

/// Load the plugins a run file names (`<plugin>/<format>`), from the search folders.
pub fn load_plugins(cfg: &RunConfig, dirs: &[PathBuf]) -> anyhow::Result<PluginHost> {
    let mut host = PluginHost::new();
    for d in dirs {
        host.add_search_dir(d);
    }
    let mut names: Vec<String> = cfg
        .file
        .tasks
        .iter()
        .filter_map(|t| t.format.split('/').next().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    for n in names {
        host.load_name(&n).with_context(|| {
            format!(
                "loading plugin `{n}` (build the bundled plugins with `cargo build --release --workspace`, \
                 or pass --plugin-dir)"
            )
        })?;
    }
    Ok(host)
}

/// Run `legora train`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let host = load_plugins(&cfg, &args.plugin_dirs)?;
    let opts = PipelineOptions {
        resume: args.resume,
        stop_after: args.stop_after,
        skip_eval: args.skip_eval,
        overwrite: args.overwrite,
        load_options: args.load.options(),
        ..PipelineOptions::default()
    };
    let mut progress = Progress::default();
    let report =
        run_pipeline::<Autodiff<B>>(&cfg, &host, &opts, &mut progress, &Default::default())?;
    let out = cfg.output_dir();
    outln!("{}", report.to_markdown());
    outln!("outputs written to {}", crate::text::tidy(&out).display());
    Ok(())
}
