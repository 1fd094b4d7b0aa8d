//! Rotary position embedding with transformers' `rotate_half` convention.
//!
//! `inv_freq` is computed on the host in f32 exactly as transformers'
//! `ROPE_INIT_FUNCTIONS` do (`default`, `linear`, `llama3`); cos/sin are computed on
//! the device from the position ids, as `LlamaRotaryEmbedding.forward` does:
//! `freqs = inv_freq ⊗ position_ids; emb = cat(freqs, freqs); cos = emb.cos()`.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

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
        if let Some(f) = p.partial_rotary_factor {
            if f != 1.0 {
                return Err(ModelError::unsupported(
                    "partial_rotary_factor",
                    f,
                    "only full rotary embeddings (1.0) are implemented",
                ));
            }
        }
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
            other => {
                return Err(ModelError::unsupported(
                    "rope_type",
                    format!("\"{other}\""),
                    "legora implements \"default\", \"linear\" and \"llama3\"",
                ))
            }
        };
        let inv_freq = inv_freq(theta, head_dim, &kind);
        Ok(Self {
            theta,
            kind,
            inv_freq,
        })
    }

    /// `cos` and `sin` of `cat(freqs, freqs)` for every position.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]` → cos, sin: `[batch, seq, 1, head_dim]` (broadcast over
    ///   the heads of `[batch, seq, heads, head_dim]` projections, before they are
    ///   transposed: the rotation then runs on contiguous memory)
    pub fn cos_sin<B: Backend>(
        &self,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s] = positions.dims();
        let half = self.inv_freq.len();
        let device = positions.device();
        let inv =
            Tensor::<B, 2>::from_data(TensorData::new(self.inv_freq.clone(), [1, half]), &device);
        let pos = positions.float().reshape([b * s, 1]);
        let freqs = pos.matmul(inv); // [b*s, half]
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 1).reshape([b, s, 1, 2 * half]);
        (emb.clone().cos(), emb.sin())
    }
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
        RopeKind::Default => default,
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
