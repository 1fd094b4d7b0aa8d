//! One module per subcommand: `Args` (clap) and `run`.

pub mod bench;
pub mod compose;
pub mod demo;
pub mod eval;
pub mod flags;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod plugins;
pub mod score;
pub mod serve;
pub mod train;

/// `--dtype` / `--quantize`: how the base model's frozen weights are stored once loaded
/// (the products stay f32; each weight tile is widened inside them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoadArgs {
    /// Storage of the frozen weights that are not quantized: f32, bf16 or f16.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
    /// Quantize the frozen decoder projections as bitsandbytes does: nf4, fp4 or int8
    /// (lm_head stays bf16).
    #[arg(long, value_parser = ["nf4", "fp4", "int8"])]
    pub quantize: Option<String>,
    /// With --quantize nf4|fp4: quantize the block scales too (bnb_4bit_use_double_quant).
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
}

impl LoadArgs {
    /// The load options asked for (`None`: neither flag given).
    pub fn options(&self) -> anyhow::Result<Option<legora::hub::LoadOptions>> {
        use legora::hub::{FloatDtype, LoadOptions, Quantize};
        if self.dtype.is_none() && self.quantize.is_none() {
            return Ok(None);
        }
        let dtype = match self.dtype.as_deref() {
            None | Some("f32") => FloatDtype::F32,
            Some("bf16") => FloatDtype::BF16,
            Some("f16") => FloatDtype::F16,
            Some(other) => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
        };
        let quantize = match self.quantize.as_deref() {
            None => None,
            Some(q) => Some(match Quantize::parse(q)? {
                Quantize::Nf4 { .. } => Quantize::Nf4 {
                    double_quant: self.double_quant,
                },
                Quantize::Fp4 { .. } => Quantize::Fp4 {
                    double_quant: self.double_quant,
                },
                Quantize::Int8 => Quantize::Int8,
            }),
        };
        Ok(Some(LoadOptions::new(dtype, quantize)))
    }

    /// The options asked for, or the default (every weight f32).
    pub fn options_or_default(&self) -> anyhow::Result<legora::hub::LoadOptions> {
        Ok(self.options()?.unwrap_or_default())
    }
}
