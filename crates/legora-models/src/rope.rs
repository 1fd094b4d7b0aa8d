//! Rotary position embedding with transformers' `rotate_half` convention.
//!
//! `inv_freq` is computed on the host in f32 exactly as transformers'
//! `ROPE_INIT_FUNCTIONS` do (`default`, `linear`, `llama3`, `longrope`); cos/sin are
//! computed on the device from the position ids, as `LlamaRotaryEmbedding.forward` does:
//! `freqs = inv_freq ⊗ position_ids; emb = cat(freqs, freqs); cos = emb.cos() *
//! attention_scaling`. With `partial_rotary_factor` < 1 only the first
//! `head_dim · factor` dimensions of each head rotate ([`rotate`]).

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::config::RopeParameters;
use crate::error::{ModelError, Result};

/// The RoPE frequency rule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// `inv_freq_i = θ^(-2i/d)`.
    Default,
    /// Position interpolation: `inv_freq / factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3.1's band-wise rule.
    Llama3 {
        /// Scaling factor for low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Pretraining context length.
        original_max_position_embeddings: usize,
    },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` while every position is
    /// below `original_max_position_embeddings`, `long_factor` once one is not (decided per
    /// forward, as `longrope_frequency_update` does), and cos/sin scaled by
    /// `attention_factor`. [`Rope::inv_freq`] holds the short frequencies.
    LongRope {
        /// The frequencies past the original context.
        long_inv_freq: Vec<f32>,
        /// Pretraining context length.
        original_max_position_embeddings: usize,
        /// cos/sin multiplier (`sqrt(1 + ln(factor) / ln(original))` by default).
        attention_factor: f32,
    },
}

/// Rotary embedding settings and the resulting inverse frequencies.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Base θ (`rope_theta`).
    pub theta: f64,
    /// Frequency rule.
    pub kind: RopeKind,
    /// `head_dim / 2` inverse frequencies, f32 as transformers computes them.
    pub inv_freq: Vec<f32>,
}

fn need(field: &str, v: Option<f64>, kind: &str) -> Result<f64> {
    match v {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        Some(x) => Err(ModelError::config(
            format!("rope_parameters.{field}"),
            "a finite number > 0",
            x,
        )),
        None => Err(ModelError::config(
            format!("rope_parameters.{field}"),
            format!("a value (required by rope_type \"{kind}\")"),
            "nothing",
        )),
    }
}

impl Rope {
    /// Build from `rope_parameters` / `rope_scaling` for heads of `head_dim`.
    pub fn from_parameters(p: &RopeParameters, head_dim: usize) -> Result<Self> {
        let theta = p.rope_theta.unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(ModelError::config(
                "rope_theta",
                "a finite number > 0",
                theta,
            ));
        }
        let dim = rotary_dim(p.partial_rotary_factor, head_dim)?;
        let kind = match p.kind() {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear {
                factor: need("factor", p.factor, "linear")?,
            },
            "llama3" => {
                let low = need("low_freq_factor", p.low_freq_factor, "llama3")?;
                let high = need("high_freq_factor", p.high_freq_factor, "llama3")?;
                if high <= low {
                    return Err(ModelError::config(
                        "rope_parameters.high_freq_factor",
                        format!("> low_freq_factor ({low})"),
                        high,
                    ));
                }
                RopeKind::Llama3 {
                    factor: need("factor", p.factor, "llama3")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            ModelError::config(
                                "rope_parameters.original_max_position_embeddings",
                                "a positive integer (required by rope_type \"llama3\")",
                                "nothing",
                            )
                        })?,
                }
            }
            // transformers 4's Phi-3 spellings of longrope
            "longrope" | "su" | "yarn" if p.long_factor.is_some() => longrope(p, theta, dim)?,
            other => {
                return Err(ModelError::unsupported(
                    "rope_type",
                    format!("\"{other}\""),
                    "legora implements \"default\", \"linear\", \"llama3\" and \"longrope\"",
                ))
            }
        };
        let inv_freq = match &kind {
            RopeKind::LongRope { .. } => {
                let short = p.short_factor.as_deref().unwrap_or_default();
                scaled_inv_freq(theta, dim, short)
            }
            _ => inv_freq(theta, dim, &kind),
        };
        Ok(Self {
            theta,
            kind,
            inv_freq,
        })
    }

    /// `cos` and `sin` of `cat(freqs, freqs)` for every position.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]` → cos, sin: `[batch, seq, 1, rotary_dim]` (broadcast
    ///   over the heads of `[batch, seq, heads, head_dim]` projections, before they are
    ///   transposed: the rotation then runs on contiguous memory)
    pub fn cos_sin<B: Backend>(
        &self,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s] = positions.dims();
        let (inv_freq, scaling) = match &self.kind {
            RopeKind::LongRope {
                long_inv_freq,
                original_max_position_embeddings,
                attention_factor,
            } => {
                // seq_len = torch.max(position_ids) + 1; long_inv_freq if seq_len > original
                let last: i64 = positions.clone().max().into_scalar().elem();
                let long = last + 1 > *original_max_position_embeddings as i64;
                let inv = if long { long_inv_freq } else { &self.inv_freq };
                (inv, Some(*attention_factor))
            }
            _ => (&self.inv_freq, None),
        };
        let half = inv_freq.len();
        let device = positions.device();
        let inv = Tensor::<B, 2>::from_data(TensorData::new(inv_freq.clone(), [1, half]), &device);
        let pos = positions.float().reshape([b * s, 1]);
        let freqs = pos.matmul(inv); // [b*s, half]
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 1).reshape([b, s, 1, 2 * half]);
        match scaling {
            Some(a) => (emb.clone().cos() * a, emb.sin() * a),
            None => (emb.clone().cos(), emb.sin()),
        }
    }
}

/// Rotate `x` by the tables of [`Rope::cos_sin`]: every dimension of each head, or (with a
/// partial rotary factor) the first `rotary_dim`, the rest passing through
/// (`q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]`).
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]`, cos, sin: `[batch, seq, 1, rotary_dim]` → x's
pub(crate) fn rotate<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (hd, rd) = (x.dims()[3], cos.dims()[3]);
    if rd == hd {
        return legora_kernels::rotary(x, cos, sin);
    }
    let rot = legora_kernels::rotary(x.clone().narrow(3, 0, rd), cos, sin);
    Tensor::cat(vec![rot, x.narrow(3, rd, hd - rd)], 3)
}

/// The rotated dimensions of a head: `int(head_dim * partial_rotary_factor)`, even and > 0.
fn rotary_dim(factor: Option<f64>, head_dim: usize) -> Result<usize> {
    let f = factor.unwrap_or(1.0);
    let dim = (head_dim as f64 * f) as usize;
    if !(f > 0.0 && f <= 1.0) || dim == 0 || dim % 2 != 0 {
        return Err(ModelError::config(
            "partial_rotary_factor",
            format!("a factor in (0, 1] giving an even number of the {head_dim} head dimensions"),
            f,
        ));
    }
    Ok(dim)
}

/// `_compute_longrope_parameters`: the long frequencies and the attention factor; the
/// factors must have one entry per rotated pair.
fn longrope(p: &RopeParameters, theta: f64, dim: usize) -> Result<RopeKind> {
    let original = p
        .original_max_position_embeddings
        .filter(|n| *n > 1)
        .ok_or_else(|| {
            ModelError::config(
                "original_max_position_embeddings",
                "the pretraining context (> 1, required by rope_type \"longrope\")",
                "nothing",
            )
        })?;
    for (key, f) in [
        ("long_factor", &p.long_factor),
        ("short_factor", &p.short_factor),
    ] {
        let n = f.as_ref().map_or(0, Vec::len);
        if n != dim / 2 {
            return Err(ModelError::config(
                format!("rope_parameters.{key}"),
                format!("{} factors (one per rotated pair)", dim / 2),
                n,
            ));
        }
        if let Some(bad) = f.iter().flatten().find(|x| !(x.is_finite() && **x > 0.0)) {
            return Err(ModelError::config(
                format!("rope_parameters.{key}"),
                "finite factors > 0",
                bad,
            ));
        }
    }
    // if factor <= 1.0: attention_factor = 1.0
    // else: attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))
    let attention_factor = match (p.attention_factor, p.factor) {
        (Some(a), _) => a,
        (None, Some(f)) if f > 1.0 => (1.0 + f.ln() / (original as f64).ln()).sqrt(),
        _ => 1.0,
    };
    let long = p.long_factor.as_deref().unwrap_or_default();
    Ok(RopeKind::LongRope {
        long_inv_freq: scaled_inv_freq(theta, dim, long),
        original_max_position_embeddings: original,
        attention_factor: attention_factor as f32,
    })
}

/// LongRoPE's frequencies: `1.0 / (ext_factors * base**inv_freq_shape)`, in f32.
fn scaled_inv_freq(theta: f64, dim: usize, factors: &[f64]) -> Vec<f32> {
    let (base, d) = (theta as f32, dim as f32);
    (0..dim)
        .step_by(2)
        .zip(factors)
        .map(|(i, &f)| 1.0 / (f as f32 * base.powf(i as f32 / d)))
        .collect()
}

/// transformers' `_compute_default_rope_parameters` (+ `linear` / `llama3`), in f32.
fn inv_freq(theta: f64, head_dim: usize, kind: &RopeKind) -> Vec<f32> {
    let base = theta as f32;
    let d = head_dim as f32;
    // 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    let default: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d))
        .collect();
    match *kind {
        RopeKind::Default | RopeKind::LongRope { .. } => default,
        RopeKind::Linear { factor } => default.iter().map(|f| f / factor as f32).collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    // inv_freq_llama = where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
                    if wavelen >= high_wavelen && wavelen <= low_wavelen {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_bands() {
        // head_dim 16, θ 10000: wavelengths 2π·10000^(k/8) = 6.28, 19.9, 62.8, ...
        // original 16, low 1, high 4 → low_wavelen 16, high_wavelen 4:
        // k = 0 (6.28) is medium (smoothed), k ≥ 1 are low-frequency (divided by 8).
        let p = RopeParameters {
            rope_type: Some("llama3".into()),
            rope_theta: Some(10000.0),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(16),
            ..Default::default()
        };
        let r = Rope::from_parameters(&p, 16).unwrap();
        let f0 = 1.0f32;
        let wl = 2.0 * std::f32::consts::PI;
        let smooth = (16.0 / wl - 1.0) / 3.0;
        let want0 = (1.0 - smooth) * f0 / 8.0 + smooth * f0;
        assert!((r.inv_freq[0] - want0).abs() < 1e-7);
        let f1 = 1.0 / 10000f32.powf(2.0 / 16.0);
        assert!((r.inv_freq[1] - f1 / 8.0).abs() < 1e-9);
    }

    #[test]
    fn missing_scaling_fields_are_named() {
        let p = RopeParameters {
            rope_type: Some("linear".into()),
            ..Default::default()
        };
        let e = Rope::from_parameters(&p, 16).unwrap_err();
        assert!(e.to_string().contains("rope_parameters.factor"), "{e}");
    }
}
