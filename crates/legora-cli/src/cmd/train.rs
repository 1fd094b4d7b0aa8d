//! `legora train`: run every stage of a run file (experts → router → eval) and write
//! the experts, the mixture, the report, plots and metrics.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use legora::train::{
    run_pipeline, EvalMetrics, PipelineOptions, RunConfig, StageSummary, TrainCallback,
    TrainMetrics,
};
use legora_plugin_host::PluginHost;

use crate::backend::{device, TrainBackend};

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
    #[arg(long)]
    pub resume: bool,
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

/// Progress bars (indicatif) with loss and tokens/s, one per stage.
#[derive(Default)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl TrainCallback for Progress {
    fn on_stage_start(&mut self, stage: &str, start_step: usize, total_steps: usize) {
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} steps  {msg}  ({elapsed} < {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        bar.set_position(start_step as u64);
        self.bar = Some(bar);
    }

    fn on_step(&mut self, m: &TrainMetrics) {
        if let Some(bar) = &self.bar {
            bar.set_position(m.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                m.loss, m.lr, m.tokens_per_second
            ));
        }
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        if let Some(bar) = &self.bar {
            bar.println(format!(
                "{:>12} step {:>5}: val_loss {:.4}{}",
                m.stage,
                m.step,
                m.val_loss,
                m.routing
                    .as_ref()
                    .and_then(|r| r.accuracy)
                    .map(|a| format!("  routing accuracy {a:.3}"))
                    .unwrap_or_default()
            ));
        }
    }

    fn on_stage_end(&mut self, s: &StageSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_with_message(format!("{:?}", s.stop));
        }
    }
}

/// Run `legora train`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let host = load_plugins(&cfg, &args.plugin_dirs)?;
    let opts = PipelineOptions {
        resume: args.resume,
        stop_after: args.stop_after,
        skip_eval: args.skip_eval,
        load_options: args.load.options()?,
        ..PipelineOptions::default()
    };
    let mut progress = Progress::default();
    let report = run_pipeline::<TrainBackend>(&cfg, &host, &opts, &mut progress, &device())?;
    let out = cfg.output_dir();
    println!("{}", report.to_markdown());
    println!("outputs written to {}", out.display());
    Ok(())
}
