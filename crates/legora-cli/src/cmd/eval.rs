//! `legora eval`: evaluation only — the mixture (and the `single_lora` baseline, when
//! present) already trained in the run's output folder, against the base model, through
//! each task's plugin evaluator; rewrites `report.json`, `report.md` and the plots.

use std::path::PathBuf;

use legora::train::{run_pipeline, Mode, PipelineOptions, RunConfig};

use crate::cmd::train::{load_plugins, Progress};
use burn::tensor::backend::Backend;
use legora::backend::Autodiff;

/// Arguments of `legora eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// The run file whose output folder holds the trained mixture.
    #[arg(long)]
    pub config: PathBuf,
    /// Extra plugin folders (searched before LEGORA_PLUGIN_PATH and the binary's folder).
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
}

/// Run `legora eval`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let host = load_plugins(&cfg, &args.plugin_dirs)?;
    let opts = PipelineOptions {
        mode: Mode::EvalOnly,
        load_options: args.load.options(),
        ..PipelineOptions::default()
    };
    let mut progress = Progress::default();
    let report =
        run_pipeline::<Autodiff<B>>(&cfg, &host, &opts, &mut progress, &Default::default())?;
    outln!("{}", report.to_markdown());
    outln!("report written to {}", cfg.output_dir().display());
    Ok(())
}
