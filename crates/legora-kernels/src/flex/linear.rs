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
use super::{gemm, gemm_with};

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
    let (da, db) = d
        .blocks()
        .into_par_iter()
        .map(|(start, rows, e)| {
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
                    let dxb =
                        std::slice::from_raw_parts_mut(dx_p.get().add(start * din), rows * din);
                    match &mask {
                        None => gemm(
                            (rows, din, r),
                            dxb.as_mut_ptr(),
                            din,
                            true,
                            (dh.as_ptr(), r, 1),
                            (ae, din, 1),
                            s,
                        ),
                        Some(m) => {
                            let mut t = vec![0.0f32; rows * din];
                            gemm(
                                (rows, din, r),
                                t.as_mut_ptr(),
                                din,
                                false,
                                (dh.as_ptr(), r, 1),
                                (ae, din, 1),
                                s,
                            );
                            dxb.iter_mut()
                                .zip(t.iter().zip(m))
                                .for_each(|(o, (tv, mv))| *o += tv * mv);
                        }
                    }
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
        })
        .reduce(
            || (Vec::new(), Vec::new()),
            |(mut a1, mut b1), (a2, b2)| {
                add_into(&mut a1, a2);
                add_into(&mut b1, b2);
                (a1, b1)
            },
        );
    let dw = needs[1].then(|| base_dw(dy, x, n, din, dout));
    let dbias = needs[2].then(|| bias_grad(dy, dout));
    let or_zeros = |v: Vec<f32>, len: usize| if v.is_empty() { vec![0.0; len] } else { v };
    [
        needs[0].then(|| tensor(dx, &[n, din])),
        dw,
        dbias,
        needs[3].then(|| tensor(or_zeros(da, er * din), &[er, din])),
        needs[4].then(|| tensor(or_zeros(db, dout * er), &[dout, er])),
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

/// `acc += part` (an empty `acc` takes `part` as is).
pub(crate) fn add_into(acc: &mut Vec<f32>, part: Vec<f32>) {
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
    let ([n, din], [dout, win], [ar, ain], [bout, br]) = (
        x.dims(),
        weight.dims(),
        lora.lora_a.dims(),
        lora.lora_b.dims(),
    );
    let e = lora.scales.len();
    let mut dtypes = vec![
        x.dtype(),
        weight.dtype(),
        lora.lora_a.dtype(),
        lora.lora_b.dtype(),
    ];
    dtypes.extend(bias.as_ref().map(|b| b.dtype()));
    let fits = all_f32(&dtypes)
        && e > 0
        && win == din
        && ain == din
        && bout == dout
        && ar == br
        && ar == e * lora.rank
        && bias.as_ref().is_none_or(|b| b.dims() == [dout])
        && lora
            .experts
            .as_ref()
            .is_none_or(|ex| ex.len() == n && ex.iter().all(|&i| i < e));
    if !fits {
        return Err((x, weight, bias, lora));
    }
    let device = x.device();
    let dropout = (mode == Mode::Autodiff && lora.dropout > 0.0)
        .then(|| (1.0 - lora.dropout, draw_seed::<B>(&device)));
    let dims = Dims {
        n,
        d_in: din,
        d_out: dout,
        r: lora.rank,
        scales: lora.scales.iter().map(|s| *s as f32).collect(),
        experts: lora.experts.map(Arc::from),
        dropout,
    };
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
            let has_bias = bias.is_some();
            let bias = bias.unwrap_or_else(|| Tensor::zeros([dout], &device));
            let mut xa = ad_of(x);
            let mut wa = ad_of(weight);
            let mut ba = ad_of(bias);
            let mut aa = ad_of(lora.lora_a);
            let mut bb = ad_of(lora.lora_b);
            for t in [&mut xa, &mut wa, &mut ba, &mut aa, &mut bb] {
                t.primitive = contiguous(t.primitive.clone());
            }
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
