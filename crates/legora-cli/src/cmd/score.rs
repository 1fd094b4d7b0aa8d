//! `legora score`: mean token NLL and perplexity of a text file under a model folder,
//! optionally with a PEFT adapter or a mixture folder. Prints
//! `{"mean_nll": …, "perplexity": …, "tokens": …, "backend": …}`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use legora::prelude::*;

use burn::tensor::backend::Backend;

/// Arguments of `legora score`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long, conflicts_with = "moe")]
    pub adapter: Option<PathBuf>,
    /// legora mixture folder (moe_config.json, router.safetensors, experts/).
    #[arg(long)]
    pub moe: Option<PathBuf>,
    /// Text file to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Longest window in tokens (default: max_position_embeddings, at most 2048); longer
    /// texts are scored in windows overlapping by one token.
    #[arg(long, value_parser = super::flags::token_count)]
    pub max_length: Option<usize>,
    /// Route every token to this expert of the mixture (needed for a mixture without
    /// routers).
    #[arg(long, requires = "moe")]
    pub task_id: Option<usize>,
}

/// Run `legora score`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let device = B::Device::default();
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading the text file {}", args.text.display()))?;
    let mut base = PretrainedModel::<B>::from_pretrained_with(
        &args.model,
        &device,
        &args.load.options_or_default(),
    )?;
    if let Some(dir) = &args.moe {
        let cfg = base.load_mixture(dir)?;
        if cfg.router.is_none() && args.task_id.is_none() {
            bail!(
                "{}: this mixture has no routers; pass --task-id (0..{}) to pick an expert",
                dir.display(),
                cfg.experts.len()
            );
        }
    }
    let ids = base.encode(&text)?;
    let max_length = args
        .max_length
        .unwrap_or_else(|| base.model.config().max_position_embeddings.min(2048));
    let score = match &args.adapter {
        Some(dir) => {
            let peft = PeftModel::from_pretrained(base, dir)?;
            peft.model().score(&ids, max_length, None)?
        }
        None => base.model.score(&ids, max_length, args.task_id)?,
    };
    tracing::info!(tokens = score.tokens, "scored {}", args.text.display());
    let mut json = serde_json::to_value(score)?;
    json["backend"] = B::name(&device).into();
    outln!("{json}");
    Ok(())
}
