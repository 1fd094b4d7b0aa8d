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
    /// A base model instead of the bundled toy one: an HF folder, a .gguf file or the
    /// repo id of a model in the Hugging Face cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Optimizer steps of the experts stage (and of the single-LoRA baseline).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Option<u64>,
    /// Optimizer steps of the router stage.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub router_steps: Option<u64>,
    /// Longest training sequence in tokens.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub max_seq_len: Option<u64>,
    /// Held-out samples evaluated per task (and per model variant).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_samples: Option<u64>,
    /// Where the outputs go (default: the run file's, out/demo).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

impl Args {
    /// The run file with the flags' overrides; paths given on the command line are
    /// relative to the working folder, not to the run file.
    fn apply(&self, cfg: &mut RunConfig) -> anyhow::Result<()> {
        let cwd = std::env::current_dir().context("reading the working folder")?;
        if let Some(m) = &self.model {
            let p = std::path::Path::new(m);
            let value = if p.exists() {
                cwd.join(p).display().to_string()
            } else {
                m.clone() // a repo id, resolved in the Hugging Face cache
            };
            cfg.set_model_path(value);
        }
        let f = &mut cfg.file;
        if let Some(n) = self.steps {
            f.stages.experts.max_steps = Some(n as usize);
        }
        if let Some(n) = self.router_steps {
            f.stages.router.max_steps = Some(n as usize);
        }
        if let Some(n) = self.max_seq_len {
            f.model.max_seq_len = n as usize;
        }
        if let Some(n) = self.eval_samples {
            f.stages.eval.max_samples = Some(n as usize);
        }
        if let Some(d) = &self.output_dir {
            f.output_dir = Some(cwd.join(d).display().to_string());
        }
        Ok(())
    }
}

/// Run `legora demo`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let mut cfg = RunConfig::load(&args.config).with_context(|| {
        format!(
            "the demo run file {} (run `legora demo` from the repository root, or pass --config)",
            args.config.display()
        )
    })?;
    args.apply(&mut cfg)?;
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
