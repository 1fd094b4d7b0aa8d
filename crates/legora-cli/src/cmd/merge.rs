//! `legora merge`: fold a PEFT adapter into its base (PEFT's `merge_and_unload`) and
//! write a plain Hugging Face model folder that loads without legora or PEFT.

use std::path::PathBuf;

use anyhow::{bail, Context};
use legora::prelude::*;

use crate::text::thousands;
use burn::tensor::backend::Backend;

/// Arguments of `legora merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Load the base quantized first, as the adapter was trained over it (QLoRA): the
    /// weights are dequantized, merged and written in --dtype.
    #[command(flatten)]
    pub quant: crate::cmd::QuantArgs,
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
    pub dtype: crate::cmd::Dtype,
}

/// Run `legora merge`.
pub fn run<B: Backend>(args: Args) -> anyhow::Result<()> {
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
        quant: args.quant.clone(),
    };
    let base = PretrainedModel::<B>::from_pretrained_with(
        &args.model,
        &Default::default(),
        &load.options_or_default(),
    )?;
    let peft = PeftModel::from_pretrained(base, &args.adapter)?;
    let merged = peft.merge_and_unload()?;
    let params = merged.model.parameter_report().total;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output folder {}", args.out.display()))?;
    let dtype = args.dtype.float();
    merged.save_pretrained_as(&args.out, dtype)?;
    let over = match args.quant.quantize {
        Some(q) => {
            let name = clap::ValueEnum::to_possible_value(&q).map(|v| v.get_name().to_owned());
            format!(" over the {} base, dequantized", name.unwrap_or_default())
        }
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
