//! `legora inspect PATH`: what a model folder (config.json), a PEFT adapter folder
//! (adapter_config.json) or a mixture folder (moe_config.json) holds — sizes, targets,
//! ranks, router settings and parameter counts (PEFT's `print_trainable_parameters`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use legora::hub::{
    io::read_json, read_adapter, AdapterFiles, Checkpoint, SafetensorsFile, ADAPTER_CONFIG,
    MOE_CONFIG, ROUTER_WEIGHTS,
};
use legora::prelude::*;
use serde_json::{json, Value};

use crate::text::{table, thousands};
use burn::tensor::backend::Backend;

/// Arguments of `legora inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How the base's frozen weights are stored.
    #[command(flatten)]
    pub load: crate::cmd::LoadArgs,
    /// A model, PEFT adapter or mixture folder.
    pub path: PathBuf,
    /// Base model folder: for an adapter or a mixture, load it over this base and print
    /// PEFT's `trainable params: … || all params: … || trainable%: …`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Run `legora inspect`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
    let p = &args.path;
    if !p.is_dir() {
        bail!("{}: no such folder", p.display());
    }
    let (text, value) = if p.join(MOE_CONFIG).is_file() {
        mixture::<B>(p, args.model.as_deref())?
    } else if p.join(ADAPTER_CONFIG).is_file() {
        adapter::<B>(p, args.model.as_deref())?
    } else if p.join("config.json").is_file() {
        if args.model.is_some() {
            bail!(
                "{} is a model folder: --model only applies to adapter and mixture folders",
                p.display()
            );
        }
        model::<B>(p, &args.load)?
    } else {
        bail!(
            "{}: not a model, adapter or mixture folder (no config.json, {ADAPTER_CONFIG} or \
             {MOE_CONFIG})",
            p.display()
        );
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        out!("{text}");
    }
    Ok(())
}

fn model<B: Backend>(dir: &Path, load: &crate::cmd::LoadArgs) -> anyhow::Result<(String, Value)> {
    let (cfg, _) = legora::hub::load_config(dir)?;
    let rc = cfg
        .resolve()
        .with_context(|| format!("{}", dir.join("config.json").display()))?;
    let dtype = Checkpoint::open(dir)?.dtype().unwrap_or_else(|| "?".into());
    let m = PretrainedModel::<B>::from_pretrained_with(
        dir,
        &Default::default(),
        &load.options_or_default(),
    )?;
    let params = all_params(&m.model);
    let storage = storage(&m.model);
    let slots = m.model.slot_ids();
    let mut slot_names: Vec<&str> = slots.iter().map(SlotId::name).collect();
    slot_names.sort();
    slot_names.dedup();
    let v = json!({
        "kind": "model",
        "path": dir.display().to_string(),
        "model_type": cfg.model_type,
        "hidden_size": rc.hidden_size,
        "intermediate_size": rc.intermediate_size,
        "num_hidden_layers": rc.num_hidden_layers,
        "num_attention_heads": rc.num_attention_heads,
        "num_key_value_heads": rc.num_key_value_heads,
        "head_dim": rc.head_dim,
        "vocab_size": rc.vocab_size,
        "max_position_embeddings": rc.max_position_embeddings,
        "tie_word_embeddings": rc.tie_word_embeddings,
        "dtype": dtype,
        "storage": storage
            .iter()
            .map(|(f, n, b)| json!({"format": f, "matrices": n, "bytes": b}))
            .collect::<Vec<_>>(),
        "parameters": params,
        "tokenizer": m.tokenizer.is_some(),
        "chat_template": m.chat_template.is_some(),
        "adapter_slots": slots.len(),
        "slot_names": slot_names,
    });
    let storage_text = storage
        .iter()
        .map(|(f, n, b)| format!("{f} × {n} ({} bytes)", thousands(*b)))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: [(&str, String); 13] = [
        ("model_type (family)", cfg.model_type.clone()),
        ("hidden_size", rc.hidden_size.to_string()),
        ("intermediate_size", rc.intermediate_size.to_string()),
        ("num_hidden_layers", rc.num_hidden_layers.to_string()),
        (
            "attention heads",
            format!(
                "{} (key/value heads {}, head_dim {})",
                rc.num_attention_heads, rc.num_key_value_heads, rc.head_dim
            ),
        ),
        ("vocab_size", rc.vocab_size.to_string()),
        (
            "max_position_embeddings",
            rc.max_position_embeddings.to_string(),
        ),
        ("tie_word_embeddings", rc.tie_word_embeddings.to_string()),
        ("dtype", dtype),
        ("frozen weights stored as", storage_text),
        ("parameters", thousands(params)),
        (
            "tokenizer / chat template",
            format!(
                "{} / {}",
                yes(m.tokenizer.is_some()),
                yes(m.chat_template.is_some())
            ),
        ),
        (
            "adapter slots",
            format!("{} ({})", slots.len(), slot_names.join(", ")),
        ),
    ];
    let mut text = format!("model folder {}\n", dir.display());
    for (k, v) in &rows {
        text.push_str(&format!("  {k:<26}{v}\n"));
    }
    Ok((text, v))
}

/// The storage of the frozen weights (every projection and the embeddings):
/// `(format, matrices, bytes)` per format, in order of first appearance.
fn storage<B: Backend>(m: &CausalLm<B>) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    // A tied lm_head slot is the embedding matrix: count it once.
    let embed = (!m.config().tie_word_embeddings).then_some(&m.model.embed_tokens);
    let slots = m.slots();
    for w in slots.iter().map(|(_, s)| s.frozen_weight()).chain(embed) {
        let name = w.format().name().to_string();
        match out.iter_mut().find(|(f, _, _)| *f == name) {
            Some(e) => {
                e.1 += 1;
                e.2 += w.bytes();
            }
            None => out.push((name, 1, w.bytes())),
        }
    }
    out
}

/// Every parameter once, as transformers' `num_parameters()` and PEFT count them (a tied
/// `lm_head` counts once).
fn all_params<B: Backend>(model: &CausalLm<B>) -> usize {
    model.parameter_report().total
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Parameters of an adapter as stored (every lora_A, lora_B and DoRA magnitude).
fn adapter_params(a: &AdapterFiles) -> usize {
    let lora: usize = a
        .modules
        .iter()
        .map(|(_, x, y)| x.shape.num_elements() + y.shape.num_elements())
        .sum();
    lora + a
        .magnitudes
        .values()
        .map(|m| m.shape.num_elements())
        .sum::<usize>()
}

fn targets(cfg: &LoraConfig) -> String {
    cfg.target_modules
        .as_ref()
        .and_then(|t| serde_json::to_string(t).ok())
        .unwrap_or_else(|| "null".into())
}

fn adapter_summary(a: &AdapterFiles) -> Value {
    let c = &a.config;
    json!({
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "exclude_modules": c.exclude_modules,
        "lora_dropout": c.lora_dropout,
        "target_modules": c.target_modules,
        "rank_pattern": c.rank_pattern,
        "alpha_pattern": c.alpha_pattern,
        "base_model_name_or_path": c.base_model_name_or_path,
        "modules": a.modules.len(),
        "parameters": adapter_params(a),
    })
}

fn adapter<B: Backend>(dir: &Path, base: Option<&Path>) -> anyhow::Result<(String, Value)> {
    let a = read_adapter(dir)?;
    let c = &a.config;
    let n = adapter_params(&a);
    let mut v = adapter_summary(&a);
    v["kind"] = json!("adapter");
    v["path"] = json!(dir.display().to_string());
    let modules: Vec<Value> = a
        .modules
        .iter()
        .map(|(m, x, y)| {
            json!({
                "module": m,
                "rank": x.shape[0],
                "in_features": x.shape[1],
                "out_features": y.shape[0],
                "scaling": c.spec_for(m).scaling(),
            })
        })
        .collect();
    v["module_ranks"] = json!(modules);
    // the config's rank next to the tensors' (a mismatch is refused on load)
    let mismatches: Vec<Value> = a
        .modules
        .iter()
        .filter(|(m, x, _)| x.shape[0] != c.spec_for(m).r)
        .map(|(m, x, _)| json!({"module": m, "config_r": c.spec_for(m).r, "tensor_rank": x.shape[0]}))
        .collect();
    v["rank_mismatches"] = json!(mismatches);
    let mut text = format!("PEFT adapter {}\n", dir.display());
    for m in &mismatches {
        text.push_str(&format!(
            "  rank mismatch: {} has rank {} in the tensors but r = {} in adapter_config.json \
             (this adapter does not load)\n",
            m["module"].as_str().unwrap_or_default(),
            m["tensor_rank"],
            m["config_r"]
        ));
    }
    let scaling = AdapterSpec::new(c.r, c.lora_alpha)
        .with_rslora(c.use_rslora)
        .scaling();
    text.push_str(&format!(
        "  r {}, lora_alpha {} (scaling {}{}), lora_dropout {}\n",
        c.r,
        c.lora_alpha,
        scaling,
        match (c.use_rslora, c.use_dora) {
            (true, true) => ", rsLoRA, DoRA",
            (true, false) => ", rsLoRA",
            (false, true) => ", DoRA",
            (false, false) => "",
        },
        c.lora_dropout
    ));
    text.push_str(&format!("  target_modules {}\n", targets(c)));
    if let Some(e) = &c.exclude_modules {
        let e = serde_json::to_string(e).unwrap_or_default();
        text.push_str(&format!("  exclude_modules {e}\n"));
    }
    if let Some(b) = &c.base_model_name_or_path {
        text.push_str(&format!("  base_model_name_or_path {b}\n"));
    }
    text.push_str(&format!(
        "  {} modules, {} parameters\n\n",
        a.modules.len(),
        thousands(n)
    ));
    let rows: Vec<[String; 4]> = a
        .modules
        .iter()
        .map(|(m, x, y)| {
            [
                m.clone(),
                x.shape[0].to_string(),
                format!("{} -> {}", x.shape[1], y.shape[0]),
                format!("{}", c.spec_for(m).scaling()),
            ]
        })
        .collect();
    text.push_str(&table(&["module", "rank", "in -> out", "scaling"], &rows));
    if let Some(base) = base {
        let m = PretrainedModel::<B>::from_pretrained(base, &Default::default())?;
        let peft = PeftModel::from_pretrained(m, dir)?;
        let report = ParamReport {
            trainable: n,
            total: all_params(peft.model()),
        };
        v["trainable_params"] = json!(report.trainable);
        v["all_params"] = json!(report.total);
        v["trainable_percent"] = json!(report.percent());
        text.push_str(&format!("\n{report}\n"));
    }
    Ok((text, v))
}

fn mixture<B: Backend>(dir: &Path, base: Option<&Path>) -> anyhow::Result<(String, Value)> {
    let cfg: MoeConfig = read_json(&dir.join(MOE_CONFIG), "mixture config (moe_config.json)")?;
    let mut experts = Vec::new();
    let mut expert_params = 0;
    let mut rows: Vec<[String; 5]> = Vec::new();
    for name in &cfg.experts {
        let a = read_adapter(&dir.join("experts").join(name))?;
        let n = adapter_params(&a);
        expert_params += n;
        rows.push([
            name.clone(),
            a.config.r.to_string(),
            a.config.lora_alpha.to_string(),
            targets(&a.config),
            thousands(n),
        ]);
        let mut s = adapter_summary(&a);
        s["name"] = json!(name);
        experts.push(s);
    }
    let mut router_params = 0;
    if cfg.router.is_some() {
        let f = SafetensorsFile::open(&dir.join(ROUTER_WEIGHTS))?;
        for name in f.names() {
            if let Some((_, shape)) = f.info(&name) {
                router_params += shape.iter().product::<usize>();
            }
        }
    }
    let mut v = json!({
        "kind": "mixture",
        "path": dir.display().to_string(),
        "experts": experts,
        "router": cfg.router,
        "layers": cfg.layers,
        "router_input": cfg.router_input,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "expert_params": expert_params,
        "router_params": router_params,
    });
    let mut text = format!("mixture {}\n", dir.display());
    if let Some(b) = &cfg.base_model_name_or_path {
        text.push_str(&format!("  base_model_name_or_path {b}\n"));
    }
    text.push_str(&format!("  {} experts\n", cfg.experts.len()));
    match &cfg.router {
        Some(r) => {
            let strategy = serde_json::to_value(r.routing_strategy)
                .ok()
                .and_then(|s| s.as_str().map(String::from))
                .unwrap_or_default();
            text.push_str(&format!(
                "  router: {strategy}, top_k {}, router_aux_loss_coef {}, router_z_loss_coef {}, \
                 jitter_noise {}, input {}, pooling {}\n",
                r.top_k,
                r.router_aux_loss_coef,
                r.router_z_loss_coef,
                r.jitter_noise,
                cfg.router_input,
                r.router_pooling.as_str()
            ));
            text.push_str(&format!(
                "  layers with a router: {} ({:?})\n",
                cfg.layers.len(),
                cfg.layers
            ));
        }
        None => text.push_str("  router: none (task-routed: pick an expert with --task-id)\n"),
    }
    text.push_str(&format!(
        "  parameters: experts {}, routers {}\n\n",
        thousands(expert_params),
        thousands(router_params)
    ));
    text.push_str(&table(
        &["expert", "r", "lora_alpha", "target_modules", "parameters"],
        &rows,
    ));
    if let Some(base) = base {
        let mut m = PretrainedModel::<B>::from_pretrained(base, &Default::default())?;
        m.load_mixture(dir)?;
        let report = ParamReport {
            trainable: expert_params + router_params,
            total: all_params(&m.model),
        };
        v["trainable_params"] = json!(report.trainable);
        v["all_params"] = json!(report.total);
        v["trainable_percent"] = json!(report.percent());
        text.push_str(&format!("\n{report}\n"));
    }
    Ok((text, v))
}
