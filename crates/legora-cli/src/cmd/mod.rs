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

/// A float dtype flag (`--dtype`): f32, f16 or bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// The dtype as the hub names it.
    pub fn float(self) -> legora::hub::FloatDtype {
        use legora::hub::FloatDtype;
        match self {
            Dtype::F32 => FloatDtype::F32,
            Dtype::F16 => FloatDtype::F16,
            Dtype::Bf16 => FloatDtype::BF16,
        }
    }
}

/// A bitsandbytes scheme flag (`--quantize`): nf4, fp4 or int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheme {
    /// 4-bit NormalFloat.
    Nf4,
    /// 4-bit float.
    Fp4,
    /// LLM.int8() row-wise codes.
    Int8,
}

/// `--quantize` / `--double-quant`: the bitsandbytes quantization of the base's frozen
/// decoder projections.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QuantArgs {
    /// Quantize the frozen decoder projections as bitsandbytes does: nf4, fp4 or int8
    /// (lm_head stays bf16).
    #[arg(long, value_enum)]
    pub quantize: Option<Scheme>,
    /// With --quantize nf4|fp4: quantize the block scales too (bnb_4bit_use_double_quant).
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
}

impl QuantArgs {
    /// The quantization asked for (`None`: no --quantize).
    pub fn quantize(&self) -> Option<legora::hub::Quantize> {
        use legora::hub::Quantize;
        let double_quant = self.double_quant;
        Some(match self.quantize? {
            Scheme::Nf4 => Quantize::Nf4 { double_quant },
            Scheme::Fp4 => Quantize::Fp4 { double_quant },
            Scheme::Int8 => Quantize::Int8,
        })
    }
}

/// `--dtype` / `--quantize`: how the base model's frozen weights are stored once loaded
/// (the products stay f32; each weight tile is widened inside them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoadArgs {
    /// Storage of the frozen weights that are not quantized: f32, bf16 or f16.
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// The quantization of the frozen decoder projections.
    #[command(flatten)]
    pub quant: QuantArgs,
}

impl LoadArgs {
    /// The load options asked for (`None`: neither flag given).
    pub fn options(&self) -> Option<legora::hub::LoadOptions> {
        if self.dtype.is_none() && self.quant.quantize.is_none() {
            return None;
        }
        let dtype = self.dtype.unwrap_or(Dtype::F32).float();
        Some(legora::hub::LoadOptions::new(dtype, self.quant.quantize()))
    }

    /// The options asked for, or the default (every weight f32).
    pub fn options_or_default(&self) -> legora::hub::LoadOptions {
        self.options().unwrap_or_default()
    }
}
