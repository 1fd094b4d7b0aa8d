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
use crate::{AttnMask, KvSeq, MASKED};

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

/// Softmax of one row of scores, in place.
fn softmax_row(row: &mut [f32], max: f32) {
    row.iter_mut().for_each(|x| *x -= max);
    math::exp_in_place(row);
    let inv = 1.0 / math::sum(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// The mask of one forward, as the kernel reads it.
#[derive(Clone, Copy)]
enum MaskRef<'a> {
    /// `[b, 1 or h, s, t]`, added.
    Dense(&'a [f32]),
    /// Causal (the queries are the last `s` keys) within `window`, plus `[b, t]` padding.
    Causal {
        window: Option<usize>,
        padding: Option<&'a [f32]>,
    },
}

impl MaskRef<'_> {
    /// Row-wise softmax of head (`bi`, `hh`)'s scores `p` (`[s, t]`) under the mask, in
    /// place.
    fn softmax(self, p: &mut [f32], d: &Dims, bi: usize, hh: usize) {
        match self {
            MaskRef::Dense(m) => softmax_rows(p, &m[d.mask_off(bi, hh)..][..d.s * d.t], d.t),
            MaskRef::Causal { window, padding } => {
                let pad = padding.map(|p| &p[bi * d.t..(bi + 1) * d.t]);
                softmax_causal(p, d.t, d.t - d.s, window, pad)
            }
        }
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
        softmax_row(row, max);
    }
}

/// `P = scale·Q·Kᵀ` of one query head over `t` keys: `s` rows of `q` (row stride `qs`),
/// `t` rows of `k` (row stride `kvs`), into `p` (`[s, t]`, row stride `t`).
///
/// # Safety
/// `q`, `k` and `p` must address the whole strided matrices they describe.
#[allow(clippy::too_many_arguments)]
unsafe fn head_scores(
    (s, t, hd): (usize, usize, usize),
    p: *mut f32,
    q: *const f32,
    qs: usize,
    k: *const f32,
    kvs: usize,
    scale: f32,
) {
    gemm((s, t, hd), p, t, false, (q, qs, 1), (k, 1, kvs), scale);
}

/// `out = P·V` of one query head: `p` `[s, t]`, `t` rows of `v` (row stride `kvs`), into
/// `s` rows of `out` (row stride `qs`).
///
/// # Safety
/// As [`head_scores`].
unsafe fn head_output(
    (s, t, hd): (usize, usize, usize),
    out: *mut f32,
    qs: usize,
    p: *const f32,
    v: *const f32,
    kvs: usize,
) {
    gemm((s, hd, t), out, qs, false, (p, t, 1), (v, kvs, 1), 1.0);
}

/// Forward: the output `[b, s, h, hd]` and, with `keep`, the probabilities `[b, h, s, t]`.
fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: MaskRef<'_>,
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
            head_scores((d.s, d.t, d.hd), p_ptr, qp, qs, kp, kvs, d.scale);
            std::slice::from_raw_parts_mut(p_ptr, d.s * d.t)
        };
        mask.softmax(p, &d, bi, hh);
        // SAFETY: task (bi, hh) writes only its own head's `[s, hd]` rows of `out`
        // (q_off), reading P (its own buffer) and V in place, all within bounds of `d`.
        unsafe {
            let dst = out_p.get().add(d.q_off(bi, hh));
            head_output((d.s, d.t, d.hd), dst, qs, p.as_ptr(), vp, kvs);
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

type Args<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, AttnMask<B>);

/// Whether the fused kernel takes these shapes and dtypes: `Some(mask heads)`.
fn fits<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    mask: &AttnMask<B>,
) -> Option<usize> {
    let ([b, s, h, hd], [kb, t, kv, khd]) = (q.dims(), k.dims());
    let shapes = all_f32(&[q.dtype(), k.dtype(), v.dtype()])
        && kb == b
        && khd == hd
        && kv > 0
        && h % kv == 0
        && v.dims() == k.dims();
    let mask_heads = match mask {
        AttnMask::Dense(m) => {
            let [mb, mh, ms, mt] = m.dims();
            let ok = all_f32(&[m.dtype()]) && [mb, ms, mt] == [b, s, t] && (mh == 1 || mh == h);
            ok.then_some(mh)
        }
        AttnMask::Causal { key_padding, .. } => {
            let ok = t >= s
                && key_padding
                    .as_ref()
                    .is_none_or(|p| p.dims() == [b, t] && all_f32(&[p.dtype()]));
            ok.then_some(1)
        }
    };
    mask_heads.filter(|_| shapes)
}

/// Fused [`crate::attention`].
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: AttnMask<B>,
    scale: f64,
) -> Result<Tensor<B, 4>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((q, k, v, mask));
    };
    let Some(mask_heads) = fits(&q, &k, &v, &mask) else {
        return Err((q, k, v, mask));
    };
    let ([b, s, h, hd], [_, t, kv, _]) = (q.dims(), k.dims());
    let dims = Dims {
        b,
        s,
        t,
        h,
        kv,
        hd,
        mask_heads,
        scale: scale as f32,
    };
    // The mask's values, contiguous: dense, or the causal mask's padding row per batch.
    let (window, dense, padding) = match mask {
        AttnMask::Dense(m) => (None, Some(contiguous(value_of(m, mode))), None),
        AttnMask::Causal {
            window,
            key_padding,
        } => (
            window,
            None,
            key_padding.map(|p| contiguous(value_of(p, mode))),
        ),
    };
    let mask_ref = match &dense {
        Some(m) => MaskRef::Dense(data(m)),
        None => MaskRef::Causal {
            window,
            padding: padding.as_ref().map(data),
        },
    };
    let shape = [b, s, h, hd];
    Ok(match mode {
        Mode::Plain => {
            let (q, k, v) = (
                contiguous(flex_of(q)),
                contiguous(flex_of(k)),
                contiguous(flex_of(v)),
            );
            let (out, _) = forward(data(&q), data(&k), data(&v), mask_ref, dims, false);
            from_flex(tensor(out, &shape))
        }
        Mode::Autodiff => {
            let (mut qa, mut ka, mut va) = (ad_of(q), ad_of(k), ad_of(v));
            qa.primitive = contiguous(qa.primitive);
            ka.primitive = contiguous(ka.primitive);
            va.primitive = contiguous(va.primitive);
            from_ad(record(AttentionBackward, [&qa, &ka, &va], |tracked| {
                let (q, k, v) = (&qa.primitive, &ka.primitive, &va.primitive);
                let (out, probs) = forward(data(q), data(k), data(v), mask_ref, dims, tracked);
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

/// Whether the query at absolute position `qa` sees key `k` (causal, inside the window).
fn visible(qa: usize, k: usize, window: Option<usize>) -> bool {
    // causal: kv_idx <= q_idx; sliding_window_overlay: kv_idx > q_idx - sliding_window
    k <= qa && window.is_none_or(|w| qa < k + w)
}

/// Row-wise causal softmax of `p` `[rows, t]`, the scores of the queries at positions
/// `past..past + rows` over keys `0..t` plus each key's `padding` term, in place: the
/// same sums as adding a dense mask of `MASKED`s and the padding row.
fn softmax_causal(
    p: &mut [f32],
    t: usize,
    past: usize,
    window: Option<usize>,
    padding: Option<&[f32]>,
) {
    for (r, row) in p.chunks_mut(t).enumerate() {
        let mut max = f32::NEG_INFINITY;
        for (k, x) in row.iter_mut().enumerate() {
            let c = if visible(past + r, k, window) {
                0.0
            } else {
                MASKED
            };
            *x += match padding {
                Some(pad) => c + pad[k],
                None => c,
            };
            max = max.max(*x);
        }
        softmax_row(row, max);
    }
}

/// A key/value buffer as a contiguous f32 tensor whose storage is exactly its elements
/// (a copy only when it was a view), so rows can be written in place.
fn owned_buffer(t: FlexTensor) -> FlexTensor {
    let whole = t.is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == t.layout().num_elements() * std::mem::size_of::<f32>();
    if whole {
        t
    } else {
        t.to_contiguous()
    }
}

/// Copy `rows` rows of `row_len` values from `src` (starting at row `from`) into `buf`
/// at row `at`; in place when `buf` is not shared (copy-on-write otherwise).
fn write_rows(
    buf: &mut FlexTensor,
    at: usize,
    src: &[f32],
    from: usize,
    rows: usize,
    row_len: usize,
) {
    let dst = buf.storage_mut::<f32>();
    dst[at * row_len..(at + rows) * row_len]
        .copy_from_slice(&src[from * row_len..(from + rows) * row_len]);
}

/// Sizes of a packed attention call.
#[derive(Clone, Copy, Debug)]
struct PackedDims {
    h: usize,
    kv: usize,
    hd: usize,
    scale: f32,
    window: Option<usize>,
}

/// The inputs handed back when the fused packed kernel does not apply.
pub(crate) type PackedArgs<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>, Vec<KvSeq<B>>);

/// The fused packed kernel's output and the sequences' updated buffers.
pub(crate) type PackedOut<B> = (Tensor<B, 3>, Vec<KvSeq<B>>);

/// Fused [`crate::packed_attention`] (`Flex` only: decoding needs no gradient). Shapes
/// are checked by the caller.
pub(crate) fn packed_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    seqs: Vec<KvSeq<B>>,
    window: Option<usize>,
    scale: f64,
) -> Result<PackedOut<B>, PackedArgs<B>> {
    let f32s = all_f32(&[q.dtype(), k.dtype(), v.dtype()])
        && seqs.iter().all(|s| all_f32(&[s.k.dtype(), s.v.dtype()]));
    if mode::<B>() != Some(Mode::Plain) || !f32s {
        return Err((q, k, v, seqs));
    }
    let [n, h, hd] = q.dims();
    let kv = k.dims()[1];
    let d = PackedDims {
        h,
        kv,
        hd,
        scale: scale as f32,
        window,
    };
    let (q, k, v) = (
        contiguous(flex_of(q)),
        contiguous(flex_of(k)),
        contiguous(flex_of(v)),
    );
    let kvs = kv * hd;
    let mut bufs = Vec::with_capacity(seqs.len());
    let mut off = 0;
    for s in seqs {
        let (mut kb, mut vb) = (owned_buffer(flex_of(s.k)), owned_buffer(flex_of(s.v)));
        write_rows(&mut kb, s.past, data(&k), off, s.rows, kvs);
        write_rows(&mut vb, s.past, data(&v), off, s.rows, kvs);
        bufs.push((kb, vb, off, s.past, s.rows));
        off += s.rows;
    }
    let out = packed_forward(data(&q), &bufs, n, d);
    let seqs = bufs
        .into_iter()
        .map(|(kb, vb, _, past, rows)| KvSeq {
            k: from_flex(kb),
            v: from_flex(vb),
            past,
            rows,
        })
        .collect();
    Ok((from_flex(tensor(out, &[n, h, hd])), seqs))
}

/// One task per (sequence, query head): scores over the sequence's `past + rows` keys,
/// the causal softmax, the product with its values.
fn packed_forward(
    q: &[f32],
    bufs: &[(FlexTensor, FlexTensor, usize, usize, usize)],
    n: usize,
    d: PackedDims,
) -> Vec<f32> {
    let (qs, kvs, rep) = (d.h * d.hd, d.kv * d.hd, d.h / d.kv);
    // Every element of `out` is written by one task's second gemm: no zeroing pass.
    let mut out: Vec<f32> = Vec::with_capacity(n * qs);
    let out_p = SendPtr(out.as_mut_ptr());
    (0..bufs.len() * d.h).into_par_iter().for_each(|task| {
        let (kb, vb, off, past, rows) = &bufs[task / d.h];
        let (hh, (off, past, rows)) = (task % d.h, (*off, *past, *rows));
        let (g, t) = (hh / rep, past + rows);
        let mut p = vec![0.0f32; rows * t];
        let (kd, vd) = (data(kb), data(vb));
        // SAFETY: q rows off..off+rows of head hh lie inside q ([n, h, hd]); the buffers
        // hold at least t rows of [kv, hd] (checked by the caller); task (seq, hh) owns
        // rows off..off+rows of head hh of `out`.
        unsafe {
            let qp = q.as_ptr().add(off * qs + hh * d.hd);
            head_scores(
                (rows, t, d.hd),
                p.as_mut_ptr(),
                qp,
                qs,
                kd[g * d.hd..].as_ptr(),
                kvs,
                d.scale,
            );
            softmax_causal(&mut p, t, past, d.window, None);
            let dst = out_p.get().add(off * qs + hh * d.hd);
            head_output(
                (rows, t, d.hd),
                dst,
                qs,
                p.as_ptr(),
                vd[g * d.hd..].as_ptr(),
                kvs,
            );
        }
    });
    // SAFETY: the tasks wrote every row of every head (the sequences' rows cover 0..n).
    unsafe { out.set_len(n * qs) };
    out
}
