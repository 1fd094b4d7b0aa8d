//! `legora merge`: fold a PEFT adapter into its base (PEFT's `merge_and_unload`) and
//! write a plain Hugging Face model folder that loads without legora or PEFT.

use std::path::PathBuf;

use anyhow::{bail, Context};
use legora::prelude::*;

use crate::backend::{device, Backend};
use crate::text::thousands;

/// Weight dtype of the merged folder.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Dtype {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

/// Arguments of `legora merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Load the base quantized first (nf4, fp4, int8), as the adapter was trained over
    /// it (QLoRA): the weights are dequantized, merged and written in --dtype.
    #[arg(long, value_parser = ["nf4", "fp4", "int8"])]
    pub quantize: Option<String>,
    /// With --quantize nf4|fp4: the base's block scales were double-quantized.
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
    /// Hugging Face model folder the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (created; config.json, model.safetensors, tokenizer and generation
    /// files). Must not be the model folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype written.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
}

/// Run `legora merge`.
pub fn run(args: Args) -> anyhow::Result<()> {
    for (what, input) in [("model", &args.model), ("adapter", &args.adapter)] {
        if legora::hub::io::path_within(&args.out, input) {
            bail!(
                "--out {} is (inside) the {what} folder {}: write the merged model somewhere \
                 else",
                args.out.display(),
                input.display()
            );
        }
    }
    let load = crate::cmd::LoadArgs {
        dtype: None,
        quantize: args.quantize.clone(),
        double_quant: args.double_quant,
    };
    let base = PretrainedModel::<Backend>::from_pretrained_with(
        &args.model,
        &device(),
        &load.options_or_default()?,
    )?;
    let peft = PeftModel::from_pretrained(base, &args.adapter)?;
    let merged = peft.merge_and_unload()?;
    let params = merged.model.parameter_report().total;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output folder {}", args.out.display()))?;
    let dtype = match args.dtype {
        Dtype::F32 => FloatDtype::F32,
        Dtype::F16 => FloatDtype::F16,
        Dtype::Bf16 => FloatDtype::BF16,
    };
    merged.save_pretrained_as(&args.out, dtype)?;
    let over = match &args.quantize {
        Some(q) => format!(" over the {q} base, dequantized"),
        None => String::new(),
    };
    outln!(
        "merged {} into {}{over} ({} parameters, {}): {}",
        args.adapter.display(),
        args.model.display(),
        thousands(params),
        dtype.torch_name(),
        args.out.display()
    );
    Ok(())
}
