//! `legora train`: run every stage of a run file (experts → router → eval) and write
//! the experts, the mixture, the report, plots and metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use legora::data::stable_hash;
use legora::train::{run_pipeline, DistributedConfig, Peer, PipelineOptions, RunConfig};
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
    /// How to train together with other processes.
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

/// Data-parallel training: start `legora train` once per rank with the same run file
/// (and the same output folder, on a file system every rank sees).
#[derive(Debug, clap::Args)]
pub struct DistributedArgs {
    /// Number of processes training together (each takes `batch_size` rows of every
    /// batch; their gradients are summed before each step).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub world_size: u32,
    /// This process's rank: 0 coordinates and writes every output, 1.. only train.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// `host:port` that rank 0 listens on and the other ranks connect to.
    #[arg(long, default_value = "127.0.0.1:29500")]
    pub coordinator: String,
    /// Seconds a rank waits for a peer (to join, and at every step) before stopping
    /// with an error.
    #[arg(long, default_value_t = 600.0)]
    pub peer_timeout: f64,
}

impl DistributedArgs {
    /// Join the run (`None` for one process).
    fn connect(&self, run_file: &std::path::Path) -> anyhow::Result<Option<Arc<Peer>>> {
        if self.world_size == 1 && self.rank == 0 {
            return Ok(None);
        }
        let timeout = Duration::try_from_secs_f64(self.peer_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .with_context(|| {
                format!(
                    "--peer-timeout {}: expected a number of seconds > 0",
                    self.peer_timeout
                )
            })?;
        let cfg = DistributedConfig {
            world_size: self.world_size as usize,
            rank: self.rank as usize,
            coordinator: self.coordinator.clone(),
            timeout,
        };
        let text =
            std::fs::read(run_file).with_context(|| format!("reading {}", run_file.display()))?;
        let fingerprint = stable_hash(&String::from_utf8_lossy(&text));
        tracing::info!(
            rank = cfg.rank,
            world_size = cfg.world_size,
            coordinator = %cfg.coordinator,
            "joining the data-parallel run"
        );
        Ok(Some(Arc::new(Peer::connect(&cfg, fingerprint)?)))
    }
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
    let peer = args.distributed.connect(&args.config)?;
    let opts = PipelineOptions {
        peer: peer.clone(),
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
    if let Some(p) = peer.filter(|p| !p.is_writer()) {
        outln!(
            "rank {} of {}: training done; rank 0 writes the outputs to {}",
            p.rank(),
            p.world_size(),
            crate::text::tidy(&out).display()
        );
        return Ok(());
    }
    outln!("{}", report.to_markdown());
    outln!("outputs written to {}", crate::text::tidy(&out).display());
    Ok(())
}
