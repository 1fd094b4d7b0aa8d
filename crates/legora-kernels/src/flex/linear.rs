//! Fused LoRA linear: `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` as one op, for one adapter or
//! for task-routed experts (each row through its own expert only, mLoRA's BatchLoRA:
//! no zero-gated work for the other experts).
//!
//! The frozen product goes to one multi-threaded gemm writing over the broadcast bias; the
//! rank-`r` path runs per block of rows in parallel (the skinny `[N, in]·[in, r]` products
//! are below burn-flex's threading threshold and would run on one core), accumulating
//! straight into `y`. The dropout mask is counter-based, so the backward draws it again
//! from its seed instead of keeping an `[N, in]` copy of it.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::dropout::{draw_seed, mask_range};
use super::{
    ad_of, all_f32, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor,
    Mode, SendPtr,
};
use super::{gemm, gemm_with, AdTensor};

/// Rows per parallel block of the rank-`r` path.
pub(crate) const BLOCK: usize = 64;

/// Sizes and settings of one fused LoRA linear: `E` experts of rank `r` stacked as
/// `A_cat [E·r, in]`, `B_cat [out, E·r]` (one adapter: `E = 1`), each row on one expert.
#[derive(Clone, Debug)]
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) d_in: usize,
    pub(crate) d_out: usize,
    pub(crate) r: usize,
    /// Scale of each expert.
    pub(crate) scales: Arc<[f32]>,
    /// Expert of each row; `None`: every row on expert 0.
    pub(crate) experts: Option<Arc<[usize]>>,
    /// Keep probability and mask seed, when dropout is on.
    pub(crate) dropout: Option<(f64, u64)>,
}

impl Dims {
    /// Columns of the stacked ranks, `E·r`.
    pub(crate) fn er(&self) -> usize {
        self.scales.len() * self.r
    }

    /// `(start, rows, expert)` blocks of at most [`BLOCK`] rows on one expert each.
    fn blocks(&self) -> Vec<(usize, usize, usize)> {
        let expert = |row: usize| self.experts.as_ref().map_or(0, |e| e[row]);
        let mut out = Vec::with_capacity(self.n / BLOCK + 1);
        let mut start = 0;
        while start < self.n {
            let e = expert(start);
            let mut end = start + 1;
            while end < self.n && end - start < BLOCK && expert(end) == e {
                end += 1;
            }
            out.push((start, end - start, e));
            start = end;
        }
        out
    }

    /// The dropout mask of rows `start..start + rows` (`None` without dropout).
    pub(crate) fn mask(&self, start: usize, rows: usize) -> Option<Vec<f32>> {
        self.dropout.map(|(keep, seed)| {
            let mut m = vec![0.0f32; rows * self.d_in];
            mask_range(seed, keep, start * self.d_in, &mut m);
            m
        })
    }

    /// Rows `start..start + rows` of `x`, times `mask` when there is one (into `buf`).
    pub(crate) fn dropped<'a>(
        &self,
        x: &'a [f32],
        start: usize,
        rows: usize,
        mask: Option<&[f32]>,
        buf: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let xb = &x[start * self.d_in..(start + rows) * self.d_in];
        match mask {
            None => xb,
            Some(m) => {
                buf.clear();
                buf.extend(xb.iter().zip(m).map(|(v, mv)| v * mv));
                buf
            }
        }
    }
}

/// `(y, h)` with `h = s_e·drop(x)·A_eᵀ` `[n, r]` for each row's expert `e` (kept for the
/// backward).
fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    d: &Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (n, din, dout, r, er) = (d.n, d.d_in, d.d_out, d.r, d.er());
    let mut y = base_forward(x, w, bias, n, din, dout);
    let mut h = vec![0.0f32; n * r];
    let (y_p, h_p) = (SendPtr(y.as_mut_ptr()), SendPtr(h.as_mut_ptr()));
    d.blocks().into_par_iter().for_each(|(start, rows, e)| {
        let mut buf = Vec::new();
        let mask = d.mask(start, rows);
        let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
        // SAFETY: block (start, rows) owns those rows of y and h; A_e is rows e·r.. of
        // A_cat, B_e columns e·r.. of B_cat (row stride E·r).
        unsafe {
            let (yb, hb) = (y_p.get().add(start * dout), h_p.get().add(start * r));
            let (ae, be) = (a.as_ptr().add(e * r * din), b.as_ptr().add(e * r));
            gemm(
                (rows, r, din),
                hb,
                r,
                false,
                (xd.as_ptr(), din, 1),
                (ae, 1, din),
                d.scales[e],
            );
            gemm(
                (rows, dout, r),
                yb,
                dout,
                true,
                (hb, r, 1),
                (be, 1, er),
                1.0,
            );
        }
    });
    (y, h)
}

/// State of the backward: inputs, `h` and the sizes (with the mask seed).
#[derive(Clone, Debug)]
pub(crate) struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    h: FlexTensor,
    dims: Dims,
}

/// Gradients of `[x, weight, bias, A_cat, B_cat]`, per block on expert `e`:
/// `dh = dY·B_e`, `dx = dY·W + s_e·(dh·A_e) ⊙ mask`, `dA_e = s_e·dhᵀ·drop(x)`,
/// `dB_e = dYᵀ·h`; and `dW = dYᵀ·x`, `dbias = Σ_rows dY`.
fn linear_backward(
    grad: &FlexTensor,
    st: &LinearState,
    needs: [bool; 5],
) -> [Option<FlexTensor>; 5] {
    let d = &st.dims;
    let (n, din, dout, r, er) = (d.n, d.d_in, d.d_out, d.r, d.er());
    let (dy, x, w, a, b, h) = (
        data(grad),
        data(&st.x),
        data(&st.w),
        data(&st.a),
        data(&st.b),
        data(&st.h),
    );
    let mut dx = if needs[0] {
        base_dx(dy, w, n, din, dout)
    } else {
        Vec::new()
    };
    let dx_p = SendPtr(dx.as_mut_ptr());
    let partials = d.blocks().into_par_iter().map(|(start, rows, e)| {
        let s = d.scales[e];
        let dyb = &dy[start * dout..];
        let mask = d.mask(start, rows);
        let mut dh = vec![0.0f32; rows * r];
        let mut da = vec![0.0f32; if needs[3] { er * din } else { 0 }];
        let mut db = vec![0.0f32; if needs[4] { dout * er } else { 0 }];
        // SAFETY: block-local views; the block owns rows start..start+rows of dx; A_e,
        // B_e as in `forward`; its partial dA/dB are its own.
        unsafe {
            let (ae, be) = (a.as_ptr().add(e * r * din), b.as_ptr().add(e * r));
            gemm(
                (rows, r, dout),
                dh.as_mut_ptr(),
                r,
                false,
                (dyb.as_ptr(), dout, 1),
                (be, er, 1),
                1.0,
            );
            if needs[0] {
                let dxb = std::slice::from_raw_parts_mut(dx_p.get().add(start * din), rows * din);
                add_input_grad(dxb, &dh, r, ae, din, s, mask.as_deref());
            }
            if needs[3] {
                let mut buf = Vec::new();
                let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
                let dst = da.as_mut_ptr().add(e * r * din);
                gemm(
                    (r, din, rows),
                    dst,
                    din,
                    false,
                    (dh.as_ptr(), 1, r),
                    (xd.as_ptr(), din, 1),
                    s,
                );
            }
            if needs[4] {
                let hb = &h[start * r..];
                let dst = db.as_mut_ptr().add(e * r);
                gemm(
                    (dout, r, rows),
                    dst,
                    er,
                    false,
                    (dyb.as_ptr(), 1, dout),
                    (hb.as_ptr(), r, 1),
                    1.0,
                );
            }
        }
        (da, db)
    });
    let (da, db) = sum_partials(partials);
    let dw = needs[1].then(|| base_dw(dy, x, n, din, dout));
    let dbias = needs[2].then(|| bias_grad(dy, dout));
    [
        needs[0].then(|| tensor(dx, &[n, din])),
        dw,
        dbias,
        needs[3].then(|| stacked_grad(da, [er, din])),
        needs[4].then(|| stacked_grad(db, [dout, er])),
    ]
}

/// The frozen part's output `bias + x·Wᵀ` `[n, dout]` (one multi-threaded gemm writing
/// over the broadcast bias).
pub(crate) fn base_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut y = match bias {
        Some(bias) => bias.repeat(n),
        None => vec![0.0f32; n * dout],
    };
    // SAFETY: x [n, din], w [dout, din] read as Wᵀ, y [n, dout].
    unsafe {
        gemm_with(
            gemm::Parallelism::Rayon(0),
            (n, dout, din),
            y.as_mut_ptr(),
            dout,
            bias.is_some(),
            (x.as_ptr(), din, 1),
            (w.as_ptr(), 1, din),
            1.0,
        );
    }
    y
}

/// `dY·W`, `[n, din]`: the input gradient of the frozen part.
pub(crate) fn base_dx(dy: &[f32], w: &[f32], n: usize, din: usize, dout: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; n * din];
    // SAFETY: dy [n, dout], w [dout, din], dx [n, din].
    unsafe {
        gemm_with(
            gemm::Parallelism::Rayon(0),
            (n, din, dout),
            dx.as_mut_ptr(),
            din,
            false,
            (dy.as_ptr(), dout, 1),
            (w.as_ptr(), din, 1),
            1.0,
        );
    }
    dx
}

/// `dYᵀ·x`, the weight gradient `[dout, din]` (only for a trainable base).
pub(crate) fn base_dw(dy: &[f32], x: &[f32], n: usize, din: usize, dout: usize) -> FlexTensor {
    let mut dw = vec![0.0f32; dout * din];
    // SAFETY: dy [n, dout] read as dYᵀ, x [n, din], dw [dout, din].
    unsafe {
        gemm_with(
            gemm::Parallelism::Rayon(0),
            (dout, din, n),
            dw.as_mut_ptr(),
            din,
            false,
            (dy.as_ptr(), 1, dout),
            (x.as_ptr(), din, 1),
            1.0,
        );
    }
    tensor(dw, &[dout, din])
}

/// `Σ_rows dY`, the bias gradient `[dout]`.
pub(crate) fn bias_grad(dy: &[f32], dout: usize) -> FlexTensor {
    let mut s = vec![0.0f32; dout];
    dy.chunks(dout)
        .for_each(|row| s.iter_mut().zip(row).for_each(|(a, v)| *a += v));
    tensor(s, &[dout])
}

/// The sizes of a stacked LoRA linear when every tensor is f32 and the shapes agree
/// (`x [n, in]`, `weight [out, in]`, `bias [out]`, `A_cat [E·r, in]`, `B_cat [out, E·r]`)
/// and the caller's own checks (`extra_fits`) hold; then, in training, the dropout seed is
/// drawn. `None`: the reference path takes the op (and no seed is drawn).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<B: Backend>(
    mode: Mode,
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
    (a, b): (&Tensor<B, 2>, &Tensor<B, 2>),
    rank: usize,
    scales: &[f64],
    dropout: f64,
    extra_fits: bool,
) -> Option<Dims> {
    let ([n, din], [dout, win], [ar, ain], [bout, br]) =
        (x.dims(), weight.dims(), a.dims(), b.dims());
    let mut dtypes = vec![x.dtype(), weight.dtype(), a.dtype(), b.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    let fits = extra_fits
        && all_f32(&dtypes)
        && !scales.is_empty()
        && win == din
        && ain == din
        && bout == dout
        && ar == br
        && ar == scales.len() * rank
        && bias.is_none_or(|b| b.dims() == [dout]);
    if !fits {
        return None;
    }
    let dropout = (mode == Mode::Autodiff && dropout > 0.0)
        .then(|| (1.0 - dropout, draw_seed::<B>(&x.device())));
    Some(Dims {
        n,
        d_in: din,
        d_out: dout,
        r: rank,
        scales: scales.iter().map(|s| *s as f32).collect(),
        experts: None,
        dropout,
    })
}

/// The autodiff primitives of `[x, weight, bias, A_cat, B_cat]`, contiguous, with a
/// zero bias standing in when there is none (an op's parents are a fixed list), and
/// whether there was one.
pub(crate) fn ad_inputs<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> ([AdTensor; 5], bool) {
    let has_bias = bias.is_some();
    let dout = weight.dims()[0];
    let bias = bias.unwrap_or_else(|| Tensor::zeros([dout], &x.device()));
    let mut t = [ad_of(x), ad_of(weight), ad_of(bias), ad_of(a), ad_of(b)];
    for p in t.iter_mut() {
        p.primitive = contiguous(p.primitive.clone());
    }
    (t, has_bias)
}

/// `dx_rows += beta·(lhs·A) ⊙ mask` (no mask: without it) for `lhs [rows, k]` and the
/// `k` rows of `A` at `a` (row stride `din`).
///
/// # Safety
/// `a` must address `k` rows of `din` elements; `dxb` holds `rows · din`.
pub(crate) unsafe fn add_input_grad(
    dxb: &mut [f32],
    lhs: &[f32],
    k: usize,
    a: *const f32,
    din: usize,
    beta: f32,
    mask: Option<&[f32]>,
) {
    let rows = dxb.len() / din;
    match mask {
        None => gemm(
            (rows, din, k),
            dxb.as_mut_ptr(),
            din,
            true,
            (lhs.as_ptr(), k, 1),
            (a, din, 1),
            beta,
        ),
        Some(m) => {
            let mut t = vec![0.0f32; rows * din];
            gemm(
                (rows, din, k),
                t.as_mut_ptr(),
                din,
                false,
                (lhs.as_ptr(), k, 1),
                (a, din, 1),
                beta,
            );
            dxb.iter_mut()
                .zip(t.iter().zip(m))
                .for_each(|(o, (tv, mv))| *o += tv * mv);
        }
    }
}

/// The sum of the row blocks' partial `(dA_cat, dB_cat)` (empty when not needed).
pub(crate) fn sum_partials(
    parts: impl ParallelIterator<Item = (Vec<f32>, Vec<f32>)>,
) -> (Vec<f32>, Vec<f32>) {
    parts.reduce(
        || (Vec::new(), Vec::new()),
        |(mut a1, mut b1), (a2, b2)| {
            add_into(&mut a1, a2);
            add_into(&mut b1, b2);
            (a1, b1)
        },
    )
}

/// A summed stacked gradient as a tensor (zeros when no block contributed).
pub(crate) fn stacked_grad(v: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    let v = if v.is_empty() {
        vec![0.0; shape[0] * shape[1]]
    } else {
        v
    };
    tensor(v, &shape)
}

/// `acc += part` (an empty `acc` takes `part` as is).
fn add_into(acc: &mut Vec<f32>, part: Vec<f32>) {
    if acc.is_empty() {
        *acc = part;
    } else {
        acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
    }
}

backward!(LinearBackward, 5, LinearState, linear_backward);

type Args<B> = (
    Tensor<B, 2>,
    Tensor<B, 2>,
    Option<Tensor<B, 1>>,
    crate::RoutedLora<B>,
);

/// Fused [`crate::lora_linear`] / [`crate::routed_lora_linear`].
pub(crate) fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: crate::RoutedLora<B>,
) -> Result<Tensor<B, 2>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, weight, bias, lora));
    };
    let n = x.dims()[0];
    let experts_fit = lora
        .experts
        .as_ref()
        .is_none_or(|ex| ex.len() == n && ex.iter().all(|&i| i < lora.scales.len()));
    let lora_ab = (&lora.lora_a, &lora.lora_b);
    let (rank, scales) = (lora.rank, &lora.scales);
    let fitted = fit(
        mode,
        &x,
        &weight,
        bias.as_ref(),
        lora_ab,
        rank,
        scales,
        lora.dropout,
        experts_fit,
    );
    let Some(mut dims) = fitted else {
        return Err((x, weight, bias, lora));
    };
    dims.experts = lora.experts.map(Arc::from);
    let dout = dims.d_out;
    let r = lora.rank;
    Ok(match mode {
        Mode::Plain => {
            let [x, w, a, b] =
                [x, weight, lora.lora_a, lora.lora_b].map(|t| contiguous(flex_of(t)));
            let bias = bias.map(|t| contiguous(flex_of(t)));
            let (y, _) = forward(
                data(&x),
                data(&w),
                bias.as_ref().map(data),
                data(&a),
                data(&b),
                &dims,
            );
            from_flex(tensor(y, &[n, dout]))
        }
        Mode::Autodiff => {
            let ([xa, wa, ba, aa, bb], has_bias) =
                ad_inputs(x, weight, bias, lora.lora_a, lora.lora_b);
            from_ad(record(
                LinearBackward,
                [&xa, &wa, &ba, &aa, &bb],
                |tracked| {
                    let bias = has_bias.then(|| data(&ba.primitive));
                    let (x, w, a, b) = (&xa.primitive, &wa.primitive, &aa.primitive, &bb.primitive);
                    let (y, h) = forward(data(x), data(w), bias, data(a), data(b), &dims);
                    let state = tracked.then(|| LinearState {
                        x: x.clone(),
                        w: w.clone(),
                        a: a.clone(),
                        b: b.clone(),
                        h: tensor(h, &[n, r]),
                        dims: dims.clone(),
                    });
                    (tensor(y, &[n, dout]), state)
                },
            ))
        }
    })
}
