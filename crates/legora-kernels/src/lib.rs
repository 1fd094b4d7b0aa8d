//! # legora-kernels
//!
//! The transformer ops legora's models spend their time in, each behind one generic
//! function that works on any burn backend:
//!
//! | op | what |
//! |---|---|
//! | [`lora_linear`] | `x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` (a frozen linear with one LoRA adapter) |
//! | [`routed_lora_linear`] | the same with task-routed experts, each row through its own |
//! | [`gated_lora_linear`] | router-gated experts in the stacked-rank form |
//! | [`attention`] | scaled dot-product attention, grouped-query heads, additive mask |
//! | [`rms_norm`] | transformers' `LlamaRMSNorm` (f32 statistics) |
//! | [`rotary`] | rotate-half RoPE (`apply_rotary_pos_emb`) |
//! | [`swiglu`] | `silu(gate) · up` |
//! | [`next_token_nll`] | per-token negative log-likelihood of the next token |
//! | [`dropout`] | inverted dropout, training only |
//!
//! Every op has a **reference path** ([`reference`]) written with burn tensor ops: it is
//! what GPU backends and `ndarray` run, and what the fast paths are tested against.
//! With the `flex` feature (on by default), `Flex` and `Autodiff<Flex>` take **fused CPU
//! kernels** instead: one multi-threaded pass per op (the matmuls inside attention go to
//! `gemm` directly), and under autodiff one backward node per op with a hand-written
//! gradient, instead of the 5–20 nodes (and as many full-size temporaries) the
//! composition records. The dispatch is by type: no trait bound changes for callers.
//!
//! Only f32 tensors take the fused kernels; other dtypes take the reference path.

mod error;
pub mod quant;
pub mod reference;

pub use error::{KernelError, Result};
pub use quant::{frozen_linear, FrozenWeight};

#[cfg(feature = "flex")]
mod flex;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Whether backend `B` runs the fused kernels (`Flex` and `Autodiff<Flex>` with the
/// `flex` feature) rather than the reference path.
pub fn has_fused_kernels<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    {
        flex::mode::<B>().is_some()
    }
    #[cfg(not(feature = "flex"))]
    {
        false
    }
}

/// One LoRA adapter on a linear layer, for [`lora_linear`]: PEFT's `lora_A.weight`
/// `[r, in]`, `lora_B.weight` `[out, r]`, its scaling and dropout.
#[derive(Debug, Clone)]
pub struct LoraTerm<B: Backend> {
    /// `lora_A.weight`, `[r, in]`.
    pub lora_a: Tensor<B, 2>,
    /// `lora_B.weight`, `[out, r]`.
    pub lora_b: Tensor<B, 2>,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA).
    pub scale: f64,
    /// Dropout on the adapter's input, training only.
    pub dropout: f64,
}

/// A linear layer with one LoRA adapter, computed in activation space:
/// `x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ` (PEFT's `lora.Linear.forward`). Every input may
/// be trainable; with a frozen base only `x`, `A` and `B` get gradients.
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[r, in]`,
///   lora_b: `[out, r]` → `[N, out]`
pub fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: LoraTerm<B>,
) -> Tensor<B, 2> {
    let rank = lora.lora_a.dims()[0];
    let routed = RoutedLora {
        lora_a: lora.lora_a,
        lora_b: lora.lora_b,
        rank,
        scales: vec![lora.scale],
        dropout: lora.dropout,
        experts: None,
    };
    routed_lora_linear(x, weight, bias, routed)
}

/// Task-routed LoRA experts on one linear layer, for [`routed_lora_linear`]: the experts'
/// `lora_A` stacked along rows, `lora_B` along columns (all of rank `rank`), their
/// scalings, one dropout rate, and the expert of every row.
#[derive(Debug, Clone)]
pub struct RoutedLora<B: Backend> {
    /// `A_cat = cat(lora_A_e)`, `[E·r, in]`.
    pub lora_a: Tensor<B, 2>,
    /// `B_cat = cat(lora_B_e, dim 1)`, `[out, E·r]`.
    pub lora_b: Tensor<B, 2>,
    /// `r`, every expert's rank.
    pub rank: usize,
    /// Each expert's scaling.
    pub scales: Vec<f64>,
    /// Dropout on the experts' input (one mask), training only.
    pub dropout: f64,
    /// Expert of each row (`N` entries, each `< E`); `None`: expert 0 for every row.
    pub experts: Option<Vec<usize>>,
}

/// A linear layer where each row goes through its own LoRA expert:
/// `y_i = x_i·Wᵀ + b + s_e·(dropout(x_i)·A_eᵀ)·B_eᵀ` with `e` = `experts[i]` — what the
/// stacked mixture computes with one-hot gates, without the zero-gated experts' work
/// (mLoRA's BatchLoRA: several adapters trained in one pass over one frozen base).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[E·r, in]`,
///   lora_b: `[out, E·r]` → `[N, out]`
pub fn routed_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: RoutedLora<B>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, weight, bias, lora) = match flex::lora_linear(x, weight, bias, lora) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::routed_lora_linear(x, weight, bias, lora)
}

/// Router-gated LoRA experts on one linear layer, for [`gated_lora_linear`]: the
/// experts' `lora_A` stacked along rows, `lora_B` along columns (all of rank `rank`),
/// their scalings, one dropout rate, and the gates `[N, E]` (differentiable).
#[derive(Debug, Clone)]
pub struct GatedLora<B: Backend> {
    /// `A_cat = cat(lora_A_e)`, `[E·r, in]`.
    pub lora_a: Tensor<B, 2>,
    /// `B_cat = cat(lora_B_e, dim 1)`, `[out, E·r]`.
    pub lora_b: Tensor<B, 2>,
    /// `r`, every expert's rank.
    pub rank: usize,
    /// Each expert's scaling.
    pub scales: Vec<f64>,
    /// Dropout on the experts' input (one mask), training only.
    pub dropout: f64,
    /// Gate of each row for each expert, `[N, E]`.
    pub gates: Tensor<B, 2>,
}

/// A mixture of LoRA experts on a linear layer in the stacked-rank form (two skinny
/// products for any number of experts): `x·Wᵀ + b + ((dropout(x)·A_catᵀ) ⊙ G)·B_catᵀ` with
/// `G[i, e·r..(e+1)·r] = gates[i, e]·s_e`. Gradients reach the gates (router training).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[E·r, in]`,
///   lora_b: `[out, E·r]`, gates: `[N, E]` → `[N, out]`
pub fn gated_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: GatedLora<B>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, weight, bias, lora) = match flex::gated_lora_linear(x, weight, bias, lora) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::gated_lora_linear(x, weight, bias, lora)
}

/// Scaled dot-product attention with grouped-query heads (query head `j` reads
/// kv head `j / (heads / kv_heads)`, as transformers' `repeat_kv`) and an additive mask
/// (0 where allowed, a large negative value where not). The mask is a constant: it gets
/// no gradient.
///
/// # Shapes
/// - q: `[batch, seq, heads, head_dim]`
/// - k, v: `[batch, total, kv_heads, head_dim]`
/// - mask: `[batch, 1 or heads, seq, total]`
/// - output: `[batch, seq, heads, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (q, k, v, mask) = match flex::attention(q, k, v, mask, scale) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::attention(q, k, v, mask, scale)
}

/// RMSNorm as transformers' `LlamaRMSNorm`: `weight · x / sqrt(mean(x²) + ε)` over the
/// last dimension.
///
/// # Shapes
/// - x: `[..., hidden]`, weight: `[hidden]` → `[..., hidden]`
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (x, weight) = match flex::rms_norm(x, weight, eps) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::rms_norm(x, weight, eps)
}

/// Rotate-half rotary embedding (transformers' `apply_rotary_pos_emb`):
/// `x·cos + rotate_half(x)·sin`, with `rotate_half(x) = [-x₂, x₁]`. `cos` and `sin` are
/// constants: they get no gradient.
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]`, cos, sin: `[batch, seq, 1, head_dim]` → like x
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let x = match flex::rotary(x, cos, sin) {
        Ok(out) => return out,
        Err(x) => x,
    };
    reference::rotary(x, cos, sin)
}

/// The SwiGLU gate: `silu(gate) · up`.
///
/// # Shapes
/// - gate, up: same shape → same shape
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (gate, up) = match flex::swiglu(gate, up) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::swiglu(gate, up)
}

/// Negative log-likelihood of each next token: row `(i, t)` for `t < seq − 1` scores
/// `targets[i·(seq−1) + t]` under `log_softmax(logits[i, t])`. The last position of each
/// row predicts nothing. Targets must lie in `0..vocab` (callers check them).
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, targets: `batch · (seq − 1)` → `[batch · (seq − 1)]`
pub fn next_token_nll<B: Backend>(logits: Tensor<B, 3>, targets: &[i64]) -> Tensor<B, 1> {
    #[cfg(feature = "flex")]
    let logits = match flex::next_token_nll(logits, targets) {
        Ok(out) => return out,
        Err(logits) => logits,
    };
    reference::next_token_nll(logits, targets)
}

/// Inverted dropout: each element is kept with probability `1 − p` and scaled by
/// `1 / (1 − p)`. Applied only when autodiff is on (training), as burn's `Dropout`.
/// The mask comes from the backend's seeded generator, so `B::seed` makes it
/// reproducible.
///
/// # Shapes
/// - x: any → same
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if p == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    #[cfg(feature = "flex")]
    let x = match flex::dropout(x, p) {
        Ok(out) => return out,
        Err(x) => x,
    };
    reference::dropout(x, p)
}
