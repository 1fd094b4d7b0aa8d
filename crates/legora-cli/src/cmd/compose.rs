//! `legora compose`: train a router over existing PEFT adapter folders (X-LoRA /
//! LoRAHub style) or experts that plugins ship (`medical/demo-specialty`). Expert `i`
//! becomes the expert of the run file's `[[tasks]]` entry `i`;
//! the router stage, the single-LoRA baseline and the evaluation then run as in
//! `legora train`, and the mixture is written to the run's output folder.

use std::path::PathBuf;

use anyhow::Context;

use legora::train::{run_pipeline, Mode, PipelineOptions, RunConfig};

use crate::cmd::train::{load_plugins, Progress};
use burn::tensor::backend::Backend;
use legora::backend::Autodiff;

/// Arguments of `legora compose`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// PEFT adapter folders, or `<plugin>/<expert>` names of experts a plugin ships
    /// (`legora plugins` lists them), one per `[[tasks]]` entry, in the same order.
    #[arg(long, num_args = 1.., required = true)]
    pub experts: Vec<PathBuf>,
    /// The run file (tasks, router stage, evaluation; its `experts` stage is not run).
    #[arg(long)]
    pub config: PathBuf,
    /// Extra plugin folders (searched before LEGORA_PLUGIN_PATH and the binary's folder).
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Continue the stages from their latest checkpoints.
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

/// Run `legora compose`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
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
    let mut host = load_plugins(&cfg, &args.plugin_dirs)?;
    for e in args.experts.iter().filter(|d| !d.is_dir()) {
        let name = e.to_string_lossy();
        let plugin = match name.split_once('/') {
            Some((p, expert)) if !p.is_empty() && !expert.is_empty() && !expert.contains('/') => p,
            _ => anyhow::bail!("--experts {}: no such folder", e.display()),
        };
        if host.plugin(plugin).is_err() {
            host.load_name(plugin).with_context(|| {
                format!(
                    "--experts {}: not a folder, and no plugin `{plugin}` to ship it",
                    e.display()
                )
            })?;
        }
    }
    let opts = PipelineOptions {
        resume: args.resume,
        stop_after: args.stop_after,
        skip_eval: args.skip_eval,
        overwrite: args.overwrite,
        mode: Mode::Compose(args.experts.clone()),
        load_options: args.load.options(),
        peer: None,
    };
    let mut progress = Progress::default();
    let report =
        run_pipeline::<Autodiff<B>>(&cfg, &host, &opts, &mut progress, &Default::default())?;
    outln!("{}", report.to_markdown());
    outln!(
        "outputs written to {}",
        crate::text::tidy(&cfg.output_dir()).display()
    );
    Ok(())
}
