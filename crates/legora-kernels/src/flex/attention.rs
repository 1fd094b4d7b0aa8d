//! Fused attention: per (batch, head) one `Q·Kᵀ` gemm, the mask and a row softmax in
//! place, one `P·V` gemm; the backward recomputes nothing (it keeps `P`) and reads the
//! grouped kv heads in place, so neither `repeat_kv` nor any transpose is materialised.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{
    ad_of, all_f32, backward, contiguous, data, flex_of, from_ad, from_flex, gemm, math, mode,
    record, tensor, value_of, Mode, SendPtr,
};

/// The attention problem's sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    b: usize,
    s: usize,
    t: usize,
    h: usize,
    kv: usize,
    hd: usize,
    /// 1 (one mask for all heads) or `h`.
    mask_heads: usize,
    scale: f32,
}

impl Dims {
    fn rep(&self) -> usize {
        self.h / self.kv
    }
    /// Offset of row 0 of query head `hh` of batch `bi` in `[b, s, h, hd]`.
    fn q_off(&self, bi: usize, hh: usize) -> usize {
        (bi * self.s * self.h + hh) * self.hd
    }
    /// Offset of row 0 of kv head `g` of batch `bi` in `[b, t, kv, hd]`.
    fn kv_off(&self, bi: usize, g: usize) -> usize {
        (bi * self.t * self.kv + g) * self.hd
    }
    /// Offset of the `[s, t]` probabilities of head `hh` of batch `bi` in `[b, h, s, t]`.
    fn p_off(&self, bi: usize, hh: usize) -> usize {
        (bi * self.h + hh) * self.s * self.t
    }
    fn mask_off(&self, bi: usize, hh: usize) -> usize {
        let mh = if self.mask_heads == 1 { 0 } else { hh };
        (bi * self.mask_heads + mh) * self.s * self.t
    }
}

/// Row-wise softmax of `scores + mask`, in place.
fn softmax_rows(p: &mut [f32], mask: &[f32], t: usize) {
    for (row, mrow) in p.chunks_mut(t).zip(mask.chunks(t)) {
        let mut max = f32::NEG_INFINITY;
        for (x, m) in row.iter_mut().zip(mrow) {
            *x += m;
            max = max.max(*x);
        }
        row.iter_mut().for_each(|x| *x -= max);
        math::exp_in_place(row);
        let inv = 1.0 / math::sum(row);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Forward: the output `[b, s, h, hd]` and, with `keep`, the probabilities `[b, h, s, t]`.
fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    d: Dims,
    keep: bool,
) -> (Vec<f32>, Vec<f32>) {
    // Every element of `out` and `probs` is written by a gemm below (which does not read
    // its destination): no zeroing pass.
    let mut out: Vec<f32> = Vec::with_capacity(d.b * d.s * d.h * d.hd);
    let mut probs: Vec<f32> = Vec::with_capacity(if keep { d.b * d.h * d.s * d.t } else { 0 });
    let (out_p, probs_p) = (SendPtr(out.as_mut_ptr()), SendPtr(probs.as_mut_ptr()));
    let (qs, kvs) = (d.h * d.hd, d.kv * d.hd);
    (0..d.b * d.h).into_par_iter().for_each(|task| {
        let (bi, hh) = (task / d.h, task % d.h);
        let g = hh / d.rep();
        let mut scratch = Vec::new();
        let p_ptr = if keep {
            // SAFETY: head (bi, hh) owns its [s, t] block of `probs`.
            unsafe { probs_p.get().add(d.p_off(bi, hh)) }
        } else {
            scratch.resize(d.s * d.t, 0.0);
            scratch.as_mut_ptr()
        };
        let (qp, kp, vp) = (
            q[d.q_off(bi, hh)..].as_ptr(),
            k[d.kv_off(bi, g)..].as_ptr(),
            v[d.kv_off(bi, g)..].as_ptr(),
        );
        // SAFETY: the strided views lie inside q, k, v (offsets from `Dims`); head (bi, hh)
        // owns its [s, t] block of probs and its rows of `out`; the gemm writes all of the
        // block before the slice over it is made.
        let p = unsafe {
            // scores = scale · Q·Kᵀ
            gemm(
                (d.s, d.t, d.hd),
                p_ptr,
                d.t,
                false,
                (qp, qs, 1),
                (kp, 1, kvs),
                d.scale,
            );
            std::slice::from_raw_parts_mut(p_ptr, d.s * d.t)
        };
        softmax_rows(p, &mask[d.mask_off(bi, hh)..][..d.s * d.t], d.t);
        // SAFETY: task (bi, hh) writes only its own head's `[s, hd]` rows of `out`
        // (q_off), reading P (its own buffer) and V in place, all within bounds of `d`.
        unsafe {
            // out = P·V
            let dst = out_p.get().add(d.q_off(bi, hh));
            gemm(
                (d.s, d.hd, d.t),
                dst,
                qs,
                false,
                (p.as_ptr(), d.t, 1),
                (vp, kvs, 1),
                1.0,
            );
        }
    });
    // SAFETY: every (batch, head) task wrote its blocks of both (see above).
    unsafe {
        out.set_len(out.capacity());
        probs.set_len(probs.capacity());
    }
    (out, probs)
}

/// State of the attention backward.
#[derive(Clone, Debug)]
pub(crate) struct AttnState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: FlexTensor,
    dims: Dims,
}

/// `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(P ⊙ dO·Vᵀ))`, `dQ = scale·dS·K`,
/// `dK += scale·dSᵀ·Q`, one task per (batch, kv head) so the group's query heads
/// accumulate into their kv head without races.
fn attention_backward(
    grad: &FlexTensor,
    st: &AttnState,
    needs: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let d = st.dims;
    let (q, k, v, p, dy) = (
        data(&st.q),
        data(&st.k),
        data(&st.v),
        data(&st.probs),
        data(grad),
    );
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dq_p, dk_p, dv_p) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    let (qs, kvs) = (d.h * d.hd, d.kv * d.hd);
    (0..d.b * d.kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / d.kv, task % d.kv);
        let mut ds = vec![0.0f32; d.s * d.t];
        let (kp, vp) = (k[d.kv_off(bi, g)..].as_ptr(), v[d.kv_off(bi, g)..].as_ptr());
        for hh in g * d.rep()..(g + 1) * d.rep() {
            let ph = &p[d.p_off(bi, hh)..][..d.s * d.t];
            let (qp, dop) = (
                q[d.q_off(bi, hh)..].as_ptr(),
                dy[d.q_off(bi, hh)..].as_ptr(),
            );
            // SAFETY: views inside their buffers (offsets from `Dims`); task (bi, g) owns
            // the rows of dk/dv of kv head g and the rows of dq of its query heads.
            unsafe {
                if needs[2] {
                    let dst = dv_p.get().add(d.kv_off(bi, g));
                    gemm(
                        (d.t, d.hd, d.s),
                        dst,
                        kvs,
                        true,
                        (ph.as_ptr(), 1, d.t),
                        (dop, qs, 1),
                        1.0,
                    );
                }
                // dP = dO·Vᵀ
                gemm(
                    (d.s, d.t, d.hd),
                    ds.as_mut_ptr(),
                    d.t,
                    false,
                    (dop, qs, 1),
                    (vp, 1, kvs),
                    1.0,
                );
            }
            for (dsr, pr) in ds.chunks_mut(d.t).zip(ph.chunks(d.t)) {
                let dot = math::dot(dsr, pr);
                dsr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, pv)| *x = pv * (*x - dot));
            }
            // SAFETY: task (bi, g) writes only the dq rows of its own query heads and the
            // dk / dv rows of its own kv head; every offset is within the shapes in `d`.
            unsafe {
                if needs[0] {
                    let dst = dq_p.get().add(d.q_off(bi, hh));
                    gemm(
                        (d.s, d.hd, d.t),
                        dst,
                        qs,
                        false,
                        (ds.as_ptr(), d.t, 1),
                        (kp, kvs, 1),
                        d.scale,
                    );
                }
                if needs[1] {
                    let dst = dk_p.get().add(d.kv_off(bi, g));
                    gemm(
                        (d.t, d.hd, d.s),
                        dst,
                        kvs,
                        true,
                        (ds.as_ptr(), 1, d.t),
                        (qp, qs, 1),
                        d.scale,
                    );
                }
            }
        }
    });
    [
        needs[0].then(|| tensor(dq, st.q.layout().shape())),
        needs[1].then(|| tensor(dk, st.k.layout().shape())),
        needs[2].then(|| tensor(dv, st.v.layout().shape())),
    ]
}

backward!(AttentionBackward, 3, AttnState, attention_backward);

type Args<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Fused [`crate::attention`].
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f64,
) -> Result<Tensor<B, 4>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((q, k, v, mask));
    };
    let ([b, s, h, hd], [kb, t, kv, khd]) = (q.dims(), k.dims());
    let [mb, mh, ms, mt] = mask.dims();
    let fits = all_f32(&[q.dtype(), k.dtype(), v.dtype(), mask.dtype()])
        && kb == b
        && khd == hd
        && kv > 0
        && h % kv == 0
        && v.dims() == k.dims()
        && [mb, ms, mt] == [b, s, t]
        && (mh == 1 || mh == h);
    if !fits {
        return Err((q, k, v, mask));
    }
    let dims = Dims {
        b,
        s,
        t,
        h,
        kv,
        hd,
        mask_heads: mh,
        scale: scale as f32,
    };
    let mask = contiguous(value_of(mask, mode));
    let shape = [b, s, h, hd];
    Ok(match mode {
        Mode::Plain => {
            let (q, k, v) = (
                contiguous(flex_of(q)),
                contiguous(flex_of(k)),
                contiguous(flex_of(v)),
            );
            let (out, _) = forward(data(&q), data(&k), data(&v), data(&mask), dims, false);
            from_flex(tensor(out, &shape))
        }
        Mode::Autodiff => {
            let (mut qa, mut ka, mut va) = (ad_of(q), ad_of(k), ad_of(v));
            qa.primitive = contiguous(qa.primitive);
            ka.primitive = contiguous(ka.primitive);
            va.primitive = contiguous(va.primitive);
            from_ad(record(AttentionBackward, [&qa, &ka, &va], |tracked| {
                let (q, k, v) = (&qa.primitive, &ka.primitive, &va.primitive);
                let (out, probs) = forward(data(q), data(k), data(v), data(&mask), dims, tracked);
                let state = tracked.then(|| AttnState {
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    probs: tensor(probs, &[b, h, s, t]),
                    dims,
                });
                (tensor(out, &shape), state)
            }))
        }
    })
}
