//! `legora compose`: train a router over existing PEFT adapter folders (X-LoRA /
//! LoRAHub style). Folder `i` becomes the expert of the run file's `[[tasks]]` entry `i`;
//! the router stage, the single-LoRA baseline and the evaluation then run as in
//! `legora train`, and the mixture is written to the run's output folder.

use std::path::PathBuf;

use legora::train::{run_pipeline, Mode, PipelineOptions, RunConfig};

use crate::backend::{device, TrainBackend};
use crate::cmd::train::{load_plugins, Progress};

/// Arguments of `legora compose`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// PEFT adapter folders, one per `[[tasks]]` entry, in the same order.
    #[arg(long, num_args = 1.., required = true)]
    pub experts: Vec<PathBuf>,
    /// The run file (tasks, router stage, evaluation; its `experts` stage is not run).
    #[arg(long)]
    pub config: PathBuf,
    /// Extra plugin folders (searched before LEGORA_PLUGIN_PATH and the binary's folder).
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Continue the stages from their latest checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// Stop each stage after this many optimizer steps (a checkpoint is kept).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Skip the evaluation stage.
    #[arg(long)]
    pub skip_eval: bool,
}

/// Run `legora compose`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let tasks = cfg.task_names();
    if args.experts.len() != tasks.len() {
        anyhow::bail!(
            "{} expert folders given, but {} has {} [[tasks]] entries ({}): pass one adapter \
             folder per task, in the same order",
            args.experts.len(),
            args.config.display(),
            tasks.len(),
            tasks.join(", ")
        );
    }
    if let Some(missing) = args.experts.iter().find(|d| !d.is_dir()) {
        anyhow::bail!("--experts {}: no such folder", missing.display());
    }
    let host = load_plugins(&cfg, &args.plugin_dirs)?;
    let opts = PipelineOptions {
        resume: args.resume,
        stop_after: args.stop_after,
        skip_eval: args.skip_eval,
        mode: Mode::Compose(args.experts.clone()),
        load_options: args.load.options()?,
    };
    let mut progress = Progress::default();
    let report = run_pipeline::<TrainBackend>(&cfg, &host, &opts, &mut progress, &device())?;
    println!("{}", report.to_markdown());
    println!("outputs written to {}", cfg.output_dir().display());
    Ok(())
}
