//! `legora bench`: training-step speed and peak memory on random-weight models
//! (`bench/compare_peft.py` runs the same cases in PyTorch + PEFT).
//!
//! A step is [`Trainer::step`], what `legora train` runs for one optimizer step: random
//! token ids with `labels = input_ids`, the shifted next-token loss, backward, global-norm
//! clipping at 1.0, one AdamW update. Warmup steps are run first and not timed. The CPU backend
//! is eager; on other backends the step ends with `Backend::sync`, so the clock stops
//! only once all of its work is done.
//!
//! The random model is generated straight into the storage of its frozen weights
//! (`--dtype`, `--quantize`), a block of rows at a time: no f32 copy of a quantized model
//! exists. Before anything is allocated, the memory the case needs at the least (frozen
//! weights, logits, each layer's input) is checked against the memory available.
//!
//! Peak memory is the process's peak resident set (`VmHWM` of `/proc/self/status`,
//! else `getrusage`). With several cases each runs in a fresh `legora bench` process, so
//! each peak is its own.

mod weights;

use std::time::Instant;

use anyhow::{anyhow, Context};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use legora::backend::Autodiff;
use legora::data::{derive_seed, Batch, Rng};
use legora::hub::LoadOptions;
use legora::models::{CausalLm, Config};
use legora::nn::{trainable_parameters, LoraConfig, Proj, RouterConfig};
use legora::train::{LmModel, Objective, ScheduleKind, TrainSettings, Trainer};
use serde_json::{json, Value};

/// A benchmark case (`--case`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaseName {
    /// Qwen2-shaped small model, LoRA r=8 on q_proj, v_proj.
    #[value(name = "S-qv")]
    SQv,
    /// The same with LoRA on all seven projections.
    #[value(name = "S-all")]
    SAll,
    /// 4 LoRA experts r=8 on all seven projections, a top-2 router per layer + aux loss.
    #[value(name = "S-moe")]
    SMoe,
    /// 3 task-routed experts trained in one run (batch 3 × batch rows), forward and
    /// backward per task within each step (`[data] backward_per_task`).
    #[value(name = "S-concurrent")]
    SConcurrent,
    /// The same with the whole 3 × batch rows in one forward and backward pass.
    #[value(name = "S-concurrent-batched")]
    SConcurrentBatched,
    /// The same 3 experts trained one after another (batch rows each, steps each).
    #[value(name = "S-concurrent-seq")]
    SConcurrentSeq,
    /// The GPU cases: LoRA r=8 on q_proj, v_proj over the M shape (Qwen2-0.5B), batch
    /// 8 × 512, bf16 frozen projections.
    #[value(name = "G-qv")]
    GQv,
    /// G-qv with LoRA on all seven projections.
    #[value(name = "G-all")]
    GAll,
    /// 3 task-routed experts (all seven projections) over the M shape, bf16 frozen
    /// projections, 1 × 256 rows each, forward and backward per task.
    #[value(name = "G-concurrent")]
    GConcurrent,
    /// S-qv on the tiny shape (hidden 32, 2 layers, vocab 64, batch 2 × seq 16).
    #[value(name = "tiny")]
    Tiny,
    /// S-qv, S-all, S-moe, S-concurrent, S-concurrent-batched, S-concurrent-seq.
    #[value(name = "all")]
    All,
}

/// Arguments of `legora bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cases to run, comma-separated or repeated: S-qv, S-all, S-moe, S-concurrent, S-concurrent-batched,
    /// S-concurrent-seq, G-qv, G-all, G-concurrent, tiny, or all (every S- case).
    #[arg(long, value_delimiter = ',', required = true)]
    pub case: Vec<CaseName>,
    /// Timed training steps per case (per expert for S-concurrent-seq).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Untimed steps before them (per expert for S-concurrent-seq).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// One JSON object per case on stdout (one line each) instead of a markdown table.
    #[arg(long)]
    pub json: bool,
    /// Rows per expert batch (default 4; tiny: 2).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: Option<u64>,
    /// Tokens per row (default 256; tiny: 16).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub seq: Option<u64>,
    /// Run every chosen case on the tiny model shape (a quick check of each code path).
    #[arg(long)]
    pub tiny: bool,
    /// Seed of the random weights, token ids and dropout masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage of the frozen weights that are not quantized, embeddings included
    /// (default: f32 for the S- cases, bf16 for G-); norms stay f32.
    #[arg(long, value_enum)]
    pub dtype: Option<crate::cmd::Dtype>,
    /// The quantization of the frozen decoder projections (embeddings and lm_head bf16).
    #[command(flatten)]
    pub quant: crate::cmd::QuantArgs,
    /// The model shape of every case: S (hidden 512, 8 layers), M (Qwen2-0.5B) or L
    /// (Qwen2-7B); batch and seq stay the case's unless given.
    #[arg(long, value_enum)]
    pub shape: Option<ShapeName>,
    /// A real model instead of random weights: an HF folder or a .gguf file, loaded in the
    /// storage --dtype / --quantize ask for (its shape replaces the case's; batches stay
    /// random token ids).
    #[arg(long, conflicts_with_all = ["shape", "tiny"])]
    pub model: Option<std::path::PathBuf>,
    /// Refuse a case whose least memory need exceeds this many MiB (default: the memory
    /// the system reports available).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_limit: Option<u64>,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (the run file's `model.gradient_checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

/// A model shape (`--shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShapeName {
    /// Qwen2-like, hidden 512, 8 layers, 8 / 2 heads, intermediate 1408, vocab 8192, tied.
    #[value(name = "S")]
    S,
    /// Qwen2-0.5B: hidden 896, 24 layers, 14 / 2 heads, intermediate 4864, vocab 151936,
    /// tied.
    #[value(name = "M")]
    M,
    /// Qwen2-7B: hidden 3584, 28 layers, 28 / 4 heads, intermediate 18944, vocab 152064,
    /// untied.
    #[value(name = "L")]
    L,
}

impl ShapeName {
    fn shape(self) -> Shape {
        match self {
            ShapeName::S => SMALL,
            ShapeName::M => MEDIUM,
            ShapeName::L => LARGE,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ShapeName::S => "S",
            ShapeName::M => "M",
            ShapeName::L => "L",
        }
    }
}

/// Model and batch sizes of a case.
#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab: usize,
    tied: bool,
    batch: usize,
    seq: usize,
}

impl Shape {
    /// This shape's model with `other`'s batch and sequence length.
    fn with_batch_of(self, other: Shape) -> Shape {
        Shape {
            batch: other.batch,
            seq: other.seq,
            ..self
        }
    }
}

/// The S- shape: Qwen2-like, hidden 512, 8 layers, 8 / 2 heads, batch 4 × 256.
const SMALL: Shape = Shape {
    hidden: 512,
    layers: 8,
    heads: 8,
    kv_heads: 2,
    intermediate: 1408,
    vocab: 8192,
    tied: true,
    batch: 4,
    seq: 256,
};

/// The M shape of the G- cases: Qwen2-0.5B (hidden 896, 24 layers, 14 / 2 heads,
/// intermediate 4864, vocab 151936, tied), batch 8 × 512.
const MEDIUM: Shape = Shape {
    hidden: 896,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    intermediate: 4864,
    vocab: 151_936,
    tied: true,
    batch: 8,
    seq: 512,
};

/// The L shape: Qwen2-7B (hidden 3584, 28 layers, 28 / 4 heads, intermediate 18944,
/// vocab 152064, untied), batch 1 × 256.
const LARGE: Shape = Shape {
    hidden: 3584,
    layers: 28,
    heads: 28,
    kv_heads: 4,
    intermediate: 18_944,
    vocab: 152_064,
    tied: false,
    batch: 1,
    seq: 256,
};

/// A shape for smoke tests (seconds in a debug build).
const TINY: Shape = Shape {
    hidden: 32,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 64,
    vocab: 64,
    tied: true,
    batch: 2,
    seq: 16,
};

/// What a case trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One LoRA adapter on these modules.
    Lora(&'static [Proj]),
    /// `experts` LoRA experts on all seven projections, top-k routers, aux loss.
    Moe { experts: usize, top_k: usize },
    /// `experts` task-routed experts in one run, `batch` rows each; forward and backward
    /// per task with `per_task`, else over the whole batch at once.
    Concurrent { experts: usize, per_task: bool },
    /// `experts` single-adapter runs one after another, `batch` rows each.
    Sequential { experts: usize },
}

/// The LoRA settings of every case: r = 8, alpha = 16, dropout 0.05.
fn lora_config(targets: &[Proj]) -> LoraConfig {
    let names: Vec<&str> = targets.iter().map(|p| p.hf_name()).collect();
    let mut c = LoraConfig::new(8, 16.0, &names);
    c.lora_dropout = 0.05;
    c
}

impl CaseName {
    fn expand(self) -> Vec<CaseName> {
        match self {
            CaseName::All => vec![
                CaseName::SQv,
                CaseName::SAll,
                CaseName::SMoe,
                CaseName::SConcurrent,
                CaseName::SConcurrentBatched,
                CaseName::SConcurrentSeq,
            ],
            c => vec![c],
        }
    }

    /// The case's model and batch shape, and the default storage of its frozen
    /// projections.
    fn shape(self) -> (Shape, crate::cmd::Dtype) {
        use crate::cmd::Dtype;
        match self {
            CaseName::GQv | CaseName::GAll => (MEDIUM, Dtype::Bf16),
            CaseName::GConcurrent => (
                Shape {
                    batch: 1,
                    seq: 256,
                    ..MEDIUM
                },
                Dtype::Bf16,
            ),
            CaseName::Tiny => (TINY, Dtype::F32),
            _ => (SMALL, Dtype::F32),
        }
    }

    fn label(self) -> &'static str {
        match self {
            CaseName::SQv => "S-qv",
            CaseName::SAll => "S-all",
            CaseName::SMoe => "S-moe",
            CaseName::SConcurrent => "S-concurrent",
            CaseName::SConcurrentBatched => "S-concurrent-batched",
            CaseName::SConcurrentSeq => "S-concurrent-seq",
            CaseName::GQv => "G-qv",
            CaseName::GAll => "G-all",
            CaseName::GConcurrent => "G-concurrent",
            CaseName::Tiny => "tiny",
            CaseName::All => "all",
        }
    }

    fn kind(self) -> Kind {
        match self {
            CaseName::SQv | CaseName::GQv | CaseName::Tiny | CaseName::All => {
                Kind::Lora(&[Proj::QProj, Proj::VProj])
            }
            CaseName::SAll | CaseName::GAll => Kind::Lora(&Proj::ALL),
            CaseName::SMoe => Kind::Moe {
                experts: 4,
                top_k: 2,
            },
            CaseName::SConcurrent | CaseName::GConcurrent => Kind::Concurrent {
                experts: 3,
                per_task: true,
            },
            CaseName::SConcurrentBatched => Kind::Concurrent {
                experts: 3,
                per_task: false,
            },
            CaseName::SConcurrentSeq => Kind::Sequential { experts: 3 },
        }
    }
}

/// The model config of a shape: Qwen2 (q/k/v bias), HF defaults.
fn model_config(s: &Shape) -> anyhow::Result<legora::models::ModelConfig> {
    let cfg = json!({
        "model_type": "qwen2",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": s.seq.max(1024),
        "tie_word_embeddings": s.tied,
    });
    Ok(Config::from_json(&cfg.to_string())?.resolve()?)
}

/// A batch of random token ids, `labels = input_ids`, no padding; row `r` belongs to
/// task `r / rows_per_task`.
fn random_batch(rng: &mut Rng, s: &Shape, rows: usize, rows_per_task: usize) -> Batch {
    let n = rows * s.seq;
    let input_ids: Vec<u32> = (0..n).map(|_| rng.below(s.vocab) as u32).collect();
    Batch {
        batch_size: rows,
        seq_len: s.seq,
        labels: input_ids.iter().map(|&t| t as i64).collect(),
        input_ids,
        attention_mask: vec![1; n],
        position_ids: (0..rows).flat_map(|_| 0..s.seq as u32).collect(),
        sequence_ids: vec![0; n],
        task_ids: (0..rows).map(|r| r / rows_per_task.max(1)).collect(),
    }
}

/// Rows of one step of a case with `batch` rows per expert.
fn case_rows(kind: Kind, batch: usize) -> usize {
    match kind {
        Kind::Concurrent { experts, .. } => batch.saturating_mul(experts),
        _ => batch,
    }
}

/// Timings of the timed steps of one training run.
#[derive(Debug, Default)]
struct Timings {
    /// Whole steps, seconds.
    steps: Vec<f64>,
    /// Per step: forward (+ loss read), backward, clipping, optimizer, seconds.
    phases: Vec<[f64; 4]>,
    /// Loss of the last step.
    last_loss: f64,
}

impl Timings {
    fn extend(&mut self, other: Timings) {
        self.steps.extend(other.steps);
        self.phases.extend(other.phases);
        self.last_loss = other.last_loss;
    }
}

/// Train `model` for `warmup + steps` steps on fresh random batches through
/// [`Trainer::step`] (what `legora train` runs for each optimizer step), timing the last
/// `steps`: forward + loss (read on the host), backward, global-norm clipping at 1.0,
/// AdamW at a constant lr 1e-4 (β = (0.9, 0.999), ε = 1e-8, weight decay 0.01 —
/// `torch.optim.AdamW`'s defaults).
fn train<B: AutodiffBackend>(
    model: LmModel<B>,
    mut next_batch: impl FnMut() -> Batch,
    warmup: usize,
    steps: usize,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<Timings>
where
    LmModel<B>: AutodiffModule<B>,
{
    let mut settings = TrainSettings::new(warmup + steps, seed);
    settings.learning_rate = 1e-4;
    settings.schedule = ScheduleKind::Constant;
    settings.weight_decay = 0.01;
    let trainer = Trainer::new("bench", std::env::temp_dir(), settings);
    let mut optim = trainer.optimizer::<B, LmModel<B>>();
    let mut model = model;
    let mut t = Timings::default();
    let mut next = || Ok(next_batch());
    for step in 0..warmup + steps {
        let (m, report) = trainer
            .step(model, &mut optim, step, &mut next, device)
            .map_err(|e| anyhow!("{e}"))?;
        model = m;
        if step >= warmup {
            let p = report.phases;
            t.steps.push(p.forward + p.backward + p.clip + p.optim);
            t.phases.push([p.forward, p.backward, p.clip, p.optim]);
        }
        t.last_loss = report.loss;
    }
    Ok(t)
}

/// Peak resident set of this process in MiB: `VmHWM` from `/proc/self/status`, else
/// `getrusage(RUSAGE_SELF).ru_maxrss`; `None` when neither is available.
fn peak_rss_mb() -> Option<f64> {
    match weights::proc_kb("/proc/self/status", "VmHWM") {
        Some(kb) => Some(kb as f64 / 1024.0),
        None => rusage_max_rss_mb(),
    }
}

#[cfg(unix)]
fn rusage_max_rss_mb() -> Option<f64> {
    // SAFETY: getrusage writes into the zeroed struct we own; no other effect.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let v = ru.ru_maxrss as f64;
    // kilobytes on Linux and the BSDs, bytes on macOS
    Some(if cfg!(target_os = "macos") {
        v / (1024.0 * 1024.0)
    } else {
        v / 1024.0
    })
}

#[cfg(not(unix))]
fn rusage_max_rss_mb() -> Option<f64> {
    None
}

/// Reset the peak resident set to the current one (Linux ≥ 4.0: write `5` to
/// `/proc/self/clear_refs`). Returns whether it worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Threads the CPU backend uses: `RAYON_NUM_THREADS`, else the available parallelism.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// How the loaded model keeps its frozen weights, as the report says it: what `options`
/// asked for, or, for a GGUF base that kept its blocks, their types (`"Q4_0 (GGUF blocks)"`,
/// `"Q5_0 / Q4_K / Q6_K projections, embeddings Q8_0 (GGUF blocks)"`: each projection type
/// in the order the layers first use it, as llama.cpp's mixes have several).
fn stored_as<B: burn::tensor::backend::Backend>(
    m: &legora::models::CausalLm<B>,
    options: &LoadOptions,
) -> String {
    use legora::kernels::quant::Format;
    let mut projections: Vec<Format> = Vec::new();
    for (_, slot) in m.slots() {
        if !projections.contains(&slot.format()) {
            projections.push(slot.format());
        }
    }
    let embed = m.model.embed_tokens.format();
    let names: Vec<&str> = projections.iter().map(|f| f.name()).collect();
    match projections[..] {
        [Format::Ggml(_)] if projections[0] == embed => format!("{} (GGUF blocks)", embed.name()),
        [Format::Ggml(_), ..] => format!(
            "{} projections, embeddings {} (GGUF blocks)",
            names.join(" / "),
            embed.name()
        ),
        _ => options.describe(),
    }
}

/// Run one case and return its JSON record.
fn run_case<B: AutodiffBackend>(
    case: CaseName,
    args: &Args,
    device: &B::Device,
) -> anyhow::Result<Value> {
    let device = device.clone();
    let tiny = args.tiny || case == CaseName::Tiny;
    let (case_shape, case_dtype) = case.shape();
    let mut shape = if tiny { TINY } else { case_shape };
    if let Some(name) = args.shape {
        shape = name.shape().with_batch_of(shape);
    }
    let dtype = args.dtype.unwrap_or(case_dtype);
    if let Some(b) = args.batch {
        shape.batch = b as usize;
    }
    if let Some(s) = args.seq {
        shape.seq = s as usize;
    }
    let (warmup, steps) = (args.warmup as usize, args.steps as usize);
    let mut label = case.label().to_string();
    if args.tiny && case != CaseName::Tiny {
        label.push_str("@tiny");
    }
    if let Some(name) = args.shape {
        label = format!("{label}@{}", name.label());
    }
    let options =
        LoadOptions::new(dtype.float(), args.quant.quantize()).for_backend::<B>(&device)?;
    let config = match &args.model {
        Some(path) => {
            label = format!("{label}@{}", crate::text::tidy(path).display());
            let c = legora::hub::load_model_config(path)
                .with_context(|| format!("--model {}", path.display()))?;
            shape = Shape {
                hidden: c.hidden_size,
                layers: c.num_hidden_layers,
                vocab: c.vocab_size,
                ..shape
            };
            c
        }
        None => model_config(&shape)?,
    };
    let tokens = case_rows(case.kind(), shape.batch)
        .checked_mul(shape.seq)
        .ok_or_else(|| anyhow!("--batch {} × --seq {} overflows", shape.batch, shape.seq))?;
    let mut need = weights::MemoryNeed::of(&config, &options, tokens);
    if let Some(path) = args.model.as_deref() {
        // A GGUF base keeps its blocks: the file's size, not the decoded weights
        let blocks = legora::hub::gguf::is_gguf_path(path) && options.quantize.is_none();
        if let (true, Ok(meta)) = (blocks, std::fs::metadata(path)) {
            need.weights = u128::from(meta.len());
        }
    }
    need.check(args.memory_limit, &options.describe(), tokens)?;
    let rss_reset = reset_peak_rss();
    let started = Instant::now();
    let base = match &args.model {
        Some(path) => {
            legora::hub::PretrainedModel::<B>::from_pretrained_with(path, &device, &options)
                .with_context(|| format!("loading --model {}", path.display()))?
                .model
        }
        None => weights::random_model::<B>(config, &options, args.seed, &device)?,
    };
    let storage = stored_as(&base, &options);
    let total_params = base.parameter_report().total;
    let mut rng = Rng::new(derive_seed(args.seed, &[1]));
    let kind = case.kind();
    let b = shape.batch;
    // one training run of `model` on `rows` random rows per step (`b` rows per task)
    let mut run = |model: LmModel<B>, rows: usize, seed: u64| -> anyhow::Result<(usize, Timings)> {
        let model = model.with_gradient_checkpointing(args.gradient_checkpointing);
        let trainable = trainable_parameters(&model).trainable;
        let batches = || random_batch(&mut rng, &shape, rows, b);
        Ok((
            trainable,
            train(model, batches, warmup, steps, seed, &device)?,
        ))
    };
    // `n` adapters on all seven projections, turned into one mixture
    let mixture = |mut m: CausalLm<B>, n: usize, router: Option<&RouterConfig>| {
        let names: Vec<String> = (0..n).map(|e| format!("expert{e}")).collect();
        for name in &names {
            m.add_adapter(name, &lora_config(&Proj::ALL))?;
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        m.adapters_to_mixture(&refs, router)?;
        anyhow::Ok(m)
    };
    let (rows, experts, (trainable, timings)) = match kind {
        Kind::Lora(targets) => {
            let mut m = base;
            m.add_adapter("default", &lora_config(targets))?;
            (b, 1, run(LmModel::new(m, Objective::Lm), b, args.seed)?)
        }
        Kind::Moe { experts, top_k } => {
            let rc = RouterConfig::new(experts).with_top_k(top_k);
            // experts and routers train jointly, no supervised routing loss
            let objective = Objective::Routed {
                routing_loss_coef: 0.0,
            };
            let m = mixture(base, experts, Some(&rc))?;
            (b, experts, run(LmModel::new(m, objective), b, args.seed)?)
        }
        Kind::Concurrent { experts, per_task } => {
            // as the `experts` stage of `legora train`: one adapter per task, turned into
            // a mixture without routers, rows routed by their task id
            let m = LmModel::new(mixture(base, experts, None)?, Objective::TaskRouted)
                .with_backward_per_task(per_task);
            (b * experts, experts, run(m, b * experts, args.seed)?)
        }
        Kind::Sequential { experts } => {
            // one single-adapter run per task over the same frozen base, one after another
            let (mut trainable, mut timings) = (0, Timings::default());
            for e in 0..experts {
                let mut m = base.clone();
                m.add_adapter(&format!("task{e}"), &lora_config(&Proj::ALL))?;
                let (n, t) = run(
                    LmModel::new(m, Objective::Lm),
                    b,
                    derive_seed(args.seed, &[e as u64]),
                )?;
                trainable += n;
                timings.extend(t);
            }
            (b, experts, (trainable, timings))
        }
    };
    let wall_s = started.elapsed().as_secs_f64();
    let tokens_per_step = rows * shape.seq;
    let med = median(&timings.steps);
    let phase = |i: usize| median(&timings.phases.iter().map(|p| p[i]).collect::<Vec<_>>());
    let max = timings.steps.iter().copied().fold(f64::NAN, f64::max);
    let min = timings.steps.iter().copied().fold(f64::NAN, f64::min);
    Ok(json!({
        "impl": "legora",
        "case": label,
        "backend": B::InnerBackend::name(&device),
        "threads": threads(),
        "steps": steps,
        "timed_steps": timings.steps.len(),
        "warmup": warmup,
        "experts": experts,
        "batch": rows,
        "seq": shape.seq,
        "hidden": shape.hidden,
        "layers": shape.layers,
        "vocab": shape.vocab,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "storage": storage,
        "shape": args.shape.map(ShapeName::label),
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_step": tokens_per_step,
        "step_s_median": med,
        "step_s_min": min,
        "step_s_max": max,
        "tokens_per_s": tokens_per_step as f64 / med,
        "total_s": timings.steps.iter().sum::<f64>(),
        "wall_s": wall_s,
        "forward_s_median": phase(0),
        "backward_s_median": phase(1),
        "clip_s_median": phase(2),
        "optim_s_median": phase(3),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_reset": rss_reset,
        "trainable_params": trainable,
        "total_params": total_params,
        "last_loss": timings.last_loss,
    }))
}

fn fmt_s(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.3}"))
}

fn fmt_mb(v: &Value) -> String {
    v.as_f64().map_or("n/a".into(), |x| format!("{x:.0}"))
}

/// The markdown table of the records.
fn table(rows: &[Value]) -> String {
    let mut s = String::from(
        "| case | storage | backend | threads | tokens/step | step s (median) | min | max \
         | tokens/s | fwd s | bwd s | clip s | optim s | total s | peak RSS MB | trainable |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["case"].as_str().unwrap_or("?"),
            r["storage"].as_str().unwrap_or("?"),
            r["backend"].as_str().unwrap_or("?"),
            r["threads"],
            r["tokens_per_step"],
            fmt_s(&r["step_s_median"]),
            fmt_s(&r["step_s_min"]),
            fmt_s(&r["step_s_max"]),
            r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            fmt_s(&r["forward_s_median"]),
            fmt_s(&r["backward_s_median"]),
            fmt_s(&r["clip_s_median"]),
            fmt_s(&r["optim_s_median"]),
            fmt_s(&r["total_s"]),
            fmt_mb(&r["peak_rss_mb"]),
            r["trainable_params"],
        ));
    }
    s
}

/// Run one case in a fresh `legora bench` process (so that its peak memory is its own)
/// and return its JSON record.
fn run_child(case: CaseName, args: &Args) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("locating the legora executable")?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["bench", "--json", "--case", case.label()]);
    cmd.args(["--steps", &args.steps.to_string()]);
    cmd.args(["--warmup", &args.warmup.to_string()]);
    cmd.args(["--seed", &args.seed.to_string()]);
    let options: [(&str, Option<String>); 7] = [
        ("--batch", args.batch.map(|v| v.to_string())),
        ("--seq", args.seq.map(|v| v.to_string())),
        ("--dtype", args.dtype.as_ref().map(value_name)),
        ("--quantize", args.quant.quantize.as_ref().map(value_name)),
        ("--shape", args.shape.as_ref().map(value_name)),
        ("--memory-limit", args.memory_limit.map(|v| v.to_string())),
        (
            "--model",
            args.model.as_ref().map(|p| p.display().to_string()),
        ),
    ];
    for (flag, v) in options {
        if let Some(v) = v {
            cmd.args([flag, &v]);
        }
    }
    let switches = [
        ("--tiny", args.tiny),
        ("--double-quant", args.quant.double_quant),
        ("--gradient-checkpointing", args.gradient_checkpointing),
    ];
    for (flag, on) in switches {
        if on {
            cmd.arg(flag);
        }
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        return Err(anyhow!("the bench process failed ({})", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let line = line.ok_or_else(|| anyhow!("the bench process printed no JSON record"))?;
    serde_json::from_str(line).context("reading the bench process's JSON record")
}

/// The command-line spelling of a value.
fn value_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Run `legora bench`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let mut cases: Vec<CaseName> = Vec::new();
    for c in args.case.iter().flat_map(|c| c.expand()) {
        if !cases.contains(&c) {
            cases.push(c);
        }
    }
    let fresh = cases.len() > 1;
    let mut rows = Vec::new();
    for case in cases {
        tracing::info!(case = case.label(), "bench case");
        let row = if fresh {
            run_child(case, &args)
        } else {
            run_case::<Autodiff<B>>(case, &args, &Default::default())
        }
        .with_context(|| format!("case {}", case.label()))?;
        if args.json {
            outln!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
    }
    if !args.json {
        out!("{}", table(&rows));
    }
    Ok(())
}
