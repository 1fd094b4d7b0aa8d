//! `legora demo`: the three-domain run shipped with the repository — a tiny Llama base
//! (`demo/base`, made by `demo/make_base.py`), the medical, finance and game-NPC
//! plugins' sample data, experts → router → eval → report. No download.

use std::path::PathBuf;

use anyhow::Context;
use legora::train::{run_pipeline, PipelineOptions, RunConfig};

use crate::cmd::train::{load_plugins, Progress};
use burn::tensor::backend::Backend;
use legora::backend::Autodiff;

/// Arguments of `legora demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The demo run file.
    #[arg(long, default_value = "demo/demo.toml")]
    pub config: PathBuf,
    /// Extra plugin folders.
    #[arg(long = "plugin-dir")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Continue from the latest checkpoints.
    #[arg(long)]
    pub resume: bool,
    /// How the base's frozen weights are stored (e.g. `--quantize nf4 --double-quant`:
    /// the demo over a QLoRA base).
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
}

/// Run `legora demo`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config).with_context(|| {
        format!(
            "the demo run file {} (run `legora demo` from the repository root, or pass --config)",
            args.config.display()
        )
    })?;
    let host = load_plugins(&cfg, &args.plugin_dirs)?;
    // the demo's outputs are disposable: a second `legora demo` starts over
    let opts = PipelineOptions {
        resume: args.resume,
        overwrite: !args.resume,
        load_options: args.load.options(),
        ..PipelineOptions::default()
    };
    let mut progress = Progress::default();
    let t0 = std::time::Instant::now();
    let report =
        run_pipeline::<Autodiff<B>>(&cfg, &host, &opts, &mut progress, &Default::default())?;
    outln!("{}", report.to_markdown());
    outln!(
        "demo finished in {:.1} min; outputs in {}",
        t0.elapsed().as_secs_f64() / 60.0,
        crate::text::tidy(&cfg.output_dir()).display()
    );
    Ok(())
}
