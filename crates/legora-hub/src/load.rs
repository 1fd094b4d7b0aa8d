//! [`LoadOptions`]: how the frozen weights of a base model are stored once loaded (their
//! float dtype, or a bitsandbytes quantization named as transformers'
//! `BitsAndBytesConfig`), and the per-tensor conversion the loaders apply as they read.
//!
//! Conversion is tensor by tensor: the loader reads one projection from the (memory
//! mapped) file, converts or quantizes it, and moves on, so the peak while loading is the
//! final size plus one tensor, never a whole-model f32 copy.

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use legora_kernels::quant::{Format, QuantMatrix, Storage};
use serde::{Deserialize, Serialize};

use crate::error::{HubError, Result};
use crate::io::FloatDtype;

/// A bitsandbytes quantization of the frozen projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// 4-bit NormalFloat (`bnb_4bit_quant_type = "nf4"`).
    Nf4 {
        /// `bnb_4bit_use_double_quant`.
        double_quant: bool,
    },
    /// 4-bit float (`bnb_4bit_quant_type = "fp4"`).
    Fp4 {
        /// `bnb_4bit_use_double_quant`.
        double_quant: bool,
    },
    /// LLM.int8() row-wise codes (`load_in_8bit`).
    Int8,
}

impl Quantize {
    /// The storage format.
    pub fn format(self) -> Format {
        match self {
            Quantize::Nf4 { double_quant } => Format::Nf4 { double_quant },
            Quantize::Fp4 { double_quant } => Format::Fp4 { double_quant },
            Quantize::Int8 => Format::Int8,
        }
    }

    /// `nf4`, `fp4` or `int8` (the CLI's `--quantize` values), without double
    /// quantization.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Quantize::Nf4 {
                double_quant: false,
            }),
            "fp4" => Ok(Quantize::Fp4 {
                double_quant: false,
            }),
            "int8" => Ok(Quantize::Int8),
            other => Err(HubError::Options {
                key: "quantize".into(),
                expected: "\"nf4\", \"fp4\" or \"int8\"".into(),
                found: format!("{other:?}"),
            }),
        }
    }
}

/// transformers' `BitsAndBytesConfig`, with its names and defaults (what a
/// `quantization_config` of config.json or a run file's `[model.quantization]` holds).
/// Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitsAndBytesConfig {
    /// Quantize the projections to 4 bits.
    #[serde(default)]
    pub load_in_4bit: bool,
    /// Quantize the projections to LLM.int8().
    #[serde(default)]
    pub load_in_8bit: bool,
    /// `"nf4"` or `"fp4"` (transformers' default: `"fp4"`).
    #[serde(default = "default_quant_type")]
    pub bnb_4bit_quant_type: String,
    /// Quantize the 4-bit block scales too (`compress_statistics`).
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    /// The dtype of the products: legora computes in f32 (`"float32"`, the default).
    #[serde(default = "default_compute_dtype")]
    pub bnb_4bit_compute_dtype: String,
}

fn default_quant_type() -> String {
    "fp4".into()
}

fn default_compute_dtype() -> String {
    "float32".into()
}

impl Default for BitsAndBytesConfig {
    fn default() -> Self {
        Self {
            load_in_4bit: false,
            load_in_8bit: false,
            bnb_4bit_quant_type: default_quant_type(),
            bnb_4bit_use_double_quant: false,
            bnb_4bit_compute_dtype: default_compute_dtype(),
        }
    }
}

impl BitsAndBytesConfig {
    /// The quantization this asks for (`None`: neither `load_in_4bit` nor
    /// `load_in_8bit`); contradictory or unsupported settings are errors naming the key.
    pub fn quantize(&self) -> Result<Option<Quantize>> {
        let bad = |key: &str, expected: &str, found: String| HubError::Options {
            key: key.into(),
            expected: expected.into(),
            found,
        };
        if self.load_in_4bit && self.load_in_8bit {
            return Err(bad(
                "load_in_8bit",
                "false when load_in_4bit is true (one quantization)",
                "true".into(),
            ));
        }
        if !matches!(self.bnb_4bit_compute_dtype.as_str(), "float32" | "fp32") {
            return Err(bad(
                "bnb_4bit_compute_dtype",
                "\"float32\" (legora's products run in f32)",
                format!("{:?}", self.bnb_4bit_compute_dtype),
            ));
        }
        if self.load_in_8bit {
            return Ok(Some(Quantize::Int8));
        }
        if !self.load_in_4bit {
            return Ok(None);
        }
        let double_quant = self.bnb_4bit_use_double_quant;
        match self.bnb_4bit_quant_type.as_str() {
            "nf4" => Ok(Some(Quantize::Nf4 { double_quant })),
            "fp4" => Ok(Some(Quantize::Fp4 { double_quant })),
            other => Err(bad(
                "bnb_4bit_quant_type",
                "\"nf4\" or \"fp4\"",
                format!("{other:?}"),
            )),
        }
    }
}

/// How a base model's frozen weights are stored once loaded. The default keeps today's
/// behaviour: every weight as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The float dtype of every frozen weight that is not quantized (the projections
    /// without a quantization, the embeddings and `lm_head`; norms stay f32).
    pub dtype: FloatDtype,
    /// A quantization of the decoder projections.
    pub quantize: Option<Quantize>,
    /// The storage of the embeddings and an untied `lm_head` (`None`: bf16 when the
    /// projections are quantized, as bitsandbytes leaves them in half precision; `dtype`
    /// otherwise).
    pub lm_head: Option<Format>,
    /// A GGUF base keeps its GGML blocks as they are in the file ([`Format::Ggml`]:
    /// dequantized a tile at a time in the products, the embeddings a row at a time when
    /// looked up) unless a `quantize` (or, for the embeddings and `lm_head`, an `lm_head`
    /// format) asks for another storage; `false`: every weight decoded and stored as the
    /// other options say.
    pub gguf_blocks: bool,
    /// Decoding over kept `Q8_0` / `Q4_0` blocks (one new token per sequence) keeps f32
    /// activations: every product is dequantize-then-f32, as transformers computes over
    /// the dequantized file. `false` (the default): those products quantize the
    /// activations to `Q8_0` and take integer dot products, as llama.cpp does — several
    /// times faster, and a difference of the activations' 8-bit rounding.
    pub gguf_exact_decode: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: FloatDtype::F32,
            quantize: None,
            lm_head: None,
            gguf_blocks: true,
            gguf_exact_decode: false,
        }
    }
}

impl LoadOptions {
    /// Options with this dtype and quantization (`lm_head` by the default rule).
    pub fn new(dtype: FloatDtype, quantize: Option<Quantize>) -> Self {
        Self {
            dtype,
            quantize,
            ..Self::default()
        }
    }

    /// Whether the GGUF tensor for the frozen weight `name` keeps its GGML blocks (see
    /// [`LoadOptions::gguf_blocks`]).
    pub fn keeps_gguf_blocks(&self, name: &str) -> bool {
        let head = name.starts_with("lm_head.") || name.starts_with("model.embed_tokens.");
        self.gguf_blocks && self.quantize.is_none() && !(head && self.lm_head.is_some())
    }

    /// The format of the frozen weight called `name` (an HF tensor name).
    pub fn format_of(&self, name: &str) -> Format {
        let dense = match self.dtype {
            FloatDtype::F32 => Format::F32,
            FloatDtype::BF16 => Format::Bf16,
            FloatDtype::F16 => Format::F16,
        };
        if name.starts_with("lm_head.") || name.starts_with("model.embed_tokens.") {
            return match (self.lm_head, self.quantize) {
                (Some(f), _) => f,
                (None, Some(_)) => Format::Bf16,
                (None, None) => dense,
            };
        }
        self.quantize.map_or(dense, Quantize::format)
    }

    /// Whether any weight is stored other than as f32.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// These options on backend `B`: the bf16 embeddings and lm_head that a quantized
    /// base gets by default become f32 where `B` has no bf16 on `device` (wgpu), and a
    /// half-precision storage asked for that `B` cannot compute with is refused (without
    /// this check the weights would load and give wrong numbers).
    pub fn for_backend<B: Backend>(mut self, device: &B::Device) -> Result<Self> {
        if self.quantize.is_some()
            && self.lm_head.is_none()
            && !B::supports_dtype(device, DType::BF16)
        {
            tracing::info!(
                "backend {} has no bf16: embeddings and lm_head of the quantized base kept f32",
                B::name(device)
            );
            self.lm_head = Some(Format::F32);
        }
        self.check_backend::<B>(device)?;
        Ok(self)
    }

    fn check_backend<B: Backend>(&self, device: &B::Device) -> Result<()> {
        let names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"];
        for (name, what) in names
            .into_iter()
            .zip(["projections", "embeddings and lm_head"])
        {
            let (dtype, label) = match self.format_of(name) {
                Format::Bf16 => (DType::BF16, "bf16"),
                Format::F16 => (DType::F16, "f16"),
                _ => continue,
            };
            if !B::supports_dtype(device, dtype) {
                let supported: Vec<&str> = [(DType::F16, "f16"), (DType::BF16, "bf16")]
                    .into_iter()
                    .filter(|(d, _)| B::supports_dtype(device, *d))
                    .map(|(_, n)| n)
                    .chain(["f32"])
                    .collect();
                return Err(HubError::Options {
                    key: format!("dtype (of the {what})"),
                    expected: format!(
                        "a type backend {} computes with on this device ({})",
                        B::name(device),
                        supported.join(", ")
                    ),
                    found: label.into(),
                });
            }
        }
        Ok(())
    }

    /// A short description for logs and reports (`"nf4 projections, embeddings and
    /// lm_head bf16"`, `"bf16"`).
    pub fn describe(&self) -> String {
        let head = self.format_of("lm_head.weight").name();
        match self.quantize {
            Some(q) => format!(
                "{} projections, embeddings and lm_head {head}",
                q.format().name()
            ),
            None => self.dtype.torch_name().to_string(),
        }
    }
}

/// `m` (as read) converted into `format`; `name` appears in errors. A matrix already in
/// `format` is returned as is.
pub(crate) fn convert(name: &str, m: QuantMatrix, format: Format) -> Result<QuantMatrix> {
    if m.format() == format {
        return Ok(m);
    }
    let (rows, cols) = (m.rows(), m.cols());
    let values = match m.into_storage() {
        Storage::F32(v) => v,
        other => {
            let m = QuantMatrix::new(name, rows, cols, other).map_err(kernel(name))?;
            m.dequantize()
        }
    };
    QuantMatrix::quantize(name, &values, rows, cols, format).map_err(kernel(name))
}

/// A kernel error about tensor `name` as a [`HubError`].
pub(crate) fn kernel(name: &str) -> impl FnOnce(legora_kernels::KernelError) -> HubError + '_ {
    move |e| HubError::Quantization {
        tensor: name.to_string(),
        message: e.to_string(),
    }
}
