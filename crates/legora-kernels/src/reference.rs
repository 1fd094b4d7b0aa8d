//! The reference path of every op: burn tensor ops only, so it runs on any backend and
//! differentiates through burn's autodiff. The fused kernels are tested against it.

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};

/// `x·Wᵀ + b`, the frozen part of every LoRA linear.
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]` → `[N, out]`
fn frozen_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let y = x.matmul(weight.transpose());
    match bias {
        Some(b) => y + b.unsqueeze_dim(0),
        None => y,
    }
}

/// See [`crate::lora_linear`].
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[r, in]`,
///   lora_b: `[out, r]` → `[N, out]`
pub fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: crate::LoraTerm<B>,
) -> Tensor<B, 2> {
    let y = frozen_linear(x.clone(), weight, bias);
    // lora_B(lora_A(dropout(x))) * scaling, the scale on the rank-r intermediate.
    let h = crate::dropout(x, lora.dropout).matmul(lora.lora_a.transpose()) * lora.scale;
    y + h.matmul(lora.lora_b.transpose())
}

/// See [`crate::stacked_lora_linear`]: `y = x·Wᵀ + b + ((dropout(x)·A_catᵀ) ⊙ G)·B_catᵀ`
/// with `G [N, R]` built from the gating (on the host for one-hot rows, as
/// `gates · expand` for dense gates, so gradients reach them).
///
/// # Shapes
/// - x: `[N, in]`, weight: `[out, in]`, bias: `[out]`, lora_a: `[R, in]`,
///   lora_b: `[out, R]`, dense gates: `[N, E]` → `[N, out]`
pub fn stacked_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: crate::StackedLora<B>,
) -> Tensor<B, 2> {
    let [n, _] = x.dims();
    let device = x.device();
    let e = lora.ranks.len();
    let big_r: usize = lora.ranks.iter().sum();
    let offsets: Vec<usize> = (0..e).map(|k| lora.ranks[..k].iter().sum()).collect();
    let columns = |k: usize| offsets[k]..offsets[k] + lora.ranks[k];
    let g: Tensor<B, 2> = match &lora.gating {
        crate::Gating::Dense(gates) => {
            // [E, R]: expert k's scale over its columns
            let mut m = vec![0f32; e * big_r];
            for (k, s) in lora.scales.iter().enumerate() {
                m[k * big_r..(k + 1) * big_r][columns(k)].fill(*s as f32);
            }
            let expand = Tensor::from_data(TensorData::new(m, [e, big_r]), &device);
            gates.clone().matmul(expand)
        }
        gating => {
            let mut m = vec![0f32; n * big_r];
            for (i, row) in m.chunks_mut(big_r).enumerate() {
                let expert = match gating {
                    crate::Gating::Single(k) => Some(*k),
                    crate::Gating::Rows(rows) => rows[i],
                    crate::Gating::Dense(_) => None,
                };
                if let Some(k) = expert {
                    row[columns(k)].fill(lora.scales[k] as f32);
                }
            }
            Tensor::from_data(TensorData::new(m, [n, big_r]), &device)
        }
    };
    let y = frozen_linear(x.clone(), weight, bias);
    let h = crate::dropout(x, lora.dropout).matmul(lora.lora_a.transpose()) * g;
    y + h.matmul(lora.lora_b.transpose())
}

/// See [`crate::attention`].
///
/// # Shapes
/// - q: `[batch, seq, heads, head_dim]`, k, v: `[batch, total, kv_heads, head_dim]`,
///   mask: `[batch, 1 or heads, seq, total]` → `[batch, seq, heads, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, s, h, hd] = q.dims();
    let [_, t, kv, _] = k.dims();
    let rep = h / kv;
    // query_states.transpose(1, 2); repeat_kv without copying: the query heads of one kv
    // group are stacked along seq.
    let q = q.swap_dims(1, 2).reshape([b, kv, rep * s, hd]);
    let k = k.swap_dims(1, 2);
    let v = v.swap_dims(1, 2);
    let scores = (q.matmul(k.swap_dims(2, 3)) * scale).reshape([b, h, s, t]);
    let scores = scores + mask.expand([b, h, s, t]);
    // attn_weights = softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    let dtype = scores.dtype();
    let probs = softmax(scores.cast(DType::F32), 3).cast(dtype);
    probs
        .reshape([b, kv, rep * s, t])
        .matmul(v)
        .reshape([b, h, s, hd])
        .swap_dims(1, 2)
}

/// The causal (+ window) additive mask of queries at positions `past..past + rows` over
/// keys `0..past + rows`.
///
/// # Shapes
/// → `[1, 1, rows, past + rows]`
pub(crate) fn causal_mask<B: Backend>(
    past: usize,
    rows: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = past + rows;
    let mut m = vec![0f32; rows * t];
    for (r, row) in m.chunks_mut(t).enumerate() {
        let qa = past + r;
        for (k, x) in row.iter_mut().enumerate() {
            if !(k <= qa && window.is_none_or(|w| qa < k + w)) {
                *x = crate::MASKED;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, rows, t]), device)
}

/// See [`crate::packed_attention`]: each sequence's rows written with `slice_assign`,
/// then [`attention`] over its cached positions with a causal mask.
///
/// # Shapes
/// - q: `[T, heads, head_dim]`, k, v: `[T, kv_heads, head_dim]`, buffers
///   `[capacity, kv_heads, head_dim]` → `[T, heads, head_dim]`
pub fn packed_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    seqs: Vec<crate::KvSeq<B>>,
    window: Option<usize>,
    scale: f64,
) -> (Tensor<B, 3>, Vec<crate::KvSeq<B>>) {
    let [_, h, hd] = q.dims();
    let kv = k.dims()[1];
    let device = q.device();
    let mut outs = Vec::with_capacity(seqs.len());
    let mut done = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for s in seqs {
        let (past, rows) = (s.past, s.rows);
        let t = past + rows;
        let kb =
            s.k.slice_assign([past..t, 0..kv, 0..hd], k.clone().narrow(0, off, rows));
        let vb =
            s.v.slice_assign([past..t, 0..kv, 0..hd], v.clone().narrow(0, off, rows));
        let qi = q.clone().narrow(0, off, rows).unsqueeze_dim::<4>(0);
        let ki = kb.clone().narrow(0, 0, t).unsqueeze_dim::<4>(0);
        let vi = vb.clone().narrow(0, 0, t).unsqueeze_dim::<4>(0);
        let mask = causal_mask::<B>(past, rows, window, &device);
        outs.push(attention(qi, ki, vi, mask, scale).reshape([rows, h, hd]));
        done.push(crate::KvSeq {
            k: kb,
            v: vb,
            past,
            rows,
        });
        off += rows;
    }
    (Tensor::cat(outs, 0), done)
}

/// See [`crate::rms_norm`].
///
/// # Shapes
/// - x: `[..., hidden]`, weight: `[hidden]` → `[..., hidden]`
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    // hidden_states = hidden_states.to(torch.float32)
    let xf = x.cast(DType::F32);
    // variance = hidden_states.pow(2).mean(-1, keepdim=True)
    let var = xf.clone().powi_scalar(2).mean_dim(D - 1);
    // hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    let normed = xf * (var + eps).sqrt().recip();
    // self.weight * hidden_states.to(input_dtype)
    normed.cast(dtype) * weight.unsqueeze::<D>()
}

/// See [`crate::rotary`].
///
/// # Shapes
/// - x: `[batch, seq, heads, head_dim]`, cos, sin: `[batch, seq, 1, head_dim]` → like x
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// See [`crate::swiglu`].
///
/// # Shapes
/// - gate, up: same shape → same shape
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// See [`crate::next_token_nll`].
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, targets: `batch · (seq − 1)` → `[batch · (seq − 1)]`
pub fn next_token_nll<B: Backend>(logits: Tensor<B, 3>, targets: &[i64]) -> Tensor<B, 1> {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let n = b * (s - 1);
    let logp = log_softmax(logits.narrow(1, 0, s - 1).reshape([n, v]), 1);
    let idx: Tensor<B, 2, Int> =
        Tensor::from_data(TensorData::new(targets.to_vec(), [n, 1]), &device);
    logp.gather(1, idx).reshape([n]).neg()
}

/// See [`crate::dropout`] (this one always applies the mask).
///
/// # Shapes
/// - x: any → same
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let keep = 1.0 - p;
    let mask = x.random_like(Distribution::Bernoulli(keep));
    x * mask * (1.0 / keep)
}
