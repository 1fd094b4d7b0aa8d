//! `legora generate`: complete one prompt, or chat on stdin, with a model folder and
//! optionally a PEFT adapter, a mixture folder, or several adapters combined with
//! PEFT's `add_weighted_adapter` (any `combination_type`, `cat` by default).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use legora::prelude::*;

use burn::tensor::backend::Backend;

/// Arguments of `legora generate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["prompt", "chat"])))]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder.
    #[arg(long, conflicts_with_all = ["moe", "adapters"])]
    pub adapter: Option<PathBuf>,
    /// legora mixture folder (moe_config.json, router.safetensors, experts/).
    #[arg(long, conflicts_with = "adapters")]
    pub moe: Option<PathBuf>,
    /// Several PEFT adapter folders, combined into one adapter (PEFT
    /// `add_weighted_adapter`, see --combination).
    #[arg(long, value_delimiter = ',', requires = "weights")]
    pub adapters: Vec<PathBuf>,
    /// One weight per `--adapters` folder.
    #[arg(long, value_delimiter = ',', requires = "adapters",
          value_parser = super::flags::adapter_weight)]
    pub weights: Vec<f64>,
    /// How --adapters are combined, PEFT's `combination_type`: cat (exactly Σ wᵢ·ΔWᵢ),
    /// linear, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd,
    /// dare_ties_svd, magnitude_prune, magnitude_prune_svd.
    #[arg(long, default_value = "cat", requires = "adapters",
          value_parser = super::flags::combination)]
    pub combination: Combination,
    /// Fraction of entries kept, in [0, 1] (the ties, dare and magnitude_prune
    /// combinations, which need it).
    #[arg(long, requires = "adapters", value_parser = super::flags::density)]
    pub density: Option<f64>,
    /// TIES sign election: total or frequency (default total; ties and dare_ties
    /// combinations).
    #[arg(long, requires = "adapters", value_parser = super::flags::majority_sign_method)]
    pub majority_sign_method: Option<MajoritySignMethod>,
    /// Rank of an *svd combination's result (default: the largest source rank).
    #[arg(long, requires = "adapters", value_parser = super::flags::rank)]
    pub svd_rank: Option<usize>,
    /// Clamp an *svd combination's factors at this quantile of their entries, in [0, 1].
    #[arg(long, requires = "adapters", value_parser = super::flags::quantile)]
    pub svd_clamp: Option<f64>,
    /// Seed of the dare combinations' random masks (default 0).
    #[arg(long, requires = "adapters")]
    pub merge_seed: Option<u64>,
    /// Route every token to this expert of the mixture (needed for a mixture without
    /// routers).
    #[arg(long, requires = "moe")]
    pub task_id: Option<usize>,
    /// Complete this prompt and print the completion.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Chat on stdin: one message per line, `/reset` clears the history, `/exit` or EOF
    /// quits. Uses the model's chat template when it has one.
    #[arg(long)]
    pub chat: bool,
    /// Render `--prompt` as a user message through the model's chat template.
    #[arg(long, requires = "prompt")]
    pub chat_template: bool,
    /// Tokens to generate at most (default: generation_config.json's, else 20).
    #[arg(long, value_parser = super::flags::token_count)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; any of --temperature > 0, --top-k, --top-p turns sampling
    /// on, `--temperature 0` forces greedy decoding.
    #[arg(long, value_parser = super::flags::temperature)]
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens when sampling (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, value_parser = super::flags::top_p)]
    pub top_p: Option<f64>,
    /// CTRL repetition penalty (1 = off).
    #[arg(long, value_parser = super::flags::repetition_penalty)]
    pub repetition_penalty: Option<f64>,
    /// RNG seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// The model with whatever was asked for loaded into it.
struct Loaded<B: Backend> {
    model: PretrainedModel<B>,
    task_id: Option<usize>,
}

fn load<B: Backend>(args: &Args, merge: &MergeOptions) -> anyhow::Result<Loaded<B>> {
    let device = B::Device::default();
    let mut base = PretrainedModel::<B>::from_pretrained_with(
        &args.model,
        &device,
        &args.load.options_or_default(),
    )?;
    if let Some(dir) = &args.moe {
        let cfg = base.load_mixture(dir)?;
        if let Some(t) = args.task_id {
            if t >= cfg.experts.len() {
                bail!(
                    "--task-id {t}: the mixture {} has {} experts (0..{})",
                    dir.display(),
                    cfg.experts.len(),
                    cfg.experts.len()
                );
            }
        } else if cfg.router.is_none() {
            bail!(
                "{}: this mixture has no routers; pass --task-id (0..{}) to pick an expert",
                dir.display(),
                cfg.experts.len()
            );
        }
        return Ok(Loaded {
            model: base,
            task_id: args.task_id,
        });
    }
    if let Some(dir) = &args.adapter {
        let peft = PeftModel::from_pretrained(base, dir)?;
        return Ok(Loaded {
            model: peft.base,
            task_id: None,
        });
    }
    if !args.adapters.is_empty() {
        if args.adapters.len() != args.weights.len() {
            bail!(
                "--adapters has {} folders but --weights has {} values",
                args.adapters.len(),
                args.weights.len()
            );
        }
        let (first, rest) = args.adapters.split_first().context("--adapters is empty")?;
        // PeftModel::from_pretrained names the first adapter `default`.
        let mut peft = PeftModel::from_pretrained(base, first)?;
        let mut names = vec!["default".to_string()];
        for (i, dir) in rest.iter().enumerate() {
            let name = format!("adapter_{}", i + 1);
            peft.load_adapter(dir, &name)?;
            names.push(name);
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        peft.add_weighted_adapter(&refs, &args.weights, "combined", args.combination, merge)?;
        peft.set_adapter("combined")?;
        return Ok(Loaded {
            model: peft.base,
            task_id: None,
        });
    }
    Ok(Loaded {
        model: base,
        task_id: None,
    })
}

/// A flag combination clap cannot express, reported as clap reports its own: usage, exit 2.
fn usage_error(msg: String) -> anyhow::Error {
    // `exit` never returns: the usage error ends the process with status 2.
    clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{msg}\n")).exit()
}

/// The merge flags as [`MergeOptions`], each refused where `--combination` does not read
/// it and `--density` required where it does.
fn merge_options(args: &Args) -> Result<MergeOptions, String> {
    let c = args.combination;
    let refuse = |flag: &str, which: &str| {
        Err(format!(
            "{flag} does not apply to --combination {c} (only to the {which} combinations)"
        ))
    };
    if args.density.is_some() && !c.uses_density() {
        return refuse("--density", "ties, dare and magnitude_prune");
    }
    if args.density.is_none() && c.uses_density() {
        return Err(format!("--combination {c} needs --density (in [0, 1])"));
    }
    if args.majority_sign_method.is_some() && !c.uses_majority_sign() {
        return refuse("--majority-sign-method", "ties and dare_ties");
    }
    if (args.svd_rank.is_some() || args.svd_clamp.is_some()) && !c.uses_svd() {
        let flag = if args.svd_rank.is_some() {
            "--svd-rank"
        } else {
            "--svd-clamp"
        };
        return refuse(flag, "svd");
    }
    if args.merge_seed.is_some() && !c.is_dare() {
        return refuse("--merge-seed", "dare");
    }
    Ok(MergeOptions {
        density: args.density,
        majority_sign_method: args.majority_sign_method.unwrap_or_default(),
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        seed: args.merge_seed.unwrap_or(0),
    })
}

/// The folder's generation config with the command-line overrides.
fn generation_config<B: Backend>(args: &Args, model: &PretrainedModel<B>) -> GenerationConfig {
    let mut g = model.generation_config.clone();
    if let Some(n) = args.max_new_tokens {
        g.max_new_tokens = Some(n);
    }
    if args.top_k.is_some() || args.top_p.is_some() {
        g.do_sample = true;
    }
    if let Some(t) = args.temperature {
        g.do_sample = t > 0.0;
        g.temperature = Some(t);
    }
    if let Some(k) = args.top_k {
        g.top_k = Some(k);
    }
    if let Some(p) = args.top_p {
        g.top_p = Some(p);
    }
    if let Some(r) = args.repetition_penalty {
        g.repetition_penalty = Some(r);
    }
    if let Some(s) = args.seed {
        g.seed = Some(s);
    }
    g
}

/// What one completion took: its prompt and new token counts and the wall time of
/// `generate` (prefill and decode).
struct Timing {
    prompt_tokens: usize,
    new_tokens: usize,
    secs: f64,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} prompt tokens, {} new tokens in {:.3} s: {:.1} tokens/s",
            self.prompt_tokens,
            self.new_tokens,
            self.secs,
            self.new_tokens as f64 / self.secs.max(1e-9)
        )
    }
}

/// Generate from `text`; `templated` text already holds its special tokens (as
/// transformers' `apply_chat_template(tokenize=True)`, no BOS is added again).
fn complete<B: Backend>(
    m: &Loaded<B>,
    text: &str,
    templated: bool,
    gen: &GenerationConfig,
) -> anyhow::Result<(String, Timing)> {
    let tok = m.model.tokenizer()?;
    let ids = legora::hub::encode(tok, text, !templated)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let prompt_tokens = ids.len();
    let task_ids = m.task_id.map(|t| vec![t]);
    let start = std::time::Instant::now();
    // The decode loop runs on a worker of the thread pool, so that each step's many small
    // parallel products start on the thread that asks for them instead of waking a worker
    // and putting the asking thread to sleep, twice per product.
    let out = rayon::scope(|_| m.model.model.generate(&[ids], gen, task_ids.as_deref()))
        .with_context(|| format!("generating with {}", m.model.name_or_path.display()))?;
    let timing = Timing {
        prompt_tokens,
        new_tokens: out[0].len(),
        secs: start.elapsed().as_secs_f64(),
    };
    let context = m.model.model.config().max_position_embeddings;
    if out[0].len() < gen.max_new() && prompt_tokens + out[0].len() >= context {
        eprintln!(
            "stopped after {} new tokens: the prompt ({prompt_tokens} tokens) and the \
             completion fill the model's context (max_position_embeddings = {context})",
            out[0].len()
        );
    }
    Ok((m.model.decode(&out[0])?, timing))
}

/// Run `legora generate`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    // flag combinations first, before anything is loaded
    let merge = merge_options(&args).map_err(usage_error)?;
    let loaded = load::<B>(&args, &merge)?;
    let gen = generation_config(&args, &loaded.model);
    gen.validate()
        .context("generation settings (--temperature, --top-p, --repetition-penalty)")?;
    if let Some(prompt) = &args.prompt {
        let (text, templated) = if args.chat_template {
            let msgs = [Message::new(Role::User, prompt)];
            (loaded.model.apply_chat_template(&msgs, true)?, true)
        } else {
            (prompt.clone(), false)
        };
        let (completion, timing) = complete(&loaded, &text, templated, &gen)?;
        outln!("{completion}");
        // On stderr, as llama.cpp prints its timings: stdout stays the completion alone.
        eprintln!("{timing}");
        return Ok(());
    }
    chat(&loaded, &gen)
}

/// The interactive loop: one user message per stdin line.
fn chat<B: Backend>(m: &Loaded<B>, gen: &GenerationConfig) -> anyhow::Result<()> {
    let has_template = m.model.chat_template.is_some();
    let interactive = std::io::stdin().is_terminal();
    eprintln!(
        "chatting with {} ({}); /reset clears the history, /exit or Ctrl-D quits",
        m.model.name_or_path.display(),
        if has_template {
            "its chat template"
        } else {
            "no chat template: a plain `User:` / `Assistant:` transcript"
        }
    );
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                continue;
            }
            _ => {}
        }
        history.push(Message::new(Role::User, line));
        let (text, templated) = if has_template {
            (m.model.apply_chat_template(&history, true)?, true)
        } else {
            (transcript(&history), false)
        };
        let (reply, timing) = complete(m, &text, templated, gen)?;
        tracing::info!("{timing}");
        // Without a template nothing stops the model from writing the next turn.
        let reply = match reply.find("\nUser:") {
            Some(i) if !has_template => reply[..i].to_string(),
            _ => reply,
        };
        let reply = reply.trim().to_string();
        outln!("{reply}");
        std::io::stdout().flush().ok();
        history.push(Message::new(Role::Assistant, reply.clone()));
    }
    Ok(())
}

fn transcript(history: &[Message]) -> String {
    let mut s = String::new();
    for msg in history {
        let who = if msg.role == Role::User {
            "User"
        } else {
            "Assistant"
        };
        s.push_str(&format!("{who}: {}\n", msg.content));
    }
    s.push_str("Assistant:");
    s
}
