//! # legora-kernels
//!
//! The transformer ops legora's models spend their time in, each behind one generic
//! function that works on any burn backend:
//!
//! | op | what |
//! |---|---|
//! | [`stacked_lora_linear`] | a frozen linear with E LoRA experts in the stacked-rank form: one expert, each row through its own ([`Gating::Rows`]), or router gates ([`Gating::Dense`]) |
//! | [`stacked_lora_frozen`] | the same over a [`FrozenWeight`] kept in its storage format (bf16, f16, int8, NF4, FP4) |
//! | [`lora_linear`] | `x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`, the one-adapter case |
//! | [`attention`] | scaled dot-product attention, grouped-query heads, additive mask |
//! | [`packed_attention`] | causal attention of packed sequences over their own key/value caches (continuous batching) |
//! | [`rms_norm`] | transformers' `LlamaRMSNorm` (f32 statistics) |
//! | [`rotary`] | rotate-half RoPE (`apply_rotary_pos_emb`) |
//! | [`swiglu`] | `silu(gate) · up` |
//! | [`next_token_nll`] | per-token negative log-likelihood of the next token |
//! | [`linear_next_token_nll`] | the same of a frozen `lm_head`'s logits, computed a chunk of rows at a time |
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

// Every `unsafe` block says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]

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
/// `x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ` (PEFT's `lora.Linear.forward`): the
/// [`stacked_lora_linear`] of one expert. Every input may be trainable; with a frozen base
/// only `x`, `A` and `B` get gradients.
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
    let stacked = StackedLora {
        lora_a: lora.lora_a,
        lora_b: lora.lora_b,
        ranks: vec![rank],
        scales: vec![lora.scale],
        dropout: lora.dropout,
        gating: Gating::Single(0),
    };
    stacked_lora_linear(x, weight, bias, stacked)
}

/// How the rows of a [`stacked_lora_linear`] use its experts.
#[derive(Debug, Clone)]
pub enum Gating<B: Backend> {
    /// Every row through expert `e` alone.
    Single(usize),
    /// Row `i` through expert `rows[i]` alone, or through the frozen base alone for
    /// `None` — mLoRA's BatchLoRA: several adapters in one pass over one frozen base,
    /// without the other experts' (zero-gated) work.
    Rows(std::sync::Arc<[Option<usize>]>),
    /// Row `i` mixes every expert `e` with weight `gates[i, e]`, `[N, E]` (a router's
    /// gates); gradients reach the gates.
    Dense(Tensor<B, 2>),
}

/// E LoRA experts on one linear layer, stacked: every expert's `lora_A` along rows,
/// `lora_B` along columns (ranks may differ), their scalings, one dropout rate (one
/// mask), and how rows use them.
#[derive(Debug, Clone)]
pub struct StackedLora<B: Backend> {
    /// `A_cat = cat(lora_A_e)`, `[R, in]` with `R = Σ_e r_e`.
    pub lora_a: Tensor<B, 2>,
    /// `B_cat = cat(lora_B_e, dim 1)`, `[out, R]`.
    pub lora_b: Tensor<B, 2>,
    /// `r_e` of each expert, in stacking order.
    pub ranks: Vec<usize>,
    /// Each expert's scaling.
    pub scales: Vec<f64>,
    /// Dropout on the experts' input (one mask), training only.
    pub dropout: f64,
    /// Which experts each row uses.
    pub gating: Gating<B>,
}

/// A frozen linear layer with a stack of LoRA experts, in activation space:
/// `y = x·Wᵀ + b + ((dropout(x)·A_catᵀ) ⊙ G)·B_catᵀ` where `G[i, cols(e)] = g_ie·s_e`
/// and `g_ie` is 1 for the row's expert ([`Gating::Single`], [`Gating::Rows`]) or the
/// row's gate ([`Gating::Dense`]). One adapter is the case `E = 1`; a router-gated
/// mixture costs two skinny products for any E; task-routed rows only pay their own
/// expert.
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[R, in]`,
///   lora_b: `[out, R]`, dense gates: `[N, E]` → `[N, out]`
pub fn stacked_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, weight, bias, lora) = match flex::stacked_lora_linear(x, weight, bias, lora) {
        Ok(out) => return out,
        Err(args) => args,
    };
    reference::stacked_lora_linear(x, weight, bias, lora)
}

/// [`stacked_lora_linear`] over a frozen base weight kept in its storage format
/// ([`FrozenWeight`]: f32, bf16, f16, int8, NF4, FP4). On `Flex` / `Autodiff<Flex>` the
/// frozen products dequantize one tile at a time inside the gemm loop (an f32 weight
/// takes exactly the gemms of [`stacked_lora_linear`]); the backward keeps a shared
/// handle on the weight, never a dense copy, and the weight gets no gradient. Elsewhere
/// the weight is dequantized with burn ops ([`FrozenWeight::dequantize_reference`]) for
/// this one projection, then the reference path runs (said once in the log for a
/// quantized weight).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[R, in]`,
///   lora_b: `[out, R]`, dense gates: `[N, E]` → `[N, out]`
pub fn stacked_lora_frozen<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, bias, lora) = match flex::stacked_lora_frozen(x, weight, bias, lora) {
        Ok(out) => return out,
        Err(args) => args,
    };
    quant::note_reference_path(weight);
    reference::stacked_lora_linear(x, weight.dequantize_reference().detach(), bias, lora)
}

/// The additive score of a key a query may not see: finite, so that a row that sees no
/// key (a left-padding query) gets a uniform softmax instead of NaN.
pub const MASKED: f32 = -1e9;

/// Which keys each query of [`attention`] sees.
#[derive(Debug, Clone)]
pub enum AttnMask<B: Backend> {
    /// An additive mask `[batch, 1 or heads, seq, keys]`: 0 where allowed, [`MASKED`]
    /// where not.
    Dense(Tensor<B, 4>),
    /// Causal, decided per score as it is computed (no `[seq, keys]` mask exists): the
    /// queries are the last `seq` of the `keys` positions, query `i` sees key `j` iff
    /// `j ≤ keys - seq + i` and, with a window, `keys - seq + i - window < j`; plus an
    /// additive term per key (0, or [`MASKED`] for padding).
    Causal {
        /// The attention window, if any.
        window: Option<usize>,
        /// `[batch, keys]`, added to every query's score of that key.
        key_padding: Option<Tensor<B, 2>>,
    },
}

impl<B: Backend> AttnMask<B> {
    /// The mask as a dense additive one, `[batch, 1 or heads, seq, keys]` (what the
    /// reference path adds to the scores).
    pub fn to_dense(
        self,
        batch: usize,
        seq: usize,
        keys: usize,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        match self {
            AttnMask::Dense(m) => m,
            AttnMask::Causal {
                window,
                key_padding,
            } => {
                let c = reference::causal_mask::<B>(keys.saturating_sub(seq), seq, window, device);
                match key_padding {
                    Some(p) => c + p.reshape([batch, 1, 1, keys]),
                    None => c.repeat_dim(0, batch),
                }
            }
        }
    }
}

/// Scaled dot-product attention with grouped-query heads (query head `j` reads
/// kv head `j / (heads / kv_heads)`, as transformers' `repeat_kv`) under `mask`. The
/// mask is a constant: it gets no gradient.
///
/// # Shapes
/// - q: `[batch, seq, heads, head_dim]`
/// - k, v: `[batch, keys, kv_heads, head_dim]` (`keys ≥ seq` for a causal mask)
/// - mask: dense `[batch, 1 or heads, seq, keys]`, or causal with padding `[batch, keys]`
/// - output: `[batch, seq, heads, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: AttnMask<B>,
    scale: f64,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (q, k, v, mask) = match flex::attention(q, k, v, mask, scale) {
        Ok(out) => return out,
        Err(args) => args,
    };
    let ([b, s, ..], t) = (q.dims(), k.dims()[1]);
    let mask = mask.to_dense(b, s, t, &q.device());
    reference::attention(q, k, v, mask, scale)
}

/// One sequence of a [`packed_attention`] call: its key and value buffers and how many of
/// their rows are cached, and its number of new tokens.
#[derive(Debug, Clone)]
pub struct KvSeq<B: Backend> {
    /// Key buffer `[capacity, kv_heads, head_dim]`: rows `0..past` hold the cached keys
    /// (after RoPE); `capacity ≥ past + rows`.
    pub k: Tensor<B, 3>,
    /// Value buffer, like `k`.
    pub v: Tensor<B, 3>,
    /// Cached positions.
    pub past: usize,
    /// New tokens: the next `rows` rows of the packed `q`, `k` and `v`.
    pub rows: usize,
}

/// Causal attention of packed sequences, each over its own key/value cache (continuous
/// batching: one call for sequences of different lengths, no padding). Sequence `i`'s new
/// tokens are consecutive rows of `q`, `k`, `v` (sequences in order); its new keys and
/// values are first written into its buffers after its `past` cached rows (in place with
/// the fused kernel when a buffer is not shared), then its token at position `past + j`
/// attends to keys `0..=past + j` (those inside `window`, if any), with grouped-query
/// heads as [`attention`]. Returns the output and the sequences with their updated
/// buffers (`past` unchanged: the caller advances it).
///
/// Computes what [`attention`] computes for one sequence alone with a causal mask over
/// the same positions (same score and probability products, same masking).
///
/// # Shapes
/// - q: `[T, heads, head_dim]`, k, v: `[T, kv_heads, head_dim]` with `T = Σ rows`
/// - buffers: `[capacity ≥ past + rows, kv_heads, head_dim]`
/// - output: `[T, heads, head_dim]`
pub fn packed_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    seqs: Vec<KvSeq<B>>,
    window: Option<usize>,
    scale: f64,
) -> Result<(Tensor<B, 3>, Vec<KvSeq<B>>)> {
    check_packed(&q, &k, &v, &seqs)?;
    #[cfg(feature = "flex")]
    let (q, k, v, seqs) = match flex::packed_attention(q, k, v, seqs, window, scale) {
        Ok(out) => return Ok(out),
        Err(args) => args,
    };
    Ok(reference::packed_attention(q, k, v, seqs, window, scale))
}

/// The shape checks of [`packed_attention`].
fn check_packed<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    seqs: &[KvSeq<B>],
) -> Result<()> {
    let invalid = |what: &str, message: String| {
        Err(KernelError::Invalid {
            what: what.into(),
            message,
        })
    };
    let ([n, h, hd], [kn, kv, khd]) = (q.dims(), k.dims());
    if [kn, khd] != [n, hd] || v.dims() != k.dims() || kv == 0 || h % kv != 0 {
        return invalid(
            "packed attention",
            format!(
                "q {:?}, k {:?}, v {:?}: expected q [T, heads, head_dim] and k, v \
                 [T, kv_heads, head_dim] with heads a multiple of kv_heads",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        );
    }
    if seqs.is_empty() || seqs.iter().any(|s| s.rows == 0) {
        return invalid(
            "packed attention",
            "every call needs at least one sequence, each with at least one new token".into(),
        );
    }
    let total: usize = seqs.iter().map(|s| s.rows).sum();
    if total != n {
        return invalid(
            "packed attention",
            format!("the sequences have {total} new tokens, q has {n} rows"),
        );
    }
    for (i, s) in seqs.iter().enumerate() {
        let [cap, skv, shd] = s.k.dims();
        if s.v.dims() != s.k.dims() || [skv, shd] != [kv, hd] || cap < s.past + s.rows {
            return invalid(
                &format!("packed attention, sequence {i}"),
                format!(
                    "key buffer {:?}, value buffer {:?}: expected [capacity ≥ {}, {kv}, {hd}]",
                    s.k.dims(),
                    s.v.dims(),
                    s.past + s.rows
                ),
            );
        }
    }
    Ok(())
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

/// [`next_token_nll`] of the logits `h·Wᵀ` of a frozen output head without bias
/// (`lm_head`). On flex the `[tokens, vocab]` logits never exist whole: they are computed
/// a chunk of rows at a time, and the backward keeps one `[hidden]` row per scored token
/// instead of the logits (computed in the forward: the loss is the last op, so each row's
/// gradient is its output gradient times `(softmax − one_hot)·W`). Elsewhere, the logits
/// through [`frozen_linear`], then [`next_token_nll`].
///
/// # Shapes
/// - h: `[batch, seq, hidden]`, w: `[vocab, hidden]`, targets: `batch · (seq − 1)` →
///   `[batch · (seq − 1)]`
pub fn linear_next_token_nll<B: Backend>(
    h: Tensor<B, 3>,
    w: &FrozenWeight<B>,
    targets: &[i64],
) -> Tensor<B, 1> {
    #[cfg(feature = "flex")]
    let h = match flex::linear_next_token_nll(h, w, targets) {
        Ok(out) => return out,
        Err(h) => h,
    };
    let [b, s, d] = h.dims();
    let [v, _] = w.dims();
    let logits = frozen_linear(h.reshape([b * s, d]), w, None).reshape([b, s, v]);
    next_token_nll(logits, targets)
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
