//! `legora serve`: an OpenAI-compatible server over a model folder, PEFT adapters and
//! mixtures, with continuous batching (see the `legora-serve` crate).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use legora::hub::PretrainedModel;

use burn::tensor::backend::Backend;

/// Arguments of `legora serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The base model's name in the API (default: the folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// A PEFT adapter folder served as model `name` (repeatable).
    #[arg(long, value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// A legora mixture folder served as model `name` (routed), its experts as
    /// `name/<expert>` (repeatable).
    #[arg(long, value_name = "NAME=DIR")]
    pub moe: Vec<String>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// Require `Authorization: Bearer <key>` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Folders `POST /v1/adapters` may load adapters from (repeatable; none: run-time
    /// loading is off).
    #[arg(long)]
    pub adapter_dir: Vec<PathBuf>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// Requests waiting for a seat at most; beyond, 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// `max_tokens` a request may ask for at most.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Request bodies above this many bytes get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// New tokens of one step at most (prefill chunks and decoding rows).
    #[arg(long, default_value_t = 256)]
    pub step_tokens: usize,
    /// Prompt tokens of one sequence per step at most.
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// MiB of adapters loaded at run time at most (least recently used evicted).
    #[arg(long, default_value_t = 256)]
    pub adapter_memory_mib: usize,
}

/// `NAME=DIR`.
fn named(flag: &str, s: &str) -> anyhow::Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok((n.to_string(), PathBuf::from(d))),
        _ => bail!("--{flag} {s}: expected NAME=DIR"),
    }
}

/// Run `legora serve` until the process is stopped.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let model = PretrainedModel::<B>::from_pretrained(&args.model, &Default::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut opts = legora_serve::ServeOptions::new(args.addr);
    opts.base_name = args.name.clone();
    opts.adapters = args
        .adapter
        .iter()
        .map(|s| named("adapter", s))
        .collect::<anyhow::Result<_>>()?;
    opts.mixtures = args
        .moe
        .iter()
        .map(|s| named("moe", s))
        .collect::<anyhow::Result<_>>()?;
    opts.limits.api_key = args.api_key.clone();
    opts.limits.adapter_dirs = args.adapter_dir.clone();
    opts.limits.max_queue = args.max_queue;
    opts.limits.max_tokens = args.max_tokens;
    opts.limits.max_body_bytes = args.max_body_bytes;
    opts.engine.max_seqs = args.max_seqs.max(1);
    opts.engine.step_tokens = args.step_tokens.max(1);
    opts.engine.prefill_chunk = args.prefill_chunk.max(1);
    opts.engine.adapter_memory = args.adapter_memory_mib << 20;
    let server = legora_serve::start(model, opts)?;
    eprintln!(
        "legora serve: listening on http://{} (OpenAI API under /v1; /health, /metrics)",
        server.addr()
    );
    server.wait()?;
    Ok(())
}
