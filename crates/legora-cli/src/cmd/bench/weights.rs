//! The benchmark's random model, generated straight into the frozen weights' storage (a
//! block of rows at a time, in parallel; no f32 copy of the model ever exists), and the
//! memory a case needs at the least, checked before anything is allocated.

use anyhow::{anyhow, Context};
use burn::tensor::backend::Backend;
use legora::data::{derive_seed, stable_hash, Rng};
use legora::hub::LoadOptions;
use legora::kernels::quant::{Format, QuantMatrix, RowBlocks};
use legora::models::{CausalLm, ModelConfig, SourceError};
use rayon::prelude::*;

/// Standard deviation of the random projections and embeddings.
pub const INIT_STD: f64 = 0.02;

/// A random model of `config` whose frozen weights are stored as `options` says for
/// each name: normal(0, [`INIT_STD`]) values from a counter-based stream (`seed`, the
/// weight's name, the row block), so the same seed gives the same model in any storage
/// and on any number of threads.
pub fn random_model<B: Backend>(
    config: ModelConfig,
    options: &LoadOptions,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<CausalLm<B>> {
    let mut make = |name: &str, [rows, cols]: [usize; 2]| {
        random_weight(name, (rows, cols), options.format_of(name), seed)
    };
    B::seed(device, seed);
    CausalLm::random_frozen(config, INIT_STD, &mut make, device)
        .context("building the random model")
}

/// One `[rows, cols]` weight in `format`, its row blocks generated and quantized in
/// parallel, one block per thread at a time (memory: the weight and those blocks).
fn random_weight(
    name: &str,
    (rows, cols): (usize, usize),
    format: Format,
    seed: u64,
) -> Result<QuantMatrix, SourceError> {
    let step = RowBlocks::row_block(cols);
    let stream = derive_seed(seed, &[stable_hash(name)]);
    let mut out = RowBlocks::new(name, (rows, cols), format)?;
    let blocks: Vec<usize> = (0..rows.div_ceil(step)).collect();
    for wave in blocks.chunks(rayon::current_num_threads().max(1)) {
        let done = wave
            .par_iter()
            .map(|&b| {
                let (row0, n) = (b * step, step.min(rows - b * step));
                let mut rng = Rng::new(derive_seed(stream, &[b as u64]));
                let w = normals(&mut rng, n * cols);
                QuantMatrix::quantize(name, &w, n, cols, format.without_double_quant())
                    .map_err(|e| format!("rows {row0}..{}: {e}", row0 + n))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for block in done {
            out.push(block)?;
        }
    }
    Ok(out.finish()?)
}

/// `n` normal(0, [`INIT_STD`]) samples (Box–Muller, both values of each pair).
fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = 1.0 - rng.next_f64(); // (0, 1]
        let (sin, cos) = (std::f64::consts::TAU * rng.next_f64()).sin_cos();
        let r = (-2.0 * u1.ln()).sqrt() * INIT_STD;
        out.extend([(r * cos) as f32, (r * sin) as f32]);
    }
    out.truncate(n);
    out
}

/// What a case needs at the least, in bytes: its frozen weights in their storage, and
/// per token the logits and their gradient (f32) and each decoder layer's input (what
/// even gradient checkpointing keeps).
#[derive(Debug, Clone, Copy)]
pub struct MemoryNeed {
    /// The frozen weights.
    pub weights: u128,
    /// Activations of one step.
    pub activations: u128,
}

impl MemoryNeed {
    /// The need of `config` stored as `options`, for steps of `tokens` tokens.
    pub fn of(config: &ModelConfig, options: &LoadOptions, tokens: usize) -> Self {
        let weights = config
            .frozen_weights()
            .iter()
            .map(|(name, (rows, cols))| {
                let format = options.format_of(name);
                let elements = *rows as u128 * *cols as u128;
                format
                    .bytes(*rows, *cols)
                    .map_or(4 * elements, |b| b as u128)
            })
            .sum();
        let per_token = 8 * config.vocab_size as u128
            + 4 * (config.hidden_size * config.num_hidden_layers) as u128
            + 32;
        MemoryNeed {
            weights,
            activations: tokens as u128 * per_token,
        }
    }

    /// The whole need.
    pub fn total(&self) -> u128 {
        self.weights + self.activations
    }

    /// An error when the need exceeds `limit_mb` (`--memory-limit`), else the memory the
    /// system reports available; nothing is checked where neither is known.
    pub fn check(&self, limit_mb: Option<u64>, storage: &str, tokens: usize) -> anyhow::Result<()> {
        let (limit, source) = match limit_mb {
            Some(mb) => (u128::from(mb) << 20, "--memory-limit".to_string()),
            None => match available_bytes() {
                Some(b) => (b, "MemAvailable in /proc/meminfo".to_string()),
                None => return Ok(()),
            },
        };
        if self.total() <= limit {
            return Ok(());
        }
        Err(anyhow!(
            "needs at least {} MiB: frozen weights {} MiB ({storage}), activations {} MiB \
             for {tokens} tokens per step; {} MiB available ({source}). Use a smaller \
             --shape, --batch or --seq, or --quantize nf4",
            mib(self.total()),
            mib(self.weights),
            mib(self.activations),
            mib(limit)
        ))
    }
}

fn mib(bytes: u128) -> u128 {
    bytes.div_ceil(1 << 20)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_bytes() -> Option<u128> {
    proc_kb("/proc/meminfo", "MemAvailable").map(|kb| u128::from(kb) * 1024)
}

/// The `key: N kB` line of a `/proc` file (`/proc/meminfo`, `/proc/self/status`), in kB.
pub(super) fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(file).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
